//! Hostile clients against every TLS port, with numbers (issue 7, docs/security.md):
//!
//! * the mutual-TLS negative matrix: one table of named cases, each refused, its reason
//!   in the refusing process's log and its metrics counter incremented;
//! * per-source connection caps: connections held open before authentication from one
//!   address (stalled telnet logins, stalled TLS handshakes) do not keep an operator or a
//!   machine from another address out;
//! * 100 x 1 MiB of garbage to each TLS port of the SCM, with its memory growth measured
//!   from `/proc/PID/status` and bounded;
//! * certificate and CRL reload on SIGHUP: sessions whose certificate is now revoked are
//!   closed, the others keep running, and a bad file keeps the old configuration.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{Fleet, RawTelnet, WAIT};
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, Eku, IssuedCert, LeafSpec, Validity};
use scm_certs::tls::{self as sctls, TlsPolicy};
use scm_common::lock::LockExt;
use scm_proto::io::ReadError;
use scm_proto::v1::{self, Message};
use scm_proto::{Frame, FrameError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::mtls::{no_cert_config, tls12_only_config};
use super::{FrameClient, Pems, dev_pems, init, rt};

// ---------------------------------------------------------------------------------------
// Helpers

/// GET /metrics from `addr`.
fn scrape(addr: SocketAddr) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("connect to metrics");
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send GET");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read metrics");
    out
}

/// The value of one series (`name{labels}`), 0 when absent.
fn metric(addr: SocketAddr, series: &str) -> u64 {
    let text = scrape(addr);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn hello(request_id: u64, id: u16) -> Frame {
    Message::Hello(v1::Hello {
        request_id,
        agent_version: "hardening-test".into(),
        ..Default::default()
    })
    .to_frame(id)
    .expect("HELLO frame")
}

fn ca(dev: &Path) -> Ca {
    Ca::load(&dev.join("ca.pem"), &dev.join("ca-key.pem")).expect("load dev CA")
}

fn issued_pems(ca_pem: &str, leaf: &IssuedCert) -> Pems {
    Pems {
        ca: ca_pem.to_string(),
        cert: leaf.cert_pem.clone(),
        key: leaf.key_pem.clone(),
    }
}

/// A leaf from the dev CA.
fn dev_leaf(dev: &Path, identity: Identity, validity: Validity, eku: Option<Eku>) -> Pems {
    let ca = ca(dev);
    let mut spec = LeafSpec::new(identity, validity);
    if let Some(e) = eku {
        spec.eku = e;
    }
    let leaf = ca.issue(&spec).expect("issue");
    issued_pems(ca.cert_pem(), &leaf)
}

fn days(from: i64, to: i64) -> Validity {
    let now = time::OffsetDateTime::now_utc();
    Validity {
        not_before: now + time::Duration::days(from),
        not_after: now + time::Duration::days(to),
    }
}

/// A leaf from a new CA with the dev CA's exact subject (`CN=SCM dev CA`) and another key;
/// `ca` of the result is the dev CA (what the client trusts).
fn fake_root_leaf(dev: &Path, identity: Identity) -> Pems {
    let fake = Ca::generate("SCM dev CA", &Validity::days_from_now(30)).expect("fake root");
    let leaf = fake
        .issue(&LeafSpec::new(identity, Validity::days_from_now(30)))
        .expect("fake leaf");
    issued_pems(
        &std::fs::read_to_string(dev.join("ca.pem")).expect("ca.pem"),
        &leaf,
    )
}

fn client_config(p: &Pems) -> Arc<rustls::ClientConfig> {
    sctls::client_config_from_pem(&p.ca, &p.cert, &p.key, TlsPolicy::default())
        .expect("client config")
}

/// A ClientHello offering TLS 1.3 and 1.2 with only suites outside the allow-list:
/// TLS_AES_128_CCM_SHA256, TLS_AES_128_CCM_8_SHA256, and the TLS 1.2 CBC, 3DES and RC4
/// suites (TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, TLS_RSA_WITH_AES_128_CBC_SHA,
/// TLS_RSA_WITH_3DES_EDE_CBC_SHA, TLS_RSA_WITH_RC4_128_SHA).
fn weak_suites_client_hello() -> Vec<u8> {
    let suites: [u16; 6] = [0x1304, 0x1305, 0xc009, 0x002f, 0x000a, 0x0005];
    let mut ext = Vec::new();
    let mut push_ext = |ty: u16, data: &[u8]| {
        ext.extend_from_slice(&ty.to_be_bytes());
        ext.extend_from_slice(&u16::try_from(data.len()).expect("len").to_be_bytes());
        ext.extend_from_slice(data);
    };
    push_ext(0x002b, &[4, 0x03, 0x04, 0x03, 0x03]); // supported_versions: 1.3, 1.2
    push_ext(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, secp256r1
    push_ext(0x000b, &[1, 0]); // ec_point_formats: uncompressed
    push_ext(0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // sig algs: ecdsa p256, rsa-pss
    let mut share = vec![0, 36, 0x00, 0x1d, 0, 32];
    share.extend_from_slice(&[9u8; 32]);
    push_ext(0x0033, &share); // key_share: x25519
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(32);
    body.extend_from_slice(&[5u8; 32]); // legacy session id
    body.extend_from_slice(&u16::try_from(suites.len() * 2).expect("len").to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&u16::try_from(ext.len()).expect("len").to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&u32::try_from(body.len()).expect("len").to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(hs.len()).expect("len").to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// Where a case is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// The SCM's agent link.
    Agents,
    /// The SCM's TLS telnet port.
    TelnetTls,
    /// The SCM's admin API.
    Admin,
    /// Agent 1's config port.
    AgentConfig,
    /// Agent 3 connecting (as a client) to a server posing as the SCM.
    AgentLink,
}

impl Port {
    fn listener(self) -> &'static str {
        match self {
            Port::Agents => "agents",
            Port::TelnetTls => "telnet-tls",
            Port::Admin => "admin",
            Port::AgentConfig => "config",
            Port::AgentLink => "link",
        }
    }
}

/// What the hostile side does.
enum How {
    /// A TLS client with this configuration (then a read, or a HELLO on the agent link).
    Tls(Arc<rustls::ClientConfig>),
    /// The raw weak-suites ClientHello.
    WeakHello,
    /// A valid machine 2 certificate saying HELLO as machine 1.
    HelloAs(Pems),
    /// The server the agent reaches presents this certificate.
    FakeScm(Arc<rustls::ServerConfig>),
}

struct Case {
    name: &'static str,
    port: Port,
    how: How,
    reason: &'static str,
}

/// What the client saw.
async fn try_tls(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, server: &Identity) -> String {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut tls = match sctls::connect(&connector, tcp, server, WAIT).await {
        Ok(t) => t,
        Err(e) => return format!("handshake failed ({})", e.reason()),
    };
    // The server's refusal (TLS 1.3) arrives as an alert on the first read.
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
        Err(_) => "NOT REFUSED: no answer, connection open".into(),
        Ok(Ok(0)) => "closed".into(),
        Ok(Ok(n)) => format!("NOT REFUSED: received {n} bytes"),
        Ok(Err(e)) => match e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) {
            Some(r) => format!(
                "alert ({})",
                sctls::HandshakeError::Tls(std::io::Error::other(r.clone())).reason()
            ),
            None if e.kind() == std::io::ErrorKind::UnexpectedEof => "closed".to_string(),
            None => format!("io: {e}"),
        },
    }
}

async fn try_weak_hello(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("TCP connect");
    tcp.write_all(&weak_suites_client_hello())
        .await
        .expect("send ClientHello");
    let mut buf = [0u8; 7];
    match tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf)).await {
        Err(_) => "NOT REFUSED: no answer".into(),
        Ok(Err(e)) => format!("closed without an alert: {e}"),
        // Alert record, TLS 1.2 framing, 2 bytes: fatal (2), description.
        Ok(Ok(_)) if buf[..6] == [0x15, 0x03, 0x03, 0x00, 0x02, 0x02] => {
            format!("alert {}", buf[6])
        }
        Ok(Ok(_)) => format!("NOT REFUSED: answered {buf:02x?}"),
    }
}

