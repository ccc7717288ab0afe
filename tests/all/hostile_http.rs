//! The HTTP API and the inputs as an attacker and a careless operator meet them: capped `/sql` answers, Host/Origin checks and the token, timeouts and the connection cap, size limits, reads during a rebuild's takeover, and errors that name the input, the place and the fix.

use crate::util::*;
use serde_json::{Value, json};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// A workspace running the event recorder on `wallets`, with `http` as its
/// config's `[http]` table.
fn recorder_with(ws: &Workspace, http: &str) {
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let mut text = std::fs::read_to_string(ws.config()).unwrap();
    text.push_str(&format!("\n[http]\n{http}\n"));
    std::fs::write(ws.config(), text).unwrap();
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// (status, body as JSON, or as a string when it is not JSON).
fn answer(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn post(url: &str, content_type: &str, body: &str) -> (u16, Value) {
    answer(agent().post(url).header("content-type", content_type).send(body).unwrap())
}

fn get(url: &str) -> (u16, Value) {
    answer(agent().get(url).call().unwrap())
}

fn sql(base: &str, statement: &str) -> (u16, Value) {
    post(
        &format!("{base}/projections/recorder/sql"),
        "application/json",
        &json!({ "sql": statement }).to_string(),
    )
}

/// `host:port` of a base URL.
fn address(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Ingest `n` events of type `t` to `wallets` and wait until processed.
fn ingest(ws: &Workspace, base: &str, n: usize) {
    let lines: Vec<String> = (0..n).map(|i| cloud_event(&format!("e{i}"), "t", json!(i))).collect();
    let (status, body) =
        post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &lines.join("\n"));
    assert_eq!(status, 200, "{body}");
    ws.wait_caught_up(n as u64, WAIT);
}

/// Read one HTTP/1.1 answer from `stream`: (status, headers, body as JSON
/// or a string).
fn read_answer(stream: &mut TcpStream) -> (u16, String, Value) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before an answer: {:?}", String::from_utf8_lossy(&bytes));
        bytes.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(bytes[..head_end].to_vec()).unwrap().to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
    while bytes.len() < head_end + length {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed inside an answer");
        bytes.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&bytes[head_end..head_end + length]).into_owned();
    (status, head, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Send `request` as written over a new connection; its answer.
fn raw(addr: &str, request: &str) -> (u16, String, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    read_answer(&mut stream)
}

/// Read from `stream` until the server closes it; the bytes read.
fn read_to_close(stream: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return total,
            Err(err) => panic!("the server did not close the connection: {err}"),
        }
    }
}

/// The host process's peak resident memory so far, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn error_of(answer: &Value) -> &str {
    answer["error"].as_str().unwrap_or_else(|| panic!("no JSON error: {answer}"))
}

#[test]
fn sql_answers_are_capped_in_rows_and_bytes_and_say_which_limit() {
    let ws = Workspace::new();
    recorder_with(&ws, "sql_max_rows = 100\nsql_max_bytes = 65536");
    let host = ws.start();
    let base = host.url();
    ingest(&ws, &base, 3);
    let numbers =
        |n: usize| format!("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r LIMIT {n}) ");

    let (status, rows) = sql(&base, &format!("{}SELECT n FROM r", numbers(100)));
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows.as_array().unwrap().len(), 100);

    let (status, answer) = sql(&base, &format!("{}SELECT n FROM r", numbers(101)));
    assert_eq!(status, 422, "{answer}");
    let error = error_of(&answer);
    assert!(error.contains("more than 100 rows") && error.contains("raise sql_max_rows"), "{error}");

    // 40 rows of 2000 hex characters: over 64 KiB of JSON.
    let (status, answer) = sql(&base, &format!("{}SELECT hex(randomblob(1000)) AS h FROM r", numbers(40)));
    assert_eq!(status, 422, "{answer}");
    let error = error_of(&answer);
    assert!(error.contains("over 65536 bytes of JSON") && error.contains("raise sql_max_bytes"), "{error}");

    // A value the answer could never hold is refused before it is made.
    let started = Instant::now();
    let (status, answer) = sql(&base, "SELECT randomblob(1000000000) AS b");
    assert_eq!(status, 422, "{answer}");
    assert!(error_of(&answer).contains("made a value over 65536 bytes"), "{answer}");
    eprintln!("randomblob(1e9) refused in {:?}", started.elapsed());
    // Two columns share the answer's bytes: each may make half.
    let (status, answer) = sql(&base, "SELECT randomblob(40000) AS a, 1 AS b");
    assert_eq!(status, 422, "{answer}");
    assert!(
        error_of(&answer).contains("over 32768 bytes") && error_of(&answer).contains("2 column(s)"),
        "{answer}"
    );

    // The connections those ran on serve the next reads, at full size.
    assert_eq!(sql(&base, "SELECT count(*) AS n FROM handled"), (200, json!([{"n": 3}])));
    assert_eq!(get(&format!("{base}/projections/recorder/state/count")), (200, json!(3)));
}

