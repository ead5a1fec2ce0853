//! In-process tests of the whole hub ([`super::testkit`]): push, retry and agent-link rules
//! against the real front end, link and agents, without spawning binaries.

use super::testkit::TestScm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_linked_machine_is_acked_and_stored_by_its_agent() {
    let mut scm = TestScm::start(&[1], |_| {}).await;
    scm.start_agent(1).await;
    scm.wait_linked(1).await;
    let mut op = scm.operator().await;
    let r = op.push("1", "volume=3\nmode=quiet").await;
    assert!(r.starts_with("250 ACK machine 1 generation 1"), "{r}");
    let stored = std::fs::read_to_string(scm.agent_config_file(1)).expect("agent stored it");
    assert_eq!(stored, "volume=3\nmode=quiet\n");
    let status = op.command("status 1").await;
    assert!(status.contains("generation 1"), "{status}");
    scm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_machine_without_agent_is_pending_and_delivered_at_its_hello() {
    let mut scm = TestScm::start(&[2], |_| {}).await;
    let mut op = scm.operator().await;
    let r = op.push("2", "a=1").await;
    assert!(
        r.starts_with("450 machine 2 unreachable; generation 1 pending"),
        "{r}"
    );
    // The agent's HELLO triggers the delivery of what is pending.
    scm.start_agent(2).await;
    scm.wait_linked(2).await;
    let file = scm.agent_config_file(2);
    scm.wait_until(
        || std::fs::read_to_string(&file).is_ok_and(|s| s == "a=1\n"),
        "the pending generation on the agent's disk",
    )
    .await;
    scm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_push_supersedes_and_the_agent_ends_on_the_newest() {
    let mut scm = TestScm::start(&[3], |_| {}).await;
    let mut op = scm.operator().await;
    assert!(op.push("3", "g=1").await.starts_with("450 "));
    assert!(op.push("3", "g=2").await.starts_with("450 "));
    scm.start_agent(3).await;
    scm.wait_linked(3).await;
    let file = scm.agent_config_file(3);
    scm.wait_until(
        || std::fs::read_to_string(&file).is_ok_and(|s| s == "g=2\n"),
        "generation 2 on the agent's disk",
    )
    .await;
    let history = op.command("history 3").await;
    assert!(history.contains('2'), "{history}");
    scm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_ends_when_its_agent_stops_and_comes_back_with_it() {
    let mut scm = TestScm::start(&[4], |_| {}).await;
    scm.start_agent(4).await;
    scm.wait_linked(4).await;
    let first = scm.ops.sessions.session(4).expect("linked").link_id;
    scm.stop_agent(4).await;
    scm.wait_unlinked(4).await;
    scm.start_agent(4).await;
    scm.wait_linked(4).await;
    let second = scm.ops.sessions.session(4).expect("linked again").link_id;
    assert_ne!(first, second, "a new link, not the old one");
    scm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_operator_is_refused_a_push() {
    let scm = TestScm::start(&[5], |cfg| {
        for o in &mut cfg.operators {
            o.role = crate::ops::auth::OperatorRole::ReadOnly;
        }
    })
    .await;
    let mut op = scm.operator().await;
    let r = op.command("push 5").await;
    assert!(r.starts_with("5"), "refused: {r}");
    let machines = op.command("machines").await;
    assert!(machines.starts_with("250"), "{machines}");
    scm.stop().await;
}
