//! [`Supervisor`]: runs every projection of a config, each on its own
//! thread, and keeps the running set in step with the files while it runs.
//!
//! A control thread owns the running set. A debounced watcher over the
//! module files and the config file tells it what changed:
//! - a module file whose bytes changed is compiled and linked here, off the
//!   projection threads, and handed to each projection running it, which
//!   swaps it in between two batches (or records why it was refused);
//! - a changed config adds projections (from the start of their streams),
//!   removes them (their databases are kept) and restarts the ones whose
//!   settings changed; a config that does not load is refused whole.
//!
//! Each database is marked running, stopped or faulted so `status` can tell
//! from another process.
//!
//! Each runner is handed the [`Publisher`] of what its projection emits:
//! its source's broker (the subjects its `emit` routes name), or the
//! embedded log for a projection reading the log.

use crate::config::paths::{current_database, lock_path, request_path};
use crate::config::{Config, ProjectionConfig};
use crate::projection::fault::{self, Fault, FaultFile, FaultKind};
use crate::projection::live::{Command, LiveProjection, RunState};
use crate::projection::metrics::Metrics;
use crate::projection::runner::{ModuleUpdate, ProjectionRunner, ProjectionSpec, prepare_update};
use crate::sandbox::engine::{Engines, ProjectorEngine};
use crate::sources::embedded::EventLog;
use crate::sources::{Publisher, SourceOpener};
use crate::store;
use anyhow::{Context as _, Result};
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the watcher waits for a burst of writes to settle.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(30);

/// The running set as the HTTP API sees it: the config now in force and
/// each running projection's shared state.
pub struct HostView {
    /// The config in force.
    pub config: Config,
    /// The running projections.
    pub projections: BTreeMap<String, Arc<LiveProjection>>,
}

/// Runs the projections of one config.
pub struct Supervisor {
    view: Arc<RwLock<HostView>>,
    log: Arc<EventLog>,
    engines: Engines,
    metrics: Arc<Metrics>,
    control: Sender<Control>,
    control_thread: Option<JoinHandle<()>>,
    _lock: File,
}

enum Control {
    /// These files changed.
    Changed(Vec<PathBuf>),
    /// Stop everything and return.
    Stop,
}

/// One running projection, as the control thread holds it.
struct Running {
    config: ProjectionConfig,
    live: Arc<LiveProjection>,
    thread: JoinHandle<()>,
}

impl Supervisor {
    /// Start every projection of `config` (read from `config_path`, which
    /// is watched, as are the module files, unless `watch` is false). A
    /// projection that cannot start is marked faulted with the reason; the
    /// others run.
    pub fn start(config: &Config, config_path: Option<&Path>) -> Result<Self> {
        std::fs::create_dir_all(&config.data)
            .with_context(|| format!("cannot create data directory {}", config.data.display()))?;
        let lock_file = lock_path(&config.data);
        let lock =
            File::create(&lock_file).with_context(|| format!("cannot create {}", lock_file.display()))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "another `projector run` is already using {}; stop it first",
                config.data.display()
            )
        })?;
        let log = Arc::new(EventLog::open(&config.data)?);
        let engines = Engines::new(Some(config.data.join("cache")))?;
        let metrics = Arc::new(Metrics::default());
        let view = Arc::new(RwLock::new(HostView { config: config.clone(), projections: BTreeMap::new() }));
        let (control, commands) = channel();
        let mut state = ControlState {
            config: config.clone(),
            config_path: config_path.map(absolute),
            log: log.clone(),
            engines: engines.clone(),
            metrics: metrics.clone(),
            view: view.clone(),
            running: BTreeMap::new(),
            seen: HashMap::new(),
        };
        if let Some(path) = state.config_path.clone()
            && let Ok(bytes) = std::fs::read(&path)
        {
            state.seen.insert(path, hex::encode(Sha256::digest(bytes)));
        }
        for p in &config.projections {
            state.start_projection(p.clone());
        }
        state.publish();
        let watcher = match config_path {
            Some(_) => Some(state.watch(control.clone())?),
            None => None,
        };
        let control_thread = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || state.serve(commands, watcher))
            .context("cannot start the supervisor thread")?;
        Ok(Supervisor {
            view,
            log,
            engines,
            metrics,
            control,
            control_thread: Some(control_thread),
            _lock: lock,
        })
    }

    /// The event log the projections read.
    pub fn log(&self) -> &Arc<EventLog> {
        &self.log
    }

    /// The engines the projections run on.
    pub fn engines(&self) -> &Engines {
        &self.engines
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The running set, kept current as the config changes.
    pub fn view(&self) -> &Arc<RwLock<HostView>> {
        &self.view
    }

    /// Stop every projection after its batch in flight, and wait for them.
    pub fn stop(mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(thread) = self.control_thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the supervisor thread panicked");
        }
    }
}

