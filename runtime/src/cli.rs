//! The `projector` command line: run the host, append to and read the
//! event log or publish to a NATS or Redis stream, replay a module offline, and
//! inspect and operate projections — from the files, or with `--url`
//! through a running host's HTTP API; and write projections: scaffold,
//! build and develop one (`new`, `build`, `dev`).

pub mod build;
pub mod dev;
pub mod events;
pub mod new;
pub mod remote;
pub mod replay;

use crate::config::Config;
use crate::config::paths::request_path;
use crate::projection::dead_letters::{self, Selection};
use crate::projection::fault::{FaultFile, FaultKind};
use crate::projection::supervisor::Supervisor;
use crate::serve::http::{Api, ApiOptions, router};
use crate::serve::inspect;
use crate::sources::cloudevents;
use crate::sources::embedded::EventLog;
use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use remote::Remote;
use replay::{ReplayOptions, replay};
use serde_json::{Value, json};
use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Feed event streams to sandboxed WebAssembly projection modules, each
/// building its own SQLite state.
#[derive(Parser)]
#[command(name = "projector", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where to find the projections: the config's files, or a running host.
#[derive(Args)]
struct Target {
    /// The config file (projector.toml).
    #[arg(long, short, default_value = "projector.toml")]
    config: PathBuf,
    /// Talk to a running `projector run` at this URL (e.g.
    /// http://127.0.0.1:7070) instead of reading the files. The API token,
    /// when the config's `[http] token_file` names one, is sent with it.
    #[arg(long)]
    url: Option<String>,
}

