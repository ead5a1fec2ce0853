//! The login throttle: failed operator logins counted per source address. A source that
//! fails too often within a window is refused for a while; the refusal expires, and a
//! successful login forgets the failures.
//!
//! [`LoginThrottle`] is the interface the telnet console uses; [`Throttle`] counts in this
//! process. A shared implementation would count a source's failures across every SCM, so
//! that spreading guesses over them gains nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use scm_common::lock::LockExt;
use tokio::time::Instant;

use serde::Deserialize;

/// Counts failed logins per source and says who is locked out.
pub(crate) trait LoginThrottle: Send + Sync + std::fmt::Debug {
    /// If `ip` is locked out, how long it still is.
    fn locked(&self, ip: IpAddr) -> Option<Duration>;
    /// Records a failure; returns the lockout if this failure caused one.
    fn failure(&self, ip: IpAddr) -> Option<Duration>;
    /// Forgets the failures of `ip` after a successful login.
    fn success(&self, ip: IpAddr);
    /// The pause after each failure.
    fn failure_delay(&self) -> Duration;
}

/// `[login]`: failed-login throttling per source address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LoginSection {
    /// Failures from one address within `window_ms` before it is locked out.
    pub(crate) max_failures: u32,
    /// Window over which failures are counted.
    pub(crate) window_ms: u64,
    /// How long a locked-out address is refused.
    pub(crate) lockout_ms: u64,
    /// Pause after each failed attempt.
    pub(crate) failure_delay_ms: u64,
}

impl Default for LoginSection {
    fn default() -> Self {
        Self {
            max_failures: 5,
            window_ms: 60_000,
            lockout_ms: 300_000,
            failure_delay_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// Failed-login bookkeeping per source address, in this process.
#[derive(Debug)]
pub(crate) struct Throttle {
    cfg: LoginSection,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// Upper bound on tracked sources; the oldest are forgotten beyond it.
const MAX_TRACKED: usize = 10_000;

impl Throttle {
    /// A throttle with these settings.
    pub(crate) fn new(cfg: LoginSection) -> Self {
        Self {
            cfg,
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl LoginThrottle for Throttle {
    /// If `ip` is locked out, how long it still is.
    fn locked(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let map = self.entries.lock_unpoisoned();
        map.get(&ip)
            .and_then(|e| e.locked_until)
            .filter(|u| *u > now)
            .map(|u| u - now)
    }

    /// Records a failure; returns the lockout if this failure caused one.
    fn failure(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let window = Duration::from_millis(self.cfg.window_ms);
        let lockout = Duration::from_millis(self.cfg.lockout_ms);
        let mut map = self.entries.lock_unpoisoned();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            let oldest = map
                .iter()
                .min_by_key(|(_, e)| e.window_start)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                map.remove(&k);
            }
        }
        let e = map.entry(ip).or_insert(Entry {
            failures: 0,
            window_start: now,
            locked_until: None,
        });
        if now.duration_since(e.window_start) > window || e.locked_until.is_some_and(|u| u <= now) {
            *e = Entry {
                failures: 0,
                window_start: now,
                locked_until: None,
            };
        }
        e.failures += 1;
        if e.failures >= self.cfg.max_failures {
            e.locked_until = Some(now + lockout);
            return Some(lockout);
        }
        None
    }

    /// Forgets the failures of `ip` after a successful login.
    fn success(&self, ip: IpAddr) {
        let mut map = self.entries.lock_unpoisoned();
        if map.get(&ip).is_some_and(|e| e.locked_until.is_none()) {
            map.remove(&ip);
        }
    }

    /// The pause after each failure.
    fn failure_delay(&self) -> Duration {
        Duration::from_millis(self.cfg.failure_delay_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lockout_after_failures_then_expires() {
        let t = Throttle::new(LoginSection {
            max_failures: 3,
            window_ms: 60_000,
            lockout_ms: 10_000,
            failure_delay_ms: 0,
        });
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let other: IpAddr = "10.1.2.4".parse().unwrap();
        assert_eq!(t.failure(ip), None);
        assert_eq!(t.failure(ip), None);
        assert_eq!(t.failure(ip), Some(Duration::from_secs(10)));
        assert!(t.locked(ip).is_some());
        assert!(t.locked(other).is_none(), "per source");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(t.locked(ip).is_none(), "lockout expires");
        assert_eq!(t.failure(ip), None, "count restarts after expiry");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_add_up() {
        let t = Throttle::new(LoginSection {
            max_failures: 2,
            window_ms: 1_000,
            lockout_ms: 10_000,
            failure_delay_ms: 0,
        });
        let ip: IpAddr = "::1".parse().unwrap();
        assert_eq!(t.failure(ip), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(t.failure(ip), None);
        assert!(t.failure(ip).is_some());
    }
}
