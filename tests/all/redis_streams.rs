//! Redis Streams as a source, against a real `redis-server` on loopback:
//! reading several keys in order from a checkpoint, seeking, both modes of
//! the binding, malformed entries, a server killed mid-read, a stream
//! trimmed past the checkpoint, `projector publish`; and end to end through
//! `projector run`: the state equals a replay, after host kills, a server
//! restart, and on two replicas; a projection emitting to a stream key (the
//! outbox added to Redis, a copy dropped by id).

use crate::util::*;
use projector::bindings::Event;
use projector::sources::cloudevents::parse_event;
use projector::sources::embedded::NewEvent;
use projector::sources::redis::{PublishOutcome, RedisOpener, entry_id, position, publish};
use projector::sources::{Checkpoint, Filter, Health, Source, SourceError, SourceOpener};
use redis::Commands as _;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const KEYS: [&str; 3] = ["wallets-0", "wallets-1", "wallets-2"];

/// A key's partition in checkpoints.
fn partition(key: &str) -> String {
    format!("redis:db0/{key}")
}

/// `n` wallet events as parsed CloudEvents, ids `<prefix>-<i>`.
fn events(n: usize, prefix: &str) -> Vec<NewEvent> {
    wallet_events(n, 50, prefix).iter().map(|line| parse_event(line).unwrap()).collect()
}

/// Add `events` to `key` in binary mode (attributes in `ce_` fields, data
/// in `data`), as another producer would, with `XADD`.
fn xadd_binary(server: &RedisServer, key: &str, events: &[NewEvent]) {
    let mut connection = server.connection();
    let mut pipe = redis::pipe();
    for event in events {
        let mut fields: Vec<(&str, &[u8])> = vec![
            ("ce_specversion", b"1.0"),
            ("ce_id", event.id.as_bytes()),
            ("ce_type", event.event_type.as_bytes()),
            ("ce_source", event.source.as_bytes()),
        ];
        let optional = [
            ("ce_subject", &event.subject),
            ("ce_time", &event.time),
            ("ce_correlationid", &event.correlation_id),
            ("ce_causationid", &event.causation_id),
            ("ce_datacontenttype", &event.datacontenttype),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                fields.push((name, value.as_bytes()));
            }
        }
        fields.push(("data", &event.data));
        pipe.xadd(key, "*", &fields).ignore();
    }
    pipe.query::<()>(&mut connection).unwrap();
}

/// Add one entry of raw fields.
fn xadd_raw(server: &RedisServer, key: &str, fields: &[(&str, &[u8])]) -> String {
    server.connection().xadd(key, "*", fields).unwrap()
}

/// Each entry of `key`: (its position, the `ce_id` or the structured
/// event's id).
fn entries(server: &RedisServer, key: &str) -> Vec<(u64, String)> {
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let reply: Vec<Entry> =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(&mut server.connection()).unwrap();
    reply
        .into_iter()
        .map(|(id, fields)| {
            let fields: HashMap<String, Vec<u8>> = fields.into_iter().collect();
            let event_id = match (fields.get("cloudevent"), fields.get("ce_id")) {
                (Some(json), _) => parse_event(std::str::from_utf8(json).unwrap()).unwrap().id,
                (None, Some(id)) => String::from_utf8(id.clone()).unwrap(),
                (None, None) => String::new(),
            };
            (position(&id).unwrap(), event_id)
        })
        .collect()
}

fn filter(keys: &[&str], types: Option<&[&str]>) -> Filter {
    Filter {
        streams: keys.iter().map(|s| s.to_string()).collect(),
        types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
    }
}

fn open(server: &RedisServer, keys: &[&str]) -> Box<dyn Source> {
    RedisOpener::new("cache", &server.url()).unwrap().open(&filter(keys, None), "tests").unwrap()
}

/// What reading gave.
#[derive(Default)]
struct Read {
    events: Vec<Event>,
    /// The `Unavailable` messages met on the way.
    unavailable: Vec<String>,
    end: Checkpoint,
}

/// Read batches of at most `max` from `after` until `count` events came, as
/// a runner would (moving to each batch's `end`); then one more read finds
/// nothing.
fn read_count(source: &mut dyn Source, after: Checkpoint, count: usize, max: usize) -> Read {
    let read = read_some(source, after, count, max);
    let idle = source.next_batch(&read.end, max, Duration::from_millis(50)).unwrap();
    assert!(idle.is_idle(&read.end), "nothing more: {:?}", idle.events.len());
    read
}

