//! Frames: the 6-byte header plus data that every message travels in, the
//! table of message codes, and [`FrameCodec`], the `tokio_util` codec that
//! turns a byte stream into frames.
//!
//! A [`Frame`] keeps VERSION and CODE as raw bytes, so a frame with a version
//! or code this crate does not know still decodes: answering it with a NACK
//! is the receiver's business (see [`Frame::nack_if_unknown`]), not a decode
//! error. What *is* a decode error is a DATA_LENGTH above the link's limit,
//! which [`FrameCodec`] rejects from the header alone, before it reserves
//! buffer space or waits for the data.
//!
//! # Data length: checked when the frame is built, and again when encoded
//!
//! DATA_LENGTH is a `u16`, so a frame carries at most [`MAX_DATA_LEN`]
//! (65535) bytes of data. [`Frame::new`] and [`Frame::v0`] refuse longer
//! data with [`FrameError::DataTooLong`], so an oversized payload (say, a
//! configuration file too large for one frame) is caught where it is built.
//! Because [`Frame`]'s fields are public, a frame can also be built by hand;
//! [`Frame::encode`] therefore checks the length again and fails rather than
//! write a wrong DATA_LENGTH. Nothing is ever truncated silently.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::v1;

/// Length of the frame header in bytes (VERSION, CODE, ID, DATA_LENGTH).
pub const HEADER_LEN: usize = 6;

/// Largest data length a frame can carry: DATA_LENGTH is a `u16`.
pub const MAX_DATA_LEN: usize = 65535;

/// Protocol version 0: raw payloads; ACK/NACK data is a status text.
pub const VERSION_0: u8 = 0;

/// Protocol version 1: each frame's data is one protobuf message of
/// [`crate::v1`], chosen by its code.
pub const VERSION_1: u8 = 1;

/// The protocol versions this crate speaks, lowest first.
pub const SUPPORTED_VERSIONS: &[u8] = &[VERSION_0, VERSION_1];

/// The byte order of a frame's ID and DATA_LENGTH.
///
/// The protocol is little-endian. Some version-0 machines (one public 2019/20
/// simulator among them) encode both fields big-endian; a link to such a
/// machine is configured with [`ByteOrder::Big`], which then applies to
/// version-0 frames only: every other version is little-endian by definition,
/// so a link can tell the two apart from the VERSION byte, which comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ByteOrder {
    /// First byte least significant (the protocol's order).
    #[default]
    Little,
    /// First byte most significant (non-conformant version-0 machines).
    Big,
}

impl ByteOrder {
    /// The order of a frame of `version` on a link whose version-0 frames use
    /// `self`.
    pub fn for_version(self, version: u8) -> ByteOrder {
        if version == VERSION_0 {
            self
        } else {
            ByteOrder::Little
        }
    }

    fn read(self, bytes: [u8; 2]) -> u16 {
        match self {
            ByteOrder::Little => u16::from_le_bytes(bytes),
            ByteOrder::Big => u16::from_be_bytes(bytes),
        }
    }

    fn write(self, value: u16) -> [u8; 2] {
        match self {
            ByteOrder::Little => value.to_le_bytes(),
            ByteOrder::Big => value.to_be_bytes(),
        }
    }
}

/// A message code (the CODE byte of the header).
///
/// Codes 0-3, 150 and 151 exist in every version; [`Code::Swipe`] and
/// [`Code::Heartbeat`] only in version 1 (see [`Code::is_known_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// 0: machine to SCM, first frame of a connection.
    Hello,
    /// 1: machine to SCM, a text message.
    Msg,
    /// 2: SCM to machine, a configuration to store.
    Config,
    /// 3: SCM to machine, reset the session.
    Reset,
    /// 4 (version 1 only): machine to SCM, a card swipe.
    Swipe,
    /// 5 (version 1 only): machine to SCM, keep-alive.
    Heartbeat,
    /// 150: the request was accepted.
    Ack,
    /// 151: the request was refused.
    Nack,
}

impl Code {
    /// Every code, in byte order.
    pub const ALL: [Code; 8] = [
        Code::Hello,
        Code::Msg,
        Code::Config,
        Code::Reset,
        Code::Swipe,
        Code::Heartbeat,
        Code::Ack,
        Code::Nack,
    ];

