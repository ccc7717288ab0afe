//! The `projector` command line: run the host, append to the event log,
//! replay a module offline, and inspect projections.

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use projector::config::Config;
use projector::dead_letters::{self, Selection};
use projector::event_log::EventLog;
use projector::replay::{ReplayOptions, replay};
use projector::supervisor::Supervisor;
use projector::{cloudevents, inspect};
use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;
use std::process::ExitCode;

/// Feed event streams to sandboxed WebAssembly projection modules, each
/// building its own SQLite state.
#[derive(Parser)]
#[command(name = "projector", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every projection of a config until SIGINT or SIGTERM.
    Run {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
    },
    /// Append CloudEvents (JSON, one per line) to a stream of the event log.
    /// All or nothing: one bad line appends nothing. Prints
    /// {"appended": N, "duplicates": M}.
    Append {
        /// The data folder holding events.db (the config's `data`).
        #[arg(long)]
        data: PathBuf,
        /// The stream to append to.
        stream: String,
        /// The file to read, or `-` for standard input.
        file: PathBuf,
    },
    /// Run one module over a JSONL file of CloudEvents in a temporary
    /// database and print the state it built as JSON.
    Replay {
        /// The module file (.wasm).
        #[arg(long)]
        module: PathBuf,
        /// The events file (CloudEvents JSON, one per line).
        #[arg(long)]
        events: PathBuf,
        /// The stream name the events get.
        #[arg(long, default_value = "events")]
        stream: String,
        /// Print this query's rows (a JSON array of objects) instead of the
        /// key/value state.
        #[arg(long)]
        sql: Option<String>,
        /// Events per batch.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
    /// Print every projection's status as a JSON array: name, module
    /// (sha256), checkpoint, head, lag, state, dead_letters.
    Status {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
    },
    /// List, retry or discard a projection's dead letters (works while
    /// `run` is running).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Run a read-only SQL query on a projection's database and print the
    /// rows as a JSON array of objects.
    Query {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
        /// The projection's name.
        projection: String,
        /// The query, e.g. "SELECT * FROM allowlist".
        #[arg(long)]
        sql: String,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print the dead letters as a JSON array (id, position, stream, type,
    /// reason, module, attempts, parked_at, …).
    List {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
        /// The projection's name.
        projection: String,
    },
    /// Hand dead letters to the current module again: a success removes
    /// one, a failure keeps it with attempts + 1. Prints
    /// {"resolved": [...], "failed": [{"id", "reason"}]}.
    Retry {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
        /// The projection's name.
        projection: String,
        /// The event ids to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Retry every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Remove dead letters for good. Prints {"discarded": N}.
    Discard {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
        /// The projection's name.
        projection: String,
        /// The event ids to discard.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } => "info",
        // Replay reports dead letters itself, in its own words.
        Command::Replay { .. } => "error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROJECTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run { config } => run(&Config::load(&config)?),
        Command::Append { data, stream, file } => {
            projector::event_log::validate_stream_name(&stream)?;
            let (text, origin) = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read standard input")?;
                (text, "stdin".to_string())
            } else {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                (text, file.display().to_string())
            };
            let events = cloudevents::parse_lines(&text, &origin)?;
            let outcome = EventLog::open(&data)?.append(&stream, &events)?;
            println!("{}", serde_json::to_string(&outcome)?);
            Ok(())
        }
        Command::Replay {
            module,
            events,
            stream,
            sql,
            batch,
        } => {
            let outcome = replay(&ReplayOptions {
                module,
                events,
                stream,
                sql,
                batch: batch as usize,
            })?;
            if outcome.duplicates > 0 {
                eprintln!(
                    "replay: skipped {} events whose id came earlier in the file",
                    outcome.duplicates
                );
            }
            for (id, position, reason) in &outcome.dead_letters {
                eprintln!(
                    "replay: event {id} (position {position}) parked as a dead letter: {reason}"
                );
            }
            println!("{}", serde_json::to_string_pretty(&outcome.output)?);
            Ok(())
        }
        Command::Status { config } => {
            let status = inspect::status(&Config::load(&config)?)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
        Command::DeadLetters { action } => {
            let output = match action {
                DeadLetterAction::List { config, projection } => {
                    serde_json::to_value(dead_letters::list(&Config::load(&config)?, &projection)?)?
                }
                DeadLetterAction::Retry {
                    config,
                    projection,
                    ids,
                    all,
                } => {
                    let selection = if all {
                        Selection::All
                    } else {
                        Selection::Ids(ids)
                    };
                    let config = Config::load(&config)?;
                    serde_json::to_value(dead_letters::retry(&config, &projection, &selection)?)?
                }
                DeadLetterAction::Discard {
                    config,
                    projection,
                    ids,
                } => {
                    let discarded =
                        dead_letters::discard(&Config::load(&config)?, &projection, &ids)?;
                    serde_json::json!({ "discarded": discarded })
                }
            };
            println!("{}", serde_json::to_string_pretty(&output)?);
            Ok(())
        }
        Command::Query {
            config,
            projection,
            sql,
        } => {
            let rows = inspect::query(&Config::load(&config)?, &projection, &sql)?;
            println!("{}", serde_json::to_string_pretty(&rows)?);
            Ok(())
        }
    }
}

fn run(config: &Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let supervisor = Supervisor::start(config)?;
    tracing::info!(
        projections = config.projections.len(),
        data = %config.data.display(),
        "projector running; stop with Ctrl-C or SIGTERM"
    );
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    tracing::info!("stopping: finishing the batches in flight");
    supervisor.stop();
    Ok(())
}
