//! The SCM's configuration: the TOML file's schema, its defaults, and the checks that run
//! before anything starts (`scm check-config`). Every key is documented in
//! `docs/configuration.md`; unknown keys are rejected with their name.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use scm_common::config::{ConfigError, Env};
use scm_common::logging::LogFormat;

/// Environment variable prefix: `SCM__SECTION__KEY`.
pub const ENV_PREFIX: &str = "SCM";

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScmConfig {
    /// Logging.
    #[serde(default)]
    pub(crate) log: LogSection,
    /// Listen addresses.
    #[serde(default)]
    pub(crate) listen: ListenSection,
    /// The SCM's certificate, key and trusted CA.
    pub(crate) tls: TlsSection,
    /// The SQLite database.
    pub(crate) database: DatabaseSection,
    /// Connection and size limits.
    #[serde(default)]
    pub(crate) limits: Limits,
    /// Timeouts.
    #[serde(default)]
    pub(crate) timeouts: Timeouts,
    /// Operator login throttling.
    #[serde(default)]
    pub(crate) login: crate::coord::throttle::LoginSection,
    /// Operator accounts.
    #[serde(default, rename = "operator")]
    pub(crate) operators: Vec<crate::ops::auth::OperatorConfig>,
    /// The machines this SCM knows.
    #[serde(default, rename = "machine")]
    pub(crate) machines: Vec<crate::ops::fleet::MachineConfig>,
    /// Card swipe handling.
    #[serde(default)]
    pub(crate) swipes: crate::ops::swipes::SwipeSettings,
    /// Card number rules (checked again at the SCM).
    #[serde(default)]
    pub(crate) cards: scm_common::card::CardRules,
    /// Generic-mode card reader devices presented to print servers.
    #[serde(default, rename = "generic")]
    pub(crate) generic: Vec<crate::bridges::generic::GenericDevice>,
    /// Settings for every Generic device.
    #[serde(default)]
    pub(crate) bridge: crate::bridges::generic::BridgeSettings,
    /// Retries of pending pushes.
    #[serde(default)]
    pub(crate) retry: crate::ops::retry::RetrySettings,
    /// The event bus (admin API `WatchEvents`).
    #[serde(default)]
    pub(crate) events: crate::coord::events::EventSettings,
    /// RFIDeas 241 Client Mode devices presented to print servers.
    #[serde(default, rename = "rfideas")]
    pub(crate) rfideas: Vec<crate::bridges::rfideas::RfideasDevice>,
    /// Settings for every 241 device.
    #[serde(default)]
    pub(crate) rfideas_bridge: crate::bridges::rfideas::RfideasSettings,
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `human` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// `[listen]`: where each server listens. An empty string disables that listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// Agent event link (mutual TLS frames).
    pub agents: String,
    /// Plain telnet for operators; loopback by default.
    pub telnet: String,
    /// TLS-wrapped telnet for remote operators (operator certificate required).
    pub telnet_tls: String,
    /// Prometheus metrics and health (`GET /metrics`, `GET /health`, plain HTTP). A bind
    /// failure here is logged and the SCM runs without metrics.
    pub metrics: String,
    /// The gRPC admin API (mutual TLS 1.3, operator certificates).
    pub admin: String,
    /// RFIDeas 241 configuration requests (plain HTTP, devices told apart by `Host`).
    /// Bound only when `[[rfideas]]` devices are configured.
    pub rfideas: String,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            agents: "0.0.0.0:9300".into(),
            telnet: "127.0.0.1:2323".into(),
            telnet_tls: "0.0.0.0:2324".into(),
            metrics: "127.0.0.1:9464".into(),
            admin: "127.0.0.1:9443".into(),
            rfideas: "0.0.0.0:8241".into(),
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate (PEM) that signs machines, operators and this SCM.
    pub ca: PathBuf,
    /// This SCM's certificate (PEM), with the `urn:scm:scm` identity.
    pub cert: PathBuf,
    /// This SCM's private key (PEM).
    pub key: PathBuf,
    /// Certificate revocation lists (PEM).
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Also accept TLS 1.2 on the agent link and when connecting to machines' config
    /// ports, for legacy version-0 machines. TLS 1.3 only when false.
    #[serde(default)]
    pub allow_tls12_for_machines: bool,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    /// SQLite file; created if missing.
    pub path: PathBuf,
    /// How long a write waits for another process's lock before it fails with a clear
    /// error (the operator is told to try again; nothing is half-stored).
    #[serde(default = "default_busy_timeout")]
    pub busy_timeout_ms: u64,
}

