//! The agent's side of the agent link, without I/O: the HELLO exchange, heartbeats and
//! their deadline, the answers to swipes, CONFIGs from the SCM to store, and when the
//! link counts as lost. The driver
//! in `link.rs` feeds it frames, read errors, the end of the stream and timeouts with the
//! time, and carries out the [`Action`]s it queues (quinn-style: `handle_*`, then
//! `poll_action` until `None`). The swipe queue stays the driver's: it is shared with
//! the card readers, and its answers are fed back through [`AgentLink::answered`].

use std::collections::VecDeque;
use std::time::Duration;

use scm_proto::Frame;
use scm_proto::io::ReadError;
use scm_proto::v1::{self, Message, NackReason};
use tokio::time::Instant;

use super::LinkError;

/// What the state machine needs to know, fixed for the link's life.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// This machine.
    pub(crate) machine_id: u16,
    /// Config port to report in HELLO (0: none).
    pub(crate) config_port: u16,
    /// Its address to announce in HELLO (empty: none).
    pub(crate) config_address: String,
    /// Heartbeat interval: a heartbeat is due after this much time without one.
    pub(crate) heartbeat: Duration,
    /// Time allowed for each answer.
    pub(crate) reply: Duration,
    /// Frame stall timeout.
    pub(crate) stall: Duration,
    /// Reader ids, announced in HELLO.
    pub(crate) readers: Vec<String>,
}

/// The configuration this agent holds, announced in HELLO.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applied {
    pub(crate) generation: u64,
    pub(crate) sha256: [u8; 32],
}

/// An ACK or NACK from the SCM, for the swipe queue to match first.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) request_id: u64,
    pub(crate) ok: bool,
    pub(crate) reason: NackReason,
    pub(crate) detail: String,
}

/// The agent's counts of swipes that never reached the SCM, reported in heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Refusals {
    pub(crate) invalid: u64,
    pub(crate) queue_full: u64,
    pub(crate) expired: u64,
}

/// Something the driver must do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write this frame.
    Send(Frame),
    /// The SCM accepted the HELLO (it holds `desired` as the newest generation): the
    /// reconnect back-off starts over.
    Established { desired: u64 },
    /// Send the swipes waiting in the queue, numbered with
    /// [`AgentLink::next_request_id`].
    SendSwipes,
    /// Offer this answer to the swipe queue, then call [`AgentLink::answered`].
    Answered(Answer),
    /// Check and store this CONFIG from the SCM (as the config port does), then send
    /// the answer.
    Apply(Frame),
    /// The link is over.
    Close(LinkError),
}

#[derive(Debug)]
enum Phase {
    /// HELLO sent with this request id; nothing else is sent before its ACK.
    Hello { request_id: u64 },
    /// Up: the next heartbeat is due at `next_heartbeat`; `outstanding` is the
    /// heartbeat waiting for its ACK and when it was sent.
    Up {
        next_heartbeat: Instant,
        outstanding: Option<(u64, Instant)>,
    },
    /// Closed: nothing more happens.
    Closed,
}

/// The protocol state of one connection to the SCM.
#[derive(Debug)]
pub(crate) struct AgentLink {
    p: Params,
    phase: Phase,
    /// The last request id used on this connection (counted up from 1).
    request_id: u64,
    /// What the next heartbeat reports.
    refusals: Refusals,
    actions: VecDeque<Action>,
}

impl AgentLink {
    /// A new connection: queues its HELLO.
    pub(crate) fn new(p: Params, applied: Option<Applied>) -> Self {
        let request_id = 1;
        let hello = Message::Hello(v1::Hello {
            request_id,
            agent_version: format!("machine-agent {}", env!("CARGO_PKG_VERSION")),
            config_port: u32::from(p.config_port),
            applied_generation: applied.as_ref().map(|a| a.generation).unwrap_or(0),
            applied_sha256: applied
                .as_ref()
                .map(|a| a.sha256.to_vec())
                .unwrap_or_default(),
            readers: p.readers.clone(),
            config_address: p.config_address.clone(),
        });
        let frame = scm_proto::reply_frame(&hello, p.machine_id);
        let mut link = AgentLink {
            p,
            phase: Phase::Hello { request_id },
            request_id,
            refusals: Refusals::default(),
            actions: VecDeque::new(),
        };
        link.push(Action::Send(frame));
        link
    }

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn close(&mut self, e: LinkError) {
        self.phase = Phase::Closed;
        self.push(Action::Close(e));
    }

