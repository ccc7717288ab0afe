//! `projector dev`: the inner loop of writing a projection. It builds the
//! crate, runs the module in a `projector run` of its own (a child process
//! with the crate's `projector.toml` and data folder), appends the crate's
//! fixture, and rebuilds on every save of the crate's sources. The host
//! swaps a new module in between two batches, or rebuilds the state when
//! the state version changed; dev watches the host's status and says which
//! happened, then asks the module the fixture's query again.
//!
//! A failed build, or a module the host refuses, changes nothing: the last
//! good module keeps running. The host is a child rather than a thread so
//! that what runs is exactly `projector run`, with its own logs; Ctrl-C or
//! SIGTERM stops it cleanly, then dev.

use crate::cli::build::{Builder, Built, GuestCrate, Toolchain, shown};
use crate::cli::remote::Remote;
use crate::config::Config;
use crate::sources::cloudevents;
use crate::sources::embedded::EventLog;
use anyhow::{Context as _, Result, bail};
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

/// `projector dev`'s arguments.
#[derive(clap::Args)]
pub struct DevArgs {
    /// The guest crate's folder.
    #[arg(default_value = ".")]
    crate_dir: PathBuf,
    /// Serve the HTTP API and status page on this address (port 0 picks a
    /// free one).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Cargo's target dir for the guest build (default:
    /// <workspace>/target/guests).
    #[arg(long)]
    target_dir: Option<PathBuf>,
    /// After every swap, rebuild the state from the log with the new
    /// module too, so the answers show what an edit does to every event,
    /// not only to the ones appended after it.
    #[arg(long)]
    rebuild: bool,
}

/// How long a save takes to settle before the build starts.
const SAVE_DEBOUNCE: Duration = Duration::from_millis(100);
/// How long dev waits for the host to take up a new module before saying
/// it heard nothing.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a faulted projection may stay faulted after a new module before
/// dev says it faulted again.
const RESTART_GRACE: Duration = Duration::from_secs(5);

/// What the main loop waits for.
enum DevEvent {
    /// These sources were saved.
    Saved(Vec<PathBuf>),
    /// SIGINT or SIGTERM.
    Stop,
}

/// Run `projector dev` until SIGINT or SIGTERM.
pub fn run(args: DevArgs) -> Result<()> {
    let krate = GuestCrate::locate(&args.crate_dir)?;
    let builder =
        Builder { toolchain: Toolchain::detect(&krate.workspace, false)?, target_dir: args.target_dir };
    let (config_path, config) = dev_config(&krate)?;
    let name = projection_running(&config, &config_path, &krate)?;
    let (events_tx, events) = channel();
    on_signals(events_tx.clone())?;
    let _watcher = watch_sources(&krate.dir, events_tx)?;
    let mut dev = Dev {
        krate,
        builder,
        config_path,
        config,
        name,
        listen: args.listen,
        rebuild: args.rebuild,
        host: None,
        pending: None,
    };

    match dev.build() {
        Some(built) => dev.start(&built)?,
        None => eprintln!("dev: fix the build and save; dev builds again on every save"),
    }
    let stopped = loop {
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(DevEvent::Stop) | Err(RecvTimeoutError::Disconnected) => break Ok(()),
            Ok(DevEvent::Saved(paths)) => {
                let saved: Vec<String> = paths
                    .iter()
                    .map(|p| p.strip_prefix(&dev.krate.dir).unwrap_or(p).display().to_string())
                    .collect();
                eprintln!("dev: {} saved; building", saved.join(", "));
                if let Some(built) = dev.build() {
                    match &dev.host {
                        None => dev.start(&built)?,
                        Some(_) if built.changed => {
                            eprintln!(
                                "dev: new module {}; waiting for the host to take it",
                                short(&built.sha256)
                            );
                            dev.pending = Some(dev.pending(&built.sha256, Awaited::Swap));
                        }
                        Some(_) => eprintln!("dev: the module is unchanged; nothing to swap"),
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some(host) = &mut dev.host
            && let Some(status) = host.child.try_wait().context("cannot wait for the host")?
        {
            break Err(anyhow::anyhow!("the host stopped ({status}); its log above says why"));
        }
        dev.follow_up();
    };
    if let Some(host) = dev.host.take() {
        eprintln!("dev: stopping the host");
        host.stop(&events)?;
    }
    stopped.map(|()| eprintln!("dev: stopped"))
}

/// The config dev runs: the crate's `projector.toml`, or one made in
/// `target/projector-dev/` for a crate without one.
fn dev_config(krate: &GuestCrate) -> Result<(PathBuf, Config)> {
    let own = krate.dir.join("projector.toml");
    let path = if own.is_file() {
        own
    } else {
        let dir = krate.dir.join("target").join("projector-dev");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("projector.toml");
        let text = format!(
            "# Made by `projector dev` for a crate without a projector.toml.\nversion = 1\ndata = \".\"\n\n\
             [[projection]]\nname = {:?}\nmodule = {:?}\nstreams = [{:?}]\n",
            krate.package,
            krate.wasm().to_string_lossy(),
            krate.package
        );
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "dev: {} has no projector.toml; running with {} (stream {:?}): copy it into the crate to change it",
            shown(&krate.dir).display(),
            shown(&path).display(),
            krate.package
        );
        path
    };
    let config = Config::load(&path)?;
    Ok((path, config))
}

/// The projection of `config` that runs the module the crate builds.
fn projection_running(config: &Config, config_path: &Path, krate: &GuestCrate) -> Result<String> {
    let wasm = krate.wasm();
    let dir = wasm.parent().expect("a module path has a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let same = |module: &Path| {
        module.file_name() == wasm.file_name()
            && module.parent().and_then(|d| d.canonicalize().ok()) == dir.canonicalize().ok()
    };
    match config.projections.iter().find(|p| same(&p.module)) {
        Some(p) => Ok(p.name.clone()),
        None => bail!(
            "{} lists no projection running {}, the module `projector build` makes of this crate; set \
             `module` in its [[projection]] to that file",
            config_path.display(),
            shown(&wasm).display()
        ),
    }
}

/// SIGINT and SIGTERM become [`DevEvent::Stop`]; a second one while
/// stopping forces the stop.
fn on_signals(events: Sender<DevEvent>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal handler's runtime")?;
    let (mut term, mut interrupt) = {
        let _runtime = runtime.enter();
        (
            signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        )
    };
    std::thread::Builder::new()
        .name("dev-signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = term.recv() => {}
                    }
                    if events.send(DevEvent::Stop).is_err() {
                        return;
                    }
                }
            })
        })
        .context("cannot start the signal handler")?;
    Ok(())
}

