//! The Generic network card reader bridge: the SCM plays the card reader ("terminal") of
//! PaperCut's Generic connection mode toward a print server.
//!
//! The print server is configured with one TCP address and port per device and connects
//! to the SCM. For each configured device (a machine id plus a reader id) the bridge:
//!
//! * listens on the device's own port and serves only peers on the device's allow list;
//! * reads and discards whatever the server sends (probe strings, `\r` keep-alives, the
//!   single-letter commands `v`, `e`, `b`) through a fixed [`READ_BUF`]-byte buffer, and
//!   answers a chunk whose last non-whitespace byte is `v` with `version_reply` + `\r`;
//! * writes `<card>\n` for each swipe routed to the device. It never writes any other
//!   LF-terminated text, because the server takes every such line as a card number;
//! * keeps the newest connection only: a new one replaces (closes) the current one;
//! * turns on TCP keep-alive and `TCP_USER_TIMEOUT`, and bounds every write by
//!   `write_timeout_ms`, so neither a half-open connection nor a server that never reads
//!   can hold the bridge.
//!
//! Swipes wait in a bounded per-device queue while no server is connected, until their
//! expiry instant; then they are dropped and reported [`Outcome::Expired`]. A swipe is
//! never written after it expired: expiry is checked right before writing, and a write
//! still in progress at the expiry instant is abandoned (and its connection closed, since
//! a partial line may have gone out).
//!
//! Card numbers are bearer tokens: they only appear masked in logs and `Debug` output.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use scm_common::ServeOptions;
use scm_common::card::mask;
use scm_common::lock::LockExt;
use scm_common::metrics::{Exposition, Kind};

use crate::bridges::{Bridge, BridgeSwipe, DeviceKey, Route, SubmitError, WriteLog};

mod flap;
mod stall;
#[cfg(test)]
mod tests;

use flap::{Admission, FlapGuard, FlapLimits};
use stall::{StallGuard, StallLimits, Verdict as StallVerdict};

/// Size of the buffer each connection reads the server's bytes into. Everything read is
/// discarded, so a connection never holds more than this much of the server's input.
pub(crate) const READ_BUF: usize = 1024;
/// Most swipes written to a print server in one write.
pub(crate) const WRITE_BATCH: usize = 64;

/// Longest reader id.
const MAX_READER_LEN: usize = 64;
/// Longest `version_reply`.
const MAX_VERSION_REPLY_LEN: usize = 64;
/// Largest `queue_max`.
const MAX_QUEUE: usize = 100_000;
/// Largest keep-alive idle time and interval (Linux's limit for `TCP_KEEPIDLE`/`TCP_KEEPINTVL`).
const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// Largest keep-alive probe count (Linux's limit for `TCP_KEEPCNT`).
const MAX_KEEPALIVE_RETRIES: u32 = 127;

fn default_version_reply() -> String {
    "SCM-Generic-1.0".into()
}

/// `[[generic]]` in the SCM configuration: one device.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct GenericDevice {
    /// The machine the device belongs to.
    pub machine: u16,
    /// The reader id on that machine (ASCII letters, digits, `-`, `_`, `.`; 1 to 64).
    pub reader: String,
    /// Where the print server connects, an IP address and port such as `0.0.0.0:7778`.
    pub listen: String,
    /// Print-server addresses allowed to connect; every other peer is closed at once.
    pub allow: Vec<IpAddr>,
    /// Answer to the server's `v` (version request), sent followed by `\r`. Empty: never
    /// answer.
    #[serde(default = "default_version_reply")]
    pub version_reply: String,
}

/// `[bridge]` in the SCM configuration: settings for every Generic device.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct BridgeSettings {
    /// Most swipes waiting per device; further swipes are refused.
    pub queue_max: usize,
    /// A write to the print server that takes longer closes the connection.
    pub write_timeout_ms: u64,
    /// Idle time before the first TCP keep-alive probe (whole seconds, rounded up).
    pub keepalive_idle_ms: u64,
    /// Time between keep-alive probes (whole seconds, rounded up).
    pub keepalive_interval_ms: u64,
    /// Unanswered probes before the connection is declared dead.
    pub keepalive_retries: u32,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged.
    pub user_timeout_ms: u64,
    /// Connections served at once per device listener.
    pub max_connections_per_device: usize,
    /// SO_SNDBUF of each print-server connection (Linux doubles it). Small on purpose: it
    /// bounds what waits in the SCM's kernel. It does not bound what the print server's
    /// kernel takes unread (see `stall_silence_ms` and docs/swipes.md).
    pub send_buffer_bytes: usize,
    /// Flapping: more than `flap_max_replacements` connections replacing each other
    /// within `flap_window_ms` (two print servers on one device)...
    pub flap_window_ms: u64,
    /// ...see `flap_window_ms`...
    pub flap_max_replacements: u32,
    /// ...keep the current connection this long and close newer ones at once.
    pub flap_hold_ms: u64,
    /// A print server that has sent nothing (not even its `\r` keep-alive) for longer is
    /// taken as not reading: cards are held back in the queue (and expire there) until it
    /// sends again. 0: off. Set it above the print server's keep-alive interval.
    pub stall_silence_ms: u64,
}

