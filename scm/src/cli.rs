//! The hub's command line (clap), in the library so that `xtask` can generate the man page
//! and shell completions from the same definition the binary parses with.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "scm",
    version,
    about = "The SCM hub: relays configurations to machine agents over mutual TLS and serves operators over telnet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the hub.
    Serve {
        /// Configuration file (TOML); SCM__SECTION__KEY variables override it.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate the configuration (and load its certificates and database) and exit.
    CheckConfig {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a development PKI and ready-to-run configurations (on 127.0.0.1 by default).
    InitDev {
        /// Directory to create.
        #[arg(long)]
        out: PathBuf,
        /// Machine ids, e.g. 1,2,3 or 1-10.
        #[arg(long)]
        machines: String,
        /// Address every listener of the SCM and the agents binds (0.0.0.0 in containers).
        #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Host name or address agents and the back office use to reach the SCM (also
        /// added to the SCM certificate), e.g. `scm` in a compose fleet. Default: the
        /// --bind address when it is a specific one, else 127.0.0.1.
        #[arg(long, value_name = "HOST")]
        scm_host: Option<String>,
        /// Print-server address allowed on the card reader devices (repeatable).
        /// Default: 127.0.0.1 and a specific --bind address.
        #[arg(long, value_name = "IP")]
        allow: Vec<std::net::IpAddr>,
        /// Key of the operator certificate: ecdsa (P-256), or rsa (2048 bits) for
        /// tools that load only RSA keys, such as telnet-ssl.
        #[arg(long, value_name = "KIND", default_value = "ecdsa", value_parser = ["ecdsa", "rsa"])]
        operator_key: String,
    },
    /// Hash a password (read from standard input) for `[[operator]] password_hash`.
    HashPassword,
}
