//! Scenarios (e) and (f): a rogue agent (garbage, a certificate from another CA, another
//! machine's identity claimed, HELLO replayed) and a slow agent that never reads. Both run
//! the `rogue-agent` test tool in its own container next to a healthy fleet.

use std::time::{Duration, Instant};

use crate::docker::{Container, Spec, enabled};
use crate::{AGENT_BASE, Fleet, ROGUE_HOST, Setup};

/// Scenario (f)'s bound: the SCM's resident memory while a slow agent floods it stays
/// below this, and grows by less than [`MEMORY_GROWTH_BOUND`] over its idle level.
pub const MEMORY_BOUND: u64 = 64 << 20;
/// Scenario (f): growth of the SCM's resident memory under the flood.
pub const MEMORY_GROWTH_BOUND: u64 = 32 << 20;
/// Scenario (f): a push to a healthy machine during the flood answers within this time.
pub const PUSH_WITHIN: Duration = Duration::from_secs(10);

/// Runs the rogue agent with `args` at `.ROGUE_HOST + n` and waits until it is done.
fn rogue(fleet: &Fleet, n: u8, args: &[&str]) -> Container {
    let spec = Spec::new(
        &format!("rogue-{n}"),
        "scm-hub/rogue-agent",
        ROGUE_HOST + n,
        &fleet.fleet_dir(),
    )
    .args(&["--scm", "scm:9300", "--dir", "/fleet"])
    .args(args);
    Container::run(&fleet.net, &spec)
}

/// Pushes a fresh configuration to each of `machines` and swipes a card at each, and
/// checks both arrive: the fleet works.
fn fleet_works(fleet: &Fleet, machines: &[u16], round: &str) {
    let ps = fleet.print_server.as_ref().expect("print server");
    for id in machines {
        let file = fleet.file(
            &format!("{round}-{id}.cfg"),
            &format!("round={round}\nmachine={id}\n"),
        );
        let t = Instant::now();
        let (code, out, err) =
            fleet.backoffice(&["push", "--machine", &id.to_string(), "--file", &file]);
        assert_eq!(code, 0, "machine {id} ACKs in round {round}: {out}{err}");
        assert!(
            t.elapsed() < PUSH_WITHIN,
            "push to machine {id} took {:?}",
            t.elapsed()
        );
        let card = format!("{}{id:03}", round.to_uppercase());
        fleet.swipe(*id, &card);
        ps.wait_stdout_n(&format!("CARD {card} "), 1);
    }
}

/// (e) A rogue agent sends garbage (no TLS; a frame of no known version; an oversize
/// frame), presents a certificate from a CA the SCM does not trust, claims machine 1's
/// id with machine 4's certificate, and replays its HELLO again and again: each is
/// refused, and the three real agents stay connected, keep their addresses, get their
/// configurations and deliver their swipes.
#[test]
fn e_rogue_agent_does_not_disturb_the_others() {
    if !enabled("e_rogue_agent_does_not_disturb_the_others") {
        return;
    }
    let mut fleet = Fleet::start_with(
        "e-rogue",
        &Setup {
            machines: &[1, 2, 3, 4],
            agents: &[1, 2, 3],
            ..Setup::default()
        },
    );
    fleet.start_print_server(&[1, 2, 3]);
    for (_, a) in &fleet.agents {
        a.wait_for("reader r1");
    }
    fleet_works(&fleet, &[1, 2, 3], "before");

    let garbage = rogue(&fleet, 1, &["--mode", "garbage"]);
    garbage.wait_stdout_n("DONE", 1);
    let foreign = rogue(&fleet, 2, &["--mode", "foreign-ca"]);
    foreign.wait_stdout_n("DONE", 1);
    let wrong = rogue(&fleet, 3, &["--mode", "wrong-id", "--claim", "1"]);
    wrong.wait_stdout_n("DONE", 1);
    let replay = rogue(&fleet, 4, &["--mode", "replay-hello", "--rounds", "20"]);
    replay.wait_stdout_n("DONE", 1);

    // What the rogue was told.
    let out = garbage.stdout();
    // Not TLS: at most a TLS alert, then the connection is closed.
    assert!(
        out.contains("STEP plain-garbage:") && out.contains("bytes then closed"),
        "{out}"
    );
    // Bytes that are no frame: refused (here the length they happen to declare is over the
    // link's limit) and closed.
    assert!(
        out.contains("STEP bad-bytes: frame") || out.contains("STEP bad-bytes: NACK"),
        "{out}"
    );
    // An unknown version is refused in a frame of that version (a v0/v1 message cannot be
    // decoded from it) and the link goes on: the HELLO after it is answered.
    assert!(
        out.contains("STEP bad-version: frame unsupported protocol version 9")
            && out.contains("then HELLO: ACK"),
        "{out}"
    );
    assert!(
        out.contains("STEP oversize: NACK NACK_REASON_MALFORMED"),
        "{out}"
    );
    let out = foreign.stdout();
    assert!(
        out.contains("STEP foreign-ca: handshake failed")
            || out.contains("STEP foreign-ca: closed")
            || out.contains("STEP foreign-ca: error"),
        "{out}"
    );
    let out = wrong.stdout();
    assert!(
        out.contains("STEP wrong-id: NACK NACK_REASON_WRONG_MACHINE_ID")
            && out.contains("then closed"),
        "{out}"
    );
    let out = replay.stdout();
    // A repeated HELLO from a machine's own certificate is harmless (answered again); it
    // only ever concerns machine 4.
    assert_eq!(out.matches("STEP replay-hello").count(), 20, "{out}");
    // What the SCM says about it.
    let log = fleet.scm.log();
    assert!(
        log.contains("frame names machine 1 but the certificate belongs to machine 4"),
        "the SCM names the impersonation"
    );
    assert!(
        log.contains("TLS handshake refused"),
        "the SCM names the refused handshakes"
    );

    // The real agents never noticed: one connection each, no link lost.
    for (id, a) in &fleet.agents {
        let log = a.log();
        assert_eq!(
            log.matches("connected to SCM at").count(),
            1,
            "agent {id} kept its one link"
        );
        assert!(!log.contains("link to the SCM lost"), "agent {id}");
    }
    // Machine 1 is still known at its own address, not the rogue's.
    let (code, out, err) = fleet.backoffice(&["status", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "link: connected from {}:",
            fleet.net.ip(AGENT_BASE + 1)
        )),
        "{out}"
    );
    fleet_works(&fleet, &[1, 2, 3], "after");
}

