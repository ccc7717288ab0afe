//! Kafka as a source, against a real Apache Kafka 4 broker (KRaft, one JVM)
//! on loopback: reading every partition from a checkpoint in both
//! CloudEvents modes, duplicates dropped, a malformed record, retention past
//! a checkpoint, a cluster that is down; and end to end through `projector
//! run`: the state equals a replay after host kills and a broker restart,
//! offsets committed to the consumer group, a partition added while running,
//! two replicas building identical state, a three-broker cluster losing one
//! broker mid-stream; a projection emitting to a topic (the outbox published
//! to Kafka).

use crate::util::*;
use projector::sources::cloudevents::parse_event;
use projector::sources::embedded::NewEvent;
use projector::sources::kafka::{KafkaOpener, group_id, publish};
use projector::sources::{Checkpoint, Filter, Health, Source, SourceError, SourceOpener};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One broker for the tests that do not stop it; each test has topics of
/// its own.
fn shared_broker() -> &'static KafkaBroker {
    static BROKER: OnceLock<KafkaBroker> = OnceLock::new();
    BROKER.get_or_init(KafkaBroker::start)
}

/// `n` wallet events as JSON lines, each with its user as `subject` (the
/// record key: one user's events stay in one partition, in order).
fn keyed_wallet_events(n: usize, users: usize, prefix: &str) -> Vec<String> {
    wallet_events(n, users, prefix)
        .into_iter()
        .map(|line| {
            let mut event: Value = serde_json::from_str(&line).unwrap();
            event["subject"] = event["data"]["user_id"].clone();
            event.to_string()
        })
        .collect()
}

fn parsed(lines: &[String]) -> Vec<NewEvent> {
    lines.iter().map(|line| parse_event(line).unwrap()).collect()
}

/// Produce `events` in CloudEvents binary mode (`ce_` headers, the value
/// is the data), keyed by subject, with rdkafka itself, as another
/// publisher would.
fn publish_binary(servers: &str, topic: &str, events: &[NewEvent]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for event in events {
        let mut headers = OwnedHeaders::new();
        let attributes = [
            ("ce_specversion", Some("1.0")),
            ("ce_id", Some(event.id.as_str())),
            ("ce_type", Some(event.event_type.as_str())),
            ("ce_source", Some(event.source.as_str())),
            ("ce_subject", event.subject.as_deref()),
            ("ce_time", event.time.as_deref()),
            ("content-type", event.datacontenttype.as_deref().or(Some("application/json"))),
        ];
        for (key, value) in attributes {
            if let Some(value) = value {
                headers = headers.insert(Header { key, value: Some(value) });
            }
        }
        let key = event.subject.clone().unwrap_or_default();
        let record = BaseRecord::to(topic).payload(&event.data).key(&key).headers(headers);
        producer.send(record).map_err(|(err, _)| err).unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Produce one raw record (no CloudEvent) to `partition`.
fn publish_raw(servers: &str, topic: &str, partition: i32, body: &[u8]) {
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", servers).create().unwrap();
    producer
        .send(BaseRecord::<(), _>::to(topic).partition(partition).payload(body))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Each partition's high watermark, by checkpoint name.
fn high_watermarks(servers: &str, source: &str, topic: &str) -> HashMap<String, u64> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", servers).create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5)).unwrap();
            (format!("kafka:{source}/{topic}/{}", p.id()), high as u64)
        })
        .collect()
}

fn open(servers: &str, topics: &[&str], reader: &str) -> Box<dyn Source> {
    let filter = Filter { streams: topics.iter().map(|t| t.to_string()).collect(), types: None };
    KafkaOpener::new("orders", vec![servers.to_string()]).unwrap().open(&filter, reader).unwrap()
}

/// Read as a runner does until every partition reaches `target`; returns
/// the events (with their partitions) and the malformed reasons.
fn read_until(
    source: &mut dyn Source,
    mut at: Checkpoint,
    target: &HashMap<String, u64>,
) -> (Vec<(String, projector::bindings::Event)>, Vec<String>, Checkpoint) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut events, mut malformed) = (Vec::new(), Vec::new());
    while target.iter().any(|(p, high)| at.position(p) < *high) {
        assert!(Instant::now() < deadline, "timed out at {:?} of {target:?}", at.to_json());
        match source.next_batch(&at, 100, Duration::from_millis(100)) {
            Ok(batch) => {
                assert!(batch.events.len() <= 100);
                assert!(
                    batch.malformed.is_none() || batch.events.is_empty(),
                    "a malformed record comes alone"
                );
                for (event, partition) in batch.events.iter().zip(&batch.partitions) {
                    events.push((partition.to_string(), event.clone()));
                }
                if let Some(m) = &batch.malformed {
                    malformed.push(m.reason.clone());
                }
                at = batch.end.clone();
                source.acknowledge(&at).unwrap();
            }
            Err(SourceError::Unavailable(_)) => std::thread::sleep(Duration::from_millis(100)),
            Err(SourceError::Failed(err)) => panic!("{err:#}"),
        }
    }
    (events, malformed, at)
}

