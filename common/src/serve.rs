//! The accept loop every TCP server of the workspace runs (agent links, config ports,
//! telnet, card-reader bridges).
//!
//! It takes a listener that the caller already bound (so tests bind port 0) and a
//! shutdown token, caps concurrent connections with an owned semaphore permit taken
//! before `accept`, caps the connections of one source address (a client over its share
//! is closed at once, logged and counted in [`refused_connections`]), runs one task per
//! connection inside a tracing span, and never lets a connection's error end the
//! listener. On shutdown it stops accepting, cancels the connections' token and waits for
//! them up to a grace period.
//!
//! The two caps work together the way sshd's `MaxStartups` and per-source penalties do:
//! the listener cap bounds what the process spends, the per-source cap (smaller) keeps
//! one address from taking every slot, so a client stalling connections from one address
//! cannot lock out an operator coming from another.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use crate::lock::LockExt;
use crate::metrics::CounterFamily;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Binds `addr` and logs the machine-readable line `listening on ADDR (NAME)` with the
/// address actually bound (so a port of 0 becomes the real port).
///
/// The accept queue holds [`BACKLOG`] connections (the kernel caps it at
/// `net.core.somaxconn`): thousands of agents reconnecting at once after a restart wait
/// there instead of having their SYNs dropped and retried a second later.
pub async fn bind(addr: &str, name: &str) -> std::io::Result<TcpListener> {
    let listener = bind_with_backlog(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for {name}: {e}; choose a free address or port"),
        )
    })?;
    announce(&listener, name)?;
    Ok(listener)
}

/// Length of every listener's accept queue.
pub const BACKLOG: u32 = 4096;

async fn bind_with_backlog(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std and tokio do: a restarted server can bind while old connections linger.
        socket.set_reuseaddr(true)?;
        if let Err(e) = socket.bind(a) {
            last = Some(e);
            continue;
        }
        match socket.listen(BACKLOG) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
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
    /// At most this many connections from one source address at once (0: no limit); a
    /// connection over it is closed as soon as it is accepted.
    pub max_per_source: usize,
    /// How long open connections get to finish after shutdown before they are aborted.
    pub grace: Duration,
}

impl ServeOptions {
    /// Options with the given name and cap, no per-source cap, and a 5 s grace period.
    pub fn new(name: impl Into<String>, max_connections: usize) -> Self {
        Self {
            name: name.into(),
            max_connections: max_connections.max(1),
            max_per_source: 0,
            grace: Duration::from_secs(5),
        }
    }

    /// Sets the per-source cap (0: no limit).
    pub fn per_source(mut self, max_per_source: usize) -> Self {
        self.max_per_source = max_per_source;
        self
    }
}

static REFUSED: LazyLock<CounterFamily> =
    LazyLock::new(|| CounterFamily::new(&["listener", "reason"]));

/// Connections closed by the accept loop without being served, by listener and reason
/// (`per_source`: the source address already had `max_per_source` connections). The
/// binaries expose it in their metrics.
pub fn refused_connections() -> &'static CounterFamily {
    &REFUSED
}