impl Target {
    /// The running host at `--url`, if given, with the config's API token.
    fn remote(&self) -> Result<Option<Remote>> {
        let Some(url) = &self.url else { return Ok(None) };
        // With --url the config is optional: it only brings the token.
        let token = match self.config.exists() {
            true => crate::serve::http::load_token(&Config::load(&self.config)?)?,
            false => None,
        };
        Ok(Some(Remote::new(url, token)))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run every projection of a config, and the HTTP API, until SIGINT or
    /// SIGTERM.
    Run {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
        /// Serve the HTTP API on this address (port 0 picks a free one; the
        /// address is written to <data>/listen.addr).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// Refuse HTTP request bodies larger than this, in KiB (1 to
        /// 1048576, i.e. 1 GiB).
        #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
        max_body_kib: u32,
    },
    /// Append CloudEvents (JSON, one per line) to a stream of the event log.
    /// All or nothing: one bad line appends nothing. Events without a
    /// correlation id get one id for this append. Prints
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
    /// Print a stream of the event log as CloudEvents JSON, one per line:
    /// what was appended and what projections published. Works while `run`
    /// runs.
    Events {
        /// The data folder holding events.db (the config's `data`).
        #[arg(long)]
        data: PathBuf,
        /// The stream to print.
        stream: String,
        /// Start at the stream's event at this position (its first is 1).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Keep printing events as they are appended, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Publish CloudEvents (JSON, one per line) to a source of the config;
    /// one bad line publishes nothing. Prints {"published": N,
    /// "duplicates": M}.
    ///
    /// NATS JetStream: structured mode with `Nats-Msg-Id` set to each
    /// event's id (the stream stores an id it has seen within its duplicate
    /// window once); creates the stream (capturing `<first token of
    /// subject>.>`) when it does not exist. Kafka: the topic must exist;
    /// structured mode, keyed by `partitionkey` or else `subject`, with an
    /// idempotent producer. Redis: `XADD` to the stream key, the event in
    /// field `cloudevent`, in one script; an id published to the key before
    /// is dropped (the ids are kept in the set `projector:ids:{<key>}`).
    Publish {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
        /// The `[sources.<name>]` to publish to.
        #[arg(long)]
        source: String,
        /// The subject to publish on (NATS, e.g. wallets.eu), the topic
        /// (Kafka), or the stream key to add to (Redis, e.g. wallets).
        #[arg(value_name = "SUBJECT|TOPIC|KEY")]
        subject: String,
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
        #[arg(long, conflicts_with = "request")]
        sql: Option<String>,
        /// After the replay, send this request to the module's own `query`
        /// and print its answer, e.g. '{"user_id": "u1"}'.
        #[arg(long)]
        request: Option<String>,
        /// Events per batch.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
    },
    /// Print every projection's status as a JSON array: name, module
    /// (sha256), checkpoint, head, lag, state, dead_letters.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Read a projection: a read-only SQL query (rows as a JSON array of
    /// objects), or a request to the module's own `query`.
    Query {
        #[command(flatten)]
        target: Target,
        /// The projection's name.
        projection: String,
        /// A read-only SQL query, e.g. "SELECT * FROM allowlist".
        #[arg(long, required_unless_present = "request", conflicts_with = "request")]
        sql: Option<String>,
        /// A request for the module's `query` export, e.g.
        /// '{"wallet_address": "0xA1"}'.
        #[arg(long)]
        request: Option<String>,
    },
    /// Rebuild a projection's state from the log with its module: into a
    /// new database that takes over when caught up, while the old one keeps
    /// serving. Asks a running `run` to do it, or does it here.
    Rebuild {
        /// The config file (projector.toml).
        #[arg(long, short, default_value = "projector.toml")]
        config: PathBuf,
        /// The projection's name.
        projection: String,
    },
    /// List, retry or discard a projection's dead letters (works while
    /// `run` is running).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Scaffold a projection crate (projections/<name>, or --dir): an example
    /// event type and typed query, native tests, a fixture and a dev config.
    New(new::NewArgs),
    /// Build guest crates for wasm32-unknown-unknown and print each module's
    /// path (<workspace>/target/projections/<crate_name>.wasm).
    Build(build::BuildArgs),
    /// Build a projection crate, run it in a host with the crate's config
    /// and fixture, serve the API, and rebuild and swap it in on every save.
    Dev(dev::DevArgs),
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print the dead letters as a JSON array (id, position, stream, type,
    /// reason, module, attempts, parked_at, …).
    List {
        #[command(flatten)]
        target: Target,
        /// The projection's name.
        projection: String,
    },
    /// Hand dead letters to the current module again: a success removes
    /// one, a failure keeps it with attempts + 1. Prints
    /// {"resolved": [...], "failed": [{"id", "reason"}]}.
    Retry {
        #[command(flatten)]
        target: Target,
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
        #[command(flatten)]
        target: Target,
        /// The projection's name.
        projection: String,
        /// The event ids to discard.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Run the command line: parse it, run the command, report.
pub fn main() -> ExitCode {
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

fn print(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `/projections/{name}` with the name escaped for a URL path.
fn path(name: &str, rest: &str) -> String {
    let escaped: String = name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/projections/{escaped}{rest}")
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run { config, listen, max_body_kib } => {
            run(&Config::load(&config)?, &config, &listen, (max_body_kib as usize) << 10)
        }
        Command::Append { data, stream, file } => {
            crate::config::validate_stream_name(&stream)?;
            let events = read_events(&file)?;
            print(&EventLog::open(&data)?.append(&stream, &events)?)
        }
        Command::Events { data, stream, from, follow } => events::print_stream(&data, &stream, from, follow),
        Command::Publish { config: config_path, source, subject, file } => {
            let config = Config::load(&config_path)?;
            let Some(found) = config.sources.get(&source) else {
                let known: Vec<&str> = config.sources.keys().map(String::as_str).collect();
                anyhow::bail!(
                    "{} has no source named {source:?}; {}",
                    config_path.display(),
                    match known.is_empty() {
                        true =>
                            "add one: [sources.bus] nats = \"nats://127.0.0.1:4222\", stream = \"EVENTS\"; \
                                 [sources.orders] kafka = [\"127.0.0.1:9092\"]; or [sources.cache] redis = \
                                 \"redis://127.0.0.1:6379\""
                                .to_string(),
                        false => format!("it has: {}", known.join(", ")),
                    }
                );
            };
            if let Some(url) = &found.redis {
                crate::sources::redis::validate_key(&subject)?;
                let events = read_events(&file)?;
                return print(&crate::sources::redis::publish(url, &subject, &events)?);
            }
            if let Some(servers) = &found.kafka {
                crate::config::validate_topic(&subject).map_err(anyhow::Error::msg)?;
                let (events, keys) = read_keyed_events(&file)?;
                return print(&crate::sources::kafka::publish(&servers.urls(), &subject, &events, &keys)?);
            }
            let (Some(servers), Some(stream)) = (&found.nats, &found.stream) else {
                unreachable!("a source is NATS, Kafka or Redis, checked at load")
            };
            crate::sources::nats::validate_subject(&subject)?;
            let events = read_events(&file)?;
            print(&crate::sources::nats::publish(&servers.urls(), stream, &subject, &events)?)
        }
        Command::Replay { module, events, stream, sql, request, batch } => {
            let outcome =
                replay(&ReplayOptions { module, events, stream, sql, request, batch: batch as usize })?;
            if outcome.duplicates > 0 {
                eprintln!("replay: skipped {} events whose id came earlier in the file", outcome.duplicates);
            }
            for (id, position, reason) in &outcome.dead_letters {
                eprintln!("replay: event {id} (position {position}) parked as a dead letter: {reason}");
            }
            print(&outcome.output)
        }
        Command::Status { target } => match target.remote()? {
            Some(remote) => print(&remote.get("/projections")?),
            None => print(&inspect::status(&Config::load(&target.config)?)?),
        },
        Command::Query { target, projection, sql, request } => match (target.remote()?, sql, request) {
            (Some(remote), Some(sql), _) => {
                print(&remote.post_json(&path(&projection, "/sql"), &json!({ "sql": sql }))?)
            }
            (Some(remote), None, Some(request)) => {
                print(&remote.post_bytes(&path(&projection, "/query"), request.as_bytes())?)
            }
            (None, Some(sql), _) => {
                print(&inspect::query(&Config::load(&target.config)?, &projection, &sql)?)
            }
            (None, None, Some(request)) => {
                let answer =
                    inspect::guest_query(&Config::load(&target.config)?, &projection, request.as_bytes())?;
                match serde_json::from_slice::<Value>(&answer) {
                    Ok(value) => print(&value),
                    Err(_) => {
                        println!("{}", String::from_utf8_lossy(&answer));
                        Ok(())
                    }
                }
            }
            (_, None, None) => unreachable!("clap requires --sql or --request"),
        },
        Command::Rebuild { config, projection } => rebuild(&Config::load(&config)?, &projection),
        Command::New(args) => new::run(args),
        Command::Build(args) => build::run(args),
        Command::Dev(args) => dev::run(args),
        Command::DeadLetters { action } => match action {
            DeadLetterAction::List { target, projection } => match target.remote()? {
                Some(remote) => print(&remote.get(&path(&projection, "/dead-letters"))?),
                None => print(&dead_letters::list(&Config::load(&target.config)?, &projection)?),
            },
            DeadLetterAction::Retry { target, projection, ids, all } => match target.remote()? {
                Some(remote) => print(&remote.post_json(
                    &path(&projection, "/dead-letters/retry"),
                    &json!({ "ids": ids, "all": all }),
                )?),
                None => {
                    let selection = if all { Selection::All } else { Selection::Ids(ids) };
                    print(&dead_letters::retry(&Config::load(&target.config)?, &projection, &selection)?)
                }
            },
            DeadLetterAction::Discard { target, projection, ids } => match target.remote()? {
                Some(remote) => print(
                    &remote.post_json(&path(&projection, "/dead-letters/discard"), &json!({ "ids": ids }))?,
                ),
                None => {
                    let discarded = dead_letters::discard(&Config::load(&target.config)?, &projection, &ids)?;
                    print(&json!({ "discarded": discarded }))
                }
            },
        },
    }
}

/// The CloudEvents of a JSONL file (or standard input for `-`), all or
/// none; events without a correlation id get one id for this call.
fn read_events(file: &std::path::Path) -> Result<Vec<crate::sources::embedded::NewEvent>> {
    Ok(read_keyed_events(file)?.0)
}

/// The CloudEvents of a JSONL file (or `-`, stdin), each with its
/// `partitionkey` extension, if any (the Kafka record key).
fn read_keyed_events(
    file: &std::path::Path,
) -> Result<(Vec<crate::sources::embedded::NewEvent>, Vec<Option<String>>)> {
    let (bytes, origin) = if file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes).context("cannot read standard input")?;
        (bytes, "stdin".to_string())
    } else {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        (bytes, file.display().to_string())
    };
    let text = cloudevents::utf8_text(&bytes, &origin)?;
    let mut events = cloudevents::parse_lines(text, &origin)?;
    cloudevents::fill_correlation_ids(&mut events, &uuid::Uuid::new_v4().to_string());
    let keys = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let object = serde_json::from_str::<serde_json::Value>(line).ok()?;
            Some(object.get("partitionkey")?.as_str()?.to_string())
        })
        .collect();
    Ok((events, keys))
}

/// `projector rebuild`: by the running host if there is one, else here;
/// with a progress bar on a terminal.
fn rebuild(config: &Config, name: &str) -> Result<()> {
    config.projection(name)?;
    let before = config.database_path(name);
    let bar = crate::cli::replay::progress_bar(0);
    let show = |position: u64, head: u64| {
        if let Some(bar) = &bar {
            bar.set_length(head);
            bar.set_position(position);
        }
    };
    if crate::projection::offline::offline_rebuild_running(&config.data) {
        anyhow::bail!(
            "another `projector rebuild` is running on {}; wait for it to finish, then run this one",
            config.data.display()
        );
    }
    if inspect::run_lock_held(&config.data) {
        crate::projection::offline::request(config, name)?;
        eprintln!("rebuild: requested from the running host; waiting for it to take over");
        let dir = config.data.join("projections");
        while config.database_path(name) == before {
            let status = inspect::status(config)?;
            if let Some(s) = status.iter().find(|s| s.name == name) {
                if let Some(progress) = &s.rebuilding {
                    show(progress["position"].as_u64().unwrap_or(0), progress["head"].as_u64().unwrap_or(0));
                }
                if s.state == "faulted" {
                    let error = s.error.as_deref().unwrap_or("no reason recorded");
                    let kind = FaultFile::new(&dir, name).read().map(|fault| fault.kind);
                    match kind {
                        // The host rebuilds a damaged database once it takes the request.
                        Some(FaultKind::Damaged) if request_path(&dir, name).exists() => {}
                        Some(FaultKind::Retrying) => anyhow::bail!(
                            "projection {name} is faulted: {error}; the rebuild request is kept, and the \
                             host rebuilds it once it runs again"
                        ),
                        _ if request_path(&dir, name).exists() => anyhow::bail!(
                            "projection {name} is faulted: {error}; the rebuild request is kept for when \
                             it starts again (a module file that loads starts it)"
                        ),
                        _ => anyhow::bail!(
                            "projection {name} is faulted, so the running host cannot rebuild it: {error}"
                        ),
                    }
                }
                if let Some(refused) = &s.refused
                    && refused["rebuild_failed"] == true
                {
                    let reason = refused["reason"].as_str().unwrap_or("the rebuild failed");
                    anyhow::bail!("projection {name}: {reason}");
                }
            }
            if !inspect::run_lock_held(&config.data) {
                anyhow::bail!(
                    "the running host stopped before the rebuild took over; the request is kept: the \
                     host rebuilds projection {name} when it starts again"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    } else {
        crate::projection::offline::offline(config, name, show)?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let status = inspect::status(config)?.into_iter().find(|s| s.name == name);
    print(&json!({ "rebuilt": name, "database": config.database_path(name), "status": status }))
}

fn run(config: &Config, config_path: &std::path::Path, listen: &str, max_body: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Bind first: a busy port must not leave projections half started.
    let listener = runtime.block_on(tokio::net::TcpListener::bind(listen)).with_context(|| {
        format!("cannot listen on {listen}; pass --listen <addr:port> (port 0 picks a free one)")
    })?;
    let address = listener.local_addr()?;
    let token = crate::serve::http::load_token(config)?;
    if token.is_none() && !address.ip().is_loopback() {
        tracing::warn!(
            "the HTTP API listens on {address}, beyond loopback, with no token: anyone who reaches \
             it can ingest, pause, rebuild and read; set [http] token_file (see the README)"
        );
    }
    // The handlers go in before anything announces the host is up: a
    // SIGTERM right after `listen.addr` appears must stop it cleanly, not
    // kill it.
    let (mut term, mut interrupt) = {
        let _runtime = runtime.enter();
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        )
    };
    let supervisor = Supervisor::start(config, Some(config_path))?;
    let api = Arc::new(Api::new(
        supervisor.view().clone(),
        supervisor.log().clone(),
        supervisor.engines().clone(),
        supervisor.metrics().clone(),
        ApiOptions { max_body, listen: address, http: config.http.clone(), token },
    ));
    // Written whole then renamed into place: whoever polls for the file
    // (a script, the tests) never reads it empty or half written.
    let addr_file = config.data.join("listen.addr");
    let partial = config.data.join("listen.addr.partial");
    std::fs::write(&partial, address.to_string())
        .and_then(|()| std::fs::rename(&partial, &addr_file))
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
    tracing::info!(
        projections = config.projections.len(),
        data = %config.data.display(),
        "projector running, HTTP API on http://{address}/; stop with Ctrl-C or SIGTERM"
    );
    let served = runtime.block_on(async {
        let shutdown = async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
        };
        crate::serve::http::serve(listener, router(api), &config.http, shutdown)
            .await
            .context("the HTTP API failed")
    });
    tracing::info!("stopping: finishing the batches in flight");
    supervisor.stop();
    served
}
