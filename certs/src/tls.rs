//! rustls configuration for the SCM links, and handshakes with timeouts and peer checks.
//!
//! * One crypto provider, **ring**, with an explicit allow-list of cipher suites and key
//!   exchange groups ([`provider`]).
//! * TLS 1.3 only, unless [`TlsPolicy::allow_tls12`] is set for legacy peers.
//! * Servers **require** a client certificate signed by the configured CA (optionally
//!   checked against CRLs); clients trust only that CA. Session resumption is off on both
//!   sides, so every connection verifies the full certificate (and sees current CRLs).
//! * [`accept`] and [`connect`] run the handshake under a timeout (call them inside the
//!   per-connection task, never in the accept loop), then read the peer's [`Identity`]
//!   from its certificate and check it against the allowed roles / the expected peer.
//! * [`HandshakeError::reason`] gives a short stable label for logs and metrics.

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::{cipher_suite, kx_group};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, CommonState, PeerIncompatible, RootCertStore,
    ServerConfig, SupportedProtocolVersion,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::identity::{Identity, IdentityError, Role, identity_from_der};

/// Paths of the PEM files a TLS endpoint needs.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate(s) that peers must chain to (`ca.pem`).
    pub ca: PathBuf,
    /// This endpoint's certificate, optionally followed by intermediates (`scm.pem`, ...).
    pub cert: PathBuf,
    /// This endpoint's private key (`scm-key.pem`, ...).
    pub key: PathBuf,
    /// CRL files; certificates they list are refused. Every CRL must be issued by the CA.
    pub crls: Vec<PathBuf>,
}

/// Protocol choices that may be relaxed for legacy peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlsPolicy {
    /// Also offer/accept TLS 1.2 (ECDHE-ECDSA AEAD suites only). Off by default.
    pub allow_tls12: bool,
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS13_AND_TLS12: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

impl TlsPolicy {
    fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        if self.allow_tls12 {
            TLS13_AND_TLS12
        } else {
            TLS13_ONLY
        }
    }
}

/// The ring crypto provider restricted to the allow-list.
///
/// TLS 1.3: `TLS13_AES_256_GCM_SHA384`, `TLS13_AES_128_GCM_SHA256`,
/// `TLS13_CHACHA20_POLY1305_SHA256`. With `allow_tls12`, also
/// `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`, `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256` and
/// `TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256`. Key exchange: X25519, secp256r1.
pub fn provider(policy: TlsPolicy) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    let mut suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    if policy.allow_tls12 {
        suites.extend([
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ]);
    }
    provider.cipher_suites = suites;
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1];
    provider
}

/// Installs `provider(TlsPolicy::default())` as the process-wide default rustls provider
/// (used by libraries such as tonic that call `ServerConfig::builder()`).
///
/// Idempotent and never panics: only the first call does anything, and if another
/// provider was installed before, that one is kept (a warning is logged).
pub fn install_default_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if provider(TlsPolicy::default()).install_default().is_err() {
            tracing::warn!(
                "a process-default rustls CryptoProvider was already installed; keeping it"
            );
        }
    });
}

