//! The operator telnet interface end to end: the real inetutils and busybox telnet
//! programs (through a pty made by `script`), raw-socket checks of what real clients send
//! (Ctrl-C as `IAC IP IAC DO TIMING-MARK`, `IAC AYT`, `IAC IAC`, PuTTY's opening burst
//! and bare-LF lines), the line limit, push edge cases, failed-login throttling and its
//! audit, the TLS port, and the back office shell.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use integration_tests::{Fleet, Proc, RawTelnet, WAIT, bin, run, strip_iac};
use scm_common::lock::{CondvarExt, LockExt};

const IAC: u8 = 255;
const WILL: u8 = 251;
const WONT: u8 = 252;
const DO: u8 = 253;
const DONT: u8 = 254;
const IP: u8 = 244;
const AYT: u8 = 246;
const ECHO: u8 = 1;
const SGA: u8 = 3;
const TM: u8 = 6;
const TTYPE: u8 = 24;
const NAWS: u8 = 31;
const TSPEED: u8 = 32;
const NEW_ENVIRON: u8 = 39;

/// What inetutils telnet sends for Ctrl-C.
const CTRL_C: [u8; 5] = [IAC, IP, IAC, DO, TM];

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads raw bytes (telnet commands kept) from `s` until every needle has been seen;
/// returns everything read. `s` must have a read timeout (RawTelnet sets [`WAIT`]).
fn raw_until_all(s: &mut TcpStream, needles: &[&[u8]]) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !needles.iter().all(|n| find(&seen, n).is_some()) {
        assert!(
            Instant::now() < deadline,
            "{needles:?} not all received; got {seen:?}"
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("connection closed while waiting for {needles:?}; got {seen:?}"),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => panic!("waiting for {needles:?}: {e}; got {seen:?}"),
        }
    }
    seen
}

/// Reads raw bytes until one of the needles has been seen; returns its index and the bytes.
fn raw_until_any(s: &mut TcpStream, needles: &[&[u8]]) -> (usize, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = needles.iter().position(|n| find(&seen, n).is_some()) {
            return (i, seen);
        }
        assert!(
            Instant::now() < deadline,
            "none of {needles:?} received; got {seen:?}"
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("connection closed while waiting for {needles:?}; got {seen:?}"),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => panic!("waiting for {needles:?}: {e}; got {seen:?}"),
        }
    }
}

/// Reads until the peer closes (bounded by the socket's read timeout); returns the raw
/// bytes. Panics if the connection stays open.
fn raw_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    match s.read_to_end(&mut all) {
        Ok(_) => {}
        // A reset is a close too (the peer left unread input behind).
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection was not closed: {e}; got {all:?}"),
    }
    all
}

/// An SCM from `scm init-dev` (one machine) with extra environment, optionally with the
/// agent of machine 1 connected.
struct Scm {
    password: String,
    telnet: SocketAddr,
    agent: Option<Proc>,
    /// Kept running (and its logs printed if the test fails).
    _scm: Proc,
    /// Last, so that it is removed after the processes are gone.
    dir: tempfile::TempDir,
}

impl Scm {
    fn start(env: &[(&'static str, String)], with_agent: bool) -> Scm {
        let (dir, password) = Fleet::init(&[1]);
        let scm = Fleet::start_scm(dir.path(), env);
        let agents_addr = scm.listening("agents");
        let telnet = scm.listening("telnet");
        let agent = with_agent.then(|| {
            let a = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
            a.wait_for("connected to SCM");
            a
        });
        Scm {
            password,
            telnet,
            agent,
            _scm: scm,
            dir,
        }
    }

    fn agent_file(&self) -> PathBuf {
        self.dir.path().join("dev/machine-1/config.current")
    }
}

/// Connects and logs in as admin, checking the greeting and the 230 reply; the session
/// waits at the command prompt.
fn logged_in(addr: SocketAddr, password: &str) -> RawTelnet {
    let mut t = RawTelnet::connect(addr);
    let greeting = t.until("Username: ");
    assert!(greeting.starts_with("220 SCM hub "), "{greeting:?}");
    t.line("admin");
    t.until("Password: ");
    t.line(password);
    let text = t.until("scm> ");
    assert_eq!(
        text, "\r\n230 logged in as admin (admin); type help for commands\r\nscm> ",
        "login reply"
    );
    t
}

/// Sends a command line and returns the reply up to and including the next prompt.
fn command(t: &mut RawTelnet, line: &str) -> String {
    t.line(line);
    t.until("\r\nscm> ")
}

/// Output of a child process, growing; `closed` once its stdout ended.
#[derive(Default)]
struct Shared {
    state: Mutex<(Vec<u8>, bool)>,
    grew: Condvar,
}

fn pump(mut r: impl Read + Send + 'static, into: Arc<Shared>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = r.read(&mut buf).unwrap_or(0);
            let mut s = into.state.lock_unpoisoned();
            if n == 0 {
                s.1 = true;
                into.grew.notify_all();
                return;
            }
            s.0.extend_from_slice(&buf[..n]);
            into.grew.notify_all();
        }
    });
}

