//! The change journal of the big kinds of keys (endpoints and address allocations) on
//! Consul: what lets an agent follow them without re-reading them ([`super::feed`]).
//!
//! Consul has no "what changed since index N" read, and a blocking query on a prefix
//! answers with everything under it. So every write the store makes under a journaled
//! section goes through one `/v1/txn` that also writes a journal entry (the key, the
//! operation and the new value) into a ring of [`SLOTS`] slots and advances the head
//! counter with a check-and-set: record, entry and head share one Consul index, and
//! concurrent writers are serialised by the head's CAS. The writes of one process that
//! wait for their turn go together in the next transaction (a group commit: one head
//! check, one index and one wake-up of every follower for up to [`MAX_BATCH`] writes),
//! each with its own entry, in the order they came. A follower blocks on the small
//! head key and reads only the slots it missed; it re-reads everything (a snapshot) when
//! it fell more than the ring behind, when a slot does not hold the entry it expects, or
//! when the head went backwards.
//!
//! Writes that bypass the journal (an operator's `consul kv put`, another tool) are seen
//! by the follower as an index of the section that moved past every journal entry, and
//! also answered with a snapshot. (A foreign write immediately followed by a journaled
//! one, both between two of the follower's reads, hides behind the latter's index: the
//! agent's periodic full resync is what catches that one.)
//!
//! On etcd there is no journal: its watch is the change log.
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::{
    backend::KvPair,
    consul::{ConsulClient, ConsulError, TxnOp, TxnOutcome},
    keys::Keys,
};

/// The ring's size: how many changes a follower may fall behind before it must re-read
/// the journaled sections.
pub const SLOTS: u64 = 1024;

/// The sections (under the prefix) whose writes are journaled.
pub const JOURNALED: [&str; 2] = ["endpoints/", "ipam/"];

/// How long a write keeps retrying after losing the race for the head to writers in
/// other processes, and the pause after each loss (doubling up to the cap, with jitter,
/// so racing writers spread out instead of colliding again).
const HEAD_RACE_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);
const HEAD_RACE_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);
const HEAD_RACE_PAUSE_CAP: std::time::Duration = std::time::Duration::from_millis(100);

/// The most writes one transaction carries: each takes two operations (its journal
/// entry and itself) beside the head's check, and Consul takes 128 in a transaction.
pub const MAX_BATCH: usize = 63;
/// The most bytes of values one transaction carries (each value travels twice: in the
/// record and, base64, in its entry), well under Consul's 512 KiB request limit. A
/// larger write goes alone.
const MAX_BATCH_VALUE_BYTES: usize = 96 * 1024;

/// What a journal entry says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalOp {
    Put,
    Delete,
    /// Every key under `key` was deleted: a follower re-reads.
    DeleteTree,
}

/// One journal slot's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The entry's number: the head counter it was written with (1, 2, ...).
    pub seq: u64,
    pub op: JournalOp,
    pub key: String,
    /// The new value (puts), base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
}

impl JournalEntry {
    pub fn value_bytes(&self) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.value)
            .ok()
    }
}

/// The slot entry number `seq` lives in.
pub fn slot_of(seq: u64) -> u64 {
    seq % SLOTS
}

/// The entries a follower at `have` must read to reach `head`: `Ok(None)` when it is
/// current, `Err` when it cannot catch up from the ring (it fell more than [`SLOTS`]
/// behind, or the head went backwards) and must re-read instead.
pub fn missed(have: u64, head: u64) -> Result<Option<std::ops::RangeInclusive<u64>>, Behind> {
    if head < have {
        return Err(Behind::HeadWentBack { have, head });
    }
    if head == have {
        return Ok(None);
    }
    if head - have > SLOTS {
        return Err(Behind::TooFar { have, head });
    }
    Ok(Some(have + 1..=head))
}

/// Why a follower cannot catch up from the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Behind {
    #[error("the journal head went back from {have} to {head}")]
    HeadWentBack { have: u64, head: u64 },
    #[error("{} changes missed (at {have}, head {head}): more than the ring holds", .head - .have)]
    TooFar { have: u64, head: u64 },
}

