//! The gRPC admin API (`scm.admin.v1.Admin`, see `docs/admin-api.md`).
//!
//! One listener (`[listen] admin`), run by [`scm_common::serve`]: per connection, the TLS
//! handshake happens inside the connection's task under the handshake timeout, **TLS 1.3
//! only** whatever `[tls]` allows for machines, and only operator certificates are
//! accepted. HTTP/2 is then served on that one connection with hyper, around the
//! generated tonic service; every request carries the authenticated [`Caller`] (the
//! operator named in the certificate, and the peer address) in its extensions.
//!
//! Authorisation happens per RPC: the operator must be a configured `[[operator]]`
//! (otherwise `PERMISSION_DENIED`), and `PushConfig` needs the `admin` role (a read-only
//! operator gets `PERMISSION_DENIED`, and the refusal is audited as `push_refused`). The
//! operations themselves, that role check among them, are the use cases of
//! [`crate::ops::operator`], shared with the telnet console: this module maps requests onto
//! them and their typed answers and errors onto messages and status codes. On
//! shutdown, each connection is closed gracefully: open event streams end, in-flight
//! calls finish, then HTTP/2 GOAWAY.

pub(crate) mod standard;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use scm_certs::identity::{Identity, Role};
use scm_proto::admin as pb;
use scm_proto::admin::admin_server::{Admin, AdminServer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::Service as _;
use tonic::{Request, Response, Status};

use crate::coord::events::{Event, EventKind, PushOutcome, Received};
use crate::coord::sessions::Session;
use crate::ops::Ops;
use crate::ops::fleet::MachineConfig;
use crate::ops::fleet::{Progress, SelectError, Target};
use crate::ops::operator::{self, Actor, Desired, Front, OpError};
use crate::ops::push::{PushError, PushResult};
use crate::state::{self, AuditRow, HistoryRow, MachineRow, StoreError};

/// Bytes allowed in a request on top of `limits.max_config_bytes` (the target string and
/// protobuf framing of a `PushConfig`).
pub(crate) const REQUEST_MARGIN: usize = 4096;

/// HTTP/2 ping interval on admin connections, and how long a ping may stay unanswered
/// before the connection is closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Default and largest `GetAudit` limit.
const AUDIT_DEFAULT: u32 = 50;
const AUDIT_MAX: u32 = 1000;
/// Default and largest `GetMachine` history.
const HISTORY_DEFAULT: u32 = 20;
const HISTORY_MAX: u32 = 200;

/// Why an admin connection ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConnError {
    /// The TLS handshake failed (reason label in the message).
    #[error("TLS handshake refused ({reason}): {0}", reason = .0.reason())]
    Handshake(#[from] scm_certs::tls::HandshakeError),
    /// The reflection service could not be built (a bug in the embedded descriptors).
    #[error("gRPC reflection unavailable: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// HTTP/2 failed on the connection.
    #[error("HTTP/2 error on the admin connection: {0}")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Who is calling: inserted into every request's extensions by [`handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// Operator name from the certificate's `urn:scm:operator:NAME`.
    pub operator: String,
    /// Peer address of the connection.
    pub peer: SocketAddr,
}

/// Why an RPC was refused; each message says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request reached the service without an authenticated caller.
    #[error(
        "the request carries no authenticated operator; connect with an operator certificate over TLS"
    )]
    NoCaller,
    /// The certificate's operator is not configured.
    #[error(
        "operator {0:?} (from the client certificate) is not a configured [[operator]] of this \
         SCM; add `[[operator]] name = \"{0}\"` with role \"admin\" or \"read_only\" to the SCM's \
         configuration, or use another operator's certificate"
    )]
    UnknownOperator(String),
    /// A read-only operator tried to change something.
    #[error(
        "operator {0:?} is read-only and cannot push configurations; ask an admin operator, or \
         give {0:?} role = \"admin\" in the SCM's configuration"
    )]
    ReadOnly(String),
    /// No such machine.
    #[error(
        "machine {0} is not configured on this SCM; ListMachines shows the configured machines"
    )]
    UnknownMachine(u32),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error("{hint}; try again", hint = .0.operator_hint())]
    Store(#[from] StoreError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let msg = e.to_string();
        match e {
            ApiError::NoCaller => Status::unauthenticated(msg),
            ApiError::UnknownOperator(_) | ApiError::ReadOnly(_) => Status::permission_denied(msg),
            ApiError::UnknownMachine(_) => Status::not_found(msg),
            ApiError::Invalid(_) => Status::invalid_argument(msg),
            ApiError::Store(_) => Status::unavailable(msg),
        }
    }
}

