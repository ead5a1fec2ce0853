//! Telnet decoder and encoder ([`TelnetCodec`]) for `tokio_util::codec`.
//!
//! Decoding is a byte state machine (RFC 854) that consumes every byte it looks at,
//! so splitting the input at any byte boundary yields the same events. In
//! [`Mode::Lines`] (server) text is assembled into lines with BS/DEL editing; in
//! [`Mode::Raw`] (client) text is delivered as it arrives. Lines are bounded by
//! `max_line`, subnegotiations by `max_sb` (longer ones are skipped), and at most
//! one decoded event is held back between calls.

use std::io;
use std::mem;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::consts::{DO, DONT, IAC, SB, SE, WILL, WONT};

const NUL: u8 = 0;
/// Ctrl-C as a byte (End of Text): what plink and telnetlib3 send instead of `IAC IP`.
const ETX: u8 = 0x03;
/// Ctrl-D as a byte (End of Transmission).
const EOT: u8 = 0x04;
const BS: u8 = 0x08;
const LF: u8 = b'\n';
const CR: u8 = b'\r';
const DEL: u8 = 0x7f;

/// A negotiation verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `WILL`: the sender offers to enable (or confirms enabling) an option on its side.
    Will,
    /// `WONT`: the sender refuses (or stops) an option on its side.
    Wont,
    /// `DO`: the sender asks the receiver to enable an option.
    Do,
    /// `DONT`: the sender asks the receiver to disable an option.
    Dont,
}

impl Verb {
    /// The command byte of this verb.
    pub fn byte(self) -> u8 {
        match self {
            Verb::Will => WILL,
            Verb::Wont => WONT,
            Verb::Do => DO,
            Verb::Dont => DONT,
        }
    }

    /// The verb for a command byte, if it is one.
    pub fn from_byte(byte: u8) -> Option<Verb> {
        match byte {
            WILL => Some(Verb::Will),
            WONT => Some(Verb::Wont),
            DO => Some(Verb::Do),
            DONT => Some(Verb::Dont),
            _ => None,
        }
    }
}

/// How the decoder delivers text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Server side: complete lines ([`Event::Line`]), with BS/DEL editing.
    Lines,
    /// Client side: text as it arrives ([`Event::Data`]), so prompts show up.
    Raw,
}

/// A decoded item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// [`Mode::Lines`]: one complete line, without its terminator.
    Line(Vec<u8>),
    /// [`Mode::Raw`]: text (IAC IAC unescaped, CR NUL turned into CR).
    Data(Bytes),
    /// A two-byte command such as IP, AYT, NOP, GA, BRK, AO, EC, EL or DM.
    Command(u8),
    /// WILL/WONT/DO/DONT for an option.
    Negotiate {
        /// The verb.
        verb: Verb,
        /// The option code.
        option: u8,
    },
    /// `IAC SB option data IAC SE`, with IAC IAC inside `data` unescaped.
    Subnegotiation {
        /// The option code.
        option: u8,
        /// The payload (at most `max_sb` bytes).
        data: Bytes,
    },
    /// [`Mode::Lines`]: the current line exceeded `limit` bytes; the rest of that
    /// line is discarded.
    LineTooLong {
        /// The configured `max_line`.
        limit: usize,
    },
    /// [`Mode::Lines`]: a raw Ctrl-C byte (0x03), which clients that do not map Ctrl-C to
    /// `IAC IP` (plink, telnetlib3) send as it is. In line mode it can only mean an
    /// interrupt, never text: the line being typed is dropped, as for `IAC IP`.
    Interrupt,
    /// [`Mode::Lines`]: Ctrl-D (0x04) at the start of a line, the terminal convention
    /// for end of input. Elsewhere in a line 0x04 stays text.
    EndOfInput,
}

/// An item to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Text: `\n` and `\r\n` become CR LF, a bare `\r` becomes CR NUL, 0xFF is doubled.
    Text(String),
    /// Bytes as given, with 0xFF doubled.
    Raw(Bytes),
    /// `IAC byte`.
    Command(u8),
    /// `IAC verb option`.
    Negotiate(Verb, u8),
    /// `IAC SB option payload IAC SE` with IAC doubled in the payload. Option 255
    /// (EXOPL) is not supported: this decoder skips such subnegotiations.
    Subnegotiation(u8, Bytes),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    /// After a CR: a following NUL (and LF in [`Mode::Lines`]) is swallowed.
    Cr,
    Iac,
    Verb(Verb),
    SbOption,
    Sb,
    SbIac,
}

