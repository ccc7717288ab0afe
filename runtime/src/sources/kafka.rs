//! Kafka as a [`Source`]: [`KafkaOpener`] opens readers of one configured
//! `[sources.<name>]`, [`KafkaSource`] reads a projection's topics (every
//! partition of each), [`publish`] produces CloudEvents to a topic (what
//! `projector publish` runs), and a projection reading Kafka publishes what
//! it emits through the opener's [`KafkaPublisher`]. This module owns the client
//! (librdkafka, through `rdkafka`), its connection state, and the
//! CloudEvents Kafka protocol binding (structured and binary mode).
//!
//! Why it is shaped so:
//!
//! - **The projection's database is the truth.** A reader assigns itself
//!   every partition of its topics explicitly (no group membership, no
//!   rebalances) and seeks each to the offset its checkpoint names. A
//!   partition's position in a checkpoint is the next offset to read (the
//!   last offset applied + 1, as Kafka counts committed offsets), so 0 is
//!   "nothing read yet" and head − position is Kafka's own lag. After each
//!   commit the reader also commits those offsets to a consumer group named
//!   after the host and the projection, for Kafka's lag tools; nothing reads
//!   them back.
//! - **Duplicates are dropped by id within a window.** Kafka stores a record
//!   published twice (a publisher retrying after a crash) twice. A reader
//!   skips an event whose id it saw in the same partition within the last
//!   [`DEDUP_WINDOW`] offsets, as JetStream does within its duplicate window
//!   and the embedded log always does. The window is read back from the log
//!   itself (the records just before the checkpoint) whenever a reader
//!   seeks, so what is dropped depends only on the log: a restarted host
//!   drops the same duplicates as one that never stopped.
//! - **Decoding overlaps applying.** librdkafka's threads fetch ahead into
//!   its own queue; a thread of the reader's own polls that queue and
//!   decodes each record's CloudEvent into a bounded channel, which the
//!   runner's thread drains in short slices (so a wake is seen promptly).
//!   Each record carries the assignment it was polled under: a seek bumps
//!   it, and records of an older one are dropped. No async runtime is
//!   needed.
//! - **Broker down is transient.** librdkafka reconnects on its own with
//!   backoff; transport errors (`BrokerTransportFailure`, `AllBrokersDown`,
//!   a name that does not resolve) make reads return
//!   [`SourceError::Unavailable`] (status `connecting`) until a request
//!   succeeds again. Retention that dropped records a checkpoint still
//!   needs is a [`SourceError::Failed`]: nothing can bring them back.
//! - **Emitted events go out as `projector publish` produces**: structured
//!   mode, keyed by subject, with an idempotent producer the opener keeps.
//!   Kafka keeps no ids, so a publish the outbox repeats after a crash is
//!   stored twice under one id; the copy lands in the same partition (same
//!   key) and the window above drops it for any projector reading the topic.
//! - **Partitions added while running are picked up**: the topics'
//!   metadata is read again every [`METADATA_REFRESH`], and a new partition
//!   is read from its start.

use crate::bindings::Event;
use crate::config::{validate_kafka_server as validate_server, validate_topic};
use crate::sources::cloudevents::{self, CloudEventError};
use crate::sources::embedded::{AppendOutcome, NewEvent};
use crate::sources::{
    Batch, Checkpoint, Filter, Health, Malformed, Progress, Publisher, Source, SourceError, SourceOpener,
    Wake, lock,
};
use anyhow::{Context as _, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Offsets before a record, in its partition, within which a record of the
/// same event id is a duplicate and skipped.
pub const DEDUP_WINDOW: u64 = 10_000;
/// How often the topics' partitions are listed again (partitions added
/// while running).
pub const METADATA_REFRESH: Duration = Duration::from_secs(5);
/// The longest a poll of librdkafka's queue blocks: a wake waits this long
/// at most.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// While records are waiting decoded, `next_batch` looks at the clock (its
/// deadline, a wake) once per this many.
const CLOCK_EVERY: usize = 64;
/// After the first event of a batch, how long more a read waits for others
/// to fill it.
const FILL: Duration = Duration::from_millis(5);
/// [`FILL`] while a partition is known to hold records not read yet (a
/// rebuild, a reader catching up): they are on their way, so a batch waits
/// for them longer, and big batches make fewer commits.
const FILL_BEHIND: Duration = Duration::from_millis(50);
/// How long a read waits at most, past the caller's wait, while a partition
/// is known to hold records not read yet: an idle batch means caught up.
const SETTLE: Duration = Duration::from_secs(2);
/// The longest the prefetch thread polls librdkafka's queue in one go: a
/// seek waits this long at most for it to let go.
const PREFETCH_SLICE: Duration = Duration::from_millis(10);
/// Records decoded ahead of the runner, at most.
const PREFETCH: usize = 8_192;
/// How long a request to the cluster (metadata, watermarks) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the partitions' watermarks, read from the cluster, are reused.
const HEAD_CACHE: Duration = Duration::from_secs(1);
/// How often a reader that met a transport error asks the cluster whether
/// it answers again, while nothing arrives.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What a source's partitions are called in checkpoints and dead letters:
/// `kafka:<source>`, and `kafka:<source>/<topic>/<partition>` for each.
pub fn source_key(source: &str) -> String {
    format!("kafka:{source}")
}

/// The partition number in a partition's name (`kafka:<source>/<topic>/<n>`),
/// if it is a Kafka partition's.
pub fn partition_number(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("kafka:")?;
    let (_, number) = rest.rsplit_once('/')?;
    rest.matches('/').count().eq(&2).then(|| number.parse().ok()).flatten()
}

/// Whether a client error means the cluster cannot be reached now (it will
/// be retried), rather than something wrong with the request.
fn transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        BrokerTransportFailure
            | AllBrokersDown
            | Resolve
            | MessageTimedOut
            | OperationTimedOut
            | RequestTimedOut
            | BrokerNotAvailable
            | NetworkException
            | LeaderNotAvailable
            | NotLeaderForPartition
            | NotCoordinator
            | CoordinatorNotAvailable
            | CoordinatorLoadInProgress
    )
}

