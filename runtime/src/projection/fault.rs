//! A projection's fault: why it cannot run, kept beside its database in
//! `projections/<name>.fault` and never inside it — the database is often
//! what failed (a full disk, a damaged file, a read-only one), and `status`,
//! reading the files from another process, must still say so.
//!
//! The file is written whole at the projection's start, [`RECORD_BYTES`] of
//! spaces, and from then on only overwritten in place, so recording a fault
//! on a disk that has just filled up needs no new block. (On a copy-on-write
//! filesystem, btrfs or ZFS, an overwrite needs free space too: there a fault
//! on a full disk may only reach the log.)

use crate::store;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// The size of the fault file: room for one record.
pub const RECORD_BYTES: usize = 4096;

/// What the host does about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// The host's own failure that may pass — a full disk, a read-only or
    /// unreadable file, an I/O error: nothing was committed, so it tries
    /// again with backoff and resumes from its checkpoint once it can.
    Retrying,
    /// The database is damaged: it stays faulted until `projector rebuild`
    /// builds it again from the source.
    Damaged,
    /// Anything else (the module halted on an event, or cannot be loaded):
    /// it stays faulted until a new module file arrives.
    Halted,
}

/// A recorded fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// What failed: the file, and the OS's or SQLite's error.
    pub error: String,
    /// What the host does about it.
    pub kind: FaultKind,
    /// When it was first recorded (RFC 3339).
    pub since: String,
    /// While a damaged database is being rebuilt: `{position, head}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilding: Option<serde_json::Value>,
}

/// Projection `name`'s fault file in `dir` (its databases' folder).
#[derive(Debug, Clone)]
pub struct FaultFile {
    path: PathBuf,
}

impl FaultFile {
    /// The fault file of projection `name`, whose databases are in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        FaultFile { path: crate::config::paths::fault_path(dir, name) }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Make room for a record now, while there is room: a file of
    /// [`RECORD_BYTES`] spaces, unless it is there already (a fault
    /// recorded by the last run then stays until the projection runs
    /// again).
    pub fn prepare(&self) -> std::io::Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.len() == RECORD_BYTES as u64 => Ok(()),
            _ => {
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::File::create(&self.path)?.write_all(&[b' '; RECORD_BYTES])
            }
        }
    }

    /// Record `fault`, in place. A longer error than the file holds is cut.
    pub fn record(&self, fault: &Fault) -> std::io::Result<()> {
        let mut fault = fault.clone();
        let mut bytes = serde_json::to_vec(&fault).expect("a fault serializes");
        while bytes.len() > RECORD_BYTES {
            let keep = fault.error.len().saturating_sub(bytes.len() - RECORD_BYTES + 16);
            let cut = (0..=keep).rev().find(|&i| fault.error.is_char_boundary(i)).unwrap_or(0);
            fault.error.truncate(cut);
            fault.error.push('…');
            bytes = serde_json::to_vec(&fault).expect("a fault serializes");
        }
        bytes.resize(RECORD_BYTES, b' ');
        self.overwrite(&bytes)
    }

    /// Clear the record (the projection runs again), in place.
    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::metadata(&self.path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            _ => self.overwrite(&[b' '; RECORD_BYTES]),
        }
    }

    fn overwrite(&self, bytes: &[u8]) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&self.path)?;
        file.write_all_at(bytes, 0)
    }

    /// The fault recorded, if any.
    pub fn read(&self) -> Option<Fault> {
        // A record is written in one call; a reader that caught it half
        // written reads it again.
        for _ in 0..3 {
            let bytes = std::fs::read(&self.path).ok()?;
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            if text.is_empty() {
                return None;
            }
            if let Ok(fault) = serde_json::from_str(text) {
                return Some(fault);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        None
    }
}

/// What the host does about `err`, a projection's fault. Told by the
/// error's type, never its text: SQLite's code, or the OS's error kind.
pub fn classify(err: &anyhow::Error) -> FaultKind {
    if store::is_damaged(err) {
        return FaultKind::Damaged;
    }
    for cause in err.chain() {
        if let Some(code) =
            cause.downcast_ref::<rusqlite::Error>().and_then(rusqlite::Error::sqlite_error_code)
        {
            use rusqlite::ErrorCode::*;
            if matches!(
                code,
                DiskFull
                    | SystemIoFailure
                    | ReadOnly
                    | CannotOpen
                    | PermissionDenied
                    | DatabaseBusy
                    | DatabaseLocked
                    | OutOfMemory
                    | FileLockingProtocolFailed
            ) {
                return FaultKind::Retrying;
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                StorageFull
                    | QuotaExceeded
                    | ReadOnlyFilesystem
                    | PermissionDenied
                    | ResourceBusy
                    | OutOfMemory
            ) {
                return FaultKind::Retrying;
            }
        }
    }
    FaultKind::Halted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(error: &str) -> Fault {
        Fault { error: error.into(), kind: FaultKind::Retrying, since: "now".into(), rebuilding: None }
    }

    #[test]
    fn a_record_is_written_in_place_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let file = FaultFile::new(dir.path(), "p");
        assert_eq!(file.read(), None);
        file.prepare().unwrap();
        assert_eq!(std::fs::metadata(file.path()).unwrap().len(), RECORD_BYTES as u64);
        assert_eq!(file.read(), None);
        file.record(&fault("disk full")).unwrap();
        assert_eq!(file.read(), Some(fault("disk full")));
        // The next start keeps it until the projection runs again.
        file.prepare().unwrap();
        assert_eq!(file.read(), Some(fault("disk full")));
        file.clear().unwrap();
        assert_eq!(file.read(), None);
        assert_eq!(std::fs::metadata(file.path()).unwrap().len(), RECORD_BYTES as u64);
    }

    #[test]
    fn a_long_error_is_cut_to_fit() {
        let dir = tempfile::tempdir().unwrap();
        let file = FaultFile::new(dir.path(), "p");
        file.prepare().unwrap();
        file.record(&fault(&"é".repeat(RECORD_BYTES))).unwrap();
        let read = file.read().unwrap();
        assert!(read.error.ends_with('…') && read.error.len() < RECORD_BYTES, "{}", read.error.len());
        assert_eq!(std::fs::metadata(file.path()).unwrap().len(), RECORD_BYTES as u64);
    }

    #[test]
    fn faults_are_told_apart_by_their_type() {
        let sqlite = |code| -> anyhow::Error {
            anyhow::Error::new(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None))
                .context("projection p: cannot commit a batch")
        };
        assert_eq!(classify(&sqlite(rusqlite::ffi::SQLITE_FULL)), FaultKind::Retrying);
        assert_eq!(classify(&sqlite(rusqlite::ffi::SQLITE_READONLY)), FaultKind::Retrying);
        assert_eq!(classify(&sqlite(rusqlite::ffi::SQLITE_IOERR_WRITE)), FaultKind::Retrying);
        assert_eq!(classify(&sqlite(rusqlite::ffi::SQLITE_CORRUPT)), FaultKind::Damaged);
        assert_eq!(classify(&sqlite(rusqlite::ffi::SQLITE_NOTADB)), FaultKind::Damaged);
        let io =
            anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::StorageFull)).context("cannot write");
        assert_eq!(classify(&io), FaultKind::Retrying);
        assert_eq!(classify(&anyhow::anyhow!("halted at event e (position 3): bad")), FaultKind::Halted);
    }
}