/// Telnet decoder/encoder for `tokio_util::codec::Framed`.
#[derive(Debug)]
pub struct TelnetCodec {
    mode: Mode,
    state: State,
    max_line: usize,
    max_sb: usize,
    /// The line being assembled (Lines mode), at most `max_line` bytes.
    line: Vec<u8>,
    /// Discarding the rest of an over-long line.
    discarding: bool,
    /// Raw-mode text not yet delivered; emptied before `decode` returns.
    raw: BytesMut,
    /// Option of the subnegotiation being collected; `None` while skipping one.
    sb_option: Option<u8>,
    /// Subnegotiation payload, at most `max_sb` bytes.
    sb: Vec<u8>,
    /// An event decoded while raw text had to be delivered first.
    pending: Option<Event>,
}

impl TelnetCodec {
    /// A codec with `max_line` 4096 and `max_sb` 512.
    pub fn new(mode: Mode) -> Self {
        Self::with_limits(mode, 4096, 512)
    }

    /// A codec with explicit limits (a `max_line` of 0 is treated as 1).
    pub fn with_limits(mode: Mode, max_line: usize, max_sb: usize) -> Self {
        Self {
            mode,
            state: State::Data,
            max_line: max_line.max(1),
            max_sb,
            line: Vec::new(),
            discarding: false,
            raw: BytesMut::new(),
            sb_option: None,
            sb: Vec::new(),
            pending: None,
        }
    }

