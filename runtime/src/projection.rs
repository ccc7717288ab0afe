//! [`ProjectionRunner`]: one projection's processing loop.
//!
//! 1. read the next batch after the checkpoint (types it does not subscribe
//!    to are skipped in the read);
//! 2. `BEGIN`; `handle(batch)`; write the new checkpoint; `COMMIT` — so the
//!    effect on state is exactly once, whatever the source redelivers;
//! 3. on `retry`: roll back, back off, try again (shown in status); on
//!    `reject` or a trap: roll back, split the batch to find the event, then
//!    by policy park it as a dead letter in the transaction that moves the
//!    checkpoint past it, or halt the projection as faulted before it.

use crate::bindings::{Event, Failure};
use crate::config::FailurePolicy;
use crate::engine::{Limits, ProjectorEngine};
use crate::event_log::{EventLog, Filter, LogReader, POLL_INTERVAL};
use crate::guest_host::GuestHost;
use crate::instance::{Attempt, GuestInstance};
use crate::live::LiveProjection;
use crate::projection_db::{self, LOG_SOURCE};
use anyhow::{Context as _, Result, bail};
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where a projection's pieces are, and how it runs.
#[derive(Debug, Clone)]
pub struct ProjectionSpec {
    /// The projection's name.
    pub name: String,
    /// The module file.
    pub module: PathBuf,
    /// The projection's database file.
    pub database: PathBuf,
    /// Which events it consumes.
    pub filter: Filter,
    /// At most this many events per batch.
    pub batch_size: usize,
    /// The sandbox's limits.
    pub limits: Limits,
    /// What to do with an event the module rejects or traps on.
    pub policy: FailurePolicy,
}

/// What one step of the loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing new in the log.
    Idle,
    /// The checkpoint moved; this many events were handed to the module.
    Advanced(usize),
    /// A stop was requested while a batch waited to be retried.
    Stopped,
}

/// The first retry waits this long; each next one twice as long…
const RETRY_BACKOFF_START: Duration = Duration::from_millis(10);
/// …up to this.
const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Runs one projection: a module over the event log into its database.
pub struct ProjectionRunner {
    name: Arc<str>,
    instance: GuestInstance,
    reader: LogReader,
    filter: Filter,
    batch_size: usize,
    policy: FailurePolicy,
    checkpoint: u64,
    stop: Arc<AtomicBool>,
    live: Arc<LiveProjection>,
    retrying: bool,
    handled: u64,
    parked: u64,
}

