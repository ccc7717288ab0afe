//! `projector replay`: the seed fixture through the real wasm guest (as a
//! core module and as a ready component), repeated ids, bad event files, and
//! modules that are not projections.

use crate::util::*;
use serde_json::{Value, json};

const ALLOWLIST_SQL: &str =
    "SELECT wallet_address, user_id, allowlisted_at FROM allowlist ORDER BY wallet_address";

fn fixture(name: &str) -> String {
    root().join("projections/wallet-allowlist/fixtures").join(name).to_string_lossy().into_owned()
}

fn expected_allowlist() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected-allowlist.json")).unwrap()).unwrap()
}

#[test]
fn replaying_the_seed_fixture_builds_the_expected_allowlist() {
    let module = guest("wallet_allowlist");
    for batch in ["1", "3", "1000"] {
        let out = run_ok(&[
            "replay",
            "--module",
            module.to_str().unwrap(),
            "--events",
            &fixture("seed.jsonl"),
            "--sql",
            ALLOWLIST_SQL,
            "--batch",
            batch,
        ]);
        assert_eq!(json(&out), expected_allowlist(), "with --batch {batch}");
    }
}

#[test]
fn replay_prints_the_key_value_state_by_default() {
    let ws = Workspace::new();
    let events = ws.write_events(
        "events.jsonl",
        &[cloud_event("a", "x", json!(1)), cloud_event("b", "y", json!(2)), cloud_event("c", "x", json!(3))],
    );
    let out = run_ok(&["replay", "--module", guest("event_recorder").to_str().unwrap(), "--events", &events]);
    assert_eq!(json(&out), json!({"count": 3}));
}

#[test]
fn a_repeated_event_id_is_applied_once() {
    let ws = Workspace::new();
    let seed = std::fs::read_to_string(fixture("seed.jsonl")).unwrap();
    // The outbox retried every publish: each event arrives twice.
    let twice: Vec<String> = seed.lines().flat_map(|l| [l.to_string(), l.to_string()]).collect();
    let events = ws.write_events("twice.jsonl", &twice);
    let module = guest("wallet_allowlist");
    let out = projector()
        .args(["replay", "--module", module.to_str().unwrap(), "--events", &events, "--sql", ALLOWLIST_SQL])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap()), expected_allowlist());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("skipped 10 events whose id came earlier"), "{stderr}");

    let recorder = guest("event_recorder");
    let out = run_ok(&["replay", "--module", recorder.to_str().unwrap(), "--events", &events]);
    assert_eq!(json(&out), json!({"count": 10}));
}

#[test]
fn a_bad_line_in_the_events_file_names_the_line_and_attribute() {
    let ws = Workspace::new();
    let events = ws.write_events(
        "bad.jsonl",
        &[
            cloud_event("a", "x", json!(1)),
            r#"{"specversion":"1.0","id":"b","source":"tests","data":{}}"#.to_string(),
        ],
    );
    let err =
        run_err(&["replay", "--module", guest("event_recorder").to_str().unwrap(), "--events", &events]);
    assert!(err.contains("bad.jsonl: line 2: missing required attribute `type`"), "{err}");
}

#[test]
fn a_file_that_is_not_wasm_is_refused_clearly() {
    let ws = Workspace::new();
    let module = ws.path("module.wasm");
    std::fs::write(&module, "this is not wasm").unwrap();
    let events = ws.write_events("e.jsonl", &[cloud_event("a", "x", json!(1))]);
    let err = run_err(&["replay", "--module", module.to_str().unwrap(), "--events", &events]);
    assert!(err.contains("is not a WebAssembly file"), "{err}");
    assert!(err.contains("module.wasm"), "the error names the file: {err}");
}

#[test]
fn a_wasm_that_does_not_implement_the_world_is_refused_clearly() {
    let ws = Workspace::new();
    let events = ws.write_events("e.jsonl", &[cloud_event("a", "x", json!(1))]);
    let cases = [
        // A core module with no component type: not built with the SDK.
        (
            "core.wasm",
            wat::parse_str(r#"(module (func (export "handle")))"#).unwrap(),
            "does not implement the projection world",
        ),
        // A component of another world: exports nothing the host needs.
        ("component.wasm", wat::parse_str("(component)").unwrap(), "does not implement the projection world"),
        // A component that imports something the world does not provide.
        (
            "imports.wasm",
            wat::parse_str(r#"(component (import "read-file" (func (param "path" string))))"#).unwrap(),
            "imports something the projection world does not provide",
        ),
    ];
    for (name, bytes, expected) in cases {
        let module = ws.path(name);
        std::fs::write(&module, bytes).unwrap();
        let err = run_err(&["replay", "--module", module.to_str().unwrap(), "--events", &events]);
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains(name), "{name}: the error names the file: {err}");
    }
}

#[test]
fn a_rejected_event_is_parked_and_every_other_event_applied() {
    let ws = Workspace::new();
    let events = ws.write_events(
        "e.jsonl",
        &[
            cloud_event("a", "x", json!(1)),
            cloud_event("b", "poison", json!(2)),
            cloud_event("c", "x", json!(3)),
            cloud_event("d", "panic", json!(4)),
            cloud_event("e", "x", json!(5)),
        ],
    );
    let module = guest("event_recorder");
    let out = projector()
        .args([
            "replay",
            "--module",
            module.to_str().unwrap(),
            "--events",
            &events,
            "--sql",
            "SELECT id FROM handled ORDER BY position",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap()), json!([{"id": "a"}, {"id": "c"}, {"id": "e"}]));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("event b (position 2) parked as a dead letter: poison event b"), "{stderr}");
    assert!(stderr.contains("event d (position 4) parked as a dead letter: module trapped"), "{stderr}");
}

