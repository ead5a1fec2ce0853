//! Card swipes at the SCM: each SWIPE from an agent is validated again (card rules, ids),
//! de-duplicated by its event id, written to the swipe journal (masked), and handed to the
//! card-reader bridges of its device with a deadline. The journal keeps one row per swipe
//! and records what became of it: queued, delivered (where), expired, failed, no route, or
//! refused (busy, rejected); an agent's retry of a refused swipe updates the same row.
//!
//! De-duplication survives restarts: an event id is committed to the journal as queued
//! before any bridge may write the swipe, and the ids of recent swipes are loaded back at
//! start, so a swipe an agent sends again after an SCM restart is not delivered twice.
//! Only what reached a bridge is de-duplicated: a swipe refused as BUSY never did, so the
//! agent's next copy of it is taken, also after a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use scm_common::card::{CardRules, mask};
use scm_common::lock::LockExt;
use scm_proto::v1::{self, NackReason};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::bridges::generic::{GenericBridge, Outcome, OutcomeReport};
use crate::bridges::rfideas::{self, RfideasBridge};
use crate::bridges::{Bridge, BridgeSwipe, Route, SubmitError, WriteLog};
use crate::coord::dedup::{Dedup, LocalDedup};
use crate::state::{
    JournalOp, JournalOutcome, PendingCard, PendingSwipe, StoreError, SwipeJournal,
    SwipeRecord as Row, now_ms,
};

/// `[swipes]` in the SCM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SwipeSettings {
    /// Lifetime of a swipe whose SWIPE says `ttl_ms = 0`.
    pub default_ttl_ms: u64,
    /// Longest lifetime accepted; longer ones are cut to this.
    pub max_ttl_ms: u64,
    /// How many event ids are remembered for de-duplication.
    pub dedup_max: usize,
    /// Journal writes waiting to be committed.
    pub journal_queue: usize,
    /// Journal rows kept at most (the oldest are deleted first).
    pub journal_max_rows: u64,
    /// Journal rows older than this many days are deleted.
    pub journal_max_age_days: u32,
}

