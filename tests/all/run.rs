//! `projector run` with appends from another process: processing, status,
//! query, stream and type filters, restarts, clean shutdown on SIGTERM and
//! SIGINT, refusals, and the command line's help.

use crate::util::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn run_processes_appends_from_another_process_and_serves_status_and_query() {
    let ws = Workspace::new();
    let module = guest("wallet_allowlist");
    ws.write_config(&[("wallet-allowlist", &module, &["wallets"])]);
    let before = ws.status_of("wallet-allowlist");
    assert_eq!(before["state"], "new");

    let host = ws.start();
    let seed = root().join("projections/wallet-allowlist/fixtures/seed.jsonl");
    assert_eq!(ws.append("wallets", seed.to_str().unwrap()), (10, 0));
    ws.wait_caught_up(10, WAIT);

    let status = ws.status_of("wallet-allowlist");
    assert_eq!(status["state"], "running");
    assert_eq!(status["module"], sha256_file(&module));
    assert_eq!(status["head"], 10);
    assert_eq!(status["lag"], 0);

    let allowlist = ws.query(
        "wallet-allowlist",
        "SELECT wallet_address, user_id, allowlisted_at FROM allowlist ORDER BY wallet_address",
    );
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(
            root().join("projections/wallet-allowlist/fixtures/expected-allowlist.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(allowlist, expected);

    // A query cannot write, even while run is running.
    let err = run_err(&[
        "query",
        "--config",
        &ws.config_str(),
        "wallet-allowlist",
        "--sql",
        "DELETE FROM allowlist",
    ]);
    assert!(
        err.contains("readonly") || err.contains("read-only") || err.contains("attempt to write"),
        "{err}"
    );

    let exit = host.terminate();
    assert!(exit.success(), "run exits cleanly on SIGTERM: {exit:?}");
    assert_eq!(ws.status_of("wallet-allowlist")["state"], "stopped");
}

#[test]
fn each_projection_sees_only_its_streams_and_types() {
    let ws = Workspace::new();
    let recorder = guest("event_recorder");
    std::fs::write(
        ws.config(),
        format!(
            r#"version = 1
[[projection]]
name = "alpha"
module = {recorder:?}
streams = ["alpha"]

[[projection]]
name = "beta-kept"
module = {recorder:?}
streams = ["alpha", "beta"]
types = ["kept"]
"#
        ),
    )
    .unwrap();
    let host = ws.start();
    let a = ws.write_events(
        "a.jsonl",
        &[cloud_event("a1", "kept", json!(1)), cloud_event("a2", "other", json!(2))],
    );
    let b = ws.write_events(
        "b.jsonl",
        &[cloud_event("b1", "kept", json!(1)), cloud_event("b2", "other", json!(2))],
    );
    ws.append("alpha", &a);
    ws.append("beta", &b);
    ws.wait_caught_up(4, WAIT);
    let ids = |p: &str| ws.query(p, "SELECT id FROM handled ORDER BY position");
    assert_eq!(ids("alpha"), json!([{"id": "a1"}, {"id": "a2"}]));
    assert_eq!(ids("beta-kept"), json!([{"id": "a1"}, {"id": "b1"}]));
    drop(host);
}

#[test]
fn a_restart_resumes_from_the_checkpoint_without_reapplying() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["s"])]);
    // Events appended before the host starts are caught up at start.
    let first = ws.write_events(
        "1.jsonl",
        &(0..500).map(|i| cloud_event(&format!("a{i}"), "t", json!(i))).collect::<Vec<_>>(),
    );
    ws.append("s", &first);
    let host = ws.start();
    ws.wait_caught_up(500, WAIT);
    assert!(host.terminate().success());

    let second = ws.write_events(
        "2.jsonl",
        &(0..300).map(|i| cloud_event(&format!("b{i}"), "t", json!(i))).collect::<Vec<_>>(),
    );
    ws.append("s", &second);
    let host = ws.start();
    ws.wait_caught_up(800, WAIT);
    let counts = ws.query(
        "recorder",
        "SELECT count(*) AS n, count(DISTINCT position) AS distinct_positions FROM handled",
    );
    assert_eq!(counts, json!([{"n": 800, "distinct_positions": 800}]));
    drop(host);
}

#[test]
fn a_second_run_on_the_same_data_is_refused() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["s"])]);
    let host = ws.start();
    wait_until(WAIT, "the first run to start", || ws.status_of("recorder")["state"] == "running");
    let err = run_err(&["run", "--config", &ws.config_str()]);
    assert!(err.contains("another `projector run` is already using"), "{err}");
    drop(host);
}

