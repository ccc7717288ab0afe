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

/// Projection `name`'s current database in `dir`: the file its pointer
/// names, or `<name>.db` before the first rebuild.
pub fn current_database(dir: &Path, name: &str) -> PathBuf {
    match std::fs::read_to_string(pointer_path(dir, name)) {
        Ok(file) if !file.trim().is_empty() => dir.join(file.trim()),
        _ => dir.join(format!("{name}.db")),
    }
}

/// The file an operator's `projector rebuild` (or `POST …/rebuild`) drops
/// for a running host to pick up.
pub fn request_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.rebuild"))
}

/// The file recording why projection `name` is faulted, beside its
/// databases (never in them: the database may be what failed).
pub fn fault_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.fault"))
}

/// Whether `file` (a file name in a projections folder) is one of
/// projection `name`'s database generations or their companions:
/// `<name>.db`, `<name>.<n>.db`, each with `-wal`, `-shm` or `-journal`.
pub fn is_generation_file(file: &str, name: &str) -> bool {
    let Some(rest) = file.strip_prefix(name).and_then(|rest| rest.strip_prefix('.')) else {
        return false;
    };
    let rest = ["-wal", "-shm", "-journal"].iter().find_map(|s| rest.strip_suffix(s)).unwrap_or(rest);
    let Some(stem) = rest.strip_suffix("db") else { return false };
    stem.is_empty()
        || stem.strip_suffix('.').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_files_are_told_from_the_rest() {
        for file in ["p.db", "p.db-wal", "p.db-shm", "p.db-journal", "p.3.db", "p.12.db-wal"] {
            assert!(is_generation_file(file, "p"), "{file}");
        }
        for file in
            ["p.current", "p.rebuild", "p.fault", "pq.db", "p-2.db", "p..db", "p.x.db", "q.db", "p.db.bak"]
        {
            assert!(!is_generation_file(file, "p"), "{file}");
        }
    }
}
