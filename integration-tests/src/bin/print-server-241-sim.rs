//! `print-server-241-sim`: a test tool that behaves like a PaperCut-style print server
//! toward an RFIDeas Ethernet 241 reader in Client Mode (here: the SCM's 241 bridge).
//!
//! Configuration side (with `--scm ADDR --host NAME`), every `--check-ms`:
//!
//! 1. `GET <read-path>` with `Host: NAME`, and compare the answer with the `--set` values;
//! 2. when something differs, `GET <config-path>?name=value`, one request per setting
//!    (a series of GETs, like the vendor's print server), then read back once more.
//!
//! With `--tamper NAME=VALUE --tamper-after N`, after N matching checks it changes that
//! setting once behind its own back, so the next check sees the mismatch.
//!
//! Swipe side (with `--cert` and `--key`): an HTTPS endpoint that prints every request.
//!
//! Standard output, one line per event, flushed at once:
//! `CHECK ok`, `CHECK mismatch NAME: want "X" got "Y"`, `CONFIGURED`, `RECONFIGURED`,
//! `TAMPERED NAME`, `CONFIG ERROR <status> <text>`, `UNREACHABLE <error>`, and
//! `CARD <card> DEVICE <device> TARGET <request target>` for each swipe received (the
//! `card` and `mac` query parameters, decoded; full numbers, this is a test tool).
//! Readiness goes to stderr as `listening on ADDR (241-sim https)`.
//!
//! In `--set` values, `{https}` stands for the HTTPS endpoint's own address.
//!
//! Its HTTP handling (a request line, a status code, a body after the blank line) is
//! written here on purpose rather than taken from the SCM's 241 parser: a simulator that
//! shared the code under test would agree with the SCM's mistakes instead of exposing them.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;

/// Bound on each request.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer or request head read.
const MAX_READ: usize = 64 * 1024;

/// Behaves like a print server toward an RFIDeas 241 in Client Mode.
#[derive(Debug, Parser)]
#[command(name = "print-server-241-sim", version)]
struct Args {
    /// The reader's configuration address (the SCM's `rfideas` listener).
    #[arg(long, value_name = "ADDR")]
    scm: Option<String>,
    /// The reader's host name (sent as `Host`).
    #[arg(long, value_name = "NAME", default_value = "reader-1.localhost")]
    host: String,
    /// A setting to configure, `NAME=VALUE` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Interval between configuration checks, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..))]
    check_ms: u64,
    /// A setting to change once behind the checks' back, `NAME=VALUE`.
    #[arg(long, value_name = "NAME=VALUE")]
    tamper: Option<String>,
    /// Tamper after this many matching checks.
    #[arg(long, value_name = "N", default_value_t = 2)]
    tamper_after: u32,
    /// Path of the configuration request.
    #[arg(long, default_value = "/config")]
    config_path: String,
    /// Path of the read request.
    #[arg(long, default_value = "/settings")]
    read_path: String,
    /// Source address for configuration requests.
    #[arg(long, value_name = "IP")]
    bind_ip: Option<IpAddr>,
    /// Certificate (PEM) of the HTTPS endpoint; with `--key`, the endpoint runs.
    #[arg(long, value_name = "PATH", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of the HTTPS endpoint.
    #[arg(long, value_name = "PATH", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Where the HTTPS endpoint listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    https_listen: String,
    /// Answer to swipes: `ok` (200), `hang` (never answer), `redirect:URL` (302 to URL),
    /// `status:NNN`.
    #[arg(long, value_name = "MODE", default_value = "ok")]
    respond: String,
    /// Stop after this many seconds.
    #[arg(long, value_name = "N")]
    max_seconds: Option<u64>,
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("print-server-241-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut https_addr = None;
    let mut tasks = tokio::task::JoinSet::new();
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("certificate {}: {e}", cert.display()))?;
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key {}: {e}", key.display()))?;
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
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        eprintln!("listening on {local} (241-sim https)");
        https_addr = Some(local);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let respond = Arc::new(args.respond.clone());
        tasks.spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    match timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            if let Err(e) = swipe_request(tls, &respond).await {
                                eprintln!("print-server-241-sim: https {peer}: {e}");
                            }
                        }
                        Ok(Err(e)) => eprintln!("print-server-241-sim: TLS from {peer}: {e}"),
                        Err(_) => eprintln!("print-server-241-sim: TLS from {peer}: timed out"),
                    }
                });
            }
        });
    }
    let mut wanted = BTreeMap::new();
    for s in &args.set {
        let (k, v) = split_pair(s)?;
        let v = match https_addr {
            Some(a) => v.replace("{https}", &a.to_string()),
            None => v,
        };
        wanted.insert(k, v);
    }
    let tamper = args.tamper.as_deref().map(split_pair).transpose()?;
    if let Some(scm) = args.scm.clone() {
        let args = Arc::new(args);
        let a = args.clone();
        tasks.spawn(async move { checks(&scm, &a, wanted, tamper).await });
        wait(args.max_seconds, &mut tasks).await;
    } else {
        wait(args.max_seconds, &mut tasks).await;
    }
    Ok(())
}

async fn wait(max_seconds: Option<u64>, tasks: &mut tokio::task::JoinSet<()>) {
    let deadline = async {
        match max_seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("print-server-241-sim: no SIGTERM handler: {e}");
            return;
        }
    };
    tokio::select! {
        () = deadline => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = async { while tasks.join_next().await.is_some() {} } => {}
    }
    tasks.shutdown().await;
}

