//! The use cases, written once for every front end: configuration pushes (one machine, a
//! fleet, rollback), their retries, the audit log, operator logins, and the path of a card
//! swipe from the agent link to the print-server bridges.
//!
//! [`Ops`] is the layer's context: its own settings ([`OpsSettings`], assembled by the
//! application from the configuration file), the store, the TLS client toward machines'
//! config ports and the coordinators it uses. The front ends hold an `Arc<Ops>` and call
//! the use cases with it; the agent link reaches back into this layer only through
//! [`crate::link::Upcalls`], implemented here by [`LinkUpcalls`].

use std::sync::Arc;
use std::time::Duration;

use crate::coord::delivery::{DeliveryLocks, LocalDeliveryLocks};
use crate::coord::events::Events;
use crate::coord::ids::Ids;
use crate::coord::retry::{Kick, RetryScheduler};
use crate::coord::sessions::{LocalSessions, Session, SessionRegistry};
use crate::state::Store;

pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod fleet;
pub(crate) mod operator;
pub(crate) mod push;
pub(crate) mod retry;
pub(crate) mod swipes;

use auth::OperatorConfig;
use fleet::MachineConfig;

/// What the use cases need of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct OpsSettings {
    /// The machines this SCM knows.
    pub machines: Vec<MachineConfig>,
    /// Operator accounts.
    pub operators: Vec<OperatorConfig>,
    /// Largest configuration accepted from an operator, in bytes.
    pub max_config_bytes: usize,
    /// Deliveries in flight at once during a push to a group or to all machines.
    pub push_concurrency: usize,
    /// Connecting to a machine's config port (TCP and TLS).
    pub push_connect: Duration,
    /// Waiting for a machine's ACK or NACK to a CONFIG.
    pub push_reply: Duration,
    /// Retries of pending pushes.
    pub retry: retry::RetrySettings,
}

impl OpsSettings {
    /// The configured machine `id`.
    pub(crate) fn machine(&self, id: u16) -> Option<&MachineConfig> {
        fleet::machine(&self.machines, id)
    }
}

/// The use-case layer's context, shared by every front end and task.
pub(crate) struct Ops {
    /// Its settings.
    pub settings: OpsSettings,
    /// The database.
    pub store: Store,
    /// TLS configurations (reloaded on SIGHUP): the client toward machines' config ports.
    pub tls: Arc<crate::tlsreload::TlsState>,
    /// Card swipes (journal, de-duplication, bridges).
    pub swipes: Arc<swipes::Swipes>,
    /// Wakes the retry task.
    pub retry_kick: Arc<dyn RetryScheduler>,
    /// Connections, push outcomes and swipes, for watchers (admin API).
    pub events: Events,
    /// Who holds which machine's link.
    pub sessions: Arc<dyn SessionRegistry>,
    /// One delivery per machine at a time.
    pub delivery_locks: Arc<dyn DeliveryLocks>,
    /// Request and link ids.
    pub ids: Arc<Ids>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Ops {
    /// Builds the layer with today's in-process coordinators.
    pub(crate) fn new(
        settings: OpsSettings,
        store: Store,
        tls: Arc<crate::tlsreload::TlsState>,
        swipes: Arc<swipes::Swipes>,
        events: Events,
    ) -> Arc<Ops> {
        Arc::new(Ops {
            settings,
            store,
            tls,
            swipes,
            retry_kick: Arc::new(Kick::default()),
            events,
            sessions: Arc::new(LocalSessions::default()),
            delivery_locks: Arc::new(LocalDeliveryLocks::default()),
            ids: Arc::new(Ids::default()),
        })
    }

    /// A fresh id for requests.
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.next()
    }

    /// The operator account with this name.
    pub(crate) fn operator(&self, name: &str) -> Option<&OperatorConfig> {
        self.settings.operators.iter().find(|o| o.name == name)
    }

    /// The machine's live link, if any.
    pub(crate) fn session(&self, id: u16) -> Option<Session> {
        self.sessions.session(id)
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

/// What the agent link asks of this layer: the verdict on a swipe, a background delivery
/// of the pending configuration, the record of an in-band delivery's outcome.
#[derive(Debug)]
pub(crate) struct LinkUpcalls(pub Arc<Ops>);

impl crate::link::Upcalls for LinkUpcalls {
    fn swipe<'a>(
        &'a self,
        machine: u16,
        swipe: &'a scm_proto::v1::Swipe,
        waited: std::time::Duration,
    ) -> crate::link::UpcallFuture<'a, crate::link::SwipeVerdict> {
        Box::pin(self.0.swipes.receive(machine, swipe, waited))
    }

    fn deliver_pending(&self, machine: u16) {
        let ops = self.0.clone();
        tokio::spawn(async move {
            match ops.store.fleet().pending_generation(machine).await {
                Ok(Some(g)) => {
                    if let Err(e) = push::deliver(&ops, g).await {
                        tracing::warn!(machine, "cannot record delivery: {e}");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(machine, "cannot read pending configuration: {e}"),
            }
        });
    }

    fn in_band_outcome<'a>(
        &'a self,
        machine: u16,
        result: &'a crate::link::PushResult,
        elapsed: Option<Duration>,
    ) -> crate::link::UpcallFuture<'a, Result<(), crate::state::StoreError>> {
        Box::pin(async move {
            push::count_outcome(result, elapsed);
            push::record(&self.0, machine, result).await
        })
    }
}