    /// Switches the mode. A partially assembled line is delivered as
    /// [`Event::Data`] when switching from Lines to Raw.
    pub fn set_mode(&mut self, mode: Mode) {
        if self.mode == Mode::Lines && mode == Mode::Raw {
            self.raw.extend_from_slice(&self.line);
            self.line.clear();
            self.discarding = false;
        }
        self.mode = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The line length limit.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Drops the line being assembled (Lines mode), e.g. when the user pressed Ctrl-C
    /// (`IAC IP`): what was typed before it must not be glued to the next command.
    pub fn clear_line(&mut self) {
        self.line.clear();
        self.discarding = false;
    }

    /// Feeds one byte to the state machine.
    fn step(&mut self, b: u8) -> Option<Event> {
        match self.state {
            State::Data => self.data(b),
            State::Cr => {
                self.state = State::Data;
                match (b, self.mode) {
                    (NUL, _) | (LF, Mode::Lines) => None,
                    _ => self.data(b),
                }
            }
            State::Iac => {
                self.state = State::Data;
                self.command(b)
            }
            State::Verb(verb) => {
                self.state = State::Data;
                Some(Event::Negotiate { verb, option: b })
            }
            State::SbOption => {
                self.sb.clear();
                if b == IAC {
                    // Malformed (or EXOPL): skip it.
                    self.sb_option = None;
                    self.state = State::SbIac;
                } else {
                    self.sb_option = Some(b);
                    self.state = State::Sb;
                }
                None
            }
            State::Sb => {
                if b == IAC {
                    self.state = State::SbIac;
                } else {
                    self.sb_byte(b);
                }
                None
            }
            State::SbIac => match b {
                IAC => {
                    self.state = State::Sb;
                    self.sb_byte(IAC);
                    None
                }
                SE => {
                    self.state = State::Data;
                    let data = Bytes::copy_from_slice(&self.sb);
                    self.sb.clear();
                    self.sb_option
                        .take()
                        .map(|option| Event::Subnegotiation { option, data })
                }
                _ => {
                    // IAC <command> inside SB: abandon the SB, process the command.
                    self.sb_option = None;
                    self.sb.clear();
                    self.state = State::Data;
                    self.command(b)
                }
            },
        }
    }

    /// The byte after an IAC.
    fn command(&mut self, b: u8) -> Option<Event> {
        if b == IAC {
            self.text(IAC)
        } else if b == SB {
            self.state = State::SbOption;
            None
        } else if let Some(verb) = Verb::from_byte(b) {
            self.state = State::Verb(verb);
            None
        } else {
            Some(Event::Command(b))
        }
    }

    /// A byte in the Data state.
    fn data(&mut self, b: u8) -> Option<Event> {
        match (b, self.mode) {
            (IAC, _) => {
                self.state = State::Iac;
                None
            }
            (CR, Mode::Lines) => {
                self.state = State::Cr;
                self.end_line()
            }
            (CR, Mode::Raw) => {
                self.state = State::Cr;
                self.raw.put_u8(CR);
                None
            }
            (LF, Mode::Lines) => self.end_line(),
            _ => self.text(b),
        }
    }

    /// A text byte (not a line terminator).
    fn text(&mut self, b: u8) -> Option<Event> {
        if self.mode == Mode::Raw {
            self.raw.put_u8(b);
            return None;
        }
        if b == ETX {
            self.line.clear();
            self.discarding = false;
            return Some(Event::Interrupt);
        }
        if self.discarding {
            return None;
        }
        if b == EOT && self.line.is_empty() {
            return Some(Event::EndOfInput);
        }
        if b == BS || b == DEL {
            // Erase one character: a UTF-8 lead byte with its continuation bytes.
            while let Some(last) = self.line.pop() {
                if last & 0xC0 != 0x80 {
                    break;
                }
            }
            return None;
        }
        if self.line.len() >= self.max_line {
            self.line.clear();
            self.discarding = true;
            return Some(Event::LineTooLong {
                limit: self.max_line,
            });
        }
        self.line.push(b);
        None
    }

    fn end_line(&mut self) -> Option<Event> {
        if mem::take(&mut self.discarding) {
            None
        } else {
            Some(Event::Line(mem::take(&mut self.line)))
        }
    }

    fn sb_byte(&mut self, b: u8) {
        if self.sb_option.is_none() {
            return;
        }
        if self.sb.len() >= self.max_sb {
            // Oversize: skip the whole subnegotiation and release the payload.
            self.sb_option = None;
            self.sb = Vec::new();
        } else {
            self.sb.push(b);
        }
    }

    /// Bytes held by the decoder (line, raw text, subnegotiation payload).
    #[cfg(test)]
    fn retained(&self) -> usize {
        self.line.capacity() + self.raw.capacity() + self.sb.capacity()
    }
}

impl Decoder for TelnetCodec {
    type Item = Event;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Event>> {
        if let Some(event) = self.pending.take() {
            return Ok(Some(event));
        }
        let mut used = 0;
        let mut event = None;
        for &b in src.iter() {
            used += 1;
            event = self.step(b);
            if event.is_some() || self.raw.len() >= self.max_line {
                break;
            }
        }
        src.advance(used);
        if self.raw.is_empty() {
            return Ok(event);
        }
        self.pending = event;
        Ok(Some(Event::Data(self.raw.split().freeze())))
    }
}

fn put_escaped(dst: &mut BytesMut, data: &[u8]) {
    for &b in data {
        if b == IAC {
            dst.put_u8(IAC);
        }
        dst.put_u8(b);
    }
}

/// Encodes one item (the encoder keeps no state).
pub(crate) fn encode_out(item: &Out, dst: &mut BytesMut) {
    match item {
        Out::Text(text) => {
            dst.reserve(text.len() + 2);
            let mut bytes = text.bytes().peekable();
            while let Some(b) = bytes.next() {
                match b {
                    CR if bytes.next_if_eq(&LF).is_some() => dst.put_slice(&[CR, LF]),
                    CR => dst.put_slice(&[CR, NUL]),
                    LF => dst.put_slice(&[CR, LF]),
                    IAC => dst.put_slice(&[IAC, IAC]),
                    _ => dst.put_u8(b),
                }
            }
        }
        Out::Raw(data) => put_escaped(dst, data),
        Out::Command(b) => dst.put_slice(&[IAC, *b]),
        Out::Negotiate(verb, option) => dst.put_slice(&[IAC, verb.byte(), *option]),
        Out::Subnegotiation(option, payload) => {
            dst.put_slice(&[IAC, SB, *option]);
            put_escaped(dst, payload);
            dst.put_slice(&[IAC, SE]);
        }
    }
}

impl Encoder<Out> for TelnetCodec {
    type Error = io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> io::Result<()> {
        encode_out(&item, dst);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::consts::{AYT, GA, IP, NOP, opt};

    /// Feeds each chunk in its own `decode` calls; checks the input is always consumed.
    pub(crate) fn feed(codec: &mut TelnetCodec, chunks: &[&[u8]]) -> Vec<Event> {
        let mut events = Vec::new();
        for chunk in chunks {
            let mut buf = BytesMut::from(*chunk);
            while let Some(ev) = codec.decode(&mut buf).expect("decode") {
                events.push(ev);
            }
            assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
            assert!(codec.pending.is_none() && codec.raw.is_empty());
        }
        events
    }

    pub(crate) fn decode_chunks(mode: Mode, chunks: &[&[u8]]) -> Vec<Event> {
        merge_data(feed(&mut TelnetCodec::new(mode), chunks))
    }

    /// Joins adjacent `Data` events (their boundaries depend on the reads).
    pub(crate) fn merge_data(events: Vec<Event>) -> Vec<Event> {
        let mut out: Vec<Event> = Vec::new();
        for ev in events {
            if let (Some(Event::Data(prev)), Event::Data(next)) = (out.last_mut(), &ev) {
                let mut joined = BytesMut::from(&prev[..]);
                joined.extend_from_slice(next);
                *prev = joined.freeze();
            } else {
                out.push(ev);
            }
        }
        out
    }

    #[test]
    fn clear_line_drops_what_was_typed_before_ctrl_c() {
        let mut c = TelnetCodec::new(Mode::Lines);
        let ev = feed(&mut c, &[b"b=", &[0xff, IP]]);
        assert_eq!(ev, vec![Event::Command(IP)]);
        c.clear_line();
        let ev = feed(&mut c, &[b"machines\r\n"]);
        assert_eq!(ev, vec![Event::Line(b"machines".to_vec())]);
    }

    /// Every split in two and three pieces, and one byte per read, give the same events.
    pub(crate) fn assert_split_invariant(mode: Mode, input: &[u8]) -> Vec<Event> {
        let whole = decode_chunks(mode, &[input]);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode_chunks(mode, &bytes), whole, "one byte per read");
        for i in 0..=input.len() {
            let (a, rest) = input.split_at(i);
            assert_eq!(decode_chunks(mode, &[a, rest]), whole, "split at {i}");
            if input.len() <= 64 {
                for j in 0..=rest.len() {
                    let (b, c) = rest.split_at(j);
                    assert_eq!(decode_chunks(mode, &[a, b, c]), whole, "split {i}+{j}");
                }
            }
        }
        whole
    }

