//! The frame decoder (versions 0 and 1) over arbitrary bytes, fed in two chunks: it must
//! never panic, never allocate past the declared-length check, and every frame it returns
//! must encode back to exactly the bytes it consumed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use scm_proto::FrameCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = (split as usize).min(rest.len());
    let mut codec = FrameCodec::new(4096);
    let mut buf = BytesMut::new();
    let mut consumed = 0usize;
    for chunk in [&rest[..cut], &rest[cut..]] {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before - buf.len();
                    let encoded = frame.to_bytes().expect("a decoded frame re-encodes");
                    assert_eq!(&encoded[..], &rest[consumed..consumed + used]);
                    assert!(encoded.len() <= codec.max_frame_len());
                    consumed += used;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
