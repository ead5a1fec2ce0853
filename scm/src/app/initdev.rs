//! `scm init-dev`: a development PKI (CA, SCM, operator, one certificate per machine) and
//! ready-to-run configuration files for the SCM, each agent and the back office, on
//! 127.0.0.1 with the default ports unless [`InitDevOptions`] say otherwise (a container
//! fleet binds every listener to 0.0.0.0 and reaches the SCM by its host name).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use scm_certs::pki::{DevPkiOptions, KeyKind, Validity, write_dev_pki_with};

/// Why `init-dev` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitDevError {
    /// Certificates could not be written.
    #[error("{0}")]
    Pki(#[from] scm_certs::pki::PkiError),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The directory already holds a development set-up.
    #[error("{0} already exists; choose another --out directory or remove it")]
    Exists(PathBuf),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

/// What `init-dev` created.
#[derive(Debug)]
pub struct InitDevResult {
    /// The SCM's configuration file.
    pub scm_config: PathBuf,
    /// One configuration per agent.
    pub agent_configs: Vec<(u16, PathBuf)>,
    /// The back office's configuration.
    pub backoffice_config: PathBuf,
    /// The admin operator's generated password (also in backoffice.toml and init.txt).
    pub admin_password: String,
    /// `init.txt`: what was written and the operator login, as [`InitDevResult::summary`].
    pub init_txt: PathBuf,
}

impl InitDevResult {
    /// What `init-dev` prints and keeps in `init.txt`: the files and the operator login
    /// (the line `operator login: admin / PASSWORD`, which scripts read).
    pub fn summary(&self, out: &Path) -> String {
        let mut s = format!(
            "wrote development PKI and configurations to {}\n  scm:        {}\n",
            out.display(),
            self.scm_config.display()
        );
        for (id, p) in &self.agent_configs {
            let _ = writeln!(s, "  agent {id:<5} {}", p.display());
        }
        let _ = writeln!(s, "  backoffice: {}", self.backoffice_config.display());
        let _ = writeln!(s, "operator login: admin / {}", self.admin_password);
        s
    }
}

/// Default agent-link port of the SCM.
pub const AGENT_PORT: u16 = 9300;
/// Default plain telnet port.
pub const TELNET_PORT: u16 = 2323;
/// Default TLS telnet port.
pub const TELNET_TLS_PORT: u16 = 2324;
/// First Generic card reader device port (one per machine, counting up).
pub const GENERIC_PORT: u16 = 7778;
/// The RFIDeas 241 configuration port (HTTP; 80 in production).
pub const RFIDEAS_PORT: u16 = 8241;
/// The SCM's metrics and health port.
pub const SCM_METRICS_PORT: u16 = 9464;
/// First agent metrics and health port (one per machine, counting up).
pub const AGENT_METRICS_PORT: u16 = 9465;
/// The SCM's gRPC admin API port.
pub const ADMIN_PORT: u16 = 9443;

/// Where the set-up runs: what the listeners bind, how agents and the back office reach
/// the SCM, and which print servers the card reader devices serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitDevOptions {
    /// Address every listener of the SCM and the agents binds (`127.0.0.1`; `0.0.0.0` in
    /// containers).
    pub bind: IpAddr,
    /// Host name or address agents and the back office use to reach the SCM; added to the
    /// SCM's certificate as a SAN when it is not an identity name already.
    pub scm_host: String,
    /// Print-server addresses allowed on the Generic and RFIDeas 241 devices.
    pub allow: Vec<IpAddr>,
    /// The operator certificate's key (RSA for tools that load only RSA keys, such as
    /// telnet-ssl; the SCM's and the machines' keys stay ECDSA).
    pub operator_key: KeyKind,
}

impl Default for InitDevOptions {
    fn default() -> Self {
        InitDevOptions {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            scm_host: "127.0.0.1".into(),
            allow: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            operator_key: KeyKind::default(),
        }
    }
}

