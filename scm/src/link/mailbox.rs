//! A link's mailbox: how the push path hands one CONFIG to the task that holds a
//! version-1 machine's link, and gets the machine's answer back (configuration over the
//! link, docs/protocol.md section 8.11).
//!
//! One slot, not a channel: deliveries to a machine are serialised by its delivery lock,
//! so at most one CONFIG is on its way per machine, and an idle link pays for a slot and
//! a `Notify` rather than for a channel's buffer (memory per idle link).

use std::sync::Mutex;

use scm_common::lock::LockExt;
use tokio::sync::{Notify, oneshot};

use super::dialect::PushResult;
use crate::state::Generation;

/// A CONFIG for the link to send, and where its outcome goes.
#[derive(Debug)]
pub(crate) struct Letter {
    /// The generation to send.
    pub(crate) generation: Generation,
    /// The request id the CONFIG carries (the machine's answer echoes it).
    pub(crate) request_id: u64,
    /// The outcome: the machine's ACK or NACK, or why there was none.
    pub(crate) reply: oneshot::Sender<PushResult>,
}

/// The slot a link reads its next CONFIG from.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    slot: Mutex<Option<Letter>>,
    notify: Notify,
}

impl Mailbox {
    /// Leaves a letter for the link; gives it back if one is already waiting.
    pub(crate) fn post(&self, letter: Letter) -> Result<(), Letter> {
        let mut slot = self.slot.lock_unpoisoned();
        if slot.is_some() {
            return Err(letter);
        }
        *slot = Some(letter);
        drop(slot);
        // A stored permit if the link is not waiting right now: it looks at the slot
        // before it waits again, so nothing is missed either way.
        self.notify.notify_one();
        Ok(())
    }

    /// The waiting letter, if any.
    pub(crate) fn take(&self) -> Option<Letter> {
        self.slot.lock_unpoisoned().take()
    }

    /// Resolves when a letter may have been posted (check with [`Mailbox::take`]).
    pub(crate) async fn posted(&self) {
        self.notify.notified().await;
    }
}

/// Sends `generation` over the link behind `mailbox` and waits up to `limit` for the
/// machine's answer. `limit` covers the link's own answer timeout plus the time to reach
/// the link task; past it (or if the link ends) the generation is unreachable, that is
/// pending: it is retried, and a repeat is harmless (generation fencing).
pub(crate) async fn deliver(
    mailbox: &Mailbox,
    generation: Generation,
    request_id: u64,
    limit: std::time::Duration,
) -> PushResult {
    let g = generation.generation;
    let (tx, rx) = oneshot::channel();
    let letter = Letter {
        generation,
        request_id,
        reply: tx,
    };
    if mailbox.post(letter).is_err() {
        return PushResult::Unreachable {
            generation: g,
            detail: "the machine's link already has a CONFIG on its way; retried later".into(),
        };
    }
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => PushResult::Unreachable {
            generation: g,
            detail:
                "the machine's link ended before it answered the CONFIG; retried at its next HELLO"
                    .into(),
        },
        Err(_) => {
            // Not sent after all if the link never took it: nothing is left behind.
            drop(mailbox.take());
            PushResult::Unreachable {
                generation: g,
                detail: format!(
                    "no answer to the CONFIG over the machine's link within {} ms; retried later",
                    limit.as_millis()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation() -> Generation {
        Generation {
            machine_id: 1,
            generation: 4,
            content: b"a=1\n".to_vec(),
            sha256: crate::state::sha256_hex(b"a=1\n"),
        }
    }

    #[tokio::test]
    async fn a_letter_reaches_the_link_and_its_answer_comes_back() {
        let m = std::sync::Arc::new(Mailbox::default());
        let link = {
            let m = m.clone();
            tokio::spawn(async move {
                m.posted().await;
                let letter = m.take().expect("a letter after the wake-up");
                assert_eq!(letter.request_id, 9);
                let _ = letter.reply.send(PushResult::Ack {
                    generation: letter.generation.generation,
                    detail: "stored".into(),
                });
            })
        };
        let r = deliver(&m, generation(), 9, std::time::Duration::from_secs(5)).await;
        assert_eq!(
            r,
            PushResult::Ack {
                generation: 4,
                detail: "stored".into()
            }
        );
        link.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn no_link_task_means_pending_and_an_empty_slot() {
        let m = Mailbox::default();
        let r = deliver(&m, generation(), 1, std::time::Duration::from_secs(2)).await;
        assert!(
            matches!(&r, PushResult::Unreachable { detail, .. } if detail.contains("within 2000 ms")),
            "{r:?}"
        );
        assert!(m.take().is_none(), "the unsent letter is taken back");
    }

    #[tokio::test]
    async fn a_second_letter_is_refused_while_one_waits_and_a_dropped_reply_is_pending() {
        let m = Mailbox::default();
        let (tx, _rx) = oneshot::channel();
        m.post(Letter {
            generation: generation(),
            request_id: 1,
            reply: tx,
        })
        .unwrap();
        let (tx2, _rx2) = oneshot::channel();
        assert!(
            m.post(Letter {
                generation: generation(),
                request_id: 2,
                reply: tx2,
            })
            .is_err()
        );
        let r = deliver(&m, generation(), 3, std::time::Duration::from_secs(1)).await;
        assert!(matches!(&r, PushResult::Unreachable { detail, .. } if detail.contains("already")));
        // The link took the letter and ended without answering.
        drop(m.take());
        let m2 = std::sync::Arc::new(Mailbox::default());
        let taker = {
            let m2 = m2.clone();
            tokio::spawn(async move {
                m2.posted().await;
                drop(m2.take());
            })
        };
        let r = deliver(&m2, generation(), 4, std::time::Duration::from_secs(5)).await;
        assert!(
            matches!(&r, PushResult::Unreachable { detail, .. } if detail.contains("ended before")),
            "{r:?}"
        );
        taker.await.unwrap();
    }
}
