//! projector against the consumers a team would write by hand, side by side
//! in one run, on the same events in the same log: wallet-allowlist over
//! 200,000 events (5,000 users), each peer reading `events.db` in batches
//! after its checkpoint, applying the same rule with prepared statements,
//! and committing state and checkpoint in one transaction.
//!
//! - `projector rebuild` of a config with the shipped module and the
//!   defaults: the whole process, start-up included;
//! - the same with `batch_size = 10000`;
//! - a plain native Rust consumer: batches of 1000, WAL, synchronous=NORMAL;
//! - the same tuned: batches of 10,000, the WAL checkpointed once at the
//!   end instead of on the hot path;
//! - a Python `sqlite3` consumer (`benches/peers.py`), the whole process,
//!   on its best settings (batches of 10,000, a 64 MiB page cache, the WAL
//!   checkpointed at the end).
//!
//! Each peer runs the rule two ways, keeping its best: as an upsert whose
//! `RETURNING` row decides a second insert, and as writes only (the
//! allowlist filled by `INSERT … SELECT` from `users`, as the shipped module
//! does with deferred writes). Every peer, and projector, must build the
//! same allowlist, row for row.
//!
//! Then a single-upsert projection (one `INSERT … ON CONFLICT DO UPDATE`
//! per event, the `counter` test guest) against its native twin.
//!
//! `cargo bench -p projector --bench peers` (after scripts/build-guests);
//! `BENCH_EVENTS` sets the event count (default 200000), `BENCH_RUNS` the
//! rounds (default 5, each consumer once a round, best kept).

#[path = "../../tests/all/util.rs"]
mod util;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Deserialize;
use std::cell::RefCell;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use util::*;

#[derive(Deserialize)]
struct WalletUpdated<'a> {
    user_id: &'a str,
    wallet_address: &'a str,
    created_at: Option<&'a str>,
}

#[derive(Deserialize)]
struct KycVerified<'a> {
    user_id: &'a str,
    kyc_verified_at: Option<&'a str>,
}

/// An allowlist as one text, row by row in key order: what the peers'
/// allowlists are compared by.
const ALLOWLIST_TEXT: &str = "SELECT group_concat(wallet_address || ' ' || user_id || ' ' || \
     ifnull(allowlisted_at, '-'), char(10)) AS rows FROM (SELECT * FROM allowlist ORDER BY wallet_address)";

/// How a native consumer is set up.
#[derive(Clone, Copy)]
struct Native {
    batch: i64,
    /// Checkpoint the WAL once at the end rather than every 1000 pages.
    wal_off_hot_path: bool,
    /// The rule as writes only (the allowlist filled by `INSERT … SELECT`
    /// from `users`, as the shipped module does), not as an upsert whose
    /// `RETURNING` row decides a second insert.
    writes_only: bool,
}

