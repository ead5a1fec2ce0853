//! The SCM's durable state in SQLite (WAL mode): machines, every configuration generation
//! per machine, every push attempt and its outcome, and the operator audit log.
//!
//! All access goes through [`Store::run`], which moves the blocking SQLite call off the
//! async workers. The schema is created and migrated on open.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use scm_common::lock::LockExt;

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The blocking task was cancelled or panicked.
    #[error("database task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// A short explanation for operators, with what to do.
    pub fn operator_hint(&self) -> String {
        let text = self.to_string();
        if text.contains("locked") || text.contains("busy") {
            format!("{text}; another process holds the database, try again")
        } else if text.contains("readonly") || text.contains("read-only") {
            format!("{text}; the database file is read-only, fix its permissions")
        } else {
            text
        }
    }
}

/// One machine as the SCM knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRow {
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
pub struct Generation {
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
pub enum Outcome {
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
    fn as_str(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Nack => "nack",
            Self::Unreachable => "unreachable",
            Self::Superseded => "superseded",
        }
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
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

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
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
pub struct WriteGate(Arc<AtomicUsize>);

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
    pub fn in_flight(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Blocks the calling (non-async) thread while store operations are in flight, at
    /// most `max`; returns whether it waited.
    pub fn wait_idle(&self, max: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + max;
        let mut waited = false;
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            waited = true;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        waited
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS machines (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    protocol_version INTEGER NOT NULL DEFAULT 1,
    last_peer TEXT,
    last_hello_ms INTEGER,
    desired_generation INTEGER NOT NULL DEFAULT 0,
    applied_generation INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS configs (
    machine_id INTEGER NOT NULL REFERENCES machines(id),
    generation INTEGER NOT NULL,
    content BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (machine_id, generation)
);
CREATE TABLE IF NOT EXISTS push_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS push_attempts_machine ON push_attempts(machine_id, generation);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS swipes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    machine_id INTEGER NOT NULL,
    reader TEXT NOT NULL,
    card_masked TEXT NOT NULL,
    swiped_at_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS swipes_event ON swipes(event_id);
-- No index on received_ms: every swipe's commit would write one more page to the WAL, and
-- the start-up load reads the newest rows by id instead (docs/benchmarks.md).
DROP INDEX IF EXISTS swipes_received;
PRAGMA user_version = 2;
"#;

// Milliseconds since the Unix epoch; the one clock helper, re-exported where the SCM's
// modules have always found it.
pub use scm_common::clock::now_ms;

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

impl Store {
    /// Opens (creating if needed) the database at `path` in WAL mode and migrates it;
    /// a write waits up to 5 s for another process's lock.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_timeout(path, std::time::Duration::from_secs(5))
    }

    /// [`Store::open`] with the given lock wait.
    pub fn open_with_timeout(
        path: &Path,
        busy_timeout: std::time::Duration,
    ) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(busy_timeout).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            gate: WriteGate::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The gate other writers of this database (the swipe journal) yield to.
    pub fn write_gate(&self) -> WriteGate {
        self.gate.clone()
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn run<R, F>(&self, f: F) -> Result<R, StoreError>
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
            f(&mut guard).map_err(|source| StoreError::Sqlite { path, source })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` on the current thread (start-up and tests).
    pub fn run_blocking<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        let _in_flight = self.gate.enter();
        let mut guard = self.conn.lock_unpoisoned();
        f(&mut guard).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }
}

/// Inserts or updates the configured machines (name and protocol version).
pub fn sync_machines(c: &mut Connection, machines: &[(u16, String, u8)]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    for (id, name, version) in machines {
        tx.execute(
            "INSERT INTO machines (id, name, protocol_version) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, protocol_version = excluded.protocol_version",
            params![id, name, version],
        )?;
    }
    tx.commit()
}

fn machine_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MachineRow> {
    Ok(MachineRow {
        id: r.get(0)?,
        name: r.get(1)?,
        protocol_version: r.get(2)?,
        last_peer: r.get(3)?,
        last_hello_ms: r.get(4)?,
        desired_generation: r.get::<_, i64>(5)? as u64,
        applied_generation: r.get::<_, i64>(6)? as u64,
        last_error: r.get(7)?,
    })
}

const MACHINE_COLS: &str = "id, name, protocol_version, last_peer, last_hello_ms, desired_generation, applied_generation, last_error";

/// All machines, by id.
pub fn list_machines(c: &mut Connection) -> rusqlite::Result<Vec<MachineRow>> {
    let mut st = c.prepare(&format!("SELECT {MACHINE_COLS} FROM machines ORDER BY id"))?;
    let rows = st.query_map([], machine_from_row)?;
    rows.collect()
}

/// One machine.
pub fn get_machine(c: &mut Connection, id: u16) -> rusqlite::Result<Option<MachineRow>> {
    c.query_row(
        &format!("SELECT {MACHINE_COLS} FROM machines WHERE id = ?1"),
        [id],
        machine_from_row,
    )
    .optional()
}

/// Records a HELLO: the peer address and time.
pub fn record_hello(c: &mut Connection, id: u16, peer: &str) -> rusqlite::Result<()> {
    // Last-seen data only, rewritten by every HELLO: this commit does not wait for the
    // disk (WAL with synchronous=NORMAL: atomic and consistent, but the newest such
    // commits may be lost in a power cut, until the next FULL commit syncs the WAL). With
    // FULL, each HELLO waited for an fsync (~6 ms on the project machine) under the
    // store's lock, which capped agent connections at ~170/s (docs/benchmarks.md).
    c.pragma_update(None, "synchronous", "NORMAL")?;
    let r = c.execute(
        "UPDATE machines SET last_peer = ?2, last_hello_ms = ?3 WHERE id = ?1",
        params![id, peer, now_ms()],
    );
    c.pragma_update(None, "synchronous", "FULL")?;
    r?;
    Ok(())
}

/// Stores `content` as the machine's desired configuration. If it equals the current
/// desired generation's content, no new generation is made. Returns the generation and
/// whether it is new.
pub fn create_generation(
    c: &mut Connection,
    id: u16,
    content: &[u8],
    actor: &str,
) -> rusqlite::Result<(u64, bool)> {
    let sha = sha256_hex(content);
    let tx = c.transaction()?;
    let desired: i64 = tx.query_row(
        "SELECT desired_generation FROM machines WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?;
    let current_sha: Option<String> = tx
        .query_row(
            "SELECT sha256 FROM configs WHERE machine_id = ?1 AND generation = ?2",
            params![id, desired],
            |r| r.get(0),
        )
        .optional()?;
    if current_sha.as_deref() == Some(sha.as_str()) {
        tx.commit()?;
        return Ok((desired as u64, false));
    }
    let next: i64 = tx.query_row(
        "SELECT COALESCE(MAX(generation), 0) + 1 FROM configs WHERE machine_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    tx.execute(
        "INSERT INTO configs (machine_id, generation, content, sha256, created_ms, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, next, content, sha, now_ms(), actor],
    )?;
    tx.execute(
        "UPDATE machines SET desired_generation = ?2, last_error = NULL WHERE id = ?1",
        params![id, next],
    )?;
    tx.commit()?;
    Ok((next as u64, true))
}

/// [`create_generation`] for many machines in one transaction (a push to a group or to
/// the whole fleet): every machine gets the content as its desired configuration, or
/// keeps its current generation when the content is the same. Returns each machine's
/// generation, in the order given.
pub fn create_generations(
    c: &mut Connection,
    ids: &[u16],
    content: &[u8],
    actor: &str,
) -> rusqlite::Result<Vec<Generation>> {
    let sha = sha256_hex(content);
    let now = now_ms();
    let tx = c.transaction()?;
    let mut out = Vec::with_capacity(ids.len());
    {
        let mut desired_st = tx.prepare_cached(
            "SELECT m.desired_generation, g.sha256 FROM machines m
             LEFT JOIN configs g ON g.machine_id = m.id AND g.generation = m.desired_generation
             WHERE m.id = ?1",
        )?;
        let mut next_st = tx.prepare_cached(
            "SELECT COALESCE(MAX(generation), 0) + 1 FROM configs WHERE machine_id = ?1",
        )?;
        let mut insert_st = tx.prepare_cached(
            "INSERT INTO configs (machine_id, generation, content, sha256, created_ms, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut update_st = tx.prepare_cached(
            "UPDATE machines SET desired_generation = ?2, last_error = NULL WHERE id = ?1",
        )?;
        for &id in ids {
            let (desired, current_sha): (i64, Option<String>) =
                desired_st.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let generation = if current_sha.as_deref() == Some(sha.as_str()) {
                desired
            } else {
                let next: i64 = next_st.query_row([id], |r| r.get(0))?;
                insert_st.execute(params![id, next, content, sha, now, actor])?;
                update_st.execute(params![id, next])?;
                next
            };
            out.push(Generation {
                machine_id: id,
                generation: generation as u64,
                content: content.to_vec(),
                sha256: sha.clone(),
            });
        }
    }
    tx.commit()?;
    Ok(out)
}

/// One stored generation.
pub fn get_generation(
    c: &mut Connection,
    id: u16,
    generation: u64,
) -> rusqlite::Result<Option<Generation>> {
    c.query_row(
        "SELECT content, sha256 FROM configs WHERE machine_id = ?1 AND generation = ?2",
        params![id, generation as i64],
        |r| {
            Ok(Generation {
                machine_id: id,
                generation,
                content: r.get(0)?,
                sha256: r.get(1)?,
            })
        },
    )
    .optional()
}

/// The generation that still has to reach the machine: the desired one, if it is newer
/// than the applied one and the machine has not refused it.
pub fn pending_generation(c: &mut Connection, id: u16) -> rusqlite::Result<Option<Generation>> {
    let Some(m) = get_machine(c, id)? else {
        return Ok(None);
    };
    if m.desired_generation == 0 || m.desired_generation == m.applied_generation {
        return Ok(None);
    }
    let nacked: bool = c.query_row(
        "SELECT EXISTS(SELECT 1 FROM push_attempts WHERE machine_id = ?1 AND generation = ?2 AND outcome = 'nack')",
        params![id, m.desired_generation as i64],
        |r| r.get(0),
    )?;
    if nacked {
        return Ok(None);
    }
    get_generation(c, id, m.desired_generation)
}

/// One generation in a machine's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
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

/// A machine's generations, newest first.
pub fn history(c: &mut Connection, id: u16, limit: u32) -> rusqlite::Result<Vec<HistoryRow>> {
    let mut st = c.prepare(
        "SELECT g.generation, g.sha256, LENGTH(g.content), g.created_ms, g.created_by,
                (SELECT p.outcome FROM push_attempts p WHERE p.machine_id = g.machine_id
                   AND p.generation = g.generation ORDER BY p.id DESC LIMIT 1)
         FROM configs g WHERE g.machine_id = ?1 ORDER BY g.generation DESC LIMIT ?2",
    )?;
    let rows = st.query_map(params![id, limit], |r| {
        Ok(HistoryRow {
            generation: r.get::<_, i64>(0)? as u64,
            sha256: r.get(1)?,
            len: r.get::<_, i64>(2)? as usize,
            created_ms: r.get(3)?,
            created_by: r.get(4)?,
            last_outcome: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Every machine with a pending generation: `(machine, desired generation)`.
pub fn pending_all(c: &mut Connection) -> rusqlite::Result<Vec<(u16, u64)>> {
    let mut st = c.prepare(
        "SELECT m.id, m.desired_generation FROM machines m
         WHERE m.desired_generation > m.applied_generation
           AND NOT EXISTS (SELECT 1 FROM push_attempts p WHERE p.machine_id = m.id
                           AND p.generation = m.desired_generation AND p.outcome = 'nack')
         ORDER BY m.id",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
    rows.collect()
}

/// Records the outcome of a delivery attempt and updates the machine's summary.
pub fn record_attempt(
    c: &mut Connection,
    id: u16,
    generation: u64,
    outcome: Outcome,
    detail: &str,
) -> rusqlite::Result<()> {
    record_attempt_with(c, id, generation, outcome, detail, true)
}

/// [`record_attempt`]; with `durable` false the commit does not wait for the disk (WAL,
/// synchronous=NORMAL) and the caller must call [`sync`] before it reports the outcome
/// as stored (a fleet push: one fsync for all its machines instead of one each).
pub fn record_attempt_with(
    c: &mut Connection,
    id: u16,
    generation: u64,
    outcome: Outcome,
    detail: &str,
    durable: bool,
) -> rusqlite::Result<()> {
    if durable {
        return record_attempt_tx(c, id, generation, outcome, detail);
    }
    c.pragma_update(None, "synchronous", "NORMAL")?;
    let r = record_attempt_tx(c, id, generation, outcome, detail);
    c.pragma_update(None, "synchronous", "FULL")?;
    r
}

/// Makes every commit so far durable: a FULL checkpoint waits (within the busy timeout)
/// for other connections' readers, such as the swipe journal's, then copies every frame of
/// the write-ahead log into the database, syncing both to the disk. A PASSIVE one would
/// skip frames a reader still needs, and then sync nothing. If the checkpoint cannot
/// complete, the commits since the last sync are not known to be on the disk: an error,
/// never a silent success.
pub fn sync(c: &mut Connection) -> rusqlite::Result<()> {
    let (busy, log, done): (i64, i64, i64) =
        c.query_row("PRAGMA wal_checkpoint(FULL)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    if busy != 0 {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some(format!(
                "checkpoint incomplete ({done} of {log} log frames copied): another connection kept the database busy"
            )),
        ));
    }
    Ok(())
}

fn record_attempt_tx(
    c: &mut Connection,
    id: u16,
    generation: u64,
    outcome: Outcome,
    detail: &str,
) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    tx.execute(
        "INSERT INTO push_attempts (machine_id, generation, at_ms, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, generation as i64, now_ms(), outcome.as_str(), detail],
    )?;
    match outcome {
        Outcome::Ack => tx.execute(
            "UPDATE machines SET applied_generation = MAX(applied_generation, ?2), last_error = NULL WHERE id = ?1",
            params![id, generation as i64],
        )?,
        // The newer generation's delivery reports for the machine; nothing to update.
        Outcome::Superseded => 0,
        Outcome::Nack | Outcome::Unreachable => tx.execute(
            "UPDATE machines SET last_error = ?2 WHERE id = ?1",
            params![id, format!("generation {generation}: {} ({detail})", outcome.as_str())],
        )?,
    };
    tx.commit()
}

/// Marks a generation applied because the machine reported its content hash (for example
/// after it stored a configuration but died before it could ACK).
pub fn mark_applied_by_hash(
    c: &mut Connection,
    id: u16,
    sha256: &str,
) -> rusqlite::Result<Option<u64>> {
    let generation: Option<i64> = c
        .query_row(
            "SELECT MAX(generation) FROM configs WHERE machine_id = ?1 AND sha256 = ?2",
            params![id, sha256],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    if let Some(g) = generation {
        c.execute(
            "UPDATE machines SET applied_generation = ?2 WHERE id = ?1 AND applied_generation <> ?2",
            params![id, g],
        )?;
    }
    Ok(generation.map(|g| g as u64))
}

/// Attempts for one machine, newest first.
pub fn attempts(
    c: &mut Connection,
    id: u16,
    limit: u32,
) -> rusqlite::Result<Vec<(u64, i64, String, String)>> {
    let mut st = c.prepare(
        "SELECT generation, at_ms, outcome, detail FROM push_attempts WHERE machine_id = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = st.query_map(params![id, limit], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    rows.collect()
}

/// Appends to the audit log.
pub fn audit(
    c: &mut Connection,
    actor: &str,
    source: &str,
    action: &str,
    detail: &str,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO audit (at_ms, actor, source, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now_ms(), actor, source, action, detail],
    )?;
    Ok(())
}

/// The newest audit records, newest first.
pub fn list_audit(c: &mut Connection, limit: u32) -> rusqlite::Result<Vec<AuditRow>> {
    let mut st = c.prepare(
        "SELECT at_ms, actor, source, action, detail FROM audit ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = st.query_map([limit], |r| {
        Ok(AuditRow {
            at_ms: r.get(0)?,
            actor: r.get(1)?,
            source: r.get(2)?,
            action: r.get(3)?,
            detail: r.get(4)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("scm.db")).unwrap();
        s.run_blocking(|c| sync_machines(c, &[(1, "one".into(), 1), (2, "two".into(), 0)]))
            .unwrap();
        (d, s)
    }

    #[test]
    fn wal_mode_is_on() {
        let (_d, s) = store();
        let mode: String = s
            .run_blocking(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn sync_copies_every_frame_or_says_it_could_not() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("scm.db");
        let s = Store::open_with_timeout(&path, std::time::Duration::from_millis(200)).unwrap();
        s.run_blocking(|c| sync_machines(c, &[(1, "one".into(), 1)]))
            .unwrap();
        // A reader on another connection pins an old snapshot (as the swipe journal's
        // connection can); a batched (not yet synced) outcome is written after it.
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT COUNT(*) FROM machines", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        s.run_blocking(|c| record_attempt_with(c, 1, 1, Outcome::Ack, "ok", false))
            .unwrap();
        let e = s.run_blocking(sync).unwrap_err();
        assert!(e.to_string().contains("checkpoint incomplete"), "{e}");
        // Once the reader is done, the same sync copies everything.
        reader.execute_batch("COMMIT").unwrap();
        s.run_blocking(sync).unwrap();
        let left: i64 = s
            .run_blocking(|c| c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1)))
            .unwrap();
        let copied: i64 = s
            .run_blocking(|c| c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(2)))
            .unwrap();
        assert_eq!(left, copied, "every log frame is in the database");
    }

    #[test]
    fn hello_is_recorded_and_full_sync_is_restored() {
        let (_d, s) = store();
        s.run_blocking(|c| record_hello(c, 1, "127.0.0.1:5000"))
            .unwrap();
        let (peer, sync): (Option<String>, i64) = s
            .run_blocking(|c| {
                let p = c.query_row("SELECT last_peer FROM machines WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
                let y = c.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                Ok((p, y))
            })
            .unwrap();
        assert_eq!(peer.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(sync, 2, "FULL again for every other write");
    }

    #[test]
    fn same_content_makes_no_new_generation() {
        let (_d, s) = store();
        let (g1, new1) = s
            .run_blocking(|c| create_generation(c, 1, b"a=1\n", "op"))
            .unwrap();
        let (g2, new2) = s
            .run_blocking(|c| create_generation(c, 1, b"a=1\n", "op"))
            .unwrap();
        let (g3, new3) = s
            .run_blocking(|c| create_generation(c, 1, b"a=2\n", "op"))
            .unwrap();
        assert_eq!((g1, new1, g2, new2, g3, new3), (1, true, 1, false, 2, true));
        let (g4, _) = s
            .run_blocking(|c| create_generation(c, 2, b"x", "op"))
            .unwrap();
        assert_eq!(g4, 1, "generations count per machine");
    }

    #[test]
    fn fleet_generations_in_one_transaction() {
        let (_d, s) = store();
        s.run_blocking(|c| create_generation(c, 1, b"same\n", "op"))
            .unwrap();
        s.run_blocking(|c| create_generation(c, 2, b"old\n", "op"))
            .unwrap();
        let gens = s
            .run_blocking(|c| create_generations(c, &[1, 2], b"same\n", "op"))
            .unwrap();
        let got: Vec<(u16, u64)> = gens.iter().map(|g| (g.machine_id, g.generation)).collect();
        assert_eq!(
            got,
            vec![(1, 1), (2, 2)],
            "same content keeps its generation"
        );
        assert!(gens.iter().all(|g| g.sha256 == sha256_hex(b"same\n")));
        let m2 = s.run_blocking(|c| get_machine(c, 2)).unwrap().unwrap();
        assert_eq!(m2.desired_generation, 2);
        // An unknown machine fails the whole transaction: nothing is half-stored.
        assert!(
            s.run_blocking(|c| create_generations(c, &[2, 999], b"new\n", "op"))
                .is_err()
        );
        let m2 = s.run_blocking(|c| get_machine(c, 2)).unwrap().unwrap();
        assert_eq!(m2.desired_generation, 2, "rolled back");
    }

    #[test]
    fn superseded_attempt_leaves_the_machine_alone() {
        let (_d, s) = store();
        s.run_blocking(|c| create_generation(c, 1, b"a\n", "op"))
            .unwrap();
        s.run_blocking(|c| create_generation(c, 1, b"b\n", "op"))
            .unwrap();
        s.run_blocking(|c| record_attempt(c, 1, 1, Outcome::Superseded, "newer"))
            .unwrap();
        let m = s.run_blocking(|c| get_machine(c, 1)).unwrap().unwrap();
        assert_eq!((m.desired_generation, m.applied_generation), (2, 0));
        assert_eq!(m.last_error, None);
        let p = s.run_blocking(|c| pending_generation(c, 1)).unwrap();
        assert_eq!(p.map(|g| g.generation), Some(2));
    }

    #[test]
    fn pending_until_acked_and_never_after_nack() {
        let (_d, s) = store();
        s.run_blocking(|c| create_generation(c, 1, b"a", "op"))
            .unwrap();
        let p = s
            .run_blocking(|c| pending_generation(c, 1))
            .unwrap()
            .unwrap();
        assert_eq!((p.generation, p.content.as_slice()), (1, &b"a"[..]));
        s.run_blocking(|c| record_attempt(c, 1, 1, Outcome::Unreachable, "refused"))
            .unwrap();
        assert!(
            s.run_blocking(|c| pending_generation(c, 1))
                .unwrap()
                .is_some()
        );
        s.run_blocking(|c| record_attempt(c, 1, 1, Outcome::Ack, "ok"))
            .unwrap();
        assert!(
            s.run_blocking(|c| pending_generation(c, 1))
                .unwrap()
                .is_none()
        );
        let m = s.run_blocking(|c| get_machine(c, 1)).unwrap().unwrap();
        assert_eq!(
            (m.desired_generation, m.applied_generation, m.last_error),
            (1, 1, None)
        );

        s.run_blocking(|c| create_generation(c, 1, b"b", "op"))
            .unwrap();
        s.run_blocking(|c| record_attempt(c, 1, 2, Outcome::Nack, "bad key"))
            .unwrap();
        assert!(
            s.run_blocking(|c| pending_generation(c, 1))
                .unwrap()
                .is_none()
        );
        let m = s.run_blocking(|c| get_machine(c, 1)).unwrap().unwrap();
        assert!(m.last_error.unwrap().contains("bad key"));
    }

    #[test]
    fn pending_all_lists_undelivered_and_not_nacked() {
        let (_d, s) = store();
        s.run_blocking(|c| create_generation(c, 1, b"a", "op"))
            .unwrap();
        s.run_blocking(|c| create_generation(c, 2, b"b", "op"))
            .unwrap();
        assert_eq!(s.run_blocking(pending_all).unwrap(), vec![(1, 1), (2, 1)]);
        s.run_blocking(|c| record_attempt(c, 1, 1, Outcome::Ack, "ok"))
            .unwrap();
        s.run_blocking(|c| record_attempt(c, 2, 1, Outcome::Nack, "no"))
            .unwrap();
        assert!(s.run_blocking(pending_all).unwrap().is_empty());
        s.run_blocking(|c| create_generation(c, 2, b"c", "op"))
            .unwrap();
        assert_eq!(s.run_blocking(pending_all).unwrap(), vec![(2, 2)]);
    }

    #[test]
    fn history_lists_generations_with_their_last_outcome() {
        let (_d, s) = store();
        s.run_blocking(|c| create_generation(c, 1, b"one", "alice"))
            .unwrap();
        s.run_blocking(|c| record_attempt(c, 1, 1, Outcome::Unreachable, "x"))
            .unwrap();
        s.run_blocking(|c| record_attempt(c, 1, 1, Outcome::Ack, "ok"))
            .unwrap();
        s.run_blocking(|c| create_generation(c, 1, b"two!", "bob"))
            .unwrap();
        let h = s.run_blocking(|c| history(c, 1, 10)).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].generation, h[0].len, h[0].created_by.as_str()),
            (2, 4, "bob")
        );
        assert_eq!(h[0].last_outcome, None);
        assert_eq!(h[1].last_outcome.as_deref(), Some("ack"));
        assert_eq!(h[1].sha256, sha256_hex(b"one"));
    }

    #[test]
    fn applied_by_hash() {
        let (_d, s) = store();
        s.run_blocking(|c| create_generation(c, 1, b"a", "op"))
            .unwrap();
        let g = s
            .run_blocking(|c| mark_applied_by_hash(c, 1, &sha256_hex(b"a")))
            .unwrap();
        assert_eq!(g, Some(1));
        assert_eq!(
            s.run_blocking(|c| mark_applied_by_hash(c, 1, &sha256_hex(b"zz")))
                .unwrap(),
            None
        );
        assert_eq!(
            s.run_blocking(|c| get_machine(c, 1))
                .unwrap()
                .unwrap()
                .applied_generation,
            1
        );
    }

    #[test]
    fn state_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("scm.db");
        {
            let s = Store::open(&p).unwrap();
            s.run_blocking(|c| sync_machines(c, &[(7, "m".into(), 1)]))
                .unwrap();
            s.run_blocking(|c| create_generation(c, 7, b"cfg", "op"))
                .unwrap();
            s.run_blocking(|c| audit(c, "op", "127.0.0.1:1", "push", "machine 7"))
                .unwrap();
        }
        let s = Store::open(&p).unwrap();
        let m = s.run_blocking(|c| get_machine(c, 7)).unwrap().unwrap();
        assert_eq!(m.desired_generation, 1);
        let a = s.run_blocking(|c| list_audit(c, 10)).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].action, "push");
    }

    #[test]
    fn the_journal_gate_counts_store_operations_and_waits_for_them() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("g.db")).unwrap();
        let gate = s.write_gate();
        assert_eq!(gate.in_flight(), 0);
        assert!(
            !gate.wait_idle(std::time::Duration::from_secs(5)),
            "nothing to wait for"
        );
        let seen = s.run_blocking(|_| Ok(gate.in_flight())).unwrap();
        assert_eq!(seen, 1, "an operation counts while it runs");
        assert_eq!(gate.in_flight(), 0, "and not after");
        // An operation in flight on another thread holds the journal back until it ends.
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            s.run_blocking(|_| {
                tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok(())
            })
            .unwrap();
        });
        rx.recv().unwrap();
        assert!(
            gate.wait_idle(std::time::Duration::from_millis(20)),
            "bounded wait"
        );
        assert_eq!(gate.in_flight(), 1);
        go_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn read_only_database_gives_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ro.db");
        drop(Store::open(&p).unwrap());
        let ro =
            Connection::open_with_flags(&p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let s = Store {
            conn: Arc::new(Mutex::new(ro)),
            path: p.clone(),
            gate: WriteGate::default(),
        };
        let e = s
            .run_blocking(|c| audit(c, "a", "b", "c", "d"))
            .unwrap_err();
        let hint = e.operator_hint();
        assert!(hint.contains("read-only"), "{hint}");
        assert!(hint.contains("ro.db"), "{hint}");
    }
}