impl Default for SwipeSettings {
    fn default() -> Self {
        Self {
            default_ttl_ms: 10_000,
            max_ttl_ms: 60_000,
            dedup_max: 200_000,
            journal_queue: 10_000,
            journal_max_rows: 1_000_000,
            journal_max_age_days: 90,
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub(crate) struct SwipeStats {
    /// Accepted and handed to a bridge.
    pub queued: AtomicU64,
    /// Accepted with no bridge device for their reader.
    pub no_route: AtomicU64,
    /// Repeats of an event id already seen.
    pub duplicate: AtomicU64,
    /// Refused (invalid card or ids).
    pub rejected: AtomicU64,
    /// Refused because a device's queue (or a 241 device's swipes in flight) was full.
    pub busy: AtomicU64,
    /// Journal records lost because the journal queue was full or the database failed.
    pub journal_lost: AtomicU64,
    /// Expired before they were handled: the frame waited longer than its time to live.
    pub expired_unread: AtomicU64,
}

pub(crate) use crate::link::SwipeVerdict as Verdict;

/// Swipe handling shared by every agent link.
pub(crate) struct Swipes {
    settings: SwipeSettings,
    rules: CardRules,
    /// Recent event ids, for de-duplication.
    seen: Arc<dyn Dedup>,
    journal: mpsc::Sender<JournalOp>,
    /// The journal's store: the writer thread's, and the low-rate fast path's.
    journal_store: Arc<dyn SwipeJournal>,
    /// When the fast path last committed (tokio time).
    last_inline: Mutex<Option<tokio::time::Instant>>,
    bridge: Arc<GenericBridge>,
    /// The bridges a swipe is routed over, in the order their names appear in details.
    routes: [Arc<dyn Bridge>; 2],
    /// Where every answered swipe is published (masked).
    events: crate::coord::events::Events,
    rfideas: Arc<RfideasBridge>,
    /// Counters.
    pub stats: Arc<SwipeStats>,
}

impl std::fmt::Debug for Swipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swipes")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Swipes {
    /// Opens the journal (its own handle on the SCM's store), loads recent
    /// event ids, and starts the journal writer and the bridge-outcome consumer.
    /// Every answered swipe is published on `events` (card masked).
    // Each argument is one independent piece of the start-up wiring (two bridges with
    // their outcome channels, the event bus); a struct would only rename the list.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        store: &crate::state::Store,
        settings: SwipeSettings,
        rules: CardRules,
        bridge: Arc<GenericBridge>,
        outcomes: mpsc::Receiver<OutcomeReport>,
        rfideas: Arc<RfideasBridge>,
        rf_outcomes: mpsc::Receiver<rfideas::OutcomeReport>,
        events: crate::coord::events::Events,
    ) -> Result<Arc<Swipes>, StoreError> {
        let conn = store.journal().clone();
        let now = now_ms();
        let horizon = now - settings.max_ttl_ms as i64 - 60_000;
        let seen = LocalDedup::new(settings.dedup_max);
        {
            let recent = conn.recent_event_ids(settings.dedup_max, horizon)?;
            for (id, at) in recent {
                seen.insert(&id, at + settings.max_ttl_ms as i64 + 60_000, now);
            }
        }
        tracing::info!(
            "swipe journal: {} recent event ids loaded for de-duplication",
            seen.remembered()
        );
        let (tx, rx) = mpsc::channel(settings.journal_queue.max(16));
        let swipes = Arc::new(Swipes {
            settings,
            rules,
            seen: Arc::new(seen),
            journal: tx,
            journal_store: conn.clone(),
            last_inline: Mutex::new(None),
            routes: [bridge.clone(), Arc::new(rfideas.clone())],
            bridge,
            events,
            rfideas,
            stats: Arc::new(SwipeStats::default()),
        });
        // Neither task keeps `Swipes` alive: when the SCM drops it, the journal channel
        // closes and the writer finishes its last batch and ends.
        let stats = swipes.stats.clone();
        let checkpoint_conn = conn.clone();
        let retention = Retention::of(&swipes.settings);
        swipes.requeue_pending(conn.as_ref(), horizon)?;
        swipes.bridge.set_write_log(Arc::new(JournalWriteLog {
            journal: swipes.journal.clone(),
            stats: swipes.stats.clone(),
        }));
        tokio::task::spawn_blocking(move || journal_writer(conn, rx, stats));
        tokio::spawn(checkpointer(
            checkpoint_conn,
            retention,
            Arc::downgrade(&swipes),
        ));
        let weak = Arc::downgrade(&swipes);
        tokio::spawn(consume_outcomes(weak, outcomes));
        tokio::spawn(consume_rf_outcomes(Arc::downgrade(&swipes), rf_outcomes));
        Ok(swipes)
    }

    /// The bridge.
    pub(crate) fn bridge(&self) -> &Arc<GenericBridge> {
        &self.bridge
    }

    /// The RFIDeas 241 bridge.
    pub(crate) fn rfideas(&self) -> &Arc<RfideasBridge> {
        &self.rfideas
    }

    fn rf_outcome(&self, r: rfideas::OutcomeReport) {
        let (outcome, detail) = match r.outcome {
            rfideas::Outcome::Delivered {
                server,
                status,
                attempts,
            } => (
                JournalOutcome::Delivered,
                format!(
                    "rfideas {} to {server} (HTTP {status}, attempt {attempts})",
                    r.key
                ),
            ),
            rfideas::Outcome::Expired {
                attempts,
                last_error,
            } => (
                JournalOutcome::Expired,
                format!(
                    "no print server took it in time on rfideas {} ({attempts} attempts; last error: {last_error})",
                    r.key
                ),
            ),
            rfideas::Outcome::Failed { reason } => (
                JournalOutcome::Failed,
                format!("rfideas {}: {reason}", r.key),
            ),
        };
        self.journal(JournalOp::Outcome {
            event_id: r.event_id,
            outcome,
            detail,
        });
    }

    /// The low-rate fast path: commits `row` on the calling task, unless the journal is
    /// busy (records queued, the writer or a store operation at work, SQLite locked) or
    /// swipes are coming fast (another commit here within [`INLINE_GAP`]: then the writer
    /// thread's batches cost less per swipe). Gives the row back when it did not commit.
    ///
    /// It blocks the task's thread for one SQLite commit without fsync (tens of
    /// microseconds), and never waits for a lock.
    fn commit_now(&self, row: Row) -> Option<Row> {
        let now = tokio::time::Instant::now();
        {
            let mut last = self.last_inline.lock_unpoisoned();
            if last.is_some_and(|t| now.duration_since(t) < INLINE_GAP) {
                *last = Some(now);
                return Some(row);
            }
            *last = Some(now);
        }
        if self.journal.capacity() < self.journal.max_capacity() || self.journal_store.store_busy()
        {
            return Some(row);
        }
        match self.journal_store.commit_now(row) {
            Ok(back) => back,
            Err(e) => {
                self.stats.journal_lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!("swipe journal: cannot write 1 record: {e}; forwarding anyway");
                None
            }
        }
    }

    fn journal(&self, op: JournalOp) {
        if self.journal.try_send(op).is_err() {
            self.stats.journal_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("swipe journal queue full; a journal record was lost");
        }
    }

    fn outcome(&self, r: OutcomeReport) {
        let (outcome, detail) = match r.outcome {
            Outcome::Delivered { peer } => (
                JournalOutcome::Delivered,
                format!("generic {} to {peer}", r.key),
            ),
            Outcome::Expired => (
                JournalOutcome::Expired,
                format!("no print server took it in time on generic {}", r.key),
            ),
        };
        self.journal(JournalOp::Outcome {
            event_id: r.event_id,
            outcome,
            detail,
        });
    }

    /// Handles one SWIPE from machine `machine` (the id already checked against the
    /// certificate), and publishes the answer on the event bus (card masked).
    /// The verdict on swipe `s` from `machine`, which waited `waited` before it was
    /// handled (unread in a socket, or the SCM stopped: `link::clock`); that time counts
    /// against its time to live.
    pub(crate) async fn receive(&self, machine: u16, s: &v1::Swipe, waited: Duration) -> Verdict {
        let verdict = self.answer(machine, s, waited).await;
        self.events
            .swipe(machine, &s.reader_id, mask(&s.card), &verdict);
        verdict
    }

    async fn answer(&self, machine: u16, s: &v1::Swipe, waited: Duration) -> Verdict {
        let received_at = tokio::time::Instant::now();
        let masked = mask(&s.card);
        let row = |outcome, detail: String| Row {
            event_id: s.event_id.chars().take(64).collect(),
            machine,
            reader: s.reader_id.chars().take(32).collect(),
            card_masked: masked.clone(),
            swiped_at_ms: s.swiped_at_unix_ms as i64,
            outcome,
            detail,
            deadline_ms: None,
            card: None,
        };
        if !valid_id(&s.event_id, 64) || !valid_id(&s.reader_id, 32) {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Verdict::Nack(
                NackReason::Malformed,
                "event_id (1-64) and reader_id (1-32) must be letters, digits, '.', '_' or '-'"
                    .into(),
            );
        }
        if let Err(e) = self.rules.validate(&s.card) {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(machine, reader = %s.reader_id, card = %masked, "swipe refused: {e}");
            self.journal(JournalOp::Insert(
                row(JournalOutcome::Rejected, e.to_string()),
                None,
            ));
            return Verdict::Nack(NackReason::InvalidCard, e.to_string());
        }
        let ttl = match s.ttl_ms {
            0 => self.settings.default_ttl_ms,
            t => u64::from(t).min(self.settings.max_ttl_ms),
        };
        let waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        if waited_ms >= ttl {
            // Its lifetime ran out while the frame waited: a swipe is never forwarded
            // later than its TTL after it was sent. Not de-duplicated: nothing was sent.
            self.stats.expired_unread.fetch_add(1, Ordering::Relaxed);
            let text = format!(
                "expired: the frame waited {waited_ms} ms before the SCM could read it, longer than its remaining {ttl} ms"
            );
            tracing::warn!(machine, reader = %s.reader_id, card = %masked, event = %s.event_id, "swipe not forwarded: {text}");
            self.journal(JournalOp::Insert(
                row(JournalOutcome::Expired, text.clone()),
                None,
            ));
            return Verdict::Nack(NackReason::Expired, text);
        }
        let ttl = ttl - waited_ms;
        let now = now_ms();
        let fresh = self.seen.insert(
            &s.event_id,
            now + self.settings.max_ttl_ms as i64 + 60_000,
            now,
        );
        if !fresh {
            self.stats.duplicate.fetch_add(1, Ordering::Relaxed);
            tracing::info!(machine, reader = %s.reader_id, card = %masked, event = %s.event_id, "duplicate swipe; not forwarded again");
            return Verdict::Ack("duplicate; already received".into());
        }
        let expires_at = tokio::time::Instant::now() + Duration::from_millis(ttl);
        // Ready bridges take the swipe; a device that cannot deliver yet (a 241 device no
        // print server has configured) only when nothing is ready, and then records why
        // it failed. At most two bridges: no allocation for the choice.
        let routes = self
            .routes
            .each_ref()
            .map(|b| b.route(machine, &s.reader_id));
        let wanted = if routes.contains(&Route::Ready) {
            Route::Ready
        } else {
            Route::NotConfigured
        };
        let chosen = routes.map(|r| r == wanted);
        let routed = chosen.contains(&true);
        // Queued on every bridge it is routed to, or refused as BUSY (the agent sends it
        // again): never taken by one bridge while another one dropped it. Asked before
        // the journal says queued: a refused swipe must not be de-duplicated.
        for (b, _) in self.routes.iter().zip(chosen).filter(|(_, c)| *c) {
            if let Err(e) = b.admit(machine, &s.reader_id) {
                let detail = format!(
                    "{} {machine}/{}: {e}; the agent sends it again",
                    b.name(),
                    s.reader_id
                );
                return self.refuse_busy(&s.event_id, row(JournalOutcome::Busy, detail));
            }
        }
        let (outcome, detail) = if routed {
            let mut to = String::new();
            for (b, _) in self.routes.iter().zip(chosen).filter(|(_, c)| *c) {
                if !to.is_empty() {
                    to.push_str(" and ");
                }
                to.push_str(&format!("{} {machine}/{}", b.name(), s.reader_id));
            }
            (JournalOutcome::Queued, format!("queued for {to}"))
        } else {
            (
                JournalOutcome::NoRoute,
                format!(
                    "no bridge device for {machine}/{}; recorded only",
                    s.reader_id
                ),
            )
        };
        // Commit the event id before forwarding, so a restart cannot forward it twice.
        // At a low rate the link commits it itself (no hand-off to the writer thread);
        // otherwise the writer thread commits it with the other swipes of the moment.
        let mut record = row(outcome, detail.clone());
        if outcome == JournalOutcome::Queued {
            // What a restart needs to queue it again until its deadline.
            record.deadline_ms = Some(now + ttl as i64);
            record.card = Some(PendingCard(s.card.clone()));
        }
        if let Some(record) = self.commit_now(record) {
            let (done_tx, done_rx) = oneshot::channel();
            if self
                .journal
                .try_send(JournalOp::Insert(record, Some(done_tx)))
                .is_err()
            {
                // Not journaled as queued: nothing to undo.
                self.seen.remove(&s.event_id);
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                return Verdict::Nack(NackReason::Busy, "swipe journal busy; try again".into());
            }
            if done_rx.await.is_err() {
                self.stats.journal_lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!("swipe journal write failed; forwarding anyway");
            }
        }
        if !routed {
            self.stats.no_route.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(machine, reader = %s.reader_id, card = %masked, "{detail}");
            return Verdict::Ack(detail);
        }
        let swipe = BridgeSwipe {
            event_id: s.event_id.clone(),
            card: s.card.clone(),
            expires_at,
            received_at,
        };
        // With both bridges, one taking the swipe is enough; if none does, the first
        // bridge's refusal is the answer.
        let mut taken = false;
        let mut refusal = None;
        let mut swipe = Some(swipe);
        let last = chosen.iter().rposition(|c| *c);
        let several = chosen.iter().filter(|c| **c).count() > 1;
        for (i, b) in self.routes.iter().enumerate().filter(|(i, _)| chosen[*i]) {
            let one = if Some(i) == last {
                swipe.take()
            } else {
                swipe.clone()
            };
            let Some(one) = one else { break };
            match b.submit(machine, &s.reader_id, one) {
                Ok(()) => taken = true,
                Err(e) => {
                    if several {
                        tracing::warn!(machine, reader = %s.reader_id, event = %s.event_id, "{} bridge did not take the swipe: {e}", b.name());
                    }
                    refusal.get_or_insert(e);
                }
            }
        }
        let result = match (taken, refusal) {
            (true, _) | (false, None) => Ok(()),
            (false, Some(e)) => Err(e),
        };
        match result {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                tracing::info!(machine, reader = %s.reader_id, card = %masked, event = %s.event_id, ttl_ms = ttl, "swipe accepted");
                Verdict::Ack(detail)
            }
            Err(e @ SubmitError::QueueFull { .. }) => {
                // Another link filled the device since `admit`. The row says queued
                // already: it must say busy before the agent hears BUSY, or a restart in
                // between would take the agent's next copy for a duplicate. (Rare: not
                // the happy path's cost.)
                let op = JournalOp::Outcome {
                    event_id: s.event_id.clone(),
                    outcome: JournalOutcome::Busy,
                    detail: e.to_string(),
                };
                let store = self.journal_store.clone();
                let done = tokio::task::spawn_blocking(move || store.write_batch(&[op])).await;
                if !matches!(done, Ok(Ok(()))) {
                    self.stats.journal_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(event = %s.event_id, "swipe journal: cannot record a BUSY refusal");
                }
                self.seen.remove(&s.event_id);
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                Verdict::Nack(NackReason::Busy, e.to_string())
            }
            Err(e) => {
                self.stats.no_route.fetch_add(1, Ordering::Relaxed);
                Verdict::Ack(format!("{e}; recorded only"))
            }
        }
    }
}

