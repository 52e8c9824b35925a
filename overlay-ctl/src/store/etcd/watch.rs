//! Watching a prefix: etcd's watch replaces Consul's blocking queries. A watch starts
//! at a revision and delivers every change after it, in order; after a reconnect it
//! resumes from the last revision seen, so nothing is lost or seen twice. When that
//! revision was compacted away, the history is gone: the watch re-reads the whole
//! prefix and says so ([`WatchUpdate::Snapshot`] with [`ResyncReason::Compacted`]).
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use tracing::{debug, warn};

use super::{wire, EtcdClient, EtcdError, KeyRange, KvEntry, Listing};

/// Why a watch delivered the whole state instead of changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// The first read.
    Initial,
    /// The revision to resume from was compacted; changes in between are unknown.
    Compacted { requested: i64, compacted: i64 },
}

/// One change under the watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KvEntry),
    Delete { key: String, revision: i64 },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(e) => &e.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put(e) => e.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// What [`PrefixWatch::next`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    /// Everything under the prefix as of `listing.revision`: replace what you had.
    Snapshot {
        listing: Listing,
        reason: ResyncReason,
    },
    /// Changes since the previous update, in revision order.
    Changes {
        events: Vec<WatchEvent>,
        revision: i64,
    },
}

/// A resumable watch on a key prefix (or any [`KeyRange`]).
pub struct PrefixWatch {
    client: EtcdClient,
    range: KeyRange,
    /// The last revision delivered (0 before the first snapshot).
    revision: i64,
    /// The open stream and the member it is on.
    stream: Option<(usize, WatchStream)>,
    /// Streams opened after the first one: how often the watch had to reconnect.
    reconnects: u64,
    consecutive_errors: u32,
}

impl std::fmt::Debug for PrefixWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixWatch")
            .field("range", &format_args!("{}", self.range))
            .field("revision", &self.revision)
            .field("reconnects", &self.reconnects)
            .finish()
    }
}

impl PrefixWatch {
    /// A watch whose first update is a snapshot of the prefix.
    pub fn new(client: EtcdClient, prefix: impl Into<String>) -> Self {
        Self::resume(client, prefix, 0)
    }

    /// A watch delivering changes after `revision` (0: start with a snapshot), e.g. to
    /// continue from a revision a previous process recorded.
    pub fn resume(client: EtcdClient, prefix: impl Into<String>, revision: i64) -> Self {
        Self::resume_range(client, KeyRange::prefix(&prefix.into()), revision)
    }

    /// A watch on the keys of `range` whose first update is a snapshot of them.
    pub fn over(client: EtcdClient, range: KeyRange) -> Self {
        Self::resume_range(client, range, 0)
    }

    /// A watch on `range` delivering changes after `revision` (0: a snapshot first).
    pub fn resume_range(client: EtcdClient, range: KeyRange, revision: i64) -> Self {
        Self {
            client,
            range,
            revision: revision.max(0),
            stream: None,
            reconnects: 0,
            consecutive_errors: 0,
        }
    }

    /// The last revision delivered.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Starts over: the next update is a snapshot from a fresh read of the range, and
    /// the watch follows from its revision (the revision held so far is dropped).
    pub fn restart(&mut self) {
        let reconnects = self.reconnects;
        *self = Self::resume_range(self.client.clone(), self.range.clone(), 0);
        self.reconnects = reconnects;
    }

    /// How many times the watch stream was reopened after breaking.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The next update. Errors (a member died, no quorum) leave the watch resumable:
    /// call `next` again and it reconnects from the last revision delivered, pausing
    /// with backoff after consecutive errors so a dead cluster costs no busy loop.
    pub async fn next(&mut self) -> Result<WatchUpdate, EtcdError> {
        if self.consecutive_errors > 0 {
            tokio::time::sleep(super::backoff(self.consecutive_errors)).await;
        }
        let result = self.next_inner().await;
        match &result {
            Ok(_) => self.consecutive_errors = 0,
            Err(e) => {
                self.consecutive_errors = self.consecutive_errors.saturating_add(1);
                if let Some((member, _)) = self.stream.take() {
                    self.reconnects += 1;
                    // The next stream goes to another member.
                    self.client.failed_over(member, 1, "watch", e).await;
                }
            }
        }
        result
    }

