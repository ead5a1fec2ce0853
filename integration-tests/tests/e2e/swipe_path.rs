//! The swipe path at its limits, between real processes: a swipe refused as BUSY is
//! delivered when resent (also after an SCM restart); an acknowledged swipe queued for an
//! absent print server survives kill -9 of the SCM and arrives once (also over a loop of
//! kills), and the agent's copy of it is a duplicate; a flood of BUSY retries keeps one journal row per swipe and
//! the write-ahead log bounded; two print servers fighting over one device are held off;
//! the `v` answer never glues onto a card line.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use integration_tests::{Fleet, WAIT};
use scm_certs::identity::Identity;
use scm_proto::v1::{self, Message, NackReason};

use crate::{FrameClient, dev_pems, init, rt};

/// Connects as machine 1 (its certificate) and says HELLO.
async fn agent_link(dev: &Path, addr: SocketAddr) -> FrameClient {
    let pems = dev_pems(dev, "machine-1");
    let mut c = FrameClient::connect(addr, &pems, Identity::Scm)
        .await
        .expect("connect as machine 1");
    let hello = Message::Hello(v1::Hello {
        request_id: 1,
        ..Default::default()
    });
    c.send(&scm_proto::reply_frame(&hello, 1)).await.unwrap();
    let answer = Message::decode(&c.recv().await.unwrap().expect("HELLO answered"));
    assert!(matches!(answer, Ok(Message::Ack(_))), "{answer:?}");
    c
}

/// Sends one SWIPE from machine 1's reader r1 and returns the answer.
async fn send_swipe(c: &mut FrameClient, request_id: u64, event_id: &str, card: &str) -> Message {
    let s = Message::Swipe(v1::Swipe {
        request_id,
        event_id: event_id.into(),
        reader_id: "r1".into(),
        card: card.into(),
        swiped_at_unix_ms: 1,
        ttl_ms: 30_000,
        sent_at_unix_ms: 0,
    });
    c.send(&scm_proto::reply_frame(&s, 1)).await.unwrap();
    Message::decode(&c.recv().await.unwrap().expect("SWIPE answered")).expect("decodes")
}

fn ack_detail(m: &Message) -> &str {
    match m {
        Message::Ack(a) => &a.detail,
        other => panic!("expected ACK, got {other:?}"),
    }
}

fn is_busy(m: &Message) -> bool {
    matches!(m, Message::Nack(n) if n.reason() == NackReason::Busy)
}

#[test]
fn a_swipe_refused_busy_is_delivered_when_resent_after_a_restart_and_a_queued_one_once() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    // One swipe fills the device's queue (no print server is connected yet).
    let env = [("SCM__BRIDGE__QUEUE_MAX", "1".to_string())];
    let mut scm = Fleet::start_scm(dir.path(), &env);
    let agents = scm.listening("agents");
    rt().block_on(async {
        let mut c = agent_link(&dev, agents).await;
        let held = send_swipe(&mut c, 2, "e-held", "HELD0001").await;
        assert!(ack_detail(&held).contains("queued"), "{held:?}");
        for r in 3..6 {
            let busy = send_swipe(&mut c, r, "e-busy", "BUSY0002").await;
            assert!(is_busy(&busy), "{busy:?}");
        }
    });
    // Every answer above was sent after the journal's commit it depends on.
    scm.kill9();

    let scm = Fleet::start_scm(dir.path(), &env);
    let agents = scm.listening("agents");
    let port = scm.listening("generic 1/r1");
    scm.wait_for("recent event ids loaded");
    scm.wait_for("1 queued swipes queued again after the restart");
    rt().block_on(async {
        let mut c = agent_link(&dev, agents).await;
        // Queued before the restart: queued again by the SCM itself (it fills the
        // device's queue of 1), so the agent's copy is a duplicate.
        let held = send_swipe(&mut c, 3, "e-held", "HELD0001").await;
        assert!(ack_detail(&held).contains("duplicate"), "{held:?}");
    });
    let s = crate::swipes::sim(port, &[]);
    s.wait_stdout("CARD HELD0001");
    rt().block_on(async {
        let mut c = agent_link(&dev, agents).await;
        // Refused before the restart: taken now.
        let again = send_swipe(&mut c, 2, "e-busy", "BUSY0002").await;
        let detail = ack_detail(&again);
        assert!(
            !detail.contains("duplicate"),
            "a swipe refused as BUSY was dropped as a duplicate: {detail}"
        );
    });
    s.wait_stdout("CARD BUSY0002");
    rt().block_on(async {
        let mut c = agent_link(&dev, agents).await;
        let after = send_swipe(&mut c, 2, "e-after", "AFTER003").await;
        assert!(ack_detail(&after).contains("queued"), "{after:?}");
    });
    s.wait_stdout("CARD AFTER003");
    let out = s.stdout();
    assert_eq!(out.matches("CARD BUSY0002").count(), 1, "{out}");
    assert_eq!(out.matches("CARD HELD0001").count(), 1, "{out}");
}

