//! The telnet codec in line and raw mode, with a mode switch at a fuzzer-chosen point:
//! never panics, never returns a line longer than its limit, and always makes progress.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use scm_telnet::{Event, Mode, TelnetCodec};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&switch, rest)) = data.split_first() else {
        return;
    };
    let switch_at = (switch as usize).min(rest.len());
    let mut codec = TelnetCodec::with_limits(Mode::Lines, 64, 32);
    let mut buf = BytesMut::new();
    for (i, chunk) in [&rest[..switch_at], &rest[switch_at..]].into_iter().enumerate() {
        if i == 1 && switch % 2 == 1 {
            codec.set_mode(Mode::Raw);
        }
        buf.extend_from_slice(chunk);
        let mut rounds = 0usize;
        while let Ok(Some(ev)) = codec.decode(&mut buf) {
            rounds += 1;
            assert!(rounds <= rest.len() + 2, "no progress");
            match ev {
                Event::Line(l) => assert!(l.len() <= 64),
                Event::Subnegotiation { data, .. } => assert!(data.len() <= 32),
                _ => {}
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
