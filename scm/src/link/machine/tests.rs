//! The rules of docs/protocol.md, one table row per case, against the state machine
//! alone: frames in, actions out, the driver's answers fed back by hand.

use super::*;
use scm_proto::v1::Message;

const ID: u16 = 3;

fn params(known: bool) -> Params {
    Params {
        cert_id: ID,
        peer: "10.0.0.5:4000".parse().unwrap(),
        known,
        idle: Duration::from_secs(60),
        stall: Duration::from_secs(5),
        push_reply: Duration::from_secs(2),
        close_after_in_band: false,
    }
}

fn v0(code: Code, id: u16, data: &[u8]) -> Frame {
    Frame::v0(code, id, data.to_vec()).unwrap()
}

fn v1(m: Message, id: u16) -> Frame {
    m.to_frame(id).unwrap()
}

fn raw(version: u8, code: u8, id: u16) -> Frame {
    Frame {
        version,
        code,
        id,
        data: Default::default(),
    }
}

fn hello1(rid: u64) -> Message {
    Message::Hello(v1::Hello {
        request_id: rid,
        config_port: 9301,
        config_address: "127.0.0.5:9301".into(),
        applied_sha256: vec![0xab; 32],
        readers: vec!["door".into()],
        ..Default::default()
    })
}

fn msg1(rid: u64) -> Message {
    Message::Msg(v1::Msg {
        request_id: rid,
        text: "hi".into(),
    })
}

fn swipe1(rid: u64) -> Message {
    Message::Swipe(v1::Swipe {
        request_id: rid,
        event_id: "e1".into(),
        reader_id: "door".into(),
        card: "12345678".into(),
        ..Default::default()
    })
}

fn heartbeat1(rid: u64) -> Message {
    Message::Heartbeat(v1::Heartbeat {
        request_id: rid,
        sent_at_unix_ms: 1,
        ..Default::default()
    })
}

fn config1(rid: u64) -> Message {
    Message::Config(v1::Config {
        request_id: rid,
        ..Default::default()
    })
}

/// One line per frame: `v0 ACK 'OK'`, `v1 NACK #5 NOT_ALLOWED 'say HELLO first'`.
fn show(f: &Frame) -> String {
    if f.version == 0 {
        let code = f.code().map_or("?", |c| c.name());
        return format!("v0 {code} '{}'", f.text_lossy());
    }
    match Message::decode(f) {
        Ok(Message::Ack(a)) => format!("v1 ACK #{} '{}' g{}", a.request_id, a.detail, a.generation),
        Ok(Message::Nack(n)) => format!(
            "v1 NACK #{} {} '{}'",
            n.request_id,
            n.reason().as_str_name().trim_start_matches("NACK_REASON_"),
            n.detail
        ),
        Ok(m) => format!("v1 {}", m.code().name()),
        Err(e) => format!("v1 undecodable: {e}"),
    }
}

/// One line per action, so that tables can say what they expect.
fn describe(a: &Action) -> String {
    match a {
        Action::Reply(f) => format!("queue {}", show(f)),
        Action::ReplyNow(f) => format!("now {}", show(f)),
        Action::Farewell(f) => format!("farewell {}", show(f)),
        Action::Count(r) => format!("count {r}"),
        Action::AgentReport(r) => format!("report {r:?}"),
        Action::RecordHello {
            dialect,
            config_address,
            readers,
            first,
        } => format!(
            "hello v{} addr={config_address:?} readers={readers:?} first={first}",
            dialect.version()
        ),
        Action::MarkApplied { sha256 } => format!("mark {}", &sha256[..8]),
        Action::Welcome { request_id } => format!("welcome #{request_id}"),
        Action::DeliverPending => "deliver".into(),
        Action::DeliverInBand => "in-band".into(),
        Action::CheckMsgAddress { dialect, text } => {
            format!("check-address v{} '{text}'", dialect.version())
        }
        Action::Swipe(s, waited) => {
            format!("swipe #{} {} waited {waited:?}", s.request_id, s.event_id)
        }
        Action::PushOutcome { result, elapsed } => format!("outcome {result:?} {elapsed:?}"),
        Action::ConfigAnswered { result } => format!("answered {result:?}"),
        Action::Close(Close::Ended) => "close".into(),
        Action::Close(Close::Refused(t)) => format!("close refused: {t}"),
        Action::Close(Close::Read(e)) => format!("close read: {e}"),
    }
}

