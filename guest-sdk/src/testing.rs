//! A native test harness: runs a [`Projection`] against SQLite with the
//! host's state and SQL semantics, so projection logic is tested with plain
//! `cargo test` and no wasm.
//!
//! It mirrors what the host does around a module (`runtime/src/guest_host.rs`,
//! `runtime/src/instance.rs` and `runtime/src/projection.rs`), so a
//! projection that passes here cannot fail in the host for a reason the
//! harness let through:
//!
//! - the database has the host's layout (`runtime_tables.rs` is shared):
//!   a database the harness built opens in the host and the other way round;
//! - `init` runs as in the host: told the state version the database holds
//!   (`None` when new), after the projection's [`Projection::MIGRATIONS`];
//!   a database of another state version is one the host would rebuild
//!   rather than `init` ([`Harness::open`] says so);
//! - each batch (and `init`) runs in one transaction, and every write of a
//!   batch that fails is rolled back — its emitted events too;
//! - [`Harness::process_batch`] does what the host does with a batch that
//!   fails: splits it to find the event, parks that event as a dead letter
//!   with the reason, and applies the rest;
//! - [`Harness::query`] is read-only: it runs between `BEGIN` and `ROLLBACK`
//!   with `PRAGMA query_only` on, so a write fails and nothing remains;
//! - guest SQL is refused what the host's authorizer refuses, in the host's
//!   words (the statement, the rule, what to do instead): transaction
//!   control, savepoints, `ATTACH`/`DETACH`, pragmas, virtual tables,
//!   `load_extension`, the runtime's own tables (`projector_checkpoints`,
//!   `projector_dead_letters`, `projector_meta`, `projector_outbox`), temp
//!   triggers, triggers on `projector_kv` or the runtime's tables, and temp
//!   tables or views named like them;
//! - [`Sql::execute`](crate::Sql::execute) steps through any rows a
//!   statement returns (`INSERT … RETURNING`) and returns the rows changed,
//!   0 for a read-only statement;
//! - an emitted event is checked as the host checks it and recorded in the
//!   outbox as the host records it ([`Harness::emitted`]);
//! - a state key and value together, an SQL text or blob parameter, or an
//!   emitted event's data over the value limit (1 MiB, the host's default
//!   `limits.value_kib`; see [`Harness::with_value_limit`]) traps the module
//!   in the host, so it panics here with the host's message; strings and
//!   blobs SQL makes itself are capped as in the host (SQLITE_LIMIT_LENGTH);
//! - a statement that ends the transaction itself (`INSERT OR ROLLBACK`,
//!   `RAISE(ROLLBACK)`) traps in the host, so it panics here.
//!
//! A panic is the harness's trap: the batch's writes are rolled back and the
//! harness stays usable ([`Harness::process_batch`] parks the event, as the
//! host does). What it does not mirror: fuel, memory and time limits, and
//! log rate limits — those belong to the wasm engine.
//!
//! ```
//! use projector_sdk::testing::Harness;
//! use projector_sdk::{Context, Event, Failure, Projection};
//!
//! struct Counter;
//! impl Projection for Counter {
//!     fn handle(ctx: &Context, _event: &Event) -> Result<(), Failure> {
//!         let n: u64 = ctx.state().get("count")?.unwrap_or(0);
//!         ctx.state().set("count", &(n + 1))?;
//!         Ok(())
//!     }
//! }
//!
//! let mut harness = Harness::<Counter>::new();
//! harness.handle(Event::json("thing_happened", &serde_json::json!({"id": 1}))).unwrap();
//! assert_eq!(harness.state::<u64>("count"), Some(1));
//! ```

use crate::context::{Backend, Context, Level, Rows, Value};
use crate::event::Fields;
use crate::runtime_tables;
use crate::sql_rules::{GUEST_SQL_PREFIX, GuestRules, cap_lengths, execute_whole};
use crate::{Event, Failure, Param, Projection};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{OptionalExtension, ToSql, params_from_iter};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// The SQLite connection a harness runs over ([`Harness::from_connection`],
/// [`Harness::into_connection`]).
pub use rusqlite::Connection;

/// The host's default value limit (`limits.value_kib = 1024`).
pub const DEFAULT_VALUE_LIMIT: usize = 1024 << 10;

