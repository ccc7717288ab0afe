//! Hot swap in a real `run`: modules replaced under continuous appends
//! (every event handled exactly once, by the old module before the swap
//! point and the new one after), refusals, bursts, live config changes and
//! the compiled-module cache.

use crate::util::*;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn module_bytes(version: u32) -> Vec<u8> {
    std::fs::read(guest(&format!("swap_v{version}"))).unwrap()
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Replace `path` by rename-over (what editors and deploy tools do).
fn rename_over(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Appends events over HTTP, `per_post` at a time every few milliseconds,
/// until stopped; returns every line sent.
fn appender(base: String, stop: Arc<AtomicBool>, per_post: usize) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut sent = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let lines: Vec<String> =
                (0..per_post).map(|i| cloud_event(&format!("g{}-{i}", sent.len()), "t", json!(i))).collect();
            let response = agent
                .post(&format!("{base}/streams/s/events"))
                .header("content-type", "application/x-ndjson")
                .send(lines.join("\n").as_str())
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
            sent.extend(lines);
            std::thread::sleep(Duration::from_millis(4));
        }
        sent
    })
}

fn swap_workspace(initial: u32) -> (Workspace, std::path::PathBuf) {
    let ws = Workspace::new();
    let module = ws.path("module.wasm");
    std::fs::write(&module, module_bytes(initial)).unwrap();
    ws.write_config(&[("swap", &module, &["s"])]);
    (ws, module)
}

fn versions_seen(ws: &Workspace) -> Vec<i64> {
    ws.query("swap", "SELECT version FROM handled ORDER BY position")
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_i64().unwrap())
        .collect()
}

#[test]
fn swaps_under_continuous_appends_handle_every_event_exactly_once() {
    let (ws, module) = swap_workspace(1);
    let host = ws.start();
    // Before the projection's database exists, status names the file's hash.
    wait_until(WAIT, "the projection to start", || ws.status_of("swap")["state"] == "running");
    let stop = Arc::new(AtomicBool::new(false));
    let appending = appender(host.url(), stop.clone(), 20);
    let sequence = [2, 1, 2, 1, 2, 1, 2];
    for (i, version) in sequence.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(150));
        let bytes = module_bytes(*version);
        if i % 2 == 0 {
            rename_over(&module, &bytes)
        } else {
            std::fs::write(&module, &bytes).unwrap()
        }
        let want = sha(&bytes);
        wait_until(WAIT, &format!("v{version} to be live"), || {
            ws.status_of("swap")["module"] == want.as_str()
        });
        wait_until(WAIT, &format!("an event handled by v{version}"), || {
            versions_seen(&ws).last() == Some(&(*version as i64))
        });
    }
    stop.store(true, Ordering::Relaxed);
    let sent = appending.join().unwrap().len() as u64;
    ws.wait_caught_up(sent, WAIT);

    let counts = ws.query("swap", "SELECT count(*) AS n, count(DISTINCT position) AS d, min(position) AS lo, max(position) AS hi FROM handled");
    assert_eq!(counts, json!([{"n": sent, "d": sent, "lo": 1, "hi": sent}]), "every position exactly once");
    let mut runs: Vec<i64> = versions_seen(&ws);
    runs.dedup();
    let mut expected = vec![1i64];
    expected.extend(sequence.iter().map(|v| *v as i64));
    assert_eq!(runs, expected, "versions form one contiguous run per swap");
    assert!(host.logs().matches("module swapped in").count() >= sequence.len());
    assert!(ws.status_of("swap").get("refused").is_none());
}

