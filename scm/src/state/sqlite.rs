//! The state in SQLite (WAL mode): one connection for the store's operations, run off the
//! async workers; the swipe journal's own connection (commits without fsync, no
//! automatic checkpoints) and a checkpointing connection beside it; the write gate that
//! gives the store's operations priority over the journal's batches. The schema is the
//! numbered migrations in `migrations/`, applied in order at open and tracked in
//! `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use super::{
    AttemptRow, AuditLog, AuditRow, DesiredRow, DeviceSetting, DeviceSettings, Durability,
    FleetState, Generation, Health, HistoryRow, JournalOp, MachineRow, Outcome, SettingChange,
    Store, StoreError, StoreErrorKind, StoreFuture, SwipeJournal, SwipeRecord, SwipeRow,
};

mod queries;
#[cfg(test)]
mod tests;

use queries as q;

/// The schema, in order: `(user_version after it, SQL)`. A database made before the
/// migrations were numbered has `user_version` 2 and the tables of 0001 and 0002 (or 0
/// or 1 and a subset); every statement of those is idempotent, so any of them migrates.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("migrations/0001_initial.sql")),
    (
        2,
        include_str!("migrations/0002_swipes_no_received_index.sql"),
    ),
    (3, include_str!("migrations/0003_rfideas_settings.sql")),
];

/// How long the journal's connection waits for SQLite's write lock.
const JOURNAL_BUSY: Duration = Duration::from_secs(5);

/// Maps SQLite's error to the backend-neutral error, by its error code.
fn store_error(path: &Path, e: rusqlite::Error) -> StoreError {
    let kind = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreErrorKind::Busy,
        Some(ErrorCode::ReadOnly) => StoreErrorKind::ReadOnly,
        Some(ErrorCode::DiskFull) => StoreErrorKind::DiskFull,
        Some(ErrorCode::SystemIoFailure) => StoreErrorKind::Io,
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreErrorKind::Corrupt,
        Some(ErrorCode::ConstraintViolation) => StoreErrorKind::Constraint,
        _ => StoreErrorKind::Other,
    };
    StoreError::Db {
        kind,
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Applies the migrations `conn`'s database lacks, in one transaction.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.execute_batch(sql)?;
        }
    }
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    // Written at every open, as before the migrations were numbered: a database that
    // cannot be written fails here, at start, with a clear error, not at the first push.
    tx.pragma_update(None, "user_version", current.max(latest))?;
    tx.commit()
}

/// Opens the database at `path`: the store's connection, migrated, and the journal's.
pub(super) fn open(path: &Path, busy_timeout: Duration) -> Result<Store, StoreError> {
    let db = Arc::new(SqliteStore::open(path, busy_timeout)?);
    let journal = Arc::new(SqliteJournal::open(path, db.gate.clone())?);
    Ok(Store {
        fleet: db.clone(),
        audit: db.clone(),
        devices: db.clone(),
        health: db,
        journal,
        path: path.to_path_buf(),
    })
}

/// The store's connection; its operations run one at a time on a blocking thread.
#[derive(Debug)]
pub(crate) struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    gate: WriteGate,
}

/// Gives the store's operations (operators' pushes, machine state) priority over the swipe
/// journal's batches on the shared database. SQLite's lock is not fair: a journal writing
/// batch after batch (a flood of swipes from one agent) could keep a push waiting beyond
/// its busy timeout, and the operator would get `451 database is locked`. The store counts
/// its operations in flight; the journal writer waits, bounded, until none is in flight
/// before it starts its next batch.
#[derive(Debug, Clone, Default)]
pub(crate) struct WriteGate(Arc<AtomicUsize>);

/// One store operation in flight (see [`WriteGate`]).
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WriteGate {
    fn enter(&self) -> InFlight {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlight(self.0.clone())
    }

    /// Store operations in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Blocks the calling (non-async) thread while store operations are in flight, at
    /// most `max`; returns whether it waited.
    pub(crate) fn wait_idle(&self, max: Duration) -> bool {
        let deadline = std::time::Instant::now() + max;
        let mut waited = false;
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            waited = true;
            std::thread::sleep(Duration::from_millis(1));
        }
        waited
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` in WAL mode and migrates it.
    fn open(path: &Path, busy_timeout: Duration) -> Result<SqliteStore, StoreError> {
        let err = |e| store_error(path, e);
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(busy_timeout).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        migrate(&mut conn).map_err(err)?;
        Ok(SqliteStore::with_connection(conn, path))
    }

    fn with_connection(conn: Connection, path: &Path) -> SqliteStore {
        SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            gate: WriteGate::default(),
        }
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn run<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.clone();
        let in_flight = self.gate.enter();
        tokio::task::spawn_blocking(move || {
            let _in_flight = in_flight;
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard).map_err(|e| store_error(&path, e))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` on the current thread (start-up and tests).
    fn run_blocking<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        let _in_flight = self.gate.enter();
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard).map_err(|e| store_error(&self.path, e))
    }
}

