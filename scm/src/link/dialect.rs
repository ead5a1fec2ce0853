//! The two dialects of the machine protocol (docs/protocol.md section 4): how a frame's
//! payload is read, how each dialect answers, which requests need a HELLO on the same
//! connection, and how a CONFIG and its answer are encoded. Everything that differs
//! between version 0 and version 1 is decided here, so the link's state machine and the
//! config-port push carry no version branches of their own.

use scm_proto::v1::{self, Message, NackReason, PayloadError};
use scm_proto::{Code, Frame, FrameError};

use crate::state::Generation;

/// `byte_order` of a `[[machine]]`: how a version-0 machine encodes the ID and
/// DATA_LENGTH of its frames. The protocol says little-endian; some legacy machines (one
/// public 2019/20 simulator) send both big-endian, and are configured `"big"`. It applies
/// to version-0 frames only (`scm_proto::ByteOrder`): a version-1 frame on the same link is
/// little-endian, and `app::config` refuses `"big"` for a version-1 machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ByteOrder {
    /// The protocol's order.
    #[default]
    Little,
    /// Non-conformant version-0 machines.
    Big,
}

impl<'de> serde::Deserialize<'de> for ByteOrder {
    // By hand, so that a wrong value is answered with the two right ones and what they
    // are for, not with serde's "no variant" message.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "little" => Ok(ByteOrder::Little),
            "big" => Ok(ByteOrder::Big),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a byte order; use \"little\" (the protocol's, the default) or \"big\" (a version-0 machine that sends ID and DATA_LENGTH big-endian)"
            ))),
        }
    }
}

impl ByteOrder {
    /// The codec's order for this machine's version-0 frames.
    pub(crate) fn wire(self) -> scm_proto::ByteOrder {
        match self {
            ByteOrder::Little => scm_proto::ByteOrder::Little,
            ByteOrder::Big => scm_proto::ByteOrder::Big,
        }
    }

    /// The frame codec for a link to this machine, accepting at most `max_data` bytes.
    pub(crate) fn codec(self, max_data: usize) -> scm_proto::FrameCodec {
        scm_proto::FrameCodec::new(max_data).with_v0_byte_order(self.wire())
    }
}

/// A protocol version this SCM speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// The original protocol: raw payloads, status texts, no request ids.
    V0,
    /// This project's agents: protobuf payloads, request ids echoed in answers.
    V1,
}

/// A request from a machine, read in its dialect. Version 0 has no request ids: they
/// are 0 there, and the answer refers to the request just before it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    /// HELLO, with what a version-1 agent announces (nothing for version 0).
    Hello {
        request_id: u64,
        config_address: Option<String>,
        readers: Vec<String>,
        applied_sha256: Vec<u8>,
    },
    /// MSG and its text.
    Msg { request_id: u64, text: String },
    /// HEARTBEAT (version 1).
    Heartbeat {
        request_id: u64,
        sent_at_ms: u64,
        refusals: crate::coord::sessions::AgentRefusals,
    },
    /// SWIPE (version 1).
    Swipe(v1::Swipe),
    /// An ACK or NACK: never answered.
    Answer(Code),
    /// A request only the SCM may send (CONFIG, RESET).
    NotAccepted { request_id: u64, code: Code },
}

impl Dialect {
    /// The dialect of a frame of this version, if the version is supported.
    pub(crate) fn of(version: u8) -> Option<Dialect> {
        match version {
            0 => Some(Dialect::V0),
            1 => Some(Dialect::V1),
            _ => None,
        }
    }

    /// The dialect to speak to a machine configured (or last seen) at `version`: 0 is
    /// the original protocol, anything newer is this project's agents.
    pub(crate) fn from_version(version: u8) -> Dialect {
        if version == 0 {
            Dialect::V0
        } else {
            Dialect::V1
        }
    }

    /// The VERSION byte.
    pub(crate) fn version(self) -> u8 {
        match self {
            Dialect::V0 => 0,
            Dialect::V1 => 1,
        }
    }

