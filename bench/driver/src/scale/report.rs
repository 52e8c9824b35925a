//! The scale benchmark's results: the targets (met or missed) and every run's
//! figures, as a Markdown table (printed and written) and as JSON.
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{churn::quantile, servers::Backend, ChurnResult, ScaleOptions, SizeRun};

const CONVERGE_TARGET_S: f64 = 5.0;
const P99_TARGET_MS: f64 = 250.0;
const BYTES_RATIO_TARGET: f64 = 2.0;
const RSS_TARGET_MB: f64 = 30.0;
/// The target cell of a figure the issue asks for without a target.
const NO_TARGET: &str = "(none)";

/// One target of one backend.
pub struct Verdict {
    pub backend: &'static str,
    pub measure: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub target: String,
    pub met: Option<bool>,
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn median(values: &[u64]) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

fn ok_churn(run: &SizeRun) -> Option<&ChurnResult> {
    run.churn.as_ref().filter(|_| run.error.is_none())
}

/// The targets of one backend, from its smallest and largest runs.
pub fn verdicts(backend: Backend, runs: &[SizeRun]) -> Vec<Verdict> {
    let (Some(small), Some(large)) = (runs.first(), runs.last()) else {
        return Vec::new();
    };
    let n = large.endpoints;
    let p99 = ok_churn(large).and_then(|c| quantile(&c.delays, 0.99).map(|d| d * 1000.0));
    let bytes = |run: &SizeRun| ok_churn(run).and_then(|c| c.bytes_per_change);
    let ratio = bytes(large)
        .zip(bytes(small))
        .map(|(l, s)| l.max(s) / l.min(s).max(1e-9));
    let rss = (!large.rss.is_empty() && large.error.is_none())
        .then(|| mb(large.rss.iter().copied().max().unwrap_or(0)));
    let converge = large
        .error
        .is_none()
        .then_some(large.converge.as_secs_f64());
    let below = |value: Option<f64>, target: f64| value.map(|v| v < target);
    let cold = (large.error.is_none())
        .then_some(large.cold_start)
        .flatten()
        .map(|d| d.as_secs_f64());
    // Agents that acknowledged without holding every endpoint did not converge.
    let cold_met = match below(cold, CONVERGE_TARGET_S) {
        Some(_) if !large.cold_short_agents.is_empty() => Some(false),
        met => met,
    };
    vec![
        Verdict {
            backend: backend.name(),
            measure: format!(
                "convergence, {} agents while {n} endpoints are written",
                large.agents
            ),
            value: converge,
            unit: "s",
            target: format!("< {CONVERGE_TARGET_S}"),
            met: below(converge, CONVERGE_TARGET_S),
        },
        Verdict {
            backend: backend.name(),
            measure: format!(
                "convergence, {} more agents started on {n} endpoints",
                large.agents
            ),
            value: cold,
            unit: "s",
            target: format!("< {CONVERGE_TARGET_S}"),
            met: cold_met,
        },
        Verdict {
            backend: backend.name(),
            measure: format!("change delay p99 at {n} endpoints"),
            value: p99,
            unit: "ms",
            target: format!("< {P99_TARGET_MS}"),
            met: below(p99, P99_TARGET_MS),
        },
        Verdict {
            backend: backend.name(),
            measure: format!(
                "bytes per agent per change, {n} vs {} endpoints",
                small.endpoints
            ),
            value: ratio,
            unit: "x",
            target: format!("<= {BYTES_RATIO_TARGET}"),
            met: ratio.map(|r| r <= BYTES_RATIO_TARGET),
        },
        Verdict {
            backend: backend.name(),
            measure: format!("agent CPU time per change at {n} endpoints"),
            value: ok_churn(large).map(|c| c.cpu_per_change * 1000.0),
            unit: "ms",
            target: NO_TARGET.into(),
            met: None,
        },
        Verdict {
            backend: backend.name(),
            measure: format!("agent RSS (largest) at {n} endpoints"),
            value: rss,
            unit: "MB",
            target: format!("< {RSS_TARGET_MB}"),
            met: below(rss, RSS_TARGET_MB),
        },
    ]
}

fn cell(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}"))
}

/// The Markdown report: targets, then every run.
pub fn markdown(options: &ScaleOptions, results: &[(Backend, Vec<SizeRun>)], note: &str) -> String {
    let mut out = format!(
        "# Control plane at scale (`overlay-control-bench scale`)\n\n{} control-plane-only agents \
         (`overlay-ctl agent --dataplane none`, release build), churn {} changes/s for {:.0} s. \
         {note}\n\n| store | measure | value | target | met |\n| --- | --- | --- | --- | --- |\n",
        options.agents,
        options.churn_rate,
        options.churn_duration.as_secs_f64()
    );
    for (backend, runs) in results {
        for v in verdicts(*backend, runs) {
            let met = match v.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None if v.target == NO_TARGET => "",
                None => "not measured",
            };
            let target = if v.target == NO_TARGET {
                "—".to_string()
            } else {
                format!("{} {}", v.target, v.unit)
            };
            out += &format!(
                "| {} | {} | {} {} | {target} | {met} |\n",
                v.backend,
                v.measure,
                cell(v.value, 2),
                v.unit,
            );
        }
    }
    out +=
        "\n| store | endpoints | agents up (s) | writes (s) | converge (s) | after last write (s) \
            | churn rate (/s) \
            | p50 (ms) | p99 (ms) | max (ms) | unacked | bytes/agent/change | CPU ms/agent/change \
            | full reads | RSS max (MB) | RSS median (MB) | cold start (s) | notes |\n";
    out += &"| --- ".repeat(18);
    out += "|\n";
    for (backend, runs) in results {
        for run in runs {
            out += &run_row(backend.name(), run);
        }
    }
    out += "\nStores: ";
    out += &results
        .iter()
        .map(|(b, _)| b.describe())
        .collect::<Vec<_>>()
        .join("; ");
    if options.etcd_no_fsync {
        out += " (etcd with --unsafe-no-fsync)";
    }
    out += ".\n";
    out
}

