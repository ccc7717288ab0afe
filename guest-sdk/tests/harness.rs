//! The native harness keeps the host's semantics: a failed batch leaves no
//! trace, state scans by prefix in key order, SQL values round-trip typed,
//! `execute` counts changes like the host, `query` is read-only, guest SQL
//! is refused what the host's authorizer refuses, and values over the limit
//! trap.

use projector_sdk::testing::{DEFAULT_VALUE_LIMIT, Harness};
use projector_sdk::{Context, Event, Failure, Level, Projection, Value};
use serde_json::json;
use std::panic::{AssertUnwindSafe, catch_unwind};

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

/// Runs each event's data as one SQL statement, with no parameters, and
/// records the rows it changed; `query` runs its request as a statement.
struct RunsSql;

impl Projection for RunsSql {
    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        ctx.sql().execute("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)", &[])?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let statement = std::str::from_utf8(event.data()).unwrap();
        let changed = ctx.sql().execute(statement, &[])?;
        ctx.state().set(&format!("changed/{}", event.id()), &changed)?;
        Ok(())
    }

    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        let request = std::str::from_utf8(request).unwrap();
        if let Some(key) = request.strip_prefix("set-state ") {
            ctx.state().set(key, &1)?;
            return Ok(Vec::new());
        }
        let changed = ctx.sql().execute(request, &[])?;
        Ok(changed.to_string().into_bytes())
    }
}

fn run_sql(h: &mut Harness<RunsSql>, id: &str, statement: &str) -> Result<u64, Failure> {
    h.handle(Event::new("sql", statement).with_id(id))?;
    Ok(h.state(&format!("changed/{id}")).unwrap())
}

fn the_panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic (the host's trap)");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn execute_steps_through_returned_rows_and_counts_changes_like_the_host() {
    let mut h = Harness::<RunsSql>::new();
    let insert = "INSERT INTO things (name) VALUES ('a'), ('b') RETURNING id";
    assert_eq!(run_sql(&mut h, "insert", insert), Ok(2));
    assert_eq!(run_sql(&mut h, "update", "UPDATE things SET name = 'c' WHERE id = 1 RETURNING *"), Ok(1));
    assert_eq!(run_sql(&mut h, "delete", "DELETE FROM things WHERE id = 2 RETURNING name"), Ok(1));
    // A read-only statement changes nothing, whatever ran before it.
    assert_eq!(run_sql(&mut h, "select", "SELECT * FROM things"), Ok(0));
    // So does a CREATE or DROP, whatever changed rows before it.
    assert_eq!(run_sql(&mut h, "create", "CREATE TABLE other (id INTEGER)"), Ok(0));
    assert_eq!(run_sql(&mut h, "drop", "DROP TABLE other"), Ok(0));
    let rows = h.rows("SELECT id, name FROM things");
    assert_eq!(rows.iter().collect::<Vec<_>>(), [[Value::Integer(1), Value::Text("c".into())]]);
}

#[test]
fn query_is_read_only_and_leaves_nothing_behind() {
    let mut h = Harness::<RunsSql>::new();
    run_sql(&mut h, "seed", "INSERT INTO things (name) VALUES ('kept')").unwrap();
    assert_eq!(h.query(b"SELECT count(*) FROM things"), Ok(b"0".to_vec()));

    for write in [
        "INSERT INTO things (name) VALUES ('written in query')",
        "DELETE FROM things",
        "CREATE TABLE made_in_query (x)",
        "CREATE TEMP TABLE temp_in_query (x)",
    ] {
        let err = h.query(write.as_bytes()).expect_err(write);
        assert!(err.contains("attempt to write a readonly database"), "{write}: {err}");
        assert!(err.contains("write state in `handle` or `init`"), "as the host says it: {err}");
    }
    // A state write in `query` is a host error in the host (a trap here).
    let message = the_panic_message(|| drop(h.query(b"set-state written-in-query")));
    assert!(message.contains("attempt to write a readonly database"), "{message}");

    assert_eq!(h.state::<u64>("written-in-query"), None);
    let names = h.rows("SELECT name FROM things");
    assert_eq!(names.iter().collect::<Vec<_>>(), [[Value::Text("kept".into())]]);
    assert!(h.rows("SELECT name FROM sqlite_schema WHERE name = 'made_in_query'").is_empty());
    // The harness is writable again after a query.
    assert_eq!(run_sql(&mut h, "after", "INSERT INTO things (name) VALUES ('later')"), Ok(1));
}

