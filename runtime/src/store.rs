//! A projection's database: one SQLite file (WAL) holding the guest's
//! key/value table and its own tables, and the runtime's tables — the
//! checkpoint per source, the dead letters, the projection's metadata and
//! the outbox of events it emitted. Keeping all of it in one file is what
//! lets a batch's state, its emitted events and its checkpoint commit in one
//! transaction.

use crate::bindings::Event;
use crate::config::paths::pointer_path;
use crate::sources::Checkpoint;
use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::{Path, PathBuf};

/// The runtime's tables and the outbox's rules, in one file with the SDK's
/// harness, which builds databases of the same layout.
#[path = "../../guest-sdk/src/runtime_tables.rs"]
pub mod runtime_tables;

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
        .and_then(|()| db.execute_batch(&format!("BEGIN; {} COMMIT;", runtime_tables::SCHEMA)))
        .and_then(|()| add_outbox_partition(&db))
        .map_err(|err| explain_damage(err.into(), path))
        .with_context(|| format!("cannot set up projection database {}", path.display()))?;
    Ok(db)
}

/// A database made before `projector_outbox.partition` existed gets the
/// column: its rows are of its source's only partition.
fn add_outbox_partition(db: &Connection) -> rusqlite::Result<()> {
    let has: bool = db
        .prepare("SELECT count(*) FROM pragma_table_info('projector_outbox') WHERE name = 'partition'")?
        .query_row([], |row| row.get::<_, i64>(0))?
        > 0;
    if !has {
        db.execute_batch("ALTER TABLE projector_outbox ADD COLUMN partition TEXT")?;
    }
    Ok(())
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
/// projection database at `path` damaged (said once, however often called).
pub fn explain_damage(err: anyhow::Error, path: &Path) -> anyhow::Error {
    if !is_damaged(&err) || err.downcast_ref::<Damaged>().is_some() {
        return err;
    }
    // `<name>.db` or a rebuilt generation `<name>.<n>.db`; names hold no dots.
    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
    let name = file.split('.').next().unwrap_or(file).to_string();
    err.context(Damaged { path: path.to_path_buf(), name })
}

/// What a damaged projection database's error says: which file, and how to
/// build it again.
#[derive(Debug)]
struct Damaged {
    path: PathBuf,
    name: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the projection database {} is damaged; it holds only state built from the event log, so \
             build it again: run `projector rebuild {}` (with `projector run` running or not; the \
             damaged file is replaced, so copy it aside first to keep it)",
            self.path.display(),
            self.name
        )
    }
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

/// How far the effect of source `key`'s events is committed: the position
/// of each of its partitions (`key` itself, or `key/…` for a source of
/// several).
pub fn checkpoint(db: &Connection, key: &str) -> Result<Checkpoint> {
    let mut stmt = db.prepare_cached(
        "SELECT source, position FROM projector_checkpoints \
         WHERE source = ?1 OR substr(source, 1, length(?1) + 1) = ?1 || '/'",
    )?;
    let mut checkpoint = Checkpoint::default();
    for row in stmt.query_map([key], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))? {
        let (partition, position) = row?;
        checkpoint.set(&partition, position as u64);
    }
    Ok(checkpoint)
}

/// Every partition the projection's database holds a position of, whatever
/// source it belongs to.
pub fn checkpoint_partitions(db: &Connection) -> Result<Vec<String>> {
    let mut stmt = db.prepare("SELECT source FROM projector_checkpoints ORDER BY source")?;
    let partitions = stmt.query_map([], |row| row.get::<_, String>(0))?;
    Ok(partitions.collect::<rusqlite::Result<_>>()?)
}

