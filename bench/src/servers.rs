//! Starting and stopping the servers under test, each pinned to CPU 0 with `taskset` (at
//! `nice -15` when the benchmark may raise priority): the real `scm serve` (its listeners
//! found from its `listening on ADDR (NAME)` lines) and Debian's `mosquitto` (ready when
//! its port accepts TCP).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use scm_common::lock::LockExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A running server.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Listener addresses by name (`agents`, `telnet-tls`, `generic 3/r1`, `mqtt`).
    pub addrs: HashMap<String, String>,
    /// Warnings and errors the server printed (kept for the report, bounded).
    pub log_tail: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// How servers are started.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `scm` binary.
    pub scm_bin: PathBuf,
    /// The `mosquitto` binary.
    pub mosquitto_bin: PathBuf,
    /// CPU the server is pinned to.
    pub server_cpu: String,
    /// Whether to run the server at nice -15 (needs root).
    pub renice: bool,
}

impl Launch {
    fn command(&self, program: &Path) -> Command {
        let mut c = if self.renice {
            let mut c = Command::new("nice");
            c.args(["-n", "-15", "taskset", "-c", &self.server_cpu]);
            c.arg(program);
            c
        } else {
            let mut c = Command::new("taskset");
            c.args(["-c", &self.server_cpu]);
            c.arg(program);
            c
        };
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Starts `scm serve --config FILE` and waits until it has logged every listener in
    /// `expect` (by name).
    pub async fn scm(&self, config: &Path, expect: usize) -> anyhow::Result<Server> {
        let mut c = self.command(&self.scm_bin);
        c.arg("serve").arg("--config").arg(config);
        // As Mosquitto runs with `log_type error/warning` and no connection messages, the
        // SCM logs warnings and errors only, plus its `listening on` lines.
        c.env("RUST_LOG", "warn,scm_common::serve=info");
        let mut child = c.spawn().context("cannot start scm")?;
        let pid = child.id().context("scm exited at once")?;
        let (tx, mut rx) = mpsc::channel::<String>(1024);
        let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if l.contains("listening on") {
                        let _ = tx.send(l).await;
                    } else {
                        let mut t = tail.lock_unpoisoned();
                        if t.len() < 200 {
                            t.push(l);
                        }
                    }
                }
            });
        }
        drop(tx);
        let mut addrs = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while addrs.len() < expect {
            let line = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "scm did not report {expect} listeners within 60 s (got {addrs:?}); its log: {:?}",
                        tail.lock().map(|t| t.clone()).unwrap_or_default()
                    )
                })?;
            let Some(line) = line else {
                bail!(
                    "scm exited before it was ready; its log: {:?}",
                    tail.lock().map(|t| t.clone()).unwrap_or_default()
                );
            };
            if let Some((addr, name)) = parse_listening(&line) {
                addrs.insert(name, addr);
            }
        }
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        Ok(Server {
            child,
            pid,
            addrs,
            log_tail: tail,
        })
    }

    /// Starts `mosquitto -c FILE` and waits until `addr` accepts TCP connections.
    pub async fn mosquitto(&self, config: &Path, addr: &str) -> anyhow::Result<Server> {
        let mut c = self.command(&self.mosquitto_bin);
        c.arg("-c").arg(config);
        let mut child = c.spawn().context("cannot start mosquitto")?;
        let pid = child.id().context("mosquitto exited at once")?;
        let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let mut t = tail.lock_unpoisoned();
                    if t.len() < 200 {
                        t.push(l);
                    }
                }
            });
        }
        wait_tcp(addr, &mut child, &tail).await?;
        let mut addrs = HashMap::new();
        addrs.insert("mqtt".to_string(), addr.to_string());
        Ok(Server {
            child,
            pid,
            addrs,
            log_tail: tail,
        })
    }
}

/// Polls `addr` until it accepts a TCP connection (bounded: 30 s), failing early if the
/// process exits.
async fn wait_tcp(
    addr: &str,
    child: &mut Child,
    tail: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(status) = child.try_wait()? {
            bail!(
                "mosquitto exited with {status}; its log: {:?}",
                tail.lock().map(|t| t.clone()).unwrap_or_default()
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("mosquitto did not accept connections on {addr} within 30 s")
}

fn parse_listening(line: &str) -> Option<(String, String)> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let (addr, rest) = rest.split_once(" (")?;
    let name = rest.split_once(')')?.0;
    Some((addr.trim().to_string(), name.to_string()))
}

impl Server {
    /// The address of the listener `name`.
    pub fn addr(&self, name: &str) -> anyhow::Result<String> {
        self.addrs
            .get(name)
            .cloned()
            .with_context(|| format!("the server did not report a `{name}` listener"))
    }

    /// CPU time used so far, ms.
    pub fn cpu_ms(&self) -> f64 {
        crate::sys::proc_cpu_ms(self.pid)
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        crate::sys::proc_rss_kib(self.pid)
    }

    /// The process that does the work: `nice` and `taskset` exec into the server, so it
    /// is the same process.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Stops the server with SIGKILL (the reconnect storm) and waits for it.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn listening_lines_are_parsed() {
        let l = "2026-12-02T14:00:00Z INFO scm_common::serve: listening on 127.0.0.1:4242 (generic 3/r1)";
        assert_eq!(
            super::parse_listening(l),
            Some(("127.0.0.1:4242".into(), "generic 3/r1".into()))
        );
    }
}