/// What the client's callbacks and the reader share.
#[derive(Default)]
struct Shared {
    /// The last transport error, until a request succeeds again.
    down: Mutex<Option<String>>,
    /// Counts wakes asked for: a waiting read returns when it changes.
    wakes: AtomicU64,
}

/// librdkafka's callbacks: its errors become the reader's connection
/// state, its log lines `tracing` events.
struct Callbacks {
    shared: Arc<Shared>,
    servers: String,
}

impl ClientContext for Callbacks {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::warn!(target: "librdkafka", "{facility}: {message}")
            }
            _ => tracing::debug!(target: "librdkafka", "{facility}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(code) if transient(code) => {
                *lock(&self.shared.down) = Some(format!("cannot reach Kafka at {}: {reason}", self.servers));
            }
            _ => tracing::warn!(servers = %self.servers, "Kafka client: {error}: {reason}"),
        }
    }

    fn stats_raw(&self, _statistics: &[u8]) {}
}

impl ConsumerContext for Callbacks {}

/// Opens readers of one Kafka cluster's topics.
pub struct KafkaOpener {
    name: String,
    key: String,
    servers: Vec<String>,
    /// The producer the projection's emitted events go out with, once one
    /// is needed.
    producer: Arc<Mutex<Option<CloudEventProducer>>>,
}

impl KafkaOpener {
    /// Readers of the cluster reached through `servers` (bootstrap
    /// `host:port`s), for the source `name`. Connects lazily: a cluster
    /// that is down now is retried, and its readers report `connecting`.
    pub fn new(name: &str, servers: Vec<String>) -> Result<Self> {
        if servers.is_empty() {
            anyhow::bail!("source {name}: no Kafka bootstrap server");
        }
        for server in &servers {
            validate_server(server).map_err(|err| anyhow::anyhow!("source {name}: {err}"))?;
        }
        Ok(KafkaOpener { name: name.to_string(), key: source_key(name), servers, producer: Arc::default() })
    }
}

impl SourceOpener for KafkaOpener {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&self, filter: &Filter, reader: &str) -> Result<Box<dyn Source>> {
        Ok(Box::new(KafkaSource::new(&self.key, &self.servers, filter, reader)?))
    }

    fn publisher(&self, routes: &BTreeMap<String, String>) -> Option<Arc<dyn Publisher>> {
        Some(Arc::new(KafkaPublisher {
            servers: self.servers.join(","),
            routes: routes.clone(),
            producer: self.producer.clone(),
        }))
    }
}

/// The consumer group a reader commits its offsets to:
/// `projector.<host>.<reader>`.
pub fn group_id(reader: &str) -> String {
    format!("projector.{}.{reader}", host_name())
}

/// This machine's name, as the kernel has it.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Ids seen in one partition within the last [`DEDUP_WINDOW`] offsets.
#[derive(Default)]
struct Window {
    order: VecDeque<(u64, Arc<str>)>,
    /// Each id with the offset it was last seen at.
    ids: HashMap<Arc<str>, u64>,
}

impl Window {
    /// Whether `id` was seen within the window before `offset`; remembers
    /// it at `offset` when not.
    fn seen(&mut self, id: &str, offset: u64) -> bool {
        while let Some((oldest, _)) = self.order.front()
            && *oldest + DEDUP_WINDOW < offset
        {
            let (at, old) = self.order.pop_front().expect("not empty");
            if self.ids.get(&old) == Some(&at) {
                self.ids.remove(&old);
            }
        }
        if self.ids.contains_key(id) {
            return true;
        }
        let id: Arc<str> = id.into();
        self.ids.insert(id.clone(), offset);
        self.order.push_back((offset, id));
        false
    }
}

/// One assigned partition.
struct Partition {
    /// Its name in checkpoints: `kafka:<source>/<topic>/<n>`.
    name: Arc<str>,
    /// The next offset to hand out: records below it were handed out (or
    /// read only into the window).
    next: u64,
    /// Records below this offset are read into the window only.
    deliver_from: u64,
    window: Window,
}

