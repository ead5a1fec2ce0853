//! A minimal MQTT 3.1.1 client, just what the benchmark needs: CONNECT/CONNACK,
//! SUBSCRIBE/SUBACK, PUBLISH at QoS 1 and PUBACK, over any byte stream (here tokio-rustls
//! with the same ring-based TLS client configuration as the SCM's agents).
//!
//! Written here instead of using rumqttc so that both systems are driven by the same TLS
//! stack (rustls with ring, the project's provider) and the same tokio runtime, with no
//! client-side queueing or batching that one system would get and the other not.

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest packet the benchmark accepts (its payloads are at most a few KiB).
const MAX_PACKET: usize = 64 * 1024;

/// One received packet.
#[derive(Debug)]
pub enum Packet {
    /// CONNACK with its return code.
    ConnAck(u8),
    /// SUBACK.
    SubAck,
    /// PUBLISH: topic, packet id (QoS 1) and payload.
    Publish {
        /// Topic.
        topic: String,
        /// Packet id (0 at QoS 0).
        pid: u16,
        /// Payload.
        payload: Vec<u8>,
    },
    /// PUBACK.
    PubAck,
    /// Anything else (ignored).
    Other,
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT with a clean session and the given keep-alive; no user name (the broker takes
/// the certificate's CN, `use_identity_as_username`).
pub fn connect(client_id: &str, keepalive_s: u16) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, "MQTT");
    b.push(4); // protocol level 3.1.1
    b.push(0x02); // clean session
    b.extend_from_slice(&keepalive_s.to_be_bytes());
    put_str(&mut b, client_id);
    packet(0x10, &b)
}

/// SUBSCRIBE to one filter at QoS 1.
pub fn subscribe(pid: u16, filter: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&pid.to_be_bytes());
    put_str(&mut b, filter);
    b.push(1);
    packet(0x82, &b)
}

/// PUBLISH at QoS 1.
pub fn publish(pid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(topic.len() + payload.len() + 4);
    put_str(&mut b, topic);
    b.extend_from_slice(&pid.to_be_bytes());
    b.extend_from_slice(payload);
    packet(0x32, &b)
}

/// PUBACK.
pub fn puback(pid: u16) -> Vec<u8> {
    let mut out = vec![0x40, 0x02];
    out.extend_from_slice(&pid.to_be_bytes());
    out
}

/// Reads one packet; `Ok(None)` on a clean end of stream before a packet started.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> anyhow::Result<Option<Packet>> {
    let mut first = [0u8; 1];
    if r.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = r.read_u8().await.context("truncated MQTT header")?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("MQTT remaining length longer than 4 bytes");
        }
    }
    if len > MAX_PACKET {
        bail!("MQTT packet of {len} bytes; the benchmark accepts at most {MAX_PACKET}");
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .context("truncated MQTT packet")?;
    let kind = first[0] >> 4;
    Ok(Some(match kind {
        2 if len >= 2 => Packet::ConnAck(body[1]),
        9 => Packet::SubAck,
        4 => Packet::PubAck,
        3 => {
            let qos = (first[0] >> 1) & 3;
            if len < 2 {
                bail!("PUBLISH too short");
            }
            let tl = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let mut at = 2 + tl;
            if at > len {
                bail!("PUBLISH topic longer than the packet");
            }
            let topic = String::from_utf8_lossy(&body[2..at]).into_owned();
            let mut pid = 0;
            if qos > 0 {
                if at + 2 > len {
                    bail!("PUBLISH without packet id");
                }
                pid = u16::from_be_bytes([body[at], body[at + 1]]);
                at += 2;
            }
            Packet::Publish {
                topic,
                pid,
                payload: body[at..].to_vec(),
            }
        }
        _ => Packet::Other,
    }))
}

/// Sends CONNECT and waits for an accepting CONNACK.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    client_id: &str,
) -> anyhow::Result<()> {
    s.write_all(&connect(client_id, 60)).await?;
    s.flush().await?;
    match read_packet(s).await? {
        Some(Packet::ConnAck(0)) => Ok(()),
        Some(Packet::ConnAck(rc)) => bail!("CONNACK refused with return code {rc}"),
        Some(p) => bail!("expected CONNACK, got {p:?}"),
        None => bail!("broker closed the connection before CONNACK"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_round_trips_through_the_reader() {
        let p = publish(7, "ev/3", b"hello");
        assert_eq!(p[0], 0x32);
        let mut r = &p[..];
        match read_packet(&mut r).await.unwrap().unwrap() {
            Packet::Publish {
                topic,
                pid,
                payload,
            } => {
                assert_eq!(
                    (topic.as_str(), pid, &payload[..]),
                    ("ev/3", 7, &b"hello"[..])
                );
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn remaining_length_is_varint() {
        let mut v = Vec::new();
        put_len(&mut v, 321);
        assert_eq!(v, [0xc1, 0x02]);
        let c = connect("a", 60);
        assert_eq!(&c[..2], &[0x10, 13]);
    }
}
