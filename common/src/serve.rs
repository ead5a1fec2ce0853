//! The accept loop every TCP server of the workspace runs (agent links, config ports,
//! telnet, card-reader bridges).
//!
//! It takes a listener that the caller already bound (so tests bind port 0) and a
//! shutdown token, caps concurrent connections with an owned semaphore permit taken
//! before `accept`, runs one task per connection inside a tracing span, and never lets
//! a connection's error end the listener. On shutdown it stops accepting, cancels the
//! connections' token and waits for them up to a grace period.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Binds `addr` and logs the machine-readable line `listening on ADDR (NAME)` with the
/// address actually bound (so a port of 0 becomes the real port).
pub async fn bind(addr: &str, name: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for {name}: {e}; choose a free address or port"),
        )
    })?;
    announce(&listener, name)?;
    Ok(listener)
}

/// Logs `listening on ADDR (NAME)` for an already bound listener.
pub fn announce(listener: &TcpListener, name: &str) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!("listening on {local} ({name})");
    Ok(())
}

/// How one listener is run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Name used in logs and spans (`agents`, `telnet`, ...).
    pub name: String,
    /// At most this many connections are served at once; further clients wait in the
    /// kernel's accept queue until a slot frees.
    pub max_connections: usize,
    /// How long open connections get to finish after shutdown before they are aborted.
    pub grace: Duration,
}

impl ServeOptions {
    /// Options with the given name and cap, and a 5 s grace period.
    pub fn new(name: impl Into<String>, max_connections: usize) -> Self {
        Self {
            name: name.into(),
            max_connections: max_connections.max(1),
            grace: Duration::from_secs(5),
        }
    }
}

/// Runs the accept loop until `shutdown` is cancelled.
///
/// `handler` is called once per connection, in its own task, with the stream, the peer
/// address and a token that is cancelled when the server shuts down. Its error is logged
/// (at `debug` for resets and EOFs, `warn` otherwise) and never reaches the loop.
pub async fn serve<H, Fut, E>(
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(TcpStream, SocketAddr, CancellationToken) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    let mut tasks = JoinSet::new();
    let conn_token = shutdown.child_token();
    let mut accept_backoff = Duration::from_millis(10);
    loop {
        // Reap finished connection tasks so the set does not grow.
        while let Some(res) = tasks.try_join_next() {
            if let Err(e) = res
                && e.is_panic()
            {
                tracing::error!(listener = %opts.name, "connection task panicked: {e}");
            }
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => { accept_backoff = Duration::from_millis(10); x }
                Err(e) => {
                    // Usually EMFILE/ENFILE: back off instead of spinning.
                    tracing::warn!(listener = %opts.name, "accept failed: {e}; retrying in {accept_backoff:?}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(accept_backoff) => {}
                    }
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("conn", listener = %opts.name, peer = %peer);
        let fut = handler(stream, peer, conn_token.clone());
        tasks.spawn(
            async move {
                tracing::debug!("accepted");
                match fut.await {
                    Ok(()) => tracing::debug!("closed"),
                    Err(e) => {
                        let msg = e.to_string();
                        if is_benign(&msg) {
                            tracing::debug!("closed: {msg}");
                        } else {
                            tracing::warn!("connection ended with an error: {msg}");
                        }
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    conn_token.cancel();
    let drained = tokio::time::timeout(opts.grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(listener = %opts.name, "connections still open after {:?}; aborting them", opts.grace);
        tasks.shutdown().await;
    }
    tracing::info!(listener = %opts.name, "stopped");
}

/// Errors that are a normal end of a connection rather than a problem.
fn is_benign(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("connection reset")
        || m.contains("broken pipe")
        || m.contains("unexpected eof")
        || m.contains("close_notify")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_once(
        mut s: TcpStream,
        _peer: SocketAddr,
        _t: CancellationToken,
    ) -> Result<(), std::io::Error> {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        s.write_all(&b).await
    }

    #[tokio::test]
    async fn serves_until_cancelled_and_survives_failing_connections() {
        let l = bind("127.0.0.1:0", "test").await.unwrap();
        let addr = l.local_addr().unwrap();
        let token = CancellationToken::new();
        let server = tokio::spawn(serve(
            l,
            ServeOptions::new("test", 4),
            token.clone(),
            echo_once,
        ));
        // A client that closes at once makes its handler fail; the listener lives on.
        drop(TcpStream::connect(addr).await.unwrap());
        for i in 0..3u8 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
        }
        token.cancel();
        server.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn cap_holds_extra_clients_until_a_slot_frees() {
        let l = bind("127.0.0.1:0", "capped").await.unwrap();
        let addr = l.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve(
            l,
            ServeOptions::new("capped", 1),
            token.clone(),
            echo_once,
        ));
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(&[2]).await.unwrap();
        let mut b = [0u8; 1];
        // The second client is not served while the first holds the only slot.
        let waited =
            tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut b)).await;
        assert!(waited.is_err(), "second client must wait for a free slot");
        first.write_all(&[1]).await.unwrap();
        first.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], 1);
        second.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], 2);
        token.cancel();
    }
}
