//! The agent's swipe queue: raw lines from the readers become swipes here.
//!
//! Each line is validated (card rules; refused lines are logged with the reason and the
//! masked card and counted), debounced (the same card on the same reader within the
//! debounce window counts once), and queued with a unique event id and a deadline (its time
//! to live). The event link sends queued swipes and removes them when the SCM ACKs; a swipe
//! not yet ACKed when the link drops is sent again on the next link, with the same event
//! id, as long as it is alive. A swipe whose time to live runs out is dropped and counted:
//! it is never delivered late.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use scm_common::card::{CardRules, mask};
use scm_common::lock::LockExt;
use scm_proto::v1;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::readers::RawLine;

/// `[swipes]` in the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwipeSettings {
    /// How long a swipe is worth delivering, from the moment it was read.
    pub ttl_ms: u64,
    /// The same card on the same reader within this window counts once.
    pub debounce_ms: u64,
    /// Most swipes held waiting for the SCM; beyond it new swipes are refused.
    pub queue_max: usize,
    /// Most swipes sent and not yet answered on one link.
    pub in_flight_max: usize,
}

impl Default for SwipeSettings {
    fn default() -> Self {
        Self {
            ttl_ms: 10_000,
            debounce_ms: 2_000,
            queue_max: 1_000,
            in_flight_max: 64,
        }
    }
}

/// Counters, for logs and metrics.
#[derive(Debug, Default)]
pub struct SwipeStats {
    /// Queued for the SCM.
    pub accepted: AtomicU64,
    /// Refused by the card rules.
    pub refused: AtomicU64,
    /// Repeats within the debounce window.
    pub debounced: AtomicU64,
    /// Dropped because their time to live ran out.
    pub expired: AtomicU64,
    /// Refused because the queue was full.
    pub queue_full: AtomicU64,
    /// ACKed by the SCM.
    pub acked: AtomicU64,
    /// NACKed by the SCM (final).
    pub nacked: AtomicU64,
}

/// What became of one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Queued with this event id.
    Accepted(String),
    /// Refused by the card rules (reason, never the card).
    Refused(String),
    /// A repeat within the debounce window.
    Debounced,
    /// The queue is full.
    QueueFull,
}

#[derive(Debug, Clone)]
struct Pending {
    event_id: String,
    reader: String,
    card: String,
    swiped_at_unix_ms: u64,
    expires_at: Instant,
    in_flight: Option<u64>,
    /// Not before this instant (after a BUSY answer).
    retry_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    pending: VecDeque<Pending>,
    last_seen: HashMap<(String, String), Instant>,
}

/// The queue shared by the reader pipeline and the event link.
#[derive(Debug)]
pub struct SwipeQueue {
    settings: SwipeSettings,
    rules: CardRules,
    inner: Mutex<Inner>,
    notify: Notify,
    /// Counters.
    pub stats: SwipeStats,
}

fn new_event_id() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

impl SwipeQueue {
    /// An empty queue.
    pub fn new(settings: SwipeSettings, rules: CardRules) -> Self {
        Self {
            settings,
            rules,
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            stats: SwipeStats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock_unpoisoned()
    }

    /// Validates, debounces and queues one line from a reader.
    pub fn offer(&self, raw: &RawLine) -> Offer {
        if raw.too_long {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let why = format!("line longer than {} bytes", crate::readers::MAX_LINE);
            tracing::warn!(reader = %raw.reader, "swipe refused: {why}");
            return Offer::Refused(why);
        }
        let text = String::from_utf8_lossy(&raw.line);
        let card = text.trim_matches(|c: char| c == ' ' || c == '\t');
        if let Err(e) = self.rules.validate(card) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(reader = %raw.reader, card = %mask(card), "swipe refused: {e}");
            return Offer::Refused(e.to_string());
        }
        let now = Instant::now();
        let mut inner = self.lock();
        let key = (raw.reader.clone(), card.to_string());
        let debounce = Duration::from_millis(self.settings.debounce_ms);
        if let Some(t) = inner.last_seen.get(&key)
            && now.duration_since(*t) < debounce
        {
            self.stats.debounced.fetch_add(1, Ordering::Relaxed);
            tracing::info!(reader = %raw.reader, card = %mask(card), "repeat within the debounce window; counted once");
            return Offer::Debounced;
        }
        if inner.last_seen.len() > 4096 {
            inner
                .last_seen
                .retain(|_, t| now.duration_since(*t) < debounce);
        }
        inner.last_seen.insert(key, now);
        self.purge_locked(&mut inner, now);
        if inner.pending.len() >= self.settings.queue_max {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(reader = %raw.reader, card = %mask(card), "swipe refused: {} swipes already wait for the SCM", inner.pending.len());
            return Offer::QueueFull;
        }
        let event_id = new_event_id();
        inner.pending.push_back(Pending {
            event_id: event_id.clone(),
            reader: raw.reader.clone(),
            card: card.to_string(),
            swiped_at_unix_ms: raw.at_unix_ms,
            expires_at: now + Duration::from_millis(self.settings.ttl_ms),
            in_flight: None,
            retry_at: None,
        });
        drop(inner);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(reader = %raw.reader, card = %mask(card), event = %event_id, "swipe queued");
        // One consumer (the event link): a stored permit wakes it even if it is busy now.
        self.notify.notify_one();
        Offer::Accepted(event_id)
    }

