//! A tiny HTTP/1.1 server for `GET /metrics` and `GET /health`, nothing else.
//!
//! It runs on a pre-bound listener through the shared accept loop ([`crate::serve`]), one
//! task per connection, and serves exactly one request per connection
//! (`Connection: close`). The request head is read into a buffer of at most
//! [`HttpOptions::max_request_bytes`] and must arrive within
//! [`HttpOptions::request_timeout`]; a larger head is answered `431` and a slower one is
//! closed without an answer. A request body is never read. Answers: `200` (metrics, or
//! health when healthy), `503` with the reason (unhealthy), `404` (other paths), `405`
//! (methods other than GET), `400` (not an HTTP/1.x request line).
//!
//! Why this is not the 241 bridge's parser (`scm::bridges::rfideas::http`): all three
//! binaries serve metrics, and only the SCM has that parser; and a scraper needs nothing
//! but the request line, while that parser exists to refuse every doubtful header from
//! devices on the network. Sharing it would put its stricter refusals (`400` for a header
//! it finds doubtful, `505`) in front of monitoring that works today, for no gain: this
//! server never reads a header, a body or a second request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ServeOptions;

/// Why a process reports itself unhealthy (`503`, the reason as the body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unhealthy(pub String);

/// What the server exposes.
pub trait Endpoints: Send + Sync + 'static {
    /// The metrics in the Prometheus text format.
    fn metrics(&self) -> impl Future<Output = String> + Send;
    /// `Ok(())` when the process is serving, otherwise the reason.
    fn health(&self) -> impl Future<Output = Result<(), Unhealthy>> + Send;
}

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest request head (request line and headers), in bytes.
    pub max_request_bytes: usize,
    /// The whole request head must arrive within this time; writing the answer gets as
    /// long again.
    pub request_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections from one source address at once (0: no limit).
    pub max_per_source: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            max_request_bytes: 8 * 1024,
            request_timeout: Duration::from_secs(5),
            max_connections: 16,
            max_per_source: 0,
        }
    }
}

/// Why one HTTP connection ended without an answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The request head did not arrive in time.
    #[error("request not received within {0:?}; closed")]
    Timeout(Duration),
    /// The request head is larger than allowed.
    #[error("request head larger than {0} bytes; closed")]
    TooLarge(usize),
    /// The peer closed before sending a whole request head.
    #[error("unexpected eof before a complete request")]
    Incomplete,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the server on `listener` until `shutdown` is cancelled.
pub async fn serve<E: Endpoints>(
    listener: TcpListener,
    name: &str,
    endpoints: Arc<E>,
    opts: HttpOptions,
    shutdown: CancellationToken,
) {
    let serve_opts = ServeOptions::new(name, opts.max_connections).per_source(opts.max_per_source);
    let opts = Arc::new(opts);
    crate::serve(
        listener,
        serve_opts,
        shutdown,
        move |stream, _peer: SocketAddr, token| {
            let endpoints = endpoints.clone();
            let opts = opts.clone();
            async move { handle(stream, &*endpoints, &opts, &token).await }
        },
    )
    .await;
}

/// Serves one request on `stream`.
pub async fn handle<S, E>(
    mut stream: S,
    endpoints: &E,
    opts: &HttpOptions,
    shutdown: &CancellationToken,
) -> Result<(), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    E: Endpoints,
{
    let head = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(opts.request_timeout, read_head(&mut stream, opts.max_request_bytes)) => match r {
            Err(_) => return Err(HttpError::Timeout(opts.request_timeout)),
            Ok(Err(HttpError::TooLarge(n))) => {
                let answer = response(431, "Request Header Fields Too Large", "text/plain", "request too large\n", &[]);
                let _ = tokio::time::timeout(opts.request_timeout, stream.write_all(&answer)).await;
                return Err(HttpError::TooLarge(n));
            }
            Ok(r) => r?,
        },
    };
    let answer = answer(&head, endpoints).await;
    tokio::time::timeout(opts.request_timeout, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| HttpError::Timeout(opts.request_timeout))??;
    Ok(())
}

/// Reads until the blank line that ends the request head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> Result<String, HttpError> {
    let mut buf = vec![0u8; max];
    let mut have = 0;
    loop {
        if have == max {
            return Err(HttpError::TooLarge(max));
        }
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(HttpError::Incomplete);
        }
        // Look for the end from a little before the new bytes.
        let from = have.saturating_sub(3);
        have += n;
        let window = &buf[from..have];
        if let Some(end) = find(window, b"\r\n\r\n").or_else(|| find(window, b"\n\n")) {
            return Ok(String::from_utf8_lossy(&buf[..from + end]).into_owned());
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn answer<E: Endpoints>(head: &str, endpoints: &E) -> Vec<u8> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return response(400, "Bad Request", "text/plain", "bad request line\n", &[]);
    };
    if !version.starts_with("HTTP/1.") {
        return response(400, "Bad Request", "text/plain", "HTTP/1.x only\n", &[]);
    }
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return response(
            405,
            "Method Not Allowed",
            "text/plain",
            "only GET is served\n",
            &[("Allow", "GET")],
        );
    }
    match path {
        "/metrics" => response(
            200,
            "OK",
            crate::metrics::CONTENT_TYPE,
            &endpoints.metrics().await,
            &[],
        ),
        "/health" => match endpoints.health().await {
            Ok(()) => response(200, "OK", "text/plain", "ok\n", &[]),
            Err(why) => response(
                503,
                "Service Unavailable",
                "text/plain",
                &format!("unhealthy: {}\n", why.0.replace(['\r', '\n'], " ")),
                &[],
            ),
        },
        _ => response(
            404,
            "Not Found",
            "text/plain",
            "not found; try /metrics or /health\n",
            &[],
        ),
    }
}

