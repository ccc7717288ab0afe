//! What a guest author writes with: parameters as tuples and `params!`,
//! typed rows, typed JSON queries, migrations across module versions,
//! emitted events, and the harness parking a rejected event as the host
//! does.

use projector_sdk::testing::Harness;
use projector_sdk::{Context, Event, Failure, Projection, Value, params, query_json};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Wallets with a balance, written with tuples and `params!`, read back
/// with typed rows and a typed query.
struct Wallets;

#[derive(Deserialize)]
struct Move {
    wallet_id: String,
    amount: i64,
    note: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct WalletRow {
    id: String,
    balance: i64,
    note: Option<String>,
    frozen: bool,
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct BalanceQuery {
    wallet_id: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct BalanceAnswer {
    balance: i64,
    known: bool,
}

impl Projection for Wallets {
    const MIGRATIONS: &'static [&'static str] = &[
        "CREATE TABLE wallets (id TEXT PRIMARY KEY, balance INTEGER NOT NULL, note TEXT)",
        "ALTER TABLE wallets ADD COLUMN frozen INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE wallets ADD COLUMN tags TEXT NOT NULL DEFAULT '[]'",
    ];

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let m: Move = event.data_json()?;
        match event.event_type() {
            "credit" => ctx.sql().execute(
                "INSERT INTO wallets (id, balance, note) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET balance = balance + excluded.balance, note = excluded.note",
                (&m.wallet_id, m.amount, &m.note),
            )?,
            "debit" => ctx.sql().execute(
                "UPDATE wallets SET balance = balance - ?2, note = ?3 WHERE id = ?1",
                params![m.wallet_id, m.amount, m.note],
            )?,
            "tag" => ctx.sql().execute(
                "UPDATE wallets SET tags = json_insert(tags, '$[#]', ?2), frozen = ?3 WHERE id = ?1",
                (m.wallet_id.as_str(), m.note.as_deref().unwrap_or(""), true),
            )?,
            other => return Err(Failure::reject(format!("unknown type {other}"))),
        };
        Ok(())
    }

    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        query_json(request, |q: BalanceQuery| {
            let balance: Option<i64> =
                ctx.sql().query_first("SELECT balance FROM wallets WHERE id = ?1", (&q.wallet_id,))?;
            Ok(BalanceAnswer { balance: balance.unwrap_or(0), known: balance.is_some() })
        })
    }
}

fn wallets() -> Harness<Wallets> {
    let mut h = Harness::<Wallets>::new();
    for (t, wallet, amount, note) in
        [("credit", "w1", 100, Some("first")), ("credit", "w2", 5, None), ("debit", "w1", 30, None)]
    {
        h.handle(Event::json(t, &json!({"wallet_id": wallet, "amount": amount, "note": note}))).unwrap();
    }
    h.handle(Event::json("tag", &json!({"wallet_id": "w2", "amount": 0, "note": "vip"}))).unwrap();
    h
}

#[test]
fn parameters_are_tuples_or_params_and_borrow_the_values() {
    let h = wallets();
    let rows = h.rows("SELECT id, balance, note FROM wallets ORDER BY id");
    assert_eq!(
        rows.iter().collect::<Vec<_>>(),
        [
            [Value::Text("w1".into()), Value::Integer(70), Value::Null],
            [Value::Text("w2".into()), Value::Integer(5), Value::Null],
        ]
    );
}

/// Reads rows in every typed way, from `handle`, with a `kind` in the
/// event's data; stores what it read as JSON under `read`.
struct Reader;

impl Projection for Reader {
    const MIGRATIONS: &'static [&'static str] = Wallets::MIGRATIONS;

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let sql = ctx.sql();
        let read = match std::str::from_utf8(event.data()).unwrap() {
            "seed" => {
                sql.execute(
                    "INSERT INTO wallets (id, balance, note, frozen, tags) VALUES \
                     ('w1', 70, NULL, 0, '[]'), ('w2', 5, 'x', 1, '[\"vip\"]')",
                    (),
                )?;
                return Ok(());
            }
            "structs" => {
                let rows: Vec<WalletRow> =
                    sql.query_as("SELECT id, balance, note, frozen, tags FROM wallets ORDER BY id", ())?;
                json!(rows.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>())
            }
            "tuples" => {
                let rows: Vec<(String, i64)> =
                    sql.query_as("SELECT id, balance FROM wallets ORDER BY id", ())?;
                json!(rows)
            }
            "scalar" => json!(sql.query_as::<String>("SELECT id FROM wallets ORDER BY id", ())?),
            "first" => json!(sql.query_first::<i64>("SELECT balance FROM wallets WHERE id = ?1", ("w9",))?),
            "by-name" => {
                let rows =
                    sql.query("SELECT id, note, balance * 1.5 AS scaled FROM wallets ORDER BY id", ())?;
                let row = rows.row(1).unwrap();
                let note: Option<String> = row.get("note")?;
                let scaled: f64 = row.get("scaled")?;
                json!([row.get::<String>("id")?, note, scaled])
            }
            "missing-column" => {
                sql.query_as::<WalletRow>("SELECT id, balance FROM wallets", ())?;
                json!(null)
            }
            "wrong-type" => {
                sql.query_as::<(String, i64)>("SELECT id, note FROM wallets WHERE note IS NOT NULL", ())?;
                json!(null)
            }
            "two-columns-as-one" => {
                sql.query_as::<i64>("SELECT balance, id FROM wallets", ())?;
                json!(null)
            }
            "by-name-missing" => {
                let rows = sql.query("SELECT id FROM wallets", ())?;
                rows.row(0).unwrap().get::<String>("email")?;
                json!(null)
            }
            other => panic!("{other}"),
        };
        ctx.state().set("read", &read)?;
        Ok(())
    }
}

