//! The multi-container fault harness: the real binaries in `FROM scratch` containers on
//! one Docker network per test, and named scenarios that kill, restart and cut off
//! containers. Each scenario asserts its invariant only on what crosses the network (the
//! print-server simulator's input, replies to the back office and to a rogue agent) or
//! on what the system reports (`backoffice status`/`swipes`, the containers' logs, their
//! memory as Docker sees it).
//!
//! The tests run only with `SCM_CONTAINER_TESTS=1` and a Docker engine (`.ci/run` sets it
//! when `docker info` answers); otherwise each prints `SKIPPED ...` and passes. Container
//! logs of every container are printed with any failure. See docs/deployment.md.

mod docker;
mod faults;
mod rogue;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use docker::{Container, Network, Spec};
use integration_tests::{bin, run};

/// Last octets of the fleet's addresses on the test network.
pub const SCM_HOST: u8 = 10;
/// Agent `id` is at `.AGENT_BASE + id`.
pub const AGENT_BASE: u8 = 20;
/// The print-server simulator.
pub const PRINT_SERVER_HOST: u8 = 50;
/// A rogue agent.
pub const ROGUE_HOST: u8 = 60;
/// One-off back-office containers.
pub const BACKOFFICE_HOST: u8 = 70;

/// The ports `scm init-dev` writes.
pub const AGENT_PORT: u16 = 9300;
/// Plain telnet.
pub const TELNET_PORT: u16 = 2323;
/// Generic device of the first machine; one per machine, counting up.
pub const GENERIC_PORT: u16 = 7778;

/// A fleet in containers: the SCM, agents, optionally the print-server simulator.
#[derive(Debug)]
pub struct Fleet {
    /// The SCM.
    pub scm: Container,
    /// Agents by machine id.
    pub agents: Vec<(u16, Container)>,
    /// The print-server simulator, if started.
    pub print_server: Option<Container>,
    /// The admin password.
    pub password: String,
    /// Removes every container, then the network (declared before `dir` so the
    /// containers are gone before their mounted directory).
    pub net: Network,
    /// Holds the init-dev directory (mounted at /fleet in every container).
    pub dir: tempfile::TempDir,
}

/// What to start.
#[derive(Debug, Default)]
pub struct Setup<'a> {
    /// Machines in the SCM's configuration (and certificates in the fleet directory).
    pub machines: &'a [u16],
    /// Machines that get a real agent container.
    pub agents: &'a [u16],
    /// Extra SCM environment.
    pub scm_env: &'a [(&'a str, &'a str)],
    /// Extra environment for every agent.
    pub agent_env: &'a [(&'a str, &'a str)],
}

/// Extra environment for the SCM, common to all scenarios: short timeouts so faults show
/// within seconds.
pub fn scm_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("SCM__LOGIN__FAILURE_DELAY_MS", "20"),
        ("SCM__TIMEOUTS__PUSH_CONNECT_MS", "2000"),
        ("SCM__TIMEOUTS__PUSH_REPLY_MS", "5000"),
        ("SCM__TIMEOUTS__AGENT_IDLE_MS", "5000"),
        ("SCM__RETRY__INITIAL_MS", "500"),
        ("SCM__RETRY__MAX_MS", "3000"),
    ]
}

/// Extra environment for every agent: heartbeats every second, reconnects between 0.5
/// and 3 s (jittered).
pub fn agent_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AGENT__TIMEOUTS__HEARTBEAT_MS", "1000"),
        ("AGENT__TIMEOUTS__REPLY_MS", "3000"),
        ("AGENT__TIMEOUTS__RECONNECT_MIN_MS", "500"),
        ("AGENT__TIMEOUTS__RECONNECT_MAX_MS", "3000"),
    ]
}

impl Fleet {
    /// Writes the fleet directory for `machines` (with `init-dev --bind 0.0.0.0
    /// --scm-host scm --allow <print server>`) on a new network, starts nothing.
    pub fn init(test: &str, machines: &[u16]) -> (Network, tempfile::TempDir, String) {
        let net = Network::new(test);
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("fleet");
        let list = machines
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let (code, stdout, stderr) = run(
            &bin("scm"),
            &[
                "init-dev",
                "--out",
                out.to_str().expect("utf-8 path"),
                "--machines",
                &list,
                "--bind",
                "0.0.0.0",
                "--scm-host",
                "scm",
                "--allow",
                &net.ip(PRINT_SERVER_HOST),
            ],
            &[],
        );
        assert_eq!(code, 0, "init-dev failed: {stdout}{stderr}");
        let password = stdout
            .lines()
            .find_map(|l| l.strip_prefix("operator login: admin / "))
            .expect("init-dev prints the admin password")
            .trim()
            .to_string();
        (net, dir, password)
    }

    /// The SCM's container spec (`extra` environment added to [`scm_env`]).
    pub fn scm_spec(dir: &Path, extra: &[(&str, &str)]) -> Spec {
        let mut s = Spec::new("scm", "scm-hub/scm", SCM_HOST, &dir.join("fleet")).args(&[
            "serve",
            "--config",
            "/fleet/scm.toml",
        ]);
        for (k, v) in scm_env().into_iter().chain(extra.iter().copied()) {
            s = s.env(k, v);
        }
        s
    }

    /// Agent `id`'s container spec.
    pub fn agent_spec(dir: &Path, id: u16, extra: &[(&str, &str)]) -> Spec {
        let mut s = Spec::new(
            &format!("agent-{id}"),
            "scm-hub/machine-agent",
            AGENT_BASE + u8::try_from(id).expect("machine ids up to 200 in the harness"),
            &dir.join("fleet"),
        )
        .args(&["--config", &format!("/fleet/agent-{id}.toml")]);
        for (k, v) in agent_env().into_iter().chain(extra.iter().copied()) {
            s = s.env(k, v);
        }
        s
    }