/// A record taken from the queue and held for the next batch (a malformed
/// one met after events).
struct Held {
    topic: String,
    partition: i32,
    offset: u64,
    decoded: Result<NewEvent, String>,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// The consumer, shared by the reader and its prefetch thread.
struct Feed {
    consumer: BaseConsumer<Callbacks>,
    /// The assignment in force, bumped by each seek. The prefetch thread
    /// holds the lock across a poll, so a record is tagged with the
    /// assignment it was polled under.
    assignment: Mutex<u64>,
    /// Set while a seek waits for the lock: the prefetch thread stands back.
    seeking: AtomicBool,
    /// Set when the reader is dropped: the thread ends.
    stop: AtomicBool,
}

/// What the prefetch thread polled, tagged with its assignment.
type Polled = (u64, Result<Held, KafkaError>);

/// The prefetch thread: polls librdkafka's queue and decodes each record
/// until the reader is dropped. The events of the batches the reader is
/// done with come back (`spent`) and are freed here, where they were
/// allocated: the applying thread, which limits a catch-up, frees none of
/// them, and this thread's allocator reuses what it gets back.
fn prefetch(feed: Arc<Feed>, sender: SyncSender<Polled>, spent: Receiver<Vec<Event>>) {
    while !feed.stop.load(Ordering::Relaxed) {
        while let Ok(events) = spent.try_recv() {
            drop(events);
        }
        if feed.seeking.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // Decoded under the lock too: a seek waits for one record at most,
        // and the record is read straight from librdkafka's buffer.
        let polled = {
            let assignment = lock(&feed.assignment);
            match feed.consumer.poll(PREFETCH_SLICE) {
                None => continue,
                Some(polled) => (*assignment, polled.map(|message| take(&message))),
            }
        };
        if sender.send(polled).is_err() {
            return;
        }
    }
}

/// Decode a polled record; its key and value are kept only when it is no
/// event (a dead letter shows them).
fn take(message: &BorrowedMessage<'_>) -> Held {
    let payload = message.payload().unwrap_or_default();
    let decoded = parse(message.headers(), payload);
    let (key, payload) = match &decoded {
        Ok(_) => (None, Vec::new()),
        Err(_) => (message.key().map(<[u8]>::to_vec), payload.to_vec()),
    };
    Held {
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset().max(0) as u64,
        decoded,
        key,
        payload,
    }
}

/// One reader of a projection's Kafka topics.
pub struct KafkaSource {
    key: String,
    servers: String,
    topics: Vec<String>,
    types: Option<Vec<String>>,
    feed: Arc<Feed>,
    /// What the prefetch thread decoded.
    prefetched: Receiver<Polled>,
    /// Spent events, back to the prefetch thread to be freed there.
    spent: Sender<Vec<Event>>,
    /// The assignment in force (what [`Feed::assignment`] holds).
    assignment: u64,
    shared: Arc<Shared>,
    /// The partitions assigned, by (topic, partition).
    partitions: BTreeMap<(String, i32), Partition>,
    /// Every partition of the topics, as last listed.
    listed: Option<(Instant, Vec<(String, i32)>)>,
    /// The checkpoint the assigned partitions follow (where the last batch
    /// ended); `None` before the first read or after a seek failed.
    expected: Option<Checkpoint>,
    held: Option<Held>,
    /// High watermarks per partition name, as last read.
    head: Option<(Instant, BTreeMap<Arc<str>, u64>)>,
    /// When a reader that met a transport error last asked the cluster.
    probed: Option<Instant>,
    /// The offsets last committed to the group.
    committed: Checkpoint,
    warning: Option<String>,
}

impl KafkaSource {
    fn new(key: &str, servers: &[String], filter: &Filter, reader: &str) -> Result<Self> {
        let servers = servers.join(",");
        let shared = Arc::new(Shared::default());
        let callbacks = Callbacks { shared: shared.clone(), servers: servers.clone() };
        let consumer: BaseConsumer<Callbacks> = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("client.id", "projector")
            .set("group.id", group_id(reader))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // An offset out of range (retention passed it) is an error, never
            // a silent jump to one end.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("socket.connection.setup.timeout.ms", "5000")
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set_log_level(RDKafkaLogLevel::Warning)
            .create_with_context(callbacks)
            .with_context(|| format!("cannot set up a Kafka client for {servers}"))?;
        let feed = Arc::new(Feed {
            consumer,
            assignment: Mutex::new(0),
            seeking: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let (sender, prefetched) = std::sync::mpsc::sync_channel(PREFETCH);
        let (spent, freeing) = std::sync::mpsc::channel();
        let prefetching = feed.clone();
        std::thread::Builder::new()
            .name("kafka-prefetch".to_string())
            .spawn(move || prefetch(prefetching, sender, freeing))
            .context("cannot start a Kafka reader's prefetch thread")?;
        Ok(KafkaSource {
            key: key.to_string(),
            servers,
            topics: filter.streams.clone(),
            types: filter.types.clone(),
            feed,
            prefetched,
            spent,
            assignment: 0,
            shared,
            partitions: BTreeMap::new(),
            listed: None,
            expected: None,
            held: None,
            head: None,
            probed: None,
            committed: Checkpoint::default(),
            warning: None,
        })
    }

    /// `kafka:<source>/<topic>/<n>`.
    fn partition_name(&self, topic: &str, partition: i32) -> String {
        format!("{}/{topic}/{partition}", self.key)
    }

    /// Why the cluster cannot be reached now, if a transport error says so.
    fn down(&self) -> Option<String> {
        lock(&self.shared.down).clone()
    }

    /// A client error as a [`SourceError`]: transient ones make the
    /// projection `connecting`.
    fn failure(&self, what: &str, err: &KafkaError) -> SourceError {
        match err.rdkafka_error_code() {
            Some(code) if transient(code) => {
                let reason =
                    self.down().unwrap_or_else(|| format!("cannot reach Kafka at {}: {err}", self.servers));
                *lock(&self.shared.down) = Some(reason.clone());
                SourceError::Unavailable(format!("{what}: {reason}"))
            }
            _ => SourceError::Unavailable(format!("{what} on Kafka at {}: {err}", self.servers)),
        }
    }

    /// Every partition of the topics, from the cluster's metadata (at most
    /// every [`METADATA_REFRESH`]).
    fn list_partitions(&mut self) -> Result<Vec<(String, i32)>, SourceError> {
        if let Some((at, listed)) = &self.listed
            && at.elapsed() < METADATA_REFRESH
        {
            return Ok(listed.clone());
        }
        let mut listed = Vec::new();
        for topic in &self.topics {
            let metadata =
                self.feed.consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|err| {
                    self.failure(&format!("cannot list the partitions of topic {topic}"), &err)
                })?;
            let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Err(self.missing(topic));
            };
            if found.error().is_some() || found.partitions().is_empty() {
                return Err(self.missing(topic));
            }
            listed.extend(found.partitions().iter().map(|p| (topic.clone(), p.id())));
        }
        *lock(&self.shared.down) = None;
        listed.sort();
        self.listed = Some((Instant::now(), listed.clone()));
        Ok(listed)
    }

