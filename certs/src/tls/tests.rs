//! Real handshakes over loopback TCP: the mTLS negative matrix and the happy paths.

use std::time::Duration;

use rustls::{CertificateError, ProtocolVersion};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::pki::{Eku, Validity};
use crate::test_util::*;

const TLS13_SUITES: [&str; 3] = [
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_CHACHA20_POLY1305_SHA256",
];

fn suite_name(state: &CommonState) -> String {
    format!(
        "{:?}",
        state
            .negotiated_cipher_suite()
            .expect("negotiated suite")
            .suite()
    )
}

/// The common case: the hub accepts machine 42, the machine's `connect` sees the hub.
#[tokio::test]
async fn valid_machine_is_accepted_over_tls13() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let machine = issue(&ca, Identity::Machine(42));
    let (server, client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    let (mut server_stream, identity) = server.expect("server accepts machine 42");
    assert_eq!(identity, Identity::Machine(42));
    let mut client_stream = client.expect("client connects to scm");

    let (_, conn) = server_stream.get_ref();
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    let suite = suite_name(conn);
    assert!(TLS13_SUITES.contains(&suite.as_str()), "suite {suite}");
    let (_, conn) = client_stream.get_ref();
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(peer_identity(conn).expect("server identity"), Identity::Scm);

    // Data flows both ways.
    client_stream.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    server_stream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
    server_stream.write_all(b"pong").await.expect("write");
    client_stream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn operator_is_accepted_where_operators_are_allowed() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let alice = issue(&ca, Identity::operator("alice").expect("name"));
    let (server, client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &alice, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Operator, Role::Scm],
    )
    .await;
    let (_, identity) = server.expect("accepted");
    assert_eq!(identity, Identity::Operator("alice".into()));
    client.expect("connected");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let (server, client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        anonymous_client_cfg(&ca),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&server), "no_certificate", "{server:?}");
    // TLS 1.3: the client's handshake completes; the refusal comes on the first read.
    let mut stream = client.expect("TLS 1.3 client handshake completes");
    let mut buf = [0u8; 1];
    let err = stream.read(&mut buf).await.expect_err("server refused us");
    assert_eq!(HandshakeError::Tls(err).reason(), "no_certificate");
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let ca = new_ca("SCM test CA");
    let other = new_ca("Some other CA");
    let scm = issue(&ca, Identity::Scm);
    let machine = issue(&other, Identity::Machine(42));
    let (server, _client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&server), "unknown_ca", "{server:?}");
}

/// Same subject name as the real CA, different key: must not be confused with it.
#[tokio::test]
async fn fake_root_with_same_subject_is_refused() {
    let ca = new_ca("SCM test CA");
    let fake = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let machine = issue(&fake, Identity::Machine(42));
    let (server, _client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&server), "unknown_ca", "{server:?}");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let machine = issue_with(
        &ca,
        Identity::Machine(42),
        expired,
        Eku::ServerAndClient,
        &[],
    );
    let (server, _client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&server), "expired", "{server:?}");
}

#[tokio::test]
async fn not_yet_valid_client_certificate_is_refused() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let now = OffsetDateTime::now_utc();
    let future = Validity {
        not_before: now + time::Duration::days(1),
        not_after: now + time::Duration::days(10),
    };
    let machine = issue_with(
        &ca,
        Identity::Machine(42),
        future,
        Eku::ServerAndClient,
        &[],
    );
    let (server, _client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&server), "not_yet_valid", "{server:?}");
}

/// An operator certificate (client-only EKU) presented by a server. The certificate even
/// carries the hub's DNS name, so only the EKU is wrong.
#[tokio::test]
async fn client_refuses_server_with_client_only_eku() {
    let ca = new_ca("SCM test CA");
    let rogue = issue_with(
        &ca,
        Identity::operator("mallory").expect("name"),
        validity(),
        Eku::ClientOnly,
        &["scm.hub.internal"],
    );
    let machine = issue(&ca, Identity::Machine(42));
    let (server, client) = handshake(
        server_cfg(&ca, &rogue, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    let err = client.expect_err("client must refuse a client-only certificate");
    assert_eq!(err.reason(), "wrong_purpose", "{err:?}");
    assert!(
        matches!(
            err.rustls_error(),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ))
        ),
        "{err:?}"
    );
    assert_eq!(server_reason(&server), "bad_certificate", "{server:?}");
}

