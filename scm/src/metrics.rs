//! The SCM's event counters, shared by every subsystem: one process-wide [`ScmMetrics`]
//! ([`global`]), incremented where the events happen. Values the SCM already keeps
//! (connected agents, swipe counters, Generic device state, the audit log) are read when
//! the metrics are scraped (`crate::front::metrics` renders both). Every label
//! value comes from a small fixed set or from the configuration: never a card number, an
//! address or anything a peer chooses.

use std::sync::LazyLock;

use scm_common::metrics::{Counter, CounterFamily, Histogram, LATENCY_BUCKETS};

/// Counters and histograms of events.
#[derive(Debug)]
pub(crate) struct ScmMetrics {
    /// Agent links whose HELLO was accepted.
    pub agent_connections: Counter,
    /// TLS handshakes refused, by listener and reason.
    pub handshake_failures: CounterFamily,
    /// Deliveries by outcome.
    pub pushes: CounterFamily,
    /// Time from starting a delivery to the machine's ACK or NACK.
    pub push_duration: Histogram,
    /// Time from receiving a SWIPE to having written the card to a print server.
    pub swipe_forward: Histogram,
    /// Frames refused on the agent link, by reason.
    pub frames_refused: CounterFamily,
    /// Operator logins by result (`ok`, `failed`, `locked`).
    pub logins: CounterFamily,
    /// Established TLS sessions closed because a reload revoked their certificate, by
    /// listener.
    pub sessions_revoked: CounterFamily,
    /// TLS reloads (SIGHUP) by result (`ok`, `failed`).
    pub tls_reloads: CounterFamily,
}

impl Default for ScmMetrics {
    fn default() -> Self {
        Self {
            agent_connections: Counter::default(),
            handshake_failures: CounterFamily::new(&["listener", "reason"]),
            pushes: CounterFamily::with(&["outcome"], &[&["ack"], &["nack"], &["unreachable"]]),
            push_duration: Histogram::new(LATENCY_BUCKETS),
            swipe_forward: Histogram::new(LATENCY_BUCKETS),
            frames_refused: CounterFamily::with(
                &["reason"],
                &[
                    &["unknown_version"],
                    &["unknown_code"],
                    &["oversize"],
                    &["stall"],
                    &["wrong_machine_id"],
                ],
            ),
            logins: CounterFamily::with(&["result"], &[&["ok"], &["failed"], &["locked"]]),
            sessions_revoked: CounterFamily::new(&["listener"]),
            tls_reloads: CounterFamily::with(&["result"], &[&["ok"], &["failed"]]),
        }
    }
}

static GLOBAL: LazyLock<ScmMetrics> = LazyLock::new(ScmMetrics::default);

/// The process's metrics.
pub(crate) fn global() -> &'static ScmMetrics {
    &GLOBAL
}

/// Counts a refused TLS handshake on `listener` (`agents`, `telnet-tls`).
pub(crate) fn handshake_failed(listener: &'static str, e: &scm_certs::tls::HandshakeError) {
    global().handshake_failures.inc(&[listener, e.reason()]);
}
