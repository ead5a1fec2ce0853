//! Unit tests of the frame layout and [`FrameCodec`].

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::*;

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn frame(version: u8, code: Code, id: u16, data: &'static [u8]) -> Frame {
    Frame::new(version, code, id, data).expect("short data")
}

fn encoded(f: &Frame) -> Bytes {
    f.to_bytes().expect("encodable frame")
}

/// A handful of valid frames of every shape used by the split tests.
fn sample_frames() -> Vec<Frame> {
    vec![
        frame(VERSION_0, Code::Hello, 42, b"hello"),
        frame(VERSION_0, Code::Ack, 42, b"OK"),
        frame(VERSION_0, Code::Msg, 0xffff, b""),
        frame(VERSION_1, Code::Swipe, 0x0102, &[0x08, 0x01, 0x12, 0x00]),
        // Unknown version and code still decode.
        Frame {
            version: 9,
            code: 77,
            id: 7,
            data: Bytes::from_static(b"??"),
        },
        frame(VERSION_0, Code::Config, 1, &[0u8; 300]),
    ]
}

fn codec_decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = codec.decode(buf).expect("valid stream") {
        out.push(f);
    }
    out
}

#[test]
fn code_bytes_round_trip() {
    let bytes: Vec<u8> = Code::ALL.iter().map(|c| c.byte()).collect();
    assert_eq!(bytes, [0, 1, 2, 3, 4, 5, 150, 151]);
    for code in Code::ALL {
        assert_eq!(Code::from_byte(code.byte()), Some(code));
    }
    let known = (0..=255u8)
        .filter(|b| Code::from_byte(*b).is_some())
        .count();
    assert_eq!(known, Code::ALL.len());
    let names: Vec<&str> = Code::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "HELLO",
            "MSG",
            "CONFIG",
            "RESET",
            "SWIPE",
            "HEARTBEAT",
            "ACK",
            "NACK"
        ]
    );
}

#[test]
fn swipe_and_heartbeat_only_in_version_1() {
    for code in Code::ALL {
        let v1_only = matches!(code, Code::Swipe | Code::Heartbeat);
        assert_eq!(code.is_known_in(VERSION_0), !v1_only, "{code} in v0");
        assert!(code.is_known_in(VERSION_1), "{code} in v1");
        assert!(!code.is_known_in(2), "{code} in v2");
    }
}

#[test]
fn v0_hello_exact_bytes() {
    let f = Frame::v0(Code::Hello, 42, "hello").expect("short");
    assert_eq!(hex(&encoded(&f)), "00 00 2a 00 05 00 68 65 6c 6c 6f");
}

#[test]
fn v0_ack_and_nack_exact_bytes() {
    let ack = Frame::v0(Code::Ack, 42, "OK").expect("short");
    assert_eq!(hex(&encoded(&ack)), "00 96 2a 00 02 00 4f 4b");
    let nack = Frame::v0(Code::Nack, 3, "no").expect("short");
    assert_eq!(hex(&encoded(&nack)), "00 97 03 00 02 00 6e 6f");
}

#[test]
fn id_and_length_are_little_endian() {
    let f = frame(VERSION_1, Code::Msg, 0x0102, &[0xaa; 0x0304]);
    let bytes = encoded(&f);
    assert_eq!(&bytes[..HEADER_LEN], &[0x01, 0x01, 0x02, 0x01, 0x04, 0x03]);
    assert_eq!(bytes.len(), HEADER_LEN + 0x0304);
}

#[test]
fn empty_data_encodes_and_decodes() {
    let f = frame(VERSION_0, Code::Reset, 5, b"");
    let bytes = encoded(&f);
    assert_eq!(hex(&bytes), "00 03 05 00 00 00");
    let mut buf = BytesMut::from(&bytes[..]);
    let got = FrameCodec::default().decode(&mut buf).expect("valid");
    assert_eq!(got, Some(f));
    assert!(buf.is_empty());
}

#[test]
fn constructors_refuse_data_over_65535() {
    let ok = Frame::v0(Code::Config, 1, vec![0u8; MAX_DATA_LEN]).expect("exactly max fits");
    assert_eq!(encoded(&ok).len(), HEADER_LEN + MAX_DATA_LEN);
    match Frame::v0(Code::Config, 1, vec![0u8; MAX_DATA_LEN + 1]) {
        Err(FrameError::DataTooLong { declared, max }) => {
            assert_eq!((declared, max), (MAX_DATA_LEN + 1, MAX_DATA_LEN));
        }
        other => panic!("expected DataTooLong, got {other:?}"),
    }
    assert!(matches!(
        Frame::new(VERSION_1, Code::Msg, 1, vec![0u8; 70_000]),
        Err(FrameError::DataTooLong { .. })
    ));
}