    fn line(s: &[u8]) -> Event {
        Event::Line(s.to_vec())
    }

    fn data(s: &[u8]) -> Event {
        Event::Data(Bytes::copy_from_slice(s))
    }

    fn neg(verb: Verb, option: u8) -> Event {
        Event::Negotiate { verb, option }
    }

    fn sub(option: u8, data: &[u8]) -> Event {
        Event::Subnegotiation {
            option,
            data: Bytes::copy_from_slice(data),
        }
    }

    fn lines(chunks: &[&[u8]]) -> Vec<Event> {
        decode_chunks(Mode::Lines, chunks)
    }

    #[test]
    fn verb_bytes_round_trip() {
        for verb in [Verb::Will, Verb::Wont, Verb::Do, Verb::Dont] {
            assert_eq!(Verb::from_byte(verb.byte()), Some(verb));
        }
        assert_eq!(Verb::Will.byte(), 251);
        assert_eq!(Verb::Dont.byte(), 254);
        assert_eq!(Verb::from_byte(SB), None);
        assert_eq!(Verb::from_byte(IAC), None);
    }

    #[test]
    fn split_line() {
        assert_eq!(lines(&[b"hel", b"lo\r\n"]), vec![line(b"hello")]);
        let bytes: Vec<&[u8]> = b"status\r\n".chunks(1).collect();
        assert_eq!(lines(&bytes), vec![line(b"status")]);
    }

    #[test]
    fn line_terminators() {
        assert_eq!(
            lines(&[b"abc\n", b"def\r\n"]),
            vec![line(b"abc"), line(b"def")]
        );
        assert_eq!(
            lines(&[b"abc\r\0def\r\n"]),
            vec![line(b"abc"), line(b"def")]
        );
        assert_eq!(
            lines(&[b"one\r\ntwo\r\n"]),
            vec![line(b"one"), line(b"two")]
        );
        assert_eq!(lines(&[b"a\rb\r"]), vec![line(b"a"), line(b"b")]);
        // CR LF and CR NUL end exactly one line, also when split after the CR.
        assert_eq!(
            lines(&[b"a\r", b"\n", b"b\r", b"\0c\n"]),
            vec![line(b"a"), line(b"b"), line(b"c")]
        );
        // Bare CR then a later LF: the LF right after the CR is swallowed, later ones end lines.
        assert_eq!(lines(&[b"a\r", b"x\n"]), vec![line(b"a"), line(b"x")]);
        assert_eq!(
            lines(&[b"\r\n\r\n\n"]),
            vec![line(b""), line(b""), line(b"")]
        );
        assert_eq!(lines(&[b"a\r\r\n"]), vec![line(b"a"), line(b"")]);
    }

    #[test]
    fn backspace_and_delete_edit_the_line() {
        assert_eq!(lines(&[b"s3x\x7fcret\r\n"]), vec![line(b"s3cret")]);
        assert_eq!(lines(&[b"ab\x08\x08\x08c\r\n"]), vec![line(b"c")]);
        // A multi-byte UTF-8 character is erased whole; other control bytes stay.
        assert_eq!(lines(&["caf\u{e9}\x7f\r\n".as_bytes()]), vec![line(b"caf")]);
        assert_eq!(lines(&[b"a\x1b[1m\tb\0\r\n"]), vec![line(b"a\x1b[1m\tb\0")]);
    }

