//! `scm`: the hub's command line (`serve`, `check-config`, `init-dev`, `hash-password`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use scm::app::config::ScmConfig;
use scm::cli::{Cli, Cmd};

fn load(path: &std::path::Path) -> anyhow::Result<ScmConfig> {
    let env = scm_common::config::process_env(scm::app::config::ENV_PREFIX);
    let cfg = ScmConfig::load(path, &env)?;
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    scm_certs::tls::install_default_provider();
    match cli.cmd {
        Cmd::Serve { config } => {
            let cfg = load(&config)?;
            scm_common::logging::init(cfg.log_format());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = rt.block_on(async move {
                let shutdown = scm_common::shutdown_on_signals();
                let prepared = scm::app::server::prepare(cfg)?;
                let listeners = scm::app::server::bind_all(&prepared).await?;
                tracing::info!("SCM hub {} started", env!("CARGO_PKG_VERSION"));
                scm::app::server::serve(prepared, listeners, shutdown).await;
                tracing::info!("SCM hub stopped");
                anyhow::Ok(())
            });
            // The swipe journal's writer finishes its last batch once the hub is gone; do
            // not wait for any blocking task longer than this.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            result
        }
        Cmd::CheckConfig { config } => {
            let cfg = load(&config)?;
            let (machines, operators) = cfg.counts();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async { scm::app::server::prepare(cfg).map(drop) })?;
            println!(
                "{}: configuration is valid ({machines} machines, {operators} operators; certificates and database loaded)",
                config.display()
            );
            Ok(())
        }
        Cmd::InitDev {
            out,
            machines,
            bind,
            scm_host,
            allow,
            operator_key,
        } => {
            let ids = scm::app::initdev::parse_machines(&machines)?;
            let mut opts = scm::app::initdev::InitDevOptions::for_bind(bind, scm_host, allow);
            if operator_key == "rsa" {
                opts.operator_key = scm_certs::pki::KeyKind::Rsa2048;
            }
            let r = scm::app::initdev::init_dev_with(&out, &ids, &opts)?;
            print!("{}", r.summary(&out));
            println!("(this summary is also in {})", r.init_txt.display());
            Ok(())
        }
        Cmd::HashPassword => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            let pw = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!pw.is_empty(), "empty password; type one on standard input");
            println!(
                "{}",
                scm::app::hash_password(pw).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
    }
}
