//! Card swipe sources: turn a local or network card reader's output into raw lines.
//!
//! Every kind (FIFO, character device, file, standard input, network reader in Generic
//! mode, scripted test cards) assembles its input keyboard-wedge style (see
//! [`line::LineAssembler`]) and sends [`RawLine`]s on a bounded channel. Validating card
//! numbers, debouncing, event ids and reporting to the SCM are the caller's business.
//!
//! Raw lines are never logged: they may be card numbers, which are bearer tokens. Logs
//! carry at most a line's length.

mod line;
mod local;
mod network;
mod script;
#[cfg(test)]
mod test_log;

use std::path::{Path, PathBuf};
use std::time::Duration;

use scm_common::backoff::Backoff;
use tokio::sync::mpsc::Sender;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::line::Line;

/// Longest line delivered; longer input lines are cut to this and flagged `too_long`.
pub const MAX_LINE: usize = 256;

/// Default interval of the network reader's `"\r"` keep-alives.
pub const DEFAULT_KEEPALIVE_MS: u64 = 30_000;
/// Default pause between a script reader's cards.
pub const DEFAULT_INTERVAL_MS: u64 = 1_000;
/// Default ignore prefixes of a network reader (status and keep-alive lines).
pub const DEFAULT_IGNORE: [&str; 3] = ["ping", "status", "#"];

/// A connection or open device that lasted this long counts as healthy: the next retry
/// starts again from the shortest back-off.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Size of the buffer reads go through.
const READ_BUF: usize = 4096;

/// `[[reader]]` in the agent's TOML configuration.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReaderConfig {
    /// Reader id, 1..=32 of `[A-Za-z0-9._-]`, e.g. `"r1"`.
    pub id: String,
    /// Where swipes come from.
    pub kind: ReaderKind,
    /// `fifo`, `file`, `device`: the path to read.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `network`: `host:port` of a Generic/server-mode reader.
    #[serde(default)]
    pub address: Option<String>,
    /// `network`: send `"\r"` this often (default 30000).
    #[serde(default)]
    pub keepalive_ms: Option<u64>,
    /// `network`: lines to ignore, case-insensitive prefixes; [`DEFAULT_IGNORE`] when empty.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// `script`: the card lines to emit, in order.
    #[serde(default)]
    pub cards: Vec<String>,
    /// `script`: pause between cards (default 1000).
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// `script`: pause before the first card (default 0).
    #[serde(default)]
    pub start_delay_ms: Option<u64>,
}

/// The kind of a swipe source.
#[derive(Debug, Clone, Copy, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReaderKind {
    /// A named pipe, created if missing; `echo 1234 > path` is one swipe.
    Fifo,
    /// A regular file read once (replaying recorded swipes).
    File,
    /// Standard input, until EOF.
    Stdin,
    /// A serial/HID character device (or anything that blocks), reopened on EOF or error.
    Device,
    /// A network card reader in Generic/server mode that the agent connects to.
    Network,
    /// Cards from the configuration, emitted on a timer (tests and demos).
    Script,
}

impl ReaderKind {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            ReaderKind::Fifo => "fifo",
            ReaderKind::File => "file",
            ReaderKind::Stdin => "stdin",
            ReaderKind::Device => "device",
            ReaderKind::Network => "network",
            ReaderKind::Script => "script",
        }
    }
}

