use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, LeafSpec, Validity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::state::Store;

/// Bound on every wait for something that must happen.
const WAIT: Duration = Duration::from_secs(10);

fn device(machine: u16, host: &str) -> RfideasDevice {
    RfideasDevice {
        machine,
        reader: "r1".into(),
        host: host.into(),
        listen: String::new(),
        allow: vec!["127.0.0.1".parse().unwrap()],
        swipe_url: String::new(),
        mac: String::new(),
    }
}

fn peer(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 40_000)
}

struct Pki {
    _dir: tempfile::TempDir,
    ca_path: std::path::PathBuf,
    server: Arc<rustls::ServerConfig>,
}

/// A CA (written to a file, for the bridge) and a server configuration for 127.0.0.1
/// signed by it.
fn pki() -> Pki {
    let validity = Validity::days_from_now(2);
    let ca = Ca::generate("rfideas test CA", &validity).unwrap();
    let mut spec = LeafSpec::new(Identity::Scm, validity);
    spec.extra_hosts = vec!["127.0.0.1".into(), "localhost".into()];
    let leaf = ca.issue(&spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    Pki {
        _dir: dir,
        ca_path,
        server: Arc::new(server),
    }
}

struct Harness {
    bridge: Arc<RfideasBridge>,
    outcomes: mpsc::Receiver<OutcomeReport>,
    store: Store,
    _db: tempfile::TempDir,
    pki: Pki,
}

fn harness_with(devices: Vec<RfideasDevice>, settings: RfideasSettings) -> Harness {
    let db = tempfile::tempdir().unwrap();
    let store = Store::open(&db.path().join("scm.db")).unwrap();
    let pki = pki();
    let (tx, outcomes) = mpsc::channel(64);
    let bridge =
        RfideasBridge::new(devices, settings, &pki.ca_path, store.devices().clone(), tx).unwrap();
    Harness {
        bridge,
        outcomes,
        store,
        _db: db,
        pki,
    }
}

fn harness() -> Harness {
    harness_with(
        vec![device(1, "reader-1.example"), device(2, "reader-2.example")],
        RfideasSettings::default(),
    )
}

/// Sends raw bytes on a fresh in-memory connection from `from` and returns everything the
/// bridge answered before it closed (or until `WAIT`).
async fn exchange(h: &Harness, from: &str, bytes: &[u8]) -> String {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let bridge = h.bridge.clone();
    let task = tokio::spawn(bridge.handle_conn(server, peer(from), None, CancellationToken::new()));
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    timeout(WAIT, client.read_to_end(&mut out))
        .await
        .expect("the bridge answers and closes")
        .unwrap();
    let _ = task.await;
    String::from_utf8_lossy(&out).into_owned()
}

fn get(path: &str, host: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

fn status_of(resp: &str) -> u16 {
    resp.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"))
}

fn body_of(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

#[test]
fn configuration_is_validated_with_named_keys() {
    let ok = vec![device(1, "Reader-1.Example."), device(2, "10.0.0.9")];
    validate(&ok, &RfideasSettings::default(), &[1, 2]).unwrap();
    type Change = Box<dyn Fn(&mut Vec<RfideasDevice>, &mut RfideasSettings)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|d, _| d[1].machine = 9), "rfideas[1].machine"),
        (
            Box::new(|d, _| d[1].host = "reader-1.example".into()),
            "rfideas[1].host",
        ),
        (
            Box::new(|d, _| d[0].host = "a:80".into()),
            "rfideas[0].host",
        ),
        (
            Box::new(|d, _| d[0].host = "-x.example".into()),
            "rfideas[0].host",
        ),
        (Box::new(|d, _| d[1].machine = 1), "rfideas[1].reader"),
        (
            Box::new(|d, _| d[0].reader = "r 1".into()),
            "rfideas[0].reader",
        ),
        (Box::new(|d, _| d[0].allow.clear()), "rfideas[0].allow"),
        (
            Box::new(|d, _| d[0].allow = vec!["0.0.0.0".parse().unwrap()]),
            "rfideas[0].allow[0]",
        ),
        (
            Box::new(|d, _| d[0].listen = "8242".into()),
            "rfideas[0].listen",
        ),
        (
            Box::new(|d, _| d[0].swipe_url = "http://x/?c={card}".into()),
            "rfideas[0].swipe_url",
        ),
        (Box::new(|d, _| d[0].mac = "02:00".into()), "rfideas[0].mac"),
        (
            Box::new(|d, _| {
                d[0].mac = "02:00:00:00:00:01".into();
                d[1].mac = "02:00:00:00:00:01".into();
            }),
            "rfideas[1].mac",
        ),
        (
            Box::new(|_, s| s.read_path = "/config".into()),
            "rfideas_bridge.read_path",
        ),
        (
            Box::new(|_, s| s.config_path = "config".into()),
            "rfideas_bridge.config_path",
        ),
        (
            Box::new(|_, s| s.url_setting = "a b".into()),
            "rfideas_bridge.url_setting",
        ),
        (
            Box::new(|_, s| s.header_timeout_ms = 0),
            "rfideas_bridge.header_timeout_ms",
        ),
        (
            Box::new(|_, s| s.retry_max_ms = 1),
            "rfideas_bridge.retry_max_ms",
        ),
        (
            Box::new(|_, s| s.max_head_bytes = 10),
            "rfideas_bridge.max_head_bytes",
        ),
    ];
    for (change, key) in cases {
        let mut d = ok.clone();
        let mut s = RfideasSettings::default();
        change(&mut d, &mut s);
        let (k, msg) = validate(&d, &s, &[1, 2]).unwrap_err();
        assert_eq!(k, key, "{msg}");
        assert!(!msg.is_empty());
    }
}

