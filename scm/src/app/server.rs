//! Wires the SCM together: opens the database, loads the TLS material, and runs every
//! listener (agent link, plain telnet, TLS telnet, Generic devices, metrics, admin API) on pre-bound
//! sockets until the shutdown token is cancelled.

use std::sync::Arc;

use scm_certs::tls::TlsPolicy;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::config::{Limits, ListenSection, ScmConfig};
use crate::bridges::generic::GenericBridge;
use crate::front::admin::AdminContext;
use crate::front::telnet::TelnetContext;
use crate::link::LinkContext;
use crate::ops::Ops;
use crate::ops::swipes::Swipes;
use crate::state::{self, Store};
use crate::{front, link};

/// The SCM's listeners, bound by the caller.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Agent event link.
    pub agents: Option<TcpListener>,
    /// Plain telnet.
    pub telnet: Option<TcpListener>,
    /// TLS telnet.
    pub telnet_tls: Option<TcpListener>,
    /// One per Generic card reader device, in configuration order.
    pub generic: Vec<TcpListener>,
    /// Metrics and health (HTTP).
    pub metrics: Option<TcpListener>,
    /// gRPC admin API.
    pub admin: Option<TcpListener>,
    /// RFIDeas 241 configuration listeners (shared and per device).
    pub rfideas: crate::bridges::rfideas::Listeners,
}

/// Why the SCM could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("{0}")]
    Bind(#[from] std::io::Error),
    /// TLS material could not be loaded.
    #[error("{0}")]
    Tls(#[from] scm_certs::tls::TlsError),
    /// The database could not be opened.
    #[error("{}", .0.operator_hint())]
    Store(#[from] state::StoreError),
    /// The RFIDeas 241 bridge could not start.
    #[error("{0}")]
    Rfideas(#[from] crate::bridges::rfideas::RfideasError),
}

/// Binds every configured listener (an empty address disables it) and logs each
/// `listening on ADDR (NAME)` line. Only the metrics listener may fail to bind: the SCM
/// then logs the error and runs without metrics.
pub async fn bind_all(prepared: &Prepared) -> Result<Listeners, StartError> {
    let listen = &prepared.listen;
    async fn one(addr: &str, name: &str) -> Result<Option<TcpListener>, StartError> {
        if addr.is_empty() {
            return Ok(None);
        }
        Ok(Some(scm_common::bind(addr, name).await?))
    }
    Ok(Listeners {
        agents: one(&listen.agents, "agents").await?,
        telnet: one(&listen.telnet, "telnet").await?,
        telnet_tls: one(&listen.telnet_tls, "telnet-tls").await?,
        generic: prepared.ops.swipes.bridge().bind().await?,
        rfideas: prepared.ops.swipes.rfideas().bind(&listen.rfideas).await?,
        metrics: match one(&listen.metrics, "metrics").await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}; metrics disabled");
                None
            }
        },
        admin: one(&listen.admin, "admin").await?,
    })
}

