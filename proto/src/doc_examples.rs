//! Checks that the example frames in `docs/protocol.md` are what the encoder
//! produces.
//!
//! Each example in the document is a fenced block preceded by a marker line
//! `<!-- frame: NAME -->`. Inside the block, each line starts with the bytes
//! as two-digit lowercase hex, followed by a free-text annotation that starts
//! with a word that is not a two-digit hex number. The bytes of all lines, in
//! order, must equal the encoding of the frame of the same NAME below.

use sha2::{Digest, Sha256};

use crate::frame::{Code, Frame};
use crate::v1::{Config, Hello, Message, NackReason, Swipe};

const DOC: &str = include_str!("../../docs/protocol.md");
const MARKER: &str = "<!-- frame: ";

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

fn v0(code: Code, id: u16, data: &str) -> Frame {
    Frame::v0(code, id, data.as_bytes().to_vec()).expect("short example")
}

fn v1(message: Message, id: u16) -> Frame {
    message.to_frame(id).expect("short example")
}

/// The documented examples, by name.
fn examples() -> Vec<(&'static str, Frame)> {
    vec![
        ("v0-hello", v0(Code::Hello, 42, "hello")),
        ("v0-ack", v0(Code::Ack, 42, "OK")),
        ("v0-config", v0(Code::Config, 42, "volume=3\n")),
        ("v0-nack", v0(Code::Nack, 42, "wrong machine id")),
        (
            "v0-nack-unknown-version",
            Frame {
                version: 7,
                code: 0,
                id: 42,
                data: bytes::Bytes::new(),
            }
            .nack_if_unknown()
            .expect("version 7 is unknown"),
        ),
        (
            "v1-hello-address",
            v1(
                Message::Hello(Hello {
                    request_id: 1,
                    config_port: 9301,
                    config_address: "10.0.0.5:9301".into(),
                    ..Default::default()
                }),
                42,
            ),
        ),
        (
            "v1-hello",
            v1(
                Message::Hello(Hello {
                    request_id: 1,
                    agent_version: "0.1.0".into(),
                    config_port: 9301,
                    applied_generation: 2,
                    applied_sha256: sha256(b"volume=2\n"),
                    readers: vec!["door".into()],
                    config_address: String::new(),
                }),
                42,
            ),
        ),
        (
            "v1-config",
            v1(
                Message::Config(Config {
                    request_id: 7,
                    generation: 3,
                    content: b"volume=3\n".to_vec(),
                    sha256: sha256(b"volume=3\n"),
                }),
                42,
            ),
        ),
        ("v1-ack", v1(Message::ack(7, "stored", 3), 42)),
        (
            "v1-nack",
            v1(
                Message::nack(8, NackReason::WrongMachineId, "frame is for machine 43"),
                42,
            ),
        ),
        (
            "v1-nack-stale",
            v1(Message::stale(9, 5, "stored generation is 5"), 42),
        ),
        (
            "v1-swipe",
            v1(
                Message::Swipe(Swipe {
                    request_id: 5,
                    event_id: "7f3a9c".into(),
                    reader_id: "door".into(),
                    card: "12345678".into(),
                    swiped_at_unix_ms: 1_767_225_600_000,
                    ttl_ms: 10_000,
                    sent_at_unix_ms: 0,
                }),
                0x0102,
            ),
        ),
    ]
}

fn is_hex_byte(token: &str) -> bool {
    token.len() == 2
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The bytes of the fenced block that follows each marker, by name.
fn doc_examples() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix(MARKER) else {
            continue;
        };
        let name = rest.trim_end_matches("-->").trim().to_string();
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "example {name}: the marker must be followed by a fenced block, got {fence:?}"
        );
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            if line.starts_with("```") {
                break;
            }
            for token in line.split_whitespace().take_while(|t| is_hex_byte(t)) {
                bytes.push(u8::from_str_radix(token, 16).expect("checked hex"));
            }
        }
        out.push((name, bytes));
    }
    out
}

fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn protocol_doc_examples_match_the_encoder() {
    let expected = examples();
    let found = doc_examples();
    assert!(
        !found.is_empty(),
        "no `{MARKER}NAME -->` examples found in docs/protocol.md"
    );
    for (name, _) in &found {
        assert!(
            expected.iter().any(|(n, _)| n == name),
            "docs/protocol.md has an example {name:?} that this test does not know"
        );
    }
    for (name, frame) in &expected {
        let blocks: Vec<&Vec<u8>> = found
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, b)| b)
            .collect();
        let wire = frame.to_bytes().expect("encodable").to_vec();
        assert_eq!(
            blocks.len(),
            1,
            "docs/protocol.md must show example {name:?} exactly once; its bytes are:\n{}",
            hex_lines(&wire)
        );
        assert_eq!(
            blocks[0],
            &wire,
            "example {name:?} in docs/protocol.md differs from the encoder, which gives:\n{}",
            hex_lines(&wire)
        );
    }
}
