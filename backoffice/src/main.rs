//! `backoffice`: push a configuration to a machine through the SCM and report its ACK or
//! NACK (exit 0 ACK, 1 NACK, 2 anything else), list machines, show a machine's status,
//! open an interactive shell, or watch the SCM's live events over its admin API.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use backoffice::cli::{Cli, Cmd};
use backoffice::config::BackofficeConfig;
use backoffice::output::{self, Format};
use backoffice::{Client, Stream};
use clap::Parser;
use scm_telnet::Event;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Exit status for anything that is neither ACK nor NACK.
const OTHER: u8 = 2;

fn load(path: &Path) -> anyhow::Result<BackofficeConfig> {
    let env = scm_common::config::process_env(backoffice::config::ENV_PREFIX);
    let cfg = BackofficeConfig::load(path, &env)?;
    cfg.validate()
        .map_err(|(k, m)| anyhow::anyhow!("invalid configuration: {k}: {m}"))?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.output;
    scm_certs::tls::install_default_provider();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backoffice: cannot start the async runtime: {e}");
            return ExitCode::from(OTHER);
        }
    };
    let result = rt.block_on(run(cli));
    // The shell's standard-input reader may sit in a blocking read: do not wait for it.
    rt.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("backoffice: {e:#}");
            if format == Format::Json {
                let v = serde_json::json!({
                    "schema": output::SCHEMA,
                    "ok": false,
                    "error": format!("{e:#}"),
                    "exit": OTHER,
                });
                println!("{v}");
            }
            ExitCode::from(OTHER)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let cfg = load(&cli.config)?;
    let json = cli.output == Format::Json;
    if let Cmd::CheckConfig = cli.cmd {
        if json {
            let v = serde_json::json!({
                "schema": output::SCHEMA,
                "command": "check-config",
                "ok": true,
                "config": cli.config.display().to_string(),
            });
            println!("{v}");
        } else {
            println!("{}: configuration is valid", cli.config.display());
        }
        return Ok(0);
    }
    if let Cmd::Watch { count } = cli.cmd {
        return watch(&cfg, count, cli.output).await;
    }
    if let Cmd::Push { file, .. } = &cli.cmd {
        // Read the file before connecting, so a typo does not cost a login.
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    }
    let mut client = backoffice::connect(&cfg).await?;
    let print = |doc: serde_json::Value, r: &backoffice::Reply| {
        if json {
            println!("{doc}");
            reply_code(r)
        } else {
            print_reply(r)
        }
    };
    let code = match cli.cmd {
        Cmd::Push {
            machine,
            target,
            file,
            wait,
        } => {
            let content = std::fs::read_to_string(&file).with_context(|| {
                format!("cannot read {} (it must be UTF-8 text)", file.display())
            })?;
            let target = target.unwrap_or_else(|| machine.unwrap_or_default().to_string());
            // `push TARGET wait SECONDS` on the console.
            let command = match wait {
                Some(s) => format!("{target} wait {s}"),
                None => target.clone(),
            };
            let r = client
                .push_to(&command, &content, |p| eprintln!("progress: {p}"))
                .await?;
            if json {
                let code = exit_of(&r);
                println!("{}", output::push("push", &target, &r, code));
                code
            } else {
                if r.lines.len() > 1 {
                    for l in &r.lines[..r.lines.len() - 1] {
                        println!("{l}");
                    }
                }
                outcome_code(&r)
            }
        }
        Cmd::Rollback {
            machine,
            generation,
        } => {
            let r = client
                .command(&format!("rollback {machine} {generation}"))
                .await?;
            if json {
                let code = exit_of(&r);
                println!(
                    "{}",
                    output::push("rollback", &machine.to_string(), &r, code)
                );
                code
            } else {
                outcome_code(&r)
            }
        }
        Cmd::History { id } => {
            let r = client.command(&format!("history {id}")).await?;
            print(output::history(id, &r), &r)
        }
        Cmd::Machines => {
            let r = client.command("machines").await?;
            print(output::machines(&r), &r)
        }
        Cmd::Status { id } => {
            let r = client.command(&format!("status {id}")).await?;
            print(output::status(id, &r), &r)
        }
        Cmd::Audit => {
            let r = client.command("audit").await?;
            print(output::audit(&r), &r)
        }
        Cmd::Swipes => {
            let r = client.command("swipes").await?;
            print(output::swipes(&r), &r)
        }
        Cmd::Shell => return shell(client).await,
        Cmd::CheckConfig | Cmd::Watch { .. } => 0,
    };
    let _ = client.quit().await;
    Ok(code)
}

