//! Identities of the parties on the SCM links, and how to read them from certificates.
//!
//! An identity is written in a certificate as exactly one URI subjectAltName:
//! `urn:scm:scm` for the hub, `urn:scm:machine:<id>` for a machine (decimal `u16`, no
//! leading zeros) and `urn:scm:operator:<name>` for an operator (1 to 64 characters of
//! `A-Z a-z 0-9 . _ -`). This module is the only place that knows that format.

use std::fmt;

use x509_parser::extensions::GeneralName;

/// Prefix shared by every identity URI.
pub const URI_PREFIX: &str = "urn:scm:";

/// DNS suffix of the TLS server names used on the SCM links.
pub const DNS_SUFFIX: &str = "hub.internal";

/// Longest accepted operator name, in bytes (all accepted characters are ASCII).
pub const MAX_OPERATOR_NAME_LEN: usize = 64;

/// Who a peer is: the hub, one machine, or one operator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The SCM hub.
    Scm,
    /// The agent of the machine with this id.
    Machine(u16),
    /// An operator (a person or an automation account) with this name.
    Operator(String),
}

/// The kind of an [`Identity`], used to say which peers a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The SCM hub.
    Scm,
    /// Any machine agent.
    Machine,
    /// Any operator.
    Operator,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Scm => "scm",
            Role::Machine => "machine",
            Role::Operator => "operator",
        })
    }
}

/// What is wrong with an identity URI or with the identity in a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The URI is not one of the three identity forms.
    #[error(
        "invalid identity URI {uri:?}: {problem}; expected `urn:scm:scm`, \
         `urn:scm:machine:<0-65535>` or `urn:scm:operator:<name>`"
    )]
    BadUri {
        /// The rejected URI.
        uri: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An operator name is empty, too long or has characters outside `A-Za-z0-9._-`.
    #[error(
        "invalid operator name {name:?}: use 1 to {MAX_OPERATOR_NAME_LEN} characters \
         from A-Z, a-z, 0-9, '.', '_' and '-'"
    )]
    BadOperatorName {
        /// The rejected name.
        name: String,
    },
    /// The bytes are not a DER X.509 certificate.
    #[error("not a valid DER X.509 certificate: {detail}")]
    NotACertificate {
        /// The parser's message.
        detail: String,
    },
    /// The subjectAltName extension is malformed or repeated.
    #[error("the certificate's subjectAltName extension cannot be read: {detail}")]
    BadSubjectAltName {
        /// The parser's message.
        detail: String,
    },
    /// No `urn:scm:` URI in the certificate.
    #[error(
        "the certificate has no `urn:scm:` identity URI in its subjectAltName; \
         it was not issued for the SCM hub (issue one with `scm init-dev` or the SCM CA)"
    )]
    NoIdentityUri,
    /// More than one `urn:scm:` URI in the certificate.
    #[error(
        "the certificate has {} `urn:scm:` identity URIs ({}); exactly one is required, \
         re-issue it",
        .uris.len(),
        .uris.join(", ")
    )]
    SeveralIdentityUris {
        /// All identity URIs found.
        uris: Vec<String>,
    },
    /// The peer presented no certificate at all.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
}

impl Identity {
    /// Builds an operator identity after checking the name.
    pub fn operator(name: impl Into<String>) -> Result<Identity, IdentityError> {
        let name = name.into();
        check_operator_name(&name)?;
        Ok(Identity::Operator(name))
    }

    /// The role of this identity.
    pub fn role(&self) -> Role {
        match self {
            Identity::Scm => Role::Scm,
            Identity::Machine(_) => Role::Machine,
            Identity::Operator(_) => Role::Operator,
        }
    }

    /// The identity URI written into certificates, e.g. `urn:scm:machine:42`.
    pub fn uri(&self) -> String {
        match self {
            Identity::Scm => format!("{URI_PREFIX}scm"),
            Identity::Machine(id) => format!("{URI_PREFIX}machine:{id}"),
            Identity::Operator(name) => format!("{URI_PREFIX}operator:{name}"),
        }
    }

