//! The SCM machine protocol: frames, their codec, and the version-1 messages.
//!
//! Machines (agents) and the SCM hub exchange *frames* over mutual-TLS TCP.
//! Every frame is a 6-byte header followed by up to 65535 bytes of data:
//!
//! ```text
//! offset 0  VERSION      u8
//! offset 1  CODE         u8   0 HELLO, 1 MSG, 2 CONFIG, 3 RESET, 150 ACK, 151 NACK
//!                             (version 1 adds 4 SWIPE, 5 HEARTBEAT)
//! offset 2  ID           u16 little-endian: machine id
//! offset 4  DATA_LENGTH  u16 little-endian
//! offset 6  RAW_DATA     DATA_LENGTH bytes
//! ```
//!
//! Version 0 (third-party machines) carries raw payloads; version 1 (this
//! project's agents) carries one protobuf message per frame. The full
//! contract, with annotated example frames, is `docs/protocol.md`.
//!
//! # Layout
//!
//! - [`frame`]: the [`Frame`] type, the [`Code`] table, and [`FrameCodec`], a
//!   `tokio_util` codec that checks the declared length before buffering.
//! - [`v1`]: the protobuf messages (generated from
//!   `proto/scm/machine/v1/machine.proto`) and [`v1::Message`], which maps
//!   frames to messages and back.
//! - [`io`]: [`FrameReader`], a bounded reader with idle and stall timeouts,
//!   and [`write_frame`].
//! - [`admin`]: the admin API (`scm.admin.v1`), gRPC messages with the tonic client
//!   and server of the `Admin` service (generated from
//!   `proto/scm/admin/v1/admin.proto`).
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use scm_proto::{Code, Frame, FrameCodec, v1::Message};
//! use tokio_util::codec::Decoder;
//!
//! // A version-0 HELLO from machine 42, as a third-party machine sends it.
//! let hello = Frame::v0(Code::Hello, 42, "hello")?;
//! assert_eq!(&hello.to_bytes()?[..], b"\x00\x00\x2a\x00\x05\x00hello");
//!
//! // A version-1 ACK echoing request 7, through the codec.
//! let ack = Message::ack(7, "stored", 3).to_frame(42)?;
//! let mut buf = BytesMut::from(&ack.to_bytes()?[..]);
//! let decoded = FrameCodec::new(4096).decode(&mut buf)?.expect("a whole frame");
//! assert_eq!(Message::decode(&decoded)?.request_id(), 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Link limits (maximum data length) and timeouts are not fixed here: the
//! binaries own them as configuration and pass them in.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod frame;
pub mod io;
pub mod v1;

pub use frame::{
    ByteOrder, Code, Frame, FrameCodec, FrameError, HEADER_LEN, Header, MAX_DATA_LEN,
    MAX_NACK_DETAIL, SUPPORTED_VERSIONS, VERSION_0, VERSION_1, reply_frame, text_frame,
};
pub use io::{FrameReader, ReadError, write_frame, write_frame_with};
pub use v1::{Message, PayloadError};

#[cfg(test)]
mod doc_examples;
