//! A half-open print-server connection: the print server runs in its own network
//! namespace (a test host made here, joined to this one by a veth pair), and its link is
//! cut while it is connected, so the SCM's side of the connection stays open with nobody
//! behind it. The SCM must notice (TCP keep-alive and TCP_USER_TIMEOUT), drop the
//! connection, keep serving, and take the print server back when it reconnects.
//!
//! Needs root (network namespaces). Set SCM_TEST_SKIP_NETNS=1 to skip it explicitly where
//! that is not available; it never passes silently.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use integration_tests::{Fleet, Proc, bin, swipe};

/// A network namespace with a veth link to this one; removed on drop.
struct TestHost {
    ns: String,
    host_if: String,
    /// Our address on the link.
    here: String,
    /// The test host's address.
    there: String,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestHost {
    fn new() -> TestHost {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let ns = format!("scmt{tag}");
        let host_if = format!("sh{tag}");
        let peer_if = format!("sp{tag}");
        let subnet = 16 + (std::process::id() % 200);
        let here = format!("10.213.{subnet}.1");
        let there = format!("10.213.{subnet}.2");
        sh(&["ip", "netns", "add", &ns]);
        let host = TestHost {
            ns: ns.clone(),
            host_if: host_if.clone(),
            here: here.clone(),
            there: there.clone(),
        };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        sh(&["ip", "link", "set", &peer_if, "netns", &ns]);
        sh(&["ip", "addr", "add", &format!("{here}/30"), "dev", &host_if]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{there}/30"),
            "dev",
            &peer_if,
        ]);
        sh(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", &peer_if, "up",
        ]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        host
    }

    /// Cuts or restores the link (on our side, so the test host cannot tell).
    fn link(&self, up: bool) {
        sh(&[
            "ip",
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn half_open_print_server_connection_is_detected_and_replaced() {
    if std::env::var("SCM_TEST_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("SKIPPED explicitly (SCM_TEST_SKIP_NETNS=1): half-open print server test");
        return;
    }
    let host = TestHost::new();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    // The device listens on the link to the test host and accepts only that host.
    let toml = dev.join("scm.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "listen = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]",
        &format!("listen = \"{}:0\"\nallow = [\"{}\"]", host.here, host.there),
    );
    assert!(text.contains(&host.there), "{text}");
    std::fs::write(&toml, text).unwrap();
    let scm = Fleet::start_scm(
        dir.path(),
        &[
            ("SCM__BRIDGE__KEEPALIVE_IDLE_MS", "1000".into()),
            ("SCM__BRIDGE__KEEPALIVE_INTERVAL_MS", "1000".into()),
            ("SCM__BRIDGE__KEEPALIVE_RETRIES", "2".into()),
            ("SCM__BRIDGE__USER_TIMEOUT_MS", "2000".into()),
            ("SCM__BRIDGE__WRITE_TIMEOUT_MS", "2000".into()),
        ],
    );
    let agents = scm.listening("agents");
    let port = scm.listening("generic 1/r1");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents,
        &[("AGENT__SWIPES__TTL_MS", "20000".into())],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");

    let sim_bin = bin("print-server-sim");
    let target = port.to_string();
    let sim = Proc::spawn(
        "print-server-sim (test host)",
        std::path::Path::new("ip"),
        &[
            "netns",
            "exec",
            &host.ns,
            sim_bin.to_str().unwrap(),
            "--connect",
            &target,
            "--keepalive-ms",
            "300",
        ],
        &[],
    );
    sim.wait_stdout("CONNECTED");
    swipe(&dev, 1, "HALF0001");
    sim.wait_stdout("CARD HALF0001");

    // The test host vanishes without closing anything: the SCM's connection is half-open.
    host.link(false);
    let line = scm.wait_for("disconnected: Connection timed out");
    assert!(
        line.contains(&host.there) && line.contains("device=1/r1"),
        "{line}"
    );

    // A swipe made meanwhile waits for a print server, and the SCM still serves.
    swipe(&dev, 1, "HALF0002");
    agent.wait_for_n("swipe acknowledged by the SCM", 2);

    // The link comes back; the print server notices its dead connection and reconnects:
    // the newest connection takes the waiting swipe.
    host.link(true);
    sim.wait_stdout("DISCONNECTED");
    // "CONNECTED", "DISCONNECTED", "CONNECTED": the third match is the reconnection.
    sim.wait_stdout_n("CONNECTED", 3);
    sim.wait_stdout("CARD HALF0002");
    assert_eq!(sim.stdout().matches("CARD HALF0002").count(), 1);
}
