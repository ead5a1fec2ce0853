//! Certificate and CRL reload without a restart (SIGHUP): what the SCM reloads. The
//! mechanism (slots, the SIGHUP loop, its log lines) is `scm_common::reload`, shared with
//! the agent; this module keeps the SCM's own part: which listeners, and the revoked
//! sessions.
//!
//! [`TlsState`] holds the rustls configurations of the SCM's TLS listeners (agents,
//! telnet-tls, admin) and of its client toward machines' config ports, each behind a
//! lock that is only held to clone an `Arc`. A connection takes the configuration in
//! force when it is accepted; [`TlsState::reload`] re-reads the CA, certificate, key and
//! CRL files, builds every configuration first and swaps them all only if every one
//! built (a bad file keeps the old configuration and returns the error). It then closes
//! the established sessions whose peer certificate serial the new CRLs list: each TLS
//! session registers itself after its handshake ([`TlsState::register`]) and gets a
//! token that the reload cancels; the other sessions keep running.

use std::collections::{HashMap, HashSet};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::CommonState;
use scm_certs::identity::Identity;
use scm_certs::tls::{self, TlsError, TlsFiles, TlsPolicy};
use scm_common::lock::LockExt;
use scm_common::reload::Slot;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// The four rustls configurations, built together.
struct Configs {
    agents: TlsAcceptor,
    operator: TlsAcceptor,
    admin: TlsAcceptor,
    machines: TlsConnector,
}

impl Configs {
    fn build(files: &TlsFiles, machine_policy: TlsPolicy) -> Result<Configs, TlsError> {
        let agents = tls::server_config(files, machine_policy, &[])?;
        let operator = tls::server_config(files, TlsPolicy::default(), &[])?;
        // The admin API is TLS 1.3 only whatever is allowed for machines, and speaks HTTP/2.
        let admin = tls::server_config(files, TlsPolicy { allow_tls12: false }, &[b"h2"])?;
        let machines = tls::client_config(files, machine_policy)?;
        Ok(Configs {
            agents: TlsAcceptor::from(agents),
            operator: TlsAcceptor::from(operator),
            admin: TlsAcceptor::from(admin),
            machines: TlsConnector::from(machines),
        })
    }
}

/// One established TLS session.
struct Live {
    listener: &'static str,
    who: String,
    peer: String,
    serial: Vec<u8>,
    close: CancellationToken,
    revoked: CancellationToken,
}

/// The SCM's reloadable TLS material and its established TLS sessions.
pub(crate) struct TlsState {
    files: TlsFiles,
    machine_policy: TlsPolicy,
    agents: RwLock<TlsAcceptor>,
    operator: RwLock<TlsAcceptor>,
    admin: RwLock<TlsAcceptor>,
    machines: RwLock<TlsConnector>,
    sessions: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reloaded {
    /// Serial numbers the CRLs now list.
    pub revoked_serials: usize,
    /// Established sessions closed because their certificate is now revoked.
    pub closed: Vec<String>,
}

/// An established session's registration; dropping it forgets the session.
#[derive(Debug)]
pub(crate) struct Registration {
    state: Arc<TlsState>,
    id: u64,
    /// Cancelled when the session must end: server shutdown, or its certificate was
    /// revoked by a reload ([`Registration::revoked`] tells which).
    pub token: CancellationToken,
    revoked: CancellationToken,
}

impl Registration {
    /// Cancelled only when a reload revoked this session's certificate.
    pub(crate) fn revoked(&self) -> &CancellationToken {
        &self.revoked
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut s = self.state.sessions.lock_unpoisoned();
        s.remove(&self.id);
    }
}

impl TlsState {
    /// Loads every configuration from `files`.
    pub(crate) fn load(
        files: TlsFiles,
        machine_policy: TlsPolicy,
    ) -> Result<Arc<TlsState>, TlsError> {
        let c = Configs::build(&files, machine_policy)?;
        Ok(Arc::new(TlsState {
            files,
            machine_policy,
            agents: RwLock::new(c.agents),
            operator: RwLock::new(c.operator),
            admin: RwLock::new(c.admin),
            machines: RwLock::new(c.machines),
            sessions: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }))
    }

    /// The agent link's acceptor in force.
    pub(crate) fn agents(&self) -> TlsAcceptor {
        self.agents.current()
    }

    /// The TLS telnet acceptor in force.
    pub(crate) fn operator(&self) -> TlsAcceptor {
        self.operator.current()
    }

    /// The admin API's acceptor in force.
    pub(crate) fn admin(&self) -> TlsAcceptor {
        self.admin.current()
    }

    /// The connector toward machines' config ports in force.
    pub(crate) fn machines(&self) -> TlsConnector {
        self.machines.current()
    }

    /// Registers a session after its handshake. Its token is a child of `parent` (the
    /// server's shutdown token) and is also cancelled if a reload revokes the peer's
    /// certificate.
    pub(crate) fn register(
        self: &Arc<Self>,
        listener: &'static str,
        who: &Identity,
        peer: std::net::SocketAddr,
        conn: &CommonState,
        parent: &CancellationToken,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = parent.child_token();
        let revoked = CancellationToken::new();
        let serial = tls::peer_serial(conn).unwrap_or_default();
        self.sessions.lock_unpoisoned().insert(
            id,
            Live {
                listener,
                who: who.to_string(),
                peer: peer.to_string(),
                serial,
                close: token.clone(),
                revoked: revoked.clone(),
            },
        );
        Registration {
            state: self.clone(),
            id,
            token,
            revoked,
        }
    }

    /// Re-reads the files, swaps every configuration, and closes the established
    /// sessions whose certificate the CRLs now list. On error nothing changes.
    pub(crate) fn reload(&self) -> Result<Reloaded, TlsError> {
        let c = Configs::build(&self.files, self.machine_policy)?;
        let revoked = tls::revoked_serials(&self.files.crls)?;
        self.agents.install(c.agents);
        self.operator.install(c.operator);
        self.admin.install(c.admin);
        self.machines.install(c.machines);
        let closed = self.close_revoked(&revoked);
        Ok(Reloaded {
            revoked_serials: revoked.len(),
            closed,
        })
    }

    fn close_revoked(&self, revoked: &HashSet<Vec<u8>>) -> Vec<String> {
        let sessions = self.sessions.lock_unpoisoned();
        let mut closed = Vec::new();
        for s in sessions.values() {
            if s.serial.is_empty() || !revoked.contains(&s.serial) {
                continue;
            }
            // The revoked flag first, so the session knows why its token is cancelled.
            s.revoked.cancel();
            s.close.cancel();
            crate::metrics::global().sessions_revoked.inc(&[s.listener]);
            tracing::warn!(
                listener = s.listener,
                peer = %s.peer,
                "closing the session of {}: its certificate (serial {}) is revoked by the \
                 reloaded CRL",
                s.who,
                hex(&s.serial)
            );
            closed.push(format!("{} {}", s.listener, s.who));
        }
        closed.sort();
        closed
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reloads `state` on every SIGHUP until `shutdown`, counting the outcomes.
pub(crate) async fn reload_on_sighup(
    state: Arc<TlsState>,
    hup: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    scm_common::reload::reload_on_sighup(hup, shutdown, move || {
        let r = state.reload();
        let result = if r.is_ok() { "ok" } else { "failed" };
        crate::metrics::global().tls_reloads.inc(&[result]);
        r.map(|r| {
            format!(
                ": {} revoked serial(s) listed; {} session(s) closed{}",
                r.revoked_serials,
                r.closed.len(),
                if r.closed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.closed.join(", "))
                }
            )
        })
    })
    .await
}
