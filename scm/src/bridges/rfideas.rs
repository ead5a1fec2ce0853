//! The RFIDeas Ethernet 241 "Client Mode" bridge: the SCM presents each configured device
//! (a machine id plus a reader id) to print servers as a 241 reader in Client Mode.
//!
//! **Configuration side.** One HTTP listener (`[listen] rfideas`) serves every device;
//! the `Host` header (host name without port, or the device's address) names the device.
//! A device may also have its own port (`[[rfideas]] listen`) or its own address
//! (`[[rfideas]] address`, on the shared listener's port), which then names the device
//! whatever the `Host` ([`connection_device`], [`resolve`]). A device with an address also
//! sends its swipes from it: print servers tell readers apart by source address.
//! Only configured print-server addresses (`allow`) get any answer but `403`. Two requests
//! exist, both `GET` (paths configurable, see `docs/bridge-241.md`):
//!
//! * `GET /config?name=value&...` stores the settings durably (SQLite table
//!   `rfideas_settings`), audits every change, and answers the device's current settings;
//! * `GET /settings` answers the current settings, so the print server can verify them.
//!
//! The request head is parsed by [`http`] (bounded; `400` with a reason, `431`, `505`),
//! must arrive within `header_timeout_ms` (else `408` and close), and a kept-alive
//! connection may idle for `idle_timeout_ms`. Other methods get `405`, unknown hosts
//! `404`, and a request with a body `400`.
//!
//! **Swipe side.** A swipe routed to a 241 device is sent as an HTTPS `GET` to the URL
//! template stored in the device's `url_setting` setting (default `server_url`), or else to
//! `[[rfideas]] swipe_url`, see [`client`]. Attempts are retried with back-off on
//! connection failures, timeouts and `5xx`, but only until the swipe's expiry: nothing is
//! sent after it (the attempt in progress is abandoned at that instant). A `3xx` (never
//! followed), a `4xx` or a certificate that does not verify (against the CA, or the pin:
//! see [`pin`]) ends the swipe as failed.
//!
//! Card numbers only appear masked in logs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use scm_common::ServeOptions;
use scm_common::backoff::Backoff;
use scm_common::card::mask;
use scm_common::lock::LockExt;
use scm_common::metrics::{CounterFamily, Exposition, Kind};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bridges::{Bridge, BridgeSwipe, DeviceKey, Route, SubmitError};
use crate::state::{self, DeviceSettings, SettingChange, now_ms};

pub(crate) mod client;
pub mod http;
pub(crate) mod pin;
#[cfg(test)]
mod tests;

use http::{HeadError, Parse};

/// Longest host name.
const MAX_HOST: usize = 253;
/// Longest setting name.
const MAX_KEY: usize = 64;

/// `[[rfideas]]` in the SCM configuration: one device in 241 Client Mode.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RfideasDevice {
    /// The machine the device belongs to.
    pub machine: u16,
    /// The reader id on that machine.
    pub reader: String,
    /// The host name the print server is configured with (the `Host` header, without
    /// port), e.g. `reader-12.example.org`.
    pub host: String,
    /// Optional own listen address (`IP:PORT`); requests there are for this device
    /// whatever their `Host`. Empty: only the shared `[listen] rfideas` listener.
    #[serde(default)]
    pub listen: String,
    /// Print-server addresses allowed to configure and read the device.
    pub allow: Vec<IpAddr>,
    /// Swipe URL template used while the print server has not stored one
    /// (see `url_setting`). Empty: none.
    #[serde(default)]
    pub swipe_url: String,
    /// MAC-style device id (`{device}` in the swipe URL), `02:53:43:..`; derived from the
    /// machine and reader when empty.
    #[serde(default)]
    pub mac: String,
    /// Optional own IP address on the SCM's host, e.g. `127.0.0.23`. A print server that
    /// knows readers by address (it resolves the reader's name and tells readers apart by
    /// the source address of their swipes) sees one address per device: configuration
    /// requests are served on `ADDRESS:<port of [listen] rfideas>` and name this device
    /// whatever their `Host`, and its swipe requests leave from this address. Empty: the
    /// SCM's shared listener and its default source address.
    #[serde(default)]
    pub address: String,
    /// Accept exactly this print-server certificate (PEM file), e.g. a self-signed one,
    /// instead of a chain to `[rfideas_bridge] ca`. Overrides the bridge-wide pin.
    #[serde(default)]
    pub pin_cert: Option<PathBuf>,
    /// Accept exactly the print-server certificate with this SHA-256 (hex, of the DER
    /// bytes; `:` separators allowed). Overrides the bridge-wide pin.
    #[serde(default)]
    pub pin_sha256: String,
}

fn s(v: &str) -> String {
    v.to_string()
}

/// `[rfideas_bridge]`: settings for every 241 device.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RfideasSettings {
    /// CA certificate(s) (PEM) that print servers' HTTPS certificates must chain to.
    /// Default: `[tls] ca`.
    pub ca: Option<PathBuf>,
    /// Accept exactly this print-server certificate (PEM) for every device without its
    /// own pin, instead of a chain to `ca`.
    pub pin_cert: Option<PathBuf>,
    /// Accept exactly the print-server certificate with this SHA-256 (hex) for every
    /// device without its own pin.
    pub pin_sha256: String,
    /// Path of the configuration request (`GET <config_path>?name=value&...`).
    pub config_path: String,
    /// Path of the read request (`GET <read_path>`).
    pub read_path: String,
    /// The setting that holds the swipe URL template.
    pub url_setting: String,
    /// Most settings stored per device.
    pub max_settings: usize,
    /// Longest setting value, in bytes (after percent-decoding).
    pub max_value_bytes: usize,
    /// Largest request head, in bytes; larger ones get `431`.
    pub max_head_bytes: usize,
    /// A request head must arrive completely within this time, else `408` and close.
    pub header_timeout_ms: u64,
    /// A kept-alive connection with no new request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Connections served at once per listener.
    pub max_connections: usize,
    /// Requests served on one connection before it is closed.
    pub max_requests_per_connection: usize,
    /// TCP connect plus TLS handshake toward the print server.
    pub connect_timeout_ms: u64,
    /// Sending the request and receiving the response head.
    pub response_timeout_ms: u64,
    /// First pause between attempts; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// Longest pause between attempts.
    pub retry_max_ms: u64,
    /// Swipes being sent at once per device; further swipes are refused (busy).
    pub in_flight_max: usize,
}

impl Default for RfideasSettings {
    fn default() -> Self {
        Self {
            ca: None,
            pin_cert: None,
            pin_sha256: String::new(),
            config_path: s("/config"),
            read_path: s("/settings"),
            url_setting: s("server_url"),
            max_settings: 32,
            max_value_bytes: 2048,
            max_head_bytes: 8192,
            header_timeout_ms: 5_000,
            idle_timeout_ms: 30_000,
            max_connections: 64,
            max_requests_per_connection: 100,
            connect_timeout_ms: 3_000,
            response_timeout_ms: 5_000,
            retry_initial_ms: 250,
            retry_max_ms: 2_000,
            in_flight_max: 32,
        }
    }
}