impl FleetState for SqliteStore {
    fn sync_machines(&self, machines: &[(u16, String, u8)]) -> Result<(), StoreError> {
        self.run_blocking(|c| q::sync_machines(c, machines))
    }

    fn list_machines(&self) -> StoreFuture<'_, Vec<MachineRow>> {
        Box::pin(self.run(q::list_machines))
    }

    fn get_machine(&self, id: u16) -> StoreFuture<'_, Option<MachineRow>> {
        Box::pin(self.run(move |c| q::get_machine(c, id)))
    }

    fn record_hello(&self, id: u16, peer: String) -> StoreFuture<'_, ()> {
        Box::pin(self.run(move |c| q::record_hello(c, id, &peer)))
    }

    fn create_generation(
        &self,
        id: u16,
        content: Vec<u8>,
        actor: String,
    ) -> StoreFuture<'_, (u64, bool)> {
        Box::pin(self.run(move |c| q::create_generation(c, id, &content, &actor)))
    }

    fn create_generations(
        &self,
        ids: Vec<u16>,
        content: Vec<u8>,
        actor: String,
    ) -> StoreFuture<'_, Vec<Generation>> {
        Box::pin(self.run(move |c| q::create_generations(c, &ids, &content, &actor)))
    }

    fn get_generation(&self, id: u16, generation: u64) -> StoreFuture<'_, Option<Generation>> {
        Box::pin(self.run(move |c| q::get_generation(c, id, generation)))
    }

    fn pending_generation(&self, id: u16) -> StoreFuture<'_, Option<Generation>> {
        Box::pin(self.run(move |c| q::pending_generation(c, id)))
    }

    fn pending_all(&self) -> StoreFuture<'_, Vec<(u16, u64)>> {
        Box::pin(self.run(q::pending_all))
    }

    fn history(&self, id: u16, limit: u32) -> StoreFuture<'_, Vec<HistoryRow>> {
        Box::pin(self.run(move |c| q::history(c, id, limit)))
    }

    fn attempts(&self, id: u16, limit: u32) -> StoreFuture<'_, Vec<AttemptRow>> {
        Box::pin(self.run(move |c| q::attempts(c, id, limit)))
    }

    fn machine_status(
        &self,
        id: u16,
        attempts: u32,
    ) -> StoreFuture<'_, (Option<MachineRow>, Vec<AttemptRow>)> {
        Box::pin(self.run(move |c| Ok((q::get_machine(c, id)?, q::attempts(c, id, attempts)?))))
    }

    fn machines_with_desired(
        &self,
        only: Option<u16>,
    ) -> StoreFuture<'_, (Vec<MachineRow>, std::collections::HashMap<u16, DesiredRow>)> {
        Box::pin(self.run(move |c| {
            let rows = match only {
                Some(id) => q::get_machine(c, id)?.into_iter().collect(),
                None => q::list_machines(c)?,
            };
            Ok((rows, q::desired_details(c, only)?))
        }))
    }

    fn record_attempt(
        &self,
        id: u16,
        generation: u64,
        outcome: Outcome,
        detail: String,
        durability: Durability,
    ) -> StoreFuture<'_, ()> {
        let durable = durability == Durability::Synced;
        Box::pin(
            self.run(move |c| q::record_attempt_with(c, id, generation, outcome, &detail, durable)),
        )
    }

    fn mark_applied_by_hash(&self, id: u16, sha256: String) -> StoreFuture<'_, Option<u64>> {
        Box::pin(self.run(move |c| q::mark_applied_by_hash(c, id, &sha256)))
    }

    fn sync(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.run(q::sync))
    }
}

impl AuditLog for SqliteStore {
    fn append(
        &self,
        actor: String,
        source: String,
        action: &'static str,
        detail: String,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.run(move |c| q::audit(c, &actor, &source, action, &detail)))
    }

    fn list(&self, limit: u32) -> StoreFuture<'_, Vec<AuditRow>> {
        Box::pin(self.run(move |c| q::list_audit(c, limit)))
    }
}

