//! Card swipes end to end: a reader at the agent (the FIFO init-dev sets up, or a network
//! reader) -> agent -> mutual TLS -> SCM -> Generic bridge -> print-server simulator, with
//! validation, masking, expiry, de-duplication across an SCM restart, allow lists and
//! bounded memory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use integration_tests::{Fleet, Proc, WAIT, backoffice_with, bin, run, swipe};
use scm_certs::identity::Identity;
use scm_proto::v1::{self, Message, NackReason};

use crate::{FrameClient, dev_pems, init, rt};

/// Starts the print-server simulator against one device port.
pub(crate) fn sim(addr: SocketAddr, extra: &[&str]) -> Proc {
    let a = addr.to_string();
    let mut args = vec!["--connect", a.as_str(), "--keepalive-ms", "200"];
    args.extend_from_slice(extra);
    Proc::spawn("print-server-sim", &bin("print-server-sim"), &args, &[])
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn swipe_from_the_fifo_reaches_the_print_server_masked_everywhere_else() {
    let fleet = Fleet::start(&[1, 2]);
    let dev = fleet.dev();
    let port1 = fleet.scm.listening("generic 1/r1");
    let port2 = fleet.scm.listening("generic 2/r1");
    fleet.agent(1).wait_for("reader r1");
    let s1 = sim(port1, &["--version-probe"]);
    let s2 = sim(port2, &[]);
    s1.wait_stdout("CONNECTED");
    s2.wait_stdout("CONNECTED");
    // The bridge answers the version probe with a CR-terminated string, never with LF.
    s1.wait_stdout("OTHER");

    swipe(&dev, 1, "12345678");
    s1.wait_stdout("CARD 12345678 FROM");
    fleet.agent(1).wait_for("swipe acknowledged by the SCM");
    // Debounce: the same card on the same reader right away counts once.
    swipe(&dev, 1, "12345678");
    fleet.agent(1).wait_for("repeat within the debounce window");
    swipe(&dev, 1, "EMP123");
    s1.wait_stdout("CARD EMP123 FROM");
    assert_eq!(s1.stdout().matches("CARD 12345678").count(), 1);
    assert!(
        !s2.stdout().contains("CARD"),
        "machine 2's device got nothing"
    );

    // Masked in the SCM's and the agent's logs and in the listing.
    fleet.scm.wait_for("swipe accepted");
    for (name, logs) in [("scm", fleet.scm.logs()), ("agent", fleet.agent(1).logs())] {
        assert!(
            !logs.contains("12345678"),
            "{name} logged a full card number:\n{logs}"
        );
        assert!(
            logs.contains("****5678"),
            "{name} logs the masked card:\n{logs}"
        );
    }
    let listing = (0..50)
        .map(|_| fleet.backoffice(&["swipes"]).1)
        .find(|out| out.contains("delivered") && out.matches("generic 1/r1").count() >= 2)
        .expect("swipes lists the delivered swipes");
    assert!(listing.contains("****5678"), "{listing}");
    assert!(!listing.contains("12345678"), "{listing}");
    let (code, status, _) = fleet.backoffice(&["status", "1"]);
    assert_eq!(code, 0);
    assert!(status.contains("readers: r1"), "{status}");
    assert!(
        status.contains("generic 1/r1: print server connected from 127.0.0.1:"),
        "{status}"
    );
}

#[test]
fn invalid_cards_are_refused_at_the_agent() {
    let fleet = Fleet::start(&[1]);
    let port = fleet.scm.listening("generic 1/r1");
    let s = sim(port, &[]);
    s.wait_stdout("CONNECTED");
    let dev = fleet.dev();
    swipe(&dev, 1, "1234 5678");
    swipe(&dev, 1, "12\u{7}34");
    swipe(&dev, 1, &"9".repeat(65));
    swipe(&dev, 1, &"8".repeat(300));
    fleet.agent(1).wait_for_n("swipe refused", 4);
    let logs = fleet.agent(1).logs();
    assert!(logs.contains("space"), "{logs}");
    assert!(logs.contains("control character"), "{logs}");
    assert!(logs.contains("at most 64"), "{logs}");
    assert!(logs.contains("longer than"), "{logs}");
    swipe(&dev, 1, "GOOD1234");
    s.wait_stdout("CARD GOOD1234");
    assert_eq!(
        s.stdout().matches("CARD ").count(),
        1,
        "only the valid card: {}",
        s.stdout()
    );
}

#[test]
fn a_swipe_waits_for_a_print_server_then_expires_and_is_never_delivered_late() {
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents = scm.listening("agents");
    let port = scm.listening("generic 1/r1");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents,
        &[("AGENT__SWIPES__TTL_MS", "1500".into())],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    // Waits while no print server is connected: delivered when one connects in time.
    swipe(&dev, 1, "WAIT0001");
    agent.wait_for("swipe acknowledged by the SCM");
    let s = sim(port, &[]);
    s.wait_stdout("CARD WAIT0001");
    drop(s);
    // Once the SCM has seen the print server go (a card written in between would sit in
    // a dead socket's buffer: the swipe-path issue), this one finds no print server within
    // its lifetime.
    scm.wait_for("disconnected device=1/r1");
    swipe(&dev, 1, "LATE0002");
    agent.wait_for_n("swipe acknowledged by the SCM", 2);
    scm.wait_for("expired");
    let s = sim(port, &[]);
    s.wait_stdout("CONNECTED");
    swipe(&dev, 1, "NEXT0003");
    s.wait_stdout("CARD NEXT0003");
    assert!(
        !s.stdout().contains("LATE0002"),
        "an expired swipe was delivered late"
    );
    let cfg = dev.join("backoffice.toml");
    let telnet = scm.listening("telnet");
    let (_, out, _) = backoffice_with(&cfg, telnet, &["swipes"]);
    let late = out
        .lines()
        .find(|l| l.contains("****0002"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(late.contains("expired"), "{late}");
}

#[test]
fn print_server_from_an_unlisted_address_is_refused() {
    let fleet = Fleet::start(&[1]);
    let port = fleet.scm.listening("generic 1/r1");
    let intruder = sim(port, &["--bind-ip", "127.0.0.2"]);
    fleet.scm.wait_for("127.0.0.2");
    intruder.wait_stdout("DISCONNECTED");
    let ok = sim(port, &[]);
    ok.wait_stdout("CONNECTED");
    swipe(&fleet.dev(), 1, "ALLOW001");
    ok.wait_stdout("CARD ALLOW001");
    assert!(!intruder.stdout().contains("CARD"), "{}", intruder.stdout());
}

#[test]
fn megabytes_of_probe_bytes_keep_memory_bounded() {
    let fleet = Fleet::start(&[1]);
    let port = fleet.scm.listening("generic 1/r1");
    let pid = fleet.scm.pid();
    let before = rss_kib(pid);
    let mut c = TcpStream::connect(port).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..(64 * 1024 * 1024 / chunk.len()) {
        c.write_all(&chunk).unwrap();
    }
    c.write_all(b"\r").unwrap();
    // The same connection still gets the next swipe: the bridge read and discarded it all.
    swipe(&fleet.dev(), 1, "FLOOD001");
    let mut got = Vec::new();
    let mut b = [0u8; 64];
    while !got.ends_with(b"\n") {
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "closed");
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(got, b"FLOOD001\n");
    let after = rss_kib(pid);
    assert!(
        after < before + 16 * 1024,
        "64 MiB of probe bytes grew the SCM from {before} KiB to {after} KiB"
    );
}

#[test]
fn unacknowledged_swipes_survive_an_scm_restart_once_and_expired_ones_never_arrive() {
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let mut scm = Fleet::start_scm(dir.path(), &[]);
    let agents = scm.listening("agents");
    let port = scm.listening("generic 1/r1");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents,
        &[("AGENT__SWIPES__TTL_MS", "4000".into())],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    let s = sim(port, &[]);
    s.wait_stdout("CONNECTED");
    swipe(&dev, 1, "BEFORE01");
    s.wait_stdout("CARD BEFORE01");
    // The print server may read the card before the ACK reaches the agent: wait for the
    // ACK, or a kill in between leaves BEFORE01 unacknowledged (it then expires at the
    // agent, as it should, and the count below would be off by one).
    agent.wait_for("swipe acknowledged by the SCM");

    // The SCM dies; swipes made meanwhile wait at the agent.
    scm.kill9();
    agent.wait_for("link to the SCM lost");
    swipe(&dev, 1, "STALE001");
    agent.wait_for("swipe expired before the SCM acknowledged it");
    swipe(&dev, 1, "FRESH001");
    agent.wait_for_n("swipe queued", 3);

    // Restart on the same ports (the generic port is in the file).
    let toml = dev.join("scm.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{port}\""));
    std::fs::write(&toml, text).unwrap();
    let scm2 = Fleet::start_scm(dir.path(), &[("SCM__LISTEN__AGENTS", agents.to_string())]);
    scm2.listening("generic 1/r1");
    s.wait_stdout("CARD FRESH001");
    agent.wait_for_n("swipe acknowledged by the SCM", 2);
    swipe(&dev, 1, "AFTER001");
    s.wait_stdout("CARD AFTER001");
    let out = s.stdout();
    assert_eq!(out.matches("CARD FRESH001").count(), 1, "{out}");
    assert_eq!(out.matches("CARD BEFORE01").count(), 1, "{out}");
    assert!(!out.contains("STALE001"), "{out}");
}

#[test]
fn flapping_network_reader_delivers_every_card_once() {
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    // A network card reader in Generic/server mode that drops the connection after each card.
    let reader = TcpListener::bind("127.0.0.1:0").unwrap();
    let reader_addr = reader.local_addr().unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(dev.join("agent-1.toml"))
        .unwrap()
        .write_all(
            format!(
                "\n[[reader]]\nid = \"net\"\nkind = \"network\"\naddress = \"{reader_addr}\"\n"
            )
            .as_bytes(),
        )
        .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(dev.join("scm.toml"))
        .unwrap()
        .write_all(b"\n[[generic]]\nmachine = 1\nreader = \"net\"\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]\n")
        .unwrap();
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents = scm.listening("agents");
    let port = scm.listening("generic 1/net");
    let s = sim(port, &[]);
    s.wait_stdout("CONNECTED");
    let agent = Fleet::start_agent(dir.path(), 1, agents, &[]);
    agent.wait_for("connected to SCM");
    let cards = ["NET00001", "NET00002", "NET00003", "NET00004", "NET00005"];
    let feeder = std::thread::spawn(move || {
        for card in cards {
            let (mut c, _) = reader.accept().unwrap();
            c.write_all(b"ping\r\nSTATUS OK\r\n").unwrap();
            c.write_all(format!("{card}\r\n").as_bytes()).unwrap();
            // Flap: close right after the card.
            drop(c);
        }
    });
    for card in cards {
        s.wait_stdout(&format!("CARD {card}"));
    }
    feeder.join().unwrap();
    let out = s.stdout();
    for card in cards {
        assert_eq!(out.matches(&format!("CARD {card}")).count(), 1, "{out}");
    }
    assert!(!out.contains("ping") && !out.contains("STATUS"), "{out}");
    assert!(agent.logs().contains("reader net connected to"));
}

#[test]
fn swipe_frame_with_another_machine_id_is_refused() {
    init();
    let fleet = Fleet::start(&[1, 2]);
    let port = fleet.scm.listening("generic 2/r1");
    let s = sim(port, &[]);
    s.wait_stdout("CONNECTED");
    let m1 = dev_pems(&fleet.dev(), "machine-1");
    rt().block_on(async {
        let mut c = FrameClient::connect(fleet.agents_addr, &m1, Identity::Scm)
            .await
            .unwrap();
        let hello = Message::Hello(v1::Hello {
            request_id: 1,
            ..Default::default()
        });
        c.send(&scm_proto::reply_frame(&hello, 1)).await.unwrap();
        assert!(matches!(
            Message::decode(&c.recv().await.unwrap().unwrap()),
            Ok(Message::Ack(_))
        ));
        // Machine 1's certificate, a SWIPE that claims to come from machine 2.
        let swipe = Message::Swipe(v1::Swipe {
            request_id: 2,
            event_id: "e1".into(),
            reader_id: "r1".into(),
            card: "SPOOF123".into(),
            swiped_at_unix_ms: 1,
            ttl_ms: 5_000,
            sent_at_unix_ms: 0,
        });
        c.send(&scm_proto::reply_frame(&swipe, 2)).await.unwrap();
        match Message::decode(&c.recv().await.unwrap().unwrap()) {
            Ok(Message::Nack(n)) => {
                assert_eq!((n.request_id, n.reason()), (2, NackReason::WrongMachineId));
            }
            other => panic!("{other:?}"),
        }
        // An invalid card from the right machine is refused at the SCM too.
        let bad = Message::Swipe(v1::Swipe {
            request_id: 3,
            event_id: "e2".into(),
            reader_id: "r1".into(),
            card: "BAD CARD".into(),
            swiped_at_unix_ms: 1,
            ttl_ms: 5_000,
            sent_at_unix_ms: 0,
        });
        c.send(&scm_proto::reply_frame(&bad, 1)).await.unwrap();
        match Message::decode(&c.recv().await.unwrap().unwrap()) {
            Ok(Message::Nack(n)) => {
                assert_eq!((n.request_id, n.reason()), (3, NackReason::InvalidCard))
            }
            other => panic!("{other:?}"),
        }
    });
    // Machine 2's print server never saw the spoofed card.
    swipe(&fleet.dev(), 2, "REAL2222");
    s.wait_stdout("CARD REAL2222");
    assert!(!s.stdout().contains("SPOOF123"));
}

#[test]
fn a_print_server_that_never_reads_is_cut_off_and_memory_stays_bounded() {
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let scm = Fleet::start_scm(
        dir.path(),
        &[
            ("SCM__BRIDGE__WRITE_TIMEOUT_MS", "500".into()),
            ("SCM__BRIDGE__QUEUE_MAX", "32".into()),
        ],
    );
    let agents = scm.listening("agents");
    let port = scm.listening("generic 1/r1");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents,
        &[
            ("AGENT__SWIPES__TTL_MS", "3000".into()),
            ("AGENT__SWIPES__QUEUE_MAX", "5000".into()),
        ],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    // A print server with a tiny receive window that never reads: the SCM's writes block.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(1024).unwrap();
    sock.connect(&port.into()).unwrap();
    let stuck: TcpStream = sock.into();
    scm.wait_for("print server 127.0.0.1:");
    let before = rss_kib(scm.pid());
    // Long distinct cards until the connection's buffers are full.
    let mut batch = String::new();
    for i in 0..4000 {
        batch.push_str(&format!("{i:064}\n"));
    }
    let fifo = dev.join("machine-1-r1.fifo");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    let line = scm.wait_for("write did not complete within 500 ms");
    assert!(line.contains("device=1/r1"), "{line}");
    // Swipes that found no reader in time expire rather than pile up.
    scm.wait_for("expired");
    let after = rss_kib(scm.pid());
    assert!(
        after < before + 32 * 1024,
        "the SCM grew from {before} KiB to {after} KiB"
    );
    drop(stuck);
    // A print server that reads gets the next swipe.
    let s = sim(port, &[]);
    s.wait_stdout("CONNECTED");
    swipe(&dev, 1, "READER01");
    s.wait_stdout("CARD READER01");
    let (code, status, _) = run(
        &bin("backoffice"),
        &[
            "--config",
            dev.join("backoffice.toml").to_str().unwrap(),
            "status",
            "1",
        ],
        &[(
            "BACKOFFICE__SCM__ADDRESS",
            scm.listening("telnet").to_string(),
        )],
    );
    assert_eq!(code, 0);
    let bridge = status
        .lines()
        .find(|l| l.contains("generic 1/r1"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        !bridge.contains(" 0 expired"),
        "swipes to the stuck server were expired: {bridge}"
    );
}

/// Unix milliseconds now.
fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[test]
fn a_print_server_that_stops_reading_never_reads_a_card_older_than_its_ttl() {
    const TTL_MS: u128 = 2000;
    // How late a card may be read: the agent, the SCM and the simulator's scheduling.
    const TOLERANCE_MS: u128 = 500;
    // The SCM takes the print server as not reading once it has been silent this long.
    const SILENCE_MS: u128 = 400;
    // Its keep-alive interval (`sim`) and the card rate below.
    const KEEPALIVE_MS: u128 = 200;
    const CARD_EVERY_MS: u128 = 100;
    // Cards written between the print server's last keep-alive and the SCM holding cards
    // back are in the kernels' buffers and reach it late: at most these.
    const LATE_MAX: usize = ((SILENCE_MS + KEEPALIVE_MS) / CARD_EVERY_MS + 1) as usize;
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__BRIDGE__STALL_SILENCE_MS", SILENCE_MS.to_string())],
    );
    let agents = scm.listening("agents");
    let port = scm.listening("generic 1/r1");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents,
        &[("AGENT__SWIPES__TTL_MS", TTL_MS.to_string())],
    );
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    // Connects, reads 3 cards, then stops reading for three times the lifetime.
    let s = sim(
        port,
        &[
            "--timestamps",
            "--stall-after-cards",
            "3",
            "--stall-ms",
            "6000",
        ],
    );
    s.wait_stdout("CONNECTED");
    // Each card is the moment it was swiped (Unix ms): the simulator's read time minus
    // the card is its age when the print server read it.
    let mut swiped = Vec::new();
    let mut swipe_now = || {
        let card = format!("T{}", unix_ms());
        swipe(&dev, 1, &card);
        swiped.push(card);
    };
    for _ in 0..3 {
        swipe_now();
        // The card rate, not a wait for state.
        std::thread::sleep(std::time::Duration::from_millis(CARD_EVERY_MS as u64));
    }
    s.wait_stdout("STALLED");
    // The agent keeps swiping while the print server does not read, and a while after.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while std::time::Instant::now() < until {
        swipe_now();
        std::thread::sleep(std::time::Duration::from_millis(CARD_EVERY_MS as u64));
    }
    s.wait_stdout("RESUMED");
    scm.wait_for("taken as not reading");
    scm.wait_for("sends again after");
    let last = swiped.last().cloned().unwrap();
    s.wait_stdout(&format!("CARD {last} FROM"));
    let out = s.stdout();
    let mut late = Vec::new();
    let mut read = 0;
    for line in out.lines().filter(|l| l.starts_with("CARD T")) {
        let mut w = line.split_whitespace();
        let card: u128 = w.nth(1).unwrap()[1..].parse().unwrap();
        let at: u128 = line.rsplit(' ').next().unwrap().parse().unwrap();
        read += 1;
        if at.saturating_sub(card) > TTL_MS + TOLERANCE_MS {
            late.push(at - card);
        }
    }
    eprintln!(
        "{} swiped, {read} read by the print server, {} read later than {TTL_MS} + {TOLERANCE_MS} ms (ages {late:?})",
        swiped.len(),
        late.len()
    );
    assert!(
        late.len() <= LATE_MAX,
        "{} cards read late: {late:?}",
        late.len()
    );
}
