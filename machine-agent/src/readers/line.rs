//! Keyboard-wedge line assembly: bytes in, bounded lines out.

use super::MAX_LINE;

/// One assembled line, without its terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// At most [`MAX_LINE`] bytes.
    pub bytes: Vec<u8>,
    /// The input line was longer than [`MAX_LINE`]; `bytes` holds its first `MAX_LINE` bytes.
    pub too_long: bool,
}

/// Splits a byte stream into lines the way a keyboard wedge types them.
///
/// CR, LF and CR LF each end a line (a CR LF pair split across pushes ends exactly one
/// line); empty lines are skipped. A line longer than [`MAX_LINE`] is delivered once, at
/// its terminator, cut to `MAX_LINE` bytes and flagged; the rest of it is discarded as it
/// arrives, so the internal buffer never holds more than `MAX_LINE` bytes.
#[derive(Debug)]
pub(crate) struct LineAssembler {
    buf: Vec<u8>,
    /// The current line has overflowed; its remaining bytes are being discarded.
    overflow: bool,
    /// The previous byte was CR: an LF right after it belongs to the same terminator.
    after_cr: bool,
}

impl Default for LineAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl LineAssembler {
    pub(crate) fn new() -> Self {
        LineAssembler {
            buf: Vec::with_capacity(MAX_LINE),
            overflow: false,
            after_cr: false,
        }
    }

    /// Feeds bytes; returns the lines they complete, in order.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                None => {
                    self.append(rest);
                    break;
                }
                Some(i) => {
                    self.append(&rest[..i]);
                    self.after_cr = rest[i] == b'\r';
                    if let Some(line) = self.take() {
                        out.push(line);
                    }
                    rest = &rest[i + 1..];
                }
            }
        }
        out
    }

    /// The input ended: returns the unterminated last line, if any, and resets.
    pub(crate) fn finish(&mut self) -> Option<Line> {
        self.after_cr = false;
        self.take()
    }

    /// Drops any partial line (e.g. the connection it came on was lost); returns how many
    /// bytes of it were buffered.
    pub(crate) fn discard(&mut self) -> usize {
        let n = self.buf.len();
        self.buf.clear();
        self.overflow = false;
        self.after_cr = false;
        n
    }

    /// Bytes currently buffered (never more than [`MAX_LINE`]).
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn append(&mut self, seg: &[u8]) {
        if self.overflow {
            return;
        }
        let room = MAX_LINE - self.buf.len();
        if seg.len() <= room {
            self.buf.extend_from_slice(seg);
        } else {
            self.buf.extend_from_slice(&seg[..room]);
            self.overflow = true;
        }
    }

    fn take(&mut self) -> Option<Line> {
        let too_long = std::mem::take(&mut self.overflow);
        if self.buf.is_empty() && !too_long {
            return None;
        }
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_LINE));
        Some(Line { bytes, too_long })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Line {
        Line {
            bytes: s.as_bytes().to_vec(),
            too_long: false,
        }
    }

    fn all(input: &[u8]) -> Vec<Line> {
        let mut a = LineAssembler::new();
        let mut v = a.push(input);
        v.extend(a.finish());
        v
    }

    #[test]
    fn terminators() {
        assert_eq!(
            all(b"a\rb\nc\r\nd\n"),
            vec![ok("a"), ok("b"), ok("c"), ok("d")]
        );
        assert_eq!(
            all(b"12\r\r\n34\n\r56\r"),
            vec![ok("12"), ok("34"), ok("56")]
        );
        assert_eq!(all(b"\n\r\n\r\r\n\n"), vec![]);
        // LF CR is two terminators (the second ends an empty line), not one pair.
        assert_eq!(all(b"x\n\ry\n"), vec![ok("x"), ok("y")]);
    }

    #[test]
    fn crlf_split_across_pushes_ends_one_line() {
        let mut a = LineAssembler::new();
        assert_eq!(a.push(b"1234\r"), vec![ok("1234")]);
        assert_eq!(a.push(b"\n"), vec![]);
        assert_eq!(a.push(b"5678\r"), vec![ok("5678")]);
        assert_eq!(a.push(b"\n9"), vec![]);
        assert_eq!(a.push(b"\r\n"), vec![ok("9")]);
        assert_eq!(a.finish(), None);
    }

    #[test]
    fn unterminated_last_line_only_on_finish() {
        let mut a = LineAssembler::new();
        assert_eq!(a.push(b"1\n22"), vec![ok("1")]);
        assert_eq!(a.finish(), Some(ok("22")));
        assert_eq!(a.finish(), None);
        let mut a = LineAssembler::new();
        a.push(b"partial");
        assert_eq!(a.discard(), 7);
        assert_eq!(a.push(b"x\n"), vec![ok("x")]);
    }

    #[test]
    fn every_split_point_gives_identical_lines() {
        let long = "L".repeat(MAX_LINE + 3);
        let input = format!("ab\r\ncd\ref\n\r\n\rgh\r\r\n\n{long}\r\nij\rkl");
        let input = input.as_bytes();
        let whole = all(input);
        assert_eq!(whole.len(), 7);
        for i in 0..=input.len() {
            let mut a = LineAssembler::new();
            let mut v = a.push(&input[..i]);
            v.extend(a.push(&input[i..]));
            v.extend(a.finish());
            assert_eq!(v, whole, "split at {i}");
        }
        let mut a = LineAssembler::new();
        let mut v: Vec<Line> = input.iter().flat_map(|b| a.push(&[*b])).collect();
        v.extend(a.finish());
        assert_eq!(v, whole, "byte by byte");
    }

    #[test]
    fn over_long_line_cut_flagged_once_next_intact() {
        let exact = "e".repeat(MAX_LINE);
        let over = "o".repeat(MAX_LINE + 1);
        let input = format!("{exact}\n{over}\r\n42\n");
        let v = all(input.as_bytes());
        assert_eq!(
            v,
            vec![
                ok(&exact),
                Line {
                    bytes: "o".repeat(MAX_LINE).into_bytes(),
                    too_long: true
                },
                ok("42"),
            ]
        );
        // An over-long line that ends the input is flagged too.
        let v = all(over.as_bytes());
        assert_eq!(v.len(), 1);
        assert!(v[0].too_long);
    }

    #[test]
    fn ten_megabyte_line_keeps_memory_bounded() {
        let mut a = LineAssembler::new();
        let chunk = vec![b'7'; 65_536];
        let mut total = 0;
        let mut lines = Vec::new();
        while total < 10 * 1024 * 1024 {
            lines.extend(a.push(&chunk));
            total += chunk.len();
            assert!(a.buffered() <= MAX_LINE, "buffered {}", a.buffered());
            assert!(
                a.buf.capacity() <= MAX_LINE + 16,
                "cap {}",
                a.buf.capacity()
            );
        }
        assert!(lines.is_empty());
        lines.extend(a.push(b"\r\n12345678\n"));
        assert_eq!(lines.len(), 2);
        assert!(lines[0].too_long);
        assert_eq!(lines[0].bytes, vec![b'7'; MAX_LINE]);
        assert_eq!(lines[1], ok("12345678"));
        assert_eq!(a.buffered(), 0);
    }
}
