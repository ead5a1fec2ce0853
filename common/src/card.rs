//! Card numbers: the validation rules the agent and the SCM both apply, and masking.
//!
//! A card number is a bearer token: whoever has it can release someone's print jobs. It is
//! validated (charset and length, configurable) before it goes anywhere, and it is masked —
//! all but the last 4 characters replaced by `*` — wherever it is shown or logged.

use serde::Deserialize;

/// Which characters a card number may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Charset {
    /// ASCII letters and digits.
    #[default]
    Alphanumeric,
    /// ASCII digits.
    Digits,
    /// Hexadecimal digits (either case).
    Hex,
}

impl Charset {
    fn allows(self, b: u8) -> bool {
        match self {
            Self::Alphanumeric => b.is_ascii_alphanumeric(),
            Self::Digits => b.is_ascii_digit(),
            Self::Hex => b.is_ascii_hexdigit(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Alphanumeric => "ASCII letters and digits",
            Self::Digits => "digits",
            Self::Hex => "hexadecimal digits",
        }
    }
}

/// The rules (`[cards]` in the agent's and the SCM's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CardRules {
    /// Allowed characters.
    pub charset: Charset,
    /// Shortest card number.
    pub min_len: usize,
    /// Longest card number.
    pub max_len: usize,
}

impl Default for CardRules {
    fn default() -> Self {
        Self {
            charset: Charset::Alphanumeric,
            min_len: 1,
            max_len: 64,
        }
    }
}

/// Why a card number was refused. The text never contains the card number itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CardError {
    /// Empty.
    #[error("empty card number")]
    Empty,
    /// Too short.
    #[error("card number has {len} characters; at least {min} required")]
    TooShort {
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// Too long.
    #[error("card number has {len} characters; at most {max} allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A character outside the charset.
    #[error("card number has a {what} at position {pos}; only {allowed} are allowed")]
    BadChar {
        /// 1-based position.
        pos: usize,
        /// Description of the character (never the character if it is printable card data).
        what: &'static str,
        /// The allowed set.
        allowed: &'static str,
    },
}

impl CardRules {
    /// Checks a card number.
    pub fn validate(&self, card: &str) -> Result<(), CardError> {
        let b = card.as_bytes();
        if b.is_empty() {
            return Err(CardError::Empty);
        }
        if let Some((i, &c)) = b
            .iter()
            .enumerate()
            .find(|(_, c)| !self.charset.allows(**c))
        {
            let what = match c {
                b' ' | b'\t' => "space",
                0..=31 | 127 => "control character",
                128..=255 => "non-ASCII byte",
                _ => "character",
            };
            return Err(CardError::BadChar {
                pos: i + 1,
                what,
                allowed: self.charset.name(),
            });
        }
        if b.len() < self.min_len {
            return Err(CardError::TooShort {
                len: b.len(),
                min: self.min_len,
            });
        }
        if b.len() > self.max_len {
            return Err(CardError::TooLong {
                len: b.len(),
                max: self.max_len,
            });
        }
        Ok(())
    }

    /// Checks the rules themselves.
    pub fn check(&self) -> Result<(), String> {
        if self.min_len == 0 || self.min_len > self.max_len || self.max_len > 1024 {
            return Err("need 1 <= min_len <= max_len <= 1024".into());
        }
        Ok(())
    }
}

/// Masks all but the last 4 characters: `12345678` -> `****5678`. Cards of 4 characters
/// or fewer are masked entirely, so a short card is never shown whole.
pub fn mask(card: &str) -> String {
    let chars: Vec<char> = card.chars().collect();
    let n = chars.len();
    if n <= 4 {
        return "*".repeat(n.max(1));
    }
    let mut out = "*".repeat(n - 4);
    out.extend(&chars[n - 4..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules() {
        let r = CardRules::default();
        assert_eq!(r.validate("EMP123"), Ok(()));
        assert_eq!(r.validate("ed5d34c74e59d16bd"), Ok(()));
        assert_eq!(r.validate(""), Err(CardError::Empty));
        assert_eq!(r.validate(&"1".repeat(64)), Ok(()));
        assert_eq!(
            r.validate(&"1".repeat(65)),
            Err(CardError::TooLong { len: 65, max: 64 })
        );
        match r.validate("12 34") {
            Err(CardError::BadChar {
                pos: 3,
                what: "space",
                ..
            }) => {}
            e => panic!("{e:?}"),
        }
        match r.validate("12\x0734") {
            Err(CardError::BadChar {
                what: "control character",
                ..
            }) => {}
            e => panic!("{e:?}"),
        }
        match r.validate("12é") {
            Err(CardError::BadChar {
                what: "non-ASCII byte",
                ..
            }) => {}
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn configurable_charset_and_length() {
        let digits = CardRules {
            charset: Charset::Digits,
            min_len: 4,
            max_len: 8,
        };
        assert!(digits.validate("1234").is_ok());
        assert!(matches!(
            digits.validate("12a4"),
            Err(CardError::BadChar { pos: 3, .. })
        ));
        assert!(matches!(
            digits.validate("123"),
            Err(CardError::TooShort { len: 3, min: 4 })
        ));
        let hex = CardRules {
            charset: Charset::Hex,
            ..CardRules::default()
        };
        assert!(hex.validate("DEADbeef").is_ok());
        assert!(hex.validate("xyz").is_err());
        assert!(
            CardRules {
                min_len: 0,
                ..CardRules::default()
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn errors_never_contain_the_card() {
        let r = CardRules::default();
        for bad in ["SECRET 1", &"S".repeat(70)] {
            let e = r.validate(bad).unwrap_err().to_string();
            assert!(!e.contains("SECRET") && !e.contains("SSSS"), "{e}");
        }
    }

    #[test]
    fn masking() {
        assert_eq!(mask("12345678"), "****5678");
        assert_eq!(mask("12345"), "*2345");
        assert_eq!(mask("1234"), "****");
        assert_eq!(mask("1"), "*");
        assert_eq!(mask(""), "*");
    }
}
