//! The swipe side of the 241 bridge: swipe URL templates and a minimal HTTPS GET client.
//!
//! A template is an `https://` URL whose path and query may hold the placeholders
//! `{card}`, `{device}` (the MAC-style device id), `{time}` (Unix seconds), `{time_ms}`,
//! `{machine}`, `{reader}` and `{event}` (the swipe's event id: the same on every attempt
//! of one swipe, so a print server can drop a retried request it already took). Each value is percent-encoded when it is put in, so a card
//! number can never add a parameter or change the path.
//!
//! The client sends exactly one `GET` per TLS connection (`Connection: close`), from the
//! device's own address when it has one (a print server may tell readers apart by the
//! source address), verifies the server's certificate against the configured CA or pin
//! only (there is no way to turn that off, see [`super::pin`]), reads at most [`MAX_RESPONSE_HEAD`] bytes of the response head and never reads
//! the body. It does not follow redirects: a `3xx` is reported with its `Location` host.

use std::sync::Arc;
use std::time::Duration;

use std::net::{IpAddr, SocketAddr};

use rustls::ClientConfig;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::http::{self, Parse, percent_encode};

/// Largest response head read from a print server.
pub(crate) const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The placeholders a template may use.
pub(crate) const PLACEHOLDERS: &[&str] = &[
    "card", "device", "time", "time_ms", "machine", "reader", "event",
];

/// Longest template.
pub(crate) const MAX_TEMPLATE: usize = 2048;

/// Where a rendered swipe URL points.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path and query, sent as the request target.
    pub path_and_query: String,
}

impl std::fmt::Debug for Target {
    // The query carries the card number: only host and port are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({}:{})", self.host, self.port)
    }
}

impl Target {
    /// `host:port` as the `Host` header wants it.
    pub(crate) fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Values for the placeholders.
#[derive(Clone)]
pub(crate) struct Vars<'a> {
    /// Card number.
    pub card: &'a str,
    /// MAC-style device id.
    pub device: &'a str,
    /// Unix milliseconds of the attempt.
    pub time_ms: i64,
    /// Machine id.
    pub machine: u16,
    /// Reader id.
    pub reader: &'a str,
    /// The swipe's event id (the same on every attempt).
    pub event: &'a str,
}

impl std::fmt::Debug for Vars<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vars")
            .field("card", &scm_common::card::mask(self.card))
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// What is wrong with a swipe URL template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateError {
    /// Not `https://...` (the start of the URL).
    #[error("{0:?} is not an https:// URL; swipes are only sent over HTTPS")]
    NotHttps(String),
    /// `user:password@` in the authority.
    #[error("user names or passwords in the swipe URL are not supported")]
    UserInfo,
    /// A placeholder in the host.
    #[error("placeholders are only allowed in the path and query, not the host")]
    PlaceholderInHost,
    /// `[` without `]`.
    #[error("unterminated '[' in the host")]
    UnterminatedBracket,
    /// Something other than `:port` after `]`.
    #[error("junk after ']' in the host")]
    JunkAfterBracket,
    /// No host at all.
    #[error("the swipe URL has no host")]
    NoHost,
    /// A host that is neither a name nor an address.
    #[error("{0:?} is not a valid host name or IP address in the swipe URL")]
    BadHost(String),
    /// A port that is not 1-65535.
    #[error("{0:?} is not a port number (1-65535)")]
    BadPort(String),
    /// Longer than [`MAX_TEMPLATE`].
    #[error("the swipe URL is longer than {MAX_TEMPLATE} bytes")]
    TooLong,
    /// A character that must be percent-encoded.
    #[error(
        "the swipe URL contains {0:?}; use printable ASCII without spaces (percent-encode the rest)"
    )]
    BadChar(char),
    /// A `#fragment`.
    #[error("the swipe URL must not have a #fragment")]
    Fragment,
    /// `}` without `{`.
    #[error("a '}}' without '{{' in the swipe URL")]
    UnmatchedClose,
    /// `{` without `}`.
    #[error("a '{{' without '}}' in the swipe URL")]
    UnmatchedOpen,
    /// A placeholder that does not exist.
    #[error("unknown placeholder {{{0}}} in the swipe URL; use {list}", list = placeholder_list())]
    UnknownPlaceholder(String),
    /// A literal `%` that is not a valid escape.
    #[error("the swipe URL has {0}")]
    Escape(http::DecodeError),
}

