//! The agent's config port: the SCM connects here over mutual TLS (only a certificate with
//! the SCM role is accepted) and sends CONFIG frames. Each CONFIG is checked — CODE must
//! be CONFIG and ID this machine's id — and otherwise NACKed with nothing written; a valid
//! one is stored durably and only then ACKed. One configuration is applied at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scm_certs::identity::Role;
use scm_common::reload::Slot;
use scm_proto::io::{FrameReader, ReadError, write_frame};
use scm_proto::v1::{Message, NackReason};
use scm_proto::{Code, Frame, FrameCodec, FrameError};
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::storage::{ConfigStore, Fence};

/// Shared state of the config port.
pub struct ConfigPort {
    /// This machine's id.
    pub machine_id: u16,
    /// Durable storage, behind the lock that makes applies one at a time.
    pub store: tokio::sync::Mutex<ConfigStore>,
    /// TLS acceptor (SCM role only); replaced by a reload (SIGHUP), each connection
    /// uses the one in force when it is accepted.
    pub acceptor: std::sync::RwLock<tokio_rustls::TlsAcceptor>,
    /// Handshake timeout.
    pub handshake: Duration,
    /// Idle timeout per connection.
    pub idle: Duration,
    /// Stall timeout per frame.
    pub stall: Duration,
}

impl std::fmt::Debug for ConfigPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigPort")
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

/// Why a config-port connection ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    /// The TLS handshake failed or the peer is not the SCM.
    #[error("TLS handshake refused ({reason}): {0}", reason = .0.reason())]
    Handshake(#[from] scm_certs::tls::HandshakeError),
    /// Reading failed or timed out.
    #[error("{0}")]
    Read(#[from] ReadError),
    /// Writing failed.
    #[error("cannot answer the SCM: {0}")]
    Write(#[from] std::io::Error),
    /// Closed after a NACK for an oversized frame.
    #[error("closed: {0}")]
    Refused(String),
}

/// What the config port decided about one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store this content as this generation, then ACK.
    Store {
        /// Content.
        content: Vec<u8>,
        /// Generation (0 for version 0).
        generation: u64,
        /// Request id to echo (version 1).
        request_id: u64,
        /// Version of the frame.
        version: u8,
    },
    /// Answer with this NACK frame; nothing is written.
    Nack(Frame),
}

/// The two dialects of the protocol as the config port answers them: version 0 with a
/// status text, version 1 with a message echoing the request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    V0,
    V1,
}

impl Dialect {
    /// Version 1 is this project's protocol; anything else is answered as version 0.
    fn of(version: u8) -> Dialect {
        if version == 1 {
            Dialect::V1
        } else {
            Dialect::V0
        }
    }

    /// The request id to echo (version 0 has none; 0 when the payload is unreadable).
    fn request_id(self, frame: &Frame) -> u64 {
        match self {
            Dialect::V1 => Message::decode(frame).map(|m| m.request_id()).unwrap_or(0),
            Dialect::V0 => 0,
        }
    }

    fn nack(self, machine_id: u16, request_id: u64, reason: NackReason, text: String) -> Frame {
        match self {
            Dialect::V1 => {
                scm_proto::reply_frame(&Message::nack(request_id, reason, text), machine_id)
            }
            Dialect::V0 => scm_proto::text_frame(Code::Nack, machine_id, &text),
        }
    }

    /// The ACK of a stored CONFIG (version 0: `OK`).
    fn stored(self, machine_id: u16, request_id: u64, text: String, generation: u64) -> Frame {
        match self {
            Dialect::V1 => {
                scm_proto::reply_frame(&Message::ack(request_id, text, generation), machine_id)
            }
            Dialect::V0 => scm_proto::text_frame(Code::Ack, machine_id, "OK"),
        }
    }
}

fn nack(version: u8, machine_id: u16, request_id: u64, reason: NackReason, text: String) -> Frame {
    Dialect::of(version).nack(machine_id, request_id, reason, text)
}

