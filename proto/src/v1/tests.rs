//! Unit tests of the version-1 messages and [`Message`].

use bytes::Bytes;

use super::*;
use crate::frame::{Code, Frame, VERSION_0, VERSION_1};

/// One non-trivial value of every message, every field set.
fn every_message() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            request_id: 1,
            agent_version: "0.1.0".into(),
            config_port: 9301,
            applied_generation: 3,
            applied_sha256: vec![0xab; 32],
            readers: vec!["door".into(), "desk".into()],
            config_address: "10.0.0.5:9301".into(),
        }),
        Message::Msg(Msg {
            request_id: 2,
            text: "paper low".into(),
        }),
        Message::Config(Config {
            request_id: 3,
            generation: 4,
            content: b"volume=3\n".to_vec(),
            sha256: vec![0x11; 32],
        }),
        Message::Reset(Reset {
            request_id: 4,
            reason: "operator".into(),
        }),
        Message::Swipe(Swipe {
            request_id: 5,
            event_id: "e1".into(),
            reader_id: "door".into(),
            card: "12345678".into(),
            swiped_at_unix_ms: 1_767_225_600_000,
            ttl_ms: 10_000,
            sent_at_unix_ms: 1_767_225_600_002,
        }),
        Message::Heartbeat(Heartbeat {
            request_id: 6,
            sent_at_unix_ms: 1_767_225_600_123,
            ..Default::default()
        }),
        Message::ack(7, "stored", 4),
        Message::nack(8, NackReason::InvalidCard, "card has a space"),
    ]
}

#[test]
fn every_message_round_trips_through_a_frame() {
    let messages = every_message();
    let codes: Vec<Code> = messages.iter().map(Message::code).collect();
    assert_eq!(codes, Code::ALL, "one message per code, in code order");
    for (i, m) in messages.into_iter().enumerate() {
        let frame = m.to_frame(0x0102).expect("fits");
        assert_eq!(frame.version, VERSION_1);
        assert_eq!(frame.code(), Some(m.code()));
        assert_eq!(frame.id, 0x0102);
        assert!(!frame.data.is_empty(), "{i}: every field set, so not empty");
        // Through the wire bytes and the codec, too.
        let bytes = frame.to_bytes().expect("encodable");
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let decoded_frame =
            tokio_util::codec::Decoder::decode(&mut crate::frame::FrameCodec::default(), &mut buf)
                .expect("valid")
                .expect("complete");
        let back = Message::decode(&decoded_frame).expect("valid payload");
        assert_eq!(back, m);
        assert_eq!(back.request_id(), i as u64 + 1);
    }
}

#[test]
fn default_messages_encode_to_empty_payloads_and_decode_back() {
    let m = Message::Heartbeat(Heartbeat::default());
    let frame = m.to_frame(1).expect("fits");
    assert!(frame.data.is_empty());
    assert_eq!(Message::decode(&frame).expect("empty is valid proto3"), m);
}

#[test]
fn decode_refuses_other_versions() {
    let frame = Frame::v0(Code::Hello, 42, "hello").expect("short");
    let err = Message::decode(&frame).expect_err("v0");
    assert!(matches!(err, PayloadError::WrongVersion(0)), "{err:?}");
    assert_eq!(err.nack_reason(), NackReason::UnknownVersion);
    assert_eq!(err.to_string(), "expected a version-1 frame, got version 0");
    let v2 = Frame {
        version: 2,
        ..frame
    };
    assert!(matches!(
        Message::decode(&v2),
        Err(PayloadError::WrongVersion(2))
    ));
}

#[test]
fn decode_refuses_unknown_codes() {
    for code in [6u8, 42, 149, 152, 255] {
        let frame = Frame {
            version: VERSION_1,
            code,
            id: 1,
            data: Bytes::new(),
        };
        match Message::decode(&frame) {
            Err(e @ PayloadError::UnknownCode(c)) => {
                assert_eq!(c, code);
                assert_eq!(e.nack_reason(), NackReason::UnknownCode);
            }
            other => panic!("code {code}: expected UnknownCode, got {other:?}"),
        }
    }
}

