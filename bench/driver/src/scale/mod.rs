//! `overlay-control-bench scale`: the control plane at cluster scale (issue #16). Many
//! control-plane-only agents (`overlay-ctl agent --dataplane none`: the agent's watch and
//! reconcile code, no BPF) follow one store, on this machine, for each store backend
//! and each cluster size:
//!
//! 1. the store starts empty ([`servers`]); the benchmark writes what bootstrap and
//!    `network create` write, and the IPAM keys of every endpoint to come ([`workload`]);
//! 2. the agents start ([`agents`]) and each acknowledges the state it applied
//!    (`applied/<node>`, followed by [`acks`]);
//! 3. **convergence**: the endpoints are written (32 in flight by default), spread over
//!    the agents' nodes; from the first write until every agent acknowledged an index at or after
//!    the last one, then every agent's status is checked to hold them all;
//! 4. **churn** ([`churn`]): endpoint creates and deletes at a steady rate; per change,
//!    the delay until every agent acknowledged it; per agent, the store bytes read and
//!    the CPU time spent during the churn, divided by the changes;
//! 5. memory: every agent's VmRSS at the end.
//!
//! [`report`] turns the runs into the table with the targets.
pub mod acks;
pub mod agents;
pub mod churn;
pub mod report;
pub mod servers;
pub mod status;
pub mod workload;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    acks::AckTracker,
    agents::Fleet,
    servers::{Backend, StoreServer},
    workload::Workload,
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct ScaleOptions {
    /// `overlay-ctl`: the agents and the Consul dev server.
    pub overlay_ctl: PathBuf,
    pub backends: Vec<Backend>,
    pub agents: usize,
    /// The cluster sizes, smallest first (bytes per change are compared between them).
    pub sizes: Vec<usize>,
    /// Endpoint changes per second during the churn.
    pub churn_rate: f64,
    pub churn_duration: Duration,
    /// Endpoint writes in flight while the cluster is loaded.
    pub writers: usize,
    /// etcd runs with `--unsafe-no-fsync`.
    pub etcd_no_fsync: bool,
    /// How long the agents may take to start, and to converge, before the run fails.
    pub timeout: Duration,
}

/// One cluster size on one backend.
#[derive(Clone, Debug, Default)]
pub struct SizeRun {
    pub endpoints: usize,
    pub agents: usize,
    /// Agents started until every one acknowledged its first state.
    pub start: Duration,
    /// The endpoint writes alone (part of `converge`).
    pub writes: Duration,
    /// First endpoint write until every agent acknowledged the last one.
    pub converge: Duration,
    /// Agents whose status did not show every endpoint after they acknowledged.
    pub short_agents: Vec<String>,
    pub churn: Option<ChurnResult>,
    /// Every agent's VmRSS after the churn, in bytes.
    pub rss: Vec<u64>,
    /// A second fleet of as many agents started on the loaded store (a cluster's nodes
    /// rebooting, or joining): start until every one acknowledged the store's state.
    pub cold_start: Option<Duration>,
    /// Agents of the second fleet whose status did not show every endpoint.
    pub cold_short_agents: Vec<String>,
    /// Why the second fleet was not measured (the rest of the run still was).
    pub cold_error: Option<String>,
    pub error: Option<String>,
}

/// The churn phase of a [`SizeRun`].
#[derive(Clone, Debug, Default)]
pub struct ChurnResult {
    pub changes: usize,
    pub rate: f64,
    /// Sorted, in seconds.
    pub delays: Vec<f64>,
    /// Changes some agent never acknowledged.
    pub unacknowledged: usize,
    /// Store bytes read per agent per change (`None`: the agents do not report it).
    pub bytes_per_change: Option<f64>,
    /// CPU seconds per agent per change.
    pub cpu_per_change: f64,
    /// Full reads (feed snapshots) the agents made during the churn, all together.
    pub snapshots: Option<u64>,
}

/// The results so far: each backend with its runs, smallest size first.
pub type Results = Vec<(Backend, Vec<SizeRun>)>;

