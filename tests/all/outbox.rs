//! The outbox through a real `run` of order-fees: emitted events published
//! to the log once, with status and metrics counting them; what a crash
//! left unpublished published at restart, the log dropping a copy; and
//! rebuilds, online and offline, publishing nothing twice.

use crate::util::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn scenario() -> String {
    root().join("projections/order-fees/fixtures/scenario.jsonl").to_string_lossy().into_owned()
}

/// A workspace running order-fees over `orders`.
fn order_fees() -> Workspace {
    let ws = Workspace::new();
    ws.write_config(&[("order-fees", &guest("order_fees"), &["orders"])]);
    ws
}

/// How many times each event id is in `charges`.
fn charges(ws: &Workspace) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for event in ws.events("charges") {
        *ids.entry(event["id"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    ids
}

/// Each order charged, from the `order_charged` events in `charges`.
fn charged_orders(ws: &Workspace) -> Vec<String> {
    let mut orders: Vec<String> =
        ws.events("charges").iter().map(|e| e["data"]["order_id"].as_str().unwrap().to_string()).collect();
    orders.sort();
    orders
}

/// Wait until order-fees has handled the whole log (the events appended,
/// and the charges it published there itself) and published everything it
/// emitted.
fn wait_published(ws: &Workspace) {
    wait_until(WAIT, "order-fees caught up with an empty outbox", || {
        let status = ws.status_of("order-fees");
        status["state"] != "new" && status["lag"] == 0 && status["outbox"] == 0
    });
}

/// Wait until order-fees's counters in `/metrics` (`projector_<name>_total`)
/// read `counts`.
fn wait_for_counts(base: &str, counts: &[(&str, u64)]) {
    let read = || {
        let m = metrics(base);
        counts
            .iter()
            .map(|(name, _)| {
                let sample = format!(r#"projector_{name}_total{{projection="order-fees"}}"#);
                (*name, m.get(&sample).map(|value| *value as u64))
            })
            .collect::<Vec<_>>()
    };
    let expected: Vec<(&str, Option<u64>)> = counts.iter().map(|(name, n)| (*name, Some(*n))).collect();
    let mut last = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        last = read();
        if last == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("metrics read {last:?}, expected {counts:?}");
}

fn post_json(url: &str) {
    let response = ureq::post(url).header("content-type", "application/json").send("").unwrap();
    assert!(response.status().is_success(), "{url}: {}", response.status());
}

/// An approval of `order`, captured first, as two events.
fn capture_and_approve(ws: &Workspace, order: &str) -> String {
    ws.write_events(
        &format!("{order}.jsonl"),
        &[
            cloud_event(
                &format!("cap-{order}"),
                "order_captured",
                json!({"order_id": order, "fee": 7, "discount": 0}),
            ),
            cloud_event_correlated(
                &format!("app-{order}"),
                "order_approved",
                json!({"order_id": order}),
                &format!("checkout-{order}"),
            ),
        ],
    )
}

#[test]
fn emitted_events_are_published_once_with_their_cause_and_counted() {
    let ws = order_fees();
    let host = ws.start();
    let base = host.url();
    assert_eq!(ws.append("orders", &scenario()), (13, 1));
    wait_published(&ws);

    let published = ws.events("charges");
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("projections/order-fees/fixtures/expected.json")).unwrap(),
    )
    .unwrap();
    let expected: Vec<Value> = expected["emitted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            json!({
                "id": e["id"], "source": e["source"], "type": e["type"], "subject": e["subject"],
                "datacontenttype": "application/json", "correlationid": e["correlation_id"],
                "causationid": e["causation_id"], "data": e["data"],
            })
        })
        .collect();
    let without_time: Vec<Value> = published
        .iter()
        .map(|event| {
            let mut event = event.clone();
            let object = event.as_object_mut().unwrap();
            assert_eq!(object.remove("specversion"), Some(json!("1.0")));
            let time = object.remove("time").unwrap();
            assert!(time.as_str().unwrap().ends_with('Z'), "emitted at a UTC time: {time}");
            event
        })
        .collect();
    assert_eq!(json!(without_time), json!(expected));

    let status = ws.status_of("order-fees");
    assert_eq!(status["outbox"], 0, "{status}");
    let over_http: Value =
        ureq::get(format!("{base}/projections/order-fees")).call().unwrap().body_mut().read_json().unwrap();
    assert_eq!(over_http["outbox"], 0, "{over_http}");
    wait_for_counts(&base, &[("events_emitted", 2), ("events_published", 2)]);

    ws.append("orders", &capture_and_approve(&ws, "ord-4"));
    wait_published(&ws);
    assert_eq!(charged_orders(&ws), ["ord-1", "ord-3", "ord-4"]);
    wait_for_counts(&base, &[("events_emitted", 3), ("events_published", 3)]);
    drop(host);
}

