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
//! authorizer, a time limit and caps on its answer, and a connection (or
//! query instance) that is left in a transaction or that failed is dropped
//! rather than pooled.
//!
//! Before any handler: the `Host` must be one the server answers to and an
//! `Origin`, if sent, its own (no DNS rebinding, no cross-site requests);
//! requests that change something, and `/sql`, carry the bearer token when
//! `[http] token_file` sets one; bodies must arrive within a time limit.
//! [`serve`] runs the connections itself, for the header and idle timeouts
//! and the connection cap that `axum::serve` does not offer.

use crate::config::validate_stream_name;
use crate::config::{Config, HttpConfig};
use crate::projection::dead_letters::{self, Selection};
use crate::projection::live::Command;
use crate::projection::live::LiveProjection;
use crate::projection::metrics::{Metrics, PartitionLabel};
use crate::projection::supervisor::HostView;
use crate::sandbox::engine::{Engines, Limits};
use crate::sandbox::host::GuestHost;
use crate::sandbox::instance::{GuestInstance, QueryOutcome};
use crate::serve::inspect;
use crate::sources::cloudevents;
use crate::sources::embedded::{EventLog, NewEvent};
use crate::store;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt as _;
use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
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

/// The longest request target (path and query) served, in bytes. Inputs
/// of any size go in a POST body.
const MAX_URI_BYTES: usize = 8 << 10;

/// How long `run` waits at shutdown for the requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Everything the handlers share.
pub struct Api {
    view: Arc<RwLock<HostView>>,
    log: Arc<EventLog>,
    engines: Engines,
    metrics: Arc<Metrics>,
    served: Mutex<HashMap<String, Arc<Served>>>,
    max_body: usize,
    body_timeout: Duration,
    access: Access,
    sql_limits: SqlLimits,
}

/// How `run` serves the API, besides the host's pieces.
pub struct ApiOptions {
    /// Request bodies over this many bytes are refused (413).
    pub max_body: usize,
    /// The address the API listens on, which `Host` is checked against.
    pub listen: SocketAddr,
    /// The config's `[http]` table.
    pub http: HttpConfig,
    /// The bearer token, when `[http] token_file` names one ([`load_token`]).
    pub token: Option<String>,
}

/// Who may call the API.
struct Access {
    listen: SocketAddr,
    /// `[http] hosts`, lowercase, without brackets.
    hosts: Vec<String>,
    /// sha256 of the bearer token: compared whole, so the time a comparison
    /// takes tells nothing about the token.
    token: Option<[u8; 32]>,
}

/// The caps on one `/sql` answer (`[http] sql_max_rows`, `sql_max_bytes`).
#[derive(Debug, Clone, Copy)]
struct SqlLimits {
    rows: usize,
    bytes: usize,
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
    /// The API over a running host's pieces.
    pub fn new(
        view: Arc<RwLock<HostView>>,
        log: Arc<EventLog>,
        engines: Engines,
        metrics: Arc<Metrics>,
        options: ApiOptions,
    ) -> Self {
        let http = options.http;
        Api {
            view,
            log,
            engines,
            metrics,
            served: Mutex::new(HashMap::new()),
            max_body: options.max_body,
            body_timeout: Duration::from_millis(http.body_timeout_ms),
            access: Access {
                listen: options.listen,
                hosts: http.hosts.iter().map(|h| host_name(h)).collect(),
                token: options.token.map(|t| Sha256::digest(t.as_bytes()).into()),
            },
            sql_limits: SqlLimits { rows: http.sql_max_rows as usize, bytes: http.sql_max_bytes as usize },
        }
    }

    /// The config in force.
    fn config(&self) -> Config {
        self.view.read().unwrap_or_else(|e| e.into_inner()).config.clone()
    }
}

