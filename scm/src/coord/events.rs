//! The SCM's event bus: machine connections, push outcomes and card swipes, published as
//! they happen to any number of watchers (the admin API's `WatchEvents`).
//!
//! It is a bounded [`tokio::sync::broadcast`] channel: publishing never waits, so a slow
//! watcher can never slow the hub down. A watcher that falls more than the capacity
//! behind loses the oldest events; its next [`Subscription::next`] then returns
//! [`Received::Lagged`] with the number it missed, and it continues with the oldest event
//! still buffered. Publishing with nobody watching costs one lock and one clone.
//!
//! Every event gets a sequence number (from 1, in publishing order) and a Unix-ms time.
//! Card numbers only ever enter the bus masked.
//!
//! [`EventBus`] is the interface; [`LocalBus`] is today's in-process broadcast channel.
//! Publishers and watchers hold an [`Events`] handle, which reaches whichever bus it was
//! built on, so a shared bus (watchers of several SCMs) can replace the local one.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use scm_common::lock::LockExt;
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::link::PushResult;
use crate::state::now_ms;

/// `[events]` in the SCM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EventSettings {
    /// Events buffered for watchers; a watcher further behind than this loses events
    /// (and is told how many).
    pub capacity: usize,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self { capacity: 4096 }
    }
}

/// What became of a delivery attempt, as watchers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushOutcome {
    /// The machine stored the configuration.
    Ack,
    /// The machine refused it.
    Nack,
    /// Unreachable for now; stays pending.
    Pending,
    /// Replaced by a newer generation before delivery.
    Superseded,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// A machine's event link came up (HELLO accepted).
    Connected {
        /// Machine id.
        machine: u16,
        /// Peer address.
        peer: String,
        /// Protocol version of the HELLO.
        version: u8,
    },
    /// A machine's event link went down.
    Disconnected {
        /// Machine id.
        machine: u16,
        /// Peer address.
        peer: String,
    },
    /// A delivery outcome was recorded.
    Push {
        /// Machine id.
        machine: u16,
        /// Generation.
        generation: u64,
        /// Outcome.
        outcome: PushOutcome,
        /// The machine's text, or why.
        detail: String,
    },
    /// A card swipe was received from a machine.
    Swipe {
        /// Machine id.
        machine: u16,
        /// Reader id.
        reader: String,
        /// The card number, masked (never in clear).
        card_masked: String,
        /// `accepted` or `refused`.
        outcome: &'static str,
        /// What the SCM did with it.
        detail: String,
    },
}

/// One published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// Sequence number, from 1, in publishing order.
    pub seq: u64,
    /// Unix ms.
    pub at_ms: i64,
    /// What happened.
    pub kind: EventKind,
}

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Received {
    /// The next event.
    Event(Arc<Event>),
    /// The watcher fell behind and this many events were dropped for it.
    Lagged(u64),
}

/// A bus: numbers events, hands them to every current watcher, never waits.
pub(crate) trait EventBus: Send + Sync + std::fmt::Debug {
    /// Publishes an event; never waits. Returns its sequence number.
    fn publish(&self, kind: EventKind) -> u64;
    /// Starts watching: events published from now on.
    fn subscribe(&self) -> Subscription;
    /// Number of current watchers.
    #[cfg(test)]
    fn watchers(&self) -> usize;
}

/// What a bus gives one watcher.
pub(crate) trait Watcher: Send + std::fmt::Debug {
    /// The next event, a lag report, or `None` once the bus is gone.
    fn next(&mut self) -> BoxFuture<'_, Option<Received>>;
}

/// The in-process bus: a bounded broadcast channel.
#[derive(Debug)]
pub(crate) struct LocalBus {
    tx: broadcast::Sender<Arc<Event>>,
    /// The last sequence number; held while sending so sequence order is send order.
    seq: Mutex<u64>,
}

impl LocalBus {
    /// A bus buffering `capacity` events per watcher (at least 1).
    pub(crate) fn new(capacity: usize) -> LocalBus {
        let (tx, _) = broadcast::channel(capacity.max(1));
        LocalBus {
            tx,
            seq: Mutex::new(0),
        }
    }
}