    fn purge_locked(&self, inner: &mut Inner, now: Instant) -> usize {
        let before = inner.pending.len();
        inner.pending.retain(|p| {
            let alive = p.expires_at > now;
            if !alive {
                tracing::warn!(reader = %p.reader, card = %mask(&p.card), event = %p.event_id, "swipe expired before the SCM acknowledged it; dropped");
            }
            alive
        });
        let n = before - inner.pending.len();
        self.stats.expired.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Drops expired swipes; returns how many.
    pub fn purge_expired(&self) -> usize {
        let mut inner = self.lock();
        self.purge_locked(&mut inner, Instant::now())
    }

    /// When the next swipe expires or may be retried, if any is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        let inner = self.lock();
        inner
            .pending
            .iter()
            .flat_map(|p| [Some(p.expires_at), p.retry_at])
            .flatten()
            .min()
    }

    /// Waits until a swipe is queued.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// The next swipes to send (up to the in-flight window), as SWIPE messages with fresh
    /// request ids from `next_request_id`; marks them in flight.
    pub fn take_unsent(&self, mut next_request_id: impl FnMut() -> u64) -> Vec<v1::Message> {
        let now = Instant::now();
        let mut inner = self.lock();
        self.purge_locked(&mut inner, now);
        let in_flight = inner
            .pending
            .iter()
            .filter(|p| p.in_flight.is_some())
            .count();
        let room = self.settings.in_flight_max.saturating_sub(in_flight);
        let mut out = Vec::new();
        for p in inner.pending.iter_mut() {
            if out.len() >= room {
                break;
            }
            if p.in_flight.is_some() || p.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let request_id = next_request_id();
            p.in_flight = Some(request_id);
            p.retry_at = None;
            let remaining = p.expires_at.saturating_duration_since(now);
            out.push(v1::Message::Swipe(v1::Swipe {
                request_id,
                event_id: p.event_id.clone(),
                reader_id: p.reader.clone(),
                card: p.card.clone(),
                swiped_at_unix_ms: p.swiped_at_unix_ms,
                ttl_ms: u32::try_from(remaining.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
                sent_at_unix_ms: scm_common::clock::now_ms_u64(),
            }));
        }
        out
    }

    /// Handles the SCM's answer to a request; returns false if it was not a swipe.
    pub fn answered(
        &self,
        request_id: u64,
        ack: bool,
        reason: v1::NackReason,
        detail: &str,
    ) -> bool {
        let mut inner = self.lock();
        let Some(pos) = inner
            .pending
            .iter()
            .position(|p| p.in_flight == Some(request_id))
        else {
            return false;
        };
        if !ack && reason == v1::NackReason::Busy {
            // The SCM is saturated: keep the swipe and try again shortly.
            if let Some(p) = inner.pending.get_mut(pos) {
                p.in_flight = None;
                p.retry_at = Some(Instant::now() + Duration::from_millis(200));
            }
            return true;
        }
        if let Some(p) = inner.pending.remove(pos) {
            if ack {
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                tracing::info!(reader = %p.reader, card = %mask(&p.card), event = %p.event_id, "swipe acknowledged by the SCM: {detail}");
            } else {
                self.stats.nacked.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reader = %p.reader, card = %mask(&p.card), event = %p.event_id, "swipe refused by the SCM: {detail} ({})", reason.as_str_name());
            }
        }
        true
    }

    /// The link dropped: every swipe in flight will be sent again on the next link.
    pub fn link_lost(&self) {
        let mut inner = self.lock();
        for p in inner.pending.iter_mut() {
            p.in_flight = None;
        }
    }