fn run_row(backend: &str, run: &SizeRun) -> String {
    let churn = run.churn.clone().unwrap_or_default();
    let ms = |q: f64| quantile(&churn.delays, q).map(|d| d * 1000.0);
    let mut notes = Vec::new();
    if !run.short_agents.is_empty() {
        notes.push(format!(
            "{} agents did not show all endpoints",
            run.short_agents.len()
        ));
    }
    if !run.cold_short_agents.is_empty() {
        notes.push(format!(
            "{} agents started on the loaded store did not show all endpoints",
            run.cold_short_agents.len()
        ));
    }
    if let Some(e) = &run.cold_error {
        notes.push(format!(
            "agents started on the loaded store: {}",
            e.replace('|', "/").replace('\n', " ")
        ));
    }
    if let Some(e) = &run.error {
        notes.push(e.replace('|', "/").replace('\n', " "));
    }
    format!(
        "| {backend} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        run.endpoints,
        run.start.as_secs_f64(),
        run.writes.as_secs_f64(),
        run.converge.as_secs_f64(),
        run.converge.saturating_sub(run.writes).as_secs_f64(),
        churn.rate,
        cell(ms(0.5), 1),
        cell(ms(0.99), 1),
        cell(ms(1.0), 1),
        churn.unacknowledged,
        cell(churn.bytes_per_change, 0),
        cell(Some(churn.cpu_per_change * 1000.0), 3),
        churn.snapshots.map_or("n/a".into(), |s| s.to_string()),
        cell((!run.rss.is_empty()).then(|| mb(run.rss.iter().copied().max().unwrap_or(0))), 1),
        cell(median(&run.rss).map(mb), 1),
        cell(run.cold_start.map(|d| d.as_secs_f64()), 2),
        notes.join("; "),
    )
}

fn run_json(run: &SizeRun) -> Value {
    let churn = run.churn.as_ref().map(|c| {
        json!({
            "changes": c.changes,
            "rate_per_s": c.rate,
            "delay_p50_ms": quantile(&c.delays, 0.5).map(|d| d * 1000.0),
            "delay_p99_ms": quantile(&c.delays, 0.99).map(|d| d * 1000.0),
            "delay_max_ms": quantile(&c.delays, 1.0).map(|d| d * 1000.0),
            "unacknowledged": c.unacknowledged,
            "store_bytes_per_agent_per_change": c.bytes_per_change,
            "cpu_ms_per_agent_per_change": c.cpu_per_change * 1000.0,
            "feed_snapshots": c.snapshots,
        })
    });
    json!({
        "endpoints": run.endpoints,
        "agents": run.agents,
        "agents_up_s": run.start.as_secs_f64(),
        "writes_s": run.writes.as_secs_f64(),
        "converge_s": run.converge.as_secs_f64(),
        "converge_after_last_write_s": run.converge.saturating_sub(run.writes).as_secs_f64(),
        "agents_short_of_endpoints": run.short_agents,
        "churn": churn,
        "agent_rss_max_mb": run.rss.iter().copied().max().map(mb),
        "agent_rss_median_mb": median(&run.rss).map(mb),
        "cold_start_s": run.cold_start.map(|d| d.as_secs_f64()),
        "cold_start_agents_short_of_endpoints": run.cold_short_agents,
        "cold_start_error": run.cold_error,
        "error": run.error,
    })
}

/// Everything as JSON.
pub fn json(options: &ScaleOptions, results: &[(Backend, Vec<SizeRun>)], note: &str) -> Value {
    let backends: Vec<Value> = results
        .iter()
        .map(|(backend, runs)| {
            let targets: Vec<Value> = verdicts(*backend, runs)
                .iter()
                .map(|v| json!({"measure": v.measure, "value": v.value, "unit": v.unit, "target": v.target, "met": v.met}))
                .collect();
            json!({
                "store": backend.name(),
                "server": backend.describe(),
                "targets": targets,
                "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "agents": options.agents,
        "churn_per_s": options.churn_rate,
        "churn_s": options.churn_duration.as_secs_f64(),
        "etcd_unsafe_no_fsync": options.etcd_no_fsync,
        "note": note,
        "backends": backends,
    })
}

/// Writes `<dir>/<name>.json` and `<dir>/<name>.md`.
pub fn write(dir: &Path, name: &str, markdown: &str, json: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let md = dir.join(format!("{name}.md"));
    std::fs::write(&md, markdown).with_context(|| format!("write {}", md.display()))?;
    let js = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(json)? + "\n";
    std::fs::write(&js, text).with_context(|| format!("write {}", js.display()))?;
    Ok(())
}

/// Whether every target of every backend was measured and met.
pub fn all_met(results: &[(Backend, Vec<SizeRun>)]) -> bool {
    results
        .iter()
        .flat_map(|(b, runs)| verdicts(*b, runs))
        .all(|v| v.met == Some(true) || v.target == NO_TARGET)
}
