//! Hostile guests in a real `run`, each beside a well-behaved neighbour:
//! every limit broken on purpose is contained, handled by policy with a
//! clear reason, and the host and the neighbour carry on untouched.

use crate::util::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// A `run` with `hostile` (with extra config lines under its
/// `[[projection]]`) and `neighbour` (the event recorder) on stream `s`.
struct Scenario {
    ws: Workspace,
    host: Host,
}

impl Scenario {
    fn start(hostile_extra: &str) -> Scenario {
        let ws = Workspace::new();
        std::fs::write(
            ws.config(),
            format!(
                r#"version = 1

[[projection]]
name = "hostile"
module = {hostile:?}
streams = ["s"]
{hostile_extra}

[[projection]]
name = "neighbour"
module = {neighbour:?}
streams = ["s"]
"#,
                hostile = guest("hostile"),
                neighbour = guest("event_recorder"),
            ),
        )
        .unwrap();
        let host = ws.start();
        Scenario { ws, host }
    }

    /// Append `types` (one event each, `data` as given) around 5 plain
    /// events before and after; returns the head.
    fn append(&self, name: &str, events: &[(&str, Value)]) -> u64 {
        let mut lines: Vec<String> =
            (0..5).map(|i| cloud_event(&format!("{name}-before-{i}"), "plain", json!(i))).collect();
        for (i, (event_type, data)) in events.iter().enumerate() {
            lines.push(cloud_event(&format!("{name}-{i}"), event_type, data.clone()));
        }
        lines.extend((0..5).map(|i| cloud_event(&format!("{name}-after-{i}"), "plain", json!(i))));
        let file = self.ws.write_events(&format!("{name}.jsonl"), &lines);
        self.ws.append("s", &file);
        self.head()
    }

    fn head(&self) -> u64 {
        self.ws.status_of("neighbour")["head"].as_u64().unwrap()
    }

    fn wait_both_at(&self, head: u64) {
        self.ws.wait_caught_up(head, WAIT);
    }

    fn dead_letters(&self) -> Vec<Value> {
        json(&run_ok(&["dead-letters", "list", "--config", &self.ws.config_str(), "hostile"]))
            .as_array()
            .unwrap()
            .clone()
    }

    /// The host is alive, the neighbour handled every event exactly once,
    /// and the hostile projection recorded `hostile_handled` events.
    fn assert_contained(&mut self, head: u64, hostile_handled: u64) {
        assert!(self.host.is_running(), "the host died:\n{}", self.host.logs());
        let neighbour =
            self.ws.query("neighbour", "SELECT count(*) AS n, count(DISTINCT position) AS d FROM handled");
        assert_eq!(neighbour, json!([{"n": head, "d": head}]), "the neighbour handled every event once");
        let status = self.ws.status_of("neighbour");
        assert_eq!((status["state"].as_str(), status["dead_letters"].as_u64()), (Some("running"), Some(0)));
        let hostile = self.ws.query("hostile", "SELECT count(*) AS n FROM handled");
        assert_eq!(hostile, json!([{"n": hostile_handled}]), "the hostile projection's other events");
    }

    /// Exactly `count` dead letters, each refused by the SQL authorizer,
    /// the reason naming the statement and the rule.
    fn assert_all_denied(&self, count: usize) {
        let letters = self.dead_letters();
        assert_eq!(letters.len(), count, "{letters:?}");
        for letter in &letters {
            let reason = letter["reason"].as_str().unwrap();
            assert!(
                (reason.starts_with("sql: statement \"") && reason.contains("\" refused: "))
                    || reason.contains("prohibited"),
                "{}: {reason}",
                letter["id"]
            );
        }
    }

    /// Exactly one dead letter, for the trigger event, with a reason
    /// containing every one of `expected`.
    fn assert_parked_one(&self, name: &str, expected: &[&str]) {
        let letters = self.dead_letters();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0]["id"], format!("{name}-0"));
        let reason = letters[0]["reason"].as_str().unwrap();
        for part in expected {
            assert!(reason.contains(part), "reason {reason:?} should mention {part:?}");
        }
        assert_eq!(self.ws.status_of("hostile")["dead_letters"], 1);
    }
}

#[test]
fn an_infinite_loop_hits_the_call_deadline() {
    let mut s = Scenario::start("[projection.limits]\ncall_timeout_ms = 200");
    let head = s.append("loop", &[("h-loop", json!(null))]);
    s.wait_both_at(head);
    s.assert_parked_one("loop", &["deadline of 200 ms", "limits.call_timeout_ms"]);
    s.assert_contained(head, head - 1);
    // The deadline is spent twice: by the batch, then by the event alone
    // (its neighbours in the batch go one at a time, not by halves).
    let logs = s.host.logs();
    let deadlines =
        logs.lines().filter(|l| l.contains("ran past its deadline") && l.contains("fresh instance"));
    assert_eq!(deadlines.count(), 2, "{logs}");
}

