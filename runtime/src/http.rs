//! The HTTP API that `projector run` serves (axum, loopback by default):
//! status, reads (state by key, the guest's `query`, read-only SQL), ingest,
//! dead letters, pause/resume, `/metrics`, and the status page at `/`.
//!
//! SQLite and wasm never run on tokio's async threads: quick reads (a state
//! key, a guest `query`) run in `block_in_place` on the thread the request
//! arrived on, other work on the blocking pool, and ingest parsing on a
//! thread of its own at bulk priority (see [`crate::priority`]). Each read
//! runs on connections and instances of its own, so serving never waits for
//! a batch. Every error is a JSON
//! `{"error": …}` — a 4xx for the caller's mistake, a 5xx for the host's
//! own failure — and changes nothing.
//!
//! The read connections are shared between requests, so nothing a request
//! sends may change them: `/sql` runs one read-only statement under an
//! authorizer and a time limit, and a connection (or query instance) that
//! is left in a transaction or that failed is dropped rather than pooled.

use crate::cloudevents;
use crate::config::Config;
use crate::dead_letters::{self, Selection};
use crate::engine::{Engines, Limits};
use crate::event_log::{EventLog, NewEvent, validate_stream_name};
use crate::guest_host::GuestHost;
use crate::inspect;
use crate::instance::{GuestInstance, QueryOutcome};
use crate::live::LiveProjection;
use crate::metrics::Metrics;
use crate::projection_db;
use crate::supervisor::HostView;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, ErrorCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long one `/sql` statement may run before SQLite interrupts it. The
/// endpoint serves short reads; a runaway query (a `WITH RECURSIVE` with no
/// end, a cross join of big tables) would otherwise hold a blocking thread
/// and a read connection for good. Long analyses belong on a copy of the
/// database (`projector query --sql` reads the files directly).
const SQL_TIME_LIMIT: Duration = Duration::from_secs(5);

/// SQLite calls the progress handler every this many VM steps: often enough
/// to stop within milliseconds of the limit, rarely enough to cost nothing.
const SQL_PROGRESS_STEPS: i32 = 10_000;

/// Everything the handlers share.
pub struct Api {
    view: Arc<RwLock<HostView>>,
    log: Arc<EventLog>,
    engines: Engines,
    metrics: Arc<Metrics>,
    served: Mutex<HashMap<String, Arc<Served>>>,
    max_body: usize,
}

/// One projection, as the API serves it.
struct Served {
    live: Arc<LiveProjection>,
    limits: Limits,
    database: PathBuf,
    /// Idle read-only connections for state by key and SQL; one per
    /// concurrent reader at most, so reads never queue behind each other.
    reads: Mutex<Vec<Connection>>,
    /// Idle read-only instances for the guest's `query`, likewise.
    queries: Mutex<Vec<GuestInstance>>,
}

impl Api {
    /// The API over a running host's pieces; request bodies over
    /// `max_body` bytes are refused.
    pub fn new(
        view: Arc<RwLock<HostView>>,
        log: Arc<EventLog>,
        engines: Engines,
        metrics: Arc<Metrics>,
        max_body: usize,
    ) -> Self {
        Api { view, log, engines, metrics, served: Mutex::new(HashMap::new()), max_body }
    }

    /// The config in force.
    fn config(&self) -> Config {
        self.view.read().unwrap_or_else(|e| e.into_inner()).config.clone()
    }
}

/// The routes.
pub fn router(api: Arc<Api>) -> Router {
    let max_body = api.max_body;
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .route("/projections", get(list_projections))
        .route("/projections/{name}", get(get_projection))
        .route("/projections/{name}/state/{*key}", get(get_state))
        .route("/projections/{name}/query", post(query))
        .route("/projections/{name}/sql", post(sql))
        .route("/projections/{name}/dead-letters", get(list_dead_letters))
        .route("/projections/{name}/dead-letters/retry", post(retry_dead_letters))
        .route("/projections/{name}/dead-letters/discard", post(discard_dead_letters))
        .route("/projections/{name}/pause", post(pause))
        .route("/projections/{name}/resume", post(resume))
        .route("/projections/{name}/rebuild", post(request_rebuild))
        .route("/streams/{stream}/events", post(ingest))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see the README's HTTP API")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(api)
}

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}"))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError::new(rejection.status(), rejection.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let message = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                "the request body is over the server's limit (--max-body-kib)".into()
            }
            _ => rejection.body_text(),
        };
        ApiError::new(rejection.status(), message)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Run blocking work (SQLite, wasm) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| ApiError::from(anyhow::anyhow!("a handler panicked: {err}")))?
}

