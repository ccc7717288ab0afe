//! The outbox's way out: after a batch commits, the events its module
//! emitted — written to `projector_outbox` in the batch's transaction — are
//! published to the event log, then removed from the outbox.
//!
//! Publishing happens after the commit, off the batch's transaction, so it
//! is at least once; the log makes it exactly once. An emitted event's id is
//! the same every time its cause is handled (`<projection>:<position>:<n>`)
//! and the log keeps ids unique: a publish cut short by a crash (appended,
//! not yet removed) is published again after the restart, and the log drops
//! the copy.
//!
//! A rebuild never publishes: its new generation handles the history again
//! and emits again, into its own outbox. At the takeover, what the old
//! generation emitted and had not published yet is published, then the new
//! generation's events caused at or below the old generation's checkpoint
//! are dropped (the old generation published those); the rest, caused by
//! events the old generation never handled, are published by the runner
//! that takes over.
//!
//! Where emitted events go is a [`Publisher`] the supervisor hands the
//! runner, so the runner does not know where they end up: the embedded log
//! for a projection reading it, the broker for one reading a broker: a NATS
//! subject per emitted stream (`Nats-Msg-Id` = the event's id, so the
//! stream drops a copy within its duplicate window), a Redis stream key (the
//! id recorded in a set in the same script, so a copy is dropped), or a
//! Kafka topic (which keeps no ids: a copy is stored, and a reader drops it
//! by id within its window).

use crate::sources::Publisher;
use crate::sources::embedded::NewEvent;
use crate::store::{self, OutboxEvent};
use anyhow::{Context as _, Result};
use prometheus_client::metrics::counter::Counter;
use rusqlite::Connection;

/// How many outbox rows one read takes.
const READ_AT_ONCE: usize = 1000;

/// Publish every event waiting in the outbox of `db`, oldest first: each
/// run of events bound for one stream in one append, removed from the
/// outbox once the log holds it, and counted in `published`.
pub fn publish_pending(db: &Connection, publisher: &dyn Publisher, published: &Counter) -> Result<()> {
    loop {
        let pending = store::outbox_pending(db, READ_AT_ONCE)?;
        for run in pending.chunk_by(|a, b| a.stream == b.stream) {
            let (first, last) = (&run[0], &run[run.len() - 1]);
            let events: Vec<NewEvent> = run.iter().map(as_new_event).collect();
            publisher
                .publish(&first.stream, &events)
                .with_context(|| format!("cannot publish {} to stream {}", first.id, first.stream))?;
            store::outbox_remove(db, last.seq)?;
            published.inc_by(run.len() as u64);
        }
        if pending.len() < READ_AT_ONCE {
            return Ok(());
        }
    }
}

/// A rebuilt generation (`new`) takes over from the one it replaces
/// (`old`): what `old` emitted and has not published yet is published
/// (when there is a `publisher`), then `new`'s events caused at or below
/// `old`'s checkpoint of source `source_key` are dropped: `old` published
/// them. Call before `new` becomes the projection's database. Returns how
/// many events `new` emitted that `old` never did: what is left to publish.
pub fn hand_over(
    old: &Connection,
    new: &Connection,
    source_key: &str,
    publisher: Option<&dyn Publisher>,
    published: &Counter,
) -> Result<u64> {
    if let Some(publisher) = publisher {
        publish_pending(old, publisher, published)
            .context("cannot publish what the replaced generation emitted")?;
    }
    // Each row names its cause's partition (a Kafka partition, a Redis
    // key), so the old checkpoint's position of that partition says
    // whether the old generation handled it.
    let through = store::checkpoint(old, source_key)?;
    let dropped = store::outbox_drop_through(new, &through, source_key)?;
    if dropped > 0 {
        tracing::debug!(
            dropped,
            through = %through.to_json(),
            "events the replaced generation published dropped from the outbox"
        );
    }
    store::outbox_len(new)
}