fn drain(m: &mut LinkMachine) -> Vec<String> {
    std::iter::from_fn(|| m.poll_action())
        .map(|a| describe(&a))
        .collect()
}

/// Each expected line is a prefix of the actual one (long NACK texts are cut short).
fn assert_actions(case: &str, got: &[String], want: &[&str]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{case}: got {got:#?}, want {want:#?}"
    );
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.starts_with(w),
            "{case}: got {g:?}, want {w:?}\nall: {got:#?}"
        );
    }
}

/// A machine that has said HELLO in `dialect` (with the driver's answers fed back).
fn after_hello(version: u8) -> LinkMachine {
    let mut m = LinkMachine::new(params(true));
    let now = Instant::now();
    if version == 0 {
        m.handle_frame(v0(Code::Hello, ID, b"hello"), now);
        drain(&mut m);
        m.in_band(None, now);
    } else {
        m.handle_frame(v1(hello1(1), ID), now);
        drain(&mut m);
        m.welcome(1, 0);
    }
    drain(&mut m);
    assert!(m.hello().is_some());
    m
}

/// Rows: a description, the state before (None: a fresh link; Some(v): after an
/// accepted HELLO in version v), whether the machine is known, the frames, and the
/// actions expected from the last frame.
#[test]
fn frame_rules() {
    let not_me = "now v0 NACK 'frame names machine 4 but the certificate belongs to machine 3";
    type Row<'a> = (&'a str, Option<u8>, bool, Vec<Frame>, Vec<&'a str>);
    let rows: Vec<Row> = vec![
        // HELLO.
        (
            "v0 HELLO from a known machine: recorded, answered in-band",
            None,
            true,
            vec![v0(Code::Hello, ID, b"hello")],
            vec!["hello v0 addr=None readers=[] first=true", "in-band"],
        ),
        (
            "v0 HELLO from an unknown machine: NACK and close",
            None,
            false,
            vec![v0(Code::Hello, ID, b"hello")],
            vec![
                "now v0 NACK 'machine 3 is not known to this SCM'",
                "close refused: machine 3 is not known",
            ],
        ),
        (
            "v1 HELLO from a known machine: recorded, hash marked, welcomed",
            None,
            true,
            vec![v1(hello1(1), ID)],
            vec![
                "hello v1 addr=Some(\"127.0.0.5:9301\") readers=[\"door\"] first=true",
                "mark abababab",
                "welcome #1",
            ],
        ),
        (
            "v1 HELLO from an unknown machine: NACK UNKNOWN_MACHINE and close",
            None,
            false,
            vec![v1(hello1(1), ID)],
            vec![
                "now v1 NACK #1 UNKNOWN_MACHINE 'machine 3 is not known",
                "close refused",
            ],
        ),
        (
            "a second HELLO on the link is recorded, not announced again",
            Some(1),
            true,
            vec![v1(hello1(7), ID)],
            vec![
                "hello v1 addr=Some(\"127.0.0.5:9301\") readers=[\"door\"] first=false",
                "mark",
                "welcome #7",
            ],
        ),
        // The certificate's machine id.
        (
            "v0 HELLO naming another machine: NACK and close",
            None,
            true,
            vec![v0(Code::Hello, 4, b"hello")],
            vec![
                "count wrong_machine_id",
                not_me,
                "close refused: frame names machine 4",
            ],
        ),
        (
            "v1 HELLO naming another machine: NACK WRONG_MACHINE_ID with its id, close",
            None,
            true,
            vec![v1(hello1(5), 4)],
            vec![
                "count wrong_machine_id",
                "now v1 NACK #5 WRONG_MACHINE_ID 'frame names machine 4",
                "close refused",
            ],
        ),
        (
            "v1 MSG naming another machine: NACK, the link stays",
            Some(1),
            true,
            vec![v1(msg1(2), 4)],
            vec!["count wrong_machine_id", "now v1 NACK #2 WRONG_MACHINE_ID"],
        ),
        // Anything before HELLO.
        (
            "v1 MSG before HELLO",
            None,
            true,
            vec![v1(msg1(2), ID)],
            vec!["queue v1 NACK #2 NOT_ALLOWED 'say HELLO first'"],
        ),
        (
            "v1 HEARTBEAT before HELLO",
            None,
            true,
            vec![v1(heartbeat1(2), ID)],
            vec!["queue v1 NACK #2 NOT_ALLOWED 'say HELLO first'"],
        ),
        (
            "v1 SWIPE before HELLO never reaches the bridge",
            None,
            true,
            vec![v1(swipe1(2), ID)],
            vec!["queue v1 NACK #2 NOT_ALLOWED 'say HELLO first'"],
        ),
        (
            "v1 CONFIG before HELLO",
            None,
            true,
            vec![v1(config1(2), ID)],
            vec!["queue v1 NACK #2 NOT_ALLOWED 'say HELLO first'"],
        ),
        // MSG address checks.
        (
            "v0 MSG on a new connection: checked against the last HELLO's address",
            None,
            true,
            vec![v0(Code::Msg, ID, b"hi")],
            vec!["check-address v0 'hi'"],
        ),
        (
            "v0 MSG after HELLO on this link: ACK at once",
            Some(0),
            true,
            vec![v0(Code::Msg, ID, b"hi")],
            vec!["now v0 ACK 'OK'"],
        ),
        (
            "v1 MSG after HELLO: ACK queued with the burst",
            Some(1),
            true,
            vec![v1(msg1(2), ID)],
            vec!["queue v1 ACK #2 'OK' g0"],
        ),
        (
            "v1 HEARTBEAT after HELLO",
            Some(1),
            true,
            vec![v1(heartbeat1(3), ID)],
            vec!["queue v1 ACK #3 'OK' g0"],
        ),
        (
            "v1 SWIPE after HELLO goes to the bridge",
            Some(1),
            true,
            vec![v1(swipe1(4), ID)],
            vec!["swipe #4 e1"],
        ),
        // Requests only the SCM sends.
        (
            "v0 CONFIG from a machine",
            None,
            true,
            vec![v0(Code::Config, ID, b"x")],
            vec!["now v0 NACK 'CONFIG is not accepted from machines'"],
        ),
        (
            "v0 RESET from a machine",
            Some(0),
            true,
            vec![v0(Code::Reset, ID, b"")],
            vec!["now v0 NACK 'RESET is not accepted from machines'"],
        ),
        (
            "v1 CONFIG after HELLO",
            Some(1),
            true,
            vec![v1(config1(6), ID)],
            vec!["queue v1 NACK #6 NOT_ALLOWED 'CONFIG is not accepted from machines'"],
        ),
        // Unknown versions and codes: NACK in the sender's version, the link stays.
        (
            "unknown code in v0",
            None,
            true,
            vec![raw(0, 9, ID)],
            vec![
                "count unknown_code",
                "now v0 NACK 'unknown code 9 in version 0'",
            ],
        ),
        (
            "SWIPE is an unknown code in v0",
            Some(0),
            true,
            vec![raw(0, 4, ID)],
            vec![
                "count unknown_code",
                "now v0 NACK 'unknown code 4 in version 0'",
            ],
        ),
        (
            "unknown code in v1",
            Some(1),
            true,
            vec![raw(1, 9, ID)],
            vec![
                "count unknown_code",
                "now v1 NACK #0 UNKNOWN_CODE 'unknown code 9 in version 1'",
            ],
        ),
        (
            "unknown version",
            None,
            true,
            vec![raw(7, 0, ID)],
            vec![
                "count unknown_version",
                "now v0 NACK 'unsupported protocol version 7; supported versions: 0, 1'",
            ],
        ),
        (
            "v1 payload that is not a valid message",
            Some(1),
            true,
            vec![Frame::new(1, Code::Msg, ID, vec![0xff, 0xff, 0xff]).unwrap()],
            vec!["now v1 NACK #0 MALFORMED 'cannot decode the payload"],
        ),
        // Answers are never answered.
        (
            "v0 ACK before HELLO",
            None,
            true,
            vec![v0(Code::Ack, ID, b"OK")],
            vec![],
        ),
        (
            "v0 NACK after HELLO",
            Some(0),
            true,
            vec![v0(Code::Nack, ID, b"no")],
            vec![],
        ),
        (
            "v1 ACK before HELLO",
            None,
            true,
            vec![v1(Message::ack(9, "OK", 0), ID)],
            vec![],
        ),
        (
            "v1 NACK after HELLO",
            Some(1),
            true,
            vec![v1(Message::nack(9, NackReason::Malformed, "x"), ID)],
            vec![],
        ),
        (
            "a burst of v1 requests: each answered in order",
            Some(1),
            true,
            vec![v1(msg1(2), ID), v1(heartbeat1(3), ID)],
            vec!["queue v1 ACK #3 'OK' g0"],
        ),
    ];
    for (case, before, known, frames, want) in rows {
        let mut m = match before {
            None => LinkMachine::new(params(known)),
            Some(v) => after_hello(v),
        };
        let mut got = Vec::new();
        for f in frames {
            m.handle_frame(f, Instant::now());
            got = drain(&mut m);
        }
        assert_actions(case, &got, &want);
    }
}