#[test]
fn an_event_a_dead_letter_retry_emits_is_published_once_and_counted() {
    let ws = order_fees();
    let host = ws.start();
    let base = host.url();
    // An approval of an order not yet captured is rejected and parked.
    let early = ws.write_events(
        "early.jsonl",
        &[cloud_event_correlated("app-ord-7", "order_approved", json!({"order_id": "ord-7"}), "checkout-7")],
    );
    ws.append("orders", &early);
    wait_until(WAIT, "the early approval parked", || ws.status_of("order-fees")["dead_letters"] == 1);
    let capture = ws.write_events(
        "capture.jsonl",
        &[cloud_event("cap-ord-7", "order_captured", json!({"order_id": "ord-7", "fee": 9, "discount": 0}))],
    );
    ws.append("orders", &capture);
    wait_published(&ws);
    assert!(charged_orders(&ws).is_empty());
    wait_for_counts(&base, &[("events_emitted", 0), ("events_published", 0)]);

    let response = ureq::post(format!("{base}/projections/order-fees/dead-letters/retry"))
        .header("content-type", "application/json")
        .send(r#"{"all": true}"#)
        .unwrap()
        .body_mut()
        .read_json::<Value>()
        .unwrap();
    assert_eq!(response["resolved"], json!(["app-ord-7"]), "{response}");
    wait_published(&ws);
    assert_eq!(charged_orders(&ws), ["ord-7"]);
    assert!(charges(&ws).values().all(|n| *n == 1), "{:?}", charges(&ws));
    wait_for_counts(&base, &[("events_emitted", 1), ("events_published", 1)]);
    drop(host);
}

#[test]
fn what_a_crash_left_unpublished_is_published_at_restart_and_a_copy_is_dropped() {
    let ws = order_fees();
    ws.append("orders", &scenario());
    // Built offline: the outbox holds both charges, published by no one yet.
    run_ok(&["rebuild", "--config", &ws.config_str(), "order-fees"]);
    assert_eq!(ws.status_of("order-fees")["outbox"], 2);
    assert!(charges(&ws).is_empty(), "an offline rebuild publishes nothing");
    // A host killed between appending the first and removing it from the
    // outbox: the log holds it already.
    let copy = ws.write_events(
        "copy.jsonl",
        &[cloud_event("order-fees:8:0", "order_charged", json!({"order_id": "ord-1", "fee": 200}))],
    );
    assert_eq!(ws.append("charges", &copy), (1, 0));

    let host = ws.start();
    let base = host.url();
    wait_published(&ws);
    let once: BTreeMap<String, usize> = [("order-fees:11:0".into(), 1), ("order-fees:8:0".into(), 1)].into();
    assert_eq!(charges(&ws), once);
    // No batch emitted them in this run; the copy counts as handed over.
    wait_for_counts(&base, &[("events_emitted", 0), ("events_published", 2)]);
    drop(host);
}

#[test]
fn a_rebuild_of_order_fees_leaves_each_order_charged_in_charges_exactly_once() {
    let ws = order_fees();
    let host = ws.start();
    let base = host.url();
    ws.append("orders", &scenario());
    wait_published(&ws);
    assert_eq!(charged_orders(&ws), ["ord-1", "ord-3"]);

    // Online: the new generation handles every approval again while the
    // old one serves; nothing it emitted at or below the old checkpoint is
    // published.
    let before = ws.database("order-fees");
    run_ok(&["rebuild", "--config", &ws.config_str(), "order-fees"]);
    assert_ne!(ws.database("order-fees"), before, "a new generation took over");
    wait_published(&ws);
    assert_eq!(charged_orders(&ws), ["ord-1", "ord-3"]);
    // Not even handed to the log again (where the ids would be dropped).
    wait_for_counts(&base, &[("events_emitted", 2), ("events_published", 2), ("rebuilds", 1)]);

    // Paused, so the approval of ord-2 is in the log but not handled when
    // the rebuild takes over: the new generation handles it, and the runner
    // that takes over publishes its charge (and only that one).
    post_json(&format!("{base}/projections/order-fees/pause"));
    wait_until(WAIT, "paused", || ws.status_of("order-fees")["state"] == "paused");
    let approval = ws.write_events(
        "approve-2.jsonl",
        &[cloud_event_correlated("app-2", "order_approved", json!({"order_id": "ord-2"}), "checkout-2")],
    );
    ws.append("orders", &approval);
    let before = ws.database("order-fees");
    run_ok(&["rebuild", "--config", &ws.config_str(), "order-fees"]);
    assert_ne!(ws.database("order-fees"), before, "a new generation took over");
    assert_eq!(ws.status_of("order-fees")["state"], "paused", "still paused after the takeover");
    wait_until(WAIT, "the charge of ord-2", || charged_orders(&ws).len() == 3);
    assert_eq!(charged_orders(&ws), ["ord-1", "ord-2", "ord-3"]);
    // The charge of ord-2 came with the takeover: emitted by the new
    // generation, published by the runner.
    wait_for_counts(&base, &[("events_emitted", 3), ("events_published", 3), ("rebuilds", 2)]);
    post_json(&format!("{base}/projections/order-fees/resume"));
    wait_published(&ws);
    assert_eq!(charged_orders(&ws), ["ord-1", "ord-2", "ord-3"]);
    assert!(host.terminate().success());

    // Offline, and a host started after it: still once each.
    run_ok(&["rebuild", "--config", &ws.config_str(), "order-fees"]);
    assert_eq!(ws.status_of("order-fees")["outbox"], 0, "all of it published by the old generation");
    let host = ws.start();
    ws.append("orders", &capture_and_approve(&ws, "ord-5"));
    wait_published(&ws);
    assert_eq!(charged_orders(&ws), ["ord-1", "ord-2", "ord-3", "ord-5"]);
    assert!(charges(&ws).values().all(|n| *n == 1), "{:?}", charges(&ws));
    let answer = json(&run_ok(&[
        "query",
        "--config",
        &ws.config_str(),
        "order-fees",
        "--request",
        r#"{"ledger":"fees"}"#,
    ]));
    assert_eq!(answer, json!({"charged": 707, "orders": 4, "at_current_setting": 1200}));
    drop(host);
}
