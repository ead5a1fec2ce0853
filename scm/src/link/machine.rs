//! The agent link's protocol core, without I/O: it is handed each frame (or the end of
//! the stream, or a read error) with the time, and answers with [`Action`]s that the
//! driver in `link.rs` carries out, quinn-style: `handle_*` then `poll_action` until
//! `None`. Whatever needs the database, the session registry or the swipe bridge is an
//! action; the driver feeds the result back through the matching `*_checked`/`welcome`/
//! `in_band`/`swipe_verdict` call. An action that asks the driver for something is the
//! last of its event, so the actions of the answer follow it in order.
//!
//! Nothing here allocates per frame beyond the frames it answers with: actions go through
//! one `VecDeque` that lives as long as the link.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use scm_proto::frame::Header;
use scm_proto::io::ReadError;
use scm_proto::v1::{self, NackReason};
use scm_proto::{Code, Frame, FrameError};
use tokio::time::Instant;

use super::clock::ClockOffset;
use super::dialect::PushResult;
use super::dialect::{self, Dialect, Request};
use crate::state::Generation;

/// The answer to one SWIPE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SwipeVerdict {
    /// ACK with this detail.
    Ack(String),
    /// NACK with this reason and detail.
    Nack(NackReason, String),
}

/// What the state machine needs to know about its link, fixed when the link is up.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// The machine id in the peer's certificate: every frame must name it.
    pub(crate) cert_id: u16,
    /// The peer's address (version-0 MSG checks it against the last HELLO's).
    pub(crate) peer: SocketAddr,
    /// Whether the machine is in this SCM's machine list.
    pub(crate) known: bool,
    /// Idle timeout between frames.
    pub(crate) idle: Duration,
    /// Stall timeout per frame.
    pub(crate) stall: Duration,
    /// How long an in-band CONFIG waits for its answer.
    pub(crate) push_reply: Duration,
    /// Close the link once an in-band CONFIG is answered.
    pub(crate) close_after_in_band: bool,
}

/// Something the driver must do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Queue this answer: it leaves with the answers to the frames that arrived with it.
    Reply(Frame),
    /// Write this frame now, after anything queued.
    ReplyNow(Frame),
    /// Write this frame before closing; a failure to write it changes nothing.
    Farewell(Frame),
    /// Count a refused frame under this reason (`frames_refused`).
    Count(&'static str),
    /// Record what the agent reports of swipes it refused or dropped.
    AgentReport(crate::coord::sessions::AgentRefusals),
    /// Record the accepted HELLO (address, session) and, the first time on this link,
    /// announce the connection.
    RecordHello {
        dialect: Dialect,
        config_address: Option<String>,
        readers: Vec<String>,
        first: bool,
    },
    /// The agent reports this configuration (hex SHA-256) applied.
    MarkApplied { sha256: String },
    /// Look up the machine's desired generation and call [`LinkMachine::welcome`].
    Welcome { request_id: u64 },
    /// Deliver a waiting configuration over the config port, in the background.
    DeliverPending,
    /// Look up a waiting configuration, take the machine's delivery lock if there is
    /// one, and call [`LinkMachine::in_band`].
    DeliverInBand,
    /// Look up the address of the machine's last HELLO and call
    /// [`LinkMachine::msg_address_checked`].
    CheckMsgAddress { dialect: Dialect, text: String },
    /// Hand the swipe to the bridge and call [`LinkMachine::swipe_verdict`]; the
    /// duration is how long the frame waited before it was handled (counted against its
    /// time to live, `link::clock`).
    Swipe(v1::Swipe, Duration),
    /// Count and record the outcome of the in-band CONFIG (the delivery lock is free
    /// after this).
    PushOutcome {
        result: PushResult,
        elapsed: Option<Duration>,
    },
    /// Hand the outcome of the CONFIG sent over the link (see
    /// [`LinkMachine::send_config`]) back to the push that posted it; the push records it.
    ConfigAnswered { result: PushResult },
    /// End the link.
    Close(Close),
}

/// Why the state machine ends the link.
#[derive(Debug)]
pub(crate) enum Close {
    /// A clean end (the peer closed, or an in-band CONFIG went unanswered).
    Ended,
    /// Refused after a NACK.
    Refused(String),
    /// Reading failed or timed out.
    Read(ReadError),
}