async fn try_hello_as(addr: SocketAddr, pems: &Pems) -> String {
    let mut c = FrameClient::connect(addr, pems, Identity::Scm)
        .await
        .expect("connect");
    c.send(&hello(9, 1)).await.expect("send HELLO");
    match c.recv().await {
        Ok(Some(f)) => match Message::decode(&f) {
            Ok(Message::Nack(n)) => format!("NACK {:?}", n.reason()),
            other => format!("NOT REFUSED: {other:?}"),
        },
        Ok(None) => "closed".into(),
        Err(e) => match e.downcast_ref::<ReadError>() {
            Some(ReadError::Frame(FrameError::Io(io))) => format!("io: {io}"),
            _ => format!("error: {e}"),
        },
    }
}

/// A TLS server the agent under test is pointed at; each accepted connection gets the
/// configuration in `current`.
struct FakeScm {
    addr: SocketAddr,
    current: Arc<Mutex<Option<Arc<rustls::ServerConfig>>>>,
    _rt: tokio::runtime::Runtime,
}

fn fake_scm() -> FakeScm {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake SCM");
    let addr = std_listener.local_addr().expect("addr");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let current: Arc<Mutex<Option<Arc<rustls::ServerConfig>>>> = Arc::default();
    let cur = current.clone();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let cfg = cur.lock_unpoisoned().clone();
            if let Some(cfg) = cfg {
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    let _ = tokio::time::timeout(WAIT, acceptor.accept(tcp)).await;
                });
            }
        }
    });
    FakeScm {
        addr,
        current,
        _rt: rt,
    }
}

fn server_config(p: &Pems) -> Arc<rustls::ServerConfig> {
    sctls::server_config_from_pem(&p.ca, &p.cert, &p.key, &[], TlsPolicy::default(), &[])
        .expect("server config")
}

/// Writes `dev/NAME` and adds it to `[tls] crls` of `dev/scm.toml`.
fn add_crl(dev: &Path, name: &str, pem: &str) {
    std::fs::write(dev.join(name), pem).expect("write CRL");
    let toml = dev.join("scm.toml");
    let text = std::fs::read_to_string(&toml).expect("scm.toml");
    let with = text.replacen("[tls]\n", &format!("[tls]\ncrls = [\"{name}\"]\n"), 1);
    assert_ne!(with, text, "[tls] found in scm.toml");
    std::fs::write(&toml, with).expect("write scm.toml");
}

fn crl(dev: &Path, serials: &[Vec<u8>]) -> String {
    let now = time::OffsetDateTime::now_utc();
    ca(dev)
        .crl_pem(
            serials,
            now - time::Duration::minutes(5),
            now + time::Duration::days(7),
        )
        .expect("CRL")
}

fn metrics_env() -> (&'static str, String) {
    ("SCM__LISTEN__METRICS", "127.0.0.1:0".to_string())
}

fn agent_metrics_env() -> (&'static str, String) {
    ("AGENT__LISTEN__METRICS", "127.0.0.1:0".to_string())
}

