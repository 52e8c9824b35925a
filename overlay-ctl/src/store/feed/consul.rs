//! The feed on Consul: blocking queries per part of the state instead of one on the
//! whole prefix, so neither `applied/` acknowledgements nor the cost of the big sections
//! reach a follower on every change.
//!
//! - The small sections (`config/`, `networks/`, `nodes/`, `vni/`: hundreds of keys at
//!   most) are each followed with a recursive blocking query; the feed keeps their last
//!   listing and delivers only the entries that differ (a session deleting `nodes/<n>`
//!   arrives as a `Delete`).
//! - The big sections (`endpoints/`, `ipam/`) are followed through the change journal
//!   ([`crate::store::journal`]): a blocking query on the journal head, then one
//!   transaction reading only the slots missed. A blocking `?keys&separator=/` on each
//!   big section (whose index covers every key below, while its answer is only the folder
//!   names) reveals writes that bypassed the journal: an index the journal does not
//!   explain means a re-read.
//!
//! Whenever the feed cannot prove it saw every change (the journal lapped, a head or
//! index that went backwards, an unexplained write, a tree delete, an error while
//! catching up) it re-reads the followed sections and delivers a snapshot.
use std::{collections::BTreeMap, time::Duration};

use tracing::{info, warn};

use super::{
    lanes::{LaneAnswer, LaneKind, Lanes, Report, SectionSize},
    FeedEvent, KvChange,
};
use crate::store::{
    backend::KvPair,
    consul::{ConsulClient, TxnOp, TxnOutcome},
    journal::{self, Journal, JournalEntry, JournalOp},
    keys::Keys,
    StoreError,
};

/// The small sections, each followed by a recursive blocking query.
const SMALL: [&str; 4] = ["config/", "networks/", "nodes/", "vni/"];

/// Consul's limit on the operations of one transaction: slots read per request.
const SLOTS_PER_READ: usize = 128;

/// A small section as last read.
#[derive(Debug, Default)]
struct Section {
    index: u64,
    pairs: BTreeMap<String, KvPair>,
}

/// Why the feed must re-read.
type Resync = String;

#[derive(Debug)]
pub(super) struct ConsulFeed {
    client: ConsulClient,
    keys: Keys,
    journal: Journal,
    wait: Duration,
    lanes: Option<Lanes>,
    /// What each lane watches, by lane number.
    lane_kinds: Vec<LaneKind>,
    small: BTreeMap<String, Section>,
    /// The journal entry the follower is at.
    seq: u64,
    /// Every journaled write up to this index was delivered (or read by a snapshot).
    explained: u64,
    /// The index each big section was last read at by a snapshot.
    read_at: BTreeMap<String, u64>,
    /// Whether each big section had keys at its last folder answer (an empty section's
    /// index is Consul's table index, which moves with every write anywhere).
    populated: BTreeMap<String, bool>,
    delivered: u64,
    /// Set when the next event must be a snapshot, and why.
    resync: Option<Resync>,
    /// Whether the small sections were re-read for the batch of answers at hand.
    small_reread: bool,
    /// How many keys each big section holds (counted at each snapshot, then moved by
    /// the journal's puts and deletes): its folders lane paces itself by it.
    sizes: BTreeMap<String, SectionSize>,
}

impl ConsulFeed {
    pub(super) fn new(client: ConsulClient, prefix: &str, wait: Duration) -> Self {
        let keys = Keys::new(prefix);
        let keys_prefix = keys.prefix().to_string();
        let mut lane_kinds: Vec<LaneKind> = SMALL
            .iter()
            .map(|s| LaneKind::Section(format!("{}{s}", keys.prefix())))
            .collect();
        lane_kinds.push(LaneKind::Key(keys.journal_head()));
        lane_kinds.extend(
            journal::JOURNALED
                .iter()
                .map(|s| LaneKind::Folders(format!("{}{s}", keys.prefix()))),
        );
        Self {
            client,
            journal: Journal::new(keys.prefix()),
            keys,
            wait,
            lanes: None,
            lane_kinds,
            small: BTreeMap::new(),
            seq: 0,
            explained: 0,
            read_at: BTreeMap::new(),
            populated: BTreeMap::new(),
            delivered: 0,
            resync: Some("the first read".to_string()),
            small_reread: false,
            sizes: journal::JOURNALED
                .iter()
                .map(|s| (format!("{}{s}", keys_prefix), SectionSize::default()))
                .collect(),
        }
    }

