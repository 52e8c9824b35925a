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

/// Keys read per request of a range read: a whole cluster's state is read in pages of
/// this many (all at the first page's revision), as one answer of 20,000 endpoints
/// passes the 4 MiB a gRPC message may hold.
pub const PAGE_KEYS: i64 = 2000;

/// The first key after `key` in byte order.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

impl EtcdClient {
    /// Every key in `range`, sorted by key, with the revision read at.
    pub async fn list_range(&self, range: &KeyRange) -> Result<Listing, EtcdError> {
        self.read_pages(range, false, 0).await
    }

    /// The (key, revision of its last write) of every key in `range` as of store
    /// `revision`, sorted by key: what a follower of the range must hold at that
    /// revision, without the values (a fraction of the bytes, nothing to decode). Fails
    /// when etcd compacted `revision` away.
    pub async fn versions_at(
        &self,
        range: &KeyRange,
        revision: i64,
    ) -> Result<Vec<(String, i64)>, EtcdError> {
        let listing = self.read_pages(range, true, revision.max(1)).await?;
        Ok((listing.entries.into_iter())
            .map(|e| (e.key, e.mod_revision))
            .collect())
    }

    /// Every key in `range` (values left out when `keys_only`), read in pages of
    /// [`PAGE_KEYS`] at one revision, `at` (0: the first page's, the newest): one
    /// consistent listing.
    pub(super) async fn read_pages(
        &self,
        range: &KeyRange,
        keys_only: bool,
        at: i64,
    ) -> Result<Listing, EtcdError> {
        let mut entries = Vec::new();
        let mut revision = at;
        let mut start = range.start.clone();
        loop {
            let mut options = range.get_options().with_limit(PAGE_KEYS);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            if keys_only {
                options = options.with_keys_only();
            }
            let resp = self
                .call("list", |mut c| {
                    let (start, options) = (start.clone(), options.clone());
                    async move { c.get(start, Some(options)).await }
                })
                .await?;
            self.count_read(wire::get_response_len(&resp));
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            entries.extend(resp.kvs().iter().map(KvEntry::from_kv));
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => start = key_after(last.key()),
                _ => break,
            }
        }
        Ok(Listing { entries, revision })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_continue_right_after_the_last_key() {
        assert_eq!(key_after(b"o/endpoints/a"), b"o/endpoints/a\0".to_vec());
        let range = KeyRange::prefix("o/");
        assert!(range.contains(&key_after(b"o/endpoints/a")));
    }

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
