//! How the SCM ends operator connections, seen by real clients: every close it decides
//! on (idle, shutdown, also in the middle of a push) is announced with a `421` line, and
//! the TLS ports (telnet and the admin API) end with a TLS close_notify, which
//! `openssl s_client` checks (without it: "unexpected eof while reading").

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use integration_tests::{Fleet, RawTelnet};

/// Runs `openssl s_client` against `addr` with the dev operator certificate, feeding it
/// `input`; it keeps waiting after its input ends (`-ign_eof`) until the SCM closes.
/// Returns stdout and stderr together.
fn s_client(dev: &Path, addr: std::net::SocketAddr, extra: &[&str], input: &[u8]) -> String {
    s_client_with(dev, addr, extra, input, |_| {})
}

/// [`s_client`], calling `connected` with the output so far once the handshake is done.
fn s_client_with(
    dev: &Path,
    addr: std::net::SocketAddr,
    extra: &[&str],
    input: &[u8],
    connected: impl FnOnce(&str),
) -> String {
    let p = |f: &str| dev.join(f).to_string_lossy().into_owned();
    let mut child = Command::new("timeout")
        .args(["30", "openssl", "s_client", "-ign_eof", "-tls1_3"])
        .args(["-connect", &addr.to_string()])
        .args(["-cert", &p("operator-admin.pem")])
        .args(["-key", &p("operator-admin-key.pem")])
        .args(["-CAfile", &p("ca.pem")])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write to s_client");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = Vec::new();
    // s_client prints the session's details once the handshake is over.
    while !String::from_utf8_lossy(&seen).contains("Verify return code") {
        let n = stdout.read_until(b'\n', &mut seen).expect("read s_client");
        assert!(n > 0, "s_client ended: {}", String::from_utf8_lossy(&seen));
    }
    connected(&String::from_utf8_lossy(&seen));
    stdout.read_to_end(&mut seen).expect("read s_client");
    let out = child.wait_with_output().expect("s_client ends");
    format!(
        "{}{}",
        String::from_utf8_lossy(&seen),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn tls_telnet_and_the_admin_port_end_with_close_notify() {
    let fleet = Fleet::start(&[1]);
    let dev = fleet.dev();

    let out = s_client(&dev, fleet.telnet_tls, &[], b"machines\r\nquit\r\n");
    assert!(out.contains("250 1 machines"), "{out}");
    assert!(out.contains("221 bye"), "{out}");
    // What s_client prints for a close_notify.
    assert!(out.contains("closed"), "{out}");
    assert!(!out.contains("unexpected eof"), "no close_notify: {out}");

    // The admin port: an HTTP/2 client (the preface and an empty SETTINGS frame) that
    // is still connected when the SCM shuts down: GOAWAY, then close_notify.
    let admin = fleet.scm.listening("admin");
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let out = s_client_with(&dev, admin, &["-alpn", "h2"], &preface, |connected| {
        assert!(connected.contains("ALPN protocol: h2"), "{connected}");
        fleet.scm.signal("TERM");
    });
    assert!(out.contains("closed"), "{out}");
    assert!(!out.contains("unexpected eof"), "no close_notify: {out}");
}

#[test]
fn sigterm_is_announced_at_the_prompt_and_in_the_middle_of_a_push() {
    let fleet = Fleet::start(&[1]);
    let login = |t: &mut RawTelnet| {
        t.until("Username: ");
        t.line("admin");
        t.until("Password: ");
        t.line(&fleet.password);
        t.until("scm> ");
    };
    let mut at_prompt = RawTelnet::connect(fleet.telnet);
    login(&mut at_prompt);
    let mut mid_push = RawTelnet::connect(fleet.telnet);
    login(&mut mid_push);
    mid_push.line("push 1");
    mid_push.until("354 ");
    mid_push.line("half = 1");
    // The line has been read once the session answers an AYT sent after it.
    mid_push.send(&[255, 246]);
    mid_push.until("[scm: yes]\r\n");

    fleet.scm.signal("TERM");
    let text = at_prompt.until_closed();
    assert_eq!(text, "421 SCM shutting down; closing\r\n");
    let text = mid_push.until_closed();
    assert_eq!(
        text,
        "421 SCM shutting down; push cancelled, nothing sent; closing\r\n"
    );
    assert!(
        !fleet.agent_dir(1).join("config.current").exists(),
        "nothing was pushed"
    );
}
