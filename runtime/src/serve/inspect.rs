//! Reading what projections built, from the files: `status`, `query`, and
//! the JSON shapes of rows and key/value state. Everything here opens
//! databases read-only, so it works while `run` is processing.

use crate::config::paths::lock_path;
use crate::config::{Config, SourceNames};
use crate::projection::fault::{Fault, FaultFile};
use crate::sources::embedded::PARTITION;
use crate::store;
use anyhow::{Context as _, Result};
use base64::Engine as _;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Row, Statement};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::Path;

/// One projection's status, as `projector status` prints it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// sha256 of the running module (or, before the first run, of the file).
    pub module: Option<String>,
    /// The source it reads: `log` (the embedded log) or a `[sources]` name;
    /// a list of them for a projection reading several.
    pub source: SourceNames,
    /// Every event up to this position of its source has taken effect.
    pub checkpoint: u64,
    /// The source's last position (for a broker: as the running host last
    /// saw it).
    pub head: u64,
    /// Events after the checkpoint (for a broker: those it counts for the
    /// projection's filter).
    pub lag: u64,
    /// Whether the source answers, for a broker while a host runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// What an operator should know about the source (a stream whose oldest
    /// messages retention dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// A partitioned source's (Kafka's) partitions, each with its
    /// `position` (the next offset to read), `head` (high watermark) and
    /// `lag`, as the running host last saw them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Value>,
    /// `running`, `paused`, `rebuilding`, `connecting`, `stopped`,
    /// `faulted` or `new` (never run).
    pub state: String,
    /// Events parked as dead letters.
    pub dead_letters: u64,
    /// Events the projection emitted that wait in its outbox to be
    /// published (0 once published).
    pub outbox: u64,
    /// Why it faulted, if it did; for a projection reading several
    /// sources, which of them cannot be reached and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// While the module keeps asking to retry a batch: its first
    /// position, the attempts so far and the module's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrying: Option<Value>,
    /// The last module file refused (`module` sha256, `path`, `reason`),
    /// until a good module arrives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Value>,
    /// While a rebuild runs: the module building the new state, and how far
    /// it has got (`position` of `head`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuilding: Option<Value>,
}

/// The status of every projection in `config`. A projection whose
/// database cannot be read (damaged, unreadable) is `faulted` with the
/// reason; the others are read as usual.
pub fn status(config: &Config) -> Result<Vec<ProjectionStatus>> {
    let head = log_head(&config.data)?;
    let host_running = run_lock_held(&config.data);
    let dir = config.data.join("projections");
    Ok(config
        .projections
        .iter()
        .map(|p| {
            let read = read_status(config, p, head, host_running).unwrap_or_else(|err| ProjectionStatus {
                state: "faulted".into(),
                error: Some(format!("{err:#}")),
                ..never_run(p, head)
            });
            with_fault(read, FaultFile::new(&dir, &p.name).read())
        })
        .collect())
}

/// Projection `p`'s status as its database records it.
fn read_status(
    config: &Config,
    p: &crate::config::ProjectionConfig,
    head: u64,
    host_running: bool,
) -> Result<ProjectionStatus> {
    let mut path = config.database_path(&p.name);
    // A rebuild taking over points the projection at a new file and
    // removes the one read a moment ago: then read the new one.
    for _ in 0..3 {
        let read = status_at(p, &path, head, host_running);
        let now = config.database_path(&p.name);
        if now == path || matches!(read, Ok(Some(_))) {
            return read.map(|status| status.unwrap_or_else(|| never_run(p, head)));
        }
        path = now;
    }
    Ok(status_at(p, &path, head, host_running)?.unwrap_or_else(|| never_run(p, head)))
}

/// `status` as a recorded fault changes it: the fault file beside the
/// database outranks the database, which may be what failed (a full disk
/// cannot take the word `faulted`; a damaged file cannot give it).
fn with_fault(status: ProjectionStatus, fault: Option<Fault>) -> ProjectionStatus {
    let Some(fault) = fault else { return status };
    ProjectionStatus {
        state: if fault.rebuilding.is_some() { "rebuilding" } else { "faulted" }.into(),
        error: Some(fault.error),
        rebuilding: fault.rebuilding.or(status.rebuilding),
        retrying: None,
        ..status
    }
}