    #[test]
    fn subnegotiation_split_anywhere() {
        let naws = sub(opt::NAWS, &[0, 80, 0, 24]);
        assert_eq!(
            lines(&[b"\xff\xfa\x1f\x00\x50", b"\x00\x18\xff\xf0"]),
            vec![naws.clone()]
        );
        assert_eq!(
            lines(&[b"\xff\xfa\x1f\x00\x50\x00\x18\xff", b"\xf0"]),
            vec![naws]
        );
        // 0xF0 (SE) without IAC is payload: NAWS width 240.
        assert_eq!(
            lines(&[b"\xff\xfa\x1f\x00\xf0\x00\x18\xff\xf0"]),
            vec![sub(opt::NAWS, &[0, 240, 0, 24])]
        );
        assert_eq!(
            lines(&[b"hi\xff\xfa\x1f\x00\x50\x00\x18\xff\xf0ok\r\n"]),
            vec![sub(opt::NAWS, &[0, 80, 0, 24]), line(b"hiok")]
        );
        // IAC IAC inside SB is one 0xFF.
        assert_eq!(
            lines(&[b"\xff\xfa\x18\x00\xff", b"\xff\x01\xff\xf0"]),
            vec![sub(opt::TTYPE, &[0, 0xff, 1])]
        );
    }

    #[test]
    fn commands_do_not_leak_into_lines() {
        assert_eq!(
            lines(&[b"ab\xff\xf6cd\r\n"]),
            vec![Event::Command(AYT), line(b"abcd")]
        );
        assert_eq!(
            lines(&[b"ab\xff\xf4cd\r\n"]),
            vec![Event::Command(IP), line(b"abcd")]
        );
        assert_eq!(
            lines(&[b"\xff\xf4\xff\xfd\x06x\r\n"]),
            vec![
                Event::Command(IP),
                neg(Verb::Do, opt::TIMING_MARK),
                line(b"x")
            ]
        );
        assert_eq!(
            lines(&[b"\xff", b"\xfd\x01"]),
            vec![neg(Verb::Do, opt::ECHO)]
        );
        assert_eq!(
            lines(&[b"x\xff", b"\xfb\x27y\r\n"]),
            vec![neg(Verb::Will, opt::NEW_ENVIRON), line(b"xy")]
        );
        assert_eq!(
            lines(&[b"a\xff\xf1\xff\xf9\xff\xf0b\n"]),
            vec![
                Event::Command(NOP),
                Event::Command(GA),
                Event::Command(SE),
                line(b"ab")
            ]
        );
    }

    #[test]
    fn raw_ctrl_c_interrupts_and_ctrl_d_ends_input_at_line_start() {
        // plink's Ctrl-C in the middle of a push body: the half-typed text is dropped and
        // the next line is a line of its own, not glued to a 0x03.
        assert_eq!(
            lines(&[b"pl=partial\r\nhalf\x03machines\r\n"]),
            vec![line(b"pl=partial"), Event::Interrupt, line(b"machines")]
        );
        // Even in the middle of an over-long line being discarded.
        let mut c = TelnetCodec::with_limits(Mode::Lines, 4, 16);
        assert_eq!(
            feed(&mut c, &[b"abcdefgh\x03ok\r\n"]),
            vec![
                Event::LineTooLong { limit: 4 },
                Event::Interrupt,
                line(b"ok")
            ]
        );
        assert_eq!(lines(&[b"\x04"]), vec![Event::EndOfInput]);
        assert_eq!(lines(&[b"a\r\n\x04"]), vec![line(b"a"), Event::EndOfInput]);
        // Inside a line 0x04 is text (the content rules refuse it later).
        assert_eq!(lines(&[b"a\x04b\r\n"]), vec![line(b"a\x04b")]);
        // The client side sees the bytes as they are.
        assert_eq!(
            decode_chunks(Mode::Raw, &[b"\x03\x04"]),
            vec![data(b"\x03\x04")]
        );
        assert_split_invariant(Mode::Lines, b"ab\x03cd\r\n\x04\x04x\x04\r\n");
    }

    #[test]
    fn iac_iac_is_data() {
        assert_eq!(lines(&[b"a\xff\xffb\r\n"]), vec![line(b"a\xffb")]);
        assert_eq!(lines(&[b"a\xff", b"\xffb\r\n"]), vec![line(b"a\xffb")]);
        assert_eq!(
            lines(&[b"a\xff\xff\xff\xffb\r\n"]),
            vec![line(b"a\xff\xffb")]
        );
        assert_eq!(
            decode_chunks(Mode::Raw, &[b"a\xff", b"\xffb"]),
            vec![data(b"a\xffb")]
        );
    }