/// An interactive program driven through pipes: we type only after the output we wait for
/// has appeared. Killed on drop.
struct Interactive {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Shared>,
    err: Arc<Shared>,
    /// Output before this offset has been consumed by [`until`](Self::until).
    mark: usize,
}

impl Interactive {
    fn spawn(program: &Path, args: &[&str], env: &[(&str, String)]) -> Interactive {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("TERM", "dumb")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let out = Arc::new(Shared::default());
        let err = Arc::new(Shared::default());
        if let Some(o) = child.stdout.take() {
            pump(o, out.clone());
        }
        if let Some(e) = child.stderr.take() {
            pump(e, err.clone());
        }
        Interactive {
            name: format!("{} {}", program.display(), args.join(" ")),
            stdin: child.stdin.take(),
            child,
            out,
            err,
            mark: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(bytes).expect("write to the program");
        stdin.flush().expect("flush to the program");
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn text(s: &Shared) -> String {
        let st = s.state.lock_unpoisoned();
        String::from_utf8_lossy(&st.0).into_owned()
    }

    /// All output so far.
    fn all(&self) -> String {
        Self::text(&self.out)
    }

    /// Waits until `needle` appears after the last match; returns the output from the
    /// last match to the end of this one.
    fn until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut st = self.out.state.lock_unpoisoned();
        loop {
            if let Some(i) = find(&st.0[self.mark..], needle.as_bytes()) {
                let end = self.mark + i + needle.len();
                let text = String::from_utf8_lossy(&st.0[self.mark..end]).into_owned();
                self.mark = end;
                return text;
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                let out = String::from_utf8_lossy(&st.0).into_owned();
                drop(st);
                panic!(
                    "{}: {needle:?} not printed ({}); output:\n{out:?}\nstderr:\n{}",
                    self.name,
                    if now >= deadline {
                        "timed out"
                    } else {
                        "output ended"
                    },
                    Self::text(&self.err)
                );
            }
            st = self.out.grew.wait_timeout_unpoisoned(st, deadline - now).0;
        }
    }

    /// Waits for the end of the output, then for the process; returns its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        let mut st = self.out.state.lock_unpoisoned();
        while !st.1 {
            let now = Instant::now();
            if now >= deadline {
                let out = String::from_utf8_lossy(&st.0).into_owned();
                drop(st);
                panic!("{}: output did not end; output:\n{out:?}", self.name);
            }
            st = self.out.grew.wait_timeout_unpoisoned(st, deadline - now).0;
        }
        drop(st);
        self.stdin = None;
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- output of {} -----\n{:?}\n----- stderr -----\n{}",
                self.name,
                self.all(),
                Self::text(&self.err)
            );
        }
    }
}

/// Runs `command` in a pseudo-terminal made by util-linux `script`, as a person would.
fn in_pty(command: &str) -> Interactive {
    Interactive::spawn(Path::new("script"), &["-qfc", command, "/dev/null"], &[])
}

/// The inetutils telnet client (Debian's `inetutils-telnet`, the `telnet` alternative).
fn inetutils_telnet() -> &'static str {
    if Path::new("/usr/bin/inetutils-telnet").exists() {
        "/usr/bin/inetutils-telnet"
    } else {
        "telnet"
    }
}

