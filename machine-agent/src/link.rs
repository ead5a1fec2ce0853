//! The agent's event link to the SCM: connect over mutual TLS (the SCM's certificate must
//! carry the SCM identity), say HELLO with the applied generation and hash and the config
//! port's address, then send heartbeats and swipes, and store the CONFIGs the SCM sends
//! over the link (the same checks and durable save as the config port, answered on the
//! link). Any failure closes the link and the agent reconnects after a jittered
//! exponential back-off, so a restarted SCM is not hit by every agent at once.
//!
//! The protocol decisions are in [`machine`] (I/O-free, unit-tested with paused time);
//! this file connects, and drives the state machine with frames, timers and the swipe
//! queue. The driver is generic over the byte stream.

use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::Identity;
use scm_common::reload::Slot;
use scm_proto::FrameCodec;
use scm_proto::io::{FrameReader, write_frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config_port::ConfigPort;
use crate::swipes::SwipeQueue;

pub(crate) mod machine;

use machine::{Action, AgentLink, Applied, Params, Reconnect};

/// Settings for the link.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// This machine.
    pub machine_id: u16,
    /// SCM address.
    pub scm_address: String,
    /// Config port to report in HELLO (0: none).
    pub config_port: u16,
    /// The config port's address to announce instead of the one the agent works out
    /// (empty: none given).
    pub config_advertise: String,
    /// The config port's IP, when bound to a specific one (announced in HELLO).
    pub config_ip: Option<std::net::IpAddr>,
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

/// The config port's IP when it is bound to a specific one: the address the HELLO
/// announces for it (with its port).
pub fn specific_ip(config: Option<std::net::SocketAddr>) -> Option<std::net::IpAddr> {
    config.map(|a| a.ip()).filter(|ip| !ip.is_unspecified())
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
    port: Arc<ConfigPort>,
    queue: Arc<SwipeQueue>,
    shutdown: CancellationToken,
) {
    let mut reconnect = Reconnect::default();
    loop {
        // The connector in force (a reload replaces it for the next connection).
        let current = connector.current();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&settings, &current, &port, &queue, &mut reconnect) => r,
        };
        queue.link_lost();
        crate::metrics::global().link_lost();
        if let Err(e) = result {
            tracing::warn!("{e}");
        }
        let attempt = reconnect.next_attempt();
        let delay = backoff(attempt, settings.reconnect_min, settings.reconnect_max);
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
    port: &Arc<ConfigPort>,
    queue: &SwipeQueue,
    reconnect: &mut Reconnect,
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
    let config_address = announced_config_address(s, tcp.local_addr().ok());
    let tls = scm_certs::tls::connect(connector, tcp, &Identity::Scm, s.handshake)
        .await
        .map_err(|e| {
            crate::metrics::global().handshake_failed(&e);
            connect_err(format!("TLS handshake refused ({}): {e}", e.reason()))
        })?;
    let (r, w) = tokio::io::split(tls);
    let applied = port.store.lock().await.applied();
    drive(s, r, w, applied, config_address, port, queue, reconnect).await
}

/// The config port's address the HELLO announces: the one configured, else the port's
/// own address when bound to a specific IP, else the link's local IP (the config port
/// listens on every address, and this one routes to the SCM) with the port's port.
fn announced_config_address(s: &LinkSettings, local: Option<std::net::SocketAddr>) -> String {
    if s.config_port == 0 {
        return String::new();
    }
    if !s.config_advertise.is_empty() {
        return s.config_advertise.clone();
    }
    match s.config_ip.or(local.map(|l| l.ip())) {
        Some(ip) => std::net::SocketAddr::new(ip, s.config_port).to_string(),
        None => String::new(),
    }
}

