//! [`EventLog`]: the embedded, append-only event store (`<data>/events.db`).
//!
//! Every event gets a global position (the order projections see) and a
//! position in its stream. Event ids are unique, so a publisher that retries
//! (the outbox pattern) cannot append twice: re-appending an id is a no-op
//! counted as a duplicate. An append is one transaction: all of it or none.
//!
//! Readers in this process are woken on append; appends from another
//! process are seen by polling, every [`POLL_INTERVAL`].

use crate::bindings::Event;
use crate::config::validate_stream_name;
pub use crate::sources::Filter;
use crate::sources::{Batch as SourceBatch, Checkpoint, Progress, Source, SourceError, SourceOpener, Wake};
use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params, params_from_iter};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often a reader checks for appends made by another process.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

const SCHEMA: &str = "
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    stream_position INTEGER NOT NULL,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    subject TEXT,
    time TEXT,
    datacontenttype TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    data BLOB NOT NULL,
    UNIQUE (stream, stream_position)
);
CREATE TABLE IF NOT EXISTS streams (
    name TEXT PRIMARY KEY NOT NULL,
    head INTEGER NOT NULL
);
COMMIT;
";

/// An event to append, as parsed from a CloudEvent.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The publisher's unique id.
    pub id: String,
    /// CloudEvents `source`: who published it.
    pub source: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// CloudEvents `subject`.
    pub subject: Option<String>,
    /// CloudEvents `time` (RFC 3339).
    pub time: Option<String>,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: Option<String>,
    /// The `correlationid` extension.
    pub correlation_id: Option<String>,
    /// The `causationid` extension.
    pub causation_id: Option<String>,
    /// The payload bytes.
    pub data: Vec<u8>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AppendOutcome {
    /// Events newly appended.
    pub appended: u64,
    /// Events whose id was already in the log (not appended again).
    pub duplicates: u64,
}

/// One read: the matching events, and how far the log was scanned. The
/// reader's checkpoint may move to `scanned_to` even when no event matched.
#[derive(Debug)]
pub struct Batch {
    /// Matching events, in position order.
    pub events: Vec<Event>,
    /// Every event up to this position was considered.
    pub scanned_to: u64,
}

/// Wakes readers in this process when an append commits.
#[derive(Default)]
struct AppendSignal {
    appends: Mutex<u64>,
    woken: Condvar,
}

/// The embedded event log.
pub struct EventLog {
    path: PathBuf,
    writer: Mutex<Connection>,
    signal: Arc<AppendSignal>,
}

