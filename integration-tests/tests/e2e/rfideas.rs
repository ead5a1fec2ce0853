//! The RFIDeas 241 Client Mode bridge end to end: the real `scm`, an agent with a FIFO
//! reader, and `print-server-241-sim` as the print server (configuration GETs, periodic
//! checks, tampering, and an HTTPS endpoint for swipes), plus raw TCP clients for the bad
//! input and fault cases.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::{Fleet, Proc, WAIT, backoffice_with, bin, swipe};
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, LeafSpec, Validity};

/// An SCM (with its rfideas and metrics listeners on port 0) and one agent per machine.
struct Rig {
    dir: tempfile::TempDir,
    scm: Proc,
    agents: Vec<Proc>,
    rfideas: SocketAddr,
}

impl Rig {
    fn start(machines: &[u16], scm_env: &[(&'static str, String)], ttl_ms: u64) -> Rig {
        Rig::start_edited(machines, scm_env, ttl_ms, |_| {})
    }

    /// Like [`Rig::start`], after `edit` changed the init-dev directory.
    fn start_edited(
        machines: &[u16],
        scm_env: &[(&'static str, String)],
        ttl_ms: u64,
        edit: impl FnOnce(&Path),
    ) -> Rig {
        let (dir, _pw) = Fleet::init(machines);
        edit(&dir.path().join("dev"));
        let mut env = vec![("SCM__LISTEN__METRICS", "127.0.0.1:0".to_string())];
        env.extend(scm_env.iter().cloned());
        let scm = Fleet::start_scm(dir.path(), &env);
        let agents_addr = scm.listening("agents");
        let rfideas = scm.listening("rfideas");
        let agents = machines
            .iter()
            .map(|id| {
                let a = Fleet::start_agent(
                    dir.path(),
                    *id,
                    agents_addr,
                    &[("AGENT__SWIPES__TTL_MS", ttl_ms.to_string())],
                );
                a.wait_for("connected to SCM");
                a.wait_for("reader r1");
                a
            })
            .collect();
        Rig {
            dir,
            scm,
            agents,
            rfideas,
        }
    }

    fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    fn backoffice(&self, args: &[&str]) -> String {
        let telnet = self.scm.listening("telnet");
        let (code, out, err) = backoffice_with(&self.dev().join("backoffice.toml"), telnet, args);
        assert_eq!(code, 0, "{out}{err}");
        out
    }

    fn metrics(&self) -> String {
        let addr = self.scm.listening("metrics");
        let resp = http(addr, b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n", None);
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        resp
    }

    /// Waits until the swipe listing has a line with both needles.
    fn wait_listing(&self, a: &str, b: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.backoffice(&["swipes"]);
            if let Some(l) = out.lines().find(|l| l.contains(a) && l.contains(b)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {a:?} and {b:?}:\n{out}"
            );
        }
    }
}

/// Sends raw bytes (optionally from a given source address) and reads until the server
/// closes; returns the text.
fn http(addr: SocketAddr, bytes: &[u8], from: Option<IpAddr>) -> String {
    let mut s = connect_from(addr, from);
    // The server may answer (431, 400) and close before reading everything.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn connect_from(addr: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    let s = match from {
        None => TcpStream::connect(addr).unwrap(),
        Some(ip) => {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&SocketAddr::new(ip, 0).into()).unwrap();
            sock.connect(&addr.into()).unwrap();
            sock.into()
        }
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn get(target: &str, host: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

fn status(resp: &str) -> &str {
    resp.get(9..12).unwrap_or("")
}

/// Starts the 241 print-server simulator.
fn sim(args: &[&str]) -> Proc {
    Proc::spawn("241-sim", &bin("print-server-241-sim"), args, &[])
}

/// A simulator configuring `host` at the rig's listener, with an HTTPS endpoint using the
/// dev SCM certificate (signed by the dev CA the SCM trusts by default).
fn configuring_sim(rig: &Rig, host: &str, extra: &[&str]) -> Proc {
    let scm = rig.rfideas.to_string();
    let cert = rig.dev().join("scm.pem");
    let key = rig.dev().join("scm-key.pem");
    let mut args = vec![
        "--scm",
        scm.as_str(),
        "--host",
        host,
        "--check-ms",
        "200",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sim(&args)
}

const URL: &str = "server_url=https://{https}/swipe?card={card}&mac={device}&t={time}";

/// A certificate for 127.0.0.1 from a CA the SCM does not trust.
fn rogue_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let validity = Validity::days_from_now(2);
    let ca = Ca::generate("rogue CA", &validity).unwrap();
    let mut spec = LeafSpec::new(Identity::Scm, validity);
    spec.extra_hosts = vec!["127.0.0.1".into()];
    let leaf = ca.issue(&spec).unwrap();
    let (c, k) = (dir.join("rogue.pem"), dir.join("rogue-key.pem"));
    std::fs::write(&c, leaf.cert_pem).unwrap();
    std::fs::write(&k, leaf.key_pem).unwrap();
    (c, k)
}

#[test]
fn configuration_checks_and_tampering_are_reconfigured() {
    let rig = Rig::start(&[1], &[], 10_000);
    let s = configuring_sim(
        &rig,
        "reader-1.localhost",
        &[
            "--set",
            "mode=client",
            "--set",
            "beep=on",
            "--set",
            URL,
            "--tamper",
            "mode=server",
            "--tamper-after",
            "2",
        ],
    );
    s.wait_stdout("CHECK mismatch");
    s.wait_stdout("CONFIGURED");
    s.wait_stdout("TAMPERED mode");
    let line = s.wait_stdout("CHECK mismatch mode");
    assert!(line.contains("want \"client\" got \"server\""), "{line}");
    s.wait_stdout("RECONFIGURED");
    let after = s.stdout().rfind("RECONFIGURED").unwrap();
    s.wait_stdout_n(
        "CHECK ok",
        s.stdout()[..after].matches("CHECK ok").count() + 1,
    );
    // Every change is audited with the print server's address.
    let audit = rig.backoffice(&["audit"]);
    assert!(audit.contains("rfideas_config"), "{audit}");
    assert!(audit.contains("mode set to \"server\""), "{audit}");
    assert!(audit.contains("mode set to \"client\""), "{audit}");
    // The operator sees the device and its settings.
    let st = rig.backoffice(&["status", "1"]);
    let line = st
        .lines()
        .find(|l| l.contains("rfideas 1/r1"))
        .unwrap_or_else(|| panic!("{st}"));
    assert!(line.contains("host reader-1.localhost"), "{line}");
    assert!(line.contains("3 settings, swipes to 127.0.0.1:"), "{line}");
    assert!(line.contains("last configured by 127.0.0.1:"), "{line}");
    let m = rig.metrics();
    assert!(m.contains("scm_rfideas_setting_changes_total 5"), "{m}");
}

#[test]
fn settings_survive_an_scm_restart() {
    let rig = Rig::start(&[1, 2], &[], 10_000);
    let s = configuring_sim(
        &rig,
        "reader-2.localhost",
        &["--set", "mode=client", "--set", URL],
    );
    s.wait_stdout("CONFIGURED");
    drop(s);
    let Rig { dir, mut scm, .. } = rig;
    scm.signal("TERM");
    scm.wait_exit();
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__LISTEN__METRICS", "127.0.0.1:0".into())],
    );
    let addr = scm.listening("rfideas");
    let resp = http(addr, &get("/settings", "reader-2.localhost"), None);
    assert_eq!(status(&resp), "200", "{resp}");
    assert!(
        resp.contains("\r\n\r\nmode=client\nserver_url=https%3A%2F%2F127.0.0.1%3A"),
        "{resp}"
    );
    // The print server's periodic check finds them unchanged: no reconfiguration.
    let first = resp
        .lines()
        .find_map(|l| l.strip_prefix("server_url="))
        .unwrap()
        .to_string();
    let url = decode(&first);
    let set_url = format!("server_url={url}");
    let a = addr.to_string();
    let s = sim(&[
        "--scm",
        &a,
        "--host",
        "reader-2.localhost",
        "--check-ms",
        "100",
        "--set",
        "mode=client",
        "--set",
        &set_url,
    ]);
    s.wait_stdout_n("CHECK ok", 3);
    assert!(!s.stdout().contains("CONFIGURED"), "{}", s.stdout());
    assert!(!s.stdout().contains("mismatch"), "{}", s.stdout());
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn a_swipe_reaches_the_print_server_over_https_escaped_and_masked() {
    let rig = Rig::start(&[1], &[], 10_000);
    let s = configuring_sim(&rig, "reader-1.localhost", &["--set", URL]);
    s.wait_stdout("CONFIGURED");
    swipe(&rig.dev(), 1, "CARD1234");
    let line = s.wait_stdout("CARD CARD1234");
    // The device id is MAC-style and percent-escaped in the query; the time is numeric.
    assert!(line.contains("DEVICE 02:53:43:00:01:"), "{line}");
    assert!(
        line.contains("TARGET /swipe?card=CARD1234&mac=02%3A53%3A43%3A00%3A01%3A"),
        "{line}"
    );
    let t = line.rsplit("&t=").next().unwrap();
    assert!(
        t.len() >= 10 && t.bytes().all(|b| b.is_ascii_digit()),
        "{line}"
    );
    rig.scm.wait_for("card delivered to 127.0.0.1:");
    let l = rig.wait_listing("****1234", "rfideas 1/r1 to 127.0.0.1:");
    assert!(l.contains("delivered"), "{l}");
    let logs = rig.scm.logs();
    assert!(
        !logs.contains("CARD1234"),
        "full card number in the SCM log:\n{logs}"
    );
    let m = rig.metrics();
    assert!(
        m.contains("scm_rfideas_swipes_total{device=\"1/r1\",outcome=\"delivered\"} 1"),
        "{m}"
    );
}

#[test]
fn bad_requests_on_the_configuration_port_and_the_server_still_serves() {
    let rig = Rig::start(&[1], &[], 10_000);
    let a = rig.rfideas;
    let host = "reader-1.localhost";
    let mut huge = format!("GET /settings HTTP/1.1\r\nHost: {host}\r\nX-Pad: ").into_bytes();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    huge.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<(Vec<u8>, Option<IpAddr>, &str, &str)> = vec![
        (get("/config?mode=%zz", host), None, "400", "percent"),
        (get("/config?mode=%4", host), None, "400", "percent"),
        (get("/config?mode", host), None, "400", "no '='"),
        (get("/config?mode=%ff%fe", host), None, "400", "UTF-8"),
        (
            get("/config?server_url=ftp%3A%2F%2Fx", host),
            None,
            "400",
            "https://",
        ),
        (huge, None, "431", "larger than"),
        (
            get("/settings", "nobody.localhost"),
            None,
            "404",
            "no 241 device",
        ),
        (
            get("/config?mode=evil", host),
            Some("127.0.0.2".parse().unwrap()),
            "403",
            "not a configured print server",
        ),
        (
            format!("POST /config?mode=x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
            None,
            "405",
            "use GET",
        ),
        (
            format!("PUT /config HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
            None,
            "405",
            "Allow: GET",
        ),
        (
            format!("HEAD /settings HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
            None,
            "405",
            "use GET",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00".to_vec(),
            None,
            "400",
            "control byte",
        ),
    ];
    for (req, from, code, needle) in cases {
        let resp = http(a, &req, from);
        assert_eq!(
            status(&resp),
            code,
            "{:?}:\n{resp}",
            String::from_utf8_lossy(&req[..req.len().min(60)])
        );
        assert!(resp.contains(needle), "{needle:?} not in {resp}");
    }
    // None of it changed anything, and the listener still serves.
    let resp = http(a, &get("/settings", host), None);
    assert_eq!(status(&resp), "200", "{resp}");
    assert!(resp.ends_with("\r\n\r\n"), "no settings stored: {resp}");
    rig.scm.wait_for("not a configured print server address");
    let m = rig.metrics();
    assert!(
        m.contains("scm_rfideas_requests_total{status=\"405\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("scm_rfideas_requests_total{status=\"431\"} 1"),
        "{m}"
    );
    let audit = rig.backoffice(&["audit"]);
    assert!(!audit.contains("rfideas_config"), "{audit}");
}

#[test]
fn slowloris_clients_time_out_while_other_devices_are_served() {
    let rig = Rig::start(
        &[1, 2],
        &[("SCM__RFIDEAS_BRIDGE__HEADER_TIMEOUT_MS", "3000".into())],
        10_000,
    );
    let slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = connect_from(rig.rfideas, None);
            s.write_all(b"GET /settings HTTP/1.1\r\nHost: reader-1.loc")
                .unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();
    // Served at once while the slow ones hang on.
    let resp = http(rig.rfideas, &get("/settings", "reader-2.localhost"), None);
    assert_eq!(status(&resp), "200", "{resp}");
    assert!(
        t0.elapsed() < Duration::from_millis(2900),
        "{:?}",
        t0.elapsed()
    );
    for mut s in slow {
        // A trickled byte does not extend the deadline.
        let _ = s.write_all(b"a");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert_eq!(status(&out), "408", "{out}");
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let resp = http(rig.rfideas, &get("/settings", "reader-1.localhost"), None);
    assert_eq!(status(&resp), "200", "{resp}");
}

/// Configures device 1 with a swipe URL pointing at `https` and swipes `card`.
fn configure_url(rig: &Rig, url: &str) {
    let q = format!("/config?server_url={}", encode(url));
    let resp = http(rig.rfideas, &get(&q, "reader-1.localhost"), None);
    assert_eq!(status(&resp), "200", "{resp}");
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A simulator serving HTTPS only.
fn https_sim(cert: &Path, key: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec![
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let p = sim(&args);
    let a = p.listening("241-sim https");
    (p, a)
}

#[test]
fn print_server_certificate_that_does_not_verify_gets_nothing() {
    let rig = Rig::start(&[1], &[], 10_000);
    let (c, k) = rogue_cert(rig.dir.path());
    let (s, addr) = https_sim(&c, &k, &[]);
    configure_url(&rig, &format!("https://{addr}/swipe?card={{card}}"));
    swipe(&rig.dev(), 1, "ROGUE001");
    let line = rig.scm.wait_for("swipe failed");
    assert!(line.contains("certificate"), "{line}");
    s.wait_for("TLS from");
    assert!(!s.stdout().contains("CARD"), "{}", s.stdout());
    let st = rig.backoffice(&["status", "1"]);
    assert!(st.contains("1 failed"), "{st}");
    assert!(st.contains("certificate was not accepted"), "{st}");
    rig.wait_listing("****E001", "failed");
    let m = rig.metrics();
    assert!(
        m.contains("scm_rfideas_attempt_failures_total{device=\"1/r1\",reason=\"certificate\"} 1"),
        "{m}"
    );
}

#[test]
fn print_server_that_accepts_and_never_answers_expires_the_swipe() {
    let rig = Rig::start(
        &[1],
        &[("SCM__RFIDEAS_BRIDGE__RESPONSE_TIMEOUT_MS", "400".into())],
        2_000,
    );
    let dev = rig.dev();
    let (s, addr) = https_sim(
        &dev.join("scm.pem"),
        &dev.join("scm-key.pem"),
        &["--respond", "hang"],
    );
    configure_url(&rig, &format!("https://{addr}/swipe?card={{card}}"));
    swipe(&dev, 1, "HANG0001");
    s.wait_stdout("CARD HANG0001");
    // (The Generic device of the same reader has no print server and expires too.)
    let line = rig.scm.wait_for("expired undelivered after");
    assert!(line.contains("no answer from"), "{line}");
    rig.wait_listing("****0001", "expired");
    let st = rig.backoffice(&["status", "1"]);
    assert!(st.contains("1 expired"), "{st}");
    let m = rig.metrics();
    assert!(
        m.contains("scm_rfideas_attempt_failures_total{device=\"1/r1\",reason=\"timeout\"}"),
        "{m}"
    );
}

#[test]
fn redirect_to_another_host_is_not_followed() {
    let rig = Rig::start(&[1], &[], 10_000);
    let dev = rig.dev();
    let (cert, key) = (dev.join("scm.pem"), dev.join("scm-key.pem"));
    let (other, other_addr) = https_sim(&cert, &key, &[]);
    let to = format!("redirect:https://localhost:{}/steal", other_addr.port());
    let (first, addr) = https_sim(&cert, &key, &["--respond", &to]);
    configure_url(&rig, &format!("https://{addr}/swipe?card={{card}}"));
    swipe(&dev, 1, "REDIR001");
    first.wait_stdout("CARD REDIR001");
    let line = rig.scm.wait_for("swipe failed");
    assert!(line.contains("redirects are not followed"), "{line}");
    assert!(
        line.contains(&format!("localhost:{}", other_addr.port())),
        "{line}"
    );
    rig.wait_listing("****R001", "failed");
    assert!(!other.stdout().contains("CARD"), "{}", other.stdout());
    assert_eq!(first.stdout().matches("CARD").count(), 1, "not retried");
}

#[test]
fn print_server_down_swipes_expire_are_counted_and_never_sent_late() {
    let rig = Rig::start(&[1], &[], 1_000);
    let dev = rig.dev();
    // A port that was free a moment ago: nothing listens there while the swipe lives.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    configure_url(
        &rig,
        &format!("https://127.0.0.1:{port}/swipe?card={{card}}"),
    );
    swipe(&dev, 1, "DOWN0001");
    let line = rig.scm.wait_for("expired undelivered after");
    assert!(line.contains("cannot connect"), "{line}");
    rig.wait_listing("****0001", "expired");
    let m = rig.metrics();
    assert!(
        m.contains("scm_rfideas_swipes_total{device=\"1/r1\",outcome=\"expired\"} 1"),
        "{m}"
    );
    // The print server comes back: the next swipe arrives, the expired one never does.
    let listen = format!("127.0.0.1:{port}");
    let (s, _) = https_sim(
        &dev.join("scm.pem"),
        &dev.join("scm-key.pem"),
        &["--https-listen", &listen],
    );
    swipe(&dev, 1, "BACK0002");
    s.wait_stdout("CARD BACK0002");
    assert!(!s.stdout().contains("DOWN0001"), "{}", s.stdout());
    let st = rig.backoffice(&["status", "1"]);
    assert!(st.contains("1 delivered, 1 expired"), "{st}");
    assert!(rig.agents.len() == 1);
}

/// Removes the `[[generic]]` devices from init-dev's scm.toml: 241 mode only.
fn without_generic(dev: &Path) {
    let path = dev.join("scm.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with('[') {
            skipping = line == "[[generic]]";
        }
        if !skipping {
            out.push(line);
        }
    }
    assert!(text.contains("[[generic]]") && !out.contains(&"[[generic]]"));
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
}

#[test]
fn a_device_in_241_mode_only() {
    let rig = Rig::start_edited(&[1, 2], &[], 10_000, without_generic);
    assert!(!rig.scm.logs().contains("(generic "), "{}", rig.scm.logs());
    let s = configuring_sim(&rig, "reader-1.localhost", &["--set", URL]);
    s.wait_stdout("CONFIGURED");
    swipe(&rig.dev(), 1, "ONLY0241");
    s.wait_stdout("CARD ONLY0241");
    let l = rig.wait_listing("****0241", "delivered");
    assert!(l.contains("rfideas 1/r1 to 127.0.0.1:"), "{l}");
    assert!(!l.contains("generic"), "{l}");
    // Machine 2's device was never configured by a print server: recorded with the reason.
    swipe(&rig.dev(), 2, "NOURL002");
    let l = rig.wait_listing("****L002", "failed");
    assert!(l.contains("no swipe URL"), "{l}");
    assert!(!s.stdout().contains("NOURL002"));
}

/// The value of the first metrics line starting with `prefix`, if any.
fn metric(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn at_its_in_flight_limit_the_241_bridge_answers_busy_counts_and_journals_once() {
    let rig = Rig::start(
        &[1],
        &[("SCM__RFIDEAS_BRIDGE__IN_FLIGHT_MAX", "2".into())],
        5_000,
    );
    let dev = rig.dev();
    let (s, addr) = https_sim(
        &dev.join("scm.pem"),
        &dev.join("scm-key.pem"),
        &["--respond", "hang"],
    );
    configure_url(&rig, &format!("https://{addr}/swipe?card={{card}}"));
    // Two swipes the print server never answers fill the device's in-flight limit (the
    // Generic device of the same reader has room: no print server, a queue of 64).
    swipe(&dev, 1, "HOLD0001");
    s.wait_stdout("CARD HOLD0001");
    swipe(&dev, 1, "HOLD0002");
    s.wait_stdout("CARD HOLD0002");
    swipe(&dev, 1, "HOLD0003");
    let deadline = Instant::now() + WAIT;
    let m = loop {
        let m = rig.metrics();
        if metric(
            &m,
            "scm_rfideas_swipes_total{device=\"1/r1\",outcome=\"busy\"}",
        )
        .is_some_and(|n| n >= 1)
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the third swipe was not refused as BUSY:\n{m}"
        );
    };
    assert!(
        metric(&m, "scm_swipes_total{outcome=\"busy\"}").is_some_and(|n| n >= 1),
        "{m}"
    );
    // Not acknowledged: the held swipes keep the device full for seconds yet.
    let agent = rig.agents[0].logs();
    assert_eq!(
        agent.matches("swipe acknowledged by the SCM").count(),
        2,
        "{agent}"
    );
    // Journaled once, naming the bridge that was full, though the agent retries.
    let line = rig.wait_listing("****0003", "busy");
    assert!(line.contains("rfideas 1/r1"), "{line}");
    let out = rig.backoffice(&["swipes"]);
    assert_eq!(out.matches("****0003").count(), 1, "{out}");
}

/// Gives each listed machine's 241 device its own address, `127.0.0.2<id>`.
fn with_addresses(dev: &Path) {
    let path = dev.join("scm.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    for id in 1..=9 {
        let host = format!("host = \"reader-{id}.localhost\"\n");
        text = text.replace(&host, &format!("{host}address = \"127.0.0.2{id}\"\n"));
    }
    assert!(text.contains("address = \"127.0.0.21\""), "{text}");
    std::fs::write(&path, text).unwrap();
}

/// Starts the print server that knows readers only by address, for the rig's devices
/// `machines` (read from the SCM's `listening on ADDR (rfideas M/r1)` lines).
fn ip_sim(rig: &Rig, machines: &[u16], extra: &[&str]) -> Proc {
    let dev = rig.dev();
    let (cert, key) = (dev.join("scm.pem"), dev.join("scm-key.pem"));
    let readers: Vec<String> = machines
        .iter()
        .map(|m| {
            let addr = rig.scm.listening(&format!("rfideas {m}/r1"));
            format!("reader-{m}={addr}")
        })
        .collect();
    let mut args = vec![
        "--set",
        "server_url=https://{https}/swipe?card={card}&event={event}",
        "--bind-ip",
        "127.0.0.1",
        "--check-ms",
        "200",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    for r in &readers {
        args.extend(["--reader", r.as_str()]);
    }
    args.extend_from_slice(extra);
    Proc::spawn("241-ip-sim", &bin("print-server-241-ip-sim"), &args, &[])
}

/// Issue 17: a print server that addresses readers by IP (`Host: IP:PORT`) and tells their
/// swipes apart by source address sees three readers, not one.
#[test]
fn readers_known_only_by_address_are_configured_and_swipe_from_their_own_address() {
    let rig = Rig::start_edited(&[1, 2, 3], &[], 10_000, with_addresses);
    for m in 1..=3u16 {
        let own = rig.scm.listening(&format!("rfideas {m}/r1"));
        assert_eq!(own.ip().to_string(), format!("127.0.0.2{m}"));
        assert_eq!(own.port(), rig.rfideas.port(), "the shared listener's port");
    }
    let s = ip_sim(&rig, &[1, 2, 3], &[]);
    s.wait_stdout("READY");
    assert!(!s.stdout().contains("ERROR"), "{}", s.stdout());
    // Each address stored its own reader's settings; the shared listener also resolves a
    // Host that is a device's address.
    let two = rig.scm.listening("rfideas 2/r1");
    let resp = http(rig.rfideas, &get("/settings", &two.to_string()), None);
    assert_eq!(status(&resp), "200", "{resp}");
    assert!(resp.contains("X-Device-Host: reader-2.localhost"), "{resp}");
    assert!(resp.contains("\nreader=reader-2\n"), "{resp}");
    for m in 1..=3u16 {
        let card = format!("ADDR000{m}");
        swipe(&rig.dev(), m, &card);
        let line = s.wait_stdout(&format!("CARD {card}"));
        assert!(
            line.contains(&format!("READER reader-{m} FROM 127.0.0.2{m} ")),
            "{line}"
        );
    }
    let st = rig.backoffice(&["status", "2"]);
    assert!(
        st.contains("rfideas 2/r1 (host reader-2.localhost, address 127.0.0.22, id "),
        "{st}"
    );
    let audit = rig.backoffice(&["audit"]);
    assert!(
        audit.contains("rfideas 3/r1 (reader-3.localhost): reader set to \"reader-3\""),
        "{audit}"
    );
}

#[test]
fn a_retried_swipe_carries_its_event_id_and_the_print_server_drops_the_repeat() {
    let rig = Rig::start_edited(
        &[1],
        &[("SCM__RFIDEAS_BRIDGE__RESPONSE_TIMEOUT_MS", "400".into())],
        10_000,
        with_addresses,
    );
    // The first request is taken but its answer never comes: the SCM retries it.
    let s = ip_sim(&rig, &[1], &["--hang-first", "1"]);
    s.wait_stdout("READY");
    swipe(&rig.dev(), 1, "AGAIN001");
    let first = s.wait_stdout("CARD AGAIN001");
    let event = first.rsplit("EVENT ").next().unwrap().trim().to_string();
    assert!(event.len() > 2 && event != "-", "{first}");
    let repeat = s.wait_stdout("REPEAT");
    assert_eq!(repeat.trim(), format!("REPEAT {event} READER reader-1"));
    let l = rig.wait_listing("****N001", "attempt 2");
    assert!(l.contains("delivered"), "{l}");
    assert_eq!(
        s.stdout().matches("CARD AGAIN001").count(),
        1,
        "{}",
        s.stdout()
    );
}

/// A print server's own self-signed `CA:TRUE` certificate for 127.0.0.1: (cert, key, SHA-256
/// hex of the DER).
fn self_signed_ca_true(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    use sha2::Digest as _;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(30);
    let cert = params.self_signed(&key).unwrap();
    let hash = hex::encode(sha2::Sha256::digest(cert.der()));
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, hash)
}

#[test]
fn a_pinned_self_signed_print_server_certificate_is_accepted_and_an_impostor_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hash) = self_signed_ca_true(dir.path(), "print");
    let rig = Rig::start(
        &[1],
        &[("SCM__RFIDEAS_BRIDGE__PIN_SHA256", hash.clone())],
        10_000,
    );
    let (s, addr) = https_sim(&cert, &key, &[]);
    configure_url(&rig, &format!("https://{addr}/swipe?card={{card}}"));
    swipe(&rig.dev(), 1, "PINS0001");
    s.wait_stdout("CARD PINS0001");
    rig.wait_listing("****0001", "delivered");
    // Another self-signed certificate for the same name is refused before anything is sent.
    let (cert2, key2, _) = self_signed_ca_true(dir.path(), "impostor");
    let (imp, addr2) = https_sim(&cert2, &key2, &[]);
    configure_url(&rig, &format!("https://{addr2}/swipe?card={{card}}"));
    swipe(&rig.dev(), 1, "PINS0002");
    let line = rig.scm.wait_for("swipe failed");
    assert!(line.contains("not the pinned certificate"), "{line}");
    assert!(!imp.stdout().contains("CARD"), "{}", imp.stdout());
}
