//! Blue/green rebuilds: a new module version (or an operator) asks for the
//! state to be built again from the log.
//!
//! The new module replays the log from position 0 into the next
//! *generation* of the projection's database, on a thread of its own, while
//! the running module keeps processing and serving. Once it has caught up,
//! the projection's thread applies the last few events appended meanwhile,
//! then points `projections/<name>.current` at the new file with one
//! rename: a reader opens either the complete old database or the complete
//! new one, never a half-built one. The old files are then removed.

use crate::config::Config;
use crate::engine::ProjectorEngine;
use crate::event_log::EventLog;
use crate::live::LiveProjection;
use crate::projection::{ProjectionRunner, ProjectionSpec};
use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The pointer file naming projection `name`'s current database.
pub fn pointer_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.current"))
}

/// The file an operator's `projector rebuild` (or `POST …/rebuild`) drops
/// for a running host to pick up.
pub fn request_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.rebuild"))
}

/// The file of the next generation after `current`.
pub fn next_generation(current: &Path, name: &str) -> PathBuf {
    let dir = current.parent().unwrap_or(Path::new("."));
    let file = current.file_name().and_then(|f| f.to_str()).unwrap_or("");
    let generation: u64 = file
        .strip_prefix(&format!("{name}."))
        .and_then(|rest| rest.strip_suffix(".db"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    dir.join(format!("{name}.{}.db", generation + 1))
}

/// Point projection `name` at `database` (in the same folder), atomically.
pub fn switch_to(name: &str, database: &Path) -> Result<()> {
    let dir = database.parent().context("a database has a folder")?;
    let file = database.file_name().and_then(|f| f.to_str()).context("a database has a file name")?;
    let pointer = pointer_path(dir, name);
    let partial = pointer.with_extension("current-partial");
    std::fs::write(&partial, file)
        .and_then(|()| std::fs::rename(&partial, &pointer))
        .with_context(|| format!("cannot point {} at {file}", pointer.display()))
}

/// Remove a database file and its WAL companions.
pub fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(file = %file.display(), "cannot remove: {err}"),
        }
    }
}

/// A rebuild under way: the thread building the next generation.
pub struct Rebuild {
    /// The new generation's file.
    pub database: PathBuf,
    /// sha256 of the module building it.
    pub module: String,
    /// How far it has got.
    pub position: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<ProjectionRunner>>>,
}

impl Rebuild {
    /// Start building `spec`'s `database` (the new generation) with
    /// `module` from position 0.
    pub fn start_with(
        engine: Arc<ProjectorEngine>,
        spec: ProjectionSpec,
        log: Arc<EventLog>,
        module: crate::engine::LoadedModule,
    ) -> Self {
        remove_database(&spec.database);
        let sha256 = module.sha256.clone();
        let position = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let database = spec.database.clone();
        let (thread_position, thread_stop, thread_stop_check) =
            (position.clone(), stop.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("rebuild-{}", spec.name))
            .spawn(move || {
                let live = Arc::new(LiveProjection::new(&spec.name, Arc::default()));
                let mut runner =
                    ProjectionRunner::start_with_module(engine, &spec, module, &log, thread_stop, live)?;
                // Rounds until within a couple of batches of the head; the
                // projection's thread applies the rest before taking over.
                let close_enough = 2 * runner.batch_size() as u64;
                while !thread_stop_check.load(Ordering::Relaxed) {
                    runner.catch_up_with(|checkpoint, _| {
                        thread_position.store(checkpoint, Ordering::Relaxed)
                    })?;
                    if runner.behind()? <= close_enough {
                        break;
                    }
                }
                Ok(runner)
            })
            .expect("the OS starts a thread");
        Rebuild { database, module: sha256, position, stop, thread: Some(thread) }
    }

    /// Whether the new generation has caught up with the log as it was.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// The runner over the new generation, once finished.
    pub fn finish(mut self) -> Result<ProjectionRunner> {
        let thread = self.thread.take().expect("finished once");
        thread.join().map_err(|_| anyhow::anyhow!("the rebuild thread panicked"))?
    }

    /// Stop building and throw the new generation away.
    pub fn cancel(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            drop(thread.join());
        }
        remove_database(&self.database);
    }
}

/// Ask the `run` holding `config`'s data folder to rebuild projection
/// `name` (it checks between batches).
pub fn request(config: &Config, name: &str) -> Result<()> {
    config.projection(name)?;
    let dir = config.data.join("projections");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = request_path(&dir, name);
    std::fs::write(&path, b"").with_context(|| format!("cannot write {}", path.display()))
}

/// The lock an offline rebuild holds on data folder `data`.
pub fn offline_lock_path(data: &Path) -> PathBuf {
    data.join("rebuild.lock")
}

/// Whether an offline `projector rebuild` holds data folder `data`.
pub fn offline_rebuild_running(data: &Path) -> bool {
    match std::fs::File::open(offline_lock_path(data)) {
        Ok(file) => file.try_lock_shared().is_err(),
        Err(_) => false,
    }
}

/// Rebuild projection `name` here, with no `run` holding the data folder:
/// the next generation is built from the log with the config's module, then
/// takes over. `progress(position, head)` is called after every batch.
/// Returns the new database file and its checkpoint.
pub fn offline(config: &Config, name: &str, progress: impl FnMut(u64, u64)) -> Result<(PathBuf, u64)> {
    let p = config.projection(name)?;
    let lock_file = crate::supervisor::lock_path(&config.data);
    std::fs::create_dir_all(&config.data)
        .with_context(|| format!("cannot create data directory {}", config.data.display()))?;
    // Held for the whole rebuild, beside the run lock: a second `projector
    // rebuild` sees an offline rebuild, not a running host, and refuses.
    let rebuild_lock_file = offline_lock_path(&config.data);
    let rebuild_lock = std::fs::File::create(&rebuild_lock_file)
        .with_context(|| format!("cannot create {}", rebuild_lock_file.display()))?;
    rebuild_lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another `projector rebuild` is running on {}; wait for it to finish, then run this one",
            config.data.display()
        )
    })?;
    let lock = std::fs::File::create(&lock_file)
        .with_context(|| format!("cannot create {}", lock_file.display()))?;
    lock.try_lock()
        .map_err(|_| anyhow::anyhow!("a `projector run` started on {}; try again", config.data.display()))?;
    let current = config.database_path(name);
    let spec = ProjectionSpec {
        name: name.to_string(),
        module: p.module.clone(),
        database: next_generation(&current, name),
        filter: crate::event_log::Filter { streams: p.streams.clone(), types: p.types.clone() },
        batch_size: p.batch_size,
        limits: config.limits(p),
        policy: p.on_failure,
    };
    remove_database(&spec.database);
    let log = Arc::new(EventLog::open(&config.data)?);
    let engine = Arc::new(
        ProjectorEngine::new(config.limits(p).fuel.is_some())?.with_cache(config.data.join("cache")),
    );
    let live = Arc::new(LiveProjection::new(name, Arc::default()));
    let built = ProjectionRunner::start(engine, &spec, &log, Arc::new(AtomicBool::new(false)), live)
        .and_then(|mut runner| {
            runner.catch_up_with(progress)?;
            crate::projection_db::set_meta(runner.db(), "state", Some("stopped"))?;
            Ok(runner.checkpoint())
        });
    let checkpoint = match built {
        Ok(checkpoint) => checkpoint,
        Err(err) => {
            remove_database(&spec.database);
            return Err(err.context(format!("rebuilding {name} failed; its database is unchanged")));
        }
    };
    switch_to(name, &spec.database)?;
    remove_database(&current);
    Ok((spec.database, checkpoint))
}
