//! The five workloads, each run against a fresh SCM and a fresh Mosquitto with the same
//! clients, the same counts and the same timings. See docs/benchmarks.md for what each
//! measures and how the MQTT side mirrors the SCM side.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use scm_common::lock::LockExt;
use scm_proto::v1::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, WriteHalf};
use tokio::task::JoinSet;

use crate::agents::{self, ScmLink, Tls};
use crate::mqtt::{self, Packet};
use crate::servers::{Launch, Server};
use crate::setup::{self, Pki, ScmRun};
use crate::sys::{self, OtherCpu};

/// Which server is under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// The SCM hub.
    Scm,
    /// Mosquitto over mutual TLS.
    Mqtt,
}

impl System {
    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            System::Scm => "SCM",
            System::Mqtt => "Mosquitto",
        }
    }
}

/// Everything the workloads share.
pub struct Ctx {
    /// Certificates.
    pub pki: Arc<Pki>,
    /// Client TLS configurations, index `id - 1`.
    pub connectors: Arc<Vec<tokio_rustls::TlsConnector>>,
    /// How servers are started.
    pub launch: Launch,
    /// Scratch directory.
    pub work: PathBuf,
    runs: AtomicU64,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("work", &self.work)
            .finish_non_exhaustive()
    }
}

/// The conditions of one measured run.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    /// /proc/loadavg at the start.
    pub load: String,
    /// CPU used by processes other than the server and the load generator, % of a core.
    pub other_pct: f64,
    /// Server CPU over the run, % of a core.
    pub server_pct: f64,
    /// Warnings or errors the server logged (first few).
    pub server_log: Vec<String>,
}

impl Ctx {
    /// A context; builds one TLS client configuration per machine certificate.
    pub fn new(pki: Pki, launch: Launch, work: PathBuf) -> anyhow::Result<Ctx> {
        let connectors = (1..=pki.machines())
            .map(|id| pki.client(id))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Ctx {
            pki: Arc::new(pki),
            connectors: Arc::new(connectors),
            launch,
            work,
            runs: AtomicU64::new(0),
        })
    }

    fn connector(&self, id: u16) -> tokio_rustls::TlsConnector {
        self.connectors[usize::from(id) - 1].clone()
    }

    fn run_dir(&self, what: &str) -> PathBuf {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        self.work.join(format!("{n:02}-{what}"))
    }

    /// Starts a fresh server: the SCM with `run` (its agents port is filled in), or
    /// Mosquitto on a free port.
    async fn start(
        &self,
        sys: System,
        mut run: ScmRun,
        what: &str,
    ) -> anyhow::Result<(Server, String, StartSpec)> {
        let dir = self.run_dir(&format!("{what}-{}", sys.name().to_lowercase()));
        if run.agents_port == 0 {
            run.agents_port = setup::free_port()?;
        }
        let spec = StartSpec { sys, dir, run };
        let server = spec.start(self).await?;
        let addr = match sys {
            System::Scm => server.addr("agents")?,
            System::Mqtt => server.addr("mqtt")?,
        };
        Ok((server, addr, spec))
    }
}

/// How to (re)start one server.
#[derive(Debug, Clone)]
struct StartSpec {
    sys: System,
    dir: PathBuf,
    run: ScmRun,
}

impl StartSpec {
    async fn start(&self, ctx: &Ctx) -> anyhow::Result<Server> {
        match self.sys {
            System::Scm => {
                let cfg = setup::scm_config(&self.dir, &ctx.pki, &self.run)?;
                ctx.launch.scm(&cfg, setup::scm_listeners(&self.run)).await
            }
            System::Mqtt => {
                let cfg = setup::mosquitto_config(&self.dir, &ctx.pki, self.run.agents_port)?;
                ctx.launch
                    .mosquitto(&cfg, &format!("127.0.0.1:{}", self.run.agents_port))
                    .await
            }
        }
    }
}

fn scm_run(machines: u16, generic: u16) -> ScmRun {
    ScmRun {
        machines,
        generic,
        agents_port: 0,
        telnet_tls: false,
    }
}

fn log_of(server: &Server) -> Vec<String> {
    server
        .log_tail
        .lock()
        .map(|t| t.iter().take(5).cloned().collect())
        .unwrap_or_default()
}

/// An open connection, kept idle.
#[allow(dead_code)]
enum Conn {
    Scm(ScmLink),
    Mqtt(Box<Tls>),
}