/// Serve a quick read (a state key, a guest `query`: SQLite and wasm,
/// ~0.1–0.2 ms) on the thread the request arrived on, tokio handing this
/// worker's other tasks to another thread meanwhile (`block_in_place`).
/// Sent to the blocking pool instead, a read waits on two thread hand-offs,
/// and on a busy machine each can wait out a whole scheduler slice: that was
/// most of the p99 under ingest.
fn read<T>(f: impl FnOnce() -> ApiResult<T>) -> ApiResult<T> {
    tokio::task::block_in_place(f)
}

/// Run bulk work (parsing and appending an ingest) on a thread of its own at
/// bulk priority, so it never holds a core a read is waiting for.
async fn bulk<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || {
            crate::priority::lower_current_thread();
            let _ = done.send(f());
        })
        .map_err(|err| ApiError::from(anyhow::anyhow!("cannot start an ingest thread: {err}")))?;
    result.await.map_err(|_| ApiError::from(anyhow::anyhow!("an ingest handler panicked")))?
}

impl Api {
    /// The running projection `name`, with its read pools (fresh ones when
    /// it was restarted since).
    ///
    /// It reads the projection's pointer file, so it is blocking work: call
    /// it inside [`blocking`] or [`read`].
    fn served(&self, name: &str) -> ApiResult<Arc<Served>> {
        let (live, limits, config) = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            let (Some(live), Ok(p)) = (view.projections.get(name), view.config.projection(name)) else {
                let known: Vec<&str> = view.projections.keys().map(String::as_str).collect();
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no projection named {name:?}; there are: {}", known.join(", ")),
                ));
            };
            (live.clone(), view.config.limits(p), view.config.clone())
        };
        // The pointer file is read with no lock held, so a slow disk holds
        // up this request only.
        let database = config.database_path(name);
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        // A restarted projection, or a rebuilt one (a new database file):
        // fresh pools.
        let current =
            served.get(name).filter(|s| Arc::ptr_eq(&s.live, &live) && s.database == database).cloned();
        Ok(current.unwrap_or_else(|| {
            let fresh = Arc::new(Served {
                live,
                limits,
                database,
                reads: Mutex::new(Vec::new()),
                queries: Mutex::new(Vec::new()),
            });
            served.insert(name.to_string(), fresh.clone());
            fresh
        }))
    }

    /// `projector status`'s objects, with the live rate, pause and last error.
    fn statuses(&self) -> ApiResult<Vec<Value>> {
        let statuses = inspect::status(&self.config())?;
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        Ok(statuses
            .into_iter()
            .map(|status| {
                let mut value = serde_json::to_value(&status).expect("a status serializes");
                if let (Some(live), Value::Object(object)) = (view.projections.get(&status.name), &mut value)
                {
                    object.insert("events_per_second".into(), json!(live.events_per_second().round()));
                    object.insert("last_error".into(), json!(live.last_error()));
                }
                value
            })
            .collect())
    }

    /// Run `f` on one of `name`'s pooled read connections (only reads get
    /// past their authorizer).
    fn with_reads<T>(&self, name: &str, f: impl FnOnce(&mut Connection) -> ApiResult<T>) -> ApiResult<T> {
        let served = self.served(name)?;
        let idle = served.reads.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut db = match idle {
            Some(db) => db,
            None => {
                let mut db = open_reads(name, &served.database)?;
                db.authorizer(Some(reads_only)).map_err(anyhow::Error::from)?;
                db
            }
        };
        let result = f(&mut db);
        // A connection inside a transaction would pin an old snapshot for
        // every later read and keep the WAL from being checkpointed.
        if db.is_autocommit() {
            served.reads.lock().unwrap_or_else(|e| e.into_inner()).push(db);
        } else {
            tracing::warn!(projection = name, "a read connection was left in a transaction; dropped");
        }
        result
    }

    fn call_query(&self, name: &str, request: &[u8]) -> ApiResult<QueryOutcome> {
        let served = self.served(name)?;
        let module = served.live.module().ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("projection {name:?} has not started"))
        })?;
        let idle = served.queries.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // An instance of an older module is dropped, not reused.
        let mut instance = match idle.filter(|q| q.module().sha256 == module.sha256) {
            Some(instance) => instance,
            None => {
                let db = open_reads(name, &served.database)?;
                let host = GuestHost::new(db, name.into(), served.limits)?;
                // The module was compiled by the projection's engine.
                let engine = self.engines.for_limits(&served.limits)?;
                GuestInstance::reader(engine, module, host)?
            }
        };
        // An Err is the host failing mid-call: the instance may be left
        // anywhere (inside its read transaction, say), so it is dropped. A
        // trapped one was already re-made and is as good as new.
        let outcome = instance.query(request)?;
        if instance.db().is_autocommit() {
            served.queries.lock().unwrap_or_else(|e| e.into_inner()).push(instance);
        }
        Ok(outcome)
    }
}