#[test]
fn v0_msg_address_check() {
    let rows = [
        (
            "same IP, other port",
            Some("10.0.0.5:1234"),
            "now v0 ACK 'OK'",
        ),
        (
            "other IP",
            Some("10.0.0.9:4000"),
            "now v0 NACK 'no HELLO from this machine at this address; say HELLO first'",
        ),
        (
            "never said HELLO",
            None,
            "now v0 NACK 'no HELLO from this machine at this address",
        ),
    ];
    for (case, last, want) in rows {
        let mut m = LinkMachine::new(params(true));
        m.handle_frame(v0(Code::Msg, ID, b"hi"), Instant::now());
        assert_actions(case, &drain(&mut m), &["check-address v0 'hi'"]);
        m.msg_address_checked(Dialect::V0, "hi", last);
        assert_actions(case, &drain(&mut m), &[want]);
    }
}

#[test]
fn v1_hello_is_acked_with_the_desired_generation_before_delivery() {
    let mut m = LinkMachine::new(params(true));
    m.handle_frame(v1(hello1(1), ID), Instant::now());
    drain(&mut m);
    m.welcome(1, 4);
    assert_actions(
        "welcome",
        &drain(&mut m),
        &["now v1 ACK #1 'welcome' g4", "deliver"],
    );
    assert_eq!(m.hello(), Some(Dialect::V1));
}