type Watcher = notify_debouncer_full::Debouncer<
    notify_debouncer_full::notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// Saves of the crate's sources: `src/` and the files cargo reads at its
/// root (`Cargo.toml`, `build.rs`). Not `target/`, where builds and the
/// host write all the time.
fn watch_sources(dir: &Path, events: Sender<DevEvent>) -> Result<Watcher> {
    let src = dir.join("src");
    let roots = [dir.join("Cargo.toml"), dir.join("build.rs")];
    // Editors' scratch files (`.lib.rs.swp`, `lib.rs~`, vim's `4913`) are
    // not saves.
    let scratch = |path: &Path| {
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        name.starts_with('.') || name.ends_with('~') || name == "4913"
    };
    let is_source =
        move |path: &Path| (path.starts_with(&src) || roots.iter().any(|r| r == path)) && !scratch(path);
    let mut watcher = new_debouncer(SAVE_DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(batch) = result else { return };
        let mut saved: Vec<PathBuf> = batch
            .iter()
            .filter(|e| e.kind.is_create() || e.kind.is_modify() || e.kind.is_remove())
            .flat_map(|e| e.paths.iter())
            .filter(|p| is_source(p))
            .cloned()
            .collect();
        saved.sort();
        saved.dedup();
        if !saved.is_empty() {
            let _ = events.send(DevEvent::Saved(saved));
        }
    })
    .context("cannot start the file watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    if dir.join("src").is_dir() {
        watcher.watch(dir.join("src"), RecursiveMode::Recursive).context("cannot watch src/")?;
    }
    Ok(watcher)
}

/// What dev holds while it runs.
struct Dev {
    krate: GuestCrate,
    builder: Builder,
    config_path: PathBuf,
    config: Config,
    /// The projection running the crate's module.
    name: String,
    /// Where the host serves.
    listen: String,
    /// Rebuild the state after every swap.
    rebuild: bool,
    host: Option<Host>,
    /// A module dev waits to see the host take up.
    pending: Option<Pending>,
}

impl Dev {
    /// Build the crate; `None` (having said why) when it failed.
    fn build(&self) -> Option<Built> {
        match self.builder.build(std::slice::from_ref(&self.krate)) {
            Ok(mut built) => Some(built.remove(0)),
            Err(err) => {
                eprintln!("dev: {err:#}");
                if self.host.is_some() {
                    eprintln!("dev: the host keeps running the last good module");
                }
                None
            }
        }
    }