/// Checks the devices and settings; `shared` is `[listen] rfideas`. The error is
/// `(key, message)`.
pub(crate) fn validate(
    devices: &[RfideasDevice],
    st: &RfideasSettings,
    machines: &[u16],
    shared: &str,
) -> Result<(), (String, String)> {
    let err = |k: String, m: String| Err((k, m));
    if let Err(m) = check_pin(st.pin_cert.as_deref(), &st.pin_sha256) {
        return err("rfideas_bridge.pin_sha256".into(), m);
    }
    let shared_addr = shared.parse::<SocketAddr>().ok();
    for (name, v) in [
        ("max_settings", st.max_settings as u64),
        ("max_value_bytes", st.max_value_bytes as u64),
        ("header_timeout_ms", st.header_timeout_ms),
        ("idle_timeout_ms", st.idle_timeout_ms),
        ("max_connections", st.max_connections as u64),
        (
            "max_requests_per_connection",
            st.max_requests_per_connection as u64,
        ),
        ("connect_timeout_ms", st.connect_timeout_ms),
        ("response_timeout_ms", st.response_timeout_ms),
        ("retry_initial_ms", st.retry_initial_ms),
        ("in_flight_max", st.in_flight_max as u64),
    ] {
        if v == 0 {
            return err(
                format!("rfideas_bridge.{name}"),
                "must be at least 1".into(),
            );
        }
    }
    if st.retry_max_ms < st.retry_initial_ms {
        return err(
            "rfideas_bridge.retry_max_ms".into(),
            "must be at least retry_initial_ms".into(),
        );
    }
    if !(256..=65_536).contains(&st.max_head_bytes) {
        return err(
            "rfideas_bridge.max_head_bytes".into(),
            "must be 256..=65536".into(),
        );
    }
    for (name, p) in [
        ("config_path", &st.config_path),
        ("read_path", &st.read_path),
    ] {
        let ok = p.starts_with('/')
            && p.len() <= 128
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b));
        if !ok {
            return err(
                format!("rfideas_bridge.{name}"),
                format!("{p:?} must start with '/' and use only A-Z a-z 0-9 / - . _ ~"),
            );
        }
    }
    if st.config_path == st.read_path {
        return err(
            "rfideas_bridge.read_path".into(),
            "must differ from config_path".into(),
        );
    }
    if check_key(&st.url_setting).is_err() {
        return err(
            "rfideas_bridge.url_setting".into(),
            format!("use 1 to {MAX_KEY} characters from A-Z a-z 0-9 . _ -"),
        );
    }
    for (i, d) in devices.iter().enumerate() {
        let key = |f: &str| format!("rfideas[{i}].{f}");
        if !machines.contains(&d.machine) {
            return err(
                key("machine"),
                format!("machine {} is not listed in [[machine]]", d.machine),
            );
        }
        let reader_ok = !d.reader.is_empty()
            && d.reader.len() <= 64
            && d.reader
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !reader_ok {
            return err(
                key("reader"),
                "use 1 to 64 characters from A-Z a-z 0-9 - _ .".into(),
            );
        }
        if let Some(j) = devices[..i]
            .iter()
            .position(|o| o.machine == d.machine && o.reader == d.reader)
        {
            return err(
                key("reader"),
                format!(
                    "machine {} reader {:?} is already configured in rfideas[{j}]",
                    d.machine, d.reader
                ),
            );
        }
        let host = normalise_host(&d.host);
        if !valid_host(&host) {
            return err(
                key("host"),
                format!(
                    "{:?} is not a host name; use the name the print server is configured with, e.g. \"reader-12.example.org\" (no port)",
                    d.host
                ),
            );
        }
        if let Some(j) = devices[..i]
            .iter()
            .position(|o| normalise_host(&o.host) == host)
        {
            return err(
                key("host"),
                format!(
                    "{host:?} is already used by rfideas[{j}]; give each device its own host name"
                ),
            );
        }
        if !d.listen.is_empty() && d.listen.parse::<SocketAddr>().is_err() {
            return err(
                key("listen"),
                format!(
                    "{:?} is not an IP address and port; use e.g. \"0.0.0.0:8242\" or leave it empty",
                    d.listen
                ),
            );
        }
        if d.allow.is_empty() {
            return err(
                key("allow"),
                "is empty; list the print server addresses allowed to configure the device".into(),
            );
        }
        if let Some(k) = d.allow.iter().position(IpAddr::is_unspecified) {
            return err(
                format!("rfideas[{i}].allow[{k}]"),
                format!(
                    "{} matches no peer; list the print server's own address",
                    d.allow[k]
                ),
            );
        }
        if !d.swipe_url.is_empty()
            && let Err(m) = client::validate_template(&d.swipe_url)
        {
            return err(key("swipe_url"), m.to_string());
        }
        if !d.mac.is_empty() && !valid_mac(&d.mac) {
            return err(
                key("mac"),
                format!("{:?} is not a MAC address like 02:53:43:00:01:01", d.mac),
            );
        }
        let mac = device_mac(d);
        if let Some(j) = devices[..i].iter().position(|o| device_mac(o) == mac) {
            return err(key("mac"), format!("{mac} is already used by rfideas[{j}]"));
        }
        if let Err(m) = check_pin(d.pin_cert.as_deref(), &d.pin_sha256) {
            return err(key("pin_sha256"), m);
        }
        if let Err(m) = check_address(devices, i, shared, shared_addr) {
            return err(key("address"), m);
        }
    }
    Ok(())
}

/// The device's own address, if it has one and it is an IP address (canonical form).
fn own_address(d: &RfideasDevice) -> Option<IpAddr> {
    d.address.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// Checks `rfideas[i].address` against the shared listener and the other devices.
fn check_address(
    devices: &[RfideasDevice],
    i: usize,
    shared: &str,
    shared_addr: Option<SocketAddr>,
) -> Result<(), String> {
    let d = &devices[i];
    if d.address.is_empty() {
        return Ok(());
    }
    let Some(ip) = own_address(d) else {
        return Err(format!(
            "{:?} is not an IP address; write the device's own address on this host, e.g. \"10.0.0.23\" (no port: the port is [listen] rfideas's), or leave it empty",
            d.address
        ));
    };
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return Err(format!(
            "{ip} is not one host's address; give the device an address of its own on this host"
        ));
    }
    if !d.listen.is_empty() {
        return Err(
            "set either address (own IP on the [listen] rfideas port) or listen (own IP:PORT), not both"
                .into(),
        );
    }
    if shared.is_empty() {
        return Err(
            "needs [listen] rfideas for its port; set [listen] rfideas (e.g. \"0.0.0.0:80\") or give the device listen = \"IP:PORT\" instead".into(),
        );
    }
    if let Some(sa) = shared_addr {
        if sa.ip().to_canonical() == ip {
            return Err(format!(
                "{ip} is the shared listener's address ([listen] rfideas = {shared:?}), which serves devices by Host; give the device another address or move the shared listener"
            ));
        }
        // Another device's own listener on the same address and port cannot coexist.
        if let Some(j) = devices.iter().position(|o| {
            o.listen
                .parse::<SocketAddr>()
                .is_ok_and(|l| l.port() == sa.port() && l.ip().to_canonical() == ip)
        }) {
            return Err(format!(
                "{ip}:{} is already rfideas[{j}].listen; give each device its own address",
                sa.port()
            ));
        }
    }
    if let Some(j) = devices[..i].iter().position(|o| own_address(o) == Some(ip)) {
        return Err(format!(
            "{ip} is already the address of rfideas[{j}]; give each device its own address (a print server tells readers apart by address)"
        ));
    }
    // A Host header with this IP must name one device only.
    if let Some(j) = devices.iter().enumerate().position(|(k, o)| {
        k != i
            && normalise_host(&o.host)
                .parse::<IpAddr>()
                .ok()
                .map(|h| h.to_canonical())
                == Some(ip)
    }) {
        return Err(format!(
            "{ip} is the host of rfideas[{j}]; a request naming {ip} would name two devices"
        ));
    }
    Ok(())
}

