//! Flapping print-server connections on one Generic device. The newest connection wins,
//! so two print servers configured for the same device (or one that reconnects at once
//! whenever it is closed) kick each other off without end: 31,000 connections in 7.5 s,
//! with a log line each. [`FlapGuard`] counts replacements; too many within a window
//! start a hold-off during which the current connection keeps the device and newer ones
//! are closed at once; after it, the newest wins again. What it says to log is rate
//! limited. No I/O: the caller passes the time.

use std::time::Duration;

use tokio::time::Instant;

/// The guard's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlapLimits {
    /// Replacements counted within this window...
    pub window: Duration,
    /// ...beyond this many start a hold-off.
    pub max_replacements: u32,
    /// How long newer connections are refused.
    pub hold: Duration,
    /// At most one log line about flapping this often.
    pub log_every: Duration,
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// No connection yet: take it.
    First,
    /// Take it and close the current one.
    Replace,
    /// Hold-off: close the new connection, keep the current one.
    Hold,
}

/// The guard's answer: the admission, and whether (with what counts) to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// What to do with the connection.
    pub admission: Admission,
    /// This connection started a hold-off (counted in the metric).
    pub started_hold: bool,
    /// Log a line now: connections refused and hold-offs since the last line.
    pub log: Option<Summary>,
}

/// Counts for one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Summary {
    /// Connections refused during hold-offs since the last line.
    pub refused: u64,
    /// Hold-offs started since the last line.
    pub holds: u64,
}

/// Per-device state.
#[derive(Debug, Default)]
pub(crate) struct FlapGuard {
    window_start: Option<Instant>,
    replacements: u32,
    hold_until: Option<Instant>,
    last_log: Option<Instant>,
    since_log: Summary,
}

impl FlapGuard {
    /// A new connection arrives at `now`; `connected` says whether one is current.
    pub(crate) fn on_connect(
        &mut self,
        lim: &FlapLimits,
        now: Instant,
        connected: bool,
    ) -> Decision {
        let mut started_hold = false;
        let admission = if connected && self.hold_until.is_some_and(|t| now < t) {
            self.since_log.refused += 1;
            Admission::Hold
        } else if !connected {
            Admission::First
        } else {
            if self
                .window_start
                .is_none_or(|t| now.duration_since(t) > lim.window)
            {
                self.window_start = Some(now);
                self.replacements = 0;
            }
            self.replacements += 1;
            if self.replacements > lim.max_replacements {
                self.hold_until = Some(now + lim.hold);
                self.window_start = None;
                self.replacements = 0;
                self.since_log.holds += 1;
                self.since_log.refused += 1;
                started_hold = true;
                Admission::Hold
            } else {
                Admission::Replace
            }
        };
        let log = if admission == Admission::Hold
            && self
                .last_log
                .is_none_or(|t| now.duration_since(t) >= lim.log_every)
        {
            self.last_log = Some(now);
            Some(std::mem::take(&mut self.since_log))
        } else {
            None
        };
        Decision {
            admission,
            started_hold,
            log,
        }
    }

    /// Whether a hold-off is on at `now`.
    #[cfg(test)]
    pub(crate) fn holding(&self, now: Instant) -> bool {
        self.hold_until.is_some_and(|t| now < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: FlapLimits = FlapLimits {
        window: Duration::from_millis(1000),
        max_replacements: 3,
        hold: Duration::from_millis(500),
        log_every: Duration::from_secs(10),
    };

    /// Steps: (ms since start, a connection is current) -> expected admission, started a
    /// hold-off, logged.
    #[test]
    fn replacements_start_a_hold_off_then_the_newest_wins_again() {
        use Admission::*;
        let table: &[(u64, bool, Admission, bool, bool)] = &[
            (0, false, First, false, false),
            (10, true, Replace, false, false),
            (20, true, Replace, false, false),
            (30, true, Replace, false, false),
            // The fourth replacement within the window: hold-off, logged once.
            (40, true, Hold, true, true),
            (50, true, Hold, false, false),
            (539, true, Hold, false, false),
            // Hold-off over: the newest wins again, and counting starts over.
            (540, true, Replace, false, false),
            (550, true, Replace, false, false),
            (560, true, Replace, false, false),
            // Flapping again: a hold-off, but the log line waits for `log_every`.
            (570, true, Hold, true, false),
            // Replacements spread wider than the window never hold.
            (2000, true, Replace, false, false),
            (3100, true, Replace, false, false),
            (4200, true, Replace, false, false),
            (5300, true, Replace, false, false),
            (6400, true, Replace, false, false),
            // No connection current: taken, even in a hold-off.
            (6500, false, First, false, false),
        ];
        let start = Instant::now();
        let mut g = FlapGuard::default();
        for &(ms, connected, admission, hold, logged) in table {
            let now = start + Duration::from_millis(ms);
            let d = g.on_connect(&LIM, now, connected);
            assert_eq!(
                (d.admission, d.started_hold, d.log.is_some()),
                (admission, hold, logged),
                "at {ms} ms"
            );
        }
    }

    #[test]
    fn the_log_line_counts_what_happened_since_the_last_one() {
        let start = Instant::now();
        let mut g = FlapGuard::default();
        let at = |ms| start + Duration::from_millis(ms);
        g.on_connect(&LIM, at(0), false);
        for ms in 1..=3 {
            g.on_connect(&LIM, at(ms), true);
        }
        let first = g.on_connect(&LIM, at(4), true).log.unwrap();
        assert_eq!(
            first,
            Summary {
                refused: 1,
                holds: 1
            }
        );
        assert!(g.holding(at(5)));
        for ms in 5..105 {
            assert_eq!(g.on_connect(&LIM, at(ms), true).log, None);
        }
        // Ten seconds on, in another hold-off: the next line has the counts in between.
        for ms in 10_004..10_007 {
            g.on_connect(&LIM, at(ms), true);
        }
        let next = g.on_connect(&LIM, at(10_007), true).log.unwrap();
        assert_eq!(
            next,
            Summary {
                refused: 101,
                holds: 1
            }
        );
    }
}
