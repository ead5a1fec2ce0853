//! Fault-injection points for the fault tests: a named point in the code where a process
//! can be made to stop dead, so a test can kill it (SIGKILL) at exactly that moment, for
//! example "the SCM sent a CONFIG but has not read the ACK yet" or "the agent stored a
//! configuration durably but has not ACKed it yet".
//!
//! Points are switched on only by the environment variable `SCM_FAILPOINTS`, a
//! comma-separated list of point names; it is read once. With the variable unset (the
//! normal case) every point is a no-op. An active point logs
//! `failpoint NAME reached; pausing` at `warn` level and then never returns, so the
//! process hangs there until it is killed.

use std::sync::OnceLock;

/// The environment variable that lists the active points.
pub const ENV: &str = "SCM_FAILPOINTS";

fn active() -> &'static [String] {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE.get_or_init(|| parse(std::env::var(ENV).ok().as_deref().unwrap_or("")))
}

/// Parses the comma-separated list of point names.
pub fn parse(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether point `name` is switched on.
pub fn is_active(name: &str) -> bool {
    active().iter().any(|p| p == name)
}

/// If point `name` is switched on, logs that it was reached and waits forever.
pub async fn pause(name: &str) {
    if is_active(name) {
        tracing::warn!("failpoint {name} reached; pausing");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_split_and_trimmed() {
        assert_eq!(parse(" a, b ,,c"), vec!["a", "b", "c"]);
        assert!(parse("").is_empty());
    }

    #[tokio::test]
    async fn inactive_point_returns_at_once() {
        // The variable is not set for unit tests.
        assert!(!is_active("no-such-point"));
        pause("no-such-point").await;
    }
}
