//! [`MultiSource`]: one projection reading several sources at once
//! (`source = ["log", "bus"]`), a read model joined from services that
//! publish on different brokers.
//!
//! The runner sees one [`Source`]. Its checkpoint holds every member's
//! partitions, each under the multi-source's key and the member's own key
//! (`multi:log+nats:USERS/log`, `multi:log+nats:USERS/nats:USERS`), so
//! no two members' partitions can meet, and the whole checkpoint still
//! commits in the batch's transaction. Two members of the same key (two
//! Redis servers, both database 0) go by `<key>@<source name>`.
//!
//! Ordering: each member's events come in that member's order (per
//! partition, as the member gives them); members are read in turn,
//! starting with another one each batch, and a batch holds what each had
//! when it was read: across sources, the order in which the host read
//! them, never a global order. A member that cannot be reached waits out
//! a backoff of its own while the others go on.

use super::{
    Batch, Checkpoint, Filter, Health, Progress, Publisher, Source, SourceError, SourceOpener, Wake,
};
use anyhow::Context as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// While waiting for the first event, each member is waited on at most
/// this long in turn: the longest a quiet member delays a busy one.
const SLICE: Duration = Duration::from_millis(5);
/// A member that could not be reached is tried again after this long…
const BACKOFF_START: Duration = Duration::from_millis(100);
/// …doubling each time, up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// One source of several, as the config names it.
pub struct Member {
    /// Its name in `source` (`log`, or a `[sources]` name).
    pub name: String,
    /// Opens its readers.
    pub opener: Arc<dyn SourceOpener>,
    /// The streams the projection reads from it.
    pub streams: Vec<String>,
}

/// Opens a [`MultiSource`] over each member's reader.
pub struct MultiOpener {
    name: String,
    members: Vec<Member>,
}

impl MultiOpener {
    /// An opener over `members`, in the order the config lists them (the
    /// first is where emitted events are published).
    pub fn new(members: Vec<Member>) -> Self {
        let name = members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join("+");
        MultiOpener { name, members }
    }
}

impl SourceOpener for MultiOpener {
    fn name(&self) -> &str {
        &self.name
    }

    /// Each member's reader takes its own streams and `filter`'s types.
    fn open(&self, filter: &Filter, reader: &str) -> anyhow::Result<Box<dyn Source>> {
        let mut opened = Vec::new();
        for member in &self.members {
            let filter = Filter { streams: member.streams.clone(), types: filter.types.clone() };
            let source = member
                .opener
                .open(&filter, reader)
                .with_context(|| format!("cannot open source {:?}", member.name))?;
            opened.push((member.name.clone(), source));
        }
        Ok(Box::new(MultiSource::new(opened)))
    }

    /// The first source's: emitted events go to one place.
    fn publisher(&self, routes: &BTreeMap<String, String>) -> Option<Arc<dyn Publisher>> {
        self.members[0].opener.publisher(routes)
    }
}

/// A member's reader, and how the multi-source knows it.
struct Reader {
    name: String,
    source: Box<dyn Source>,
    /// What its partitions are called here, after the multi-source's key:
    /// its key, or `<key>@<name>` when another member has the same key.
    alias: String,
    /// Its partitions as the multi-source's checkpoint names them.
    outer: HashMap<Arc<str>, Arc<str>>,
    /// Since it could not be reached: why, when to try again, and the
    /// backoff now.
    down: Option<(String, Instant, Duration)>,
    /// What its last progress said (shown while it cannot be reached).
    progress: Progress,
}

impl Reader {
    fn is_resting(&self) -> bool {
        self.down.as_ref().is_some_and(|(_, at, _)| Instant::now() < *at)
    }

    fn failed(&mut self, reason: String) {
        let backoff = self.down.as_ref().map_or(BACKOFF_START, |(_, _, b)| (*b * 2).min(BACKOFF_CAP));
        if self.down.is_none() {
            tracing::warn!(source = %self.name, "source unavailable: {reason}; the other sources go on");
        }
        self.down = Some((reason, Instant::now() + backoff, backoff));
    }

    fn answered(&mut self) {
        if let Some((reason, _, _)) = self.down.take() {
            tracing::info!(source = %self.name, "source reachable again (was: {reason})");
        }
    }
}

