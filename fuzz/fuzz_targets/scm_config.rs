//! SCM configuration parsing and validation over arbitrary text: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scm_common::config::Env;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = scm::app::config::ScmConfig::parse(text, "fuzz", &Env::new()) {
        let _ = c.validate();
    }
});
