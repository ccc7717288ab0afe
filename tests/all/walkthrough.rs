//! The README's "Write a projection in five minutes", end to end, and what
//! `projector new` refuses.
//!
//! The crate is scaffolded outside the workspace (the workspace is not
//! written to) with the workspace's Cargo.lock beside it, so it builds with
//! the same dependency versions, offline, into `target/walkthrough/`: its
//! native test build and its one guest build are paid once, then warm.

use crate::util::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

/// `projector new args…` in `dir`: (success, stdout, stderr).
fn new_in(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = projector().arg("new").args(args).current_dir(dir).output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn new_refuses_a_bad_name_and_an_existing_folder() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["Inventory", "9lives", "my app", "a/b"] {
        let (ok, _, stderr) = new_in(dir.path(), &[bad]);
        assert!(!ok);
        assert!(
            stderr.contains("is not a projection name: use 1 to 64 lowercase letters"),
            "{bad}: {stderr}"
        );
    }
    let (ok, _, stderr) = new_in(dir.path(), &["struct"]);
    assert!(!ok && stderr.contains("\"struct\" is a Rust keyword"), "{stderr}");
    let (ok, _, stderr) = new_in(dir.path(), &["serde"]);
    assert!(!ok && stderr.contains("the name of a crate a projection builds with"), "{stderr}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a refused name writes nothing");

    std::fs::create_dir_all(dir.path().join("projections/inventory")).unwrap();
    let (ok, _, stderr) = new_in(dir.path(), &["inventory"]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "projections/inventory already exists; choose another name, or another folder with --dir"
        ),
        "{stderr}"
    );
    let (ok, _, stderr) = new_in(dir.path(), &["other", "--dir", "projections"]);
    assert!(!ok && stderr.contains("projections already exists"), "{stderr}");
}

#[test]
fn new_inherits_what_the_workspace_pins_and_says_what_to_add_when_not_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = root().join("guest-sdk");
    std::fs::write(
        dir.path().join("Cargo.toml"),
        format!(
            "[workspace]\nmembers = [\"projections/*\"]\n\n[workspace.dependencies]\n\
             projector-sdk = {{ path = {:?} }}\nserde = \"1\"\n\n[workspace.lints.rust]\nunsafe_code = \"deny\"\n",
            sdk.to_string_lossy()
        ),
    )
    .unwrap();

    let (ok, stdout, stderr) = new_in(dir.path(), &["login-counter"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("created projections/login-counter"), "{stdout}");
    assert!(stdout.contains("cargo test -p login-counter"), "{stdout}");
    assert!(!stdout.contains("note:"), "{stdout}");
    let crate_dir = dir.path().join("projections/login-counter");
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("projector-sdk.workspace = true"), "{manifest}");
    assert!(manifest.contains("serde = { workspace = true, features = [\"derive\"] }"), "{manifest}");
    assert!(manifest.contains("serde_json = \"1\""), "not pinned by the workspace: {manifest}");
    assert!(manifest.contains("[lints]\nworkspace = true"), "{manifest}");
    assert!(manifest.contains("crate-type = [\"cdylib\", \"rlib\"]"), "{manifest}");
    let config = std::fs::read_to_string(crate_dir.join("projector.toml")).unwrap();
    assert!(config.contains("module = \"../../target/projections/login_counter.wasm\""), "{config}");
    let lib = std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap();
    assert!(lib.contains("pub struct LoginCounter;") && lib.contains("export!(LoginCounter)"), "{lib}");
    assert!(crate_dir.join("tests/login_counter.rs").is_file());
    assert!(
        crate_dir.join("fixtures/events.jsonl").is_file() && crate_dir.join("fixtures/query.json").is_file()
    );

    // A folder the members do not cover: the crate is made, with the SDK
    // by path, and new says what to add.
    let (ok, stdout, stderr) = new_in(dir.path(), &["orders", "--dir", "services/orders"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("whose members do not include services/orders; add \"services/orders\" to `members`"),
        "{stdout}"
    );
    let manifest = std::fs::read_to_string(dir.path().join("services/orders/Cargo.toml")).unwrap();
    let sdk = sdk.canonicalize().unwrap();
    assert!(manifest.contains(&format!("projector-sdk = {{ path = \"{}\" }}", sdk.display())), "{manifest}");
    assert!(!manifest.contains("workspace"), "{manifest}");
}

