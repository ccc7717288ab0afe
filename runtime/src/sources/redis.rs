//! Redis Streams as a [`Source`]: [`RedisOpener`] opens readers of one
//! configured `[sources.<name>]`, [`RedisSource`] reads a projection's
//! stream keys, [`publish`] adds CloudEvents to a key (what `projector
//! publish` runs), and a projection reading Redis adds what it emits the
//! same way, through the opener's [`RedisPublisher`]. This module owns the
//! client, its connection state, the mapping of entry IDs to positions, and
//! the CloudEvents binding for Redis (which has none of its own: see
//! [`parse`]).
//!
//! Why it is shaped so:
//!
//! - **The projection's database is the truth.** A reader reads with
//!   `XREAD` from the entry IDs its checkpoint holds, one partition per
//!   stream key (`redis:db<N>/<key>`); no consumer group is made, so nothing
//!   the server remembers decides where a reader starts, and replicas never
//!   share or steal entries. [`Source::acknowledge`] has nothing to tell
//!   the server.
//! - **Positions are entry IDs.** An ID `ms-seq` is the position
//!   `ms << 20 | seq`: monotonic and reversible, so the checkpoint gives the
//!   ID to read after. A sequence of 2^20 or more within one millisecond,
//!   or a time past 2^43 ms (the year 2248), cannot be a position: reading
//!   one is an error naming the entry.
//! - **One atomic read.** A Lua script reads every key's next entries and,
//!   in the same step, how far trimming (`MAXLEN`, `XTRIM`) reached
//!   (`XINFO STREAM`'s first entry, `entries-added` and length, Redis 7),
//!   which [`Ordinals`] turn into how many entries after the checkpoint were
//!   dropped: an entry dropped before it was read is an error naming the
//!   key, never a silent gap. Entries of several keys are merged in
//!   entry-ID order, up to where every key's read is complete.
//! - **Blocking work never runs on the async runtime.** A reader prefetches
//!   on a thread of its own (the blocking client, `XREAD BLOCK` to wait),
//!   decoding the CloudEvents there, into a bounded buffer the runner's
//!   thread drains; a seek starts a new thread from the new position.

use crate::bindings::Event;
use crate::sources::cloudevents::{self, CloudEventError};
use crate::sources::embedded::{AppendOutcome, NewEvent};
use crate::sources::{
    Batch, Checkpoint, Filter, Health, Malformed, Progress, Publisher, Source, SourceError, SourceOpener,
    Wake, lock, retry_delay,
};
use ::redis::{Client, Connection, ConnectionLike as _, IntoConnectionInfo as _, RedisError, Script, Value};
use anyhow::{Context as _, Result};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bits of a position that hold the entry ID's sequence.
const SEQUENCE_BITS: u32 = 20;
/// The largest entry time (ms) a position holds: positions stay below
/// 2^63, as SQLite keeps them.
const MAX_MS: u64 = (1 << (63 - SEQUENCE_BITS)) - 1;

/// The field a structured-mode entry holds its CloudEvent in.
pub const STRUCTURED_FIELD: &str = "cloudevent";
/// The prefix of a binary-mode entry's attribute fields.
pub const BINARY_PREFIX: &str = "ce_";
/// The field a binary-mode entry holds its data in.
pub const DATA_FIELD: &str = "data";

/// Entries asked for per key in one read.
const READ_COUNT: usize = 1000;
/// Entries a reader prefetches before it waits for its runner to take some.
const BUFFER_ENTRIES: usize = 8192;
/// Bytes of entries a reader prefetches at most.
const BUFFER_BYTES: usize = 64 << 20;
/// How long one `XREAD BLOCK` waits for new entries (a reader that seeks
/// or is dropped leaves its thread at most this long).
const BLOCK: Duration = Duration::from_millis(500);
/// How long connecting, and any command, may take.
const TIMEOUT: Duration = Duration::from_secs(3);
/// After the first entry of a batch, how long more a read waits for others.
const FILL: Duration = Duration::from_millis(5);
/// How long a read waits at most, past the caller's wait, for the reader to
/// say whether anything is there: an idle batch means caught up.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the head and lag, read from the server, are reused.
const HEAD_CACHE: Duration = Duration::from_secs(1);
/// Lag is counted exactly up to this many entries behind.
const LAG_EXACT: u64 = 10_000;
/// How many entries after a reader's starting point it counts at most, to
/// learn how many were added before (see [`Ordinals`]).
const COUNT_LIMIT: u64 = 100_000;

/// The position of entry ID `ms-seq`, or why it has none.
pub fn position(id: &str) -> Result<u64, String> {
    let parsed =
        id.split_once('-').and_then(|(ms, seq)| Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?)));
    let Some((ms, seq)) = parsed else {
        return Err(format!("{id:?} is not a stream entry ID (ms-seq)"));
    };
    if seq >= 1 << SEQUENCE_BITS || ms > MAX_MS {
        return Err(format!(
            "entry ID {id} cannot be a position: positions hold sequences below 2^{SEQUENCE_BITS} within one \
             millisecond and times up to {MAX_MS} ms; add entries with IDs Redis generates (`*`)"
        ));
    }
    Ok(ms << SEQUENCE_BITS | seq)
}

/// The entry ID of `position`.
pub fn entry_id(position: u64) -> String {
    format!("{}-{}", position >> SEQUENCE_BITS, position & ((1 << SEQUENCE_BITS) - 1))
}

/// The key a Redis database's partitions go by in checkpoints: `redis:db<N>`
/// (each stream key a partition `redis:db<N>/<key>`). Not the server's
/// address: moving the data to another server keeps every checkpoint.
pub fn source_key(db: i64) -> String {
    format!("redis:db{db}")
}