/// Runs one connection to the SCM over any byte stream until it fails.
#[allow(clippy::too_many_arguments)]
async fn drive<R, W>(
    s: &LinkSettings,
    r: R,
    mut w: W,
    applied: Option<crate::storage::Applied>,
    config_address: String,
    port: &Arc<ConfigPort>,
    queue: &SwipeQueue,
    reconnect: &mut Reconnect,
) -> Result<(), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A CONFIG over the link may be as large as a frame allows, as on the config port.
    let mut reader = FrameReader::new(r, FrameCodec::default());
    let mut link = AgentLink::new(
        Params {
            machine_id: s.machine_id,
            config_port: s.config_port,
            config_address,
            heartbeat: s.heartbeat,
            reply: s.reply,
            stall: s.stall,
            readers: s.readers.clone(),
        },
        applied.map(|a| Applied {
            generation: a.generation,
            sha256: a.sha256,
        }),
    );
    // The CONFIG being stored: one at a time, while swipes and heartbeats go on.
    let mut applying: Option<Applying> = None;
    loop {
        while let Some(action) = link.poll_action() {
            match action {
                Action::Send(f) => write_frame(&mut w, &f).await.map_err(|e| {
                    if link.is_up() {
                        LinkError::Lost(e.to_string())
                    } else {
                        LinkError::Connect {
                            addr: s.scm_address.clone(),
                            reason: e.to_string(),
                        }
                    }
                })?,
                Action::Established { desired } => {
                    tracing::info!(
                        "connected to SCM at {} (desired generation {desired})",
                        s.scm_address,
                    );
                    reconnect.established();
                    crate::metrics::global().link_established();
                }
                Action::SendSwipes => {
                    let batch = queue.take_unsent(|| link.next_request_id());
                    for m in &batch {
                        write_frame(&mut w, &scm_proto::reply_frame(m, s.machine_id))
                            .await
                            .map_err(|e| LinkError::Lost(e.to_string()))?;
                    }
                }
                Action::Apply(frame) => {
                    if applying.is_some() {
                        // The SCM sends one CONFIG at a time per machine; a second one
                        // is refused, not queued behind a slow disk.
                        let nack = crate::config_port::busy(s.machine_id, &frame);
                        write_frame(&mut w, &nack)
                            .await
                            .map_err(|e| LinkError::Lost(e.to_string()))?;
                    } else {
                        // Its own task: a link that fails mid-save does not cut the save
                        // (or its lock) short.
                        let port = port.clone();
                        applying = Some(tokio::spawn(async move { port.answer(&frame).await }));
                    }
                }
                Action::Answered(a) => {
                    let swipe = queue.answered(a.request_id, a.ok, a.reason, &a.detail);
                    link.answered(a, swipe);
                }
                Action::Close(e) => return Err(e),
            }
        }
        let (idle, stall) = link.read_limits();
        // Without a link timer (before the HELLO is answered) this sleeps for ever; the
        // read's idle timeout bounds that phase.
        let timer = link.poll_timeout();
        let swipe_deadline = queue
            .next_deadline()
            .unwrap_or_else(|| tokio::time::Instant::now() + s.heartbeat);
        let up = link.is_up();
        tokio::select! {
            reply = poll_applying(&mut applying) => {
                applying = None;
                write_frame(&mut w, &reply)
                    .await
                    .map_err(|e| LinkError::Lost(e.to_string()))?;
            }
            _ = sleep_until(timer) => {
                let st = &queue.stats;
                let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
                link.set_refusals(machine::Refusals {
                    invalid: load(&st.refused),
                    queue_full: load(&st.queue_full),
                    expired: load(&st.expired),
                });
                link.handle_timeout(tokio::time::Instant::now())
            }
            _ = queue.changed(), if up => link.swipes_due(),
            _ = tokio::time::sleep_until(swipe_deadline), if up => link.swipes_due(),
            f = reader.read_frame(idle, stall) => match f {
                Ok(Some(f)) => link.handle_frame(f, tokio::time::Instant::now()),
                Ok(None) => link.handle_end(),
                Err(e) => link.handle_error(e),
            },
        }
    }
}

/// A CONFIG being stored; resolves to its answer.
type Applying = tokio::task::JoinHandle<scm_proto::Frame>;

async fn poll_applying(applying: &mut Option<Applying>) -> scm_proto::Frame {
    match applying {
        Some(task) => match task.await {
            Ok(reply) => reply,
            Err(e) => scm_proto::reply_frame(
                &scm_proto::v1::Message::nack(
                    0,
                    scm_proto::v1::NackReason::StorageFailed,
                    format!("the save stopped: {e}"),
                ),
                0,
            ),
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn now_ms() -> u64 {
    scm_common::clock::now_ms_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_specific_config_address_is_announced_as_is() {
        let cases = [
            (Some("127.0.0.22:9301"), Some("127.0.0.22")),
            (Some("0.0.0.0:9301"), None),
            (Some("[::]:9301"), None),
            (Some("[::1]:0"), Some("::1")),
            (None, None),
        ];
        for (config, want) in cases {
            let config = config.map(|c| c.parse().unwrap());
            let want = want.map(|w| w.parse().unwrap());
            assert_eq!(specific_ip(config), want, "{config:?}");
        }
    }

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
