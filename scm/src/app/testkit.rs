//! The SCM inside a test (mini-redis style): a development fleet written by `init-dev`
//! into a temporary directory, the hub prepared from its configuration with every
//! listener on port 0 and served on the test's runtime, and real machine agents (the
//! `machine-agent` library) started beside it. Rules of push, retry and the agent link get
//! fast tests this way; the end-to-end tests in `integration-tests` keep running the real
//! binaries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::config::ScmConfig;
use crate::app::initdev::{InitDevOptions, init_dev_with};
use crate::app::server;
use crate::ops::Ops;

/// How long any single wait of a test may take before it fails.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// A running in-process SCM with its development fleet.
pub(crate) struct TestScm {
    dir: tempfile::TempDir,
    /// The use-case layer, to read its state directly.
    pub(crate) ops: Arc<Ops>,
    /// The agent-link listener's address.
    pub(crate) agents: SocketAddr,
    /// The plain telnet listener's address.
    pub(crate) telnet: SocketAddr,
    /// The admin operator's password.
    pub(crate) password: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    running_agents: HashMap<u16, (CancellationToken, JoinHandle<()>)>,
}

impl std::fmt::Debug for TestScm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestScm")
            .field("dir", &self.dir.path())
            .field("agents", &self.agents)
            .field("telnet", &self.telnet)
            .finish_non_exhaustive()
    }
}

impl TestScm {
    /// Writes a fleet of `machines` and starts the SCM with `tune` applied to its
    /// configuration (after every listener was put on port 0).
    pub(crate) async fn start(machines: &[u16], tune: impl FnOnce(&mut ScmConfig)) -> TestScm {
        scm_certs::tls::install_default_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("dev");
        let made = init_dev_with(&out, machines, &InitDevOptions::default()).expect("init-dev");
        let mut cfg = ScmConfig::load(&made.scm_config, &scm_common::config::Env::new())
            .expect("load scm.toml");
        let zero = "127.0.0.1:0".to_string();
        cfg.listen.agents = zero.clone();
        cfg.listen.telnet = zero.clone();
        cfg.listen.telnet_tls = String::new();
        cfg.listen.admin = String::new();
        cfg.listen.metrics = String::new();
        cfg.listen.rfideas = String::new();
        for d in &mut cfg.generic {
            d.listen = zero.clone();
        }
        cfg.rfideas.clear();
        cfg.login.failure_delay_ms = 0;
        cfg.timeouts.push_connect_ms = 2_000;
        cfg.timeouts.push_reply_ms = 5_000;
        tune(&mut cfg);
        cfg.validate().expect("valid configuration");
        let prepared = server::prepare(cfg).expect("prepare");
        let listeners = server::bind_all(&prepared).await.expect("bind");
        let addr = |l: &Option<tokio::net::TcpListener>| {
            l.as_ref()
                .and_then(|l| l.local_addr().ok())
                .expect("listener bound")
        };
        let agents = addr(&listeners.agents);
        let telnet = addr(&listeners.telnet);
        let ops = prepared.ops.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::serve(prepared, listeners, shutdown.clone()));
        TestScm {
            dir,
            ops,
            agents,
            telnet,
            password: made.admin_password,
            shutdown,
            task: Some(task),
            running_agents: HashMap::new(),
        }
    }

    /// The fleet's directory (certificates, configurations).
    pub(crate) fn dev_dir(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    /// Starts machine `id`'s agent (the `machine-agent` library) against this SCM, with its
    /// config port and metrics on port 0 and its storage in the fleet's directory.
    pub(crate) async fn start_agent(&mut self, id: u16) {
        let path = self.dev_dir().join(format!("agent-{id}.toml"));
        let mut cfg =
            machine_agent::config::AgentConfig::load(&path, &scm_common::config::Env::new())
                .expect("load agent configuration");
        cfg.scm.address = self.agents.to_string();
        cfg.listen.config = "127.0.0.1:0".into();
        cfg.listen.metrics = String::new();
        cfg.readers.clear();
        cfg.timeouts.reconnect_min_ms = 20;
        cfg.timeouts.reconnect_max_ms = 200;
        let agent = machine_agent::Agent::prepare(cfg).expect("prepare agent");
        let config = agent.bind().await.expect("bind the agent's config port");
        let token = CancellationToken::new();
        let task = tokio::spawn(agent.run(config, None, token.clone()));
        if let Some((old, t)) = self.running_agents.insert(id, (token, task)) {
            old.cancel();
            let _ = t.await;
        }
    }

    /// Stops machine `id`'s agent and waits until it has stopped.
    pub(crate) async fn stop_agent(&mut self, id: u16) {
        if let Some((token, task)) = self.running_agents.remove(&id) {
            token.cancel();
            let _ = tokio::time::timeout(WAIT, task).await;
        }
    }

    /// Waits until machine `id` has a live link (its HELLO was accepted), or fails.
    pub(crate) async fn wait_linked(&self, id: u16) {
        self.wait_until(
            || self.ops.sessions.session(id).is_some(),
            "a link of the machine",
        )
        .await;
    }

    /// Waits until machine `id` has no live link, or fails.
    pub(crate) async fn wait_unlinked(&self, id: u16) {
        self.wait_until(
            || self.ops.sessions.session(id).is_none(),
            "no link of the machine",
        )
        .await;
    }

    /// Waits until `cond` holds, re-checking it after each event on the hub's event bus
    /// (links, push outcomes and swipes are all published after the state they report
    /// changed), for at most [`WAIT`] in all.
    pub(crate) async fn wait_until(&self, cond: impl Fn() -> bool, what: &str) {
        let mut events = self.ops.events.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond() {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the event bus closed while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// The file machine `id`'s agent keeps its current configuration in.
    pub(crate) fn agent_config_file(&self, id: u16) -> PathBuf {
        let path = self.dev_dir().join(format!("agent-{id}.toml"));
        let cfg = machine_agent::config::AgentConfig::load(&path, &scm_common::config::Env::new())
            .expect("load agent configuration");
        cfg.storage.dir.join(machine_agent::storage::CURRENT)
    }

    /// A logged-in operator session over plain telnet.
    pub(crate) async fn operator(&self) -> Operator {
        let mut op = Operator {
            tcp: tokio::time::timeout(WAIT, TcpStream::connect(self.telnet))
                .await
                .expect("connect in time")
                .expect("connect to telnet"),
            buf: Vec::new(),
        };
        op.read_until_text("Username: ").await;
        op.send_line("admin").await;
        op.read_until_text("Password: ").await;
        let pw = self.password.clone();
        op.send_line(&pw).await;
        let r = op.reply().await;
        assert!(r.starts_with("230 "), "login: {r}");
        op
    }

    /// Shuts the SCM and its agents down and waits for them.
    pub(crate) async fn stop(mut self) {
        let ids: Vec<u16> = self.running_agents.keys().copied().collect();
        for id in ids {
            self.stop_agent(id).await;
        }
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }
}

impl Drop for TestScm {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for (token, _) in self.running_agents.values() {
            token.cancel();
        }
    }
}

/// An operator's telnet session as a plain client sees it: telnet commands (IAC ...) are
/// dropped, replies are read up to their final `<code> ` line.
pub(crate) struct Operator {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator").finish_non_exhaustive()
    }
}