#[test]
fn encoder_refuses_hand_built_oversized_frame_and_writes_nothing() {
    let f = Frame {
        version: 0,
        code: Code::Config.byte(),
        id: 1,
        data: Bytes::from(vec![0u8; MAX_DATA_LEN + 1]),
    };
    let mut dst = BytesMut::new();
    dst.put_slice(b"prefix");
    assert!(matches!(
        f.encode(&mut dst),
        Err(FrameError::DataTooLong {
            declared: 65536,
            max: 65535
        })
    ));
    assert_eq!(&dst[..], b"prefix");
    assert!(f.to_bytes().is_err());
    let mut codec = FrameCodec::default();
    assert!(Encoder::<&Frame>::encode(&mut codec, &f, &mut dst).is_err());
    assert!(Encoder::<Frame>::encode(&mut codec, f, &mut dst).is_err());
    assert_eq!(&dst[..], b"prefix");
}

#[test]
fn codec_encoder_matches_frame_encode() {
    let mut codec = FrameCodec::new(10);
    let f = frame(VERSION_0, Code::Msg, 9, &[1u8; 100]);
    let mut dst = BytesMut::new();
    // The link limit bounds what is accepted, not what is sent.
    Encoder::<&Frame>::encode(&mut codec, &f, &mut dst).expect("encodes");
    Encoder::<Frame>::encode(&mut codec, f.clone(), &mut dst).expect("encodes");
    let one = encoded(&f);
    assert_eq!(&dst[..one.len()], &one[..]);
    assert_eq!(&dst[one.len()..], &one[..]);
}

#[test]
fn every_split_point_decodes_identically() {
    let frames = sample_frames();
    let mut stream = BytesMut::new();
    for f in &frames {
        f.encode(&mut stream).expect("encodable");
    }
    let stream = stream.freeze();
    // One split point anywhere in the stream: two chunks.
    for split in 0..=stream.len() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in [&stream[..split], &stream[split..]] {
            buf.extend_from_slice(chunk);
            got.extend(codec_decode_all(&mut codec, &mut buf));
        }
        assert_eq!(got, frames, "split at {split}");
        assert!(buf.is_empty());
        assert_eq!(codec.decode_eof(&mut buf).expect("clean end"), None);
    }
    // And every byte on its own.
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in stream.iter() {
        buf.put_u8(*b);
        got.extend(codec_decode_all(&mut codec, &mut buf));
    }
    assert_eq!(got, frames);
}

#[test]
fn unknown_version_and_code_decode_as_frames() {
    let mut buf = BytesMut::from(&[7u8, 200, 0x34, 0x12, 1, 0, 0xee][..]);
    let f = FrameCodec::default()
        .decode(&mut buf)
        .expect("not an error")
        .expect("complete");
    assert_eq!((f.version, f.code, f.id), (7, 200, 0x1234));
    assert_eq!(&f.data[..], &[0xee]);
    assert_eq!(f.code(), None);
    assert_eq!(f.to_string(), "v7 code 200 id=4660 len=1");
}

#[test]
fn declared_length_over_max_fails_before_reserving() {
    let mut codec = FrameCodec::new(4096);
    let mut buf = BytesMut::with_capacity(HEADER_LEN);
    // DATA_LENGTH 60000 = 0xea60.
    buf.put_slice(&[0, 2, 42, 0, 0x60, 0xea]);
    let err = codec.decode(&mut buf).expect_err("too long");
    assert!(
        matches!(
            err,
            FrameError::DataTooLong {
                declared: 60000,
                max: 4096
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "frame declares 60000 data bytes but this link accepts at most 4096"
    );
    assert!(
        buf.capacity() < 60000,
        "capacity grew to {}",
        buf.capacity()
    );
    // decode_eof reports the same error, not Truncated.
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(FrameError::DataTooLong { .. })
    ));
}

#[test]
fn declared_length_exactly_max_is_accepted() {
    let mut codec = FrameCodec::new(4096);
    let f = frame(VERSION_0, Code::Config, 42, &[b'x'; 4096]);
    let mut buf = BytesMut::new();
    f.encode(&mut buf).expect("encodable");
    let tail = buf.split_off(HEADER_LEN + 10);
    assert_eq!(codec.decode(&mut buf).expect("within limit"), None);
    buf.unsplit(tail);
    assert_eq!(codec.decode(&mut buf).expect("within limit"), Some(f));
    // One more byte is refused.
    let mut over = BytesMut::from(&[0u8, 2, 42, 0, 0x01, 0x10][..]);
    assert!(matches!(
        codec.decode(&mut over),
        Err(FrameError::DataTooLong {
            declared: 4097,
            max: 4096
        })
    ));
}

