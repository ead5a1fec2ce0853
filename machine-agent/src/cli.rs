//! The agent's command line (clap), in the library so that `xtask` can generate the man
//! page and shell completions from the same definition the binary parses with.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "machine-agent",
    version,
    about = "Machine agent: stores configurations pushed by the SCM and reports to it"
)]
pub struct Cli {
    /// Configuration file (TOML); AGENT__SECTION__KEY variables override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    // Without one, the agent runs.
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

// No subcommand: run the agent.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Validate the configuration (and load certificates) and exit.
    CheckConfig,
}