async fn connect_one(
    ctx_conn: tokio_rustls::TlsConnector,
    sys: System,
    addr: &str,
    id: u16,
) -> anyhow::Result<Conn> {
    Ok(match sys {
        System::Scm => Conn::Scm(agents::scm_connect(&ctx_conn, addr, id, 0).await?),
        System::Mqtt => Conn::Mqtt(Box::new(
            agents::mqtt_connect(&ctx_conn, addr, &format!("agent-{id}")).await?,
        )),
    })
}

// ---------------------------------------------------------------------------------------
// 1. Connection storm

/// Results of a connection storm.
#[derive(Debug, Clone, Default)]
pub struct Storm {
    /// Agents.
    pub n: u16,
    /// Connections per second (all connected / wall time).
    pub per_s: f64,
    /// Server CPU per connection, ms.
    pub cpu_ms_per_conn: f64,
    /// Server memory per idle connection, KiB.
    pub kib_per_conn: f64,
    /// Server RSS before and after, MiB.
    pub rss_mib: (f64, f64),
    /// Connections that failed.
    pub failed: usize,
    /// Run conditions.
    pub cond: Conditions,
}

/// N agents connect (at most 100 handshakes in flight) and complete HELLO/ACK or
/// CONNECT/CONNACK; then the server's memory is read after `settle`.
pub async fn storm(ctx: &Ctx, sys: System, n: u16, settle: Duration) -> anyhow::Result<Storm> {
    let (server, addr, _) = ctx.start(sys, scm_run(n, 0), &format!("storm{n}")).await?;
    let load = sys::loadavg();
    let rss0 = server.rss_kib();
    let cpu0 = server.cpu_ms();
    let other = OtherCpu::start(cpu0 + sys::self_cpu_ms());
    let sem = Arc::new(tokio::sync::Semaphore::new(100));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for id in 1..=n {
        let sem = sem.clone();
        let c = ctx.connector(id);
        let addr = addr.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            connect_one(c, sys, &addr, id).await
        });
    }
    let mut conns = Vec::with_capacity(usize::from(n));
    let mut failed = 0;
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => {
                failed += 1;
                first_err.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu1 = server.cpu_ms();
    let other_pct = other.percent(cpu1 + sys::self_cpu_ms());
    tokio::time::sleep(settle).await;
    let rss1 = server.rss_kib();
    let mut log = log_of(&server);
    if let Some(e) = first_err {
        log.insert(0, format!("first failed connection: {e}"));
    }
    server.kill().await;
    drop(conns);
    let ok = (usize::from(n) - failed).max(1) as f64;
    Ok(Storm {
        n,
        per_s: ok / wall,
        cpu_ms_per_conn: (cpu1 - cpu0) / ok,
        kib_per_conn: (rss1 as f64 - rss0 as f64) / ok,
        rss_mib: (rss0 as f64 / 1024.0, rss1 as f64 / 1024.0),
        failed,
        cond: Conditions {
            load,
            other_pct,
            server_pct: (cpu1 - cpu0) / (wall * 1000.0) * 100.0,
            server_log: log,
        },
    })
}

// ---------------------------------------------------------------------------------------
// Event tracking shared by the swipe workloads

/// Per-event send and delivery times, indexed by sequence number.
struct Track {
    t0: Instant,
    /// Nanoseconds since `t0` + 1 when sent (0: not sent).
    sent: Vec<AtomicU64>,
    /// Latency in ns + 1 when delivered (0: not delivered).
    lat: Vec<AtomicU64>,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    first_nack: std::sync::Mutex<Option<String>>,
}

