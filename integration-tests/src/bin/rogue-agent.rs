//! `rogue-agent`: a deliberately misbehaving machine agent for the multi-container fault
//! harness (the "misbehaving peer" of hickory-dns's conformance tests). It talks to the
//! SCM's agent port and prints one line per step on stdout, flushed at once, so a test
//! can follow it from `docker logs`:
//!
//! * `--mode garbage`: plain TCP bytes that are no TLS at all, then TLS sessions with a
//!   valid machine certificate that send bytes that are no frame, a frame of an unknown
//!   version (then a HELLO), and a header declaring an oversize frame;
//! * `--mode foreign-ca`: a client certificate from a CA the SCM does not trust;
//! * `--mode wrong-id`: a valid certificate (`--cert machine-4`) whose HELLO claims
//!   another machine (`--claim 1`);
//! * `--mode replay-hello`: with a valid certificate, the same HELLO frame sent again
//!   and again on one connection and on `--rounds` fresh connections;
//! * `--mode flood-no-read`: a valid HELLO, then card swipes as fast as the SCM takes
//!   them for `--seconds`, never reading a byte; its config port (`--config-port`)
//!   accepts connections and never reads either. A slow agent in its purest form.
//!
//! Every mode ends with `DONE <mode>`. Each step prints `STEP <name>: <outcome>`; the
//! outcome is what the SCM did (its NACK text, a closed connection, a refused
//! handshake), never a judgement: the test decides what is right.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, LeafSpec, Validity};
use scm_certs::tls::{self as sctls, TlsPolicy};
use scm_proto::io::{FrameReader, write_frame};
use scm_proto::v1::{self, Message};
use scm_proto::{Frame, FrameCodec};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Bound on every connect, handshake and read.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Garbage,
    ForeignCa,
    WrongId,
    ReplayHello,
    FloodNoRead,
}

/// A misbehaving machine agent (test tool).
#[derive(Debug, Parser)]
#[command(name = "rogue-agent", version)]
struct Args {
    /// The SCM's agent port, e.g. scm:9300.
    #[arg(long)]
    scm: String,
    /// Directory holding ca.pem and the certificate named by --cert.
    #[arg(long)]
    dir: PathBuf,
    /// Certificate to present: `machine-4` means machine-4.pem and machine-4-key.pem.
    #[arg(long, default_value = "machine-4")]
    cert: String,
    /// What to do.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The machine id a wrong-id HELLO claims.
    #[arg(long, default_value_t = 1)]
    claim: u16,
    /// Connections for replay-hello.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// How long flood-no-read floods.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Port the flood-no-read agent announces (and accepts on, never reading).
    #[arg(long, default_value_t = 9399)]
    config_port: u16,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct Pems {
    ca: String,
    cert: String,
    key: String,
}

fn pems(args: &Args) -> anyhow::Result<Pems> {
    let read = |name: String| {
        let p = args.dir.join(&name);
        std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
    };
    Ok(Pems {
        ca: read("ca.pem".into())?,
        cert: read(format!("{}.pem", args.cert))?,
        key: read(format!("{}-key.pem", args.cert))?,
    })
}

/// The machine id of a `machine-N` certificate name.
fn cert_machine(args: &Args) -> u16 {
    args.cert
        .strip_prefix("machine-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(args: &Args, p: &Pems) -> anyhow::Result<Tls> {
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&args.scm)).await??;
    let connector = tokio_rustls::TlsConnector::from(sctls::client_config_from_pem(
        &p.ca,
        &p.cert,
        &p.key,
        TlsPolicy::default(),
    )?);
    Ok(sctls::connect(&connector, tcp, &Identity::Scm, IO_TIMEOUT).await?)
}

fn hello(id: u16, config_port: u16) -> Frame {
    let m = Message::Hello(v1::Hello {
        request_id: 1,
        agent_version: "rogue-agent".into(),
        config_port: u32::from(config_port),
        applied_generation: 0,
        applied_sha256: Vec::new(),
        readers: vec!["r1".into()],
        ..Default::default()
    });
    scm_proto::reply_frame(&m, id)
}

/// What the SCM answers next: a message, a close, or an error.
async fn answer(reader: &mut FrameReader<tokio::io::ReadHalf<Tls>>) -> String {
    match reader.read_frame(Some(IO_TIMEOUT), IO_TIMEOUT).await {
        Ok(Some(f)) => match Message::decode(&f) {
            Ok(Message::Ack(a)) => format!("ACK {}", a.detail),
            Ok(Message::Nack(n)) => format!("NACK {} {}", n.reason().as_str_name(), n.detail),
            Ok(m) => m.code().name().to_string(),
            Err(_) => format!("frame {}", f.text_lossy()),
        },
        Ok(None) => "closed".into(),
        Err(e) => format!("error {e}"),
    }
}