/// What went wrong while loading TLS material or building a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}; check the path and its permissions", .path.display())]
    Read {
        /// "CA certificate", "certificate", "private key" or "CRL".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A PEM file holds no certificate.
    #[error(
        "cannot read {what} {origin}: no PEM certificate found; expected a PEM \
         certificate written by `scm init-dev`"
    )]
    NoCertificate {
        /// "CA certificate" or "certificate".
        what: &'static str,
        /// The file (or "(in memory)").
        origin: String,
    },
    /// A PEM file holds no private key.
    #[error(
        "cannot read private key {origin}: no PEM private key found; expected a \
         PKCS#8/SEC1 key written by `scm init-dev`"
    )]
    NoPrivateKey {
        /// The file (or "(in memory)").
        origin: String,
    },
    /// A PEM file holds no CRL.
    #[error(
        "cannot read CRL {origin}: no PEM X509 CRL found; expected a CRL issued by the \
         SCM CA"
    )]
    NoCrl {
        /// The file (or "(in memory)").
        origin: String,
    },
    /// A PEM file is malformed.
    #[error("cannot read {what} {origin}: malformed PEM: {detail}")]
    BadPem {
        /// What the file should hold.
        what: &'static str,
        /// The file (or "(in memory)").
        origin: String,
        /// The parser's message.
        detail: String,
    },
    /// The CA file is unusable (not a CA, or rejected as a trust anchor).
    #[error("cannot use CA certificate {origin}: {detail}")]
    BadCa {
        /// The file (or "(in memory)").
        origin: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// This endpoint's certificate is unusable.
    #[error("cannot use certificate {origin}: {detail}")]
    BadCertificate {
        /// The file (or "(in memory)").
        origin: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// A CRL is unusable.
    #[error("cannot use CRL {origin}: {detail}")]
    BadCrl {
        /// The file (or "(in memory)").
        origin: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The certificate and key do not fit together (or the key type is unsupported).
    #[error(
        "certificate {cert} and private key {key} cannot be used together: {source}; \
         check that they are a matching pair"
    )]
    CertKey {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// rustls' error.
        source: rustls::Error,
    },
    /// rustls refused the configuration (should not happen with the built-in provider).
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The certificate verifier could not be built.
    #[error("cannot build the certificate verifier: {0}; check the CA and CRL files")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// Builds the server configuration: presents `files.cert`, requires a client certificate
/// that chains to `files.ca` and is not revoked by `files.crls`. TLS 1.3 only unless
/// `policy.allow_tls12`. `alpn` lists the ALPN protocols to advertise (e.g. `b"h2"` for
/// tonic; empty for none).
pub fn server_config(
    files: &TlsFiles,
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let material = Material::from_files(files)?;
    build_server(material, policy, alpn)
}

/// Builds the client configuration: presents `files.cert` and trusts only `files.ca`
/// (server certificates listed in `files.crls` are refused).
pub fn client_config(files: &TlsFiles, policy: TlsPolicy) -> Result<Arc<ClientConfig>, TlsError> {
    let material = Material::from_files(files)?;
    build_client(material, policy, policy.versions())
}

/// Like [`server_config`], from PEM text in memory.
pub fn server_config_from_pem(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    crl_pems: &[String],
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let material = Material::from_pem(ca_pem, cert_pem, key_pem, crl_pems)?;
    build_server(material, policy, alpn)
}

/// Like [`client_config`], from PEM text in memory (no CRLs).
pub fn client_config_from_pem(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    policy: TlsPolicy,
) -> Result<Arc<ClientConfig>, TlsError> {
    let material = Material::from_pem(ca_pem, cert_pem, key_pem, &[])?;
    build_client(material, policy, policy.versions())
}

/// Why a handshake (or the identity check after it) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The handshake did not finish in time.
    #[error(
        "TLS handshake did not complete within {0:?}; the peer is too slow, stalled, or \
         does not speak TLS"
    )]
    Timeout(Duration),
    /// TLS or I/O failure; see [`HandshakeError::reason`] for a classification.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The peer's certificate carries no usable SCM identity.
    #[error("the peer's certificate carries no usable SCM identity: {0}")]
    NoIdentity(#[source] IdentityError),
    /// The peer is authenticated but its role is not allowed on this listener.
    #[error(
        "{got} is not allowed here (allowed: {}); it presented a valid certificate for the \
         wrong kind of peer",
        roles_list(.allowed)
    )]
    WrongRole {
        /// Who the peer is.
        got: Identity,
        /// The roles this listener accepts.
        allowed: Vec<Role>,
    },
    /// The peer is authenticated but is not the one we meant to reach.
    #[error("reached {got} but expected {expected}; check the address configured for {expected}")]
    WrongPeer {
        /// Who answered.
        got: Identity,
        /// Who we wanted.
        expected: Identity,
    },
    /// [`connect`] was asked to reach an identity that is never a TLS server (an operator).
    #[error("cannot connect to {0}: only the hub and machines are TLS servers")]
    NotAServer(Identity),
}