/// Several sources read as one: see the module's documentation.
pub struct MultiSource {
    key: String,
    readers: Vec<Reader>,
    /// The member read first in the next batch: each batch starts with
    /// another, so none waits behind a busy one for long.
    first: usize,
    waker: Arc<MultiWaker>,
    /// A malformed message a member returned while the batch already held
    /// other events: it comes alone, in the next batch, if that batch
    /// starts where this one ended (member, its checkpoint then, its batch).
    stashed: Option<(usize, Checkpoint, Batch)>,
}

impl MultiSource {
    /// Several opened sources, with their names, as one.
    pub fn new(sources: Vec<(String, Box<dyn Source>)>) -> Self {
        let keys: Vec<String> = sources.iter().map(|(_, source)| source.key().to_string()).collect();
        let readers: Vec<Reader> = sources
            .into_iter()
            .enumerate()
            .map(|(i, (name, source))| {
                let shared = keys.iter().filter(|key| **key == keys[i]).count() > 1;
                let alias = if shared { format!("{}@{name}", keys[i]) } else { keys[i].clone() };
                Reader {
                    name,
                    source,
                    alias,
                    outer: HashMap::new(),
                    down: None,
                    progress: Progress::default(),
                }
            })
            .collect();
        let key = multi_key(readers.iter().map(|r| r.alias.as_str()));
        let waker = Arc::new(MultiWaker {
            woken: AtomicBool::new(false),
            members: readers.iter().map(|r| r.source.waker()).collect(),
        });
        MultiSource { key, readers, first: 0, waker, stashed: None }
    }

    /// `after`, the multi-source's checkpoint, as each member's.
    fn split(&self, after: &Checkpoint) -> Vec<Checkpoint> {
        let mut split = vec![Checkpoint::default(); self.readers.len()];
        for (partition, position) in after.partitions() {
            let Some(rest) = partition.strip_prefix(&self.key).and_then(|rest| rest.strip_prefix('/')) else {
                continue;
            };
            for (i, reader) in self.readers.iter().enumerate() {
                if let Some(tail) = rest.strip_prefix(reader.alias.as_str())
                    && (tail.is_empty() || tail.starts_with('/'))
                {
                    split[i].set(&format!("{}{tail}", reader.source.key()), position);
                }
            }
        }
        split
    }

    /// Member `i`'s `partition` as the multi-source's checkpoint names it.
    fn outer(&mut self, i: usize, partition: &str) -> Arc<str> {
        let reader = &mut self.readers[i];
        if let Some(outer) = reader.outer.get(partition) {
            return outer.clone();
        }
        let outer: Arc<str> =
            outer_partition(&self.key, &reader.alias, reader.source.key(), partition).into();
        reader.outer.insert(partition.into(), outer.clone());
        outer
    }

    /// Add member `i`'s `batch` to `into`: its events after those there,
    /// in its order, and its end.
    fn merge(&mut self, i: usize, batch: Batch, into: &mut Batch) {
        for (partition, position) in batch.end.partitions() {
            let outer = self.outer(i, partition);
            // A partition a member names at 0 (before its first event) is
            // left out, as before: an idle batch is one whose end is `after`.
            if into.end.position(&outer) != position {
                into.end.set(&outer, position);
            }
        }
        if batch.checkpoints.is_empty() && !into.checkpoints.is_empty() {
            into.checkpoints.extend(batch.events.iter().map(|event| event.position));
        } else if !batch.checkpoints.is_empty() && into.checkpoints.is_empty() {
            into.checkpoints = into.events.iter().map(|event| event.position).collect();
            into.checkpoints.extend(&batch.checkpoints);
        } else {
            into.checkpoints.extend(&batch.checkpoints);
        }
        for partition in &batch.partitions {
            let outer = self.outer(i, partition);
            into.partitions.push(outer);
        }
        if batch.partitions.is_empty() && batch.malformed.is_some() {
            // The malformed message's partition: the member's key.
            let key = self.readers[i].source.key().to_string();
            let outer = self.outer(i, &key);
            into.partitions.push(outer);
        }
        into.events.extend(batch.events);
        into.malformed = batch.malformed;
    }
}