/// The source name the host gives the embedded log in its tables.
const LOG_SOURCE: &str = "log";

/// Runs a projection natively against SQLite.
pub struct Harness<P: Projection> {
    conn: Connection,
    rules: GuestRules,
    value_limit: usize,
    next_position: u64,
    name: String,
    logs: RefCell<Vec<(Level, String)>>,
    call: RefCell<Call>,
    projection: PhantomData<P>,
}

/// What the harness knows about the call in progress: the events of the
/// batch being handled (none in `init` and `query`) and how many events
/// each has emitted, as the host's `GuestHost` does.
#[derive(Default)]
struct Call {
    /// `(position, id, correlation id, events emitted so far)`.
    batch: Vec<(u64, String, Option<String>, u32)>,
    /// How the first deferred statement of the call that failed failed:
    /// it fails the call, as in the host.
    deferred: Option<String>,
}

/// An event parked as a dead letter, as [`Harness::dead_letters`] reads it
/// from the host's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event's id.
    pub id: String,
    /// Its position.
    pub position: u64,
    /// Its stream.
    pub stream: String,
    /// Its type.
    pub event_type: String,
    /// Why it could not be applied.
    pub reason: String,
    /// Its payload.
    pub data: Vec<u8>,
}

/// An event the projection emitted, as [`Harness::emitted`] reads it from
/// the outbox — exactly what the host would publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// Its id: `<projection>:<position>:<index>`.
    pub id: String,
    /// The stream it goes to.
    pub stream: String,
    /// Its type.
    pub event_type: String,
    /// Its subject, if it has one.
    pub subject: Option<String>,
    /// Its data (JSON, as [`Context::emit`] wrote it).
    pub data: Vec<u8>,
    /// The causing event's correlation id.
    pub correlation_id: Option<String>,
    /// The causing event's id.
    pub causation_id: String,
    /// `projector/<projection>`.
    pub source: String,
    /// The causing event's position.
    pub position: u64,
}

impl Emitted {
    /// The data, parsed as JSON. Panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.data).unwrap_or_else(|err| panic!("emitted event {}: {err}", self.id))
    }
}

impl<P: Projection> Harness<P> {
    /// A harness over a fresh in-memory database, with `init` already run.
    ///
    /// Panics if `init` fails: a test cannot go on without its tables.
    pub fn new() -> Self {
        let conn = Connection::open_in_memory().expect("open an in-memory SQLite database");
        Self::from_connection(conn).unwrap_or_else(|err| panic!("{err}"))
    }

    /// A harness over the SQLite file at `path` — new, or a database built
    /// before (by the harness or by the host, with another version of the
    /// module) — with the host's settings (WAL, `synchronous=NORMAL`), and
    /// `init` run as the host runs it: told the state version the database
    /// holds, after the migrations it has not had yet.
    ///
    /// A database of another state version than [`Projection::STATE_VERSION`]
    /// is refused, with the host's reason: the host would not `init` this
    /// module over it but rebuild the state from the log.
    pub fn open(path: &Path) -> Result<Self, String> {
        let conn = Connection::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536; PRAGMA wal_autocheckpoint=10000;")
            .map_err(|err| format!("{}: {err}", path.display()))?;
        Self::from_connection(conn)
    }