/// How a CONFIG waiting for its answer was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Version 0, as the answer to the HELLO: the next frame is its answer.
    InBand,
    /// Version 1, over the link at any time: the answer echoes `request_id`, and
    /// other frames (swipes, heartbeats) may come first.
    Link { request_id: u64 },
}

/// A CONFIG waiting for its answer.
#[derive(Debug, Clone, Copy)]
struct Awaiting {
    sent: Sent,
    dialect: Dialect,
    generation: u64,
    sent_at: Instant,
}

/// The protocol state of one agent link.
#[derive(Debug)]
pub(crate) struct LinkMachine {
    p: Params,
    /// Dialect of the accepted HELLO on this link.
    hello: Option<Dialect>,
    awaiting: Option<Awaiting>,
    /// The agent's clock against ours, from its stamped frames.
    clock: ClockOffset,
    /// A wall-clock reading and the instant it was taken: wall time derived from the
    /// monotonic `now` the driver passes in (a stepped SCM clock does not move it).
    epoch: (i64, Instant),
    /// When the last complete frame arrived (or the link began): the idle timeout counts
    /// from here, not from the start of each read, which a CONFIG's answer timer or a
    /// posted CONFIG restarts.
    last_frame_at: Instant,
    actions: VecDeque<Action>,
}

