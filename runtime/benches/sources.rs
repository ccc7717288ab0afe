//! Where the events come from, side by side in one run: wallet-allowlist
//! rebuilt (`projector rebuild`, the whole process) from the embedded log,
//! from a NATS JetStream stream, from a 3-partition Kafka topic and from a
//! Redis stream key holding the same events, on a real `nats-server -js`, a
//! real Apache Kafka broker and a real `redis-server`, each on a free
//! loopback port.
//!
//! `cargo bench -p projector --bench sources` (after scripts/build-guests,
//! with `nats-server`, `redis-server`, Java and Maven installed —
//! `scripts/test` installs them);
//! `BENCH_EVENTS` sets the event count (default 200000), `BENCH_RUNS` the
//! rounds (default 5, each source once a round, best kept).

#[path = "../../tests/all/util.rs"]
mod util;

use std::time::Instant;
use util::*;

/// `projector rebuild` of `name`, the whole process; events/s.
fn rebuild(ws: &Workspace, name: &str, n: usize) -> f64 {
    let start = Instant::now();
    run_ok(&["rebuild", "--config", &ws.config_str(), name]);
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let status = ws.status_of(name);
    assert_eq!(status["dead_letters"], 0, "{status}");
    rate
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let module = guest("wallet_allowlist");
    let lines = wallet_events(n, 5_000, "sources");

    let embedded = Workspace::new();
    embedded.write_config(&[("wallet-allowlist", &module, &["wallets"])]);
    let file = embedded.write_events("events.jsonl", &lines);
    embedded.append("wallets", &file);

    let server = NatsServer::start();
    let nats = Workspace::new();
    std::fs::write(
        nats.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.bus]\nnats = {:?}\nstream = \"WALLETS\"\n\n\
             [[projection]]\nname = \"wallet-allowlist\"\nmodule = {:?}\nsource = \"bus\"\nstreams = [\"wallets.>\"]\n",
            server.url(),
            module.to_string_lossy()
        ),
    )
    .unwrap();
    let file = nats.write_events("events.jsonl", &lines);
    let start = Instant::now();
    run_ok(&["publish", "--config", &nats.config_str(), "--source", "bus", "wallets.updates", &file]);
    let published = n as f64 / start.elapsed().as_secs_f64();

    let redis_server = RedisServer::start();
    let redis = Workspace::new();
    std::fs::write(
        redis.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.cache]\nredis = {:?}\n\n\
             [[projection]]\nname = \"wallet-allowlist\"\nmodule = {:?}\nsource = \"cache\"\nstreams = [\"wallets\"]\n",
            redis_server.url(),
            module.to_string_lossy()
        ),
    )
    .unwrap();
    let file = redis.write_events("events.jsonl", &lines);
    let start = Instant::now();
    run_ok(&["publish", "--config", &redis.config_str(), "--source", "cache", "wallets", &file]);
    let published_redis = n as f64 / start.elapsed().as_secs_f64();

    let broker = KafkaBroker::start();
    broker.create_topic("wallets", 3);
    let kafka = Workspace::new();
    std::fs::write(
        kafka.config(),
        format!(
            "version = 1\ndata = \"data\"\n\n[sources.orders]\nkafka = [{:?}]\n\n\
             [[projection]]\nname = \"wallet-allowlist\"\nmodule = {:?}\nsource = \"orders\"\nstreams = [\"wallets\"]\n",
            broker.servers(),
            module.to_string_lossy()
        ),
    )
    .unwrap();
    // Keyed by user: one user's events stay in one partition, in order.
    let keyed: Vec<String> = lines
        .iter()
        .map(|line| {
            let mut event: serde_json::Value = serde_json::from_str(line).unwrap();
            event["subject"] = event["data"]["user_id"].clone();
            event.to_string()
        })
        .collect();
    let file = kafka.write_events("events.jsonl", &keyed);
    let start = Instant::now();
    run_ok(&["publish", "--config", &kafka.config_str(), "--source", "orders", "wallets", &file]);
    let published_kafka = n as f64 / start.elapsed().as_secs_f64();

    println!(
        "wallet-allowlist rebuilt from each source, {n} events (5,000 users), best of {runs}, events/s:"
    );
    // Round by round, each source once a round: a machine whose speed
    // drifts over the minutes weighs on every source alike.
    let (mut from_log, mut from_nats, mut from_redis, mut from_kafka) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for _ in 0..runs {
        from_log = from_log.max(rebuild(&embedded, "wallet-allowlist", n));
        from_nats = from_nats.max(rebuild(&nats, "wallet-allowlist", n));
        from_redis = from_redis.max(rebuild(&redis, "wallet-allowlist", n));
        from_kafka = from_kafka.max(rebuild(&kafka, "wallet-allowlist", n));
    }
    let rows =
        |ws: &Workspace| ws.query("wallet-allowlist", "SELECT count(*) AS n FROM allowlist")[0]["n"].clone();
    assert_eq!(rows(&embedded), rows(&nats), "both sources build the same allowlist");
    assert_eq!(rows(&embedded), rows(&kafka), "every source builds the same allowlist");
    assert_eq!(rows(&embedded), rows(&redis), "every source builds the same allowlist");
    println!("  embedded log:         {from_log:>9.0}");
    println!("  NATS JetStream:       {from_nats:>9.0}");
    println!("  Kafka (3 partitions): {from_kafka:>9.0}");
    println!("  Redis Streams:        {from_redis:>9.0}");
    println!("  JetStream / embedded: {:.2}", from_nats / from_log);
    println!("  Kafka / embedded:     {:.2}", from_kafka / from_log);
    println!("  Redis / embedded:     {:.2}", from_redis / from_log);
    println!(
        "  (projector publish to JetStream: {published:.0} events/s, to Kafka: {published_kafka:.0}, to Redis: \
         {published_redis:.0})"
    );
}
