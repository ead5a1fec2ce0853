//! Version-0 interop: a third-party style machine written to the original frame rules,
//! byte by byte (it does not use our codec), against the real SCM. HELLO and MSG rules,
//! CONFIG through the machine's config port, and CONFIG in-band as the answer to HELLO.

use std::net::SocketAddr;
use std::sync::Arc;

use integration_tests::{Fleet, backoffice_with, bin, run};
use scm_certs::identity::Identity;
use scm_certs::pki::Validity;
use scm_certs::tls::{self as sctls, TlsPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Pems, WAITING, connector, dev_issue, dev_pems, init, rt};

/// One version-0 frame, encoded by hand: VERSION, CODE, ID (LE), DATA_LENGTH (LE), DATA.
pub(crate) fn v0(code: u8, id: u16, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8, code];
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&(data.len() as u16).to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// Reads one frame by hand: (version, code, id, data); `None` at EOF.
async fn read_v0<S: AsyncReadExt + Unpin>(s: &mut S) -> Option<(u8, u8, u16, Vec<u8>)> {
    let mut h = [0u8; 6];
    tokio::time::timeout(WAITING, s.read_exact(&mut h))
        .await
        .ok()?
        .ok()?;
    let len = u16::from_le_bytes([h[4], h[5]]) as usize;
    let mut data = vec![0u8; len];
    tokio::time::timeout(WAITING, s.read_exact(&mut data))
        .await
        .ok()?
        .ok()?;
    Some((h[0], h[1], u16::from_le_bytes([h[2], h[3]]), data))
}

type Link = tokio_rustls::client::TlsStream<TcpStream>;

async fn link(addr: SocketAddr, p: &Pems) -> Link {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    sctls::connect(
        &connector(p, TlsPolicy::default()),
        tcp,
        &Identity::Scm,
        WAITING,
    )
    .await
    .expect("TLS to the SCM")
}

pub(crate) const ACK: u8 = 150;
const NACK: u8 = 151;

/// Rewrites machine `id` in scm.toml to protocol version 0, optionally with a config
/// address.
pub(crate) fn make_v0(dev: &std::path::Path, id: u16, config_addr: Option<SocketAddr>) {
    let p = dev.join("scm.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let from = format!("id = {id}\nname = \"machine-{id}\"\nprotocol_version = 1\n");
    let mut to = format!("id = {id}\nname = \"legacy-{id}\"\nprotocol_version = 0\n");
    if let Some(a) = config_addr {
        to.push_str(&format!("config_addr = \"{a}\"\n"));
    }
    assert!(text.contains(&from), "{text}");
    std::fs::write(&p, text.replace(&from, &to)).unwrap();
}

#[test]
fn v0_hello_and_msg_rules() {
    init();
    let (dir, _pw) = Fleet::init(&[2, 3]);
    let dev = dir.path().join("dev");
    make_v0(&dev, 2, None);
    make_v0(&dev, 3, None);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let addr = scm.listening("agents");
    let m2 = dev_pems(&dev, "machine-2");
    rt().block_on(async {
        let mut s = link(addr, &m2).await;
        // HELLO from a known id: ACK with a status text, to the byte.
        s.write_all(&v0(0, 2, b"hello")).await.unwrap();
        let mut raw = [0u8; 8];
        s.read_exact(&mut raw).await.unwrap();
        assert_eq!(raw, [0x00, 0x96, 0x02, 0x00, 0x02, 0x00, b'O', b'K']);
        // MSG on the same link: ACK.
        s.write_all(&v0(1, 2, b"paper low")).await.unwrap();
        assert_eq!(read_v0(&mut s).await, Some((0, ACK, 2, b"OK".to_vec())));

        // MSG on a new connection from the HELLO's address: ACK.
        let mut s2 = link(addr, &m2).await;
        s2.write_all(&v0(1, 2, b"second link")).await.unwrap();
        assert_eq!(read_v0(&mut s2).await, Some((0, ACK, 2, b"OK".to_vec())));

        // MSG from machine 3, which never said HELLO: NACK.
        let mut s3 = link(addr, &dev_pems(&dev, "machine-3")).await;
        s3.write_all(&v0(1, 3, b"hi")).await.unwrap();
        let (v, code, id, text) = read_v0(&mut s3).await.unwrap();
        assert_eq!((v, code, id), (0, NACK, 3));
        assert!(String::from_utf8_lossy(&text).contains("say HELLO first"));

        // A RESET from a machine is not accepted.
        s.write_all(&v0(3, 2, b"")).await.unwrap();
        let (_, code, _, text) = read_v0(&mut s).await.unwrap();
        assert_eq!(code, NACK, "{}", String::from_utf8_lossy(&text));

        // HELLO from an id the SCM does not know (a valid certificate for machine 9):
        // NACK, then the SCM closes the link.
        let m9 = dev_issue(&dev, Identity::Machine(9), Validity::days_from_now(1));
        let mut s9 = link(addr, &m9).await;
        s9.write_all(&v0(0, 9, b"hello")).await.unwrap();
        let (_, code, id, text) = read_v0(&mut s9).await.unwrap();
        assert_eq!((code, id), (NACK, 9));
        assert!(String::from_utf8_lossy(&text).contains("not known"));
        assert_eq!(read_v0(&mut s9).await, None, "closed after the NACK");

        // The first link still works.
        s.write_all(&v0(1, 2, b"still here")).await.unwrap();
        assert_eq!(read_v0(&mut s).await, Some((0, ACK, 2, b"OK".to_vec())));
    });
}

