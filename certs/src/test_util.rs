//! Test fixtures: a CA generated at test time, leaf certificates, configurations and a
//! helper that runs one real handshake over loopback TCP.

use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::{Identity, Role};
use crate::pki::{Ca, Eku, IssuedCert, LeafSpec, Validity};
use crate::tls::{
    HandshakeError, Material, TlsPolicy, accept, build_client, client_config_from_pem, connect,
    server_config_from_pem,
};

/// Generous handshake timeout for tests that expect a handshake to finish.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn validity() -> Validity {
    Validity::days_from_now(1)
}

pub(crate) fn new_ca(cn: &str) -> Ca {
    Ca::generate(cn, &validity()).expect("generate CA")
}

pub(crate) fn issue(ca: &Ca, identity: Identity) -> IssuedCert {
    ca.issue(&LeafSpec::new(identity, validity()))
        .expect("issue leaf")
}

pub(crate) fn issue_with(
    ca: &Ca,
    identity: Identity,
    validity: Validity,
    eku: Eku,
    extra_hosts: &[&str],
) -> IssuedCert {
    let mut spec = LeafSpec::new(identity, validity);
    spec.eku = eku;
    spec.extra_hosts = extra_hosts.iter().map(|h| (*h).to_owned()).collect();
    ca.issue(&spec).expect("issue leaf")
}

pub(crate) fn server_cfg(ca: &Ca, leaf: &IssuedCert, policy: TlsPolicy) -> Arc<ServerConfig> {
    server_config_from_pem(
        ca.cert_pem(),
        &leaf.cert_pem,
        &leaf.key_pem,
        &[],
        policy,
        &[],
    )
    .expect("server config")
}

pub(crate) fn client_cfg(ca: &Ca, leaf: &IssuedCert, policy: TlsPolicy) -> Arc<ClientConfig> {
    client_config_from_pem(ca.cert_pem(), &leaf.cert_pem, &leaf.key_pem, policy)
        .expect("client config")
}

/// A client restricted to the given protocol versions (e.g. a TLS 1.2-only legacy peer).
pub(crate) fn client_cfg_versions(
    ca: &Ca,
    leaf: &IssuedCert,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let material =
        Material::from_pem(ca.cert_pem(), &leaf.cert_pem, &leaf.key_pem, &[]).expect("material");
    build_client(material, TlsPolicy { allow_tls12: true }, versions).expect("client config")
}

/// A client that trusts `ca` but presents no certificate.
pub(crate) fn anonymous_client_cfg(ca: &Ca) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pki_types::CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(der.expect("CA PEM")).expect("add root");
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(crate::tls::provider(TlsPolicy::default())))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

pub(crate) type ServerResult =
    Result<(tokio_rustls::server::TlsStream<TcpStream>, Identity), HandshakeError>;
pub(crate) type ClientResult = Result<tokio_rustls::client::TlsStream<TcpStream>, HandshakeError>;

/// Runs [`accept`] and [`connect`] against each other over loopback TCP. Both streams
/// stay alive until both sides have finished.
pub(crate) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    expected: &Identity,
    allowed: &[Role],
) -> (ServerResult, ClientResult) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    let server_side = async {
        let (tcp, _) = listener.accept().await.expect("accept tcp");
        accept(&acceptor, tcp, HANDSHAKE_TIMEOUT, allowed).await
    };
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.expect("connect tcp");
        connect(&connector, tcp, expected, HANDSHAKE_TIMEOUT).await
    };
    tokio::join!(server_side, client_side)
}

/// The server's reason label, or "accepted".
pub(crate) fn server_reason(result: &ServerResult) -> &'static str {
    match result {
        Ok(_) => "accepted",
        Err(e) => e.reason(),
    }
}

/// The client's reason label, or "connected".
pub(crate) fn client_reason(result: &ClientResult) -> &'static str {
    match result {
        Ok(_) => "connected",
        Err(e) => e.reason(),
    }
}
