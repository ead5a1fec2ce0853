//! The private CA: generating it, loading it, issuing leaf certificates and CRLs, and
//! writing a complete development PKI to a directory.
//!
//! All keys are ECDSA P-256. Every validity period is explicit (rcgen's default of
//! 1975..4096 is never used). Leaf certificates follow the identity model described in
//! the crate docs: one `urn:scm:` URI SAN, a DNS SAN used as the TLS server name (hub and
//! machines only), optional extra host names or IP addresses, and an EKU chosen by role.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::PublicKeyData;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

use crate::identity::{Identity, IdentityError, Role};

/// Length of the random serial numbers given to new certificates, in bytes.
const SERIAL_LEN: usize = 16;

/// A validity period; both ends are always explicit.
#[derive(Debug, Clone)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (tolerates small clock differences between hosts) until `days`
    /// days from now.
    pub fn days_from_now(days: i64) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    fn check(&self) -> Result<(), PkiError> {
        if self.not_before < self.not_after {
            Ok(())
        } else {
            Err(PkiError::BadValidity {
                not_before: self.not_before,
                not_after: self.not_after,
            })
        }
    }
}

/// Which extended key usages a leaf certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eku {
    /// TLS server and TLS client (hub and machines).
    ServerAndClient,
    /// TLS client only (operators).
    ClientOnly,
    /// TLS server only.
    ServerOnly,
}

impl Eku {
    /// The default for a role: server and client for the hub and machines, client only for
    /// operators.
    pub fn for_role(role: Role) -> Eku {
        match role {
            Role::Scm | Role::Machine => Eku::ServerAndClient,
            Role::Operator => Eku::ClientOnly,
        }
    }

    fn purposes(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Eku::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Eku::ClientOnly => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Eku::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
        }
    }
}

/// What to put into a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// The identity (URI SAN, CN and default DNS SAN are derived from it).
    pub identity: Identity,
    /// Validity period.
    pub validity: Validity,
    /// Extra DNS names or IP addresses (e.g. `localhost`, `127.0.0.1`, the host's FQDN).
    pub extra_hosts: Vec<String>,
    /// Extended key usages.
    pub eku: Eku,
    /// The kind of key generated for it.
    pub key: KeyKind,
}

impl LeafSpec {
    /// A spec with no extra hosts, the role's default EKU ([`Eku::for_role`]) and an
    /// ECDSA P-256 key.
    pub fn new(identity: Identity, validity: Validity) -> LeafSpec {
        let eku = Eku::for_role(identity.role());
        LeafSpec {
            identity,
            validity,
            extra_hosts: Vec::new(),
            eku,
            key: KeyKind::default(),
        }
    }
}

/// The key a leaf certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyKind {
    /// ECDSA P-256 with SHA-256: small and fast, what the SCM and the agents use.
    #[default]
    EcdsaP256,
    /// RSA 2048 (PKCS#1 v1.5 with SHA-256), for operator tools that load only RSA keys
    /// (telnet-ssl).
    Rsa2048,
}

impl KeyKind {
    /// A new key pair of this kind. ring cannot generate RSA keys, so the `rsa` crate
    /// makes one and rcgen (ring) signs with it.
    fn generate(self) -> Result<KeyPair, PkiError> {
        match self {
            KeyKind::EcdsaP256 => Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
            KeyKind::Rsa2048 => {
                use rsa::pkcs8::EncodePrivateKey;
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                    .map_err(|e| PkiError::Rsa(e.to_string()))?;
                let der = key
                    .to_pkcs8_der()
                    .map_err(|e| PkiError::Rsa(e.to_string()))?;
                let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
                Ok(KeyPair::from_pkcs8_der_and_sign_algo(
                    &der,
                    &rcgen::PKCS_RSA_SHA256,
                )?)
            }
        }
    }
}

