//! Benchmark results as rows and their targets; [`output`] holds the whole run and
//! writes the two outputs, a Markdown table and a JSON file. Every figure in a row comes
//! from samples that were measured; a row that was not measured says so and never
//! carries a number.
mod output;

use serde_json::{json, Value};

use self::output::trim_number;
pub use self::output::{fmt_value, utc_timestamp, Machine, Report};

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
    /// The share of rounds whose own c/b meets the target's bound and limit; the target
    /// holds when that share is at least [`Target::share`].
    RoundsCB,
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
    /// For [`Quantity::RoundsCB`]: the share of rounds that must meet the limit.
    pub share: f64,
}

impl Target {
    pub fn ratio_cb_at_least(limit: f64) -> Self {
        Self {
            quantity: Quantity::RatioCB,
            bound: Bound::AtLeast,
            limit,
            share: 1.0,
        }
    }
    pub fn ratio_cb_at_most(limit: f64) -> Self {
        Self {
            quantity: Quantity::RatioCB,
            bound: Bound::AtMost,
            limit,
            share: 1.0,
        }
    }
    pub fn ratio_ca_at_least(limit: f64) -> Self {
        Self {
            quantity: Quantity::RatioCA,
            bound: Bound::AtLeast,
            limit,
            share: 1.0,
        }
    }
    pub fn value_at_most(limit: f64) -> Self {
        Self {
            quantity: Quantity::Value,
            bound: Bound::AtMost,
            limit,
            share: 1.0,
        }
    }
    pub fn value_below(limit: f64) -> Self {
        Self {
            quantity: Quantity::Value,
            bound: Bound::Below,
            limit,
            share: 1.0,
        }
    }

    /// c/b at least `limit` in at least `share` of the rounds (e.g. 6 of 8: 0.75): a
    /// median can hide a bad half of the rounds.
    pub fn rounds_cb_at_least(limit: f64, share: f64) -> Self {
        Self {
            quantity: Quantity::RoundsCB,
            bound: Bound::AtLeast,
            limit,
            share,
        }
    }

    /// "c/b ≥ 1.00", "≤ 60 ns", "< 2 s", "c/b ≥ 1.00 in ≥ 75% of rounds".
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
            Quantity::RoundsCB => format!(
                "c/b {op} {:.2} in ≥ {:.0}% of rounds",
                self.limit,
                self.share * 100.0
            ),
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
            Quantity::RoundsCB => return self.rounds_outcome(target),
        };
        match x {
            Some(x) if target.holds(x) => Outcome::Met,
            Some(_) => Outcome::Missed,
            None => Outcome::NotMeasured,
        }
    }

    fn rounds_outcome(&self, target: &Target) -> Outcome {
        let Measured::Compared([_, b, c]) = &self.measured else {
            return Outcome::NotMeasured;
        };
        let ratios = per_round_ratios(c, b);
        if ratios.is_empty() {
            return Outcome::NotMeasured;
        }
        let meeting = ratios.iter().filter(|r| target.holds(**r)).count();
        if meeting as f64 >= target.share * ratios.len() as f64 {
            Outcome::Met
        } else {
            Outcome::Missed
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
                    "share_of_rounds": (t.quantity == Quantity::RoundsCB).then_some(t.share),
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

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, UNIX_EPOCH},
    };

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
    fn a_share_of_rounds_target_counts_the_rounds_meeting_it() {
        let r = row(
            compared(
                &[1.0; 8],
                &[1.0; 8],
                &[1.1, 1.1, 1.1, 1.1, 1.1, 1.1, 0.9, 0.9],
            ),
            vec![Target::rounds_cb_at_least(1.0, 0.75)],
        );
        assert_eq!(r.outcome_of(&r.targets[0]), Outcome::Met);
        let r = row(
            compared(
                &[1.0; 8],
                &[1.0; 8],
                &[1.1, 1.1, 1.1, 1.1, 1.1, 0.9, 0.9, 0.9],
            ),
            vec![Target::rounds_cb_at_least(1.0, 0.75)],
        );
        assert_eq!(r.outcome_of(&r.targets[0]), Outcome::Missed);
        assert_eq!(
            r.targets[0].describe("Gbit/s"),
            "c/b ≥ 1.00 in ≥ 75% of rounds"
        );
    }
}
