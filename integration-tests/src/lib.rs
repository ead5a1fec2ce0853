//! Harness for end-to-end tests of the real binaries: builds them once, starts them with
//! port 0, finds their ports from the `listening on ADDR (NAME)` log lines, waits on log
//! lines instead of sleeping, kills them on drop and prints their logs when a test fails.
#![forbid(unsafe_code)]

pub mod tables;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use scm_common::lock::{CondvarExt, LockExt};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a workspace binary, built (once per test process) if needed.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Variables cargo sets for this test process (CARGO_MANIFEST_DIR, ...) would make
        // build scripts that watch them (ring's does) rebuild everything: drop them.
        for (k, _) in std::env::vars() {
            let per_package =
                k.starts_with("CARGO_") && !matches!(k.as_str(), "CARGO_HOME" | "CARGO_TARGET_DIR");
            if per_package || k == "RUST_RECURSION_COUNT" || k == "LD_LIBRARY_PATH" {
                cmd.env_remove(&k);
            }
        }
        let status = cmd
            // The same command as scripts/test.sh and scripts/demo.sh, so that it finds
            // everything already built.
            .args(["build", "--quiet", "--workspace", "--bins"])
            .current_dir(&root)
            .status()
            .expect("run cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        target.join("debug")
    });
    dir.join(name)
}

/// Shared, growing log of one process.
#[derive(Debug, Default)]
struct Log {
    text: Mutex<String>,
    grew: Condvar,
    /// The pipe reached its end (the process closed it or exited).
    closed: std::sync::atomic::AtomicBool,
}

impl Log {
    /// Waits (at most `max`) until the pipe has been read to its end, so that what a
    /// process printed just before it exited is in the text.
    fn wait_closed(&self, max: std::time::Duration) {
        let deadline = std::time::Instant::now() + max;
        let mut t = self.text.lock_unpoisoned();
        while !self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            t = self.grew.wait_timeout_unpoisoned(t, left).0;
        }
    }
}

/// A running binary.
#[derive(Debug)]
pub struct Proc {
    /// Name for messages.
    pub name: String,
    child: Child,
    log: Arc<Log>,
    stdout: Arc<Log>,
}

fn pump(mut r: impl Read + Send + 'static, log: Arc<Log>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _t = log.text.lock_unpoisoned();
                    log.closed.store(true, std::sync::atomic::Ordering::SeqCst);
                    log.grew.notify_all();
                    break;
                }
                Ok(n) => {
                    let mut t = log.text.lock_unpoisoned();
                    t.push_str(&String::from_utf8_lossy(&buf[..n]));
                    log.grew.notify_all();
                }
            }
        }
    });
}

impl Proc {
    /// Starts `bin` with arguments and environment; stderr and stdout are captured.
    pub fn spawn(name: &str, bin: &Path, args: &[&str], env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let log = Arc::new(Log::default());
        let stdout = Arc::new(Log::default());
        if let Some(e) = child.stderr.take() {
            pump(e, log.clone());
        }
        if let Some(o) = child.stdout.take() {
            pump(o, stdout.clone());
        }
        Proc {
            name: name.to_string(),
            child,
            log,
            stdout,
        }
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.log.text.lock_unpoisoned().clone()
    }

    /// Waits until the log contains `needle` at least `count` times; returns the line of
    /// the last occurrence. Panics (with the logs) after [`WAIT`].
    pub fn wait_for_n(&self, needle: &str, count: usize) -> String {
        self.wait_in(&self.log, "log", needle, count)
    }

    /// Like [`Proc::wait_for_n`], on standard output.
    pub fn wait_stdout_n(&self, needle: &str, count: usize) -> String {
        self.wait_in(&self.stdout, "stdout", needle, count)
    }

    /// Waits until standard output contains `needle`.
    pub fn wait_stdout(&self, needle: &str) -> String {
        self.wait_stdout_n(needle, 1)
    }

