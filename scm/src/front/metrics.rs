//! The SCM's Prometheus exposition and health check, served on `[listen] metrics`
//! (`GET /metrics`, `GET /health`; see `docs/operations.md` for the list). The counters
//! themselves live in [`crate::metrics`]; this front end only gathers and renders them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use scm_common::http::Unhealthy;
use scm_common::metrics::{Exposition, Kind};

use crate::bridges::generic::DeviceStatus;
use crate::metrics::{ScmMetrics, global};
use crate::ops::Ops;
use crate::ops::swipes::SwipeStats;

/// Everything a scrape shows, gathered.
#[derive(Debug)]
pub(crate) struct Snapshot<'a> {
    /// Event counters.
    pub metrics: &'a ScmMetrics,
    /// Machines with a live link.
    pub agents_connected: usize,
    /// Swipe counters.
    pub swipes: &'a SwipeStats,
    /// Generic devices.
    pub devices: Vec<DeviceStatus>,
    /// What the connected agents report of swipes they refused or dropped.
    pub agent_refusals: crate::coord::sessions::AgentRefusals,
}

/// Renders the text exposition.
pub(crate) fn render(s: &Snapshot<'_>) -> String {
    let m = s.metrics;
    let mut e = Exposition::new();
    e.gauge(
        "scm_agents_connected",
        "Machines with a live agent link (HELLO accepted).",
        i64::try_from(s.agents_connected).unwrap_or(i64::MAX),
    );
    e.counter(
        "scm_agent_connections_total",
        "Agent links whose HELLO was accepted.",
        m.agent_connections.get(),
    );
    e.family(
        "scm_handshake_failures_total",
        "TLS handshakes refused, by listener (agents, telnet-tls, admin) and reason.",
        &m.handshake_failures,
    );
    e.family(
        "scm_pushes_total",
        "Configuration deliveries to machines, by outcome (ack, nack, unreachable).",
        &m.pushes,
    );
    e.histogram(
        "scm_push_duration_seconds",
        "Time from starting a delivery to the machine's ACK or NACK.",
        &m.push_duration,
    );
    let sw = s.swipes;
    e.header(
        "scm_swipes_total",
        Kind::Counter,
        "Card swipes received from agents, by what became of them.",
    );
    // Delivered and expired come from the bridge's own per-device counters, which change
    // at the moment of the write or the expiry (the journal learns of them a moment later).
    let delivered: u64 = s.devices.iter().map(|d| d.delivered).sum();
    let expired: u64 = s.devices.iter().map(|d| d.expired).sum::<u64>()
        + sw.expired_unread.load(Ordering::Relaxed);
    for (outcome, v) in [
        ("queued", sw.queued.load(Ordering::Relaxed)),
        ("no_route", sw.no_route.load(Ordering::Relaxed)),
        ("duplicate", sw.duplicate.load(Ordering::Relaxed)),
        ("rejected", sw.rejected.load(Ordering::Relaxed)),
        ("busy", sw.busy.load(Ordering::Relaxed)),
        ("delivered", delivered),
        ("expired", expired),
    ] {
        e.sample("scm_swipes_total", &[("outcome", outcome)], v);
    }
    e.header(
        "scm_agent_swipes_dropped",
        Kind::Gauge,
        "Swipes the connected agents refused or dropped before they reached the SCM, as their heartbeats report (counted since each agent started), by reason.",
    );
    let r = s.agent_refusals;
    for (reason, v) in [
        ("invalid_card", r.invalid),
        ("queue_full", r.queue_full),
        ("expired", r.expired),
    ] {
        e.sample("scm_agent_swipes_dropped", &[("reason", reason)], v);
    }
    e.histogram(
        "scm_swipe_forward_seconds",
        "Time from receiving a SWIPE to having written the card to the print server.",
        &m.swipe_forward,
    );
    e.header(
        "scm_bridge_connections",
        Kind::Gauge,
        "1 when a print server is connected to the Generic device, else 0.",
    );
    let names: Vec<String> = s.devices.iter().map(|d| d.key.to_string()).collect();
    for (d, name) in s.devices.iter().zip(&names) {
        e.sample(
            "scm_bridge_connections",
            &[("device", name)],
            u8::from(d.connected.is_some()),
        );
    }
    e.header(
        "scm_bridge_refused_peers_total",
        Kind::Counter,
        "Connections to a Generic device refused because the peer is not on its allow list.",
    );
    for (d, name) in s.devices.iter().zip(&names) {
        e.sample(
            "scm_bridge_refused_peers_total",
            &[("device", name)],
            d.refused_peers,
        );
    }
    e.family(
        "scm_operator_logins_total",
        "Operator logins since the SCM started, by result (locked: refused because the source is locked out).",
        &m.logins,
    );
    e.family(
        "scm_frames_refused_total",
        "Frames refused on the agent link, by reason.",
        &m.frames_refused,
    );
    e.family(
        "scm_connections_refused_total",
        "Connections closed as soon as they were accepted, by listener and reason (per_source: the address already had the most connections allowed).",
        scm_common::serve::refused_connections(),
    );
    e.family(
        "scm_tls_sessions_revoked_total",
        "Established TLS sessions closed because a reload revoked their certificate, by listener.",
        &m.sessions_revoked,
    );
    e.family(
        "scm_tls_reloads_total",
        "Certificate and CRL reloads (SIGHUP), by result.",
        &m.tls_reloads,
    );
    e.finish()
}

