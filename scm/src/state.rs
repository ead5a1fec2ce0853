//! The SCM's durable state, behind domain interfaces: the fleet (machines, every
//! configuration generation per machine, every push attempt and its outcome), the operator
//! audit log, the swipe journal, the RFIDeas 241 devices' stored settings, and a health
//! probe.
//!
//! Callers hold a [`Store`] (or only the handle they need, such as an
//! `Arc<dyn DeviceSettings>`) and never see the database: the traits say what each call
//! does, and a write's durability is an argument ([`Durability`]), not a side channel.
//! SQLite ([`sqlite`], WAL mode, schema in numbered migrations) is one implementation; the
//! conformance suite (`conformance`, tests only) is written so that another backend runs
//! the same behaviour tests.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod sqlite;

/// What kind of failure a store operation met, whatever the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// Another connection or process holds the lock (it may work a moment later).
    Busy,
    /// The database cannot be written (file permissions, read-only medium).
    ReadOnly,
    /// The disk is full.
    DiskFull,
    /// The operating system failed a read or write.
    Io,
    /// The database file is damaged or is not a database.
    Corrupt,
    /// A constraint (key, foreign key, NOT NULL) refused the write.
    Constraint,
    /// Anything else.
    Other,
}

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error.
    #[error("database {path}: {detail}")]
    Db {
        /// What kind of failure, classified by the backend's error code.
        kind: StoreErrorKind,
        /// The database (file, or server and name).
        path: PathBuf,
        /// The backend's message.
        detail: String,
    },
    /// The blocking task was cancelled or panicked.
    #[error("database task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// The kind of failure ([`StoreErrorKind::Other`] for a failed task).
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::Db { kind, .. } => *kind,
            Self::Task(_) => StoreErrorKind::Other,
        }
    }

    /// A short explanation for operators, with what to do.
    pub fn operator_hint(&self) -> String {
        let text = self.to_string();
        match self.kind() {
            StoreErrorKind::Busy => {
                format!("{text}; another process holds the database, try again")
            }
            StoreErrorKind::ReadOnly => {
                format!("{text}; the database file is read-only, fix its permissions")
            }
            _ => text,
        }
    }
}

/// When a write must be on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Durable when the call returns.
    Synced,
    /// Atomic and visible when the call returns, but durable only after the caller's
    /// next [`FleetState::sync`] (a fleet push: one disk sync for all its machines
    /// instead of one each).
    Deferred,
}

/// One machine as the SCM knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MachineRow {
    /// Machine id.
    pub id: u16,
    /// Human name.
    pub name: String,
    /// Protocol version.
    pub protocol_version: u8,
    /// Peer address of the last HELLO.
    pub last_peer: Option<String>,
    /// Unix ms of the last HELLO.
    pub last_hello_ms: Option<i64>,
    /// Generation the operators want on the machine (0: none yet).
    pub desired_generation: u64,
    /// Generation the machine last acknowledged (0: none).
    pub applied_generation: u64,
    /// Last error (NACK reason or delivery failure), if the last attempt failed.
    pub last_error: Option<String>,
}

/// One stored configuration generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Generation {
    /// Machine id.
    pub machine_id: u16,
    /// Generation number, from 1, per machine.
    pub generation: u64,
    /// Content.
    pub content: Vec<u8>,
    /// SHA-256 of the content, hex.
    pub sha256: String,
}

/// Outcome of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The machine stored it.
    Ack,
    /// The machine refused it; final for that generation.
    Nack,
    /// The machine could not be reached; stays pending.
    Unreachable,
    /// Not sent: a newer generation was created for the machine before this one's turn
    /// came (the newer one is delivered instead).
    Superseded,
}

impl Outcome {
    /// The stored text.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Nack => "nack",
            Self::Unreachable => "unreachable",
            Self::Superseded => "superseded",
        }
    }
}

/// One generation in a machine's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HistoryRow {
    /// Generation number.
    pub generation: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Size in bytes.
    pub len: usize,
    /// Unix ms created.
    pub created_ms: i64,
    /// Operator who created it.
    pub created_by: String,
    /// Outcome of its last delivery attempt, if any.
    pub last_outcome: Option<String>,
}

