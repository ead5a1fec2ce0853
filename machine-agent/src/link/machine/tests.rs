//! The agent's link rules against the state machine alone, with tokio's paused clock
//! where time matters.

use super::*;
use scm_proto::Code;

const ID: u16 = 7;

fn params() -> Params {
    Params {
        machine_id: ID,
        config_port: 9301,
        config_address: "127.0.0.9:9301".into(),
        heartbeat: Duration::from_secs(10),
        reply: Duration::from_secs(3),
        stall: Duration::from_secs(2),
        readers: vec!["door".into()],
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Send(f) => match Message::decode(f) {
            Ok(m) => format!("send {} #{}", m.code().name(), m.request_id()),
            Err(e) => format!("send undecodable {e}"),
        },
        Action::Established { desired } => format!("established g{desired}"),
        Action::SendSwipes => "swipes".into(),
        Action::Answered(a) => format!("answered #{} ok={}", a.request_id, a.ok),
        Action::Apply(f) => format!("apply code {} #{}", f.code, f.id),
        Action::Close(e) => format!("close {e}"),
    }
}

fn drain(l: &mut AgentLink) -> Vec<String> {
    std::iter::from_fn(|| l.poll_action())
        .map(|a| describe(&a))
        .collect()
}

fn assert_actions(case: &str, got: &[String], want: &[&str]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{case}: got {got:#?}, want {want:#?}"
    );
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w), "{case}: got {g:?}, want {w:?}");
    }
}

fn frame(m: Message) -> Frame {
    m.to_frame(ID).unwrap()
}

fn up() -> AgentLink {
    let mut l = AgentLink::new(params(), None);
    drain(&mut l);
    l.handle_frame(frame(Message::ack(1, "welcome", 4)), Instant::now());
    assert_actions("up", &drain(&mut l), &["established g4", "swipes"]);
    assert!(l.is_up());
    l
}

#[test]
fn hello_carries_what_the_agent_holds() {
    let applied = Applied {
        generation: 2,
        sha256: [9; 32],
    };
    let mut l = AgentLink::new(params(), Some(applied));
    match l.poll_action() {
        Some(Action::Send(f)) => match Message::decode(&f).unwrap() {
            Message::Hello(h) => {
                assert_eq!(
                    (h.request_id, h.config_port, h.applied_generation),
                    (1, 9301, 2)
                );
                assert_eq!(h.applied_sha256, vec![9; 32]);
                assert_eq!(h.readers, vec!["door".to_string()]);
                assert_eq!(f.id, ID);
            }
            m => panic!("{m:?}"),
        },
        a => panic!("{a:?}"),
    }
    assert!(l.poll_action().is_none());
    assert_eq!(
        l.read_limits(),
        (Some(Duration::from_secs(3)), Duration::from_secs(2))
    );
    assert_eq!(
        l.poll_timeout(),
        None,
        "the read's idle timeout bounds the HELLO"
    );
}

#[test]
fn answers_to_hello() {
    type Event = Box<dyn Fn(&mut AgentLink)>;
    let rows: Vec<(&str, Event, &str)> = vec![
        (
            "NACK: refused with its reason",
            Box::new(|l| {
                let n = Message::nack(1, NackReason::UnknownMachine, "who are you");
                l.handle_frame(frame(n), Instant::now())
            }),
            "close the SCM refused HELLO: who are you (NACK_REASON_UNKNOWN_MACHINE)",
        ),
        (
            "ACK of another request",
            Box::new(|l| l.handle_frame(frame(Message::ack(5, "x", 0)), Instant::now())),
            "close the SCM refused HELLO: unexpected answer ACK",
        ),
        (
            "a version-0 answer",
            Box::new(|l| {
                let f = scm_proto::text_frame(Code::Nack, ID, "go away");
                l.handle_frame(f, Instant::now())
            }),
            "close the SCM refused HELLO: unexpected answer: go away",
        ),
        (
            "the SCM closes the connection (a refused certificate in TLS 1.3)",
            Box::new(|l| l.handle_end()),
            "close the SCM refused HELLO: connection closed before the answer to HELLO",
        ),
        (
            "no answer in time",
            Box::new(|l| l.handle_error(ReadError::Idle(Duration::from_secs(3)))),
            "close the SCM refused HELLO: no answer to HELLO (no frame started",
        ),
    ];
    for (case, event, want) in rows {
        let mut l = AgentLink::new(params(), None);
        drain(&mut l);
        event(&mut l);
        assert_actions(case, &drain(&mut l), &[want]);
        assert!(!l.is_up(), "{case}");
    }
}