/// The Generic bridge's [`WriteLog`]: `writing` marks go to the journal's writer thread,
/// batched with the rest (a commit without fsync, no extra transaction per swipe).
struct JournalWriteLog {
    journal: mpsc::Sender<JournalOp>,
    stats: Arc<SwipeStats>,
}

impl WriteLog for JournalWriteLog {
    fn writing(&self, event_ids: Vec<String>) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        let n = event_ids.len();
        if self
            .journal
            .try_send(JournalOp::Writing(event_ids, Some(tx)))
            .is_err()
        {
            self.stats
                .journal_lost
                .fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(
                "swipe journal queue full; {n} swipes written without their writing mark"
            );
            return None;
        }
        Some(rx)
    }
}

impl Swipes {
    /// Start-up: the journal's `queued` and `writing` rows since `horizon`. A queued
    /// swipe whose deadline has not passed goes back to its Generic device's queue (its
    /// event id is already de-duplicated); one whose deadline passed is `expired`. A
    /// `writing` one may have reached the print server: `uncertain`, never written again;
    /// so is a queued one that the 241 bridge had (it may have sent it). Blocks for one
    /// journal transaction.
    fn requeue_pending(&self, conn: &dyn SwipeJournal, horizon: i64) -> Result<(), StoreError> {
        let pending = conn.pending_swipes(horizon)?;
        if pending.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let (mut again, mut expired, mut uncertain) = (0u64, 0u64, 0u64);
        let mut ops = Vec::new();
        let mut end = |p: &PendingSwipe, outcome, detail: String| {
            match outcome {
                JournalOutcome::Expired => expired += 1,
                _ => uncertain += 1,
            }
            tracing::info!(machine = p.machine, reader = %p.reader, card = %p.card_masked, event = %p.event_id, "after the restart: {detail}");
            ops.push(JournalOp::Outcome {
                event_id: p.event_id.clone(),
                outcome,
                detail,
            });
        };
        for p in &pending {
            let generic = self.bridge.has_device(p.machine, &p.reader);
            // The bridges it was queued for, as the row says ("queued for generic 1/r1 and
            // rfideas 1/r1"): the 241 bridge may have sent it already.
            let rfideas = p.detail.contains("rfideas ");
            if p.outcome == JournalOutcome::Writing {
                end(
                    p,
                    JournalOutcome::Uncertain,
                    "the SCM stopped while writing it to the print server; never written again"
                        .into(),
                );
                continue;
            }
            match (p.deadline_ms, &p.card) {
                (Some(d), _) if d <= now => end(
                    p,
                    JournalOutcome::Expired,
                    "its deadline passed while the SCM was stopped".into(),
                ),
                _ if rfideas => end(
                    p,
                    JournalOutcome::Uncertain,
                    "the SCM stopped while the rfideas bridge had it (it may have been sent); never sent again".into(),
                ),
                (Some(d), Some(card)) if generic => {
                    let left = Duration::from_millis((d - now) as u64);
                    let at = tokio::time::Instant::now();
                    let swipe = BridgeSwipe {
                        event_id: p.event_id.clone(),
                        card: card.0.clone(),
                        expires_at: at + left,
                        received_at: at,
                    };
                    match self.bridge.submit(p.machine, &p.reader, swipe) {
                        Ok(()) => {
                            again += 1;
                            tracing::info!(machine = p.machine, reader = %p.reader, card = %p.card_masked, event = %p.event_id, "queued again after the restart ({} ms left)", left.as_millis());
                        }
                        Err(e) => end(
                            p,
                            JournalOutcome::Expired,
                            format!("not queued again after the restart: {e}"),
                        ),
                    }
                }
                _ => end(
                    p,
                    JournalOutcome::Expired,
                    "not queued again after the restart (no device, deadline or card)".into(),
                ),
            }
        }
        conn.write_batch(&ops)?;
        tracing::info!(
            "swipe journal: {again} queued swipes queued again after the restart, {expired} expired, {uncertain} uncertain (never sent again)"
        );
        Ok(())
    }