impl Default for BridgeSettings {
    fn default() -> Self {
        Self {
            queue_max: 64,
            write_timeout_ms: 5000,
            keepalive_idle_ms: 30_000,
            keepalive_interval_ms: 10_000,
            keepalive_retries: 3,
            user_timeout_ms: 30_000,
            max_connections_per_device: 4,
            send_buffer_bytes: 4096,
            flap_window_ms: 2000,
            flap_max_replacements: 5,
            flap_hold_ms: 3000,
            stall_silence_ms: 0,
        }
    }
}

/// Checks the devices and the settings. The error is `(key, message)`, with keys such as
/// `generic[2].listen` or `bridge.queue_max`.
pub(crate) fn validate(
    devices: &[GenericDevice],
    settings: &BridgeSettings,
) -> Result<(), (String, String)> {
    let err = |key: String, msg: String| Err((key, msg));
    let s = settings;
    let nonzero: [(&str, u64); 11] = [
        ("flap_window_ms", s.flap_window_ms),
        ("flap_max_replacements", u64::from(s.flap_max_replacements)),
        ("flap_hold_ms", s.flap_hold_ms),
        ("send_buffer_bytes", s.send_buffer_bytes as u64),
        ("queue_max", s.queue_max as u64),
        ("write_timeout_ms", s.write_timeout_ms),
        ("keepalive_idle_ms", s.keepalive_idle_ms),
        ("keepalive_interval_ms", s.keepalive_interval_ms),
        ("keepalive_retries", u64::from(s.keepalive_retries)),
        ("user_timeout_ms", s.user_timeout_ms),
        (
            "max_connections_per_device",
            s.max_connections_per_device as u64,
        ),
    ];
    for (name, v) in nonzero {
        if v == 0 {
            return err(format!("bridge.{name}"), "must be at least 1".into());
        }
    }
    if s.queue_max > MAX_QUEUE {
        return err(
            "bridge.queue_max".into(),
            format!("{} is too large; at most {MAX_QUEUE}", s.queue_max),
        );
    }
    for (name, v) in [
        ("keepalive_idle_ms", s.keepalive_idle_ms),
        ("keepalive_interval_ms", s.keepalive_interval_ms),
    ] {
        if v > MAX_KEEPALIVE_SECS * 1000 {
            return err(
                format!("bridge.{name}"),
                format!("{v} is too large; at most {}", MAX_KEEPALIVE_SECS * 1000),
            );
        }
    }
    if s.keepalive_retries > MAX_KEEPALIVE_RETRIES {
        return err(
            "bridge.keepalive_retries".into(),
            format!(
                "{} is too large; at most {MAX_KEEPALIVE_RETRIES}",
                s.keepalive_retries
            ),
        );
    }

    let mut listens: Vec<(usize, SocketAddr)> = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let key = |field: &str| format!("generic[{i}].{field}");
        if let Err(m) = check_reader(&d.reader) {
            return err(key("reader"), m.to_string());
        }
        if let Some(j) = devices[..i]
            .iter()
            .position(|o| o.machine == d.machine && o.reader == d.reader)
        {
            return err(
                key("reader"),
                format!(
                    "machine {} reader {:?} is already configured in generic[{j}]; configure each machine and reader once",
                    d.machine, d.reader
                ),
            );
        }
        let addr: SocketAddr = match d.listen.parse() {
            Ok(a) => a,
            Err(_) => {
                return err(
                    key("listen"),
                    format!(
                        "{:?} is not an IP address and port; use e.g. \"0.0.0.0:7778\"",
                        d.listen
                    ),
                );
            }
        };
        if let Some((j, other)) = listens.iter().find(|(_, o)| listen_conflict(*o, addr)) {
            return err(
                key("listen"),
                format!(
                    "{addr} is already used by generic[{j}] ({other}); give each device its own port"
                ),
            );
        }
        listens.push((i, addr));
        if d.allow.is_empty() {
            return err(
                key("allow"),
                "is empty; list the print server addresses allowed to connect".into(),
            );
        }
        if let Some(k) = d.allow.iter().position(IpAddr::is_unspecified) {
            return err(
                format!("generic[{i}].allow[{k}]"),
                format!(
                    "{} matches no peer; list the print server's own address",
                    d.allow[k]
                ),
            );
        }
        if d.version_reply.len() > MAX_VERSION_REPLY_LEN
            || !d.version_reply.bytes().all(|b| (0x20..0x7f).contains(&b))
        {
            return err(
                key("version_reply"),
                format!(
                    "must be printable ASCII (no line breaks), at most {MAX_VERSION_REPLY_LEN} characters; \"\" disables the answer"
                ),
            );
        }
    }
    Ok(())
}