/// [`read_count`] without the last read: more may follow.
fn read_some(source: &mut dyn Source, after: Checkpoint, count: usize, max: usize) -> Read {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut read = Read { end: after, ..Read::default() };
    while read.events.len() < count {
        assert!(
            Instant::now() < deadline,
            "timed out at {} of {count} events (unavailable: {:?})",
            read.events.len(),
            read.unavailable.last()
        );
        match source.next_batch(&read.end, max, Duration::from_millis(100)) {
            Ok(batch) => {
                assert!(batch.events.len() <= max, "a batch holds at most max events");
                assert_eq!(batch.events.len(), batch.partitions.len());
                assert!(batch.malformed.is_none(), "{:?}", batch.malformed);
                for (event, partition) in batch.events.iter().zip(&batch.partitions) {
                    assert_eq!(**partition, partition_of(&event.stream), "an event's partition is its key's");
                }
                read.events.extend(batch.events.iter().cloned());
                read.end = batch.end.clone();
                source.acknowledge(&read.end).unwrap();
            }
            Err(SourceError::Unavailable(reason)) => {
                read.unavailable.push(reason);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(SourceError::Failed(err)) => panic!("the source failed: {err:#}"),
        }
    }
    assert_eq!(read.events.len(), count, "no event more than expected");
    read
}

fn partition_of(key: &str) -> String {
    partition(key)
}

/// Every event of each key exactly as added, in the key's order, at its
/// entry's position, each once.
fn assert_exactly(server: &RedisServer, read: &[Event], added: &HashMap<&str, Vec<NewEvent>>) {
    let ids: HashSet<&str> = read.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), read.len(), "an event was read twice");
    for (key, expected) in added {
        let got: Vec<&Event> = read.iter().filter(|e| e.stream == *key).collect();
        assert_eq!(got.len(), expected.len(), "key {key}: every event read, none more");
        let stored = entries(server, key);
        let stored = &stored[stored.len() - expected.len()..];
        for ((event, expected), (position, id)) in got.iter().zip(expected).zip(stored) {
            assert_eq!(event.id, expected.id, "key {key}: in order");
            assert_eq!((event.position, &event.id), (*position, id), "key {key}: at its entry ID's position");
            assert_eq!(event.type_, expected.event_type);
            assert_eq!(event.data, expected.data, "event {}'s data", event.id);
            assert_eq!(event.correlation_id, expected.correlation_id);
        }
    }
}

/// The first error a read from `after` meets, whatever it is.
fn read_error(source: &mut dyn Source, after: &Checkpoint) -> SourceError {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "the read never failed");
        match source.next_batch(after, 100, Duration::from_millis(100)) {
            Err(err) => return err,
            Ok(batch) => assert!(batch.is_idle(after), "nothing is read: {} events", batch.events.len()),
        }
    }
}

#[test]
fn every_entry_of_three_keys_in_either_mode_is_read_once_in_id_order_at_its_position() {
    let server = RedisServer::start();
    let all = events(3000, "w");
    // Chunks go to the keys in turn, alternating between structured mode
    // (`publish`) and binary mode (another producer's `ce_` fields).
    let mut added: HashMap<&str, Vec<NewEvent>> = HashMap::new();
    for (i, chunk) in all.chunks(250).enumerate() {
        let key = KEYS[i % 3];
        match (i / 3) % 2 {
            0 => assert_eq!(
                publish(&server.url(), key, chunk).unwrap(),
                PublishOutcome { published: 250, duplicates: 0 },
                "chunk {i}"
            ),
            _ => xadd_binary(&server, key, chunk),
        }
        added.entry(key).or_default().extend(chunk.iter().cloned());
    }
    // Published again: each id is known, nothing is added.
    assert_eq!(
        publish(&server.url(), KEYS[0], &all[..250]).unwrap(),
        PublishOutcome { published: 0, duplicates: 250 }
    );

    let mut source = open(&server, &KEYS);
    assert_eq!(source.key(), "redis:db0");
    let before = source.progress(&Checkpoint::default()).unwrap();
    let heads: Vec<u64> = KEYS.iter().map(|key| entries(&server, key).last().unwrap().0).collect();
    let mut head = Checkpoint::default();
    for (key, last) in KEYS.iter().zip(&heads) {
        head.set(&partition(key), *last);
    }
    assert_eq!((&before.head, before.lag), (&head, 3000));
    let read = read_count(&mut *source, Checkpoint::default(), 3000, 250);
    assert_exactly(&server, &read.events, &added);
    assert!(read.unavailable.is_empty(), "{:?}", read.unavailable);
    let positions: Vec<u64> = read.events.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "the keys are merged in entry ID order");
    assert_eq!(read.end, head, "the checkpoint holds each key's last entry");
    let after = source.progress(&read.end).unwrap();
    assert_eq!((after.head, after.lag), (head, 0));
    assert_eq!(source.health(), Health::Connected);
    assert_eq!(source.warning(), None);
}

#[test]
fn a_read_starts_after_the_checkpoint_it_is_given_and_a_retried_read_sees_the_same_events() {
    let server = RedisServer::start();
    let all = events(100, "s");
    publish(&server.url(), "wallets", &all).unwrap();
    let stored = entries(&server, "wallets");
    let mut source = open(&server, &["wallets"]);
    let at = |i: usize| match i {
        0 => Checkpoint::default(),
        i => Checkpoint::at(&partition("wallets"), stored[i - 1].0),
    };
    let mut read = |after: usize| {
        let batch = source.next_batch(&at(after), 10, Duration::from_secs(5)).unwrap();
        assert_eq!(batch.end, at(after + 10));
        batch.events.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    };
    let ids = |range: std::ops::Range<usize>| all[range].iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(read(40), ids(40..50));
    // Not committed: asked again from 40, the same events.
    assert_eq!(read(40), ids(40..50));
    assert_eq!(read(50), ids(50..60));
    // Back, and forward past what was read.
    assert_eq!(read(45), ids(45..55));
    assert_eq!(read(80), ids(80..90));
    assert_eq!(read(0), ids(0..10));
    // Entry IDs and positions map both ways.
    let (first, _) = stored[0];
    assert_eq!(position(&entry_id(first)).unwrap(), first);
}