/// The status of a projection that has no database yet.
fn never_run(p: &crate::config::ProjectionConfig, head: u64) -> ProjectionStatus {
    ProjectionStatus {
        name: p.name.clone(),
        source: p.source.clone().unwrap_or_else(|| SourceNames::One(PARTITION.into())),
        module: file_sha256(&p.module),
        checkpoint: 0,
        head: if p.reads_log_only() { head } else { 0 },
        lag: if p.reads_log_only() { head } else { 0 },
        connected: None,
        warning: None,
        partitions: None,
        state: "new".into(),
        dead_letters: 0,
        outbox: 0,
        error: None,
        retrying: None,
        refused: None,
        rebuilding: None,
    }
}

/// A partition's progress as the source last reported it, brought up to
/// `position`, where its checkpoint is now: the report may be a second of
/// processing older.
fn caught_up_to(progress: &mut Value, position: u64) {
    if !progress.is_object() {
        return;
    }
    let number = |field: &str| progress[field].as_u64().unwrap_or(0);
    let position = number("position").max(position);
    let head = number("head").max(position);
    let lag = number("lag").min(head - position);
    progress["position"] = position.into();
    progress["head"] = head.into();
    progress["lag"] = lag.into();
}

/// The status recorded in projection `p`'s database at `path`; `None`
/// when there is none yet.
fn status_at(
    p: &crate::config::ProjectionConfig,
    path: &Path,
    head: u64,
    host_running: bool,
) -> Result<Option<ProjectionStatus>> {
    // A database `run` is creating this instant has no tables yet.
    let db = store::open_read_only(path)?.filter(|db| store::is_initialized(db).unwrap_or(false));
    let Some(db) = db else { return Ok(None) };
    let read = || -> Result<ProjectionStatus> {
        // A broker's head and lag are what the running host last saw.
        let report: Option<Value> = match p.reads_log_only() {
            false => store::meta(&db, "source")?.and_then(|text| serde_json::from_str(&text).ok()),
            true => None,
        };
        let key = match p.reads_log_only() {
            true => PARTITION.to_string(),
            false => store::meta(&db, "source_key")?.unwrap_or_default(),
        };
        let positions = store::checkpoint(&db, &key)?;
        let checkpoint = positions.total();
        // The report may predate the checkpoint by up to a second of
        // processing: the head is at least what was applied, and the lag it
        // saw cannot be more than what is left now.
        let head = match &report {
            Some(report) => report["head"].as_u64().unwrap_or(checkpoint).max(checkpoint),
            None if !p.reads_log_only() => checkpoint,
            None => head,
        };
        let lag = match &report {
            Some(report) => report["lag"].as_u64().unwrap_or(0).min(head.saturating_sub(checkpoint)),
            None => head.saturating_sub(checkpoint),
        };
        let recorded = store::meta(&db, "state")?.unwrap_or_else(|| "new".into());
        let rebuilding = match (recorded.as_str(), host_running) {
            ("running", true) => {
                store::meta(&db, "rebuilding")?.and_then(|text| serde_json::from_str(&text).ok())
            }
            _ => None,
        };
        // `running` and `paused` are what a live host records; with no
        // host holding the data folder (killed, say) neither is true.
        let state = match recorded.as_str() {
            "running" | "paused" | "connecting" if !host_running => "stopped".to_string(),
            "running" if rebuilding.is_some() => "rebuilding".to_string(),
            _ => recorded,
        };
        let dead_letters: i64 =
            db.query_row("SELECT count(*) FROM projector_dead_letters", [], |r| r.get(0))?;
        Ok(ProjectionStatus {
            name: p.name.clone(),
            source: p.source.clone().unwrap_or_else(|| SourceNames::One(PARTITION.into())),
            module: store::meta(&db, "module")?.or_else(|| file_sha256(&p.module)),
            checkpoint,
            head,
            lag,
            connected: report.as_ref().filter(|_| host_running).and_then(|r| r["connected"].as_bool()),
            warning: report.as_ref().and_then(|r| r["warning"].as_str().map(String::from)),
            partitions: report.as_ref().and_then(|r| r.get("partitions").cloned()).map(|mut partitions| {
                if let Value::Object(partitions) = &mut partitions {
                    for (name, progress) in partitions {
                        caught_up_to(progress, positions.position(name));
                    }
                }
                partitions
            }),
            error: match state.as_str() {
                "faulted" | "connecting" => store::meta(&db, "error")?,
                // One of several sources down: the projection runs on the
                // others, and says which cannot be reached.
                _ => report
                    .as_ref()
                    .filter(|r| host_running && r["connected"] == false)
                    .and_then(|r| r["error"].as_str().map(String::from)),
            },
            rebuilding,
            refused: store::meta(&db, "refused")?.and_then(|text| serde_json::from_str(&text).ok()),
            retrying: match state.as_str() {
                "running" | "rebuilding" => {
                    store::meta(&db, "retrying")?.and_then(|text| serde_json::from_str(&text).ok())
                }
                _ => None,
            },
            state,
            dead_letters: dead_letters as u64,
            outbox: store::outbox_len(&db)?,
        })
    };
    read()
        .map(Some)
        .map_err(|err| store::explain_damage(err, path))
        .with_context(|| format!("cannot read the status of {}", path.display()))
}

