//! `projector events`: a stream of the embedded log as CloudEvents JSON —
//! what `projector append` put in comes out, `--from`, `--follow` picking
//! up a later append, and the errors for a missing folder, log or bad name.

use crate::util::*;
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

/// Events of every shape the log keeps: JSON data of each kind, text,
/// binary, none, and every optional attribute.
fn varied_events() -> Vec<String> {
    let mut lines = vec![
        json!({"specversion": "1.0", "id": "e1", "source": "shop", "type": "order_placed",
               "subject": "ord-1", "time": "2026-05-01T09:00:00Z", "correlationid": "c-1",
               "causationid": "cmd-1", "data": {"order_id": "ord-1", "lines": [1, 2], "gift": false}}),
        json!({"specversion": "1.0", "id": "e2", "source": "shop", "type": "note", "correlationid": "c-2",
               "data": "a JSON string"}),
        json!({"specversion": "1.0", "id": "e3", "source": "shop", "type": "note", "correlationid": "c-3",
               "datacontenttype": "text/plain", "data": "plain text, not JSON"}),
        json!({"specversion": "1.0", "id": "e4", "source": "shop", "type": "blob", "correlationid": "c-4",
               "datacontenttype": "application/octet-stream", "data_base64": "AAEC/w=="}),
        json!({"specversion": "1.0", "id": "e5", "source": "shop", "type": "ping", "correlationid": "c-5"}),
        json!({"specversion": "1.0", "id": "e6", "source": "shop", "type": "count", "correlationid": "c-6",
               "datacontenttype": "application/json", "data": 42}),
    ];
    lines.extend((7..=10).map(|i| {
        json!({"specversion": "1.0", "id": format!("e{i}"), "source": "shop", "type": "tick",
               "correlationid": format!("c-{i}"), "data": {"n": i}})
    }));
    lines.iter().map(Value::to_string).collect()
}

#[test]
fn what_append_puts_in_comes_out() {
    let ws = Workspace::new();
    let lines = varied_events();
    let file = ws.write_events("in.jsonl", &lines);
    assert_eq!(ws.append("shop", &file), (10, 0));
    let written: Vec<Value> = lines.iter().map(|line| json(line)).collect();
    assert_eq!(ws.events("shop"), written);

    // And back in: the same events, so the log takes none again, and a
    // second log given the output prints the same.
    let out = run_ok(&["events", "--data", &ws.data_str(), "shop"]);
    let again = ws.write_events("out.jsonl", &out.lines().map(String::from).collect::<Vec<_>>());
    assert_eq!(ws.append("shop", &again), (0, 10));
    let other = Workspace::new();
    assert_eq!(other.append("copy", &again), (10, 0));
    assert_eq!(other.events("copy"), written);

    // Another stream of the same log is not mixed in; one never written to
    // is empty.
    ws.append("other", &ws.write_events("other.jsonl", &[cloud_event("x1", "t", json!(1))]));
    assert_eq!(ws.events("shop").len(), 10);
    assert!(ws.events("nothing-here").is_empty());
}

#[test]
fn from_starts_at_a_position_of_the_stream() {
    let ws = Workspace::new();
    // Interleaved with another stream: positions are the stream's own.
    for (i, line) in varied_events().iter().enumerate() {
        ws.append("shop", &ws.write_events(&format!("s{i}.jsonl"), std::slice::from_ref(line)));
        ws.append(
            "other",
            &ws.write_events(&format!("o{i}.jsonl"), &[cloud_event(&format!("o{i}"), "t", json!(i))]),
        );
    }
    let from = |position: &str| -> Vec<String> {
        run_ok(&["events", "--data", &ws.data_str(), "shop", "--from", position])
            .lines()
            .map(|line| json(line)["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(from("8"), ["e8", "e9", "e10"]);
    assert_eq!(from("1").len(), 10);
    assert_eq!(from("0").len(), 10, "0 is before the first");
    assert!(from("11").is_empty());
}

#[test]
fn follow_prints_what_is_appended_after_it_started() {
    let ws = Workspace::new();
    ws.append("shop", &ws.write_events("first.jsonl", &[cloud_event("first", "t", json!(1))]));
    let mut child = projector()
        .args(["events", "--data", &ws.data_str(), "shop", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, received) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || json(&received.recv_timeout(Duration::from_secs(30)).expect("a line within 30 s"));
    assert_eq!(next()["id"], "first");
    // Appended by another process while it waits, and over HTTP to a
    // running host, which writes the log it reads.
    ws.append("shop", &ws.write_events("second.jsonl", &[cloud_event("second", "t", json!(2))]));
    assert_eq!(next()["id"], "second");
    ws.write_config(&[("recorder", &guest("event_recorder"), &["other"])]);
    let host = ws.start();
    let third = cloud_event("third", "t", json!(3));
    ureq::post(format!("{}/streams/shop/events", host.url()))
        .header("content-type", "application/cloudevents+json")
        .send(&third)
        .unwrap();
    assert_eq!(next()["id"], "third");
    assert!(child.try_wait().unwrap().is_none(), "it keeps following");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(host);
}

#[test]
fn a_missing_folder_or_log_and_a_bad_stream_name_are_named() {
    let ws = Workspace::new();
    let missing = ws.path("nowhere");
    let error = run_err(&["events", "--data", missing.to_str().unwrap(), "shop"]);
    assert!(error.contains(&format!("there is no data folder {}", missing.display())), "{error}");
    std::fs::create_dir_all(ws.data()).unwrap();
    let error = run_err(&["events", "--data", &ws.data_str(), "shop"]);
    assert!(
        error.contains(&format!("there is no event log in {} (no events.db)", ws.data().display()))
            && error.contains("`projector append` or `projector run` creates it"),
        "{error}"
    );
    assert!(!ws.data().join("events.db").exists(), "reading never creates a log");
    ws.append("shop", &ws.write_events("a.jsonl", &[cloud_event("a", "t", json!(1))]));
    let error = run_err(&["events", "--data", &ws.data_str(), "no spaces/or slashes"]);
    assert!(
        error.contains(r#"invalid stream name "no spaces/or slashes": use 1 to 128 ASCII letters"#),
        "{error}"
    );
}
