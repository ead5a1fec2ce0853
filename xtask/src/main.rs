//! `cargo xtask`: build steps that need the binaries' command-line definitions.
//!
//! `cargo xtask man-and-completions --out DIR` writes the man pages (clap_mangen) and the
//! bash, zsh and fish completions (clap_complete) of `scm`, `machine-agent` and
//! `backoffice` into DIR/man and DIR/completions, where the Debian packages' assets point
//! (`[package.metadata.deb]` in each crate, deploy/debian/build.sh).
//!
//! Why an xtask rather than a build.rs or a hidden subcommand: a build script cannot use its
//! own crate's library, so it would have to `include!` the CLI source and repeat its
//! dependencies; a hidden subcommand would ship generator code in every binary. The xtask
//! links the three libraries' `cli` modules, the same definitions the binaries parse with,
//! so a page can never describe options the binary does not have.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Build helpers of the SCM hub workspace")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Write man pages to OUT/man and shell completions to OUT/completions.
    ManAndCompletions {
        /// Output directory (created if missing).
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::ManAndCompletions { out } => {
            for cmd in [
                scm::cli::Cli::command(),
                machine_agent::cli::Cli::command(),
                backoffice::cli::Cli::command(),
            ] {
                write(cmd, &out)?;
            }
            println!("wrote man pages and completions to {}", out.display());
            Ok(())
        }
    }
}

fn write(cmd: clap::Command, out: &Path) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {}; check the --out path", dir.display()))?;
    }
    // One page for the command and one per subcommand (scm-serve.1, ...), as git does.
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("cannot write {name}'s man pages to {}", man.display()))?;
    let mut cmd = cmd;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions).with_context(|| {
            format!(
                "cannot write {name}'s {shell} completion to {}",
                completions.display()
            )
        })?;
    }
    Ok(())
}
