//! A projection reading several sources at once (the embedded log and a
//! NATS JetStream stream) through `projector run`: each event handled
//! once in its stream's order across SIGKILLs, a rebuild replaying both,
//! status while one source is down, a move from one source to a list of
//! it keeping the checkpoint, another set of sources said at start; and
//! Kafka with NATS, the union built across a SIGKILL.

use crate::util::*;
use serde_json::{Value, json};
use std::time::Duration;

/// A config whose `recorder` reads the log's `orders` and `users.>` of
/// stream USERS on `url` (the source `bus`).
fn write_joined_config(ws: &Workspace, url: &str) {
    let text = format!(
        "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = {url:?}\nstream = \"USERS\"\n\n\
         [[projection]]\nname = \"recorder\"\nmodule = {:?}\nsource = [\"log\", \"bus\"]\n\
         streams = {{ log = [\"orders\"], bus = [\"users.>\"] }}\nbatch_size = 100\n",
        guest("event_recorder").to_string_lossy()
    );
    std::fs::write(ws.config(), text).unwrap();
}

/// `n` events with ids `<prefix>-<i>`.
fn lines(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| cloud_event(&format!("{prefix}-{i}"), "noted", json!({"i": i}))).collect()
}

/// `projector append` of `lines` to the log's `orders`.
fn append(ws: &Workspace, name: &str, lines: &[String]) {
    let file = ws.write_events(name, lines);
    assert_eq!(ws.append("orders", &file), (lines.len() as u64, 0));
}

/// `projector publish` of `lines` to `users.eu` through the source `bus`.
fn publish(ws: &Workspace, name: &str, lines: &[String]) {
    let file = ws.write_events(name, lines);
    let out = json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "bus", "users.eu", &file]));
    assert_eq!(out["published"], lines.len() as u64, "{out}");
}

