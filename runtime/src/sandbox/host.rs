//! [`GuestHost`]: the store data of a projection instance, and the host side
//! of the world's imports — `state`, `sql`, `log` and `emit` on the
//! projection's own database.
//!
//! The guest runs inside a transaction the projection loop owns, so every
//! write here commits or rolls back with the checkpoint. The SQLite
//! authorizer keeps guest SQL inside that contract: no transaction control,
//! no ATTACH, no pragmas, no extension loading, no access to the runtime's
//! own tables, and nothing that would later run or resolve inside the
//! host's statements (which run with the authorizer off): no trigger on a
//! table the host writes, no temp trigger, no temp table shadowing one.
//!
//! Guest SQL runs under the call's limits too: a progress handler stops it
//! at the call's deadline (epoch interruption never fires inside SQLite),
//! and SQLITE_LIMIT_LENGTH caps the strings and blobs SQL itself makes. A
//! failed guest statement is the guest's to handle unless it broke a limit
//! or the host's database failed; those trap (see [`classify`]). A statement
//! the rules refuse is explained to the guest: the statement, the rule and
//! what to do instead, in the words the SDK's harness uses too.
//!
//! `emit` writes the event into the projection's outbox (`projector_outbox`)
//! in the batch's transaction, so a batch that rolls back emitted nothing;
//! the runner publishes the outbox after the commit.
//!
//! It is also the store's resource limiter: memory, tables and instances are
//! capped by the projection's [`Limits`], and guest log lines are cut and
//! rate-limited, with a count of what was dropped.

use crate::bindings::{
    EmitHost, Event, Level, LogHost, Rows, SqlHost, StateHost, Statement, TypesHost, Value,
};
use crate::config::Limits;
use anyhow::{Result, bail};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, ToSql, ffi, params_from_iter};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use wasmtime::Trap;

// One file of rules for the host and the SDK's native harness.
#[path = "../../../guest-sdk/src/sql_rules.rs"]
mod sql_rules;
use super::deferred::{Db, Failed};
pub use sql_rules::RUNTIME_TABLES;
pub(super) use sql_rules::{GUEST_SQL_PREFIX, GuestRules};
// The outbox and the rules of `emit`, shared with the harness too.
use crate::store::runtime_tables;

/// How many SQLite virtual machine instructions run between two looks at
/// the call's deadline: frequent enough to stop within a millisecond or so,
/// rare enough to cost nothing measurable.
const PROGRESS_INTERVAL: i32 = 1000;

/// Statements one instance may prepare (`prepared.prepare`): a module that
/// writes values into its SQL rather than parameters must not grow the host
/// without bound.
const MAX_PREPARED: usize = 1024;

/// Prepared statements kept ready to run, each ~7 KB of SQLite's memory:
/// the handles past these are run from the connection's statement cache by
/// their text, which keeps one instance's statements as bounded as before.
const MAX_KEPT: usize = 256;

/// A statement the guest prepared (`prepared.prepare`), kept ready to run:
/// running it by handle looks nothing up and prepares nothing.
pub(super) struct Kept<'db> {
    /// `None` past [`MAX_KEPT`]: run from the statement cache.
    statement: Option<rusqlite::Statement<'db>>,
    /// Its text as the guest's (under [`GUEST_SQL_PREFIX`]).
    pub(super) text: Arc<str>,
    /// The names of the columns it returns.
    columns: Vec<String>,
}

/// The guest's prepared statements, by handle.
pub(super) type KeptStatements<'db> = Vec<Kept<'db>>;

self_cell::self_cell!(
    /// The projection's connection, with the statements the guest prepared
    /// on it kept beside it (a statement borrows its connection).
    pub(super) struct Database {
        owner: Connection,
        #[covariant]
        dependent: KeptStatements,
    }
);

// SAFETY: a `Statement` is not `Send` only because it borrows its
// `Connection`, which is `Send` but not `Sync`. Here the connection and
// every statement borrowing it move together, as one value, and are only
// reached through it: no thread can use a statement while another uses its
// connection. rusqlite's own `Connection` is `Send` on the same ground,
// carrying its statement cache's statements with it.
#[allow(unsafe_code)]
unsafe impl Send for Database {}

/// The store data of one projection instance.
pub struct GuestHost {
    db: Db,
    projection: Arc<str>,
    guest_sql: GuestRules,
    deadline: CallDeadline,
    /// The batch being handled, to attach event ids to guest log lines and
    /// emitted events, with how many events each has emitted so far.
    batch: Vec<BatchEvent>,
    /// The ids and correlation ids of `batch`, end to end.
    batch_ids: String,
    /// Whether `batch` is in position order (one partition): an event is
    /// then found by position with a binary search.
    batch_sorted: bool,
    /// Set when an import failed because of the host (not the guest): the
    /// trap that follows is then the host's fault and must not dead-letter.
    host_error: Option<anyhow::Error>,
    limits: Limits,
    log_tokens: f64,
    log_refilled: Instant,
    log_dropped: u64,
    /// The handle of each statement the guest prepared, by its text.
    handles: HashMap<String, u32>,
    /// The source partition of each event of the batch (empty when none
    /// has one).
    partitions: Vec<Option<u32>>,
}

/// Why an emit by position named an event it cannot tell apart: in a
/// batch of several partitions one position can be one event of each.
fn ambiguous_position(position: u64, events: usize) -> String {
    format!(
        "position {position} names {events} events of the batch (one per partition of the source): \
         build the module with a newer projector-sdk, which names the event by its place in the batch"
    )
}

/// Where an event of a batch came from, beyond its position: what the host
/// names what it emits by, and what the module is told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Its partition, for a source of several (`None`: the source's only
    /// one), as checkpoints name it.
    pub partition: Option<Arc<str>>,
    /// Its partition's number, as the module sees it (a Kafka partition).
    pub number: Option<u32>,
    /// Where its partition's checkpoint is once it is applied.
    pub through: u64,
}

/// An event of the batch being handled, as emitting and logging need it.
/// Its ids are ranges of [`GuestHost`]'s `batch_ids`, one buffer kept from
/// batch to batch: no allocation per event.
struct BatchEvent {
    position: u64,
    id: Range<usize>,
    correlation_id: Option<Range<usize>>,
    origin: Origin,
    /// Events it emitted so far.
    emitted: u32,
}

impl GuestHost {
    /// Wrap the projection's database connection.
    pub fn new(mut db: Connection, projection: Arc<str>, limits: Limits) -> Result<Self> {
        let guest_sql = sql_rules::guard(&mut db)?;
        // Only a guest statement is stopped: the host's own (its commit, a
        // dead letter) must finish whatever the time.
        let deadline = CallDeadline::new();
        let (flag, call) = (guest_sql.active.clone(), deadline.clone());
        db.progress_handler(PROGRESS_INTERVAL, Some(move || flag.load(Ordering::Relaxed) && call.passed()))?;
        sql_rules::cap_lengths(&db, limits.value_bytes);
        db.set_prepared_statement_cache_capacity(256);
        Ok(GuestHost {
            db: Db::new(Database::new(db, |_| Vec::new()), guest_sql.clone()),
            projection,
            guest_sql,
            deadline,
            batch: Vec::new(),
            batch_ids: String::new(),
            batch_sorted: true,
            host_error: None,
            limits,
            log_tokens: limits.log_lines_per_second as f64,
            log_refilled: Instant::now(),
            log_dropped: 0,
            handles: HashMap::new(),
            partitions: Vec::new(),
        })
    }

    /// The limits this instance runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Stop guest SQL that is still running at `at`: the deadline of the
    /// call being armed (see [`Limits::arm`]).
    pub fn set_call_deadline(&self, at: Instant) {
        self.deadline.set(at);
    }

