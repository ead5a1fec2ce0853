//! Operator sessions over telnet (plain on loopback, or TLS with an operator certificate).
//!
//! Works with standard telnet clients: options are negotiated with our own codec, the
//! password is typed with echo off (WILL ECHO around the prompt), and every reply is one
//! line `<3-digit code> <text>` in the style of SMTP/FTP (multi-line replies use
//! `<code>-` on all but the last line). 2xx done, 3xx send more, 4xx try later, 5xx refused.
//!
//! The session only reads lines, parses them ([`command`]), knows who is logged in and
//! renders: every operation is a use case of [`crate::ops::operator`], shared with the
//! admin API, and every answer is a typed [`reply::Reply`] or [`reply::Lines`] (an
//! [`OpError`] becomes one in [`refusal`]).

pub(crate) mod command;
pub(crate) mod reply;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::{Identity, Role};
use scm_telnet::{Event, Mode, TelnetConn, Verb, consts};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::coord::throttle::LoginThrottle;
use crate::front::telnet::command::Command;
use crate::front::telnet::reply::{Lines, Reply, ReplyCode};
use crate::ops::Ops;
use crate::ops::audit::{self, AuditAction, one_line};
use crate::ops::auth::OperatorConfig;
use crate::ops::fleet::{self, Progress, Target};
use crate::ops::operator::{self, Actor, Front, OpError, PushReport};
use crate::ops::push::{self, PushResult};

/// The prompt shown before each command.
pub(crate) const PROMPT: &str = "scm> ";

/// How long after an `IAC IP` the session waits for the `IAC DO TIMING-MARK` that
/// inetutils sends with it: that client discards all output until the mark is answered,
/// so nothing may be said about the interrupt before the answer. Clients that send IP
/// alone get their answer after this time.
const TIMING_MARK_GRACE: Duration = Duration::from_millis(300);

/// How long closing a session (TLS close_notify, TCP FIN) may take: a peer that stopped
/// reading must not hold the task.
const CLOSE_TIME: Duration = Duration::from_secs(2);

/// What the console needs of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct TelnetSettings {
    /// Longest line, in bytes.
    pub max_line: usize,
    /// The TLS handshake's time limit (TLS telnet).
    pub handshake: Duration,
    /// Login must complete within this time.
    pub login: Duration,
    /// A session idle for this long is closed.
    pub idle: Duration,
}

