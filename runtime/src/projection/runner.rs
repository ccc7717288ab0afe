//! [`ProjectionRunner`]: one projection's processing loop.
//!
//! 1. read the next batch after the checkpoint (types it does not subscribe
//!    to are skipped in the read);
//! 2. `BEGIN`; `handle(batch)`; write the new checkpoint; `COMMIT` — so the
//!    effect on state is exactly once, whatever the source redelivers;
//! 3. on `retry`: roll back, back off, try again (shown in status); on
//!    `reject` or a trap: roll back, split the batch to find the event, then
//!    by policy park it as a dead letter in the transaction that moves the
//!    checkpoint past it, or halt the projection as faulted before it;
//! 4. after the commit, when the batch emitted events, publish the outbox
//!    (see [`outbox`]), off the batch's transaction.

use crate::bindings::{Event, Failure};
use crate::config::FailurePolicy;
use crate::projection::live::{Command, LiveProjection, RunState};
use crate::projection::metrics::Metrics;
use crate::projection::outbox;
use crate::projection::rebuild::Rebuild;
use crate::sandbox::engine::{Limits, LoadedModule, ProjectorEngine};
use crate::sandbox::host::{GuestHost, Origin};
use crate::sandbox::instance::{Attempt, GuestInstance};
use crate::sources::Checkpoint;
use crate::sources::{Batch, Filter, Health, Publisher, Source, SourceError, SourceOpener};
use crate::store;
use anyhow::{Context as _, Result, bail};
use rusqlite::Connection;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

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
    /// At most this many events per batch; `None`: adaptive.
    pub batch_size: Option<usize>,
    /// The sandbox's limits.
    pub limits: Limits,
    /// What to do with an event the module rejects or traps on.
    pub policy: FailurePolicy,
}

/// What the module watcher (or an operator) hands a projection's thread;
/// applied between two batches.
#[derive(Clone)]
pub enum ModuleUpdate {
    /// A module file changed and its new contents compiled, linked and
    /// implement the world: swap it in.
    Ready(LoadedModule),
    /// The same, prepared off the projection's thread: an instance over a
    /// connection of its own to `database`, its `init` already run, so the
    /// swap itself is only a hand-over.
    Prepared {
        /// The new module's instance.
        instance: Arc<std::sync::Mutex<Option<GuestInstance>>>,
        /// The database it was prepared over.
        database: PathBuf,
    },
    /// A module file changed but cannot be used; the running module stays.
    Refused {
        /// sha256 of the refused file.
        sha256: String,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The state version `module` declares, asked of a throwaway instance over
/// an in-memory database (so nothing of the projection's is touched).
pub fn declared_state_version(
    engine: &Arc<ProjectorEngine>,
    name: &str,
    limits: Limits,
    module: &LoadedModule,
) -> Result<u32> {
    let host = GuestHost::new(Connection::open_in_memory()?, name.into(), limits)?;
    GuestInstance::reader(engine.clone(), module.clone(), host)?.state_version()
}

/// How the state version a module declares compares with the one a
/// database holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateVersion {
    /// The same: the module runs over the database as it is.
    Same,
    /// The database holds none yet: the module's `init` sets it.
    Fresh,
    /// Another: the state must be rebuilt from the source.
    Differs {
        /// What the database holds.
        found: String,
        /// What the module declares.
        declared: u32,
    },
}

/// The one state-version check: `module`'s declared version against
/// `found`, the database's `state_version` (none before its first `init`).
/// An error when the module cannot say (it traps in `state-version`).
pub fn check_state_version(
    engine: &Arc<ProjectorEngine>,
    name: &str,
    limits: Limits,
    module: &LoadedModule,
    found: Option<String>,
) -> Result<StateVersion> {
    let declared = declared_state_version(engine, name, limits, module)?;
    Ok(match found {
        None => StateVersion::Fresh,
        Some(found) if found == declared.to_string() => StateVersion::Same,
        Some(found) => StateVersion::Differs { found, declared },
    })
}

/// Prepare `module` for the projection `name` over `database`, off the
/// projection's thread: check the state version it declares, and if it is
/// the one the database holds, make its instance and run its `init` on a
/// connection of its own. A module with another state version is handed
/// over as is (the projection's thread starts a rebuild).
pub fn prepare_update(
    engine: &Arc<ProjectorEngine>,
    name: &str,
    database: &std::path::Path,
    limits: Limits,
    module: LoadedModule,
) -> ModuleUpdate {
    let refused = |reason: String| ModuleUpdate::Refused {
        sha256: module.sha256.clone(),
        path: module.path.clone(),
        reason,
    };
    let Ok(db) = store::open(database) else { return ModuleUpdate::Ready(module) };
    let found = store::meta(&db, "state_version").ok().flatten();
    match check_state_version(engine, name, limits, &module, found) {
        Ok(StateVersion::Same) => {}
        Ok(_) => return ModuleUpdate::Ready(module),
        Err(err) => return refused(format!("{err:#}")),
    }
    match GuestHost::new(db, name.into(), limits)
        .and_then(|host| GuestInstance::new(engine.clone(), module.clone(), host))
    {
        Ok(instance) => ModuleUpdate::Prepared {
            instance: Arc::new(std::sync::Mutex::new(Some(instance))),
            database: database.to_path_buf(),
        },
        Err(err) => refused(format!("{err:#}")),
    }
}

/// What every transaction that moves the checkpoint writes besides the
/// module's changes: the status waiting for a commit (`metas`, key and value
/// or none to remove), and the checkpoint's compare-and-set from `from` to
/// `to`. False, and the caller rolls back, when another writer moved it.
fn batch_writes(
    db: &Connection,
    metas: &[(&'static str, Option<String>)],
    from: &Checkpoint,
    to: &Checkpoint,
) -> Result<bool> {
    metas.iter().try_for_each(|(key, value)| store::set_meta(db, key, value.as_deref()))?;
    store::advance_checkpoint(db, from, to)
}

/// The events discarded as dead letters in `db`, for a runner to skip.
fn discarded_events(db: &Connection) -> Result<HashMap<(String, u64), String>> {
    Ok(store::settled(db, store::Settlement::Discarded)?
        .into_iter()
        .map(|settled| ((settled.source, settled.position), settled.id))
        .collect())
}

/// The dead letters settled in `current`, the generation a rebuild
/// replaces; none when there is no such database yet, or it cannot be read
/// (it is damaged, say: the rebuild then parks what the module rejects as
/// if nothing had been settled, and the log says so).
fn settled_in(current: &std::path::Path, name: &str) -> Vec<store::SettledRecord> {
    let read = store::open_read_only(current).and_then(|db| match db {
        Some(db) if store::is_initialized(&db)? => store::settled_records(&db),
        _ => Ok(Vec::new()),
    });
    read.unwrap_or_else(|err| {
        tracing::warn!(
            projection = name,
            database = %current.display(),
            "the dead letters discarded or resolved there cannot be carried into the new \
             generation (the rebuild parks what the module rejects): {err:#}"
        );
        Vec::new()
    })
}

/// Every series of a projection exists from its start, at zero.
fn start_series(live: &LiveProjection, name: &str) {
    let label = crate::projection::metrics::Metrics::label(name);
    let _ = live.metrics.module_swaps.get_or_create(&label);
    let _ = live.metrics.rebuilds.get_or_create(&label);
    let _ = live.metrics.events_processed.get_or_create(&label);
    let _ = live.metrics.events_emitted.get_or_create(&label);
    let _ = live.metrics.events_published.get_or_create(&label);
}

/// The counter of events `name` published.
fn published_counter(live: &LiveProjection, name: &str) -> prometheus_client::metrics::counter::Counter {
    live.metrics.events_published.get_or_create(&Metrics::label(name)).clone()
}

/// What one step of the loop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing new in the log.
    Idle,
    /// The checkpoint moved; this many events were handed to the module.
    Advanced(usize),
    /// The module asked to retry; the batch waits out its backoff.
    Retrying,
    /// The source cannot be reached now, for this reason.
    Connecting(String),
}

/// How applying a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// Committed (a failing event found by splitting was parked).
    Committed,
    /// The module asked to retry: rolled back, to go again at `retry_at`.
    RetryLater,
    /// Another writer had moved the checkpoint: rolled back, and the
    /// runner read it again.
    Resynced,
}

/// The first retry waits this long; each next one twice as long…
const RETRY_BACKOFF_START: Duration = Duration::from_millis(10);
/// …up to this.
const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The first wait after a source was unreachable; each next one twice as
/// long…
const CONNECT_BACKOFF_START: Duration = Duration::from_millis(100);
/// …up to this.
const CONNECT_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long an idle projection waits for the source before looking at its
/// commands again (a command wakes it sooner).
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// An adaptive batch starts at this many events…
const ADAPTIVE_START: usize = 1000;
/// …grows up to this…
const ADAPTIVE_MAX: usize = 10_000;
/// …while batches commit within this…
const ADAPTIVE_QUICK: Duration = Duration::from_millis(250);
/// …and shrinks, down to this, after one that took longer than this.
const ADAPTIVE_MIN: usize = 100;
const ADAPTIVE_SLOW: Duration = Duration::from_secs(1);
/// How often the source's head, lag and health are written for status.
const SOURCE_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// The metadata key recording that an operator asked for a rebuild not yet
/// taken over; the new generation starts without it.
const REBUILD_REQUESTED: &str = "rebuild_requested";
/// How often a rebuild's progress is written to the running database.
const REBUILD_REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// How often the outbox is looked at when no batch emitted: for events a
/// dead-letter retry emitted, and to try a failed publish again.
const OUTBOX_LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// Runs one projection: a module over the event log into its database.
pub struct ProjectionRunner {
    name: Arc<str>,
    engine: Arc<ProjectorEngine>,
    spec: ProjectionSpec,
    opener: Arc<dyn SourceOpener>,
    rebuild: Option<Rebuild<ProjectionRunner>>,
    last_rebuild_check: std::time::Instant,
    database: PathBuf,
    limits: Limits,
    instance: GuestInstance,
    source: Box<dyn Source>,
    /// The batch size now, and whether it adapts.
    batch_size: usize,
    adaptive: bool,
    policy: FailurePolicy,
    checkpoint: Checkpoint,
    /// The events an operator discarded as dead letters, by source and
    /// position, with their ids: a rebuild skips them.
    discarded: HashMap<(String, u64), String>,
    stop: Arc<AtomicBool>,
    live: Arc<LiveProjection>,
    /// Attempts so far at the batch after the checkpoint, while the module
    /// keeps asking to retry it.
    attempts: u32,
    /// When that batch may be tried again.
    retry_at: Option<std::time::Instant>,
    /// Status to write with the next commit: what a swap changed (`module`,
    /// …), so the swap itself writes nothing (a commit of its own could meet
    /// a WAL checkpoint and hold processing up for milliseconds), and the
    /// end of `retrying` once a retried batch commits or is parked.
    unwritten: Vec<(&'static str, Option<String>)>,
    handled: u64,
    parked: u64,
    /// Since the source became unreachable: why, and the backoff now.
    unavailable: Option<(String, Duration)>,
    /// When the source's report was last written, and what it said.
    reported: Option<(Instant, String)>,
    /// Where emitted events are published; none while rebuilding (a
    /// rebuild never publishes) and offline.
    publisher: Option<Arc<dyn Publisher>>,
    /// A batch committed with emitted events not yet published.
    unpublished: bool,
    /// When the outbox was last published.
    outbox_looked: Instant,
    /// Why publishing fails, while it does.
    publish_failing: Option<String>,
}

impl ProjectionRunner {
    /// Load the module, open the database, instantiate and `init`.
    ///
    /// `stop`, when set, makes [`ProjectionRunner::run`] return after the
    /// batch in flight; `live` is what it shares with the HTTP API.
    pub fn start(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        opener: &Arc<dyn SourceOpener>,
        stop: Arc<AtomicBool>,
        live: Arc<LiveProjection>,
    ) -> Result<Self> {
        let module = engine
            .load_file(&spec.module)
            .with_context(|| format!("projection {}: cannot load its module", spec.name))?;
        Self::start_with_module(engine, spec, module, opener, stop, live)
    }

