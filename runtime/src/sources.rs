//! Where events come from, behind one [`Source`] trait: the embedded log
//! ([`embedded`]), NATS JetStream ([`nats`]), Kafka ([`kafka`]), Redis
//! Streams ([`redis`]), and the CloudEvents parsing every source shares
//! ([`cloudevents`]).
//!
//! A projection's runner never knows which source it reads. It asks for the
//! batch after its [`Checkpoint`], applies it and moves the checkpoint in
//! one SQLite transaction of its own database, then acknowledges. The
//! checkpoint in that database is the truth: a source starts wherever the
//! runner says, whatever a broker remembers, so a broker that redelivers
//! cannot make an event take effect twice.
//!
//! A checkpoint is a set of positions, one per partition: the embedded log
//! and a JetStream stream each have one partition; a Kafka topic has many,
//! and so has a projection reading several Redis stream keys (one each).
//! A projection reading several sources reads them through one
//! [`multi::MultiSource`], whose checkpoint holds every member's partitions.

use crate::bindings::Event;
use crate::config::SourceKind;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub mod cloudevents;
pub mod embedded;
pub mod kafka;
pub mod multi;
pub mod nats;
pub mod redis;

/// How far a projection has applied a source: the last position taken, per
/// partition (a partition not named is at 0, before its first event).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint(BTreeMap<String, u64>);

impl Checkpoint {
    /// One partition at `position`.
    pub fn at(partition: &str, position: u64) -> Self {
        let mut checkpoint = Checkpoint::default();
        checkpoint.set(partition, position);
        checkpoint
    }

    /// The last position taken in `partition`.
    pub fn position(&self, partition: &str) -> u64 {
        self.0.get(partition).copied().unwrap_or(0)
    }

    /// Move `partition` to `position`.
    pub fn set(&mut self, partition: &str, position: u64) {
        // Sources set a position per event: no new key for a known one.
        match self.0.get_mut(partition) {
            Some(at) => *at = position,
            None => {
                self.0.insert(partition.to_string(), position);
            }
        }
    }

    /// Every partition named, with its position.
    pub fn partitions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(partition, position)| (partition.as_str(), *position))
    }

    /// The positions added up (saturating: Redis positions are large): for
    /// one partition, its position. What status and progress bars show.
    pub fn total(&self) -> u64 {
        self.0.values().fold(0, |sum, position| sum.saturating_add(*position))
    }

    /// As JSON: a number for one partition (or none), else an object of
    /// partitions.
    pub fn to_json(&self) -> serde_json::Value {
        match self.0.len() {
            0 => 0.into(),
            1 => self.total().into(),
            _ => serde_json::json!(self.0),
        }
    }
}

/// A message the source could not read as an event (neither CloudEvents
/// mode, say): the runner parks it as a dead letter in the transaction that
/// moves past it, rather than stopping.
#[derive(Debug, Clone)]
pub struct Malformed {
    /// The message, as far as it could be read: its position and stream,
    /// an id (the broker's message id, or one made from the position), an
    /// empty type, and the raw body as `data`.
    pub event: Event,
    /// What was wrong with it.
    pub reason: String,
}

/// One read from a source.
///
/// Either events (possibly none, when everything read was filtered out) or
/// one malformed message, never both: a source ends a batch before a
/// malformed message and returns it alone next.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The events to apply, in order.
    pub events: Vec<Event>,
    /// The partition of each event (as long as `events`); for a batch
    /// holding a malformed message, that message's partition (or none:
    /// the source's key).
    pub partitions: Vec<Arc<str>>,
    /// Where each event moves its partition's checkpoint, when that is not
    /// the event's position (a Kafka partition's checkpoint is the next
    /// offset to read: offset + 1); empty when it is.
    pub checkpoints: Vec<u64>,
    /// Where the checkpoint goes once the whole batch is applied: past the
    /// messages skipped in the read too (other types, redeliveries).
    pub end: Checkpoint,
    /// A message that is not an event, alone in its batch.
    pub malformed: Option<Malformed>,
}

impl Batch {
    /// Nothing was read: the checkpoint stays where it is.
    pub fn is_idle(&self, after: &Checkpoint) -> bool {
        self.events.is_empty() && self.malformed.is_none() && self.end == *after
    }