/// A freshly issued certificate and its private key, both PEM.
pub struct IssuedCert {
    /// The certificate, PEM (`CERTIFICATE`).
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8 `PRIVATE KEY`). Never printed by `Debug`.
    pub key_pem: String,
    /// The serial number, big-endian bytes as encoded in the certificate (for CRLs).
    pub serial: Vec<u8>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .field("serial", &hex(&self.serial))
            .finish()
    }
}

/// What went wrong while generating, loading or writing PKI material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read.
    #[error("cannot read {}: {source}; check the path and its permissions", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}; check that the directory exists and is writable", .path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Refused to overwrite an existing file.
    #[error(
        "refusing to overwrite {}: it already exists; move the existing PKI away or \
         choose another directory",
        .path.display()
    )]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// No PEM certificate where one was expected.
    #[error(
        "{origin}: no PEM certificate found; expected the CA certificate written by \
         `scm init-dev` (ca.pem)"
    )]
    NoCertificate {
        /// Where the PEM came from (a file name, or "CA certificate (in memory)").
        origin: String,
    },
    /// A certificate that cannot be parsed.
    #[error("{origin}: not a valid certificate: {detail}")]
    BadCertificate {
        /// Where the PEM came from.
        origin: String,
        /// What is wrong.
        detail: String,
    },
    /// The certificate given as the CA is not a CA certificate.
    #[error(
        "{origin}: not a CA certificate (basicConstraints CA flag is not set); pass the \
         CA certificate (ca.pem), not a leaf certificate"
    )]
    NotACa {
        /// Where the PEM came from.
        origin: String,
    },
    /// A private key that cannot be parsed.
    #[error(
        "{origin}: cannot read the private key: {detail}; expected a PKCS#8 PEM key \
         written by `scm init-dev` (ca-key.pem)"
    )]
    BadKey {
        /// Where the PEM came from.
        origin: String,
        /// What is wrong.
        detail: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error(
        "the private key {key_origin} does not belong to the certificate {cert_origin}; \
         pass the matching pair"
    )]
    KeyMismatch {
        /// Where the certificate came from.
        cert_origin: String,
        /// Where the key came from.
        key_origin: String,
    },
    /// `not_before` is not before `not_after`.
    #[error(
        "invalid validity period: not_before {not_before} is not before not_after \
         {not_after}; give a positive number of days"
    )]
    BadValidity {
        /// Start.
        not_before: OffsetDateTime,
        /// End.
        not_after: OffsetDateTime,
    },
    /// The identity of a leaf is invalid.
    #[error("cannot issue a certificate: {0}")]
    Identity(#[from] IdentityError),
    /// An extra host is neither a DNS name nor an IP address.
    #[error(
        "invalid host {host:?} for a certificate: use a DNS name such as `scm.example.org` \
         or an IP address such as `10.0.0.5`"
    )]
    BadHost {
        /// The rejected host.
        host: String,
    },
    /// A CA common name is empty.
    #[error("the CA common name must not be empty")]
    EmptyCaName,
    /// The same machine id or operator name was given twice.
    #[error("{what} {value} is listed twice; remove the duplicate")]
    Duplicate {
        /// "machine" or "operator".
        what: &'static str,
        /// The duplicated value.
        value: String,
    },
    /// A revoked serial number is empty.
    #[error("a revoked serial number is empty; pass the serial bytes of the certificate to revoke")]
    EmptySerial,
    /// The system random generator failed.
    #[error("the system random number generator failed; cannot make a serial number")]
    Random,
    /// rcgen refused to build a certificate or CRL.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// An RSA key could not be generated or encoded.
    #[error("cannot generate an RSA key: {0}")]
    Rsa(String),
}