/// The routes.
pub fn router(api: Arc<Api>) -> Router {
    let max_body = api.max_body;
    let open = Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .route("/projections", get(list_projections))
        .route("/projections/{name}", get(get_projection))
        .route("/projections/{name}/state/{*key}", get(get_state))
        .route("/projections/{name}/query", post(query))
        .route("/projections/{name}/dead-letters", get(list_dead_letters))
        .route_layer(middleware::from_fn_with_state(api.clone(), read_body));
    // Changes, and `/sql` (any read of any table): the token first, so no
    // body is read from a caller without it.
    let guarded = Router::new()
        .route("/projections/{name}/sql", post(sql))
        .route("/projections/{name}/dead-letters/retry", post(retry_dead_letters))
        .route("/projections/{name}/dead-letters/discard", post(discard_dead_letters))
        .route("/projections/{name}/pause", post(pause))
        .route("/projections/{name}/resume", post(resume))
        .route("/projections/{name}/rebuild", post(request_rebuild))
        .route("/streams/{stream}/events", post(ingest))
        .route_layer(middleware::from_fn_with_state(api.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    let routes = open
        .merge(guarded)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see the README's HTTP API")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(api.clone());
    // Around the whole router, not each route: the guard sees the answer
    // as sent, with the `Allow` header axum adds to a 405.
    Router::new().fallback_service(routes).layer(middleware::from_fn_with_state(api, guard))
}

/// Every request: a target of sane length, a `Host` this server answers
/// to, no foreign `Origin`; and JSON for a 405.
async fn guard(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!(
                "the request target is {target} bytes, over the limit of {MAX_URI_BYTES}; send large \
                 inputs in a POST body"
            ),
        )
        .into_response();
    }
    let checked = {
        let text = |name| request.headers().get(name).map(|v| v.to_str().unwrap_or("(not text)"));
        api.access.check_origin(text(header::HOST), text(header::ORIGIN))
    };
    if let Err(refusal) = checked {
        return refusal.into_response();
    }
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut refusal = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{path} does not take {method}; it takes {allow}"),
    )
    .into_response();
    if let Ok(allow) = HeaderValue::from_str(&allow) {
        refusal.headers_mut().insert(header::ALLOW, allow);
    }
    refusal
}

/// The routes that change something, and `/sql`: the bearer token, when
/// one is set.
async fn require_token(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    if request.method() == Method::POST
        && let Err(refusal) = api.access.check_token(request.headers())
    {
        let mut response = refusal.into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

/// Read the whole body within `[http] body_timeout_ms` and the size limit,
/// before the handler sees it: a client trickling its body holds nothing
/// but its own connection, and not for long.
async fn read_body(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over the server's limit of {} KiB (--max-body-kib)",
                api.max_body >> 10
            ),
        )
        .into_response()
    };
    let (parts, body) = request.into_parts();
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > api.max_body as u64) {
        return too_large();
    }
    let read =
        tokio::time::timeout(api.body_timeout, http_body_util::Limited::new(body, api.max_body).collect());
    let body = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(err)) => {
            return ApiError::bad_request(format!("cannot read the request body: {err}")).into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms ([http] body_timeout_ms)",
                    api.body_timeout.as_millis()
                ),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(body))).await
}