    /// [`ProjectionRunner::start`], unless the database holds another state
    /// version than the module declares (`run` stopped in the middle of a
    /// rebuild, or the config names a module of a new version): then the next
    /// generation of the database is first built from the log with this
    /// module, while the old one keeps serving reads (status: `rebuilding`),
    /// and takes over once it has caught up. `None` if a stop came first;
    /// the old database is then left as it was.
    ///
    /// The runner publishes what its projection emits to `publisher`,
    /// starting with what a previous run left unpublished.
    pub fn start_or_rebuild(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        opener: &Arc<dyn SourceOpener>,
        publisher: Option<Arc<dyn Publisher>>,
        stop: Arc<AtomicBool>,
        live: Arc<LiveProjection>,
    ) -> Result<Option<Self>> {
        let module = engine
            .load_file(&spec.module)
            .with_context(|| format!("projection {}: cannot load its module", spec.name))?;
        let found = match store::open_read_only(&spec.database)? {
            Some(db) if store::is_initialized(&db)? => store::meta(&db, "state_version")?,
            _ => None,
        };
        let (found, declared) = match check_state_version(&engine, &spec.name, spec.limits, &module, found)
            .with_context(|| format!("projection {}: module {}", spec.name, spec.module.display()))?
        {
            StateVersion::Same | StateVersion::Fresh => {
                let mut runner = Self::start_with_module(engine, spec, module, opener, stop, live)?;
                runner.publisher = publisher;
                runner.publish_outbox();
                return Ok(Some(runner));
            }
            StateVersion::Differs { found, declared } => (found, declared),
        };
        tracing::info!(
            projection = %spec.name,
            module = %module.sha256,
            "the module builds state version {declared}, the database holds {found}: \
             rebuilding from the log before processing"
        );
        let old = store::open(&spec.database)?;
        let sha256 = module.sha256.clone();
        let mut reported = std::time::Instant::now();
        let started = || store::set_meta(&old, "state", Some("running"));
        let (built, generation) =
            Self::build_generation(engine, spec, module, opener, &stop, started, |position, head| {
                if reported.elapsed() >= Duration::from_millis(100) {
                    reported = std::time::Instant::now();
                    let progress =
                        serde_json::json!({ "module": sha256, "position": position, "head": head });
                    let _ = store::set_meta(&old, "rebuilding", Some(&progress.to_string()));
                }
            });
        store::set_meta(&old, "rebuilding", None)?;
        let built = built.and_then(|green| {
            if !stop.load(Ordering::Relaxed) {
                let published = published_counter(&live, &spec.name);
                let key = green.source.key();
                let new = outbox::hand_over(&old, green.db(), key, publisher.as_deref(), &published)?;
                live.metrics.events_emitted.get_or_create(&Metrics::label(&spec.name)).inc_by(new);
            }
            Ok(green)
        });
        match built {
            Ok(mut green) if !stop.load(Ordering::Relaxed) => {
                drop(old);
                start_series(&live, &spec.name);
                green.live = live;
                green.take_over(&spec.database)?;
                green.publisher = publisher;
                green.publish_outbox();
                Ok(Some(green))
            }
            Ok(stopped) => {
                drop(stopped);
                store::remove_database(&generation);
                store::set_meta(&old, "state", Some("stopped"))?;
                Ok(None)
            }
            Err(err) => {
                store::remove_database(&generation);
                Err(err.context(format!(
                    "projection {}: the rebuild failed; its database is unchanged",
                    spec.name
                )))
            }
        }
    }

