//! `epr`: the Endpoint Register server.

use anyhow::Context;
use clap::{Parser, Subcommand};
use epr_server::summary::StartupSummary;
use epr_server::{admin, telemetry, Application, Settings};
use std::path::PathBuf;

// glibc malloc cost a fifth of the instructions of a request (callgrind, BENCHMARKS.md issue 13
// hot path); mimalloc's per-thread free lists take a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Print the effective configuration as YAML-compatible JSON (secrets and URL
    /// credentials replaced by `***`) and exit.
    CheckConfig,
    /// Copy the embedded store to FILE: a consistent snapshot, safe while a server runs on
    /// the data directory (PostgreSQL: use pg_dump).
    Backup {
        /// Where to write the backup (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Put a backup into the data directory (missing or empty, unless --force), with a new
    /// store identity.
    Restore {
        /// The backup file written by `epr backup`.
        #[arg(long)]
        from: PathBuf,
        /// Replace the store of a non-empty data directory (stop its server first).
        #[arg(long)]
        force: bool,
    },
    /// Write every endpoint and filter as NDJSON (safe while servers run; on the embedded
    /// store a consistent snapshot).
    Export {
        /// Output file (must not exist); standard output if omitted.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Read an export (NDJSON) into the configured store; records whose ID exists are
    /// skipped. Embedded: stop the server of the data directory first.
    Import {
        /// Input file; standard input if omitted.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Apply the PostgreSQL schema migrations to store.postgres.url and print the versions
    /// applied (safe while servers run). Nothing to do for the embedded store.
    Migrate,
    /// Copy every tenant's filters and endpoints from one store to another (e.g. embedded to
    /// PostgreSQL); re-running skips what was copied. Stop the target's servers first.
    MigrateStore {
        /// The source: embedded:DIR or postgres:URL.
        #[arg(long)]
        from: String,
        /// The target: embedded:DIR or postgres:URL; must be empty unless --resume.
        #[arg(long)]
        to: String,
        /// Continue an interrupted copy into a target that is not empty.
        #[arg(long)]
        resume: bool,
    },
    /// Delete a removed tenant's filters and endpoints (with their events), e.g. to finish a
    /// purge that a restart interrupted. Stop the server of the data directory first.
    PurgeTenant {
        /// The tenant ID.
        #[arg(long)]
        tenant: String,
        /// Most deletions per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
    },
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
    // Dependencies may enable two rustls crypto providers (async-nats: ring; an HTTP client
    // may bring aws-lc), and then rustls cannot pick one and panics at the first TLS
    // client: the process uses ring, chosen before anything opens a connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let settings = settings(&cli).context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            // Redacted: the output ends up in terminals, tickets and CI logs.
            println!("{}", serde_json::to_string_pretty(&settings.redacted())?);
            Ok(())
        }
        Command::Backup { to } => {
            admin::init_logging(&settings);
            admin::backup(&settings, &to)
        }
        Command::Restore { from, force } => {
            admin::init_logging(&settings);
            admin::restore(&settings, &from, force)
        }
        Command::Export { to } => {
            admin::init_logging(&settings);
            admin::export(&settings, to.as_deref()).await
        }
        Command::Import { from } => {
            admin::init_logging(&settings);
            admin::import(&settings, from.as_deref()).await
        }
        Command::Migrate => {
            admin::init_logging(&settings);
            admin::migrate(&settings).await
        }
        Command::MigrateStore { from, to, resume } => {
            admin::init_logging(&settings);
            admin::migrate_store(&settings, &from, &to, resume).await
        }
        Command::PurgeTenant { tenant, rate } => {
            admin::init_logging(&settings);
            admin::purge_tenant(&settings, &tenant, rate).await
        }
        Command::Serve => {
            // Held to the end of `main`: dropping it writes out the last queued lines.
            let _log = telemetry::init_logging(&settings.log);
            // Every connection is a file: before the connection limit is fitted to it.
            match epr_server::serve::raise_open_files_limit() {
                Ok((before, after)) if after > before => {
                    tracing::info!("open-files limit raised from {before} to {after}")
                }
                Ok((_, after)) => tracing::info!(open_files_limit = after, "open-files limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
            }
            let overrides = {
                let (listen, data_dir, log_format) = (
                    cli.listen.clone(),
                    cli.data_dir.clone(),
                    cli.log_format.clone(),
                );
                move |s: &mut Settings| {
                    if let Some(l) = &listen {
                        s.server.listen = l.clone();
                    }
                    if let Some(d) = &data_dir {
                        s.store.data_dir = d.clone();
                    }
                    if let Some(f) = &log_format {
                        s.log.format = f.clone();
                    }
                }
            };
            let app = Application::build(&settings).await?.with_reload(
                epr_server::reload::ReloadSource {
                    file: cli.config.clone(),
                    overrides: std::sync::Arc::new(overrides),
                },
            )?;
            StartupSummary::new(&settings, cli.config.as_deref(), app.addr()).log();
            app.run_until_stopped(epr_server::shutdown_signal()).await
        }
    }
}
