//! A native test harness: runs a [`Projection`] against SQLite with the
//! host's state and SQL semantics, so projection logic is tested with plain
//! `cargo test` and no wasm.
//!
//! It mirrors what the host does around a module (`runtime/src/guest_host.rs`
//! and `runtime/src/instance.rs`), so a projection that passes here cannot
//! fail in the host for a reason the harness let through:
//!
//! - each batch (and `init`) runs in one transaction, and every write of a
//!   batch that fails is rolled back;
//! - [`Harness::query`] is read-only: it runs between `BEGIN` and `ROLLBACK`
//!   with `PRAGMA query_only` on, so a write fails and nothing remains;
//! - guest SQL is refused what the host's authorizer refuses: transaction
//!   control, savepoints, `ATTACH`/`DETACH`, pragmas, virtual tables,
//!   `load_extension`, the runtime's own tables (`projector_checkpoints`,
//!   `projector_dead_letters`, `projector_meta`), temp triggers, triggers on
//!   `projector_kv` or the runtime's tables, and temp tables or views named
//!   like them;
//! - [`Sql::execute`](crate::Sql::execute) steps through any rows a
//!   statement returns (`INSERT … RETURNING`) and returns the rows changed,
//!   0 for a read-only statement;
//! - a state key and value together, or an SQL text or blob parameter, over
//!   the value limit (1 MiB, the host's default `limits.value_kib`; see
//!   [`Harness::with_value_limit`]) traps the module in the host, so it
//!   panics here with the host's message; strings and blobs SQL makes
//!   itself are capped as in the host (SQLITE_LIMIT_LENGTH);
//! - a statement that ends the transaction itself (`INSERT OR ROLLBACK`,
//!   `RAISE(ROLLBACK)`) traps in the host, so it panics here.
//!
//! A panic is the harness's trap: the batch's writes are rolled back and the
//! harness stays usable. What it does not mirror: fuel, memory and time
//! limits, and log rate limits — those belong to the wasm engine.
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
use crate::sql_rules::{GUEST_SQL_PREFIX, cap_lengths};
use crate::{Event, Failure, Projection};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql, params_from_iter};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The key/value table, as the host lays it out.
const KV_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS projector_kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID";

/// The host's default value limit (`limits.value_kib = 1024`).
pub const DEFAULT_VALUE_LIMIT: usize = 1024 << 10;

/// Runs a projection natively against SQLite.
pub struct Harness<P: Projection> {
    conn: Connection,
    guest_sql: Arc<AtomicBool>,
    value_limit: usize,
    next_position: u64,
    logs: RefCell<Vec<(Level, String)>>,
    projection: PhantomData<P>,
}

impl<P: Projection> Harness<P> {
    /// A harness over a fresh in-memory database, with `init` already run.
    ///
    /// Panics if `init` fails: a test cannot go on without its tables.
    pub fn new() -> Self {
        let conn = Connection::open_in_memory().expect("open an in-memory SQLite database");
        Self::with_connection(conn).unwrap_or_else(|err| panic!("{err}"))
    }

    /// A harness over the SQLite file at `path`, with the host's settings
    /// (WAL, `synchronous=NORMAL`), and `init` run: what a benchmark needs to
    /// compare native logic with the module in the host.
    pub fn open(path: &Path) -> Result<Self, String> {
        let conn = Connection::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536; PRAGMA wal_autocheckpoint=10000;")
            .map_err(|err| format!("{}: {err}", path.display()))?;
        Self::with_connection(conn)
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

    fn with_connection(mut conn: Connection) -> Result<Self, String> {
        let guest_sql = crate::sql_rules::guard(&mut conn).map_err(|err| err.to_string())?;
        cap_lengths(&conn, DEFAULT_VALUE_LIMIT);
        conn.set_prepared_statement_cache_capacity(256);
        conn.execute_batch(KV_SCHEMA).map_err(|err| err.to_string())?;
        let harness = Harness {
            conn,
            guest_sql,
            value_limit: DEFAULT_VALUE_LIMIT,
            next_position: 1,
            logs: RefCell::new(Vec::new()),
            projection: PhantomData,
        };
        harness.in_transaction(|ctx| P::init(ctx, None).map_err(|err| format!("init failed: {err}")))?;
        Ok(harness)
    }

    /// Apply one event in its own transaction.
    pub fn handle(&mut self, event: Event) -> Result<(), Failure> {
        self.handle_batch(vec![event])
    }

    /// Apply a batch in one transaction: all of it, or on failure none of it.
    /// Events without a stream, id or position get them filled in.
    pub fn handle_batch(&mut self, events: Vec<Event>) -> Result<(), Failure> {
        let events: Vec<Event> = events.into_iter().map(|event| self.complete(event)).collect();
        self.in_transaction(|ctx| P::handle_batch(ctx, &events))
    }

    /// Apply events already complete (stream, id, position set), without
    /// copying them: the benchmark's path.
    pub fn handle_prepared(&mut self, events: &[Event]) -> Result<(), Failure> {
        self.in_transaction(|ctx| P::handle_batch(ctx, events))
    }

    /// Call the projection's `query`, read-only as in the host: inside a
    /// transaction that is rolled back, with `PRAGMA query_only` on, so a
    /// write fails and nothing the call did remains.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.conn.execute_batch("BEGIN; PRAGMA query_only=1").expect("begin a read transaction");
        let _end = EndOnDrop { conn: &self.conn, sql: "PRAGMA query_only=0; ROLLBACK" };
        P::query(&Context::new(&self.backend()), request)
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
        if event.id.is_empty() {
            event.id = format!("event-{}", event.position);
        }
        if event.stream.is_empty() {
            event.stream = "test".to_string();
        }
        event
    }