fn write_cfg(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config file");
    p.to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------

#[test]
fn inetutils_telnet_logs_in_pushes_survives_ctrl_c_and_quits() {
    let fleet = Fleet::start(&[1]);
    let mut tn = in_pty(&format!(
        "{} 127.0.0.1 {}",
        inetutils_telnet(),
        fleet.telnet.port()
    ));
    tn.until("220 SCM hub ");
    tn.until("Username: ");
    tn.write(b"admin\n");
    // The SCM's WILL ECHO turns the terminal's echo off for the password.
    tn.until("Password: ");
    tn.write(format!("{}\n", fleet.password).as_bytes());
    let text = tn.until("scm> ");
    assert!(
        text.contains("230 logged in as admin (admin); type help for commands\r\n"),
        "{text:?}"
    );
    assert!(
        !tn.all().contains(&fleet.password),
        "the password was echoed: {:?}",
        tn.all()
    );

    tn.write(b"push 1\n");
    tn.until("354 send the configuration for machine 1; end with a line holding only \".\"");
    tn.write(b"printer.tray = 2\n..hidden\n.\n");
    let text = tn.until("scm> ");
    assert!(
        text.contains("250 ACK machine 1 generation 1: "),
        "{text:?}"
    );
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(1).join("config.current"))
            .expect("the agent stored the configuration"),
        "printer.tray = 2\n.hidden\n",
        "two lines, the second one dot-stuffed"
    );

    // Ctrl-C: the terminal turns it into SIGINT, and telnet sends IAC IP IAC DO TM and
    // discards output until the answer to DO TM. Wait for the terminal's "^C" echo (the
    // interrupt has been delivered), then check that output continues.
    tn.write(b"\x03");
    tn.until("^C");
    tn.write(b"machines\n");
    let text = tn.until("250 1 machines");
    assert!(
        !text.contains("500 "),
        "Ctrl-C must not arrive as text: {text:?}"
    );
    assert!(
        text.contains(
            "250-1      machine-1        1   connected        1       1  dev,odd              -"
        ),
        "{text:?}"
    );
    tn.until("scm> ");

    // Ctrl-C in the middle of a push body: telnet shows nothing it receives before the
    // answer to its DO TM, so the SCM answers the mark first, then says what happened.
    tn.write(b"push 1\n");
    tn.until("354 send the configuration for machine 1");
    tn.write(b"pl=partial\n");
    tn.write(b"\x03");
    tn.until("^C");
    let text = tn.until("scm> ");
    assert!(
        text.contains("426 push cancelled; nothing sent\r\n"),
        "{text:?}"
    );
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(1).join("config.current"))
            .expect("the first configuration stays"),
        "printer.tray = 2\n.hidden\n",
    );

    tn.write(b"quit\n");
    tn.until("221 bye");
    tn.until("Connection closed by foreign host.");
    tn.wait_exit();
}

#[test]
fn busybox_telnet_character_mode_password_and_push() {
    let fleet = Fleet::start(&[1]);
    let mut tn = in_pty(&format!("busybox telnet 127.0.0.1 {}", fleet.telnet.port()));
    tn.until("220 SCM hub ");
    tn.until("Username: ");
    tn.write(b"admin\n");
    // WILL ECHO: busybox switches to character mode and sends every key as it is typed.
    tn.until("Entering character mode");
    tn.until("Password: ");
    // Type the password key by key with a typo erased by DEL (the server applies it in
    // character mode), then Enter (a CR in a raw terminal).
    let (head, tail) = fleet.password.split_at(5);
    for b in head.bytes() {
        tn.write(&[b]);
    }
    tn.write(b"#");
    tn.write(b"\x7f");
    for b in tail.bytes() {
        tn.write(&[b]);
    }
    tn.write(b"\r");
    // WONT ECHO after the password: back to line mode.
    tn.until("Entering line mode");
    let text = tn.until("scm> ");
    assert!(
        text.contains("230 logged in as admin (admin); type help for commands"),
        "{text:?}"
    );

    tn.write(b"push 1\n");
    tn.until("354 send the configuration for machine 1");
    tn.write(b"busybox = yes\nsecond line\n.\n");
    let text = tn.until("scm> ");
    assert!(
        text.contains("250 ACK machine 1 generation 1: "),
        "{text:?}"
    );
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(1).join("config.current"))
            .expect("the agent stored the configuration"),
        "busybox = yes\nsecond line\n"
    );

    tn.write(b"quit\n");
    tn.until("221 bye");
    tn.until("Connection closed by foreign host");
    tn.wait_exit();
}

// ---------------------------------------------------------------------------------------
// Raw client: protocol edges
// ---------------------------------------------------------------------------------------