/// What the control thread owns.
struct ControlState {
    config: Config,
    config_path: Option<PathBuf>,
    log: Arc<EventLog>,
    engines: Engines,
    metrics: Arc<Metrics>,
    view: Arc<RwLock<HostView>>,
    running: BTreeMap<String, Running>,
    /// The sha256 last seen per module file, so touching a file with the
    /// same bytes does nothing.
    seen: HashMap<PathBuf, String>,
}

type Watcher = notify_debouncer_full::Debouncer<
    notify_debouncer_full::notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

impl ControlState {
    fn serve(mut self, commands: Receiver<Control>, mut watcher: Option<Watcher>) {
        while let Ok(command) = commands.recv() {
            match command {
                Control::Stop => break,
                Control::Changed(paths) => {
                    self.changed(&paths);
                    if let Some(watcher) = &mut watcher {
                        self.watch_dirs(watcher);
                    }
                }
            }
        }
        for (name, running) in std::mem::take(&mut self.running) {
            stop_projection(&name, running);
        }
    }

    fn spec(&self, p: &ProjectionConfig) -> ProjectionSpec {
        ProjectionSpec {
            name: p.name.clone(),
            module: p.module.clone(),
            database: self.config.database_path(&p.name),
            filter: crate::sources::filter_of(p),
            batch_size: p.batch_size,
            limits: self.config.limits(p),
            policy: p.on_failure,
        }
    }

    fn start_projection(&mut self, p: ProjectionConfig) {
        let spec = self.spec(&p);
        let live = Arc::new(LiveProjection::new(&p.name, self.metrics.clone()));
        // A request another process left while this projection was not
        // running is sent by its thread as it starts.
        let commands = live.open_commands();
        let opener = crate::sources::opener_for(&self.config, &p, &self.log);
        // Emitted events go to the source's broker, or the embedded log.
        let log: Arc<dyn Publisher> = self.log.clone();
        let publisher = match &opener {
            Ok(opener) => opener.publisher(&p.emit).unwrap_or(log),
            Err(_) => log,
        };
        let (engines, thread_live) = (self.engines.clone(), live.clone());
        let thread = std::thread::Builder::new()
            .name(format!("projection-{}", p.name))
            .spawn(move || {
                // Before anything starts: a rebuild's thread inherits it.
                crate::priority::lower_current_thread();
                let engine = engines.for_limits(&spec.limits);
                run_projection(engine, &spec, opener, publisher, thread_live, commands)
            })
            .expect("the OS starts a thread");
        if let Ok(bytes) = std::fs::read(&p.module) {
            self.seen.insert(absolute(&p.module), hex::encode(Sha256::digest(bytes)));
        }
        self.view.write().unwrap_or_else(|e| e.into_inner()).projections.insert(p.name.clone(), live.clone());
        self.running.insert(p.name.clone(), Running { config: p, live, thread });
    }

    fn publish(&self) {
        self.view.write().unwrap_or_else(|e| e.into_inner()).config = self.config.clone();
    }

