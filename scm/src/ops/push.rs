//! Configuration pushes: store a new generation, then deliver it to the machine and wait
//! for its ACK or NACK. A machine's `delivery` setting says how: over the mutual-TLS link
//! the machine holds to the SCM (`link`, the default for version 1: the link's task sends
//! the CONFIG and hands back the answer), or by connecting to its config port, where the
//! machine is the TLS server (`port`: version 0, and machines that serve a config port).
//! A machine that cannot be reached keeps the generation pending; it is delivered when
//! the machine next says HELLO, or by the retry task.

use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::Identity;
use scm_proto::Frame;
use scm_proto::io::{FrameReader, write_frame_with};
use tokio::net::TcpStream;

pub(crate) use crate::link::dialect::{AnswerError, PushResult, Reply};
use crate::link::dialect::{ByteOrder, Dialect};
use crate::link::mailbox::{self, Mailbox};
use crate::ops::Ops;
use crate::ops::fleet::Delivery;
use crate::state::{Durability, Generation, Outcome, StoreError};

/// Why a push could not even be attempted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// An unknown machine is refused before a push starts (`ops::operator` checks the target
// once, as `SelectError::UnknownMachine`), so the database is the only way left to fail.
pub(crate) enum PushError {
    /// Database failure.
    #[error("{hint}", hint = .0.operator_hint())]
    Store(#[from] StoreError),
}

/// Stores `content` as machine `id`'s desired configuration and delivers it now. The
/// machine and the content have been checked by the caller ([`crate::ops::operator`], the
/// one place that checks them).
pub(crate) async fn push(
    ops: &Arc<Ops>,
    id: u16,
    content: Vec<u8>,
    actor: &str,
) -> Result<PushResult, PushError> {
    let actor_owned = actor.to_string();
    let (generation, _new) = ops
        .store
        .fleet()
        .create_generation(id, content, actor_owned)
        .await?;
    let Some(generation) = ops.store.fleet().get_generation(id, generation).await? else {
        return Err(PushError::Store(StoreError::Task(format!(
            "generation {generation} of machine {id} vanished"
        ))));
    };
    Ok(deliver(ops, generation).await?)
}

/// How a CONFIG reaches a machine now.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// Over the machine's live version-1 link.
    Link(Arc<Mailbox>),
    /// To the config port at this `host:port`.
    Port(String),
}

/// How a CONFIG would reach machine `id` now, if it can; `None` leaves it pending until
/// the machine says HELLO (and for version 0, gets it in-band then).
pub(crate) fn route(ops: &Ops, id: u16) -> Option<Route> {
    let machine = ops.settings.machine(id);
    let delivery = machine.map(|m| m.delivery()).unwrap_or(Delivery::Link);
    match delivery {
        Delivery::Link => {
            let s = ops.sessions.session(id)?;
            s.mailbox.filter(|_| s.version == 1).map(Route::Link)
        }
        Delivery::Port => {
            if let Some(addr) = machine.and_then(|m| m.config_addr.clone()) {
                return Some(Route::Port(addr));
            }
            // Where the agent says its config port is, never the address its HELLO came
            // from: that is often another interface, or a NAT's.
            ops.sessions.session(id)?.config_address.map(Route::Port)
        }
    }
}

/// How configurations reach machine `id` now, in words (telnet `status`).
pub(crate) fn describe_route(ops: &Ops, id: u16) -> String {
    match route(ops, id) {
        Some(Route::Link(_)) => "over the machine's link".into(),
        Some(Route::Port(addr)) => format!("to its config port at {addr}"),
        None => match ops.settings.machine(id).map(|m| m.delivery()) {
            Some(Delivery::Port) => "config port, address unknown (in-band at next HELLO)".into(),
            _ => "over its link, once connected".into(),
        },
    }
}

/// Why a machine has no route now, for the attempt's detail.
fn no_route(ops: &Ops, id: u16) -> String {
    let delivery = ops
        .settings
        .machine(id)
        .map(|m| m.delivery())
        .unwrap_or(Delivery::Link);
    match delivery {
        Delivery::Link => "machine is not connected; it gets the configuration over its link after its next HELLO".into(),
        Delivery::Port => "machine has no known config address (set config_addr, or let the agent announce its [listen] config address in HELLO) and is not connected; it gets the configuration at its next HELLO".into(),
    }
}