fn roles_list(roles: &[Role]) -> String {
    if roles.is_empty() {
        return "nobody".to_owned();
    }
    roles
        .iter()
        .map(Role::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl HandshakeError {
    /// A short stable label for logs and metrics: `timeout`, `no_certificate`,
    /// `unknown_ca`, `expired`, `not_yet_valid`, `revoked`, `wrong_purpose` (the
    /// certificate's extended key usage does not allow this side, e.g. a server-only
    /// certificate used as a client), `bad_certificate`, `protocol_version`,
    /// `no_common_cipher` (the peer offered no allowed cipher suite or key exchange
    /// group), `handshake_failure`, `wrong_role`, `wrong_peer`, `no_identity` or `io`.
    ///
    /// Errors found locally and alerts received from the peer are both classified, so
    /// the label on the rejecting side names the cause and the other side usually gets
    /// the same label. A server certificate that is not valid for the expected name gives
    /// `wrong_peer`. An I/O error that is not a TLS error (reset, EOF) gives `io`.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Tls(e) => match self.rustls_error() {
                Some(err) => classify(err),
                None if e.kind() == io::ErrorKind::TimedOut => "timeout",
                None => "io",
            },
            HandshakeError::NoIdentity(_) => "no_identity",
            HandshakeError::WrongRole { .. } | HandshakeError::NotAServer(_) => "wrong_role",
            HandshakeError::WrongPeer { .. } => "wrong_peer",
        }
    }

    /// The rustls error inside a [`HandshakeError::Tls`], if there is one.
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        match self {
            HandshakeError::Tls(e) => e.get_ref()?.downcast_ref::<rustls::Error>(),
            _ => None,
        }
    }
}

fn classify(err: &rustls::Error) -> &'static str {
    use AlertDescription as A;
    use CertificateError as C;
    use PeerIncompatible as P;
    use rustls::Error as E;
    match err {
        E::NoCertificatesPresented | E::AlertReceived(A::CertificateRequired) => "no_certificate",
        // BadSignature: signed by a key that no trusted CA holds (a "fake root").
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)
        | E::AlertReceived(A::UnknownCA) => "unknown_ca",
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })
        | E::AlertReceived(A::CertificateExpired) => "expired",
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => "not_yet_valid",
        E::InvalidCertificate(C::Revoked) | E::AlertReceived(A::CertificateRevoked) => "revoked",
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "wrong_peer"
        }
        E::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "wrong_purpose"
        }
        E::PeerIncompatible(P::NoCipherSuitesInCommon | P::NoKxGroupsInCommon) => {
            "no_common_cipher"
        }
        E::InvalidCertificate(_)
        | E::InvalidCertRevocationList(_)
        | E::AlertReceived(
            A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown | A::DecryptError,
        ) => "bad_certificate",
        E::PeerIncompatible(
            P::ServerDoesNotSupportTls12Or13
            | P::ServerTlsVersionIsDisabledByOurConfig
            | P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::Tls13RequiredForQuic,
        )
        | E::AlertReceived(A::ProtocolVersion) => "protocol_version",
        _ => "handshake_failure",
    }
}

/// The identity in the peer's end-entity certificate (after a completed handshake).
pub fn peer_identity(conn: &CommonState) -> Result<Identity, HandshakeError> {
    let cert = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(HandshakeError::NoIdentity(IdentityError::NoPeerCertificate))?;
    identity_from_der(cert).map_err(HandshakeError::NoIdentity)
}

/// The serial number of the peer's end-entity certificate (big-endian bytes as encoded in
/// the certificate, as [`crate::pki::IssuedCert::serial`] and CRL entries carry it).
pub fn peer_serial(conn: &CommonState) -> Option<Vec<u8>> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.raw_serial().to_vec())
}

/// The CRLs (DER) in one PEM source; a file may hold several.
fn crls_in(source: &PemSource<'_>) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    CertificateRevocationListDer::pem_slice_iter(&source.data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what: "CRL",
            origin: source.origin.clone(),
            detail: e.to_string(),
        })
}

/// The serial numbers the CRL files list (each file may hold several CRLs). Used after a
/// reload to find established sessions whose certificate is now revoked.
pub fn revoked_serials(crls: &[PathBuf]) -> Result<std::collections::HashSet<Vec<u8>>, TlsError> {
    let mut out = std::collections::HashSet::new();
    for path in crls {
        let source = PemSource::file("CRL", path)?;
        let found = crls_in(&source)?;
        for crl in found {
            let (_, parsed) = x509_parser::parse_x509_crl(&crl).map_err(|e| TlsError::BadCrl {
                origin: source.origin.clone(),
                detail: format!("not a valid X.509 CRL: {e}"),
            })?;
            for revoked in parsed.iter_revoked_certificates() {
                out.insert(revoked.raw_serial().to_vec());
            }
        }
    }
    Ok(out)
}