    /// Parses an identity URI. The form is strict: lower-case prefix, decimal machine id
    /// without sign or leading zeros, operator names as described in the module docs.
    pub fn parse_uri(s: &str) -> Result<Identity, IdentityError> {
        let bad = |problem| IdentityError::BadUri {
            uri: s.to_owned(),
            problem,
        };
        let rest = s
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| bad("it does not start with `urn:scm:`"))?;
        if rest == "scm" {
            return Ok(Identity::Scm);
        }
        if let Some(id) = rest.strip_prefix("machine:") {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("the machine id must be a decimal number"));
            }
            if id.len() > 1 && id.starts_with('0') {
                return Err(bad("the machine id must not have leading zeros"));
            }
            let id = id
                .parse::<u16>()
                .map_err(|_| bad("the machine id must be at most 65535"))?;
            return Ok(Identity::Machine(id));
        }
        if let Some(name) = rest.strip_prefix("operator:") {
            return match check_operator_name(name) {
                Ok(()) => Ok(Identity::Operator(name.to_owned())),
                Err(_) => Err(bad(
                    "the operator name must be 1 to 64 characters from A-Z, a-z, 0-9, '.', '_', '-'",
                )),
            };
        }
        Err(bad(
            "unknown role; expected `scm`, `machine:` or `operator:`",
        ))
    }

    /// The DNS name this identity uses as a TLS server (`scm.hub.internal`,
    /// `machine-42.hub.internal`); `None` for operators, who are never servers.
    pub fn server_name(&self) -> Option<String> {
        match self {
            Identity::Scm => Some(format!("scm.{DNS_SUFFIX}")),
            Identity::Machine(id) => Some(format!("machine-{id}.{DNS_SUFFIX}")),
            Identity::Operator(_) => None,
        }
    }

    /// The certificate common name: `scm`, `machine-42`, `operator-alice`.
    pub fn common_name(&self) -> String {
        match self {
            Identity::Scm => "scm".to_owned(),
            Identity::Machine(id) => format!("machine-{id}"),
            Identity::Operator(name) => format!("operator-{name}"),
        }
    }

    /// Checks the parts that the type does not enforce (the operator name).
    pub fn validate(&self) -> Result<(), IdentityError> {
        match self {
            Identity::Operator(name) => check_operator_name(name),
            Identity::Scm | Identity::Machine(_) => Ok(()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Scm => f.write_str("scm"),
            Identity::Machine(id) => write!(f, "machine {id}"),
            Identity::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

fn check_operator_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_OPERATOR_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadOperatorName {
            name: name.to_owned(),
        })
    }
}

/// notAfter of the first certificate in a PEM file, in Unix seconds (for expiry gauges);
/// `None` if the file cannot be read or holds no certificate.
pub fn pem_file_not_after(path: &std::path::Path) -> Option<i64> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Reads the identity from a DER certificate.
///
/// The certificate must hold exactly one URI subjectAltName that starts with `urn:scm:`
/// (compared case-insensitively, so that a differently-cased second identity is caught);
/// other URIs are ignored. Zero or several identity URIs, a malformed one, or bytes that
/// are not a certificate give an error; this function never panics on any input.
/// It does not check signatures or validity: use it on certificates the TLS layer verified.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::NotACertificate {
            detail: e.to_string(),
        })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadSubjectAltName {
            detail: e.to_string(),
        })?;
    let mut uris: Vec<String> = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                let is_ours = uri
                    .get(..URI_PREFIX.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(URI_PREFIX));
                if is_ours {
                    uris.push((*uri).to_owned());
                }
            }
        }
    }
    match uris.len() {
        0 => Err(IdentityError::NoIdentityUri),
        1 => Identity::parse_uri(&uris[0]),
        _ => Err(IdentityError::SeveralIdentityUris { uris }),
    }
}

#[cfg(test)]
mod tests;
