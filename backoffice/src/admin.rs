//! Client of the SCM's gRPC admin API (`scm.admin.v1.Admin`, see `docs/admin-api.md`).
//!
//! The connection is ours end to end: TCP, then [`scm_certs::tls::connect`] with the
//! operator certificate (TLS 1.3 only, ALPN `h2`, the SCM's identity checked), then one
//! HTTP/2 connection driven by hyper. [`H2Channel`] turns it into the service the
//! generated tonic client needs, so no tonic transport (and no second TLS stack) is
//! involved. [`format_event`] renders one event as the line `backoffice watch` prints.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use scm_certs::identity::Identity;
use scm_certs::tls::{self, TlsFiles, TlsPolicy};
use scm_proto::admin as pb;
use scm_proto::admin::admin_client::AdminClient;
use tokio::net::TcpStream;
use tokio_rustls::rustls::ClientConfig;

use crate::config::BackofficeConfig;

/// The admin client over one HTTP/2 connection.
pub type Client = AdminClient<H2Channel>;

/// Why the admin API could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// `[admin]` or `[tls]` is missing from the configuration.
    #[error("{0}")]
    NotConfigured(String),
    /// TCP.
    #[error(
        "cannot connect to the SCM admin API at {addr}: {reason}; is `scm serve` running with [listen] admin set?"
    )]
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
    #[error("TLS handshake with the SCM admin API failed ({reason}): {0}", reason = .0.reason())]
    Handshake(#[from] tls::HandshakeError),
    /// HTTP/2 could not start.
    #[error(
        "HTTP/2 with the SCM admin API failed: {0}; was the operator certificate refused? (the SCM logs why)"
    )]
    Http2(#[from] hyper::Error),
}

/// One HTTP/2 connection as a tower service for the generated tonic client.
#[derive(Debug, Clone)]
pub struct H2Channel {
    send: SendRequest<tonic::body::Body>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

/// The client configuration for the admin API: `cfg` with ALPN `h2` added.
pub fn with_h2(cfg: &ClientConfig) -> Arc<ClientConfig> {
    let mut cfg = cfg.clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Connects to the admin API at `addr` with the TLS client configuration `client` (ALPN
/// `h2` is added), expecting the SCM's identity; each step bounded by `timeout`.
pub async fn connect_with(
    addr: &str,
    client: &ClientConfig,
    timeout: Duration,
) -> Result<Client, AdminError> {
    let channel = channel_with(addr, client, timeout).await?;
    Ok(AdminClient::with_origin(channel, origin()))
}

/// The origin the clients name in their requests (the SCM does not route on it).
pub fn origin() -> http::Uri {
    http::Uri::from_static("https://scm.hub.internal")
}

/// The HTTP/2 connection under [`connect_with`], for other clients of the admin port
/// (`grpc.health.v1`, `grpc.reflection.v1`).
pub async fn channel_with(
    addr: &str,
    client: &ClientConfig,
    timeout: Duration,
) -> Result<H2Channel, AdminError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| AdminError::Tcp {
            addr: addr.to_string(),
            reason: format!("no answer within {timeout:?}"),
        })?
        .map_err(|e| AdminError::Tcp {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(with_h2(client));
    let stream = tls::connect(&connector, tcp, &Identity::Scm, timeout).await?;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("admin API connection ended: {e}");
        }
    });
    Ok(H2Channel { send })
}

/// Connects as configured: `[admin] address` with the operator certificate of `[tls]`.
pub async fn connect(cfg: &BackofficeConfig) -> Result<Client, AdminError> {
    let admin = cfg.admin.as_ref().ok_or_else(|| {
        AdminError::NotConfigured(
            "no [admin] section: set [admin] address = \"HOST:PORT\" (the SCM's [listen] admin) \
             or BACKOFFICE__ADMIN__ADDRESS"
                .into(),
        )
    })?;
    let files = cfg.tls.as_ref().ok_or_else(|| {
        AdminError::NotConfigured(
            "the admin API needs the operator certificate: add a [tls] section with ca, cert and key"
                .into(),
        )
    })?;
    let client = tls::client_config(
        &TlsFiles {
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
            crls: Vec::new(),
        },
        TlsPolicy::default(),
    )?;
    connect_with(
        &admin.address,
        &client,
        Duration::from_millis(cfg.timeouts.connect_ms),
    )
    .await
}