/// The authorizer of the connections serving state and `/sql`: read tables
/// and call functions, nothing else. Writes, `ATTACH`/`DETACH`, pragmas and
/// transaction control are refused when the statement is prepared, so no
/// request can change a pooled connection for the next one.
fn reads_only(context: AuthContext<'_>) -> Authorization {
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

/// The SQLite error code somewhere in `err`'s chain, if any.
fn sqlite_code(err: &anyhow::Error) -> Option<ErrorCode> {
    err.chain().find_map(|cause| cause.downcast_ref::<rusqlite::Error>()?.sqlite_error_code())
}

/// The refusal of a statement that is not a plain read.
fn read_only_refusal(sql: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{sql:?} is not a read: the SQL endpoint is read-only (one SELECT or WITH statement; no \
         writes, ATTACH, pragmas or transactions)"
    ))
}

/// Run one read-only statement under [`SQL_TIME_LIMIT`].
fn read_only_rows(db: &mut Connection, sql: &str) -> ApiResult<Vec<Value>> {
    let deadline = Instant::now() + SQL_TIME_LIMIT;
    db.progress_handler(SQL_PROGRESS_STEPS, Some(move || Instant::now() >= deadline))
        .map_err(anyhow::Error::from)?;
    let rows = rows_of(db, sql);
    db.progress_handler(0, None::<fn() -> bool>).map_err(anyhow::Error::from)?;
    rows
}

fn rows_of(db: &Connection, sql: &str) -> ApiResult<Vec<Value>> {
    let mut stmt = match db.prepare(sql) {
        Ok(stmt) => stmt,
        Err(err) if err.sqlite_error_code() == Some(ErrorCode::AuthorizationForStatementDenied) => {
            return Err(read_only_refusal(sql));
        }
        Err(err) => return Err(ApiError::bad_request(format!("invalid query {sql:?}: {err}"))),
    };
    // The authorizer already stops writes; this is the second lock.
    if !stmt.readonly() {
        return Err(read_only_refusal(sql));
    }
    inspect::statement_rows(&mut stmt, sql).map_err(|err| match sqlite_code(&err) {
        Some(ErrorCode::OperationInterrupted) => ApiError::bad_request(format!(
            "the query ran over {} s and was stopped; the SQL endpoint serves short reads: add a \
             LIMIT or a narrower WHERE, or use `projector query --sql` on the host",
            SQL_TIME_LIMIT.as_secs()
        )),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{err:#}; try again"))
        }
        _ => ApiError::bad_request(format!("{err:#}")),
    })
}

