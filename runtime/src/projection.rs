//! [`ProjectionRunner`]: one projection's processing loop.
//!
//! 1. read the next batch after the checkpoint (types it does not subscribe
//!    to are skipped in the read);
//! 2. `BEGIN`; `handle(batch)`; write the new checkpoint; `COMMIT` — so the
//!    effect on state is exactly once, whatever the source redelivers;
//! 3. on `retry`: roll back, back off, try again; on `reject` or a trap: roll
//!    back, split the batch to find the event, and park it as a dead letter
//!    in the transaction that moves the checkpoint past it.
//!
//! A guest's linear memory is a cache, never the truth: an instance that
//! trapped is thrown away and a fresh one made from its `InstancePre`.

use crate::bindings::{Event, Failure, Projection};
use crate::engine::{LoadedModule, ProjectorEngine};
use crate::event_log::{EventLog, Filter, LogReader, POLL_INTERVAL};
use crate::guest_host::GuestHost;
use crate::projection_db::{self, LOG_SOURCE};
use anyhow::{Context as _, Result, bail};
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::Store;

/// Where a projection's pieces are.
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

/// A live instance: its store (which owns the database connection) and
/// the typed exports.
struct Live {
    store: Store<GuestHost>,
    guest: Projection,
}

/// Runs one projection: a module over the event log into its database.
pub struct ProjectionRunner {
    name: Arc<str>,
    engine: Arc<ProjectorEngine>,
    module: LoadedModule,
    live: Option<Live>,
    reader: LogReader,
    filter: Filter,
    batch_size: usize,
    checkpoint: u64,
    stop: Arc<AtomicBool>,
    handled: u64,
    parked: u64,
}

