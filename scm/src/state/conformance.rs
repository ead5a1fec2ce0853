//! Behaviour tests of the state traits, for any backend: each test takes a factory of
//! fresh, empty, migrated stores. A backend's tests invoke them all with
//! [`conformance_suite!`](crate::conformance_suite) and its own factory.

use std::any::Any;
use std::time::Duration;

use super::{
    Durability, JournalOp, JournalOutcome, Outcome, PendingCard, SettingChange, Store, SwipeRecord,
    now_ms, sha256_hex,
};

/// A fresh store and whatever keeps it alive (a temporary directory, a scratch schema).
pub(crate) struct Fresh {
    pub(crate) store: Store,
    pub(crate) _keep: Box<dyn Any + Send>,
}

/// Makes a fresh store.
pub(crate) type Factory = fn() -> Fresh;

/// Defines one `#[tokio::test]` per conformance test, each on stores from `$factory`.
#[macro_export]
#[doc(hidden)]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@tests $factory;
            same_content_makes_no_new_generation,
            fleet_generations_in_one_transaction,
            superseded_attempt_leaves_the_machine_alone,
            pending_until_acked_and_never_after_nack,
            pending_all_lists_undelivered_and_not_nacked,
            history_lists_generations_with_their_last_outcome,
            applied_by_hash,
            attempts_newest_first_with_limit,
            deferred_and_synced_attempts_read_the_same,
            hello_is_recorded,
            status_and_desired_details,
            audit_is_newest_first_and_limited,
            journal_insert_outcome_and_list,
            journal_keeps_one_row_per_swipe_and_retries_update_refused_ones,
            journal_recent_ids_are_bounded_and_oldest_first,
            journal_recent_ids_leave_out_refused_swipes,
            journal_retention_by_rows_and_age,
            journal_commit_now_when_idle,
            journal_queued_swipes_are_read_back_and_writing_is_never_queued_again,
            device_settings_are_stored_with_their_audit,
            health_probe_answers,
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                $crate::state::conformance::$name($factory).await;
            }
        )*
    };
}

/// A fresh store with machines 1 ("one", version 1) and 2 ("two", version 0).
fn store(new: Factory) -> Fresh {
    let f = new();
    f.store
        .fleet()
        .sync_machines(&[(1, "one".into(), 1), (2, "two".into(), 0)])
        .unwrap();
    f
}

async fn create(s: &Store, id: u16, content: &[u8], actor: &str) -> (u64, bool) {
    s.fleet()
        .create_generation(id, content.to_vec(), actor.into())
        .await
        .unwrap()
}

async fn attempt(s: &Store, id: u16, g: u64, outcome: Outcome, detail: &str) {
    s.fleet()
        .record_attempt(id, g, outcome, detail.into(), Durability::Synced)
        .await
        .unwrap()
}

pub(crate) async fn same_content_makes_no_new_generation(new: Factory) {
    let f = store(new);
    let s = &f.store;
    let (g1, new1) = create(s, 1, b"a=1\n", "op").await;
    let (g2, new2) = create(s, 1, b"a=1\n", "op").await;
    let (g3, new3) = create(s, 1, b"a=2\n", "op").await;
    assert_eq!((g1, new1, g2, new2, g3, new3), (1, true, 1, false, 2, true));
    let (g4, _) = create(s, 2, b"x", "op").await;
    assert_eq!(g4, 1, "generations count per machine");
    let g = s.fleet().get_generation(1, 2).await.unwrap().unwrap();
    assert_eq!(
        (g.content.as_slice(), g.sha256),
        (&b"a=2\n"[..], sha256_hex(b"a=2\n"))
    );
    assert_eq!(s.fleet().get_generation(1, 9).await.unwrap(), None);
}