    /// Reads a frame whose version and code are known.
    pub(crate) fn parse(self, frame: &Frame, code: Code) -> Result<Request, PayloadError> {
        match self {
            Dialect::V0 => Ok(match code {
                Code::Hello => Request::Hello {
                    request_id: 0,
                    config_address: None,
                    readers: Vec::new(),
                    applied_sha256: Vec::new(),
                },
                Code::Msg => Request::Msg {
                    request_id: 0,
                    text: frame.text_lossy(),
                },
                Code::Ack | Code::Nack => Request::Answer(code),
                // SWIPE and HEARTBEAT are unknown codes in version 0 and never get here.
                _ => Request::NotAccepted {
                    request_id: 0,
                    code,
                },
            }),
            Dialect::V1 => Ok(match Message::decode(frame)? {
                Message::Hello(h) => Request::Hello {
                    request_id: h.request_id,
                    // Bounded: kept in the session registry for the link's life.
                    config_address: Some(h.config_address)
                        .filter(|a| !a.is_empty() && a.len() <= 255),
                    readers: h.readers,
                    applied_sha256: h.applied_sha256,
                },
                Message::Msg(m) => Request::Msg {
                    request_id: m.request_id,
                    text: m.text,
                },
                Message::Heartbeat(h) => Request::Heartbeat {
                    request_id: h.request_id,
                    sent_at_ms: h.sent_at_unix_ms,
                    refusals: crate::coord::sessions::AgentRefusals {
                        invalid: h.swipes_invalid,
                        queue_full: h.swipes_queue_full,
                        expired: h.swipes_expired,
                    },
                },
                Message::Swipe(s) => Request::Swipe(s),
                Message::Ack(_) | Message::Nack(_) => Request::Answer(code),
                m @ (Message::Config(_) | Message::Reset(_)) => Request::NotAccepted {
                    request_id: m.request_id(),
                    code,
                },
            }),
        }
    }

    /// The request id of a frame, for a NACK sent before the frame is otherwise read
    /// (0 when there is none or the payload cannot be read).
    pub(crate) fn request_id(self, frame: &Frame) -> u64 {
        match self {
            Dialect::V0 => 0,
            Dialect::V1 => Message::decode(frame).map(|m| m.request_id()).unwrap_or(0),
        }
    }

    /// Whether every request but HELLO needs an accepted HELLO on the same connection.
    /// Version 0 has no such rule: a version-0 MSG on a new connection is checked
    /// against the address of the machine's last HELLO instead.
    pub(crate) fn needs_hello_on_link(self) -> bool {
        self == Dialect::V1
    }

    /// Whether a waiting configuration is delivered in-band, as the answer to HELLO
    /// (version 0), rather than over the machine's config port after the ACK.
    pub(crate) fn config_in_band(self) -> bool {
        self == Dialect::V0
    }

    /// Whether answers to ordinary requests are held back and sent with the answers to
    /// the frames that arrived with them. Version-0 machines have one request
    /// outstanding at a time, so their answers go out at once.
    pub(crate) fn batches_answers(self) -> bool {
        self == Dialect::V1
    }

    /// An ACK: version 0 sends `detail` as the status text, version 1 an `Ack` echoing
    /// `request_id` with `detail` and `generation`.
    pub(crate) fn ack(
        self,
        id: u16,
        request_id: u64,
        detail: impl Into<String>,
        generation: u64,
    ) -> Frame {
        match self {
            Dialect::V0 => scm_proto::text_frame(Code::Ack, id, &detail.into()),
            Dialect::V1 => {
                scm_proto::reply_frame(&Message::ack(request_id, detail, generation), id)
            }
        }
    }

    /// A NACK: version 0 sends the text alone, version 1 a `Nack` with `reason`.
    pub(crate) fn nack(
        self,
        id: u16,
        request_id: u64,
        reason: NackReason,
        text: impl Into<String>,
    ) -> Frame {
        match self {
            Dialect::V0 => scm_proto::text_frame(Code::Nack, id, &text.into()),
            Dialect::V1 => scm_proto::reply_frame(&Message::nack(request_id, reason, text), id),
        }
    }

