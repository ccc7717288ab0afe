//! The data folder's layout: where the host keeps its lock, and each
//! projection its database generations, its pointer to the current one and
//! the requests other processes leave for a running host.

use std::path::{Path, PathBuf};

/// The lock file `run` holds while it runs; `status` checks it to tell a
/// running projection from one whose host was killed.
pub fn lock_path(data: &Path) -> PathBuf {
    data.join("run.lock")
}

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

/// The lock an offline rebuild holds on data folder `data`.
pub fn offline_lock_path(data: &Path) -> PathBuf {
    data.join("rebuild.lock")
}