    fn missing(&self, topic: &str) -> SourceError {
        SourceError::Unavailable(format!(
            "topic {topic} not found on Kafka at {}: create it (kafka-topics.sh --create --topic {topic}), or \
             check the projection's streams",
            self.servers
        ))
    }

    /// The low and high watermarks of a partition, from the cluster.
    fn watermarks(&self, topic: &str, partition: i32) -> Result<(u64, u64), SourceError> {
        let (low, high) =
            self.feed.consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT).map_err(|err| {
                self.failure(&format!("cannot read the offsets of topic {topic} partition {partition}"), &err)
            })?;
        Ok((low.max(0) as u64, high.max(0) as u64))
    }

    /// Assign every partition in `listed` at `after`'s offsets (reading a
    /// window's worth before each into the duplicate window), checking
    /// retention kept what the checkpoint needs.
    fn seek(&mut self, after: &Checkpoint, listed: &[(String, i32)]) -> Result<(), SourceError> {
        self.expected = None;
        self.held = None;
        let mut partitions = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        let mut dropped = Vec::new();
        for (topic, partition) in listed {
            let name: Arc<str> = self.partition_name(topic, *partition).into();
            let next = after.position(&name);
            let (low, high) = self.watermarks(topic, *partition)?;
            if next < low {
                if next > 0 {
                    return Err(SourceError::Failed(anyhow::anyhow!(
                        "topic {topic} partition {partition}: retention dropped the records before offset {low}, \
                         but this projection's checkpoint is at offset {next} (the next to read): records {next} \
                         to {} are gone and were never applied. Rebuild the projection to start from the oldest \
                         record kept (what was dropped stays missing), or restore the topic",
                        low - 1
                    )));
                }
                dropped.push(format!("topic {topic} partition {partition}: offsets 0 to {}", low - 1));
            }
            if next > high {
                return Err(SourceError::Failed(anyhow::anyhow!(
                    "topic {topic} partition {partition}: this projection's checkpoint is at offset {next}, past \
                     the partition's end ({high}): was the topic deleted and made again? Rebuild the projection \
                     to read it from its start"
                )));
            }
            let from = next.max(low);
            let start = from.saturating_sub(DEDUP_WINDOW).max(low);
            assignment.add_partition_offset(topic, *partition, Offset::Offset(start as i64)).map_err(
                |err| SourceError::Failed(anyhow::anyhow!("cannot assign {topic}/{partition}: {err}")),
            )?;
            partitions.insert(
                (topic.clone(), *partition),
                Partition { name, next: from, deliver_from: from, window: Window::default() },
            );
        }
        if !dropped.is_empty() {
            let warning = format!(
                "retention dropped records this projection starts before (a rebuild, or a new projection): {}; \
                 it cannot see them",
                dropped.join(", ")
            );
            if self.warning.as_ref() != Some(&warning) {
                tracing::warn!(source = %self.key, "{warning}");
            }
            self.warning = Some(warning);
        }
        self.feed.seeking.store(true, Ordering::Relaxed);
        let assigned = {
            let mut current = lock(&self.feed.assignment);
            self.assignment += 1;
            *current = self.assignment;
            self.feed.consumer.assign(&assignment)
        };
        self.feed.seeking.store(false, Ordering::Relaxed);
        assigned.map_err(|err| {
            SourceError::Failed(anyhow::anyhow!(
                "cannot assign the partitions of {}: {err}",
                self.topics.join(", ")
            ))
        })?;
        self.partitions = partitions;
        self.expected = Some(after.clone());
        Ok(())
    }

    /// Whether a partition is known to hold records past what was handed
    /// out (the read should wait for them before saying it is idle).
    fn behind(&self) -> bool {
        let Some((_, head)) = &self.head else { return true };
        self.partitions.values().any(|p| head.get(&p.name).is_some_and(|high| *high > p.next))
    }

    /// Read the high watermarks again if the cached ones are older than
    /// [`HEAD_CACHE`].
    fn refresh_head(&mut self) -> Result<(), SourceError> {
        if self.head.as_ref().is_some_and(|(at, _)| at.elapsed() < HEAD_CACHE) {
            return Ok(());
        }
        let listed = self.list_partitions()?;
        let mut head = BTreeMap::new();
        for (topic, partition) in &listed {
            let (_, high) = self.watermarks(topic, *partition)?;
            head.insert(Arc::from(self.partition_name(topic, *partition)), high);
        }
        *lock(&self.shared.down) = None;
        self.head = Some((Instant::now(), head));
        Ok(())
    }

