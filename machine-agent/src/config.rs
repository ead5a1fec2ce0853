//! The agent's configuration file: schema, defaults and checks (`machine-agent
//! check-config`). Every key is documented in `docs/configuration.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use scm_common::config::{ConfigError, Env};
use scm_common::logging::LogFormat;

/// Environment variable prefix: `AGENT__SECTION__KEY`.
pub const ENV_PREFIX: &str = "AGENT";

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This machine's id; must match its certificate.
    pub machine_id: u16,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// The SCM to report to.
    pub scm: ScmSection,
    /// Listen addresses.
    #[serde(default)]
    pub listen: ListenSection,
    /// Certificates.
    pub tls: TlsSection,
    /// Where configurations are stored.
    pub storage: StorageSection,
    /// Timeouts and back-off.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Card readers on this machine.
    #[serde(default, rename = "reader")]
    pub readers: Vec<crate::readers::ReaderConfig>,
    /// Swipe time to live, debounce and queue.
    #[serde(default)]
    pub swipes: crate::swipes::SwipeSettings,
    /// Card number rules.
    #[serde(default)]
    pub cards: scm_common::card::CardRules,
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `human` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// `[scm]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScmSection {
    /// The SCM's agent link, `host:port`.
    pub address: String,
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// Config port (the SCM connects here to push CONFIG, for machines the SCM has
    /// `delivery = "port"` for); empty: none, configurations come over the link.
    pub config: String,
    /// The `host:port` the agent announces for its config port, when the SCM must
    /// reach it at another address than the one the link leaves from (NAT, another
    /// interface). Empty: the config port's own address when it is bound to a specific
    /// one, else the link's local address with the config port's port.
    pub config_advertise: String,
    /// Prometheus metrics and health (`GET /metrics`, `GET /health`, plain HTTP); empty
    /// disables it. A bind failure is logged and the agent runs without metrics.
    pub metrics: String,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            // None by default: configurations come over the agent's own link, so a
            // machine needs no inbound port (no firewall hole, works behind NAT).
            config: String::new(),
            config_advertise: String::new(),
            metrics: "127.0.0.1:9465".into(),
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// This machine's certificate (PEM), `urn:scm:machine:<id>`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Certificate revocation lists (PEM).
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// Directory for `config.current`, `config.previous` and `config.meta`.
    pub dir: PathBuf,
}

/// `[timeouts]`, milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TLS handshakes.
    pub handshake_ms: u64,
    /// A started frame must complete within this time.
    pub frame_stall_ms: u64,
    /// An idle config-port connection is closed after this time.
    pub config_idle_ms: u64,
    /// Heartbeat interval on the event link.
    pub heartbeat_ms: u64,
    /// Waiting for the SCM's answer to a request.
    pub reply_ms: u64,
    /// First reconnect delay; doubles up to `reconnect_max_ms`, with jitter.
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay.
    pub reconnect_max_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake_ms: 5_000,
            frame_stall_ms: 10_000,
            config_idle_ms: 30_000,
            heartbeat_ms: 30_000,
            reply_ms: 10_000,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent connections on the config port.
    pub max_config_connections: usize,
    /// Concurrent connections on the config port from one source address (0: no limit).
    pub max_config_connections_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_config_connections: 8,
            max_config_connections_per_source: 4,
        }
    }
}