fn read(h: &mut Harness<Reader>, kind: &str) -> Result<serde_json::Value, String> {
    h.handle(Event::new("read", kind)).map_err(|err| err.reason().to_string())?;
    Ok(h.state("read").unwrap())
}

#[test]
fn rows_read_into_structs_tuples_and_values_by_column_name() {
    let mut h = Harness::<Reader>::new();
    h.handle(Event::new("seed", "seed")).unwrap();
    let first = WalletRow { id: "w1".into(), balance: 70, note: None, frozen: false, tags: vec![] };
    let second = WalletRow {
        id: "w2".into(),
        balance: 5,
        note: Some("x".into()),
        frozen: true,
        tags: vec!["vip".into()],
    };
    assert_eq!(read(&mut h, "structs"), Ok(json!([format!("{first:?}"), format!("{second:?}")])));
    assert_eq!(read(&mut h, "tuples"), Ok(json!([["w1", 70], ["w2", 5]])));
    assert_eq!(read(&mut h, "scalar"), Ok(json!(["w1", "w2"])));
    assert_eq!(read(&mut h, "first"), Ok(json!(null)));
    assert_eq!(read(&mut h, "by-name"), Ok(json!(["w2", "x", 7.5])));
}

#[test]
fn rows_that_do_not_fit_say_which_column_and_why() {
    let mut h = Harness::<Reader>::new();
    h.handle(Event::new("seed", "seed")).unwrap();
    let err = read(&mut h, "missing-column").unwrap_err();
    assert!(
        err.starts_with("sql: the rows of \"SELECT id, balance FROM wallets\" do not fit: row 1: "),
        "{err}"
    );
    // An `Option` field may have no column (it is None); others must.
    assert!(err.ends_with("row 1: no column `frozen` in the row (columns: id, balance)"), "{err}");
    let err = read(&mut h, "wrong-type").unwrap_err();
    assert!(err.contains("row 1: invalid type: string \"x\", expected i64"), "{err}");
    let err = read(&mut h, "two-columns-as-one").unwrap_err();
    assert!(err.contains("the row has 2 columns (balance, id) but one value was asked for"), "{err}");
    let err = read(&mut h, "by-name-missing").unwrap_err();
    assert_eq!(err, "no column `email` in the row (columns: id)");
}

#[test]
fn a_typed_query_parses_the_request_and_serializes_the_answer() {
    let h = wallets();
    let answer: BalanceAnswer = h.query_json(&json!({"wallet_id": "w1"})).unwrap();
    assert_eq!(answer, BalanceAnswer { balance: 70, known: true });
    let unknown: serde_json::Value = h.query_json(&json!({"wallet_id": "nope"})).unwrap();
    assert_eq!(unknown, json!({"balance": 0, "known": false}));
    // The raw bytes form is the same call.
    assert_eq!(h.query(br#"{"wallet_id":"w2"}"#), Ok(br#"{"balance":5,"known":true}"#.to_vec()));
    let err = h.query(br#"{"wallet": "w1"}"#).unwrap_err();
    assert!(err.starts_with("the request is not a valid BalanceQuery: missing field `wallet_id`"), "{err}");
}

/// Version 1 of a projection: one migration.
struct UsersV1;
/// Version 2, same state version: one migration more (a column).
struct UsersV2;
/// A version 2 whose first migration was edited after it ran.
struct UsersEdited;
/// A version 2 built for a new state version.
struct UsersV3;

const CREATE_USERS: &str = "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT NOT NULL)";

impl Projection for UsersV1 {
    const MIGRATIONS: &'static [&'static str] = &[CREATE_USERS];
    fn init(ctx: &Context, found: Option<u32>) -> Result<(), String> {
        ctx.state().set("found", &found)?;
        Ok(())
    }
    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        ctx.sql().execute("INSERT INTO users (id, email) VALUES (?1, 'a@x')", (event.id(),))?;
        Ok(())
    }
}

impl Projection for UsersV2 {
    // Reindenting a migration is not changing it.
    const MIGRATIONS: &'static [&'static str] = &[
        "CREATE TABLE users (id TEXT PRIMARY KEY,
            email TEXT NOT NULL)",
        "ALTER TABLE users ADD COLUMN name TEXT",
    ];
    fn init(ctx: &Context, found: Option<u32>) -> Result<(), String> {
        ctx.state().set("found", &found)?;
        Ok(())
    }
    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        ctx.sql().execute("INSERT INTO users (id, email, name) VALUES (?1, 'b@x', 'B')", (event.id(),))?;
        Ok(())
    }
}