/// Loads what `serve` needs and fails early, so `check-config` can run it too.
///
/// Must be called inside a tokio runtime (it starts the swipe journal's tasks).
pub struct Prepared {
    /// The use-case layer, shared by the front ends and the retry task.
    pub(crate) ops: Arc<Ops>,
    /// Each server's context.
    pub(crate) link: Arc<LinkContext>,
    pub(crate) telnet: Arc<TelnetContext>,
    pub(crate) admin: Arc<AdminContext>,
    metrics: Arc<crate::front::metrics::Endpoints>,
    /// Where to listen, and the connection caps.
    listen: ListenSection,
    limits: Limits,
    sighup: Option<tokio::signal::unix::Signal>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

/// Opens the database and loads TLS material.
pub fn prepare(cfg: ScmConfig) -> Result<Prepared, StartError> {
    let files = cfg.tls_files();
    let machine_policy = TlsPolicy {
        allow_tls12: cfg.tls.allow_tls12_for_machines,
    };
    let tls = crate::tlsreload::TlsState::load(files, machine_policy)?;
    let store = Store::open_with_timeout(
        &cfg.database.path,
        std::time::Duration::from_millis(cfg.database.busy_timeout_ms),
    )?;
    let machines: Vec<(u16, String, u8)> = cfg
        .machines
        .iter()
        .map(|m| (m.id, m.name.clone(), m.protocol_version))
        .collect();
    store.fleet().sync_machines(&machines)?;
    let events = crate::coord::events::Events::new(cfg.events.capacity);
    let (outcome_tx, outcome_rx) = tokio::sync::mpsc::channel(4096);
    let bridge = GenericBridge::new(cfg.generic.clone(), cfg.bridge.clone(), outcome_tx);
    let (rf_tx, rf_rx) = tokio::sync::mpsc::channel(4096);
    let rfideas = crate::bridges::rfideas::RfideasBridge::new(
        cfg.rfideas.clone(),
        cfg.rfideas_bridge.clone(),
        &cfg.tls.ca,
        store.devices().clone(),
        rf_tx,
    )?;
    let swipes = Swipes::start(
        &store,
        cfg.swipes.clone(),
        cfg.cards.clone(),
        bridge,
        outcome_rx,
        rfideas,
        rf_rx,
        events.clone(),
    )?;
    let ops = Ops::new(
        cfg.ops_settings(),
        store,
        tls.clone(),
        swipes,
        events.clone(),
    );
    let link = Arc::new(LinkContext {
        settings: cfg.link_settings(),
        fleet: ops.store.fleet().clone(),
        sessions: ops.sessions.clone(),
        delivery_locks: ops.delivery_locks.clone(),
        events,
        tls: tls.clone(),
        ids: ops.ids.clone(),
        upcalls: Arc::new(crate::ops::LinkUpcalls(ops.clone())),
    });
    let telnet = Arc::new(TelnetContext {
        ops: ops.clone(),
        throttle: Arc::new(crate::coord::throttle::Throttle::new(cfg.login.clone())),
        tls: tls.clone(),
        settings: cfg.telnet_settings(),
    });
    let admin = Arc::new(AdminContext {
        ops: ops.clone(),
        tls,
        handshake: cfg.handshake(),
    });
    let metrics = Arc::new(crate::front::metrics::Endpoints::new(
        ops.clone(),
        cfg.tls.cert.clone(),
        cfg.tls.ca.clone(),
    ));
    // Installed before any listener is announced (see `scm_common::reload::sighup`).
    let sighup = scm_common::reload::sighup();
    Ok(Prepared {
        ops,
        link,
        telnet,
        admin,
        metrics,
        listen: cfg.listen,
        limits: cfg.limits,
        sighup,
    })
}

/// Runs every listener until `shutdown` is cancelled, then waits for them to stop.
pub async fn serve(prepared: Prepared, listeners: Listeners, shutdown: CancellationToken) {
    let Prepared {
        ops,
        link,
        telnet,
        admin,
        metrics,
        limits,
        sighup,
        ..
    } = prepared;
    let mut set = JoinSet::new();
    if let Some(hup) = sighup {
        // Ends only on shutdown.
        set.spawn(crate::tlsreload::reload_on_sighup(
            ops.tls.clone(),
            hup,
            shutdown.clone(),
        ));
    }
    if let Some(l) = listeners.agents {
        let ctx = link.clone();
        let opts = scm_common::ServeOptions::new("agents", limits.max_agent_connections)
            .per_source(limits.max_agent_connections_per_source);
        set.spawn(scm_common::serve(
            l,
            opts,
            shutdown.clone(),
            move |tcp, peer, token| {
                let link = link::handle(ctx.clone(), ctx.tls.agents(), tcp, peer, token);
                async move {
                    let r = link.await;
                    if let Err(link::LinkError::Handshake(e)) = &r {
                        crate::metrics::handshake_failed("agents", e);
                    }
                    r
                }
            },
        ));
    }
    if let Some(l) = listeners.telnet {
        let ctx = telnet.clone();
        let opts = scm_common::ServeOptions::new("telnet", limits.max_operator_connections)
            .per_source(limits.max_connections_per_source);
        set.spawn(scm_common::serve(
            l,
            opts,
            shutdown.clone(),
            move |tcp, peer, token| front::telnet::handle_plain(ctx.clone(), tcp, peer, token),
        ));
    }
    set.spawn(crate::ops::retry::run(
        ops.clone(),
        ops.retry_kick.clone(),
        shutdown.clone(),
    ));
    if !listeners.generic.is_empty() {
        let bridge = ops.swipes.bridge().clone();
        set.spawn(bridge.serve(listeners.generic, shutdown.clone()));
    }
    if !ops.swipes.rfideas().is_empty() {
        let rfideas = ops.swipes.rfideas().clone();
        set.spawn(rfideas.serve(listeners.rfideas, shutdown.clone()));
    }
    if let Some(l) = listeners.telnet_tls {
        let ctx = telnet.clone();
        let opts = scm_common::ServeOptions::new("telnet-tls", limits.max_operator_connections)
            .per_source(limits.max_connections_per_source);
        set.spawn(scm_common::serve(
            l,
            opts,
            shutdown.clone(),
            move |tcp, peer, token| {
                let session =
                    front::telnet::handle_tls(ctx.clone(), ctx.tls.operator(), tcp, peer, token);
                async move {
                    let r = session.await;
                    if let Err(front::telnet::SessionError::Handshake(e)) = &r {
                        crate::metrics::handshake_failed("telnet-tls", e);
                    }
                    r
                }
            },
        ));
    }
    if let Some(l) = listeners.admin {
        let ctx = admin.clone();
        let opts = scm_common::ServeOptions::new("admin", limits.max_operator_connections)
            .per_source(limits.max_connections_per_source);
        set.spawn(scm_common::serve(
            l,
            opts,
            shutdown.clone(),
            move |tcp, peer, token| {
                let conn =
                    crate::front::admin::handle(ctx.clone(), ctx.tls.admin(), tcp, peer, token);
                async move {
                    let r = conn.await;
                    if let Err(crate::front::admin::ConnError::Handshake(e)) = &r {
                        crate::metrics::handshake_failed("admin", e);
                    }
                    r
                }
            },
        ));
    }
    if let Some(l) = listeners.metrics {
        set.spawn(scm_common::http::serve(
            l,
            "metrics",
            metrics,
            scm_common::http::HttpOptions {
                max_per_source: limits.max_connections_per_source,
                ..Default::default()
            },
            shutdown.clone(),
        ));
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r {
            tracing::error!("a listener task failed: {e}");
        }
        if !shutdown.is_cancelled() {
            tracing::error!("a listener stopped without shutdown; shutting down the SCM");
            shutdown.cancel();
        }
    }
}
