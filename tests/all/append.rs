//! `projector append`: CloudEvents into the embedded log — counts, duplicate
//! ids, all-or-nothing files, standard input and bad input.

use crate::util::*;
use serde_json::json;

fn head(ws: &Workspace) -> u64 {
    let path = ws.data().join("events.db");
    if !path.exists() {
        return 0;
    }
    let db = rusqlite::Connection::open(path).unwrap();
    db.query_row("SELECT coalesce(max(position), 0) FROM events", [], |r| r.get::<_, i64>(0)).unwrap() as u64
}

#[test]
fn append_counts_appended_and_duplicate_ids() {
    let ws = Workspace::new();
    let first =
        ws.write_events("a.jsonl", &[cloud_event("e1", "t", json!(1)), cloud_event("e2", "t", json!(2))]);
    assert_eq!(ws.append("s", &first), (2, 0));
    // The publisher retried: e2 again, plus a new e3, plus e3 twice in one file.
    let second = ws.write_events(
        "b.jsonl",
        &[
            cloud_event("e2", "t", json!(2)),
            cloud_event("e3", "t", json!(3)),
            cloud_event("e3", "t", json!(3)),
        ],
    );
    assert_eq!(ws.append("s", &second), (1, 2));
    assert_eq!(head(&ws), 3);
}

#[test]
fn positions_are_global_and_per_stream() {
    let ws = Workspace::new();
    let a = ws.write_events("a.jsonl", &[cloud_event("a1", "t", json!(1)), cloud_event("a2", "t", json!(2))]);
    let b = ws.write_events("b.jsonl", &[cloud_event("b1", "t", json!(1))]);
    ws.append("alpha", &a);
    ws.append("beta", &b);
    let db = rusqlite::Connection::open(ws.data().join("events.db")).unwrap();
    let rows: Vec<(i64, String, i64)> = db
        .prepare("SELECT position, stream, stream_position FROM events ORDER BY position")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec![(1, "alpha".into(), 1), (2, "alpha".into(), 2), (3, "beta".into(), 1)]);
}

#[test]
fn a_file_with_one_bad_line_appends_nothing() {
    let ws = Workspace::new();
    let good = ws.write_events("good.jsonl", &[cloud_event("e0", "t", json!(0))]);
    ws.append("s", &good);
    let bad = ws.write_events(
        "bad.jsonl",
        &[
            cloud_event("e1", "t", json!(1)),
            cloud_event("e2", "t", json!(2)),
            r#"{"specversion":"0.3","id":"e3","source":"tests","type":"t"}"#.to_string(),
            cloud_event("e4", "t", json!(4)),
        ],
    );
    let err = run_err(&["append", "--data", &ws.data_str(), "s", &bad]);
    assert!(
        err.contains("bad.jsonl: line 3: attribute `specversion` must be \"1.0\", found \"0.3\""),
        "{err}"
    );
    assert_eq!(head(&ws), 1, "nothing of the bad file was appended");
}

#[test]
fn every_kind_of_bad_line_is_reported_with_its_line_and_attribute() {
    let ws = Workspace::new();
    let cases = [
        ("not json at all", "line 1: not a CloudEvent: invalid JSON"),
        (r#"{"specversion":"1.0","source":"s","type":"t"}"#, "line 1: missing required attribute `id`"),
        (r#"{"specversion":"1.0","id":"x","type":"t"}"#, "line 1: missing required attribute `source`"),
        (
            r#"{"specversion":"1.0","id":"x","source":"s","type":3}"#,
            "line 1: attribute `type` must be a string, found a number",
        ),
        (
            r#"{"specversion":"1.0","id":"x","source":"s","type":"t","time":"noon"}"#,
            "line 1: attribute `time` is not an RFC 3339 timestamp",
        ),
    ];
    for (line, expected) in cases {
        let file = ws.write_events("bad.jsonl", &[line.to_string()]);
        let err = run_err(&["append", "--data", &ws.data_str(), "s", &file]);
        assert!(err.contains(expected), "{line}: {err}");
    }
    assert!(!ws.data().exists(), "bad input created nothing");
}

#[test]
fn append_reads_standard_input() {
    let ws = Workspace::new();
    let input = format!("{}\n{}\n", cloud_event("e1", "t", json!(1)), cloud_event("e2", "t", json!(2)));
    let out = run_with_stdin(&["append", "--data", &ws.data_str(), "s", "-"], &input);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&String::from_utf8(out.stdout).unwrap()), json!({"appended": 2, "duplicates": 0}));
}

#[test]
fn a_bad_stream_name_is_refused() {
    let ws = Workspace::new();
    let file = ws.write_events("e.jsonl", &[cloud_event("e1", "t", json!(1))]);
    let err = run_err(&["append", "--data", &ws.data_str(), "no spaces/please", &file]);
    assert!(err.contains("invalid stream name \"no spaces/please\""), "{err}");
}