#[test]
fn wallet_allowlist_parks_exactly_the_events_it_can_never_apply() {
    let ws = Workspace::new();
    let mut lines: Vec<String> =
        std::fs::read_to_string(fixture("seed.jsonl")).unwrap().lines().map(String::from).collect();
    lines.insert(3, cloud_event("bad-1", "wallet_updated", json!("not an object")));
    lines.insert(6, cloud_event("bad-2", "wallet_updated", json!({"user_id": "user-1"})));
    lines.push(cloud_event("bad-3", "kyc_verified", json!({"user_id": 42})));
    let events = ws.write_events("e.jsonl", &lines);
    let module = guest("wallet_allowlist");
    let out = projector()
        .args(["replay", "--module", module.to_str().unwrap(), "--events", &events, "--sql", ALLOWLIST_SQL])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap()), expected_allowlist());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let parked: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("replay:") && l.contains("parked")).collect();
    assert_eq!(parked.len(), 3, "{stderr}");
    assert!(parked[0].contains("event bad-1") && parked[0].contains("invalid type: string"), "{stderr}");
    assert!(
        parked[1].contains("event bad-2") && parked[1].contains("missing field `wallet_address`"),
        "{stderr}"
    );
    assert!(
        parked[2].contains("event bad-3") && parked[2].contains("invalid type: integer `42`"),
        "{stderr}"
    );
}

#[test]
fn a_real_module_of_another_world_is_refused_clearly() {
    let ws = Workspace::new();
    let events = ws.write_events("e.jsonl", &[cloud_event("a", "x", json!(1))]);
    // Built from source with wit-bindgen, for a world of its own.
    let module = guest("other_world");
    let out = projector()
        .args(["replay", "--module", module.to_str().unwrap(), "--events", &events])
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("does not implement the projection world"), "{stderr}");
    assert!(stderr.contains("build it with projector-sdk"), "the error says what to do: {stderr}");
    assert!(stderr.contains("other_world.wasm"), "the error names the file: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_ready_component_replays_like_the_core_module() {
    let ws = Workspace::new();
    let core = guest("wallet_allowlist");
    let bytes = std::fs::read(&core).unwrap();
    let component =
        wit_component::ComponentEncoder::default().module(&bytes).unwrap().validate(true).encode().unwrap();
    // The layer field of the preamble: 0 for a core module, 1 for a component.
    assert_eq!(&bytes[4..8], [1, 0, 0, 0], "the build writes a core module");
    assert_eq!(&component[4..8], [0x0d, 0, 1, 0], "the encoder writes a component");
    let component_path = ws.path("wallet_allowlist.component.wasm");
    std::fs::write(&component_path, component).unwrap();

    let replay = |module: &std::path::Path| {
        json(&run_ok(&[
            "replay",
            "--module",
            module.to_str().unwrap(),
            "--events",
            &fixture("seed.jsonl"),
            "--sql",
            ALLOWLIST_SQL,
        ]))
    };
    let from_component = replay(&component_path);
    assert_eq!(from_component, replay(&core));
    assert_eq!(from_component, expected_allowlist());
}

#[test]
fn a_module_built_against_the_first_contract_still_loads_and_runs() {
    // The guest's WIT is a frozen copy of projector:projection@0.1.0 from
    // before `emit` was added: the world grew, and this module must not
    // notice.
    let frozen =
        std::fs::read_to_string(root().join("tests/guests/contract-v0_1/wit/projection.wit")).unwrap();
    let current = std::fs::read_to_string(root().join("guest-sdk/wit/projection.wit")).unwrap();
    assert!(frozen.contains("package projector:projection@0.1.0;") && !frozen.contains("interface emit"));
    assert!(current.contains("package projector:projection@0.1.0;") && current.contains("import emit;"));

    let ws = Workspace::new();
    let events = ws.write_events(
        "e.jsonl",
        &[cloud_event("a", "x", json!(1)), cloud_event("b", "y", json!(2)), cloud_event("c", "x", json!(3))],
    );
    let module = guest("contract_v0_1");
    let module = module.to_str().unwrap();
    let rows = run_ok(&[
        "replay",
        "--module",
        module,
        "--events",
        &events,
        "--sql",
        "SELECT id, type FROM handled ORDER BY position",
    ]);
    assert_eq!(
        json(&rows),
        json!([{"id": "a", "type": "x"}, {"id": "b", "type": "y"}, {"id": "c", "type": "x"}])
    );
    assert_eq!(json(&run_ok(&["replay", "--module", module, "--events", &events])), json!({"count": 3}));

    // And its `query` export answers through the host.
    ws.write_config(&[("old", std::path::Path::new(module), &["events"])]);
    ws.append("events", &events);
    run_ok(&["rebuild", "--config", &ws.config_str(), "old"]);
    let answer = run_ok(&["query", "--config", &ws.config_str(), "old", "--request", "{}"]);
    assert_eq!(json(&answer), json!({"count": 3}));
}

#[test]
fn replay_answers_a_request_to_the_modules_query() {
    let dir = root().join("projections/user-view/fixtures");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let events = dir.join("scenario.jsonl");
    let module = guest("user_view");
    let queries = expected["queries"].as_array().unwrap();
    assert!(!queries.is_empty());
    for q in queries {
        let out = run_ok(&[
            "replay",
            "--module",
            module.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--stream",
            "users",
            "--request",
            &q["request"].to_string(),
        ]);
        assert_eq!(json(&out), q["answer"], "for {}", q["request"]);
    }
    // A request the module refuses fails the command with its reason.
    let err = run_err(&[
        "replay",
        "--module",
        module.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--stream",
        "users",
        "--request",
        "not json",
    ]);
    assert!(err.contains("the module refused the request not json"), "{err}");
}
