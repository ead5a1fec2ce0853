//! The conformance suite on SQLite, and what only SQLite has: WAL mode, the checkpoint
//! behind `sync`, the per-commit synchronous setting, the write gate, read-only files and
//! the migration of databases made by earlier versions.

use super::*;
use crate::state::conformance::Fresh;
use crate::state::{now_ms, sha256_hex};

fn fresh() -> Fresh {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("scm.db")).unwrap();
    Fresh {
        store,
        _keep: Box::new(d),
    }
}

mod conformance {
    use super::fresh;
    crate::conformance_suite!(fresh);
}

fn store() -> (tempfile::TempDir, SqliteStore) {
    let d = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&d.path().join("scm.db"), Duration::from_secs(5)).unwrap();
    s.run_blocking(|c| q::sync_machines(c, &[(1, "one".into(), 1), (2, "two".into(), 0)]))
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
    let s = SqliteStore::open(&path, Duration::from_millis(200)).unwrap();
    s.run_blocking(|c| q::sync_machines(c, &[(1, "one".into(), 1)]))
        .unwrap();
    // A reader on another connection pins an old snapshot (as the swipe journal's
    // connection can); a batched (not yet synced) outcome is written after it.
    let reader = Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let n: i64 = reader
        .query_row("SELECT COUNT(*) FROM machines", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    s.run_blocking(|c| q::record_attempt_with(c, 1, 1, Outcome::Ack, "ok", false))
        .unwrap();
    let e = s.run_blocking(q::sync).unwrap_err();
    assert!(e.to_string().contains("checkpoint incomplete"), "{e}");
    assert_eq!(e.kind(), StoreErrorKind::Busy);
    // Once the reader is done, the same sync copies everything.
    reader.execute_batch("COMMIT").unwrap();
    s.run_blocking(q::sync).unwrap();
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
    s.run_blocking(|c| q::record_hello(c, 1, "127.0.0.1:5000"))
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
fn deferred_attempt_restores_full_sync() {
    let (_d, s) = store();
    s.run_blocking(|c| q::create_generation(c, 1, b"a", "op"))
        .unwrap();
    s.run_blocking(|c| q::record_attempt_with(c, 1, 1, Outcome::Ack, "ok", false))
        .unwrap();
    let sync: i64 = s
        .run_blocking(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(sync, 2);
}

#[tokio::test]
async fn state_survives_reopen() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("scm.db");
    {
        let s = Store::open(&p).unwrap();
        s.fleet().sync_machines(&[(7, "m".into(), 1)]).unwrap();
        s.fleet()
            .create_generation(7, b"cfg".to_vec(), "op".into())
            .await
            .unwrap();
        s.audit()
            .append(
                "op".into(),
                "127.0.0.1:1".into(),
                "push",
                "machine 7".into(),
            )
            .await
            .unwrap();
    }
    let s = Store::open(&p).unwrap();
    let m = s.fleet().get_machine(7).await.unwrap().unwrap();
    assert_eq!(m.desired_generation, 1);
    let a = s.audit().list(10).await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].action, "push");
}

#[test]
fn the_journal_gate_counts_store_operations_and_waits_for_them() {
    let d = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&d.path().join("g.db"), Duration::from_secs(5)).unwrap();
    let gate = s.gate.clone();
    assert_eq!(gate.in_flight(), 0);
    assert!(
        !gate.wait_idle(Duration::from_secs(5)),
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
    assert!(gate.wait_idle(Duration::from_millis(20)), "bounded wait");
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
    let ro = Connection::open_with_flags(&p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let s = SqliteStore::with_connection(ro, &p);
    let e = s
        .run_blocking(|c| q::audit(c, "a", "b", "c", "d"))
        .unwrap_err();
    let hint = e.operator_hint();
    assert!(hint.contains("read-only"), "{hint}");
    assert!(hint.contains("ro.db"), "{hint}");
    assert_eq!(e.kind(), StoreErrorKind::ReadOnly);
    // The health probe's write says so too, while its read still answers.
    s.run_blocking(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
        .unwrap();
    let e = s.run_blocking(q::write_probe).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::ReadOnly);
}

#[test]
fn a_held_lock_is_busy_with_its_hint() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.db");
    let s = SqliteStore::open(&p, Duration::from_millis(50)).unwrap();
    let _held = LockHolder::take(&p);
    let e = s
        .run_blocking(|c| q::audit(c, "a", "b", "c", "d"))
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Busy);
    assert!(
        e.operator_hint()
            .ends_with("database is locked; another process holds the database, try again"),
        "{}",
        e.operator_hint()
    );
}

