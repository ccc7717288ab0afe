//! [`Supervisor`]: runs every projection of a config, each on its own
//! thread, until asked to stop; marks each database running, stopped or
//! faulted so `status` can tell from another process.

use crate::config::Config;
use crate::engine::ProjectorEngine;
use crate::event_log::{EventLog, Filter};
use crate::live::LiveProjection;
use crate::metrics::Metrics;
use crate::projection::{ProjectionRunner, ProjectionSpec};
use crate::projection_db;
use anyhow::{Context as _, Result};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Runs the projections of one config.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    log: Arc<EventLog>,
    engine: Arc<ProjectorEngine>,
    metrics: Arc<Metrics>,
    live: Vec<Arc<LiveProjection>>,
    threads: Vec<(String, JoinHandle<()>)>,
    _lock: File,
}

/// The lock file `run` holds while it runs; `status` checks it to tell a
/// running projection from one whose host was killed.
pub fn lock_path(data: &Path) -> std::path::PathBuf {
    data.join("run.lock")
}

impl Supervisor {
    /// Start every projection of `config`. A projection that cannot start
    /// is marked faulted with the reason; the others run.
    pub fn start(config: &Config) -> Result<Self> {
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
        let engine = Arc::new(ProjectorEngine::new(config.uses_fuel())?);
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::default());
        let mut threads = Vec::new();
        let mut live = Vec::new();
        for p in &config.projections {
            let spec = ProjectionSpec {
                name: p.name.clone(),
                module: p.module.clone(),
                database: config.database_path(&p.name),
                filter: Filter { streams: p.streams.clone(), types: p.types.clone() },
                batch_size: p.batch_size,
                limits: config.limits(p),
                policy: p.on_failure,
            };
            let shared = Arc::new(LiveProjection::new(&p.name, metrics.clone()));
            live.push(shared.clone());
            let (engine, log, stop) = (engine.clone(), log.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("projection-{}", p.name))
                .spawn(move || run_projection(engine, &spec, &log, &stop, shared))
                .context("cannot start a projection thread")?;
            threads.push((p.name.clone(), thread));
        }
        Ok(Supervisor { stop, log, engine, metrics, live, threads, _lock: lock })
    }

    /// The event log the projections read.
    pub fn log(&self) -> &Arc<EventLog> {
        &self.log
    }

    /// The engine the projections run on.
    pub fn engine(&self) -> &Arc<ProjectorEngine> {
        &self.engine
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Every projection's shared state, in config order.
    pub fn projections(&self) -> &[Arc<LiveProjection>] {
        &self.live
    }

    /// Stop every projection after its batch in flight, and wait for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(reader) = self.log.reader() {
            reader.wake_all();
        }
        for (name, thread) in self.threads {
            if thread.join().is_err() {
                tracing::error!(projection = %name, "projection thread panicked");
            }
        }
    }
}

fn run_projection(
    engine: Arc<ProjectorEngine>,
    spec: &ProjectionSpec,
    log: &EventLog,
    stop: &Arc<AtomicBool>,
    live: Arc<LiveProjection>,
) {
    let name = spec.name.as_str();
    let shared = live.clone();
    let result = ProjectionRunner::start(engine, spec, log, stop.clone(), live).and_then(|mut runner| {
        tracing::info!(
            projection = name,
            module = runner.module_sha256(),
            checkpoint = runner.checkpoint(),
            "projection started"
        );
        runner.run()?;
        projection_db::set_meta(runner.db(), "state", Some("stopped"))?;
        tracing::info!(projection = name, checkpoint = runner.checkpoint(), "projection stopped");
        Ok(())
    });
    if let Err(err) = result {
        tracing::error!(projection = name, "projection faulted: {err:#}");
        shared.set_last_error(Some(format!("{err:#}")));
        let marked = projection_db::open(&spec.database).and_then(|db| {
            projection_db::set_meta(&db, "state", Some("faulted"))?;
            projection_db::set_meta(&db, "error", Some(&format!("{err:#}")))
        });
        if let Err(mark_err) = marked {
            tracing::error!(projection = name, "cannot record the fault: {mark_err:#}");
        }
    }
}
