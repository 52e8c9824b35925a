//! The seam between the cluster-state code and a KV store: the entry type
//! ([`KvPair`]) and the few primitives ([`KvBackend`]) that networks, VNIs, IPAM, nodes,
//! endpoints and the applied-index records are written with. The Consul client
//! implements it ([`crate::store::consul`]); a second backend (etcd, issue #15) joins
//! by implementing it too.
//!
//! How each primitive maps to a backend:
//!
//! | primitive | Consul | etcd v3 (planned) |
//! | --- | --- | --- |
//! | [`KvBackend::get`], [`KvBackend::list`], [`KvBackend::keys`] | `GET /v1/kv` (`?recurse`, `?keys`) | `Range` (prefix, keys-only) |
//! | [`KvBackend::put`] | `PUT /v1/kv` | `Put` |
//! | [`KvBackend::put_cas`] (0: create-only) | `?cas=N` | `Txn` on `mod_revision == N` (`create_revision == 0`) |
//! | [`KvBackend::delete`], [`KvBackend::delete_cas`], [`KvBackend::delete_tree`] | `DELETE` (`?cas`, `?recurse`) | `DeleteRange`, `Txn` |
//! | [`KvBackend::acquire`] (session-bound put) | `?acquire=<session>` | `Put` with the lease, in a `Txn` on `create_revision == 0` |
//! | [`KvBackend::list_blocking`] (watch from an index) | blocking query `?index=&wait=` | `Watch` from a revision |
//!
//! [`KvPair`]'s indexes are Consul's; an etcd backend fills them from revisions
//! (`create_index` from `create_revision`, `modify_index` from `mod_revision`) and
//! `session` from the lease.
use std::{future::Future, time::Duration};

/// One KV entry, with its value as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPair {
    pub key: String,
    pub value: Vec<u8>,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
    pub flags: u64,
    /// The session holding the lock on this key, if any.
    pub session: Option<String>,
}

impl KvPair {
    /// The value as UTF-8 text (lossy).
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// The KV primitives the cluster-state code needs from a store. Every future is `Send`
/// (the agent runs store calls on spawned tasks).
pub trait KvBackend: Send + Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The entry at `key`, `None` when there is none.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KvPair>, Self::Error>> + Send;

    /// Every entry under `prefix` (empty when none).
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<KvPair>, Self::Error>> + Send;

    /// The key names under `prefix`.
    fn keys(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, Self::Error>> + Send;

    /// Sets the value unconditionally.
    fn put(&self, key: &str, value: &[u8]) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Writes only if the entry's modify index is `index`; `index` 0 writes only if the
    /// key does not exist (create-only). Returns whether it wrote.
    fn put_cas(
        &self,
        key: &str,
        value: &[u8],
        index: u64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Writes `value` at `key` bound to `session` (the key goes with the session);
    /// false when another session holds the key.
    fn acquire(
        &self,
        key: &str,
        value: &[u8],
        session: &str,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Deletes `key` (deleting a missing key succeeds).
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes `key` only if its modify index is `index`; returns whether it did.
    fn delete_cas(
        &self,
        key: &str,
        index: u64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Deletes every key under `prefix` (an empty prefix is refused).
    fn delete_tree(&self, prefix: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The entries under `prefix` once anything there changed past `index` (or `wait`
    /// expired), with the index they were read at; `index` 0 answers at once.
    fn list_blocking(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> impl Future<Output = Result<(Vec<KvPair>, u64), Self::Error>> + Send;
}

impl KvBackend for crate::store::consul::ConsulClient {
    type Error = crate::store::consul::ConsulError;

    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KvPair>, Self::Error>> + Send {
        Self::get(self, key)
    }

    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<KvPair>, Self::Error>> + Send {
        Self::list(self, prefix)
    }

    fn keys(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>, Self::Error>> + Send {
        Self::keys(self, prefix)
    }

    fn put(&self, key: &str, value: &[u8]) -> impl Future<Output = Result<(), Self::Error>> + Send {
        Self::put(self, key, value)
    }

    fn put_cas(
        &self,
        key: &str,
        value: &[u8],
        index: u64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        Self::put_cas(self, key, value, index)
    }

    fn acquire(
        &self,
        key: &str,
        value: &[u8],
        session: &str,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        Self::acquire(self, key, value, session)
    }

    fn delete(&self, key: &str) -> impl Future<Output = Result<(), Self::Error>> + Send {
        Self::delete(self, key)
    }

    fn delete_cas(
        &self,
        key: &str,
        index: u64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        Self::delete_cas(self, key, index)
    }

    fn delete_tree(&self, prefix: &str) -> impl Future<Output = Result<(), Self::Error>> + Send {
        Self::delete_tree(self, prefix)
    }

    fn list_blocking(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> impl Future<Output = Result<(Vec<KvPair>, u64), Self::Error>> + Send {
        Self::list_blocking(self, prefix, index, wait)
    }
}