impl EventLog {
    /// Open (creating if needed) `<data_dir>/events.db`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let path = data_dir.join("events.db");
        let writer = Connection::open(&path)
            .map_err(|err| explain(err.into(), &path))
            .with_context(|| format!("cannot open event log {}", path.display()))?;
        // The busy timeout first: switching to WAL needs a moment of
        // exclusive access, which another process may be holding.
        writer.busy_timeout(Duration::from_secs(10))?;
        // SQLite answers "busy" without waiting in a few cases (a snapshot
        // gone stale under another process's append, WAL recovery), so the
        // set-up is tried again for as long as the busy timeout would wait.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let set_up = writer
                .execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
                .and_then(|()| writer.execute_batch(SCHEMA));
            match set_up {
                Err(err)
                    if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && std::time::Instant::now() < deadline =>
                {
                    let _ = writer.execute_batch("ROLLBACK");
                    std::thread::sleep(Duration::from_millis(10));
                }
                set_up => {
                    set_up
                        .map_err(|err| explain(err.into(), &path))
                        .with_context(|| format!("cannot set up event log {}", path.display()))?;
                    break;
                }
            }
        }
        Ok(EventLog { path, writer: Mutex::new(writer), signal: Arc::default() })
    }

    /// The file behind the log.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `events` to `stream` in one transaction. Ids already in the
    /// log are skipped and counted as duplicates.
    pub fn append(&self, stream: &str, events: &[NewEvent]) -> Result<AppendOutcome> {
        validate_stream_name(stream)?;
        self.append_unexplained(stream, events).map_err(|err| explain(err, &self.path))
    }

    fn append_unexplained(&self, stream: &str, events: &[NewEvent]) -> Result<AppendOutcome> {
        let mut db = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .with_context(|| format!("cannot start an append to {}", self.path.display()))?;
        let mut outcome = AppendOutcome { appended: 0, duplicates: 0 };
        {
            let mut head: i64 = tx
                .query_row("SELECT head FROM streams WHERE name = ?1", [stream], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (stream, stream_position, id, type, source, subject, time, \
                 datacontenttype, correlation_id, causation_id, data) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT (id) DO NOTHING",
            )?;
            for event in events {
                let inserted = insert.execute(params![
                    stream,
                    head + 1,
                    event.id,
                    event.event_type,
                    event.source,
                    event.subject,
                    event.time,
                    event.datacontenttype,
                    event.correlation_id,
                    event.causation_id,
                    event.data,
                ])?;
                if inserted == 1 {
                    head += 1;
                    outcome.appended += 1;
                } else {
                    outcome.duplicates += 1;
                }
            }
            if outcome.appended > 0 {
                tx.execute(
                    "INSERT INTO streams (name, head) VALUES (?1, ?2) \
                     ON CONFLICT (name) DO UPDATE SET head = excluded.head",
                    params![stream, head],
                )?;
            }
        }
        tx.commit().with_context(|| format!("cannot commit an append to {}", self.path.display()))?;
        drop(db);
        if outcome.appended > 0 {
            *self.signal.appends.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            self.signal.woken.notify_all();
        }
        Ok(outcome)
    }

    /// The position of the last event in the log (0 when empty).
    pub fn head(&self) -> Result<u64> {
        let db = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        head(&db)
    }

    /// Wake every reader of this log in this process (to stop, or to take
    /// a module update, promptly).
    pub fn wake(&self) {
        *self.signal.appends.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.signal.woken.notify_all();
    }

    /// A reader with its own connection, woken by this log's appends.
    pub fn reader(&self) -> Result<LogReader> {
        let db = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open event log {}", self.path.display()))?;
        db.execute_batch("PRAGMA busy_timeout=10000;")?;
        db.set_prepared_statement_cache_capacity(32);
        Ok(LogReader { db, signal: self.signal.clone() })
    }
}

/// Reads the log for one consumer.
pub struct LogReader {
    db: Connection,
    signal: Arc<AppendSignal>,
}

impl LogReader {
    /// Up to `limit` events matching `filter` after position `after`.
    pub fn read_after(&mut self, after: u64, filter: &Filter, limit: usize) -> Result<Batch> {
        self.read_into(after, filter, limit, Vec::new())
    }

    /// [`LogReader::read_after`], reading into `spent`, events of an
    /// earlier batch that are done with: their strings and payloads are
    /// overwritten in place, so a reader that is handed back each batch it
    /// read allocates nothing per event, and frees nothing on the thread
    /// that applied the batch.
    pub fn read_into(
        &mut self,
        after: u64,
        filter: &Filter,
        limit: usize,
        spent: Vec<Event>,
    ) -> Result<Batch> {
        let mut events = spent;
        let head = head(&self.db)?;
        if head <= after {
            events.clear();
            return Ok(Batch { events, scanned_to: after });
        }
        let mut sql = String::from(
            "SELECT position, stream, id, type, subject, time, correlation_id, causation_id, data \
             FROM events WHERE position > ?1 AND position <= ?2",
        );
        let mut args: Vec<rusqlite::types::Value> = vec![(after as i64).into(), (head as i64).into()];
        // `+column` keeps SQLite on the position range: with the
        // (stream, stream_position) index it would scan and sort the whole
        // stream for every batch.
        let mut only = |column: &str, values: &[String]| {
            let placeholders: Vec<String> =
                (0..values.len()).map(|i| format!("?{}", args.len() + i + 1)).collect();
            sql.push_str(&format!(" AND +{column} IN ({})", placeholders.join(", ")));
            args.extend(values.iter().map(|v| v.clone().into()));
        };
        if !filter.streams.is_empty() {
            only("stream", &filter.streams);
        }
        if let Some(types) = &filter.types {
            only("type", types);
        }
        sql.push_str(&format!(" ORDER BY position LIMIT {limit}"));
        let mut stmt = self.db.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(args))?;
        let mut read = 0;
        while let Some(row) = rows.next().context("reading the event log")? {
            if events.len() == read {
                events.push(blank_event());
            }
            overwrite(&mut events[read], row).context("reading the event log")?;
            read += 1;
        }
        events.truncate(read);
        let scanned_to = match events.last() {
            Some(last) if events.len() == limit => last.position,
            _ => head,
        };
        Ok(Batch { events, scanned_to })
    }

    /// The position of the last event in the log.
    pub fn head(&self) -> Result<u64> {
        head(&self.db)
    }

    /// Wait until this process appends, or `timeout` passes (appends from
    /// other processes are found by the caller's next read).
    pub fn wait(&self, timeout: Duration) {
        let appends = self.signal.appends.lock().unwrap_or_else(|e| e.into_inner());
        let seen = *appends;
        let _ = self
            .signal
            .woken
            .wait_timeout_while(appends, timeout, |n| *n == seen)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Wake every reader of this log (used to stop promptly).
    pub fn wake_all(&self) {
        *self.signal.appends.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.signal.woken.notify_all();
    }
}