/// The console's context: the use-case layer, the login throttle, the TLS sessions and
/// its settings.
#[derive(Debug)]
pub(crate) struct TelnetContext {
    /// The use cases.
    pub ops: Arc<Ops>,
    /// Failed logins per source.
    pub throttle: Arc<dyn LoginThrottle>,
    /// TLS sessions, closed by a reload that revokes their certificate.
    pub tls: Arc<crate::tlsreload::TlsState>,
    /// Its settings.
    pub settings: TelnetSettings,
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SessionError {
    /// Telnet I/O failed.
    #[error("{0}")]
    Telnet(#[from] scm_telnet::ConnError),
    /// TLS handshake refused.
    #[error("TLS handshake refused ({reason}): {0}", reason = .0.reason())]
    Handshake(#[from] scm_certs::tls::HandshakeError),
    /// Timed out.
    #[error("{0}")]
    Timeout(&'static str),
}

/// Serves one plain-telnet connection.
pub(crate) async fn handle_plain(
    ctx: Arc<TelnetContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let mut s = Session::new(ctx, TelnetConn::new(tcp, Mode::Lines), peer);
    let r = s.run(None, shutdown).await;
    s.close().await;
    r
}

/// Serves one TLS telnet connection: the operator certificate logs the operator in.
pub(crate) async fn handle_tls(
    ctx: Arc<TelnetContext>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let t = ctx.settings.handshake;
    let (tls, identity) = scm_certs::tls::accept(&acceptor, tcp, t, &[Role::Operator]).await?;
    // Closed by a reload that revokes this certificate (or by shutdown).
    let registration = ctx
        .tls
        .register("telnet-tls", &identity, peer, tls.get_ref().1, &shutdown);
    let name = match identity {
        Identity::Operator(n) => n,
        _ => return Ok(()),
    };
    let mut s = Session::new(ctx, TelnetConn::new(tls, Mode::Lines), peer);
    s.revoked = Some(registration.revoked().clone());
    let r = s.run(Some(name), registration.token.clone()).await;
    // TLS close_notify: without it the client cannot tell our close from a cut
    // connection (`openssl s_client`: "unexpected eof while reading").
    s.close().await;
    r
}

/// Serves one session on any stream, logged in as `operator` as if by a certificate: the
/// in-process tests of the console drive it over a pipe.
#[cfg(test)]
pub(crate) async fn serve_logged_in<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: Arc<TelnetContext>,
    io: S,
    peer: SocketAddr,
    operator: String,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let mut s = Session::new(ctx, TelnetConn::new(io, Mode::Lines), peer);
    let r = s.run(Some(operator), shutdown).await;
    s.close().await;
    r
}

/// One line of input, or what happened instead.
enum Input {
    Line(String),
    /// A line of a push body, as received: the content rules of the use case judge it.
    Raw(Vec<u8>),
    /// Ctrl-C (`IAC IP`, or a raw 0x03).
    Interrupt,
    /// Ctrl-D at the start of a line.
    CtrlD,
    /// Over-long line (already answered, except in a push body).
    TooLong,
    /// Not UTF-8 (already answered, except in a push body).
    Invalid,
    Eof,
}

struct Session<S> {
    ctx: Arc<TelnetContext>,
    conn: TelnetConn<S>,
    peer: SocketAddr,
    operator: Option<OperatorConfig>,
    /// Cancelled when a reload revoked the operator's certificate (TLS telnet).
    revoked: Option<CancellationToken>,
    /// An event read while waiting for a timing mark, to be handled next (`Some(None)`:
    /// the end of the stream).
    held: Option<Option<Event>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(ctx: Arc<TelnetContext>, mut conn: TelnetConn<S>, peer: SocketAddr) -> Self {
        let max = ctx.settings.max_line;
        *conn.codec_mut() = scm_telnet::TelnetCodec::with_limits(Mode::Lines, max, 512);
        // Suppress-go-ahead is harmless to accept; everything else is refused.
        conn.negotiator_mut().allow_us(consts::opt::SGA, true);
        Self {
            ctx,
            conn,
            peer,
            operator: None,
            revoked: None,
            held: None,
        }
    }

    /// Ends the connection properly: TLS close_notify, then FIN.
    async fn close(&mut self) {
        if tokio::time::timeout(CLOSE_TIME, self.conn.shutdown())
            .await
            .is_err()
        {
            tracing::debug!(peer = %self.peer, "telnet session: peer did not take the close in time");
        }
    }

    /// The next event, the held one first.
    async fn next_event(&mut self) -> Result<Option<Event>, SessionError> {
        if let Some(ev) = self.held.take() {
            return Ok(ev);
        }
        Ok(self.conn.next_event().await?)
    }

    /// After `IAC IP`: waits (briefly) for the client's `IAC DO TIMING-MARK` and lets
    /// the negotiator answer it before anything else is written. Anything else that
    /// arrives meanwhile is held for the next read.
    async fn timing_mark(&mut self) -> Result<(), SessionError> {
        if self.held.is_some() {
            return Ok(());
        }
        match tokio::time::timeout(TIMING_MARK_GRACE, self.conn.next_event()).await {
            Err(_) => {}
            Ok(ev) => match ev? {
                // Answered (WONT TIMING-MARK) and flushed by `next_event`.
                Some(Event::Negotiate {
                    verb: Verb::Do,
                    option: consts::opt::TIMING_MARK,
                }) => {}
                other => self.held = Some(other),
            },
        }
        Ok(())
    }

    /// The logged-in operator as the use cases see it (`None` before login).
    fn actor(&self) -> Option<Actor> {
        self.operator.as_ref().map(|o| Actor {
            name: o.name.clone(),
            role: o.role,
            source: self.peer.to_string(),
            front: Front::Telnet,
        })
    }

    /// A login record (before login the actor is `-`).
    async fn audit(&self, action: AuditAction, detail: String) {
        let name = self.operator.as_ref().map_or("-", |o| o.name.as_str());
        audit::record(&self.ctx.ops, name, &self.peer.to_string(), action, detail).await;
    }

    async fn reply(&mut self, r: Reply) -> Result<(), SessionError> {
        self.conn.send_line(&r.to_string()).await?;
        Ok(())
    }

    /// A multi-line reply, written with one flush.
    async fn reply_lines(&mut self, lines: Lines) -> Result<(), SessionError> {
        self.conn
            .feed(scm_telnet::Out::Text(lines.render()))
            .await?;
        self.conn.flush().await?;
        Ok(())
    }

    /// An answer that is either a multi-line reply or a one-line refusal.
    async fn answer(&mut self, a: Result<Lines, Reply>) -> Result<(), SessionError> {
        match a {
            Ok(lines) => self.reply_lines(lines).await,
            Err(r) => self.reply(r).await,
        }
    }

    /// Reads the next line with a timeout, answering telnet commands on the way.
    /// Over-long and non-UTF-8 lines are answered at once, except in a push body
    /// (`in_body`): there lines come as received, and that push gets one final reply
    /// instead of one per bad line. A session idle for `timeout` is told so (`421`)
    /// before it is closed.
    async fn read_input(
        &mut self,
        timeout: Duration,
        in_body: bool,
    ) -> Result<Input, SessionError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(ev) = tokio::time::timeout_at(deadline, self.next_event()).await else {
                let _ = self
                    .reply(Reply::new(
                        ReplyCode::Closing,
                        format!("session idle for {} s; closing", timeout.as_secs().max(1)),
                    ))
                    .await;
                return Err(SessionError::Timeout("operator session idle; closed"));
            };
            match ev? {
                None => return Ok(Input::Eof),
                Some(Event::Line(bytes)) if in_body => return Ok(Input::Raw(bytes)),
                Some(Event::Line(bytes)) => {
                    return Ok(match String::from_utf8(bytes) {
                        Ok(s) => Input::Line(s),
                        Err(_) => {
                            if !in_body {
                                self.reply(Reply::new(
                                    ReplyCode::Syntax,
                                    "line is not valid UTF-8; ignored",
                                ))
                                .await?;
                            }
                            Input::Invalid
                        }
                    });
                }
                Some(Event::LineTooLong { limit }) => {
                    if !in_body {
                        self.reply(Reply::new(
                            ReplyCode::Unknown,
                            format!("line longer than {limit} bytes; ignored"),
                        ))
                        .await?;
                    }
                    return Ok(Input::TooLong);
                }
                Some(Event::Command(consts::IP)) => {
                    // Ctrl-C: forget the half-typed line too.
                    self.conn.codec_mut().clear_line();
                    self.timing_mark().await?;
                    return Ok(Input::Interrupt);
                }
                // The codec has dropped the half-typed line already.
                Some(Event::Interrupt) => return Ok(Input::Interrupt),
                Some(Event::EndOfInput) => return Ok(Input::CtrlD),
                Some(Event::Command(consts::AYT)) => {
                    self.conn.send_text("\r\n[scm: yes]\r\n").await?;
                }
                Some(_) => {}
            }
        }
    }

    async fn run(
        &mut self,
        cert_operator: Option<String>,
        shutdown: CancellationToken,
    ) -> Result<(), SessionError> {
        self.reply(Reply::new(
            ReplyCode::Ready,
            format!("SCM hub {} ready", env!("CARGO_PKG_VERSION")),
        ))
        .await?;
        match cert_operator {
            Some(name) => match self.ctx.ops.operator(&name).cloned() {
                Some(op) => {
                    self.operator = Some(op.clone());
                    self.audit(AuditAction::Login, "by certificate".into())
                        .await;
                    self.reply(Reply::new(
                        ReplyCode::LoggedIn,
                        format!(
                            "logged in as {} ({}) by certificate; type help for commands",
                            op.name,
                            op.role.as_str()
                        ),
                    ))
                    .await?;
                }
                None => {
                    self.audit(
                        AuditAction::LoginFailed,
                        format!("certificate for unknown operator {name}"),
                    )
                    .await;
                    self.reply(Reply::new(
                        ReplyCode::LoginRefused,
                        format!("operator {name} from the certificate has no account on this SCM"),
                    ))
                    .await?;
                    return Ok(());
                }
            },
            None => {
                let login_time = self.ctx.settings.login;
                let done = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = tokio::time::timeout(login_time, self.login()) => r,
                };
                match done {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => return Ok(()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        let _ = self
                            .reply(Reply::new(
                                ReplyCode::Closing,
                                "login not completed in time; closing",
                            ))
                            .await;
                        return Err(SessionError::Timeout("login not completed in time"));
                    }
                }
            }
        }
        self.commands(shutdown).await
    }

