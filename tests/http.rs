//! The HTTP API of a real `run` through a real HTTP client: ingest in every
//! content type, reads, metrics, bad requests, pause/resume, dead letters,
//! correlation ids, `--url`, and reads under concurrent ingest.

mod util;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use util::*;

const WAIT: Duration = Duration::from_secs(60);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// (status, JSON body, x-request-id) of a POST.
fn post(url: &str, content_type: &str, body: &str) -> (u16, Value, Option<String>) {
    let mut response = agent().post(url).header("content-type", content_type).send(body).unwrap();
    let request_id = response.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), request_id)
}

fn get(url: &str) -> (u16, String) {
    let mut response = agent().get(url).call().unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
}

fn head(ws: &Workspace) -> u64 {
    ws.status()[0]["head"].as_u64().unwrap()
}

fn two_projections(ws: &Workspace) {
    ws.write_config(&[
        ("wallet-allowlist", &guest("wallet_allowlist"), &["wallets"]),
        ("recorder", &guest("event_recorder"), &["wallets", "other"]),
    ]);
}

#[test]
fn ingest_accepts_every_content_type_atomically_and_idempotently() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let url = format!("{}/streams/wallets/events", host.url());

    let one = cloud_event("one", "t", json!(1));
    let (status, body, request_id) = post(&url, "application/cloudevents+json", &one);
    assert_eq!((status, body), (200, json!({"appended": 1, "duplicates": 0})));
    assert!(request_id.is_some());

    let batch = format!("[{},{}]", cloud_event("b1", "t", json!(1)), cloud_event("b2", "t", json!(2)));
    let (status, body, _) = post(&url, "application/cloudevents-batch+json", &batch);
    assert_eq!((status, body), (200, json!({"appended": 2, "duplicates": 0})));

    let lines =
        format!("{}\n{}\n{}\n", cloud_event("n1", "t", json!(1)), cloud_event("b2", "t", json!(2)), one);
    let (status, body, _) = post(&url, "application/x-ndjson; charset=utf-8", &lines);
    assert_eq!((status, body), (200, json!({"appended": 1, "duplicates": 2})));
    assert_eq!(head(&ws), 4);
}

#[test]
fn events_without_a_correlation_id_get_the_request_id_everywhere() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let url = format!("{}/streams/wallets/events", host.url());
    let with_own = json!({"specversion": "1.0", "id": "c1", "source": "t", "type": "log", "correlationid": "mine", "data": "hello one"});
    let without =
        json!({"specversion": "1.0", "id": "c2", "source": "t", "type": "log", "data": "hello two"});
    let body = format!("{with_own}\n{without}\n");
    let mut response = agent()
        .post(&url)
        .header("content-type", "application/x-ndjson")
        .header("x-request-id", "req-42")
        .send(body.as_str())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers().get("x-request-id").unwrap(), "req-42");
    let _ = response.body_mut().read_to_string();
    ws.wait_caught_up(2, WAIT);
    let db = rusqlite::Connection::open(ws.data().join("events.db")).unwrap();
    let ids: Vec<(String, String)> = db
        .prepare("SELECT id, correlation_id FROM events ORDER BY position")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, [("c1".to_string(), "mine".to_string()), ("c2".to_string(), "req-42".to_string())]);
    // The guest's log lines carry the event's correlation id.
    wait_until(WAIT, "the guest's log lines", || host.logs().contains("hello two"));
    let logs = host.logs();
    let line = logs.lines().find(|l| l.contains("hello two")).unwrap();
    assert!(line.contains("correlation_id=\"req-42\"") && line.contains("event_id=\"c2\""), "{line}");
    let line = logs.lines().find(|l| l.contains("hello one")).unwrap();
    assert!(line.contains("correlation_id=\"mine\""), "{line}");

    // A file append gets one fresh correlation id for the whole file.
    let file =
        ws.write_events("f.jsonl", &[cloud_event("f1", "t", json!(1)), cloud_event("f2", "t", json!(2))]);
    ws.append("wallets", &file);
    let fresh: Vec<String> = db
        .prepare("SELECT correlation_id FROM events WHERE id IN ('f1', 'f2')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(fresh.len(), 2);
    assert_eq!(fresh[0], fresh[1]);
    assert_eq!(fresh[0].len(), 36, "a uuid: {}", fresh[0]);
}

