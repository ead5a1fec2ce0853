//! The back office as a library: its configuration, the telnet client dialogue with the
//! SCM, connecting over plain telnet or TLS, and the client of the SCM's gRPC admin API.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod output;

use std::time::Duration;

use scm_certs::identity::Identity;
use scm_certs::tls::{self, TlsFiles, TlsPolicy};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use client::{Client, ClientError, Reply};
use config::BackofficeConfig;

/// A plain or TLS stream to the SCM.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TCP.
    #[error("cannot connect to the SCM at {addr}: {reason}; is `scm serve` running there?")]
    Tcp {
        /// Address.
        addr: String,
        /// Reason.
        reason: String,
    },
    /// TLS material.
    #[error("{0}")]
    TlsFiles(#[from] tls::TlsError),
    /// TLS handshake.
    #[error("TLS handshake with the SCM failed ({reason}): {0}", reason = .0.reason())]
    Handshake(#[from] tls::HandshakeError),
    /// Dialogue.
    #[error("{0}")]
    Client(#[from] ClientError),
}

/// Connects and logs in as configured.
pub async fn connect(cfg: &BackofficeConfig) -> Result<Client<Box<dyn Stream>>, ConnectError> {
    let t = Duration::from_millis(cfg.timeouts.connect_ms);
    let addr = cfg.scm.address.clone();
    let tcp = tokio::time::timeout(t, TcpStream::connect(&addr))
        .await
        .map_err(|_| ConnectError::Tcp {
            addr: addr.clone(),
            reason: format!("no answer within {t:?}"),
        })?
        .map_err(|e| ConnectError::Tcp {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let reply = Duration::from_millis(cfg.timeouts.reply_ms);
    match (&cfg.tls, cfg.scm.tls) {
        (Some(files), true) => {
            let client_cfg = tls::client_config(
                &TlsFiles {
                    ca: files.ca.clone(),
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                    crls: Vec::new(),
                },
                TlsPolicy::default(),
            )?;
            let connector = tokio_rustls::TlsConnector::from(client_cfg);
            let stream = tls::connect(&connector, tcp, &Identity::Scm, t).await?;
            let mut c = Client::new(Box::new(stream) as Box<dyn Stream>, reply);
            c.login("", None).await?;
            Ok(c)
        }
        _ => {
            let mut c = Client::new(Box::new(tcp) as Box<dyn Stream>, reply);
            c.login(&cfg.login.user, Some(cfg.login.password.expose()))
                .await?;
            Ok(c)
        }
    }
}
