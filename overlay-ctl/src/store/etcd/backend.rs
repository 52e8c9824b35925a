//! The etcd client as a [`KvBackend`]: Consul's indexes are etcd's revisions
//! (`modify_index` is `mod_revision`, the watch index the store revision), a create-only
//! write is a transaction on `create_revision == 0`, and a session is a lease (its id in
//! hex, as etcdctl prints it).
use std::{future::Future, time::Duration};

use super::{EtcdClient, EtcdError, KvEntry, LeaseId};
use crate::store::backend::{KvBackend, KvPair};

impl From<KvEntry> for KvPair {
    fn from(entry: KvEntry) -> Self {
        Self {
            key: entry.key,
            value: entry.value,
            create_index: revision_index(entry.create_revision),
            modify_index: revision_index(entry.mod_revision),
            lock_index: 0,
            flags: 0,
            session: entry.lease.map(|l| l.to_string()),
        }
    }
}

fn revision_index(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

fn index_revision(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

/// The lease a session id names (`None`: not a lease id, e.g. a Consul session's).
pub fn parse_lease(session: &str) -> Option<LeaseId> {
    i64::from_str_radix(session, 16)
        .ok()
        .filter(|id| *id > 0)
        .map(LeaseId)
}

impl KvBackend for EtcdClient {
    type Error = EtcdError;

    async fn get(&self, key: &str) -> Result<Option<KvPair>, EtcdError> {
        Ok(Self::get(self, key).await?.map(KvPair::from))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KvPair>, EtcdError> {
        let listing = Self::list(self, prefix).await?;
        Ok(listing.entries.into_iter().map(KvPair::from).collect())
    }

    fn keys(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, EtcdError>> + Send {
        Self::keys(self, prefix)
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        Self::put(self, key, value).await.map(|_| ())
    }

    fn put_cas(
        &self,
        key: &str,
        value: &[u8],
        index: u64,
    ) -> impl Future<Output = Result<bool, EtcdError>> + Send {
        Self::put_cas(self, key, value, index_revision(index))
    }

    async fn acquire(&self, key: &str, value: &[u8], session: &str) -> Result<bool, EtcdError> {
        let lease = parse_lease(session).ok_or_else(|| {
            EtcdError::InvalidArgument(format!("{session:?} is not an etcd lease id"))
        })?;
        Self::acquire(self, key, value, lease).await
    }

    fn delete(&self, key: &str) -> impl Future<Output = Result<(), EtcdError>> + Send {
        Self::delete(self, key)
    }

    fn delete_cas(
        &self,
        key: &str,
        index: u64,
    ) -> impl Future<Output = Result<bool, EtcdError>> + Send {
        Self::delete_cas(self, key, index_revision(index))
    }

    async fn delete_tree(&self, prefix: &str) -> Result<(), EtcdError> {
        Self::delete_tree(self, prefix).await.map(|_| ())
    }

    /// Waits for a watch event after revision `index`, then lists (the agent's
    /// "list from an index" shape; an incremental watch is [`super::PrefixWatch`]).
    async fn list_blocking(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<KvPair>, u64), EtcdError> {
        let listing = Self::list_blocking(self, prefix, index_revision(index), wait).await?;
        let pairs = listing.entries.into_iter().map(KvPair::from).collect();
        Ok((pairs, revision_index(listing.revision)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_map_revisions_and_leases() {
        let entry = KvEntry {
            key: "overlay/nodes/n1".into(),
            value: b"{}".to_vec(),
            create_revision: 7,
            mod_revision: 9,
            version: 2,
            lease: Some(LeaseId(0x694d_77aa_9a0e_2c1b)),
        };
        let pair = KvPair::from(entry);
        assert_eq!((pair.create_index, pair.modify_index), (7, 9));
        assert_eq!(pair.session.as_deref(), Some("694d77aa9a0e2c1b"));
        assert_eq!(
            parse_lease("694d77aa9a0e2c1b"),
            Some(LeaseId(0x694d_77aa_9a0e_2c1b))
        );
        assert_eq!(parse_lease("9b7a5c3e-0000-4000-8000-000000000001"), None);
        assert_eq!(parse_lease("0"), None);
    }
}
