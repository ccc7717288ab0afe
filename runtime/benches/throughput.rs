//! Throughput of wallet-allowlist: the wasm module in the host end to end
//! (event log → guest → state + checkpoint, one transaction per batch) side
//! by side with the same logic run natively through the SDK harness on the
//! same SQLite settings. Prints events/s for each and their ratio.
//!
//! `cargo bench -p projector --bench throughput` (after scripts/build-guests);
//! `BENCH_EVENTS` sets the event count (default 200000).

#[path = "../../tests/all/util.rs"]
mod util;

use projector::projection::runner::{ProjectionRunner, ProjectionSpec};
use projector::sandbox::engine::ProjectorEngine;
use projector::sources::cloudevents;
use projector::sources::embedded::{EmbeddedOpener, EventLog};
use projector::sources::{Filter, SourceOpener};
use projector_sdk::Event;
use projector_sdk::testing::Harness;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use wallet_allowlist::WalletAllowlist;

const BATCH: usize = 1000;
const RUNS: usize = 3;

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let module = util::guest("wallet_allowlist");
    let lines = util::wallet_events(n, n / 10, "bench");
    let events = cloudevents::parse_lines(&lines.join("\n"), "generated").unwrap();
    println!("wallet-allowlist throughput: {n} events, batch {BATCH}, best of {RUNS} runs");

    let mut append = Vec::new();
    let mut wasm = Vec::new();
    let mut native = Vec::new();
    for _ in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EventLog::open(dir.path()).unwrap());
        let start = Instant::now();
        for chunk in events.chunks(10_000) {
            log.append("wallets", chunk).unwrap();
        }
        append.push(start.elapsed());

        let opener: Arc<dyn SourceOpener> = Arc::new(EmbeddedOpener::new(log.clone()));
        let engine = Arc::new(ProjectorEngine::new(false).unwrap());
        let spec = ProjectionSpec {
            name: "wallet-allowlist".into(),
            module: module.clone(),
            database: dir.path().join("wallet-allowlist.db"),
            filter: Filter { streams: vec!["wallets".into()], types: None },
            batch_size: Some(BATCH),
            limits: Default::default(),
            policy: Default::default(),
        };
        let live =
            Arc::new(projector::projection::live::LiveProjection::new("wallet-allowlist", Arc::default()));
        let mut runner =
            ProjectionRunner::start(engine, &spec, &opener, Arc::new(AtomicBool::new(false)), live).unwrap();
        let start = Instant::now();
        runner.catch_up().unwrap();
        wasm.push(start.elapsed());
        assert_eq!(runner.checkpoint().total(), n as u64);
        assert_eq!(runner.parked(), 0);

        let sdk_events: Vec<Event> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Event::new(e.event_type.clone(), e.data.clone())
                    .with_stream("wallets")
                    .with_id(e.id.clone())
                    .with_position(i as u64 + 1)
            })
            .collect();
        let mut harness = Harness::<WalletAllowlist>::open(&dir.path().join("native.db")).unwrap();
        let start = Instant::now();
        for batch in sdk_events.chunks(BATCH) {
            harness.handle_prepared(batch).unwrap();
        }
        native.push(start.elapsed());
        let rows = |sql: &str| harness.rows(sql).first().unwrap()[0].as_i64().unwrap();
        let wasm_rows: i64 =
            runner.db().query_row("SELECT count(*) FROM allowlist", [], |r| r.get(0)).unwrap();
        assert_eq!(rows("SELECT count(*) FROM allowlist"), wasm_rows, "both built the same state");
    }

    let rate = |runs: &[Duration]| n as f64 / runs.iter().min().unwrap().as_secs_f64();
    let (append, wasm, native) = (rate(&append), rate(&wasm), rate(&native));
    println!("  append to the event log (CloudEvents → events.db): {append:>10.0} events/s");
    println!("  wasm, end to end (log → guest → state + checkpoint): {wasm:>10.0} events/s");
    println!("  native, SDK harness (same logic, same SQLite):       {native:>10.0} events/s");
    println!("  ratio wasm / native: {:.2}", wasm / native);
}