/// Prints the SCM's events until interrupted (exit 0), `count` events were printed (exit
/// 0), or the stream fails or ends (exit 2).
async fn watch(cfg: &BackofficeConfig, count: Option<u64>, format: Format) -> anyhow::Result<u8> {
    let mut client = backoffice::admin::connect(cfg).await?;
    let mut stream = client
        .watch_events(scm_proto::admin::WatchEventsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("the SCM refused WatchEvents: {}", s.message()))?
        .into_inner();
    let addr = cfg.admin.as_ref().map(|a| a.address.as_str()).unwrap_or("");
    eprintln!("watching events of the SCM at {addr}; Ctrl-C to stop");
    let mut out = tokio::io::stdout();
    let mut printed = 0u64;
    if count == Some(0) {
        return Ok(0);
    }
    loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            m = stream.message() => m,
        };
        match next {
            Ok(Some(event)) => {
                let line = match format {
                    Format::Text => backoffice::admin::format_event(&event),
                    Format::Json => output::event(&event).to_string(),
                };
                out.write_all(format!("{line}\n").as_bytes()).await?;
                out.flush().await?;
                printed += 1;
                if count.is_some_and(|n| printed >= n) {
                    return Ok(0);
                }
            }
            Ok(None) => {
                eprintln!("the SCM ended the event stream (shutting down?)");
                return Ok(OTHER);
            }
            Err(s) => anyhow::bail!("event stream failed: {}", s.message()),
        }
    }
}

/// The exit status of a push or rollback answer: 0 on ACK, 1 on NACK, 2 otherwise.
fn exit_of(r: &backoffice::Reply) -> u8 {
    match r.code {
        250 => 0,
        554 => 1,
        _ => OTHER,
    }
}

/// Prints a push or rollback answer; 0 on ACK, 1 on NACK, 2 otherwise.
fn outcome_code(r: &backoffice::Reply) -> u8 {
    let line = format!("{} {}", r.code, r.last());
    let code = exit_of(r);
    if code == OTHER {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    code
}

/// 0 for a 2xx reply, 2 otherwise.
fn reply_code(r: &backoffice::Reply) -> u8 {
    if (200..300).contains(&r.code) {
        0
    } else {
        OTHER
    }
}

fn print_reply(r: &backoffice::Reply) -> u8 {
    for l in &r.lines {
        println!("{l}");
    }
    reply_code(r)
}

/// Forwards standard input to the SCM line by line and prints what it sends.
async fn shell(mut client: Client<Box<dyn Stream>>) -> anyhow::Result<u8> {
    let mut out = tokio::io::stdout();
    out.write_all(b"connected; type help, quit to leave\n")
        .await?;
    out.write_all(backoffice::client::PROMPT.as_bytes()).await?;
    out.flush().await?;
    let leftover = client.take_buffered();
    out.write_all(&leftover).await?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut quit_sent = false;
    loop {
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line? {
                Some(l) => {
                    quit_sent |= matches!(l.trim(), "quit" | "exit" | "logout");
                    client.conn_mut().send_line(&l).await?;
                }
                None => {
                    stdin_open = false;
                    if !quit_sent {
                        quit_sent = true;
                        let _ = client.conn_mut().send_line("quit").await;
                    }
                }
            },
            ev = client.conn_mut().next_event() => match ev {
                Ok(None) => break,
                Ok(Some(Event::Data(d))) => { out.write_all(&d).await?; out.flush().await?; }
                Ok(Some(_)) => {}
                // The SCM may close hard right after `221 bye`: that is the end, not an error.
                Err(_) if quit_sent => break,
                Err(e) => return Err(e.into()),
            },
        }
    }
    out.write_all(b"\n").await?;
    // Flush: the runtime is shut down without waiting once this returns.
    out.flush().await?;
    Ok(0)
}