    /// Guest log lines dropped over the rate limit since the last call.
    pub fn take_log_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.log_dropped)
    }

    fn check_size(&self, what: &str, bytes: usize) -> Result<()> {
        if bytes > self.limits.value_bytes {
            bail!(
                "{what} of {bytes} bytes is over the limit of {} bytes (limits.value_kib)",
                self.limits.value_bytes
            );
        }
        Ok(())
    }

    fn check_params(&self, params: &[Value]) -> Result<()> {
        for value in params {
            match value {
                Value::Text(s) => self.check_size("an SQL text parameter", s.len())?,
                Value::Blob(b) => self.check_size("an SQL blob parameter", b.len())?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether a log line may go out now (a token bucket refilled at the
    /// rate limit, holding one second's worth).
    fn take_log_token(&mut self) -> bool {
        let rate = self.limits.log_lines_per_second as f64;
        let now = Instant::now();
        let refill = now.duration_since(self.log_refilled).as_secs_f64() * rate;
        self.log_tokens = (self.log_tokens + refill).min(rate);
        self.log_refilled = now;
        if self.log_tokens >= 1.0 {
            self.log_tokens -= 1.0;
            true
        } else {
            self.log_dropped += 1;
            false
        }
    }

    /// The projection's database.
    pub fn db(&self) -> &Connection {
        self.db.get().borrow_owner()
    }

    /// The projection's name.
    pub fn projection(&self) -> &str {
        &self.projection
    }

    /// Remember the events of the batch about to be handled (none before
    /// `init` or `query`: nothing may be emitted there).
    /// `origins` gives each event's partition, or is empty for a source of
    /// one partition.
    pub fn set_batch(&mut self, events: &[Event], origins: &[Origin]) {
        self.batch.clear();
        self.batch_ids.clear();
        let ids = &mut self.batch_ids;
        let mut keep = |text: &str| {
            ids.push_str(text);
            ids.len() - text.len()..ids.len()
        };
        self.batch.extend(events.iter().enumerate().map(|(i, e)| BatchEvent {
            position: e.position,
            id: keep(&e.id),
            correlation_id: e.correlation_id.as_deref().map(&mut keep),
            origin: origins.get(i).cloned().unwrap_or(Origin { through: e.position, ..Origin::default() }),
            emitted: 0,
        }));
        self.batch_sorted = self.batch.windows(2).all(|pair| pair[0].position < pair[1].position);
        self.partitions.clear();
        if origins.iter().any(|origin| origin.number.is_some()) {
            self.partitions.extend(self.batch.iter().map(|event| event.origin.number));
        }
    }

    /// The event of the batch at `position`: `Err` with why not when there
    /// is none, or several (one per partition).
    fn event_at(&self, position: u64) -> Result<usize, String> {
        if self.batch_sorted {
            return self
                .batch
                .binary_search_by_key(&position, |event| event.position)
                .map_err(|_| runtime_tables::not_in_batch(position));
        }
        let mut found = self.batch.iter().enumerate().filter(|(_, event)| event.position == position);
        match (found.next(), found.count()) {
            (None, _) => Err(runtime_tables::not_in_batch(position)),
            (Some((i, _)), 0) => Ok(i),
            (Some(_), more) => Err(ambiguous_position(position, more + 1)),
        }
    }

    /// Write an event the `i`th event of the batch emitted to the outbox.
    fn emit_from(
        &mut self,
        i: usize,
        stream: String,
        event_type: String,
        subject: Option<String>,
        data: Vec<u8>,
    ) -> Result<Result<(), String>> {
        let event = &mut self.batch[i];
        let partition = event.origin.partition.as_deref();
        let id = runtime_tables::emit_id(&self.projection, partition, event.position, event.emitted);
        event.emitted += 1;
        let emitted = runtime_tables::Emitted {
            id: &id,
            stream: &stream,
            event_type: &event_type,
            subject: subject.as_deref(),
            data: &data,
            correlation_id: event.correlation_id.clone().map(|range| &self.batch_ids[range]),
            causation_id: &self.batch_ids[event.id.clone()],
            projection: &self.projection,
            position: event.origin.through,
            partition,
        };
        let result = runtime_tables::record_emitted(self.db.get().borrow_owner(), &emitted);
        result.map(Ok).map_err(|err| self.host_failed(err))
    }

    /// Check an emitted event's names and size, in the harness's order:
    /// names, then the size (a trap).
    fn check_emitted(
        &self,
        stream: &str,
        event_type: &str,
        subject: Option<&str>,
        data: &[u8],
    ) -> Result<Result<(), String>> {
        if let Err(err) = crate::config::validate_stream_name(stream) {
            return Ok(Err(format!("{err:#}")));
        }
        if let Err(message) = runtime_tables::check_emit_names(event_type, subject) {
            return Ok(Err(message));
        }
        self.check_size("an emitted event's data", data.len())?;
        Ok(Ok(()))
    }

    /// How many events the batch last handled emitted: the runner looks at
    /// the outbox after a commit only when this is not 0.
    pub fn emitted(&self) -> u64 {
        self.batch.iter().map(|event| u64::from(event.emitted)).sum()
    }

    /// Take the host-side error behind the last trap, if there was one.
    pub fn take_host_error(&mut self) -> Option<anyhow::Error> {
        self.host_error.take()
    }

    fn host_failed(&mut self, err: impl Into<anyhow::Error>) -> anyhow::Error {
        let err = err.into();
        let message = anyhow::anyhow!("projection {}: host database error: {err:#}", self.projection);
        self.host_error = Some(err);
        message
    }

    /// Run `f` as the guest's — the authorizer applying the guest's rules,
    /// the progress handler watching the deadline — and say how it ended:
    /// the guest's to see, or a trap ([`classify`]).
    ///
    /// Guest statements must be prepared as the guest's: the connection's
    /// statement cache is shared with the host, and a cached host statement
    /// (its `COMMIT`, its checkpoint update) was authorized as the host's.
    /// So every guest statement is prepared under [`GUEST_SQL_PREFIX`], which
    /// no host statement carries: a guest can never be handed one.
    fn as_guest<T>(
        &mut self,
        statement: &str,
        f: impl for<'db> FnOnce(&'db Connection, &mut KeptStatements<'db>) -> rusqlite::Result<T>,
    ) -> Result<Result<T, String>> {
        let in_transaction = !self.db().is_autocommit();
        self.guest_sql.begin();
        let result = self.db.get_mut().with_dependent_mut(|db, kept| f(db, kept));
        self.guest_sql.end();
        match conclude(self.db(), &self.guest_sql, statement, in_transaction, result) {
            Ok(result) => Ok(result),
            Err(Broke::Trap(trap)) => Err(trap),
            Err(Broke::Host(err)) => Err(self.host_failed(err)),
        }
    }

    /// Settle the statements the guest deferred and say how they ended:
    /// `Ok(None)` when they all ran, the guest's failure, or a trap.
    pub fn take_deferred_failure(&mut self) -> Result<Option<String>> {
        match self.db.take_failure() {
            None => Ok(None),
            Some(Failed::Guest(message)) => Ok(Some(message)),
            Some(Failed::Broke(Broke::Trap(trap))) => Err(trap),
            Some(Failed::Broke(Broke::Host(err))) => Err(self.host_failed(err)),
        }
    }
}

/// Why a guest statement stops the call rather than being the guest's to
/// see.
pub(super) enum Broke {
    /// A trap: the deadline, or a statement that ended the transaction.
    Trap(anyhow::Error),
    /// The host's database failed.
    Host(rusqlite::Error),
}

/// How guest statement `statement`, run on `db` under `rules` with
/// `result`, ended: the guest's to see, or a stop ([`classify`]).
pub(super) fn conclude<T>(
    db: &Connection,
    rules: &GuestRules,
    statement: &str,
    in_transaction: bool,
    result: rusqlite::Result<T>,
) -> Result<Result<T, String>, Broke> {
    let result = result.map_err(|err| match rules.explain(statement, &err) {
        Some(refusal) => SqlFailure::Guest(refusal),
        None => classify(err),
    });
    // SQLite ends the whole transaction itself when a write is
    // interrupted or fails on I/O, or when the statement says so
    // (`INSERT OR ROLLBACK`, `RAISE(ROLLBACK)`). The call traps then;
    // an empty transaction stands in so the host's ROLLBACK has one to
    // end, and the host's later statements do not autocommit.
    let ended = in_transaction && db.is_autocommit();
    if ended && let Err(err) = db.execute_batch("BEGIN") {
        return Err(Broke::Host(err));
    }
    match result {
        Ok(_) | Err(SqlFailure::Guest(_)) if ended => Err(Broke::Trap(anyhow::anyhow!(
            "sql: a statement rolled back the transaction the host runs the call in \
             (ON CONFLICT ROLLBACK or RAISE(ROLLBACK)); the call's writes are gone"
        ))),
        Ok(value) => Ok(Ok(value)),
        Err(SqlFailure::Guest(message)) => Ok(Err(message)),
        // The same trap as a deadline in wasm code, so it reads the same.
        Err(SqlFailure::Deadline) => Err(Broke::Trap(Trap::Interrupt.into())),
        Err(SqlFailure::Host(err)) => Err(Broke::Host(err)),
    }
}

/// When the current guest call must end, shared with the connection's
/// progress handler (which cannot borrow the store): nanoseconds after
/// `origin`, so one atomic holds it.
#[derive(Clone)]
struct CallDeadline {
    origin: Instant,
    nanos: Arc<AtomicU64>,
}

impl CallDeadline {
    /// No deadline until a call is armed.
    fn new() -> Self {
        CallDeadline { origin: Instant::now(), nanos: Arc::new(AtomicU64::new(u64::MAX)) }
    }

    fn set(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        self.nanos.store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn passed(&self) -> bool {
        let now = self.origin.elapsed().as_nanos();
        now >= u128::from(self.nanos.load(Ordering::Relaxed))
    }
}

/// What a failed guest statement means.
#[derive(Debug)]
enum SqlFailure {
    /// The statement was wrong or refused — syntax, a constraint, the
    /// authorizer, a size cap — and the guest is told, to reject or cope.
    Guest(String),
    /// The call's deadline passed while SQLite ran it: a trap, like the
    /// deadline in wasm code.
    Deadline,
    /// The host's database failed — a full disk, I/O, locks, corruption —
    /// through no fault of the guest: a trap that faults the projection
    /// and parks nothing.
    Host(rusqlite::Error),
}

/// Whose failure `err` is.
fn classify(err: rusqlite::Error) -> SqlFailure {
    let rusqlite::Error::SqliteFailure(failure, _) = &err else {
        // rusqlite's own checks (a bad column index, several statements
        // in one): about the statement the guest sent.
        return SqlFailure::Guest(err.to_string());
    };
    match failure.code {
        // Only the progress handler interrupts a projection's connection.
        ErrorCode::OperationInterrupted => SqlFailure::Deadline,
        // A write on the read-only connection that serves `query` is the
        // guest's doing; the extended codes (a read-only file, a moved
        // database, a recovery in progress) are the host's.
        ErrorCode::ReadOnly if failure.extended_code == ffi::SQLITE_READONLY => {
            SqlFailure::Guest(sql_rules::written_in_query(&err).unwrap_or_else(|| err.to_string()))
        }
        ErrorCode::DiskFull
        | ErrorCode::SystemIoFailure
        | ErrorCode::DatabaseBusy
        | ErrorCode::DatabaseLocked
        | ErrorCode::OutOfMemory
        | ErrorCode::ReadOnly
        | ErrorCode::CannotOpen
        | ErrorCode::DatabaseCorrupt
        | ErrorCode::NotADatabase
        | ErrorCode::FileLockingProtocolFailed
        | ErrorCode::NoLargeFileSupport
        | ErrorCode::PermissionDenied
        | ErrorCode::NotFound
        | ErrorCode::InternalMalfunction
        | ErrorCode::ApiMisuse => SqlFailure::Host(err),
        _ => SqlFailure::Guest(err.to_string()),
    }
}

impl TypesHost for GuestHost {}

impl StateHost for GuestHost {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>> {
        let result =
            self.db().prepare_cached("SELECT value FROM projector_kv WHERE key = ?1").and_then(|mut stmt| {
                let mut rows = stmt.query([&key])?;
                rows.next()?.map(|row| row.get(0)).transpose()
            });
        result.map_err(|err| self.host_failed(err))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<()> {
        self.check_size(
            &format!("the state value for key {:?}", truncated(&key, 64)),
            key.len() + value.len(),
        )?;
        let result = self
            .db()
            .prepare_cached("INSERT OR REPLACE INTO projector_kv (key, value) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute((&key, &value)));
        result.map(drop).map_err(|err| self.host_failed(err))
    }

    fn delete(&mut self, key: String) -> Result<()> {
        let result = self
            .db()
            .prepare_cached("DELETE FROM projector_kv WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute([&key]));
        result.map(drop).map_err(|err| self.host_failed(err))
    }

    fn scan(&mut self, prefix: String, limit: u32) -> Result<Vec<(String, Vec<u8>)>> {
        let result = self
            .db()
            .prepare_cached(
                "SELECT key, value FROM projector_kv WHERE substr(key, 1, length(?1)) = ?1 \
                 ORDER BY key LIMIT ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_map((&prefix, limit), |row| Ok((row.get(0)?, row.get(1)?)))?.collect()
            });
        result.map_err(|err| self.host_failed(err))
    }
}

impl SqlHost for GuestHost {
    fn execute(&mut self, statement: String, params: Vec<Value>) -> Result<Result<u64, String>> {
        self.check_params(&params)?;
        let text = format!("{GUEST_SQL_PREFIX}{statement}");
        self.as_guest(&statement, |db, _| run_execute(db, &text, params_from_iter(&params)))
    }

    fn query(&mut self, statement: String, params: Vec<Value>) -> Result<Result<Rows, String>> {
        self.check_params(&params)?;
        let text = format!("{GUEST_SQL_PREFIX}{statement}");
        self.as_guest(&statement, |db, _| {
            let mut stmt = db.prepare_cached(&text)?;
            let columns = stmt.column_names().map(String::from).collect();
            Ok(Rows { columns, rows: rows_of(&mut stmt, &params)? })
        })
    }
}

// Named in full: the tests call `SqlHost`'s `execute` and `query` by method.
impl crate::bindings::PreparedHost for GuestHost {
    fn prepare(&mut self, statement: String) -> Result<Result<Statement, String>> {
        if let Some(&handle) = self.handles.get(&statement) {
            let columns = self.db.get().borrow_dependent()[handle as usize].columns.clone();
            return Ok(Ok(Statement { handle, columns }));
        }
        if self.db.get().borrow_dependent().len() >= MAX_PREPARED {
            return Ok(Err(format!(
                "{MAX_PREPARED} statements are prepared already, the most one instance may hold: pass \
                 values as parameters (?1, ?2, ...) rather than writing them into the SQL"
            )));
        }
        let text: Arc<str> = format!("{GUEST_SQL_PREFIX}{statement}").into();
        let prepared = self.as_guest(&statement, |db, kept| {
            let prepared = db.prepare(&text)?;
            let columns: Vec<String> = prepared.column_names().map(String::from).collect();
            let statement = (kept.len() < MAX_KEPT).then_some(prepared);
            kept.push(Kept { statement, text: text.clone(), columns: columns.clone() });
            Ok(Statement { handle: (kept.len() - 1) as u32, columns })
        })?;
        if let Ok(prepared) = &prepared {
            self.handles.insert(statement, prepared.handle);
        }
        Ok(prepared)
    }

    fn execute(&mut self, handle: u32, params: Vec<Value>) -> Result<Result<u64, String>> {
        self.check_params(&params)?;
        let Some(text) = self.prepared_text(handle) else { return Ok(Err(no_statement(handle))) };
        self.as_guest(&text[GUEST_SQL_PREFIX.len()..], |db, kept| {
            execute_kept(db, kept, handle, params_from_iter(&params))
        })
    }

    fn query(&mut self, handle: u32, params: Vec<Value>) -> Result<Result<Vec<Vec<Value>>, String>> {
        self.check_params(&params)?;
        let Some(text) = self.prepared_text(handle) else { return Ok(Err(no_statement(handle))) };
        self.as_guest(&text[GUEST_SQL_PREFIX.len()..], |db, kept| {
            match &mut kept[handle as usize].statement {
                Some(statement) => rows_of(statement, &params),
                None => run_query(db, &text, &params),
            }
        })
    }
}

impl GuestHost {
    /// The text of prepared statement `handle`, if there is one.
    fn prepared_text(&self, handle: u32) -> Option<Arc<str>> {
        self.db.get().borrow_dependent().get(handle as usize).map(|kept| kept.text.clone())
    }
}

fn no_statement(handle: u32) -> String {
    format!("no prepared statement has handle {handle}: use a handle `prepare` returned")
}

/// Run prepared statement `handle`, one of `kept`, whole; the rows it
/// changed.
pub(super) fn execute_kept<'db>(
    db: &'db Connection,
    kept: &mut KeptStatements<'db>,
    handle: u32,
    params: impl rusqlite::Params,
) -> rusqlite::Result<u64> {
    let kept = &mut kept[handle as usize];
    match &mut kept.statement {
        Some(statement) => sql_rules::execute_whole(db, statement, params),
        None => run_execute(db, &kept.text, params),
    }
}

/// Run the guest statement `text` whole (stepping through any rows a
/// `RETURNING` gives); the rows it changed.
fn run_execute(db: &Connection, text: &str, params: impl rusqlite::Params) -> rusqlite::Result<u64> {
    let mut stmt = db.prepare_cached(text)?;
    sql_rules::execute_whole(db, &mut stmt, params)
}

/// Run the guest query `text`: its rows, values in column order.
fn run_query(db: &Connection, text: &str, params: &[Value]) -> rusqlite::Result<Vec<Vec<Value>>> {
    let mut stmt = db.prepare_cached(text)?;
    rows_of(&mut stmt, params)
}

/// Run `stmt` with `params`: its rows, values in column order.
fn rows_of(stmt: &mut rusqlite::Statement<'_>, params: &[Value]) -> rusqlite::Result<Vec<Vec<Value>>> {
    let width = stmt.column_count();
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(width);
        for i in 0..width {
            values.push(from_value_ref(row.get_ref(i)?));
        }
        out.push(values);
    }
    Ok(out)
}

// Named in full: the tests call `SqlHost`'s `execute` by method.
impl crate::bindings::DeferredHost for GuestHost {
    fn execute(&mut self, handle: u32, params: Vec<Value>) -> Result<()> {
        self.check_params(&params)?;
        self.defer(handle, params.iter().map(value_ref))
    }
}

impl GuestHost {
    /// Queue prepared statement `handle` with `params` for the writer; a
    /// handle never prepared fails the call.
    fn defer<'a>(&mut self, handle: u32, params: impl Iterator<Item = ValueRef<'a>> + Clone) -> Result<()> {
        // Every handle below the count is prepared: `prepare` records one
        // in `handles` exactly when it keeps its statement.
        if handle as usize >= self.handles.len() {
            self.db.fail(Failed::Guest(no_statement(handle)));
            return Ok(());
        }
        self.db.defer(handle, params).map_err(|err| {
            anyhow::anyhow!(
                "projection {}: cannot start the thread of deferred statements: {err}",
                self.projection
            )
        })
    }
}

impl crate::bindings::DeferredPackedHost for GuestHost {
    fn execute(&mut self, statements: Vec<u8>) -> Result<()> {
        let mut reader = Packed { bytes: &statements, at: 0 };
        let mut params = Vec::new();
        while reader.at < statements.len() {
            let handle = reader.u32()?;
            let count = reader.u32()?;
            params.clear();
            for _ in 0..count {
                let at = reader.at;
                let value = match reader.take(1)?[0] {
                    0 => ValueRef::Null,
                    1 => ValueRef::Integer(i64::from_le_bytes(reader.array()?)),
                    2 => ValueRef::Real(f64::from_le_bytes(reader.array()?)),
                    3 => {
                        let text = reader.sized()?;
                        self.check_size("an SQL text parameter", text.len())?;
                        std::str::from_utf8(text).map_err(|err| {
                            anyhow::anyhow!("deferred-packed: the text at byte {at} is not UTF-8: {err}")
                        })?;
                        ValueRef::Text(text)
                    }
                    4 => {
                        let blob = reader.sized()?;
                        self.check_size("an SQL blob parameter", blob.len())?;
                        ValueRef::Blob(blob)
                    }
                    tag => bail!("deferred-packed: byte {at} is no parameter's tag: {tag} (0 to 4)"),
                };
                params.push(value);
            }
            self.defer(handle, params.iter().copied())?;
        }
        Ok(())
    }
}

/// Reads the statements of a `deferred-packed.execute` front to back.
struct Packed<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Packed<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let Some(taken) = self.at.checked_add(n).and_then(|end| self.bytes.get(self.at..end)) else {
            bail!("deferred-packed: {n} bytes wanted at byte {} of {}", self.at, self.bytes.len());
        };
        self.at += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A length (u32), then that many bytes.
    fn sized(&mut self) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

// Named in full: the tests call `EmitHost`'s `emit` by method.
impl crate::bindings::BatchHost for GuestHost {
    fn partitions(&mut self) -> Result<Vec<Option<u32>>> {
        Ok(self.partitions.clone())
    }

    fn emit(
        &mut self,
        index: u32,
        stream: String,
        event_type: String,
        subject: Option<String>,
        data: Vec<u8>,
    ) -> Result<Result<(), String>> {
        if let Err(message) = self.check_emitted(&stream, &event_type, subject.as_deref(), &data)? {
            return Ok(Err(message));
        }
        match usize::try_from(index).ok().filter(|&i| i < self.batch.len()) {
            Some(i) => self.emit_from(i, stream, event_type, subject, data),
            None => Ok(Err(format!(
                "index {index} is not an event of the batch being handled ({} events): emit from \
                 `handle`, on the context of the event that caused it",
                self.batch.len()
            ))),
        }
    }
}

impl LogHost for GuestHost {
    fn write(&mut self, level: Level, message: String, position: Option<u64>) -> Result<()> {
        if !self.take_log_token() {
            return Ok(());
        }
        let message = match message.len() > self.limits.log_line_bytes {
            true => format!(
                "{}… ({} bytes cut, limits.log_line_bytes)",
                truncated(&message, self.limits.log_line_bytes),
                message.len() - truncated(&message, self.limits.log_line_bytes).len()
            ),
            false => message,
        };
        let event = position.and_then(|p| self.event_at(p).ok()).map(|i| &self.batch[i]);
        let (event_id, correlation_id) = match event {
            Some(event) => (
                &self.batch_ids[event.id.clone()],
                event.correlation_id.clone().map_or("", |range| &self.batch_ids[range]),
            ),
            None => ("", ""),
        };
        let projection = &*self.projection;
        macro_rules! emit {
            ($level:ident) => {
                tracing::$level!(
                    target: "projector::guest",
                    projection,
                    event_id,
                    correlation_id,
                    "{message}"
                )
            };
        }
        match level {
            Level::Trace => emit!(trace),
            Level::Debug => emit!(debug),
            Level::Info => emit!(info),
            Level::Warn => emit!(warn),
            Level::Error => emit!(error),
        }
        Ok(())
    }
}

impl EmitHost for GuestHost {
    fn emit(
        &mut self,
        stream: String,
        event_type: String,
        subject: Option<String>,
        data: Vec<u8>,
        position: u64,
    ) -> Result<Result<(), String>> {
        if let Err(message) = self.check_emitted(&stream, &event_type, subject.as_deref(), &data)? {
            return Ok(Err(message));
        }
        match self.event_at(position) {
            Ok(i) => self.emit_from(i, stream, event_type, subject, data),
            Err(message) => Ok(Err(message)),
        }
    }
}

impl wasmtime::ResourceLimiter for GuestHost {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.memory_bytes {
            return Err(wasmtime::Error::from_anyhow(anyhow::anyhow!(
                "linear memory would grow to {} MiB, over the limit of {} MiB (limits.memory_mib)",
                desired.div_ceil(1 << 20),
                self.limits.memory_bytes >> 20
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.table_elements {
            return Err(wasmtime::Error::from_anyhow(anyhow::anyhow!(
                "a table would grow to {desired} elements, over the limit of {} (limits.table_elements)",
                self.limits.table_elements
            )));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.limits.instances
    }

    fn tables(&self) -> usize {
        self.limits.instances
    }

    fn memories(&self) -> usize {
        self.limits.instances
    }
}

/// The longest prefix of `s` of at most `max` bytes, on a char boundary.
pub(super) fn truncated(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(value_ref(self)))
    }
}

/// A guest's value as SQLite takes it.
pub(super) fn value_ref(value: &Value) -> ValueRef<'_> {
    match value {
        Value::Null => ValueRef::Null,
        Value::Integer(n) => ValueRef::Integer(*n),
        Value::Real(x) => ValueRef::Real(*x),
        Value::Text(text) => ValueRef::Text(text.as_bytes()),
        Value::Blob(blob) => ValueRef::Blob(blob),
    }
}

/// A column value as the guest sees it.
pub fn from_value_ref(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Integer(n),
        ValueRef::Real(x) => Value::Real(x),
        ValueRef::Text(s) => Value::Text(String::from_utf8_lossy(s).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sqlite_error(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    /// A host over an in-memory database with the runtime's tables, inside
    /// a transaction as every guest call is.
    fn host() -> GuestHost {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(runtime_tables::SCHEMA).unwrap();
        db.execute_batch("CREATE TABLE handled (position INTEGER); BEGIN;").unwrap();
        GuestHost::new(db, "test".into(), Limits::default()).unwrap()
    }

    fn event(position: u64, id: &str, correlation_id: Option<&str>) -> Event {
        Event {
            stream: "orders".into(),
            position,
            id: id.into(),
            type_: "order_approved".into(),
            subject: None,
            time: None,
            correlation_id: correlation_id.map(String::from),
            causation_id: None,
            data: b"{}".to_vec(),
        }
    }

    fn emit(
        host: &mut GuestHost,
        stream: &str,
        event_type: &str,
        position: u64,
    ) -> Result<Result<(), String>> {
        host.emit(stream.into(), event_type.into(), Some("o-1".into()), b"{\"fee\":1}".to_vec(), position)
    }

    #[test]
    fn emitted_events_go_to_the_outbox_with_their_cause() {
        let mut host = host();
        host.set_batch(&[event(7, "evt-7", Some("corr-7")), event(9, "evt-9", None)], &[]);
        emit(&mut host, "charges", "order_charged", 7).unwrap().unwrap();
        emit(&mut host, "charges", "order_noted", 7).unwrap().unwrap();
        emit(&mut host, "audit", "order_charged", 9).unwrap().unwrap();
        assert_eq!(host.emitted(), 3, "the batch knows it emitted");
        host.set_batch(&[event(10, "evt-10", None)], &[]);
        assert_eq!(host.emitted(), 0, "a new batch has emitted nothing yet");
        type Row = (i64, String, String, String, Option<String>, String, String, u64);
        let rows: Vec<Row> = host
            .db()
            .prepare(
                "SELECT seq, id, stream, type, correlation_id, causation_id, source, position \
                 FROM projector_outbox ORDER BY seq",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get::<_, i64>(7)? as u64,
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let source = "projector/test".to_string();
        assert_eq!(
            rows,
            [
                (
                    1,
                    "test:7:0".into(),
                    "charges".into(),
                    "order_charged".into(),
                    Some("corr-7".into()),
                    "evt-7".into(),
                    source.clone(),
                    7
                ),
                (
                    2,
                    "test:7:1".into(),
                    "charges".into(),
                    "order_noted".into(),
                    Some("corr-7".into()),
                    "evt-7".into(),
                    source.clone(),
                    7
                ),
                (
                    3,
                    "test:9:0".into(),
                    "audit".into(),
                    "order_charged".into(),
                    None,
                    "evt-9".into(),
                    source,
                    9
                ),
            ]
        );
        let time: String =
            host.db().query_row("SELECT time FROM projector_outbox", [], |r| r.get(0)).unwrap();
        assert!(
            time::OffsetDateTime::parse(&time, &time::format_description::well_known::Rfc3339).is_ok(),
            "{time}"
        );
        // Rolled back with the batch: nothing was emitted.
        host.db().execute_batch("ROLLBACK").unwrap();
        let left: i64 =
            host.db().query_row("SELECT count(*) FROM projector_outbox", [], |r| r.get(0)).unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn a_bad_emit_is_refused_to_the_guest_and_an_oversized_one_traps() {
        let mut host = host();
        host.set_batch(&[event(3, "evt-3", None)], &[]);
        let refused = |host: &mut GuestHost, stream: &str, event_type: &str, position: u64| {
            emit(host, stream, event_type, position).unwrap().expect_err("refused")
        };
        assert!(refused(&mut host, "bad stream", "t", 3).starts_with("invalid stream name \"bad stream\""));
        assert!(refused(&mut host, "", "t", 3).starts_with("invalid stream name"));
        assert!(refused(&mut host, "s", "", 3).contains("the event type is empty"));
        assert!(refused(&mut host, "s", &"t".repeat(1025), 3).contains("over the limit of 1024 bytes"));
        assert!(refused(&mut host, "s", "t", 4).contains("position 4 is not an event of the batch"));
        let big = vec![b'x'; Limits::default().value_bytes + 1];
        let trap = host.emit("s".into(), "t".into(), None, big, 3).expect_err("over the value limit traps");
        assert!(
            format!("{trap:#}").contains("an emitted event's data of 1048577 bytes is over the limit"),
            "{trap:#}"
        );
        // Nothing is emitted outside a batch (init, query).
        host.set_batch(&[], &[]);
        assert!(refused(&mut host, "s", "t", 3).contains("not an event of the batch"));
        let n: i64 = host.db().query_row("SELECT count(*) FROM projector_outbox", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn the_sdk_checks_stream_names_as_the_event_log_does() {
        for name in ["orders", "a", "a.b-c_d", "", "a b", "ü", "x/y", &"s".repeat(128), &"s".repeat(129)] {
            let log = crate::config::validate_stream_name(name).map_err(|err| format!("{err:#}"));
            assert_eq!(runtime_tables::check_stream_name(name), log, "{name:?}");
        }
    }

    #[test]
    fn guest_sql_cannot_reach_the_outbox_and_a_refusal_says_what_to_do() {
        let mut host = host();
        for sql in [
            "SELECT * FROM projector_outbox",
            "DELETE FROM projector_outbox",
            "INSERT INTO projector_outbox (id) VALUES ('x')",
        ] {
            let message = guest_error(&mut host, sql);
            assert!(
                message.contains("projector_outbox belongs to the runtime: publish events with ctx.emit"),
                "{message}"
            );
        }
        // The words the SDK's harness uses too (guest-sdk/tests/harness.rs).
        assert_eq!(
            guest_error(&mut host, "SELECT name FROM pragma_table_info('handled')"),
            "statement \"SELECT name FROM pragma_table_info('handled')\" refused: pragmas are not allowed to \
             guests, nor their table-valued forms (pragma_table_info(…)); read the schema from sqlite_schema \
             instead: SELECT sql FROM sqlite_schema WHERE tbl_name = 'handled'"
        );
        let advised =
            host.query("SELECT sql FROM sqlite_schema WHERE tbl_name = 'handled'".into(), Vec::new());
        assert!(advised.unwrap().is_ok());
    }

    fn guest_error(host: &mut GuestHost, sql: &str) -> String {
        match host.execute(sql.into(), Vec::new()) {
            Ok(Err(message)) => message,
            other => panic!("{sql}: expected a guest-visible error, got {other:?}"),
        }
    }

    #[test]
    fn host_faults_trap_and_guest_mistakes_stay_the_guests() {
        let host = [
            ffi::SQLITE_FULL,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_NOMEM,
            ffi::SQLITE_CANTOPEN,
            ffi::SQLITE_CORRUPT,
            ffi::SQLITE_NOTADB,
            ffi::SQLITE_PROTOCOL,
            ffi::SQLITE_READONLY_DBMOVED,
            ffi::SQLITE_READONLY_CANTLOCK,
        ];
        for code in host {
            assert!(matches!(classify(sqlite_error(code)), SqlFailure::Host(_)), "code {code}");
        }
        assert!(matches!(classify(sqlite_error(ffi::SQLITE_INTERRUPT)), SqlFailure::Deadline));
        let guest = [
            ffi::SQLITE_ERROR,
            ffi::SQLITE_CONSTRAINT_UNIQUE,
            ffi::SQLITE_CONSTRAINT_TRIGGER,
            ffi::SQLITE_AUTH,
            ffi::SQLITE_TOOBIG,
            ffi::SQLITE_MISMATCH,
            ffi::SQLITE_RANGE,
            // A `query` export writing on its read-only connection.
            ffi::SQLITE_READONLY,
        ];
        for code in guest {
            assert!(matches!(classify(sqlite_error(code)), SqlFailure::Guest(_)), "code {code}");
        }
        assert!(matches!(classify(rusqlite::Error::MultipleStatement), SqlFailure::Guest(_)));
    }

    #[test]
    fn a_host_fault_is_kept_for_the_projection_loop() {
        let mut host = host();
        let result =
            host.as_guest("", |_, _| -> rusqlite::Result<()> { Err(sqlite_error(ffi::SQLITE_FULL)) });
        let trap = result.expect_err("a full disk traps");
        assert!(format!("{trap:#}").contains("host database error"), "{trap:#}");
        assert!(host.take_host_error().is_some(), "kept, so the event is not parked");
    }

    #[test]
    fn real_guest_errors_are_handed_to_the_guest() {
        let mut host = host();
        assert!(guest_error(&mut host, "SELEC 1").contains("syntax error"));
        host.execute("INSERT INTO projector_kv VALUES ('k', x'')".into(), Vec::new()).unwrap().unwrap();
        assert!(guest_error(&mut host, "INSERT INTO projector_kv VALUES ('k', x'')").contains("UNIQUE"));
        assert!(host.take_host_error().is_none());
    }

    #[test]
    fn triggers_that_would_run_as_the_host_and_shadow_tables_are_denied() {
        let mut host = host();
        for sql in [
            "CREATE TEMP TRIGGER t AFTER INSERT ON main.projector_dead_letters BEGIN SELECT 1; END",
            "CREATE TEMP TRIGGER t AFTER INSERT ON handled BEGIN SELECT 1; END",
            "CREATE TRIGGER t AFTER INSERT ON projector_kv BEGIN SELECT 1; END",
            "CREATE TRIGGER t AFTER UPDATE ON projector_checkpoints BEGIN SELECT 1; END",
            "CREATE TEMP TABLE projector_checkpoints (position INTEGER)",
            "CREATE TEMP VIEW projector_kv AS SELECT 1 AS key, 2 AS value",
        ] {
            let message = guest_error(&mut host, sql);
            let quoted = sql_rules::shortened(sql);
            assert!(message.starts_with(&format!("statement {quoted:?} refused: ")), "{message}");
        }
        // The guest's own tables keep their triggers.
        let own = "CREATE TRIGGER own AFTER INSERT ON handled BEGIN SELECT 1; END";
        assert_eq!(host.execute(own.into(), Vec::new()).unwrap(), Ok(0));
    }

    #[test]
    fn guest_sql_past_the_deadline_traps_as_the_deadline() {
        let mut host = host();
        host.set_call_deadline(Instant::now() + Duration::from_millis(50));
        let started = Instant::now();
        let result = host.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c".into(),
            Vec::new(),
        );
        let trap = result.expect_err("the deadline traps");
        assert_eq!(trap.downcast_ref::<Trap>(), Some(&Trap::Interrupt));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(host.take_host_error().is_none());
        // The host's own statements are never stopped.
        host.db().execute_batch("INSERT INTO handled VALUES (1); COMMIT").unwrap();
    }

    #[test]
    fn sql_cannot_make_a_value_past_the_length_limit() {
        let mut host = host();
        let too_big = host.query("SELECT length(zeroblob(500000000))".into(), Vec::new()).unwrap();
        assert_eq!(too_big.map(drop), Err("string or blob too big".to_string()));
        let fits = host.query("SELECT length(zeroblob(1000000))".into(), Vec::new()).unwrap().unwrap();
        assert!(matches!(fits.rows[..], [ref row] if matches!(row[..], [Value::Integer(1_000_000)])));
    }

    #[test]
    fn a_statement_that_rolls_back_the_hosts_transaction_traps() {
        let mut host = host();
        let result = host
            .execute("INSERT OR ROLLBACK INTO projector_kv VALUES ('a', x''), ('a', x'')".into(), Vec::new());
        let trap = result.expect_err("the call cannot commit whole");
        assert!(format!("{trap:#}").contains("rolled back the transaction"), "{trap:#}");
        assert!(!host.db().is_autocommit(), "a transaction stands in for the host's ROLLBACK");
        host.db().execute_batch("ROLLBACK").unwrap();
    }
}

#[cfg(test)]
mod prepared_tests {
    use super::{GuestHost, MAX_KEPT, MAX_PREPARED, Value, runtime_tables};
    use crate::bindings::PreparedHost;
    use crate::config::Limits;
    use rusqlite::Connection;

    /// A host over a database with table `users (id, name)`, in a
    /// transaction as the host runs a call.
    pub(super) fn host() -> GuestHost {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(runtime_tables::SCHEMA).unwrap();
        db.execute_batch("CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT); BEGIN;").unwrap();
        GuestHost::new(db, "test".into(), Limits::default()).unwrap()
    }

    #[test]
    fn a_statement_is_prepared_once_and_run_by_its_handle() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        assert!(insert.columns.is_empty(), "an insert returns no columns");
        let select = host.prepare("SELECT name, id FROM users WHERE id = ?1".into()).unwrap().unwrap();
        assert_eq!(select.columns, ["name", "id"]);
        assert_ne!(insert.handle, select.handle);
        let again = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        assert_eq!(again.handle, insert.handle, "the same text, the same handle");

        let row = |id: &str, name: &str| vec![Value::Text(id.into()), Value::Text(name.into())];
        assert_eq!(host.execute(insert.handle, row("u1", "Ada")).unwrap(), Ok(1));
        assert_eq!(host.execute(insert.handle, row("u2", "Grace")).unwrap(), Ok(1));
        let rows = host.query(select.handle, vec![Value::Text("u2".into())]).unwrap().unwrap();
        assert!(
            matches!(&rows[..], [row] if matches!(&row[..], [Value::Text(n), Value::Text(i)] if n == "Grace" && i == "u2")),
            "{rows:?}"
        );
        let duplicate = host.execute(insert.handle, row("u1", "Ada")).unwrap().unwrap_err();
        assert!(duplicate.contains("UNIQUE constraint failed: users.id"), "{duplicate}");
    }

    #[test]
    fn a_statement_that_does_not_prepare_gets_no_handle_and_says_why() {
        let mut host = host();
        let err = host.prepare("SELEC name FROM users".into()).unwrap().unwrap_err();
        assert!(err.contains("syntax error"), "{err}");
        let err = host.prepare("SELECT * FROM projector_checkpoints".into()).unwrap().unwrap_err();
        assert!(err.contains("projector_checkpoints"), "the runtime's tables stay closed: {err}");
        let first = host.prepare("SELECT 1".into()).unwrap().unwrap();
        assert_eq!(first.handle, 0, "failed prepares took no handle");
    }

    #[test]
    fn an_unknown_handle_is_an_error_not_a_trap() {
        let mut host = host();
        let err = host.execute(7, Vec::new()).unwrap().unwrap_err();
        assert_eq!(err, "no prepared statement has handle 7: use a handle `prepare` returned");
        assert!(host.query(u32::MAX, Vec::new()).unwrap().is_err());
    }

    #[test]
    fn a_kept_statement_follows_the_schema_and_holds_no_lock() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        let select = host.prepare("SELECT count(*) FROM users".into()).unwrap().unwrap();
        assert_eq!(
            PreparedHost::execute(&mut host, insert.handle, vec![Value::Text("u1".into()), Value::Null])
                .unwrap(),
            Ok(1)
        );
        assert_eq!(PreparedHost::query(&mut host, select.handle, Vec::new()).unwrap().unwrap().len(), 1);
        // The kept statements were run and are reset: nothing holds the table.
        let sql = |host: &mut GuestHost, text: &str| {
            crate::bindings::SqlHost::execute(host, text.into(), Vec::new()).unwrap()
        };
        assert_eq!(sql(&mut host, "DROP TABLE users"), Ok(0));
        assert_eq!(sql(&mut host, "CREATE TABLE users (extra TEXT, name TEXT, id TEXT PRIMARY KEY)"), Ok(0));
        let row = vec![Value::Text("u2".into()), Value::Text("Grace".into())];
        assert_eq!(
            PreparedHost::execute(&mut host, insert.handle, row).unwrap(),
            Ok(1),
            "prepared again against the new table"
        );
        let name: String =
            host.db().query_row("SELECT name FROM users WHERE id = 'u2'", [], |r| r.get(0)).unwrap();
        assert_eq!(name, "Grace", "the columns are found by name in the new layout");
        assert_eq!(sql(&mut host, "DROP TABLE users"), Ok(0));
        let err = PreparedHost::execute(&mut host, insert.handle, vec![Value::Null, Value::Null])
            .unwrap()
            .unwrap_err();
        assert!(err.contains("no such table: users"), "the guest's to handle, not a trap: {err}");
    }

    #[test]
    fn a_kept_statement_outlives_the_transaction_it_was_prepared_in() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id) VALUES (?1)".into()).unwrap().unwrap();
        assert_eq!(
            PreparedHost::execute(&mut host, insert.handle, vec![Value::Text("u1".into())]).unwrap(),
            Ok(1)
        );
        host.db().execute_batch("ROLLBACK; BEGIN").unwrap();
        assert_eq!(
            PreparedHost::execute(&mut host, insert.handle, vec![Value::Text("u1".into())]).unwrap(),
            Ok(1),
            "u1 was rolled back"
        );
        host.db().execute_batch("COMMIT; BEGIN").unwrap();
        let count: i64 = host.db().query_row("SELECT count(*) FROM users", [], |r| r.get(0)).unwrap();
        assert_eq!(count, 1);
    }

    #[test]
    fn an_instance_holds_a_bounded_number_of_statements() {
        let mut host = host();
        for i in 0..MAX_PREPARED {
            host.prepare(format!("SELECT {i}")).unwrap().unwrap();
        }
        let live = host.db.get().borrow_dependent().iter().filter(|kept| kept.statement.is_some()).count();
        assert_eq!(live, MAX_KEPT, "only the first are kept prepared");
        for handle in [0, MAX_KEPT as u32 - 1, MAX_KEPT as u32, MAX_PREPARED as u32 - 1] {
            let rows = PreparedHost::query(&mut host, handle, Vec::new()).unwrap().unwrap();
            assert!(
                matches!(&rows[..], [row] if matches!(row[..], [Value::Integer(n)] if n == i64::from(handle))),
                "{handle}: {rows:?}"
            );
        }
        let err = host.prepare("SELECT 'one more'".into()).unwrap().unwrap_err();
        assert!(err.contains("1024 statements are prepared already"), "{err}");
        assert!(host.prepare("SELECT 5".into()).unwrap().is_ok(), "one prepared already still is");
    }
}

#[cfg(test)]
mod batch_tests {
    use super::{Event, GuestHost, Origin};
    use crate::bindings::BatchHost;
    use crate::config::Limits;
    use rusqlite::Connection;

    fn event(position: u64) -> Event {
        Event {
            stream: "wallets".into(),
            position,
            id: format!("e{position}"),
            type_: "t".into(),
            subject: None,
            time: None,
            correlation_id: None,
            causation_id: None,
            data: Vec::new(),
        }
    }

    #[test]
    fn partitions_are_told_only_when_an_event_has_one() {
        let db = Connection::open_in_memory().unwrap();
        let mut host = GuestHost::new(db, "test".into(), Limits::default()).unwrap();
        let origin = |number: Option<u32>| Origin { number, ..Origin::default() };
        let events = [event(1), event(2), event(1)];
        host.set_batch(&events, &[origin(Some(2)), origin(None), origin(Some(0))]);
        assert_eq!(host.partitions().unwrap(), [Some(2), None, Some(0)]);
        host.set_batch(&events[..2], &[origin(None), origin(None)]);
        assert!(host.partitions().unwrap().is_empty(), "no event has one: the list is empty");
    }

    #[test]
    fn in_a_batch_of_several_partitions_an_emitted_event_is_named_by_its_causes_partition() {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(super::runtime_tables::SCHEMA).unwrap();
        let mut host = GuestHost::new(db, "fees".into(), Limits::default()).unwrap();
        let origin = |n: u32| Origin {
            partition: Some(format!("kafka:orders/charges/{n}").into()),
            number: Some(n),
            through: 8,
        };
        // Offset 7 of partition 0 and offset 7 of partition 1.
        host.set_batch(&[event(7), event(7)], &[origin(0), origin(1)]);
        let by_position =
            crate::bindings::EmitHost::emit(&mut host, "s".into(), "t".into(), None, b"{}".to_vec(), 7);
        let refused = by_position.unwrap().unwrap_err();
        assert!(refused.contains("position 7 names 2 events of the batch"), "{refused}");
        for index in [1, 0, 1] {
            BatchHost::emit(&mut host, index, "s".into(), "t".into(), None, b"{}".to_vec()).unwrap().unwrap();
        }
        let err =
            BatchHost::emit(&mut host, 2, "s".into(), "t".into(), None, b"{}".to_vec()).unwrap().unwrap_err();
        assert!(err.contains("index 2 is not an event of the batch being handled (2 events)"), "{err}");
        let rows: Vec<(String, i64, Option<String>)> = host
            .db()
            .prepare("SELECT id, position, partition FROM projector_outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let row = |id: &str, n: u32| (id.to_string(), 8, Some(format!("kafka:orders/charges/{n}")));
        assert_eq!(
            rows,
            [
                row("fees:kafka:orders/charges/1:7:0", 1),
                row("fees:kafka:orders/charges/0:7:0", 0),
                row("fees:kafka:orders/charges/1:7:1", 1),
            ]
        );
    }
}

#[cfg(test)]
mod deferred_tests {
    use super::prepared_tests::host;
    use super::{Limits, Value};
    use crate::bindings::{DeferredHost, DeferredPackedHost, PreparedHost};
    use std::time::{Duration, Instant};

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn deferred_statements_run_in_order_before_anything_the_guest_does_next() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        let rename = host.prepare("UPDATE users SET name = ?2 WHERE id = ?1".into()).unwrap().unwrap();
        let count = host.prepare("SELECT count(*), max(name) FROM users".into()).unwrap().unwrap();
        for i in 0..10_000 {
            DeferredHost::execute(&mut host, insert.handle, vec![text(&format!("u{i:05}")), text("a")])
                .unwrap();
        }
        // After the insert it follows, or it would change nothing.
        DeferredHost::execute(&mut host, rename.handle, vec![text("u09999"), text("z")]).unwrap();
        let rows = PreparedHost::query(&mut host, count.handle, Vec::new()).unwrap().unwrap();
        assert!(
            matches!(&rows[..], [row] if matches!(&row[..], [Value::Integer(10_000), Value::Text(z)] if z == "z")),
            "the query saw every deferred write: {rows:?}"
        );
        assert_eq!(host.take_deferred_failure().unwrap(), None);
    }

    #[test]
    fn a_deferred_statement_that_fails_is_the_calls_failure_once() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        DeferredHost::execute(&mut host, insert.handle, vec![text("u1"), text("a")]).unwrap();
        DeferredHost::execute(&mut host, insert.handle, vec![text("u1"), text("b")]).unwrap();
        DeferredHost::execute(&mut host, insert.handle, vec![text("u3"), text("c")]).unwrap();
        let failure = host.take_deferred_failure().unwrap().expect("the second u1 failed");
        assert_eq!(
            failure,
            "deferred statement \"INSERT INTO users (id, name) VALUES (?1, ?2)\" failed: UNIQUE constraint \
             failed: users.id"
        );
        assert_eq!(host.take_deferred_failure().unwrap(), None, "taken, it is gone");
        // A bad handle is found when deferred, and fails the call the same way.
        DeferredHost::execute(&mut host, 9, Vec::new()).unwrap();
        let failure = host.take_deferred_failure().unwrap().expect("handle 9 was never prepared");
        assert!(failure.contains("no prepared statement has handle 9"), "{failure}");
    }

    #[test]
    fn deferring_big_values_in_a_loop_holds_the_hosts_memory_to_a_bound() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        // A slow first statement: the queue fills behind it.
        let slow = host
            .prepare(
                "INSERT INTO users (id, name) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n \
                 WHERE i < 2000000) SELECT 'slow', 'n' FROM n WHERE i = 2000000"
                    .into(),
            )
            .unwrap()
            .unwrap();
        DeferredHost::execute(&mut host, slow.handle, Vec::new()).unwrap();
        let big = "x".repeat(1 << 20);
        for i in 0..100 {
            DeferredHost::execute(&mut host, insert.handle, vec![text(&format!("u{i}")), text(&big)])
                .unwrap();
        }
        let peak = host.db.peak_queued_bytes();
        assert!(peak > 0 && peak <= 8 << 20, "100 MiB deferred, at most 8 MiB queued at once: {peak}");
        let count: i64 = host.db().query_row("SELECT count(*) FROM users", [], |row| row.get(0)).unwrap();
        assert_eq!(count, 101, "every one ran");
        assert_eq!(host.take_deferred_failure().unwrap(), None);
        // Idle again, the writer lets go of what the big values took.
        let held = host.db.held_when_idle();
        assert!(held <= 2 * (64 << 10), "{held} bytes held by an idle writer");
    }

    #[test]
    fn a_deferred_statement_runs_under_the_calls_deadline() {
        let mut host = host();
        let forever = host
            .prepare(
                "INSERT INTO users (id, name) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                 SELECT 'x' || i, 'n' FROM n WHERE i < 0"
                    .into(),
            )
            .unwrap()
            .unwrap();
        host.set_call_deadline(Instant::now() + Duration::from_millis(50));
        let started = Instant::now();
        DeferredHost::execute(&mut host, forever.handle, Vec::new()).unwrap();
        let trap = host.take_deferred_failure().expect_err("the deadline stops it: a trap");
        assert_eq!(trap.downcast_ref::<wasmtime::Trap>(), Some(&wasmtime::Trap::Interrupt), "{trap:#}");
        assert!(started.elapsed() < Duration::from_secs(10), "stopped near its deadline");
        // The transaction the host runs the call in is still there to roll back.
        host.db().execute_batch("ROLLBACK").unwrap();
    }

    /// Statements in the layout of `deferred-packed.execute`, written here
    /// from the WIT's description rather than by the SDK's encoder.
    fn packed(statements: &[(u32, &[Value])]) -> Vec<u8> {
        let sized = |out: &mut Vec<u8>, tag: u8, bytes: &[u8]| {
            out.push(tag);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        let mut out = Vec::new();
        for (handle, params) in statements {
            out.extend_from_slice(&handle.to_le_bytes());
            out.extend_from_slice(&(params.len() as u32).to_le_bytes());
            for param in *params {
                match param {
                    Value::Null => out.push(0),
                    Value::Integer(n) => {
                        out.push(1);
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                    Value::Real(x) => {
                        out.push(2);
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                    Value::Text(text) => sized(&mut out, 3, text.as_bytes()),
                    Value::Blob(blob) => sized(&mut out, 4, blob),
                }
            }
        }
        out
    }

    #[test]
    fn packed_statements_run_in_order_with_every_kind_of_parameter() {
        let mut host = host();
        host.db().execute_batch("CREATE TABLE kinds (n, i, r, t, b)").unwrap();
        let insert = host.prepare("INSERT INTO kinds VALUES (?1, ?2, ?3, ?4, ?5)".into()).unwrap().unwrap();
        let rename = host.prepare("UPDATE kinds SET t = ?1 WHERE i = ?2".into()).unwrap().unwrap();
        let row = [Value::Null, Value::Integer(-7), Value::Real(2.5), text("été"), Value::Blob(vec![0, 255])];
        let buffer = packed(&[(insert.handle, &row), (rename.handle, &[text("after"), Value::Integer(-7)])]);
        DeferredPackedHost::execute(&mut host, buffer).unwrap();
        let found: (Option<i64>, i64, f64, String, Vec<u8>) = host
            .db()
            .query_row("SELECT n, i, r, t, b FROM kinds", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap();
        assert_eq!(found, (None, -7, 2.5, "after".to_string(), vec![0, 255]), "both ran, in order");
        assert_eq!(host.take_deferred_failure().unwrap(), None);
        // A handle never prepared fails the call, as `deferred.execute`'s does.
        DeferredPackedHost::execute(&mut host, packed(&[(77, &[])])).unwrap();
        let failure = host.take_deferred_failure().unwrap().expect("handle 77 was never prepared");
        assert!(failure.contains("no prepared statement has handle 77"), "{failure}");
    }

    #[test]
    fn a_buffer_that_breaks_the_packed_layout_traps_saying_where() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        let whole = packed(&[(insert.handle, &[text("u1"), text("Ada")])]);
        let mut bad_tag = whole.clone();
        bad_tag[8] = 9;
        let mut not_utf8 = whole.clone();
        let last = not_utf8.len() - 1;
        not_utf8[last] = 0xff;
        let huge = "x".repeat(Limits::default().value_bytes + 1);
        let cases = [
            (whole[..whole.len() - 1].to_vec(), "bytes wanted at byte"),
            (bad_tag, "byte 8 is no parameter's tag: 9"),
            (not_utf8, "is not UTF-8"),
            (packed(&[(insert.handle, &[text("u2"), text(&huge)])]), "over the limit"),
        ];
        for (buffer, expected) in cases {
            let trap = DeferredPackedHost::execute(&mut host, buffer).expect_err(expected);
            assert!(format!("{trap:#}").contains(expected), "{expected}: {trap:#}");
        }
    }

    #[test]
    fn a_full_database_under_a_deferred_write_is_the_hosts_failure_not_the_guests() {
        let mut host = host();
        let insert = host.prepare("INSERT INTO users (id, name) VALUES (?1, ?2)".into()).unwrap().unwrap();
        // The database may not grow a page: SQLite's SQLITE_FULL, as on a
        // full disk.
        let pages: i64 = host.db().query_row("PRAGMA page_count", [], |row| row.get(0)).unwrap();
        host.db().query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(())).unwrap();
        // A small row fits the table's page; a big one needs new pages.
        let big = "x".repeat(64 << 10);
        for (id, name) in [("u1", "small"), ("u2", &big), ("u3", "small")] {
            DeferredHost::execute(&mut host, insert.handle, vec![text(id), text(name)]).unwrap();
        }
        let trap = host.take_deferred_failure().expect_err("a full database stops the call: a trap");
        assert!(format!("{trap:#}").contains("database or disk is full"), "{trap:#}");
        let cause = host.take_host_error().expect("the host's fault, so no event is parked for it");
        assert!(format!("{cause:#}").contains("database or disk is full"), "{cause:#}");
        // SQLite rolled the transaction back (u1 is gone with it) and the
        // host stood an empty one in for the host's ROLLBACK: had u3 run
        // after the failure, it would be there.
        let ids: Vec<String> = host
            .db()
            .prepare("SELECT id FROM users")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(ids.is_empty(), "nothing ran after the failure: {ids:?}");
        host.db().execute_batch("ROLLBACK").unwrap();
    }
}