/// Reads one stream of a log from any process, read-only, while `run` or
/// `append` may be writing it: what `projector events` prints.
pub struct StreamReader {
    db: Connection,
    stream: String,
}

impl StreamReader {
    /// A reader of `stream` in the log of data folder `data_dir`. The folder
    /// and its `events.db` must exist: reading never creates a log.
    pub fn open(data_dir: &Path, stream: &str) -> Result<Self> {
        validate_stream_name(stream)?;
        if !data_dir.is_dir() {
            anyhow::bail!(
                "there is no data folder {}: give the folder `projector run` and `projector append` \
                 use (the config's `data`)",
                data_dir.display()
            );
        }
        let path = data_dir.join("events.db");
        if !path.exists() {
            anyhow::bail!(
                "there is no event log in {} (no events.db): nothing was appended there yet; \
                 `projector append` or `projector run` creates it",
                data_dir.display()
            );
        }
        let db = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|db| db.execute_batch("PRAGMA busy_timeout=10000;").map(|()| db))
            .map_err(|err| explain(err.into(), &path))
            .with_context(|| format!("cannot open event log {}", path.display()))?;
        Ok(StreamReader { db, stream: stream.to_string() })
    }

    /// Up to `limit` events of the stream from its position `from` on
    /// (positions in a stream start at 1), each with its position.
    pub fn read_from(&mut self, from: u64, limit: usize) -> Result<Vec<(u64, NewEvent)>> {
        let created: i64 = self.db.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'",
            [],
            |row| row.get(0),
        )?;
        if created == 0 {
            // `run` or `append` is creating it this instant.
            return Ok(Vec::new());
        }
        let mut stmt = self.db.prepare_cached(
            "SELECT stream_position, id, source, type, subject, time, datacontenttype, correlation_id, \
             causation_id, data FROM events WHERE stream = ?1 AND stream_position >= ?2 \
             ORDER BY stream_position LIMIT ?3",
        )?;
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![self.stream, from, limit], |row| {
            Ok((
                row.get::<_, i64>(0)? as u64,
                NewEvent {
                    id: row.get(1)?,
                    source: row.get(2)?,
                    event_type: row.get(3)?,
                    subject: row.get(4)?,
                    time: row.get(5)?,
                    datacontenttype: row.get(6)?,
                    correlation_id: row.get(7)?,
                    causation_id: row.get(8)?,
                    data: row.get(9)?,
                },
            ))
        })?;
        rows.collect::<rusqlite::Result<_>>().context("reading the event log")
    }
}

fn head(db: &Connection) -> Result<u64> {
    let head: Option<i64> = db
        .prepare_cached("SELECT max(position) FROM events")?
        .query_row([], |row| row.get(0))
        .context("reading the event log's head")?;
    Ok(head.unwrap_or(0) as u64)
}

