//! The gRPC admin API against the real binaries: listing and reading machines, pushing to
//! one machine, roles (read-only and unconfigured operators), handshake refusals (no
//! certificate, TLS 1.2 only, a machine's certificate), and the event stream seen both by
//! a gRPC client and by `backoffice watch`, ended gracefully when the SCM shuts down.

use std::net::SocketAddr;
use std::path::Path;

use backoffice::admin::{AdminError, Client, connect_with};
use integration_tests::{Fleet, WAIT, swipe, watch_with};
use scm_certs::identity::Identity;
use scm_certs::pki::Validity;
use scm_certs::tls::{self as sctls, TlsPolicy};
use scm_proto::admin::{self as pb, event::Kind};
use sha2::Digest;
use tonic::Code;

use crate::mtls::{no_cert_config, tls12_only_config};
use crate::{Pems, dev_issue, dev_pems, init, rt};

/// An admin API client with these credentials.
async fn client(addr: SocketAddr, p: &Pems) -> Client {
    let cfg = sctls::client_config_from_pem(&p.ca, &p.cert, &p.key, TlsPolicy::default())
        .expect("client config");
    connect_with(&addr.to_string(), &cfg, WAIT)
        .await
        .expect("connect to the admin API")
}

/// Adds an operator account (certificate login only) to the SCM's configuration.
fn add_operator(dev: &Path, name: &str, role: &str) {
    let path = dev.join("scm.toml");
    let mut text = std::fs::read_to_string(&path).expect("scm.toml");
    text.push_str(&format!(
        "\n[[operator]]\nname = \"{name}\"\nrole = \"{role}\"\n"
    ));
    std::fs::write(&path, text).expect("write scm.toml");
}

fn operator(dev: &Path, name: &str) -> Pems {
    dev_issue(
        dev,
        Identity::operator(name).expect("operator name"),
        Validity::days_from_now(1),
    )
}

/// The next event of a WatchEvents stream, bounded by [`WAIT`].
async fn next_event(s: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("an event within the wait")
        .expect("a healthy stream")
        .expect("the stream is open")
}

