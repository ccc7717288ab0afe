//! The HTTP API that `projector run` serves (axum, loopback by default):
//! status, reads (state by key, the guest's `query`, read-only SQL), ingest,
//! dead letters, pause/resume, `/metrics`, and the status page at `/`.
//!
//! SQLite and wasm run on tokio's blocking pool, each read on connections
//! and instances of its own, so serving never waits for a batch and never
//! slows processing beyond sharing the CPU. Every error is a JSON
//! `{"error": …}` with a 4xx for a bad request, and changes nothing.

use crate::cloudevents;
use crate::config::Config;
use crate::dead_letters::{self, Selection};
use crate::engine::{Limits, ProjectorEngine};
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
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// Everything the handlers share.
pub struct Api {
    view: Arc<RwLock<HostView>>,
    log: Arc<EventLog>,
    engine: Arc<ProjectorEngine>,
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
        engine: Arc<ProjectorEngine>,
        metrics: Arc<Metrics>,
        max_body: usize,
    ) -> Self {
        Api { view, log, engine, metrics, served: Mutex::new(HashMap::new()), max_body }
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

impl Api {
    /// The running projection `name`, with its read pools (fresh ones when
    /// it was restarted since).
    fn served(&self, name: &str) -> ApiResult<Arc<Served>> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let (Some(live), Ok(p)) = (view.projections.get(name), view.config.projection(name)) else {
            let known: Vec<&str> = view.projections.keys().map(String::as_str).collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no projection named {name:?}; there are: {}", known.join(", ")),
            ));
        };
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        // A restarted projection, or a rebuilt one (a new database file):
        // fresh pools.
        let database = view.config.database_path(name);
        let current =
            served.get(name).filter(|s| Arc::ptr_eq(&s.live, live) && s.database == database).cloned();
        Ok(current.unwrap_or_else(|| {
            let fresh = Arc::new(Served {
                live: live.clone(),
                limits: view.config.limits(p),
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

    fn with_reads<T>(&self, name: &str, f: impl FnOnce(&Connection) -> ApiResult<T>) -> ApiResult<T> {
        let served = self.served(name)?;
        let idle = served.reads.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let db = match idle {
            Some(db) => db,
            None => open_reads(name, &served.database)?,
        };
        let result = f(&db);
        served.reads.lock().unwrap_or_else(|e| e.into_inner()).push(db);
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
                GuestInstance::reader(self.engine.clone(), module, host)?
            }
        };
        let outcome = instance.query(request);
        served.queries.lock().unwrap_or_else(|e| e.into_inner()).push(instance);
        Ok(outcome?)
    }
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
    blocking(move || {
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
    .await
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
    blocking(move || match api.call_query(&name, &body)? {
        QueryOutcome::Answer(answer) => Ok(bytes_response(answer)),
        QueryOutcome::Refused(reason) => Err(ApiError::bad_request(reason)),
        QueryOutcome::Trapped(reason) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason)),
    })
    .await
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
    blocking(move || {
        api.with_reads(&name, |db| {
            inspect::rows_json(db, &request.sql)
                .map(axum::Json)
                .map_err(|err| ApiError::bad_request(format!("{err:#}")))
        })
    })
    .await
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
        let selection = if request.all { Selection::All } else { Selection::Ids(request.ids) };
        let outcome = dead_letters::retry(&api.config(), &name, &selection)
            .map_err(|err| ApiError::bad_request(format!("{err:#}")))?;
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
        let discarded = dead_letters::discard(&api.config(), &name, &request.ids)
            .map_err(|err| ApiError::bad_request(format!("{err:#}")))?;
        Ok(axum::Json(json!({ "discarded": discarded })))
    })
    .await
}

async fn pause(State(api): State<Arc<Api>>, Path(name): Path<String>) -> ApiResult<axum::Json<Value>> {
    api.served(&name)?.live.set_paused(true);
    Ok(axum::Json(json!({ "paused": true })))
}

async fn resume(State(api): State<Arc<Api>>, Path(name): Path<String>) -> ApiResult<axum::Json<Value>> {
    api.served(&name)?.live.set_paused(false);
    Ok(axum::Json(json!({ "paused": false })))
}

async fn request_rebuild(State(api): State<Arc<Api>>, Path(name): Path<String>) -> ApiResult<Response> {
    api.served(&name)?;
    let config = api.config();
    blocking(move || Ok(crate::rebuild::request(&config, &name)?)).await?;
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
    let outcome = blocking(move || {
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
