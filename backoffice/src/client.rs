//! The back office's side of the SCM's telnet dialogue: log in, send a command, and read
//! its reply (`<code> <text>`, with `<code>-` continuation lines), skipping the `scm> `
//! prompt that interactive users see. Uses our telnet codec in raw mode so prompts that
//! end without a newline are seen.

use std::time::Duration;

use scm_telnet::{Event, Mode, TelnetConn, consts};
use tokio::io::{AsyncRead, AsyncWrite};

/// The SCM's command prompt.
pub const PROMPT: &str = "scm> ";

/// A complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The 3-digit code of the final line.
    pub code: u16,
    /// Every line's text without its code.
    pub lines: Vec<String>,
}

impl Reply {
    /// The final line's text.
    pub fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }
}

/// Why talking to the SCM failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Telnet I/O.
    #[error("connection to the SCM failed: {0}")]
    Telnet(#[from] scm_telnet::ConnError),
    /// The SCM closed the connection.
    #[error("the SCM closed the connection")]
    Closed,
    /// No answer in time.
    #[error("no answer from the SCM within {0:?}")]
    Timeout(Duration),
    /// Login refused.
    #[error("login refused: {0}")]
    Login(String),
    /// Something other than the dialogue we expect.
    #[error("unexpected answer from the SCM: {0:?}")]
    Unexpected(String),
}

/// What the reader found next.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    Line(String),
    Prompt(String),
}

/// The code of the progress lines of a fleet push (`151-940/1000 ACK, ...`).
pub const PROGRESS: u16 = 151;

/// Parses `NNN text` / `NNN-text`; returns (code, is_last, text).
pub fn parse_reply_line(line: &str) -> Option<(u16, bool, &str)> {
    let b = line.as_bytes();
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code: u16 = line[..3].parse().ok()?;
    match b.get(3) {
        None => Some((code, true, "")),
        Some(b' ') => Some((code, true, &line[4..])),
        Some(b'-') => Some((code, false, &line[4..])),
        _ => None,
    }
}

