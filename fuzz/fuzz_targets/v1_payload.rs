//! Version-1 payload decoding (protobuf in a frame) for every code: never panics, and a
//! message that decodes re-encodes into a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scm_proto::Frame;
use scm_proto::v1::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&code, payload)) = data.split_first() else {
        return;
    };
    let Ok(frame) = Frame::new(1, code, 7, payload.to_vec()) else {
        return;
    };
    let _ = frame.nack_if_unknown();
    if let Ok(m) = Message::decode(&frame) {
        let _ = m.code();
        let _ = m.request_id();
        if let Ok(again) = m.to_frame(7) {
            assert_eq!(Message::decode(&again).ok(), Some(m));
        }
    }
});
