//! A small metrics registry: counters, gauges, fixed-bucket histograms and labelled
//! counter families on atomics, and a writer for the Prometheus text exposition format
//! (version 0.0.4).
//!
//! Each binary keeps its metrics in one struct (`scm::metrics`, `machine_agent::metrics`)
//! and renders them on `GET /metrics` (see [`crate::http`]). Label values must come from
//! small, bounded sets (outcomes, reasons, configured device names): never a card number,
//! a peer address or anything else a client chooses.

use std::collections::BTreeMap;
use std::fmt::{Display, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::lock::LockExt;

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets in seconds, 1 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (plus the implicit `+Inf`).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with these ascending upper bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counters keyed by the values of a fixed list of label names.
#[derive(Debug)]
pub struct CounterFamily {
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterFamily {
    /// A family with these label names.
    pub fn new(labels: &'static [&'static str]) -> Self {
        Self {
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// A family whose series for each of `presets` exist (at 0) from the start, so that
    /// dashboards and rate() see them before the first event.
    pub fn with(labels: &'static [&'static str], presets: &[&[&str]]) -> Self {
        let f = Self::new(labels);
        for p in presets {
            f.add(p, 0);
        }
        f
    }

    /// Adds one to the series with these label values (in label-name order).
    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1);
    }

    /// Adds `n` to the series with these label values.
    pub fn add(&self, values: &[&str], n: u64) {
        debug_assert_eq!(values.len(), self.labels.len(), "label count");
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let mut m = self.values.lock_unpoisoned();
        *m.entry(key).or_insert(0) += n;
    }

    /// The value of one series (0 if it does not exist).
    pub fn get(&self, values: &[&str]) -> u64 {
        let m = self.values.lock_unpoisoned();
        m.iter()
            .find(|(k, _)| k.iter().map(String::as_str).eq(values.iter().copied()))
            .map_or(0, |(_, v)| *v)
    }

    fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        let m = self.values.lock_unpoisoned();
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// The metric types of the exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`
    Counter,
    /// `gauge`
    Gauge,
    /// `histogram`
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Builds a text exposition, one metric family after the other.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes the `# HELP` and `# TYPE` lines of a family.
    pub fn header(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// Writes one sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, Kind::Counter, help);
        self.sample(name, &[], value);
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.header(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    /// A labelled counter family.
    pub fn family(&mut self, name: &str, help: &str, f: &CounterFamily) {
        self.header(name, Kind::Counter, help);
        for (values, v) in f.snapshot() {
            let labels: Vec<(&str, &str)> = f
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            self.sample(name, &labels, v);
        }
    }

    /// A histogram: cumulative `_bucket` lines, `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, b) in h.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match h.bounds.get(i) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_owned(),
            };
            self.sample(&bucket, &[("le", &le)], cumulative);
        }
        let sum = f64::from_bits(h.sum.load(Ordering::Relaxed));
        self.sample(&format!("{name}_sum"), &[], sum);
        // The +Inf bucket and the count agree even while observations race the render.
        self.sample(&format!("{name}_count"), &[], cumulative);
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_families() {
        let c = Counter::default();
        c.inc();
        c.add(2);
        let g = Gauge::default();
        g.inc();
        g.inc();
        g.dec();
        let f = CounterFamily::with(&["outcome"], &[&["ack"], &["nack"]]);
        f.inc(&["ack"]);
        f.inc(&["weird\"\\\nvalue"]);
        let mut e = Exposition::new();
        e.counter("x_total", "Things.", c.get());
        e.gauge("x_up", "Up.", g.get());
        e.family("x_outcomes_total", "By outcome.", &f);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_outcomes_total By outcome.\n# TYPE x_outcomes_total counter\n\
             x_outcomes_total{outcome=\"ack\"} 1\n\
             x_outcomes_total{outcome=\"nack\"} 0\n\
             x_outcomes_total{outcome=\"weird\\\"\\\\\\nvalue\"} 1\n"
        );
        assert_eq!(f.get(&["ack"]), 1);
        assert_eq!(f.get(&["missing"]), 0);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        static B: &[f64] = &[0.125, 1.0];
        let h = Histogram::new(B);
        h.observe(0.0625);
        h.observe(0.125);
        h.observe(0.5);
        h.observe_duration(Duration::from_secs(3));
        let mut e = Exposition::new();
        e.histogram("lat_seconds", "Latency.", &h);
        assert_eq!(
            e.finish(),
            "# HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{le=\"0.125\"} 2\n\
             lat_seconds_bucket{le=\"1\"} 3\n\
             lat_seconds_bucket{le=\"+Inf\"} 4\n\
             lat_seconds_sum 3.6875\n\
             lat_seconds_count 4\n"
        );
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn multi_label_families_keep_label_order() {
        let f = CounterFamily::new(&["listener", "reason"]);
        f.inc(&["agents", "unknown_ca"]);
        f.add(&["agents", "unknown_ca"], 2);
        let mut e = Exposition::new();
        e.family("h_total", "H.", &f);
        assert!(
            e.finish()
                .contains("h_total{listener=\"agents\",reason=\"unknown_ca\"} 3\n")
        );
    }
}
