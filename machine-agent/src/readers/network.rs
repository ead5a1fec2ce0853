//! `kind = "network"`: a network card reader in Generic/server mode. The reader listens;
//! the agent connects to it as the print server would, sends `"\r"` keep-alives, and reads
//! `<card>` lines terminated by CR and/or LF.

use std::io;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;

use super::line::{Line, LineAssembler};
use super::{DEFAULT_IGNORE, DEFAULT_KEEPALIVE_MS, READ_BUF, ReaderConfig, Retry, Session, Sink};

/// How long a connection attempt may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection ended without an I/O error.
#[derive(Debug)]
enum End {
    /// Shutdown, or the receiver is gone.
    Stop,
    /// The reader closed the connection.
    Closed,
}

pub(super) async fn run(cfg: &ReaderConfig, what: &str, sink: &Sink, mut retry: Retry) {
    let Some(address) = cfg.address.as_deref() else {
        return;
    };
    let keepalive = Duration::from_millis(cfg.keepalive_ms.unwrap_or(DEFAULT_KEEPALIVE_MS).max(1));
    let ignore: Vec<Vec<u8>> = if cfg.ignore.is_empty() {
        DEFAULT_IGNORE
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect()
    } else {
        cfg.ignore.iter().map(|p| p.as_bytes().to_vec()).collect()
    };
    let id = &sink.id;
    tracing::info!("reader {id} ({what}) started");
    let mut asm = LineAssembler::new();
    loop {
        let mut session = None;
        let result = connection(address, keepalive, &ignore, &mut asm, sink, &mut session).await;
        let partial = asm.discard();
        if partial > 0 {
            tracing::debug!("reader {id}: dropped an unterminated line ({partial} bytes)");
        }
        if session.as_ref().is_some_and(Session::healthy) {
            retry.reset();
        }
        let why = match result {
            Ok(End::Stop) => return,
            Ok(End::Closed) => "connection closed by the reader".to_owned(),
            Err(e) if session.is_none() => format!("cannot connect: {e}"),
            Err(e) => format!("connection lost: {e}"),
        };
        if sink.stopping() {
            return;
        }
        let d = retry.next_delay();
        tracing::warn!(
            "reader {id}: {address}: {why}; reconnecting in {} ms",
            d.as_millis()
        );
        if !sink.pause(d).await {
            return;
        }
    }
}

/// One connection: connect, then read lines and send keep-alives until it ends.
/// `session` is set once connected.
async fn connection(
    address: &str,
    keepalive: Duration,
    ignore: &[Vec<u8>],
    asm: &mut LineAssembler,
    sink: &Sink,
    session: &mut Option<Session>,
) -> io::Result<End> {
    let id = &sink.id;
    let mut stream = tokio::select! {
        _ = sink.shutdown.cancelled() => return Ok(End::Stop),
        r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)) => match r {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
                ));
            }
        },
    };
    tracing::info!("reader {id} connected to {address}");
    let session = session.insert(Session::new());
    // The first tick is immediate: like the print server, greet the reader with a "\r".
    let mut ticker = tokio::time::interval(keepalive);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; READ_BUF];
    loop {
        tokio::select! {
            _ = sink.shutdown.cancelled() => return Ok(End::Stop),
            _ = ticker.tick() => {
                // Never block reading on a reader that does not drain its socket.
                match stream.try_write(b"\r") {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tracing::debug!("reader {id}: send buffer full, keep-alive skipped");
                    }
                    Err(e) => return Err(e),
                }
            }
            r = stream.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    return Ok(End::Closed);
                }
                for line in asm.push(&buf[..n]) {
                    if ignored(&line, ignore) {
                        tracing::debug!(
                            "reader {id}: ignored a status line ({} bytes)",
                            line.bytes.len()
                        );
                        continue;
                    }
                    if !sink.send(line).await {
                        return Ok(End::Stop);
                    }
                    session.delivered = true;
                }
            }
        }
    }
}