/// What is wrong with a reader id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ReaderIdError {
    #[error("must have 1 to {MAX_READER_LEN} characters")]
    Length,
    #[error("{0:?} may only contain ASCII letters, digits, '-', '_' and '.'")]
    Chars(String),
}

fn check_reader(reader: &str) -> Result<(), ReaderIdError> {
    if reader.is_empty() || reader.len() > MAX_READER_LEN {
        return Err(ReaderIdError::Length);
    }
    if !reader
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ReaderIdError::Chars(reader.to_string()));
    }
    Ok(())
}

/// Whether two listen addresses would collide (port 0 never does: the system picks one).
fn listen_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// How a swipe left the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Written, with its `\n`, to the print server at `peer`.
    Delivered {
        /// The print server's address.
        peer: SocketAddr,
    },
    /// Dropped undelivered at its expiry instant.
    Expired,
}

/// One swipe's outcome on this bridge's outcome channel.
pub(crate) type OutcomeReport = crate::bridges::OutcomeReport<Outcome>;

/// What [`GenericBridge::status`] reports per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceStatus {
    /// The device.
    pub key: DeviceKey,
    /// The address its listener is bound to, once bound.
    pub listen: Option<SocketAddr>,
    /// The connected print server and since when (Unix milliseconds).
    pub connected: Option<(SocketAddr, i64)>,
    /// Swipes waiting (including one being written).
    pub queued: usize,
    /// Swipes delivered so far.
    pub delivered: u64,
    /// Swipes expired undelivered so far.
    pub expired: u64,
    /// Connections refused because the peer was not on the allow list.
    pub refused_peers: u64,
}

/// The bridge: every configured Generic device, its queue and its connection.
pub(crate) struct GenericBridge {
    devices: Vec<Device>,
    settings: BridgeSettings,
    outcomes: mpsc::Sender<OutcomeReport>,
    /// Wakes the expiry task when a swipe is queued that expires before its wake-up.
    expiry_wake: Notify,
    /// When the expiry task wakes up next; `None` while it scans or has nothing to wait
    /// for (then every queued swipe wakes it).
    expiry_next: Mutex<Option<Instant>>,
    /// Outcome reports dropped because the channel was full or closed.
    lost_reports: AtomicU64,
    /// Where swipes are recorded as being written before their bytes go out (the swipe
    /// journal's `writing`); none in the bridge's own tests.
    write_log: OnceLock<Arc<dyn WriteLog>>,
}

impl fmt::Debug for GenericBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenericBridge")
            .field(
                "devices",
                &self
                    .devices
                    .iter()
                    .map(|d| d.key.to_string())
                    .collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .field("lost_reports", &self.lost_reports.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Device {
    key: DeviceKey,
    cfg: GenericDevice,
    /// `cfg.allow` in canonical form (IPv4-mapped IPv6 addresses as IPv4).
    allow: Vec<IpAddr>,
    state: Mutex<DeviceState>,
}

#[derive(Debug, Default)]
struct DeviceState {
    queue: VecDeque<BridgeSwipe>,
    /// Swipes taken from the queue and being written; they count against `queue_max`.
    in_flight: usize,
    conn: Option<Conn>,
    next_conn_id: u64,
    listen: Option<SocketAddr>,
    delivered: u64,
    expired: u64,
    refused_peers: u64,
    /// Swipes refused because the queue was full.
    busy: u64,
    /// Connections replacing each other too fast (see [`FlapGuard`]).
    flap: FlapGuard,
    /// Hold-offs started.
    flaps: u64,
    /// Connections closed at once during hold-offs.
    held_off: u64,
    /// Stalls: times cards were held back from a silent print server.
    stalls: u64,
}

/// The device's current connection.
#[derive(Debug)]
struct Conn {
    id: u64,
    peer: SocketAddr,
    since_ms: i64,
    /// Cancelled when a newer connection replaces this one.
    stop: CancellationToken,
    /// Tells the connection that a swipe is waiting.
    wake: Arc<Notify>,
}

impl Device {
    fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock_unpoisoned()
    }

    fn allows(&self, ip: IpAddr) -> bool {
        self.allow.contains(&ip.to_canonical())
    }

    /// Wakes the current connection, if any.
    fn wake_conn(st: &DeviceState) -> Option<Arc<Notify>> {
        st.conn.as_ref().map(|c| c.wake.clone())
    }
}

impl Bridge for GenericBridge {
    fn name(&self) -> &'static str {
        "generic"
    }

    fn route(&self, machine: u16, reader: &str) -> Route {
        if self.has_device(machine, reader) {
            Route::Ready
        } else {
            Route::None
        }
    }

    fn admit(&self, machine: u16, reader: &str) -> Result<(), SubmitError> {
        let dev = self.find(machine, reader).ok_or(SubmitError::NoDevice)?;
        let mut st = dev.lock();
        if st.queue.len() + st.in_flight >= self.settings.queue_max {
            st.busy += 1;
            return Err(SubmitError::QueueFull {
                max: self.settings.queue_max,
            });
        }
        Ok(())
    }

    fn submit(&self, machine: u16, reader: &str, swipe: BridgeSwipe) -> Result<(), SubmitError> {
        GenericBridge::submit(self, machine, reader, swipe)
    }
}

