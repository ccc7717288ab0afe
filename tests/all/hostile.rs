//! Hostile module files, hostile disks and crowded starts: truncated, corrupt, foreign or missing modules never panic the loader (fuzzed, in `replay`, at start and on a live swap); a full disk, a read-only or a damaged projection database shows `faulted` with the error and the path, and the projection resumes by itself where that is safe; a rebuild stopped by SIGTERM leaves no files and the next `run` finishes it; discarded and resolved dead letters stay so through every kind of rebuild; the compiled-module cache failing costs a warning; and 100 projections of one module compile it once.

use crate::util::*;
use projector::sandbox::engine::ProjectorEngine;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Load every hostile input through the real engine: none may panic, and
/// every refusal names the file.
#[test]
fn the_loader_never_panics_on_truncated_corrupt_or_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let engine = ProjectorEngine::new(false).unwrap();
    let fuzzed = crate::loader_fuzz::run(&engine, dir.path());
    println!("{fuzzed}");
    assert_eq!(
        fuzzed.tried,
        crate::loader_fuzz::INPUTS,
        "the inputs changed: update loader_fuzz::INPUTS and the README"
    );
    assert!(fuzzed.panics.is_empty(), "the loader panicked on: {:?}", fuzzed.panics);
    assert!(fuzzed.unnamed.is_empty(), "refusals that do not name the file: {:?}", fuzzed.unnamed);
    assert!(fuzzed.loaded_unexpectedly.is_empty(), "loaded: {:?}", fuzzed.loaded_unexpectedly);
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

/// Appends `n` events of type `seen` with ids `<tag>-<i>` to stream `s`;
/// returns how many were appended.
fn append_seen(ws: &Workspace, tag: &str, n: usize) -> u64 {
    let lines: Vec<String> = (0..n).map(|i| cloud_event(&format!("{tag}-{i}"), "seen", json!(i))).collect();
    ws.append("s", &ws.write_events(&format!("{tag}.jsonl"), &lines)).0
}

/// Every event took effect exactly once: `handled` holds `total` rows of
/// `total` distinct ids.
fn assert_each_once(ws: &Workspace, name: &str, total: u64) {
    let counted = ws.query(name, "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM handled");
    assert_eq!(counted, json!([{"n": total, "ids": total}]), "an event was lost or applied twice");
}

/// A small tmpfs mounted over a folder (created), unmounted when dropped.
/// Filling it is a real full disk: the kernel's ENOSPC, SQLite's
/// SQLITE_FULL. Mounting needs root (CAP_SYS_ADMIN); elsewhere a test
/// using it says it is skipped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size_kib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the filesystem of `path`'s folder: write `path` until the kernel
/// refuses a single page more.
fn fill_disk(path: &Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).unwrap();
    let page = [0u8; 4096];
    loop {
        match file.write_all(&page) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::StorageFull => break,
            Err(err) => panic!("filling {}: {err}", path.display()),
        }
    }
}