    /// Starts the SCM and an agent for each of `machines`, and waits until every agent
    /// is connected (through the SCM's DNS name `scm`).
    pub fn start(test: &str, machines: &[u16]) -> Fleet {
        Fleet::start_with(
            test,
            &Setup {
                machines,
                agents: machines,
                ..Setup::default()
            },
        )
    }

    /// Starts the fleet `setup` describes.
    pub fn start_with(test: &str, setup: &Setup<'_>) -> Fleet {
        let (net, dir, password) = Fleet::init(test, setup.machines);
        let scm = Container::run(&net, &Fleet::scm_spec(dir.path(), setup.scm_env));
        scm.wait_for("(agents)");
        let agents: Vec<(u16, Container)> = setup
            .agents
            .iter()
            .map(|id| {
                let spec = Fleet::agent_spec(dir.path(), *id, setup.agent_env);
                (*id, Container::run(&net, &spec))
            })
            .collect();
        for (_, a) in &agents {
            a.wait_for("connected to SCM at scm:9300");
        }
        Fleet {
            scm,
            agents,
            print_server: None,
            password,
            net,
            dir,
        }
    }

    /// The host directory mounted at /fleet.
    pub fn fleet_dir(&self) -> PathBuf {
        self.dir.path().join("fleet")
    }

    /// The agent of machine `id`.
    pub fn agent(&self, id: u16) -> &Container {
        &self
            .agents
            .iter()
            .find(|(i, _)| *i == id)
            .expect("agent started")
            .1
    }

    /// Starts the print-server simulator against the Generic devices of `machines`
    /// (by the SCM's name) and waits until it is connected to all of them.
    pub fn start_print_server(&mut self, machines: &[u16]) -> &Container {
        let ports: Vec<String> = machines
            .iter()
            .map(|id| {
                let i = self
                    .agents
                    .iter()
                    .position(|(a, _)| a == id)
                    .unwrap_or(usize::from(*id) - 1);
                format!("scm:{}", usize::from(GENERIC_PORT) + i)
            })
            .collect();
        let mut spec = Spec::new(
            "print-server",
            "scm-hub/print-server-sim",
            PRINT_SERVER_HOST,
            &self.fleet_dir(),
        )
        .args(&["--keepalive-ms", "200"]);
        for p in &ports {
            spec = spec.args(&["--connect", p]);
        }
        let c = Container::run(&self.net, &spec);
        c.wait_stdout_n("CONNECTED", ports.len());
        self.print_server = Some(c);
        self.print_server.as_ref().expect("just set")
    }

    /// Runs the back office in a one-off container on the fleet's network; returns (exit
    /// code, stdout, stderr).
    pub fn backoffice(&self, args: &[&str]) -> (i32, String, String) {
        backoffice_in(&self.net, &self.fleet_dir(), args)
    }

    /// Starts a back-office command in the background (its output is captured).
    pub fn backoffice_spawn(&self, args: &[&str]) -> std::process::Child {
        backoffice_command(&self.net, &self.fleet_dir(), args)
            .spawn()
            .expect("run docker")
    }

    /// Writes `text` into the fleet directory as `name`; returns its path in containers.
    pub fn file(&self, name: &str, text: &str) -> String {
        std::fs::write(self.fleet_dir().join(name), text).expect("write a file");
        format!("/fleet/{name}")
    }

    /// Swipes `card` on reader r1 of `machine` (its FIFO in the mounted directory).
    pub fn swipe(&self, machine: u16, card: &str) {
        integration_tests::swipe(&self.fleet_dir(), machine, card);
    }
}

/// Runs `backoffice --config /fleet/backoffice.toml ARGS` in a one-off container on
/// `net`; returns (exit code, stdout, stderr).
pub fn backoffice_in(net: &Network, fleet_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = backoffice_command(net, fleet_dir, args)
        .output()
        .expect("run docker");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `docker run` command of a one-off back-office container (output captured).
pub fn backoffice_command(net: &Network, fleet_dir: &Path, args: &[&str]) -> Command {
    let user = format!("{}:{}", docker::uid(), docker::gid());
    let mount = format!("{}:/fleet", fleet_dir.display());
    let image = format!("scm-hub/backoffice:{}", docker::images());
    let label = format!("scm-hub-test={}", net.name);
    let mut cmd = Command::new("docker");
    cmd.args([
        "run",
        "--rm",
        "--network",
        &net.name,
        "--label",
        &label,
        "--user",
        &user,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--volume",
        &mount,
        "--env",
        "NO_COLOR=1",
        // Log in by the operator certificate on the TLS telnet port: no password hashing
        // (Argon2's memory) in the SCM while a scenario measures it.
        "--env",
        "BACKOFFICE__SCM__TLS=true",
        "--env",
        "BACKOFFICE__SCM__ADDRESS=scm:2324",
        &image,
        "--config",
        "/fleet/backoffice.toml",
    ])
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// Makes sure `docker` itself is usable before the harness is trusted with a scenario:
/// the images exist and a name resolves inside the network.
#[test]
fn name_resolution_inside_the_network() {
    if !docker::enabled("name_resolution_inside_the_network") {
        return;
    }
    let fleet = Fleet::start("dns", &[1]);
    // The agent reached the SCM by the name `scm` (Docker's DNS, through glibc's built-in
    // dns service in a FROM scratch image); the SCM saw it from the agent's address.
    let line = fleet.scm.wait_for("agent said HELLO");
    assert!(line.contains("machine=1"), "{line}");
    let (code, out, err) = fleet.backoffice(&["status", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&fleet.net.ip(AGENT_BASE + 1)),
        "the SCM reports the agent's container address: {out}"
    );
}