/// The admin API's context: the use-case layer, the TLS sessions and its handshake's
/// time limit.
#[derive(Debug)]
pub(crate) struct AdminContext {
    /// The use cases.
    pub ops: Arc<Ops>,
    /// TLS sessions, closed by a reload that revokes their certificate.
    pub tls: Arc<crate::tlsreload::TlsState>,
    /// The TLS handshake's time limit.
    pub handshake: Duration,
}

/// The service behind one admin connection.
#[derive(Debug, Clone)]
pub(crate) struct AdminService {
    ops: Arc<Ops>,
    /// Cancelled on shutdown: ends open event streams.
    shutdown: CancellationToken,
}

impl AdminService {
    /// The service over `ops`; event streams end when `shutdown` is cancelled.
    pub(crate) fn new(ops: Arc<Ops>, shutdown: CancellationToken) -> AdminService {
        AdminService { ops, shutdown }
    }

    /// The caller as the use cases see it, or why it may not call anything.
    fn authorize<T>(&self, req: &Request<T>) -> Result<Actor, ApiError> {
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::NoCaller)?;
        match self.ops.operator(&caller.operator) {
            Some(op) => Ok(Actor {
                name: caller.operator,
                role: op.role,
                source: caller.peer.to_string(),
                front: Front::AdminApi,
            }),
            None => {
                tracing::warn!(operator = %caller.operator, peer = %caller.peer, "admin API: operator not configured; refused");
                Err(ApiError::UnknownOperator(caller.operator))
            }
        }
    }

    /// Proto machines for `ids` (every configured machine if `None`), in configuration
    /// order.
    async fn machines(&self, actor: &Actor, only: Option<u16>) -> Result<Vec<pb::Machine>, Status> {
        let (rows, desired) = operator::machines(&self.ops, actor, only)
            .await
            .map_err(op_status)?;
        let rows: HashMap<u16, MachineRow> = rows.into_iter().map(|r| (r.id, r)).collect();
        Ok(self
            .ops
            .settings
            .machines
            .iter()
            .filter(|m| only.is_none_or(|id| id == m.id))
            .map(|m| {
                let d = desired.get(&m.id).cloned().unwrap_or_default();
                machine_to_proto(m, rows.get(&m.id), self.ops.session(m.id).as_ref(), d)
            })
            .collect())
    }
}

/// The status for a refused or failed operation: the same refusals as on the telnet
/// console, each with a message that says what to do.
pub(crate) fn op_status(e: OpError) -> Status {
    match e {
        OpError::ReadOnly(name) => ApiError::ReadOnly(name).into(),
        OpError::Target(e) => select_status(e),
        OpError::UnknownMachine(id) => ApiError::UnknownMachine(u32::from(id)).into(),
        e @ OpError::NoGeneration { .. } => {
            Status::not_found(format!("{e}; GetMachine lists the generations"))
        }
        OpError::Empty => {
            ApiError::Invalid("empty configuration; nothing was stored or sent".into()).into()
        }
        e @ OpError::NotText(_) => {
            ApiError::Invalid(format!("{e}; nothing was stored or sent")).into()
        }
        e @ OpError::TooLarge { .. } => ApiError::Invalid(format!(
            "{e} (limits.max_config_bytes); nothing was stored or sent"
        ))
        .into(),
        OpError::Store(e) => ApiError::Store(e).into(),
        OpError::TaskFailed => Status::internal(
            "the push task failed; see the SCM's log, then check ListMachines for what was stored",
        ),
    }
}