fn push_is_acked(fleet: &Fleet, id: u16, text: &str) {
    let f = fleet.dir.path().join(format!("push-{id}.cfg"));
    std::fs::write(&f, text).expect("write");
    let (code, out, err) = fleet.backoffice(&[
        "push",
        "--machine",
        &id.to_string(),
        "--file",
        f.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "push to machine {id}: {out}{err}");
    assert!(out.starts_with(&format!("250 ACK machine {id}")), "{out}");
}

/// A fleet whose SCM and agents expose metrics, built from an init-dev directory.
fn fleet_from(
    dir: tempfile::TempDir,
    password: String,
    scm_env: &[(&'static str, String)],
    agents: &[u16],
) -> Fleet {
    let mut env = vec![metrics_env()];
    env.extend(scm_env.iter().cloned());
    Fleet::from_dir(dir, password, &env, &[agent_metrics_env()], agents)
}

// ---------------------------------------------------------------------------------------
// The mutual-TLS negative matrix

/// Every case of the matrix is refused, the refusing process logs the reason label, and
/// the counter for that reason goes up by one (at least one for the agent's link, which
/// retries). Afterwards the SCM and agent 1 still serve a legitimate push.
#[test]
fn mtls_negative_matrix() {
    init();
    let (dir, password) = Fleet::init(&[1, 2, 3]);
    let dev = dir.path().join("dev");
    // Certificates the CRL loaded at start revokes: a machine 1 and an operator one.
    let dev_ca = ca(&dev);
    let revoked_machine = dev_ca
        .issue(&LeafSpec::new(
            Identity::Machine(1),
            Validity::days_from_now(30),
        ))
        .expect("issue");
    let revoked_operator = dev_ca
        .issue(&LeafSpec::new(
            Identity::operator("admin").expect("name"),
            Validity::days_from_now(30),
        ))
        .expect("issue");
    add_crl(
        &dev,
        "revoked.crl.pem",
        &crl(
            &dev,
            &[
                revoked_machine.serial.clone(),
                revoked_operator.serial.clone(),
            ],
        ),
    );
    let ca_pem = dev_ca.cert_pem().to_string();
    let setup = Instant::now();
    let fleet = fleet_from(dir, password, &[], &[1]);
    eprintln!("matrix: SCM and agent 1 up in {:?}", setup.elapsed());
    let scm_metrics = fleet.scm.listening("metrics");
    let admin = fleet.admin();
    let agent1 = fleet.agent(1);
    let config_port = agent1.listening("config");
    let agent1_metrics = agent1.listening("metrics");

    // Agent 3 talks to a fake SCM.
    let fake = fake_scm();
    let expired_scm = dev_leaf(&dev, Identity::Scm, days(-10, -1), None);
    *fake.current.lock().expect("lock") = Some(server_config(&expired_scm));
    let agent3 = Fleet::start_agent(fleet.dir.path(), 3, fake.addr, &[agent_metrics_env()]);
    let agent3_metrics = agent3.listening("metrics");

    let m1 = dev_pems(&dev, "machine-1");
    let op = dev_pems(&dev, "operator-admin");
    let operator = || Identity::operator("admin").expect("name");
    let cases = vec![
        // The agent link (machines).
        Case {
            name: "no client certificate",
            port: Port::Agents,
            how: How::Tls(no_cert_config(&dev)),
            reason: "no_certificate",
        },
        Case {
            name: "expired machine certificate",
            port: Port::Agents,
            how: How::Tls(client_config(&dev_leaf(
                &dev,
                Identity::Machine(1),
                days(-10, -1),
                None,
            ))),
            reason: "expired",
        },
        Case {
            name: "machine certificate not yet valid",
            port: Port::Agents,
            how: How::Tls(client_config(&dev_leaf(
                &dev,
                Identity::Machine(1),
                days(1, 30),
                None,
            ))),
            reason: "not_yet_valid",
        },
        Case {
            name: "revoked machine certificate (CRL)",
            port: Port::Agents,
            how: How::Tls(client_config(&issued_pems(&ca_pem, &revoked_machine))),
            reason: "revoked",
        },
        Case {
            name: "certificate from an unknown CA",
            port: Port::Agents,
            how: How::Tls(client_config(&{
                let other = Ca::generate("Other CA", &Validity::days_from_now(30)).expect("CA");
                let leaf = other
                    .issue(&LeafSpec::new(
                        Identity::Machine(1),
                        Validity::days_from_now(30),
                    ))
                    .expect("leaf");
                issued_pems(&ca_pem, &leaf)
            })),
            reason: "unknown_ca",
        },
        Case {
            name: "fake root: same subject as the CA, other key",
            port: Port::Agents,
            how: How::Tls(client_config(&fake_root_leaf(&dev, Identity::Machine(1)))),
            reason: "unknown_ca",
        },
        Case {
            name: "server-only certificate used as a client (wrong EKU)",
            port: Port::Agents,
            how: How::Tls(client_config(&dev_leaf(
                &dev,
                Identity::Machine(1),
                Validity::days_from_now(30),
                Some(Eku::ServerOnly),
            ))),
            reason: "wrong_purpose",
        },
        Case {
            name: "operator certificate on the agent link",
            port: Port::Agents,
            how: How::Tls(client_config(&op)),
            reason: "wrong_role",
        },
        Case {
            name: "TLS 1.2-only client",
            port: Port::Agents,
            how: How::Tls(tls12_only_config(&m1)),
            reason: "protocol_version",
        },
        Case {
            name: "only weak cipher suites offered",
            port: Port::Agents,
            how: How::WeakHello,
            reason: "no_common_cipher",
        },
        Case {
            name: "another machine's identity (machine 2 says HELLO as machine 1)",
            port: Port::Agents,
            how: How::HelloAs(dev_pems(&dev, "machine-2")),
            reason: "wrong_machine_id",
        },
        // TLS telnet (operators).
        Case {
            name: "no client certificate",
            port: Port::TelnetTls,
            how: How::Tls(no_cert_config(&dev)),
            reason: "no_certificate",
        },
        Case {
            name: "machine certificate on the operator port",
            port: Port::TelnetTls,
            how: How::Tls(client_config(&m1)),
            reason: "wrong_role",
        },
        Case {
            name: "revoked operator certificate (CRL)",
            port: Port::TelnetTls,
            how: How::Tls(client_config(&issued_pems(&ca_pem, &revoked_operator))),
            reason: "revoked",
        },
        Case {
            name: "only weak cipher suites offered",
            port: Port::TelnetTls,
            how: How::WeakHello,
            reason: "no_common_cipher",
        },
        // The admin API (operators).
        Case {
            name: "no client certificate",
            port: Port::Admin,
            how: How::Tls(no_cert_config(&dev)),
            reason: "no_certificate",
        },
        Case {
            name: "expired operator certificate",
            port: Port::Admin,
            how: How::Tls(client_config(&dev_leaf(
                &dev,
                operator(),
                days(-10, -1),
                None,
            ))),
            reason: "expired",
        },
        Case {
            name: "machine certificate on the admin API",
            port: Port::Admin,
            how: How::Tls(client_config(&m1)),
            reason: "wrong_role",
        },
        Case {
            name: "TLS 1.2-only client",
            port: Port::Admin,
            how: How::Tls(tls12_only_config(&op)),
            reason: "protocol_version",
        },
        // Agent 1's config port (only the SCM may push).
        Case {
            name: "agent certificate acting as the SCM",
            port: Port::AgentConfig,
            how: How::Tls(client_config(&m1)),
            reason: "wrong_role",
        },
        Case {
            name: "another machine's certificate",
            port: Port::AgentConfig,
            how: How::Tls(client_config(&dev_pems(&dev, "machine-2"))),
            reason: "wrong_role",
        },
        Case {
            name: "expired SCM certificate",
            port: Port::AgentConfig,
            how: How::Tls(client_config(&dev_leaf(
                &dev,
                Identity::Scm,
                days(-10, -1),
                None,
            ))),
            reason: "expired",
        },
        Case {
            name: "SCM certificate from a fake root (same subject, other key)",
            port: Port::AgentConfig,
            how: How::Tls(client_config(&fake_root_leaf(&dev, Identity::Scm))),
            reason: "unknown_ca",
        },
        // Agent 3 refusing the server it reaches as "the SCM".
        Case {
            name: "agent refuses an expired SCM certificate",
            port: Port::AgentLink,
            how: How::FakeScm(server_config(&expired_scm)),
            reason: "expired",
        },
        Case {
            name: "agent refuses an SCM certificate from a fake root",
            port: Port::AgentLink,
            how: How::FakeScm(server_config(&fake_root_leaf(&dev, Identity::Scm))),
            reason: "unknown_ca",
        },
        Case {
            name: "agent refuses another machine posing as the SCM",
            port: Port::AgentLink,
            how: How::FakeScm(server_config(&dev_pems(&dev, "machine-2"))),
            reason: "wrong_peer",
        },
    ];
    assert!(cases.len() >= 12);

    let mut failures = Vec::new();
    let mut table = Vec::new();
    let runtime = rt();
    for case in &cases {
        let label = format!("{} / {}", case.port.listener(), case.name);
        let (proc_, metrics_addr, series, needle) = match (case.port, &case.how) {
            (Port::Agents, How::HelloAs(_)) => (
                &fleet.scm,
                scm_metrics,
                format!("scm_frames_refused_total{{reason=\"{}\"}}", case.reason),
                "closed after NACK: frame names machine 1 but the certificate belongs to machine 2"
                    .to_string(),
            ),
            (Port::Agents | Port::TelnetTls | Port::Admin, _) => (
                &fleet.scm,
                scm_metrics,
                format!(
                    "scm_handshake_failures_total{{listener=\"{}\",reason=\"{}\"}}",
                    case.port.listener(),
                    case.reason
                ),
                format!("TLS handshake refused ({})", case.reason),
            ),
            (Port::AgentConfig, _) => (
                agent1,
                agent1_metrics,
                format!(
                    "agent_handshake_failures_total{{reason=\"{}\"}}",
                    case.reason
                ),
                format!("TLS handshake refused ({})", case.reason),
            ),
            (Port::AgentLink, _) => (
                &agent3,
                agent3_metrics,
                format!(
                    "agent_handshake_failures_total{{reason=\"{}\"}}",
                    case.reason
                ),
                format!("TLS handshake refused ({})", case.reason),
            ),
        };
        let case_started = Instant::now();
        let before_count = metric(metrics_addr, &series);
        let before_lines = proc_.logs().matches(&needle).count();
        let seen = runtime.block_on(async {
            match (&case.how, case.port) {
                (How::Tls(cfg), Port::AgentConfig) => {
                    try_tls(config_port, cfg.clone(), &Identity::Machine(1)).await
                }
                (How::Tls(cfg), port) => {
                    let addr = match port {
                        Port::Agents => fleet.agents_addr,
                        Port::TelnetTls => fleet.telnet_tls,
                        _ => admin,
                    };
                    try_tls(addr, cfg.clone(), &Identity::Scm).await
                }
                (How::WeakHello, port) => {
                    let addr = match port {
                        Port::Agents => fleet.agents_addr,
                        Port::TelnetTls => fleet.telnet_tls,
                        _ => admin,
                    };
                    try_weak_hello(addr).await
                }
                (How::HelloAs(p), _) => try_hello_as(fleet.agents_addr, p).await,
                (How::FakeScm(cfg), _) => {
                    *fake.current.lock().expect("lock") = Some(cfg.clone());
                    "agent reconnects".to_string()
                }
            }
        });
        if seen.starts_with("NOT REFUSED") {
            failures.push(format!("{label}: {seen}"));
            continue;
        }
        let line = proc_.wait_for_n(&needle, before_lines + 1);
        let listener_ok = match case.port {
            Port::AgentLink => line.contains("cannot connect to the SCM"),
            Port::Agents if matches!(case.how, How::HelloAs(_)) => line.contains("listener=agents"),
            p => line.contains(&format!("listener={}", p.listener())),
        };
        if !listener_ok {
            failures.push(format!("{label}: log line from the wrong place: {line}"));
        }
        let after = metric(metrics_addr, &series);
        let counted = if case.port == Port::AgentLink {
            after > before_count
        } else {
            after == before_count + 1
        };
        if !counted {
            failures.push(format!(
                "{label}: {series} went from {before_count} to {after}"
            ));
        }
        table.push(format!(
            "| {} | {} | `{}` | {} | {} ms |",
            case.port.listener(),
            case.name,
            case.reason,
            seen,
            case_started.elapsed().as_millis()
        ));
    }
    eprintln!(
        "mTLS negative matrix ({} cases):\n{}",
        cases.len(),
        table.join("\n")
    );
    assert!(failures.is_empty(), "{failures:#?}");
    // Nothing got through: only agent 1 ever said HELLO, and it is still served.
    assert_eq!(fleet.scm.logs().matches("agent said HELLO").count(), 1);
    assert!(!agent3.logs().contains("connected to SCM at"));
    assert!(!fleet.agent_dir(1).join("config.current").exists());
    push_is_acked(&fleet, 1, "after = matrix\n");
}

// ---------------------------------------------------------------------------------------
// Per-source caps: a stalling address does not lock others out

/// A TCP connection from `src` (another loopback address) to `to`.
fn connect_from(src: &str, to: SocketAddr) -> std::net::TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let local: SocketAddr = format!("{src}:0").parse().expect("address");
    s.bind(&local.into()).expect("bind the source address");
    s.connect(&to.into()).expect("connect");
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

/// True when the server has closed `s` (EOF or reset) within [`WAIT`].
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// True when `s` is still open and the server has sent nothing more.
fn still_open(s: &std::net::TcpStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    let r = (&*s).read(&mut buf);
    s.set_nonblocking(false).expect("blocking");
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// From 127.0.0.2, as many unauthenticated connections as the per-source cap allows are
/// held open on every listener an operator or a machine uses: telnet sessions stalled at
/// the login prompt and TLS handshakes stalled after a partial ClientHello. One more from
/// that address is closed at once (logged, counted). Meanwhile, from 127.0.0.1, an
/// operator logs in on plain telnet, on TLS telnet and on the admin API, and a machine
/// connects and takes a push; the held connections are still open at the end (the
/// caps, not a timeout, kept them from mattering).
#[test]
fn one_address_stalling_connections_does_not_lock_out_operators_or_machines() {
    init();
    const CAP: usize = 4;
    let (dir, password) = Fleet::init(&[1]);
    let fleet = fleet_from(
        dir,
        password,
        &[
            ("SCM__LIMITS__MAX_OPERATOR_CONNECTIONS", "8".into()),
            ("SCM__LIMITS__MAX_CONNECTIONS_PER_SOURCE", CAP.to_string()),
            ("SCM__LIMITS__MAX_AGENT_CONNECTIONS", "8".into()),
            (
                "SCM__LIMITS__MAX_AGENT_CONNECTIONS_PER_SOURCE",
                CAP.to_string(),
            ),
            // Long enough that nothing held is cut off by a timeout during the test.
            ("SCM__TIMEOUTS__HANDSHAKE_MS", "120000".into()),
            ("SCM__TIMEOUTS__LOGIN_MS", "120000".into()),
        ],
        &[],
    );
    let scm_metrics = fleet.scm.listening("metrics");
    let admin = fleet.admin();
    let partial_hello = &weak_suites_client_hello()[..20];
    let mut held = Vec::new();
    let mut refusals = 0;
    for (name, addr) in [
        ("telnet", fleet.telnet),
        ("telnet-tls", fleet.telnet_tls),
        ("admin", admin),
        ("agents", fleet.agents_addr),
    ] {
        for _ in 0..CAP {
            let mut s = connect_from("127.0.0.2", addr);
            if name == "telnet" {
                // Served: the login prompt arrives, and it is never answered.
                let mut seen = Vec::new();
                let mut buf = [0u8; 256];
                while !String::from_utf8_lossy(&seen).contains("Username: ") {
                    let n = s.read(&mut buf).expect("read the banner");
                    assert!(n > 0, "telnet closed before the login prompt");
                    seen.extend_from_slice(&buf[..n]);
                }
            } else {
                s.write_all(partial_hello).expect("start a ClientHello");
            }
            held.push((name, s));
        }
        let mut extra = connect_from("127.0.0.2", addr);
        assert!(
            closed_by_server(&mut extra),
            "{name}: connection {} from 127.0.0.2 was not closed",
            CAP + 1
        );
        refusals += 1;
        let line = fleet.scm.wait_for_n(
            &format!("connection refused: 127.0.0.2 already has {CAP} connections open"),
            refusals,
        );
        assert!(line.contains(&format!("listener={name} ")), "{line}");
        assert_eq!(
            metric(
                scm_metrics,
                &format!(
                    "scm_connections_refused_total{{listener=\"{name}\",reason=\"per_source\"}}"
                )
            ),
            1,
            "{name}"
        );
    }

    // An operator from 127.0.0.1: plain telnet with a password...
    let mut t = RawTelnet::connect(fleet.telnet);
    let text = t.login("admin", &fleet.password);
    assert!(text.contains("230 logged in as admin"), "{text}");
    // ...TLS telnet with the operator certificate...
    let cfg = fleet.dev().join("backoffice.toml");
    let (code, out, err) = integration_tests::run(
        &integration_tests::bin("backoffice"),
        &["--config", cfg.to_str().expect("utf-8"), "machines"],
        &[
            ("BACKOFFICE__SCM__TLS", "true".to_string()),
            ("BACKOFFICE__SCM__ADDRESS", fleet.telnet_tls.to_string()),
        ],
    );
    assert_eq!(code, 0, "machines over TLS telnet: {out}{err}");
    // ...and the admin API.
    let watch = fleet.watch(&[]);
    watch.wait_for("watching events");
    // A machine from 127.0.0.1 connects and takes a push.
    let agent = Fleet::start_agent(fleet.dir.path(), 1, fleet.agents_addr, &[]);
    agent.wait_for("connected to SCM");
    let fleet = Fleet {
        agents: vec![(1, agent)],
        ..fleet
    };
    push_is_acked(&fleet, 1, "while = stalled\n");

    // Every held connection is still open: the caps kept them harmless.
    for (name, s) in &held {
        assert!(still_open(s), "a held {name} connection was closed");
    }
    assert_eq!(
        fleet
            .scm
            .logs()
            .matches("connection refused: 127.0.0.2 already has")
            .count(),
        4
    );
    drop(held);
}

// ---------------------------------------------------------------------------------------
// 100 x 1 MiB of garbage to every TLS port

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sends `n` connections of 1 MiB of garbage each to `addr`, `parallel` at a time; each
/// waits for the server to close. Half are pure random bytes, half start with a TLS
/// handshake record header claiming 16 KiB (so the server buffers a full record before
/// it can refuse). Returns the bytes the kernel accepted from the clients.
async fn garbage(addr: SocketAddr, n: usize, parallel: usize) -> u64 {
    use rand::RngCore;
    let mut sent = 0u64;
    let mut i = 0;
    while i < n {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..parallel.min(n - i) {
            let mut data = vec![0u8; 1 << 20];
            rand::rng().fill_bytes(&mut data);
            if i % 2 == 1 {
                data[..5].copy_from_slice(&[0x16, 0x03, 0x01, 0x40, 0x00]);
            }
            i += 1;
            set.spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.expect("connect");
                let mut written = 0u64;
                for chunk in data.chunks(64 * 1024) {
                    match tcp.write_all(chunk).await {
                        Ok(()) => written += chunk.len() as u64,
                        Err(_) => break,
                    }
                }
                let _ = tcp.shutdown().await;
                let mut sink = [0u8; 4096];
                let closed = tokio::time::timeout(WAIT, async {
                    loop {
                        match tcp.read(&mut sink).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
                assert!(closed.is_ok(), "the server kept a garbage connection open");
                written
            });
        }
        while let Some(r) = set.join_next().await {
            sent += r.expect("garbage task");
        }
    }
    sent
}

/// The bound this test holds the SCM to: resident memory may grow by less than this
/// while 300 clients send 1 MiB of garbage each (the bound NATS's tests use).
const MEMORY_BOUND_KIB: u64 = 50 * 1024;

#[test]
fn garbage_to_every_tls_port_keeps_memory_bounded() {
    init();
    let (dir, password) = Fleet::init(&[1]);
    let fleet = fleet_from(
        dir,
        password,
        &[("SCM__LIMITS__MAX_CONNECTIONS_PER_SOURCE", "100".into())],
        &[1],
    );
    let scm_metrics = fleet.scm.listening("metrics");
    let admin = fleet.admin();
    let pid = fleet.scm.pid();
    let ports = [
        ("agents", fleet.agents_addr),
        ("telnet-tls", fleet.telnet_tls),
        ("admin", admin),
    ];
    let refused = |fleet: &Fleet| fleet.scm.logs().matches("TLS handshake refused (").count();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Warm up (thread stacks, allocator arenas) with a few connections per port.
    let warm = refused(&fleet);
    runtime.block_on(async {
        for (_, addr) in ports {
            garbage(addr, 4, 4).await;
        }
    });
    fleet.scm.wait_for_n("TLS handshake refused (", warm + 12);
    let (rss_before, hwm_before) = memory_kib(pid);
    let start = refused(&fleet);
    let failures_before: Vec<u64> = ports
        .iter()
        .map(|(name, _)| handshake_failures(scm_metrics, name))
        .collect();
    let started = Instant::now();
    let mut report = Vec::new();
    for (name, addr) in ports {
        let sent = runtime.block_on(garbage(addr, 100, 10));
        report.push(format!(
            "{name}: 100 x 1 MiB offered, {:.1} MiB accepted by the kernel",
            sent as f64 / 1048576.0
        ));
    }
    fleet.scm.wait_for_n("TLS handshake refused (", start + 300);
    let elapsed = started.elapsed();
    let (rss_after, hwm_after) = memory_kib(pid);
    for (i, (name, _)) in ports.iter().enumerate() {
        let n = handshake_failures(scm_metrics, name) - failures_before[i];
        assert_eq!(n, 100, "{name}: handshake failures counted");
    }
    let growth = rss_after.saturating_sub(rss_before);
    let peak_growth = hwm_after.saturating_sub(hwm_before.max(rss_before));
    eprintln!(
        "garbage flood: {}; in {elapsed:?}\nSCM VmRSS {rss_before} KiB -> {rss_after} KiB \
         (growth {growth} KiB); VmHWM {hwm_before} KiB -> {hwm_after} KiB (peak above the \
         start {peak_growth} KiB); bound {MEMORY_BOUND_KIB} KiB",
        report.join("; ")
    );
    assert!(growth < MEMORY_BOUND_KIB, "RSS grew by {growth} KiB");
    assert!(
        hwm_after.saturating_sub(rss_before) < MEMORY_BOUND_KIB,
        "peak RSS {hwm_after} KiB is more than {MEMORY_BOUND_KIB} KiB above {rss_before} KiB"
    );

    // The agent's config port, the TLS port of the machines, gets the same (4 at a time:
    // its per-source cap).
    let agent = fleet.agent(1);
    let config_port = agent.listening("config");
    let agent_pid = agent.pid();
    let warm = agent.logs().matches("TLS handshake refused (").count();
    runtime.block_on(garbage(config_port, 4, 4));
    agent.wait_for_n("TLS handshake refused (", warm + 4);
    let (agent_before, agent_hwm_before) = memory_kib(agent_pid);
    let start = agent.logs().matches("TLS handshake refused (").count();
    let sent = runtime.block_on(garbage(config_port, 100, 4));
    agent.wait_for_n("TLS handshake refused (", start + 100);
    let (agent_after, agent_hwm_after) = memory_kib(agent_pid);
    let agent_growth = agent_after.saturating_sub(agent_before);
    eprintln!(
        "garbage flood: agent config port: 100 x 1 MiB offered, {:.1} MiB accepted by the \
         kernel\nagent VmRSS {agent_before} KiB -> {agent_after} KiB (growth \
         {agent_growth} KiB); VmHWM {agent_hwm_before} KiB -> {agent_hwm_after} KiB; bound \
         {MEMORY_BOUND_KIB} KiB",
        sent as f64 / 1048576.0
    );
    assert!(
        agent_growth < MEMORY_BOUND_KIB,
        "agent RSS grew by {agent_growth} KiB"
    );
    assert!(
        agent_hwm_after.saturating_sub(agent_before) < MEMORY_BOUND_KIB,
        "agent peak RSS {agent_hwm_after} KiB is more than {MEMORY_BOUND_KIB} KiB above \
         {agent_before} KiB"
    );
    // Both still serve.
    push_is_acked(&fleet, 1, "after = garbage\n");
}

/// Sum of `scm_handshake_failures_total` over reasons for one listener.
fn handshake_failures(addr: SocketAddr, listener: &str) -> u64 {
    let prefix = format!("scm_handshake_failures_total{{listener=\"{listener}\",");
    scrape(addr)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// Certificate and CRL reload on SIGHUP

/// A TLS telnet session logged in by certificate.
struct TlsTelnet {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    seen: Vec<u8>,
}

impl TlsTelnet {
    async fn connect(addr: SocketAddr, p: &Pems) -> TlsTelnet {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let stream = sctls::connect(
            &tokio_rustls::TlsConnector::from(client_config(p)),
            tcp,
            &Identity::Scm,
            WAIT,
        )
        .await
        .expect("TLS telnet handshake");
        let mut t = TlsTelnet {
            stream,
            seen: Vec::new(),
        };
        let text = t.until("scm> ").await;
        assert!(text.contains("by certificate"), "{text}");
        t
    }

    /// Reads until `needle`; returns the text since the last call.
    async fn until(&mut self, needle: &str) -> String {
        let mut buf = [0u8; 1024];
        loop {
            let text = integration_tests::strip_iac(&self.seen);
            if text.contains(needle) {
                self.seen.clear();
                return text;
            }
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{needle:?} not received; got {text:?}"))
                .unwrap_or(0);
            assert!(n > 0, "closed while waiting for {needle:?}; got {text:?}");
            self.seen.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads until the server closes; returns the text.
    async fn until_closed(&mut self) -> String {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut buf)).await {
                Err(_) => panic!("not closed"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => self.seen.extend_from_slice(&buf[..n]),
            }
        }
        integration_tests::strip_iac(&self.seen)
    }

    async fn command(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("send");
        self.until("scm> ").await
    }
}

/// Machine 1's certificate and one operator certificate are revoked in the CRL file,
/// written in place, and the SCM gets SIGHUP: machine 1's link and that operator's TLS
/// telnet session are closed (logged, counted), machine 1's reconnection is refused as
/// revoked, and machine 2's link and the other operator certificate's session keep
/// running. A CRL file that cannot be read on the next SIGHUP keeps the previous
/// configuration.
#[test]
fn sighup_reload_closes_revoked_sessions_and_keeps_the_others() {
    init();
    let (dir, password) = Fleet::init(&[1, 2]);
    let dev = dir.path().join("dev");
    let dev_ca = ca(&dev);
    // Machine 1's certificate, issued here so the test knows its serial.
    let m1 = dev_ca
        .issue(&LeafSpec::new(
            Identity::Machine(1),
            Validity::days_from_now(30),
        ))
        .expect("issue");
    std::fs::write(dev.join("machine-1.pem"), &m1.cert_pem).expect("write cert");
    std::fs::write(dev.join("machine-1-key.pem"), &m1.key_pem).expect("write key");
    let operator = || Identity::operator("admin").expect("name");
    let op_revoked = dev_ca
        .issue(&LeafSpec::new(operator(), Validity::days_from_now(30)))
        .expect("issue");
    let op_kept = dev_ca
        .issue(&LeafSpec::new(operator(), Validity::days_from_now(30)))
        .expect("issue");
    // The back office's operator certificate (used by `watch` on the admin API) is the
    // one to revoke too.
    std::fs::write(dev.join("operator-admin.pem"), &op_revoked.cert_pem).expect("write cert");
    std::fs::write(dev.join("operator-admin-key.pem"), &op_revoked.key_pem).expect("write key");
    let crl_file = dev.join("current.crl.pem");
    add_crl(&dev, "current.crl.pem", &crl(&dev, &[]));
    let fleet = fleet_from(dir, password, &[], &[1, 2]);
    let mut watch = fleet.watch(&[]);
    watch.wait_for("watching events");
    let scm_metrics = fleet.scm.listening("metrics");
    let ca_pem = dev_ca.cert_pem().to_string();
    let runtime = rt();
    let (mut revoked_session, mut kept_session) = runtime.block_on(async {
        (
            TlsTelnet::connect(fleet.telnet_tls, &issued_pems(&ca_pem, &op_revoked)).await,
            TlsTelnet::connect(fleet.telnet_tls, &issued_pems(&ca_pem, &op_kept)).await,
        )
    });
    // Written in place (truncate and write), then SIGHUP.
    std::fs::write(
        &crl_file,
        crl(&dev, &[m1.serial.clone(), op_revoked.serial.clone()]),
    )
    .expect("rewrite the CRL");
    fleet.scm.signal("HUP");
    fleet
        .scm
        .wait_for("TLS reloaded: 2 revoked serial(s) listed; 3 session(s) closed");
    let line = fleet.scm.wait_for("closing the session of machine 1");
    assert!(
        line.contains("listener=\"agents\"") || line.contains("listener=agents"),
        "{line}"
    );
    fleet
        .scm
        .wait_for_n("closing the session of operator admin", 2);
    let logs = fleet.scm.logs();
    for listener in ["telnet-tls", "admin"] {
        assert!(
            logs.lines().any(
                |l| l.contains("closing the session of operator admin") && l.contains(listener)
            ),
            "no {listener} session closed:\n{logs}"
        );
    }
    // The watcher's stream ended with its connection.
    assert_eq!(watch.wait_exit(), Some(2), "{}", watch.logs());
    fleet.scm.wait_for("agent disconnected");
    runtime.block_on(async {
        let text = revoked_session.until_closed().await;
        assert!(
            text.contains("421 your certificate has been revoked; closing"),
            "{text:?}"
        );
        let text = kept_session.command("machines").await;
        assert!(text.contains("250 2 machines"), "{text:?}");
    });
    // Machine 1 tries again and is refused as revoked; machine 2 never noticed.
    let line = fleet.scm.wait_for("TLS handshake refused (revoked)");
    assert!(line.contains("listener=agents"), "{line}");
    assert_eq!(fleet.agent(2).logs().matches("connected to SCM").count(), 1);
    push_is_acked(&fleet, 2, "after = reload\n");
    for (series, want) in [
        ("scm_tls_sessions_revoked_total{listener=\"agents\"}", 1),
        ("scm_tls_sessions_revoked_total{listener=\"telnet-tls\"}", 1),
        ("scm_tls_sessions_revoked_total{listener=\"admin\"}", 1),
        ("scm_tls_reloads_total{result=\"ok\"}", 1),
        ("scm_tls_reloads_total{result=\"failed\"}", 0),
    ] {
        assert_eq!(metric(scm_metrics, series), want, "{series}");
    }
    assert!(
        metric(
            scm_metrics,
            "scm_handshake_failures_total{listener=\"agents\",reason=\"revoked\"}"
        ) >= 1
    );

    // A bad CRL file: the reload fails and changes nothing.
    std::fs::write(&crl_file, "not a CRL\n").expect("break the CRL");
    let refused_before = fleet
        .scm
        .logs()
        .matches("TLS handshake refused (revoked)")
        .count();
    fleet.scm.signal("HUP");
    let line = fleet
        .scm
        .wait_for("TLS reload failed, keeping the previous certificates and CRLs");
    assert!(line.contains("current.crl.pem"), "names the file: {line}");
    assert_eq!(
        metric(scm_metrics, "scm_tls_reloads_total{result=\"failed\"}"),
        1
    );
    // Machine 1 is still refused, machine 2 and the kept operator still served.
    fleet
        .scm
        .wait_for_n("TLS handshake refused (revoked)", refused_before + 1);
    push_is_acked(&fleet, 2, "after = failed reload\n");
    runtime.block_on(async {
        let text = kept_session.command("status 2").await;
        assert!(text.contains("machine 2"), "{text:?}");
    });
    assert_eq!(fleet.agent(2).logs().matches("connected to SCM").count(), 1);
}

/// The agent reloads its TLS files on SIGHUP too: after its CRL file is rewritten to list
/// a second SCM certificate, that certificate is refused on the config port (`revoked`),
/// while the real SCM still pushes and the event link stays on its first connection. A
/// broken CRL file on the next SIGHUP keeps the previous configuration.
#[test]
fn agent_sighup_reload_applies_a_new_crl_to_its_config_port() {
    init();
    let (dir, password) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let dev_ca = ca(&dev);
    let second_scm = dev_ca
        .issue(&LeafSpec::new(Identity::Scm, Validity::days_from_now(30)))
        .expect("issue");
    let crl_file = dev.join("agent.crl.pem");
    std::fs::write(&crl_file, crl(&dev, &[])).expect("write CRL");
    let agent_toml = dev.join("agent-1.toml");
    let text = std::fs::read_to_string(&agent_toml).expect("agent-1.toml");
    let with = text.replacen("[tls]\n", "[tls]\ncrls = [\"agent.crl.pem\"]\n", 1);
    assert_ne!(with, text, "[tls] found in agent-1.toml");
    std::fs::write(&agent_toml, with).expect("write agent-1.toml");
    let fleet = fleet_from(dir, password, &[], &[1]);
    let agent = fleet.agent(1);
    let port = agent.listening("config");
    let pems = issued_pems(dev_ca.cert_pem(), &second_scm);
    let config = crate::fencing::config;
    let runtime = rt();
    runtime.block_on(async {
        let mut c = FrameClient::connect(port, &pems, Identity::Machine(1))
            .await
            .expect("connect with the second SCM certificate");
        // Generation 0 says nothing about order: the real SCM's generation 1 below is
        // then newer, not fenced off as a second generation 1 with other content.
        c.send(&config(1, 0, b"before = reload\n"))
            .await
            .expect("send");
        let f = c.recv().await.expect("read").expect("an answer");
        assert!(
            matches!(Message::decode(&f), Ok(Message::Ack(_))),
            "not ACKed before the reload: {f}"
        );
    });
    std::fs::write(
        &crl_file,
        crl(&dev, std::slice::from_ref(&second_scm.serial)),
    )
    .expect("rewrite the CRL");
    agent.signal("HUP");
    agent.wait_for("TLS reloaded");
    let seen = runtime.block_on(try_tls(port, client_config(&pems), &Identity::Machine(1)));
    assert_eq!(seen, "alert (revoked)");
    let line = agent.wait_for("TLS handshake refused (revoked)");
    assert!(line.contains("listener=config"), "{line}");
    // The real SCM is not affected, and neither is the event link.
    push_is_acked(&fleet, 1, "after = agent reload\n");
    assert_eq!(agent.logs().matches("connected to SCM").count(), 1);

    std::fs::write(&crl_file, "not a CRL\n").expect("break the CRL");
    agent.signal("HUP");
    let line = agent.wait_for("TLS reload failed, keeping the previous certificates and CRLs");
    assert!(line.contains("agent.crl.pem"), "names the file: {line}");
    let seen = runtime.block_on(try_tls(port, client_config(&pems), &Identity::Machine(1)));
    assert_eq!(
        seen, "alert (revoked)",
        "the previous CRL is still in force"
    );
    push_is_acked(&fleet, 1, "after = failed agent reload\n");
}

// ---------------------------------------------------------------------------------------
// Handshake, login and idle timeouts

/// Reads until the server closes `s`; returns what arrived and when it closed.
fn until_closed(s: &mut std::net::TcpStream) -> (String, Instant) {
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed within {WAIT:?}: {e}"),
        }
    }
    (integration_tests::strip_iac(&all), Instant::now())
}

/// Every timeout that frees a slot held by a stalled peer, with short values: a TCP client
/// that never starts TLS on each TLS port (SCM agents, telnet-tls, admin; agent config
/// port), a telnet client that never logs in, a logged-in operator who goes quiet, an
/// agent link that says HELLO and then nothing, and an SCM connection to a config port
/// that sends nothing. Each is closed after its timeout (not before), logged, and the
/// handshake ones are counted.
#[test]
fn stalled_peers_are_closed_at_their_timeouts() {
    init();
    let (dir, password) = Fleet::init(&[1, 2]);
    let scm_env = [
        ("SCM__TIMEOUTS__HANDSHAKE_MS", "1000".to_string()),
        ("SCM__TIMEOUTS__LOGIN_MS", "1000".to_string()),
        ("SCM__TIMEOUTS__TELNET_IDLE_MS", "1000".to_string()),
        ("SCM__TIMEOUTS__AGENT_IDLE_MS", "1000".to_string()),
    ];
    let mut env = vec![metrics_env()];
    env.extend(scm_env.iter().cloned());
    let scm = Fleet::start_scm(dir.path(), &env);
    let scm_metrics = scm.listening("metrics");
    let agents_addr = scm.listening("agents");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        agents_addr,
        &[
            agent_metrics_env(),
            ("AGENT__TIMEOUTS__HANDSHAKE_MS", "1000".to_string()),
            ("AGENT__TIMEOUTS__CONFIG_IDLE_MS", "1000".to_string()),
        ],
    );
    agent.wait_for("connected to SCM");
    let agent_metrics = agent.listening("metrics");
    let config_port = agent.listening("config");
    let telnet = scm.listening("telnet");
    let telnet_tls = scm.listening("telnet-tls");
    let admin = scm.listening("admin");
    let dev = dir.path().join("dev");

    let opened = Instant::now();
    // Silent TCP clients on every TLS port.
    let mut silent: Vec<(&str, std::net::TcpStream)> = [
        ("agents", agents_addr),
        ("telnet-tls", telnet_tls),
        ("admin", admin),
        ("config", config_port),
    ]
    .into_iter()
    .map(|(n, a)| {
        let s = std::net::TcpStream::connect(a).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        (n, s)
    })
    .collect();
    // A telnet client that never logs in, and one that logs in and goes quiet.
    let mut no_login = std::net::TcpStream::connect(telnet).expect("connect");
    no_login.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut quiet = RawTelnet::connect(telnet);
    quiet.login("admin", &password);
    let quiet_since = Instant::now();
    // An agent link that says HELLO and then nothing; an SCM connection to the config
    // port that completes TLS and sends nothing.
    let runtime = rt();
    runtime.block_on(async {
        let mut link =
            FrameClient::connect(agents_addr, &dev_pems(&dev, "machine-2"), Identity::Scm)
                .await
                .expect("connect as machine 2");
        link.send(&hello(1, 2)).await.expect("HELLO");
        let f = link.recv().await.expect("read").expect("ACK");
        assert!(matches!(Message::decode(&f), Ok(Message::Ack(_))), "{f}");
        let mut cfg =
            FrameClient::connect(config_port, &dev_pems(&dev, "scm"), Identity::Machine(1))
                .await
                .expect("connect to the config port as the SCM");
        let (a, b) = tokio::join!(link.recv(), cfg.recv());
        assert!(matches!(a, Ok(None) | Err(_)), "{a:?}");
        assert!(matches!(b, Ok(None) | Err(_)), "{b:?}");
    });
    for (name, s) in &mut silent {
        let (text, at) = until_closed(s);
        assert!(text.is_empty(), "{name}: {text:?}");
        let after = at - opened;
        assert!(
            after >= Duration::from_millis(950) && after < Duration::from_secs(20),
            "{name}: closed after {after:?}"
        );
    }
    let (text, at) = until_closed(&mut no_login);
    assert!(
        text.contains("421 login not completed in time; closing"),
        "{text:?}"
    );
    assert!(at - opened >= Duration::from_millis(950));
    let (text, at) = until_closed(&mut quiet.stream);
    assert!(at - quiet_since >= Duration::from_millis(950), "{text:?}");

    for listener in ["agents", "telnet-tls", "admin"] {
        assert!(
            scm.logs()
                .lines()
                .any(|l| l.contains(&format!("listener={listener} "))
                    && l.contains("TLS handshake refused (timeout)")),
            "{listener}: no timeout logged"
        );
        assert_eq!(
            metric(
                scm_metrics,
                &format!(
                    "scm_handshake_failures_total{{listener=\"{listener}\",reason=\"timeout\"}}"
                )
            ),
            1,
            "{listener}"
        );
    }
    let line = agent.wait_for("TLS handshake refused (timeout)");
    assert!(line.contains("listener=config"), "{line}");
    assert_eq!(
        metric(
            agent_metrics,
            "agent_handshake_failures_total{reason=\"timeout\"}"
        ),
        1
    );
    scm.wait_for("connection ended with an error: login not completed in time");
    scm.wait_for("connection ended with an error: operator session idle; closed");
    let line = scm.wait_for("agent disconnected machine=2");
    assert!(line.contains("listener=agents"), "{line}");
    scm.wait_for("no frame started within the idle timeout of 1s");
    let line = agent.wait_for("no frame started within the idle timeout of 1s");
    assert!(line.contains("listener=config"), "{line}");
}
