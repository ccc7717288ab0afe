//! Helpers for the end-to-end tests: the real `projector` binary, the real
//! guests built by `scripts/build-guests`, and a temp dir per test.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A guest module built from source by `scripts/build-guests`.
pub fn guest(crate_name: &str) -> PathBuf {
    let path = root().join("target/projections").join(format!("{crate_name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-guests (scripts/test does) before the tests",
        path.display()
    );
    path
}

/// The `projector` binary under test.
pub fn projector() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
    command.env("PROJECTOR_LOG", "info");
    command
}

/// Run `projector args…`, expecting success; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let output = projector().args(args).output().unwrap();
    assert!(
        output.status.success(),
        "projector {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Run `projector args…`, expecting failure; returns stderr.
pub fn run_err(args: &[&str]) -> String {
    let output = projector().args(args).output().unwrap();
    assert!(
        !output.status.success(),
        "projector {args:?} should have failed; stdout:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).unwrap()
}

/// `projector publish` to `stream` of source `source` of a file of three
/// events whose second has no `type`: refused, naming the file and line.
/// The caller checks that nothing of it was published.
pub fn publish_a_file_with_a_bad_line(ws: &Workspace, source: &str, stream: &str) {
    let mut bad = wallet_events(3, 20, "bad");
    bad[1] = r#"{"specversion":"1.0","id":"x","source":"s"}"#.to_string();
    let bad = ws.write_events("bad.jsonl", &bad);
    let err = run_err(&["publish", "--config", &ws.config_str(), "--source", source, stream, &bad]);
    assert!(err.contains("bad.jsonl: line 2: missing required attribute `type`"), "{err}");
}

/// Run `projector args…` with `input` on stdin.
pub fn run_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = projector()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Parse stdout as JSON.
pub fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|err| panic!("not JSON ({err}):\n{stdout}"))
}

/// One CloudEvent as a JSON line.
pub fn cloud_event(id: &str, event_type: &str, data: Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "tests", "type": event_type, "data": data}).to_string()
}

/// One CloudEvent as a JSON line, carrying the `correlationid` extension.
pub fn cloud_event_correlated(id: &str, event_type: &str, data: Value, correlation_id: &str) -> String {
    json!({
        "specversion": "1.0", "id": id, "source": "tests", "type": event_type, "data": data,
        "correlationid": correlation_id,
    })
    .to_string()
}

/// A deterministic stream of wallet events: `n` events over `users` users,
/// mostly wallet changes with KYC verifications mixed in.
pub fn wallet_events(n: usize, users: usize, id_prefix: &str) -> Vec<String> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let user = format!("user-{}", (state >> 24) % users as u64);
            let id = format!("{id_prefix}-{i}");
            if state.is_multiple_of(5) {
                cloud_event(&id, "kyc_verified", json!({"user_id": user, "kyc_verified_at": format!("t{i}")}))
            } else {
                cloud_event(
                    &id,
                    "wallet_updated",
                    json!({"user_id": user, "wallet_address": format!("0x{:x}", state >> 16), "created_at": format!("t{i}")}),
                )
            }
        })
        .collect()
}