impl Track {
    fn new(cap: usize) -> Arc<Track> {
        Arc::new(Track {
            t0: Instant::now(),
            sent: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            lat: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            first_nack: std::sync::Mutex::new(None),
        })
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn mark_sent(&self, seq: u64) {
        if let Some(s) = self.sent.get(seq as usize) {
            s.store(self.now_ns() + 1, Ordering::Relaxed);
        }
    }

    fn mark_delivered(&self, seq: u64) {
        let now = self.now_ns();
        let (Some(s), Some(l)) = (self.sent.get(seq as usize), self.lat.get(seq as usize)) else {
            return;
        };
        let sent = s.load(Ordering::Relaxed);
        if sent == 0 {
            return;
        }
        let lat = now.saturating_sub(sent - 1) + 1;
        if l.compare_exchange(0, lat, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn nack(&self, text: String) {
        self.nacked.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_nack.lock_unpoisoned();
        f.get_or_insert(text);
    }

    /// Latencies (µs) of the events in `range` that were delivered, sorted.
    fn latencies_us(&self, range: std::ops::Range<u64>) -> Vec<f64> {
        let mut v: Vec<f64> = range
            .filter_map(|i| self.lat.get(i as usize))
            .map(|l| l.load(Ordering::Relaxed))
            .filter(|l| *l != 0)
            .map(|l| (l - 1) as f64 / 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

fn percentiles(v: &[f64]) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

/// The sending side of the 100 event sources.
enum Senders {
    Scm(Vec<(u16, WriteHalf<Tls>)>),
    Mqtt(Vec<(u16, WriteHalf<Tls>, u16)>),
}

impl Senders {
    fn len(&self) -> usize {
        match self {
            Senders::Scm(v) => v.len(),
            Senders::Mqtt(v) => v.len(),
        }
    }

    async fn send(&mut self, seq: u64, track: &Track) -> anyhow::Result<()> {
        let n = self.len();
        let i = (seq % n as u64) as usize;
        match self {
            Senders::Scm(v) => {
                let (id, w) = &mut v[i];
                let f = agents::swipe_frame(*id, seq, seq + 2);
                track.mark_sent(seq);
                scm_proto::io::write_frame(w, &f).await?;
            }
            Senders::Mqtt(v) => {
                let (id, w, pid) = &mut v[i];
                *pid = pid.wrapping_add(1).max(1);
                let p = mqtt::publish(*pid, &format!("ev/{id}"), &payload(seq, track));
                track.mark_sent(seq);
                w.write_all(&p).await?;
                w.flush().await?;
            }
        }
        Ok(())
    }
}

/// The 30-byte event: send time (ns), sequence number, 14 filler bytes.
fn payload(seq: u64, track: &Track) -> [u8; 30] {
    let mut p = [b'x'; 30];
    p[..8].copy_from_slice(&track.now_ns().to_be_bytes());
    p[8..16].copy_from_slice(&seq.to_be_bytes());
    p
}

/// A swipe set-up: 100 agents (or publishers) whose answers are counted, and the
/// receivers (print-server simulators, or one MQTT subscriber) that record deliveries.
struct EventRig {
    server: Server,
    tasks: JoinSet<()>,
    senders: Option<Senders>,
    /// Whole links for the closed-loop run (SCM) or streams (MQTT).
    links: Vec<(u16, LinkParts)>,
}

enum LinkParts {
    Scm(ScmLink),
    Mqtt(Box<Tls>),
}

async fn event_rig(
    ctx: &Ctx,
    sys: System,
    agents_n: u16,
    track: &Arc<Track>,
    what: &str,
    split: bool,
) -> anyhow::Result<EventRig> {
    let (server, addr, _) = ctx.start(sys, scm_run(agents_n, agents_n), what).await?;
    let mut tasks = JoinSet::new();
    // Receivers first, so nothing waits for them.
    match sys {
        System::Scm => {
            for id in 1..=agents_n {
                let a = server.addr(&format!("generic {id}/r1"))?;
                let tcp = tokio::net::TcpStream::connect(&a)
                    .await
                    .with_context(|| format!("print server to {a}"))?;
                tcp.set_nodelay(true)?;
                let track = track.clone();
                tasks.spawn(async move {
                    let mut r = BufReader::new(tcp);
                    let mut line = Vec::with_capacity(80);
                    loop {
                        line.clear();
                        match r.read_until(b'\n', &mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let text = std::str::from_utf8(&line).unwrap_or("").trim();
                        if let Ok(seq) = text.parse::<u64>() {
                            track.mark_delivered(seq);
                        }
                    }
                });
            }
        }
        System::Mqtt => {
            let mut sub = agents::mqtt_connect(&ctx.connector(1), &addr, "subscriber").await?;
            sub.write_all(&mqtt::subscribe(1, "ev/#")).await?;
            sub.flush().await?;
            match mqtt::read_packet(&mut sub).await? {
                Some(Packet::SubAck) => {}
                p => bail!("expected SUBACK, got {p:?}"),
            }
            let track = track.clone();
            tasks.spawn(async move {
                while let Ok(Some(p)) = mqtt::read_packet(&mut sub).await {
                    if let Packet::Publish { pid, payload, .. } = p {
                        if payload.len() >= 16 {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(&payload[8..16]);
                            track.mark_delivered(u64::from_be_bytes(b));
                        }
                        if pid != 0 && sub.write_all(&mqtt::puback(pid)).await.is_err() {
                            return;
                        }
                        let _ = sub.flush().await;
                    }
                }
            });
        }
    }
    let mut scm_senders = Vec::new();
    let mut mqtt_senders = Vec::new();
    let mut links = Vec::new();
    for id in 1..=agents_n {
        let c = ctx.connector(id);
        match sys {
            System::Scm => {
                let link = agents::scm_connect(&c, &addr, id, 0).await?;
                if split {
                    let ScmLink { mut reader, writer } = link;
                    let track = track.clone();
                    tasks.spawn(async move {
                        while let Ok(Some(f)) =
                            reader.read_frame(None, Duration::from_secs(30)).await
                        {
                            match Message::decode(&f) {
                                Ok(Message::Ack(_)) => {
                                    track.acked.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(Message::Nack(n)) => track.nack(format!(
                                    "{} ({})",
                                    n.detail,
                                    n.reason().as_str_name()
                                )),
                                _ => {}
                            }
                        }
                    });
                    scm_senders.push((id, writer));
                } else {
                    links.push((id, LinkParts::Scm(link)));
                }
            }
            System::Mqtt => {
                let s = agents::mqtt_connect(&c, &addr, &format!("pub{id}")).await?;
                if split {
                    let (mut r, w) = tokio::io::split(s);
                    let track = track.clone();
                    tasks.spawn(async move {
                        while let Ok(Some(p)) = mqtt::read_packet(&mut r).await {
                            if let Packet::PubAck = p {
                                track.acked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                    mqtt_senders.push((id, w, 0u16));
                } else {
                    links.push((id, LinkParts::Mqtt(Box::new(s))));
                }
            }
        }
    }
    let senders = if !split {
        None
    } else if sys == System::Scm {
        Some(Senders::Scm(scm_senders))
    } else {
        Some(Senders::Mqtt(mqtt_senders))
    };
    Ok(EventRig {
        server,
        tasks,
        senders,
        links,
    })
}

/// Waits (bounded) until `cond` holds, checking every millisecond.
async fn wait_until(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cond()
}

// ---------------------------------------------------------------------------------------
// 2. Swipe latency at a fixed rate

/// Results of a fixed-rate run.
#[derive(Debug, Clone, Default)]
pub struct Rate {
    /// Target rate, events/s.
    pub rate: u64,
    /// Sent.
    pub sent: u64,
    /// Acknowledged (ACK / PUBACK).
    pub acked: u64,
    /// Refused (NACK).
    pub nacked: u64,
    /// Delivered to the print server / subscriber.
    pub delivered: u64,
    /// Sent but not delivered within the drain time.
    pub lost: u64,
    /// Latency, µs.
    pub lat: Percentiles,
    /// How late the sender's 1 ms ticker ran at worst, ms.
    pub ticker_late_ms: f64,
    /// Run conditions.
    pub cond: Conditions,
}

/// 100 agents send `rate` events/s in total for `secs`, open loop (1 ms ticker, events
/// spread round-robin, a late tick sends what is due); then up to 5 s to drain.
pub async fn rate(ctx: &Ctx, sys: System, rate: u64, secs: u64) -> anyhow::Result<Rate> {
    let agents_n = 100;
    let warm = u64::from(agents_n);
    let total = rate * secs;
    let track = Track::new((warm + total) as usize);
    let mut rig = event_rig(ctx, sys, agents_n, &track, &format!("rate{rate}"), true).await?;
    let mut senders = rig.senders.take().context("senders")?;
    // Warm-up: one event per agent, so every path (and every print-server connection)
    // has carried one before the clock starts.
    for seq in 0..warm {
        senders.send(seq, &track).await?;
    }
    if !wait_until(Duration::from_secs(10), || {
        track.delivered.load(Ordering::Relaxed) >= warm
    })
    .await
    {
        bail!(
            "{}: only {} of {warm} warm-up events arrived; server log: {:?}",
            sys.name(),
            track.delivered.load(Ordering::Relaxed),
            log_of(&rig.server)
        );
    }
    let load = sys::loadavg();
    let cpu0 = rig.server.cpu_ms();
    let other = OtherCpu::start(cpu0 + sys::self_cpu_ms());
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut late = Duration::ZERO;
    let mut last = Instant::now();
    while sent < total {
        tick.tick().await;
        let now = Instant::now();
        late = late.max(
            now.duration_since(last)
                .saturating_sub(Duration::from_millis(1)),
        );
        last = now;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            senders.send(warm + sent, &track).await?;
            sent += 1;
        }
    }
    let send_wall = start.elapsed().as_secs_f64();
    wait_until(Duration::from_secs(5), || {
        track.delivered.load(Ordering::Relaxed) >= warm + total
            && track.acked.load(Ordering::Relaxed) + track.nacked.load(Ordering::Relaxed)
                >= warm + total
    })
    .await;
    let cpu1 = rig.server.cpu_ms();
    let other_pct = other.percent(cpu1 + sys::self_cpu_ms());
    let delivered = track.delivered.load(Ordering::Relaxed) - warm;
    let mut log = log_of(&rig.server);
    if let Some(n) = track.first_nack.lock().ok().and_then(|f| f.clone()) {
        log.insert(0, format!("first NACK: {n}"));
    }
    let lat = percentiles(&track.latencies_us(warm..warm + total));
    rig.tasks.abort_all();
    rig.server.kill().await;
    Ok(Rate {
        rate,
        sent: total,
        acked: track.acked.load(Ordering::Relaxed).saturating_sub(warm),
        nacked: track.nacked.load(Ordering::Relaxed),
        delivered,
        lost: total - delivered.min(total),
        lat,
        ticker_late_ms: late.as_secs_f64() * 1000.0,
        cond: Conditions {
            load,
            other_pct,
            server_pct: (cpu1 - cpu0) / (send_wall * 1000.0) * 100.0,
            server_log: log,
        },
    })
}

// ---------------------------------------------------------------------------------------
// 3. Maximum acknowledged throughput

/// Results of the closed-loop throughput run.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    /// Acknowledged events per second over the measuring window.
    pub acked_per_s: f64,
    /// Delivered events per second over the same window.
    pub delivered_per_s: f64,
    /// Acknowledged in total.
    pub acked: u64,
    /// Delivered in total (after the drain).
    pub delivered: u64,
    /// Refused (NACK, e.g. BUSY).
    pub nacked: u64,
    /// Acknowledged but never delivered.
    pub lost: u64,
    /// Latency, µs.
    pub lat: Percentiles,
    /// Run conditions.
    pub cond: Conditions,
}

/// 100 agents, each with `window` events in flight (a new one as soon as one is
/// acknowledged), for `secs`; rates counted from `skip` s to `secs - 1` s; then a drain.
pub async fn throughput(
    ctx: &Ctx,
    sys: System,
    secs: u64,
    skip: u64,
    window: usize,
) -> anyhow::Result<Throughput> {
    let agents_n = 100u16;
    let cap = 400_000 * secs as usize;
    let track = Track::new(cap);
    let mut rig = event_rig(ctx, sys, agents_n, &track, "max", false).await?;
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for (id, link) in std::mem::take(&mut rig.links) {
        let (track, next, stop) = (track.clone(), next.clone(), stop.clone());
        workers.spawn(async move {
            let r = closed_loop(id, link, window, cap as u64, &track, &next, &stop).await;
            if let Err(e) = r {
                track.nack(format!("agent {id}: {e:#}"));
            }
        });
    }
    let load = sys::loadavg();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(skip)).await;
    let (a0, d0, c0, s0) = (
        track.acked.load(Ordering::Relaxed),
        track.delivered.load(Ordering::Relaxed),
        rig.server.cpu_ms(),
        sys::self_cpu_ms(),
    );
    let other = OtherCpu::start(c0 + s0);
    let w0 = Instant::now();
    tokio::time::sleep_until((t0 + Duration::from_secs(secs - 1)).into()).await;
    let (a1, d1, c1) = (
        track.acked.load(Ordering::Relaxed),
        track.delivered.load(Ordering::Relaxed),
        rig.server.cpu_ms(),
    );
    let dt = w0.elapsed().as_secs_f64();
    let other_pct = other.percent(c1 + sys::self_cpu_ms());
    tokio::time::sleep_until((t0 + Duration::from_secs(secs)).into()).await;
    stop.store(true, Ordering::Relaxed);
    let drain = tokio::time::timeout(Duration::from_secs(10), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
    let acked = track.acked.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(5), || {
        track.delivered.load(Ordering::Relaxed) >= acked
    })
    .await;
    let delivered = track.delivered.load(Ordering::Relaxed);
    let sent = next.load(Ordering::Relaxed).min(cap as u64);
    let lat = percentiles(&track.latencies_us(0..sent));
    let mut log = log_of(&rig.server);
    if drain.is_err() {
        log.insert(
            0,
            "some agents still had unanswered events 10 s after the end".into(),
        );
    }
    if let Some(n) = track.first_nack.lock().ok().and_then(|f| f.clone()) {
        log.insert(0, format!("first NACK or error: {n}"));
    }
    rig.tasks.abort_all();
    rig.server.kill().await;
    // An event is lost if it was acknowledged and never delivered.
    let mut lost = 0;
    for i in 0..sent as usize {
        if track.sent[i].load(Ordering::Relaxed) != 0 && track.lat[i].load(Ordering::Relaxed) == 0 {
            lost += 1;
        }
    }
    let lost = lost.min(acked);
    Ok(Throughput {
        acked_per_s: (a1 - a0) as f64 / dt,
        delivered_per_s: (d1 - d0) as f64 / dt,
        acked,
        delivered,
        nacked: track.nacked.load(Ordering::Relaxed),
        lost,
        lat,
        cond: Conditions {
            load,
            other_pct,
            server_pct: (c1 - c0) / (dt * 1000.0) * 100.0,
            server_log: log,
        },
    })
}

async fn closed_loop(
    id: u16,
    link: LinkParts,
    window: usize,
    cap: u64,
    track: &Track,
    next: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut inflight = 0usize;
    match link {
        LinkParts::Scm(ScmLink {
            mut reader,
            mut writer,
        }) => loop {
            while inflight < window && !stop.load(Ordering::Relaxed) {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= cap {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                track.mark_sent(seq);
                scm_proto::io::write_frame(&mut writer, &agents::swipe_frame(id, seq, seq + 2))
                    .await?;
                inflight += 1;
            }
            if inflight == 0 {
                return Ok(());
            }
            let f = reader
                .read_frame(Some(Duration::from_secs(10)), Duration::from_secs(10))
                .await?
                .context("the SCM closed the link")?;
            inflight -= 1;
            match Message::decode(&f)? {
                Message::Ack(_) => {
                    track.acked.fetch_add(1, Ordering::Relaxed);
                }
                Message::Nack(n) => {
                    track.nack(format!("{} ({})", n.detail, n.reason().as_str_name()))
                }
                _ => inflight += 1,
            }
        },
        LinkParts::Mqtt(mut s) => {
            let mut pid = 0u16;
            loop {
                let mut batch = Vec::new();
                while inflight < window && !stop.load(Ordering::Relaxed) {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= cap {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    pid = pid.wrapping_add(1).max(1);
                    track.mark_sent(seq);
                    s.write_all(&mqtt::publish(
                        pid,
                        &format!("ev/{id}"),
                        &payload(seq, track),
                    ))
                    .await?;
                    inflight += 1;
                    batch.push(seq);
                }
                if !batch.is_empty() {
                    s.flush().await?;
                }
                if inflight == 0 {
                    return Ok(());
                }
                match tokio::time::timeout(Duration::from_secs(10), mqtt::read_packet(&mut s))
                    .await??
                {
                    Some(Packet::PubAck) => {
                        inflight -= 1;
                        track.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => bail!("the broker closed the connection"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Config fan-out

/// Results of a fan-out.
#[derive(Debug, Clone, Default)]
pub struct Fanout {
    /// Agents.
    pub n: u16,
    /// Seconds from the push command until every agent had ACKed.
    pub all_acked_s: f64,
    /// Seconds until the operator's command returned (SCM) / the pusher counted every ack.
    pub reply_s: f64,
    /// Agents that ACKed.
    pub acked: usize,
    /// Run conditions.
    pub cond: Conditions,
}

/// A 2 KiB configuration, as text lines.
fn config_text() -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < 2048 - 40 {
        s.push_str(&format!("setting_{i:04} = \"value-{i:04}-abcdefghijkl\"\n"));
        i += 1;
    }
    while s.len() < 2047 {
        s.push('#');
    }
    s.push('\n');
    s
}

/// SCM: `push all` through the operator interface (backoffice over TLS telnet) to `n`
/// agents, each receiving its CONFIG over the link it holds to the SCM (the default
/// delivery), storing it durably ([`agents::store_durably`]) and ACKing it on the link.
/// MQTT: the pusher publishes the 2 KiB configuration at QoS 1 to each agent's topic
/// `cfg/<id>`; each agent stores it the same way and answers with a QoS 1 publish on
/// `ack/<id>`, and the pusher (subscribed to `ack/#`) counts them.
pub async fn fanout(ctx: &Ctx, sys: System, n: u16) -> anyhow::Result<Fanout> {
    let mut run = scm_run(n, 0);
    run.telnet_tls = sys == System::Scm;
    let (server, addr, spec) = ctx.start(sys, run, &format!("fanout{n}")).await?;
    let content = config_text();
    let store = spec.dir.join("agent-configs");
    std::fs::create_dir_all(&store)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let load;
    let (cpu0, other, t0);
    let reply_s;
    match sys {
        System::Scm => {
            for id in 1..=n {
                let link = agents::scm_connect(&ctx.connector(id), &addr, id, 0).await?;
                tasks.spawn(agents::link_configs(link, id, store.clone(), tx.clone()));
            }
            let bcfg = setup::backoffice_config(&spec.dir, &ctx.pki, &server.addr("telnet-tls")?)?;
            let bcfg = backoffice::config::BackofficeConfig::load(&bcfg, &Default::default())?;
            load = sys::loadavg();
            cpu0 = server.cpu_ms();
            other = OtherCpu::start(cpu0 + sys::self_cpu_ms());
            t0 = Instant::now();
            let push = tokio::spawn(async move {
                let mut c = backoffice::connect(&bcfg).await?;
                let r = c.push_to("all", &content, |_| {}).await?;
                let at = Instant::now();
                let _ = c.quit().await;
                anyhow::Ok((r, at))
            });
            let mut acked = 0usize;
            let mut config_bytes = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while acked < usize::from(n) {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(seen)) => {
                        acked += 1;
                        config_bytes = seen.bytes;
                    }
                    _ => break,
                }
            }
            let all = t0.elapsed().as_secs_f64();
            let (reply, at) = push.await??;
            reply_s = at.duration_since(t0).as_secs_f64();
            let cpu1 = server.cpu_ms();
            let mut log = log_of(&server);
            if reply.code >= 400 || acked < usize::from(n) {
                log.insert(0, format!("push reply: {} {}", reply.code, reply.last()));
            }
            if config_bytes != 2048 {
                log.insert(
                    0,
                    format!("the agents received {config_bytes} bytes instead of 2048"),
                );
            }
            let other_pct = other.percent(cpu1 + sys::self_cpu_ms());
            let wall = t0.elapsed().as_secs_f64();
            tasks.abort_all();
            server.kill().await;
            Ok(Fanout {
                n,
                all_acked_s: all,
                reply_s,
                acked,
                cond: Conditions {
                    load,
                    other_pct,
                    server_pct: (cpu1 - cpu0) / (wall * 1000.0) * 100.0,
                    server_log: log,
                },
            })
        }
        System::Mqtt => {
            let acks = Arc::new(AtomicU64::new(0));
            for id in 1..=n {
                let mut s =
                    agents::mqtt_connect(&ctx.connector(id), &addr, &format!("agent-{id}")).await?;
                s.write_all(&mqtt::subscribe(1, &format!("cfg/{id}")))
                    .await?;
                s.flush().await?;
                match mqtt::read_packet(&mut s).await? {
                    Some(Packet::SubAck) => {}
                    p => bail!("expected SUBACK, got {p:?}"),
                }
                let store = store.clone();
                tasks.spawn(async move {
                    while let Ok(Some(p)) = mqtt::read_packet(&mut s).await {
                        if let Packet::Publish { pid, payload, .. } = p {
                            let mut out = mqtt::puback(pid);
                            if payload.len() == 2048 {
                                if agents::store_durably(store.clone(), id, payload.to_vec())
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                out.extend(mqtt::publish(1, &format!("ack/{id}"), b"stored"));
                            }
                            if s.write_all(&out).await.is_err() || s.flush().await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
            let mut pusher = agents::mqtt_connect(&ctx.connector(1), &addr, "pusher").await?;
            pusher.write_all(&mqtt::subscribe(1, "ack/#")).await?;
            pusher.flush().await?;
            match mqtt::read_packet(&mut pusher).await? {
                Some(Packet::SubAck) => {}
                p => bail!("expected SUBACK, got {p:?}"),
            }
            let (mut r, mut w) = tokio::io::split(pusher);
            load = sys::loadavg();
            cpu0 = server.cpu_ms();
            other = OtherCpu::start(cpu0 + sys::self_cpu_ms());
            t0 = Instant::now();
            let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<u16>();
            let writer = tokio::spawn(async move {
                for id in 1..=n {
                    w.write_all(&mqtt::publish(id, &format!("cfg/{id}"), content.as_bytes()))
                        .await?;
                }
                w.flush().await?;
                while let Some(pid) = prx.recv().await {
                    w.write_all(&mqtt::puback(pid)).await?;
                    w.flush().await?;
                }
                anyhow::Ok(())
            });
            let acks2 = acks.clone();
            let got = tokio::time::timeout(Duration::from_secs(120), async {
                while acks2.load(Ordering::Relaxed) < u64::from(n) {
                    match mqtt::read_packet(&mut r).await {
                        Ok(Some(Packet::Publish { pid, topic, .. })) => {
                            if topic.starts_with("ack/") {
                                acks2.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = ptx.send(pid);
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
            })
            .await;
            let all = t0.elapsed().as_secs_f64();
            reply_s = all;
            let cpu1 = server.cpu_ms();
            let other_pct = other.percent(cpu1 + sys::self_cpu_ms());
            let mut log = log_of(&server);
            if got.is_err() {
                log.insert(0, "timed out waiting for the acks".into());
            }
            writer.abort();
            tasks.abort_all();
            server.kill().await;
            let _ = tx;
            Ok(Fanout {
                n,
                all_acked_s: all,
                reply_s,
                acked: acks.load(Ordering::Relaxed) as usize,
                cond: Conditions {
                    load,
                    other_pct,
                    server_pct: (cpu1 - cpu0) / (all * 1000.0) * 100.0,
                    server_log: log,
                },
            })
        }
    }
}

// ---------------------------------------------------------------------------------------
// 5. Reconnect storm

/// Results of a reconnect storm.
#[derive(Debug, Clone, Default)]
pub struct Reconnect {
    /// Agents.
    pub n: u16,
    /// Seconds from the kill until every agent had redone HELLO/ACK (CONNECT/CONNACK).
    pub from_kill_s: f64,
    /// Seconds from the restarted server being ready until every agent was back.
    pub from_ready_s: f64,
    /// Seconds the restart took (kill to ready).
    pub restart_s: f64,
    /// Agents back.
    pub back: u64,
    /// Run conditions.
    pub cond: Conditions,
}

/// The reconnect back-off of both kinds of agents: the machine agent's own (attempt `n`
/// waits a uniform random time in [b/2, b], b = min(500 ms × 2^n, 30 s)).
fn backoff(n: u32) -> Duration {
    machine_agent::link::backoff(n, Duration::from_millis(500), Duration::from_secs(30))
}

/// `n` agents connected; the server is killed with SIGKILL and started again at once;
/// every agent reconnects with the machine agent's jittered exponential back-off.
pub async fn reconnect(ctx: &Ctx, sys: System, n: u16) -> anyhow::Result<Reconnect> {
    let (mut server, addr, spec) = ctx
        .start(sys, scm_run(n, 0), &format!("reconnect{n}"))
        .await?;
    // Per agent: how many times it completed HELLO/ACK; `connects` counts agents that did
    // once, `back` agents that did twice (after the restart).
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let connects = Arc::new(AtomicU64::new(0));
    let back_n = Arc::new(AtomicU64::new(0));
    let mut agents = JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(100));
    for id in 1..=n {
        let (c, addr, connects) = (ctx.connector(id), addr.clone(), connects.clone());
        let (counts, back_n) = (counts.clone(), back_n.clone());
        let sem = sem.clone();
        agents.spawn(async move {
            let mut attempt = 0u32;
            let mut first = true;
            loop {
                // The first connection is made 100 at a time (as in the storm); the
                // reconnections are not throttled.
                let permit = if first {
                    Some(sem.clone().acquire_owned().await)
                } else {
                    None
                };
                let r = connect_one(c.clone(), sys, &addr, id).await;
                drop(permit);
                if let Ok(conn) = r {
                    first = false;
                    attempt = 0;
                    match counts[usize::from(id) - 1].fetch_add(1, Ordering::Relaxed) {
                        0 => connects.fetch_add(1, Ordering::Relaxed),
                        1 => back_n.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                    match conn {
                        Conn::Scm(mut l) => {
                            while let Ok(Some(_)) =
                                l.reader.read_frame(None, Duration::from_secs(60)).await
                            {
                            }
                        }
                        Conn::Mqtt(mut s) => {
                            while let Ok(Some(_)) = mqtt::read_packet(&mut s).await {}
                        }
                    }
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        });
    }
    let total = u64::from(n);
    if !wait_until(Duration::from_secs(180), || {
        connects.load(Ordering::Relaxed) >= total
    })
    .await
    {
        bail!(
            "{}: only {} of {n} agents connected",
            sys.name(),
            connects.load(Ordering::Relaxed)
        );
    }
    let load = sys::loadavg();
    let t_kill = Instant::now();
    server.kill9().await;
    let server = spec.start(ctx).await?;
    let restart_s = t_kill.elapsed().as_secs_f64();
    let cpu0 = server.cpu_ms();
    let other = OtherCpu::start(cpu0 + sys::self_cpu_ms());
    let t_ready = Instant::now();
    wait_until(Duration::from_secs(120), || {
        back_n.load(Ordering::Relaxed) >= total
    })
    .await;
    let from_kill_s = t_kill.elapsed().as_secs_f64();
    let from_ready_s = t_ready.elapsed().as_secs_f64();
    let cpu1 = server.cpu_ms();
    let other_pct = other.percent(cpu1 + sys::self_cpu_ms());
    let back = back_n.load(Ordering::Relaxed);
    let log = log_of(&server);
    server.kill().await;
    agents.abort_all();
    Ok(Reconnect {
        n,
        from_kill_s,
        from_ready_s,
        restart_s,
        back,
        cond: Conditions {
            load,
            other_pct,
            server_pct: (cpu1 - cpu0) / (from_ready_s * 1000.0) * 100.0,
            server_log: log,
        },
    })
}
