//! The official CloudEvents SDK for Python (PyPI `cloudevents`) as an
//! outside client, in binary mode and in structured mode: of HTTP ingest
//! (the events land in the log with their attributes and data intact), and
//! of Kafka, producing with Confluent's client (PyPI `confluent-kafka`) to
//! a topic a projection reads. Both are installed in a virtualenv under
//! `target/py` (by `scripts/test`, or here when it is missing).
//!
//! The Python SDK has no NATS binding; the official SDK for Go
//! (`github.com/cloudevents/sdk-go`, with its JetStream protocol) is the
//! outside client of NATS, both ways: it publishes events a projection
//! reads, and it receives the events a projection emits. The small command
//! in `tests/go` is built into `target/cloudevents-nats` (by `scripts/test`,
//! or here when it is missing).

use crate::util::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The SDK version the test posts with.
const SDK_VERSION: &str = "2.2.0";
/// The Kafka client the SDK's Kafka messages are produced with (its
/// librdkafka is the one the runtime's client builds).
const KAFKA_CLIENT_VERSION: &str = "2.12.0";

/// The Go SDK's command (`tests/go`), built when it is missing or older
/// than its source.
fn go_sdk_command() -> PathBuf {
    let binary = root().join("target/cloudevents-nats");
    let source = root().join("tests/go");
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let newest_source =
        ["main.go", "go.mod", "go.sum"].iter().filter_map(|f| modified(&source.join(f))).max();
    if modified(&binary).is_none_or(|built| newest_source.is_some_and(|s| s > built)) {
        let status = Command::new("go")
            .current_dir(&source)
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .status()
            .unwrap_or_else(|err| panic!("cannot run go ({err}): the NATS SDK test builds tests/go with Go"));
        assert!(status.success(), "go build in tests/go failed (is the Go module proxy reachable?)");
    }
    binary
}

/// `count` wallet events as CloudEvents JSON lines, with extension and
/// UTF-8 data, for an SDK to send.
fn sdk_events(count: usize, prefix: &str, event_type: &str) -> Vec<Value> {
    (0..count)
        .map(|i| {
            serde_json::json!({
                "specversion": "1.0",
                "id": format!("{prefix}-{i}"),
                "source": "https://example.com/go-sdk",
                "type": event_type,
                "subject": format!("user-{}", i % 7),
                "datacontenttype": "application/json",
                "correlationid": format!("corr-{i}"),
                "data": {"user_id": format!("user-{}", i % 7), "wallet_address": format!("0x{i:04x}"), "created_at": format!("t{i}"), "note": "café ✓"},
            })
        })
        .collect()
}