#[test]
fn machines_are_listed_and_read_and_a_push_to_one_machine_is_acked() {
    init();
    let fleet = Fleet::start(&[1, 2]);
    let dev = fleet.dev();
    let admin = dev_pems(&dev, "operator-admin");
    rt().block_on(async {
        let mut c = client(fleet.admin(), &admin).await;

        let list = c
            .list_machines(pb::ListMachinesRequest {})
            .await
            .expect("ListMachines")
            .into_inner();
        let ids: Vec<u32> = list.machines.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 2]);
        for m in &list.machines {
            assert!(m.connected, "{m:?}");
            assert_eq!(m.name, format!("machine-{}", m.id));
            assert_eq!(m.labels, vec!["site=dev".to_string()]);
            assert!(m.groups.contains(&"dev".to_string()), "{m:?}");
            assert_eq!(m.protocol_version, 1);
            assert!(m.peer_address.starts_with("127.0.0.1:"), "{m:?}");
            assert!(m.connected_since_ms > 0 && m.last_hello_ms > 0, "{m:?}");
            assert_eq!((m.desired_generation, m.applied_generation), (0, 0));
        }

        let missing = c
            .get_machine(pb::GetMachineRequest {
                id: 99,
                history_limit: 0,
            })
            .await
            .expect_err("machine 99 is not configured");
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
        assert!(missing.message().contains("ListMachines"), "{missing:?}");

        let content = b"printer.tray = 4\n".to_vec();
        let pushed = c
            .push_config(pb::PushConfigRequest {
                target: "1".into(),
                content: content.clone(),
            })
            .await
            .expect("PushConfig")
            .into_inner();
        assert_eq!(pushed.outcomes.len(), 1, "{pushed:?}");
        let o = &pushed.outcomes[0];
        assert_eq!(
            (o.machine_id, o.generation, o.outcome()),
            (1, 1, pb::PushOutcome::Ack),
            "{o:?}"
        );
        let totals = pushed.totals.expect("totals");
        assert_eq!((totals.total, totals.ack, totals.nack), (1, 1, 0));
        assert_eq!(
            std::fs::read(fleet.agent_dir(1).join("config.current")).expect("stored"),
            content
        );
        assert!(
            !fleet.agent_dir(2).join("config.current").exists(),
            "machine 2 untouched"
        );

        // A group target reaches exactly its members; bad targets say what is wrong.
        let pushed = c
            .push_config(pb::PushConfigRequest {
                target: "group:even".into(),
                content: b"even = yes\n".to_vec(),
            })
            .await
            .expect("PushConfig to a group")
            .into_inner();
        let got: Vec<(u32, pb::PushOutcome)> = pushed
            .outcomes
            .iter()
            .map(|o| (o.machine_id, o.outcome()))
            .collect();
        assert_eq!(got, vec![(2, pb::PushOutcome::Ack)], "{pushed:?}");
        assert_eq!(
            std::fs::read(fleet.agent_dir(2).join("config.current")).expect("stored"),
            b"even = yes\n"
        );
        for (target, code) in [
            ("group:", Code::InvalidArgument),
            ("group:roof", Code::NotFound),
            ("7", Code::NotFound),
        ] {
            let e = c
                .push_config(pb::PushConfigRequest {
                    target: target.into(),
                    content: b"x\n".to_vec(),
                })
                .await
                .expect_err(target);
            assert_eq!(e.code(), code, "{target}: {e:?}");
        }
        let e = c
            .push_config(pb::PushConfigRequest {
                target: "1".into(),
                content: Vec::new(),
            })
            .await
            .expect_err("empty configuration");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

        let m = c
            .get_machine(pb::GetMachineRequest {
                id: 1,
                history_limit: 5,
            })
            .await
            .expect("GetMachine")
            .into_inner();
        let machine = m.machine.expect("machine");
        assert_eq!(
            (machine.desired_generation, machine.applied_generation),
            (1, 1)
        );
        assert_eq!(
            machine.content_sha256,
            hex::encode(sha2::Sha256::digest(&content))
        );
        assert_eq!(machine.attempts, 1);
        assert_eq!(machine.last_error, "");
        assert_eq!(m.history.len(), 1);
        assert_eq!(m.history[0].created_by, "admin");
        assert_eq!(m.history[0].last_outcome, "ack");
        assert_eq!(m.history[0].size_bytes, content.len() as u64);

        let audit = c
            .get_audit(pb::GetAuditRequest { limit: 10 })
            .await
            .expect("GetAudit")
            .into_inner();
        let pushes: Vec<&pb::AuditEntry> = audit
            .entries
            .iter()
            .filter(|a| a.action == "push")
            .collect();
        assert_eq!(pushes.len(), 2, "{audit:?}");
        // Newest first: the group push, then the push to machine 1.
        assert_eq!(
            pushes[0].detail,
            "group:even (11 bytes): 1/1 ACK, 0 NACK, 0 pending"
        );
        assert_eq!(pushes[1].detail, "machine 1 generation 1 (17 bytes): ack");
        for p in pushes {
            assert_eq!(p.actor, "admin");
            assert!(p.source.starts_with("127.0.0.1:"), "{p:?}");
        }
    });
}

