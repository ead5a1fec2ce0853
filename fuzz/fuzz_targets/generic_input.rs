//! What the Generic bridge does with a print server's input and with a card number: the
//! command picked from a chunk of server input, card validation under several rule sets,
//! and masking (never panics; a masked card never shows more than its last four
//! characters).
#![no_main]

use libfuzzer_sys::fuzz_target;
use scm_common::card::{CardRules, mask};

fuzz_target!(|data: &[u8]| {
    let _ = scm::fuzzing::last_command(data);
    if let Ok(card) = std::str::from_utf8(data) {
        let _ = CardRules::default().validate(card);
        let m = mask(card);
        let n = card.chars().count();
        if n > 4 {
            let hidden = m.chars().filter(|c| *c == '*').count();
            assert!(hidden >= n - 4, "{m:?}");
        }
    }
});
