//! NATS JetStream as a [`Source`]: [`NatsOpener`] opens readers of one
//! configured `[sources.<name>]` over a client shared by everything in the
//! process that reads the same servers, [`NatsSource`] reads one stream for
//! one reader, and [`publish`] puts CloudEvents on a stream (what `projector
//! publish` runs). This module owns the client, its connection state, the
//! CloudEvents NATS binding (structured and binary mode) and NATS subject
//! matching.
//!
//! Why it is shaped so:
//!
//! - **The projection's database is the truth.** Each reader has a consumer
//!   of its own: an ephemeral, in-memory pull consumer without acks, created
//!   at the caller's checkpoint + 1 (`DeliverPolicy::ByStartSequence`) and
//!   made again from there whenever a read asks for a position other than
//!   where the last batch ended. Nothing the server remembers decides where
//!   a reader starts, and no consumer is shared between hosts, so replicas
//!   never steal each other's messages. [`Source::acknowledge`] has nothing
//!   to tell the server: the checkpoint committed with the state is the
//!   acknowledgement.
//! - **An ordered consumer, kept by hand.** Every message carries its
//!   consumer sequence; a gap, a missed heartbeat, a lost connection or a
//!   deleted consumer makes the reader throw its consumer away and create
//!   one from the last stream sequence it took + 1. A message at or below
//!   that is dropped, so a recreation can neither lose nor double one.
//! - **Blocking work never runs on the async runtime.** The client lives on
//!   a small tokio runtime of this module's own; runners are plain threads
//!   calling [`Source`] synchronously. A background task per reader prefetches
//!   into a bounded buffer, and the runner's thread drains it, decoding the
//!   CloudEvents itself, waiting on a condition variable rather than
//!   blocking the runtime. An empty batch means the server said nothing is
//!   left (a rebuild catching up stops on it), so a read that finds the
//!   buffer empty before the server has said so waits a moment longer.
//! - **Subject filters**: one filter is applied by the server
//!   (`filter_subject`); several (a 2.9 server takes only one per
//!   consumer) are matched here, as are event types. Skipped messages still
//!   move a batch's `end`.

use crate::bindings::Event;
use crate::sources::cloudevents::{self, CloudEventError};
use crate::sources::embedded::{AppendOutcome, NewEvent};
use crate::sources::{
    Batch, Checkpoint, Filter, Health, Malformed, Progress, Publisher, Source, SourceError, SourceOpener,
    Wake, lock, retry_delay,
};
use anyhow::{Context as _, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, ErrorCode, consumer, stream};
use futures_util::StreamExt as _;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// What a JetStream stream's partition is called in checkpoints and dead
/// letters: `nats:<stream>`.
pub fn partition_key(stream: &str) -> String {
    format!("nats:{stream}")
}

/// Messages a reader prefetches before it waits for its runner to take
/// some.
const BUFFER_MESSAGES: usize = 8192;
/// Bytes of message bodies a reader prefetches at most (one message is
/// always let in, however large).
const BUFFER_BYTES: usize = 64 << 20;
/// Messages asked for in one pull request.
const PULL_BATCH: usize = 1000;
/// How long a pull request waits at the server.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often the server says a waiting pull request is alive; two missed
/// mean the consumer (or the server) is gone.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Publishes awaiting their acknowledgement at most, in [`publish`] (the
/// client lets 5000 wait before it holds further publishes back).
const PUBLISH_WINDOW: usize = 1024;
/// How long a JetStream API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(3);
/// After the first message of a batch, how long more a read waits for
/// others to fill it: a quiet stream is applied promptly, a busy one in big
/// batches.
const FILL: Duration = Duration::from_millis(5);
/// How long a read waits at most, past the caller's wait, for the server
/// to say whether anything is there: an idle batch means caught up.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the stream's head, read from the server, is reused.
const HEAD_CACHE: Duration = Duration::from_secs(1);
/// A consumer nobody reads is removed by the server after this long (a
/// host that died leaves nothing behind for long).
const CONSUMER_INACTIVE: Duration = Duration::from_secs(30);

/// The runtime the NATS clients of this process run on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nats")
            .enable_all()
            .build()
            .expect("cannot start the NATS client's runtime")
    })
}

/// Run `future` on the NATS runtime and wait for it on this thread (which
/// may be any thread, even one of another runtime).
fn run<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> T {
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver.recv().expect("the NATS runtime finishes every task it is given")
}

/// Delay before reconnection attempt `attempt` (from 1): at once, then
/// doubling from 50 ms up to 2 s.
fn reconnect_delay(attempt: usize) -> Duration {
    match attempt {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(50u64.saturating_mul(1 << (n - 2).min(6))).min(Duration::from_secs(2)),
    }
}

/// One client of one cluster, shared by every reader of a source.
struct Connection {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// The server URLs, for messages.
    servers: String,
    /// Why the last connection attempt failed, until one succeeds.
    last_error: Arc<Mutex<Option<String>>>,
}

/// The configured server URLs, parsed; an error names the one that is not.
fn server_addresses(urls: &[String]) -> Result<Vec<async_nats::ServerAddr>> {
    urls.iter()
        .map(|url| {
            url.parse::<async_nats::ServerAddr>().with_context(|| format!("{url:?} is not a NATS URL"))
        })
        .collect()
}

