//! Certificate identity extraction from arbitrary DER, and identity URI parsing: errors,
//! never panics; a parsed URI round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scm_certs::identity::{Identity, identity_from_der};

fuzz_target!(|data: &[u8]| {
    let _ = identity_from_der(data);
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(id) = Identity::parse_uri(s)
    {
        assert_eq!(Identity::parse_uri(&id.uri()).ok(), Some(id));
    }
});