#[test]
fn reads_serve_the_state_the_guest_query_and_sql() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    let seed =
        std::fs::read_to_string(root().join("projections/wallet-allowlist/fixtures/seed.jsonl")).unwrap();
    let (status, _, _) = post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &seed);
    assert_eq!(status, 200);
    ws.wait_caught_up(10, WAIT);

    let ask = |wallet: &str| {
        post(
            &format!("{base}/projections/wallet-allowlist/query"),
            "application/json",
            &json!({"wallet_address": wallet}).to_string(),
        )
    };
    assert_eq!(ask("0xA4"), (200, json!({"allowlisted": true, "user_id": "user-1"}), None));
    assert_eq!(ask("0xB1"), (200, json!({"allowlisted": false, "user_id": null}), None));
    let (status, body, _) =
        post(&format!("{base}/projections/wallet-allowlist/query"), "application/json", "{}");
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("wallet_address"), "{body}");

    assert_eq!(get(&format!("{base}/projections/recorder/state/count")), (200, "10".to_string()));
    let (status, body) = get(&format!("{base}/projections/recorder/state/missing"));
    assert_eq!(status, 404);
    assert!(body.contains("no state key \\\"missing\\\""), "{body}");

    let (status, rows, _) = post(
        &format!("{base}/projections/wallet-allowlist/sql"),
        "application/json",
        &json!({"sql": "SELECT count(*) AS n FROM allowlist"}).to_string(),
    );
    assert_eq!((status, rows), (200, json!([{"n": 5}])));
    let (status, body, _) = post(
        &format!("{base}/projections/wallet-allowlist/sql"),
        "application/json",
        &json!({"sql": "DELETE FROM allowlist"}).to_string(),
    );
    assert_eq!(status, 400, "reads cannot write: {body}");

    let (status, body) = get(&format!("{base}/projections/wallet-allowlist"));
    assert_eq!(status, 200);
    let one: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((one["lag"].as_u64(), one["state"].as_str()), (Some(0), Some("running")));
    assert_eq!(get(&format!("{base}/healthz")), (200, r#"{"status":"ok"}"#.to_string()));

    // The CLI reaches the same through --url.
    let status = json(&run_ok(&["status", "--url", &base]));
    assert_eq!(status.as_array().unwrap().len(), 2);
    let answer = json(&run_ok(&[
        "query",
        "--url",
        &base,
        "wallet-allowlist",
        "--request",
        r#"{"wallet_address":"0xA1"}"#,
    ]));
    assert_eq!(answer, json!({"allowlisted": true, "user_id": "user-1"}));
    let rows = json(&run_ok(&[
        "query",
        "--url",
        &base,
        "wallet-allowlist",
        "--sql",
        "SELECT wallet_address FROM allowlist ORDER BY 1 LIMIT 1",
    ]));
    assert_eq!(rows, json!([{"wallet_address": "0xA1"}]));
    // And the local guest query, from the files.
    let answer = json(&run_ok(&[
        "query",
        "--config",
        &ws.config_str(),
        "wallet-allowlist",
        "--request",
        r#"{"wallet_address":"0xB2"}"#,
    ]));
    assert_eq!(answer, json!({"allowlisted": true, "user_id": "user-2"}));
}

/// Parse the Prometheus/OpenMetrics text format into sample → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line == "# EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(name.to_string(), value);
    }
    samples
}

#[test]
fn metrics_are_prometheus_text_and_count_what_happened() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    let lines: Vec<String> = (0..20)
        .map(|i| cloud_event(&format!("m{i}"), if i == 7 { "poison" } else { "t" }, json!(i)))
        .collect();
    post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &lines.join("\n"));
    ws.wait_caught_up(20, WAIT);
    let (status, text) = get(&format!("{base}/metrics"));
    assert_eq!(status, 200);
    let m = parse_metrics(&text);
    let r = r#"{projection="recorder"}"#;
    assert_eq!(m[&format!("projector_events_processed_total{r}")], 19.0);
    assert_eq!(m[&format!("projector_lag{r}")], 0.0);
    assert_eq!(m[&format!("projector_dead_letters{r}")], 1.0);
    assert_eq!(m[&format!("projector_module_swaps_total{r}")], 0.0);
    assert!(m[r#"projector_guest_errors_total{projection="recorder",kind="reject"}"#] >= 1.0);
    assert!(m["projector_batch_seconds_count"] >= 2.0);
    assert_eq!(m[r#"projector_lag{projection="wallet-allowlist"}"#], 0.0);
}

#[test]
fn bad_requests_get_a_json_4xx_and_change_nothing() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start_with(&["--max-body-kib", "1"]);
    let base = host.url();
    let events = format!("{base}/streams/wallets/events");
    let big = format!("[{}]", vec![cloud_event("big", "t", json!("x".repeat(100))); 20].join(","));
    let cases: Vec<(String, &str, String, u16, &str)> = vec![
        (events.clone(), "application/cloudevents+json", "{not json".into(), 400, "invalid JSON"),
        (
            events.clone(),
            "application/cloudevents+json",
            r#"{"specversion":"1.0","id":"x","source":"s"}"#.into(),
            400,
            "missing required attribute `type`",
        ),
        (
            events.clone(),
            "application/cloudevents-batch+json",
            format!("[{}, 5]", cloud_event("ok", "t", json!(1))),
            400,
            "event 2: not a CloudEvent",
        ),
        (
            events.clone(),
            "application/x-ndjson",
            format!("{}\n{{\"specversion\":\"2.0\"}}\n", cloud_event("ok2", "t", json!(1))),
            400,
            "request body: line 2",
        ),
        (events.clone(), "text/plain", cloud_event("ok3", "t", json!(1)), 415, "unsupported content type"),
        (
            format!("{base}/streams/bad%20name/events"),
            "application/cloudevents+json",
            cloud_event("ok4", "t", json!(1)),
            400,
            "invalid stream name",
        ),
        (events.clone(), "application/cloudevents-batch+json", big, 413, "over the server's limit"),
        (
            format!("{base}/projections/nope/query"),
            "application/json",
            "{}".into(),
            404,
            "no projection named \"nope\"",
        ),
        (
            format!("{base}/projections/recorder/sql"),
            "application/json",
            "{\"sql\": 5}".into(),
            422,
            "invalid type",
        ),
        (
            format!("{base}/projections/recorder/dead-letters/discard"),
            "application/json",
            r#"{"ids": ["missing"]}"#.into(),
            400,
            "no dead letter with id missing",
        ),
        (format!("{base}/nowhere"), "application/json", "{}".into(), 404, "no such endpoint"),
    ];
    for (url, content_type, body, expected_status, expected) in cases {
        let (status, answer, _) = post(&url, content_type, &body);
        assert_eq!(status, expected_status, "{url} {content_type}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{url}: no JSON error: {answer}"));
        assert!(error.contains(expected), "{url} {content_type}: {error:?} should mention {expected:?}");
    }
    assert!(!ws.data().join("events.db").exists() || head(&ws) == 0, "nothing was appended");
}

#[test]
fn pause_holds_processing_and_resume_catches_up() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    let (status, body, _) = post(&format!("{base}/projections/recorder/pause"), "application/json", "");
    assert_eq!((status, body), (200, json!({"paused": true})));
    wait_until(WAIT, "recorder paused", || ws.status_of("recorder")["state"] == "paused");
    let lines: Vec<String> = (0..10).map(|i| cloud_event(&format!("p{i}"), "t", json!(i))).collect();
    post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &lines.join("\n"));
    wait_until(WAIT, "the allowlist to catch up", || ws.status_of("wallet-allowlist")["checkpoint"] == 10);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ws.status_of("recorder")["checkpoint"], 0, "a paused projection does not process");
    post(&format!("{base}/projections/recorder/resume"), "application/json", "");
    ws.wait_caught_up(10, WAIT);
    assert_eq!(ws.status_of("recorder")["state"], "running");
}

