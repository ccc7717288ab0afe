//! Hot swaps under load, against a real `projector run`: for each swap,
//! the time from the module file's write (a rename-over) to the first event
//! handled by the new module, and the pause in processing the swap itself
//! causes on the projection's thread. Each swap's file is new bytes (a
//! distinct custom section), so every swap compiles, as a deploy does.
//!
//! `cargo bench -p projector --bench hot_swap` (after scripts/build-guests);
//! `BENCH_SWAPS` sets the number of swaps (default 24).

#[path = "../../tests/all/util.rs"]
mod util;

use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use util::*;

/// `module` with a custom section named `name` appended: valid wasm, new bytes.
fn with_custom_section(module: &[u8], name: &str) -> Vec<u8> {
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name.as_bytes());
    let mut bytes = module.to_vec();
    bytes.push(0);
    bytes.push(payload.len() as u8);
    bytes.extend(payload);
    bytes
}

fn main() {
    let swaps: usize = std::env::var("BENCH_SWAPS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let ws = Workspace::new();
    let module = ws.path("module.wasm");
    let v = [std::fs::read(guest("swap_v1")).unwrap(), std::fs::read(guest("swap_v2")).unwrap()];
    std::fs::write(&module, &v[0]).unwrap();
    ws.write_config(&[("swap", &module, &["s"])]);
    let host = ws.start();
    let base = host.url();
    wait_until(Duration::from_secs(30), "the host to start", || ws.status_of("swap")["state"] == "running");

    // Continuous load: 50 events every 2 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (base, stop) = (base.clone(), stop.clone());
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let lines: Vec<String> =
                    (0..50).map(|i| cloud_event(&format!("l{sent}-{i}"), "t", json!(i))).collect();
                agent
                    .post(&format!("{base}/streams/s/events"))
                    .header("content-type", "application/x-ndjson")
                    .send(lines.join("\n").as_str())
                    .unwrap();
                sent += 50;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let db = ws.data().join("projections/swap.db");
    let latest_version = || -> i64 {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.query_row("SELECT version FROM handled ORDER BY position DESC LIMIT 1", [], |r| r.get(0))
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(30), "the first events", || latest_version() == 1);
    let mut latencies = Vec::new();
    for i in 0..swaps {
        let version = (i + 1) % 2;
        let bytes = with_custom_section(&v[version], &format!("swap-{i}"));
        let tmp = ws.path("module.tmp");
        std::fs::write(&tmp, &bytes).unwrap();
        let written = Instant::now();
        std::fs::rename(&tmp, &module).unwrap();
        while latest_version() != version as i64 + 1 {
            assert!(written.elapsed() < Duration::from_secs(30), "swap {i} never happened:\n{}", host.logs());
            std::thread::sleep(Duration::from_millis(1));
        }
        latencies.push(written.elapsed());
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let mut pauses: Vec<Duration> = host
        .logs()
        .lines()
        .filter(|l| l.contains("module swapped in"))
        .filter_map(|l| l.split("pause_micros=").nth(1))
        .map(|rest| {
            Duration::from_micros(rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap())
        })
        .collect();
    latencies.sort();
    pauses.sort();
    let pct = |sorted: &[Duration], p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    println!("hot swap under load (50 events / 2 ms), {swaps} swaps, each a fresh compile");
    println!(
        "  write → first event handled by the new module: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&latencies, 0.5).as_secs_f64() * 1e3,
        pct(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "  pause in processing at the swap (the hand-over on the projection thread, {} swaps): p50 {:.3} ms, longest {:.3} ms",
        pauses.len(),
        pct(&pauses, 0.5).as_secs_f64() * 1e3,
        pauses.last().unwrap().as_secs_f64() * 1e3
    );
}