impl Connection {
    /// A client that connects in the background and keeps reconnecting:
    /// opening never fails because a server is down.
    fn open(urls: &[String]) -> Result<Self> {
        let servers = urls.join(", ");
        let addresses = server_addresses(urls)?;
        let last_error = Arc::new(Mutex::new(None));
        let options = async_nats::ConnectOptions::new()
            .name("projector")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(API_TIMEOUT))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback({
                let last_error = last_error.clone();
                move |event| {
                    let last_error = last_error.clone();
                    async move {
                        let mut last_error = lock(&last_error);
                        match event {
                            async_nats::Event::Connected => *last_error = None,
                            async_nats::Event::Disconnected => {
                                last_error.get_or_insert_with(|| "the connection was lost".into());
                            }
                            async_nats::Event::ClientError(err) => *last_error = Some(err.to_string()),
                            _ => {}
                        }
                    }
                }
            });
        let (client, jetstream) = run(async move {
            let client = options.connect(addresses).await?;
            let jetstream = jetstream::ContextBuilder::new().timeout(API_TIMEOUT).build(client.clone());
            Ok::<_, async_nats::ConnectError>((client, jetstream))
        })
        .with_context(|| format!("cannot set up a NATS client for {servers}"))?;
        Ok(Connection { client, jetstream, servers, last_error })
    }

    /// The client of the cluster at `urls`: one per process however many
    /// projections (and sources naming the same servers) read it, for as
    /// long as one does.
    fn shared(urls: &[String]) -> Result<Arc<Self>> {
        static CLIENTS: OnceLock<Mutex<HashMap<Vec<String>, Weak<Connection>>>> = OnceLock::new();
        let mut clients = lock(CLIENTS.get_or_init(Mutex::default));
        clients.retain(|_, connection| connection.strong_count() > 0);
        if let Some(connection) = clients.get(urls).and_then(Weak::upgrade) {
            return Ok(connection);
        }
        let connection = Arc::new(Connection::open(urls)?);
        clients.insert(urls.to_vec(), Arc::downgrade(&connection));
        Ok(connection)
    }

    /// How the client's connection stands.
    fn link(&self) -> Link {
        let last_error = lock(&self.last_error).clone();
        match (self.client.connection_state(), last_error) {
            (async_nats::connection::State::Connected, _) => Link::Up,
            (async_nats::connection::State::Pending, None) => Link::Starting,
            (async_nats::connection::State::Pending, Some(err)) => {
                Link::Down(format!("cannot connect to NATS at {}: {err}; retrying", self.servers))
            }
            (async_nats::connection::State::Disconnected, err) => Link::Down(format!(
                "lost the connection to NATS at {}{}; reconnecting",
                self.servers,
                err.map(|e| format!(" ({e})")).unwrap_or_default()
            )),
        }
    }

    /// Why the client cannot reach the servers now, if it cannot.
    fn down(&self) -> Option<String> {
        match self.link() {
            Link::Down(reason) => Some(reason),
            Link::Up | Link::Starting => None,
        }
    }
}

/// How a client's connection stands.
enum Link {
    /// Connected.
    Up,
    /// Connecting for the first time, no attempt failed yet.
    Starting,
    /// Not connected, and why.
    Down(String),
}

/// Opens readers of one JetStream stream.
pub struct NatsOpener {
    name: String,
    stream: String,
    connection: Arc<Connection>,
}

impl NatsOpener {
    /// Readers of `stream` on the cluster at `urls`, for the source `name`.
    /// Connects in the background: a server that is down now is retried,
    /// and its readers report `connecting` meanwhile.
    pub fn new(name: &str, urls: Vec<String>, stream: &str) -> Result<Self> {
        if urls.is_empty() {
            anyhow::bail!("source {name}: no NATS server URL");
        }
        Ok(NatsOpener {
            name: name.to_string(),
            stream: stream.to_string(),
            connection: Connection::shared(&urls)?,
        })
    }
}

impl SourceOpener for NatsOpener {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&self, filter: &Filter, reader: &str) -> Result<Box<dyn Source>> {
        Ok(Box::new(NatsSource::new(self.connection.clone(), &self.stream, filter, reader)))
    }

    fn publisher(&self, routes: &std::collections::BTreeMap<String, String>) -> Option<Arc<dyn Publisher>> {
        Some(Arc::new(NatsPublisher { connection: self.connection.clone(), routes: routes.clone() }))
    }
}

/// A message as the server delivered it, not yet decoded.
struct Fetched {
    sequence: u64,
    subject: String,
    /// The payload's size, which the buffer's byte bound counts.
    bytes: usize,
    /// The headers and the payload, kept only while the message is not
    /// decoded, or to report it as malformed: a decoded one is dropped on
    /// the prefetching side, not by the runner.
    headers: Option<HeaderMap>,
    payload: Vec<u8>,
    /// Its CloudEvent, decoded by the prefetching task: on a machine with
    /// a core to spare, the decoding overlaps the runner applying the batch
    /// before.
    parsed: Option<Result<NewEvent, String>>,
}