/// Run a read-only `sql` on projection `name`'s database.
pub fn query(config: &Config, name: &str, sql: &str) -> Result<Vec<Value>> {
    config.projection(name)?;
    let path = config.database_path(name);
    let mut db = store::open_read_only(&path)?.with_context(|| {
        format!("projection {name:?} has no database yet ({}); start `projector run` first", path.display())
    })?;
    db.authorizer(Some(reads_only))?;
    rows_json(&db, sql).with_context(|| format!("projection {name:?}"))
}

/// Why a statement given as a read was not run. Each is found before the
/// statement takes a single step, so nothing touched the disk.
#[derive(Debug, thiserror::Error)]
pub enum ReadRefused {
    /// Nothing but whitespace or comments.
    #[error("the SQL is empty; give one read-only statement, e.g. \"SELECT * FROM my_table LIMIT 10\"")]
    Empty,
    /// A write, `VACUUM`, `ATTACH`, a pragma or transaction control.
    #[error(
        "{0:?} is not a read: queries are read-only (one SELECT or WITH statement; no writes, \
         VACUUM, ATTACH, pragmas or transactions)"
    )]
    NotARead(String),
    /// SQLite could not prepare it (a syntax error, an unknown table, more
    /// than one statement).
    #[error("invalid query {sql:?}: {source}")]
    Invalid {
        /// The statement.
        sql: String,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
}

/// The authorizer of connections that serve reads: read tables and call
/// functions, nothing else. Writes, `ATTACH`/`DETACH`, pragmas and
/// transaction control are refused when the statement is prepared.
pub fn reads_only(context: AuthContext<'_>) -> Authorization {
    match context.action {
        AuthAction::Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
            Authorization::Deny
        }
        AuthAction::Select
        | AuthAction::Read { .. }
        | AuthAction::Function { .. }
        | AuthAction::Recursive => Authorization::Allow,
        _ => Authorization::Deny,
    }
}

/// Prepare `sql` on `db` as a read, refusing it before it runs unless it
/// is one statement that only reads. `db` should carry [`reads_only`]; the
/// check of the prepared statement is the second lock.
pub fn prepare_read<'c>(db: &'c Connection, sql: &str) -> Result<Statement<'c>, ReadRefused> {
    let stmt = match db.prepare(sql) {
        Ok(stmt) => stmt,
        Err(err) if err.sqlite_error_code() == Some(rusqlite::ErrorCode::AuthorizationForStatementDenied) => {
            return Err(ReadRefused::NotARead(sql.to_string()));
        }
        Err(source) => return Err(ReadRefused::Invalid { sql: sql.to_string(), source }),
    };
    // SQLite prepares no statement from text with none in it.
    if stmt.expanded_sql().is_none() {
        return Err(ReadRefused::Empty);
    }
    if !stmt.readonly() {
        return Err(ReadRefused::NotARead(sql.to_string()));
    }
    Ok(stmt)
}

/// The rows of the read-only `sql` as JSON objects keyed by column name;
/// blobs as base64. Anything but a read is refused before it runs (see
/// [`prepare_read`]).
pub fn rows_json(db: &Connection, sql: &str) -> Result<Vec<Value>> {
    let mut stmt = prepare_read(db, sql)?;
    statement_rows(&mut stmt, sql)
}