#[test]
fn types_are_filtered_here_and_skipped_entries_still_move_the_end() {
    let server = RedisServer::start();
    let all = events(300, "f");
    publish(&server.url(), "wallets", &all).unwrap();
    let last = entries(&server, "wallets").last().unwrap().0;
    let source = RedisOpener::new("cache", &server.url()).unwrap();
    let mut source = source.open(&filter(&["wallets"], Some(&["kyc_verified"])), "tests").unwrap();
    let kyc: Vec<&NewEvent> = all.iter().filter(|e| e.event_type == "kyc_verified").collect();
    assert!(kyc.len() > 20, "the scenario has KYC events");
    let read = read_count(&mut *source, Checkpoint::default(), kyc.len(), 50);
    assert_eq!(
        read.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        kyc.iter().map(|e| e.id.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(read.end, Checkpoint::at(&partition("wallets"), last), "the end moves past what was skipped");
}

#[test]
fn an_entry_that_is_no_cloudevent_comes_back_malformed_alone_with_the_end_past_it() {
    let server = RedisServer::start();
    let all = events(5, "m");
    publish(&server.url(), "wallets", &all[..3]).unwrap();
    let plain = xadd_raw(&server, "wallets", &[("hello", b"world")]);
    let half =
        xadd_raw(&server, "wallets", &[("ce_specversion", b"1.0"), ("ce_id", b"bad-1"), ("data", b"{}")]);
    publish(&server.url(), "wallets", &all[3..]).unwrap();
    let stored = entries(&server, "wallets");
    let at = |i: usize| Checkpoint::at(&partition("wallets"), stored[i - 1].0);

    let mut source = open(&server, &["wallets"]);
    let mut next = |after: Checkpoint| source.next_batch(&after, 100, Duration::from_secs(5)).unwrap();
    let good = next(Checkpoint::default());
    assert_eq!(good.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["m-0", "m-1", "m-2"]);
    assert!(good.malformed.is_none(), "a malformed entry ends the batch before it");
    assert_eq!(good.end, at(3));

    let bad = next(at(3));
    assert!(bad.events.is_empty(), "a malformed entry comes alone");
    assert_eq!(bad.end, at(4), "the end is past it");
    let malformed = bad.malformed.unwrap();
    assert_eq!(
        (malformed.event.id.as_str(), malformed.event.position, malformed.event.stream.as_str()),
        (format!("redis:db0/wallets:{plain}").as_str(), position(&plain).unwrap(), "wallets")
    );
    assert_eq!(malformed.event.data, br#"{"hello":"world"}"#, "its fields, as JSON");
    assert!(
        malformed.reason.contains("neither a structured-mode CloudEvent (no `cloudevent` field)")
            && malformed.reason.contains("nor a binary-mode one (no `ce_specversion` field)"),
        "{}",
        malformed.reason
    );

    let bad = next(at(4));
    assert_eq!(bad.end, at(5));
    let malformed = bad.malformed.unwrap();
    assert_eq!((malformed.event.id.as_str(), malformed.event.position), ("bad-1", position(&half).unwrap()));
    assert!(malformed.reason.contains("missing required attribute `source`"), "{}", malformed.reason);

    let rest = next(at(5));
    assert_eq!(rest.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["m-3", "m-4"]);
    assert_eq!(rest.end, at(7));
}

#[test]
fn a_server_killed_and_restarted_mid_read_reports_connecting_then_resumes_losing_and_doubling_nothing() {
    let mut server = RedisServer::start();
    let all = events(3000, "k");
    publish(&server.url(), "wallets", &all[..1500]).unwrap();
    let mut source = open(&server, &["wallets"]);
    let mut read = read_count(&mut *source, Checkpoint::default(), 1500, 100);
    assert_eq!(source.health(), Health::Connected);

    server.kill();
    let reason = wait_unavailable(&mut *source, &read.end);
    assert!(reason.contains(&format!("Redis at {}/0", server.url())), "{reason}");
    assert!(
        matches!(source.health(), Health::Connecting { error: Some(ref e) } if e.contains(&server.url())),
        "{:?}",
        source.health()
    );
    server.restart();
    publish(&server.url(), "wallets", &all[1500..]).unwrap();
    let rest = read_count(&mut *source, read.end.clone(), 1500, 100);
    read.events.extend(rest.events);
    assert_exactly(&server, &read.events, &HashMap::from([("wallets", all.clone())]));
    assert_eq!(source.health(), Health::Connected);
}

#[test]
fn a_server_down_at_start_is_connecting_until_it_comes_up() {
    let mut server = RedisServer::start();
    let all = events(200, "d");
    publish(&server.url(), "wallets", &all).unwrap();
    server.kill();
    let mut source = open(&server, &["wallets"]);
    let reason = wait_unavailable(&mut *source, &Checkpoint::default());
    assert!(reason.contains(&format!("cannot connect to Redis at {}/0", server.url())), "{reason}");
    assert!(matches!(source.health(), Health::Connecting { error: Some(_) }), "{:?}", source.health());
    assert!(matches!(source.progress(&Checkpoint::default()), Err(SourceError::Unavailable(_))));
    server.restart();
    let read = read_count(&mut *source, Checkpoint::default(), 200, 1000);
    assert_exactly(&server, &read.events, &HashMap::from([("wallets", all)]));
    assert_eq!(source.health(), Health::Connected);
}

/// XTRIM `key` to the entries from `id` on; returns how many went.
fn trim_to(server: &RedisServer, key: &str, id: &str) -> u64 {
    redis::cmd("XTRIM").arg(key).arg("MINID").arg(id).query(&mut server.connection()).unwrap()
}

/// Read from `after` until the source fails; returns how many events came
/// first, and the error.
fn read_until_failed(source: &mut dyn Source, mut after: Checkpoint) -> (usize, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = 0;
    loop {
        assert!(Instant::now() < deadline, "the read never failed");
        match source.next_batch(&after, 1000, Duration::from_millis(100)) {
            Ok(batch) => {
                events += batch.events.len();
                after = batch.end;
            }
            Err(SourceError::Failed(err)) => return (events, format!("{err:#}")),
            Err(SourceError::Unavailable(reason)) => panic!("trimming is no connection problem: {reason}"),
        }
    }
}

#[test]
fn a_stream_trimmed_past_the_checkpoint_is_an_error_naming_the_key_and_a_reader_from_zero_is_warned() {
    let server = RedisServer::start();
    let all = events(10_000, "t");
    publish(&server.url(), "wallets", &all[..9_000]).unwrap();
    let stored = entries(&server, "wallets");
    let at = |i: usize| Checkpoint::at(&partition("wallets"), stored[i - 1].0);

    // A reader at 8990, caught up at 9000 when everything up to 9000 is
    // trimmed: it lost nothing, and reads on.
    let mut level = open(&server, &["wallets"]);
    let read = read_count(&mut *level, at(8_990), 10, 1000);
    assert_eq!(read.end, at(9_000));
    // Reading 50 of 9000 from the start: the reader prefetches ahead, but
    // not to the end.
    let mut behind = open(&server, &["wallets"]);
    let read = read_some(&mut *behind, Checkpoint::default(), 50, 10);
    assert_eq!(read.end, at(50));
    assert_eq!(trim_to(&server, "wallets", &format!("{}-0", (stored[8_999].0 >> 20) + 1)), 9_000);
    publish(&server.url(), "wallets", &all[9_000..]).unwrap();
    let rest = read_count(&mut *level, at(9_000), 1_000, 1000);
    assert_eq!(rest.events[0].id, all[9_000].id);
    assert_eq!(level.warning(), None, "nothing it had not read was trimmed");

    // The reader behind misses what it had not prefetched: an error naming
    // the key, once it has what it had.
    let (taken, err) = read_until_failed(&mut *behind, read.end.clone());
    assert!((50..8_950).contains(&taken), "it took what it had prefetched ({taken})");
    assert!(
        err.contains("stream key wallets on redis://127.0.0.1:")
            && err
                .contains("the stream was trimmed (MAXLEN, XTRIM) past this projection's checkpoint (entry ")
            && err.contains("entries after it were dropped before it read them")
            && err.contains("rebuild the projection"),
        "{err}"
    );
    let warning = behind.warning().expect("a warning for status");
    assert!(
        warning.contains("stream key wallets: entries were trimmed")
            && warning.contains("a rebuild cannot see")
    );

    // A reader starting at a checkpoint already trimmed away cannot tell
    // what it missed: the same error, never a silent gap.
    let mut restarted = open(&server, &["wallets"]);
    let err = match read_error(&mut *restarted, &at(50)) {
        SourceError::Failed(err) => format!("{err:#}"),
        other => panic!("{other:?}"),
    };
    assert!(err.contains(&format!("checkpoint (entry {})", entry_id(stored[49].0))), "{err}");
    assert!(err.contains("may have been dropped"), "{err}");

    // A reader from 0 (a rebuild) reads what is left, warned.
    let mut source = open(&server, &["wallets"]);
    let read = read_count(&mut *source, Checkpoint::default(), 1_000, 1000);
    assert_eq!(read.events[0].id, all[9_000].id);
    let warning = source.warning().expect("a rebuild from 0 is warned");
    assert!(
        warning.contains("stream key wallets: entries were trimmed (MAXLEN, XTRIM) or deleted before this projection read them (9000 at most)"),
        "{warning}"
    );
}

#[test]
fn a_key_that_is_no_stream_is_an_error_naming_it() {
    let server = RedisServer::start();
    let _: () = server.connection().set("wallets", "a string").unwrap();
    let mut source = open(&server, &["wallets"]);
    let err = match read_error(&mut *source, &Checkpoint::default()) {
        SourceError::Failed(err) => format!("{err:#}"),
        other => panic!("{other:?}"),
    };
    assert!(err.contains("key wallets holds a string, not a stream"), "{err}");
    let err = publish(&server.url(), "wallets", &events(1, "x")).unwrap_err();
    assert!(format!("{err:#}").contains("key wallets holds a string, not a stream"), "{err:#}");
}

#[test]
fn projector_publish_adds_each_event_once_and_a_file_with_a_bad_line_adds_nothing() {
    let server = RedisServer::start();
    let ws = Workspace::new();
    std::fs::write(
        ws.config(),
        format!("version = 1\ndata = \"data\"\n\n[sources.cache]\nredis = {:?}\n", server.url()),
    )
    .unwrap();
    let len = |key: &str| -> u64 { server.connection().xlen(key).unwrap() };
    let lines = wallet_events(500, 20, "cli");
    let file = ws.write_events("wallets.jsonl", &lines);
    let publish = |file: &str| {
        json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "cache", "wallets", file]))
    };
    assert_eq!(publish(&file), serde_json::json!({"published": 500, "duplicates": 0}));
    assert_eq!(publish(&file), serde_json::json!({"published": 0, "duplicates": 500}));
    assert_eq!(len("wallets"), 500, "each event once");
    let stored = entries(&server, "wallets");
    assert_eq!(stored[0].1, "cli-0", "structured mode: the event in field `cloudevent`");

    publish_a_file_with_a_bad_line(&ws, "cache", "wallets");
    assert_eq!(len("wallets"), 500, "nothing of a bad file is added");

    // Standard input works as for `append`.
    let output = run_with_stdin(
        &["publish", "--config", &ws.config_str(), "--source", "cache", "other", "-"],
        &(wallet_events(5, 5, "stdin").join("\n") + "\n"),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(json(&String::from_utf8(output.stdout).unwrap())["published"], 5);

    let err = run_err(&["publish", "--config", &ws.config_str(), "--source", "nope", "wallets", &file]);
    assert!(err.contains("has no source named \"nope\"; it has: cache"), "{err}");
    let err = run_err(&["publish", "--config", &ws.config_str(), "--source", "cache", "wal lets", &file]);
    assert!(err.contains("\"wal lets\" is not a stream key"), "{err}");
    let _: () = server.connection().set("text", "x").unwrap();
    let err = run_err(&["publish", "--config", &ws.config_str(), "--source", "cache", "text", &file]);
    assert!(err.contains("key text holds a string, not a stream"), "{err}");
}

// End to end: `projector run` reading Redis.

/// The state tables of the wallet-allowlist projection, in a stable order.
const STATE_SQL: [&str; 2] = [
    "SELECT wallet_address, user_id, allowlisted_at FROM allowlist ORDER BY wallet_address",
    "SELECT user_id, wallet_address, kyc_verified_at FROM users ORDER BY user_id",
];

/// A config whose wallet-allowlist and event recorder read the three keys
/// on the server at `url` (the source `cache`).
fn write_redis_config(ws: &Workspace, url: &str) {
    let mut text = format!("version = 1\ndata = \"data\"\n\n[sources.cache]\nredis = {url:?}\n");
    for (name, module) in [("wallet-allowlist", "wallet_allowlist"), ("recorder", "event_recorder")] {
        text.push_str(&format!(
            // Batches of a fixed size, so a kill can land between two of a
            // chunk (adaptive ones grow to a whole chunk).
            "\n[[projection]]\nname = {name:?}\nmodule = {:?}\nsource = \"cache\"\nstreams = {KEYS:?}\nbatch_size = 100\n",
            guest(module).to_string_lossy()
        ));
    }
    std::fs::write(ws.config(), text).unwrap();
}

/// The key an event line goes to: by its user, as a producer partitions,
/// so each user's events stay in order (the keys are merged by entry ID,
/// but what a projection must rely on is each key's own order).
fn key_of(line: &str) -> &'static str {
    let event: serde_json::Value = serde_json::from_str(line).unwrap();
    let user: usize = event["data"]["user_id"].as_str().unwrap().trim_start_matches("user-").parse().unwrap();
    KEYS[user % 3]
}