#[test]
fn a_projection_whose_module_cannot_load_is_faulted_and_the_others_run() {
    let ws = Workspace::new();
    let broken = ws.path("broken.wasm");
    std::fs::write(&broken, b"\0asm\x01\0\0\0garbage").unwrap();
    ws.write_config(&[("broken", &broken, &["s"]), ("recorder", &guest("event_recorder"), &["s"])]);
    let host = ws.start();
    let file = ws.write_events("e.jsonl", &[cloud_event("e1", "t", json!(1))]);
    ws.append("s", &file);
    wait_until(WAIT, "recorder to catch up", || ws.status_of("recorder")["checkpoint"] == 1);
    let status = ws.status_of("broken");
    assert_eq!(status["state"], "faulted");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("broken.wasm"), "{error}");
    assert!(host.logs().contains("projection faulted"), "{}", host.logs());
    drop(host);
}

#[test]
fn a_bad_config_is_refused_with_the_exact_problem() {
    let ws = Workspace::new();
    std::fs::write(
        ws.config(),
        "version = 1\n[[projection]]\nname = \"p\"\nmodule = \"m.wasm\"\nstream = [\"s\"]\n",
    )
    .unwrap();
    let err = run_err(&["run", "--config", &ws.config_str()]);
    assert!(err.contains("unknown field `stream`"), "{err}");
    assert!(err.contains("projector.toml"), "{err}");
    assert!(!ws.data().exists(), "a refused config changes nothing");
    let missing = run_err(&["status", "--config", ws.path("nope.toml").to_str().unwrap()]);
    assert!(missing.contains("cannot read config") && missing.contains("nope.toml"), "{missing}");
}

#[test]
fn sigint_stops_run_cleanly_with_a_consistent_checkpoint() {
    const EVENTS: u64 = 20_000;
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["s"])]);
    let file = ws.write_events(
        "e.jsonl",
        &(0..EVENTS).map(|i| cloud_event(&format!("e{i}"), "t", json!(i))).collect::<Vec<_>>(),
    );
    ws.append("s", &file);
    let host = ws.start();
    wait_until(WAIT, "the recorder to handle events", || {
        ws.status_of("recorder")["checkpoint"].as_u64().unwrap_or(0) > 0
    });

    let exit = host.interrupt();
    assert!(exit.success(), "run exits cleanly on SIGINT: {exit:?}");
    let status = ws.status_of("recorder");
    assert_eq!(status["state"], "stopped");
    // Every handled event is under the checkpoint, each once, none past it.
    let at = status["checkpoint"].as_u64().unwrap();
    assert!(at > 0 && at <= EVENTS, "checkpoint {at}");
    let counts = |ws: &Workspace| {
        ws.query(
            "recorder",
            "SELECT count(*) AS n, count(DISTINCT position) AS distinct_positions, \
             coalesce(max(position), 0) AS last FROM handled",
        )
    };
    assert_eq!(counts(&ws), json!([{"n": at, "distinct_positions": at, "last": at}]));

    // A restart goes on from there.
    let host = ws.start();
    ws.wait_caught_up(EVENTS, WAIT);
    assert_eq!(counts(&ws), json!([{"n": EVENTS, "distinct_positions": EVENTS, "last": EVENTS}]));
    assert!(host.interrupt().success());
}

#[test]
fn help_lists_every_subcommand_and_each_one_explains_its_flags() {
    let help = run_ok(&["--help"]);
    let commands: [(&[&str], &[&str]); 11] = [
        (&["run"], &["--config", "--listen", "--max-body-kib"]),
        (&["append"], &["--data", "<STREAM>", "<FILE>"]),
        (&["replay"], &["--module", "--events", "--stream", "--sql", "--batch"]),
        (&["status"], &["--config", "--url"]),
        (&["query"], &["--config", "--url", "<PROJECTION>", "--sql", "--request"]),
        (&["dead-letters"], &["list", "retry", "discard"]),
        (&["dead-letters", "list"], &["--config", "--url", "<PROJECTION>"]),
        (&["dead-letters", "retry"], &["--config", "--url", "<PROJECTION>", "[IDS]...", "--all"]),
        (&["dead-letters", "discard"], &["--config", "--url", "<PROJECTION>", "<IDS>..."]),
        (&["rebuild"], &["--config", "<PROJECTION>"]),
        (&["help"], &[]),
    ];
    for (command, flags) in commands {
        if command.len() == 1 {
            let listed = help.lines().any(|line| line.trim_start().starts_with(&format!("{} ", command[0])));
            assert!(listed, "`projector --help` lists {}:\n{help}", command[0]);
        }
        if command == ["help"] {
            continue;
        }
        let args: Vec<&str> = command.iter().copied().chain(["--help"]).collect();
        let usage = run_ok(&args);
        assert!(usage.contains(&format!("Usage: projector {}", command.join(" "))), "{usage}");
        for flag in flags {
            assert!(usage.contains(flag), "`projector {}` mentions {flag}:\n{usage}", args.join(" "));
        }
    }
}