    /// A harness over `conn` (see [`Harness::open`]): an in-memory database
    /// another harness built ([`Harness::into_connection`]), to test what a
    /// new version of a module does with the state an older one left.
    pub fn from_connection(mut conn: Connection) -> Result<Self, String> {
        let rules = crate::sql_rules::guard(&mut conn).map_err(|err| err.to_string())?;
        cap_lengths(&conn, DEFAULT_VALUE_LIMIT);
        conn.set_prepared_statement_cache_capacity(256);
        conn.execute_batch(&format!("BEGIN; {} COMMIT;", runtime_tables::SCHEMA))
            .map_err(|err| err.to_string())?;
        let mut harness = Harness {
            conn,
            rules,
            value_limit: DEFAULT_VALUE_LIMIT,
            next_position: 1,
            name: "test".to_string(),
            logs: RefCell::new(Vec::new()),
            call: RefCell::new(Call::default()),
            projection: PhantomData,
        };
        let found = harness.found_state_version()?;
        if let Some(found) = found
            && found != P::STATE_VERSION
        {
            return Err(format!(
                "the database holds state version {found} but the projection builds version {}: \
                 the host would not init it over this database but rebuild the state from the log \
                 into a new one",
                P::STATE_VERSION
            ));
        }
        let last_position: Option<i64> = harness
            .conn
            .query_row("SELECT max(position) FROM projector_checkpoints", [], |row| row.get(0))
            .map_err(|err| err.to_string())?;
        harness.next_position = last_position.map_or(1, |p| p as u64 + 1);
        harness.in_transaction(
            &[],
            |message| format!("init failed: {message}"),
            |ctx| {
                crate::migrations::apply(ctx, P::MIGRATIONS)
                    .and_then(|()| P::init(ctx, found))
                    .map_err(|err| format!("init failed: {err}"))?;
                harness
                    .conn
                    .execute(
                        "INSERT INTO projector_meta (key, value) VALUES ('state_version', ?1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        [P::STATE_VERSION.to_string()],
                    )
                    .map_err(|err| err.to_string())?;
                Ok::<(), String>(())
            },
        )?;
        Ok(harness)
    }

    /// The database connection, to hand to another harness (a newer
    /// version of the module) with [`Harness::from_connection`].
    pub fn into_connection(self) -> Connection {
        self.conn
    }

    /// This harness with a value limit of `bytes` instead of the host's
    /// default 1 MiB ([`DEFAULT_VALUE_LIMIT`]): set it to the projection's
    /// `limits.value_kib` × 1024 when its config changes the limit. It holds
    /// for every call after this one (`init` has already run under the
    /// default).
    pub fn with_value_limit(mut self, bytes: usize) -> Self {
        self.value_limit = bytes;
        cap_lengths(&self.conn, bytes);
        self
    }

    /// This harness running the projection under `name` (by default
    /// `test`), as in `projector.toml`: emitted events' ids and source
    /// carry it.
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    fn found_state_version(&self) -> Result<Option<u32>, String> {
        let version: Option<Option<String>> = self
            .conn
            .query_row("SELECT value FROM projector_meta WHERE key = 'state_version'", [], |row| row.get(0))
            .optional()
            .map_err(|err| err.to_string())?;
        version
            .flatten()
            .map(|v| v.parse::<u32>().map_err(|err| format!("the database's state_version {v:?}: {err}")))
            .transpose()
    }

    /// Apply one event in its own transaction.
    pub fn handle(&mut self, event: Event) -> Result<(), Failure> {
        self.handle_batch(vec![event])
    }

    /// Apply a batch in one transaction: all of it, or on failure none of it.
    /// Events without a stream, id or position get them filled in.
    pub fn handle_batch(&mut self, events: Vec<Event>) -> Result<(), Failure> {
        let events: Vec<Event> = events.into_iter().map(|event| self.complete(event)).collect();
        self.in_transaction(&events, Failure::Reject, |ctx| P::handle_batch(ctx, &events))
    }

    /// Apply events already complete (stream, id, position set), without
    /// copying them: the benchmark's path.
    pub fn handle_prepared(&mut self, events: &[Event]) -> Result<(), Failure> {
        self.in_transaction(events, Failure::Reject, |ctx| P::handle_batch(ctx, events))
    }

    /// Deliver one event as the host does: applied, or — rejected or
    /// trapped — parked as a dead letter (see [`Harness::process_batch`]).
    pub fn process(&mut self, event: Event) -> Result<Vec<DeadLetter>, Failure> {
        self.process_batch(vec![event])
    }

    /// Deliver a batch as the host does with `on_failure = "dead-letter"`:
    /// in one transaction; if the projection rejects it or traps (panics),
    /// the batch is rolled back and split in halves, each tried on its
    /// own, down to the event that fails, which is parked as a dead letter
    /// with the reason while every other event is applied. Returns the
    /// events parked.
    ///
    /// `Err(Failure::Retry)` is the projection asking to retry: the host
    /// would hand the same events again later. As in the host, the halves
    /// before the one that asked are committed already.
    pub fn process_batch(&mut self, events: Vec<Event>) -> Result<Vec<DeadLetter>, Failure> {
        let events: Vec<Event> = events.into_iter().map(|event| self.complete(event)).collect();
        let mut parked = Vec::new();
        self.apply(&events, &mut parked)?;
        Ok(parked)
    }