/// Delivers one generation over the machine's config port and records the outcome.
///
/// Deliveries to one machine are serialised. Once it is this generation's turn, the
/// machine's state is read again: a generation the machine already applied is reported
/// as ACKed without sending it again (so a configuration is applied exactly once), and a
/// generation overtaken by a newer one is reported superseded instead of being sent out
/// of order.
pub(crate) async fn deliver(
    ops: &Arc<Ops>,
    generation: Generation,
) -> Result<PushResult, StoreError> {
    deliver_with(ops, generation, Sync::Now).await
}

/// When a delivery's outcome reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    /// Before [`deliver_with`] returns (its own fsync).
    Now,
    /// At the caller's next [`FleetState::sync`](crate::state::FleetState::sync): a fleet push records every outcome without
    /// waiting for the disk and syncs once before it answers the operator (group commit).
    Batched,
}

/// [`deliver`], with the outcome recorded durably now or at the caller's next sync.
pub(crate) async fn deliver_with(
    ops: &Arc<Ops>,
    generation: Generation,
    sync: Sync,
) -> Result<PushResult, StoreError> {
    let id = generation.machine_id;
    let _guard = ops.delivery_locks.acquire(id).await;
    let g = generation.generation;
    let started = std::time::Instant::now();
    let state = ops.store.fleet().get_machine(id).await?;
    if let Some(m) = state {
        let newest = m.desired_generation.max(m.applied_generation);
        if m.applied_generation == g {
            return Ok(PushResult::Ack {
                generation: g,
                detail: "already applied; not sent again".into(),
            });
        }
        if newest > g {
            let result = PushResult::Superseded {
                generation: g,
                by: newest,
            };
            crate::ops::push::count_outcome(&result, None);
            record_with(ops, id, &result, sync).await?;
            return Ok(result);
        }
    }
    let result = match route(ops, id) {
        None => PushResult::Unreachable {
            generation: g,
            detail: no_route(ops, id),
        },
        Some(Route::Link(mailbox)) => {
            // The link times the answer out after `push_reply`; the margin covers a link
            // task busy with a burst when the CONFIG is posted.
            let limit = ops.settings.push_reply + Duration::from_secs(2);
            let request_id = ops.next_id();
            let mut result = mailbox::deliver(&mailbox, generation, request_id, limit).await;
            if let PushResult::Unreachable { generation, .. } = &mut result {
                // The link's own outcome does not know the generation it was for.
                *generation = g;
            }
            result
        }
        Some(Route::Port(target)) => PushResult::from_answer(
            g,
            send_config(ops, &target, &generation)
                .await
                .map_err(|e| format!("{target}: {e}")),
        ),
    };
    crate::ops::push::count_outcome(&result, Some(started.elapsed()));
    record_with(ops, id, &result, sync).await?;
    if matches!(result, PushResult::Unreachable { .. }) {
        ops.retry_kick.kick();
    }
    Ok(result)
}

/// Waits up to `wait` for the machines among `results` left pending to answer (at their
/// next HELLO, or a retry), watching `events` (subscribed before the push), and puts
/// their ACK, NACK or superseded outcome in place of the pending one. A watcher that
/// falls behind reads the outcome from the store instead.
pub(crate) async fn await_answers(
    ops: &Ops,
    events: &mut crate::coord::events::Subscription,
    results: &mut [(u16, Result<PushResult, PushError>)],
    wait: Duration,
) {
    use crate::coord::events::{EventKind, PushOutcome, Received};
    let deadline = tokio::time::Instant::now() + wait;
    let pending = |results: &[(u16, Result<PushResult, PushError>)]| {
        results
            .iter()
            .any(|(_, r)| matches!(r, Ok(PushResult::Unreachable { .. })))
    };
    while pending(results) {
        let next = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(n)) => n,
            Ok(None) | Err(_) => break,
        };
        match next {
            Received::Event(e) => {
                let EventKind::Push {
                    machine,
                    generation,
                    outcome,
                    detail,
                } = &e.kind
                else {
                    continue;
                };
                let Some((_, slot)) = results.iter_mut().find(|(id, r)| {
                    id == machine
                        && matches!(r, Ok(PushResult::Unreachable { generation: g, .. }) if g == generation)
                }) else {
                    continue;
                };
                let (generation, detail) = (*generation, detail.clone());
                *slot = Ok(match outcome {
                    PushOutcome::Ack => PushResult::Ack { generation, detail },
                    PushOutcome::Nack => PushResult::Nack { generation, detail },
                    PushOutcome::Superseded | PushOutcome::Pending => continue,
                });
            }
            Received::Lagged(_) => {
                for (id, slot) in results.iter_mut() {
                    let Ok(PushResult::Unreachable { generation, .. }) = slot else {
                        continue;
                    };
                    let g = *generation;
                    if let Ok(Some(m)) = ops.store.fleet().get_machine(*id).await
                        && m.applied_generation == g
                    {
                        *slot = Ok(PushResult::Ack {
                            generation: g,
                            detail: "applied (seen in the state after the event stream lagged)"
                                .into(),
                        });
                    }
                }
            }
        }
    }
    for (_, slot) in results.iter_mut() {
        if let Ok(PushResult::Unreachable { detail, .. }) = slot {
            detail.push_str(&format!(
                "; no answer within the {} s waited",
                wait.as_secs_f64()
            ));
        }
    }
}