/// A server URL, checked, and how messages name it (without a password).
fn server(url: &str) -> Result<(Client, String)> {
    let info = url.into_connection_info().with_context(|| {
        format!("{url:?} is not a Redis URL; write redis://host:port or redis://host:port/db")
    })?;
    let shown = format!("redis://{}/{}", info.addr(), info.redis_settings().db());
    let client = Client::open(info).with_context(|| format!("cannot set up a Redis client for {shown}"))?;
    Ok((client, shown))
}

/// A connection with timeouts on every command.
fn connect(client: &Client, shown: &str, read_timeout: Duration) -> Result<Connection, String> {
    let connection = client
        .get_connection_with_timeout(TIMEOUT)
        .map_err(|err| format!("cannot connect to Redis at {shown}: {err}; retrying"))?;
    connection
        .set_read_timeout(Some(read_timeout))
        .and_then(|()| connection.set_write_timeout(Some(TIMEOUT)))
        .map_err(|err| format!("cannot connect to Redis at {shown}: {err}; retrying"))?;
    Ok(connection)
}

/// Whether `err` means the server cannot be reached now (try again), not
/// that the request was wrong.
fn transient(err: &RedisError) -> bool {
    use ::redis::{ErrorKind, ServerErrorKind};
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain | ServerErrorKind::MasterDown
            )
        )
}

/// Opens readers of one Redis server's streams.
pub struct RedisOpener {
    name: String,
    client: Client,
    shown: String,
    key: String,
}

impl RedisOpener {
    /// Readers of the server at `url`, for the source `name`. Connects only
    /// when reading: a server that is down now is retried, and its readers
    /// report `connecting` meanwhile.
    pub fn new(name: &str, url: &str) -> Result<Self> {
        let (client, shown) = server(url).with_context(|| format!("source {name}"))?;
        let key = source_key(client.get_connection_info().redis_settings().db());
        Ok(RedisOpener { name: name.to_string(), client, shown, key })
    }
}

impl SourceOpener for RedisOpener {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&self, filter: &Filter, _reader: &str) -> Result<Box<dyn Source>> {
        if filter.streams.is_empty() {
            anyhow::bail!("source {}: name the stream keys to read in the projection's `streams`", self.name);
        }
        Ok(Box::new(RedisSource::new(self, filter)))
    }

    fn publisher(&self, routes: &std::collections::BTreeMap<String, String>) -> Option<Arc<dyn Publisher>> {
        Some(Arc::new(RedisPublisher {
            client: self.client.clone(),
            shown: self.shown.clone(),
            routes: routes.clone(),
            connection: Mutex::new(None),
        }))
    }
}

/// An entry as the server returned it, with its CloudEvent decoded.
struct Fetched {
    /// Which of the reader's keys it is in.
    stream: usize,
    position: u64,
    id: String,
    /// Its fields, kept only while they are needed to report it as
    /// malformed.
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    parsed: Result<NewEvent, String>,
    bytes: usize,
}

/// Why the prefetching thread cannot go on.
#[derive(Clone)]
enum Failure {
    /// The server cannot be reached now: trying again.
    Unavailable(String),
    /// Reading on would lose or misplace an event: the projection faults.
    Failed(String),
}

/// What the prefetching thread and the reader share.
struct Shared {
    inner: Mutex<Inner>,
    /// Signalled when entries arrive, a failure is recorded, or a wake is
    /// asked for.
    ready: Condvar,
    /// Signalled when the reader takes entries out of a full buffer, or
    /// the generation changes.
    space: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Which prefetching thread may fill `buffer`: a seek starts a new one.
    generation: u64,
    buffer: VecDeque<Fetched>,
    buffered_bytes: usize,
    /// The last read found nothing more: caught up with the server.
    settled: bool,
    /// Whether a connection has been made once.
    connected: bool,
    failure: Option<Failure>,
    /// Counts wakes asked for: a waiting read returns when it changes.
    wakes: u64,
    /// What an operator should know (entries trimmed before being read).
    warning: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Record what the thread of `generation` found, if it is still
    /// current.
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

/// Wakes a reader waiting in [`RedisSource::next_batch`].
struct RedisWaker(Arc<Shared>);

impl Wake for RedisWaker {
    fn wake(&self) {
        self.0.lock().wakes += 1;
        self.0.ready.notify_all();
    }
}

/// What a prefetching thread reads.
#[derive(Clone)]
struct Reading {
    client: Client,
    shown: String,
    shared: Arc<Shared>,
    /// The stream keys.
    streams: Arc<[String]>,
}

/// One reader of a projection's stream keys.
pub struct RedisSource {
    reading: Reading,
    key: String,
    /// Each stream key's partition in checkpoints.
    partitions: Vec<Arc<str>>,
    types: Option<Vec<String>>,
    /// The positions the buffered entries follow, per key. `None` before
    /// any read.
    expected: Option<Vec<u64>>,
    /// Entries taken out of the shared buffer, not yet handed out.
    backlog: VecDeque<Fetched>,
    /// A connection for head and lag, made when first needed.
    progress_connection: Option<Connection>,
    /// Head and lag as last read from the server, for the checkpoint then.
    head: Option<(Instant, Vec<u64>, Progress)>,
}

impl RedisSource {
    fn new(opener: &RedisOpener, filter: &Filter) -> Self {
        let partitions =
            filter.streams.iter().map(|stream| format!("{}/{stream}", opener.key).into()).collect();
        RedisSource {
            reading: Reading {
                client: opener.client.clone(),
                shown: opener.shown.clone(),
                shared: Arc::new(Shared {
                    inner: Mutex::default(),
                    ready: Condvar::new(),
                    space: Condvar::new(),
                }),
                streams: filter.streams.clone().into(),
            },
            key: opener.key.clone(),
            partitions,
            types: filter.types.clone(),
            expected: None,
            backlog: VecDeque::new(),
            progress_connection: None,
            head: None,
        }
    }

