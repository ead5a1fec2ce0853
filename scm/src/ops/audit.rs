//! The audit log of operator actions: which actions there are, and how each record is
//! worded. Written once, so that a push through the telnet console and one through the
//! admin API leave the same record.
//!
//! The `action` column keeps its text values ([`AuditAction::as_str`]): operators' scripts
//! and the admin API's `AuditEntry.action` read them.

use std::fmt;

use crate::ops::Ops;
use crate::ops::fleet::{Progress, Target};
use crate::ops::operator::{Front, OpError};
use crate::ops::push::{PushError, PushResult};

/// What an audit record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditAction {
    /// An operator logged in (password or certificate).
    Login,
    /// A login was refused (wrong password, unknown operator).
    LoginFailed,
    /// A login was not even tried: the source is locked out.
    LoginRefused,
    /// A configuration push (one machine or a fleet), whatever its outcome.
    Push,
    /// A push or rollback refused before anything was stored (read-only operator).
    PushRefused,
    /// A rollback, whatever its outcome.
    Rollback,
    /// A change to an RFIDeas 241 reader's configuration. The 241 bridge writes it in
    /// its own database transaction, so it passes the text itself.
    #[allow(dead_code)]
    RfideasConfig,
}

impl AuditAction {
    /// The value of the `action` column.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::LoginFailed => "login_failed",
            Self::LoginRefused => "login_refused",
            Self::Push => "push",
            Self::PushRefused => "push_refused",
            Self::Rollback => "rollback",
            Self::RfideasConfig => "rfideas_config",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends a record (and counts logins). A failure to write is logged by the ops: the
/// action itself has been answered by then.
pub(crate) async fn record(
    ops: &Ops,
    actor: &str,
    source: &str,
    action: AuditAction,
    detail: String,
) {
    let logins = &crate::metrics::global().logins;
    match action {
        AuditAction::Login => logins.inc(&["ok"]),
        AuditAction::LoginFailed => logins.inc(&["failed"]),
        AuditAction::LoginRefused => logins.inc(&["locked"]),
        _ => {}
    }
    ops.audit(actor.to_owned(), source.to_owned(), action.as_str(), detail)
        .await;
}

/// A push refused because the operator is read-only: what was asked, as the target
/// reads (`machine 1`, `group:dev`), then the selector as given and the front end.
pub(crate) fn push_refused(target: &Target, front: Front) -> String {
    format!(
        "{target}: read-only operator (target {} via {front})",
        target.selector()
    )
}

/// A rollback refused because the operator is read-only.
pub(crate) fn rollback_refused(id: u16, to: u64, front: Front) -> String {
    format!("rollback of machine {id} to generation {to}: read-only operator (via {front})")
}

/// The record of a push: one machine's outcome, or a fleet's totals.
pub(crate) fn push_detail(
    target: &Target,
    size: usize,
    results: &[(u16, Result<PushResult, PushError>)],
) -> String {
    match (target, results) {
        (Target::Machine(id), [(_, Ok(r))]) => format!(
            "machine {id} generation {} ({size} bytes): {}",
            r.generation(),
            outcome_word(r)
        ),
        (Target::Machine(id), [(_, Err(e))]) => format!("machine {id}: refused: {e}"),
        _ => {
            let mut p = Progress::start(results.len());
            for (_, r) in results {
                p.add(r);
            }
            format!("{target} ({size} bytes): {}", p.line())
        }
    }
}

/// The record of a rollback (after the role check): what became of it.
pub(crate) fn rollback_detail(id: u16, to: u64, result: &Result<PushResult, OpError>) -> String {
    match result {
        Ok(r) => format!(
            "machine {id} to generation {to}: generation {}: {}",
            r.generation(),
            outcome_word(r)
        ),
        Err(e) => format!("machine {id} to generation {to}: refused: {e}"),
    }
}

/// A delivery outcome in one word (and the machine's reason for a NACK).
pub(crate) fn outcome_word(r: &PushResult) -> String {
    match r {
        PushResult::Ack { .. } => "ack".into(),
        PushResult::Nack { detail, .. } => format!("nack {}", one_line(detail)),
        PushResult::Unreachable { .. } => "pending".into(),
        PushResult::Superseded { by, .. } => format!("superseded by generation {by}"),
    }
}

/// `s` on one line (control characters become spaces), at most 300 characters: texts
/// from machines end up in one-line replies and records.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_texts_are_the_column_values() {
        let all = [
            (AuditAction::Login, "login"),
            (AuditAction::LoginFailed, "login_failed"),
            (AuditAction::LoginRefused, "login_refused"),
            (AuditAction::Push, "push"),
            (AuditAction::PushRefused, "push_refused"),
            (AuditAction::Rollback, "rollback"),
            (AuditAction::RfideasConfig, "rfideas_config"),
        ];
        for (a, text) in all {
            assert_eq!(a.as_str(), text);
            assert_eq!(a.to_string(), text);
        }
    }

    #[test]
    fn refusals_name_the_target_both_ways() {
        let d = push_refused(&Target::Machine(1), Front::AdminApi);
        assert_eq!(d, "machine 1: read-only operator (target 1 via admin API)");
        let d = push_refused(&Target::Group("dev".into()), Front::Telnet);
        assert!(d.starts_with("group:dev: read-only operator"), "{d}");
        let d = rollback_refused(3, 2, Front::Telnet);
        assert!(
            d.starts_with("rollback of machine 3 to generation 2"),
            "{d}"
        );
    }

    #[test]
    fn rollback_records_say_what_became_of_it() {
        let ok = Ok(PushResult::Ack {
            generation: 4,
            detail: "stored".into(),
        });
        assert_eq!(
            rollback_detail(1, 2, &ok),
            "machine 1 to generation 2: generation 4: ack"
        );
        let no = Err(OpError::NoGeneration {
            machine: 1,
            generation: 9,
        });
        assert!(
            rollback_detail(1, 9, &no).starts_with("machine 1 to generation 9: refused: "),
            "{}",
            rollback_detail(1, 9, &no)
        );
    }
}
