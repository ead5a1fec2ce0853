//! Version 1 of the protocol: one protobuf message per frame.
//!
//! The message types ([`Hello`], [`Msg`], [`Config`], [`Reset`], [`Swipe`],
//! [`Heartbeat`], [`Ack`], [`Nack`] and the [`NackReason`] enum) are generated
//! by `prost` from `proto/scm/machine/v1/machine.proto` (package
//! `scm.machine.v1`); their field docs come from that file. [`Message`] ties
//! them to frame codes: [`Message::decode`] reads a version-1 frame and
//! [`Message::to_frame`] builds one.
//!
//! Every request carries a `request_id` that the ACK or NACK answering it
//! echoes; [`Message::ack_for`] and [`Message::nack_for`] build such answers.

use prost::Message as _;

use crate::frame::{Code, Frame, FrameError, VERSION_1};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/scm.machine.v1.rs"));
}

pub use generated::{Ack, Config, Heartbeat, Hello, Msg, Nack, NackReason, Reset, Swipe};

/// A decoded version-1 message: the frame's code selects the variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// HELLO (code 0).
    Hello(Hello),
    /// MSG (code 1).
    Msg(Msg),
    /// CONFIG (code 2).
    Config(Config),
    /// RESET (code 3).
    Reset(Reset),
    /// SWIPE (code 4).
    Swipe(Swipe),
    /// HEARTBEAT (code 5).
    Heartbeat(Heartbeat),
    /// ACK (code 150).
    Ack(Ack),
    /// NACK (code 151).
    Nack(Nack),
}

impl Message {
    /// Decodes the payload of a version-1 frame according to its code.
    ///
    /// # Errors
    ///
    /// - [`PayloadError::WrongVersion`] if the frame is not version 1;
    /// - [`PayloadError::UnknownCode`] if its CODE byte is not a code;
    /// - [`PayloadError::Protobuf`] if the data is not a valid message for
    ///   the code.
    ///
    /// [`PayloadError::nack_reason`] gives the matching NACK reason.
    pub fn decode(frame: &Frame) -> Result<Message, PayloadError> {
        if frame.version != VERSION_1 {
            return Err(PayloadError::WrongVersion(frame.version));
        }
        let code = frame
            .code()
            .filter(|c| c.is_known_in(VERSION_1))
            .ok_or(PayloadError::UnknownCode(frame.code))?;
        let data = frame.data.clone();
        let wrap = |source| PayloadError::Protobuf { code, source };
        Ok(match code {
            Code::Hello => Message::Hello(Hello::decode(data).map_err(wrap)?),
            Code::Msg => Message::Msg(Msg::decode(data).map_err(wrap)?),
            Code::Config => Message::Config(Config::decode(data).map_err(wrap)?),
            Code::Reset => Message::Reset(Reset::decode(data).map_err(wrap)?),
            Code::Swipe => Message::Swipe(Swipe::decode(data).map_err(wrap)?),
            Code::Heartbeat => Message::Heartbeat(Heartbeat::decode(data).map_err(wrap)?),
            Code::Ack => Message::Ack(Ack::decode(data).map_err(wrap)?),
            Code::Nack => Message::Nack(Nack::decode(data).map_err(wrap)?),
        })
    }

    /// The frame code that carries this message.
    pub fn code(&self) -> Code {
        match self {
            Message::Hello(_) => Code::Hello,
            Message::Msg(_) => Code::Msg,
            Message::Config(_) => Code::Config,
            Message::Reset(_) => Code::Reset,
            Message::Swipe(_) => Code::Swipe,
            Message::Heartbeat(_) => Code::Heartbeat,
            Message::Ack(_) => Code::Ack,
            Message::Nack(_) => Code::Nack,
        }
    }

    /// The message's `request_id`: the request's own id, or for ACK and NACK
    /// the id of the request they answer.
    pub fn request_id(&self) -> u64 {
        match self {
            Message::Hello(m) => m.request_id,
            Message::Msg(m) => m.request_id,
            Message::Config(m) => m.request_id,
            Message::Reset(m) => m.request_id,
            Message::Swipe(m) => m.request_id,
            Message::Heartbeat(m) => m.request_id,
            Message::Ack(m) => m.request_id,
            Message::Nack(m) => m.request_id,
        }
    }

