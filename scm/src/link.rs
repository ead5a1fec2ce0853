//! The agent link: machines connect here over mutual TLS and send HELLO, MSG, heartbeats
//! and card swipes. One task per connection; the TLS handshake runs inside it under a
//! timeout; the frame's machine id must equal the id in the peer's certificate.
//!
//! The protocol rules live in [`machine`] (an I/O-free state machine, unit-tested rule by
//! rule) and [`dialect`] (what differs between version 0 and version 1). This file is the
//! driver: it establishes TLS, reads frames, hands them to the state machine with the
//! time, and carries out the actions it returns with the store, the session registry,
//! the swipe bridge, events and metrics. The driver is generic over the byte stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::{Identity, Role};
use scm_proto::io::{FrameReader, FrameWriter, ReadError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coord::delivery::DeliveryLocks;
use crate::coord::events::Events;
use crate::coord::ids::Ids;
use crate::coord::sessions::{Session, SessionRegistry};
use crate::state::{self, FleetState};

pub(crate) mod clock;
pub(crate) mod dialect;
pub(crate) mod machine;
pub(crate) mod mailbox;

pub(crate) use dialect::PushResult;
pub(crate) use machine::SwipeVerdict;
use machine::{Action, Close, LinkMachine, Params};

/// What the link needs of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct LinkSettings {
    /// Largest DATA_LENGTH accepted.
    pub max_frame_data: usize,
    /// The TLS handshake's time limit.
    pub handshake: Duration,
    /// A link with no frame for this long is closed (agents send heartbeats).
    pub idle: Duration,
    /// A frame that has started must be complete within this time.
    pub stall: Duration,
    /// How long an in-band CONFIG waits for its answer.
    pub push_reply: Duration,
    /// The machines this SCM knows, with what their links need to know of them.
    pub machines: std::collections::HashMap<u16, KnownMachine>,
}

/// What the link knows of a configured machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct KnownMachine {
    /// The byte order of its version-0 frames.
    pub byte_order: dialect::ByteOrder,
    /// Close its version-0 link once the in-band CONFIG is answered (machines that open
    /// a connection per message would otherwise hold it until the idle timeout).
    pub close_after_in_band: bool,
}

/// A future an [`Upcalls`] method returns.
pub(crate) type UpcallFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the link asks of the use-case layer above it (which implements this): the link
/// does not import the layer, so the layer's rules stay in one place and the link can be
/// driven in tests with a stand-in.
pub(crate) trait Upcalls: Send + Sync + std::fmt::Debug {
    /// The verdict on a swipe from `machine` (the id already checked against the
    /// certificate).
    fn swipe<'a>(
        &'a self,
        machine: u16,
        swipe: &'a scm_proto::v1::Swipe,
        waited: Duration,
    ) -> UpcallFuture<'a, SwipeVerdict>;
    /// Brings `machine` up to date in the background (its version-1 HELLO was accepted).
    fn deliver_pending(&self, machine: u16);
    /// Records the outcome of an in-band CONFIG.
    fn in_band_outcome<'a>(
        &'a self,
        machine: u16,
        result: &'a PushResult,
        elapsed: Option<Duration>,
    ) -> UpcallFuture<'a, Result<(), state::StoreError>>;
}

/// The agent link's context: its settings and the handles it uses.
pub(crate) struct LinkContext {
    /// Its settings.
    pub settings: LinkSettings,
    /// Machines' state in the store.
    pub fleet: Arc<dyn FleetState>,
    /// Who holds which machine's link.
    pub sessions: Arc<dyn SessionRegistry>,
    /// One delivery per machine at a time (an in-band CONFIG holds it).
    pub delivery_locks: Arc<dyn DeliveryLocks>,
    /// Connections, for watchers.
    pub events: Events,
    /// TLS sessions, closed by a reload that revokes their certificate.
    pub tls: Arc<crate::tlsreload::TlsState>,
    /// Link ids.
    pub ids: Arc<Ids>,
    /// The use-case layer.
    pub upcalls: Arc<dyn Upcalls>,
}

impl std::fmt::Debug for LinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkContext")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Why an agent link ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LinkError {
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
    ctx: &LinkContext,
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<Established, LinkError> {
    let handshake = ctx.settings.handshake;
    let (tls, identity) =
        scm_certs::tls::accept(acceptor, tcp, handshake, &[Role::Machine]).await?;
    let Identity::Machine(cert_id) = identity else {
        return Err(LinkError::Refused("not a machine certificate".into()));
    };
    // Closed by a reload that revokes this certificate (or by shutdown).
    let registration = ctx
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
pub(crate) async fn handle(
    ctx: Arc<LinkContext>,
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
    } = Box::pin(establish(&ctx, &acceptor, tcp, peer, &shutdown)).await?;
    drop(acceptor);
    let shutdown = registration.token.clone();
    let result = serve(ctx, r, w, cert_id, peer, shutdown).await;
    drop(registration);
    result
}

