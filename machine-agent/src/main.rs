//! `machine-agent`: runs the agent (`--config FILE`) or checks its configuration
//! (`check-config --config FILE`).
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use machine_agent::cli::{Cli, Cmd};
use machine_agent::config::AgentConfig;

fn load(path: &Path) -> anyhow::Result<AgentConfig> {
    let env = scm_common::config::process_env(machine_agent::config::ENV_PREFIX);
    let cfg = AgentConfig::load(path, &env)?;
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("machine-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    scm_certs::tls::install_default_provider();
    let path = cli
        .config
        .context("--config FILE is required (the agent's TOML configuration)")?;
    let cfg = load(&path)?;
    match cli.cmd {
        Some(Cmd::CheckConfig) => {
            let id = cfg.machine_id;
            machine_agent::Agent::prepare(cfg)?;
            println!(
                "{}: configuration is valid (machine {id}; certificates and storage loaded)",
                path.display()
            );
            Ok(())
        }
        None => {
            scm_common::logging::init(cfg.log.format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = rt.block_on(async move {
                let shutdown = scm_common::shutdown_on_signals();
                let id = cfg.machine_id;
                let agent = machine_agent::Agent::prepare(cfg)?;
                let listener = agent.bind().await?;
                let metrics = agent.bind_metrics().await;
                tracing::info!(
                    "machine agent {} for machine {id} started",
                    env!("CARGO_PKG_VERSION")
                );
                agent.run(listener, metrics, shutdown).await;
                tracing::info!("machine agent stopped");
                anyhow::Ok(())
            });
            // A stdin reader may sit in a blocking read; do not wait for it forever.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
    }
}
