//! Malformed-input tables: data files under `integration-tests/tables/` (one per protocol)
//! that list what a hostile or careless peer sends and what the service must answer. The
//! end-to-end tests run every case against the real binaries; `table-seeds` turns the same
//! bytes into seed corpora for the fuzz targets.
//!
//! A table is TOML: `cases = [ { name = "...", send = '...', expect = "..." , ... }, ... ]`.
//! `send` (and `body`) are literal strings with these escapes, so that any byte can be
//! written: `\r` `\n` `\t` `\0` `\\`, `\xHH` (one byte), and `\{N:HH..}` (N copies of the
//! bytes HH.., for long inputs). Which other fields a case uses depends on the protocol; unknown
//! fields are refused, so a typo cannot silently weaken a case.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One table file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// The cases, in order.
    pub cases: Vec<Case>,
}

/// One case. `name`, `send` and `expect` are common; the rest is per protocol.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case is about (unique in its table).
    pub name: String,
    /// The bytes sent, escaped (see the module docs).
    #[serde(default)]
    pub send: String,
    /// The expected answer; its meaning is per protocol.
    pub expect: String,
    /// Frames: which port (`agent` or `config`); admin API: `raw` or `grpc`.
    #[serde(default)]
    pub port: Option<String>,
    /// Expected text: a substring of the NACK text/detail, reply or response.
    #[serde(default)]
    pub text: Option<String>,
    /// Frames: expected version-1 NACK reason (`Malformed`, `UnknownCode`, ...).
    #[serde(default)]
    pub reason: Option<String>,
    /// Frames: expected request id in a version-1 answer.
    #[serde(default)]
    pub request_id: Option<u64>,
    /// What happens to the connection afterwards: `open` or `closed`.
    #[serde(default)]
    pub then: Option<String>,
    /// Answers to read and skip before the checked one.
    #[serde(default)]
    pub skip: Option<usize>,
    /// Half-close (send FIN) after sending.
    #[serde(default)]
    pub eof: bool,
    /// Telnet: the case runs before login (at the `Username:` prompt).
    #[serde(default)]
    pub before_login: bool,
    /// Source address (a loopback address) to connect from.
    #[serde(default)]
    pub from: Option<String>,
    /// Admin API (gRPC): request path, method and headers `name: value`.
    #[serde(default)]
    pub path: Option<String>,
    /// Admin API (gRPC): HTTP method (default `POST`).
    #[serde(default)]
    pub method: Option<String>,
    /// Admin API (gRPC): extra or replacing headers, `name: value`.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Admin API (gRPC): the request body, escaped like `send`.
    #[serde(default)]
    pub body: Option<String>,
}

impl Case {
    /// The decoded `send` bytes.
    pub fn bytes(&self) -> Vec<u8> {
        unescape(&self.send).unwrap_or_else(|e| panic!("case {:?}: send: {e}", self.name))
    }

    /// The decoded `body` bytes (empty when absent).
    pub fn body_bytes(&self) -> Vec<u8> {
        self.body
            .as_deref()
            .map(|b| unescape(b).unwrap_or_else(|e| panic!("case {:?}: body: {e}", self.name)))
            .unwrap_or_default()
    }
}

/// The directory holding the tables.
pub fn dir() -> PathBuf {
    crate::workspace_root().join("integration-tests/tables")
}

/// Every table file name (without `.toml`) in the directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".toml"))
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

/// Loads table `name` (`frames`, `telnet`, ...) from `dir`; panics with the reason if it is
/// missing, unreadable, has no cases or two cases with one name.
pub fn load_from(dir: &Path, name: &str) -> Table {
    let path = dir.join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("table {} not found: {e}", path.display()));
    let table: Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("table {}: {e}", path.display()));
    assert!(
        !table.cases.is_empty(),
        "table {} has no cases",
        path.display()
    );
    let mut seen = std::collections::HashSet::new();
    for c in &table.cases {
        assert!(
            seen.insert(c.name.as_str()),
            "table {}: case name {:?} used twice",
            path.display(),
            c.name
        );
        let _ = c.bytes();
        let _ = c.body_bytes();
    }
    table
}

/// Loads table `name` from [`dir`].
pub fn load(name: &str) -> Table {
    load_from(&dir(), name)
}

/// Decodes the escapes of the module docs.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    let hex = |h: &str| u8::from_str_radix(h, 16).map_err(|_| format!("bad hex byte {h:?}"));
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let h: String = chars.by_ref().take(2).collect();
                out.push(hex(&h)?);
            }
            Some('{') => {
                let spec: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let short: String = spec.chars().take(40).collect();
                let (n, h) = spec
                    .split_once(':')
                    .ok_or_else(|| format!("bad repeat {short:?}...; write \\{{N:HH..}}"))?;
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("bad count in {short:?}..."))?;
                if h.is_empty() || h.len() % 2 != 0 || n.saturating_mul(h.len() / 2) > 4 << 20 {
                    return Err(format!("bad repeat {short:?}...: N:HH.., 4 MiB at most"));
                }
                let unit = (0..h.len())
                    .step_by(2)
                    .map(|i| hex(&h[i..i + 2]))
                    .collect::<Result<Vec<u8>, String>>()?;
                for _ in 0..n {
                    out.extend_from_slice(&unit);
                }
            }
            other => return Err(format!("unknown escape \\{}", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_decode() {
        assert_eq!(
            unescape(r"a\r\n\t\0\\\xff\{3:41}\{2:0d0a}é").unwrap(),
            b"a\r\n\t\0\\\xffAAA\r\n\r\n\xc3\xa9".to_vec()
        );
        assert!(unescape(r"\q").is_err());
        assert!(unescape(r"\xzz").is_err());
        assert!(unescape(r"\{3}").is_err());
    }

    #[test]
    fn every_table_loads_and_the_total_is_at_least_300() {
        let d = dir();
        let names = names(&d);
        for want in ["admin", "frames", "generic", "http241", "telnet"] {
            assert!(
                names.iter().any(|n| n == want),
                "table {want} missing in {names:?}"
            );
        }
        let total: usize = names.iter().map(|n| load_from(&d, n).cases.len()).sum();
        assert!(total >= 300, "only {total} cases in all tables");
    }
}