#[test]
fn guest_sql_is_refused_what_the_host_refuses() {
    let mut h = Harness::<RunsSql>::new();
    // Each refusal names the statement and the rule it broke.
    let refused = [
        ("BEGIN", "transaction control is the host's"),
        ("COMMIT", "transaction control is the host's"),
        ("ROLLBACK", "transaction control is the host's"),
        ("SAVEPOINT s", "savepoints are the host's"),
        ("RELEASE s", "savepoints are the host's"),
        ("ATTACH DATABASE ':memory:' AS other", "ATTACH and DETACH are not allowed"),
        ("DETACH DATABASE other", "ATTACH and DETACH are not allowed"),
        ("PRAGMA query_only=1", "pragmas are not allowed to guests (PRAGMA query_only)"),
        ("PRAGMA user_version", "pragmas are not allowed to guests (PRAGMA user_version)"),
        (
            "CREATE VIRTUAL TABLE v USING rtree(id, x0, x1)",
            "virtual tables (FTS5, R*Tree, …) are not allowed",
        ),
        ("SELECT load_extension('evil')", "loading SQLite extensions is not allowed"),
        ("CREATE TABLE projector_meta (key TEXT, value TEXT)", "projector_meta belongs to the runtime"),
        ("CREATE TABLE PROJECTOR_CHECKPOINTS (x)", "PROJECTOR_CHECKPOINTS belongs to the runtime"),
        ("CREATE TABLE projector_dead_letters (x)", "projector_dead_letters belongs to the runtime"),
        (
            "SELECT * FROM projector_outbox",
            "projector_outbox belongs to the runtime: publish events with ctx.emit",
        ),
        ("DELETE FROM projector_outbox", "projector_outbox belongs to the runtime"),
        ("CREATE TEMP TRIGGER t AFTER INSERT ON things BEGIN SELECT 1; END", "temp triggers are not allowed"),
        (
            "CREATE TRIGGER kv AFTER INSERT ON projector_kv BEGIN DELETE FROM things; END",
            "a trigger on projector_kv would fire inside the host's own statements",
        ),
        (
            "CREATE TRIGGER ob AFTER INSERT ON projector_outbox BEGIN DELETE FROM things; END",
            "a trigger on projector_outbox would fire inside the host's own statements",
        ),
        ("CREATE TEMP TABLE projector_kv (key, value)", "a temp table or view named projector_kv"),
        ("CREATE TEMP VIEW projector_meta AS SELECT 1", "a temp table or view named projector_meta"),
    ];
    for (i, (statement, rule)) in refused.iter().enumerate() {
        let Err(Failure::Reject(reason)) = run_sql(&mut h, &format!("refused-{i}"), statement) else {
            panic!("{statement} should have been refused")
        };
        assert!(
            reason.starts_with(&format!("sql: statement {statement:?} refused: ")),
            "{statement}: {reason}"
        );
        assert!(reason.contains(rule), "{statement}: {reason}");
    }
    // What a projection may do still works, and so do the harness's own
    // transactions around it.
    for (i, statement) in [
        "CREATE TABLE mine (x)",
        "CREATE INDEX mine_x ON mine (x)",
        "CREATE TRIGGER mine_log AFTER INSERT ON mine BEGIN INSERT INTO things (name) VALUES (new.x); END",
        "INSERT INTO mine VALUES ('via trigger')",
        "SELECT key FROM projector_kv",
    ]
    .iter()
    .enumerate()
    {
        run_sql(&mut h, &format!("allowed-{i}"), statement)
            .unwrap_or_else(|err| panic!("{statement}: {err}"));
    }
    assert_eq!(h.rows("SELECT name FROM things").len(), 1);
}