pub(crate) async fn fleet_generations_in_one_transaction(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"same\n", "op").await;
    create(s, 2, b"old\n", "op").await;
    let gens = s
        .fleet()
        .create_generations(vec![1, 2], b"same\n".to_vec(), "op".into())
        .await
        .unwrap();
    let got: Vec<(u16, u64)> = gens.iter().map(|g| (g.machine_id, g.generation)).collect();
    assert_eq!(
        got,
        vec![(1, 1), (2, 2)],
        "same content keeps its generation"
    );
    assert!(gens.iter().all(|g| g.sha256 == sha256_hex(b"same\n")));
    let m2 = s.fleet().get_machine(2).await.unwrap().unwrap();
    assert_eq!(m2.desired_generation, 2);
    // An unknown machine fails the whole transaction: nothing is half-stored.
    assert!(
        s.fleet()
            .create_generations(vec![2, 999], b"new\n".to_vec(), "op".into())
            .await
            .is_err()
    );
    let m2 = s.fleet().get_machine(2).await.unwrap().unwrap();
    assert_eq!(m2.desired_generation, 2, "rolled back");
}

pub(crate) async fn superseded_attempt_leaves_the_machine_alone(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"a\n", "op").await;
    create(s, 1, b"b\n", "op").await;
    attempt(s, 1, 1, Outcome::Superseded, "newer").await;
    let m = s.fleet().get_machine(1).await.unwrap().unwrap();
    assert_eq!((m.desired_generation, m.applied_generation), (2, 0));
    assert_eq!(m.last_error, None);
    let p = s.fleet().pending_generation(1).await.unwrap();
    assert_eq!(p.map(|g| g.generation), Some(2));
}

pub(crate) async fn pending_until_acked_and_never_after_nack(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"a", "op").await;
    let p = s.fleet().pending_generation(1).await.unwrap().unwrap();
    assert_eq!((p.generation, p.content.as_slice()), (1, &b"a"[..]));
    attempt(s, 1, 1, Outcome::Unreachable, "refused").await;
    assert!(s.fleet().pending_generation(1).await.unwrap().is_some());
    attempt(s, 1, 1, Outcome::Ack, "ok").await;
    assert!(s.fleet().pending_generation(1).await.unwrap().is_none());
    let m = s.fleet().get_machine(1).await.unwrap().unwrap();
    assert_eq!(
        (m.desired_generation, m.applied_generation, m.last_error),
        (1, 1, None)
    );

    create(s, 1, b"b", "op").await;
    attempt(s, 1, 2, Outcome::Nack, "bad key").await;
    assert!(s.fleet().pending_generation(1).await.unwrap().is_none());
    let m = s.fleet().get_machine(1).await.unwrap().unwrap();
    assert!(m.last_error.unwrap().contains("bad key"));
    assert_eq!(s.fleet().pending_generation(99).await.unwrap(), None);
}

pub(crate) async fn pending_all_lists_undelivered_and_not_nacked(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"a", "op").await;
    create(s, 2, b"b", "op").await;
    assert_eq!(s.fleet().pending_all().await.unwrap(), vec![(1, 1), (2, 1)]);
    attempt(s, 1, 1, Outcome::Ack, "ok").await;
    attempt(s, 2, 1, Outcome::Nack, "no").await;
    assert!(s.fleet().pending_all().await.unwrap().is_empty());
    create(s, 2, b"c", "op").await;
    assert_eq!(s.fleet().pending_all().await.unwrap(), vec![(2, 2)]);
}

pub(crate) async fn history_lists_generations_with_their_last_outcome(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"one", "alice").await;
    attempt(s, 1, 1, Outcome::Unreachable, "x").await;
    attempt(s, 1, 1, Outcome::Ack, "ok").await;
    create(s, 1, b"two!", "bob").await;
    let h = s.fleet().history(1, 10).await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (h[0].generation, h[0].len, h[0].created_by.as_str()),
        (2, 4, "bob")
    );
    assert_eq!(h[0].last_outcome, None);
    assert_eq!(h[1].last_outcome.as_deref(), Some("ack"));
    assert_eq!(h[1].sha256, sha256_hex(b"one"));
    assert_eq!(s.fleet().history(1, 1).await.unwrap().len(), 1, "limit");
}

