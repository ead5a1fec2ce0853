//! Retry scheduling: what wakes the task that retries pending pushes before its next due
//! time (a push just failed, or a machine said HELLO and may be reachable now).
//!
//! [`RetryScheduler`] is the interface the push path and the retry task use; [`Kick`] wakes
//! the retry task of this process. A shared implementation would wake whichever SCM holds
//! the machine's retries.

use futures_util::future::BoxFuture;
use tokio::sync::Notify;

/// Wakes the retry task early.
pub(crate) trait RetryScheduler: Send + Sync + std::fmt::Debug {
    /// Asks the retry task to look again now.
    fn kick(&self);
    /// Resolves at the next kick, or at once if one came while nobody waited.
    fn kicked(&self) -> BoxFuture<'_, ()>;
}

/// Wakes this process's retry task. Kicks while it is busy fold into one.
#[derive(Debug, Default)]
pub(crate) struct Kick(Notify);

impl RetryScheduler for Kick {
    fn kick(&self) {
        self.0.notify_one();
    }

    fn kicked(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.notified())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_kick_while_nobody_waits_is_kept_for_the_next_wait() {
        let k = Kick::default();
        k.kick();
        k.kick();
        let second = Duration::from_secs(1);
        let first = tokio::time::timeout(second, k.kicked()).await;
        assert!(first.is_ok(), "the kick was kept");
        let again = tokio::time::timeout(second, k.kicked()).await;
        assert!(again.is_err(), "two kicks fold into one");
    }
}