/// The key of a multi-source over members known by `aliases`: the same
/// whatever order the config lists them in.
pub fn multi_key<'a>(aliases: impl Iterator<Item = &'a str>) -> String {
    let mut aliases: Vec<&str> = aliases.collect();
    aliases.sort_unstable();
    format!("multi:{}", aliases.join("+"))
}

/// A member's `partition` (its `key`, or `key/…`) as a multi-source of key
/// `multi` names it, the member going by `alias`.
fn outer_partition(multi: &str, alias: &str, key: &str, partition: &str) -> String {
    match partition.strip_prefix(key) {
        Some(tail) if tail.is_empty() || tail.starts_with('/') => format!("{multi}/{alias}{tail}"),
        _ => format!("{multi}/{alias}/{partition}"),
    }
}

impl Source for MultiSource {
    fn key(&self) -> &str {
        &self.key
    }

    fn next_batch(&mut self, after: &Checkpoint, max: usize, wait: Duration) -> Result<Batch, SourceError> {
        let afters = self.split(after);
        let max = max.max(1);
        let mut batch = Batch { end: after.clone(), ..Batch::default() };
        if let Some((i, at, stashed)) = self.stashed.take()
            && afters[i] == at
        {
            self.merge(i, stashed, &mut batch);
            return Ok(batch);
        }
        let until = Instant::now() + wait;
        let count = self.readers.len();
        let first = self.first;
        self.first = (first + 1) % count;
        let mut slice = Duration::ZERO;
        loop {
            let mut unavailable = Vec::new();
            for i in (0..count).map(|step| (first + step) % count) {
                if batch.events.len() >= max {
                    break;
                }
                let reader = &mut self.readers[i];
                if reader.is_resting() {
                    let (reason, _, _) = reader.down.as_ref().expect("resting");
                    unavailable.push(format!("{}: {reason}", reader.name));
                    continue;
                }
                let wait = slice.min(until.saturating_duration_since(Instant::now()));
                match reader.source.next_batch(&afters[i], max - batch.events.len(), wait) {
                    Ok(read) => {
                        reader.answered();
                        if read.malformed.is_some() && !batch.events.is_empty() {
                            // It comes alone: next time.
                            self.stashed = Some((i, afters[i].clone(), read));
                            break;
                        }
                        let malformed = read.malformed.is_some();
                        self.merge(i, read, &mut batch);
                        if malformed {
                            return Ok(batch);
                        }
                    }
                    Err(SourceError::Unavailable(reason)) => {
                        unavailable.push(format!("{}: {reason}", reader.name));
                        reader.failed(reason);
                    }
                    Err(SourceError::Failed(err)) => {
                        return Err(SourceError::Failed(err.context(format!("source {:?}", reader.name))));
                    }
                }
            }
            if !batch.is_idle(after) || self.stashed.is_some() {
                return Ok(batch);
            }
            if unavailable.len() == count {
                return Err(SourceError::Unavailable(unavailable.join("; ")));
            }
            if self.waker.woken.swap(false, Ordering::Relaxed) || Instant::now() >= until {
                return Ok(batch);
            }
            slice = SLICE;
        }
    }

    fn acknowledge(&mut self, upto: &Checkpoint) -> Result<(), SourceError> {
        let mut result = Ok(());
        let split = self.split(upto);
        for (reader, upto) in self.readers.iter_mut().zip(split) {
            if reader.is_resting() {
                continue;
            }
            if let Err(err) = reader.source.acknowledge(&upto)
                && result.is_ok()
            {
                result = Err(err);
            }
        }
        result
    }