/// Server side: runs the TLS handshake under `timeout`, then checks that the client's
/// identity has one of the `allowed` roles (an empty list allows nobody).
///
/// Call it inside the per-connection task. On success returns the stream and the
/// client's identity.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: IO,
    timeout: Duration,
    allowed: &[Role],
) -> Result<(tokio_rustls::server::TlsStream<IO>, Identity), HandshakeError> {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Err(_) => return Err(HandshakeError::Timeout(timeout)),
        Ok(result) => result.map_err(HandshakeError::Tls)?,
    };
    let identity = peer_identity(stream.get_ref().1)?;
    if !allowed.contains(&identity.role()) {
        return Err(HandshakeError::WrongRole {
            got: identity,
            allowed: allowed.to_vec(),
        });
    }
    Ok((stream, identity))
}

/// Client side: runs the TLS handshake under `timeout` with the server name
/// `expected.server_name()`, then checks that the server's identity URI is `expected`.
///
/// **TLS 1.3 caveat:** the client finishes its handshake before the server has checked
/// the client certificate, so this returns `Ok` even when the server refuses our
/// certificate (unknown CA, expired, revoked, wrong role...). The refusal shows up as an
/// error on the first read (or write) of the returned stream; treat an error there as a
/// possible authentication failure ([`HandshakeError::Tls`] wrapping that error
/// classifies it with [`HandshakeError::reason`]). Version mismatches and problems with
/// the *server's* certificate do fail here.
pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    connector: &tokio_rustls::TlsConnector,
    io: IO,
    expected: &Identity,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<IO>, HandshakeError> {
    let name = expected
        .server_name()
        .ok_or_else(|| HandshakeError::NotAServer(expected.clone()))?;
    let server_name = ServerName::try_from(name).map_err(|e| {
        HandshakeError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    })?;
    let stream = match tokio::time::timeout(timeout, connector.connect(server_name, io)).await {
        Err(_) => return Err(HandshakeError::Timeout(timeout)),
        Ok(result) => result.map_err(HandshakeError::Tls)?,
    };
    let got = peer_identity(stream.get_ref().1)?;
    if &got != expected {
        return Err(HandshakeError::WrongPeer {
            got,
            expected: expected.clone(),
        });
    }
    Ok(stream)
}

// ---------------------------------------------------------------------------------------
// Loading

/// PEM text and where it came from (for error messages).
struct PemSource<'a> {
    data: Cow<'a, [u8]>,
    origin: String,
}

impl PemSource<'static> {
    fn file(what: &'static str, path: &Path) -> Result<Self, TlsError> {
        let data = std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PemSource {
            data: Cow::Owned(data),
            origin: path.display().to_string(),
        })
    }
}

impl<'a> PemSource<'a> {
    fn memory(text: &'a str) -> Self {
        PemSource {
            data: Cow::Borrowed(text.as_bytes()),
            origin: "(in memory)".to_owned(),
        }
    }
}

/// Parsed and checked TLS material.
pub(crate) struct Material {
    pub(crate) roots: RootCertStore,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
    cert_origin: String,
    key_origin: String,
}

impl Material {
    fn from_files(files: &TlsFiles) -> Result<Material, TlsError> {
        let crls = files
            .crls
            .iter()
            .map(|p| PemSource::file("CRL", p))
            .collect::<Result<Vec<_>, _>>()?;
        Material::parse(
            PemSource::file("CA certificate", &files.ca)?,
            PemSource::file("certificate", &files.cert)?,
            PemSource::file("private key", &files.key)?,
            crls,
        )
    }

