//! The agent's feed of the cluster state: one full read, then only what changed.
//!
//! A [`StoreFeed`] follows the keys an agent needs (everything under the prefix except
//! the nodes' `applied/` acknowledgements) and delivers [`FeedEvent`]s: a
//! [`FeedEvent::Snapshot`] first (and again whenever the history in between is lost, e.g.
//! a compacted etcd revision or a Consul index that went backwards), then
//! [`FeedEvent::Changes`] holding only the keys that changed. The cost of an endpoint
//! change for a watching agent is then that change, not the cluster.
//!
//! Per backend: [`etcd`] (one watch on a key range) and [`consul`] (blocking queries per
//! part of the state, and a change journal for the big parts).
mod consul;
mod etcd;
mod lanes;

use std::time::Duration;

pub use self::etcd::VersionsRead;
use self::{consul::ConsulFeed, etcd::EtcdFeed};
use super::{
    backend::{KvPair, StoreBackend},
    StoreError,
};

/// One change under the followed keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvChange {
    /// The key was created or its value replaced.
    Put(KvPair),
    /// The key is gone.
    Delete { key: String },
}

impl KvChange {
    pub fn key(&self) -> &str {
        match self {
            KvChange::Put(pair) => &pair.key,
            KvChange::Delete { key } => key,
        }
    }
}

/// What [`StoreFeed::next`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedEvent {
    /// Everything under the followed keys as of `index`: replace what you had.
    Snapshot { pairs: Vec<KvPair>, index: u64 },
    /// The changes since the previous event, in the order the store made them; after
    /// applying them the follower holds the state as of `index`.
    Changes { changes: Vec<KvChange>, index: u64 },
}

impl FeedEvent {
    /// The store index (Consul) or revision (etcd) the follower is at after this event.
    pub fn index(&self) -> u64 {
        match self {
            FeedEvent::Snapshot { index, .. } | FeedEvent::Changes { index, .. } => *index,
        }
    }
}

/// The followed keys as the store held them at one index, without their values: what
/// a follower that applied every event up to `index` holds, if it missed nothing
/// ([`StoreFeed::versions_read`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versions {
    pub index: u64,
    /// (key, index of its last write), sorted by key.
    pub keys: Vec<(String, u64)>,
}

/// Follows the cluster state under a prefix; see the module documentation.
#[derive(Debug)]
pub struct StoreFeed {
    inner: Inner,
}

// One per agent: the size difference costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Inner {
    Consul(ConsulFeed),
    Etcd(EtcdFeed),
}

impl StoreFeed {
    /// A feed of everything under `prefix` that an agent applies; `wait` bounds one
    /// blocking query (Consul) or how long a quiet watch is left alone (etcd).
    pub fn new(backend: StoreBackend, prefix: &str, wait: Duration) -> Self {
        let inner = match backend {
            StoreBackend::Etcd(client) => Inner::Etcd(EtcdFeed::new(client, prefix, wait)),
            StoreBackend::Consul(client) => Inner::Consul(ConsulFeed::new(client, prefix, wait)),
        };
        Self { inner }
    }

    /// Makes the next event a snapshot from a fresh read, with the store followed anew
    /// from there: for a follower that learnt from elsewhere that the store is not what
    /// its events describe (e.g. a fresh read of another cluster identity). A `next`
    /// cancelled midway is covered by it.
    pub fn reread(&mut self, reason: &str) {
        match &mut self.inner {
            Inner::Etcd(feed) => feed.reread(reason),
            Inner::Consul(feed) => feed.reread(reason),
        }
    }

    /// A read of the followed keys as of the last event delivered, from the store
    /// without their values, for a follower to check its copy against (a feed that
    /// missed an event shows as a key whose index differs). It runs beside the feed,
    /// which goes on delivering: the follower leaves out what changed after
    /// [`VersionsRead::index`]. `None` when the store cannot be read as of a past index
    /// (Consul: its follower re-reads the whole state instead), or when there is
    /// nothing to compare yet. To be taken between two events only.
    pub fn versions_read(&self) -> Option<VersionsRead> {
        match &self.inner {
            Inner::Etcd(feed) => feed.versions_read(),
            Inner::Consul(_) => None,
        }
    }

    /// The next event: the first call returns the initial snapshot at once, later ones
    /// when something changed (or a wait expired: then possibly an empty `Changes`).
    pub async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        match &mut self.inner {
            Inner::Etcd(feed) => feed.next().await,
            Inner::Consul(feed) => feed.next().await,
        }
    }
}
