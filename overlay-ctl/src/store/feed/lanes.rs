//! The Consul feed's blocking queries ("lanes"), each on one part of the state and each
//! with its own index, running as tasks so that none is cancelled when another answers
//! (a cancelled request costs a connection). A lane reports only answers whose index
//! moved; a bounded channel makes a lane wait while the feed is not being read.
use std::time::Duration;

use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use crate::store::{
    consul::{next_watch_index, ConsulClient},
    StoreError,
};

/// What one lane watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum LaneKind {
    /// Every entry under a (small) section: `?recurse`.
    Section(String),
    /// One key (the journal head).
    Key(String),
    /// The folder names under a (big) section, `?keys&separator=/`: only the index
    /// matters, which covers every key below.
    Folders(String),
}

/// What a lane read.
#[derive(Debug)]
pub(super) enum LaneAnswer {
    /// A small section changed: the feed re-reads all of them together.
    Section,
    Key,
    Folders(Vec<String>),
}

/// One answer whose index moved.
#[derive(Debug)]
pub(super) struct Report {
    pub(super) lane: usize,
    pub(super) answer: LaneAnswer,
    pub(super) index: u64,
    /// The index went backwards (a restored or reset store): the lane's history is gone.
    pub(super) went_back: bool,
}

/// The running lanes; dropping this stops them.
#[derive(Debug)]
pub(super) struct Lanes {
    reports: mpsc::Receiver<Result<Report, StoreError>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The pause between the starts of two queries of a lane (so a flapping key costs no
/// busy loop), and the cap of its backoff after errors.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(30);

/// The pause between two folder queries of a big section grows with the section: Consul
/// answers one by visiting every key below (as the dev server does), and every
/// journaled write moves its index, so at the 50 ms pace of the other lanes 100 agents
/// made the store walk all 20,000 endpoints thousands of times a second. At this much
/// per key, the walks cost the store about the same whatever the cluster's size. What the
/// query catches (a write that bypassed the journal) is rare, and a small cluster (a
/// test's, an operator's first steps) still sees it within 50 ms.
pub(super) const FOLDERS_PAUSE_PER_KEY: Duration = Duration::from_micros(250);
/// The longest pause between two folder queries.
pub(super) const FOLDERS_MAX_PAUSE: Duration = Duration::from_secs(5);

/// The pause between two folder queries of a section of `keys` keys.
pub(super) fn folders_pause(keys: usize) -> Duration {
    let keys = u32::try_from(keys).unwrap_or(u32::MAX);
    FOLDERS_PAUSE_PER_KEY
        .saturating_mul(keys)
        .clamp(MIN_INTERVAL, FOLDERS_MAX_PAUSE)
}

/// How many keys a big section holds, as the feed last counted them (its lane paces
/// itself by it).
pub(super) type SectionSize = std::sync::Arc<std::sync::atomic::AtomicUsize>;

impl Lanes {
    /// Starts one task per `(kind, index)`: each blocks from its index.
    pub(super) fn start(
        client: &ConsulClient,
        lanes: Vec<(LaneKind, u64, Option<SectionSize>)>,
        wait: Duration,
    ) -> Self {
        let (sender, reports) = mpsc::channel(lanes.len() * 2);
        let tasks = lanes
            .into_iter()
            .enumerate()
            .map(|(lane, (kind, index, size))| {
                let lane = Lane {
                    client: client.clone(),
                    number: lane,
                    kind,
                    index,
                    wait,
                    size,
                };
                tokio::spawn(lane.run(sender.clone()))
            })
            .collect();
        Self { reports, tasks }
    }

    /// The next report (`None` only if every lane stopped).
    pub(super) async fn recv(&mut self) -> Option<Result<Report, StoreError>> {
        self.reports.recv().await
    }

    /// A report already waiting, if any.
    pub(super) fn try_recv(&mut self) -> Option<Result<Report, StoreError>> {
        self.reports.try_recv().ok()
    }
}

struct Lane {
    client: ConsulClient,
    number: usize,
    kind: LaneKind,
    index: u64,
    wait: Duration,
    /// The size of the section a folders lane watches.
    size: Option<SectionSize>,
}

impl Lane {
    async fn query(&self) -> Result<(LaneAnswer, u64), StoreError> {
        let (client, index, wait) = (&self.client, self.index, self.wait);
        Ok(match &self.kind {
            LaneKind::Section(prefix) => {
                let (_, index) = client.list_blocking(prefix, index, wait).await?;
                (LaneAnswer::Section, index)
            }
            LaneKind::Key(key) => {
                let (_, index) = client.get_blocking(key, index, wait).await?;
                (LaneAnswer::Key, index)
            }
            LaneKind::Folders(prefix) => {
                let (names, index) = client.keys_blocking(prefix, "/", index, wait).await?;
                (LaneAnswer::Folders(names), index)
            }
        })
    }

    fn pause(errors: u32, keys: usize) -> Duration {
        let factor = 1u32.checked_shl(errors.min(16)).unwrap_or(u32::MAX);
        let after_errors = MIN_INTERVAL
            .saturating_mul(factor)
            .min(MAX_ERROR_BACKOFF)
            .max(MIN_INTERVAL);
        after_errors.max(folders_pause(keys))
    }

    /// The keys of the section this lane watches (0: not a folders lane).
    fn keys(&self) -> usize {
        (self.size.as_ref()).map_or(0, |s| s.load(std::sync::atomic::Ordering::Relaxed))
    }

    async fn run(mut self, reports: mpsc::Sender<Result<Report, StoreError>>) {
        let mut errors = 0u32;
        let mut last_start: Option<Instant> = None;
        loop {
            if let Some(last) = last_start {
                tokio::time::sleep_until(last + Self::pause(errors, self.keys())).await;
            }
            last_start = Some(Instant::now());
            let report = match self.query().await {
                Ok((answer, returned)) => {
                    errors = 0;
                    let next = next_watch_index(self.index, returned);
                    let moved = returned != self.index;
                    let report = Report {
                        lane: self.number,
                        answer,
                        index: returned.max(1),
                        went_back: next == 0,
                    };
                    self.index = next;
                    if !moved {
                        continue;
                    }
                    Ok(report)
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    Err(e)
                }
            };
            if reports.send(report).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_pace_themselves_and_back_off_boundedly() {
        assert_eq!(Lane::pause(0, 0), MIN_INTERVAL);
        assert_eq!(Lane::pause(1, 0), MIN_INTERVAL * 2);
        assert_eq!(Lane::pause(40, 0), MAX_ERROR_BACKOFF);
        // A folders lane: by the size of its section.
        assert_eq!(Lane::pause(0, 10), MIN_INTERVAL);
        assert_eq!(Lane::pause(0, 2_000), Duration::from_millis(500));
        assert_eq!(Lane::pause(0, 40_000), FOLDERS_MAX_PAUSE);
        assert_eq!(Lane::pause(40, 40_000), MAX_ERROR_BACKOFF);
    }
}