/// What the prefetching task and the reader share.
struct Shared {
    inner: Mutex<Inner>,
    /// Signalled when a message arrives, an error is recorded, or a wake
    /// is asked for.
    ready: Condvar,
    /// Signalled when the reader takes messages out of a full buffer.
    space: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    /// Which prefetching task may fill `buffer`: a seek starts a new one.
    generation: u64,
    buffer: VecDeque<Fetched>,
    buffered_bytes: usize,
    /// The consumer's pending count after the last message fetched
    /// (unknown until a consumer exists).
    pending: Option<u64>,
    /// Why the prefetching task cannot read now, until it can.
    failure: Option<String>,
    /// Counts wakes asked for: a waiting read returns when it changes.
    wakes: u64,
    /// The consumer the current task reads, removed when the reader seeks
    /// or is dropped.
    consumer: Option<String>,
    /// What an operator should know (messages retention dropped).
    warning: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Add a fetched message for the reader, waiting while the buffer is
    /// full. False when this task's generation is over.
    async fn push(&self, generation: u64, message: Fetched, pending: u64) -> bool {
        loop {
            let space = self.space.notified();
            {
                let mut inner = self.lock();
                if inner.generation != generation {
                    return false;
                }
                let full = inner.buffer.len() >= BUFFER_MESSAGES || inner.buffered_bytes >= BUFFER_BYTES;
                if !full || inner.buffer.is_empty() {
                    inner.buffered_bytes += message.bytes;
                    inner.buffer.push_back(message);
                    inner.pending = Some(pending);
                    inner.failure = None;
                    drop(inner);
                    self.ready.notify_all();
                    return true;
                }
            }
            space.await;
        }
    }

    /// Record what the task of `generation` found, if it is still current.
    fn update(&self, generation: u64, change: impl FnOnce(&mut Inner)) -> bool {
        let mut inner = self.lock();
        if inner.generation != generation {
            return false;
        }
        change(&mut inner);
        drop(inner);
        self.ready.notify_all();
        true
    }
}

/// Wakes a reader waiting in [`NatsSource::next_batch`].
struct NatsWaker(Arc<Shared>);

impl Wake for NatsWaker {
    fn wake(&self) {
        self.0.lock().wakes += 1;
        self.0.ready.notify_all();
    }
}

/// Everything a prefetching task needs, cloned from the source.
#[derive(Clone)]
struct Reading {
    connection: Arc<Connection>,
    shared: Arc<Shared>,
    stream: String,
    /// The server-side filter (when the projection has exactly one).
    filter_subject: Option<String>,
    /// The consumers' description: who reads.
    description: String,
}

/// One reader of a JetStream stream.
pub struct NatsSource {
    reading: Reading,
    key: String,
    partition: Arc<str>,
    /// Subjects matched here (when the projection has several filters).
    subjects: Vec<String>,
    types: Option<Vec<String>>,
    /// The position the buffered messages follow: where the last batch
    /// ended, or where the prefetching started. `None` before any read.
    expected: Option<u64>,
    /// Messages taken out of the shared buffer, not yet handed out.
    backlog: VecDeque<Fetched>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The stream's last sequence as last read from the server.
    head: Option<(Instant, u64)>,
}

impl NatsSource {
    fn new(connection: Arc<Connection>, stream: &str, filter: &Filter, reader: &str) -> Self {
        let (filter_subject, subjects) = match filter.streams.as_slice() {
            [one] => (Some(one.clone()), Vec::new()),
            several => (None, several.to_vec()),
        };
        let key = partition_key(stream);
        NatsSource {
            reading: Reading {
                connection,
                shared: Arc::new(Shared {
                    inner: Mutex::default(),
                    ready: Condvar::new(),
                    space: Default::default(),
                }),
                stream: stream.to_string(),
                filter_subject,
                description: format!("projector reader {reader}"),
            },
            partition: key.as_str().into(),
            key,
            subjects,
            types: filter.types.clone(),
            expected: None,
            backlog: VecDeque::new(),
            task: None,
            head: None,
        }
    }

    /// Forget what was prefetched and read again from `after` + 1.
    fn seek(&mut self, after: u64) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let (generation, consumer) = {
            let mut inner = self.reading.shared.lock();
            inner.generation += 1;
            inner.buffer.clear();
            inner.buffered_bytes = 0;
            inner.pending = None;
            inner.failure = None;
            (inner.generation, inner.consumer.take())
        };
        if let Some(name) = consumer {
            delete_consumer(&self.reading.connection, &self.reading.stream, name);
        }
        self.reading.shared.space.notify_one();
        self.backlog.clear();
        self.expected = Some(after);
        self.task = Some(runtime().spawn(prefetch(self.reading.clone(), generation, after + 1)));
    }

    /// Whether the projection takes messages on `subject`.
    fn wants_subject(&self, subject: &str) -> bool {
        self.subjects.is_empty() || self.subjects.iter().any(|filter| subject_matches(filter, subject))
    }

    /// Wait until a message is buffered, a wake is asked for, or `until`;
    /// then move what is buffered (up to `max`) to the backlog.
    fn take(&mut self, max: usize, until: Instant, wakes: u64) -> MutexGuard<'_, Inner> {
        let shared = &self.reading.shared;
        let mut inner = shared.lock();
        while inner.buffer.is_empty() && inner.wakes == wakes {
            let now = Instant::now();
            if now >= until {
                break;
            }
            inner = shared.ready.wait_timeout(inner, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        let n = inner.buffer.len().min(max.max(1));
        if n > 0 {
            let mut bytes = 0;
            for message in inner.buffer.drain(..n) {
                bytes += message.bytes;
                self.backlog.push_back(message);
            }
            inner.buffered_bytes = inner.buffered_bytes.saturating_sub(bytes);
            shared.space.notify_one();
        }
        inner
    }
}