#[test]
fn decode_refuses_garbage_protobuf() {
    // Field 1 as a varint whose continuation never ends; a length-delimited
    // field longer than the data; wire type 7 (invalid).
    let garbage: [&[u8]; 3] = [&[0x08, 0xff, 0xff], &[0x12, 0x10, b'a'], &[0x0f, 0x00]];
    for code in Code::ALL {
        for data in garbage {
            let frame =
                Frame::new(VERSION_1, code, 1, Bytes::copy_from_slice(data)).expect("short");
            match Message::decode(&frame) {
                Err(e @ PayloadError::Protobuf { code: c, .. }) => {
                    assert_eq!(c, code);
                    assert_eq!(e.nack_reason(), NackReason::Malformed);
                    let text = e.to_string();
                    assert!(
                        text.starts_with(&format!("{} payload is not a valid", code.name())),
                        "{text}"
                    );
                }
                other => panic!("{code} {data:?}: expected Protobuf error, got {other:?}"),
            }
        }
    }
}

#[test]
fn string_field_with_invalid_utf8_is_malformed() {
    // Msg.text (field 2) = 0xff.
    let frame = Frame::new(VERSION_1, Code::Msg, 1, vec![0x12, 0x01, 0xff]).expect("short");
    assert!(matches!(
        Message::decode(&frame),
        Err(PayloadError::Protobuf {
            code: Code::Msg,
            ..
        })
    ));
}

#[test]
fn ack_and_nack_helpers_echo_request_ids() {
    let swipe = Message::Swipe(Swipe {
        request_id: 77,
        ..Default::default()
    });
    let ack = swipe.ack_for("forwarded", 0);
    assert_eq!(ack, Message::ack(77, "forwarded", 0));
    assert_eq!((ack.code(), ack.request_id()), (Code::Ack, 77));
    let nack = swipe.nack_for(NackReason::Expired, "too late");
    match &nack {
        Message::Nack(n) => {
            assert_eq!(n.request_id, 77);
            assert_eq!(n.reason(), NackReason::Expired);
            assert_eq!(n.detail, "too late");
        }
        other => panic!("expected NACK, got {other:?}"),
    }
    assert_eq!(nack.code(), Code::Nack);
    let config = Message::Config(Config {
        request_id: 9,
        generation: 12,
        ..Default::default()
    });
    match config.ack_for("stored", 12) {
        Message::Ack(a) => assert_eq!(
            (a.request_id, a.generation, a.detail.as_str()),
            (9, 12, "stored")
        ),
        other => panic!("expected ACK, got {other:?}"),
    }
}

#[test]
fn unknown_nack_reason_values_are_tolerated() {
    // reason = 99, a value this version does not define.
    let frame = Frame::new(VERSION_1, Code::Nack, 1, vec![0x08, 0x05, 0x10, 99]).expect("short");
    match Message::decode(&frame).expect("unknown enum values are valid proto3") {
        Message::Nack(n) => {
            assert_eq!(n.request_id, 5);
            assert_eq!(n.reason, 99);
            assert_eq!(n.reason(), NackReason::Unspecified);
        }
        other => panic!("expected NACK, got {other:?}"),
    }
}

#[test]
fn nack_reason_numbers_are_fixed() {
    let expected = [
        (NackReason::Unspecified, 0, "NACK_REASON_UNSPECIFIED"),
        (NackReason::UnknownVersion, 1, "NACK_REASON_UNKNOWN_VERSION"),
        (NackReason::UnknownCode, 2, "NACK_REASON_UNKNOWN_CODE"),
        (
            NackReason::WrongMachineId,
            3,
            "NACK_REASON_WRONG_MACHINE_ID",
        ),
        (NackReason::Malformed, 4, "NACK_REASON_MALFORMED"),
        (NackReason::NotAllowed, 5, "NACK_REASON_NOT_ALLOWED"),
        (NackReason::StorageFailed, 6, "NACK_REASON_STORAGE_FAILED"),
        (NackReason::UnknownMachine, 7, "NACK_REASON_UNKNOWN_MACHINE"),
        (NackReason::Expired, 8, "NACK_REASON_EXPIRED"),
        (NackReason::InvalidCard, 9, "NACK_REASON_INVALID_CARD"),
        (NackReason::Busy, 10, "NACK_REASON_BUSY"),
        (NackReason::Stale, 11, "NACK_REASON_STALE"),
    ];
    for (reason, number, name) in expected {
        assert_eq!(reason as i32, number);
        assert_eq!(reason.as_str_name(), name);
        assert_eq!(NackReason::try_from(number), Ok(reason));
    }
    assert!(NackReason::try_from(12).is_err());
}