/// Checks one frame (pure: no I/O), so every refusal is unit-tested.
pub fn decide(machine_id: u16, frame: &Frame) -> Decision {
    let version = frame.version;
    if let Some(n) = frame.nack_if_unknown() {
        return Decision::Nack(n);
    }
    let dialect = Dialect::of(version);
    let request_id = dialect.request_id(frame);
    if frame.code() != Some(Code::Config) {
        return Decision::Nack(nack(
            version,
            machine_id,
            request_id,
            NackReason::NotAllowed,
            format!("code {} is not CONFIG (2); nothing written", frame.code),
        ));
    }
    if frame.id != machine_id {
        return Decision::Nack(nack(
            version,
            machine_id,
            request_id,
            NackReason::WrongMachineId,
            format!(
                "CONFIG for machine {} but this is machine {machine_id}; nothing written",
                frame.id
            ),
        ));
    }
    if dialect == Dialect::V0 {
        return Decision::Store {
            content: frame.data.to_vec(),
            generation: 0,
            request_id: 0,
            version,
        };
    }
    match Message::decode(frame) {
        Ok(Message::Config(c)) => {
            if !c.sha256.is_empty() && sha2::Sha256::digest(&c.content)[..] != c.sha256[..] {
                return Decision::Nack(nack(
                    1,
                    machine_id,
                    c.request_id,
                    NackReason::Malformed,
                    "content does not match its SHA-256; nothing written".into(),
                ));
            }
            Decision::Store {
                content: c.content,
                generation: c.generation,
                request_id: c.request_id,
                version,
            }
        }
        Ok(_) | Err(_) => Decision::Nack(nack(
            1,
            machine_id,
            request_id,
            NackReason::Malformed,
            "CONFIG payload is not a valid Config message; nothing written".into(),
        )),
    }
}

impl ConfigPort {
    /// Serves one connection from the SCM.
    pub async fn handle(
        self: Arc<Self>,
        tcp: TcpStream,
        _peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), PortError> {
        let acceptor = self.acceptor.current();
        let (tls, _identity) = scm_certs::tls::accept(&acceptor, tcp, self.handshake, &[Role::Scm])
            .await
            .inspect_err(|e| crate::metrics::global().handshake_failed(e))?;
        let (r, mut w) = tokio::io::split(tls);
        let mut reader = FrameReader::new(r, FrameCodec::default());
        loop {
            let frame = tokio::select! {
                _ = shutdown.cancelled() => break,
                f = reader.read_frame(Some(self.idle), self.stall) => f,
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(ReadError::Frame(e @ FrameError::DataTooLong { .. })) => {
                    let text = e.to_string();
                    let (version, id) = reader
                        .pending_header()
                        .map(|h| (h.version, h.id))
                        .unwrap_or((0, self.machine_id));
                    let nack =
                        Frame::protocol_nack(version, id, NackReason::Malformed, text.clone());
                    let _ = write_frame(&mut w, &nack).await;
                    return Err(PortError::Refused(text));
                }
                Err(e) => return Err(e.into()),
            };
            let reply = self.answer(&frame).await;
            write_frame(&mut w, &reply).await?;
        }
        let _ = w.shutdown().await;
        Ok(())
    }

    /// Applies one frame and returns the answer, counted (`agent_configs_total`): what
    /// the config port and the link both do with a CONFIG.
    pub async fn answer(&self, frame: &Frame) -> Frame {
        let reply = self.apply(frame).await;
        if frame.code() == Some(Code::Config) {
            let outcome = if reply.code() == Some(Code::Ack) {
                "ack"
            } else {
                "nack"
            };
            crate::metrics::global().configs.inc(&[outcome]);
        }
        reply
    }

