//! `print-server-241-ip-sim`: a print server that knows RFIDeas 241 readers (Client Mode)
//! only by their IP addresses, as public integration notes describe real print servers:
//! it configures each reader with HTTP GETs sent to the reader's address (`Host:` that
//! address, no name), and it tells which reader a swipe request is from by the request's
//! **source address** alone, ignoring anything the request says about the reader.
//!
//! With `--reader NAME=IP:PORT` (repeatable), every `--check-ms` until all are configured,
//! for each reader not yet configured: `GET <config-path>?NAME=VALUE` once per `--set`
//! value plus `reader=NAME`, then `GET <read-path>` to verify, at that reader's address.
//! The swipe side is an HTTPS endpoint (`--cert`, `--key`).
//!
//! Standard output, one line per event, flushed at once: `CONFIGURED NAME`,
//! `CONFIG ERROR NAME <detail>`, `MISMATCH NAME <detail>`, `READY` (every reader
//! configured), and per swipe request `CARD <card> READER <name or ?> FROM <source ip>
//! EVENT <event or ->` (the `card` and `event` query parameters, decoded), or `REPEAT
//! <event> READER <name or ?>` for an event id it has taken before (answered 200 and
//! dropped, as a print server should treat a retried attempt). With `--hang-first N` the
//! first N swipe requests are taken but never answered (the answer "lost"), so the sender
//! retries them. Readiness goes to stderr as `listening on ADDR (241-ip-sim https)`; in
//! `--set` values `{https}` stands for that address.
//!
//! The HTTP handling is written here rather than taken from the SCM's 241 code, so that the
//! simulator does not agree with the SCM's mistakes.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use scm_common::lock::LockExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;

/// Bound on each request.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer or request head read.
const MAX_READ: usize = 64 * 1024;

