//! Identity and TLS refusals against the real binaries (design.md section 4): a machine
//! cannot speak for another, an agent's config port accepts only the SCM role, the SCM's
//! agent port refuses clients with no, foreign, expired or TLS 1.2-only credentials, and
//! an agent refuses a server that is not the SCM, and an SCM whose CA it does not trust.
//! Every refusal is checked on the wire, in the refusing process's log (with its stable
//! reason label), and by showing the refusing process still serves a legitimate peer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use integration_tests::{Fleet, WAIT};
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, LeafSpec, Validity};
use scm_certs::tls::{self as sctls, HandshakeError, TlsPolicy};
use scm_proto::io::{FrameReader, ReadError, write_frame};
use scm_proto::v1::{self, Message, NackReason};
use scm_proto::{Code, Frame, FrameCodec, FrameError};
use sha2::Digest;
use tokio::net::TcpStream;

use super::{FrameClient, Pems, dev_issue, dev_pems, init, rt};

// ---------------------------------------------------------------------------------------
// Helpers

fn hello(request_id: u64, id: u16) -> Frame {
    Message::Hello(v1::Hello {
        request_id,
        agent_version: "mtls-test".into(),
        ..Default::default()
    })
    .to_frame(id)
    .expect("HELLO frame")
}

fn config(request_id: u64, id: u16, content: &[u8]) -> Frame {
    Message::Config(v1::Config {
        request_id,
        generation: 1,
        content: content.to_vec(),
        sha256: sha2::Sha256::digest(content).to_vec(),
    })
    .to_frame(id)
    .expect("CONFIG frame")
}

/// What became of one connection attempt by a client the server should refuse.
#[derive(Debug)]
enum Attempt {
    /// The client's own handshake failed, with this reason label.
    HandshakeFailed(&'static str),
    /// The handshake completed on the client's side (TLS 1.3), then the first read saw
    /// the refusal: an alert (its reason label), a reset, or EOF.
    RefusedAfterHandshake(String),
    /// The server answered the request: it was not refused.
    Answered(Frame),
}

/// The reason label of a read failure, as the refusing server's alert shows it.
fn read_label(e: &ReadError) -> String {
    if let ReadError::Frame(FrameError::Io(io)) = e {
        return match io.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) {
            Some(r) => HandshakeError::Tls(std::io::Error::other(r.clone()))
                .reason()
                .to_string(),
            None => format!("io: {io}"),
        };
    }
    format!("read error: {e}")
}

/// Connects with `config` to `addr` expecting `server`, sends `request`, and reports
/// whether and how the client was refused.
async fn attempt(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server: &Identity,
    request: &Frame,
) -> Attempt {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = match sctls::connect(&connector, tcp, server, WAIT).await {
        Ok(t) => t,
        Err(e) => return Attempt::HandshakeFailed(e.reason()),
    };
    let (r, mut w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, FrameCodec::default());
    // The write may already fail if the server has closed: the read tells why.
    let _ = write_frame(&mut w, request).await;
    match reader.read_frame(Some(WAIT), WAIT).await {
        Ok(Some(f)) => Attempt::Answered(f),
        Ok(None) => Attempt::RefusedAfterHandshake("eof".into()),
        Err(e) => Attempt::RefusedAfterHandshake(read_label(&e)),
    }
}

fn client_config(p: &Pems) -> Arc<rustls::ClientConfig> {
    sctls::client_config_from_pem(&p.ca, &p.cert, &p.key, TlsPolicy::default())
        .expect("client config")
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(der.expect("CA PEM")).expect("trust anchor");
    }
    roots
}

/// A client that trusts the dev CA but presents no certificate.
pub(crate) fn no_cert_config(dev: &Path) -> Arc<rustls::ClientConfig> {
    let ca = std::fs::read_to_string(dev.join("ca.pem")).expect("ca.pem");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            sctls::provider(TlsPolicy::default()),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots(&ca))
        .with_no_client_auth(),
    )
}

