//! Operator sessions over telnet (plain on loopback, or TLS with an operator certificate).
//!
//! Works with standard telnet clients: options are negotiated with our own codec, the
//! password is typed with echo off (WILL ECHO around the prompt), and every reply is one
//! line `<3-digit code> <text>` in the style of SMTP/FTP (multi-line replies use
//! `<code>-` on all but the last line). 2xx done, 3xx send more, 4xx try later, 5xx refused.

pub mod command;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::{Identity, Role};
use scm_telnet::{Event, Mode, TelnetConn, consts};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::app::config::{OperatorConfig, OperatorRole};
use crate::front::telnet::command::Command;
use crate::hub::Hub;
use crate::ops::fleet::{self, Progress, Target};
use crate::ops::push::{self, PushError, PushResult};
use crate::state;

/// The prompt shown before each command.
pub const PROMPT: &str = "scm> ";

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
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
pub async fn handle_plain(
    hub: Arc<Hub>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let mut s = Session::new(hub, TelnetConn::new(tcp, Mode::Lines), peer);
    s.run(None, shutdown).await
}

/// Serves one TLS telnet connection: the operator certificate logs the operator in.
pub async fn handle_tls(
    hub: Arc<Hub>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let t = Duration::from_millis(hub.cfg.timeouts.handshake_ms);
    let (tls, identity) = scm_certs::tls::accept(&acceptor, tcp, t, &[Role::Operator]).await?;
    // Closed by a reload that revokes this certificate (or by shutdown).
    let registration = hub
        .tls
        .register("telnet-tls", &identity, peer, tls.get_ref().1, &shutdown);
    let name = match identity {
        Identity::Operator(n) => n,
        _ => return Ok(()),
    };
    let mut s = Session::new(hub, TelnetConn::new(tls, Mode::Lines), peer);
    s.revoked = Some(registration.revoked().clone());
    s.run(Some(name), registration.token.clone()).await
}

/// One line of input, or what happened instead.
enum Input {
    Line(String),
    /// Ctrl-C (IAC IP).
    Interrupt,
    /// Over-long line (already answered, except in a push body).
    TooLong,
    /// Not UTF-8 (already answered, except in a push body).
    Invalid,
    Eof,
}

struct Session<S> {
    hub: Arc<Hub>,
    conn: TelnetConn<S>,
    peer: SocketAddr,
    operator: Option<OperatorConfig>,
    /// Cancelled when a reload revoked the operator's certificate (TLS telnet).
    revoked: Option<CancellationToken>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(hub: Arc<Hub>, mut conn: TelnetConn<S>, peer: SocketAddr) -> Self {
        let max = hub.cfg.limits.telnet_max_line;
        *conn.codec_mut() = scm_telnet::TelnetCodec::with_limits(Mode::Lines, max, 512);
        // Suppress-go-ahead is harmless to accept; everything else is refused.
        conn.negotiator_mut().allow_us(consts::opt::SGA, true);
        Self {
            hub,
            conn,
            peer,
            operator: None,
            revoked: None,
        }
    }

    fn actor(&self) -> String {
        self.operator
            .as_ref()
            .map(|o| o.name.clone())
            .unwrap_or_else(|| "-".into())
    }

    async fn audit(&self, action: &'static str, detail: String) {
        match action {
            "login" => crate::metrics::global().logins.inc(&["ok"]),
            "login_failed" => crate::metrics::global().logins.inc(&["failed"]),
            "login_refused" => crate::metrics::global().logins.inc(&["locked"]),
            _ => {}
        }
        self.hub
            .audit(self.actor(), self.peer.to_string(), action, detail)
            .await;
    }

    async fn reply(&mut self, line: &str) -> Result<(), SessionError> {
        self.conn.send_line(line).await?;
        Ok(())
    }