/// A temp dir holding a config, its data folder and event files.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace { dir: tempfile::tempdir().unwrap() }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn data(&self) -> PathBuf {
        self.path("data")
    }
    pub fn config(&self) -> PathBuf {
        self.path("projector.toml")
    }
    pub fn config_str(&self) -> String {
        self.config().to_string_lossy().into_owned()
    }
    pub fn data_str(&self) -> String {
        self.data().to_string_lossy().into_owned()
    }
    /// Write `projector.toml` listing `projections` as (name, module, streams).
    pub fn write_config(&self, projections: &[(&str, &Path, &[&str])]) {
        let mut text = String::from("version = 1\ndata = \"data\"\n");
        for (name, module, streams) in projections {
            let streams: Vec<String> = streams.iter().map(|s| format!("{s:?}")).collect();
            text.push_str(&format!(
                "\n[[projection]]\nname = {name:?}\nmodule = {:?}\nstreams = [{}]\n",
                module.to_string_lossy(),
                streams.join(", ")
            ));
        }
        std::fs::write(self.config(), text).unwrap();
    }
    /// Write `lines` to a file in the workspace; returns its path.
    pub fn write_events(&self, name: &str, lines: &[String]) -> String {
        let path = self.path(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path.to_string_lossy().into_owned()
    }
    /// `projector append` to `stream`; returns (appended, duplicates).
    pub fn append(&self, stream: &str, file: &str) -> (u64, u64) {
        let out = json(&run_ok(&["append", "--data", &self.data_str(), stream, file]));
        (out["appended"].as_u64().unwrap(), out["duplicates"].as_u64().unwrap())
    }
    /// `projector status`, parsed.
    pub fn status(&self) -> Vec<Value> {
        json(&run_ok(&["status", "--config", &self.config_str()])).as_array().unwrap().clone()
    }
    /// The status entry of projection `name`.
    pub fn status_of(&self, name: &str) -> Value {
        self.status().into_iter().find(|s| s["name"] == name).unwrap()
    }
    /// `projector events` of `stream`: its events as CloudEvents JSON.
    pub fn events(&self, stream: &str) -> Vec<Value> {
        run_ok(&["events", "--data", &self.data_str(), stream]).lines().map(json).collect()
    }
    /// `projector query`, parsed.
    pub fn query(&self, projection: &str, sql: &str) -> Value {
        json(&run_ok(&["query", "--config", &self.config_str(), projection, "--sql", sql]))
    }
    /// Start `projector run` on this workspace's config, its HTTP API on a
    /// free loopback port.
    pub fn start(&self) -> Host {
        self.start_with(&[])
    }
    /// [`Workspace::start`] with extra arguments for `run`.
    pub fn start_with(&self, extra: &[&str]) -> Host {
        let _ = std::fs::remove_file(self.data().join("listen.addr"));
        let log = std::fs::File::create(self.path("run.log")).unwrap();
        let child = projector()
            .args(["run", "--config", &self.config_str(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Host { child: Some(child), log: self.path("run.log"), addr_file: self.data().join("listen.addr") }
    }
    /// Projection `name`'s current database file (after a rebuild, the
    /// generation its pointer file names).
    pub fn database(&self, name: &str) -> PathBuf {
        let dir = self.data().join("projections");
        match std::fs::read_to_string(dir.join(format!("{name}.current"))) {
            Ok(file) if !file.trim().is_empty() => dir.join(file.trim()),
            _ => dir.join(format!("{name}.db")),
        }
    }
    /// Projection `name`'s checkpoint in the embedded log, read from its
    /// database file (0 before it has one): what a test watches to kill a
    /// host mid-stream.
    pub fn checkpoint(&self, name: &str) -> u64 {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
        let Ok(db) = rusqlite::Connection::open_with_flags(self.database(name), flags) else {
            return 0;
        };
        db.query_row("SELECT position FROM projector_checkpoints WHERE source = 'log'", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap_or(0) as u64
    }
    /// Wait until every projection's lag is 0 and its checkpoint is `head`.
    pub fn wait_caught_up(&self, head: u64, timeout: Duration) {
        let mut last = Vec::new();
        let caught_up = wait_for(timeout, || {
            last = self.status();
            last.iter().all(|s| s["checkpoint"] == head && s["lag"] == 0)
        });
        assert!(
            caught_up,
            "timed out after {timeout:?} waiting for every projection at position {head}; last status: {last:?}"
        );
    }
}

/// A running `projector run`, killed when dropped.
pub struct Host {
    child: Option<Child>,
    pub log: PathBuf,
    addr_file: PathBuf,
}

impl Host {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    /// SIGKILL once `reached` holds, checked every millisecond so the kill
    /// follows closely. A test that must kill mid-stream gives it a
    /// backlog to land in: events published while no host ran, not events
    /// a running host may have kept up with as they came.
    pub fn kill_when(self, what: &str, mut reached: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !reached() {
            assert!(Instant::now() < deadline, "timed out waiting for {what} before a kill");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.kill();
    }
    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        child.wait().unwrap()
    }
    /// SIGINT (what Ctrl-C sends), then wait for a clean exit; returns the
    /// exit status.
    pub fn interrupt(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        child.wait().unwrap()
    }
    /// The base URL of the host's HTTP API, once it listens.
    pub fn url(&self) -> String {
        wait_until(Duration::from_secs(30), "the HTTP API to listen", || self.addr_file.exists());
        format!("http://{}", std::fs::read_to_string(&self.addr_file).unwrap().trim())
    }
    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A test that failed with the host up shows what the host said.
        if std::thread::panicking() {
            let logs = self.logs();
            let mut start = logs.len().saturating_sub(8_000);
            while !logs.is_char_boundary(start) {
                start += 1;
            }
            let tail = &logs[start..];
            eprintln!(
                "--- the host's log ({}), its end:\n{tail}--- end of the host's log",
                self.log.display()
            );
        }
    }
}

/// Poll `condition` every 20 ms until it holds; panic after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    assert!(wait_for(timeout, condition), "timed out after {timeout:?} waiting for {what}");
}

/// Poll `condition` every 20 ms until it holds (true) or `timeout` passes
/// (false).
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Parse the Prometheus/OpenMetrics text format into sample → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line == "# EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(name.to_string(), value);
    }
    samples
}

