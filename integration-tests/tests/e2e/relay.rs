//! The config relay end to end: back office -> telnet -> SCM -> mutual TLS -> agent, with
//! ACK, NACK, unreachable-then-delivered, and the command-line contract.

use integration_tests::{Fleet, backoffice_with, bin, run};

fn write_cfg(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config file");
    p.to_string_lossy().into_owned()
}

#[test]
fn push_is_acked_stored_durably_and_listed() {
    let fleet = Fleet::start(&[1, 2]);
    let f1 = write_cfg(
        fleet.dir.path(),
        "a.cfg",
        "printer.tray = 2\n.dotted line\n",
    );
    let (code, out, err) = fleet.backoffice(&["push", "--machine", "1", "--file", &f1]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 1"), "{out}");
    let stored = std::fs::read_to_string(fleet.agent_dir(1).join("config.current")).unwrap();
    assert_eq!(
        stored, "printer.tray = 2\n.dotted line\n",
        "dot-stuffing round trip"
    );
    assert!(
        !fleet.agent_dir(2).join("config.current").exists(),
        "machine 2 untouched"
    );

    let f2 = write_cfg(fleet.dir.path(), "b.cfg", "printer.tray = 3\n");
    let (code, out, _) = fleet.backoffice(&["push", "--machine", "1", "--file", &f2]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("generation 2"), "{out}");
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(1).join("config.previous")).unwrap(),
        "printer.tray = 2\n.dotted line\n",
        "previous version kept"
    );

    // The same content again makes no new generation.
    let (code, out, _) = fleet.backoffice(&["push", "--machine", "1", "--file", &f2]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("generation 2"), "{out}");

    let (code, out, _) = fleet.backoffice(&["machines"]);
    assert_eq!(code, 0, "{out}");
    let line1 = out
        .lines()
        .find(|l| l.starts_with("1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line1.contains("connected") && line1.contains(" 2       2"),
        "{line1}"
    );
    assert!(out.contains("2 machines"), "{out}");

    let (code, out, _) = fleet.backoffice(&["status", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("desired 2, applied 2 (up to date)"), "{out}");
    assert!(out.contains("link: connected from 127.0.0.1:"), "{out}");

    let (code, out, _) = fleet.backoffice(&["audit"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("admin from 127.0.0.1:") && out.contains("push machine 1 generation 2"),
        "{out}"
    );
}

#[test]
fn nack_is_reported_and_nothing_is_written() {
    let (dir, _pw) = Fleet::init(&[1]);
    // A directory where the agent's temporary file must go makes every save fail, so the
    // agent NACKs with STORAGE_FAILED (root ignores permission bits, so this is the way).
    std::fs::create_dir_all(dir.path().join("dev/machine-1/config.current.tmp/x")).unwrap();
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let agent = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
    agent.wait_for("connected to SCM");
    let f = write_cfg(dir.path(), "c.cfg", "x = 1\n");
    let cfg = dir.path().join("dev/backoffice.toml");
    let (code, out, err) = backoffice_with(&cfg, telnet, &["push", "--machine", "1", "--file", &f]);
    assert_eq!(code, 1, "NACK exits 1: {out}{err}");
    assert!(out.starts_with("554 NACK machine 1 generation 1:"), "{out}");
    assert!(out.contains("STORAGE_FAILED"), "{out}");
    assert!(!dir.path().join("dev/machine-1/config.current").exists());
    // A NACK is final for the generation: the agent is not asked again on reconnect.
    agent.wait_for("cannot store the configuration");
}

#[test]
fn unreachable_push_is_pending_then_delivered_at_hello() {
    let (dir, _pw) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let f = write_cfg(dir.path(), "p.cfg", "pending = yes\n");
    let cfg = dir.path().join("dev/backoffice.toml");
    let env = [("BACKOFFICE__SCM__ADDRESS", telnet.to_string())];
    let (code, out, err) = run(
        &bin("backoffice"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "push",
            "--machine",
            "1",
            "--file",
            &f,
        ],
        &env,
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.starts_with("450 machine 1 unreachable; generation 1 pending"),
        "{err}"
    );

    let agent = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
    agent.wait_for("stored 14 bytes as generation 1");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("dev/machine-1/config.current")).unwrap(),
        "pending = yes\n"
    );
    scm.wait_for("outcome=Ack");
    let (code, out, _) = run(
        &bin("backoffice"),
        &["--config", cfg.to_str().unwrap(), "status", "1"],
        &env,
    );
    assert_eq!(code, 0);
    assert!(out.contains("desired 1, applied 1 (up to date)"), "{out}");
}