/// `err`, with what to do, when the event log at `path` is damaged or its
/// folder or file cannot be written.
pub fn explain(err: anyhow::Error, path: &Path) -> anyhow::Error {
    if crate::store::is_damaged(&err) {
        return err.context(format!(
            "the event log {} is damaged; it is the source of truth and cannot be rebuilt: restore \
             it from a backup (projection databases can then be rebuilt from it with `projector \
             rebuild`)",
            path.display()
        ));
    }
    let code = err.chain().find_map(|c| c.downcast_ref::<rusqlite::Error>()?.sqlite_error_code());
    if !matches!(
        code,
        Some(
            rusqlite::ErrorCode::ReadOnly
                | rusqlite::ErrorCode::CannotOpen
                | rusqlite::ErrorCode::PermissionDenied
        )
    ) {
        return err;
    }
    // SQLite does not say which file it could not write: find out.
    let dir = path.parent().unwrap_or(Path::new("."));
    let refused = |err: std::io::Error| {
        matches!(err.kind(), std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem)
    };
    if tempfile::tempfile_in(dir).is_err_and(refused) {
        return err.context(format!(
            "the data folder {} is read-only for this user; the log needs to write events.db and \
             its -wal and -shm files there: make the folder writable, or point --data (the \
             config's `data`) at one that is",
            dir.display()
        ));
    }
    if std::fs::OpenOptions::new().append(true).open(path).is_err_and(refused) {
        return err.context(format!(
            "the event log {} is read-only for this user: make it writable (e.g. `chmod u+w`)",
            path.display()
        ));
    }
    err
}

/// An event with nothing in it yet, for [`overwrite`] to fill.
fn blank_event() -> Event {
    Event {
        position: 0,
        stream: String::new(),
        id: String::new(),
        type_: String::new(),
        subject: None,
        time: None,
        correlation_id: None,
        causation_id: None,
        data: Vec::new(),
    }
}