/// Runs every backend and size in turn; a failed run is reported, not fatal. After each
/// run `done` gets the results so far (the binary writes the report then, so a run cut
/// short keeps what it measured).
pub async fn run(options: &ScaleOptions, mut done: impl FnMut(&Results)) -> Results {
    let mut results: Results = Vec::new();
    for &backend in &options.backends {
        results.push((backend, Vec::new()));
        for &endpoints in &options.sizes {
            let started = Instant::now();
            progress(&format!(
                "{}: {} agents, {endpoints} endpoints",
                backend.name(),
                options.agents
            ));
            let run = match measure(options, backend, endpoints).await {
                Ok(run) => run,
                Err(e) => {
                    progress(&format!("{}: failed: {e:#}", backend.name()));
                    SizeRun {
                        endpoints,
                        agents: options.agents,
                        error: Some(format!("{e:#}")),
                        ..SizeRun::default()
                    }
                }
            };
            progress(&format!(
                "{}: {endpoints} endpoints done in {:.0} s",
                backend.name(),
                started.elapsed().as_secs_f64()
            ));
            if let Some((_, runs)) = results.last_mut() {
                runs.push(run);
            }
            done(&results);
        }
    }
    results
}

pub fn progress(line: &str) {
    eprintln!("scale: {line}");
}

/// One fresh store and fleet, measured at `endpoints`.
async fn measure(options: &ScaleOptions, backend: Backend, endpoints: usize) -> Result<SizeRun> {
    let server = StoreServer::start(backend, &options.overlay_ctl, options.etcd_no_fsync).await?;
    let dir = servers::temp_dir("agents")?;
    let nodes: Vec<String> = (0..options.agents)
        .map(|i| format!("scale-{i:03}"))
        .collect();
    let workload = Workload::new(server.store().await?, nodes, options.writers);
    workload.prepare().await?;
    workload.allocate(0..endpoints).await?;
    progress(&format!(
        "{endpoints} addresses allocated; starting the agents"
    ));

    let started = Instant::now();
    let mut fleet = Fleet::start(&options.overlay_ctl, &server.url, options.agents, dir)?;
    let acks = AckTracker::start(workload.store(), &fleet.node_names());
    wait_started(&mut fleet, &acks, options.timeout).await?;
    let mut run = SizeRun {
        endpoints,
        agents: options.agents,
        start: started.elapsed(),
        ..SizeRun::default()
    };
    progress(&format!(
        "{} agents up in {:.1} s; writing {endpoints} endpoints",
        options.agents,
        run.start.as_secs_f64()
    ));

    converge(&workload, &fleet, &acks, options.timeout, &mut run).await?;
    progress(&format!(
        "converged in {:.2} s (writes {:.2} s); churning {} changes/s for {:.0} s",
        run.converge.as_secs_f64(),
        run.writes.as_secs_f64(),
        options.churn_rate,
        options.churn_duration.as_secs_f64()
    ));
    run.churn = Some(measure_churn(options, &workload, &fleet, &acks, endpoints).await?);
    fleet.check_running()?;
    run.rss = fleet.rss_bytes();
    if let Err(e) = cold_start(options, &server.url, &workload, &mut run).await {
        progress(&format!("second fleet: {e:#}"));
        run.cold_error = Some(format!("{e:#}"));
    }
    fleet.check_running()?;
    Ok(run)
}