#[test]
fn swipe_verdicts_are_queued_answers() {
    let mut m = after_hello(1);
    m.swipe_verdict(4, SwipeVerdict::Ack("forwarded".into()));
    m.swipe_verdict(
        5,
        SwipeVerdict::Nack(NackReason::InvalidCard, "bad card".into()),
    );
    assert_actions(
        "verdicts",
        &drain(&mut m),
        &[
            "queue v1 ACK #4 'forwarded' g0",
            "queue v1 NACK #5 INVALID_CARD 'bad card'",
        ],
    );
}

#[test]
fn read_errors_and_end_of_stream() {
    let too_long = || {
        ReadError::Frame(FrameError::DataTooLong {
            declared: 60000,
            max: 4096,
        })
    };
    let header = |version| Header::parse(&[version, 1, ID as u8, 0, 0x60, 0xea]);
    type Event = Box<dyn Fn(&mut LinkMachine)>;
    let rows: Vec<(&str, Event, Vec<&str>)> = vec![
        (
            "oversize v1 frame: NACK MALFORMED in its version, then close",
            Box::new(move |m| m.handle_error(too_long(), header(1), Instant::now())),
            vec![
                "count oversize",
                "farewell v1 NACK #0 MALFORMED 'frame declares 60000 data bytes",
                "close refused: frame declares 60000",
            ],
        ),
        (
            "oversize v0 frame",
            Box::new(move |m| m.handle_error(too_long(), header(0), Instant::now())),
            vec![
                "count oversize",
                "farewell v0 NACK 'frame declares",
                "close refused",
            ],
        ),
        (
            "oversize frame with no header yet: version 0, the certificate's id",
            Box::new(move |m| m.handle_error(too_long(), None, Instant::now())),
            vec!["count oversize", "farewell v0 NACK", "close refused"],
        ),
        (
            "stalled frame: counted, closed without an answer",
            Box::new(|m| {
                let e = ReadError::Stalled {
                    have: 3,
                    need: 6,
                    after: Duration::from_secs(5),
                };
                m.handle_error(e, None, Instant::now())
            }),
            vec!["count stall", "close read: peer stalled mid-frame"],
        ),
        (
            "idle link: closed, not counted",
            Box::new(|m| {
                m.handle_error(
                    ReadError::Idle(Duration::from_secs(60)),
                    None,
                    Instant::now(),
                )
            }),
            vec!["close read: no frame started within the idle timeout"],
        ),
        (
            "end of stream",
            Box::new(|m| m.handle_end(Instant::now())),
            vec!["close"],
        ),
    ];
    for (case, event, want) in rows {
        let mut m = after_hello(1);
        event(&mut m);
        assert_actions(case, &drain(&mut m), &want);
    }
}

