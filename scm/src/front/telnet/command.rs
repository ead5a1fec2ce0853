//! The operator command language of the telnet port, parsed without I/O: one input line
//! in, a [`Command`] or a typed refusal ([`ParseError`], which knows its reply) out. Kept pure so it can be unit-tested
//! exhaustively and fuzzed.

use crate::front::telnet::reply::{Reply, ReplyCode};
use crate::ops::fleet::{SelectError, Target};

/// One operator command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An empty line: nothing to do.
    Empty,
    /// `help`
    Help,
    /// `machines`
    Machines,
    /// `groups`
    Groups,
    /// `status <id>`
    Status(u16),
    /// `push <target>`
    Push(Target),
    /// `push <target> wait <seconds>`: also wait for machines left pending to answer.
    PushWait(Target, u32),
    /// `history <id>`
    History(u16),
    /// `rollback <id> <generation>`
    Rollback(u16, u64),
    /// `swipes`
    Swipes,
    /// `audit`
    Audit,
    /// `quit`, `exit`, `logout`
    Quit,
}

/// Why a line is not a command. [`ParseError::reply`] is the reply to send (`500` for an
/// unknown command, `501` for bad arguments); every text echoes at most a bounded part of
/// the input and stays on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Not a command: the word as typed, quoted and cut ([`typed`]).
    #[error("unknown command {0}; type help for the list")]
    Unknown(String),
    /// The command with the wrong arguments: its usage.
    #[error("usage: {0}")]
    Usage(String),
    /// Not a machine id (the argument, quoted and cut).
    #[error("{0} is not a machine id (0-65535)")]
    NotAMachineId(String),
    /// Not a push target.
    #[error("{0}")]
    Target(#[from] SelectError),
}

impl ParseError {
    /// The reply that refuses the line.
    pub fn reply(&self) -> Reply {
        let code = match self {
            ParseError::Unknown(_) => ReplyCode::Unknown,
            _ => ReplyCode::Syntax,
        };
        Reply::new(code, self.to_string())
    }
}

/// Parses one line.
pub fn parse(line: &str) -> Result<Command, ParseError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Command::Empty);
    }
    let mut words = line.split_whitespace();
    let word = words.next().unwrap_or("");
    let cmd = word.to_ascii_lowercase();
    let args: Vec<&str> = words.collect();
    let machine_id = |s: &str| -> Result<u16, ParseError> {
        s.parse::<u16>()
            .map_err(|_| ParseError::NotAMachineId(typed(s, 40)))
    };
    let usage = |u: &str| ParseError::Usage(u.to_owned());
    match (cmd.as_str(), args.as_slice()) {
        ("help", _) => Ok(Command::Help),
        ("machines", []) => Ok(Command::Machines),
        ("groups", []) => Ok(Command::Groups),
        ("audit", []) => Ok(Command::Audit),
        ("swipes", []) => Ok(Command::Swipes),
        ("quit" | "exit" | "logout", []) => Ok(Command::Quit),
        ("status", [id]) => machine_id(id).map(Command::Status),
        ("history", [id]) => machine_id(id).map(Command::History),
        ("push", [target]) => Ok(Command::Push(target.parse::<Target>()?)),
        ("push", [target, wait, secs]) if wait.eq_ignore_ascii_case("wait") => {
            match secs.parse::<u32>() {
                Ok(s @ 1..=3600) => Ok(Command::PushWait(target.parse::<Target>()?, s)),
                _ => Err(usage(
                    "push <machine id | group:NAME | label:TEXT | all> [wait <seconds, 1-3600>]",
                )),
            }
        }
        ("rollback", [id, generation]) => match (id.parse::<u16>(), generation.parse::<u64>()) {
            (Ok(id), Ok(g)) if g > 0 => Ok(Command::Rollback(id, g)),
            _ => Err(usage("rollback <machine id> <generation>")),
        },
        ("rollback", _) => Err(usage("rollback <machine id> <generation>")),
        ("push", _) => Err(usage("push <machine id | group:NAME | label:TEXT | all>")),
        ("status" | "history", _) => Err(usage(&format!("{cmd} <machine id>"))),
        ("machines" | "groups" | "audit" | "swipes" | "quit" | "exit" | "logout", _) => {
            Err(usage(&format!("{cmd} (no arguments)")))
        }
        _ => Err(ParseError::Unknown(typed(word, 40))),
    }
}