    /// Starts over with a read of the followed sections and new lanes: the lanes block
    /// from indexes the store may no longer have reached (a store restarted without its
    /// data answers them only when its wait expires).
    pub(super) fn reread(&mut self, reason: &str) {
        self.lanes = None;
        self.resync = Some(reason.to_string());
        info!(%reason, "re-reading the cluster state");
    }

    pub(super) async fn next(&mut self) -> Result<FeedEvent, StoreError> {
        if let Some(reason) = self.resync.take() {
            return self.snapshot(reason).await;
        }
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let lanes = self.lanes.as_mut().expect("started by the first snapshot");
            let first = match tokio::time::timeout_at(deadline, lanes.recv()).await {
                Err(_quiet) => return Ok(self.changes(Vec::new())),
                Ok(None) => return self.snapshot("the watches stopped".to_string()).await,
                Ok(Some(report)) => report,
            };
            let mut batch = vec![first];
            while let Some(report) = lanes.try_recv() {
                batch.push(report);
            }
            let mut changes = Vec::new();
            let mut failed = None;
            self.small_reread = false;
            for report in batch {
                let outcome = match report {
                    Ok(report) => self.apply(report, &mut changes).await,
                    Err(e) => Ok(Err(e)),
                };
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failed = failed.or(Some(e)),
                    Err(reason) => self.resync = self.resync.take().or(Some(reason)),
                }
            }
            if let Some(reason) = self.resync.take() {
                return self.snapshot(reason).await;
            }
            if !changes.is_empty() {
                return Ok(self.changes(changes));
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }

    fn changes(&self, changes: Vec<KvChange>) -> FeedEvent {
        FeedEvent::Changes {
            changes,
            index: self.delivered,
        }
    }

    /// Applies one lane's report: changes appended, a store error (`Ok(Err)`), or the
    /// reason to re-read (`Err`).
    async fn apply(
        &mut self,
        report: Report,
        changes: &mut Vec<KvChange>,
    ) -> Result<Result<(), StoreError>, Resync> {
        let kind = self.lane_kinds[report.lane].clone();
        if report.went_back {
            return Err(format!("the store's index for {kind:?} went backwards"));
        }
        match (kind, report.answer) {
            (LaneKind::Section(_), LaneAnswer::Section) => Ok(self.reread_small(changes).await),
            (LaneKind::Key(_), _) => self.catch_up(changes).await,
            (LaneKind::Folders(prefix), LaneAnswer::Folders(names)) => {
                self.check_section(&prefix, !names.is_empty(), report.index, changes)
                    .await
            }
            (kind, answer) => {
                warn!(?kind, ?answer, "a feed lane answered out of kind");
                Ok(Ok(()))
            }
        }
    }

    /// One small section changed: re-reads all of them, in the order their records
    /// depend on each other (a network's VNI claim is written before the network, so
    /// `vni/` is read after `networks/`), and delivers what differs. Delivering each
    /// section as its own lane answered could hand the agent a network before the VNI
    /// claim that makes it valid. Once per batch: the other lanes' answers are covered.
    async fn reread_small(&mut self, changes: &mut Vec<KvChange>) -> Result<(), StoreError> {
        if self.small_reread {
            return Ok(());
        }
        for section in SMALL {
            let prefix = format!("{}{section}", self.keys.prefix());
            let (pairs, index) = self.client.list_blocking(&prefix, 0, self.wait).await?;
            self.diff_section(&prefix, pairs, index, changes);
        }
        self.small_reread = true;
        Ok(())
    }

    /// A small section's new listing: the entries that differ from the last one.
    fn diff_section(
        &mut self,
        prefix: &str,
        pairs: Vec<KvPair>,
        index: u64,
        changes: &mut Vec<KvChange>,
    ) {
        let section = self.small.entry(prefix.to_string()).or_default();
        if index <= section.index {
            // Already read by a later snapshot.
            return;
        }
        let fresh: BTreeMap<String, KvPair> =
            pairs.into_iter().map(|p| (p.key.clone(), p)).collect();
        for key in section.pairs.keys().filter(|k| !fresh.contains_key(*k)) {
            changes.push(KvChange::Delete { key: key.clone() });
        }
        for (key, pair) in &fresh {
            if section.pairs.get(key) != Some(pair) {
                changes.push(KvChange::Put(pair.clone()));
            }
        }
        section.pairs = fresh;
        section.index = index;
        self.delivered = self.delivered.max(index);
    }

