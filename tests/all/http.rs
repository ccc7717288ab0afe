//! The HTTP API of a real `run` through a real HTTP client: ingest in every
//! content type, reads, metrics, bad requests, pause/resume, dead letters,
//! correlation ids, `--url`, and reads under concurrent ingest.

use crate::util::*;
use serde_json::{Value, json};
use std::time::Duration;

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

/// Start `run` over [`two_projections`] and ingest one good event and one
/// the recorder parks (id `bad`); returns the host and its base URL.
fn start_with_a_dead_letter(ws: &Workspace) -> (Host, String) {
    two_projections(ws);
    let host = ws.start();
    let base = host.url();
    let lines = [cloud_event("ok", "t", json!(1)), cloud_event("bad", "poison", json!(2))];
    post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &lines.join("\n"));
    ws.wait_caught_up(2, WAIT);
    (host, base)
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
fn ingest_takes_binary_mode_the_attributes_in_ce_headers_and_the_body_as_data() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let url = format!("{}/streams/wallets/events", host.url());
    let send = |id: &str, subject: &str, body: &str| {
        let response = ureq::post(&url)
            .config()
            .http_status_as_error(false)
            .build()
            .header("content-type", "application/json")
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-type", "wallet_updated")
            .header("ce-source", "binary-client")
            .header("ce-subject", subject)
            .header("ce-correlationid", "flow-1")
            .send(body)
            .unwrap();
        let status = response.status().as_u16();
        (status, response.into_body().read_to_string().unwrap())
    };
    let body = r#"{"user_id":"u1","wallet_address":"0xB1","created_at":"2026-01-01T00:00:00Z"}"#;
    let (status, answer) = send("bin-1", "caf%C3%A9", body);
    assert_eq!(
        (status, serde_json::from_str::<Value>(&answer).unwrap()),
        (200, json!({"appended": 1, "duplicates": 0}))
    );
    // The same id again is a duplicate, as in structured mode.
    assert_eq!(send("bin-1", "x", body).0, 200);
    assert_eq!(head(&ws), 1);
    let printed = run_ok(&["events", "--data", &ws.data_str(), "wallets"]);
    let event: Value = serde_json::from_str(printed.lines().next().unwrap()).unwrap();
    assert_eq!(
        (&event["id"], &event["type"], &event["source"], &event["subject"], &event["correlationid"]),
        (
            &json!("bin-1"),
            &json!("wallet_updated"),
            &json!("binary-client"),
            &json!("café"),
            &json!("flow-1")
        )
    );
    assert_eq!(event["data"], serde_json::from_str::<Value>(body).unwrap(), "the body is the data");
    // A binary-mode event missing a required attribute names it.
    let response = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .header("ce-specversion", "1.0")
        .header("ce-id", "bin-2")
        .send("x")
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let error = response.into_body().read_to_string().unwrap();
    assert!(error.contains("binary-mode") && error.contains("source"), "{error}");
    assert_eq!(head(&ws), 1, "a refused event appends nothing");
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
    // One poisoned event: one reject, however many halvings found it.
    assert_eq!(m[r#"projector_guest_errors_total{projection="recorder",kind="reject"}"#], 1.0);
    assert_eq!(m[&format!("projector_rebuilds_total{r}")], 0.0);
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
    let (_host, base) = start_with_a_dead_letter(&ws);
    let (status, body) = get(&format!("{base}/projections/recorder/dead-letters"));
    assert_eq!(status, 200);
    let letters: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(letters[0]["id"], "bad");
    assert_eq!(letters[0]["reason"], "poison event bad");
    assert_eq!(letters[0]["data"], json!(2), "the parked event's data is shown");
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

/// POST `body` as JSON to `/projections/{projection}/sql`: (status, answer).
fn sql(base: &str, projection: &str, statement: &str) -> (u16, Value) {
    let (status, answer, _) = post(
        &format!("{base}/projections/{projection}/sql"),
        "application/json",
        &json!({ "sql": statement }).to_string(),
    );
    (status, answer)
}

#[test]
fn sql_is_read_only_bounded_in_time_and_never_pins_a_snapshot() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    let events = format!("{base}/streams/wallets/events");
    let first: Vec<String> = (0..3).map(|i| cloud_event(&format!("s{i}"), "t", json!(i))).collect();
    post(&events, "application/x-ndjson", &first.join("\n"));
    ws.wait_caught_up(3, WAIT);

    let refused = [
        "BEGIN",
        "BEGIN IMMEDIATE",
        "SAVEPOINT s",
        "INSERT INTO handled (position, id, stream, type) VALUES (99, 'x', 'x', 'x')",
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA query_only = 0",
        "PRAGMA wal_checkpoint",
    ];
    for statement in refused {
        let (status, answer) = sql(&base, "recorder", statement);
        assert_eq!(status, 400, "{statement}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{statement}: {answer}"));
        assert!(error.contains("the SQL endpoint is read-only"), "{statement}: {error}");
        // Each read after a refusal starts from a clean connection: had the
        // BEGIN got through, this read would open a snapshot that stays.
        assert_eq!(sql(&base, "recorder", "SELECT count(*) AS n FROM handled"), (200, json!([{"n": 3}])));
    }

    // New events are visible to the next read: no connection in the pool
    // is left inside a transaction on an old snapshot.
    let more: Vec<String> = (3..5).map(|i| cloud_event(&format!("s{i}"), "t", json!(i))).collect();
    post(&events, "application/x-ndjson", &more.join("\n"));
    ws.wait_caught_up(5, WAIT);
    for _ in 0..3 {
        assert_eq!(sql(&base, "recorder", "SELECT count(*) AS n FROM handled"), (200, json!([{"n": 5}])));
    }

    // A query with no end is stopped after the time limit, and the
    // connection it ran on serves the next read.
    let started = std::time::Instant::now();
    let (status, answer) = sql(
        &base,
        "recorder",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("was stopped"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(30), "stopped in time: {:?}", started.elapsed());
    assert_eq!(sql(&base, "recorder", "SELECT count(*) AS n FROM handled"), (200, json!([{"n": 5}])));
    assert_eq!(get(&format!("{base}/projections/recorder/state/count")), (200, "5".to_string()));
}

#[test]
fn a_module_query_that_writes_is_refused_and_changes_nothing_whether_it_executes_or_defers() {
    let ws = Workspace::new();
    ws.write_config(&[("hostile", &guest("hostile"), &["h"])]);
    let host = ws.start();
    let base = host.url();
    let lines: Vec<String> = (0..3).map(|i| cloud_event(&format!("q{i}"), "seen", json!(i))).collect();
    post(&format!("{base}/streams/h/events"), "application/x-ndjson", &lines.join("\n"));
    ws.wait_caught_up(3, WAIT);
    let ask = |request: Value| {
        post(&format!("{base}/projections/hostile/query"), "application/json", &request.to_string())
    };
    assert_eq!(ask(json!({})).1, json!({"handled": 3}));

    let forge = "INSERT INTO handled (position, id, type) VALUES (99, 'forged', 'x')";
    for how in ["execute", "defer"] {
        let (status, answer, _) = ask(json!({ how: forge }));
        assert_eq!(status, 400, "{how}: the module's refusal, not a host error: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("attempt to write a readonly database"), "{how}: {error}");
        assert!(error.contains("write state in `handle` or `init`"), "{how}: what to do: {error}");
        if how == "defer" {
            assert!(
                error.starts_with("deferred statement \"INSERT INTO handled"),
                "which statement: {error}"
            );
        }
        // The next query, on the same pool of instances, sees no forged row.
        assert_eq!(ask(json!({})), (200, json!({"handled": 3}), None), "{how}");
    }
    let forged = ws.query("hostile", "SELECT count(*) AS n FROM handled WHERE id = 'forged'");
    assert_eq!(forged, json!([{"n": 0}]));
    // Processing goes on after the refused writes.
    post(&format!("{base}/streams/h/events"), "application/x-ndjson", &cloud_event("q3", "seen", json!(3)));
    ws.wait_caught_up(4, WAIT);
    assert_eq!(ask(json!({})).1, json!({"handled": 4}));
}

#[test]
fn a_query_that_failed_in_the_host_does_not_poison_the_next_one() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    let lines: Vec<String> = (0..4).map(|i| cloud_event(&format!("q{i}"), "t", json!(i))).collect();
    post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &lines.join("\n"));
    ws.wait_caught_up(4, WAIT);
    let ask = || post(&format!("{base}/projections/recorder/query"), "application/json", "{}");
    assert_eq!(ask().0, 200);

    // The host's own read fails while the state table is away: a host
    // error, not the guest's refusal or trap.
    let db = rusqlite::Connection::open(ws.database("recorder")).unwrap();
    db.execute_batch("ALTER TABLE projector_kv RENAME TO projector_kv_away").unwrap();
    let (status, answer, _) = ask();
    assert_eq!(status, 500, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("host"), "{answer}");
    db.execute_batch("ALTER TABLE projector_kv_away RENAME TO projector_kv").unwrap();

    // The instance that failed was dropped, not handed to the next request.
    for _ in 0..3 {
        assert_eq!(ask(), (200, json!({"count": 4}), None));
    }
}