    /// The CODE byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Code::Hello => 0,
            Code::Msg => 1,
            Code::Config => 2,
            Code::Reset => 3,
            Code::Swipe => 4,
            Code::Heartbeat => 5,
            Code::Ack => 150,
            Code::Nack => 151,
        }
    }

    /// The code for a CODE byte, or `None` if no version defines it.
    pub fn from_byte(b: u8) -> Option<Code> {
        match b {
            0 => Some(Code::Hello),
            1 => Some(Code::Msg),
            2 => Some(Code::Config),
            3 => Some(Code::Reset),
            4 => Some(Code::Swipe),
            5 => Some(Code::Heartbeat),
            150 => Some(Code::Ack),
            151 => Some(Code::Nack),
            _ => None,
        }
    }

    /// The code's name as the protocol documents it: `"HELLO"`, `"MSG"`,
    /// `"CONFIG"`, `"RESET"`, `"SWIPE"`, `"HEARTBEAT"`, `"ACK"`, `"NACK"`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Hello => "HELLO",
            Code::Msg => "MSG",
            Code::Config => "CONFIG",
            Code::Reset => "RESET",
            Code::Swipe => "SWIPE",
            Code::Heartbeat => "HEARTBEAT",
            Code::Ack => "ACK",
            Code::Nack => "NACK",
        }
    }

    /// Whether this code exists in protocol `version`. SWIPE and HEARTBEAT
    /// exist only in version 1; every code is unknown in an unsupported
    /// version.
    pub fn is_known_in(self, version: u8) -> bool {
        match version {
            VERSION_0 => !matches!(self, Code::Swipe | Code::Heartbeat),
            VERSION_1 => true,
            _ => false,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One frame: header fields plus data.
///
/// `version` and `code` are the raw header bytes, so frames with an unknown
/// version or code can be represented (and answered with a NACK). Build
/// frames with [`Frame::new`] or [`Frame::v0`], which check the data length;
/// a frame built by hand is checked again by [`Frame::encode`].
///
/// `Debug` prints the data bytes; for logs prefer `Display`, which prints only
/// the header (payloads may hold card numbers, which are bearer tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// VERSION byte.
    pub version: u8,
    /// CODE byte; see [`Code`].
    pub code: u8,
    /// Machine id (the ID field, little-endian on the wire).
    pub id: u16,
    /// RAW_DATA: at most [`MAX_DATA_LEN`] bytes.
    pub data: Bytes,
}

impl Frame {
    /// A frame of `version` with a known `code`.
    ///
    /// # Errors
    ///
    /// [`FrameError::DataTooLong`] if `data` is longer than [`MAX_DATA_LEN`].
    pub fn new(
        version: u8,
        code: Code,
        id: u16,
        data: impl Into<Bytes>,
    ) -> Result<Frame, FrameError> {
        let data = data.into();
        check_data_len(data.len())?;
        Ok(Frame {
            version,
            code: code.byte(),
            id,
            data,
        })
    }

    /// A version-0 frame (raw payload; for ACK/NACK a status text).
    ///
    /// # Errors
    ///
    /// [`FrameError::DataTooLong`] if `data` is longer than [`MAX_DATA_LEN`].
    pub fn v0(code: Code, id: u16, data: impl Into<Bytes>) -> Result<Frame, FrameError> {
        Frame::new(VERSION_0, code, id, data)
    }

    /// The frame's code, or `None` if the CODE byte is not a known code.
    ///
    /// A known code may still be invalid in the frame's version; check with
    /// [`Code::is_known_in`].
    pub fn code(&self) -> Option<Code> {
        Code::from_byte(self.code)
    }

    /// The encoded length of this frame: header plus data.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Appends the frame's wire bytes to `dst`.
    ///
    /// # Errors
    ///
    /// [`FrameError::DataTooLong`] if the data is longer than
    /// [`MAX_DATA_LEN`] (only possible for a frame built by hand); nothing is
    /// written to `dst` then.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode_with(dst, ByteOrder::Little)
    }

    /// [`Frame::encode`] on a link whose version-0 frames use `v0_order`
    /// (see [`ByteOrder`]).
    ///
    /// # Errors
    ///
    /// As [`Frame::encode`].
    pub fn encode_with(&self, dst: &mut BytesMut, v0_order: ByteOrder) -> Result<(), FrameError> {
        let len = check_data_len(self.data.len())?;
        let order = v0_order.for_version(self.version);
        dst.reserve(self.encoded_len());
        dst.put_u8(self.version);
        dst.put_u8(self.code);
        dst.put_slice(&order.write(self.id));
        dst.put_slice(&order.write(len));
        dst.extend_from_slice(&self.data);
        Ok(())
    }

    /// The frame's wire bytes.
    ///
    /// # Errors
    ///
    /// As [`Frame::encode`].
    pub fn to_bytes(&self) -> Result<Bytes, FrameError> {
        self.to_bytes_with(ByteOrder::Little)
    }

    /// [`Frame::to_bytes`] on a link whose version-0 frames use `v0_order`.
    ///
    /// # Errors
    ///
    /// As [`Frame::encode`].
    pub fn to_bytes_with(&self, v0_order: ByteOrder) -> Result<Bytes, FrameError> {
        let mut dst = BytesMut::with_capacity(self.encoded_len());
        self.encode_with(&mut dst, v0_order)?;
        Ok(dst.freeze())
    }

    /// The data as text (invalid UTF-8 replaced by U+FFFD), for version-0
    /// status texts and messages.
    pub fn text_lossy(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The NACK to send back if this frame's version or code is unknown, or
    /// `None` if both are known.
    ///
    /// - Unknown version: a version-0 NACK whose text names the supported
    ///   versions: `unsupported protocol version 7; supported versions: 0, 1`.
    /// - Unknown code in version 0: a version-0 NACK with the text
    ///   `unknown code 9 in version 0`.
    /// - Unknown code in version 1: a version-1 [`v1::Nack`] with reason
    ///   `UNKNOWN_CODE`, request id 0 (the payload cannot be read) and the same
    ///   kind of text as detail.
    ///
    /// The NACK carries this frame's ID. See [`Frame::protocol_nack`].
    pub fn nack_if_unknown(&self) -> Option<Frame> {
        if !SUPPORTED_VERSIONS.contains(&self.version) {
            let detail = format!("unsupported protocol version {}", self.version);
            return Some(Frame::protocol_nack(
                self.version,
                self.id,
                v1::NackReason::UnknownVersion,
                detail,
            ));
        }
        if self.code().is_some_and(|c| c.is_known_in(self.version)) {
            return None;
        }
        let detail = format!("unknown code {} in version {}", self.code, self.version);
        Some(Frame::protocol_nack(
            self.version,
            self.id,
            v1::NackReason::UnknownCode,
            detail,
        ))
    }

    /// A NACK for a frame that could not be handled as a request (unknown
    /// version or code, a declared length over the link limit, an unreadable
    /// payload), answered in the sender's `version` with the sender's `id`:
    ///
    /// - version 1: a version-1 [`v1::Nack`] with `reason`, request id 0 (the
    ///   request's id is unknown) and `detail`;
    /// - version 0: a version-0 NACK whose text is `detail`;
    /// - any other version: a version-0 NACK whose text is `detail` followed
    ///   by `; supported versions: 0, 1`.
    ///
    /// `detail` is cut (at a character boundary) to at most
    /// [`MAX_NACK_DETAIL`] bytes, so the frame always fits.
    pub fn protocol_nack(
        version: u8,
        id: u16,
        reason: v1::NackReason,
        detail: impl Into<String>,
    ) -> Frame {
        let mut detail = detail.into();
        truncate_at_char(&mut detail, MAX_NACK_DETAIL);
        let (version, data) = match version {
            VERSION_1 => {
                let nack = v1::Nack {
                    request_id: 0,
                    reason: reason.into(),
                    detail,
                    generation: 0,
                };
                (VERSION_1, prost::Message::encode_to_vec(&nack))
            }
            VERSION_0 => (VERSION_0, detail.into_bytes()),
            _ => {
                let versions = SUPPORTED_VERSIONS
                    .iter()
                    .map(u8::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let text = format!("{detail}; supported versions: {versions}");
                (VERSION_0, text.into_bytes())
            }
        };
        // At most MAX_NACK_DETAIL plus a few dozen bytes: always fits.
        debug_assert!(data.len() <= MAX_DATA_LEN);
        Frame {
            version,
            code: Code::Nack.byte(),
            id,
            data: data.into(),
        }
    }
}

/// A version-0 frame carrying a status text (ACK/NACK data, MSG text), cut at a character
/// boundary to [`MAX_NACK_DETAIL`] bytes so that it always fits: use it for answers whose
/// text is built from runtime values.
pub fn text_frame(code: Code, id: u16, text: &str) -> Frame {
    let mut text = text.to_string();
    truncate_at_char(&mut text, MAX_NACK_DETAIL);
    Frame {
        version: VERSION_0,
        code: code.byte(),
        id,
        data: Bytes::from(text.into_bytes()),
    }
}

/// A version-1 frame for a message that is small by construction (ACK, NACK, HELLO,
/// HEARTBEAT, SWIPE). ACK and NACK details are cut to [`MAX_NACK_DETAIL`] bytes first; if
/// the message still does not fit, the result is a NACK saying so, never a panic.
pub fn reply_frame(message: &v1::Message, id: u16) -> Frame {
    let mut message = message.clone();
    match &mut message {
        v1::Message::Ack(a) => truncate_at_char(&mut a.detail, MAX_NACK_DETAIL),
        v1::Message::Nack(n) => truncate_at_char(&mut n.detail, MAX_NACK_DETAIL),
        _ => {}
    }
    message.to_frame(id).unwrap_or_else(|e| {
        Frame::protocol_nack(
            VERSION_1,
            id,
            v1::NackReason::Malformed,
            format!("{} does not fit in a frame: {e}", message.code().name()),
        )
    })
}

/// Longest `detail` text [`Frame::protocol_nack`] puts in a NACK, in bytes.
pub const MAX_NACK_DETAIL: usize = 1024;

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// `len` as a DATA_LENGTH value, or [`FrameError::DataTooLong`].
fn check_data_len(len: usize) -> Result<u16, FrameError> {
    u16::try_from(len).map_err(|_| FrameError::DataTooLong {
        declared: len,
        max: MAX_DATA_LEN,
    })
}

impl fmt::Display for Frame {
    /// Header only: `v1 HELLO id=42 len=17` (unknown codes as `code 9`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{} ", self.version)?;
        match self.code() {
            Some(code) => write!(f, "{code}")?,
            None => write!(f, "code {}", self.code)?,
        }
        write!(f, " id={} len={}", self.id, self.data.len())
    }
}

/// Why a byte stream could not be turned into frames, or a frame into bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The DATA_LENGTH in a header (or the data of a frame being built) is
    /// above the limit. When decoding, the stream cannot be trusted after
    /// this: answer with a NACK and close the link.
    #[error("frame declares {declared} data bytes but this link accepts at most {max}")]
    DataTooLong {
        /// Data length the header declared (or the frame holds).
        declared: usize,
        /// The limit in force.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended mid-frame: {have} of the frame's {need} bytes arrived")]
    Truncated {
        /// Bytes of the frame that arrived (header included).
        have: usize,
        /// Bytes the frame needs (header included; just the header length if
        /// the header itself is incomplete).
        need: usize,
    },
    /// Reading or writing the underlying stream failed.
    #[error("i/o error on the frame stream: {0}")]
    Io(#[from] std::io::Error),
}

/// How many bytes the frame starting at `buf[0]` needs in total: the header
/// length while the header is incomplete, then header plus declared data.
pub(crate) fn needed_len(buf: &[u8], v0_order: ByteOrder) -> usize {
    match declared_len(buf, v0_order) {
        Some(declared) => HEADER_LEN + declared,
        None => HEADER_LEN,
    }
}

/// DATA_LENGTH of the header at the start of `buf`, if the header is complete.
fn declared_len(buf: &[u8], v0_order: ByteOrder) -> Option<usize> {
    Header::parse_with(buf, v0_order).map(|h| usize::from(h.data_len))
}

/// The header of a frame, parsed on its own: what a receiver knows about a
/// frame it refuses to read in full (for example one whose DATA_LENGTH is
/// over the link limit), so that it can answer in the sender's version and
/// with the sender's id. See [`crate::FrameReader::pending_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// VERSION byte.
    pub version: u8,
    /// CODE byte.
    pub code: u8,
    /// Machine id.
    pub id: u16,
    /// Declared DATA_LENGTH.
    pub data_len: u16,
}

impl Header {
    /// Parses the header at the start of `buf`; `None` if `buf` is shorter
    /// than [`HEADER_LEN`].
    pub fn parse(buf: &[u8]) -> Option<Header> {
        Header::parse_with(buf, ByteOrder::Little)
    }

    /// [`Header::parse`] on a link whose version-0 frames use `v0_order`.
    pub fn parse_with(buf: &[u8], v0_order: ByteOrder) -> Option<Header> {
        match buf.get(..HEADER_LEN)? {
            &[version, code, id_a, id_b, len_a, len_b] => {
                let order = v0_order.for_version(version);
                Some(Header {
                    version,
                    code,
                    id: order.read([id_a, id_b]),
                    data_len: order.read([len_a, len_b]),
                })
            }
            _ => None,
        }
    }
}

/// A `tokio_util` codec for frames, with a per-link maximum data length.
///
/// The decoder reads DATA_LENGTH from the header and, if it is above the
/// limit, fails with [`FrameError::DataTooLong`] at once, before reserving
/// buffer space or waiting for the data. An incomplete frame is not an error
/// (`Ok(None)`: read more); at end of stream a partial frame is
/// [`FrameError::Truncated`]. Unknown versions and codes decode normally.
///
/// The encoder enforces only the protocol maximum ([`MAX_DATA_LEN`]): the
/// link limit bounds what this side accepts, and the peer has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max_data_len: usize,
    v0_order: ByteOrder,
}