    /// Username and password exchange. `Ok(false)` ends the session.
    async fn login(&mut self) -> Result<bool, SessionError> {
        let ip = self.peer.ip();
        // The whole login is bounded by `login_ms` around this call; each read may wait a
        // little longer, so that the overall deadline wins and the client is told why
        // (`421 login not completed in time`) instead of being cut off as idle.
        let t = self.ctx.settings.login + Duration::from_secs(1);
        for _attempt in 0..3 {
            if let Some(left) = self.ctx.throttle.locked(ip) {
                self.reply(locked_out(ip, left)).await?;
                self.audit(AuditAction::LoginRefused, format!("{ip} is locked out"))
                    .await;
                return Ok(false);
            }
            self.conn.send_text("Username: ").await?;
            let user = match self.read_input(t, false).await? {
                Input::Line(l) => l.trim().to_string(),
                Input::Eof => return Ok(false),
                Input::CtrlD => {
                    self.reply(Reply::new(ReplyCode::Bye, "bye")).await?;
                    return Ok(false);
                }
                _ => continue,
            };
            self.conn.request_us(consts::opt::ECHO, true).await?;
            self.conn.send_text("Password: ").await?;
            let pass = self.read_input(t, false).await?;
            self.conn.request_us(consts::opt::ECHO, false).await?;
            self.conn.send_text("\r\n").await?;
            let pass = match pass {
                Input::Line(l) => l,
                Input::Eof => return Ok(false),
                Input::CtrlD => {
                    self.reply(Reply::new(ReplyCode::Bye, "bye")).await?;
                    return Ok(false);
                }
                _ => continue,
            };
            let op = self.ctx.ops.operator(&user).cloned();
            let ok = match op.clone() {
                Some(op) => tokio::task::spawn_blocking(move || {
                    crate::ops::auth::verify_password(&op, &pass)
                })
                .await
                .unwrap_or(false),
                None => false,
            };
            if let (true, Some(op)) = (ok, op) {
                self.ctx.throttle.success(ip);
                self.operator = Some(op.clone());
                self.audit(AuditAction::Login, "by password".into()).await;
                tracing::info!(operator = %op.name, "operator logged in");
                self.reply(Reply::new(
                    ReplyCode::LoggedIn,
                    format!(
                        "logged in as {} ({}); type help for commands",
                        op.name,
                        op.role.as_str()
                    ),
                ))
                .await?;
                return Ok(true);
            }
            let locked = self.ctx.throttle.failure(ip);
            tracing::warn!(user = %user.escape_debug(), "failed login");
            self.audit(
                AuditAction::LoginFailed,
                format!("user {:?}", user.escape_debug().to_string()),
            )
            .await;
            tokio::time::sleep(self.ctx.throttle.failure_delay()).await;
            if let Some(l) = locked {
                self.reply(locked_out(ip, l)).await?;
                return Ok(false);
            }
            self.reply(Reply::new(ReplyCode::LoginRefused, "login incorrect"))
                .await?;
        }
        self.reply(Reply::new(ReplyCode::Closing, "too many attempts; closing"))
            .await?;
        Ok(false)
    }

