//! Delivery locks: one configuration delivery to a machine at a time, whether it goes over
//! the machine's config port (a push, a retry) or in-band on its event link (after HELLO),
//! so two deliveries can never overtake each other on the way to the same agent.
//!
//! [`DeliveryLocks`] is the interface the push path and the link use; [`LocalDeliveryLocks`]
//! keeps one async mutex per machine in this process. A shared implementation would hand
//! out a lease held elsewhere; the caller only keeps the [`DeliveryGuard`] while it
//! delivers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use scm_common::lock::LockExt;

/// Held while delivering to one machine; dropping it lets the next delivery start.
pub(crate) struct DeliveryGuard {
    _held: Box<dyn Send>,
}

impl DeliveryGuard {
    /// A guard that releases the lock when `held` is dropped.
    pub(crate) fn new(held: impl Send + 'static) -> DeliveryGuard {
        DeliveryGuard {
            _held: Box::new(held),
        }
    }
}

impl std::fmt::Debug for DeliveryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryGuard")
    }
}

/// Serialises deliveries per machine.
pub(crate) trait DeliveryLocks: Send + Sync + std::fmt::Debug {
    /// Waits until no other delivery to machine `id` is in progress.
    fn acquire(&self, id: u16) -> BoxFuture<'_, DeliveryGuard>;
}

/// One async mutex per machine, in this process. Entries are never removed: there is one
/// per configured machine at most.
#[derive(Debug, Default)]
pub(crate) struct LocalDeliveryLocks {
    locks: Mutex<HashMap<u16, Arc<tokio::sync::Mutex<()>>>>,
}

impl DeliveryLocks for LocalDeliveryLocks {
    fn acquire(&self, id: u16) -> BoxFuture<'_, DeliveryGuard> {
        let lock = self.locks.lock_unpoisoned().entry(id).or_default().clone();
        Box::pin(async move { DeliveryGuard::new(lock.lock_owned().await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn one_delivery_per_machine_at_a_time() {
        let locks = LocalDeliveryLocks::default();
        let first = locks.acquire(1).await;
        // Another machine is not held up.
        let _other = locks.acquire(2).await;
        let second = tokio::time::timeout(Duration::from_secs(1), locks.acquire(1)).await;
        assert!(second.is_err(), "machine 1 is busy");
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), locks.acquire(1)).await;
        assert!(third.is_ok(), "free again once the guard is dropped");
    }
}