/// One delivery attempt as listed: `(generation, unix ms, outcome, detail)`.
pub(crate) type AttemptRow = (u64, i64, String, String);

/// SHA-256 and attempt count of a machine's desired generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DesiredRow {
    /// Hex SHA-256 of the desired generation's content, if there is one.
    pub sha256: Option<String>,
    /// Delivery attempts recorded for it.
    pub attempts: u32,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuditRow {
    /// Unix ms.
    pub at_ms: i64,
    /// Who (operator name, or `-` before login).
    pub actor: String,
    /// From where (peer address).
    pub source: String,
    /// What (`login`, `login_failed`, `push`, ...).
    pub action: String,
    /// Details.
    pub detail: String,
}

/// A swipe's state in the journal (stored as [`JournalOutcome::as_str`]), one row per
/// swipe (per event id). A swipe the SCM receives gets its row when the bridges have
/// answered: [`Queued`](Self::Queued) (committed before any bridge may write it),
/// [`NoRoute`](Self::NoRoute), or refused ([`Busy`](Self::Busy),
/// [`Rejected`](Self::Rejected)). The Generic bridge marks a queued swipe
/// [`Writing`](Self::Writing) (committed) before its bytes go to the socket. A swipe ends
/// [`Delivered`](Self::Delivered), [`Expired`](Self::Expired), [`Failed`](Self::Failed) or,
/// after a restart that found it writing, [`Uncertain`](Self::Uncertain). An agent's retry
/// of a refused swipe updates the same row (see docs/swipes.md, "Life cycle in the
/// journal").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum JournalOutcome {
    /// Handed to a bridge; no final outcome yet, not written yet. Survives a restart: a
    /// queued swipe whose deadline has not passed is queued again at start-up.
    Queued,
    /// About to be written to a print server's socket (committed before the write): a
    /// swipe the SCM died writing is never written again.
    Writing,
    /// The SCM stopped while writing it (or while the 241 bridge was sending it): it may
    /// have reached the print server, so it is never sent again. Final.
    Uncertain,
    /// No bridge device for its reader; recorded only.
    NoRoute,
    /// Refused (invalid card).
    Rejected,
    /// A print server took it.
    Delivered,
    /// No print server took it in time.
    Expired,
    /// The 241 bridge gave up on it.
    Failed,
    /// Refused because a device's queue was full; the agent sends it again.
    Busy,
}

impl JournalOutcome {
    /// Whether a swipe in this state was refused, so that nothing of it reached a
    /// bridge: its event id is not de-duplicated, and the agent's next copy is taken
    /// (and updates the same row). Every other state may have been written to a print
    /// server, so its event id is remembered, across restarts too.
    pub(crate) fn refused(self) -> bool {
        matches!(self, Self::Busy | Self::Rejected)
    }

    /// The stored text.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Writing => "writing",
            Self::Uncertain => "uncertain",
            Self::NoRoute => "no_route",
            Self::Rejected => "rejected",
            Self::Delivered => "delivered",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Busy => "busy",
        }
    }

    /// The outcome stored as `s`.
    pub(crate) fn parse(s: &str) -> Option<JournalOutcome> {
        Some(match s {
            "queued" => Self::Queued,
            "writing" => Self::Writing,
            "uncertain" => Self::Uncertain,
            "no_route" => Self::NoRoute,
            "rejected" => Self::Rejected,
            "delivered" => Self::Delivered,
            "expired" => Self::Expired,
            "failed" => Self::Failed,
            "busy" => Self::Busy,
            _ => return None,
        })
    }
}

impl fmt::Display for JournalOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A card number in clear, kept in the journal only while its swipe is queued (so that a
/// restart can queue it again). Its `Debug` output is masked.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PendingCard(pub String);

impl fmt::Debug for PendingCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&scm_common::card::mask(&self.0))
    }
}