#[test]
fn unknown_machine_and_empty_body_are_refused() {
    let fleet = Fleet::start(&[1]);
    let f = write_cfg(fleet.dir.path(), "u.cfg", "a\n");
    let (code, _out, err) = fleet.backoffice(&["push", "--machine", "99", "--file", &f]);
    assert_eq!(code, 2);
    assert!(err.starts_with("550 machine 99 is not known"), "{err}");

    let empty = write_cfg(fleet.dir.path(), "empty.cfg", "");
    let (code, _out, err) = fleet.backoffice(&["push", "--machine", "1", "--file", &empty]);
    assert_eq!(code, 2);
    assert!(err.starts_with("501 empty configuration"), "{err}");

    let (code, _out, err) =
        fleet.backoffice(&["push", "--machine", "1", "--file", "/nonexistent/x"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read /nonexistent/x"), "{err}");
    assert!(!fleet.agent_dir(1).join("config.current").exists());
}

#[test]
fn sigterm_stops_the_scm_gracefully_and_agents_reconnect() {
    let (dir, _pw) = Fleet::init(&[1]);
    let mut scm = Fleet::start_scm(dir.path(), &[]);
    let agents_addr = scm.listening("agents");
    let agent = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
    agent.wait_for("connected to SCM");
    scm.signal("TERM");
    assert_eq!(scm.wait_exit(), Some(0), "{}", scm.logs());
    assert!(scm.logs().contains("SIGTERM received"));
    assert!(scm.logs().contains("SCM hub stopped"));
    agent.wait_for("reconnecting to the SCM in");
    // A new SCM on the same port (the agent keeps its configured address).
    let scm2 = Fleet::start_scm(
        dir.path(),
        &[("SCM__LISTEN__AGENTS", agents_addr.to_string())],
    );
    scm2.listening("agents");
    agent.wait_for_n("connected to SCM", 2);
}

#[test]
fn check_config_commands() {
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let scm_cfg = dev.join("scm.toml");
    let (code, out, err) = run(
        &bin("scm"),
        &["check-config", "--config", scm_cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration is valid (1 machines"), "{out}");

    let (code, _, err) = run(
        &bin("scm"),
        &["check-config", "--config", scm_cfg.to_str().unwrap()],
        &[("SCM__LIMITS__MAX_AGENT_CONECTIONS", "3".into())],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("max_agent_conections"),
        "the offending key is named: {err}"
    );

    let bad = dev.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&scm_cfg)
            .unwrap()
            .replace("[database]", "[database]\npaht = 1"),
    )
    .unwrap();
    let (code, _, err) = run(
        &bin("scm"),
        &["check-config", "--config", bad.to_str().unwrap()],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("paht"), "{err}");

    let agent_cfg = dev.join("agent-1.toml");
    let (code, out, err) = run(
        &bin("machine-agent"),
        &["check-config", "--config", agent_cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run(
        &bin("machine-agent"),
        &["check-config", "--config", agent_cfg.to_str().unwrap()],
        &[("AGENT__TLS__CERT", "/nonexistent.pem".into())],
    );
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent.pem"), "{err}");

    let bo = dev.join("backoffice.toml");
    let (code, out, err) = run(
        &bin("backoffice"),
        &["--config", bo.to_str().unwrap(), "check-config"],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
}