fn default_busy_timeout() -> u64 {
    5_000
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent agent connections.
    pub max_agent_connections: usize,
    /// Concurrent agent connections from one source address (0: no limit). Machines
    /// behind one NAT address share it.
    pub max_agent_connections_per_source: usize,
    /// Concurrent operator (telnet) connections, per listener.
    pub max_operator_connections: usize,
    /// Concurrent connections from one source address on each operator listener (telnet,
    /// telnet-tls, admin) and on the metrics listener (0: no limit).
    pub max_connections_per_source: usize,
    /// Largest DATA_LENGTH accepted on the agent link.
    pub max_agent_frame_data: usize,
    /// Largest configuration accepted from an operator, in bytes.
    pub max_config_bytes: usize,
    /// Longest telnet line, in bytes.
    pub telnet_max_line: usize,
    /// Deliveries in flight at once during a push to a group or to all machines.
    pub push_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_agent_connections: 10_000,
            max_agent_connections_per_source: 1_000,
            max_operator_connections: 32,
            max_connections_per_source: 8,
            max_agent_frame_data: 16 * 1024,
            max_config_bytes: 60 * 1024,
            telnet_max_line: 4096,
            push_concurrency: 64,
        }
    }
}

/// `[timeouts]`, all in milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TLS handshake, on every TLS port.
    pub handshake_ms: u64,
    /// A frame that has started must be complete within this time.
    pub frame_stall_ms: u64,
    /// An agent link with no frame for this long is closed (agents send heartbeats).
    pub agent_idle_ms: u64,
    /// Connecting to a machine's config port (TCP and TLS).
    pub push_connect_ms: u64,
    /// Waiting for a machine's ACK or NACK to a CONFIG.
    pub push_reply_ms: u64,
    /// Login must complete within this time.
    pub login_ms: u64,
    /// An operator session idle for this long is closed.
    pub telnet_idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake_ms: 5_000,
            frame_stall_ms: 10_000,
            agent_idle_ms: 90_000,
            push_connect_ms: 3_000,
            push_reply_ms: 15_000,
            login_ms: 60_000,
            telnet_idle_ms: 900_000,
        }
    }
}

impl Timeouts {
    /// Converts a millisecond field.
    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

/// A configuration that failed validation.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ValidationError {
    /// The offending key.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        key: key.into(),
        message: message.into(),
    }
}

impl ScmConfig {
    /// Parses TOML text plus environment overrides.
    pub fn parse(text: &str, origin: &str, env: &Env) -> Result<Self, ConfigError> {
        scm_common::config::parse(text, origin, ENV_PREFIX, env)
    }

    /// Reads and parses a file; relative paths inside it are resolved against its
    /// directory.
    pub fn load(path: &Path, env: &Env) -> Result<Self, ConfigError> {
        let mut cfg: Self = scm_common::config::load(path, ENV_PREFIX, env)?;
        cfg.resolve_paths(path);
        Ok(cfg)
    }

    /// Makes file paths relative to the configuration file absolute.
    pub fn resolve_paths(&mut self, file: &Path) {
        use scm_common::config::resolve;
        self.tls.ca = resolve(file, &self.tls.ca);
        self.tls.cert = resolve(file, &self.tls.cert);
        self.tls.key = resolve(file, &self.tls.key);
        for c in &mut self.tls.crls {
            *c = resolve(file, c);
        }
        self.database.path = resolve(file, &self.database.path);
        let b = &mut self.rfideas_bridge;
        for p in [&mut b.ca, &mut b.pin_cert].into_iter().flatten() {
            *p = resolve(file, p);
        }
        for p in self.rfideas.iter_mut().filter_map(|d| d.pin_cert.as_mut()) {
            *p = resolve(file, p);
        }
    }

