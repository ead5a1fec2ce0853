//! Fleet-state faults with the real binaries: the SCM killed (SIGKILL) in the middle of a
//! push, the agent killed between its durable write and its ACK, 100 pushes from 4
//! concurrent operators, a locked and a read-only database, and fleet pushes to groups.
//!
//! The exact moment of a kill is pinned with fault-injection points (`SCM_FAILPOINTS`):
//! the process stops dead at the named point and logs it, and the test then kills it for
//! real.

use std::path::Path;
use std::process::Command;

use integration_tests::{Fleet, Proc, RawTelnet, backoffice_with, bin};

/// How many times the agent's log says it wrote generation `g` to disk.
fn stored_count(agent: &Proc, g: u64) -> usize {
    agent
        .logs()
        .lines()
        .filter(|l| l.contains(&format!("bytes as generation {g}")) && l.contains("stored"))
        .count()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, text).expect("write config file");
    f.to_str().expect("utf-8 path").to_string()
}

/// Adds operators to an init-dev scm.toml, with the same password as `admin`.
fn add_operators(dir: &Path, operators: &[(&str, &str)]) {
    let scm_toml = dir.join("dev/scm.toml");
    let text = std::fs::read_to_string(&scm_toml).unwrap();
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("password_hash = "))
        .expect("admin's hash")
        .to_string();
    let mut extra = String::new();
    for (name, role) in operators {
        extra.push_str(&format!(
            "\n[[operator]]\nname = \"{name}\"\nrole = \"{role}\"\npassword_hash = {hash}\n"
        ));
    }
    std::fs::write(&scm_toml, text + &extra).unwrap();
}

/// Starts `backoffice push` in the background.
fn push_in_background(dir: &Path, telnet: std::net::SocketAddr, file: &str) -> Proc {
    let cfg = dir.join("dev/backoffice.toml");
    Proc::spawn(
        "backoffice",
        &bin("backoffice"),
        &[
            "--config",
            cfg.to_str().expect("utf-8 path"),
            "push",
            "--machine",
            "1",
            "--file",
            file,
        ],
        &[("BACKOFFICE__SCM__ADDRESS", telnet.to_string())],
    )
}

