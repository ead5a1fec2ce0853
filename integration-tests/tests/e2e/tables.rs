//! The malformed-input tables (`integration-tests/tables/*.toml`, see
//! `integration_tests::tables`) against the real binaries: one test per protocol runs every
//! case of its table on a fresh SCM, collects every deviation, and ends with a normal client
//! that must still be served. (The frames table runs in `frames.rs`, the admin API table in
//! `admin_table.rs`.)

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::Instant;

use integration_tests::tables;
use integration_tests::{Fleet, WAIT, strip_iac, swipe};

/// Reports every failed case at once.
pub fn report(table: &str, total: usize, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} of {total} case(s) of table {table} failed:\n  - {}",
        failures.len(),
        failures.join("\n  - ")
    );
    eprintln!("table {table}: {total} cases passed");
}

/// A TCP connection to `addr` from `from` (a loopback address) or the default source.
pub fn connect_from(addr: SocketAddr, from: Option<&str>) -> TcpStream {
    let s = match from {
        None => TcpStream::connect(addr).expect("connect"),
        Some(ip) => {
            let ip: IpAddr = ip.parse().expect("a source IP address");
            assert!(ip.is_loopback(), "source {ip} is not loopback");
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            sock.bind(&SocketAddr::new(ip, 0).into()).expect("bind");
            sock.connect(&addr.into()).expect("connect");
            sock.into()
        }
    };
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

/// Sends `bytes` (ignoring a write error: the server may answer and close first),
/// half-closes, and reads until the server closes (or resets, or [`WAIT`] passes).
/// Returns what arrived and whether the server closed within the wait.
fn send_fin_read(s: &mut TcpStream, bytes: &[u8]) -> (Vec<u8>, bool) {
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + WAIT;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
        if Instant::now() > deadline {
            return (got, false);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Generic bridge

const VERSION: &[u8] = b"SCM-Generic-1.0\r";

/// `generic.toml`: bytes a print server sends to a Generic device port. `expect`:
/// `silence` (nothing written back), `version` (exactly one version reply), `versions`
/// (only version replies, any number: input longer than one read), `refused` (an address
/// not on the allow list: closed, nothing written). The bridge never writes a card line in
/// answer to input.
#[test]
fn generic_bridge_table() {
    let table = tables::load("generic");
    let fleet = Fleet::start(&[1]);
    let port = fleet.scm.listening("generic 1/r1");
    let mut failures = Vec::new();
    for c in &table.cases {
        let mut s = connect_from(port, c.from.as_deref());
        let (got, closed) = send_fin_read(&mut s, &c.bytes());
        let only_versions =
            got.len() % VERSION.len() == 0 && got.chunks(VERSION.len()).all(|ch| ch == VERSION);
        let ok = closed
            && match c.expect.as_str() {
                "silence" | "refused" => got.is_empty(),
                "version" => got == VERSION,
                "versions" => only_versions,
                other => panic!("case {:?}: unknown expect {other:?}", c.name),
            };
        if !ok {
            failures.push(format!(
                "{}: expected {}, got {:?} (closed: {closed})",
                c.name,
                c.expect,
                String::from_utf8_lossy(&got)
            ));
        }
    }
    // A normal print server is still served: version probe, then a swipe.
    let mut s = connect_from(port, None);
    s.write_all(b"v").expect("probe");
    let mut got = vec![0u8; VERSION.len()];
    s.read_exact(&mut got).expect("version reply");
    assert_eq!(got, VERSION);
    fleet.agent(1).wait_for("reader r1");
    swipe(&fleet.dev(), 1, "12345678");
    // The first card after a version answer starts with LF, which ends the answer's line
    // for a reader that splits on LF (docs/swipes.md): the card is then a line of its own.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") || line == b"\n" {
        assert_eq!(s.read(&mut b).expect("read the swipe"), 1, "closed");
        line.push(b[0]);
    }
    assert_eq!(line, b"\n12345678\n");
    report("generic", table.cases.len(), failures);
}

// ---------------------------------------------------------------------------------------
// RFIDeas 241 HTTP

/// `http241.toml`: raw bytes to the shared 241 listener (init-dev: device
/// `reader-1.localhost`, allow 127.0.0.1), then FIN. `expect` is the status code of the
/// first response, or `closed` (nothing written back); `text`, if given, must occur in
/// everything the server wrote.
#[test]
fn http241_table() {
    let table = tables::load("http241");
    let fleet = Fleet::start(&[1]);
    let addr = fleet.scm.listening("rfideas");
    let mut failures = Vec::new();
    for c in &table.cases {
        let mut s = connect_from(addr, c.from.as_deref());
        let (got, closed) = send_fin_read(&mut s, &c.bytes());
        let text = String::from_utf8_lossy(&got);
        let status = if got.is_empty() {
            "closed"
        } else if text.starts_with("HTTP/1.1 ") {
            text.get(9..12).unwrap_or("?")
        } else {
            "not HTTP"
        };
        let mut why = Vec::new();
        if !closed {
            why.push("not closed after FIN".to_string());
        }
        if status != c.expect {
            why.push(format!("status {status}, expected {}", c.expect));
        }
        if let Some(t) = &c.text
            && !text.contains(t.as_str())
        {
            why.push(format!("{t:?} not in the response"));
        }
        if !why.is_empty() {
            failures.push(format!("{}: {}; got {text:?}", c.name, why.join(", ")));
        }
    }
    // A normal print server still configures and reads its device.
    let mut s = connect_from(addr, None);
    let (got, _) = send_fin_read(
        &mut s,
        b"GET /config?beep=on HTTP/1.1\r\nHost: reader-1.localhost\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(
        text.contains("\r\n\r\n") && text.contains("beep=on\n"),
        "{text}"
    );
    report("http241", table.cases.len(), failures);
}

// ---------------------------------------------------------------------------------------
// Telnet

/// A raw telnet connection that answers no option.
struct Telnet {
    s: TcpStream,
    seen: Vec<u8>,
}

impl Telnet {
    fn connect(addr: SocketAddr, from: Option<&str>) -> Telnet {
        Telnet {
            s: connect_from(addr, from),
            seen: Vec::new(),
        }
    }

    fn send(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    /// Reads until the text (telnet commands removed) after what earlier calls consumed
    /// contains `needle`; returns that text, up to and including `needle`.
    fn until(&mut self, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        loop {
            let text = strip_iac(&self.seen);
            if let Some(i) = text.find(needle) {
                let upto = i + needle.len();
                // Keep what follows (as text: the IAC bytes are gone, which is fine).
                self.seen = text.as_bytes()[upto..].to_vec();
                return Ok(text[..upto].to_string());
            }
            if Instant::now() > deadline {
                return Err(format!("{needle:?} not received; got {text:?}"));
            }
            match self.s.read(&mut buf) {
                Ok(0) => return Err(format!("closed while waiting for {needle:?}; got {text:?}")),
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("{e} while waiting for {needle:?}; got {text:?}")),
            }
        }
    }

    /// Reads until the server closes; the text.
    fn until_closed(&mut self) -> (String, bool) {
        let _ = self.s.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let closed = match self.s.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        self.seen.extend_from_slice(&rest);
        (strip_iac(&self.seen), closed)
    }

    fn login(&mut self, password: &str) -> Result<(), String> {
        self.until("Username: ")?;
        self.send(b"admin\r\n");
        self.until("Password: ")?;
        self.send(format!("{password}\r\n").as_bytes());
        self.until("230 ")?;
        self.until("scm> ").map(|_| ())
    }
}

/// `telnet.toml`: bytes an operator's telnet client sends to the plain telnet port.
/// Cases run on one logged-in session (or, with `before_login`, on a fresh connection at
/// the `Username:` prompt, from a source address of their own so that failed logins lock
/// nobody else out). `expect` is text that must appear in the answer. With `then =
/// "closed"` the server must close the connection (such a case gets its own connection);
/// otherwise the session must go on: a marker line sent after the case must be answered.
#[test]
fn telnet_table() {
    let table = tables::load("telnet");
    let fleet = Fleet::start(&[1, 2]);
    let mut failures = Vec::new();
    let mut session = Telnet::connect(fleet.telnet, None);
    session.login(&fleet.password).expect("log in");
    for (i, c) in table.cases.iter().enumerate() {
        let closes = c.then.as_deref() == Some("closed");
        let result = if c.before_login || closes {
            // A fresh connection from an address of its own (127.0.3.x).
            let from = c
                .from
                .clone()
                .unwrap_or_else(|| format!("127.0.3.{}", 1 + i % 250));
            let mut t = Telnet::connect(fleet.telnet, Some(&from));
            let ready = if c.before_login {
                t.until("Username: ").map(|_| ())
            } else {
                t.login(&fleet.password)
            };
            ready.and_then(|()| {
                t.send(&c.bytes());
                if closes {
                    let (text, closed) = t.until_closed();
                    match (closed, text.contains(&c.expect)) {
                        (true, true) => Ok(()),
                        (false, _) => Err(format!("not closed; got {text:?}")),
                        (true, false) => Err(format!("{:?} not in {text:?}", c.expect)),
                    }
                } else {
                    t.until(&c.expect).map(|_| ())
                }
            })
        } else {
            session.send(&c.bytes());
            let marker = format!("sync{i}");
            session.send(format!("\r\n{marker}\r\n").as_bytes());
            session
                .until(&format!("unknown command \"{marker}\""))
                .and_then(|text| {
                    if text.contains(&c.expect) {
                        Ok(())
                    } else {
                        Err(format!("{:?} not in the answer {text:?}", c.expect))
                    }
                })
                .and_then(|_| session.until("scm> ").map(|_| ()))
        };
        if let Err(e) = result {
            failures.push(format!("{}: {e}", c.name));
            if !(c.before_login || closes) {
                // Start over with a fresh session so that later cases are judged alone.
                session = Telnet::connect(fleet.telnet, None);
                session.login(&fleet.password).expect("log in again");
            }
        }
    }
    // The long-lived session and a new normal client are still served.
    session.send(b"machines\r\n");
    session
        .until("machine-2")
        .expect("machines on the old session");
    let mut t = Telnet::connect(fleet.telnet, None);
    t.login(&fleet.password).expect("a new login");
    t.send(b"status 1\r\n");
    t.until("machine-1").expect("status 1");
    report("telnet", table.cases.len(), failures);
}