#[test]
fn host_names_and_macs() {
    assert_eq!(host_name("Reader-1.Example.:8241"), "reader-1.example");
    assert_eq!(host_name("[::1]:80"), "::1");
    assert_eq!(host_name("reader"), "reader");
    let d = device(258, "x");
    assert!(
        device_mac(&d).starts_with("02:53:43:01:02:"),
        "{}",
        device_mac(&d)
    );
    assert!(valid_mac(&device_mac(&d)));
    assert_ne!(device_mac(&device(1, "x")), device_mac(&device(2, "x")));
}

#[tokio::test]
async fn configure_then_read_back_audited_and_durable() {
    let h = harness();
    let url = "https://127.0.0.1:9192/swipe?card={card}&mac={device}";
    let q = format!(
        "/config?{}={}&mode=client&beep=on",
        "server_url",
        http::percent_encode(url)
    );
    let resp = exchange(&h, "127.0.0.1", &get(&q, "READER-1.example:80")).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let expected = format!(
        "beep=on\nmode=client\nserver_url={}\n",
        http::percent_encode(url)
    );
    assert_eq!(body_of(&resp), expected);
    assert!(resp.contains("X-Device-Id: 02:53:43:00:01:"), "{resp}");
    let read = exchange(&h, "127.0.0.1", &get("/settings", "reader-1.example")).await;
    assert_eq!(status_of(&read), 200);
    assert_eq!(body_of(&read), expected);
    // The other device is untouched.
    let other = exchange(&h, "127.0.0.1", &get("/settings", "reader-2.example")).await;
    assert_eq!(body_of(&other), "");
    assert_eq!(h.bridge.route(1, "r1"), Route::Ready);
    assert_eq!(h.bridge.route(2, "r1"), Route::NotConfigured);
    assert_eq!(h.bridge.route(3, "r1"), Route::None);

    // The same settings again change nothing and add no audit record.
    exchange(&h, "127.0.0.1", &get(&q, "reader-1.example")).await;
    let resp = exchange(
        &h,
        "127.0.0.1",
        &get("/config?mode=server", "reader-1.example"),
    )
    .await;
    assert_eq!(status_of(&resp), 200);
    let audit = h.store.audit().list(10).await.unwrap();
    assert_eq!(audit.len(), 4, "{audit:?}");
    assert!(audit.iter().all(|a| a.action == "rfideas_config"));
    assert!(
        audit[0]
            .detail
            .contains("mode set to \"server\" (was \"client\")"),
        "{audit:?}"
    );
    assert_eq!(audit[0].actor, "print-server 127.0.0.1");

    // A new bridge on the same database (an SCM restart) reports the same settings.
    let (tx, _rx) = mpsc::channel(4);
    let again = RfideasBridge::new(
        vec![device(1, "reader-1.example"), device(2, "reader-2.example")],
        RfideasSettings::default(),
        &h.pki.ca_path,
        h.store.devices().clone(),
        tx,
    )
    .unwrap();
    let s = again.settings_of(1, "r1").unwrap();
    assert_eq!(s.get("mode").map(String::as_str), Some("server"));
    assert_eq!(s.get("server_url").map(String::as_str), Some(url));
    assert_eq!(s.len(), 3);
}