    fn wait_in(&self, log: &Log, what: &str, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + WAIT;
        let mut t = log.text.lock_unpoisoned();
        loop {
            if t.matches(needle).count() >= count {
                let pos = t.rmatch_indices(needle).next().map(|(i, _)| i).unwrap_or(0);
                let start = t[..pos].rfind('\n').map(|i| i + 1).unwrap_or(0);
                let end = t[pos..].find('\n').map(|i| pos + i).unwrap_or(t.len());
                return t[start..end].to_string();
            }
            let now = Instant::now();
            if now >= deadline {
                let logs = t.clone();
                drop(t);
                let stderr = if what == "log" {
                    String::new()
                } else {
                    self.logs()
                };
                panic!(
                    "{}: {needle:?} (x{count}) not in its {what} within {WAIT:?}:\n{logs}\n{stderr}",
                    self.name
                );
            }
            t = log.grew.wait_timeout_unpoisoned(t, deadline - now).0;
        }
    }

    /// Waits until one of `needles` is logged; returns the one that was. Panics (with the
    /// logs) after [`WAIT`].
    pub fn wait_for_any<'a>(&self, needles: &[&'a str]) -> &'a str {
        let deadline = Instant::now() + WAIT;
        let mut t = self.log.text.lock_unpoisoned();
        loop {
            if let Some(n) = needles.iter().find(|n| t.contains(**n)) {
                return n;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{}: none of {needles:?} in its log within {WAIT:?}:\n{}",
                self.name,
                *t
            );
            t = self.log.grew.wait_timeout_unpoisoned(t, deadline - now).0;
        }
    }

    /// Waits until `needle` is logged once.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_n(needle, 1)
    }

    /// Waits for `listening on ADDR (NAME)` and returns ADDR.
    pub fn listening(&self, name: &str) -> SocketAddr {
        let suffix = format!("({name})");
        let line = self.wait_for(&suffix);
        let after = line
            .split("listening on ")
            .nth(1)
            .unwrap_or_else(|| panic!("no listening line for {name}: {line}"));
        after
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse the address in {line:?}"))
    }

    /// Waits for the process to exit (after it was told to) and returns its status code.
    /// (The test runner's timeout bounds this wait; see `.config/nextest.toml`.)
    pub fn wait_exit(&mut self) -> Option<i32> {
        let code = self.child.wait().ok().and_then(|s| s.code());
        // The pipes' reader threads may not have taken the last bytes yet.
        self.stdout.wait_closed(std::time::Duration::from_secs(10));
        self.log.wait_closed(std::time::Duration::from_secs(10));
        code
    }

    /// Sends a signal (`TERM`, `KILL`, ...).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Standard output so far.
    pub fn stdout(&self) -> String {
        self.stdout.text.lock_unpoisoned().clone()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- logs of {} -----\n{}", self.name, self.logs());
            let out = self.stdout();
            if !out.is_empty() {
                eprintln!("----- stdout of {} -----\n{out}", self.name);
            }
        }
    }
}