#[test]
fn bad_modules_are_refused_and_the_running_module_keeps_processing() {
    let (ws, module) = swap_workspace(1);
    let host = ws.start();
    let url = host.url();
    wait_until(WAIT, "the projection to start", || ws.status_of("swap")["state"] == "running");
    let v1 = sha(&module_bytes(1));
    let mut appended = 0u64;
    let mut append = |ws: &Workspace| {
        let lines: Vec<String> =
            (0..5).map(|i| cloud_event(&format!("r{appended}-{i}"), "t", json!(i))).collect();
        appended += 5;
        let file = ws.write_events("more.jsonl", &lines);
        ws.append("s", &file);
        appended
    };
    let refusals: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"definitely not wasm".to_vec(), "is not a WebAssembly file"),
        ("another world", wat::parse_str("(component)").unwrap(), "does not implement the projection world"),
        (
            "failing init",
            std::fs::read(guest("bad_init")).unwrap(),
            "refused to init: this module refuses to init",
        ),
    ];
    for (what, bytes, expected) in refusals {
        rename_over(&module, &bytes);
        wait_until(WAIT, &format!("the {what} module to be refused"), || {
            ws.status_of("swap")["refused"]["module"] == sha(&bytes).as_str()
        });
        let status = ws.status_of("swap");
        let reason = status["refused"]["reason"].as_str().unwrap();
        assert!(reason.contains(expected), "{what}: {reason}");
        assert_eq!(status["module"], v1.as_str(), "{what}: the old module keeps running");
        let head = append(&ws);
        ws.wait_caught_up(head, WAIT);
        assert_eq!(versions_seen(&ws).last(), Some(&1), "{what}: processed by v1");
        assert!(host.logs().contains("module refused, the running module stays"));
    }
    let v2 = module_bytes(2);
    rename_over(&module, &v2);
    wait_until(WAIT, "v2 to be live", || ws.status_of("swap")["module"] == sha(&v2).as_str());
    assert!(ws.status_of("swap").get("refused").is_none(), "a good module clears the refusal");
    let head = append(&ws);
    ws.wait_caught_up(head, WAIT);
    assert_eq!(versions_seen(&ws).last(), Some(&2));
    let _ = url;
}

