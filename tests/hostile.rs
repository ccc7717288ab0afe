//! Hostile module files and crowded starts: truncated, corrupt, foreign or missing modules never panic the loader (fuzzed, in `replay`, at start and on a live swap), the compiled-module cache failing costs a warning, and 100 projections of one module compile it once.

mod util;

use projector::sandbox::engine::ProjectorEngine;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use util::*;

const WAIT: Duration = Duration::from_secs(120);

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A deterministic xorshift generator: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Every input the loader is fuzzed with: (name, bytes); `None` bytes: a
/// directory. Names say what each is, so a failure is easy to reproduce.
fn hostile_inputs() -> Vec<(String, Option<Vec<u8>>)> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut inputs = Vec::new();
    let real = std::fs::read(guest("wallet_allowlist")).unwrap();
    // Truncations at every 1%, and at a few hundred random offsets.
    for percent in 0..100 {
        let cut = real.len() * percent / 100;
        inputs
            .push((format!("wallet_allowlist cut at {percent}% ({cut} bytes)"), Some(real[..cut].to_vec())));
    }
    for _ in 0..300 {
        let cut = rng.below(real.len());
        inputs.push((format!("wallet_allowlist cut at {cut} bytes"), Some(real[..cut].to_vec())));
    }
    // The last few bytes, one by one: the component-type section's end.
    for missing in 1..=16 {
        let cut = real.len() - missing;
        inputs.push((format!("wallet_allowlist cut at {cut} bytes"), Some(real[..cut].to_vec())));
    }
    // Corrupt: bytes overwritten at random places (some may still load).
    for _ in 0..100 {
        let mut bytes = real.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            bytes[at] = rng.next() as u8;
        }
        inputs.push(("wallet_allowlist with random bytes overwritten".into(), Some(bytes)));
    }
    // Random bytes: bare, behind a core module's header, behind a component's.
    for header in [&b""[..], b"\0asm\x01\0\0\0", b"\0asm\x0d\0\x01\0"] {
        for _ in 0..50 {
            let mut bytes = header.to_vec();
            let n = rng.below(4096);
            bytes.extend(rng.bytes(n));
            inputs.push((format!("{n} random bytes after {header:?}"), Some(bytes)));
        }
    }
    // A valid core module that knows nothing of the contract.
    let plain = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "handle")))"#).unwrap();
    inputs.push(("a core module without the contract".into(), Some(plain)));
    // A component of another world, whole and cut short.
    let other = std::fs::read(guest("other_world")).unwrap();
    for percent in (0..100).step_by(5) {
        let cut = other.len() * percent / 100;
        inputs.push((format!("other_world cut at {percent}%"), Some(other[..cut].to_vec())));
    }
    inputs.push(("a module of another world".into(), Some(other)));
    // Components (not core modules) cut short.
    let component = wat::parse_str(
        r#"(component (core module $m (func (export "f"))) (core instance (instantiate $m)))"#,
    )
    .unwrap();
    for cut in 0..component.len() {
        inputs.push((format!("a component cut at {cut} bytes"), Some(component[..cut].to_vec())));
    }
    inputs.push(("a zero-byte file".into(), Some(Vec::new())));
    inputs.push(("a directory".into(), None));
    inputs
}

/// Load every hostile input through the real engine: none may panic, and
/// every refusal names the file.
#[test]
fn the_loader_never_panics_on_truncated_corrupt_or_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let engine = ProjectorEngine::new(false).unwrap();
    let inputs = hostile_inputs();
    let (mut panics, mut refused, mut loaded) = (Vec::new(), 0, 0);
    for (i, (what, bytes)) in inputs.iter().enumerate() {
        let path = dir.path().join(format!("input-{i}.wasm"));
        match bytes {
            Some(bytes) => std::fs::write(&path, bytes).unwrap(),
            None => std::fs::create_dir(&path).unwrap(),
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.load_file(&path))) {
            Err(_) => panics.push(what.clone()),
            Ok(Ok(_)) => {
                // Only an overwritten byte that the module never reads may
                // still load.
                assert!(what.contains("overwritten"), "{what} loaded");
                loaded += 1;
            }
            Ok(Err(err)) => {
                let err = format!("{err:#}");
                assert!(err.contains(&path.display().to_string()), "{what}: the error names the file: {err}");
                refused += 1;
            }
        }
    }
    println!(
        "hostile inputs tried: {}; refused: {refused}; loaded (harmless corruption): {loaded}; panics: {}",
        inputs.len(),
        panics.len()
    );
    assert!(panics.is_empty(), "the loader panicked on: {panics:?}");
    // The truncations are refused for what they are.
    let cut = dir.path().join("cut.wasm");
    let real = std::fs::read(guest("wallet_allowlist")).unwrap();
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    let err = format!("{:#}", engine.load_file(&cut).err().unwrap());
    assert!(err.contains("is not a valid WebAssembly module"), "{err}");
    assert!(err.contains("cut short or corrupt"), "{err}");
    std::fs::write(&cut, b"").unwrap();
    let err = format!("{:#}", engine.load_file(&cut).err().unwrap());
    assert!(err.contains("is empty (0 bytes)"), "{err}");
    let err = format!("{:#}", engine.load_file(dir.path()).err().unwrap());
    assert!(err.contains("it is a directory"), "{err}");
}