    fn apply(&mut self, events: &[Event], parked: &mut Vec<DeadLetter>) -> Result<(), Failure> {
        let attempt = catch_unwind(AssertUnwindSafe(|| {
            self.in_transaction(events, Failure::Reject, |ctx| P::handle_batch(ctx, events))
        }));
        let reason = match attempt {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(Failure::Retry(reason))) => return Err(Failure::Retry(reason)),
            Ok(Err(Failure::Reject(reason))) => reason,
            Err(panic) => format!("module trapped: {}", panic_message(&*panic)),
        };
        if events.len() > 1 {
            let mid = events.len() / 2;
            self.apply(&events[..mid], parked)?;
            return self.apply(&events[mid..], parked);
        }
        let event = &events[0];
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO projector_dead_letters (source, position, id, stream, type, \
                 subject, time, correlation_id, causation_id, data, reason, module, attempts, parked_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'harness', 1, \
                 strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            )
            .and_then(|mut stmt| {
                stmt.execute(rusqlite::params![
                    LOG_SOURCE,
                    event.position as i64,
                    event.id(),
                    event.stream(),
                    event.event_type(),
                    event.subject(),
                    event.time(),
                    event.correlation_id(),
                    event.causation_id(),
                    event.data(),
                    reason,
                ])
            })
            .unwrap_or_else(|err| panic!("park event {}: {err}", event.id()));
        parked.push(DeadLetter {
            id: event.id().to_string(),
            position: event.position,
            stream: event.stream().to_string(),
            event_type: event.event_type().to_string(),
            reason,
            data: event.data().to_vec(),
        });
        Ok(())
    }

    /// The events parked as dead letters, in position order.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, position, stream, type, reason, data FROM projector_dead_letters ORDER BY position",
            )
            .expect("prepare dead letters");
        stmt.query_map([], |row| {
            Ok(DeadLetter {
                id: row.get(0)?,
                position: row.get::<_, i64>(1)? as u64,
                stream: row.get(2)?,
                event_type: row.get(3)?,
                reason: row.get(4)?,
                data: row.get(5)?,
            })
        })
        .and_then(|rows| rows.collect())
        .expect("read dead letters")
    }

    /// The events the projection emitted in committed batches, in order:
    /// what the host's outbox would hold and publish.
    pub fn emitted(&self) -> Vec<Emitted> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, stream, type, subject, data, correlation_id, causation_id, source, position \
                 FROM projector_outbox ORDER BY seq",
            )
            .expect("prepare outbox");
        stmt.query_map([], |row| {
            Ok(Emitted {
                id: row.get(0)?,
                stream: row.get(1)?,
                event_type: row.get(2)?,
                subject: row.get(3)?,
                data: row.get(4)?,
                correlation_id: row.get(5)?,
                causation_id: row.get(6)?,
                source: row.get(7)?,
                position: row.get::<_, i64>(8)? as u64,
            })
        })
        .and_then(|rows| rows.collect())
        .expect("read outbox")
    }

    /// Call the projection's `query`, read-only as in the host: inside a
    /// transaction that is rolled back, with `PRAGMA query_only` on, so a
    /// write fails and nothing the call did remains.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.conn.execute_batch("BEGIN; PRAGMA query_only=1").expect("begin a read transaction");
        let _end = EndOnDrop { conn: &self.conn, sql: "PRAGMA query_only=0; ROLLBACK" };
        self.call.borrow_mut().batch.clear();
        let answer = P::query(&Context::new(&self.backend()), request);
        match self.call.borrow_mut().deferred.take() {
            Some(message) if answer.is_ok() => Err(message),
            _ => answer,
        }
    }

    /// Call the projection's `query` with `request` serialized as JSON, and
    /// parse its answer as JSON into an `A` (a `serde_json::Value`, or the
    /// answer type the projection serializes).
    ///
    /// Panics if the answer is not the JSON `A` expects: that is the test
    /// failing.
    pub fn query_json<A: serde::de::DeserializeOwned>(
        &self,
        request: &(impl serde::Serialize + ?Sized),
    ) -> Result<A, String> {
        let request = serde_json::to_vec(request).expect("a serde value serializes to JSON");
        let answer = self.query(&request)?;
        Ok(serde_json::from_slice(&answer).unwrap_or_else(|err| {
            panic!("the answer {:?} is not the JSON expected: {err}", String::from_utf8_lossy(&answer))
        }))
    }

    /// The state value under `key`, deserialized from JSON.
    pub fn state<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        Context::new(&self.backend()).state().get(key).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Up to `limit` raw key/value entries whose key starts with `prefix`,
    /// in key order.
    pub fn scan(&self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        self.backend().scan(prefix, limit)
    }

    /// Run a query on the projection's database, as the test (no guest
    /// rules apply); panics on a bad statement.
    pub fn rows(&self, statement: &str) -> Rows {
        let mut stmt = self.conn.prepare_cached(statement).unwrap_or_else(|err| panic!("{statement}: {err}"));
        collect_rows(&mut stmt, &[]).unwrap_or_else(|err| panic!("{statement}: {err}"))
    }

    /// The lines the projection logged, in order.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }

    fn complete(&mut self, mut event: Event) -> Event {
        if event.position == 0 {
            event.position = self.next_position;
        }
        self.next_position = self.next_position.max(event.position + 1);
        if event.id().is_empty() {
            let id = format!("event-{}", event.position);
            event = event.with_id(id);
        }
        if event.stream().is_empty() {
            event = event.with_stream("test");
        }
        event
    }

    fn backend(&self) -> SqliteBackend<'_> {
        SqliteBackend {
            conn: &self.conn,
            rules: &self.rules,
            value_limit: self.value_limit,
            name: &self.name,
            logs: &self.logs,
            call: &self.call,
        }
    }

    /// Run `f` over `events` in a transaction: committed if it succeeds,
    /// rolled back if it fails or panics (a panic is the module's trap).
    /// A deferred statement that failed fails a call that succeeded, as
    /// `failure` of its error.
    fn in_transaction<T, E>(
        &self,
        events: &[Event],
        failure: impl FnOnce(String) -> E,
        f: impl FnOnce(&Context) -> Result<T, E>,
    ) -> Result<T, E> {
        {
            let mut call = self.call.borrow_mut();
            call.batch.clear();
            call.batch.extend(
                events
                    .iter()
                    .map(|e| (e.position, e.id().to_string(), e.correlation_id().map(String::from), 0)),
            );
            call.batch.sort_by_key(|(position, ..)| *position);
        }
        self.conn.execute_batch("BEGIN").expect("begin a transaction");
        let mut end = EndOnDrop { conn: &self.conn, sql: "ROLLBACK" };
        let backend = self.backend();
        let result = match (f(&Context::new(&backend)), self.call.borrow_mut().deferred.take()) {
            (Ok(_), Some(message)) => Err(failure(message)),
            (result, _) => result,
        };
        if result.is_ok() {
            if let Some(last) = events.iter().map(|e| e.position).max() {
                self.conn
                    .execute(
                        "INSERT INTO projector_checkpoints (source, position) VALUES (?1, ?2) \
                         ON CONFLICT (source) DO UPDATE SET position = max(position, excluded.position)",
                        (LOG_SOURCE, last as i64),
                    )
                    .expect("move the checkpoint");
            }
            end.sql = "COMMIT";
        }
        result
    }
}