/// Checks a pin: at most one of the two forms, the hash 64 hex digits.
fn check_pin(cert: Option<&std::path::Path>, sha256: &str) -> Result<(), String> {
    if cert.is_some() && !sha256.is_empty() {
        return Err(
            "set either pin_cert (the certificate file) or pin_sha256 (its hash), not both".into(),
        );
    }
    if !sha256.is_empty() && pin::parse_sha256(sha256).is_none() {
        return Err(format!(
            "{:?} is not a SHA-256 in hex; write the 64 hex digits of the certificate's DER hash (e.g. from `openssl x509 -in cert.pem -outform der | sha256sum`), ':' separators allowed",
            trunc(sha256, 100)
        ));
    }
    Ok(())
}

/// A setting name outside `A-Z a-z 0-9 . _ -` or of the wrong length (shown cut).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting name {0:?} must have 1 to {MAX_KEY} characters from A-Z a-z 0-9 . _ -")]
struct BadSettingName(String);

/// Why a configuration request's settings were not stored (nothing of it is).
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    /// A name that is not a setting name.
    #[error("{0}")]
    Name(#[from] BadSettingName),
    /// A setting given twice.
    #[error("setting {0:?} is given twice")]
    Twice(String),
    /// A value over the limit.
    #[error("setting {name:?} is longer than {max} bytes")]
    TooLong { name: String, max: usize },
    /// A URL template that cannot be used.
    #[error("setting {name:?}: {error}")]
    Template {
        name: String,
        error: client::TemplateError,
    },
    /// More settings than a device stores.
    #[error("a device stores at most {max} settings; this request would make {total}")]
    TooMany { max: usize, total: usize },
    /// The database did not store them.
    #[error("settings not stored: {hint}", hint = .0.operator_hint())]
    Store(crate::state::StoreError),
}

fn check_key(k: &str) -> Result<(), BadSettingName> {
    if k.is_empty()
        || k.len() > MAX_KEY
        || !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(BadSettingName(k.chars().take(70).collect()));
    }
    Ok(())
}

/// Lower case, without a trailing dot.
fn normalise_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn valid_host(h: &str) -> bool {
    if h.parse::<IpAddr>().is_ok() {
        return true;
    }
    !h.is_empty()
        && h.len() <= MAX_HOST
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The device's MAC-style id: configured, or `02:53:43:MM:MM:RR` (a locally administered
/// address from the machine id and a hash of the reader id).
pub(crate) fn device_mac(d: &RfideasDevice) -> String {
    if !d.mac.is_empty() {
        return d.mac.to_ascii_lowercase();
    }
    let h = d
        .reader
        .bytes()
        .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let [hi, lo] = d.machine.to_be_bytes();
    format!("02:53:43:{hi:02x}:{lo:02x}:{h:02x}")
}

/// The host part of a `Host` header value: without port, lower case, no trailing dot.
pub(crate) fn host_name(value: &str) -> String {
    let v = value.trim();
    // A bare IPv6 address (not valid HTTP, but unambiguous) has no port to drop.
    let host = if v.parse::<IpAddr>().is_ok() {
        v
    } else if let Some(rest) = v.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match v.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        }
    };
    normalise_host(host)
}

/// Why a configuration request names no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unresolved {
    /// No (or an empty) `Host` on a listener shared by several devices.
    #[error("no Host header: name the 241 device by its host name or address")]
    NoHost,
    /// No device has that host name or address.
    #[error("no 241 device is named {0:?}")]
    Unknown(String),
}

/// The device a connection is for before its request is read: `listener`'s own device
/// (a device's `listen` or `address` listener), else the device whose `address` is the
/// connection's local address (a wildcard shared listener). `None`: decided per request
/// by [`resolve`]. `addresses` are the devices' `address`es, in order.
pub(crate) fn connection_device(
    addresses: impl IntoIterator<Item = Option<IpAddr>>,
    listener: Option<usize>,
    local: Option<SocketAddr>,
) -> Option<usize> {
    if listener.is_some() {
        return listener;
    }
    let local = local?.ip().to_canonical();
    addresses.into_iter().position(|a| a == Some(local))
}

/// The device a request is for. A connection's device ([`connection_device`]) wins
/// whatever the `Host` says: a print server that knows the reader by address may send
/// anything there. Otherwise the `Host` header's host part (port dropped, case and a
/// trailing dot ignored) names the device by its host name, or by its `address` when the
/// print server addresses the reader by IP (`Host: 127.0.0.23:8241`). `devices` are
/// (normalised host, address) in order.
pub(crate) fn resolve<'a>(
    devices: impl IntoIterator<Item = (&'a str, Option<IpAddr>)> + Clone,
    fixed: Option<usize>,
    host: Option<&str>,
) -> Result<usize, Unresolved> {
    if let Some(i) = fixed {
        return Ok(i);
    }
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Err(Unresolved::NoHost);
    };
    if let Some(i) = devices.clone().into_iter().position(|(h, _)| h == host) {
        return Ok(i);
    }
    let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    ip.and_then(|ip| devices.into_iter().position(|(_, a)| a == Some(ip)))
        .ok_or_else(|| Unresolved::Unknown(host.to_string()))
}

/// Why the 241 bridge could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RfideasError {
    /// The CA file for print servers could not be used.
    #[error("cannot use {} as the CA for print servers ([rfideas_bridge] ca): {detail}", .path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A pinned print-server certificate could not be used.
    #[error("cannot use {} as a pinned print-server certificate ({key}): {detail}", .path.display())]
    Pin {
        /// The setting.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The settings table could not be read or created.
    #[error("{}", .0.operator_hint())]
    Store(#[from] state::StoreError),
}

/// How a swipe left the 241 bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The print server answered `2xx`.
    Delivered {
        /// The print server's host and port.
        server: String,
        /// Its status code.
        status: u16,
        /// Attempts it took.
        attempts: u32,
    },
    /// The swipe's lifetime ended before a print server took it.
    Expired {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last_error: String,
    },
    /// Given up for good (redirect, `4xx`, certificate, no URL).
    Failed {
        /// Why.
        reason: String,
    },
}

/// One swipe's outcome on this bridge's outcome channel.
pub(crate) type OutcomeReport = crate::bridges::OutcomeReport<Outcome>;

/// What [`RfideasBridge::status`] reports per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceStatus {
    /// The device.
    pub key: DeviceKey,
    /// Its host name.
    pub host: String,
    /// Its MAC-style id.
    pub mac: String,
    /// Its own listener, if any.
    pub listen: Option<SocketAddr>,
    /// Its own address (configuration there, swipes from there), if any.
    pub address: Option<IpAddr>,
    /// Settings stored.
    pub settings: usize,
    /// Host and port of the swipe URL in use, if any.
    pub swipe_server: Option<String>,
    /// Last configuration request: when (Unix ms) and from where.
    pub last_config: Option<(i64, SocketAddr)>,
    /// Swipes being sent.
    pub in_flight: usize,
    /// Swipes delivered.
    pub delivered: u64,
    /// Swipes expired before a print server took them.
    pub expired: u64,
    /// Swipes given up (redirect, refused, certificate, no URL).
    pub failed: u64,
    /// Swipes refused because `in_flight_max` were in flight.
    pub busy: u64,
    /// Failed attempts (each retried or final).
    pub attempt_failures: u64,
    /// Requests refused because the peer was not on the allow list.
    pub refused_peers: u64,
    /// The last error and when (Unix ms).
    pub last_error: Option<(i64, String)>,
}