    /// Each key's position in `checkpoint`.
    fn cursors(&self, checkpoint: &Checkpoint) -> Vec<u64> {
        self.partitions.iter().map(|partition| checkpoint.position(partition)).collect()
    }

    /// Forget what was prefetched and read again from `after`.
    fn seek(&mut self, after: Vec<u64>) {
        let generation = {
            let mut inner = self.reading.shared.lock();
            inner.generation += 1;
            inner.buffer.clear();
            inner.buffered_bytes = 0;
            inner.settled = false;
            inner.failure = None;
            inner.generation
        };
        self.reading.shared.space.notify_all();
        self.backlog.clear();
        self.expected = Some(after.clone());
        let reading = self.reading.clone();
        std::thread::Builder::new()
            .name("redis-reader".into())
            .spawn(move || prefetch(reading, generation, after))
            .expect("cannot start a Redis reader thread");
    }

    /// Wait until an entry is buffered, a wake is asked for, or `until`;
    /// then move what is buffered (up to `max`) to the backlog.
    fn take(&mut self, max: usize, until: Instant, wakes: u64) -> MutexGuard<'_, Inner> {
        let shared = &self.reading.shared;
        let mut inner = shared.lock();
        while inner.buffer.is_empty() && inner.wakes == wakes && inner.failure.is_none() {
            let now = Instant::now();
            if now >= until {
                break;
            }
            inner = shared.ready.wait_timeout(inner, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        let n = inner.buffer.len().min(max.max(1));
        if n > 0 {
            let mut bytes = 0;
            for entry in inner.buffer.drain(..n) {
                bytes += entry.bytes;
                self.backlog.push_back(entry);
            }
            inner.buffered_bytes = inner.buffered_bytes.saturating_sub(bytes);
            shared.space.notify_all();
        }
        inner
    }

    /// Head and lag of every key, from the server.
    fn read_progress(&mut self, cursors: &[u64]) -> Result<Progress, SourceError> {
        let connection = match &mut self.progress_connection {
            Some(connection) => connection,
            None => {
                let connection = connect(&self.reading.client, &self.reading.shown, TIMEOUT)
                    .map_err(SourceError::Unavailable)?;
                self.progress_connection.insert(connection)
            }
        };
        let mut invocation = progress_script().prepare_invoke();
        for stream in self.reading.streams.iter() {
            invocation.key(stream.as_str());
        }
        invocation.arg(LAG_EXACT);
        for cursor in cursors {
            invocation.arg(entry_id(*cursor));
        }
        let reply: Value = match invocation.invoke(connection) {
            Ok(reply) => reply,
            Err(err) => {
                if transient(&err) || !connection.is_open() {
                    self.progress_connection = None;
                    return Err(SourceError::Unavailable(format!(
                        "lost the connection to Redis at {} ({err}); reconnecting",
                        self.reading.shown
                    )));
                }
                return Err(SourceError::Failed(anyhow::anyhow!(
                    "cannot read the stream keys {} on {}: {err}",
                    self.reading.streams.join(", "),
                    self.reading.shown
                )));
            }
        };
        let rows = array(reply);
        let mut progress = Progress::default();
        for (i, row) in rows.into_iter().enumerate() {
            let mut row = array(row).into_iter();
            let last = text(row.next().unwrap_or_default());
            let lag = match row.next() {
                Some(Value::Int(n)) => n.max(0) as u64,
                _ => 0,
            };
            if !last.is_empty() {
                let head = position(&last).map_err(|err| {
                    SourceError::Failed(anyhow::anyhow!("stream key {}: {err}", self.reading.streams[i]))
                })?;
                progress.head.set(&self.partitions[i], head);
            }
            progress.lag += lag;
        }
        Ok(progress)
    }
}

impl Drop for RedisSource {
    fn drop(&mut self) {
        // Nothing fills the buffer any more: the thread ends at its next
        // look.
        self.reading.shared.lock().generation += 1;
        self.reading.shared.space.notify_all();
    }
}

impl Source for RedisSource {
    fn key(&self) -> &str {
        &self.key
    }

    fn next_batch(&mut self, after: &Checkpoint, max: usize, wait: Duration) -> Result<Batch, SourceError> {
        let from = self.cursors(after);
        if self.expected.as_ref() != Some(&from) {
            self.seek(from.clone());
        }
        let max = max.max(1);
        let mut batch = Batch { end: after.clone(), ..Batch::default() };
        let mut last = from.clone();
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
                let settled = inner.settled;
                drop(inner);
                if self.backlog.is_empty() {
                    if last == from && fill_until.is_none() && !woken {
                        match failure {
                            Some(Failure::Unavailable(reason)) => {
                                return Err(SourceError::Unavailable(reason));
                            }
                            Some(Failure::Failed(reason)) => {
                                return Err(SourceError::Failed(anyhow::anyhow!(reason)));
                            }
                            None => {}
                        }
                        // Nothing yet, but the reader has not said there is
                        // nothing: an idle batch means caught up, so wait
                        // for that a little longer.
                        if !settled && !settling && Instant::now() < started + SETTLE {
                            settling = true;
                            continue;
                        }
                    }
                    break;
                }
                fill_until.get_or_insert_with(|| Instant::now() + FILL);
            }
            let entry = self.backlog.pop_front().expect("the backlog is not empty");
            if entry.position <= last[entry.stream] {
                continue;
            }
            let wanted = match &entry.parsed {
                Ok(parsed) => {
                    Some(self.types.as_ref().is_none_or(|types| types.contains(&parsed.event_type)))
                }
                Err(_) => None,
            };
            match (wanted, &entry.parsed) {
                (Some(wanted), _) => {
                    last[entry.stream] = entry.position;
                    if wanted {
                        let partition = self.partitions[entry.stream].clone();
                        batch.events.push(to_event(&self.reading.streams[entry.stream], entry));
                        batch.partitions.push(partition);
                        if batch.events.len() >= max {
                            break;
                        }
                    }
                }
                (None, _) if last != from => {
                    // A malformed entry comes alone: next time.
                    self.backlog.push_front(entry);
                    break;
                }
                (None, Err(reason)) => {
                    last[entry.stream] = entry.position;
                    let stream = &self.reading.streams[entry.stream];
                    let partition = &self.partitions[entry.stream];
                    batch.malformed = Some(to_malformed(stream, partition, &entry, reason));
                    break;
                }
                (None, Ok(_)) => unreachable!("an entry without a reason to refuse it is wanted or not"),
            }
        }
        for (i, (position, before)) in last.iter().zip(&from).enumerate() {
            if position != before {
                batch.end.set(&self.partitions[i], *position);
            }
        }
        self.expected = Some(last);
        Ok(batch)
    }