    /// A watcher over the folders of the config and every module file.
    fn watch(&self, control: Sender<Control>) -> Result<Watcher> {
        let mut watcher =
            new_debouncer(WATCH_DEBOUNCE, None, move |result: DebounceEventResult| match result {
                Ok(events) => {
                    // Reads (open, access, close without writing) change
                    // nothing: reacting to them would re-read the file and
                    // trigger the next event, forever.
                    let paths: HashSet<PathBuf> = events
                        .iter()
                        .filter(|e| changes_content(&e.kind))
                        .flat_map(|e| e.paths.iter().cloned())
                        .collect();
                    if !paths.is_empty() {
                        let _ = control.send(Control::Changed(paths.into_iter().collect()));
                    }
                }
                Err(errors) => {
                    for err in errors {
                        tracing::warn!("file watcher: {err}");
                    }
                }
            })
            .context("cannot start the file watcher")?;
        self.watch_dirs(&mut watcher);
        Ok(watcher)
    }

    /// Watch the folders (not the files: an editor's rename-over replaces
    /// the file) of the config and of every module.
    fn watch_dirs(&self, watcher: &mut Watcher) {
        let files = self
            .config_path
            .iter()
            .cloned()
            .chain(self.config.projections.iter().map(|p| absolute(&p.module)));
        let mut dirs: HashSet<PathBuf> = files.filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
        // Where another process's `projector rebuild` leaves its request.
        let requests = self.config.data.join("projections");
        if std::fs::create_dir_all(&requests).is_ok() {
            dirs.insert(absolute(&requests.join("x")).parent().map(Path::to_path_buf).unwrap_or(requests));
        }
        for dir in dirs {
            if let Err(err) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), "cannot watch: {err}");
            }
        }
    }

    fn changed(&mut self, paths: &[PathBuf]) {
        let paths: HashSet<PathBuf> = paths.iter().map(|p| absolute(p)).collect();
        if let Some(config_path) = self.config_path.clone()
            && paths.contains(&config_path)
        {
            self.reload_config(&config_path);
        }
        let requests = absolute(&self.config.data.join("projections").join("x"));
        let requests = requests.parent().unwrap_or(Path::new("/"));
        for (name, running) in &self.running {
            // The projection takes the file once it has recorded the request
            // in its database (or, faulted, keeps it until it runs again).
            let request = requests.join(format!("{name}.rebuild"));
            if paths.contains(&request) && request.exists() {
                running.live.send(Command::Rebuild);
            }
        }
        let modules: HashSet<PathBuf> =
            self.running.values().map(|r| absolute(&r.config.module)).filter(|m| paths.contains(m)).collect();
        for module in modules {
            self.module_changed(&module);
        }
    }

    /// Hash the module file; if its bytes are new, compile and link it here
    /// and hand it (or the refusal) to every projection running it.
    fn module_changed(&mut self, path: &Path) {
        let Ok(bytes) = std::fs::read(path) else {
            // Mid-rename or deleted: the next event brings the new file.
            return;
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if self.seen.get(path) == Some(&sha256) {
            return;
        }
        self.seen.insert(path.to_path_buf(), sha256.clone());
        let loaded = self.engines.plain().load_bytes(&bytes, path);
        let mut restarted = Vec::new();
        if loaded.is_ok() {
            // A projection that faulted (its thread ended) starts again
            // with the new module: that is how an operator ships the fix.
            let faulted: Vec<String> = self
                .running
                .iter()
                .filter(|(_, r)| absolute(&r.config.module) == path && r.thread.is_finished())
                .map(|(name, _)| name.clone())
                .collect();
            for name in faulted {
                let running = self.running.remove(&name).expect("listed");
                let config = running.config.clone();
                stop_projection(&name, running);
                tracing::info!(projection = %name, module = %sha256, "restarting the faulted projection with the new module");
                self.start_projection(config);
                restarted.push(name);
            }
        }
        let running = self
            .running
            .iter()
            .filter(|(name, r)| absolute(&r.config.module) == path && !restarted.contains(name));
        // Compiled once per engine: a projection with a fuel limit runs on
        // the metered one.
        let mut metered = None;
        for (name, running) in running {
            let limits = self.config.limits(&running.config);
            let prepared = self.engines.for_limits(&limits).and_then(|engine| {
                let module = match limits.fuel {
                    Some(_) => metered.get_or_insert_with(|| engine.load_bytes(&bytes, path)),
                    None => &loaded,
                };
                let module = module.as_ref().map_err(|err| anyhow::anyhow!("{err:#}"))?.clone();
                Ok(prepare_update(&engine, name, &self.config.database_path(name), limits, module))
            });
            let update = prepared.unwrap_or_else(|err| ModuleUpdate::Refused {
                sha256: sha256.clone(),
                path: path.to_path_buf(),
                reason: format!("{err:#}"),
            });
            running.live.send(Command::Swap(update));
        }
    }

    /// Load the changed config and bring the running set in line with it;
    /// a config that does not load changes nothing.
    fn reload_config(&mut self, path: &Path) {
        // The same bytes again (touched, or rewritten unchanged): nothing.
        let Ok(bytes) = std::fs::read(path) else { return };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if self.seen.get(path) == Some(&sha256) {
            return;
        }
        self.seen.insert(path.to_path_buf(), sha256);
        let config = match Config::load(path) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!("config refused, the running projections are unchanged: {err}");
                return;
            }
        };
        if config.data != self.config.data {
            tracing::error!(
                "config refused: `data` changed from {} to {}; that needs a restart",
                self.config.data.display(),
                config.data.display()
            );
            return;
        }
        let old = std::mem::replace(&mut self.config, config);
        let wanted: BTreeMap<String, ProjectionConfig> =
            self.config.projections.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            let unchanged = wanted.get(&name).is_some_and(|p| {
                *p == self.running[&name].config
                    && self.config.limits(p) == old.limits(&self.running[&name].config)
            });
            if !unchanged {
                let running = self.running.remove(&name).expect("listed");
                stop_projection(&name, running);
                self.view.write().unwrap_or_else(|e| e.into_inner()).projections.remove(&name);
                if !wanted.contains_key(&name) {
                    tracing::info!(projection = %name, "projection removed from the config; its database is kept");
                }
            }
        }
        for (name, p) in wanted {
            if !self.running.contains_key(&name) {
                tracing::info!(projection = %name, "projection (re)started from the config");
                self.start_projection(p);
            }
        }
        self.publish();
        tracing::info!(projections = self.running.len(), "config reloaded");
    }
}

