//! wallet-ledger's rules, natively: credits and debits, one application per
//! entry id whatever the event id, rejected amounts and missing fields, and
//! overdrafts reported rather than refused.

use projector_sdk::testing::Harness;
use projector_sdk::{Event, Failure, Level};
use serde_json::{Value, json};
use wallet_ledger::{WalletAnswer, WalletLedger};

fn entry(event_type: &str, id: &str, wallet: &str, entry_id: &str, amount: Value) -> Event {
    Event::json(event_type, &json!({"wallet_id": wallet, "entry_id": entry_id, "amount": amount}))
        .with_id(id)
        .with_stream("ledger")
}

fn credit(id: &str, wallet: &str, entry_id: &str, amount: i64) -> Event {
    entry("wallet_credited", id, wallet, entry_id, json!(amount))
}

fn debit(id: &str, wallet: &str, entry_id: &str, amount: i64) -> Event {
    entry("wallet_debited", id, wallet, entry_id, json!(amount))
}

fn ask(h: &Harness<WalletLedger>, wallet: &str) -> WalletAnswer {
    h.query_json(&json!({"wallet_id": wallet})).unwrap()
}

fn answer(balance: i64, entries: i64, overdrawn: bool) -> WalletAnswer {
    WalletAnswer { balance, entries, overdrawn }
}

#[test]
fn credits_and_debits_make_the_balance_and_an_unknown_wallet_is_empty() {
    let mut h = Harness::<WalletLedger>::new();
    h.handle_batch(vec![
        credit("e1", "w1", "c-1", 1000),
        debit("e2", "w1", "d-1", 250),
        credit("e3", "w2", "c-2", 5),
    ])
    .unwrap();
    assert_eq!(ask(&h, "w1"), answer(750, 2, false));
    assert_eq!(ask(&h, "w2"), answer(5, 1, false));
    let unknown: Value = h.query_json(&json!({"wallet_id": "nope"})).unwrap();
    assert_eq!(unknown, json!({"balance": 0, "entries": 0, "overdrawn": false}));
}

#[test]
fn an_entry_is_applied_once_even_republished_under_a_new_event_id() {
    let mut h = Harness::<WalletLedger>::new();
    h.handle(credit("e1", "w1", "c-1", 1000)).unwrap();
    // The publisher's outbox retried with a fresh event id.
    h.handle(credit("e1-retry", "w1", "c-1", 1000)).unwrap();
    // The same event delivered twice.
    h.handle(credit("e1", "w1", "c-1", 1000)).unwrap();
    h.handle_batch(vec![debit("e2", "w1", "d-1", 100), debit("e2-again", "w1", "d-1", 100)]).unwrap();
    assert_eq!(ask(&h, "w1"), answer(900, 2, false));
    assert!(h.logs().is_empty(), "identical republications are not worth a warning: {:?}", h.logs());
    // A republication that disagrees with the first is ignored, and said.
    h.handle(credit("e3", "w1", "c-1", 5)).unwrap();
    assert_eq!(ask(&h, "w1"), answer(900, 2, false));
    let (level, line) = &h.logs()[0];
    assert_eq!(*level, Level::Warn);
    assert!(line.contains("entry c-1 was applied before as 1000 on wallet w1; event e3 says 5"), "{line}");
}

#[test]
fn a_debit_may_overdraw_and_the_overdraft_is_reported() {
    let mut h = Harness::<WalletLedger>::new();
    h.handle(credit("e1", "w1", "c-1", 100)).unwrap();
    h.handle(debit("e2", "w1", "d-1", 250)).unwrap();
    assert_eq!(ask(&h, "w1"), answer(-150, 2, true));
    h.handle(credit("e3", "w1", "c-2", 150)).unwrap();
    assert_eq!(ask(&h, "w1"), answer(0, 3, false));
}

#[test]
fn bad_amounts_and_missing_fields_are_parked_and_the_rest_applied() {
    let mut h = Harness::<WalletLedger>::new();
    let parked = h
        .process_batch(vec![
            credit("ok-1", "w1", "c-1", 100),
            entry("wallet_credited", "zero", "w1", "c-2", json!(0)),
            entry("wallet_debited", "negative", "w1", "d-1", json!(-5)),
            entry("wallet_credited", "fraction", "w1", "c-3", json!(1.5)),
            entry("wallet_credited", "text", "w1", "c-4", json!("100")),
            Event::json("wallet_credited", &json!({"wallet_id": "w1", "amount": 10})).with_id("no-entry"),
            Event::json("wallet_debited", &json!({"entry_id": "d-2", "amount": 10})).with_id("no-wallet"),
            Event::json("wallet_debited", &json!({"wallet_id": "w1", "entry_id": "d-3"}))
                .with_id("no-amount"),
            credit("ok-2", "w1", "c-5", 20),
        ])
        .unwrap();
    let reasons: Vec<(&str, &str)> = parked.iter().map(|d| (d.id.as_str(), d.reason.as_str())).collect();
    let expected = [
        ("zero", "amount 0 is not positive"),
        ("negative", "amount -5 is not positive"),
        ("fraction", "invalid type: floating point `1.5`, expected i64"),
        ("text", "invalid type: string \"100\", expected i64"),
        ("no-entry", "missing field `entry_id`"),
        ("no-wallet", "missing field `wallet_id`"),
        ("no-amount", "missing field `amount`"),
    ];
    assert_eq!(reasons.len(), expected.len(), "{reasons:?}");
    for ((id, reason), (expected_id, expected_reason)) in reasons.iter().zip(expected) {
        assert_eq!(*id, expected_id);
        assert!(reason.contains(expected_reason), "{id}: {reason}");
    }
    assert_eq!(ask(&h, "w1"), answer(120, 2, false));
    // A rejected entry's id was not taken: a corrected event applies it.
    h.handle(credit("zero-fixed", "w1", "c-2", 1)).unwrap();
    assert_eq!(ask(&h, "w1"), answer(121, 3, false));
}

#[test]
fn a_balance_past_the_integer_range_is_rejected() {
    let mut h = Harness::<WalletLedger>::new();
    h.handle(credit("e1", "w1", "c-1", i64::MAX)).unwrap();
    let Err(Failure::Reject(reason)) = h.handle(credit("e2", "w1", "c-2", 1)) else { panic!("not rejected") };
    assert!(reason.contains("the balance of wallet w1 would overflow"), "{reason}");
    assert_eq!(ask(&h, "w1"), answer(i64::MAX, 1, false));
}

#[test]
fn other_event_types_are_ignored() {
    let mut h = Harness::<WalletLedger>::new();
    h.handle(Event::json("wallet_opened", &json!({"wallet_id": "w1"}))).unwrap();
    assert_eq!(ask(&h, "w1"), answer(0, 0, false));
}