fn generation() -> Generation {
    Generation {
        machine_id: ID,
        generation: 3,
        content: b"volume=3\n".to_vec(),
        sha256: crate::state::sha256_hex(b"volume=3\n"),
    }
}

/// A v0 machine said HELLO and a configuration was waiting: the CONFIG went out as the
/// answer at `sent`.
fn in_band_sent() -> (LinkMachine, Instant) {
    let mut m = LinkMachine::new(params(true));
    m.handle_frame(v0(Code::Hello, ID, b"hello"), Instant::now());
    assert_actions(
        "hello",
        &drain(&mut m),
        &["hello v0 addr=None readers=[] first=true", "in-band"],
    );
    let sent = Instant::now();
    m.in_band(Some(&generation()), sent);
    let config: Vec<_> = std::iter::from_fn(|| m.poll_action()).collect();
    match &config[..] {
        [Action::ReplyNow(f)] => assert_eq!(
            f.to_bytes().unwrap().as_ref(),
            b"\x00\x02\x03\x00\x09\x00volume=3\n"
        ),
        a => panic!("{a:?}"),
    }
    assert!(m.awaits_answer());
    (m, sent)
}

#[tokio::test(start_paused = true)]
async fn in_band_config_answers_are_recorded_with_their_time() {
    let after = Duration::from_millis(250);
    type Event = Box<dyn Fn(&mut LinkMachine)>;
    let rows: Vec<(&str, Event, Vec<String>)> = vec![
        (
            "ACK: recorded, the link stays",
            Box::new(|m| m.handle_frame(v0(Code::Ack, ID, b"stored"), Instant::now())),
            vec![format!(
                "outcome Ack {{ generation: 3, detail: \"stored\" }} Some({after:?})"
            )],
        ),
        (
            "NACK: recorded, the link stays",
            Box::new(|m| m.handle_frame(v0(Code::Nack, ID, b"bad"), Instant::now())),
            vec![format!(
                "outcome Nack {{ generation: 3, detail: \"bad\" }} Some({after:?})"
            )],
        ),
        (
            "another frame instead of the answer: unreachable, closed",
            Box::new(|m| m.handle_frame(v0(Code::Msg, ID, b"hi"), Instant::now())),
            vec![
                "outcome Unreachable { generation: 3, detail: \"unexpected answer code 1\" }"
                    .into(),
                "close".into(),
            ],
        ),
        (
            "an answer naming another machine: unreachable, closed",
            Box::new(|m| m.handle_frame(v0(Code::Ack, 9, b"OK"), Instant::now())),
            vec![
                "outcome Unreachable { generation: 3, detail: \"answer names machine 9 instead of 3\" }"
                    .into(),
                "close".into(),
            ],
        ),
        (
            "the machine closes the link",
            Box::new(|m| m.handle_end(Instant::now())),
            vec![
                "outcome Unreachable { generation: 3, detail: \"machine closed the link before answering the in-band CONFIG\" }".into(),
                "close".into(),
            ],
        ),
        (
            "no answer in time: unreachable, closed, not counted as a stall",
            Box::new(|m| {
                m.handle_error(ReadError::Idle(Duration::from_secs(2)), None, Instant::now())
            }),
            vec![
                "outcome Unreachable { generation: 3, detail: \"no frame started within the idle timeout of 2s\" }".into(),
                "close".into(),
            ],
        ),
    ];
    for (case, event, want) in rows {
        let (mut m, _sent) = in_band_sent();
        assert_eq!(
            m.read_limits(Instant::now()),
            (Some(Duration::from_secs(2)), Duration::from_secs(2)),
            "{case}: the answer is awaited for push_reply"
        );
        tokio::time::advance(after).await;
        event(&mut m);
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_actions(case, &drain(&mut m), &want);
        assert!(!m.awaits_answer(), "{case}");
        // Back to the link's timeouts; the idle one counts from the last frame.
        let (idle, stall) = m.read_limits(Instant::now());
        assert_eq!(stall, Duration::from_secs(5), "{case}");
        let idle = idle.expect("an idle timeout");
        assert!(
            idle > Duration::from_secs(59) && idle <= Duration::from_secs(60),
            "{case}: {idle:?}"
        );
    }
}

