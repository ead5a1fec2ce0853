//! The 241 bridge's HTTP/1.1 request-head parser, query parsing and percent-decoding, and
//! the response parser its HTTPS client uses: never panic; "partial" is never reported
//! for input that already exceeds the limit; a complete head never claims more bytes
//! than it was given; percent-encoding round-trips (control characters are refused).
#![no_main]

use libfuzzer_sys::fuzz_target;
use scm::fuzzing::http::{self, Parse};

const MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    match http::parse_request(data, MAX) {
        Ok(Parse::Complete { head, len }) => {
            assert!(len <= data.len() && len <= MAX);
            let _ = http::header(&head.headers, "host");
            let (_path, query) = http::split_target(&head.target);
            if let Some(q) = query {
                let _ = http::parse_query(q);
            }
        }
        Ok(Parse::Partial) => assert!(data.len() <= MAX, "partial beyond the limit"),
        Err(_) => {}
    }
    if let Ok(Parse::Complete { len, .. }) = http::parse_response(data, MAX) {
        assert!(len <= data.len());
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(decoded) = http::percent_decode(s, true) {
            let _ = http::percent_encode(&decoded);
        }
        // Control characters are refused on purpose; everything else round-trips.
        if !s.chars().any(char::is_control) {
            let enc = http::percent_encode(s);
            assert_eq!(http::percent_decode(&enc, false).as_deref(), Ok(s));
        }
    }
});