/// `projector publish` of `lines` to `key`; returns (published, duplicates).
fn publish_cli(ws: &Workspace, key: &str, lines: &[String]) -> (u64, u64) {
    let file = ws.write_events(&format!("{key}-{}.jsonl", uuid::Uuid::new_v4()), lines);
    let out = json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "cache", key, &file]));
    (out["published"].as_u64().unwrap(), out["duplicates"].as_u64().unwrap())
}

/// Publish `lines`, each to its user's key, in chunks alternating between
/// `projector publish` (structured mode) and another producer's binary
/// mode; then `projector publish` the first chunk again (all duplicates).
fn publish_mixed(ws: &Workspace, server: &RedisServer, lines: &[String], chunk: usize) {
    for (i, part) in lines.chunks(chunk).enumerate() {
        for key in KEYS {
            let mine: Vec<String> = part.iter().filter(|line| key_of(line) == key).cloned().collect();
            match i % 2 {
                0 => assert_eq!(publish_cli(ws, key, &mine), (mine.len() as u64, 0), "chunk {i}"),
                _ => {
                    let events: Vec<NewEvent> = mine.iter().map(|line| parse_event(line).unwrap()).collect();
                    xadd_binary(server, key, &events);
                }
            }
        }
    }
    for key in KEYS {
        let again: Vec<String> = lines[..chunk].iter().filter(|line| key_of(line) == key).cloned().collect();
        assert_eq!(publish_cli(ws, key, &again), (0, again.len() as u64));
    }
}

