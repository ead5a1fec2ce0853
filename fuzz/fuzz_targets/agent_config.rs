//! Agent and back-office configuration parsing and validation: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scm_common::config::Env;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = machine_agent::config::AgentConfig::parse(text, "fuzz", &Env::new()) {
        let _ = c.validate();
    }
    let _ = backoffice::config::BackofficeConfig::parse(text, "fuzz", &Env::new());
});
