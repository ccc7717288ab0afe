//! order-fees' rules, natively: settings that arrive out of order, captured
//! snapshots, approvals charged at the captured fee with the current
//! setting beside it, `order_charged` emitted once per order with the
//! approval's correlation id, rejects, and the three queries.

use order_fees::{LedgerAnswer, OrderAnswer, OrderFees, Setting, Status};
use projector_sdk::testing::Harness;
use projector_sdk::{Event, Failure};
use serde_json::{Value, json};

fn event(event_type: &str, id: &str, data: Value) -> Event {
    Event::json(event_type, &data).with_id(id).with_stream("orders")
}

fn setting(id: &str, name: &str, enabled: bool, amount: i64, version: i64) -> Event {
    event(
        "setting_changed",
        id,
        json!({"setting": name, "enabled": enabled, "amount": amount, "version": version}),
    )
}

fn captured(id: &str, order: &str, fee: i64, discount: i64) -> Event {
    event("order_captured", id, json!({"order_id": order, "fee": fee, "discount": discount}))
}

fn approved(id: &str, order: &str) -> Event {
    event("order_approved", id, json!({"order_id": order})).with_correlation_id(format!("checkout-{order}"))
}

fn fees() -> Harness<OrderFees> {
    Harness::<OrderFees>::new().with_name("order-fees")
}

fn ask_setting(h: &Harness<OrderFees>, name: &str) -> Setting {
    h.query_json(&json!({"setting": name})).unwrap()
}

fn ask_order(h: &Harness<OrderFees>, order: &str) -> OrderAnswer {
    h.query_json(&json!({"order_id": order})).unwrap()
}

fn ask_ledger(h: &Harness<OrderFees>) -> LedgerAnswer {
    h.query_json(&json!({"ledger": "fees"})).unwrap()
}

#[test]
fn settings_keep_the_highest_version_whatever_the_order_they_arrive_in() {
    let mut h = fees();
    assert_eq!(ask_setting(&h, "fee"), Setting { enabled: false, amount: 0, version: 0 });
    let raw: Value = h.query_json(&json!({"setting": "discount"})).unwrap();
    assert_eq!(raw, json!({"enabled": false, "amount": 0, "version": 0}));
    h.handle(setting("s3", "fee", true, 300, 3)).unwrap();
    // Older versions, arriving late, and a repeat of the current one.
    h.handle(setting("s1", "fee", true, 100, 1)).unwrap();
    h.handle(setting("s2", "fee", false, 200, 2)).unwrap();
    h.handle(setting("s3-again", "fee", false, 999, 3)).unwrap();
    assert_eq!(ask_setting(&h, "fee"), Setting { enabled: true, amount: 300, version: 3 });
    h.handle(setting("d1", "discount", true, 50, 1)).unwrap();
    assert_eq!(ask_setting(&h, "discount"), Setting { enabled: true, amount: 50, version: 1 });
    assert_eq!(ask_setting(&h, "fee").version, 3, "settings are kept apart");
    h.handle(setting("s4", "fee", false, 0, 4)).unwrap();
    assert_eq!(ask_setting(&h, "fee"), Setting { enabled: false, amount: 0, version: 4 });
}

