//! Echoing untrusted text back to a user: quoted, with control characters escaped, and
//! bounded in bytes *after* escaping (a control character escapes to up to 10 bytes, so
//! bounding the characters alone does not bound the reply).

/// `s` in double quotes with Rust-style escapes, at most `max` bytes between the quotes;
/// a cut is marked with `...` after the closing quote.
pub fn quoted(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(max.min(s.len() * 2) + 5);
    out.push('"');
    let mut cut = false;
    for c in s.chars() {
        let e: String = c.escape_debug().collect();
        if out.len() - 1 + e.len() > max {
            cut = true;
            break;
        }
        out.push_str(&e);
    }
    out.push('"');
    if cut {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_and_escaped() {
        assert_eq!(quoted("abc", 40), "\"abc\"");
        assert_eq!(quoted("a\"b\n", 40), "\"a\\\"b\\n\"");
    }

    #[test]
    fn bound_holds_after_escaping() {
        let nasty = "\u{1d}".repeat(1000);
        let q = quoted(&nasty, 40);
        assert!(q.len() <= 40 + 5, "{} bytes", q.len());
        assert!(q.ends_with("\"..."));
        let wide = "\u{10ffff}".repeat(100);
        assert!(quoted(&wide, 40).len() <= 45);
    }
}