/// A logged-in (or logging-in) session.
#[derive(Debug)]
pub struct Client<S> {
    conn: TelnetConn<S>,
    buf: Vec<u8>,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S, timeout: Duration) -> Self {
        let mut conn = TelnetConn::new(stream, Mode::Raw);
        conn.negotiator_mut().allow_him(consts::opt::ECHO, true);
        conn.negotiator_mut().allow_him(consts::opt::SGA, true);
        Self {
            conn,
            buf: Vec::new(),
            timeout,
        }
    }

    /// Next complete line, or a known prompt (text without newline).
    async fn next_chunk(&mut self) -> Result<Chunk, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                while matches!(line.last(), Some(b'\n' | b'\r' | b'\0')) {
                    line.pop();
                }
                let mut text = String::from_utf8_lossy(&line).into_owned();
                while let Some(rest) = text.strip_prefix(PROMPT) {
                    text = rest.to_string();
                }
                let text = text.trim_start_matches(['\r', '\0']).to_string();
                if text.is_empty() {
                    continue;
                }
                return Ok(Chunk::Line(text));
            }
            let pending = String::from_utf8_lossy(&self.buf).into_owned();
            for p in ["Username: ", "Password: "] {
                if pending.trim_start_matches(PROMPT).trim_start() == p {
                    self.buf.clear();
                    return Ok(Chunk::Prompt(p.to_string()));
                }
            }
            if self.buf.len() > 64 * 1024 {
                return Err(ClientError::Unexpected(
                    "reply line longer than 64 KiB".into(),
                ));
            }
            let ev = tokio::time::timeout(self.timeout, self.conn.next_event())
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))??;
            match ev {
                None => return Err(ClientError::Closed),
                Some(Event::Data(d)) => self.buf.extend_from_slice(&d),
                Some(Event::Line(l)) => {
                    self.buf.extend_from_slice(&l);
                    self.buf.push(b'\n');
                }
                Some(_) => {}
            }
        }
    }

    /// Reads one complete reply (continuation lines up to the final one).
    pub async fn read_reply(&mut self) -> Result<Reply, ClientError> {
        self.read_reply_progress(|_| {}).await
    }

    /// Reads one complete reply, handing `151-` progress lines to `progress` as they
    /// arrive instead of keeping them in the reply.
    pub async fn read_reply_progress(
        &mut self,
        mut progress: impl FnMut(&str),
    ) -> Result<Reply, ClientError> {
        let mut lines = Vec::new();
        loop {
            match self.next_chunk().await? {
                Chunk::Line(l) => match parse_reply_line(&l) {
                    Some((code, true, text)) => {
                        lines.push(text.to_string());
                        return Ok(Reply { code, lines });
                    }
                    Some((PROGRESS, false, text)) => progress(text),
                    Some((_, false, text)) => lines.push(text.to_string()),
                    None => lines.push(l),
                },
                Chunk::Prompt(p) => return Err(ClientError::Unexpected(p)),
            }
        }
    }

    /// Waits for the greeting and logs in with a password (`None`: the TLS port logs in by
    /// certificate). Returns the 230 reply.
    pub async fn login(
        &mut self,
        user: &str,
        password: Option<&str>,
    ) -> Result<Reply, ClientError> {
        let greeting = self.read_reply().await?;
        if greeting.code != 220 {
            return Err(ClientError::Login(format!(
                "{} {}",
                greeting.code,
                greeting.last()
            )));
        }
        let Some(password) = password else {
            let r = self.read_reply().await?;
            return if r.code == 230 {
                Ok(r)
            } else {
                Err(ClientError::Login(format!("{} {}", r.code, r.last())))
            };
        };
        loop {
            match self.next_chunk().await? {
                Chunk::Prompt(p) if p.starts_with("Username") => self.conn.send_line(user).await?,
                Chunk::Prompt(p) if p.starts_with("Password") => {
                    self.conn.send_line(password).await?;
                    let r = self.read_reply().await?;
                    return if r.code == 230 {
                        Ok(r)
                    } else {
                        Err(ClientError::Login(format!("{} {}", r.code, r.last())))
                    };
                }
                Chunk::Line(l) => match parse_reply_line(&l) {
                    Some((code, true, text)) if code >= 400 => {
                        return Err(ClientError::Login(format!("{code} {text}")));
                    }
                    _ => {}
                },
                Chunk::Prompt(p) => return Err(ClientError::Unexpected(p)),
            }
        }
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, ClientError> {
        self.conn.send_line(line).await?;
        self.read_reply().await
    }

    /// Pushes a configuration to one machine: `push ID`, the dot-stuffed body, `.`;
    /// returns the final reply (250 ACK, 554 NACK, 450 pending, 5xx refused).
    pub async fn push(&mut self, machine: u16, content: &str) -> Result<Reply, ClientError> {
        self.push_to(&machine.to_string(), content, |_| {}).await
    }

    /// Pushes a configuration to a target (`7`, `group:NAME`, `label:TEXT`, `all`);
    /// progress lines of a fleet push go to `progress` as they arrive.
    pub async fn push_to(
        &mut self,
        target: &str,
        content: &str,
        progress: impl FnMut(&str),
    ) -> Result<Reply, ClientError> {
        let r = self.command(&format!("push {target}")).await?;
        if r.code != 354 {
            return Ok(r);
        }
        for line in content.lines() {
            if line.starts_with('.') {
                self.conn.send_line(&format!(".{line}")).await?;
            } else {
                self.conn.send_line(line).await?;
            }
        }
        self.conn.send_line(".").await?;
        self.read_reply_progress(progress).await
    }

    /// Ends the session politely.
    pub async fn quit(&mut self) -> Result<(), ClientError> {
        let _ = self.command("quit").await?;
        Ok(())
    }

    /// The underlying telnet connection (for the interactive shell).
    pub fn conn_mut(&mut self) -> &mut TelnetConn<S> {
        &mut self.conn
    }

    /// Bytes received but not consumed yet.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn reply_lines() {
        assert_eq!(parse_reply_line("250 ok"), Some((250, true, "ok")));
        assert_eq!(parse_reply_line("250-more"), Some((250, false, "more")));
        assert_eq!(parse_reply_line("250"), Some((250, true, "")));
        assert_eq!(parse_reply_line("25 x"), None);
        assert_eq!(parse_reply_line("abc def"), None);
        assert_eq!(parse_reply_line("2500"), None);
    }

    #[tokio::test]
    async fn login_and_push_dialogue() {
        let (a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            b.write_all(b"220 ready\r\nUsername: ").await.unwrap();
            let read_line = async |b: &mut tokio::io::DuplexStream| {
                let mut line = Vec::new();
                loop {
                    let c = b.read_u8().await.unwrap();
                    if c == 0xff {
                        // A negotiation answer (IAC verb option): not part of the line.
                        b.read_u8().await.unwrap();
                        b.read_u8().await.unwrap();
                        continue;
                    }
                    if c == b'\n' {
                        break;
                    }
                    if c != b'\r' {
                        line.push(c);
                    }
                }
                String::from_utf8_lossy(&line).into_owned()
            };
            got.push(read_line(&mut b).await);
            b.write_all(b"\xff\xfb\x01Password: ").await.unwrap();
            got.push(read_line(&mut b).await);
            b.write_all(b"\xff\xfc\x01\r\n230 logged in\r\nscm> ")
                .await
                .unwrap();
            got.push(read_line(&mut b).await);
            b.write_all(b"354 go\r\n").await.unwrap();
            for _ in 0..3 {
                got.push(read_line(&mut b).await);
            }
            b.write_all(b"250-first\r\n250 ACK machine 4\r\nscm> ")
                .await
                .unwrap();
            got
        });
        let mut c = Client::new(a, Duration::from_secs(5));
        let r = c.login("alice", Some("pw")).await.unwrap();
        assert_eq!(r.code, 230);
        let r = c.push(4, "a=1\n.hidden\n").await.unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, vec!["first", "ACK machine 4"]);
        let got = server.await.unwrap();
        assert_eq!(got, ["alice", "pw", "push 4", "a=1", "..hidden", "."]);
    }
}
