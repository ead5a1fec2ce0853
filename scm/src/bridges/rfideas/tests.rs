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
        address: String::new(),
        pin_cert: None,
        pin_sha256: String::new(),
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
    validate(&ok, &RfideasSettings::default(), &[1, 2], "127.0.0.1:8241").unwrap();
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
        let (k, msg) = validate(&d, &s, &[1, 2], "127.0.0.1:8241").unwrap_err();
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
    /// `503` to the first N requests, then `200`.
    FailFirst(u32),
}

/// An HTTPS print server on 127.0.0.1:0; every request target is sent on the channel.
async fn print_server(
    cfg: Arc<rustls::ServerConfig>,
    mode: Mode,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let (addr, mut from) = print_server_peers(cfg, mode).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((_, text)) = from.recv().await {
            let _ = tx.send(text);
        }
    });
    (addr, rx)
}

/// Like [`print_server`], with each request's source address.
async fn print_server_peers(
    cfg: Arc<rustls::ServerConfig>,
    mode: Mode,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<(std::net::IpAddr, String)>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, from)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let served = served.clone();
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
                let _ = tx.send((from.ip(), text));
                let nth = served.fetch_add(1, Ordering::SeqCst);
                let answer = match mode {
                    Mode::Ok => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_string(),
                    Mode::FailFirst(n) if nth < n => {
                        "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".to_string()
                    }
                    Mode::FailFirst(_) => {
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_string()
                    }
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
            event: "",
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

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

#[test]
fn resolution_rule_table() {
    let devices = [
        ("reader-1.example", None),
        ("reader-2.example", Some(ip("127.0.0.23"))),
        ("10.0.0.9", None),
        ("reader-4.example", Some(ip("fd00::4"))),
    ];
    // (connection's device, raw Host header, expected)
    type Case<'a> = (Option<usize>, Option<&'a str>, Result<usize, Unresolved>);
    let cases: Vec<Case<'_>> = vec![
        // A device's own listener (or address) wins whatever the Host says.
        (Some(0), Some("reader-2.example"), Ok(0)),
        (Some(1), None, Ok(1)),
        (Some(1), Some("127.0.0.99:8241"), Ok(1)),
        // On the shared listener: by host name, port and case ignored ...
        (None, Some("READER-1.example.:80"), Ok(0)),
        (None, Some("reader-2.example"), Ok(1)),
        // ... or by the device's address, with or without port.
        (None, Some("127.0.0.23"), Ok(1)),
        (None, Some("127.0.0.23:8241"), Ok(1)),
        (None, Some("[::ffff:127.0.0.23]:80"), Ok(1)),
        (None, Some("[fd00::4]:8241"), Ok(3)),
        (None, Some("fd00::4"), Ok(3)),
        // A host name that is an IP address still matches as a name.
        (None, Some("10.0.0.9:80"), Ok(2)),
        (
            None,
            Some("127.0.0.24:8241"),
            Err(Unresolved::Unknown("127.0.0.24".into())),
        ),
        (
            None,
            Some("nobody.example"),
            Err(Unresolved::Unknown("nobody.example".into())),
        ),
        (None, None, Err(Unresolved::NoHost)),
        (None, Some(""), Err(Unresolved::NoHost)),
    ];
    for (fixed, host, want) in cases {
        let h = host.map(host_name);
        assert_eq!(
            resolve(devices.iter().copied(), fixed, h.as_deref()),
            want,
            "{fixed:?} {host:?}"
        );
    }
    let addresses = || devices.iter().map(|(_, a)| *a);
    let sa = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
    // (listener's device, local address reached, expected)
    let cases: Vec<(Option<usize>, Option<SocketAddr>, Option<usize>)> = vec![
        (Some(0), sa("127.0.0.23:8241"), Some(0)),
        (None, sa("127.0.0.23:8241"), Some(1)),
        (None, sa("[::ffff:127.0.0.23]:80"), Some(1)),
        (None, sa("[fd00::4]:80"), Some(3)),
        (None, sa("127.0.0.1:8241"), None),
        (None, None, None),
    ];
    for (listener, local, want) in cases {
        assert_eq!(
            connection_device(addresses(), listener, local),
            want,
            "{listener:?} {local:?}"
        );
    }
}