/// A print server that tells 241 readers apart by address only.
#[derive(Debug, Parser)]
#[command(name = "print-server-241-ip-sim", version)]
struct Args {
    /// A reader: its name (for output) and its configuration address, `NAME=IP:PORT`.
    #[arg(long = "reader", value_name = "NAME=IP:PORT")]
    readers: Vec<String>,
    /// A setting every reader gets, `NAME=VALUE` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Interval between configuration passes, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    check_ms: u64,
    /// Path of the configuration request.
    #[arg(long, default_value = "/config")]
    config_path: String,
    /// Path of the read request.
    #[arg(long, default_value = "/settings")]
    read_path: String,
    /// Source address for configuration requests.
    #[arg(long, value_name = "IP")]
    bind_ip: Option<IpAddr>,
    /// Certificate (PEM) of the HTTPS endpoint.
    #[arg(long, value_name = "PATH")]
    cert: std::path::PathBuf,
    /// Private key (PEM) of the HTTPS endpoint.
    #[arg(long, value_name = "PATH")]
    key: std::path::PathBuf,
    /// Where the HTTPS endpoint listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    https_listen: String,
    /// Take the first N swipe requests but never answer them.
    #[arg(long, value_name = "N", default_value_t = 0)]
    hang_first: u32,
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn split_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// What the swipe endpoint shares between connections.
struct Swipes {
    /// Reader names by address.
    by_ip: BTreeMap<IpAddr, String>,
    /// Event ids taken.
    taken: Mutex<HashSet<String>>,
    /// Requests received.
    seen: AtomicU32,
    hang_first: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("print-server-241-ip-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut readers = Vec::new();
    for r in &args.readers {
        let (name, addr) = split_pair(r)?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not IP:PORT"))?;
        readers.push((name, addr));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("certificate {}: {e}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .map_err(|e| format!("key {}: {e}", args.key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| format!("certificate and key: {e}"))?;
    let listener = TcpListener::bind(&args.https_listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", args.https_listen))?;
    let https = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("listening on {https} (241-ip-sim https)");
    let swipes = Arc::new(Swipes {
        by_ip: readers.iter().map(|(n, a)| (a.ip(), n.clone())).collect(),
        taken: Mutex::new(HashSet::new()),
        seen: AtomicU32::new(0),
        hang_first: args.hang_first,
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let serve = async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let swipes = swipes.clone();
            tokio::spawn(async move {
                match timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        if let Err(e) = swipe_request(tls, peer.ip(), &swipes).await {
                            eprintln!("print-server-241-ip-sim: https {peer}: {e}");
                        }
                    }
                    Ok(Err(e)) => eprintln!("print-server-241-ip-sim: TLS from {peer}: {e}"),
                    Err(_) => eprintln!("print-server-241-ip-sim: TLS from {peer}: timed out"),
                }
            });
        }
    };
    let mut wanted = Vec::new();
    for s in &args.set {
        let (k, v) = split_pair(s)?;
        wanted.push((k, v.replace("{https}", &https.to_string())));
    }
    let configure = configure_all(&args, &readers, &wanted);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("no SIGTERM handler: {e}"))?;
    tokio::select! {
        () = serve => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = async { configure.await; std::future::pending::<()>().await } => {}
    }
    Ok(())
}

/// Configures every reader at its address until all are, then prints `READY`.
async fn configure_all(args: &Args, readers: &[(String, SocketAddr)], wanted: &[(String, String)]) {
    let mut done = vec![false; readers.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(args.check_ms));
    while done.contains(&false) {
        tick.tick().await;
        for (i, (name, addr)) in readers.iter().enumerate() {
            if done[i] {
                continue;
            }
            let mut pairs = wanted.to_vec();
            pairs.push(("reader".into(), name.clone()));
            match configure(args, *addr, &pairs).await {
                Ok(()) => {
                    done[i] = true;
                    emit(&format!("CONFIGURED {name}"));
                }
                Err(e) => emit(&format!("{e} (reader {name})")),
            }
        }
    }
    emit("READY");
}

/// One GET per setting, then a read that must show them all.
async fn configure(
    args: &Args,
    addr: SocketAddr,
    pairs: &[(String, String)],
) -> Result<(), String> {
    for (k, v) in pairs {
        let target = format!("{}?{}={}", args.config_path, encode(k), encode(v));
        get(args, addr, &target).await?;
    }
    let body = get(args, addr, &args.read_path).await?;
    let have: BTreeMap<String, String> = body
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    for (k, v) in pairs {
        if have.get(k) != Some(v) {
            return Err(format!("MISMATCH {k}: want {v:?} got {:?}", have.get(k)));
        }
    }
    Ok(())
}

/// A plain HTTP GET to the reader's address, `Host` being that address; the body of a 200.
async fn get(args: &Args, addr: SocketAddr, target: &str) -> Result<String, String> {
    let io = async {
        let mut s = match args.bind_ip {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let sock = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(addr).await?
            }
        };
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: print-server-241-ip-sim\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        (&mut s).take(MAX_READ as u64).read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let bytes = match timeout(IO_TIMEOUT, io).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(format!("CONFIG ERROR unreachable {addr}: {e}")),
        Err(_) => return Err(format!("CONFIG ERROR unreachable {addr}: timed out")),
    };
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.get(9..12).unwrap_or("???");
    if status != "200" {
        return Err(format!(
            "CONFIG ERROR {status} {}",
            body.trim().replace('\n', " ")
        ));
    }
    Ok(body.to_string())
}

/// Serves one swipe request: the reader is the one whose address the request came from.
async fn swipe_request<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    from: IpAddr,
    swipes: &Swipes,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut b = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = timeout(IO_TIMEOUT, s.read(&mut b))
            .await
            .map_err(|_| std::io::Error::other("request head timed out"))??;
        if n == 0 || buf.len() > MAX_READ {
            return Ok(());
        }
        buf.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let target = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| decode(v))
    };
    let reader = swipes.by_ip.get(&from).map_or("?", String::as_str);
    let event = param("event");
    let repeat = match &event {
        Some(e) => !swipes.taken.lock_unpoisoned().insert(e.clone()),
        None => false,
    };
    if repeat {
        emit(&format!(
            "REPEAT {} READER {reader}",
            event.as_deref().unwrap_or("-")
        ));
    } else {
        emit(&format!(
            "CARD {} READER {reader} FROM {from} EVENT {}",
            param("card").unwrap_or_default(),
            event.as_deref().unwrap_or("-")
        ));
    }
    if swipes.seen.fetch_add(1, Ordering::SeqCst) < swipes.hang_first {
        std::future::pending::<()>().await;
    }
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        .await?;
    s.shutdown().await
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied(), b.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_and_encoding() {
        let a = Args::try_parse_from([
            "print-server-241-ip-sim",
            "--reader",
            "r1=127.0.0.21:8241",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
        ])
        .unwrap();
        assert_eq!(a.readers, ["r1=127.0.0.21:8241"]);
        assert_eq!(a.hang_first, 0);
        assert!(
            Args::try_parse_from(["x", "--cert", "c.pem"]).is_err(),
            "needs --key"
        );
        assert_eq!(decode(&encode("a b/{c}")), "a b/{c}");
    }
}
