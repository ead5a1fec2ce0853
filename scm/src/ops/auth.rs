//! Operator authentication: Argon2 password hashes and per-source throttling of failed
//! logins (a source that fails too often is refused for a while; the refusal expires).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};
use tokio::time::Instant;

use crate::app::config::{LoginSection, OperatorConfig};

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("cannot hash the password: {0}")]
pub struct HashError(argon2::password_hash::Error);

/// Hashes a password into an Argon2id PHC string for `[[operator]] password_hash`.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(HashError)?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(HashError)
}

/// Checks `password` against the operator's hash. Runs Argon2, so call it off the async
/// workers. An operator without a password hash can never log in with a password.
pub fn verify_password(op: &OperatorConfig, password: &str) -> bool {
    if op.password_hash.is_empty() {
        return false;
    }
    match argon2::PasswordHash::new(op.password_hash.expose()) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// Failed-login bookkeeping per source address.
#[derive(Debug)]
pub struct Throttle {
    cfg: LoginSection,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// Upper bound on tracked sources; the oldest are forgotten beyond it.
const MAX_TRACKED: usize = 10_000;

impl Throttle {
    /// A throttle with these settings.
    pub fn new(cfg: LoginSection) -> Self {
        Self {
            cfg,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// If `ip` is locked out, how long it still is.
    pub fn locked(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&ip)
            .and_then(|e| e.locked_until)
            .filter(|u| *u > now)
            .map(|u| u - now)
    }

    /// Records a failure; returns the lockout if this failure caused one.
    pub fn failure(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let window = Duration::from_millis(self.cfg.window_ms);
        let lockout = Duration::from_millis(self.cfg.lockout_ms);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
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
    pub fn success(&self, ip: IpAddr) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&ip).is_some_and(|e| e.locked_until.is_none()) {
            map.remove(&ip);
        }
    }

    /// The pause after each failure.
    pub fn failure_delay(&self) -> Duration {
        Duration::from_millis(self.cfg.failure_delay_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::config::OperatorRole;
    use scm_common::Secret;

    #[test]
    fn hash_then_verify() {
        let h = hash_password("s3cret").unwrap();
        let op = OperatorConfig {
            name: "alice".into(),
            password_hash: Secret::new(h),
            role: OperatorRole::Admin,
        };
        assert!(verify_password(&op, "s3cret"));
        assert!(!verify_password(&op, "s3cret "));
        let no_pw = OperatorConfig {
            password_hash: Secret::default(),
            ..op
        };
        assert!(!verify_password(&no_pw, ""));
    }

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