/// One new swipe journal record.
#[derive(Debug, Clone)]
pub(crate) struct SwipeRecord {
    /// The agent's event id (de-duplication key).
    pub event_id: String,
    /// Machine.
    pub machine: u16,
    /// Reader.
    pub reader: String,
    /// Masked card.
    pub card_masked: String,
    /// Unix ms of the swipe at the reader.
    pub swiped_at_ms: i64,
    /// Outcome so far.
    pub outcome: JournalOutcome,
    /// Details.
    pub detail: String,
    /// A queued swipe's absolute deadline (wall clock, Unix ms): after it the swipe is
    /// never written, also after a restart.
    pub deadline_ms: Option<i64>,
    /// A queued swipe's card, kept only while the row says `queued` (cleared by every
    /// later state), for a restart to queue it again.
    pub card: Option<PendingCard>,
}

/// A swipe the journal holds as queued or writing, read back at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingSwipe {
    /// The agent's event id.
    pub event_id: String,
    /// Machine.
    pub machine: u16,
    /// Reader.
    pub reader: String,
    /// Masked card.
    pub card_masked: String,
    /// `queued` or `writing`.
    pub outcome: JournalOutcome,
    /// The absolute deadline (Unix ms), if the row has one.
    pub deadline_ms: Option<i64>,
    /// The card, if the row is queued and still has it.
    pub card: Option<PendingCard>,
    /// The row's detail (which bridges it was queued for).
    pub detail: String,
}

/// One write to the swipe journal.
#[derive(Debug)]
pub(crate) enum JournalOp {
    /// A swipe's record: a new row, or the update of its row if that row is refused
    /// (the agent's retry); a row in any other state is left as it is. The sender, if
    /// any, is told once the batch holding it is committed (or has failed).
    Insert(SwipeRecord, Option<oneshot::Sender<()>>),
    /// A bridge's outcome for the record of `event_id`.
    Outcome {
        /// The swipe.
        event_id: String,
        /// Its outcome.
        outcome: JournalOutcome,
        /// Details.
        detail: String,
    },
    /// These swipes are about to be written: each `queued` row becomes `writing` (its
    /// card cleared); rows in any other state are left as they are. The sender is told
    /// once the batch holding it is committed (or has failed), before any byte is written.
    Writing(Vec<String>, Option<oneshot::Sender<()>>),
}

/// One row of the swipe listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SwipeRow {
    /// The agent's event id.
    pub event_id: String,
    /// Unix ms received.
    pub received_ms: i64,
    /// Machine.
    pub machine: u16,
    /// Reader.
    pub reader: String,
    /// Masked card.
    pub card_masked: String,
    /// Outcome.
    pub outcome: JournalOutcome,
    /// Details.
    pub detail: String,
}

/// One stored 241 device setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceSetting {
    /// Machine of the device.
    pub machine: u16,
    /// Reader of the device.
    pub reader: String,
    /// Setting name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// One setting to store, with the audit record that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SettingChange {
    /// Setting name.
    pub name: String,
    /// New value.
    pub value: String,
    /// The audit record's detail.
    pub audit_detail: String,
}