    fn acknowledge(&mut self, _upto: &Checkpoint) -> Result<(), SourceError> {
        // No consumer group: the checkpoint committed with the state is
        // the acknowledgement, and the next read starts from it.
        Ok(())
    }

    fn progress(&mut self, at: &Checkpoint) -> Result<Progress, SourceError> {
        let cursors = self.cursors(at);
        if let Some((read, for_cursors, progress)) = &self.head
            && read.elapsed() < HEAD_CACHE
            && *for_cursors == cursors
        {
            return Ok(progress.clone());
        }
        match self.read_progress(&cursors) {
            Ok(progress) => {
                self.head = Some((Instant::now(), cursors, progress.clone()));
                Ok(progress)
            }
            Err(SourceError::Unavailable(reason)) => match &self.head {
                // The last head known, with the lag counted from it.
                Some((_, _, known)) => {
                    let reached =
                        known.head.partitions().all(|(partition, head)| at.position(partition) >= head);
                    Ok(Progress { head: known.head.clone(), lag: if reached { 0 } else { known.lag.max(1) } })
                }
                None => Err(SourceError::Unavailable(reason)),
            },
            Err(err) => Err(err),
        }
    }

    fn health(&self) -> Health {
        let inner = self.reading.shared.lock();
        match &inner.failure {
            Some(Failure::Unavailable(reason)) => Health::Connecting { error: Some(reason.clone()) },
            _ if !inner.connected => Health::Connecting { error: None },
            _ => Health::Connected,
        }
    }

    fn warning(&self) -> Option<String> {
        self.reading.shared.lock().warning.clone()
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(RedisWaker(self.reading.shared.clone()))
    }
}

/// The script a reader reads with: for each key (`KEYS`), its first entry
/// ID, how many entries were ever added to it and how many it holds, and
/// (when `ARGV[n+1+i]` is `1`) how many follow its ID (`-1` past
/// [`COUNT_LIMIT`]); then one `XREAD` after each key's ID (`ARGV[2..n+1]`,
/// at most `ARGV[1]` entries per key) — all in one step, so no trimming
/// falls between them. A key that holds something other than a stream is an
/// error naming it.
fn read_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(&format!(
            r#"#!lua flags=no-writes
local n = #KEYS
local trims = {{}}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  local first, added, length, after = '', 0, 0, -1
  if kind == 'stream' then
    local info = redis.call('XINFO', 'STREAM', key)
    for j = 1, #info, 2 do
      if info[j] == 'entries-added' then
        added = info[j + 1]
      elseif info[j] == 'length' then
        length = info[j + 1]
      elseif info[j] == 'first-entry' and info[j + 1] then
        first = info[j + 1][1]
      end
    end
    if ARGV[n + 1 + i] == '1' then
      local counted = #redis.call('XRANGE', key, '(' .. ARGV[1 + i], '+', 'COUNT', {COUNT_LIMIT})
      if counted < {COUNT_LIMIT} then after = counted end
    end
  elseif kind ~= 'none' then
    return redis.error_reply('WRONGTYPE key ' .. key .. ' holds a ' .. kind .. ', not a stream')
  end
  trims[i] = {{first, added, length, after}}
end
local args = {{'COUNT', ARGV[1], 'STREAMS'}}
for i, key in ipairs(KEYS) do args[#args + 1] = key end
for i = 2, n + 1 do args[#args + 1] = ARGV[i] end
return {{trims, redis.call('XREAD', unpack(args))}}
"#
        ))
    })
}

/// The script status reads with: for each key (`KEYS`), its last entry ID
/// (empty when it has none) and how many entries follow its checkpoint ID
/// (`ARGV[2..]`): counted exactly up to `ARGV[1]`; past that, the entries
/// less those up to the checkpoint when fewer than `ARGV[1]`, else the
/// length less `ARGV[1]` (an upper bound).
fn progress_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(
            r#"#!lua flags=no-writes
local exact = tonumber(ARGV[1])
local reply = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then
    reply[i] = {'', 0}
  elseif kind ~= 'stream' then
    return redis.error_reply('WRONGTYPE key ' .. key .. ' holds a ' .. kind .. ', not a stream')
  else
    local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    local head = ''
    if #last > 0 then head = last[1][1] end
    local lag = #redis.call('XRANGE', key, '(' .. ARGV[i + 1], '+', 'COUNT', exact)
    if lag >= exact then
      local before = #redis.call('XREVRANGE', key, ARGV[i + 1], '-', 'COUNT', exact)
      lag = math.max(lag, redis.call('XLEN', key) - before)
    end
    reply[i] = {head, lag}
  end
end
return reply
"#,
        )
    })
}