/// Maps what the SCM knows about one machine to the API's `Machine`.
pub(crate) fn machine_to_proto(
    cfg: &MachineConfig,
    row: Option<&MachineRow>,
    session: Option<&Session>,
    desired: Desired,
) -> pb::Machine {
    let peer = session
        .map(|s| s.peer.to_string())
        .or_else(|| row.and_then(|r| r.last_peer.clone()))
        .unwrap_or_default();
    pb::Machine {
        id: u32::from(cfg.id),
        name: cfg.name.clone(),
        groups: machine_groups(cfg),
        labels: cfg.labels.clone(),
        protocol_version: u32::from(session.map_or(cfg.protocol_version, |s| s.version)),
        connected: session.is_some(),
        connected_since_ms: session.map_or(0, |s| s.connected_since_ms),
        last_hello_ms: row.and_then(|r| r.last_hello_ms).unwrap_or(0),
        peer_address: peer,
        desired_generation: row.map_or(0, |r| r.desired_generation),
        applied_generation: row.map_or(0, |r| r.applied_generation),
        content_sha256: desired.sha256.unwrap_or_default(),
        attempts: desired.attempts,
        last_error: row.and_then(|r| r.last_error.clone()).unwrap_or_default(),
    }
}

fn machine_groups(cfg: &MachineConfig) -> Vec<String> {
    cfg.groups.clone()
}

/// The status for a `PushConfig` target that cannot be used: `INVALID_ARGUMENT` for a
/// malformed one, `NOT_FOUND` for one that names nothing, `FAILED_PRECONDITION` when no
/// machine is configured at all.
pub(crate) fn select_status(e: SelectError) -> Status {
    let msg = match &e {
        SelectError::Invalid(_) => format!("{e}; for example \"7\", \"group:lobby\" or \"all\""),
        SelectError::UnknownMachine(_) | SelectError::UnknownLabel(_) => {
            format!("{e}; ListMachines shows the machines with their groups and labels")
        }
        _ => e.to_string(),
    };
    match e {
        SelectError::Invalid(_) => Status::invalid_argument(msg),
        SelectError::UnknownMachine(_)
        | SelectError::UnknownGroup { .. }
        | SelectError::UnknownLabel(_) => Status::not_found(msg),
        _ => Status::failed_precondition(msg),
    }
}

/// One machine's outcome of a `PushConfig`.
pub(crate) fn outcome_of(id: u16, r: &Result<PushResult, PushError>) -> pb::MachineOutcome {
    let (generation, outcome, detail) = match r {
        Ok(r) => {
            let (g, o, d) = crate::coord::events::push_parts(r);
            (g, outcome_to_proto(o), d)
        }
        Err(e) => (0, pb::PushOutcome::Refused, e.to_string()),
    };
    pb::MachineOutcome {
        machine_id: u32::from(id),
        generation,
        outcome: outcome as i32,
        detail,
    }
}

/// Totals over a `PushConfig`'s results (an SCM-side failure counts as refused).
pub(crate) fn totals_of(results: &[(u16, Result<PushResult, PushError>)]) -> pb::PushTotals {
    let mut p = Progress::start(results.len());
    for (_, r) in results {
        p.add(r);
    }
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    pb::PushTotals {
        total: n(p.total),
        ack: n(p.ack),
        nack: n(p.nack),
        pending: n(p.pending),
        superseded: n(p.superseded),
        refused: n(p.failed),
    }
}