#[test]
fn in_band_after_the_answer_the_link_is_ordinary_again() {
    let (mut m, _) = in_band_sent();
    m.handle_frame(v0(Code::Ack, ID, b"OK"), Instant::now());
    drain(&mut m);
    m.handle_frame(v0(Code::Msg, ID, b"hi"), Instant::now());
    assert_actions("msg", &drain(&mut m), &["now v0 ACK 'OK'"]);
}

#[test]
fn in_band_without_a_waiting_config_is_a_plain_ack() {
    let mut m = LinkMachine::new(params(true));
    m.handle_frame(v0(Code::Hello, ID, b"hello"), Instant::now());
    drain(&mut m);
    m.in_band(None, Instant::now());
    assert_actions("none", &drain(&mut m), &["now v0 ACK 'OK'"]);
    assert!(!m.awaits_answer());
}

#[test]
fn in_band_config_too_large_for_a_frame_is_nacked_and_hello_acked() {
    let mut m = LinkMachine::new(params(true));
    m.handle_frame(v0(Code::Hello, ID, b"hello"), Instant::now());
    drain(&mut m);
    let mut g = generation();
    g.content = vec![b'x'; 70_000];
    m.in_band(Some(&g), Instant::now());
    assert_actions(
        "too large",
        &drain(&mut m),
        &[
            "outcome Nack { generation: 3, detail: \"cannot be framed: ",
            "now v0 ACK 'OK'",
        ],
    );
    assert!(!m.awaits_answer());
}

#[test]
fn actions_reuse_one_queue() {
    let mut m = after_hello(1);
    for rid in 0..100 {
        m.handle_frame(v1(swipe1(rid), ID), Instant::now());
        assert!(matches!(m.poll_action(), Some(Action::Swipe(..))));
        m.swipe_verdict(rid, SwipeVerdict::Ack("ok".into()));
        assert!(matches!(m.poll_action(), Some(Action::Reply(_))));
        assert!(m.poll_action().is_none());
    }
    assert!(
        m.actions.capacity() <= 8,
        "no growth per frame: {}",
        m.actions.capacity()
    );
}

