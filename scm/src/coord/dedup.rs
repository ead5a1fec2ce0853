//! Swipe de-duplication: the event ids of recent card swipes, so that a swipe an agent
//! sends again (it did not see the ACK, or the SCM restarted) is answered without being
//! forwarded twice. Each id is remembered until its time comes, and at most a bounded
//! number of ids are kept (the oldest are forgotten first).
//!
//! [`Dedup`] is the interface the swipe path uses; [`LocalDedup`] is today's in-process
//! set, loaded back from the swipe journal at start. A shared implementation would let an
//! agent's repeat reach any SCM and still be recognised.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use scm_common::lock::LockExt;

/// Remembers recent event ids.
pub(crate) trait Dedup: Send + Sync + std::fmt::Debug {
    /// Remembers `id` until `forget_at_ms` (Unix ms); false if it was already there.
    /// `now_ms` is the current time, which forgets the ids whose time has come.
    fn insert(&self, id: &str, forget_at_ms: i64, now_ms: i64) -> bool;
    /// Forgets `id` (its swipe was refused after all, so a repeat must be taken).
    fn remove(&self, id: &str);
    /// How many ids are remembered.
    fn remembered(&self) -> usize;
}

/// The in-process set, holding at most `max` ids.
#[derive(Debug)]
pub(crate) struct LocalDedup {
    max: usize,
    seen: Mutex<Seen>,
}

impl LocalDedup {
    /// An empty set keeping at most `max` ids.
    pub(crate) fn new(max: usize) -> LocalDedup {
        LocalDedup {
            max,
            seen: Mutex::new(Seen::default()),
        }
    }
}

impl Dedup for LocalDedup {
    fn insert(&self, id: &str, forget_at_ms: i64, now_ms: i64) -> bool {
        self.seen
            .lock_unpoisoned()
            .insert(id, forget_at_ms, self.max, now_ms)
    }

    fn remove(&self, id: &str) {
        self.seen.lock_unpoisoned().remove(id);
    }

    fn remembered(&self) -> usize {
        self.seen.lock_unpoisoned().ids.len()
    }
}

/// The set itself: event ids with the time to forget each, oldest first.
#[derive(Debug, Default)]
struct Seen {
    ids: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Seen {
    /// Remembers `id` until `forget_at_ms`; false if it was already there. Forgets ids
    /// whose time has come, and the oldest ones beyond `max`.
    fn insert(&mut self, id: &str, forget_at_ms: i64, max: usize, now: i64) -> bool {
        while let Some((t, _)) = self.order.front() {
            if *t > now && self.order.len() < max.max(1) {
                break;
            }
            if let Some((t, old)) = self.order.pop_front() {
                // Only if this entry is still the current one for that id.
                if self.ids.get(&old) == Some(&t) {
                    self.ids.remove(&old);
                }
            }
        }
        if self.ids.contains_key(id) {
            return false;
        }
        self.ids.insert(id.to_string(), forget_at_ms);
        self.order.push_back((forget_at_ms, id.to_string()));
        true
    }

    fn remove(&mut self, id: &str) {
        self.ids.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_set_dedups_forgets_and_is_bounded() {
        let mut s = Seen::default();
        assert!(s.insert("a", 100, 10, 0));
        assert!(!s.insert("a", 100, 10, 0));
        assert!(s.insert("b", 200, 10, 150), "a forgotten after its time");
        assert!(s.insert("a", 300, 10, 150));
        let mut bounded = Seen::default();
        for i in 0..100 {
            bounded.insert(&format!("e{i}"), 1_000, 10, 0);
        }
        assert!(bounded.ids.len() <= 11, "{}", bounded.ids.len());
        assert!(bounded.order.len() <= 11);
    }

    #[test]
    fn the_shared_interface_dedups_and_forgets_on_remove() {
        let d = LocalDedup::new(10);
        assert!(d.insert("a", 100, 0));
        assert!(!d.insert("a", 100, 0));
        d.remove("a");
        assert!(d.insert("a", 100, 0), "a removed id is taken again");
        assert_eq!(d.remembered(), 1);
    }
}
