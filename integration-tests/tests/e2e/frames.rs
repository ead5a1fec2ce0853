//! Malformed and hostile frames against the real binaries: the SCM's agent port (with
//! machine 1's real certificate) and an agent's config port (with the SCM's certificate).
//! Every case checks the exact answer of `docs/protocol.md` section 5 (or section 7 for
//! the config port), that the connection stays open or is closed as documented, and that
//! the process keeps serving a normal client afterwards.
//!
//! Table-driven tests run every row and report all failing rows together, so one run
//! shows every deviation from the protocol.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{Fleet, Proc, tables};
use scm_certs::identity::Identity;
use scm_proto::v1::{self, Message, NackReason};
use scm_proto::{Code, Frame};
use sha2::Digest;

use super::{FrameClient, dev_pems, init, rt};

/// SCM stall timeout used by the stall tests (the default is 10 s).
const STALL_MS: u64 = 300;

// ---------------------------------------------------------------------------------------
// Building frames

/// A frame written byte by byte: VERSION, CODE, ID (LE), DATA_LENGTH (LE), RAW_DATA.
fn raw(version: u8, code: u8, id: u16, data: &[u8]) -> Vec<u8> {
    raw_declaring(version, code, id, data.len() as u16, data)
}

/// A header declaring `declared` data bytes, followed by `data` (possibly fewer bytes).
fn raw_declaring(version: u8, code: u8, id: u16, declared: u16, data: &[u8]) -> Vec<u8> {
    let mut b = vec![version, code];
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&declared.to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// A version-1 message as a frame from/for machine `id`.
fn v1_bytes(m: Message, id: u16) -> Vec<u8> {
    m.to_frame(id)
        .and_then(|f| f.to_bytes())
        .expect("encode v1 frame")
        .to_vec()
}

fn hello(request_id: u64) -> Message {
    Message::Hello(v1::Hello {
        request_id,
        agent_version: "frames-test".into(),
        ..Default::default()
    })
}

fn config(request_id: u64, generation: u64, content: &[u8]) -> Message {
    Message::Config(v1::Config {
        request_id,
        generation,
        content: content.to_vec(),
        sha256: sha2::Sha256::digest(content).to_vec(),
    })
}

// ---------------------------------------------------------------------------------------
// Expected answers

/// What a NACK's text must be.
#[derive(Debug, Clone, Copy)]
enum Text {
    /// Exactly this text.
    Exact(&'static str),
    /// Contains every one of these.
    Contains(&'static [&'static str]),
    /// Not specified by the protocol; only required to be non-empty.
    NonEmpty,
}

impl Text {
    fn check(self, got: &str) -> Result<(), String> {
        let ok = match self {
            Text::Exact(t) => got == t,
            Text::Contains(parts) => parts.iter().all(|p| got.contains(p)),
            Text::NonEmpty => !got.is_empty(),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("text {got:?} is not {self:?}"))
        }
    }
}

/// The answer a case expects.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A version-0 NACK carrying machine id `id` with this status text.
    V0Nack { id: u16, text: Text },
    /// A version-1 NACK carrying machine id `id`.
    V1Nack {
        id: u16,
        request_id: u64,
        reason: NackReason,
        detail: Text,
    },
    /// No answer: the peer closes the connection.
    Closed,
}

/// Checks one received frame against a NACK expectation.
fn check_nack(f: &Frame, expect: Expect) -> Result<(), String> {
    match expect {
        Expect::V0Nack { id, text } => {
            if (f.version, f.code, f.id) != (0, Code::Nack.byte(), id) {
                return Err(format!(
                    "expected a v0 NACK for machine {id}, got {f} ({:?})",
                    f.text_lossy()
                ));
            }
            text.check(&f.text_lossy())
        }
        Expect::V1Nack {
            id,
            request_id,
            reason,
            detail,
        } => {
            if (f.version, f.code, f.id) != (1, Code::Nack.byte(), id) {
                return Err(format!(
                    "expected a v1 NACK for machine {id}, got {f} ({:?})",
                    f.text_lossy()
                ));
            }
            let n = match Message::decode(f) {
                Ok(Message::Nack(n)) => n,
                other => return Err(format!("v1 NACK payload does not decode: {other:?}")),
            };
            if n.request_id != request_id || n.reason() != reason {
                return Err(format!(
                    "expected request_id {request_id} reason {reason:?}, got request_id {} \
                     reason {:?} detail {:?}",
                    n.request_id,
                    n.reason(),
                    n.detail
                ));
            }
            detail.check(&n.detail)
        }
        Expect::Closed => Err(format!("expected the link to close, got a frame: {f}")),
    }
}