impl DeviceStatus {
    /// One line for the operator's `status`; `time` formats Unix milliseconds.
    pub(crate) fn summary(&self, time: impl Fn(i64) -> String) -> String {
        let cfg = match self.last_config {
            Some((t, peer)) => format!("last configured by {peer} at {}", time(t)),
            None => "not configured by a print server since start".into(),
        };
        let url = self
            .swipe_server
            .clone()
            .unwrap_or_else(|| "no swipe URL".into());
        let err = match &self.last_error {
            Some((t, e)) => format!("last error at {}: {e}", time(*t)),
            None => "no errors".into(),
        };
        let address = self
            .address
            .map(|a| format!(", address {a}"))
            .unwrap_or_default();
        format!(
            "rfideas {} (host {}{address}, id {}): {} settings, swipes to {url}; {cfg}; {} in flight, {} delivered, {} expired, {} failed, {} failed attempts, {} refused peers; {err}",
            self.key,
            self.host,
            self.mac,
            self.settings,
            self.in_flight,
            self.delivered,
            self.expired,
            self.failed,
            self.attempt_failures,
            self.refused_peers
        )
    }
}

#[derive(Debug, Default)]
struct DevState {
    settings: BTreeMap<String, String>,
    listen: Option<SocketAddr>,
    last_config: Option<(i64, SocketAddr)>,
    in_flight: usize,
    delivered: u64,
    expired: u64,
    failed: u64,
    /// Swipes refused because `in_flight_max` were in flight.
    busy: u64,
    attempt_failures: u64,
    refused_peers: u64,
    last_error: Option<(i64, String)>,
}

#[derive(Debug)]
struct Device {
    key: DeviceKey,
    cfg: RfideasDevice,
    host: String,
    mac: String,
    allow: Vec<IpAddr>,
    /// Its own address (configuration served there, swipes sent from there).
    address: Option<IpAddr>,
    /// Its own TLS client when it pins a certificate; else the bridge's.
    tls: Option<PinnedTls>,
    state: Mutex<DevState>,
}

/// A device's own TLS client (its pin).
struct PinnedTls(tokio_rustls::TlsConnector);

impl fmt::Debug for PinnedTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinnedTls")
    }
}

impl Device {
    fn lock(&self) -> MutexGuard<'_, DevState> {
        self.state.lock_unpoisoned()
    }

    fn allows(&self, ip: IpAddr) -> bool {
        self.allow.contains(&ip.to_canonical())
    }
}

/// Counters of the bridge as a whole.
#[derive(Debug)]
struct Counters {
    /// Configuration-side answers by status code.
    requests: CounterFamily,
    /// Settings changed.
    changes: AtomicU64,
    /// Failed attempts by device and reason.
    attempt_failures: CounterFamily,
}

const STATUSES: &[&str] = &["200", "400", "403", "404", "405", "408", "431", "505"];

/// The listeners of the bridge, bound by [`RfideasBridge::bind`].
#[derive(Debug, Default)]
pub struct Listeners {
    /// The shared listener (devices by `Host`).
    pub shared: Option<TcpListener>,
    /// Per-device listeners: (device index, listener).
    pub per_device: Vec<(usize, TcpListener)>,
}

/// The 241 bridge.
pub(crate) struct RfideasBridge {
    devices: Vec<Device>,
    settings: RfideasSettings,
    /// The devices' stored settings (and their audit records).
    store: Arc<dyn DeviceSettings>,
    tls: tokio_rustls::TlsConnector,
    outcomes: mpsc::Sender<OutcomeReport>,
    /// Serialises configuration changes (database, then memory).
    config_lock: tokio::sync::Mutex<()>,
    /// Cancelled when the SCM shuts down: swipes being sent stop.
    stop: CancellationToken,
    counters: Counters,
    lost_reports: AtomicU64,
}

impl fmt::Debug for RfideasBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RfideasBridge")
            .field(
                "devices",
                &self
                    .devices
                    .iter()
                    .map(|d| d.key.to_string())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The fingerprint of a pin (`key` names the setting in errors), if one is set.
fn load_pin(
    key: &str,
    cert: Option<&std::path::Path>,
    sha256: &str,
) -> Result<Option<pin::Fingerprint>, RfideasError> {
    if let Some(path) = cert {
        return pin::load_cert(path)
            .map(Some)
            .map_err(|detail| RfideasError::Pin {
                key: key.into(),
                path: path.to_path_buf(),
                detail,
            });
    }
    // The form was checked at load (`validate`).
    Ok(pin::parse_sha256(sha256))
}

/// Loads PEM certificates into a root store; also returns them (see [`pin`]: a server
/// presenting one of them as its own certificate is accepted as if it were pinned).
pub(crate) fn load_roots(
    path: &std::path::Path,
) -> Result<
    (
        rustls::RootCertStore,
        Vec<rustls::pki_types::CertificateDer<'static>>,
    ),
    RfideasError,
> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |detail: String| RfideasError::Ca {
        path: path.to_path_buf(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut certs = Vec::new();
    for c in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let c = c.map_err(|e| bad(format!("malformed PEM: {e}")))?;
        roots
            .add(c.clone())
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        certs.push(c);
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate found".into()));
    }
    Ok((roots, certs))
}

// The bridge spawns a task per swipe that outlives the call, so it is shared as an `Arc`.
impl Bridge for Arc<RfideasBridge> {
    fn name(&self) -> &'static str {
        "rfideas"
    }

    fn route(&self, machine: u16, reader: &str) -> Route {
        RfideasBridge::route(self, machine, reader)
    }

    fn admit(&self, machine: u16, reader: &str) -> Result<(), SubmitError> {
        let idx = self.find(machine, reader).ok_or(SubmitError::NoDevice)?;
        let mut st = self.devices[idx].lock();
        if st.in_flight >= self.settings.in_flight_max {
            st.busy += 1;
            return Err(SubmitError::QueueFull {
                max: self.settings.in_flight_max,
            });
        }
        Ok(())
    }

    fn submit(&self, machine: u16, reader: &str, swipe: BridgeSwipe) -> Result<(), SubmitError> {
        RfideasBridge::submit(self, machine, reader, swipe)
    }
}