pub(crate) async fn applied_by_hash(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"a", "op").await;
    let g = s
        .fleet()
        .mark_applied_by_hash(1, sha256_hex(b"a"))
        .await
        .unwrap();
    assert_eq!(g, Some(1));
    assert_eq!(
        s.fleet()
            .mark_applied_by_hash(1, sha256_hex(b"zz"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.fleet()
            .get_machine(1)
            .await
            .unwrap()
            .unwrap()
            .applied_generation,
        1
    );
}

pub(crate) async fn attempts_newest_first_with_limit(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"a", "op").await;
    attempt(s, 1, 1, Outcome::Unreachable, "first").await;
    attempt(s, 1, 1, Outcome::Nack, "second").await;
    attempt(s, 1, 1, Outcome::Ack, "third").await;
    let a = s.fleet().attempts(1, 2).await.unwrap();
    let got: Vec<(u64, &str, &str)> = a
        .iter()
        .map(|(g, _, o, d)| (*g, o.as_str(), d.as_str()))
        .collect();
    assert_eq!(got, vec![(1, "ack", "third"), (1, "nack", "second")]);
    assert!(s.fleet().attempts(2, 10).await.unwrap().is_empty());
}

pub(crate) async fn deferred_and_synced_attempts_read_the_same(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"a", "op").await;
    create(s, 2, b"b", "op").await;
    s.fleet()
        .record_attempt(1, 1, Outcome::Ack, "ok".into(), Durability::Deferred)
        .await
        .unwrap();
    s.fleet()
        .record_attempt(2, 1, Outcome::Nack, "no".into(), Durability::Synced)
        .await
        .unwrap();
    // Visible at once, durable after sync.
    let m1 = s.fleet().get_machine(1).await.unwrap().unwrap();
    assert_eq!(m1.applied_generation, 1);
    s.fleet().sync().await.unwrap();
    assert!(s.fleet().pending_all().await.unwrap().is_empty());
    let m2 = s.fleet().get_machine(2).await.unwrap().unwrap();
    assert!(m2.last_error.unwrap().contains("nack (no)"));
}

pub(crate) async fn hello_is_recorded(new: Factory) {
    let f = store(new);
    let s = &f.store;
    let before = now_ms();
    s.fleet()
        .record_hello(1, "127.0.0.1:5000".into())
        .await
        .unwrap();
    let m = s.fleet().get_machine(1).await.unwrap().unwrap();
    assert_eq!(m.last_peer.as_deref(), Some("127.0.0.1:5000"));
    assert!(m.last_hello_ms.unwrap() >= before);
    // Other writes after a HELLO are unaffected.
    create(s, 1, b"a", "op").await;
    assert_eq!(s.fleet().list_machines().await.unwrap().len(), 2);
}

pub(crate) async fn status_and_desired_details(new: Factory) {
    let f = store(new);
    let s = &f.store;
    create(s, 1, b"a", "op").await;
    attempt(s, 1, 1, Outcome::Unreachable, "x").await;
    let (m, a) = s.fleet().machine_status(1, 5).await.unwrap();
    assert_eq!(m.unwrap().name, "one");
    assert_eq!(a.len(), 1);
    let (none, a) = s.fleet().machine_status(9, 5).await.unwrap();
    assert!(none.is_none() && a.is_empty());
    let (rows, desired) = s.fleet().machines_with_desired(None).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(desired[&1].sha256, Some(sha256_hex(b"a")));
    assert_eq!(desired[&1].attempts, 1);
    assert_eq!(desired[&2].sha256, None);
    let (rows, desired) = s.fleet().machines_with_desired(Some(2)).await.unwrap();
    assert_eq!((rows.len(), desired.len()), (1, 1));
}

pub(crate) async fn audit_is_newest_first_and_limited(new: Factory) {
    let f = store(new);
    let s = &f.store;
    for i in 0..5 {
        s.audit()
            .append("op".into(), "127.0.0.1:1".into(), "push", format!("n{i}"))
            .await
            .unwrap();
    }
    let a = s.audit().list(3).await.unwrap();
    let details: Vec<&str> = a.iter().map(|r| r.detail.as_str()).collect();
    assert_eq!(details, vec!["n4", "n3", "n2"]);
    assert!(a.iter().all(|r| r.action == "push" && r.actor == "op"));
    assert!(a.windows(2).all(|w| w[0].at_ms >= w[1].at_ms));
}

