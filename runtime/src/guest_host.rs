//! [`GuestHost`]: the store data of a projection instance, and the host side
//! of the world's imports — `state`, `sql` and `log` on the projection's own
//! database.
//!
//! The guest runs inside a transaction the projection loop owns, so every
//! write here commits or rolls back with the checkpoint. The SQLite
//! authorizer keeps guest SQL inside that contract: no transaction control,
//! no ATTACH, no pragmas, no extension loading, and no access to the
//! runtime's own tables.
//!
//! It is also the store's resource limiter: memory, tables and instances are
//! capped by the projection's [`Limits`], and guest log lines are cut and
//! rate-limited, with a count of what was dropped.

use crate::bindings::{Event, Level, LogHost, Rows, SqlHost, StateHost, TypesHost, Value};
use crate::engine::Limits;
use anyhow::{Result, bail};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql, params_from_iter};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Tables the runtime owns inside a projection's database; the guest may
/// neither read nor write them (it could forge its checkpoint or hide its
/// dead letters). `projector_kv` is the guest's own key/value state.
pub const RUNTIME_TABLES: [&str; 3] = ["projector_checkpoints", "projector_dead_letters", "projector_meta"];

/// Prepended to every guest statement; see [`GuestHost::as_guest`].
const GUEST_SQL_PREFIX: &str = "/* guest */ ";

/// The store data of one projection instance.
pub struct GuestHost {
    db: Connection,
    projection: Arc<str>,
    guest_sql: Arc<AtomicBool>,
    /// The batch being handled, to attach event ids to guest log lines.
    batch: Vec<(u64, String, Option<String>)>,
    /// Set when an import failed because of the host (not the guest): the
    /// trap that follows is then the host's fault and must not dead-letter.
    host_error: Option<anyhow::Error>,
    limits: Limits,
    log_tokens: f64,
    log_refilled: Instant,
    log_dropped: u64,
}

impl GuestHost {
    /// Wrap the projection's database connection.
    pub fn new(mut db: Connection, projection: Arc<str>, limits: Limits) -> Result<Self> {
        let guest_sql = Arc::new(AtomicBool::new(false));
        let flag = guest_sql.clone();
        db.authorizer(Some(move |ctx: AuthContext<'_>| {
            if flag.load(Ordering::Relaxed) { authorize_guest(&ctx) } else { Authorization::Allow }
        }))?;
        db.set_prepared_statement_cache_capacity(256);
        Ok(GuestHost {
            db,
            projection,
            guest_sql,
            batch: Vec::new(),
            host_error: None,
            limits,
            log_tokens: limits.log_lines_per_second as f64,
            log_refilled: Instant::now(),
            log_dropped: 0,
        })
    }

    /// The limits this instance runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
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
        &self.db
    }

    /// The projection's name.
    pub fn projection(&self) -> &str {
        &self.projection
    }

    /// Remember the events of the batch about to be handled.
    pub fn set_batch(&mut self, events: &[Event]) {
        self.batch.clear();
        self.batch.extend(events.iter().map(|e| (e.position, e.id.clone(), e.correlation_id.clone())));
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

    /// Run `f` with the authorizer applying the guest's rules.
    ///
    /// Guest statements must be prepared as the guest's: the connection's
    /// statement cache is shared with the host, and a cached host statement
    /// (its `COMMIT`, its checkpoint update) was authorized as the host's.
    /// So every guest statement is prepared under [`GUEST_SQL_PREFIX`], which
    /// no host statement carries: a guest can never be handed one.
    fn as_guest<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        self.guest_sql.store(true, Ordering::Relaxed);
        let result = f(&self.db);
        self.guest_sql.store(false, Ordering::Relaxed);
        result
    }
}

fn authorize_guest(ctx: &AuthContext<'_>) -> Authorization {
    let runtime_table = |name: &str| RUNTIME_TABLES.iter().any(|t| name.eq_ignore_ascii_case(t));
    match ctx.action {
        AuthAction::Transaction { .. }
        | AuthAction::Savepoint { .. }
        | AuthAction::Attach { .. }
        | AuthAction::Detach { .. }
        | AuthAction::Pragma { .. }
        | AuthAction::CreateVtable { .. }
        | AuthAction::DropVtable { .. } => Authorization::Deny,
        AuthAction::Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
            Authorization::Deny
        }
        AuthAction::Read { table_name, .. }
        | AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name }
        | AuthAction::DropTable { table_name }
        | AuthAction::CreateTable { table_name }
        | AuthAction::AlterTable { table_name, .. }
        | AuthAction::CreateIndex { table_name, .. }
        | AuthAction::DropIndex { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
        | AuthAction::DropTrigger { table_name, .. }
            if runtime_table(table_name) =>
        {
            Authorization::Deny
        }
        _ => Authorization::Allow,
    }
}

impl TypesHost for GuestHost {}

impl StateHost for GuestHost {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>> {
        let result =
            self.db.prepare_cached("SELECT value FROM projector_kv WHERE key = ?1").and_then(|mut stmt| {
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
            .db
            .prepare_cached("INSERT OR REPLACE INTO projector_kv (key, value) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute((&key, &value)));
        result.map(drop).map_err(|err| self.host_failed(err))
    }

    fn delete(&mut self, key: String) -> Result<()> {
        let result = self
            .db
            .prepare_cached("DELETE FROM projector_kv WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute([&key]));
        result.map(drop).map_err(|err| self.host_failed(err))
    }

    fn scan(&mut self, prefix: String, limit: u32) -> Result<Vec<(String, Vec<u8>)>> {
        let result = self
            .db
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
        Ok(self.as_guest(|db| {
            let mut stmt = db
                .prepare_cached(&format!("{GUEST_SQL_PREFIX}{statement}"))
                .map_err(|err| err.to_string())?;
            let readonly = stmt.readonly();
            // Step through any rows (`RETURNING`) so every statement runs whole.
            let mut rows = stmt.query(params_from_iter(&params)).map_err(|err| err.to_string())?;
            while rows.next().map_err(|err| err.to_string())?.is_some() {}
            Ok(if readonly { 0 } else { db.changes() })
        }))
    }

    fn query(&mut self, statement: String, params: Vec<Value>) -> Result<Result<Rows, String>> {
        self.check_params(&params)?;
        Ok(self.as_guest(|db| {
            let mut stmt = db
                .prepare_cached(&format!("{GUEST_SQL_PREFIX}{statement}"))
                .map_err(|err| err.to_string())?;
            let columns: Vec<String> = stmt.column_names().map(String::from).collect();
            let width = columns.len();
            let mut rows = stmt.query(params_from_iter(&params)).map_err(|err| err.to_string())?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(|err| err.to_string())? {
                let mut values = Vec::with_capacity(width);
                for i in 0..width {
                    values.push(from_value_ref(row.get_ref(i).map_err(|err| err.to_string())?));
                }
                out.push(values);
            }
            Ok(Rows { columns, rows: out })
        }))
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
        let event = position.and_then(|p| {
            self.batch.binary_search_by_key(&p, |(position, _, _)| *position).ok().map(|i| &self.batch[i])
        });
        let (event_id, correlation_id) = match event {
            Some((_, id, correlation)) => (id.as_str(), correlation.as_deref().unwrap_or("")),
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