impl ProjectionRunner {
    /// Load the module, open the database, instantiate and `init`.
    ///
    /// `stop`, when set, makes [`ProjectionRunner::run`] return after the
    /// batch in flight.
    pub fn start(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        log: &EventLog,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let name: Arc<str> = spec.name.as_str().into();
        let module = engine
            .load_file(&spec.module)
            .with_context(|| format!("projection {name}: cannot load its module"))?;
        let db = projection_db::open(&spec.database)?;
        let mut runner = ProjectionRunner {
            name: name.clone(),
            engine,
            module,
            live: None,
            reader: log.reader()?,
            filter: spec.filter.clone(),
            batch_size: spec.batch_size,
            checkpoint: projection_db::checkpoint(&db, LOG_SOURCE)?,
            stop,
            handled: 0,
            parked: 0,
        };
        runner.instantiate(GuestHost::new(db, name)?)?;
        let db = runner.db();
        projection_db::set_meta(db, "module", Some(&runner.module.sha256))?;
        projection_db::set_meta(
            db,
            "module_path",
            Some(&runner.module.path.to_string_lossy()),
        )?;
        projection_db::set_meta(db, "error", None)?;
        Ok(runner)
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sha256 of the running module.
    pub fn module_sha256(&self) -> &str {
        &self.module.sha256
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
        self.live
            .as_ref()
            .expect("a live instance")
            .store
            .data()
            .db()
    }

    /// Process until the stop flag is set. The batch in flight commits or
    /// rolls back as a whole; nothing is half-applied.
    pub fn run(&mut self) -> Result<()> {
        projection_db::set_meta(self.db(), "state", Some("running"))?;
        while !self.stop.load(Ordering::Relaxed) {
            if self.step()? == Step::Idle {
                self.reader.wait(POLL_INTERVAL);
            }
        }
        Ok(())
    }

    /// Process until the checkpoint reaches the log's head.
    pub fn catch_up(&mut self) -> Result<()> {
        while !matches!(self.step()?, Step::Idle | Step::Stopped) {}
        Ok(())
    }

    /// Read one batch and apply it.
    pub fn step(&mut self) -> Result<Step> {
        let batch = self
            .reader
            .read_after(self.checkpoint, &self.filter, self.batch_size)?;
        if batch.scanned_to == self.checkpoint {
            return Ok(Step::Idle);
        }
        if batch.events.is_empty() {
            // Only events of other streams or types: move past them.
            let db = self.db();
            projection_db::set_checkpoint(db, LOG_SOURCE, batch.scanned_to)?;
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
            let reason = match self.handle_in_transaction(events, checkpoint_after)? {
                None => {
                    self.handled += events.len() as u64;
                    return Ok(true);
                }
                Some(Failure::Retry(reason)) => {
                    let wait = RETRY_BACKOFF_START
                        .saturating_mul(1 << attempts.min(16))
                        .min(RETRY_BACKOFF_CAP);
                    tracing::warn!(
                        projection = &*self.name,
                        first_position = events[0].position,
                        events = events.len(),
                        attempts,
                        "module asked to retry: {reason}; retrying in {wait:?}"
                    );
                    if !self.sleep_unless_stopped(wait) {
                        return Ok(false);
                    }
                    continue;
                }
                Some(Failure::Reject(reason)) => reason,
            };
            if events.len() > 1 {
                // Split to find the event: the halves commit on their own.
                let mid = events.len() / 2;
                return Ok(self.apply(&events[..mid], events[mid - 1].position)?
                    && self.apply(&events[mid..], checkpoint_after)?);
            }
            self.park(&events[0], &reason, attempts, checkpoint_after)?;
            return Ok(true);
        }
    }

    /// One attempt: `BEGIN`, `handle`, checkpoint, `COMMIT`. Returns the
    /// guest's failure (a trap counts as a reject) after rolling back.
    fn handle_in_transaction(
        &mut self,
        events: &[Event],
        checkpoint_after: u64,
    ) -> Result<Option<Failure>> {
        let live = self.live.as_mut().expect("a live instance");
        live.store
            .data()
            .db()
            .prepare_cached("BEGIN")?
            .execute([])?;
        live.store.data_mut().set_batch(events);
        let result = live.guest.call_handle(&mut live.store, events);
        let db = live.store.data().db();
        match result {
            Ok(Ok(())) => {
                projection_db::set_checkpoint(db, LOG_SOURCE, checkpoint_after)?;
                db.prepare_cached("COMMIT")?
                    .execute([])
                    .with_context(|| format!("projection {}: cannot commit a batch", self.name))?;
                self.checkpoint = checkpoint_after;
                Ok(None)
            }
            Ok(Err(failure)) => {
                db.prepare_cached("ROLLBACK")?.execute([])?;
                Ok(Some(failure))
            }
            Err(trap) => {
                db.prepare_cached("ROLLBACK")?.execute([])?;
                let host_error = live.store.data_mut().take_host_error();
                if let Some(err) = host_error {
                    return Err(err.context(format!("projection {}: the host failed", self.name)));
                }
                let reason = format!("module trapped: {:#}", anyhow::Error::from(trap));
                tracing::warn!(
                    projection = &*self.name,
                    first_position = events[0].position,
                    events = events.len(),
                    "{reason}; making a fresh instance"
                );
                let live = self.live.take().expect("a live instance");
                self.instantiate(live.store.into_data())?;
                Ok(Some(Failure::Reject(reason)))
            }
        }
    }

    /// Park `event` and move the checkpoint past it, in one transaction.
    fn park(
        &mut self,
        event: &Event,
        reason: &str,
        attempts: u32,
        checkpoint_after: u64,
    ) -> Result<()> {
        let db = self.db();
        db.prepare_cached("BEGIN")?.execute([])?;
        projection_db::park(db, LOG_SOURCE, event, reason, &self.module.sha256, attempts)?;
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

    /// Make a fresh instance over `host` and run the module's `init` in a
    /// transaction, recording the state version it builds.
    fn instantiate(&mut self, host: GuestHost) -> Result<()> {
        let name = &self.name;
        let shown = self.module.path.display();
        let mut store = Store::new(self.engine.engine(), host);
        let guest = self
            .module
            .pre
            .instantiate(&mut store)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("projection {name}: module {shown} failed to instantiate"))?;
        let version = guest
            .call_state_version(&mut store)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!("projection {name}: module {shown} trapped in state-version")
            })?;
        let db = store.data().db();
        let found = projection_db::meta(db, "state_version")?
            .map(|v| v.parse::<u32>())
            .transpose()
            .context("the database's state_version is not a number")?;
        if let Some(found) = found
            && found != version
        {
            bail!(
                "projection {name}: module {shown} builds state version {version} but the \
                 database {} holds version {found}; remove the database to rebuild it from the log",
                db.path().unwrap_or("?")
            );
        }
        db.prepare_cached("BEGIN")?.execute([])?;
        match guest.call_init(&mut store, found) {
            Ok(Ok(())) => {
                let db = store.data().db();
                projection_db::set_meta(db, "state_version", Some(&version.to_string()))?;
                db.prepare_cached("COMMIT")?.execute([])?;
            }
            Ok(Err(reason)) => {
                store.data().db().prepare_cached("ROLLBACK")?.execute([])?;
                bail!("projection {name}: module {shown} refused to init: {reason}");
            }
            Err(trap) => {
                store.data().db().prepare_cached("ROLLBACK")?.execute([])?;
                return Err(anyhow::Error::from(trap)
                    .context(format!("projection {name}: module {shown} trapped in init")));
            }
        }
        self.live = Some(Live { store, guest });
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