impl InitDevOptions {
    /// The options for listeners bound to `bind`, with the defaults filled in so that the
    /// fleet agrees on one address: the SCM is reached at `scm_host`, else at `bind` when
    /// that is a specific address (else at 127.0.0.1, the address a container's own
    /// processes share); print servers are allowed from `allow`, else from 127.0.0.1 and
    /// a specific `bind` (a print server on this host connecting to 127.0.0.22 comes from
    /// 127.0.0.1, the loopback's source address).
    pub fn for_bind(bind: IpAddr, scm_host: Option<String>, allow: Vec<IpAddr>) -> Self {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let scm_host = scm_host.unwrap_or_else(|| {
            if bind.is_unspecified() {
                localhost.to_string()
            } else {
                bind.to_string()
            }
        });
        let allow = if allow.is_empty() {
            let mut a = vec![localhost];
            if !bind.is_unspecified() && bind != localhost {
                a.push(bind);
            }
            a
        } else {
            allow
        };
        InitDevOptions {
            bind,
            scm_host,
            allow,
            operator_key: KeyKind::default(),
        }
    }

    /// Checks the options: a host name the certificate can carry, a non-empty allow list
    /// of specific addresses.
    pub fn validate(&self) -> Result<(), InitDevError> {
        let host = self.scm_host.trim();
        let ip = host.parse::<IpAddr>().is_ok();
        if host.is_empty()
            || (!ip && host.contains([':', '/', ' ']))
            || rustls::pki_types::ServerName::try_from(host).is_err()
        {
            return Err(InitDevError::Usage(format!(
                "--scm-host {:?} is not a host name or IP address (no port), e.g. scm or 10.0.0.5",
                self.scm_host
            )));
        }
        if self.allow.is_empty() {
            return Err(InitDevError::Usage(
                "--allow needs at least one print-server address, e.g. 127.0.0.1".into(),
            ));
        }
        if let Some(a) = self.allow.iter().find(|a| a.is_unspecified()) {
            return Err(InitDevError::Usage(format!(
                "--allow {a} would allow any peer; name the print server's address"
            )));
        }
        Ok(())
    }

    /// `host:port` with the SCM host (an IPv6 address in brackets).
    fn scm(&self, port: u16) -> String {
        let host = self.scm_host.trim();
        match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port).to_string(),
            Err(_) => format!("{host}:{port}"),
        }
    }

    /// `ip:port` with the bind address.
    fn bind(&self, port: u16) -> String {
        SocketAddr::new(self.bind, port).to_string()
    }

    /// The allow list as TOML.
    fn allow_toml(&self) -> String {
        let items: Vec<String> = self.allow.iter().map(|a| format!("\"{a}\"")).collect();
        format!("[{}]", items.join(", "))
    }
}

/// Parses `1,2,3` (also ranges like `1-5`).
pub fn parse_machines(s: &str) -> Result<Vec<u16>, InitDevError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            InitDevError::Usage(format!(
                "{part:?} is not a machine id or range like 1-5 (ids 0-65535)"
            ))
        };
        if let Some((a, b)) = part.split_once('-') {
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            if a > b {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(InitDevError::Usage(
            "--machines needs at least one id, e.g. 1,2,3".into(),
        ));
    }
    if out.len() > 1000 {
        return Err(InitDevError::Usage(
            "at most 1000 machines in a development set-up".into(),
        ));
    }
    Ok(out)
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), InitDevError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| InitDevError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Writes the PKI and configuration files into `out`, everything on 127.0.0.1.
pub fn init_dev(out: &Path, machines: &[u16]) -> Result<InitDevResult, InitDevError> {
    init_dev_with(out, machines, &InitDevOptions::default())
}