#[tokio::test]
async fn server_refuses_client_with_server_only_eku() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let machine = issue_with(&ca, Identity::Machine(42), validity(), Eku::ServerOnly, &[]);
    let (server, _client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&server), "wrong_purpose", "{server:?}");
    let err = server.expect_err("refused");
    assert!(
        matches!(
            err.rustls_error(),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ))
        ),
        "{err:?}"
    );
}

/// An agent's config port accepts only the hub, not another machine.
#[tokio::test]
async fn machine_is_refused_where_only_scm_is_allowed() {
    let ca = new_ca("SCM test CA");
    let agent = issue(&ca, Identity::Machine(1));
    let other_machine = issue(&ca, Identity::Machine(42));
    let (server, _client) = handshake(
        server_cfg(&ca, &agent, TlsPolicy::default()),
        client_cfg(&ca, &other_machine, TlsPolicy::default()),
        &Identity::Machine(1),
        &[Role::Scm],
    )
    .await;
    assert_eq!(server_reason(&server), "wrong_role", "{server:?}");
    match server {
        Err(HandshakeError::WrongRole { got, allowed }) => {
            assert_eq!(got, Identity::Machine(42));
            assert_eq!(allowed, vec![Role::Scm]);
        }
        other => panic!("expected WrongRole, got {other:?}"),
    }
}

/// Expecting machine 1, reaching machine 2: its certificate is not valid for
/// `machine-1.hub.internal`.
#[tokio::test]
async fn connect_to_wrong_machine_fails_on_the_name() {
    let ca = new_ca("SCM test CA");
    let machine2 = issue(&ca, Identity::Machine(2));
    let scm = issue(&ca, Identity::Scm);
    let (_server, client) = handshake(
        server_cfg(&ca, &machine2, TlsPolicy::default()),
        client_cfg(&ca, &scm, TlsPolicy::default()),
        &Identity::Machine(1),
        &[Role::Scm],
    )
    .await;
    let err = client.expect_err("must not reach machine 2");
    assert_eq!(err.reason(), "wrong_peer", "{err:?}");
}

/// Machine 2's certificate also names `machine-1.hub.internal` (a mis-issued extra host):
/// the name check passes, the identity check must still refuse it.
#[tokio::test]
async fn connect_to_wrong_machine_fails_on_the_identity() {
    let ca = new_ca("SCM test CA");
    let machine2 = issue_with(
        &ca,
        Identity::Machine(2),
        validity(),
        Eku::ServerAndClient,
        &["machine-1.hub.internal"],
    );
    let scm = issue(&ca, Identity::Scm);
    let (_server, client) = handshake(
        server_cfg(&ca, &machine2, TlsPolicy::default()),
        client_cfg(&ca, &scm, TlsPolicy::default()),
        &Identity::Machine(1),
        &[Role::Scm],
    )
    .await;
    match client {
        Err(err @ HandshakeError::WrongPeer { .. }) => {
            assert_eq!(err.reason(), "wrong_peer");
            let HandshakeError::WrongPeer { got, expected } = err else {
                unreachable!()
            };
            assert_eq!(got, Identity::Machine(2));
            assert_eq!(expected, Identity::Machine(1));
        }
        other => panic!("expected WrongPeer, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_refuses_operator_as_server_identity() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let machine = issue(&ca, Identity::Machine(42));
    let (_server, client) = {
        // The server side would wait forever for a ClientHello that never comes, so give
        // it a short timeout.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(server_cfg(&ca, &scm, TlsPolicy::default()));
        let connector =
            tokio_rustls::TlsConnector::from(client_cfg(&ca, &machine, TlsPolicy::default()));
        tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.expect("accept");
                accept(&acceptor, tcp, Duration::from_millis(200), &[Role::Machine]).await
            },
            async {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                connect(
                    &connector,
                    tcp,
                    &Identity::Operator("alice".into()),
                    HANDSHAKE_TIMEOUT,
                )
                .await
            }
        )
    };
    let err = client.expect_err("operators are never servers");
    assert!(matches!(err, HandshakeError::NotAServer(_)), "{err:?}");
    assert_eq!(err.reason(), "wrong_role");
}