    async fn commands(&mut self, shutdown: CancellationToken) -> Result<(), SessionError> {
        let idle = self.ctx.settings.idle;
        loop {
            self.conn.send_text(PROMPT).await?;
            let input = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.reply(self.closing("closing")).await;
                    return Ok(());
                }
                i = self.read_input(idle, false) => i?,
            };
            let line = match input {
                Input::Line(l) => l,
                Input::Eof => return Ok(()),
                Input::CtrlD => {
                    self.reply(Reply::new(ReplyCode::Bye, "bye")).await?;
                    return Ok(());
                }
                Input::Interrupt => {
                    self.conn.send_text("\r\n").await?;
                    continue;
                }
                Input::Raw(_) | Input::TooLong | Input::Invalid => continue,
            };
            let cmd = match crate::front::telnet::command::parse(&line) {
                Ok(c) => c,
                Err(e) => {
                    self.reply(e.reply()).await?;
                    continue;
                }
            };
            let Some(actor) = self.actor() else {
                // Commands are read only after a login; this is a guard, not a path.
                self.reply(Reply::new(ReplyCode::LoginRefused, "log in first"))
                    .await?;
                continue;
            };
            match cmd {
                Command::Empty => {}
                Command::Help => self.reply_lines(help()).await?,
                Command::Machines => {
                    let a = machines(&self.ctx.ops, &actor).await;
                    self.answer(a).await?
                }
                Command::Groups => self.reply_lines(groups(&self.ctx.ops)).await?,
                Command::Status(id) => {
                    let a = status(&self.ctx.ops, &actor, id).await;
                    self.answer(a).await?
                }
                Command::Push(t) => {
                    if !self
                        .push(&actor, t, idle, Duration::ZERO, &shutdown)
                        .await?
                    {
                        return Ok(());
                    }
                }
                Command::PushWait(t, s) => {
                    let wait = Duration::from_secs(u64::from(s));
                    if !self.push(&actor, t, idle, wait, &shutdown).await? {
                        return Ok(());
                    }
                }
                Command::History(id) => {
                    let a = history(&self.ctx.ops, &actor, id).await;
                    self.answer(a).await?
                }
                Command::Rollback(id, g) => {
                    let r = rollback(&self.ctx.ops, &actor, id, g).await;
                    self.reply(r).await?
                }
                Command::Swipes => {
                    let a = swipes(&self.ctx.ops, &actor).await;
                    self.answer(a).await?
                }
                Command::Audit => {
                    let a = audit_list(&self.ctx.ops, &actor).await;
                    self.answer(a).await?
                }
                Command::Quit => {
                    self.reply(Reply::new(ReplyCode::Bye, "bye")).await?;
                    return Ok(());
                }
            }
        }
    }

    /// The `421` line before the SCM closes the session (`what`: what becomes of it).
    fn closing(&self, what: &str) -> Reply {
        let revoked = self.revoked.as_ref().is_some_and(|r| r.is_cancelled());
        let why = if revoked {
            "your certificate has been revoked"
        } else {
            "SCM shutting down"
        };
        Reply::new(ReplyCode::Closing, format!("{why}; {what}"))
    }

    /// Reads a configuration body (dot-terminated, dot-stuffed), as received: the use
    /// case checks the content (text rules, size). [`Body::Ended`] when the session ended,
    /// [`Body::Refused`] when the push was cancelled or refused while it was read (the
    /// reply has been sent). The limit is enforced here as well, as the body arrives, so
    /// that a session never holds more than `limits.max_config_bytes`.
    async fn read_body(
        &mut self,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Body, SessionError> {
        let max = self.ctx.ops.settings.max_config_bytes;
        let mut body: Vec<u8> = Vec::new();
        let mut too_large = false;
        loop {
            let input = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.reply(self.closing("push cancelled, nothing sent; closing")).await;
                    return Ok(Body::Ended);
                }
                i = self.read_input(idle, true) => i?,
            };
            match input {
                Input::Eof => return Ok(Body::Ended),
                Input::Interrupt | Input::CtrlD => {
                    self.reply(Reply::new(
                        ReplyCode::Cancelled,
                        "push cancelled; nothing sent",
                    ))
                    .await?;
                    return Ok(Body::Refused);
                }
                // Not answered line by line: the whole push is refused at the end.
                Input::TooLong => too_large = true,
                Input::Raw(l) => {
                    if l == b"." {
                        break;
                    }
                    let l = l.strip_prefix(b".").unwrap_or(&l);
                    if body.len() + l.len() + 1 > max {
                        too_large = true;
                    } else {
                        body.extend_from_slice(l);
                        body.push(b'\n');
                    }
                }
                Input::Line(_) | Input::Invalid => {}
            }
        }
        if too_large {
            self.reply(Reply::new(
                ReplyCode::BodyRefused,
                format!(
                    "configuration refused (larger than {max} bytes, or a line over the limit); nothing sent"
                ),
            ))
            .await?;
            return Ok(Body::Refused);
        }
        Ok(Body::Content(body))
    }

    /// `push <target>`: authorised before the body is asked for, so that a refused push
    /// never gets a 354.
    /// `Ok(false)` when the session ended meanwhile.
    async fn push(
        &mut self,
        actor: &Actor,
        target: Target,
        idle: Duration,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Result<bool, SessionError> {
        let plan = match operator::authorise_push(&self.ctx.ops, actor, target).await {
            Ok(p) => p.wait(wait),
            Err(e) => return self.reply(refusal(&e)).await.map(|()| true),
        };
        let what = match plan.target() {
            Target::Machine(id) => format!("machine {id}"),
            t => format!("{t} ({} machines)", plan.machines()),
        };
        self.reply(Reply::new(
            ReplyCode::SendBody,
            format!("send the configuration for {what}; end with a line holding only \".\""),
        ))
        .await?;
        let body = match self.read_body(idle, shutdown).await? {
            Body::Content(b) => b,
            Body::Refused => return Ok(true),
            Body::Ended => return Ok(false),
        };
        self.run_push(actor, plan, body).await?;
        Ok(true)
    }

    /// Runs a push whose body has been read, and answers it.
    async fn run_push(
        &mut self,
        actor: &Actor,
        plan: operator::PushPlan,
        body: Vec<u8>,
    ) -> Result<(), SessionError> {
        if matches!(plan.target(), Target::Machine(_)) {
            let r = operator::push(&self.ctx.ops, actor, plan, body, None).await;
            return self.reply(push_one_reply(r)).await;
        }
        // A fleet push: `151-` progress lines while it runs (at most every 500 ms, and
        // once at the end), then one line per machine and a summary.
        let (tx, mut rx) = tokio::sync::watch::channel(Progress::start(plan.machines()));
        let ops = self.ctx.ops.clone();
        let task = operator::push(&ops, actor, plan, body, Some(tx));
        tokio::pin!(task);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shown: Option<Progress> = None;
        let report = loop {
            tokio::select! {
                // The use case first: a push refused at once (an empty body) shows no
                // progress line.
                biased;
                r = &mut task => break r,
                _ = tick.tick() => {
                    let p = *rx.borrow_and_update();
                    if shown != Some(p) {
                        shown = Some(p);
                        self.progress(p).await?;
                    }
                }
            }
        };
        match report {
            Ok(report) => {
                self.progress(report.totals()).await?;
                self.reply_lines(fleet_reply(&report)).await
            }
            Err(e) => self.reply(refusal(&e)).await,
        }
    }

    async fn progress(&mut self, p: Progress) -> Result<(), SessionError> {
        let line = Reply::new(ReplyCode::Progress, p.line()).continued();
        self.conn.send_line(&line).await?;
        Ok(())
    }
}

