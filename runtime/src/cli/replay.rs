//! `projector replay`: run one module over a JSONL file of CloudEvents in a
//! temporary event log and database, with the same rules as `run` (a
//! repeated event id is skipped), and return the state it built. The
//! fastest development loop, and what tests and CI drive.

use crate::config::FailurePolicy;
use crate::projection::live::LiveProjection;
use crate::projection::runner::{ProjectionRunner, ProjectionSpec};
use crate::sandbox::engine::{Limits, ProjectorEngine};
use crate::serve::inspect;
use crate::sources::cloudevents;
use crate::sources::embedded::{EmbeddedOpener, EventLog};
use crate::sources::{Filter, SourceOpener};
use anyhow::{Context as _, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The module file.
    pub module: PathBuf,
    /// The JSONL file of CloudEvents.
    pub events: PathBuf,
    /// The stream the events are appended to.
    pub stream: String,
    /// A query whose rows to return instead of the key/value state.
    pub sql: Option<String>,
    /// Send this request to the module's `query` after the replay and print
    /// its answer instead of the state.
    pub request: Option<String>,
    /// Events per batch.
    pub batch: usize,
}

/// What a replay produced.
#[derive(Debug)]
pub struct ReplayOutcome {
    /// The key/value state as a JSON object, or the query's rows.
    pub output: Value,
    /// Events in the file whose id came earlier and were skipped.
    pub duplicates: u64,
    /// Dead letters parked: `(event id, position, reason)`.
    pub dead_letters: Vec<(String, u64, String)>,
}

/// A progress bar on stderr when stdout is a terminal; none otherwise, so
/// piped output stays exactly the JSON.
pub fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events ({per_sec}, eta {eta})")
            .expect("a valid progress template"),
    );
    Some(bar)
}

/// Replay `options.events` through `options.module`.
pub fn replay(options: &ReplayOptions) -> Result<ReplayOutcome> {
    let origin = options.events.display().to_string();
    let text = std::fs::read_to_string(&options.events)
        .with_context(|| format!("cannot read events file {origin}"))?;
    let events = cloudevents::parse_lines(&text, &origin)?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let log = Arc::new(EventLog::open(dir.path())?);
    let appended = log.append(&options.stream, &events)?;
    let opener: Arc<dyn SourceOpener> = Arc::new(EmbeddedOpener::new(log));
    let engine = Arc::new(ProjectorEngine::new(false)?);
    let spec = ProjectionSpec {
        name: "replay".into(),
        module: options.module.clone(),
        database: dir.path().join("replay.db"),
        filter: Filter::default(),
        batch_size: options.batch,
        limits: Limits::default(),
        policy: FailurePolicy::DeadLetter,
    };
    let live = Arc::new(LiveProjection::new("replay", Arc::default()));
    let mut runner =
        ProjectionRunner::start(engine.clone(), &spec, &opener, Arc::new(AtomicBool::new(false)), live)?;
    let bar = progress_bar(appended.appended);
    runner.catch_up_with(|checkpoint, head| {
        if let Some(bar) = &bar {
            bar.set_length(head);
            bar.set_position(checkpoint);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let db = runner.db();
    let output = match (&options.sql, &options.request) {
        (Some(sql), _) => Value::Array(inspect::rows_json(db, sql)?),
        (None, Some(request)) => {
            // As `run` serves it: a read-only instance over a read-only
            // connection to the state the replay built.
            let reader =
                crate::store::open_read_only(&spec.database)?.context("the replay's database is missing")?;
            let host = crate::sandbox::host::GuestHost::new(reader, "replay".into(), spec.limits)?;
            let mut instance =
                crate::sandbox::instance::GuestInstance::reader(engine, runner.module().clone(), host)?;
            match instance.query(request.as_bytes())? {
                crate::sandbox::instance::QueryOutcome::Answer(answer) => serde_json::from_slice(&answer)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&answer).into_owned())),
                crate::sandbox::instance::QueryOutcome::Refused(reason) => {
                    anyhow::bail!("the module refused the request {request}: {reason}")
                }
                crate::sandbox::instance::QueryOutcome::Trapped(reason) => {
                    anyhow::bail!("the module failed the request {request}: {reason}")
                }
            }
        }
        (None, None) => inspect::state_json(db)?,
    };
    let mut stmt = db.prepare("SELECT id, position, reason FROM projector_dead_letters ORDER BY position")?;
    let dead_letters = stmt
        .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(ReplayOutcome { output, duplicates: appended.duplicates, dead_letters })
}