/// A value that failed validation.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ValidationError {
    /// The offending key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl AgentConfig {
    /// Parses TOML text plus environment overrides.
    pub fn parse(text: &str, origin: &str, env: &Env) -> Result<Self, ConfigError> {
        scm_common::config::parse(text, origin, ENV_PREFIX, env)
    }

    /// Reads a file; relative paths are resolved against its directory.
    pub fn load(path: &Path, env: &Env) -> Result<Self, ConfigError> {
        use scm_common::config::resolve;
        let mut c: Self = scm_common::config::load(path, ENV_PREFIX, env)?;
        c.tls.ca = resolve(path, &c.tls.ca);
        c.tls.cert = resolve(path, &c.tls.cert);
        c.tls.key = resolve(path, &c.tls.key);
        for p in &mut c.tls.crls {
            *p = resolve(path, p);
        }
        c.storage.dir = resolve(path, &c.storage.dir);
        for r in &mut c.readers {
            r.resolve_paths(path);
        }
        Ok(c)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let bad = |key: &str, message: String| ValidationError {
            key: key.into(),
            message,
        };
        for (key, v) in [
            ("listen.config", &self.listen.config),
            ("listen.metrics", &self.listen.metrics),
        ] {
            if !v.is_empty() && v.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(key, format!("{v:?} is not IP:PORT")));
            }
        }
        let adv = &self.listen.config_advertise;
        if !adv.is_empty() {
            if self.listen.config.is_empty() {
                return Err(bad(
                    "listen.config_advertise",
                    "announces a config port, but [listen] config is empty (no config port); set config, or remove config_advertise".into(),
                ));
            }
            let port_ok = adv
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !port_ok || adv.len() > 255 {
                return Err(bad(
                    "listen.config_advertise",
                    format!("{adv:?} is not host:port (for example \"10.1.2.3:9301\")"),
                ));
            }
        }
        if self.scm.address.is_empty() {
            return Err(bad(
                "scm.address",
                "must name the SCM's agent port, host:port".into(),
            ));
        }
        let t = &self.timeouts;
        for (k, v) in [
            ("timeouts.handshake_ms", t.handshake_ms),
            ("timeouts.frame_stall_ms", t.frame_stall_ms),
            ("timeouts.config_idle_ms", t.config_idle_ms),
            ("timeouts.heartbeat_ms", t.heartbeat_ms),
            ("timeouts.reply_ms", t.reply_ms),
            ("timeouts.reconnect_min_ms", t.reconnect_min_ms),
        ] {
            if v == 0 {
                return Err(bad(k, "must be greater than 0".into()));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for r in &self.readers {
            r.validate()
                .map_err(|(key, message)| ValidationError { key, message })?;
            if !ids.insert(r.id.as_str()) {
                return Err(bad(
                    &format!("reader[{}].id", r.id),
                    "listed twice; reader ids must be unique".into(),
                ));
            }
        }
        self.cards.check().map_err(|m| bad("cards", m))?;
        let s = &self.swipes;
        if s.ttl_ms == 0 || s.queue_max == 0 || s.in_flight_max == 0 {
            return Err(bad(
                "swipes",
                "ttl_ms, queue_max and in_flight_max must be greater than 0".into(),
            ));
        }
        if t.reconnect_max_ms < t.reconnect_min_ms {
            return Err(bad(
                "timeouts.reconnect_max_ms",
                "must be at least timeouts.reconnect_min_ms".into(),
            ));
        }
        Ok(())
    }

    /// TLS file set.
    pub fn tls_files(&self) -> scm_certs::tls::TlsFiles {
        scm_certs::tls::TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
            crls: self.tls.crls.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "machine_id = 4\n[scm]\naddress = \"127.0.0.1:9300\"\n[tls]\nca = \"ca.pem\"\ncert = \"m.pem\"\nkey = \"k.pem\"\n[storage]\ndir = \"state\"\n";

    #[test]
    fn defaults_and_env() {
        let env: Env = [("AGENT__LISTEN__CONFIG".into(), "127.0.0.1:0".into())].into();
        let c = AgentConfig::parse(MIN, "t", &env).unwrap();
        assert_eq!(c.limits.max_config_connections_per_source, 4);
        c.validate().unwrap();
        assert_eq!(c.machine_id, 4);
        assert_eq!(c.listen.config, "127.0.0.1:0");
        assert_eq!(c.timeouts.heartbeat_ms, 30_000);
    }

    #[test]
    fn unknown_key_named() {
        let e = AgentConfig::parse(
            &format!("{MIN}[timeouts]\nheartbeat = 3\n"),
            "t",
            &Env::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("heartbeat"), "{e}");
    }

    #[test]
    fn backoff_bounds_checked() {
        let env: Env = [("AGENT__TIMEOUTS__RECONNECT_MAX_MS".into(), "1".into())].into();
        let c = AgentConfig::parse(MIN, "t", &env).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "timeouts.reconnect_max_ms");
    }

    #[test]
    fn metrics_listener_default_override_and_check() {
        let c = AgentConfig::parse(MIN, "t", &Env::new()).unwrap();
        assert_eq!(c.listen.metrics, "127.0.0.1:9465");
        let env: Env = [("AGENT__LISTEN__METRICS".into(), "127.0.0.1:0".into())].into();
        let c = AgentConfig::parse(MIN, "t", &env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.metrics, "127.0.0.1:0");
        let env: Env = [("AGENT__LISTEN__METRICS".into(), "localhost".into())].into();
        let c = AgentConfig::parse(MIN, "t", &env).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "listen.metrics");
    }
}
