//! Key ranges: etcd reads and watches `[start, end)` in byte order, so a feed can follow
//! a prefix minus a sub-prefix (e.g. everything under `overlay/` after `overlay/applied/`)
//! with one range instead of one watch per kind of key.
use etcd_client::GetOptions;

use super::{wire, EtcdClient, EtcdError, KvEntry, Listing};

/// The keys `k` with `start <= k < end` (byte order); an `end` of `[0]` means "every key
/// from `start` on", as in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    start: Vec<u8>,
    end: Vec<u8>,
}

/// The first key after every key starting with `prefix` (etcd's `GetPrefix`): `[0]`
/// (no end) for an empty prefix or one of only `0xff` bytes.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl KeyRange {
    /// Every key starting with `prefix` (every key for an empty prefix).
    pub fn prefix(prefix: &str) -> Self {
        let start = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        Self {
            start,
            end: prefix_end(prefix.as_bytes()),
        }
    }

    /// The keys under `prefix` that sort after every key under `prefix` + `excluded`
    /// (`excluded` ends with `/`, e.g. `applied/`): the range starts at the first key
    /// past that sub-prefix.
    pub fn prefix_after(prefix: &str, excluded: &str) -> Self {
        let skipped = format!("{prefix}{excluded}");
        Self {
            start: prefix_end(skipped.as_bytes()),
            end: prefix_end(prefix.as_bytes()),
        }
    }

    pub fn start(&self) -> &[u8] {
        &self.start
    }

    pub fn end(&self) -> &[u8] {
        &self.end
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end == [0] || key < self.end.as_slice())
    }

    pub(super) fn get_options(&self) -> GetOptions {
        GetOptions::new().with_range(self.end.clone())
    }
}

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}, {})",
            String::from_utf8_lossy(&self.start).escape_debug(),
            String::from_utf8_lossy(&self.end).escape_debug()
        )
    }
}

impl EtcdClient {
    /// Every key in `range`, sorted by key, with the revision read at.
    pub async fn list_range(&self, range: &KeyRange) -> Result<Listing, EtcdError> {
        let resp = self
            .call("list", |mut c| async move {
                c.get(range.start.clone(), Some(range.get_options())).await
            })
            .await?;
        self.count_read(wire::get_response_len(&resp));
        Ok(Listing {
            entries: resp.kvs().iter().map(KvEntry::from_kv).collect(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_increment_the_last_byte() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn a_range_after_a_sub_prefix_leaves_it_out() {
        let range = KeyRange::prefix_after("overlay/", "applied/");
        for kept in [
            "overlay/config/cluster-id",
            "overlay/endpoints/net1/web",
            "overlay/ipam/net1/10.0.0.2",
            "overlay/networks/net1",
            "overlay/nodes/n1",
            "overlay/subnets",
            "overlay/vni/2",
        ] {
            assert!(range.contains(kept.as_bytes()), "{kept}");
        }
        for left_out in [
            "overlay/applied/n1",
            "overlay/applied/",
            "overlay0",
            "other/networks/a",
        ] {
            assert!(!range.contains(left_out.as_bytes()), "{left_out}");
        }
    }

    #[test]
    fn an_empty_prefix_is_every_key() {
        let range = KeyRange::prefix("");
        assert!(range.contains(b"a"));
        assert!(range.contains(b"\xff\xff"));
        assert_eq!(range.end(), [0]);
    }
}
