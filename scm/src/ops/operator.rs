//! What an operator can ask of the SCM, written once for both front ends (the telnet
//! console and the gRPC admin API): pushes to one machine or a fleet, rollbacks, and the
//! reads (machines, one machine's state, history, the audit log, and the swipes listing,
//! which only the console serves).
//!
//! Each operation takes the [`Actor`] (who, with which role, from where, through which
//! front end), checks the role, the target and the content here and nowhere else, records
//! the audit entry with one wording ([`crate::ops::audit`]), and answers with typed values
//! or an [`OpError`]. The front ends only parse, say who is logged in, and render: so
//! whatever one of them refuses, the other refuses for the same reason.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::ops::Ops;
use crate::ops::audit::{self, AuditAction};
use crate::ops::auth::OperatorRole;
use crate::ops::fleet::{self, Progress, SelectError, Target};
use crate::ops::push::{self, PushError, PushResult};
use crate::state::SwipeRow;
use crate::state::{self, AuditRow, HistoryRow, MachineRow, StoreError};

/// The front end an operator came through (it is part of some audit records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Front {
    /// The telnet console (plain or TLS).
    Telnet,
    /// The gRPC admin API.
    AdminApi,
}

impl fmt::Display for Front {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Front::Telnet => "telnet",
            Front::AdminApi => "admin API",
        })
    }
}

/// Who asks: an authenticated, configured operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actor {
    /// Operator name.
    pub name: String,
    /// What the operator may do.
    pub role: OperatorRole,
    /// Peer address, as the audit log records it.
    pub source: String,
    /// Through which front end.
    pub front: Front,
}

/// Why an operation was refused or failed. Each front end renders these in its own terms
/// (a telnet reply code, a gRPC status), never by matching on text.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// The operator may only read.
    #[error("operator {0} is read-only and cannot push")]
    ReadOnly(String),
    /// The target names nothing (or the SCM has no machines).
    #[error("{0}")]
    Target(#[from] SelectError),
    /// No such machine (reads).
    #[error("machine {0} is not known; `machines` lists the known ones")]
    UnknownMachine(u16),
    /// Rollback to a generation that does not exist.
    #[error("machine {machine} has no generation {generation}")]
    NoGeneration {
        /// Machine.
        machine: u16,
        /// Generation asked for.
        generation: u64,
    },
    /// Nothing to push.
    #[error("empty configuration")]
    Empty,
    /// More than `limits.max_config_bytes`.
    #[error("configuration is {size} bytes; at most {max} bytes can be sent")]
    TooLarge {
        /// Size given.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// Not UTF-8 text, or a control character other than TAB and the line ends.
    #[error("{0}")]
    NotText(#[from] TextError),
    /// The database failed; nothing was stored or sent.
    #[error("{hint}", hint = .0.operator_hint())]
    Store(#[from] StoreError),
    /// The task running a push failed (a bug: it is logged).
    #[error("the push task failed")]
    TaskFailed,
}

impl From<PushError> for OpError {
    fn from(e: PushError) -> Self {
        match e {
            PushError::Store(e) => OpError::Store(e),
        }
    }
}

/// Refuses a change by a read-only operator, and records the refusal. The one place
/// the role is checked.
async fn may_change(
    ops: &Ops,
    actor: &Actor,
    refused: impl FnOnce() -> String,
) -> Result<(), OpError> {
    if actor.role == OperatorRole::Admin {
        return Ok(());
    }
    audit::record(
        ops,
        &actor.name,
        &actor.source,
        AuditAction::PushRefused,
        refused(),
    )
    .await;
    Err(OpError::ReadOnly(actor.name.clone()))
}

/// A push the actor may make, to machines that exist: made by [`authorise_push`] before
/// the front end accepts the content (telnet asks for it only then).
#[derive(Debug)]
pub(crate) struct PushPlan {
    target: Target,
    ids: Vec<u16>,
    /// How long to wait for machines left pending to answer at their next HELLO.
    wait: std::time::Duration,
}

impl PushPlan {
    /// Waits up to `wait` for each machine the push leaves pending to answer (a
    /// version-0 machine that connects per message gets its CONFIG in-band at its next
    /// HELLO): its ACK or NACK then becomes the push's result.
    pub(crate) fn wait(mut self, wait: std::time::Duration) -> PushPlan {
        self.wait = wait;
        self
    }

    /// The target.
    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// How many machines it reaches.
    pub(crate) fn machines(&self) -> usize {
        self.ids.len()
    }
}

/// Checks that `actor` may push to `target` (the refusal of a read-only operator is
/// audited) and that the target names machines.
pub(crate) async fn authorise_push(
    ops: &Ops,
    actor: &Actor,
    target: Target,
) -> Result<PushPlan, OpError> {
    may_change(ops, actor, || audit::push_refused(&target, actor.front)).await?;
    let ids = fleet::select(&ops.settings.machines, &target)?;
    Ok(PushPlan {
        target,
        ids,
        wait: std::time::Duration::ZERO,
    })
}

/// The content limits: not empty, at most `limits.max_config_bytes`, and text
/// ([`check_text`]).
pub(crate) fn check_content(ops: &Ops, content: &[u8]) -> Result<(), OpError> {
    let max = ops.settings.max_config_bytes;
    if content.is_empty() {
        return Err(OpError::Empty);
    }
    if content.len() > max {
        return Err(OpError::TooLarge {
            size: content.len(),
            max,
        });
    }
    check_text(content)?;
    Ok(())
}

/// Why a configuration is not text: its line (from 1) and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "line {line} {problem}; configurations are UTF-8 text with TAB as the only control character"
)]
pub(crate) struct TextError {
    /// The line, counted from 1.
    pub line: usize,
    /// What is wrong with it.
    pub problem: TextProblem,
}

/// What makes a line not text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextProblem {
    /// A byte sequence that is not UTF-8.
    NotUtf8,
    /// A control character (C0, DEL or C1) other than TAB, or a CR not ending a line.
    Control(char),
}