    /// The CONFIG frame carrying `generation` (version 1 with its number and hash).
    pub(crate) fn config_frame(
        self,
        generation: &Generation,
        request_id: u64,
    ) -> Result<Frame, FrameError> {
        let id = generation.machine_id;
        match self {
            Dialect::V0 => Frame::v0(Code::Config, id, generation.content.clone()),
            Dialect::V1 => {
                let sha = hex::decode(&generation.sha256).unwrap_or_default();
                Message::Config(v1::Config {
                    request_id,
                    generation: generation.generation,
                    content: generation.content.clone(),
                    sha256: sha,
                })
                .to_frame(id)
            }
        }
    }

    /// Interprets a frame in this dialect received in answer to a CONFIG for machine
    /// `id` (version 1: sent with `request_id`).
    pub(crate) fn parse_reply(
        self,
        frame: &Frame,
        id: u16,
        request_id: u64,
    ) -> Result<Reply, AnswerError> {
        if frame.id != id {
            return Err(AnswerError::WrongMachine {
                named: frame.id,
                expected: id,
            });
        }
        match self {
            Dialect::V0 => match frame.code() {
                Some(Code::Ack) => Ok(Reply::Ack(frame.text_lossy())),
                Some(Code::Nack) => Ok(Reply::Nack(frame.text_lossy())),
                _ => Err(AnswerError::UnexpectedCode(frame.code)),
            },
            Dialect::V1 => match Message::decode(frame)? {
                Message::Ack(a) if a.request_id == request_id => Ok(Reply::Ack(a.detail)),
                Message::Nack(n) if n.request_id == request_id => Ok(Reply::Nack(nack_text(&n))),
                m => Err(AnswerError::Unexpected {
                    code: m.code().name(),
                    request_id: m.request_id(),
                }),
            },
        }
    }
}

/// How a version-1 NACK of a CONFIG reads in the attempt's record and the operator's
/// reply.
fn nack_text(n: &v1::Nack) -> String {
    match n.reason() {
        // Final, as every NACK: a fenced machine refuses the same generation again, so
        // retrying it could only loop.
        NackReason::Stale => format!(
            "{} (NACK_REASON_STALE: the machine has generation {} stored, so this SCM's generation is behind it; not retried: push from the SCM that holds the newer generations, or push again until the generation passes {})",
            n.detail, n.generation, n.generation
        ),
        reason => format!("{} ({})", n.detail, reason.as_str_name()),
    }
}

/// A machine's answer to a CONFIG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// ACK with its text.
    Ack(String),
    /// NACK with its reason.
    Nack(String),
}

/// Why a frame is not an answer to our CONFIG.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AnswerError {
    /// The answer is about another machine.
    #[error("answer names machine {named} instead of {expected}")]
    WrongMachine {
        /// Machine the frame names.
        named: u16,
        /// Machine the CONFIG was for.
        expected: u16,
    },
    /// A version-0 frame that is neither ACK nor NACK.
    #[error("unexpected answer code {0}")]
    UnexpectedCode(u8),
    /// A version-1 message that is not the answer to this request.
    #[error("unexpected answer {code} with request id {request_id}")]
    Unexpected {
        /// The message's code name.
        code: &'static str,
        /// Its request id.
        request_id: u64,
    },
    /// The payload could not be decoded.
    #[error("malformed answer: {0}")]
    Malformed(#[from] scm_proto::PayloadError),
}

/// Whether a version-0 MSG on a connection without HELLO comes from the address of the
/// machine's last HELLO (`last_peer`, as recorded): the IP must match, the port may not.
pub(crate) fn from_last_hello_address(last_peer: Option<&str>, peer: std::net::SocketAddr) -> bool {
    last_peer
        .and_then(|p| p.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip())
        == Some(peer.ip())
}

/// What became of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PushResult {
    /// The machine stored the generation.
    Ack {
        /// Generation.
        generation: u64,
        /// The machine's text.
        detail: String,
    },
    /// The machine refused the generation (final for it).
    Nack {
        /// Generation.
        generation: u64,
        /// The machine's reason.
        detail: String,
    },
    /// The machine could not be reached; the generation stays pending.
    Unreachable {
        /// Generation.
        generation: u64,
        /// Why.
        detail: String,
    },
    /// Not sent: by the time this generation's turn came, the machine already had a newer
    /// one as its desired or applied configuration (another operator pushed meanwhile).
    /// The newer generation is the one delivered; generations never go backwards.
    Superseded {
        /// Generation that was not sent.
        generation: u64,
        /// The newer generation.
        by: u64,
    },
}