impl FrameCodec {
    /// A codec accepting at most `max_data_len` data bytes per frame; values
    /// above [`MAX_DATA_LEN`] are clamped to it.
    pub fn new(max_data_len: usize) -> Self {
        FrameCodec {
            max_data_len: max_data_len.min(MAX_DATA_LEN),
            v0_order: ByteOrder::Little,
        }
    }

    /// This codec for a link whose version-0 frames encode ID and
    /// DATA_LENGTH in `order` (see [`ByteOrder`]); frames of other versions
    /// stay little-endian.
    pub fn with_v0_byte_order(self, order: ByteOrder) -> Self {
        FrameCodec {
            v0_order: order,
            ..self
        }
    }

    /// The byte order of version-0 frames on this link.
    pub fn v0_byte_order(&self) -> ByteOrder {
        self.v0_order
    }

    /// The maximum data length this codec accepts when decoding.
    pub fn max_data_len(&self) -> usize {
        self.max_data_len
    }

    /// The most bytes one frame can occupy on this link: header plus the
    /// maximum data length. A reader never needs to buffer more than this.
    pub fn max_frame_len(&self) -> usize {
        HEADER_LEN + self.max_data_len
    }
}

impl Default for FrameCodec {
    /// Accepts the protocol maximum, [`MAX_DATA_LEN`].
    fn default() -> Self {
        FrameCodec::new(MAX_DATA_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = Header::parse_with(src, self.v0_order) else {
            // The header is at most 6 bytes: reserving it is always safe.
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        };
        let declared = usize::from(header.data_len);
        if declared > self.max_data_len {
            return Err(FrameError::DataTooLong {
                declared,
                max: self.max_data_len,
            });
        }
        let need = HEADER_LEN + declared;
        if src.len() < need {
            src.reserve(need - src.len());
            return Ok(None);
        }
        let mut raw = src.split_to(need);
        raw.advance(HEADER_LEN); // already parsed
        Ok(Some(Frame {
            version: header.version,
            code: header.code,
            id: header.id,
            data: raw.freeze(),
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                have: src.len(),
                need: needed_len(src, self.v0_order),
            }),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        frame.encode_with(dst, self.v0_order)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        frame.encode_with(dst, self.v0_order)
    }
}

#[cfg(test)]
mod tests;
