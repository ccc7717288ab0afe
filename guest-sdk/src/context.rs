//! [`Context`]: what a projection reaches in the host — its key/value
//! [`State`], [`Sql`] on its own database, the [`Log`], and
//! [`Context::emit`] to publish events in turn.
//!
//! Everything goes through one small [`Backend`] trait so that the same
//! projection code runs against the wasm imports in a module and against an
//! in-memory SQLite in native tests (where calling a wasm import would abort).

use crate::params::{Param, Params};
use crate::row::RowError;
use crate::{Event, Failure};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::sync::Arc;

/// What a [`Context`] calls: the world's imports in a module, SQLite in the
/// test harness.
#[doc(hidden)]
pub trait Backend {
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    fn set(&self, key: &str, value: &[u8]);
    fn delete(&self, key: &str);
    fn scan(&self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)>;
    fn execute(&self, statement: &str, params: &[Param<'_>]) -> Result<u64, String>;
    fn defer(&self, statement: &str, params: &[Param<'_>]) -> Result<(), String>;
    fn query(&self, statement: &str, params: &[Param<'_>]) -> Result<Rows, String>;
    fn log(&self, level: Level, message: &str, position: Option<u64>);
    fn emit(
        &self,
        stream: &str,
        event_type: &str,
        subject: Option<&str>,
        data: &[u8],
        position: u64,
        index: Option<u32>,
    ) -> Result<(), String>;
}

/// The projection's handle on the host during one call.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    backend: &'a dyn Backend,
    event: Option<&'a Event>,
}

impl<'a> Context<'a> {
    #[doc(hidden)]
    pub fn new(backend: &'a dyn Backend) -> Self {
        Context { backend, event: None }
    }
    /// This context, about `event`: log lines then carry the event's id and
    /// correlation id. The default [`crate::Projection::handle_batch`] does
    /// this for every event.
    pub fn for_event(&self, event: &'a Event) -> Context<'a> {
        Context { backend: self.backend, event: Some(event) }
    }
    /// Key/value state, values stored as JSON.
    pub fn state(&self) -> State<'a> {
        State { backend: self.backend }
    }
    /// SQL on the projection's own database.
    pub fn sql(&self) -> Sql<'a> {
        Sql { backend: self.backend }
    }
    /// The host's log; lines carry the projection and the event's ids.
    pub fn log(&self) -> Log<'a> {
        Log { backend: self.backend, position: self.event.map(Event::position) }
    }

    /// The event this context is about, if any (see [`Context::for_event`]).
    pub fn event(&self) -> Option<&'a Event> {
        self.event
    }

    /// Publish an event of `event_type` on `stream`, its data `data` as
    /// JSON, caused by the event being handled.
    ///
    /// It goes into the projection's outbox in the batch's transaction: it
    /// is published once if the batch commits, never if it fails. It
    /// carries the handled event's correlation id, that event's id as its
    /// causation id, `projector/<projection>` as its source, and an id made
    /// from the projection, the handled event's position and how many
    /// events this one emitted before it — so handling the same event again
    /// (a rebuild) emits the same ids.
    ///
    /// Call it on the context `handle` receives (or, in a
    /// [`crate::Projection::handle_batch`] of your own, on
    /// `ctx.for_event(event)`): without an event there is no cause, and it
    /// fails.
    ///
    /// ```
    /// # use projector_sdk::{Context, Event, Failure};
    /// # fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
    /// ctx.emit("charges", "order_charged", &serde_json::json!({"order_id": "o-1", "fee": 250}))?;
    /// # Ok(()) }
    /// ```
    pub fn emit<T: Serialize + ?Sized>(
        &self,
        stream: &str,
        event_type: &str,
        data: &T,
    ) -> Result<(), EmitError> {
        self.emit_event(stream, event_type, None, data)
    }

    /// [`Context::emit`], with a CloudEvents `subject` (what the event is
    /// about, e.g. the order's id).
    pub fn emit_with_subject<T: Serialize + ?Sized>(
        &self,
        stream: &str,
        event_type: &str,
        subject: &str,
        data: &T,
    ) -> Result<(), EmitError> {
        self.emit_event(stream, event_type, Some(subject), data)
    }

    fn emit_event<T: Serialize + ?Sized>(
        &self,
        stream: &str,
        event_type: &str,
        subject: Option<&str>,
        data: &T,
    ) -> Result<(), EmitError> {
        let fail = |message: String| EmitError {
            message: format!("emit of {event_type:?} on stream {stream:?}: {message}"),
        };
        let Some(event) = self.event else {
            return Err(fail(
                "no event being handled caused it: emit from `handle`, or in a handle_batch of your \
                 own on ctx.for_event(event)"
                    .to_string(),
            ));
        };
        let data = serde_json::to_vec(data).map_err(|err| fail(format!("the data is not JSON: {err}")))?;
        self.backend.emit(stream, event_type, subject, &data, event.position(), event.index).map_err(fail)
    }
}

/// An event that could not be emitted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmitError {
    message: String,
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EmitError {}

impl From<EmitError> for Failure {
    fn from(err: EmitError) -> Self {
        Failure::Reject(err.message)
    }
}

impl From<EmitError> for String {
    fn from(err: EmitError) -> Self {
        err.message
    }
}

/// Key/value state in the projection's own database.
#[derive(Clone, Copy)]
pub struct State<'a> {
    backend: &'a dyn Backend,
}

impl State<'_> {
    /// The value under `key`, deserialized from JSON.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        match self.backend.get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|err| StateError::new(key, err)),
        }
    }
    /// Store `value` under `key` as JSON.
    pub fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(value).map_err(|err| StateError::new(key, err))?;
        self.backend.set(key, &bytes);
        Ok(())
    }
    /// The raw bytes under `key`.
    pub fn get_bytes(&self, key: &str) -> Option<Vec<u8>> {
        self.backend.get(key)
    }
    /// Store raw bytes under `key`.
    pub fn set_bytes(&self, key: &str, value: &[u8]) {
        self.backend.set(key, value)
    }
    /// Remove `key`; removing a missing key does nothing.
    pub fn delete(&self, key: &str) {
        self.backend.delete(key)
    }
    /// Up to `limit` entries whose key starts with `prefix`, in key order,
    /// values deserialized from JSON.
    pub fn scan<T: DeserializeOwned>(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<(String, T)>, StateError> {
        self.backend
            .scan(prefix, limit)
            .into_iter()
            .map(|(key, bytes)| match serde_json::from_slice(&bytes) {
                Ok(value) => Ok((key, value)),
                Err(err) => Err(StateError::new(&key, err)),
            })
            .collect()
    }
    /// Up to `limit` raw entries whose key starts with `prefix`, in key order.
    pub fn scan_bytes(&self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        self.backend.scan(prefix, limit)
    }
}