/// Serves an established agent link over any byte stream: `cert_id` is the machine the
/// peer proved to be, `peer` its address.
pub(crate) async fn serve<R, W>(
    ctx: Arc<LinkContext>,
    r: R,
    w: W,
    cert_id: u16,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tracing::debug!(machine = cert_id, "agent link up");
    // The certificate names the machine before its first frame, so a legacy machine's
    // byte order is known before its HELLO is read.
    let known = ctx.settings.machines.get(&cert_id).copied();
    let order = known.unwrap_or_default().byte_order;
    let mut reader = FrameReader::new(r, order.codec(ctx.settings.max_frame_data));
    // Replies to frames that arrived together leave together: one TLS record and one
    // write for a burst of swipes instead of one per ACK (docs/benchmarks.md).
    let mut w = FrameWriter::new(w).with_v0_byte_order(order.wire());
    let machine = LinkMachine::new(Params {
        cert_id,
        peer,
        known: known.is_some(),
        idle: ctx.settings.idle,
        stall: ctx.settings.stall,
        push_reply: ctx.settings.push_reply,
        close_after_in_band: known.is_some_and(|k| k.close_after_in_band),
    });
    let mut link = Driver {
        link_id: ctx.ids.next(),
        ctx: ctx.clone(),
        cert_id,
        peer,
        machine,
        registered: false,
        in_band: None,
        mailbox: None,
        config_reply: None,
    };
    let result = loop {
        // A CONFIG posted for this link goes out before the next read.
        if link.machine.takes_config()
            && let Some(letter) = link.mailbox.as_deref().and_then(mailbox::Mailbox::take)
        {
            link.machine
                .send_config(&letter.generation, letter.request_id, Instant::now());
            link.config_reply = Some(letter.reply);
            match Box::pin(link.execute(&mut w)).await {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
            // Fault tests: the CONFIG is on the wire, its answer not yet read.
            scm_common::failpoint::pause("scm-after-config-sent").await;
        }
        // An in-band CONFIG's answer is awaited even through shutdown: it decides what
        // is recorded for the delivery.
        let watch = !link.machine.awaits_answer();
        if watch && shutdown.is_cancelled() {
            break Ok(());
        }
        let (idle, stall) = link.machine.read_limits(Instant::now());
        let mail = link.mailbox.clone().filter(|_| link.machine.takes_config());
        // A frame that is already here is handled before the queued replies are sent.
        let ready = if w.queued() > 0 {
            reader.read_ready(stall)
        } else {
            None
        };
        let read = match ready {
            Some(r) => r,
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
                    _ = shutdown.cancelled(), if watch => break Ok(()),
                    _ = posted(mail.as_deref()) => continue,
                    f = reader.read_frame(idle, stall) => f,
                }
            }
        };
        let now = Instant::now();
        match read {
            Ok(Some(frame)) => link.machine.handle_frame(frame, now),
            Ok(None) => link.machine.handle_end(now),
            Err(e) => link.machine.handle_error(e, reader.pending_header(), now),
        }
        // Boxed: the executor's future is large, and inline it would make every idle
        // link's task as large as its biggest state (memory per idle agent).
        match Box::pin(link.execute(&mut w)).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if link.registered {
        ctx.sessions.unregister(cert_id, link.link_id);
        tracing::info!(machine = cert_id, "agent disconnected");
        ctx.events.disconnected(cert_id, peer);
    }
    if let Some(reply) = link.config_reply.take() {
        let _ = reply.send(PushResult::Unreachable {
            generation: 0,
            detail: "the machine's link ended before it answered the CONFIG".into(),
        });
    }
    let _ = w.shutdown().await;
    result
}

/// Resolves when a CONFIG is posted to `mailbox`; never without one.
async fn posted(mailbox: Option<&mailbox::Mailbox>) {
    match mailbox {
        Some(m) => m.posted().await,
        None => std::future::pending().await,
    }
}

/// What an accepted HELLO announced.
struct Hello {
    version: u8,
    config_address: Option<String>,
    readers: Vec<String>,
}