#[test]
fn an_infinite_loop_runs_out_of_fuel_when_fuel_is_metered() {
    let mut s = Scenario::start("[projection.limits]\nfuel = 50_000_000");
    let head = s.append("fuel", &[("h-loop", json!(null))]);
    s.wait_both_at(head);
    s.assert_parked_one("fuel", &["ran out of fuel", "50000000", "limits.fuel"]);
    s.assert_contained(head, head - 1);
}

#[test]
fn a_memory_bomb_hits_the_memory_cap() {
    let mut s = Scenario::start("[projection.limits]\nmemory_mib = 16");
    let head = s.append("memory", &[("h-memory", json!(null))]);
    s.wait_both_at(head);
    s.assert_parked_one(
        "memory",
        &["linear memory would grow", "over the limit of 16 MiB", "limits.memory_mib"],
    );
    s.assert_contained(head, head - 1);
}

#[test]
fn unbounded_recursion_overflows_the_stack_and_is_contained() {
    let mut s = Scenario::start("");
    let head = s.append("recurse", &[("h-recurse", json!(null))]);
    s.wait_both_at(head);
    s.assert_parked_one("recurse", &["stack overflow"]);
    s.assert_contained(head, head - 1);
}

#[test]
fn a_panic_on_one_event_parks_that_event_only() {
    let mut s = Scenario::start("");
    let head = s.append("panic", &[("h-panic", json!(null))]);
    s.wait_both_at(head);
    s.assert_parked_one("panic", &["module trapped", "unreachable"]);
    s.assert_contained(head, head - 1);
}

#[test]
fn sql_that_attaches_another_projections_database_is_denied() {
    let mut s = Scenario::start("");
    // Let the neighbour create its database first.
    let head = s.append("warmup", &[]);
    s.wait_both_at(head);
    let neighbour_db = s.ws.data().join("projections/neighbour.db");
    let before = std::fs::read(&neighbour_db).unwrap();
    let attach = format!("ATTACH DATABASE '{}' AS other", neighbour_db.display());
    let head = s.append("attach", &[("h-sql", json!(attach))]);
    s.wait_both_at(head);
    s.assert_parked_one("attach", &["refused: a projection reaches only its own database"]);
    s.assert_contained(head, head - 1);
    let rows = s.ws.query("neighbour", "SELECT count(*) AS n FROM handled WHERE type = 'h-sql'");
    assert_eq!(rows, json!([{"n": 1}]), "the neighbour's own handling of the event, nothing more");
    assert_ne!(std::fs::read(&neighbour_db).unwrap().len(), 0, "{}", before.len());
}

#[test]
fn sql_cannot_forge_the_checkpoint_hide_dead_letters_or_end_the_transaction() {
    let mut s = Scenario::start("");
    let statements = [
        "UPDATE projector_checkpoints SET position = 0",
        "DELETE FROM projector_dead_letters",
        "SELECT * FROM projector_meta",
        "COMMIT",
        "PRAGMA journal_mode = DELETE",
        "SELECT load_extension('/tmp/evil.so')",
    ];
    let events: Vec<(&str, Value)> = statements.iter().map(|sql| ("h-sql", json!(sql))).collect();
    let head = s.append("forge", &events);
    s.wait_both_at(head);
    s.assert_all_denied(statements.len());
    let status = s.ws.status_of("hostile");
    assert_eq!(status["checkpoint"], head, "the checkpoint is the host's, not forged");
    s.assert_contained(head, head - statements.len() as u64);
}

#[test]
fn sql_cannot_read_the_runtimes_tables_or_detach() {
    let mut s = Scenario::start("");
    let events = [
        ("h-query", json!("SELECT * FROM projector_checkpoints")),
        ("h-query", json!("SELECT count(*) FROM main.projector_dead_letters")),
        ("h-sql", json!("DETACH DATABASE other")),
    ];
    let head = s.append("read", &events);
    s.wait_both_at(head);
    s.assert_all_denied(events.len());
    s.assert_contained(head, head - events.len() as u64);
}