#[test]
fn dead_letters_over_http_and_url() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    let lines = [cloud_event("ok", "t", json!(1)), cloud_event("bad", "poison", json!(2))];
    post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &lines.join("\n"));
    ws.wait_caught_up(2, WAIT);
    let (status, body) = get(&format!("{base}/projections/recorder/dead-letters"));
    assert_eq!(status, 200);
    let letters: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(letters[0]["id"], "bad");
    assert_eq!(letters[0]["reason"], "poison event bad");
    let listed = json(&run_ok(&["dead-letters", "list", "--url", &base, "recorder"]));
    assert_eq!(listed[0]["id"], "bad");
    let retried = json(&run_ok(&["dead-letters", "retry", "--url", &base, "recorder", "bad"]));
    assert_eq!(retried["failed"][0]["reason"], "poison event bad");
    let discarded = json(&run_ok(&["dead-letters", "discard", "--url", &base, "recorder", "bad"]));
    assert_eq!(discarded, json!({"discarded": 1}));
    let (_, body) = get(&format!("{base}/projections/recorder/dead-letters"));
    assert_eq!(body, "[]");
}

#[test]
fn eight_readers_get_right_answers_while_200k_events_are_ingested() {
    let ws = Workspace::new();
    ws.write_config(&[("wallet-allowlist", &guest("wallet_allowlist"), &["wallets"])]);
    let host = ws.start();
    let base = host.url();
    let seed =
        std::fs::read_to_string(root().join("projections/wallet-allowlist/fixtures/seed.jsonl")).unwrap();
    post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &seed);
    ws.wait_caught_up(10, WAIT);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (base, stop) = (base.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut answered = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // 0xA1 is allowlisted by the seed and stays so; 0xB1 never is.
                    let (wallet, expected) = if i % 2 == 0 {
                        ("0xA1", json!({"allowlisted": true, "user_id": "user-1"}))
                    } else {
                        ("0xB1", json!({"allowlisted": false, "user_id": null}))
                    };
                    let (status, answer, _) = post(
                        &format!("{base}/projections/wallet-allowlist/query"),
                        "application/json",
                        &json!({"wallet_address": wallet}).to_string(),
                    );
                    assert_eq!((status, &answer), (200, &expected), "reader {i}");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    // 200k events in chunks of 10k, over HTTP, while the readers read.
    let events = wallet_events(200_000, 20_000, "load");
    for chunk in events.chunks(10_000) {
        let (status, body, _) =
            post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &chunk.join("\n"));
        assert_eq!(status, 200, "{body}");
    }
    ws.wait_caught_up(200_010, Duration::from_secs(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(answered >= 8, "every reader answered at least once ({answered} answers)");
}