/// Unix ms as RFC 3339 UTC with milliseconds.
pub fn fmt_ms(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// The outcome as the text output names it (`ACK`, `NACK`, ...).
pub fn outcome_name(o: i32) -> &'static str {
    match pb::PushOutcome::try_from(o) {
        Ok(pb::PushOutcome::Ack) => "ACK",
        Ok(pb::PushOutcome::Nack) => "NACK",
        Ok(pb::PushOutcome::Pending) => "PENDING",
        Ok(pb::PushOutcome::Superseded) => "SUPERSEDED",
        Ok(pb::PushOutcome::Refused) => "REFUSED",
        Ok(pb::PushOutcome::Unspecified) | Err(_) => "UNKNOWN",
    }
}

/// One event as one line: `TIME #SEQ WHAT ...`. Control characters in texts from the
/// SCM are replaced, so one event is always one line.
pub fn format_event(e: &pb::Event) -> String {
    use pb::event::Kind;
    let what = match &e.kind {
        Some(Kind::Connected(c)) => format!(
            "connected machine {} from {} (protocol {})",
            c.machine_id, c.peer_address, c.protocol_version
        ),
        Some(Kind::Disconnected(d)) => {
            format!("disconnected machine {} ({})", d.machine_id, d.peer_address)
        }
        Some(Kind::Push(p)) => format!(
            "push machine {} generation {} {}: {}",
            p.machine_id,
            p.generation,
            outcome_name(p.outcome),
            p.detail
        ),
        Some(Kind::Swipe(s)) => format!(
            "swipe machine {} reader {} card {} {}: {}",
            s.machine_id, s.reader, s.card_masked, s.outcome, s.detail
        ),
        Some(Kind::Lagged(l)) => format!(
            "lagged, {} events dropped (this watcher was too slow)",
            l.dropped
        ),
        None => "unknown event (newer SCM?)".to_string(),
    };
    let line = if e.seq == 0 {
        format!("{} {what}", fmt_ms(e.at_ms))
    } else {
        format!("{} #{} {what}", fmt_ms(e.at_ms), e.seq)
    };
    line.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::event::Kind;

    #[test]
    fn events_print_as_one_line_each() {
        let e = pb::Event {
            seq: 4,
            at_ms: 1_700_000_000_123,
            kind: Some(Kind::Push(pb::PushEvent {
                machine_id: 1,
                generation: 2,
                outcome: pb::PushOutcome::Ack as i32,
                detail: "stored\nok".into(),
            })),
        };
        assert_eq!(
            format_event(&e),
            "2023-11-14T22:13:20.123Z #4 push machine 1 generation 2 ACK: stored ok"
        );
        let s = pb::Event {
            seq: 5,
            at_ms: 0,
            kind: Some(Kind::Swipe(pb::SwipeEvent {
                machine_id: 1,
                reader: "r1".into(),
                card_masked: "****5678".into(),
                outcome: "accepted".into(),
                detail: "queued".into(),
            })),
        };
        assert!(
            format_event(&s)
                .ends_with("#5 swipe machine 1 reader r1 card ****5678 accepted: queued")
        );
        let l = pb::Event {
            seq: 0,
            at_ms: 0,
            kind: Some(Kind::Lagged(pb::Lagged { dropped: 7 })),
        };
        assert!(format_event(&l).contains("lagged, 7 events dropped"));
        assert!(!format_event(&l).contains('#'));
    }
}