/// Publish `lines` with `projector publish`, each to its user's key.
fn publish_by_key(ws: &Workspace, lines: &[String]) {
    for key in KEYS {
        let mine: Vec<String> = lines.iter().filter(|line| key_of(line) == key).cloned().collect();
        assert_eq!(publish_cli(ws, key, &mine), (mine.len() as u64, 0));
    }
}

/// Events the recorder has handled, committed in its database.
fn handled(ws: &Workspace) -> u64 {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let Ok(db) = rusqlite::Connection::open_with_flags(ws.database("recorder"), flags) else { return 0 };
    db.query_row("SELECT count(*) FROM handled", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as u64
}

/// Wait until the recorder has handled `count` events.
fn wait_handled(ws: &Workspace, count: u64) {
    wait_until(Duration::from_secs(60), &format!("the recorder past {count} events"), || {
        handled(ws) >= count
    });
}

/// Wait until the recorder handled `total` events and every projection
/// is running at the source's head with no lag.
fn wait_caught_up(ws: &Workspace, total: u64) {
    wait_until(Duration::from_secs(180), &format!("every projection caught up with {total} events"), || {
        let status = ws.status();
        assert!(!status.iter().any(|s| s["state"] == "faulted"), "{status:?}");
        handled(ws) >= total
            && status.iter().all(|s| {
                s["state"] == "running"
                    && s["lag"] == 0
                    && s["checkpoint"] == s["head"]
                    && s["connected"] == true
            })
    });
}

/// Every event handled exactly once, each at its own (key, position).
fn assert_each_event_handled_once(ws: &Workspace, total: usize) {
    let recorded = ws.query(
        "recorder",
        "SELECT count(*) AS handled, count(DISTINCT stream || ':' || position) AS positions, \
         count(DISTINCT id) AS ids, count(DISTINCT stream) AS keys FROM handled",
    );
    assert_eq!(
        recorded,
        serde_json::json!([{"handled": total, "positions": total, "ids": total, "keys": 3}])
    );
}

/// The wallet-allowlist state equals `projector replay` of the same events.
fn assert_state_is_the_replay(ws: &Workspace, all: &str) {
    let wallet = guest("wallet_allowlist");
    for sql in STATE_SQL {
        let replayed =
            json(&run_ok(&["replay", "--module", wallet.to_str().unwrap(), "--events", all, "--sql", sql]));
        assert!(replayed.as_array().unwrap().len() > 100, "the scenario fills the tables");
        let live = ws.query("wallet-allowlist", sql);
        assert!(live == replayed, "{sql}: the state built from Redis differs from the replay");
    }
}

#[test]
fn run_over_redis_builds_the_state_a_replay_builds_and_parks_a_malformed_entry() {
    let server = RedisServer::start();
    let ws = Workspace::new();
    write_redis_config(&ws, &server.url());
    let lines = wallet_events(4000, 500, "w");
    let all = ws.write_events("all.jsonl", &lines);
    let host = ws.start();
    publish_mixed(&ws, &server, &lines[..2000], 500);
    let malformed = xadd_raw(&server, KEYS[1], &[("hello", b"world")]);
    publish_mixed(&ws, &server, &lines[2000..], 500);
    wait_caught_up(&ws, 4000);
    let status = ws.status_of("recorder");
    assert_eq!((&status["source"], &status["dead_letters"]), (&"cache".into(), &1.into()), "{status}");
    let letters = json(&run_ok(&["dead-letters", "list", "--config", &ws.config_str(), "recorder"]));
    let letter = &letters.as_array().unwrap()[0];
    assert_eq!(letter["id"], format!("redis:db0/{}:{malformed}", KEYS[1]), "{letter}");
    assert!(letter["reason"].as_str().unwrap().contains("no `cloudevent` field"), "{letter}");
    let m = metrics(&host.url());
    let r = r#"{projection="recorder"}"#;
    assert_eq!(m[&format!("projector_source_connected{r}")], 1.0);
    assert_eq!(m[&format!("projector_lag{r}")], 0.0);
    assert!(m[&format!("projector_source_head{r}")] > 0.0);
    drop(host);
    assert_each_event_handled_once(&ws, 4000);
    assert_state_is_the_replay(&ws, &all);
}

#[test]
fn run_over_redis_sigkilled_three_times_mid_stream_builds_the_same_state() {
    const TOTAL: usize = 30_000;
    const CHUNK: usize = 5_000;
    let server = RedisServer::start();
    let ws = Workspace::new();
    write_redis_config(&ws, &server.url());
    let lines = wallet_events(TOTAL, 10_000, "k");
    let all = ws.write_events("all.jsonl", &lines);
    let mut host = ws.start();
    let kill_depths = [(1, 1_000), (2, 2_000), (4, 1_500)];
    let mut killed_at = Vec::new();
    for (i, chunk) in lines.chunks(CHUNK).enumerate() {
        let published = ((i + 1) * CHUNK) as u64;
        let Some(&(_, depth)) = kill_depths.iter().find(|(at, _)| *at == i) else {
            publish_by_key(&ws, chunk);
            continue;
        };
        // A backlog for the kill: the chunk is published with the host
        // down (killed wherever it stood), then the host is killed a
        // little way into it.
        host.kill();
        publish_by_key(&ws, chunk);
        host = ws.start();
        let depth = (i * CHUNK + depth) as u64;
        host.kill_when(&format!("the recorder past {depth} events"), || handled(&ws) >= depth);
        let at = handled(&ws);
        assert!(at < published, "the kill landed mid-stream ({at} of {published} handled)");
        killed_at.push(at);
        host = ws.start();
    }
    assert_eq!(killed_at.len(), 3);
    wait_caught_up(&ws, TOTAL as u64);
    drop(host);
    assert_each_event_handled_once(&ws, TOTAL);
    assert_state_is_the_replay(&ws, &all);
}

#[test]
fn a_redis_server_restarted_mid_stream_shows_connecting_never_faulted_and_the_state_is_the_same() {
    let mut server = RedisServer::start();
    let ws = Workspace::new();
    write_redis_config(&ws, &server.url());
    let lines = wallet_events(20_000, 5_000, "r");
    let all = ws.write_events("all.jsonl", &lines);
    let host = ws.start();
    publish_by_key(&ws, &lines[..10_000]);
    wait_handled(&ws, 2_000);
    server.kill();
    let states = |ws: &Workspace| -> Vec<String> {
        ws.status().iter().map(|s| s["state"].as_str().unwrap().to_string()).collect()
    };
    wait_until(Duration::from_secs(30), "every projection connecting", || {
        let states = states(&ws);
        assert!(!states.iter().any(|s| s == "faulted"), "{states:?}");
        states.iter().all(|s| s == "connecting")
    });
    let status = ws.status_of("recorder");
    assert!(status["error"].as_str().unwrap().contains(&server.url()), "{status}");
    assert_eq!(status["connected"], false);
    // Down for a while: still connecting, never faulted.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(states(&ws), ["connecting", "connecting"]);
    }
    server.restart();
    publish_by_key(&ws, &lines[10_000..]);
    wait_caught_up(&ws, 20_000);
    drop(host);
    assert_each_event_handled_once(&ws, 20_000);
    assert_state_is_the_replay(&ws, &all);
}