    /// The checkpoint once the first `taken` events are applied, from
    /// `start` (the checkpoint before the batch): `end` when all are.
    pub fn checkpoint_after(&self, start: &Checkpoint, taken: usize) -> Checkpoint {
        if taken >= self.events.len() {
            return self.end.clone();
        }
        let mut checkpoint = start.clone();
        for (i, (event, partition)) in self.events[..taken].iter().zip(&self.partitions).enumerate() {
            checkpoint.set(partition, self.checkpoints.get(i).copied().unwrap_or(event.position));
        }
        checkpoint
    }
}

/// How far a source reaches, and how far behind a checkpoint is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The last position the source holds, per partition.
    pub head: Checkpoint,
    /// Messages after the checkpoint not yet applied (as the source counts
    /// them: a broker counts those matching the projection's filter).
    pub lag: u64,
}

/// Whether a source can be read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Reading.
    Connected,
    /// Not reachable yet, or lost: trying again, with the last error.
    Connecting {
        /// Why the last attempt failed, if one did.
        error: Option<String>,
    },
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source cannot be reached now (a server down, a connection
    /// lost): the projection shows `connecting` with this message and
    /// tries again with backoff. Never a fault.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (the embedded log damaged, say): the projection
    /// faults with it.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Wakes a reader waiting in [`Source::next_batch`] early: a command for
/// the projection arrived.
pub trait Wake: Send + Sync {
    /// Make the waiting read (if any) return now.
    fn wake(&self);
}

/// A stream of events a projection reads: one per runner (and one more per
/// rebuild), opened by a [`SourceOpener`].
pub trait Source: Send {
    /// The key its partitions go by in checkpoints and dead letters (`log`
    /// for the embedded log, `nats:<stream>` for a JetStream stream,
    /// `redis:db<N>` for a Redis database, each stream key a partition
    /// `redis:db<N>/<key>`): a source of another key starts from 0.
    fn key(&self) -> &str;

    /// The batch after `after`: at most `max` events, waiting at most
    /// `wait` for the first. Reads from just after `after` whatever was
    /// read before (a retried batch is read again), so the caller's
    /// checkpoint is the only position that counts.
    fn next_batch(&mut self, after: &Checkpoint, max: usize, wait: Duration) -> Result<Batch, SourceError>;

    /// A batch `next_batch` returned, done with (applied or not): the
    /// source may reuse its allocations for a batch it reads later. The
    /// default drops it.
    fn recycle(&mut self, batch: Batch) {
        drop(batch);
    }

    /// Everything up to `upto` is committed in the projection's database:
    /// the source may forget it (a broker's acknowledgement).
    fn acknowledge(&mut self, upto: &Checkpoint) -> Result<(), SourceError>;

    /// How far the source reaches and how far behind `at` is.
    fn progress(&mut self, at: &Checkpoint) -> Result<Progress, SourceError>;

    /// Whether it is connected.
    fn health(&self) -> Health {
        Health::Connected
    }

    /// Something an operator should know, if any (a stream whose oldest
    /// messages retention dropped, so a rebuild cannot see them).
    fn warning(&self) -> Option<String> {
        None
    }

    /// What wakes a [`Source::next_batch`] waiting.
    fn waker(&self) -> Arc<dyn Wake>;
}

/// The guard of `mutex`, even if a thread panicked holding it: the sources'
/// shared state stays meaningful whatever a reader was doing.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Delay before a reader's `attempt`th try (from 1) after a failure: 100 ms
/// doubling up to 2 s.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(2))
}

/// `partition` when it is one of several of its source (named
/// `<source key>/…`), `None` for a source's only partition (named as the
/// source: `log`, `nats:<stream>`).
pub fn own_partition(partition: &str) -> Option<&str> {
    partition.contains('/').then_some(partition)
}

/// Where the checkpoint of `partition` stands once its event at `position`
/// is applied: the position itself, or the next offset for Kafka (whose
/// checkpoints hold the next offset to read).
pub fn checkpoint_through(partition: &str, position: u64) -> u64 {
    match kafka::partition_number(member_partition(partition)) {
        Some(_) => position + 1,
        None => position,
    }
}

/// The partition number a guest sees for an event of `partition` (a name as
/// in [`Batch::partitions`]): a Kafka topic's partition; none for sources
/// without partitions of their own.
pub fn partition_number(partition: &str) -> Option<u32> {
    kafka::partition_number(member_partition(partition))
}