/// A version-0 machine's config port: accepts the SCM's connection, reads one CONFIG by
/// hand, answers with `answer(content)` and returns what it received.
pub(crate) async fn serve_one_config(
    listener: &TcpListener,
    acceptor: &tokio_rustls::TlsAcceptor,
    answer: impl Fn(&[u8]) -> Vec<u8>,
) -> (u8, u8, u16, Vec<u8>) {
    let (tcp, _) = tokio::time::timeout(WAITING, listener.accept())
        .await
        .expect("the SCM connects to the config port")
        .unwrap();
    let mut s = acceptor.accept(tcp).await.expect("TLS from the SCM");
    let got = read_v0(&mut s).await.expect("a CONFIG frame");
    s.write_all(&answer(&got.3)).await.unwrap();
    s.flush().await.unwrap();
    let _ = s.shutdown().await;
    got
}

#[test]
fn v0_config_through_the_machine_config_port() {
    init();
    let (dir, _pw) = Fleet::init(&[2]);
    let dev = dir.path().join("dev");
    let m2 = dev_pems(&dev, "machine-2");
    let runtime = rt();
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let port_addr = listener.local_addr().unwrap();
    make_v0(&dev, 2, Some(port_addr));
    let acceptor = tokio_rustls::TlsAcceptor::from(
        sctls::server_config_from_pem(&m2.ca, &m2.cert, &m2.key, &[], TlsPolicy::default(), &[])
            .unwrap(),
    );
    let scm = Fleet::start_scm(dir.path(), &[]);
    let telnet = scm.listening("telnet");
    let cfg = dev.join("backoffice.toml");
    let file = dir.path().join("legacy.cfg");
    std::fs::write(&file, "speed=fast\n").unwrap();
    let push = {
        let cfg = cfg.clone();
        let file = file.clone();
        move || {
            backoffice_with(
                &cfg,
                telnet,
                &["push", "--machine", "2", "--file", file.to_str().unwrap()],
            )
        }
    };
    let acceptor = Arc::new(acceptor);
    runtime.block_on(async {
        // ACK from the machine.
        let bo = tokio::task::spawn_blocking(push.clone());
        let got = serve_one_config(&listener, &acceptor, |_| v0(ACK, 2, b"OK")).await;
        assert_eq!(
            got,
            (0, 2, 2, b"speed=fast\n".to_vec()),
            "raw CONFIG with the content"
        );
        let (code, out, err) = bo.await.unwrap();
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.trim(), "250 ACK machine 2 generation 1: OK");

        // NACK from the machine: exit 1 with its reason.
        std::fs::write(&file, "speed=warp\n").unwrap();
        let bo = tokio::task::spawn_blocking(push);
        let got =
            serve_one_config(&listener, &acceptor, |_| v0(NACK, 2, b"unknown key speed")).await;
        assert_eq!(got.3, b"speed=warp\n");
        let (code, out, err) = bo.await.unwrap();
        assert_eq!(code, 1, "{out}{err}");
        assert_eq!(
            out.trim(),
            "554 NACK machine 2 generation 2: unknown key speed"
        );
    });
}