/// An outbox row as the log takes it: its id, the projection as source,
/// the causing event's correlation id and id as causation id.
fn as_new_event(row: &OutboxEvent) -> NewEvent {
    let json = serde_json::from_slice::<serde::de::IgnoredAny>(&row.data).is_ok();
    NewEvent {
        id: row.id.clone(),
        source: row.source.clone(),
        event_type: row.event_type.clone(),
        subject: row.subject.clone(),
        time: Some(row.time.clone()),
        datacontenttype: Some(if json { "application/json" } else { "application/octet-stream" }.into()),
        correlation_id: row.correlation_id.clone(),
        causation_id: Some(row.causation_id.clone()),
        data: row.data.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::embedded::AppendOutcome;
    use crate::store::runtime_tables;
    use rusqlite::params;
    use std::sync::Mutex;

    /// Records what it is asked to publish; fails while `failing`.
    #[derive(Default)]
    struct Recorder {
        appended: Mutex<Vec<(String, String)>>,
        failing: std::sync::atomic::AtomicBool,
    }

    impl Publisher for Recorder {
        fn publish(&self, stream: &str, events: &[NewEvent]) -> Result<AppendOutcome> {
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                anyhow::bail!("the log is unreachable");
            }
            let mut appended = self.appended.lock().unwrap();
            appended.extend(events.iter().map(|e| (stream.to_string(), e.id.clone())));
            Ok(AppendOutcome { appended: events.len() as u64, duplicates: 0 })
        }
    }

    fn emit(db: &Connection, id: &str, stream: &str, position: u64) {
        db.execute(
            runtime_tables::OUTBOX_INSERT,
            params![
                id,
                stream,
                "t",
                None::<String>,
                b"{}".to_vec(),
                "c",
                "e",
                "projector/p",
                position as i64,
                None::<String>
            ],
        )
        .unwrap();
    }

    fn database(dir: &tempfile::TempDir, name: &str) -> Connection {
        store::open(&dir.path().join(name)).unwrap()
    }

    #[test]
    fn pending_events_are_published_in_order_by_stream_runs_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(&dir, "p.db");
        for (id, stream, position) in
            [("p:1:0", "a", 1), ("p:1:1", "a", 1), ("p:2:0", "b", 2), ("p:3:0", "a", 3)]
        {
            emit(&db, id, stream, position);
        }
        let recorder = Recorder::default();
        let published = Counter::default();
        publish_pending(&db, &recorder, &published).unwrap();
        assert_eq!(published.get(), 4);
        let appended = recorder.appended.lock().unwrap().clone();
        let expected = [("a", "p:1:0"), ("a", "p:1:1"), ("b", "p:2:0"), ("a", "p:3:0")];
        assert_eq!(appended, expected.map(|(s, id)| (s.to_string(), id.to_string())));
        assert_eq!(store::outbox_len(&db).unwrap(), 0);
    }

    #[test]
    fn a_failed_publish_keeps_the_events_for_the_next_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(&dir, "p.db");
        emit(&db, "p:1:0", "a", 1);
        let recorder = Recorder::default();
        recorder.failing.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = publish_pending(&db, &recorder, &Counter::default()).unwrap_err();
        assert!(format!("{err:#}").contains("cannot publish p:1:0 to stream a: the log is unreachable"));
        assert_eq!(store::outbox_len(&db).unwrap(), 1);
        recorder.failing.store(false, std::sync::atomic::Ordering::Relaxed);
        publish_pending(&db, &recorder, &Counter::default()).unwrap();
        assert_eq!(store::outbox_len(&db).unwrap(), 0);
    }

    #[test]
    fn a_takeover_publishes_the_old_outbox_and_drops_what_it_covered() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (database(&dir, "p.db"), database(&dir, "p.1.db"));
        store::advance_checkpoint(&old, &Default::default(), &crate::sources::Checkpoint::at("log", 5))
            .unwrap();
        // The old generation had handled up to 5 and not yet published its
        // last event; the new one handled up to 7.
        emit(&old, "p:5:0", "a", 5);
        for position in [2, 5, 7] {
            emit(&new, &format!("p:{position}:0"), "a", position);
        }
        let recorder = Recorder::default();
        let published = Counter::default();
        assert_eq!(hand_over(&old, &new, "log", Some(&recorder), &published).unwrap(), 1);
        assert_eq!(published.get(), 1);
        assert_eq!(recorder.appended.lock().unwrap().clone(), [("a".to_string(), "p:5:0".to_string())]);
        let left: Vec<String> = store::outbox_pending(&new, 10).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(left, ["p:7:0"], "only what the old generation never handled is left to publish");
    }

    #[test]
    fn published_events_carry_their_cause_and_content_type() {
        let dir = tempfile::tempdir().unwrap();
        let db = database(&dir, "p.db");
        emit(&db, "p:1:0", "a", 1);
        let row = &store::outbox_pending(&db, 1).unwrap()[0];
        let event = as_new_event(row);
        assert_eq!(
            (event.source.as_str(), event.correlation_id.as_deref(), event.causation_id.as_deref()),
            ("projector/p", Some("c"), Some("e"))
        );
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(event.time.as_deref(), Some(row.time.as_str()));
        let binary = OutboxEvent { data: vec![0xff, 0], ..row.clone() };
        assert_eq!(as_new_event(&binary).datacontenttype.as_deref(), Some("application/octet-stream"));
    }
}
