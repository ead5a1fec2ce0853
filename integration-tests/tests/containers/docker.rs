//! The container side of the harness, driven through the `docker` CLI: one ephemeral
//! network per test (internal, its own /24, removed with every container on it when the
//! test ends, failed or not), containers from the `FROM scratch` images of
//! `deploy/images/build.sh`, their logs, and the fault actions (kill, restart, cut off).
//!
//! Waiting is always on what a container reports (its log, a reply over the network),
//! polled with a bounded deadline, never on a fixed sleep.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use integration_tests::{bin, workspace_root};

/// Bound on any single wait for a container.
pub const WAIT: Duration = Duration::from_secs(60);

/// How often a wait looks at the logs again.
const POLL: Duration = Duration::from_millis(100);

/// Label put on everything a test creates, valued with the network's name.
const LABEL: &str = "scm-hub-test";

/// Runs `docker ARGS`; returns (success, stdout, stderr).
pub fn docker(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `docker ARGS` and panics with its output when it fails; returns stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let (ok, out, err) = docker(args);
    assert!(ok, "docker {args:?} failed:\n{out}{err}");
    out
}

/// Whether this test should run: the harness is switched on (`SCM_CONTAINER_TESTS=1`,
/// as `.ci/run` does) and a Docker engine answers. Otherwise prints why it is skipped.
pub fn enabled(test: &str) -> bool {
    if std::env::var("SCM_CONTAINER_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED {test}: the multi-container harness runs only with SCM_CONTAINER_TESTS=1 (.ci/run sets it when a Docker engine is available)"
        );
        return false;
    }
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED {test}: no Docker engine (docker info: {})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: no docker command ({e})");
            false
        }
    }
}

/// The image tag to run: `SCM_IMAGES_TAG` when the images were built beforehand (as
/// `.ci/run` does), otherwise `test`, built here once per test process from the debug
/// binaries (serialised between processes with flock; unchanged binaries are not
/// rebuilt).
pub fn images() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        if let Ok(tag) = std::env::var("SCM_IMAGES_TAG") {
            return tag;
        }
        let scm = bin("scm");
        let bin_dir = scm.parent().map(Path::to_path_buf).unwrap_or_default();
        let script = workspace_root().join("deploy/images/build.sh");
        let out = Command::new("flock")
            .arg(std::env::temp_dir().join("scm-hub-images.lock"))
            .arg(&script)
            .env("TAG", "test")
            .env("BIN_DIR", &bin_dir)
            .env("NO_CARGO", "1")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "building the images failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        "test".to_string()
    })
}

/// One test's Docker network. Dropping it removes every container on it (printing their
/// logs first when the test is failing) and then the network.
#[derive(Debug)]
pub struct Network {
    /// The network's name, unique per test run.
    pub name: String,
    /// The first three octets of its /24, e.g. `10.213.7`.
    pub prefix: String,
}

impl Network {
    /// Creates an internal network (no way out of it) with a free /24 of 10.213.0.0/16.
    pub fn new(test: &str) -> Network {
        let name = format!(
            "scmt-{}-{}-{:04x}",
            test.chars().take(20).collect::<String>(),
            std::process::id(),
            rand::random::<u16>()
        );
        let mut last = String::new();
        for _ in 0..20 {
            let third = rand::random_range(1u16..=254);
            let prefix = format!("10.213.{third}");
            let subnet = format!("{prefix}.0/24");
            // Fixed addresses below .128; one-off containers get theirs from the upper half.
            let range = format!("{prefix}.128/25");
            let (ok, _, err) = docker(&[
                "network",
                "create",
                "--internal",
                "--subnet",
                &subnet,
                "--ip-range",
                &range,
                "--label",
                &format!("{LABEL}={name}"),
                &name,
            ]);
            if ok {
                return Network { name, prefix };
            }
            last = err;
        }
        panic!("cannot create a docker network for {test}: {last}");
    }

    /// The address `.n` of this network.
    pub fn ip(&self, n: u8) -> String {
        format!("{}.{n}", self.prefix)
    }

    /// Every container this test created, by name.
    pub fn containers(&self) -> Vec<String> {
        docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label={LABEL}={}", self.name),
            "--format",
            "{{.Names}}",
        ])
        .1
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// `docker logs` of every container of this test, for failure messages.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for c in self.containers() {
            let (_, o, e) = docker(&["logs", "--timestamps", &c]);
            out.push_str(&format!(
                "----- docker logs {c} (stderr) -----\n{e}\n----- docker logs {c} (stdout) -----\n{o}\n"
            ));
        }
        out
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.all_logs());
        }
        let names = self.containers();
        if !names.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(names.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// How to start one container.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name, also its host name and DNS alias on the network (`scm`, `agent-1`).
    pub name: String,
    /// Image name without the tag (`scm-hub/scm`).
    pub image: String,
    /// Last octet of its address.
    pub host: u8,
    /// Arguments after the entry point.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Host directory mounted at /fleet.
    pub fleet_dir: PathBuf,
    /// Extra `docker run` options (e.g. a memory limit).
    pub extra: Vec<String>,
}

impl Spec {
    /// A container of `image` named `name` at `.host`, with the fleet directory.
    pub fn new(name: &str, image: &str, host: u8, fleet_dir: &Path) -> Spec {
        Spec {
            name: name.into(),
            image: image.into(),
            host,
            args: Vec::new(),
            env: vec![
                ("RUST_LOG".into(), "info".into()),
                ("NO_COLOR".into(), "1".into()),
            ],
            fleet_dir: fleet_dir.to_path_buf(),
            extra: Vec::new(),
        }
    }