    /// The next record the prefetch thread decoded under the assignment in
    /// force, if one is there already.
    fn ready(&self) -> Option<Result<Held, KafkaError>> {
        loop {
            match self.prefetched.try_recv() {
                Ok((assignment, polled)) if assignment == self.assignment => return Some(polled),
                // Polled before the last seek.
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// The next record the prefetch thread decoded under the assignment in
    /// force, waiting at most `timeout`.
    fn receive(&self, timeout: Duration) -> Option<Result<Held, KafkaError>> {
        let until = Instant::now() + timeout;
        loop {
            match self.prefetched.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok((assignment, polled)) if assignment == self.assignment => return Some(polled),
                // Polled before the last seek.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

impl Source for KafkaSource {
    fn key(&self) -> &str {
        &self.key
    }

    fn next_batch(&mut self, after: &Checkpoint, max: usize, wait: Duration) -> Result<Batch, SourceError> {
        let listed = self.list_partitions()?;
        let assigned = listed.len() == self.partitions.len()
            && listed
                .iter()
                .all(|(topic, partition)| self.partitions.contains_key(&(topic.clone(), *partition)));
        if self.expected.as_ref() != Some(after) || !assigned {
            if assigned || self.expected.is_none() {
                tracing::debug!(source = %self.key, "seeking to {}", after.to_json());
            } else {
                tracing::info!(source = %self.key, "the topics' partitions changed: now {}", listed.len());
            }
            self.seek(after, &listed)?;
        }
        let max = max.max(1);
        let mut batch = Batch { end: after.clone(), ..Batch::default() };
        let started = Instant::now();
        let wakes = self.shared.wakes.load(Ordering::Relaxed);
        let mut fill_until: Option<Instant> = None;
        let mut moved = false;
        let mut taken: usize = 0;
        loop {
            let polled = match self.held.take() {
                Some(held) => Some(Ok(held)),
                None => {
                    // Records already decoded are taken without a look at
                    // the clock, but for every `CLOCK_EVERY`th.
                    taken += 1;
                    match (!taken.is_multiple_of(CLOCK_EVERY)).then(|| self.ready()).flatten() {
                        Some(polled) => Some(polled),
                        None => {
                            let until = match fill_until {
                                Some(until) => until,
                                None if self.behind() => started + wait.max(SETTLE),
                                None => started + wait,
                            };
                            let now = Instant::now();
                            if now >= until || self.shared.wakes.load(Ordering::Relaxed) != wakes {
                                break;
                            }
                            self.receive((until - now).min(POLL_SLICE))
                        }
                    }
                }
            };
            let record = match polled {
                None => {
                    let stale = self.head.as_ref().is_none_or(|(at, _)| at.elapsed() >= HEAD_CACHE);
                    if fill_until.is_none() && !moved && stale {
                        // Idle: learn whether a partition grew (and whether
                        // the cluster answers).
                        let _ = self.refresh_head();
                    }
                    continue;
                }
                Some(Err(err)) => {
                    if let Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset) =
                        err.rdkafka_error_code()
                    {
                        self.expected = None;
                        return Err(SourceError::Failed(anyhow::anyhow!(
                            "reading {} on Kafka at {}: {err}: retention dropped records this projection had \
                             not read yet; restart it to see which partition, or rebuild it",
                            self.topics.join(", "),
                            self.servers
                        )));
                    }
                    // Errors queued while the cluster was away come one per
                    // poll: note the last and drain them.
                    let reason = format!("cannot reach Kafka at {}: {err}", self.servers);
                    *lock(&self.shared.down) = Some(reason);
                    continue;
                }
                Some(Ok(record)) => Some(record),
            };
            let Some(mut record) = record else { continue };
            *lock(&self.shared.down) = None;
            let key = (std::mem::take(&mut record.topic), record.partition);
            let partition = self.partitions.get_mut(&key);
            record.topic = key.0;
            let Some(partition) = partition else { continue };
            if record.offset < partition.next {
                // Read into the duplicate window only.
                if record.offset < partition.deliver_from
                    && let Ok(event) = &record.decoded
                {
                    partition.window.seen(&event.id, record.offset);
                }
                continue;
            }
            let name = partition.name.clone();
            match std::mem::replace(&mut record.decoded, Err(String::new())) {
                Ok(event) if partition.window.seen(&event.id, record.offset) => {
                    tracing::debug!(partition = %name, offset = record.offset, id = %event.id, "duplicate skipped");
                    partition.next = record.offset + 1;
                    batch.end.set(&name, partition.next);
                    moved = true;
                }
                Ok(event) => {
                    partition.next = record.offset + 1;
                    batch.end.set(&name, partition.next);
                    moved = true;
                    if self.types.as_ref().is_none_or(|types| types.contains(&event.event_type)) {
                        batch.events.push(to_event(std::mem::take(&mut record.topic), record.offset, event));
                        batch.partitions.push(name);
                        batch.checkpoints.push(record.offset + 1);
                        if fill_until.is_none() {
                            let fill = if self.behind() { FILL_BEHIND } else { FILL };
                            fill_until = Some(Instant::now() + fill);
                        }
                        if batch.events.len() >= max {
                            break;
                        }
                    }
                }
                Err(reason) if !batch.events.is_empty() => {
                    // A malformed record comes alone: next time.
                    self.held = Some(Held { decoded: Err(reason), ..record });
                    break;
                }
                Err(reason) => {
                    partition.next = record.offset + 1;
                    batch.end.set(&name, partition.next);
                    batch.partitions.push(name.clone());
                    batch.malformed = Some(to_malformed(&name, &record, reason));
                    break;
                }
            }
        }
        if batch.is_idle(after)
            && let Some(reason) = self.down()
        {
            // Nothing came and the last word from the cluster was an error:
            // ask it whether it answers again.
            if self.probed.is_none_or(|at| at.elapsed() >= PROBE_INTERVAL) {
                self.probed = Some(Instant::now());
                self.head = None;
                if self.refresh_head().is_ok() {
                    return Ok(batch);
                }
            }
            return Err(SourceError::Unavailable(reason));
        }
        self.expected = Some(batch.end.clone());
        Ok(batch)
    }

    fn recycle(&mut self, batch: Batch) {
        // A prefetch thread that is gone has nothing to free: drop here.
        let _ = self.spent.send(batch.events);
    }

    fn acknowledge(&mut self, upto: &Checkpoint) -> Result<(), SourceError> {
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), state) in &self.partitions {
            let at = upto.position(&state.name);
            if at > 0 && at != self.committed.position(&state.name) {
                offsets
                    .add_partition_offset(topic, *partition, Offset::Offset(at as i64))
                    .map_err(|err| SourceError::Failed(err.into()))?;
            }
        }
        if offsets.count() == 0 {
            return Ok(());
        }
        // Kafka's lag tools read these; the checkpoint in the projection's
        // database stays the truth, so a commit lost is only late.
        match self.feed.consumer.commit(&offsets, CommitMode::Async) {
            Ok(()) => {
                for (partition, position) in upto.partitions() {
                    self.committed.set(partition, position);
                }
                Ok(())
            }
            Err(err) => Err(self.failure("cannot commit offsets to the consumer group", &err)),
        }
    }

    fn progress(&mut self, at: &Checkpoint) -> Result<Progress, SourceError> {
        if let Err(err) = self.refresh_head()
            && self.head.is_none()
        {
            return Err(err);
        }
        let (_, head) = self.head.as_ref().expect("read above");
        let mut checkpoint = Checkpoint::default();
        let mut lag = 0;
        for (name, high) in head {
            checkpoint.set(name, *high);
            lag += high.saturating_sub(at.position(name));
        }
        Ok(Progress { head: checkpoint, lag })
    }

    fn health(&self) -> Health {
        match self.down() {
            Some(reason) => Health::Connecting { error: Some(reason) },
            None if self.listed.is_none() => Health::Connecting { error: None },
            None => Health::Connected,
        }
    }

    fn warning(&self) -> Option<String> {
        self.warning.clone()
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(KafkaWaker(self.shared.clone()))
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.feed.stop.store(true, Ordering::Relaxed);
    }
}

/// Wakes a reader waiting in [`KafkaSource::next_batch`].
struct KafkaWaker(Arc<Shared>);

impl Wake for KafkaWaker {
    fn wake(&self) {
        self.0.wakes.fetch_add(1, Ordering::Relaxed);
    }
}

/// A record's CloudEvent by the CloudEvents Kafka protocol binding: binary
/// mode when it has a `ce_specversion` header, structured mode when its
/// `content-type` is `application/cloudevents…`; or why it is neither.
fn parse<H: Headers>(headers: Option<&H>, payload: &[u8]) -> Result<NewEvent, String> {
    let mut pairs: Vec<(String, &str)> = Vec::new();
    let mut content_type = None;
    if let Some(headers) = headers {
        for header in headers.iter() {
            let value = header.value.unwrap_or_default();
            let name = header.key.to_ascii_lowercase();
            if let Some(attribute) = name.strip_prefix("ce_") {
                let value = std::str::from_utf8(value).map_err(|_| {
                    format!("a binary-mode CloudEvent whose header {} is not UTF-8", header.key)
                })?;
                pairs.push((format!("ce-{attribute}"), value));
            } else if name == "content-type" {
                let value = std::str::from_utf8(value)
                    .map_err(|_| "a record whose content-type header is not UTF-8".to_string())?;
                content_type = Some(value);
            }
        }
    }
    if pairs.iter().any(|(name, _)| name == "ce-specversion") {
        if let Some(content_type) = content_type {
            pairs.push(("content-type".to_string(), content_type));
        }
        return cloudevents::from_binary(pairs.iter().map(|(n, v)| (n.as_str(), *v)), payload, false)
            .map_err(|err| format!("a binary-mode CloudEvent with a bad header: {err}"));
    }
    let structured =
        content_type.is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("application/cloudevents"));
    if !structured {
        return Err(format!(
            "neither a structured-mode CloudEvent (content-type {}, not application/cloudevents+json) nor a \
             binary-mode one (no ce_specversion header)",
            content_type.map_or("absent".to_string(), |t| format!("{t:?}"))
        ));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|err| format!("a structured-mode CloudEvent whose value is not UTF-8: {err}"))?;
    cloudevents::parse_event(text).map_err(|err| match err {
        CloudEventError::NotAnEvent(_) => format!("a structured-mode CloudEvent that is not one: {err}"),
        err => format!("a structured-mode CloudEvent with a bad attribute: {err}"),
    })
}

/// The event a record carries: its topic as the stream, its offset as the
/// position.
fn to_event(topic: String, offset: u64, event: NewEvent) -> Event {
    Event {
        stream: topic,
        position: offset,
        id: event.id,
        type_: event.event_type,
        subject: event.subject,
        time: event.time,
        correlation_id: event.correlation_id,
        causation_id: event.causation_id,
        data: event.data,
    }
}

/// A record that is no event, as far as it can be read: named by its
/// partition and offset, its key kept in the reason.
fn to_malformed(partition: &str, record: &Held, reason: String) -> Malformed {
    let key = record.key.as_deref().map(String::from_utf8_lossy);
    Malformed {
        event: Event {
            stream: record.topic.clone(),
            position: record.offset,
            id: format!("{partition}@{}", record.offset),
            type_: String::new(),
            subject: key.map(|k| k.into_owned()),
            time: None,
            correlation_id: None,
            causation_id: None,
            data: record.payload.clone(),
        },
        reason: format!(
            "topic {} partition {} offset {}: {reason}",
            record.topic, record.partition, record.offset
        ),
    }
}

/// Collects the producer's delivery reports, for the one send in progress.
#[derive(Default)]
struct Deliveries {
    failed: Mutex<Vec<(usize, String)>>,
    delivered: AtomicU64,
}

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Error as i32) {
            tracing::warn!(target: "librdkafka", "{facility}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!("Kafka producer: {error}: {reason}");
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((err, _)) => lock(&self.failed).push((index, err.to_string())),
        }
    }
}

