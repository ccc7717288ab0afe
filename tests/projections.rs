//! The shipped projections (user-view, wallet-ledger, order-fees) through
//! the real binary and their wasm modules: `projector replay` of each
//! scenario fixture builds the expected tables and parks the expected dead
//! letters, and the state `projector rebuild` builds from the appended log
//! answers every expected `query` and holds the expected outbox.

mod util;

use serde_json::{Value, json};
use std::path::PathBuf;
use util::*;

/// A projection's fixtures: `fixtures/scenario.jsonl` and what it must give,
/// `fixtures/expected.json`.
struct Fixture {
    dir: PathBuf,
    expected: Value,
}

impl Fixture {
    fn of(crate_dir: &str) -> Self {
        let dir = root().join("projections").join(crate_dir).join("fixtures");
        let expected = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        Fixture { expected: serde_json::from_str(&expected).unwrap(), dir }
    }
    fn scenario(&self) -> String {
        self.dir.join("scenario.jsonl").to_string_lossy().into_owned()
    }
    fn str(&self, key: &str) -> &str {
        self.expected[key].as_str().unwrap()
    }
}

/// `projector replay` of the scenario, with the expected rows of the
/// fixture's statement and its dead letters, at several batch sizes (a
/// batch holding a rejected event is split to find it).
fn replay_builds_the_expected_tables(fixture: &Fixture, module: &str) {
    let module = guest(module);
    for batch in ["1", "4", "1000"] {
        let replay = |sql: &str| {
            json(&run_ok(&[
                "replay",
                "--module",
                module.to_str().unwrap(),
                "--events",
                &fixture.scenario(),
                "--stream",
                fixture.str("stream"),
                "--sql",
                sql,
                "--batch",
                batch,
            ]))
        };
        assert_eq!(replay(fixture.str("sql")), fixture.expected["rows"], "with --batch {batch}");
        let parked = replay("SELECT id FROM projector_dead_letters ORDER BY position");
        let parked: Vec<&Value> = parked.as_array().unwrap().iter().map(|row| &row["id"]).collect();
        assert_eq!(json!(parked), fixture.expected["dead_letters"], "with --batch {batch}");
        // A batch that failed emitted nothing: each event's emits are
        // there once, whichever batches it was tried in.
        let emitted = replay("SELECT causation_id, type FROM projector_outbox ORDER BY seq");
        let expected: Vec<Value> = fixture.expected["emitted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| json!({"causation_id": e["causation_id"], "type": e["type"]}))
            .collect();
        assert_eq!(emitted, json!(expected), "with --batch {batch}");
    }
}

/// The scenario appended to a data folder's log and built by `projector
/// rebuild`, then asked every expected query with `projector query
/// --request`, and its outbox read.
fn the_built_state_answers_the_expected_queries(fixture: &Fixture, module: &str) {
    let ws = Workspace::new();
    let name = fixture.str("projection");
    ws.write_config(&[(name, &guest(module), &[fixture.str("stream")])]);
    ws.append(fixture.str("stream"), &fixture.scenario());
    run_ok(&["rebuild", "--config", &ws.config_str(), name]);
    for case in fixture.expected["queries"].as_array().unwrap() {
        let request = case["request"].to_string();
        let answer = json(&run_ok(&["query", "--config", &ws.config_str(), name, "--request", &request]));
        assert_eq!(answer, case["answer"], "{name}: request {request}");
    }
    let outbox = ws.query(
        name,
        "SELECT id, stream, type, subject, CAST(data AS TEXT) AS data, correlation_id, causation_id, source, \
         time FROM projector_outbox ORDER BY seq",
    );
    let outbox: Vec<Value> = outbox
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let time = row["time"].as_str().unwrap();
            assert!(time.ends_with('Z') && time.len() == 24, "RFC 3339 in UTC: {time}");
            let mut row = row.clone();
            let object = row.as_object_mut().unwrap();
            object.remove("time");
            let data = object["data"].as_str().unwrap().to_string();
            object.insert("data".into(), serde_json::from_str(&data).unwrap());
            row
        })
        .collect();
    assert_eq!(json!(outbox), fixture.expected["emitted"], "{name}: the outbox");
}

#[test]
fn user_view_replays_its_scenario() {
    let fixture = Fixture::of("user-view");
    replay_builds_the_expected_tables(&fixture, "user_view");
    the_built_state_answers_the_expected_queries(&fixture, "user_view");
}

#[test]
fn wallet_ledger_replays_its_scenario() {
    let fixture = Fixture::of("wallet-ledger");
    replay_builds_the_expected_tables(&fixture, "wallet_ledger");
    the_built_state_answers_the_expected_queries(&fixture, "wallet_ledger");
}

#[test]
fn order_fees_replays_its_scenario_and_emits_one_charge_per_approved_order() {
    let fixture = Fixture::of("order-fees");
    replay_builds_the_expected_tables(&fixture, "order_fees");
    the_built_state_answers_the_expected_queries(&fixture, "order_fees");
}