/// What became of a push body.
enum Body {
    /// The content, to be checked and pushed.
    Content(Vec<u8>),
    /// Cancelled or refused while it was read (answered).
    Refused,
    /// The session ended.
    Ended,
}

fn locked_out(ip: std::net::IpAddr, left: Duration) -> Reply {
    Reply::new(
        ReplyCode::Closing,
        format!(
            "too many failed logins from {ip}; try again in {} s",
            left.as_secs().max(1)
        ),
    )
}

/// The console's reply to a refused or failed operation.
pub(crate) fn refusal(e: &OpError) -> Reply {
    let code = match e {
        OpError::ReadOnly(_)
        | OpError::Target(_)
        | OpError::UnknownMachine(_)
        | OpError::NoGeneration { .. }
        | OpError::TooLarge { .. } => ReplyCode::Refused,
        OpError::NotText(_) => ReplyCode::BodyRefused,
        OpError::Empty => ReplyCode::Syntax,
        OpError::Store(_) | OpError::TaskFailed => ReplyCode::Failed,
    };
    let text = match e {
        OpError::NoGeneration {
            machine,
            generation,
        } => format!(
            "machine {machine} has no generation {generation}; `history {machine}` lists them"
        ),
        OpError::Empty => "empty configuration; nothing sent".into(),
        OpError::NotText(t) => format!("{t}; nothing sent"),
        OpError::TaskFailed => {
            "the push task failed; see the SCM's log, then check `machines`".into()
        }
        OpError::Store(s) => {
            tracing::error!("database error: {s}");
            e.to_string()
        }
        _ => e.to_string(),
    };
    Reply::new(code, text)
}