/// Open connections per source address (IPv4-mapped IPv6 addresses count as IPv4).
#[derive(Debug, Default)]
struct SourceCounts {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it gives the slot back.
#[derive(Debug)]
struct SourceSlot {
    counts: Arc<SourceCounts>,
    ip: IpAddr,
}

impl SourceCounts {
    /// Takes a slot for `ip` unless it already has `cap` (0: no limit); on refusal returns
    /// how many it has.
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Result<SourceSlot, usize> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock_unpoisoned();
        let n = open.entry(ip).or_insert(0);
        if cap != 0 && *n >= cap {
            return Err(*n);
        }
        *n += 1;
        Ok(SourceSlot {
            counts: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock_unpoisoned().len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock_unpoisoned();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
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
    let sources = Arc::new(SourceCounts::default());
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
        let slot = match sources.take(peer.ip(), opts.max_per_source) {
            Ok(slot) => slot,
            Err(open) => {
                REFUSED.inc(&[opts.name.as_str(), "per_source"]);
                tracing::warn!(
                    listener = %opts.name,
                    %peer,
                    "connection refused: {} already has {open} connections open (limit \
                     max_per_source = {}); closed",
                    peer.ip().to_canonical(),
                    opts.max_per_source
                );
                drop(stream);
                continue;
            }
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
                drop(slot);
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
    async fn accept_queue_holds_more_than_tokios_default_of_1024() {
        // Nobody accepts: every connection completes in the kernel's accept queue, or
        // its SYN is dropped (and the connect waits for a retransmission) once the
        // queue is full. 1,500 fit only in a queue longer than 1,024.
        let l = bind("127.0.0.1:0", "backlog").await.unwrap();
        let addr = l.local_addr().unwrap();
        let want = 1_500.min(BACKLOG as usize);
        if std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
            .is_some_and(|m| m < want)
        {
            eprintln!("SKIPPED: net.core.somaxconn is below {want}");
            return;
        }
        let mut held = Vec::new();
        for i in 0..want {
            let c = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connection {i} was not queued"))
                .unwrap();
            held.push(c);
        }
        assert_eq!(held.len(), want);
        drop(l);
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

    #[test]
    fn source_counts_cap_per_address_and_free_on_drop() {
        let counts = Arc::new(SourceCounts::default());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let a1 = counts.take(a, 2).unwrap();
        let _a2 = counts.take(a, 2).unwrap();
        assert_eq!(counts.take(a, 2).unwrap_err(), 2, "third from a refused");
        // An IPv4-mapped IPv6 address is the same source.
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(counts.take(mapped, 2).unwrap_err(), 2);
        // Another address is unaffected.
        let _b1 = counts.take(b, 2).unwrap();
        drop(a1);
        let _a3 = counts.take(a, 2).expect("a slot freed by the drop");
        // 0 means no limit.
        let many: Vec<_> = (0..100).map(|_| counts.take(b, 0).unwrap()).collect();
        assert_eq!(many.len(), 100);
        drop(many);
        drop(_b1);
        assert_eq!(
            counts.len(),
            1,
            "addresses with no connection are forgotten"
        );
    }

    #[tokio::test]
    async fn per_source_cap_closes_extra_connections_and_serves_other_sources() {
        let l = bind("127.0.0.1:0", "persrc").await.unwrap();
        let addr = l.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve(
            l,
            ServeOptions::new("persrc", 16).per_source(2),
            token.clone(),
            echo_once,
        ));
        async fn from(src: &str, to: SocketAddr) -> TcpStream {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{src}:0").parse().unwrap()).unwrap();
            s.connect(to).await.unwrap()
        }
        let before = refused_connections().get(&["persrc", "per_source"]);
        let mut held = vec![from("127.0.0.2", addr).await, from("127.0.0.2", addr).await];
        // The third from 127.0.0.2 is closed without being served.
        let mut third = from("127.0.0.2", addr).await;
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut b))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0, "the third connection from one address is closed");
        assert_eq!(
            refused_connections().get(&["persrc", "per_source"]),
            before + 1
        );
        // Another address is served while 127.0.0.2 holds its two.
        let mut other = from("127.0.0.1", addr).await;
        other.write_all(&[9]).await.unwrap();
        other.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], 9);
        // Once one of the two is done, 127.0.0.2 may connect again.
        held[0].write_all(&[1]).await.unwrap();
        held[0].read_exact(&mut b).await.unwrap();
        let mut again = None;
        for _ in 0..100 {
            let mut c = from("127.0.0.2", addr).await;
            let _ = c.write_all(&[3]).await;
            if tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut b))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                again = Some(b[0]);
                break;
            }
            // The freed slot is given back when the first connection's task ends, which
            // may be just after our read; try again.
            tokio::task::yield_now().await;
        }
        assert_eq!(again, Some(3));
        held.clear();
        token.cancel();
    }
}
