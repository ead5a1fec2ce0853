//! The report: one table with both systems, their ratio and the SCM's targets, the
//! conditions of every run, the machine, the date and the exact command. The analysis
//! section (profiles, explanations of gaps) is maintained in `bench/analysis.md` and
//! copied in verbatim.

use std::fmt::Write as _;

use crate::workloads::{Conditions, Fanout, Rate, Reconnect, Storm, System, Throughput};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Clone)]
struct Row {
    workload: String,
    figure: String,
    scm: Option<f64>,
    mosq: Option<f64>,
    decimals: usize,
    better: Better,
    /// Target for the SCM and its text.
    target: Option<(f64, String)>,
    /// An extra condition for the target (e.g. zero loss), checked on the SCM's run.
    extra_ok: Option<bool>,
}

#[derive(Debug, Clone)]
struct RunLine {
    workload: String,
    system: &'static str,
    cond: Conditions,
    detail: String,
}

/// Results collected over the run.
#[derive(Debug)]
pub struct Report {
    command: String,
    quick: bool,
    started: time::OffsetDateTime,
    load_start: String,
    reniced: bool,
    /// `bench/analysis.md`.
    pub analysis: std::path::PathBuf,
    rows: Vec<Row>,
    runs: Vec<RunLine>,
}

impl Report {
    /// An empty report.
    pub fn new(
        command: &str,
        quick: bool,
        started: time::OffsetDateTime,
        load_start: String,
        reniced: bool,
    ) -> Report {
        Report {
            command: command.into(),
            quick,
            started,
            load_start,
            reniced,
            analysis: "bench/analysis.md".into(),
            rows: Vec::new(),
            runs: Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        sys: System,
        workload: &str,
        figure: &str,
        v: f64,
        decimals: usize,
        better: Better,
        target: Option<(f64, &str)>,
    ) {
        let row = match self
            .rows
            .iter_mut()
            .find(|r| r.workload == workload && r.figure == figure)
        {
            Some(r) => r,
            None => {
                self.rows.push(Row {
                    workload: workload.into(),
                    figure: figure.into(),
                    scm: None,
                    mosq: None,
                    decimals,
                    better,
                    target: target.map(|(v, t)| (v, t.to_string())),
                    extra_ok: None,
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        match sys {
            System::Scm => row.scm = Some(v),
            System::Mqtt => row.mosq = Some(v),
        }
    }

    fn extra(&mut self, workload: &str, figure: &str, ok: bool) {
        if let Some(r) = self
            .rows
            .iter_mut()
            .find(|r| r.workload == workload && r.figure == figure)
        {
            r.extra_ok = Some(ok);
        }
    }

    fn run(&mut self, sys: System, workload: &str, cond: Conditions, detail: String) {
        self.runs.push(RunLine {
            workload: workload.into(),
            system: sys.name(),
            cond,
            detail,
        });
    }

    /// A connection storm.
    pub fn storm(&mut self, sys: System, r: Storm) {
        let w = format!("1. connection storm, N = {}", fmt_int(r.n as f64));
        self.put(
            sys,
            &w,
            "connections/s",
            r.per_s,
            0,
            Better::Higher,
            Some((1600.0, "≥ 1,600")),
        );
        self.put(
            sys,
            &w,
            "server CPU ms per connection",
            r.cpu_ms_per_conn,
            3,
            Better::Lower,
            None,
        );
        if r.cpu_ms_per_conn > 0.0 {
            self.put(
                sys,
                &w,
                "one core's capacity, connections/s (1,000 / CPU ms per connection; derived)",
                1000.0 / r.cpu_ms_per_conn,
                0,
                Better::Higher,
                None,
            );
        }
        self.put(
            sys,
            &w,
            "server KiB per idle connection",
            r.kib_per_conn,
            1,
            Better::Lower,
            Some((16.0, "≤ 16")),
        );
        let detail = format!(
            "RSS {:.1} → {:.1} MiB; {} failed",
            r.rss_mib.0, r.rss_mib.1, r.failed
        );
        if r.failed > 0 {
            self.extra(&w, "connections/s", sys != System::Scm);
        }
        self.run(sys, &w, r.cond, detail);
    }

    /// A fixed-rate latency run.
    pub fn rate(&mut self, sys: System, r: Rate) {
        let w = format!(
            "2. swipe latency at {}/s (100 agents)",
            fmt_int(r.rate as f64)
        );
        let (t50, t99) = if r.rate == 1000 {
            (Some((80.0, "≤ 80")), Some((500.0, "≤ 500")))
        } else {
            (None, None)
        };
        self.put(sys, &w, "p50 µs", r.lat.p50, 0, Better::Lower, t50);
        self.put(sys, &w, "p99 µs", r.lat.p99, 0, Better::Lower, t99);
        self.put(sys, &w, "max µs", r.lat.max, 0, Better::Lower, None);
        self.put(
            sys,
            &w,
            "lost (of sent)",
            r.lost as f64,
            0,
            Better::Lower,
            None,
        );
        let detail = format!(
            "sent {}, acknowledged {}, refused {}, delivered {}; sender ticker late by up to {:.1} ms",
            r.sent, r.acked, r.nacked, r.delivered, r.ticker_late_ms
        );
        self.run(sys, &w, r.cond, detail);
    }

    /// The closed-loop maximum.
    pub fn max(&mut self, sys: System, r: Throughput, secs: u64, skip: u64, window: usize) {
        let w = format!("3. max acknowledged swipes (100 agents × {window} in flight, {secs} s)");
        self.put(
            sys,
            &w,
            "acknowledged/s",
            r.acked_per_s,
            0,
            Better::Higher,
            Some((80_000.0, "≥ 80,000, zero loss")),
        );
        self.put(
            sys,
            &w,
            "delivered/s",
            r.delivered_per_s,
            0,
            Better::Higher,
            None,
        );
        self.put(
            sys,
            &w,
            "lost (acknowledged, not delivered)",
            r.lost as f64,
            0,
            Better::Lower,
            None,
        );
        self.put(
            sys,
            &w,
            "latency p50 µs (queueing)",
            r.lat.p50,
            0,
            Better::Lower,
            None,
        );
        if r.acked_per_s > 0.0 {
            self.put(
                sys,
                &w,
                "server CPU µs per acknowledged event (derived)",
                r.cond.server_pct / 100.0 * 1e6 / r.acked_per_s,
                1,
                Better::Lower,
                None,
            );
        }
        if sys == System::Scm {
            let ok = r.lost == 0;
            self.extra(&w, "acknowledged/s", ok);
        }
        let detail = format!(
            "rates over seconds {skip}–{}: acknowledged {} and delivered {} in total, refused {}, latency p99 {:.0} µs",
            secs - 1,
            r.acked,
            r.delivered,
            r.nacked,
            r.lat.p99
        );
        self.run(sys, &w, r.cond, detail);
    }

    /// The fan-out.
    pub fn fanout(&mut self, sys: System, r: Fanout) {
        let w = format!("4. config fan-out, 2 KiB to {} agents", fmt_int(r.n as f64));
        self.put(
            sys,
            &w,
            "seconds until all ACKed",
            r.all_acked_s,
            3,
            Better::Lower,
            Some((1.5, "≤ 1.5")),
        );
        if sys == System::Scm {
            self.extra(&w, "seconds until all ACKed", r.acked == usize::from(r.n));
        }
        let detail = format!(
            "{} of {} ACKed; operator's command answered after {:.3} s",
            r.acked, r.n, r.reply_s
        );
        self.run(sys, &w, r.cond, detail);
    }

    /// The reconnect storm.
    pub fn reconnect(&mut self, sys: System, r: Reconnect) {
        let w = format!("5. reconnect storm, {} agents", fmt_int(r.n as f64));
        self.put(
            sys,
            &w,
            "seconds from kill until all back",
            r.from_kill_s,
            2,
            Better::Lower,
            Some((5.0, "≤ 5")),
        );
        self.put(
            sys,
            &w,
            "seconds from ready until all back",
            r.from_ready_s,
            2,
            Better::Lower,
            None,
        );
        if sys == System::Scm {
            self.extra(
                &w,
                "seconds from kill until all back",
                r.back == u64::from(r.n),
            );
        }
        let detail = format!(
            "{} of {} back; kill to restarted server ready {:.3} s",
            r.back, r.n, r.restart_s
        );
        self.run(sys, &w, r.cond, detail);
    }

    /// The results table (Markdown).
    pub fn table(&self) -> String {
        let mut t = String::new();
        t.push_str("| workload | figure | SCM | Mosquitto | SCM advantage | SCM target | met |\n");
        t.push_str("| --- | --- | ---: | ---: | ---: | --- | --- |\n");
        let mut last = String::new();
        for r in &self.rows {
            let w = if r.workload == last {
                String::new()
            } else {
                r.workload.clone()
            };
            last = r.workload.clone();
            let ratio = match (r.scm, r.mosq) {
                (Some(s), Some(m)) if s > 0.0 && m > 0.0 => {
                    let x = if r.better == Better::Higher {
                        s / m
                    } else {
                        m / s
                    };
                    format!("{x:.2}×")
                }
                (Some(s), Some(m)) if s == m => "equal".into(),
                _ => "—".into(),
            };
            let (target, met) = match (&r.target, r.scm) {
                (Some((v, text)), Some(s)) => {
                    let ok = match r.better {
                        Better::Higher => s >= *v,
                        Better::Lower => s <= *v,
                    } && r.extra_ok.unwrap_or(true);
                    (text.clone(), if ok { "yes" } else { "**no**" }.to_string())
                }
                _ => (String::new(), String::new()),
            };
            let _ = writeln!(
                t,
                "| {w} | {} | {} | {} | {ratio} | {target} | {met} |",
                r.figure,
                fmt_opt(r.scm, r.decimals),
                fmt_opt(r.mosq, r.decimals),
            );
        }
        t
    }

    /// The whole document.
    pub fn render(&self) -> String {
        let mut d = String::new();
        let date = self
            .started
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        d.push_str("# Benchmarks: the SCM and Mosquitto side by side\n\n");
        d.push_str(
            "This file is written by the benchmark program (`bench/`, binary `scm-bench`) from one real run; \
             do not edit the results by hand. The analysis at the end is maintained in `bench/analysis.md`.\n\n",
        );
        if self.quick {
            d.push_str("**This is a `--quick` smoke run: small counts and short durations. Its figures are not the benchmark.**\n\n");
        }
        let _ = writeln!(d, "- Date: {date}");
        let _ = writeln!(d, "- Command: `{}`", self.command);
        for (k, v) in crate::sys::machine_description() {
            let _ = writeln!(d, "- {k}: {v}");
        }
        let _ = writeln!(
            d,
            "- Load average at the start: {} (the machine is shared; the CPU other processes used during each run is listed below)",
            self.load_start
        );
        let _ = writeln!(
            d,
            "- Servers pinned to CPU 0{}, the load generator to CPU {} (one tokio thread)",
            if self.reniced { " at nice -15" } else { "" },
            crate::sys::own_cpus()
        );
        d.push_str("\n## Results\n\n");
        d.push_str(
            "\"SCM advantage\" is Mosquitto's figure over the SCM's where lower is better, and the SCM's over \
             Mosquitto's where higher is better: above 1× the SCM is ahead. Targets apply to the SCM.\n\n",
        );
        d.push_str(&self.table());
        d.push_str("\n## Conditions of each run\n\n");
        d.push_str(
            "\"other CPU\" is the CPU time used by every process except the server under test and the load \
             generator during the measured interval, in percent of one core (200% = both cores). Runs with a \
             high figure there are contended: their tails and rates are worse than the systems can do.\n\n",
        );
        d.push_str("| workload | system | load avg at start | other CPU | server CPU | details | server warnings |\n");
        d.push_str("| --- | --- | --- | ---: | ---: | --- | --- |\n");
        for r in &self.runs {
            let log = r
                .cond
                .server_log
                .iter()
                .map(|l| l.replace('|', "/").chars().take(200).collect::<String>())
                .collect::<Vec<_>>()
                .join("<br>");
            let _ = writeln!(
                d,
                "| {} | {} | {} | {:.0}% | {:.0}% | {} | {} |",
                r.workload,
                r.system,
                r.cond.load,
                r.cond.other_pct,
                r.cond.server_pct,
                r.detail,
                log
            );
        }
        d.push('\n');
        // Read at run time, so the analysis can be revised without rebuilding.
        match std::fs::read_to_string(&self.analysis) {
            Ok(a) => d.push_str(&a),
            Err(e) => {
                let _ = writeln!(
                    d,
                    "(analysis not included: cannot read {}: {e})",
                    self.analysis.display()
                );
            }
        }
        d
    }
}

fn fmt_int(v: f64) -> String {
    let s = format!("{:.0}", v);
    let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        None => "—".into(),
        Some(v) if decimals == 0 => fmt_int(v),
        Some(v) => format!("{v:.decimals$}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(fmt_int(1234567.0), "1,234,567");
        assert_eq!(fmt_int(999.0), "999");
        assert_eq!(fmt_int(1000.0), "1,000");
    }
}