#[test]
fn nothing_is_sent_before_the_hello_is_answered() {
    let mut l = AgentLink::new(params(), None);
    drain(&mut l);
    l.swipes_due();
    l.handle_timeout(Instant::now() + Duration::from_secs(60));
    assert!(drain(&mut l).is_empty());
}

#[tokio::test(start_paused = true)]
async fn heartbeats_when_quiet_and_the_link_is_lost_without_an_answer() {
    let mut l = up();
    let t0 = Instant::now();
    assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    tokio::time::advance(Duration::from_secs(10)).await;
    l.handle_timeout(Instant::now());
    assert_actions("first heartbeat", &drain(&mut l), &["send HEARTBEAT #2"]);
    // Now the answer's deadline comes first.
    assert_eq!(l.poll_timeout(), Some(t0 + Duration::from_secs(13)));
    l.handle_frame(frame(Message::ack(2, "OK", 0)), Instant::now());
    let answered: Vec<_> = std::iter::from_fn(|| l.poll_action()).collect();
    let [Action::Answered(a)] = <[Action; 1]>::try_from(answered).unwrap() else {
        panic!()
    };
    l.answered(a, false);
    assert_eq!(
        l.poll_timeout(),
        Some(t0 + Duration::from_secs(20)),
        "answered"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    l.handle_timeout(Instant::now());
    assert_actions("second heartbeat", &drain(&mut l), &["send HEARTBEAT #3"]);
    tokio::time::advance(Duration::from_secs(3)).await;
    l.handle_timeout(Instant::now());
    assert_actions(
        "unanswered",
        &drain(&mut l),
        &["close link to the SCM lost: no answer from the SCM in time"],
    );
}

#[tokio::test(start_paused = true)]
async fn one_heartbeat_at_a_time_and_a_nack_does_not_answer_it() {
    let mut l = up();
    tokio::time::advance(Duration::from_secs(10)).await;
    l.handle_timeout(Instant::now());
    assert_actions("heartbeat", &drain(&mut l), &["send HEARTBEAT #2"]);
    l.handle_frame(
        frame(Message::nack(2, NackReason::NotAllowed, "no")),
        Instant::now(),
    );
    let Some(Action::Answered(a)) = l.poll_action() else {
        panic!()
    };
    l.answered(a, false);
    tokio::time::advance(Duration::from_millis(2999)).await;
    l.handle_timeout(Instant::now());
    assert!(drain(&mut l).is_empty(), "still waiting");
    tokio::time::advance(Duration::from_millis(1)).await;
    l.handle_timeout(Instant::now());
    assert_actions("lost", &drain(&mut l), &["close link to the SCM lost"]);
}

#[test]
fn answers_go_to_the_swipe_queue_first() {
    let rows: Vec<(&str, Message, bool, Vec<&str>)> = vec![
        (
            "a swipe's ACK frees a slot: more swipes can go",
            Message::ack(5, "forwarded", 0),
            true,
            vec!["swipes"],
        ),
        (
            "a swipe's NACK too",
            Message::nack(5, NackReason::InvalidCard, "bad"),
            true,
            vec!["swipes"],
        ),
        (
            "an ACK that matches nothing is ignored",
            Message::ack(99, "OK", 0),
            false,
            vec![],
        ),
    ];
    for (case, m, swipe, want) in rows {
        let mut l = up();
        l.handle_frame(frame(m), Instant::now());
        let Some(Action::Answered(a)) = l.poll_action() else {
            panic!("{case}")
        };
        l.answered(a, swipe);
        assert_actions(case, &drain(&mut l), &want);
    }
}

#[test]
fn once_up_frames_that_are_not_answers_are_ignored() {
    let mut l = up();
    let hb = Message::Heartbeat(v1::Heartbeat {
        request_id: 4,
        sent_at_unix_ms: 0,
        ..Default::default()
    });
    l.handle_frame(frame(hb), Instant::now());
    l.handle_frame(scm_proto::text_frame(Code::Ack, ID, "OK"), Instant::now());
    assert!(drain(&mut l).is_empty());
    l.swipes_due();
    assert_actions("swipes", &drain(&mut l), &["swipes"]);
}

#[test]
fn end_and_errors_once_up_lose_the_link() {
    let mut l = up();
    l.handle_end();
    assert_actions(
        "end",
        &drain(&mut l),
        &["close link to the SCM lost: the SCM closed the link"],
    );
    let mut l = up();
    l.handle_error(ReadError::Stalled {
        have: 2,
        need: 6,
        after: Duration::from_secs(2),
    });
    assert_actions(
        "stall",
        &drain(&mut l),
        &["close link to the SCM lost: peer stalled"],
    );
}

#[test]
fn request_ids_count_up_per_connection() {
    let mut l = up();
    assert_eq!((l.next_request_id(), l.next_request_id()), (2, 3));
    assert_eq!(AgentLink::new(params(), None).next_request_id(), 2);
}

#[test]
fn reconnect_backs_off_until_the_link_is_up() {
    let mut r = Reconnect::default();
    assert_eq!(
        (r.next_attempt(), r.next_attempt(), r.next_attempt()),
        (0, 1, 2)
    );
    r.established();
    assert_eq!(r.next_attempt(), 0);
}

#[test]
fn a_config_from_the_scm_on_the_link_is_stored_only_once_up_and_even_when_unreadable() {
    let config = Message::Config(v1::Config {
        request_id: 40,
        generation: 5,
        content: b"a=1\n".to_vec(),
        sha256: Vec::new(),
    });
    // Before the HELLO is answered a CONFIG is not an answer to it: refused, link closed.
    let mut l = AgentLink::new(params(), None);
    drain(&mut l);
    l.handle_frame(frame(config.clone()), Instant::now());
    assert_actions(
        "before up",
        &drain(&mut l),
        &["close the SCM refused HELLO: unexpected answer CONFIG"],
    );
    let rows: [(&str, Frame, &[&str]); 3] = [
        ("a CONFIG", frame(config), &["apply code 2 #7"]),
        (
            "an unreadable CONFIG still gets an answer",
            Frame::new(1, Code::Config, ID, &b"\xff\xff"[..]).unwrap(),
            &["apply code 2 #7"],
        ),
        (
            "for another machine: the store's checks NACK it",
            Message::Config(v1::Config {
                request_id: 41,
                generation: 6,
                ..Default::default()
            })
            .to_frame(ID + 1)
            .unwrap(),
            &["apply code 2 #8"],
        ),
    ];
    for (case, f, want) in rows {
        let mut l = up();
        l.handle_frame(f, Instant::now());
        assert_actions(case, &drain(&mut l), want);
        assert!(l.is_up(), "{case}: the link goes on");
    }
}

#[test]
fn the_hello_announces_the_config_port_address() {
    let l = AgentLink::new(params(), None);
    let mut l = l;
    let Some(Action::Send(f)) = l.poll_action() else {
        panic!("HELLO first")
    };
    let Ok(Message::Hello(h)) = Message::decode(&f) else {
        panic!("not a HELLO")
    };
    assert_eq!(
        (h.config_port, h.config_address.as_str()),
        (9301, "127.0.0.9:9301")
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeats_report_the_swipes_the_agent_refused_or_dropped() {
    let mut l = up();
    let r = Refusals {
        invalid: 3,
        queue_full: 1,
        expired: 2,
    };
    l.set_refusals(r);
    tokio::time::advance(Duration::from_secs(10)).await;
    l.handle_timeout(Instant::now());
    let Some(Action::Send(f)) = l.poll_action() else {
        panic!("a heartbeat")
    };
    let Ok(Message::Heartbeat(h)) = Message::decode(&f) else {
        panic!("not a heartbeat: {f}")
    };
    assert_eq!(
        (h.swipes_invalid, h.swipes_queue_full, h.swipes_expired),
        (3, 1, 2)
    );
    assert!(h.sent_at_unix_ms > 0, "stamped for the SCM's wait estimate");
}