/// Carries out the state machine's actions for one link.
struct Driver {
    ctx: Arc<LinkContext>,
    cert_id: u16,
    peer: SocketAddr,
    link_id: u64,
    machine: LinkMachine,
    /// Whether this link registered a session (and announced the connection).
    registered: bool,
    /// The machine's delivery lock, held while an in-band CONFIG waits for its answer.
    in_band: Option<crate::coord::delivery::DeliveryGuard>,
    /// Where pushes post CONFIGs for this link (version 1, from its HELLO on).
    mailbox: Option<Arc<mailbox::Mailbox>>,
    /// Where the outcome of the CONFIG sent over the link goes.
    config_reply: Option<tokio::sync::oneshot::Sender<PushResult>>,
}

impl Driver {
    /// Runs the queued actions; `Ok(false)` ends the link cleanly.
    async fn execute<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut FrameWriter<W>,
    ) -> Result<bool, LinkError> {
        let id = self.cert_id;
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Reply(f) => {
                    // Queued: sent with the replies to the frames that arrived with this one.
                    if w.queue(&f).unwrap_or(true) {
                        w.send().await?;
                    }
                }
                Action::ReplyNow(f) => w.write(&f).await?,
                Action::Farewell(f) => {
                    let _ = w.write(&f).await;
                }
                Action::Count(reason) => crate::metrics::global().frames_refused.inc(&[reason]),
                Action::AgentReport(r) => {
                    if self.registered {
                        self.ctx.sessions.report_refusals(id, self.link_id, r);
                    }
                }
                Action::RecordHello {
                    dialect,
                    config_address,
                    readers,
                    first,
                } => {
                    let hello = Hello {
                        version: dialect.version(),
                        config_address,
                        readers,
                    };
                    self.accept_hello(hello, first).await?
                }
                Action::MarkApplied { sha256: sha } => {
                    let marked = self.ctx.fleet.mark_applied_by_hash(id, sha).await?;
                    if let Some(g) = marked {
                        tracing::info!(
                            machine = id,
                            "machine reports generation {g} applied (content hash in its HELLO)"
                        );
                    }
                }
                Action::Welcome { request_id } => {
                    let m = self.ctx.fleet.get_machine(id).await?;
                    let desired = m.as_ref().map(|m| m.desired_generation).unwrap_or(0);
                    self.machine.welcome(request_id, desired);
                }
                Action::DeliverPending => self.ctx.upcalls.deliver_pending(id),
                Action::DeliverInBand => {
                    let pending = self.ctx.fleet.pending_generation(id).await?;
                    if pending.is_some() {
                        self.in_band = Some(self.ctx.delivery_locks.acquire(id).await);
                    }
                    self.machine.in_band(pending.as_ref(), Instant::now());
                }
                Action::CheckMsgAddress { dialect, text } => {
                    let m = self.ctx.fleet.get_machine(id).await?;
                    let last_peer = m.and_then(|m| m.last_peer);
                    self.machine
                        .msg_address_checked(dialect, &text, last_peer.as_deref());
                }
                Action::Swipe(s, waited) => {
                    let verdict = self.ctx.upcalls.swipe(id, &s, waited).await;
                    self.machine.swipe_verdict(s.request_id, verdict);
                }
                Action::ConfigAnswered { result } => {
                    if let Some(reply) = self.config_reply.take() {
                        // The push that posted it may have given up waiting; it then
                        // counts the generation pending, which a retry fixes.
                        let _ = reply.send(result);
                    }
                }
                Action::PushOutcome { result, elapsed } => {
                    self.ctx
                        .upcalls
                        .in_band_outcome(id, &result, elapsed)
                        .await?;
                    self.in_band = None;
                }
                Action::Close(Close::Ended) => return Ok(false),
                Action::Close(Close::Refused(text)) => return Err(LinkError::Refused(text)),
                Action::Close(Close::Read(e)) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    async fn accept_hello(&mut self, hello: Hello, first: bool) -> Result<(), LinkError> {
        let id = self.cert_id;
        let peer = self.peer.to_string();
        let version = hello.version;
        self.ctx.fleet.record_hello(id, peer).await?;
        if version == 1 && self.mailbox.is_none() {
            self.mailbox = Some(Arc::default());
        }
        self.ctx.sessions.register(
            id,
            Session {
                peer: self.peer,
                version,
                connected_since_ms: state::now_ms(),
                config_address: hello.config_address,
                readers: hello.readers,
                link_id: self.link_id,
                mailbox: self.mailbox.clone(),
                refusals: Default::default(),
            },
        );
        self.registered = true;
        if first {
            crate::metrics::global().agent_connections.inc();
            self.ctx.events.connected(id, self.peer, version);
        }
        tracing::info!(machine = id, version, "agent said HELLO");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