impl LinkMachine {
    pub(crate) fn new(p: Params) -> Self {
        LinkMachine {
            p,
            hello: None,
            awaiting: None,
            clock: ClockOffset::default(),
            epoch: (scm_common::clock::now_ms(), Instant::now()),
            last_frame_at: Instant::now(),
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The dialect of the accepted HELLO, if any.
    #[cfg(test)]
    pub(crate) fn hello(&self) -> Option<Dialect> {
        self.hello
    }

    /// Whether a CONFIG waits for its answer: shutdown waits for it (the answer decides
    /// what is recorded).
    pub(crate) fn awaits_answer(&self) -> bool {
        self.awaiting.is_some()
    }

    /// Whether the link can take a CONFIG to send over it now ([`Self::send_config`]):
    /// a version-1 HELLO was accepted and no CONFIG waits for its answer.
    pub(crate) fn takes_config(&self) -> bool {
        self.hello == Some(Dialect::V1) && self.awaiting.is_none()
    }

    /// The idle and stall timeouts for the next read at `now`. While a CONFIG sent over
    /// the link waits, the idle timeout ends no later than its answer is due, and the
    /// read's idle timeout then stands for "no answer" (no timer of its own in every
    /// idle link's task).
    pub(crate) fn read_limits(&self, now: Instant) -> (Option<Duration>, Duration) {
        let idle = (self.last_frame_at + self.p.idle).saturating_duration_since(now);
        match self.awaiting {
            Some(Awaiting {
                sent: Sent::InBand, ..
            }) => (Some(self.p.push_reply), self.p.push_reply),
            Some(Awaiting { sent_at, .. }) => {
                let due = (sent_at + self.p.push_reply).saturating_duration_since(now);
                (Some(idle.min(due)), self.p.stall)
            }
            None => (Some(idle), self.p.stall),
        }
    }

    /// Wall-clock milliseconds at `now`.
    fn wall_ms(&self, now: Instant) -> i64 {
        let (ms, at) = self.epoch;
        let since = now.saturating_duration_since(at).as_millis();
        ms.saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
    }

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    /// An answer to an ordinary request, sent as its dialect sends answers.
    fn answer(&mut self, dialect: Dialect, frame: Frame) {
        self.push(if dialect.batches_answers() {
            Action::Reply(frame)
        } else {
            Action::ReplyNow(frame)
        });
    }

    /// A complete frame arrived.
    pub(crate) fn handle_frame(&mut self, frame: Frame, now: Instant) {
        let id = self.p.cert_id;
        self.last_frame_at = now;
        match self.awaiting {
            Some(
                wait @ Awaiting {
                    sent: Sent::InBand, ..
                },
            ) => {
                self.awaiting = None;
                let g = wait.generation;
                let result = PushResult::from_answer(g, wait.dialect.parse_reply(&frame, id, 0));
                self.config_answered(wait, result, now);
                return;
            }
            Some(
                wait @ Awaiting {
                    sent: Sent::Link { request_id },
                    ..
                },
            ) if frame.version == 1
                && frame.id == id
                && matches!(frame.code(), Some(Code::Ack | Code::Nack)) =>
            {
                // Anything else that arrives meanwhile (a late answer to an earlier
                // CONFIG included) is an ordinary frame.
                if let Ok(reply) = Dialect::V1.parse_reply(&frame, id, request_id) {
                    self.awaiting = None;
                    let result = PushResult::from_answer(wait.generation, Ok::<_, String>(reply));
                    self.config_answered(wait, result, now);
                    return;
                }
            }
            _ => {}
        }
        if let Some(nack) = frame.nack_if_unknown() {
            let reason = if scm_proto::frame::SUPPORTED_VERSIONS.contains(&frame.version) {
                "unknown_code"
            } else {
                "unknown_version"
            };
            self.push(Action::Count(reason));
            tracing::warn!(machine = id, "refused {frame}: unknown version or code");
            self.push(Action::ReplyNow(nack));
            return;
        }
        let (Some(code), Some(dialect)) = (frame.code(), Dialect::of(frame.version)) else {
            return;
        };
        if frame.id != id {
            let text = format!(
                "frame names machine {} but the certificate belongs to machine {id}; a machine can only speak for itself",
                frame.id
            );
            self.push(Action::Count("wrong_machine_id"));
            tracing::warn!(machine = id, claimed = frame.id, "{text}");
            let rid = dialect.request_id(&frame);
            let nack = dialect.nack(frame.id, rid, NackReason::WrongMachineId, text.clone());
            self.push(Action::ReplyNow(nack));
            if code == Code::Hello {
                self.push(Action::Close(Close::Refused(text)));
            }
            return;
        }
        let request = match dialect.parse(&frame, code) {
            Ok(r) => r,
            Err(e) => {
                let text = format!("cannot decode the payload: {e}");
                let nack = dialect.nack(id, 0, NackReason::Malformed, text);
                self.push(Action::ReplyNow(nack));
                return;
            }
        };
        self.on_request(dialect, request, now);
    }

    fn on_request(&mut self, dialect: Dialect, request: Request, now: Instant) {
        let id = self.p.cert_id;
        let rid = match &request {
            Request::Hello { request_id, .. }
            | Request::Msg { request_id, .. }
            | Request::Heartbeat { request_id, .. }
            | Request::NotAccepted { request_id, .. } => *request_id,
            Request::Swipe(s) => s.request_id,
            Request::Answer(_) => 0,
        };
        match request {
            Request::Hello {
                request_id,
                config_address,
                readers,
                applied_sha256,
            } => {
                if !self.p.known {
                    let text = format!("machine {id} is not known to this SCM");
                    let nack =
                        dialect.nack(id, request_id, NackReason::UnknownMachine, text.clone());
                    self.push(Action::ReplyNow(nack));
                    self.push(Action::Close(Close::Refused(text)));
                    return;
                }
                // Bounded: the session registry keeps these for the link's whole life.
                let readers = readers
                    .iter()
                    .take(64)
                    .map(|r| r.chars().take(32).collect())
                    .collect();
                self.push(Action::RecordHello {
                    dialect,
                    config_address,
                    readers,
                    first: self.hello.is_none(),
                });
                self.hello = Some(dialect);
                if !applied_sha256.is_empty() {
                    self.push(Action::MarkApplied {
                        sha256: hex::encode(&applied_sha256),
                    });
                }
                self.push(if dialect.config_in_band() {
                    Action::DeliverInBand
                } else {
                    Action::Welcome { request_id }
                });
            }
            // An ACK or NACK is never answered, not even before HELLO (docs/protocol.md
            // section 5): answering one could start an endless NACK exchange.
            Request::Answer(code) => {
                tracing::debug!(machine = id, "unsolicited {}", code.name());
            }
            _ if self.hello.is_none() && dialect.needs_hello_on_link() => {
                let nack = dialect.nack(id, rid, NackReason::NotAllowed, "say HELLO first");
                self.answer(dialect, nack);
            }
            Request::Msg { text, .. } => {
                if self.hello.is_some() {
                    tracing::info!(machine = id, "MSG: {}", text.escape_debug());
                    let ack = dialect.ack(id, rid, "OK", 0);
                    self.answer(dialect, ack);
                } else {
                    self.push(Action::CheckMsgAddress { dialect, text });
                }
            }
            Request::Heartbeat {
                sent_at_ms,
                refusals,
                ..
            } => {
                self.clock.observe(sent_at_ms, self.wall_ms(now));
                if refusals != Default::default() {
                    self.push(Action::AgentReport(refusals));
                }
                let ack = dialect.ack(id, rid, "OK", 0);
                self.answer(dialect, ack);
            }
            Request::Swipe(s) => {
                let waited = self.clock.observe(s.sent_at_unix_ms, self.wall_ms(now));
                self.push(Action::Swipe(s, Duration::from_millis(waited)))
            }
            Request::NotAccepted { code, .. } => {
                let text = format!("{} is not accepted from machines", code.name());
                let nack = dialect.nack(id, rid, NackReason::NotAllowed, text);
                self.answer(dialect, nack);
            }
        }
    }

    /// The stream ended cleanly, between frames.
    pub(crate) fn handle_end(&mut self, now: Instant) {
        if let Some(wait) = self.awaiting.take() {
            let result = PushResult::Unreachable {
                generation: wait.generation,
                detail: match wait.sent {
                    Sent::InBand => "machine closed the link before answering the in-band CONFIG",
                    Sent::Link { .. } => "machine closed the link before answering the CONFIG",
                }
                .into(),
            };
            self.config_answered(wait, result, now);
            if wait.sent == Sent::InBand {
                return;
            }
        }
        self.push(Action::Close(Close::Ended));
    }

    /// Reading failed; `pending` is the header of the frame being received, if it came.
    pub(crate) fn handle_error(&mut self, e: ReadError, pending: Option<Header>, now: Instant) {
        if let Some(wait) = self.awaiting.take() {
            if wait.sent != Sent::InBand
                && matches!(e, ReadError::Idle(_))
                && now >= wait.sent_at + self.p.push_reply
                && now < self.last_frame_at + self.p.idle
            {
                // The answer's time is up (see `read_limits`), not the link's: the
                // generation stays pending, and the link goes on.
                let result = PushResult::Unreachable {
                    generation: wait.generation,
                    detail: format!(
                        "no answer to the CONFIG over the link within {} ms; retried later",
                        self.p.push_reply.as_millis()
                    ),
                };
                self.config_answered(wait, result, now);
                return;
            }
            let result = PushResult::Unreachable {
                generation: wait.generation,
                detail: e.to_string(),
            };
            self.config_answered(wait, result, now);
            if wait.sent == Sent::InBand {
                return;
            }
        }
        match e {
            ReadError::Frame(e @ FrameError::DataTooLong { .. }) => {
                self.push(Action::Count("oversize"));
                let text = e.to_string();
                let (version, id) = pending
                    .map(|h| (h.version, h.id))
                    .unwrap_or((0, self.p.cert_id));
                let nack = Frame::protocol_nack(version, id, NackReason::Malformed, text.clone());
                self.push(Action::Farewell(nack));
                self.push(Action::Close(Close::Refused(text)));
            }
            e => {
                if matches!(e, ReadError::Stalled { .. }) {
                    self.push(Action::Count("stall"));
                }
                // The read's own timeout was what was left of the link's: name the link's.
                let e = match e {
                    ReadError::Idle(_) => ReadError::Idle(self.p.idle),
                    e => e,
                };
                self.push(Action::Close(Close::Read(e)));
            }
        }
    }

    fn config_answered(&mut self, wait: Awaiting, result: PushResult, now: Instant) {
        if wait.sent != Sent::InBand {
            self.push(Action::ConfigAnswered { result });
            return;
        }
        let unreachable = matches!(result, PushResult::Unreachable { .. });
        self.push(Action::PushOutcome {
            result,
            elapsed: Some(now.saturating_duration_since(wait.sent_at)),
        });
        if unreachable || self.p.close_after_in_band {
            self.push(Action::Close(Close::Ended));
        }
    }

    /// Sends generation `g` over the link as a CONFIG with `request_id` (configuration
    /// over the link, version 1); its outcome comes back as [`Action::ConfigAnswered`]:
    /// the machine's ACK or NACK, or unreachable when no answer comes within the push
    /// reply time or the link ends first. The caller checks [`Self::takes_config`].
    pub(crate) fn send_config(&mut self, g: &Generation, request_id: u64, now: Instant) {
        if !self.takes_config() {
            let result = PushResult::Unreachable {
                generation: g.generation,
                detail: "the machine's link cannot take a CONFIG now; retried later".into(),
            };
            self.push(Action::ConfigAnswered { result });
            return;
        }
        match Dialect::V1.config_frame(g, request_id) {
            Ok(f) => {
                self.push(Action::ReplyNow(f));
                self.awaiting = Some(Awaiting {
                    sent: Sent::Link { request_id },
                    dialect: Dialect::V1,
                    generation: g.generation,
                    sent_at: now,
                });
            }
            Err(e) => {
                let result = PushResult::Nack {
                    generation: g.generation,
                    detail: format!("cannot be framed: {e}"),
                };
                self.push(Action::ConfigAnswered { result });
            }
        }
    }

    /// The answer to [`Action::Welcome`]: the machine's desired generation.
    pub(crate) fn welcome(&mut self, request_id: u64, desired: u64) {
        let dialect = self.hello.unwrap_or(Dialect::V1);
        let ack = dialect.ack(self.p.cert_id, request_id, "welcome", desired);
        self.push(Action::ReplyNow(ack));
        // Brought up to date in the background, after the machine has its ACK.
        self.push(Action::DeliverPending);
    }

    /// The answer to [`Action::DeliverInBand`]: the configuration waiting for the
    /// machine, if any. With one, the CONFIG is the answer to the HELLO (which also
    /// means the HELLO was accepted) and the next frame is its answer.
    pub(crate) fn in_band(&mut self, pending: Option<&Generation>, now: Instant) {
        let id = self.p.cert_id;
        let dialect = self.hello.unwrap_or(Dialect::V0);
        let Some(g) = pending else {
            let ack = dialect.ack(id, 0, "OK", 0);
            self.push(Action::ReplyNow(ack));
            return;
        };
        match dialect.config_frame(g, 0) {
            Ok(f) => {
                self.push(Action::ReplyNow(f));
                self.awaiting = Some(Awaiting {
                    sent: Sent::InBand,
                    dialect,
                    generation: g.generation,
                    sent_at: now,
                });
            }
            Err(e) => {
                let result = PushResult::Nack {
                    generation: g.generation,
                    detail: format!("cannot be framed: {e}"),
                };
                self.push(Action::PushOutcome {
                    result,
                    elapsed: None,
                });
                let ack = dialect.ack(id, 0, "OK", 0);
                self.push(Action::ReplyNow(ack));
            }
        }
    }

    /// The answer to [`Action::CheckMsgAddress`]: the recorded address of the
    /// machine's last HELLO.
    pub(crate) fn msg_address_checked(
        &mut self,
        dialect: Dialect,
        text: &str,
        last_peer: Option<&str>,
    ) {
        let id = self.p.cert_id;
        let reply = if dialect::from_last_hello_address(last_peer, self.p.peer) {
            tracing::info!(machine = id, "MSG: {}", text.escape_debug());
            dialect.ack(id, 0, "OK", 0)
        } else {
            dialect.nack(
                id,
                0,
                NackReason::NotAllowed,
                "no HELLO from this machine at this address; say HELLO first",
            )
        };
        self.answer(dialect, reply);
    }

    /// The answer to [`Action::Swipe`]: the bridge's verdict.
    pub(crate) fn swipe_verdict(&mut self, request_id: u64, verdict: SwipeVerdict) {
        let id = self.p.cert_id;
        let dialect = Dialect::V1;
        let reply = match verdict {
            SwipeVerdict::Ack(detail) => dialect.ack(id, request_id, detail, 0),
            SwipeVerdict::Nack(reason, detail) => dialect.nack(id, request_id, reason, detail),
        };
        self.answer(dialect, reply);
    }
}

#[cfg(test)]
mod tests;
