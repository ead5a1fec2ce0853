//! The swipe journal on SQLite: its own connection (commits without fsync, no automatic
//! checkpoints), shared by the writer thread and the low-rate fast path, and a
//! checkpointing connection beside it.

use scm_common::lock::LockExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

use super::{WriteGate, is_busy, queries as q, store_error};
use crate::state::{
    JournalOp, PendingSwipe, StoreError, StoreFuture, SwipeJournal, SwipeRecord, SwipeRow,
};

/// How long the journal's connection waits for SQLite's write lock.
const JOURNAL_BUSY: Duration = Duration::from_secs(5);
/// How long the checkpointer's connection waits for a lock, except for a TRUNCATE.
const CHECKPOINT_BUSY: Duration = Duration::from_secs(5);
/// A write-ahead log larger than this is truncated by the next checkpoint. A PASSIVE
/// checkpoint never shrinks the file, and under a steady stream of commits it never
/// catches up with the end of the log either, so SQLite never starts the log over: the
/// file grew without end (600 MB under a flood of BUSY retries).
pub(super) const WAL_TRUNCATE_BYTES: u64 = 8 * 1024 * 1024;
/// How long a TRUNCATE checkpoint may hold up the journal's writers (it waits for them
/// to finish, then keeps them out while it copies the log); if it cannot get the
/// database in this time, the next checkpoint tries again.
const TRUNCATE_WAIT: Duration = Duration::from_millis(100);
/// `journal_size_limit`: when SQLite starts the log over (after a complete checkpoint),
/// it cuts the file down to this.
const WAL_KEEP_BYTES: i64 = 4 * 1024 * 1024;

/// The swipe journal's connections: the writer thread's and the low-rate fast path's,
/// and the checkpointer's.
#[derive(Debug)]
pub(crate) struct SqliteJournal {
    conn: Mutex<Connection>,
    checkpoint: Arc<Mutex<Connection>>,
    gate: WriteGate,
    path: PathBuf,
    /// The write-ahead log's file.
    wal: PathBuf,
}

impl SqliteJournal {
    pub(super) fn open(path: &Path, gate: WriteGate) -> Result<SqliteJournal, StoreError> {
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
        conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)
            .map_err(err)?;
        let checkpoint = Connection::open(path).map_err(err)?;
        checkpoint.busy_timeout(CHECKPOINT_BUSY).map_err(err)?;
        checkpoint
            .pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)
            .map_err(err)?;
        Ok(SqliteJournal {
            conn: Mutex::new(conn),
            checkpoint: Arc::new(Mutex::new(checkpoint)),
            gate,
            path: path.to_path_buf(),
            wal: {
                let mut w = path.as_os_str().to_owned();
                w.push("-wal");
                PathBuf::from(w)
            },
        })
    }
}

impl SwipeJournal for SqliteJournal {
    fn write_batch(&self, batch: &[JournalOp]) -> Result<(), StoreError> {
        let mut conn = self.conn.lock_unpoisoned();
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
        let mut conn = self.conn.lock_unpoisoned();
        q::recent_event_ids(&mut conn, limit, since_ms).map_err(|e| store_error(&self.path, e))
    }

    fn pending_swipes(&self, since_ms: i64) -> Result<Vec<PendingSwipe>, StoreError> {
        let mut conn = self.conn.lock_unpoisoned();
        q::pending_swipes(&mut conn, since_ms).map_err(|e| store_error(&self.path, e))
    }

    fn checkpoint(&self) -> StoreFuture<'_, ()> {
        let c = self.checkpoint.clone();
        let wal = self.wal.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let c = c.lock_unpoisoned();
                c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
                let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
                if size > WAL_TRUNCATE_BYTES {
                    c.busy_timeout(TRUNCATE_WAIT)?;
                    let r = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        r.get::<_, i64>(0)
                    });
                    c.busy_timeout(CHECKPOINT_BUSY)?;
                    match r {
                        Ok(0) => tracing::debug!(
                            "swipe journal: write-ahead log of {size} bytes truncated"
                        ),
                        // Busy: readers or writers kept it; the next checkpoint tries again.
                        Ok(_) => tracing::debug!(
                            "swipe journal: write-ahead log of {size} bytes not truncated (busy)"
                        ),
                        Err(e) if is_busy(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(|e| store_error(&self.path, e))
        })
    }

    fn prune(&self, max_rows: u64, before_ms: i64, chunk: u32) -> StoreFuture<'_, u64> {
        // On the checkpointer's connection, off the swipe path.
        let c = self.checkpoint.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut c = c.lock_unpoisoned();
                q::prune_swipes(&mut c, max_rows, before_ms, chunk)
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
                let mut c = c.lock_unpoisoned();
                q::list_swipes(&mut c, limit)
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(|e| store_error(&self.path, e))
        })
    }
}