    /// A big section's index moved to `index`: the journal must explain it.
    async fn check_section(
        &mut self,
        prefix: &str,
        populated: bool,
        index: u64,
        changes: &mut Vec<KvChange>,
    ) -> Result<Result<(), StoreError>, Resync> {
        let was_populated = self.populated.insert(prefix.to_string(), populated);
        if !populated && was_populated != Some(true) {
            // Still empty: its index is the table index, moved by writes elsewhere.
            return Ok(Ok(()));
        }
        let read_at = self.read_at.get(prefix).copied().unwrap_or(0);
        let explained = |feed: &Self| feed.explained.max(read_at);
        if index <= explained(self) {
            return Ok(Ok(()));
        }
        if let Err(e) = self.catch_up(changes).await? {
            return Ok(Err(e));
        }
        if index > explained(self) {
            return Err(format!(
                "{prefix} changed at index {index} without a journal entry (explained up to {})",
                explained(self)
            ));
        }
        Ok(Ok(()))
    }

    /// Reads the journal entries missed since the last read.
    async fn catch_up(
        &mut self,
        changes: &mut Vec<KvChange>,
    ) -> Result<Result<(), StoreError>, Resync> {
        match self.read_journal().await {
            Ok(Ok(entries)) => {
                changes.extend(entries);
                Ok(Ok(()))
            }
            Ok(Err(reason)) => Err(reason),
            Err(e) => {
                // The entries are unread: the next event re-reads rather than lose them.
                self.resync = Some(format!("the journal could not be read: {e}"));
                Ok(Err(e))
            }
        }
    }