/// A version-1 machine is up and generation 3 went out over its link as CONFIG #70.
fn link_config_sent() -> LinkMachine {
    let mut m = after_hello(1);
    assert!(m.takes_config());
    m.send_config(&generation(), 70, Instant::now());
    let sent: Vec<_> = std::iter::from_fn(|| m.poll_action()).collect();
    match &sent[..] {
        [Action::ReplyNow(f)] => match Message::decode(f) {
            Ok(Message::Config(c)) => {
                assert_eq!((c.request_id, c.generation), (70, 3));
                assert_eq!(c.content, b"volume=3\n");
                assert_eq!(hex::encode(&c.sha256), generation().sha256);
            }
            m => panic!("{m:?}"),
        },
        a => panic!("{a:?}"),
    }
    assert!(
        m.awaits_answer() && !m.takes_config(),
        "one CONFIG at a time"
    );
    m
}

#[test]
fn a_config_goes_over_a_version_1_link_only() {
    let mut before = LinkMachine::new(params(true));
    assert!(!before.takes_config(), "no HELLO yet");
    before.send_config(&generation(), 1, Instant::now());
    assert_actions(
        "before HELLO",
        &drain(&mut before),
        &["answered Unreachable { generation: 3, detail: \"the machine's link cannot take"],
    );
    assert!(!before.awaits_answer());
    assert!(
        !after_hello(0).takes_config(),
        "version 0 gets CONFIG in-band only"
    );
    let mut busy = link_config_sent();
    busy.send_config(&generation(), 71, Instant::now());
    assert_actions(
        "a second one while the first waits",
        &drain(&mut busy),
        &["answered Unreachable"],
    );
    let mut big = after_hello(1);
    let mut g = generation();
    g.content = vec![b'x'; 70_000];
    big.send_config(&g, 2, Instant::now());
    assert_actions(
        "too large for a frame",
        &drain(&mut big),
        &["answered Nack { generation: 3, detail: \"cannot be framed"],
    );
    assert!(big.takes_config(), "nothing waits after it");
}