impl GenericBridge {
    /// Creates the bridge. `outcomes` receives one report per swipe that leaves the
    /// bridge (delivered or expired); a full channel loses the report (counted and
    /// logged) rather than blocking the bridge.
    pub(crate) fn new(
        devices: Vec<GenericDevice>,
        settings: BridgeSettings,
        outcomes: mpsc::Sender<OutcomeReport>,
    ) -> Arc<GenericBridge> {
        let devices = devices
            .into_iter()
            .map(|cfg| Device {
                key: DeviceKey {
                    machine: cfg.machine,
                    reader: cfg.reader.clone(),
                },
                allow: cfg.allow.iter().map(IpAddr::to_canonical).collect(),
                cfg,
                state: Mutex::new(DeviceState::default()),
            })
            .collect();
        Arc::new(GenericBridge {
            devices,
            settings,
            outcomes,
            expiry_wake: Notify::new(),
            expiry_next: Mutex::new(None),
            lost_reports: AtomicU64::new(0),
            write_log: OnceLock::new(),
        })
    }

    /// Sets where swipes are recorded as being written (once; later calls are ignored).
    pub(crate) fn set_write_log(&self, log: Arc<dyn WriteLog>) {
        let _ = self.write_log.set(log);
    }

    /// Records the batch as being written and waits (at most until the batch's first
    /// expiry, or until `stop`) for that record to be committed. Returns false if the
    /// batch must not be written now (stopped, or a swipe expired while waiting).
    async fn mark_writing(
        &self,
        batch: &[BridgeSwipe],
        first_expiry: Instant,
        stop: &CancellationToken,
    ) -> bool {
        let Some(log) = self.write_log.get() else {
            return true;
        };
        let Some(done) = log.writing(batch.iter().map(|s| s.event_id.clone()).collect()) else {
            return true;
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => return false,
            r = tokio::time::timeout_at(first_expiry, done) => {
                if matches!(r, Ok(Err(_))) {
                    tracing::warn!("swipe journal: the writing mark was not confirmed; writing anyway");
                }
            }
        }
        Instant::now() < first_expiry
    }