impl Drop for NatsSource {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Nothing fills the buffer any more.
        let consumer = {
            let mut inner = self.reading.shared.lock();
            inner.generation += 1;
            inner.consumer.take()
        };
        if let Some(name) = consumer {
            delete_consumer(&self.reading.connection, &self.reading.stream, name);
        }
    }
}

impl Source for NatsSource {
    fn key(&self) -> &str {
        &self.key
    }

    fn next_batch(&mut self, after: &Checkpoint, max: usize, wait: Duration) -> Result<Batch, SourceError> {
        let from = after.position(&self.key);
        if self.expected != Some(from) {
            self.seek(from);
        }
        let max = max.max(1);
        let mut batch = Batch { end: after.clone(), ..Batch::default() };
        let mut last = from;
        let started = Instant::now();
        let wakes = self.reading.shared.lock().wakes;
        let mut fill_until = None;
        let mut settling = false;
        loop {
            if self.backlog.is_empty() {
                let until = match (fill_until, settling) {
                    (Some(until), _) => until,
                    (None, false) => started + wait,
                    (None, true) => started + SETTLE,
                };
                let want = max - batch.events.len();
                let inner = self.take(want, until, wakes);
                let woken = inner.wakes != wakes;
                let failure = inner.failure.clone();
                let settled = inner.pending == Some(0);
                drop(inner);
                if self.backlog.is_empty() {
                    if last == from && fill_until.is_none() && !woken {
                        // Nothing at all: why, if something is wrong.
                        if let Some(reason) = failure.or_else(|| self.reading.connection.down()) {
                            return Err(SourceError::Unavailable(reason));
                        }
                        // Nothing yet, but the server has not said there
                        // is nothing (the consumer is being made, messages
                        // are on their way): an idle batch means caught up,
                        // so wait for that a little longer.
                        if !settled && !settling && Instant::now() < started + SETTLE {
                            settling = true;
                            continue;
                        }
                    }
                    break;
                }
                fill_until.get_or_insert_with(|| Instant::now() + FILL);
            }
            let mut message = self.backlog.pop_front().expect("the backlog is not empty");
            if message.sequence <= last {
                continue;
            }
            if !self.wants_subject(&message.subject) {
                last = message.sequence;
                continue;
            }
            match message.parsed.take().unwrap_or_else(|| parse(&message)) {
                Ok(parsed) => {
                    let event = to_event(message, parsed);
                    last = event.position;
                    if self.types.as_ref().is_none_or(|types| types.contains(&event.type_)) {
                        batch.events.push(event);
                        batch.partitions.push(self.partition.clone());
                        if batch.events.len() >= max {
                            break;
                        }
                    }
                }
                Err(_) if last != from => {
                    // A malformed message comes alone: next time.
                    self.backlog.push_front(message);
                    break;
                }
                Err(reason) => {
                    last = message.sequence;
                    batch.malformed = Some(to_malformed(&self.reading.stream, &message, reason));
                    break;
                }
            }
        }
        batch.end.set(&self.key, last);
        self.expected = Some(last);
        Ok(batch)
    }

    fn acknowledge(&mut self, _upto: &Checkpoint) -> Result<(), SourceError> {
        // The consumer takes no acks: the checkpoint committed with the
        // state is what says how far this reader got, and the next read
        // (or a new consumer) starts from it.
        Ok(())
    }

    fn progress(&mut self, at: &Checkpoint) -> Result<Progress, SourceError> {
        let fresh = self.head.filter(|(read, _)| read.elapsed() < HEAD_CACHE);
        let head = match fresh {
            Some((_, head)) => head,
            None => match self.read_head() {
                Ok(head) => {
                    self.head = Some((Instant::now(), head));
                    head
                }
                Err(err) => match self.head {
                    Some((_, head)) => head,
                    None => return Err(err),
                },
            },
        };
        let position = at.position(&self.key);
        let inner = self.reading.shared.lock();
        let lag = match inner.pending {
            Some(pending) => pending + (inner.buffer.len() + self.backlog.len()) as u64,
            None => head.saturating_sub(position),
        };
        Ok(Progress { head: Checkpoint::at(&self.key, head), lag: lag.min(head.saturating_sub(position)) })
    }

    fn health(&self) -> Health {
        if let Some(failure) = self.reading.shared.lock().failure.clone() {
            return Health::Connecting { error: Some(failure) };
        }
        match self.reading.connection.link() {
            Link::Up => Health::Connected,
            Link::Starting => Health::Connecting { error: None },
            Link::Down(reason) => Health::Connecting { error: Some(reason) },
        }
    }

