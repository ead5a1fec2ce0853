//! The admin API's malformed-input table (`integration-tests/tables/admin.toml`) against
//! the real SCM: raw HTTP/2 bytes after the mutual-TLS handshake (broken framing, protocol
//! violations, floods), and gRPC requests that are wrong at the HTTP or gRPC level (unknown
//! methods, content types, broken or oversized message framing), sent with the `h2` crate.
//! Ends with a normal admin client that must still be served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::tables::{self, Case};
use integration_tests::{Fleet, WAIT};
use scm_certs::identity::Identity;
use scm_certs::tls::{self as sctls, TlsPolicy};
use scm_proto::admin as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Pems, dev_pems, init, rt};

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls(addr: SocketAddr, p: &Pems) -> Tls {
    let cfg = sctls::client_config_from_pem(&p.ca, &p.cert, &p.key, TlsPolicy::default())
        .expect("client config");
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    sctls::connect(&connector, tcp, &Identity::Scm, WAIT)
        .await
        .expect("TLS handshake")
}

/// HTTP/2 error codes by name (RFC 9113 section 7).
fn error_code(name: &str) -> u32 {
    match name {
        "NO_ERROR" => 0,
        "PROTOCOL_ERROR" => 1,
        "INTERNAL_ERROR" => 2,
        "FLOW_CONTROL_ERROR" => 3,
        "SETTINGS_TIMEOUT" => 4,
        "STREAM_CLOSED" => 5,
        "FRAME_SIZE_ERROR" => 6,
        "REFUSED_STREAM" => 7,
        "CANCEL" => 8,
        "COMPRESSION_ERROR" => 9,
        "CONNECT_ERROR" => 10,
        "ENHANCE_YOUR_CALM" => 11,
        other => panic!("unknown HTTP/2 error code {other}"),
    }
}

/// The frames (type, stream, payload) in `bytes`, as far as they are complete.
fn frames(bytes: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 9 <= bytes.len() {
        let len = usize::from(bytes[i]) << 16
            | usize::from(bytes[i + 1]) << 8
            | usize::from(bytes[i + 2]);
        let ty = bytes[i + 3];
        let stream = u32::from_be_bytes([bytes[i + 5], bytes[i + 6], bytes[i + 7], bytes[i + 8]])
            & 0x7fff_ffff;
        if i + 9 + len > bytes.len() {
            break;
        }
        out.push((ty, stream, bytes[i + 9..i + 9 + len].to_vec()));
        i += 9 + len;
    }
    out
}

/// A raw case: TLS, the bytes, close our side, read everything until the SCM closes.
async fn raw_case(addr: SocketAddr, p: &Pems, c: &Case) -> Result<(), String> {
    let mut s = tls(addr, p).await;
    let _ = s.write_all(&c.bytes()).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
    if read.is_err() {
        return Err(format!("not closed within {WAIT:?}"));
    }
    let fs = frames(&got);
    let goaway = fs
        .iter()
        .find(|f| f.0 == 7 && f.2.len() >= 8)
        .map(|f| u32::from_be_bytes([f.2[4], f.2[5], f.2[6], f.2[7]]));
    let resets: Vec<u32> = fs
        .iter()
        .filter(|f| f.0 == 3 && f.2.len() == 4)
        .map(|f| u32::from_be_bytes([f.2[0], f.2[1], f.2[2], f.2[3]]))
        .collect();
    let summary = || {
        format!(
            "GOAWAY {goaway:?}, RST_STREAM codes {resets:?}, {} frames, {} bytes",
            fs.len(),
            got.len()
        )
    };
    match c.expect.split_once(':') {
        None if c.expect == "closed" => Ok(()),
        None if c.expect == "clean" => match goaway {
            None | Some(0) => Ok(()),
            Some(_) => Err(format!("expected no error, got {}", summary())),
        },
        Some(("goaway", name)) if goaway == Some(error_code(name)) => Ok(()),
        Some(("rst", name)) if resets.contains(&error_code(name)) => Ok(()),
        _ => Err(format!("expected {}, got {}", c.expect, summary())),
    }
}

