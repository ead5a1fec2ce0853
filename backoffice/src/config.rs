//! The back office's configuration: where the SCM's telnet port is, how to log in, the
//! operator certificate for the TLS port and the admin API, and where the admin API is.
//! Environment: `BACKOFFICE__SECTION__KEY`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use scm_common::Secret;
use scm_common::config::{ConfigError, Env};

/// Environment prefix.
pub const ENV_PREFIX: &str = "BACKOFFICE";

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackofficeConfig {
    /// The SCM.
    pub scm: ScmSection,
    /// Password login (plain telnet port).
    #[serde(default)]
    pub login: LoginSection,
    /// Operator certificate (TLS port and admin API).
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// The SCM's gRPC admin API (`backoffice watch`).
    #[serde(default)]
    pub admin: Option<AdminSection>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// `[scm]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScmSection {
    /// The SCM's telnet port, `host:port`.
    pub address: String,
    /// Use the TLS telnet port with the operator certificate in `[tls]`.
    #[serde(default)]
    pub tls: bool,
}

/// `[login]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSection {
    /// Operator name.
    #[serde(default)]
    pub user: String,
    /// Password (masked in logs). Prefer `BACKOFFICE__LOGIN__PASSWORD`.
    #[serde(default)]
    pub password: Secret,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// The SCM's admin API (its `[listen] admin`), `host:port`.
    pub address: String,
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate that signed the SCM.
    pub ca: PathBuf,
    /// Operator certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// `[timeouts]`, milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect and TLS handshake.
    pub connect_ms: u64,
    /// Each reply (a push waits for the machine's answer).
    pub reply_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: 5_000,
            reply_ms: 60_000,
        }
    }
}

impl BackofficeConfig {
    /// Parses TOML plus environment overrides.
    pub fn parse(text: &str, origin: &str, env: &Env) -> Result<Self, ConfigError> {
        scm_common::config::parse(text, origin, ENV_PREFIX, env)
    }

    /// Reads a file; relative paths are resolved against its directory.
    pub fn load(path: &Path, env: &Env) -> Result<Self, ConfigError> {
        use scm_common::config::resolve;
        let mut c: Self = scm_common::config::load(path, ENV_PREFIX, env)?;
        if let Some(t) = &mut c.tls {
            t.ca = resolve(path, &t.ca);
            t.cert = resolve(path, &t.cert);
            t.key = resolve(path, &t.key);
        }
        Ok(c)
    }

    /// Checks the combination of settings; returns the offending key and what to do.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.scm.tls {
            if self.tls.is_none() {
                return Err((
                    "tls".into(),
                    "scm.tls = true needs a [tls] section with ca, cert and key".into(),
                ));
            }
        } else if self.login.user.is_empty() || self.login.password.is_empty() {
            return Err((
                "login".into(),
                "plain telnet needs login.user and login.password (or BACKOFFICE__LOGIN__PASSWORD)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_from_env_and_masked() {
        let env: Env = [("BACKOFFICE__LOGIN__PASSWORD".into(), "s3cret".into())].into();
        let c = BackofficeConfig::parse(
            "[scm]\naddress = \"127.0.0.1:2323\"\n[login]\nuser = \"admin\"\n",
            "t",
            &env,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.login.password.expose(), "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn admin_address_from_file_or_env_and_unknown_keys_refused() {
        let base = "[scm]\naddress = \"h:1\"\n[login]\nuser = \"a\"\npassword = \"p\"\n";
        let c = BackofficeConfig::parse(base, "t", &Env::new()).unwrap();
        assert!(c.admin.is_none());
        let c = BackofficeConfig::parse(
            &format!("{base}[admin]\naddress = \"127.0.0.1:9443\"\n"),
            "t",
            &Env::new(),
        )
        .unwrap();
        assert_eq!(c.admin.unwrap().address, "127.0.0.1:9443");
        let env: Env = [("BACKOFFICE__ADMIN__ADDRESS".into(), "127.0.0.1:1".into())].into();
        let c = BackofficeConfig::parse(base, "t", &env).unwrap();
        assert_eq!(c.admin.unwrap().address, "127.0.0.1:1");
        let e = BackofficeConfig::parse(
            &format!("{base}[admin]\naddress = \"x:1\"\nport = 3\n"),
            "t",
            &Env::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn tls_needs_certificates() {
        let c = BackofficeConfig::parse("[scm]\naddress = \"h:1\"\ntls = true\n", "t", &Env::new())
            .unwrap();
        assert_eq!(c.validate().unwrap_err().0, "tls");
    }
}
