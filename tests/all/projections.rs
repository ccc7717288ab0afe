//! The shipped projections (user-view, wallet-ledger, order-fees) through
//! the real binary and their wasm modules: `projector replay` of each
//! scenario fixture builds the expected tables and parks the expected dead
//! letters, the state `projector rebuild` builds from the appended log
//! answers every expected `query` and holds the expected outbox, and
//! `projector run` SIGKILLed mid-stream builds the same state and publishes
//! each emitted event once.

use crate::util::*;
use serde_json::{Value, json};
use std::path::PathBuf;

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

/// Events of a type the projections ignore, put before each scenario event
/// so that a kill lands between two of them.
const NOISE: usize = 2000;

/// `projector run` over the scenario spread among [`NOISE`], in batches of
/// 50, SIGKILLed once a third of the way and started again: the state it
/// builds answers every expected query, holds the expected rows and dead
/// letters, and each event it emitted is in the log once, with its cause.
fn run_survives_a_sigkill_mid_stream(fixture: &Fixture, module: &str) {
    let ws = Workspace::new();
    let (name, stream) = (fixture.str("projection"), fixture.str("stream"));
    let config = format!(
        "version = 1\ndata = \"data\"\n\n[[projection]]\nname = {name:?}\nmodule = {:?}\n\
         streams = [{stream:?}]\nbatch_size = 50\n",
        guest(module).to_string_lossy()
    );
    std::fs::write(ws.config(), config).unwrap();
    let scenario = std::fs::read_to_string(fixture.scenario()).unwrap();
    let mut lines = Vec::new();
    for (i, line) in scenario.lines().enumerate() {
        lines.extend((0..NOISE).map(|j| cloud_event(&format!("noise-{i}-{j}"), "noise", json!({"n": j}))));
        lines.push(line.to_string());
    }
    let (appended, _) = ws.append(stream, &ws.write_events("spread.jsonl", &lines));

    let host = ws.start();
    let target = appended / 3;
    wait_until(std::time::Duration::from_secs(60), &format!("{name} past {target}"), || {
        ws.checkpoint(name) >= target
    });
    host.kill();
    let killed_at = ws.checkpoint(name);
    assert!(killed_at < appended, "the kill landed mid-stream (checkpoint {killed_at} of {appended})");
    let host = ws.start();
    wait_until(std::time::Duration::from_secs(60), &format!("{name} caught up, its outbox empty"), || {
        let status = ws.status_of(name);
        status["checkpoint"].as_u64() >= Some(appended) && status["lag"] == 0 && status["outbox"] == 0
    });

    for case in fixture.expected["queries"].as_array().unwrap() {
        let request = case["request"].to_string();
        let answer = json(&run_ok(&["query", "--config", &ws.config_str(), name, "--request", &request]));
        assert_eq!(answer, case["answer"], "{name}: request {request} (killed at {killed_at})");
    }
    assert_eq!(ws.query(name, fixture.str("sql")), fixture.expected["rows"], "{name}: killed at {killed_at}");
    let parked = ws.query(name, "SELECT id FROM projector_dead_letters ORDER BY position");
    let parked: Vec<&Value> = parked.as_array().unwrap().iter().map(|row| &row["id"]).collect();
    assert_eq!(json!(parked), fixture.expected["dead_letters"], "{name}: killed at {killed_at}");

    // What it emitted, read back from the log: once each, with its cause.
    // (Ids name the causing event's position, which the noise moved.)
    let expected = fixture.expected["emitted"].as_array().unwrap();
    let mut streams: Vec<&str> = expected.iter().map(|e| e["stream"].as_str().unwrap()).collect();
    streams.dedup();
    let published: Vec<Value> = streams.iter().flat_map(|s| ws.events(s)).collect();
    let mut ids: Vec<&str> = published.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), published.len(), "{name}: an id published twice: {published:?}");
    let published: Vec<Value> = published
        .iter()
        .map(|e| {
            json!({"type": e["type"], "subject": e["subject"], "data": e["data"],
                   "correlation_id": e["correlationid"], "causation_id": e["causationid"], "source": e["source"]})
        })
        .collect();
    let expected: Vec<Value> = expected
        .iter()
        .map(|e| {
            json!({"type": e["type"], "subject": e["subject"], "data": e["data"],
                   "correlation_id": e["correlation_id"], "causation_id": e["causation_id"], "source": e["source"]})
        })
        .collect();
    assert_eq!(published, expected, "{name}: killed at {killed_at}");
    drop(host);
}

#[test]
fn user_view_replays_its_scenario() {
    let fixture = Fixture::of("user-view");
    replay_builds_the_expected_tables(&fixture, "user_view");
    the_built_state_answers_the_expected_queries(&fixture, "user_view");
}

#[test]
fn user_view_survives_a_sigkill_mid_stream() {
    run_survives_a_sigkill_mid_stream(&Fixture::of("user-view"), "user_view");
}

#[test]
fn wallet_ledger_replays_its_scenario() {
    let fixture = Fixture::of("wallet-ledger");
    replay_builds_the_expected_tables(&fixture, "wallet_ledger");
    the_built_state_answers_the_expected_queries(&fixture, "wallet_ledger");
}

#[test]
fn wallet_ledger_survives_a_sigkill_mid_stream() {
    run_survives_a_sigkill_mid_stream(&Fixture::of("wallet-ledger"), "wallet_ledger");
}

#[test]
fn order_fees_replays_its_scenario_and_emits_one_charge_per_approved_order() {
    let fixture = Fixture::of("order-fees");
    replay_builds_the_expected_tables(&fixture, "order_fees");
    the_built_state_answers_the_expected_queries(&fixture, "order_fees");
}

#[test]
fn order_fees_survives_a_sigkill_mid_stream_and_charges_each_order_once() {
    run_survives_a_sigkill_mid_stream(&Fixture::of("order-fees"), "order_fees");
}
