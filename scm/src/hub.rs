//! The SCM's shared state: configuration, database handle, TLS connector toward machines,
//! login throttle, the registry of connected machines (who is connected, from where,
//! since when, speaking which protocol version), and the event bus.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::app::config::{OperatorConfig, ScmConfig};
use crate::ops::auth::Throttle;
use crate::state::Store;

/// A machine's live event link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Peer address of the link.
    pub peer: SocketAddr,
    /// Protocol version of its HELLO.
    pub version: u8,
    /// Unix ms when the HELLO was accepted.
    pub connected_since_ms: i64,
    /// Config port the agent reported (version 1).
    pub config_port: Option<u16>,
    /// Card readers the agent announced (version 1).
    pub readers: Vec<String>,
    /// Distinguishes links of the same machine (the newest wins).
    pub link_id: u64,
}

/// Everything the SCM's servers share.
pub struct Hub {
    /// The configuration in force.
    pub cfg: ScmConfig,
    /// The database.
    pub store: Store,
    /// Failed-login throttle.
    pub throttle: Throttle,
    /// TLS configurations (reloaded on SIGHUP), the client toward machines' config ports
    /// among them, and the established TLS sessions.
    pub tls: Arc<crate::tlsreload::TlsState>,
    /// Card swipes (journal, de-duplication, bridges).
    pub swipes: Arc<crate::ops::swipes::Swipes>,
    /// Wakes the retry task.
    pub retry_kick: Arc<crate::ops::retry::Kick>,
    /// Connections, push outcomes and swipes, for watchers (admin API).
    pub events: crate::coord::events::Events,
    sessions: Mutex<HashMap<u16, Session>>,
    delivery_locks: Mutex<HashMap<u16, Arc<tokio::sync::Mutex<()>>>>,
    ids: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Builds the hub.
    pub fn new(
        cfg: ScmConfig,
        store: Store,
        tls: Arc<crate::tlsreload::TlsState>,
        swipes: Arc<crate::ops::swipes::Swipes>,
        events: crate::coord::events::Events,
    ) -> Arc<Hub> {
        let throttle = Throttle::new(cfg.login.clone());
        Arc::new(Hub {
            cfg,
            store,
            throttle,
            tls,
            swipes,
            retry_kick: Arc::default(),
            events,
            sessions: Mutex::new(HashMap::new()),
            delivery_locks: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(1),
        })
    }

    /// A fresh id for requests and links.
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The operator account with this name.
    pub fn operator(&self, name: &str) -> Option<&OperatorConfig> {
        self.cfg.operators.iter().find(|o| o.name == name)
    }

    /// Registers a machine's link; a newer link replaces an older one.
    pub fn register(&self, id: u16, session: Session) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.insert(id, session);
    }

    /// Removes the machine's link if it is still `link_id`.
    pub fn unregister(&self, id: u16, link_id: u64) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if s.get(&id).is_some_and(|x| x.link_id == link_id) {
            s.remove(&id);
        }
    }

    /// The machine's live link, if any.
    pub fn session(&self, id: u16) -> Option<Session> {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.get(&id).cloned()
    }

    /// Number of connected machines.
    pub fn connected(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Appends to the audit log. A failure to write is logged, never silently dropped:
    /// the action itself has already been answered by then.
    pub async fn audit(&self, actor: String, source: String, action: &'static str, detail: String) {
        if let Err(e) = self
            .store
            .audit()
            .append(actor, source, action, detail)
            .await
        {
            tracing::error!("cannot write the audit log: {e}");
        }
    }

    /// The lock that serialises deliveries to one machine.
    pub fn delivery_lock(&self, id: u16) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self
            .delivery_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        l.entry(id).or_default().clone()
    }
}
