//! Certificate and CRL reload without a restart, on SIGHUP: the one mechanism the SCM and
//! the machine agent share.
//!
//! Each TLS configuration a process serves or connects with sits in a [`Slot`] (an
//! `RwLock` only held to clone or replace an `Arc`-backed acceptor or connector); a new
//! connection takes the one in force with [`Slot::current`]. On SIGHUP,
//! [`reload_on_sighup`] calls the process's reload function, which re-reads its files,
//! builds every configuration first and only then [`Slot::install`]s them all, so a bad
//! file changes nothing. What a process reloads, and what else it does on a reload (the
//! SCM closes the sessions whose certificate a new CRL revokes), stays in that process.
//!
//! The log lines are the same for every process, and are a stated contract (operators and
//! the end-to-end tests look for them): `SIGHUP received: reloading certificates, key, CA
//! and CRLs`, then `TLS reloaded...` or `TLS reload failed, keeping the previous
//! certificates and CRLs: ...`.

use std::fmt::Display;
use std::sync::RwLock;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::lock::RwLockExt;

/// Where the configuration in force is kept.
pub trait Slot<T> {
    /// A clone of the configuration in force (cheap: acceptors and connectors are `Arc`s).
    fn current(&self) -> T;
    /// Puts `value` in force for the connections that start from now on.
    fn install(&self, value: T);
}

impl<T: Clone> Slot<T> for RwLock<T> {
    fn current(&self) -> T {
        self.read_unpoisoned().clone()
    }

    fn install(&self, value: T) {
        *self.write_unpoisoned() = value;
    }
}

/// Installs the SIGHUP handler. Call it while the process starts, before it announces any
/// listener, so that a SIGHUP sent once it has logged its `listening on` lines reloads
/// instead of killing it. A failure is logged and the process runs without reload.
pub fn sighup() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cannot install the SIGHUP handler; TLS reload disabled: {e}");
            None
        }
    }
}

/// Calls `reload` on every SIGHUP until `shutdown`. `reload` must change nothing when it
/// fails; on success it returns what to add to the `TLS reloaded` line (empty, or text
/// starting with `: `).
pub async fn reload_on_sighup<E: Display>(
    mut hup: Signal,
    shutdown: CancellationToken,
    mut reload: impl FnMut() -> Result<String, E>,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        tracing::info!("SIGHUP received: reloading certificates, key, CA and CRLs");
        match reload() {
            Ok(summary) => tracing::info!("TLS reloaded{summary}"),
            Err(e) => {
                tracing::error!(
                    "TLS reload failed, keeping the previous certificates and CRLs: {e}"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_hands_out_the_value_in_force() {
        let slot = RwLock::new(std::sync::Arc::new(1));
        let before = slot.current();
        slot.install(std::sync::Arc::new(2));
        assert_eq!(*before, 1, "a connection keeps what it took");
        assert_eq!(*slot.current(), 2);
    }

    #[tokio::test]
    async fn reloads_on_each_sighup_until_shutdown() {
        let hup = sighup().expect("SIGHUP handler");
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut n = 0;
        let task = tokio::spawn(reload_on_sighup(hup, shutdown.clone(), move || {
            n += 1;
            let _ = tx.send(n);
            if n == 1 {
                Ok(String::new())
            } else {
                Err("bad file")
            }
        }));
        for want in 1..=2 {
            // kill(1) rather than libc: the workspace forbids unsafe code.
            let pid = std::process::id().to_string();
            let ok = std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .expect("kill")
                .success();
            assert!(ok);
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("reloaded in time");
            assert_eq!(
                got,
                Some(want),
                "a failed reload does not stop the next one"
            );
        }
        shutdown.cancel();
        task.await.unwrap();
    }
}