    #[test]
    fn malformed_subnegotiations() {
        // IAC SB IAC SE: skipped, following text delivered.
        assert_eq!(lines(&[b"\xff\xfa\xff\xf0ok\r\n"]), vec![line(b"ok")]);
        // IAC <command> inside SB abandons the SB and is processed.
        assert_eq!(
            lines(&[b"\xff\xfa\x1f\x00\xff\xfb\x01ok\r\n"]),
            vec![neg(Verb::Will, opt::ECHO), line(b"ok")]
        );
        assert_eq!(
            lines(&[b"\xff\xfa\x18\xff\xf4ok\n"]),
            vec![Event::Command(IP), line(b"ok")]
        );
        // Empty payload.
        assert_eq!(
            lines(&[b"\xff\xfa\x05\xff\xf0"]),
            vec![sub(opt::STATUS, b"")]
        );
    }

    #[test]
    fn long_line_reported_once_then_recovers() {
        let mut codec = TelnetCodec::with_limits(Mode::Lines, 8, 16);
        assert_eq!(codec.max_line(), 8);
        let events = feed(
            &mut codec,
            &[
                b"12345678\r\n",
                b"123456789\r\n",
                b"123456789abc",
                b"def\xff\xf4gh\r\nok\n",
            ],
        );
        assert_eq!(
            events,
            vec![
                line(b"12345678"),
                Event::LineTooLong { limit: 8 },
                Event::LineTooLong { limit: 8 },
                Event::Command(IP),
                line(b"ok"),
            ]
        );
        // Default limit.
        let long = vec![b'a'; 5000];
        let events = feed(
            &mut TelnetCodec::new(Mode::Lines),
            &[&long, b"\r\nnext\r\n"],
        );
        assert_eq!(
            events,
            vec![Event::LineTooLong { limit: 4096 }, line(b"next")]
        );
    }

    #[test]
    fn oversize_subnegotiation_is_skipped() {
        let mut input = b"\xff\xfa\x18".to_vec();
        input.extend(std::iter::repeat_n(b'x', 513));
        input.extend_from_slice(b"\xff\xf0ok\r\n\xff\xfa\x18");
        input.extend(std::iter::repeat_n(b'y', 512));
        input.extend_from_slice(b"\xff\xf0");
        let events = lines(&[&input]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], line(b"ok"));
        assert_eq!(events[1], sub(opt::TTYPE, &[b'y'; 512]));
    }

    #[test]
    fn unterminated_subnegotiation_keeps_memory_bounded() {
        let mut codec = TelnetCodec::new(Mode::Lines);
        let kib = [0x41u8; 1024];
        assert!(feed(&mut codec, &[b"\xff\xfa\x1f"]).is_empty());
        for _ in 0..4096 {
            assert!(feed(&mut codec, &[&kib]).is_empty());
            assert!(codec.retained() <= 1024, "retained {}", codec.retained());
        }
        assert_eq!(feed(&mut codec, &[b"\xff\xf0ok\r\n"]), vec![line(b"ok")]);
    }

    #[test]
    fn raw_mode_delivers_prompts_and_text() {
        assert_eq!(
            decode_chunks(Mode::Raw, &[b"login: "]),
            vec![data(b"login: ")]
        );
        assert_eq!(
            decode_chunks(Mode::Raw, &[b"> \xff\xf9"]),
            vec![data(b"> "), Event::Command(GA)]
        );
        // CR NUL -> CR (also split); CR LF, LF, BS and DEL are passed through.
        assert_eq!(
            decode_chunks(Mode::Raw, &[b"a\r", b"\0b\r\nc\n\x08\x7f"]),
            vec![data(b"a\rb\r\nc\n\x08\x7f")]
        );
        let events = feed(
            &mut TelnetCodec::new(Mode::Raw),
            &[b"ab\xff\xfb\x01cd\xff\xfa\x03\xff\xf0", b"e"],
        );
        assert_eq!(
            events,
            vec![
                data(b"ab"),
                neg(Verb::Will, opt::ECHO),
                data(b"cd"),
                sub(opt::SGA, b""),
                data(b"e"),
            ]
        );
    }

    #[test]
    fn raw_data_is_chunked_by_max_line() {
        let events = feed(
            &mut TelnetCodec::with_limits(Mode::Raw, 4, 4),
            &[b"0123456789"],
        );
        assert_eq!(events, vec![data(b"0123"), data(b"4567"), data(b"89")]);
    }

