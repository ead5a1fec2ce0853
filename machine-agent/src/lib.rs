//! The machine agent as a library: configuration, durable storage, the config port that
//! receives CONFIG from the SCM, the event link that reports to it, and the metrics and
//! health endpoint.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod config_port;
pub mod link;
pub mod metrics;
pub mod readers;
pub mod storage;
pub mod swipes;

use std::sync::Arc;
use std::time::Duration;

use scm_certs::tls::{self, TlsPolicy};
use scm_common::lock::LockExt;
use scm_common::reload::Slot;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::config_port::ConfigPort;
use crate::storage::ConfigStore;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// TLS material could not be loaded.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    /// Storage directory unusable.
    #[error("{0}")]
    Storage(#[from] storage::StorageError),
    /// Socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Loaded, ready-to-run agent.
pub struct Agent {
    cfg: AgentConfig,
    queue: Arc<swipes::SwipeQueue>,
    port: Arc<ConfigPort>,
    connector: Arc<std::sync::RwLock<tokio_rustls::TlsConnector>>,
    sighup: std::sync::Mutex<Option<tokio::signal::unix::Signal>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Loads certificates and opens storage.
    pub fn prepare(cfg: AgentConfig) -> Result<Agent, StartError> {
        let files = cfg.tls_files();
        let server = tls::server_config(&files, TlsPolicy::default(), &[])?;
        metrics::global().record_certificates(&files);
        let client = tls::client_config(&files, TlsPolicy::default())?;
        let store = ConfigStore::open(&cfg.storage.dir)?;
        let ms = Duration::from_millis;
        let port = Arc::new(ConfigPort {
            machine_id: cfg.machine_id,
            store: tokio::sync::Mutex::new(store),
            acceptor: std::sync::RwLock::new(tokio_rustls::TlsAcceptor::from(server)),
            handshake: ms(cfg.timeouts.handshake_ms),
            idle: ms(cfg.timeouts.config_idle_ms),
            stall: ms(cfg.timeouts.frame_stall_ms),
        });
        let queue = Arc::new(swipes::SwipeQueue::new(
            cfg.swipes.clone(),
            cfg.cards.clone(),
        ));
        Ok(Agent {
            queue,
            cfg,
            port,
            connector: Arc::new(std::sync::RwLock::new(tokio_rustls::TlsConnector::from(
                client,
            ))),
            sighup: std::sync::Mutex::new(None),
        })
    }

    /// Binds the config port (logs `listening on ADDR (config)`). Also installs the SIGHUP
    /// handler first, so a SIGHUP sent once the agent has announced a listener reloads its
    /// TLS files instead of killing it.
    pub async fn bind(&self) -> Result<Option<TcpListener>, StartError> {
        *self.sighup.lock_unpoisoned() = scm_common::reload::sighup();
        if self.cfg.listen.config.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            scm_common::bind(&self.cfg.listen.config, "config").await?,
        ))
    }

    /// Binds the metrics and health listener (logs `listening on ADDR (metrics)`). A bind
    /// failure is logged and the agent runs without metrics.
    pub async fn bind_metrics(&self) -> Option<TcpListener> {
        let addr = &self.cfg.listen.metrics;
        if addr.is_empty() {
            return None;
        }
        match scm_common::bind(addr, "metrics").await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!("{e}; metrics disabled");
                None
            }
        }
    }

    /// Runs the config port, the event link and the metrics endpoint until shutdown.
    pub async fn run(
        self,
        config_listener: Option<TcpListener>,
        metrics_listener: Option<TcpListener>,
        shutdown: CancellationToken,
    ) {
        let ms = Duration::from_millis;
        let t = &self.cfg.timeouts;
        let config_addr = config_listener.as_ref().and_then(|l| l.local_addr().ok());
        let config_port = config_addr.map(|a| a.port()).unwrap_or(0);
        let settings = link::LinkSettings {
            machine_id: self.cfg.machine_id,
            scm_address: self.cfg.scm.address.clone(),
            config_port,
            config_advertise: self.cfg.listen.config_advertise.clone(),
            config_ip: link::specific_ip(config_addr),
            handshake: ms(t.handshake_ms),
            heartbeat: ms(t.heartbeat_ms),
            reply: ms(t.reply_ms),
            stall: ms(t.frame_stall_ms),
            reconnect_min: ms(t.reconnect_min_ms),
            reconnect_max: ms(t.reconnect_max_ms),
            readers: self.cfg.readers.iter().map(|r| r.id.clone()).collect(),
        };
        let mut set = tokio::task::JoinSet::new();
        if let Some(l) = config_listener {
            let port = self.port.clone();
            let opts =
                scm_common::ServeOptions::new("config", self.cfg.limits.max_config_connections)
                    .per_source(self.cfg.limits.max_config_connections_per_source);
            set.spawn(scm_common::serve(
                l,
                opts,
                shutdown.clone(),
                move |tcp, peer, token| port.clone().handle(tcp, peer, token),
            ));
        }
        if let Some(l) = metrics_listener {
            let endpoints = Arc::new(metrics::Endpoints {
                queue: self.queue.clone(),
            });
            set.spawn(scm_common::http::serve(
                l,
                "metrics",
                endpoints,
                scm_common::http::HttpOptions::default(),
                shutdown.clone(),
            ));
        }
        let hup = self.sighup.lock_unpoisoned().take();
        if let Some(hup) = hup {
            let files = self.cfg.tls_files();
            let port = self.port.clone();
            let connector = self.connector.clone();
            tokio::spawn(scm_common::reload::reload_on_sighup(
                hup,
                shutdown.clone(),
                move || {
                    reload_tls(&files, &port, &connector).map(|()| {
                        metrics::global().record_certificates(&files);
                        String::new()
                    })
                },
            ));
        }
        // The link applies the CONFIGs it receives through the config port's store and
        // lock, so saves over the link and over the port are one at a time.
        set.spawn(link::run(
            settings,
            self.connector.clone(),
            self.port.clone(),
            self.queue.clone(),
            shutdown.clone(),
        ));
        // Readers feed one bounded channel; the pipeline validates and queues.
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut readers = tokio::task::JoinSet::new();
        for r in self.cfg.readers.clone() {
            readers.spawn(readers::run(
                r,
                tx.clone(),
                shutdown.clone(),
                ms(t.reconnect_min_ms),
                ms(t.reconnect_max_ms),
            ));
        }
        drop(tx);
        let pipeline = tokio::spawn(swipes::pipeline(rx, self.queue.clone(), shutdown.clone()));
        // Readers that end (a file, stdin, a script) are fine; the agent stops on shutdown
        // or when one of its servers stops.
        if set.join_next().await.is_some() {
            shutdown.cancel();
        }
        while set.join_next().await.is_some() {}
        readers.shutdown().await;
        pipeline.abort();
    }
}

/// Re-reads the CA, certificate, key and CRL files and replaces both TLS configurations
/// (config port and event link) for new connections. On error nothing changes.
/// Established connections keep running: a config-port connection lasts one push, and the
/// event link uses the new files when it next connects.
pub fn reload_tls(
    files: &tls::TlsFiles,
    port: &ConfigPort,
    connector: &std::sync::RwLock<tokio_rustls::TlsConnector>,
) -> Result<(), tls::TlsError> {
    let server = tls::server_config(files, TlsPolicy::default(), &[])?;
    let client = tls::client_config(files, TlsPolicy::default())?;
    port.acceptor
        .install(tokio_rustls::TlsAcceptor::from(server));
    connector.install(tokio_rustls::TlsConnector::from(client));
    Ok(())
}
