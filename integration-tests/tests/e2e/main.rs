//! End-to-end tests: the real `scm`, `machine-agent` and `backoffice` binaries talking
//! over real sockets, TLS and telnet. One test binary, one module per area.

mod admin;
mod admin_table;
mod bigendian;
mod closing;
mod configlink;
mod crash;
mod faults;
mod fencing;
mod fleet;
mod frames;
mod grpc_standard;
mod halfopen;
mod hardening;
mod initdev;
mod json;
mod metrics;
mod mtls;
mod relay;
mod rfideas;
mod stall;
mod swipe_path;
mod swipes;
mod tables;
mod telnet;
mod v0;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use integration_tests::WAIT;
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, LeafSpec, Validity};
use scm_certs::tls::{self as sctls, TlsPolicy};
use scm_proto::io::{FrameReader, write_frame};
use scm_proto::{Frame, FrameCodec};
use tokio::net::TcpStream;

/// PEM strings of a client identity.
#[derive(Debug)]
pub struct Pems {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// Reads the dev CA and a leaf of the init-dev directory (`machine-1`, `scm`, ...).
pub fn dev_pems(dev: &Path, leaf: &str) -> Pems {
    let r =
        |p: String| std::fs::read_to_string(dev.join(&p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    Pems {
        ca: r("ca.pem".into()),
        cert: r(format!("{leaf}.pem")),
        key: r(format!("{leaf}-key.pem")),
    }
}

/// Issues a leaf from the dev CA with a custom validity.
pub fn dev_issue(dev: &Path, identity: Identity, validity: Validity) -> Pems {
    let ca = Ca::load(&dev.join("ca.pem"), &dev.join("ca-key.pem")).expect("load dev CA");
    let leaf = ca.issue(&LeafSpec::new(identity, validity)).expect("issue");
    Pems {
        ca: ca.cert_pem().to_string(),
        cert: leaf.cert_pem,
        key: leaf.key_pem,
    }
}

/// A client TLS connector for these PEMs.
pub fn connector(p: &Pems, policy: TlsPolicy) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(
        sctls::client_config_from_pem(&p.ca, &p.cert, &p.key, policy).expect("client config"),
    )
}

/// A framed TLS client connection.
#[allow(missing_debug_implementations)]
pub struct FrameClient {
    pub reader: FrameReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>,
    pub writer: tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
}

impl FrameClient {
    /// Connects to `addr` expecting the peer identity `expected`.
    pub async fn connect(
        addr: SocketAddr,
        p: &Pems,
        expected: Identity,
    ) -> anyhow::Result<FrameClient> {
        let tcp = TcpStream::connect(addr).await?;
        let s = sctls::connect(&connector(p, TlsPolicy::default()), tcp, &expected, WAIT).await?;
        let (r, w) = tokio::io::split(s);
        Ok(FrameClient {
            reader: FrameReader::new(r, FrameCodec::default()),
            writer: w,
        })
    }

    /// Sends a frame.
    pub async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        write_frame(&mut self.writer, f).await
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.writer.write_all(b).await?;
        self.writer.flush().await
    }

    /// Next frame, `None` at EOF; errors (including a reset) as `Err`.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Frame>> {
        Ok(self.reader.read_frame(Some(WAIT), WAIT).await?)
    }
}

/// A current-thread runtime for a test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Installs the process-wide TLS provider (idempotent).
pub fn init() {
    sctls::install_default_provider();
}

/// The bound on every wait in async test code.
pub const WAITING: Duration = WAIT;

/// Shared helper: a short timeout.
pub const SHORT: Duration = Duration::from_millis(300);
