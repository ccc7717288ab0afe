//! NATS JetStream as a source, against a real `nats-server -js` on loopback
//! (and a real 3-node cluster): reading in order from a checkpoint, seeking,
//! filters, malformed messages, a server killed mid-read, a missing stream,
//! retention's warning, `projector publish`; and end to end through
//! `projector run`: the state equals a replay after host kills, a server
//! restart, on two replicas and on a cluster losing a node.

use crate::util::*;
use projector::bindings::Event;
use projector::sources::cloudevents::parse_event;
use projector::sources::embedded::NewEvent;
use projector::sources::nats::{NatsOpener, PublishOutcome, publish};
use projector::sources::{Batch, Checkpoint, Filter, Health, Source, SourceError, SourceOpener};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const STREAM: &str = "WALLETS";
const KEY: &str = "nats:WALLETS";

/// `n` wallet events as parsed CloudEvents, ids `<prefix>-<i>`.
fn events(n: usize, prefix: &str) -> Vec<NewEvent> {
    wallet_events(n, 50, prefix).iter().map(|line| parse_event(line).unwrap()).collect()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// A JetStream context on `urls`, for what the tests do besides the source.
async fn jetstream(urls: &[String]) -> async_nats::jetstream::Context {
    let addresses: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
    async_nats::jetstream::new(async_nats::connect(addresses).await.unwrap())
}

/// Publish `events` in CloudEvents binary mode (attributes in `ce-`
/// headers, data as the body) with async-nats itself, as another publisher
/// would; returns what the server said.
fn publish_binary(urls: &[String], subject: &str, events: &[NewEvent]) -> PublishOutcome {
    block_on(async {
        let js = jetstream(urls).await;
        let mut acks = Vec::new();
        for event in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("ce-specversion", "1.0");
            headers.insert("ce-id", event.id.as_str());
            headers.insert("ce-type", event.event_type.as_str());
            headers.insert("ce-source", event.source.as_str());
            headers.insert("Nats-Msg-Id", event.id.as_str());
            let optional = [
                ("ce-subject", &event.subject),
                ("ce-time", &event.time),
                ("ce-correlationid", &event.correlation_id),
                ("ce-causationid", &event.causation_id),
                ("Content-Type", &event.datacontenttype),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    headers.insert(name, value.as_str());
                }
            }
            let payload = event.data.clone().into();
            acks.push(js.publish_with_headers(subject.to_string(), headers, payload).await.unwrap());
        }
        let mut outcome = PublishOutcome { published: 0, duplicates: 0 };
        for ack in acks {
            match ack.await.unwrap().duplicate {
                true => outcome.duplicates += 1,
                false => outcome.published += 1,
            }
        }
        outcome
    })
}

/// Publish a raw body (with optional headers), no CloudEvent.
fn publish_raw(urls: &[String], subject: &str, headers: &[(&str, &str)], body: &[u8]) {
    block_on(async {
        let js = jetstream(urls).await;
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        js.publish_with_headers(subject.to_string(), map, body.to_vec().into()).await.unwrap().await.unwrap();
    });
}

/// The stream's state: (messages, first sequence, last sequence).
fn stream_state(urls: &[String], stream: &str) -> (u64, u64, u64) {
    block_on(async {
        let js = jetstream(urls).await;
        let stream = js.get_stream(stream).await.unwrap();
        let state = &stream.cached_info().state;
        (state.messages, state.first_sequence, state.last_sequence)
    })
}

fn filter(streams: &[&str], types: Option<&[&str]>) -> Filter {
    Filter {
        streams: streams.iter().map(|s| s.to_string()).collect(),
        types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
    }
}

fn open(urls: &[String], stream: &str, filter: &Filter) -> Box<dyn Source> {
    NatsOpener::new("bus", urls.to_vec(), stream).unwrap().open(filter, "tests").unwrap()
}

/// What reading up to a position gave.
#[derive(Default)]
struct Read {
    events: Vec<Event>,
    batches: Vec<Batch>,
    /// The `Unavailable` messages met on the way.
    unavailable: Vec<String>,
    end: Checkpoint,
}

/// Read batches of at most `max` from `after` until the checkpoint reaches
/// `target`, as a runner would (moving to each batch's `end`).
fn read_to(source: &mut dyn Source, after: Checkpoint, target: u64, max: usize, timeout: Duration) -> Read {
    let deadline = Instant::now() + timeout;
    let key = source.key().to_string();
    let mut read = Read { end: after, ..Read::default() };
    while read.end.position(&key) < target {
        assert!(
            Instant::now() < deadline,
            "timed out at {} of {target} (unavailable: {:?})",
            read.end.position(&key),
            read.unavailable.last()
        );
        match source.next_batch(&read.end, max, Duration::from_millis(100)) {
            Ok(batch) => {
                assert!(batch.events.len() <= max, "a batch holds at most max events");
                assert_eq!(batch.events.len(), batch.partitions.len());
                read.events.extend(batch.events.iter().cloned());
                read.end = batch.end.clone();
                source.acknowledge(&read.end).unwrap();
                read.batches.push(batch);
            }
            Err(SourceError::Unavailable(reason)) => {
                read.unavailable.push(reason);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(SourceError::Failed(err)) => panic!("the source failed: {err:#}"),
        }
    }
    read
}

/// Every event exactly as published, at positions `first..`, each once.
fn assert_exactly(read: &[Event], published: &[NewEvent], first: u64) {
    let ids: HashSet<&str> = read.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), read.len(), "an event was read twice");
    assert_eq!(read.len(), published.len(), "every event read, none more");
    for (i, (event, expected)) in read.iter().zip(published).enumerate() {
        assert_eq!(event.id, expected.id, "event {i} in order");
        assert_eq!(event.position, first + i as u64, "event {} at its stream sequence", event.id);
        assert_eq!(event.type_, expected.event_type);
        assert_eq!(event.data, expected.data, "event {}'s data", event.id);
        assert_eq!(event.correlation_id, expected.correlation_id);
    }
}