    fn warning(&self) -> Option<String> {
        self.reading.shared.lock().warning.clone()
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(NatsWaker(self.reading.shared.clone()))
    }
}

impl NatsSource {
    /// The stream's last sequence, from the server.
    fn read_head(&mut self) -> Result<u64, SourceError> {
        let connection = self.reading.connection.clone();
        if let Some(reason) = connection.down() {
            return Err(SourceError::Unavailable(reason));
        }
        let stream = self.reading.stream.clone();
        let info = run(async move {
            let result = connection.jetstream.get_stream(&stream).await;
            result
                .map(|s| s.cached_info().state.last_sequence)
                .map_err(|err| explain_get_stream(&connection, &stream, &err))
        });
        info.map_err(SourceError::Unavailable)
    }
}

/// Why `stream` could not be read, for an operator: a missing stream is
/// named with the servers asked and what to do.
fn explain_get_stream(
    connection: &Connection,
    stream: &str,
    err: &jetstream::context::GetStreamError,
) -> String {
    use jetstream::context::GetStreamErrorKind;
    match err.kind() {
        GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND => format!(
            "stream {stream} not found on {}: create it, or publish to it with `projector publish`",
            connection.servers
        ),
        GetStreamErrorKind::JetStream(js)
            if matches!(
                js.error_code(),
                ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
            ) =>
        {
            format!("JetStream is not enabled on {}: start nats-server with -js", connection.servers)
        }
        _ => match connection.down() {
            Some(reason) => reason,
            None => format!("cannot read stream {stream} on {}: {err}", connection.servers),
        },
    }
}

/// The prefetching task of one generation: makes a consumer at `next`,
/// moves what it delivers into the shared buffer, and makes a new one from
/// where it got whenever that one fails.
async fn prefetch(reading: Reading, generation: u64, mut next: u64) {
    let mut attempt = 0;
    loop {
        let failure = match read(&reading, generation, &mut next, &mut attempt).await {
            Ok(()) => return,
            Err(failure) => failure,
        };
        attempt += 1;
        let reason = reading.connection.down().unwrap_or(failure);
        tracing::debug!(stream = %reading.stream, next, "NATS reader retrying: {reason}");
        if !reading.shared.update(generation, |inner| inner.failure = Some(reason)) {
            return;
        }
        tokio::time::sleep(retry_delay(attempt)).await;
    }
}

/// One consumer's life: `Ok` when the generation is over, `Err` with why
/// the consumer must be made again.
async fn read(reading: &Reading, generation: u64, next: &mut u64, attempt: &mut u32) -> Result<(), String> {
    let connection = &reading.connection;
    let stream = connection
        .jetstream
        .get_stream(&reading.stream)
        .await
        .map_err(|err| explain_get_stream(connection, &reading.stream, &err))?;
    let state = &stream.cached_info().state;
    if state.first_sequence > 1 && *next < state.first_sequence {
        let warning = format!(
            "stream {}: retention dropped messages before sequence {}; reading from {} (a rebuild, or a \
             checkpoint older than the stream), this projection cannot see them",
            reading.stream, state.first_sequence, *next
        );
        let first = reading.shared.update(generation, |inner| {
            if inner.warning.is_none() {
                tracing::warn!("{warning}");
            }
            inner.warning = Some(warning);
        });
        if !first {
            return Ok(());
        }
    }
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            description: Some(reading.description.clone()),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: *next },
            ack_policy: consumer::AckPolicy::None,
            filter_subject: reading.filter_subject.clone().unwrap_or_default(),
            inactive_threshold: CONSUMER_INACTIVE,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|err| {
            connection.down().unwrap_or_else(|| {
                format!(
                    "cannot create a consumer on stream {} at {}: {err}",
                    reading.stream, connection.servers
                )
            })
        })?;
    let name = consumer.cached_info().name.clone();
    let pending = consumer.cached_info().num_pending;
    if !reading.shared.update(generation, |inner| {
        inner.pending = Some(pending);
        inner.failure = None;
        inner.consumer = Some(name.clone());
    }) {
        delete_consumer(connection, &reading.stream, name);
        return Ok(());
    }
    let result = deliver(reading, generation, next, attempt, &consumer).await;
    if reading.shared.update(generation, |inner| inner.consumer = None) {
        delete_consumer(connection, &reading.stream, name);
    }
    result
}

/// Move what `consumer` delivers into the buffer until it fails.
async fn deliver(
    reading: &Reading,
    generation: u64,
    next: &mut u64,
    attempt: &mut u32,
    consumer: &consumer::Consumer<consumer::pull::Config>,
) -> Result<(), String> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|err| format!("cannot pull from stream {}: {err}", reading.stream))?;
    let mut consumer_sequence = 0;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|err| format!("reading stream {}: {err}", reading.stream))?;
        let info = message.info().map_err(|err| format!("a message without JetStream metadata: {err}"))?;
        let (sequence, delivered, pending) = (info.stream_sequence, info.consumer_sequence, info.pending);
        if delivered != consumer_sequence + 1 {
            return Err(format!(
                "stream {}: a gap in what the consumer delivered ({delivered} after {consumer_sequence})",
                reading.stream
            ));
        }
        consumer_sequence = delivered;
        if sequence < *next {
            continue;
        }
        *next = sequence + 1;
        *attempt = 0;
        let message = message.message;
        let parsed = decode(message.headers.as_ref(), &message.payload);
        let bytes = message.payload.len();
        let (headers, payload) = match parsed {
            Ok(_) => (None, Vec::new()),
            Err(_) => (message.headers, message.payload.into()),
        };
        let fetched = Fetched {
            sequence,
            subject: message.subject.to_string(),
            bytes,
            headers,
            payload,
            parsed: Some(parsed),
        };
        if !reading.shared.push(generation, fetched, pending).await {
            return Ok(());
        }
    }
    Err(format!("stream {}: the consumer's messages ended", reading.stream))
}