/// Writes the PKI and configuration files into `out` for the set-up `opts` describes.
pub fn init_dev_with(
    out: &Path,
    machines: &[u16],
    opts: &InitDevOptions,
) -> Result<InitDevResult, InitDevError> {
    opts.validate()?;
    let scm_config = out.join("scm.toml");
    if scm_config.exists() {
        return Err(InitDevError::Exists(scm_config));
    }
    let files = write_dev_pki_with(
        out,
        &DevPkiOptions {
            machines: machines.to_vec(),
            operators: vec!["admin".into()],
            hosts: {
                let mut h = vec!["localhost".to_string(), "127.0.0.1".to_string()];
                if !h.contains(&opts.scm_host) {
                    h.push(opts.scm_host.trim().to_string());
                }
                h
            },
            validity: Validity::days_from_now(825),
        },
        opts.operator_key,
    )?;
    let name = |p: &Path| -> String {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let admin_password = {
        const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        (0..20)
            .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
            .collect::<String>()
    };
    let hash = crate::ops::auth::hash_password(&admin_password)
        .map_err(|e| InitDevError::Usage(e.to_string()))?;

    let mut scm = String::new();
    let _ = write!(
        scm,
        "# SCM hub development configuration written by `scm init-dev`.\n\
         # Every key is described in docs/configuration.md.\n\n\
         [listen]\nagents = \"{}\"\ntelnet = \"{}\"\ntelnet_tls = \"{}\"\nmetrics = \"{}\"\nrfideas = \"{}\"\nadmin = \"{}\"\n\n\
         [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [database]\npath = \"scm.db\"\n\n\
         [[operator]]\nname = \"admin\"\nrole = \"admin\"\npassword_hash = \"{hash}\"\n",
        opts.bind(AGENT_PORT),
        opts.bind(TELNET_PORT),
        opts.bind(TELNET_TLS_PORT),
        opts.bind(SCM_METRICS_PORT),
        opts.bind(RFIDEAS_PORT),
        opts.bind(ADMIN_PORT),
        name(&files.ca_cert),
        name(&files.scm_cert),
        name(&files.scm_key),
    );
    for id in machines {
        let _ = write!(
            scm,
            "\n[[machine]]\nid = {id}\nname = \"machine-{id}\"\nprotocol_version = 1\n\
             groups = [\"dev\", \"{parity}\"]\nlabels = [\"site=dev\"]\n",
            parity = if id % 2 == 0 { "even" } else { "odd" }
        );
    }
    let _ = write!(
        scm,
        "\n# One Generic-mode card reader device per machine: a print server on this host\n\
         # connects to the port and reads `<card>\\n` for each swipe on reader r1.\n"
    );
    for (i, id) in machines.iter().enumerate() {
        let port = GENERIC_PORT.saturating_add(u16::try_from(i).unwrap_or(u16::MAX));
        let _ = write!(
            scm,
            "\n[[generic]]\nmachine = {id}\nreader = \"r1\"\nlisten = \"{}\"\nallow = {}\n",
            opts.bind(port),
            opts.allow_toml(),
        );
    }
    let _ = write!(
        scm,
        "\n# The same reader r1 is also an RFIDeas 241 device in Client Mode: a print server\n\
         # on an allowed address configures it with HTTP GETs to port {RFIDEAS_PORT} and the Host\n\
         # name below (see docs/bridge-241.md); swipes then also go to the HTTPS URL it stores.\n"
    );
    for id in machines {
        let _ = write!(
            scm,
            "\n[[rfideas]]\nmachine = {id}\nreader = \"r1\"\nhost = \"reader-{id}.localhost\"\nallow = {}\n",
            opts.allow_toml(),
        );
    }
    write(&scm_config, &scm, true)?;

    let mut agent_configs = Vec::new();
    for (i, (id, cert, key)) in files.machines.iter().enumerate() {
        let i = u16::try_from(i).unwrap_or(u16::MAX);
        let port = AGENT_PORT.saturating_add(1).saturating_add(i);
        let metrics_port = AGENT_METRICS_PORT.saturating_add(i);
        let path = out.join(format!("agent-{id}.toml"));
        let text = format!(
            "# Machine agent {id}, written by `scm init-dev`.\n\n\
             machine_id = {id}\n\n\
             [scm]\naddress = \"{}\"\n\n\
             [listen]\n\
             # No config port: configurations come over this agent's own link to the SCM.\n\
             # Only a machine the SCM has `delivery = \"port\"` for needs one, e.g.\n\
             # config = \"{}\"\n\
             config = \"\"\nmetrics = \"{}\"\n\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [storage]\ndir = \"machine-{id}\"\n\n\
             # Card reader r1: write a card number and a newline into the FIFO to swipe,\n\
             # e.g. echo 12345678 > machine-{id}-r1.fifo\n\
             [[reader]]\nid = \"r1\"\nkind = \"fifo\"\npath = \"machine-{id}-r1.fifo\"\n",
            opts.scm(AGENT_PORT),
            opts.bind(port),
            opts.bind(metrics_port),
            name(&files.ca_cert),
            name(cert),
            name(key),
        );
        write(&path, &text, false)?;
        agent_configs.push((*id, path));
    }

    let (op_cert, op_key) = files
        .operators
        .iter()
        .find(|(n, _, _)| n == "admin")
        .map(|(_, c, k)| (name(c), name(k)))
        .unwrap_or_default();
    let backoffice_config = out.join("backoffice.toml");
    let text = format!(
        "# Back office, written by `scm init-dev`. Plain telnet on loopback with a password;\n\
         # set scm.tls = true and scm.address to the TLS port to log in by certificate.\n\
         # `backoffice watch` uses the admin API with the operator certificate of [tls].\n\n\
         [scm]\naddress = \"{}\"\ntls = false\n\n\
         [login]\nuser = \"admin\"\npassword = \"{admin_password}\"\n\n\
         [tls]\nca = \"{}\"\ncert = \"{op_cert}\"\nkey = \"{op_key}\"\n\n\
         [admin]\naddress = \"{}\"\n",
        opts.scm(TELNET_PORT),
        name(&files.ca_cert),
        opts.scm(ADMIN_PORT),
    );
    write(&backoffice_config, &text, true)?;

    let result = InitDevResult {
        scm_config,
        agent_configs,
        backoffice_config,
        admin_password,
        init_txt: out.join("init.txt"),
    };
    write(&result.init_txt, &result.summary(out), true)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_lists() {
        assert_eq!(parse_machines("1,2,3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_machines("3, 1-2,2").unwrap(), vec![1, 2, 3]);
        assert!(parse_machines("").is_err());
        assert!(parse_machines("x").is_err());
        assert!(parse_machines("70000").is_err());
        assert!(parse_machines("5-1").is_err());
    }

    #[test]
    fn writes_loadable_configs_and_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let r = init_dev(d.path(), &[1, 2]).unwrap();
        let cfg = crate::app::config::ScmConfig::load(&r.scm_config, &Default::default()).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.machines.len(), 2);
        assert_eq!(cfg.generic.len(), 2);
        assert_eq!(cfg.generic[1].listen, "127.0.0.1:7779");
        assert_eq!(cfg.listen.admin, format!("127.0.0.1:{ADMIN_PORT}"));
        assert_eq!(cfg.listen.rfideas, "127.0.0.1:8241");
        assert_eq!(cfg.rfideas.len(), 2);
        assert_eq!(cfg.rfideas[1].host, "reader-2.localhost");
        assert_eq!(
            cfg.rfideas[1].listen, "",
            "shared listener, told apart by Host"
        );
        let agent = std::fs::read_to_string(&r.agent_configs[0].1).unwrap();
        assert!(agent.contains("path = \"machine-1-r1.fifo\""), "{agent}");
        assert!(cfg.tls.ca.is_absolute() && cfg.tls.ca.exists());
        let op = cfg.operators.first().unwrap();
        assert!(crate::ops::auth::verify_password(op, &r.admin_password));
        assert_eq!(r.agent_configs.len(), 2);
        let bo = std::fs::read_to_string(&r.backoffice_config).unwrap();
        assert!(bo.contains(&r.admin_password));
        let init = std::fs::read_to_string(d.path().join("init.txt")).unwrap();
        assert!(
            init.contains(&format!("operator login: admin / {}\n", r.admin_password)),
            "{init}"
        );
        assert!(
            bo.contains(&format!("[admin]\naddress = \"127.0.0.1:{ADMIN_PORT}\"")),
            "{bo}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&r.backoffice_config)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&r.init_txt).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "init.txt holds the password");
        assert!(matches!(
            init_dev(d.path(), &[1]),
            Err(InitDevError::Exists(_))
        ));
    }

    #[test]
    fn container_options_bind_everything_and_name_the_scm_host() {
        let d = tempfile::tempdir().unwrap();
        let opts = InitDevOptions {
            bind: "0.0.0.0".parse().unwrap(),
            scm_host: "scm".into(),
            allow: vec!["10.213.0.50".parse().unwrap(), "127.0.0.1".parse().unwrap()],
            operator_key: KeyKind::default(),
        };
        let r = init_dev_with(d.path(), &[1, 2], &opts).unwrap();
        let cfg = crate::app::config::ScmConfig::load(&r.scm_config, &Default::default()).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.listen.agents, "0.0.0.0:9300");
        assert_eq!(cfg.listen.telnet, "0.0.0.0:2323");
        assert_eq!(cfg.generic[1].listen, "0.0.0.0:7779");
        assert_eq!(cfg.generic[0].allow, opts.allow);
        assert_eq!(cfg.rfideas[0].allow, opts.allow);
        let agent = std::fs::read_to_string(&r.agent_configs[1].1).unwrap();
        assert!(agent.contains("[scm]\naddress = \"scm:9300\""), "{agent}");
        assert!(agent.contains("config = \"0.0.0.0:9302\""), "{agent}");
        assert!(agent.contains("metrics = \"0.0.0.0:9466\""), "{agent}");
        let bo = std::fs::read_to_string(&r.backoffice_config).unwrap();
        assert!(bo.contains("address = \"scm:2323\""), "{bo}");
        assert!(bo.contains("address = \"scm:9443\""), "{bo}");
        // The SCM certificate is valid for the host name the agents dial.
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let pem = |f: &str| CertificateDer::from_pem_file(d.path().join(f)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pem("ca.pem")).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let check = |host: &str| {
            verifier.verify_server_cert(
                &pem("scm.pem"),
                &[],
                &ServerName::try_from(host.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
        };
        check("scm").unwrap();
        assert!(check("agent-1").is_err(), "a name it was not issued for");
    }

    #[test]
    fn a_specific_bind_address_is_where_the_fleet_meets() {
        let cases = [
            (
                "127.0.0.22",
                None,
                "127.0.0.22",
                "127.0.0.22:9300",
                vec!["127.0.0.1", "127.0.0.22"],
            ),
            (
                "127.0.0.1",
                None,
                "127.0.0.1",
                "127.0.0.1:9300",
                vec!["127.0.0.1"],
            ),
            (
                "0.0.0.0",
                None,
                "127.0.0.1",
                "127.0.0.1:9300",
                vec!["127.0.0.1"],
            ),
            ("0.0.0.0", Some("scm"), "scm", "scm:9300", vec!["127.0.0.1"]),
            (
                "10.0.0.5",
                Some("scm.example"),
                "scm.example",
                "scm.example:9300",
                vec!["127.0.0.1", "10.0.0.5"],
            ),
            ("::1", None, "::1", "[::1]:9300", vec!["127.0.0.1", "::1"]),
        ];
        for (bind, host, want_host, want_scm, want_allow) in cases {
            let o = InitDevOptions::for_bind(bind.parse().unwrap(), host.map(String::from), vec![]);
            o.validate().unwrap_or_else(|e| panic!("{bind}: {e}"));
            assert_eq!(o.scm_host, want_host, "{bind}");
            assert_eq!(o.scm(9300), want_scm, "{bind}");
            let allow: Vec<IpAddr> = want_allow.iter().map(|a| a.parse().unwrap()).collect();
            assert_eq!(o.allow, allow, "{bind}");
        }
        let explicit = vec!["10.1.1.1".parse().unwrap()];
        let o = InitDevOptions::for_bind("127.0.0.22".parse().unwrap(), None, explicit.clone());
        assert_eq!(o.allow, explicit, "--allow replaces the default");

        let d = tempfile::tempdir().unwrap();
        let opts = InitDevOptions::for_bind("127.0.0.22".parse().unwrap(), None, vec![]);
        let r = init_dev_with(d.path(), &[1], &opts).unwrap();
        let cfg = crate::app::config::ScmConfig::load(&r.scm_config, &Default::default()).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.listen.agents, "127.0.0.22:9300");
        let agent = std::fs::read_to_string(&r.agent_configs[0].1).unwrap();
        assert!(
            agent.contains("[scm]\naddress = \"127.0.0.22:9300\""),
            "{agent}"
        );
        assert!(agent.contains("config = \"127.0.0.22:9301\""), "{agent}");
        let bo = std::fs::read_to_string(&r.backoffice_config).unwrap();
        assert!(bo.contains("address = \"127.0.0.22:2323\""), "{bo}");
        assert!(bo.contains("address = \"127.0.0.22:9443\""), "{bo}");
    }

    #[test]
    fn bad_options_are_refused_before_anything_is_written() {
        let d = tempfile::tempdir().unwrap();
        for opts in [
            InitDevOptions {
                scm_host: "scm:9300".into(),
                ..Default::default()
            },
            InitDevOptions {
                scm_host: " ".into(),
                ..Default::default()
            },
            InitDevOptions {
                allow: vec![],
                ..Default::default()
            },
            InitDevOptions {
                allow: vec!["0.0.0.0".parse().unwrap()],
                ..Default::default()
            },
        ] {
            let e = init_dev_with(d.path(), &[1], &opts).unwrap_err();
            assert!(matches!(e, InitDevError::Usage(_)), "{opts:?}: {e}");
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