/// Starts a second fleet on the loaded store, beside the first (whose nodes keep their
/// endpoints live), and times it until every new agent acknowledged the store's state;
/// then checks each holds every endpoint (none is on its own node).
async fn cold_start(
    options: &ScaleOptions,
    url: &str,
    workload: &Workload,
    run: &mut SizeRun,
) -> Result<()> {
    let (held, last) = workload.loaded().await?;
    progress(&format!(
        "starting {} more agents on the loaded store ({held} endpoints)",
        options.agents
    ));
    let dir = servers::temp_dir("cold-agents")?;
    let started = Instant::now();
    let mut fleet = Fleet::start_named(
        &options.overlay_ctl,
        url,
        "cold",
        options.agents,
        options.agents,
        dir,
    )?;
    let acks = AckTracker::start(workload.store(), &fleet.node_names());
    let Some(reached) = acks.wait_reached(last, options.timeout).await else {
        fleet.check_running()?;
        bail!(
            "the second fleet did not all acknowledge index {last} within {:?} (lowest: {})",
            options.timeout,
            acks.lowest()
        );
    };
    let took = reached.saturating_duration_since(started);
    run.cold_start = Some(took);
    run.cold_short_agents = status::agents_without(&fleet, |_| held).await;
    progress(&format!(
        "{} agents started on {held} endpoints held them all in {:.2} s",
        options.agents,
        took.as_secs_f64()
    ));
    fleet.check_running()?;
    Ok(())
}

/// Waits until every agent acknowledged its first state.
async fn wait_started(fleet: &mut Fleet, acks: &AckTracker, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while acks.agents_seen() < fleet.agents.len() {
        fleet.check_running()?;
        if Instant::now() >= deadline {
            bail!(
                "only {} of {} agents acknowledged a state within {timeout:?}",
                acks.agents_seen(),
                fleet.agents.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Writes the endpoints and times them until every agent acknowledged the last one;
/// then checks every agent holds them all.
async fn converge(
    workload: &Workload,
    fleet: &Fleet,
    acks: &AckTracker,
    timeout: Duration,
    run: &mut SizeRun,
) -> Result<()> {
    let started = Instant::now();
    tokio::time::timeout(timeout, workload.create_endpoints(0..run.endpoints))
        .await
        .with_context(|| {
            format!(
                "the store took more than {timeout:?} to take {} endpoint writes",
                run.endpoints
            )
        })??;
    run.writes = started.elapsed();
    let last = workload.last_endpoint_index().await?;
    let left = timeout.saturating_sub(started.elapsed());
    let Some(reached) = acks.wait_reached(last, left).await else {
        bail!(
            "the agents did not all acknowledge index {last} within {timeout:?} (lowest: {})",
            acks.lowest()
        );
    };
    run.converge = reached.saturating_duration_since(started);
    // A control-plane-only agent keeps its own node's endpoints out of its map (they
    // would need a host): each holds the others'.
    run.short_agents = status::agents_without(fleet, |node| {
        run.endpoints - workload.count_on(node, run.endpoints)
    })
    .await;
    Ok(())
}

/// The churn, with the agents' CPU time and store bytes read around it.
async fn measure_churn(
    options: &ScaleOptions,
    workload: &Workload,
    fleet: &Fleet,
    acks: &AckTracker,
    loaded: usize,
) -> Result<ChurnResult> {
    let before = status::Counters::read(fleet).await;
    let log = churn::run(workload, loaded, options.churn_rate, options.churn_duration)
        .await
        .context("churn")?;
    // Let the last changes reach everyone (or time out) before reading the counters.
    if let Some(last) = log.writes.iter().map(|w| w.index).max() {
        acks.wait_reached(last, Duration::from_secs(30)).await;
    }
    let after = status::Counters::read(fleet).await;
    let (delays, unacknowledged) = log.delays(acks);
    let changes = log.writes.len();
    let per_agent_change = (changes * fleet.agents.len()).max(1) as f64;
    Ok(ChurnResult {
        changes,
        rate: log.achieved_rate(),
        delays,
        unacknowledged,
        bytes_per_change: after
            .bytes_read
            .zip(before.bytes_read)
            .map(|(a, b)| a.saturating_sub(b) as f64 / per_agent_change),
        cpu_per_change: (after.cpu_seconds - before.cpu_seconds).max(0.0) / per_agent_change,
        snapshots: after
            .snapshots
            .zip(before.snapshots)
            .map(|(a, b)| a.saturating_sub(b)),
    })
}
