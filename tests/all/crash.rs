//! Crash consistency: `run` is SIGKILLed mid-stream three times while 120k
//! events are appended; after restarts the state equals a `replay` of the
//! same events — nothing lost, nothing applied twice, the writes a module
//! deferred (the counter's) included.

use crate::util::*;
use serde_json::json;
use std::time::Duration;

const TOTAL: usize = 120_000;
const CHUNK: usize = 20_000;

#[test]
fn sigkill_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let ws = Workspace::new();
    let wallet = guest("wallet_allowlist");
    // Fixed batches of 200: a kill overshoots its target by a batch or two
    // however fast the machine, so it always lands mid-chunk.
    let mut config = String::from("version = 1\ndata = \"data\"\n");
    let projections = [
        ("wallet-allowlist", &wallet),
        ("recorder", &guest("event_recorder")),
        ("counter", &guest("counter")),
    ];
    for (name, module) in projections {
        config.push_str(&format!(
            "\n[[projection]]\nname = {name:?}\nmodule = {:?}\nstreams = [\"wallets\"]\nbatch_size = 200\n",
            module.to_string_lossy()
        ));
    }
    std::fs::write(ws.config(), config).unwrap();
    let events = wallet_events(TOTAL, 20_000, "w");
    let all = ws.write_events("all.jsonl", &events);
    let chunks: Vec<String> = events
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| ws.write_events(&format!("chunk-{i}.jsonl"), chunk))
        .collect();

    let mut host = ws.start();
    // Kill at a different depth into a different chunk each time, early
    // enough in the chunk that thousands of events are still to be handled
    // when the kill lands.
    let kill_depths = [(1, 2_000), (2, 6_000), (4, 4_000)];
    let mut killed_at = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(ws.append("wallets", chunk), (CHUNK as u64, 0));
        let appended = ((i + 1) * CHUNK) as u64;
        if let Some(&(_, depth)) = kill_depths.iter().find(|(at, _)| *at == i) {
            let target = (i * CHUNK + depth) as u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while ws.checkpoint("recorder") < target {
                assert!(
                    std::time::Instant::now() < deadline,
                    "timed out waiting for the recorder past {target}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            host.kill();
            let at = ws.checkpoint("recorder");
            assert!(at < appended, "the kill landed mid-stream (checkpoint {at} of {appended})");
            assert_eq!(ws.status_of("recorder")["state"], "stopped", "a killed host is not reported running");
            killed_at.push(at);
            host = ws.start();
        }
    }
    assert_eq!(killed_at.len(), 3);
    ws.wait_caught_up(TOTAL as u64, Duration::from_secs(120));
    drop(host);

    // Exactly once: every position handled once, the counter agrees.
    let recorded = ws.query(
        "recorder",
        "SELECT count(*) AS handled, count(DISTINCT position) AS positions, min(position) AS first, max(position) AS last FROM handled",
    );
    assert_eq!(
        recorded,
        json!([{"handled": TOTAL, "positions": TOTAL, "first": 1, "last": TOTAL}]),
        "killed at {killed_at:?}"
    );
    let count =
        ws.query("recorder", "SELECT CAST(value AS TEXT) AS count FROM projector_kv WHERE key = 'count'");
    assert_eq!(count, json!([{"count": TOTAL.to_string()}]));
    // The counter's deferred upserts (the events have no subject: one key).
    let counted = ws.query("counter", "SELECT key, n FROM counts");
    assert_eq!(counted, json!([{"key": "", "n": TOTAL}]), "killed at {killed_at:?}");

    // The state equals an uninterrupted replay of the same events.
    for sql in [
        "SELECT wallet_address, user_id, allowlisted_at FROM allowlist ORDER BY wallet_address",
        "SELECT user_id, wallet_address, kyc_verified_at FROM users ORDER BY user_id",
    ] {
        let replayed =
            json(&run_ok(&["replay", "--module", wallet.to_str().unwrap(), "--events", &all, "--sql", sql]));
        let live = ws.query("wallet-allowlist", sql);
        assert!(replayed.as_array().unwrap().len() > 1000, "the scenario allowlists many wallets");
        assert!(live == replayed, "{sql}: live state differs from the replay (killed at {killed_at:?})");
    }
}
