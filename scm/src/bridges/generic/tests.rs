use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::*;

/// Bound on every wait for something that must happen.
const WAIT: Duration = Duration::from_secs(10);
/// Bound on waits in paused time (virtual).
const HOUR: Duration = Duration::from_secs(3600);
const REPLY: &[u8] = b"SCM-Generic-1.0\r";

fn device(reader: &str, allow: &str) -> GenericDevice {
    GenericDevice {
        machine: 1,
        reader: reader.into(),
        listen: "127.0.0.1:0".into(),
        allow: vec![allow.parse().unwrap()],
        version_reply: default_version_reply(),
    }
}

fn swipe(event: &str, card: &str, ttl: Duration) -> BridgeSwipe {
    BridgeSwipe {
        event_id: event.into(),
        card: card.into(),
        expires_at: Instant::now() + ttl,
        received_at: Instant::now(),
    }
}

struct Harness {
    bridge: Arc<GenericBridge>,
    addrs: Vec<SocketAddr>,
    outcomes: mpsc::Receiver<OutcomeReport>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Harness {
    async fn start(devices: Vec<GenericDevice>, settings: BridgeSettings) -> Harness {
        let (tx, outcomes) = mpsc::channel(1024);
        let bridge = GenericBridge::new(devices, settings, tx);
        let listeners = bridge.bind().await.unwrap();
        let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(bridge.clone().serve(listeners, shutdown.clone()));
        Harness {
            bridge,
            addrs,
            outcomes,
            shutdown,
            task,
        }
    }

    async fn one(settings: BridgeSettings) -> Harness {
        Self::start(vec![device("r1", "127.0.0.1")], settings).await
    }

    fn status(&self) -> DeviceStatus {
        self.bridge.status(Some(1)).remove(0)
    }

    async fn outcome(&mut self) -> OutcomeReport {
        self.outcome_within(WAIT).await
    }

    async fn outcome_within(&mut self, bound: Duration) -> OutcomeReport {
        timeout(bound, self.outcomes.recv())
            .await
            .expect("an outcome report within the wait")
            .expect("outcome channel open")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(WAIT, self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}

/// Reads into `acc` until it ends with `end` (bounded).
async fn read_until<R: AsyncRead + Unpin>(r: &mut R, acc: &mut Vec<u8>, end: u8) {
    let mut b = [0u8; 256];
    while acc.last() != Some(&end) {
        let n = timeout(WAIT, r.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {end:#x}; got {acc:?}"))
            .unwrap();
        assert!(n > 0, "EOF while waiting for {end:#x}; got {acc:?}");
        acc.extend_from_slice(&b[..n]);
    }
}

/// Reads to EOF (bounded).
async fn read_to_eof<R: AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    let mut rest = Vec::new();
    timeout(WAIT, r.read_to_end(&mut rest))
        .await
        .expect("EOF within the wait")
        .expect("clean EOF");
    rest
}

/// A tracing subscriber that records every event (and span field) as text, to check what
/// is logged and that no full card number ever is.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(tracing::Level, String)>>>);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut s = String::from("span ");
        span.record(&mut Fields(&mut s));
        self.0.lock().unwrap().push((tracing::Level::TRACE, s));
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut s = String::new();
        event.record(&mut Fields(&mut s));
        self.0.lock().unwrap().push((*event.metadata().level(), s));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl Capture {
    fn lines(&self) -> Vec<(tracing::Level, String)> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn probes_are_discarded_v_gets_cr_reply_and_card_arrives_with_lf() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    // Other tests on other threads may have cached "not interested" for these callsites.
    tracing::callsite::rebuild_interest_cache();
    let mut h = Harness::one(BridgeSettings::default()).await;
    let mut c = TcpStream::connect(h.addrs[0]).await.unwrap();
    let me = c.local_addr().unwrap();
    for probe in ["\r", "rfid prompt", "e", "\r", "b", "v"] {
        c.write_all(probe.as_bytes()).await.unwrap();
    }
    let mut got = Vec::new();
    read_until(&mut c, &mut got, b'\r').await;
    assert_eq!(got, REPLY, "only the version reply, CR-terminated");
    let st = h.status();
    assert_eq!(st.connected.map(|c| c.0), Some(me));

    h.bridge
        .submit(1, "r1", swipe("ev1", "12345678", Duration::from_secs(30)))
        .unwrap();
    read_until(&mut c, &mut got, b'\n').await;
    let o = h.outcome().await;
    assert_eq!(o.event_id, "ev1");
    assert_eq!(o.key.to_string(), "1/r1");
    assert_eq!(o.outcome, Outcome::Delivered { peer: me });

    let st = h.status();
    assert_eq!((st.delivered, st.queued, st.expired), (1, 0, 0));
    // More probes after the card, then our FIN: the bridge reads everything, answers the
    // final `v`, sees EOF and closes.
    c.write_all(b"\rrfid prompt\r\n b\r\ne").await.unwrap();
    c.write_all(b"\r v\r\n").await.unwrap();
    c.shutdown().await.unwrap();
    got.extend(read_to_eof(&mut c).await);
    // The card after a version answer starts with an LF: a print server splitting on LF
    // alone reads it on a line of its own.
    assert_eq!(
        got, b"SCM-Generic-1.0\r\n12345678\nSCM-Generic-1.0\r",
        "the whole byte stream"
    );
    h.stop().await;

    let logs = capture.lines();
    assert!(
        logs.iter().all(|(_, l)| !l.contains("12345678")),
        "a full card number was logged: {logs:?}"
    );
    assert!(
        logs.iter()
            .any(|(_, l)| l.contains("****5678") && l.contains("delivered")),
        "the delivery is logged with the masked card: {logs:?}"
    );
    assert!(
        logs.iter()
            .any(|(_, l)| l.contains("listening on 127.0.0.1:") && l.contains("(generic 1/r1)")),
        "the listening line: {logs:?}"
    );
}

#[tokio::test]
async fn empty_version_reply_never_answers() {
    let mut d = device("r1", "127.0.0.1");
    d.version_reply = String::new();
    let mut h = Harness::start(vec![d], BridgeSettings::default()).await;
    let mut c = TcpStream::connect(h.addrs[0]).await.unwrap();
    c.write_all(b"\rrfid prompt").await.unwrap();
    c.write_all(b"v").await.unwrap();
    c.write_all(b" v\r").await.unwrap();
    h.bridge
        .submit(1, "r1", swipe("ev1", "EMP123", Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, b'\n').await;
    assert!(matches!(
        h.outcome().await.outcome,
        Outcome::Delivered { .. }
    ));
    // Our FIN: the bridge reads everything we sent, then closes; nothing but the card.
    c.shutdown().await.unwrap();
    got.extend(read_to_eof(&mut c).await);
    assert_eq!(got, b"EMP123\n");
    h.stop().await;
}

#[tokio::test]
async fn swipe_queued_before_connect_is_delivered_on_connect() {
    let mut h = Harness::one(BridgeSettings::default()).await;
    h.bridge
        .submit(
            1,
            "r1",
            swipe("ev1", "ed5d34c74e59d16bd", Duration::from_secs(30)),
        )
        .unwrap();
    assert_eq!(h.status().queued, 1);
    assert_eq!(h.status().connected, None);
    let mut c = TcpStream::connect(h.addrs[0]).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, b'\n').await;
    assert_eq!(got, b"ed5d34c74e59d16bd\n");
    let o = h.outcome().await;
    assert_eq!(
        o.outcome,
        Outcome::Delivered {
            peer: c.local_addr().unwrap()
        }
    );
    assert_eq!(h.status().queued, 0);
    h.stop().await;
}

#[tokio::test]
async fn swipe_expired_before_connect_is_reported_and_never_written() {
    let mut h = Harness::one(BridgeSettings::default()).await;
    h.bridge
        .submit(
            1,
            "r1",
            swipe("old", "11112222", Duration::from_millis(200)),
        )
        .unwrap();
    let o = h.outcome().await;
    assert_eq!(
        (o.event_id.as_str(), &o.outcome),
        ("old", &Outcome::Expired)
    );
    let st = h.status();
    assert_eq!((st.queued, st.expired, st.delivered), (0, 1, 0));

    let mut c = TcpStream::connect(h.addrs[0]).await.unwrap();
    let mut b = [0u8; 64];
    let waited = timeout(Duration::from_millis(500), c.read(&mut b)).await;
    assert!(waited.is_err(), "nothing may arrive: {waited:?}");
    // The connection works, and the first thing on it is the fresh card.
    h.bridge
        .submit(1, "r1", swipe("new", "33334444", Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, b'\n').await;
    assert_eq!(got, b"33334444\n");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn queue_is_bounded_and_swipes_expire_in_paused_time() {
    let settings = BridgeSettings {
        queue_max: 4,
        ..BridgeSettings::default()
    };
    let mut h = Harness::one(settings).await;
    assert!(h.bridge.has_device(1, "r1"));
    assert!(!h.bridge.has_device(1, "r2"));
    assert!(!h.bridge.has_device(2, "r1"));
    assert_eq!(
        h.bridge
            .submit(2, "r1", swipe("x", "1", Duration::from_secs(1))),
        Err(SubmitError::NoDevice)
    );
    let start = Instant::now();
    for (ev, ttl) in [("a", 60), ("b", 10), ("c", 60), ("d", 60)] {
        h.bridge
            .submit(1, "r1", swipe(ev, "55556666", Duration::from_secs(ttl)))
            .unwrap();
    }
    assert_eq!(
        h.bridge
            .submit(1, "r1", swipe("e", "55556666", Duration::from_secs(60))),
        Err(SubmitError::QueueFull { max: 4 })
    );
    assert_eq!(h.status().queued, 4);

    let o = h.outcome_within(HOUR).await;
    assert_eq!((o.event_id.as_str(), &o.outcome), ("b", &Outcome::Expired));
    assert!(start.elapsed() >= Duration::from_secs(10));
    assert!(start.elapsed() < Duration::from_secs(11));
    assert_eq!(h.status().queued, 3);
    h.bridge
        .submit(1, "r1", swipe("e", "55556666", Duration::from_secs(60)))
        .unwrap();

    // Already stale on arrival: reported at once, never queued.
    h.bridge
        .submit(1, "r1", swipe("stale", "55556666", Duration::ZERO))
        .unwrap();
    assert_eq!(h.outcome_within(HOUR).await.event_id, "stale");

    let mut rest = Vec::new();
    for _ in 0..4 {
        let o = h.outcome_within(HOUR).await;
        assert_eq!(o.outcome, Outcome::Expired);
        rest.push(o.event_id);
    }
    rest.sort();
    assert_eq!(rest, ["a", "c", "d", "e"]);
    let st = h.status();
    assert_eq!((st.queued, st.expired, st.delivered), (0, 6, 0));
    h.stop().await;
}

#[tokio::test]
async fn peer_not_on_allow_list_is_closed_counted_and_logged() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    // Other tests on other threads may have cached "not interested" for these callsites.
    tracing::callsite::rebuild_interest_cache();
    let h = Harness::start(vec![device("r1", "127.0.0.2")], BridgeSettings::default()).await;
    let mut c = TcpStream::connect(h.addrs[0]).await.unwrap();
    let me = c.local_addr().unwrap();
    assert_eq!(me.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
    let rest = read_to_eof(&mut c).await;
    assert!(rest.is_empty());
    let st = h.status();
    assert_eq!(st.refused_peers, 1);
    assert_eq!(st.connected, None);
    // A queued swipe is not given to a refused peer.
    h.bridge
        .submit(1, "r1", swipe("ev", "77778888", Duration::from_secs(30)))
        .unwrap();
    assert_eq!(h.status().queued, 1);
    let logs = capture.lines();
    assert!(
        logs.iter().any(|(lvl, l)| *lvl == tracing::Level::WARN
            && l.contains(&me.to_string())
            && l.contains("allow list")),
        "refusal logged at warn with the peer address: {logs:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn newest_connection_wins() {
    let mut h = Harness::one(BridgeSettings::default()).await;
    let mut a = TcpStream::connect(h.addrs[0]).await.unwrap();
    // The version round trip shows the bridge has taken the connection.
    a.write_all(b"v").await.unwrap();
    let mut got_a = Vec::new();
    read_until(&mut a, &mut got_a, b'\r').await;
    assert_eq!(
        h.status().connected.map(|c| c.0),
        Some(a.local_addr().unwrap())
    );

    let mut b = TcpStream::connect(h.addrs[0]).await.unwrap();
    b.write_all(b"v").await.unwrap();
    let mut got_b = Vec::new();
    read_until(&mut b, &mut got_b, b'\r').await;
    assert_eq!(got_b, REPLY);
    // A is closed.
    assert!(read_to_eof(&mut a).await.is_empty());
    assert_eq!(got_a, REPLY);
    let b_addr = b.local_addr().unwrap();
    assert_eq!(h.status().connected.map(|c| c.0), Some(b_addr));

    h.bridge
        .submit(1, "r1", swipe("ev", "99990000", Duration::from_secs(30)))
        .unwrap();
    read_until(&mut b, &mut got_b, b'\n').await;
    assert_eq!(got_b, b"SCM-Generic-1.0\r\n99990000\n");
    assert_eq!(
        h.outcome().await.outcome,
        Outcome::Delivered { peer: b_addr }
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_of_probes_do_not_stop_the_bridge() {
    const TOTAL: usize = 20 * 1024 * 1024;
    let mut h = Harness::one(BridgeSettings::default()).await;
    let c = TcpStream::connect(h.addrs[0]).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let flood = tokio::spawn(async move {
        let chunk = b"rfid prompt\r".repeat(64 * 1024 / 12);
        let mut sent = 0;
        let mut half = Some(half_tx);
        while sent < TOTAL {
            wr.write_all(&chunk).await.unwrap();
            sent += chunk.len();
            if sent >= TOTAL / 2
                && let Some(tx) = half.take()
            {
                let _ = tx.send(());
            }
        }
        wr
    });
    timeout(WAIT, half_rx).await.unwrap().unwrap();
    h.bridge
        .submit(1, "r1", swipe("mid", "10101010", Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut rd, &mut got, b'\n').await;
    assert_eq!(got, b"10101010\n");
    let mut wr = timeout(Duration::from_secs(60), flood)
        .await
        .expect("the bridge reads all 20 MB")
        .unwrap();
    // The bridge has read to the end of the flood: a final `v` is answered.
    wr.write_all(b"v").await.unwrap();
    read_until(&mut rd, &mut got, b'\r').await;
    assert_eq!(got, b"10101010\nSCM-Generic-1.0\r");
    assert!(matches!(
        h.outcome().await.outcome,
        Outcome::Delivered { .. }
    ));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_that_never_reads_times_out_and_queue_stays_bounded() {
    const MAX: usize = 8;
    let mut d = device("r1", "127.0.0.1");
    d.version_reply = String::new();
    let settings = BridgeSettings {
        queue_max: MAX,
        write_timeout_ms: 300,
        ..BridgeSettings::default()
    };
    let mut h = Harness::start(vec![d], settings).await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut c = sock.connect(h.addrs[0]).await.unwrap();

    let ttl = Duration::from_secs(4);
    let card = |n: usize| format!("{}{n:08}", "A".repeat(56));
    let mut n = 0;
    let mut delivered = 0u64;
    'fill: loop {
        assert!(n < 2_000_000, "the socket buffers never filled");
        let mut batch = 0;
        while batch < MAX {
            match h
                .bridge
                .submit(1, "r1", swipe(&n.to_string(), &card(n), ttl))
            {
                Ok(()) => {
                    n += 1;
                    batch += 1;
                }
                Err(SubmitError::QueueFull { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        for _ in 0..batch {
            match timeout(Duration::from_secs(2), h.outcomes.recv()).await {
                Ok(Some(o)) => {
                    assert!(matches!(o.outcome, Outcome::Delivered { .. }), "{o:?}");
                    delivered += 1;
                }
                Ok(None) => panic!("outcome channel closed"),
                // The write is stuck: the socket buffers are full.
                Err(_) => break 'fill,
            }
        }
    }
    assert!(delivered > 0);
    // The bridge gave up on the write and closed: reading now drains to EOF.
    let bytes = read_to_eof(&mut c).await;
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    let whole = lines.iter().filter(|l| l.ends_with(b"\n")).count() as u64;
    assert_eq!(
        whole, delivered,
        "every delivered card, and only those, arrived whole"
    );
    for (i, l) in lines.iter().filter(|l| l.ends_with(b"\n")).enumerate() {
        assert_eq!(*l, format!("{}\n", card(i)).as_bytes());
    }
    let st = h.status();
    assert_eq!(st.connected, None);
    assert!(st.queued >= 1, "the stuck swipe was put back: {st:?}");
    assert_eq!(st.delivered, delivered);

    // Bounded: exactly queue_max wait, then QueueFull.
    let mut extra = 0;
    let err = loop {
        match h
            .bridge
            .submit(1, "r1", swipe(&format!("x{extra}"), &card(0), ttl))
        {
            Ok(()) => extra += 1,
            Err(e) => break e,
        }
        assert!(extra <= MAX);
    };
    assert_eq!(err, SubmitError::QueueFull { max: MAX });
    assert_eq!(h.status().queued, MAX);

    // All of them expire.
    for _ in 0..MAX {
        assert_eq!(h.outcome().await.outcome, Outcome::Expired);
    }
    let st = h.status();
    assert_eq!((st.queued, st.expired), (0, MAX as u64));
    h.stop().await;
}

#[tokio::test]
async fn two_devices_are_independent() {
    let mut d2 = device("r2", "127.0.0.1");
    d2.machine = 2;
    let mut h = Harness::start(
        vec![device("r1", "127.0.0.1"), d2],
        BridgeSettings::default(),
    )
    .await;
    assert_eq!(h.bridge.status(None).len(), 2);
    assert_eq!(h.bridge.status(Some(2))[0].key.to_string(), "2/r2");
    assert_eq!(h.bridge.status(Some(2))[0].listen, Some(h.addrs[1]));
    assert!(h.bridge.status(Some(3)).is_empty());
    let mut c2 = TcpStream::connect(h.addrs[1]).await.unwrap();
    h.bridge
        .submit(2, "r2", swipe("ev2", "22220000", Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut c2, &mut got, b'\n').await;
    assert_eq!(got, b"22220000\n");
    let o = h.outcome().await;
    assert_eq!(
        o.key,
        DeviceKey {
            machine: 2,
            reader: "r2".into()
        }
    );
    assert_eq!(h.bridge.status(Some(1))[0].delivered, 0);
    h.stop().await;
}

#[test]
fn full_outcome_channel_loses_reports_without_blocking() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let (tx, mut rx) = mpsc::channel(1);
        let bridge = GenericBridge::new(
            vec![device("r1", "127.0.0.1")],
            BridgeSettings::default(),
            tx,
        );
        for ev in ["a", "b", "c"] {
            bridge
                .submit(1, "r1", swipe(ev, "1234", Duration::ZERO))
                .unwrap();
        }
        assert_eq!(rx.recv().await.unwrap().event_id, "a");
        assert_eq!(bridge.lost_reports.load(Ordering::Relaxed), 2);
        assert_eq!(bridge.status(None)[0].expired, 3);
    });
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn keepalive_and_user_timeout_are_set() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let s = BridgeSettings {
        keepalive_idle_ms: 20_000,
        keepalive_interval_ms: 1500,
        keepalive_retries: 5,
        user_timeout_ms: 12_345,
        ..BridgeSettings::default()
    };
    tune_socket(&c, &s).unwrap();
    let r = socket2::SockRef::from(&c);
    assert!(r.keepalive().unwrap());
    assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(20));
    assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(2));
    assert_eq!(r.tcp_keepalive_retries().unwrap(), 5);
    assert_eq!(
        r.tcp_user_timeout().unwrap(),
        Some(Duration::from_millis(12_345))
    );
}

#[test]
fn last_command_is_the_last_non_whitespace_byte() {
    let table: &[(&[u8], Option<u8>)] = &[
        (b"\r", None),
        (b"", None),
        (b"v", Some(b'v')),
        (b"v\r\n ", Some(b'v')),
        // A probe and the `v` after it, read at once.
        (b"\rrfid promptv", Some(b'v')),
        (b"rfid prompt", Some(b't')),
        (b"vvv e", Some(b'e')),
    ];
    for (chunk, want) in table {
        assert_eq!(last_command(chunk), *want, "{chunk:?}");
    }
}

#[test]
fn debug_output_masks_the_card() {
    let s = swipe("ev", "12345678", Duration::from_secs(1));
    let text = format!("{s:?}");
    assert!(!text.contains("12345678"), "{text}");
    assert!(text.contains("****5678"), "{text}");
}

#[test]
fn configuration_parses_with_defaults_and_rejects_unknown_keys() {
    #[derive(Debug, Deserialize)]
    struct File {
        #[serde(default)]
        bridge: BridgeSettings,
        generic: Vec<GenericDevice>,
    }
    let f: File = toml::from_str(
        r#"
        [bridge]
        queue_max = 10
        [[generic]]
        machine = 1
        reader = "r1"
        listen = "0.0.0.0:7778"
        allow = ["192.0.2.10", "2001:db8::1"]
        [[generic]]
        machine = 1
        reader = "r2"
        listen = "0.0.0.0:7779"
        allow = ["192.0.2.10"]
        version_reply = ""
        "#,
    )
    .unwrap();
    assert_eq!(f.bridge.queue_max, 10);
    assert_eq!(f.bridge.write_timeout_ms, 5000);
    assert_eq!(f.generic[0].version_reply, "SCM-Generic-1.0");
    assert_eq!(f.generic[1].version_reply, "");
    assert_eq!(f.generic[0].allow.len(), 2);
    assert_eq!(validate(&f.generic, &f.bridge), Ok(()));

    let e = toml::from_str::<File>(
        "[[generic]]\nmachine = 1\nreader = \"r\"\nlisten = \"0.0.0.0:1\"\nallow = []\nport = 3\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("port"), "{e}");
    let e = toml::from_str::<File>("generic = []\n[bridge]\nqueue = 3\n").unwrap_err();
    assert!(e.to_string().contains("queue"), "{e}");
}

#[test]
fn validate_errors_name_the_key() {
    let ok = || {
        let mut a = device("r1", "192.0.2.10");
        a.listen = "0.0.0.0:7778".into();
        let mut b = device("r2", "192.0.2.10");
        b.listen = "0.0.0.0:7779".into();
        vec![a, b]
    };
    let s = BridgeSettings::default();
    assert_eq!(validate(&ok(), &s), Ok(()));
    assert_eq!(validate(&[], &s), Ok(()));
    let key = |devs: &[GenericDevice], s: &BridgeSettings| validate(devs, s).unwrap_err().0;

    let mut d = ok();
    d[1].reader = "r1".into();
    let (k, m) = validate(&d, &s).unwrap_err();
    assert_eq!(k, "generic[1].reader");
    assert!(m.contains("generic[0]"), "{m}");
    d[1].machine = 2;
    assert_eq!(
        validate(&d, &s),
        Ok(()),
        "same reader id on another machine"
    );

    for bad in ["", "r 1", "r/1", "ü", &"r".repeat(65)] {
        let mut d = ok();
        d[0].reader = bad.into();
        assert_eq!(key(&d, &s), "generic[0].reader", "{bad:?}");
    }

    let mut d = ok();
    d[1].listen = "0.0.0.0:7778".into();
    assert_eq!(key(&d, &s), "generic[1].listen");
    d[1].listen = "127.0.0.1:7778".into();
    assert_eq!(key(&d, &s), "generic[1].listen", "overlaps 0.0.0.0:7778");
    d[0].listen = "127.0.0.1:0".into();
    d[1].listen = "127.0.0.1:0".into();
    assert_eq!(validate(&d, &s), Ok(()), "port 0 never collides");
    for bad in ["localhost:7778", "7778", "0.0.0.0", ""] {
        let mut d = ok();
        d[1].listen = bad.into();
        assert_eq!(key(&d, &s), "generic[1].listen", "{bad:?}");
    }

    let mut d = ok();
    d[1].allow.clear();
    let (k, m) = validate(&d, &s).unwrap_err();
    assert_eq!(k, "generic[1].allow");
    assert!(m.contains("empty"), "{m}");
    d[1].allow = vec!["192.0.2.1".parse().unwrap(), "0.0.0.0".parse().unwrap()];
    assert_eq!(key(&d, &s), "generic[1].allow[1]");

    for bad in ["v1\n", "v1\r", "v\u{e9}", &"v".repeat(65)] {
        let mut d = ok();
        d[0].version_reply = bad.into();
        assert_eq!(key(&d, &s), "generic[0].version_reply", "{bad:?}");
    }

    type Set = fn(&mut BridgeSettings);
    let zero: [(&str, Set); 7] = [
        ("queue_max", |s| s.queue_max = 0),
        ("write_timeout_ms", |s| s.write_timeout_ms = 0),
        ("keepalive_idle_ms", |s| s.keepalive_idle_ms = 0),
        ("keepalive_interval_ms", |s| s.keepalive_interval_ms = 0),
        ("keepalive_retries", |s| s.keepalive_retries = 0),
        ("user_timeout_ms", |s| s.user_timeout_ms = 0),
        ("max_connections_per_device", |s| {
            s.max_connections_per_device = 0
        }),
    ];
    for (name, set) in zero {
        let mut s = BridgeSettings::default();
        set(&mut s);
        let (k, m) = validate(&ok(), &s).unwrap_err();
        assert_eq!(k, format!("bridge.{name}"));
        assert!(m.contains("at least 1"), "{m}");
    }
    let s = BridgeSettings {
        keepalive_retries: 200,
        ..BridgeSettings::default()
    };
    assert_eq!(key(&ok(), &s), "bridge.keepalive_retries");
    let s = BridgeSettings {
        queue_max: usize::MAX,
        ..BridgeSettings::default()
    };
    assert_eq!(key(&ok(), &s), "bridge.queue_max");
}

#[test]
fn device_key_displays_machine_slash_reader() {
    let k = DeviceKey {
        machine: 1,
        reader: "r1".into(),
    };
    assert_eq!(k.to_string(), "1/r1");
    assert_eq!(
        SubmitError::QueueFull { max: 64 }.to_string(),
        "the device's queue is full (64 swipes waiting); swipe refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_blocked_at_expiry_is_abandoned_and_reported_expired() {
    // The write timeout is long; the swipes' time to live is short: a write stuck on full
    // socket buffers ends at the swipe's expiry, not at the write timeout.
    const MAX: usize = 8;
    let mut d = device("r1", "127.0.0.1");
    d.version_reply = String::new();
    let settings = BridgeSettings {
        queue_max: MAX,
        write_timeout_ms: 60_000,
        ..BridgeSettings::default()
    };
    let mut h = Harness::start(vec![d], settings).await;
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut c = sock.connect(h.addrs[0]).await.unwrap();

    let ttl = Duration::from_secs(1);
    let card = |n: usize| format!("{}{n:08}", "B".repeat(56));
    let mut n = 0;
    let mut delivered = 0u64;
    let started = Instant::now();
    let stuck_at = 'fill: loop {
        assert!(n < 2_000_000, "the socket buffers never filled");
        let mut batch = 0;
        while batch < MAX {
            match h
                .bridge
                .submit(1, "r1", swipe(&n.to_string(), &card(n), ttl))
            {
                Ok(()) => {
                    n += 1;
                    batch += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        for _ in 0..batch {
            let o = h.outcome().await;
            match o.outcome {
                Outcome::Delivered { .. } => delivered += 1,
                Outcome::Expired => break 'fill o.event_id.parse::<usize>().unwrap(),
            }
        }
    };
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ended by the expiry, not the 60 s write timeout"
    );
    // The connection was closed (a partial line may have gone out): reading drains to EOF.
    let bytes = read_to_eof(&mut c).await;
    let whole: Vec<&[u8]> = bytes
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .collect();
    assert_eq!(whole.len() as u64, delivered);
    assert_eq!(h.status().connected, None);
    // The rest of the batch expires too; nothing is delivered late.
    let mut expired = vec![stuck_at];
    while (expired.len() as u64) < n as u64 - delivered {
        let o = h.outcome().await;
        assert_eq!(o.outcome, Outcome::Expired);
        expired.push(o.event_id.parse().unwrap());
    }
    expired.sort_unstable();
    assert_eq!(expired, (delivered as usize..n).collect::<Vec<_>>());
    let st = h.status();
    assert_eq!((st.queued, st.delivered), (0, delivered));
    h.stop().await;
}