fn help() -> Lines {
    let lines = [
        "commands:",
        "  machines          list machines, their connection and configuration state",
        "  status <id>       details of one machine",
        "  groups            machine groups and their members",
        "  push <target>     send a configuration: type it, then a line holding only \".\"",
        "                    (a line that starts with \".\" is sent with one more \".\");",
        "                    target: a machine id, group:NAME, label:TEXT or all;",
        "                    a fleet push shows 151- progress lines while it runs;",
        "                    push <target> wait <s>: also wait up to s seconds for",
        "                    machines left pending to answer at their next HELLO",
        "  history <id>      the machine's configuration generations",
        "  rollback <id> <g> make generation g's content current again (a new generation)",
        "  swipes            the last card swipes (masked) and what became of them",
        "  audit             the last operator actions",
        "  quit              end the session",
        "replies: 2xx done, 3xx send more, 4xx try later, 5xx refused",
    ];
    Lines::new(ReplyCode::Help, lines.map(String::from).to_vec())
}

async fn machines(ops: &Ops, actor: &Actor) -> Result<Lines, Reply> {
    let (rows, _) = operator::machines(ops, actor, None)
        .await
        .map_err(|e| refusal(&e))?;
    let mut lines = vec![format!(
        "{:<6} {:<16} {:<3} {:<10} {:>7} {:>7}  {:<20} LAST ERROR",
        "ID", "NAME", "VER", "LINK", "DESIRED", "APPLIED", "GROUPS"
    )];
    for m in &rows {
        let link = if ops.session(m.id).is_some() {
            "connected"
        } else {
            "down"
        };
        let err = m.last_error.clone().unwrap_or_else(|| "-".into());
        let groups = ops
            .settings
            .machine(m.id)
            .map(|c| c.groups.join(","))
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| "-".into());
        lines.push(format!(
            "{:<6} {:<16} {:<3} {:<10} {:>7} {:>7}  {:<20} {}",
            m.id,
            truncate(&m.name, 16),
            m.protocol_version,
            link,
            m.desired_generation,
            m.applied_generation,
            truncate(&groups, 20),
            truncate(&err, 60)
        ));
    }
    lines.push(format!("{} machines", rows.len()));
    Ok(Lines::new(ReplyCode::Done, lines))
}