/// The script [`publish`] adds entries with: for each (id, CloudEvent)
/// pair in `ARGV`, adds the id to the set `KEYS[2]` and, when it was not
/// there, the event to the stream `KEYS[1]` in field `cloudevent`. The
/// types are checked first, so no command fails halfway: all or nothing.
fn publish_script() -> &'static Script {
    static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(
            r#"#!lua
local stream = redis.call('TYPE', KEYS[1]).ok
if stream ~= 'stream' and stream ~= 'none' then
  return redis.error_reply('WRONGTYPE key ' .. KEYS[1] .. ' holds a ' .. stream .. ', not a stream')
end
local ids = redis.call('TYPE', KEYS[2]).ok
if ids ~= 'set' and ids ~= 'none' then
  return redis.error_reply('WRONGTYPE key ' .. KEYS[2] .. ' holds a ' .. ids .. ', not the set of published ids')
end
local published, duplicates = 0, 0
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'cloudevent', ARGV[i + 1])
    published = published + 1
  else
    duplicates = duplicates + 1
  end
end
return {published, duplicates}
"#,
        )
    })
}

/// The items of an array reply (none for anything else).
fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => Vec::new(),
    }
}

/// A string reply's bytes (none for anything else).
fn bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(text) => text.into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// A string reply as text.
fn text(value: Value) -> String {
    String::from_utf8_lossy(&bytes(value)).into_owned()
}

/// The prefetching thread of one generation: reads from `cursors` on, into
/// the shared buffer, reconnecting whenever the connection fails, until
/// its generation is over or reading on would lose an entry.
fn prefetch(reading: Reading, generation: u64, mut cursors: Vec<u64>) {
    let shared = &reading.shared;
    let mut ordinals = Ordinals::new(&cursors);
    let mut connection = None;
    let mut attempt = 0;
    loop {
        if shared.lock().generation != generation {
            return;
        }
        let result = match &mut connection {
            Some(connection) => read(&reading, generation, connection, &mut cursors, &mut ordinals),
            None => match connect(&reading.client, &reading.shown, BLOCK + TIMEOUT) {
                Ok(made) => {
                    connection = Some(made);
                    continue;
                }
                Err(reason) => Err(Failure::Unavailable(reason)),
            },
        };
        match result {
            Ok(true) => attempt = 0,
            Ok(false) => return,
            Err(Failure::Unavailable(reason)) => {
                attempt += 1;
                connection = None;
                tracing::debug!(server = %reading.shown, "Redis reader retrying: {reason}");
                if !shared.update(generation, |inner| inner.failure = Some(Failure::Unavailable(reason))) {
                    return;
                }
                std::thread::sleep(retry_delay(attempt));
            }
            Err(failure) => {
                shared.update(generation, |inner| inner.failure = Some(failure));
                return;
            }
        }
    }
}

