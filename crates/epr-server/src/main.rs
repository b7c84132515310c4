//! `epr`: the Endpoint Register server.

use anyhow::Context;
use clap::{Parser, Subcommand};
use epr_server::{telemetry, Application, Settings};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "epr",
    version,
    about = "Endpoint Register: a Kaa-compatible IoT device registry"
)]
struct Cli {
    /// YAML configuration file (layered over built-in defaults, under EPR__* variables).
    #[arg(long, env = "EPR_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Overrides server.listen, e.g. 0.0.0.0:8080.
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Overrides store.data_dir.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Overrides log.format: human or json.
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Print the effective configuration as YAML-compatible JSON and exit.
    CheckConfig,
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let mut s = Settings::load(cli.config.as_deref())?;
    if let Some(l) = &cli.listen {
        s.server.listen = l.clone();
    }
    if let Some(d) = &cli.data_dir {
        s.store.data_dir = d.clone();
    }
    if let Some(f) = &cli.log_format {
        s.log.format = f.clone();
    }
    s.validate()?;
    Ok(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = settings(&cli).context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!("{}", serde_json::to_string_pretty(&settings)?);
            Ok(())
        }
        Command::Serve => {
            telemetry::init_logging(&settings.log);
            // Every connection is a file: before the connection limit is fitted to it.
            match epr_server::serve::raise_open_files_limit() {
                Ok((before, after)) if after > before => {
                    tracing::info!("open-files limit raised from {before} to {after}")
                }
                Ok((_, after)) => tracing::info!(open_files_limit = after, "open-files limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
            }
            let app = Application::build(&settings).await?;
            app.run_until_stopped(epr_server::shutdown_signal()).await
        }
    }
}