    /// Binds every device's listener (logging `listening on ADDR (generic M/R)`); the
    /// order matches the devices given to [`GenericBridge::new`].
    pub(crate) async fn bind(&self) -> std::io::Result<Vec<TcpListener>> {
        let mut listeners = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            let listener = scm_common::bind(&d.cfg.listen, &format!("generic {}", d.key)).await?;
            d.lock().listen = Some(listener.local_addr()?);
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// Serves every listener (one per device, in device order) and expires queued swipes,
    /// until `shutdown` is cancelled.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listeners: Vec<TcpListener>,
        shutdown: CancellationToken,
    ) {
        if listeners.len() != self.devices.len() {
            tracing::warn!(
                "{} Generic devices but {} listeners; devices without a listener only queue and expire swipes",
                self.devices.len(),
                listeners.len()
            );
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().expire_loop(shutdown.clone()));
        for (idx, listener) in listeners.into_iter().enumerate().take(self.devices.len()) {
            let dev = &self.devices[idx];
            if let Ok(local) = listener.local_addr() {
                dev.lock().listen = Some(local);
            }
            let opts = ServeOptions::new(
                format!("generic {}", dev.key),
                self.settings.max_connections_per_device,
            );
            let bridge = self.clone();
            tasks.spawn(scm_common::serve(
                listener,
                opts,
                shutdown.clone(),
                move |stream, peer, token| {
                    let bridge = bridge.clone();
                    async move { bridge.handle(idx, stream, peer, token).await }
                },
            ));
        }
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res
                && e.is_panic()
            {
                tracing::error!("a Generic bridge task panicked: {e}");
            }
        }
    }

    /// Whether a Generic device is configured for this machine and reader.
    pub(crate) fn has_device(&self, machine: u16, reader: &str) -> bool {
        self.find(machine, reader).is_some()
    }

    /// Queues a swipe for the device; returns at once. A swipe that has already expired
    /// is reported [`Outcome::Expired`] right away.
    pub(crate) fn submit(
        &self,
        machine: u16,
        reader: &str,
        swipe: BridgeSwipe,
    ) -> Result<(), SubmitError> {
        let dev = self.find(machine, reader).ok_or(SubmitError::NoDevice)?;
        if swipe.expires_at <= Instant::now() {
            dev.lock().expired += 1;
            self.expired(dev, swipe);
            return Ok(());
        }
        let (wake, expires_at) = {
            let mut st = dev.lock();
            if st.queue.len() + st.in_flight >= self.settings.queue_max {
                st.busy += 1;
                tracing::debug!(
                    device = %dev.key,
                    event = %swipe.event_id,
                    card = %mask(&swipe.card),
                    "queue full; swipe refused"
                );
                return Err(SubmitError::QueueFull {
                    max: self.settings.queue_max,
                });
            }
            tracing::debug!(
                device = %dev.key,
                event = %swipe.event_id,
                card = %mask(&swipe.card),
                "swipe queued"
            );
            let expires_at = swipe.expires_at;
            st.queue.push_back(swipe);
            (Device::wake_conn(&st), expires_at)
        };
        if let Some(w) = wake {
            w.notify_one();
        }
        // Only a swipe that expires before the expiry task's next wake-up needs it now
        // (with one TTL for all, that is almost never: one wake-up less per swipe).
        let next = *self.expiry_next.lock_unpoisoned();
        if next.is_none_or(|t| expires_at < t) {
            self.expiry_wake.notify_one();
        }
        Ok(())
    }

    /// Status of every device of a machine (all devices if `machine` is `None`).
    pub(crate) fn status(&self, machine: Option<u16>) -> Vec<DeviceStatus> {
        self.devices
            .iter()
            .filter(|d| machine.is_none_or(|m| d.key.machine == m))
            .map(|d| {
                let st = d.lock();
                DeviceStatus {
                    key: d.key.clone(),
                    listen: st.listen,
                    connected: st.conn.as_ref().map(|c| (c.peer, c.since_ms)),
                    queued: st.queue.len() + st.in_flight,
                    delivered: st.delivered,
                    expired: st.expired,
                    refused_peers: st.refused_peers,
                }
            })
            .collect()
    }

    fn find(&self, machine: u16, reader: &str) -> Option<&Device> {
        self.devices
            .iter()
            .find(|d| d.key.machine == machine && d.key.reader == reader)
    }

    /// Sends a report without ever waiting.
    fn report(&self, dev: &Device, event_id: String, outcome: Outcome) {
        let report = OutcomeReport {
            key: dev.key.clone(),
            event_id,
            outcome,
        };
        if let Err(e) = self.outcomes.try_send(report) {
            let lost = self.lost_reports.fetch_add(1, Ordering::Relaxed) + 1;
            let (why, r) = match e {
                mpsc::error::TrySendError::Full(r) => ("full", r),
                mpsc::error::TrySendError::Closed(r) => ("closed", r),
            };
            tracing::warn!(
                device = %dev.key,
                event = %r.event_id,
                "outcome channel {why}: the report {:?} is lost ({lost} lost so far)",
                r.outcome
            );
        }
    }

    /// Logs and reports a swipe that expired undelivered (already counted by the caller).
    fn expired(&self, dev: &Device, swipe: BridgeSwipe) {
        tracing::info!(
            device = %dev.key,
            event = %swipe.event_id,
            card = %mask(&swipe.card),
            "swipe expired undelivered"
        );
        self.report(dev, swipe.event_id, Outcome::Expired);
    }

    /// Drops expired swipes from every queue; returns the earliest remaining expiry.
    fn purge_expired(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for dev in &self.devices {
            let mut gone = Vec::new();
            {
                let mut st = dev.lock();
                if st.queue.iter().any(|s| s.expires_at <= now) {
                    let (keep, drop): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut st.queue)
                        .into_iter()
                        .partition(|s| s.expires_at > now);
                    st.queue = keep;
                    st.expired += drop.len() as u64;
                    gone.extend(drop);
                }
                if let Some(t) = st.queue.iter().map(|s| s.expires_at).min() {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
            for swipe in gone {
                self.expired(dev, swipe);
            }
        }
        next
    }

    async fn expire_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            // While scanning, every new swipe wakes the task again (see `submit`).
            *self.expiry_next.lock_unpoisoned() = None;
            let next = self.purge_expired();
            *self.expiry_next.lock_unpoisoned() = next;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.expiry_wake.notified() => {}
                () = sleep_until(next) => {}
            }
        }
    }

    /// One accepted connection.
    async fn handle(
        self: Arc<Self>,
        idx: usize,
        mut stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let dev = &self.devices[idx];
        if !dev.allows(peer.ip()) {
            dev.lock().refused_peers += 1;
            tracing::warn!(
                device = %dev.key,
                "refused the connection from {peer}: not in the allow list of generic device {}",
                dev.key
            );
            return Ok(()); // dropping the stream closes it
        }
        let stop = shutdown.child_token();
        let wake = Arc::new(Notify::new());
        let limits = self.flap_limits();
        let id = {
            let mut st = dev.lock();
            let connected = st.conn.is_some();
            let d = st.flap.on_connect(&limits, Instant::now(), connected);
            st.flaps += u64::from(d.started_hold);
            if d.admission == Admission::Hold {
                st.held_off += 1;
                let current = st.conn.as_ref().map(|c| c.peer);
                drop(st);
                if let (Some(n), Some(current)) = (d.log, current) {
                    tracing::warn!(
                        device = %dev.key,
                        "print server connections are flapping on generic {}: more than {} replaced each other within {} ms (two print servers configured for this device?); keeping the connection from {current} and closing newer ones at once for {} ms ({} closed, {} hold-offs since the last such line)",
                        dev.key,
                        limits.max_replacements,
                        limits.window.as_millis(),
                        limits.hold.as_millis(),
                        n.refused,
                        n.holds,
                    );
                } else {
                    tracing::debug!(device = %dev.key, "hold-off: closed the connection from {peer}");
                }
                return Ok(()); // dropping the stream closes it
            }
            st.next_conn_id += 1;
            let id = st.next_conn_id;
            let new = Conn {
                id,
                peer,
                since_ms: scm_common::clock::now_ms(),
                stop: stop.clone(),
                wake: wake.clone(),
            };
            if let Some(old) = st.conn.replace(new) {
                tracing::info!(
                    device = %dev.key,
                    "print server {peer} connected; closing the older connection from {}",
                    old.peer
                );
                old.stop.cancel();
            } else {
                tracing::info!(device = %dev.key, "print server {peer} connected");
            }
            id
        };
        if let Err(e) = tune_socket(&stream, &self.settings) {
            tracing::warn!(device = %dev.key, "cannot set keep-alive options for {peer}: {e}");
        }
        let res = self.run_conn(dev, &mut stream, peer, &stop, &wake).await;
        {
            let mut st = dev.lock();
            if st.conn.as_ref().is_some_and(|c| c.id == id) {
                st.conn = None;
            }
        }
        match &res {
            Ok(()) => tracing::info!(device = %dev.key, "print server {peer} disconnected"),
            // Timed out = keep-alive or TCP_USER_TIMEOUT found the peer gone (half-open).
            Err(e) => tracing::warn!(device = %dev.key, "print server {peer} disconnected: {e}"),
        }
        drop(stream);
        // Already logged with the device; nothing more for the accept loop to say.
        Ok(())
    }

    async fn run_conn(
        &self,
        dev: &Device,
        stream: &mut TcpStream,
        peer: SocketAddr,
        stop: &CancellationToken,
        wake: &Notify,
    ) -> std::io::Result<()> {
        // Fixed size by construction: the server's input never grows memory.
        let mut buf = [0u8; READ_BUF];
        let (mut rd, mut wr) = stream.split();
        // A version answer ends in CR only; the next card line must not continue it.
        let mut after_reply = false;
        let mut stall = StallGuard::new(Instant::now());
        loop {
            self.deliver_pending(dev, &mut wr, peer, stop, &mut after_reply, &mut stall)
                .await?;
            tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                () = wake.notified() => {}
                r = rd.read(&mut buf) => {
                    let n = r?;
                    if n == 0 {
                        return Ok(());
                    }
                    if let Some(d) = stall.on_input(Instant::now()) {
                        tracing::info!(device = %dev.key, "print server {peer} sends again after {} ms; cards are written again", d.as_millis());
                    }
                    self.on_input(dev, &buf[..n], &mut wr, stop, &mut after_reply).await?;
                }
            }
        }
    }

    /// Acts on a chunk the server sent; everything but a trailing `v` is ignored. Sets
    /// `after_reply` once a version answer went out.
    async fn on_input<W: AsyncWrite + Unpin>(
        &self,
        dev: &Device,
        chunk: &[u8],
        wr: &mut W,
        stop: &CancellationToken,
        after_reply: &mut bool,
    ) -> std::io::Result<()> {
        match last_command(chunk) {
            Some(b'v') => {
                let reply = &dev.cfg.version_reply;
                if reply.is_empty() {
                    tracing::debug!("version request (v); not answered");
                } else {
                    tracing::debug!("version request (v); answering");
                    let line = format!("{reply}\r");
                    let deadline = Instant::now() + self.write_timeout();
                    let res = self
                        .write_until(wr, line.as_bytes(), deadline, false, stop, &mut 0)
                        .await;
                    if res.is_err() && stop.is_cancelled() {
                        return Ok(()); // replaced or shutting down: not an error
                    }
                    res?;
                    *after_reply = true;
                }
            }
            Some(b'e') => tracing::debug!("the server flags an error to the user (e)"),
            Some(b'b') => tracing::debug!("the server asks for an audible indication (b)"),
            _ => tracing::trace!("discarded {} bytes from the server", chunk.len()),
        }
        Ok(())
    }

    /// Writes every queued swipe that has not expired. The swipes queued at the same
    /// moment go out in one write (at most [`WRITE_BATCH`] of them): one system call for
    /// a burst instead of one per card. After a version answer (`after_reply`), the
    /// write starts with an LF: the answer ends in CR only, and a print server that
    /// splits lines on LF alone would read the answer and the card as one line.
    async fn deliver_pending<W: AsyncWrite + Unpin>(
        &self,
        dev: &Device,
        wr: &mut W,
        peer: SocketAddr,
        stop: &CancellationToken,
        after_reply: &mut bool,
        stall: &mut StallGuard,
    ) -> std::io::Result<()> {
        let mut lines = Vec::new();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            if dev.lock().queue.is_empty() {
                return Ok(());
            }
            // A print server that has gone silent may not be reading: what is written now
            // could reach it late. The cards wait in the queue (and expire there).
            if let StallVerdict::Hold { started, log } =
                stall.before_write(&self.stall_limits(), Instant::now())
            {
                if started {
                    dev.lock().stalls += 1;
                }
                if let Some(n) = log {
                    tracing::warn!(
                        device = %dev.key,
                        "print server {peer} has sent nothing for more than {} ms: taken as not reading, cards are held back until it sends again ({n} stalls since the last such line)",
                        self.settings.stall_silence_ms
                    );
                }
                return Ok(());
            }
            let batch = self.take_batch(dev);
            let Some(first_expiry) = batch.iter().map(|s| s.expires_at).min() else {
                return Ok(());
            };
            // Committed as `writing` before any byte goes out: after a crash in the write,
            // a restart never writes these again.
            if !self.mark_writing(&batch, first_expiry, stop).await {
                for swipe in batch.into_iter().rev() {
                    self.put_back(dev, swipe);
                }
                if stop.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            lines.clear();
            let prefix = usize::from(std::mem::take(after_reply));
            if prefix == 1 {
                lines.push(b'\n');
            }
            for swipe in &batch {
                lines.extend_from_slice(swipe.card.as_bytes());
                lines.push(b'\n');
            }
            // Bounded by the write timeout, and by the earliest expiry in the batch:
            // never delivered late.
            let by_timeout = Instant::now() + self.write_timeout();
            let (deadline, expiry_first) = if first_expiry < by_timeout {
                (first_expiry, true)
            } else {
                (by_timeout, false)
            };
            let mut written = 0;
            match self
                .write_until(wr, &lines, deadline, expiry_first, stop, &mut written)
                .await
            {
                Ok(()) => {
                    for swipe in batch {
                        self.delivered(dev, swipe, peer);
                    }
                }
                Err(e) => {
                    // The cards whose whole line went out before the failure are delivered;
                    // the rest go back to the front of the queue, in their order.
                    let mut end = prefix;
                    let mut back = Vec::new();
                    for swipe in batch {
                        end += swipe.card.len() + 1;
                        if end <= written {
                            self.delivered(dev, swipe, peer);
                        } else {
                            back.push(swipe);
                        }
                    }
                    for swipe in back.into_iter().rev() {
                        self.put_back(dev, swipe);
                    }
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Counts, logs and reports one card written in full to the print server.
    fn delivered(&self, dev: &Device, swipe: BridgeSwipe, peer: SocketAddr) {
        {
            let mut st = dev.lock();
            st.in_flight -= 1;
            st.delivered += 1;
        }
        crate::metrics::global()
            .swipe_forward
            .observe_duration(swipe.received_at.elapsed());
        tracing::info!(
            device = %dev.key,
            event = %swipe.event_id,
            card = %mask(&swipe.card),
            "card delivered to {peer}"
        );
        self.report(dev, swipe.event_id, Outcome::Delivered { peer });
    }

    /// Takes the swipes to write next, at most [`WRITE_BATCH`], under one lock (dropping
    /// expired ones on the way).
    fn take_batch(&self, dev: &Device) -> Vec<BridgeSwipe> {
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut batch = Vec::new();
        {
            let mut st = dev.lock();
            while batch.len() < WRITE_BATCH {
                match st.queue.pop_front() {
                    None => break,
                    Some(s) if s.expires_at <= now => {
                        st.expired += 1;
                        gone.push(s);
                    }
                    Some(s) => {
                        st.in_flight += 1;
                        batch.push(s);
                    }
                }
            }
        }
        for s in gone {
            self.expired(dev, s);
        }
        batch
    }

    /// A write failed: the swipe goes back to the front of the queue for the next
    /// connection, unless it has expired.
    fn put_back(&self, dev: &Device, swipe: BridgeSwipe) {
        let (wake, swipe) = {
            let mut st = dev.lock();
            st.in_flight -= 1;
            if swipe.expires_at > Instant::now() {
                st.queue.push_front(swipe);
                (Device::wake_conn(&st), None)
            } else {
                st.expired += 1;
                (None, Some(swipe))
            }
        };
        match swipe {
            Some(s) => self.expired(dev, s),
            None => {
                tracing::debug!(device = %dev.key, "swipe put back in the queue");
                self.expiry_wake.notify_one();
            }
        }
        if let Some(w) = wake {
            w.notify_one();
        }
    }

    /// Writes `bytes` in full by `deadline`; `written` counts the bytes that went out,
    /// also when it fails part way.
    async fn write_until<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        bytes: &[u8],
        deadline: Instant,
        expiry_first: bool,
        stop: &CancellationToken,
        written: &mut usize,
    ) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        let write_all = async {
            while *written < bytes.len() {
                let n = wr.write(&bytes[*written..]).await?;
                if n == 0 {
                    return Err(Error::from(ErrorKind::WriteZero));
                }
                *written += n;
            }
            Ok(())
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => Err(Error::new(ErrorKind::Interrupted, "connection closed during a write")),
            r = tokio::time::timeout_at(deadline, write_all) => match r {
                Ok(r) => r,
                Err(_) if expiry_first => Err(Error::new(
                    ErrorKind::TimedOut,
                    "the swipe expired before the print server took it; closing the connection",
                )),
                Err(_) => Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "write did not complete within {} ms; closing the connection",
                        self.settings.write_timeout_ms
                    ),
                )),
            },
        }
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.write_timeout_ms)
    }

    fn stall_limits(&self) -> StallLimits {
        StallLimits {
            silence: (self.settings.stall_silence_ms > 0)
                .then(|| Duration::from_millis(self.settings.stall_silence_ms)),
            log_every: FLAP_LOG_EVERY,
        }
    }

    fn flap_limits(&self) -> FlapLimits {
        FlapLimits {
            window: Duration::from_millis(self.settings.flap_window_ms),
            max_replacements: self.settings.flap_max_replacements,
            hold: Duration::from_millis(self.settings.flap_hold_ms),
            log_every: FLAP_LOG_EVERY,
        }
    }

    /// The bridge's per-device counters that `status` does not show, in the Prometheus
    /// text format.
    pub(crate) fn metrics_text(&self) -> String {
        let mut e = Exposition::new();
        let names: Vec<String> = self.devices.iter().map(|d| d.key.to_string()).collect();
        let counts: Vec<[u64; 4]> = self
            .devices
            .iter()
            .map(|d| {
                let st = d.lock();
                [st.busy, st.flaps, st.held_off, st.stalls]
            })
            .collect();
        for (metric, help, pick) in [
            (
                "scm_bridge_busy_total",
                "Swipes refused as BUSY because the Generic device's queue was full.",
                0,
            ),
            (
                "scm_bridge_flapping_total",
                "Hold-offs started because print-server connections to the Generic device replaced each other too fast.",
                1,
            ),
            (
                "scm_bridge_held_off_total",
                "Print-server connections to the Generic device closed at once during a hold-off.",
                2,
            ),
            (
                "scm_bridge_stalled_total",
                "Times cards were held back because the Generic device's print server had gone silent (stall_silence_ms).",
                3,
            ),
        ] {
            e.header(metric, Kind::Counter, help);
            for (name, c) in names.iter().zip(&counts) {
                let v = c[pick];
                e.sample(metric, &[("device", name)], v);
            }
        }
        e.finish()
    }
}