/// An idempotent producer (`acks=all`: a send librdkafka retries is stored
/// once) of CloudEvents in structured mode, one send at a time: what
/// `projector publish` and a projection's [`KafkaPublisher`] produce with.
struct CloudEventProducer {
    producer: BaseProducer<Deliveries>,
    servers: String,
}

impl CloudEventProducer {
    fn new(servers: &str, client_id: &str) -> Result<Self> {
        let producer: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("client.id", client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A topic that is not there is an error here, never one the
            // broker makes with its defaults.
            .set("allow.auto.create.topics", "false")
            .set("message.timeout.ms", "30000")
            .set("socket.connection.setup.timeout.ms", "5000")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("linger.ms", "5")
            .set_log_level(RDKafkaLogLevel::Error)
            .create_with_context(Deliveries::default())
            .with_context(|| format!("cannot set up a Kafka producer for {servers}"))?;
        Ok(CloudEventProducer { producer, servers: servers.to_string() })
    }

    /// Whether `topic` exists: an error naming it, and saying to create it,
    /// when it does not (`then` says what happens to the events meanwhile).
    fn check_topic(&self, topic: &str, timeout: Duration, then: &str) -> Result<()> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| format!("cannot reach Kafka at {}", self.servers))?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            anyhow::bail!(
                "topic {topic} does not exist on Kafka at {}: create it (kafka-topics.sh --create --topic {topic} \
                 --partitions N){then}",
                self.servers
            );
        }
        Ok(())
    }

    /// Produce `events` to `topic`, each keyed by its `keys` entry (or
    /// else its subject), and wait until Kafka has acknowledged every one.
    /// Returns how many it stored.
    fn send(&self, topic: &str, events: &[NewEvent], keys: &[Option<String>]) -> Result<u64> {
        let context = self.producer.context();
        lock(&context.failed).clear();
        context.delivered.store(0, Ordering::Relaxed);
        for (i, event) in events.iter().enumerate() {
            let partition_key = keys.get(i).cloned().flatten();
            let mut json = cloudevents::to_json(event);
            if let Some(partition_key) = &partition_key {
                json["partitionkey"] = partition_key.clone().into();
            }
            let body = json.to_string();
            let key = partition_key.or_else(|| event.subject.clone());
            loop {
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "content-type", value: Some("application/cloudevents+json") });
                let mut record = BaseRecord::with_opaque_to(topic, i).payload(&body).headers(headers);
                if let Some(key) = &key {
                    record = record.key(key);
                }
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((err, _)) => {
                        // What was queued before is still delivered (or
                        // not): wait for it, so no report is left over.
                        let _ = self.producer.flush(Duration::from_secs(60));
                        return Err(err)
                            .with_context(|| format!("cannot publish event {} to topic {topic}", event.id));
                    }
                }
            }
            self.producer.poll(Duration::ZERO);
        }
        self.producer.flush(Duration::from_secs(60)).with_context(|| {
            format!("Kafka at {} did not confirm every event within a minute", self.servers)
        })?;
        let failed = std::mem::take(&mut *lock(&context.failed));
        if let Some((index, err)) = failed.first() {
            anyhow::bail!(
                "Kafka at {} refused event {} ({} of {}): {err}; {} of {} events were not stored",
                self.servers,
                events[*index].id,
                index + 1,
                events.len(),
                failed.len(),
                events.len()
            );
        }
        Ok(context.delivered.load(Ordering::Relaxed))
    }

    /// Whether the producer met an error it cannot go on from (an
    /// idempotent producer's sequence broken): a new one must be made.
    fn broken(&self) -> Option<String> {
        self.producer.client().fatal_error().map(|(_, reason)| reason)
    }
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PublishOutcome {
    /// Records the topic took.
    pub published: u64,
}