impl ProjectionRunner {
    /// Load the module, open the database, instantiate and `init`.
    ///
    /// `stop`, when set, makes [`ProjectionRunner::run`] return after the
    /// batch in flight; `live` is what it shares with the HTTP API.
    pub fn start(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        log: &EventLog,
        stop: Arc<AtomicBool>,
        live: Arc<LiveProjection>,
    ) -> Result<Self> {
        let name: Arc<str> = spec.name.as_str().into();
        let module = engine
            .load_file(&spec.module)
            .with_context(|| format!("projection {name}: cannot load its module"))?;
        let db = projection_db::open(&spec.database)?;
        let checkpoint = projection_db::checkpoint(&db, LOG_SOURCE)?;
        let host = GuestHost::new(db, name.clone(), spec.limits)?;
        let instance = GuestInstance::new(engine, module, host)?;
        let db = instance.db();
        projection_db::set_meta(db, "module", Some(&instance.module().sha256))?;
        projection_db::set_meta(db, "module_path", Some(&instance.module().path.to_string_lossy()))?;
        projection_db::set_meta(db, "error", None)?;
        projection_db::set_meta(db, "retrying", None)?;
        live.set_module(instance.module().clone());
        // Every series exists from the start, at zero.
        let _ = live.metrics.module_swaps.get_or_create(&crate::metrics::Metrics::label(&name));
        let _ = live.metrics.events_processed.get_or_create(&crate::metrics::Metrics::label(&name));
        Ok(ProjectionRunner {
            name,
            instance,
            reader: log.reader()?,
            filter: spec.filter.clone(),
            batch_size: spec.batch_size,
            policy: spec.policy,
            checkpoint,
            stop,
            live,
            retrying: false,
            handled: 0,
            parked: 0,
        })
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sha256 of the running module.
    pub fn module_sha256(&self) -> &str {
        &self.instance.module().sha256
    }

    /// The position up to which every event's effect is committed.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Events handed to the module and committed, since start.
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// Events parked as dead letters, since start.
    pub fn parked(&self) -> u64 {
        self.parked
    }

    /// The projection's database (processing connection).
    pub fn db(&self) -> &Connection {
        self.instance.db()
    }

    /// Process until the stop flag is set. The batch in flight commits or
    /// rolls back as a whole; nothing is half-applied.
    pub fn run(&mut self) -> Result<()> {
        projection_db::set_meta(self.db(), "state", Some("running"))?;
        let mut paused = false;
        while !self.stop.load(Ordering::Relaxed) {
            if self.live.is_paused() != paused {
                paused = !paused;
                let state = if paused { "paused" } else { "running" };
                projection_db::set_meta(self.db(), "state", Some(state))?;
                tracing::info!(projection = &*self.name, checkpoint = self.checkpoint, "{state}");
            }
            if paused {
                std::thread::sleep(POLL_INTERVAL);
            } else if self.step()? == Step::Idle {
                self.reader.wait(POLL_INTERVAL);
            }
        }
        Ok(())
    }

    /// Process until the checkpoint reaches the log's head.
    pub fn catch_up(&mut self) -> Result<()> {
        self.catch_up_with(|_, _| {})
    }

    /// [`ProjectionRunner::catch_up`], calling `progress(checkpoint, head)`
    /// after every batch.
    pub fn catch_up_with(&mut self, mut progress: impl FnMut(u64, u64)) -> Result<()> {
        let head = self.reader.head()?;
        while !matches!(self.step()?, Step::Idle | Step::Stopped) {
            progress(self.checkpoint, head.max(self.checkpoint));
        }
        Ok(())
    }

    /// Read one batch and apply it.
    pub fn step(&mut self) -> Result<Step> {
        let batch = self.reader.read_after(self.checkpoint, &self.filter, self.batch_size)?;
        if batch.scanned_to == self.checkpoint {
            return Ok(Step::Idle);
        }
        if batch.events.is_empty() {
            // Only events of other streams or types: move past them.
            projection_db::set_checkpoint(self.db(), LOG_SOURCE, batch.scanned_to)?;
            self.checkpoint = batch.scanned_to;
            return Ok(Step::Advanced(0));
        }
        if !self.apply(&batch.events, batch.scanned_to)? {
            return Ok(Step::Stopped);
        }
        Ok(Step::Advanced(batch.events.len()))
    }

    /// Apply `events` and move the checkpoint to `checkpoint_after`. Returns
    /// false if a stop was requested before it could commit.
    fn apply(&mut self, events: &[Event], checkpoint_after: u64) -> Result<bool> {
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let started = std::time::Instant::now();
            let attempt = self.instance.handle_in_transaction(events, |db| {
                projection_db::set_checkpoint(db, LOG_SOURCE, checkpoint_after)
            })?;
            let metrics = &self.live.metrics;
            match &attempt {
                Attempt::Committed => self.live.record_batch(events.len(), started.elapsed()),
                Attempt::Failed(Failure::Retry(reason)) => {
                    metrics.guest_error(&self.name, "retry");
                    self.live.set_last_error(Some(format!("retry: {reason}")));
                }
                Attempt::Failed(Failure::Reject(reason)) => {
                    metrics.guest_error(&self.name, "reject");
                    self.live.set_last_error(Some(format!("reject: {reason}")));
                }
                Attempt::Trapped(reason) => {
                    metrics.guest_error(&self.name, "trap");
                    self.live.set_last_error(Some(reason.clone()));
                }
            }
            let reason = match attempt {
                Attempt::Committed => {
                    self.checkpoint = checkpoint_after;
                    self.handled += events.len() as u64;
                    if std::mem::take(&mut self.retrying) {
                        projection_db::set_meta(self.db(), "retrying", None)?;
                    }
                    return Ok(true);
                }
                Attempt::Failed(Failure::Retry(reason)) => {
                    let wait = RETRY_BACKOFF_START
                        .saturating_mul(1 << (attempts - 1).min(16))
                        .min(RETRY_BACKOFF_CAP);
                    tracing::warn!(
                        projection = &*self.name,
                        first_position = events[0].position,
                        events = events.len(),
                        attempts,
                        "module asked to retry: {reason}; retrying in {wait:?}"
                    );
                    let retrying = serde_json::json!({
                        "position": events[0].position,
                        "attempts": attempts,
                        "reason": reason,
                    });
                    projection_db::set_meta(self.db(), "retrying", Some(&retrying.to_string()))?;
                    self.retrying = true;
                    if !self.sleep_unless_stopped(wait) {
                        return Ok(false);
                    }
                    continue;
                }
                Attempt::Failed(Failure::Reject(reason)) => reason,
                Attempt::Trapped(reason) => reason,
            };
            if events.len() > 1 {
                // Split to find the event: the halves commit on their own.
                let mid = events.len() / 2;
                return Ok(self.apply(&events[..mid], events[mid - 1].position)?
                    && self.apply(&events[mid..], checkpoint_after)?);
            }
            let event = &events[0];
            match self.policy {
                FailurePolicy::DeadLetter => self.park(event, &reason, attempts, checkpoint_after)?,
                FailurePolicy::Halt => bail!(
                    "halted at event {} (position {}): {reason}; the checkpoint stays at {} \
                     (on_failure = \"halt\"): fix the module or the event, then restart",
                    event.id,
                    event.position,
                    self.checkpoint
                ),
            }
            return Ok(true);
        }
    }

    /// Park `event` and move the checkpoint past it, in one transaction.
    fn park(&mut self, event: &Event, reason: &str, attempts: u32, checkpoint_after: u64) -> Result<()> {
        let module = self.instance.module().sha256.clone();
        let db = self.db();
        db.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        projection_db::park(db, LOG_SOURCE, event, reason, &module, attempts)?;
        projection_db::set_checkpoint(db, LOG_SOURCE, checkpoint_after)?;
        db.prepare_cached("COMMIT")?.execute([])?;
        self.checkpoint = checkpoint_after;
        self.parked += 1;
        tracing::warn!(
            projection = &*self.name,
            event_id = %event.id,
            correlation_id = event.correlation_id.as_deref().unwrap_or(""),
            position = event.position,
            "event parked as a dead letter: {reason}"
        );
        Ok(())
    }

    fn sleep_unless_stopped(&self, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5).min(wait));
        }
        !self.stop.load(Ordering::Relaxed)
    }
}