#[test]
fn a_projection_whose_stream_was_trimmed_past_its_checkpoint_faults_naming_the_key_and_a_rebuild_warns() {
    let server = RedisServer::start();
    let ws = Workspace::new();
    std::fs::write(
        ws.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.cache]\nredis = {:?}\n\n[[projection]]\nname = \
             \"recorder\"\nmodule = {:?}\nsource = \"cache\"\nstreams = [\"wallets\"]\n",
            server.url(),
            guest("event_recorder").to_string_lossy()
        ),
    )
    .unwrap();
    let lines = wallet_events(200, 20, "tr");
    let host = ws.start();
    publish_cli(&ws, "wallets", &lines[..100]);
    wait_handled(&ws, 100);
    drop(host);
    // While the host is down: more events, and the stream trimmed to its
    // last 50, 50 of them never read.
    publish_cli(&ws, "wallets", &lines[100..]);
    let _: u64 =
        redis::cmd("XTRIM").arg("wallets").arg("MAXLEN").arg(50).query(&mut server.connection()).unwrap();
    let host = ws.start();
    wait_until(Duration::from_secs(30), "the projection faulted", || {
        ws.status_of("recorder")["state"] == "faulted"
    });
    let status = ws.status_of("recorder");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("stream key wallets on redis://127.0.0.1:") && error.contains("trimmed"),
        "{status}"
    );
    assert_eq!(handled(&ws), 100, "nothing after the gap was applied");

    // A rebuild (the host stopped: a faulted projection is rebuilt from the
    // files) reads what the stream still holds, and says what it misses.
    drop(host);
    let rebuild = projector().args(["rebuild", "--config", &ws.config_str(), "recorder"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&rebuild.stderr);
    assert!(rebuild.status.success(), "{stderr}");
    assert!(
        stderr.contains("stream key wallets: entries were trimmed")
            && stderr.contains("a rebuild cannot see them"),
        "{stderr}"
    );
    assert_eq!(handled(&ws), 50, "the rebuilt projection holds what the stream still had");
    let host = ws.start();
    wait_until(Duration::from_secs(30), "the rebuilt projection running", || {
        let status = ws.status_of("recorder");
        status["state"] == "running" && status["lag"] == 0 && status["connected"] == true
    });
    drop(host);
}

