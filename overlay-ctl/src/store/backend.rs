//! The seam between the cluster-state code and a KV store: the entry type
//! ([`KvPair`]) and the few primitives ([`KvBackend`]) that networks, VNIs, IPAM, nodes,
//! endpoints and the applied-index records are written with. The Consul client
//! implements it ([`crate::store::consul`]), and so does the etcd v3 client
//! ([`crate::store::etcd`]); [`StoreBackend`] is the one of the two a [`crate::store::Store`]
//! runs on, chosen by `--store` ([`crate::store::config`]).
//!
//! How each primitive maps to a backend:
//!
//! | primitive | Consul | etcd v3 |
//! | --- | --- | --- |
//! | [`KvBackend::get`], [`KvBackend::list`], [`KvBackend::keys`] | `GET /v1/kv` (`?recurse`, `?keys`) | `Range` (prefix, keys-only) |
//! | [`KvBackend::put`] | `PUT /v1/kv` | `Put` |
//! | [`KvBackend::put_cas`] (0: create-only) | `?cas=N` | `Txn` on `mod_revision == N` (`create_revision == 0`) |
//! | [`KvBackend::delete`], [`KvBackend::delete_cas`], [`KvBackend::delete_tree`] | `DELETE` (`?cas`, `?recurse`) | `DeleteRange`, `Txn` |
//! | [`KvBackend::acquire`] (session-bound put) | `?acquire=<session>` | `Put` with the lease, in a `Txn` on `create_revision == 0` |
//! | [`KvBackend::list_blocking`] (watch from an index) | blocking query `?index=&wait=` | `Watch` from a revision |
//!
//! [`KvPair`]'s indexes are Consul's; the etcd backend fills them from revisions
//! (`create_index` from `create_revision`, `modify_index` from `mod_revision`, the
//! watch index from the store revision) and `session` from the lease (its id in hex).
use std::{future::Future, time::Duration};

use crate::store::{consul::ConsulClient, etcd::EtcdClient, StoreError};

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

/// What the record rules ([`crate::store::records`]) read of an entry: a [`KvPair`] as
/// read from the store, or the agent's compact copy of one (its mirror keeps twenty
/// thousand of them, without the fields no rule reads).
pub trait Record {
    fn key(&self) -> &str;
    fn value(&self) -> &[u8];
    fn create_index(&self) -> u64;
    /// The session holding the entry, if any.
    fn session(&self) -> Option<&str>;

    /// The value as UTF-8 text (lossy).
    fn value_str(&self) -> String {
        String::from_utf8_lossy(self.value()).into_owned()
    }
}

impl Record for KvPair {
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &[u8] {
        &self.value
    }
    fn create_index(&self) -> u64 {
        self.create_index
    }
    fn session(&self) -> Option<&str> {
        self.session.as_deref()
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

/// The store a [`crate::store::Store`] runs on. Its errors are [`StoreError`]s
/// (`StoreError::Consul` or `StoreError::Etcd`).
// One per Store, cloned rarely: the size difference costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum StoreBackend {
    Consul(ConsulClient),
    Etcd(EtcdClient),
}

impl StoreBackend {
    /// The store as a URL (`consul://host:port`, `etcd://a:2379,b:2379`), for status and
    /// messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Consul(c) => format!("consul://{}", c.addr()),
            Self::Etcd(e) => e.endpoints().to_string(),
        }
    }

    /// The bytes this process read from the store through this client and its clones
    /// (Consul: answer bodies; etcd: encoded range answers and watch messages).
    pub fn bytes_read(&self) -> u64 {
        match self {
            Self::Consul(c) => c.bytes_read(),
            Self::Etcd(e) => e.bytes_read(),
        }
    }

    /// `consul` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Consul(_) => "consul",
            Self::Etcd(_) => "etcd",
        }
    }
}

/// Runs the same call on whichever client the backend holds, as a [`StoreError`].
macro_rules! dispatch {
    ($backend:expr, $client:ident => $call:expr) => {
        match $backend {
            StoreBackend::Consul($client) => $call.await.map_err(StoreError::from),
            StoreBackend::Etcd($client) => $call.await.map_err(StoreError::from),
        }
    };
}

impl KvBackend for StoreBackend {
    type Error = StoreError;

    async fn get(&self, key: &str) -> Result<Option<KvPair>, StoreError> {
        dispatch!(self, c => KvBackend::get(c, key))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KvPair>, StoreError> {
        dispatch!(self, c => KvBackend::list(c, prefix))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, c => KvBackend::keys(c, prefix))
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        dispatch!(self, c => KvBackend::put(c, key, value))
    }

    async fn put_cas(&self, key: &str, value: &[u8], index: u64) -> Result<bool, StoreError> {
        dispatch!(self, c => KvBackend::put_cas(c, key, value, index))
    }

    async fn acquire(&self, key: &str, value: &[u8], session: &str) -> Result<bool, StoreError> {
        dispatch!(self, c => KvBackend::acquire(c, key, value, session))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        dispatch!(self, c => KvBackend::delete(c, key))
    }

    async fn delete_cas(&self, key: &str, index: u64) -> Result<bool, StoreError> {
        dispatch!(self, c => KvBackend::delete_cas(c, key, index))
    }

    async fn delete_tree(&self, prefix: &str) -> Result<(), StoreError> {
        dispatch!(self, c => KvBackend::delete_tree(c, prefix))
    }

    async fn list_blocking(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<KvPair>, u64), StoreError> {
        dispatch!(self, c => KvBackend::list_blocking(c, prefix, index, wait))
    }
}