/// The rows of a prepared statement (whose text is `sql`), as [`rows_json`].
pub fn statement_rows(stmt: &mut Statement<'_>, sql: &str) -> Result<Vec<Value>> {
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    let mut rows = stmt.query([]).with_context(|| format!("query {sql:?} failed"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().with_context(|| format!("query {sql:?} failed"))? {
        out.push(row_json(row, &columns)?);
    }
    Ok(out)
}

/// One row as a JSON object keyed by `columns` (the statement's column
/// names); blobs as base64.
pub fn row_json(row: &Row<'_>, columns: &[String]) -> Result<Value> {
    let mut object = Map::new();
    for (i, column) in columns.iter().enumerate() {
        object.insert(column.clone(), value_json(row.get_ref(i)?));
    }
    Ok(Value::Object(object))
}

/// The key/value state as one JSON object: values that are JSON are
/// embedded, other UTF-8 as strings, anything else as `{"base64": …}`.
pub fn state_json(db: &Connection) -> Result<Value> {
    let mut stmt = db.prepare("SELECT key, value FROM projector_kv ORDER BY key")?;
    let mut rows = stmt.query([])?;
    let mut object = Map::new();
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        let bytes: Vec<u8> = row.get(1)?;
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| match String::from_utf8(bytes) {
            Ok(text) => Value::String(text),
            Err(err) => serde_json::json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(err.as_bytes())
            }),
        });
        object.insert(key, value);
    }
    Ok(Value::Object(object))
}

fn value_json(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => n.into(),
        ValueRef::Real(x) => x.into(),
        ValueRef::Text(s) => String::from_utf8_lossy(s).into(),
        ValueRef::Blob(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
    }
}

/// The event log's head, 0 if there is no log yet.
fn log_head(data: &Path) -> Result<u64> {
    let path = data.join("events.db");
    if !path.exists() {
        return Ok(0);
    }
    read_log_head(&path)
        .map_err(|err| crate::sources::embedded::explain(err, &path))
        .with_context(|| format!("cannot read event log {}", path.display()))
}

fn read_log_head(path: &Path) -> Result<u64> {
    let db = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    db.execute_batch("PRAGMA busy_timeout=5000;")?;
    let created: i64 = db.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        [],
        |row| row.get(0),
    )?;
    if created == 0 {
        // `run` or `append` is creating it this instant.
        return Ok(0);
    }
    let head: Option<i64> = db.query_row("SELECT max(position) FROM events", [], |row| row.get(0))?;
    Ok(head.unwrap_or(0) as u64)
}

/// Whether a `projector run` holds the data folder's lock.
pub fn run_lock_held(data: &Path) -> bool {
    match File::open(lock_path(data)) {
        Ok(file) => file.try_lock_shared().is_err(),
        Err(_) => false,
    }
}

fn file_sha256(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|bytes| hex::encode(Sha256::digest(bytes)))
}

/// Call projection `name`'s `query` export with `request`, on a read-only
/// instance over a read-only connection (works while `run` is running).
pub fn guest_query(config: &Config, name: &str, request: &[u8]) -> Result<Vec<u8>> {
    use crate::sandbox::engine::ProjectorEngine;
    use crate::sandbox::host::GuestHost;
    use crate::sandbox::instance::{GuestInstance, QueryOutcome};
    let projection = config.projection(name)?;
    let limits = config.limits(projection);
    let path = config.database_path(name);
    let db = store::open_read_only(&path)?.with_context(|| {
        format!("projection {name:?} has no database yet ({}); start `projector run` first", path.display())
    })?;
    let engine = std::sync::Arc::new(ProjectorEngine::new(limits.fuel.is_some())?);
    let module = engine.load_file(&projection.module)?;
    let mut instance = GuestInstance::reader(engine, module, GuestHost::new(db, name.into(), limits)?)?;
    match instance.query(request)? {
        QueryOutcome::Answer(answer) => Ok(answer),
        QueryOutcome::Refused(reason) => anyhow::bail!("projection {name:?} refused the query: {reason}"),
        QueryOutcome::Trapped(reason) => anyhow::bail!("projection {name:?} failed the query: {reason}"),
    }
}