/// How long a health check may take.
const DB_TIMEOUT: Duration = Duration::from_secs(2);

/// `/metrics` and `/health` for the SCM.
#[derive(Debug)]
pub(crate) struct Endpoints {
    ops: Arc<Ops>,
    /// The SCM's certificate and its CA, whose notAfter is exported.
    certificates: [(&'static str, std::path::PathBuf); 2],
}

impl Endpoints {
    /// Endpoints over the use-case layer's state, exporting the expiry of the SCM's
    /// certificate `cert` and CA `ca`.
    pub(crate) fn new(
        ops: Arc<Ops>,
        cert: std::path::PathBuf,
        ca: std::path::PathBuf,
    ) -> Endpoints {
        Endpoints {
            ops,
            certificates: [("scm", cert), ("ca", ca)],
        }
    }
}

impl Endpoints {
    /// Each configured machine's desired and applied generation (read from the state at
    /// scrape, bounded like the health check; left out when the state does not answer) and
    /// the notAfter of the SCM's certificate and CA (read from the files, so a renewed file
    /// shows before the SIGHUP that loads it). Label values come from the configuration.
    async fn fleet_and_certificates(&self) -> String {
        let mut e = Exposition::new();
        let q = self.ops.store.fleet().machines_with_desired(None);
        if let Ok(Ok((rows, _))) = tokio::time::timeout(DB_TIMEOUT, q).await {
            for (name, help, pick) in [
                (
                    "scm_machine_desired_generation",
                    "The machine's desired configuration generation.",
                    (|m: &crate::state::MachineRow| m.desired_generation) as fn(&_) -> u64,
                ),
                (
                    "scm_machine_applied_generation",
                    "The generation the machine last acknowledged (or reported applied).",
                    |m: &crate::state::MachineRow| m.applied_generation,
                ),
            ] {
                e.header(name, Kind::Gauge, help);
                for m in &rows {
                    e.sample(name, &[("machine", &m.id.to_string())], pick(m));
                }
            }
        }
        let certs = self
            .certificates
            .each_ref()
            .map(|(name, path)| (*name, scm_certs::identity::pem_file_not_after(path)));
        if certs.iter().any(|(_, t)| t.is_some()) {
            e.header(
                "scm_certificate_expiry_timestamp_seconds",
                Kind::Gauge,
                "notAfter of the SCM's certificate and CA, Unix seconds.",
            );
            for (name, t) in certs {
                if let Some(t) = t {
                    e.sample(
                        "scm_certificate_expiry_timestamp_seconds",
                        &[("certificate", name)],
                        t,
                    );
                }
            }
        }
        e.finish()
    }
}

impl Endpoints {
    /// `scm_database_writable`: 1 when the health probe's write (one row, no fsync)
    /// committed within the health check's bound, 0 when it failed or did not finish (a
    /// read-only file, a full disk, a lock held elsewhere).
    async fn database_writable(&self) -> String {
        let q = self.ops.store.health().write_probe();
        let ok = match tokio::time::timeout(DB_TIMEOUT, q).await {
            Ok(Ok(())) => 1u64,
            Ok(Err(e)) => {
                tracing::warn!("database not writable: {}", e.operator_hint());
                0
            }
            Err(_) => 0,
        };
        let mut e = Exposition::new();
        e.header(
            "scm_database_writable",
            Kind::Gauge,
            "1 when a write to the database succeeded at this scrape, else 0.",
        );
        e.sample("scm_database_writable", &[], ok);
        e.finish()
    }
}

impl scm_common::http::Endpoints for Endpoints {
    async fn metrics(&self) -> String {
        let mut text = render(&Snapshot {
            metrics: global(),
            agents_connected: self.ops.sessions.connected(),
            swipes: &self.ops.swipes.stats,
            devices: self.ops.swipes.bridge().status(None),
            agent_refusals: self.ops.sessions.refusals_total(),
        });
        text.push_str(&self.ops.swipes.bridge().metrics_text());
        text.push_str(&self.ops.swipes.rfideas().metrics_text());
        text.push_str(&self.fleet_and_certificates().await);
        text.push_str(&self.database_writable().await);
        text
    }

    async fn health(&self) -> Result<(), Unhealthy> {
        let q = self.ops.store.health().probe();
        match tokio::time::timeout(DB_TIMEOUT, q).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Unhealthy(format!("database unreachable: {e}"))),
            Err(_) => Err(Unhealthy(format!(
                "database did not answer within {} s",
                DB_TIMEOUT.as_secs()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridges::DeviceKey;

    #[test]
    fn renders_every_family_with_bounded_labels() {
        let m = ScmMetrics::default();
        m.agent_connections.inc();
        m.logins.inc(&["ok"]);
        m.logins.inc(&["ok"]);
        m.logins.inc(&["failed"]);
        m.handshake_failures.inc(&["agents", "unknown_ca"]);
        m.pushes.inc(&["ack"]);
        m.push_duration.observe(0.02);
        m.frames_refused.inc(&["oversize"]);
        let sw = SwipeStats::default();
        sw.duplicate.fetch_add(1, Ordering::Relaxed);
        let devices = vec![
            DeviceStatus {
                key: DeviceKey {
                    machine: 1,
                    reader: "r1".into(),
                },
                listen: None,
                connected: Some(("127.0.0.1:5000".parse().unwrap(), 0)),
                queued: 0,
                delivered: 2,
                expired: 0,
                refused_peers: 3,
            },
            DeviceStatus {
                key: DeviceKey {
                    machine: 2,
                    reader: "r1".into(),
                },
                listen: None,
                connected: None,
                queued: 0,
                delivered: 0,
                expired: 0,
                refused_peers: 0,
            },
        ];
        let text = render(&Snapshot {
            metrics: &m,
            agents_connected: 2,
            swipes: &sw,
            devices,
            agent_refusals: crate::coord::sessions::AgentRefusals {
                invalid: 3,
                queue_full: 0,
                expired: 1,
            },
        });
        for line in [
            "scm_agents_connected 2",
            "scm_agent_swipes_dropped{reason=\"invalid_card\"} 3",
            "scm_agent_swipes_dropped{reason=\"expired\"} 1",
            "scm_agent_connections_total 1",
            "scm_handshake_failures_total{listener=\"agents\",reason=\"unknown_ca\"} 1",
            "scm_pushes_total{outcome=\"ack\"} 1",
            "scm_pushes_total{outcome=\"nack\"} 0",
            "scm_pushes_total{outcome=\"unreachable\"} 0",
            "scm_push_duration_seconds_bucket{le=\"0.025\"} 1",
            "scm_push_duration_seconds_count 1",
            "scm_swipes_total{outcome=\"delivered\"} 2",
            "scm_swipes_total{outcome=\"duplicate\"} 1",
            "scm_swipes_total{outcome=\"expired\"} 0",
            "scm_swipe_forward_seconds_count 0",
            "scm_bridge_connections{device=\"1/r1\"} 1",
            "scm_bridge_connections{device=\"2/r1\"} 0",
            "scm_bridge_refused_peers_total{device=\"1/r1\"} 3",
            "scm_operator_logins_total{result=\"ok\"} 2",
            "scm_operator_logins_total{result=\"failed\"} 1",
            "scm_operator_logins_total{result=\"locked\"} 0",
            "scm_frames_refused_total{reason=\"oversize\"} 1",
            "scm_frames_refused_total{reason=\"stall\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample belongs to a family that has a TYPE line.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "no TYPE for {l}"
            );
        }
    }
}