/// At most one log line about a device's flapping connections this often.
const FLAP_LOG_EVERY: Duration = Duration::from_secs(10);

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The last non-whitespace byte of a chunk: the command in PaperCut's sample terminal.
/// (Not a stricter rule such as "a word of its own": a probe string and the `v` after it
/// often arrive in one read, `rfid promptv`, and the version request must be answered.)
pub fn last_command(chunk: &[u8]) -> Option<u8> {
    chunk
        .iter()
        .rev()
        .find(|b| !b.is_ascii_whitespace())
        .copied()
}

/// Whole seconds, rounded up, at least 1 (the kernel counts keep-alive times in seconds).
fn secs_ceil(ms: u64) -> Duration {
    Duration::from_secs(ms.div_ceil(1000).max(1))
}

/// Turns on TCP keep-alive (idle, interval, retries) and sets `TCP_USER_TIMEOUT`.
fn tune_socket(stream: &TcpStream, s: &BridgeSettings) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new().with_time(secs_ceil(s.keepalive_idle_ms));
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let ka = ka
        .with_interval(secs_ceil(s.keepalive_interval_ms))
        .with_retries(s.keepalive_retries);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_send_buffer_size(s.send_buffer_bytes)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(Duration::from_millis(s.user_timeout_ms)))?;
    Ok(())
}