#[test]
fn scm_killed_mid_push_converges_and_applies_exactly_once() {
    let (dir, _pw) = Fleet::init(&[1]);
    let mut scm = Fleet::start_scm(
        dir.path(),
        &[("SCM_FAILPOINTS", "scm-after-config-sent".to_string())],
    );
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let agent = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
    agent.wait_for("connected to SCM");

    let file = write(dir.path(), "a.cfg", "mode=first\n");
    let mut bo = push_in_background(dir.path(), telnet, &file);
    // The CONFIG is on the wire and the agent stores it; the SCM dies before the ACK.
    scm.wait_for("failpoint scm-after-config-sent reached");
    agent.wait_for("bytes as generation 1");
    scm.kill9();
    let code = bo.wait_exit();
    assert_ne!(code, Some(0), "the push cannot have been reported as done");

    // The SCM comes back on the same agent port; the agent reconnects and reports what it
    // applied; the SCM converges without applying the configuration a second time.
    let scm2 = Fleet::start_scm(
        dir.path(),
        &[("SCM__LISTEN__AGENTS", agents_addr.to_string())],
    );
    let telnet2 = scm2.listening("telnet");
    agent.wait_for_n("connected to SCM", 2);
    let cfg = dir.path().join("dev/backoffice.toml");
    let (code, out, err) = backoffice_with(&cfg, telnet2, &["status", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("desired 1, applied 1 (up to date)"), "{out}");
    let agent_dir = dir.path().join("dev/machine-1");
    assert_eq!(
        std::fs::read_to_string(agent_dir.join("config.current")).unwrap(),
        "mode=first\n"
    );
    // Pushing the same content again is no new generation and no second apply.
    let (code, out, err) =
        backoffice_with(&cfg, telnet2, &["push", "--machine", "1", "--file", &file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 1"), "{out}");
    assert_eq!(stored_count(&agent, 1), 1, "applied exactly once");
    // And the fleet keeps working: the next generation goes through.
    let file2 = write(dir.path(), "b.cfg", "mode=second\n");
    let (code, out, err) =
        backoffice_with(&cfg, telnet2, &["push", "--machine", "1", "--file", &file2]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 2"), "{out}");
    assert_eq!(stored_count(&agent, 2), 1);
}

#[test]
fn agent_killed_between_durable_write_and_ack() {
    let (dir, _pw) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let mut agent = Fleet::start_agent(
        dir.path(),
        1,
        agents_addr,
        &[("SCM_FAILPOINTS", "agent-after-durable-write".to_string())],
    );
    agent.wait_for("connected to SCM");

    let file = write(dir.path(), "a.cfg", "mode=durable\n");
    let mut bo = push_in_background(dir.path(), telnet, &file);
    agent.wait_for("failpoint agent-after-durable-write reached");
    assert_eq!(stored_count(&agent, 1), 1);
    agent.kill9();
    assert_eq!(bo.wait_exit(), Some(2), "pending, not ACKed");
    assert!(
        bo.logs()
            .contains("450 machine 1 unreachable; generation 1 pending"),
        "{}",
        bo.logs()
    );

    // The agent restarts with the configuration on disk and says so in its HELLO: the SCM
    // records the generation as applied; nothing is applied twice, nothing is lost.
    let agent2 = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
    agent2.wait_for("connected to SCM at");
    let cfg = dir.path().join("dev/backoffice.toml");
    let (code, out, err) = backoffice_with(&cfg, telnet, &["status", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("desired 1, applied 1 (up to date)"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("dev/machine-1/config.current")).unwrap(),
        "mode=durable\n"
    );
    scm.wait_for("machine reports generation 1 applied");
    assert_eq!(
        stored_count(&agent2, 1),
        0,
        "no second apply after the restart"
    );
}

/// The agent killed (SIGKILL) before each step of a save (fail points in its storage): after
/// the restart what it reports matches what is on its disk, the push that was cut off is
/// delivered again, and the machine ends on the new generation, stored once more at most.
#[test]
fn agent_killed_at_every_step_of_a_save_converges_and_never_reports_a_stale_generation() {
    const STEPS: [&str; 7] = [
        "agent-save-write-meta",
        "agent-save-rename-meta",
        "agent-save-sync-meta",
        "agent-save-write-content",
        "agent-save-keep-previous",
        "agent-save-replace-current",
        "agent-save-sync-directory",
    ];
    for step in STEPS {
        let (dir, _pw) = Fleet::init(&[1]);
        let scm = Fleet::start_scm(dir.path(), &[]);
        let agents_addr = scm.listening("agents");
        let telnet = scm.listening("telnet");
        let cfg = dir.path().join("dev/backoffice.toml");
        let agent = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
        agent.wait_for("connected to SCM");
        let old = write(dir.path(), "old.cfg", "mode=old\n");
        let (code, out, err) =
            backoffice_with(&cfg, telnet, &["push", "--machine", "1", "--file", &old]);
        assert_eq!(code, 0, "{step}: {out}{err}");
        drop(agent);

        let mut agent = Fleet::start_agent(
            dir.path(),
            1,
            agents_addr,
            &[("SCM_FAILPOINTS", step.to_string())],
        );
        agent.wait_for("connected to SCM");
        let new = write(dir.path(), "new.cfg", "mode=new\n");
        let mut bo = push_in_background(dir.path(), telnet, &new);
        agent.wait_for(&format!("failpoint {step} reached"));
        agent.kill9();
        assert_eq!(
            bo.wait_exit(),
            Some(2),
            "{step}: pending, not ACKed or NACKed"
        );

        let agent2 = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
        agent2.wait_for("connected to SCM at");
        // The pending generation reaches the machine again (its ACK is recorded), or the
        // HELLO's content hash shows it applied already.
        let machine = dir.path().join("dev/machine-1");
        scm.wait_for_any(&[
            "generation=2 outcome=Ack",
            "machine reports generation 2 applied",
        ]);
        let (code, out, err) = backoffice_with(&cfg, telnet, &["status", "1"]);
        assert_eq!(code, 0, "{step}: {out}{err}");
        assert!(
            out.contains("desired 2, applied 2 (up to date)"),
            "{step}: not converged: {out}\nagent: {}",
            agent2.logs()
        );
        assert_eq!(
            std::fs::read_to_string(machine.join("config.current")).unwrap(),
            "mode=new\n",
            "{step}"
        );
        let meta = std::fs::read_to_string(machine.join("config.meta")).unwrap();
        assert!(
            meta.starts_with("generation=2\n"),
            "{step}: the meta names the generation in force: {meta}"
        );
        assert!(stored_count(&agent2, 2) <= 1, "{step}: stored once at most");
    }
}

#[test]
fn hundred_pushes_from_four_concurrent_operators_end_ordered_and_newest() {
    let (dir, password) = Fleet::init(&[1]);
    // Three more admin operators with the same password as `admin`.
    add_operators(
        dir.path(),
        &[("ops-b", "admin"), ("ops-c", "admin"), ("ops-d", "admin")],
    );
    let scm = Fleet::start_scm(dir.path(), &[]);
    let telnet = scm.listening("telnet");
    let agent = Fleet::start_agent(dir.path(), 1, scm.listening("agents"), &[]);
    agent.wait_for("connected to SCM");

    let replies: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = ["admin", "ops-b", "ops-c", "ops-d"]
            .into_iter()
            .map(|op| {
                let password = password.clone();
                s.spawn(move || {
                    let mut t = RawTelnet::connect(telnet);
                    t.login(op, &password);
                    (0..25)
                        .map(|n| {
                            t.line("push 1");
                            t.until("354 ");
                            t.line(&format!("operator = {op}"));
                            t.line(&format!("round = {n}"));
                            t.line(".");
                            let reply = t.until("scm> ");
                            reply
                                .lines()
                                .find(|l| l.len() > 3 && l.as_bytes()[3] == b' ')
                                .unwrap_or(&reply)
                                .to_string()
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<&String> = replies.iter().flatten().collect();
    assert_eq!(all.len(), 100);
    for r in &all {
        assert!(
            r.starts_with("250 ACK machine 1 generation ")
                || r.starts_with("251 machine 1 generation"),
            "every push is stored or superseded by a newer one, never refused: {r}"
        );
    }
    // The agent applied generations in increasing order only, and never had to refuse an
    // older one. (Its log is read by a pump thread: wait until the last line is in.)
    agent.wait_for("bytes as generation 100");
    let applied: Vec<u64> = agent
        .logs()
        .lines()
        .filter_map(|l| {
            l.split("bytes as generation ")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(!applied.is_empty());
    assert!(
        applied.windows(2).all(|w| w[0] < w[1]),
        "applied out of order: {applied:?}"
    );
    assert!(
        !agent.logs().contains("CONFIG refused (stale)"),
        "the agent never had to fence off an older generation"
    );
    assert_eq!(*applied.last().unwrap(), 100, "{applied:?}");
    // The final configuration is generation 100's content, and the SCM agrees.
    let cfg = dir.path().join("dev/backoffice.toml");
    let (code, out, err) = backoffice_with(&cfg, telnet, &["status", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("desired 100, applied 100 (up to date)"),
        "{out}"
    );
    let (_, history, _) = backoffice_with(&cfg, telnet, &["history", "1"]);
    let newest = history
        .lines()
        .find(|l| l.starts_with("generation 100 "))
        .unwrap_or_else(|| panic!("{history}"))
        .to_string();
    let current = std::fs::read_to_string(dir.path().join("dev/machine-1/config.current")).unwrap();
    let who = current
        .lines()
        .find_map(|l| l.strip_prefix("operator = "))
        .expect("operator line");
    assert!(
        newest.contains(&format!("by {who}")),
        "{newest} vs {current}"
    );
    // Every ACK reply names a distinct generation.
    let mut acked: Vec<&str> = all
        .iter()
        .filter_map(|r| r.strip_prefix("250 ACK machine 1 generation "))
        .map(|r| r.split(':').next().unwrap_or(""))
        .collect();
    let n = acked.len();
    acked.sort_unstable();
    acked.dedup();
    assert_eq!(acked.len(), n, "no generation ACKed twice");
}

/// `scm_database_writable` from one scrape of the SCM's `/metrics`.
fn writable(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect to metrics");
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send GET");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("read metrics");
    match text
        .lines()
        .find_map(|l| l.strip_prefix("scm_database_writable "))
    {
        Some("1") => true,
        Some("0") => false,
        other => panic!("scm_database_writable is {other:?} in:\n{text}"),
    }
}

#[test]
fn locked_database_is_a_clear_error_and_loses_nothing() {
    let (dir, password) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(
        dir.path(),
        &[
            ("SCM__DATABASE__BUSY_TIMEOUT_MS", "300".to_string()),
            ("SCM__LISTEN__METRICS", "127.0.0.1:0".to_string()),
        ],
    );
    let telnet = scm.listening("telnet");
    let metrics = scm.listening("metrics");
    assert!(writable(metrics), "a fresh database takes writes");
    let agent = Fleet::start_agent(dir.path(), 1, scm.listening("agents"), &[]);
    agent.wait_for("connected to SCM");
    let db = dir.path().join("dev/scm.db");
    let mut t = RawTelnet::connect(telnet);
    t.login("admin", &password);

    // Another process takes the write lock.
    let holder = rusqlite::Connection::open(&db).expect("open the SCM's database");
    holder.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    t.line("push 1");
    t.until("354 ");
    t.line("mode=locked");
    t.line(".");
    let reply = t.until("scm> ");
    assert!(
        reply.contains("451 database ")
            && reply.contains("database is locked; another process holds the database, try again"),
        "{reply}"
    );
    scm.wait_for("cannot write the audit log");
    assert!(!dir.path().join("dev/machine-1/config.current").exists());
    // The metric the DatabaseNotWritable alert watches says so while the lock is held.
    assert!(
        !writable(metrics),
        "scm_database_writable is 0 while locked"
    );
    holder.execute_batch("COMMIT").expect("unlock");
    drop(holder);
    assert!(writable(metrics), "scm_database_writable is 1 again");

    // Once the lock is gone the same push works, as generation 1: the failed one left
    // nothing behind.
    t.line("push 1");
    t.until("354 ");
    t.line("mode=locked");
    t.line(".");
    let reply = t.until("scm> ");
    assert!(reply.contains("250 ACK machine 1 generation 1:"), "{reply}");
    t.line("audit");
    let audit = t.until("scm> ");
    assert!(
        audit.contains("push machine 1 generation 1 (12 bytes): ack"),
        "{audit}"
    );
}

#[test]
fn read_only_database_stops_the_scm_with_a_clear_error() {
    let (dir, _pw) = Fleet::init(&[1]);
    // Create the database, then make it immutable (root ignores permission bits, not the
    // immutable attribute).
    let mut scm = Fleet::start_scm(dir.path(), &[]);
    scm.listening("telnet");
    scm.signal("TERM");
    assert_eq!(scm.wait_exit(), Some(0));
    let db = dir.path().join("dev/scm.db");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let chattr = |flag: &str| {
        let ok = Command::new("chattr")
            .args([flag, db.to_str().unwrap()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "chattr {flag} failed: this test needs root and a file system with the immutable attribute"
        );
    };
    chattr("+i");
    struct Unlock<'a>(&'a Path);
    impl Drop for Unlock<'_> {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(self.0).status();
        }
    }
    let _unlock = Unlock(&db);
    let cfg = dir.path().join("dev/scm.toml");
    let (code, out, err) = integration_tests::run(
        &bin("scm"),
        &["serve", "--config", cfg.to_str().unwrap()],
        &integration_tests::scm_env(),
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("scm.db") && (err.contains("read-only") || err.contains("readonly")),
        "{err}"
    );
    assert!(err.contains("fix its permissions"), "{err}");
}

#[test]
fn read_only_operator_push_is_refused_and_audited() {
    let (dir, password) = Fleet::init(&[1]);
    add_operators(dir.path(), &[("viewer", "read_only")]);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let telnet = scm.listening("telnet");
    let agent = Fleet::start_agent(dir.path(), 1, scm.listening("agents"), &[]);
    agent.wait_for("connected to SCM");
    let mut t = RawTelnet::connect(telnet);
    t.login("viewer", &password);
    for target in ["push 1", "push all", "push group:dev"] {
        t.line(target);
        let reply = t.until("scm> ");
        assert!(
            reply.contains("550 operator viewer is read-only and cannot push"),
            "{reply}"
        );
    }
    // Reading is allowed.
    t.line("status 1");
    assert!(t.until("scm> ").contains("211 "));
    t.line("audit");
    let audit = t.until("scm> ");
    for what in ["machine 1", "all", "group:dev"] {
        assert!(
            audit.contains("viewer from 127.0.0.1:")
                && audit.contains(&format!("push_refused {what}: read-only operator")),
            "{what}: {audit}"
        );
    }
    assert!(!dir.path().join("dev/machine-1/config.current").exists());
}

#[test]
fn fleet_push_to_a_group_and_to_all_with_progress() {
    let fleet = Fleet::start(&[1, 2, 3]);
    let dir = fleet.dir.path();
    let file = write(dir, "odd.cfg", "fleet=odd\n");
    let (code, out, err) = fleet.backoffice(&["push", "--target", "group:odd", "--file", &file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("progress: 2/2 ACK, 0 NACK, 0 pending"),
        "{err}"
    );
    assert!(out.contains("ACK machine 1 generation 1"), "{out}");
    assert!(out.contains("ACK machine 3 generation 1"), "{out}");
    assert!(!out.contains("machine 2"), "{out}");
    assert!(
        out.contains("250 group:odd: 2/2 ACK, 0 NACK, 0 pending"),
        "{out}"
    );
    for id in [1, 3] {
        assert_eq!(
            std::fs::read_to_string(fleet.agent_dir(id).join("config.current")).unwrap(),
            "fleet=odd\n"
        );
    }
    assert!(!fleet.agent_dir(2).join("config.current").exists());

    // Machine 3 goes away: a push to all reports it pending and the exit code says so.
    let mut agents = fleet.agents;
    let (_, mut a3) = agents.remove(2);
    a3.kill9();
    let file = write(dir, "all.cfg", "fleet=all\n");
    let (code, out, err) = backoffice_with(
        &dir.join("dev/backoffice.toml"),
        fleet.telnet,
        &["push", "--target", "all", "--file", &file],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("450 all: 2/3 ACK, 0 NACK, 1 pending"),
        "{out}{err}"
    );
    assert!(
        out.contains("machine 3 unreachable; generation 2 pending"),
        "{out}"
    );
    assert!(out.contains("ACK machine 2 generation 1"), "{out}");
    // Unknown group: refused before anything is read.
    let (code, _, err) = backoffice_with(
        &dir.join("dev/backoffice.toml"),
        fleet.telnet,
        &["push", "--target", "group:roof", "--file", &file],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("550 no machine is in group \"roof\"; known groups: dev, even, odd"),
        "{err}"
    );
    let (_, audit, _) = backoffice_with(&dir.join("dev/backoffice.toml"), fleet.telnet, &["audit"]);
    assert!(
        audit.contains("push group:odd (10 bytes): 2/2 ACK, 0 NACK, 0 pending"),
        "{audit}"
    );
}