    /// Start the host, append the fixture, and say where it serves.
    fn start(&mut self, built: &Built) -> Result<()> {
        let host = Host::start(&self.config_path, &self.config.data, &self.listen)?;
        if let Err(err) = self.append_fixture() {
            eprintln!("dev: the fixture was not appended: {err:#}");
        }
        let url = &host.url;
        eprintln!("dev: serving {url}/ (the status page; the API under {url}/projections/{})", self.name);
        if let Ok(request) = std::fs::read_to_string(self.query_file()) {
            eprintln!(
                "dev: query it: curl -d '{}' {url}/projections/{}/query",
                compact(request.trim()),
                self.name
            );
        }
        eprintln!(
            "dev: rebuilding on every save of {}; stop with Ctrl-C",
            shown(&self.krate.dir.join("src")).display()
        );
        self.host = Some(host);
        self.pending = Some(self.pending(&built.sha256, Awaited::Start));
        Ok(())
    }

    /// Wait for the host to take up module `sha256`.
    fn pending(&self, sha256: &str, awaited: Awaited) -> Pending {
        let status = self.host.as_ref().and_then(|h| h.api.get(&format!("/projections/{}", self.name)).ok());
        Pending {
            sha256: sha256.to_string(),
            awaited,
            database: self.config.database_path(&self.name),
            faulted_before: status.is_some_and(|s| s["state"] == "faulted"),
            rebuilding: false,
            since: Instant::now(),
        }
    }

    fn query_file(&self) -> PathBuf {
        self.krate.dir.join("fixtures").join("query.json")
    }

    /// Append `fixtures/events.jsonl` to the projection's first stream
    /// (again each time: the log skips ids it has).
    fn append_fixture(&self) -> Result<()> {
        let file = self.krate.dir.join("fixtures").join("events.jsonl");
        let Ok(bytes) = std::fs::read(&file) else { return Ok(()) };
        let projection = self.config.projection(&self.name)?;
        let stream = projection.first_stream().unwrap_or_default().to_string();
        let origin = file.display().to_string();
        let mut events = cloudevents::parse_lines(cloudevents::utf8_text(&bytes, &origin)?, &origin)?;
        cloudevents::fill_correlation_ids(&mut events, &uuid::Uuid::new_v4().to_string());
        let appended = EventLog::open(&self.config.data)?.append(&stream, &events)?;
        eprintln!(
            "dev: appended fixtures/events.jsonl to stream {stream:?}: {}",
            serde_json::to_string(&appended)?
        );
        Ok(())
    }

    /// Ask the host how the module dev waits for is doing, and say so once
    /// it is live, rebuilding, refused or faulted.
    fn follow_up(&mut self) {
        let (Some(host), Some(pending)) = (&self.host, &mut self.pending) else { return };
        let Ok(status) = host.api.get(&format!("/projections/{}", self.name)) else { return };
        let sha = pending.sha256.clone();
        let sha = sha.as_str();
        let is = |field: &str| status[field]["module"].as_str() == Some(sha);
        // A rebuild moves the state to a new database file: however quick
        // it was, this shows it happened.
        let rebuilt = self.config.database_path(&self.name) != pending.database;
        let mut rebuild_next = false;
        let done = if status["state"] == "faulted"
            && (!pending.faulted_before || pending.since.elapsed() > RESTART_GRACE)
        {
            eprintln!(
                "dev: {} faulted: {}",
                self.name,
                status["error"].as_str().unwrap_or("no reason recorded")
            );
            eprintln!("dev: save a fix: the host starts it again with the new module");
            true
        } else if is("refused") && !matches!(pending.awaited, Awaited::Start) {
            // (At a start, a refusal on record is from an earlier run.)
            let reason = status["refused"]["reason"].as_str().unwrap_or("no reason given");
            eprintln!("dev: the host refused module {}: {reason}", short(sha));
            eprintln!("dev: it keeps running module {}", short(status["module"].as_str().unwrap_or("?")));
            true
        } else if is("rebuilding") && !matches!(pending.awaited, Awaited::Rebuild) {
            if !pending.rebuilding {
                eprintln!(
                    "dev: module {} declares another state version: the host rebuilds the state from the \
                     log while the old state serves",
                    short(sha)
                );
                pending.rebuilding = true;
            }
            false
        } else if status["module"].as_str() == Some(sha)
            && status["lag"] == 0
            && status["state"] != "rebuilding"
            && (rebuilt || !matches!(pending.awaited, Awaited::Rebuild))
        {
            let what = match (pending.awaited, rebuilt) {
                (Awaited::Rebuild, _) => "rebuilt its state from the log with",
                (_, true) => "rebuilt its state from the log (a new state version) with",
                (Awaited::Start, false) => "runs",
                (Awaited::Swap, false) => "swapped in",
            };
            eprintln!(
                "dev: {} {what} module {} (checkpoint {}, {} dead letters)",
                self.name,
                short(sha),
                status["checkpoint"],
                status["dead_letters"]
            );
            rebuild_next = self.rebuild && matches!(pending.awaited, Awaited::Swap) && !rebuilt;
            if !rebuild_next {
                self.ask(host);
            }
            true
        } else if pending.since.elapsed() > VERDICT_TIMEOUT {
            eprintln!("dev: no word from the host about module {} after {VERDICT_TIMEOUT:?}", short(sha));
            true
        } else {
            false
        };
        if done {
            self.pending = None;
        }
        if rebuild_next {
            let requested = host.api.post_bytes(&format!("/projections/{}/rebuild", self.name), b"");
            match requested {
                Ok(_) => self.pending = Some(self.pending(sha, Awaited::Rebuild)),
                Err(err) => eprintln!("dev: cannot ask for a rebuild: {err:#}"),
            }
        }
    }