#[test]
fn two_replicas_reading_three_keys_build_identical_state() {
    let server = RedisServer::start();
    let replicas = [Workspace::new(), Workspace::new()];
    for ws in &replicas {
        write_redis_config(ws, &server.url());
    }
    let hosts: Vec<Host> = replicas.iter().map(Workspace::start).collect();
    let lines = wallet_events(5000, 800, "two");
    let all = replicas[0].write_events("all.jsonl", &lines);
    publish_mixed(&replicas[0], &server, &lines, 1000);
    for ws in &replicas {
        wait_caught_up(ws, 5000);
    }
    drop(hosts);
    for sql in STATE_SQL {
        let (first, second) =
            (replicas[0].query("wallet-allowlist", sql), replicas[1].query("wallet-allowlist", sql));
        assert!(first == second, "{sql}: the replicas differ");
    }
    let handled = "SELECT stream, position, id FROM handled ORDER BY stream, position";
    assert_eq!(
        replicas[0].query("recorder", handled),
        replicas[1].query("recorder", handled),
        "each replica handled every event, at the same positions"
    );
    for ws in &replicas {
        assert_each_event_handled_once(ws, 5000);
        assert_state_is_the_replay(ws, &all);
    }
}

/// Each structured-mode entry of `key`, as JSON.
fn structured_entries(server: &RedisServer, key: &str) -> Vec<serde_json::Value> {
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let reply: Vec<Entry> =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query(&mut server.connection()).unwrap();
    reply
        .into_iter()
        .map(|(_, fields)| {
            let fields: HashMap<String, Vec<u8>> = fields.into_iter().collect();
            serde_json::from_slice(&fields["cloudevent"]).unwrap()
        })
        .collect()
}

