//! The agent link: machines connect here over mutual TLS and send HELLO, MSG, heartbeats
//! (and, later, card swipes). One task per connection; the TLS handshake runs inside it
//! under a timeout; the frame's machine id must equal the id in the peer's certificate.
//!
//! Version 0 follows the original rules: HELLO from a known id is ACKed (or answered with
//! a waiting CONFIG), an unknown id is NACKed and closed, and MSG is ACKed only when its id
//! and peer address match that machine's last HELLO. Version 1 carries protobuf payloads
//! and echoes request ids.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::{Identity, Role};
use scm_proto::io::{FrameReader, FrameWriter, ReadError, write_frame};
use scm_proto::v1::{Message, NackReason};
use scm_proto::{Code, Frame, FrameCodec, FrameError};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, Session};
use crate::ops::push::{self, PushResult, Reply};
use crate::ops::swipes::Verdict;
use crate::state;

/// Why an agent link ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The TLS handshake failed (reason label in the message).
    #[error("TLS handshake refused ({reason}): {0}", reason = .0.reason())]
    Handshake(#[from] scm_certs::tls::HandshakeError),
    /// Reading a frame failed or timed out.
    #[error("{0}")]
    Read(#[from] ReadError),
    /// Writing failed.
    #[error("cannot write to the agent: {0}")]
    Write(#[from] std::io::Error),
    /// The link was closed on purpose after a NACK.
    #[error("closed after NACK: {0}")]
    Refused(String),
    /// Database failure.
    #[error("{0}")]
    Store(#[from] state::StoreError),
}

type AgentTls = tokio_rustls::server::TlsStream<TcpStream>;

/// An agent connection after its handshake.
struct Established {
    r: tokio::io::ReadHalf<AgentTls>,
    w: tokio::io::WriteHalf<AgentTls>,
    cert_id: u16,
    registration: crate::tlsreload::Registration,
}

/// Runs the TLS handshake and registers the session.
async fn establish(
    hub: &Hub,
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<Established, LinkError> {
    let handshake = Duration::from_millis(hub.cfg.timeouts.handshake_ms);
    let (tls, identity) =
        scm_certs::tls::accept(acceptor, tcp, handshake, &[Role::Machine]).await?;
    let Identity::Machine(cert_id) = identity else {
        return Err(LinkError::Refused("not a machine certificate".into()));
    };
    // Closed by a reload that revokes this certificate (or by shutdown).
    let registration = hub
        .tls
        .register("agents", &identity, peer, tls.get_ref().1, shutdown);
    let (r, w) = tokio::io::split(tls);
    Ok(Established {
        r,
        w,
        cert_id,
        registration,
    })
}

/// Serves one agent connection.
pub async fn handle(
    hub: Arc<Hub>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    // Boxed: the handshake's state is large and short-lived; inline it would stay in
    // every idle link's task for the link's whole life (memory per idle agent).
    let Established {
        r,
        w,
        cert_id,
        registration,
    } = Box::pin(establish(&hub, &acceptor, tcp, peer, &shutdown)).await?;
    drop(acceptor);
    let shutdown = registration.token.clone();
    tracing::debug!(machine = cert_id, "agent link up");
    let mut reader = FrameReader::new(r, FrameCodec::new(hub.cfg.limits.max_agent_frame_data));
    // Replies to frames that arrived together leave together: one TLS record and one
    // write for a burst of swipes instead of one per ACK (docs/benchmarks.md).
    let mut w = FrameWriter::new(w);
    let mut link = Link {
        hub: hub.clone(),
        cert_id,
        peer,
        link_id: hub.next_id(),
        hello: None,
    };
    let idle = Duration::from_millis(hub.cfg.timeouts.agent_idle_ms);
    let stall = Duration::from_millis(hub.cfg.timeouts.frame_stall_ms);
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        // A frame that is already here is handled before the queued replies are sent.
        let ready = if w.queued() > 0 {
            reader.read_ready(stall)
        } else {
            None
        };
        let frame = match ready {
            Some(f) => f,
            None => {
                if w.queued() > 0 {
                    // Tasks these frames woke (a bridge with a card to write) run first:
                    // the print server gets the card before the agent gets its ACK.
                    tokio::task::yield_now().await;
                    if let Err(e) = w.send().await {
                        break Err(e.into());
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    f = reader.read_frame(Some(idle), stall) => f,
                }
            }
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(ReadError::Frame(e @ FrameError::DataTooLong { .. })) => {
                crate::metrics::global().frames_refused.inc(&["oversize"]);
                let text = e.to_string();
                let (version, id) = reader
                    .pending_header()
                    .map(|h| (h.version, h.id))
                    .unwrap_or((0, cert_id));
                let nack = Frame::protocol_nack(version, id, NackReason::Malformed, text.clone());
                let _ = write_frame(&mut w, &nack).await;
                break Err(LinkError::Refused(text));
            }
            Err(e) => {
                if matches!(e, ReadError::Stalled { .. }) {
                    crate::metrics::global().frames_refused.inc(&["stall"]);
                }
                break Err(e.into());
            }
        };
        // Boxed: the handler's future is large, and inline it would make every idle
        // link's task as large as its biggest state (memory per idle agent).
        match Box::pin(link.on_frame(frame, &mut reader, &mut w)).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if link.hello.is_some() {
        hub.sessions.unregister(cert_id, link.link_id);
        tracing::info!(machine = cert_id, "agent disconnected");
        hub.events.disconnected(cert_id, peer);
    }
    let _ = w.shutdown().await;
    drop(registration);
    result
}

struct Link {
    hub: Arc<Hub>,
    cert_id: u16,
    peer: SocketAddr,
    link_id: u64,
    /// Protocol version of the accepted HELLO on this link.
    hello: Option<u8>,
}

fn nack0(id: u16, text: &str) -> Frame {
    scm_proto::text_frame(Code::Nack, id, text)
}

impl Link {
    /// Handles one frame; `Ok(false)` closes the link.
    async fn on_frame<R, W>(
        &mut self,
        frame: Frame,
        reader: &mut FrameReader<R>,
        w: &mut FrameWriter<W>,
    ) -> Result<bool, LinkError>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let id = self.cert_id;
        if let Some(nack) = frame.nack_if_unknown() {
            let reason = if scm_proto::frame::SUPPORTED_VERSIONS.contains(&frame.version) {
                "unknown_code"
            } else {
                "unknown_version"
            };
            crate::metrics::global().frames_refused.inc(&[reason]);
            tracing::warn!(machine = id, "refused {frame}: unknown version or code");
            write_frame(w, &nack).await?;
            return Ok(true);
        }
        let Some(code) = frame.code() else {
            return Ok(true);
        };
        if frame.id != id {
            let text = format!(
                "frame names machine {} but the certificate belongs to machine {id}; a machine can only speak for itself",
                frame.id
            );
            crate::metrics::global()
                .frames_refused
                .inc(&["wrong_machine_id"]);
            tracing::warn!(machine = id, claimed = frame.id, "{text}");
            let reply = if frame.version == 0 {
                nack0(frame.id, &text)
            } else {
                let rid = Message::decode(&frame).map(|m| m.request_id()).unwrap_or(0);
                scm_proto::reply_frame(
                    &Message::nack(rid, NackReason::WrongMachineId, text.clone()),
                    frame.id,
                )
            };
            write_frame(w, &reply).await?;
            if code == Code::Hello {
                return Err(LinkError::Refused(text));
            }
            return Ok(true);
        }
        if frame.version == 0 {
            self.on_v0(code, frame, reader, w).await
        } else {
            self.on_v1(frame, w).await
        }
    }

    fn known(&self) -> bool {
        self.hub.cfg.machine(self.cert_id).is_some()
    }

    async fn accept_hello(
        &mut self,
        version: u8,
        config_port: Option<u16>,
        readers: Vec<String>,
    ) -> Result<(), LinkError> {
        let id = self.cert_id;
        let peer = self.peer.to_string();
        self.hub.store.fleet().record_hello(id, peer).await?;
        self.hub.sessions.register(
            id,
            Session {
                peer: self.peer,
                version,
                connected_since_ms: state::now_ms(),
                config_port,
                readers,
                link_id: self.link_id,
            },
        );
        if self.hello.is_none() {
            crate::metrics::global().agent_connections.inc();
            self.hub.events.connected(id, self.peer, version);
        }
        self.hello = Some(version);
        tracing::info!(machine = id, version, "agent said HELLO");
        Ok(())
    }

    async fn on_v0<R, W>(
        &mut self,
        code: Code,
        frame: Frame,
        reader: &mut FrameReader<R>,
        w: &mut W,
    ) -> Result<bool, LinkError>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let id = self.cert_id;
        match code {
            Code::Hello => {
                if !self.known() {
                    let text = format!("machine {id} is not known to this SCM");
                    write_frame(w, &nack0(id, &text)).await?;
                    return Err(LinkError::Refused(text));
                }
                self.accept_hello(0, None, Vec::new()).await?;
                let pending = self.hub.store.fleet().pending_generation(id).await?;
                match pending {
                    // In-band delivery: the waiting CONFIG is the answer to the HELLO.
                    Some(g) => {
                        let _guard = self.hub.delivery_locks.acquire(id).await;
                        let started = std::time::Instant::now();
                        match push::config_frame(0, &g, 0) {
                            Ok(f) => write_frame(w, &f).await?,
                            Err(e) => {
                                let r = PushResult::Nack {
                                    generation: g.generation,
                                    detail: format!("cannot be framed: {e}"),
                                };
                                crate::ops::push::count_outcome(&r, None);
                                push::record(&self.hub, id, &r).await?;
                                write_frame(w, &scm_proto::text_frame(Code::Ack, id, "OK")).await?;
                                return Ok(true);
                            }
                        }
                        let t = Duration::from_millis(self.hub.cfg.timeouts.push_reply_ms);
                        let result = match reader.read_frame(Some(t), t).await {
                            Ok(Some(answer)) => match push::parse_reply(&answer, id, 0) {
                                Ok(Reply::Ack(detail)) => PushResult::Ack {
                                    generation: g.generation,
                                    detail,
                                },
                                Ok(Reply::Nack(detail)) => PushResult::Nack {
                                    generation: g.generation,
                                    detail,
                                },
                                Err(e) => PushResult::Unreachable {
                                    generation: g.generation,
                                    detail: e,
                                },
                            },
                            Ok(None) => PushResult::Unreachable {
                                generation: g.generation,
                                detail:
                                    "machine closed the link before answering the in-band CONFIG"
                                        .into(),
                            },
                            Err(e) => PushResult::Unreachable {
                                generation: g.generation,
                                detail: e.to_string(),
                            },
                        };
                        crate::ops::push::count_outcome(&result, Some(started.elapsed()));
                        push::record(&self.hub, id, &result).await?;
                        Ok(!matches!(result, PushResult::Unreachable { .. }))
                    }
                    None => {
                        write_frame(w, &scm_proto::text_frame(Code::Ack, id, "OK")).await?;
                        Ok(true)
                    }
                }
            }
            Code::Msg => {
                let ok = match self.hello {
                    Some(_) => true,
                    None => {
                        // A version-0 machine may send MSG on a new connection: it must come
                        // from the address of its last HELLO.
                        let m = self.hub.store.fleet().get_machine(id).await?;
                        let last_ip = m
                            .and_then(|m| m.last_peer)
                            .and_then(|p| p.parse::<SocketAddr>().ok())
                            .map(|a| a.ip());
                        last_ip == Some(self.peer.ip())
                    }
                };
                if ok {
                    tracing::info!(machine = id, "MSG: {}", frame.text_lossy().escape_debug());
                    write_frame(w, &scm_proto::text_frame(Code::Ack, id, "OK")).await?;
                } else {
                    write_frame(
                        w,
                        &nack0(
                            id,
                            "no HELLO from this machine at this address; say HELLO first",
                        ),
                    )
                    .await?;
                }
                Ok(true)
            }
            Code::Ack | Code::Nack => {
                tracing::debug!(machine = id, "unsolicited {}", code.name());
                Ok(true)
            }
            _ => {
                write_frame(
                    w,
                    &nack0(
                        id,
                        &format!("{} is not accepted from machines", code.name()),
                    ),
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn on_v1<W: AsyncWrite + Unpin>(
        &mut self,
        frame: Frame,
        w: &mut FrameWriter<W>,
    ) -> Result<bool, LinkError> {
        let id = self.cert_id;
        let msg = match Message::decode(&frame) {
            Ok(m) => m,
            Err(e) => {
                let text = format!("cannot decode the payload: {e}");
                write_frame(
                    w,
                    &scm_proto::reply_frame(&Message::nack(0, NackReason::Malformed, text), id),
                )
                .await?;
                return Ok(true);
            }
        };
        let rid = msg.request_id();
        let reply = match msg {
            Message::Hello(h) => {
                if !self.known() {
                    let text = format!("machine {id} is not known to this SCM");
                    write_frame(
                        w,
                        &scm_proto::reply_frame(
                            &Message::nack(rid, NackReason::UnknownMachine, text.clone()),
                            id,
                        ),
                    )
                    .await?;
                    return Err(LinkError::Refused(text));
                }
                let port = u16::try_from(h.config_port).ok().filter(|p| *p != 0);
                let readers: Vec<String> = h
                    .readers
                    .iter()
                    .take(64)
                    .map(|r| r.chars().take(32).collect())
                    .collect();
                self.accept_hello(1, port, readers).await?;
                if !h.applied_sha256.is_empty() {
                    let sha = hex::encode(&h.applied_sha256);
                    let marked = self.hub.store.fleet().mark_applied_by_hash(id, sha).await?;
                    if let Some(g) = marked {
                        tracing::info!(
                            machine = id,
                            "machine reports generation {g} applied (content hash in its HELLO)"
                        );
                    }
                }
                let m = self.hub.store.fleet().get_machine(id).await?;
                let desired = m.as_ref().map(|m| m.desired_generation).unwrap_or(0);
                write_frame(
                    w,
                    &scm_proto::reply_frame(&Message::ack(rid, "welcome", desired), id),
                )
                .await?;
                // Bring the machine up to date in the background.
                let hub = self.hub.clone();
                tokio::spawn(async move {
                    match hub.store.fleet().pending_generation(id).await {
                        Ok(Some(g)) => {
                            if let Err(e) = push::deliver(&hub, g).await {
                                tracing::warn!(machine = id, "cannot record delivery: {e}");
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(machine = id, "cannot read pending configuration: {e}")
                        }
                    }
                });
                return Ok(true);
            }
            // An ACK or NACK is never answered, not even before HELLO (docs/protocol.md
            // section 5): answering one could start an endless NACK exchange.
            Message::Ack(_) | Message::Nack(_) => return Ok(true),
            _ if self.hello.is_none() => {
                Message::nack(rid, NackReason::NotAllowed, "say HELLO first")
            }
            Message::Msg(m) => {
                tracing::info!(machine = id, "MSG: {}", m.text.escape_debug());
                Message::ack(rid, "OK", 0)
            }
            Message::Heartbeat(_) => Message::ack(rid, "OK", 0),
            Message::Swipe(s) => match self.hub.swipes.receive(id, &s).await {
                Verdict::Ack(detail) => Message::ack(rid, detail, 0),
                Verdict::Nack(reason, detail) => Message::nack(rid, reason, detail),
            },
            Message::Config(_) | Message::Reset(_) => Message::nack(
                rid,
                NackReason::NotAllowed,
                format!(
                    "{} is not accepted from machines",
                    frame.code().map(|c| c.name()).unwrap_or("?")
                ),
            ),
        };
        // Queued: sent with the replies to the frames that arrived with this one.
        if w.queue(&scm_proto::reply_frame(&reply, id)).unwrap_or(true) {
            w.send().await?;
        }
        Ok(true)
    }
}
