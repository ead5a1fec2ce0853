//! Metrics and health end to end: a real SCM and agent with their metrics listeners on
//! port 0, a configuration push, a swipe through to the print-server simulator and a
//! refused TLS client, then exact values scraped from both `/metrics` with a raw HTTP GET.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use integration_tests::{Fleet, WAIT, bin, run, swipe};
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, LeafSpec, Validity};
use scm_certs::tls::{self as sctls, TlsPolicy};

use crate::{Pems, connector, init, rt};

/// One raw HTTP/1.1 request; returns the whole answer (the server closes after it).
fn http(addr: SocketAddr, request: &str) -> String {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics port");
    c.set_read_timeout(Some(WAIT)).expect("read timeout");
    c.write_all(request.as_bytes()).expect("send request");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read answer");
    out
}

pub(crate) fn get(addr: SocketAddr, path: &str) -> String {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

/// Scrapes `/metrics` once and checks that every line in `want` is present. Callers wait
/// first for the log lines that follow the counted events.
fn scrape_expect(addr: SocketAddr, want: &[&str]) -> String {
    let answer = get(addr, "/metrics");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{answer}"
    );
    let missing: Vec<&str> = want
        .iter()
        .copied()
        .filter(|w| !answer.lines().any(|l| l == *w))
        .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} from {addr}:\n{answer}"
    );
    answer
}

/// Machine 1's certificate from a CA the fleet does not trust.
fn foreign_machine_1(dev: &std::path::Path) -> Pems {
    let foreign = Ca::generate("Foreign CA", &Validity::days_from_now(30)).expect("foreign CA");
    let leaf = foreign
        .issue(&LeafSpec::new(
            Identity::Machine(1),
            Validity::days_from_now(30),
        ))
        .expect("foreign leaf");
    Pems {
        ca: std::fs::read_to_string(dev.join("ca.pem")).expect("ca.pem"),
        cert: leaf.cert_pem,
        key: leaf.key_pem,
    }
}