async fn status(ops: &Ops, actor: &Actor, id: u16) -> Result<Lines, Reply> {
    let (m, attempts) = operator::status(ops, actor, id, 5)
        .await
        .map_err(|e| refusal(&e))?;
    let mut lines = vec![format!("machine {} ({})", m.id, m.name)];
    lines.push(format!("protocol version: {}", m.protocol_version));
    if let Some(c) = ops.settings.machine(id) {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        lines.push(format!("groups: {}", list(&c.groups)));
        lines.push(format!("labels: {}", list(&c.labels)));
    }
    match ops.session(id) {
        Some(s) => lines.push(format!(
            "link: connected from {} since {}",
            s.peer,
            fmt_ms(s.connected_since_ms)
        )),
        None => lines.push("link: not connected".into()),
    }
    lines.push(format!(
        "last HELLO: {}",
        match (&m.last_hello_ms, &m.last_peer) {
            (Some(t), Some(p)) => format!("{} from {p}", fmt_ms(*t)),
            _ => "never".into(),
        }
    ));
    lines.push(format!("delivery: {}", push::describe_route(ops, id)));
    let state = if m.desired_generation == 0 {
        "no configuration pushed yet".to_string()
    } else if m.desired_generation == m.applied_generation {
        "up to date".to_string()
    } else {
        "pending".to_string()
    };
    lines.push(format!(
        "generation: desired {}, applied {} ({state})",
        m.desired_generation, m.applied_generation
    ));
    lines.push(format!(
        "last error: {}",
        m.last_error.unwrap_or_else(|| "-".into())
    ));
    if let Some(s) = ops.session(id) {
        lines.push(format!(
            "readers: {}",
            if s.readers.is_empty() {
                "none announced".to_string()
            } else {
                s.readers.join(", ")
            }
        ));
        let r = s.refusals;
        lines.push(format!(
            "swipes dropped at the agent (since it started): {} invalid card, {} queue full, {} expired",
            r.invalid, r.queue_full, r.expired
        ));
    }
    for d in ops.swipes.bridge().status(Some(id)) {
        let conn = match d.connected {
            Some((peer, since)) => {
                format!("print server connected from {peer} since {}", fmt_ms(since))
            }
            None => "no print server connected".to_string(),
        };
        let listen = d
            .listen
            .map(|a| a.to_string())
            .unwrap_or_else(|| "not listening".into());
        lines.push(format!(
            "generic {}: {conn}; listening on {listen}; {} queued, {} delivered, {} expired, {} refused peers",
            d.key, d.queued, d.delivered, d.expired, d.refused_peers
        ));
    }
    for d in ops.swipes.rfideas().status(Some(id)) {
        lines.push(d.summary(fmt_ms));
    }
    for (g, at, outcome, detail) in attempts {
        lines.push(format!(
            "attempt: {} generation {g} {outcome}: {}",
            fmt_ms(at),
            truncate(&detail, 100)
        ));
    }
    Ok(Lines::new(ReplyCode::Status, lines))
}

/// `swipes`: served by the console only (the admin API streams swipes as events).
async fn swipes(ops: &Ops, actor: &Actor) -> Result<Lines, Reply> {
    let rows = operator::swipes(ops, actor, 20)
        .await
        .map_err(|e| refusal(&e))?;
    let mut lines: Vec<String> = rows
        .iter()
        .rev()
        .map(|r| {
            format!(
                "{} machine {} reader {} card {} {}: {}",
                fmt_ms(r.received_ms),
                r.machine,
                r.reader,
                r.card_masked,
                r.outcome,
                truncate(&r.detail, 120)
            )
        })
        .collect();
    // Delivered and expired are counted by the bridge itself, per device.
    let devices = ops.swipes.bridge().status(None);
    let delivered: u64 = devices.iter().map(|d| d.delivered).sum();
    let expired: u64 = devices.iter().map(|d| d.expired).sum();
    let r241 = ops.swipes.rfideas().status(None);
    let st = &ops.swipes.stats;
    use std::sync::atomic::Ordering::Relaxed;
    lines.push(format!(
        "{} swipes shown; since start: Generic {} delivered, {} expired; 241 {} delivered, {} expired, {} failed; {} duplicate, {} rejected, {} busy, {} without route",
        rows.len(),
        delivered,
        expired,
        r241.iter().map(|d| d.delivered).sum::<u64>(),
        r241.iter().map(|d| d.expired).sum::<u64>(),
        r241.iter().map(|d| d.failed).sum::<u64>(),
        st.duplicate.load(Relaxed),
        st.rejected.load(Relaxed),
        st.busy.load(Relaxed),
        st.no_route.load(Relaxed),
    ));
    let r = ops.sessions.refusals_total();
    lines.push(format!(
        "connected agents report, since they started: {} refused as invalid cards, {} refused with a full queue, {} expired before the SCM acknowledged them",
        r.invalid, r.queue_full, r.expired
    ));
    Ok(Lines::new(ReplyCode::Done, lines))
}

