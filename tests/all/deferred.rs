//! Deferred writes (`Sql::defer`): they take effect exactly once with the
//! batch, and one that fails when it runs parks its event as a dead letter
//! with the statement's error while every other event applies.

use crate::util::*;
use serde_json::json;

fn tick(id: &str, event_type: &str, key: &str) -> String {
    let mut event: serde_json::Value = serde_json::from_str(&cloud_event(id, event_type, json!({}))).unwrap();
    event["subject"] = key.into();
    event.to_string()
}

#[test]
fn a_deferred_write_that_fails_parks_its_event_and_the_rest_apply() {
    let ws = Workspace::new();
    ws.write_config(&[("counter", &guest("counter"), &["ticks"])]);
    let mut lines: Vec<String> =
        (0..3_000).map(|i| tick(&format!("t-{i}"), "tick", &format!("k-{}", i % 7))).collect();
    // In the middle of batches, so the host must split them to find each.
    lines.insert(1_234, tick("bad-1", "bad", "k-bad"));
    lines.insert(2_500, tick("bad-2", "bad", "k-bad"));
    ws.append("ticks", &ws.write_events("ticks.jsonl", &lines));

    run_ok(&["rebuild", "--config", &ws.config_str(), "counter"]);

    let counts =
        ws.query("counter", "SELECT count(*) AS keys, sum(n) AS total, max(key) AS last FROM counts");
    assert_eq!(counts, json!([{"keys": 7, "total": 3_000, "last": "k-6"}]), "every tick once, no bad key");
    let letters = json(&run_ok(&["dead-letters", "list", "--config", &ws.config_str(), "counter"]));
    let letters = letters.as_array().unwrap();
    let ids: Vec<&str> = letters.iter().map(|letter| letter["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["bad-1", "bad-2"], "{letters:?}");
    for letter in letters {
        let reason = letter["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("deferred statement \"INSERT INTO counts (key, n) VALUES (?1, NULL)\" failed")
                && reason.contains("NOT NULL constraint failed: counts.n"),
            "the reason names the statement and its error: {letter}"
        );
    }
    assert_eq!(ws.status_of("counter")["checkpoint"], 3_002);
}
