//! A well-behaved projection's throughput beside each hostile guest, in
//! one supervisor, against running alone. Prints a table: the guest, the
//! limit it hits, what happened to it, and the neighbour's events/s.
//!
//! `cargo bench -p projector --bench hostile` (after scripts/build-guests);
//! `BENCH_EVENTS` sets the plain events per run (default 100000).

#[path = "../../tests/util.rs"]
mod util;

use projector::config::Config;
use projector::projection::supervisor::Supervisor;
use projector::serve::inspect;
use projector::sources::cloudevents;
use projector::sources::embedded::EventLog;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// (name, limit it hits, trigger event type, trigger data, hostile's extra config).
const HOSTILE: &[(&str, &str, &str, &str, &str)] = &[
    (
        "infinite loop",
        "call deadline (100 ms)",
        "h-loop",
        "null",
        "[projection.limits]\ncall_timeout_ms = 100",
    ),
    ("infinite loop, metered", "fuel (20M)", "h-loop", "null", "[projection.limits]\nfuel = 20_000_000"),
    ("memory bomb", "memory cap (16 MiB)", "h-memory", "null", "[projection.limits]\nmemory_mib = 16"),
    ("unbounded recursion", "wasm stack", "h-recurse", "null", ""),
    ("panic on one event", "trap", "h-panic", "null", ""),
    ("SQL ATTACH", "SQL authorizer", "h-sql", "\"ATTACH DATABASE 'x.db' AS x\"", ""),
    (
        "SQL writes checkpoint",
        "SQL authorizer",
        "h-sql",
        "\"UPDATE projector_checkpoints SET position = 0\"",
        "",
    ),
    ("log flood (100k lines)", "log rate (100/s)", "h-log-flood", "null", ""),
    ("retry 3x then ok", "none: backoff", "h-retry", "3", ""),
    ("rejects every 3rd", "none: reject", "h-thirds", "null", ""),
    ("huge value (8 MiB)", "value size (1 MiB)", "h-huge", "8", ""),
];

const TRIGGERS: usize = 10;

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    println!(
        "neighbour (event-recorder) throughput beside hostile guests: {n} plain events, {TRIGGERS} triggers each"
    );
    let alone = run(n, None);
    println!("  alone: {:.0} events/s", alone.0);
    println!();
    println!("| hostile guest | limit hit | what happened to it | neighbour events/s | vs alone |");
    println!("| --- | --- | --- | --- | --- |");
    for &(name, limit, trigger, data, extra) in HOSTILE {
        let (rate, outcome) = run(n, Some((trigger, data, extra)));
        println!("| {name} | {limit} | {outcome} | {rate:.0} | {:.2} |", rate / alone.0);
    }
}

/// Runs the neighbour (and the hostile guest) over `n` plain events with
/// triggers spread through them; returns the neighbour's events/s and what
/// happened to the hostile one.
fn run(n: usize, hostile: Option<(&str, &str, &str)>) -> (f64, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!(
        "version = 1\n[[projection]]\nname = \"neighbour\"\nmodule = {:?}\nstreams = [\"s\"]\n",
        util::guest("event_recorder")
    );
    if let Some((_, _, extra)) = hostile {
        text.push_str(&format!(
            "\n[[projection]]\nname = \"hostile\"\nmodule = {:?}\nstreams = [\"s\"]\n{extra}\n",
            util::guest("hostile")
        ));
    }
    let path = dir.path().join("projector.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::load(&path).unwrap();

    let mut lines = Vec::with_capacity(n + TRIGGERS);
    for i in 0..n {
        if let Some((trigger, data, _)) = hostile
            && i % (n / TRIGGERS) == n / TRIGGERS / 2
        {
            let data: serde_json::Value = serde_json::from_str(data).unwrap();
            lines.push(util::cloud_event(&format!("t{i}"), trigger, data));
        }
        lines.push(util::cloud_event(&format!("e{i}"), "plain", json!(i)));
    }
    let events = cloudevents::parse_lines(&lines.join("\n"), "generated").unwrap();
    let head = {
        let log = EventLog::open(&config.data).unwrap();
        for chunk in events.chunks(10_000) {
            log.append("s", chunk).unwrap();
        }
        log.head().unwrap()
    };

    let start = Instant::now();
    let supervisor = Supervisor::start(&config, None).unwrap();
    let neighbour_db = config.database_path("neighbour");
    while checkpoint(&neighbour_db) < head {
        assert!(start.elapsed() < Duration::from_secs(300), "the neighbour stalled");
        std::thread::sleep(Duration::from_millis(2));
    }
    let rate = head as f64 / start.elapsed().as_secs_f64();

    let outcome = if hostile.is_some() {
        let hostile_db = config.database_path("hostile");
        let deadline = Instant::now() + Duration::from_secs(300);
        while checkpoint(&hostile_db) < head && Instant::now() < deadline {
            let faulted = inspect::status(&config).unwrap().iter().any(|s| s.state == "faulted");
            if faulted {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = inspect::status(&config).unwrap();
        let s = status.iter().find(|s| s.name == "hostile").unwrap();
        let reasons =
            inspect::query(&config, "hostile", "SELECT reason FROM projector_dead_letters LIMIT 1").unwrap();
        let reason = reasons.first().and_then(|r| r["reason"].as_str()).unwrap_or("");
        let reason: String = reason.chars().take(60).collect();
        format!("{}, {} dead letters ({reason})", s.state, s.dead_letters)
    } else {
        String::new()
    };
    supervisor.stop();
    (rate, outcome)
}

fn checkpoint(db: &Path) -> u64 {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT position FROM projector_checkpoints WHERE source = 'log'", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap_or(0) as u64
}