/// How many events the recorder handled (0 before its table exists).
fn handled(ws: &Workspace) -> u64 {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let Ok(db) = rusqlite::Connection::open_with_flags(ws.database("recorder"), flags) else { return 0 };
    db.query_row("SELECT count(*) FROM handled", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as u64
}

fn wait_handled(ws: &Workspace, at_least: u64) {
    wait_until(Duration::from_secs(120), &format!("{at_least} events handled"), || handled(ws) >= at_least);
}

/// Each of `per_stream` events of both streams handled exactly once, each
/// stream's in its order.
fn assert_each_handled_once_in_stream_order(ws: &Workspace, per_stream: u64) {
    let counts = ws.query(
        "recorder",
        "SELECT stream, count(*) AS handled, count(DISTINCT id) AS ids, count(DISTINCT position) AS positions, \
         min(position) AS first, max(position) AS last FROM handled GROUP BY stream ORDER BY stream",
    );
    let expected = |stream: &str| {
        json!({"stream": stream, "handled": per_stream, "ids": per_stream, "positions": per_stream,
               "first": 1, "last": per_stream})
    };
    assert_eq!(counts, json!([expected("orders"), expected("users.eu")]));
    let out_of_order = ws.query(
        "recorder",
        "SELECT count(*) AS n FROM handled a JOIN handled b \
         ON a.stream = b.stream AND a.rowid < b.rowid AND a.position >= b.position",
    );
    assert_eq!(out_of_order, json!([{"n": 0}]), "an event came before one ahead of it in its stream");
}

/// The handled rows, in the order handled.
fn handled_rows(ws: &Workspace) -> Value {
    ws.query("recorder", "SELECT stream, position, id FROM handled ORDER BY rowid")
}

#[test]
fn the_log_and_nats_read_at_once_handle_each_event_once_in_stream_order_across_sigkills_and_a_rebuild() {
    // Chunks big enough that a kill lands while some of the last one is
    // still to be handled.
    const CHUNK: usize = 3000;
    const CHUNKS: usize = 6;
    let server = NatsServer::start();
    let ws = Workspace::new();
    write_joined_config(&ws, &server.url());
    let (orders, users) = (lines(CHUNK * CHUNKS, "o"), lines(CHUNK * CHUNKS, "u"));
    let mut host = ws.start();
    let mut kills = 0;
    for i in 0..CHUNKS {
        let send = || {
            let part = i * CHUNK..(i + 1) * CHUNK;
            append(&ws, &format!("orders-{i}.jsonl"), &orders[part.clone()]);
            publish(&ws, &format!("users-{i}.jsonl"), &users[part]);
        };
        if i != 1 && i != 3 && i != 4 {
            send();
        } else {
            // A backlog for the kill, sent with the host down (killed
            // wherever it stood); killed again mid-stream: some of what was
            // sent is handled, not all.
            host.kill();
            send();
            host = ws.start();
            let depth = (2 * i * CHUNK + 300) as u64;
            host.kill_when(&format!("{depth} events handled"), || handled(&ws) >= depth);
            let at = handled(&ws);
            assert!(at < (2 * (i + 1) * CHUNK) as u64, "the kill landed mid-stream ({at} handled)");
            kills += 1;
            host = ws.start();
        }
    }
    assert_eq!(kills, 3);
    let total = (2 * CHUNK * CHUNKS) as u64;
    ws.wait_caught_up(total, Duration::from_secs(120));
    let status = ws.status_of("recorder");
    assert_eq!(status["source"], json!(["log", "bus"]));
    assert_eq!(
        (&status["state"], &status["connected"], &status["lag"]),
        (&json!("running"), &json!(true), &json!(0))
    );
    assert_eq!(status["head"], total, "the heads of both sources, added up");
    let partitions = status["partitions"].as_object().expect("each source's position is shown");
    assert_eq!(partitions.len(), 2, "{partitions:?}");
    assert_each_handled_once_in_stream_order(&ws, (CHUNK * CHUNKS) as u64);
    // Sent interleaved, handled interleaved: not one source after the other.
    let rows = handled_rows(&ws);
    let streams: Vec<&Value> = rows.as_array().unwrap().iter().map(|row| &row["stream"]).collect();
    let switches = streams.windows(2).filter(|pair| pair[0] != pair[1]).count();
    assert!(switches >= 4, "the sources' events did not interleave ({switches} switches)");

    // The same state after a restart; a rebuild replays both sources from
    // their start into the same set of events.
    drop(host);
    let host = ws.start();
    std::thread::sleep(Duration::from_millis(500));
    ws.wait_caught_up(total, Duration::from_secs(60));
    drop(host);
    assert_each_handled_once_in_stream_order(&ws, (CHUNK * CHUNKS) as u64);
    let before = ws.database("recorder");
    let out = json(&run_ok(&["rebuild", "--config", &ws.config_str(), "recorder"]));
    assert_ne!(ws.database("recorder"), before, "a new generation took over: {out}");
    assert_each_handled_once_in_stream_order(&ws, (CHUNK * CHUNKS) as u64);
    assert_eq!(ws.status_of("recorder")["checkpoint"], total);
}

#[test]
fn with_nats_down_the_log_still_flows_and_status_shows_it_disconnected_never_faulted() {
    let mut server = NatsServer::start();
    let ws = Workspace::new();
    write_joined_config(&ws, &server.url());
    let (orders, users) = (lines(300, "o"), lines(300, "u"));
    let host = ws.start();
    append(&ws, "orders-0.jsonl", &orders[..100]);
    publish(&ws, "users-0.jsonl", &users[..100]);
    wait_handled(&ws, 200);

    server.kill();
    wait_until(Duration::from_secs(30), "status to show the source disconnected", || {
        ws.status_of("recorder")["connected"] == false
    });
    append(&ws, "orders-1.jsonl", &orders[100..200]);
    wait_handled(&ws, 300);
    let status = ws.status_of("recorder");
    assert_eq!(status["state"], "running", "one source down is no fault: {status}");
    assert_eq!(status["connected"], false);
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("bus: "), "the status names the source that is down: {status}");

    server.restart();
    server.wait_ready();
    publish(&ws, "users-1.jsonl", &users[100..300]);
    append(&ws, "orders-2.jsonl", &orders[200..300]);
    ws.wait_caught_up(600, Duration::from_secs(60));
    wait_until(Duration::from_secs(10), "status to show the source connected again", || {
        let status = ws.status_of("recorder");
        status["connected"] == true && status["error"].is_null()
    });
    drop(host);
    assert_each_handled_once_in_stream_order(&ws, 300);
}

#[test]
fn one_source_becoming_a_list_of_it_keeps_its_checkpoint() {
    let server = NatsServer::start();
    let ws = Workspace::new();
    let config = |source: &str, streams: &str| {
        let text = format!(
            "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = {:?}\nstream = \"USERS\"\n\n\
             [[projection]]\nname = \"recorder\"\nmodule = {:?}\nsource = {source}\nstreams = {streams}\n",
            server.url(),
            guest("event_recorder").to_string_lossy()
        );
        std::fs::write(ws.config(), text).unwrap();
    };
    config("\"bus\"", "[\"users.>\"]");
    let users = lines(200, "u");
    let host = ws.start();
    publish(&ws, "users-0.jsonl", &users[..100]);
    ws.wait_caught_up(100, Duration::from_secs(60));
    drop(host);
    config("[\"bus\"]", "{ bus = [\"users.>\"] }");
    let host = ws.start();
    publish(&ws, "users-1.jsonl", &users[100..]);
    ws.wait_caught_up(200, Duration::from_secs(60));
    drop(host);
    let counts = ws.query("recorder", "SELECT count(*) AS handled, count(DISTINCT id) AS ids FROM handled");
    assert_eq!(counts, json!([{"handled": 200, "ids": 200}]), "nothing handled twice");
    assert!(!std::fs::read_to_string(ws.path("run.log")).unwrap().contains("positions of other sources"));

    // Another set of sources is another key: the start says so.
    config("[\"bus\", \"log\"]", "{ bus = [\"users.>\"], log = [\"orders\"] }");
    let host = ws.start();
    wait_until(Duration::from_secs(30), "the start to warn of the changed sources", || {
        host.logs().contains(
            "the database holds positions of other sources (nats:USERS), none of multi:log+nats:USERS",
        )
    });
}