fn placeholder_list() -> String {
    PLACEHOLDERS
        .iter()
        .map(|p| format!("{{{p}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Splits an `https://` URL into host, port and the rest; the rest keeps its placeholders.
fn split_url(url: &str) -> Result<(String, u16, String), TemplateError> {
    let Some(rest) = url
        .get(..8)
        .filter(|s| s.eq_ignore_ascii_case("https://"))
        .map(|_| &url[8..])
    else {
        return Err(TemplateError::NotHttps(trunc(url)));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err(TemplateError::UserInfo);
    }
    if authority.contains(['{', '}']) {
        return Err(TemplateError::PlaceholderInHost);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(TemplateError::UnterminatedBracket);
        };
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(TemplateError::JunkAfterBracket)?),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(TemplateError::NoHost);
    }
    if ServerName::try_from(host.clone()).is_err() {
        return Err(TemplateError::BadHost(host));
    }
    let port = match port {
        None => 443,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| TemplateError::BadPort(p.to_string()))?,
    };
    let tail = if tail.starts_with('?') || tail.is_empty() {
        format!("/{tail}")
    } else {
        tail.to_string()
    };
    Ok((host.to_ascii_lowercase(), port, tail))
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Checks a swipe URL template; the message says what is wrong.
pub(crate) fn validate_template(t: &str) -> Result<(), TemplateError> {
    if t.len() > MAX_TEMPLATE {
        return Err(TemplateError::TooLong);
    }
    if let Some(c) = t.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(TemplateError::BadChar(c));
    }
    if t.contains('#') {
        return Err(TemplateError::Fragment);
    }
    let (_, _, tail) = split_url(t)?;
    let mut rest = tail.as_str();
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(TemplateError::UnmatchedClose);
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(TemplateError::UnmatchedOpen);
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(TemplateError::UnknownPlaceholder(name.to_string()));
        }
        rest = &after[close + 1..];
    }
    // Literal percent signs must already be valid escapes.
    http::percent_decode(&tail.replace(['{', '}'], ""), false)
        .map(drop)
        .map_err(TemplateError::Escape)
}

/// Renders a (validated) template with the swipe's values.
pub(crate) fn render(t: &str, v: &Vars<'_>) -> Result<Target, TemplateError> {
    validate_template(t)?;
    let (host, port, tail) = split_url(t)?;
    let mut out = String::with_capacity(tail.len() + 64);
    let mut rest = tail.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').unwrap_or(after.len());
        let value = match &after[..close] {
            "card" => percent_encode(v.card),
            "device" => percent_encode(v.device),
            "time" => (v.time_ms.div_euclid(1000)).to_string(),
            "time_ms" => v.time_ms.to_string(),
            "machine" => v.machine.to_string(),
            "reader" => percent_encode(v.reader),
            "event" => percent_encode(v.event),
            other => return Err(TemplateError::UnknownPlaceholder(other.to_string())),
        };
        out.push_str(&value);
        rest = after.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(Target {
        host,
        port,
        path_and_query: out,
    })
}

/// Why one attempt to send a swipe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AttemptError {
    /// TCP connect failed (refused, unreachable, name not found).
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The print server's certificate did not verify against the configured CA.
    #[error(
        "the print server's certificate was not accepted: {0}; check [rfideas_bridge] ca and the print server's certificate"
    )]
    Certificate(String),
    /// Another TLS failure.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No connection or no answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The connection failed after the handshake.
    #[error("connection failed: {0}")]
    Io(String),
    /// The answer was not an HTTP/1.x response.
    #[error("the print server's answer is not HTTP/1.x: {0}")]
    Protocol(String),
}

impl AttemptError {
    /// Whether retrying within the swipe's lifetime could help.
    pub(crate) fn retryable(&self) -> bool {
        !matches!(self, Self::Certificate(_))
    }

    /// A short fixed label for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Certificate(_) => "certificate",
            Self::Tls(_) => "tls",
            Self::Timeout(_) => "timeout",
            Self::Io(_) => "io",
            Self::Protocol(_) => "protocol",
        }
    }
}

/// The print server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    /// Status code.
    pub status: u16,
    /// `Location`, for redirects.
    pub location: Option<String>,
}

/// The crypto provider of every 241 TLS connection.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client TLS configuration: ring, TLS 1.2 and 1.3, trusting what `verifier`
/// accepts (a CA chain or a pin, [`super::pin::PinnedVerifier`]), no client certificate.
pub(crate) fn tls_config(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Connects to the target, from `source` (port chosen by the system) when given: the
/// print server may identify the reader by the address its request comes from.
async fn connect(target: &Target, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect((target.host.as_str(), target.port)).await;
    };
    let mut last = None;
    for addr in tokio::net::lookup_host((target.host.as_str(), target.port)).await? {
        // Only an address of the source's family can be reached from it.
        if addr.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let sock = if source.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.bind(SocketAddr::new(source, 0))?;
        match sock.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("no address of the source's family (from {source})"),
        )
    }))
}