impl fmt::Display for TextProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TextProblem::NotUtf8 => f.write_str("is not UTF-8"),
            TextProblem::Control(c) if c.is_ascii() => write!(
                f,
                "has control byte 0x{:02X} ({})",
                c as u32,
                control_name(c)
            ),
            TextProblem::Control(c) => write!(f, "has control character U+{:04X}", c as u32),
        }
    }
}

/// The ASCII name of a control character (others by their code point).
pub(crate) fn control_name(c: char) -> String {
    const C0: [&str; 32] = [
        "NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "TAB", "LF", "VT", "FF",
        "CR", "SO", "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM",
        "SUB", "ESC", "FS", "GS", "RS", "US",
    ];
    match c as u32 {
        n @ 0..=31 => C0[n as usize].to_string(),
        0x7f => "DEL".to_string(),
        n => format!("U+{n:04X}"),
    }
}

/// The one rule for configuration content, whichever front end it came through: UTF-8
/// text whose only control characters are TAB and the line ends (LF, or CR LF). A
/// configuration is read by people (`history`, the agent's file) and by parsers on the
/// machines: an ESC or a NUL in it is a typing accident (a terminal's arrow key, a
/// client's Ctrl-C) or worse, never a setting.
pub(crate) fn check_text(content: &[u8]) -> Result<(), TextError> {
    for (i, line) in content.split(|&b| b == b'\n').enumerate() {
        let at = |problem| TextError {
            line: i + 1,
            problem,
        };
        let text = std::str::from_utf8(line).map_err(|_| at(TextProblem::NotUtf8))?;
        // A CR is a line end only right before the LF (or at the very end).
        let text = text.strip_suffix('\r').unwrap_or(text);
        if let Some(c) = text.chars().find(|&c| c != '\t' && c.is_control()) {
            return Err(at(TextProblem::Control(c)));
        }
    }
    Ok(())
}

/// What a push did, machine by machine (in id order).
#[derive(Debug)]
pub(crate) struct PushReport {
    /// The target pushed to.
    pub target: Target,
    /// Each machine's result; a machine that could not be attempted has an error.
    pub results: Vec<(u16, Result<PushResult, PushError>)>,
}

impl PushReport {
    /// Totals over all machines.
    pub(crate) fn totals(&self) -> Progress {
        let mut p = Progress::start(self.results.len());
        for (_, r) in &self.results {
            p.add(r);
        }
        p
    }
}

/// Pushes `content` as planned: one machine is stored and delivered on its own, a fleet
/// in one transaction with bounded concurrency (progress published on `progress`). The
/// push runs in a task of its own, to its end and with its audit record, even if the
/// operator goes away meanwhile.
pub(crate) async fn push(
    ops: &Arc<Ops>,
    actor: &Actor,
    plan: PushPlan,
    content: Vec<u8>,
    progress: Option<watch::Sender<Progress>>,
) -> Result<PushReport, OpError> {
    check_content(ops, &content)?;
    tracing::info!(operator = %actor.name, via = %actor.front, target = %plan.target, machines = plan.ids.len(), "push");
    let ops = ops.clone();
    let actor = actor.clone();
    let task = tokio::spawn(async move {
        let size = content.len();
        let PushPlan { target, ids, wait } = plan;
        // Watching from before the push: an answer at a HELLO right after it counts.
        let mut events = (!wait.is_zero()).then(|| ops.events.subscribe());
        let mut results = match target {
            Target::Machine(id) => vec![(id, push::push(&ops, id, content, &actor.name).await)],
            _ => fleet::push_many(&ops, ids, content, &actor.name, progress).await,
        };
        if let Some(events) = events.as_mut() {
            push::await_answers(&ops, events, &mut results, wait).await;
        }
        let detail = audit::push_detail(&target, size, &results);
        audit::record(&ops, &actor.name, &actor.source, AuditAction::Push, detail).await;
        PushReport { target, results }
    });
    task.await.map_err(|e| {
        tracing::error!("push task failed: {e}");
        OpError::TaskFailed
    })
}