/// Journal rows, distinct event ids, and rows per outcome of the SCM's database.
fn journal_counts(db: &Path) -> (i64, i64, Vec<(String, i64)>) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the SCM's database");
    c.busy_timeout(WAIT).unwrap();
    let (rows, ids) = c
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM swipes",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mut st = c
        .prepare("SELECT outcome, COUNT(*) FROM swipes GROUP BY outcome ORDER BY outcome")
        .unwrap();
    let by = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (rows, ids, by)
}

#[test]
fn a_flood_of_busy_retries_keeps_one_journal_row_per_swipe_and_the_wal_bounded() {
    const SWIPES: i64 = 300;
    const WAL_MAX: u64 = 32 * 1024 * 1024;
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let scm = Fleet::start_scm(dir.path(), &[("SCM__BRIDGE__QUEUE_MAX", "1".into())]);
    let agents = scm.listening("agents");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents,
        &[("AGENT__SWIPES__TTL_MS", "6000".into())],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    // The peak size of the write-ahead log while the agent retries.
    let wal = dev.join("scm.db-wal");
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                peak.fetch_max(len, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // No print server: the first swipe fills the queue, every other one is refused as
    // BUSY and retried by the agent about every 200 ms until it expires there.
    let batch: String = (0..SWIPES).map(|i| format!("F{i:07}\n")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dev.join("machine-1-r1.fifo"))
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    // The queued swipe expires at the SCM when the others expire at the agent; one that
    // the agent retried in the last moment may find the queue free and expire at the SCM
    // too. Every swipe ends one way or the other.
    scm.wait_for("swipe expired undelivered");
    let deadline = Instant::now() + WAIT;
    let acked = loop {
        let logs = agent.logs();
        let acked = logs.matches("swipe acknowledged by the SCM").count() as i64;
        let expired = logs
            .matches("swipe expired before the SCM acknowledged it")
            .count() as i64;
        if acked + expired == SWIPES {
            break acked;
        }
        assert!(
            Instant::now() < deadline,
            "{acked} acknowledged, {expired} expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    // The last refusals and outcomes may still be on their way to the database.
    let db = dev.join("scm.db");
    let deadline = Instant::now() + WAIT;
    let (ids, by) = loop {
        let (rows, ids, by) = journal_counts(&db);
        assert!(
            rows <= SWIPES,
            "{rows} journal rows for {SWIPES} swipes: {by:?}"
        );
        let count = |o: &str| by.iter().find(|(k, _)| k == o).map_or(0, |(_, n)| *n);
        // Every swipe the agent heard ACKed expires at the SCM (no print server); so may
        // one whose ACK reached the agent after its own time to live had run out (a
        // loaded machine), which the agent then counts as expired.
        if rows == SWIPES && count("busy") + count("expired") == SWIPES && count("expired") >= acked
        {
            break (ids, by);
        }
        assert!(Instant::now() < deadline, "{rows} rows: {by:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ids, SWIPES);
    assert_eq!(by.len(), 2, "only busy and expired rows: {by:?}");
    assert!(
        peak < WAL_MAX,
        "the write-ahead log grew to {peak} bytes (bound {WAL_MAX})"
    );
}

/// Keeps connecting to `addr` as a print server that always reconnects at once, until
/// `stop`; counts its connections.
fn flapper(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::SeqCst) {
            let Ok(mut c) = TcpStream::connect(addr) else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            c.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = c.write_all(b"\r");
            // Until the SCM closes it (or the test ends).
            loop {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    })
}

fn metrics(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn two_print_servers_on_one_device_are_held_off_with_one_log_line_and_a_metric() {
    let (dir, _pw) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__LISTEN__METRICS", "127.0.0.1:0".to_string())],
    );
    let port = scm.listening("generic 1/r1");
    let metrics_addr = scm.listening("metrics");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let a = flapper(port, stop.clone(), count.clone());
    let b = flapper(port, stop.clone(), count.clone());
    let line = scm.wait_for("flapping");
    assert!(line.contains("1/r1"), "{line}");
    // Long enough for several hold-offs to end and the fight to start again.
    let deadline = Instant::now() + WAIT;
    while count.load(Ordering::SeqCst) < 3000 {
        assert!(
            Instant::now() < deadline,
            "only {} connections",
            count.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    a.join().unwrap();
    b.join().unwrap();
    let connections = count.load(Ordering::SeqCst);
    let logs = scm.logs();
    let lines = logs
        .lines()
        .filter(|l| l.contains("device=1/r1") && l.contains("print server"))
        .count() as u64;
    assert!(
        lines * 20 < connections,
        "{lines} log lines for {connections} connections"
    );
    let m = metrics(metrics_addr);
    let flaps = m
        .lines()
        .find(|l| l.starts_with("scm_bridge_flapping_total{device=\"1/r1\"}"))
        .unwrap_or_else(|| panic!("no flapping metric:\n{m}"));
    let n: u64 = flaps
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(n >= 1, "{flaps}");
    // After the fight, a print server connects and gets the next swipe.
    let s = crate::swipes::sim(port, &[]);
    s.wait_stdout("CONNECTED");
}

#[test]
fn the_version_answer_is_only_for_v_and_never_glues_onto_a_card_line() {
    let fleet = Fleet::start(&[1]);
    let port = fleet.scm.listening("generic 1/r1");
    fleet.agent(1).wait_for("reader r1");
    let mut c = TcpStream::connect(port).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    fleet.scm.wait_for("print server 127.0.0.1:");
    // Probes, `e` and `b` are not answered; the `v` is, once.
    c.write_all(b"\rrfid prompt").unwrap();
    c.write_all(b"\re").unwrap();
    c.write_all(b"\rb").unwrap();
    c.write_all(b"\rv").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("SCM-Generic-1.0\r") {
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "closed after {got:?}");
        got.extend_from_slice(&b[..n]);
    }
    integration_tests::swipe(&fleet.dev(), 1, "VCARD001");
    while !got.ends_with(b"VCARD001\n") {
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "closed after {got:?}");
        got.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(
        text.matches("SCM-Generic-1.0").count(),
        1,
        "one answer, to the `v` only: {text:?}"
    );
    // A print server that splits on LF alone sees the card on a line of its own.
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        lines.contains(&"VCARD001"),
        "the card is glued to other bytes for a reader splitting on LF: {text:?}"
    );
    // And the answer is never LF-terminated text of its own (no card look-alike).
    assert!(
        lines
            .iter()
            .all(|l| *l == "VCARD001" || l.is_empty() || l.ends_with('\r')),
        "{text:?}"
    );
}

/// Sends `cards` as SWIPEs (event id `e-<card>`) on one link to `agents`; every one must
/// be ACKed as queued (no print server is connected: none is written yet).
fn swipe_queued(dev: &Path, agents: SocketAddr, cards: &[String]) {
    rt().block_on(async {
        let mut c = agent_link(dev, agents).await;
        for (i, card) in cards.iter().enumerate() {
            let m = send_swipe(&mut c, i as u64 + 2, &format!("e-{card}"), card).await;
            assert!(ack_detail(&m).contains("queued"), "{card}: {m:?}");
        }
    });
}

/// How many times each card reached the print server, over all the simulators' outputs.
fn card_counts(outputs: &[String], cards: &[String]) -> Vec<(String, usize)> {
    cards
        .iter()
        .map(|c| {
            let line = format!("CARD {c} FROM");
            (
                c.clone(),
                outputs.iter().map(|o| o.matches(&line).count()).sum(),
            )
        })
        .collect()
}

#[test]
fn acknowledged_swipes_queued_for_an_absent_print_server_survive_kill_9_and_arrive_once() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let mut scm = Fleet::start_scm(dir.path(), &[]);
    let cards: Vec<String> = (0..10).map(|i| format!("KEEP{i:04}")).collect();
    swipe_queued(&dev, scm.listening("agents"), &cards);
    // ACKed, queued, no print server: the SCM dies within their time to live.
    scm.kill9();
    let scm = Fleet::start_scm(dir.path(), &[]);
    let port = scm.listening("generic 1/r1");
    let s = crate::swipes::sim(port, &[]);
    for c in &cards {
        s.wait_stdout(&format!("CARD {c} FROM"));
    }
    // Nothing more arrives: a swipe sent after them comes next, and each card came once.
    rt().block_on(async {
        let mut c = agent_link(&dev, scm.listening("agents")).await;
        let m = send_swipe(&mut c, 2, "e-after", "AFTER001").await;
        assert!(ack_detail(&m).contains("queued"), "{m:?}");
    });
    s.wait_stdout("CARD AFTER001");
    let counts = card_counts(&[s.stdout()], &cards);
    assert!(counts.iter().all(|(_, n)| *n == 1), "{counts:?}");
    // The journal learns each outcome from the bridge a moment after the write (its writer
    // batches them): wait for the last one, within the bound.
    let deadline = std::time::Instant::now() + integration_tests::WAIT;
    loop {
        let (_, _, by) = journal_counts(&dev.join("scm.db"));
        if by == vec![("delivered".to_string(), 11)] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{by:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn five_kill_9s_with_queued_swipes_lose_none_and_deliver_none_twice() {
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 8;
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    // What every print-server simulator printed, and every card swiped.
    let mut outputs = Vec::new();
    let mut cards = Vec::new();
    // The cards the SCM held queued when it was last killed.
    let mut held: Vec<String> = Vec::new();
    let mut scm = Fleet::start_scm(dir.path(), &[]);
    for round in 0..=ROUNDS {
        let agents = scm.listening("agents");
        let port = scm.listening("generic 1/r1");
        // The print server is back (0.5 to 3 s after the kill in the field): it gets the
        // swipes the SCM had queued before it died...
        let s = crate::swipes::sim(port, &[]);
        for c in &held {
            s.wait_stdout(&format!("CARD {c} FROM"));
        }
        if round == ROUNDS {
            let m = rt().block_on(async {
                let mut c = agent_link(&dev, agents).await;
                send_swipe(&mut c, 2, "e-last", "LAST0001").await
            });
            assert!(ack_detail(&m).contains("queued"), "{m:?}");
            s.wait_stdout("CARD LAST0001");
            outputs.push(s.stdout());
            break;
        }
        // ...and fresh ones at once.
        let live: Vec<String> = (0..PER_ROUND).map(|i| format!("L{round}X{i:03}")).collect();
        swipe_queued(&dev, agents, &live);
        for c in &live {
            s.wait_stdout(&format!("CARD {c} FROM"));
        }
        cards.extend(live);
        // It goes away; swipes acknowledged meanwhile wait in the SCM's queue...
        let out = s.stdout();
        drop(s);
        outputs.push(out);
        scm.wait_for("disconnected device=1/r1");
        held = (0..PER_ROUND).map(|i| format!("Q{round}X{i:03}")).collect();
        swipe_queued(&dev, agents, &held);
        cards.extend(held.iter().cloned());
        // ...when the SCM is killed.
        scm.kill9();
        scm = Fleet::start_scm(dir.path(), &[]);
    }
    let counts = card_counts(&outputs, &cards);
    let lost: Vec<_> = counts.iter().filter(|(_, n)| *n == 0).collect();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| *n > 1).collect();
    eprintln!(
        "{} swipes over {ROUNDS} kills: {} lost, {} delivered more than once",
        cards.len(),
        lost.len(),
        twice.len()
    );
    assert!(
        lost.is_empty() && twice.is_empty(),
        "lost {lost:?}, twice {twice:?}"
    );
}
