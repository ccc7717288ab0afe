//! The scenario fixture (`fixtures/scenario.jsonl`), replayed natively as
//! the host would deliver it (one batch, repeated ids dropped by the log,
//! rejected events parked), gives the answers, dead letters and emitted
//! events `fixtures/expected.json` lists. `tests/all/projections.rs` in the
//! workspace replays the same files through the module in the real binary.

use projector_sdk::testing::{Harness, read_cloudevents};
use serde_json::{Value, json};
use user_view::UserView;

#[test]
fn the_scenario_gives_the_expected_answers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let scenario = std::fs::read_to_string(dir.join("scenario.jsonl")).unwrap();
    let events = read_cloudevents(&scenario, expected["stream"].as_str().unwrap()).unwrap();

    let mut h = Harness::<UserView>::new().with_name(expected["projection"].as_str().unwrap());
    let parked = h.process_batch(events).unwrap();
    let parked: Vec<&str> = parked.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(json!(parked), expected["dead_letters"]);
    for case in expected["queries"].as_array().unwrap() {
        let answer: Value = h.query_json(&case["request"]).unwrap();
        assert_eq!(answer, case["answer"], "request {}", case["request"]);
    }
    let emitted: Vec<Value> = h
        .emitted()
        .iter()
        .map(|e| {
            json!({
                "id": e.id, "stream": e.stream, "type": e.event_type, "subject": e.subject, "data": e.json(),
                "correlation_id": e.correlation_id, "causation_id": e.causation_id, "source": e.source,
            })
        })
        .collect();
    assert_eq!(json!(emitted), expected["emitted"]);
}
