//! The agent's event link to the SCM: connect over mutual TLS (the SCM's certificate must
//! carry the SCM identity), say HELLO with the applied generation and hash and the config
//! port, then send heartbeats. Any failure closes the link and the agent reconnects after
//! a jittered exponential back-off, so a restarted SCM is not hit by every agent at once.

use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::Identity;
use scm_common::reload::Slot;
use scm_proto::FrameCodec;
use scm_proto::io::{FrameReader, write_frame};
use scm_proto::v1::{self, Message};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::storage::ConfigStore;
use crate::swipes::SwipeQueue;

/// Settings for the link.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// This machine.
    pub machine_id: u16,
    /// SCM address.
    pub scm_address: String,
    /// Config port to report in HELLO (0: none).
    pub config_port: u16,
    /// Handshake timeout.
    pub handshake: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Time allowed for each answer.
    pub reply: Duration,
    /// Frame stall timeout.
    pub stall: Duration,
    /// Back-off bounds.
    pub reconnect_min: Duration,
    /// Back-off bounds.
    pub reconnect_max: Duration,
    /// Reader ids, announced in HELLO.
    pub readers: Vec<String>,
}

/// Why one link attempt ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Could not connect.
    #[error("cannot connect to the SCM at {addr}: {reason}")]
    Connect {
        /// Address.
        addr: String,
        /// Reason.
        reason: String,
    },
    /// The SCM refused our HELLO.
    #[error("the SCM refused HELLO: {0}")]
    Refused(String),
    /// The link failed after it was up.
    #[error("link to the SCM lost: {0}")]
    Lost(String),
}

/// The delay before reconnect attempt `n` (0-based): exponential, capped, with jitter in
/// the upper half so that a fleet does not reconnect in lock-step.
pub fn backoff(n: u32, min: Duration, max: Duration) -> Duration {
    scm_common::backoff::Backoff::new(min, max).jittered(n)
}