#[tokio::test]
async fn bad_requests_get_the_right_status_and_a_reason() {
    let h = harness();
    let host = "reader-1.example";
    let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
        (get("/config?mode=%zz", host), "127.0.0.1", 400, "percent"),
        (get("/config?mode", host), "127.0.0.1", 400, "no '='"),
        (get("/config?=x", host), "127.0.0.1", 400, "empty name"),
        (
            get("/config?a%20b=x", host),
            "127.0.0.1",
            400,
            "setting name",
        ),
        (get("/config?a=1&a=2", host), "127.0.0.1", 400, "twice"),
        (get("/config", host), "127.0.0.1", 400, "no settings"),
        (
            get("/config?server_url=http%3A%2F%2Fx%2F", host),
            "127.0.0.1",
            400,
            "https://",
        ),
        (get("/con%zzfig?a=1", host), "127.0.0.1", 400, "percent"),
        (
            get("/config?a=1", "nobody.example"),
            "127.0.0.1",
            404,
            "no 241 device",
        ),
        (get("/other", host), "127.0.0.1", 404, "unknown path"),
        (
            get("/config?a=1", host),
            "127.0.0.2",
            403,
            "not a configured print server",
        ),
        (
            b"POST /config?a=1 HTTP/1.1\r\nHost: reader-1.example\r\n\r\n".to_vec(),
            "127.0.0.1",
            405,
            "use GET",
        ),
        (
            b"DELETE /settings HTTP/1.1\r\nHost: reader-1.example\r\n\r\n".to_vec(),
            "127.0.0.1",
            405,
            "use GET",
        ),
        (
            b"GET /settings HTTP/1.1\r\n\r\n".to_vec(),
            "127.0.0.1",
            400,
            "no Host",
        ),
        (
            b"GET /settings HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(),
            "127.0.0.1",
            400,
            "more than one Host",
        ),
        (
            b"GET /config?a=1 HTTP/1.1\r\nHost: reader-1.example\r\nContent-Length: 5\r\n\r\nhello"
                .to_vec(),
            "127.0.0.1",
            400,
            "body",
        ),
        (
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n".to_vec(),
            "127.0.0.1",
            400,
            "header name",
        ),
        (
            b"\x16\x03\x01\x00\xa5\x01".to_vec(),
            "127.0.0.1",
            400,
            "control byte",
        ),
        (
            b"GET / HTTP/2.0\r\n\r\n".to_vec(),
            "127.0.0.1",
            505,
            "HTTP/1.1",
        ),
    ];
    for (req, from, code, needle) in cases {
        let resp = exchange(&h, from, &req).await;
        assert_eq!(
            status_of(&resp),
            code,
            "{:?}: {resp}",
            String::from_utf8_lossy(&req)
        );
        assert!(resp.contains(needle), "{needle:?} not in {resp}");
    }
    // An unlisted address on a device's list of another device still cannot touch it.
    let mut both = harness_with(
        vec![device(1, "reader-1.example"), {
            let mut d = device(2, "reader-2.example");
            d.allow = vec!["127.0.0.9".parse().unwrap()];
            d
        }],
        RfideasSettings::default(),
    );
    let resp = exchange(&both, "127.0.0.9", &get("/config?a=1", "reader-1.example")).await;
    assert_eq!(status_of(&resp), 403, "{resp}");
    assert!(resp.contains("may not configure"), "{resp}");
    assert_eq!(both.bridge.status(Some(1))[0].refused_peers, 1);
    // Nothing was stored by any of it.
    assert!(h.bridge.settings_of(1, "r1").unwrap().is_empty());
    assert!(both.bridge.settings_of(1, "r1").unwrap().is_empty());
    assert!(both.outcomes.try_recv().is_err());
    let m = h.bridge.metrics_text();
    assert!(
        m.contains("scm_rfideas_requests_total{status=\"400\"} "),
        "{m}"
    );
    assert!(
        m.contains("scm_rfideas_requests_total{status=\"405\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn oversize_heads_get_431_and_too_many_settings_400() {
    let h = harness();
    let mut req = b"GET /settings HTTP/1.1\r\nHost: reader-1.example\r\nX-Pad: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 10_000));
    req.extend_from_slice(b"\r\n\r\n");
    let resp = exchange(&h, "127.0.0.1", &req).await;
    assert_eq!(status_of(&resp), 431, "{resp}");
    let many: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
    let resp = exchange(
        &h,
        "127.0.0.1",
        &get(&format!("/config?{}", many.join("&")), "reader-1.example"),
    )
    .await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(resp.contains("at most 32 settings"), "{resp}");
    let long = format!("/config?a={}", "x".repeat(3000));
    let resp = exchange(&h, "127.0.0.1", &get(&long, "reader-1.example")).await;
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(resp.contains("longer than 2048"), "{resp}");
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let h = harness();
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(h.bridge.clone().handle_conn(
        server,
        peer("127.0.0.1"),
        None,
        CancellationToken::new(),
    ));
    client
        .write_all(
            b"GET /config?a=1 HTTP/1.1\r\nHost: reader-1.example\r\n\r\nGET /settings HTTP/1.1\r\nHost: reader-1.example\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    timeout(WAIT, client.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.ends_with("a=1\n"), "{text}");
    task.await.unwrap().unwrap();
}

/// A client that sends part of a head and stalls gets 408 after the header timeout
/// (paused time), while another connection is served meanwhile.
#[tokio::test(start_paused = true)]
async fn slowloris_gets_408_and_others_are_served() {
    let h = harness();
    let (mut slow, server) = tokio::io::duplex(1024);
    let slow_task = tokio::spawn(h.bridge.clone().handle_conn(
        server,
        peer("127.0.0.1"),
        None,
        CancellationToken::new(),
    ));
    slow.write_all(b"GET /settings HTTP/1.1\r\nHost: rea")
        .await
        .unwrap();
    let started = Instant::now();
    // Trickle a byte now and then: the deadline is for the whole head.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        slow.write_all(b"d").await.unwrap();
    }
    let served = exchange(&h, "127.0.0.1", &get("/settings", "reader-2.example")).await;
    assert_eq!(status_of(&served), 200);
    let mut out = Vec::new();
    slow.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&text), 408, "{text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4_900) && took <= Duration::from_millis(5_100),
        "closed after {took:?}"
    );
    slow_task.await.unwrap().unwrap();

    // An idle kept-alive connection is closed quietly after the idle timeout.
    let (mut idle, server) = tokio::io::duplex(1024);
    let idle_task = tokio::spawn(h.bridge.clone().handle_conn(
        server,
        peer("127.0.0.1"),
        None,
        CancellationToken::new(),
    ));
    idle.write_all(&get("/settings", "reader-1.example")[..])
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    idle.read_to_end(&mut out).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&out)), 200);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "Connection: close honoured"
    );
    idle_task.await.unwrap().unwrap();
    let (mut idle, server) = tokio::io::duplex(1024);
    let idle_task = tokio::spawn(h.bridge.clone().handle_conn(
        server,
        peer("127.0.0.1"),
        None,
        CancellationToken::new(),
    ));
    idle.write_all(b"GET /settings HTTP/1.1\r\nHost: reader-1.example\r\n\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    idle.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    let idle_for = t0.elapsed();
    assert!(
        idle_for >= Duration::from_secs(30) && idle_for < Duration::from_secs(31),
        "{idle_for:?}"
    );
    idle_task.await.unwrap().unwrap();
}