    /// Applies one frame and returns the answer.
    pub async fn apply(&self, frame: &Frame) -> Frame {
        let id = self.machine_id;
        match decide(id, frame) {
            Decision::Nack(f) => {
                tracing::warn!("CONFIG refused: {}", nack_text(&f));
                f
            }
            Decision::Store {
                content,
                generation,
                request_id,
                version,
            } => {
                let store = self.store.lock().await;
                let digest = crate::storage::sha(&content);
                // Version 0 carries no generation, so only version 1 can be fenced.
                let fence = if version == 1 {
                    Fence::decide(store.applied().as_ref(), generation, &digest)
                } else {
                    Fence::Store
                };
                if let Fence::Stale { stored } = fence {
                    let text = if stored == generation {
                        format!(
                            "generation {generation} with other content than the stored generation {stored}; nothing written"
                        )
                    } else {
                        format!(
                            "generation {generation} is older than the stored generation {stored}; nothing written"
                        )
                    };
                    tracing::warn!("CONFIG refused (stale): {text}");
                    return scm_proto::reply_frame(&Message::stale(request_id, stored, text), id);
                }
                let already = fence == Fence::Repeat;
                let result = if already {
                    Ok(format!("generation {generation} already applied"))
                } else {
                    let len = content.len();
                    let s = store.clone();
                    match tokio::task::spawn_blocking(move || s.save(&content, generation)).await {
                        Ok(r) => {
                            r.map(|_| format!("stored {len} bytes as generation {generation}"))
                        }
                        Err(e) => Err(crate::storage::StorageError {
                            dir: store.dir().to_path_buf(),
                            step: "storage task",
                            source: std::io::Error::other(e.to_string()),
                        }),
                    }
                };
                match result {
                    Ok(text) => {
                        tracing::info!(generation, "configuration {text}");
                        if !already {
                            // Fault tests: stored durably, not yet ACKed.
                            scm_common::failpoint::pause("agent-after-durable-write").await;
                        }
                        Dialect::of(version).stored(id, request_id, text, generation)
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        nack(
                            version,
                            id,
                            request_id,
                            NackReason::StorageFailed,
                            e.to_string(),
                        )
                    }
                }
            }
        }
    }
}

/// The answer to a CONFIG that arrives over the link while another is being stored.
pub(crate) fn busy(machine_id: u16, frame: &Frame) -> Frame {
    crate::metrics::global().configs.inc(&["nack"]);
    let request_id = Dialect::of(frame.version).request_id(frame);
    nack(
        frame.version,
        machine_id,
        request_id,
        NackReason::Busy,
        "another configuration is being stored; nothing written, send it again".into(),
    )
}