    /// Build projection `spec`'s state again from the source into the next
    /// generation without reading its current database — it is damaged —
    /// and take over from it once caught up (the damaged files are
    /// removed). `progress(position, head)` is called after every batch.
    /// False if `stop` came first: the new generation is then removed and
    /// the damaged file left as it was.
    pub fn rebuild_damaged(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        opener: &Arc<dyn SourceOpener>,
        stop: Arc<AtomicBool>,
        progress: impl FnMut(u64, u64),
    ) -> Result<bool> {
        let module = engine
            .load_file(&spec.module)
            .with_context(|| format!("projection {}: cannot load its module", spec.name))?;
        let (built, generation) =
            Self::build_generation(engine, spec, module, opener, &stop, || Ok(()), progress);
        match built {
            Ok(mut green) if !stop.load(Ordering::Relaxed) => {
                green.take_over(&spec.database)?;
                Ok(true)
            }
            Ok(stopped) => {
                drop(stopped);
                store::remove_database(&generation);
                Ok(false)
            }
            Err(err) => {
                store::remove_database(&generation);
                Err(err.context(format!("projection {}: the rebuild failed", spec.name)))
            }
        }
    }

    /// Build the next generation of projection `spec`'s database with
    /// `module` from the source until it has caught up, or until `stop`;
    /// `started` is called once its runner has started, `progress(position,
    /// head)` after every batch. Until it takes over, the new module is not
    /// the projection's: the API must not run its `query` over the database
    /// in use. The caller hands over or removes the generation, whose path
    /// comes back beside the runner.
    fn build_generation(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        module: LoadedModule,
        opener: &Arc<dyn SourceOpener>,
        stop: &Arc<AtomicBool>,
        started: impl FnOnce() -> Result<()>,
        mut progress: impl FnMut(u64, u64),
    ) -> (Result<Self>, std::path::PathBuf) {
        let mut green_spec = spec.clone();
        green_spec.database = crate::config::paths::next_generation(&spec.database, &spec.name);
        let scratch = Arc::new(LiveProjection::new(&spec.name, Arc::default()));
        let built = Self::start_generation(
            engine,
            &green_spec,
            module,
            opener,
            stop.clone(),
            scratch,
            &spec.database,
        )
        .and_then(|mut green| {
            started()?;
            loop {
                green.catch_up_with(&mut progress)?;
                if stop.load(Ordering::Relaxed) || green.behind()? == 0 {
                    return Ok(green);
                }
            }
        });
        (built, green_spec.database)
    }

    /// A rebuild's runner: [`ProjectionRunner::start_with_module`] over a
    /// fresh `spec.database`, the next generation after `current`, into
    /// which the dead letters settled in `current` are carried first — so
    /// the rebuild hands the discarded ones to no module.
    pub fn start_generation(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        module: LoadedModule,
        opener: &Arc<dyn SourceOpener>,
        stop: Arc<AtomicBool>,
        live: Arc<LiveProjection>,
        current: &std::path::Path,
    ) -> Result<Self> {
        store::remove_database(&spec.database);
        let settled = settled_in(current, &spec.name);
        if !settled.is_empty() {
            store::carry_settled(&store::open(&spec.database)?, &settled)?;
        }
        Self::start_with_module(engine, spec, module, opener, stop, live)
    }