impl Projection for UsersEdited {
    const MIGRATIONS: &'static [&'static str] =
        &["CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT)", "ALTER TABLE users ADD COLUMN name TEXT"];
    fn handle(_: &Context, _: &Event) -> Result<(), Failure> {
        Ok(())
    }
}

impl Projection for UsersV3 {
    const STATE_VERSION: u32 = 3;
    fn handle(_: &Context, _: &Event) -> Result<(), Failure> {
        Ok(())
    }
}

#[test]
fn migrations_run_once_in_order_and_a_new_one_adds_a_column_to_an_old_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.db");
    {
        let mut v1 = Harness::<UsersV1>::open(&path).unwrap();
        assert_eq!(v1.state::<Option<u32>>("found"), Some(None), "a new database holds no version");
        v1.handle(Event::new("registered", "").with_id("u1")).unwrap();
    }
    // The next version of the module opens the database v1 left.
    let mut v2 = Harness::<UsersV2>::open(&path).unwrap();
    assert_eq!(v2.state::<Option<u32>>("found"), Some(Some(1)), "init is told the version it finds");
    v2.handle(Event::new("registered", "").with_id("u2")).unwrap();
    let users = v2.rows("SELECT id, email, name FROM users ORDER BY id");
    assert_eq!(
        users.iter().collect::<Vec<_>>(),
        [
            [Value::Text("u1".into()), Value::Text("a@x".into()), Value::Null],
            [Value::Text("u2".into()), Value::Text("b@x".into()), Value::Text("B".into())],
        ]
    );
    let applied = v2.rows("SELECT n FROM projector_sdk_migrations ORDER BY n");
    assert_eq!(applied.iter().collect::<Vec<_>>(), [[Value::Integer(1)], [Value::Integer(2)]]);
    // Positions go on from where the old module's events ended.
    assert_eq!(v2.rows("SELECT position FROM projector_checkpoints").first().unwrap()[0], Value::Integer(2));
    drop(v2);

    // The same module again applies nothing.
    Harness::<UsersV2>::open(&path).unwrap();

    // An older module over the newer schema, an edited migration, and
    // another state version are refused with what to do.
    let older = Harness::<UsersV1>::open(&path).err().unwrap();
    assert!(older.contains("the database has had 2 migrations but this module lists 1"), "{older}");
    let edited = Harness::<UsersEdited>::open(&path).err().unwrap();
    assert!(edited.contains("migration 1 was changed after it was applied to this database"), "{edited}");
    assert!(edited.contains("put the change in a new migration at the end"), "{edited}");
    let version = Harness::<UsersV3>::open(&path).err().unwrap();
    assert!(
        version.contains("the database holds state version 1 but the projection builds version 3"),
        "{version}"
    );
}

#[test]
fn a_harness_can_take_over_the_database_of_another() {
    let mut v1 = Harness::<UsersV1>::new();
    v1.handle(Event::new("registered", "").with_id("u1")).unwrap();
    let v2 = Harness::<UsersV2>::from_connection(v1.into_connection()).unwrap();
    let names = v2.rows("SELECT id, name FROM users");
    assert_eq!(names.iter().collect::<Vec<_>>(), [[Value::Text("u1".into()), Value::Null]]);
}

#[test]
fn a_failing_migration_fails_init_naming_it() {
    struct Broken;
    impl Projection for Broken {
        const MIGRATIONS: &'static [&'static str] =
            &["CREATE TABLE a (x)", "ALTER TABLE missing ADD COLUMN y"];
        fn handle(_: &Context, _: &Event) -> Result<(), Failure> {
            Ok(())
        }
    }
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    let err = Harness::<Broken>::from_connection(conn).err().unwrap();
    assert_eq!(err, "init failed: migration 2 of 2 failed: sql: no such table: missing");
}

/// Charges each `approved` order once, emitting `order_charged`; an order
/// `bad` is rejected after emitting, and `boom` panics after emitting.
struct Charges;