/// Remove a consumer no longer read, without waiting (the server removes
/// it anyway once inactive).
fn delete_consumer(connection: &Connection, stream: &str, name: String) {
    let (jetstream, stream) = (connection.jetstream.clone(), stream.to_string());
    runtime().spawn(async move {
        let _ = jetstream.delete_consumer_from_stream(&name, &stream).await;
    });
}

/// A message's CloudEvent, by the CloudEvents NATS binding: binary mode
/// when it has a `ce-specversion` header, else structured mode; or why it
/// is neither.
fn parse(message: &Fetched) -> Result<NewEvent, String> {
    decode(message.headers.as_ref(), &message.payload)
}

/// [`parse`] of a message's headers and payload.
fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<NewEvent, String> {
    match (header(headers, "ce-specversion"), headers) {
        (Some(_), Some(headers)) => binary(headers, payload)
            .map_err(|err| format!("a binary-mode CloudEvent with a bad header: {err}")),
        _ => match std::str::from_utf8(payload) {
            Ok(text) => cloudevents::parse_event(text).map_err(|err| match err {
                CloudEventError::NotAnEvent(_) => format!(
                    "neither a structured-mode CloudEvent ({err}) nor a binary-mode one (no ce-specversion header)"
                ),
                err => format!("a structured-mode CloudEvent with a bad attribute: {err}"),
            }),
            Err(err) => Err(format!(
                "neither a structured-mode CloudEvent (the body is not UTF-8: {err}) nor a binary-mode one (no \
                 ce-specversion header)"
            )),
        },
    }
}

/// The event a message carries: its subject as the stream, its stream
/// sequence as the position.
fn to_event(message: Fetched, event: NewEvent) -> Event {
    Event {
        stream: message.subject,
        position: message.sequence,
        id: event.id,
        type_: event.event_type,
        subject: event.subject,
        time: event.time,
        correlation_id: event.correlation_id,
        causation_id: event.causation_id,
        data: event.data,
    }
}

/// A message that is no event, as far as it can be read: named by its
/// `Nats-Msg-Id`, or by its stream and sequence.
fn to_malformed(stream: &str, message: &Fetched, reason: String) -> Malformed {
    let id = header(message.headers.as_ref(), "Nats-Msg-Id")
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}:{}", partition_key(stream), message.sequence));
    Malformed {
        event: Event {
            stream: message.subject.clone(),
            position: message.sequence,
            id,
            type_: String::new(),
            subject: None,
            time: None,
            correlation_id: None,
            causation_id: None,
            data: message.payload.clone(),
        },
        reason,
    }
}

/// The last value of header `name`, whatever its case.
fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|(key, _)| AsRef::<str>::as_ref(*key).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.last())
        .map(|value| value.as_str())
}

/// A binary-mode CloudEvent: attributes in `ce-` headers, the data type in
/// `Content-Type`, the body as data.
fn binary(headers: &HeaderMap, body: &[u8]) -> Result<NewEvent, CloudEventError> {
    let pairs = headers.iter().filter_map(|(name, values)| Some((name.as_ref(), values.last()?.as_str())));
    cloudevents::from_binary(pairs, body, false)
}

/// Whether `subject` matches the NATS subject `filter` (`*` is one token,
/// a last `>` one or more).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in filter.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (token, Some(other)) if token == other => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// A subject to publish to: dot-separated tokens, no wildcards.
pub fn validate_subject(subject: &str) -> Result<()> {
    let ok = !subject.is_empty()
        && subject.len() <= 256
        && subject.split('.').all(|token| {
            !token.is_empty() && token.chars().all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
        });
    if !ok {
        anyhow::bail!(
            "{subject:?} is not a subject to publish to: use dot-separated tokens without wildcards, e.g. \
             \"wallets.eu\""
        );
    }
    Ok(())
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PublishOutcome {
    /// Events the stream took.
    pub published: u64,
    /// Events whose id the stream already had (JetStream drops a
    /// `Nats-Msg-Id` seen within the stream's duplicate window, two minutes
    /// by default).
    pub duplicates: u64,
}

/// Publish `events` to `subject`, stored by `stream` on the cluster at
/// `urls`, in CloudEvents structured mode with `Nats-Msg-Id` set to each
/// event's id, so a publisher that retries cannot store one twice. Creates
/// the stream (capturing `<first token of subject>.>`) when there is none.
/// Every publish is acknowledged by the server before this returns; the
/// acknowledgements are awaited together, not one round trip per event.
pub fn publish(urls: &[String], stream: &str, subject: &str, events: &[NewEvent]) -> Result<PublishOutcome> {
    validate_subject(subject)?;
    let servers = urls.join(", ");
    let addresses = server_addresses(urls)?;
    let bodies: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|event| (event.id.clone(), cloudevents::to_json(event).to_string().into_bytes()))
        .collect();
    let (stream, subject) = (stream.to_string(), subject.to_string());
    run(async move {
        let client = async_nats::ConnectOptions::new()
            .name("projector publish")
            .connection_timeout(Duration::from_secs(5))
            .connect(addresses)
            .await
            .with_context(|| format!("cannot connect to NATS at {servers}"))?;
        let jetstream =
            jetstream::ContextBuilder::new().timeout(Duration::from_secs(10)).build(client.clone());
        ensure_stream(&jetstream, &stream, &subject, &servers).await?;
        let outcome = send_all(&jetstream, &subject, Some(&stream), bodies).await?;
        client.flush().await.ok();
        Ok(outcome)
    })
}