/// The head counter a head key's value holds (garbage counts as 0: a reset).
pub fn parse_head(pair: Option<&KvPair>) -> u64 {
    pair.and_then(|p| std::str::from_utf8(&p.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// A write the store makes under a journaled section.
#[derive(Clone, Debug)]
pub enum JournaledWrite<'a> {
    Put {
        key: &'a str,
        value: &'a [u8],
    },
    PutCas {
        key: &'a str,
        value: &'a [u8],
        index: u64,
    },
    Delete {
        key: &'a str,
    },
    DeleteCas {
        key: &'a str,
        index: u64,
    },
    DeleteTree {
        prefix: &'a str,
    },
}

impl JournaledWrite<'_> {
    fn record_op(&self) -> TxnOp {
        match *self {
            Self::Put { key, value } => TxnOp::Set {
                key: key.to_string(),
                value: value.to_vec(),
            },
            Self::PutCas { key, value, index } => TxnOp::Cas {
                key: key.to_string(),
                value: value.to_vec(),
                index,
            },
            Self::Delete { key } => TxnOp::Delete {
                key: key.to_string(),
            },
            Self::DeleteCas { key, index } => TxnOp::DeleteCas {
                key: key.to_string(),
                index,
            },
            Self::DeleteTree { prefix } => TxnOp::DeleteTree {
                prefix: prefix.to_string(),
            },
        }
    }

    fn entry(&self, seq: u64) -> JournalEntry {
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let (op, key, value) = match *self {
            Self::Put { key, value } | Self::PutCas { key, value, .. } => {
                (JournalOp::Put, key, b64(value))
            }
            Self::Delete { key } | Self::DeleteCas { key, .. } => {
                (JournalOp::Delete, key, String::new())
            }
            Self::DeleteTree { prefix } => (JournalOp::DeleteTree, prefix, String::new()),
        };
        JournalEntry {
            seq,
            op,
            key: key.to_string(),
            value,
        }
    }
}

/// A write waiting for a transaction, and whom to tell how it went.
struct Queued {
    record: TxnOp,
    /// Its entry; the number is set when the transaction is made.
    entry: JournalEntry,
    done: tokio::sync::oneshot::Sender<Result<bool, ConsulError>>,
}

impl Queued {
    fn new(
        write: &JournaledWrite<'_>,
        done: tokio::sync::oneshot::Sender<Result<bool, ConsulError>>,
    ) -> Self {
        Self {
            record: write.record_op(),
            entry: write.entry(0),
            done,
        }
    }

    /// Bytes of value the write carries.
    fn value_len(&self) -> usize {
        match &self.record {
            TxnOp::Set { value, .. } | TxnOp::Cas { value, .. } => value.len(),
            _ => 0,
        }
    }
}

/// The journal of one prefix, as the writing side sees it.
pub struct Journal {
    keys: Keys,
    /// The head (counter, modify index) as this process's last write left it: a writer
    /// that is alone (a benchmark, a busy CLI) saves the read of the head per write; a
    /// stale guess only costs the retry its failed check causes.
    last_head: std::sync::Mutex<Option<(u64, u64)>>,
    /// Writes waiting for the next transaction, in the order they came.
    queue: std::sync::Mutex<std::collections::VecDeque<Queued>>,
    /// Writers of this process take turns: racing each other for the head would only
    /// turn most of their transactions into failed checks (32 concurrent writers of one
    /// benchmark lost their races until they gave up). Whoever has the turn writes what
    /// is queued, its own write or others'.
    turn: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("prefix", &self.keys.prefix())
            .field("last_head", &self.cached_head())
            .finish_non_exhaustive()
    }
}