impl EventBus for LocalBus {
    fn publish(&self, kind: EventKind) -> u64 {
        let mut seq = self.seq.lock_unpoisoned();
        *seq += 1;
        let event = Arc::new(Event {
            seq: *seq,
            at_ms: now_ms(),
            kind,
        });
        // An error only means nobody is watching.
        let _ = self.tx.send(event);
        *seq
    }

    fn subscribe(&self) -> Subscription {
        Subscription::new(LocalWatcher {
            rx: self.tx.subscribe(),
        })
    }

    #[cfg(test)]
    fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[derive(Debug)]
struct LocalWatcher {
    rx: broadcast::Receiver<Arc<Event>>,
}

impl Watcher for LocalWatcher {
    fn next(&mut self) -> BoxFuture<'_, Option<Received>> {
        Box::pin(async move {
            match self.rx.recv().await {
                Ok(e) => Some(Received::Event(e)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some(Received::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
    }
}

/// The handle publishers and watchers hold; cheap to clone (all clones reach the same bus).
#[derive(Debug, Clone)]
pub(crate) struct Events {
    bus: Arc<dyn EventBus>,
}

impl Events {
    /// A handle on a new in-process bus buffering `capacity` events per watcher (at least 1).
    pub(crate) fn new(capacity: usize) -> Events {
        Events::on(Arc::new(LocalBus::new(capacity)))
    }

    /// A handle on `bus`.
    pub(crate) fn on(bus: Arc<dyn EventBus>) -> Events {
        Events { bus }
    }

    /// Publishes an event; never waits. Returns its sequence number.
    pub(crate) fn publish(&self, kind: EventKind) -> u64 {
        self.bus.publish(kind)
    }

    /// Starts watching: events published from now on.
    pub(crate) fn subscribe(&self) -> Subscription {
        self.bus.subscribe()
    }

    /// Number of current watchers.
    #[cfg(test)]
    pub(crate) fn watchers(&self) -> usize {
        self.bus.watchers()
    }

    /// A machine's link came up.
    pub(crate) fn connected(&self, machine: u16, peer: impl ToString, version: u8) {
        self.publish(EventKind::Connected {
            machine,
            peer: peer.to_string(),
            version,
        });
    }

    /// A machine's link went down.
    pub(crate) fn disconnected(&self, machine: u16, peer: impl ToString) {
        self.publish(EventKind::Disconnected {
            machine,
            peer: peer.to_string(),
        });
    }

    /// A delivery outcome was recorded.
    pub(crate) fn push(&self, machine: u16, result: &PushResult) {
        let (generation, outcome, detail) = push_parts(result);
        self.publish(EventKind::Push {
            machine,
            generation,
            outcome,
            detail,
        });
    }

    /// A swipe was answered; `card_masked` must already be masked.
    pub(crate) fn swipe(
        &self,
        machine: u16,
        reader: &str,
        card_masked: String,
        verdict: &crate::link::SwipeVerdict,
    ) {
        let (outcome, detail) = match verdict {
            crate::link::SwipeVerdict::Ack(d) => ("accepted", d.clone()),
            crate::link::SwipeVerdict::Nack(reason, d) => {
                ("refused", format!("{} ({})", d, reason.as_str_name()))
            }
        };
        self.publish(EventKind::Swipe {
            machine,
            reader: reader.chars().take(32).collect(),
            card_masked,
            outcome,
            detail,
        });
    }
}

/// Generation, outcome and detail of a delivery result.
pub(crate) fn push_parts(result: &PushResult) -> (u64, PushOutcome, String) {
    match result {
        PushResult::Ack { generation, detail } => (*generation, PushOutcome::Ack, detail.clone()),
        PushResult::Nack { generation, detail } => (*generation, PushOutcome::Nack, detail.clone()),
        PushResult::Unreachable { generation, detail } => {
            (*generation, PushOutcome::Pending, detail.clone())
        }
        PushResult::Superseded { generation, by } => (
            *generation,
            PushOutcome::Superseded,
            format!("generation {by} is newer and is the one delivered; not sent"),
        ),
    }
}

/// One watcher's view of the bus.
#[derive(Debug)]
pub(crate) struct Subscription {
    watcher: Box<dyn Watcher>,
}

impl Subscription {
    /// A subscription reading from `watcher`.
    pub(crate) fn new(watcher: impl Watcher + 'static) -> Subscription {
        Subscription {
            watcher: Box::new(watcher),
        }
    }

    /// The next event, or how many were dropped because this watcher fell behind.
    /// `None` once the bus is gone (the SCM is shutting down).
    pub(crate) async fn next(&mut self) -> Option<Received> {
        self.watcher.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(i: u16) -> EventKind {
        EventKind::Disconnected {
            machine: i,
            peer: "127.0.0.1:1".into(),
        }
    }

    async fn expect_event(s: &mut Subscription) -> Arc<Event> {
        match s.next().await {
            Some(Received::Event(e)) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn events_are_numbered_in_order_for_every_watcher() {
        let bus = Events::new(16);
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        assert_eq!(bus.watchers(), 2);
        for i in 1..=3 {
            assert_eq!(bus.publish(kind(i)), u64::from(i));
        }
        for s in [&mut a, &mut b] {
            for i in 1..=3u16 {
                let e = expect_event(s).await;
                assert_eq!(e.seq, u64::from(i));
                assert_eq!(e.kind, kind(i));
                assert!(e.at_ms > 0);
            }
        }
    }

    #[tokio::test]
    async fn a_lagging_watcher_is_told_how_many_it_missed_and_continues() {
        let bus = Events::new(4);
        let mut slow = bus.subscribe();
        let mut fast = bus.subscribe();
        // Ten events while `slow` reads nothing: publishing never waits for it.
        for i in 1..=10 {
            bus.publish(kind(i));
            assert_eq!(expect_event(&mut fast).await.seq, u64::from(i));
        }
        assert_eq!(slow.next().await, Some(Received::Lagged(6)));
        for seq in 7..=10 {
            assert_eq!(expect_event(&mut slow).await.seq, seq);
        }
        // And it keeps receiving new events normally.
        bus.publish(kind(11));
        assert_eq!(expect_event(&mut slow).await.seq, 11);
    }

    #[tokio::test]
    async fn publishing_without_watchers_is_fine_and_the_end_is_seen() {
        let bus = Events::new(2);
        assert_eq!(bus.publish(kind(1)), 1);
        let mut s = bus.subscribe();
        drop(bus);
        assert_eq!(s.next().await, None, "bus gone");
    }

    #[tokio::test]
    async fn push_and_swipe_events_carry_outcomes_and_only_masked_cards() {
        let bus = Events::new(8);
        let mut s = bus.subscribe();
        bus.push(
            3,
            &PushResult::Unreachable {
                generation: 2,
                detail: "refused".into(),
            },
        );
        let e = expect_event(&mut s).await;
        assert_eq!(
            e.kind,
            EventKind::Push {
                machine: 3,
                generation: 2,
                outcome: PushOutcome::Pending,
                detail: "refused".into()
            }
        );
        bus.push(
            3,
            &PushResult::Superseded {
                generation: 2,
                by: 5,
            },
        );
        match &expect_event(&mut s).await.kind {
            EventKind::Push {
                outcome, detail, ..
            } => {
                assert_eq!(*outcome, PushOutcome::Superseded);
                assert!(detail.contains("generation 5"), "{detail}");
            }
            k => panic!("{k:?}"),
        }
        let card = "12345678";
        bus.swipe(
            3,
            "r1",
            scm_common::card::mask(card),
            &crate::link::SwipeVerdict::Nack(
                scm_proto::v1::NackReason::InvalidCard,
                "too short".into(),
            ),
        );
        let e = expect_event(&mut s).await;
        match &e.kind {
            EventKind::Swipe {
                card_masked,
                outcome,
                detail,
                ..
            } => {
                assert!(!card_masked.contains(card), "{card_masked}");
                assert_eq!(*outcome, "refused");
                assert!(detail.contains("INVALID_CARD"), "{detail}");
            }
            k => panic!("{k:?}"),
        }
    }
}