#[test]
fn triggers_that_would_run_with_the_hosts_rights_are_denied() {
    let mut s = Scenario::start("");
    let hide = "CREATE TEMP TRIGGER hide AFTER INSERT ON main.projector_dead_letters \
                BEGIN DELETE FROM main.projector_dead_letters; END";
    let forge = "CREATE TRIGGER forge AFTER INSERT ON projector_kv \
                 BEGIN UPDATE projector_checkpoints SET position = 0; DELETE FROM projector_dead_letters; END";
    let shadow = "CREATE TEMP TABLE projector_dead_letters (x)";
    let own = "CREATE TRIGGER own AFTER INSERT ON handled BEGIN SELECT 1; END";
    let head = s.append(
        "trigger",
        &[
            ("h-sql", json!(hide)),
            ("h-sql", json!(forge)),
            ("h-sql", json!(shadow)),
            ("h-sql", json!(own)),
            // Parked, then state.set: each would have fired a trigger above.
            ("h-panic", json!(null)),
            ("h-unlock", json!(null)),
        ],
    );
    s.wait_both_at(head);
    let letters = s.dead_letters();
    let ids: Vec<&str> = letters.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["trigger-0", "trigger-1", "trigger-2", "trigger-4"], "{letters:?}");
    let rules = [
        "refused: temp triggers are not allowed to guests",
        "refused: a trigger on projector_kv would fire inside the host's own statements",
        "refused: a temp table or view named projector_dead_letters would take the place",
    ];
    for (letter, rule) in letters[..3].iter().zip(rules) {
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains(rule), "{}: {reason}", letter["id"]);
    }
    assert!(letters[3]["reason"].as_str().unwrap().contains("unreachable"));
    assert_eq!(s.ws.status_of("hostile")["checkpoint"], head, "the checkpoint is the host's");
    s.assert_contained(head, head - 4);

    // A later event still parks, and stays parked.
    let head = s.append("later", &[("h-panic", json!(null)), ("h-unlock", json!(null))]);
    s.wait_both_at(head);
    let ids: Vec<String> = s.dead_letters().iter().map(|l| l["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["trigger-0", "trigger-1", "trigger-2", "trigger-4", "later-0"]);
    s.assert_contained(head, head - 5);
}

/// SQL that never ends, run by an event of `event_type`, is stopped at the
/// call's deadline and its event parked.
fn sql_forever_hits_the_call_deadline(event_type: &str, name: &str) {
    let mut s = Scenario::start("[projection.limits]\ncall_timeout_ms = 200");
    let forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    let head = s.append(name, &[(event_type, json!(forever))]);
    s.wait_both_at(head);
    s.assert_parked_one(name, &["the call ran past its deadline of 200 ms (limits.call_timeout_ms)"]);
    s.assert_contained(head, head - 1);
}

#[test]
fn sql_that_runs_forever_hits_the_call_deadline() {
    sql_forever_hits_the_call_deadline("h-sql", "sqlloop");
}

#[test]
fn deferred_sql_that_runs_forever_hits_the_call_deadline() {
    sql_forever_hits_the_call_deadline("h-defer", "deferloop");
}

#[test]
fn a_deferred_write_is_refused_what_any_write_is_and_a_trap_after_one_undoes_it() {
    let mut s = Scenario::start("");
    let forge = "UPDATE projector_checkpoints SET position = 0";
    let ghost = "INSERT INTO handled (position, id, type) VALUES (-1, 'ghost', 'ghost')";
    let head = s.append("defer", &[("h-defer", json!(forge)), ("h-defer-then-panic", json!(ghost))]);
    s.wait_both_at(head);
    let letters = s.dead_letters();
    let reasons: Vec<(&str, &str)> =
        letters.iter().map(|l| (l["id"].as_str().unwrap(), l["reason"].as_str().unwrap())).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "defer-0");
    assert!(reasons[0].1.contains("projector_checkpoints"), "refused, naming the table: {reasons:?}");
    assert_eq!(reasons[1].0, "defer-1");
    assert!(reasons[1].1.contains("module trapped"), "{reasons:?}");
    let ghosts = s.ws.query("hostile", "SELECT count(*) AS n FROM handled WHERE id = 'ghost'");
    assert_eq!(ghosts, json!([{"n": 0}]), "the write deferred before the trap rolled back with it");
    s.assert_contained(head, head - 2);
}