impl PushResult {
    /// The result of delivering generation `generation` given the machine's answer, or
    /// why there was none (the machine is then unreachable and the generation pending).
    pub(crate) fn from_answer(generation: u64, answer: Result<Reply, impl ToString>) -> Self {
        match answer {
            Ok(Reply::Ack(detail)) => PushResult::Ack { generation, detail },
            Ok(Reply::Nack(detail)) => PushResult::Nack { generation, detail },
            Err(e) => PushResult::Unreachable {
                generation,
                detail: e.to_string(),
            },
        }
    }

    /// The generation this result is about.
    pub(crate) fn generation(&self) -> u64 {
        match self {
            Self::Ack { generation, .. }
            | Self::Nack { generation, .. }
            | Self::Unreachable { generation, .. }
            | Self::Superseded { generation, .. } => *generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_map_to_dialects() {
        assert_eq!(Dialect::of(0), Some(Dialect::V0));
        assert_eq!(Dialect::of(1), Some(Dialect::V1));
        assert_eq!(Dialect::of(7), None);
        assert_eq!(Dialect::from_version(0), Dialect::V0);
        assert_eq!(Dialect::from_version(3), Dialect::V1);
        assert_eq!(Dialect::V1.version(), 1);
    }

    #[test]
    fn answers_per_dialect() {
        let a = Dialect::V0.ack(42, 9, "OK", 3);
        assert_eq!(
            a.to_bytes().unwrap().as_ref(),
            b"\x00\x96\x2a\x00\x02\x00OK"
        );
        let n = Dialect::V0.nack(42, 9, NackReason::NotAllowed, "no");
        assert_eq!(
            n.to_bytes().unwrap().as_ref(),
            b"\x00\x97\x2a\x00\x02\x00no"
        );
        match Message::decode(&Dialect::V1.ack(42, 9, "OK", 3)).unwrap() {
            Message::Ack(a) => assert_eq!(
                (a.request_id, a.detail.as_str(), a.generation),
                (9, "OK", 3)
            ),
            m => panic!("{m:?}"),
        }
        match Message::decode(&Dialect::V1.nack(42, 9, NackReason::NotAllowed, "no")).unwrap() {
            Message::Nack(n) => assert_eq!((n.request_id, n.reason()), (9, NackReason::NotAllowed)),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn a_stale_nack_is_a_final_nack_naming_the_stored_generation() {
        let stale = scm_proto::reply_frame(
            &Message::stale(5, 8, "generation 3 is older than the stored generation 8"),
            7,
        );
        match Dialect::V1.parse_reply(&stale, 7, 5) {
            Ok(Reply::Nack(t)) => {
                assert!(t.contains("older than the stored generation 8"), "{t}");
                assert!(t.contains("STALE") && t.contains("not retried"), "{t}");
            }
            r => panic!("{r:?}"),
        }
        let result = PushResult::from_answer(3, Dialect::V1.parse_reply(&stale, 7, 5));
        assert!(
            matches!(result, PushResult::Nack { generation: 3, .. }),
            "{result:?}"
        );
    }

    #[test]
    fn last_hello_address_compares_ips_only() {
        let peer: std::net::SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let cases = [
            (Some("10.0.0.5:3999"), true),
            (Some("10.0.0.6:4000"), false),
            (Some("not an address"), false),
            (None, false),
        ];
        for (last, want) in cases {
            assert_eq!(from_last_hello_address(last, peer), want, "{last:?}");
        }
    }

    #[test]
    fn v0_requests_have_no_ids_and_config_is_refused() {
        let msg = Frame::v0(Code::Msg, 3, &b"hi"[..]).unwrap();
        assert_eq!(
            Dialect::V0.parse(&msg, Code::Msg).unwrap(),
            Request::Msg {
                request_id: 0,
                text: "hi".into()
            }
        );
        let cfg = Frame::v0(Code::Config, 3, &b"x"[..]).unwrap();
        assert_eq!(
            Dialect::V0.parse(&cfg, Code::Config).unwrap(),
            Request::NotAccepted {
                request_id: 0,
                code: Code::Config
            }
        );
        assert_eq!(Dialect::V0.request_id(&msg), 0);
    }
}
