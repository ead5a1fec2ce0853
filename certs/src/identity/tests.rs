use rcgen::string::Ia5String;
use rcgen::{CertificateParams, SanType};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::*;
use crate::test_util::{issue, new_ca};

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).expect("ia5"))
}

fn cert_with_sans(sans: Vec<SanType>) -> Vec<u8> {
    let ca = new_ca("SCM test CA");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    der_of(&ca.sign(params).expect("sign").cert_pem)
}

#[test]
fn uris_round_trip() {
    for identity in [
        Identity::Scm,
        Identity::Machine(0),
        Identity::Machine(42),
        Identity::Machine(u16::MAX),
        Identity::Operator("alice".into()),
        Identity::Operator("a.b_c-D9".into()),
        Identity::Operator("x".repeat(64)),
    ] {
        let uri = identity.uri();
        assert_eq!(Identity::parse_uri(&uri), Ok(identity.clone()), "{uri}");
    }
    assert_eq!(Identity::Machine(42).uri(), "urn:scm:machine:42");
    assert_eq!(Identity::Scm.uri(), "urn:scm:scm");
    assert_eq!(
        Identity::Operator("alice".into()).uri(),
        "urn:scm:operator:alice"
    );
}

#[test]
fn malformed_uris_are_rejected() {
    for bad in [
        "",
        "urn:scm:",
        "urn:scm:SCM",
        "URN:SCM:scm",
        "urn:scm:scm:1",
        "urn:scm:admin",
        "urn:other:scm",
        "urn:scm:machine:",
        "urn:scm:machine:007",
        "urn:scm:machine:00",
        "urn:scm:machine:+1",
        "urn:scm:machine:-1",
        "urn:scm:machine:65536",
        "urn:scm:machine:99999999999999999999",
        "urn:scm:machine:4 2",
        "urn:scm:machine:٤٢",
        "urn:scm:operator:",
        "urn:scm:operator:a b",
        "urn:scm:operator:a/b",
        "urn:scm:operator:a:b",
        "urn:scm:operator:é",
    ] {
        assert!(Identity::parse_uri(bad).is_err(), "{bad:?} accepted");
    }
    let long = format!("urn:scm:operator:{}", "x".repeat(65));
    assert!(Identity::parse_uri(&long).is_err());
    let err = Identity::parse_uri("urn:scm:machine:007").expect_err("leading zeros");
    assert!(err.to_string().contains("leading zeros"), "{err}");
}

#[test]
fn names_roles_and_display() {
    assert_eq!(
        Identity::Scm.server_name().as_deref(),
        Some("scm.hub.internal")
    );
    assert_eq!(
        Identity::Machine(42).server_name().as_deref(),
        Some("machine-42.hub.internal")
    );
    assert_eq!(Identity::Operator("alice".into()).server_name(), None);
    assert_eq!(Identity::Scm.to_string(), "scm");
    assert_eq!(Identity::Machine(42).to_string(), "machine 42");
    assert_eq!(
        Identity::Operator("alice".into()).to_string(),
        "operator alice"
    );
    assert_eq!(Identity::Scm.role(), Role::Scm);
    assert_eq!(Identity::Machine(1).role(), Role::Machine);
    assert_eq!(Identity::Operator("a".into()).role(), Role::Operator);
    assert_eq!(Identity::Machine(42).common_name(), "machine-42");
    assert_eq!(
        Identity::Operator("bob".into()).common_name(),
        "operator-bob"
    );
    assert!(Identity::operator("bad name").is_err());
    assert!(Identity::operator("").is_err());
    assert!(Identity::Operator("bad name".into()).validate().is_err());
}

#[test]
fn issued_certificates_carry_their_identity() {
    let ca = new_ca("SCM test CA");
    for identity in [
        Identity::Scm,
        Identity::Machine(42),
        Identity::Operator("alice".into()),
    ] {
        let cert = issue(&ca, identity.clone());
        assert_eq!(identity_from_der(&der_of(&cert.cert_pem)), Ok(identity));
    }
}

#[test]
fn garbage_is_not_a_certificate() {
    for garbage in [
        &b""[..],
        &b"\x00"[..],
        &b"\x30"[..],
        &b"\x30\x82\xff\xff"[..],
        &b"-----BEGIN CERTIFICATE-----"[..],
        &[0xffu8; 64][..],
    ] {
        assert!(
            matches!(
                identity_from_der(garbage),
                Err(IdentityError::NotACertificate { .. })
            ),
            "{garbage:?}"
        );
    }
}

/// Every truncation and many single-byte corruptions of a real certificate: errors or a
/// correct identity, never a panic.
#[test]
fn corrupted_certificates_never_panic() {
    let ca = new_ca("SCM test CA");
    let der = der_of(&issue(&ca, Identity::Machine(42)).cert_pem);
    for len in 0..der.len() {
        assert!(identity_from_der(&der[..len]).is_err(), "prefix {len}");
    }
    for i in 0..der.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = der.clone();
            bad[i] ^= flip;
            if let Ok(identity) = identity_from_der(&bad) {
                // The corruption hit a byte that does not matter to the identity (a
                // signature bit, a date digit...) or changed the id to another valid one.
                let _ = identity.uri();
            }
        }
    }
}

#[test]
fn certificate_without_identity_uri_is_refused() {
    let der = cert_with_sans(vec![
        SanType::DnsName(Ia5String::try_from("scm.hub.internal").expect("ia5")),
        uri("https://example.org/scm"),
    ]);
    assert_eq!(identity_from_der(&der), Err(IdentityError::NoIdentityUri));
    let no_san = cert_with_sans(vec![]);
    assert_eq!(
        identity_from_der(&no_san),
        Err(IdentityError::NoIdentityUri)
    );
}

#[test]
fn certificate_with_two_identity_uris_is_refused() {
    let der = cert_with_sans(vec![uri("urn:scm:machine:1"), uri("urn:scm:scm")]);
    match identity_from_der(&der) {
        Err(IdentityError::SeveralIdentityUris { uris }) => {
            assert_eq!(uris, ["urn:scm:machine:1", "urn:scm:scm"]);
        }
        other => panic!("expected SeveralIdentityUris, got {other:?}"),
    }
    // A second identity in different case is still a second identity.
    let der = cert_with_sans(vec![uri("urn:scm:machine:1"), uri("URN:SCM:scm")]);
    assert!(matches!(
        identity_from_der(&der),
        Err(IdentityError::SeveralIdentityUris { .. })
    ));
    // The same URI twice is also refused.
    let der = cert_with_sans(vec![uri("urn:scm:machine:1"), uri("urn:scm:machine:1")]);
    assert!(matches!(
        identity_from_der(&der),
        Err(IdentityError::SeveralIdentityUris { .. })
    ));
}

#[test]
fn other_uris_are_ignored_and_malformed_identity_is_reported() {
    let der = cert_with_sans(vec![uri("https://example.org/"), uri("urn:scm:machine:9")]);
    assert_eq!(identity_from_der(&der), Ok(Identity::Machine(9)));
    let der = cert_with_sans(vec![uri("urn:scm:machine:0009")]);
    assert!(matches!(
        identity_from_der(&der),
        Err(IdentityError::BadUri { .. })
    ));
}