impl std::fmt::Display for ReaderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `id` is a valid reader id: 1..=32 of `[A-Za-z0-9._-]`.
pub fn valid_reader_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ReaderConfig {
    /// A configuration of `kind` with every optional field unset.
    pub fn new(id: impl Into<String>, kind: ReaderKind) -> ReaderConfig {
        ReaderConfig {
            id: id.into(),
            kind,
            path: None,
            address: None,
            keepalive_ms: None,
            ignore: Vec::new(),
            cards: Vec::new(),
            interval_ms: None,
            start_delay_ms: None,
        }
    }

    /// Checks the combination of fields; `Err((key, message))` names the offending key,
    /// e.g. `("reader[r1].path", "kind = \"fifo\" needs path")`. A bad id is reported
    /// under the key `reader.id`. Fields the kind does not use are refused too.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !valid_reader_id(&self.id) {
            return Err((
                "reader.id".to_owned(),
                format!(
                    "reader id {:?} must be 1 to 32 characters of A-Z a-z 0-9 . _ -",
                    self.id
                ),
            ));
        }
        let kind = self.kind;
        let key = |field: &str| format!("reader[{}].{field}", self.id);
        let needs = |field: &str| Err((key(field), format!("kind = \"{kind}\" needs {field}")));
        let unused = |field: &str| {
            Err((
                key(field),
                format!("{field} is not used by kind = \"{kind}\""),
            ))
        };
        let uses_path = matches!(
            kind,
            ReaderKind::Fifo | ReaderKind::File | ReaderKind::Device
        );
        let network = kind == ReaderKind::Network;
        let script = kind == ReaderKind::Script;

        // Fields present that this kind does not use.
        let present = [
            ("path", self.path.is_some(), uses_path),
            ("address", self.address.is_some(), network),
            ("keepalive_ms", self.keepalive_ms.is_some(), network),
            ("ignore", !self.ignore.is_empty(), network),
            ("cards", !self.cards.is_empty(), script),
            ("interval_ms", self.interval_ms.is_some(), script),
            ("start_delay_ms", self.start_delay_ms.is_some(), script),
        ];
        if let Some((field, _, _)) = present.iter().find(|(_, set, used)| *set && !*used) {
            return unused(field);
        }

        if uses_path {
            match &self.path {
                None => return needs("path"),
                Some(p) if p.as_os_str().is_empty() => {
                    return Err((key("path"), "path must not be empty".to_owned()));
                }
                Some(_) => {}
            }
        }
        if network {
            let Some(address) = &self.address else {
                return needs("address");
            };
            if let Err(msg) = check_address(address) {
                return Err((key("address"), msg));
            }
            if self.keepalive_ms == Some(0) {
                return Err((key("keepalive_ms"), "keepalive_ms must be > 0".to_owned()));
            }
            if self.ignore.iter().any(|p| p.is_empty()) {
                return Err((
                    key("ignore"),
                    "ignore prefixes must not be empty (an empty prefix ignores every line)"
                        .to_owned(),
                ));
            }
        }
        if script && self.cards.is_empty() {
            return needs("cards");
        }
        Ok(())
    }

    /// Makes `path` absolute relative to the configuration file's directory.
    pub fn resolve_paths(&mut self, config_file: &Path) {
        let Some(path) = &self.path else { return };
        if path.is_absolute() || path.as_os_str().is_empty() {
            return;
        }
        let dir = config_file.parent().unwrap_or(Path::new(""));
        let joined = dir.join(path);
        self.path = Some(std::path::absolute(&joined).unwrap_or(joined));
    }

    /// What the start-up log line shows after the id, e.g. `fifo /run/swipes`.
    fn describe(&self) -> String {
        match self.kind {
            ReaderKind::Fifo | ReaderKind::File | ReaderKind::Device => format!(
                "{} {}",
                self.kind,
                self.path.as_deref().unwrap_or(Path::new("")).display()
            ),
            ReaderKind::Stdin => "stdin".to_owned(),
            ReaderKind::Network => {
                format!("network {}", self.address.as_deref().unwrap_or(""))
            }
            ReaderKind::Script => format!("script, {} cards", self.cards.len()),
        }
    }
}

fn check_address(address: &str) -> Result<(), String> {
    let bad = || format!("address {address:?} must be host:port");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("address {address:?}: bad port {port:?}")),
    }
}

/// One line from a reader, without its terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLine {
    /// The reader's id.
    pub reader: String,
    /// At most [`MAX_LINE`] bytes (longer input is cut here and flagged).
    pub line: Vec<u8>,
    /// The input line was longer than [`MAX_LINE`]; `line` holds its first `MAX_LINE` bytes.
    pub too_long: bool,
    /// When the line was complete.
    pub at_unix_ms: u64,
}