#[test]
fn sql_at_the_default_caps_keeps_the_host_small() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let host = ws.start();
    let base = host.url();
    ingest(&ws, &base, 1);
    let before = peak_rss_kib(host.pid());

    // What the issue saw: a 1 GB blob (a 1.33 GB answer, 2.6 GB RSS).
    let (status, answer) = sql(&base, "SELECT randomblob(1000000000) AS b");
    assert_eq!(status, 422, "{answer}");
    assert!(error_of(&answer).contains("over 16777216 bytes"), "{answer}");
    // At the cap: a 16 MiB blob is made, but its base64 is over 16 MiB.
    let (status, answer) = sql(&base, "SELECT randomblob(16777216) AS b");
    assert_eq!(status, 422, "{answer}");
    assert!(error_of(&answer).contains("over 16777216 bytes of JSON"), "{answer}");
    // The largest blob whose answer fits: 12 MB, 16 MB of base64.
    let (status, rows) = sql(&base, "SELECT randomblob(12000000) AS b");
    assert_eq!(status, 200);
    assert_eq!(rows[0]["b"].as_str().unwrap().len(), 16_000_000);

    let after = peak_rss_kib(host.pid());
    eprintln!("host peak RSS: {} MiB before the /sql requests, {} MiB after", before >> 10, after >> 10);
    assert!(after < 256 << 10, "peak RSS {} MiB", after >> 10);
}

#[test]
fn sql_refuses_empty_text_and_non_reads_before_touching_the_disk() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let host = ws.start();
    let base = host.url();
    ingest(&ws, &base, 2);
    let copy = ws.path("copy.db");
    let vacuum = format!("VACUUM INTO '{}'", copy.display());

    for empty in ["", "   ", "-- nothing here"] {
        let (status, answer) = sql(&base, empty);
        assert_eq!(status, 400, "{empty:?}: {answer}");
        assert!(error_of(&answer).starts_with("the SQL is empty"), "{answer}");
    }
    let (status, answer) = sql(&base, &vacuum);
    assert_eq!(status, 400, "{answer}");
    assert!(error_of(&answer).contains("is not a read"), "{answer}");
    assert!(!copy.exists(), "VACUUM INTO wrote {}", copy.display());

    // The CLI, reading the files, likewise.
    let query =
        |statement: &str| run_err(&["query", "--config", &ws.config_str(), "recorder", "--sql", statement]);
    let error = query(&vacuum);
    assert!(error.contains("is not a read"), "{error}");
    assert!(!copy.exists(), "VACUUM INTO wrote {}", copy.display());
    let error = query(&format!("ATTACH '{}' AS other", copy.display()));
    assert!(error.contains("is not a read"), "{error}");
    assert!(!copy.exists(), "ATTACH made {}", copy.display());
    let error = query("");
    assert!(error.contains("the SQL is empty"), "{error}");
    assert!(!error.contains("misuse"), "{error}");
}