#[test]
fn replay_of_a_truncated_module_exits_1_with_a_clear_message() {
    let ws = Workspace::new();
    let real = std::fs::read(guest("wallet_allowlist")).unwrap();
    let module = ws.path("half.wasm");
    std::fs::write(&module, &real[..real.len() / 2]).unwrap();
    let events = ws.write_events("e.jsonl", &wallet_events(5, 2, "e"));
    let output = projector()
        .args(["replay", "--module", module.to_str().unwrap(), "--events", &events])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "a refused module is an error, not a crash: {stderr}");
    assert!(stderr.contains("half.wasm"), "names the file: {stderr}");
    assert!(stderr.contains("is not a valid WebAssembly module"), "{stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
}

/// A module of `swap_v{version}`.
fn swap_module(version: u32) -> Vec<u8> {
    std::fs::read(guest(&format!("swap_v{version}"))).unwrap()
}

fn versions_seen(ws: &Workspace) -> Vec<i64> {
    ws.query("swap", "SELECT version FROM handled ORDER BY position")
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_i64().unwrap())
        .collect()
}

/// Appends `n` more events to stream `s`; returns the head after them.
fn append(ws: &Workspace, tag: &str, n: usize) -> u64 {
    let lines: Vec<String> = (0..n).map(|i| cloud_event(&format!("{tag}-{i}"), "t", json!(i))).collect();
    let file = ws.write_events(&format!("{tag}.jsonl"), &lines);
    ws.append("s", &file);
    ws.status_of("swap")["head"].as_u64().unwrap()
}