/// A dead-letter operation's failure after the request was checked: the
/// host's (a busy database, a module that cannot load, I/O), so a 5xx —
/// except a dead letter that a concurrent request removed meanwhile.
fn dead_letter_failure(err: anyhow::Error) -> ApiError {
    match sqlite_code(&err) {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{err:#}; the projection's database is busy, try again"),
        ),
        _ if err.root_cause().to_string().contains("has no dead letter with id") => {
            ApiError::new(StatusCode::CONFLICT, format!("{err:#}"))
        }
        _ => ApiError::from(err),
    }
}

/// The caller's mistakes in a dead-letter request, found before acting:
/// no ids, or ids that are not dead letters of `name`.
fn check_ids(config: &Config, name: &str, ids: &[String]) -> ApiResult<()> {
    if ids.is_empty() {
        return Err(ApiError::bad_request(
            "name the dead letters in \"ids\" (their event ids); retry also takes \"all\": true",
        ));
    }
    let letters = dead_letters::list(config, name).map_err(dead_letter_failure)?;
    let missing: Vec<&str> =
        ids.iter().filter(|id| !letters.iter().any(|l| &l.id == *id)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!(
            "projection {name:?} has no dead letter with id {}; GET /projections/{name}/dead-letters \
             lists them",
            missing.join(", ")
        )));
    }
    Ok(())
}

fn open_reads(name: &str, database: &std::path::Path) -> ApiResult<Connection> {
    projection_db::open_read_only(database)?.ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("projection {name:?} has no database yet"))
    })
}

async fn status_page() -> Html<&'static str> {
    Html(include_str!("status_page.html"))
}

async fn metrics(State(api): State<Arc<Api>>) -> ApiResult<Response> {
    let text = blocking(move || {
        for status in inspect::status(&api.config())? {
            let label = Metrics::label(&status.name);
            api.metrics.lag.get_or_create(&label).set(status.lag as i64);
            api.metrics.dead_letters.get_or_create(&label).set(status.dead_letters as i64);
        }
        Ok(api.metrics.encode())
    })
    .await?;
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

async fn list_projections(State(api): State<Arc<Api>>) -> ApiResult<axum::Json<Vec<Value>>> {
    blocking(move || api.statuses().map(axum::Json)).await
}

async fn get_projection(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    blocking(move || {
        api.served(&name)?;
        let status = api.statuses()?.into_iter().find(|s| s["name"] == name.as_str());
        Ok(axum::Json(status.expect("a configured projection has a status")))
    })
    .await
}

async fn get_state(
    State(api): State<Arc<Api>>,
    Path((name, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    read(move || {
        let value: Option<Vec<u8>> = api.with_reads(&name, |db| {
            let mut stmt = db
                .prepare_cached("SELECT value FROM projector_kv WHERE key = ?1")
                .map_err(anyhow::Error::from)?;
            let mut rows = stmt.query([&key]).map_err(anyhow::Error::from)?;
            Ok(rows
                .next()
                .map_err(anyhow::Error::from)?
                .map(|row| row.get(0))
                .transpose()
                .map_err(anyhow::Error::from)?)
        })?;
        let value = value.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, format!("projection {name:?} has no state key {key:?}"))
        })?;
        Ok(bytes_response(value))
    })
}

/// Bytes as JSON when they are JSON, else as octet-stream.
fn bytes_response(bytes: Vec<u8>) -> Response {
    let content_type = if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    };
    ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
}

async fn query(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body?;
    read(move || match api.call_query(&name, &body)? {
        QueryOutcome::Answer(answer) => Ok(bytes_response(answer)),
        QueryOutcome::Refused(reason) => Err(ApiError::bad_request(reason)),
        QueryOutcome::Trapped(reason) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason)),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
}

async fn sql(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    request: Result<axum::Json<SqlRequest>, JsonRejection>,
) -> ApiResult<axum::Json<Vec<Value>>> {
    let axum::Json(request) = request?;
    blocking(move || api.with_reads(&name, |db| read_only_rows(db, &request.sql).map(axum::Json))).await
}

