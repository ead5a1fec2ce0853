//! The console's replies as values: a [`ReplyCode`] and text, rendered to the wire in one
//! place (`<code> <text>`, and `<code>-<text>` on every line but the last of a multi-line
//! reply), so that no caller formats a code into a string or cuts one off again.

use std::fmt;

/// A reply code, in the style of SMTP/FTP: 1xx progress, 2xx done, 3xx send more, 4xx try
/// later, 5xx refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplyCode {
    /// 151: progress of a fleet push (only ever on `151-` lines).
    Progress = 151,
    /// 211: one machine's status.
    Status = 211,
    /// 214: help.
    Help = 214,
    /// 220: greeting.
    Ready = 220,
    /// 221: session ends at the operator's request.
    Bye = 221,
    /// 230: logged in.
    LoggedIn = 230,
    /// 250: done (a push: ACKed).
    Done = 250,
    /// 251: a push was superseded by a newer generation.
    Superseded = 251,
    /// 354: send the configuration.
    SendBody = 354,
    /// 421: the session is closing (time-out, lockout, shutdown, revocation).
    Closing = 421,
    /// 426: a push cancelled by the operator (Ctrl-C, Ctrl-D) while its body was typed.
    Cancelled = 426,
    /// 450: pending (the machine is unreachable; retried).
    Pending = 450,
    /// 451: the SCM failed (database); try again.
    Failed = 451,
    /// 500: unknown command, over-long line.
    Unknown = 500,
    /// 501: syntax (arguments, body).
    Syntax = 501,
    /// 530: login refused.
    LoginRefused = 530,
    /// 550: refused (unknown machine or target, read-only operator, too large).
    Refused = 550,
    /// 552: configuration body refused while it was read.
    BodyRefused = 552,
    /// 554: the machine NACKed.
    Nack = 554,
}

impl ReplyCode {
    /// The number.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// A one-line reply; `Display` gives the line as sent (without CR LF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The code.
    pub code: ReplyCode,
    /// The text after it.
    pub text: String,
}

impl Reply {
    /// A reply.
    pub fn new(code: ReplyCode, text: impl Into<String>) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }

    /// The line as an intermediate line of a multi-line reply (`<code>-<text>`).
    pub fn continued(&self) -> String {
        format!("{}-{}", self.code, self.text)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// A multi-line reply: all lines carry the same code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lines {
    /// The code.
    pub code: ReplyCode,
    /// The texts, in order; the last one ends the reply.
    pub lines: Vec<String>,
}

impl Lines {
    /// A multi-line reply.
    pub(crate) fn new(code: ReplyCode, lines: Vec<String>) -> Lines {
        Lines { code, lines }
    }

    /// The wire form: every line but the last as `<code>-<text>`, the last as
    /// `<code> <text>`, each ended by CR LF.
    pub(crate) fn render(&self) -> String {
        let n = self.lines.len();
        let mut out = String::new();
        for (i, l) in self.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            out.push_str(&format!("{}{sep}{l}\r\n", self.code));
        }
        out
    }
}

impl From<Reply> for Lines {
    fn from(r: Reply) -> Lines {
        Lines::new(r.code, vec![r.text])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_render_as_on_the_wire() {
        let r = Reply::new(ReplyCode::Refused, "machine 9 is not known");
        assert_eq!(r.to_string(), "550 machine 9 is not known");
        assert_eq!(
            Reply::new(ReplyCode::Progress, "1/2 ACK").continued(),
            "151-1/2 ACK"
        );
        let l = Lines::new(
            ReplyCode::Done,
            vec!["a".into(), "b".into(), "2 rows".into()],
        );
        assert_eq!(l.render(), "250-a\r\n250-b\r\n250 2 rows\r\n");
        assert_eq!(Lines::from(r).render(), "550 machine 9 is not known\r\n");
    }
}