/// A state value that did not (de)serialize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError {
    message: String,
}

impl StateError {
    fn new(key: &str, err: serde_json::Error) -> Self {
        StateError { message: format!("state key {key:?}: {err}") }
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StateError {}

impl From<StateError> for Failure {
    fn from(err: StateError) -> Self {
        Failure::Reject(err.message)
    }
}

impl From<StateError> for String {
    fn from(err: StateError) -> Self {
        err.message
    }
}

/// SQL on the projection's own database. Parameters are positional
/// (`?1`, `?2`, …): a tuple of plain values, [`crate::params!`], or `()`
/// for none (see [`Params`]).
#[derive(Clone, Copy)]
pub struct Sql<'a> {
    backend: &'a dyn Backend,
}

impl Sql<'_> {
    /// Run one statement; returns the number of rows changed.
    pub fn execute(&self, statement: &str, params: impl Params) -> Result<u64, SqlError> {
        params
            .with_params(|params| self.backend.execute(statement, params))
            .map_err(|message| SqlError { message })
    }
    /// Run one write without waiting for it: the host runs it on a
    /// thread of its own while the module goes on, so decoding the next
    /// event and SQLite's work on this one overlap. Deferred statements
    /// run in the order they were deferred, and before anything else the
    /// module does on its database (a query waits for them and sees their
    /// writes). `Err` here only when the statement cannot be prepared (bad
    /// SQL, a refused statement); a deferred statement that fails when it
    /// runs fails the whole call, as [`Failure::Reject`] with its error,
    /// whatever the module returns — the host then finds the event by
    /// splitting the batch. For the statements whose count of changed rows
    /// or `RETURNING` rows the module does not read.
    ///
    /// ```
    /// # use projector_sdk::{Context, Failure};
    /// # fn f(ctx: &Context, key: &str) -> Result<(), Failure> {
    /// ctx.sql().defer("INSERT INTO counts (key, n) VALUES (?1, 1) ON CONFLICT (key) DO UPDATE SET n = n + 1", (key,))?;
    /// # Ok(()) }
    /// ```
    pub fn defer(&self, statement: &str, params: impl Params) -> Result<(), SqlError> {
        params
            .with_params(|params| self.backend.defer(statement, params))
            .map_err(|message| SqlError { message })
    }
    /// Run one query and return its rows.
    pub fn query(&self, statement: &str, params: impl Params) -> Result<Rows, SqlError> {
        params
            .with_params(|params| self.backend.query(statement, params))
            .map_err(|message| SqlError { message })
    }
    /// Run one query and read every row into a `T`: a `serde` struct
    /// (columns by name), a tuple (columns in order) or, for one column, a
    /// plain value (see [`crate::Row::deserialize`]).
    ///
    /// ```
    /// # use projector_sdk::{Context, Failure};
    /// #[derive(serde::Deserialize)]
    /// struct User {
    ///     id: String,
    ///     email: Option<String>,
    /// }
    /// # fn f(ctx: &Context) -> Result<(), Failure> {
    /// let users: Vec<User> = ctx.sql().query_as("SELECT id, email FROM users WHERE age > ?1", (18,))?;
    /// let ids: Vec<String> = ctx.sql().query_as("SELECT id FROM users", ())?;
    /// # Ok(()) }
    /// ```
    pub fn query_as<T: DeserializeOwned>(
        &self,
        statement: &str,
        params: impl Params,
    ) -> Result<Vec<T>, SqlError> {
        let rows = self.query(statement, params)?;
        rows.deserialize().map_err(|err| SqlError::typed(statement, &err))
    }
    /// Run one query and read its first row into a `T`, if it returned
    /// any (see [`Sql::query_as`]).
    ///
    /// ```
    /// # use projector_sdk::{Context, Failure};
    /// # fn f(ctx: &Context) -> Result<(), Failure> {
    /// let balance: i64 = ctx.sql().query_first("SELECT balance FROM wallets WHERE id = ?1", ("w-1",))?.unwrap_or(0);
    /// # Ok(()) }
    /// ```
    pub fn query_first<T: DeserializeOwned>(
        &self,
        statement: &str,
        params: impl Params,
    ) -> Result<Option<T>, SqlError> {
        let rows = self.query(statement, params)?;
        rows.row(0).map(|row| row.deserialize()).transpose().map_err(|err| SqlError::typed(statement, &err))
    }
}

