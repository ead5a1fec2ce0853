//! Ids for links and requests, unique within this process: a link's id tells its session
//! from a newer link's of the same machine, and a request id pairs a CONFIG with its answer.

use std::sync::atomic::{AtomicU64, Ordering};

/// The next id; starts at 1.
#[derive(Debug)]
pub(crate) struct Ids(AtomicU64);

impl Default for Ids {
    fn default() -> Self {
        Ids(AtomicU64::new(1))
    }
}

impl Ids {
    /// A fresh id.
    pub(crate) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}