/// The private certificate authority: its certificate and its signing key.
///
/// `Debug` shows the subject only, never the key.
pub struct Ca {
    cert_pem: String,
    subject: String,
    issuer: Issuer<'static, KeyPair>,
    /// Method used for the authority key identifier in CRLs (the CA's own SKI).
    key_id: KeyIdMethod,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.subject)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Ca {
    /// Generates a new self-signed CA with a P-256 key. The CA may sign leaf certificates
    /// only (path length 0) and CRLs.
    pub fn generate(common_name: &str, validity: &Validity) -> Result<Ca, PkiError> {
        if common_name.trim().is_empty() {
            return Err(PkiError::EmptyCaName);
        }
        validity.check()?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let key_id = params.key_identifier_method.clone();
        Ok(Ca {
            cert_pem: cert.pem(),
            subject: format!("CN={common_name}"),
            issuer: Issuer::new(params, key),
            key_id,
        })
    }

    /// Loads a CA from PEM text: its certificate and its private key (PKCS#8).
    ///
    /// Checks that the certificate is a CA certificate and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        Ca::from_pem_named(
            cert_pem,
            "CA certificate (in memory)",
            key_pem,
            "CA key (in memory)",
        )
    }

    /// Loads a CA from its certificate and key files (e.g. `ca.pem` and `ca-key.pem`).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read_to_string(cert_path)?;
        let key_pem = read_to_string(key_path)?;
        Ca::from_pem_named(
            &cert_pem,
            &cert_path.display().to_string(),
            &key_pem,
            &key_path.display().to_string(),
        )
    }

    fn from_pem_named(
        cert_pem: &str,
        cert_origin: &str,
        key_pem: &str,
        key_origin: &str,
    ) -> Result<Ca, PkiError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => PkiError::NoCertificate {
                origin: cert_origin.to_owned(),
            },
            other => PkiError::BadCertificate {
                origin: cert_origin.to_owned(),
                detail: other.to_string(),
            },
        })?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::BadCertificate {
                origin: cert_origin.to_owned(),
                detail: e.to_string(),
            })?;
        if !x509.is_ca() {
            return Err(PkiError::NotACa {
                origin: cert_origin.to_owned(),
            });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey {
            origin: key_origin.to_owned(),
            detail: e.to_string(),
        })?;
        if key.der_bytes() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch {
                cert_origin: cert_origin.to_owned(),
                key_origin: key_origin.to_owned(),
            });
        }
        let key_id = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(kid) => {
                    Some(KeyIdMethod::PreSpecified(kid.0.to_vec()))
                }
                _ => None,
            })
            .unwrap_or(KeyIdMethod::Sha256);
        let subject = x509.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| PkiError::BadCertificate {
            origin: cert_origin.to_owned(),
            detail: e.to_string(),
        })?;
        // Normalise the PEM so that `cert_pem()` holds exactly this one certificate.
        let cert_pem = pem_encode("CERTIFICATE", &der);
        Ok(Ca {
            cert_pem,
            subject,
            issuer,
            key_id,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (PKCS#8). Handle with care: this is the fleet's master secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate with a fresh P-256 key.
    ///
    /// SANs: the identity URI, the identity's DNS server name (hub and machines), then the
    /// `extra_hosts` (IP addresses become IP SANs, everything else DNS SANs; duplicates
    /// are dropped). CN is [`Identity::common_name`].
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, PkiError> {
        spec.identity.validate()?;
        spec.validity.check()?;
        let mut sans = vec![SanType::URI(ia5(spec.identity.uri())?)];
        let mut seen: HashSet<String> = HashSet::new();
        if let Some(name) = spec.identity.server_name() {
            seen.insert(name.clone());
            sans.push(SanType::DnsName(ia5(name)?));
            // The CN as a DNS name too: clients that check the CN against the SANs (or
            // are told to connect to `scm`, as telnet-ssl with `-z certrequired`) find it.
            let cn = spec.identity.common_name();
            if seen.insert(cn.clone()) {
                sans.push(SanType::DnsName(ia5(cn)?));
            }
        }
        for host in &spec.extra_hosts {
            let host = host.trim();
            if ServerName::try_from(host).is_err() {
                return Err(PkiError::BadHost {
                    host: host.to_owned(),
                });
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                if seen.insert(ip.to_string()) {
                    sans.push(SanType::IpAddress(ip));
                }
            } else {
                let name = host.to_ascii_lowercase();
                if seen.insert(name.clone()) {
                    sans.push(SanType::DnsName(ia5(name)?));
                }
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.identity.common_name());
        params.subject_alt_names = sans;
        params.extended_key_usages = spec.eku.purposes();
        params.not_before = spec.validity.not_before;
        params.not_after = spec.validity.not_after;
        self.sign_with(params, spec.key)
    }

    /// Signs arbitrary leaf parameters (tests use it to build malformed certificates).
    /// Sets the serial, key usage, CA flag and authority key identifier.
    #[cfg(test)]
    pub(crate) fn sign(&self, params: CertificateParams) -> Result<IssuedCert, PkiError> {
        self.sign_with(params, KeyKind::EcdsaP256)
    }

    /// [`sign`](Self::sign) with a key of `kind`.
    fn sign_with(
        &self,
        mut params: CertificateParams,
        kind: KeyKind,
    ) -> Result<IssuedCert, PkiError> {
        let key = kind.generate()?;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.to_bytes(),
        })
    }

    /// Builds a CRL (PEM) revoking the given serial numbers (as in [`IssuedCert::serial`]).
    ///
    /// The CRL number is `this_update` as Unix seconds, so later CRLs get larger numbers.
    /// The revocation time of every entry is `this_update`.
    pub fn crl_pem(
        &self,
        revoked_serials: &[Vec<u8>],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, PkiError> {
        if next_update <= this_update {
            return Err(PkiError::BadValidity {
                not_before: this_update,
                not_after: next_update,
            });
        }
        let mut revoked_certs = Vec::with_capacity(revoked_serials.len());
        for serial in revoked_serials {
            if serial.is_empty() {
                return Err(PkiError::EmptySerial);
            }
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: this_update,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let crl_number = this_update.unix_timestamp().max(1).to_be_bytes();
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from_slice(&crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id.clone(),
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// What [`write_dev_pki`] should create.
#[derive(Debug, Clone)]
pub struct DevPkiOptions {
    /// Machine ids to issue certificates for.
    pub machines: Vec<u16>,
    /// Operator names to issue certificates for.
    pub operators: Vec<String>,
    /// Extra host names / IPs for the hub and machine certificates (e.g. `localhost`,
    /// `127.0.0.1`). Operators get none.
    pub hosts: Vec<String>,
    /// Validity of every certificate, the CA's included.
    pub validity: Validity,
}

/// The files written by [`write_dev_pki`].
#[derive(Debug, Clone)]
pub struct DevPkiFiles {
    /// The directory.
    pub dir: PathBuf,
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca-key.pem` (mode 0600).
    pub ca_key: PathBuf,
    /// `scm.pem`.
    pub scm_cert: PathBuf,
    /// `scm-key.pem` (mode 0600).
    pub scm_key: PathBuf,
    /// `(name, operator-<name>.pem, operator-<name>-key.pem)`.
    pub operators: Vec<(String, PathBuf, PathBuf)>,
    /// `(id, machine-<id>.pem, machine-<id>-key.pem)`.
    pub machines: Vec<(u16, PathBuf, PathBuf)>,
}

/// Writes a complete development PKI into `dir`: a new CA, the hub's certificate, and one
/// certificate per operator and machine.
///
/// Files: `ca.pem`, `ca-key.pem`, `scm.pem`, `scm-key.pem`, `operator-<name>.pem` /
/// `operator-<name>-key.pem`, `machine-<id>.pem` / `machine-<id>-key.pem`. The directory
/// is created (mode 0700) if missing. Private keys are created with mode 0600 and
/// certificates with 0644 (Unix). Nothing is written if any of the files already exists;
/// if a write fails midway, the files written by this call are removed again.
pub fn write_dev_pki(dir: &Path, opts: &DevPkiOptions) -> Result<DevPkiFiles, PkiError> {
    write_dev_pki_with(dir, opts, KeyKind::default())
}

/// [`write_dev_pki`], with operator keys of `operator_key` (the others stay ECDSA).
pub fn write_dev_pki_with(
    dir: &Path,
    opts: &DevPkiOptions,
    operator_key: KeyKind,
) -> Result<DevPkiFiles, PkiError> {
    opts.validity.check()?;
    let mut seen_machines = HashSet::new();
    for id in &opts.machines {
        if !seen_machines.insert(*id) {
            return Err(PkiError::Duplicate {
                what: "machine",
                value: id.to_string(),
            });
        }
    }
    let mut seen_operators = HashSet::new();
    for name in &opts.operators {
        Identity::operator(name.as_str())?;
        if !seen_operators.insert(name.as_str()) {
            return Err(PkiError::Duplicate {
                what: "operator",
                value: name.clone(),
            });
        }
    }

    // Generate everything in memory first, so that a bad option writes nothing.
    let ca = Ca::generate("SCM dev CA", &opts.validity)?;
    let leaf = |identity: Identity| -> Result<IssuedCert, PkiError> {
        let mut spec = LeafSpec::new(identity, opts.validity.clone());
        if spec.identity.role() != Role::Operator {
            spec.extra_hosts = opts.hosts.clone();
        } else {
            spec.key = operator_key;
        }
        ca.issue(&spec)
    };
    let scm = leaf(Identity::Scm)?;
    let mut operators = Vec::with_capacity(opts.operators.len());
    for name in &opts.operators {
        operators.push((name.clone(), leaf(Identity::Operator(name.clone()))?));
    }
    let mut machines = Vec::with_capacity(opts.machines.len());
    for id in &opts.machines {
        machines.push((*id, leaf(Identity::Machine(*id))?));
    }

    let files = DevPkiFiles {
        dir: dir.to_path_buf(),
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        scm_cert: dir.join("scm.pem"),
        scm_key: dir.join("scm-key.pem"),
        operators: operators
            .iter()
            .map(|(name, _)| {
                (
                    name.clone(),
                    dir.join(format!("operator-{name}.pem")),
                    dir.join(format!("operator-{name}-key.pem")),
                )
            })
            .collect(),
        machines: machines
            .iter()
            .map(|(id, _)| {
                (
                    *id,
                    dir.join(format!("machine-{id}.pem")),
                    dir.join(format!("machine-{id}-key.pem")),
                )
            })
            .collect(),
    };

    // (path, contents, is a private key)
    let mut plan: Vec<(&Path, String, bool)> = vec![
        (&files.ca_cert, ca.cert_pem().to_owned(), false),
        (&files.ca_key, ca.key_pem(), true),
        (&files.scm_cert, scm.cert_pem.clone(), false),
        (&files.scm_key, scm.key_pem.clone(), true),
    ];
    for ((_, cert, key), (_, issued)) in files.operators.iter().zip(&operators) {
        plan.push((cert, issued.cert_pem.clone(), false));
        plan.push((key, issued.key_pem.clone(), true));
    }
    for ((_, cert, key), (_, issued)) in files.machines.iter().zip(&machines) {
        plan.push((cert, issued.cert_pem.clone(), false));
        plan.push((key, issued.key_pem.clone(), true));
    }

    create_private_dir(dir)?;
    for (path, _, _) in &plan {
        if fs::symlink_metadata(path).is_ok() {
            return Err(PkiError::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
    }
    let mut written: Vec<&Path> = Vec::with_capacity(plan.len());
    for (path, contents, private) in &plan {
        match write_new_file(path, contents, *private) {
            Ok(()) => written.push(path),
            Err(e) => {
                for done in written {
                    let _ = fs::remove_file(done);
                }
                return Err(e);
            }
        }
    }
    tracing::info!(dir = %dir.display(), files = plan.len(), "wrote development PKI");
    Ok(files)
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates `path` (it must not exist) with its final mode and writes `contents`.
fn write_new_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            PkiError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| PkiError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn ia5(s: String) -> Result<Ia5String, PkiError> {
    Ia5String::try_from(s.clone()).map_err(|_| PkiError::BadHost { host: s })
}

/// A random positive serial of [`SERIAL_LEN`] bytes whose first byte is in 1..=0x7f, so
/// that its DER encoding is exactly these bytes.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_LEN];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
