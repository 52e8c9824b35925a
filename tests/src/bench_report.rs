//! Benchmark results as rows, their targets, and the two outputs: a Markdown table and a
//! JSON file. Every figure in a row comes from samples that were measured; a row that
//! was not measured says so and never carries a number.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

/// The three setups compared, in the order they run in each round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetupKind {
    /// (a) no overlay: containers on two hosts, plain routed veths. The ceiling.
    Routed,
    /// (b) the Linux VXLAN device with a bridge and static FDB entries. The incumbent.
    LinuxVxlan,
    /// (c) this project's eBPF data plane.
    Overlay,
}

impl SetupKind {
    pub const ALL: [SetupKind; 3] = [Self::Routed, Self::LinuxVxlan, Self::Overlay];

    pub fn letter(self) -> &'static str {
        match self {
            Self::Routed => "a",
            Self::LinuxVxlan => "b",
            Self::Overlay => "c",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::Routed => "no overlay",
            Self::LinuxVxlan => "Linux VXLAN",
            Self::Overlay => "this data plane",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Which direction is better for a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// The samples of one figure, one per round (numbered from 1), and the rounds that failed.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub values: Vec<(usize, f64)>,
    pub errors: Vec<(usize, String)>,
}

impl Samples {
    pub fn push(&mut self, round: usize, value: f64) {
        self.values.push((round, value));
    }

    pub fn fail(&mut self, round: usize, error: String) {
        self.errors.push((round, error));
    }

    pub fn get(&self, round: usize) -> Option<f64> {
        self.values
            .iter()
            .find(|(r, _)| *r == round)
            .map(|(_, v)| *v)
    }

    fn plain(&self) -> Vec<f64> {
        self.values.iter().map(|(_, v)| *v).collect()
    }

    pub fn median(&self) -> Option<f64> {
        median(&self.plain())
    }

    fn to_json(&self) -> Value {
        let plain = self.plain();
        let min = plain.iter().copied().reduce(f64::min);
        let max = plain.iter().copied().reduce(f64::max);
        json!({
            "median": self.median(),
            "min": min,
            "max": max,
            "samples": self.values.iter().map(|(r, v)| json!({ "round": r, "value": v })).collect::<Vec<_>>(),
            "errors": self.errors.iter().map(|(r, e)| json!({ "round": r, "error": e })).collect::<Vec<_>>(),
        })
    }
}

/// Median over the rounds of `num / den`, pairing the two figures of the same round
/// (measured back to back, so slow changes of the machine's load cancel out).
pub fn paired_ratio(num: &Samples, den: &Samples) -> Option<f64> {
    median(&per_round_ratios(num, den))
}

/// `num / den` for every round that has both.
pub fn per_round_ratios(num: &Samples, den: &Samples) -> Vec<f64> {
    num.values
        .iter()
        .filter_map(|(round, n)| {
            let d = den.get(*round)?;
            (d != 0.0).then(|| n / d)
        })
        .collect()
}

/// Median (mean of the two middle values for an even count); `None` without samples.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// What a row holds.
#[derive(Clone, Debug)]
pub enum Measured {
    /// No figure, and why (e.g. "not measured yet").
    NotMeasured(String),
    /// The three setups side by side, indexed by [`SetupKind::index`].
    Compared([Samples; 3]),
    /// A figure of this project alone (program cost, control plane).
    Own(Samples),
}

/// What a target compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    /// c / b (median of the per-round ratios)
    RatioCB,
    /// c / a (median of the per-round ratios)
    RatioCA,
    /// median(c) itself (for [`Measured::Own`], the median of the samples)
    Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    AtLeast,
    AtMost,
    Below,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    pub quantity: Quantity,
    pub bound: Bound,
    pub limit: f64,
}

impl Target {
    pub fn ratio_cb_at_least(limit: f64) -> Self {
        Self {
            quantity: Quantity::RatioCB,
            bound: Bound::AtLeast,
            limit,
        }
    }
    pub fn ratio_cb_at_most(limit: f64) -> Self {
        Self {
            quantity: Quantity::RatioCB,
            bound: Bound::AtMost,
            limit,
        }
    }
    pub fn ratio_ca_at_least(limit: f64) -> Self {
        Self {
            quantity: Quantity::RatioCA,
            bound: Bound::AtLeast,
            limit,
        }
    }
    pub fn value_at_most(limit: f64) -> Self {
        Self {
            quantity: Quantity::Value,
            bound: Bound::AtMost,
            limit,
        }
    }
    pub fn value_below(limit: f64) -> Self {
        Self {
            quantity: Quantity::Value,
            bound: Bound::Below,
            limit,
        }
    }

