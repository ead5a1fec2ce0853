//! Configuration over the agent's own link (the default for version-1 agents): an agent
//! with no listening port at all gets every push on the mutual-TLS link it holds to the
//! SCM, checks and stores it as its config port would, and answers on the link while
//! swipes go on. The bad inputs: a CONFIG from a peer that is not the SCM, for another
//! machine, with a wrong hash, a stale generation, and an agent that never answers.

use std::net::SocketAddr;

use integration_tests::{Fleet, Proc, WAIT, backoffice_with, swipe};
use scm_certs::identity::{Identity, Role};
use scm_certs::tls::{self as sctls, TlsPolicy};
use scm_proto::io::{FrameReader, write_frame};
use scm_proto::v1::{self, Message, NackReason};
use scm_proto::{Code, Frame, FrameCodec};
use sha2::Digest;

use crate::{FrameClient, Pems, dev_pems, init, rt};

/// An agent of an init-dev directory with no config port (`[listen] config = ""`, as
/// init-dev writes it; the harness would give it one on port 0).
fn portless_agent(dir: &std::path::Path, id: u16, scm: SocketAddr) -> Proc {
    Fleet::start_agent(dir, id, scm, &[("AGENT__LISTEN__CONFIG", String::new())])
}

fn write_cfg(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config file");
    p.to_string_lossy().into_owned()
}

