//! The native harness keeps the host's semantics: a failed batch leaves no
//! trace, state scans by prefix in key order, SQL values round-trip typed.

use projector_sdk::testing::Harness;
use projector_sdk::{Context, Event, Failure, Level, Projection, Value};
use serde_json::json;

/// Stores each event's data under `item/<id>`; `fail` events are rejected
/// after writing, `retry` events ask to be retried.
struct Items;

impl Projection for Items {
    fn init(ctx: &Context, found: Option<u32>) -> Result<(), String> {
        assert_eq!(found, None, "a fresh harness database has no state version");
        ctx.sql().execute("CREATE TABLE things (i INTEGER, r REAL, t TEXT, b BLOB, n TEXT)", &[])?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        ctx.state().set_bytes(&format!("item/{}", event.id()), event.data());
        ctx.log().info(&format!("stored {}", event.id()));
        match event.event_type() {
            "fail" => Err(Failure::reject("this one fails")),
            "retry" => Err(Failure::retry("not yet")),
            _ => Ok(()),
        }
    }
}

#[test]
fn a_failed_batch_leaves_no_writes() {
    let mut h = Harness::<Items>::new();
    h.handle(Event::new("ok", "1").with_id("a")).unwrap();
    let result =
        h.handle_batch(vec![Event::new("ok", "2").with_id("b"), Event::new("fail", "3").with_id("c")]);
    assert_eq!(result, Err(Failure::Reject("this one fails".into())));
    assert_eq!(h.handle(Event::new("retry", "4").with_id("d")), Err(Failure::Retry("not yet".into())));
    let keys: Vec<String> = h.scan("", 100).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec!["item/a"]);
}

#[test]
fn scan_returns_keys_by_prefix_in_order_up_to_the_limit() {
    let mut h = Harness::<Items>::new();
    for id in ["c", "a", "b", "d"] {
        h.handle(Event::new("ok", id).with_id(id)).unwrap();
    }
    h.handle(Event::new("ok", "x").with_id("zz")).unwrap();
    let keys = |prefix: &str, limit: u32| -> Vec<String> {
        h.scan(prefix, limit).into_iter().map(|(k, _)| k).collect()
    };
    assert_eq!(keys("item/", 100), vec!["item/a", "item/b", "item/c", "item/d", "item/zz"]);
    assert_eq!(keys("item/", 2), vec!["item/a", "item/b"]);
    assert_eq!(keys("item/z", 100), vec!["item/zz"]);
    assert!(keys("other/", 100).is_empty());
    assert_eq!(h.logs().first(), Some(&(Level::Info, "stored c".to_string())));
}

#[test]
fn sql_values_round_trip_with_their_types() {
    struct Typed;
    impl Projection for Typed {
        fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
            ctx.sql().execute("CREATE TABLE v (i INTEGER, r REAL, t TEXT, b BLOB, n TEXT)", &[])?;
            Ok(())
        }
        fn handle(ctx: &Context, _event: &Event) -> Result<(), Failure> {
            let changed = ctx.sql().execute(
                "INSERT INTO v VALUES (?1, ?2, ?3, ?4, ?5)",
                &[42i64.into(), 1.5f64.into(), "text".into(), vec![0u8, 255].into(), Value::Null],
            )?;
            assert_eq!(changed, 1);
            Ok(())
        }
    }
    let mut h = Harness::<Typed>::new();
    h.handle(Event::json("t", &json!({}))).unwrap();
    let rows = h.rows("SELECT i, r, t, b, n FROM v");
    assert_eq!(rows.columns(), ["i", "r", "t", "b", "n"]);
    assert_eq!(
        rows.first().unwrap(),
        [
            Value::Integer(42),
            Value::Real(1.5),
            Value::Text("text".into()),
            Value::Blob(vec![0, 255]),
            Value::Null
        ]
    );
}

#[test]
fn a_bad_statement_is_an_error_the_projection_can_return() {
    struct Bad;
    impl Projection for Bad {
        fn handle(ctx: &Context, _event: &Event) -> Result<(), Failure> {
            ctx.sql().execute("INSERT INTO missing VALUES (1)", &[])?;
            Ok(())
        }
    }
    let mut h = Harness::<Bad>::new();
    let Err(Failure::Reject(reason)) = h.handle(Event::new("t", "")) else { panic!("expected a reject") };
    assert!(reason.contains("no such table: missing"), "{reason}");
}
