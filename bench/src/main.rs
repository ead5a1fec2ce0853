//! `scm-bench`: runs the SCM and Mosquitto (mutual TLS MQTT, the usual alternative) on the
//! same workloads in one run, on this machine, and writes the side-by-side report
//! (docs/benchmarks.md). Started by `scripts/bench.sh`; `--quick` is the CI smoke run.
//!
//! Conditions for both systems: mutual TLS 1.3 with ECDSA P-256 certificates and X25519,
//! full handshakes (no resumption on either side), loopback only, the server pinned to
//! CPU 0 and this load generator to CPU 1 with a one-thread tokio runtime.

#![forbid(unsafe_code)]

mod agents;
mod mqtt;
mod report;
mod servers;
mod setup;
mod sys;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use workloads::{Ctx, System};

/// Benchmark the SCM against Mosquitto (mutual TLS) on the same workloads.
#[derive(Debug, Parser)]
#[command(name = "scm-bench")]
struct Cli {
    /// Smoke run: small counts and short durations (CI).
    #[arg(long)]
    quick: bool,
    /// The `scm` binary under test (build it with `cargo build --release -p scm`).
    #[arg(long, default_value = "target/release/scm")]
    scm_bin: PathBuf,
    /// The `mosquitto` binary (installed with apt-get if missing).
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: String,
    /// Where to write the report (Markdown). Nothing is written if absent.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The command line to record in the report.
    #[arg(long, default_value = "scripts/bench.sh")]
    command: String,
    /// Scratch directory for certificates, configurations and databases (default: a
    /// temporary directory, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Run only these workloads (comma-separated: storm,rate,max,fanout,reconnect).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// CPU the servers are pinned to.
    #[arg(long, default_value = "0")]
    server_cpu: String,
}

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Connection storm sizes.
    pub storm: Vec<u16>,
    /// Seconds to wait before reading the server's memory after a storm.
    pub settle: Duration,
    /// Fixed rates (events/s) and their duration (s).
    pub rates: Vec<(u64, u64)>,
    /// Closed-loop throughput: duration, seconds skipped at the start, window per agent.
    pub max: (u64, u64, usize),
    /// Fan-out sizes (agents).
    pub fanout: Vec<u16>,
    /// Reconnect-storm agents.
    pub reconnect: u16,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            storm: vec![1_000, 10_000],
            settle: Duration::from_secs(5),
            rates: vec![(1_000, 10), (10_000, 10)],
            max: (15, 3, 20),
            fanout: vec![1_000, 10_000],
            reconnect: 5_000,
        }
    }

    fn quick() -> Plan {
        Plan {
            storm: vec![200, 500],
            settle: Duration::from_millis(500),
            rates: vec![(1_000, 2), (10_000, 1)],
            max: (4, 1, 20),
            fanout: vec![100],
            reconnect: 300,
        }
    }

    fn machines(&self) -> u16 {
        self.storm
            .iter()
            .copied()
            .chain(self.fanout.iter().copied())
            .chain([self.reconnect, 100])
            .max()
            .unwrap_or(100)
    }
}

fn find_mosquitto(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(name);
    if p.components().count() > 1 {
        return p.exists().then_some(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .map(|d| PathBuf::from(d).join(name))
        .find(|c| c.is_file())
}

/// Finds mosquitto, installing Debian's package with apt-get if it is missing.
fn mosquitto(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = find_mosquitto(name) {
        return Ok(p);
    }
    eprintln!("mosquitto not found; installing Debian's package (apt-get install mosquitto)");
    let install = || {
        std::process::Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "mosquitto"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if !install().map(|s| s.success()).unwrap_or(false) {
        let _ = std::process::Command::new("apt-get").arg("update").status();
        let ok = install().map(|s| s.success()).unwrap_or(false);
        if !ok {
            bail!(
                "cannot install mosquitto with apt-get; install it (apt-get install mosquitto) and run again"
            );
        }
    }
    find_mosquitto(name).context("mosquitto was installed but is not on PATH or in /usr/sbin")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The load generator: one tokio thread (the script pins this process to CPU 1).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

fn wanted(cli: &Cli, name: &str) -> bool {
    cli.only.is_empty() || cli.only.iter().any(|o| o == name)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    scm_certs::tls::install_default_provider();
    let plan = if cli.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if !cli.scm_bin.is_file() {
        bail!(
            "{} does not exist; build it first: cargo build --release -p scm",
            cli.scm_bin.display()
        );
    }
    let mosq = mosquitto(&cli.mosquitto_bin)?;
    let need = u64::from(plan.machines()) + 1_000;
    let nofile = sys::nofile_limit();
    if nofile < need {
        bail!(
            "the open-file limit is {nofile}; this run needs {need}. Raise it first (ulimit -n {need}), or run scripts/bench.sh, which does"
        );
    }
    let renice = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let tmp;
    let work = match &cli.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let started_at = time::OffsetDateTime::now_utc();
    let load_start = sys::loadavg();
    eprintln!(
        "scm-bench: issuing {} machine certificates (ECDSA P-256)...",
        plan.machines()
    );
    let pki = setup::Pki::generate(&work.join("pki"), plan.machines())?;
    let launch = servers::Launch {
        scm_bin: std::fs::canonicalize(&cli.scm_bin)?,
        mosquitto_bin: mosq,
        server_cpu: cli.server_cpu.clone(),
        renice,
    };
    let ctx = Ctx::new(pki, launch, work.clone())?;
    let mut rep = report::Report::new(&cli.command, cli.quick, started_at, load_start, renice);
    let systems = [System::Scm, System::Mqtt];

    if wanted(&cli, "storm") {
        for &n in &plan.storm {
            for sys in systems {
                let r = workloads::storm(&ctx, sys, n, plan.settle)
                    .await
                    .with_context(|| format!("{} connection storm of {n}", sys.name()))?;
                eprintln!("storm {n} {}: {r:?}", sys.name());
                rep.storm(sys, r);
            }
        }
    }
    if wanted(&cli, "rate") {
        for &(rate, secs) in &plan.rates {
            for sys in systems {
                let r = workloads::rate(&ctx, sys, rate, secs)
                    .await
                    .with_context(|| format!("{} swipe latency at {rate}/s", sys.name()))?;
                eprintln!("rate {rate} {}: {r:?}", sys.name());
                rep.rate(sys, r);
            }
        }
    }
    if wanted(&cli, "max") {
        let (secs, skip, window) = plan.max;
        for sys in systems {
            let r = workloads::throughput(&ctx, sys, secs, skip, window)
                .await
                .with_context(|| format!("{} maximum throughput", sys.name()))?;
            eprintln!("max {}: {r:?}", sys.name());
            rep.max(sys, r, secs, skip, window);
        }
    }
    if wanted(&cli, "fanout") {
        for &n in &plan.fanout {
            for sys in systems {
                let r = workloads::fanout(&ctx, sys, n)
                    .await
                    .with_context(|| format!("{} config fan-out to {n}", sys.name()))?;
                eprintln!("fanout {n} {}: {r:?}", sys.name());
                rep.fanout(sys, r);
            }
        }
    }
    if wanted(&cli, "reconnect") {
        for sys in systems {
            let r = workloads::reconnect(&ctx, sys, plan.reconnect)
                .await
                .with_context(|| format!("{} reconnect storm", sys.name()))?;
            eprintln!("reconnect {}: {r:?}", sys.name());
            rep.reconnect(sys, r);
        }
    }
    let text = rep.render();
    println!("{}", rep.table());
    if let Some(out) = &cli.out {
        std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("scm-bench: report written to {}", out.display());
    }
    Ok(())
}