/// A status or keep-alive line: starts with one of the prefixes, ignoring ASCII case.
fn ignored(line: &Line, prefixes: &[Vec<u8>]) -> bool {
    prefixes.iter().any(|p| {
        line.bytes
            .get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::super::test_log::Logs;
    use super::super::{RawLine, ReaderKind, run as run_reader};
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn line(s: &str) -> Line {
        Line {
            bytes: s.as_bytes().to_vec(),
            too_long: false,
        }
    }

    #[test]
    fn ignore_prefixes_are_case_insensitive() {
        let d: Vec<Vec<u8>> = DEFAULT_IGNORE
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        for s in ["ping", "PING 3", "Status OK", "STATUS", "# comment", "#"] {
            assert!(ignored(&line(s), &d), "{s}");
        }
        for s in ["12345678", "pin", "stat", "EMP123", " ping"] {
            assert!(!ignored(&line(s), &d), "{s}");
        }
        let custom = vec![b"RF IDeas".to_vec()];
        assert!(ignored(&line("rf ideas> "), &custom));
        assert!(!ignored(&line("ping"), &custom));
    }

    fn start(
        address: String,
        keepalive_ms: u64,
    ) -> (
        mpsc::Receiver<RawLine>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let mut cfg = ReaderConfig::new("r1", ReaderKind::Network);
        cfg.address = Some(address);
        cfg.keepalive_ms = Some(keepalive_ms);
        let (tx, rx) = mpsc::channel(4);
        let token = CancellationToken::new();
        let ms = Duration::from_millis;
        let task = tokio::spawn(run_reader(cfg, tx, token.clone(), ms(1), ms(20)));
        (rx, token, task)
    }

    /// Reads what the agent sends until at least `n` keep-alives arrived; every byte
    /// must be a `\r`.
    async fn expect_keepalives(s: &mut TcpStream, n: usize) {
        let mut got = 0;
        let mut buf = [0u8; 64];
        while got < n {
            let k = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .expect("no keep-alive")
                .unwrap();
            assert!(k > 0, "agent closed");
            assert!(buf[..k].iter().all(|&b| b == b'\r'), "{:?}", &buf[..k]);
            got += k;
        }
    }

    /// Half-closes and drains until the agent closes too (so nothing unread is left to
    /// turn the close into a reset).
    async fn close(mut s: TcpStream) {
        s.shutdown().await.unwrap();
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => panic!("agent did not close after EOF"),
            }
        }
    }

    async fn next_card(rx: &mut mpsc::Receiver<RawLine>) -> String {
        let l = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("card missing")
            .unwrap();
        assert_eq!(l.reader, "r1");
        assert!(!l.too_long);
        String::from_utf8(l.line).unwrap()
    }

    async fn accept(l: &TcpListener) -> TcpStream {
        tokio::time::timeout(WAIT, l.accept())
            .await
            .expect("agent did not (re)connect")
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn flapping_reader_every_card_once() {
        let logs = Logs::new();
        let _g = logs.install();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (mut rx, token, task) = start(addr.clone(), 20);

        // First connection: status lines are skipped, the card gets through, and the
        // agent keeps the connection alive with "\r".
        let mut s = accept(&listener).await;
        expect_keepalives(&mut s, 3).await;
        s.write_all(b"ping\r\nSTATUS OK\r\n12345678\r\n")
            .await
            .unwrap();
        close(s).await;
        let mut got = vec![next_card(&mut rx).await];

        // The reader flaps: every reconnection brings one card, split oddly.
        let mut cards = vec!["12345678".to_owned()];
        for i in 0..6u32 {
            let card = format!("8765432{i}");
            let mut s = accept(&listener).await;
            expect_keepalives(&mut s, 1).await;
            let msg = format!("#hello\n{card}\n");
            let (a, b) = msg.as_bytes().split_at(9 + i as usize);
            s.write_all(a).await.unwrap();
            s.flush().await.unwrap();
            s.write_all(b).await.unwrap();
            close(s).await;
            got.push(next_card(&mut rx).await);
            cards.push(card);
        }
        assert_eq!(got, cards);
        // No duplicates or extras: the next connection delivers nothing more.
        let s = accept(&listener).await;
        let connected = format!("reader r1 connected to {addr}");
        logs.wait_until(|t| t.matches(&connected).count() == 8)
            .await;
        assert!(rx.try_recv().is_err());
        let text = logs.contents();
        assert!(text.contains(&format!("reader r1 (network {addr}) started")));
        assert!(text.contains("closed by the reader"));
        assert!(text.contains("ignored a status line"));
        for c in &cards {
            assert!(!text.contains(c.as_str()), "card logged: {c}");
        }
        token.cancel();
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        drop(s);
    }

    #[tokio::test]
    async fn refused_connection_is_retried() {
        let logs = Logs::new();
        let _g = logs.install();
        // Find a free port, then leave it closed for a while.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let (mut rx, token, task) = start(addr.to_string(), 30_000);
        logs.wait_until(|s| s.matches("cannot connect").count() >= 2)
            .await;
        let listener = TcpListener::bind(addr).await.unwrap();
        let mut s = accept(&listener).await;
        s.write_all(b"\r\nEMP123\r").await.unwrap();
        let l = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.line, b"EMP123");
        token.cancel();
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_while_connected_is_prompt() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (_rx, token, task) = start(addr, 30_000);
        let mut s = accept(&listener).await;
        expect_keepalives(&mut s, 1).await;
        token.cancel();
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        // The agent closed its side.
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }
}