/// Maps a history row to the API's `GenerationInfo`.
pub(crate) fn generation_to_proto(h: HistoryRow) -> pb::GenerationInfo {
    pb::GenerationInfo {
        generation: h.generation,
        sha256: h.sha256,
        size_bytes: h.len as u64,
        created_ms: h.created_ms,
        created_by: h.created_by,
        last_outcome: h.last_outcome.unwrap_or_default(),
    }
}

/// Maps an audit row to the API's `AuditEntry`.
pub(crate) fn audit_to_proto(a: AuditRow) -> pb::AuditEntry {
    pb::AuditEntry {
        at_ms: a.at_ms,
        actor: a.actor,
        source: a.source,
        action: a.action,
        detail: a.detail,
    }
}

/// The API's enum value for a bus outcome.
pub(crate) fn outcome_to_proto(o: PushOutcome) -> pb::PushOutcome {
    match o {
        PushOutcome::Ack => pb::PushOutcome::Ack,
        PushOutcome::Nack => pb::PushOutcome::Nack,
        PushOutcome::Pending => pb::PushOutcome::Pending,
        PushOutcome::Superseded => pb::PushOutcome::Superseded,
    }
}

/// Maps what a watcher received to the API's `Event`.
pub(crate) fn event_to_proto(r: &Received) -> pb::Event {
    use pb::event::Kind;
    match r {
        Received::Lagged(n) => pb::Event {
            seq: 0,
            at_ms: state::now_ms(),
            kind: Some(Kind::Lagged(pb::Lagged { dropped: *n })),
        },
        Received::Event(e) => {
            let Event { seq, at_ms, kind } = e.as_ref();
            let kind = match kind {
                EventKind::Connected {
                    machine,
                    peer,
                    version,
                } => Kind::Connected(pb::MachineConnected {
                    machine_id: u32::from(*machine),
                    peer_address: peer.clone(),
                    protocol_version: u32::from(*version),
                }),
                EventKind::Disconnected { machine, peer } => {
                    Kind::Disconnected(pb::MachineDisconnected {
                        machine_id: u32::from(*machine),
                        peer_address: peer.clone(),
                    })
                }
                EventKind::Push {
                    machine,
                    generation,
                    outcome,
                    detail,
                } => Kind::Push(pb::PushEvent {
                    machine_id: u32::from(*machine),
                    generation: *generation,
                    outcome: outcome_to_proto(*outcome) as i32,
                    detail: detail.clone(),
                }),
                EventKind::Swipe {
                    machine,
                    reader,
                    card_masked,
                    outcome,
                    detail,
                } => Kind::Swipe(pb::SwipeEvent {
                    machine_id: u32::from(*machine),
                    reader: reader.clone(),
                    card_masked: card_masked.clone(),
                    outcome: (*outcome).to_string(),
                    detail: detail.clone(),
                }),
            };
            pb::Event {
                seq: *seq,
                at_ms: *at_ms,
                kind: Some(kind),
            }
        }
    }
}

/// A boxed stream of events for `WatchEvents`.
pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::codegen::async_trait]
impl Admin for AdminService {
    async fn list_machines(
        &self,
        req: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        let actor = self.authorize(&req)?;
        let machines = self.machines(&actor, None).await?;
        Ok(Response::new(pb::ListMachinesResponse { machines }))
    }

    async fn get_machine(
        &self,
        req: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::GetMachineResponse>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let id = u16::try_from(r.id).map_err(|_| ApiError::UnknownMachine(r.id))?;
        let limit = match r.history_limit {
            0 => HISTORY_DEFAULT,
            n => n.min(HISTORY_MAX),
        };
        let history = operator::history(&self.ops, &actor, id, limit)
            .await
            .map_err(op_status)?;
        let machine = self.machines(&actor, Some(id)).await?.into_iter().next();
        Ok(Response::new(pb::GetMachineResponse {
            machine,
            history: history.into_iter().map(generation_to_proto).collect(),
        }))
    }