    /// [`ProjectionRunner::start`] with a module already loaded.
    pub fn start_with_module(
        engine: Arc<ProjectorEngine>,
        spec: &ProjectionSpec,
        module: LoadedModule,
        opener: &Arc<dyn SourceOpener>,
        stop: Arc<AtomicBool>,
        live: Arc<LiveProjection>,
    ) -> Result<Self> {
        let name: Arc<str> = spec.name.as_str().into();
        let db = store::open(&spec.database)?;
        let reader = spec.database.file_stem().and_then(|stem| stem.to_str()).unwrap_or(&spec.name);
        let source = opener
            .open(&spec.filter, reader)
            .with_context(|| format!("projection {}: cannot open source {}", spec.name, opener.name()))?;
        let checkpoint = store::checkpoint(&db, source.key())?;
        if checkpoint.partitions().next().is_none() && store::is_initialized(&db)? {
            let others = store::checkpoint_partitions(&db)?;
            if !others.is_empty() {
                tracing::warn!(
                    projection = %spec.name,
                    source = source.key(),
                    "the database holds positions of other sources ({}), none of {}: the sources \
                     changed, so this one is read from its start on top of the state built so far; \
                     rebuild the projection to build its state from its sources alone",
                    others.join(", "),
                    source.key()
                );
            }
        }
        let discarded = discarded_events(&db)?;
        store::set_meta(&db, "source_key", Some(source.key()))?;
        let host = GuestHost::new(db, name.clone(), spec.limits)?;
        let instance = GuestInstance::new(engine.clone(), module, host)?;
        let db = instance.db();
        store::set_meta(db, "module", Some(&instance.module().sha256))?;
        store::set_meta(db, "module_path", Some(&instance.module().path.to_string_lossy()))?;
        store::set_meta(db, "error", None)?;
        store::set_meta(db, "retrying", None)?;
        live.set_module(instance.module().clone());
        start_series(&live, &name);
        store::set_meta(db, "refused", None)?;
        Ok(ProjectionRunner {
            name,
            engine,
            spec: spec.clone(),
            opener: opener.clone(),
            rebuild: None,
            last_rebuild_check: std::time::Instant::now(),
            database: spec.database.clone(),
            limits: spec.limits,
            instance,
            source,
            batch_size: spec.batch_size.unwrap_or(ADAPTIVE_START),
            adaptive: spec.batch_size.is_none(),
            policy: spec.policy,
            checkpoint,
            discarded,
            stop,
            live,
            attempts: 0,
            retry_at: None,
            unwritten: Vec::new(),
            handled: 0,
            parked: 0,
            unavailable: None,
            reported: None,
            publisher: None,
            unpublished: false,
            outbox_looked: Instant::now(),
            publish_failing: None,
        })
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The running module.
    pub fn module(&self) -> &LoadedModule {
        self.instance.module()
    }

    /// The sha256 of the running module.
    pub fn module_sha256(&self) -> &str {
        &self.instance.module().sha256
    }

    /// How far every event's effect is committed.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Events handed to the module and committed, since start.
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// Events parked as dead letters, since start.
    pub fn parked(&self) -> u64 {
        self.parked
    }

    /// The key of the source it reads, as its checkpoint names it.
    pub fn source_key(&self) -> &str {
        self.source.key()
    }

    /// The projection's database file (a rebuild's take-over moves it).
    pub fn database(&self) -> &std::path::Path {
        &self.database
    }

    /// The projection's database (processing connection).
    pub fn db(&self) -> &Connection {
        self.instance.db()
    }

    /// Process until told to stop (a [`Command::Stop`], or the stop flag
    /// this runner was started with), taking `commands` between batches.
    /// The batch in flight commits or rolls back as a whole; nothing is
    /// half-applied.
    pub fn run(&mut self, commands: &Receiver<Command>) -> Result<()> {
        self.set_state(RunState::Running)?;
        self.live.set_waker(self.source.waker());
        if store::meta(self.db(), REBUILD_REQUESTED)?.is_some() {
            tracing::info!(
                projection = &*self.name,
                "a rebuild was requested before the host stopped: starting it"
            );
            self.start_requested_rebuild()?;
        }
        let mut paused = false;
        let mut wait = Duration::ZERO;
        loop {
            let first = match wait.is_zero() {
                true => commands.try_recv().map_err(|err| matches!(err, TryRecvError::Disconnected)),
                false => {
                    commands.recv_timeout(wait).map_err(|err| matches!(err, RecvTimeoutError::Disconnected))
                }
            };
            let mut stop = matches!(first, Err(true)) || self.stop.load(Ordering::Relaxed);
            for command in first.ok().into_iter().chain(std::iter::from_fn(|| commands.try_recv().ok())) {
                match command {
                    Command::Stop => stop = true,
                    Command::Pause | Command::Resume => {
                        let pause = matches!(command, Command::Pause);
                        if pause != paused {
                            paused = pause;
                            let state = if paused { RunState::Paused } else { RunState::Running };
                            self.set_state(state)?;
                            tracing::info!(projection = &*self.name, checkpoint = %self.checkpoint.to_json(), "{state}");
                        }
                    }
                    Command::Rebuild => self.rebuild_requested()?,
                    Command::Swap(update) => self.take_update(update)?,
                }
            }
            if stop {
                break;
            }
            self.tend_rebuild()?;
            self.report_source()?;
            if self.publisher.is_some() && self.outbox_looked.elapsed() >= OUTBOX_LOOK_INTERVAL {
                self.publish_outbox();
            }
            if paused {
                // A swap's status goes out now: no batch will carry it.
                self.write_unwritten()?;
                wait = POLL_INTERVAL;
                continue;
            }
            wait = match self.step(POLL_INTERVAL)? {
                Step::Idle | Step::Advanced(_) => {
                    self.connected()?;
                    if self.live.clear_fault() {
                        tracing::info!(
                            projection = &*self.name,
                            checkpoint = %self.checkpoint.to_json(),
                            "the fault is over: processing again from the checkpoint"
                        );
                    }
                    Duration::ZERO
                }
                // Waiting out a backoff here, not inside the batch, keeps
                // swaps, rebuilds, pauses and stops working meanwhile.
                Step::Retrying => self
                    .retry_at
                    .map_or(Duration::ZERO, |at| at.saturating_duration_since(Instant::now()))
                    .min(POLL_INTERVAL),
                Step::Connecting(reason) => self.connecting(reason)?,
            };
        }
        if let Some(rebuild) = self.rebuild.take() {
            rebuild.cancel();
            store::set_meta(self.db(), "rebuilding", None)?;
        }
        self.write_unwritten()
    }

    /// An operator asked for a rebuild. The request is recorded in the
    /// database before anything else, and only then is the request file
    /// (when it came as one) taken: a stop before the takeover loses
    /// neither, and the next start picks the rebuild up again.
    fn rebuild_requested(&mut self) -> Result<()> {
        if store::meta(self.db(), REBUILD_REQUESTED)?.is_none() {
            store::set_meta(self.db(), REBUILD_REQUESTED, Some(&crate::store::now_rfc3339()))?;
        }
        if let Some(dir) = self.database.parent() {
            let request = crate::config::paths::request_path(dir, &self.name);
            match std::fs::remove_file(&request) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(file = %request.display(), "cannot remove the rebuild request: {err}")
                }
            }
        }
        if self.rebuild.is_none() {
            tracing::info!(projection = &*self.name, "rebuild requested");
        }
        self.start_requested_rebuild()
    }

    /// Start the rebuild an operator asked for, with the running module,
    /// unless one is under way.
    fn start_requested_rebuild(&mut self) -> Result<()> {
        if self.rebuild.is_none() {
            let module = self.instance.module().clone();
            self.start_rebuild(module)?;
        }
        Ok(())
    }

    /// Every so often, write how the source is doing where status reads
    /// it: its name, head, the lag behind it, whether it answers and what
    /// an operator should know.
    fn report_source(&mut self) -> Result<()> {
        if self.reported.as_ref().is_some_and(|(at, _)| at.elapsed() < SOURCE_REPORT_INTERVAL) {
            return Ok(());
        }
        let progress = self.source.progress(&self.checkpoint);
        let health = self.source.health();
        let mut report = serde_json::json!({
            "name": self.opener.name(),
            "connected": matches!(health, Health::Connected) && progress.is_ok(),
        });
        if let Ok(progress) = &progress {
            report["head"] = progress.head.total().into();
            report["lag"] = progress.lag.into();
            if progress.head.partitions().count() > 1 {
                // A partitioned source (Kafka): each partition's position
                // (its next offset), head (high watermark) and lag.
                let partitions: serde_json::Map<String, serde_json::Value> = progress
                    .head
                    .partitions()
                    .map(|(partition, head)| {
                        let position = self.checkpoint.position(partition);
                        let lag = head.saturating_sub(position);
                        (
                            partition.to_string(),
                            serde_json::json!({"position": position, "head": head, "lag": lag}),
                        )
                    })
                    .collect();
                report["partitions"] = partitions.into();
            }
        }
        if let Health::Connecting { error: Some(error) } = &health {
            report["error"] = error.clone().into();
        } else if let Err(err) = &progress {
            report["error"] = format!("{err:#}").into();
        }
        if let Some(warning) = self.source.warning() {
            report["warning"] = warning.into();
        }
        let report = report.to_string();
        let changed = self.reported.as_ref().is_none_or(|(_, last)| *last != report);
        if changed {
            store::set_meta(self.db(), "source", Some(&report))?;
        }
        self.reported = Some((Instant::now(), report));
        Ok(())
    }

    /// Record `state` (what status shows).
    fn set_state(&mut self, state: RunState) -> Result<()> {
        self.live.set_state(state);
        store::set_meta(self.db(), "state", Some(state.as_str()))
    }

    /// The source cannot be read now: show `connecting` with why, and wait
    /// longer each time before trying again.
    fn connecting(&mut self, reason: String) -> Result<Duration> {
        let backoff = match self.unavailable.take() {
            None => {
                tracing::warn!(
                    projection = &*self.name,
                    source = self.opener.name(),
                    "source unavailable: {reason}; retrying"
                );
                CONNECT_BACKOFF_START
            }
            Some((_, backoff)) => (backoff * 2).min(CONNECT_BACKOFF_CAP),
        };
        if self.live.state() != RunState::Connecting
            || self.live.last_error().as_deref() != Some(reason.as_str())
        {
            self.set_state(RunState::Connecting)?;
            store::set_meta(self.db(), "error", Some(&reason))?;
            self.live.set_last_error(Some(reason.clone()));
        }
        self.unavailable = Some((reason, backoff));
        Ok(backoff)
    }

