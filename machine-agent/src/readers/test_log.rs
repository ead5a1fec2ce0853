//! Test helper: captures this thread's log output so tests can wait on log lines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Captured log text (`#[tokio::test]` runs every task on the test's thread).
#[derive(Debug, Clone, Default)]
pub(super) struct Logs {
    text: Arc<Mutex<String>>,
    changed: Arc<Notify>,
}

#[derive(Debug)]
pub(super) struct LogWriter(Logs);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .text
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(buf));
        self.0.changed.notify_waiters();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.clone())
    }
}

impl Logs {
    pub(super) fn new() -> Logs {
        Logs::default()
    }

    /// Captures everything logged on this thread until the guard is dropped.
    pub(super) fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        // Other tests on other threads may have cached "not interested" for our callsites.
        tracing::callsite::rebuild_interest_cache();
        guard
    }

    pub(super) fn contents(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits (at most 10 s of real time, then panics) until `needle` has been logged.
    pub(super) async fn wait_for(&self, needle: &str) {
        self.wait_until(|s| s.contains(needle)).await;
    }

    /// Waits (at most 10 s of real time, then panics) until the log text satisfies `f`.
    pub(super) async fn wait_until(&self, f: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let changed = self.changed.notified();
            if f(&self.contents()) {
                return;
            }
            // The bound guards against a hung test only; progress comes from `changed`.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "log condition not met; logs so far:\n{}",
                self.contents()
            );
            let _ = tokio::time::timeout(left, changed).await;
        }
    }
}