/// What the in-process print server does with a request.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Ok,
    Hang,
    Redirect,
    Status(u16),
}

/// An HTTPS print server on 127.0.0.1:0; every request target is sent on the channel.
async fn print_server(
    cfg: Arc<rustls::ServerConfig>,
    mode: Mode,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                let _ = tx.send(text);
                let answer = match mode {
                    Mode::Ok => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_string(),
                    Mode::Hang => {
                        std::future::pending::<()>().await;
                        return;
                    }
                    Mode::Redirect => "HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/steal?x=1\r\nContent-Length: 0\r\n\r\n".to_string(),
                    Mode::Status(c) => format!("HTTP/1.1 {c} X\r\nContent-Length: 0\r\n\r\n"),
                };
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, rx)
}

fn fast() -> RfideasSettings {
    RfideasSettings {
        connect_timeout_ms: 500,
        response_timeout_ms: 300,
        retry_initial_ms: 50,
        retry_max_ms: 100,
        ..RfideasSettings::default()
    }
}

fn swipe_for(card: &str, ttl: Duration) -> BridgeSwipe {
    BridgeSwipe {
        event_id: format!("ev-{card}"),
        card: card.into(),
        expires_at: Instant::now() + ttl,
        received_at: Instant::now(),
    }
}

fn with_url(url: String) -> Vec<RfideasDevice> {
    let mut d = device(1, "reader-1.example");
    d.swipe_url = url;
    vec![d]
}