/// A statement the database refused, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    message: String,
}

impl SqlError {
    /// Rows of `statement` that did not fit the type asked for.
    fn typed(statement: &str, err: &RowError) -> Self {
        SqlError { message: format!("the rows of {:?} do not fit: {}", short(statement), err.message()) }
    }
}

/// `statement` on one line, cut to about 80 characters: enough to find it.
fn short(statement: &str) -> String {
    let one_line = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(79) {
        Some((end, _)) => format!("{}…", &one_line[..end]),
        None => one_line,
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sql: {}", self.message)
    }
}

impl std::error::Error for SqlError {}

impl From<SqlError> for Failure {
    fn from(err: SqlError) -> Self {
        Failure::Reject(err.to_string())
    }
}

impl From<SqlError> for String {
    fn from(err: SqlError) -> Self {
        err.to_string()
    }
}

/// A SQL parameter or column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// A 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    /// The text, if this is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
    /// The integer, if this is an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(n) => Some(*n),
            _ => None,
        }
    }
    /// The number, if this is a real or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Real(x) => Some(*x),
            Value::Integer(n) => Some(*n as f64),
            _ => None,
        }
    }
    /// The bytes, if this is a blob.
    pub fn as_blob(&self) -> Option<&[u8]> {
        match self {
            Value::Blob(b) => Some(b),
            _ => None,
        }
    }
    /// Whether this is `NULL`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Integer(n)
    }
}
impl From<i32> for Value {
    fn from(n: i32) -> Self {
        Value::Integer(n.into())
    }
}
impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Value::Integer(n.into())
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Integer(b.into())
    }
}
impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Real(x)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Text(s.clone())
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Blob(b)
    }
}
impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Self {
        Value::Blob(b.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The rows a query returned.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    columns: Arc<[String]>,
    rows: Vec<Vec<Value>>,
}

impl Rows {
    #[doc(hidden)]
    pub fn new(columns: impl Into<Arc<[String]>>, rows: Vec<Vec<Value>>) -> Self {
        Rows { columns: columns.into(), rows }
    }
    /// Column names, in select order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }
    /// How many rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// The rows, each a slice of values in column order.
    pub fn iter(&self) -> impl Iterator<Item = &[Value]> {
        self.rows.iter().map(Vec::as_slice)
    }
    /// The first row, if any.
    pub fn first(&self) -> Option<&[Value]> {
        self.rows.first().map(Vec::as_slice)
    }
    pub(crate) fn rows_raw(&self) -> &[Vec<Value>] {
        &self.rows
    }
}

/// How severe a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected but handled.
    Warn,
    /// Something failed.
    Error,
}

/// The host's log.
#[derive(Clone, Copy)]
pub struct Log<'a> {
    backend: &'a dyn Backend,
    position: Option<u64>,
}

impl Log<'_> {
    /// Write a line at `level`.
    pub fn write(&self, level: Level, message: &str) {
        self.backend.log(level, message, self.position)
    }
    /// Write a debug line.
    pub fn debug(&self, message: &str) {
        self.write(Level::Debug, message)
    }
    /// Write an info line.
    pub fn info(&self, message: &str) {
        self.write(Level::Info, message)
    }
    /// Write a warning.
    pub fn warn(&self, message: &str) {
        self.write(Level::Warn, message)
    }
    /// Write an error line.
    pub fn error(&self, message: &str) {
        self.write(Level::Error, message)
    }
}