    /// The source answered again after being unavailable.
    fn connected(&mut self) -> Result<()> {
        if let Some((reason, _)) = self.unavailable.take() {
            tracing::info!(
                projection = &*self.name,
                source = self.opener.name(),
                "source reachable again (was: {reason})"
            );
            store::set_meta(self.db(), "error", None)?;
            self.live.set_last_error(None);
            self.set_state(RunState::Running)?;
        }
        Ok(())
    }

    /// Write the status waiting for a commit now, in a transaction of its
    /// own.
    fn write_unwritten(&mut self) -> Result<()> {
        if !self.unwritten.is_empty() {
            let values: Vec<(&str, Option<&str>)> =
                self.unwritten.iter().map(|(key, value)| (*key, value.as_deref())).collect();
            store::set_metas(self.db(), &values)?;
            self.unwritten.clear();
        }
        Ok(())
    }

    /// Process until the checkpoint reaches the source's head as it is now
    /// (events appended meanwhile are left for later: under continuous
    /// appends, "until idle" might never come).
    pub fn catch_up(&mut self) -> Result<()> {
        self.catch_up_with(|_, _| {})
    }

    /// [`ProjectionRunner::catch_up`], calling `progress(checkpoint, head)`
    /// after every batch.
    pub fn catch_up_with(&mut self, mut progress: impl FnMut(u64, u64)) -> Result<()> {
        let head = loop {
            match self.source.progress(&self.checkpoint) {
                Ok(progress) => break progress.head,
                Err(SourceError::Unavailable(reason)) => {
                    let wait = self.connecting(reason)?;
                    self.sleep_unless_stopped(wait);
                    if self.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                }
                Err(SourceError::Failed(err)) => return Err(err),
            }
        };
        let reached = |checkpoint: &Checkpoint| head.partitions().all(|(p, at)| checkpoint.position(p) >= at);
        while !reached(&self.checkpoint) && !self.stop.load(Ordering::Relaxed) {
            match self.step(POLL_INTERVAL)? {
                Step::Idle => break,
                Step::Retrying => self.wait_for_retry(Duration::MAX),
                Step::Connecting(reason) => {
                    let wait = self.connecting(reason)?;
                    self.sleep_unless_stopped(wait);
                }
                Step::Advanced(_) => {
                    self.connected()?;
                    progress(self.checkpoint.total(), head.total().max(self.checkpoint.total()))
                }
            }
        }
        Ok(())
    }