async fn outcome(h: &mut Harness) -> OutcomeReport {
    timeout(WAIT, h.outcomes.recv())
        .await
        .expect("an outcome within the wait")
        .expect("channel open")
}

#[tokio::test]
async fn swipe_is_sent_as_an_https_get_with_escaped_values() {
    let mut h = harness_with(Vec::new(), fast());
    let (addr, mut seen) = print_server(h.pki.server.clone(), Mode::Ok).await;
    let (tx, outcomes) = mpsc::channel(8);
    h.bridge = RfideasBridge::new(
        with_url(format!(
            "https://127.0.0.1:{}/rfid?card={{card}}&mac={{device}}&t={{time}}",
            addr.port()
        )),
        fast(),
        &h.pki.ca_path,
        h.store.devices().clone(),
        tx,
    )
    .unwrap();
    h.outcomes = outcomes;
    h.bridge
        .submit(1, "r1", swipe_for("AB+12&x=1", Duration::from_secs(5)))
        .unwrap();
    let req = timeout(WAIT, seen.recv()).await.unwrap().unwrap();
    let first = req.lines().next().unwrap();
    assert!(
        first.starts_with("GET /rfid?card=AB%2B12%26x%3D1&mac=02%3A53%3A43%3A00%3A01%3A"),
        "{first}"
    );
    assert!(first.ends_with(" HTTP/1.1"), "{first}");
    assert!(
        req.contains(&format!("\r\nHost: 127.0.0.1:{}\r\n", addr.port())),
        "{req}"
    );
    let o = outcome(&mut h).await;
    assert!(
        matches!(
            o.outcome,
            Outcome::Delivered {
                status: 200,
                attempts: 1,
                ..
            }
        ),
        "{o:?}"
    );
    assert_eq!(h.bridge.status(None)[0].delivered, 1);
}

