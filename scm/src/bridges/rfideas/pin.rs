//! Pinned print-server certificates.
//!
//! A print server's HTTPS certificate is often the self-signed one it generated at
//! installation, frequently with `CA:TRUE`. WebPKI path building refuses such a certificate
//! as a server's own (`CaUsedAsEndEntity`) even when it is the configured CA, so there is
//! a second way to trust a print server: pin its exact certificate (`pin_cert`, a PEM file)
//! or the SHA-256 of its DER bytes (`pin_sha256`).
//!
//! A pinned certificate is still checked like any other: its validity period (notBefore,
//! notAfter) against the current time, and the URL's host against its subjectAltName
//! (webpki's name check). The handshake's signature is verified with the ring provider, so
//! the server must hold the certificate's private key. Chains are not looked at: the leaf
//! is the trust decision.
//!
//! The same rule serves a CA file holding the print server's self-signed certificate: a
//! server presenting exactly one of the CA file's certificates is checked as if that
//! certificate were pinned (whoever holds a trusted CA's key could issue any certificate
//! anyway, so accepting the CA certificate itself widens nothing).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

/// A SHA-256 of a certificate's DER bytes.
pub(crate) type Fingerprint = [u8; 32];

/// Parses 64 hex digits (case-insensitive, `:` separators and surrounding spaces allowed).
pub(crate) fn parse_sha256(s: &str) -> Option<Fingerprint> {
    let digits: String = s.trim().chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
}

/// The fingerprint of a DER certificate.
pub(crate) fn fingerprint(der: &[u8]) -> Fingerprint {
    Sha256::digest(der).into()
}

/// The fingerprint of the first certificate in a PEM file; the error says what is wrong.
pub(crate) fn load_cert(path: &Path) -> Result<Fingerprint, String> {
    let mut certs = CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())?;
    match certs.next() {
        Some(Ok(c)) => Ok(fingerprint(&c)),
        Some(Err(e)) => Err(format!("malformed PEM: {e}")),
        None => Err("no PEM certificate found".into()),
    }
}

/// Why a pinned certificate was refused (shown in the swipe's failure reason).
#[derive(Debug, thiserror::Error)]
#[error("the print server presented a certificate with SHA-256 {got}, not the pinned certificate")]
struct NotPinned {
    got: String,
}

/// Accepts exactly the pinned certificates (after the time and name checks); with `chain`,
/// any other certificate must verify through it.
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    pins: Vec<Fingerprint>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    /// Only `pins`.
    pub(crate) fn pinned(pins: Vec<Fingerprint>, provider: Arc<CryptoProvider>) -> Self {
        PinnedVerifier {
            pins,
            chain: None,
            provider,
        }
    }

    /// A chain to `roots`, or exactly one of the roots' own certificates (`root_certs`).
    pub(crate) fn roots(
        roots: Arc<rustls::RootCertStore>,
        root_certs: &[CertificateDer<'_>],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::client::VerifierBuilderError> {
        let chain = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
        Ok(PinnedVerifier {
            pins: root_certs.iter().map(|c| fingerprint(c)).collect(),
            chain: Some(chain),
            provider,
        })
    }
}

/// Checks a pinned leaf's validity period and name.
fn check_leaf(
    end_entity: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Result<(), Error> {
    let bad = || Error::InvalidCertificate(CertificateError::BadEncoding);
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity).map_err(|_| bad())?;
    let now = i64::try_from(now.as_secs()).map_err(|_| bad())?;
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > validity.not_after.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    let parsed = ParsedCertificate::try_from(end_entity)?;
    verify_server_name(&parsed, server_name)
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let got = fingerprint(end_entity);
        if self.pins.contains(&got) {
            check_leaf(end_entity, server_name, now)?;
            return Ok(ServerCertVerified::assertion());
        }
        match &self.chain {
            Some(chain) => {
                chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotPinned {
                    got: hex::encode(got),
                })),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_forms() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_sha256(&hex64), Some([0xab; 32]));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_sha256(&colons), Some([0xab; 32]));
        assert_eq!(parse_sha256(&format!(" {hex64} ")), Some([0xab; 32]));
        assert_eq!(parse_sha256(&"ab".repeat(31)), None);
        assert_eq!(parse_sha256(&"zz".repeat(32)), None);
        assert_eq!(parse_sha256(""), None);
    }
}