#[test]
fn a_reader_takes_every_partition_from_its_checkpoint_in_both_modes_and_drops_duplicates() {
    let broker = shared_broker();
    let servers = broker.servers();
    broker.create_topic("read", 3);
    let lines = keyed_wallet_events(900, 60, "r");
    let events = parsed(&lines);
    let keys = vec![None; 300];
    assert_eq!(
        publish(std::slice::from_ref(&servers), "read", &events[..300], &keys).unwrap().published,
        300
    );
    publish_binary(&servers, "read", &events[300..600]);
    // A publisher retrying: the first 100 again, then the rest.
    publish_binary(&servers, "read", &events[..100]);
    publish(std::slice::from_ref(&servers), "read", &events[600..], &keys).unwrap();
    publish_raw(&servers, "read", 1, b"not a cloudevent");
    let high = high_watermarks(&servers, "orders", "read");
    assert_eq!(high.values().sum::<u64>(), 1001);

    let mut source = open(&servers, &["read"], "tests-read");
    assert_eq!(source.key(), "kafka:orders");
    let (read, malformed, end) = read_until(source.as_mut(), Checkpoint::default(), &high);
    let ids: Vec<&str> = read.iter().map(|(_, e)| e.id.as_str()).collect();
    assert_eq!(ids.len(), 900, "every event once, the 100 re-published dropped");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 900);
    assert_eq!(malformed.len(), 1);
    assert!(malformed[0].contains("topic read partition 1 offset"), "{}", malformed[0]);
    assert!(malformed[0].contains("neither a structured-mode CloudEvent"), "{}", malformed[0]);
    // One user's events in publish order: they share a key, so a partition.
    let mut by_user: HashMap<String, Vec<usize>> = HashMap::new();
    for (partition, event) in &read {
        assert_eq!(event.stream, "read");
        assert!(partition.starts_with("kafka:orders/read/"), "{partition}");
        let n: usize = event.id.trim_start_matches("r-").parse().unwrap();
        by_user.entry(event.subject.clone().unwrap()).or_default().push(n);
    }
    assert!(by_user.values().all(|ns| ns.windows(2).all(|w| w[0] < w[1])), "per-key order kept");
    // The checkpoint holds the next offset of each partition: its head.
    for (partition, high) in &high {
        assert_eq!(end.position(partition), *high, "{partition}");
    }
    let progress = source.progress(&end).unwrap();
    assert_eq!((progress.lag, progress.head.total()), (0, 1001));
    assert!(source.warning().is_none());

    // From a checkpoint mid-way: exactly what follows it, duplicates still
    // dropped (the window is read back from the log).
    let mid: Checkpoint = {
        let mut mid = Checkpoint::default();
        for (partition, high) in &high {
            mid.set(partition, high / 2);
        }
        mid
    };
    let mut again = open(&servers, &["read"], "tests-read-2");
    let (rest, _, _) = read_until(again.as_mut(), mid.clone(), &high);
    let expected: Vec<&str> = read
        .iter()
        .filter(|(partition, event)| event.position >= mid.position(partition))
        .map(|(_, e)| e.id.as_str())
        .collect();
    let mut got: Vec<&str> = rest.iter().map(|(_, e)| e.id.as_str()).collect();
    let mut expected = expected;
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(again.progress(&mid).unwrap().lag, high.values().map(|h| h - h / 2).sum::<u64>());
}

#[test]
fn retention_past_a_checkpoint_is_an_error_naming_the_partition_and_a_rebuild_warns() {
    let broker = shared_broker();
    let servers = broker.servers();
    broker.create_topic("retained", 1);
    let events = parsed(&keyed_wallet_events(20, 5, "t"));
    publish(std::slice::from_ref(&servers), "retained", &events, &[]).unwrap();
    // Retention (or an operator) drops the records before offset 12.
    let mut drop_before = TopicPartitionList::new();
    drop_before.add_partition_offset("retained", 0, Offset::Offset(12)).unwrap();
    let options = rdkafka::admin::AdminOptions::new();
    block_on_future(broker.admin().delete_records(&drop_before, &options)).unwrap();

    let mut source = open(&servers, &["retained"], "tests-retained");
    let err =
        match source.next_batch(&Checkpoint::at("kafka:orders/retained/0", 5), 100, Duration::from_secs(1)) {
            Err(SourceError::Failed(err)) => format!("{err:#}"),
            other => panic!("expected a failure, got {:?}", other.map(|b| b.events.len())),
        };
    assert!(
        err.contains("topic retained partition 0: retention dropped the records before offset 12"),
        "{err}"
    );
    assert!(err.contains("checkpoint is at offset 5"), "{err}");
    assert!(err.contains("Rebuild the projection"), "{err}");

    // A rebuild (no checkpoint) reads what is left, and says what it missed.
    let mut rebuild = open(&servers, &["retained"], "tests-retained-rebuild");
    let high = HashMap::from([("kafka:orders/retained/0".to_string(), 20)]);
    let (read, _, _) = read_until(rebuild.as_mut(), Checkpoint::default(), &high);
    assert_eq!(read.iter().map(|(_, e)| e.position).collect::<Vec<_>>(), (12..20).collect::<Vec<_>>());
    let warning = rebuild.warning().expect("a warning");
    assert!(warning.contains("topic retained partition 0: offsets 0 to 11"), "{warning}");
}