impl RfideasBridge {
    /// Creates the bridge: loads the CA for print servers and every device's stored
    /// settings. `outcomes` receives one report per swipe.
    pub(crate) fn new(
        devices: Vec<RfideasDevice>,
        settings: RfideasSettings,
        ca: &std::path::Path,
        store: Arc<dyn DeviceSettings>,
        outcomes: mpsc::Sender<OutcomeReport>,
    ) -> Result<Arc<RfideasBridge>, RfideasError> {
        let ca = settings.ca.clone().unwrap_or_else(|| ca.to_path_buf());
        let provider = client::provider();
        let connector = |v: pin::PinnedVerifier, path: &std::path::Path| {
            client::tls_config(Arc::new(v))
                .map(tokio_rustls::TlsConnector::from)
                .map_err(|e| RfideasError::Ca {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })
        };
        let bridge_pin = load_pin(
            "rfideas_bridge.pin_cert",
            settings.pin_cert.as_deref(),
            &settings.pin_sha256,
        )?;
        let pinned = |d: &RfideasDevice| d.pin_cert.is_some() || !d.pin_sha256.is_empty();
        let tls = if let Some(fp) = bridge_pin {
            connector(pin::PinnedVerifier::pinned(vec![fp], provider.clone()), &ca)?
        } else if devices.iter().all(pinned) {
            // Nothing is verified through the CA: do not require the file.
            connector(
                pin::PinnedVerifier::pinned(Vec::new(), provider.clone()),
                &ca,
            )?
        } else {
            let (roots, certs) = load_roots(&ca)?;
            let v = pin::PinnedVerifier::roots(Arc::new(roots), &certs, provider.clone()).map_err(
                |e| RfideasError::Ca {
                    path: ca.clone(),
                    detail: e.to_string(),
                },
            )?;
            connector(v, &ca)?
        };
        let mut own_tls = Vec::with_capacity(devices.len());
        for (i, d) in devices.iter().enumerate() {
            let fp = load_pin(
                &format!("rfideas[{i}].pin_cert"),
                d.pin_cert.as_deref(),
                &d.pin_sha256,
            )?;
            own_tls.push(match fp {
                Some(fp) => Some(PinnedTls(connector(
                    pin::PinnedVerifier::pinned(vec![fp], provider.clone()),
                    d.pin_cert.as_deref().unwrap_or(&ca),
                )?)),
                None => None,
            });
        }
        let rows = store.load_all()?;
        let devices: Vec<Device> = devices
            .into_iter()
            .zip(own_tls)
            .map(|(cfg, tls)| {
                let key = DeviceKey {
                    machine: cfg.machine,
                    reader: cfg.reader.clone(),
                };
                let stored: BTreeMap<String, String> = rows
                    .iter()
                    .filter(|s| s.machine == key.machine && s.reader == key.reader)
                    .map(|s| (s.name.clone(), s.value.clone()))
                    .collect();
                Device {
                    host: normalise_host(&cfg.host),
                    mac: device_mac(&cfg),
                    allow: cfg.allow.iter().map(IpAddr::to_canonical).collect(),
                    address: own_address(&cfg),
                    tls,
                    key,
                    cfg,
                    state: Mutex::new(DevState {
                        settings: stored,
                        ..DevState::default()
                    }),
                }
            })
            .collect();
        for d in &devices {
            let n = d.lock().settings.len();
            tracing::info!(device = %d.key, host = %d.host, "rfideas device: {n} stored settings");
        }
        let statuses: Vec<[&str; 1]> = STATUSES.iter().map(|s| [*s]).collect();
        let presets: Vec<&[&str]> = statuses.iter().map(|s| &s[..]).collect();
        Ok(Arc::new(RfideasBridge {
            devices,
            settings,
            store,
            tls,
            outcomes,
            config_lock: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            counters: Counters {
                requests: CounterFamily::with(&["status"], &presets),
                changes: AtomicU64::new(0),
                attempt_failures: CounterFamily::new(&["device", "reason"]),
            },
            lost_reports: AtomicU64::new(0),
        }))
    }

    /// Whether any device is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Binds the shared listener at `shared` (if any device exists and the address is not
    /// empty), each device's own listener (`listen`), and one listener per device address
    /// (`address`, on the shared listener's port: a print server configures readers on
    /// port 80, whatever their address), logging `listening on ADDR (rfideas)` and
    /// `listening on ADDR (rfideas M/R)`. A shared listener on a wildcard address already
    /// receives the devices' addresses (and a second socket on the same port could not be
    /// bound): its connections are told apart by the local address they reached.
    pub(crate) async fn bind(&self, shared: &str) -> std::io::Result<Listeners> {
        let mut out = Listeners::default();
        if self.devices.is_empty() {
            return Ok(out);
        }
        let mut shared_addr = None;
        if !shared.is_empty() {
            let l = scm_common::bind(shared, "rfideas").await?;
            shared_addr = Some(l.local_addr()?);
            out.shared = Some(l);
        }
        for (i, d) in self.devices.iter().enumerate() {
            let name = format!("rfideas {}", d.key);
            let l = match (d.address, shared_addr) {
                (Some(ip), Some(sa)) if sa.ip().is_unspecified() => {
                    tracing::info!(device = %d.key, "served at {} by the shared listener {sa}", SocketAddr::new(ip, sa.port()));
                    d.lock().listen = Some(SocketAddr::new(ip, sa.port()));
                    continue;
                }
                // Validation requires the shared listener for an address's port.
                (Some(ip), Some(sa)) => {
                    scm_common::bind(&SocketAddr::new(ip, sa.port()).to_string(), &name).await?
                }
                _ if !d.cfg.listen.is_empty() => scm_common::bind(&d.cfg.listen, &name).await?,
                _ => continue,
            };
            d.lock().listen = Some(l.local_addr()?);
            out.per_device.push((i, l));
        }
        Ok(out)
    }

    /// The device a connection is for before its request is read: the listener's own
    /// device, else the device whose `address` the connection reached.
    fn connection_device(
        &self,
        listener: Option<usize>,
        local: Option<SocketAddr>,
    ) -> Option<usize> {
        connection_device(self.devices.iter().map(|d| d.address), listener, local)
    }

    /// Serves the listeners until `shutdown` is cancelled; then stops swipes in flight.
    pub(crate) async fn serve(self: Arc<Self>, listeners: Listeners, shutdown: CancellationToken) {
        let mut tasks = JoinSet::new();
        let all = listeners
            .shared
            .map(|l| (None, l, "rfideas".to_string()))
            .into_iter()
            .chain(
                listeners
                    .per_device
                    .into_iter()
                    .map(|(i, l)| (Some(i), l, format!("rfideas {}", self.devices[i].key))),
            );
        for (fixed, listener, name) in all {
            let bridge = self.clone();
            let opts = ServeOptions::new(name, self.settings.max_connections);
            tasks.spawn(scm_common::serve(
                listener,
                opts,
                shutdown.clone(),
                move |stream: tokio::net::TcpStream, peer, token| {
                    let bridge = bridge.clone();
                    let fixed = bridge.connection_device(fixed, stream.local_addr().ok());
                    async move { bridge.handle_conn(stream, peer, fixed, token).await }
                },
            ));
        }
        shutdown.cancelled().await;
        self.stop.cancel();
        while tasks.join_next().await.is_some() {}
    }