/// Runs one reader until shutdown (or, for kinds that end — file, stdin, script — until
/// their input ends). Sends each line on `tx` (awaiting the send; returns if the receiver
/// is gone). Never panics on input; I/O errors are logged and, for fifo/device/network,
/// retried after [`crate::link::backoff`]`(n, reconnect_min, reconnect_max)`.
///
/// Logs `reader ID (KIND WHAT) started` at info once the reader is ready (for fifo and
/// device: once the path is open, so that writing to it from then on is not lost), and
/// `reader ID connected to ADDR` each time a network reader connects. An invalid
/// configuration is logged at error and `run` returns at once.
pub async fn run(
    cfg: ReaderConfig,
    tx: Sender<RawLine>,
    shutdown: CancellationToken,
    reconnect_min: Duration,
    reconnect_max: Duration,
) {
    if let Err((key, msg)) = cfg.validate() {
        tracing::error!("reader {:?}: {key}: {msg}", cfg.id);
        return;
    }
    let sink = Sink {
        id: cfg.id.clone(),
        tx,
        shutdown,
    };
    let retry = Retry {
        min: reconnect_min,
        max: reconnect_max,
        attempt: 0,
    };
    let what = cfg.describe();
    match cfg.kind {
        ReaderKind::Fifo => local::fifo(&cfg, &what, &sink, retry).await,
        ReaderKind::Device => local::device(&cfg, &what, &sink, retry).await,
        ReaderKind::File => local::file(&cfg, &what, &sink).await,
        ReaderKind::Stdin => local::stdin(&what, &sink).await,
        ReaderKind::Network => network::run(&cfg, &what, &sink, retry).await,
        ReaderKind::Script => script::run(&cfg, &what, &sink).await,
    }
    tracing::debug!("reader {} stopped", cfg.id);
}

/// Where a reader's lines go, and its shutdown signal.
#[derive(Debug)]
struct Sink {
    id: String,
    tx: Sender<RawLine>,
    shutdown: CancellationToken,
}

impl Sink {
    /// Sends one line. `false`: stop (shutdown, or the receiver is gone).
    async fn send(&self, line: Line) -> bool {
        let raw = RawLine {
            reader: self.id.clone(),
            line: line.bytes,
            too_long: line.too_long,
            at_unix_ms: scm_common::clock::now_ms_u64(),
        };
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            r = self.tx.send(raw) => {
                if r.is_err() {
                    tracing::debug!("reader {}: receiver gone, stopping", self.id);
                }
                r.is_ok()
            }
        }
    }

    /// Sleeps `d`. `false`: shutdown came first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown.is_cancelled() || self.tx.is_closed()
    }
}