    /// Checks what serde cannot: value ranges, duplicates, hashes.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut ids = HashSet::new();
        for (i, m) in self.machines.iter().enumerate() {
            if !ids.insert(m.id) {
                return Err(invalid(
                    format!("machine[{i}].id"),
                    format!("machine id {} is listed twice; each id once", m.id),
                ));
            }
            for (key, names) in [("groups", &m.groups), ("labels", &m.labels)] {
                if let Some(bad) = names.iter().find(|n| !crate::ops::fleet::valid_name(n)) {
                    return Err(invalid(
                        format!("machine[{i}].{key}"),
                        format!(
                            "{bad:?} is not a valid name; use 1 to 64 characters from A-Z a-z 0-9 . _ - = :"
                        ),
                    ));
                }
            }
            if m.protocol_version > 1 {
                return Err(invalid(
                    format!("machine[{i}].protocol_version"),
                    format!(
                        "{} is not a protocol version; use 0 or 1",
                        m.protocol_version
                    ),
                ));
            }
            if m.byte_order != crate::link::dialect::ByteOrder::Little && m.protocol_version != 0 {
                return Err(invalid(
                    format!("machine[{i}].byte_order"),
                    "\"big\" is only for version-0 machines that send ID and DATA_LENGTH big-endian; version 1 is always little-endian: remove byte_order or set protocol_version = 0",
                ));
            }
            if m.close_after_config && m.protocol_version != 0 {
                return Err(invalid(
                    format!("machine[{i}].close_after_config"),
                    "is only for version-0 machines, whose link carries a CONFIG only as the answer to HELLO; a version-1 link stays up and takes CONFIG at any time: remove it or set protocol_version = 0",
                ));
            }
            if m.delivery == Some(crate::ops::fleet::Delivery::Link) && m.config_addr.is_some() {
                return Err(invalid(
                    format!("machine[{i}].config_addr"),
                    "is only used with delivery = \"port\", and this machine has delivery = \"link\": remove config_addr, or set delivery = \"port\"",
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, o) in self.operators.iter().enumerate() {
            let ok = !o.name.is_empty()
                && o.name.len() <= 64
                && o.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(invalid(
                    format!("operator[{i}].name"),
                    "use 1 to 64 characters from A-Z a-z 0-9 . _ -",
                ));
            }
            if !names.insert(o.name.as_str()) {
                return Err(invalid(
                    format!("operator[{i}].name"),
                    format!("operator {:?} is listed twice", o.name),
                ));
            }
            if !o.password_hash.is_empty()
                && argon2::PasswordHash::new(o.password_hash.expose()).is_err()
            {
                return Err(invalid(
                    format!("operator[{i}].password_hash"),
                    "not an Argon2 PHC string; create one with `scm hash-password`",
                ));
            }
        }
        self.cards.check().map_err(|m| invalid("cards", m))?;
        if self.retry.initial_ms == 0 || self.retry.max_ms < self.retry.initial_ms {
            return Err(invalid("retry", "need 0 < initial_ms <= max_ms"));
        }
        let sw = &self.swipes;
        if sw.default_ttl_ms == 0 || sw.max_ttl_ms < sw.default_ttl_ms || sw.dedup_max == 0 {
            return Err(invalid(
                "swipes",
                "need 0 < default_ttl_ms <= max_ttl_ms and dedup_max > 0",
            ));
        }
        if sw.journal_max_rows == 0 || sw.journal_max_age_days == 0 {
            return Err(invalid(
                "swipes",
                "need journal_max_rows > 0 and journal_max_age_days > 0",
            ));
        }
        crate::bridges::generic::validate(&self.generic, &self.bridge)
            .map_err(|(key, message)| invalid(key, message))?;
        for (i, g) in self.generic.iter().enumerate() {
            if self.machine(g.machine).is_none() {
                return Err(invalid(
                    format!("generic[{i}].machine"),
                    format!("machine {} is not listed in [[machine]]", g.machine),
                ));
            }
        }
        let ids: Vec<u16> = self.machines.iter().map(|m| m.id).collect();
        crate::bridges::rfideas::validate(
            &self.rfideas,
            &self.rfideas_bridge,
            &ids,
            &self.listen.rfideas,
        )
        .map_err(|(key, message)| invalid(key, message))?;
        let l = &self.limits;
        if l.max_agent_frame_data == 0 || l.max_agent_frame_data > scm_proto::MAX_DATA_LEN {
            return Err(invalid(
                "limits.max_agent_frame_data",
                format!("must be 1..={}", scm_proto::MAX_DATA_LEN),
            ));
        }
        if l.max_config_bytes == 0 || l.max_config_bytes > scm_proto::MAX_DATA_LEN - 64 {
            return Err(invalid(
                "limits.max_config_bytes",
                format!(
                    "must be 1..={} (a CONFIG frame carries at most {} bytes)",
                    scm_proto::MAX_DATA_LEN - 64,
                    scm_proto::MAX_DATA_LEN
                ),
            ));
        }
        if self.events.capacity == 0 || self.events.capacity > 1 << 20 {
            return Err(invalid("events.capacity", "must be 1..=1048576"));
        }
        if l.push_concurrency == 0 || l.push_concurrency > 4096 {
            return Err(invalid("limits.push_concurrency", "must be 1..=4096"));
        }
        if l.telnet_max_line < 80 {
            return Err(invalid("limits.telnet_max_line", "must be at least 80"));
        }
        for (key, v) in [
            ("database.busy_timeout_ms", self.database.busy_timeout_ms),
            ("timeouts.handshake_ms", self.timeouts.handshake_ms),
            ("timeouts.frame_stall_ms", self.timeouts.frame_stall_ms),
            ("timeouts.agent_idle_ms", self.timeouts.agent_idle_ms),
            ("timeouts.push_connect_ms", self.timeouts.push_connect_ms),
            ("timeouts.push_reply_ms", self.timeouts.push_reply_ms),
            ("timeouts.login_ms", self.timeouts.login_ms),
            ("timeouts.telnet_idle_ms", self.timeouts.telnet_idle_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for (key, v) in [
            ("listen.agents", &self.listen.agents),
            ("listen.telnet", &self.listen.telnet),
            ("listen.telnet_tls", &self.listen.telnet_tls),
            ("listen.metrics", &self.listen.metrics),
            ("listen.admin", &self.listen.admin),
            ("listen.rfideas", &self.listen.rfideas),
        ] {
            if !v.is_empty() && v.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    key,
                    format!("{v:?} is not an address; write IP:PORT such as 127.0.0.1:2323"),
                ));
            }
        }
        Ok(())
    }