/// Makes generation `to` of machine `id` current again (as a new generation) and
/// delivers it; audited whatever becomes of it once the role allows it.
pub(crate) async fn rollback(
    ops: &Arc<Ops>,
    actor: &Actor,
    id: u16,
    to: u64,
) -> Result<PushResult, OpError> {
    may_change(ops, actor, || audit::rollback_refused(id, to, actor.front)).await?;
    let result = rollback_to(ops, actor, id, to).await;
    audit::record(
        ops,
        &actor.name,
        &actor.source,
        AuditAction::Rollback,
        audit::rollback_detail(id, to, &result),
    )
    .await;
    result
}

/// The old content comes back as a new generation, so the agent's ordering holds; it is
/// checked against today's limits like any other push.
async fn rollback_to(
    ops: &Arc<Ops>,
    actor: &Actor,
    id: u16,
    to: u64,
) -> Result<PushResult, OpError> {
    fleet::select(&ops.settings.machines, &Target::Machine(id))?;
    let Some(old) = ops.store.fleet().get_generation(id, to).await? else {
        return Err(OpError::NoGeneration {
            machine: id,
            generation: to,
        });
    };
    check_content(ops, &old.content)?;
    Ok(push::push(ops, id, old.content, &actor.name).await?)
}

/// A configured machine, or [`OpError::UnknownMachine`].
fn known(ops: &Ops, id: u16) -> Result<(), OpError> {
    match ops.settings.machine(id) {
        Some(_) => Ok(()),
        None => Err(OpError::UnknownMachine(id)),
    }
}

/// SHA-256 and attempt count of each machine's desired generation.
pub(crate) type Desired = state::DesiredRow;

/// The stored state of every machine (`only`: of that one), with its desired
/// generation's details.
pub(crate) async fn machines(
    ops: &Ops,
    actor: &Actor,
    only: Option<u16>,
) -> Result<(Vec<MachineRow>, HashMap<u16, Desired>), OpError> {
    tracing::debug!(operator = %actor.name, via = %actor.front, "machines");
    Ok(ops.store.fleet().machines_with_desired(only).await?)
}

/// One delivery attempt: generation, Unix ms, outcome, detail.
pub(crate) type Attempt = state::AttemptRow;

/// One configured machine's stored state and its newest `attempts` delivery attempts.
pub(crate) async fn status(
    ops: &Ops,
    actor: &Actor,
    id: u16,
    attempts: u32,
) -> Result<(MachineRow, Vec<Attempt>), OpError> {
    tracing::debug!(operator = %actor.name, via = %actor.front, machine = id, "status");
    known(ops, id)?;
    let res = ops.store.fleet().machine_status(id, attempts).await?;
    match res {
        (Some(m), a) => Ok((m, a)),
        (None, _) => Err(OpError::UnknownMachine(id)),
    }
}

/// A configured machine's newest `limit` generations, newest first.
pub(crate) async fn history(
    ops: &Ops,
    actor: &Actor,
    id: u16,
    limit: u32,
) -> Result<Vec<HistoryRow>, OpError> {
    tracing::debug!(operator = %actor.name, via = %actor.front, machine = id, "history");
    known(ops, id)?;
    Ok(ops.store.fleet().history(id, limit).await?)
}

/// The newest `limit` audit records, newest first.
pub(crate) async fn audit_log(
    ops: &Ops,
    actor: &Actor,
    limit: u32,
) -> Result<Vec<AuditRow>, OpError> {
    tracing::debug!(operator = %actor.name, via = %actor.front, "audit log");
    Ok(ops.store.audit().list(limit).await?)
}

/// The newest `limit` card swipes (masked), newest first.
pub(crate) async fn swipes(ops: &Ops, actor: &Actor, limit: u32) -> Result<Vec<SwipeRow>, OpError> {
    tracing::debug!(operator = %actor.name, via = %actor.front, "swipes");
    Ok(ops.store.journal().list(limit).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_are_text_with_tab_as_the_only_control_character() {
        for ok in [
            &b"a = 1\n"[..],
            b"a = 1\r\nb\t= 2\r\n",
            b"no final line end",
            "caf\u{e9} = \u{2713}\n".as_bytes(),
            b"ends with CR\r",
        ] {
            assert_eq!(check_text(ok), Ok(()), "{ok:?}");
        }
        let refused = |c: &[u8]| check_text(c).unwrap_err().to_string();
        assert_eq!(
            refused(b"a\nb\n\x1b[1mc\n"),
            "line 3 has control byte 0x1B (ESC); configurations are UTF-8 text with TAB as the only control character"
        );
        assert!(refused(b"\0").starts_with("line 1 has control byte 0x00 (NUL);"));
        assert!(refused(b"x\x07\n").starts_with("line 1 has control byte 0x07 (BEL);"));
        assert!(refused(b"a\n\x04").starts_with("line 2 has control byte 0x04 (EOT);"));
        assert!(refused(b"a\x7f").starts_with("line 1 has control byte 0x7F (DEL);"));
        assert!(refused(b"a\rb\n").starts_with("line 1 has control byte 0x0D (CR);"));
        assert!(refused("\u{9b}2J".as_bytes()).starts_with("line 1 has control character U+009B;"));
        assert!(refused(b"ok\n\xff\xfe\n").starts_with("line 2 is not UTF-8;"));
    }
}