/// Publish `bodies` (event id, structured CloudEvent) to `subject`, with
/// `Nats-Msg-Id` = the id, keeping a window of publishes awaiting their
/// acknowledgements (one round trip per window, not per event); when
/// `stream` is named, each must be stored by it.
async fn send_all(
    jetstream: &jetstream::Context,
    subject: &str,
    stream: Option<&str>,
    bodies: Vec<(String, Vec<u8>)>,
) -> Result<PublishOutcome> {
    let total = bodies.len();
    let mut outcome = PublishOutcome { published: 0, duplicates: 0 };
    let mut in_flight = VecDeque::with_capacity(PUBLISH_WINDOW);
    let mut bodies = bodies.into_iter().enumerate();
    loop {
        let next = match in_flight.len() < PUBLISH_WINDOW {
            true => bodies.next(),
            false => None,
        };
        if let Some((i, (id, body))) = next {
            let message = jetstream::message::PublishMessage::build()
                .payload(Vec::into(body))
                .message_id(&id)
                .header("Content-Type", "application/cloudevents+json");
            let ack = jetstream
                .send_publish(subject.to_string(), message)
                .await
                .with_context(|| format!("cannot publish event {id} to {subject}"))?;
            in_flight.push_back((i, id, ack));
            continue;
        }
        let Some((i, id, ack)) = in_flight.pop_front() else { break };
        let ack = match ack.await {
            Ok(ack) => ack,
            Err(err) if err.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                anyhow::bail!(
                    "no JetStream stream captures subject {subject}: add it to a stream's subjects \
                     (or publish to one that is)"
                )
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "the server did not confirm event {id} ({} of {total}); publishing again is \
                         safe: events already stored are dropped as duplicates",
                        i + 1
                    )
                });
            }
        };
        if let Some(stream) = stream
            && ack.stream != stream
        {
            anyhow::bail!("event {id} was stored by stream {}, not {stream}", ack.stream);
        }
        if ack.duplicate {
            outcome.duplicates += 1;
        } else {
            outcome.published += 1;
        }
    }
    Ok(outcome)
}

/// Publishes what a projection reading a JetStream stream emits, over the
/// source's shared client: emitted stream `s` goes to the subject its
/// route names (`s` itself when none does), which a JetStream stream must
/// capture. Each message's `Nats-Msg-Id` is the event's deterministic id,
/// so a publish repeated after a crash, within the stream's duplicate
/// window, is dropped by the server.
struct NatsPublisher {
    connection: Arc<Connection>,
    routes: std::collections::BTreeMap<String, String>,
}

impl Publisher for NatsPublisher {
    fn publish(&self, stream: &str, events: &[NewEvent]) -> Result<AppendOutcome> {
        if let Some(reason) = self.connection.down() {
            anyhow::bail!(reason);
        }
        let subject = self.routes.get(stream).map_or(stream, String::as_str).to_string();
        let bodies: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|event| (event.id.clone(), cloudevents::to_json(event).to_string().into_bytes()))
            .collect();
        let jetstream = self.connection.jetstream.clone();
        let outcome = run(async move { send_all(&jetstream, &subject, None, bodies).await })
            .with_context(|| format!("on NATS at {}", self.connection.servers))?;
        Ok(AppendOutcome { appended: outcome.published, duplicates: outcome.duplicates })
    }
}