    async fn push_config(
        &self,
        req: Request<pb::PushConfigRequest>,
    ) -> Result<Response<pb::PushConfigResponse>, Status> {
        let actor = self.authorize(&req)?;
        let r = req.into_inner();
        let target: Target = r.target.parse().map_err(select_status)?;
        let plan = operator::authorise_push(&self.ops, &actor, target)
            .await
            .map_err(op_status)?;
        let report = operator::push(&self.ops, &actor, plan, r.content, None)
            .await
            .map_err(op_status)?;
        Ok(Response::new(pb::PushConfigResponse {
            outcomes: report
                .results
                .iter()
                .map(|(id, r)| outcome_of(*id, r))
                .collect(),
            totals: Some(totals_of(&report.results)),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let actor = self.authorize(&req)?;
        let sub = self.ops.events.subscribe();
        tracing::info!(operator = %actor.name, peer = %actor.source, "admin API: watching events");
        let token = self.shutdown.clone();
        let stream = futures_util::stream::unfold((sub, token), |(mut sub, token)| async move {
            let next = tokio::select! {
                _ = token.cancelled() => None,
                r = sub.next() => r,
            };
            next.map(|r| (Ok(event_to_proto(&r)), (sub, token)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_audit(
        &self,
        req: Request<pb::GetAuditRequest>,
    ) -> Result<Response<pb::GetAuditResponse>, Status> {
        let actor = self.authorize(&req)?;
        let limit = match req.get_ref().limit {
            0 => AUDIT_DEFAULT,
            n => n.min(AUDIT_MAX),
        };
        let rows = operator::audit_log(&self.ops, &actor, limit)
            .await
            .map_err(op_status)?;
        Ok(Response::new(pb::GetAuditResponse {
            entries: rows.into_iter().map(audit_to_proto).collect(),
        }))
    }
}

/// Whether the request's `Content-Type` is gRPC's: `application/grpc`, optionally followed
/// by `+<format>` or `;<parameters>`.
fn is_grpc_content_type(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// Serves one admin connection: TLS 1.3 handshake with an operator certificate (inside
/// this task, under the handshake timeout), then HTTP/2 until the client closes or
/// `shutdown` is cancelled (graceful: open streams end, then GOAWAY).
pub(crate) async fn handle(
    ctx: Arc<AdminContext>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), ConnError> {
    let timeout = ctx.handshake;
    let (tls, identity) =
        scm_certs::tls::accept(&acceptor, tcp, timeout, &[Role::Operator]).await?;
    // Closed by a reload that revokes this certificate (or by shutdown).
    let registration = ctx
        .tls
        .register("admin", &identity, peer, tls.get_ref().1, &shutdown);
    let shutdown = registration.token.clone();
    let Identity::Operator(operator) = identity else {
        // `accept` admits only the operator role.
        return Ok(());
    };
    tracing::debug!(%operator, "admin connection authenticated");
    let caller = Caller { operator, peer };
    let limit = ctx.ops.settings.max_config_bytes + REQUEST_MARGIN;
    let svc = AdminServer::new(AdminService::new(ctx.ops.clone(), shutdown.clone()))
        .max_decoding_message_size(limit);
    // The standard services: health for probes, reflection for generic clients. The
    // health answers follow the listeners' token (`shutdown` of this connection's
    // listener), so a shutting-down SCM says NOT_SERVING.
    let health = standard::HealthService::new(ctx.ops.clone(), shutdown.clone()).server();
    let reflection = standard::reflection_v1()?;
    let reflection_alpha = standard::reflection_v1alpha()?;
    let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(caller.clone());
        let mut svc = svc.clone();
        let mut health = health.clone();
        let mut reflection = reflection.clone();
        let mut reflection_alpha = reflection_alpha.clone();
        async move {
            // gRPC over HTTP/2: anything but `application/grpc[+proto|;...]` is refused
            // with 415 before any method runs (so that, e.g., a browser's form or
            // `text/plain` POST cannot reach an RPC).
            if !is_grpc_content_type(req.headers()) {
                let mut refused = http::Response::new(tonic::body::Body::empty());
                *refused.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
                return Ok::<_, Infallible>(refused);
            }
            let path = req.uri().path();
            let r = if path.starts_with("/grpc.health.v1.Health/") {
                health.call(req).await
            } else if path.starts_with("/grpc.reflection.v1.ServerReflection/") {
                reflection.call(req).await
            } else if path.starts_with("/grpc.reflection.v1alpha.ServerReflection/") {
                reflection_alpha.call(req).await
            } else {
                svc.call(req).await
            };
            Ok::<_, Infallible>(r.unwrap_or_else(|e| match e {}))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // HTTP/2 pings find clients that vanished without closing (an idle watcher would
    // otherwise hold its connection slot for ever).
    builder
        .http2()
        .max_concurrent_streams(64)
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let builder = builder.http2_only();
    let (back, returned) = tokio::sync::oneshot::channel();
    let mut conn = Box::pin(builder.serve_connection(TokioIo::new(GiveBack::new(tls, back)), svc));
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // hyper's graceful close waits for the client's answer to a PING after the
            // first GOAWAY; a client that never answers would keep the connection until
            // the listener's grace period aborts this task, without any TLS close.
            match tokio::time::timeout(GRACEFUL_TIME, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(%peer, "admin connection: no answer to GOAWAY; closing");
                    Ok(())
                }
            }
        }
    };
    drop(conn);
    // hyper drops the stream without shutting it down: send the TLS close_notify
    // ourselves, or clients cannot tell the end from a cut connection (`openssl
    // s_client`: "unexpected eof while reading").
    if let Ok(mut tls) = returned.await {
        let _ =
            tokio::time::timeout(CLOSE_TIME, tokio::io::AsyncWriteExt::shutdown(&mut tls)).await;
    }
    drop(registration);
    result.map_err(ConnError::Http)
}

/// How long in-flight calls get to finish after shutdown (within the listener's 5 s
/// grace period, so that there is time left to close TLS).
const GRACEFUL_TIME: Duration = Duration::from_secs(3);

/// How long sending the close_notify may take (a client that stopped reading).
const CLOSE_TIME: Duration = Duration::from_secs(2);

/// A stream that, when dropped, hands itself back through a channel: hyper's connection
/// owns its stream to the end and drops it, and this lets [`handle`] close it properly
/// afterwards.
struct GiveBack<S> {
    io: Option<S>,
    back: Option<tokio::sync::oneshot::Sender<S>>,
}

impl<S> GiveBack<S> {
    fn new(io: S, back: tokio::sync::oneshot::Sender<S>) -> Self {
        GiveBack {
            io: Some(io),
            back: Some(back),
        }
    }

    fn io(&mut self) -> Pin<&mut S>
    where
        S: Unpin,
    {
        // `io` is only taken in `drop`.
        Pin::new(self.io.as_mut().expect("stream present until dropped"))
    }
}

impl<S> Drop for GiveBack<S> {
    fn drop(&mut self) {
        if let (Some(io), Some(back)) = (self.io.take(), self.back.take()) {
            let _ = back.send(io);
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for GiveBack<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for GiveBack<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine_cfg() -> MachineConfig {
        MachineConfig {
            id: 7,
            name: "press-7".into(),
            protocol_version: 1,
            config_addr: None,
            groups: vec!["presses".into()],
            labels: vec!["hall-a".into()],
            byte_order: Default::default(),
            delivery: None,
            close_after_config: false,
        }
    }

    #[test]
    fn only_grpc_content_types_are_served() {
        let ct = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, v.parse().unwrap());
            is_grpc_content_type(&h)
        };
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc; x=1",
        ] {
            assert!(ct(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/json",
            "application/grpcx",
            "application/grp",
        ] {
            assert!(!ct(bad), "{bad}");
        }
        assert!(!is_grpc_content_type(&http::HeaderMap::new()));
    }

    #[test]
    fn a_never_seen_machine_maps_to_zeros() {
        let m = machine_to_proto(&machine_cfg(), None, None, Desired::default());
        assert_eq!(m.id, 7);
        assert_eq!(m.name, "press-7");
        assert_eq!(m.labels, vec!["hall-a".to_string()]);
        assert_eq!(m.groups, vec!["presses".to_string()]);
        assert!(!m.connected);
        assert_eq!(
            (m.connected_since_ms, m.last_hello_ms, m.desired_generation),
            (0, 0, 0)
        );
        assert_eq!(m.peer_address, "");
        assert_eq!(m.content_sha256, "");
    }

    #[test]
    fn store_row_and_live_session_map_to_the_machine() {
        let row = MachineRow {
            id: 7,
            name: "press-7".into(),
            protocol_version: 1,
            last_peer: Some("10.0.0.7:4000".into()),
            last_hello_ms: Some(1_000),
            desired_generation: 3,
            applied_generation: 2,
            last_error: Some("generation 3: nack (bad key)".into()),
        };
        let desired = Desired {
            sha256: Some("ab".repeat(32)),
            attempts: 2,
        };
        // Not connected: the last HELLO's address.
        let m = machine_to_proto(&machine_cfg(), Some(&row), None, desired.clone());
        assert_eq!(m.peer_address, "10.0.0.7:4000");
        assert_eq!((m.desired_generation, m.applied_generation), (3, 2));
        assert_eq!((m.attempts, m.content_sha256.len()), (2, 64));
        assert!(m.last_error.contains("bad key"));
        // Connected: the live link wins.
        let session = Session {
            peer: "10.0.0.8:5000".parse().unwrap(),
            version: 1,
            connected_since_ms: 2_000,
            config_address: None,
            readers: vec![],
            link_id: 1,
            mailbox: None,
            refusals: Default::default(),
        };
        let m = machine_to_proto(&machine_cfg(), Some(&row), Some(&session), desired);
        assert!(m.connected);
        assert_eq!(m.connected_since_ms, 2_000);
        assert_eq!(m.last_hello_ms, 1_000);
        assert_eq!(m.peer_address, "10.0.0.8:5000");
    }

    #[test]
    fn history_and_audit_rows_map_field_by_field() {
        let g = generation_to_proto(HistoryRow {
            generation: 4,
            sha256: "cd".into(),
            len: 12,
            created_ms: 5,
            created_by: "alice".into(),
            last_outcome: None,
        });
        assert_eq!(
            (g.generation, g.size_bytes, g.created_by.as_str()),
            (4, 12, "alice")
        );
        assert_eq!(g.last_outcome, "");
        let a = audit_to_proto(AuditRow {
            at_ms: 9,
            actor: "bob".into(),
            source: "127.0.0.1:3".into(),
            action: "push_refused".into(),
            detail: "x".into(),
        });
        assert_eq!(
            (a.at_ms, a.actor.as_str(), a.action.as_str()),
            (9, "bob", "push_refused")
        );
    }

    #[test]
    fn events_map_to_the_api() {
        use pb::event::Kind;
        let e = Event {
            seq: 5,
            at_ms: 77,
            kind: EventKind::Push {
                machine: 2,
                generation: 3,
                outcome: PushOutcome::Superseded,
                detail: "by 4".into(),
            },
        };
        let p = event_to_proto(&Received::Event(Arc::new(e)));
        assert_eq!((p.seq, p.at_ms), (5, 77));
        match p.kind {
            Some(Kind::Push(p)) => {
                assert_eq!(p.outcome(), pb::PushOutcome::Superseded);
                assert_eq!((p.machine_id, p.generation), (2, 3));
            }
            k => panic!("{k:?}"),
        }
        let lag = event_to_proto(&Received::Lagged(12));
        assert_eq!(lag.seq, 0);
        assert_eq!(lag.kind, Some(Kind::Lagged(pb::Lagged { dropped: 12 })));
    }

    #[test]
    fn selector_errors_map_to_status_codes_with_advice() {
        let cases = [
            (
                SelectError::Invalid("x".into()),
                tonic::Code::InvalidArgument,
                "group:lobby",
            ),
            (
                SelectError::UnknownMachine(9),
                tonic::Code::NotFound,
                "ListMachines",
            ),
            (
                SelectError::UnknownGroup {
                    name: "roof".into(),
                    known: "lobby".into(),
                },
                tonic::Code::NotFound,
                "known groups: lobby",
            ),
            (
                SelectError::UnknownLabel("site=x".into()),
                tonic::Code::NotFound,
                "labels",
            ),
            (
                SelectError::NoMachines,
                tonic::Code::FailedPrecondition,
                "[[machine]]",
            ),
        ];
        for (e, code, hint) in cases {
            let s = select_status(e);
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(hint), "{s:?}");
        }
        // Through the parser, as PushConfig does it.
        let e = "group:".parse::<Target>().unwrap_err();
        assert_eq!(select_status(e).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn push_results_map_to_outcomes_totals_and_audit_text() {
        let results: Vec<(u16, Result<PushResult, PushError>)> = vec![
            (
                1,
                Ok(PushResult::Ack {
                    generation: 3,
                    detail: "stored".into(),
                }),
            ),
            (
                2,
                Ok(PushResult::Nack {
                    generation: 1,
                    detail: "bad key".into(),
                }),
            ),
            (
                3,
                Ok(PushResult::Unreachable {
                    generation: 2,
                    detail: "refused".into(),
                }),
            ),
            (
                4,
                Ok(PushResult::Superseded {
                    generation: 2,
                    by: 3,
                }),
            ),
            (
                5,
                Err(PushError::Store(crate::state::StoreError::Task(
                    "gone".into(),
                ))),
            ),
        ];
        let outcomes: Vec<pb::PushOutcome> = results
            .iter()
            .map(|(id, r)| outcome_of(*id, r).outcome())
            .collect();
        assert_eq!(
            outcomes,
            vec![
                pb::PushOutcome::Ack,
                pb::PushOutcome::Nack,
                pb::PushOutcome::Pending,
                pb::PushOutcome::Superseded,
                pb::PushOutcome::Refused
            ]
        );
        let refused = outcome_of(5, &results[4].1);
        assert_eq!((refused.machine_id, refused.generation), (5, 0));
        assert!(refused.detail.contains("gone"), "{refused:?}");
        let t = totals_of(&results);
        assert_eq!(
            (t.total, t.ack, t.nack, t.pending, t.superseded, t.refused),
            (5, 1, 1, 1, 1, 1)
        );
        let push_audit_detail = crate::ops::audit::push_detail;
        assert_eq!(
            push_audit_detail(&Target::Machine(1), 10, &results[..1]),
            "machine 1 generation 3 (10 bytes): ack"
        );
        assert_eq!(
            push_audit_detail(&Target::All, 10, &results),
            "all (10 bytes): 1/5 ACK, 1 NACK, 1 pending, 1 superseded, 1 failed"
        );
    }

    #[test]
    fn api_errors_map_to_status_codes_with_advice() {
        let cases = [
            (
                ApiError::UnknownOperator("eve".into()),
                tonic::Code::PermissionDenied,
                "[[operator]]",
            ),
            (
                ApiError::ReadOnly("ro".into()),
                tonic::Code::PermissionDenied,
                "read-only",
            ),
            (
                ApiError::UnknownMachine(99),
                tonic::Code::NotFound,
                "ListMachines",
            ),
            (
                ApiError::Invalid("x".into()),
                tonic::Code::InvalidArgument,
                "x",
            ),
            (
                ApiError::NoCaller,
                tonic::Code::Unauthenticated,
                "certificate",
            ),
        ];
        for (e, code, hint) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(hint), "{s:?}");
        }
    }
}
