//! The churn: endpoint changes at a steady rate, creates and deletes in turn (a new
//! endpoint after the loaded ones, then the oldest loaded one removed), so the cluster
//! keeps its size. Each change is what `run` does (two keys: the address and the
//! endpoint); the delay of a change runs from its endpoint write to the moment every
//! agent had acknowledged that write's index.
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{
    acks::AckTracker,
    workload::{Workload, Write},
};

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
/// `0..loaded`.
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
    let mut next_new = loaded;
    let mut next_old = 0;
    while started.elapsed() < duration {
        ticker.tick().await;
        let write = if writes.len() % 2 == 0 {
            next_new += 1;
            workload.create_one(next_new - 1).await?
        } else {
            next_old += 1;
            workload.delete_one(next_old - 1).await?
        };
        writes.push(write);
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