#[tokio::test]
async fn tls12_only_client_is_refused_by_default_and_accepted_when_allowed() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let machine = issue(&ca, Identity::Machine(7));
    let legacy = client_cfg_versions(&ca, &machine, &[&rustls::version::TLS12]);

    let (server, client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        legacy.clone(),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&server), "protocol_version", "{server:?}");
    assert_eq!(client_reason(&client), "protocol_version", "{client:?}");

    let (server, client) = handshake(
        server_cfg(&ca, &scm, TlsPolicy { allow_tls12: true }),
        legacy,
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    let (stream, identity) = server.expect("TLS 1.2 allowed");
    assert_eq!(identity, Identity::Machine(7));
    let (_, conn) = stream.get_ref();
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_2));
    let suite = suite_name(conn);
    assert!(
        [
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        ]
        .contains(&suite.as_str()),
        "suite {suite}"
    );
    client.expect("client connected");
}

#[tokio::test]
async fn revoked_client_is_refused_and_others_still_accepted() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let revoked = issue(&ca, Identity::Machine(13));
    let good = issue(&ca, Identity::Machine(14));
    let now = OffsetDateTime::now_utc();
    let crl = ca
        .crl_pem(
            std::slice::from_ref(&revoked.serial),
            now - time::Duration::minutes(5),
            now + time::Duration::days(7),
        )
        .expect("CRL");
    let server = server_config_from_pem(
        ca.cert_pem(),
        &scm.cert_pem,
        &scm.key_pem,
        &[crl],
        TlsPolicy::default(),
        &[],
    )
    .expect("server config with CRL");

    let (result, _client) = handshake(
        server.clone(),
        client_cfg(&ca, &revoked, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&result), "revoked", "{result:?}");

    let (result, _client) = handshake(
        server,
        client_cfg(&ca, &good, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&result), "accepted", "{result:?}");
}

/// The serial a CRL lists is the serial the revoked peer's certificate shows after the
/// handshake (that is how a reload finds the sessions to close).
#[tokio::test]
async fn revoked_serials_match_the_peer_serial() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let machine = issue(&ca, Identity::Machine(13));
    let other = issue(&ca, Identity::Machine(14));
    let now = OffsetDateTime::now_utc();
    let crl = ca
        .crl_pem(
            std::slice::from_ref(&machine.serial),
            now - time::Duration::minutes(5),
            now + time::Duration::days(7),
        )
        .expect("CRL");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new.crl.pem");
    std::fs::write(&path, crl).expect("write CRL");
    let revoked = revoked_serials(std::slice::from_ref(&path)).expect("read CRL");
    assert_eq!(revoked.len(), 1);
    // Accepted without the CRL; the peer's serial is the one the CRL lists.
    let (server, _client) = handshake_stream(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &machine, TlsPolicy::default()),
    )
    .await;
    assert!(revoked.contains(&server.expect("accepted")));
    let (server, _client) = handshake_stream(
        server_cfg(&ca, &scm, TlsPolicy::default()),
        client_cfg(&ca, &other, TlsPolicy::default()),
    )
    .await;
    assert!(!revoked.contains(&server.expect("accepted")));
    let missing = dir.path().join("missing.crl.pem");
    assert!(matches!(
        revoked_serials(&[missing]),
        Err(TlsError::Read { what: "CRL", .. })
    ));
}

/// Runs a handshake and returns the server side's view of the client serial.
async fn handshake_stream(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Option<Vec<u8>>, Option<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(server);
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let (s, _) = accept(&acceptor, tcp, Duration::from_secs(10), &[Role::Machine])
            .await
            .ok()?;
        peer_serial(s.get_ref().1)
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client);
    let c = connect(&connector, tcp, &Identity::Scm, Duration::from_secs(10))
        .await
        .ok()
        .map(drop);
    (srv.await.expect("server task"), c)
}

