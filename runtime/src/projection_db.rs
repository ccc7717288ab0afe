//! A projection's database: one SQLite file (WAL) holding the guest's
//! key/value table and its own tables, and the runtime's tables — the
//! checkpoint per source, the dead letters and the projection's metadata.
//! Keeping all of it in one file is what lets a batch's state and its
//! checkpoint commit in one transaction.

use crate::bindings::Event;
use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::Path;

/// The runtime's tables and the guest's key/value table.
const SCHEMA: &str = "
BEGIN;
CREATE TABLE IF NOT EXISTS projector_kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS projector_checkpoints (
    source TEXT PRIMARY KEY NOT NULL,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS projector_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT
);
CREATE TABLE IF NOT EXISTS projector_dead_letters (
    source TEXT NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    stream TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    time TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    data BLOB NOT NULL,
    reason TEXT NOT NULL,
    module TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    parked_at TEXT NOT NULL,
    PRIMARY KEY (source, position)
);
COMMIT;
";

/// The source name of the embedded event log in checkpoints.
pub const LOG_SOURCE: &str = "log";

/// Open (creating if needed) a projection's database for processing.
pub fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let db = Connection::open(path)
        .with_context(|| format!("cannot open projection database {}", path.display()))?;
    // The busy timeout first: switching to WAL needs a moment of exclusive
    // access, which a reader (`status`, `query`) may be holding.
    db.busy_timeout(std::time::Duration::from_secs(5))
        .and_then(|()| {
            db.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536; PRAGMA wal_autocheckpoint=10000;")
        })
        .and_then(|()| db.execute_batch(SCHEMA))
        .map_err(|err| explain_damage(err.into(), path))
        .with_context(|| format!("cannot set up projection database {}", path.display()))?;
    Ok(db)
}

/// Open a projection's database read-only, for status and queries while
/// `run` may be writing it. `None` if it does not exist yet.
pub fn open_read_only(path: &Path) -> Result<Option<Connection>> {
    if !path.exists() {
        return Ok(None);
    }
    let db =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_context(|| format!("cannot open projection database {}", path.display()))?;
    db.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=1;")?;
    // SQLite reads nothing at open: read the schema now, so a damaged file
    // is found here, with its name and what to do.
    db.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get::<_, i64>(0))
        .map_err(|err| explain_damage(err.into(), path))?;
    Ok(Some(db))
}

/// Whether SQLite found a database file damaged (not a database at all,
/// or malformed inside).
pub fn is_damaged(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<rusqlite::Error>().and_then(rusqlite::Error::sqlite_error_code),
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
        )
    })
}

/// `err`, with which file is damaged and what to do, when SQLite found the
/// projection database at `path` damaged.
pub fn explain_damage(err: anyhow::Error, path: &Path) -> anyhow::Error {
    if !is_damaged(&err) {
        return err;
    }
    // `<name>.db` or a rebuilt generation `<name>.<n>.db`; names hold no dots.
    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
    let name = file.split('.').next().unwrap_or(file);
    err.context(format!(
        "the projection database {} is damaged; it holds only state built from the event log, so \
         build it again: stop `projector run`, then `projector rebuild {name}` (the damaged file \
         is replaced; copy it aside first to keep it)",
        path.display()
    ))
}

/// Whether the runtime's tables exist yet.
pub fn is_initialized(db: &Connection) -> Result<bool> {
    let tables: i64 = db.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'projector_meta'",
        [],
        |row| row.get(0),
    )?;
    Ok(tables == 1)
}

/// The position of the last event of `source` whose effect is committed.
pub fn checkpoint(db: &Connection, source: &str) -> Result<u64> {
    let position: Option<i64> = db
        .prepare_cached("SELECT position FROM projector_checkpoints WHERE source = ?1")?
        .query_row([source], |row| row.get(0))
        .optional()?;
    Ok(position.unwrap_or(0) as u64)
}

/// Move the checkpoint of `source`; call inside the batch's transaction.
pub fn set_checkpoint(db: &Connection, source: &str, position: u64) -> Result<()> {
    db.prepare_cached(
        "INSERT INTO projector_checkpoints (source, position) VALUES (?1, ?2) \
         ON CONFLICT (source) DO UPDATE SET position = excluded.position",
    )?
    .execute(params![source, position as i64])?;
    Ok(())
}