    /// The log format chosen (`[log] format`).
    pub fn log_format(&self) -> scm_common::logging::LogFormat {
        self.log.format
    }

    /// How many machines and operators are configured.
    pub fn counts(&self) -> (usize, usize) {
        (self.machines.len(), self.operators.len())
    }

    /// The machine with this id, if configured.
    pub(crate) fn machine(&self, id: u16) -> Option<&crate::ops::fleet::MachineConfig> {
        crate::ops::fleet::machine(&self.machines, id)
    }

    /// The use-case layer's settings.
    pub(crate) fn ops_settings(&self) -> crate::ops::OpsSettings {
        crate::ops::OpsSettings {
            machines: self.machines.clone(),
            operators: self.operators.clone(),
            max_config_bytes: self.limits.max_config_bytes,
            push_concurrency: self.limits.push_concurrency,
            push_connect: Timeouts::ms(self.timeouts.push_connect_ms),
            push_reply: Timeouts::ms(self.timeouts.push_reply_ms),
            retry: self.retry.clone(),
        }
    }

    /// The agent link's settings.
    pub(crate) fn link_settings(&self) -> crate::link::LinkSettings {
        crate::link::LinkSettings {
            max_frame_data: self.limits.max_agent_frame_data,
            handshake: self.handshake(),
            idle: Timeouts::ms(self.timeouts.agent_idle_ms),
            stall: Timeouts::ms(self.timeouts.frame_stall_ms),
            push_reply: Timeouts::ms(self.timeouts.push_reply_ms),
            machines: self
                .machines
                .iter()
                .map(|m| {
                    let k = crate::link::KnownMachine {
                        byte_order: m.byte_order,
                        close_after_in_band: m.close_after_config,
                    };
                    (m.id, k)
                })
                .collect(),
        }
    }