/// The events of a file of CloudEvents, one JSON object a line (the format
/// `projector append` and `projector replay` read), as the embedded log
/// would deliver them on `stream`: positions from 1, and an event whose id
/// came earlier dropped. A fixture can so be replayed natively before it is
/// replayed through the module.
///
/// `data` holding JSON becomes its JSON text; `data` holding a string with
/// a `datacontenttype` that is not JSON becomes the string's bytes.
/// `data_base64` is not read here.
pub fn read_cloudevents(text: &str, stream: &str) -> Result<Vec<Event>, String> {
    let mut seen = std::collections::HashSet::new();
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let at = |what: String| format!("line {}: {what}", i + 1);
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|err| at(format!("not a JSON object: {err}")))?;
        let mut text = |name: &str| -> Result<Option<String>, String> {
            match object.remove(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(at(format!("attribute `{name}` must be a string, found {other}"))),
            }
        };
        let id = text("id")?.ok_or_else(|| at("missing required attribute `id`".into()))?;
        let event_type = text("type")?.ok_or_else(|| at("missing required attribute `type`".into()))?;
        let (subject, time) = (text("subject")?, text("time")?);
        let (correlation_id, causation_id) = (text("correlationid")?, text("causationid")?);
        let content_type = text("datacontenttype")?;
        if object.contains_key("data_base64") {
            return Err(at("data_base64 is not read by the harness; use `data`".into()));
        }
        let json = content_type.as_deref().is_none_or(|t| t == "application/json" || t.ends_with("+json"));
        let data = match object.remove("data") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) if !json => s.into_bytes(),
            Some(value) => serde_json::to_vec(&value).expect("a JSON value serializes"),
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        events.push(Event::from_fields(Fields {
            stream,
            id: &id,
            event_type: &event_type,
            subject: subject.as_deref(),
            time: time.as_deref(),
            correlation_id: correlation_id.as_deref(),
            causation_id: causation_id.as_deref(),
            data: &data,
            position: events.len() as u64 + 1,
            partition: None,
            index: None,
        }));
    }
    Ok(events)
}

