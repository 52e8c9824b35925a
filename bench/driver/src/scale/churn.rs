//! The churn: endpoint changes at a steady rate, creates and deletes in turn (a new
//! endpoint after the loaded ones, then the oldest loaded one removed), so the cluster
//! keeps its size. Each change is what `run` does (two keys: the address and the
//! endpoint); the delay of a change runs from its endpoint write to the moment every
//! agent had acknowledged that write's index.
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::StreamExt as _;

use super::{
    acks::AckTracker,
    workload::{Workload, Write},
};

/// Changes outstanding at once, at most (a store this far behind is failing the run).
const MAX_IN_FLIGHT: usize = 64;

/// What a churn run did.
pub struct ChurnLog {
    pub writes: Vec<Write>,
    /// From the first change sent to the last one answered.
    pub elapsed: Duration,
}

impl ChurnLog {
    /// Changes per second actually made (the writer falls behind when the store is slow).
    pub fn achieved_rate(&self) -> f64 {
        self.writes.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The delay of every change every agent acknowledged, in seconds, sorted; and how
    /// many were never acknowledged by all.
    pub fn delays(&self, acks: &AckTracker) -> (Vec<f64>, usize) {
        let mut delays = Vec::with_capacity(self.writes.len());
        let mut missing = 0;
        for write in &self.writes {
            match acks.reached(write.index) {
                Some(when) => delays.push(when.saturating_duration_since(write.at).as_secs_f64()),
                None => missing += 1,
            }
        }
        delays.sort_by(f64::total_cmp);
        (delays, missing)
    }
}

/// Makes `rate` changes per second for `duration` on a cluster holding endpoints
/// `0..loaded`. Changes start on the clock, not when the previous one is answered (an
/// open loop, as independent `run`s would: a slow store is then seen as delay, not as a
/// lower rate); at most [`MAX_IN_FLIGHT`] are outstanding.
pub async fn run(
    workload: &Workload,
    loaded: usize,
    rate: f64,
    duration: Duration,
) -> Result<ChurnLog> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut writes = Vec::new();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut sent = 0;
    while started.elapsed() < duration {
        tokio::select! {
            _ = ticker.tick(), if pending.len() < MAX_IN_FLIGHT => {
                // Creates (new endpoints after the loaded ones) and deletes (the oldest
                // loaded ones) in turn: never the same endpoint twice.
                let change = sent / 2;
                pending.push(async move {
                    if sent % 2 == 0 {
                        workload.create_one(loaded + change).await
                    } else {
                        workload.delete_one(change).await
                    }
                });
                sent += 1;
            }
            Some(write) = pending.next(), if !pending.is_empty() => writes.push(write?),
        }
    }
    while let Some(write) = pending.next().await {
        writes.push(write?);
    }
    Ok(ChurnLog {
        writes,
        elapsed: started.elapsed(),
    })
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), Some(50.0));
        assert_eq!(quantile(&values, 0.99), Some(99.0));
        assert_eq!(quantile(&values, 1.0), Some(100.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