#[test]
fn an_approval_charges_the_captured_fee_records_the_setting_and_emits_once() {
    let mut h = fees();
    h.handle(setting("s1", "fee", true, 250, 1)).unwrap();
    h.handle(captured("c1", "o1", 250, 10)).unwrap();
    // The fee setting changes between capture and approval.
    h.handle(setting("s2", "fee", true, 400, 2)).unwrap();
    h.handle(approved("a1", "o1")).unwrap();
    // Approving twice records and emits once.
    h.handle(approved("a1-again", "o1")).unwrap();
    h.handle(approved("a1", "o1")).unwrap();

    assert_eq!(
        ask_order(&h, "o1"),
        OrderAnswer { status: Status::Approved, fee: Some(250), discount: Some(10) }
    );
    let ledger = h.rows(
        "SELECT order_id, fee, setting_enabled, setting_amount, setting_version, approved_by FROM fee_ledger",
    );
    assert_eq!(
        ledger
            .iter()
            .map(|r| r.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>(),
        [r#"Text("o1") Integer(250) Integer(1) Integer(400) Integer(2) Text("a1")"#]
    );
    let emitted = h.emitted();
    assert_eq!(emitted.len(), 1, "{emitted:?}");
    let charged = &emitted[0];
    assert_eq!((charged.stream.as_str(), charged.event_type.as_str()), ("charges", "order_charged"));
    assert_eq!(charged.json(), json!({"order_id": "o1", "fee": 250}));
    assert_eq!(charged.subject.as_deref(), Some("o1"));
    assert_eq!(charged.correlation_id.as_deref(), Some("checkout-o1"));
    assert_eq!(charged.causation_id, "a1");
    assert_eq!(charged.source, "projector/order-fees");
    assert_eq!(charged.id, "order-fees:4:0");
    assert_eq!(ask_ledger(&h), LedgerAnswer { charged: 250, orders: 1, at_current_setting: 400 });
}

#[test]
fn a_capture_replaces_the_snapshot_until_the_order_is_approved() {
    let mut h = fees();
    h.handle(captured("c1", "o1", 100, 0)).unwrap();
    h.handle(captured("c2", "o1", 120, 5)).unwrap();
    assert_eq!(
        ask_order(&h, "o1"),
        OrderAnswer { status: Status::Captured, fee: Some(120), discount: Some(5) }
    );
    h.handle(approved("a1", "o1")).unwrap();
    h.handle(captured("c3", "o1", 999, 0)).unwrap();
    assert_eq!(
        ask_order(&h, "o1"),
        OrderAnswer { status: Status::Approved, fee: Some(120), discount: Some(5) }
    );
    assert_eq!(h.emitted()[0].json(), json!({"order_id": "o1", "fee": 120}));
    assert_eq!(ask_order(&h, "o9"), OrderAnswer { status: Status::Unknown, fee: None, discount: None });
    let raw: Value = h.query_json(&json!({"order_id": "o9"})).unwrap();
    assert_eq!(raw, json!({"status": "unknown", "fee": null, "discount": null}));
}

#[test]
fn an_approval_of_an_unknown_order_is_parked_and_emits_nothing() {
    let mut h = fees();
    let parked = h
        .process_batch(vec![
            captured("c1", "o1", 100, 0),
            approved("a-ghost", "ghost"),
            approved("a1", "o1"),
            event(
                "setting_changed",
                "bad-setting",
                json!({"setting": "tax", "enabled": true, "amount": 1, "version": 1}),
            ),
            captured("bad-fee", "o2", -5, 0),
            event("order_captured", "no-fee", json!({"order_id": "o3", "discount": 0})),
            setting("bad-version", "fee", true, 1, -1),
        ])
        .unwrap();
    let reasons: Vec<(&str, &str)> = parked.iter().map(|d| (d.id.as_str(), d.reason.as_str())).collect();
    let expected = [
        ("a-ghost", "order \"ghost\" was never captured"),
        ("bad-setting", "unknown variant `tax`, expected `fee` or `discount`"),
        ("bad-fee", "fee -5 is negative"),
        ("no-fee", "missing field `fee`"),
        ("bad-version", "version -1 is negative"),
    ];
    assert_eq!(reasons.len(), expected.len(), "{reasons:?}");
    for ((id, reason), (expected_id, expected_reason)) in reasons.iter().zip(expected) {
        assert_eq!(*id, expected_id);
        assert!(reason.contains(expected_reason), "{id}: {reason}");
    }
    let subjects: Vec<Option<String>> = h.emitted().into_iter().map(|e| e.subject).collect();
    assert_eq!(subjects, [Some("o1".to_string())]);
    assert_eq!(ask_order(&h, "ghost").status, Status::Unknown);
}

#[test]
fn the_fee_ledger_sums_charges_and_prices_them_at_the_current_setting() {
    let mut h = fees();
    assert_eq!(ask_ledger(&h), LedgerAnswer { charged: 0, orders: 0, at_current_setting: 0 });
    h.handle_batch(vec![
        setting("s1", "fee", true, 100, 1),
        captured("c1", "o1", 100, 0),
        captured("c2", "o2", 150, 0),
        captured("c3", "o3", 175, 0),
        approved("a1", "o1"),
        approved("a2", "o2"),
        setting("s2", "fee", true, 200, 2),
    ])
    .unwrap();
    assert_eq!(ask_ledger(&h), LedgerAnswer { charged: 250, orders: 2, at_current_setting: 400 });
    // A disabled fee setting prices them at nothing.
    h.handle(setting("s3", "fee", false, 200, 3)).unwrap();
    assert_eq!(ask_ledger(&h), LedgerAnswer { charged: 250, orders: 2, at_current_setting: 0 });
    let raw: Value = h.query_json(&json!({"ledger": "fees"})).unwrap();
    assert_eq!(raw, json!({"charged": 250, "orders": 2, "at_current_setting": 0}));
}

#[test]
fn a_failed_batch_emits_nothing() {
    let mut h = fees();
    h.handle(captured("c1", "o1", 100, 0)).unwrap();
    let result = h.handle_batch(vec![approved("a1", "o1"), approved("a-ghost", "ghost")]);
    assert!(matches!(result, Err(Failure::Reject(_))), "{result:?}");
    assert!(h.emitted().is_empty());
    assert_eq!(ask_order(&h, "o1").status, Status::Captured);
}

#[test]
fn a_question_it_cannot_answer_is_refused_with_what_it_can() {
    let h = fees();
    for (request, expected) in [
        (json!({"ledger": "discounts"}), "there is no ledger \"discounts\""),
        (json!({"order_id": "o1", "setting": "fee"}), "one question at a time"),
        (json!({}), "one question at a time"),
        (json!({"setting": "tax"}), "unknown variant `tax`"),
        (json!({"orders": 1}), "unknown field `orders`"),
    ] {
        let err = h.query(request.to_string().as_bytes()).unwrap_err();
        assert!(err.contains(expected), "{request}: {err}");
    }
}