#[test]
fn cross_site_and_rebinding_requests_are_refused() {
    let ws = Workspace::new();
    recorder_with(&ws, "hosts = [\"projector.internal\"]");
    let host = ws.start();
    let base = host.url();
    let addr = address(&base);
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    wait_until(WAIT, "the recorder to run", || ws.status_of("recorder")["state"] == "running");
    let pause = |host_header: &str, extra: &str| {
        raw(
            &addr,
            &format!(
                "POST /projections/recorder/pause HTTP/1.1\r\nHost: {host_header}\r\n{extra}Content-Length: \
                 0\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    let json = "Content-Type: application/json\r\n";

    // What a web page can send anywhere without asking: a plain-text POST.
    let (status, _, answer) = pause(&addr, "Content-Type: text/plain\r\n");
    assert_eq!(status, 415, "{answer}");
    assert!(error_of(&answer).contains("application/json"), "{answer}");
    // Another site's page, which the browser labels with its Origin.
    let (status, _, answer) = pause(&addr, &format!("{json}Origin: http://evil.example\r\n"));
    assert_eq!(status, 403, "{answer}");
    assert!(error_of(&answer).contains("cross-origin request refused"), "{answer}");
    let (status, _, answer) = pause(&addr, &format!("{json}Origin: null\r\n"));
    assert_eq!(status, 403, "{answer}");
    // DNS rebinding: the attacker's name, resolving to this machine.
    let (status, _, answer) = pause(&format!("evil.example:{port}"), json);
    assert_eq!(status, 403, "{answer}");
    assert!(error_of(&answer).contains("does not answer to Host \"evil.example"), "{answer}");
    let (status, _, answer) = raw(
        &addr,
        &format!("GET /projections HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 403, "reads too: {answer}");
    assert_eq!(ws.status_of("recorder")["state"], "running", "nothing was paused");

    // Its own names, and the configured one, with or without their Origin.
    let (status, _, answer) =
        pause(&format!("localhost:{port}"), &format!("{json}Origin: http://localhost:{port}\r\n"));
    assert_eq!((status, answer), (200, json!({"paused": true})));
    let (status, _, answer) = raw(
        &addr,
        &format!(
            "POST /projections/recorder/resume HTTP/1.1\r\nHost: projector.internal:{port}\r\n{json}\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!((status, answer), (200, json!({"paused": false})));
    let (status, _) = get(&format!("{base}/projections"));
    assert_eq!(status, 200);
}

#[test]
fn a_token_guards_changes_and_sql_and_the_cli_sends_it() {
    let ws = Workspace::new();
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(ws.path("api.token"), format!("{token}\n")).unwrap();
    recorder_with(&ws, "token_file = \"api.token\"");
    let host = ws.start();
    let base = host.url();
    wait_until(WAIT, "the recorder to run", || ws.status_of("recorder")["state"] == "running");
    let events = format!("{base}/streams/wallets/events");
    let with = |authorization: Option<&str>, url: &str, body: &str, content_type: &str| {
        let mut request = agent().post(url).header("content-type", content_type);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send(body).unwrap();
        let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
        let (status, answer) = answer(response);
        (status, answer, challenge)
    };
    let guarded = [
        (format!("{base}/projections/recorder/pause"), "".to_string(), "application/json"),
        (
            format!("{base}/projections/recorder/sql"),
            json!({"sql": "SELECT 1 AS x"}).to_string(),
            "application/json",
        ),
        (events.clone(), cloud_event("t1", "t", json!(1)), "application/cloudevents+json"),
        (format!("{base}/projections/recorder/rebuild"), "".to_string(), "application/json"),
        (
            format!("{base}/projections/recorder/dead-letters/retry"),
            r#"{"all": true}"#.to_string(),
            "application/json",
        ),
    ];
    for (url, body, content_type) in &guarded {
        let (status, answer, challenge) = with(None, url, body, content_type);
        assert_eq!(status, 401, "{url}: {answer}");
        assert!(error_of(&answer).contains("needs the API token"), "{answer}");
        assert_eq!(challenge.as_deref(), Some("Bearer"));
        let (status, answer, _) = with(Some("Bearer wrong-token-wrong-token"), url, body, content_type);
        assert_eq!(status, 401, "{url}: {answer}");
        assert!(error_of(&answer).contains("is wrong"), "{answer}");
    }
    assert_eq!(ws.status_of("recorder")["state"], "running");
    assert!(!ws.data().join("projections/recorder.rebuild").exists(), "no rebuild was asked for");
    assert_eq!(ws.status_of("recorder")["head"], 0, "nothing was ingested");

    // Reads stay open; with the token, changes go through.
    assert_eq!(get(&format!("{base}/projections")).0, 200);
    let bearer = format!("Bearer {token}");
    let (status, answer, _) =
        with(Some(&bearer), &events, &cloud_event("t1", "t", json!(1)), "application/cloudevents+json");
    assert_eq!((status, answer), (200, json!({"appended": 1, "duplicates": 0})));

    // The CLI sends the token its config names.
    let rows = json(&run_ok(&[
        "query",
        "--url",
        &base,
        "--config",
        &ws.config_str(),
        "recorder",
        "--sql",
        "SELECT 1 AS x",
    ]));
    assert_eq!(rows, json!([{"x": 1}]));
    let retried = json(&run_ok(&[
        "dead-letters",
        "retry",
        "--url",
        &base,
        "--config",
        &ws.config_str(),
        "recorder",
        "--all",
    ]));
    assert_eq!(retried, json!({"resolved": [], "failed": []}));
    let error = run_err(&[
        "query",
        "--url",
        &base,
        "--config",
        &ws.path("none.toml").to_string_lossy(),
        "recorder",
        "--sql",
        "SELECT 1",
    ]);
    assert!(error.contains("401") && error.contains("needs the API token"), "{error}");
    drop(host);

    // A token too short to be one stops `run` before it serves anything.
    std::fs::write(ws.path("api.token"), "secret\n").unwrap();
    let error = run_err(&["run", "--config", &ws.config_str(), "--listen", "127.0.0.1:0"]);
    assert!(error.contains("api.token") && error.contains("at least 16"), "{error}");
}

#[test]
fn a_slowloris_client_is_disconnected_after_the_header_timeout() {
    let ws = Workspace::new();
    recorder_with(&ws, "header_timeout_ms = 1000");
    let host = ws.start();
    let addr = address(&host.url());
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).unwrap();
    // A header byte every 100 ms, never the end of the head.
    let mut writer = stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..600 {
            if writer.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let started = Instant::now();
    read_to_close(&mut stream);
    let held = started.elapsed();
    eprintln!("the slowloris connection was closed after {held:?} (header timeout 1 s)");
    assert!(held < Duration::from_secs(30), "held for {held:?}");
    trickle.join().unwrap();
    assert_eq!(get(&format!("{}/healthz", host.url())).0, 200);
}

#[test]
fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    let ws = Workspace::new();
    recorder_with(&ws, "body_timeout_ms = 1000");
    let host = ws.start();
    let addr = address(&host.url());
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(
            format!(
                "POST /streams/wallets/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                 application/cloudevents+json\r\nContent-Length: 1000\r\n\r\n{{\"spec"
            )
            .as_bytes(),
        )
        .unwrap();
    let (status, _, answer) = read_answer(&mut stream);
    assert_eq!(status, 408, "{answer}");
    assert!(error_of(&answer).contains("did not arrive within 1000 ms"), "{answer}");
}

#[test]
fn connections_over_the_cap_wait_and_a_normal_request_is_served() {
    let ws = Workspace::new();
    recorder_with(&ws, "max_connections = 4\nheader_timeout_ms = 1000\nbody_timeout_ms = 120000");
    let host = ws.start();
    let base = host.url();
    let addr = address(&base);
    ingest(&ws, &base, 1);

    // Four requests whose bodies are slow to come hold every place.
    let body = r#"{"sql": "SELECT 1 AS n"}"#;
    let mut slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let head = format!(
                "POST /projections/recorder/sql HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                 application/json\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                &body[..1]
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect();
    // A fifth connection is accepted only once one of them is done.
    let mut fifth = TcpStream::connect(&addr).unwrap();
    fifth
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    fifth.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let mut buf = [0u8; 64];
    match fifth.read(&mut buf) {
        Err(err) if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("a connection over the cap was served: {other:?}"),
    }
    slow[0].write_all(&body.as_bytes()[1..]).unwrap();
    let (status, _, rows) = read_answer(&mut slow[0]);
    assert_eq!((status, rows), (200, json!([{"n": 1}])));
    drop(slow.remove(0));
    fifth.set_read_timeout(Some(WAIT)).unwrap();
    let (status, _, answer) = read_answer(&mut fifth);
    assert_eq!((status, answer), (200, json!({"status": "ok"})));
    drop(slow);

    // Idle connections that never send a head free their places after the
    // header timeout; a normal request behind them is then served.
    let idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let started = Instant::now();
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
    eprintln!("a request behind 5 idle connections (cap 4) was served after {:?}", started.elapsed());
    for mut stream in idle {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        read_to_close(&mut stream);
    }
    assert!(host.logs().contains("new ones wait until one closes"), "{}", host.logs());
}

#[test]
fn a_client_that_stops_reading_its_answer_is_cut_off_after_the_idle_timeout() {
    let ws = Workspace::new();
    recorder_with(&ws, "idle_timeout_ms = 1000");
    let host = ws.start();
    let base = host.url();
    let addr = address(&base);
    ingest(&ws, &base, 1);
    let body = json!({"sql": "SELECT randomblob(12000000) AS b"}).to_string();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .write_all(
            format!(
                "POST /projections/recorder/sql HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                 application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    // Reading nothing, the socket buffers fill and the answer stalls.
    wait_until(WAIT, "the host to close the stalled connection", || {
        host.logs().contains("closed an HTTP connection on which nothing moved")
    });
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let received = read_to_close(&mut stream);
    assert!(received < 16_000_000, "the whole answer came ({received} bytes)");
    assert_eq!(get(&format!("{base}/healthz")).0, 200);
}

#[test]
fn numeric_options_are_checked_against_their_ranges() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    // 2^54 KiB shifted into bytes wrapped to 0: every body refused.
    for bad in ["18014398509481984", "0", "-1"] {
        let mut child = projector()
            .args(["run", "--config", &ws.config_str(), "--listen", "127.0.0.1:0"])
            .arg(format!("--max-body-kib={bad}"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("--max-body-kib {bad} was accepted");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert!(stderr.contains("--max-body-kib") && stderr.contains("1..=1048576"), "{bad}: {stderr}");
    }
}

#[test]
fn long_attributes_are_refused_by_append_and_ingest_naming_line_and_attribute() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let long = "x".repeat(5_000_000);
    let lines = [cloud_event("ok", "t", json!(1)), cloud_event(&long, "t", json!(2))];
    let file = ws.write_events("big.jsonl", &lines);
    let error = run_err(&["append", "--data", &ws.data_str(), "wallets", &file]);
    assert!(
        error.contains("big.jsonl: line 2: attribute `id` is 5000000 bytes, over the limit of 1024 bytes"),
        "{error}"
    );
    assert!(error.len() < 2000, "the error does not repeat the value: {} bytes", error.len());

    let host = ws.start();
    let base = host.url();
    let events = format!("{base}/streams/wallets/events");
    let with = |attribute: &str| {
        let mut event = json!({"specversion": "1.0", "id": "h", "source": "s", "type": "t"});
        event[attribute] = json!(long);
        event.to_string()
    };
    let (status, answer) =
        post(&events, "application/cloudevents-batch+json", &format!("[{},{}]", lines[0], with("subject")));
    assert_eq!(status, 400, "{answer}");
    assert!(error_of(&answer).contains("event 2: attribute `subject` is 5000000 bytes"), "{answer}");
    let (status, answer) =
        post(&events, "application/x-ndjson", &format!("{}\n\n{}", lines[0], with("source")));
    assert_eq!(status, 400, "{answer}");
    assert!(error_of(&answer).contains("request body: line 3: attribute `source`"), "{answer}");
    let (status, answer) = post(&events, "application/cloudevents+json", &with("myextension"));
    assert_eq!(status, 400, "{answer}");
    assert!(error_of(&answer).contains("attribute `myextension`"), "{answer}");
    assert_eq!(ws.status_of("recorder")["head"], 0, "nothing was appended");
}

#[test]
fn input_that_is_not_utf8_is_located() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let mut bytes =
        (cloud_event("a", "t", json!(1)) + "\n" + &cloud_event("b", "t", json!(2)) + "\n").into_bytes();
    bytes.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":\"caf\xe9\"}\n");
    std::fs::write(ws.path("latin1.jsonl"), &bytes).unwrap();
    let error =
        run_err(&["append", "--data", &ws.data_str(), "wallets", &ws.path("latin1.jsonl").to_string_lossy()]);
    assert!(error.contains("latin1.jsonl: line 3: not UTF-8 (at byte 31 of the line)"), "{error}");
    assert!(error.contains("iconv"), "{error}");

    let host = ws.start();
    let response = agent()
        .post(&format!("{}/streams/wallets/events", host.url()))
        .header("content-type", "application/x-ndjson")
        .send(&bytes[..])
        .unwrap();
    let (status, answer) = answer(response);
    assert_eq!(status, 400, "{answer}");
    assert!(error_of(&answer).contains("request body: line 3: not UTF-8"), "{answer}");
}

#[test]
fn appending_to_a_read_only_data_folder_names_the_folder() {
    let ws = Workspace::new();
    let file = ws.write_events("events.jsonl", &[cloud_event("a", "t", json!(1))]);
    ws.append("wallets", &file);
    let data = ws.data();
    let other = ws.write_events("more.jsonl", &[cloud_event("b", "t", json!(2))]);
    let as_root = String::from_utf8(std::process::Command::new("id").arg("-u").output().unwrap().stdout)
        .unwrap()
        .trim()
        == "0";
    // Root writes anywhere: append as another user, who can read it all.
    let mut command = if as_root {
        for path in [ws.dir.path(), data.as_path()] {
            std::process::Command::new("chmod").args(["755", &path.to_string_lossy()]).status().unwrap();
        }
        let mut command = std::process::Command::new("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_projector")]);
        command
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
    };
    std::process::Command::new("chmod").args(["555", &data.to_string_lossy()]).status().unwrap();
    let output = command.args(["append", "--data", &ws.data_str(), "wallets", &other]).output().unwrap();
    std::process::Command::new("chmod").args(["755", &data.to_string_lossy()]).status().unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the append went through");
    assert!(
        error.contains(&format!("the data folder {} is read-only for this user", data.display())),
        "{error}"
    );
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    assert_eq!(ws.status_of("recorder")["head"], 1, "nothing was appended");
}

#[test]
fn a_damaged_database_is_named_with_what_to_do() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let file =
        ws.write_events("events.jsonl", &[cloud_event("a", "t", json!(1)), cloud_event("b", "t", json!(2))]);
    ws.append("wallets", &file);
    let host = ws.start();
    ws.wait_caught_up(2, WAIT);
    assert!(host.terminate().success());
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();

    // A projection's database: rebuilt from the log.
    let database = ws.database("recorder");
    std::fs::write(&database, &garbage).unwrap();
    let _ = std::fs::remove_file(format!("{}-wal", database.display()));
    let _ = std::fs::remove_file(format!("{}-shm", database.display()));
    // Status still answers, with the projection faulted and why.
    let status = ws.status_of("recorder");
    assert_eq!(status["state"], "faulted", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains(&format!("the projection database {} is damaged", database.display())), "{error}");
    assert!(error.contains("`projector rebuild recorder`"), "{error}");
    run_ok(&["rebuild", "--config", &ws.config_str(), "recorder"]);
    assert_eq!(ws.query("recorder", "SELECT count(*) AS n FROM handled"), json!([{"n": 2}]));

    // The log itself: the truth, which nothing can rebuild.
    let log = ws.data().join("events.db");
    std::fs::write(&log, &garbage).unwrap();
    let _ = std::fs::remove_file(ws.data().join("events.db-wal"));
    let _ = std::fs::remove_file(ws.data().join("events.db-shm"));
    for error in [
        run_err(&["append", "--data", &ws.data_str(), "wallets", &file]),
        run_err(&["status", "--config", &ws.config_str()]),
    ] {
        assert!(
            error.contains(&format!("the event log {} is damaged", log.display()))
                && error.contains("cannot be rebuilt: restore it from a backup"),
            "{error}"
        );
    }
}

#[test]
fn wrong_methods_long_targets_and_contradictions_get_json_errors() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let host = ws.start();
    let base = host.url();
    let addr = address(&base);
    let lines = [cloud_event("ok", "t", json!(1)), cloud_event("bad", "poison", json!(2))];
    post(&format!("{base}/streams/wallets/events"), "application/x-ndjson", &lines.join("\n"));
    ws.wait_caught_up(2, WAIT);

    let (status, headers, answer) = raw(
        &addr,
        &format!("GET /projections/recorder/pause HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 405, "{answer}");
    assert!(
        error_of(&answer).contains("/projections/recorder/pause does not take GET; it takes POST"),
        "{answer}"
    );
    assert!(headers.contains("allow: post"), "{headers}");

    let long = "k".repeat(10_000);
    let (status, answer) = get(&format!("{base}/projections/recorder/state/{long}"));
    assert_eq!(status, 414, "{answer}");
    assert!(error_of(&answer).contains("over the limit of 8192"), "{answer}");

    let retry = format!("{base}/projections/recorder/dead-letters/retry");
    let (status, answer) = post(&retry, "application/json", r#"{"all": true, "ids": ["ok"]}"#);
    assert_eq!(status, 400, "{answer}");
    assert!(error_of(&answer).contains("either \"ids\" or \"all\": true, not both"), "{answer}");
    let (_, letters) = get(&format!("{base}/projections/recorder/dead-letters"));
    assert_eq!(letters[0]["attempts"], 1, "nothing was retried: {letters}");
}

#[test]
fn reads_during_rebuild_takeovers_are_always_answered() {
    let ws = Workspace::new();
    ws.write_config(&[("recorder", &guest("event_recorder"), &["wallets"])]);
    let events: Vec<String> = (0..500).map(|i| cloud_event(&format!("r{i}"), "t", json!(i))).collect();
    let file = ws.write_events("events.jsonl", &events);
    ws.append("wallets", &file);
    let host = ws.start();
    let base = host.url();
    ws.wait_caught_up(500, WAIT);

    // Two readers of each kind: more at once than a pool holds right after
    // a takeover, so some open the database just as it changes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (base, stop) = (base.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut answered = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, answer) = match i % 4 {
                        0 => get(&format!("{base}/projections/recorder/state/count")),
                        1 => sql(&base, "SELECT count(*) AS n FROM handled"),
                        2 => post(&format!("{base}/projections/recorder/query"), "application/json", "{}"),
                        _ => get(&format!("{base}/projections/recorder")),
                    };
                    assert_eq!(status, 200, "reader {i} during a takeover: {answer}");
                    match i % 4 {
                        0 => assert_eq!(answer, json!(500), "reader {i}"),
                        1 => assert_eq!(answer, json!([{"n": 500}]), "reader {i}"),
                        2 => assert_eq!(answer, json!({"count": 500}), "reader {i}"),
                        _ => assert_eq!(answer["checkpoint"], 500, "reader {i}: {answer}"),
                    }
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let takeovers = 12;
    for generation in 1..=takeovers {
        let (status, answer) = post(&format!("{base}/projections/recorder/rebuild"), "application/json", "");
        assert_eq!(status, 202, "{answer}");
        wait_until(WAIT, "the rebuild to take over", || {
            ws.database("recorder").ends_with(format!("recorder.{generation}.db"))
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered: Vec<u64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    eprintln!("answers per reader over {takeovers} takeovers: {answered:?}");
    assert!(Path::new(&ws.database("recorder")).exists());
}