/// One read, its entries moved into the buffer (or a wait for new ones
/// when there were none): `Ok(false)` when the generation is over.
fn read(
    reading: &Reading,
    generation: u64,
    connection: &mut Connection,
    cursors: &mut [u64],
    ordinals: &mut Ordinals,
) -> Result<bool, Failure> {
    let shared = &reading.shared;
    let failed = |err: RedisError, open: bool, what: &str| match transient(&err) || !open {
        true => Failure::Unavailable(format!(
            "lost the connection to Redis at {} ({err}); reconnecting",
            reading.shown
        )),
        false => Failure::Failed(format!(
            "cannot {what} stream keys {} on {}: {err}",
            reading.streams.join(", "),
            reading.shown
        )),
    };
    let mut invocation = read_script().prepare_invoke();
    for stream in reading.streams.iter() {
        invocation.key(stream.as_str());
    }
    invocation.arg(READ_COUNT);
    for cursor in cursors.iter() {
        invocation.arg(entry_id(*cursor));
    }
    let counting: Vec<bool> = ordinals.known.iter().map(|known| *known == Known::Ask).collect();
    for count in &counting {
        invocation.arg(if *count { "1" } else { "0" });
    }
    let reply: Value = match invocation.invoke(connection) {
        Ok(reply) => reply,
        Err(err) => return Err(failed(err, connection.is_open(), "read")),
    };
    let mut reply = array(reply).into_iter();
    let trims = array(reply.next().unwrap_or_default());
    let streams = array(reply.next().unwrap_or_default());
    if !shared.update(generation, |inner| {
        inner.connected = true;
        inner.failure = None;
    }) {
        return Ok(false);
    }

    // Entries after a cursor trimmed (or deleted) before they were read.
    for (i, trim) in trims.into_iter().enumerate() {
        let mut trim = array(trim).into_iter();
        let first = text(trim.next().unwrap_or_default());
        let mut number = || match trim.next() {
            Some(Value::Int(n)) => n,
            _ => -1,
        };
        let (added, length, after) = (number().max(0) as u64, number().max(0) as u64, number());
        let key = &reading.streams[i];
        let first_position = match first.is_empty() {
            true => None,
            false => {
                Some(position(&first).map_err(|err| Failure::Failed(format!("stream key {key}: {err}")))?)
            }
        };
        let cursor = cursors[i];
        if counting[i] {
            // Counted from a cursor still in the stream: it is the entry
            // added `added - after`th.
            ordinals.known[i] = match (after, first_position) {
                (after, Some(first)) if after >= 0 && first <= cursor => {
                    Known::At(added.saturating_sub(after as u64))
                }
                _ => Known::Unknown,
            };
        }
        if first_position.is_some_and(|first| first <= cursor) {
            continue;
        }
        // Everything up to the first entry is gone: how much of it came
        // after the cursor?
        let removed = added.saturating_sub(length);
        let dropped = match ordinals.known[i] {
            Known::At(ordinal) => removed.saturating_sub(ordinal),
            // Not known (the cursor's own entry was gone already when this
            // reader started): anything removed may have followed it.
            Known::Unknown | Known::Ask => removed,
        };
        if dropped == 0 {
            continue;
        }
        let first = match first_position {
            Some(_) => format!("its first entry is now {first}"),
            None => "it is empty now".to_string(),
        };
        let warning = format!(
            "stream key {key}: entries were trimmed (MAXLEN, XTRIM) or deleted before this projection read them \
             ({dropped} at most), and {first}; a rebuild cannot see them"
        );
        if !shared.update(generation, |inner| {
            if inner.warning.as_ref() != Some(&warning) {
                tracing::warn!("{warning}");
            }
            inner.warning = Some(warning);
        }) {
            return Ok(false);
        }
        if cursor > 0 {
            let what = match ordinals.known[i] {
                Known::At(_) => format!("{dropped} entries after it were dropped before it read them"),
                _ => {
                    "entries after it may have been dropped before it read them (the checkpoint's own entry \
                      was gone already when reading started, so how many is not known)"
                        .to_string()
                }
            };
            return Err(Failure::Failed(format!(
                "stream key {key} on {}: the stream was trimmed (MAXLEN, XTRIM) past this projection's \
                 checkpoint (entry {}), and {first}: {what}, so it cannot apply them. Keep the stream longer \
                 (a larger MAXLEN), and rebuild the projection (`projector rebuild`) from what the stream still \
                 holds: a rebuild cannot see what was dropped",
                reading.shown,
                entry_id(cursor)
            )));
        }
        // Reading from the start: what is left is all there is.
        ordinals.known[i] = Known::At(removed);
    }

    // Each key's entries, in order.
    let mut fetched: Vec<Vec<Fetched>> = (0..reading.streams.len()).map(|_| Vec::new()).collect();
    for stream in streams {
        let mut stream = array(stream).into_iter();
        let name = bytes(stream.next().unwrap_or_default());
        let Some(index) = reading.streams.iter().position(|key| key.as_bytes() == name) else { continue };
        for entry in array(stream.next().unwrap_or_default()) {
            let mut entry = array(entry).into_iter();
            let id = text(entry.next().unwrap_or_default());
            let position = position(&id)
                .map_err(|err| Failure::Failed(format!("stream key {}: {err}", reading.streams[index])))?;
            let mut fields = Vec::new();
            let mut values = array(entry.next().unwrap_or_default()).into_iter();
            while let (Some(field), Some(value)) = (values.next(), values.next()) {
                fields.push((bytes(field), bytes(value)));
            }
            let bytes = fields.iter().map(|(f, v)| f.len() + v.len()).sum::<usize>() + id.len();
            let parsed = parse(&fields);
            // Kept only to report a malformed entry: a decoded one's fields
            // are dropped here, not by the runner.
            let fields = if parsed.is_ok() { Vec::new() } else { fields };
            fetched[index].push(Fetched { stream: index, position, id, fields, parsed, bytes });
        }
    }
    if fetched.iter().all(Vec::is_empty) {
        let mut inner = shared.lock();
        if inner.generation != generation {
            return Ok(false);
        }
        inner.settled = true;
        drop(inner);
        shared.ready.notify_all();
        // Wait for something new (the reply itself is read next time).
        let mut wait = ::redis::cmd("XREAD");
        wait.arg("COUNT").arg(1).arg("BLOCK").arg(BLOCK.as_millis() as u64).arg("STREAMS");
        for stream in reading.streams.iter() {
            wait.arg(stream.as_str());
        }
        for cursor in cursors.iter() {
            wait.arg(entry_id(*cursor));
        }
        if let Err(err) = connection.req_command(&wait) {
            return Err(failed(err, connection.is_open(), "wait on"));
        }
        return Ok(true);
    }

    // Merged in ID order, up to where every key's read is complete: a key
    // that returned all it was asked for may hold more before the others'
    // later entries.
    let bound = fetched
        .iter()
        .filter(|entries| entries.len() >= READ_COUNT)
        .filter_map(|entries| entries.last().map(|entry| entry.position))
        .min()
        .unwrap_or(u64::MAX);
    let mut merged: Vec<Fetched> =
        fetched.into_iter().flatten().filter(|entry| entry.position <= bound).collect();
    merged.sort_by_key(|entry| (entry.position, entry.stream));
    for entry in merged {
        cursors[entry.stream] = entry.position;
        if let Known::At(ordinal) = &mut ordinals.known[entry.stream] {
            *ordinal += 1;
        }
        if !push(shared, generation, entry) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Which entry of its key each of a reader's cursors is, counting every
/// entry ever added (`entries-added`): what tells a trimming that removed
/// only entries already read from one that removed entries after the
/// cursor. Known from the start for a reader from 0; counted once (up to
/// [`COUNT_LIMIT`] entries) for one starting further on, while the
/// cursor's entry is still in the stream; then kept by counting what is
/// read. (An entry deleted with `XDEL` after the cursor counts as dropped
/// once trimming reaches past the cursor.)
struct Ordinals {
    known: Vec<Known>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// The cursor is the entry added this many-th (0: before the first).
    At(u64),
    /// To be counted in the next read.
    Ask,
    /// Could not be counted.
    Unknown,
}

impl Ordinals {
    fn new(cursors: &[u64]) -> Self {
        Ordinals { known: cursors.iter().map(|c| if *c == 0 { Known::At(0) } else { Known::Ask }).collect() }
    }
}

/// Add an entry for the reader, waiting while the buffer is full. False
/// when this thread's generation is over.
fn push(shared: &Shared, generation: u64, entry: Fetched) -> bool {
    let mut inner = shared.lock();
    loop {
        if inner.generation != generation {
            return false;
        }
        let full = inner.buffer.len() >= BUFFER_ENTRIES || inner.buffered_bytes >= BUFFER_BYTES;
        if !full || inner.buffer.is_empty() {
            inner.buffered_bytes += entry.bytes;
            inner.buffer.push_back(entry);
            inner.settled = false;
            drop(inner);
            shared.ready.notify_all();
            return true;
        }
        inner =
            shared.space.wait_timeout(inner, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
    }
}

/// An entry's CloudEvent, by this project's Redis binding: structured mode
/// when it has a `cloudevent` field (a CloudEvents JSON object), binary
/// mode when it has a `ce_specversion` field (attributes in `ce_` fields,
/// the data in `data`, its type in `ce_datacontenttype`); or why it is
/// neither.
pub fn parse(fields: &[(Vec<u8>, Vec<u8>)]) -> Result<NewEvent, String> {
    let field = |name: &str| fields.iter().rev().find(|(f, _)| f == name.as_bytes()).map(|(_, v)| v);
    if let Some(body) = field(STRUCTURED_FIELD) {
        return match std::str::from_utf8(body) {
            Ok(text) => cloudevents::parse_event(text).map_err(|err| match err {
                CloudEventError::NotAnEvent(_) => {
                    format!(
                        "a structured-mode entry whose `{STRUCTURED_FIELD}` field is no CloudEvent: {err}"
                    )
                }
                err => format!("a structured-mode CloudEvent with a bad attribute: {err}"),
            }),
            Err(err) => {
                Err(format!("a structured-mode entry whose `{STRUCTURED_FIELD}` field is not UTF-8: {err}"))
            }
        };
    }
    if field("ce_specversion").is_none() {
        return Err(format!(
            "neither a structured-mode CloudEvent (no `{STRUCTURED_FIELD}` field) nor a binary-mode one (no \
             `ce_specversion` field)"
        ));
    }
    let mut pairs = Vec::new();
    for (name, value) in fields {
        let Some(attribute) = name.strip_prefix(BINARY_PREFIX.as_bytes()) else { continue };
        let attribute = String::from_utf8_lossy(attribute);
        let value = std::str::from_utf8(value)
            .map_err(|_| format!("a binary-mode CloudEvent whose field ce_{attribute} is not UTF-8"))?;
        pairs.push((format!("ce-{attribute}"), value));
    }
    let data = field(DATA_FIELD).map(Vec::as_slice).unwrap_or_default();
    cloudevents::from_binary(pairs.iter().map(|(name, value)| (name.as_str(), *value)), data, false)
        .map_err(|err| format!("a binary-mode CloudEvent with a bad field: {err}"))
}

/// The event an entry carries: its key as the stream, its ID as the
/// position.
fn to_event(stream: &str, entry: Fetched) -> Event {
    let event = entry.parsed.expect("a parsed entry");
    Event {
        stream: stream.to_string(),
        position: entry.position,
        id: event.id,
        type_: event.event_type,
        subject: event.subject,
        time: event.time,
        correlation_id: event.correlation_id,
        causation_id: event.causation_id,
        data: event.data,
    }
}

/// An entry that is no event, as far as it can be read: named by its
/// `ce_id` field, or by its partition and entry ID; its fields as a JSON
/// object as the data.
fn to_malformed(stream: &str, partition: &str, entry: &Fetched, reason: &str) -> Malformed {
    let id = entry
        .fields
        .iter()
        .find(|(name, _)| name == b"ce_id")
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{partition}:{}", entry.id));
    let fields: serde_json::Map<String, serde_json::Value> = entry
        .fields
        .iter()
        .map(|(name, value)| {
            (String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned().into())
        })
        .collect();
    Malformed {
        event: Event {
            stream: stream.to_string(),
            position: entry.position,
            id,
            type_: String::new(),
            subject: None,
            time: None,
            correlation_id: None,
            causation_id: None,
            data: serde_json::Value::Object(fields).to_string().into_bytes(),
        },
        reason: reason.to_string(),
    }
}

/// The set `projector publish` keeps the ids it added to stream `key` in:
/// `projector:ids:{<key>}` (the braces keep it in the key's cluster slot).
pub fn ids_key(key: &str) -> String {
    format!("projector:ids:{{{key}}}")
}

/// A stream key to read or publish to: 1 to 512 bytes, no whitespace or
/// control characters.
pub fn validate_key(key: &str) -> Result<()> {
    let ok = !key.is_empty() && key.len() <= 512 && !key.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        anyhow::bail!("{key:?} is not a stream key: use 1 to 512 bytes without whitespace, e.g. \"wallets\"");
    }
    Ok(())
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PublishOutcome {
    /// Events added to the stream.
    pub published: u64,
    /// Events whose id `projector publish` had added to this key before
    /// (or that came earlier in the same input): not added again.
    pub duplicates: u64,
}

/// Add `events` to stream `key` on the server at `url`, in structured mode
/// (field `cloudevent`), all or none, in one script: an id this function
/// added to the key before is dropped as a duplicate (the ids are kept in
/// the set [`ids_key`]), so a publisher that retries cannot add one twice.
pub fn publish(url: &str, key: &str, events: &[NewEvent]) -> Result<PublishOutcome> {
    validate_key(key)?;
    let (client, shown) = server(url)?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .with_context(|| format!("cannot connect to Redis at {shown}"))?;
    connection.set_read_timeout(Some(Duration::from_secs(120))).ok();
    add_once(&mut connection, key, events).with_context(|| {
        format!(
            "cannot publish {} events to stream key {key} on {shown}; nothing of them was added unless the \
             connection was lost after the server took them: publishing again is safe, ids already there are \
             dropped as duplicates",
            events.len()
        )
    })
}

/// Run [`publish_script`]: `events` added to `key` in structured mode,
/// each unless its id is in [`ids_key`].
fn add_once(
    connection: &mut Connection,
    key: &str,
    events: &[NewEvent],
) -> Result<PublishOutcome, RedisError> {
    let mut invocation = publish_script().prepare_invoke();
    invocation.key(key).key(ids_key(key));
    for event in events {
        invocation.arg(event.id.as_str()).arg(cloudevents::to_json(event).to_string());
    }
    let (published, duplicates): (u64, u64) = invocation.invoke(connection)?;
    Ok(PublishOutcome { published, duplicates })
}

/// Publishes what a projection reading Redis emits: emitted stream `s` is
/// added to the stream key its route names (`s` itself when none does), as
/// `projector publish` adds (structured mode, the id recorded in
/// [`ids_key`] in the same script), so a publish repeated after a crash is
/// dropped by the server. One connection, kept and made again when lost.
struct RedisPublisher {
    client: Client,
    shown: String,
    routes: std::collections::BTreeMap<String, String>,
    connection: Mutex<Option<Connection>>,
}

impl Publisher for RedisPublisher {
    fn publish(&self, stream: &str, events: &[NewEvent]) -> Result<AppendOutcome> {
        let key = self.routes.get(stream).map_or(stream, String::as_str);
        validate_key(key)?;
        let mut slot = lock(&self.connection);
        if slot.is_none() {
            *slot = Some(
                connect(&self.client, &self.shown, Duration::from_secs(30)).map_err(anyhow::Error::msg)?,
            );
        }
        let connection = slot.as_mut().expect("made above");
        match add_once(connection, key, events) {
            Ok(outcome) => Ok(AppendOutcome { appended: outcome.published, duplicates: outcome.duplicates }),
            Err(err) => {
                if transient(&err) {
                    *slot = None;
                }
                Err(err).with_context(|| format!("cannot add to stream key {key} on {}", self.shown))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_map_to_positions_in_order_and_back() {
        let ids = [
            "0-0",
            "0-1",
            "1-0",
            "1-1048575",
            "2-0",
            "1700000000000-0",
            "1700000000000-7",
            "1700000000001-0",
        ];
        let positions: Vec<u64> = ids.iter().map(|id| position(id).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        for (id, position) in ids.iter().zip(&positions) {
            assert_eq!(&entry_id(*position), id);
        }
        assert_eq!(position("0-0").unwrap(), 0);
        assert!(position(&format!("{MAX_MS}-1048575")).unwrap() <= i64::MAX as u64);
    }

    #[test]
    fn ids_a_position_cannot_hold_are_refused_naming_the_limit() {
        let err = position("5-1048576").unwrap_err();
        assert!(err.contains("entry ID 5-1048576 cannot be a position") && err.contains("2^20"), "{err}");
        assert!(position(&format!("{}-0", MAX_MS + 1)).is_err());
        assert!(position("x").unwrap_err().contains("not a stream entry ID"));
    }

    fn fields(pairs: &[(&str, &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs.iter().map(|(f, v)| (f.as_bytes().to_vec(), v.to_vec())).collect()
    }

    #[test]
    fn structured_mode_reads_the_cloudevent_field() {
        let body = br#"{"specversion":"1.0","id":"e2","source":"s","type":"t","data":{"b":2}}"#;
        let event = parse(&fields(&[("cloudevent", body)])).unwrap();
        assert_eq!((event.id.as_str(), event.data.as_slice()), ("e2", &br#"{"b":2}"#[..]));
    }

    #[test]
    fn binary_mode_takes_attributes_from_ce_fields_and_data_from_the_data_field() {
        let event = parse(&fields(&[
            ("ce_specversion", b"1.0"),
            ("ce_id", b"e1"),
            ("ce_type", b"wallet_updated"),
            ("ce_source", b"tests"),
            ("ce_subject", b"u1"),
            ("ce_correlationid", b"c1"),
            ("ce_datacontenttype", b"application/json"),
            ("data", br#"{"a":1}"#),
        ]))
        .unwrap();
        assert_eq!((event.id.as_str(), event.event_type.as_str()), ("e1", "wallet_updated"));
        assert_eq!(event.subject.as_deref(), Some("u1"));
        assert_eq!(event.correlation_id.as_deref(), Some("c1"));
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(event.data, br#"{"a":1}"#);
    }

    #[test]
    fn an_entry_in_neither_mode_says_why() {
        let err = parse(&fields(&[("hello", b"world")])).unwrap_err();
        assert!(err.contains("neither a structured-mode CloudEvent (no `cloudevent` field)"), "{err}");
        let err = parse(&fields(&[("cloudevent", b"{")])).unwrap_err();
        assert!(err.contains("no CloudEvent: not a CloudEvent: invalid JSON"), "{err}");
        let err = parse(&fields(&[("ce_specversion", b"1.0"), ("ce_id", b"e3")])).unwrap_err();
        assert!(err.contains("missing required attribute `source`"), "{err}");
        let err = parse(&fields(&[("ce_specversion", b"1.0"), ("ce_id", b"\xff")])).unwrap_err();
        assert!(err.contains("field ce_id is not UTF-8"), "{err}");
    }

    #[test]
    fn stream_keys_are_plain() {
        assert!(validate_key("wallets").is_ok());
        assert!(validate_key("app:{eu}:wallets").is_ok());
        for bad in ["", "a b", "a\nb"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }
}
