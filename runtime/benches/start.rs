//! Start-up of a crowded host, against a real `projector run`: 100
//! projections sharing one module, from spawn until every one is `running`
//! with lag 0 over a few events (polling `GET /projections`). Cold: an empty
//! data folder but for the events, so the module is compiled once; warm:
//! the same folder again, the compile cached and every database there.
//! Then the peak resident memory of the idle host (VmHWM), per projection,
//! beside a host of one projection.
//!
//! `cargo bench -p projector --bench start` (after scripts/build-guests);
//! `BENCH_PROJECTIONS` sets the crowd (default 100), `BENCH_RUNS` the
//! cold/warm pairs (default 3).

#[path = "../../tests/all/util.rs"]
mod util;

use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use util::*;

const EVENTS: usize = 20;

/// A workspace of `n` projections of `module` over stream `s`, its events
/// appended; nothing else in its data folder.
fn crowd(module: &Path, n: usize) -> Workspace {
    let ws = Workspace::new();
    let names: Vec<String> = (0..n).map(|i| format!("p{i:03}")).collect();
    let projections: Vec<(&str, &Path, &[&str])> =
        names.iter().map(|name| (name.as_str(), module, &["s"][..])).collect();
    ws.write_config(&projections);
    let file = ws.write_events("e.jsonl", &wallet_events(EVENTS, 5, "e"));
    ws.append("s", &file);
    ws
}

/// Start the host and time it until all `n` projections run with lag 0.
fn timed_start(ws: &Workspace, n: usize) -> (Host, Duration) {
    let started = Instant::now();
    let host = ws.start();
    let url = format!("{}/projections", host.url());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    loop {
        let listed: Value = agent.get(&url).call().unwrap().body_mut().read_json().unwrap();
        let ready = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "running" && p["lag"] == 0 && p["checkpoint"] == EVENTS as u64)
            .count();
        if ready == n {
            return (host, started.elapsed());
        }
        let faulted: Vec<&Value> =
            listed.as_array().unwrap().iter().filter(|p| p["state"] == "faulted").collect();
        assert!(faulted.is_empty(), "faulted at start: {faulted:?}");
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all running after 10 min:\n{}",
            host.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Peak resident memory of the process, KiB (VmHWM).
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    let n: usize = std::env::var("BENCH_PROJECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let module = guest("wallet_allowlist");
    println!("start of {n} projections of one module ({}), {EVENTS} events", module.display());
    let (mut colds, mut warms, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let ws = crowd(&module, n);
        let (host, cold) = timed_start(&ws, n);
        let compiles = host.logs().matches("module compiled").count();
        assert!(host.terminate().success());
        let (host, warm) = timed_start(&ws, n);
        // Idle a moment, so the peak is the settled host's, not only start's.
        std::thread::sleep(Duration::from_millis(500));
        let peak = peak_rss_kib(host.pid());
        assert!(host.terminate().success());
        println!(
            "run {run}: cold {:>7.0} ms ({compiles} compile)   warm {:>6.0} ms   peak RSS {:.1} MiB",
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3,
            peak as f64 / 1024.0
        );
        colds.push(cold);
        warms.push(warm);
        peaks.push(peak);
    }
    let one = crowd(&module, 1);
    let (host, _) = timed_start(&one, 1);
    assert!(host.terminate().success());
    let (host, one_warm) = timed_start(&one, 1);
    std::thread::sleep(Duration::from_millis(500));
    let one_peak = peak_rss_kib(host.pid());
    assert!(host.terminate().success());

    colds.sort();
    warms.sort();
    peaks.sort();
    let (cold, warm, peak) = (colds[runs / 2], warms[runs / 2], peaks[runs / 2]);
    println!();
    println!("median of {runs}:");
    println!("  cold start, {n} projections: {:>7.0} ms", cold.as_secs_f64() * 1e3);
    println!(
        "  warm start, {n} projections: {:>7.0} ms   (1 projection: {:.0} ms)",
        warm.as_secs_f64() * 1e3,
        one_warm.as_secs_f64() * 1e3
    );
    println!(
        "  peak RSS: {:.1} MiB for {n} = {:.2} MiB per projection; 1 projection: {:.1} MiB; \
         each more: {:.2} MiB",
        peak as f64 / 1024.0,
        peak as f64 / 1024.0 / n as f64,
        one_peak as f64 / 1024.0,
        (peak.saturating_sub(one_peak)) as f64 / 1024.0 / (n - 1).max(1) as f64
    );
}