#[test]
fn every_event_published_in_either_mode_is_read_once_in_order_with_its_stream_sequence() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let all = events(3000, "w");
    // Chunks alternate between structured mode (`publish`) and binary mode
    // (another client's headers), and some are published again.
    for (i, chunk) in all.chunks(250).enumerate() {
        let outcome = match i % 2 {
            0 => publish(&urls, STREAM, "wallets.eu", chunk).unwrap(),
            _ => publish_binary(&urls, "wallets.us", chunk),
        };
        assert_eq!(outcome, PublishOutcome { published: 250, duplicates: 0 }, "chunk {i}");
    }
    assert_eq!(publish(&urls, STREAM, "wallets.eu", &all[..300]).unwrap().duplicates, 300);
    assert_eq!(publish_binary(&urls, "wallets.us", &all[2900..]).duplicates, 100);
    assert_eq!(stream_state(&urls, STREAM), (3000, 1, 3000), "the stream holds each event once");

    let mut source = open(&urls, STREAM, &filter(&["wallets.>"], None));
    assert_eq!(source.key(), KEY);
    let before = source.progress(&Checkpoint::default()).unwrap();
    assert_eq!((before.head, before.lag), (Checkpoint::at(KEY, 3000), 3000));
    let read = read_to(&mut *source, Checkpoint::default(), 3000, 250, Duration::from_secs(60));
    assert_exactly(&read.events, &all, 1);
    assert!(read.unavailable.is_empty(), "{:?}", read.unavailable);
    assert!(read.batches.iter().all(|b| b.partitions.iter().all(|p| &**p == KEY)));
    let subjects: HashSet<&str> = read.events.iter().map(|e| e.stream.as_str()).collect();
    assert_eq!(subjects, HashSet::from(["wallets.eu", "wallets.us"]), "an event's stream is its subject");
    assert_eq!(read.end, Checkpoint::at(KEY, 3000));
    let after = source.progress(&read.end).unwrap();
    assert_eq!((after.head, after.lag), (Checkpoint::at(KEY, 3000), 0));
    assert_eq!(source.health(), Health::Connected);
    assert_eq!(source.warning(), None);
    // Caught up: a read waits, then returns nothing.
    let idle = source.next_batch(&read.end, 250, Duration::from_millis(50)).unwrap();
    assert!(idle.is_idle(&read.end));
}

#[test]
fn a_read_starts_after_the_checkpoint_it_is_given_and_a_retried_read_sees_the_same_events() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let all = events(100, "s");
    publish(&urls, STREAM, "wallets.eu", &all).unwrap();
    let mut source = open(&urls, STREAM, &filter(&[], None));
    let positions = |batch: &Batch| batch.events.iter().map(|e| e.position).collect::<Vec<_>>();
    let read = |source: &mut Box<dyn Source>, after: u64| {
        let batch = source.next_batch(&Checkpoint::at(KEY, after), 10, Duration::from_secs(5)).unwrap();
        assert_eq!(batch.end, Checkpoint::at(KEY, after + 10));
        batch
    };
    let first = read(&mut source, 40);
    assert_eq!(positions(&first), (41..=50).collect::<Vec<_>>());
    assert_eq!(first.events[0].id, all[40].id);
    // The batch was not committed: asked again from 40, the same events.
    let retried = read(&mut source, 40);
    assert_eq!(positions(&retried), positions(&first));
    assert_eq!(positions(&read(&mut source, 50)), (51..=60).collect::<Vec<_>>());
    // Back, and forward past what was read.
    assert_eq!(positions(&read(&mut source, 45)), (46..=55).collect::<Vec<_>>());
    assert_eq!(positions(&read(&mut source, 80)), (81..=90).collect::<Vec<_>>());
    assert_eq!(positions(&read(&mut source, 0)), (1..=10).collect::<Vec<_>>());
    // One consumer per reader: each seek replaced it, and dropping the
    // reader removes it.
    let consumers = || {
        block_on(async {
            jetstream(&urls).await.get_stream(STREAM).await.unwrap().cached_info().state.consumer_count
        })
    };
    wait_until(Duration::from_secs(10), "one consumer for the reader", || consumers() == 1);
    drop(source);
    wait_until(Duration::from_secs(10), "the reader's consumer removed", || consumers() == 0);
}

