//! `print-server-sim`: a test tool that behaves like a PaperCut-style print server in
//! Generic mode toward one or more card reader ports.
//!
//! For each `--connect ADDR` it connects (optionally from `--bind-ip`), sends `\r`, the
//! probe string and optionally `v`, then a `\r` keep-alive every `--keepalive-ms`, and
//! reads. It prints one line per event on stdout, flushed at once:
//!
//! * `CONNECTED <addr>` / `DISCONNECTED <addr>`;
//! * `CARD <card> FROM <addr>` for each `\n`-terminated line (a print server takes every
//!   such line as a card number; full numbers are printed, this is a test tool);
//! * `OTHER <escaped bytes>` for anything else: `\r`-terminated text such as a version
//!   reply, an empty line, or bytes left unterminated at a disconnect.
//!
//! With `--timestamps`, each `CARD` line ends in ` AT <unix ms>`: when the read that
//! completed the line returned. `--stall-after-cards N --stall-ms MS` plays a print server
//! that stays connected but stops reading: after its N-th card it neither reads nor sends
//! anything for MS, then reads again (what the kernel kept for it arrives then).
//!
//! Bytes are escaped as `\r`, `\n`, `\t`, `\\` and `\xNN` for other non-printable bytes.
//! On a disconnect it reconnects with a bounded back-off. It stops after `--max-seconds`
//! or on SIGTERM/SIGINT. Diagnostics go to stderr.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

/// First reconnect delay.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A session that lasted this long resets the back-off.
const STABLE: Duration = Duration::from_secs(1);
/// Bound on connecting and on each write.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest unterminated input kept before it is printed as `OTHER`.
const MAX_PENDING: usize = 4096;

/// Behaves like a PaperCut-style print server (Generic mode) toward card reader ports.
#[derive(Debug, Parser)]
#[command(name = "print-server-sim", version)]
struct Args {
    /// Card reader address to connect to (repeatable).
    #[arg(long = "connect", value_name = "ADDR", required = true)]
    connect: Vec<String>,
    /// Interval between `\r` keep-alives, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_ms: u64,
    /// Probe string sent after the first `\r` ("" sends none).
    #[arg(long, value_name = "TEXT", default_value = "rfid prompt")]
    probe: String,
    /// Also send `v` (version request) after the probe.
    #[arg(long)]
    version_probe: bool,
    /// Source address for the connections (e.g. one of 127.0.0.0/8).
    #[arg(long, value_name = "IP")]
    bind_ip: Option<IpAddr>,
    /// Append ` AT <unix ms>` (the moment it was read) to each `CARD` line.
    #[arg(long)]
    timestamps: bool,
    /// Stop reading (and sending) after this many cards, once per connection...
    #[arg(long, value_name = "N", requires = "stall_ms")]
    stall_after_cards: Option<usize>,
    /// ...for this many milliseconds, then read again.
    #[arg(long, value_name = "MS", requires = "stall_after_cards")]
    stall_ms: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "N")]
    max_seconds: Option<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Arc::new(Args::parse());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("print-server-sim: cannot install the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut tasks = JoinSet::new();
    for addr in &args.connect {
        tasks.spawn(run(addr.clone(), args.clone()));
    }
    let deadline = async {
        match args.max_seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = deadline => {}
        _ = term.recv() => eprintln!("print-server-sim: SIGTERM, stopping"),
        _ = tokio::signal::ctrl_c() => eprintln!("print-server-sim: SIGINT, stopping"),
    }
    tasks.shutdown().await;
    ExitCode::SUCCESS
}

/// Prints one line on stdout and flushes it.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Keeps one connection to `addr` up, reconnecting with a bounded back-off.
async fn run(addr: String, args: Arc<Args>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match connect(&addr, args.bind_ip).await {
            Ok(stream) => {
                let started = Instant::now();
                emit(&format!("CONNECTED {addr}"));
                if let Err(e) = session(stream, &addr, &args).await {
                    eprintln!("print-server-sim: {addr}: {e}");
                }
                emit(&format!("DISCONNECTED {addr}"));
                if started.elapsed() >= STABLE {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(e) => eprintln!("print-server-sim: connect {addr}: {e}; retrying in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(addr: &str, bind_ip: Option<IpAddr>) -> std::io::Result<TcpStream> {
    use std::io::{Error, ErrorKind};
    let target = tokio::net::lookup_host(addr)
        .await?
        .find(|a| bind_ip.is_none_or(|ip| ip.is_ipv4() == a.is_ipv4()))
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "no usable address"))?;
    let fut = async {
        match bind_ip {
            None => TcpStream::connect(target).await,
            Some(ip) => {
                let sock = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(target).await
            }
        }
    };
    timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "connect timed out"))?
}