#[test]
fn scm_and_agent_expose_exact_metrics_and_health() {
    init();
    let (dir, password) = Fleet::init(&[1, 2]);
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__LISTEN__METRICS", "127.0.0.1:0".into())],
    );
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let scm_metrics = scm.listening("metrics");
    let device = scm.listening("generic 1/r1");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents_addr,
        &[("AGENT__LISTEN__METRICS", "127.0.0.1:0".into())],
    );
    let agent_metrics = agent.listening("metrics");
    agent.wait_for("connected to SCM");
    // A metrics address that is taken is not fatal: the agent runs without metrics.
    let agent2 = Fleet::start_agent(
        dir.path(),
        2,
        agents_addr,
        &[("AGENT__LISTEN__METRICS", scm_metrics.to_string())],
    );
    agent2.wait_for(&format!("cannot listen on {scm_metrics} for metrics"));
    agent2.wait_for("metrics disabled");
    agent2.wait_for("connected to SCM");

    // Health and the HTTP corner cases.
    for addr in [scm_metrics, agent_metrics] {
        let h = get(addr, "/health");
        assert!(
            h.starts_with("HTTP/1.1 200 OK\r\n") && h.ends_with("\r\n\r\nok\n"),
            "{h}"
        );
        let n = get(addr, "/nothing");
        assert!(n.starts_with("HTTP/1.1 404 "), "{n}");
        let p = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(p.starts_with("HTTP/1.1 405 "), "{p}");
    }

    // A push, ACKed.
    let cfg = dir.path().join("m1.cfg");
    std::fs::write(&cfg, "printer.tray = 2\n").expect("write config");
    let (code, out, err) = run(
        &bin("backoffice"),
        &[
            "--config",
            dir.path()
                .join("dev/backoffice.toml")
                .to_str()
                .unwrap_or(""),
            "push",
            "--machine",
            "1",
            "--file",
            cfg.to_str().unwrap_or(""),
        ],
        &[
            ("BACKOFFICE__SCM__ADDRESS", telnet.to_string()),
            ("BACKOFFICE__LOGIN__PASSWORD", password.clone()),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 1"), "{out}");

    // A swipe, delivered to the print server.
    let printer = crate::swipes::sim(device, &[]);
    printer.wait_stdout("CONNECTED");
    agent.wait_for("reader r1");
    swipe(&dir.path().join("dev"), 1, "12345678");
    printer.wait_stdout("CARD 12345678 FROM");
    // Each counter changes before the log line that reports its event.
    scm.wait_for("card delivered to");
    agent.wait_for("swipe acknowledged by the SCM");

    // A client with a certificate from another CA, refused at the handshake.
    let dev = dir.path().join("dev");
    rt().block_on(async {
        let tcp = tokio::net::TcpStream::connect(agents_addr)
            .await
            .expect("connect");
        let c = connector(&foreign_machine_1(&dev), TlsPolicy::default());
        // TLS 1.3: the client may finish its side; the refusal shows on the first read.
        if let Ok(tls) = sctls::connect(&c, tcp, &Identity::Scm, WAIT).await {
            use tokio::io::AsyncReadExt;
            let mut tls = tls;
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
        }
    });
    scm.wait_for("TLS handshake refused (unknown_ca)");

    let scm_text = scrape_expect(
        scm_metrics,
        &[
            "scm_agents_connected 2",
            "scm_agent_connections_total 2",
            "scm_pushes_total{outcome=\"ack\"} 1",
            "scm_pushes_total{outcome=\"nack\"} 0",
            "scm_pushes_total{outcome=\"unreachable\"} 0",
            "scm_push_duration_seconds_count 1",
            "scm_swipes_total{outcome=\"queued\"} 1",
            "scm_swipes_total{outcome=\"delivered\"} 1",
            "scm_swipes_total{outcome=\"expired\"} 0",
            "scm_swipe_forward_seconds_count 1",
            "scm_bridge_connections{device=\"1/r1\"} 1",
            "scm_bridge_connections{device=\"2/r1\"} 0",
            "scm_bridge_refused_peers_total{device=\"1/r1\"} 0",
            "scm_handshake_failures_total{listener=\"agents\",reason=\"unknown_ca\"} 1",
            "scm_operator_logins_total{result=\"ok\"} 1",
            "scm_operator_logins_total{result=\"failed\"} 0",
            "scm_frames_refused_total{reason=\"oversize\"} 0",
        ],
    );
    let agent_text = scrape_expect(
        agent_metrics,
        &[
            "agent_scm_link_up 1",
            "agent_scm_reconnects_total 0",
            "agent_configs_total{outcome=\"ack\"} 1",
            "agent_configs_total{outcome=\"nack\"} 0",
            "agent_swipes_total{outcome=\"accepted\"} 1",
            "agent_swipes_total{outcome=\"acked\"} 1",
            "agent_swipe_queue 0",
        ],
    );
    // The agent exports its certificates' expiry (init-dev issues them for years).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for cert in ["machine", "ca"] {
        let key = format!("agent_certificate_expiry_timestamp_seconds{{certificate=\"{cert}\"}} ");
        let t: f64 = agent_text
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{agent_text}"));
        assert!(t > now + 30.0 * 86400.0, "{cert} expires at {t}");
    }
    // The SCM exports each machine's generations and its certificates' expiry, for the
    // rules in deploy/prometheus (configuration not applied, certificate expiring).
    for line in [
        "scm_machine_desired_generation{machine=\"1\"} 1",
        "scm_machine_applied_generation{machine=\"1\"} 1",
        "scm_machine_desired_generation{machine=\"2\"} 0",
        "scm_database_writable 1",
    ] {
        assert!(
            scm_text.lines().any(|l| l == line),
            "no {line} in:\n{scm_text}"
        );
    }
    for cert in ["scm", "ca"] {
        let key = format!("scm_certificate_expiry_timestamp_seconds{{certificate=\"{cert}\"}} ");
        let t: f64 = scm_text
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{scm_text}"));
        assert!(t > now + 30.0 * 86400.0, "{cert} expires at {t}");
    }
    for (name, text) in [("scm", &scm_text), ("agent", &agent_text)] {
        assert!(
            !text.contains("12345678"),
            "{name} metrics show the card number:\n{text}"
        );
    }
    // The SCM's health check reads the database.
    assert!(get(scm_metrics, "/health").ends_with("\r\n\r\nok\n"));
}