#[test]
fn an_agent_without_a_config_port_gets_every_push_over_its_link_while_swipes_flow() {
    init();
    let (dir, _password) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agent = portless_agent(dir.path(), 1, scm.listening("agents"));
    agent.wait_for("connected to SCM");
    agent.wait_for("reader r1");
    assert!(
        !agent.logs().contains("(config)"),
        "no listening port: {}",
        agent.logs()
    );
    let dev = dir.path().join("dev");
    let sim = crate::swipes::sim(scm.listening("generic 1/r1"), &[]);
    sim.wait_stdout("CONNECTED");

    // A burst of swipes from the reader while pushes go over the same link.
    let cards: Vec<String> = (0..40).map(|i| format!("{:08}", 31_000_000 + i)).collect();
    let swiper = {
        let dev = dev.clone();
        let cards = cards.clone();
        std::thread::spawn(move || {
            for c in &cards {
                swipe(&dev, 1, c);
            }
        })
    };
    let bo = dev.join("backoffice.toml");
    let telnet = scm.listening("telnet");
    for g in 1..=5u64 {
        let f = write_cfg(dir.path(), &format!("g{g}.cfg"), &format!("tray = {g}\n"));
        let (code, out, err) =
            backoffice_with(&bo, telnet, &["push", "--machine", "1", "--file", &f]);
        assert_eq!(code, 0, "push {g}: {out}{err}");
        assert!(
            out.starts_with(&format!("250 ACK machine 1 generation {g}")),
            "{out}"
        );
        let stored = std::fs::read_to_string(dev.join("machine-1/config.current")).unwrap();
        assert_eq!(stored, format!("tray = {g}\n"), "stored before the ACK");
    }
    swiper.join().expect("swiper");
    for c in &cards {
        sim.wait_stdout(&format!("CARD {c} FROM"));
    }
    let (code, out, _) = backoffice_with(&bo, telnet, &["status", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("delivery: over the machine's link"), "{out}");
    assert!(out.contains("desired 5, applied 5 (up to date)"), "{out}");
    assert!(
        !scm.logs().contains("cannot connect"),
        "the SCM never dialled the machine: {}",
        scm.logs()
    );
}

#[test]
fn an_agent_that_never_answers_a_config_on_its_link_leaves_it_pending_and_the_link_usable() {
    init();
    let (dir, _password) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(
        dir.path(),
        &[("SCM__TIMEOUTS__PUSH_REPLY_MS", "800".into())],
    );
    let dev = dir.path().join("dev");
    let agents = scm.listening("agents");
    let machine = dev_pems(&dev, "machine-1");
    let bo = dev.join("backoffice.toml");
    let telnet = scm.listening("telnet");
    let f = write_cfg(dir.path(), "a.cfg", "tray = 7\n");
    rt().block_on(async {
        let mut c = FrameClient::connect(agents, &machine, Identity::Scm)
            .await
            .expect("link");
        let hello = Message::Hello(v1::Hello {
            request_id: 1,
            readers: vec!["r1".into()],
            ..Default::default()
        });
        c.send(&hello.to_frame(1).unwrap()).await.unwrap();
        let ack = c.recv().await.unwrap().expect("HELLO answered");
        assert!(
            matches!(Message::decode(&ack), Ok(Message::Ack(_))),
            "{ack}"
        );
        let push = {
            let (bo, f) = (bo.clone(), f.clone());
            tokio::task::spawn_blocking(move || {
                backoffice_with(&bo, telnet, &["push", "--machine", "1", "--file", &f])
            })
        };
        // The CONFIG arrives on the link; this "agent" never answers it.
        let config = c.recv().await.unwrap().expect("a CONFIG on the link");
        match Message::decode(&config).unwrap() {
            Message::Config(cfg) => {
                assert_eq!((config.id, cfg.generation), (1, 1));
                assert_eq!(cfg.content, b"tray = 7\n");
            }
            m => panic!("expected CONFIG, got {m:?}"),
        }
        let (code, out, err) = push.await.unwrap();
        assert_eq!(code, 2, "pending, not lost: {out}{err}");
        let text = format!("{out}{err}");
        assert!(
            text.starts_with("450") && text.contains("no answer to the CONFIG over the link"),
            "{text}"
        );
        // The link is still usable: a heartbeat is answered.
        let hb = Message::Heartbeat(v1::Heartbeat {
            request_id: 2,
            sent_at_unix_ms: 1,
            ..Default::default()
        });
        c.send(&hb.to_frame(1).unwrap()).await.unwrap();
        loop {
            let f = c.recv().await.unwrap().expect("the link goes on");
            match Message::decode(&f).unwrap() {
                Message::Ack(a) if a.request_id == 2 => break,
                // A retry of the pending generation may come first; still unanswered.
                Message::Config(_) => continue,
                m => panic!("unexpected {m:?}"),
            }
        }
    });
    // The real agent gets the pending generation after its HELLO.
    let agent = portless_agent(dir.path(), 1, agents);
    agent.wait_for("connected to SCM");
    let current = dev.join("machine-1/config.current");
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::read_to_string(&current).ok().as_deref() != Some("tray = 7\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "the pending generation was not delivered: {}",
            agent.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, out, _) = backoffice_with(&bo, telnet, &["status", "1"]);
    assert_eq!(code, 0, "{out}");
    let deadline = std::time::Instant::now() + WAIT;
    let mut out = out;
    while !out.contains("desired 1, applied 1") {
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = backoffice_with(&bo, telnet, &["status", "1"]).1;
    }
}

/// A stand-in SCM on a loopback port with the given identity, for the agent to connect
/// to: answers HELLO, then lets the test send CONFIGs and read the answers (heartbeats
/// are answered and skipped).
struct FakeScm {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

struct FakeLink {
    reader: FrameReader<tokio::io::ReadHalf<ServerTls>>,
    writer: tokio::io::WriteHalf<ServerTls>,
}

impl FakeScm {
    async fn bind(p: &Pems) -> FakeScm {
        let cfg =
            sctls::server_config_from_pem(&p.ca, &p.cert, &p.key, &[], TlsPolicy::default(), &[])
                .expect("server config");
        FakeScm {
            listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(cfg),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Accepts the agent's link and answers its HELLO.
    async fn accept(&self) -> FakeLink {
        let (tcp, _) = self.listener.accept().await.unwrap();
        let (tls, id) = sctls::accept(&self.acceptor, tcp, WAIT, &[Role::Machine])
            .await
            .expect("the agent's handshake");
        assert_eq!(id, Identity::Machine(1));
        let (r, w) = tokio::io::split(tls);
        let mut link = FakeLink {
            reader: FrameReader::new(r, FrameCodec::default()),
            writer: w,
        };
        let hello = link.next().await;
        let Ok(Message::Hello(h)) = Message::decode(&hello) else {
            panic!("HELLO first, got {hello}")
        };
        assert_eq!(h.config_port, 0, "no config port announced: {h:?}");
        assert!(h.config_address.is_empty(), "{h:?}");
        let ack = Message::ack(h.request_id, "welcome", 0)
            .to_frame(1)
            .unwrap();
        write_frame(&mut link.writer, &ack).await.unwrap();
        link
    }
}

impl FakeLink {
    /// The next frame that is not a heartbeat (heartbeats are ACKed).
    async fn next(&mut self) -> Frame {
        loop {
            let f = self
                .reader
                .read_frame(Some(WAIT), WAIT)
                .await
                .expect("read")
                .expect("the agent keeps the link");
            if let Ok(Message::Heartbeat(h)) = Message::decode(&f) {
                let ack = Message::ack(h.request_id, "OK", 0).to_frame(1).unwrap();
                write_frame(&mut self.writer, &ack).await.unwrap();
                continue;
            }
            return f;
        }
    }

    /// Sends `frame` and returns the agent's answer.
    async fn ask(&mut self, frame: &Frame) -> Message {
        write_frame(&mut self.writer, frame).await.unwrap();
        let answer = self.next().await;
        assert!(
            matches!(answer.code(), Some(Code::Ack | Code::Nack)),
            "{answer}"
        );
        Message::decode(&answer).unwrap()
    }
}

fn config(machine: u16, request_id: u64, generation: u64, content: &[u8], sha: &[u8]) -> Frame {
    Message::Config(v1::Config {
        request_id,
        generation,
        content: content.to_vec(),
        sha256: sha.to_vec(),
    })
    .to_frame(machine)
    .unwrap()
}

fn nack(m: &Message) -> (u64, NackReason, u64, String) {
    match m {
        Message::Nack(n) => (n.request_id, n.reason(), n.generation, n.detail.clone()),
        m => panic!("expected NACK, got {m:?}"),
    }
}

#[test]
fn the_agent_checks_a_config_on_its_link_as_on_its_port_and_only_from_the_scm() {
    init();
    let (dir, _password) = Fleet::init(&[1, 2]);
    let dev = dir.path().join("dev");
    let current = dev.join("machine-1/config.current");
    rt().block_on(async {
        // A peer with a machine's certificate instead of the SCM's: the agent refuses it
        // in the handshake, before any frame.
        let impostor = FakeScm::bind(&dev_pems(&dev, "machine-2")).await;
        let agent = portless_agent(dir.path(), 1, impostor.addr());
        let (tcp, _) = impostor.listener.accept().await.unwrap();
        let refused = sctls::accept(&impostor.acceptor, tcp, WAIT, &[Role::Machine]).await;
        let ok = match refused {
            Err(_) => true,
            // TLS 1.3: the server side may finish before the client's refusal shows.
            Ok((tls, _)) => {
                let (r, mut w) = tokio::io::split(tls);
                let _ = write_frame(&mut w, &config(1, 1, 1, b"evil\n", &[])).await;
                let mut reader = FrameReader::new(r, FrameCodec::default());
                !matches!(reader.read_frame(Some(WAIT), WAIT).await, Ok(Some(_)))
            }
        };
        assert!(ok, "the agent answered a peer that is not the SCM");
        let logs = agent.wait_for("TLS handshake refused");
        assert!(logs.contains("SCM"), "{logs}");
        assert!(!current.exists(), "nothing stored from the impostor");
        drop(agent);

        // The SCM's certificate: every check of the config port, answered on the link.
        let scm = FakeScm::bind(&dev_pems(&dev, "scm")).await;
        let agent = portless_agent(dir.path(), 1, scm.addr());
        let mut link = scm.accept().await;
        let body = b"tray = 2\n";
        let sha = sha2::Sha256::digest(body).to_vec();
        let (rid, reason, _, detail) = nack(&link.ask(&config(2, 10, 2, body, &sha)).await);
        assert_eq!((rid, reason), (10, NackReason::WrongMachineId), "{detail}");
        let (rid, reason, _, _) = nack(&link.ask(&config(1, 11, 2, body, &[0; 32])).await);
        assert_eq!((rid, reason), (11, NackReason::Malformed));
        assert!(!current.exists(), "nothing written for a refused CONFIG");
        match link.ask(&config(1, 12, 2, body, &sha)).await {
            Message::Ack(a) => assert_eq!((a.request_id, a.generation), (12, 2), "{a:?}"),
            m => panic!("expected ACK, got {m:?}"),
        }
        assert_eq!(std::fs::read(&current).unwrap(), body);
        let old = b"tray = 1\n";
        let old_sha = sha2::Sha256::digest(old).to_vec();
        let (rid, reason, stored, _) = nack(&link.ask(&config(1, 13, 1, old, &old_sha)).await);
        assert_eq!((rid, reason, stored), (13, NackReason::Stale, 2));
        match link.ask(&config(1, 14, 2, body, &sha)).await {
            Message::Ack(a) => assert!(a.detail.contains("already applied"), "{a:?}"),
            m => panic!("expected ACK, got {m:?}"),
        }
        // Not a CONFIG frame the agent can read: still answered, nothing written.
        let junk = Frame::new(1, Code::Config, 1, &b"\xff\xff\xff"[..]).unwrap();
        let (_, reason, _, _) = nack(&link.ask(&junk).await);
        assert_eq!(reason, NackReason::Malformed);
        assert_eq!(std::fs::read(&current).unwrap(), body);
        drop(agent);
    });
}

#[test]
fn port_delivery_dials_the_address_the_agent_announces_never_the_hellos_source() {
    init();
    let (dir, _password) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let scm_toml = dev.join("scm.toml");
    let text = std::fs::read_to_string(&scm_toml).unwrap().replacen(
        "[[machine]]\nid = 1\n",
        "[[machine]]\nid = 1\ndelivery = \"port\"\n",
        1,
    );
    assert!(text.contains("delivery = \"port\""), "{text}");
    std::fs::write(&scm_toml, text).unwrap();
    let scm = Fleet::start_scm(dir.path(), &[]);
    // The config port on 127.0.0.37, the link from whatever address the OS picks
    // (127.0.0.1): the HELLO comes from another address than the port listens on.
    let agent = Fleet::start_agent(
        dir.path(),
        1,
        scm.listening("agents"),
        &[("AGENT__LISTEN__CONFIG", "127.0.0.37:0".into())],
    );
    let port = agent.listening("config");
    assert_eq!(port.ip().to_string(), "127.0.0.37");
    agent.wait_for("connected to SCM");
    let bo = dev.join("backoffice.toml");
    let telnet = scm.listening("telnet");
    let (code, out, _) = backoffice_with(&bo, telnet, &["status", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("link: connected from 127.0.0.1:"), "{out}");
    assert!(
        out.contains(&format!("delivery: to its config port at {port}")),
        "{out}"
    );
    let f = write_cfg(dir.path(), "a.cfg", "tray = 37\n");
    let (code, out, err) = backoffice_with(&bo, telnet, &["push", "--machine", "1", "--file", &f]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("250 ACK machine 1 generation 1"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dev.join("machine-1/config.current")).unwrap(),
        "tray = 37\n"
    );
}
