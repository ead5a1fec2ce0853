//! Turns SIGTERM and SIGINT into a cancelled [`CancellationToken`], so every server of a
//! process stops accepting, finishes or cancels its connections and exits.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGTERM or SIGINT (Ctrl-C).
///
/// Must be called inside a tokio runtime. If the signal handlers cannot be installed the
/// token is never cancelled by a signal, and the failure is logged.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot install the SIGTERM handler: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            r = tokio::signal::ctrl_c() => match r {
                Ok(()) => tracing::info!("SIGINT received, shutting down"),
                Err(e) => { tracing::error!("cannot listen for SIGINT: {e}"); return; }
            },
        }
        trigger.cancel();
    });
    token
}