impl Journal {
    pub fn new(prefix: &str) -> Self {
        Self {
            keys: Keys::new(prefix),
            last_head: std::sync::Mutex::new(None),
            queue: std::sync::Mutex::new(Default::default()),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    fn cached_head(&self) -> Option<(u64, u64)> {
        self.last_head.lock().map(|h| *h).unwrap_or(None)
    }

    /// The queue, also after a panic elsewhere held its lock (its entries stay valid;
    /// a write that could not be queued would wait for its turn forever).
    fn queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember_head(&self, head: Option<(u64, u64)>) {
        if let Ok(mut last) = self.last_head.lock() {
            *last = head;
        }
    }

    /// Whether a write to `key` (or a tree delete of `key` as a prefix) is journaled:
    /// it lies inside a journaled section.
    pub fn covers(&self, key: &str) -> bool {
        key.strip_prefix(self.keys.prefix())
            .is_some_and(|rest| JOURNALED.iter().any(|s| rest.starts_with(s)))
    }

    /// Makes `write` with its journal entry in one transaction (possibly with other
    /// writes of this process, each keeping its own check); false when the write's own
    /// check (a CAS) failed, so it was not written. A caller that stops waiting before
    /// the write went out takes it back: it is not written later.
    pub async fn write(
        &self,
        client: &ConsulClient,
        write: JournaledWrite<'_>,
    ) -> Result<bool, ConsulError> {
        let (done, mut outcome) = tokio::sync::oneshot::channel();
        self.queue().push_back(Queued::new(&write, done));
        loop {
            let _turn = self.turn.lock().await;
            match outcome.try_recv() {
                Ok(result) => return result,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    return Err(ConsulError::Transport {
                        addr: client.addr().to_string(),
                        message: "the writer carrying this journaled write stopped before \
                                  its answer: whether it was written is unknown"
                            .to_string(),
                    })
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            let batch = self.next_batch();
            self.commit(client, batch).await;
        }
    }

    /// The writes the next transaction carries: the oldest queued ones whose writers
    /// still wait, up to [`MAX_BATCH`] and [`MAX_BATCH_VALUE_BYTES`] (at least one).
    fn next_batch(&self) -> Vec<Queued> {
        let mut queue = self.queue();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = queue.front() {
            if next.done.is_closed() {
                queue.pop_front();
                continue;
            }
            let full = batch.len() == MAX_BATCH
                || (!batch.is_empty() && bytes + next.value_len() > MAX_BATCH_VALUE_BYTES);
            if full {
                break;
            }
            bytes += next.value_len();
            batch.extend(queue.pop_front());
        }
        batch
    }

    /// Writes `batch` in one transaction and tells every writer how its write went. A
    /// write whose own check fails is answered false and the others are tried again
    /// without it; a lost race for the head is tried again with the new head.
    async fn commit(&self, client: &ConsulClient, mut batch: Vec<Queued>) {
        let head_key = self.keys.journal_head();
        let started = std::time::Instant::now();
        let mut race = 0u32;
        while !batch.is_empty() {
            if race > 1 {
                tokio::time::sleep(race_pause(race)).await;
            }
            if started.elapsed() > HEAD_RACE_BUDGET {
                let rejected = || ConsulError::Rejected {
                    op: "journal",
                    key: head_key.clone(),
                };
                return answer_all(batch, || Err(rejected()));
            }
            let (first, head_index) = match self.cached_head() {
                Some((seq, index)) => (seq + 1, index),
                None => match client.get(&head_key).await {
                    Ok(head) => (
                        parse_head(head.as_ref()) + 1,
                        head.map_or(0, |h| h.modify_index),
                    ),
                    Err(e) => return answer_all(batch, || Err(e.clone())),
                },
            };
            let last = first + batch.len() as u64 - 1;
            let ops = self.batch_ops(&batch, first, head_index);
            match client.txn(&ops).await {
                Ok(TxnOutcome::Applied(written)) => {
                    let index = written.iter().find(|p| p.key == head_key);
                    self.remember_head(index.map(|h| (last, h.modify_index)));
                    return answer_all(batch, || Ok(true));
                }
                Ok(TxnOutcome::RolledBack(failures))
                    if failures.iter().any(|f| f.op_index == 0) =>
                {
                    self.remember_head(None);
                    if race > 0 {
                        debug!(first, "another writer took the journal head; retrying");
                    }
                    race += 1;
                }
                Ok(TxnOutcome::RolledBack(failures)) => {
                    let failed: std::collections::BTreeSet<usize> =
                        failures.iter().map(|f| write_of_op(f.op_index)).collect();
                    let (refused, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut batch)
                        .into_iter()
                        .enumerate()
                        .partition(|(i, _)| failed.contains(i));
                    answer_all(refused.into_iter().map(|(_, q)| q).collect(), || Ok(false));
                    batch = rest.into_iter().map(|(_, q)| q).collect();
                }
                Err(e) => {
                    self.remember_head(None);
                    return answer_all(batch, || Err(e.clone()));
                }
            }
        }
    }

    /// The transaction for `batch`: the head's check-and-set to its last entry's number,
    /// then each write's entry (numbered from `first`) and the write itself.
    fn batch_ops(&self, batch: &[Queued], first: u64, head_index: u64) -> Vec<TxnOp> {
        let last = first + batch.len() as u64 - 1;
        let mut ops = Vec::with_capacity(1 + 2 * batch.len());
        ops.push(TxnOp::Cas {
            key: self.keys.journal_head(),
            value: last.to_string().into_bytes(),
            index: head_index,
        });
        for (seq, queued) in (first..).zip(batch) {
            let entry = JournalEntry {
                seq,
                ..queued.entry.clone()
            };
            ops.push(TxnOp::Set {
                key: self.keys.journal_slot(slot_of(seq)),
                value: serde_json::to_vec(&entry).unwrap_or_default(),
            });
            ops.push(queued.record.clone());
        }
        ops
    }
}

/// Which write of a batch the transaction's operation `op_index` belongs to (see
/// [`Journal::batch_ops`]; 0, the head's check, belongs to none).
fn write_of_op(op_index: usize) -> usize {
    op_index.saturating_sub(1) / 2
}

/// Tells each writer of `batch` its write's outcome.
fn answer_all(batch: Vec<Queued>, outcome: impl Fn() -> Result<bool, ConsulError>) {
    for queued in batch {
        // A writer that stopped waiting has nobody to tell.
        let _ = queued.done.send(outcome());
    }
}

/// The pause after the `race`-th lost race: doubling from [`HEAD_RACE_PAUSE`] up to
/// [`HEAD_RACE_PAUSE_CAP`], with up to half of it as jitter (from the clock: no two
/// processes lose at the same nanosecond).
fn race_pause(race: u32) -> std::time::Duration {
    let base = HEAD_RACE_PAUSE
        .saturating_mul(1u32 << race.min(16))
        .min(HEAD_RACE_PAUSE_CAP);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_reads_only_what_it_missed() {
        assert_eq!(missed(5, 5), Ok(None));
        assert_eq!(missed(5, 8), Ok(Some(6..=8)));
        assert_eq!(missed(0, SLOTS), Ok(Some(1..=SLOTS)));
        assert_eq!(
            missed(0, SLOTS + 1),
            Err(Behind::TooFar {
                have: 0,
                head: SLOTS + 1
            })
        );
        assert_eq!(missed(9, 3), Err(Behind::HeadWentBack { have: 9, head: 3 }));
    }

    /// A queued put of `value_len` bytes to `key`, and the receiver of its outcome.
    fn queue_put(
        journal: &Journal,
        key: &str,
        value_len: usize,
    ) -> tokio::sync::oneshot::Receiver<Result<bool, ConsulError>> {
        let value = vec![b'x'; value_len];
        let write = JournaledWrite::Put { key, value: &value };
        let (done, outcome) = tokio::sync::oneshot::channel();
        journal.queue().push_back(Queued::new(&write, done));
        outcome
    }

    fn keys_of(batch: &[Queued]) -> Vec<&str> {
        batch.iter().map(|q| q.entry.key.as_str()).collect()
    }

    #[test]
    fn a_batch_takes_the_oldest_waiting_writes_up_to_its_limits() {
        let journal = Journal::new("o/");
        drop(queue_put(&journal, "o/endpoints/n/gone", 10));
        let _waiting: Vec<_> = (0..MAX_BATCH + 2)
            .map(|i| queue_put(&journal, &format!("o/endpoints/n/e{i}"), 10))
            .collect();
        let first = journal.next_batch();
        assert_eq!(
            first.len(),
            MAX_BATCH,
            "the writer that stopped waiting is left out"
        );
        assert_eq!(
            keys_of(&first)[..2],
            ["o/endpoints/n/e0", "o/endpoints/n/e1"]
        );
        let second = journal.next_batch();
        assert_eq!(
            keys_of(&second),
            [
                format!("o/endpoints/n/e{MAX_BATCH}"),
                format!("o/endpoints/n/e{}", MAX_BATCH + 1)
            ]
        );
        assert!(journal.next_batch().is_empty());

        let big = MAX_BATCH_VALUE_BYTES / 2 + 1;
        let _waiting = [
            queue_put(&journal, "o/ipam/n/a", big),
            queue_put(&journal, "o/ipam/n/b", big),
            queue_put(&journal, "o/ipam/n/huge", 2 * MAX_BATCH_VALUE_BYTES),
        ];
        assert_eq!(keys_of(&journal.next_batch()), ["o/ipam/n/a"]);
        assert_eq!(keys_of(&journal.next_batch()), ["o/ipam/n/b"]);
        assert_eq!(
            keys_of(&journal.next_batch()),
            ["o/ipam/n/huge"],
            "alone, but written"
        );
    }

    #[test]
    fn a_batch_is_the_head_then_each_entry_before_its_write() {
        let journal = Journal::new("o/");
        let _waiting = [
            queue_put(&journal, "o/endpoints/n/a", 1),
            queue_put(&journal, "o/endpoints/n/b", 1),
        ];
        let batch = journal.next_batch();
        let ops = journal.batch_ops(&batch, 7, 99);
        assert_eq!(
            ops[0],
            TxnOp::Cas {
                key: "o/journal/head".into(),
                value: b"8".to_vec(),
                index: 99
            }
        );
        for (write, seq) in [(0, 7), (1, 8)] {
            let TxnOp::Set { key, value } = &ops[1 + 2 * write] else {
                panic!("not an entry: {:?}", ops[1 + 2 * write]);
            };
            assert_eq!(key, &format!("o/journal/{seq}"));
            let entry: JournalEntry = serde_json::from_slice(value).unwrap();
            assert_eq!(
                (entry.seq, entry.key.as_str()),
                (seq, batch[write].entry.key.as_str())
            );
            assert_eq!(ops[2 + 2 * write], batch[write].record);
            assert_eq!(write_of_op(1 + 2 * write), write);
            assert_eq!(write_of_op(2 + 2 * write), write);
        }
        assert_eq!(ops.len(), 5);
    }

    #[test]
    fn race_pauses_grow_to_a_cap() {
        assert!(race_pause(2) >= HEAD_RACE_PAUSE * 4);
        assert!(race_pause(30) >= HEAD_RACE_PAUSE_CAP);
        assert!(race_pause(30) <= HEAD_RACE_PAUSE_CAP.mul_f64(1.5));
    }

    #[test]
    fn the_ring_reuses_slots() {
        assert_eq!(slot_of(1), 1);
        assert_eq!(slot_of(SLOTS), 0);
        assert_eq!(slot_of(SLOTS + 1), slot_of(1));
    }

    #[test]
    fn only_the_big_sections_are_journaled() {
        let journal = Journal::new("overlay/");
        assert!(journal.covers("overlay/endpoints/net1/web"));
        assert!(journal.covers("overlay/ipam/net1/10.0.0.2"));
        assert!(journal.covers("overlay/endpoints/net1/"));
        assert!(!journal.covers("overlay/networks/net1"));
        assert!(!journal.covers("overlay/applied/n1"));
        assert!(!journal.covers("overlay/"));
        assert!(!journal.covers("other/endpoints/net1/web"));
    }

    #[test]
    fn entries_round_trip() {
        let write = JournaledWrite::Put {
            key: "o/endpoints/a/b",
            value: b"{\"id\":\"b\"}",
        };
        let entry = write.entry(7);
        let json = serde_json::to_string(&entry).unwrap();
        let back: JournalEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back, entry);
        assert_eq!(back.value_bytes().unwrap(), b"{\"id\":\"b\"}");
        let delete = JournaledWrite::Delete { key: "o/ipam/a/1" }.entry(8);
        assert!(!serde_json::to_string(&delete).unwrap().contains("value"));
    }

    #[test]
    fn heads_parse_or_reset() {
        let pair = |v: &[u8]| KvPair {
            key: "o/journal/head".into(),
            value: v.to_vec(),
            create_index: 1,
            modify_index: 1,
            lock_index: 0,
            flags: 0,
            session: None,
        };
        assert_eq!(parse_head(Some(&pair(b"42"))), 42);
        assert_eq!(parse_head(Some(&pair(b"x"))), 0);
        assert_eq!(parse_head(None), 0);
    }
}