/// A peer that opens TCP and never sends a ClientHello is cut off by the timeout.
#[tokio::test]
async fn silent_peer_times_out() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let acceptor = TlsAcceptor::from(server_cfg(&ca, &scm, TlsPolicy::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = TcpStream::connect(addr).await.expect("connect");
    let (tcp, _) = listener.accept().await.expect("accept");
    let timeout = Duration::from_millis(150);
    let result = accept(&acceptor, tcp, timeout, &[Role::Machine]).await;
    match result {
        Err(HandshakeError::Timeout(d)) => assert_eq!(d, timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        HandshakeError::Timeout(timeout).reason(),
        "timeout",
        "label is stable"
    );
    drop(silent);
}

#[tokio::test]
async fn non_tls_garbage_is_a_handshake_failure() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let acceptor = TlsAcceptor::from(server_cfg(&ca, &scm, TlsPolicy::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut peer = TcpStream::connect(addr).await.expect("connect");
    peer.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (tcp, _) = listener.accept().await.expect("accept");
    let err = accept(&acceptor, tcp, HANDSHAKE_TIMEOUT, &[Role::Machine])
        .await
        .expect_err("not TLS");
    assert_eq!(err.reason(), "handshake_failure", "{err:?}");
}

#[tokio::test]
async fn peer_closing_mid_handshake_is_io() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let acceptor = TlsAcceptor::from(server_cfg(&ca, &scm, TlsPolicy::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peer = TcpStream::connect(addr).await.expect("connect");
    drop(peer);
    let (tcp, _) = listener.accept().await.expect("accept");
    let err = accept(&acceptor, tcp, HANDSHAKE_TIMEOUT, &[Role::Machine])
        .await
        .expect_err("closed");
    assert_eq!(err.reason(), "io", "{err:?}");
}

#[test]
fn provider_allow_lists_are_exact() {
    let names = |p: &CryptoProvider| -> Vec<String> {
        p.cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect()
    };
    assert_eq!(names(&provider(TlsPolicy::default())), TLS13_SUITES);
    assert_eq!(
        names(&provider(TlsPolicy { allow_tls12: true })),
        [
            "TLS13_AES_256_GCM_SHA384",
            "TLS13_AES_128_GCM_SHA256",
            "TLS13_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        ]
    );
    let groups: Vec<String> = provider(TlsPolicy::default())
        .kx_groups
        .iter()
        .map(|g| format!("{:?}", g.name()))
        .collect();
    assert_eq!(groups, ["X25519", "secp256r1"]);
}

#[test]
fn install_default_provider_is_idempotent() {
    install_default_provider();
    install_default_provider();
    assert!(CryptoProvider::get_default().is_some());
}

#[test]
fn configs_use_the_restricted_provider_and_alpn() {
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let server = server_config_from_pem(
        ca.cert_pem(),
        &scm.cert_pem,
        &scm.key_pem,
        &[],
        TlsPolicy::default(),
        &[b"h2"],
    )
    .expect("config");
    assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
    assert_eq!(server.crypto_provider().cipher_suites.len(), 3);
    let client = client_cfg(&ca, &scm, TlsPolicy::default());
    assert_eq!(client.crypto_provider().cipher_suites.len(), 3);
    let legacy = client_cfg(&ca, &scm, TlsPolicy { allow_tls12: true });
    assert_eq!(legacy.crypto_provider().cipher_suites.len(), 6);
}

// ---------------------------------------------------------------------------------------
// Loading errors

#[test]
fn loading_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = new_ca("SCM test CA");
    let scm = issue(&ca, Identity::Scm);
    let write = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        path
    };
    let ca_path = write("ca.pem", ca.cert_pem());
    let cert_path = write("scm.pem", &scm.cert_pem);
    let key_path = write("scm-key.pem", &scm.key_pem);
    let files = TlsFiles {
        ca: ca_path.clone(),
        cert: cert_path.clone(),
        key: key_path.clone(),
        crls: vec![],
    };
    server_config(&files, TlsPolicy::default(), &[]).expect("good files load");
    client_config(&files, TlsPolicy::default()).expect("good files load");

    // Missing key file.
    let missing = dir.path().join("nope-key.pem");
    let err = server_config(
        &TlsFiles {
            key: missing.clone(),
            ..files.clone()
        },
        TlsPolicy::default(),
        &[],
    )
    .expect_err("missing key");
    assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    // A certificate where the key should be.
    let err = client_config(
        &TlsFiles {
            key: cert_path.clone(),
            ..files.clone()
        },
        TlsPolicy::default(),
    )
    .expect_err("no key in file");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read private key {}: no PEM private key found; expected a PKCS#8/SEC1 key \
             written by `scm init-dev`",
            cert_path.display()
        )
    );

    // A leaf certificate where the CA should be.
    let err = server_config(
        &TlsFiles {
            ca: cert_path.clone(),
            ..files.clone()
        },
        TlsPolicy::default(),
        &[],
    )
    .expect_err("leaf as CA");
    assert!(matches!(err, TlsError::BadCa { .. }), "{err:?}");
    assert!(err.to_string().contains("not a CA certificate"), "{err}");

    // A key where the certificate should be.
    let err = server_config(
        &TlsFiles {
            cert: key_path.clone(),
            ..files.clone()
        },
        TlsPolicy::default(),
        &[],
    )
    .expect_err("no certificate");
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");

    // Certificate and key that do not belong together.
    let other = issue(&ca, Identity::Scm);
    let other_key = write("other-key.pem", &other.key_pem);
    let err = server_config(
        &TlsFiles {
            key: other_key,
            ..files.clone()
        },
        TlsPolicy::default(),
        &[],
    )
    .expect_err("mismatched pair");
    assert!(matches!(err, TlsError::CertKey { .. }), "{err:?}");

    // A CRL from another CA.
    let other_ca = new_ca("Other CA");
    let now = OffsetDateTime::now_utc();
    let foreign_crl = write(
        "foreign.crl.pem",
        &other_ca
            .crl_pem(&[], now, now + time::Duration::days(1))
            .expect("crl"),
    );
    let err = server_config(
        &TlsFiles {
            crls: vec![foreign_crl.clone()],
            ..files.clone()
        },
        TlsPolicy::default(),
        &[],
    )
    .expect_err("foreign CRL");
    assert!(matches!(err, TlsError::BadCrl { .. }), "{err:?}");
    assert!(err.to_string().contains("not by the CA"), "{err}");

    // A CRL file without a CRL.
    let err = server_config(
        &TlsFiles {
            crls: vec![cert_path.clone()],
            ..files.clone()
        },
        TlsPolicy::default(),
        &[],
    )
    .expect_err("not a CRL");
    assert!(matches!(err, TlsError::NoCrl { .. }), "{err:?}");
}

#[test]
fn own_certificate_without_identity_is_refused() {
    let ca = new_ca("SCM test CA");
    let mut params =
        rcgen::CertificateParams::new(vec!["scm.hub.internal".to_owned()]).expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let anonymous = ca.sign(params).expect("sign");
    let err = server_config_from_pem(
        ca.cert_pem(),
        &anonymous.cert_pem,
        &anonymous.key_pem,
        &[],
        TlsPolicy::default(),
        &[],
    )
    .expect_err("no identity");
    assert!(matches!(err, TlsError::BadCertificate { .. }), "{err:?}");
}

#[test]
fn error_labels_cover_received_alerts() {
    let tls = |e: rustls::Error| HandshakeError::Tls(io::Error::new(io::ErrorKind::InvalidData, e));
    let alert = |a| tls(rustls::Error::AlertReceived(a)).reason();
    assert_eq!(
        alert(AlertDescription::CertificateRequired),
        "no_certificate"
    );
    assert_eq!(alert(AlertDescription::UnknownCA), "unknown_ca");
    assert_eq!(alert(AlertDescription::CertificateRevoked), "revoked");
    assert_eq!(alert(AlertDescription::ProtocolVersion), "protocol_version");
    assert_eq!(
        alert(AlertDescription::HandshakeFailure),
        "handshake_failure"
    );
    assert_eq!(
        tls(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet
        ))
        .reason(),
        "not_yet_valid"
    );
    assert_eq!(
        HandshakeError::Tls(io::Error::from(io::ErrorKind::ConnectionReset)).reason(),
        "io"
    );
    assert_eq!(
        tls(rustls::Error::PeerIncompatible(
            PeerIncompatible::NoCipherSuitesInCommon
        ))
        .reason(),
        "no_common_cipher"
    );
    assert_eq!(
        HandshakeError::NoIdentity(IdentityError::NoIdentityUri).reason(),
        "no_identity"
    );
}