/// `host` (a `Host` header or an `[http] hosts` entry) without its port or
/// IPv6 brackets, lowercase.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Access {
    /// Whether the server answers to `Host: host`: the names in `[http]
    /// hosts`, its listen address, and, when it listens on loopback (or on
    /// every address), `localhost` and the loopback addresses. Listening on
    /// every address, any IP address: an address cannot be rebound, only a
    /// name can.
    fn answers_to(&self, host: &str) -> bool {
        let name = host_name(host);
        if self.hosts.contains(&name) {
            return true;
        }
        let listen = self.listen.ip();
        let local = listen.is_loopback() || listen.is_unspecified();
        match name.parse::<IpAddr>() {
            Ok(ip) => ip == listen || listen.is_unspecified() || (local && ip.is_loopback()),
            Err(_) => local && name == "localhost",
        }
    }

    /// Refuse a request for another host (a DNS-rebinding page) or from
    /// another site's page.
    fn check_origin(&self, host: Option<&str>, origin: Option<&str>) -> ApiResult<()> {
        let Some(host) = host else {
            return Err(ApiError::bad_request("the request has no Host header; send one naming this server"));
        };
        if !self.answers_to(host) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this server does not answer to Host {host:?}; if that is a name of this machine, \
                     add it to `hosts` in projector.toml's [http] table"
                ),
            ));
        }
        if let Some(origin) = origin {
            let own = ["http://", "https://"].iter().any(|scheme| {
                origin.len() == scheme.len() + host.len()
                    && origin[..scheme.len()].eq_ignore_ascii_case(scheme)
                    && origin[scheme.len()..].eq_ignore_ascii_case(host)
            });
            if !own {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "cross-origin request refused: Origin {origin:?} is not this server \
                         (http://{host}); the API answers its own status page and programs that \
                         send no Origin, never another site's pages"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuse a request without the bearer token, when one is set.
    fn check_token(&self, headers: &HeaderMap) -> ApiResult<()> {
        let Some(expected) = &self.token else { return Ok(()) };
        let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let Some(sent) = sent else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs the API token: send `Authorization: Bearer <token>` with the \
                 token in the file [http] token_file names (`projector … --url` sends it when its \
                 --config has one)",
            ));
        };
        if <[u8; 32]>::from(Sha256::digest(sent.as_bytes())) != *expected {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the API token sent is wrong; send the one in the file [http] token_file names",
            ));
        }
        Ok(())
    }
}

/// The bearer token in the file `[http] token_file` names, if any: one
/// line of at least 16 printable characters.
pub fn load_token(config: &Config) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    let Some(path) = &config.http.token_file else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the API token file {} ([http] token_file)", path.display()))?;
    let token = text.trim();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "the API token file {} must hold one token of at least 16 printable characters with no \
             spaces; make one with `openssl rand -hex 32 > {}`",
            path.display(),
            path.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            tracing::warn!(
                file = %path.display(),
                "the API token file can be read by other users; `chmod 600` it"
            );
        }
    }
    Ok(Some(token.to_string()))
}

/// Refuse a request that changes something unless it says its body is
/// JSON: a web page can send a plain-text or form POST to any site without
/// asking, but not a JSON one.
fn expect_json(headers: &HeaderMap) -> ApiResult<()> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "content type {content_type:?} refused: send `Content-Type: application/json` (the body \
             may be empty)"
        ),
    ))
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
    ///
    /// A rebuild taking over points the projection at a new database and
    /// removes the old one, maybe between reading the pointer and opening
    /// the file: a host failure then is tried again on the new one, so a
    /// read during a takeover is answered from the old state or the new.
    fn with_reads<T>(&self, name: &str, mut f: impl FnMut(&mut Connection) -> ApiResult<T>) -> ApiResult<T> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let served = self.served(name)?;
            match self.read_on(name, &served, &mut f) {
                Err(err) if err.status.is_server_error() && attempts < 3 && self.moved(name, &served) => {}
                result => return result,
            }
        }
    }

    /// Whether `name`'s pointer names another database than `served`'s.
    fn moved(&self, name: &str, served: &Served) -> bool {
        self.config().database_path(name) != served.database
    }

    fn read_on<T>(
        &self,
        name: &str,
        served: &Served,
        f: &mut impl FnMut(&mut Connection) -> ApiResult<T>,
    ) -> ApiResult<T> {
        let idle = served.reads.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut db = match idle {
            Some(db) => db,
            None => {
                let mut db = open_reads(name, &served.database)?;
                db.authorizer(Some(inspect::reads_only)).map_err(anyhow::Error::from)?;
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

    /// Call `name`'s `query` export; tried again on the new database when a
    /// rebuild takes over meanwhile, as [`Api::with_reads`].
    fn call_query(&self, name: &str, request: &[u8]) -> ApiResult<QueryOutcome> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let served = self.served(name)?;
            match self.query_on(name, &served, request) {
                Err(err) if err.status.is_server_error() && attempts < 3 && self.moved(name, &served) => {}
                result => return result,
            }
        }
    }

    fn query_on(&self, name: &str, served: &Served, request: &[u8]) -> ApiResult<QueryOutcome> {
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

/// The SQLite error code somewhere in `err`'s chain, if any.
fn sqlite_code(err: &anyhow::Error) -> Option<ErrorCode> {
    err.chain().find_map(|cause| cause.downcast_ref::<rusqlite::Error>()?.sqlite_error_code())
}

/// The refusal of a statement that is not a plain read.
fn read_only_refusal(sql: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{sql:?} is not a read: the SQL endpoint is read-only (one SELECT or WITH statement; no \
         writes, VACUUM, ATTACH, pragmas or transactions)"
    ))
}