#[test]
fn a_deferred_statement_runs_before_the_next_statement_is_prepared_or_run() {
    let mut s = Scenario::start("");
    // One batch: tables made by deferred statements, then written by
    // statements prepared after them, deferred or not, then read.
    let head = s.append(
        "ddl",
        &[
            (
                "h-defer-each",
                json!(["CREATE TABLE made_by_defer (x INTEGER)", "INSERT INTO made_by_defer (x) VALUES (7)"]),
            ),
            ("h-defer", json!("CREATE TABLE made_by_defer_too (x INTEGER)")),
            ("h-sql", json!("INSERT INTO made_by_defer_too (x) VALUES (8)")),
            ("h-query", json!("SELECT a.x, b.x FROM made_by_defer a, made_by_defer_too b")),
        ],
    );
    s.wait_both_at(head);
    assert_eq!(s.dead_letters(), Vec::<Value>::new(), "each statement saw what the ones before it made");
    let rows = s.ws.query("hostile", "SELECT a.x AS a, b.x AS b FROM made_by_defer a, made_by_defer_too b");
    assert_eq!(rows, json!([{"a": 7, "b": 8}]));
    s.assert_contained(head, head);
}

#[test]
fn sql_cannot_make_a_blob_past_the_length_limit() {
    let mut s = Scenario::start("");
    let head = s.append("blob", &[("h-query", json!("SELECT length(zeroblob(500000000))"))]);
    s.wait_both_at(head);
    s.assert_parked_one("blob", &["string or blob too big"]);
    s.assert_contained(head, head - 1);
}

#[test]
fn guest_log_lines_name_the_projection_event_and_correlation_id() {
    let mut s = Scenario::start("");
    let lines = [
        cloud_event_correlated("log-0", "plain", json!(0), "corr-plain"),
        cloud_event_correlated("log-1", "h-log", json!("a line from the guest"), "corr-7"),
    ];
    let file = s.ws.write_events("log.jsonl", &lines);
    s.ws.append("s", &file);
    let head = s.head();
    s.wait_both_at(head);
    s.assert_contained(head, head);
    let logs = s.host.logs();
    let line =
        logs.lines().find(|l| l.contains("a line from the guest")).expect("the guest's line is logged");
    for field in ["projection=\"hostile\"", "event_id=\"log-1\"", "correlation_id=\"corr-7\""] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

#[test]
fn a_log_flood_is_cut_and_counted_and_the_event_still_applies() {
    let mut s = Scenario::start("[projection.limits]\nlog_lines_per_second = 50\nlog_line_bytes = 200");
    let head = s.append("flood", &[("h-log-flood", json!(null))]);
    s.wait_both_at(head);
    assert!(s.dead_letters().is_empty());
    s.assert_contained(head, head);
    let logs = s.host.logs();
    let guest_lines: Vec<&str> = logs.lines().filter(|l| l.contains("flood flood")).collect();
    // A one-second burst, plus what the rate refills while the flood runs
    // (longer on a loaded machine): far fewer than were sent.
    assert!(
        guest_lines.len() <= 1000,
        "{} of 100000 guest lines got through the limit of 50/s",
        guest_lines.len()
    );
    assert!(guest_lines.iter().all(|l| l.len() < 1000), "lines are cut to log_line_bytes");
    assert!(guest_lines[0].contains("bytes cut, limits.log_line_bytes"), "{}", guest_lines[0]);
    let dropped: u64 = logs
        .split("dropped=")
        .skip(1)
        .map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        dropped + guest_lines.len() as u64,
        100_000,
        "every line is either logged or counted as dropped"
    );
    assert!(
        guest_lines[0].contains("event_id=\"flood-0\""),
        "guest lines carry the event id: {}",
        guest_lines[0]
    );
}

#[test]
fn a_retry_is_backed_off_shown_in_status_and_then_applied_once() {
    let mut s = Scenario::start("");
    let head = s.append("retry", &[("h-retry", json!(8))]);
    wait_until(WAIT, "the retry to show in status", || s.ws.status_of("hostile").get("retrying").is_some());
    let retrying = s.ws.status_of("hostile")["retrying"].clone();
    assert!(retrying["reason"].as_str().unwrap().starts_with("not yet: call"), "{retrying}");
    assert!(retrying["attempts"].as_u64().unwrap() >= 1);
    s.wait_both_at(head);
    assert!(s.dead_letters().is_empty());
    assert!(s.ws.status_of("hostile").get("retrying").is_none(), "cleared once applied");
    s.assert_contained(head, head);
    let once = s.ws.query("hostile", "SELECT count(*) AS n FROM handled WHERE type = 'h-retry'");
    assert_eq!(once, json!([{"n": 1}]));
    assert!(s.host.logs().matches("module asked to retry").count() >= 5);
}

#[test]
fn rejecting_every_third_event_parks_exactly_those() {
    let mut s = Scenario::start("");
    let events: Vec<(&str, Value)> = (0..30).map(|i| ("h-thirds", json!(i))).collect();
    let head = s.append("thirds", &events);
    s.wait_both_at(head);
    let parked: Vec<u64> = s.dead_letters().iter().map(|l| l["position"].as_u64().unwrap()).collect();
    let thirds: Vec<u64> = (6..=35).filter(|p| p % 3 == 0).collect();
    assert_eq!(parked, thirds);
    s.assert_contained(head, head - thirds.len() as u64);
}