    /// Swipes waiting (sent or not).
    pub fn len(&self) -> usize {
        self.lock().pending.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Feeds reader lines into the queue, and drops swipes whose lifetime ends even while
/// the link to the SCM is down. Runs until shutdown.
pub async fn pipeline(
    mut rx: tokio::sync::mpsc::Receiver<RawLine>,
    queue: std::sync::Arc<SwipeQueue>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut readers_open = true;
    loop {
        let next = queue
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            line = rx.recv(), if readers_open => match line {
                Some(raw) => {
                    queue.offer(&raw);
                }
                None => readers_open = false,
            },
            _ = tokio::time::sleep_until(next) => {
                queue.purge_expired();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(reader: &str, card: &str) -> RawLine {
        RawLine {
            reader: reader.into(),
            line: card.as_bytes().to_vec(),
            too_long: false,
            at_unix_ms: 1,
        }
    }

    fn queue() -> SwipeQueue {
        SwipeQueue::new(SwipeSettings::default(), CardRules::default())
    }

    fn ids() -> impl FnMut() -> u64 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refused_debounced_and_accepted() {
        let q = queue();
        assert!(matches!(q.offer(&line("r1", "12 34")), Offer::Refused(r) if r.contains("space")));
        assert!(matches!(
            q.offer(&line("r1", "12\u{7}34")),
            Offer::Refused(_)
        ));
        assert!(
            matches!(q.offer(&line("r1", &"9".repeat(65))), Offer::Refused(r) if r.contains("at most 64"))
        );
        let mut long = line("r1", "1");
        long.too_long = true;
        assert!(matches!(q.offer(&long), Offer::Refused(_)));
        assert!(matches!(q.offer(&line("r1", "EMP123")), Offer::Accepted(_)));
        assert_eq!(q.offer(&line("r1", "EMP123")), Offer::Debounced);
        assert!(
            matches!(q.offer(&line("r2", "EMP123")), Offer::Accepted(_)),
            "other reader"
        );
        tokio::time::advance(Duration::from_millis(2_001)).await;
        assert!(
            matches!(q.offer(&line("r1", "EMP123")), Offer::Accepted(_)),
            "after the window"
        );
        assert_eq!(q.stats.refused.load(Ordering::Relaxed), 4);
        assert_eq!(q.stats.debounced.load(Ordering::Relaxed), 1);
        assert_eq!(q.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn sent_acked_and_resent_after_link_loss() {
        let q = queue();
        q.offer(&line("r1", "AAAA1111"));
        q.offer(&line("r1", "BBBB2222"));
        let mut next = ids();
        let sent = q.take_unsent(&mut next);
        assert_eq!(sent.len(), 2);
        assert!(
            q.take_unsent(&mut next).is_empty(),
            "in flight are not sent twice"
        );
        let event_of = |m: &v1::Message| match m {
            v1::Message::Swipe(s) => (s.event_id.clone(), s.ttl_ms),
            m => panic!("{m:?}"),
        };
        let (_, ttl) = event_of(&sent[0]);
        let (second_event, _) = event_of(&sent[1]);
        assert_eq!(ttl, 10_000);
        assert!(q.answered(1, true, v1::NackReason::Unspecified, "queued"));
        assert!(
            !q.answered(99, true, v1::NackReason::Unspecified, ""),
            "not a swipe"
        );
        q.link_lost();
        tokio::time::advance(Duration::from_secs(3)).await;
        let again = q.take_unsent(&mut next);
        assert_eq!(again.len(), 1);
        match &again[0] {
            v1::Message::Swipe(s) => {
                assert_eq!(s.event_id, second_event, "a retry keeps its event id");
                assert_eq!(s.card, "BBBB2222");
                assert_eq!(s.ttl_ms, 7_000, "remaining lifetime");
            }
            m => panic!("{m:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_swipes_are_dropped_and_never_sent() {
        let q = queue();
        q.offer(&line("r1", "CCCC3333"));
        assert!(q.next_deadline().is_some());
        tokio::time::advance(Duration::from_millis(10_001)).await;
        assert!(q.take_unsent(ids()).is_empty());
        assert_eq!(q.stats.expired.load(Ordering::Relaxed), 1);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn busy_is_retried_nack_is_final_and_the_queue_is_bounded() {
        let q = SwipeQueue::new(
            SwipeSettings {
                queue_max: 2,
                debounce_ms: 0,
                ..SwipeSettings::default()
            },
            CardRules::default(),
        );
        q.offer(&line("r1", "D1"));
        q.offer(&line("r1", "D2"));
        assert_eq!(q.offer(&line("r1", "D3")), Offer::QueueFull);
        let mut next = ids();
        assert_eq!(q.take_unsent(&mut next).len(), 2);
        q.answered(1, false, v1::NackReason::Busy, "busy");
        q.answered(2, false, v1::NackReason::InvalidCard, "bad");
        assert_eq!(q.len(), 1);
        assert!(
            q.take_unsent(&mut next).is_empty(),
            "busy waits before retrying"
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(q.take_unsent(&mut next).len(), 1);
    }
}