async fn garbage(args: &Args, p: &Pems) -> anyhow::Result<()> {
    // 1. Not TLS at all.
    let mut tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&args.scm)).await??;
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff\xfe garbage garbage\r\n")
        .await?;
    // Read what the SCM answers until it closes (bounded in bytes and time).
    let mut got = 0usize;
    let mut buf = [0u8; 256];
    let end = loop {
        match tokio::time::timeout(
            IO_TIMEOUT,
            tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
        )
        .await
        {
            Ok(Ok(0)) => break "closed".to_string(),
            Ok(Ok(n)) if got + n < 4096 => got += n,
            Ok(Ok(_)) => break "still sending".to_string(),
            Ok(Err(e)) => break format!("error {e}"),
            Err(_) => break "still open".to_string(),
        }
    };
    say(&format!("STEP plain-garbage: {got} bytes then {end}"));
    // 2. TLS, then bytes that are no frame at all.
    let tls = tls_connect(args, p).await?;
    let (r, mut w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, FrameCodec::default());
    w.write_all(b"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX")
        .await?;
    w.flush().await?;
    say(&format!("STEP bad-bytes: {}", answer(&mut reader).await));
    // 2b. TLS, a short frame of version 9 (unknown), then a valid HELLO on the same link.
    let tls = tls_connect(args, p).await?;
    let (r, mut w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, FrameCodec::default());
    let id = cert_machine(args).to_le_bytes();
    w.write_all(&[9, 1, id[0], id[1], 4, 0, b'X', b'X', b'X', b'X'])
        .await?;
    w.flush().await?;
    let first = answer(&mut reader).await;
    write_frame(&mut w, &hello(cert_machine(args), 0)).await?;
    say(&format!(
        "STEP bad-version: {first}; then HELLO: {}",
        answer(&mut reader).await
    ));
    // 3. TLS, a HELLO header declaring the largest data length a frame can carry (over
    //    the SCM's per-link limit), and then only a few bytes of it.
    let tls = tls_connect(args, p).await?;
    let (r, mut w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, FrameCodec::default());
    let hello_code = scm_proto::Code::Hello.byte();
    w.write_all(&[1, hello_code, id[0], id[1], 0xff, 0xff, 1, 2, 3])
        .await?;
    w.flush().await?;
    say(&format!("STEP oversize: {}", answer(&mut reader).await));
    Ok(())
}

async fn foreign_ca(args: &Args, p: &Pems) -> anyhow::Result<()> {
    let validity = Validity::days_from_now(1);
    let ca = Ca::generate("rogue CA", &validity)?;
    let leaf = ca.issue(&LeafSpec::new(
        Identity::Machine(cert_machine(args).max(1)),
        validity,
    ))?;
    let forged = Pems {
        ca: p.ca.clone(),
        cert: leaf.cert_pem,
        key: leaf.key_pem,
    };
    let step = match tls_connect(args, &forged).await {
        Err(e) => format!("handshake failed {e}"),
        Ok(tls) => {
            let (r, mut w) = tokio::io::split(tls);
            let mut reader = FrameReader::new(r, FrameCodec::default());
            write_frame(&mut w, &hello(cert_machine(args), 0)).await?;
            answer(&mut reader).await
        }
    };
    say(&format!("STEP foreign-ca: {step}"));
    Ok(())
}

async fn wrong_id(args: &Args, p: &Pems) -> anyhow::Result<()> {
    let tls = tls_connect(args, p).await?;
    let (r, mut w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, FrameCodec::default());
    write_frame(&mut w, &hello(args.claim, args.config_port)).await?;
    let first = answer(&mut reader).await;
    let then = answer(&mut reader).await;
    say(&format!("STEP wrong-id: {first}; then {then}"));
    Ok(())
}

async fn replay_hello(args: &Args, p: &Pems) -> anyhow::Result<()> {
    let id = cert_machine(args);
    let frame = hello(id, args.config_port);
    for round in 0..args.rounds {
        let tls = tls_connect(args, p).await?;
        let (r, mut w) = tokio::io::split(tls);
        let mut reader = FrameReader::new(r, FrameCodec::default());
        let mut answers = Vec::new();
        for _ in 0..5 {
            write_frame(&mut w, &frame).await?;
            answers.push(answer(&mut reader).await);
        }
        say(&format!(
            "STEP replay-hello {round}: {}",
            answers.join(" | ")
        ));
    }
    Ok(())
}

async fn flood_no_read(args: &Args, p: &Pems) -> anyhow::Result<()> {
    // The config port: accept, hold, never read.
    let listener = TcpListener::bind(("0.0.0.0", args.config_port)).await?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            if held.len() < 64 {
                held.push(s);
            }
        }
    });
    let id = cert_machine(args);
    let tls = tls_connect(args, p).await?;
    // Keep the read half and never touch it.
    let (_r, mut w) = tokio::io::split(tls);
    write_frame(&mut w, &hello(id, args.config_port)).await?;
    say("STEP flood: HELLO sent, reading nothing from now on");
    let end = tokio::time::Instant::now() + Duration::from_secs(args.seconds);
    let mut sent = 0u64;
    let mut blocked = false;
    while tokio::time::Instant::now() < end {
        sent += 1;
        let m = Message::Swipe(v1::Swipe {
            request_id: sent + 1,
            event_id: format!("rogue-{sent:016x}"),
            reader_id: "r1".into(),
            card: format!("ROGUE{:08}", sent % 100_000_000),
            swiped_at_unix_ms: 0,
            ttl_ms: 60_000,
            sent_at_unix_ms: 0,
        });
        let frame = scm_proto::reply_frame(&m, id);
        match tokio::time::timeout(Duration::from_secs(2), write_frame(&mut w, &frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                say(&format!(
                    "STEP flood: write failed after {sent} swipes: {e}"
                ));
                break;
            }
            Err(_) => {
                if !blocked {
                    say(&format!(
                        "STEP flood: the SCM stopped taking frames after {sent} swipes"
                    ));
                    blocked = true;
                }
            }
        }
    }
    say(&format!("STEP flood: ended after {sent} swipes"));
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    sctls::install_default_provider();
    let args = Args::parse();
    let p = match pems(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rogue-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match args.mode {
        Mode::Garbage => garbage(&args, &p).await,
        Mode::ForeignCa => foreign_ca(&args, &p).await,
        Mode::WrongId => wrong_id(&args, &p).await,
        Mode::ReplayHello => replay_hello(&args, &p).await,
        Mode::FloodNoRead => flood_no_read(&args, &p).await,
    };
    match r {
        Ok(()) => {
            say(&format!("DONE {:?}", args.mode));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("FAILED {:?}: {e:#}", args.mode));
            ExitCode::FAILURE
        }
    }
}