    async fn read_journal(&mut self) -> Result<Result<Vec<KvChange>, Resync>, StoreError> {
        let head = self.client.get(&self.keys.journal_head()).await?;
        let seq = journal::parse_head(head.as_ref());
        let missed = match journal::missed(self.seq, seq) {
            Ok(Some(missed)) => missed,
            Ok(None) => return Ok(Ok(Vec::new())),
            Err(behind) => return Ok(Err(behind.to_string())),
        };
        let wanted: Vec<u64> = missed.collect();
        let mut changes = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(SLOTS_PER_READ) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|seq| TxnOp::Get {
                    key: self.keys.journal_slot(journal::slot_of(*seq)),
                })
                .collect();
            let slots = match self.client.txn(&ops).await? {
                TxnOutcome::Applied(slots) => slots,
                TxnOutcome::RolledBack(_) => {
                    return Ok(Err("a journal slot is missing".to_string()))
                }
            };
            for (expected, slot) in chunk.iter().zip(&slots) {
                match self.entry_change(*expected, slot) {
                    Ok(change) => changes.push(change),
                    Err(reason) => return Ok(Err(reason)),
                }
            }
        }
        self.seq = seq;
        let head_index = head.map_or(0, |h| h.modify_index);
        self.explained = self.explained.max(head_index);
        self.delivered = self.delivered.max(head_index);
        Ok(Ok(changes))
    }

    /// The change journal slot `slot` announces as entry number `expected`.
    fn entry_change(&mut self, expected: u64, slot: &KvPair) -> Result<KvChange, Resync> {
        let entry: JournalEntry = serde_json::from_slice(&slot.value)
            .map_err(|e| format!("journal slot {} does not decode: {e}", slot.key))?;
        if entry.seq != expected {
            return Err(format!(
                "journal slot {} holds entry {} instead of {expected}: the ring lapped the feed",
                slot.key, entry.seq
            ));
        }
        if !self.journal.covers(&entry.key) {
            return Err(format!(
                "journal entry {expected} names {:?}, outside the journaled sections",
                entry.key
            ));
        }
        self.explained = self.explained.max(slot.modify_index);
        self.count(&entry.key, entry.op);
        match entry.op {
            JournalOp::Delete => Ok(KvChange::Delete { key: entry.key }),
            JournalOp::DeleteTree => Err(format!("{} was deleted as a tree", entry.key)),
            JournalOp::Put => {
                let value = entry
                    .value_bytes()
                    .ok_or_else(|| format!("journal entry {expected} has no valid value"))?;
                Ok(KvChange::Put(KvPair {
                    key: entry.key,
                    value,
                    // The record was written in the entry's transaction.
                    create_index: slot.modify_index,
                    modify_index: slot.modify_index,
                    lock_index: 0,
                    flags: 0,
                    session: None,
                }))
            }
        }
    }

    /// Moves the size of the big section `key` lies in by a journaled write (a put of an
    /// existing key counts as a new one: endpoints and addresses are created and deleted,
    /// rarely rewritten, and the next snapshot counts again).
    fn count(&self, key: &str, op: JournalOp) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some((_, size)) = self.sizes.iter().find(|(s, _)| key.starts_with(s.as_str())) else {
            return;
        };
        match op {
            JournalOp::Put => {
                size.fetch_add(1, Relaxed);
            }
            JournalOp::Delete => {
                let _ = size.fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
            }
            JournalOp::DeleteTree => {}
        }
    }

    /// Re-reads the followed sections (and starts the lanes after the first read).
    async fn snapshot(&mut self, reason: Resync) -> Result<FeedEvent, StoreError> {
        if self.lanes.is_some() {
            info!(%reason, "re-reading the cluster state");
        }
        match self.read_all().await {
            Ok(event) => Ok(event),
            Err(e) => {
                self.resync = Some(reason);
                Err(e)
            }
        }
    }

    /// The index each lane's first blocking query starts from: its part's own.
    async fn lane_starts(&self) -> Result<Vec<u64>, StoreError> {
        let mut starts = Vec::with_capacity(self.lane_kinds.len());
        for kind in &self.lane_kinds {
            let index = match kind {
                LaneKind::Section(p) => self.client.list_blocking(p, 0, self.wait).await?.1,
                LaneKind::Key(k) => self.client.get_blocking(k, 0, self.wait).await?.1,
                LaneKind::Folders(p) => self.client.keys_blocking(p, "/", 0, self.wait).await?.1,
            };
            starts.push(index);
        }
        Ok(starts)
    }

    async fn read_all(&mut self) -> Result<FeedEvent, StoreError> {
        // One recursive read of the whole prefix: every section as of one index, so the
        // agent never judges records of different moments together (e.g. an endpoint
        // without the allocation written before it). The journal and `applied/` come
        // with it and are left out of what is delivered.
        let prefix = self.keys.prefix().to_string();
        // The lanes start from each part's own index, read before the state (a change
        // in between is then both in the state and reported again, which is harmless);
        // starting them from the whole prefix's index would look like an index that
        // went backwards to them.
        let starts = match self.lanes {
            None => Some(self.lane_starts().await?),
            Some(_) => None,
        };
        let (listing, index) = self.client.list_blocking(&prefix, 0, self.wait).await?;
        let head_key = self.keys.journal_head();
        let head = listing.iter().find(|p| p.key == head_key).cloned();
        let mut pairs = Vec::new();
        let mut small: BTreeMap<String, Section> = SMALL
            .iter()
            .map(|s| {
                (
                    format!("{prefix}{s}"),
                    Section {
                        index,
                        pairs: BTreeMap::new(),
                    },
                )
            })
            .collect();
        let mut read_at = BTreeMap::new();
        let mut populated = BTreeMap::new();
        let mut counted: BTreeMap<&str, usize> = BTreeMap::new();
        for section in journal::JOURNALED {
            let section = format!("{prefix}{section}");
            read_at.insert(section.clone(), index);
            populated.insert(section, false);
        }
        for pair in listing {
            if let Some(section) = small.keys().find(|s| pair.key.starts_with(*s)).cloned() {
                let entry = small.get_mut(&section).expect("found above");
                entry.pairs.insert(pair.key.clone(), pair.clone());
            } else if let Some((section, flag)) = populated
                .iter_mut()
                .find(|(s, _)| pair.key.starts_with(s.as_str()))
            {
                *flag = true;
                if let Some((s, _)) = self.sizes.get_key_value(section.as_str()) {
                    *counted.entry(s.as_str()).or_default() += 1;
                }
            } else {
                continue;
            }
            pairs.push(pair);
        }
        self.seq = journal::parse_head(head.as_ref());
        self.explained = head.map_or(0, |h| h.modify_index);
        for (section, size) in &self.sizes {
            let keys = counted.get(section.as_str()).copied().unwrap_or(0);
            size.store(keys, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(starts) = starts {
            let lanes = (self.lane_kinds.iter().cloned().zip(starts))
                .map(|(kind, start)| {
                    let size = match &kind {
                        LaneKind::Folders(section) => self.sizes.get(section).cloned(),
                        LaneKind::Section(_) | LaneKind::Key(_) => None,
                    };
                    (kind, start, size)
                })
                .collect();
            self.lanes = Some(Lanes::start(&self.client, lanes, self.wait));
        }
        self.small = small;
        self.read_at = read_at;
        self.populated = populated;
        self.delivered = index;
        Ok(FeedEvent::Snapshot { pairs, index })
    }
}