/// A client with the given (valid) certificate that speaks only TLS 1.2.
pub(crate) fn tls12_only_config(p: &Pems) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(p.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("cert PEM");
    let key = PrivateKeyDer::from_pem_slice(p.key.as_bytes()).expect("key PEM");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(sctls::provider(TlsPolicy {
            allow_tls12: true,
        })))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots(&p.ca))
        .with_client_auth_cert(chain, key)
        .expect("client cert"),
    )
}

/// Machine 1's identity from a CA the fleet does not trust (the client trusts the dev CA,
/// so that only the client certificate is at fault).
fn foreign_machine_1(dev: &Path) -> Pems {
    let foreign = Ca::generate("Foreign CA", &Validity::days_from_now(30)).expect("foreign CA");
    let leaf = foreign
        .issue(&LeafSpec::new(
            Identity::Machine(1),
            Validity::days_from_now(30),
        ))
        .expect("foreign leaf");
    Pems {
        ca: std::fs::read_to_string(dev.join("ca.pem")).expect("ca.pem"),
        cert: leaf.cert_pem,
        key: leaf.key_pem,
    }
}

/// Machine 1's identity from the dev CA, expired yesterday.
fn expired_machine_1(dev: &Path) -> Pems {
    let now = time::OffsetDateTime::now_utc();
    dev_issue(
        dev,
        Identity::Machine(1),
        Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        },
    )
}

fn write_cfg(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config file");
    p.to_string_lossy().into_owned()
}

/// `backoffice status <id>` output.
fn status(fleet: &Fleet, id: u16) -> String {
    let (code, out, err) = fleet.backoffice(&["status", &id.to_string()]);
    assert_eq!(code, 0, "status {id}: {out}{err}");
    out
}

/// The `link: ...` line of a status output.
fn link_line(status: &str) -> String {
    status
        .lines()
        .find(|l| l.contains("link: "))
        .unwrap_or_else(|| panic!("no link line in {status}"))
        .to_string()
}

/// A push through the back office is ACKed and stored.
fn push_is_acked(fleet: &Fleet, id: u16, text: &str) {
    let f = write_cfg(fleet.dir.path(), &format!("ok-{id}.cfg"), text);
    let (code, out, err) = fleet.backoffice(&["push", "--machine", &id.to_string(), "--file", &f]);
    assert_eq!(code, 0, "push to machine {id}: {out}{err}");
    assert!(out.starts_with(&format!("250 ACK machine {id}")), "{out}");
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(id).join("config.current")).expect("stored"),
        text
    );
}

// ---------------------------------------------------------------------------------------
// Tests