/// Receives the answer to a case and checks it. For `Closed`, the link must end (clean
/// EOF, or an EOF/reset error) with no frame, between `min` and 5 s after `sent`.
async fn check_answer(
    c: &mut FrameClient,
    expect: Expect,
    sent: Instant,
    min: Duration,
) -> Result<(), String> {
    match (c.recv().await, expect) {
        (Ok(Some(f)), e) => check_nack(&f, e),
        (Ok(None) | Err(_), Expect::Closed) => {
            let took = sent.elapsed();
            if took < min || took > Duration::from_secs(5) {
                Err(format!(
                    "closed after {took:?}; expected between {min:?} and 5s"
                ))
            } else {
                Ok(())
            }
        }
        (Ok(None), e) => Err(format!("link closed without an answer; expected {e:?}")),
        (Err(err), e) => Err(format!("read failed ({err:#}); expected {e:?}")),
    }
}

/// Expects the server to close the link now (after a NACK that closes it).
async fn expect_closed(c: &mut FrameClient) -> Result<(), String> {
    match c.recv().await {
        Ok(None) => Ok(()),
        Ok(Some(f)) => Err(format!("link not closed: got another frame {f}")),
        Err(e) => {
            let text = format!("{e:#}").to_ascii_lowercase();
            if text.contains("eof") || text.contains("reset") {
                Ok(())
            } else {
                Err(format!("link not closed cleanly: {e:#}"))
            }
        }
    }
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n  - {}",
        failures.len(),
        failures.join("\n  - ")
    );
}

// ---------------------------------------------------------------------------------------
// Normal clients

/// A v1 HELLO from machine 1 on `c` is ACKed with the same request id.
async fn hello_is_acked(c: &mut FrameClient, request_id: u64) -> Result<(), String> {
    c.send_raw(&v1_bytes(hello(request_id), 1))
        .await
        .map_err(|e| format!("cannot send HELLO: {e}"))?;
    match c.recv().await {
        Ok(Some(f)) => match Message::decode(&f) {
            Ok(Message::Ack(a)) if f.id == 1 && a.request_id == request_id => Ok(()),
            other => Err(format!("HELLO not ACKed: {f} {other:?}")),
        },
        other => Err(format!("no answer to HELLO: {other:?}")),
    }
}

/// A fresh machine-1 client says HELLO, is ACKed, and gets its MSG ACKed.
async fn normal_agent_client_works(addr: std::net::SocketAddr, dev: &Path) {
    let mut c = FrameClient::connect(addr, &dev_pems(dev, "machine-1"), Identity::Scm)
        .await
        .expect("a normal client connects");
    hello_is_acked(&mut c, 1)
        .await
        .expect("the SCM still ACKs a fresh HELLO");
    c.send_raw(&v1_bytes(
        Message::Msg(v1::Msg {
            request_id: 2,
            text: "still here".into(),
        }),
        1,
    ))
    .await
    .expect("send MSG");
    let f = c.recv().await.expect("read").expect("an answer to MSG");
    match Message::decode(&f) {
        Ok(Message::Ack(a)) => assert_eq!((f.id, a.request_id, a.detail.as_str()), (1, 2, "OK")),
        other => panic!("MSG after HELLO not ACKed: {f} {other:?}"),
    }
}

