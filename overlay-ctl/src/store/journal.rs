//! The change journal of the big kinds of keys (endpoints and address allocations) on
//! Consul: what lets an agent follow them without re-reading them ([`super::feed`]).
//!
//! Consul has no "what changed since index N" read, and a blocking query on a prefix
//! answers with everything under it. So every write the store makes under a journaled
//! section goes through one `/v1/txn` that also writes a journal entry (the key, the
//! operation and the new value) into a ring of [`SLOTS`] slots and advances the head
//! counter with a check-and-set: record, entry and head share one Consul index, and
//! concurrent writers are serialised by the head's CAS. A follower blocks on the small
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

/// How often a write retries after losing the race for the head to another writer, and
/// the pause after each loss (times the losses so far, so racing writers spread out).
const MAX_HEAD_RACES: u32 = 64;
const HEAD_RACE_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

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

/// The journal of one prefix, as the writing side sees it.
#[derive(Debug)]
pub struct Journal {
    keys: Keys,
    /// The head (counter, modify index) as this process's last write left it: a writer
    /// that is alone (a benchmark, a busy CLI) saves the read of the head per write; a
    /// stale guess only costs the retry its failed check causes.
    last_head: std::sync::Mutex<Option<(u64, u64)>>,
}

impl Journal {
    pub fn new(prefix: &str) -> Self {
        Self {
            keys: Keys::new(prefix),
            last_head: std::sync::Mutex::new(None),
        }
    }

    fn cached_head(&self) -> Option<(u64, u64)> {
        self.last_head.lock().map(|h| *h).unwrap_or(None)
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

    /// Makes `write` with its journal entry in one transaction; false when the write's
    /// own check (a CAS) failed, so nothing was written.
    pub async fn write(
        &self,
        client: &ConsulClient,
        write: JournaledWrite<'_>,
    ) -> Result<bool, ConsulError> {
        let head_key = self.keys.journal_head();
        for race in 0..MAX_HEAD_RACES {
            if race > 1 {
                tokio::time::sleep(HEAD_RACE_PAUSE * race).await;
            }
            let (seq, head_index) = match self.cached_head() {
                Some((seq, index)) => (seq + 1, index),
                None => {
                    let head = client.get(&head_key).await?;
                    (
                        parse_head(head.as_ref()) + 1,
                        head.map_or(0, |h| h.modify_index),
                    )
                }
            };
            let entry = serde_json::to_vec(&write.entry(seq)).unwrap_or_default();
            let ops = [
                TxnOp::Cas {
                    key: head_key.clone(),
                    value: seq.to_string().into_bytes(),
                    index: head_index,
                },
                TxnOp::Set {
                    key: self.keys.journal_slot(slot_of(seq)),
                    value: entry,
                },
                write.record_op(),
            ];
            let outcome = client.txn(&ops).await;
            match outcome {
                Ok(TxnOutcome::Applied(written)) => {
                    let index = written.iter().find(|p| p.key == head_key);
                    self.remember_head(index.map(|h| (seq, h.modify_index)));
                    return Ok(true);
                }
                Ok(TxnOutcome::RolledBack(failures))
                    if failures.iter().any(|f| f.op_index == 0) =>
                {
                    self.remember_head(None);
                    if race > 0 {
                        debug!(seq, "another writer took the journal head; retrying");
                    }
                }
                Ok(TxnOutcome::RolledBack(_)) => return Ok(false),
                Err(e) => {
                    self.remember_head(None);
                    return Err(e);
                }
            }
        }
        Err(ConsulError::Rejected {
            op: "journal",
            key: head_key,
        })
    }
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