async fn audit_list(ops: &Ops, actor: &Actor) -> Result<Lines, Reply> {
    let rows = operator::audit_log(ops, actor, 20)
        .await
        .map_err(|e| refusal(&e))?;
    let mut lines: Vec<String> = rows
        .iter()
        .rev()
        .map(|r| {
            format!(
                "{} {} from {}: {} {}",
                fmt_ms(r.at_ms),
                r.actor,
                r.source,
                r.action,
                truncate(&r.detail, 120)
            )
        })
        .collect();
    lines.push(format!("{} audit records shown", rows.len()));
    Ok(Lines::new(ReplyCode::Done, lines))
}

async fn history(ops: &Ops, actor: &Actor, id: u16) -> Result<Lines, Reply> {
    let rows = operator::history(ops, actor, id, 20)
        .await
        .map_err(|e| refusal(&e))?;
    let mut lines: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "generation {} {} bytes sha256 {} by {} at {}: {}",
                r.generation,
                r.len,
                &r.sha256[..r.sha256.len().min(16)],
                r.created_by,
                fmt_ms(r.created_ms),
                r.last_outcome.as_deref().unwrap_or("not sent")
            )
        })
        .collect();
    lines.push(format!("{} generations of machine {id}", rows.len()));
    Ok(Lines::new(ReplyCode::Done, lines))
}

async fn rollback(ops: &Arc<Ops>, actor: &Actor, id: u16, to: u64) -> Reply {
    match operator::rollback(ops, actor, id, to).await {
        Ok(r) => push_reply(id, &r),
        Err(e) => refusal(&e),
    }
}

fn groups(ops: &Ops) -> Lines {
    let groups = fleet::groups(&ops.settings.machines);
    let mut lines: Vec<String> = groups
        .iter()
        .map(|(g, ids)| {
            let ids: Vec<String> = ids.iter().map(u16::to_string).collect();
            format!("{g}: {} machines: {}", ids.len(), ids.join(" "))
        })
        .collect();
    lines.push(format!("{} groups", groups.len()));
    Lines::new(ReplyCode::Done, lines)
}

/// The answer to a push to one machine.
fn push_one_reply(r: Result<PushReport, OpError>) -> Reply {
    match r {
        Ok(report) => match report.results.first() {
            Some((id, Ok(r))) => push_reply(*id, r),
            Some((_, Err(e))) => Reply::new(ReplyCode::Failed, e.to_string()),
            None => refusal(&OpError::TaskFailed),
        },
        Err(e) => refusal(&e),
    }
}

/// The answer to a fleet push: one line per machine, then the totals; the code is the
/// worst outcome's.
fn fleet_reply(report: &PushReport) -> Lines {
    let totals = report.totals();
    let mut lines = Vec::with_capacity(report.results.len() + 1);
    for (id, r) in &report.results {
        lines.push(match r {
            Ok(r) => push_reply(*id, r).text,
            Err(e) => format!("machine {id}: not attempted: {e}"),
        });
    }
    let code = if totals.failed > 0 {
        ReplyCode::Failed
    } else if totals.nack > 0 {
        ReplyCode::Nack
    } else if totals.pending > 0 {
        ReplyCode::Pending
    } else {
        ReplyCode::Done
    };
    lines.push(format!("{}: {}", report.target, totals.line()));
    Lines::new(code, lines)
}

/// The operator's one-line answer for a delivery result.
fn push_reply(id: u16, r: &PushResult) -> Reply {
    match r {
        PushResult::Ack { generation, detail } => Reply::new(
            ReplyCode::Done,
            format!(
                "ACK machine {id} generation {generation}: {}",
                one_line(detail)
            ),
        ),
        PushResult::Nack { generation, detail } => Reply::new(
            ReplyCode::Nack,
            format!(
                "NACK machine {id} generation {generation}: {}",
                one_line(detail)
            ),
        ),
        PushResult::Unreachable { generation, detail } => Reply::new(
            ReplyCode::Pending,
            format!(
                "machine {id} unreachable; generation {generation} pending, retried with back-off and at its next HELLO: {}",
                one_line(detail)
            ),
        ),
        PushResult::Superseded { generation, by } => Reply::new(
            ReplyCode::Superseded,
            format!(
                "machine {id} generation {generation} superseded: generation {by} is newer and is the one delivered; not sent"
            ),
        ),
    }
}

fn truncate(s: &str, n: usize) -> String {
    let t: String = s.chars().take(n).collect();
    one_line(&t)
}

/// Formats Unix milliseconds as RFC 3339 UTC.
pub(crate) fn fmt_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}
