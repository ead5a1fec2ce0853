//! How long a frame waited before the SCM got to it, from the agent's send time stamp:
//! time spent in socket buffers, or while the SCM process was stopped, or while its link
//! task was blocked, is invisible to "read time + remaining TTL", so a swipe would be
//! forwarded late by exactly that stall (issue: late after an SCM stall).
//!
//! The agent stamps heartbeats and swipes with its wall clock. For each stamped frame
//! `scm_now - agent_sent` is the clock offset plus that frame's delay; the smallest value
//! seen on the link is the offset plus the smallest delay (the min filter of NTP-like
//! estimators). A frame's wait is then its own value minus that minimum.
//!
//! Error bound: the estimate is never larger than the true wait plus the link's smallest
//! one-way delay variation, and it errs on the safe side when a clock moves: an agent
//! clock stepped back makes waits look longer (swipes expire early, never late); stepped
//! forward, the new smaller samples replace the minimum at once. A link whose every
//! sample was delayed (it came up during a stall) underestimates by that common delay
//! until a prompt frame arrives; heartbeats arrive every `heartbeat_ms`.

/// The per-link offset estimate (no I/O, no clock of its own).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ClockOffset {
    /// Smallest `scm_ms - agent_ms` seen, if any.
    min: Option<i64>,
}

impl ClockOffset {
    /// A frame stamped `agent_ms` (0: unstamped) was handled at `scm_ms`; returns how
    /// long it waited in milliseconds, as far as this link can tell (0 when unstamped or
    /// as prompt as the promptest frame so far).
    pub(crate) fn observe(&mut self, agent_ms: u64, scm_ms: i64) -> u64 {
        let Ok(agent) = i64::try_from(agent_ms) else {
            return 0;
        };
        if agent == 0 {
            return 0;
        }
        let sample = scm_ms.saturating_sub(agent);
        let min = match self.min {
            Some(m) if m <= sample => m,
            _ => {
                self.min = Some(sample);
                sample
            }
        };
        u64::try_from(sample.saturating_sub(min)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_measured_against_the_promptest_frame() {
        // Agent clock 5 s behind the SCM's; 2 ms one-way delay.
        let skew = 5_000;
        let rows: [(&str, u64, i64, u64); 7] = [
            ("unstamped", 0, 10_000, 0),
            ("first heartbeat: the reference", 1_000, 1_000 + skew + 2, 0),
            ("a prompt swipe", 2_000, 2_000 + skew + 2, 0),
            (
                "a swipe that sat 20 s in the socket",
                3_000,
                3_000 + skew + 2 + 20_000,
                20_000,
            ),
            (
                "a promptER frame lowers the reference",
                4_000,
                4_000 + skew + 1,
                0,
            ),
            (
                "then the same delay reads 1 ms more",
                5_000,
                5_000 + skew + 2 + 300,
                301,
            ),
            (
                "agent clock stepped back 1 s: looks 1 s older (safe side)",
                5_000,
                6_000 + skew + 1,
                1_000,
            ),
        ];
        let mut c = ClockOffset::default();
        for (case, agent, scm, want) in rows {
            assert_eq!(c.observe(agent, scm), want, "{case}");
        }
        // Stepped forward by 3 s: the new sample is the new reference at once.
        assert_eq!(c.observe(10_000, 7_000 + skew + 1), 0);
        assert_eq!(c.observe(10_100, 7_100 + skew + 1), 0);
    }
}