#[test]
fn read_only_and_unconfigured_operators_are_denied() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    add_operator(&dev, "viewer", "read_only");
    let scm = Fleet::start_scm(dir.path(), &[]);
    let addr = scm.listening("admin");
    let viewer = operator(&dev, "viewer");
    let stranger = operator(&dev, "stranger");
    rt().block_on(async {
        let mut c = client(addr, &viewer).await;
        let list = c
            .list_machines(pb::ListMachinesRequest {})
            .await
            .expect("a read-only operator may list");
        assert_eq!(list.into_inner().machines.len(), 1);
        let denied = c
            .push_config(pb::PushConfigRequest {
                target: "1".into(),
                content: b"x=1\n".to_vec(),
            })
            .await
            .expect_err("a read-only operator may not push");
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        assert!(denied.message().contains("read-only"), "{denied:?}");
        let audit = c
            .get_audit(pb::GetAuditRequest { limit: 0 })
            .await
            .expect("a read-only operator may read the audit log")
            .into_inner();
        let refused = audit
            .entries
            .iter()
            .find(|a| a.action == "push_refused")
            .unwrap_or_else(|| panic!("no push_refused row: {audit:?}"));
        assert_eq!(refused.actor, "viewer");
        assert!(refused.source.starts_with("127.0.0.1:"), "{refused:?}");
        assert!(refused.detail.contains("target 1"), "{refused:?}");
        assert!(
            !audit.entries.iter().any(|a| a.action == "push"),
            "nothing pushed: {audit:?}"
        );

        // A valid certificate for an operator the SCM does not know: every RPC is denied.
        let mut s = client(addr, &stranger).await;
        let e = s
            .list_machines(pb::ListMachinesRequest {})
            .await
            .expect_err("unknown operator");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("\"stranger\"") && e.message().contains("[[operator]]"),
            "{e:?}"
        );
        let e = s
            .watch_events(pb::WatchEventsRequest {})
            .await
            .expect_err("unknown operator cannot watch");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    });
    scm.wait_for("operator not configured; refused");
}

#[test]
fn clients_without_a_certificate_with_tls12_or_a_machine_certificate_are_refused() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    // TLS 1.2 allowed for legacy machines must not open the admin port to it.
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__TLS__ALLOW_TLS12_FOR_MACHINES", "true".to_string())],
    );
    let addr = scm.listening("admin").to_string();
    let admin = dev_pems(&dev, "operator-admin");
    rt().block_on(async {
        // TLS 1.2 only: the handshake itself fails.
        match connect_with(&addr, &tls12_only_config(&admin), WAIT).await {
            Err(AdminError::Handshake(e)) => assert_eq!(e.reason(), "protocol_version", "{e}"),
            Err(e) => panic!("expected a handshake failure, got {e}"),
            Ok(_) => panic!("a TLS 1.2-only client was accepted"),
        }
        // No certificate: TLS 1.3 lets the client finish first; the refusal shows on the
        // first RPC.
        match connect_with(&addr, &no_cert_config(&dev), WAIT).await {
            Ok(mut c) => {
                let e = c
                    .list_machines(pb::ListMachinesRequest {})
                    .await
                    .expect_err("a client without a certificate is refused");
                assert_ne!(e.code(), Code::Ok);
            }
            Err(e) => assert!(
                matches!(e, AdminError::Handshake(_) | AdminError::Http2(_)),
                "{e}"
            ),
        }
        // A machine's valid certificate is the wrong role for this port.
        let machine = dev_pems(&dev, "machine-1");
        let cfg = sctls::client_config_from_pem(
            &machine.ca,
            &machine.cert,
            &machine.key,
            TlsPolicy::default(),
        )
        .expect("client config");
        if let Ok(mut c) = connect_with(&addr, &cfg, WAIT).await {
            c.list_machines(pb::ListMachinesRequest {})
                .await
                .expect_err("a machine certificate is refused");
        }
        // The port still serves a legitimate operator.
        let mut c = client(addr.parse().expect("addr"), &admin).await;
        c.list_machines(pb::ListMachinesRequest {})
            .await
            .expect("an operator is served");
    });
    scm.wait_for("TLS handshake refused (protocol_version)");
    scm.wait_for("TLS handshake refused (no_certificate)");
    scm.wait_for("TLS handshake refused (wrong_role)");
}