fn nack_text(f: &Frame) -> String {
    match Message::decode(f) {
        Ok(Message::Nack(n)) => n.detail,
        _ => f.text_lossy(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scm_proto::v1;

    fn cfg_frame(id: u16, content: &[u8]) -> Frame {
        Message::Config(v1::Config {
            request_id: 9,
            generation: 4,
            content: content.to_vec(),
            sha256: sha2::Sha256::digest(content).to_vec(),
        })
        .to_frame(id)
        .unwrap()
    }

    fn nack_of(d: Decision) -> v1::Nack {
        match d {
            Decision::Nack(f) => match Message::decode(&f).unwrap() {
                Message::Nack(n) => n,
                m => panic!("{m:?}"),
            },
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn valid_v1_config_is_stored() {
        assert_eq!(
            decide(3, &cfg_frame(3, b"x")),
            Decision::Store {
                content: b"x".to_vec(),
                generation: 4,
                request_id: 9,
                version: 1
            }
        );
    }

    #[test]
    fn other_machine_id_is_nacked_with_request_id() {
        let n = nack_of(decide(3, &cfg_frame(4, b"x")));
        assert_eq!(n.request_id, 9);
        assert_eq!(n.reason(), NackReason::WrongMachineId);
        assert!(n.detail.contains("machine 4"));
    }

    #[test]
    fn wrong_code_is_nacked() {
        let hello = Message::Hello(v1::Hello {
            request_id: 2,
            ..Default::default()
        })
        .to_frame(3)
        .unwrap();
        let n = nack_of(decide(3, &hello));
        assert_eq!((n.request_id, n.reason()), (2, NackReason::NotAllowed));
        let unknown = Frame::new(1, Code::Config, 3, Vec::new()).unwrap();
        let mut unknown = unknown;
        unknown.code = 77;
        assert_eq!(
            nack_of(decide(3, &unknown)).reason(),
            NackReason::UnknownCode
        );
    }

    #[test]
    fn hash_mismatch_and_garbage_are_nacked() {
        let mut f = cfg_frame(3, b"x");
        let mut m = match Message::decode(&f).unwrap() {
            Message::Config(c) => c,
            _ => unreachable!(),
        };
        m.sha256[0] ^= 1;
        f = Message::Config(m).to_frame(3).unwrap();
        assert_eq!(nack_of(decide(3, &f)).reason(), NackReason::Malformed);
        let garbage = Frame::new(1, Code::Config, 3, vec![0xff, 0xff, 0xff]).unwrap();
        assert_eq!(nack_of(decide(3, &garbage)).reason(), NackReason::Malformed);
    }

    fn port(dir: &std::path::Path) -> ConfigPort {
        scm_certs::tls::install_default_provider();
        let ca =
            scm_certs::pki::Ca::generate("t", &scm_certs::pki::Validity::days_from_now(1)).unwrap();
        let leaf = ca
            .issue(&scm_certs::pki::LeafSpec::new(
                scm_certs::identity::Identity::Machine(3),
                scm_certs::pki::Validity::days_from_now(1),
            ))
            .unwrap();
        let cfg = scm_certs::tls::server_config_from_pem(
            ca.cert_pem(),
            &leaf.cert_pem,
            &leaf.key_pem,
            &[],
            Default::default(),
            &[],
        )
        .unwrap();
        ConfigPort {
            machine_id: 3,
            store: tokio::sync::Mutex::new(ConfigStore::open(dir).unwrap()),
            acceptor: std::sync::RwLock::new(tokio_rustls::TlsAcceptor::from(cfg)),
            handshake: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            stall: Duration::from_secs(1),
        }
    }

    fn config(generation: u64, content: &[u8]) -> Frame {
        Message::Config(v1::Config {
            request_id: generation,
            generation,
            content: content.to_vec(),
            sha256: Vec::new(),
        })
        .to_frame(3)
        .unwrap()
    }

    fn answer(f: Frame) -> Message {
        Message::decode(&f).unwrap()
    }

    #[tokio::test]
    async fn stale_generations_are_refused_and_a_repeat_is_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let p = port(d.path());
        assert!(
            matches!(answer(p.apply(&config(5, b"five")).await), Message::Ack(a) if a.generation == 5)
        );
        match answer(p.apply(&config(3, b"three")).await) {
            Message::Nack(n) => {
                assert_eq!((n.reason(), n.generation), (NackReason::Stale, 5));
                assert!(n.detail.contains("older"), "{}", n.detail);
            }
            m => panic!("{m:?}"),
        }
        match answer(p.apply(&config(5, b"other five")).await) {
            Message::Nack(n) => {
                assert_eq!((n.reason(), n.generation), (NackReason::Stale, 5));
                assert!(n.detail.contains("other content"), "{}", n.detail);
            }
            m => panic!("{m:?}"),
        }
        assert_eq!(
            std::fs::read(d.path().join("config.current")).unwrap(),
            b"five"
        );
        match answer(p.apply(&config(5, b"five")).await) {
            Message::Ack(a) => assert!(a.detail.contains("already applied"), "{}", a.detail),
            m => panic!("{m:?}"),
        }
        assert!(
            !d.path().join("config.previous").exists(),
            "the repeat wrote nothing"
        );
        assert!(matches!(
            answer(p.apply(&config(6, b"six")).await),
            Message::Ack(_)
        ));
        assert_eq!(
            std::fs::read(d.path().join("config.previous")).unwrap(),
            b"five"
        );
    }

    #[test]
    fn v0_rules() {
        let ok = Frame::v0(Code::Config, 3, b"raw".to_vec()).unwrap();
        assert!(matches!(
            decide(3, &ok),
            Decision::Store {
                generation: 0,
                version: 0,
                ..
            }
        ));
        match decide(3, &Frame::v0(Code::Config, 5, b"raw".to_vec()).unwrap()) {
            Decision::Nack(f) => {
                assert_eq!((f.version, f.code, f.id), (0, 151, 3));
                assert!(f.text_lossy().contains("machine 5"));
            }
            d => panic!("{d:?}"),
        }
        let mut v9 = ok.clone();
        v9.version = 9;
        match decide(3, &v9) {
            Decision::Nack(f) => assert!(f.text_lossy().contains("version 9")),
            d => panic!("{d:?}"),
        }
    }
}
