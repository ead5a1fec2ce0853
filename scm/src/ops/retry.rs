//! Retries of pending pushes. A generation that could not be delivered stays pending in
//! the database; this task tries it again with jittered exponential back-off (per machine)
//! for every machine whose config port is known (a configured `config_addr`, or the port a
//! connected version-1 agent reported). At start it picks up whatever was pending when the
//! SCM stopped. A NACK ends the retries for that generation; a newer generation starts
//! them afresh. Version-0 machines without a config address get theirs in-band at their
//! next HELLO instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use scm_common::backoff::Backoff;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coord::retry::RetryScheduler;
use crate::ops::Ops;
use crate::ops::push::{self, PushResult};

/// `[retry]` in the SCM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RetrySettings {
    /// First retry delay; doubles per failed attempt.
    pub initial_ms: u64,
    /// Longest delay between attempts.
    pub max_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            initial_ms: 1_000,
            max_ms: 60_000,
        }
    }
}

/// The delay before retry `attempt` (0-based): `initial * 2^attempt`, capped, drawn from
/// its upper half so machines that failed together do not retry together.
pub(crate) fn delay(s: &RetrySettings, attempt: u32) -> Duration {
    Backoff::from_millis(s.initial_ms, s.max_ms).jittered(attempt)
}

#[derive(Debug, Clone, Copy)]
struct State {
    generation: u64,
    attempts: u32,
    next: Instant,
}

/// Runs until shutdown.
pub(crate) async fn run(ops: Arc<Ops>, kick: Arc<dyn RetryScheduler>, shutdown: CancellationToken) {
    let settings = ops.settings.retry.clone();
    let mut states: HashMap<u16, State> = HashMap::new();
    // At start, whatever is pending is tried at once (the SCM may have been down for a
    // while); a push that fails later waits its first back-off step.
    let mut first_pass = true;
    loop {
        let pending = match ops.store.fleet().pending_all().await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("retry: cannot read pending pushes: {e}");
                Vec::new()
            }
        };
        let now = Instant::now();
        states.retain(|id, _| pending.iter().any(|(m, _)| m == id));
        for (id, generation) in &pending {
            let fresh = State {
                generation: *generation,
                attempts: 1,
                next: if first_pass {
                    now
                } else {
                    now + delay(&settings, 0)
                },
            };
            let st = states.entry(*id).or_insert(fresh);
            if st.generation != *generation {
                *st = fresh;
            }
            if st.next > now || push::route(&ops, *id).is_none() {
                continue;
            }
            let g = match ops.store.fleet().pending_generation(*id).await {
                Ok(Some(g)) => g,
                _ => continue,
            };
            tracing::info!(
                machine = id,
                generation = g.generation,
                attempt = st.attempts,
                "retrying a pending push"
            );
            match push::deliver(&ops, g).await {
                Ok(PushResult::Unreachable { .. }) => {
                    let d = delay(&settings, st.attempts);
                    st.attempts = st.attempts.saturating_add(1);
                    st.next = Instant::now() + d;
                    tracing::info!(
                        machine = id,
                        "still unreachable; next attempt in {} ms",
                        d.as_millis()
                    );
                }
                Ok(_) => {
                    states.remove(id);
                }
                Err(e) => tracing::error!(machine = id, "retry: cannot record the attempt: {e}"),
            }
        }
        first_pass = false;
        // Sleep until the earliest due retry (or a kick); look again at least every 30 s
        // so machines whose address became known are picked up.
        let wake = states
            .values()
            .map(|s| s.next)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(30))
            .min(Instant::now() + Duration::from_secs(30));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = kick.kicked() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_is_capped_and_jittered() {
        let s = RetrySettings {
            initial_ms: 100,
            max_ms: 1_000,
        };
        for attempt in 0..30 {
            let d = delay(&s, attempt).as_millis() as u64;
            let base = (100u64 << attempt.min(20)).min(1_000);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d} not in [{}, {base}]",
                base / 2
            );
        }
        let spread: std::collections::HashSet<_> = (0..40).map(|_| delay(&s, 3)).collect();
        assert!(spread.len() > 5, "jittered");
    }
}