#[test]
fn the_answer_to_a_config_over_the_link_is_matched_by_request_id_among_other_frames() {
    let ack = |rid| v1(Message::ack(rid, "stored 9 bytes as generation 3", 3), ID);
    let stale = v1(
        Message::stale(70, 5, "generation 3 is older than the stored generation 5"),
        ID,
    );
    let rows: Vec<(&str, Vec<Frame>, Vec<&str>)> = vec![
        (
            "the ACK",
            vec![ack(70)],
            vec!["answered Ack { generation: 3, detail: \"stored 9 bytes"],
        ),
        (
            "a swipe and a heartbeat first: ordinary frames, then the ACK",
            vec![v1(swipe1(8), ID), v1(heartbeat1(9), ID), ack(70)],
            vec![
                "swipe #8 e1",
                "queue v1 ACK #9 'OK'",
                "answered Ack { generation: 3",
            ],
        ),
        (
            "a late answer to an earlier CONFIG is not this one's",
            vec![ack(69), ack(70)],
            vec!["answered Ack { generation: 3"],
        ),
        (
            "a STALE NACK is a final NACK naming the stored generation",
            vec![stale],
            vec![
                "answered Nack { generation: 3, detail: \"generation 3 is older than the stored generation 5 (NACK_REASON_STALE",
            ],
        ),
        (
            "an answer naming another machine is refused like any frame",
            vec![v1(Message::ack(70, "x", 3), ID + 1), ack(70)],
            vec![
                "count wrong_machine_id",
                "now v1 NACK #70 WRONG_MACHINE_ID",
                "answered Ack",
            ],
        ),
    ];
    for (case, frames, want) in rows {
        let mut m = link_config_sent();
        for f in frames {
            m.handle_frame(f, Instant::now());
        }
        assert_actions(case, &drain(&mut m), &want);
        assert!(m.takes_config(), "{case}: the link takes the next CONFIG");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_config_over_the_link_is_pending_and_the_link_goes_on() {
    let mut m = link_config_sent();
    // The read's idle timeout ends when the answer is due, not a minute later.
    assert_eq!(
        m.read_limits(Instant::now()),
        (Some(Duration::from_secs(2)), Duration::from_secs(5))
    );
    tokio::time::advance(Duration::from_millis(1_500)).await;
    assert_eq!(
        m.read_limits(Instant::now()),
        (Some(Duration::from_millis(500)), Duration::from_secs(5))
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    m.handle_error(
        ReadError::Idle(Duration::from_millis(500)),
        None,
        Instant::now(),
    );
    assert_actions(
        "no answer in push_reply",
        &drain(&mut m),
        &[
            "answered Unreachable { generation: 3, detail: \"no answer to the CONFIG over the link within 2000 ms",
        ],
    );
    assert!(m.takes_config(), "the link stays usable");
    assert_eq!(
        m.read_limits(Instant::now()),
        (Some(Duration::from_secs(58)), Duration::from_secs(5)),
        "the idle timeout counts from the last frame, not from the unanswered CONFIG"
    );
    // The answer that comes after all is an ordinary, unanswered frame.
    m.handle_frame(v1(Message::ack(70, "stored", 3), ID), Instant::now());
    assert_actions("late ACK", &drain(&mut m), &[]);
    // The link ending or failing with a CONFIG on its way: pending, and closed.
    let mut ended = link_config_sent();
    ended.handle_end(Instant::now());
    assert_actions(
        "end",
        &drain(&mut ended),
        &[
            "answered Unreachable { generation: 3, detail: \"machine closed the link before answering the CONFIG",
            "close",
        ],
    );
    let mut failed = link_config_sent();
    failed.handle_error(
        ReadError::Stalled {
            have: 3,
            need: 6,
            after: Duration::from_secs(5),
        },
        None,
        Instant::now(),
    );
    assert_actions(
        "stall",
        &drain(&mut failed),
        &[
            "answered Unreachable { generation: 3, detail: \"peer stalled",
            "count stall",
            "close read",
        ],
    );
}

#[test]
fn a_version_0_link_can_be_closed_once_the_in_band_config_is_answered() {
    for (close, want) in [
        (false, vec!["outcome Ack"]),
        (true, vec!["outcome Ack", "close"]),
    ] {
        let mut m = LinkMachine::new(Params {
            close_after_in_band: close,
            ..params(true)
        });
        m.handle_frame(v0(Code::Hello, ID, b"hello"), Instant::now());
        drain(&mut m);
        m.in_band(Some(&generation()), Instant::now());
        drain(&mut m);
        m.handle_frame(v0(Code::Ack, ID, b"OK"), Instant::now());
        assert_actions(
            &format!("close_after_in_band={close}"),
            &drain(&mut m),
            &want,
        );
    }
}

/// Seen in the container scenario of an agent cut off from the network: a CONFIG retried
/// every few seconds restarted the read's idle timeout each time, so the dead link was
/// never closed and the push never reached the agent's next link.
#[tokio::test(start_paused = true)]
async fn configs_retried_over_a_silent_link_do_not_keep_it_open_past_its_idle_timeout() {
    let mut m = link_config_sent();
    let mut sent = 0;
    loop {
        let (idle, _) = m.read_limits(Instant::now());
        let idle = idle.expect("an idle timeout");
        tokio::time::advance(idle).await;
        m.handle_error(ReadError::Idle(idle), None, Instant::now());
        let actions = drain(&mut m);
        if actions.iter().any(|a| a.starts_with("close")) {
            assert!(
                actions.iter().any(|a| a.contains("idle timeout of 60s")),
                "closed for the link's idle timeout: {actions:?}"
            );
            break;
        }
        assert!(
            m.takes_config(),
            "retry {sent}: the link takes the retried CONFIG"
        );
        assert!(sent < 40, "the silent link was never closed");
        sent += 1;
        let at = Instant::now();
        m.send_config(&generation(), 70 + sent, at);
        drain(&mut m);
    }
    assert!(
        sent >= 25,
        "about 60 s of 2 s answer timeouts before the close ({sent})"
    );
}