    /// Refuses a swipe as BUSY: forgets its event id (the agent's next copy is taken) and
    /// journals `record` (one row per swipe: the next refusal updates it).
    fn refuse_busy(&self, event_id: &str, record: Row) -> Verdict {
        self.seen.remove(event_id);
        self.stats.busy.fetch_add(1, Ordering::Relaxed);
        let detail = record.detail.clone();
        self.journal(JournalOp::Insert(record, None));
        Verdict::Nack(NackReason::Busy, detail)
    }
}

async fn consume_rf_outcomes(
    swipes: std::sync::Weak<Swipes>,
    mut rx: mpsc::Receiver<rfideas::OutcomeReport>,
) {
    while let Some(r) = rx.recv().await {
        let Some(s) = swipes.upgrade() else {
            return;
        };
        s.rf_outcome(r);
    }
}

async fn consume_outcomes(swipes: std::sync::Weak<Swipes>, mut rx: mpsc::Receiver<OutcomeReport>) {
    while let Some(r) = rx.recv().await {
        let Some(s) = swipes.upgrade() else {
            return;
        };
        s.outcome(r);
    }
}

/// How often the journal's write-ahead log is checkpointed (and truncated once it has
/// grown past its bound).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How often old journal rows are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Rows deleted per retention transaction: short ones, so that the journal's writer
/// never waits long behind them.
const PRUNE_CHUNK: u32 = 10_000;

