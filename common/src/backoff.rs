//! Exponential back-off, written once: the agent's reconnects to the SCM and its card
//! readers' reopens, the SCM's retries of pending pushes, and the 241 bridge's retries of a
//! swipe all wait `min * 2^attempt`, capped at `max`.
//!
//! [`Backoff::jittered`] draws the wait from the upper half of that delay so that machines
//! that failed together (a restarted SCM, a print server back up) do not all come back in
//! the same instant; [`Backoff::delay`] is the plain delay, for a single caller retrying one
//! thing where spreading buys nothing and tests want exact times.

use std::time::Duration;

/// Bounds of an exponential back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before the first retry (attempt 0).
    pub min: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// A back-off from `min`, doubling per attempt, up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max }
    }

    /// The same from millisecond settings.
    pub const fn from_millis(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff::new(Duration::from_millis(min_ms), Duration::from_millis(max_ms))
    }

    /// The delay before retry `attempt` (0-based): `min * 2^attempt`, at most `max`.
    /// Saturates instead of overflowing, however many attempts there were.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.min
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(self.max)
    }

    /// [`Backoff::delay`] (at least 1 ms) with jitter: uniformly drawn from its upper half,
    /// `[delay / 2, delay]`.
    pub fn jittered(&self, attempt: u32) -> Duration {
        let base = self.delay(attempt).max(Duration::from_millis(1));
        let half = base / 2;
        let spread = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::random_range(0..=spread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_and_is_capped() {
        let b = Backoff::from_millis(100, 1_000);
        let ms: Vec<u128> = (0..6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1), "no overflow");
    }

    // The assertions of the SCM's former `retry::delay` test.
    #[test]
    fn jittered_doubles_is_capped_and_jittered() {
        let b = Backoff::from_millis(100, 1_000);
        for attempt in 0..30 {
            let d = b.jittered(attempt).as_millis() as u64;
            let base = (100u64 << attempt.min(20)).min(1_000);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d} not in [{}, {base}]",
                base / 2
            );
        }
        let spread: std::collections::HashSet<_> = (0..40).map(|_| b.jittered(3)).collect();
        assert!(spread.len() > 5, "jittered");
    }

    // The assertions of the agent's former `link::backoff` test.
    #[test]
    fn jittered_grows_is_capped_and_spreads_reconnects() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(3);
        let b = Backoff::new(min, max);
        for n in 0..20 {
            let d = b.jittered(n);
            let base = (min * (1 << n.min(16))).min(max);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {n}: {d:?} not in [{:?}, {base:?}]",
                base / 2
            );
        }
        let samples: std::collections::HashSet<_> = (0..50).map(|_| b.jittered(5)).collect();
        assert!(samples.len() > 5, "jitter spreads reconnects");
    }

    #[test]
    fn a_zero_minimum_still_waits_a_little() {
        let d = Backoff::from_millis(0, 0).jittered(3);
        assert!(d <= Duration::from_millis(1), "{d:?}");
    }
}