/// The wallet-allowlist rule, hand-written over rusqlite; returns the
/// events applied.
fn native_allowlist(events: &Path, state: &Path, how: Native) -> u64 {
    let log = Connection::open_with_flags(events, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let db = Connection::open(state).unwrap();
    db.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;").unwrap();
    if how.wal_off_hot_path {
        db.execute_batch("PRAGMA wal_autocheckpoint=0; PRAGMA cache_size=-65536;").unwrap();
    }
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS allowlist (wallet_address TEXT PRIMARY KEY NOT NULL, \
         user_id TEXT NOT NULL, allowlisted_at TEXT) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY NOT NULL, wallet_address TEXT, \
         kyc_verified_at TEXT) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY, position INTEGER NOT NULL);",
    )
    .unwrap();
    let mut checkpoint: i64 = db
        .query_row("SELECT position FROM checkpoint WHERE id = 1", [], |r| r.get(0))
        .optional()
        .unwrap()
        .unwrap_or(0);
    let mut read = log
        .prepare(
            "SELECT position, type, time, data FROM events WHERE position > ?1 AND +stream = 'wallets' \
             ORDER BY position LIMIT ?2",
        )
        .unwrap();
    let mut applied = 0;
    loop {
        let rows: Vec<(i64, String, Option<String>, Vec<u8>)> = read
            .query_map(params![checkpoint, how.batch], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let Some(last) = rows.last() else { break };
        let last = last.0;
        db.execute_batch("BEGIN IMMEDIATE").unwrap();
        {
            let mut user_wallet = db
                .prepare_cached(
                    "INSERT INTO users (user_id, wallet_address) VALUES (?1, ?2) ON CONFLICT (user_id) \
                     DO UPDATE SET wallet_address = excluded.wallet_address RETURNING kyc_verified_at",
                )
                .unwrap();
            let mut user_kyc = db
                .prepare_cached(
                    "INSERT INTO users (user_id, kyc_verified_at) VALUES (?1, ?2) ON CONFLICT (user_id) \
                     DO UPDATE SET kyc_verified_at = coalesce(users.kyc_verified_at, \
                     excluded.kyc_verified_at) RETURNING wallet_address",
                )
                .unwrap();
            let mut allow = db
                .prepare_cached(
                    "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (wallet_address) DO NOTHING",
                )
                .unwrap();
            let mut allow_verified = db
                .prepare_cached(
                    "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) SELECT ?1, ?2, ?3 \
                     FROM users WHERE user_id = ?2 AND kyc_verified_at IS NOT NULL \
                     ON CONFLICT (wallet_address) DO NOTHING",
                )
                .unwrap();
            let mut allow_wallet = db
                .prepare_cached(
                    "INSERT INTO allowlist (wallet_address, user_id, allowlisted_at) \
                     SELECT wallet_address, user_id, ?2 FROM users \
                     WHERE user_id = ?1 AND wallet_address IS NOT NULL \
                     ON CONFLICT (wallet_address) DO NOTHING",
                )
                .unwrap();
            let (mut set_wallet, mut set_kyc) = (
                db.prepare_cached(
                    "INSERT INTO users (user_id, wallet_address) VALUES (?1, ?2) ON CONFLICT (user_id) \
                     DO UPDATE SET wallet_address = excluded.wallet_address",
                )
                .unwrap(),
                db.prepare_cached(
                    "INSERT INTO users (user_id, kyc_verified_at) VALUES (?1, ?2) ON CONFLICT (user_id) \
                     DO UPDATE SET kyc_verified_at = coalesce(users.kyc_verified_at, excluded.kyc_verified_at)",
                )
                .unwrap(),
            );
            for (_, event_type, time, data) in &rows {
                match event_type.as_str() {
                    "wallet_updated" if how.writes_only => {
                        let u: WalletUpdated = serde_json::from_slice(data).unwrap();
                        let at = u.created_at.or(time.as_deref());
                        set_wallet.execute(params![u.user_id, u.wallet_address]).unwrap();
                        allow_verified.execute(params![u.wallet_address, u.user_id, at]).unwrap();
                    }
                    "kyc_verified" if how.writes_only => {
                        let k: KycVerified = serde_json::from_slice(data).unwrap();
                        let at = k.kyc_verified_at.or(time.as_deref()).unwrap_or("");
                        set_kyc.execute(params![k.user_id, at]).unwrap();
                        allow_wallet.execute(params![k.user_id, at]).unwrap();
                    }
                    "wallet_updated" => {
                        let u: WalletUpdated = serde_json::from_slice(data).unwrap();
                        let at = u.created_at.or(time.as_deref());
                        let verified: Option<Option<String>> = user_wallet
                            .query_row(params![u.user_id, u.wallet_address], |r| r.get(0))
                            .optional()
                            .unwrap();
                        if matches!(verified, Some(Some(_))) {
                            allow.execute(params![u.wallet_address, u.user_id, at]).unwrap();
                        }
                    }
                    "kyc_verified" => {
                        let k: KycVerified = serde_json::from_slice(data).unwrap();
                        let at = k.kyc_verified_at.or(time.as_deref()).unwrap_or("");
                        let wallet: Option<Option<String>> =
                            user_kyc.query_row(params![k.user_id, at], |r| r.get(0)).optional().unwrap();
                        if let Some(Some(wallet)) = wallet {
                            allow.execute(params![wallet, k.user_id, at]).unwrap();
                        }
                    }
                    _ => {}
                }
            }
            db.prepare_cached(
                "INSERT INTO checkpoint (id, position) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET position = excluded.position",
            )
            .unwrap()
            .execute([last])
            .unwrap();
        }
        db.execute_batch("COMMIT").unwrap();
        applied += rows.len() as u64;
        checkpoint = last;
    }
    if how.wal_off_hot_path {
        db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    applied
}

/// One upsert per event, hand-written: the twin of the `counter` guest.
fn native_counter(events: &Path, state: &Path, batch: i64) -> u64 {
    let log = Connection::open_with_flags(events, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let db = Connection::open(state).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS counts (key TEXT PRIMARY KEY NOT NULL, n INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY, position INTEGER NOT NULL);",
    )
    .unwrap();
    let mut read = log
        .prepare("SELECT position, subject FROM events WHERE position > ?1 ORDER BY position LIMIT ?2")
        .unwrap();
    let (mut checkpoint, mut applied) = (0i64, 0u64);
    loop {
        let rows: Vec<(i64, Option<String>)> = read
            .query_map(params![checkpoint, batch], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let Some(&(last, _)) = rows.last() else { break };
        db.execute_batch("BEGIN IMMEDIATE").unwrap();
        {
            let mut upsert = db
                .prepare_cached(
                    "INSERT INTO counts (key, n) VALUES (?1, 1) ON CONFLICT (key) DO UPDATE SET n = n + 1",
                )
                .unwrap();
            for (_, subject) in &rows {
                upsert.execute([subject.as_deref().unwrap_or("")]).unwrap();
            }
            db.execute("INSERT OR REPLACE INTO checkpoint (id, position) VALUES (1, ?1)", [last]).unwrap();
        }
        db.execute_batch("COMMIT").unwrap();
        applied += rows.len() as u64;
        checkpoint = last;
    }
    applied
}

/// A workspace with `module` as projection `name` on stream `stream`, its
/// `lines` appended, and `extra` config lines for the projection.
fn workspace(name: &str, module: &Path, stream: &str, lines: &[String], extra: &str) -> Workspace {
    let ws = Workspace::new();
    ws.write_config(&[(name, module, &[stream])]);
    if !extra.is_empty() {
        let config = std::fs::read_to_string(ws.config()).unwrap();
        std::fs::write(ws.config(), format!("{config}{extra}\n")).unwrap();
    }
    let file = ws.write_events("events.jsonl", lines);
    ws.append(stream, &file);
    ws
}

/// `projector rebuild` of `name`, the whole process; events/s.
fn projector_rebuild(ws: &Workspace, name: &str, n: usize) -> f64 {
    let start = Instant::now();
    run_ok(&["rebuild", "--config", &ws.config_str(), name]);
    let elapsed = start.elapsed();
    let status = ws.status_of(name);
    assert_eq!(status["checkpoint"], n as u64, "{status}");
    assert_eq!(status["dead_letters"], 0, "{status}");
    n as f64 / elapsed.as_secs_f64()
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let module = guest("wallet_allowlist");
    let lines = wallet_events(n, 5_000, "peers");
    let ws = workspace("wallet-allowlist", &module, "wallets", &lines, "");
    let ws_big = workspace("wallet-allowlist", &module, "wallets", &lines, "batch_size = 10000");
    let events = ws.data().join("events.db");
    println!("wallet-allowlist, {n} events (5,000 users), best of {runs} rounds, events/s:");

    // The allowlist the first peer built, which every other must build.
    let state_rows: RefCell<Option<String>> = RefCell::new(None);
    let native = |how: Native| {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        let start = Instant::now();
        assert_eq!(native_allowlist(&events, &state, how), n as u64);
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let db = Connection::open(&state).unwrap();
        let rows: String = db.query_row(ALLOWLIST_TEXT, [], |r| r.get(0)).unwrap();
        let mut first = state_rows.borrow_mut();
        assert!(*first.get_or_insert_with(|| rows.clone()) == rows, "every peer builds the same allowlist");
        rate
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers.py");
    let run_python = |writes_only: bool| {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        let start = Instant::now();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&events)
            .arg(&state)
            .arg("10000")
            .args(writes_only.then_some("writes-only"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), n.to_string());
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let db = Connection::open(&state).unwrap();
        let rows: String = db.query_row(ALLOWLIST_TEXT, [], |r| r.get(0)).unwrap();
        assert!(
            state_rows.borrow().as_deref() == Some(rows.as_str()),
            "python builds the allowlist the others build"
        );
        rate
    };
    // Round by round, each consumer once a round: a machine whose speed
    // drifts over minutes then shifts every figure alike, not one.
    let (mut projector, mut projector_big) = (0.0f64, 0.0f64);
    // Each peer both ways: reading the upsert's `RETURNING` row, and writes
    // only. Its best counts.
    let (mut plain, mut tuned, mut python) = ([0.0f64; 2], [0.0f64; 2], [0.0f64; 2]);
    for _ in 0..runs {
        projector = projector.max(projector_rebuild(&ws, "wallet-allowlist", n));
        projector_big = projector_big.max(projector_rebuild(&ws_big, "wallet-allowlist", n));
        for (i, writes_only) in [false, true].into_iter().enumerate() {
            plain[i] = plain[i].max(native(Native { batch: 1000, wal_off_hot_path: false, writes_only }));
            tuned[i] = tuned[i].max(native(Native { batch: 10_000, wal_off_hot_path: true, writes_only }));
        }
        for (i, writes_only) in [false, true].into_iter().enumerate() {
            python[i] = python[i].max(run_python(writes_only));
        }
    }
    println!("  native, plain, RETURNING / writes only: {:>9.0} / {:.0}", plain[0], plain[1]);
    println!("  native, tuned, RETURNING / writes only: {:>9.0} / {:.0}", tuned[0], tuned[1]);
    println!("  python, RETURNING / writes only:        {:>9.0} / {:.0}", python[0], python[1]);
    let (plain, tuned, python) = (plain[0].max(plain[1]), tuned[0].max(tuned[1]), python[0].max(python[1]));
    let projected = ws.query("wallet-allowlist", ALLOWLIST_TEXT)[0]["rows"].clone();
    assert!(
        projected.as_str() == state_rows.borrow().as_deref(),
        "projector builds the allowlist the peers build"
    );

    println!("  projector rebuild, defaults:            {projector:>9.0}");
    println!("  projector rebuild, batch_size = 10000:  {projector_big:>9.0}");
    println!("  native, plain (batch 1000), best:       {plain:>9.0}");
    println!("  native, tuned (batch 10000, WAL at end), best: {tuned:>9.0}");
    println!("  python sqlite3 (tuned, batch 10000), best: {python:>9.0}");
    println!(
        "  projector / tuned native: {:.2}   projector / plain native: {:.2}   projector / python: {:.2}",
        projector / tuned,
        projector / plain,
        projector / python
    );

    // One upsert per event: the `counter` guest against its native twin.
    let counter = guest("counter");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let mut event: serde_json::Value =
                serde_json::from_str(&cloud_event(&format!("c-{i}"), "tick", serde_json::json!({}))).unwrap();
            event["subject"] = format!("key-{}", i % 5_000).into();
            event.to_string()
        })
        .collect();
    let ws = workspace("counter", &counter, "ticks", &lines, "");
    let events = ws.data().join("events.db");
    let (mut wasm, mut twin) = (0.0f64, 0.0f64);
    for _ in 0..runs {
        wasm = wasm.max(projector_rebuild(&ws, "counter", n));
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        assert_eq!(native_counter(&events, &dir.path().join("state.db"), 1000), n as u64);
        twin = twin.max(n as f64 / start.elapsed().as_secs_f64());
    }
    println!("single upsert per event, {n} events (5,000 keys), events/s:");
    println!("  projector rebuild, defaults:            {wasm:>9.0}");
    println!("  native twin (batch 1000):               {twin:>9.0}");
    println!("  projector / native: {:.2}", wasm / twin);
}