#[test]
fn types_and_several_subject_filters_are_matched_here_and_skipped_messages_still_move_the_end() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let all = events(600, "f");
    let subjects = ["wallets.eu", "wallets.us", "wallets.asia"];
    // Published one by one on rotating subjects, the last on one no
    // projection below takes.
    let mut published = Vec::new();
    for (i, event) in all.iter().enumerate() {
        let subject = subjects[i % 3];
        publish(&urls, STREAM, subject, std::slice::from_ref(event)).unwrap();
        published.push((subject, event));
    }
    assert_eq!(published.last().unwrap().0, "wallets.asia");
    let expect = |wanted: &dyn Fn(&str, &NewEvent) -> bool| -> Vec<(String, u64)> {
        published
            .iter()
            .enumerate()
            .filter(|(_, (subject, event))| wanted(subject, event))
            .map(|(i, (_, event))| (event.id.clone(), i as u64 + 1))
            .collect()
    };
    let got = |read: &Read| -> Vec<(String, u64)> {
        read.events.iter().map(|e| (e.id.clone(), e.position)).collect()
    };

    // Two subject filters (matched here) and one type.
    let mut source = open(&urls, STREAM, &filter(&["wallets.eu", "*.us"], Some(&["kyc_verified"])));
    let read = read_to(&mut *source, Checkpoint::default(), 600, 50, Duration::from_secs(30));
    let wanted = expect(&|subject, event| subject != "wallets.asia" && event.event_type == "kyc_verified");
    assert!(wanted.len() > 20, "the scenario has KYC events on those subjects");
    assert_eq!(got(&read), wanted);
    assert!(read.events.iter().all(|e| e.type_ == "kyc_verified" && e.stream != "wallets.asia"));
    assert_eq!(read.end, Checkpoint::at(KEY, 600), "the end moves past what was skipped");

    // One subject filter (the server's).
    let mut source = open(&urls, STREAM, &filter(&["wallets.asia"], None));
    let read = read_to(&mut *source, Checkpoint::default(), 600, 50, Duration::from_secs(30));
    assert_eq!(got(&read), expect(&|subject, _| subject == "wallets.asia"));

    // Types alone.
    let mut source = open(&urls, STREAM, &filter(&[], Some(&["wallet_updated"])));
    let read = read_to(&mut *source, Checkpoint::default(), 600, 1000, Duration::from_secs(30));
    assert_eq!(got(&read), expect(&|_, event| event.event_type == "wallet_updated"));
}

#[test]
fn a_message_that_is_no_cloudevent_comes_back_malformed_alone_with_the_end_past_it() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let all = events(5, "m");
    publish(&urls, STREAM, "wallets.eu", &all[..3]).unwrap();
    publish_raw(&urls, "wallets.eu", &[], b"not a cloud event");
    publish_raw(
        &urls,
        "wallets.eu",
        &[("Nats-Msg-Id", "bad-1"), ("ce-specversion", "1.0"), ("ce-id", "x")],
        b"{}",
    );
    publish(&urls, STREAM, "wallets.eu", &all[3..]).unwrap();

    let mut source = open(&urls, STREAM, &filter(&["wallets.>"], None));
    let mut next =
        |after: u64| source.next_batch(&Checkpoint::at(KEY, after), 100, Duration::from_secs(5)).unwrap();
    let good = next(0);
    assert_eq!(good.events.iter().map(|e| e.position).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(good.malformed.is_none(), "a malformed message ends the batch before it");
    assert_eq!(good.end, Checkpoint::at(KEY, 3));

    let bad = next(3);
    assert!(bad.events.is_empty(), "a malformed message comes alone");
    assert_eq!(bad.end, Checkpoint::at(KEY, 4), "the end is past it");
    let malformed = bad.malformed.unwrap();
    assert_eq!(
        (malformed.event.id.as_str(), malformed.event.position, malformed.event.stream.as_str()),
        ("nats:WALLETS:4", 4, "wallets.eu")
    );
    assert_eq!(
        (malformed.event.type_.as_str(), malformed.event.data.as_slice()),
        ("", &b"not a cloud event"[..])
    );
    assert!(
        malformed.reason.contains("neither a structured-mode CloudEvent")
            && malformed.reason.contains("nor a binary-mode one"),
        "{}",
        malformed.reason
    );

    let bad = next(4);
    assert!(bad.events.is_empty());
    assert_eq!(bad.end, Checkpoint::at(KEY, 5));
    let malformed = bad.malformed.unwrap();
    assert_eq!(malformed.event.id, "bad-1", "the message's Nats-Msg-Id names it");
    assert!(malformed.reason.contains("missing required attribute `source`"), "{}", malformed.reason);

    let rest = next(5);
    assert_eq!(rest.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["m-3", "m-4"]);
    assert_eq!(rest.end, Checkpoint::at(KEY, 7));
}

