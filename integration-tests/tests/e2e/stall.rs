//! Never late after an SCM stall: the SCM is stopped (SIGSTOP) longer than the swipes'
//! lifetime while the agent keeps swiping; its frames wait unread in the socket. When
//! the SCM resumes it must not forward them: each frame's wait is measured from the
//! agent's send time stamp against the link's heartbeats (`link::clock`), and counted
//! against the swipe's remaining time to live.

use integration_tests::{Fleet, swipe};

#[test]
fn swipes_that_waited_out_their_ttl_while_the_scm_was_stopped_are_never_forwarded() {
    crate::init();
    let (dir, _password) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        scm.listening("agents"),
        &[
            ("AGENT__SWIPES__TTL_MS", "1500".into()),
            ("AGENT__TIMEOUTS__HEARTBEAT_MS", "200".into()),
        ],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    let dev = dir.path().join("dev");
    let sim = crate::swipes::sim(scm.listening("generic 1/r1"), &[]);
    sim.wait_stdout("CONNECTED");
    swipe(&dev, 1, "11110001");
    sim.wait_stdout("CARD 11110001 FROM");

    scm.signal("STOP");
    let stale: Vec<String> = (1..=5).map(|i| format!("2222000{i}")).collect();
    for c in &stale {
        swipe(&dev, 1, c);
    }
    // The agent gives each up once its 1.5 s are over; the frames still sit in the
    // SCM's socket.
    agent.wait_for_n("swipe expired before the SCM acknowledged it", stale.len());
    scm.signal("CONT");

    swipe(&dev, 1, "33330001");
    sim.wait_stdout("CARD 33330001 FROM");
    let out = sim.stdout();
    for c in &stale {
        assert!(
            !out.contains(c.as_str()),
            "card {c} reached the print server after its lifetime:\n{out}"
        );
    }
    let logs = scm.wait_for_n("the frame waited", stale.len());
    assert!(logs.contains("swipe not forwarded: expired"), "{logs}");
}

/// Refusals at the agent reach the operator: the agent counts the swipes it refused
/// (card rules, a full queue) or dropped (expired) and reports them in its heartbeats;
/// `status`, `swipes` and the SCM's metrics show them.
#[test]
fn swipes_the_agent_refuses_are_reported_to_the_scm_and_shown_to_the_operator() {
    crate::init();
    let (dir, _password) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__LISTEN__METRICS", "127.0.0.1:0".into())],
    );
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        scm.listening("agents"),
        &[("AGENT__TIMEOUTS__HEARTBEAT_MS", "200".into())],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    let dev = dir.path().join("dev");
    for c in ["12-34", "56 78", "not/a/card"] {
        swipe(&dev, 1, c);
    }
    agent.wait_for_n("swipe refused", 3);
    let bo = dev.join("backoffice.toml");
    let telnet = scm.listening("telnet");
    let deadline = std::time::Instant::now() + integration_tests::WAIT;
    let status = loop {
        let (code, out, err) = integration_tests::backoffice_with(&bo, telnet, &["status", "1"]);
        assert_eq!(code, 0, "{out}{err}");
        if out.contains("swipes dropped at the agent (since it started): 3 invalid card") {
            break out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reported: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.contains("0 queue full, 0 expired"), "{status}");
    let (code, out, _) = integration_tests::backoffice_with(&bo, telnet, &["swipes"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("connected agents report, since they started: 3 refused as invalid cards"),
        "{out}"
    );
    let metrics = scm.listening("metrics");
    let body = crate::metrics::get(metrics, "/metrics");
    assert!(
        body.contains("scm_agent_swipes_dropped{reason=\"invalid_card\"} 3"),
        "{body}"
    );
}
