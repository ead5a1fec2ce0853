//! RFC 854 telnet codec with RFC 1143 (Q method) option negotiation for the SCM hub.
//!
//! * [`codec`]: a byte-level state machine that turns the telnet byte stream into
//!   [`Event`]s (whole lines for the server, raw text for the client) and encodes
//!   [`Out`] items; every buffer is bounded.
//! * [`negotiate`]: the option negotiator; refuses everything unless allowed and
//!   never loops.
//! * [`conn`]: an async connection combining both over any tokio stream.
#![forbid(unsafe_code)]

pub mod codec;
pub mod conn;
pub mod consts;
pub mod negotiate;

pub use codec::{Event, Mode, Out, TelnetCodec, Verb};
pub use conn::{ConnError, TelnetConn};
pub use negotiate::Negotiator;

/// Replays of the real clients' recorded chunks (research/telnet.md section 5)
/// through the codec and the negotiator, as the SCM server would run them.
#[cfg(test)]
mod replay {
    use crate::codec::tests::{assert_split_invariant, feed};
    use crate::consts::{IP, opt};
    use crate::{Event, Mode, Negotiator, Out, TelnetCodec, Verb};

    struct Server {
        codec: TelnetCodec,
        neg: Negotiator,
        events: Vec<Event>,
        lines: Vec<String>,
        replies: Vec<Out>,
        input: Vec<u8>,
    }

    impl Server {
        /// Connects like the recording server: `IAC DO NAWS` first.
        fn connect() -> Self {
            let mut neg = Negotiator::new();
            neg.allow_him(opt::NAWS, true);
            assert_eq!(
                neg.request_him(opt::NAWS, true),
                Some(Out::Negotiate(Verb::Do, opt::NAWS))
            );
            Self {
                codec: TelnetCodec::new(Mode::Lines),
                neg,
                events: Vec::new(),
                lines: Vec::new(),
                replies: Vec::new(),
                input: Vec::new(),
            }
        }

        fn client(&mut self, chunk: &[u8]) {
            self.input.extend_from_slice(chunk);
            for ev in feed(&mut self.codec, &[chunk]) {
                match &ev {
                    Event::Negotiate { verb, option } => {
                        self.replies.extend(self.neg.received(*verb, *option))
                    }
                    Event::Line(line) => {
                        self.lines.push(String::from_utf8_lossy(line).into_owned())
                    }
                    _ => {}
                }
                self.events.push(ev);
            }
        }

        fn echo(&mut self, on: bool) {
            let verb = if on { Verb::Will } else { Verb::Wont };
            assert_eq!(
                self.neg.request_us(opt::ECHO, on),
                Some(Out::Negotiate(verb, opt::ECHO))
            );
        }

        fn has_naws(&self, width: u8, height: u8) -> bool {
            self.events.contains(&Event::Subnegotiation {
                option: opt::NAWS,
                data: bytes::Bytes::copy_from_slice(&[0, width, 0, height]),
            })
        }
    }

    #[test]
    fn inetutils_telnet() {
        let mut s = Server::connect();
        s.client(b"\xff\xfb\x1f\xff\xfa\x1f\x00d\x00\x1e\xff\xf0");
        assert!(s.neg.him_enabled(opt::NAWS));
        assert!(s.has_naws(100, 30));
        s.client(b"alice\r\n");
        s.echo(true);
        s.client(b"\xff\xfd\x01");
        assert!(s.neg.us_enabled(opt::ECHO));
        s.client(b"s3cret\r\n");
        s.echo(false);
        s.client(b"\xff\xfe\x01");
        assert!(!s.neg.us_enabled(opt::ECHO));
        s.client(b"status\r\n");
        s.client(b"\xff\xf4\xff\xfd\x06");
        s.client(b"x\r\n");
        assert_eq!(s.lines, ["alice", "s3cret", "status", "x"]);
        assert_eq!(s.replies, [Out::Negotiate(Verb::Wont, opt::TIMING_MARK)]);
        assert_eq!(
            s.events
                .iter()
                .filter(|e| **e == Event::Command(IP))
                .count(),
            1
        );
        assert_eq!(assert_split_invariant(Mode::Lines, &s.input), s.events);
    }

    #[test]
    fn busybox_character_mode_password() {
        let mut s = Server::connect();
        // Only the password keystrokes are recorded byte for byte; the
        // negotiation chunks around them are the answers busybox gives.
        s.client(b"\xff\xfb\x1f");
        s.client(b"\xff\xfa\x1f\x00\x50\x00\x18\xff\xf0");
        s.client(b"alice\r\n");
        s.echo(true);
        s.client(b"\xff\xfd\x01");
        for key in [
            &b"s"[..],
            b"3",
            b"x",
            b"\x7f",
            b"c",
            b"r",
            b"e",
            b"t",
            b"\r\n",
        ] {
            s.client(key);
        }
        s.echo(false);
        s.client(b"\xff\xfe\x01");
        for key in [
            &b"s"[..],
            b"t",
            b"s",
            b"\x08",
            b"a",
            b"t",
            b"u",
            b"s",
            b"\r\n",
        ] {
            s.client(key);
        }
        assert_eq!(s.lines, ["alice", "s3cret", "status"]);
        assert!(s.replies.is_empty());
        assert!(s.has_naws(80, 24));
        assert_eq!(assert_split_invariant(Mode::Lines, &s.input), s.events);
    }

    #[test]
    fn plink_unsolicited_options_and_bare_lf() {
        let mut s = Server::connect();
        // WILL NAWS, WILL TSPEED, WILL TTYPE, WILL NEW-ENVIRON, DO ECHO, WILL SGA, DO SGA.
        s.client(
            b"\xff\xfb\x1f\xff\xfb\x20\xff\xfb\x18\xff\xfb\x27\xff\xfd\x01\xff\xfb\x03\xff\xfd\x03",
        );
        // After a DONT it also offers OLD-ENVIRON.
        s.client(b"\xff\xfb\x24\xff\xfa\x1f\x00\x50\x00\x18\xff\xf0");
        assert!(!s.neg.us_enabled(opt::ECHO));
        s.client(b"alice\n");
        s.echo(true);
        s.client(b"\xff\xfd\x01");
        assert!(s.neg.us_enabled(opt::ECHO));
        s.client(b"s3cret\n");
        s.echo(false);
        s.client(b"\xff\xfe\x01");
        s.client(b"status\n");
        assert_eq!(s.lines, ["alice", "s3cret", "status"]);
        assert_eq!(
            s.replies,
            [
                Out::Negotiate(Verb::Dont, 32),
                Out::Negotiate(Verb::Dont, opt::TTYPE),
                Out::Negotiate(Verb::Dont, opt::NEW_ENVIRON),
                Out::Negotiate(Verb::Wont, opt::ECHO),
                Out::Negotiate(Verb::Dont, opt::SGA),
                Out::Negotiate(Verb::Wont, opt::SGA),
                Out::Negotiate(Verb::Dont, 36),
            ]
        );
        assert!(s.neg.him_enabled(opt::NAWS));
        assert!(s.has_naws(80, 24));
        assert_eq!(assert_split_invariant(Mode::Lines, &s.input), s.events);
    }
}
