//! The benchmark's PKI and server configuration files.
//!
//! One ECDSA P-256 CA (scm-certs, as `scm init-dev`) issues the hub's certificate, an
//! operator certificate (the fleet push goes through the operator interface) and one
//! certificate per machine id. Mosquitto gets the very same CA and server certificate and
//! its clients the same machine certificates, so both servers verify the same P-256 chain
//! on every full handshake.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use scm_certs::identity::Identity;
use scm_certs::pki::{Ca, LeafSpec, Validity};
use scm_certs::tls::{self, TlsPolicy};

/// The PKI, in memory and on disk.
pub struct Pki {
    /// Directory holding `ca.pem`, `scm.pem`, `scm-key.pem`, `operator*.pem`.
    pub dir: PathBuf,
    ca_pem: String,
    /// `(cert, key)` PEM of machine `i + 1`.
    machines: Vec<(String, String)>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("machines", &self.machines.len())
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Issues a CA, the hub's and an operator's certificate, and `machines` machine
    /// certificates (ids 1..=machines).
    pub fn generate(dir: &Path, machines: u16) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let validity = Validity::days_from_now(2);
        let ca = Ca::generate("SCM bench CA", &validity)?;
        let mut scm = LeafSpec::new(Identity::Scm, validity.clone());
        scm.extra_hosts = vec!["localhost".into(), "127.0.0.1".into()];
        let scm = ca.issue(&scm)?;
        let op = ca.issue(&LeafSpec::new(
            Identity::operator("bench")?,
            validity.clone(),
        ))?;
        std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
        std::fs::write(dir.join("scm.pem"), &scm.cert_pem)?;
        std::fs::write(dir.join("scm-key.pem"), &scm.key_pem)?;
        std::fs::write(dir.join("operator.pem"), &op.cert_pem)?;
        std::fs::write(dir.join("operator-key.pem"), &op.key_pem)?;
        let mut list = Vec::with_capacity(usize::from(machines));
        for id in 1..=machines {
            let c = ca.issue(&LeafSpec::new(Identity::Machine(id), validity.clone()))?;
            list.push((c.cert_pem, c.key_pem));
        }
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca_pem: ca.cert_pem().to_string(),
            machines: list,
        })
    }

    /// How many machine certificates there are.
    pub fn machines(&self) -> u16 {
        self.machines.len() as u16
    }

    fn machine(&self, id: u16) -> anyhow::Result<&(String, String)> {
        self.machines
            .get(usize::from(id).wrapping_sub(1))
            .with_context(|| format!("no certificate for machine {id}"))
    }

    /// The TLS client configuration of machine `id` (the project's: TLS 1.3, ring,
    /// X25519 first, session resumption disabled).
    pub fn client(&self, id: u16) -> anyhow::Result<tokio_rustls::TlsConnector> {
        let (cert, key) = self.machine(id)?;
        let cfg = tls::client_config_from_pem(&self.ca_pem, cert, key, TlsPolicy::default())?;
        Ok(tokio_rustls::TlsConnector::from(cfg))
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: the server binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// What an SCM run needs.
#[derive(Debug, Clone)]
pub struct ScmRun {
    /// Machines 1..=machines are declared.
    pub machines: u16,
    /// Machines 1..=generic get a Generic device for reader `r1` on a port of their own.
    pub generic: u16,
    /// The agent listener's port.
    pub agents_port: u16,
    /// Bind the TLS telnet listener (operator certificate login) for the fleet push.
    pub telnet_tls: bool,
}

/// Writes `scm.toml` for one run in `dir` (with its own fresh database).
pub fn scm_config(dir: &Path, pki: &Pki, run: &ScmRun) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = pki.dir.display();
    let mut t = String::new();
    let _ = write!(
        t,
        "# Written by scm-bench.\n\
         [listen]\nagents = \"127.0.0.1:{}\"\ntelnet = \"\"\ntelnet_tls = \"{}\"\nmetrics = \"\"\nadmin = \"\"\n\n\
         [tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/scm.pem\"\nkey = \"{p}/scm-key.pem\"\n\n\
         [database]\npath = \"{}/scm.db\"\n\n\
         [limits]\nmax_agent_connections = 20000\n\
         # Every simulated agent connects from 127.0.0.1 (a site behind one NAT address);\n\
         # Mosquitto has no per-source cap either.\n\
         max_agent_connections_per_source = 0\n\n\
         # The counterpart of Mosquitto's raised queue limits: room for the swipes of a burst.\n\
         [bridge]\nqueue_max = 10000\n\n\
         [[operator]]\nname = \"bench\"\nrole = \"admin\"\n",
        run.agents_port,
        if run.telnet_tls { "127.0.0.1:0" } else { "" },
        dir.display(),
    );
    for id in 1..=run.machines {
        let _ = write!(t, "\n[[machine]]\nid = {id}\n");
    }
    for id in 1..=run.generic {
        let _ = write!(
            t,
            "\n[[generic]]\nmachine = {id}\nreader = \"r1\"\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]\n"
        );
    }
    let path = dir.join("scm.toml");
    std::fs::write(&path, t)?;
    Ok(path)
}

/// How many `listening on` lines an SCM run logs.
pub fn scm_listeners(run: &ScmRun) -> usize {
    1 + usize::from(run.telnet_tls) + usize::from(run.generic)
}

/// Writes the back office's configuration: TLS telnet with the operator certificate.
pub fn backoffice_config(dir: &Path, pki: &Pki, telnet_tls: &str) -> anyhow::Result<PathBuf> {
    let p = pki.dir.display();
    let text = format!(
        "[scm]\naddress = \"{telnet_tls}\"\ntls = true\n\n\
         [tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/operator.pem\"\nkey = \"{p}/operator-key.pem\"\n"
    );
    let path = dir.join("backoffice.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Writes `mosquitto.conf` in `dir`: mutual TLS 1.3 on 127.0.0.1:`port`, the same CA and
/// server certificate as the SCM, `set_tcp_nodelay true`, raised queue limits, no
/// persistence, warnings and errors only.
pub fn mosquitto_config(dir: &Path, pki: &Pki, port: u16) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = pki.dir.display();
    let text = format!(
        "# Written by scm-bench.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         persistence false\n\
         connection_messages false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         set_tcp_nodelay true\n\
         max_inflight_messages 1000\n\
         max_queued_messages 1000000\n\
         max_connections -1\n\
         user root\n\
         listener {port} 127.0.0.1\n\
         cafile {p}/ca.pem\n\
         certfile {p}/scm.pem\n\
         keyfile {p}/scm-key.pem\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         tls_version tlsv1.3\n"
    );
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, text)?;
    Ok(path)
}