    fn progress(&mut self, at: &Checkpoint) -> Result<Progress, SourceError> {
        let afters = self.split(at);
        let mut unavailable = Vec::new();
        for (i, at) in afters.iter().enumerate() {
            let reader = &mut self.readers[i];
            if reader.is_resting() {
                unavailable.push(reader.name.clone());
                continue;
            }
            match reader.source.progress(at) {
                Ok(progress) => {
                    reader.answered();
                    reader.progress = progress;
                }
                Err(SourceError::Unavailable(reason)) => {
                    unavailable.push(format!("{}: {reason}", reader.name));
                    reader.failed(reason);
                }
                Err(SourceError::Failed(err)) => {
                    return Err(SourceError::Failed(err.context(format!("source {:?}", reader.name))));
                }
            }
        }
        if unavailable.len() == self.readers.len() {
            return Err(SourceError::Unavailable(unavailable.join("; ")));
        }
        // A member out of reach counts with the head it last showed.
        let mut total = Progress::default();
        for (i, at) in afters.iter().enumerate() {
            let progress = self.readers[i].progress.clone();
            let lag = match self.readers[i].down {
                None => progress.lag,
                Some(_) => {
                    progress.head.partitions().map(|(p, head)| head.saturating_sub(at.position(p))).sum()
                }
            };
            total.lag = total.lag.saturating_add(lag);
            for (partition, head) in progress.head.partitions() {
                let outer = self.outer(i, partition);
                total.head.set(&outer, head);
            }
        }
        Ok(total)
    }

    /// Connecting while any member is, naming which.
    fn health(&self) -> Health {
        let errors: Vec<String> = self
            .readers
            .iter()
            .filter_map(|reader| match (reader.source.health(), &reader.down) {
                (_, Some((reason, _, _))) => Some(format!("{}: {reason}", reader.name)),
                (Health::Connecting { error }, None) => {
                    Some(format!("{}: {}", reader.name, error.unwrap_or_else(|| "connecting".into())))
                }
                (Health::Connected, None) => None,
            })
            .collect();
        match errors.is_empty() {
            true => Health::Connected,
            false => Health::Connecting { error: Some(errors.join("; ")) },
        }
    }

    fn warning(&self) -> Option<String> {
        let warnings: Vec<String> = self
            .readers
            .iter()
            .filter_map(|reader| reader.source.warning().map(|warning| format!("{}: {warning}", reader.name)))
            .collect();
        (!warnings.is_empty()).then(|| warnings.join("; "))
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }
}

/// Wakes every member, and the multi-source's own wait between them.
struct MultiWaker {
    woken: AtomicBool,
    members: Vec<Arc<dyn Wake>>,
}