    /// Sleep `wait`, waking early for a stop.
    fn sleep_unless_stopped(&self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(5)));
        }
    }

    /// Sleep until the batch waiting to be retried may go again, at most
    /// `longest`, waking early for a stop.
    fn wait_for_retry(&self, longest: Duration) {
        let Some(at) = self.retry_at else { return };
        let until = at.min(Instant::now() + longest.min(Duration::from_secs(3600)));
        self.sleep_unless_stopped(until.saturating_duration_since(Instant::now()));
    }

    /// Events in the source after the checkpoint.
    pub fn behind(&mut self) -> Result<u64> {
        match self.source.progress(&self.checkpoint) {
            Ok(progress) => Ok(progress.lag),
            Err(SourceError::Unavailable(_)) => Ok(u64::MAX),
            Err(SourceError::Failed(err)) => Err(err),
        }
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Read one batch (waiting at most `wait` for it) and apply it.
    pub fn step(&mut self, wait: Duration) -> Result<Step> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(Step::Retrying);
        }
        let batch = match self.source.next_batch(&self.checkpoint, self.batch_size, wait) {
            Ok(batch) => batch,
            Err(SourceError::Unavailable(reason)) => return Ok(Step::Connecting(reason)),
            Err(SourceError::Failed(err)) => return Err(err),
        };
        if batch.is_idle(&self.checkpoint) {
            // Nothing to process, so nothing waits on this write.
            self.write_unwritten()?;
            return Ok(Step::Idle);
        }
        let mut batch = batch;
        if !self.discarded.is_empty() {
            self.skip_discarded(&mut batch);
        }
        if let Some(malformed) = &batch.malformed {
            let reason = format!("not an event: {}", malformed.reason);
            let partition = batch.partitions.first().map_or(self.source.key(), |p| &**p).to_string();
            if self.park(&malformed.event, &partition, &reason, 0, &batch.end)? {
                self.acknowledge();
            } else {
                self.resync()?;
            }
            return Ok(Step::Advanced(0));
        }
        if batch.events.is_empty() {
            // Only events of other streams or types: move past them.
            let (unwritten, from) = (&self.unwritten, &self.checkpoint);
            if store::commit_if(self.instance.db(), |db| batch_writes(db, unwritten, from, &batch.end))? {
                self.unwritten.clear();
                self.checkpoint = batch.end;
                self.acknowledge();
            } else {
                self.resync()?;
            }
            return Ok(Step::Advanced(0));
        }
        let started = Instant::now();
        let applied = self.apply(&batch, 0..batch.events.len())?;
        if applied == Applied::Committed {
            self.acknowledge();
            self.adapt_batch_size(batch.events.len(), started.elapsed());
        }
        if self.unpublished {
            self.publish_outbox();
        }
        let step = match applied {
            Applied::Committed | Applied::Resynced => Step::Advanced(batch.events.len()),
            Applied::RetryLater => Step::Retrying,
        };
        self.source.recycle(batch);
        Ok(step)
    }

    /// An adaptive batch grows while the projection is behind (the batch
    /// came full) and batches commit quickly, and shrinks when one is slow:
    /// big batches amortise each commit, small ones keep a rejected event
    /// cheap to find and a swap or a stop prompt.
    fn adapt_batch_size(&mut self, taken: usize, took: Duration) {
        if !self.adaptive {
            return;
        }
        if taken >= self.batch_size && took < ADAPTIVE_QUICK {
            self.batch_size = (self.batch_size * 2).min(ADAPTIVE_MAX);
        } else if took > ADAPTIVE_SLOW {
            self.batch_size = (self.batch_size / 2).max(ADAPTIVE_MIN);
        }
    }

    /// Take the events an operator discarded out of `batch` (a malformed
    /// message too): the checkpoint moves past them, and no module sees
    /// them nor parks them again.
    fn skip_discarded(&self, batch: &mut Batch) {
        let key = self.source.key();
        let discarded = |event: &Event, partition: &str| {
            self.discarded.get(&(partition.to_string(), event.position)).is_some_and(|id| *id == event.id)
        };
        let skip = |event: &Event| {
            tracing::info!(
                projection = &*self.name,
                event_id = %event.id,
                position = event.position,
                "event skipped: it was discarded as a dead letter"
            );
        };
        let malformed_partition = batch.partitions.first().map_or(key, |p| &**p);
        if batch.malformed.as_ref().is_some_and(|malformed| discarded(&malformed.event, malformed_partition))
        {
            skip(&batch.malformed.take().expect("checked").event);
        }
        if batch.events.iter().zip(&batch.partitions).any(|(event, partition)| discarded(event, partition)) {
            let events = std::mem::take(&mut batch.events);
            let partitions = std::mem::take(&mut batch.partitions);
            let checkpoints = std::mem::take(&mut batch.checkpoints);
            for (i, (event, partition)) in events.into_iter().zip(partitions).enumerate() {
                if discarded(&event, &partition) {
                    skip(&event);
                } else {
                    batch.events.push(event);
                    batch.partitions.push(partition);
                    if let Some(checkpoint) = checkpoints.get(i) {
                        batch.checkpoints.push(*checkpoint);
                    }
                }
            }
        }
    }

    /// Tell the source what is committed; a failure only delays its
    /// bookkeeping (the checkpoint here is the truth).
    fn acknowledge(&mut self) {
        if let Err(err) = self.source.acknowledge(&self.checkpoint) {
            tracing::debug!(projection = &*self.name, "acknowledging {}: {err:#}", self.checkpoint.to_json());
        }
    }

    /// The checkpoint once `batch`'s first `taken` events are applied.
    fn checkpoint_after(&self, batch: &Batch, taken: usize) -> Checkpoint {
        batch.checkpoint_after(&self.checkpoint, taken)
    }

    /// Apply `batch`'s events in `range` and move the checkpoint past them,
    /// or, when the module asks to retry, roll back and set when to try
    /// again.
    fn apply(&mut self, batch: &Batch, range: std::ops::Range<usize>) -> Result<Applied> {
        let events = &batch.events[range.clone()];
        let checkpoint_after = self.checkpoint_after(batch, range.end);
        self.attempts += 1;
        let attempts = self.attempts;
        self.retry_at = None;
        let started = std::time::Instant::now();
        let (unwritten, from) = (&self.unwritten, &self.checkpoint);
        let origins = origins(batch, range.clone());
        let attempt = self.instance.handle_in_transaction(events, &origins, |db| {
            match batch_writes(db, unwritten, from, &checkpoint_after)? {
                true => Ok(()),
                false => Err(CheckpointMoved.into()),
            }
        });
        let attempt = match attempt {
            Err(err) if err.downcast_ref::<CheckpointMoved>().is_some() => return self.resync(),
            attempt => attempt?,
        };
        let metrics = &self.live.metrics;
        // A failing batch is split to find its event: what the module said
        // of that one event is counted, not each step of the search.
        match &attempt {
            Attempt::Committed => self.live.record_batch(events.len(), started.elapsed()),
            Attempt::Failed(Failure::Retry(reason)) => {
                metrics.guest_error(&self.name, "retry");
                self.live.set_last_error(Some(format!("retry: {reason}")));
            }
            Attempt::Failed(Failure::Reject(reason)) => {
                if events.len() == 1 {
                    metrics.guest_error(&self.name, "reject");
                }
                self.live.set_last_error(Some(format!("reject: {reason}")));
            }
            Attempt::Trapped(reason) | Attempt::Exhausted(reason) => {
                if events.len() == 1 {
                    metrics.guest_error(&self.name, "trap");
                }
                self.live.set_last_error(Some(reason.clone()));
            }
        }
        let exhausted = matches!(attempt, Attempt::Exhausted(_));
        let reason = match attempt {
            Attempt::Committed => {
                self.unwritten.clear();
                self.checkpoint = checkpoint_after;
                self.handled += events.len() as u64;
                self.attempts = 0;
                let emitted = self.instance.emitted();
                if emitted > 0 {
                    self.unpublished = true;
                    metrics.events_emitted.get_or_create(&Metrics::label(&self.name)).inc_by(emitted);
                }
                return Ok(Applied::Committed);
            }
            Attempt::Failed(Failure::Retry(reason)) => {
                let wait =
                    RETRY_BACKOFF_START.saturating_mul(1 << (attempts - 1).min(16)).min(RETRY_BACKOFF_CAP);
                let (event_id, correlation_id) = crate::sandbox::instance::single_event_ids(events);
                tracing::warn!(
                    projection = &*self.name,
                    first_position = events[0].position,
                    events = events.len(),
                    event_id,
                    correlation_id,
                    attempts,
                    "module asked to retry: {reason}; retrying in {wait:?}"
                );
                let retrying = serde_json::json!({
                    "position": events[0].position,
                    "attempts": attempts,
                    "reason": reason,
                });
                store::set_meta(self.db(), "retrying", Some(&retrying.to_string()))?;
                if !self.unwritten.iter().any(|(key, _)| *key == "retrying") {
                    self.unwritten.push(("retrying", None));
                }
                self.retry_at = Some(std::time::Instant::now() + wait);
                return Ok(Applied::RetryLater);
            }
            Attempt::Failed(Failure::Reject(reason)) => reason,
            Attempt::Trapped(reason) | Attempt::Exhausted(reason) => reason,
        };
        if events.len() > 1 && exhausted {
            // Halving would spend the whole deadline (or fuel) again at every
            // level, ~log2(n) times; one event at a time spends it once more.
            self.attempts = 0;
            for i in range {
                match self.apply(batch, i..i + 1)? {
                    Applied::Committed => {}
                    other => return Ok(other),
                }
            }
            return Ok(Applied::Committed);
        }
        if events.len() > 1 {
            // Split to find the event: the halves commit on their own, each
            // counting its own attempts.
            self.attempts = 0;
            let mid = range.start + events.len() / 2;
            return match self.apply(batch, range.start..mid)? {
                Applied::Committed => self.apply(batch, mid..range.end),
                other => Ok(other),
            };
        }
        let event = &events[0];
        let partition = batch.partitions.get(range.start).map_or(self.source.key(), |p| &**p).to_string();
        match self.policy {
            FailurePolicy::DeadLetter => {
                if !self.park(event, &partition, &reason, attempts, &checkpoint_after)? {
                    return self.resync();
                }
            }
            FailurePolicy::Halt => bail!(
                "halted at event {} (position {}): {reason}; the checkpoint stays at {} \
                 (on_failure = \"halt\"): fix the module or the event, then restart",
                event.id,
                event.position,
                self.checkpoint.to_json()
            ),
        }
        self.attempts = 0;
        Ok(Applied::Committed)
    }

    /// Apply a module update: this is the swap point, between two batches.
    fn take_update(&mut self, update: ModuleUpdate) -> Result<()> {
        {
            match update {
                ModuleUpdate::Ready(module) => self.swap(module)?,
                ModuleUpdate::Prepared { instance, database } => {
                    let Some(instance) = instance.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                        return Ok(());
                    };
                    if instance.module().sha256 == self.instance.module().sha256 {
                        // The running module's bytes again: nothing to swap.
                        self.unwritten.retain(|(key, _)| *key != "refused");
                        store::set_meta(self.db(), "refused", None)?;
                        return Ok(());
                    }
                    self.drop_rebuild()?;
                    if database == self.database {
                        self.install(instance, std::time::Instant::now())?;
                    } else {
                        // A rebuild took over meanwhile: prepare again here.
                        let module = instance.module().clone();
                        drop(instance);
                        self.swap(module)?;
                    }
                }
                ModuleUpdate::Refused { sha256, path, reason } => {
                    self.refuse(&sha256, &path, &reason, false)?
                }
            }
        }
        Ok(())
    }

    /// Swap `module` in: every event before this point was handled by the
    /// old module, every event after by the new one.
    pub fn swap(&mut self, module: LoadedModule) -> Result<()> {
        if module.sha256 == self.instance.module().sha256 {
            // The running module's bytes again (say, after a refused file
            // was put back): nothing to swap, nothing refused any more.
            store::set_meta(self.db(), "refused", None)?;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (sha256, path) = (module.sha256.clone(), module.path.clone());
        let found = store::meta(self.db(), "state_version")?;
        let check = check_state_version(&self.engine, &self.name, self.limits, &module, found);
        let check = match check {
            Ok(check) => check,
            Err(err) => return self.refuse(&sha256, &path, &format!("{err:#}"), false),
        };
        self.drop_rebuild()?;
        if let StateVersion::Differs { found, declared } = check {
            tracing::info!(
                projection = &*self.name,
                module = %sha256,
                "the module builds state version {declared}, the database holds {found}: rebuilding from the source"
            );
            return self.start_rebuild(module);
        }
        // init runs on a connection of its own, so a module that fails it
        // leaves the running one untouched.
        let swapped = store::open(&self.database)
            .and_then(|db| GuestHost::new(db, self.name.clone(), self.limits))
            .and_then(|host| GuestInstance::new(self.engine.clone(), module.clone(), host));
        let instance = match swapped {
            Ok(instance) => instance,
            Err(err) => return self.refuse(&sha256, &path, &format!("{err:#}"), false),
        };
        self.install(instance, started)
    }

    /// Put `instance` (of a new module, over this database, `init` run) in
    /// place of the running one, and record it.
    fn install(&mut self, instance: GuestInstance, started: std::time::Instant) -> Result<()> {
        let old = std::mem::replace(&mut self.instance, instance);
        // A batch the old module asked to retry goes to the new one now.
        (self.attempts, self.retry_at) = (0, None);
        // Tearing the old instance down (its memory, its connection) is not
        // the processing thread's work.
        std::thread::spawn(move || drop(old));
        let module = self.instance.module().clone();
        self.unwritten.retain(|(key, _)| !matches!(*key, "module" | "module_path" | "refused"));
        self.unwritten.extend([
            ("module", Some(module.sha256.clone())),
            ("module_path", Some(module.path.to_string_lossy().into_owned())),
            ("refused", None),
        ]);
        let sha256 = module.sha256.clone();
        self.live.set_module(module);
        self.live
            .metrics
            .module_swaps
            .get_or_create(&crate::projection::metrics::Metrics::label(&self.name))
            .inc();
        tracing::info!(
            projection = &*self.name,
            module = %sha256,
            checkpoint = %self.checkpoint.to_json(),
            pause_micros = started.elapsed().as_micros() as u64,
            "module swapped in"
        );
        // A requested rebuild the swap dropped goes on with the new module.
        if store::meta(self.db(), REBUILD_REQUESTED)?.is_some() {
            self.start_requested_rebuild()?;
        }
        Ok(())
    }

    /// A newer module arrived: the rebuild under way (if any) is dropped.
    fn drop_rebuild(&mut self) -> Result<()> {
        if let Some(rebuild) = self.rebuild.take() {
            tracing::info!(
                projection = &*self.name,
                "a newer module arrived: the rebuild under way is dropped"
            );
            rebuild.cancel();
            store::set_meta(self.db(), "rebuilding", None)?;
        }
        Ok(())
    }

    /// Start building the next generation of the database with `module`,
    /// in the background; the running module keeps processing.
    pub fn start_rebuild(&mut self, module: LoadedModule) -> Result<()> {
        let mut spec = self.spec.clone();
        spec.database = crate::config::paths::next_generation(&self.database, &self.name);
        spec.module = module.path.clone();
        let sha256 = module.sha256.clone();
        let (engine, opener) = (self.engine.clone(), self.opener.clone());
        let current = self.database.clone();
        // The module is loaded already; the rebuild thread instantiates it.
        let name = spec.name.clone();
        let rebuild = Rebuild::spawn(&name, spec.database.clone(), sha256.clone(), move |stop, position| {
            let live = Arc::new(LiveProjection::new(&spec.name, Arc::default()));
            let mut runner = ProjectionRunner::start_generation(
                engine,
                &spec,
                module,
                &opener,
                stop.clone(),
                live,
                &current,
            )?;
            // Rounds until within a couple of batches of the head; the
            // projection's thread applies the rest before taking over.
            let close_enough = 2 * runner.batch_size() as u64;
            while !stop.load(Ordering::Relaxed) {
                runner.catch_up_with(|checkpoint, _| position.store(checkpoint, Ordering::Relaxed))?;
                if runner.behind()? <= close_enough {
                    break;
                }
            }
            Ok(runner)
        });
        tracing::info!(projection = &*self.name, module = %sha256, into = %rebuild.database.display(), "rebuild started");
        self.rebuild = Some(rebuild);
        self.report_rebuild()?;
        Ok(())
    }

    /// Between batches: pick up a rebuild request, report a rebuild's
    /// progress, and take over when it has caught up.
    fn tend_rebuild(&mut self) -> Result<()> {
        if self.last_rebuild_check.elapsed() < REBUILD_REPORT_INTERVAL {
            return Ok(());
        }
        self.last_rebuild_check = Instant::now();
        let Some(rebuild) = &self.rebuild else { return Ok(()) };
        if !rebuild.is_finished() {
            return self.report_rebuild();
        }
        let rebuild = self.rebuild.take().expect("checked");
        let (database, module) = (rebuild.database.clone(), rebuild.module.clone());
        let green = rebuild.finish().and_then(|mut green| {
            // The events appended since, on this thread: the old module is
            // not processing meanwhile, so nothing is handled twice.
            green.catch_up()?;
            let published = published_counter(&self.live, &self.name);
            let publisher = self.publisher.as_deref();
            let new = outbox::hand_over(self.db(), green.db(), self.source.key(), publisher, &published)?;
            self.live.metrics.events_emitted.get_or_create(&Metrics::label(&self.name)).inc_by(new);
            Ok(green)
        });
        let mut green = match green {
            Ok(green) => green,
            Err(err) => {
                store::remove_database(&database);
                // The request is answered, by the refusal below.
                store::set_metas(self.db(), &[("rebuilding", None), (REBUILD_REQUESTED, None)])?;
                let path = self.spec.module.clone();
                return self.refuse(&module, &path, &format!("the rebuild failed: {err:#}"), true);
            }
        };
        // The green runner's pieces become this one's; the old ones go with
        // `green`, their files with `take_over`.
        let old = std::mem::replace(&mut self.database, database);
        std::mem::swap(&mut self.instance, &mut green.instance);
        std::mem::swap(&mut self.source, &mut green.source);
        self.live.set_waker(self.source.waker());
        self.checkpoint = std::mem::take(&mut green.checkpoint);
        (self.attempts, self.retry_at) = (0, None);
        // The green database holds its own module's status.
        self.unwritten.clear();
        drop(green);
        self.take_over(&old)?;
        self.publish_outbox();
        self.live
            .metrics
            .rebuilds
            .get_or_create(&crate::projection::metrics::Metrics::label(&self.name))
            .inc();
        Ok(())
    }

    /// This runner's database — a rebuild's new generation, caught up —
    /// becomes the projection's: marked running or paused (readers see it so from its
    /// first moment behind the pointer), pointed at in one rename, and the
    /// `old` generation's files removed.
    pub(crate) fn take_over(&mut self, old: &std::path::Path) -> Result<()> {
        self.adopt_settled(old)?;
        // A rebuilt state is progress: a fault on record (the old module
        // halted, say) is over before readers see the new generation.
        if self.live.clear_fault() {
            tracing::info!(projection = &*self.name, "the fault is over: the rebuilt state takes over");
        }
        // A paused projection stays paused through the takeover.
        let state = match self.live.state() {
            RunState::Paused => RunState::Paused,
            _ => RunState::Running,
        };
        store::set_metas(
            self.db(),
            &[("state", Some(state.as_str())), ("rebuilding", None), ("refused", None)],
        )?;
        store::switch_to(&self.name, &self.database)?;
        store::remove_database(old);
        self.live.set_module(self.instance.module().clone());
        tracing::info!(
            projection = &*self.name,
            module = %self.instance.module().sha256,
            checkpoint = %self.checkpoint.to_json(),
            database = %self.database.display(),
            "rebuild caught up and took over"
        );
        Ok(())
    }

    /// Publish what the outbox holds (see [`outbox`]). A failure is logged
    /// and shown as the last error, and the events wait for the next
    /// attempt: what the batch did to the state is committed either way.
    fn publish_outbox(&mut self) {
        self.unpublished = false;
        self.outbox_looked = Instant::now();
        let Some(publisher) = self.publisher.clone() else { return };
        let published = published_counter(&self.live, &self.name);
        match outbox::publish_pending(self.db(), &*publisher, &published) {
            Ok(()) => {
                if let Some(reason) = self.publish_failing.take() {
                    tracing::info!(
                        projection = &*self.name,
                        "publishing the outbox again (it failed: {reason})"
                    );
                    self.live.set_last_error(None);
                }
            }
            Err(err) => {
                let reason = format!("{err:#}");
                if self.publish_failing.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(
                        projection = &*self.name,
                        "cannot publish the outbox: {reason}; its events wait for the next attempt"
                    );
                }
                self.live.set_last_error(Some(format!("publishing the outbox: {reason}")));
                self.publish_failing = Some(reason);
            }
        }
    }

    /// Before this runner's database — a rebuild's new generation, caught
    /// up — takes over from `old`: the dead letters settled in `old` while
    /// it was being built are carried over too. A discarded event it parked
    /// meanwhile is dropped; one that `old` had resolved (a retry applied
    /// it) but the module parked on its way through the log is handed to
    /// the module once more, as the retry did, and stays parked, with the
    /// new reason, only if it is refused again.
    pub fn adopt_settled(&mut self, old: &std::path::Path) -> Result<()> {
        store::carry_settled(self.db(), &settled_in(old, &self.name))?;
        self.discarded = discarded_events(self.db())?;
        let resolved: std::collections::HashSet<store::Settled> =
            store::settled(self.db(), store::Settlement::Resolved)?.into_iter().collect();
        let (dropped, letters): (Vec<_>, Vec<_>) =
            store::dead_letters(self.db())?.into_iter().partition(|letter| {
                self.discarded.get(&(letter.source.clone(), letter.position)) == Some(&letter.id)
            });
        if !dropped.is_empty() {
            store::commit_if(self.db(), |db| {
                for letter in &dropped {
                    store::remove_dead_letter(db, &letter.source, letter.position)?;
                }
                Ok(true)
            })?;
        }
        let again: Vec<store::DeadLetter> = letters
            .into_iter()
            .filter(|letter| {
                let id = letter.id.clone();
                resolved.contains(&store::Settled {
                    source: letter.source.clone(),
                    position: letter.position,
                    id,
                })
            })
            .collect();
        if !again.is_empty() {
            let outcome = crate::projection::dead_letters::retry_with(&mut self.instance, again)?;
            for failed in &outcome.failed {
                tracing::warn!(
                    projection = &*self.name,
                    event_id = %failed.id,
                    "a dead letter a retry had applied was refused again by the rebuilt state, and \
                     stays parked: {}",
                    failed.reason
                );
            }
            if !outcome.resolved.is_empty() {
                tracing::info!(
                    projection = &*self.name,
                    resolved = ?outcome.resolved,
                    "dead letters a retry had applied were applied again after the rebuild"
                );
            }
        }
        Ok(())
    }

    fn report_rebuild(&mut self) -> Result<()> {
        let Some(rebuild) = &self.rebuild else { return Ok(()) };
        let progress = serde_json::json!({
            "module": rebuild.module,
            "position": rebuild.position.load(Ordering::Relaxed),
            "head": self.source.progress(&self.checkpoint).map(|p| p.head.total()).unwrap_or(0),
        });
        store::set_meta(self.db(), "rebuilding", Some(&progress.to_string()))
    }

    /// Record that the module file at `path` was refused; the running
    /// module keeps processing.
    fn refuse(
        &mut self,
        sha256: &str,
        path: &std::path::Path,
        reason: &str,
        rebuild_failed: bool,
    ) -> Result<()> {
        tracing::warn!(
            projection = &*self.name,
            module = %path.display(),
            sha256,
            "module refused, the running module stays: {reason}"
        );
        self.unwritten.retain(|(key, _)| *key != "refused");
        let refused = serde_json::json!({
            "module": sha256, "path": path, "reason": reason, "rebuild_failed": rebuild_failed,
        });
        store::set_meta(self.db(), "refused", Some(&refused.to_string()))?;
        self.live.set_last_error(Some(format!("module {} refused: {reason}", path.display())));
        Ok(())
    }

    /// Another writer moved the checkpoint under this runner: read it again
    /// and go on from there, so nothing is applied twice.
    fn resync(&mut self) -> Result<Applied> {
        let found = store::checkpoint(self.db(), self.source.key())?;
        tracing::warn!(
            projection = &*self.name,
            database = %self.database.display(),
            "the checkpoint moved under this projection (from {} to {}): another process \
             writes its database — is a second host running on this data folder (its run.lock \
             removed)? The batch was rolled back; going on from the checkpoint found",
            self.checkpoint.to_json(),
            found.to_json()
        );
        self.checkpoint = found;
        (self.attempts, self.retry_at) = (0, None);
        Ok(Applied::Resynced)
    }

    /// Park `event` and move the checkpoint past it, in one transaction;
    /// false (nothing written) if another writer had moved the checkpoint.
    fn park(
        &mut self,
        event: &Event,
        partition: &str,
        reason: &str,
        attempts: u32,
        checkpoint_after: &Checkpoint,
    ) -> Result<bool> {
        let module = self.instance.module().sha256.clone();
        let (unwritten, from) = (&self.unwritten, &self.checkpoint);
        let parked = store::commit_if(self.instance.db(), |db| {
            store::park(db, partition, event, reason, &module, attempts)?;
            batch_writes(db, unwritten, from, checkpoint_after)
        })?;
        if !parked {
            return Ok(false);
        }
        self.unwritten.clear();
        self.checkpoint = checkpoint_after.clone();
        self.parked += 1;
        tracing::warn!(
            projection = &*self.name,
            event_id = %event.id,
            correlation_id = event.correlation_id.as_deref().unwrap_or(""),
            position = event.position,
            "event parked as a dead letter: {reason}"
        );
        Ok(true)
    }
}

/// The checkpoint in the database is not the one this runner read: another
/// writer moved it. A type, so the loop tells it apart without reading the
/// message.
#[derive(Debug, thiserror::Error)]
#[error("the checkpoint moved under this projection: another writer holds its database")]
struct CheckpointMoved;
/// Where each event of `batch` in `range` came from, for the module and
/// its outbox: empty when the source has one partition.
fn origins(batch: &Batch, range: std::ops::Range<usize>) -> Vec<Origin> {
    if batch.partitions[range.clone()].iter().all(|p| crate::sources::own_partition(p).is_none()) {
        return Vec::new();
    }
    range
        .map(|i| {
            let (event, partition) = (&batch.events[i], &batch.partitions[i]);
            Origin {
                partition: crate::sources::own_partition(partition).map(|_| partition.clone()),
                number: crate::sources::partition_number(partition),
                through: batch.checkpoints.get(i).copied().unwrap_or(event.position),
            }
        })
        .collect()
}