#[test]
fn a_server_killed_and_restarted_mid_read_reports_connecting_then_resumes_losing_and_doubling_nothing() {
    let mut server = NatsServer::start();
    let urls = vec![server.url()];
    let all = events(3000, "k");
    publish(&urls, STREAM, "wallets.eu", &all[..1500]).unwrap();
    let mut source = open(&urls, STREAM, &filter(&["wallets.>"], None));
    let mut read = read_to(&mut *source, Checkpoint::default(), 1500, 100, Duration::from_secs(30));
    assert_eq!(source.health(), Health::Connected);

    server.kill();
    let reason = wait_unavailable(&mut *source, &read.end);
    assert!(reason.contains(&server.url()), "{reason}");
    assert!(
        matches!(source.health(), Health::Connecting { error: Some(ref e) } if e.contains(&server.url())),
        "{:?}",
        source.health()
    );
    server.restart();
    publish(&urls, STREAM, "wallets.eu", &all[1500..]).unwrap();
    let rest = read_to(&mut *source, read.end.clone(), 3000, 100, Duration::from_secs(60));
    read.events.extend(rest.events);
    assert_exactly(&read.events, &all, 1);
    assert_eq!(source.health(), Health::Connected);

    // A runner that restarted from an older checkpoint reads from there.
    let again = read_to(&mut *source, Checkpoint::at(KEY, 700), 3000, 500, Duration::from_secs(30));
    assert_exactly(&again.events, &all[700..], 701);
}

#[test]
fn a_server_down_at_start_is_connecting_until_it_comes_up() {
    let mut server = NatsServer::start();
    let urls = vec![server.url()];
    let all = events(200, "d");
    publish(&urls, STREAM, "wallets.eu", &all).unwrap();
    server.kill();
    let mut source = open(&urls, STREAM, &filter(&[], None));
    let reason = wait_unavailable(&mut *source, &Checkpoint::default());
    assert!(reason.contains(&format!("cannot connect to NATS at {}", server.url())), "{reason}");
    assert!(matches!(source.health(), Health::Connecting { error: Some(_) }), "{:?}", source.health());
    assert!(matches!(source.progress(&Checkpoint::default()), Err(SourceError::Unavailable(_))));
    server.restart();
    let read = read_to(&mut *source, Checkpoint::default(), 200, 1000, Duration::from_secs(30));
    assert_exactly(&read.events, &all, 1);
    assert_eq!(source.health(), Health::Connected);
}

#[test]
fn a_missing_stream_is_unavailable_with_a_message_naming_the_stream_and_the_server() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let mut source = open(&urls, "NOPE", &filter(&[], None));
    let reason = wait_unavailable(&mut *source, &Checkpoint::default());
    assert_eq!(
        reason,
        format!(
            "stream NOPE not found on {}: create it, or publish to it with `projector publish`",
            server.url()
        )
    );
    assert_eq!(source.health(), Health::Connecting { error: Some(reason.clone()) });
    match source.progress(&Checkpoint::default()) {
        Err(SourceError::Unavailable(message)) => assert_eq!(message, reason),
        other => panic!("{other:?}"),
    }
    // Once published to, it is read.
    let all = events(10, "n");
    publish(&urls, "NOPE", "nope.x", &all).unwrap();
    let read = read_to(&mut *source, Checkpoint::default(), 10, 100, Duration::from_secs(30));
    assert_exactly(&read.events, &all, 1);
}

#[test]
fn a_stream_whose_first_messages_retention_dropped_warns_a_reader_from_zero() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let all = events(100, "p");
    publish(&urls, STREAM, "wallets.eu", &all).unwrap();
    block_on(async {
        let js = jetstream(&urls).await;
        let stream = js.get_stream(STREAM).await.unwrap();
        stream.purge().sequence(41).await.unwrap();
    });
    assert_eq!(stream_state(&urls, STREAM), (60, 41, 100));

    let mut source = open(&urls, STREAM, &filter(&[], None));
    let read = read_to(&mut *source, Checkpoint::default(), 100, 1000, Duration::from_secs(30));
    assert_exactly(&read.events, &all[40..], 41);
    let warning = source.warning().expect("a rebuild from 0 is warned");
    assert!(warning.contains("stream WALLETS: retention dropped messages before sequence 41"), "{warning}");

    // A reader already past them has nothing to be warned about.
    let mut source = open(&urls, STREAM, &filter(&[], None));
    let read = read_to(&mut *source, Checkpoint::at(KEY, 50), 100, 1000, Duration::from_secs(30));
    assert_exactly(&read.events, &all[50..], 51);
    assert_eq!(source.warning(), None);
}

#[test]
fn a_wake_ends_a_waiting_read_early() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    publish(&urls, STREAM, "wallets.eu", &events(1, "a")).unwrap();
    let mut source = open(&urls, STREAM, &filter(&[], None));
    let at = Checkpoint::at(KEY, 1);
    let waker = source.waker();
    let waking = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        waker.wake();
    });
    let started = Instant::now();
    let batch = source.next_batch(&at, 10, Duration::from_secs(20)).unwrap();
    assert!(batch.is_idle(&at));
    assert!(started.elapsed() < Duration::from_secs(5), "woken after {:?}", started.elapsed());
    waking.join().unwrap();
}

