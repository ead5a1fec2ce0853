//! A non-conformant legacy machine that encodes ID and DATA_LENGTH big-endian (as one
//! public 2019/20 simulator does), written here byte by byte without our codec, against
//! the real SCM configured with `byte_order = "big"`: HELLO, MSG, and a CONFIG through its
//! config port answered with ACK. Machine 258 (0x0102) and a 300-byte MSG (0x012c) make
//! every field read differently in the two orders.

use std::net::SocketAddr;

use integration_tests::{Fleet, backoffice_with};
use scm_certs::identity::Identity;
use scm_certs::tls::{self as sctls, TlsPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{WAITING, connector, dev_pems, init, rt};

const ID: u16 = 258;
const ACK: u8 = 150;

/// One version-0 frame the big-endian way: VERSION, CODE, ID (BE), DATA_LENGTH (BE), DATA.
fn be(code: u8, id: u16, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8, code];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&(data.len() as u16).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Reads one big-endian frame: (version, code, id, data).
async fn read_be<S: AsyncReadExt + Unpin>(s: &mut S) -> (u8, u8, u16, Vec<u8>) {
    let mut h = [0u8; 6];
    tokio::time::timeout(WAITING, s.read_exact(&mut h))
        .await
        .expect("a frame in time")
        .expect("a frame header");
    let mut data = vec![0u8; u16::from_be_bytes([h[4], h[5]]) as usize];
    tokio::time::timeout(WAITING, s.read_exact(&mut data))
        .await
        .expect("the data in time")
        .expect("the frame's data");
    (h[0], h[1], u16::from_be_bytes([h[2], h[3]]), data)
}

fn configure(dev: &std::path::Path, config_addr: SocketAddr) {
    let p = dev.join("scm.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let from = format!("id = {ID}\nname = \"machine-{ID}\"\nprotocol_version = 1\n");
    let to = format!(
        "id = {ID}\nname = \"legacy-be\"\nprotocol_version = 0\nbyte_order = \"big\"\nconfig_addr = \"{config_addr}\"\n"
    );
    assert!(text.contains(&from), "{text}");
    std::fs::write(&p, text.replace(&from, &to)).unwrap();
}

#[test]
fn a_big_endian_v0_machine_says_hello_sends_msg_and_acks_a_config() {
    init();
    let (dir, _pw) = Fleet::init(&[ID]);
    let dev = dir.path().join("dev");
    let pems = dev_pems(&dev, &format!("machine-{ID}"));
    let runtime = rt();
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    configure(&dev, listener.local_addr().unwrap());
    let scm = Fleet::start_scm(dir.path(), &[]);
    let agents = scm.listening("agents");
    let telnet = scm.listening("telnet");
    let acceptor = tokio_rustls::TlsAcceptor::from(
        sctls::server_config_from_pem(
            &pems.ca,
            &pems.cert,
            &pems.key,
            &[],
            TlsPolicy::default(),
            &[],
        )
        .unwrap(),
    );
    let file = dir.path().join("legacy.cfg");
    std::fs::write(&file, "speed=fast\n").unwrap();
    let bo = dev.join("backoffice.toml");
    runtime.block_on(async {
        let tcp = TcpStream::connect(agents).await.unwrap();
        let mut link = sctls::connect(
            &connector(&pems, TlsPolicy::default()),
            tcp,
            &Identity::Scm,
            WAITING,
        )
        .await
        .expect("TLS to the SCM");
        link.write_all(&be(0, ID, b"hello")).await.unwrap();
        let mut raw = [0u8; 8];
        link.read_exact(&mut raw).await.unwrap();
        assert_eq!(
            raw,
            [0x00, 0x96, 0x01, 0x02, 0x00, 0x02, b'O', b'K'],
            "the ACK of HELLO in the machine's order, to the byte"
        );
        let long = vec![b'm'; 300];
        link.write_all(&be(1, ID, &long)).await.unwrap();
        assert_eq!(read_be(&mut link).await, (0, ACK, ID, b"OK".to_vec()));

        let push = {
            let (bo, file) = (bo.clone(), file.clone());
            tokio::task::spawn_blocking(move || {
                backoffice_with(
                    &bo,
                    telnet,
                    &["push", "--machine", "258", "--file", file.to_str().unwrap()],
                )
            })
        };
        let (tcp, _) = tokio::time::timeout(WAITING, listener.accept())
            .await
            .expect("the SCM connects to the config port")
            .unwrap();
        let mut port = acceptor.accept(tcp).await.expect("TLS from the SCM");
        assert_eq!(
            read_be(&mut port).await,
            (0, 2, ID, b"speed=fast\n".to_vec()),
            "a raw CONFIG, big-endian"
        );
        port.write_all(&be(ACK, ID, b"OK")).await.unwrap();
        port.flush().await.unwrap();
        let (code, out, err) = push.await.unwrap();
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.trim(), "250 ACK machine 258 generation 1: OK");
    });
}
