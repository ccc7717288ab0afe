//! The allowlist rule, tested natively through the SDK harness.

use projector_sdk::testing::Harness;
use projector_sdk::{Event, Failure};
use serde_json::{Value, json};
use wallet_allowlist::WalletAllowlist;

fn wallet(user: &str, address: &str) -> Event {
    Event::json(
        "wallet_updated",
        &json!({"user_id": user, "wallet_address": address, "created_at": "2026-01-01T00:00:00Z"}),
    )
}

fn kyc(user: &str) -> Event {
    Event::json("kyc_verified", &json!({"user_id": user, "kyc_verified_at": "2026-01-02T00:00:00Z"}))
}

fn allowlist(harness: &Harness<WalletAllowlist>) -> Vec<(String, String)> {
    harness
        .rows("SELECT wallet_address, user_id FROM allowlist ORDER BY wallet_address")
        .iter()
        .map(|row| (row[0].as_str().unwrap().to_string(), row[1].as_str().unwrap().to_string()))
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected.iter().map(|(w, u)| (w.to_string(), u.to_string())).collect()
}

#[test]
fn kyc_allowlists_the_current_wallet() {
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle(wallet("u1", "0xA")).unwrap();
    assert!(allowlist(&h).is_empty(), "not verified yet");
    h.handle(kyc("u1")).unwrap();
    assert_eq!(allowlist(&h), pairs(&[("0xA", "u1")]));
}

#[test]
fn a_verified_users_new_wallets_are_allowlisted_and_old_ones_stay() {
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle_batch(vec![wallet("u1", "0xA"), kyc("u1"), wallet("u1", "0xB"), wallet("u1", "0xC")]).unwrap();
    assert_eq!(allowlist(&h), pairs(&[("0xA", "u1"), ("0xB", "u1"), ("0xC", "u1")]));
}

#[test]
fn a_wallet_replaced_before_kyc_is_never_allowlisted() {
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle_batch(vec![wallet("u1", "0xOld"), wallet("u1", "0xNew"), kyc("u1")]).unwrap();
    assert_eq!(allowlist(&h), pairs(&[("0xNew", "u1")]));
}

#[test]
fn kyc_before_any_wallet_allowlists_the_first_wallet() {
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle_batch(vec![kyc("u1"), wallet("u1", "0xA")]).unwrap();
    assert_eq!(allowlist(&h), pairs(&[("0xA", "u1")]));
}

#[test]
fn repeated_kyc_keeps_the_first_verification_time() {
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle(kyc("u1")).unwrap();
    let later =
        Event::json("kyc_verified", &json!({"user_id": "u1", "kyc_verified_at": "2030-01-01T00:00:00Z"}));
    h.handle(later).unwrap();
    let rows = h.rows("SELECT kyc_verified_at FROM users WHERE user_id = 'u1'");
    assert_eq!(rows.first().unwrap()[0].as_str(), Some("2026-01-02T00:00:00Z"));
}

#[test]
fn other_event_types_are_ignored() {
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle(Event::new("profile_renamed", "not even json")).unwrap();
    assert!(h.rows("SELECT * FROM users").is_empty());
}

#[test]
fn events_it_can_never_apply_are_rejected_with_a_reason_and_change_nothing() {
    let cases = [
        ("wallet_updated", json!("a string, not an object"), "invalid type"),
        ("wallet_updated", json!({"user_id": "u1"}), "missing field `wallet_address`"),
        ("wallet_updated", json!({"wallet_address": "0xA"}), "missing field `user_id`"),
        ("wallet_updated", json!({"user_id": 7, "wallet_address": "0xA"}), "invalid type: integer `7`"),
        ("wallet_updated", json!({"user_id": "u1", "wallet_address": null}), "invalid type: null"),
        ("kyc_verified", json!([1, 2]), "invalid type"),
        ("kyc_verified", json!({}), "missing field `user_id`"),
    ];
    for (event_type, data, expected) in cases {
        let mut h = Harness::<WalletAllowlist>::new();
        h.handle(kyc("u1")).unwrap();
        // The bad event comes after a good one in the same batch: the whole
        // batch rolls back, as in the host.
        let result = h.handle_batch(vec![wallet("u1", "0xGood"), Event::json(event_type, &data)]);
        match result {
            Err(Failure::Reject(reason)) => assert!(
                reason.contains(expected),
                "{event_type} {data}: reason {reason:?} should mention {expected:?}"
            ),
            other => panic!("{event_type} {data}: expected a reject, got {other:?}"),
        }
        assert!(allowlist(&h).is_empty(), "{event_type} {data}: a rejected batch changed state");
    }
}

#[test]
fn data_that_is_not_json_is_rejected() {
    let mut h = Harness::<WalletAllowlist>::new();
    let result = h.handle(Event::new("kyc_verified", "{not json").with_id("e-bad"));
    let Err(Failure::Reject(reason)) = result else { panic!("expected a reject, got {result:?}") };
    assert!(reason.contains("e-bad"), "the reason names the event: {reason}");
}

#[test]
fn query_answers_whether_a_wallet_is_allowlisted() {
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle_batch(vec![wallet("u1", "0xA"), kyc("u1"), wallet("u2", "0xB")]).unwrap();
    let ask = |address: &str| -> Value {
        let answer = h.query(json!({"wallet_address": address}).to_string().as_bytes()).unwrap();
        serde_json::from_slice(&answer).unwrap()
    };
    assert_eq!(ask("0xA"), json!({"allowlisted": true, "user_id": "u1"}));
    assert_eq!(ask("0xB"), json!({"allowlisted": false, "user_id": null}));
    let bad = h.query(b"{}").unwrap_err();
    assert!(bad.contains("wallet_address"), "{bad}");
}

#[test]
fn the_seed_fixture_builds_the_expected_allowlist() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let events: Vec<Event> = std::fs::read_to_string(format!("{fixtures}/seed.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let ce: Value = serde_json::from_str(line).unwrap();
            Event::json(ce["type"].as_str().unwrap(), &ce["data"])
                .with_id(ce["id"].as_str().unwrap())
                .with_time(ce["time"].as_str().unwrap())
        })
        .collect();
    let mut h = Harness::<WalletAllowlist>::new();
    h.handle_batch(events).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{fixtures}/expected-allowlist.json")).unwrap(),
    )
    .unwrap();
    let actual: Vec<Value> = h
        .rows("SELECT wallet_address, user_id, allowlisted_at FROM allowlist ORDER BY wallet_address")
        .iter()
        .map(|row| json!({"wallet_address": row[0].as_str(), "user_id": row[1].as_str(), "allowlisted_at": row[2].as_str()}))
        .collect();
    assert_eq!(Value::Array(actual), expected);
}