impl<P: Projection> Default for Harness<P> {
    fn default() -> Self {
        Self::new()
    }
}

/// What a panic said, as a trap's reason.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".to_string())
}

/// Ends a transaction the harness began, even when the projection panics.
struct EndOnDrop<'a> {
    conn: &'a Connection,
    sql: &'static str,
}

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        let ended = self.conn.execute_batch(self.sql);
        if !std::thread::panicking() {
            ended.unwrap_or_else(|err| panic!("{}: {err}", self.sql));
        }
    }
}

struct SqliteBackend<'a> {
    conn: &'a Connection,
    rules: &'a GuestRules,
    value_limit: usize,
    name: &'a str,
    logs: &'a RefCell<Vec<(Level, String)>>,
    call: &'a RefCell<Call>,
}

impl SqliteBackend<'_> {
    /// Where the host traps the module over `limits.value_kib`, the harness
    /// panics with the host's words.
    fn check_size(&self, what: &str, bytes: usize) {
        if bytes > self.value_limit {
            panic!(
                "the host would trap the module: {what} of {bytes} bytes is over the limit of {} bytes \
                 (limits.value_kib)",
                self.value_limit
            );
        }
    }

    fn check_params(&self, params: &[Param<'_>]) {
        for param in params {
            match param {
                Param::Text(s) => self.check_size("an SQL text parameter", s.len()),
                Param::Blob(b) => self.check_size("an SQL blob parameter", b.len()),
                _ => {}
            }
        }
    }

    /// Prepare `statement` as the guest's and run `f` on it with the guest's
    /// rules on; a refusal is explained as the host explains it.
    fn as_guest<T>(
        &self,
        statement: &str,
        f: impl FnOnce(&mut rusqlite::CachedStatement<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, String> {
        let in_transaction = !self.conn.is_autocommit();
        self.rules.begin();
        let result = self
            .conn
            .prepare_cached(&format!("{GUEST_SQL_PREFIX}{statement}"))
            .and_then(|mut stmt| f(&mut stmt));
        self.rules.end();
        if in_transaction && self.conn.is_autocommit() {
            // As in the host: an empty transaction stands in for the one the
            // statement ended, so the harness's ROLLBACK has one to end.
            self.conn.execute_batch("BEGIN").expect("begin a transaction");
            panic!(
                "the host would trap the module: sql: a statement rolled back the transaction the \
                 host runs the call in (ON CONFLICT ROLLBACK or RAISE(ROLLBACK)); the call's writes \
                 are gone"
            );
        }
        result.map_err(|err| {
            self.rules
                .explain(statement, &err)
                .or_else(|| crate::sql_rules::written_in_query(&err))
                .unwrap_or_else(|| err.to_string())
        })
    }
}

impl Backend for SqliteBackend<'_> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT value FROM projector_kv WHERE key = ?1")
            .expect("prepare state get");
        let mut rows = stmt.query([key]).expect("state get");
        rows.next().expect("state get").map(|row| row.get(0).expect("state value"))
    }
    fn set(&self, key: &str, value: &[u8]) {
        self.check_size(
            &format!("the state value for key {:?}", truncated(key, 64)),
            key.len() + value.len(),
        );
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO projector_kv (key, value) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute((key, value)))
            .unwrap_or_else(|err| panic!("state set {key:?}: {err}"));
    }
    fn delete(&self, key: &str) {
        self.conn
            .prepare_cached("DELETE FROM projector_kv WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute([key]))
            .unwrap_or_else(|err| panic!("state delete {key:?}: {err}"));
    }
    fn scan(&self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, value FROM projector_kv WHERE substr(key, 1, length(?1)) = ?1 \
                 ORDER BY key LIMIT ?2",
            )
            .expect("prepare state scan");
        stmt.query_map((prefix, limit), |row| Ok((row.get(0)?, row.get(1)?)))
            .and_then(|rows| rows.collect())
            .expect("state scan")
    }
    fn execute(&self, statement: &str, params: &[Param<'_>]) -> Result<u64, String> {
        self.check_params(params);
        self.as_guest(statement, |stmt| execute_whole(self.conn, stmt, params_from_iter(params)))
    }
    fn defer(&self, statement: &str, params: &[Param<'_>]) -> Result<(), String> {
        self.check_params(params);
        // As the host does: bad SQL is an error now; a statement that
        // fails when it runs fails the call.
        self.as_guest(statement, |_| Ok(()))?;
        if let Err(message) =
            self.as_guest(statement, |stmt| execute_whole(self.conn, stmt, params_from_iter(params)))
        {
            let failed = format!("deferred statement {:?} failed: {message}", truncated(statement, 200));
            self.call.borrow_mut().deferred.get_or_insert(failed);
        }
        Ok(())
    }
    fn query(&self, statement: &str, params: &[Param<'_>]) -> Result<Rows, String> {
        self.check_params(params);
        self.as_guest(statement, |stmt| collect_rows(stmt, params))
    }
    fn log(&self, level: Level, message: &str, _position: Option<u64>) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
    fn emit(
        &self,
        stream: &str,
        event_type: &str,
        subject: Option<&str>,
        data: &[u8],
        position: u64,
        _index: Option<u32>,
    ) -> Result<(), String> {
        // The host's order: names, then the size (a trap), then the cause.
        runtime_tables::check_stream_name(stream)?;
        runtime_tables::check_emit_names(event_type, subject)?;
        self.check_size("an emitted event's data", data.len());
        let mut call = self.call.borrow_mut();
        let Ok(i) = call.batch.binary_search_by_key(&position, |(p, ..)| *p) else {
            return Err(runtime_tables::not_in_batch(position));
        };
        let (_, causation_id, correlation_id, emitted) = &mut call.batch[i];
        let id = runtime_tables::emit_id(self.name, None, position, *emitted);
        *emitted += 1;
        let emitted = runtime_tables::Emitted {
            id: &id,
            stream,
            event_type,
            subject,
            data,
            correlation_id: correlation_id.as_deref(),
            causation_id,
            projection: self.name,
            position,
            partition: None,
        };
        runtime_tables::record_emitted(self.conn, &emitted)
            .unwrap_or_else(|err| panic!("record emitted event {id}: {err}"));
        Ok(())
    }
}

fn collect_rows(stmt: &mut rusqlite::Statement<'_>, params: &[Param<'_>]) -> rusqlite::Result<Rows> {
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    let width = columns.len();
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let values = (0..width).map(|i| row.get_ref(i).map(from_value_ref)).collect::<Result<Vec<_>, _>>()?;
        out.push(values);
    }
    Ok(Rows::new(columns, out))
}

/// The longest prefix of `s` of at most `max` bytes, on a char boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Null => ValueRef::Null,
            Param::Integer(n) => ValueRef::Integer(n),
            Param::Real(x) => ValueRef::Real(x),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
            Param::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn from_value_ref(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Integer(n),
        ValueRef::Real(x) => Value::Real(x),
        ValueRef::Text(s) => Value::Text(String::from_utf8_lossy(s).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}
