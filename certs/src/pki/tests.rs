use std::os::unix::fs::PermissionsExt;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::identity::identity_from_der;
use crate::test_util::{client_cfg, handshake, new_ca, server_reason, validity};
use crate::tls::{TlsFiles, TlsPolicy, server_config};

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}

struct Parsed {
    cn: String,
    uris: Vec<String>,
    dns: Vec<String>,
    ips: Vec<Vec<u8>>,
    server_auth: bool,
    client_auth: bool,
    is_ca: bool,
    not_before: i64,
    not_after: i64,
}

fn parse(pem: &str) -> Parsed {
    let der = der_of(pem);
    let (_, cert) = X509Certificate::from_der(&der).expect("x509");
    let mut parsed = Parsed {
        cn: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or_default()
            .to_owned(),
        uris: vec![],
        dns: vec![],
        ips: vec![],
        server_auth: false,
        client_auth: false,
        is_ca: cert.is_ca(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    if let Some(san) = cert.subject_alternative_name().expect("san") {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => parsed.uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => parsed.dns.push((*d).to_owned()),
                GeneralName::IPAddress(ip) => parsed.ips.push(ip.to_vec()),
                _ => {}
            }
        }
    }
    if let Some(eku) = cert.extended_key_usage().expect("eku") {
        parsed.server_auth = eku.value.server_auth;
        parsed.client_auth = eku.value.client_auth;
    }
    parsed
}

#[test]
fn leaf_contents_follow_the_identity_model() {
    let ca = new_ca("SCM test CA");
    let v = validity();

    let mut spec = LeafSpec::new(Identity::Machine(42), v.clone());
    spec.extra_hosts = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        "LOCALHOST".into(),
        "machine-42.hub.internal".into(),
    ];
    let machine = ca.issue(&spec).expect("issue");
    let p = parse(&machine.cert_pem);
    assert_eq!(p.cn, "machine-42");
    assert_eq!(p.uris, ["urn:scm:machine:42"]);
    // The CN is a DNS name too, for clients that look for it among the SANs.
    assert_eq!(
        p.dns,
        ["machine-42.hub.internal", "machine-42", "localhost"]
    );
    assert_eq!(p.ips.len(), 2);
    assert_eq!(p.ips[0], vec![127, 0, 0, 1]);
    assert!(p.server_auth && p.client_auth);
    assert!(!p.is_ca);
    assert_eq!(p.not_before, v.not_before.unix_timestamp());
    assert_eq!(p.not_after, v.not_after.unix_timestamp());

    let scm = parse(
        &ca.issue(&LeafSpec::new(Identity::Scm, v.clone()))
            .expect("issue")
            .cert_pem,
    );
    assert_eq!(scm.cn, "scm");
    assert_eq!(scm.uris, ["urn:scm:scm"]);
    assert_eq!(scm.dns, ["scm.hub.internal", "scm"]);
    assert!(scm.server_auth && scm.client_auth);

    let op_spec = LeafSpec::new(Identity::Operator("alice".into()), v.clone());
    assert_eq!(op_spec.eku, Eku::ClientOnly);
    let op = parse(&ca.issue(&op_spec).expect("issue").cert_pem);
    assert_eq!(op.cn, "operator-alice");
    assert_eq!(op.uris, ["urn:scm:operator:alice"]);
    assert!(op.dns.is_empty());
    assert!(!op.server_auth && op.client_auth);

    let mut server_only = LeafSpec::new(Identity::Scm, v);
    server_only.eku = Eku::ServerOnly;
    let so = parse(&ca.issue(&server_only).expect("issue").cert_pem);
    assert!(so.server_auth && !so.client_auth);

    let ca_parsed = parse(ca.cert_pem());
    assert!(ca_parsed.is_ca);
    assert_eq!(ca_parsed.cn, "SCM test CA");
}

#[test]
fn serials_are_distinct_and_match_the_certificate() {
    let ca = new_ca("SCM test CA");
    let a = ca
        .issue(&LeafSpec::new(Identity::Machine(1), validity()))
        .expect("issue");
    let b = ca
        .issue(&LeafSpec::new(Identity::Machine(1), validity()))
        .expect("issue");
    assert_ne!(a.serial, b.serial);
    let der = der_of(&a.cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).expect("x509");
    assert_eq!(cert.raw_serial(), a.serial.as_slice());
}

