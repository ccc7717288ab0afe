//! `projector replay` shows a progress bar on a terminal and stays quiet
//! when stdout is not one (so piped output is exactly the JSON).

use crate::util::*;
use serde_json::json;
use std::process::Command;

#[test]
fn replay_shows_progress_only_on_a_terminal() {
    let ws = Workspace::new();
    let lines: Vec<String> = (0..20_000).map(|i| cloud_event(&format!("e{i}"), "t", json!(i))).collect();
    let events = ws.write_events("e.jsonl", &lines);
    let module = guest("event_recorder");
    let args = ["replay", "--module", module.to_str().unwrap(), "--events", &events, "--batch", "100"];

    let piped = projector().args(args).output().unwrap();
    assert!(piped.status.success());
    assert_eq!(json(&String::from_utf8(piped.stdout).unwrap()), json!({"count": 20000}));
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("events ("), "no progress when piped");

    // `script` gives the command a pseudo-terminal.
    let command = format!("{} {}", env!("CARGO_BIN_EXE_projector"), args.map(|a| format!("'{a}'")).join(" "));
    let out = Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("/20000 events ("), "a progress bar on the terminal:\n{screen}");
    assert!(screen.contains("\"count\": 20000"), "{screen}");
}