impl Operator {
    /// Sends one line (CR LF).
    pub(crate) async fn send_line(&mut self, line: &str) {
        let mut b = line.as_bytes().to_vec();
        b.extend_from_slice(b"\r\n");
        self.tcp.write_all(&b).await.expect("write to telnet");
    }

    /// Sends `command` and returns its whole reply (continuation lines included).
    pub(crate) async fn command(&mut self, command: &str) -> String {
        self.send_line(command).await;
        self.reply().await
    }

    /// Pushes `body` to `target` and returns the final reply.
    pub(crate) async fn push(&mut self, target: &str, body: &str) -> String {
        let r = self.command(&format!("push {target}")).await;
        assert!(r.starts_with("354 "), "push {target}: {r}");
        for l in body.lines() {
            if l.starts_with('.') {
                self.send_line(&format!(".{l}")).await;
            } else {
                self.send_line(l).await;
            }
        }
        self.send_line(".").await;
        self.reply().await
    }

    /// Reads one reply: lines up to and including the first `NNN ` line.
    pub(crate) async fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let line = self.read_line().await;
            let done = line.len() >= 4
                && line.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                && line.as_bytes()[3] == b' ';
            // Progress lines of a fleet push and the prompt are not part of a reply.
            out.push_str(&line);
            out.push('\n');
            if done {
                return out;
            }
        }
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=i).collect();
                let s = String::from_utf8_lossy(&raw);
                let s = s.trim_end_matches(['\r', '\n']);
                // The prompt has no line end of its own and leads the next reply line.
                let s = s.trim_start_matches("scm> ");
                if s.is_empty() {
                    continue;
                }
                return s.to_string();
            }
            self.fill().await;
        }
    }

    async fn read_until_text(&mut self, text: &str) {
        loop {
            if let Some(i) = find(&self.buf, text.as_bytes()) {
                self.buf.drain(..i + text.len());
                return;
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("telnet reply in time")
            .expect("read telnet");
        assert!(n > 0, "telnet closed; so far: {:?}", self.buf);
        strip_telnet_commands(&chunk[..n], &mut self.buf);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Appends `data` to `out` without telnet commands. Negotiations are never split across
/// reads by the SCM's writer in practice; a command cut at a read boundary would only
/// leave its option byte behind, which no reply starts with.
fn strip_telnet_commands(data: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            0xff if i + 1 < data.len() => match data[i + 1] {
                0xff => {
                    out.push(0xff);
                    i += 2;
                }
                0xfb..=0xfe => i += 3,
                0xfa => {
                    // Subnegotiation: up to IAC SE.
                    let mut j = i + 2;
                    while j + 1 < data.len() && !(data[j] == 0xff && data[j + 1] == 0xf0) {
                        j += 1;
                    }
                    i = j + 2;
                }
                _ => i += 2,
            },
            0 => i += 1,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
}
