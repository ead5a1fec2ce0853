//! Operator authentication: Argon2 password hashes. The per-source throttling of failed
//! logins is a coordinator (`crate::coord::throttle`).

use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};

use scm_common::Secret;
use serde::Deserialize;

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OperatorRole {
    /// Everything.
    Admin,
    /// Look, never change.
    ReadOnly,
}

impl OperatorRole {
    /// Lower-case name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::ReadOnly => "read_only",
        }
    }
}

/// `[[operator]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OperatorConfig {
    /// Login name; also the name in the operator's certificate (`urn:scm:operator:NAME`).
    pub(crate) name: String,
    /// Argon2 PHC hash (`scm hash-password`). Empty: certificate login only.
    #[serde(default)]
    pub(crate) password_hash: Secret,
    /// `admin` or `read_only`.
    pub(crate) role: OperatorRole,
}

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("cannot hash the password: {0}")]
pub struct HashError(argon2::password_hash::Error);

/// Hashes a password into an Argon2id PHC string for `[[operator]] password_hash`.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(HashError)?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(HashError)
}

/// Checks `password` against the operator's hash. Runs Argon2, so call it off the async
/// workers. An operator without a password hash can never log in with a password.
pub(crate) fn verify_password(op: &OperatorConfig, password: &str) -> bool {
    if op.password_hash.is_empty() {
        return false;
    }
    match argon2::PasswordHash::new(op.password_hash.expose()) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scm_common::Secret;

    #[test]
    fn hash_then_verify() {
        let h = hash_password("s3cret").unwrap();
        let op = OperatorConfig {
            name: "alice".into(),
            password_hash: Secret::new(h),
            role: OperatorRole::Admin,
        };
        assert!(verify_password(&op, "s3cret"));
        assert!(!verify_password(&op, "s3cret "));
        let no_pw = OperatorConfig {
            password_hash: Secret::default(),
            ..op
        };
        assert!(!verify_password(&no_pw, ""));
    }
}