#[test]
fn addresses_and_pins_are_validated_with_named_keys() {
    let ok = || {
        let mut d = vec![device(1, "reader-1.example"), device(2, "10.0.0.9")];
        d[0].address = "127.0.0.23".into();
        d[1].address = "127.0.0.24".into();
        d
    };
    let shared = "127.0.0.1:8241";
    validate(&ok(), &RfideasSettings::default(), &[1, 2], shared).unwrap();
    validate(&ok(), &RfideasSettings::default(), &[1, 2], "0.0.0.0:80").unwrap();
    type Change = Box<dyn Fn(&mut Vec<RfideasDevice>, &mut RfideasSettings)>;
    let cases: Vec<(Change, &str, &str)> = vec![
        (
            Box::new(|d, _| d[0].address = "127.0.0.23:80".into()),
            "rfideas[0].address",
            "not an IP address",
        ),
        (
            Box::new(|d, _| d[0].address = "reader-1.example".into()),
            "rfideas[0].address",
            "not an IP address",
        ),
        (
            Box::new(|d, _| d[1].address = "127.0.0.23".into()),
            "rfideas[1].address",
            "already the address of rfideas[0]",
        ),
        (
            Box::new(|d, _| d[1].address = "::ffff:127.0.0.23".into()),
            "rfideas[1].address",
            "already the address of rfideas[0]",
        ),
        (
            Box::new(|d, _| d[0].address = "0.0.0.0".into()),
            "rfideas[0].address",
            "not one host's address",
        ),
        (
            Box::new(|d, _| d[0].address = "127.0.0.1".into()),
            "rfideas[0].address",
            "shared listener's address",
        ),
        (
            Box::new(|d, _| d[0].listen = "127.0.0.23:9000".into()),
            "rfideas[0].address",
            "not both",
        ),
        (
            Box::new(|d, _| d[0].address = "10.0.0.9".into()),
            "rfideas[0].address",
            "host of rfideas[1]",
        ),
        (
            Box::new(|d, _| {
                d[1].address = String::new();
                d[1].listen = "127.0.0.23:8241".into();
            }),
            "rfideas[0].address",
            "already rfideas[1].listen",
        ),
        (
            Box::new(|d, _| d[0].pin_sha256 = "abcd".into()),
            "rfideas[0].pin_sha256",
            "64 hex digits",
        ),
        (
            Box::new(|d, _| {
                d[0].pin_sha256 = "ab".repeat(32);
                d[0].pin_cert = Some("print.pem".into());
            }),
            "rfideas[0].pin_sha256",
            "not both",
        ),
        (
            Box::new(|_, s| s.pin_sha256 = "xyz".into()),
            "rfideas_bridge.pin_sha256",
            "64 hex digits",
        ),
    ];
    for (change, key, needle) in cases {
        let mut d = ok();
        let mut s = RfideasSettings::default();
        change(&mut d, &mut s);
        let (k, msg) = validate(&d, &s, &[1, 2], shared).unwrap_err();
        assert_eq!(k, key, "{msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    let (k, msg) = validate(&ok(), &RfideasSettings::default(), &[1, 2], "").unwrap_err();
    assert_eq!(k, "rfideas[0].address");
    assert!(msg.contains("needs [listen] rfideas"), "{msg}");
}

/// A print server that addresses the reader by IP sends `Host: IP:PORT`; today's bridge
/// answered 404 (it only knew host names).
#[tokio::test]
async fn a_host_header_with_the_devices_address_names_it() {
    let mut d = device(2, "reader-2.example");
    d.address = "127.0.0.23".into();
    let h = harness_with(
        vec![device(1, "reader-1.example"), d],
        RfideasSettings::default(),
    );
    for host in ["127.0.0.23:8241", "127.0.0.23", "[::ffff:127.0.0.23]:80"] {
        let resp = exchange(&h, "127.0.0.1", &get("/config?mode=client", host)).await;
        assert_eq!(status_of(&resp), 200, "{host}: {resp}");
        assert!(resp.contains("X-Device-Host: reader-2.example"), "{resp}");
    }
    let resp = exchange(&h, "127.0.0.1", &get("/settings", "127.0.0.24:8241")).await;
    assert_eq!(status_of(&resp), 404, "{resp}");
    assert_eq!(h.bridge.settings_of(1, "r1").unwrap().len(), 0);
}

async fn read_all(addr: SocketAddr, req: &[u8]) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(req).await.unwrap();
    let mut out = String::new();
    timeout(WAIT, c.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn each_address_serves_its_device_and_its_swipes_leave_from_it() {
    let h0 = harness_with(Vec::new(), fast());
    let (server, mut seen) = print_server_peers(h0.pki.server.clone(), Mode::Ok).await;
    let url = format!("https://127.0.0.1:{}/s?c={{card}}", server.port());
    let mut devices = Vec::new();
    for (m, a) in [(1, "127.0.0.21"), (2, "127.0.0.22")] {
        let mut d = device(m, &format!("reader-{m}.example"));
        d.address = a.into();
        devices.push(d);
    }
    devices.push(device(3, "reader-3.example"));
    let (tx, mut outcomes) = mpsc::channel(8);
    let bridge = RfideasBridge::new(
        devices,
        fast(),
        &h0.pki.ca_path,
        h0.store.devices().clone(),
        tx,
    )
    .unwrap();
    let listeners = bridge.bind("127.0.0.1:0").await.unwrap();
    let port = listeners
        .shared
        .as_ref()
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let own: Vec<SocketAddr> = listeners
        .per_device
        .iter()
        .map(|(_, l)| l.local_addr().unwrap())
        .collect();
    assert_eq!(
        own,
        [
            SocketAddr::new(ip("127.0.0.21"), port),
            SocketAddr::new(ip("127.0.0.22"), port)
        ],
        "one listener per address, on the shared listener's port"
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(bridge.clone().serve(listeners, shutdown.clone()));
    // The address names the device, whatever the Host (here another device's name).
    for (m, addr) in [(1u16, own[0]), (2, own[1])] {
        let q = format!("/config?server_url={}", http::percent_encode(&url));
        let out = read_all(addr, &get(&q, "reader-3.example")).await;
        assert_eq!(status_of(&out), 200, "{out}");
        assert!(
            out.contains(&format!("X-Device-Host: reader-{m}.example")),
            "{out}"
        );
    }
    assert_eq!(bridge.route(3, "r1"), Route::NotConfigured);
    assert_eq!(bridge.status(Some(2))[0].listen, Some(own[1]));
    let line = bridge.status(Some(2))[0].summary(|t| t.to_string());
    assert!(
        line.starts_with("rfideas 2/r1 (host reader-2.example, address 127.0.0.22, id "),
        "{line}"
    );
    // Each device's swipe comes from its own address.
    for (m, from) in [(1u16, "127.0.0.21"), (2, "127.0.0.22")] {
        bridge
            .submit(
                m,
                "r1",
                swipe_for(&format!("CARD000{m}"), Duration::from_secs(5)),
            )
            .unwrap();
        let (peer, text) = timeout(WAIT, seen.recv()).await.unwrap().unwrap();
        assert_eq!(peer, ip(from), "{text}");
        assert!(text.contains(&format!("c=CARD000{m}")), "{text}");
        let o = timeout(WAIT, outcomes.recv()).await.unwrap().unwrap();
        assert!(matches!(o.outcome, Outcome::Delivered { .. }), "{o:?}");
    }
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_wildcard_shared_listener_tells_devices_apart_by_the_local_address() {
    let mut d = device(2, "reader-2.example");
    d.address = "127.0.0.25".into();
    let h = harness_with(
        vec![device(1, "reader-1.example"), d],
        RfideasSettings::default(),
    );
    let listeners = h.bridge.bind("0.0.0.0:0").await.unwrap();
    assert!(
        listeners.per_device.is_empty(),
        "the wildcard covers the address"
    );
    let port = listeners
        .shared
        .as_ref()
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(h.bridge.clone().serve(listeners, shutdown.clone()));
    let at = |a: &str| SocketAddr::new(ip(a), port);
    let out = read_all(at("127.0.0.25"), &get("/config?x=2", "reader-1.example")).await;
    assert!(out.contains("X-Device-Host: reader-2.example"), "{out}");
    let out = read_all(at("127.0.0.1"), &get("/config?x=1", "reader-1.example")).await;
    assert!(out.contains("X-Device-Host: reader-1.example"), "{out}");
    assert_eq!(h.bridge.settings_of(1, "r1").unwrap()["x"], "1");
    assert_eq!(h.bridge.settings_of(2, "r1").unwrap()["x"], "2");
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_retried_attempt_carries_the_same_event_id() {
    let mut h = harness_with(Vec::new(), fast());
    let (addr, mut seen) = print_server(h.pki.server.clone(), Mode::FailFirst(2)).await;
    let (tx, outcomes) = mpsc::channel(8);
    h.bridge = RfideasBridge::new(
        with_url(format!(
            "https://127.0.0.1:{}/s?c={{card}}&e={{event}}",
            addr.port()
        )),
        fast(),
        &h.pki.ca_path,
        h.store.devices().clone(),
        tx,
    )
    .unwrap();
    h.outcomes = outcomes;
    let mut swipe = swipe_for("RETRY001", Duration::from_secs(5));
    swipe.event_id = "7-0000001f/3".into();
    h.bridge.submit(1, "r1", swipe).unwrap();
    let o = outcome(&mut h).await;
    assert!(
        matches!(o.outcome, Outcome::Delivered { attempts: 3, .. }),
        "{o:?}"
    );
    let mut targets = Vec::new();
    while let Ok(r) = seen.try_recv() {
        targets.push(r.lines().next().unwrap().to_string());
    }
    assert_eq!(targets.len(), 3, "{targets:?}");
    for t in &targets {
        assert!(t.contains("&e=7-0000001f%2F3 "), "{t}");
    }
}

/// A self-signed print-server certificate, for `sans`, valid from `from` to `until`
/// (offsets from now), with `CA:TRUE` when `ca`: (PEM, server configuration).
fn self_signed(
    sans: &[&str],
    from: time::Duration,
    until: time::Duration,
    ca: bool,
) -> (String, Arc<rustls::ServerConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "print server");
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + from;
    params.not_after = now + until;
    let cert = params.self_signed(&key).unwrap();
    let der = cert.der().clone();
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![der], key_der)
    .unwrap();
    (cert.pem(), Arc::new(server))
}

fn valid_ca_true() -> (String, Arc<rustls::ServerConfig>) {
    self_signed(
        &["127.0.0.1", "print.example"],
        time::Duration::hours(-1),
        time::Duration::days(30),
        true,
    )
}

/// One swipe to a print server using `server`, with a bridge built by `adjust` from the
/// device (URL set) and the settings; returns the outcome and the requests it received.
async fn pinned_swipe(
    server: Arc<rustls::ServerConfig>,
    adjust: impl FnOnce(&mut RfideasDevice, &mut RfideasSettings, &std::path::Path),
) -> (OutcomeReport, usize) {
    let h = harness_with(Vec::new(), fast());
    let (addr, mut seen) = print_server(server, Mode::Ok).await;
    let mut devices = with_url(format!("https://127.0.0.1:{}/s?c={{card}}", addr.port()));
    let mut settings = fast();
    adjust(&mut devices[0], &mut settings, h._db.path());
    let (tx, mut outcomes) = mpsc::channel(8);
    let bridge = RfideasBridge::new(
        devices,
        settings,
        &h.pki.ca_path,
        h.store.devices().clone(),
        tx,
    )
    .unwrap();
    bridge
        .submit(1, "r1", swipe_for("PIN00001", Duration::from_secs(5)))
        .unwrap();
    let o = timeout(WAIT, outcomes.recv()).await.unwrap().unwrap();
    let mut requests = 0;
    while seen.try_recv().is_ok() {
        requests += 1;
    }
    (o, requests)
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn sha256_hex(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    hex::encode(pin::fingerprint(&der))
}

/// The print server's own self-signed `CA:TRUE` certificate given as the CA: WebPKI alone
/// refuses it as a server's certificate (`CaUsedAsEndEntity`).
#[tokio::test]
async fn a_self_signed_ca_true_certificate_given_as_the_ca_is_accepted() {
    let (pem, server) = valid_ca_true();
    let (o, requests) = pinned_swipe(server, |_, s, dir| {
        s.ca = Some(write(dir, "print-ca.pem", &pem));
    })
    .await;
    assert!(matches!(o.outcome, Outcome::Delivered { .. }), "{o:?}");
    assert_eq!(requests, 1);
}

#[tokio::test]
async fn a_pinned_certificate_is_accepted_by_file_or_hash_per_device_or_bridge() {
    let (pem, server) = valid_ca_true();
    let (o, _) = pinned_swipe(server.clone(), |d, _, dir| {
        d.pin_cert = Some(write(dir, "pin.pem", &pem));
    })
    .await;
    assert!(matches!(o.outcome, Outcome::Delivered { .. }), "{o:?}");
    let hash = sha256_hex(&pem);
    let (o, _) = pinned_swipe(server.clone(), |_, s, _| s.pin_sha256 = hash.clone()).await;
    assert!(matches!(o.outcome, Outcome::Delivered { .. }), "{o:?}");
    // A leaf without CA:TRUE, pinned by its hash with ':' separators.
    let (pem, server) = self_signed(
        &["127.0.0.1"],
        time::Duration::hours(-1),
        time::Duration::days(1),
        false,
    );
    let colons = sha256_hex(&pem)
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let (o, _) = pinned_swipe(server, |d, _, _| d.pin_sha256 = colons.clone()).await;
    assert!(matches!(o.outcome, Outcome::Delivered { .. }), "{o:?}");
}

fn refused(o: &OutcomeReport, needle: &str) {
    match &o.outcome {
        Outcome::Failed { reason } => {
            assert!(reason.contains("certificate was not accepted"), "{reason}");
            assert!(reason.contains(needle), "{needle:?} not in {reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_pin_refuses_another_certificate_with_the_same_name_an_expired_one_and_a_wrong_name() {
    let (pinned, _) = valid_ca_true();
    let (_, impostor) = valid_ca_true();
    let (o, requests) = pinned_swipe(impostor.clone(), |d, _, dir| {
        d.pin_cert = Some(write(dir, "pin.pem", &pinned));
    })
    .await;
    refused(&o, "not the pinned certificate");
    assert_eq!(requests, 0, "nothing sent over an unpinned connection");
    // The device's pin overrides the bridge's, which would accept the impostor.
    let (o, _) = pinned_swipe(impostor, |d, s, dir| {
        d.pin_cert = Some(write(dir, "pin.pem", &pinned));
        s.pin_sha256 = "00".repeat(32);
    })
    .await;
    refused(&o, "not the pinned certificate");
    let (expired_pem, expired) = self_signed(
        &["127.0.0.1"],
        time::Duration::days(-30),
        time::Duration::days(-1),
        true,
    );
    let (o, requests) = pinned_swipe(expired, |d, _, dir| {
        d.pin_cert = Some(write(dir, "pin.pem", &expired_pem));
    })
    .await;
    refused(&o, "Expired");
    assert_eq!(requests, 0);
    let (other_pem, other_name) = self_signed(
        &["print.example"],
        time::Duration::hours(-1),
        time::Duration::days(1),
        true,
    );
    let hash = sha256_hex(&other_pem);
    let (o, requests) = pinned_swipe(other_name, |_, s, _| s.pin_sha256 = hash.clone()).await;
    refused(&o, "NotValidForName");
    assert_eq!(requests, 0);
}

#[test]
fn an_unreadable_pin_file_is_named() {
    let db = tempfile::tempdir().unwrap();
    let store = Store::open(&db.path().join("scm.db")).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let mut d = device(1, "a");
    d.pin_cert = Some(db.path().join("missing-pin.pem"));
    let e = RfideasBridge::new(
        vec![d],
        RfideasSettings::default(),
        &db.path().join("no-ca-needed.pem"),
        store.devices().clone(),
        tx,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("missing-pin.pem") && e.contains("rfideas[0].pin_cert"),
        "{e}"
    );
}