#[test]
fn a_cluster_node_killed_mid_read_stops_nothing_and_every_event_is_read_once() {
    let mut cluster = NatsCluster::start();
    let urls = cluster.urls();
    block_on(async {
        let js = jetstream(&urls).await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec!["wallets.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let all = events(3000, "c");
    publish(&urls, STREAM, "wallets.eu", &all[..1500]).unwrap();
    let mut source = open(&urls, STREAM, &filter(&["wallets.>"], None));
    let mut read = read_to(&mut *source, Checkpoint::default(), 1500, 100, Duration::from_secs(60));

    // Kill the node that serves the reader's consumer: the one that
    // delivered the 1500 messages. (On a loaded machine the reader may
    // have made its consumer again after a missed heartbeat; the one it
    // left is being deleted.)
    let host = block_on(async {
        let js = jetstream(&urls).await;
        let stream = js.get_stream(STREAM).await.unwrap();
        let mut names = stream.consumer_names();
        let mut consumers = Vec::new();
        while let Some(name) = futures_util::StreamExt::next(&mut names).await {
            let Ok(info) = stream.consumer_info(name.unwrap()).await else { continue };
            consumers.push((info.delivered.stream_sequence, info.cluster.unwrap().leader.unwrap()));
        }
        let (delivered, leader) = consumers.into_iter().max().expect("the reader has a consumer");
        assert_eq!(delivered, 1500, "the reader's consumer delivered what it read");
        leader
    });
    cluster.node(&host).kill();
    let alive: Vec<String> = cluster.nodes.iter().filter(|n| n.is_running()).map(NatsServer::url).collect();
    publish(&alive, STREAM, "wallets.eu", &all[1500..]).unwrap();
    let rest = read_to(&mut *source, read.end.clone(), 3000, 100, Duration::from_secs(60));
    read.events.extend(rest.events);
    assert_exactly(&read.events, &all, 1);
    assert_eq!(source.health(), Health::Connected);
}

#[test]
fn projector_publish_stores_each_event_once_and_a_file_with_a_bad_line_publishes_nothing() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let ws = Workspace::new();
    std::fs::write(
        ws.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = {:?}\nstream = \"WALLETS\"\n",
            server.url()
        ),
    )
    .unwrap();
    let lines = wallet_events(500, 20, "cli");
    let file = ws.write_events("wallets.jsonl", &lines);
    let publish = |file: &str| {
        json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "bus", "wallets.eu", file]))
    };
    assert_eq!(publish(&file), serde_json::json!({"published": 500, "duplicates": 0}));
    assert_eq!(publish(&file), serde_json::json!({"published": 0, "duplicates": 500}));
    assert_eq!(stream_state(&urls, STREAM), (500, 1, 500), "each event once");

    publish_a_file_with_a_bad_line(&ws, "bus", "wallets.eu");
    assert_eq!(stream_state(&urls, STREAM), (500, 1, 500), "nothing of a bad file is published");

    // Standard input works as for `append`.
    let output = run_with_stdin(
        &["publish", "--config", &ws.config_str(), "--source", "bus", "wallets.us", "-"],
        &(wallet_events(5, 5, "stdin").join("\n") + "\n"),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(json(&String::from_utf8(output.stdout).unwrap())["published"], 5);

    let err = run_err(&["publish", "--config", &ws.config_str(), "--source", "nope", "wallets.eu", &file]);
    assert!(err.contains("has no source named \"nope\"; it has: bus"), "{err}");
    let err = run_err(&["publish", "--config", &ws.config_str(), "--source", "bus", "orders.eu", &file]);
    assert!(err.contains("stream WALLETS on") && err.contains("captures wallets.>, not orders.eu"), "{err}");
}

// End to end: `projector run` reading a NATS source.

/// The state tables of the wallet-allowlist projection, in a stable order.
const STATE_SQL: [&str; 2] = [
    "SELECT wallet_address, user_id, allowlisted_at FROM allowlist ORDER BY wallet_address",
    "SELECT user_id, wallet_address, kyc_verified_at FROM users ORDER BY user_id",
];

/// A config whose wallet-allowlist and event recorder read `wallets.>` of
/// stream WALLETS on `urls` (the source `bus`).
fn write_nats_config(ws: &Workspace, urls: &[String]) {
    let mut text =
        format!("version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = {urls:?}\nstream = \"WALLETS\"\n");
    for (name, module) in [("wallet-allowlist", "wallet_allowlist"), ("recorder", "event_recorder")] {
        text.push_str(&format!(
            // Batches of a fixed size, so a kill can land between two of a
            // chunk (adaptive ones grow to a whole chunk).
            "\n[[projection]]\nname = {name:?}\nmodule = {:?}\nsource = \"bus\"\nstreams = [\"wallets.>\"]\nbatch_size = 200\n",
            guest(module).to_string_lossy()
        ));
    }
    std::fs::write(ws.config(), text).unwrap();
}

/// `projector publish` of `lines` to `wallets.eu` through the config's
/// source; returns (published, duplicates).
fn publish_cli(ws: &Workspace, name: &str, lines: &[String]) -> (u64, u64) {
    let file = ws.write_events(name, lines);
    let out =
        json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "bus", "wallets.eu", &file]));
    (out["published"].as_u64().unwrap(), out["duplicates"].as_u64().unwrap())
}

