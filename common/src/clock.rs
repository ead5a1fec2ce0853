//! Wall-clock time as the protocol and the database store it: milliseconds since the Unix
//! epoch. Deadlines and timeouts use tokio's monotonic clock instead; this is only for
//! timestamps that leave the process (journal rows, events, heartbeats, swipes).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as the SQLite columns and events hold them. A clock
/// set before 1970 reads 0 rather than failing: a timestamp is never worth an error.
pub fn now_ms() -> i64 {
    i64::try_from(now_ms_u64()).unwrap_or(i64::MAX)
}

/// Milliseconds since the Unix epoch, as the wire messages carry them (0 before 1970).
pub fn now_ms_u64() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_read_the_same_recent_clock() {
        let a = now_ms();
        let b = now_ms_u64();
        assert!(a > 1_600_000_000_000, "{a}");
        let a = a as u64;
        assert!(b >= a && b - a < 60_000);
    }
}
