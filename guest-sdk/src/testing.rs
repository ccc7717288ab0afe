//! A native test harness: runs a [`Projection`] against SQLite with the
//! host's state and SQL semantics, so projection logic is tested with plain
//! `cargo test` and no wasm.
//!
//! Like the host, the harness applies each batch in one transaction and
//! rolls back every write of a batch that fails.
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
use crate::{Event, Failure, Projection};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql, params_from_iter};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::path::Path;

/// The key/value table, as the host lays it out.
const KV_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS projector_kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID";

/// Runs a projection natively against SQLite.
pub struct Harness<P: Projection> {
    conn: Connection,
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
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536;")
            .map_err(|err| format!("{}: {err}", path.display()))?;
        Self::with_connection(conn)
    }

    fn with_connection(conn: Connection) -> Result<Self, String> {
        conn.set_prepared_statement_cache_capacity(256);
        conn.execute_batch(KV_SCHEMA).map_err(|err| err.to_string())?;
        let harness =
            Harness { conn, next_position: 1, logs: RefCell::new(Vec::new()), projection: PhantomData };
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

    /// Call the projection's `query`.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
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

    /// Run a query on the projection's database; panics on a bad statement.
    pub fn rows(&self, statement: &str) -> Rows {
        self.backend().query(statement, &[]).unwrap_or_else(|err| panic!("{statement}: {err}"))
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
        SqliteBackend { conn: &self.conn, logs: &self.logs }
    }

    fn in_transaction<T, E>(&self, f: impl FnOnce(&Context) -> Result<T, E>) -> Result<T, E> {
        self.conn.execute_batch("BEGIN").expect("begin a transaction");
        let backend = self.backend();
        let result = f(&Context::new(&backend));
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        self.conn.execute_batch(end).expect("end a transaction");
        result
    }
}

impl<P: Projection> Default for Harness<P> {
    fn default() -> Self {
        Self::new()
    }
}

struct SqliteBackend<'a> {
    conn: &'a Connection,
    logs: &'a RefCell<Vec<(Level, String)>>,
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
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO projector_kv (key, value) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute((key, value)))
            .expect("state set");
    }
    fn delete(&self, key: &str) {
        self.conn
            .prepare_cached("DELETE FROM projector_kv WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute([key]))
            .expect("state delete");
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
        let mut stmt = self.conn.prepare_cached(statement).map_err(|err| err.to_string())?;
        stmt.execute(params_from_iter(params)).map(|changed| changed as u64).map_err(|err| err.to_string())
    }
    fn query(&self, statement: &str, params: &[Value]) -> Result<Rows, String> {
        let mut stmt = self.conn.prepare_cached(statement).map_err(|err| err.to_string())?;
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
    fn log(&self, level: Level, message: &str, _position: Option<u64>) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
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