/// The log of a `projector dev` child, read from where the last wait
/// left off.
struct DevLog {
    path: PathBuf,
    seen: usize,
}

impl DevLog {
    /// Wait until `needle` appears after what earlier waits consumed;
    /// returns the text up to and including it.
    fn wait_for(&mut self, needle: &str, dev: &mut Child) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            if let Some(at) = text[self.seen..].find(needle) {
                let end = self.seen + at + needle.len();
                let consumed = text[self.seen..end].to_string();
                self.seen = end;
                return consumed;
            }
            if let Some(status) = dev.try_wait().unwrap() {
                panic!("projector dev exited ({status}) before saying {needle:?}:\n{text}");
            }
            assert!(Instant::now() < deadline, "timed out waiting for {needle:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn ask(url: &str, request: &Value) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent
        .post(&format!("{url}/projections/inventory/query"))
        .header("content-type", "application/json")
        .send(request.to_string())
        .unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
}

/// Replace `from` by `to` in the crate's `src/lib.rs`, as an editor saves.
fn edit(crate_dir: &Path, from: &str, to: &str) {
    let path = crate_dir.join("src/lib.rs");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "src/lib.rs has no {from:?}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_walkthrough_from_new_to_answering_in_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let cache = root().join("target/walkthrough");
    let guests = cache.join("guests");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    // 1. projector new
    let crate_dir = dir.path().join("inventory");
    let (ok, stdout, stderr) = new_in(dir.path(), &["inventory", "--dir", "inventory"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("created inventory, the projection crate `inventory`"), "{stdout}");
    std::fs::copy(root().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();

    // 2. cargo test: the scaffold's native tests pass.
    let output = Command::new(&cargo)
        .args(["test", "--offline", "--manifest-path"])
        .arg(crate_dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", cache.join("native"))
        .output()
        .unwrap();
    let test_output = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{test_output}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(test_output.contains("test result: ok. 4 passed"), "{test_output}");

    // 3. projector build: prints the module's path; unchanged, it is quick.
    let build = || {
        let started = Instant::now();
        let output = projector()
            .args(["build", "--target-dir"])
            .arg(&guests)
            .arg(&crate_dir)
            .env("CARGO_NET_OFFLINE", "true")
            .output()
            .unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(output.status.success(), "{stderr}");
        (String::from_utf8(output.stdout).unwrap(), stderr, started.elapsed())
    };
    let (stdout, _, _) = build();
    let wasm = crate_dir.join("target/projections/inventory.wasm").canonicalize().unwrap();
    assert_eq!(Path::new(stdout.trim()).canonicalize().unwrap(), wasm);
    let (_, stderr, took) = build();
    assert!(stderr.contains("build: unchanged:"), "{stderr}");
    assert!(took < Duration::from_secs(10), "an unchanged crate took {took:?} to build");
    eprintln!("projector build of an unchanged crate: {took:?}");

    // 4. projector replay: the fixture through the module, and its query.
    let request = std::fs::read_to_string(crate_dir.join("fixtures/query.json")).unwrap();
    let answer = json(&run_ok(&[
        "replay",
        "--module",
        wasm.to_str().unwrap(),
        "--events",
        crate_dir.join("fixtures/events.jsonl").to_str().unwrap(),
        "--request",
        &request,
    ]));
    assert_eq!(answer, json!({"item_id": "apple", "quantity": 5, "additions": 2}));

    // 5. projector dev: builds, runs, appends the fixture, serves.
    let log_path = dir.path().join("dev.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut dev = projector()
        .args(["dev", "--listen", "127.0.0.1:0", "--target-dir"])
        .arg(&guests)
        .arg(&crate_dir)
        .env("CARGO_NET_OFFLINE", "true")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(log)
        .spawn()
        .unwrap();
    let dev_guard = KillOnDrop(dev.id());
    let mut log = DevLog { path: log_path, seen: 0 };
    log.wait_for(
        "appended fixtures/events.jsonl to stream \"items\": {\"appended\":3,\"duplicates\":0}",
        &mut dev,
    );
    let url = format!(
        "http://{}",
        std::fs::read_to_string(crate_dir.join("target/projector-dev/listen.addr")).unwrap().trim()
    );
    let said = log.wait_for("dev: query {\"item_id\":\"apple\"} → ", &mut dev);
    assert!(said.contains("dev: inventory runs module"), "{said}");
    let request: Value = serde_json::from_str(&request).unwrap();
    assert_eq!(ask(&url, &request), json!({"item_id": "apple", "quantity": 5, "additions": 2}));
    let queried = json(&run_ok(&["query", "--url", &url, "inventory", "--request", &request.to_string()]));
    assert_eq!(queried["quantity"], 5);

    // A saved edit is built and swapped in.
    edit(
        &crate_dir,
        "Ok(StockAnswer { item_id: q.item_id,",
        "Ok(StockAnswer { item_id: q.item_id.to_uppercase(),",
    );
    let said = log.wait_for("dev: query", &mut dev);
    assert!(
        said.contains("src/lib.rs saved; building") && said.contains("dev: inventory swapped in module"),
        "{said}"
    );
    assert_eq!(ask(&url, &request)["item_id"], "APPLE");
    let swapped = sha256_file(&wasm);
    assert_eq!(json(&run_ok(&["status", "--url", &url]))[0]["module"], swapped.as_str());

    // An edit that does not build changes nothing: the last module serves.
    edit(&crate_dir, "let (quantity, additions) = found", "let (quantity, additions) = found +");
    let said = log.wait_for("dev: the host keeps running the last good module", &mut dev);
    assert!(said.contains("building inventory for wasm32-unknown-unknown failed"), "{said}");
    assert_eq!(ask(&url, &request)["item_id"], "APPLE");

    // A module the host refuses (a migration edited after it ran) neither.
    edit(&crate_dir, "let (quantity, additions) = found +", "let (quantity, additions) = found");
    edit(&crate_dir, "additions INTEGER NOT NULL\n", "additions INTEGER NOT NULL DEFAULT 0\n");
    let said = log.wait_for("dev: it keeps running module", &mut dev);
    assert!(
        said.contains("dev: the host refused module") && said.contains("migration 1 was changed"),
        "{said}"
    );
    assert_eq!(ask(&url, &request)["item_id"], "APPLE");
    assert_eq!(json(&run_ok(&["status", "--url", &url]))[0]["module"], swapped.as_str());

    // A new state version: the host rebuilds the state with the new rule.
    edit(&crate_dir, "additions INTEGER NOT NULL DEFAULT 0\n", "additions INTEGER NOT NULL\n");
    edit(&crate_dir, "const STATE_VERSION: u32 = 1;", "const STATE_VERSION: u32 = 2;");
    edit(&crate_dir, "(&added.item_id, added.quantity),", "(&added.item_id, added.quantity * 10),");
    let said = log.wait_for("dev: query", &mut dev);
    assert!(said.contains("rebuilt its state from the log (a new state version)"), "{said}");
    assert_eq!(ask(&url, &request), json!({"item_id": "APPLE", "quantity": 50, "additions": 2}));

    // SIGTERM stops the host, then dev, cleanly.
    let status = Command::new("kill").args(["-TERM", &dev.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = dev.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "projector dev did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::mem::forget(dev_guard);
    let said = log.wait_for("dev: stopped", &mut dev);
    assert!(exit.success(), "{exit}: {said}");
    assert!(said.contains("stopping: finishing the batches in flight"), "{said}");
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    assert!(agent.get(&format!("{url}/healthz")).call().is_err(), "the host still serves");
}

/// Stops `projector dev` (and so its host) when the test panics before it
/// did, so a failed test leaves no host behind.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.to_string()]).status();
    }
}