/// Whether a file event can mean new content: a write, a create, a rename
/// or a removal — never a mere open or read.
fn changes_content(kind: &notify_debouncer_full::notify::EventKind) -> bool {
    use notify_debouncer_full::notify::EventKind;
    use notify_debouncer_full::notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        // A writer closing the file: its content is complete now.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// A path made absolute and its folder resolved, so the watcher's paths
/// and the config's compare equal.
fn absolute(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (path.parent().and_then(|d| d.canonicalize().ok()), path.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => path,
    }
}

fn stop_projection(name: &str, running: Running) {
    running.live.send(Command::Stop);
    if running.thread.join().is_err() {
        tracing::error!(projection = %name, "projection thread panicked");
    }
}

/// The first wait before a projection whose host failed (a full disk, a
/// read-only file) starts again; each next one twice as long…
const FAULT_BACKOFF_START: Duration = Duration::from_millis(250);
/// …up to this.
const FAULT_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// One projection's thread: start it (rebuilding first if its module
/// declares a new state version) and run it until told to stop. When it
/// faults, the fault is recorded beside its database, and by its kind:
/// - the host's own failure that may pass (a full disk, a read-only file,
///   I/O): nothing was committed, so it starts again with backoff, from its
///   checkpoint, until it runs (the record is cleared on its first batch);
/// - its database is damaged: it waits, faulted, for `projector rebuild`,
///   which builds the next generation from the source here;
/// - anything else (it halted on an event, its module cannot load): the
///   thread ends, and a new module file starts it again.
fn run_projection(
    engine: Result<Arc<ProjectorEngine>>,
    spec: &ProjectionSpec,
    opener: Result<Arc<dyn SourceOpener>>,
    publisher: Arc<dyn Publisher>,
    live: Arc<LiveProjection>,
    commands: Receiver<Command>,
) {
    let name = spec.name.as_str();
    let dir = spec.database.parent().unwrap_or(Path::new(".")).to_path_buf();
    let faults = FaultFile::new(&dir, name);
    if let Err(err) = faults.prepare() {
        tracing::warn!(projection = name, file = %faults.path().display(), "cannot make room for a fault record: {err}");
    }
    live.set_fault_file(faults.clone());
    let stop = live.stopping();
    let mut backoff = FAULT_BACKOFF_START;
    let mut last_error = None;
    let mut paused = false;
    loop {
        // A rebuild's takeover moves the database: start from the current one.
        let mut spec = spec.clone();
        spec.database = current_database(&dir, name);
        store::remove_stale_generations(&dir, name, &spec.database);
        // A request another process left (or one taken while faulted).
        if request_path(&dir, name).exists() {
            live.send(Command::Rebuild);
        }
        if paused {
            live.send(Command::Pause);
        }
        let mut database = spec.database.clone();
        let result = match (&engine, &opener) {
            (Ok(engine), Ok(opener)) => {
                run_once(engine, &spec, opener, &publisher, &live, &commands, &mut database)
            }
            (Err(err), _) | (_, Err(err)) => Err(anyhow::anyhow!("{err:#}")),
        };
        let Err(err) = result else { return };
        // As an operator left it: the runner's state if it ran, else as
        // the last wait left it.
        paused = match live.state() {
            RunState::Faulted | RunState::Starting => paused,
            state => state == RunState::Paused,
        };
        let kind = fault::classify(&err);
        let err = match kind {
            FaultKind::Damaged => store::explain_damage(err, &database),
            FaultKind::Retrying => err.context(format!(
                "projection {name}: the host failed on its database {}; it tries again (at most every \
                 {} s) and resumes from its checkpoint once it can",
                database.display(),
                FAULT_BACKOFF_CAP.as_secs()
            )),
            FaultKind::Halted => err,
        };
        let error = format!("{err:#}");
        if last_error.as_deref() != Some(error.as_str()) {
            tracing::error!(projection = name, "projection faulted: {error}");
        } else {
            tracing::debug!(projection = name, "projection faulted again: {error}");
        }
        let since = match faults.read() {
            Some(fault) if fault.error == error => fault.since,
            _ => store::now_rfc3339(),
        };
        live.record_fault(&Fault { error: error.clone(), kind, since, rebuilding: None });
        last_error = Some(error.clone());
        match kind {
            FaultKind::Halted => {
                // Also where a host without the fault file looks.
                let marked = store::open(&database).and_then(|db| {
                    store::set_meta(&db, "state", Some(RunState::Faulted.as_str()))?;
                    store::set_meta(&db, "error", Some(&error))
                });
                if let Err(mark_err) = marked {
                    tracing::error!(
                        projection = name,
                        "cannot record the fault in its database: {mark_err:#}"
                    );
                }
                return;
            }
            FaultKind::Retrying => {
                if let Woken::Stop = wait_while_faulted(&commands, backoff, false, &dir, name, &mut paused) {
                    return;
                }
                backoff = (backoff * 2).min(FAULT_BACKOFF_CAP);
            }
            FaultKind::Damaged => loop {
                match wait_while_faulted(&commands, Duration::MAX, true, &dir, name, &mut paused) {
                    Woken::Stop => return,
                    Woken::Elapsed => continue,
                    Woken::Rebuild => {}
                }
                let Ok(engine) = &engine else { break };
                let Ok(opener) = &opener else { break };
                tracing::info!(projection = name, "rebuilding the damaged database from the source");
                let mut reported: Option<std::time::Instant> = None;
                let mut report = |position: u64, head: u64| {
                    if reported.is_none_or(|at| at.elapsed() >= Duration::from_millis(100)) {
                        reported = Some(std::time::Instant::now());
                        let progress = serde_json::json!({ "position": position, "head": head });
                        let fault = Fault {
                            error: error.clone(),
                            kind,
                            since: store::now_rfc3339(),
                            rebuilding: Some(progress),
                        };
                        live.record_fault(&fault);
                    }
                };
                // Shown as rebuilding before the request is taken: whoever
                // waits on it never sees it gone with nothing under way.
                report(0, 0);
                let _ = std::fs::remove_file(request_path(&dir, name));
                match ProjectionRunner::rebuild_damaged(
                    engine.clone(),
                    &spec,
                    opener,
                    stop.clone(),
                    &mut report,
                ) {
                    Ok(true) => {
                        live.clear_fault();
                        tracing::info!(projection = name, "the damaged database was rebuilt and replaced");
                        break;
                    }
                    Ok(false) => return,
                    Err(rebuild_err) => {
                        let failed = format!("{error}; {rebuild_err:#}");
                        tracing::error!(projection = name, "{failed}");
                        live.record_fault(&Fault {
                            error: failed,
                            kind,
                            since: store::now_rfc3339(),
                            rebuilding: None,
                        });
                    }
                }
            },
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
    }
}

/// Start the projection and run it until told to stop; `database` follows
/// it through a rebuild's takeover, for the fault to name.
fn run_once(
    engine: &Arc<ProjectorEngine>,
    spec: &ProjectionSpec,
    opener: &Arc<dyn SourceOpener>,
    publisher: &Arc<dyn Publisher>,
    live: &Arc<LiveProjection>,
    commands: &Receiver<Command>,
    database: &mut PathBuf,
) -> Result<()> {
    let name = spec.name.as_str();
    let runner = ProjectionRunner::start_or_rebuild(
        engine.clone(),
        spec,
        opener,
        Some(publisher.clone()),
        live.stopping(),
        live.clone(),
    )?;
    let Some(mut runner) = runner else {
        tracing::info!(projection = name, "projection stopped during its rebuild");
        return Ok(());
    };
    tracing::info!(
        projection = name,
        module = runner.module_sha256(),
        checkpoint = %runner.checkpoint().to_json(),
        "projection started"
    );
    let ran = runner.run(commands);
    *database = runner.database().to_path_buf();
    ran?;
    store::set_meta(runner.db(), "state", Some(RunState::Stopped.as_str()))?;
    tracing::info!(projection = name, checkpoint = %runner.checkpoint().to_json(), "projection stopped");
    Ok(())
}

/// How a wait while faulted ended.
enum Woken {
    /// Told to stop.
    Stop,
    /// Asked to rebuild.
    Rebuild,
    /// The wait is over.
    Elapsed,
}

/// Wait `wait` (`Duration::MAX`: until a command) while the projection is
/// faulted, taking its commands: a stop ends the wait, a pause or resume is
/// remembered for when it runs again, a rebuild request is kept as a
/// request file (so neither a restart nor a stop loses it) and ends the
/// wait if `wake_on_rebuild`, and a new module waits for the next start,
/// which loads the file anyway.
fn wait_while_faulted(
    commands: &Receiver<Command>,
    wait: Duration,
    wake_on_rebuild: bool,
    dir: &Path,
    name: &str,
    paused: &mut bool,
) -> Woken {
    let until = std::time::Instant::now().checked_add(wait);
    loop {
        let left = until
            .map_or(Duration::from_secs(3600), |at| at.saturating_duration_since(std::time::Instant::now()));
        if left.is_zero() {
            return Woken::Elapsed;
        }
        match commands.recv_timeout(left) {
            Ok(Command::Stop) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Woken::Stop,
            Ok(Command::Pause) => *paused = true,
            Ok(Command::Resume) => *paused = false,
            Ok(Command::Swap(_)) => {}
            Ok(Command::Rebuild) => {
                let request = request_path(dir, name);
                if !request.exists()
                    && let Err(err) = std::fs::write(&request, b"")
                {
                    tracing::warn!(projection = name, file = %request.display(), "cannot keep the rebuild request: {err}");
                }
                if wake_on_rebuild {
                    return Woken::Rebuild;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if until.is_some() {
                    return Woken::Elapsed;
                }
            }
        }
    }
}
