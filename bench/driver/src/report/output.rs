//! A whole run ([`Report`]: the machine, the options, the rows) written out as the
//! Markdown table and the JSON file, and the number and time formats they use.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use super::{BenchRow, Measured, Outcome, SetupKind};
/// The machine a run happened on.
#[derive(Clone, Debug)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_mb: u64,
    pub description: String,
}

impl Machine {
    /// Reads the kernel, CPU and memory of this machine; `description` says what the
    /// numbers cannot (shared, noisy, virtual).
    pub fn detect(description: &str) -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let memory_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(0);
        Self {
            kernel,
            cpu_model,
            cpus,
            memory_mb,
            description: description.into(),
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{} vCPU {} ({}), {} MB RAM, Linux {}; {}",
            self.cpus,
            self.cpu_model,
            std::env::consts::ARCH,
            self.memory_mb,
            self.kernel,
            self.description
        )
    }
}

/// A whole run.
#[derive(Clone, Debug)]
pub struct Report {
    pub started: SystemTime,
    pub elapsed: Duration,
    pub machine: Machine,
    /// `git describe`-like revision of the tree that was measured.
    pub revision: String,
    /// Options of the run (rounds, durations...), as given.
    pub options: Value,
    pub rounds_done: usize,
    /// What each setup is, in words.
    pub setups: Vec<(SetupKind, String)>,
    /// Settings applied to all three setups alike.
    pub common: Vec<String>,
    pub rows: Vec<BenchRow>,
    /// Why a target was missed, by row id (hand-written after profiling).
    pub analysis: BTreeMap<String, String>,
    /// Anything else worth knowing about this run (stopped early, failures).
    pub remarks: Vec<String>,
}

impl Report {
    pub fn to_json(&self) -> Value {
        let setups: serde_json::Map<String, Value> = self
            .setups
            .iter()
            .map(|(k, d)| {
                (
                    k.letter().to_string(),
                    json!({ "title": k.title(), "setup": d }),
                )
            })
            .collect();
        json!({
            "schema": 1,
            "started": utc_timestamp(self.started),
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "revision": self.revision,
            "machine": {
                "summary": self.machine.summary(),
                "kernel": self.machine.kernel,
                "cpu_model": self.machine.cpu_model,
                "cpus": self.machine.cpus,
                "memory_mb": self.machine.memory_mb,
                "description": self.machine.description,
            },
            "options": self.options,
            "rounds_done": self.rounds_done,
            "setups": setups,
            "common_settings": self.common,
            "rows": self.rows.iter().map(BenchRow::to_json).collect::<Vec<_>>(),
            "analysis": self.analysis,
            "remarks": self.remarks,
        })
    }

    /// The table alone (what the README shows).
    pub fn table(&self) -> String {
        let mut md = String::new();
        md.push_str("| measurement | (a) no overlay | (b) Linux VXLAN | (c) this data plane | c/b | c/a | target | result |\n");
        md.push_str("|---|--:|--:|--:|--:|--:|---|---|\n");
        for row in &self.rows {
            let cell = |kind: SetupKind| -> String {
                let samples = match &row.measured {
                    Measured::NotMeasured(_) if kind == SetupKind::Overlay => {
                        return "not measured yet".into()
                    }
                    Measured::Compared(s) => &s[kind.index()],
                    Measured::Own(s) if kind == SetupKind::Overlay => s,
                    _ => return "—".into(),
                };
                match samples.median() {
                    Some(v) => format!("{} {}", fmt_value(v), row.unit),
                    None if samples.errors.is_empty() => "—".into(),
                    None => "failed".into(),
                }
            };
            let (cb, ca) = row.ratios();
            let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or("—".into());
            let targets = if row.targets.is_empty() {
                "—".to_string()
            } else {
                row.targets
                    .iter()
                    .map(|t| t.describe(&row.unit))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let result = match row.outcome() {
                None => "—".to_string(),
                Some(Outcome::Met) => "met".into(),
                Some(Outcome::Missed) => {
                    let missed: Vec<String> = row
                        .targets
                        .iter()
                        .filter(|t| row.outcome_of(t) == Outcome::Missed)
                        .map(|t| t.describe(&row.unit))
                        .collect();
                    format!("**missed** ({})", missed.join(", "))
                }
                Some(Outcome::NotMeasured) => "not measured yet".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row.name,
                cell(SetupKind::Routed),
                cell(SetupKind::LinuxVxlan),
                cell(SetupKind::Overlay),
                ratio(cb),
                ratio(ca),
                targets,
                result
            );
        }
        md
    }

    /// The notes under the table: why each missed target was missed.
    pub fn missed_notes(&self) -> String {
        let mut md = String::new();
        for row in &self.rows {
            if row.outcome() != Some(Outcome::Missed) {
                continue;
            }
            let why = self.analysis.get(&row.id).map(String::as_str).unwrap_or(
                "no analysis recorded for this row yet: profile it (`perf record -a -g` during \
                 `cargo xtask bench --setups c --only ...`; `bpftool prog profile` where the \
                 CPU has a PMU) and write why into bench/notes.json",
            );
            let _ = writeln!(md, "- **{}** missed: {why}", row.name);
        }
        md
    }

    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Data-plane benchmark\n");
        let _ = writeln!(
            md,
            "Run {} on {}, revision {}; {} round(s), {:.0} s in all. Values are medians over \
             the rounds. Within every measurement of every round (a), (b), (c) run back to \
             back; c/b and c/a are taken per round and the table shows their median (so a \
             ratio can differ from the ratio of the medians shown; latest.json has both, and \
             every sample and per-round ratio).\n",
            utc_timestamp(self.started),
            self.machine.summary(),
            self.revision,
            self.rounds_done,
            self.elapsed.as_secs_f64()
        );
        md.push_str(&self.table());
        let notes = self.missed_notes();
        if !notes.is_empty() {
            md.push_str("\nWhy targets were missed:\n\n");
            md.push_str(&notes);
        }
        md.push_str("\n## Setups\n\n");
        for (kind, description) in &self.setups {
            let _ = writeln!(md, "- ({}) {}: {description}", kind.letter(), kind.title());
        }
        md.push_str("\nThe same for all three:\n\n");
        for line in &self.common {
            let _ = writeln!(md, "- {line}");
        }
        md.push_str("\n## How each row is measured\n\n");
        for row in &self.rows {
            let _ = writeln!(md, "- {}: {}", row.name, row.method);
        }
        if !self.remarks.is_empty() {
            md.push_str("\n## Remarks on this run\n\n");
            for remark in &self.remarks {
                let _ = writeln!(md, "- {remark}");
            }
        }
        md
    }

    /// Writes `latest.json` and `latest.md` into `dir` (each through a `.tmp` file and a
    /// rename, so a reader never sees half a file).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(&self.to_json()).expect("JSON of plain values");
        for (name, content) in [
            ("latest.json", json + "\n"),
            ("latest.md", self.to_markdown()),
        ] {
            let tmp = dir.join(format!("{name}.tmp"));
            std::fs::write(&tmp, content)?;
            std::fs::rename(&tmp, dir.join(name))?;
        }
        Ok(())
    }
}

/// Three significant digits, at most two decimals ("9.41", "312", "41.7", "0.25").
pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub(super) fn trim_number(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// `2026-11-25T02:18:38Z` for a system time (UTC, no time-zone database needed).
pub fn utc_timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_573_118);
        assert_eq!(utc_timestamp(t), "2026-11-25T02:18:38Z");
    }
}