/// What the operator typed, as a terminal user reads it: in double quotes, with control
/// characters in caret notation (ESC is `^[`, DEL `^?`; others as `<U+009B>`) rather than
/// Rust escapes, case kept, at most `max` bytes between the quotes (after the caret
/// notation; a cut is marked `...` after the closing quote).
pub(crate) fn typed(s: &str, max: usize) -> String {
    let mut out = String::from("\"");
    let mut cut = false;
    for c in s.chars() {
        let shown = match c as u32 {
            n @ 0..=0x1f => format!("^{}", char::from(b'@' + n as u8)),
            0x7f => "^?".to_string(),
            n if c.is_control() => format!("<U+{n:04X}>"),
            _ if c == '"' => "\\\"".to_string(),
            _ => c.to_string(),
        };
        if out.len() - 1 + shown.len() > max {
            cut = true;
            break;
        }
        out.push_str(&shown);
    }
    out.push('"');
    if cut {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let ok = [
            ("", Command::Empty),
            ("   ", Command::Empty),
            ("help", Command::Help),
            ("HELP me", Command::Help),
            ("machines", Command::Machines),
            (" groups ", Command::Groups),
            ("status 7", Command::Status(7)),
            ("push 7", Command::Push(Target::Machine(7))),
            ("push group:a", Command::Push(Target::Group("a".into()))),
            ("push all", Command::Push(Target::All)),
            ("push 7 wait 30", Command::PushWait(Target::Machine(7), 30)),
            (
                "push group:a WAIT 5",
                Command::PushWait(Target::Group("a".into()), 5),
            ),
            ("history 65535", Command::History(65535)),
            ("rollback 1 2", Command::Rollback(1, 2)),
            ("swipes", Command::Swipes),
            ("audit", Command::Audit),
            ("exit", Command::Quit),
            ("Logout", Command::Quit),
        ];
        for (line, want) in ok {
            assert_eq!(parse(line), Ok(want), "{line:?}");
        }
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let bad = [
            ("status", "501 usage: status <machine id>"),
            ("status x", "501 \"x\" is not a machine id (0-65535)"),
            (
                "history 70000",
                "501 \"70000\" is not a machine id (0-65535)",
            ),
            (
                "rollback 1 0",
                "501 usage: rollback <machine id> <generation>",
            ),
            (
                "rollback 1",
                "501 usage: rollback <machine id> <generation>",
            ),
            (
                "push",
                "501 usage: push <machine id | group:NAME | label:TEXT | all>",
            ),
            ("machines 1", "501 usage: machines (no arguments)"),
            ("quit now", "501 usage: quit (no arguments)"),
            (
                "frobnicate",
                "500 unknown command \"frobnicate\"; type help for the list",
            ),
        ];
        for (line, want) in bad {
            let got = parse(line).map_err(|e| e.reply().to_string());
            assert_eq!(got, Err(want.to_string()), "{line:?}");
        }
        // Control bytes shown as a terminal user knows them, the case as typed.
        for (line, want) in [
            (
                "machines\u{1b}[d\u{1b}[dx",
                "500 unknown command \"machines^[[d^[[dx\"; type help for the list",
            ),
            (
                "Machines\u{7f}X",
                "500 unknown command \"Machines^?X\"; type help for the list",
            ),
            (
                "a\u{0}\u{9b}\"",
                "500 unknown command \"a^@<U+009B>\\\"\"; type help for the list",
            ),
            (
                "status 1\u{1b}",
                "501 \"1^[\" is not a machine id (0-65535)",
            ),
        ] {
            let got = parse(line).map_err(|e| e.reply().to_string());
            assert_eq!(got, Err(want.to_string()), "{line:?}");
        }
        let long = "x".repeat(5000);
        let e = parse(&long).unwrap_err().reply().to_string();
        assert!(e.len() < 100, "echoes at most 40 bytes: {e}");
        // Found by fuzzing (operator_command, fixture echo-bounded-after-escaping): a
        // target of control characters escaped to several bytes each.
        let nasty = format!("push g{}", "\u{1d}".repeat(200));
        let e = parse(&nasty).unwrap_err().reply().to_string();
        assert!(e.len() < 160, "{} bytes: {e}", e.len());
    }
}