fn record(id: &str, outcome: JournalOutcome) -> SwipeRecord {
    SwipeRecord {
        event_id: id.into(),
        machine: 1,
        reader: "r1".into(),
        card_masked: "****1234".into(),
        swiped_at_ms: 0,
        outcome,
        detail: "queued for generic 1/r1".into(),
        deadline_ms: None,
        card: None,
    }
}

fn outcome(id: &str, outcome: JournalOutcome, detail: &str) -> JournalOp {
    JournalOp::Outcome {
        event_id: id.into(),
        outcome,
        detail: detail.into(),
    }
}

pub(crate) async fn journal_insert_outcome_and_list(new: Factory) {
    let f = new();
    let j = f.store.journal().clone();
    j.write_batch(&[
        JournalOp::Insert(record("e1", JournalOutcome::Queued), None),
        JournalOp::Insert(record("e2", JournalOutcome::Queued), None),
        outcome("e1", JournalOutcome::Expired, "g"),
    ])
    .unwrap();
    j.write_batch(&[
        outcome("e1", JournalOutcome::Delivered, "rf"),
        outcome("e2", JournalOutcome::Failed, "rf"),
        outcome("e2", JournalOutcome::Expired, "g"),
    ])
    .unwrap();
    let rows = j.list(10).await.unwrap();
    let got: Vec<(&str, JournalOutcome, &str)> = rows
        .iter()
        .map(|r| (r.event_id.as_str(), r.outcome, r.detail.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("e2", JournalOutcome::Failed, "rf; g"),
            ("e1", JournalOutcome::Delivered, "g; rf"),
        ]
    );
    assert_eq!(rows[0].card_masked, "****1234");
    assert_eq!(j.list(1).await.unwrap().len(), 1, "limit");
    // An outcome for an unknown event changes nothing.
    j.write_batch(&[outcome("nope", JournalOutcome::Busy, "x")])
        .unwrap();
    assert_eq!(j.list(10).await.unwrap().len(), 2);
}

fn record_of(id: &str, machine: u16, outcome: JournalOutcome, detail: &str) -> JournalOp {
    JournalOp::Insert(
        SwipeRecord {
            machine,
            detail: detail.into(),
            ..record(id, outcome)
        },
        None,
    )
}

pub(crate) async fn journal_keeps_one_row_per_swipe_and_retries_update_refused_ones(new: Factory) {
    use JournalOutcome::*;
    let f = new();
    let j = f.store.journal().clone();
    // (batch of records: machine, state, detail; then the row of e1: state, detail)
    type Records<'a> = &'a [(u16, JournalOutcome, &'a str)];
    let table: &[(Records<'_>, (JournalOutcome, &str))] = &[
        // Refused, retried, refused again: one row, the latest refusal.
        (
            &[(1, Busy, "full 1"), (1, Busy, "full 2")],
            (Busy, "full 2"),
        ),
        // Taken at last: the same row says queued.
        (&[(1, Queued, "queued")], (Queued, "queued")),
        // A queued row is never replaced: not by a refusal, not by another queueing.
        (
            &[(1, Busy, "late"), (1, Queued, "again")],
            (Queued, "queued"),
        ),
    ];
    for (records, (outcome, detail)) in table {
        let batch: Vec<JournalOp> = records
            .iter()
            .map(|(m, o, d)| record_of("e1", *m, *o, d))
            .collect();
        j.write_batch(&batch).unwrap();
        let rows = j.list(10).await.unwrap();
        assert_eq!(rows.len(), 1, "{records:?}: {rows:?}");
        assert_eq!(
            (rows[0].outcome, rows[0].detail.as_str()),
            (*outcome, *detail)
        );
    }
    // Another machine's refused swipe with the same event id does not touch the row of
    // machine 1's.
    j.write_batch(&[
        record_of("e2", 1, Busy, "machine 1"),
        record_of("e2", 2, Queued, "machine 2"),
    ])
    .unwrap();
    let rows = j.list(10).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].event_id.as_str(), rows[0].machine, rows[0].outcome),
        ("e2", 1, Busy)
    );
    // A BUSY refusal after the row said queued (another link filled the device).
    j.write_batch(&[outcome("e1", Busy, "full")]).unwrap();
    let rows = j.list(10).await.unwrap();
    assert_eq!((rows[1].outcome, rows[1].detail.as_str()), (Busy, "full"));
}