    /// "c/b ≥ 1.00", "≤ 60 ns", "< 2 s".
    pub fn describe(&self, unit: &str) -> String {
        let op = match self.bound {
            Bound::AtLeast => "≥",
            Bound::AtMost => "≤",
            Bound::Below => "<",
        };
        match self.quantity {
            Quantity::RatioCB => format!("c/b {op} {:.2}", self.limit),
            Quantity::RatioCA => format!("c/a {op} {:.2}", self.limit),
            Quantity::Value => format!("{op} {} {unit}", trim_number(self.limit)),
        }
    }

    fn holds(&self, x: f64) -> bool {
        match self.bound {
            Bound::AtLeast => x >= self.limit,
            Bound::AtMost => x <= self.limit,
            Bound::Below => x < self.limit,
        }
    }
}

/// Whether a target was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Met,
    Missed,
    NotMeasured,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "missed",
            Self::NotMeasured => "not measured yet",
        }
    }
}

/// One line of the results table.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// Stable identifier (JSON key, notes).
    pub id: String,
    pub name: String,
    pub unit: String,
    pub better: Better,
    pub measured: Measured,
    pub targets: Vec<Target>,
    /// How it was measured, or why it was not.
    pub method: String,
}

impl BenchRow {
    pub fn not_measured(
        id: &str,
        name: &str,
        unit: &str,
        better: Better,
        targets: Vec<Target>,
        why: &str,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            unit: unit.into(),
            better,
            measured: Measured::NotMeasured(why.into()),
            targets,
            method: why.into(),
        }
    }

    fn medians(&self) -> [Option<f64>; 3] {
        match &self.measured {
            Measured::Compared(s) => [s[0].median(), s[1].median(), s[2].median()],
            Measured::Own(s) => [None, None, s.median()],
            Measured::NotMeasured(_) => [None; 3],
        }
    }

    /// c/b and c/a for compared rows: per round, then the median over the rounds.
    pub fn ratios(&self) -> (Option<f64>, Option<f64>) {
        match &self.measured {
            Measured::Compared([a, b, c]) => (paired_ratio(c, b), paired_ratio(c, a)),
            _ => (None, None),
        }
    }

    pub fn outcome_of(&self, target: &Target) -> Outcome {
        let (cb, ca) = self.ratios();
        let x = match target.quantity {
            Quantity::RatioCB => cb,
            Quantity::RatioCA => ca,
            Quantity::Value => self.medians()[2],
        };
        match x {
            Some(x) if target.holds(x) => Outcome::Met,
            Some(_) => Outcome::Missed,
            None => Outcome::NotMeasured,
        }
    }

    /// The row's result: missed if any target is, not measured if any figure is missing,
    /// met if all are; `None` for rows without a target.
    pub fn outcome(&self) -> Option<Outcome> {
        if self.targets.is_empty() {
            return None;
        }
        let all: Vec<Outcome> = self.targets.iter().map(|t| self.outcome_of(t)).collect();
        Some(if all.contains(&Outcome::Missed) {
            Outcome::Missed
        } else if all.contains(&Outcome::NotMeasured) {
            Outcome::NotMeasured
        } else {
            Outcome::Met
        })
    }

    fn to_json(&self) -> Value {
        let measured = match &self.measured {
            Measured::NotMeasured(why) => json!({ "kind": "not_measured", "why": why }),
            Measured::Compared(s) => {
                let mut setups = serde_json::Map::new();
                for kind in SetupKind::ALL {
                    setups.insert(kind.letter().into(), s[kind.index()].to_json());
                }
                json!({ "kind": "compared", "setups": setups })
            }
            Measured::Own(s) => json!({ "kind": "own", "c": s.to_json() }),
        };
        let (cb, ca) = self.ratios();
        let [a, b, c] = self.medians();
        let of_medians = |n: Option<f64>, d: Option<f64>| match (n, d) {
            (Some(n), Some(d)) if d != 0.0 => Some(n / d),
            _ => None,
        };
        let per_round = |den: usize| match &self.measured {
            Measured::Compared(s) => per_round_ratios(&s[2], &s[den]),
            _ => vec![],
        };
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.describe(&self.unit),
                    "quantity": format!("{:?}", t.quantity),
                    "bound": format!("{:?}", t.bound),
                    "limit": t.limit,
                    "outcome": self.outcome_of(t).word(),
                })
            })
            .collect();
        json!({
            "id": self.id,
            "name": self.name,
            "unit": self.unit,
            "better": match self.better { Better::Higher => "higher", Better::Lower => "lower" },
            "measured": measured,
            "ratio_c_b": cb,
            "ratio_c_a": ca,
            "ratio_of_medians_c_b": of_medians(c, b),
            "ratio_of_medians_c_a": of_medians(c, a),
            "ratios_c_b_per_round": per_round(1),
            "ratios_c_a_per_round": per_round(0),
            "targets": targets,
            "outcome": self.outcome().map(Outcome::word),
            "method": self.method,
        })
    }
}

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