/// The journal's retention bounds.
#[derive(Debug, Clone, Copy)]
struct Retention {
    max_rows: u64,
    max_age_ms: i64,
}

impl Retention {
    fn of(s: &SwipeSettings) -> Retention {
        Retention {
            max_rows: s.journal_max_rows,
            max_age_ms: i64::from(s.journal_max_age_days) * 86_400_000,
        }
    }
}

/// Checkpoints the database's write-ahead log every [`CHECKPOINT_EVERY`] on its own
/// connection, off the swipe path (a PASSIVE checkpoint does not block the writers; the
/// occasional TRUNCATE one that bounds the file waits for them at most briefly), and
/// deletes journal rows beyond the retention bounds every [`PRUNE_EVERY`], starting at
/// once. Ends when the SCM drops its `Swipes`.
async fn checkpointer(
    conn: Arc<dyn SwipeJournal>,
    retention: Retention,
    swipes: std::sync::Weak<Swipes>,
) {
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            last_prune = Some(tokio::time::Instant::now());
            prune(conn.as_ref(), retention).await;
        }
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        if swipes.strong_count() == 0 {
            return;
        }
        if let Err(e) = conn.checkpoint().await {
            tracing::warn!(
                "swipe journal: checkpoint failed (retried in {CHECKPOINT_EVERY:?}): {e}"
            );
        }
    }
}