    /// The telnet console's settings.
    pub(crate) fn telnet_settings(&self) -> crate::front::telnet::TelnetSettings {
        crate::front::telnet::TelnetSettings {
            max_line: self.limits.telnet_max_line,
            handshake: self.handshake(),
            login: Timeouts::ms(self.timeouts.login_ms),
            idle: Timeouts::ms(self.timeouts.telnet_idle_ms),
        }
    }

    /// The TLS handshake's time limit, on every TLS port.
    pub(crate) fn handshake(&self) -> Duration {
        Timeouts::ms(self.timeouts.handshake_ms)
    }

    /// TLS file set for `scm-certs`.
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

    const MIN: &str = r#"
[tls]
ca = "ca.pem"
cert = "scm.pem"
key = "scm-key.pem"
[database]
path = "scm.db"
[[machine]]
id = 1
[[machine]]
id = 2
protocol_version = 0
config_addr = "10.0.0.2:9301"
"#;

    #[test]
    fn delivery_is_over_the_link_for_version_1_unless_set_or_given_a_config_address() {
        use crate::ops::fleet::Delivery;
        let c = ScmConfig::parse(MIN, "t", &Env::new()).unwrap();
        assert_eq!(c.machine(1).unwrap().delivery(), Delivery::Link);
        assert_eq!(
            c.machine(2).unwrap().delivery(),
            Delivery::Port,
            "version 0"
        );
        let port = MIN.replace("id = 1\n", "id = 1\ndelivery = \"port\"\n");
        let c = ScmConfig::parse(&port, "t", &Env::new()).unwrap();
        assert_eq!(c.machine(1).unwrap().delivery(), Delivery::Port);
        let addr = MIN.replace("id = 1\n", "id = 1\nconfig_addr = \"10.0.0.1:9301\"\n");
        let c = ScmConfig::parse(&addr, "t", &Env::new()).unwrap();
        assert_eq!(
            c.machine(1).unwrap().delivery(),
            Delivery::Port,
            "an address"
        );
        let v0_link = MIN.replace(
            "protocol_version = 0\nconfig_addr = \"10.0.0.2:9301\"\n",
            "protocol_version = 0\ndelivery = \"link\"\n",
        );
        let c = ScmConfig::parse(&v0_link, "t", &Env::new()).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.machine(2).unwrap().delivery(),
            Delivery::Link,
            "in-band only"
        );
        let both = MIN.replace(
            "config_addr = \"10.0.0.2:9301\"\n",
            "config_addr = \"10.0.0.2:9301\"\ndelivery = \"link\"\n",
        );
        let e = ScmConfig::parse(&both, "t", &Env::new())
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("machine[1].config_addr") && e.contains("delivery = \"port\""),
            "{e}"
        );
        let bad = MIN.replace("id = 1\n", "id = 1\ndelivery = \"tcp\"\n");
        let e = ScmConfig::parse(&bad, "t", &Env::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("link") && e.contains("port"),
            "names the choices: {e}"
        );
    }

    #[test]
    fn byte_order_is_little_unless_a_version_0_machine_says_big() {
        use crate::link::dialect::ByteOrder;
        let c = ScmConfig::parse(MIN, "t", &Env::new()).unwrap();
        assert_eq!(c.machine(2).unwrap().byte_order, ByteOrder::Little);
        let big = MIN.replace(
            "protocol_version = 0\n",
            "protocol_version = 0\nbyte_order = \"big\"\n",
        );
        let c = ScmConfig::parse(&big, "t", &Env::new()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.machine(2).unwrap().byte_order, ByteOrder::Big);
        let v1 = MIN.replace("id = 1\n", "id = 1\nbyte_order = \"big\"\n");
        let e = ScmConfig::parse(&v1, "t", &Env::new())
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("machine[0].byte_order") && e.contains("version-0"),
            "{e}"
        );
        let bad = MIN.replace(
            "protocol_version = 0\n",
            "protocol_version = 0\nbyte_order = \"BE\"\n",
        );
        let e = ScmConfig::parse(&bad, "t", &Env::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"BE\" is not a byte order; use \"little\"") && e.contains("byte_order"),
            "{e}"
        );
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = ScmConfig::parse(MIN, "t", &Env::new()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.telnet, "127.0.0.1:2323");
        assert_eq!(c.machines.len(), 2);
        assert_eq!(c.machine(2).unwrap().protocol_version, 0);
        assert_eq!(c.machine(1).unwrap().protocol_version, 1);
    }

    #[test]
    fn env_overrides_listen_address() {
        let env: Env = [("SCM__LISTEN__TELNET".into(), "127.0.0.1:0".into())].into();
        let c = ScmConfig::parse(MIN, "t", &env).unwrap();
        assert_eq!(c.listen.telnet, "127.0.0.1:0");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let text = format!("{MIN}\n[limits]\nmax_agent_conections = 3\n");
        let e = ScmConfig::parse(&text, "t", &Env::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_agent_conections"), "{e}");
    }

    #[test]
    fn duplicate_machine_is_rejected() {
        let text = format!("{MIN}\n[[machine]]\nid = 1\n");
        let c = ScmConfig::parse(&text, "t", &Env::new()).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "machine[2].id");
    }

    #[test]
    fn bad_password_hash_is_rejected() {
        let text = format!(
            "{MIN}\n[[operator]]\nname = \"a\"\nrole = \"admin\"\npassword_hash = \"plain\"\n"
        );
        let c = ScmConfig::parse(&text, "t", &Env::new()).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "operator[0].password_hash");
        assert!(!format!("{c:?}").contains("plain"), "hash masked in Debug");
    }

    #[test]
    fn bad_listen_address_is_named() {
        let env: Env = [("SCM__LISTEN__AGENTS".into(), "nowhere".into())].into();
        let c = ScmConfig::parse(MIN, "t", &env).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "listen.agents");
    }

    #[test]
    fn admin_listener_and_event_bus_defaults_overrides_and_checks() {
        let c = ScmConfig::parse(MIN, "t", &Env::new()).unwrap();
        assert_eq!(c.listen.admin, "127.0.0.1:9443");
        assert_eq!(c.events.capacity, 4096);
        let env: Env = [("SCM__LISTEN__ADMIN".into(), "".into())].into();
        let c = ScmConfig::parse(MIN, "t", &env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.admin, "", "empty disables");
        let env: Env = [("SCM__LISTEN__ADMIN".into(), "admin-host".into())].into();
        let c = ScmConfig::parse(MIN, "t", &env).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "listen.admin");
        let text = format!("{MIN}\n[events]\ncapacity = 0\n");
        let c = ScmConfig::parse(&text, "t", &Env::new()).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "events.capacity");
    }

    #[test]
    fn metrics_listener_defaults_to_loopback_and_can_be_overridden() {
        let c = ScmConfig::parse(MIN, "t", &Env::new()).unwrap();
        assert_eq!(c.listen.metrics, "127.0.0.1:9464");
        let env: Env = [("SCM__LISTEN__METRICS".into(), "".into())].into();
        let c = ScmConfig::parse(MIN, "t", &env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.metrics, "", "empty disables");
        let env: Env = [("SCM__LISTEN__METRICS".into(), "9464".into())].into();
        let c = ScmConfig::parse(MIN, "t", &env).unwrap();
        assert_eq!(c.validate().unwrap_err().key, "listen.metrics");
    }

    #[test]
    fn per_source_caps_default_and_override() {
        let c = ScmConfig::parse(MIN, "t", &Env::new()).unwrap();
        assert_eq!(c.limits.max_connections_per_source, 8);
        assert_eq!(c.limits.max_agent_connections_per_source, 1_000);
        assert!(c.limits.max_connections_per_source < c.limits.max_operator_connections);
        assert!(c.limits.max_agent_connections_per_source < c.limits.max_agent_connections);
        let env: Env = [
            ("SCM__LIMITS__MAX_CONNECTIONS_PER_SOURCE".into(), "2".into()),
            (
                "SCM__LIMITS__MAX_AGENT_CONNECTIONS_PER_SOURCE".into(),
                "0".into(),
            ),
        ]
        .into();
        let c = ScmConfig::parse(MIN, "t", &env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.max_connections_per_source, 2);
        assert_eq!(c.limits.max_agent_connections_per_source, 0, "0: no limit");
        let text = format!("{MIN}\n[limits]\nmax_connections_per_src = 2\n");
        let err = ScmConfig::parse(&text, "t", &Env::new()).unwrap_err();
        assert!(err.to_string().contains("max_connections_per_src"), "{err}");
    }
}
