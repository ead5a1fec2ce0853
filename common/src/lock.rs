//! One way to take a `std::sync` lock: [`LockExt::lock_unpoisoned`] for a `Mutex`,
//! [`RwLockExt::read_unpoisoned`] and [`RwLockExt::write_unpoisoned`] for an `RwLock`, and
//! [`CondvarExt::wait_timeout_unpoisoned`] to wait on a `Condvar`.
//!
//! Poisoning is ignored on purpose. A lock is poisoned when a thread panicked while holding
//! it; the panic is already reported where it happened. Every lock in this workspace guards
//! a short critical section over a map, a counter or an `Arc` being cloned or replaced,
//! which leaves the data usable at every step, so refusing the data afterwards would only
//! turn one panicking task into a panic in every connection that touches the same lock.
//! (Neither tokio's locks nor most others poison at all.)

// The one place allowed to take a poisoned guard (`clippy.toml` bans it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::sync::{
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, WaitTimeoutResult,
};
use std::time::Duration;

/// Locking a [`Mutex`] whatever a panicking holder left behind.
pub trait LockExt<T: ?Sized> {
    /// Locks, taking the guard of a poisoned mutex too (see the module doc for why).
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Locking an [`RwLock`] whatever a panicking holder left behind.
pub trait RwLockExt<T: ?Sized> {
    /// Read-locks, taking the guard of a poisoned lock too (see the module doc for why).
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T>;
    /// Write-locks, taking the guard of a poisoned lock too (see the module doc for why).
    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Waiting on a [`Condvar`] whatever a panicking holder of its mutex left behind.
pub trait CondvarExt {
    /// [`Condvar::wait_timeout`], taking the guard back even if the mutex was poisoned
    /// (see the module doc for why).
    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult);
}

impl CondvarExt for Condvar {
    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        self.wait_timeout(guard, timeout)
            .unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_hands_out_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let rw = std::sync::Arc::new(RwLock::new(1));
        let (m2, rw2) = (m.clone(), rw.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = rw2.write().unwrap();
            panic!("poison both");
        })
        .join();
        assert!(m.is_poisoned() && rw.is_poisoned());
        *m.lock_unpoisoned() += 1;
        assert_eq!(*m.lock_unpoisoned(), 2);
        *rw.write_unpoisoned() += 1;
        assert_eq!(*rw.read_unpoisoned(), 2);
    }
}