/// A gRPC-level case with the `h2` client.
async fn grpc_case(addr: SocketAddr, p: &Pems, c: &Case) -> Result<(), String> {
    let s = tls(addr, p).await;
    let (client, conn) = h2::client::handshake(s)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let mut client = client
        .ready()
        .await
        .map_err(|e| format!("not ready: {e}"))?;
    let path = c
        .path
        .as_deref()
        .unwrap_or("/scm.admin.v1.Admin/ListMachines");
    let mut req = http::Request::builder()
        .method(c.method.as_deref().unwrap_or("POST"))
        .uri(format!("https://scm.hub.internal{path}"));
    let mut has_ct = false;
    for h in &c.headers {
        let (k, v) = h.split_once(':').expect("header as `name: value`");
        has_ct |= k.eq_ignore_ascii_case("content-type");
        req = req.header(k.trim(), v.trim());
    }
    if !has_ct {
        req = req.header("content-type", "application/grpc");
    }
    let req = req.header("te", "trailers").body(()).expect("request");
    let body = c.body_bytes();
    let (resp, mut send) = client
        .send_request(req, body.is_empty())
        .map_err(|e| format!("send request: {e}"))?;
    if !body.is_empty() {
        send.reserve_capacity(body.len());
        // The data is queued and sent as flow control allows; the SCM may refuse early.
        let _ = send.send_data(bytes::Bytes::from(body), true);
    }
    let outcome = tokio::time::timeout(WAIT, async {
        let resp = resp.await.map_err(|e| format!("reset: {e}"))?;
        let status = resp.status().as_u16();
        let mut grpc = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut message = resp
            .headers()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut recv = resp.into_body();
        while let Some(d) = recv.data().await {
            let d = d.map_err(|e| format!("body: {e}"))?;
            let _ = recv.flow_control().release_capacity(d.len());
        }
        if grpc.is_none()
            && let Ok(Some(t)) = recv.trailers().await
        {
            grpc = t
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            message = t
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        Ok::<_, String>((status, grpc, message))
    })
    .await
    .map_err(|_| format!("no answer within {WAIT:?}"))?;
    let got = match &outcome {
        Ok((status, grpc, _)) => format!(
            "http:{status}{}",
            grpc.as_ref()
                .map(|g| format!(" grpc:{g}"))
                .unwrap_or_default()
        ),
        Err(_) => "reset".into(),
    };
    if got != c.expect {
        return Err(format!("expected {}, got {got} ({outcome:?})", c.expect));
    }
    if let (Some(t), Ok((_, _, m))) = (&c.text, &outcome)
        && !m.as_deref().unwrap_or("").contains(t.as_str())
    {
        return Err(format!("grpc-message {m:?} does not contain {t:?}"));
    }
    Ok(())
}

/// `admin.toml`: raw HTTP/2 and gRPC-level cases against the admin API as operator
/// `admin` (a valid client certificate: these are attacks by or through an authenticated
/// peer; unauthenticated ones never get past the handshake, see mtls.rs). `port = "raw"`:
/// `expect` is `goaway:CODE` (a GOAWAY with that error code), `rst:CODE` (a RST_STREAM
/// with that code), `clean` (closed without an error GOAWAY) or `closed`. `port = "grpc"`:
/// `expect` is `http:STATUS grpc:CODE` (the grpc-status from the headers or trailers),
/// `http:STATUS` alone, or `reset`; `text` must occur in grpc-message.
#[test]
fn admin_api_table() {
    init();
    let table = tables::load("admin");
    let fleet = Fleet::start(&[1]);
    let admin = fleet.admin();
    let pems = dev_pems(&fleet.dev(), "operator-admin");
    rt().block_on(async {
        let mut failures = Vec::new();
        for c in &table.cases {
            let r = match c.port.as_deref() {
                Some("raw") => raw_case(admin, &pems, c).await,
                Some("grpc") => grpc_case(admin, &pems, c).await,
                other => panic!("case {:?}: port {other:?} is not raw or grpc", c.name),
            };
            if let Err(e) = r {
                failures.push(format!("{}: {e}", c.name));
            }
        }
        // A normal admin client is still served.
        let cfg =
            sctls::client_config_from_pem(&pems.ca, &pems.cert, &pems.key, TlsPolicy::default())
                .expect("client config");
        let mut client = backoffice::admin::connect_with(&admin.to_string(), &cfg, WAIT)
            .await
            .expect("connect");
        let list = tokio::time::timeout(
            Duration::from_secs(30),
            client.list_machines(pb::ListMachinesRequest {}),
        )
        .await
        .expect("in time")
        .expect("ListMachines")
        .into_inner();
        assert_eq!(list.machines.len(), 1);
        crate::tables::report("admin", table.cases.len(), failures);
    });
}