#[test]
fn kafka_and_nats_read_at_once_build_the_union_and_survive_a_sigkill() {
    // A backlog far past the kill's depth, however quick the host is.
    const PER_SOURCE: usize = 10_000;
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    kafka.create_topic("orders", 3);
    let ws = Workspace::new();
    let text = format!(
        "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = {:?}\nstream = \"USERS\"\n\n\
         [sources.shop]\nkafka = [{:?}]\n\n\
         [[projection]]\nname = \"recorder\"\nmodule = {:?}\nsource = [\"shop\", \"bus\"]\n\
         streams = {{ shop = [\"orders\"], bus = [\"users.>\"] }}\nbatch_size = 100\n",
        nats.url(),
        kafka.servers(),
        guest("event_recorder").to_string_lossy()
    );
    std::fs::write(ws.config(), text).unwrap();
    // Each order keyed to a partition by its subject.
    let orders: Vec<String> = (0..PER_SOURCE)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("o-{i}"), "source": "tests", "type": "noted",
                   "subject": format!("customer-{}", i % 40), "data": {"i": i}})
            .to_string()
        })
        .collect();
    let users = lines(PER_SOURCE, "u");
    let to_kafka = |name: &str, lines: &[String]| {
        let file = ws.write_events(name, lines);
        let out =
            json(&run_ok(&["publish", "--config", &ws.config_str(), "--source", "shop", "orders", &file]));
        assert_eq!(out["published"], lines.len() as u64, "{out}");
    };
    let half = PER_SOURCE / 2;
    to_kafka("orders-0.jsonl", &orders[..half]);
    publish(&ws, "users-0.jsonl", &users[..half]);
    let host = ws.start();
    // Killed mid-stream, with more of both arriving.
    host.kill_when("1000 events handled", || handled(&ws) >= 1000);
    let at = handled(&ws);
    assert!(at < (2 * half) as u64, "the kill landed mid-stream ({at} handled)");
    to_kafka("orders-1.jsonl", &orders[half..]);
    publish(&ws, "users-1.jsonl", &users[half..]);
    let host = ws.start();
    let total = (2 * PER_SOURCE) as u64;
    wait_until(Duration::from_secs(120), "the union handled", || handled(&ws) >= total);
    // Status shows what the host last reported of its sources (once a
    // second).
    wait_until(Duration::from_secs(30), "status at the heads of both", || {
        let status = ws.status_of("recorder");
        status["lag"] == 0 && status["head"] == total
    });
    let status = ws.status_of("recorder");
    assert_eq!(status["source"], json!(["shop", "bus"]));
    assert_eq!((&status["state"], &status["connected"]), (&json!("running"), &json!(true)), "{status}");
    assert_eq!(status["partitions"].as_object().map(|p| p.len()), Some(4), "three Kafka partitions and NATS");
    drop(host);

    // Every event of both sources once; each Kafka partition and the NATS
    // stream in their own order.
    let counts = ws.query(
        "recorder",
        "SELECT count(*) AS handled, count(DISTINCT id) AS ids, \
         count(DISTINCT CASE WHEN id LIKE 'o-%' THEN id END) AS orders, \
         count(DISTINCT CASE WHEN id LIKE 'u-%' THEN id END) AS users FROM handled",
    );
    assert_eq!(counts, json!([{"handled": total, "ids": total, "orders": PER_SOURCE, "users": PER_SOURCE}]));
    let out_of_order = ws.query(
        "recorder",
        "SELECT count(*) AS n FROM handled a JOIN handled b ON a.stream = b.stream \
         AND a.partition IS b.partition AND a.rowid < b.rowid AND a.position >= b.position",
    );
    assert_eq!(out_of_order, json!([{"n": 0}]), "an event came before one ahead of it in its partition");
    let partitions =
        ws.query("recorder", "SELECT count(DISTINCT partition) AS n FROM handled WHERE id LIKE 'o-%'");
    assert_eq!(partitions, json!([{"n": 3}]), "the module saw the Kafka partitions");
}