    /// The next thing to do, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether the SCM has accepted the HELLO.
    pub(crate) fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up { .. })
    }

    /// A fresh request id for a request sent on this connection.
    pub(crate) fn next_request_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    /// The idle and stall timeouts for the next read: the answer to HELLO is awaited for
    /// the reply time; once up, the heartbeat deadline (see [`Self::poll_timeout`])
    /// stands in for an idle timeout.
    pub(crate) fn read_limits(&self) -> (Option<Duration>, Duration) {
        match self.phase {
            Phase::Hello { .. } => (Some(self.p.reply), self.p.stall),
            _ => (None, self.p.stall),
        }
    }

    /// When [`Self::handle_timeout`] is next due, if ever.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Up {
                next_heartbeat,
                outstanding,
            } => Some(match outstanding {
                Some((_, sent)) => next_heartbeat.min(sent + self.p.reply),
                None => next_heartbeat,
            }),
            _ => None,
        }
    }

    /// The counts the next heartbeat reports (the driver reads them from the queue).
    pub(crate) fn set_refusals(&mut self, r: Refusals) {
        self.refusals = r;
    }

    /// Time has passed: a heartbeat may be due, or an answer overdue.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let Phase::Up {
            next_heartbeat,
            outstanding,
        } = &mut self.phase
        else {
            return;
        };
        if outstanding.is_some_and(|(_, sent)| now >= sent + self.p.reply) {
            self.close(LinkError::Lost("no answer from the SCM in time".into()));
            return;
        }
        if now < *next_heartbeat {
            return;
        }
        // A fixed rhythm like a tokio interval: a late tick does not shift later ones.
        *next_heartbeat += self.p.heartbeat;
        // One heartbeat at a time: while one is unanswered the link is not quiet.
        if outstanding.is_some() {
            return;
        }
        self.request_id += 1;
        *outstanding = Some((self.request_id, now));
        let hb = Message::Heartbeat(v1::Heartbeat {
            request_id: self.request_id,
            sent_at_unix_ms: super::now_ms(),
            swipes_invalid: self.refusals.invalid,
            swipes_queue_full: self.refusals.queue_full,
            swipes_expired: self.refusals.expired,
        });
        let frame = scm_proto::reply_frame(&hb, self.p.machine_id);
        self.push(Action::Send(frame));
    }

    /// Swipes are waiting (new ones, or a retry or expiry came due).
    pub(crate) fn swipes_due(&mut self) {
        if self.is_up() {
            self.push(Action::SendSwipes);
        }
    }

    /// A frame from the SCM.
    pub(crate) fn handle_frame(&mut self, frame: Frame, now: Instant) {
        match self.phase {
            Phase::Hello { request_id } => self.hello_answered(request_id, &frame, now),
            // A CONFIG is answered even when its payload is unreadable (NACK MALFORMED):
            // the SCM waits for an answer. The link's peer proved the SCM's identity in
            // the handshake; the frame's own checks (machine id, hash, generation) are
            // the store's, as on the config port.
            Phase::Up { .. } if frame.code() == Some(scm_proto::Code::Config) => {
                self.push(Action::Apply(frame))
            }
            Phase::Up { .. } => match Message::decode(&frame) {
                Ok(Message::Ack(a)) => self.push(Action::Answered(Answer {
                    request_id: a.request_id,
                    ok: true,
                    reason: NackReason::Unspecified,
                    detail: a.detail,
                })),
                Ok(Message::Nack(n)) => self.push(Action::Answered(Answer {
                    request_id: n.request_id,
                    ok: false,
                    reason: n.reason(),
                    detail: n.detail,
                })),
                Ok(_) => {}
                Err(e) => tracing::warn!("undecodable frame from the SCM: {e}"),
            },
            Phase::Closed => {}
        }
    }

    fn hello_answered(&mut self, request_id: u64, answer: &Frame, now: Instant) {
        let refused = match Message::decode(answer) {
            Ok(Message::Ack(a)) if a.request_id == request_id => {
                self.phase = Phase::Up {
                    next_heartbeat: now + self.p.heartbeat,
                    outstanding: None,
                };
                self.push(Action::Established {
                    desired: a.generation,
                });
                self.push(Action::SendSwipes);
                return;
            }
            Ok(Message::Nack(n)) => format!("{} ({})", n.detail, n.reason().as_str_name()),
            Ok(m) => format!("unexpected answer {}", m.code().name()),
            Err(_) => format!("unexpected answer: {}", answer.text_lossy()),
        };
        self.close(LinkError::Refused(refused));
    }

    /// The answer to [`Action::Answered`]: whether the swipe queue matched it.
    pub(crate) fn answered(&mut self, answer: Answer, was_swipe: bool) {
        if was_swipe {
            // A slot in the queue's window is free: the next swipes can go.
            self.push(Action::SendSwipes);
            return;
        }
        let Phase::Up { outstanding, .. } = &mut self.phase else {
            return;
        };
        if answer.ok {
            if outstanding.is_some_and(|(id, _)| id == answer.request_id) {
                *outstanding = None;
            }
        } else {
            tracing::warn!(
                "SCM NACK: {} ({})",
                answer.detail,
                answer.reason.as_str_name()
            );
        }
    }

    /// The SCM closed the connection cleanly.
    pub(crate) fn handle_end(&mut self) {
        let e = match self.phase {
            Phase::Hello { .. } => LinkError::Refused("connection closed before the answer to HELLO; the SCM may have refused our certificate".into()),
            _ => LinkError::Lost("the SCM closed the link".into()),
        };
        self.close(e);
    }

    /// Reading failed or timed out.
    pub(crate) fn handle_error(&mut self, e: ReadError) {
        let e = match self.phase {
            // In TLS 1.3 a refused client certificate only shows here, on the first read.
            Phase::Hello { .. } => LinkError::Refused(format!(
                "no answer to HELLO ({e}); is our certificate accepted?"
            )),
            _ => LinkError::Lost(e.to_string()),
        };
        self.close(e);
    }
}

/// The reconnect decision: how many attempts have failed since the link was last up,
/// which is what the back-off grows with.
#[derive(Debug, Default)]
pub(crate) struct Reconnect {
    attempt: u32,
}

impl Reconnect {
    /// The link came up: the next failure starts the back-off over.
    pub(crate) fn established(&mut self) {
        self.attempt = 0;
    }

    /// A connection ended: the attempt number to back off for (0-based).
    pub(crate) fn next_attempt(&mut self) -> u32 {
        let n = self.attempt;
        self.attempt = self.attempt.saturating_add(1);
        n
    }
}

#[cfg(test)]
mod tests;