/// Produce `events` to `topic` on the cluster reached through `servers`, in
/// CloudEvents structured mode (`content-type: application/cloudevents+json`),
/// keyed by each event's `partitionkey` extension or else its subject (so
/// one key's events stay in one partition, in order). The producer is
/// idempotent (a retried send is stored once) with `acks=all`; every record
/// is acknowledged before this returns. The topic must exist.
pub fn publish(
    servers: &[String],
    topic: &str,
    events: &[NewEvent],
    keys: &[Option<String>],
) -> Result<PublishOutcome> {
    validate_topic(topic).map_err(anyhow::Error::msg)?;
    let producer = CloudEventProducer::new(&servers.join(","), "projector-publish")?;
    producer.check_topic(topic, Duration::from_secs(10), "")?;
    Ok(PublishOutcome { published: producer.send(topic, events, keys)? })
}

/// Publishes what a projection reading Kafka emits: emitted stream `s`
/// goes to the topic its route names (`s` itself when none does), in
/// structured mode, keyed by the event's subject, with one idempotent
/// producer kept for the opener's life and made when first needed (again
/// after it broke). A publish returns once Kafka has acknowledged every
/// event.
///
/// Kafka keeps no ids: a publish repeated after a crash (the events stored,
/// the outbox not yet cleared) stores them again, under the same
/// deterministic ids. A projector reading the topic drops the copies (its
/// reader skips an id seen within [`DEDUP_WINDOW`] offsets in the same
/// partition; the same subject keeps the copy in the same partition);
/// another consumer must drop them by id.
struct KafkaPublisher {
    servers: String,
    routes: BTreeMap<String, String>,
    producer: Arc<Mutex<Option<CloudEventProducer>>>,
}