    fn backend(&self) -> SqliteBackend<'_> {
        SqliteBackend {
            conn: &self.conn,
            guest_sql: &self.guest_sql,
            value_limit: self.value_limit,
            logs: &self.logs,
        }
    }

    /// Run `f` in a transaction: committed if it succeeds, rolled back if it
    /// fails or panics (a panic is the module's trap).
    fn in_transaction<T, E>(&self, f: impl FnOnce(&Context) -> Result<T, E>) -> Result<T, E> {
        self.conn.execute_batch("BEGIN").expect("begin a transaction");
        let mut end = EndOnDrop { conn: &self.conn, sql: "ROLLBACK" };
        let backend = self.backend();
        let result = f(&Context::new(&backend));
        if result.is_ok() {
            end.sql = "COMMIT";
        }
        result
    }
}

impl<P: Projection> Default for Harness<P> {
    fn default() -> Self {
        Self::new()
    }
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
    guest_sql: &'a AtomicBool,
    value_limit: usize,
    logs: &'a RefCell<Vec<(Level, String)>>,
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

    fn check_params(&self, params: &[Value]) {
        for value in params {
            match value {
                Value::Text(s) => self.check_size("an SQL text parameter", s.len()),
                Value::Blob(b) => self.check_size("an SQL blob parameter", b.len()),
                _ => {}
            }
        }
    }

    /// Prepare `statement` as the guest's and run `f` on it with the guest's
    /// rules on.
    fn as_guest<T>(
        &self,
        statement: &str,
        f: impl FnOnce(&mut rusqlite::CachedStatement<'_>) -> Result<T, String>,
    ) -> Result<T, String> {
        let in_transaction = !self.conn.is_autocommit();
        self.guest_sql.store(true, Ordering::Relaxed);
        let result = self
            .conn
            .prepare_cached(&format!("{GUEST_SQL_PREFIX}{statement}"))
            .map_err(|err| err.to_string())
            .and_then(|mut stmt| f(&mut stmt));
        self.guest_sql.store(false, Ordering::Relaxed);
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
        result
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
    fn execute(&self, statement: &str, params: &[Value]) -> Result<u64, String> {
        self.check_params(params);
        self.as_guest(statement, |stmt| {
            let readonly = stmt.readonly();
            // Step through any rows (`RETURNING`) so every statement runs whole.
            let mut rows = stmt.query(params_from_iter(params)).map_err(|err| err.to_string())?;
            while rows.next().map_err(|err| err.to_string())?.is_some() {}
            Ok(if readonly { 0 } else { self.conn.changes() })
        })
    }
    fn query(&self, statement: &str, params: &[Value]) -> Result<Rows, String> {
        self.check_params(params);
        self.as_guest(statement, |stmt| collect_rows(stmt, params))
    }
    fn log(&self, level: Level, message: &str, _position: Option<u64>) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
}

fn collect_rows(stmt: &mut rusqlite::Statement<'_>, params: &[Value]) -> Result<Rows, String> {
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    let width = columns.len();
    let mut rows = stmt.query(params_from_iter(params)).map_err(|err| err.to_string())?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|err| err.to_string())? {
        let values = (0..width)
            .map(|i| row.get_ref(i).map(from_value_ref))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| err.to_string())?;
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

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Integer(n) => ValueRef::Integer(*n),
            Value::Real(x) => ValueRef::Real(*x),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
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