/// A metadata value (module hash, state version, run state, last error).
pub fn meta(db: &Connection, key: &str) -> Result<Option<String>> {
    Ok(db
        .prepare_cached("SELECT value FROM projector_meta WHERE key = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?
        .flatten())
}

/// Set a metadata value.
pub fn set_meta(db: &Connection, key: &str, value: Option<&str>) -> Result<()> {
    db.prepare_cached(
        "INSERT INTO projector_meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Set several metadata values in one transaction.
pub fn set_metas(db: &Connection, values: &[(&str, Option<&str>)]) -> Result<()> {
    db.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let written = values.iter().try_for_each(|(key, value)| set_meta(db, key, *value));
    match written {
        Ok(()) => {
            db.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        }
        Err(err) => {
            let _ = db.execute_batch("ROLLBACK");
            Err(err)
        }
    }
}

/// Park `event` as a dead letter; call inside the transaction that moves
/// the checkpoint past it.
pub fn park(
    db: &Connection,
    source: &str,
    event: &Event,
    reason: &str,
    module: &str,
    attempts: u32,
) -> Result<()> {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    db.prepare_cached(
        "INSERT OR REPLACE INTO projector_dead_letters (source, position, id, stream, type, \
         subject, time, correlation_id, causation_id, data, reason, module, attempts, parked_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        source,
        event.position as i64,
        event.id,
        event.stream,
        event.type_,
        event.subject,
        event.time,
        event.correlation_id,
        event.causation_id,
        event.data,
        reason,
        module,
        attempts,
        now,
    ])?;
    Ok(())
}

/// A parked event, as `dead-letters list` shows it.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event's id.
    pub id: String,
    /// Its position in the source.
    pub position: u64,
    /// Its stream.
    pub stream: String,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Why it could not be applied (the last attempt's reason).
    pub reason: String,
    /// sha256 of the module that last failed on it.
    pub module: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// When it was parked (RFC 3339).
    pub parked_at: String,
    /// Its subject.
    pub subject: Option<String>,
    /// Its time.
    pub time: Option<String>,
    /// Its correlation id.
    pub correlation_id: Option<String>,
    /// Its causation id.
    pub causation_id: Option<String>,
    /// Its payload.
    #[serde(skip)]
    pub data: Vec<u8>,
}

impl DeadLetter {
    /// The event, to hand to a module again.
    pub fn event(&self) -> Event {
        Event {
            stream: self.stream.clone(),
            position: self.position,
            id: self.id.clone(),
            type_: self.event_type.clone(),
            subject: self.subject.clone(),
            time: self.time.clone(),
            correlation_id: self.correlation_id.clone(),
            causation_id: self.causation_id.clone(),
            data: self.data.clone(),
        }
    }
}

/// Every dead letter of `source`, in position order.
pub fn dead_letters(db: &Connection, source: &str) -> Result<Vec<DeadLetter>> {
    let mut stmt = db.prepare(
        "SELECT id, position, stream, type, reason, module, attempts, parked_at, subject, time, \
         correlation_id, causation_id, data FROM projector_dead_letters WHERE source = ?1 \
         ORDER BY position",
    )?;
    let rows = stmt.query_map([source], |row| {
        Ok(DeadLetter {
            id: row.get(0)?,
            position: row.get::<_, i64>(1)? as u64,
            stream: row.get(2)?,
            event_type: row.get(3)?,
            reason: row.get(4)?,
            module: row.get(5)?,
            attempts: row.get(6)?,
            parked_at: row.get(7)?,
            subject: row.get(8)?,
            time: row.get(9)?,
            correlation_id: row.get(10)?,
            causation_id: row.get(11)?,
            data: row.get(12)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Remove the dead letter at `position` of `source`; false if there was
/// none (another retry or a discard took it first).
pub fn remove_dead_letter(db: &Connection, source: &str, position: u64) -> Result<bool> {
    let removed = db
        .prepare_cached("DELETE FROM projector_dead_letters WHERE source = ?1 AND position = ?2")?
        .execute(params![source, position as i64])?;
    Ok(removed == 1)
}

/// Record another failed attempt at the dead letter at `position`.
pub fn record_failed_retry(
    db: &Connection,
    source: &str,
    position: u64,
    reason: &str,
    module: &str,
) -> Result<()> {
    db.prepare_cached(
        "UPDATE projector_dead_letters SET attempts = attempts + 1, reason = ?3, module = ?4 \
         WHERE source = ?1 AND position = ?2",
    )?
    .execute(params![source, position as i64, reason, module])?;
    Ok(())
}
