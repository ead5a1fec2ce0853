//! When to hold cards back from a print server that has stopped reading. A card written
//! to a print server that stays connected but does not read waits in the kernels' buffers
//! (the SCM's send buffer, the print server's receive buffer) and reaches the print server
//! when it reads again: late, and a card is a bearer token. TCP does not tell the sender
//! that the peer's application has not read what its kernel acknowledged (Linux keeps
//! advertising the same window until half of the receive buffer is used: tens of KiB, some
//! thousands of card lines), so the only early sign is the print server's own traffic:
//! PaperCut-style servers send a `\r` keep-alive every so often. [`StallGuard`] holds
//! cards back (they wait in the device's queue, where they expire at their deadline)
//! while the print server has been silent longer than the configured limit, and says when
//! to log. No I/O: the caller passes the time.

use std::time::Duration;

use tokio::time::Instant;

/// The guard's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StallLimits {
    /// A print server silent for longer is taken as not reading (`None`: never).
    pub silence: Option<Duration>,
    /// At most one log line about a stalled print server this often.
    pub log_every: Duration,
}

/// What to do with the cards waiting for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Write them.
    Write,
    /// Hold them back in the queue.
    Hold {
        /// This starts a stall (counted in the metric).
        started: bool,
        /// Log a line now: stalls started since the last line (this one included).
        log: Option<u64>,
    },
}

/// Per-connection state.
#[derive(Debug, Default)]
pub(crate) struct StallGuard {
    last_heard: Option<Instant>,
    held_since: Option<Instant>,
    last_log: Option<Instant>,
    since_log: u64,
}

impl StallGuard {
    /// A guard for a connection accepted at `now` (the print server greets at once).
    pub(crate) fn new(now: Instant) -> StallGuard {
        StallGuard {
            last_heard: Some(now),
            ..StallGuard::default()
        }
    }

    /// The print server sent bytes at `now`; returns how long the stall it ends lasted.
    pub(crate) fn on_input(&mut self, now: Instant) -> Option<Duration> {
        self.last_heard = Some(now);
        self.held_since.take().map(|t| now.duration_since(t))
    }

    /// Cards wait at `now`: write them or hold them back.
    pub(crate) fn before_write(&mut self, lim: &StallLimits, now: Instant) -> Verdict {
        let silent = match (lim.silence, self.last_heard) {
            (Some(max), Some(t)) => now.duration_since(t) > max,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !silent {
            return Verdict::Write;
        }
        let started = self.held_since.is_none();
        if started {
            self.held_since = Some(now);
            self.since_log += 1;
        }
        let log = if started
            && self
                .last_log
                .is_none_or(|t| now.duration_since(t) >= lim.log_every)
        {
            self.last_log = Some(now);
            Some(std::mem::take(&mut self.since_log))
        } else {
            None
        };
        Verdict::Hold { started, log }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn holds_while_silent_and_logs_at_most_every_so_often() {
        let lim = StallLimits {
            silence: Some(1000 * MS),
            log_every: 10_000 * MS,
        };
        let t0 = Instant::now();
        let mut g = StallGuard::new(t0);
        // (ms after t0, event, expected) where event is "in" (input) or "w" (cards wait).
        let hold = |started, log| Verdict::Hold { started, log };
        let table: &[(u64, &str, Option<Verdict>)] = &[
            (500, "w", Some(Verdict::Write)),
            (1000, "w", Some(Verdict::Write)), // exactly the limit: not yet
            (1001, "w", Some(hold(true, Some(1)))),
            (1500, "w", Some(hold(false, None))),
            (2000, "in", None), // heard again: the stall ends
            (2500, "w", Some(Verdict::Write)),
            (3100, "w", Some(hold(true, None))), // a second stall within 10 s: no line
            (3200, "in", None),
            (14_000, "w", Some(hold(true, Some(2)))), // the line counts both
        ];
        for (at, ev, want) in table {
            let now = t0 + Duration::from_millis(*at);
            match *ev {
                "in" => {
                    g.on_input(now);
                }
                _ => assert_eq!(Some(g.before_write(&lim, now)), *want, "at {at} ms"),
            }
        }
    }

    #[test]
    fn input_reports_how_long_the_stall_lasted_and_no_limit_never_holds() {
        let lim = StallLimits {
            silence: Some(100 * MS),
            log_every: MS,
        };
        let t0 = Instant::now();
        let mut g = StallGuard::new(t0);
        assert_eq!(g.on_input(t0 + 50 * MS), None, "not stalled");
        assert!(matches!(
            g.before_write(&lim, t0 + 200 * MS),
            Verdict::Hold { started: true, .. }
        ));
        assert_eq!(g.on_input(t0 + 700 * MS), Some(500 * MS));
        let off = StallLimits {
            silence: None,
            log_every: MS,
        };
        assert_eq!(
            g.before_write(&off, t0 + 100_000 * MS),
            Verdict::Write,
            "off"
        );
    }
}