/// A `/sql` answer over one of its caps.
fn over_cap(message: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// Run one read-only statement under [`SQL_TIME_LIMIT`] and `limits`; the
/// answer is the JSON array of its rows, as bytes.
fn read_only_rows(db: &mut Connection, sql: &str, limits: SqlLimits) -> ApiResult<Vec<u8>> {
    let deadline = Instant::now() + SQL_TIME_LIMIT;
    db.progress_handler(SQL_PROGRESS_STEPS, Some(move || Instant::now() >= deadline))
        .map_err(anyhow::Error::from)?;
    let length = db.limit(Limit::SQLITE_LIMIT_LENGTH).map_err(anyhow::Error::from)?;
    let rows = rows_of(db, sql, limits, deadline);
    // The connection goes back to the pool for state reads: as it was.
    db.set_limit(Limit::SQLITE_LIMIT_LENGTH, length).map_err(anyhow::Error::from)?;
    db.progress_handler(0, None::<fn() -> bool>).map_err(anyhow::Error::from)?;
    rows
}

fn rows_of(db: &Connection, sql: &str, limits: SqlLimits, deadline: Instant) -> ApiResult<Vec<u8>> {
    let mut stmt = inspect::prepare_read(db, sql).map_err(|refused| match refused {
        inspect::ReadRefused::Empty => ApiError::bad_request(
            "the SQL is empty; send one read-only statement, e.g. {\"sql\": \"SELECT * FROM my_table \
             LIMIT 10\"}",
        ),
        inspect::ReadRefused::NotARead(_) => read_only_refusal(sql),
        invalid @ inspect::ReadRefused::Invalid { .. } => ApiError::bad_request(invalid.to_string()),
    })?;
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    // SQLite makes a row's every value before the first can be looked at:
    // each may take its share of the answer's bytes, no more, so a row of
    // huge values is refused before it is made, not after.
    let value_cap = (limits.bytes / columns.len().max(1)).clamp(1, i32::MAX as usize);
    db.set_limit(Limit::SQLITE_LIMIT_LENGTH, value_cap as i32).map_err(anyhow::Error::from)?;
    let stopped = || {
        ApiError::bad_request(format!(
            "the query ran over {} s and was stopped; the SQL endpoint serves short reads: add a \
             LIMIT or a narrower WHERE, or use `projector query --sql` on the host",
            SQL_TIME_LIMIT.as_secs()
        ))
    };
    let failed = |err: anyhow::Error| match sqlite_code(&err) {
        Some(ErrorCode::OperationInterrupted) => stopped(),
        Some(ErrorCode::TooBig) => over_cap(format!(
            "the query made a value over {value_cap} bytes: a /sql answer holds at most {} bytes \
             (sql_max_bytes), shared by its {} column(s); select smaller values or fewer columns, \
             or raise sql_max_bytes in projector.toml's [http] table",
            limits.bytes,
            columns.len()
        )),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{err:#}; try again"))
        }
        _ => ApiError::bad_request(format!("query {sql:?} failed: {err:#}")),
    };
    let mut body = Vec::from(*b"[");
    let mut rows = stmt.query([]).map_err(|err| failed(err.into()))?;
    let mut count = 0;
    while let Some(row) = rows.next().map_err(|err| failed(err.into()))? {
        if count == limits.rows {
            return Err(over_cap(format!(
                "the query returns more than {} rows, the most a /sql answer holds (sql_max_rows); \
                 add a LIMIT (and page with WHERE), or raise sql_max_rows in projector.toml's [http] \
                 table",
                limits.rows
            )));
        }
        // The progress handler stops SQLite; this stops the rows' JSON.
        if Instant::now() >= deadline {
            return Err(stopped());
        }
        if count > 0 {
            body.push(b',');
        }
        let object = inspect::row_json(row, &columns).map_err(failed)?;
        serde_json::to_writer(&mut body, &object).map_err(anyhow::Error::from)?;
        if body.len() + 1 > limits.bytes {
            return Err(over_cap(format!(
                "the answer is over {} bytes of JSON, the most a /sql answer holds (sql_max_bytes); \
                 select fewer rows or columns, or raise sql_max_bytes in projector.toml's [http] \
                 table",
                limits.bytes
            )));
        }
        count += 1;
    }
    body.push(b']');
    Ok(body)
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
        _ if err.chain().any(|cause| cause.is::<crate::projection::dead_letters::NoSuchDeadLetter>()) => {
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
    store::open_read_only(database)?.ok_or_else(|| {
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
            api.metrics.source_head.get_or_create(&label).set(status.head.min(i64::MAX as u64) as i64);
            api.metrics
                .source_connected
                .get_or_create(&label)
                .set(i64::from(status.connected != Some(false)));
            if let Some(Value::Object(partitions)) = &status.partitions {
                for (partition, progress) in partitions {
                    let label =
                        PartitionLabel { projection: status.name.clone(), partition: partition.clone() };
                    let gauge = |value: &Value| value.as_u64().unwrap_or(0).min(i64::MAX as u64) as i64;
                    api.metrics.partition_position.get_or_create(&label).set(gauge(&progress["position"]));
                    api.metrics.partition_head.get_or_create(&label).set(gauge(&progress["head"]));
                    api.metrics.partition_lag.get_or_create(&label).set(gauge(&progress["lag"]));
                }
            }
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
) -> ApiResult<Response> {
    let axum::Json(request) = request?;
    let limits = api.sql_limits;
    let rows = blocking(move || api.with_reads(&name, |db| read_only_rows(db, &request.sql, limits))).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], rows).into_response())
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
        let served = api.served(&name)?;
        if request.all && !request.ids.is_empty() {
            return Err(ApiError::bad_request(
                "give either \"ids\" or \"all\": true, not both: retry every dead letter, or only \
                 the ones named",
            ));
        }
        let config = api.config();
        let selection = if request.all {
            Selection::All
        } else {
            check_ids(&config, &name, &request.ids)?;
            Selection::Ids(request.ids)
        };
        let outcome = dead_letters::retry(&config, &name, &selection).map_err(dead_letter_failure)?;
        served.live.metrics.events_emitted.get_or_create(&Metrics::label(&name)).inc_by(outcome.emitted);
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

async fn pause(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    expect_json(&headers)?;
    blocking(move || api.served(&name)).await?.live.send(Command::Pause);
    Ok(axum::Json(json!({ "paused": true })))
}

async fn resume(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    expect_json(&headers)?;
    blocking(move || api.served(&name)).await?.live.send(Command::Resume);
    Ok(axum::Json(json!({ "paused": false })))
}

async fn request_rebuild(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    expect_json(&headers)?;
    blocking(move || {
        if api.served(&name)?.live.send(Command::Rebuild) {
            return Ok(());
        }
        // Between its thread's end and a restart: the host takes the file
        // when it starts the projection again.
        Ok(crate::projection::offline::request(&api.config(), &name)?)
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
    // Binary mode (the CloudEvents HTTP binding): the attributes in `ce-`
    // headers, the body the data, `Content-Type` its type.
    let binary: Option<Vec<(String, String)>> = headers.contains_key("ce-specversion").then(|| {
        headers
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("ce-") || *name == header::CONTENT_TYPE)
            .map(|(name, value)| {
                (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect()
    });
    // Parsing a large body is CPU work: off the async threads, like the append.
    let outcome = bulk(move || {
        let mut events = match binary {
            Some(attributes) => {
                let pairs = attributes.iter().map(|(name, value)| (name.as_str(), value.as_str()));
                vec![cloudevents::from_binary(pairs, &body, true).map_err(|err| {
                    ApiError::bad_request(format!("a binary-mode CloudEvent (ce- headers): {err}"))
                })?]
            }
            None => parse_body(&content_type, &body)?,
        };
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
    let text =
        cloudevents::utf8_text(body, "request body").map_err(|err| ApiError::bad_request(err.to_string()))?;
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
                 application/cloudevents-batch+json (a JSON array) or application/x-ndjson (one event per line), \
                 or one event in binary mode (ce-specversion, ce-id, ce-source, ce-type headers; the body is its \
                 data)"
            ),
        )),
    }
}

/// Serve `router` on `listener` until `shutdown` completes, with the
/// timeouts and the connection cap of `http` (see [`HttpConfig`]): a head
/// must arrive within `header_timeout_ms` (also how long a kept-alive
/// connection may wait for its next request), a body within
/// `body_timeout_ms` (in [`router`]), and a connection on which nothing
/// moves for `idle_timeout_ms` while no request is being handled is
/// closed. At most `max_connections` are served at once; more wait in the
/// listen queue. At shutdown, requests in flight get [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    http: &HttpConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(http.header_timeout_ms));
    let idle_timeout = Duration::from_millis(http.idle_timeout_ms);
    let slots = Arc::new(tokio::sync::Semaphore::new(http.max_connections as usize));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut warned_full: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        if slots.available_permits() == 0
            && warned_full.is_none_or(|at| at.elapsed() > Duration::from_secs(60))
        {
            tracing::warn!(
                max_connections = http.max_connections,
                "the HTTP API serves as many connections as it may; new ones wait until one closes \
                 ([http] max_connections)"
            );
            warned_full = Some(Instant::now());
        }
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!("cannot accept an HTTP connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        connections.spawn(connection(
            stream,
            builder.clone(),
            router.clone(),
            idle_timeout,
            stopping.clone(),
            slot,
        ));
    }
    let _ = stop.send(true);
    let drained =
        tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?} were cut off");
    }
    Ok(())
}