#[test]
fn v0_config_in_band_as_the_answer_to_hello() {
    init();
    let (dir, _pw) = Fleet::init(&[3]);
    let dev = dir.path().join("dev");
    make_v0(&dev, 3, None);
    let scm = Fleet::start_scm(dir.path(), &[]);
    let addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let cfg = dev.join("backoffice.toml");
    let file = dir.path().join("inband.cfg");
    std::fs::write(&file, "mode=kiosk\n").unwrap();
    let env = [("BACKOFFICE__SCM__ADDRESS", telnet.to_string())];
    let (code, _out, err) = run(
        &bin("backoffice"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "push",
            "--machine",
            "3",
            "--file",
            file.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("450 machine 3 unreachable; generation 1 pending"),
        "{err}"
    );

    let m3 = dev_pems(&dev, "machine-3");
    rt().block_on(async {
        let mut s = link(addr, &m3).await;
        s.write_all(&v0(0, 3, b"hello")).await.unwrap();
        // The waiting CONFIG is the answer to the HELLO.
        assert_eq!(
            read_v0(&mut s).await,
            Some((0, 2, 3, b"mode=kiosk\n".to_vec()))
        );
        s.write_all(&v0(ACK, 3, b"OK")).await.unwrap();
        scm.wait_for("outcome=Ack");
        // Nothing is waiting any more: a new HELLO gets a plain ACK.
        let mut s2 = link(addr, &m3).await;
        s2.write_all(&v0(0, 3, b"hello")).await.unwrap();
        assert_eq!(read_v0(&mut s2).await, Some((0, ACK, 3, b"OK".to_vec())));
    });
    let (code, out, _) = run(
        &bin("backoffice"),
        &["--config", cfg.to_str().unwrap(), "status", "3"],
        &env,
    );
    assert_eq!(code, 0);
    assert!(out.contains("desired 1, applied 1 (up to date)"), "{out}");
    assert!(out.contains("protocol version: 0"), "{out}");
}

/// A version-0 machine that opens a new connection per message (as the public
/// spec-conformant simulators do): `push --wait` waits for the in-band ACK at its next
/// HELLO and exits 0 instead of 2, and `close_after_config` ends that link once the
/// CONFIG is answered instead of leaving it to the idle timeout.
#[test]
fn push_wait_gets_the_in_band_ack_of_a_machine_that_connects_per_message() {
    init();
    let (dir, _pw) = Fleet::init(&[2]);
    let dev = dir.path().join("dev");
    make_v0(&dev, 2, None);
    let p = dev.join("scm.toml");
    let text = std::fs::read_to_string(&p).unwrap().replace(
        "name = \"legacy-2\"\nprotocol_version = 0\n",
        "name = \"legacy-2\"\nprotocol_version = 0\nclose_after_config = true\n",
    );
    std::fs::write(&p, text).unwrap();
    let scm = Fleet::start_scm(dir.path(), &[]);
    let addr = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let bo = dev.join("backoffice.toml");
    let file = dir.path().join("v0.cfg");
    std::fs::write(&file, "speed=3\n").unwrap();
    let m2 = dev_pems(&dev, "machine-2");
    let pushed = |args: &'static [&'static str]| {
        let (bo, file) = (bo.clone(), file.clone());
        std::thread::spawn(move || {
            let f = file.to_str().unwrap().to_string();
            let mut full = vec!["push", "--machine", "2", "--file", f.as_str()];
            full.extend_from_slice(args);
            backoffice_with(&bo, telnet, &full)
        })
    };
    // Without --wait: pending (2) at once, the machine not being connected.
    let (code, out, err) = pushed(&[]).join().unwrap();
    assert_eq!(code, 2, "{out}{err}");
    assert!(format!("{out}{err}").starts_with("450"), "{out}{err}");

    std::fs::write(&file, "speed=4\n").unwrap();
    let waiting = pushed(&["--wait", "30"]);
    rt().block_on(async {
        // The push is stored before the machine's next HELLO; until then it waits.
        let deadline = std::time::Instant::now() + WAITING;
        while !scm.logs().contains("generation = 2") && !scm.logs().contains("generation=2") {
            assert!(std::time::Instant::now() < deadline, "{}", scm.logs());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut s = link(addr, &m2).await;
        s.write_all(&v0(0, 2, b"hello")).await.unwrap();
        let (_, code, id, data) = read_v0(&mut s).await.expect("the in-band CONFIG");
        assert_eq!((code, id, data.as_slice()), (2, 2, &b"speed=4\n"[..]));
        s.write_all(&v0(ACK, 2, b"OK")).await.unwrap();
        assert_eq!(read_v0(&mut s).await, None, "closed after the in-band ACK");
    });
    let (code, out, err) = waiting.join().unwrap();
    assert_eq!(
        code, 0,
        "the ACK at the next HELLO is the push's result: {out}{err}"
    );
    assert!(
        out.starts_with("250 ACK machine 2 generation 2"),
        "{out}{err}"
    );
}