/// A JetStream stream `name` capturing `subjects` on `url`, made as an
/// operator would.
fn create_nats_stream(url: &str, name: &str, subjects: &str) {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        async_nats::jetstream::new(client)
            .create_stream(async_nats::jetstream::stream::Config {
                name: name.into(),
                subjects: vec![subjects.into()],
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

/// Run the Go SDK's `send` of `events` to `subject`; returns its report.
fn go_sdk_send(url: &str, stream: &str, subject: &str, events: &[Value]) -> Value {
    use std::io::Write as _;
    let mut child = Command::new(go_sdk_command())
        .args(["send", url, stream, subject])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines: String = events.iter().map(|e| e.to_string() + "\n").collect();
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Go SDK's send failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    json(&String::from_utf8(output.stdout).unwrap())
}

#[test]
fn events_the_go_sdk_publishes_to_jetstream_in_both_modes_are_read_intact_by_a_projection() {
    let server = NatsServer::start();
    let url = server.url();
    create_nats_stream(&url, "WALLETS", "wallets.>");
    let events = sdk_events(20, "go", "wallet_updated");
    let report = go_sdk_send(&url, "WALLETS", "wallets.sdk", &events);
    let sent = report["sent"].as_array().unwrap();
    assert_eq!(sent.iter().filter(|e| e["mode"] == "binary").count(), 10, "{report}");
    assert_eq!(sent.iter().filter(|e| e["mode"] == "structured").count(), 10, "{report}");

    let ws = Workspace::new();
    std::fs::write(
        ws.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = [{url:?}]\nstream = \"WALLETS\"\n\n\
             [[projection]]\nname = \"recorder\"\nmodule = {:?}\nsource = \"bus\"\nstreams = [\"wallets.>\"]\n",
            guest("event_recorder").to_string_lossy()
        ),
    )
    .unwrap();
    let host = ws.start();
    ws.wait_caught_up(20, Duration::from_secs(60));
    let handled = ws.query(
        "recorder",
        "SELECT id, stream, position, type, subject, correlation_id, data FROM handled ORDER BY position",
    );
    let handled = handled.as_array().unwrap();
    assert_eq!(handled.len(), events.len(), "every event once, none a dead letter: {handled:?}");
    for ((row, expected), mode) in handled.iter().zip(&events).zip(sent) {
        let what = format!("{} ({} mode)", expected["id"], mode["mode"]);
        assert_eq!(row["id"], expected["id"], "in the order sent");
        assert_eq!((&row["stream"], &row["type"]), (&"wallets.sdk".into(), &expected["type"]), "{what}");
        assert_eq!(
            (&row["subject"], &row["correlation_id"]),
            (&expected["subject"], &expected["correlationid"]),
            "{what}"
        );
        let data: Value = serde_json::from_str(row["data"].as_str().unwrap()).unwrap();
        assert_eq!(data, expected["data"], "data of {what}");
        assert_eq!(data["note"], Value::from("café ✓"), "UTF-8 data survives");
    }
    drop(host);
}

#[test]
fn events_a_projection_emits_to_nats_are_received_intact_by_the_go_sdk() {
    let server = NatsServer::start();
    let url = server.url();
    create_nats_stream(&url, "WALLETS", "wallets.>");
    create_nats_stream(&url, "ECHOES", "echoes.>");
    let ws = Workspace::new();
    std::fs::write(
        ws.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = [{url:?}]\nstream = \"WALLETS\"\n\n\
             [[projection]]\nname = \"recorder\"\nmodule = {:?}\nsource = \"bus\"\nstreams = [\"wallets.>\"]\n\
             emit = {{ echoes = \"echoes.recorded\" }}\n",
            guest("event_recorder").to_string_lossy()
        ),
    )
    .unwrap();
    let host = ws.start();
    let causes = sdk_events(6, "cause", "echo");
    go_sdk_send(&url, "WALLETS", "wallets.sdk", &causes);

    let output = Command::new(go_sdk_command())
        .args(["receive", &url, "ECHOES", "echoes.recorded", "6"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the Go SDK's receive failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut received: Vec<Value> = String::from_utf8(output.stdout).unwrap().lines().map(json).collect();
    assert_eq!(received.len(), causes.len());
    // The SDK's receiver calls its handler concurrently: put them back in
    // the order of their causes, as their ids say.
    received.sort_by_key(|event| {
        let id = event["id"].as_str().unwrap_or_default();
        id.split(':').nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(u64::MAX)
    });
    for (i, (event, cause)) in received.iter().zip(&causes).enumerate() {
        assert_eq!(event["specversion"], "1.0", "{event}");
        assert_eq!(event["id"], format!("recorder:{}:0", i + 1), "the deterministic id, in order");
        assert_eq!(
            (&event["type"], &event["source"]),
            (&"echoed".into(), &"projector/recorder".into()),
            "{event}"
        );
        assert_eq!(event["data"], serde_json::json!({"of": cause["id"]}), "{event}");
        assert_eq!(
            (&event["causationid"], &event["correlationid"]),
            (&cause["id"], &cause["correlationid"]),
            "{event}"
        );
    }
    wait_until(Duration::from_secs(10), "the outbox cleared", || ws.status_of("recorder")["outbox"] == 0);
    drop(host);
}

/// A Python with the SDK: `target/py`, made (or brought to the version)
/// when it is not there yet.
fn python_with_sdk() -> PathBuf {
    let venv = root().join("target/py");
    let python = venv.join("bin/python");
    let check = format!(
        "import sys, cloudevents, confluent_kafka; from importlib.metadata import version; \
         sys.exit(version('cloudevents') != {SDK_VERSION:?} or version('confluent-kafka') != {KAFKA_CLIENT_VERSION:?})"
    );
    let ready = || Command::new(&python).args(["-c", &check]).status().is_ok_and(|s| s.success());
    if !ready() {
        let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().unwrap_or_else(|err| {
            panic!("cannot run python3 ({err}): install it (apt-get install python3 python3-venv; scripts/test does)")
        });
        assert!(made.success(), "python3 -m venv {} failed: install python3-venv", venv.display());
        let pip = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                &format!("cloudevents=={SDK_VERSION}"),
                &format!("confluent-kafka=={KAFKA_CLIENT_VERSION}"),
            ])
            .status()
            .unwrap();
        assert!(
            pip.success(),
            "pip install cloudevents=={SDK_VERSION} confluent-kafka=={KAFKA_CLIENT_VERSION} failed (is PyPI \
             reachable?)"
        );
        assert!(ready(), "the SDK is still not importable from {}", python.display());
    }
    python
}

#[test]
fn events_posted_by_the_python_sdk_in_binary_and_structured_mode_land_intact() {
    let python = python_with_sdk();
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let host = ws.start();
    let script = root().join("tests/python/post_with_sdk.py");
    let output = Command::new(&python).arg(&script).args([&host.url(), "wallets", "20"]).output().unwrap();
    assert!(output.status.success(), "the SDK client failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let report = json(&String::from_utf8(output.stdout).unwrap());
    assert!(report["statuses"].as_array().unwrap().iter().all(|s| s == 201 || s == 200), "{report}");
    let sent = report["sent"].as_array().unwrap();
    assert_eq!(sent.iter().filter(|e| e["mode"] == "binary").count(), 10);
    assert_eq!(sent.iter().filter(|e| e["mode"] == "structured").count(), 10);

    // Read back from the log: every event once, in order, intact.
    let stored = ws.events("wallets");
    assert_eq!(stored.len(), sent.len(), "{stored:?}");
    for (event, expected) in stored.iter().zip(sent) {
        for attribute in ["id", "source", "type", "subject", "correlationid"] {
            assert_eq!(event[attribute], expected[attribute], "{attribute} of {}", expected["id"]);
        }
        // The bytes are kept as posted: the SDK's JSON (spaced) comes back
        // as `data_base64`, JSON written as the log writes it as `data`.
        let data = match (&event["data"], event["data_base64"].as_str()) {
            (Value::Null, Some(encoded)) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
                serde_json::from_slice::<Value>(&bytes).unwrap()
            }
            (data, _) => data.clone(),
        };
        assert_eq!(data, expected["data"], "data of {} ({} mode)", expected["id"], expected["mode"]);
        assert_eq!(data["note"], Value::from("café ✓"), "UTF-8 data survives");
    }
    // And the projection handled each.
    ws.wait_caught_up(20, Duration::from_secs(30));
    let handled = ws.query("recorder", "SELECT id FROM handled ORDER BY position");
    let ids: Vec<&Value> = sent.iter().map(|e| &e["id"]).collect();
    assert_eq!(handled.as_array().unwrap().iter().map(|row| &row["id"]).collect::<Vec<_>>(), ids);
    drop(host);
}

#[test]
fn events_the_python_sdk_produces_to_kafka_in_both_modes_are_read_intact_by_a_projection() {
    let python = python_with_sdk();
    let broker = KafkaBroker::start();
    let (servers, topic) = (broker.servers(), "sdk-wallets");
    broker.create_topic(topic, 3);
    let script = root().join("tests/python/produce_kafka_with_sdk.py");
    let output = Command::new(&python).arg(&script).args([&servers, topic, "30"]).output().unwrap();
    assert!(output.status.success(), "the SDK client failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let report = json(&String::from_utf8(output.stdout).unwrap());
    let sent = report["sent"].as_array().unwrap();
    assert_eq!(sent.iter().filter(|e| e["mode"] == "binary").count(), 15);
    // The binding keys each record by its partitionkey: one key, one
    // partition.
    for event in sent {
        assert_eq!(event["key"], event["partitionkey"], "{event}");
        let same_key = sent.iter().filter(|other| other["key"] == event["key"]);
        assert!(same_key.map(|other| &other["partition"]).all(|p| *p == event["partition"]), "{event}");
    }

    let ws = Workspace::new();
    std::fs::write(
        ws.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.bus]\nkafka = [{servers:?}]\n\n[[projection]]\n\
             name = \"recorder\"\nmodule = {:?}\nsource = \"bus\"\nstreams = [{topic:?}]\n",
            guest("event_recorder").to_string_lossy()
        ),
    )
    .unwrap();
    let host = ws.start();
    wait_until(Duration::from_secs(60), "the recorder caught up", || {
        let status = ws.status_of("recorder");
        status["lag"] == 0 && status["checkpoint"] != 0
    });
    let handled = ws.query(
        "recorder",
        "SELECT id, stream, position, type, subject, correlation_id, data FROM handled ORDER BY rowid",
    );
    let handled = handled.as_array().unwrap();
    assert_eq!(handled.len(), sent.len(), "every event once, none a dead letter: {handled:?}");
    for expected in sent {
        let row = handled
            .iter()
            .find(|row| row["id"] == expected["id"])
            .unwrap_or_else(|| panic!("{} ({} mode) was not handled", expected["id"], expected["mode"]));
        let what = format!("{} ({} mode)", expected["id"], expected["mode"]);
        assert_eq!((&row["stream"], &row["position"]), (&topic.into(), &expected["offset"]), "{what}");
        assert_eq!((&row["type"], &row["subject"]), (&expected["type"], &expected["subject"]), "{what}");
        assert_eq!(row["correlation_id"], expected["correlationid"], "{what}");
        let data: Value = serde_json::from_str(row["data"].as_str().unwrap()).unwrap();
        assert_eq!(data, expected["data"], "data of {what}");
        assert_eq!(data["note"], Value::from("café ✓"), "UTF-8 data survives");
    }
    // Within a partition, in the order produced.
    for partition in 0..3 {
        let produced: Vec<&Value> =
            sent.iter().filter(|e| e["partition"] == partition).map(|e| &e["id"]).collect();
        let ids: Vec<&Value> =
            handled.iter().filter(|row| produced.contains(&&row["id"])).map(|row| &row["id"]).collect();
        assert_eq!(ids, produced, "partition {partition}");
    }
    drop(host);
}