/// A store operation's result, boxed so that the traits work as `Arc<dyn ...>`.
pub(crate) type StoreFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Machines, their configuration generations and delivery attempts.
pub(crate) trait FleetState: Send + Sync {
    /// Inserts or updates the configured machines `(id, name, protocol version)`, in one
    /// transaction. Start-up: blocks the calling thread.
    fn sync_machines(&self, machines: &[(u16, String, u8)]) -> Result<(), StoreError>;
    #[cfg(test)]
    /// All machines, by id.
    fn list_machines(&self) -> StoreFuture<'_, Vec<MachineRow>>;
    /// One machine.
    fn get_machine(&self, id: u16) -> StoreFuture<'_, Option<MachineRow>>;
    /// Records a HELLO: the peer address and time. Last-seen data only, rewritten by
    /// every HELLO: [`Durability::Deferred`].
    fn record_hello(&self, id: u16, peer: String) -> StoreFuture<'_, ()>;
    /// Stores `content` as the machine's desired configuration. If it equals the current
    /// desired generation's content, no new generation is made. Returns the generation
    /// and whether it is new.
    fn create_generation(
        &self,
        id: u16,
        content: Vec<u8>,
        actor: String,
    ) -> StoreFuture<'_, (u64, bool)>;
    /// [`FleetState::create_generation`] for many machines in one transaction (all or
    /// nothing); each machine's generation, in the order given.
    fn create_generations(
        &self,
        ids: Vec<u16>,
        content: Vec<u8>,
        actor: String,
    ) -> StoreFuture<'_, Vec<Generation>>;
    /// One stored generation.
    fn get_generation(&self, id: u16, generation: u64) -> StoreFuture<'_, Option<Generation>>;
    /// The generation that still has to reach the machine: the desired one, if it is
    /// newer than the applied one and the machine has not refused it.
    fn pending_generation(&self, id: u16) -> StoreFuture<'_, Option<Generation>>;
    /// Every machine with a pending generation: `(machine, desired generation)`, by id.
    fn pending_all(&self) -> StoreFuture<'_, Vec<(u16, u64)>>;
    /// A machine's generations with their last outcome, newest first.
    fn history(&self, id: u16, limit: u32) -> StoreFuture<'_, Vec<HistoryRow>>;
    #[cfg(test)]
    /// Attempts for one machine, newest first.
    fn attempts(&self, id: u16, limit: u32) -> StoreFuture<'_, Vec<AttemptRow>>;
    /// One machine with its newest attempts, read together.
    fn machine_status(
        &self,
        id: u16,
        attempts: u32,
    ) -> StoreFuture<'_, (Option<MachineRow>, Vec<AttemptRow>)>;
    /// Machines (one, or all) with their desired generation's hash and attempt count,
    /// read together.
    fn machines_with_desired(
        &self,
        only: Option<u16>,
    ) -> StoreFuture<'_, (Vec<MachineRow>, std::collections::HashMap<u16, DesiredRow>)>;
    /// Records the outcome of a delivery attempt and updates the machine's summary.
    fn record_attempt(
        &self,
        id: u16,
        generation: u64,
        outcome: Outcome,
        detail: String,
        durability: Durability,
    ) -> StoreFuture<'_, ()>;
    /// Marks the newest generation with this content hash applied (the machine reported
    /// it, for example after it stored a configuration but died before it could ACK).
    fn mark_applied_by_hash(&self, id: u16, sha256: String) -> StoreFuture<'_, Option<u64>>;
    /// Makes every commit so far durable ([`Durability::Deferred`] ones included); an
    /// error if it cannot, never a silent success.
    fn sync(&self) -> StoreFuture<'_, ()>;
}

/// The operator audit log.
pub(crate) trait AuditLog: Send + Sync {
    /// Appends one record (durable when it returns).
    fn append(
        &self,
        actor: String,
        source: String,
        action: &'static str,
        detail: String,
    ) -> StoreFuture<'_, ()>;
    /// The newest records, newest first.
    fn list(&self, limit: u32) -> StoreFuture<'_, Vec<AuditRow>>;
}

