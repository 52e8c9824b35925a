//! What the benchmark reads from the agents' status (`overlay-ctl status --json`, over
//! their control sockets): the endpoints each holds, the store bytes it read, the full
//! reads its feed made; and their CPU time from /proc.
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agents::Fleet;

/// How long agents that acknowledged may take to show every endpoint in their status.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// The status fields, by their path in `status --json`.
mod field {
    /// Endpoints in the agent's endpoint map (the in-memory one without a data plane).
    pub const ENDPOINTS: &str = "endpoint_map_entries";
    /// Bytes of store answers the agent read since it started.
    pub const STORE_BYTES_READ: &str = "feed.store_bytes_read";
    /// Full reads of the prefix by the agent's feed since it started.
    pub const FEED_SNAPSHOTS: &str = "feed.snapshots";
}

fn lookup_u64(status: &Value, path: &str) -> Option<u64> {
    path.split('.')
        .try_fold(status, |v, part| v.get(part))
        .and_then(Value::as_u64)
}

/// The endpoints an agent holds: its endpoint map without a data plane, else the
/// endpoints its last reconcile planned (local and remote).
pub fn endpoints_held(status: &Value) -> Option<u64> {
    lookup_u64(status, field::ENDPOINTS).or_else(|| {
        Some(lookup_u64(status, "local_endpoints")? + lookup_u64(status, "remote_endpoints")?)
    })
}

/// The agents whose status does not show the endpoints `expected` gives for their node
/// within [`HOLD_TIMEOUT`].
pub async fn agents_without(fleet: &Fleet, expected: impl Fn(&str) -> usize) -> Vec<String> {
    let deadline = Instant::now() + HOLD_TIMEOUT;
    loop {
        let short: Vec<String> = fleet
            .statuses()
            .await
            .iter()
            .zip(&fleet.agents)
            .filter(|(status, agent)| {
                status.as_ref().ok().and_then(endpoints_held) != Some(expected(&agent.node) as u64)
            })
            .map(|(_, agent)| agent.node.clone())
            .collect();
        if short.is_empty() || Instant::now() >= deadline {
            return short;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agents' counters summed over the fleet at one moment.
pub struct Counters {
    /// `None` when some agent does not report it.
    pub bytes_read: Option<u64>,
    pub snapshots: Option<u64>,
    pub cpu_seconds: f64,
}

impl Counters {
    pub async fn read(fleet: &Fleet) -> Self {
        let statuses = fleet.statuses().await;
        let sum = |path: &str| -> Option<u64> {
            statuses
                .iter()
                .map(|s| s.as_ref().ok().and_then(|s| lookup_u64(s, path)))
                .sum()
        };
        Self {
            bytes_read: sum(field::STORE_BYTES_READ),
            snapshots: sum(field::FEED_SNAPSHOTS),
            cpu_seconds: fleet.cpu_seconds().iter().sum(),
        }
    }
}