#[test]
fn field_numbers_are_fixed() {
    // Each field alone, encoded by hand as tag/value, decodes into the field
    // the .proto names: guards against renumbering.
    let hello = Hello::decode(
        &[
            0x08, 1, 0x12, 1, b'v', 0x18, 2, 0x20, 3, 0x2a, 1, 0xcc, 0x32, 1, b'r',
        ][..],
    )
    .expect("valid");
    assert_eq!(
        hello,
        Hello {
            request_id: 1,
            agent_version: "v".into(),
            config_port: 2,
            applied_generation: 3,
            applied_sha256: vec![0xcc],
            readers: vec!["r".into()],
            config_address: String::new(),
        }
    );
    let config =
        Config::decode(&[0x08, 1, 0x10, 2, 0x1a, 1, b'c', 0x22, 1, 0xdd][..]).expect("valid");
    assert_eq!(
        (
            config.request_id,
            config.generation,
            config.content,
            config.sha256
        ),
        (1, 2, b"c".to_vec(), vec![0xdd])
    );
    let swipe = Swipe::decode(
        &[
            0x08, 1, 0x12, 1, b'e', 0x1a, 1, b'r', 0x22, 1, b'c', 0x28, 5, 0x30, 6,
        ][..],
    )
    .expect("valid");
    assert_eq!(
        swipe,
        Swipe {
            request_id: 1,
            event_id: "e".into(),
            reader_id: "r".into(),
            card: "c".into(),
            swiped_at_unix_ms: 5,
            ttl_ms: 6,
            sent_at_unix_ms: 0,
        }
    );
    let hb = Heartbeat::decode(&[0x08, 1, 0x10, 2][..]).expect("valid");
    assert_eq!((hb.request_id, hb.sent_at_unix_ms), (1, 2));
    let msg = Msg::decode(&[0x08, 1, 0x12, 1, b't'][..]).expect("valid");
    assert_eq!((msg.request_id, msg.text.as_str()), (1, "t"));
    let reset = Reset::decode(&[0x08, 1, 0x12, 1, b'r'][..]).expect("valid");
    assert_eq!((reset.request_id, reset.reason.as_str()), (1, "r"));
    let ack = Ack::decode(&[0x08, 1, 0x12, 1, b'd', 0x18, 3][..]).expect("valid");
    assert_eq!(
        ack,
        Ack {
            request_id: 1,
            detail: "d".into(),
            generation: 3
        }
    );
    let nack = Nack::decode(&[0x08, 1, 0x10, 4, 0x1a, 1, b'd', 0x20, 5][..]).expect("valid");
    assert_eq!(
        (
            nack.request_id,
            nack.reason(),
            nack.detail.as_str(),
            nack.generation
        ),
        (1, NackReason::Malformed, "d", 5)
    );
}

#[test]
fn oversized_message_cannot_become_a_frame() {
    let big = Message::Config(Config {
        request_id: 1,
        generation: 1,
        content: vec![b'x'; 65_535],
        sha256: vec![0; 32],
    });
    match big.to_frame(1) {
        Err(FrameError::DataTooLong { declared, max }) => {
            assert!(declared > 65_535);
            assert_eq!(max, 65_535);
        }
        other => panic!("expected DataTooLong, got {other:?}"),
    }
}

#[test]
fn v0_code_in_version_1_frame_is_fine_and_version_0_is_not_decoded() {
    // HELLO exists in both versions; only a version-1 frame is decoded here.
    let frame = Message::Hello(Hello::default()).to_frame(3).expect("fits");
    assert_eq!(frame.version, VERSION_1);
    let as_v0 = Frame {
        version: VERSION_0,
        ..frame.clone()
    };
    assert!(Message::decode(&frame).is_ok());
    assert!(Message::decode(&as_v0).is_err());
}