/// Publish `lines` in chunks, alternating between `projector publish`
/// (structured mode) and another client's binary mode, then publish the
/// first two chunks again (all duplicates).
fn publish_mixed(ws: &Workspace, urls: &[String], lines: &[String], chunk: usize) {
    for (i, part) in lines.chunks(chunk).enumerate() {
        let outcome = match i % 2 {
            0 => publish_cli(ws, &format!("chunk-{i}.jsonl"), part),
            _ => {
                let events: Vec<NewEvent> = part.iter().map(|line| parse_event(line).unwrap()).collect();
                let outcome = publish_binary(urls, "wallets.us", &events);
                (outcome.published, outcome.duplicates)
            }
        };
        assert_eq!(outcome, (part.len() as u64, 0), "chunk {i}");
    }
    let again = &lines[..chunk.min(lines.len())];
    assert_eq!(publish_cli(ws, "again.jsonl", again), (0, again.len() as u64));
    let events: Vec<NewEvent> =
        lines[chunk..2 * chunk].iter().map(|line| parse_event(line).unwrap()).collect();
    assert_eq!(publish_binary(urls, "wallets.us", &events).duplicates, chunk as u64);
}

/// The recorder's checkpoint in its database (0 before it has one).
fn checkpoint(ws: &Workspace, projection: &str) -> u64 {
    let path = ws.database(projection);
    let Ok(db) = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    db.query_row("SELECT position FROM projector_checkpoints WHERE source = ?1", [KEY], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap_or(0) as u64
}

/// Wait until the recorder's checkpoint reaches `position`.
fn wait_checkpoint(ws: &Workspace, position: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(ws, "recorder") < position {
        assert!(Instant::now() < deadline, "timed out waiting for the recorder past {position}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every event handled exactly once, at stream sequences 1..=total.
fn assert_each_event_handled_once(ws: &Workspace, total: usize) {
    let recorded = ws.query(
        "recorder",
        "SELECT count(*) AS handled, count(DISTINCT position) AS positions, count(DISTINCT id) AS ids, \
         min(position) AS first, max(position) AS last, count(partition) AS partitioned FROM handled",
    );
    assert_eq!(
        recorded,
        serde_json::json!([{
            "handled": total, "positions": total, "ids": total, "first": 1, "last": total, "partitioned": 0
        }])
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
        assert!(live == replayed, "{sql}: the state built from NATS differs from the replay");
    }
}

#[test]
fn run_over_nats_builds_the_state_a_replay_of_the_same_events_builds() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let ws = Workspace::new();
    write_nats_config(&ws, &urls);
    let lines = wallet_events(4000, 500, "w");
    let all = ws.write_events("all.jsonl", &lines);
    let host = ws.start();
    publish_mixed(&ws, &urls, &lines, 500);
    ws.wait_caught_up(4000, Duration::from_secs(120));
    let status = ws.status_of("recorder");
    assert_eq!(
        (&status["source"], &status["state"], &status["connected"]),
        (&"bus".into(), &"running".into(), &true.into())
    );
    drop(host);
    assert_each_event_handled_once(&ws, 4000);
    assert_state_is_the_replay(&ws, &all);
}

#[test]
fn a_projection_at_the_head_shows_no_lag_and_its_head_before_the_next_source_report() {
    let server = NatsServer::start();
    let ws = Workspace::new();
    write_nats_config(&ws, &[server.url()]);
    assert_eq!(publish_cli(&ws, "ten.jsonl", &wallet_events(10, 5, "t")), (10, 0));
    let _host = ws.start();
    // The first status with the checkpoint at the head: the source's own
    // report (head and lag, written once a second) may be older than it.
    let mut status = serde_json::Value::Null;
    wait_until(Duration::from_secs(60), "the recorder at 10", || {
        status = ws.status_of("recorder");
        status["checkpoint"] == 10
    });
    assert_eq!((&status["head"], &status["lag"]), (&10.into(), &0.into()), "{status}");
}

#[test]
fn run_over_nats_sigkilled_three_times_mid_stream_builds_the_same_state() {
    const TOTAL: usize = 60_000;
    const CHUNK: usize = 10_000;
    let server = NatsServer::start();
    let ws = Workspace::new();
    write_nats_config(&ws, &[server.url()]);
    let lines = wallet_events(TOTAL, 20_000, "k");
    let all = ws.write_events("all.jsonl", &lines);
    let mut host = ws.start();
    let kill_depths = [(1, 1_000), (2, 3_000), (4, 2_000)];
    let mut killed_at = Vec::new();
    for (i, chunk) in lines.chunks(CHUNK).enumerate() {
        let published = ((i + 1) * CHUNK) as u64;
        let Some(&(_, depth)) = kill_depths.iter().find(|(at, _)| *at == i) else {
            assert_eq!(publish_cli(&ws, &format!("chunk-{i}.jsonl"), chunk), (CHUNK as u64, 0));
            continue;
        };
        // A backlog for the kill: the chunk is published with the host
        // down (killed wherever it stood), then the host is killed a
        // little way into it.
        host.kill();
        assert_eq!(publish_cli(&ws, &format!("chunk-{i}.jsonl"), chunk), (CHUNK as u64, 0));
        host = ws.start();
        let depth = (i * CHUNK + depth) as u64;
        host.kill_when(&format!("checkpoint {depth}"), || checkpoint(&ws, "recorder") >= depth);
        let at = checkpoint(&ws, "recorder");
        assert!(at < published, "the kill landed mid-stream (checkpoint {at} of {published})");
        killed_at.push(at);
        host = ws.start();
    }
    assert_eq!(killed_at.len(), 3);
    ws.wait_caught_up(TOTAL as u64, Duration::from_secs(180));
    drop(host);
    assert_each_event_handled_once(&ws, TOTAL);
    assert_state_is_the_replay(&ws, &all);
}

#[test]
fn a_nats_server_restarted_mid_stream_shows_connecting_never_faulted_and_the_state_is_the_same() {
    let mut server = NatsServer::start();
    let urls = vec![server.url()];
    let ws = Workspace::new();
    write_nats_config(&ws, &urls);
    let lines = wallet_events(20_000, 5_000, "r");
    let all = ws.write_events("all.jsonl", &lines);
    let host = ws.start();
    publish_cli(&ws, "first.jsonl", &lines[..10_000]);
    wait_checkpoint(&ws, 2_000);
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
    // Down for a while: still connecting, never faulted.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(states(&ws), ["connecting", "connecting"]);
    }
    server.restart();
    publish_cli(&ws, "second.jsonl", &lines[10_000..]);
    wait_until(Duration::from_secs(120), "both projections caught up", || {
        let status = ws.status();
        assert!(!status.iter().any(|s| s["state"] == "faulted"), "{status:?}");
        status.iter().all(|s| s["checkpoint"] == 20_000 && s["lag"] == 0 && s["state"] == "running")
    });
    assert_eq!(ws.status_of("recorder")["connected"], true);
    drop(host);
    assert_each_event_handled_once(&ws, 20_000);
    assert_state_is_the_replay(&ws, &all);
}

#[test]
fn two_replicas_reading_one_stream_build_identical_state() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let replicas = [Workspace::new(), Workspace::new()];
    for ws in &replicas {
        write_nats_config(ws, &urls);
    }
    let hosts: Vec<Host> = replicas.iter().map(Workspace::start).collect();
    let lines = wallet_events(5000, 800, "two");
    let all = replicas[0].write_events("all.jsonl", &lines);
    publish_mixed(&replicas[0], &urls, &lines, 1000);
    for ws in &replicas {
        ws.wait_caught_up(5000, Duration::from_secs(120));
    }
    drop(hosts);
    for sql in STATE_SQL {
        let (first, second) =
            (replicas[0].query("wallet-allowlist", sql), replicas[1].query("wallet-allowlist", sql));
        assert!(first == second, "{sql}: the replicas differ");
    }
    assert_eq!(
        replicas[0].query("recorder", "SELECT position, id FROM handled ORDER BY position"),
        replicas[1].query("recorder", "SELECT position, id FROM handled ORDER BY position"),
        "each replica handled every event, in the same order"
    );
    for ws in &replicas {
        assert_each_event_handled_once(ws, 5000);
        assert_state_is_the_replay(ws, &all);
    }
}

#[test]
fn run_over_a_cluster_with_a_node_killed_mid_stream_builds_the_exact_state() {
    let mut cluster = NatsCluster::start();
    let urls = cluster.urls();
    block_on(async {
        jetstream(&urls)
            .await
            .create_stream(async_nats::jetstream::stream::Config {
                name: STREAM.into(),
                subjects: vec!["wallets.>".into()],
                num_replicas: 3,
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let ws = Workspace::new();
    write_nats_config(&ws, &urls);
    let lines = wallet_events(10_000, 2_000, "cl");
    let all = ws.write_events("all.jsonl", &lines);
    let host = ws.start();
    assert_eq!(publish_cli(&ws, "first.jsonl", &lines[..5_000]), (5_000, 0));
    wait_checkpoint(&ws, 1_000);
    // Kill the node serving one of the host's consumers.
    let node = block_on(async {
        let js = jetstream(&urls).await;
        let stream = js.get_stream(STREAM).await.unwrap();
        let name = futures_util::StreamExt::next(&mut stream.consumer_names()).await.unwrap().unwrap();
        stream.consumer_info(name).await.unwrap().cluster.unwrap().leader.unwrap()
    });
    cluster.node(&node).kill();
    assert_eq!(publish_cli(&ws, "second.jsonl", &lines[5_000..]), (5_000, 0));
    ws.wait_caught_up(10_000, Duration::from_secs(120));
    drop(host);
    assert_each_event_handled_once(&ws, 10_000);
    assert_state_is_the_replay(&ws, &all);
}

/// Every message stream `stream` holds: (`Nats-Msg-Id`, the body as JSON).
fn messages(urls: &[String], stream: &str) -> Vec<(String, serde_json::Value)> {
    block_on(async {
        let js = jetstream(urls).await;
        let stream = js.get_stream(stream).await.unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let mut messages = Vec::new();
        for sequence in 1..=last {
            let Ok(message) = stream.get_raw_message(sequence).await else { continue };
            let id = message.headers.get("Nats-Msg-Id").unwrap().as_str().to_string();
            messages.push((id, serde_json::from_slice(&message.payload).unwrap()));
        }
        messages
    })
}

#[test]
fn order_fees_over_nats_publishes_its_charges_to_the_routed_subject_once_with_their_cause() {
    let server = NatsServer::start();
    let urls = vec![server.url()];
    let ws = Workspace::new();
    let config = format!(
        "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = {urls:?}\nstream = \"ORDERS\"\n\n\
         [[projection]]\nname = \"order-fees\"\nmodule = {:?}\nsource = \"bus\"\nstreams = [\"orders.>\"]\n\
         emit = {{ charges = \"billing.charges\" }}\n",
        guest("order_fees").to_string_lossy()
    );
    std::fs::write(ws.config(), config).unwrap();
    let scenario = root().join("projections/order-fees/fixtures/scenario.jsonl");
    let lines: Vec<String> =
        std::fs::read_to_string(&scenario).unwrap().lines().map(str::to_string).collect();
    let file = ws.write_events("scenario.jsonl", &lines);
    let out =
        json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "bus", "orders.eu", &file]));
    assert_eq!((&out["published"], &out["duplicates"]), (&13.into(), &1.into()), "{out}");

    // No JetStream stream captures billing.charges yet: the charges wait in
    // the outbox, the error says why, and the projection runs on.
    let host = ws.start();
    wait_until(Duration::from_secs(60), "order-fees waiting to publish two charges", || {
        let status = ws.status_of("order-fees");
        status["lag"] == 0 && status["outbox"] == 2
    });
    let live = |host: &Host| -> serde_json::Value {
        let url = format!("{}/projections/order-fees", host.url());
        ureq::get(url).call().unwrap().body_mut().read_json().unwrap()
    };
    let error = "no JetStream stream captures subject billing.charges";
    wait_until(Duration::from_secs(10), "the publish error in status", || {
        live(&host)["last_error"].as_str().is_some_and(|e| e.contains(error))
    });
    assert_eq!(ws.status_of("order-fees")["state"], "running");

    // The stream appears, already holding the first charge, as a host that
    // published it and died before clearing its outbox would leave it.
    let emitted = order_fees_emitted();
    block_on(async {
        let js = jetstream(&urls).await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BILLING".into(),
            subjects: vec!["billing.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", emitted[0]["id"].as_str().unwrap());
        js.publish_with_headers("billing.charges", headers, "{}".into()).await.unwrap().await.unwrap();
    });
    wait_until(Duration::from_secs(30), "the outbox published", || ws.status_of("order-fees")["outbox"] == 0);
    let host_url = host.url();
    wait_until(Duration::from_secs(10), "the error cleared", || live(&host)["last_error"].is_null());
    let published = messages(&urls, "BILLING");
    let ids: Vec<&str> = published.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["order-fees:8:0", "order-fees:11:0"], "each charge once, the copy dropped");
    let (_, second) = &published[1];
    let want = &emitted[1];
    assert_eq!(second["id"], want["id"]);
    assert_charge_is(second, want);
    wait_published_counted(&host_url, "order-fees", 2);

    // Killed and started again: nothing is published a second time, and a
    // new approval's charge goes out once.
    host.kill();
    let host = ws.start();
    let more = ws.write_events("more.jsonl", &order_4_captured_and_approved());
    run_ok(&["publish", "--config", &ws.config_str(), "--source", "bus", "orders.eu", &more]);
    wait_until(Duration::from_secs(30), "the third charge published", || {
        let status = ws.status_of("order-fees");
        status["lag"] == 0 && status["outbox"] == 0 && messages(&urls, "BILLING").len() == 3
    });
    std::thread::sleep(Duration::from_millis(500));
    let ids: Vec<String> = messages(&urls, "BILLING").into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["order-fees:8:0", "order-fees:11:0", "order-fees:15:0"]);
    drop(host);
}

