//! Hardening figures, then a well-behaved projection's throughput beside
//! each hostile guest.
//!
//! First three figures: the CPU an idle `projector run` spends while
//! another process keeps reading its config and module files (clock ticks
//! from `/proc/<pid>/stat`); how many hostile files the loader fuzz tries
//! (and that none panics it); and the host's peak RSS (`VmHWM`) over `/sql`
//! answers at their caps. Then a table: each hostile guest beside a
//! neighbour in one supervisor, the limit it hits, what happened to it, and
//! the neighbour's events/s against running alone, in turns.
//!
//! `cargo bench -p projector --bench hostile` (after scripts/build-guests);
//! `BENCH_IDLE_SECS` sets how long the idle host is watched (default 60),
//! `BENCH_EVENTS` the plain events per neighbour run (default 100000; 0
//! skips the table), `BENCH_RUNS` the turns per row (default 3: the
//! neighbour alone, then beside the hostile guest, best of each kept).

#[path = "../../tests/all/loader_fuzz.rs"]
mod loader_fuzz;
#[path = "../../tests/all/util.rs"]
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
    if std::env::var_os(READER).is_some() {
        return read_in_a_loop();
    }
    let idle_secs: u64 = std::env::var("BENCH_IDLE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    idle_cpu(Duration::from_secs(idle_secs));
    loader_fuzz_count();
    sql_peak_rss();
    let n: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    if n == 0 {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    println!();
    println!(
        "neighbour (event-recorder) throughput beside hostile guests: {n} plain events, {TRIGGERS} triggers each"
    );
    // The neighbour alone and beside the hostile guest in turns, best of
    // each kept: a machine whose speed drifts over minutes then moves both
    // figures of a row alike.
    println!(
        "| hostile guest | limit hit | what happened to it | neighbour alone, events/s | beside it, events/s | vs alone |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for &(name, limit, trigger, data, extra) in HOSTILE {
        let (mut alone, mut rate, mut outcome) = (0.0f64, 0.0f64, String::new());
        for _ in 0..runs {
            alone = alone.max(run(n, None).0);
            let beside = run(n, Some((trigger, data, extra)));
            rate = rate.max(beside.0);
            outcome = beside.1;
        }
        println!("| {name} | {limit} | {outcome} | {alone:.0} | {rate:.0} | {:.2} |", rate / alone);
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

/// Set (to the files to read, `:`-separated) when this binary runs as the
/// other process that keeps reading a host's files.
const READER: &str = "BENCH_READER_FILES";
/// How often that process reads them.
const READ_EVERY: Duration = Duration::from_millis(10);

/// The reading process: read every file, sleep, again, until killed;
/// prints how many rounds it read to stdout every round.
fn read_in_a_loop() {
    use std::io::Write as _;
    let files: Vec<std::path::PathBuf> =
        std::env::var(READER).unwrap().split(':').map(std::path::PathBuf::from).collect();
    let mut stdout = std::io::stdout();
    for round in 1u64.. {
        for file in &files {
            std::fs::read(file).unwrap();
        }
        let _ = writeln!(stdout, "{round}");
        std::thread::sleep(READ_EVERY);
    }
}

/// User + system CPU of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command's `(name)`: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(100)
}

/// An idle host while another process reads its config and module files
/// every 10 ms: the CPU it spends, and that no read reloads anything; and,
/// first, the same host left alone as long, for comparison.
fn idle_cpu(watch: Duration) {
    let ws = util::Workspace::new();
    let module = util::guest("event_recorder");
    ws.write_config(&[("idle", &module, &["s"])]);
    let host = ws.start();
    util::wait_until(Duration::from_secs(60), "the projection to run", || {
        ws.status_of("idle")["state"] == "running"
    });
    // Settle: start-up's own work (the compile, the first status writes).
    std::thread::sleep(Duration::from_secs(2));
    let hz = clock_ticks_per_second();
    let before = cpu_ticks(host.pid());
    let started = Instant::now();
    std::thread::sleep(watch);
    let alone = cpu_ticks(host.pid()) - before;
    let alone_per_minute = alone as f64 * 60.0 / started.elapsed().as_secs_f64();
    println!(
        "idle host, left alone for {:.0} s: {alone} clock ticks of CPU ({alone_per_minute:.1} per minute, \
         {hz} per second: {:.3}% of one core)",
        started.elapsed().as_secs_f64(),
        100.0 * alone as f64 / hz as f64 / started.elapsed().as_secs_f64(),
    );
    let files = format!("{}:{}", ws.config().display(), module.display());
    let mut reader = std::process::Command::new(std::env::current_exe().unwrap())
        .env(READER, files)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let before = cpu_ticks(host.pid());
    let started = Instant::now();
    std::thread::sleep(watch);
    let ticks = cpu_ticks(host.pid()) - before;
    let elapsed = started.elapsed();
    reader.kill().unwrap();
    let output = reader.wait_with_output().unwrap();
    let rounds = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .and_then(|l| l.parse::<u64>().ok())
        .unwrap_or(0);
    let per_minute = ticks as f64 * 60.0 / elapsed.as_secs_f64();
    let logs = host.logs();
    println!(
        "idle host, its config and module read {rounds} times each over {:.0} s by another process: \
         {ticks} clock ticks of CPU ({per_minute:.1} per minute, {hz} per second: {:.3}% of one core); \
         reloads: {}, swaps: {}",
        elapsed.as_secs_f64(),
        100.0 * ticks as f64 / hz as f64 / elapsed.as_secs_f64(),
        logs.matches("config reloaded").count(),
        logs.matches("module swapped in").count(),
    );
}

/// The loader fuzz: how many hostile files, how they ended, no panic.
fn loader_fuzz_count() {
    let dir = tempfile::tempdir().unwrap();
    let engine = projector::sandbox::engine::ProjectorEngine::new(false).unwrap();
    let started = Instant::now();
    let fuzzed = loader_fuzz::run(&engine, dir.path());
    println!("loader fuzz: {fuzzed} ({:.1} s)", started.elapsed().as_secs_f64());
    assert!(fuzzed.panics.is_empty(), "the loader panicked on: {:?}", fuzzed.panics);
    assert_eq!(fuzzed.tried, loader_fuzz::INPUTS);
}

/// The host's peak RSS (`VmHWM`) before and after `/sql` answers at their
/// caps: a 1 GB blob asked for (refused by SQLite's length cap), a 16 MiB
/// blob (made, its 22 MB of base64 refused by `sql_max_bytes`), and the
/// largest blob whose answer fits (12 MB: 16 MB of base64).
fn sql_peak_rss() {
    let ws = util::Workspace::new();
    ws.write_config(&[("recorder", &util::guest("event_recorder"), &["s"])]);
    let host = ws.start();
    let base = host.url();
    let lines = vec![util::cloud_event("e0", "t", json!(0))];
    ws.append("s", &ws.write_events("e.jsonl", &lines));
    ws.wait_caught_up(1, Duration::from_secs(60));
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let before = peak_rss_kib(host.pid());
    let mut answers = Vec::new();
    for (blob, expected) in [(1_000_000_000u64, 422), (16_777_216, 422), (12_000_000, 200)] {
        let body = json!({ "sql": format!("SELECT randomblob({blob}) AS b") }).to_string();
        let mut answer = agent
            .post(&format!("{base}/projections/recorder/sql"))
            .header("content-type", "application/json")
            .send(&body)
            .unwrap();
        let status = answer.status().as_u16();
        let bytes = answer.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap().len();
        assert_eq!(status, expected, "randomblob({blob})");
        answers.push(format!("randomblob({blob}): {status}, {bytes} bytes"));
    }
    let after = peak_rss_kib(host.pid());
    println!(
        "/sql at the caps ({}): host peak RSS (VmHWM) {:.1} MiB before, {:.1} MiB after",
        answers.join("; "),
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
}

fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