    pub(crate) fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        crl_pems: &[String],
    ) -> Result<Material, TlsError> {
        Material::parse(
            PemSource::memory(ca_pem),
            PemSource::memory(cert_pem),
            PemSource::memory(key_pem),
            crl_pems.iter().map(|c| PemSource::memory(c)).collect(),
        )
    }

    fn parse(
        ca: PemSource<'_>,
        cert: PemSource<'_>,
        key: PemSource<'_>,
        crls: Vec<PemSource<'_>>,
    ) -> Result<Material, TlsError> {
        // Trust anchors: every certificate in the CA file must be a CA certificate.
        let ca_certs = parse_certs("CA certificate", &ca)?;
        let mut roots = RootCertStore::empty();
        let mut ca_subjects: Vec<Vec<u8>> = Vec::new();
        for der in ca_certs {
            let (_, x509) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::BadCa {
                    origin: ca.origin.clone(),
                    detail: format!("not a valid X.509 certificate: {e}"),
                })?;
            if !x509.is_ca() {
                return Err(TlsError::BadCa {
                    origin: ca.origin.clone(),
                    detail: format!(
                        "{} is not a CA certificate; pass the CA certificate (ca.pem), not a \
                         leaf certificate",
                        x509.subject()
                    ),
                });
            }
            ca_subjects.push(x509.subject().as_raw().to_vec());
            roots.add(der).map_err(|e| TlsError::BadCa {
                origin: ca.origin.clone(),
                detail: format!("rejected as a trust anchor: {e}"),
            })?;
        }

        // Our own certificate must carry an SCM identity.
        let chain = parse_certs("certificate", &cert)?;
        if let Err(e) = identity_from_der(&chain[0]) {
            return Err(TlsError::BadCertificate {
                origin: cert.origin.clone(),
                detail: format!("{e}"),
            });
        }

        let key_der = PrivateKeyDer::from_pem_slice(&key.data).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::NoPrivateKey {
                origin: key.origin.clone(),
            },
            other => TlsError::BadPem {
                what: "private key",
                origin: key.origin.clone(),
                detail: other.to_string(),
            },
        })?;

        let mut crl_ders = Vec::new();
        for source in &crls {
            let found = crls_in(source)?;
            if found.is_empty() {
                return Err(TlsError::NoCrl {
                    origin: source.origin.clone(),
                });
            }
            for crl in found {
                check_crl_issuer(&crl, &ca_subjects, &source.origin, &ca.origin)?;
                crl_ders.push(crl);
            }
        }

        Ok(Material {
            roots,
            chain,
            key: key_der,
            crls: crl_ders,
            cert_origin: cert.origin,
            key_origin: key.origin,
        })
    }
}

fn parse_certs(
    what: &'static str,
    source: &PemSource<'_>,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&source.data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            origin: source.origin.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            origin: source.origin.clone(),
        });
    }
    Ok(certs)
}

/// A CRL from another issuer would make the revocation status of our peers unknown, and
/// the verifier refuses unknown status: every peer would be refused. Catch it at load.
fn check_crl_issuer(
    crl: &CertificateRevocationListDer<'_>,
    ca_subjects: &[Vec<u8>],
    crl_origin: &str,
    ca_origin: &str,
) -> Result<(), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_crl(crl).map_err(|e| TlsError::BadCrl {
        origin: crl_origin.to_owned(),
        detail: format!("not a valid X.509 CRL: {e}"),
    })?;
    if ca_subjects
        .iter()
        .any(|s| s.as_slice() == parsed.issuer().as_raw())
    {
        Ok(())
    } else {
        Err(TlsError::BadCrl {
            origin: crl_origin.to_owned(),
            detail: format!(
                "issued by {}, not by the CA in {ca_origin}; use a CRL made by the SCM CA",
                parsed.issuer()
            ),
        })
    }
}

pub(crate) fn build_server(
    material: Material,
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(provider(policy));
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(material.roots), provider.clone());
    if !material.crls.is_empty() {
        verifier = verifier.with_crls(material.crls);
    }
    let verifier = verifier.build().map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(policy.versions())
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain, material.key)
        .map_err(|source| TlsError::CertKey {
            cert: material.cert_origin,
            key: material.key_origin,
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No resumption: every connection verifies the client certificate afresh.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

pub(crate) fn build_client(
    material: Material,
    policy: TlsPolicy,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(provider(policy));
    let mut verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(material.roots), provider.clone());
    if !material.crls.is_empty() {
        verifier = verifier.with_crls(material.crls);
    }
    let verifier = verifier.build().map_err(TlsError::Verifier)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(TlsError::Config)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(material.chain, material.key)
        .map_err(|source| TlsError::CertKey {
            cert: material.cert_origin,
            key: material.key_origin,
            source,
        })?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