    async fn next_inner(&mut self) -> Result<WatchUpdate, EtcdError> {
        if self.revision == 0 {
            return self.snapshot(ResyncReason::Initial).await;
        }
        loop {
            if self.stream.is_none() {
                self.stream = Some(self.open().await?);
            }
            let (_, stream) = self.stream.as_mut().expect("opened above");
            let endpoints = self.client.endpoints();
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Err(EtcdError::Unavailable {
                        endpoints: endpoints.to_string(),
                        op: "watch",
                        reason: "the watch stream ended".to_string(),
                    })
                }
                Err(e) => return Err(EtcdError::from_client(endpoints, "watch", e)),
            };
            self.client.count_read(wire::watch_response_len(&resp));
            if resp.compact_revision() > 0 {
                let requested = self.revision + 1;
                let compacted = resp.compact_revision();
                warn!(range = %self.range, requested, compacted, "etcd compacted the watch's revision; re-reading the range");
                self.stream = None;
                return self
                    .snapshot(ResyncReason::Compacted {
                        requested,
                        compacted,
                    })
                    .await;
            }
            if resp.canceled() {
                self.stream = None;
                return Err(EtcdError::Unavailable {
                    endpoints: endpoints.to_string(),
                    op: "watch",
                    reason: format!("etcd cancelled the watch: {}", resp.cancel_reason()),
                });
            }
            let events: Vec<WatchEvent> = resp.events().iter().filter_map(convert_event).collect();
            if let Some(last) = events.last() {
                self.revision = last.revision();
                return Ok(WatchUpdate::Changes {
                    events,
                    revision: self.revision,
                });
            }
            // A creation or progress notice: nothing to deliver yet.
        }
    }

    async fn open(&mut self) -> Result<(usize, WatchStream), EtcdError> {
        let options = WatchOptions::new()
            .with_start_revision(self.revision + 1)
            .with_progress_notify()
            .with_range(self.range.end().to_vec());
        let (member, mut client) = self.client.member();
        match client
            .watch(self.range.start().to_vec(), Some(options))
            .await
        {
            Ok(stream) => {
                debug!(range = %self.range, from = self.revision + 1, member, "etcd watch opened");
                Ok((member, stream))
            }
            Err(e) => {
                let err = EtcdError::from_client(self.client.endpoints(), "watch", e);
                self.client.failed_over(member, 1, "watch", &err).await;
                Err(err)
            }
        }
    }

    async fn snapshot(&mut self, reason: ResyncReason) -> Result<WatchUpdate, EtcdError> {
        let listing = self.client.list_range(&self.range).await?;
        self.revision = listing.revision;
        Ok(WatchUpdate::Snapshot { listing, reason })
    }
}

fn convert_event(event: &etcd_client::Event) -> Option<WatchEvent> {
    let kv = event.kv()?;
    Some(match event.event_type() {
        EventType::Put => WatchEvent::Put(KvEntry::from_kv(kv)),
        EventType::Delete => WatchEvent::Delete {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            revision: kv.mod_revision(),
        },
    })
}

impl EtcdClient {
    /// Consul's blocking list, on etcd: with `revision` 0 a plain [`EtcdClient::list`];
    /// otherwise waits until something under `prefix` changed after `revision` or
    /// `wait` expired, then lists. A compacted `revision` just lists (the answer is a
    /// full read either way).
    pub async fn list_blocking(
        &self,
        prefix: &str,
        revision: i64,
        wait: Duration,
    ) -> Result<Listing, EtcdError> {
        if revision > 0 {
            let mut watch = PrefixWatch::resume(self.clone(), prefix, revision);
            match tokio::time::timeout(wait, watch.next()).await {
                Err(_elapsed) => {}
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
        self.list(prefix).await
    }
}