/// Move the checkpoint from `from` to `to`; call inside the batch's
/// transaction. A compare-and-set per partition: `false`, and the caller
/// rolls back, when the database no longer holds `from` — another writer
/// moved it (a second host on the same data folder) — so the batch is not
/// applied a second time.
pub fn advance_checkpoint(db: &Connection, from: &Checkpoint, to: &Checkpoint) -> Result<bool> {
    for (partition, position) in to.partitions() {
        let was = from.position(partition);
        if was != position && !advance_partition(db, partition, was, position)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn partition_position(db: &Connection, partition: &str) -> Result<u64> {
    let position: Option<i64> = db
        .prepare_cached("SELECT position FROM projector_checkpoints WHERE source = ?1")?
        .query_row([partition], |row| row.get(0))
        .optional()?;
    Ok(position.unwrap_or(0) as u64)
}

fn advance_partition(db: &Connection, partition: &str, from: u64, to: u64) -> Result<bool> {
    let changed = db
        .prepare_cached(
            "INSERT INTO projector_checkpoints (source, position) VALUES (?1, ?3) \
             ON CONFLICT (source) DO UPDATE SET position = excluded.position \
             WHERE projector_checkpoints.position = ?2",
        )?
        .execute(params![partition, from as i64, to as i64])?;
    // A first checkpoint inserted while another writer inserted its own
    // conflicts on the key and changes nothing either.
    Ok(changed == 1 && (from != 0 || partition_position(db, partition)? == to))
}

/// Run `write` in one `BEGIN IMMEDIATE` transaction: committed when it
/// returns true, rolled back when it returns false or fails.
pub fn commit_if(db: &Connection, write: impl FnOnce(&Connection) -> Result<bool>) -> Result<bool> {
    db.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    match write(db) {
        Ok(true) => {
            if let Err(err) = db.prepare_cached("COMMIT").and_then(|mut commit| commit.execute([])) {
                let _ = db.execute_batch("ROLLBACK");
                return Err(err.into());
            }
            Ok(true)
        }
        Ok(false) => {
            db.prepare_cached("ROLLBACK")?.execute([])?;
            Ok(false)
        }
        Err(err) => {
            let _ = db.execute_batch("ROLLBACK");
            Err(err)
        }
    }
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
    let now = now_rfc3339();
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
    /// The source partition it came from (`log` for the embedded log).
    #[serde(skip)]
    pub source: String,
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
    /// Its payload: shown as JSON when it is JSON, as text when it is
    /// UTF-8, else base64 (`{"base64": "…"}`), so an operator can decide
    /// what to do with it.
    #[serde(serialize_with = "payload")]
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

/// Every dead letter, in the order its source gave it.
pub fn dead_letters(db: &Connection) -> Result<Vec<DeadLetter>> {
    let mut stmt = db.prepare(
        "SELECT id, position, stream, type, reason, module, attempts, parked_at, subject, time, \
         correlation_id, causation_id, data, source FROM projector_dead_letters \
         ORDER BY source, position",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(DeadLetter {
            source: row.get(13)?,
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

/// How an operator settled a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Discarded: never to be applied. A rebuild hands the event to no
    /// module and parks it no more.
    Discarded,
    /// Retried and applied. A rebuild hands the event to the module in
    /// order like any other; should the module park it, it is handed over
    /// once more when the rebuild has caught up, as the retry did.
    Resolved,
}

impl Settlement {
    fn table(self) -> &'static str {
        match self {
            Settlement::Discarded => "projector_discarded",
            Settlement::Resolved => "projector_resolved",
        }
    }

    fn time_column(self) -> &'static str {
        match self {
            Settlement::Discarded => "discarded_at",
            Settlement::Resolved => "resolved_at",
        }
    }
}

/// A settled dead letter: which event, of which source partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Settled {
    /// The source partition (`log` for the embedded log).
    pub source: String,
    /// Its position there.
    pub position: u64,
    /// The event's id.
    pub id: String,
}

/// Record that the dead letter at `position` of `source` (event `id`) was
/// settled; call in the transaction that removes it.
pub fn record_settled(
    db: &Connection,
    settlement: Settlement,
    source: &str,
    position: u64,
    id: &str,
) -> Result<()> {
    let sql = format!(
        "INSERT OR REPLACE INTO {} (source, position, id, {}) VALUES (?1, ?2, ?3, ?4)",
        settlement.table(),
        settlement.time_column()
    );
    db.prepare_cached(&sql)?.execute(params![source, position as i64, id, now_rfc3339()])?;
    Ok(())
}

/// Every dead letter settled `settlement`'s way.
pub fn settled(db: &Connection, settlement: Settlement) -> Result<Vec<Settled>> {
    let sql = format!("SELECT source, position, id FROM {} ORDER BY source, position", settlement.table());
    let mut stmt = db.prepare(&sql)?;
    let rows = stmt.query_map([], |row| {
        Ok(Settled { source: row.get(0)?, position: row.get::<_, i64>(1)? as u64, id: row.get(2)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A settled dead letter as a database records it, to carry into the
/// next generation.
#[derive(Debug, Clone)]
pub struct SettledRecord {
    settlement: Settlement,
    settled: Settled,
    at: String,
}

/// Every settled dead letter `db` records, both ways.
pub fn settled_records(db: &Connection) -> Result<Vec<SettledRecord>> {
    let mut records = Vec::new();
    for settlement in [Settlement::Discarded, Settlement::Resolved] {
        let sql =
            format!("SELECT source, position, id, {} FROM {}", settlement.time_column(), settlement.table());
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map([], |row| {
            Ok(SettledRecord {
                settlement,
                settled: Settled {
                    source: row.get(0)?,
                    position: row.get::<_, i64>(1)? as u64,
                    id: row.get(2)?,
                },
                at: row.get(3)?,
            })
        })?;
        records.extend(rows.collect::<rusqlite::Result<Vec<_>>>()?);
    }
    Ok(records)
}

/// Record `records` (read from another generation of the same projection)
/// in `db`, keeping when each was settled; those it has already stay.
pub fn carry_settled(db: &Connection, records: &[SettledRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    commit_if(db, |db| {
        for record in records {
            let sql = format!(
                "INSERT OR IGNORE INTO {} (source, position, id, {}) VALUES (?1, ?2, ?3, ?4)",
                record.settlement.table(),
                record.settlement.time_column()
            );
            let settled = &record.settled;
            db.prepare_cached(&sql)?.execute(params![
                settled.source,
                settled.position as i64,
                settled.id,
                record.at
            ])?;
        }
        Ok(true)
    })?;
    Ok(())
}

/// Now, in RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// An event a projection emitted, waiting in its outbox to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Its place in the outbox: rows are published in this order, and
    /// [`outbox_remove`] takes every row up to one.
    pub seq: i64,
    /// Its id, `<projection>:<position>:<index>`: the same every time the
    /// causing event is handled, so the log can refuse a second copy.
    pub id: String,
    /// The stream to publish it on.
    pub stream: String,
    /// Its type.
    pub event_type: String,
    /// Its subject.
    pub subject: Option<String>,
    /// Its payload.
    pub data: Vec<u8>,
    /// The causing event's correlation id.
    pub correlation_id: Option<String>,
    /// The causing event's id.
    pub causation_id: String,
    /// `projector/<projection>`.
    pub source: String,
    /// When it was emitted (RFC 3339).
    pub time: String,
    /// The causing event's position.
    pub position: u64,
}

/// Up to `limit` events of the outbox, oldest first: what to publish next.
pub fn outbox_pending(db: &Connection, limit: usize) -> Result<Vec<OutboxEvent>> {
    let mut stmt = db.prepare_cached(
        "SELECT seq, id, stream, type, subject, data, correlation_id, causation_id, source, time, position \
         FROM projector_outbox ORDER BY seq LIMIT ?1",
    )?;
    let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
        Ok(OutboxEvent {
            seq: row.get(0)?,
            id: row.get(1)?,
            stream: row.get(2)?,
            event_type: row.get(3)?,
            subject: row.get(4)?,
            data: row.get(5)?,
            correlation_id: row.get(6)?,
            causation_id: row.get(7)?,
            source: row.get(8)?,
            time: row.get(9)?,
            position: row.get::<_, i64>(10)? as u64,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Remove the outbox's events up to and including `up_to_seq`, once they
/// are published; returns how many were removed.
pub fn outbox_remove(db: &Connection, up_to_seq: i64) -> Result<usize> {
    Ok(db.prepare_cached("DELETE FROM projector_outbox WHERE seq <= ?1")?.execute([up_to_seq])?)
}

/// How many events wait in the outbox to be published.
pub fn outbox_len(db: &Connection) -> Result<u64> {
    let n: i64 =
        db.prepare_cached("SELECT count(*) FROM projector_outbox")?.query_row([], |row| row.get(0))?;
    Ok(n as u64)
}

/// Remove the outbox's events whose cause `checkpoint` (of source `key`)
/// covers: a rebuilt generation's copies of what the generation it
/// replaces published already. A row's partition is its cause's (none: the
/// source's only one, `key`), its position where that partition's
/// checkpoint stands once the cause is applied. Returns how many were
/// removed.
pub fn outbox_drop_through(db: &Connection, checkpoint: &Checkpoint, key: &str) -> Result<usize> {
    let covered: Vec<i64> = db
        .prepare_cached("SELECT seq, partition, position FROM projector_outbox")?
        .query_map([], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, i64>(2)?))
        })?
        .filter_map(|row| match row {
            Ok((seq, partition, position)) => {
                let through = checkpoint.position(partition.as_deref().unwrap_or(key));
                (position as u64 <= through).then_some(Ok(seq))
            }
            Err(err) => Some(Err(err)),
        })
        .collect::<rusqlite::Result<_>>()?;
    let mut remove = db.prepare_cached("DELETE FROM projector_outbox WHERE seq = ?1")?;
    for seq in &covered {
        remove.execute([seq])?;
    }
    Ok(covered.len())
}

/// A payload as a person can read it: the JSON it holds, its text, or base64.
fn payload<S: serde::Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    use serde::Serialize as _;
    match (serde_json::from_slice::<serde_json::Value>(data), std::str::from_utf8(data)) {
        (Ok(value), _) => value.serialize(serializer),
        (Err(_), Ok(text)) => text.serialize(serializer),
        (Err(_), Err(_)) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(data) })
                .serialize(serializer)
        }
    }
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

/// Remove every database generation of projection `name` in `dir` but
/// `current`: what a host killed in the middle of a rebuild (or a takeover)
/// left behind. Call before the projection starts, never while a rebuild of
/// it runs.
pub fn remove_stale_generations(dir: &Path, name: &str, current: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let keep = current.file_name().and_then(|f| f.to_str()).unwrap_or("");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let companion =
            ["-wal", "-shm", "-journal"].iter().find_map(|s| file.strip_suffix(s)).unwrap_or(file);
        if crate::config::paths::is_generation_file(file, name) && companion != keep {
            tracing::info!(projection = name, file = %entry.path().display(), "removing a database generation left behind");
            if let Err(err) = std::fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), "cannot remove: {err}");
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(db: &Connection, id: &str, position: u64) {
        db.execute(
            runtime_tables::OUTBOX_INSERT,
            params![
                id,
                "charges",
                "order_charged",
                "o-1",
                b"{}".to_vec(),
                "c",
                "e",
                "projector/p",
                position as i64,
                None::<String>
            ],
        )
        .unwrap();
    }

    #[test]
    fn settled_dead_letters_are_carried_into_the_next_generation_once() {
        let dir = tempfile::tempdir().unwrap();
        let old = open(&dir.path().join("p.db")).unwrap();
        record_settled(&old, Settlement::Discarded, "log", 3, "e3").unwrap();
        record_settled(&old, Settlement::Resolved, "log", 5, "e5").unwrap();
        let new = open(&dir.path().join("p.1.db")).unwrap();
        record_settled(&new, Settlement::Resolved, "log", 5, "e5").unwrap();
        let at: String =
            new.query_row("SELECT resolved_at FROM projector_resolved", [], |r| r.get(0)).unwrap();
        carry_settled(&new, &settled_records(&old).unwrap()).unwrap();
        let settled_as = |settlement| settled(&new, settlement).unwrap();
        assert_eq!(
            settled_as(Settlement::Discarded),
            [Settled { source: "log".into(), position: 3, id: "e3".into() }]
        );
        assert_eq!(
            settled_as(Settlement::Resolved),
            [Settled { source: "log".into(), position: 5, id: "e5".into() }]
        );
        // What the new generation had already stays as it was.
        let kept: String =
            new.query_row("SELECT resolved_at FROM projector_resolved", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, at);
    }

    #[test]
    fn the_outbox_is_read_in_order_and_removed_up_to_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("p.db")).unwrap();
        for (i, id) in ["p:1:0", "p:1:1", "p:2:0"].iter().enumerate() {
            emit(&db, id, i as u64 + 1);
        }
        let pending = outbox_pending(&db, 2).unwrap();
        let ids: Vec<&str> = pending.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["p:1:0", "p:1:1"]);
        assert_eq!(pending[0].correlation_id.as_deref(), Some("c"));
        assert_eq!((pending[0].causation_id.as_str(), pending[0].source.as_str()), ("e", "projector/p"));
        assert_eq!(outbox_remove(&db, pending[1].seq).unwrap(), 2);
        let rest = outbox_pending(&db, 100).unwrap();
        assert_eq!(rest.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["p:2:0"]);
        assert_eq!(rest[0].position, 3);
        // An id is emitted once: the same again is the host's bug, an error.
        assert!(
            db.execute(
                runtime_tables::OUTBOX_INSERT,
                params![
                    "p:2:0",
                    "s",
                    "t",
                    None::<String>,
                    b"".to_vec(),
                    None::<String>,
                    "e",
                    "x",
                    1,
                    None::<String>
                ]
            )
            .is_err()
        );
        assert_eq!(outbox_len(&db).unwrap(), 1);
        assert_eq!(
            outbox_drop_through(&db, &Checkpoint::at("log", 2), "log").unwrap(),
            0,
            "caused later than 2"
        );
        assert_eq!(outbox_drop_through(&db, &Checkpoint::at("log", 3), "log").unwrap(), 1);
        assert_eq!(outbox_len(&db).unwrap(), 0);
        // Rows of a source of several partitions: each against its own.
        for (id, position, partition) in [("a", 5, "k/0"), ("b", 9, "k/0"), ("c", 5, "k/1")] {
            db.execute(
                runtime_tables::OUTBOX_INSERT,
                params![
                    id,
                    "s",
                    "t",
                    None::<String>,
                    b"".to_vec(),
                    None::<String>,
                    "e",
                    "x",
                    position,
                    partition
                ],
            )
            .unwrap();
        }
        let mut old = Checkpoint::at("k/0", 6);
        old.set("k/1", 4);
        assert_eq!(
            outbox_drop_through(&db, &old, "k").unwrap(),
            1,
            "only a: b is past k/0's 6, c past k/1's 4"
        );
        let left: Vec<String> = outbox_pending(&db, 10).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(left, ["b", "c"]);
    }
}