/// Runs the link until shutdown, reconnecting as needed.
pub async fn run(
    settings: LinkSettings,
    connector: Arc<std::sync::RwLock<tokio_rustls::TlsConnector>>,
    store: Arc<tokio::sync::Mutex<ConfigStore>>,
    queue: Arc<SwipeQueue>,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    loop {
        // The connector in force (a reload replaces it for the next connection).
        let current = connector.current();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&settings, &current, &store, &queue, &mut attempt) => r,
        };
        queue.link_lost();
        crate::metrics::global().link_lost();
        if let Err(e) = result {
            tracing::warn!("{e}");
        }
        let delay = backoff(attempt, settings.reconnect_min, settings.reconnect_max);
        attempt = attempt.saturating_add(1);
        tracing::info!("reconnecting to the SCM in {} ms", delay.as_millis());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(
    s: &LinkSettings,
    connector: &tokio_rustls::TlsConnector,
    store: &Arc<tokio::sync::Mutex<ConfigStore>>,
    queue: &SwipeQueue,
    attempt: &mut u32,
) -> Result<(), LinkError> {
    let connect_err = |reason: String| LinkError::Connect {
        addr: s.scm_address.clone(),
        reason,
    };
    let tcp = tokio::time::timeout(s.handshake, TcpStream::connect(&s.scm_address))
        .await
        .map_err(|_| connect_err(format!("no answer within {:?}", s.handshake)))?
        .map_err(|e| connect_err(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let tls = scm_certs::tls::connect(connector, tcp, &Identity::Scm, s.handshake)
        .await
        .map_err(|e| {
            crate::metrics::global().handshake_failed(&e);
            connect_err(format!("TLS handshake refused ({}): {e}", e.reason()))
        })?;
    let (r, mut w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, FrameCodec::new(4096));
    let applied = store.lock().await.applied();
    let mut request_id = 1u64;
    let hello = Message::Hello(v1::Hello {
        request_id,
        agent_version: format!("machine-agent {}", env!("CARGO_PKG_VERSION")),
        config_port: u32::from(s.config_port),
        applied_generation: applied.as_ref().map(|a| a.generation).unwrap_or(0),
        applied_sha256: applied
            .as_ref()
            .map(|a| a.sha256.to_vec())
            .unwrap_or_default(),
        readers: s.readers.clone(),
    });
    write_frame(&mut w, &scm_proto::reply_frame(&hello, s.machine_id))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    // In TLS 1.3 a refused client certificate only shows here, on the first read.
    let answer = reader
        .read_frame(Some(s.reply), s.stall)
        .await
        .map_err(|e| LinkError::Refused(format!("no answer to HELLO ({e}); is our certificate accepted?")))?
        .ok_or_else(|| LinkError::Refused("connection closed before the answer to HELLO; the SCM may have refused our certificate".into()))?;
    match Message::decode(&answer) {
        Ok(Message::Ack(a)) if a.request_id == request_id => {
            tracing::info!(
                "connected to SCM at {} (desired generation {})",
                s.scm_address,
                a.generation
            );
        }
        Ok(Message::Nack(n)) => {
            return Err(LinkError::Refused(format!(
                "{} ({})",
                n.detail,
                n.reason().as_str_name()
            )));
        }
        Ok(m) => {
            return Err(LinkError::Refused(format!(
                "unexpected answer {}",
                m.code().name()
            )));
        }
        Err(_) => {
            return Err(LinkError::Refused(format!(
                "unexpected answer: {}",
                answer.text_lossy()
            )));
        }
    }
    *attempt = 0;
    crate::metrics::global().link_established();
    let mut tick = tokio::time::interval(s.heartbeat);
    tick.tick().await;
    let mut outstanding: Option<(u64, tokio::time::Instant)> = None;
    let mut send_swipes = true;
    loop {
        if send_swipes {
            send_swipes = false;
            let batch = queue.take_unsent(|| {
                request_id += 1;
                request_id
            });
            for m in &batch {
                write_frame(&mut w, &scm_proto::reply_frame(m, s.machine_id))
                    .await
                    .map_err(|e| LinkError::Lost(e.to_string()))?;
            }
        }
        let deadline = outstanding
            .map(|(_, t)| t + s.reply)
            .unwrap_or_else(|| tokio::time::Instant::now() + s.heartbeat * 4);
        let swipe_deadline = queue
            .next_deadline()
            .unwrap_or_else(|| tokio::time::Instant::now() + s.heartbeat);
        tokio::select! {
            _ = tick.tick() => {
                if outstanding.is_none() {
                    request_id += 1;
                    let hb = Message::Heartbeat(v1::Heartbeat { request_id, sent_at_unix_ms: now_ms() });
                    write_frame(&mut w, &scm_proto::reply_frame(&hb, s.machine_id)).await.map_err(|e| LinkError::Lost(e.to_string()))?;
                    outstanding = Some((request_id, tokio::time::Instant::now()));
                }
            }
            _ = queue.changed() => send_swipes = true,
            _ = tokio::time::sleep_until(swipe_deadline) => send_swipes = true,
            _ = tokio::time::sleep_until(deadline) => {
                return Err(LinkError::Lost("no answer from the SCM in time".into()));
            }
            f = reader.read_frame(None, s.stall) => {
                let f = f.map_err(|e| LinkError::Lost(e.to_string()))?
                    .ok_or_else(|| LinkError::Lost("the SCM closed the link".into()))?;
                match Message::decode(&f) {
                    Ok(Message::Ack(a)) => {
                        if queue.answered(a.request_id, true, v1::NackReason::Unspecified, &a.detail) {
                            send_swipes = true;
                        } else if outstanding.is_some_and(|(id, _)| id == a.request_id) {
                            outstanding = None;
                        }
                    }
                    Ok(Message::Nack(n)) => {
                        if queue.answered(n.request_id, false, n.reason(), &n.detail) {
                            send_swipes = true;
                        } else {
                            tracing::warn!("SCM NACK: {} ({})", n.detail, n.reason().as_str_name());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("undecodable frame from the SCM: {e}"),
                }
            }
        }
    }
}

fn now_ms() -> u64 {
    scm_common::clock::now_ms_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(3);
        for n in 0..20 {
            let d = backoff(n, min, max);
            let base = (min * (1 << n.min(16))).min(max);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {n}: {d:?} not in [{:?}, {base:?}]",
                base / 2
            );
        }
        let samples: std::collections::HashSet<_> = (0..50).map(|_| backoff(5, min, max)).collect();
        assert!(samples.len() > 5, "jitter spreads reconnects");
    }
}