/// Serve one connection until it closes, times out idle, or the server
/// stops; `_slot` is its place under the connection cap.
async fn connection(
    stream: tokio::net::TcpStream,
    builder: hyper::server::conn::http1::Builder,
    router: Router,
    idle_timeout: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = hyper_util::rt::TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let inner = hyper_util::service::TowerToHyperService::new(router);
    let handling = activity.clone();
    let service = hyper::service::service_fn(move |request| {
        let busy = handling.begin();
        let answer = hyper::service::Service::call(&inner, request);
        async move {
            let answer = answer.await;
            drop(busy);
            answer
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let check_every = (idle_timeout / 4).min(Duration::from_secs(1));
    let mut stop_sent = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(err) = served {
                    tracing::debug!("HTTP connection ended: {err}");
                }
                return;
            }
            _ = stopping.changed(), if !stop_sent => {
                conn.as_mut().graceful_shutdown();
                stop_sent = true;
            }
            () = tokio::time::sleep(check_every) => {
                if activity.idle_for() >= idle_timeout && !activity.is_busy() {
                    tracing::info!(
                        "closed an HTTP connection on which nothing moved for {idle_timeout:?} \
                         ([http] idle_timeout_ms): a client that stopped reading its answer"
                    );
                    return;
                }
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are
/// being handled.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte read or written.
    last: AtomicU64,
    handling: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last: AtomicU64::new(0), handling: AtomicUsize::new(0) }
    }
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
    fn is_busy(&self) -> bool {
        self.handling.load(Ordering::Relaxed) > 0
    }
    /// A request is being handled until the guard drops.
    fn begin(self: &Arc<Self>) -> Handling {
        self.handling.fetch_add(1, Ordering::Relaxed);
        Handling(self.clone())
    }
}

struct Handling(Arc<Activity>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A stream that records its [`Activity`].
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
