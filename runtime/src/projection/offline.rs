//! Rebuilds with no host running: `projector rebuild` on a data folder no
//! `run` holds, and the request a running host picks up otherwise.

use crate::config::Config;
use crate::config::paths::{lock_path, next_generation, offline_lock_path, request_path};
use crate::projection::fault::FaultFile;
use crate::projection::live::LiveProjection;
use crate::projection::outbox;
use crate::projection::runner::{ProjectionRunner, ProjectionSpec};
use crate::sandbox::engine::ProjectorEngine;
use crate::sources::embedded::EventLog;
use crate::store::{self, remove_database, switch_to};
use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Ask the `run` holding `config`'s data folder to rebuild projection
/// `name` (it checks between batches).
pub fn request(config: &Config, name: &str) -> Result<()> {
    config.projection(name)?;
    let dir = config.data.join("projections");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = request_path(&dir, name);
    std::fs::write(&path, b"").with_context(|| format!("cannot write {}", path.display()))
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
    let lock_file = lock_path(&config.data);
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
        filter: crate::sources::filter_of(p),
        batch_size: p.batch_size,
        limits: config.limits(p),
        policy: p.on_failure,
    };
    let log = Arc::new(EventLog::open(&config.data)?);
    let opener = crate::sources::opener_for(config, p, &log)?;
    let engine = Arc::new(
        ProjectorEngine::new(config.limits(p).fuel.is_some())?.with_cache(config.data.join("cache")),
    );
    let live = Arc::new(LiveProjection::new(name, Arc::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let built = engine
        .load_file(&spec.module)
        .with_context(|| format!("projection {name}: cannot load its module"))
        .and_then(|module| {
            ProjectionRunner::start_generation(engine, &spec, module, &opener, stop, live, &current)
        })
        .and_then(|mut runner| {
            runner.catch_up_with(progress)?;
            // What was discarded or resolved meanwhile (the dead-letter
            // commands work on the current generation).
            runner.adopt_settled(&current)?;
            crate::store::set_meta(runner.db(), "state", Some("stopped"))?;
            hand_over(&current, &runner, &log)?;
            Ok(runner.checkpoint().total())
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
    // A fault of the database just replaced (damaged, say) is over.
    let faults = FaultFile::new(current.parent().unwrap_or(Path::new(".")), name);
    if let Err(err) = faults.clear() {
        tracing::warn!(projection = name, file = %faults.path().display(), "cannot clear the fault record: {err}");
    }
    Ok((spec.database, checkpoint))
}

/// The outbox at the takeover, as a running host hands it over (see
/// [`outbox`]): what the `current` generation left unpublished is published
/// to `log`, and what it published is dropped from the rebuilt one's outbox.
/// Nothing the rebuild emitted is published here: the next `run` publishes
/// what is left. A damaged `current` has no outbox to read: the rebuilt one
/// keeps every event it emitted, and the log drops those published before
/// (they carry the same ids).
fn hand_over(current: &Path, rebuilt: &ProjectionRunner, log: &EventLog) -> Result<()> {
    if !current.exists() {
        return Ok(());
    }
    let handed = store::open(current).and_then(|old| {
        outbox::hand_over(&old, rebuilt.db(), rebuilt.source_key(), Some(log), &Default::default())
    });
    let handed = handed.map(drop);
    match handed {
        Err(err) if store::is_damaged(&err) => {
            tracing::warn!(
                database = %current.display(),
                "the database being replaced is damaged, its outbox unreadable: every event the \
                 rebuild emitted stays in the outbox; the log drops those published before"
            );
            Ok(())
        }
        handed => handed,
    }
}