#[test]
fn overlong_lines_are_refused_and_the_session_goes_on() {
    let s = Scm::start(&[("SCM__LIMITS__TELNET_MAX_LINE", "100".into())], true);
    let mut t = logged_in(s.telnet, &s.password);

    // Exactly the limit is a line; one byte more is not.
    let at_limit = format!("{:<100}", "machines");
    assert_eq!(at_limit.len(), 100);
    let text = command(&mut t, &at_limit);
    assert!(text.ends_with("250 1 machines\r\nscm> "), "{text:?}");
    let text = command(&mut t, &format!("{at_limit} "));
    assert_eq!(text, "500 line longer than 100 bytes; ignored\r\nscm> ");

    let mut long = vec![b'x'; 5000];
    long.extend_from_slice(b"\r\n");
    t.send(&long);
    assert_eq!(
        t.until("scm> "),
        "500 line longer than 100 bytes; ignored\r\nscm> "
    );
    // One answer for the whole line, and the rest of it is not taken as a command.
    let text = command(&mut t, "machines");
    assert!(text.starts_with("250-ID "), "{text:?}");
    assert!(text.ends_with("\r\n250 1 machines\r\nscm> "), "{text:?}");

    // A push with an over-long body line is refused as a whole, with one reply.
    t.line("push 1");
    let go = t.until("\r\n");
    assert!(go.starts_with("354 send the configuration"), "{go:?}");
    let mut body = b"ok = 1\r\n".to_vec();
    body.extend_from_slice(&[b'y'; 300]);
    body.extend_from_slice(b"\r\nalso = ok\r\n.\r\n");
    t.send(&body);
    let text = t.until("scm> ");
    assert_eq!(
        text,
        "552 configuration refused (larger than 61440 bytes, or a line over the limit); \
         nothing sent\r\nscm> "
    );
    assert!(!s.agent_file().exists(), "nothing may reach the agent");

    // Nothing was pushed: the next push is generation 1.
    t.line("push 1");
    t.until("\r\n");
    t.send(b"ok = 2\r\n.\r\n");
    let text = t.until("scm> ");
    assert!(
        text.starts_with("250 ACK machine 1 generation 1: "),
        "{text:?}"
    );
    assert_eq!(
        std::fs::read_to_string(s.agent_file()).expect("stored"),
        "ok = 2\n"
    );
}

#[test]
fn ctrl_c_timing_mark_ayt_and_iac_iac() {
    let s = Scm::start(&[], false);
    let mut t = logged_in(s.telnet, &s.password);

    // inetutils' Ctrl-C. DO TIMING-MARK is answered (WONT TM) before anything else,
    // since inetutils discards everything before that answer; then a fresh prompt.
    t.send(&CTRL_C);
    let raw = raw_until_all(&mut t.stream, &[&[IAC, WONT, TM], b"scm> "]);
    assert_eq!(raw, b"\xff\xfc\x06\r\nscm> ", "{raw:?}");
    let text = command(&mut t, "machines");
    assert!(text.ends_with("\r\n250 1 machines\r\nscm> "), "{text:?}");

    // Twice more: TIMING-MARK is a one-shot request, answered every time.
    t.send(&CTRL_C);
    t.send(&CTRL_C);
    let raw = raw_until_all(
        &mut t.stream,
        &[b"\xff\xfc\x06\r\nscm> \xff\xfc\x06\r\nscm> "],
    );
    assert_eq!(
        raw, b"\xff\xfc\x06\r\nscm> \xff\xfc\x06\r\nscm> ",
        "{raw:?}"
    );

    // Are You There: answered at once, the session unchanged.
    t.send(&[IAC, AYT]);
    assert_eq!(t.until("[scm: yes]\r\n"), "\r\n[scm: yes]\r\n");
    let text = command(&mut t, "machines");
    assert!(text.ends_with("\r\n250 1 machines\r\nscm> "), "{text:?}");

    // IAC IAC is one 0xFF data byte: not UTF-8, so the line is refused...
    t.send(b"help\xff\xff\r\n");
    assert_eq!(
        t.until("scm> "),
        "501 line is not valid UTF-8; ignored\r\nscm> "
    );
    // ...and exactly one byte, which one backspace erases.
    t.send(b"machines\xff\xff\x08\r\n");
    let text = t.until("\r\nscm> ");
    assert!(text.ends_with("\r\n250 1 machines\r\nscm> "), "{text:?}");

    // Telnet commands inside a line do not leak into it.
    t.send(b"mach\xff\xf6ines\r\n");
    let text = t.until("machines\r\nscm> ");
    assert!(text.starts_with("\r\n[scm: yes]\r\n250-ID "), "{text:?}");

    t.line("quit");
    assert_eq!(t.until_closed(), "221 bye\r\n");
}