#[test]
fn errors_are_classified_by_code() {
    let (_d, s) = store();
    let e = s
        .run_blocking(|c| c.execute("INSERT INTO machines (id) VALUES (1)", []))
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Constraint);
    let e = s
        .run_blocking(|c| c.execute("SELECT nonsense FROM nowhere", []))
        .unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Other);
    assert_eq!(e.operator_hint(), e.to_string());
}

#[test]
fn a_file_that_is_not_a_database_is_corrupt() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("junk.db");
    std::fs::write(&p, vec![b'x'; 4096]).unwrap();
    let e = Store::open(&p).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
}

/// The schema exactly as the SCM created it before the migrations were numbered.
const OLD_SCHEMA: &str = r#"
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

/// The 241 bridge's table as the bridge created it at start.
const OLD_RFIDEAS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS rfideas_settings (
    machine_id INTEGER NOT NULL,
    reader TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (machine_id, reader, name)
);";

fn user_version(p: &Path) -> u32 {
    Connection::open(p)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

fn has_index(p: &Path, name: &str) -> bool {
    Connection::open(p)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
        == 1
}

#[tokio::test]
async fn a_database_of_the_previous_schema_opens_and_is_migrated() {
    for with_rfideas in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("old.db");
        {
            let c = Connection::open(&p).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            c.execute_batch(OLD_SCHEMA).unwrap();
            if with_rfideas {
                c.execute_batch(OLD_RFIDEAS_SCHEMA).unwrap();
                c.execute(
                    "INSERT INTO rfideas_settings VALUES (1, 'r1', 'mode', 'server', 0, 'ps')",
                    [],
                )
                .unwrap();
            }
            c.execute("INSERT INTO machines (id, name) VALUES (1, 'one')", [])
                .unwrap();
            c.execute(
                "INSERT INTO configs VALUES (1, 1, X'61', ?1, 0, 'op')",
                [sha256_hex(b"a")],
            )
            .unwrap();
            c.execute(
                "UPDATE machines SET desired_generation = 1 WHERE id = 1",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO swipes (event_id, machine_id, reader, card_masked, swiped_at_ms, received_ms, outcome, detail, updated_ms)
                 VALUES ('e1', 1, 'r1', '****1234', 0, ?1, 'busy', 'full', ?1),
                        ('e1', 1, 'r1', '****1234', 0, ?1, 'delivered', 'generic 1/r1 to x', ?1)",
                [now_ms()],
            )
            .unwrap();
        }
        assert_eq!(user_version(&p), 2);
        let s = Store::open(&p).unwrap();
        assert_eq!(user_version(&p), MIGRATIONS.len() as u32);
        let g = s.fleet().pending_generation(1).await.unwrap().unwrap();
        assert_eq!(g.content, b"a");
        // The rows of one event id (each BUSY retry made one) are now one: the newest.
        let rows = s.journal().list(10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].outcome, crate::state::JournalOutcome::Delivered);
        assert_eq!(s.journal().recent_event_ids(10, 0).unwrap().len(), 1);
        let settings = s.devices().load_all().unwrap();
        assert_eq!(settings.len(), usize::from(with_rfideas));
        drop(s);
        // And again: nothing left to migrate.
        drop(Store::open(&p).unwrap());
        assert_eq!(user_version(&p), MIGRATIONS.len() as u32);
    }
}