fn response(
    status: u16,
    reason: &str,
    content_type: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::net::TcpStream;

    #[derive(Debug, Default)]
    struct Fake {
        sick: AtomicBool,
    }

    impl Endpoints for Fake {
        async fn metrics(&self) -> String {
            "# TYPE x_total counter\nx_total 7\n".into()
        }
        async fn health(&self) -> Result<(), Unhealthy> {
            if self.sick.load(Ordering::Relaxed) {
                Err(Unhealthy("database unreachable".into()))
            } else {
                Ok(())
            }
        }
    }

    async fn start(fake: Arc<Fake>, opts: HttpOptions) -> (SocketAddr, CancellationToken) {
        let l = crate::bind("127.0.0.1:0", "metrics").await.unwrap();
        let addr = l.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve(l, "metrics", fake, opts, token.clone()));
        (addr, token)
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_404_and_405() {
        let fake = Arc::new(Fake::default());
        let (addr, token) = start(fake.clone(), HttpOptions::default()).await;

        let m = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert!(
            m.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{m}"
        );
        assert!(m.contains("\r\nContent-Length: 33\r\n"), "{m}");
        assert!(
            m.ends_with("\r\n\r\n# TYPE x_total counter\nx_total 7\n"),
            "{m}"
        );

        let h = get(addr, "GET /health?probe=1 HTTP/1.0\n\n").await;
        assert!(
            h.starts_with("HTTP/1.1 200 OK\r\n") && h.ends_with("\r\n\r\nok\n"),
            "{h}"
        );
        fake.sick.store(true, Ordering::Relaxed);
        let h = get(addr, "GET /health HTTP/1.1\r\n\r\n").await;
        assert!(h.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{h}");
        assert!(h.ends_with("unhealthy: database unreachable\n"), "{h}");

        let n = get(addr, "GET /secrets HTTP/1.1\r\n\r\n").await;
        assert!(n.starts_with("HTTP/1.1 404 Not Found\r\n"), "{n}");
        let p = get(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(p.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{p}");
        assert!(p.contains("\r\nAllow: GET\r\n"), "{p}");
        let b = get(addr, "HELLO\r\n\r\n").await;
        assert!(b.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{b}");
        token.cancel();
    }

    #[tokio::test]
    async fn request_split_across_writes_is_served() {
        let fake = Arc::new(Fake::default());
        let (addr, token) = start(fake, HttpOptions::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        for part in ["GET /hea", "lth HTTP/1.1\r", "\n\r", "\n"] {
            c.write_all(part.as_bytes()).await.unwrap();
            c.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.ends_with("\r\n\r\nok\n"), "{out}");
        token.cancel();
    }

    #[tokio::test]
    async fn oversized_request_is_refused_and_closed() {
        let fake = Fake::default();
        let opts = HttpOptions {
            max_request_bytes: 64,
            ..HttpOptions::default()
        };
        let (mut client, server) = tokio::io::duplex(4096);
        let token = CancellationToken::new();
        let req = format!(
            "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(200)
        );
        client.write_all(req.as_bytes()).await.unwrap();
        let r = handle(server, &fake, &opts, &token).await;
        assert!(matches!(r, Err(HttpError::TooLarge(64))), "{r:?}");
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        assert!(!out.contains("x_total"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_request_is_closed_after_the_timeout() {
        let fake = Fake::default();
        let opts = HttpOptions::default();
        let (mut client, server) = tokio::io::duplex(4096);
        let token = CancellationToken::new();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        // The head never completes: with paused time the timeout fires at once.
        let r = handle(server, &fake, &opts, &token).await;
        assert!(matches!(r, Err(HttpError::Timeout(_))), "{r:?}");
        assert_eq!(started.elapsed(), opts.request_timeout);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty(), "no answer to a slow request");
    }

    #[tokio::test]
    async fn shutdown_ends_a_waiting_connection() {
        let fake = Fake::default();
        let (_client, server) = tokio::io::duplex(64);
        let token = CancellationToken::new();
        token.cancel();
        let r = handle(server, &fake, &HttpOptions::default(), &token).await;
        assert!(r.is_ok(), "{r:?}");
    }
}
