//! The write gate: the store's operations go before the swipe journal's batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Gives the store's operations (operators' pushes, machine state) priority over the swipe
/// journal's batches on the shared database. SQLite's lock is not fair: a journal writing
/// batch after batch (a flood of swipes from one agent) could keep a push waiting beyond
/// its busy timeout, and the operator would get `451 database is locked`. The store counts
/// its operations in flight; the journal writer waits, bounded, until none is in flight
/// before it starts its next batch.
#[derive(Debug, Clone, Default)]
pub(crate) struct WriteGate(Arc<AtomicUsize>);

/// One store operation in flight (see [`WriteGate`]).
#[derive(Debug)]
pub(super) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WriteGate {
    pub(super) fn enter(&self) -> InFlight {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlight(self.0.clone())
    }

    /// Store operations in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Blocks the calling (non-async) thread while store operations are in flight, at
    /// most `max`; returns whether it waited.
    pub(crate) fn wait_idle(&self, max: Duration) -> bool {
        let deadline = std::time::Instant::now() + max;
        let mut waited = false;
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            waited = true;
            std::thread::sleep(Duration::from_millis(1));
        }
        waited
    }
}