    #[test]
    fn set_mode_hands_partial_line_to_raw() {
        let mut codec = TelnetCodec::new(Mode::Lines);
        assert_eq!(feed(&mut codec, &[b"a\r\nbc"]), vec![line(b"a")]);
        codec.set_mode(Mode::Raw);
        assert_eq!(codec.mode(), Mode::Raw);
        assert_eq!(feed(&mut codec, &[b"d"]), vec![data(b"bcd")]);
        codec.set_mode(Mode::Lines);
        assert_eq!(feed(&mut codec, &[b"e\n"]), vec![line(b"e")]);
    }

    #[test]
    fn representative_streams_are_split_invariant() {
        let streams: &[(Mode, &[u8])] = &[
            (Mode::Lines, b"hello\r\nworld\nx\r\0y\rz\r\n\r\n"),
            (
                Mode::Lines,
                b"a\xff\xffb\xff\xf4c\xff\xfd\x06\r\n\xff\xfa\x1f\x00\xff\xff\x00\x18\xff\xf0",
            ),
            (
                Mode::Lines,
                b"\xff\xfa\xff\xf0ok\r\n\xff\xfa\x18\x01\xff\xfb\x01s3x\x7fcret\r\n",
            ),
            (
                Mode::Raw,
                b"login: \xff\xfb\x01\xff\xfb\x03Password: a\r\0b\r\n\xff\xff\xff\xf9",
            ),
            (Mode::Raw, b"\xff\xfa\x18\x00xterm\xff\xf0$ \r"),
        ];
        for (mode, input) in streams {
            assert!(!assert_split_invariant(*mode, input).is_empty());
        }
        let mut codec = TelnetCodec::with_limits(Mode::Lines, 4, 4);
        let input = b"toolong\r\nok\r\n\xff\xfa\x01123456\xff\xf0\xff\xfa\x011234\xff\xf0";
        let whole = feed(&mut codec, &[input]);
        assert_eq!(
            whole,
            vec![
                Event::LineTooLong { limit: 4 },
                line(b"ok"),
                sub(opt::ECHO, b"1234")
            ]
        );
        for i in 0..=input.len() {
            let mut codec = TelnetCodec::with_limits(Mode::Lines, 4, 4);
            let (a, b) = input.split_at(i);
            assert_eq!(feed(&mut codec, &[a, b]), whole);
        }
    }

    fn encode(item: Out) -> Vec<u8> {
        let mut dst = BytesMut::new();
        TelnetCodec::new(Mode::Raw)
            .encode(item, &mut dst)
            .expect("encode");
        dst.to_vec()
    }

    #[test]
    fn encoder_exact_bytes() {
        assert_eq!(
            encode(Out::Text("a\nb\r\nc\rd".into())),
            b"a\r\nb\r\nc\r\0d"
        );
        assert_eq!(encode(Out::Text("\r".into())), b"\r\0");
        assert_eq!(encode(Out::Text("\r\r\n\n".into())), b"\r\0\r\n\r\n");
        assert_eq!(
            encode(Out::Text("caf\u{e9}".into())),
            "caf\u{e9}".as_bytes()
        );
        assert_eq!(
            encode(Out::Raw(Bytes::from_static(b"\xffa\xff\xff\n"))),
            b"\xff\xffa\xff\xff\xff\xff\n"
        );
        assert_eq!(encode(Out::Command(GA)), b"\xff\xf9");
        assert_eq!(
            encode(Out::Negotiate(Verb::Will, opt::ECHO)),
            b"\xff\xfb\x01"
        );
        assert_eq!(
            encode(Out::Negotiate(Verb::Wont, opt::ECHO)),
            b"\xff\xfc\x01"
        );
        assert_eq!(encode(Out::Negotiate(Verb::Do, opt::NAWS)), b"\xff\xfd\x1f");
        assert_eq!(
            encode(Out::Negotiate(Verb::Dont, opt::TTYPE)),
            b"\xff\xfe\x18"
        );
        assert_eq!(
            encode(Out::Subnegotiation(
                opt::TTYPE,
                Bytes::from_static(b"\x01\xff")
            )),
            b"\xff\xfa\x18\x01\xff\xff\xff\xf0"
        );
    }

