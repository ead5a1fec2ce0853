//! The back office's command line (clap), in the library so the man page and shell
//! completions can be generated from it (`xtask`, see docs/deployment.md).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "backoffice",
    version,
    about = "Operator back office for the SCM hub"
)]
pub struct Cli {
    /// Configuration file (TOML); BACKOFFICE__SECTION__KEY variables override it.
    #[arg(long)]
    pub config: PathBuf,
    /// Output format: `text` (the default) or `json` (schema 1, docs/operations.md; one
    /// object per line for `watch`).
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Push a configuration file to a machine, a group or all machines; exit 0 when every
    /// machine ACKed, 1 when one NACKed, 2 otherwise (pending, superseded, refused).
    Push {
        /// Machine id (the same as `--target ID`).
        #[arg(long, conflicts_with = "target", required_unless_present = "target")]
        machine: Option<u16>,
        /// Target: a machine id, `group:NAME`, `label:TEXT` or `all`. Progress is shown on
        /// standard error while a fleet push runs.
        #[arg(long)]
        target: Option<String>,
        /// Configuration file to send.
        #[arg(long)]
        file: PathBuf,
        /// Wait up to SECONDS for machines left pending to answer (a version-0 machine
        /// that connects per message gets its CONFIG at its next HELLO), and exit on their
        /// ACK or NACK instead of with 2 at once.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..=3600))]
        wait: Option<u32>,
    },
    /// List the machines.
    Machines,
    /// Show one machine.
    Status {
        /// Machine id.
        id: u16,
    },
    /// Recent card swipes (masked) and what became of them.
    Swipes,
    /// A machine's configuration generations.
    History {
        /// Machine id.
        id: u16,
    },
    /// Make an earlier generation current again; exit codes as for push.
    Rollback {
        /// Machine id.
        #[arg(long)]
        machine: u16,
        /// Generation to return to.
        #[arg(long)]
        generation: u64,
    },
    /// The operator audit log.
    Audit,
    /// Interactive session with the SCM (type `quit` to leave).
    Shell,
    /// Print the SCM's live events (connections, push outcomes, swipes), one line each,
    /// until interrupted; uses the admin API ([admin] address) and the certificate of [tls].
    Watch {
        /// Stop after this many events (exit 0).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Validate the configuration and exit.
    CheckConfig,
}