impl DeviceSettings for SqliteStore {
    fn load_all(&self) -> Result<Vec<DeviceSetting>, StoreError> {
        self.run_blocking(q::device_settings)
    }

    fn store(
        &self,
        machine: u16,
        reader: String,
        changes: Vec<SettingChange>,
        at_ms: i64,
        actor: String,
        source: String,
        action: &'static str,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.run(move |c| {
            q::store_device_settings(
                c, machine, &reader, &changes, at_ms, &actor, &source, action,
            )
        }))
    }
}

impl Health for SqliteStore {
    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let v = self
                .run(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
                .await?;
            if v == 1 {
                Ok(())
            } else {
                Err(StoreError::Db {
                    kind: StoreErrorKind::Other,
                    path: self.path.clone(),
                    detail: format!("database answered {v} to SELECT 1"),
                })
            }
        })
    }
}

/// The swipe journal's connections: the writer thread's and the low-rate fast path's,
/// and the checkpointer's.
#[derive(Debug)]
pub(crate) struct SqliteJournal {
    conn: Mutex<Connection>,
    checkpoint: Arc<Mutex<Connection>>,
    gate: WriteGate,
    path: PathBuf,
}

impl SqliteJournal {
    fn open(path: &Path, gate: WriteGate) -> Result<SqliteJournal, StoreError> {
        let err = |e| store_error(path, e);
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(JOURNAL_BUSY).map_err(err)?;
        // The journal does not fsync each commit: a process crash loses nothing (the WAL
        // is in the OS cache); a power loss may lose the last moments of the journal.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // The journal writer's commits never checkpoint: a checkpoint copies the WAL into
        // the database and waits for the disk (hundreds of ms on a slow disk), and every
        // swipe waits for its journal commit. A checkpointer of its own does it instead.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        let checkpoint = Connection::open(path).map_err(err)?;
        checkpoint
            .busy_timeout(Duration::from_secs(5))
            .map_err(err)?;
        Ok(SqliteJournal {
            conn: Mutex::new(conn),
            checkpoint: Arc::new(Mutex::new(checkpoint)),
            gate,
            path: path.to_path_buf(),
        })
    }
}

impl SwipeJournal for SqliteJournal {
    fn write_batch(&self, batch: &[JournalOp]) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        q::write_journal_batch(&mut conn, batch).map_err(|e| store_error(&self.path, e))
    }

    fn commit_now(&self, record: SwipeRecord) -> Result<Option<SwipeRecord>, StoreError> {
        // Never waits: not for the writer thread (the mutex), not for another
        // connection's write lock (busy timeout zero for this one commit).
        let Ok(mut conn) = self.conn.try_lock() else {
            return Ok(Some(record));
        };
        let _ = conn.busy_timeout(Duration::ZERO);
        let batch = [JournalOp::Insert(record, None)];
        let result = q::write_journal_batch(&mut conn, &batch);
        let _ = conn.busy_timeout(JOURNAL_BUSY);
        drop(conn);
        match result {
            Ok(()) => Ok(None),
            Err(e) if is_busy(&e) => {
                let [JournalOp::Insert(record, _)] = batch else {
                    unreachable!("built above")
                };
                Ok(Some(record))
            }
            Err(e) => Err(store_error(&self.path, e)),
        }
    }

    fn store_busy(&self) -> bool {
        self.gate.in_flight() > 0
    }

    fn yield_to_store(&self, max: Duration) -> bool {
        self.gate.wait_idle(max)
    }

    fn recent_event_ids(
        &self,
        limit: usize,
        since_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        q::recent_event_ids(&mut conn, limit, since_ms).map_err(|e| store_error(&self.path, e))
    }

    fn checkpoint(&self) -> StoreFuture<'_, ()> {
        let c = self.checkpoint.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let c = c.lock().unwrap_or_else(|p| p.into_inner());
                c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(|e| store_error(&self.path, e))
        })
    }

    fn list(&self, limit: u32) -> StoreFuture<'_, Vec<SwipeRow>> {
        // On the checkpointer's connection: a listing must not hold up the journal's
        // writer.
        let c = self.checkpoint.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                q::list_swipes(&mut c, limit)
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(|e| store_error(&self.path, e))
        })
    }
}

/// Holds SQLite's write lock on a database from another connection until dropped (tests
/// of what waits for the lock and what does not).
#[cfg(test)]
pub(crate) struct LockHolder(Connection);

#[cfg(test)]
impl LockHolder {
    pub(crate) fn take(path: &Path) -> LockHolder {
        let c = Connection::open(path).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        LockHolder(c)
    }
}

#[cfg(test)]
impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}
