//! The generation fence between real processes: once an agent stores generation N, a
//! repeat of N is ACKed without rewriting it, and an older generation (a late delivery, or
//! a second SCM whose database numbers the machine's configurations from 1 again) is
//! refused with NACK `STALE`; the agent keeps N, and the SCM records a final NACK.

use integration_tests::{Fleet, Proc, backoffice_with, bin, scm_env};
use scm_certs::identity::Identity;
use scm_proto::v1::{self, Message, NackReason};
use sha2::Digest;

use crate::{FrameClient, dev_pems, init, rt};

fn write_cfg(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config file");
    p.to_string_lossy().into_owned()
}

/// A CONFIG as the SCM would build it, sent straight to the agent's config port.
pub(crate) fn config(request_id: u64, generation: u64, content: &[u8]) -> scm_proto::Frame {
    Message::Config(v1::Config {
        request_id,
        generation,
        content: content.to_vec(),
        sha256: sha2::Sha256::digest(content).to_vec(),
    })
    .to_frame(1)
    .expect("fits")
}

#[test]
fn an_older_generation_never_rolls_the_agent_back() {
    init();
    let fleet = Fleet::start(&[1]);
    let dir = fleet.dir.path();
    for (name, text) in [("a.cfg", "tray = 1\n"), ("b.cfg", "tray = 2\n")] {
        let f = write_cfg(dir, name, text);
        let (code, out, err) = fleet.backoffice(&["push", "--machine", "1", "--file", &f]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let current = fleet.agent_dir(1).join("config.current");
    let previous = fleet.agent_dir(1).join("config.previous");
    assert_eq!(std::fs::read_to_string(&current).unwrap(), "tray = 2\n");
    let written = std::fs::metadata(&current).unwrap().modified().unwrap();

    // Hand-built deliveries on the agent's config port, with the SCM's certificate.
    let port = fleet.agent(1).listening("config");
    let scm_pems = dev_pems(&fleet.dev(), "scm");
    rt().block_on(async {
        let mut c = FrameClient::connect(port, &scm_pems, Identity::Machine(1))
            .await
            .expect("connect to the config port");
        // A late copy of generation 1.
        c.send(&config(7, 1, b"tray = 1\n")).await.unwrap();
        match Message::decode(&c.recv().await.unwrap().expect("an answer")).unwrap() {
            Message::Nack(n) => {
                assert_eq!(
                    (n.request_id, n.reason(), n.generation),
                    (7, NackReason::Stale, 2),
                    "{n:?}"
                );
                assert!(
                    n.detail.contains("older than the stored generation 2"),
                    "{n:?}"
                );
            }
            m => panic!("expected NACK STALE, got {m:?}"),
        }
        // A retried generation 2: ACKed again, not rewritten.
        c.send(&config(8, 2, b"tray = 2\n")).await.unwrap();
        match Message::decode(&c.recv().await.unwrap().expect("an answer")).unwrap() {
            Message::Ack(a) => {
                assert_eq!((a.request_id, a.generation), (8, 2), "{a:?}");
                assert!(a.detail.contains("already applied"), "{a:?}");
            }
            m => panic!("expected ACK, got {m:?}"),
        }
    });
    assert_eq!(std::fs::read_to_string(&current).unwrap(), "tray = 2\n");
    assert_eq!(std::fs::read_to_string(&previous).unwrap(), "tray = 1\n");
    assert_eq!(
        std::fs::metadata(&current).unwrap().modified().unwrap(),
        written,
        "the repeat did not rewrite config.current"
    );

    // A second SCM with its own, empty database: its first push to machine 1 is
    // generation 1, older than what the machine holds.
    let dev = fleet.dev();
    let text = std::fs::read_to_string(dev.join("scm.toml"))
        .unwrap()
        .replace("path = \"scm.db\"", "path = \"scm-b.db\"")
        .replace(
            "[[machine]]\nid = 1\n",
            &format!("[[machine]]\nid = 1\nconfig_addr = \"{port}\"\n"),
        );
    assert!(text.contains("config_addr"), "{text}");
    std::fs::write(dev.join("scm-b.toml"), text).unwrap();
    let mut env = scm_env();
    env.push(("SCM__LISTEN__METRICS", "127.0.0.1:0".into()));
    let cfg = dev.join("scm-b.toml");
    let other = Proc::spawn(
        "scm-b",
        &bin("scm"),
        &["serve", "--config", cfg.to_str().unwrap()],
        &env,
    );
    let telnet = other.listening("telnet");
    let bo = dev.join("backoffice.toml");
    let f = write_cfg(dir, "c.cfg", "tray = 9\n");
    let (code, out, err) = backoffice_with(&bo, telnet, &["push", "--machine", "1", "--file", &f]);
    assert_eq!(code, 1, "a NACK: {out}{err}");
    assert!(
        out.starts_with("554 NACK machine 1 generation 1")
            && out.contains("NACK_REASON_STALE")
            && out.contains("generation 2 stored"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&current).unwrap(), "tray = 2\n");
    // Recorded as a final NACK: nothing is left pending to retry.
    let (code, out, _) = backoffice_with(&bo, telnet, &["status", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("desired 1, applied 0"), "{out}");
    assert!(
        out.contains("last error: ") && out.contains("STALE"),
        "{out}"
    );
    let (code, out, _) = backoffice_with(&bo, telnet, &["history", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("generation 1") && out.contains(": nack"),
        "{out}"
    );
}
