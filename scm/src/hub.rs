//! The SCM's shared state: configuration, database handle, TLS configurations, swipe
//! handling, and the in-process coordinators ([`crate::coord`]: login throttle, session
//! registry, delivery locks, retry scheduling, event bus), each reached through its
//! interface.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::app::config::ScmConfig;
use crate::coord::delivery::{DeliveryLocks, LocalDeliveryLocks};
use crate::coord::retry::{Kick, RetryScheduler};
use crate::coord::sessions::{LocalSessions, SessionRegistry};
use crate::coord::throttle::{LoginThrottle, Throttle};
use crate::ops::auth::OperatorConfig;
use crate::state::Store;

// Where the link and the front ends have always found it.
pub(crate) use crate::coord::sessions::Session;

/// Everything the SCM's servers share.
pub(crate) struct Hub {
    /// The configuration in force.
    pub cfg: ScmConfig,
    /// The database.
    pub store: Store,
    /// Failed-login throttle.
    pub throttle: Arc<dyn LoginThrottle>,
    /// TLS configurations (reloaded on SIGHUP), the client toward machines' config ports
    /// among them, and the established TLS sessions.
    pub tls: Arc<crate::tlsreload::TlsState>,
    /// Card swipes (journal, de-duplication, bridges).
    pub swipes: Arc<crate::ops::swipes::Swipes>,
    /// Wakes the retry task.
    pub retry_kick: Arc<dyn RetryScheduler>,
    /// Connections, push outcomes and swipes, for watchers (admin API).
    pub events: crate::coord::events::Events,
    /// Who holds which machine's link.
    pub sessions: Arc<dyn SessionRegistry>,
    /// One delivery per machine at a time.
    pub delivery_locks: Arc<dyn DeliveryLocks>,
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
    pub(crate) fn new(
        cfg: ScmConfig,
        store: Store,
        tls: Arc<crate::tlsreload::TlsState>,
        swipes: Arc<crate::ops::swipes::Swipes>,
        events: crate::coord::events::Events,
    ) -> Arc<Hub> {
        let throttle = Arc::new(Throttle::new(cfg.login.clone()));
        Arc::new(Hub {
            cfg,
            store,
            throttle,
            tls,
            swipes,
            retry_kick: Arc::new(Kick::default()),
            events,
            sessions: Arc::new(LocalSessions::default()),
            delivery_locks: Arc::new(LocalDeliveryLocks::default()),
            ids: AtomicU64::new(1),
        })
    }

    /// A fresh id for requests and links.
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The operator account with this name.
    pub(crate) fn operator(&self, name: &str) -> Option<&OperatorConfig> {
        self.cfg.operators.iter().find(|o| o.name == name)
    }

    /// Appends to the audit log. A failure to write is logged, never silently dropped:
    /// the action itself has already been answered by then.
    pub(crate) async fn audit(
        &self,
        actor: String,
        source: String,
        action: &'static str,
        detail: String,
    ) {
        if let Err(e) = self
            .store
            .audit()
            .append(actor, source, action, detail)
            .await
        {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}