/// The swipe journal: what became of every swipe. Its writes are synchronous calls made
/// by the journal's writer thread and, at a low rate, by the link itself (the hot path:
/// no hand-off); they need not wait for the disk.
pub(crate) trait SwipeJournal: Send + Sync {
    /// Writes `batch` in one transaction, waiting for the database's lock if need be.
    /// Blocks the calling thread.
    fn write_batch(&self, batch: &[JournalOp]) -> Result<(), StoreError>;
    /// The low-rate fast path: commits `record` at once unless that would mean waiting
    /// for a lock (held by the writer or another connection); then gives it back.
    fn commit_now(&self, record: SwipeRecord) -> Result<Option<SwipeRecord>, StoreError>;
    /// Whether operations of the rest of the store are in flight (the journal yields).
    fn store_busy(&self) -> bool;
    /// Waits (blocking, at most `max`) until no operation of the rest of the store is in
    /// flight; returns whether it waited.
    fn yield_to_store(&self, max: Duration) -> bool;
    /// Event ids and received times of the newest records that were not refused (see
    /// [`JournalOutcome::refused`]), at most `limit`, back to `since_ms`, oldest first.
    /// Start-up: blocks the calling thread.
    fn recent_event_ids(
        &self,
        limit: usize,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError>;
    /// The rows that say `queued` or `writing`, received since `since_ms`, oldest first.
    /// Start-up: blocks the calling thread.
    fn pending_swipes(&self, since_ms: i64) -> Result<Vec<PendingSwipe>, StoreError>;
    /// Moves committed journal writes to their final place without blocking writers
    /// (SQLite: a PASSIVE checkpoint of the write-ahead log), and keeps the log's file
    /// bounded (SQLite: a TRUNCATE checkpoint, which waits briefly for the writers, once
    /// the log has grown past a bound).
    fn checkpoint(&self) -> StoreFuture<'_, ()>;
    /// Retention: deletes the oldest records beyond the newest `max_rows` and those
    /// received before `before_ms`, at most `chunk` of them; returns how many.
    fn prune(&self, max_rows: u64, before_ms: i64, chunk: u32) -> StoreFuture<'_, u64>;
    /// The newest records, newest first.
    fn list(&self, limit: u32) -> StoreFuture<'_, Vec<SwipeRow>>;
}

/// Settings print servers store on RFIDeas 241 devices.
pub(crate) trait DeviceSettings: Send + Sync {
    /// Every device's stored settings. Start-up: blocks the calling thread.
    fn load_all(&self) -> Result<Vec<DeviceSetting>, StoreError>;
    /// Stores `changes` for one device and appends their audit records (action
    /// `action`, by `actor` from `source`), all in one transaction; durable when it
    /// returns.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        machine: u16,
        reader: String,
        changes: Vec<SettingChange>,
        at_ms: i64,
        actor: String,
        source: String,
        action: &'static str,
    ) -> StoreFuture<'_, ()>;
}

/// Whether the database answers.
pub(crate) trait Health: Send + Sync {
    /// Runs a trivial query.
    fn probe(&self) -> StoreFuture<'_, ()>;
    /// Makes one small write: whether the database takes writes now.
    fn write_probe(&self) -> StoreFuture<'_, ()>;
}

/// The SCM's handles on its state; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    fleet: Arc<dyn FleetState>,
    audit: Arc<dyn AuditLog>,
    journal: Arc<dyn SwipeJournal>,
    devices: Arc<dyn DeviceSettings>,
    health: Arc<dyn Health>,
    path: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    #[cfg(test)]
    /// Opens (creating if needed) the SQLite database at `path` and migrates it; a write
    /// waits up to 5 s for another process's lock.
    pub(crate) fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_timeout(path, Duration::from_secs(5))
    }

    /// [`Store::open`] with the given lock wait.
    pub(crate) fn open_with_timeout(
        path: &Path,
        busy_timeout: Duration,
    ) -> Result<Store, StoreError> {
        sqlite::open(path, busy_timeout)
    }

    /// Machines, generations and attempts.
    pub(crate) fn fleet(&self) -> &Arc<dyn FleetState> {
        &self.fleet
    }

    /// The audit log.
    pub(crate) fn audit(&self) -> &Arc<dyn AuditLog> {
        &self.audit
    }

    /// The swipe journal.
    pub(crate) fn journal(&self) -> &Arc<dyn SwipeJournal> {
        &self.journal
    }

    /// The 241 devices' settings.
    pub(crate) fn devices(&self) -> &Arc<dyn DeviceSettings> {
        &self.devices
    }

    /// The health probe.
    pub(crate) fn health(&self) -> &Arc<dyn Health> {
        &self.health
    }
}

// Milliseconds since the Unix epoch; the one clock helper, re-exported where the SCM's
// modules have always found it.
pub(crate) use scm_common::clock::now_ms;

/// Hex SHA-256.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