/// Runs a binary to completion; returns (exit code, stdout, stderr).
pub fn run(bin: &Path, args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the back office with configuration file `cfg` against the SCM telnet port
/// `telnet`; returns (exit code, stdout, stderr).
pub fn backoffice_with(cfg: &Path, telnet: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["--config", cfg.to_str().unwrap_or("")];
    full.extend_from_slice(args);
    run(
        &bin("backoffice"),
        &full,
        &[("BACKOFFICE__SCM__ADDRESS", telnet.to_string())],
    )
}

/// Starts `backoffice watch` with configuration file `cfg` against the SCM admin API
/// `admin`; it logs `watching events` once its event stream is open.
pub fn watch_with(cfg: &Path, admin: SocketAddr, args: &[&str]) -> Proc {
    let mut full = vec!["--config", cfg.to_str().unwrap_or(""), "watch"];
    full.extend_from_slice(args);
    Proc::spawn(
        "backoffice-watch",
        &bin("backoffice"),
        &full,
        &[("BACKOFFICE__ADMIN__ADDRESS", admin.to_string())],
    )
}

/// Swipes `card` on reader `r1` of `machine` by writing it into the FIFO that `scm
/// init-dev` configured in `dev`.
pub fn swipe(dev: &Path, machine: u16, card: &str) {
    let fifo = dev.join(format!("machine-{machine}-r1.fifo"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap_or_else(|e| panic!("open {}: {e}", fifo.display()));
    f.write_all(format!("{card}\n").as_bytes())
        .unwrap_or_else(|e| panic!("write to {}: {e}", fifo.display()));
}

/// A development fleet made by `scm init-dev`: one SCM and its agents, all on port 0.
#[derive(Debug)]
pub struct Fleet {
    /// The init-dev directory.
    pub dir: tempfile::TempDir,
    /// The SCM.
    pub scm: Proc,
    /// Agents by machine id.
    pub agents: Vec<(u16, Proc)>,
    /// Agent link address.
    pub agents_addr: SocketAddr,
    /// Plain telnet address.
    pub telnet: SocketAddr,
    /// TLS telnet address.
    pub telnet_tls: SocketAddr,
    /// The admin password.
    pub password: String,
}

/// Environment for an SCM started by tests: every port 0, short login delay.
pub fn scm_env() -> Vec<(&'static str, String)> {
    vec![
        ("SCM__LISTEN__AGENTS", "127.0.0.1:0".into()),
        ("SCM__LISTEN__TELNET", "127.0.0.1:0".into()),
        ("SCM__LISTEN__TELNET_TLS", "127.0.0.1:0".into()),
        ("SCM__LISTEN__ADMIN", "127.0.0.1:0".into()),
        ("SCM__LISTEN__RFIDEAS", "127.0.0.1:0".into()),
        ("SCM__LOGIN__FAILURE_DELAY_MS", "20".into()),
        ("SCM__TIMEOUTS__PUSH_CONNECT_MS", "2000".into()),
        ("SCM__TIMEOUTS__PUSH_REPLY_MS", "5000".into()),
    ]
}

impl Fleet {
    /// Writes a development set-up for `machines` without starting anything.
    pub fn init(machines: &[u16]) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let list = machines
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let out = dir.path().join("dev");
        let (code, stdout, stderr) = run(
            &bin("scm"),
            &[
                "init-dev",
                "--out",
                out.to_str().unwrap_or("."),
                "--machines",
                &list,
            ],
            &[],
        );
        assert_eq!(code, 0, "init-dev failed: {stdout}{stderr}");
        // Generic device ports are in [[generic]] tables, which environment variables cannot
        // address: put them on port 0 in the file.
        let scm_toml = out.join("scm.toml");
        let text = std::fs::read_to_string(&scm_toml).expect("read scm.toml");
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("listen = \"127.0.0.1:") {
                    "listen = \"127.0.0.1:0\"".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&scm_toml, text + "\n").expect("write scm.toml");
        let password = stdout
            .lines()
            .find_map(|l| l.strip_prefix("operator login: admin / "))
            .expect("init-dev prints the admin password")
            .trim()
            .to_string();
        (dir, password)
    }

    /// The init-dev output directory.
    pub fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    /// Starts the SCM of an init-dev directory with extra environment.
    pub fn start_scm(dir: &Path, extra: &[(&'static str, String)]) -> Proc {
        let mut env = scm_env();
        env.extend(extra.iter().cloned());
        let cfg = dir.join("dev/scm.toml");
        Proc::spawn(
            "scm",
            &bin("scm"),
            &["serve", "--config", cfg.to_str().unwrap_or("")],
            &env,
        )
    }

    /// Starts one agent against `scm_addr`.
    pub fn start_agent(
        dir: &Path,
        id: u16,
        scm_addr: SocketAddr,
        extra: &[(&'static str, String)],
    ) -> Proc {
        let cfg = dir.join(format!("dev/agent-{id}.toml"));
        let mut env = vec![
            ("AGENT__SCM__ADDRESS", scm_addr.to_string()),
            ("AGENT__LISTEN__CONFIG", "127.0.0.1:0".to_string()),
            ("AGENT__TIMEOUTS__RECONNECT_MIN_MS", "50".to_string()),
            ("AGENT__TIMEOUTS__RECONNECT_MAX_MS", "500".to_string()),
        ];
        env.extend(extra.iter().cloned());
        Proc::spawn(
            &format!("agent-{id}"),
            &bin("machine-agent"),
            &["--config", cfg.to_str().unwrap_or("")],
            &env,
        )
    }

    /// init-dev, the SCM, and every agent connected.
    pub fn start(machines: &[u16]) -> Fleet {
        let (dir, password) = Fleet::init(machines);
        Fleet::from_dir(dir, password, &[], &[], machines)
    }

    /// The SCM (with `scm_env`) and every agent (with `agent_env`) of an init-dev
    /// directory, the agents connected.
    pub fn from_dir(
        dir: tempfile::TempDir,
        password: String,
        scm_env: &[(&'static str, String)],
        agent_env: &[(&'static str, String)],
        machines: &[u16],
    ) -> Fleet {
        let scm = Fleet::start_scm(dir.path(), scm_env);
        let agents_addr = scm.listening("agents");
        let telnet = scm.listening("telnet");
        let telnet_tls = scm.listening("telnet-tls");
        let agents: Vec<(u16, Proc)> = machines
            .iter()
            .map(|id| {
                (
                    *id,
                    Fleet::start_agent(dir.path(), *id, agents_addr, agent_env),
                )
            })
            .collect();
        for (_, a) in &agents {
            a.wait_for("connected to SCM");
        }
        Fleet {
            dir,
            scm,
            agents,
            agents_addr,
            telnet,
            telnet_tls,
            password,
        }
    }

    /// The agent of machine `id`.
    pub fn agent(&self, id: u16) -> &Proc {
        &self
            .agents
            .iter()
            .find(|(i, _)| *i == id)
            .expect("agent started")
            .1
    }

    /// Storage directory of machine `id`'s agent.
    pub fn agent_dir(&self, id: u16) -> PathBuf {
        self.dev().join(format!("machine-{id}"))
    }

    /// Runs the back office with this fleet's configuration.
    pub fn backoffice(&self, args: &[&str]) -> (i32, String, String) {
        backoffice_with(&self.dev().join("backoffice.toml"), self.telnet, args)
    }

    /// Starts `backoffice watch` (with extra arguments such as `--count N`) against this
    /// fleet's admin API; it logs `watching events` once its stream is open.
    pub fn watch(&self, args: &[&str]) -> Proc {
        watch_with(&self.dev().join("backoffice.toml"), self.admin(), args)
    }

    /// The SCM's gRPC admin API address (from its `listening on ADDR (admin)` line).
    pub fn admin(&self) -> SocketAddr {
        self.scm.listening("admin")
    }
}

/// A line-oriented raw TCP client for telnet tests (no option handling: it answers
/// nothing, which the server must tolerate).
#[derive(Debug)]
pub struct RawTelnet {
    /// The socket.
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RawTelnet {
    /// Connects.
    pub fn connect(addr: SocketAddr) -> RawTelnet {
        let stream = TcpStream::connect(addr).expect("connect to telnet");
        stream.set_read_timeout(Some(WAIT)).expect("set timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        RawTelnet { stream, reader }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends a line with CR LF.
    pub fn line(&mut self, text: &str) {
        self.send(format!("{text}\r\n").as_bytes());
    }

    /// Reads until `needle` appears in the text received (telnet commands stripped);
    /// returns everything read.
    pub fn until(&mut self, needle: &str) -> String {
        let mut seen = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let text = strip_iac(&seen);
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not received; got {text:?}"
            );
            let buf = self
                .reader
                .fill_buf()
                .unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}; got {text:?}"));
            if buf.is_empty() {
                panic!("connection closed while waiting for {needle:?}; got {text:?}");
            }
            let n = buf.len();
            seen.extend_from_slice(buf);
            self.reader.consume(n);
        }
    }

    /// Reads until the server closes; returns the text.
    pub fn until_closed(&mut self) -> String {
        let mut all = Vec::new();
        let _ = self.reader.read_to_end(&mut all);
        strip_iac(&all)
    }

    /// Logs in with a password, returning the 230 reply text.
    pub fn login(&mut self, user: &str, password: &str) -> String {
        self.until("Username: ");
        self.line(user);
        self.until("Password: ");
        self.line(password);
        self.until("scm> ")
    }
}

/// Removes telnet IAC sequences (3-byte negotiations and 2-byte commands).
pub fn strip_iac(bytes: &[u8]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 255 {
            match bytes.get(i + 1) {
                Some(251..=254) => i += 3,
                Some(255) => {
                    out.push(255);
                    i += 2;
                }
                Some(_) => i += 2,
                None => i += 1,
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