/// Sends one GET and reads the response head.
pub(crate) async fn get(
    tls: &tokio_rustls::TlsConnector,
    target: &Target,
    source: Option<IpAddr>,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<Answer, AttemptError> {
    let name = ServerName::try_from(target.host.clone())
        .map_err(|_| AttemptError::Connect(format!("bad host name {:?}", target.host)))?;
    let connect = async {
        let tcp = connect(target, source).await.map_err(|e| {
            let from = source.map(|s| format!(" from {s}")).unwrap_or_default();
            AttemptError::Connect(format!("{}{from}: {e}", target.authority()))
        })?;
        let _ = tcp.set_nodelay(true);
        tls.connect(name, tcp).await.map_err(classify_tls)
    };
    let mut stream = tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| {
            AttemptError::Timeout(format!(
                "no TLS connection to {} within {} ms",
                target.authority(),
                connect_timeout.as_millis()
            ))
        })??;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: SCM-RFIDeas-241-bridge/1\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        target.path_and_query,
        target.authority()
    );
    let exchange = async {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| AttemptError::Io(e.to_string()))?;
        stream
            .flush()
            .await
            .map_err(|e| AttemptError::Io(e.to_string()))?;
        let mut buf = vec![0u8; MAX_RESPONSE_HEAD];
        let mut have = 0;
        loop {
            match http::parse_response(&buf[..have], MAX_RESPONSE_HEAD) {
                Ok(Parse::Complete { head, .. }) => {
                    let location = http::header(&head.headers, "location")
                        .ok()
                        .flatten()
                        .map(str::to_string);
                    return Ok(Answer {
                        status: head.status,
                        location,
                    });
                }
                Ok(Parse::Partial) => {}
                Err(e) => return Err(AttemptError::Protocol(e.to_string())),
            }
            let n = stream.read(&mut buf[have..]).await.map_err(classify_tls)?;
            if n == 0 {
                return Err(AttemptError::Io(
                    "the print server closed the connection without an answer".into(),
                ));
            }
            have += n;
        }
    };
    tokio::time::timeout(response_timeout, exchange)
        .await
        .map_err(|_| {
            AttemptError::Timeout(format!(
                "no answer from {} within {} ms",
                target.authority(),
                response_timeout.as_millis()
            ))
        })?
}

fn classify_tls(e: std::io::Error) -> AttemptError {
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match inner {
            // A pin's own refusal carries a sentence; webpki's kinds read well as names.
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                AttemptError::Certificate(o.to_string())
            }
            rustls::Error::InvalidCertificate(c) => AttemptError::Certificate(format!("{c:?}")),
            other => AttemptError::Tls(other.to_string()),
        };
    }
    if e.kind() == std::io::ErrorKind::InvalidData {
        return AttemptError::Tls(e.to_string());
    }
    AttemptError::Io(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars<'static> {
        Vars {
            card: "AB 12&x=1/?#%",
            device: "02:53:43:00:01:72",
            time_ms: 1_700_000_000_123,
            machine: 1,
            reader: "r1",
            event: "1-7f/0",
        }
    }

    #[test]
    fn renders_with_every_value_escaped() {
        let t = render(
            "https://Print.Example:9192/rfid/{reader}?card={card}&mac={device}&t={time}&ms={time_ms}&m={machine}&e={event}",
            &vars(),
        )
        .unwrap();
        assert_eq!(t.host, "print.example");
        assert_eq!(t.port, 9192);
        assert_eq!(
            t.path_and_query,
            "/rfid/r1?card=AB%2012%26x%3D1%2F%3F%23%25&mac=02%3A53%3A43%3A00%3A01%3A72&t=1700000000&ms=1700000000123&m=1&e=1-7f%2F0"
        );
        assert_eq!(t.authority(), "print.example:9192");
        assert!(!format!("{t:?}").contains("AB"), "Debug hides the card");
        let t = render("https://[::1]?c={card}", &vars()).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 443));
        assert_eq!(t.authority(), "[::1]");
        assert!(t.path_and_query.starts_with("/?c="));
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        for (t, needle) in [
            ("http://h/?c={card}", "https://"),
            ("https://h/?c={cardd}", "unknown placeholder"),
            ("https://h/?c={card", "without '}'"),
            ("https://h/?c=card}", "without '{'"),
            ("https://{card}.h/", "not the host"),
            ("https://u:p@h/", "passwords"),
            ("https://h:0/", "port"),
            ("https://h:99999/", "port"),
            ("https:///x", "no host"),
            ("https://h/a b", "printable"),
            ("https://h/#x", "fragment"),
            ("https://h/%zz", "percent"),
            ("https://bad_host!/", "host"),
        ] {
            let e = validate_template(t).unwrap_err().to_string();
            assert!(e.contains(needle), "{t}: {e}");
        }
        validate_template("https://10.0.0.5:9192/?c={card}&d={device}").unwrap();
        validate_template("HTTPS://h").unwrap();
    }
}