#[test]
fn putty_opening_burst_is_refused_and_bare_lf_login_works() {
    let s = Scm::start(&[], false);
    let mut t = RawTelnet::connect(s.telnet);
    // What PuTTY/plink sends unasked at connect.
    t.send(&[
        IAC,
        WILL,
        NAWS,
        IAC,
        WILL,
        TSPEED,
        IAC,
        WILL,
        TTYPE,
        IAC,
        WILL,
        NEW_ENVIRON,
        IAC,
        DO,
        ECHO,
        IAC,
        WILL,
        SGA,
        IAC,
        DO,
        SGA,
    ]);
    let raw = raw_until_all(
        &mut t.stream,
        &[
            b"Username: ",
            &[IAC, DONT, NAWS],
            &[IAC, DONT, TSPEED],
            &[IAC, DONT, TTYPE],
            &[IAC, DONT, NEW_ENVIRON],
            // The unsolicited DO ECHO is refused: accepting it would turn off PuTTY's
            // local echo for the whole session.
            &[IAC, WONT, ECHO],
            // Suppress-go-ahead is accepted.
            &[IAC, WILL, SGA],
        ],
    );
    assert!(find(&raw, &[IAC, WILL, ECHO]).is_none(), "{raw:?}");
    let text = strip_iac(&raw);
    assert!(
        text.starts_with("220 SCM hub ") && text.ends_with(" ready\r\nUsername: "),
        "{text:?}"
    );

    // Bare-LF lines; WILL ECHO only around the password prompt, answered DO ECHO as PuTTY
    // does, and WONT ECHO after it.
    t.send(b"admin\n");
    let raw = raw_until_all(&mut t.stream, &[b"Password: "]);
    assert_eq!(raw, b"\xff\xfb\x01Password: ", "{raw:?}");
    t.send(&[IAC, DO, ECHO]);
    t.send(format!("{}\n", s.password).as_bytes());
    let raw = raw_until_all(&mut t.stream, &[b"scm> "]);
    assert_eq!(
        strip_iac(&raw),
        "\r\n230 logged in as admin (admin); type help for commands\r\nscm> "
    );
    let wont = find(&raw, &[IAC, WONT, ECHO]).expect("WONT ECHO after the password");
    assert!(wont < find(&raw, b"230").unwrap_or(0), "{raw:?}");

    t.send(b"machines\n");
    let text = t.until("\r\nscm> ");
    assert!(text.ends_with("\r\n250 1 machines\r\nscm> "), "{text:?}");
    t.send(b"quit\n");
    assert_eq!(t.until_closed(), "221 bye\r\n");
}

// ---------------------------------------------------------------------------------------
// Login throttling and audit
// ---------------------------------------------------------------------------------------

/// Types a user name and password on a session waiting at `Username: `.
fn wrong_login(t: &mut RawTelnet, user: &str, password: &str) {
    t.line(user);
    t.until("Password: ");
    t.line(password);
}