/// Deletes the journal rows beyond the retention bounds, a chunk per transaction.
async fn prune(conn: &dyn SwipeJournal, r: Retention) {
    let before = now_ms().saturating_sub(r.max_age_ms);
    let mut total = 0;
    loop {
        match conn.prune(r.max_rows, before, PRUNE_CHUNK).await {
            Ok(n) => {
                total += n;
                if n < u64::from(PRUNE_CHUNK) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!("swipe journal: retention failed (retried in {PRUNE_EVERY:?}): {e}");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            "swipe journal: {total} rows past retention deleted (keeping at most {} rows, {} days)",
            r.max_rows,
            r.max_age_ms / 86_400_000
        );
    }
}

/// Longest a journal batch waits for the store's operations (see
/// [`SwipeJournal::yield_to_store`]).
const YIELD_TO_STORE_MAX: Duration = Duration::from_secs(1);

/// Swipes closer together than this go to the writer thread, whose batches commit many
/// swipes at once (see [`Swipes::commit_now`]).
const INLINE_GAP: Duration = Duration::from_micros(500);

fn journal_writer(
    conn: Arc<dyn SwipeJournal>,
    mut rx: mpsc::Receiver<JournalOp>,
    stats: Arc<SwipeStats>,
) {
    while let Some(first) = rx.blocking_recv() {
        // Operators' pushes and machine state go first: between two batches the database
        // is free for them (the journal can wait; its queue is bounded).
        conn.yield_to_store(YIELD_TO_STORE_MAX);
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = conn.write_batch(&batch);
        if let Err(e) = result {
            stats
                .journal_lost
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::error!("swipe journal: cannot write {} records: {e}", batch.len());
        }
        for op in batch {
            if let JournalOp::Insert(_, Some(done)) | JournalOp::Writing(_, Some(done)) = op {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("r1", 32));
        assert!(valid_id("0f3a-b_c.d", 64));
        assert!(!valid_id("", 32));
        assert!(!valid_id("r 1", 32));
        assert!(!valid_id(&"x".repeat(33), 32));
    }
}

/// Runs a store call to completion on a runtime of its own, from synchronous tests (and
/// from paused-clock tests without letting their clock advance).
#[cfg(test)]
fn block_on<T: Send>(f: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(f)
        })
        .join()
        .unwrap()
    })
}

