//! The SQL of each store operation, one function per operation, on a connection the
//! caller holds (the store's, or the swipe journal's).

use rusqlite::{Connection, OptionalExtension, params};

use crate::state::{
    AttemptRow, AuditRow, DesiredRow, DeviceSetting, Generation, HistoryRow, JournalOp,
    JournalOutcome, MachineRow, Outcome, PendingCard, PendingSwipe, SettingChange, SwipeRow,
    now_ms, sha256_hex,
};

/// Begins a transaction that will write, holding SQLite's write lock from its first
/// statement. A deferred one reads a snapshot first; if another connection (the swipe
/// journal's) commits before its first write, the snapshot is stale and SQLite fails the
/// write with `SQLITE_BUSY_SNAPSHOT` at once, without the busy timeout's wait.
fn write_tx(c: &mut Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

/// Inserts or updates the configured machines (name and protocol version).
pub(super) fn sync_machines(
    c: &mut Connection,
    machines: &[(u16, String, u8)],
) -> rusqlite::Result<()> {
    let tx = write_tx(c)?;
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
pub(super) fn list_machines(c: &mut Connection) -> rusqlite::Result<Vec<MachineRow>> {
    let mut st = c.prepare(&format!("SELECT {MACHINE_COLS} FROM machines ORDER BY id"))?;
    let rows = st.query_map([], machine_from_row)?;
    rows.collect()
}

/// One machine.
pub(super) fn get_machine(c: &mut Connection, id: u16) -> rusqlite::Result<Option<MachineRow>> {
    c.query_row(
        &format!("SELECT {MACHINE_COLS} FROM machines WHERE id = ?1"),
        [id],
        machine_from_row,
    )
    .optional()
}

/// Records a HELLO: the peer address and time.
pub(super) fn record_hello(c: &mut Connection, id: u16, peer: &str) -> rusqlite::Result<()> {
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
pub(super) fn create_generation(
    c: &mut Connection,
    id: u16,
    content: &[u8],
    actor: &str,
) -> rusqlite::Result<(u64, bool)> {
    let sha = sha256_hex(content);
    let tx = write_tx(c)?;
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
pub(super) fn create_generations(
    c: &mut Connection,
    ids: &[u16],
    content: &[u8],
    actor: &str,
) -> rusqlite::Result<Vec<Generation>> {
    let sha = sha256_hex(content);
    let now = now_ms();
    let tx = write_tx(c)?;
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
pub(super) fn get_generation(
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
pub(super) fn pending_generation(
    c: &mut Connection,
    id: u16,
) -> rusqlite::Result<Option<Generation>> {
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

/// A machine's generations, newest first.
pub(super) fn history(
    c: &mut Connection,
    id: u16,
    limit: u32,
) -> rusqlite::Result<Vec<HistoryRow>> {
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
pub(super) fn pending_all(c: &mut Connection) -> rusqlite::Result<Vec<(u16, u64)>> {
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

/// Records the outcome of a delivery attempt and updates the machine's summary; with
/// `durable` false the commit does not wait for the disk (WAL,
/// synchronous=NORMAL) and the caller must call [`sync`] before it reports the outcome
/// as stored (a fleet push: one fsync for all its machines instead of one each).
pub(super) fn record_attempt_with(
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
pub(super) fn sync(c: &mut Connection) -> rusqlite::Result<()> {
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
    let tx = write_tx(c)?;
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
pub(super) fn mark_applied_by_hash(
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
pub(super) fn attempts(
    c: &mut Connection,
    id: u16,
    limit: u32,
) -> rusqlite::Result<Vec<AttemptRow>> {
    let mut st = c.prepare(
        "SELECT generation, at_ms, outcome, detail FROM push_attempts WHERE machine_id = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = st.query_map(params![id, limit], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    rows.collect()
}

/// Appends to the audit log.
pub(super) fn audit(
    c: &Connection,
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
pub(super) fn list_audit(c: &mut Connection, limit: u32) -> rusqlite::Result<Vec<AuditRow>> {
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

/// Machines (one, or all) with their desired generation's hash and attempt count.
pub(super) fn desired_details(
    c: &mut Connection,
    only: Option<u16>,
) -> rusqlite::Result<std::collections::HashMap<u16, DesiredRow>> {
    let mut st = c.prepare(
        "SELECT m.id,
                (SELECT g.sha256 FROM configs g
                  WHERE g.machine_id = m.id AND g.generation = m.desired_generation),
                (SELECT COUNT(*) FROM push_attempts p
                  WHERE p.machine_id = m.id AND p.generation = m.desired_generation)
         FROM machines m WHERE ?1 IS NULL OR m.id = ?1",
    )?;
    let rows = st.query_map([only], |r| {
        Ok((
            r.get::<_, u16>(0)?,
            DesiredRow {
                sha256: r.get(1)?,
                attempts: r.get::<_, i64>(2)?.clamp(0, i64::from(u32::MAX)) as u32,
            },
        ))
    })?;
    rows.collect()
}

/// Every 241 device's stored settings.
pub(super) fn device_settings(c: &mut Connection) -> rusqlite::Result<Vec<DeviceSetting>> {
    let mut st = c.prepare("SELECT machine_id, reader, name, value FROM rfideas_settings")?;
    let rows = st.query_map([], |r| {
        Ok(DeviceSetting {
            machine: r.get(0)?,
            reader: r.get(1)?,
            name: r.get(2)?,
            value: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Stores one device's settings and their audit records in one transaction.
#[allow(clippy::too_many_arguments)]
pub(super) fn store_device_settings(
    c: &mut Connection,
    machine: u16,
    reader: &str,
    changes: &[SettingChange],
    now: i64,
    actor: &str,
    source: &str,
    action: &str,
) -> rusqlite::Result<()> {
    // IMMEDIATE: the write lock from the start, so the transaction cannot fail half-way
    // on a lock another connection took after its first read.
    let tx = write_tx(c)?;
    for ch in changes {
        tx.execute(
            "INSERT INTO rfideas_settings (machine_id, reader, name, value, updated_ms, updated_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (machine_id, reader, name) DO UPDATE SET value = ?4, updated_ms = ?5, updated_by = ?6",
            params![machine, reader, ch.name, ch.value, now, actor],
        )?;
        audit(&tx, actor, source, action, &ch.audit_detail)?;
    }
    tx.commit()
}

/// Writes `batch` of swipe journal operations in one transaction.
pub(super) fn write_journal_batch(
    conn: &mut Connection,
    batch: &[JournalOp],
) -> rusqlite::Result<()> {
    let tx = write_tx(conn)?;
    let now = now_ms();
    for op in batch {
        match op {
            JournalOp::Insert(r, _) => {
                // Cached statements: parsing the SQL anew for every swipe took
                // ~5% of the SCM's CPU at full swipe load (perf, docs/benchmarks.md).
                // One row per event id: the agent's retry of a refused swipe updates its
                // row (same machine only: another machine's agent cannot overwrite it); a
                // row in any other state is never replaced.
                tx.prepare_cached(
                    "INSERT INTO swipes (event_id, machine_id, reader, card_masked, swiped_at_ms, received_ms, outcome, detail, updated_ms, deadline_ms, card)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?6, ?9, ?10)
                     ON CONFLICT (event_id) DO UPDATE SET
                        outcome = excluded.outcome,
                        detail = excluded.detail,
                        updated_ms = excluded.updated_ms,
                        deadline_ms = excluded.deadline_ms,
                        card = excluded.card,
                        attempts = attempts + 1
                     WHERE swipes.outcome IN ('busy', 'rejected')
                       AND swipes.machine_id = excluded.machine_id",
                )?
                .execute(params![
                    r.event_id,
                    r.machine,
                    r.reader,
                    r.card_masked,
                    r.swiped_at_ms,
                    now,
                    r.outcome.as_str(),
                    r.detail,
                    r.deadline_ms,
                    // The card in clear only while the row says queued.
                    r.card
                        .as_ref()
                        .filter(|_| r.outcome == JournalOutcome::Queued)
                        .map(|c| c.0.as_str()),
                ])?;
            }
            JournalOp::Outcome {
                event_id,
                outcome,
                detail,
            } => {
                // A swipe sent to two bridges (Generic and 241) gets two outcomes:
                // `delivered` wins over `failed`, which wins over the rest; the
                // second detail is appended. Every outcome clears the card.
                tx.prepare_cached(
                    "UPDATE swipes SET
                        outcome = CASE
                            WHEN outcome = 'delivered' THEN outcome
                            WHEN outcome = 'failed' AND ?2 <> 'delivered' THEN outcome
                            ELSE ?2 END,
                        detail = CASE WHEN outcome IN ('queued', 'writing') THEN ?3 ELSE detail || '; ' || ?3 END,
                        updated_ms = ?4,
                        card = NULL
                     WHERE event_id = ?1",
                )?
                .execute(params![event_id, outcome.as_str(), detail, now])?;
            }
            JournalOp::Writing(event_ids, _) => {
                // Only a queued row: one a restart found writing (uncertain) or that
                // has an outcome is left as it is.
                let mut st = tx.prepare_cached(
                    "UPDATE swipes SET outcome = 'writing', card = NULL, updated_ms = ?2
                     WHERE event_id = ?1 AND outcome = 'queued'",
                )?;
                for id in event_ids {
                    st.execute(params![id, now])?;
                }
            }
        }
    }
    tx.commit()
}

/// Event ids and received times of the newest journal records that were not refused,
/// oldest first.
pub(super) fn recent_event_ids(
    conn: &mut Connection,
    limit: usize,
    since_ms: i64,
) -> rusqlite::Result<Vec<(String, i64)>> {
    // The newest rows by id, back to the horizon (rows are appended as swipes
    // arrive), and at most as many as the de-duplication set keeps. A refused swipe
    // reached no bridge: its retry must be taken.
    let mut st = conn
        .prepare("SELECT event_id, received_ms, outcome FROM swipes ORDER BY id DESC LIMIT ?1")?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = st.query([limit])?;
    let mut recent = Vec::new();
    while let Some(r) = rows.next()? {
        let at: i64 = r.get(1)?;
        if at < since_ms {
            break;
        }
        let outcome: String = r.get(2)?;
        if JournalOutcome::parse(&outcome).is_some_and(JournalOutcome::refused) {
            continue;
        }
        recent.push((r.get::<_, String>(0)?, at));
    }
    recent.reverse();
    Ok(recent)
}

/// The journal rows that say `queued` or `writing`, received since `since_ms`, oldest
/// first. Rows are appended as swipes arrive: the newest by id, back to the horizon.
pub(super) fn pending_swipes(
    conn: &mut Connection,
    since_ms: i64,
) -> rusqlite::Result<Vec<PendingSwipe>> {
    let mut st = conn.prepare(
        "SELECT event_id, machine_id, reader, card_masked, outcome, deadline_ms, card, detail, received_ms
         FROM swipes ORDER BY id DESC",
    )?;
    let mut rows = st.query([])?;
    let mut pending = Vec::new();
    while let Some(r) = rows.next()? {
        let at: i64 = r.get(8)?;
        if at < since_ms {
            break;
        }
        let outcome = match JournalOutcome::parse(&r.get::<_, String>(4)?) {
            Some(o @ (JournalOutcome::Queued | JournalOutcome::Writing)) => o,
            _ => continue,
        };
        pending.push(PendingSwipe {
            event_id: r.get(0)?,
            machine: r.get(1)?,
            reader: r.get(2)?,
            card_masked: r.get(3)?,
            outcome,
            deadline_ms: r.get(5)?,
            card: r.get::<_, Option<String>>(6)?.map(PendingCard),
            detail: r.get(7)?,
        });
    }
    pending.reverse();
    Ok(pending)
}

/// Retention: deletes, among the oldest `chunk` rows, those beyond the newest `max_rows`
/// and those received before `before_ms`. Rows are appended in the order swipes arrive,
/// so the oldest come first by id; looking at a bounded prefix keeps each call short
/// (no index on `received_ms`, see migration 0002).
pub(super) fn prune_swipes(
    conn: &mut Connection,
    max_rows: u64,
    before_ms: i64,
    chunk: u32,
) -> rusqlite::Result<u64> {
    let tx = write_tx(conn)?;
    let max_rows = i64::try_from(max_rows).unwrap_or(i64::MAX);
    let n = tx.execute(
        "DELETE FROM swipes WHERE id IN (
            SELECT id FROM (SELECT id, received_ms FROM swipes ORDER BY id LIMIT ?3)
            WHERE received_ms < ?1 OR id <= (SELECT MAX(id) FROM swipes) - ?2)",
        params![before_ms, max_rows, chunk],
    )?;
    tx.commit()?;
    Ok(n as u64)
}

/// The newest swipes, newest first.
pub(super) fn list_swipes(c: &mut Connection, limit: u32) -> rusqlite::Result<Vec<SwipeRow>> {
    let mut st = c.prepare(
        "SELECT received_ms, machine_id, reader, card_masked, outcome, detail, event_id FROM swipes ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = st.query_map([limit], |r| {
        let outcome: String = r.get(4)?;
        Ok(SwipeRow {
            received_ms: r.get(0)?,
            machine: r.get(1)?,
            reader: r.get(2)?,
            card_masked: r.get(3)?,
            outcome: JournalOutcome::parse(&outcome).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    4,
                    rusqlite::types::Type::Text,
                    format!("unknown swipe outcome {outcome:?}").into(),
                )
            })?,
            detail: r.get(5)?,
            event_id: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// Rewrites the health probe's row: one small write, committed without waiting for the
/// disk (like a HELLO's), so that a scrape never holds the store behind an fsync.
pub(super) fn write_probe(c: &mut Connection) -> rusqlite::Result<()> {
    c.pragma_update(None, "synchronous", "NORMAL")?;
    let r = c.execute(
        "INSERT INTO health_probe (id, written_ms) VALUES (1, ?1)
         ON CONFLICT(id) DO UPDATE SET written_ms = excluded.written_ms",
        [now_ms()],
    );
    c.pragma_update(None, "synchronous", "FULL")?;
    r.map(|_| ())
}