async fn list_dead_letters(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    blocking(move || {
        api.served(&name)?;
        Ok(axum::Json(serde_json::to_value(dead_letters::list(&api.config(), &name)?).expect("serializes")))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterRequest {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

async fn retry_dead_letters(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    request: Result<axum::Json<DeadLetterRequest>, JsonRejection>,
) -> ApiResult<axum::Json<Value>> {
    let axum::Json(request) = request?;
    blocking(move || {
        api.served(&name)?;
        let config = api.config();
        let selection = if request.all {
            Selection::All
        } else {
            check_ids(&config, &name, &request.ids)?;
            Selection::Ids(request.ids)
        };
        let outcome = dead_letters::retry(&config, &name, &selection).map_err(dead_letter_failure)?;
        Ok(axum::Json(serde_json::to_value(outcome).expect("serializes")))
    })
    .await
}

async fn discard_dead_letters(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    request: Result<axum::Json<DeadLetterRequest>, JsonRejection>,
) -> ApiResult<axum::Json<Value>> {
    let axum::Json(request) = request?;
    blocking(move || {
        api.served(&name)?;
        if request.all {
            return Err(ApiError::bad_request(
                "discard removes dead letters for good, so it takes their \"ids\", not \"all\"",
            ));
        }
        let config = api.config();
        check_ids(&config, &name, &request.ids)?;
        let discarded = dead_letters::discard(&config, &name, &request.ids).map_err(dead_letter_failure)?;
        Ok(axum::Json(json!({ "discarded": discarded })))
    })
    .await
}

async fn pause(State(api): State<Arc<Api>>, Path(name): Path<String>) -> ApiResult<axum::Json<Value>> {
    blocking(move || api.served(&name)).await?.live.set_paused(true);
    Ok(axum::Json(json!({ "paused": true })))
}

async fn resume(State(api): State<Arc<Api>>, Path(name): Path<String>) -> ApiResult<axum::Json<Value>> {
    blocking(move || api.served(&name)).await?.live.set_paused(false);
    Ok(axum::Json(json!({ "paused": false })))
}

async fn request_rebuild(State(api): State<Arc<Api>>, Path(name): Path<String>) -> ApiResult<Response> {
    blocking(move || {
        api.served(&name)?;
        Ok(crate::rebuild::request(&api.config(), &name)?)
    })
    .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(json!({ "rebuild": "requested" }))).into_response())
}

async fn ingest(
    State(api): State<Arc<Api>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = body?;
    validate_stream_name(&stream).map_err(|err| ApiError::bad_request(format!("{err:#}")))?;
    let content_type =
        headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let correlation_id = request_id.clone();
    // Parsing a large body is CPU work: off the async threads, like the append.
    let outcome = bulk(move || {
        let mut events = parse_body(&content_type, &body)?;
        cloudevents::fill_correlation_ids(&mut events, &correlation_id);
        Ok(api.log.append(&stream, &events)?)
    })
    .await?;
    let mut response = axum::Json(outcome).into_response();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    Ok(response)
}

/// The events of an ingest request, by its content type; all or nothing.
fn parse_body(content_type: &str, body: &[u8]) -> ApiResult<Vec<NewEvent>> {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let text = std::str::from_utf8(body)
        .map_err(|err| ApiError::bad_request(format!("the body is not UTF-8: {err}")))?;
    match essence.as_str() {
        "application/cloudevents+json" => cloudevents::parse_event(text)
            .map(|event| vec![event])
            .map_err(|err| ApiError::bad_request(format!("request body: {err}"))),
        "application/cloudevents-batch+json" => {
            let items: Vec<Value> = serde_json::from_str(text).map_err(|err| {
                ApiError::bad_request(format!("request body: expected a JSON array of CloudEvents: {err}"))
            })?;
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    match item {
                        Value::Object(object) => cloudevents::from_object(object),
                        _ => Err(cloudevents::CloudEventError::NotAnEvent("expected a JSON object".into())),
                    }
                    .map_err(|err| ApiError::bad_request(format!("request body: event {}: {err}", i + 1)))
                })
                .collect()
        }
        "application/x-ndjson" => cloudevents::parse_lines(text, "request body")
            .map_err(|err| ApiError::bad_request(err.to_string())),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported content type {content_type:?}; send application/cloudevents+json (one event), \
                 application/cloudevents-batch+json (a JSON array) or application/x-ndjson (one event per line)"
            ),
        )),
    }
}