/// `event`, overwritten with the log's `row` (the columns `read_into`
/// selects), keeping its strings' and payload's allocations.
fn overwrite(event: &mut Event, row: &rusqlite::Row<'_>) -> rusqlite::Result<()> {
    use rusqlite::types::{FromSqlResult, ValueRef};
    /// Column `i` as `as_type` reads it, failing as `Row::get` would.
    fn column<'r, T>(
        row: &'r rusqlite::Row<'_>,
        i: usize,
        as_type: impl FnOnce(&ValueRef<'r>) -> FromSqlResult<T>,
    ) -> rusqlite::Result<T> {
        let value = row.get_ref(i)?;
        as_type(&value)
            .map_err(|err| rusqlite::Error::FromSqlConversionFailure(i, value.data_type(), err.into()))
    }
    /// `into` holding `value`, in its own allocation when that [`fits`].
    fn refill(into: &mut String, value: &str) {
        if fits(into.capacity(), value.len()) {
            into.clear();
            into.push_str(value);
        } else {
            *into = value.to_owned();
        }
    }
    fn text(into: &mut String, row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<()> {
        refill(into, column(row, i, ValueRef::as_str)?);
        Ok(())
    }
    fn optional(into: &mut Option<String>, row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<()> {
        match (column(row, i, ValueRef::as_str_or_null)?, into.as_mut()) {
            (None, _) => *into = None,
            (Some(value), Some(kept)) => refill(kept, value),
            (Some(value), None) => *into = Some(value.to_owned()),
        }
        Ok(())
    }
    event.position = row.get::<_, i64>(0)? as u64;
    text(&mut event.stream, row, 1)?;
    text(&mut event.id, row, 2)?;
    text(&mut event.type_, row, 3)?;
    optional(&mut event.subject, row, 4)?;
    optional(&mut event.time, row, 5)?;
    optional(&mut event.correlation_id, row, 6)?;
    optional(&mut event.causation_id, row, 7)?;
    let data = column(row, 8, ValueRef::as_bytes)?;
    if fits(event.data.capacity(), data.len()) {
        event.data.clear();
        event.data.extend_from_slice(data);
    } else {
        event.data = data.to_vec();
    }
    Ok(())
}

/// Whether an allocation of `capacity` bytes is worth keeping for a value
/// of `len`: not when it is over four times the size and over 4 KiB, or a
/// big payload seen once would be held by its slot from batch to batch.
fn fits(capacity: usize, len: usize) -> bool {
    capacity <= len.saturating_mul(4).max(4096)
}

/// The partition key of the embedded log in checkpoints and dead letters.
pub const PARTITION: &str = "log";

/// The embedded log as a [`Source`]: one partition, positions from 1.
pub struct EmbeddedSource {
    reader: LogReader,
    filter: Filter,
    partition: Arc<str>,
    /// A second reader of the log, for the batch read ahead (see
    /// [`ReadAhead`]); `None` while it is out reading.
    spare: Option<LogReader>,
    ahead: Option<ReadAhead>,
    /// The events of the last batch, handed back while a read ahead is out
    /// (so only while the projection is behind): the next read overwrites
    /// them rather than allocating its own, on the reading thread.
    spent: Vec<Event>,
}

/// The batch after the last one returned, being read on a thread of its
/// own while the runner applies that one: a projection that is behind (a
/// rebuild, a catch-up) finds its next batch read when it asks, on a
/// machine with a core to spare. Only after a full batch: a projection that
/// keeps up reads when asked, as before.
struct ReadAhead {
    /// The position it reads after, and how many events at most.
    from: u64,
    max: usize,
    thread: std::thread::JoinHandle<(LogReader, Result<Batch>)>,
}

impl EmbeddedSource {
    /// A reader of `log` for the events `filter` selects.
    pub fn new(log: &EventLog, filter: &Filter) -> Result<Self> {
        Ok(EmbeddedSource {
            reader: log.reader()?,
            filter: filter.clone(),
            partition: PARTITION.into(),
            spare: Some(log.reader()?),
            ahead: None,
            spent: Vec::new(),
        })
    }

    /// The batch read ahead, if it is the one after `from`, made a batch of
    /// at most `max` events; a read ahead of another is dropped.
    fn take_ahead(&mut self, from: u64, max: usize) -> Option<Result<Batch>> {
        let ahead = self.ahead.take()?;
        let (reader, result) = ahead.thread.join().expect("a read ahead does not panic");
        self.spare = Some(reader);
        (ahead.from == from).then(|| self.resize(result?, ahead.max, max))
    }

    /// `batch`, read ahead as at most `read` events, as the batch of at
    /// most `max` asked for now: an adaptive batch changes size between
    /// reads, and a read ahead of the old size is still the start of the
    /// new one. Cut short, or topped up from where it ended if it came full.
    fn resize(&mut self, mut batch: Batch, read: usize, max: usize) -> Result<Batch> {
        if batch.events.len() > max {
            batch.events.truncate(max);
            batch.scanned_to = batch.events.last().map_or(batch.scanned_to, |last| last.position);
        } else if batch.events.len() == read && read < max {
            let rest = self.reader.read_after(batch.scanned_to, &self.filter, max - read)?;
            batch.events.extend(rest.events);
            batch.scanned_to = rest.scanned_to;
        }
        Ok(batch)
    }

    /// Start reading the batch after `from` on a thread of its own.
    fn read_ahead(&mut self, from: u64, max: usize) {
        let Some(mut reader) = self.spare.take() else { return };
        let filter = self.filter.clone();
        let spent = std::mem::take(&mut self.spent);
        let thread = std::thread::Builder::new().name("log-read-ahead".into()).spawn(move || {
            let result = reader.read_into(from, &filter, max, spent);
            (reader, result)
        });
        match thread {
            Ok(thread) => self.ahead = Some(ReadAhead { from, max, thread }),
            // No thread to be had: the next read happens when asked.
            Err(_) => self.spare = None,
        }
    }
}

impl Source for EmbeddedSource {
    fn key(&self) -> &str {
        PARTITION
    }

    fn next_batch(
        &mut self,
        after: &Checkpoint,
        max: usize,
        wait: Duration,
    ) -> Result<SourceBatch, SourceError> {
        let from = after.position(PARTITION);
        let mut batch = match self.take_ahead(from, max) {
            Some(read) => read?,
            None => self.reader.read_into(from, &self.filter, max, std::mem::take(&mut self.spent))?,
        };
        if batch.scanned_to == from && !wait.is_zero() {
            self.reader.wait(wait.min(POLL_INTERVAL));
            batch = self.reader.read_after(from, &self.filter, max)?;
        }
        if batch.events.len() == max {
            self.read_ahead(batch.scanned_to, max);
        } else {
            // Caught up: what was kept for the read ahead goes.
            self.spent = Vec::new();
        }
        Ok(SourceBatch {
            partitions: vec![self.partition.clone(); batch.events.len()],
            events: batch.events,
            end: Checkpoint::at(PARTITION, batch.scanned_to),
            malformed: None,
            checkpoints: Vec::new(),
        })
    }

    fn recycle(&mut self, batch: SourceBatch) {
        // Kept only for the read ahead: an idle projection holds no batch.
        if self.ahead.is_some() {
            self.spent = batch.events;
        }
    }

    fn acknowledge(&mut self, _upto: &Checkpoint) -> Result<(), SourceError> {
        // The log keeps every event: nothing to forget.
        Ok(())
    }

    fn progress(&mut self, at: &Checkpoint) -> Result<Progress, SourceError> {
        let head = self.reader.head()?;
        Ok(Progress {
            head: Checkpoint::at(PARTITION, head),
            lag: head.saturating_sub(at.position(PARTITION)),
        })
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(LogWaker(self.reader.signal.clone()))
    }
}

/// Wakes the log's waiting readers.
struct LogWaker(Arc<AppendSignal>);

impl Wake for LogWaker {
    fn wake(&self) {
        *self.0.appends.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.woken.notify_all();
    }
}

/// Opens readers of the embedded log.
pub struct EmbeddedOpener {
    log: Arc<EventLog>,
}

impl EmbeddedOpener {
    /// Readers of `log`.
    pub fn new(log: Arc<EventLog>) -> Self {
        EmbeddedOpener { log }
    }
}

impl SourceOpener for EmbeddedOpener {
    fn name(&self) -> &str {
        PARTITION
    }

    fn open(&self, filter: &Filter, _reader: &str) -> Result<Box<dyn Source>> {
        Ok(Box::new(EmbeddedSource::new(&self.log, filter)?))
    }
}

impl super::Publisher for EventLog {
    fn publish(&self, stream: &str, events: &[NewEvent]) -> Result<AppendOutcome> {
        self.append(stream, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Event `i` of a log whose optional fields come and go from one event
    /// to the next, with payloads of different lengths.
    fn event(i: usize) -> NewEvent {
        let some = |every: usize, value: String| i.is_multiple_of(every).then_some(value);
        NewEvent {
            id: format!("e-{i}"),
            source: "tests".into(),
            event_type: if i.is_multiple_of(2) { "even".into() } else { "odd-and-longer".into() },
            subject: some(2, format!("s-{}", "x".repeat(i % 7))),
            time: some(3, format!("2026-12-03T00:00:{:02}Z", i % 60)),
            datacontenttype: None,
            correlation_id: some(4, format!("c-{i}")),
            causation_id: some(5, format!("k-{i}")),
            data: vec![b'd'; (i * 13) % 40],
        }
    }

    #[test]
    fn a_batch_read_into_spent_events_equals_a_fresh_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.append("a", &(0..60).map(event).collect::<Vec<_>>()).unwrap();
        let (mut reader, mut fresh) = (log.reader().unwrap(), log.reader().unwrap());
        let filter = Filter { streams: vec!["a".into()], types: None };
        let mut spent = Vec::new();
        // 25, 25, then 10: the last read overwrites some and drops the rest.
        for after in [0, 25, 50] {
            let reused = reader.read_into(after, &filter, 25, spent).unwrap();
            let expected = fresh.read_after(after, &filter, 25).unwrap();
            assert_eq!(reused.scanned_to, expected.scanned_to);
            assert_eq!(format!("{:?}", reused.events), format!("{:?}", expected.events), "after {after}");
            spent = reused.events;
        }
        assert_eq!(spent.len(), 10);
        let past_head = reader.read_into(60, &filter, 25, spent).unwrap();
        assert!(past_head.events.is_empty(), "nothing after the head, and nothing left of what was spent");
    }

    #[test]
    fn a_big_payload_is_not_held_by_its_slot_once_read_past() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let mut big = event(0);
        big.data = vec![b'x'; 1 << 20];
        log.append("a", &[big, event(1)]).unwrap();
        let mut reader = log.reader().unwrap();
        let filter = Filter { streams: vec![], types: None };
        let first = reader.read_into(0, &filter, 1, Vec::new()).unwrap();
        assert_eq!(first.events[0].data.len(), 1 << 20);
        let second = reader.read_into(1, &filter, 1, first.events).unwrap();
        assert_eq!(second.events[0].data, event(1).data);
        assert!(second.events[0].data.capacity() <= 4096, "{}", second.events[0].data.capacity());
    }

    /// Every batch of `source` from the start of a log of 100 events, of
    /// the sizes in `sizes` (the last repeated), as (first, last) positions.
    fn batches_of(source: &mut EmbeddedSource, sizes: &[usize]) -> Vec<(u64, u64)> {
        let (mut at, mut got) = (0, Vec::new());
        for i in 0.. {
            let max = sizes[i.min(sizes.len() - 1)];
            let batch = source.next_batch(&Checkpoint::at(PARTITION, at), max, Duration::ZERO).unwrap();
            let Some(last) = batch.events.last() else { break };
            assert!(batch.events.len() <= max, "a batch of {} when {max} were asked", batch.events.len());
            let positions: Vec<u64> = batch.events.iter().map(|e| e.position).collect();
            assert_eq!(positions, (at + 1..=last.position).collect::<Vec<_>>(), "in order, none skipped");
            got.push((at + 1, last.position));
            at = batch.end.position(PARTITION);
            source.recycle(batch);
        }
        got
    }

    #[test]
    fn a_read_ahead_serves_a_batch_of_another_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.append("a", &(0..100).map(event).collect::<Vec<_>>()).unwrap();
        let filter = Filter { streams: vec![], types: None };
        let mut source = EmbeddedSource::new(&log, &filter).unwrap();
        let first = source.next_batch(&Checkpoint::at(PARTITION, 0), 10, Duration::ZERO).unwrap();
        assert_eq!(first.events.len(), 10, "full: the next 10 are read ahead");
        let grown = source.take_ahead(10, 25).expect("the read ahead serves a bigger batch").unwrap();
        assert_eq!((grown.events.len(), grown.scanned_to), (25, 35), "topped up from where it ended");
        source.next_batch(&Checkpoint::at(PARTITION, 35), 25, Duration::ZERO).unwrap();
        let shrunk = source.take_ahead(60, 5).expect("the read ahead serves a smaller batch").unwrap();
        assert_eq!((shrunk.events.len(), shrunk.scanned_to), (5, 65), "cut short");
        // Growing, as an adaptive batch does while behind, and shrinking,
        // as after a slow batch: every event once, in order.
        let mut source = EmbeddedSource::new(&log, &filter).unwrap();
        assert_eq!(batches_of(&mut source, &[10, 20, 40]), [(1, 10), (11, 30), (31, 70), (71, 100)]);
        let mut source = EmbeddedSource::new(&log, &filter).unwrap();
        assert_eq!(batches_of(&mut source, &[40, 10, 25]), [(1, 40), (41, 50), (51, 75), (76, 100)]);
    }

    #[test]
    fn an_idle_source_keeps_no_spent_batch() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.append("a", &(0..30).map(event).collect::<Vec<_>>()).unwrap();
        let mut source = EmbeddedSource::new(&log, &Filter { streams: vec![], types: None }).unwrap();
        let full = source.next_batch(&Checkpoint::at(PARTITION, 0), 20, Duration::ZERO).unwrap();
        assert_eq!(full.events.len(), 20, "a full batch: the rest is read ahead");
        source.recycle(full);
        assert_eq!(source.spent.len(), 20, "kept for the read ahead to overwrite");
        let rest = source.next_batch(&Checkpoint::at(PARTITION, 20), 20, Duration::ZERO).unwrap();
        assert_eq!(rest.events.len(), 10);
        assert!(source.spent.is_empty(), "caught up: what was kept is dropped");
        source.recycle(rest);
        assert!(source.spent.is_empty(), "caught up: no batch is kept");
    }
}