/// Records a delivery result in the database.
pub(crate) async fn record(ops: &Ops, id: u16, result: &PushResult) -> Result<(), StoreError> {
    record_with(ops, id, result, Sync::Now).await
}

/// [`record`], durable now or at the caller's next [`FleetState::sync`](crate::state::FleetState::sync).
pub(crate) async fn record_with(
    ops: &Ops,
    id: u16,
    result: &PushResult,
    sync: Sync,
) -> Result<(), StoreError> {
    let (g, outcome, detail) = match result {
        PushResult::Ack { generation, detail } => (*generation, Outcome::Ack, detail.clone()),
        PushResult::Nack { generation, detail } => (*generation, Outcome::Nack, detail.clone()),
        PushResult::Unreachable { generation, detail } => {
            (*generation, Outcome::Unreachable, detail.clone())
        }
        PushResult::Superseded { generation, by } => (
            *generation,
            Outcome::Superseded,
            format!("not sent: generation {by} is newer"),
        ),
    };
    let durability = if sync == Sync::Now {
        Durability::Synced
    } else {
        Durability::Deferred
    };
    // Logged and published once it is recorded: a watcher (or a test) that sees the
    // outcome then finds it in the state too.
    ops.store
        .fleet()
        .record_attempt(id, g, outcome, detail.clone(), durability)
        .await?;
    tracing::info!(machine = id, generation = g, outcome = ?outcome, "{detail}");
    ops.events.push(id, result);
    Ok(())
}

/// The CONFIG frame for this machine's protocol version.
pub(crate) fn config_frame(
    version: u8,
    generation: &Generation,
    request_id: u64,
) -> Result<Frame, scm_proto::FrameError> {
    Dialect::from_version(version).config_frame(generation, request_id)
}

/// Interprets a frame received in answer to a CONFIG.
pub(crate) fn parse_answer(frame: &Frame, id: u16, request_id: u64) -> Result<Reply, AnswerError> {
    Dialect::from_version(frame.version).parse_reply(frame, id, request_id)
}