impl Wake for MultiWaker {
    fn wake(&self) {
        self.woken.store(true, Ordering::Relaxed);
        for member in &self.members {
            member.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::embedded::{EmbeddedOpener, EventLog, NewEvent};

    fn event(id: &str) -> NewEvent {
        NewEvent {
            id: id.into(),
            source: "test".into(),
            event_type: "noted".into(),
            subject: None,
            time: None,
            datacontenttype: None,
            correlation_id: None,
            causation_id: None,
            data: b"{}".to_vec(),
        }
    }

    /// Two embedded logs (both of key `log`) read as one.
    fn two_logs() -> (tempfile::TempDir, Arc<EventLog>, Arc<EventLog>, MultiSource) {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(EventLog::open(&dir.path().join("a")).unwrap());
        let b = Arc::new(EventLog::open(&dir.path().join("b")).unwrap());
        let filter = Filter { streams: vec!["s".into()], types: None };
        let open = |log: &Arc<EventLog>| EmbeddedOpener::new(log.clone()).open(&filter, "p").unwrap();
        let multi = MultiSource::new(vec![("b".into(), open(&b)), ("a".into(), open(&a))]);
        (dir, a, b, multi)
    }

    fn ids(batch: &Batch) -> Vec<&str> {
        batch.events.iter().map(|event| event.id.as_str()).collect()
    }

    #[test]
    fn the_key_is_the_same_whatever_order_the_members_are_listed_in() {
        assert_eq!(multi_key(["nats:USERS", "log"].into_iter()), "multi:log+nats:USERS");
        assert_eq!(multi_key(["log", "nats:USERS"].into_iter()), "multi:log+nats:USERS");
    }

    #[test]
    fn member_partitions_go_under_the_multi_key_and_back() {
        let multi = "multi:kafka:orders+redis:db0";
        assert_eq!(
            outer_partition(multi, "redis:db0", "redis:db0", "redis:db0"),
            format!("{multi}/redis:db0")
        );
        assert_eq!(
            outer_partition(multi, "kafka:orders", "kafka:orders", "kafka:orders/orders/2"),
            format!("{multi}/kafka:orders/orders/2")
        );
        // Two members of one key: each goes by its name too, and a
        // checkpoint splits back into each one's own.
        let (_dir, a, b, multi) = two_logs();
        assert_eq!(multi.key(), "multi:log@a+log@b");
        a.append("s", &[event("a1"), event("a2")]).unwrap();
        b.append("s", &[event("b1")]).unwrap();
        let mut checkpoint = Checkpoint::default();
        checkpoint.set("multi:log@a+log@b/log@a", 2);
        checkpoint.set("multi:log@a+log@b/log@b", 1);
        checkpoint.set("log", 7); // another key's: not this source's
        let split = multi.split(&checkpoint);
        assert_eq!(split, vec![Checkpoint::at("log", 1), Checkpoint::at("log", 2)]);
    }

    #[test]
    fn members_merge_each_in_its_own_order_taking_turns() {
        let (_dir, a, b, mut multi) = two_logs();
        a.append("s", &[event("a1"), event("a2"), event("a3")]).unwrap();
        b.append("s", &[event("b1"), event("b2")]).unwrap();
        let start = Checkpoint::default();
        let batch = multi.next_batch(&start, 100, Duration::ZERO).unwrap();
        assert_eq!(ids(&batch), ["b1", "b2", "a1", "a2", "a3"]);
        let partitions: Vec<&str> = batch.partitions.iter().map(|p| &**p).collect();
        let (pa, pb) = ("multi:log@a+log@b/log@a", "multi:log@a+log@b/log@b");
        assert_eq!(partitions, [pb, pb, pa, pa, pa]);
        assert_eq!((batch.end.position(pa), batch.end.position(pb)), (3, 2));
        // Applying part of it moves only the partitions of what was applied.
        let part = batch.checkpoint_after(&start, 3);
        assert_eq!((part.position(pa), part.position(pb)), (1, 2));
        // The next batch starts with the other member; `max` is honoured,
        // and each member resumes where the checkpoint says.
        a.append("s", &[event("a4")]).unwrap();
        b.append("s", &[event("b3")]).unwrap();
        let batch = multi.next_batch(&part, 2, Duration::ZERO).unwrap();
        assert_eq!(ids(&batch), ["a2", "a3"]);
        let batch = multi.next_batch(&batch.end, 10, Duration::ZERO).unwrap();
        assert_eq!(ids(&batch), ["b3", "a4"]);
    }

    #[test]
    fn a_quiet_member_does_not_hold_up_a_busy_one_and_the_wait_is_honoured() {
        let (_dir, a, _b, mut multi) = two_logs();
        let started = Instant::now();
        let idle = multi.next_batch(&Checkpoint::default(), 10, Duration::from_millis(300)).unwrap();
        let waited = started.elapsed();
        assert!(idle.is_idle(&Checkpoint::default()), "{idle:?}");
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2), "{waited:?}");
        let appender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            a.append("s", &[event("a1")]).unwrap();
        });
        let started = Instant::now();
        let batch = multi.next_batch(&Checkpoint::default(), 10, Duration::from_secs(10)).unwrap();
        assert_eq!(ids(&batch), ["a1"]);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited {:?} for a busy member",
            started.elapsed()
        );
        appender.join().unwrap();
        // A wake ends the wait early.
        let waker = multi.waker();
        let waking = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            waker.wake();
        });
        let started = Instant::now();
        multi.next_batch(&batch.end, 10, Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "a wake did not end the wait");
        waking.join().unwrap();
    }

    #[test]
    fn progress_sums_the_lag_and_names_every_member_head() {
        let (_dir, a, b, mut multi) = two_logs();
        a.append("s", &[event("a1"), event("a2")]).unwrap();
        b.append("s", &[event("b1")]).unwrap();
        let progress = multi.progress(&Checkpoint::at("multi:log@a+log@b/log@a", 1)).unwrap();
        assert_eq!(progress.lag, 2);
        assert_eq!(progress.head.position("multi:log@a+log@b/log@a"), 2);
        assert_eq!(progress.head.position("multi:log@a+log@b/log@b"), 1);
        assert_eq!(multi.health(), Health::Connected);
    }
}