#[test]
fn dead_letter_errors_tell_the_callers_mistake_from_the_hosts_failure() {
    let ws = Workspace::new();
    let (_host, base) = start_with_a_dead_letter(&ws);
    let retry = format!("{base}/projections/recorder/dead-letters/retry");
    let discard = format!("{base}/projections/recorder/dead-letters/discard");

    let mistakes = [
        (format!("{base}/projections/nope/dead-letters/retry"), r#"{"all": true}"#, 404, "no projection"),
        (retry.clone(), r#"{"ids": []}"#, 400, "name the dead letters"),
        (retry.clone(), r#"{"ids": ["bad", "missing"]}"#, 400, "no dead letter with id missing"),
        (discard.clone(), r#"{}"#, 400, "name the dead letters"),
        (discard.clone(), r#"{"all": true}"#, 400, "not \"all\""),
        (discard.clone(), r#"{"ids": ["missing"]}"#, 400, "no dead letter with id missing"),
    ];
    for (url, body, expected_status, expected) in mistakes {
        let (status, answer, _) = post(&url, "application/json", body);
        assert_eq!(status, expected_status, "{url} {body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{url}: {answer}"));
        assert!(error.contains(expected), "{url} {body}: {error:?} should mention {expected:?}");
    }

    // A writer holding the projection's database: the host cannot act, and
    // says so with a 503 rather than blaming the request.
    let blocker = rusqlite::Connection::open(ws.database("recorder")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, answer, _) = post(&retry, "application/json", r#"{"ids": ["bad"]}"#);
    assert_eq!(status, 503, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("busy"), "{answer}");
    blocker.execute_batch("ROLLBACK").unwrap();

    // Nothing changed, and the same request now goes through.
    let (status, answer, _) = post(&retry, "application/json", r#"{"ids": ["bad"]}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["failed"][0]["reason"], "poison event bad");
    let (status, answer, _) = post(&discard, "application/json", r#"{"ids": ["bad"]}"#);
    assert_eq!((status, answer), (200, json!({"discarded": 1})));
}

#[test]
fn a_host_killed_while_paused_shows_as_stopped() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    wait_until(WAIT, "both projections running", || ws.status().iter().all(|s| s["state"] == "running"));
    let (status, _, _) = post(&format!("{base}/projections/recorder/pause"), "application/json", "");
    assert_eq!(status, 200);
    wait_until(WAIT, "recorder paused", || ws.status_of("recorder")["state"] == "paused");
    host.kill();
    let recorder = ws.status_of("recorder");
    assert_eq!(recorder["state"], "stopped", "no host holds it any more: {recorder}");
    assert_eq!(ws.status_of("wallet-allowlist")["state"], "stopped");
}

#[test]
fn rebuild_over_http_is_accepted_and_keeps_the_state() {
    let ws = Workspace::new();
    two_projections(&ws);
    let events: Vec<String> = (0..5_000).map(|i| cloud_event(&format!("r{i}"), "t", json!(i))).collect();
    let file = ws.write_events("events.jsonl", &events);
    ws.append("wallets", &file);
    let host = ws.start();
    let base = host.url();
    ws.wait_caught_up(5_000, WAIT);
    let counts = "SELECT count(*) AS n, count(DISTINCT position) AS d FROM handled";
    let complete = json!([{"n": 5000, "d": 5000}]);
    assert_eq!(sql(&base, "recorder", counts), (200, complete.clone()));

    let (status, answer, _) = post(&format!("{base}/projections/recorder/rebuild"), "application/json", "");
    assert_eq!((status, answer), (202, json!({"rebuild": "requested"})));
    // Under way (status says so) or already done (the pointer moved on).
    let mut saw_rebuilding = false;
    wait_until(WAIT, "the rebuild to take over", || {
        saw_rebuilding |= ws.status_of("recorder")["state"] == "rebuilding";
        ws.database("recorder").ends_with("recorder.1.db")
    });
    wait_until(WAIT, "the rebuilt projection to run", || ws.status_of("recorder")["state"] == "running");
    assert!(host.logs().contains("rebuild requested"), "{}", host.logs());
    eprintln!("saw the rebuild under way: {saw_rebuilding}");

    // The state is whole, and HTTP reads are served from the new file.
    ws.wait_caught_up(5_000, WAIT);
    assert_eq!(ws.query("recorder", counts), complete);
    assert_eq!(sql(&base, "recorder", counts), (200, complete));
    assert_eq!(get(&format!("{base}/projections/recorder/state/count")), (200, "5000".to_string()));
    assert!(!ws.data().join("projections/recorder.db").exists(), "the old generation is removed");
}

#[test]
fn an_unknown_projection_is_a_404_on_every_route() {
    let ws = Workspace::new();
    two_projections(&ws);
    let host = ws.start();
    let base = host.url();
    let posts = ["pause", "resume", "rebuild", "query", "sql", "dead-letters/retry", "dead-letters/discard"];
    for route in posts {
        let body = if route == "sql" { r#"{"sql": "SELECT 1"}"# } else { "{}" };
        let (status, answer, _) = post(&format!("{base}/projections/nope/{route}"), "application/json", body);
        assert_eq!(status, 404, "POST {route}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("POST {route}: {answer}"));
        assert!(error.contains("no projection named \"nope\""), "POST {route}: {error}");
    }
    for route in ["", "/state/count", "/dead-letters"] {
        let (status, body) = get(&format!("{base}/projections/nope{route}"));
        assert_eq!(status, 404, "GET {route}: {body}");
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("GET {route}: {body}"));
        assert!(answer["error"].as_str().unwrap().contains("no projection named \"nope\""), "{answer}");
    }
    assert!(!ws.data().join("projections/nope.rebuild").exists(), "no rebuild request for nothing");
}

#[test]
fn listen_addr_is_never_seen_half_written() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let addr_file = ws.data().join("listen.addr");
    for _ in 0..5 {
        let host = ws.start();
        // Read as fast as possible while the host starts: the file is
        // either absent or a whole address.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let address = loop {
            assert!(std::time::Instant::now() < deadline, "the host never wrote {}", addr_file.display());
            match std::fs::read_to_string(&addr_file) {
                Ok(text) => {
                    let address: std::net::SocketAddr =
                        text.parse().unwrap_or_else(|err| panic!("listen.addr read as {text:?}: {err}"));
                    break address;
                }
                Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::NotFound),
            }
        };
        assert_eq!(host.url(), format!("http://{address}"));
        assert!(host.terminate().success());
    }
    let leftovers: Vec<_> = std::fs::read_dir(ws.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("listen.addr") && name != "listen.addr")
        .collect();
    assert!(leftovers.is_empty(), "no partial files left: {leftovers:?}");
}

#[test]
fn dead_letters_list_shows_the_payload_from_the_files_too() {
    let ws = Workspace::new();
    let (_host, _base) = start_with_a_dead_letter(&ws);
    let listed = json(&run_ok(&["dead-letters", "list", "--config", &ws.config_str(), "recorder"]));
    assert_eq!(listed[0]["id"], "bad");
    assert_eq!(listed[0]["data"], json!(2));
}
