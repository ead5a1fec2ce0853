//! The agent's Prometheus metrics and health check, served on `[listen] metrics`
//! (`GET /metrics`, `GET /health`; see `docs/operations.md` for the list).
//!
//! Event counters live in one process-wide [`AgentMetrics`] ([`global`]); the swipe
//! counters and the queue length are read from the swipe queue when the metrics are
//! scraped. Labels come from small fixed sets only; never a card number.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};

use scm_common::metrics::{Counter, CounterFamily, Exposition, Gauge, Kind};

use crate::swipes::SwipeQueue;

/// Event counters of the agent.
#[derive(Debug)]
pub struct AgentMetrics {
    /// 1 while the event link to the SCM is up (HELLO acknowledged).
    pub link_up: Gauge,
    /// Event links established after the first one.
    pub reconnects: Counter,
    /// CONFIGs answered, by outcome.
    pub configs: CounterFamily,
    /// TLS handshakes that failed (config port and event link), by reason.
    pub handshake_failures: CounterFamily,
    /// notAfter (Unix seconds) of the machine's certificate; 0 until read.
    pub cert_machine_expiry: Gauge,
    /// notAfter (Unix seconds) of the CA certificate; 0 until read.
    pub cert_ca_expiry: Gauge,
    links: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            link_up: Gauge::default(),
            reconnects: Counter::default(),
            configs: CounterFamily::with(&["outcome"], &[&["ack"], &["nack"]]),
            handshake_failures: CounterFamily::new(&["reason"]),
            cert_machine_expiry: Gauge::default(),
            cert_ca_expiry: Gauge::default(),
            links: Counter::default(),
        }
    }
}

impl AgentMetrics {
    /// The event link is up; every link after the first counts as a reconnect.
    pub fn link_established(&self) {
        if self.links.get() > 0 {
            self.reconnects.inc();
        }
        self.links.inc();
        self.link_up.set(1);
    }

    /// The event link is down.
    pub fn link_lost(&self) {
        self.link_up.set(0);
    }

    /// Counts a failed TLS handshake.
    pub fn handshake_failed(&self, e: &scm_certs::tls::HandshakeError) {
        self.handshake_failures.inc(&[e.reason()]);
    }
}

impl AgentMetrics {
    /// Reads the expiry of the machine's and the CA's certificate (the first certificate
    /// of each PEM file) for `agent_certificate_expiry_timestamp_seconds`; a file that
    /// cannot be read or parsed leaves its gauge unchanged (the TLS set-up reports it).
    pub fn record_certificates(&self, files: &scm_certs::tls::TlsFiles) {
        if let Some(t) = not_after(&files.cert) {
            self.cert_machine_expiry.set(t);
        }
        if let Some(t) = not_after(&files.ca) {
            self.cert_ca_expiry.set(t);
        }
    }
}

use scm_certs::identity::pem_file_not_after as not_after;

static GLOBAL: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::default);

/// The process's metrics.
pub fn global() -> &'static AgentMetrics {
    &GLOBAL
}

/// Renders the text exposition.
pub fn render(m: &AgentMetrics, queue: &SwipeQueue) -> String {
    let mut e = Exposition::new();
    let certs = [
        ("machine", m.cert_machine_expiry.get()),
        ("ca", m.cert_ca_expiry.get()),
    ];
    if certs.iter().any(|(_, t)| *t > 0) {
        e.header(
            "agent_certificate_expiry_timestamp_seconds",
            Kind::Gauge,
            "notAfter of the agent's certificates (machine, ca), Unix seconds; re-read at SIGHUP.",
        );
        for (name, t) in certs.iter().filter(|(_, t)| *t > 0) {
            e.sample(
                "agent_certificate_expiry_timestamp_seconds",
                &[("certificate", name)],
                t,
            );
        }
    }
    e.gauge(
        "agent_scm_link_up",
        "1 while the event link to the SCM is up (HELLO acknowledged), else 0.",
        m.link_up.get(),
    );
    e.counter(
        "agent_scm_reconnects_total",
        "Event links to the SCM established after the first one.",
        m.reconnects.get(),
    );
    e.family(
        "agent_configs_total",
        "CONFIGs from the SCM answered, by outcome (ack, nack).",
        &m.configs,
    );
    let st = &queue.stats;
    e.header(
        "agent_swipes_total",
        Kind::Counter,
        "Card swipes read, by what became of them.",
    );
    for (outcome, c) in [
        ("accepted", &st.accepted),
        ("refused", &st.refused),
        ("debounced", &st.debounced),
        ("expired", &st.expired),
        ("queue_full", &st.queue_full),
        ("acked", &st.acked),
        ("nacked", &st.nacked),
    ] {
        e.sample(
            "agent_swipes_total",
            &[("outcome", outcome)],
            c.load(Ordering::Relaxed),
        );
    }
    e.gauge(
        "agent_swipe_queue",
        "Swipes waiting for the SCM's answer (sent or not yet sent).",
        i64::try_from(queue.len()).unwrap_or(i64::MAX),
    );
    e.family(
        "agent_handshake_failures_total",
        "TLS handshakes that failed on the config port or the event link, by reason.",
        &m.handshake_failures,
    );
    e.family(
        "agent_connections_refused_total",
        "Connections closed as soon as they were accepted, by listener and reason (per_source: the address already had the most connections allowed).",
        scm_common::serve::refused_connections(),
    );
    e.finish()
}

/// `/metrics` and `/health` for the agent.
#[derive(Debug)]
pub struct Endpoints {
    /// The swipe queue.
    pub queue: Arc<SwipeQueue>,
}

impl scm_common::http::Endpoints for Endpoints {
    async fn metrics(&self) -> String {
        render(global(), &self.queue)
    }

    async fn health(&self) -> Result<(), scm_common::http::Unhealthy> {
        // Answering at all means the agent's runtime is serving.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swipes::SwipeSettings;

    #[test]
    fn renders_every_family() {
        let m = AgentMetrics::default();
        m.link_established();
        m.link_lost();
        m.link_established();
        m.configs.inc(&["ack"]);
        m.handshake_failures.inc(&["unknown_ca"]);
        let q = SwipeQueue::new(SwipeSettings::default(), Default::default());
        q.stats.acked.fetch_add(2, Ordering::Relaxed);
        let text = render(&m, &q);
        for line in [
            "agent_scm_link_up 1",
            "agent_scm_reconnects_total 1",
            "agent_configs_total{outcome=\"ack\"} 1",
            "agent_configs_total{outcome=\"nack\"} 0",
            "agent_swipes_total{outcome=\"acked\"} 2",
            "agent_swipes_total{outcome=\"queue_full\"} 0",
            "agent_swipe_queue 0",
            "agent_handshake_failures_total{reason=\"unknown_ca\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        m.link_lost();
        assert!(render(&m, &q).lines().any(|l| l == "agent_scm_link_up 0"));
    }
}