#[test]
fn a_truncated_module_written_over_a_running_one_is_refused_and_the_next_good_write_is_taken() {
    let ws = Workspace::new();
    let module = ws.path("module.wasm");
    std::fs::write(&module, swap_module(1)).unwrap();
    ws.write_config(&[("swap", &module, &["s"])]);
    let mut host = ws.start();
    wait_until(WAIT, "the projection to start", || ws.status_of("swap")["state"] == "running");
    let v1 = sha(&swap_module(1));
    let head = append(&ws, "a", 5);
    ws.wait_caught_up(head, WAIT);

    // A copy in progress: the new module's first part only, written in place.
    let v2 = swap_module(2);
    for cut in [v2.len() / 3, v2.len() - 7] {
        let partial = &v2[..cut];
        std::fs::write(&module, partial).unwrap();
        wait_until(WAIT, "the truncated module to be refused", || {
            ws.status_of("swap")["refused"]["module"] == sha(partial).as_str()
        });
        let status = ws.status_of("swap");
        assert_eq!(status["state"], "running");
        assert_eq!(status["module"], v1.as_str(), "the old module keeps running");
        let reason = status["refused"]["reason"].as_str().unwrap();
        assert!(reason.contains("module.wasm"), "{reason}");
        assert!(reason.contains("is not a valid WebAssembly module"), "{reason}");
        let head = append(&ws, &format!("cut{cut}"), 5);
        ws.wait_caught_up(head, WAIT);
        assert_eq!(versions_seen(&ws).last(), Some(&1), "processed by the old module");
    }
    // The copy completes.
    std::fs::write(&module, &v2).unwrap();
    wait_until(WAIT, "v2 to be live", || ws.status_of("swap")["module"] == sha(&v2).as_str());
    assert!(ws.status_of("swap").get("refused").is_none(), "a good module clears the refusal");
    let head = append(&ws, "b", 5);
    ws.wait_caught_up(head, WAIT);
    assert_eq!(versions_seen(&ws).last(), Some(&2));
    assert!(host.is_running(), "the host is still up");
    let logs = host.logs();
    assert!(logs.contains("module refused, the running module stays"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

#[test]
fn a_truncated_module_at_start_faults_its_projection_with_the_reason_until_a_good_write() {
    let ws = Workspace::new();
    let module = ws.path("module.wasm");
    let v1 = swap_module(1);
    std::fs::write(&module, &v1[..v1.len() / 2]).unwrap();
    ws.write_config(&[("swap", &module, &["s"])]);
    let mut host = ws.start();
    wait_until(WAIT, "the projection to fault", || ws.status_of("swap")["state"] == "faulted");
    let error = ws.status_of("swap")["error"].as_str().unwrap().to_string();
    assert!(error.contains("module.wasm"), "{error}");
    assert!(error.contains("is not a valid WebAssembly module"), "{error}");
    std::fs::write(&module, &v1).unwrap();
    wait_until(WAIT, "the projection to start", || ws.status_of("swap")["state"] == "running");
    let head = append(&ws, "a", 5);
    ws.wait_caught_up(head, WAIT);
    assert!(host.is_running());
    assert!(!host.logs().contains("panicked"), "{}", host.logs());
}

#[test]
fn a_cache_that_cannot_be_written_costs_a_warning_not_the_module() {
    let ws = Workspace::new();
    let module = guest("event_recorder");
    ws.write_config(&[("rec", &module, &["s"])]);
    // The cache folder's place is taken by a file: nothing can be cached.
    std::fs::create_dir_all(ws.data()).unwrap();
    std::fs::write(ws.data().join("cache"), b"not a folder").unwrap();
    let host = ws.start();
    let lines: Vec<String> = (0..4).map(|i| cloud_event(&format!("e{i}"), "t", json!(i))).collect();
    let file = ws.write_events("e.jsonl", &lines);
    ws.append("s", &file);
    ws.wait_caught_up(4, WAIT);
    assert_eq!(ws.query("rec", "SELECT count(*) AS n FROM handled"), json!([{"n": 4}]));
    let logs = host.logs();
    assert!(logs.contains("cannot write the compiled-module cache"), "{logs}");
    assert!(logs.contains("module compiled (not cached)"), "{logs}");
}

/// `projector.toml` with `n` projections named `p000`… of `module`.
fn write_crowd_config(ws: &Workspace, module: &Path, n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("p{i:03}")).collect();
    let projections: Vec<(&str, &Path, &[&str])> =
        names.iter().map(|name| (name.as_str(), module, &["s"][..])).collect();
    ws.write_config(&projections);
}

#[test]
fn a_hundred_projections_of_one_module_start_cold_with_one_compile() {
    let ws = Workspace::new();
    let module: PathBuf = guest("wallet_allowlist");
    write_crowd_config(&ws, &module, 100);
    let host = ws.start();
    let file = ws.write_events("e.jsonl", &wallet_events(6, 3, "w"));
    ws.append("s", &file);
    ws.wait_caught_up(6, WAIT);
    let status = ws.status();
    assert_eq!(status.len(), 100);
    for s in &status {
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["lag"], 0, "{s}");
        assert!(s.get("error").is_none(), "{s}");
    }
    let logs = host.logs();
    assert_eq!(logs.matches("module compiled").count(), 1, "one compile for 100 projections:\n{logs}");
    assert!(!logs.contains("faulted"), "{logs}");
    assert!(!logs.contains("cannot write"), "{logs}");
}

/// Replace `path` the way an editor or a deploy does: write aside, rename.
fn replace_file(path: &Path, text: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

#[test]
fn reading_the_config_and_modules_triggers_no_reload() {
    let ws = Workspace::new();
    let module = guest("event_recorder");
    ws.write_config(&[("a", &module, &["s"])]);
    let host = ws.start();
    wait_until(WAIT, "a to run", || ws.status_of("a")["state"] == "running");
    // What `status`, `cat` or a backup do: open and read, never write.
    for _ in 0..40 {
        std::fs::read(ws.config()).unwrap();
        std::fs::read(&module).unwrap();
        run_ok(&["status", "--config", &ws.config_str()]);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let logs = host.logs();
    assert!(!logs.contains("config reloaded"), "a read reloaded the config:\n{logs}");
    assert!(!logs.contains("config refused"), "{logs}");
    // A real change is still seen.
    let text = std::fs::read_to_string(ws.config()).unwrap();
    replace_file(
        &ws.config(),
        &format!("{text}\n[[projection]]\nname = \"b\"\nmodule = {module:?}\nstreams = [\"s\"]\n"),
    );
    wait_until(WAIT, "b to start", || {
        ws.status().iter().any(|s| s["name"] == "b" && s["state"] == "running")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(host.logs().matches("config reloaded").count(), 1, "{}", host.logs());
}

#[test]
fn a_relative_config_path_reloads_like_an_absolute_one() {
    let ws = Workspace::new();
    let module = guest("event_recorder");
    ws.write_config(&[("a", &module, &["s"])]);
    let log = std::fs::File::create(ws.path("run.log")).unwrap();
    // As the README shows it: run from the config's folder, paths relative.
    let mut child = projector()
        .current_dir(ws.dir.path())
        .args(["run", "--config", "projector.toml", "--listen", "127.0.0.1:0"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until(WAIT, "a to run", || ws.status_of("a")["state"] == "running");
    let text = std::fs::read_to_string(ws.config()).unwrap();
    replace_file(
        &ws.config(),
        &format!("{text}\n[[projection]]\nname = \"b\"\nmodule = {module:?}\nstreams = [\"s\"]\n"),
    );
    wait_until(WAIT, "b, added to the config, to run", || {
        ws.status().iter().any(|s| s["name"] == "b" && s["state"] == "running")
    });
    let logs = std::fs::read_to_string(ws.path("run.log")).unwrap();
    assert!(!logs.contains("data` changed"), "{logs}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn two_hosts_on_one_data_folder_without_the_lock_apply_each_event_once() {
    let ws = Workspace::new();
    ws.write_config(&[("rec", &guest("event_recorder"), &["s"])]);
    let first = ws.start();
    wait_until(WAIT, "the first host to run", || ws.status_of("rec")["state"] == "running");
    // A careless cleanup removes the lock file: the second host gets a lock
    // of its own and both process the same database.
    std::fs::remove_file(ws.data().join("run.lock")).unwrap();
    let log = std::fs::File::create(ws.path("second.log")).unwrap();
    let mut second = projector()
        .args(["run", "--config", &ws.config_str(), "--listen", "127.0.0.1:0"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut total = 0u64;
    for chunk in 0..20 {
        let lines: Vec<String> =
            (0..500).map(|i| cloud_event(&format!("e{chunk}-{i}"), "seen", json!(i))).collect();
        total += ws.append("s", &ws.write_events(&format!("c{chunk}.jsonl"), &lines)).0;
    }
    ws.wait_caught_up(total, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let counted = ws.query("rec", "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM handled");
    second.kill().unwrap();
    second.wait().unwrap();
    drop(first);
    assert_eq!(counted, json!([{"n": total, "ids": total}]), "an event was applied twice");
}

#[test]
fn a_second_offline_rebuild_refuses_while_the_first_runs() {
    let ws = Workspace::new();
    ws.write_config(&[("rec", &guest("event_recorder"), &["s"])]);
    let lines: Vec<String> = (0..200_000).map(|i| cloud_event(&format!("e{i}"), "seen", json!(i))).collect();
    ws.append("s", &ws.write_events("e.jsonl", &lines));
    let mut first = projector().args(["rebuild", "--config", &ws.config_str(), "rec"]).spawn().unwrap();
    let lock = ws.data().join("rebuild.lock");
    wait_until(WAIT, "the first rebuild to hold its lock", || {
        std::fs::File::open(&lock).is_ok_and(|f| f.try_lock_shared().is_err())
    });
    let second = projector().args(["rebuild", "--config", &ws.config_str(), "rec"]).output().unwrap();
    let first_ok = first.wait().unwrap().success();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second rebuild reported success:\n{stderr}");
    assert!(stderr.contains("another `projector rebuild` is running"), "{stderr}");
    assert!(first_ok, "the first rebuild failed");
    assert!(!ws.data().join("requests").exists() && !ws.data().join("projections/rec.rebuild").exists());
    assert_eq!(ws.query("rec", "SELECT count(*) AS n FROM handled"), json!([{"n": 200000}]));
}
