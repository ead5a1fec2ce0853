//! The load generator's clients: an SCM agent that speaks the real frame protocol
//! (scm-proto: HELLO, SWIPE, ACK; the machine's config port answering CONFIG), and an MQTT
//! client over the same TLS client configuration. Both connect with TCP_NODELAY and a full
//! mutual TLS 1.3 handshake (client session resumption disabled in scm-certs).

use std::time::Duration;

use anyhow::{Context, bail};
use scm_certs::identity::Identity;
use scm_proto::FrameCodec;
use scm_proto::io::{FrameReader, write_frame};
use scm_proto::v1::{self, Message};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// A TLS stream to a server under test.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Time allowed for one connection set-up (TCP, TLS, HELLO/ACK or CONNECT/CONNACK).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// An agent link after HELLO/ACK.
pub struct ScmLink {
    /// Frames from the SCM.
    pub reader: FrameReader<ReadHalf<Tls>>,
    /// To the SCM.
    pub writer: WriteHalf<Tls>,
}

impl std::fmt::Debug for ScmLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScmLink")
    }
}

async fn tls(connector: &tokio_rustls::TlsConnector, addr: &str) -> anyhow::Result<Tls> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("TCP connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(scm_certs::tls::connect(connector, tcp, &Identity::Scm, SETUP_TIMEOUT).await?)
}

/// Connects machine `id` to the SCM and completes HELLO/ACK.
pub async fn scm_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: &str,
    id: u16,
    config_port: u16,
) -> anyhow::Result<ScmLink> {
    tokio::time::timeout(SETUP_TIMEOUT, async {
        let s = tls(connector, addr).await?;
        let (r, mut w) = tokio::io::split(s);
        let mut reader = FrameReader::new(r, FrameCodec::new(4096));
        let hello = Message::Hello(v1::Hello {
            request_id: 1,
            agent_version: "scm-bench".into(),
            config_port: u32::from(config_port),
            applied_generation: 0,
            applied_sha256: Vec::new(),
            readers: vec!["r1".into()],
            ..Default::default()
        });
        write_frame(&mut w, &scm_proto::reply_frame(&hello, id)).await?;
        let f = reader
            .read_frame(Some(SETUP_TIMEOUT), SETUP_TIMEOUT)
            .await?
            .context("the SCM closed the link before answering HELLO")?;
        match Message::decode(&f)? {
            Message::Ack(a) if a.request_id == 1 => Ok(ScmLink { reader, writer: w }),
            m => bail!("unexpected answer to HELLO: {m:?}"),
        }
    })
    .await
    .context("HELLO/ACK timed out")?
}

/// Connects to the MQTT broker as machine `id` and completes CONNECT/CONNACK.
pub async fn mqtt_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: &str,
    client_id: &str,
) -> anyhow::Result<Tls> {
    tokio::time::timeout(SETUP_TIMEOUT, async {
        let mut s = tls(connector, addr).await?;
        crate::mqtt::handshake(&mut s, client_id).await?;
        Ok(s)
    })
    .await
    .context("CONNECT/CONNACK timed out")?
}

/// The SWIPE frame for sequence number `seq` from machine `id`: the card number is the
/// sequence number (digits), the event id is unique per run.
pub fn swipe_frame(id: u16, seq: u64, request_id: u64) -> scm_proto::Frame {
    let m = Message::Swipe(v1::Swipe {
        request_id,
        event_id: format!("b{seq}"),
        reader_id: "r1".into(),
        card: format!("{seq:010}"),
        swiped_at_unix_ms: 0,
        ttl_ms: 30_000,
        // Stamped like a real agent's, so the SCM's wait estimate is on the measured path.
        sent_at_unix_ms: scm_common::clock::now_ms_u64(),
    });
    scm_proto::reply_frame(&m, id)
}

/// Stores `content` as agent `id`'s configuration in `dir` the way the real agent does
/// before it ACKs: a temporary file written and fsynced, then renamed over the old one.
/// Both systems' bench agents call it, so the fan-out compares the delivery, with the
/// same durable save on the receiving side.
pub async fn store_durably(
    dir: std::path::PathBuf,
    id: u16,
    content: Vec<u8>,
) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let tmp = dir.join(format!("agent-{id}.cfg.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(format!("agent-{id}.cfg")))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Answers the CONFIGs the SCM sends over machine `id`'s link (configuration over the
/// link, the default for version 1): stores each durably, ACKs it on the link, and
/// reports it on `done`.
pub async fn link_configs(
    link: ScmLink,
    id: u16,
    dir: std::path::PathBuf,
    done: tokio::sync::mpsc::UnboundedSender<ConfigSeen>,
) {
    let ScmLink {
        mut reader,
        mut writer,
    } = link;
    while let Ok(Some(f)) = reader.read_frame(None, SETUP_TIMEOUT).await {
        let Ok(Message::Config(c)) = Message::decode(&f) else {
            continue;
        };
        let bytes = c.content.len();
        if store_durably(dir.clone(), id, c.content).await.is_err() {
            return;
        }
        let ack = Message::ack(c.request_id, "stored", c.generation);
        if write_frame(&mut writer, &scm_proto::reply_frame(&ack, id))
            .await
            .is_err()
        {
            return;
        }
        let _ = done.send(ConfigSeen { bytes });
    }
}

/// What one config port saw.
#[derive(Debug)]
pub struct ConfigSeen {
    /// Its size.
    pub bytes: usize,
}
