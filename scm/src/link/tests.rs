//! The link's driver over a pipe, with a stand-in for the use-case layer above it: what
//! the link asks of that layer goes through [`Upcalls`] only.

use std::sync::Mutex;

use scm_common::lock::LockExt;
use scm_proto::FrameCodec;
use scm_proto::io::write_frame;
use scm_proto::v1::{self, Message, NackReason};
use tokio::io::duplex;

use super::*;

/// Records what the link asked and answers every swipe with a fixed NACK.
#[derive(Debug, Default)]
struct StandIn {
    swipes: Mutex<Vec<(u16, String)>>,
    pending: Mutex<Vec<u16>>,
}

impl Upcalls for StandIn {
    fn swipe<'a>(
        &'a self,
        machine: u16,
        swipe: &'a v1::Swipe,
        _waited: Duration,
    ) -> UpcallFuture<'a, SwipeVerdict> {
        self.swipes
            .lock_unpoisoned()
            .push((machine, swipe.event_id.clone()));
        Box::pin(async { SwipeVerdict::Nack(NackReason::Busy, "stand-in".into()) })
    }

    fn deliver_pending(&self, machine: u16) {
        self.pending.lock_unpoisoned().push(machine);
    }

    fn in_band_outcome<'a>(
        &'a self,
        _machine: u16,
        _result: &'a PushResult,
        _elapsed: Option<Duration>,
    ) -> UpcallFuture<'a, Result<(), state::StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn the_link_asks_the_layer_above_through_its_upcalls_only() {
    scm_certs::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = scm_certs::pki::write_dev_pki(
        &dir.path().join("pki"),
        &scm_certs::pki::DevPkiOptions {
            machines: vec![7],
            operators: vec![],
            hosts: vec!["localhost".into()],
            validity: scm_certs::pki::Validity::days_from_now(1),
        },
    )
    .unwrap();
    let tls = crate::tlsreload::TlsState::load(
        scm_certs::tls::TlsFiles {
            ca: pki.ca_cert.clone(),
            cert: pki.scm_cert.clone(),
            key: pki.scm_key.clone(),
            crls: vec![],
        },
        scm_certs::tls::TlsPolicy::default(),
    )
    .unwrap();
    let store = state::Store::open(&dir.path().join("scm.db")).unwrap();
    store
        .fleet()
        .sync_machines(&[(7, "seven".into(), 1)])
        .unwrap();
    let stand_in = Arc::new(StandIn::default());
    let sessions: Arc<dyn SessionRegistry> =
        Arc::new(crate::coord::sessions::LocalSessions::default());
    let ctx = Arc::new(LinkContext {
        settings: LinkSettings {
            max_frame_data: 16 * 1024,
            handshake: Duration::from_secs(5),
            idle: Duration::from_secs(30),
            stall: Duration::from_secs(5),
            push_reply: Duration::from_secs(5),
            machines: [(7, super::KnownMachine::default())].into_iter().collect(),
        },
        fleet: store.fleet().clone(),
        sessions: sessions.clone(),
        delivery_locks: Arc::new(crate::coord::delivery::LocalDeliveryLocks::default()),
        events: Events::new(16),
        tls,
        ids: Arc::new(Ids::default()),
        upcalls: stand_in.clone(),
    });
    let (agent, scm) = duplex(1 << 16);
    let (r, w) = tokio::io::split(scm);
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let task = tokio::spawn(serve(ctx, r, w, 7, peer, CancellationToken::new()));

    let (ar, mut aw) = tokio::io::split(agent);
    let mut reader = FrameReader::new(ar, FrameCodec::new(16 * 1024));
    let send = |m: Message| m.to_frame(7).unwrap();
    write_frame(
        &mut aw,
        &send(Message::Hello(v1::Hello {
            request_id: 1,
            ..Default::default()
        })),
    )
    .await
    .unwrap();
    let t = Duration::from_secs(10);
    let hello_ack = reader
        .read_frame(Some(t), t)
        .await
        .unwrap()
        .expect("HELLO answered");
    assert!(matches!(
        v1::Message::decode(&hello_ack),
        Ok(Message::Ack(_))
    ));
    assert!(sessions.session(7).is_some(), "the session is registered");
    write_frame(
        &mut aw,
        &send(Message::Swipe(v1::Swipe {
            request_id: 2,
            event_id: "e1".into(),
            reader_id: "door".into(),
            card: "12345678".into(),
            ..Default::default()
        })),
    )
    .await
    .unwrap();
    let answer = reader
        .read_frame(Some(t), t)
        .await
        .unwrap()
        .expect("SWIPE answered");
    let Ok(Message::Nack(n)) = v1::Message::decode(&answer) else {
        panic!("the stand-in's verdict is the answer: {answer:?}");
    };
    assert_eq!(n.request_id, 2);
    assert_eq!(n.reason(), NackReason::Busy);
    assert_eq!(
        *stand_in.swipes.lock_unpoisoned(),
        vec![(7, "e1".to_string())]
    );
    assert_eq!(
        *stand_in.pending.lock_unpoisoned(),
        vec![7],
        "a version-1 HELLO asks the layer above to bring the machine up to date"
    );
    drop((aw, reader));
    task.await.unwrap().unwrap();
    assert!(
        sessions.session(7).is_none(),
        "the session ends with the link"
    );
}