#[test]
fn a_huge_value_is_refused_by_the_value_limit() {
    let mut s = Scenario::start("[projection.limits]\nvalue_kib = 512\nmemory_mib = 64");
    let head = s.append("huge", &[("h-huge", json!(4))]);
    s.wait_both_at(head);
    s.assert_parked_one("huge", &["over the limit of 524288 bytes", "limits.value_kib"]);
    s.assert_contained(head, head - 1);
    let kv = s.ws.query("hostile", "SELECT count(*) AS n FROM projector_kv");
    assert_eq!(kv, json!([{"n": 0}]));
}

#[test]
fn a_huge_key_is_refused_by_the_value_limit() {
    let mut s = Scenario::start("[projection.limits]\nvalue_kib = 512\nmemory_mib = 64");
    let head = s.append("hugekey", &[("h-huge-key", json!(1))]);
    s.wait_both_at(head);
    s.assert_parked_one("hugekey", &["over the limit of 524288 bytes", "limits.value_kib"]);
    s.assert_contained(head, head - 1);
    let kv = s.ws.query("hostile", "SELECT count(*) AS n FROM projector_kv");
    assert_eq!(kv, json!([{"n": 0}]));
}

#[test]
fn the_halt_policy_faults_the_projection_before_the_event() {
    let mut s = Scenario::start("on_failure = \"halt\"");
    let head = s.append("halt", &[("h-panic", json!(null))]);
    wait_until(WAIT, "the hostile projection to halt", || s.ws.status_of("hostile")["state"] == "faulted");
    wait_until(WAIT, "the neighbour to catch up", || s.ws.status_of("neighbour")["checkpoint"] == head);
    let status = s.ws.status_of("hostile");
    assert_eq!(status["checkpoint"], 5, "stopped just before the event at position 6");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("halted at event halt-0 (position 6)") && error.contains("unreachable"),
        "{error}"
    );
    assert!(s.dead_letters().is_empty());
    assert!(s.host.is_running());
}

#[test]
fn dead_letters_can_be_listed_retried_and_discarded_while_run_runs() {
    let mut s = Scenario::start("");
    let head = s.append(
        "dl",
        &[("h-needs-unlock", json!(null)), ("h-panic", json!(null)), ("h-needs-unlock", json!(null))],
    );
    s.wait_both_at(head);
    let letters = s.dead_letters();
    let ids: Vec<&str> = letters.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["dl-0", "dl-1", "dl-2"]);
    for letter in &letters {
        assert_eq!(letter["attempts"], 1);
        assert!(!letter["reason"].as_str().unwrap().is_empty());
        assert!(letter["type"].as_str().unwrap().starts_with("h-"));
    }
    let config = s.ws.config_str();

    // Still locked: the retry fails and keeps it, attempts + 1.
    let out = json(&run_ok(&["dead-letters", "retry", "--config", &config, "hostile", "dl-0"]));
    assert_eq!(out["resolved"], json!([]));
    assert_eq!(out["failed"][0]["id"], "dl-0");
    assert_eq!(s.dead_letters()[0]["attempts"], 2);

    // Unlock through the log, then retry everything: the locked ones pass.
    let head = s.append("unlock", &[("h-unlock", json!(null))]);
    s.wait_both_at(head);
    let out = json(&run_ok(&["dead-letters", "retry", "--config", &config, "hostile", "--all"]));
    assert_eq!(out["resolved"], json!(["dl-0", "dl-2"]));
    assert_eq!(out["failed"][0]["id"], "dl-1");
    let remaining = s.dead_letters();
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0]["attempts"], 2);
    let applied = s.ws.query("hostile", "SELECT id FROM handled WHERE type = 'h-needs-unlock' ORDER BY id");
    assert_eq!(applied, json!([{"id": "dl-0"}, {"id": "dl-2"}]));

    // Discarding names ids that exist, or changes nothing.
    let err = run_err(&["dead-letters", "discard", "--config", &config, "hostile", "dl-1", "nope"]);
    assert!(err.contains("no dead letter with id nope"), "{err}");
    assert_eq!(s.dead_letters().len(), 1);
    let out = json(&run_ok(&["dead-letters", "discard", "--config", &config, "hostile", "dl-1"]));
    assert_eq!(out, json!({"discarded": 1}));
    assert!(s.dead_letters().is_empty());
    assert!(s.host.is_running());
}