impl Publisher for KafkaPublisher {
    fn publish(&self, stream: &str, events: &[NewEvent]) -> Result<AppendOutcome> {
        let topic = self.routes.get(stream).map_or(stream, String::as_str);
        validate_topic(topic).map_err(anyhow::Error::msg)?;
        let mut slot = lock(&self.producer);
        if slot.is_none() {
            *slot = Some(CloudEventProducer::new(&self.servers, "projector")?);
        }
        let producer = slot.as_ref().expect("made above");
        let sent = producer
            .check_topic(topic, REQUEST_TIMEOUT, "; the events wait in the outbox until it exists")
            .and_then(|()| producer.send(topic, events, &[]));
        if let Some(reason) = producer.broken() {
            tracing::warn!(servers = %self.servers, "the Kafka producer broke ({reason}); making a new one");
            *slot = None;
        }
        let appended = sent?;
        Ok(AppendOutcome { appended, duplicates: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(headers: &[(&str, &str)], body: &[u8]) -> Result<NewEvent, String> {
        let mut owned = OwnedHeaders::new();
        for (key, value) in headers {
            owned = owned.insert(Header { key, value: Some(*value) });
        }
        parse(Some(&owned), body)
    }

    #[test]
    fn a_partition_number_is_read_from_a_kafka_partition_name_only() {
        assert_eq!(partition_number("kafka:orders/wallets/2"), Some(2));
        assert_eq!(partition_number("kafka:orders/wallets"), None);
        assert_eq!(partition_number("nats:WALLETS"), None);
        assert_eq!(partition_number("log"), None);
        assert_eq!(partition_number("redis:db0/wallets"), None);
    }

    #[test]
    fn binary_mode_takes_attributes_from_ce_headers_and_data_from_the_value() {
        let event = decode(
            &[
                ("ce_specversion", "1.0"),
                ("ce_id", "e1"),
                ("ce_type", "wallet_updated"),
                ("ce_source", "tests"),
                ("ce_subject", "u1"),
                ("ce_correlationid", "c1"),
                ("content-type", "application/json"),
            ],
            br#"{"a":1}"#,
        )
        .unwrap();
        assert_eq!((event.id.as_str(), event.event_type.as_str()), ("e1", "wallet_updated"));
        assert_eq!(event.subject.as_deref(), Some("u1"));
        assert_eq!(event.correlation_id.as_deref(), Some("c1"));
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(event.data, br#"{"a":1}"#);
    }

    #[test]
    fn structured_mode_needs_the_cloudevents_content_type() {
        let body = br#"{"specversion":"1.0","id":"e2","source":"s","type":"t","data":{"b":2}}"#;
        let event = decode(&[("content-type", "application/cloudevents+json; charset=utf-8")], body).unwrap();
        assert_eq!((event.id.as_str(), event.data.as_slice()), ("e2", &br#"{"b":2}"#[..]));
        let err = decode(&[], body).unwrap_err();
        assert!(err.contains("neither a structured-mode CloudEvent (content-type absent"), "{err}");
        let err = decode(&[("content-type", "application/json")], body).unwrap_err();
        assert!(err.contains("content-type \"application/json\""), "{err}");
        let err = decode(&[("ce_specversion", "1.0"), ("ce_id", "e3")], b"").unwrap_err();
        assert!(err.contains("missing required attribute `source`"), "{err}");
    }

    #[test]
    fn the_window_drops_an_id_seen_within_it_and_forgets_older_ones() {
        let mut window = Window::default();
        assert!(!window.seen("a", 0));
        assert!(!window.seen("b", 1));
        assert!(window.seen("a", 5));
        assert!(window.seen("a", DEDUP_WINDOW));
        assert!(!window.seen("a", DEDUP_WINDOW + 1), "seen at 0, more than a window before");
        assert!(window.seen("a", DEDUP_WINDOW + 2));
    }

    #[test]
    fn topics_and_servers_are_checked() {
        assert!(validate_topic("orders.eu-1_x").is_ok());
        for bad in ["", ".", "..", "a b", "a/b", &"x".repeat(250)] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
        assert!(validate_server("127.0.0.1:9092").is_ok());
        assert!(validate_server("kafka-1.internal:9092").is_ok());
        for bad in ["127.0.0.1", "kafka://a:9092", ":9092", "a:port"] {
            assert!(validate_server(bad).is_err(), "{bad:?}");
        }
    }
}