/// A push through the back office to machine 2 (a real agent) is ACKed and stored.
fn push_to_machine_2_works(fleet: &Fleet) {
    let file = fleet.dir.path().join("ok.cfg");
    std::fs::write(&file, "still = serving\n").expect("write config");
    let (code, out, err) = fleet.backoffice(&[
        "push",
        "--machine",
        "2",
        "--file",
        file.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, 0, "push after the bad frames: {out}{err}");
    assert!(out.starts_with("250 ACK machine 2 generation 1"), "{out}");
    assert_eq!(
        std::fs::read_to_string(fleet.agent_dir(2).join("config.current")).expect("stored"),
        "still = serving\n"
    );
}

/// An SCM for machines 1 and 2 with only machine 2's agent running, so that the tests can
/// speak as machine 1 without disturbing a real agent's session.
fn fleet_without_agent_1(scm_env: &[(&'static str, String)]) -> Fleet {
    let (dir, password) = Fleet::init(&[1, 2]);
    let scm = Fleet::start_scm(dir.path(), scm_env);
    let agents_addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let telnet_tls = scm.listening("telnet-tls");
    let agent2 = Fleet::start_agent(dir.path(), 2, agents_addr, &[]);
    agent2.wait_for("connected to SCM");
    Fleet {
        dir,
        scm,
        agents: vec![(2, agent2)],
        agents_addr,
        telnet,
        telnet_tls,
        password,
    }
}

// ---------------------------------------------------------------------------------------
// The SCM's agent port

/// Unknown versions and codes, an unreadable payload and MSG before HELLO are NACKed as
/// `docs/protocol.md` section 5 says, and the link stays usable: a HELLO on the same
/// connection is ACKed afterwards.
#[test]
fn scm_nacks_bad_frames_and_keeps_the_link() {
    init();
    let fleet = fleet_without_agent_1(&[]);
    let dev = fleet.dev();
    let pems = dev_pems(&dev, "machine-1");
    let cases: &[(&str, Vec<u8>, Expect)] = &[
        (
            "unknown version 7",
            raw(7, Code::Hello.byte(), 1, b"hello"),
            Expect::V0Nack {
                id: 1,
                text: Text::Exact("unsupported protocol version 7; supported versions: 0, 1"),
            },
        ),
        (
            "unknown code 99 in version 1",
            raw(1, 99, 1, b""),
            Expect::V1Nack {
                id: 1,
                request_id: 0,
                reason: NackReason::UnknownCode,
                detail: Text::Exact("unknown code 99 in version 1"),
            },
        ),
        (
            "unknown code 99 in version 0",
            raw(0, 99, 1, b"x"),
            Expect::V0Nack {
                id: 1,
                text: Text::Exact("unknown code 99 in version 0"),
            },
        ),
        (
            "SWIPE (code 4) in version 0",
            raw(0, Code::Swipe.byte(), 1, b"12345678"),
            Expect::V0Nack {
                id: 1,
                text: Text::Exact("unknown code 4 in version 0"),
            },
        ),
        (
            "garbage protobuf in a v1 HELLO",
            raw(1, Code::Hello.byte(), 1, &[0xff, 0xff, 0xff, 0xff]),
            Expect::V1Nack {
                id: 1,
                request_id: 0,
                reason: NackReason::Malformed,
                detail: Text::NonEmpty,
            },
        ),
        (
            "v1 MSG before HELLO",
            v1_bytes(
                Message::Msg(v1::Msg {
                    request_id: 5,
                    text: "too early".into(),
                }),
                1,
            ),
            Expect::V1Nack {
                id: 1,
                request_id: 5,
                reason: NackReason::NotAllowed,
                detail: Text::Exact("say HELLO first"),
            },
        ),
    ];
    rt().block_on(async {
        let mut failures = Vec::new();
        for (name, bytes, expect) in cases {
            let mut c = FrameClient::connect(fleet.agents_addr, &pems, Identity::Scm)
                .await
                .expect("connect as machine 1");
            c.send_raw(bytes).await.expect("send");
            let result = match check_answer(&mut c, *expect, Instant::now(), Duration::ZERO).await {
                // The frame boundary is intact: the same link still takes a HELLO.
                Ok(()) => hello_is_acked(&mut c, 1)
                    .await
                    .map_err(|e| format!("link not usable after the NACK: {e}")),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                failures.push(format!("{name}: {e}"));
            }
        }
        // Still serves a normal client.
        normal_agent_client_works(fleet.agents_addr, &dev).await;
        report(failures);
    });
    push_to_machine_2_works(&fleet);
}

/// A header declaring more data than the link accepts (16384 by default) is NACKed in
/// the sender's version without reading the data, and the link is closed.
#[test]
fn scm_refuses_a_frame_over_the_link_limit_then_closes() {
    init();
    let fleet = fleet_without_agent_1(&[]);
    let dev = fleet.dev();
    let pems = dev_pems(&dev, "machine-1");
    // Only the header is sent: the SCM must answer from the header alone.
    let cases: &[(&str, Vec<u8>, Expect)] = &[
        (
            "v0 MSG declaring 60000 bytes",
            raw_declaring(0, Code::Msg.byte(), 1, 60000, b""),
            Expect::V0Nack {
                id: 1,
                text: Text::Contains(&["60000", "16384"]),
            },
        ),
        (
            "v1 HELLO declaring 60000 bytes",
            raw_declaring(1, Code::Hello.byte(), 1, 60000, b""),
            Expect::V1Nack {
                id: 1,
                request_id: 0,
                reason: NackReason::Malformed,
                detail: Text::Contains(&["60000", "16384"]),
            },
        ),
    ];
    rt().block_on(async {
        let mut failures = Vec::new();
        for (name, bytes, expect) in cases {
            let mut c = FrameClient::connect(fleet.agents_addr, &pems, Identity::Scm)
                .await
                .expect("connect as machine 1");
            c.send_raw(bytes).await.expect("send");
            let result = match check_answer(&mut c, *expect, Instant::now(), Duration::ZERO).await {
                Ok(()) => expect_closed(&mut c).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                failures.push(format!("{name}: {e}"));
            }
        }
        fleet.scm.wait_for_n(
            "closed after NACK: frame declares 60000 data bytes",
            cases.len(),
        );
        normal_agent_client_works(fleet.agents_addr, &dev).await;
        report(failures);
    });
    push_to_machine_2_works(&fleet);
}

/// A frame whose DATA_LENGTH promises more than arrives: the SCM closes the link when the
/// stall timeout (300 ms here) runs out, logs it, and keeps serving.
#[test]
fn scm_closes_a_link_that_stalls_mid_frame() {
    init();
    let fleet = fleet_without_agent_1(&[("SCM__TIMEOUTS__FRAME_STALL_MS", STALL_MS.to_string())]);
    let dev = fleet.dev();
    rt().block_on(async {
        let mut c = FrameClient::connect(fleet.agents_addr, &dev_pems(&dev, "machine-1"), Identity::Scm)
            .await
            .expect("connect as machine 1");
        // Header of a v1 HELLO declaring 100 data bytes, and only 10 of them.
        let sent = Instant::now();
        c.send_raw(&raw_declaring(1, Code::Hello.byte(), 1, 100, &[0u8; 10]))
            .await
            .expect("send");
        if let Err(e) = check_answer(
            &mut c,
            Expect::Closed,
            sent,
            Duration::from_millis(STALL_MS - 50),
        )
        .await
        {
            panic!("stalled frame: {e}");
        }
        fleet.scm.wait_for(
            "peer stalled mid-frame: 16 of the frame's 106 bytes arrived within 300ms of its first byte",
        );
        normal_agent_client_works(fleet.agents_addr, &dev).await;
    });
    push_to_machine_2_works(&fleet);
}

/// The client sends part of a frame and then ends its side of the stream (TLS
/// close_notify and FIN): the SCM discards the partial frame, logs it, closes, survives.
#[test]
fn scm_survives_a_truncated_frame_then_eof() {
    init();
    let fleet = fleet_without_agent_1(&[]);
    let dev = fleet.dev();
    let pems = dev_pems(&dev, "machine-1");
    let cases: &[(&str, Vec<u8>, &str)] = &[
        (
            "3 of the 6 header bytes",
            vec![1, Code::Hello.byte(), 1],
            "stream ended mid-frame: 3 of the frame's 6 bytes arrived",
        ),
        (
            "header declaring 10 data bytes, 4 sent",
            raw_declaring(1, Code::Hello.byte(), 1, 10, &[8, 1, 0x12, 0]),
            "stream ended mid-frame: 10 of the frame's 16 bytes arrived",
        ),
    ];
    rt().block_on(async {
        let mut failures = Vec::new();
        for (name, bytes, log) in cases {
            let mut c = FrameClient::connect(fleet.agents_addr, &pems, Identity::Scm)
                .await
                .expect("connect as machine 1");
            c.send_raw(bytes).await.expect("send");
            tokio::io::AsyncWriteExt::shutdown(&mut c.writer)
                .await
                .expect("half-close");
            match c.recv().await {
                Ok(None) => {}
                other => failures.push(format!(
                    "{name}: expected the SCM to close cleanly with no answer, got {other:?}"
                )),
            }
            fleet.scm.wait_for(log);
        }
        // Nothing was acted on: machine 1 never said HELLO.
        assert_eq!(
            fleet.scm.logs().matches("agent said HELLO").count(),
            1,
            "only machine 2's agent said HELLO; a partial frame was acted on"
        );
        normal_agent_client_works(fleet.agents_addr, &dev).await;
        report(failures);
    });
    push_to_machine_2_works(&fleet);
}

// ---------------------------------------------------------------------------------------
// An agent's config port

/// Frames the config port must refuse (`docs/protocol.md` sections 5 and 7): each is
/// NACKed (or, for a stall, the link closed) and nothing is written; then a valid CONFIG
/// is ACKed with its request id and generation and stored.
#[test]
fn config_port_refuses_bad_frames_then_stores_a_valid_config() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents_addr = scm.listening("agents");
    let agent: Proc = Fleet::start_agent(
        dir.path(),
        1,
        agents_addr,
        &[("AGENT__TIMEOUTS__FRAME_STALL_MS", STALL_MS.to_string())],
    );
    agent.wait_for("connected to SCM");
    let port = agent.listening("config");
    let dev = dir.path().join("dev");
    let current = dev.join("machine-1/config.current");
    let scm_pems = dev_pems(&dev, "scm");
    let content = b"volume=3\n";

    let cases: &[(&str, Vec<u8>, Expect)] = &[
        (
            "v1 CONFIG for machine 2",
            v1_bytes(config(3, 1, content), 2),
            Expect::V1Nack {
                id: 1,
                request_id: 3,
                reason: NackReason::WrongMachineId,
                detail: Text::Contains(&["machine 2"]),
            },
        ),
        (
            "v0 CONFIG for machine 2",
            raw(0, Code::Config.byte(), 2, content),
            Expect::V0Nack {
                id: 1,
                text: Text::Contains(&["machine 2"]),
            },
        ),
        (
            "v1 HELLO instead of CONFIG",
            v1_bytes(hello(4), 1),
            Expect::V1Nack {
                id: 1,
                request_id: 4,
                reason: NackReason::NotAllowed,
                detail: Text::NonEmpty,
            },
        ),
        (
            "CONFIG with unknown version 7",
            raw(7, Code::Config.byte(), 1, content),
            Expect::V0Nack {
                id: 1,
                text: Text::Exact("unsupported protocol version 7; supported versions: 0, 1"),
            },
        ),
        (
            "CONFIG declaring 100 data bytes, 10 sent, then stalled",
            raw_declaring(1, Code::Config.byte(), 1, 100, &[0u8; 10]),
            Expect::Closed,
        ),
    ];
    rt().block_on(async {
        let mut failures = Vec::new();
        for (name, bytes, expect) in cases {
            let mut c = FrameClient::connect(port, &scm_pems, Identity::Machine(1))
                .await
                .expect("connect to the config port as the SCM");
            let sent = Instant::now();
            c.send_raw(bytes).await.expect("send");
            let min = match expect {
                Expect::Closed => Duration::from_millis(STALL_MS - 50),
                _ => Duration::ZERO,
            };
            if let Err(e) = check_answer(&mut c, *expect, sent, min).await {
                failures.push(format!("{name}: {e}"));
            }
            if current.exists() {
                failures.push(format!("{name}: config.current was written"));
            }
        }
        agent.wait_for(
            "peer stalled mid-frame: 16 of the frame's 106 bytes arrived within 300ms of its first byte",
        );
        // Each NACK is logged (the stall is not a NACK).
        agent.wait_for_n("CONFIG refused:", cases.len() - 1);

        // Still serves the SCM: a valid CONFIG is ACKed and stored.
        let mut c = FrameClient::connect(port, &scm_pems, Identity::Machine(1))
            .await
            .expect("connect to the config port as the SCM");
        c.send_raw(&v1_bytes(config(7, 3, content), 1))
            .await
            .expect("send CONFIG");
        let f = c.recv().await.expect("read").expect("an answer to CONFIG");
        match Message::decode(&f) {
            Ok(Message::Ack(a)) => assert_eq!(
                (f.id, a.request_id, a.generation, a.detail.as_str()),
                (1, 7, 3, "stored 9 bytes as generation 3"),
                "{a:?}"
            ),
            other => panic!("valid CONFIG not ACKed: {f} {other:?}"),
        }
        assert_eq!(
            std::fs::read(&current).expect("config.current written"),
            content
        );
        report(failures);
    });
}

// ---------------------------------------------------------------------------------------
// The frames table (integration-tests/tables/frames.toml)

/// The probe sent after a case that leaves the link open: a frame of unknown version 9,
/// which any link in any state answers with a version-0 NACK.
fn probe() -> Vec<u8> {
    raw(9, Code::Hello.byte(), 1, b"")
}

async fn probe_answered(c: &mut FrameClient) -> Result<(), String> {
    c.send_raw(&probe())
        .await
        .map_err(|e| format!("cannot send the probe: {e}"))?;
    match c.recv().await {
        Ok(Some(f))
            if (f.version, f.code) == (0, Code::Nack.byte())
                && f.text_lossy().contains("unsupported protocol version 9") =>
        {
            Ok(())
        }
        other => Err(format!("the link did not answer the probe: {other:?}")),
    }
}

/// Checks one answer frame against a table case.
fn check_table_frame(f: &Frame, c: &tables::Case) -> Result<(), String> {
    let (version, code) = match c.expect.as_str() {
        "v0nack" => (0, Code::Nack),
        "v0ack" => (0, Code::Ack),
        "v1nack" => (1, Code::Nack),
        "v1ack" => (1, Code::Ack),
        other => return Err(format!("expected {other}, got a frame {f}")),
    };
    if (f.version, f.code) != (version, code.byte()) {
        return Err(format!(
            "expected {}, got {f} ({:?})",
            c.expect,
            f.text_lossy()
        ));
    }
    let (request_id, reason, text) = if version == 0 {
        (None, None, f.text_lossy())
    } else {
        match Message::decode(f) {
            Ok(Message::Nack(n)) => (
                Some(n.request_id),
                Some(format!("{:?}", n.reason())),
                n.detail,
            ),
            Ok(Message::Ack(a)) => (Some(a.request_id), None, a.detail),
            other => return Err(format!("the answer does not decode: {other:?}")),
        }
    };
    if let Some(want) = &c.reason
        && reason.as_deref() != Some(want.as_str())
    {
        return Err(format!(
            "reason {reason:?}, expected {want} (detail {text:?})"
        ));
    }
    if let Some(want) = c.request_id
        && request_id != Some(want)
    {
        return Err(format!("request_id {request_id:?}, expected {want}"));
    }
    if let Some(want) = &c.text
        && !text.contains(want.as_str())
    {
        return Err(format!("text {text:?} does not contain {want:?}"));
    }
    Ok(())
}

/// Runs one case on a fresh connection `c`.
async fn run_table_case(c: &mut FrameClient, case: &tables::Case) -> Result<(), String> {
    c.send_raw(&case.bytes())
        .await
        .map_err(|e| format!("cannot send: {e}"))?;
    if case.eof {
        tokio::io::AsyncWriteExt::shutdown(&mut c.writer)
            .await
            .map_err(|e| format!("cannot half-close: {e}"))?;
    }
    for i in 0..case.skip.unwrap_or(0) {
        match c.recv().await {
            Ok(Some(_)) => {}
            other => return Err(format!("answer {} of the skipped ones: {other:?}", i + 1)),
        }
    }
    match case.expect.as_str() {
        "closed" => return expect_closed(c).await,
        // No answer: the probe's NACK must be the next frame.
        "none" => return probe_answered(c).await,
        _ => {}
    }
    match c.recv().await {
        Ok(Some(f)) => check_table_frame(&f, case)?,
        other => return Err(format!("no answer (expected {}): {other:?}", case.expect)),
    }
    match case.then.as_deref() {
        Some("closed") => expect_closed(c).await,
        None | Some("open") => probe_answered(c).await,
        Some(other) => Err(format!("unknown `then` {other:?}")),
    }
}

/// `frames.toml`: frames sent to the SCM's agent port (as machine 1, whose agent is not
/// running) and to machine 1's agent config port (as the SCM). Each case runs on a fresh
/// connection; afterwards the link must be open (answering a probe frame) or closed, as
/// the case says. Then normal clients are still served on both ports.
#[test]
fn frames_table() {
    init();
    let table = tables::load("frames");
    let fleet = fleet_without_agent_1(&[]);
    let dev = fleet.dev();
    let machine1 = dev_pems(&dev, "machine-1");
    // Machine 1's agent for its config port, connected to a second SCM so that it does not
    // take machine 1's session on the SCM under test.
    let (dir1, _pw) = Fleet::init(&[1]);
    let scm1 = Fleet::start_scm(dir1.path(), &[]);
    let agent1 = Fleet::start_agent(dir1.path(), 1, scm1.listening("agents"), &[]);
    agent1.wait_for("connected to SCM");
    let config_port = agent1.listening("config");
    let scm1_pems = dev_pems(&dir1.path().join("dev"), "scm");
    rt().block_on(async {
        let mut failures = Vec::new();
        for case in &table.cases {
            let mut c = match case.port.as_deref() {
                Some("agent") => {
                    FrameClient::connect(fleet.agents_addr, &machine1, Identity::Scm).await
                }
                Some("config") => {
                    FrameClient::connect(config_port, &scm1_pems, Identity::Machine(1)).await
                }
                other => panic!(
                    "case {:?}: port {other:?} is not agent or config",
                    case.name
                ),
            }
            .expect("connect");
            if let Err(e) = run_table_case(&mut c, case).await {
                failures.push(format!(
                    "{} ({}): {e}",
                    case.name,
                    case.port.as_deref().unwrap_or("")
                ));
            }
        }
        // Still serves normal clients on both ports.
        normal_agent_client_works(fleet.agents_addr, &dev).await;
        let mut c = FrameClient::connect(config_port, &scm1_pems, Identity::Machine(1))
            .await
            .expect("connect to the config port as the SCM");
        let content = b"after = the table\n";
        c.send_raw(&v1_bytes(config(70, 1000, content), 1))
            .await
            .expect("send CONFIG");
        let f = c.recv().await.expect("read").expect("an answer to CONFIG");
        match Message::decode(&f) {
            Ok(Message::Ack(a)) => assert_eq!((a.request_id, a.generation), (70, 1000), "{a:?}"),
            other => panic!("valid CONFIG after the table not ACKed: {f} {other:?}"),
        }
        assert_eq!(
            std::fs::read(dir1.path().join("dev/machine-1/config.current")).expect("stored"),
            content
        );
        crate::tables::report("frames", table.cases.len(), failures);
    });
    push_to_machine_2_works(&fleet);
}
