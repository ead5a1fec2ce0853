//! Durability of the agent's configuration store under `kill -9`: a stream of large
//! CONFIGs is pushed to the real agent (the test plays the SCM on the config port) and the
//! agent is killed at varying points. Afterwards `config.current` and `config.previous` are
//! each exactly one of the configurations that were sent, never a torn mix, and the
//! restarted agent reports a consistent applied state.

use std::path::Path;

use integration_tests::{Fleet, Proc};
use scm_certs::identity::Identity;
use scm_proto::v1::{self, Message};
use sha2::Digest;

use crate::{FrameClient, dev_pems, init, rt};

/// Generation `g`'s content: 60 000 bytes, every line naming `g`, so any mix of two
/// generations or a short write is visible.
fn content(g: u64) -> Vec<u8> {
    let line = format!("generation {g:08} ------------------------------------------\n");
    let mut out = Vec::new();
    while out.len() + line.len() <= 60_000 {
        out.extend_from_slice(line.as_bytes());
    }
    out
}

/// Which generation `data` is, if it is exactly one of them.
fn which(data: &[u8]) -> Option<u64> {
    let first = std::str::from_utf8(data).ok()?.lines().next()?;
    let g: u64 = first.strip_prefix("generation ")?.get(..8)?.parse().ok()?;
    (content(g) == data).then_some(g)
}

fn check_store(dir: &Path, sent: u64) -> Option<u64> {
    let current = std::fs::read(dir.join("config.current")).ok();
    let previous = std::fs::read(dir.join("config.previous")).ok();
    let cur = current
        .as_ref()
        .map(|c| which(c).unwrap_or_else(|| panic!("config.current is torn ({} bytes)", c.len())));
    if let Some(p) = &previous {
        let pg = which(p).unwrap_or_else(|| panic!("config.previous is torn ({} bytes)", p.len()));
        // A kill between keeping the previous version and the final rename leaves both
        // names on the old file: previous may equal current, never be newer.
        assert!(
            Some(pg) <= cur,
            "previous {pg} is newer than current {cur:?}"
        );
    }
    if let Some(g) = cur {
        assert!(
            g <= sent,
            "generation {g} was never sent (sent up to {sent})"
        );
    }
    cur
}

#[test]
fn kill_dash_nine_never_leaves_a_torn_configuration() {
    init();
    let (dir, _pw) = Fleet::init(&[1]);
    let dev = dir.path().join("dev");
    let store = dev.join("machine-1");
    let scm = dev_pems(&dev, "scm");
    // Nothing listens here: the agent's event link just keeps retrying.
    let nowhere: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut generation = 0u64;
    let mut kills = 0;
    let mut last_acked = 0u64;
    for round in 0..25u64 {
        let mut agent: Proc = Fleet::start_agent(dir.path(), 1, nowhere, &[]);
        let config_addr = agent.listening("config");
        // Kill after a varying number of ACKs, while the next CONFIG is in flight, and
        // vary the point inside that write with a little busy work.
        let acks_before_kill = 1 + (round % 4);
        let spin = (round * 7919) % 200_000;
        let acked = rt().block_on(async {
            let mut c = FrameClient::connect(config_addr, &scm, Identity::Machine(1))
                .await
                .expect("connect to the config port");
            let mut acked = 0u64;
            loop {
                generation += 1;
                let body = content(generation);
                let msg = Message::Config(v1::Config {
                    request_id: generation,
                    generation,
                    sha256: sha2::Sha256::digest(&body).to_vec(),
                    content: body,
                });
                c.send(&msg.to_frame(1).unwrap())
                    .await
                    .expect("send CONFIG");
                if acked >= acks_before_kill {
                    return acked;
                }
                match c.recv().await.expect("answer").map(|f| Message::decode(&f)) {
                    Some(Ok(Message::Ack(a))) => {
                        assert_eq!(a.request_id, generation);
                        last_acked = generation;
                        acked += 1;
                    }
                    other => panic!("expected ACK, got {other:?}"),
                }
            }
        });
        let mut x = 0u64;
        for i in 0..spin {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        agent.kill9();
        kills += 1;
        assert!(acked >= 1);
        let cur = check_store(&store, generation).expect("a configuration is stored");
        // Everything ACKed is durable: the current file is at least the last ACKed one.
        assert!(
            cur >= last_acked,
            "ACKed generation {last_acked} lost, found {cur}"
        );
    }
    assert_eq!(kills, 25);
    // A restarted agent loads the state and serves again.
    let agent = Fleet::start_agent(dir.path(), 1, nowhere, &[]);
    let config_addr = agent.listening("config");
    rt().block_on(async {
        let mut c = FrameClient::connect(config_addr, &scm, Identity::Machine(1))
            .await
            .unwrap();
        let g = generation + 1;
        let body = content(g);
        let msg = Message::Config(v1::Config {
            request_id: 1,
            generation: g,
            sha256: sha2::Sha256::digest(&body).to_vec(),
            content: body,
        });
        c.send(&msg.to_frame(1).unwrap()).await.unwrap();
        match c.recv().await.unwrap().map(|f| Message::decode(&f)) {
            Some(Ok(Message::Ack(a))) => assert_eq!(a.generation, g),
            other => panic!("{other:?}"),
        }
        assert_eq!(check_store(&store, g), Some(g));
    });
}