async fn one_swipe(
    mode: Option<Mode>,
    ttl: Duration,
    own_ca: bool,
) -> (Harness, OutcomeReport, usize) {
    let mut h = harness_with(Vec::new(), fast());
    // A print server whose certificate comes from another CA does not verify.
    let server_cfg = if own_ca {
        h.pki.server.clone()
    } else {
        pki().server
    };
    let (addr, mut seen) = match mode {
        Some(m) => {
            let (a, r) = print_server(server_cfg, m).await;
            (a, Some(r))
        }
        None => {
            // Nothing listens on this port.
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            (l.local_addr().unwrap(), None)
        }
    };
    let (tx, outcomes) = mpsc::channel(8);
    h.bridge = RfideasBridge::new(
        with_url(format!("https://127.0.0.1:{}/s?c={{card}}", addr.port())),
        fast(),
        &h.pki.ca_path,
        h.store.devices().clone(),
        tx,
    )
    .unwrap();
    h.outcomes = outcomes;
    h.bridge
        .submit(1, "r1", swipe_for("CARD0001", ttl))
        .unwrap();
    let o = outcome(&mut h).await;
    let mut requests = 0;
    if let Some(r) = seen.as_mut() {
        while r.try_recv().is_ok() {
            requests += 1;
        }
    }
    (h, o, requests)
}