#[test]
fn same_bytes_do_nothing_and_a_burst_of_writes_swaps_once() {
    let (ws, module) = swap_workspace(1);
    let host = ws.start();
    let base = host.url();
    wait_until(WAIT, "the projection to start", || ws.status_of("swap")["state"] == "running");
    let swaps = || -> f64 {
        let text = ureq::get(&format!("{base}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
        text.lines()
            .find(|l| l.starts_with("projector_module_swaps_total{projection=\"swap\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    // Touch: the same bytes written again.
    std::fs::write(&module, module_bytes(1)).unwrap();
    rename_over(&module, &module_bytes(1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(swaps(), 0.0, "the same bytes swap nothing");
    // A burst: v2 written five times in a row, in pieces.
    let v2 = module_bytes(2);
    for _ in 0..5 {
        let (head, tail) = v2.split_at(v2.len() / 2);
        let mut file = std::fs::File::create(&module).unwrap();
        std::io::Write::write_all(&mut file, head).unwrap();
        std::io::Write::write_all(&mut file, tail).unwrap();
        drop(file);
    }
    wait_until(WAIT, "v2 to be live", || ws.status_of("swap")["module"] == sha(&v2).as_str());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(swaps(), 1.0, "a burst of writes gives one swap");
}

#[test]
fn config_changes_add_remove_and_reconfigure_projections_live() {
    let ws = Workspace::new();
    let recorder = guest("event_recorder");
    let write_config = |text: &str| rename_over(&ws.config(), format!("version = 1\n{text}").as_bytes());
    let a = format!("[[projection]]\nname = \"a\"\nmodule = {recorder:?}\nstreams = [\"s\"]\n");
    write_config(&a);
    let host = ws.start();
    let events = |name: &str, n: usize| {
        ws.write_events(
            &format!("{name}.jsonl"),
            &(0..n)
                .map(|i| {
                    cloud_event(&format!("{name}{i}"), if i % 2 == 0 { "even" } else { "odd" }, json!(i))
                })
                .collect::<Vec<_>>(),
        )
    };
    ws.append("s", &events("first", 10));
    ws.wait_caught_up(10, WAIT);

    // Add b: it starts from the beginning of its streams.
    let b = format!("[[projection]]\nname = \"b\"\nmodule = {recorder:?}\nstreams = [\"s\"]\n");
    write_config(&format!("{a}\n{b}"));
    wait_until(WAIT, "b to catch up", || {
        ws.status().iter().any(|s| s["name"] == "b" && s["checkpoint"] == 10)
    });
    assert_eq!(ws.query("b", "SELECT count(*) AS n FROM handled"), json!([{"n": 10}]));

    // A broken config is refused; the running set is unchanged.
    write_config("[[projection]]\nname = ");
    wait_until(WAIT, "the refusal", || {
        host.logs().contains("config refused, the running projections are unchanged")
    });
    ws.append("s", &events("second", 4));
    wait_until(WAIT, "a and b to go on", || {
        let status = json(&run_ok(&["status", "--url", &host.url()]));
        status.as_array().unwrap().iter().filter(|s| s["checkpoint"] == 14).count() == 2
    });

    // Remove a (its database stays), and change b to odd events of stream t.
    let b_changed = format!(
        "[[projection]]\nname = \"b\"\nmodule = {recorder:?}\nstreams = [\"t\"]\ntypes = [\"odd\"]\n"
    );
    write_config(&b_changed);
    wait_until(WAIT, "a to stop", || ws.status().iter().all(|s| s["name"] != "a"));
    assert!(ws.data().join("projections/a.db").exists(), "a removed projection's database is kept");
    wait_until(WAIT, "b to restart", || {
        host.logs().matches("projection (re)started from the config").count() >= 2
    });
    ws.append("s", &events("third", 4));
    ws.append("t", &events("fourth", 6));
    ws.wait_caught_up(24, WAIT);
    let ids = ws.query("b", "SELECT id FROM handled WHERE position > 14 ORDER BY position");
    assert_eq!(ids, json!([{"id": "fourth1"}, {"id": "fourth3"}, {"id": "fourth5"}]));
    let status: Value = json(&run_ok(&["status", "--url", &host.url()]));
    assert_eq!(status.as_array().unwrap().len(), 1);
}

#[test]
fn a_restart_with_unchanged_modules_compiles_nothing() {
    let (ws, _module) = swap_workspace(1);
    let host = ws.start();
    wait_until(WAIT, "the first start", || ws.status_of("swap")["state"] == "running");
    assert!(host.logs().contains("module compiled and cached"), "{}", host.logs());
    assert!(host.terminate().success());
    let host = ws.start();
    wait_until(WAIT, "the second start", || ws.status_of("swap")["state"] == "running");
    let logs = host.logs();
    assert!(logs.contains("module loaded from the compiled-module cache"), "{logs}");
    assert!(!logs.contains("module compiled and cached"), "{logs}");
}

#[test]
fn a_state_version_change_rebuilds_blue_green_and_readers_never_see_half_a_state() {
    let (ws, module) = swap_workspace(1);
    // A log long enough that the rebuild takes a while.
    let prefill: Vec<String> = (0..40_000).map(|i| cloud_event(&format!("p{i}"), "t", json!(i))).collect();
    let prefill_file = ws.write_events("prefill.jsonl", &prefill);
    ws.append("s", &prefill_file);
    let host = ws.start();
    let base = host.url();
    ws.wait_caught_up(40_000, WAIT);

    let stop = Arc::new(AtomicBool::new(false));
    let appending = appender(base.clone(), stop.clone(), 50);
    // A reader over HTTP: every state it sees is complete (one row per
    // event up to its checkpoint) and never goes back.
    let reading = {
        let (base, stop) = (base.clone(), stop.clone());
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let (mut last, mut reads) = (0u64, 0u64);
            let sql = json!({"sql": "SELECT (SELECT count(*) FROM handled) AS n, (SELECT position FROM projector_checkpoints) AS cp"});
            while !stop.load(Ordering::Relaxed) {
                let mut response =
                    agent.post(&format!("{base}/projections/swap/sql")).send_json(&sql).unwrap();
                let rows: Value =
                    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
                let (n, cp) = (rows[0]["n"].as_u64().unwrap(), rows[0]["cp"].as_u64().unwrap());
                assert_eq!(n, cp, "a complete state: one row per event up to the checkpoint");
                assert!(
                    cp >= last,
                    "the state never goes back ({cp} after {last}): no half-built database is served"
                );
                last = cp;
                reads += 1;
            }
            reads
        })
    };

    let v3 = module_bytes(3);
    rename_over(&module, &v3);
    let mut saw_rebuilding = false;
    wait_until(WAIT, "v3 to take over", || {
        let status = ws.status_of("swap");
        if status["state"] == "rebuilding" {
            assert!(
                status["rebuilding"]["position"].as_u64().unwrap()
                    <= status["rebuilding"]["head"].as_u64().unwrap()
            );
            assert_eq!(status["module"], sha(&module_bytes(1)), "the old module serves until the takeover");
            saw_rebuilding = true;
        }
        status["module"] == sha(&v3).as_str()
    });
    assert!(saw_rebuilding, "status showed the rebuild under way");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let sent = appending.join().unwrap();
    let reads = reading.join().unwrap();
    assert!(reads > 10, "the reader kept reading ({reads} reads)");
    let head = 40_000 + sent.len() as u64;
    ws.wait_caught_up(head, WAIT);

    // The state equals a replay of every event with the new module.
    let all: Vec<String> = prefill.into_iter().chain(sent).collect();
    let all_file = ws.write_events("all.jsonl", &all);
    let sql = "SELECT position, version FROM handled ORDER BY position";
    let replayed = json(&run_ok(&[
        "replay",
        "--module",
        guest("swap_v3").to_str().unwrap(),
        "--events",
        &all_file,
        "--sql",
        sql,
    ]));
    assert_eq!(ws.query("swap", sql), replayed);
    assert_eq!(replayed.as_array().unwrap().len() as u64, head);
    assert!(!ws.data().join("projections/swap.db").exists(), "the old database is removed");
    assert_eq!(std::fs::read_to_string(ws.data().join("projections/swap.current")).unwrap(), "swap.1.db");
    // Readers see the new generation a moment before its line is logged.
    wait_until(WAIT, "the take-over to be logged", || {
        host.logs().contains("rebuild caught up and took over")
    });
}

#[test]
fn projector_rebuild_works_against_a_running_host_and_offline() {
    let (ws, _module) = swap_workspace(1);
    let events: Vec<String> = (0..2_000).map(|i| cloud_event(&format!("r{i}"), "t", json!(i))).collect();
    let file = ws.write_events("events.jsonl", &events);
    ws.append("s", &file);
    let host = ws.start();
    ws.wait_caught_up(2_000, WAIT);
    let complete = json!([{"n": 2000, "d": 2000}]);
    let counts = "SELECT count(*) AS n, count(DISTINCT position) AS d FROM handled";

    let out = json(&run_ok(&["rebuild", "--config", &ws.config_str(), "swap"]));
    assert_eq!(out["rebuilt"], "swap");
    assert!(out["database"].as_str().unwrap().ends_with("swap.1.db"), "{out}");
    assert_eq!(ws.query("swap", counts), complete);
    assert!(host.logs().contains("rebuild requested"));
    assert!(host.terminate().success());

    // With no host running, the command rebuilds by itself.
    let out = json(&run_ok(&["rebuild", "--config", &ws.config_str(), "swap"]));
    assert!(out["database"].as_str().unwrap().ends_with("swap.2.db"), "{out}");
    assert_eq!(ws.query("swap", counts), complete);
    assert!(!ws.data().join("projections/swap.1.db").exists());
    let err = run_err(&["rebuild", "--config", &ws.config_str(), "nope"]);
    assert!(err.contains("no projection named \"nope\""), "{err}");
}

#[test]
fn a_restart_with_a_module_of_another_state_version_rebuilds_before_processing() {
    let (ws, module) = swap_workspace(1);
    let events: Vec<String> = (0..5_000).map(|i| cloud_event(&format!("v{i}"), "t", json!(i))).collect();
    ws.append("s", &ws.write_events("events.jsonl", &events));
    let host = ws.start();
    ws.wait_caught_up(5_000, WAIT);
    assert!(host.terminate().success());

    // The module file now builds state version 2 (v3); the database holds 1.
    let v3 = module_bytes(3);
    rename_over(&module, &v3);
    let host = ws.start();
    wait_until(WAIT, "v3 to take over", || {
        let status = ws.status_of("swap");
        status["module"] == sha(&v3).as_str() && status["state"] == "running" && status["lag"] == 0
    });
    let versions = versions_seen(&ws);
    assert_eq!(versions.len(), 5_000, "every event applied once, by the new module");
    assert!(versions.iter().all(|v| *v == 3), "the state was rebuilt from the log with v3");
    // Readers see the new generation a moment before its line is logged.
    wait_until(WAIT, "the take-over to be logged", || {
        host.logs().contains("rebuild caught up and took over")
    });
    let logs = host.logs();
    assert!(logs.contains("rebuilding from the log before processing"), "{logs}");
    assert!(!ws.data().join("projections/swap.db").exists(), "the old database is removed");
    assert_eq!(std::fs::read_to_string(ws.data().join("projections/swap.current")).unwrap(), "swap.1.db");

    // And it keeps processing.
    let more: Vec<String> = (0..10).map(|i| cloud_event(&format!("w{i}"), "t", json!(i))).collect();
    ws.append("s", &ws.write_events("more.jsonl", &more));
    ws.wait_caught_up(5_010, WAIT);
}

#[test]
fn a_faulted_projection_restarts_when_a_fixed_module_arrives() {
    let ws = Workspace::new();
    let module = ws.path("module.wasm");
    std::fs::write(&module, std::fs::read(guest("event_recorder")).unwrap()).unwrap();
    let config = format!(
        "version = 1\ndata = \"data\"\n\n[[projection]]\nname = \"swap\"\nmodule = {:?}\n\
         streams = [\"s\"]\non_failure = \"halt\"\n",
        module.to_string_lossy()
    );
    std::fs::write(ws.config(), config).unwrap();
    let events = [cloud_event("ok-1", "t", json!(1)), cloud_event("bad", "poison", json!(2))];
    ws.append("s", &ws.write_events("events.jsonl", &events));
    let host = ws.start();
    wait_until(WAIT, "the projection to halt on the poison event", || {
        ws.status_of("swap")["state"] == "faulted"
    });
    assert_eq!(ws.status_of("swap")["checkpoint"], 1);

    // A module that can apply it: the projection starts again and catches up.
    // (v3 builds another state version: it rebuilds from the log, poison and all.)
    let fixed = module_bytes(3);
    rename_over(&module, &fixed);
    ws.wait_caught_up(2, WAIT);
    let status = ws.status_of("swap");
    assert_eq!((&status["state"], &status["module"]), (&json!("running"), &json!(sha(&fixed))), "{status}");
    assert!(host.logs().contains("restarting the faulted projection with the new module"));
}

#[test]
fn a_module_stuck_retrying_is_replaced_by_the_next_one() {
    let ws = Workspace::new();
    let module = ws.path("module.wasm");
    std::fs::write(&module, std::fs::read(guest("event_recorder")).unwrap()).unwrap();
    ws.write_config(&[("swap", &module, &["s"])]);
    let events = [cloud_event("ok-1", "t", json!(1)), cloud_event("stuck", "retry", json!(2))];
    ws.append("s", &ws.write_events("events.jsonl", &events));
    let host = ws.start();
    wait_until(WAIT, "the module to retry the batch again and again", || {
        ws.status_of("swap")["retrying"]["attempts"].as_u64().is_some_and(|n| n >= 3)
    });

    // v3 (another state version) rebuilds from the log and takes over, even
    // though the running module never lets its batch commit.
    let v3 = module_bytes(3);
    rename_over(&module, &v3);
    wait_until(WAIT, "v3 to take over", || {
        let status = ws.status_of("swap");
        status["module"] == sha(&v3).as_str() && status["lag"] == 0
    });
    let status = ws.status_of("swap");
    assert_eq!(status["state"], "running", "{status}");
    assert!(status.get("retrying").is_none(), "no batch is waiting any more: {status}");
    assert_eq!(versions_seen(&ws), vec![3, 3]);
    assert!(host.logs().contains("module asked to retry"));
}