#[test]
fn a_cluster_that_is_down_makes_reads_unavailable_with_the_reason() {
    let port = free_port();
    let mut source = open(&format!("127.0.0.1:{port}"), &["orders"], "tests-down");
    let started = Instant::now();
    match source.next_batch(&Checkpoint::default(), 10, Duration::from_millis(100)) {
        Err(SourceError::Unavailable(reason)) => {
            assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}")
        }
        other => panic!("expected unavailable, got {:?}", other.map(|b| b.events.len())),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "a read does not hang on a dead cluster");
    assert!(matches!(source.health(), Health::Connecting { .. }));
    let missing = open(&shared_broker().servers(), &["no-such-topic"], "tests-missing");
    let mut missing = missing;
    match missing.next_batch(&Checkpoint::default(), 10, Duration::from_millis(100)) {
        Err(SourceError::Unavailable(reason)) => {
            assert!(reason.contains("topic no-such-topic not found"), "{reason}")
        }
        other => panic!("expected unavailable, got {:?}", other.map(|b| b.events.len())),
    }
}

#[test]
fn projector_publish_keys_each_record_and_a_file_with_a_bad_line_or_a_missing_topic_publishes_nothing() {
    let broker = shared_broker();
    let servers = broker.servers();
    broker.create_topic("cli", 1);
    let ws = Workspace::new();
    write_kafka_config(&ws, &servers, "cli");
    let total = |topic: &str| high_watermarks(&servers, "orders", topic).values().sum::<u64>();

    publish_a_file_with_a_bad_line(&ws, "orders", "cli");
    assert_eq!(total("cli"), 0, "nothing of a bad file is published");

    let lines = keyed_wallet_events(20, 4, "cli");
    let file = ws.write_events("good.jsonl", &lines);
    let err =
        run_err(&["publish", "--config", &ws.config_str(), "--source", "orders", "no-such-topic", &file]);
    assert!(err.contains("topic no-such-topic does not exist on Kafka") && err.contains("--create"), "{err}");

    publish_cli(&ws, "good.jsonl", "cli", &lines);
    let expected: Vec<(Option<String>, String)> =
        parsed(&lines).into_iter().map(|e| (e.subject.clone(), e.id)).collect();
    let found: Vec<(Option<String>, String)> = records(&servers, "cli")
        .into_iter()
        .map(|(key, value)| (key, value["id"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(found, expected, "each event once, in order, keyed by its subject");

    // Standard input works as for `append`.
    let output = run_with_stdin(
        &["publish", "--config", &ws.config_str(), "--source", "orders", "cli", "-"],
        &(keyed_wallet_events(5, 5, "stdin").join("\n") + "\n"),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(json(&String::from_utf8(output.stdout).unwrap())["published"], 5);
    assert_eq!(total("cli"), 25);
}

const STATE_SQL: [&str; 2] = [
    "SELECT wallet_address, user_id, allowlisted_at FROM allowlist ORDER BY wallet_address",
    "SELECT user_id, wallet_address, kyc_verified_at FROM users ORDER BY user_id",
];

/// A config whose wallet-allowlist and event recorder read `topic` from
/// the source `orders`, in batches of a fixed size (so a kill lands
/// between two).
fn write_kafka_config(ws: &Workspace, servers: &str, topic: &str) {
    write_kafka_cluster_config(ws, &[servers.to_string()], topic);
}

/// [`write_kafka_config`] with every broker of a cluster listed.
fn write_kafka_cluster_config(ws: &Workspace, servers: &[String], topic: &str) {
    let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    let mut text =
        format!("version = 1\ndata = \"data\"\n\n[sources.orders]\nkafka = [{}]\n", servers.join(", "));
    for (name, module) in [("wallet-allowlist", "wallet_allowlist"), ("recorder", "event_recorder")] {
        text.push_str(&format!(
            "\n[[projection]]\nname = {name:?}\nmodule = {:?}\nsource = \"orders\"\nstreams = [{topic:?}]\n\
             batch_size = 100\n",
            guest(module).to_string_lossy()
        ));
    }
    std::fs::write(ws.config(), text).unwrap();
}

/// `projector publish` of `lines` to `topic`.
fn publish_cli(ws: &Workspace, name: &str, topic: &str, lines: &[String]) {
    let file = ws.write_events(name, lines);
    let out = json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "orders", topic, &file]));
    assert_eq!(out["published"], lines.len(), "{out}");
}

/// Publish chunks alternating between `projector publish` (structured
/// mode) and rdkafka (binary mode).
fn publish_chunk(ws: &Workspace, servers: &str, topic: &str, i: usize, chunk: &[String]) {
    match i % 2 {
        0 => publish_cli(ws, &format!("chunk-{i}.jsonl"), topic, chunk),
        _ => publish_binary(servers, topic, &parsed(chunk)),
    }
}

/// The recorder's checkpoint: its partitions' positions added up.
fn checkpoint_total(ws: &Workspace, projection: &str) -> u64 {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let Ok(db) = rusqlite::Connection::open_with_flags(ws.database(projection), flags) else { return 0 };
    db.query_row(
        "SELECT coalesce(sum(position), 0) FROM projector_checkpoints WHERE source LIKE 'kafka:orders/%'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap_or(0) as u64
}

fn wait_checkpoint(ws: &Workspace, at_least: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while checkpoint_total(ws, "recorder") < at_least {
        assert!(Instant::now() < deadline, "timed out waiting for the recorder's checkpoint past {at_least}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every event of `unique` handled exactly once.
fn assert_each_event_handled_once(ws: &Workspace, unique: usize) {
    let recorded = ws.query("recorder", "SELECT count(*) AS handled, count(DISTINCT id) AS ids FROM handled");
    assert_eq!(recorded, serde_json::json!([{"handled": unique, "ids": unique}]));
}

/// The wallet-allowlist state equals `projector replay` of the same events.
fn assert_state_is_the_replay(ws: &Workspace, all: &str) {
    let wallet = guest("wallet_allowlist");
    for sql in STATE_SQL {
        let replayed =
            json(&run_ok(&["replay", "--module", wallet.to_str().unwrap(), "--events", all, "--sql", sql]));
        assert!(replayed.as_array().unwrap().len() > 50, "the scenario fills the tables");
        let live = ws.query("wallet-allowlist", sql);
        assert!(live == replayed, "{sql}: the state built from Kafka differs from the replay");
    }
}

/// The offsets committed to `group` for `topic`, by partition.
fn committed(servers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", servers).set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let found = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| match found.find_partition(topic, p).unwrap().offset() {
            Offset::Offset(n) => n,
            _ => -1,
        })
        .collect()
}

#[test]
fn run_over_kafka_sigkilled_mid_stream_builds_the_state_of_a_replay_and_commits_group_offsets() {
    const TOTAL: usize = 6000;
    const CHUNK: usize = 1000;
    let broker = shared_broker();
    let servers = broker.servers();
    broker.create_topic("wallets", 3);
    let ws = Workspace::new();
    write_kafka_config(&ws, &servers, "wallets");
    let lines = keyed_wallet_events(TOTAL, 300, "w");
    let all = ws.write_events("all.jsonl", &lines);
    let mut host = ws.start();
    let mut published = 0;
    let mut kills = 0;
    for (i, chunk) in lines.chunks(CHUNK).enumerate() {
        let before = published;
        published += chunk.len() as u64;
        if !matches!(i, 1 | 3 | 4) {
            publish_chunk(&ws, &servers, "wallets", i, chunk);
        } else {
            // A backlog for the kill: the chunk is published with the host
            // down (killed wherever it stood), then the host is killed a
            // batch into it. A chunk published while the host reads could
            // be read whole before the kill lands.
            host.kill();
            publish_chunk(&ws, &servers, "wallets", i, chunk);
            host = ws.start();
            let depth = before + 100;
            host.kill_when(&format!("checkpoint {depth}"), || checkpoint_total(&ws, "recorder") >= depth);
            let at = checkpoint_total(&ws, "recorder");
            assert!(at < published, "the kill landed mid-stream ({at} of {published})");
            kills += 1;
            host = ws.start();
        }
        if i == 2 {
            // A publisher retrying, and a record that is no event.
            publish_binary(&servers, "wallets", &parsed(&lines[..CHUNK]));
            publish_raw(&servers, "wallets", 0, b"{\"not\": \"an event\"}");
            published += CHUNK as u64 + 1;
        }
    }
    assert_eq!(kills, 3);
    wait_checkpoint(&ws, published, Duration::from_secs(120));
    wait_until(Duration::from_secs(30), "the allowlist caught up", || {
        checkpoint_total(&ws, "wallet-allowlist") == published
    });
    wait_until(Duration::from_secs(30), "status: running, connected, at the head", || {
        let status = ws.status_of("recorder");
        status["state"] == "running"
            && status["connected"] == true
            && status["lag"] == 0
            && status["head"] == published
    });
    let status = ws.status_of("recorder");
    assert_eq!(status["dead_letters"], 1, "{status}");
    let partitions = status["partitions"].as_object().expect("per-partition progress");
    assert_eq!(partitions.len(), 3, "{status}");
    let m = metrics(&host.url());
    for (name, partition) in partitions {
        assert!(name.starts_with("kafka:orders/wallets/"), "{name}");
        assert_eq!((&partition["lag"], &partition["position"]), (&0.into(), &partition["head"]), "{name}");
        // And in /metrics, one series per partition.
        let sample = |metric: &str| {
            m.get(&format!(r#"{metric}{{projection="recorder",partition="{name}"}}"#)).copied()
        };
        let head = partition["head"].as_u64().unwrap() as f64;
        assert_eq!(
            (
                sample("projector_partition_lag"),
                sample("projector_partition_head"),
                sample("projector_partition_position")
            ),
            (Some(0.0), Some(head), Some(head)),
            "{name}"
        );
    }
    let letters = json(&run_ok(&["dead-letters", "list", "--config", &ws.config_str(), "recorder"]));
    let letters = letters.as_array().unwrap();
    assert!(letters[0]["reason"].as_str().unwrap().contains("topic wallets partition 0"), "{letters:?}");
    // Kafka's lag tools see the projection where its checkpoint is.
    let high = high_watermarks(&servers, "orders", "wallets");
    let expected: Vec<i64> = (0..3).map(|p| high[&format!("kafka:orders/wallets/{p}")] as i64).collect();
    wait_until(Duration::from_secs(10), "the group offsets committed", || {
        committed(&servers, &group_id("recorder"), "wallets", 3) == expected
    });
    drop(host);
    assert_each_event_handled_once(&ws, TOTAL);
    assert_state_is_the_replay(&ws, &all);
    // The module saw each event's partition, and within one partition each
    // offset once.
    let seen = ws.query(
        "recorder",
        "SELECT partition, count(*) AS events, count(DISTINCT position) AS offsets FROM handled \
         GROUP BY partition ORDER BY partition",
    );
    let seen = seen.as_array().unwrap();
    let numbers: Vec<Option<u64>> = seen.iter().map(|row| row["partition"].as_u64()).collect();
    assert_eq!(numbers, [Some(0), Some(1), Some(2)], "{seen:?}");
    for row in seen {
        assert_eq!(row["events"], row["offsets"], "{row}");
    }
}

#[test]
fn two_replicas_reading_one_topic_build_identical_state() {
    const TOTAL: usize = 3000;
    let broker = shared_broker();
    let servers = broker.servers();
    broker.create_topic("replicated", 3);
    // The same config, each in its own workspace: its own data dir.
    let replicas = [Workspace::new(), Workspace::new()];
    for ws in &replicas {
        write_kafka_config(ws, &servers, "replicated");
    }
    let lines = keyed_wallet_events(TOTAL, 300, "two");
    let all = replicas[0].write_events("all.jsonl", &lines);
    let hosts: Vec<Host> = replicas.iter().map(Workspace::start).collect();
    for (i, chunk) in lines.chunks(1000).enumerate() {
        publish_chunk(&replicas[0], &servers, "replicated", i, chunk);
    }
    // A publisher retrying: each replica drops the copies.
    publish_binary(&servers, "replicated", &parsed(&lines[..500]));
    let published = (TOTAL + 500) as u64;
    for ws in &replicas {
        wait_checkpoint(ws, published, Duration::from_secs(120));
        wait_until(Duration::from_secs(30), "the allowlist caught up", || {
            checkpoint_total(ws, "wallet-allowlist") == published
        });
    }
    drop(hosts);
    for sql in STATE_SQL {
        let (first, second) =
            (replicas[0].query("wallet-allowlist", sql), replicas[1].query("wallet-allowlist", sql));
        assert!(first == second, "{sql}: the replicas differ");
    }
    let handled = "SELECT partition, position, id FROM handled ORDER BY partition, position";
    assert_eq!(
        replicas[0].query("recorder", handled),
        replicas[1].query("recorder", handled),
        "each replica handled every event at the same partition and offset"
    );
    for ws in &replicas {
        assert_each_event_handled_once(ws, TOTAL);
        assert_state_is_the_replay(ws, &all);
    }
}

#[test]
fn run_over_a_three_broker_cluster_with_one_killed_mid_stream_builds_the_exact_state() {
    const TOTAL: usize = 4000;
    let mut cluster = KafkaCluster::start();
    let servers = cluster.servers();
    let bootstrap = servers.join(",");
    cluster.create_topic("wallets", 3);
    let ws = Workspace::new();
    write_kafka_cluster_config(&ws, &servers, "wallets");
    let lines = keyed_wallet_events(TOTAL, 300, "c");
    let all = ws.write_events("all.jsonl", &lines);
    let host = ws.start();
    publish_chunk(&ws, &bootstrap, "wallets", 0, &lines[..1000]);
    wait_checkpoint(&ws, 1000, Duration::from_secs(60));
    // Killed while the host reads a chunk being published: the leader of
    // partition 0 goes, its followers take over.
    let leader = cluster.leader("wallets", 0);
    let at = std::thread::scope(|scope| {
        scope.spawn(|| publish_chunk(&ws, &bootstrap, "wallets", 1, &lines[1000..2500]));
        wait_checkpoint(&ws, 1100, Duration::from_secs(60));
        let at = checkpoint_total(&ws, "recorder");
        cluster.node(leader).kill();
        at
    });
    assert!(at < 2500, "the kill landed mid-stream ({at} of 2500)");
    // Two brokers of three are in sync: writes go on, and so does reading.
    wait_until(Duration::from_secs(30), "a new leader of partition 0", || {
        cluster.leader("wallets", 0) != leader
    });
    publish_chunk(&ws, &bootstrap, "wallets", 2, &lines[2500..]);
    // A publisher retrying: the copies are dropped.
    publish_binary(&bootstrap, "wallets", &parsed(&lines[..500]));
    let published = (TOTAL + 500) as u64;
    wait_checkpoint(&ws, published, Duration::from_secs(60));
    wait_until(Duration::from_secs(30), "the allowlist caught up", || {
        checkpoint_total(&ws, "wallet-allowlist") == published
    });
    wait_until(Duration::from_secs(30), "status: running, at the head", || {
        let status = ws.status_of("recorder");
        status["state"] == "running" && status["lag"] == 0 && status["head"] == published
    });
    drop(host);
    assert_each_event_handled_once(&ws, TOTAL);
    assert_state_is_the_replay(&ws, &all);
}

#[test]
fn a_partition_added_while_running_is_read() {
    let broker = shared_broker();
    let servers = broker.servers();
    broker.create_topic("growing", 1);
    let ws = Workspace::new();
    write_kafka_config(&ws, &servers, "growing");
    let lines = keyed_wallet_events(20, 5, "g");
    publish_cli(&ws, "first.jsonl", "growing", &lines[..10]);
    let host = ws.start();
    wait_checkpoint(&ws, 10, Duration::from_secs(60));
    let admin = broker.admin();
    let more = rdkafka::admin::NewPartitions::new("growing", 2);
    for result in
        block_on_future(admin.create_partitions([&more], &rdkafka::admin::AdminOptions::new())).unwrap()
    {
        result.unwrap();
    }
    // Straight into the new partition.
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", &servers).create().unwrap();
    for line in &lines[10..] {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "content-type", value: Some("application/cloudevents+json") });
        producer
            .send(BaseRecord::<(), _>::to("growing").partition(1).payload(line).headers(headers))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    wait_checkpoint(&ws, 20, Duration::from_secs(60));
    let partitions =
        ws.query("recorder", "SELECT count(*) AS n FROM handled WHERE CAST(substr(id, 3) AS INTEGER) >= 10");
    assert_eq!(partitions, serde_json::json!([{"n": 10}]));
    drop(host);
    assert_each_event_handled_once(&ws, 20);
}

#[test]
fn run_over_kafka_with_the_broker_killed_mid_stream_shows_connecting_then_catches_up() {
    let mut broker = KafkaBroker::start();
    let servers = broker.servers();
    broker.create_topic("wallets", 3);
    let ws = Workspace::new();
    write_kafka_config(&ws, &servers, "wallets");
    let lines = keyed_wallet_events(2000, 200, "b");
    let all = ws.write_events("all.jsonl", &lines);
    let host = ws.start();
    publish_chunk(&ws, &servers, "wallets", 0, &lines[..1000]);
    wait_checkpoint(&ws, 1000, Duration::from_secs(60));
    broker.kill();
    wait_until(Duration::from_secs(60), "the projections connecting", || {
        ws.status().iter().all(|s| s["state"] == "connecting")
    });
    let status = ws.status_of("recorder");
    assert!(status["error"].as_str().is_some_and(|e| e.contains(&servers)), "{status}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(ws.status().iter().all(|s| s["state"] != "faulted"), "never faulted");
    broker.restart();
    publish_chunk(&ws, &servers, "wallets", 1, &lines[1000..]);
    wait_checkpoint(&ws, 2000, Duration::from_secs(120));
    wait_until(Duration::from_secs(30), "both running and caught up", || {
        ws.status().iter().all(|s| s["state"] == "running" && s["lag"] == 0 && s["checkpoint"] == 2000)
    });
    drop(host);
    assert_each_event_handled_once(&ws, 2000);
    assert_state_is_the_replay(&ws, &all);
}

/// Every record of partition 0 of `topic`, oldest first: its key and its
/// value as JSON (structured mode).
fn records(servers: &str, topic: &str) -> Vec<(Option<String>, Value)> {
    use rdkafka::message::Message as _;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", "tests-records")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (_, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&list).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = Vec::new();
    while (found.len() as i64) < high {
        assert!(Instant::now() < deadline, "read {} of {high} records of {topic}", found.len());
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.unwrap();
            let key = message.key().map(|k| String::from_utf8(k.to_vec()).unwrap());
            found.push((key, serde_json::from_slice(message.payload().unwrap()).unwrap()));
        }
    }
    found
}

/// The offset of the first line of `lines` whose event has `id`: its
/// position once produced, in order, to an empty one-partition topic.
fn offset_of(lines: &[String], id: &str) -> usize {
    lines.iter().position(|line| parse_event(line).unwrap().id == id).unwrap()
}

#[test]
fn order_fees_over_kafka_publishes_its_charges_to_the_routed_topic_and_a_reader_takes_each_once() {
    let broker = shared_broker();
    let servers = broker.servers();
    let (orders, charges) = ("fees-orders", "fees-charges");
    broker.create_topic(orders, 1);
    let ws = Workspace::new();
    let config = format!(
        "version = 1\ndata = \"data\"\n\n[sources.orders]\nkafka = [{servers:?}]\n\n\
         [[projection]]\nname = \"order-fees\"\nmodule = {:?}\nsource = \"orders\"\nstreams = [{orders:?}]\n\
         emit = {{ charges = {charges:?} }}\n",
        guest("order_fees").to_string_lossy()
    );
    std::fs::write(ws.config(), config).unwrap();
    let scenario = root().join("projections/order-fees/fixtures/scenario.jsonl");
    let lines: Vec<String> =
        std::fs::read_to_string(&scenario).unwrap().lines().map(str::to_string).collect();
    // Kafka stores the repeated approval too (offset 13); the reader drops it.
    publish_cli(&ws, "scenario.jsonl", orders, &lines);
    // A Kafka position is the offset: the charges are caused at the
    // approvals' offsets, not at the embedded log's positions.
    // An emitted id names the partition of its cause: offsets repeat
    // across partitions.
    let first = format!("order-fees:kafka:orders/{orders}/0:{}:0", offset_of(&lines, "evt-o08"));
    let second = format!("order-fees:kafka:orders/{orders}/0:{}:0", offset_of(&lines, "evt-o11"));
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("order-fees:kafka:orders/fees-orders/0:7:0", "order-fees:kafka:orders/fees-orders/0:10:0")
    );

    // The topic does not exist: the charges wait in the outbox, the error
    // names it and says to create it, and the projection runs on.
    let host = ws.start();
    wait_until(Duration::from_secs(60), "order-fees waiting to publish two charges", || {
        let status = ws.status_of("order-fees");
        status["lag"] == 0 && status["outbox"] == 2
    });
    let live = |host: &Host| -> Value {
        let url = format!("{}/projections/order-fees", host.url());
        ureq::get(url).call().unwrap().body_mut().read_json().unwrap()
    };
    let error = format!("topic {charges} does not exist on Kafka at {servers}: create it");
    wait_until(Duration::from_secs(10), "the publish error in status", || {
        live(&host)["last_error"].as_str().is_some_and(|e| e.contains(&error))
    });
    let status = live(&host);
    assert!(status["last_error"].as_str().unwrap().contains("the events wait in the outbox"), "{status}");
    assert_eq!(ws.status_of("order-fees")["state"], "running");

    // The topic appears: the outbox publishes both charges and the error
    // clears, with no restart.
    broker.create_topic(charges, 1);
    wait_until(Duration::from_secs(30), "the outbox published", || ws.status_of("order-fees")["outbox"] == 0);
    wait_until(Duration::from_secs(10), "the error cleared", || live(&host)["last_error"].is_null());
    wait_published_counted(&host.url(), "order-fees", 2);

    // A second copy of the first charge, as a host that published it and
    // died before clearing its outbox leaves one. Kafka keeps no ids: it is
    // stored again, under the same id, in the same partition (same key).
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
    publish(std::slice::from_ref(&servers), charges, &[copy], &[]).unwrap();
    let published = records(&servers, charges);
    let ids: Vec<&str> = published.iter().map(|(_, event)| event["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [first.as_str(), second.as_str(), first.as_str()]);
    assert_eq!(published[2].0, published[0].0, "the copy has its original's key");
    let (key, event) = &published[1];
    let want = &emitted[1];
    assert_eq!(key.as_deref(), want["subject"].as_str(), "the record key is the subject");
    assert_charge_is(event, want);

    // Killed and started again: nothing is published a second time, and a
    // new approval's charge goes out once.
    host.kill();
    let host = ws.start();
    let more = order_4_captured_and_approved();
    publish_cli(&ws, "more.jsonl", orders, &more);
    let third = format!("order-fees:kafka:orders/{orders}/0:{}:0", lines.len() + 1);
    wait_until(Duration::from_secs(30), "the third charge published", || {
        let status = ws.status_of("order-fees");
        status["lag"] == 0 && status["outbox"] == 0 && records(&servers, charges).len() == 4
    });
    std::thread::sleep(Duration::from_millis(500));
    let ids: Vec<String> =
        records(&servers, charges).into_iter().map(|(_, e)| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, [first.clone(), second.clone(), first.clone(), third.clone()]);
    drop(host);

    // A projector reading the charges takes each once: the copy (offset 2)
    // is dropped by id.
    let reader = Workspace::new();
    std::fs::write(
        reader.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.billing]\nkafka = [{servers:?}]\n\n[[projection]]\n\
             name = \"recorder\"\nmodule = {:?}\nsource = \"billing\"\nstreams = [{charges:?}]\n",
            guest("event_recorder").to_string_lossy()
        ),
    )
    .unwrap();
    let host = reader.start();
    wait_until(Duration::from_secs(60), "the reader caught up", || {
        let status = reader.status_of("recorder");
        status["lag"] == 0 && status["checkpoint"] == 4
    });
    let handled = reader.query("recorder", "SELECT id, position FROM handled ORDER BY position");
    assert_eq!(
        handled,
        serde_json::json!([
            {"id": first, "position": 0},
            {"id": second, "position": 1},
            {"id": third, "position": 3},
        ])
    );
    drop(host);
}

#[test]
fn events_emitted_from_several_partitions_are_published_once_each_even_across_a_rebuild() {
    let broker = shared_broker();
    let servers = broker.servers();
    let (input, output) = ("echo-in", "echo-out");
    broker.create_topic(input, 3);
    broker.create_topic(output, 1);
    let ws = Workspace::new();
    let config = format!(
        "version = 1\ndata = \"data\"\n\n[sources.orders]\nkafka = [{servers:?}]\n\n\
         [[projection]]\nname = \"recorder\"\nmodule = {:?}\nsource = \"orders\"\nstreams = [{input:?}]\n\
         emit = {{ echoes = {output:?} }}\n",
        guest("event_recorder").to_string_lossy()
    );
    std::fs::write(ws.config(), config).unwrap();
    let echo = |from: usize, to: usize| -> Vec<String> {
        (from..to)
            .map(|i| {
                serde_json::json!({
                    "specversion": "1.0", "id": format!("echo-{i}"), "source": "tests", "type": "echo",
                    "subject": format!("k{i}"), "data": {}
                })
                .to_string()
            })
            .collect()
    };
    let echoed = || -> BTreeMap<String, String> {
        records(&servers, output)
            .into_iter()
            .map(|(_, event)| (event["id"].as_str().unwrap().to_string(), event["data"]["of"].to_string()))
            .collect()
    };
    publish_cli(&ws, "first.jsonl", input, &echo(0, 60));
    let host = ws.start();
    wait_until(Duration::from_secs(60), "60 echoes published", || {
        let status = ws.status_of("recorder");
        status["lag"] == 0 && status["outbox"] == 0 && records(&servers, output).len() == 60
    });
    let first = echoed();
    assert_eq!(first.len(), 60, "offsets repeat across the 3 partitions, the emitted ids do not");
    assert!(first.keys().all(|id| id.starts_with("recorder:kafka:orders/echo-in/")), "{first:?}");
    let causes: BTreeSet<&String> = first.values().collect();
    assert_eq!(causes.len(), 60, "each event echoed once");
    host.terminate();

    // Three more while the host is down, then a rebuild from the files: the
    // new generation emits all 63 again; at the takeover the 60 the old one
    // published are dropped, each against its own partition's checkpoint,
    // and the three it never handled are kept for the next run.
    publish_cli(&ws, "more.jsonl", input, &echo(60, 63));
    run_ok(&["rebuild", "--config", &ws.config_str(), "recorder"]);
    assert_eq!(ws.status_of("recorder")["outbox"], 3, "{}", ws.status_of("recorder"));
    let host = ws.start();
    wait_until(Duration::from_secs(60), "the three published", || records(&servers, output).len() >= 63);
    std::thread::sleep(Duration::from_millis(500));
    let all = echoed();
    assert_eq!(records(&servers, output).len(), 63, "nothing published twice");
    assert_eq!(all.len(), 63);
    drop(host);
}