#[test]
fn failed_logins_are_throttled_logged_audited_and_the_lockout_expires() {
    let (dir, password) = Fleet::init(&[1]);
    let mut scm = Fleet::start_scm(dir.path(), &[("SCM__LOGIN__MAX_FAILURES", "3".into())]);
    let telnet = scm.listening("telnet");
    let telnet_tls = scm.listening("telnet-tls");

    let mut a = RawTelnet::connect(telnet);
    let a_addr = a.stream.local_addr().expect("local address");
    a.until("Username: ");
    wrong_login(&mut a, "admin", "wrong-1");
    assert_eq!(
        a.until("Username: "),
        "\r\n530 login incorrect\r\nUsername: "
    );
    wrong_login(&mut a, "mallory", "wrong-2");
    assert_eq!(
        a.until("Username: "),
        "\r\n530 login incorrect\r\nUsername: "
    );
    wrong_login(&mut a, "admin", "wrong-3");
    assert_eq!(
        a.until_closed(),
        "\r\n421 too many failed logins from 127.0.0.1; try again in 300 s\r\n"
    );

    // A new connection is refused before it is asked for anything...
    let mut b = RawTelnet::connect(telnet);
    let text = strip_iac(&raw_until_closed(&mut b.stream));
    assert!(
        text.starts_with("220 SCM hub ")
            && text.contains(" ready\r\n421 too many failed logins from 127.0.0.1; try again in ")
            && !text.contains("Username"),
        "{text:?}"
    );
    // ...and so is the back office with the right password.
    let cfg = dir.path().join("dev/backoffice.toml");
    let cfg = cfg.to_str().expect("utf-8 path");
    let (code, out, err) = run(
        &bin("backoffice"),
        &["--config", cfg, "machines"],
        &[("BACKOFFICE__SCM__ADDRESS", telnet.to_string())],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("login refused: 421 too many failed logins from 127.0.0.1"),
        "{err}"
    );

    // The log names the user and the source of each failure.
    scm.wait_for_n("failed login", 3);
    let line = scm.wait_for("failed login user=mallory");
    assert!(line.contains(&format!("peer={a_addr}")), "{line}");

    // The audit log (read over the TLS port: certificate logins are not throttled).
    let tls_env = [
        ("BACKOFFICE__SCM__TLS", "true".to_string()),
        ("BACKOFFICE__SCM__ADDRESS", telnet_tls.to_string()),
    ];
    let (code, out, err) = run(&bin("backoffice"), &["--config", cfg, "audit"], &tls_env);
    assert_eq!(code, 0, "{out}{err}");
    let failed = |user: &str| format!("- from {a_addr}: login_failed user \"{user}\"");
    assert_eq!(out.matches(&failed("admin")).count(), 2, "{out}");
    assert_eq!(out.matches(&failed("mallory")).count(), 1, "{out}");
    assert!(
        out.contains(": login_refused 127.0.0.1 is locked out"),
        "{out}"
    );

    // The same set-up with a short lockout: it expires. (SIGKILL: graceful shutdown is
    // tested elsewhere, and the audit log is durable anyway.)
    scm.kill9();
    let scm = Fleet::start_scm(
        dir.path(),
        &[
            ("SCM__LOGIN__MAX_FAILURES", "3".into()),
            ("SCM__LOGIN__LOCKOUT_MS", "1000".into()),
        ],
    );
    let telnet = scm.listening("telnet");
    let mut c = RawTelnet::connect(telnet);
    c.until("Username: ");
    for _ in 0..2 {
        wrong_login(&mut c, "admin", "wrong");
        c.until("530 login incorrect\r\nUsername: ");
    }
    wrong_login(&mut c, "admin", "wrong");
    assert_eq!(
        c.until_closed(),
        "\r\n421 too many failed logins from 127.0.0.1; try again in 1 s\r\n"
    );
    // Retry until the SCM asks for a user name again; every round waits for the SCM's
    // answer and its close.
    let deadline = Instant::now() + WAIT;
    let mut refused = 0;
    let mut d = loop {
        assert!(Instant::now() < deadline, "the lockout never expired");
        let mut d = RawTelnet::connect(telnet);
        let (which, raw) = raw_until_any(
            &mut d.stream,
            &[b"Username: ", b"421 too many failed logins"],
        );
        if which == 0 {
            assert_eq!(
                strip_iac(&raw).split_once("\r\n").map(|x| x.1),
                Some("Username: ")
            );
            break d;
        }
        // The SCM closes after it wrote its audit record: waiting for that keeps the
        // records in order and the number of rounds small.
        raw_until_closed(&mut d.stream);
        refused += 1;
    };
    assert!(
        refused > 0,
        "the lockout was not in force right after it began"
    );
    // After the lockout one failure is only one failure, and the right password works.
    let d_addr = d.stream.local_addr().expect("local address");
    wrong_login(&mut d, "admin", "wrong-again");
    assert_eq!(
        d.until("Username: "),
        "\r\n530 login incorrect\r\nUsername: "
    );
    d.line("admin");
    d.until("Password: ");
    d.line(&password);
    let text = d.until("scm> ");
    assert!(text.contains("230 logged in as admin (admin)"), "{text:?}");
    let text = command(&mut d, "audit");
    let failed_at = text
        .find(&format!("- from {d_addr}: login_failed user \"admin\""))
        .unwrap_or_else(|| panic!("{text}"));
    let login_at = text
        .find(&format!("admin from {d_addr}: login by password"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(failed_at < login_at, "{text}");
    assert!(text.ends_with(" audit records shown\r\nscm> "), "{text:?}");
}

// ---------------------------------------------------------------------------------------
// Push edge cases
// ---------------------------------------------------------------------------------------

#[test]
fn push_edge_cases_over_raw_telnet() {
    let s = Scm::start(&[], true);
    let mut t = logged_in(s.telnet, &s.password);

    assert_eq!(
        command(&mut t, "push 99"),
        "550 machine 99 is not known to this SCM; `machines` lists the known ones\r\nscm> "
    );
    assert_eq!(
        command(&mut t, "push"),
        "501 usage: push <machine id | group:NAME | label:TEXT | all>\r\nscm> "
    );
    assert_eq!(
        command(&mut t, "push 1 2"),
        "501 usage: push <machine id | group:NAME | label:TEXT | all>\r\nscm> "
    );
    assert_eq!(
        command(&mut t, "push one"),
        "501 \"one\" is not a target; use a machine id (0-65535), group:NAME, label:TEXT or all\r\nscm> "
    );
    assert_eq!(
        command(&mut t, "push 70000"),
        "501 \"70000\" is not a target; use a machine id (0-65535), group:NAME, label:TEXT or all\r\nscm> "
    );

    let go = "354 send the configuration for machine 1; end with a line holding only \".\"\r\n";
    t.line("push 1");
    assert_eq!(t.until("\r\n"), go);
    assert_eq!(
        command(&mut t, "."),
        "501 empty configuration; nothing sent\r\nscm> "
    );

    // A line that is not UTF-8 (IAC IAC is a 0xFF byte) refuses the push, with one reply
    // that names the line.
    t.line("push 1");
    assert_eq!(t.until("\r\n"), go);
    t.send(b"good = 1\r\nbad = \xff\xff\r\n.\r\n");
    assert_eq!(
        t.until("scm> "),
        "552 line 2 is not UTF-8; configurations are UTF-8 text with TAB as the only control \
         character; nothing sent\r\nscm> "
    );
    // So does a control byte (an ESC from a terminal's arrow key).
    t.line("push 1");
    assert_eq!(t.until("\r\n"), go);
    t.send(b"good = 1\r\nup = \x1b[A\r\n.\r\n");
    assert_eq!(
        t.until("scm> "),
        "552 line 2 has control byte 0x1B (ESC); configurations are UTF-8 text with TAB as \
         the only control character; nothing sent\r\nscm> "
    );

    // Ctrl-C in the middle of the body cancels the push.
    t.line("push 1");
    assert_eq!(t.until("\r\n"), go);
    t.line("half = 1");
    t.send(&CTRL_C);
    let raw = raw_until_all(&mut t.stream, &[b"scm> ", &[IAC, WONT, TM]]);
    assert_eq!(
        raw,
        b"\xff\xfc\x06426 push cancelled; nothing sent\r\nscm> ",
        "{}",
        strip_iac(&raw)
    );
    // The rest of the body is now taken as commands.
    assert_eq!(
        command(&mut t, "."),
        "500 unknown command \".\"; type help for the list\r\nscm> "
    );

    assert!(!s.agent_file().exists(), "nothing may reach the agent");
    let agent = s.agent.as_ref().expect("agent");
    assert!(!agent.logs().contains("stored"), "{}", agent.logs());

    // None of the above made a generation.
    t.line("push 1");
    assert_eq!(t.until("\r\n"), go);
    t.line("whole = 1");
    t.line("..starts with a dot");
    let text = command(&mut t, ".");
    assert!(
        text.starts_with("250 ACK machine 1 generation 1: "),
        "{text:?}"
    );
    assert_eq!(
        std::fs::read_to_string(s.agent_file()).expect("stored"),
        "whole = 1\n.starts with a dot\n"
    );
}

// ---------------------------------------------------------------------------------------
// TLS port and the back office
// ---------------------------------------------------------------------------------------

#[test]
fn tls_telnet_with_the_operator_certificate_and_plaintext_refused() {
    let fleet = Fleet::start(&[1]);
    let cfg = fleet.dev().join("backoffice.toml");
    let cfg = cfg.to_str().expect("utf-8 path");
    let tls_env = [
        ("BACKOFFICE__SCM__TLS", "true".to_string()),
        ("BACKOFFICE__SCM__ADDRESS", fleet.telnet_tls.to_string()),
    ];
    let f = write_cfg(fleet.dir.path(), "tls.cfg", "over = tls\n");
    let (code, out, err) = run(
        &bin("backoffice"),
        &["--config", cfg, "push", "--machine", "1", "--file", &f],
        &tls_env,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 1"), "{out}");
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(1).join("config.current")).expect("stored"),
        "over = tls\n"
    );

    // Plain telnet on the TLS port: no greeting, the connection is closed.
    let mut t = RawTelnet::connect(fleet.telnet_tls);
    t.line("admin");
    let raw = raw_until_closed(&mut t.stream);
    assert!(find(&raw, b"220").is_none(), "{raw:?}");
    fleet.scm.wait_for("TLS handshake refused");

    // The SCM keeps serving, on both ports.
    let (code, out, err) = run(&bin("backoffice"), &["--config", cfg, "audit"], &tls_env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("admin from 127.0.0.1:") && out.contains(": login by certificate"),
        "{out}"
    );
    assert!(
        out.contains(": push machine 1 generation 1 (11 bytes): ack"),
        "{out}"
    );
    let mut t = logged_in(fleet.telnet, &fleet.password);
    let text = command(&mut t, "machines");
    assert!(text.ends_with("\r\n250 1 machines\r\nscm> "), "{text:?}");
}

#[test]
fn backoffice_shell_forwards_stdin() {
    let fleet = Fleet::start(&[1]);
    let cfg = fleet.dev().join("backoffice.toml");
    let cfg = cfg.to_str().expect("utf-8 path");
    let env = [("BACKOFFICE__SCM__ADDRESS", fleet.telnet.to_string())];
    let mut sh = Interactive::spawn(&bin("backoffice"), &["--config", cfg, "shell"], &env);
    sh.until("connected; type help, quit to leave");
    sh.write(b"machines\n");
    let text = sh.until("250 1 machines");
    assert!(
        text.contains(
            "250-1      machine-1        1   connected        0       0  dev,odd              -"
        ),
        "{text:?}"
    );
    sh.write(b"quit\n");
    // The shell prints a newline once the SCM has closed the session.
    sh.until("221 bye\r\n\n");
    // The back office reads stdin with tokio's blocking reader, which keeps the process
    // alive until stdin ends or another line is typed: close it as a pipe would. (Closed
    // before the session ended, stdin's end makes the shell send a second `quit` that
    // races with the SCM's close and can end in "connection reset", exit 2.)
    sh.close_stdin();
    assert_eq!(sh.wait_exit(), Some(0), "{}", sh.all());

    // End of input ends the session politely too.
    let mut sh = Interactive::spawn(&bin("backoffice"), &["--config", cfg, "shell"], &env);
    sh.until("connected; type help, quit to leave");
    sh.write(b"status 1\n");
    sh.until("211-machine 1 (machine-1)\r\n");
    sh.until("\r\n211 ");
    sh.until("\r\n");
    sh.close_stdin();
    sh.until("221 bye");
    assert_eq!(sh.wait_exit(), Some(0), "{}", sh.all());
}

#[test]
fn telnet_ssl_logs_in_with_an_rsa_operator_certificate() {
    // telnet-ssl loads only RSA keys: `scm init-dev --operator-key rsa`.
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = dir.path().join("dev");
    let (code, out, err) = run(
        &bin("scm"),
        &[
            "init-dev",
            "--out",
            dev.to_str().expect("utf-8 path"),
            "--machines",
            "1",
            "--operator-key",
            "rsa",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let key = std::fs::read_to_string(dev.join("operator-admin-key.pem")).expect("key");
    let (_, text, _) = run(
        Path::new("openssl"),
        &[
            "pkey",
            "-noout",
            "-text",
            "-in",
            dev.join("operator-admin-key.pem").to_str().unwrap_or(""),
        ],
        &[],
    );
    assert!(text.contains("Private-Key: (2048 bit"), "{text}{key}");
    // The Generic device's fixed port: port 0 instead (as `Fleet::init` does).
    let toml = dev.join("scm.toml");
    let cfg = std::fs::read_to_string(&toml).expect("scm.toml");
    let cfg: Vec<String> = cfg
        .lines()
        .map(|l| {
            if l.starts_with("listen = \"127.0.0.1:") {
                "listen = \"127.0.0.1:0\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&toml, cfg.join("\n") + "\n").expect("write scm.toml");
    let scm = Fleet::start_scm(dir.path(), &[]);
    let addr = scm.listening("telnet-tls");
    let p = |f: &str| dev.join(f).to_string_lossy().into_owned();
    // `-z verify=1`: the SCM's certificate must chain to the dev CA. (`-z certrequired`
    // also compares its CN, `scm`, with the host name typed, which is 127.0.0.1 here.)
    let mut tn = in_pty(&format!(
        "telnet-ssl -z ssl -z verify=1 -z cert={} -z key={} -z cacert={} {} {}",
        p("operator-admin.pem"),
        p("operator-admin-key.pem"),
        p("ca.pem"),
        addr.ip(),
        addr.port()
    ));
    tn.until("220 SCM hub ");
    let text = tn.until("scm> ");
    assert!(
        text.contains("230 logged in as admin (admin) by certificate"),
        "{text:?}"
    );
    tn.write(b"machines\n");
    tn.until("250 1 machines");
    tn.write(b"quit\n");
    tn.until("221 bye");
    tn.wait_exit();
}
