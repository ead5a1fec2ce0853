//! The operator command parser and push-target parser: never panic, and every refusal is
//! one reply line with a 5xx code that echoes at most a bounded part of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scm::fuzzing::ReplyCode;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match scm::fuzzing::parse_command(line) {
        Ok(_) => {}
        Err(e) => {
            let reply = e.reply();
            assert!(
                matches!(reply.code, ReplyCode::Unknown | ReplyCode::Syntax),
                "{reply}"
            );
            let reply = reply.to_string();
            assert!(reply.starts_with("500 ") || reply.starts_with("501 "), "{reply}");
            assert!(!reply.contains('\n') && !reply.contains('\r'));
            assert!(reply.len() <= 400, "{} bytes", reply.len());
        }
    }
    let _ = line.parse::<scm::fuzzing::Target>();
});