/// Back-off state of a reader that reopens or reconnects.
#[derive(Debug)]
struct Retry {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Retry {
    /// The delay before the next attempt; each call lengthens the following one.
    fn next_delay(&mut self) -> Duration {
        let d = Backoff::new(self.min, self.max).jittered(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// After a healthy session: the next delay is the shortest again.
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// One open source or connection: healthy once it delivered a line or lasted
/// [`HEALTHY_AFTER`].
#[derive(Debug)]
struct Session {
    since: Instant,
    delivered: bool,
}

impl Session {
    fn new() -> Session {
        Session {
            since: Instant::now(),
            delivered: false,
        }
    }

    fn healthy(&self) -> bool {
        self.delivered || self.since.elapsed() > HEALTHY_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: ReaderKind) -> ReaderConfig {
        ReaderConfig::new("r1", kind)
    }

    fn key(r: Result<(), (String, String)>) -> String {
        r.expect_err("should be refused").0
    }

    #[test]
    fn parses_toml() {
        #[derive(serde::Deserialize)]
        struct File {
            reader: Vec<ReaderConfig>,
        }
        let f: File = toml::from_str(
            r#"
            [[reader]]
            id = "r1"
            kind = "network"
            address = "10.0.0.5:7778"
            keepalive_ms = 5000
            ignore = ["ping", "RF IDeas"]

            [[reader]]
            id = "demo"
            kind = "script"
            cards = ["EMP123", "5678"]
            interval_ms = 250
            "#,
        )
        .unwrap();
        assert_eq!(f.reader[0].kind, ReaderKind::Network);
        assert_eq!(f.reader[0].address.as_deref(), Some("10.0.0.5:7778"));
        assert_eq!(f.reader[0].ignore, vec!["ping", "RF IDeas"]);
        assert_eq!(f.reader[1].cards, vec!["EMP123", "5678"]);
        assert_eq!(f.reader[1].start_delay_ms, None);
        for r in &f.reader {
            assert_eq!(r.validate(), Ok(()));
        }
        let unknown =
            toml::from_str::<File>("[[reader]]\nid = \"r\"\nkind = \"fifo\"\npth = \"x\"");
        assert!(unknown.is_err());
        let kind = toml::from_str::<File>("[[reader]]\nid = \"r\"\nkind = \"serial\"");
        assert!(kind.is_err());
    }

    #[test]
    fn validate_missing_fields_name_the_key() {
        for kind in [ReaderKind::Fifo, ReaderKind::File, ReaderKind::Device] {
            let r = cfg(kind).validate();
            assert_eq!(
                r,
                Err((
                    "reader[r1].path".to_owned(),
                    format!("kind = \"{kind}\" needs path")
                ))
            );
            let mut c = cfg(kind);
            c.path = Some("/tmp/x".into());
            assert_eq!(c.validate(), Ok(()));
            c.path = Some("".into());
            assert_eq!(key(c.validate()), "reader[r1].path");
        }
        assert_eq!(
            key(cfg(ReaderKind::Network).validate()),
            "reader[r1].address"
        );
        assert_eq!(key(cfg(ReaderKind::Script).validate()), "reader[r1].cards");
        assert_eq!(cfg(ReaderKind::Stdin).validate(), Ok(()));
    }

    #[test]
    fn validate_network_fields() {
        let mut c = cfg(ReaderKind::Network);
        for bad in [
            "",
            "host",
            ":7778",
            "host:",
            "host:0",
            "host:99999",
            "a b:1",
        ] {
            c.address = Some(bad.to_owned());
            assert_eq!(key(c.validate()), "reader[r1].address", "{bad:?}");
        }
        for good in ["10.0.0.5:7778", "reader-3.example:10001", "[::1]:7778"] {
            c.address = Some(good.to_owned());
            assert_eq!(c.validate(), Ok(()), "{good:?}");
        }
        c.keepalive_ms = Some(0);
        assert_eq!(key(c.validate()), "reader[r1].keepalive_ms");
        c.keepalive_ms = Some(1000);
        c.ignore = vec!["ping".into(), String::new()];
        assert_eq!(key(c.validate()), "reader[r1].ignore");
        c.ignore = vec!["ping".into()];
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn validate_refuses_fields_the_kind_does_not_use() {
        let mut c = cfg(ReaderKind::Stdin);
        c.path = Some("/dev/ttyS0".into());
        assert_eq!(
            c.validate(),
            Err((
                "reader[r1].path".to_owned(),
                "path is not used by kind = \"stdin\"".to_owned()
            ))
        );
        let mut c = cfg(ReaderKind::Fifo);
        c.path = Some("/run/swipes".into());
        c.cards = vec!["1".into()];
        assert_eq!(key(c.validate()), "reader[r1].cards");
        let mut c = cfg(ReaderKind::Script);
        c.cards = vec!["1".into()];
        c.keepalive_ms = Some(5);
        assert_eq!(key(c.validate()), "reader[r1].keepalive_ms");
    }

    #[test]
    fn validate_reader_ids() {
        let long = "x".repeat(33);
        for bad in ["", "r 1", "r/1", "r\n1", "ré", long.as_str()] {
            let mut c = cfg(ReaderKind::Stdin);
            c.id = bad.to_owned();
            let (k, msg) = c.validate().expect_err(bad);
            assert_eq!(k, "reader.id");
            assert!(msg.contains("1 to 32"), "{msg}");
        }
        for good in ["r1", "A.b_c-9", &"x".repeat(32)] {
            let mut c = cfg(ReaderKind::Stdin);
            c.id = good.to_owned();
            assert_eq!(c.validate(), Ok(()), "{good}");
        }
    }

    #[test]
    fn resolve_paths_against_config_dir() {
        let mut c = cfg(ReaderKind::Fifo);
        c.path = Some("run/swipes".into());
        c.resolve_paths(Path::new("/etc/agent/agent.toml"));
        assert_eq!(c.path.as_deref(), Some(Path::new("/etc/agent/run/swipes")));
        c.path = Some("/abs/x".into());
        c.resolve_paths(Path::new("/etc/agent/agent.toml"));
        assert_eq!(c.path.as_deref(), Some(Path::new("/abs/x")));
        c.path = Some("x".into());
        c.resolve_paths(Path::new("agent.toml"));
        let p = c.path.clone().unwrap();
        assert!(p.is_absolute() && p.ends_with("x"), "{}", p.display());
        let mut n = cfg(ReaderKind::Stdin);
        n.resolve_paths(Path::new("/etc/agent/agent.toml"));
        assert_eq!(n.path, None);
    }

    #[tokio::test]
    async fn invalid_config_returns_at_once() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let ms = Duration::from_millis;
        run(
            cfg(ReaderKind::Fifo),
            tx,
            CancellationToken::new(),
            ms(1),
            ms(2),
        )
        .await;
    }
}
