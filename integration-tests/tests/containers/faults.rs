//! Scenarios (a)-(d): the SCM killed mid-push, an agent cut off its network, the print
//! server restarting, and the SCM restarting under a connected fleet.

use std::time::{Duration, Instant};

use crate::docker::{Container, enabled};
use crate::{AGENT_BASE, Fleet, Setup};

/// How many times agent `c` logged that it stored generation `g` on disk.
fn stored_count(c: &Container, g: u64) -> usize {
    c.log()
        .lines()
        .filter(|l| l.contains("stored") && l.contains(&format!("bytes as generation {g}")))
        .count()
}

/// Scenario (d)'s promise: after an SCM restart every agent is back within this time.
pub const RECONNECT_WITHIN: Duration = Duration::from_secs(10);

/// (a) The SCM is killed (SIGKILL) after it sent a CONFIG and before it read the ACK, and
/// a new SCM container takes its place (same name, address and database): the push
/// converges, and the machine applies the configuration exactly once.
#[test]
fn a_scm_killed_mid_push_converges_and_applies_exactly_once() {
    if !enabled("a_scm_killed_mid_push_converges_and_applies_exactly_once") {
        return;
    }
    let fleet = Fleet::start_with(
        "a-kill",
        &Setup {
            machines: &[1, 2, 3],
            agents: &[1, 2, 3],
            scm_env: &[("SCM_FAILPOINTS", "scm-after-config-sent")],
            ..Setup::default()
        },
    );
    let file = fleet.file("a.cfg", "mode=first\n");
    let push = fleet.backoffice_spawn(&["push", "--machine", "1", "--file", &file]);
    // The CONFIG crossed the network and the agent stored it; the SCM stops before the ACK.
    fleet
        .scm
        .wait_for("failpoint scm-after-config-sent reached");
    fleet.agent(1).wait_for("bytes as generation 1");
    fleet.scm.kill();
    let out = push.wait_with_output().expect("back office");
    assert_ne!(
        out.status.code(),
        Some(0),
        "the push cannot have been reported done: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A new SCM container (no failpoint) with the same name, address and database.
    fleet.scm.remove();
    let scm = Container::run(&fleet.net, &Fleet::scm_spec(fleet.dir.path(), &[]));
    for (_, a) in &fleet.agents {
        a.wait_for_n("connected to SCM at scm:9300", 2);
    }
    scm.wait_for("machine reports generation 1 applied");
    let (code, out, err) = fleet.backoffice(&["status", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("desired 1, applied 1 (up to date)"), "{out}");
    // The same content again is no new generation and no second apply.
    let (code, out, err) = fleet.backoffice(&["push", "--machine", "1", "--file", &file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 1"), "{out}");
    assert_eq!(stored_count(fleet.agent(1), 1), 1, "applied exactly once");
    // The next generation goes through, once.
    let file2 = fleet.file("b.cfg", "mode=second\n");
    let (code, out, err) = fleet.backoffice(&["push", "--machine", "1", "--file", &file2]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 2"), "{out}");
    assert_eq!(stored_count(fleet.agent(1), 2), 1);
    assert_eq!(stored_count(fleet.agent(1), 1), 1);
}

/// (b) Agent 2 is cut off its network (`docker network disconnect`) while a configuration
/// is pushed to it and cards are swiped at it, then connected again: the pending
/// configuration arrives, and the swipes made during the cut expire at the agent instead
/// of reaching the print server late. The other agents carry on meanwhile.
#[test]
fn b_agent_cut_off_gets_the_pending_config_and_its_swipes_expire() {
    if !enabled("b_agent_cut_off_gets_the_pending_config_and_its_swipes_expire") {
        return;
    }
    let mut fleet = Fleet::start_with(
        "b-cut",
        &Setup {
            machines: &[1, 2, 3],
            agents: &[1, 2, 3],
            agent_env: &[("AGENT__SWIPES__TTL_MS", "3000")],
            ..Setup::default()
        },
    );
    fleet.start_print_server(&[1, 2, 3]);
    let ps = fleet.print_server.clone().expect("print server");
    fleet.agent(2).wait_for("reader r1");
    fleet.swipe(2, "BEFORE01");
    ps.wait_stdout_n("CARD BEFORE01", 1);

    let agent2 = fleet.agent(2).clone();
    agent2.disconnect();
    let file = fleet.file("cut.cfg", "mode=while-cut-off\n");
    let (code, out, err) = fleet.backoffice(&["push", "--machine", "2", "--file", &file]);
    assert_eq!(code, 2, "not ACKed while cut off: {out}{err}");
    assert!(
        format!("{out}{err}").contains("450 machine 2 unreachable; generation 1 pending"),
        "{out}{err}"
    );
    fleet.swipe(2, "CUTOFF01");
    fleet.swipe(2, "CUTOFF02");
    // Both expire at the agent (3 s lifetime) while it cannot reach the SCM.
    agent2.wait_for_n("swipe expired before the SCM acknowledged it; dropped", 2);
    // Meanwhile the others work.
    fleet.swipe(1, "DURING01");
    ps.wait_stdout_n("CARD DURING01", 1);
    // The SCM has given up the dead link (idle timeout) before the cable is back, so
    // nothing the agent wrote before the cut can still be read from that old connection.
    fleet.scm.wait_for("agent disconnected machine=2");

    agent2.reconnect();
    agent2.wait_for_n("connected to SCM at scm:9300", 2);
    agent2.wait_for("bytes as generation 1");
    let (code, out, err) = fleet.backoffice(&["status", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("desired 1, applied 1 (up to date)"), "{out}");
    assert_eq!(
        std::fs::read_to_string(fleet.fleet_dir().join("machine-2/config.current"))
            .expect("stored configuration"),
        "mode=while-cut-off\n"
    );
    // A swipe after the reconnect travels behind anything still queued at the agent: once
    // it arrived, a late delivery of the expired ones would have shown.
    fleet.swipe(2, "AFTER001");
    ps.wait_stdout_n("CARD AFTER001", 1);
    let seen = ps.stdout();
    assert!(
        !seen.contains("CUTOFF01") && !seen.contains("CUTOFF02"),
        "a swipe from the cut arrived late:\n{seen}"
    );
    assert_eq!(seen.matches("CARD BEFORE01").count(), 1, "{seen}");
    assert_eq!(seen.matches("CARD AFTER001").count(), 1, "{seen}");
}

/// (c) The print-server simulator is killed and started again: the Generic bridge takes
/// its new connection, a swipe made while it was away is delivered once when it is back,
/// and no swipe is delivered twice.
#[test]
fn c_print_server_restart_reconnects_and_delivers_each_swipe_once() {
    if !enabled("c_print_server_restart_reconnects_and_delivers_each_swipe_once") {
        return;
    }
    let mut fleet = Fleet::start("c-ps", &[1, 2]);
    fleet.start_print_server(&[1, 2]);
    let ps = fleet.print_server.clone().expect("print server");
    fleet.agent(1).wait_for("reader r1");
    fleet.swipe(1, "FIRST001");
    ps.wait_stdout_n("CARD FIRST001", 1);
    fleet.swipe(2, "FIRST002");
    ps.wait_stdout_n("CARD FIRST002", 1);

    ps.kill();
    // The bridge notices the peer is gone (the killed process's sockets are closed).
    fleet.scm.wait_for_n("disconnected", 2);
    fleet.swipe(1, "AWAY0001");
    fleet
        .agent(1)
        .wait_for_n("swipe acknowledged by the SCM", 2);
    ps.start();
    // Both runs' output is in the container's stdout: two connects per device.
    ps.wait_stdout_n("CONNECTED", 4);
    ps.wait_stdout_n("CARD AWAY0001", 1);
    fleet.swipe(1, "AFTER001");
    ps.wait_stdout_n("CARD AFTER001", 1);
    fleet.swipe(2, "AFTER002");
    ps.wait_stdout_n("CARD AFTER002", 1);
    let seen = ps.stdout();
    for card in ["FIRST001", "FIRST002", "AWAY0001", "AFTER001", "AFTER002"] {
        assert_eq!(
            seen.matches(&format!("CARD {card} ")).count(),
            1,
            "{card} delivered exactly once:\n{seen}"
        );
    }
    let (code, out, err) = fleet.backoffice(&["status", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "generic 1/r1: print server connected from {}",
            fleet.net.ip(crate::PRINT_SERVER_HOST)
        )),
        "{out}"
    );
}

/// Milliseconds of every `reconnecting to the SCM in N ms` line of a log.
fn reconnect_delays(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split("reconnecting to the SCM in ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// (d) The SCM restarts (SIGTERM, start) while every agent is connected: every agent is
/// back within [`RECONNECT_WITHIN`] (10 s), and their reconnects are jittered: the
/// delays the agents chose differ.
#[test]
fn d_scm_restart_brings_every_agent_back_in_time_with_jitter() {
    if !enabled("d_scm_restart_brings_every_agent_back_in_time_with_jitter") {
        return;
    }
    let machines = [1u16, 2, 3, 4, 5];
    let fleet = Fleet::start("d-restart", &machines);
    let started = Instant::now();
    fleet.scm.restart();
    fleet.scm.wait_for_n("(agents)", 2);
    for (_, a) in &fleet.agents {
        a.wait_for_n("connected to SCM at scm:9300", 2);
    }
    let took = started.elapsed();
    assert!(
        took <= RECONNECT_WITHIN,
        "every agent back within {RECONNECT_WITHIN:?}; took {took:?}"
    );
    let mut first_delays = Vec::new();
    for (id, a) in &fleet.agents {
        let d = reconnect_delays(&a.log());
        assert!(!d.is_empty(), "agent {id} logged its reconnect delay");
        // Back-off starts at 500 ms with jitter in its upper half.
        assert!(
            d.iter().all(|ms| (250..=3000).contains(ms)),
            "agent {id}: {d:?}"
        );
        first_delays.push(d[0]);
    }
    first_delays.sort_unstable();
    first_delays.dedup();
    assert!(
        first_delays.len() >= 3,
        "reconnect delays of {} agents are jittered, not lock-step: {first_delays:?}",
        machines.len()
    );
    eprintln!(
        "all {} agents back {took:?} after the restart began; first reconnect delays {first_delays:?} ms",
        machines.len()
    );
    // And the SCM knows every one of them at its container address again.
    for id in machines {
        let addr = fleet
            .net
            .ip(AGENT_BASE + u8::try_from(id).expect("small id"));
        let (code, out, err) = fleet.backoffice(&["status", &id.to_string()]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains(&format!("link: connected from {addr}:")),
            "machine {id} at {addr}: {out}"
        );
    }
    let file = fleet.file("all.cfg", "after=restart\n");
    let (code, out, err) = fleet.backoffice(&["push", "--target", "all", "--file", &file]);
    assert_eq!(code, 0, "every machine ACKs after the restart: {out}{err}");
}
