//! Configuration loading shared by the binaries: a TOML file, then environment variables
//! (`PREFIX__SECTION__KEY`) on top, deserialised with serde. Unknown keys are rejected by
//! the binaries' `#[serde(deny_unknown_fields)]` types; this module keeps parsing apart from
//! file I/O so tests can feed text and a fake environment without touching the process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}; check the --config path")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text or an environment override is not a valid configuration.
    #[error("invalid configuration in {origin}: {message}")]
    Invalid {
        /// The file (and environment prefix) the configuration came from.
        origin: String,
        /// What is wrong, naming the key where possible.
        message: String,
    },
}

/// Environment variables that override the file, as `(name, value)` pairs. Only names that
/// start with `PREFIX__` are used.
pub type Env = HashMap<String, String>;

/// The process environment, filtered to the given prefix (`SCM`, `AGENT`, `BACKOFFICE`).
pub fn process_env(prefix: &str) -> Env {
    let lead = format!("{prefix}__");
    std::env::vars()
        .filter(|(k, _)| k.starts_with(&lead))
        .collect()
}

/// Parses TOML text plus environment overrides into `T`.
///
/// `origin` names the source in error messages (usually the file path). Environment keys
/// look like `SCM__DATABASE__PATH=/var/lib/scm/scm.db` (prefix, then the section and key
/// path separated by double underscores, case-insensitive).
pub fn parse<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    prefix: &str,
    env: &Env,
) -> Result<T, ConfigError> {
    let invalid = |e: config::ConfigError| ConfigError::Invalid {
        origin: origin.to_string(),
        message: e.to_string(),
    };
    // Only the overrides for this prefix are given to the config crate, lower-cased the way
    // it expects; this keeps the real process environment out of tests.
    let lead = format!("{prefix}__");
    let overrides: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&lead))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let cfg = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(prefix)
                .prefix_separator("__")
                .separator("__")
                .source(Some(overrides)),
        )
        .build()
        .map_err(invalid)?;
    cfg.try_deserialize::<T>().map_err(invalid)
}

/// Reads `path` and parses it with [`parse`].
pub fn load<T: DeserializeOwned>(path: &Path, prefix: &str, env: &Env) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string(), prefix, env)
}

/// Resolves a path from a configuration file relative to the file's directory (absolute
/// paths are kept as they are).
pub fn resolve(base_file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_file.parent().unwrap_or_else(|| Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        port: u16,
        #[serde(default)]
        name: String,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Top {
        server: Inner,
    }

    #[test]
    fn file_then_env_override() {
        let env: Env = [("T__SERVER__PORT".to_string(), "99".to_string())].into();
        let t: Top = parse("[server]\nport = 1\nname = \"x\"\n", "t.toml", "T", &env).unwrap();
        assert_eq!(
            t,
            Top {
                server: Inner {
                    port: 99,
                    name: "x".into()
                }
            }
        );
    }

    #[test]
    fn env_keeps_leading_zeros_in_strings() {
        let env: Env = [("T__SERVER__NAME".to_string(), "00123".to_string())].into();
        let t: Top = parse("[server]\nport = 1\n", "t.toml", "T", &env).unwrap();
        assert_eq!(t.server.name, "00123");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse::<Top>("[server]\nport = 1\nprot = 2\n", "t.toml", "T", &Env::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        assert!(err.contains("t.toml"), "{err}");
    }

    #[test]
    fn other_prefixes_are_ignored() {
        let env: Env = [("OTHER__SERVER__PORT".to_string(), "5".to_string())].into();
        let t: Top = parse("[server]\nport = 1\n", "t.toml", "T", &env).unwrap();
        assert_eq!(t.server.port, 1);
    }

    #[test]
    fn relative_paths_follow_the_file() {
        assert_eq!(
            resolve(Path::new("/etc/scm/scm.toml"), Path::new("ca.pem")),
            PathBuf::from("/etc/scm/ca.pem")
        );
        assert_eq!(
            resolve(Path::new("/etc/scm/scm.toml"), Path::new("/x/ca.pem")),
            PathBuf::from("/x/ca.pem")
        );
    }
}