impl Projection for Charges {
    const MIGRATIONS: &'static [&'static str] = &["CREATE TABLE charged (order_id TEXT PRIMARY KEY)"];

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let order = std::str::from_utf8(event.data()).unwrap();
        let new = ctx.sql().execute("INSERT OR IGNORE INTO charged (order_id) VALUES (?1)", (order,))?;
        if new == 1 {
            ctx.emit_with_subject("charges", "order_charged", order, &json!({"order_id": order}))?;
        }
        match order {
            "twice" => ctx.emit("audit", "order_noted", &json!({"order_id": order}))?,
            "bad" => return Err(Failure::reject("bad order")),
            "boom" => panic!("boom order"),
            "bad-stream" => ctx.emit("no such stream", "x", &json!(1))?,
            _ => {}
        }
        Ok(())
    }

    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        match ctx.emit("charges", "at_init", &json!(1)) {
            Err(err) => ctx.state().set("init-emit", &err.to_string())?,
            Ok(()) => panic!("init emitted"),
        }
        Ok(())
    }
}

#[test]
fn emitted_events_carry_their_cause_and_go_with_the_batch() {
    let mut h = Harness::<Charges>::new().with_name("charges");
    let init_error: String = h.state("init-emit").unwrap();
    assert!(init_error.contains("no event being handled caused it"), "{init_error}");

    h.handle(Event::new("approved", "o1").with_id("e1").with_correlation_id("c1")).unwrap();
    h.handle(Event::new("approved", "o1").with_id("e2")).unwrap();
    h.handle(Event::new("approved", "twice").with_id("e3").with_correlation_id("c3")).unwrap();
    // A failed batch's emits are rolled back with its writes.
    let failed = h.handle_batch(vec![Event::new("approved", "o2"), Event::new("approved", "bad")]);
    assert_eq!(failed, Err(Failure::reject("bad order")));

    let emitted = h.emitted();
    let ids: Vec<&str> = emitted.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["charges:1:0", "charges:3:0", "charges:3:1"]);
    let first = &emitted[0];
    assert_eq!((first.stream.as_str(), first.event_type.as_str()), ("charges", "order_charged"));
    assert_eq!(first.subject.as_deref(), Some("o1"));
    assert_eq!(first.json(), json!({"order_id": "o1"}));
    assert_eq!(first.correlation_id.as_deref(), Some("c1"));
    assert_eq!(first.causation_id, "e1");
    assert_eq!(first.source, "projector/charges");
    assert_eq!(first.position, 1);
    assert_eq!((emitted[2].stream.as_str(), emitted[2].subject.as_deref()), ("audit", None));
    assert_eq!(emitted[2].correlation_id.as_deref(), Some("c3"));

    let Err(Failure::Reject(reason)) = h.handle(Event::new("approved", "bad-stream")) else { panic!() };
    assert!(
        reason.starts_with(
            "emit of \"x\" on stream \"no such stream\": invalid stream name \"no such stream\""
        ),
        "{reason}"
    );
    assert_eq!(h.emitted().len(), 3);
}

#[test]
fn a_rejected_or_trapped_event_is_parked_and_the_rest_of_the_batch_applied() {
    let mut h = Harness::<Charges>::new();
    let events = ["o1", "bad", "o2", "o3", "boom", "o4"]
        .iter()
        .map(|order| Event::new("approved", *order).with_id(format!("id-{order}")))
        .collect();
    let parked = h.process_batch(events).unwrap();
    let parked: Vec<(&str, u64, &str)> =
        parked.iter().map(|d| (d.id.as_str(), d.position, d.reason.as_str())).collect();
    assert_eq!(parked, [("id-bad", 2, "bad order"), ("id-boom", 5, "module trapped: boom order")]);
    let charged = h.rows("SELECT order_id FROM charged ORDER BY order_id");
    let charged: Vec<&str> = charged.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(charged, ["o1", "o2", "o3", "o4"]);
    // The parked events' emits are gone with them; the others' are kept.
    let subjects: Vec<String> = h.emitted().into_iter().filter_map(|e| e.subject).collect();
    assert_eq!(subjects, ["o1", "o2", "o3", "o4"]);
    let dead = h.dead_letters();
    assert_eq!(dead.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["id-bad", "id-boom"]);
    assert_eq!(
        (dead[0].stream.as_str(), dead[0].event_type.as_str(), &dead[0].data[..]),
        ("test", "approved", &b"bad"[..])
    );

    // A retry is the projection's to ask; nothing is parked for it.
    struct Waits;
    impl Projection for Waits {
        fn handle(_: &Context, _: &Event) -> Result<(), Failure> {
            Err(Failure::retry("later"))
        }
    }
    let mut w = Harness::<Waits>::new();
    assert_eq!(w.process(Event::new("x", "")), Err(Failure::retry("later")));
    assert!(w.dead_letters().is_empty());
}