    /// xorshift64* pseudo-random numbers.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n).expect("u64")).expect("usize")
        }

        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }

        /// Cuts `input` into reads of 1..=max bytes.
        fn split<'a>(&mut self, input: &'a [u8]) -> Vec<&'a [u8]> {
            let max = [1, 2, 3, 8, 32, 256][self.below(6)];
            let mut rest = input;
            let mut chunks = Vec::new();
            while !rest.is_empty() {
                let (a, b) = rest.split_at((1 + self.below(max)).min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            chunks
        }
    }

    #[test]
    fn fuzz_random_bytes_no_panic_bounded_memory() {
        const TELNET: [u8; 12] = [IAC, IAC, IAC, SB, SE, WILL, DO, CR, LF, NUL, DEL, IP];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let mode = if round % 2 == 0 {
                Mode::Lines
            } else {
                Mode::Raw
            };
            let mut codec = TelnetCodec::with_limits(mode, 64, 32);
            for _ in 0..200 {
                let len = rng.below(65);
                let chunk: Vec<u8> = (0..len)
                    .map(|_| {
                        if rng.below(10) < 3 {
                            TELNET[rng.below(TELNET.len())]
                        } else {
                            rng.byte()
                        }
                    })
                    .collect();
                for ev in feed(&mut codec, &[&chunk]) {
                    match ev {
                        Event::Line(l) => assert!(l.len() <= 64),
                        Event::Data(d) => assert!(d.len() <= 64),
                        Event::Subnegotiation { data, .. } => assert!(data.len() <= 32),
                        _ => {}
                    }
                }
                assert!(
                    codec.retained() <= 2 * (64 + 64 + 32),
                    "{}",
                    codec.retained()
                );
            }
        }
    }

    /// A random well-formed stream: what to send, and the events it must decode to.
    fn random_stream(rng: &mut Rng, mode: Mode) -> (Vec<Out>, Vec<Event>) {
        let mut outs = Vec::new();
        let mut expected = Vec::new();
        let mut text = Vec::new();
        for _ in 0..1 + rng.below(30) {
            match rng.below(8) {
                0 | 1 => {
                    // Text bytes; in Lines mode no terminators, editing or interrupt bytes.
                    let chunk: Vec<u8> = (0..rng.below(12))
                        .map(|_| rng.byte())
                        .filter(|b| mode == Mode::Raw || ![CR, LF, BS, DEL, ETX, EOT].contains(b))
                        .filter(|&b| b != CR)
                        .collect();
                    text.extend_from_slice(&chunk);
                    outs.push(Out::Raw(chunk.into()));
                }
                2 => {
                    let (out, raw) = [
                        (Out::Text("\n".into()), &b"\r\n"[..]),
                        (Out::Text("\r\n".into()), b"\r\n"),
                        (Out::Text("\r".into()), b"\r"),
                        (Out::Raw(Bytes::from_static(b"\n")), b"\n"),
                    ][rng.below(4)]
                    .clone();
                    outs.push(out);
                    match mode {
                        Mode::Lines => expected.push(Event::Line(mem::take(&mut text))),
                        Mode::Raw => text.extend_from_slice(raw),
                    }
                }
                3 => {
                    let cmd = [IP, AYT, GA, NOP, SE, 0, 7, 239][rng.below(8)];
                    outs.push(Out::Command(cmd));
                    expected.push(Event::Command(cmd));
                }
                4 | 5 => {
                    let verb = [Verb::Will, Verb::Wont, Verb::Do, Verb::Dont][rng.below(4)];
                    let option = rng.byte();
                    outs.push(Out::Negotiate(verb, option));
                    expected.push(Event::Negotiate { verb, option });
                }
                6 => {
                    let option = rng.byte().min(254);
                    let len = [0, 4, 40, 512][rng.below(4)];
                    let data: Bytes = (0..len).map(|_| rng.byte()).collect();
                    outs.push(Out::Subnegotiation(option, data.clone()));
                    expected.push(Event::Subnegotiation { option, data });
                }
                _ => {
                    outs.push(Out::Raw(Bytes::from_static(b"\xff")));
                    text.push(IAC);
                }
            }
            if mode == Mode::Raw
                && !text.is_empty()
                && !matches!(outs.last(), Some(Out::Raw(_) | Out::Text(_)))
            {
                // Raw text is delivered before the event that follows it.
                let ev = expected.pop();
                expected.push(Event::Data(mem::take(&mut text).into()));
                expected.extend(ev);
            }
        }
        match mode {
            Mode::Lines => {
                outs.push(Out::Text("\r\n".into()));
                expected.push(Event::Line(text));
            }
            Mode::Raw if !text.is_empty() => expected.push(Event::Data(text.into())),
            Mode::Raw => {}
        }
        (outs, merge_data(expected))
    }

    #[test]
    fn fuzz_round_trip_random_splits() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for round in 0..3000 {
            let mode = if round % 2 == 0 {
                Mode::Lines
            } else {
                Mode::Raw
            };
            let (outs, expected) = random_stream(&mut rng, mode);
            let mut codec = TelnetCodec::new(mode);
            let mut wire = BytesMut::new();
            for out in outs {
                codec.encode(out, &mut wire).expect("encode");
            }
            let chunks = rng.split(&wire);
            assert_eq!(
                merge_data(feed(&mut codec, &chunks)),
                expected,
                "round {round}"
            );
        }
    }
}
