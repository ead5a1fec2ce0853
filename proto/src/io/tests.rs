//! Unit tests of [`FrameReader`] and [`write_frame`], on `tokio::io::duplex`
//! pipes under a paused clock.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, DuplexStream, duplex};
use tokio::time::{Instant, sleep};

use super::*;
use crate::frame::{Code, Frame, FrameCodec, FrameError};

const SEC: Duration = Duration::from_secs(1);

fn reader(codec: FrameCodec) -> (DuplexStream, FrameReader<DuplexStream>) {
    let (peer, ours) = duplex(1 << 16);
    (peer, FrameReader::new(ours, codec))
}

fn hello() -> Frame {
    Frame::v0(Code::Hello, 42, "hello").expect("short")
}

/// Asserts `elapsed` is `expected`, give or take the timer's 1 ms grain.
fn assert_about(elapsed: Duration, expected: Duration) {
    assert!(
        elapsed >= expected && elapsed <= expected + Duration::from_millis(2),
        "elapsed {elapsed:?}, expected {expected:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_when_no_byte_arrives() {
    let (_peer, mut r) = reader(FrameCodec::default());
    let start = Instant::now();
    let err = r
        .read_frame(Some(5 * SEC), 30 * SEC)
        .await
        .expect_err("idle");
    assert!(matches!(err, ReadError::Idle(d) if d == 5 * SEC), "{err:?}");
    assert!(err.is_timeout());
    assert_about(start.elapsed(), 5 * SEC);
    assert_eq!(
        err.to_string(),
        "no frame started within the idle timeout of 5s"
    );
}

#[tokio::test(start_paused = true)]
async fn no_idle_timeout_waits_for_the_frame() {
    let (mut peer, mut r) = reader(FrameCodec::default());
    tokio::spawn(async move {
        sleep(3600 * SEC).await;
        write_frame(&mut peer, &hello()).await.expect("write");
        peer
    });
    let start = Instant::now();
    let got = r.read_frame(None, SEC).await.expect("frame");
    assert_eq!(got, Some(hello()));
    assert_about(start.elapsed(), 3600 * SEC);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_only_guards_the_first_byte() {
    // Idle 1 s, stall 10 s: a frame whose header arrives at 0.5 s and whose
    // data arrives at 3 s is fine.
    let (mut peer, mut r) = reader(FrameCodec::default());
    let bytes = hello().to_bytes().expect("encodable");
    tokio::spawn(async move {
        sleep(SEC / 2).await;
        peer.write_all(&bytes[..6]).await.expect("write");
        sleep(5 * SEC / 2).await;
        peer.write_all(&bytes[6..]).await.expect("write");
        peer
    });
    let got = r.read_frame(Some(SEC), 10 * SEC).await.expect("frame");
    assert_eq!(got, Some(hello()));
}

#[tokio::test(start_paused = true)]
async fn stall_counts_from_the_first_byte_even_if_the_peer_trickles() {
    let (mut peer, mut r) = reader(FrameCodec::default());
    let start = Instant::now();
    tokio::spawn(async move {
        // Header declaring 1000 data bytes, then 10 of them at once...
        let mut head = vec![0u8, 1, 42, 0, 0xe8, 0x03];
        head.extend_from_slice(&[b'x'; 10]);
        peer.write_all(&head).await.expect("write");
        // ...then one byte every 700 ms, for ever.
        loop {
            sleep(Duration::from_millis(700)).await;
            if peer.write_all(b"x").await.is_err() {
                return;
            }
        }
    });
    let err = r.read_frame(Some(SEC), 5 * SEC).await.expect_err("stalled");
    assert_about(start.elapsed(), 5 * SEC);
    // 16 bytes at 0 s plus one at 0.7, 1.4, 2.1, 2.8, 3.5, 4.2 and 4.9 s.
    match err {
        ReadError::Stalled { have, need, after } => {
            assert_eq!((have, need, after), (23, 1006, 5 * SEC));
        }
        other => panic!("expected Stalled, got {other:?}"),
    }
    assert!(r.buffered() <= 1006);
}

#[tokio::test(start_paused = true)]
async fn stall_with_incomplete_header() {
    let (mut peer, mut r) = reader(FrameCodec::default());
    peer.write_all(&[0, 0, 42]).await.expect("write");
    let err = r.read_frame(None, 2 * SEC).await.expect_err("stalled");
    assert!(err.is_timeout());
    assert!(
        matches!(
            err,
            ReadError::Stalled {
                have: 3,
                need: 6,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "peer stalled mid-frame: 3 of the frame's 6 bytes arrived within 2s of its first byte"
    );
}

#[tokio::test(start_paused = true)]
async fn stall_of_a_frame_that_started_in_an_earlier_read() {
    // Frame A plus the first 3 bytes of frame B arrive together at 0 s. The
    // caller only asks for B at 3 s; the rest of B comes at 6 s. With a 5 s
    // stall timeout B must be cut off at 5 s: counted from B's first byte,
    // not from the call.
    let (mut peer, mut r) = reader(FrameCodec::default());
    let start = Instant::now();
    let mut bytes = hello().to_bytes().expect("encodable").to_vec();
    let b = Frame::v0(Code::Msg, 42, "later")
        .expect("short")
        .to_bytes()
        .expect("encodable");
    bytes.extend_from_slice(&b[..3]);
    peer.write_all(&bytes).await.expect("write");
    let rest = b.slice(3..);
    tokio::spawn(async move {
        sleep(6 * SEC).await;
        let _ = peer.write_all(&rest).await;
        peer
    });
    assert_eq!(r.read_frame(None, 5 * SEC).await.expect("A"), Some(hello()));
    assert_eq!(r.buffered(), 3);
    sleep(3 * SEC).await;
    let err = r.read_frame(None, 5 * SEC).await.expect_err("B stalls");
    assert!(
        matches!(
            err,
            ReadError::Stalled {
                have: 3,
                need: 6,
                ..
            }
        ),
        "{err:?}"
    );
    assert_about(start.elapsed(), 5 * SEC);
}

#[tokio::test(start_paused = true)]
async fn clean_eof_between_frames() {
    let (mut peer, mut r) = reader(FrameCodec::default());
    let ack = Frame::v0(Code::Ack, 42, "OK").expect("short");
    write_frame(&mut peer, &hello()).await.expect("write");
    write_frame(&mut peer, &ack).await.expect("write");
    drop(peer);
    assert_eq!(
        r.read_frame(Some(SEC), SEC).await.expect("1"),
        Some(hello())
    );
    assert_eq!(r.read_frame(Some(SEC), SEC).await.expect("2"), Some(ack));
    assert_eq!(r.read_frame(Some(SEC), SEC).await.expect("eof"), None);
    assert_eq!(r.buffered(), 0);
}

#[tokio::test(start_paused = true)]
async fn eof_mid_frame_is_truncated() {
    let (mut peer, mut r) = reader(FrameCodec::default());
    // Declares 10 data bytes, sends 2, closes.
    peer.write_all(&[0, 1, 42, 0, 10, 0, b'h', b'i'])
        .await
        .expect("write");
    drop(peer);
    let err = r.read_frame(Some(SEC), SEC).await.expect_err("truncated");
    assert!(!err.is_timeout());
    assert!(
        matches!(
            err,
            ReadError::Frame(FrameError::Truncated { have: 8, need: 16 })
        ),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn eof_mid_header_is_truncated() {
    let (mut peer, mut r) = reader(FrameCodec::default());
    peer.write_all(&[0, 1]).await.expect("write");
    drop(peer);
    let err = r.read_frame(None, SEC).await.expect_err("truncated");
    assert!(
        matches!(
            err,
            ReadError::Frame(FrameError::Truncated { have: 2, need: 6 })
        ),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn declared_length_over_link_limit_is_refused_from_the_header() {
    let (mut peer, mut r) = reader(FrameCodec::new(100));
    // Declares 1000 bytes; sends 1000 of them, which must not be buffered.
    let mut bytes = vec![0u8, 2, 42, 0, 0xe8, 0x03];
    bytes.extend_from_slice(&[0u8; 1000]);
    peer.write_all(&bytes).await.expect("write");
    let err = r.read_frame(None, SEC).await.expect_err("too long");
    assert!(
        matches!(
            err,
            ReadError::Frame(FrameError::DataTooLong {
                declared: 1000,
                max: 100
            })
        ),
        "{err:?}"
    );
    assert!(r.buffered() <= 106, "buffered {}", r.buffered());
    assert_eq!(
        err.to_string(),
        "frame declares 1000 data bytes but this link accepts at most 100"
    );
}

#[tokio::test(start_paused = true)]
async fn buffer_never_exceeds_one_maximum_frame() {
    let codec = FrameCodec::new(60);
    let (mut peer, mut r) = reader(codec);
    let frames: Vec<Frame> = (0..50u16)
        .map(|i| Frame::v0(Code::Msg, i, vec![b'm'; usize::from(i) % 61]).expect("short"))
        .collect();
    let mut all = bytes::BytesMut::new();
    for f in &frames {
        f.encode(&mut all).expect("encodable");
    }
    peer.write_all(&all).await.expect("write");
    drop(peer);
    for f in &frames {
        assert_eq!(
            r.read_frame(None, SEC).await.expect("frame").as_ref(),
            Some(f)
        );
        assert!(
            r.buffered() <= codec.max_frame_len(),
            "buffered {}",
            r.buffered()
        );
    }
    assert_eq!(r.read_frame(None, SEC).await.expect("eof"), None);
}

#[tokio::test(start_paused = true)]
async fn unknown_version_and_code_are_returned_as_frames() {
    let (mut peer, mut r) = reader(FrameCodec::default());
    peer.write_all(&[9, 200, 1, 0, 0, 0]).await.expect("write");
    let f = r.read_frame(None, SEC).await.expect("frame").expect("some");
    assert_eq!((f.version, f.code, f.id), (9, 200, 1));
    assert!(f.nack_if_unknown().is_some());
}

#[tokio::test(start_paused = true)]
async fn write_frame_writes_exact_bytes_and_refuses_oversized() {
    let (mut a, mut b) = duplex(1 << 17);
    write_frame(&mut a, &hello()).await.expect("write");
    let big = Frame {
        version: 0,
        code: Code::Config.byte(),
        id: 1,
        data: vec![0u8; 70_000].into(),
    };
    let err = write_frame(&mut a, &big).await.expect_err("too long");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.get_ref().is_some_and(|e| e.is::<FrameError>()));
    drop(a);
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
        .await
        .expect("read");
    assert_eq!(got, hello().to_bytes().expect("encodable").to_vec());
}

#[tokio::test(start_paused = true)]
async fn reader_accessors() {
    let (_peer, mut r) = reader(FrameCodec::default());
    assert_eq!(r.buffered(), 0);
    let _: &DuplexStream = r.get_ref();
    let _: &mut DuplexStream = r.get_mut();
    let _inner: DuplexStream = r.into_inner();
}

#[tokio::test(start_paused = true)]
async fn codec_works_with_framed_read_and_sink() {
    use futures_util::SinkExt;
    use tokio_stream_shim::next;
    let (a, b) = duplex(1024);
    let mut sink = tokio_util::codec::FramedWrite::new(a, FrameCodec::default());
    sink.send(hello()).await.expect("send");
    sink.send(&hello()).await.expect("send by ref");
    drop(sink);
    let mut stream = tokio_util::codec::FramedRead::new(b, FrameCodec::default());
    assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(hello())));
    assert_eq!(next(&mut stream).await.map(Result::ok), Some(Some(hello())));
    assert!(next(&mut stream).await.is_none());
}

/// `StreamExt::next` without the `futures-util` `async-await` feature.
mod tokio_stream_shim {
    use std::future::poll_fn;
    use std::pin::Pin;

    use futures_util::Stream;

    pub async fn next<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
        poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
    }
}

#[tokio::test(start_paused = true)]
async fn pending_header_after_refusal_gives_version_and_id() {
    let (mut peer, mut r) = reader(FrameCodec::new(10));
    assert_eq!(r.pending_header(), None);
    peer.write_all(&[1, 1, 0x02, 0x01, 0x00, 0x01])
        .await
        .expect("write");
    let err = r.read_frame(None, SEC).await.expect_err("too long");
    assert!(matches!(
        err,
        ReadError::Frame(FrameError::DataTooLong {
            declared: 256,
            max: 10
        })
    ));
    let h = r.pending_header().expect("header arrived");
    assert_eq!((h.version, h.code, h.id, h.data_len), (1, 1, 0x0102, 256));
}

fn msg(n: u16) -> Frame {
    Frame::v0(Code::Msg, n, "m").expect("short")
}

#[tokio::test(start_paused = true)]
async fn read_ready_returns_what_is_here_and_none_when_it_would_wait() {
    let (mut peer, mut r) = reader(FrameCodec::new(1024));
    assert!(r.read_ready(SEC).is_none(), "nothing sent yet");
    let mut burst = Vec::new();
    for n in 1..=3 {
        burst.extend_from_slice(&msg(n).to_bytes().expect("encodable"));
    }
    peer.write_all(&burst).await.expect("write");
    for n in 1..=3 {
        let f = r.read_ready(SEC).expect("already here").expect("ok");
        assert_eq!(f.map(|f| f.id), Some(n));
    }
    assert!(r.read_ready(SEC).is_none(), "the burst is used up");
    // Half a frame: not ready, and the half stays buffered for the next read.
    let bytes = msg(4).to_bytes().expect("encodable");
    peer.write_all(&bytes[..3]).await.expect("write");
    assert!(r.read_ready(SEC).is_none());
    assert_eq!(r.buffered(), 3);
    peer.write_all(&bytes[3..]).await.expect("write");
    let f = r.read_frame(None, SEC).await.expect("ok").expect("frame");
    assert_eq!(f.id, 4);
    drop(peer);
    assert!(matches!(r.read_ready(SEC), Some(Ok(None))), "clean end");
}

/// The frames with these ids are readable now, in this order.
fn expect_ready(r: &mut FrameReader<DuplexStream>, ids: &[u16]) {
    for n in ids {
        let f = r
            .read_ready(SEC)
            .expect("sent")
            .expect("ok")
            .expect("frame");
        assert_eq!(f.id, *n);
    }
}

#[tokio::test(start_paused = true)]
async fn frame_writer_holds_queued_frames_until_send_and_keeps_order() {
    let (ours, theirs) = duplex(1 << 16);
    let mut w = FrameWriter::new(ours);
    let mut r = FrameReader::new(theirs, FrameCodec::new(1024));
    assert!(!w.queue(&msg(1)).expect("short"));
    assert!(!w.queue(&msg(2)).expect("short"));
    assert_eq!(w.queued(), 2 * msg(1).encoded_len());
    assert!(r.read_ready(SEC).is_none(), "queued frames are not written");
    w.send().await.expect("send");
    assert_eq!(w.queued(), 0);
    expect_ready(&mut r, &[1, 2]);
    // A direct write sends the queue first.
    w.queue(&msg(3)).expect("short");
    write_frame(&mut w, &msg(4)).await.expect("write");
    expect_ready(&mut r, &[3, 4]);
    // The queue says when it is full; an oversized frame queues nothing.
    let big = Frame::v0(Code::Msg, 9, "x".repeat(1000)).expect("short");
    let mut full = false;
    for _ in 0..(QUEUE_MAX / big.encoded_len() + 1) {
        full = w.queue(&big).expect("short");
    }
    assert!(full && w.queued() >= QUEUE_MAX);
    let before = w.queued();
    let huge = Frame {
        version: 0,
        code: Code::Config.byte(),
        id: 1,
        data: vec![0u8; 70_000].into(),
    };
    assert!(w.queue(&huge).is_err());
    assert_eq!(w.queued(), before);
}