#[test]
fn codec_limit_is_clamped_and_defaults_to_protocol_max() {
    assert_eq!(FrameCodec::default().max_data_len(), MAX_DATA_LEN);
    assert_eq!(FrameCodec::new(1 << 20).max_data_len(), MAX_DATA_LEN);
    assert_eq!(FrameCodec::new(100).max_data_len(), 100);
    assert_eq!(FrameCodec::new(100).max_frame_len(), 106);
    // A zero limit still passes empty frames.
    let mut codec = FrameCodec::new(0);
    let mut buf = BytesMut::from(&[0u8, 3, 1, 0, 0, 0][..]);
    assert!(codec.decode(&mut buf).expect("empty ok").is_some());
}

#[test]
fn truncated_header_at_eof() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(&[0u8, 0, 42][..]);
    assert_eq!(codec.decode(&mut buf).expect("incomplete is fine"), None);
    match codec.decode_eof(&mut buf) {
        Err(FrameError::Truncated { have, need }) => assert_eq!((have, need), (3, 6)),
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn truncated_body_at_eof() {
    let mut codec = FrameCodec::default();
    // Declares 10 data bytes, 2 arrive.
    let mut buf = BytesMut::from(&[0u8, 1, 42, 0, 10, 0, b'h', b'i'][..]);
    assert_eq!(codec.decode(&mut buf).expect("incomplete is fine"), None);
    let err = codec.decode_eof(&mut buf).expect_err("truncated");
    assert!(
        matches!(err, FrameError::Truncated { have: 8, need: 16 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "stream ended mid-frame: 8 of the frame's 16 bytes arrived"
    );
}

#[test]
fn decode_eof_returns_last_complete_frame_then_none() {
    let mut codec = FrameCodec::default();
    let f = frame(VERSION_0, Code::Msg, 1, b"x");
    let mut buf = BytesMut::from(&encoded(&f)[..]);
    assert_eq!(codec.decode_eof(&mut buf).expect("complete"), Some(f));
    assert_eq!(codec.decode_eof(&mut buf).expect("empty"), None);
}

#[test]
fn text_lossy_and_display() {
    let f = frame(VERSION_0, Code::Nack, 42, b"bad \xff id");
    assert_eq!(f.text_lossy(), "bad \u{fffd} id");
    assert_eq!(f.to_string(), "v0 NACK id=42 len=8");
    assert_eq!(f.code(), Some(Code::Nack));
}

#[test]
fn nack_if_unknown_version() {
    let f = Frame {
        version: 7,
        code: 0,
        id: 42,
        data: Bytes::new(),
    };
    let nack = f.nack_if_unknown().expect("unknown version");
    assert_eq!(
        (nack.version, nack.code(), nack.id),
        (0, Some(Code::Nack), 42)
    );
    assert_eq!(
        nack.text_lossy(),
        "unsupported protocol version 7; supported versions: 0, 1"
    );
}

#[test]
fn nack_if_unknown_code_answers_in_senders_version() {
    let v0 = Frame {
        version: 0,
        code: Code::Swipe.byte(),
        id: 42,
        data: Bytes::new(),
    };
    let nack = v0.nack_if_unknown().expect("SWIPE is unknown in v0");
    assert_eq!(
        (nack.version, nack.code(), nack.id),
        (0, Some(Code::Nack), 42)
    );
    assert_eq!(nack.text_lossy(), "unknown code 4 in version 0");

    let v1 = Frame {
        version: 1,
        code: 99,
        id: 42,
        data: Bytes::new(),
    };
    let nack = v1.nack_if_unknown().expect("99 is unknown");
    assert_eq!((nack.version, nack.id), (1, 42));
    match crate::v1::Message::decode(&nack).expect("valid v1 NACK") {
        crate::v1::Message::Nack(n) => {
            assert_eq!(n.reason(), crate::v1::NackReason::UnknownCode);
            assert_eq!(n.request_id, 0);
            assert_eq!(n.detail, "unknown code 99 in version 1");
        }
        other => panic!("expected NACK, got {other:?}"),
    }

    for f in sample_frames().into_iter().filter(|f| f.version <= 1) {
        assert_eq!(f.nack_if_unknown(), None, "{f}");
    }
}

/// xorshift64: deterministic pseudo-random numbers without extra crates.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_bytes_never_panic_and_stay_bounded() {
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    let mut frames = 0usize;
    let mut too_long = 0usize;
    for round in 0..300 {
        let max = [0usize, 1, 16, 300, 4096, MAX_DATA_LEN][round % 6];
        let mut codec = FrameCodec::new(max);
        let bound = HEADER_LEN + max;
        let mut buf = BytesMut::new();
        for _ in 0..200 {
            // Like FrameReader: never read past one maximum frame.
            let room = bound - buf.len();
            let chunk = rng.below(64).min(room);
            for _ in 0..chunk {
                // Bias the length bytes low half the time so that frames complete.
                let b = rng.next() as u8;
                buf.put_u8(if rng.below(2) == 0 { b & 0x0f } else { b });
            }
            assert!(buf.len() <= bound);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(f)) => {
                        frames += 1;
                        assert!(f.data.len() <= max);
                    }
                    Ok(None) => break,
                    Err(FrameError::DataTooLong { declared, max: m }) => {
                        assert!(declared > m && m == max);
                        too_long += 1;
                        // The link would be closed: start over.
                        buf.clear();
                        break;
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            assert!(buf.len() <= bound, "buffered {} > {bound}", buf.len());
        }
        let _ = codec.decode_eof(&mut buf);
    }
    // The loop really exercised both paths.
    assert!(frames > 100, "only {frames} frames");
    assert!(too_long > 100, "only {too_long} length errors");
}

#[test]
fn header_parse() {
    assert_eq!(Header::parse(&[1, 2, 3]), None);
    assert_eq!(
        Header::parse(&[1, 151, 0x02, 0x01, 0x60, 0xea, 0xff]),
        Some(Header {
            version: 1,
            code: 151,
            id: 0x0102,
            data_len: 60000,
        })
    );
}

#[test]
fn protocol_nack_answers_in_the_senders_version() {
    use crate::v1::{Message, NackReason};

    let v0 = Frame::protocol_nack(0, 42, NackReason::Malformed, "too long");
    assert_eq!((v0.version, v0.code(), v0.id), (0, Some(Code::Nack), 42));
    assert_eq!(v0.text_lossy(), "too long");

    let v1 = Frame::protocol_nack(1, 42, NackReason::Malformed, "too long");
    assert_eq!((v1.version, v1.code(), v1.id), (1, Some(Code::Nack), 42));
    assert_eq!(
        Message::decode(&v1).expect("valid"),
        Message::nack(0, NackReason::Malformed, "too long")
    );

    let other = Frame::protocol_nack(
        200,
        42,
        NackReason::UnknownVersion,
        "unsupported protocol version 200",
    );
    assert_eq!(other.version, 0);
    assert_eq!(
        other.text_lossy(),
        "unsupported protocol version 200; supported versions: 0, 1"
    );
}

#[test]
fn protocol_nack_cuts_long_details_at_a_char_boundary() {
    // 'é' is two bytes: 600 of them are 1200 bytes.
    let long = "é".repeat(600);
    let f = Frame::protocol_nack(0, 1, crate::v1::NackReason::Unspecified, long);
    assert_eq!(f.data.len(), MAX_NACK_DETAIL);
    assert_eq!(f.text_lossy(), "é".repeat(MAX_NACK_DETAIL / 2));
    let odd = format!("x{}", "é".repeat(600));
    let f = Frame::protocol_nack(0, 1, crate::v1::NackReason::Unspecified, odd);
    assert_eq!(f.data.len(), MAX_NACK_DETAIL - 1);
    assert!(std::str::from_utf8(&f.data).is_ok());
}

#[test]
fn text_and_reply_frames_always_fit() {
    use crate::frame::{reply_frame, text_frame};
    let long = "é".repeat(40_000);
    let f = text_frame(Code::Nack, 3, &long);
    assert_eq!((f.version, f.code, f.id), (0, 151, 3));
    assert!(f.data.len() <= MAX_NACK_DETAIL);
    assert!(
        std::str::from_utf8(&f.data).is_ok(),
        "cut at a character boundary"
    );
    let r = reply_frame(&v1::Message::ack(9, long.clone(), 1), 3);
    match v1::Message::decode(&r).unwrap() {
        v1::Message::Ack(a) => {
            assert_eq!(a.request_id, 9);
            assert!(a.detail.len() <= MAX_NACK_DETAIL);
        }
        m => panic!("{m:?}"),
    }
    let huge = v1::Message::Msg(v1::Msg {
        request_id: 1,
        text: "x".repeat(70_000),
    });
    match v1::Message::decode(&reply_frame(&huge, 3)).unwrap() {
        v1::Message::Nack(n) => assert!(n.detail.contains("does not fit")),
        m => panic!("{m:?}"),
    }
}

/// The byte-order rule as a table: (frame, v0 order of the link, wire bytes). Version-0
/// frames follow the link's order; every other version is little-endian regardless.
#[test]
fn byte_order_applies_to_version_0_frames_only() {
    let cases: [(Frame, ByteOrder, &[u8]); 6] = [
        (
            frame(VERSION_0, Code::Hello, 0x0102, b"hi"),
            ByteOrder::Little,
            b"\x00\x00\x02\x01\x02\x00hi",
        ),
        (
            frame(VERSION_0, Code::Hello, 0x0102, b"hi"),
            ByteOrder::Big,
            b"\x00\x00\x01\x02\x00\x02hi",
        ),
        (
            frame(VERSION_0, Code::Ack, 42, b"OK"),
            ByteOrder::Big,
            b"\x00\x96\x00\x2a\x00\x02OK",
        ),
        (
            frame(VERSION_1, Code::Ack, 0x0102, b"\x08\x01"),
            ByteOrder::Big,
            b"\x01\x96\x02\x01\x02\x00\x08\x01",
        ),
        (
            Frame {
                version: 7,
                code: 0,
                id: 0x0102,
                data: Bytes::from_static(b"x"),
            },
            ByteOrder::Big,
            b"\x07\x00\x02\x01\x01\x00x",
        ),
        (
            frame(VERSION_0, Code::Config, 0xff00, &[b'z'; 300]),
            ByteOrder::Big,
            &[],
        ),
    ];
    for (f, order, wire) in cases {
        let bytes = f.to_bytes_with(order).expect("encodable");
        if wire.is_empty() {
            // 300 bytes = 0x012c: big-endian `01 2c`.
            assert_eq!(&bytes[..HEADER_LEN], b"\x00\x02\xff\x00\x01\x2c", "{f}");
        } else {
            assert_eq!(hex(&bytes), hex(wire), "{f} {order:?}");
        }
        let mut codec = FrameCodec::default().with_v0_byte_order(order);
        let mut via_codec = BytesMut::new();
        codec.encode(&f, &mut via_codec).expect("encodable");
        assert_eq!(via_codec, bytes, "the codec encodes like the frame");
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(codec.decode(&mut buf).expect("valid"), Some(f.clone()));
        assert!(buf.is_empty());
    }
}

/// A big-endian link keeps the codec's promises: an incomplete frame is "need more bytes"
/// (nothing reserved beyond the frame), a declared length over the limit is refused from
/// the header before anything is reserved, a partial frame at the end is `Truncated`.
#[test]
fn a_big_endian_link_checks_declared_lengths_before_allocating() {
    let mut codec = FrameCodec::new(4096).with_v0_byte_order(ByteOrder::Big);
    // DATA_LENGTH 0x0010 = 16 big-endian; read little-endian it would be 4096.
    let mut buf = BytesMut::from(&[0u8, 1, 0, 42, 0x00, 0x10, b'a'][..]);
    assert_eq!(codec.decode(&mut buf).expect("need more"), None);
    assert!(buf.capacity() < 4096, "reserved {}", buf.capacity());
    assert!(matches!(
        codec.clone().decode_eof(&mut buf.clone()),
        Err(FrameError::Truncated { have: 7, need: 22 })
    ));
    buf.put_slice(&[b'b'; 15]);
    let f = codec.decode(&mut buf).expect("valid").expect("whole");
    assert_eq!((f.id, f.data.len()), (42, 16));
    // 0xea60 = 60000 big-endian; read little-endian it would be 0x60ea = 24810.
    let mut buf = BytesMut::from(&[0u8, 2, 0, 42, 0xea, 0x60][..]);
    match codec.decode(&mut buf) {
        Err(FrameError::DataTooLong { declared, max }) => {
            assert_eq!((declared, max), (60000, 4096))
        }
        r => panic!("{r:?}"),
    }
    assert!(buf.capacity() < 60000);
    // A header cut short is "need more bytes", in either order.
    let mut buf = BytesMut::from(&[0u8, 2, 0][..]);
    assert_eq!(codec.decode(&mut buf).expect("need more"), None);
    assert_eq!(
        Header::parse_with(&[0, 151, 0x01, 0x02, 0x00, 0x05], ByteOrder::Big),
        Some(Header {
            version: 0,
            code: 151,
            id: 0x0102,
            data_len: 5
        })
    );
}
