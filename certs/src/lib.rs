//! Certificates for the SCM hub: who is who, how certificates are made, and how TLS is set up.
//!
//! The hub (`scm`), the machine agents and the operators authenticate each other with
//! mutual TLS. Every certificate is signed by one private CA and carries exactly one
//! identity URI in its subjectAltName:
//!
//! | role | URI SAN | DNS SAN (TLS server name) | CN | EKU |
//! | --- | --- | --- | --- | --- |
//! | hub | `urn:scm:scm` | `scm.hub.internal` | `scm` | server + client |
//! | machine 42 | `urn:scm:machine:42` | `machine-42.hub.internal` | `machine-42` | server + client |
//! | operator alice | `urn:scm:operator:alice` | none | `operator-alice` | client |
//!
//! * [`identity`] parses and formats those identities and extracts them from certificates.
//! * [`pki`] generates a CA, issues leaf certificates and CRLs, and writes a dev PKI.
//! * [`tls`] builds the rustls configurations (ring provider, TLS 1.3 only by default,
//!   client certificates required) and runs handshakes under a timeout with role checks.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod identity;
pub mod pki;
pub mod tls;

#[cfg(test)]
mod test_util;

pub use identity::{Identity, IdentityError, Role, identity_from_der};