#[test]
fn a_full_disk_faults_the_projection_and_it_resumes_from_its_checkpoint_when_space_returns() {
    let ws = Workspace::new();
    // The projections' folder on a 4 MiB tmpfs; the event log stays on the
    // real disk, so events keep arriving while the projection's disk is full.
    let Some(_disk) = Tmpfs::mount(&ws.data().join("projections"), 4096) else {
        eprintln!("skipped: mounting a tmpfs (a disk that can really fill up) needs root");
        return;
    };
    ws.write_config(&[("rec", &guest("event_recorder"), &["s"])]);
    let mut host = ws.start();
    let mut total = append_seen(&ws, "a", 100);
    ws.wait_caught_up(total, WAIT);
    let database = ws.database("rec");

    let filler = ws.data().join("projections/filler");
    fill_disk(&filler);
    total += append_seen(&ws, "b", 20_000);
    wait_until(WAIT, "the projection to fault", || ws.status_of("rec")["state"] == "faulted");
    let status = ws.status_of("rec");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("database or disk is full"), "the SQLite error: {error}");
    assert!(error.contains(&database.display().to_string()), "the database's path: {error}");
    assert!(error.contains("tries again"), "what the host does about it: {error}");
    // It keeps trying, and says so all along: never `running` meanwhile.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ws.status_of("rec")["state"], "faulted");
    }
    let base = host.url();
    let answer: serde_json::Value =
        ureq::get(&format!("{base}/projections/rec")).call().unwrap().body_mut().read_json().unwrap();
    assert_eq!(answer["state"], "faulted", "{answer}");

    std::fs::remove_file(&filler).unwrap();
    ws.wait_caught_up(total, WAIT);
    let status = ws.status_of("rec");
    assert_eq!(status["state"], "running", "{status}");
    assert!(status.get("error").is_none(), "{status}");
    assert_each_once(&ws, "rec", total);
    assert!(host.is_running());
    let logs = host.logs();
    assert!(logs.contains("the fault is over: processing again from the checkpoint"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    assert!(host.terminate().success());
}

/// Make `file` read-only for this process, whoever it runs as; `None` if
/// this system cannot. Root ignores file modes (a `chmod 0444` file is
/// still written), so as root the file is made immutable (`chattr +i`),
/// which binds root too; another user gets `chmod 0444`.
fn make_read_only(file: &Path) -> Option<impl FnOnce()> {
    let root =
        std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let (program, set, unset) = if root { ("chattr", "+i", "-i") } else { ("chmod", "0444", "0644") };
    let run = move |file: &Path, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .arg(file)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !run(file, set) {
        return None;
    }
    let file = file.to_path_buf();
    Some(move || assert!(run(&file, unset), "cannot make {} writable again", file.display()))
}

#[test]
fn a_read_only_database_faults_with_the_error_and_recovers_once_it_is_writable() {
    let ws = Workspace::new();
    ws.write_config(&[("rec", &guest("event_recorder"), &["s"])]);
    let host = ws.start();
    let mut total = append_seen(&ws, "a", 10);
    ws.wait_caught_up(total, WAIT);
    assert!(host.terminate().success());
    let database = ws.database("rec");
    let Some(writable_again) = make_read_only(&database) else {
        eprintln!("skipped: this filesystem cannot make {} read-only", database.display());
        return;
    };

    let mut host = ws.start();
    total += append_seen(&ws, "b", 10);
    wait_until(WAIT, "the projection to fault", || ws.status_of("rec")["state"] == "faulted");
    let error = ws.status_of("rec")["error"].as_str().unwrap().to_string();
    assert!(error.contains("readonly database"), "the SQLite error: {error}");
    assert!(error.contains(&database.display().to_string()), "the database's path: {error}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ws.status_of("rec")["state"], "faulted", "not `stopped`, not `running`");

    writable_again();
    ws.wait_caught_up(total, WAIT);
    assert_eq!(ws.status_of("rec")["state"], "running");
    assert_each_once(&ws, "rec", total);
    assert!(host.is_running());
    assert!(host.terminate().success());
}

/// Overwrite every page of the database file but the first (its header
/// and schema stay readable; the tables' pages do not).
fn damage(database: &Path) {
    let mut bytes = std::fs::read(database).unwrap();
    assert!(bytes.len() > 4096 * 2, "a database of several pages");
    for (i, byte) in bytes.iter_mut().enumerate().skip(4096) {
        *byte = (i * 7 + 13) as u8;
    }
    std::fs::write(database, bytes).unwrap();
}

#[test]
fn a_damaged_database_stays_faulted_until_projector_rebuild_replaces_it_while_run_runs() {
    let ws = Workspace::new();
    ws.write_config(&[
        ("rec", &guest("event_recorder"), &["s"]),
        ("other", &guest("event_recorder"), &["s"]),
    ]);
    let host = ws.start();
    let mut total = append_seen(&ws, "a", 2_000);
    ws.wait_caught_up(total, WAIT);
    assert!(host.terminate().success());
    let database = ws.database("rec");
    damage(&database);

    let mut host = ws.start();
    total += append_seen(&ws, "b", 10);
    wait_until(WAIT, "the projection to fault", || ws.status_of("rec")["state"] == "faulted");
    let error = ws.status_of("rec")["error"].as_str().unwrap().to_string();
    assert!(error.contains(&format!("the projection database {} is damaged", database.display())), "{error}");
    assert!(error.contains("run `projector rebuild rec`"), "what to do: {error}");
    assert!(error.contains("malformed"), "SQLite's error: {error}");
    wait_until(WAIT, "the other projection to catch up", || ws.status_of("other")["checkpoint"] == total);
    // A damaged file is not retried: it stays faulted.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ws.status_of("rec")["state"], "faulted");
    assert!(host.is_running());

    // The fix, as the error says, with the host running.
    let out = json(&run_ok(&["rebuild", "--config", &ws.config_str(), "rec"]));
    assert!(out["database"].as_str().unwrap().ends_with("rec.1.db"), "{out}");
    ws.wait_caught_up(total, WAIT);
    let status = ws.status_of("rec");
    assert_eq!(status["state"], "running", "{status}");
    assert!(status.get("error").is_none(), "{status}");
    assert_each_once(&ws, "rec", total);
    assert!(!database.exists(), "the damaged file was replaced");
    assert!(host.terminate().success());
}

/// The files of projection `name`'s database generations in the data
/// folder: `<name>.db`, `<name>.<n>.db` and their `-wal`, `-shm`.
fn generation_files(ws: &Workspace, name: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(ws.data().join("projections"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|file| projector::config::paths::is_generation_file(file, name))
        .collect();
    files.sort();
    files
}

/// SIGTERM `host` while the rebuild of `rec` it was asked for is under way.
fn terminate_mid_rebuild(ws: &Workspace, host: Host) {
    wait_until(WAIT, "the rebuild to be under way", || {
        ws.status_of("rec")["rebuilding"]["position"].as_u64().is_some_and(|p| p > 0)
    });
    assert!(host.terminate().success());
    let current = ws.database("rec").file_name().unwrap().to_string_lossy().into_owned();
    let left: Vec<String> =
        generation_files(ws, "rec").into_iter().filter(|file| !file.starts_with(&current)).collect();
    assert!(left.is_empty(), "files of the unfinished generation left behind: {left:?}");
}

#[test]
fn a_rebuild_requested_before_sigterm_leaves_no_files_and_the_next_run_finishes_it() {
    let ws = Workspace::new();
    ws.write_config(&[("rec", &guest("event_recorder"), &["s"])]);
    let total = append_seen(&ws, "e", 200_000);
    let host = ws.start();
    ws.wait_caught_up(total, WAIT);

    // Asked over HTTP, stopped before the takeover.
    let base = host.url();
    let answer = ureq::post(&format!("{base}/projections/rec/rebuild"))
        .header("content-type", "application/json")
        .send("")
        .unwrap();
    assert_eq!(answer.status(), 202);
    terminate_mid_rebuild(&ws, host);
    assert!(ws.database("rec").ends_with("rec.db"), "nothing took over");

    // The next run takes the request up again and finishes it.
    let host = ws.start();
    wait_until(WAIT, "the rebuild to take over", || ws.database("rec").ends_with("rec.1.db"));
    ws.wait_caught_up(total, WAIT);
    assert_each_once(&ws, "rec", total);
    assert!(host.logs().contains("a rebuild was requested before the host stopped"), "{}", host.logs());

    // Asked with `projector rebuild`, which waits: told the request is kept.
    let waiting = projector()
        .args(["rebuild", "--config", &ws.config_str(), "rec"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    terminate_mid_rebuild(&ws, host);
    let output = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("the request is kept"), "{stderr}");
    let host = ws.start();
    wait_until(WAIT, "the rebuild to take over", || ws.database("rec").ends_with("rec.2.db"));
    ws.wait_caught_up(total, WAIT);
    assert_each_once(&ws, "rec", total);
    assert!(host.terminate().success());
    assert_eq!(generation_files(&ws, "rec"), ["rec.2.db"], "only the current generation is left");
    assert!(!ws.data().join("projections/rec.rebuild").exists());
}

/// `hostile` on stream `s`, run until three events are
/// parked — two that need an `h-unlock` first, one that panics — then
/// unlocked through the log: a retry of all applies the two, and the third
/// is discarded. Returns the running host and the head.
fn settle_dead_letters(ws: &Workspace) -> (Host, u64) {
    ws.write_config(&[("hostile", &guest("hostile"), &["s"])]);
    let host = ws.start();
    let lines = [
        cloud_event("p-0", "plain", json!(0)),
        cloud_event("dl-0", "h-needs-unlock", json!(null)),
        cloud_event("dl-1", "h-panic", json!(null)),
        cloud_event("dl-2", "h-needs-unlock", json!(null)),
        cloud_event("p-1", "plain", json!(1)),
        cloud_event("unlock", "h-unlock", json!(null)),
        cloud_event("p-2", "plain", json!(2)),
    ];
    let head = ws.append("s", &ws.write_events("dl.jsonl", &lines)).0;
    ws.wait_caught_up(head, WAIT);
    assert_eq!(dead_letter_ids(ws), ["dl-0", "dl-1", "dl-2"]);
    let config = ws.config_str();
    let out = json(&run_ok(&["dead-letters", "retry", "--config", &config, "hostile", "--all"]));
    assert_eq!(out["resolved"], json!(["dl-0", "dl-2"]), "{out}");
    let out = json(&run_ok(&["dead-letters", "discard", "--config", &config, "hostile", "dl-1"]));
    assert_eq!(out, json!({"discarded": 1}));
    assert_settled(ws);
    (host, head)
}

fn dead_letter_ids(ws: &Workspace) -> Vec<String> {
    json(&run_ok(&["dead-letters", "list", "--config", &ws.config_str(), "hostile"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|letter| letter["id"].as_str().unwrap().to_string())
        .collect()
}

/// What the operator settled holds: no dead letters, the resolved events
/// applied once each, the discarded one never.
fn assert_settled(ws: &Workspace) {
    assert_eq!(dead_letter_ids(ws), Vec::<String>::new(), "a settled dead letter came back");
    let applied = ws.query("hostile", "SELECT id FROM handled WHERE id LIKE 'dl-%' ORDER BY id");
    assert_eq!(applied, json!([{"id": "dl-0"}, {"id": "dl-2"}]), "the resolved events, applied once each");
    assert_eq!(ws.status_of("hostile")["dead_letters"], 0);
}

#[test]
fn settled_dead_letters_stay_settled_through_a_rebuild_of_the_running_host() {
    let ws = Workspace::new();
    let (host, head) = settle_dead_letters(&ws);
    let out = json(&run_ok(&["rebuild", "--config", &ws.config_str(), "hostile"]));
    assert!(out["database"].as_str().unwrap().ends_with("hostile.1.db"), "{out}");
    ws.wait_caught_up(head, WAIT);
    assert_settled(&ws);
    let logs = host.logs();
    assert!(logs.contains("event skipped: it was discarded as a dead letter"), "{logs}");
    assert!(logs.contains("applied again after the rebuild"), "{logs}");
    // And a rebuild of the rebuilt state: the record went along.
    run_ok(&["rebuild", "--config", &ws.config_str(), "hostile"]);
    assert_settled(&ws);
    assert!(host.terminate().success());
}

#[test]
fn settled_dead_letters_stay_settled_through_an_offline_rebuild() {
    let ws = Workspace::new();
    let (host, head) = settle_dead_letters(&ws);
    assert!(host.terminate().success());
    let out = json(&run_ok(&["rebuild", "--config", &ws.config_str(), "hostile"]));
    assert!(out["database"].as_str().unwrap().ends_with("hostile.1.db"), "{out}");
    assert_eq!(out["status"]["checkpoint"], head);
    assert_settled(&ws);
}

#[test]
fn settled_dead_letters_stay_settled_through_a_rebuild_for_a_new_state_version_at_start() {
    let ws = Workspace::new();
    let (host, head) = settle_dead_letters(&ws);
    assert!(host.terminate().success());
    // The config now names the same guest building state version 2.
    ws.write_config(&[("hostile", &guest("hostile_v2"), &["s"])]);
    let host = ws.start();
    wait_until(WAIT, "the new generation to take over", || ws.database("hostile").ends_with("hostile.1.db"));
    ws.wait_caught_up(head, WAIT);
    assert_settled(&ws);
    assert!(host.terminate().success());
}