/// Make sure `stream` exists and captures `subject`: create it when it
/// does not exist.
async fn ensure_stream(
    jetstream: &jetstream::Context,
    stream: &str,
    subject: &str,
    servers: &str,
) -> Result<()> {
    let first = subject.split('.').next().unwrap_or(subject);
    let subjects = if first == subject {
        vec![first.to_string(), format!("{first}.>")]
    } else {
        vec![format!("{first}.>")]
    };
    // A cluster electing a leader (a node just lost) answers nothing for a
    // moment: ask again for a while before giving up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        match jetstream.get_stream(stream).await {
            Ok(existing) => break Some(existing.cached_info().config.subjects.clone()),
            Err(err) => match err.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    break None;
                }
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if matches!(
                        js.error_code(),
                        ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
                    ) =>
                {
                    anyhow::bail!("JetStream is not enabled on {servers}: start nats-server with -js");
                }
                _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
                _ => return Err(err).with_context(|| format!("cannot read stream {stream} on {servers}")),
            },
        }
    };
    let captured = match info {
        Some(captured) => captured,
        None => {
            let config = stream::Config {
                name: stream.to_string(),
                subjects: subjects.clone(),
                storage: stream::StorageType::File,
                ..Default::default()
            };
            match jetstream.create_stream(config).await {
                Ok(_) => {
                    tracing::info!(stream, subjects = ?subjects, "created stream on {servers}");
                    return Ok(());
                }
                // Created meanwhile by another publisher: check it.
                Err(err) => match jetstream.get_stream(stream).await {
                    Ok(existing) => existing.cached_info().config.subjects.clone(),
                    Err(_) => {
                        return Err(err).with_context(|| {
                            format!(
                                "cannot create stream {stream} capturing {} on {servers}",
                                subjects.join(", ")
                            )
                        });
                    }
                },
            }
        }
    };
    if !captured.iter().any(|filter| subject_matches(filter, subject)) {
        anyhow::bail!(
            "stream {stream} on {servers} captures {}, not {subject}: publish to a subject it captures, or add \
             {subject} to its subjects",
            if captured.is_empty() { "no subjects".to_string() } else { captured.join(", ") }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_by_nats_wildcard_rules() {
        let cases = [
            ("wallets.>", "wallets.eu", true),
            ("wallets.>", "wallets.eu.fr", true),
            ("wallets.>", "wallets", false),
            ("wallets.*", "wallets.eu", true),
            ("wallets.*", "wallets.eu.fr", false),
            ("*.eu", "wallets.eu", true),
            ("*.eu", "orders.us", false),
            ("wallets.eu", "wallets.eu", true),
            ("wallets.eu", "wallets.e", false),
            ("wallets", "wallets.eu", false),
            (">", "anything.at.all", true),
        ];
        for (filter, subject, expected) in cases {
            assert_eq!(subject_matches(filter, subject), expected, "{filter} ~ {subject}");
        }
    }

    #[test]
    fn publish_subjects_have_no_wildcards() {
        assert!(validate_subject("wallets.eu").is_ok());
        for bad in ["", "wallets.>", "wallets.*", "a..b", "a b"] {
            assert!(validate_subject(bad).is_err(), "{bad:?}");
        }
    }

    fn decode(stream: &str, message: Fetched) -> Result<Event, Box<Malformed>> {
        match parse(&message) {
            Ok(event) => Ok(to_event(message, event)),
            Err(reason) => Err(Box::new(to_malformed(stream, &message, reason))),
        }
    }

    fn fetched(headers: &[(&str, &str)], body: &[u8]) -> Fetched {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        Fetched {
            sequence: 7,
            subject: "wallets.eu".into(),
            bytes: body.len(),
            headers: (!headers.is_empty()).then_some(map),
            payload: body.to_vec(),
            parsed: None,
        }
    }

    #[test]
    fn binary_mode_takes_attributes_from_headers_and_data_from_the_body() {
        let message = fetched(
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "e1"),
                ("ce-type", "wallet_updated"),
                ("ce-source", "tests"),
                ("ce-subject", "u1"),
                ("ce-correlationid", "c1"),
                ("Content-Type", "application/json"),
            ],
            br#"{"a":1}"#,
        );
        let event = decode("WALLETS", message).map_err(|m| m.reason).unwrap();
        assert_eq!((event.id.as_str(), event.type_.as_str(), event.position), ("e1", "wallet_updated", 7));
        assert_eq!(event.stream, "wallets.eu");
        assert_eq!(event.subject.as_deref(), Some("u1"));
        assert_eq!(event.correlation_id.as_deref(), Some("c1"));
        assert_eq!(event.data, br#"{"a":1}"#);
    }

    #[test]
    fn structured_mode_reads_the_body() {
        let body = br#"{"specversion":"1.0","id":"e2","source":"s","type":"t","data":{"b":2}}"#;
        let event = decode("WALLETS", fetched(&[], body)).map_err(|m| m.reason).unwrap();
        assert_eq!((event.id.as_str(), event.data.as_slice()), ("e2", &br#"{"b":2}"#[..]));
    }

    #[test]
    fn a_message_in_neither_mode_is_malformed_with_its_id_and_body() {
        let malformed = decode("WALLETS", fetched(&[], b"hello")).unwrap_err();
        assert!(malformed.reason.contains("neither a structured-mode CloudEvent"), "{}", malformed.reason);
        assert_eq!(malformed.event.id, "nats:WALLETS:7");
        assert_eq!(malformed.event.data, b"hello");
        let malformed = decode("WALLETS", fetched(&[("Nats-Msg-Id", "m1")], b"\xff")).unwrap_err();
        assert_eq!(malformed.event.id, "m1");
        let malformed =
            decode("WALLETS", fetched(&[("ce-specversion", "1.0"), ("ce-id", "e3")], b"")).unwrap_err();
        assert!(malformed.reason.contains("missing required attribute `source`"), "{}", malformed.reason);
    }
}