/// A partition as its own source names it: a multi-source's partition
/// (`multi:<members>/<member partition>`) without the multi-source's key.
fn member_partition(partition: &str) -> &str {
    match partition.strip_prefix("multi:") {
        Some(rest) => rest.split_once('/').map_or(partition, |(_, member)| member),
        None => partition,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_partition_is_known_inside_a_multi_source_too() {
        assert_eq!(partition_number("kafka:orders/wallets/2"), Some(2));
        assert_eq!(partition_number("multi:kafka:orders+log/kafka:orders/wallets/2"), Some(2));
        assert_eq!(partition_number("multi:kafka:orders+log/log"), None);
        assert_eq!(checkpoint_through("multi:kafka:orders+log/kafka:orders/wallets/2", 7), 8);
        assert_eq!(checkpoint_through("multi:kafka:orders+log/log", 7), 7);
        assert_eq!(own_partition("log"), None);
        assert_eq!(own_partition("multi:log+nats:W/log"), Some("multi:log+nats:W/log"));
    }
}

/// Which events of a source a projection takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// What the source calls streams: embedded stream names, NATS subject
    /// filters (wildcards allowed), Redis stream keys. Empty means all (not
    /// for Redis, which reads the keys named).
    pub streams: Vec<String>,
    /// Event types; `None` means every type.
    pub types: Option<Vec<String>>,
}

/// Where a projection's emitted events are published: the embedded log, or
/// the broker of the projection's source.
pub trait Publisher: Send + Sync {
    /// Publish `events`, emitted to `stream`, all or none as far as the
    /// destination allows; an id it already holds is a duplicate, dropped
    /// and counted.
    fn publish(&self, stream: &str, events: &[embedded::NewEvent])
    -> anyhow::Result<embedded::AppendOutcome>;
}

/// Opens readers of one configured source: one per projection runner, one
/// more for each rebuild.
pub trait SourceOpener: Send + Sync {
    /// The source's name in the config (`log` for the embedded log).
    fn name(&self) -> &str;

    /// A reader of the events `filter` selects, for `reader` (the
    /// projection's name, with the database generation it builds: a
    /// broker's consumer is named after it).
    fn open(&self, filter: &Filter, reader: &str) -> anyhow::Result<Box<dyn Source>>;

    /// Where a projection reading this source publishes what it emits:
    /// `routes` maps an emitted stream to the broker's name for it (a NATS
    /// subject, a Kafka topic, a Redis stream key); a stream not named keeps
    /// its own name. `None`: the
    /// embedded log, streams of the same name.
    fn publisher(&self, routes: &BTreeMap<String, String>) -> Option<Arc<dyn Publisher>> {
        let _ = routes;
        None
    }
}

/// What projection `p` takes from its source: for one source, the streams
/// it lists; for several, only the types (each member's streams are its
/// [`multi::MultiOpener`]'s).
pub fn filter_of(p: &crate::config::ProjectionConfig) -> Filter {
    let names = p.source_names();
    let streams = match names.as_slice() {
        [one] => p.streams_of(one).to_vec(),
        _ => Vec::new(),
    };
    Filter { streams, types: p.types.clone() }
}

/// The opener of the sources projection `p` of `config` reads: the
/// embedded `log`, or the broker its `source` names; for several, a
/// [`multi::MultiOpener`] over each.
pub fn opener_for(
    config: &crate::config::Config,
    p: &crate::config::ProjectionConfig,
    log: &Arc<embedded::EventLog>,
) -> anyhow::Result<Arc<dyn SourceOpener>> {
    let mut members = Vec::new();
    for (name, kind) in config.sources_of(p) {
        let opener: Arc<dyn SourceOpener> = match kind {
            SourceKind::Embedded => Arc::new(embedded::EmbeddedOpener::new(log.clone())),
            SourceKind::Nats { name, urls, stream } => Arc::new(nats::NatsOpener::new(name, urls, stream)?),
            SourceKind::Kafka { name, servers } => Arc::new(kafka::KafkaOpener::new(name, servers)?),
            SourceKind::Redis { name, url } => Arc::new(redis::RedisOpener::new(name, url)?),
        };
        members.push(multi::Member { name: name.to_string(), opener, streams: p.streams_of(name).to_vec() });
    }
    match members.len() {
        1 => Ok(members.pop().expect("one").opener),
        _ => Ok(Arc::new(multi::MultiOpener::new(members))),
    }
}
