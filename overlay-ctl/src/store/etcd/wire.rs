//! The encoded size of the etcd answers the client reads, for [`super::EtcdClient::bytes_read`]:
//! protobuf's wire format computed from the fields etcd-client exposes (its generated
//! messages, and so prost's `encoded_len`, are private to it). A field at its default
//! value is not on the wire, as in proto3.
use etcd_client::{Event, EventType, GetResponse, KeyValue, ResponseHeader, WatchResponse};

/// The bytes of a base-128 varint holding `value`.
fn varint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// An integer field (one tag byte: every field number used here is below 16).
fn int_field(value: i64) -> usize {
    if value == 0 {
        return 0;
    }
    // Negative int64s are sign-extended to ten bytes on the wire.
    1 + varint_len(value as u64)
}

fn uint_field(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + varint_len(value)
    }
}

fn bool_field(value: bool) -> usize {
    if value {
        2
    } else {
        0
    }
}

/// A length-delimited field (bytes, string or message) of `len` bytes.
fn len_field(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    1 + varint_len(len as u64) + len
}

/// A length-delimited field for an embedded message, present even when empty.
fn message_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn header_len(header: &ResponseHeader) -> usize {
    uint_field(header.cluster_id())
        + uint_field(header.member_id())
        + int_field(header.revision())
        + uint_field(header.raft_term())
}

fn key_value_len(kv: &KeyValue) -> usize {
    len_field(kv.key().len())
        + int_field(kv.create_revision())
        + int_field(kv.mod_revision())
        + int_field(kv.version())
        + len_field(kv.value().len())
        + int_field(kv.lease())
}

fn event_len(event: &Event) -> usize {
    let kind = match event.event_type() {
        EventType::Put => 0,
        EventType::Delete => 2,
    };
    kind + event.kv().map_or(0, |kv| message_field(key_value_len(kv)))
        + event
            .prev_kv()
            .map_or(0, |kv| message_field(key_value_len(kv)))
}

/// The encoded size of a range answer.
pub(super) fn get_response_len(resp: &GetResponse) -> u64 {
    let len = resp.header().map_or(0, |h| message_field(header_len(h)))
        + resp
            .kvs()
            .iter()
            .map(|kv| message_field(key_value_len(kv)))
            .sum::<usize>()
        + bool_field(resp.more())
        + int_field(resp.count());
    len as u64
}

/// The encoded size of one watch message.
pub(super) fn watch_response_len(resp: &WatchResponse) -> u64 {
    let len = resp.header().map_or(0, |h| message_field(header_len(h)))
        + int_field(resp.watch_id())
        + bool_field(resp.created())
        + bool_field(resp.canceled())
        + int_field(resp.compact_revision())
        + len_field(resp.cancel_reason().len())
        + resp
            .events()
            .iter()
            .map(|e| message_field(event_len(e)))
            .sum::<usize>();
    len as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_take_seven_bits_a_byte() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(16_383), 2);
        assert_eq!(varint_len(16_384), 3);
        assert_eq!(varint_len(u64::MAX), 10);
    }

    #[test]
    fn fields_follow_proto3() {
        assert_eq!(int_field(0), 0);
        assert_eq!(int_field(5), 2);
        assert_eq!(int_field(-1), 11);
        assert_eq!(len_field(0), 0);
        assert_eq!(len_field(3), 5);
        assert_eq!(message_field(0), 2);
        assert_eq!(bool_field(true), 2);
    }
}
