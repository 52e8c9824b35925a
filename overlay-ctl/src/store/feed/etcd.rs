//! The feed on etcd: one long-lived watch on the range of keys an agent applies (the
//! prefix minus `applied/`, which sorts before every kind of key the agent reads), so
//! after the initial range read only watch events cross the wire.
use std::time::Duration;

use futures_util::FutureExt as _;

use super::{FeedEvent, KvChange, Versions};
use crate::store::{
    backend::KvPair,
    etcd::{EtcdClient, EtcdError, KeyRange, PrefixWatch, WatchEvent, WatchUpdate},
    keys::Keys,
    StoreError,
};

/// The sub-prefix left out of the feed: every node's acknowledgement.
const EXCLUDED: &str = "applied/";

/// At most this many events are merged into one batch: an agent that fell behind
/// applies what arrived meanwhile at once (one judgement, one acknowledgement), in
/// bounded steps.
const MAX_BATCH_EVENTS: usize = 4096;

/// The keys the feed follows under `prefix`.
pub(super) fn followed_range(prefix: &str) -> KeyRange {
    KeyRange::prefix_after(Keys::new(prefix).prefix(), EXCLUDED)
}

#[derive(Debug)]
pub(super) struct EtcdFeed {
    watch: PrefixWatch,
    /// The watch's client and range, for [`EtcdFeed::versions_read`].
    client: EtcdClient,
    range: KeyRange,
    wait: Duration,
    /// An update taken while merging a batch that could not join it (a snapshot, an
    /// error): delivered next.
    held: Option<Result<WatchUpdate, EtcdError>>,
}

impl EtcdFeed {
    pub(super) fn new(client: EtcdClient, prefix: &str, wait: Duration) -> Self {
        let range = followed_range(prefix);
        Self {
            watch: PrefixWatch::over(client.clone(), range.clone()),
            client,
            range,
            wait,
            held: None,
        }
    }

    /// Starts over with a read of the whole range: the watch resumes from a revision
    /// the store may no longer have reached (a store restarted without its data
    /// answers a watch from the future with silence, not an error).
    pub(super) fn reread(&mut self, reason: &str) {
        tracing::info!(%reason, "re-reading the cluster state");
        self.watch.restart();
        self.held = None;
    }

    /// A read of the followed keys' versions as of the revision delivered last
    /// (`None`: nothing delivered yet, or an update received and not delivered: the
    /// follower is not at the watch's revision).
    pub(super) fn versions_read(&self) -> Option<VersionsRead> {
        let delivered = self.watch.revision();
        if delivered == 0 || self.held.is_some() {
            return None;
        }
        Some(VersionsRead {
            client: self.client.clone(),
            range: self.range.clone(),
            revision: delivered,
        })
    }

    /// The next update of the watch; after `wait` without one, an empty `Changes` at the
    /// revision already delivered (the watch stays open and misses nothing meanwhile).
    pub(super) async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        if let Some(held) = self.held.take() {
            return Ok(convert_update(held?));
        }
        let delivered = self.watch.revision();
        let update = if delivered == 0 {
            self.watch.next().await?
        } else {
            match tokio::time::timeout(self.wait, self.watch.next()).await {
                Ok(update) => update?,
                Err(_quiet) => {
                    return Ok(FeedEvent::Changes {
                        changes: Vec::new(),
                        index: revision_index(delivered),
                    })
                }
            }
        };
        Ok(convert_update(self.merge_ready(update)))
    }

    /// Appends to a batch of changes every update the watch already received, so an
    /// agent that fell behind catches up in one step instead of one per revision.
    fn merge_ready(&mut self, update: WatchUpdate) -> WatchUpdate {
        let WatchUpdate::Changes {
            mut events,
            mut revision,
        } = update
        else {
            return update;
        };
        while events.len() < MAX_BATCH_EVENTS {
            // Only a message already in the stream is ready at once; polling the watch
            // once and dropping it otherwise loses nothing (the stream keeps it).
            match self.watch.next().now_or_never() {
                None => break,
                Some(Ok(WatchUpdate::Changes {
                    events: more,
                    revision: at,
                })) => {
                    events.extend(more);
                    revision = at;
                }
                Some(other) => {
                    self.held = Some(other);
                    break;
                }
            }
        }
        WatchUpdate::Changes { events, revision }
    }
}

/// See [`super::StoreFeed::versions_read`].
#[derive(Clone, Debug)]
pub struct VersionsRead {
    client: EtcdClient,
    range: KeyRange,
    revision: i64,
}

impl VersionsRead {
    /// The index the versions are read as of.
    pub fn index(&self) -> u64 {
        revision_index(self.revision)
    }

    /// Reads them: etcd keeps its history, so they are those of that revision whatever
    /// was written since (a compacted revision is an error).
    pub async fn read(self) -> Result<Versions, StoreError> {
        let keys = self.client.versions_at(&self.range, self.revision).await?;
        Ok(Versions {
            index: revision_index(self.revision),
            keys: (keys.into_iter())
                .map(|(key, revision)| (key, revision_index(revision)))
                .collect(),
        })
    }
}

fn revision_index(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

fn convert_update(update: WatchUpdate) -> FeedEvent {
    match update {
        WatchUpdate::Snapshot { listing, .. } => FeedEvent::Snapshot {
            pairs: listing.entries.into_iter().map(KvPair::from).collect(),
            index: revision_index(listing.revision),
        },
        WatchUpdate::Changes { events, revision } => FeedEvent::Changes {
            changes: events
                .into_iter()
                .map(|event| match event {
                    WatchEvent::Put(entry) => KvChange::Put(KvPair::from(entry)),
                    WatchEvent::Delete { key, .. } => KvChange::Delete { key },
                })
                .collect(),
            index: revision_index(revision),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::{KvEntry, LeaseId};

    #[test]
    fn the_followed_range_leaves_out_acknowledgements_only() {
        let range = followed_range("overlay");
        let keys = Keys::new("overlay");
        assert!(!range.contains(keys.applied("n1").as_bytes()));
        for followed in [
            keys.cluster_id(),
            keys.vxlan_port(),
            keys.endpoint("net1", "web"),
            keys.allocation("net1", "10.0.0.2".parse().unwrap()),
            keys.network("net1"),
            keys.node("n1"),
            keys.vni(2),
        ] {
            assert!(range.contains(followed.as_bytes()), "{followed}");
        }
    }

    #[test]
    fn watch_events_become_changes_with_revisions_and_leases() {
        let entry = KvEntry {
            key: "o/nodes/n1".to_string(),
            value: b"{}".to_vec(),
            create_revision: 4,
            mod_revision: 9,
            version: 2,
            lease: Some(LeaseId(0x1f)),
        };
        let event = convert_update(WatchUpdate::Changes {
            events: vec![
                WatchEvent::Put(entry),
                WatchEvent::Delete {
                    key: "o/endpoints/a/b".to_string(),
                    revision: 10,
                },
            ],
            revision: 10,
        });
        let FeedEvent::Changes { changes, index } = event else {
            panic!("expected changes, got {event:?}");
        };
        assert_eq!(index, 10);
        let KvChange::Put(pair) = &changes[0] else {
            panic!("expected a put, got {:?}", changes[0]);
        };
        assert_eq!((pair.create_index, pair.modify_index), (4, 9));
        assert_eq!(pair.session.as_deref(), Some("1f"));
        assert_eq!(changes[1].key(), "o/endpoints/a/b");
    }
}