/// `GET <base>/metrics` of a running host, parsed.
pub fn metrics(base: &str) -> HashMap<String, f64> {
    let text = ureq::get(format!("{base}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    parse_metrics(&text)
}

/// A free TCP port on loopback (free when asked: bind to it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real `nats-server -js` on loopback, its store in a temp dir; stopped
/// when dropped.
pub struct NatsServer {
    child: Option<Child>,
    /// The client port.
    pub port: u16,
    /// The monitoring port (`/healthz` says when JetStream is ready).
    monitor: u16,
    store: tempfile::TempDir,
    /// Cluster flags, for a node of a [`NatsCluster`].
    extra: Vec<String>,
    log: PathBuf,
}

impl NatsServer {
    /// A single server with JetStream, ready to take requests.
    pub fn start() -> Self {
        let server = Self::spawn(Vec::new());
        server.wait_ready();
        server
    }

    fn spawn(extra: Vec<String>) -> Self {
        let store = tempfile::tempdir().unwrap();
        let log = store.path().join("nats.log");
        let mut server =
            NatsServer { child: None, port: free_port(), monitor: free_port(), store, extra, log };
        server.launch();
        server
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let binary = std::env::var("PROJECTOR_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-m", &self.monitor.to_string()])
            .arg("-sd")
            .arg(self.store.path().join("jetstream"))
            .args(&self.extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {binary} ({err}): install it (apt-get install nats-server; scripts/test does)")
            });
        self.child = Some(child);
    }

    /// Wait until the server answers and JetStream is ready.
    pub fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/healthz", self.monitor);
        wait_until(
            Duration::from_secs(30),
            &format!("nats-server on port {} to be ready", self.port),
            || ureq::get(&url).call().is_ok_and(|response| response.status() == 200),
        );
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Start it again on the same port and store, and wait until ready.
    pub fn restart(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three `nats-server -js` nodes on loopback routed into one cluster, each
/// with its own store.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// A 3-node cluster whose JetStream is ready (a meta leader elected).
    pub fn start() -> Self {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes: Vec<NatsServer> = (0..3)
            .map(|i| {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
                    .collect();
                NatsServer::spawn(vec![
                    "--server_name".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "projector-tests".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", routes[i]),
                    "--routes".into(),
                    others.join(","),
                ])
            })
            .collect();
        for node in &nodes {
            node.wait_ready();
        }
        NatsCluster { nodes }
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The node called `name` (`n0`, `n1`, `n2`).
    pub fn node(&mut self, name: &str) -> &mut NatsServer {
        let i: usize = name.strip_prefix('n').and_then(|i| i.parse().ok()).expect("a node name");
        &mut self.nodes[i]
    }
}

/// The folder of Apache Kafka's jars: `PROJECTOR_KAFKA_LIBS`, or what
/// `scripts/kafka-jars` fetches (once; cached under target/).
pub fn kafka_libs() -> PathBuf {
    static LIBS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIBS.get_or_init(|| {
        if let Ok(libs) = std::env::var("PROJECTOR_KAFKA_LIBS") {
            return PathBuf::from(libs);
        }
        let output =
            Command::new(root().join("scripts/kafka-jars")).stderr(Stdio::inherit()).output().unwrap();
        assert!(output.status.success(), "scripts/kafka-jars failed: the Kafka tests need Java 17 and Maven");
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
    .clone()
}

/// A real Apache Kafka broker (KRaft, broker and controller in one JVM)
/// on loopback, its log dirs in a temp dir; stopped when dropped, and by
/// a watchdog when the test process dies first.
pub struct KafkaBroker {
    /// The client port.
    pub port: u16,
    /// The node id (1 for a single broker).
    pub node: i32,
    dir: tempfile::TempDir,
    heap: &'static str,
    java: Option<u32>,
    wrapper: Option<Child>,
}

/// Run `kafka.tools.StorageTool` with `args`; its output.
fn storage_tool(args: &[&str]) -> String {
    let libs = format!("{}/*", kafka_libs().display());
    let output = Command::new("java").args(["-cp", &libs, "kafka.tools.StorageTool"]).args(args).output();
    let output = output.expect("cannot run java: install Java 17 (scripts/kafka-jars does)");
    assert!(output.status.success(), "StorageTool {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

impl KafkaBroker {
    /// A single node, formatted and ready to take requests.
    pub fn start() -> Self {
        let (port, controller) = (free_port(), free_port());
        let cluster = storage_tool(&["random-uuid"]).trim().to_string();
        let voters = format!("1@127.0.0.1:{controller}");
        let mut broker = Self::format(1, port, controller, &voters, &cluster, 1, "512m");
        broker.restart();
        broker
    }

    /// A node of cluster `cluster` whose controller quorum is `voters`,
    /// its log dir formatted, not started. `replicas` is the replication
    /// factor of the internal topics (and the default of new topics).
    fn format(
        node: i32,
        port: u16,
        controller: u16,
        voters: &str,
        cluster: &str,
        replicas: usize,
        heap: &'static str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let min_isr = replicas.min(2);
        // A cluster fences a dead broker after a few seconds rather than
        // the default nine: a test waits for the new partition leaders.
        let properties = format!(
            "process.roles=broker,controller\nnode.id={node}\n\
             controller.quorum.voters={voters}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\nlog.dirs={}\nnum.partitions=1\n\
             default.replication.factor={replicas}\nmin.insync.replicas={min_isr}\n\
             offsets.topic.replication.factor={replicas}\noffsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor={replicas}\ntransaction.state.log.min.isr={min_isr}\n\
             share.coordinator.state.topic.replication.factor={replicas}\n\
             share.coordinator.state.topic.min.isr={min_isr}\n\
             broker.session.timeout.ms=3000\nbroker.heartbeat.interval.ms=500\n\
             group.initial.rebalance.delay.ms=0\nauto.create.topics.enable=false\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("server.properties"), properties).unwrap();
        std::fs::write(
            dir.path().join("log4j2.properties"),
            "rootLogger.level=WARN\nrootLogger.appenderRef.out.ref=out\nappender.out.type=Console\n\
             appender.out.name=out\nappender.out.layout.type=PatternLayout\n\
             appender.out.layout.pattern=%d %p %c: %m%n\n",
        )
        .unwrap();
        let config = dir.path().join("server.properties").to_string_lossy().into_owned();
        storage_tool(&["format", "-t", cluster, "-c", &config, "--ignore-formatted"]);
        KafkaBroker { port, node, dir, heap, java: None, wrapper: None }
    }

    /// Start the JVM, without waiting for it to take requests.
    fn launch(&mut self) {
        assert!(self.java.is_none(), "the broker is running");
        let dir = self.dir.path();
        let pid_file = dir.join("java.pid");
        let _ = std::fs::remove_file(&pid_file);
        // The JVM in the background of a shell that kills it once the test
        // process is gone: a broker never outlives its tests. It stands in
        // for a broker on another machine, so it runs at the hosts' bulk
        // priority: JVMs at full priority would starve the processing of
        // every host the tests run beside them.
        let script = format!(
            "nice -n 10 java -Xmx{heap} -Xms64m -XX:+UseSerialGC -Dlog4j2.configurationFile={dir}/log4j2.properties \
             -cp '{libs}/*' kafka.Kafka {dir}/server.properties >>{dir}/broker.log 2>&1 &\n\
             java=$!; echo $java > {dir}/java.pid\n\
             while kill -0 {test} 2>/dev/null && kill -0 $java 2>/dev/null; do sleep 0.5; done\n\
             kill -9 $java 2>/dev/null; wait",
            heap = self.heap,
            dir = dir.display(),
            libs = kafka_libs().display(),
            test = std::process::id(),
        );
        let wrapper = Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.wrapper = Some(wrapper);
        wait_until(Duration::from_secs(10), "the broker's JVM to start", || {
            std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()).is_some()
        });
        self.java = std::fs::read_to_string(&pid_file).unwrap().trim().parse().ok();
    }

    /// Wait until the broker answers a metadata request.
    pub fn wait_ready(&self) {
        wait_for_brokers(&self.servers(), 1, || self.logs());
    }

    /// `127.0.0.1:<port>`.
    pub fn servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether its JVM is running.
    pub fn is_running(&self) -> bool {
        self.java.is_some()
    }

    /// SIGKILL the JVM.
    pub fn kill(&mut self) {
        let pid = self.java.take().expect("the broker is running");
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        if let Some(mut wrapper) = self.wrapper.take() {
            let _ = wrapper.wait();
        }
    }

    /// Start it (again) on the same ports and data, and wait until ready.
    pub fn restart(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// An admin client of it.
    pub fn admin(&self) -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
        rdkafka::ClientConfig::new().set("bootstrap.servers", self.servers()).create().unwrap()
    }

    /// Create `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        create_topic(&self.servers(), topic, partitions, 1);
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if self.java.is_some() {
            self.kill();
        }
    }
}

/// Wait until the cluster at `servers` answers a metadata request naming
/// `brokers` brokers; `logs` says why not.
fn wait_for_brokers(servers: &str, brokers: usize, logs: impl Fn() -> String) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", servers).create().unwrap();
    let started = Instant::now();
    while consumer
        .fetch_metadata(None, Duration::from_secs(1))
        .map(|m| m.brokers().len() < brokers)
        .unwrap_or(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "Kafka at {servers} did not start with {brokers} broker(s):\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Create `topic` on the cluster at `servers`, with `partitions` partitions
/// each on `replicas` brokers (at least two of them in sync to accept a
/// write, when there are more than one).
fn create_topic(servers: &str, topic: &str, partitions: i32, replicas: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", servers).create().unwrap();
    let min_isr = replicas.min(2).to_string();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replicas))
        .set("min.insync.replicas", &min_isr);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = block_on_future(admin.create_topics([&new], &options)).unwrap();
    for result in results {
        result.unwrap_or_else(|(topic, err)| panic!("cannot create topic {topic}: {err}"));
    }
}

/// Three Kafka brokers on loopback, each also a voter of the KRaft
/// controller quorum (so the cluster lives on with any one killed), in
/// three JVMs with their own log dirs; stopped when dropped.
pub struct KafkaCluster {
    pub nodes: Vec<KafkaBroker>,
}

impl KafkaCluster {
    /// Three nodes of one cluster id, formatted, started together (a node
    /// alone has no quorum) and ready: every broker registered.
    pub fn start() -> Self {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let voters: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1)).collect();
        let voters = voters.join(",");
        let cluster = storage_tool(&["random-uuid"]).trim().to_string();
        let mut nodes: Vec<KafkaBroker> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, controller))| {
                KafkaBroker::format(i as i32 + 1, *port, *controller, &voters, &cluster, 3, "384m")
            })
            .collect();
        for node in &mut nodes {
            node.launch();
        }
        let cluster = KafkaCluster { nodes };
        wait_for_brokers(&cluster.servers().join(","), 3, || cluster.logs());
        cluster
    }

    /// Every broker's `127.0.0.1:<port>`.
    pub fn servers(&self) -> Vec<String> {
        self.nodes.iter().map(KafkaBroker::servers).collect()
    }

    /// The broker whose node id is `id`.
    pub fn node(&mut self, id: i32) -> &mut KafkaBroker {
        self.nodes.iter_mut().find(|node| node.node == id).expect("a node id of the cluster")
    }

    /// Create `topic` with `partitions` partitions, each replicated to all
    /// three brokers, two of them in sync to accept a write.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        create_topic(&self.servers().join(","), topic, partitions, 3);
    }

    /// The node id leading `partition` of `topic`, as the running brokers
    /// see it.
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let servers: Vec<String> =
            self.nodes.iter().filter(|node| node.is_running()).map(KafkaBroker::servers).collect();
        let consumer: BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", servers.join(",")).create().unwrap();
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let found = metadata.topics()[0].partitions().iter().find(|p| p.id() == partition);
        found.expect("the partition").leader()
    }

    /// Every node's log so far.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(|node| format!("--- node {}\n{}", node.node, node.logs())).collect()
    }
}