    #[cfg(test)]
    /// Stops swipes in flight (also done by [`RfideasBridge::serve`] at shutdown).
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    fn find(&self, machine: u16, reader: &str) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.key.machine == machine && d.key.reader == reader)
    }

    /// The swipe URL template a device uses now: the stored setting, else the
    /// configuration's `swipe_url`.
    fn template(&self, dev: &Device) -> Option<String> {
        let st = dev.lock();
        st.settings
            .get(&self.settings.url_setting)
            .filter(|v| !v.is_empty())
            .cloned()
            .or_else(|| Some(dev.cfg.swipe_url.clone()).filter(|v| !v.is_empty()))
    }

    /// Whether swipes of this reader go to a 241 device.
    pub(crate) fn route(&self, machine: u16, reader: &str) -> Route {
        match self.find(machine, reader) {
            None => Route::None,
            Some(i) if self.template(&self.devices[i]).is_some() => Route::Ready,
            Some(_) => Route::NotConfigured,
        }
    }

    /// Sends a swipe in the background; returns at once. Every swipe accepted here gets
    /// exactly one [`OutcomeReport`].
    pub(crate) fn submit(
        self: &Arc<Self>,
        machine: u16,
        reader: &str,
        swipe: BridgeSwipe,
    ) -> Result<(), SubmitError> {
        let idx = self.find(machine, reader).ok_or(SubmitError::NoDevice)?;
        let dev = &self.devices[idx];
        {
            let mut st = dev.lock();
            if st.in_flight >= self.settings.in_flight_max {
                st.busy += 1;
                return Err(SubmitError::QueueFull {
                    max: self.settings.in_flight_max,
                });
            }
            st.in_flight += 1;
        }
        let bridge = self.clone();
        tokio::spawn(async move {
            let dev = &bridge.devices[idx];
            let event_id = swipe.event_id.clone();
            let outcome = tokio::select! {
                biased;
                () = bridge.stop.cancelled() => None,
                o = bridge.deliver(dev, &swipe) => Some(o),
            };
            dev.lock().in_flight -= 1;
            if let Some(outcome) = outcome {
                bridge.finish(dev, event_id, &swipe, outcome);
            }
        });
        Ok(())
    }

    /// Tries until delivered, failed for good, or expired.
    async fn deliver(&self, dev: &Device, swipe: &BridgeSwipe) -> Outcome {
        let mut attempts = 0u32;
        let mut last_error = String::from("no attempt was made before the swipe expired");
        // Unjittered: one swipe is retried against one print server, nothing to spread.
        let backoff =
            Backoff::from_millis(self.settings.retry_initial_ms, self.settings.retry_max_ms);
        let connect = Duration::from_millis(self.settings.connect_timeout_ms);
        let respond = Duration::from_millis(self.settings.response_timeout_ms);
        let tries = async {
            loop {
                // Never start an attempt at or after the expiry instant.
                if Instant::now() >= swipe.expires_at {
                    return Outcome::Expired {
                        attempts,
                        last_error: last_error.clone(),
                    };
                }
                let Some(template) = self.template(dev) else {
                    return Outcome::Failed {
                        reason: format!(
                            "no swipe URL: the print server has not stored the {:?} setting and [[rfideas]] swipe_url is empty",
                            self.settings.url_setting
                        ),
                    };
                };
                let vars = client::Vars {
                    card: &swipe.card,
                    device: &dev.mac,
                    time_ms: now_ms(),
                    machine: dev.key.machine,
                    reader: &dev.key.reader,
                    event: &swipe.event_id,
                };
                let target = match client::render(&template, &vars) {
                    Ok(t) => t,
                    Err(e) => {
                        return Outcome::Failed {
                            reason: format!("the swipe URL is unusable: {e}"),
                        };
                    }
                };
                attempts += 1;
                let server = target.authority();
                let tls = dev.tls.as_ref().map_or(&self.tls, |t| &t.0);
                match client::get(tls, &target, dev.address, connect, respond).await {
                    Ok(a) if (200..300).contains(&a.status) => {
                        return Outcome::Delivered {
                            server,
                            status: a.status,
                            attempts,
                        };
                    }
                    Ok(a) if (300..400).contains(&a.status) => {
                        let to = a
                            .location
                            .as_deref()
                            .map(location_host)
                            .unwrap_or_else(|| "nowhere".into());
                        self.attempt_failed(dev, "redirect");
                        return Outcome::Failed {
                            reason: format!(
                                "{server} answered HTTP {} (redirect to {to}); redirects are not followed: configure the final URL",
                                a.status
                            ),
                        };
                    }
                    Ok(a) if (400..500).contains(&a.status) => {
                        self.attempt_failed(dev, "status");
                        return Outcome::Failed {
                            reason: format!("{server} refused the swipe with HTTP {}", a.status),
                        };
                    }
                    Ok(a) => {
                        self.attempt_failed(dev, "status");
                        last_error = format!("{server} answered HTTP {}", a.status);
                    }
                    Err(e) => {
                        self.attempt_failed(dev, e.reason());
                        if !e.retryable() {
                            return Outcome::Failed {
                                reason: e.to_string(),
                            };
                        }
                        last_error = e.to_string();
                    }
                }
                let pause = backoff.delay(attempts - 1);
                tracing::debug!(device = %dev.key, event = %swipe.event_id, "attempt {attempts} failed: {last_error}; retrying in {pause:?}");
                dev.lock().last_error = Some((now_ms(), last_error.clone()));
                tokio::time::sleep(pause).await;
            }
        };
        // Nothing is sent after the expiry: the attempt in progress is dropped then.
        match tokio::time::timeout_at(swipe.expires_at, tries).await {
            Ok(o) => o,
            Err(_) => Outcome::Expired {
                attempts,
                last_error,
            },
        }
    }

    fn attempt_failed(&self, dev: &Device, reason: &str) {
        dev.lock().attempt_failures += 1;
        self.counters
            .attempt_failures
            .inc(&[&dev.key.to_string(), reason]);
    }

    fn finish(&self, dev: &Device, event_id: String, swipe: &BridgeSwipe, outcome: Outcome) {
        let card = mask(&swipe.card);
        {
            let mut st = dev.lock();
            match &outcome {
                Outcome::Delivered { .. } => st.delivered += 1,
                Outcome::Expired { last_error, .. } => {
                    st.expired += 1;
                    st.last_error = Some((now_ms(), format!("swipe expired: {last_error}")));
                }
                Outcome::Failed { reason } => {
                    st.failed += 1;
                    st.last_error = Some((now_ms(), reason.clone()));
                }
            }
        }
        match &outcome {
            Outcome::Delivered {
                server,
                status,
                attempts,
            } => {
                crate::metrics::global()
                    .swipe_forward
                    .observe_duration(swipe.received_at.elapsed());
                tracing::info!(device = %dev.key, event = %event_id, card = %card, "card delivered to {server} (HTTP {status}, attempt {attempts})");
            }
            Outcome::Expired {
                attempts,
                last_error,
            } => {
                tracing::warn!(device = %dev.key, event = %event_id, card = %card, "swipe expired undelivered after {attempts} attempts; last error: {last_error}");
            }
            Outcome::Failed { reason } => {
                tracing::warn!(device = %dev.key, event = %event_id, card = %card, "swipe failed: {reason}");
            }
        }
        let report = OutcomeReport {
            key: dev.key.clone(),
            event_id,
            outcome,
        };
        if self.outcomes.try_send(report).is_err() {
            let n = self.lost_reports.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(device = %dev.key, "outcome channel full or closed; report lost ({n} so far)");
        }
    }

    /// Status of every device of a machine (all if `machine` is `None`).
    pub(crate) fn status(&self, machine: Option<u16>) -> Vec<DeviceStatus> {
        self.devices
            .iter()
            .filter(|d| machine.is_none_or(|m| d.key.machine == m))
            .map(|d| {
                let template = self.template(d);
                let st = d.lock();
                DeviceStatus {
                    key: d.key.clone(),
                    host: d.host.clone(),
                    mac: d.mac.clone(),
                    listen: st.listen,
                    address: d.address,
                    settings: st.settings.len(),
                    swipe_server: template.and_then(|t| {
                        let v = client::Vars {
                            card: "",
                            device: "",
                            time_ms: 0,
                            machine: 0,
                            reader: "",
                            event: "",
                        };
                        client::render(&t, &v).ok().map(|t| t.authority())
                    }),
                    last_config: st.last_config,
                    in_flight: st.in_flight,
                    delivered: st.delivered,
                    expired: st.expired,
                    failed: st.failed,
                    busy: st.busy,
                    attempt_failures: st.attempt_failures,
                    refused_peers: st.refused_peers,
                    last_error: st.last_error.clone(),
                }
            })
            .collect()
    }

    #[cfg(test)]
    /// The device's stored settings (for tests and tools).
    pub(crate) fn settings_of(
        &self,
        machine: u16,
        reader: &str,
    ) -> Option<BTreeMap<String, String>> {
        self.find(machine, reader)
            .map(|i| self.devices[i].lock().settings.clone())
    }

    /// The bridge's metrics in the Prometheus text format.
    pub(crate) fn metrics_text(&self) -> String {
        let mut e = Exposition::new();
        e.family(
            "scm_rfideas_requests_total",
            "Configuration-side HTTP requests answered by the 241 bridge, by status code.",
            &self.counters.requests,
        );
        e.counter(
            "scm_rfideas_setting_changes_total",
            "Device settings changed by print servers' configuration requests.",
            self.counters.changes.load(Ordering::Relaxed),
        );
        let status = self.status(None);
        e.header(
            "scm_rfideas_swipes_total",
            Kind::Counter,
            "Swipes the 241 bridge finished or refused, by device and outcome (delivered, expired, failed; busy: refused at in_flight_max).",
        );
        for d in &status {
            let name = d.key.to_string();
            for (outcome, v) in [
                ("delivered", d.delivered),
                ("expired", d.expired),
                ("failed", d.failed),
                ("busy", d.busy),
            ] {
                e.sample(
                    "scm_rfideas_swipes_total",
                    &[("device", &name), ("outcome", outcome)],
                    v,
                );
            }
        }
        e.family(
            "scm_rfideas_attempt_failures_total",
            "Failed attempts to send a swipe to a print server, by device and reason (connect, certificate, tls, timeout, io, protocol, status, redirect).",
            &self.counters.attempt_failures,
        );
        e.header(
            "scm_rfideas_swipes_in_flight",
            Kind::Gauge,
            "Swipes the 241 bridge is sending now, by device.",
        );
        for d in &status {
            e.sample(
                "scm_rfideas_swipes_in_flight",
                &[("device", &d.key.to_string())],
                d.in_flight,
            );
        }
        e.header(
            "scm_rfideas_refused_peers_total",
            Kind::Counter,
            "Requests to a 241 device refused because the peer is not on its allow list.",
        );
        for d in &status {
            e.sample(
                "scm_rfideas_refused_peers_total",
                &[("device", &d.key.to_string())],
                d.refused_peers,
            );
        }
        e.finish()
    }

    /// Serves one configuration-side connection (any byte stream, for tests).
    pub(crate) async fn handle_conn<S: AsyncRead + AsyncWrite + Unpin>(
        self: Arc<Self>,
        mut stream: S,
        peer: SocketAddr,
        fixed: Option<usize>,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        // A peer that may not configure any device here is answered 403 at once, without
        // waiting for its request: unlisted peers cannot hold connection slots (slowloris)
        // and learn nothing about the devices.
        if let Some(reply) = self.refuse_unlisted(peer, fixed) {
            self.count(reply.status);
            let bytes = http::response(reply.status, reply.reason, &reply.body, &[], true);
            let _ = self.write(&mut stream, &bytes).await;
            linger(&mut stream).await;
            return Ok(());
        }
        let max = self.settings.max_head_bytes;
        let header_timeout = Duration::from_millis(self.settings.header_timeout_ms);
        let idle_timeout = Duration::from_millis(self.settings.idle_timeout_ms);
        let mut buf = vec![0u8; max];
        let mut have = 0usize;
        let mut served = 0usize;
        loop {
            // The first request's head must arrive within the header timeout; later ones
            // may wait for the idle timeout for their first byte.
            let mut deadline = if served == 0 || have > 0 {
                Some(Instant::now() + header_timeout)
            } else {
                None
            };
            let idle_until = Instant::now() + idle_timeout;
            let parsed = loop {
                match http::parse_request(&buf[..have], max) {
                    Ok(Parse::Complete { head, len }) => break Ok((head, len)),
                    Ok(Parse::Partial) => {}
                    Err(e) => break Err(e),
                }
                let until = deadline.unwrap_or(idle_until);
                let read = tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    r = tokio::time::timeout_at(until, stream.read(&mut buf[have..])) => r,
                };
                match read {
                    Err(_) if have == 0 && deadline.is_none() => return Ok(()), // idle
                    Err(_) => {
                        self.count(408);
                        tracing::info!(%peer, "request head not complete within {} ms; closing", header_timeout.as_millis());
                        let body = format!(
                            "request head not received within {} ms\n",
                            header_timeout.as_millis()
                        );
                        let _ = self
                            .write(
                                &mut stream,
                                &http::response(408, "Request Timeout", &body, &[], true),
                            )
                            .await;
                        linger(&mut stream).await;
                        return Ok(());
                    }
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(0)) => return Ok(()),
                    Ok(Ok(n)) => {
                        if have == 0 && deadline.is_none() {
                            deadline = Some(Instant::now() + header_timeout);
                        }
                        have += n;
                    }
                }
            };
            let (head, len) = match parsed {
                Ok(x) => x,
                Err(e) => {
                    let (code, reason) = match &e {
                        HeadError::Invalid(_) => (400, "Bad Request"),
                        HeadError::TooLarge(_) => (431, "Request Header Fields Too Large"),
                        HeadError::Version(_) => (505, "HTTP Version Not Supported"),
                    };
                    self.count(code);
                    tracing::info!(%peer, "refused a request: {e}");
                    let _ = self
                        .write(
                            &mut stream,
                            &http::response(code, reason, &format!("{e}\n"), &[], true),
                        )
                        .await;
                    linger(&mut stream).await;
                    return Ok(());
                }
            };
            buf.copy_within(len..have, 0);
            have -= len;
            served += 1;
            let reply = self.answer(&head, peer, fixed).await;
            let keep = reply.keep
                && head.keep_alive()
                && served < self.settings.max_requests_per_connection;
            self.count(reply.status);
            let bytes = http::response(
                reply.status,
                reply.reason,
                &reply.body,
                &reply.headers,
                !keep,
            );
            self.write(&mut stream, &bytes).await?;
            if !keep {
                linger(&mut stream).await;
                return Ok(());
            }
        }
    }

    fn count(&self, status: u16) {
        self.counters.requests.inc(&[&status.to_string()]);
    }

    async fn write<S: AsyncWrite + Unpin>(&self, s: &mut S, bytes: &[u8]) -> std::io::Result<()> {
        let t = Duration::from_millis(self.settings.header_timeout_ms);
        tokio::time::timeout(t, async {
            s.write_all(bytes).await?;
            s.flush().await
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
    }

    /// Decides the answer to one request.
    async fn answer(
        &self,
        head: &http::RequestHead,
        peer: SocketAddr,
        fixed: Option<usize>,
    ) -> Reply {
        let ip = peer.ip().to_canonical();
        if let Some(reply) = self.refuse_unlisted(peer, fixed) {
            return reply;
        }
        if head.method != "GET" {
            return Reply {
                headers: vec![("Allow", "GET".into())],
                ..Reply::error(
                    405,
                    "Method Not Allowed",
                    format!("method {} is not supported; use GET", head.method),
                )
            };
        }
        let host = match http::header(&head.headers, "host") {
            Err(_) => return Reply::error(400, "Bad Request", "more than one Host header".into()),
            Ok(h) => h.map(host_name),
        };
        if http::header(&head.headers, "transfer-encoding")
            .map(|v| v.is_some())
            .unwrap_or(true)
            || http::header(&head.headers, "content-length")
                .map(|v| v.is_some_and(|v| v.trim() != "0"))
                .unwrap_or(true)
        {
            return Reply::error(
                400,
                "Bad Request",
                "a GET request must not have a body (Content-Length or Transfer-Encoding)".into(),
            );
        }
        let names = self.devices.iter().map(|d| (d.host.as_str(), d.address));
        let idx = match resolve(names, fixed, host.as_deref()) {
            Ok(i) => i,
            Err(e @ Unresolved::NoHost) => return Reply::error(400, "Bad Request", e.to_string()),
            Err(e @ Unresolved::Unknown(_)) => {
                return Reply::error(404, "Not Found", e.to_string());
            }
        };
        let dev = &self.devices[idx];
        if !dev.allows(ip) {
            dev.lock().refused_peers += 1;
            tracing::warn!(device = %dev.key, %peer, "refused a 241 request from {ip}: not on the device's allow list");
            return Reply::error(
                403,
                "Forbidden",
                format!("{ip} may not configure 241 device {}", dev.host),
            );
        }
        let (raw_path, query) = http::split_target(&head.target);
        let path = match http::percent_decode(raw_path, false) {
            Ok(p) => p,
            Err(e) => return Reply::error(400, "Bad Request", format!("request path: {e}")),
        };
        if path == self.settings.read_path {
            return self.settings_reply(dev);
        }
        if path != self.settings.config_path {
            return Reply::error(
                404,
                "Not Found",
                format!(
                    "unknown path {path:?}; this device answers GET {}?name=value&... and GET {}",
                    self.settings.config_path, self.settings.read_path
                ),
            );
        }
        let pairs = match http::parse_query(query.unwrap_or("")) {
            Ok(p) => p,
            Err(e) => return Reply::error(400, "Bad Request", e.to_string()),
        };
        if pairs.is_empty() {
            return Reply::error(
                400,
                "Bad Request",
                format!(
                    "no settings given; write GET {}?name=value&...",
                    self.settings.config_path
                ),
            );
        }
        match self.apply(dev, pairs, peer).await {
            Ok(()) => self.settings_reply(dev),
            Err(e @ ApplyError::Store(_)) => {
                Reply::error(503, "Service Unavailable", e.to_string())
            }
            Err(e) => Reply::error(400, "Bad Request", e.to_string()),
        }
    }

    /// `403` for a peer on no allow list of this listener's devices (then nothing else is
    /// looked at, so unlisted sources learn nothing, not even which hosts exist).
    fn refuse_unlisted(&self, peer: SocketAddr, fixed: Option<usize>) -> Option<Reply> {
        let ip = peer.ip().to_canonical();
        let allowed = match fixed {
            Some(i) => self.devices[i].allows(ip),
            None => self.devices.iter().any(|d| d.allows(ip)),
        };
        if allowed {
            return None;
        }
        if let Some(i) = fixed {
            self.devices[i].lock().refused_peers += 1;
        }
        tracing::warn!(%peer, "refused a 241 request from {ip}: not a configured print server address");
        Some(Reply::error(
            403,
            "Forbidden",
            format!("{ip} is not a configured print server address for this device"),
        ))
    }

    fn settings_reply(&self, dev: &Device) -> Reply {
        let st = dev.lock();
        let mut body = String::new();
        for (k, v) in &st.settings {
            body.push_str(k);
            body.push('=');
            body.push_str(&http::percent_encode(v));
            body.push('\n');
        }
        Reply {
            status: 200,
            reason: "OK",
            body,
            headers: vec![
                ("X-Device-Id", dev.mac.clone()),
                ("X-Device-Host", dev.host.clone()),
            ],
            keep: true,
        }
    }

    /// Checks and stores a configuration request's settings: all or nothing.
    async fn apply(
        &self,
        dev: &Device,
        pairs: Vec<(String, String)>,
        peer: SocketAddr,
    ) -> Result<(), ApplyError> {
        let mut seen = std::collections::HashSet::new();
        for (k, v) in &pairs {
            check_key(k)?;
            if !seen.insert(k.as_str()) {
                return Err(ApplyError::Twice(k.clone()));
            }
            if v.len() > self.settings.max_value_bytes {
                return Err(ApplyError::TooLong {
                    name: k.clone(),
                    max: self.settings.max_value_bytes,
                });
            }
            if *k == self.settings.url_setting
                && !v.is_empty()
                && let Err(e) = client::validate_template(v)
            {
                return Err(ApplyError::Template {
                    name: k.clone(),
                    error: e,
                });
            }
        }
        let _guard = self.config_lock.lock().await;
        let current = dev.lock().settings.clone();
        let changes: Vec<(String, String, Option<String>)> = pairs
            .into_iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| {
                let old = current.get(&k).cloned();
                (k, v, old)
            })
            .collect();
        let total = current.len() + changes.iter().filter(|(_, _, o)| o.is_none()).count();
        if total > self.settings.max_settings {
            return Err(ApplyError::TooMany {
                max: self.settings.max_settings,
                total,
            });
        }
        let now = now_ms();
        dev.lock().last_config = Some((now, peer));
        if changes.is_empty() {
            return Ok(());
        }
        let key = dev.key.clone();
        let host = dev.host.clone();
        let actor = format!("print-server {}", peer.ip().to_canonical());
        let source = peer.to_string();
        // One transaction for the settings and their audit records.
        let rows: Vec<SettingChange> = changes
            .iter()
            .map(|(k, v, old)| SettingChange {
                name: k.clone(),
                value: v.clone(),
                audit_detail: format!(
                    "rfideas {key} ({host}): {k} set to {:?} (was {})",
                    trunc(v, 200),
                    old.as_deref()
                        .map(|o| format!("{:?}", trunc(o, 200)))
                        .unwrap_or_else(|| "unset".into())
                ),
            })
            .collect();
        let res = self
            .store
            .store(
                key.machine,
                key.reader.clone(),
                rows,
                now,
                actor,
                source,
                "rfideas_config",
            )
            .await;
        if let Err(e) = res {
            tracing::error!(device = %dev.key, "cannot store 241 settings: {e}");
            return Err(ApplyError::Store(e));
        }
        let names: Vec<&str> = changes.iter().map(|(k, _, _)| k.as_str()).collect();
        tracing::info!(device = %dev.key, "settings changed by {peer}: {}", names.join(", "));
        self.counters
            .changes
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        let mut st = dev.lock();
        for (k, v, _) in changes {
            st.settings.insert(k, v);
        }
        Ok(())
    }
}

/// How long a closing connection's unread input is drained.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes drained from a closing connection.
const LINGER_BYTES: usize = 256 * 1024;

/// Closes our side, then reads and discards what the client still sends (bounded in time
/// and bytes), so the kernel does not answer unread input with a reset that would destroy
/// the response before the client read it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let _ = tokio::time::timeout(LINGER, s.shutdown()).await;
    let mut sink = [0u8; 2048];
    let _ = tokio::time::timeout(LINGER, async {
        let mut total = 0;
        while total < LINGER_BYTES {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

fn trunc(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The host of a `Location` value, for messages (never the whole URL: it may carry the
/// card number).
fn location_host(loc: &str) -> String {
    let rest = loc
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or("(relative)");
    let host: String = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(100)
        .collect();
    if host.is_empty() {
        "(same host)".into()
    } else {
        host
    }
}

/// One answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    reason: &'static str,
    body: String,
    headers: Vec<(&'static str, String)>,
    keep: bool,
}

impl Reply {
    fn error(status: u16, reason: &'static str, msg: String) -> Reply {
        Reply {
            status,
            reason,
            body: format!("{msg}\n"),
            headers: Vec::new(),
            // A client that sent something we refuse gets a clean slate.
            keep: status == 404,
        }
    }
}
