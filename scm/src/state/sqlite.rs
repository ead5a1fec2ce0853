//! The state in SQLite (WAL mode): one connection for the store's operations, run off the
//! async workers; the swipe journal's own connection (commits without fsync, no
//! automatic checkpoints) and a checkpointing connection beside it; the write gate that
//! gives the store's operations priority over the journal's batches. The schema is the
//! numbered migrations in `migrations/`, applied in order at open and tracked in
//! `PRAGMA user_version`.

use scm_common::lock::LockExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use super::{
    AttemptRow, AuditLog, AuditRow, DesiredRow, DeviceSetting, DeviceSettings, Durability,
    FleetState, Generation, Health, HistoryRow, MachineRow, Outcome, SettingChange, Store,
    StoreError, StoreErrorKind, StoreFuture,
};

mod gate;
mod journal;
mod queries;
#[cfg(test)]
mod tests;

pub(crate) use gate::WriteGate;
use journal::SqliteJournal;
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
    (
        4,
        include_str!("migrations/0004_swipes_one_row_per_event.sql"),
    ),
    (5, include_str!("migrations/0005_health_probe.sql")),
    (
        6,
        include_str!("migrations/0006_swipes_survive_restarts.sql"),
    ),
];

/// Maps SQLite's error to the backend-neutral error, by its error code.
pub(super) fn store_error(path: &Path, e: rusqlite::Error) -> StoreError {
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

pub(super) fn is_busy(e: &rusqlite::Error) -> bool {
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
            let mut guard = conn.lock_unpoisoned();
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
        let mut guard = self.conn.lock_unpoisoned();
        f(&mut guard).map_err(|e| store_error(&self.path, e))
    }
}

impl FleetState for SqliteStore {
    fn sync_machines(&self, machines: &[(u16, String, u8)]) -> Result<(), StoreError> {
        self.run_blocking(|c| q::sync_machines(c, machines))
    }

    #[cfg(test)]
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

    #[cfg(test)]
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
    fn write_probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.run(q::write_probe).await })
    }

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