/// Why a CONFIG could not be delivered over the machine's config port (the texts end up
/// in the attempt's detail and in operators' replies).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum SendError {
    #[error("no TCP connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] scm_certs::tls::HandshakeError),
    #[error("configuration does not fit in a frame: {0}")]
    Frame(#[source] scm_proto::FrameError),
    #[error("cannot send CONFIG: {0}")]
    Send(#[source] std::io::Error),
    #[error("no answer to CONFIG: {0}")]
    NoAnswer(#[source] scm_proto::ReadError),
    #[error(
        "the machine closed the connection without answering (was the SCM's certificate refused?)"
    )]
    Closed,
    #[error("{0}")]
    Answer(#[from] AnswerError),
}

async fn send_config(ops: &Ops, target: &str, generation: &Generation) -> Result<Reply, SendError> {
    let id = generation.machine_id;
    let version = ops
        .settings
        .machine(id)
        .map(|m| m.protocol_version)
        .unwrap_or(1);
    let connect_timeout = ops.settings.push_connect;
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(target))
        .await
        .map_err(|_| SendError::ConnectTimeout(connect_timeout))?
        .map_err(SendError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let tls = scm_certs::tls::connect(
        &ops.tls.machines(),
        tcp,
        &Identity::Machine(id),
        connect_timeout,
    )
    .await
    .map_err(SendError::Handshake)?;
    let (r, mut w) = tokio::io::split(tls);
    let request_id = ops.next_id();
    let frame = config_frame(version, generation, request_id).map_err(SendError::Frame)?;
    let codec = ops
        .settings
        .machine(id)
        .map(|m| m.byte_order)
        .unwrap_or(ByteOrder::Little)
        .codec(4096);
    write_frame_with(&mut w, &frame, codec.v0_byte_order())
        .await
        .map_err(SendError::Send)?;
    scm_common::failpoint::pause("scm-after-config-sent").await;
    let mut reader = FrameReader::new(r, codec);
    let reply_timeout = ops.settings.push_reply;
    let answer = reader
        .read_frame(Some(reply_timeout), reply_timeout)
        .await
        .map_err(SendError::NoAnswer)?
        .ok_or(SendError::Closed)?;
    // Close with close_notify so the machine sees a clean end of the session.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    Ok(parse_answer(&answer, id, request_id)?)
}

/// Counts a delivery's outcome and, when the machine answered, how long it took.
pub(crate) fn count_outcome(result: &PushResult, elapsed: Option<std::time::Duration>) {
    count_outcome_in(crate::metrics::global(), result, elapsed);
}

fn count_outcome_in(
    m: &crate::metrics::ScmMetrics,
    result: &PushResult,
    elapsed: Option<std::time::Duration>,
) {
    let outcome = match result {
        PushResult::Ack { .. } => "ack",
        PushResult::Nack { .. } => "nack",
        PushResult::Unreachable { .. } => "unreachable",
        PushResult::Superseded { .. } => "superseded",
    };
    m.pushes.inc(&[outcome]);
    if matches!(result, PushResult::Ack { .. } | PushResult::Nack { .. })
        && let Some(d) = elapsed
    {
        m.push_duration.observe_duration(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scm_proto::Code;
    use scm_proto::v1::{self, Message};

    fn generation() -> Generation {
        Generation {
            machine_id: 7,
            generation: 3,
            content: b"k=v\n".to_vec(),
            sha256: crate::state::sha256_hex(b"k=v\n"),
        }
    }

    #[test]
    fn v0_config_frame_is_raw() {
        let f = config_frame(0, &generation(), 1).unwrap();
        assert_eq!(
            f.to_bytes().unwrap().as_ref(),
            b"\x00\x02\x07\x00\x04\x00k=v\n"
        );
    }

    #[test]
    fn v1_config_frame_carries_generation_and_hash() {
        let f = config_frame(1, &generation(), 99).unwrap();
        match Message::decode(&f).unwrap() {
            Message::Config(c) => {
                assert_eq!((c.request_id, c.generation), (99, 3));
                assert_eq!(c.content, b"k=v\n");
                assert_eq!(hex::encode(c.sha256), generation().sha256);
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn replies_are_matched_to_the_request() {
        let ack = scm_proto::reply_frame(&Message::ack(5, "stored", 3), 7);
        assert_eq!(
            parse_answer(&ack, 7, 5).ok(),
            Some(Reply::Ack("stored".into()))
        );
        assert!(parse_answer(&ack, 7, 6).is_err(), "wrong request id");
        assert!(parse_answer(&ack, 8, 5).is_err(), "wrong machine");
        let nack = scm_proto::reply_frame(
            &Message::nack(5, v1::NackReason::WrongMachineId, "not me"),
            7,
        );
        match parse_answer(&nack, 7, 5) {
            Ok(Reply::Nack(t)) => assert!(t.contains("not me") && t.contains("WRONG_MACHINE_ID")),
            r => panic!("{r:?}"),
        }
        let v0 = Frame::v0(Code::Nack, 7, &b"bad"[..]).unwrap();
        assert_eq!(
            parse_answer(&v0, 7, 0).ok(),
            Some(Reply::Nack("bad".into()))
        );
    }

    #[test]
    fn push_outcomes_are_counted_and_only_answers_timed() {
        let m = crate::metrics::ScmMetrics::default();
        let r = |ack| {
            if ack {
                PushResult::Ack {
                    generation: 1,
                    detail: String::new(),
                }
            } else {
                PushResult::Unreachable {
                    generation: 1,
                    detail: String::new(),
                }
            }
        };
        count_outcome_in(&m, &r(false), Some(Duration::from_millis(5)));
        assert_eq!(m.pushes.get(&["unreachable"]), 1);
        assert_eq!(m.push_duration.count(), 0, "no answer, no duration");
        count_outcome_in(&m, &r(true), Some(Duration::from_millis(5)));
        assert_eq!(m.pushes.get(&["ack"]), 1);
        assert_eq!(m.push_duration.count(), 1);
    }
}