/// Machine 2's certificate saying HELLO as machine 1 (in version 1 and version 0) is
/// NACKed (`WRONG_MACHINE_ID`) and closed; machine 1's own agent stays connected and the
/// SCM still lists it as before.
#[test]
fn a_machine_cannot_say_hello_as_another() {
    init();
    let fleet = Fleet::start(&[1, 2]);
    let dev = fleet.dev();
    let before = link_line(&status(&fleet, 1));
    assert!(
        before.contains("link: connected from 127.0.0.1:"),
        "{before}"
    );
    let m2 = dev_pems(&dev, "machine-2");
    let v0_hello = Frame::v0(Code::Hello, 1, "hello").expect("v0 HELLO");
    rt().block_on(async {
        // Version 1.
        let mut c = FrameClient::connect(fleet.agents_addr, &m2, Identity::Scm)
            .await
            .expect("connect with machine 2's certificate");
        c.send(&hello(7, 1)).await.expect("send");
        let f = c.recv().await.expect("read").expect("a NACK");
        assert_eq!((f.version, f.code, f.id), (1, Code::Nack.byte(), 1), "{f}");
        match Message::decode(&f) {
            Ok(Message::Nack(n)) => {
                assert_eq!((n.request_id, n.reason()), (7, NackReason::WrongMachineId));
                assert_eq!(
                    n.detail,
                    "frame names machine 1 but the certificate belongs to machine 2; a machine \
                     can only speak for itself"
                );
            }
            other => panic!("not a v1 NACK: {other:?}"),
        }
        assert!(
            matches!(c.recv().await, Ok(None)),
            "the link is closed after the NACK"
        );

        // Version 0.
        let mut c = FrameClient::connect(fleet.agents_addr, &m2, Identity::Scm)
            .await
            .expect("connect with machine 2's certificate");
        c.send(&v0_hello).await.expect("send");
        let f = c.recv().await.expect("read").expect("a NACK");
        assert_eq!((f.version, f.code, f.id), (0, Code::Nack.byte(), 1), "{f}");
        assert!(
            f.text_lossy()
                .contains("the certificate belongs to machine 2"),
            "{}",
            f.text_lossy()
        );
        assert!(
            matches!(c.recv().await, Ok(None)),
            "the link is closed after the NACK"
        );
    });
    fleet.scm.wait_for_n(
        "closed after NACK: frame names machine 1 but the certificate belongs to machine 2",
        2,
    );
    // Machine 1's real agent was never displaced: same link, never reconnected.
    assert_eq!(link_line(&status(&fleet, 1)), before);
    assert_eq!(fleet.agent(1).logs().matches("connected to SCM").count(), 1);
    assert!(!fleet.agent(1).logs().contains("reconnecting"));
    let (code, out, _) = fleet.backoffice(&["machines"]);
    assert_eq!(code, 0, "{out}");
    let line1 = out
        .lines()
        .find(|l| l.starts_with("1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line1.contains("connected"), "{line1}");
    // And it is still reachable.
    push_is_acked(&fleet, 1, "after = impersonation\n");
}

/// An agent's config port takes CONFIG only from the SCM role: machine 2's certificate
/// and an operator's are refused (`wrong_role`) and nothing is written; the SCM's push
/// still works afterwards.
#[test]
fn config_port_refuses_peers_without_the_scm_role() {
    init();
    let fleet = Fleet::start(&[1, 2]);
    let dev = fleet.dev();
    let port = fleet.agent(1).listening("config");
    let current = fleet.agent_dir(1).join("config.current");
    let cases = [
        ("machine 2", dev_pems(&dev, "machine-2")),
        ("operator admin", dev_pems(&dev, "operator-admin")),
    ];
    rt().block_on(async {
        for (n, (who, pems)) in cases.iter().enumerate() {
            let got = attempt(
                port,
                client_config(pems),
                &Identity::Machine(1),
                &config(1, 1, b"evil = 1\n"),
            )
            .await;
            assert!(
                matches!(got, Attempt::RefusedAfterHandshake(_)),
                "{who}: not refused: {got:?}"
            );
            let line = fleet
                .agent(1)
                .wait_for_n("TLS handshake refused (wrong_role)", n + 1);
            assert!(
                line.contains(&format!("{who} is not allowed here (allowed: scm)")),
                "{line}"
            );
            assert!(!current.exists(), "{who}: config.current written");
        }
    });
    assert!(!fleet.agent(1).logs().contains("stored"), "nothing stored");
    push_is_acked(&fleet, 1, "from = scm\n");
}

/// Clients the SCM's agent port must refuse during the handshake, each with the reason
/// label the SCM logs. The SCM stays up: machine 1's agent keeps its link and a push
/// through it is ACKed.
#[test]
fn scm_refuses_bad_client_credentials() {
    init();
    let fleet = Fleet::start(&[1]);
    let dev = fleet.dev();
    let m1 = dev_pems(&dev, "machine-1");
    let cases: Vec<(&str, Arc<rustls::ClientConfig>, &str)> = vec![
        (
            "no client certificate",
            no_cert_config(&dev),
            "no_certificate",
        ),
        (
            "certificate from another CA",
            client_config(&foreign_machine_1(&dev)),
            "unknown_ca",
        ),
        (
            "expired machine certificate",
            client_config(&expired_machine_1(&dev)),
            "expired",
        ),
        ("TLS 1.2 only", tls12_only_config(&m1), "protocol_version"),
    ];
    rt().block_on(async {
        let mut failures = Vec::new();
        for (name, cfg, reason) in &cases {
            let got = attempt(fleet.agents_addr, cfg.clone(), &Identity::Scm, &hello(1, 1)).await;
            // The client sees the same label: from its own handshake (TLS 1.2) or from
            // the server's alert on its first read (TLS 1.3).
            let client_label = match &got {
                Attempt::HandshakeFailed(l) => l.to_string(),
                Attempt::RefusedAfterHandshake(l) => l.clone(),
                Attempt::Answered(f) => {
                    failures.push(format!("{name}: not refused, answered {f}"));
                    continue;
                }
            };
            if client_label != *reason {
                failures.push(format!(
                    "{name}: client saw {client_label:?}, expected {reason:?}"
                ));
            }
            let line = fleet
                .scm
                .wait_for(&format!("TLS handshake refused ({reason})"));
            if !line.contains("listener=agents") {
                failures.push(format!("{name}: unexpected log line {line}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    });
    // None of them got as far as a HELLO; only machine 1's agent ever did.
    assert_eq!(fleet.scm.logs().matches("agent said HELLO").count(), 1);
    assert_eq!(fleet.agent(1).logs().matches("connected to SCM").count(), 1);
    push_is_acked(&fleet, 1, "still = up\n");
}

/// An agent whose SCM address points at another agent's config port (a TLS server with a
/// machine certificate): it refuses that server, logs why, and keeps retrying; it never
/// says HELLO to it. The other agent logs the refused handshake and stays connected.
#[test]
fn agent_refuses_a_server_that_is_not_the_scm() {
    init();
    let (dir, password) = Fleet::init(&[1, 2]);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let telnet_tls = scm.listening("telnet-tls");
    let agent2 = Fleet::start_agent(dir.path(), 2, agents_addr, &[]);
    agent2.wait_for("connected to SCM");
    let impostor = agent2.listening("config");
    let fleet = Fleet {
        dir,
        scm,
        agents: vec![(2, agent2)],
        agents_addr,
        telnet,
        telnet_tls,
        password,
    };
    let agent1 = Fleet::start_agent(fleet.dir.path(), 1, impostor, &[]);
    let failure =
        format!("cannot connect to the SCM at {impostor}: TLS handshake refused (wrong_peer): ");
    let line = agent1.wait_for_n(&failure, 2);
    assert!(
        line.contains("not valid for name \"scm.hub.internal\""),
        "agent 1 says why: {line}"
    );
    agent1.wait_for_n("reconnecting to the SCM in", 2);
    assert!(!agent1.logs().contains("connected to SCM at"));
    // Agent 2's config port saw its certificate refused by the client.
    let line = fleet
        .agent(2)
        .wait_for("TLS handshake refused (bad_certificate)");
    assert!(line.contains("listener=config"), "{line}");
    // Agent 2 is unaffected: still on its first link, and a push to it is ACKed.
    assert_eq!(fleet.agent(2).logs().matches("connected to SCM").count(), 1);
    push_is_acked(&fleet, 2, "agent2 = fine\n");
    assert!(!fleet.agent_dir(1).join("config.current").exists());
}

/// The SCM pushing to an agent that trusts another CA: the agent refuses the SCM's
/// certificate (`unknown_ca`) and writes nothing; the SCM reports the machine unreachable
/// and keeps the generation pending.
#[test]
fn agent_trusting_another_ca_refuses_the_scm_push() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let foreign = Ca::generate("Foreign CA", &Validity::days_from_now(30)).expect("foreign CA");
    let foreign_ca = dev.join("foreign-ca.pem");
    std::fs::write(&foreign_ca, foreign.cert_pem()).expect("write foreign CA");
    // The agent keeps its dev-CA certificate (the SCM accepts it) but trusts only the
    // foreign CA. Its SCM address is a closed port: it is reached only by pushes.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        closed,
        &[("AGENT__TLS__CA", foreign_ca.to_string_lossy().into_owned())],
    );
    let port = agent.listening("config");
    let scm_toml = dev.join("scm.toml");
    let text = std::fs::read_to_string(&scm_toml).expect("scm.toml");
    let with_addr = text.replacen(
        "[[machine]]\nid = 1\n",
        &format!("[[machine]]\nid = 1\nconfig_addr = \"{port}\"\n"),
        1,
    );
    assert_ne!(with_addr, text, "machine 1's table found in scm.toml");
    let text = with_addr;
    std::fs::write(&scm_toml, text).expect("write scm.toml");
    let scm = Fleet::start_scm(dir.path(), &[]);
    let telnet = scm.listening("telnet");
    let f = write_cfg(dir.path(), "p.cfg", "pushed = yes\n");
    let bo = dev.join("backoffice.toml");
    let (code, out, err) = integration_tests::run(
        &integration_tests::bin("backoffice"),
        &[
            "--config",
            bo.to_str().expect("utf-8"),
            "push",
            "--machine",
            "1",
            "--file",
            &f,
        ],
        &[("BACKOFFICE__SCM__ADDRESS", telnet.to_string())],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.starts_with("450 machine 1 unreachable; generation 1 pending"),
        "{err}"
    );
    let line = agent.wait_for("TLS handshake refused (unknown_ca)");
    assert!(line.contains("listener=config"), "{line}");
    assert!(!dev.join("machine-1/config.current").exists());
    scm.wait_for("outcome=Unreachable");
    assert!(err.contains("received fatal alert: UnknownCA"), "{err}");

    // The agent is up and its config port works for an SCM certificate from the CA it
    // does trust.
    let scm_from_foreign = foreign
        .issue(&LeafSpec::new(Identity::Scm, Validity::days_from_now(30)))
        .expect("foreign SCM leaf");
    let pems = Pems {
        ca: std::fs::read_to_string(dev.join("ca.pem")).expect("ca.pem"),
        cert: scm_from_foreign.cert_pem,
        key: scm_from_foreign.key_pem,
    };
    rt().block_on(async {
        let mut c = FrameClient::connect(port, &pems, Identity::Machine(1))
            .await
            .expect("connect with the trusted CA's SCM certificate");
        c.send(&config(4, 1, b"trusted = yes\n"))
            .await
            .expect("send CONFIG");
        let f = c.recv().await.expect("read").expect("an answer");
        match Message::decode(&f) {
            Ok(Message::Ack(a)) => assert_eq!((a.request_id, a.generation), (4, 1)),
            other => panic!("not ACKed: {f} {other:?}"),
        }
    });
    assert_eq!(
        std::fs::read_to_string(dev.join("machine-1/config.current")).expect("stored"),
        "trusted = yes\n"
    );
}

/// A TCP client that never starts TLS is cut off at the SCM's handshake timeout (1 s
/// here) and holds up nobody meanwhile: the handshake runs in the connection's own task.
#[test]
fn scm_cuts_off_a_silent_client_at_the_handshake_timeout() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    init();
    let (dir, password) = Fleet::init(&[1, 2]);
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__TIMEOUTS__HANDSHAKE_MS", "1000".to_string())],
    );
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let telnet_tls = scm.listening("telnet-tls");
    let agent = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
    agent.wait_for("connected to SCM");
    let fleet = Fleet {
        dir,
        scm,
        agents: vec![(1, agent)],
        agents_addr,
        telnet,
        telnet_tls,
        password,
    };
    let mut silent = std::net::TcpStream::connect(agents_addr).expect("TCP connect");
    let opened = Instant::now();
    // Meanwhile another machine completes its handshake and HELLO.
    rt().block_on(async {
        let mut c = FrameClient::connect(
            agents_addr,
            &dev_pems(&fleet.dev(), "machine-2"),
            Identity::Scm,
        )
        .await
        .expect("connect as machine 2");
        c.send(&hello(1, 2)).await.expect("send HELLO");
        let f = c.recv().await.expect("read").expect("an answer");
        assert!(
            matches!(Message::decode(&f), Ok(Message::Ack(a)) if a.request_id == 1),
            "HELLO while a silent client waits: {f}"
        );
    });
    silent.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    match silent.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!(
            "the silent client was cut off before the timeout: {other:?} after {:?}",
            opened.elapsed()
        ),
    }
    silent.set_nonblocking(false).expect("blocking");
    silent.set_read_timeout(Some(WAIT)).expect("read timeout");
    let n = silent.read(&mut buf).unwrap_or(0);
    let took = opened.elapsed();
    assert_eq!(
        n, 0,
        "the SCM sends nothing to a client that never sends ClientHello"
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    let line = fleet.scm.wait_for("TLS handshake refused (timeout)");
    assert!(line.contains("listener=agents"), "{line}");
    push_is_acked(&fleet, 1, "after = silence\n");
}