/// (f) A slow agent (machine 4's certificate) says HELLO and then floods the SCM with
/// swipes without ever reading a byte; its config port accepts and never reads either.
/// The SCM's resident memory stays below [`MEMORY_BOUND`] and grows by less than
/// [`MEMORY_GROWTH_BOUND`]; pushes to the other agents answer within [`PUSH_WITHIN`] and
/// their swipes arrive; a push to the slow machine ends (not ACKed) instead of hanging.
#[test]
fn f_slow_agent_that_never_reads_leaves_memory_bounded_and_others_unaffected() {
    if !enabled("f_slow_agent_that_never_reads_leaves_memory_bounded_and_others_unaffected") {
        return;
    }
    let mut fleet = Fleet::start_with(
        "f-slow",
        &Setup {
            machines: &[1, 2, 3, 4],
            agents: &[1, 2, 3],
            ..Setup::default()
        },
    );
    let mut timeline = vec![("started", fleet.scm.rss().unwrap_or(0))];
    fleet.start_print_server(&[1, 2, 3]);
    for (_, a) in &fleet.agents {
        a.wait_for("reader r1");
    }
    timeline.push(("print server", fleet.scm.rss().unwrap_or(0)));
    fleet_works(&fleet, &[1, 2, 3], "warm");
    let idle = fleet.scm.rss().expect("the SCM's resident memory");
    timeline.push(("warm", idle));
    let idle_stats = fleet.scm.stats_memory();

    let slow = rogue(
        &fleet,
        1,
        &[
            "--mode",
            "flood-no-read",
            "--seconds",
            "40",
            "--config-port",
            "9399",
        ],
    );
    slow.wait_stdout_n("STEP flood: HELLO sent", 1);
    // The SCM stops taking its frames once the socket buffers are full.
    slow.wait_stdout_n("the SCM stopped taking frames", 1);
    let mut peak = idle;
    let sample = |peak: &mut u64| {
        let rss = fleet.scm.rss().expect("the SCM runs");
        *peak = (*peak).max(rss);
        rss
    };
    timeline.push(("flood blocked", sample(&mut peak)));
    for round in ["flooda", "floodb", "floodc"] {
        fleet_works(&fleet, &[1, 2, 3], round);
        timeline.push((round, sample(&mut peak)));
    }
    // A push to the slow machine: its config port never reads; the SCM gives up in time.
    let file = fleet.file("slow.cfg", "for=the-slow-one\n");
    let t = Instant::now();
    let (code, out, err) = fleet.backoffice(&["push", "--machine", "4", "--file", &file]);
    assert_ne!(code, 0, "the slow machine cannot ACK: {out}{err}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "push to the slow machine ended after {:?}",
        t.elapsed()
    );
    timeline.push(("push to slow", sample(&mut peak)));
    slow.wait_stdout_n("STEP flood: ended", 1);
    timeline.push(("flood ended", sample(&mut peak)));
    eprintln!(
        "SCM RSS timeline (KiB): {:?}",
        timeline
            .iter()
            .map(|(k, v)| format!("{k} {}", v >> 10))
            .collect::<Vec<_>>()
    );
    let stats = fleet.scm.stats_memory();
    eprintln!(
        "SCM memory: idle {} KiB RSS ({idle_stats:?} B per docker stats), peak {} KiB RSS under the flood, {stats:?} B per docker stats at the end",
        idle >> 10,
        peak >> 10
    );
    assert!(
        peak < MEMORY_BOUND,
        "SCM resident memory {} MiB, bound {} MiB",
        peak >> 20,
        MEMORY_BOUND >> 20
    );
    assert!(
        peak.saturating_sub(idle) < MEMORY_GROWTH_BOUND,
        "SCM resident memory grew from {} MiB to {} MiB",
        idle >> 20,
        peak >> 20
    );
    assert!(fleet.scm.running(), "the SCM is still up");
    for (id, a) in &fleet.agents {
        assert_eq!(
            a.log().matches("connected to SCM at").count(),
            1,
            "agent {id} kept its one link"
        );
    }
}