    /// A multi-line reply: every line but the last as `<code>-<text>`, the last as
    /// `<code> <text>`, written with one flush.
    async fn reply_lines(&mut self, code: u16, lines: Vec<String>) -> Result<(), SessionError> {
        let n = lines.len();
        for (i, l) in lines.into_iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            self.conn
                .feed(scm_telnet::Out::Text(format!("{code}{sep}{l}\r\n")))
                .await?;
        }
        self.conn.flush().await?;
        Ok(())
    }

    /// Reads the next line with a timeout, answering telnet commands on the way.
    /// Over-long and non-UTF-8 lines are answered at once, except in a push body
    /// (`in_body`): that push gets one final reply (552) instead of one per bad line.
    async fn read_input(
        &mut self,
        timeout: Duration,
        in_body: bool,
    ) -> Result<Input, SessionError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.conn.next_event())
                .await
                .map_err(|_| SessionError::Timeout("operator session idle; closed"))??;
            match ev {
                None => return Ok(Input::Eof),
                Some(Event::Line(bytes)) => {
                    return Ok(match String::from_utf8(bytes) {
                        Ok(s) => Input::Line(s),
                        Err(_) => {
                            if !in_body {
                                self.reply("501 line is not valid UTF-8; ignored").await?;
                            }
                            Input::Invalid
                        }
                    });
                }
                Some(Event::LineTooLong { limit }) => {
                    if !in_body {
                        self.reply(&format!("500 line longer than {limit} bytes; ignored"))
                            .await?;
                    }
                    return Ok(Input::TooLong);
                }
                Some(Event::Command(consts::IP)) => {
                    // Ctrl-C: forget the half-typed line too.
                    self.conn.codec_mut().clear_line();
                    return Ok(Input::Interrupt);
                }
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
        self.reply(&format!("220 SCM hub {} ready", env!("CARGO_PKG_VERSION")))
            .await?;
        match cert_operator {
            Some(name) => match self.hub.operator(&name).cloned() {
                Some(op) => {
                    self.operator = Some(op.clone());
                    self.audit("login", "by certificate".into()).await;
                    self.reply(&format!(
                        "230 logged in as {} ({}) by certificate; type help for commands",
                        op.name,
                        op.role.as_str()
                    ))
                    .await?;
                }
                None => {
                    self.audit(
                        "login_failed",
                        format!("certificate for unknown operator {name}"),
                    )
                    .await;
                    self.reply(&format!(
                        "530 operator {name} from the certificate has no account on this SCM"
                    ))
                    .await?;
                    return Ok(());
                }
            },
            None => {
                let login_time = Duration::from_millis(self.hub.cfg.timeouts.login_ms);
                let done = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = tokio::time::timeout(login_time, self.login()) => r,
                };
                match done {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => return Ok(()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        let _ = self.reply("421 login not completed in time; closing").await;
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
        let t = Duration::from_millis(self.hub.cfg.timeouts.login_ms) + Duration::from_secs(1);
        for _attempt in 0..3 {
            if let Some(left) = self.hub.throttle.locked(ip) {
                self.reply(&format!(
                    "421 too many failed logins from {ip}; try again in {} s",
                    left.as_secs().max(1)
                ))
                .await?;
                self.audit("login_refused", format!("{ip} is locked out"))
                    .await;
                return Ok(false);
            }
            self.conn.send_text("Username: ").await?;
            let user = match self.read_input(t, false).await? {
                Input::Line(l) => l.trim().to_string(),
                Input::Eof => return Ok(false),
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
                _ => continue,
            };
            let op = self.hub.operator(&user).cloned();
            let ok = match op.clone() {
                Some(op) => tokio::task::spawn_blocking(move || {
                    crate::ops::auth::verify_password(&op, &pass)
                })
                .await
                .unwrap_or(false),
                None => false,
            };
            if let (true, Some(op)) = (ok, op) {
                self.hub.throttle.success(ip);
                self.operator = Some(op.clone());
                self.audit("login", "by password".into()).await;
                tracing::info!(operator = %op.name, "operator logged in");
                self.reply(&format!(
                    "230 logged in as {} ({}); type help for commands",
                    op.name,
                    op.role.as_str()
                ))
                .await?;
                return Ok(true);
            }
            let locked = self.hub.throttle.failure(ip);
            tracing::warn!(user = %user.escape_debug(), "failed login");
            self.audit(
                "login_failed",
                format!("user {:?}", user.escape_debug().to_string()),
            )
            .await;
            tokio::time::sleep(self.hub.throttle.failure_delay()).await;
            if let Some(l) = locked {
                self.reply(&format!(
                    "421 too many failed logins from {ip}; try again in {} s",
                    l.as_secs().max(1)
                ))
                .await?;
                return Ok(false);
            }
            self.reply("530 login incorrect").await?;
        }
        self.reply("421 too many attempts; closing").await?;
        Ok(false)
    }

    async fn commands(&mut self, shutdown: CancellationToken) -> Result<(), SessionError> {
        let idle = Duration::from_millis(self.hub.cfg.timeouts.telnet_idle_ms);
        loop {
            self.conn.send_text(PROMPT).await?;
            let input = tokio::select! {
                _ = shutdown.cancelled() => {
                    let revoked = self.revoked.as_ref().is_some_and(|r| r.is_cancelled());
                    let text = if revoked {
                        "421 your certificate has been revoked; closing"
                    } else {
                        "421 SCM shutting down"
                    };
                    let _ = self.reply(text).await;
                    return Ok(());
                }
                i = self.read_input(idle, false) => i?,
            };
            let line = match input {
                Input::Line(l) => l,
                Input::Eof => return Ok(()),
                Input::Interrupt => {
                    self.conn.send_text("\r\n").await?;
                    continue;
                }
                Input::TooLong | Input::Invalid => continue,
            };
            let cmd = match crate::front::telnet::command::parse(&line) {
                Ok(c) => c,
                Err(reply) => {
                    self.reply(&reply).await?;
                    continue;
                }
            };
            match cmd {
                Command::Empty => {}
                Command::Help => self.help().await?,
                Command::Machines => self.machines().await?,
                Command::Groups => self.groups().await?,
                Command::Status(id) => self.status(id).await?,
                Command::Push(t) => self.push(t, idle).await?,
                Command::History(id) => self.history(id).await?,
                Command::Rollback(id, g) => self.rollback(id, g).await?,
                Command::Swipes => self.swipes().await?,
                Command::Audit => self.audit_list().await?,
                Command::Quit => {
                    self.reply("221 bye").await?;
                    return Ok(());
                }
            }
        }
    }

    async fn help(&mut self) -> Result<(), SessionError> {
        for l in [
            "214-commands:",
            "214-  machines          list machines, their connection and configuration state",
            "214-  status <id>       details of one machine",
            "214-  groups            machine groups and their members",
            "214-  push <target>     send a configuration: type it, then a line holding only \".\"",
            "214-                    (a line that starts with \".\" is sent with one more \".\");",
            "214-                    target: a machine id, group:NAME, label:TEXT or all;",
            "214-                    a fleet push shows 151- progress lines while it runs",
            "214-  history <id>      the machine's configuration generations",
            "214-  rollback <id> <g> make generation g's content current again (a new generation)",
            "214-  swipes            the last card swipes (masked) and what became of them",
            "214-  audit             the last operator actions",
            "214-  quit              end the session",
            "214 replies: 2xx done, 3xx send more, 4xx try later, 5xx refused",
        ] {
            self.reply(l).await?;
        }
        Ok(())
    }

    async fn store_error(&mut self, e: state::StoreError) -> Result<(), SessionError> {
        tracing::error!("database error: {e}");
        self.reply(&format!("451 {}", e.operator_hint())).await
    }

    async fn machines(&mut self) -> Result<(), SessionError> {
        let rows = match self.hub.store.fleet().list_machines().await {
            Ok(r) => r,
            Err(e) => return self.store_error(e).await,
        };
        let mut lines = vec![format!(
            "{:<6} {:<16} {:<3} {:<10} {:>7} {:>7}  {:<20} LAST ERROR",
            "ID", "NAME", "VER", "LINK", "DESIRED", "APPLIED", "GROUPS"
        )];
        for m in &rows {
            let link = if self.hub.sessions.session(m.id).is_some() {
                "connected"
            } else {
                "down"
            };
            let err = m.last_error.clone().unwrap_or_else(|| "-".into());
            let groups = self
                .hub
                .cfg
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
        self.reply_lines(250, lines).await
    }

    async fn status(&mut self, id: u16) -> Result<(), SessionError> {
        let res = self.hub.store.fleet().machine_status(id, 5).await;
        let (m, attempts) = match res {
            Ok((Some(m), a)) => (m, a),
            Ok((None, _)) => {
                return self
                    .reply(&format!(
                        "550 machine {id} is not known; `machines` lists the known ones"
                    ))
                    .await;
            }
            Err(e) => return self.store_error(e).await,
        };
        let mut lines = vec![format!("machine {} ({})", m.id, m.name)];
        lines.push(format!("protocol version: {}", m.protocol_version));
        if let Some(c) = self.hub.cfg.machine(id) {
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
        match self.hub.sessions.session(id) {
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
        lines.push(format!(
            "config address: {}",
            push::config_target(&self.hub, id)
                .unwrap_or_else(|| "unknown (in-band at next HELLO)".into())
        ));
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
        if let Some(s) = self.hub.sessions.session(id) {
            lines.push(format!(
                "readers: {}",
                if s.readers.is_empty() {
                    "none announced".to_string()
                } else {
                    s.readers.join(", ")
                }
            ));
        }
        for d in self.hub.swipes.bridge().status(Some(id)) {
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
        for d in self.hub.swipes.rfideas().status(Some(id)) {
            lines.push(d.summary(fmt_ms));
        }
        for (g, at, outcome, detail) in attempts {
            lines.push(format!(
                "attempt: {} generation {g} {outcome}: {}",
                fmt_ms(at),
                truncate(&detail, 100)
            ));
        }
        self.reply_lines(211, lines).await
    }

    async fn swipes(&mut self) -> Result<(), SessionError> {
        let rows = match self.hub.store.journal().list(20).await {
            Ok(r) => r,
            Err(e) => return self.store_error(e).await,
        };
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
        let devices = self.hub.swipes.bridge().status(None);
        let delivered: u64 = devices.iter().map(|d| d.delivered).sum();
        let expired: u64 = devices.iter().map(|d| d.expired).sum();
        let r241 = self.hub.swipes.rfideas().status(None);
        let st = &self.hub.swipes.stats;
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
        self.reply_lines(250, lines).await
    }

    async fn audit_list(&mut self) -> Result<(), SessionError> {
        let rows = match self.hub.store.audit().list(20).await {
            Ok(r) => r,
            Err(e) => return self.store_error(e).await,
        };
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
        self.reply_lines(250, lines).await
    }

    async fn history(&mut self, id: u16) -> Result<(), SessionError> {
        if self.hub.cfg.machine(id).is_none() {
            return self
                .reply(&format!(
                    "550 machine {id} is not known; `machines` lists the known ones"
                ))
                .await;
        }
        let rows = match self.hub.store.fleet().history(id, 20).await {
            Ok(r) => r,
            Err(e) => return self.store_error(e).await,
        };
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
        self.reply_lines(250, lines).await
    }

    async fn rollback(&mut self, id: u16, to: u64) -> Result<(), SessionError> {
        let Some(op) = self.operator.clone() else {
            return self.reply("530 log in first").await;
        };
        if op.role == OperatorRole::ReadOnly {
            self.audit(
                "push_refused",
                format!("rollback of machine {id}: read-only operator"),
            )
            .await;
            return self
                .reply(&format!(
                    "550 operator {} is read-only and cannot push",
                    op.name
                ))
                .await;
        }
        let result = push::rollback(&self.hub, id, to, &op.name).await;
        let line = match &result {
            Ok(None) => {
                format!("550 machine {id} has no generation {to}; `history {id}` lists them")
            }
            Ok(Some(r)) => push_reply(id, r),
            Err(e @ PushError::UnknownMachine(_)) => format!("550 {e}"),
            Err(e) => format!("451 {e}"),
        };
        self.audit(
            "rollback",
            format!("machine {id} to generation {to}: {}", one_line(&line)),
        )
        .await;
        self.reply(&line).await
    }

    async fn groups(&mut self) -> Result<(), SessionError> {
        let groups = fleet::groups(&self.hub.cfg);
        let mut lines: Vec<String> = groups
            .iter()
            .map(|(g, ids)| {
                let ids: Vec<String> = ids.iter().map(u16::to_string).collect();
                format!("{g}: {} machines: {}", ids.len(), ids.join(" "))
            })
            .collect();
        lines.push(format!("{} groups", groups.len()));
        self.reply_lines(250, lines).await
    }

    /// Reads a configuration body (dot-terminated, dot-stuffed). `None` when the session
    /// ended or the push was refused (the reply has been sent).
    async fn read_body(&mut self, idle: Duration) -> Result<Option<Vec<u8>>, SessionError> {
        let max = self.hub.cfg.limits.max_config_bytes;
        let mut body: Vec<u8> = Vec::new();
        let mut too_large = false;
        loop {
            match self.read_input(idle, true).await? {
                Input::Eof => return Ok(None),
                Input::Interrupt => {
                    self.reply("500 push cancelled; nothing sent").await?;
                    return Ok(None);
                }
                // Not answered line by line: the whole push is refused at the end.
                Input::TooLong | Input::Invalid => too_large = true,
                Input::Line(l) => {
                    if l == "." {
                        break;
                    }
                    let l = l.strip_prefix('.').unwrap_or(&l);
                    if body.len() + l.len() + 1 > max {
                        too_large = true;
                    } else {
                        body.extend_from_slice(l.as_bytes());
                        body.push(b'\n');
                    }
                }
            }
        }
        if too_large {
            self.reply(&format!(
                "552 configuration refused (larger than {max} bytes, a line over the limit, or not UTF-8); nothing sent"
            ))
            .await?;
            return Ok(None);
        }
        if body.is_empty() {
            self.reply("501 empty configuration; nothing sent").await?;
            return Ok(None);
        }
        Ok(Some(body))
    }

    async fn push(&mut self, target: Target, idle: Duration) -> Result<(), SessionError> {
        let Some(op) = self.operator.clone() else {
            return self.reply("530 log in first").await;
        };
        let ids = match fleet::select(&self.hub.cfg, &target) {
            Ok(ids) => ids,
            Err(e) => return self.reply(&format!("550 {e}")).await,
        };
        if op.role == OperatorRole::ReadOnly {
            self.audit("push_refused", format!("{target}: read-only operator"))
                .await;
            return self
                .reply(&format!(
                    "550 operator {} is read-only and cannot push",
                    op.name
                ))
                .await;
        }
        let what = match &target {
            Target::Machine(id) => format!("machine {id}"),
            t => format!("{t} ({} machines)", ids.len()),
        };
        self.reply(&format!(
            "354 send the configuration for {what}; end with a line holding only \".\""
        ))
        .await?;
        let Some(body) = self.read_body(idle).await? else {
            return Ok(());
        };
        match target {
            Target::Machine(id) => self.push_one(id, body, &op.name).await,
            t => self.push_fleet(t, ids, body, &op.name).await,
        }
    }

    async fn push_one(&mut self, id: u16, body: Vec<u8>, actor: &str) -> Result<(), SessionError> {
        let size = body.len();
        let result = push::push(&self.hub, id, body, actor).await;
        let line = match &result {
            Ok(r) => push_reply(id, r),
            Err(e @ (PushError::UnknownMachine(_) | PushError::TooLarge { .. })) => {
                format!("550 {e}")
            }
            Err(e) => format!("451 {e}"),
        };
        let detail = match &result {
            Ok(r) => format!(
                "machine {id} generation {} ({size} bytes): {}",
                r.generation(),
                outcome_word(r)
            ),
            Err(e) => format!("machine {id}: refused: {e}"),
        };
        self.audit("push", detail).await;
        self.reply(&line).await
    }

    /// A push to many machines: `151-` progress lines while it runs (at most every
    /// 500 ms, and once at the end), then one line per machine and a summary.
    async fn push_fleet(
        &mut self,
        target: Target,
        ids: Vec<u16>,
        body: Vec<u8>,
        actor: &str,
    ) -> Result<(), SessionError> {
        let size = body.len();
        let (tx, mut rx) = tokio::sync::watch::channel(Progress::start(ids.len()));
        let hub = self.hub.clone();
        let actor_owned = actor.to_owned();
        let mut task =
            tokio::spawn(
                async move { fleet::push_many(&hub, ids, body, &actor_owned, Some(tx)).await },
            );
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shown: Option<Progress> = None;
        let results = loop {
            tokio::select! {
                r = &mut task => break r,
                _ = tick.tick() => {
                    let p = *rx.borrow_and_update();
                    if shown != Some(p) {
                        shown = Some(p);
                        self.reply(&format!("151-{}", p.line())).await?;
                    }
                }
            }
        };
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("fleet push task failed: {e}");
                return self
                    .reply("451 the push task failed; see the SCM's log, then check `machines`")
                    .await;
            }
        };
        let mut totals = Progress::start(results.len());
        let mut lines = Vec::with_capacity(results.len() + 2);
        for (id, r) in &results {
            totals.add(r);
            lines.push(match r {
                Ok(r) => push_reply(*id, r)[4..].to_string(),
                Err(e) => format!("machine {id}: not attempted: {e}"),
            });
        }
        self.reply(&format!("151-{}", totals.line())).await?;
        let code = if totals.failed > 0 {
            451
        } else if totals.nack > 0 {
            554
        } else if totals.pending > 0 {
            450
        } else {
            250
        };
        lines.push(format!("{target}: {}", totals.line()));
        self.audit(
            "push",
            format!("{target} ({size} bytes): {}", totals.line()),
        )
        .await;
        self.reply_lines(code, lines).await
    }
}

/// The outcome as the audit log words it (telnet and admin API pushes alike).
pub(crate) fn outcome_word(r: &PushResult) -> String {
    match r {
        PushResult::Ack { .. } => "ack".into(),
        PushResult::Nack { detail, .. } => format!("nack {}", one_line(detail)),
        PushResult::Unreachable { .. } => "pending".into(),
        PushResult::Superseded { by, .. } => format!("superseded by generation {by}"),
    }
}

/// The operator's one-line answer for a delivery result.
fn push_reply(id: u16, r: &PushResult) -> String {
    match r {
        PushResult::Ack { generation, detail } => format!(
            "250 ACK machine {id} generation {generation}: {}",
            one_line(detail)
        ),
        PushResult::Nack { generation, detail } => format!(
            "554 NACK machine {id} generation {generation}: {}",
            one_line(detail)
        ),
        PushResult::Unreachable { generation, detail } => format!(
            "450 machine {id} unreachable; generation {generation} pending, retried with back-off and at its next HELLO: {}",
            one_line(detail)
        ),
        PushResult::Superseded { generation, by } => format!(
            "251 machine {id} generation {generation} superseded: generation {by} is newer and is the one delivered; not sent"
        ),
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect()
}

fn truncate(s: &str, n: usize) -> String {
    let t: String = s.chars().take(n).collect();
    one_line(&t)
}

/// Formats Unix milliseconds as RFC 3339 UTC.
pub fn fmt_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}