/// The periodic check and reconfiguration loop.
async fn checks(
    scm: &str,
    args: &Args,
    wanted: BTreeMap<String, String>,
    tamper: Option<(String, String)>,
) {
    let mut configured_once = false;
    let mut ok_checks = 0u32;
    let mut tampered = false;
    let mut tick = tokio::time::interval(Duration::from_millis(args.check_ms));
    loop {
        tick.tick().await;
        match check(scm, args, &wanted).await {
            Ok(None) => {
                emit("CHECK ok");
                ok_checks += 1;
                if let Some((k, v)) = &tamper
                    && !tampered
                    && ok_checks >= args.tamper_after
                {
                    tampered = true;
                    match configure(scm, args, &[(k.clone(), v.clone())]).await {
                        Ok(()) => emit(&format!("TAMPERED {k}")),
                        Err(e) => emit(&e),
                    }
                }
            }
            Ok(Some(diff)) => {
                emit(&format!("CHECK mismatch {diff}"));
                let pairs: Vec<(String, String)> =
                    wanted.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                match configure(scm, args, &pairs).await {
                    Ok(()) => match check(scm, args, &wanted).await {
                        Ok(None) => {
                            emit(if configured_once {
                                "RECONFIGURED"
                            } else {
                                "CONFIGURED"
                            });
                            configured_once = true;
                        }
                        Ok(Some(diff)) => emit(&format!("CONFIG ERROR still differs: {diff}")),
                        Err(e) => emit(&e),
                    },
                    Err(e) => emit(&e),
                }
            }
            Err(e) => emit(&e),
        }
    }
}

/// Reads the settings; `Ok(None)` when they match, `Ok(Some(what differs))` otherwise.
async fn check(
    scm: &str,
    args: &Args,
    wanted: &BTreeMap<String, String>,
) -> Result<Option<String>, String> {
    let body = get(scm, args, &args.read_path).await?;
    let mut have = BTreeMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("CONFIG ERROR bad settings line {line:?}"))?;
        have.insert(k.to_string(), decode(v));
    }
    for (k, want) in wanted {
        match have.get(k) {
            Some(got) if got == want => {}
            got => {
                return Ok(Some(format!(
                    "{k}: want {want:?} got {}",
                    got.map(|g| format!("{g:?}"))
                        .unwrap_or_else(|| "unset".into())
                )));
            }
        }
    }
    Ok(None)
}

/// One configuration GET per setting.
async fn configure(scm: &str, args: &Args, pairs: &[(String, String)]) -> Result<(), String> {
    for (k, v) in pairs {
        let target = format!("{}?{}={}", args.config_path, encode(k), encode(v));
        get(scm, args, &target).await?;
    }
    Ok(())
}

/// A plain HTTP GET with `Connection: close`; returns the body of a 200.
async fn get(scm: &str, args: &Args, target: &str) -> Result<String, String> {
    let io = async {
        let addr: SocketAddr = tokio::net::lookup_host(scm)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
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
            "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: print-server-241-sim\r\nConnection: close\r\n\r\n",
            args.host
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        (&mut s).take(MAX_READ as u64).read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let bytes = match timeout(IO_TIMEOUT, io).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(format!("UNREACHABLE {e}")),
        Err(_) => return Err("UNREACHABLE timed out".into()),
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

/// Serves one swipe request on the HTTPS endpoint.
async fn swipe_request<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    respond: &str,
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
        .unwrap_or("")
        .to_string();
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| decode(v))
            .unwrap_or_default()
    };
    emit(&format!(
        "CARD {} DEVICE {} TARGET {target}",
        param("card"),
        param("mac")
    ));
    let answer = match respond {
        "ok" => "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n".to_string(),
        "hang" => {
            std::future::pending::<()>().await;
            return Ok(());
        }
        r if r.starts_with("redirect:") => format!(
            "HTTP/1.1 302 Found\r\nLocation: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            &r["redirect:".len()..]
        ),
        r if r.starts_with("status:") => format!(
            "HTTP/1.1 {} Sim\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            &r["status:".len()..]
        ),
        other => format!(
            "HTTP/1.1 500 Sim\r\nContent-Length: {}\r\n\r\nunknown mode {other}",
            13 + other.len()
        ),
    };
    s.write_all(answer.as_bytes()).await?;
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
    fn encoding_round_trips() {
        let s = "https://127.0.0.1:1/s?card={card}&x=a b";
        assert_eq!(decode(&encode(s)), s);
        assert_eq!(encode("a:b"), "a%3Ab");
        assert_eq!(decode("x+y%41"), "x yA");
    }

    #[test]
    fn arguments() {
        let a = Args::try_parse_from([
            "print-server-241-sim",
            "--scm",
            "127.0.0.1:1",
            "--set",
            "mode=client",
            "--tamper",
            "mode=server",
        ])
        .unwrap();
        assert_eq!(a.set, ["mode=client"]);
        assert_eq!(a.check_ms, 500);
        assert_eq!(a.respond, "ok");
        assert!(
            Args::try_parse_from(["x", "--cert", "c.pem"]).is_err(),
            "needs --key"
        );
        assert!(split_pair("novalue").is_err());
    }
}