#[test]
fn invalid_specs_are_refused() {
    let ca = new_ca("SCM test CA");
    let bad_name = LeafSpec::new(Identity::Operator("not ok".into()), validity());
    assert!(matches!(ca.issue(&bad_name), Err(PkiError::Identity(_))));

    let mut bad_host = LeafSpec::new(Identity::Scm, validity());
    bad_host.extra_hosts = vec!["exa mple.org".into()];
    assert!(matches!(ca.issue(&bad_host), Err(PkiError::BadHost { .. })));

    let now = OffsetDateTime::now_utc();
    let backwards = Validity {
        not_before: now,
        not_after: now - Duration::days(1),
    };
    assert!(matches!(
        ca.issue(&LeafSpec::new(Identity::Scm, backwards.clone())),
        Err(PkiError::BadValidity { .. })
    ));
    assert!(matches!(
        Ca::generate("x", &backwards),
        Err(PkiError::BadValidity { .. })
    ));
    assert!(matches!(
        Ca::generate("  ", &validity()),
        Err(PkiError::EmptyCaName)
    ));
    assert!(matches!(
        ca.crl_pem(&[], now, now),
        Err(PkiError::BadValidity { .. })
    ));
    assert!(matches!(
        ca.crl_pem(&[vec![]], now, now + Duration::days(1)),
        Err(PkiError::EmptySerial)
    ));
}

#[test]
fn debug_never_shows_private_keys() {
    let ca = new_ca("SCM test CA");
    let leaf = ca
        .issue(&LeafSpec::new(Identity::Scm, validity()))
        .expect("issue");
    let ca_debug = format!("{ca:?}");
    let leaf_debug = format!("{leaf:?}");
    for debug in [&ca_debug, &leaf_debug] {
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(debug.contains("[redacted]"), "{debug}");
    }
    let ca_key_body: String = ca.key_pem().lines().nth(1).expect("key line").to_owned();
    assert!(!ca_debug.contains(&ca_key_body));
    assert!(ca_debug.contains("SCM test CA"));
}

#[test]
fn from_pem_checks_the_pair() {
    let ca = new_ca("SCM test CA");
    let other = new_ca("SCM test CA");
    let leaf = ca
        .issue(&LeafSpec::new(Identity::Scm, validity()))
        .expect("issue");

    let reloaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).expect("round trip");
    assert_eq!(der_of(reloaded.cert_pem()), der_of(ca.cert_pem()));

    assert!(matches!(
        Ca::from_pem(ca.cert_pem(), &other.key_pem()),
        Err(PkiError::KeyMismatch { .. })
    ));
    assert!(matches!(
        Ca::from_pem(&leaf.cert_pem, &leaf.key_pem),
        Err(PkiError::NotACa { .. })
    ));
    assert!(matches!(
        Ca::from_pem(ca.cert_pem(), "not a key"),
        Err(PkiError::BadKey { .. })
    ));
    assert!(matches!(
        Ca::from_pem("nothing here", &ca.key_pem()),
        Err(PkiError::NoCertificate { .. })
    ));
}

fn dev_opts() -> DevPkiOptions {
    DevPkiOptions {
        machines: vec![1, 42],
        operators: vec!["alice".into(), "bob".into()],
        hosts: vec!["localhost".into(), "127.0.0.1".into()],
        validity: validity(),
    }
}

#[test]
fn write_dev_pki_writes_everything_with_private_key_modes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki");
    let files = write_dev_pki(&dir, &dev_opts()).expect("write dev pki");

    let mut expected_names = vec![
        "ca.pem",
        "ca-key.pem",
        "scm.pem",
        "scm-key.pem",
        "operator-alice.pem",
        "operator-alice-key.pem",
        "operator-bob.pem",
        "operator-bob-key.pem",
        "machine-1.pem",
        "machine-1-key.pem",
        "machine-42.pem",
        "machine-42-key.pem",
    ];
    expected_names.sort_unstable();
    let mut found: Vec<String> = fs::read_dir(&dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    found.sort_unstable();
    assert_eq!(found, expected_names);

    for name in &found {
        let mode = fs::metadata(dir.join(name))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        if name.ends_with("-key.pem") {
            assert_eq!(mode, 0o600, "{name}");
        } else {
            assert_eq!(mode & 0o077 & !0o044, 0, "{name} is group/world writable");
        }
    }
    let dir_mode = fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);

    // Each certificate carries the identity its file name says.
    let identity_of = |path: &Path| {
        identity_from_der(&der_of(&fs::read_to_string(path).expect("read"))).expect("identity")
    };
    assert_eq!(identity_of(&files.scm_cert), Identity::Scm);
    for (name, cert, key) in &files.operators {
        assert_eq!(identity_of(cert), Identity::Operator(name.clone()));
        assert!(key.exists());
    }
    for (id, cert, key) in &files.machines {
        assert_eq!(identity_of(cert), Identity::Machine(*id));
        assert!(key.exists());
    }
    assert_eq!(files.machines.len(), 2);
    assert_eq!(files.operators.len(), 2);
    let scm = parse(&fs::read_to_string(&files.scm_cert).expect("read"));
    assert_eq!(scm.dns, ["scm.hub.internal", "scm", "localhost"]);
    let alice = parse(&fs::read_to_string(&files.operators[0].1).expect("read"));
    assert!(alice.dns.is_empty() && alice.ips.is_empty());

    // A second run refuses and leaves the files untouched.
    let before = fs::read_to_string(&files.ca_key).expect("read");
    let err = write_dev_pki(&dir, &dev_opts()).expect_err("second run must refuse");
    assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err:?}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(fs::read_to_string(&files.ca_key).expect("read"), before);

    // Even if only one of the files is present, nothing is written.
    fs::remove_file(&files.ca_cert).expect("remove");
    fs::remove_file(&files.ca_key).expect("remove");
    let err = write_dev_pki(&dir, &dev_opts()).expect_err("scm.pem still exists");
    match err {
        PkiError::AlreadyExists { path } => assert_eq!(path, files.scm_cert),
        other => panic!("{other:?}"),
    }
    assert!(!files.ca_cert.exists());
}