    /// The protobuf encoding of the message (the frame's data).
    pub fn encode_payload(&self) -> Vec<u8> {
        match self {
            Message::Hello(m) => m.encode_to_vec(),
            Message::Msg(m) => m.encode_to_vec(),
            Message::Config(m) => m.encode_to_vec(),
            Message::Reset(m) => m.encode_to_vec(),
            Message::Swipe(m) => m.encode_to_vec(),
            Message::Heartbeat(m) => m.encode_to_vec(),
            Message::Ack(m) => m.encode_to_vec(),
            Message::Nack(m) => m.encode_to_vec(),
        }
    }

    /// A version-1 frame carrying this message, with ID `machine_id`.
    ///
    /// # Errors
    ///
    /// [`FrameError::DataTooLong`] if the encoded message is longer than
    /// 65535 bytes, which messages with unbounded fields can be (a CONFIG's
    /// `content`, a MSG's `text`, many HELLO `readers`).
    pub fn to_frame(&self, machine_id: u16) -> Result<Frame, FrameError> {
        Frame::new(VERSION_1, self.code(), machine_id, self.encode_payload())
    }

    /// An ACK answering the request `request_id`.
    pub fn ack(request_id: u64, detail: impl Into<String>, generation: u64) -> Message {
        Message::Ack(Ack {
            request_id,
            detail: detail.into(),
            generation,
        })
    }

    /// A NACK refusing the request `request_id`.
    pub fn nack(request_id: u64, reason: NackReason, detail: impl Into<String>) -> Message {
        Message::Nack(Nack {
            request_id,
            reason: reason.into(),
            detail: detail.into(),
            generation: 0,
        })
    }

    /// A NACK `STALE` refusing the CONFIG `request_id` because the machine has stored
    /// generation `stored` already (docs/protocol.md section 7).
    pub fn stale(request_id: u64, stored: u64, detail: impl Into<String>) -> Message {
        Message::Nack(Nack {
            request_id,
            reason: NackReason::Stale.into(),
            detail: detail.into(),
            generation: stored,
        })
    }

    /// An ACK answering this message (echoes its `request_id`).
    pub fn ack_for(&self, detail: impl Into<String>, generation: u64) -> Message {
        Message::ack(self.request_id(), detail, generation)
    }

    /// A NACK refusing this message (echoes its `request_id`).
    pub fn nack_for(&self, reason: NackReason, detail: impl Into<String>) -> Message {
        Message::nack(self.request_id(), reason, detail)
    }
}

macro_rules! impl_from_for_message {
    ($($ty:ident),*) => {
        $(impl From<$ty> for Message {
            fn from(m: $ty) -> Message {
                Message::$ty(m)
            }
        })*
    };
}

impl_from_for_message!(Hello, Msg, Config, Reset, Swipe, Heartbeat, Ack, Nack);

/// Why the data of a frame is not a version-1 message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The frame is not a version-1 frame.
    #[error("expected a version-1 frame, got version {0}")]
    WrongVersion(u8),
    /// The frame's CODE byte is not a version-1 message code.
    #[error("code {0} is not a version-1 message code")]
    UnknownCode(u8),
    /// The data is not a valid protobuf encoding of the code's message.
    #[error("{code} payload is not a valid protobuf message: {source}")]
    Protobuf {
        /// The frame's code.
        code: Code,
        /// What prost found wrong.
        source: prost::DecodeError,
    },
}

impl PayloadError {
    /// The NACK reason that answers a frame failing this way:
    /// `UNKNOWN_VERSION`, `UNKNOWN_CODE` or `MALFORMED`.
    pub fn nack_reason(&self) -> NackReason {
        match self {
            PayloadError::WrongVersion(_) => NackReason::UnknownVersion,
            PayloadError::UnknownCode(_) => NackReason::UnknownCode,
            PayloadError::Protobuf { .. } => NackReason::Malformed,
        }
    }
}

#[cfg(test)]
mod tests;