    /// Adds arguments.
    pub fn args(mut self, args: &[&str]) -> Spec {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Spec {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// A container of a test's network.
#[derive(Debug, Clone)]
pub struct Container {
    /// Short name (`scm`).
    pub name: String,
    /// Docker's name for it (network name + short name).
    pub id: String,
    /// Its address.
    pub ip: String,
    /// The network.
    pub net: String,
}

impl Container {
    /// Starts a container for `spec` on `net`: read-only root, no capabilities, no new
    /// privileges, running as the calling user (so it can read the fleet directory's
    /// keys), with the fleet directory at /fleet.
    pub fn run(net: &Network, spec: &Spec) -> Container {
        let id = format!("{}-{}", net.name, spec.name);
        let ip = net.ip(spec.host);
        let user = format!("{}:{}", uid(), gid());
        let mount = format!("{}:/fleet", spec.fleet_dir.display());
        let label = format!("{LABEL}={}", net.name);
        let image = format!("{}:{}", spec.image, images());
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &id,
            "--hostname",
            &spec.name,
            "--network",
            &net.name,
            "--network-alias",
            &spec.name,
            "--ip",
            &ip,
            "--label",
            &label,
            "--user",
            &user,
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--volume",
            &mount,
            "--workdir",
            "/fleet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (k, v) in &spec.env {
            args.push("--env".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(spec.extra.iter().cloned());
        args.push(image);
        args.extend(spec.args.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs);
        Container {
            name: spec.name.clone(),
            id,
            ip,
            net: net.name.clone(),
        }
    }

    /// (stdout, stderr) of the container so far, across restarts.
    pub fn logs(&self) -> (String, String) {
        let (_, o, e) = docker(&["logs", &self.id]);
        (o, e)
    }

    /// The container's log (its stderr: the binaries log there).
    pub fn log(&self) -> String {
        self.logs().1
    }

    /// The container's standard output.
    pub fn stdout(&self) -> String {
        self.logs().0
    }

    /// Waits until its log holds `needle` `count` times; returns the last such line.
    pub fn wait_for_n(&self, needle: &str, count: usize) -> String {
        self.wait_in(needle, count, false)
    }

    /// Waits until its log holds `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_n(needle, 1)
    }

    /// Waits until its standard output holds `needle` `count` times.
    pub fn wait_stdout_n(&self, needle: &str, count: usize) -> String {
        self.wait_in(needle, count, true)
    }

    fn wait_in(&self, needle: &str, count: usize, stdout: bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let (o, e) = self.logs();
            let text = if stdout { o } else { e };
            if text.matches(needle).count() >= count {
                return text
                    .lines()
                    .rfind(|l| l.contains(needle))
                    .unwrap_or_default()
                    .to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{}: {needle:?} (x{count}) not in its {} within {WAIT:?}",
                self.name,
                if stdout { "stdout" } else { "log" }
            );
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL, without removing it.
    pub fn kill(&self) {
        docker_ok(&["kill", &self.id]);
    }

    /// Starts it again after a kill or stop (same address, same mounts).
    pub fn start(&self) {
        docker_ok(&["start", &self.id]);
    }

    /// SIGTERM, then start again.
    pub fn restart(&self) {
        docker_ok(&["restart", "--time", "10", &self.id]);
    }

    /// Removes it (after a kill), so a new one may take its name and address.
    pub fn remove(&self) {
        docker_ok(&["rm", "-f", &self.id]);
    }

    /// Cuts it off its network (its links hang or fail; nothing is closed cleanly).
    pub fn disconnect(&self) {
        docker_ok(&["network", "disconnect", "--force", &self.net, &self.id]);
    }

    /// Connects it again, at its old address and under its old name.
    pub fn reconnect(&self) {
        docker_ok(&[
            "network", "connect", "--ip", &self.ip, "--alias", &self.name, &self.net, &self.id,
        ]);
    }

    /// Whether it is running.
    pub fn running(&self) -> bool {
        docker(&["inspect", "--format", "{{.State.Running}}", &self.id])
            .1
            .trim()
            == "true"
    }

    /// Its main process's id on the host, if it runs.
    pub fn host_pid(&self) -> Option<u32> {
        docker(&["inspect", "--format", "{{.State.Pid}}", &self.id])
            .1
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
    }

    /// Memory in use as `docker stats` reports it, in bytes.
    pub fn stats_memory(&self) -> Option<u64> {
        let out = docker(&[
            "stats",
            "--no-stream",
            "--format",
            "{{.MemUsage}}",
            &self.id,
        ])
        .1;
        parse_size(out.split('/').next()?.trim())
    }

    /// Resident memory of its main process (VmRSS from /proc), in bytes.
    pub fn rss(&self) -> Option<u64> {
        let pid = self.host_pid()?;
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    }
}

/// Parses docker's sizes: `12.5MiB`, `900KiB`, `1.2GiB`, `512B`.
pub fn parse_size(s: &str) -> Option<u64> {
    let units = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("kB", 1_000),
        ("B", 1),
    ];
    for (u, m) in units {
        if let Some(n) = s.strip_suffix(u) {
            let v: f64 = n.trim().parse().ok()?;
            return Some((v * m as f64) as u64);
        }
    }
    None
}

fn id_of(flag: &str) -> String {
    Command::new("id")
        .arg(flag)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "0".into())
}

/// The calling user's id.
pub fn uid() -> String {
    id_of("-u")
}

/// The calling user's group id.
pub fn gid() -> String {
    id_of("-g")
}