#[test]
fn write_dev_pki_refuses_bad_options_without_writing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki");
    let mut opts = dev_opts();
    opts.machines = vec![3, 3];
    assert!(matches!(
        write_dev_pki(&dir, &opts),
        Err(PkiError::Duplicate {
            what: "machine",
            ..
        })
    ));
    let mut opts = dev_opts();
    opts.operators = vec!["../etc".into()];
    assert!(matches!(
        write_dev_pki(&dir, &opts),
        Err(PkiError::Identity(_))
    ));
    let mut opts = dev_opts();
    opts.hosts = vec!["bad host".into()];
    assert!(matches!(
        write_dev_pki(&dir, &opts),
        Err(PkiError::BadHost { .. })
    ));
    assert!(!dir.exists());
}

/// Load the CA written by `write_dev_pki`, issue a new machine certificate with it, and
/// check the hub (configured from the files) accepts it — and that a CRL made by the
/// reloaded CA revokes it.
#[tokio::test]
async fn loaded_ca_issues_certificates_that_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let files = write_dev_pki(tmp.path(), &dev_opts()).expect("write dev pki");
    let ca = Ca::load(&files.ca_cert, &files.ca_key).expect("load CA");
    assert_eq!(
        der_of(ca.cert_pem()),
        der_of(&fs::read_to_string(&files.ca_cert).expect("read"))
    );
    let machine = ca
        .issue(&LeafSpec::new(Identity::Machine(7), validity()))
        .expect("issue");

    let tls_files = TlsFiles {
        ca: files.ca_cert.clone(),
        cert: files.scm_cert.clone(),
        key: files.scm_key.clone(),
        crls: vec![],
    };
    let server = server_config(&tls_files, TlsPolicy::default(), &[]).expect("server config");
    let (result, client) = handshake(
        server,
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    let (_, identity) = result.expect("hub accepts the newly issued machine");
    assert_eq!(identity, Identity::Machine(7));
    client.expect("machine connects to the hub");

    let now = OffsetDateTime::now_utc();
    let crl_path = tmp.path().join("crl.pem");
    fs::write(
        &crl_path,
        ca.crl_pem(
            std::slice::from_ref(&machine.serial),
            now - Duration::minutes(1),
            now + Duration::days(1),
        )
        .expect("crl"),
    )
    .expect("write crl");
    let server = server_config(
        &TlsFiles {
            crls: vec![crl_path],
            ..tls_files
        },
        TlsPolicy::default(),
        &[],
    )
    .expect("server config with CRL");
    let (result, _client) = handshake(
        server,
        client_cfg(&ca, &machine, TlsPolicy::default()),
        &Identity::Scm,
        &[Role::Machine],
    )
    .await;
    assert_eq!(server_reason(&result), "revoked", "{result:?}");
}

#[test]
fn load_names_missing_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("ca.pem");
    let err = Ca::load(&missing, &tmp.path().join("ca-key.pem")).expect_err("missing");
    assert!(matches!(err, PkiError::Read { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn pem_encoding_round_trips() {
    for len in 0..70usize {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
        let pem = pem_encode("CERTIFICATE", &data);
        if len == 0 {
            continue;
        }
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("parse");
        assert_eq!(back.as_ref(), data.as_slice(), "len {len}");
    }
}

#[test]
fn an_rsa_operator_key_signs_and_loads() {
    let ca = new_ca("SCM test CA");
    let mut spec = LeafSpec::new(Identity::Operator("alice".into()), validity());
    spec.key = KeyKind::Rsa2048;
    let op = ca.issue(&spec).expect("issue");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(op.key_pem.as_bytes())
        .expect("a PKCS#8 key");
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).expect("ring loads it");
    assert_eq!(signer.algorithm(), rustls::SignatureAlgorithm::RSA);
    assert_eq!(parse(&op.cert_pem).cn, "operator-alice");
}