pub(crate) async fn journal_recent_ids_leave_out_refused_swipes(new: Factory) {
    use JournalOutcome::*;
    let f = new();
    let j = f.store.journal().clone();
    let batch: Vec<JournalOp> = [Queued, Busy, Delivered, Rejected, Expired, Failed, NoRoute]
        .iter()
        .enumerate()
        .map(|(i, o)| record_of(&format!("e{i}-{o}"), 1, *o, ""))
        .collect();
    j.write_batch(&batch).unwrap();
    let recent = j.recent_event_ids(100, 0).unwrap();
    let ids: Vec<&str> = recent.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "e0-queued",
            "e2-delivered",
            "e4-expired",
            "e5-failed",
            "e6-no_route"
        ]
    );
}

pub(crate) async fn journal_retention_by_rows_and_age(new: Factory) {
    let f = new();
    let j = f.store.journal().clone();
    let batch: Vec<JournalOp> = (0..10)
        .map(|i| JournalOp::Insert(record(&format!("e{i}"), JournalOutcome::Delivered), None))
        .collect();
    j.write_batch(&batch).unwrap();
    // Nothing is old enough and the rows are within the bound.
    assert_eq!(j.prune(10, 0, 100).await.unwrap(), 0);
    // Rows: keep the newest 7, at most 2 deleted per call.
    assert_eq!(j.prune(7, 0, 2).await.unwrap(), 2);
    assert_eq!(j.prune(7, 0, 2).await.unwrap(), 1);
    assert_eq!(j.prune(7, 0, 2).await.unwrap(), 0);
    let ids: Vec<String> = j
        .list(100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(ids, ["e9", "e8", "e7", "e6", "e5", "e4", "e3"]);
    // Age: everything was received before a time in the future.
    assert_eq!(j.prune(100, now_ms() + 60_000, 100).await.unwrap(), 7);
    assert!(j.list(100).await.unwrap().is_empty());
}

pub(crate) async fn journal_recent_ids_are_bounded_and_oldest_first(new: Factory) {
    let f = new();
    let j = f.store.journal().clone();
    let batch: Vec<JournalOp> = (0..5)
        .map(|i| JournalOp::Insert(record(&format!("e{i}"), JournalOutcome::NoRoute), None))
        .collect();
    j.write_batch(&batch).unwrap();
    let recent = j.recent_event_ids(3, 0).unwrap();
    let ids: Vec<&str> = recent.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, vec!["e2", "e3", "e4"]);
    assert!(
        j.recent_event_ids(10, now_ms() + 60_000)
            .unwrap()
            .is_empty()
    );
    j.checkpoint().await.unwrap();
}

pub(crate) async fn journal_commit_now_when_idle(new: Factory) {
    let f = new();
    let j = f.store.journal().clone();
    assert!(!j.store_busy());
    assert!(!j.yield_to_store(Duration::from_millis(10)));
    let back = j
        .commit_now(record("fast", JournalOutcome::NoRoute))
        .unwrap();
    assert!(back.is_none(), "committed");
    let rows = j.list(10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].event_id.as_str(), rows[0].outcome),
        ("fast", JournalOutcome::NoRoute)
    );
}

