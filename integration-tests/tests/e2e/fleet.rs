//! Fleet state: pending pushes retried with back-off and resumed after an SCM crash;
//! configuration history and rollback.

use std::sync::Arc;

use integration_tests::{Fleet, backoffice_with};
use scm_certs::tls::{self as sctls, TlsPolicy};
use tokio::net::TcpListener;

use crate::v0::{ACK, make_v0, serve_one_config, v0};
use crate::{dev_pems, init, rt};

#[test]
fn pending_push_is_retried_with_backoff_and_resumes_after_an_scm_crash() {
    init();
    let (dir, _pw) = Fleet::init(&[2]);
    let dev = dir.path().join("dev");
    // Machine 2 is a version-0 machine with a configured config port that is down for now.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port_addr = reserved.local_addr().unwrap();
    drop(reserved);
    make_v0(&dev, 2, Some(port_addr));
    let retry = [
        ("SCM__RETRY__INITIAL_MS", "200".to_string()),
        ("SCM__RETRY__MAX_MS", "800".to_string()),
    ];
    let mut scm = Fleet::start_scm(dir.path(), &retry);
    let telnet = scm.listening("telnet");
    let cfg = dev.join("backoffice.toml");
    let file = dir.path().join("retry.cfg");
    std::fs::write(&file, "retry=yes\n").unwrap();
    let (code, _out, err) = backoffice_with(
        &cfg,
        telnet,
        &["push", "--machine", "2", "--file", file.to_str().unwrap()],
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("450 machine 2 unreachable; generation 1 pending"),
        "{err}"
    );
    // Retried with growing, jittered delays while the machine stays down.
    scm.wait_for_n("still unreachable; next attempt in", 3);
    let delays: Vec<u64> = scm
        .logs()
        .lines()
        .filter_map(|l| {
            l.split("next attempt in ")
                .nth(1)?
                .split(" ms")
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(delays.iter().all(|d| *d <= 800), "capped: {delays:?}");
    assert!(delays.iter().any(|d| *d > 200), "growing: {delays:?}");

    // The SCM dies; the push is still pending when it comes back, and resumes at once.
    scm.kill9();
    let scm2 = Fleet::start_scm(dir.path(), &retry);
    scm2.listening("telnet");
    scm2.wait_for("retrying a pending push");
    let m2 = dev_pems(&dev, "machine-2");
    let runtime = rt();
    let got = runtime.block_on(async {
        let listener = TcpListener::bind(port_addr)
            .await
            .expect("the config port again");
        let acceptor = Arc::new(tokio_rustls::TlsAcceptor::from(
            sctls::server_config_from_pem(
                &m2.ca,
                &m2.cert,
                &m2.key,
                &[],
                TlsPolicy::default(),
                &[],
            )
            .unwrap(),
        ));
        serve_one_config(&listener, &acceptor, |_| v0(ACK, 2, b"OK")).await
    });
    assert_eq!(got.3, b"retry=yes\n");
    scm2.wait_for("outcome=Ack");
    let (code, out, _) = backoffice_with(&cfg, scm2.listening("telnet"), &["status", "2"]);
    assert_eq!(code, 0);
    assert!(out.contains("desired 1, applied 1 (up to date)"), "{out}");
}

#[test]
fn history_and_rollback() {
    let fleet = Fleet::start(&[1]);
    let dir = fleet.dir.path();
    for (name, text) in [("a.cfg", "mode=a\n"), ("b.cfg", "mode=b\n")] {
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        let (code, out, err) =
            fleet.backoffice(&["push", "--machine", "1", "--file", f.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, out, err) = fleet.backoffice(&["rollback", "--machine", "1", "--generation", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 3"), "{out}");
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(1).join("config.current")).unwrap(),
        "mode=a\n"
    );
    let (code, out, _) = fleet.backoffice(&["history", "1"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("generation "))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("generation 3 7 bytes") && lines[0].ends_with(": ack"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("generation 1 7 bytes") && lines[2].contains("by admin"),
        "{out}"
    );
    let (code, _, err) = fleet.backoffice(&["rollback", "--machine", "1", "--generation", "9"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("550 machine 1 has no generation 9"),
        "{err}"
    );
    let (_, audit, _) = fleet.backoffice(&["audit"]);
    assert!(
        audit.contains("rollback machine 1 to generation 1"),
        "{audit}"
    );
}