#[tokio::test]
async fn certificate_that_does_not_verify_fails_without_sending() {
    let (h, o, requests) = one_swipe(Some(Mode::Ok), Duration::from_secs(5), false).await;
    match &o.outcome {
        Outcome::Failed { reason } => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(requests, 0, "no request over an unverified connection");
    let st = &h.bridge.status(None)[0];
    assert_eq!(st.failed, 1);
    assert!(st.last_error.as_ref().unwrap().1.contains("certificate"));
    assert!(
        h.bridge.metrics_text().contains(
            "scm_rfideas_attempt_failures_total{device=\"1/r1\",reason=\"certificate\"} 1"
        )
    );
}

#[tokio::test]
async fn redirect_is_not_followed() {
    let (h, o, requests) = one_swipe(Some(Mode::Redirect), Duration::from_secs(5), true).await;
    match &o.outcome {
        Outcome::Failed { reason } => {
            assert!(reason.contains("not followed"), "{reason}");
            assert!(reason.contains("elsewhere.example"), "{reason}");
            assert!(
                !reason.contains("steal"),
                "the Location's query is not echoed"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        requests, 1,
        "one request, no second one to the redirect target"
    );
    assert_eq!(h.bridge.status(None)[0].failed, 1);
}

#[tokio::test]
async fn refusal_4xx_is_final_and_5xx_is_retried_until_expiry() {
    let (_h, o, requests) = one_swipe(Some(Mode::Status(403)), Duration::from_secs(5), true).await;
    assert!(matches!(o.outcome, Outcome::Failed { .. }), "{o:?}");
    assert_eq!(requests, 1);
    let t0 = Instant::now();
    let (h, o, requests) =
        one_swipe(Some(Mode::Status(503)), Duration::from_millis(700), true).await;
    match &o.outcome {
        Outcome::Expired {
            attempts,
            last_error,
        } => {
            assert!(*attempts >= 2, "{attempts}");
            assert!(last_error.contains("503"), "{last_error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(requests >= 2);
    assert!(t0.elapsed() >= Duration::from_millis(650));
    assert_eq!(h.bridge.status(None)[0].expired, 1);
}

#[tokio::test]
async fn print_server_that_never_answers_is_timed_out_and_the_swipe_expires() {
    let t0 = Instant::now();
    let (h, o, _) = one_swipe(Some(Mode::Hang), Duration::from_millis(1_000), true).await;
    match &o.outcome {
        Outcome::Expired {
            attempts,
            last_error,
        } => {
            assert!(
                *attempts >= 2,
                "response timeout 300 ms: retried ({attempts})"
            );
            assert!(last_error.contains("no answer"), "{last_error}");
        }
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        h.bridge
            .metrics_text()
            .contains("scm_rfideas_swipes_total{device=\"1/r1\",outcome=\"expired\"} 1")
    );
}

#[tokio::test]
async fn print_server_down_expires_the_swipe_and_nothing_is_sent_late() {
    let (h, o, _) = one_swipe(None, Duration::from_millis(500), true).await;
    match &o.outcome {
        Outcome::Expired {
            attempts,
            last_error,
        } => {
            assert!(*attempts >= 2);
            assert!(last_error.contains("cannot connect"), "{last_error}");
        }
        other => panic!("{other:?}"),
    }
    let st = &h.bridge.status(None)[0];
    assert_eq!((st.expired, st.in_flight, st.delivered), (1, 0, 0));
    // An expired swipe is reported at once and never attempted.
    let (tx, mut rx) = mpsc::channel(8);
    let b = RfideasBridge::new(
        with_url("https://127.0.0.1:9/s?c={card}".into()),
        fast(),
        &h.pki.ca_path,
        h.store.devices().clone(),
        tx,
    )
    .unwrap();
    b.submit(1, "r1", swipe_for("OLD", Duration::ZERO)).unwrap();
    let o = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert!(
        matches!(o.outcome, Outcome::Expired { attempts: 0, .. }),
        "{o:?}"
    );
}

#[tokio::test]
async fn device_without_url_fails_and_in_flight_is_bounded() {
    let mut h = harness_with(
        vec![device(1, "reader-1.example")],
        RfideasSettings {
            in_flight_max: 1,
            ..fast()
        },
    );
    h.bridge
        .submit(1, "r1", swipe_for("NOURL", Duration::from_secs(5)))
        .unwrap();
    let o = outcome(&mut h).await;
    match o.outcome {
        Outcome::Failed { reason } => assert!(reason.contains("no swipe URL"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let (addr, _seen) = print_server(h.pki.server.clone(), Mode::Hang).await;
    let (tx, _outcomes) = mpsc::channel(8);
    let b = RfideasBridge::new(
        with_url(format!("https://127.0.0.1:{}/s?c={{card}}", addr.port())),
        RfideasSettings {
            in_flight_max: 1,
            ..fast()
        },
        &h.pki.ca_path,
        h.store.devices().clone(),
        tx,
    )
    .unwrap();
    b.submit(1, "r1", swipe_for("A1", Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        b.submit(1, "r1", swipe_for("A2", Duration::from_secs(5))),
        Err(SubmitError::QueueFull { max: 1 })
    );
    assert_eq!(
        b.submit(9, "r1", swipe_for("A3", Duration::from_secs(5))),
        Err(SubmitError::NoDevice)
    );
    b.stop();
}

#[tokio::test]
async fn listeners_and_status() {
    let mut d = device(1, "reader-1.example");
    d.listen = "127.0.0.1:0".into();
    let h = harness_with(
        vec![d, device(2, "reader-2.example")],
        RfideasSettings::default(),
    );
    let listeners = h.bridge.bind("127.0.0.1:0").await.unwrap();
    let shared = listeners.shared.as_ref().unwrap().local_addr().unwrap();
    let own = listeners.per_device[0].1.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.bridge.clone().serve(listeners, shutdown.clone()));
    // The device's own port serves it whatever the Host says.
    let mut c = tokio::net::TcpStream::connect(own).await.unwrap();
    c.write_all(&get("/config?x=1", "anything")).await.unwrap();
    let mut out = String::new();
    timeout(WAIT, c.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status_of(&out), 200, "{out}");
    let mut c = tokio::net::TcpStream::connect(shared).await.unwrap();
    c.write_all(&get("/settings", "reader-1.example"))
        .await
        .unwrap();
    let mut out = String::new();
    timeout(WAIT, c.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body_of(&out), "x=1\n");
    let st = h.bridge.status(Some(1)).remove(0);
    assert_eq!(st.listen, Some(own));
    assert_eq!(st.settings, 1);
    assert!(st.last_config.is_some());
    let line = st.summary(|t| t.to_string());
    assert!(
        line.starts_with("rfideas 1/r1 (host reader-1.example, id 02:53:43:00:01:"),
        "{line}"
    );
    assert!(line.contains("no swipe URL"), "{line}");
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap();
}

/// The example in docs/bridge-241.md, byte for byte.
#[tokio::test]
async fn the_documented_example_is_exact() {
    let h = harness_with(
        vec![device(1, "reader-1.localhost")],
        RfideasSettings::default(),
    );
    let req = "GET /config?mode=client&server_url=https%3A%2F%2Fpapercut.example%3A9192%2Frfid%3Fcard%3D%7Bcard%7D%26mac%3D%7Bdevice%7D%26t%3D%7Btime%7D HTTP/1.1\r\nHost: reader-1.localhost\r\n\r\n";
    let resp = exchange(&h, "127.0.0.1", req.as_bytes()).await;
    let expected = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 126\r\nCache-Control: no-store\r\nX-Device-Id: 02:53:43:00:01:ff\r\nX-Device-Host: reader-1.localhost\r\n\r\nmode=client\nserver_url=https%3A%2F%2Fpapercut.example%3A9192%2Frfid%3Fcard%3D%7Bcard%7D%26mac%3D%7Bdevice%7D%26t%3D%7Btime%7D\n";
    assert_eq!(resp, expected);
    let t = client::render(
        "https://papercut.example:9192/rfid?card={card}&mac={device}&t={time}",
        &client::Vars {
            card: "12345678",
            device: "02:53:43:00:01:ff",
            time_ms: 1_795_298_400_000,
            machine: 1,
            reader: "r1",
        },
    )
    .unwrap();
    assert_eq!(
        t.path_and_query,
        "/rfid?card=12345678&mac=02%3A53%3A43%3A00%3A01%3Aff&t=1795298400"
    );
    assert_eq!(t.authority(), "papercut.example:9192");
}

#[tokio::test]
async fn unlisted_peer_gets_403_without_sending_anything() {
    let h = harness();
    let (mut client, server) = tokio::io::duplex(4096);
    let task = tokio::spawn(h.bridge.clone().handle_conn(
        server,
        peer("10.9.9.9"),
        None,
        CancellationToken::new(),
    ));
    let mut out = Vec::new();
    // No request sent at all: the answer does not wait for one.
    let mut b = [0u8; 512];
    while !out.ends_with(b"\n") {
        let n = timeout(WAIT, client.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0);
        out.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&text), 403, "{text}");
    assert!(!text.contains("reader-"), "{text}");
    drop(client);
    task.await.unwrap().unwrap();
}

#[test]
fn a_missing_ca_file_is_named() {
    let db = tempfile::tempdir().unwrap();
    let store = Store::open(&db.path().join("scm.db")).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let missing = db.path().join("nope.pem");
    let e = RfideasBridge::new(
        vec![device(1, "a")],
        RfideasSettings::default(),
        &missing,
        store.devices().clone(),
        tx.clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("nope.pem") && e.contains("[rfideas_bridge] ca"),
        "{e}"
    );
    let empty = db.path().join("empty.pem");
    std::fs::write(&empty, "no pem here").unwrap();
    let e = RfideasBridge::new(
        vec![device(1, "a")],
        RfideasSettings::default(),
        &empty,
        store.devices().clone(),
        tx,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no PEM certificate"), "{e}");
}