async fn write(wr: &mut tokio::net::tcp::OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    timeout(IO_TIMEOUT, wr.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

/// One connection: greeting, keep-alives and reading until EOF or an error.
async fn session(stream: TcpStream, addr: &str, args: &Args) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    write(&mut wr, b"\r").await?;
    if !args.probe.is_empty() {
        write(&mut wr, args.probe.as_bytes()).await?;
    }
    if args.version_probe {
        write(&mut wr, b"v").await?;
    }
    let every = Duration::from_millis(args.keepalive_ms);
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    let mut cards = 0usize;
    let mut stalled = false;
    loop {
        if let (Some(after), Some(ms), false) = (args.stall_after_cards, args.stall_ms, stalled)
            && cards >= after
        {
            stalled = true;
            eprintln!("print-server-sim: {addr}: not reading for {ms} ms");
            emit(&format!("STALLED {addr}"));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            emit(&format!("RESUMED {addr}"));
        }
        tokio::select! {
            _ = tick.tick() => write(&mut wr, b"\r").await?,
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        flush_rest(&mut pending);
                        return Err(e);
                    }
                };
                if n == 0 {
                    flush_rest(&mut pending);
                    return Ok(());
                }
                pending.extend_from_slice(&buf[..n]);
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                for line in take_lines(&mut pending, addr) {
                    if line.starts_with("CARD ") {
                        cards += 1;
                        if args.timestamps {
                            emit(&format!("{line} AT {at}"));
                            continue;
                        }
                    }
                    emit(&line);
                }
                if pending.len() > MAX_PENDING {
                    flush_rest(&mut pending);
                }
            }
        }
    }
}

fn flush_rest(pending: &mut Vec<u8>) {
    if !pending.is_empty() {
        emit(&format!("OTHER {}", escape(pending)));
        pending.clear();
    }
}

/// Takes every terminated segment off the front of `pending` and renders it: a
/// `\n`-terminated one is a card (`\n` alone is `OTHER`), a `\r`-terminated one is `OTHER`.
fn take_lines(pending: &mut Vec<u8>, addr: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(pos) = pending.iter().position(|b| matches!(b, b'\r' | b'\n')) {
        let seg: Vec<u8> = pending.drain(..=pos).collect();
        let line = if seg[pos] == b'\n' && pos > 0 {
            format!("CARD {} FROM {addr}", escape(&seg[..pos]))
        } else {
            format!("OTHER {}", escape(&seg))
        };
        out.push(line);
    }
    out
}

fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cards_and_other_bytes() {
        let mut p = b"SCM-Generic-1.0\r12345678\n\nab\x01\\".to_vec();
        let lines = take_lines(&mut p, "127.0.0.1:7778");
        assert_eq!(
            lines,
            [
                "OTHER SCM-Generic-1.0\\r",
                "CARD 12345678 FROM 127.0.0.1:7778",
                "OTHER \\n",
            ]
        );
        assert_eq!(p, b"ab\x01\\");
        assert_eq!(escape(&p), "ab\\x01\\\\");
    }

    #[test]
    fn arguments() {
        let a = Args::try_parse_from([
            "print-server-sim",
            "--connect",
            "127.0.0.1:1",
            "--connect",
            "127.0.0.1:2",
            "--version-probe",
            "--bind-ip",
            "127.0.0.2",
        ])
        .unwrap();
        assert_eq!(a.connect.len(), 2);
        assert_eq!(a.keepalive_ms, 1000);
        assert_eq!(a.probe, "rfid prompt");
        assert!(a.version_probe);
        assert!(Args::try_parse_from(["print-server-sim"]).is_err());
        assert!(
            Args::try_parse_from([
                "print-server-sim",
                "--connect",
                "x:1",
                "--keepalive-ms",
                "0"
            ])
            .is_err()
        );
    }
}