pub(crate) async fn device_settings_are_stored_with_their_audit(new: Factory) {
    let f = new();
    let d = f.store.devices().clone();
    assert!(d.load_all().unwrap().is_empty());
    let change = |name: &str, value: &str| SettingChange {
        name: name.into(),
        value: value.into(),
        audit_detail: format!("{name} set to {value}"),
    };
    d.store(
        1,
        "r1".into(),
        vec![change("a", "1"), change("b", "2")],
        now_ms(),
        "print-server 10.0.0.1".into(),
        "10.0.0.1:4000".into(),
        "rfideas_config",
    )
    .await
    .unwrap();
    d.store(
        1,
        "r1".into(),
        vec![change("a", "3")],
        now_ms(),
        "print-server 10.0.0.1".into(),
        "10.0.0.1:4000".into(),
        "rfideas_config",
    )
    .await
    .unwrap();
    let mut all: Vec<(u16, String, String, String)> = d
        .load_all()
        .unwrap()
        .into_iter()
        .map(|s| (s.machine, s.reader, s.name, s.value))
        .collect();
    all.sort();
    assert_eq!(
        all,
        vec![
            (1, "r1".into(), "a".into(), "3".into()),
            (1, "r1".into(), "b".into(), "2".into()),
        ]
    );
    let audit = f.store.audit().list(10).await.unwrap();
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[0].detail, "a set to 3");
    assert!(audit.iter().all(|a| a.action == "rfideas_config"));
}

pub(crate) async fn health_probe_answers(new: Factory) {
    let f = new();
    f.store.health().probe().await.unwrap();
    f.store.health().write_probe().await.unwrap();
    f.store.health().write_probe().await.unwrap();
}

pub(crate) async fn journal_queued_swipes_are_read_back_and_writing_is_never_queued_again(
    new: Factory,
) {
    use JournalOutcome::*;
    let f = new();
    let j = f.store.journal().clone();
    let queued = |id: &str, card: &str| {
        JournalOp::Insert(
            SwipeRecord {
                deadline_ms: Some(1_000 + id.len() as i64),
                card: Some(PendingCard(card.into())),
                ..record(id, Queued)
            },
            None,
        )
    };
    j.write_batch(&[
        queued("q1", "11111111"),
        queued("q22", "22222222"),
        queued("q333", "33333333"),
        JournalOp::Insert(record("d", Delivered), None),
        // A busy row keeps no card; its retry, taken, does.
        JournalOp::Insert(
            SwipeRecord {
                card: Some(PendingCard("44444444".into())),
                ..record("b", Busy)
            },
            None,
        ),
    ])
    .unwrap();
    j.write_batch(&[queued("b", "44444444")]).unwrap();
    // q22 is being written; q333 was delivered; a writing mark on it changes nothing.
    j.write_batch(&[
        JournalOp::Writing(vec!["q22".into()], None),
        outcome("q333", Delivered, "generic 1/r1 to 127.0.0.1:1"),
        JournalOp::Writing(vec!["q333".into()], None),
    ])
    .unwrap();
    let p = j.pending_swipes(0).unwrap();
    let got: Vec<_> = p
        .iter()
        .map(|p| {
            (
                p.event_id.as_str(),
                p.outcome,
                p.deadline_ms,
                p.card.as_ref().map(|c| c.0.as_str()),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("q1", Queued, Some(1_002), Some("11111111")),
            ("q22", Writing, Some(1_003), None),
            ("b", Queued, Some(1_001), Some("44444444")),
        ]
    );
    assert_eq!(p[0].card_masked, "****1234");
    assert!(
        format!("{:?}", p[0]).contains("****1111"),
        "masked in Debug"
    );
    assert!(!format!("{:?}", p[0]).contains("11111111"));
    // Outcomes end them (and clear the card); a writing row ends like a queued one.
    j.write_batch(&[
        outcome("q1", Expired, "deadline"),
        outcome("q22", Uncertain, "restart"),
        outcome("b", Delivered, "g"),
    ])
    .unwrap();
    assert!(j.pending_swipes(0).unwrap().is_empty());
    let rows = j.list(10).await.unwrap();
    let q22 = rows.iter().find(|r| r.event_id == "q22").unwrap();
    assert_eq!((q22.outcome, q22.detail.as_str()), (Uncertain, "restart"));
    // The horizon: rows received before it are not read back.
    j.write_batch(&[queued("late", "55555555")]).unwrap();
    assert!(j.pending_swipes(now_ms() + 60_000).unwrap().is_empty());
    assert_eq!(j.pending_swipes(0).unwrap().len(), 1);
    // Writing and uncertain rows stay de-duplicated.
    let ids: Vec<String> = j
        .recent_event_ids(100, 0)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(ids.contains(&"q22".to_string()), "{ids:?}");
}