#[test]
fn emit_routes_are_checked_at_load() {
    let ws = Workspace::new();
    let module = guest("order_fees").to_string_lossy().into_owned();
    let cases = [
        ("", "emit = { charges = \"billing.>\" }", "emit.charges: \"billing.>\" has a wildcard"),
        ("", "emit = { \"bad name\" = \"billing.charges\" }", "emit: invalid stream name \"bad name\""),
        ("", "emit = { charges = \"a..b\" }", "emit.charges: \"a..b\" is not a NATS subject"),
    ];
    for (_, emit, message) in cases {
        let text = format!(
            "version = 1\n[sources.bus]\nnats = \"nats://127.0.0.1:4222\"\nstream = \"ORDERS\"\n\n\
             [[projection]]\nname = \"order-fees\"\nmodule = {module:?}\nsource = \"bus\"\nstreams = [\"orders.>\"]\n{emit}\n"
        );
        std::fs::write(ws.config(), text).unwrap();
        let err = run_err(&["status", "--config", &ws.config_str()]);
        assert!(err.contains(message), "{emit}: {err}");
    }
    let text = format!(
        "version = 1\n[[projection]]\nname = \"order-fees\"\nmodule = {module:?}\nstreams = [\"orders\"]\n\
         emit = {{ charges = \"billing.charges\" }}\n"
    );
    std::fs::write(ws.config(), text).unwrap();
    let err = run_err(&["status", "--config", &ws.config_str()]);
    assert!(
        err.contains(
            "`emit` routes emitted streams to a broker, but the projection publishes to the embedded log"
        ),
        "{err}"
    );
}