/// Run a future to completion on a fresh single-threaded runtime.
pub fn block_on_future<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// A real `redis-server` on loopback, its files (an append-only file, so a
/// restart keeps every entry) in a temp dir; stopped when dropped.
pub struct RedisServer {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl RedisServer {
    /// A server ready to take commands.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("redis.log");
        let mut server = RedisServer { child: None, port: free_port(), dir, log };
        server.restart();
        server
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let binary = std::env::var("PROJECTOR_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .args(["--appendonly", "yes", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {binary} ({err}): install it (apt-get install redis-server; scripts/test does)")
            });
        self.child = Some(child);
    }

    /// Start it (again) on the same port and files, and wait until it
    /// answers.
    pub fn restart(&mut self) {
        self.launch();
        let url = self.url();
        wait_until(
            Duration::from_secs(30),
            &format!("redis-server on port {} to be ready", self.port),
            || {
                redis::Client::open(url.as_str())
                    .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(1)))
                    .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection))
                    .is_ok()
            },
        );
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection, for what a test does besides the source.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }

    /// SIGKILL: no chance to say goodbye (what was acknowledged is in the
    /// append-only file already).
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the server is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The events order-fees emits over its scenario fixture
/// (`projections/order-fees/fixtures/expected.json`, `emitted`).
pub fn order_fees_emitted() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("projections/order-fees/fixtures/expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    expected["emitted"].as_array().unwrap().clone()
}

