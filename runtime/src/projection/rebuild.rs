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

use crate::store::remove_database;
use anyhow::Result;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A rebuild under way: the thread building the next generation.
pub struct Rebuild<T> {
    /// The new generation's file.
    pub database: PathBuf,
    /// sha256 of the module building it.
    pub module: String,
    /// How far it has got.
    pub position: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<T>>>,
}

impl<T: Send + 'static> Rebuild<T> {
    /// Start building `database` (the new generation) with module
    /// `sha256`: `build(stop, position)` runs on a thread of its own,
    /// reporting how far it got in `position` and returning once it is
    /// close to the head or `stop` is set.
    pub fn spawn(
        name: &str,
        database: PathBuf,
        sha256: String,
        build: impl FnOnce(Arc<AtomicBool>, Arc<AtomicU64>) -> Result<T> + Send + 'static,
    ) -> Self {
        remove_database(&database);
        let position = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_position) = (stop.clone(), position.clone());
        let thread = std::thread::Builder::new()
            .name(format!("rebuild-{name}"))
            .spawn(move || build(thread_stop, thread_position))
            .expect("the OS starts a thread");
        Rebuild { database, module: sha256, position, stop, thread: Some(thread) }
    }

    /// Whether the new generation has caught up with the log as it was.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// What the build returned, once finished.
    pub fn finish(mut self) -> Result<T> {
        let thread = self.thread.take().expect("finished once");
        thread.join().map_err(|_| anyhow::anyhow!("the rebuild thread panicked"))?
    }

    /// Stop building and throw the new generation away.
    pub fn cancel(self) {
        drop(self);
    }
}

/// A rebuild dropped before it finished — cancelled, or its projection
/// stopped or faulted — stops building and leaves no file behind: a
/// detached thread would go on writing a generation nobody will take over.
impl<T> Drop for Rebuild<T> {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stop.store(true, Ordering::Relaxed);
        drop(thread.join());
        remove_database(&self.database);
    }
}
