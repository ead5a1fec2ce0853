//! The back office's reply-line parser (`NNN text`, `NNN-text`): never panics, and the
//! text it returns is a suffix of the line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((code, _last, text)) = backoffice::client::parse_reply_line(line) {
        assert!(code <= 999);
        assert!(line.ends_with(text));
    }
});