#[cfg(test)]
mod journal_tests {
    use super::*;

    /// Journals a swipe and then the given outcomes; returns (outcome, detail).
    fn journal(outcomes: &[(&'static str, &str)]) -> (String, String) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("scm.db");
        let store = crate::state::Store::open(&path).unwrap();
        let conn = store.journal().clone();
        let (tx, rx) = mpsc::channel(16);
        let stats = Arc::new(SwipeStats::default());
        let writer = std::thread::spawn(move || journal_writer(conn, rx, stats));
        let row = Row {
            event_id: "e1".into(),
            machine: 1,
            reader: "r1".into(),
            card_masked: "****1234".into(),
            swiped_at_ms: 0,
            outcome: JournalOutcome::Queued,
            detail: "queued for generic 1/r1 and rfideas 1/r1".into(),
            deadline_ms: None,
            card: None,
        };
        tx.blocking_send(JournalOp::Insert(row, None)).unwrap();
        for (o, detail) in outcomes {
            tx.blocking_send(JournalOp::Outcome {
                event_id: "e1".into(),
                outcome: JournalOutcome::parse(o).unwrap(),
                detail: detail.to_string(),
            })
            .unwrap();
        }
        drop(tx);
        writer.join().unwrap();
        let rows = block_on(store.journal().list(10)).unwrap();
        assert_eq!(rows.len(), 1);
        (rows[0].outcome.as_str().into(), rows[0].detail.clone())
    }

    #[test]
    fn one_bridge_replaces_queued() {
        assert_eq!(journal(&[("expired", "g")]), ("expired".into(), "g".into()));
    }

    #[test]
    fn with_two_bridges_delivered_wins_then_failed() {
        for order in [
            [("delivered", "rf"), ("expired", "g")],
            [("expired", "g"), ("delivered", "rf")],
        ] {
            let (o, d) = journal(&order);
            assert_eq!(o, "delivered");
            assert_eq!(d, format!("{}; {}", order[0].1, order[1].1));
        }
        assert_eq!(journal(&[("failed", "rf"), ("expired", "g")]).0, "failed");
        assert_eq!(journal(&[("expired", "g"), ("failed", "rf")]).0, "failed");
        assert_eq!(
            journal(&[("failed", "rf"), ("delivered", "g")]).0,
            "delivered"
        );
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    fn swipes(dir: &std::path::Path) -> (crate::state::Store, Arc<Swipes>) {
        let store = crate::state::Store::open(&dir.join("scm.db")).unwrap();
        let (otx, orx) = mpsc::channel(16);
        let bridge = GenericBridge::new(Vec::new(), Default::default(), otx);
        let (rtx, rrx) = mpsc::channel(16);
        let rf = RfideasBridge::new(
            Vec::new(),
            Default::default(),
            &dir.join("no-ca.pem"),
            store.devices().clone(),
            rtx,
        )
        .unwrap();
        let s = Swipes::start(
            &store,
            SwipeSettings::default(),
            CardRules::default(),
            bridge,
            orx,
            rf,
            rrx,
            crate::coord::events::Events::new(16),
        )
        .unwrap();
        (store, s)
    }

    fn row(id: &str) -> Row {
        Row {
            event_id: id.into(),
            machine: 1,
            reader: "r1".into(),
            card_masked: "****1234".into(),
            swiped_at_ms: 0,
            outcome: JournalOutcome::NoRoute,
            detail: String::new(),
            deadline_ms: None,
            card: None,
        }
    }

    fn journaled(store: &crate::state::Store, id: &str) -> bool {
        block_on(store.journal().list(u32::MAX))
            .unwrap()
            .iter()
            .filter(|r| r.event_id == id)
            .count()
            == 1
    }

    #[tokio::test(start_paused = true)]
    async fn commits_alone_when_idle_and_leaves_bursts_and_locks_to_the_writer() {
        let d = tempfile::tempdir().unwrap();
        let (store, s) = swipes(d.path());
        // Idle: committed here, at once.
        assert!(s.commit_now(row("a")).is_none());
        assert!(journaled(&store, "a"));
        // The next one right after: a burst, left to the writer thread's batches.
        let back = s.commit_now(row("b")).expect("within the gap: given back");
        assert_eq!(back.event_id, "b");
        assert!(!journaled(&store, "b"));
        // After a pause, but with SQLite's write lock held elsewhere: given back at
        // once instead of waiting for the lock.
        tokio::time::advance(INLINE_GAP * 2).await;
        let path = d.path().join("scm.db");
        let other = crate::state::sqlite::LockHolder::take(&path);
        let started = std::time::Instant::now();
        assert!(s.commit_now(row("c")).is_some(), "locked elsewhere");
        assert!(started.elapsed() < Duration::from_secs(1), "did not wait");
        drop(other);
        tokio::time::advance(INLINE_GAP * 2).await;
        assert!(s.commit_now(row("c")).is_none());
        assert!(journaled(&store, "c"));
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;
    use crate::bridges::generic::GenericDevice;
    use crate::state::JournalOutcome::*;

    fn queued(id: &str, detail: &str, deadline_ms: Option<i64>) -> JournalOp {
        JournalOp::Insert(
            Row {
                event_id: id.into(),
                machine: 1,
                reader: "r1".into(),
                card_masked: "****1234".into(),
                swiped_at_ms: 0,
                outcome: Queued,
                detail: detail.into(),
                deadline_ms,
                card: deadline_ms.map(|_| PendingCard(format!("CARD{id}"))),
            },
            None,
        )
    }

    #[tokio::test]
    async fn start_up_requeues_live_queued_swipes_and_ends_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let store = crate::state::Store::open(&d.path().join("scm.db")).unwrap();
        let now = now_ms();
        let g = "queued for generic 1/r1";
        store
            .journal()
            .write_batch(&[
                queued("live", g, Some(now + 30_000)),
                queued("gone", g, Some(now - 1)),
                queued("wrote", g, Some(now + 30_000)),
                JournalOp::Writing(vec!["wrote".into()], None),
                queued(
                    "rf",
                    "queued for generic 1/r1 and rfideas 1/r1",
                    Some(now + 30_000),
                ),
                // Written before migration 0006: no deadline, no card.
                queued("old", g, None),
            ])
            .unwrap();
        let (otx, orx) = mpsc::channel(16);
        let device = GenericDevice {
            machine: 1,
            reader: "r1".into(),
            listen: "127.0.0.1:0".into(),
            allow: vec!["127.0.0.1".parse().unwrap()],
            version_reply: String::new(),
        };
        let bridge = GenericBridge::new(vec![device], Default::default(), otx);
        let (rtx, rrx) = mpsc::channel(16);
        let rf = RfideasBridge::new(
            Vec::new(),
            Default::default(),
            &d.path().join("no-ca.pem"),
            store.devices().clone(),
            rtx,
        )
        .unwrap();
        let s = Swipes::start(
            &store,
            SwipeSettings::default(),
            CardRules::default(),
            bridge,
            orx,
            rf,
            rrx,
            crate::coord::events::Events::new(16),
        )
        .unwrap();
        // Only the live one is in the device's queue again.
        assert_eq!(s.bridge().status(Some(1))[0].queued, 1);
        let rows = store.journal().list(10).await.unwrap();
        let mut got: Vec<(&str, JournalOutcome)> = rows
            .iter()
            .map(|r| (r.event_id.as_str(), r.outcome))
            .collect();
        got.sort_by_key(|(id, _)| *id);
        assert_eq!(
            got,
            vec![
                ("gone", Expired),
                ("live", Queued),
                ("old", Expired),
                ("rf", Uncertain),
                ("wrote", Uncertain),
            ]
        );
        // Their event ids stay de-duplicated: the agent's copy is not taken again.
        assert!(!s.seen.insert("live", now + 60_000, now));
        assert!(!s.seen.insert("wrote", now + 60_000, now));
    }
}