#[test]
fn a_statement_that_ends_the_transaction_traps_and_sql_made_values_are_capped() {
    let mut h = Harness::<RunsSql>::new();
    run_sql(&mut h, "seed", "INSERT INTO things (id, name) VALUES (1, 'kept')").unwrap();
    let message = the_panic_message(|| {
        drop(run_sql(&mut h, "again", "INSERT OR ROLLBACK INTO things (id, name) VALUES (1, 'twice')"))
    });
    assert!(
        message.contains("a statement rolled back the transaction the host runs the call in"),
        "{message}"
    );
    assert_eq!(h.state::<u64>("changed/again"), None);
    assert_eq!(run_sql(&mut h, "after", "INSERT INTO things (name) VALUES ('later')"), Ok(1));

    // SQL cannot make a value the host's SQLITE_LIMIT_LENGTH would refuse.
    let Err(Failure::Reject(reason)) = run_sql(&mut h, "big", "SELECT zeroblob(200000000)") else {
        panic!("a 200 MB blob should be refused")
    };
    assert!(reason.contains("too big"), "{reason}");
}

#[test]
fn values_over_the_limit_trap_with_the_hosts_message() {
    struct Writes;
    impl Projection for Writes {
        fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
            match event.event_type() {
                "state" => ctx.state().set_bytes("big", event.data()),
                "text" => {
                    let text = String::from_utf8(event.data().to_vec()).unwrap();
                    ctx.sql().query("SELECT length(?1)", &[text.into()])?;
                }
                "blob" => {
                    ctx.sql().execute("SELECT length(?1)", &[event.data().into()])?;
                }
                _ => unreachable!(),
            }
            Ok(())
        }
    }
    let mut h = Harness::<Writes>::new();
    // "big" is 3 bytes of the key + value.
    h.handle(Event::new("state", vec![b'x'; DEFAULT_VALUE_LIMIT - 3])).unwrap();
    h.handle(Event::new("text", vec![b'x'; DEFAULT_VALUE_LIMIT])).unwrap();
    let over = DEFAULT_VALUE_LIMIT + 1;
    let message = the_panic_message(|| drop(h.handle(Event::new("state", vec![b'y'; over - 3]))));
    assert!(
        message.contains(&format!(
            "the state value for key \"big\" of {over} bytes is over the limit of {DEFAULT_VALUE_LIMIT} \
             bytes (limits.value_kib)"
        )),
        "{message}"
    );
    // The trapped batch left nothing, and the harness goes on.
    assert_eq!(h.scan("big", 1)[0].1[0], b'x');
    let message = the_panic_message(|| drop(h.handle(Event::new("text", vec![b'x'; over]))));
    assert!(
        message.contains(&format!("an SQL text parameter of {over} bytes is over the limit")),
        "{message}"
    );

    let mut small = Harness::<Writes>::new().with_value_limit(16);
    small.handle(Event::new("blob", vec![0; 16])).unwrap();
    let message = the_panic_message(|| drop(small.handle(Event::new("blob", vec![0; 17]))));
    assert!(
        message
            .contains("an SQL blob parameter of 17 bytes is over the limit of 16 bytes (limits.value_kib)"),
        "{message}"
    );
    small.handle(Event::new("state", "0123456789abc")).unwrap();
}