fn trim_number(v: f64) -> String {
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

    fn compared(a: &[f64], b: &[f64], c: &[f64]) -> Measured {
        let s = |v: &[f64]| Samples {
            values: v
                .iter()
                .copied()
                .enumerate()
                .map(|(i, x)| (i + 1, x))
                .collect(),
            errors: vec![],
        };
        Measured::Compared([s(a), s(b), s(c)])
    }

    fn row(measured: Measured, targets: Vec<Target>) -> BenchRow {
        BenchRow {
            id: "r".into(),
            name: "row".into(),
            unit: "Gbit/s".into(),
            better: Better::Higher,
            measured,
            targets,
            method: String::new(),
        }
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let r = row(
            compared(&[10.0, 12.0, 11.0], &[5.0, 4.0, 6.0], &[9.0, 9.0, 10.0]),
            vec![
                Target::ratio_cb_at_least(1.0),
                Target::ratio_ca_at_least(0.85),
            ],
        );
        // Per round c/b: 9/5, 9/4, 10/6 -> median 9/5; c/a: 9/10, 9/12, 10/11 -> 9/10.
        let (cb, ca) = r.ratios();
        assert!((cb.unwrap() - 9.0 / 5.0).abs() < 1e-9);
        assert!((ca.unwrap() - 9.0 / 10.0).abs() < 1e-9);
        assert_eq!(r.outcome_of(&r.targets[0]), Outcome::Met);
        assert_eq!(r.outcome_of(&r.targets[1]), Outcome::Met);
        let r = BenchRow {
            targets: vec![Target::ratio_ca_at_least(0.95)],
            ..r
        };
        assert_eq!(r.outcome_of(&r.targets[0]), Outcome::Missed);
        assert_eq!(r.outcome(), Some(Outcome::Missed));
    }

    #[test]
    fn ratios_pair_rounds_and_skip_failed_ones() {
        let mut c = Samples::default();
        let mut b = Samples::default();
        c.push(1, 2.0);
        b.push(1, 1.0);
        c.push(2, 3.0);
        b.fail(2, "iperf3 failed".into());
        c.push(3, 4.0);
        b.push(3, 1.0);
        assert_eq!(paired_ratio(&c, &b), Some(3.0));
    }

    #[test]
    fn unmeasured_rows_carry_no_number() {
        let r = BenchRow::not_measured(
            "x",
            "x",
            "s",
            Better::Lower,
            vec![Target::value_below(2.0)],
            "not yet",
        );
        assert_eq!(r.outcome(), Some(Outcome::NotMeasured));
        let report = Report {
            started: UNIX_EPOCH,
            elapsed: Duration::ZERO,
            machine: Machine::detect("test"),
            revision: "r".into(),
            options: json!({}),
            rounds_done: 0,
            setups: vec![],
            common: vec![],
            rows: vec![r],
            analysis: BTreeMap::new(),
            remarks: vec![],
        };
        let table = report.table();
        assert!(
            table.contains("| x | — | — | not measured yet | — | — | < 2 s | not measured yet |")
        );
        let json = report.to_json();
        assert_eq!(json["rows"][0]["measured"]["kind"], "not_measured");
        assert!(json["rows"][0]["ratio_c_b"].is_null());
    }

    #[test]
    fn own_rows_use_the_value() {
        let r = row(
            Measured::Own(Samples {
                values: vec![(1, 50.0), (2, 70.0), (3, 55.0)],
                errors: vec![],
            }),
            vec![Target::value_at_most(60.0)],
        );
        assert_eq!(r.outcome(), Some(Outcome::Met));
        assert_eq!(r.ratios(), (None, None));
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_573_118);
        assert_eq!(utc_timestamp(t), "2026-11-25T02:18:38Z");
    }
}