#[test]
fn order_fees_over_redis_adds_its_charges_to_the_routed_key_once_with_their_cause() {
    let server = RedisServer::start();
    let (orders, charges) = ("orders", "billing:{eu}:charges");
    let ws = Workspace::new();
    let config = format!(
        "version = 1\ndata = \"data\"\n\n[sources.cache]\nredis = {:?}\n\n[[projection]]\nname = \"order-fees\"\n\
         module = {:?}\nsource = \"cache\"\nstreams = [{orders:?}]\nemit = {{ charges = {charges:?} }}\n",
        server.url(),
        guest("order_fees").to_string_lossy()
    );
    std::fs::write(ws.config(), config).unwrap();
    let scenario = root().join("projections/order-fees/fixtures/scenario.jsonl");
    let lines: Vec<String> =
        std::fs::read_to_string(&scenario).unwrap().lines().map(str::to_string).collect();
    assert_eq!(publish_cli(&ws, orders, &lines), (13, 1), "the repeated approval is dropped");
    // A Redis position is the entry ID (encoded): the charges are caused at
    // the approvals' entries.
    let added = entries(&server, orders);
    let cause = |id: &str| added.iter().find(|(_, event)| event == id).unwrap().0;
    let (first, second) = (
        format!("order-fees:redis:db0/{orders}:{}:0", cause("evt-o08")),
        format!("order-fees:redis:db0/{orders}:{}:0", cause("evt-o11")),
    );

    // The first charge is there already, as a host that added it and died
    // before clearing its outbox would leave it.
    let emitted = order_fees_emitted();
    let copy = NewEvent {
        id: first.clone(),
        source: "projector/order-fees".into(),
        event_type: "order_charged".into(),
        subject: Some("ord-1".into()),
        time: None,
        datacontenttype: Some("application/json".into()),
        correlation_id: Some("checkout-1".into()),
        causation_id: Some("evt-o08".into()),
        data: serde_json::to_vec(&emitted[0]["data"]).unwrap(),
    };
    assert_eq!(
        publish(&server.url(), charges, &[copy]).unwrap(),
        PublishOutcome { published: 1, duplicates: 0 }
    );

    let host = ws.start();
    wait_until(Duration::from_secs(60), "order-fees caught up and its outbox published", || {
        let status = ws.status_of("order-fees");
        status["lag"] == 0 && status["outbox"] == 0 && status["checkpoint"] != 0
    });
    wait_published_counted(&host.url(), "order-fees", 2);
    let ids: Vec<String> = entries(&server, charges).into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, [first.clone(), second.clone()], "each charge once, the copy's id dropped");
    let event = &structured_entries(&server, charges)[1];
    let want = &emitted[1];
    assert_charge_is(event, want);

    // Killed and started again: nothing is added a second time, and a new
    // approval's charge goes out once.
    host.kill();
    let host = ws.start();
    let more = order_4_captured_and_approved();
    assert_eq!(publish_cli(&ws, orders, &more), (2, 0));
    let third = format!("order-fees:redis:db0/{orders}:{}:0", entries(&server, orders).last().unwrap().0);
    wait_until(Duration::from_secs(30), "the third charge added", || {
        let status = ws.status_of("order-fees");
        status["lag"] == 0 && status["outbox"] == 0 && entries(&server, charges).len() == 3
    });
    std::thread::sleep(Duration::from_millis(500));
    let ids: Vec<String> = entries(&server, charges).into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, [first, second, third]);
    drop(host);
}