#[test]
fn a_refused_pragma_says_what_to_read_instead_and_that_works() {
    let mut h = Harness::<RunsSql>::new();
    for (i, statement) in
        ["PRAGMA table_info(things)", "SELECT name FROM pragma_table_info('things')"].iter().enumerate()
    {
        let Err(Failure::Reject(reason)) = run_sql(&mut h, &format!("pragma-{i}"), statement) else {
            panic!("{statement} should have been refused")
        };
        assert!(
            reason.ends_with(
                "refused: pragmas are not allowed to guests, nor their table-valued forms \
                 (pragma_table_info(…)); read the schema from sqlite_schema instead: SELECT sql FROM \
                 sqlite_schema WHERE tbl_name = 'things'"
            ),
            "{statement}: {reason}"
        );
    }
    // In init, where a projection would look at its schema first.
    struct LooksFirst;
    impl Projection for LooksFirst {
        fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
            ctx.sql().execute("CREATE TABLE IF NOT EXISTS things (id INTEGER PRIMARY KEY)", &[])?;
            ctx.sql().query("PRAGMA table_info(things)", &[])?;
            Ok(())
        }
        fn handle(_ctx: &Context, _event: &Event) -> Result<(), Failure> {
            Ok(())
        }
    }
    let conn = projector_sdk::testing::Connection::open_in_memory().unwrap();
    let Err(err) = Harness::<LooksFirst>::from_connection(conn) else { panic!("init should fail") };
    assert_eq!(
        err,
        "init failed: sql: statement \"PRAGMA table_info(things)\" refused: pragmas are not allowed to guests, \
         nor their table-valued forms (pragma_table_info(…)); read the schema from sqlite_schema instead: \
         SELECT sql FROM sqlite_schema WHERE tbl_name = 'things'"
    );
    // The advice is a statement the rules let through.
    let advised = "SELECT sql FROM sqlite_schema WHERE tbl_name = 'things'";
    assert_eq!(run_sql(&mut h, "advised", advised), Ok(0));
    // A long statement is quoted on one line, cut to 80 characters.
    let long = format!("PRAGMA   table_info(\n   {})", "t".repeat(200));
    let Err(Failure::Reject(reason)) = run_sql(&mut h, "long", &long) else { panic!("refused") };
    let quoted = format!("PRAGMA table_info( {}", "t".repeat(200));
    let cut: String = quoted.chars().take(79).collect();
    assert!(reason.starts_with(&format!("sql: statement \"{cut}…\" refused: ")), "{reason}");
}

/// Counts events by subject with a deferred upsert; a `bad` event defers a
/// write that fails when it runs, and `bad-sql` one that cannot prepare.
struct Defers;

impl Projection for Defers {
    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        ctx.sql().execute("CREATE TABLE counts (key TEXT PRIMARY KEY, n INTEGER NOT NULL)", ())?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let key = event.subject().unwrap_or("");
        match event.event_type() {
            "bad" => ctx.sql().defer("INSERT INTO counts (key, n) VALUES (?1, NULL)", (key,))?,
            "bad-sql" => {
                let err = ctx.sql().defer("INSERT INTO nowhere VALUES (?1)", (key,)).unwrap_err();
                return Err(Failure::reject(format!("at once: {err}")));
            }
            _ => ctx.sql().defer(
                "INSERT INTO counts (key, n) VALUES (?1, 1) ON CONFLICT (key) DO UPDATE SET n = n + 1",
                (key,),
            )?,
        }
        Ok(())
    }
}

#[test]
fn a_deferred_write_that_fails_fails_the_batch_and_parks_its_event_as_in_the_host() {
    let mut h = Harness::<Defers>::new();
    let event =
        |id: &str, event_type: &str, key: &str| Event::new(event_type, "{}").with_id(id).with_subject(key);
    let parked = h
        .process_batch(vec![
            event("a", "tick", "k1"),
            event("b", "bad", "k2"),
            event("c", "tick", "k1"),
            event("d", "bad-sql", "k3"),
            event("e", "tick", "k2"),
        ])
        .unwrap();
    let reasons: Vec<(&str, &str)> = parked.iter().map(|l| (l.id.as_str(), l.reason.as_str())).collect();
    assert_eq!(
        reasons,
        [
            (
                "b",
                "deferred statement \"INSERT INTO counts (key, n) VALUES (?1, NULL)\" failed: NOT NULL constraint \
                 failed: counts.n"
            ),
            ("d", "at once: sql: no such table: nowhere"),
        ]
    );
    let counts = h.rows("SELECT key, n FROM counts ORDER BY key");
    assert_eq!(counts.len(), 2);
    assert_eq!(counts.deserialize::<(String, i64)>().unwrap(), [("k1".into(), 2), ("k2".into(), 1)]);
}