#[test]
fn watchers_see_connect_push_and_masked_swipe_and_end_with_the_scm() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let mut scm = Fleet::start_scm(dir.path(), &[]);
    let admin_addr = scm.listening("admin");
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let bo_cfg = dev.join("backoffice.toml");
    let admin = dev_pems(&dev, "operator-admin");
    let card = "EMP4711";
    let runtime = rt();
    let mut stream = runtime.block_on(async {
        let mut c = client(admin_addr, &admin).await;
        c.watch_events(pb::WatchEventsRequest {})
            .await
            .expect("WatchEvents")
            .into_inner()
    });
    let mut watch = watch_with(&bo_cfg, admin_addr, &["--count", "3"]);
    watch.wait_for("watching events");
    scm.wait_for_n("admin API: watching events", 2);

    // Three things happen: machine 1 connects, a push is ACKed, a card is swiped.
    let agent = Fleet::start_agent(dir.path(), 1, agents_addr, &[]);
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    let file = dir.path().join("w.cfg");
    std::fs::write(&file, "watched = yes\n").expect("write config");
    let (code, out, err) = integration_tests::backoffice_with(
        &bo_cfg,
        telnet,
        &[
            "push",
            "--machine",
            "1",
            "--file",
            file.to_str().expect("path"),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    swipe(&dev, 1, card);
    agent.wait_for("swipe acknowledged by the SCM");

    runtime.block_on(async {
        let e = next_event(&mut stream).await;
        let first_seq = e.seq;
        assert!(first_seq > 0 && e.at_ms > 0, "{e:?}");
        match e.kind {
            Some(Kind::Connected(c)) => {
                assert_eq!((c.machine_id, c.protocol_version), (1, 1));
                assert!(c.peer_address.starts_with("127.0.0.1:"), "{c:?}");
            }
            k => panic!("expected connected, got {k:?}"),
        }
        let e = next_event(&mut stream).await;
        assert_eq!(e.seq, first_seq + 1, "sequence numbers count up");
        match e.kind {
            Some(Kind::Push(p)) => {
                assert_eq!((p.machine_id, p.generation), (1, 1));
                assert_eq!(p.outcome(), pb::PushOutcome::Ack);
            }
            k => panic!("expected a push outcome, got {k:?}"),
        }
        let e = next_event(&mut stream).await;
        match e.kind {
            Some(Kind::Swipe(s)) => {
                assert_eq!((s.machine_id, s.reader.as_str()), (1, "r1"));
                assert_eq!(s.card_masked, "***4711");
                assert_eq!(s.outcome, "accepted");
            }
            k => panic!("expected a swipe, got {k:?}"),
        }
    });

    // `backoffice watch --count 3` printed the same three events and stopped.
    assert_eq!(watch.wait_exit(), Some(0), "{}", watch.logs());
    let out = watch.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("connected machine 1 from 127.0.0.1:"),
        "{out}"
    );
    assert!(
        lines[1].contains("push machine 1 generation 1 ACK"),
        "{out}"
    );
    assert!(
        lines[2].contains("swipe machine 1 reader r1 card ***4711 accepted"),
        "{out}"
    );
    assert!(!out.contains(card), "card numbers only masked: {out}");

    // On shutdown, open event streams end cleanly and the SCM exits.
    let mut open = watch_with(&bo_cfg, admin_addr, &[]);
    open.wait_for("watching events");
    scm.wait_for_n("admin API: watching events", 3);
    scm.signal("TERM");
    open.wait_for("the SCM ended the event stream");
    assert_eq!(open.wait_exit(), Some(2));
    assert_eq!(scm.wait_exit(), Some(0), "{}", scm.logs());
    runtime.block_on(async {
        // The agent's link also ends at shutdown; that event may come before the end.
        loop {
            let next = tokio::time::timeout(WAIT, stream.message())
                .await
                .expect("the stream ends within the wait");
            match next {
                Ok(None) => break,
                Ok(Some(pb::Event {
                    kind: Some(Kind::Disconnected(_)),
                    ..
                })) => {}
                other => panic!("expected the end of the stream, got {other:?}"),
            }
        }
    });
    drop(agent);
}
