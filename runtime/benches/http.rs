//! The HTTP API under load, against a real `projector run` serving
//! wallet-allowlist: query latency (p50/p99) alone and under full ingest,
//! ingest throughput over HTTP, and the projection's processing rate with
//! and without 8 concurrent readers — paced (each `BENCH_QPS` queries/s,
//! default 250: a backend asking many times a second) and saturating (no
//! pause at all; on a 2-core machine they then take CPU from processing).
//!
//! `cargo bench -p projector --bench http` (after scripts/build-guests);
//! `BENCH_EVENTS` sets the ingested events (default 200000).

#[path = "../../tests/all/util.rs"]
mod util;

use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use util::*;

const READERS: usize = 8;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn query(agent: &ureq::Agent, base: &str, wallet: &str) -> Duration {
    let start = Instant::now();
    let mut response = agent
        .post(&format!("{base}/projections/wallet-allowlist/query"))
        .send(json!({"wallet_address": wallet}).to_string().as_str())
        .unwrap();
    let body = response.body_mut().read_to_string().unwrap();
    assert!(body.contains("allowlisted"), "{body}");
    start.elapsed()
}

fn ingest(agent: &ureq::Agent, base: &str, lines: &[String]) {
    let mut response = agent
        .post(&format!("{base}/streams/wallets/events"))
        .header("content-type", "application/x-ndjson")
        .send(lines.join("\n").as_str())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", response.body_mut().read_to_string().unwrap());
}

/// Wait until the projection has handled `head` events, asking the host
/// over HTTP: a `projector status` process every few milliseconds would
/// itself take a core from the readers being measured.
fn wait_processed(agent: &ureq::Agent, base: &str, head: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut response = agent.get(&format!("{base}/projections/wallet-allowlist")).call().unwrap();
        let status: serde_json::Value =
            serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        if status["checkpoint"] == head && status["lag"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for position {head}: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Readers querying until `stop`, each `qps` times a second or, with
/// `None`, as fast as they can; returns their latencies.
fn readers(
    base: &str,
    stop: &Arc<AtomicBool>,
    qps: Option<u32>,
) -> Vec<std::thread::JoinHandle<Vec<Duration>>> {
    (0..READERS)
        .map(|i| {
            let (base, stop) = (base.to_string(), stop.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut latencies = Vec::new();
                let period = qps.map(|q| Duration::from_secs_f64(1.0 / q as f64));
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    latencies.push(query(&agent, &base, if i % 2 == 0 { "0xA1" } else { "0xB1" }));
                    if let Some(period) = period {
                        next += period;
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                }
                latencies
            })
        })
        .collect()
}

fn report(what: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    println!(
        "  {what}: {} queries, p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.90).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |l| l.as_secs_f64() * 1e3)
    );
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let qps: u32 = std::env::var("BENCH_QPS").ok().and_then(|v| v.parse().ok()).unwrap_or(250);
    println!(
        "HTTP API, wallet-allowlist, {READERS} readers at {qps} queries/s each, {n} events ingested in chunks of 10000"
    );
    let seed =
        std::fs::read_to_string(root().join("projections/wallet-allowlist/fixtures/seed.jsonl")).unwrap();
    let seed: Vec<String> = seed.lines().map(String::from).collect();
    let events = wallet_events(n, n / 10, "bench");

    // 1. Query latency with no ingest.
    let ws = Workspace::new();
    ws.write_config(&[("wallet-allowlist", &guest("wallet_allowlist"), &["wallets"])]);
    let host = ws.start();
    let base = host.url();
    ingest(&agent(), &base, &seed);
    ws.wait_caught_up(10, Duration::from_secs(30));
    for (label, pace) in [("paced", Some(qps)), ("saturating", None)] {
        let stop = Arc::new(AtomicBool::new(false));
        let running = readers(&base, &stop, pace);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        report(
            &format!("query latency, no ingest, {label}"),
            running.into_iter().flat_map(|r| r.join().unwrap()).collect(),
        );
    }

    drop(host);

    // 2. Query latency under full ingest, and ingest throughput: once with
    // the publisher at normal priority, once at bulk priority, standing in
    // for a publisher on another machine (here it shares the two cores).
    for lowered in [false, true] {
        let ws = Workspace::new();
        ws.write_config(&[("wallet-allowlist", &guest("wallet_allowlist"), &["wallets"])]);
        let host = ws.start();
        let base = host.url();
        ingest(&agent(), &base, &seed);
        wait_processed(&agent(), &base, 10);
        let stop = Arc::new(AtomicBool::new(false));
        let running = readers(&base, &stop, Some(qps));
        let publisher = {
            let (base, events) = (base.clone(), events.clone());
            std::thread::spawn(move || {
                if lowered {
                    projector::priority::lower_current_thread();
                }
                let agent = agent();
                let start = Instant::now();
                for chunk in events.chunks(10_000) {
                    ingest(&agent, &base, chunk);
                }
                let ingest_rate = n as f64 / start.elapsed().as_secs_f64();
                wait_processed(&agent, &base, n as u64 + 10);
                (ingest_rate, n as f64 / start.elapsed().as_secs_f64())
            })
        };
        let (ingest_rate, processed_rate) = publisher.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let publisher = if lowered { "publisher at bulk priority" } else { "publisher at normal priority" };
        report(
            &format!("query latency, paced, under full ingest ({publisher})"),
            running.into_iter().flat_map(|r| r.join().unwrap()).collect(),
        );
        println!("  ingest over HTTP (application/x-ndjson, {publisher}): {ingest_rate:.0} events/s");
        println!("  ingested and processed, with {READERS} readers: {processed_rate:.0} events/s");
    }
    let agent = agent();

    // 3. Processing rate over a pre-filled log, with and without readers.
    for pace in [Some(0), Some(qps), None] {
        let with_readers = pace != Some(0);
        let ws = Workspace::new();
        ws.write_config(&[("wallet-allowlist", &guest("wallet_allowlist"), &["wallets"])]);
        let file = ws.write_events("seed.jsonl", &seed);
        ws.append("wallets", &file);
        let file = ws.write_events("events.jsonl", &events);
        ws.append("wallets", &file);
        let start = Instant::now();
        let host = ws.start();
        let stop = Arc::new(AtomicBool::new(false));
        let base = host.url();
        if with_readers {
            wait_until(Duration::from_secs(30), "the projection to start", || {
                agent.get(&format!("{base}/projections/wallet-allowlist")).call().is_ok_and(|mut r| {
                    r.body_mut().read_to_string().is_ok_and(|body| body.contains("\"running\""))
                })
            });
        }
        let running = if with_readers { readers(&base, &stop, pace) } else { Vec::new() };
        wait_processed(&agent, &base, n as u64 + 10);
        let rate = n as f64 / start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let latencies: Vec<Duration> = running.into_iter().flat_map(|r| r.join().unwrap()).collect();
        let answered = latencies.len();
        let label = match pace {
            Some(0) => "no readers".to_string(),
            Some(q) => format!("{READERS} paced readers at {q}/s ({answered} queries)"),
            None => format!("{READERS} saturating readers ({answered} queries)"),
        };
        println!("  processing a filled log, {label}: {rate:.0} events/s");
        if pace == Some(qps) {
            report("query latency, paced, while a filled log is processed", latencies);
        }
    }
}