/// Order `ord-4` captured then approved: one more charge for order-fees.
pub fn order_4_captured_and_approved() -> [String; 2] {
    [
        cloud_event("cap-ord-4", "order_captured", json!({"order_id": "ord-4", "fee": 7, "discount": 0})),
        cloud_event_correlated("app-ord-4", "order_approved", json!({"order_id": "ord-4"}), "checkout-4"),
    ]
}

/// A published charge (a structured CloudEvent) carries what `want`, an
/// entry of [`order_fees_emitted`], says: type, source, subject, data and
/// its cause.
pub fn assert_charge_is(event: &Value, want: &Value) {
    assert_eq!(
        (&event["type"], &event["source"], &event["subject"], &event["data"]),
        (&want["type"], &want["source"], &want["subject"], &want["data"])
    );
    assert_eq!(
        (&event["correlationid"], &event["causationid"]),
        (&want["correlation_id"], &want["causation_id"])
    );
}

/// Wait until `/metrics` at `base` counts `n` events `projection` published
/// (the counter moves just after the outbox is cleared).
pub fn wait_published_counted(base: &str, projection: &str, n: u64) {
    let sample = format!(r#"projector_events_published_total{{projection="{projection}"}}"#);
    wait_until(Duration::from_secs(10), &format!("{n} events counted published"), || {
        metrics(base).get(&sample) == Some(&(n as f64))
    });
}

/// Wait until `next_batch` says `source` is unavailable; returns why.
pub fn wait_unavailable(
    source: &mut dyn projector::sources::Source,
    after: &projector::sources::Checkpoint,
) -> String {
    use projector::sources::SourceError;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "the source never said it was unavailable");
        match source.next_batch(after, 100, Duration::from_millis(100)) {
            Err(SourceError::Unavailable(reason)) => return reason,
            Ok(batch) => assert!(batch.is_idle(after), "nothing new to read meanwhile"),
            Err(SourceError::Failed(err)) => panic!("the source failed: {err:#}"),
        }
    }
}
