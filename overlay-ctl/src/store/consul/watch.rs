//! Watching a KV prefix with blocking queries ([`KvWatch`]), following Consul's
//! documented client rules for the index of the next query.
use std::time::{Duration, Instant};

use tracing::warn;

use super::{ConsulClient, MAX_WAIT};
use crate::store::backend::{KvBackend, KvPair};

/// Consul's documented client rules for the index of the next blocking query, given the
/// index the previous query was made with and the one the answer carried:
/// - if the index went backwards (e.g. a server was restored from a snapshot) reset to
///   0, so the next query is a plain read that re-learns the state;
/// - an index below 1 is treated as 1, so a buggy 0 never turns blocking queries into a
///   busy loop.
pub fn next_watch_index(previous: u64, returned: u64) -> u64 {
    let returned = returned.max(1);
    if returned < previous {
        0
    } else {
        returned
    }
}

/// Watches a KV prefix with blocking queries, following Consul's client rules: the
/// index goes back to 0 when the server's goes backwards, never drops below 1 after the
/// first answer, and consecutive queries start at least `min_interval` apart (longer
/// after errors, with exponential backoff) so a flapping key cannot make a busy loop.
///
/// Any [`KvBackend`] can be watched this way: on etcd the index is the store revision
/// and each query waits for a watch event after it, then lists.
#[derive(Debug)]
pub struct KvWatch<B = ConsulClient> {
    client: B,
    prefix: String,
    wait: Duration,
    min_interval: Duration,
    max_error_backoff: Duration,
    index: u64,
    last_start: Option<Instant>,
    consecutive_errors: u32,
}

impl<B: KvBackend> KvWatch<B> {
    pub fn new(client: B, prefix: impl Into<String>, wait: Duration) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            wait: wait.min(MAX_WAIT),
            min_interval: Duration::from_millis(100),
            max_error_backoff: Duration::from_secs(30),
            index: 0,
            last_start: None,
            consecutive_errors: 0,
        }
    }

    /// The minimum time between the starts of two consecutive queries.
    pub fn with_min_interval(mut self, min_interval: Duration) -> Self {
        self.min_interval = min_interval;
        self
    }

    /// The index the next query will block on (0: the next query does not block).
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn pause(&self) -> Duration {
        if self.consecutive_errors == 0 {
            return self.min_interval;
        }
        let base = self.min_interval.max(Duration::from_millis(100));
        let factor = 1u32
            .checked_shl(self.consecutive_errors.min(16))
            .unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(self.max_error_backoff)
    }

    /// Runs the next (blocking) query and returns the entries under the prefix with the
    /// index they were read at. The first call returns at once; later ones when something
    /// under the prefix changed or the wait expired (the entries may then be unchanged).
    pub async fn next(&mut self) -> Result<(Vec<KvPair>, u64), B::Error> {
        if let Some(last) = self.last_start {
            let due = last + self.pause();
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        self.last_start = Some(Instant::now());
        match self
            .client
            .list_blocking(&self.prefix, self.index, self.wait)
            .await
        {
            Ok((pairs, returned)) => {
                self.consecutive_errors = 0;
                let next = next_watch_index(self.index, returned);
                if next == 0 {
                    warn!(prefix = %self.prefix, previous = self.index, returned, "the store's index went backwards; re-reading");
                }
                self.index = next;
                Ok((pairs, returned.max(1)))
            }
            Err(e) => {
                self.consecutive_errors = self.consecutive_errors.saturating_add(1);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_index_rules() {
        assert_eq!(next_watch_index(0, 0), 1);
        assert_eq!(next_watch_index(0, 7), 7);
        assert_eq!(next_watch_index(7, 7), 7);
        assert_eq!(next_watch_index(7, 9), 9);
        assert_eq!(next_watch_index(9, 3), 0);
        assert_eq!(next_watch_index(1, 0), 1);
        assert_eq!(next_watch_index(5, 0), 0);
    }
}