    /// Send `fixtures/query.json` to the module's `query` and print what
    /// it answers.
    fn ask(&self, host: &Host) {
        let Ok(request) = std::fs::read(self.query_file()) else { return };
        let answer = host.api.post_bytes(&format!("/projections/{}/query", self.name), &request);
        let request = compact(String::from_utf8_lossy(&request).trim());
        match answer {
            Ok(answer) => eprintln!("dev: query {request} → {answer}"),
            Err(err) => eprintln!("dev: query {request} → {err:#}"),
        }
    }
}

/// A module dev waits to see taken up.
struct Pending {
    sha256: String,
    awaited: Awaited,
    /// The projection's database when dev started waiting.
    database: PathBuf,
    /// It was faulted already: the host restarts it with a new module,
    /// so a fault is news only once that had time to happen.
    faulted_before: bool,
    /// The host said it is rebuilding the state with it.
    rebuilding: bool,
    since: Instant,
}

#[derive(Clone, Copy)]
enum Awaited {
    /// The host was started with it.
    Start,
    /// It was saved over the one running.
    Swap,
    /// It runs; dev asked for the state to be rebuilt with it.
    Rebuild,
}

/// The `projector run` child and its API.
struct Host {
    child: Child,
    url: String,
    api: Remote,
}

impl Host {
    /// Start `projector run` on `config_path` and wait until it serves.
    fn start(config_path: &Path, data: &Path, listen: &str) -> Result<Host> {
        let addr_file = data.join("listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let exe = std::env::current_exe().context("cannot find the projector binary")?;
        let mut command = Command::new(exe);
        command.arg("run").arg("--config").arg(config_path).args(["--listen", listen]);
        // A group of its own: Ctrl-C reaches dev, which stops the host
        // after saying so, rather than both at once.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().context("cannot start `projector run`")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let address = loop {
            if let Ok(address) = std::fs::read_to_string(&addr_file) {
                break address.trim().to_string();
            }
            if let Some(status) = child.try_wait()? {
                bail!("the host did not start ({status}); its log above says why");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the host did not listen within a minute");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let url = format!("http://{address}");
        Ok(Host { api: Remote::new(&url, None), url, child })
    }

    /// SIGTERM, then wait for the host to finish its batch in flight; a
    /// second Ctrl-C (or a minute) kills it.
    fn stop(mut self, events: &Receiver<DevEvent>) -> Result<()> {
        terminate(&self.child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the host stopped with {status}");
                }
                return Ok(());
            }
            let forced = matches!(events.try_recv(), Ok(DevEvent::Stop));
            if forced || Instant::now() > deadline {
                eprintln!("dev: killing the host");
                self.child.kill()?;
                self.child.wait()?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A host dev did not stop (dev is returning an error) is stopped here, so
/// none outlives dev.
impl Drop for Host {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        terminate(&self.child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(target_os = "linux")]
fn terminate(child: &Child) {
    use rustix::process::{Pid, Signal, kill_process};
    if let Err(err) = kill_process(Pid::from_child(child), Signal::TERM) {
        eprintln!("dev: cannot signal the host: {err}");
    }
}

#[cfg(not(target_os = "linux"))]
fn terminate(child: &Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
}

/// A module's sha256 as status lines show it.
fn short(sha256: &str) -> &str {
    &sha256[..sha256.len().min(12)]
}

/// JSON text on one line (as it was when it does not parse).
fn compact(text: &str) -> String {
    serde_json::from_str::<Value>(text).map(|v| v.to_string()).unwrap_or_else(|_| text.to_string())
}