#[test]
fn an_older_database_loses_the_received_index() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("older.db");
    {
        let c = Connection::open(&p).unwrap();
        let before_drop = OLD_SCHEMA.split("-- No index").next().unwrap().to_string();
        c.execute_batch(&before_drop).unwrap();
        c.execute_batch(
            "CREATE INDEX swipes_received ON swipes(received_ms); PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    assert!(has_index(&p, "swipes_received"));
    drop(Store::open(&p).unwrap());
    assert!(!has_index(&p, "swipes_received"));
    assert!(has_index(&p, "swipes_event"));
    assert_eq!(user_version(&p), MIGRATIONS.len() as u32);
}

#[test]
fn a_new_database_gets_every_migration() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("new.db");
    drop(Store::open(&p).unwrap());
    assert_eq!(user_version(&p), MIGRATIONS.len() as u32);
    assert!(has_index(&p, "push_attempts_machine"));
    let tables: i64 = Connection::open(&p)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN
             ('machines', 'configs', 'push_attempts', 'audit', 'swipes', 'rfideas_settings',
              'health_probe')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 7);
}

/// Another connection (the swipe journal's) commits between the reads and the first write
/// of each store transaction that writes. A deferred transaction's snapshot is then stale
/// and SQLite answers its write with `SQLITE_BUSY_SNAPSHOT` at once, without waiting the
/// busy timeout: an operator saw `451 database is locked` for a push during a swipe flood
/// (containers test f). Every store transaction that writes takes the write lock first.
#[test]
fn a_commit_between_a_transactions_statements_never_fails_it() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("scm.db");
    let s = SqliteStore::open(&path, Duration::from_secs(5)).unwrap();
    s.run_blocking(|c| q::sync_machines(c, &[(1, "one".into(), 1), (2, "two".into(), 1)]))
        .unwrap();
    let other = Mutex::new(Connection::open(&path).unwrap());
    // Zero: while the store holds the write lock the interloper gives up at once, which
    // is the behaviour under test (the store's transaction is not disturbed).
    other
        .lock_unpoisoned()
        .busy_timeout(Duration::ZERO)
        .unwrap();
    other
        .lock_unpoisoned()
        .execute_batch("CREATE TABLE interloper (n INTEGER)")
        .unwrap();
    let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = commits.clone();
    s.run_blocking(move |c| {
        c.trace_v2(
            rusqlite::trace::TraceEventCodes::SQLITE_TRACE_STMT,
            Some(move |e: rusqlite::trace::TraceEvent<'_>| {
                let rusqlite::trace::TraceEvent::Stmt(_, sql) = e else {
                    return;
                };
                let sql = sql.trim_start();
                if sql.starts_with("INSERT") || sql.starts_with("UPDATE") {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = other
                        .lock_unpoisoned()
                        .execute("INSERT INTO interloper VALUES (1)", []);
                }
            }),
        )
    })
    .unwrap();
    s.run_blocking(|c| q::create_generation(c, 1, b"a=1\n", "op"))
        .unwrap();
    s.run_blocking(|c| q::create_generations(c, &[1, 2], b"a=2\n", "op"))
        .unwrap();
    s.run_blocking(|c| q::record_attempt_with(c, 1, 2, Outcome::Ack, "ok", true))
        .unwrap();
    s.run_blocking(|c| q::record_attempt_with(c, 2, 1, Outcome::Nack, "no", false))
        .unwrap();
    s.run_blocking(|c| q::mark_applied_by_hash(c, 2, &sha256_hex(b"a=2\n")))
        .unwrap();
    s.run_blocking(|c| q::sync_machines(c, &[(3, "three".into(), 1)]))
        .unwrap();
    // The interloper did try before each write.
    assert!(commits.load(std::sync::atomic::Ordering::SeqCst) >= 6);
}
