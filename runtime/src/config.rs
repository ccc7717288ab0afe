//! `projector.toml`: which projections run, on which streams, from which
//! module files. Relative paths are relative to the config file's folder.
//!
//! ```toml
//! version = 1
//! data = "data"            # event log and projection databases live here
//!
//! [[projection]]
//! name = "wallet-allowlist"
//! module = "target/projections/wallet_allowlist.wasm"
//! streams = ["wallets"]
//! types = ["wallet_updated", "kyc_verified"]   # optional filter
//!
//! [http]                   # optional: the API's access rules and limits
//! token_file = "api.token"
//! ```

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

pub mod paths;

/// The config format this projector reads.
pub const VERSION: u32 = 1;

/// A whole `projector.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The config format version; must be `1`.
    ///
    /// `version = 1`
    pub version: u32,
    /// The folder holding the event log (`events.db`) and the projections'
    /// databases (`projections/<name>.db`). Default `data`.
    ///
    /// `data = "data"`
    #[serde(default = "default_data")]
    pub data: PathBuf,
    /// Sandbox limits for every projection; a projection's own `limits`
    /// override them field by field.
    ///
    /// `[limits]` / `memory_mib = 64`
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The projections to run, one `[[projection]]` table each.
    #[serde(default, rename = "projection")]
    pub projections: Vec<ProjectionConfig>,
    /// The HTTP API's access rules, limits and timeouts.
    ///
    /// `[http]` / `hosts = ["projector.internal"]`
    #[serde(default)]
    pub http: HttpConfig,
    /// Event sources besides the embedded log, by name; a projection names
    /// one with `source`.
    ///
    /// `[sources.bus]` / `nats = "nats://127.0.0.1:4222"` / `stream = "WALLETS"`
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
}

/// `[sources.<name>]`: a broker to read events from: `nats` (with
/// `stream`) or `redis`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// NATS JetStream: the server URL, or a list of server URLs of one
    /// cluster.
    ///
    /// `nats = "nats://127.0.0.1:4222"` or `nats = ["nats://a:4222", "nats://b:4222"]`
    pub nats: Option<Servers>,
    /// The JetStream stream to read (for `nats`).
    ///
    /// `stream = "WALLETS"`
    pub stream: Option<String>,
    /// Redis Streams: the server URL (`redis://[user:password@]host:port[/db]`).
    /// A projection reading it lists stream keys in `streams`.
    ///
    /// `redis = "redis://127.0.0.1:6379"`
    pub redis: Option<String>,
    /// Kafka: the bootstrap servers (`host:port`) of one cluster. A
    /// projection's `streams` are then topics, every partition of each read.
    ///
    /// `kafka = ["127.0.0.1:9092"]`
    pub kafka: Option<Servers>,
}

/// One server URL, or several of one cluster.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Servers {
    /// `"nats://127.0.0.1:4222"`
    One(String),
    /// `["nats://a:4222", "nats://b:4222"]`
    Many(Vec<String>),
}

impl Servers {
    /// Every URL.
    pub fn urls(&self) -> Vec<String> {
        match self {
            Servers::One(url) => vec![url.clone()],
            Servers::Many(urls) => urls.clone(),
        }
    }
}

/// What a `[sources.<name>]` table configures, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind<'a> {
    /// The embedded log (a projection naming no source).
    Embedded,
    /// A NATS JetStream stream.
    Nats {
        /// The source's name.
        name: &'a str,
        /// Server URLs.
        urls: Vec<String>,
        /// The stream.
        stream: &'a str,
    },
    /// Redis Streams.
    Redis {
        /// The source's name.
        name: &'a str,
        /// The server URL.
        url: &'a str,
    },
    /// Topics of a Kafka cluster.
    Kafka {
        /// The source's name.
        name: &'a str,
        /// Bootstrap servers, `host:port`.
        servers: Vec<String>,
    },
}

/// `[http]`: who the API answers, and how much it gives any one request.
/// Read when `run` starts; a change takes effect at the next start.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Host names the API answers to, besides its listen address (and,
    /// when it listens on loopback or on every address, `localhost` and
    /// the loopback addresses). A request whose `Host` is none of them is
    /// refused: that is what stops DNS rebinding. Names only, no scheme or
    /// port.
    ///
    /// `hosts = ["projector.internal"]`
    pub hosts: Vec<String>,
    /// A file holding a bearer token (at least 16 characters; the file's
    /// surrounding whitespace is ignored). When set, every request that
    /// changes something (ingest, pause, resume, rebuild, dead-letter
    /// retry and discard) and `/sql` must send `Authorization: Bearer
    /// <token>`; `projector … --url` sends it. Set one before listening
    /// beyond loopback.
    ///
    /// `token_file = "secrets/api.token"`
    pub token_file: Option<PathBuf>,
    /// Most rows one `/sql` answer holds; a query that returns more is
    /// refused (422). Default 10000.
    ///
    /// `sql_max_rows = 10000`
    pub sql_max_rows: u64,
    /// Most bytes of JSON one `/sql` answer holds, and the longest string
    /// or blob a `/sql` query may make; over it the query is refused (422).
    /// Default 16777216 (16 MiB).
    ///
    /// `sql_max_bytes = 16777216`
    pub sql_max_bytes: u64,
    /// A connection must send a whole request head (request line and
    /// headers) within this many milliseconds of opening, or of the
    /// previous answer on a kept-alive connection; else it is closed.
    /// Default 10000.
    ///
    /// `header_timeout_ms = 10000`
    pub header_timeout_ms: u64,
    /// A request's whole body must arrive within this many milliseconds of
    /// its head; else it is answered 408. Default 30000.
    ///
    /// `body_timeout_ms = 30000`
    pub body_timeout_ms: u64,
    /// A connection on which no byte moves for this many milliseconds while
    /// no request is being handled (a client that stopped reading its
    /// answer) is closed. Default 60000.
    ///
    /// `idle_timeout_ms = 60000`
    pub idle_timeout_ms: u64,
    /// Most connections served at once; more wait in the listen queue until
    /// one closes. Default 256.
    ///
    /// `max_connections = 256`
    pub max_connections: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            hosts: Vec::new(),
            token_file: None,
            sql_max_rows: 10_000,
            sql_max_bytes: 16 << 20,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 256,
        }
    }
}

impl HttpConfig {
    /// Each numeric field's allowed range.
    const RANGES: [(&'static str, u64, u64); 6] = [
        ("sql_max_rows", 1, 10_000_000),
        ("sql_max_bytes", 1024, 1 << 30),
        ("header_timeout_ms", 100, 3_600_000),
        ("body_timeout_ms", 100, 3_600_000),
        ("idle_timeout_ms", 100, 3_600_000),
        ("max_connections", 1, 65_536),
    ];

    fn check(&self) -> Result<(), String> {
        let values = [
            self.sql_max_rows,
            self.sql_max_bytes,
            self.header_timeout_ms,
            self.body_timeout_ms,
            self.idle_timeout_ms,
            self.max_connections,
        ];
        for ((name, min, max), value) in Self::RANGES.iter().zip(values) {
            if !(*min..=*max).contains(&value) {
                return Err(format!("{name} = {value} is out of range; use {min} to {max}"));
            }
        }
        for host in &self.hosts {
            let plain = host.trim_start_matches('[').trim_end_matches(']');
            let name_ok = !host.is_empty()
                && host.len() <= 253
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !name_ok && plain.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!(
                    "hosts: {host:?} is not a host name; list names without scheme or port, e.g. \
                     hosts = [\"projector.internal\"]"
                ));
            }
        }
        Ok(())
    }
}

/// Sandbox limits; every field is optional and falls back to the config's
/// `[limits]`, then to the built-in default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Linear memory cap per instance, in MiB. Default 64.
    ///
    /// `memory_mib = 64`
    pub memory_mib: Option<u64>,
    /// Wall-clock deadline for one guest call (`handle` of a batch, `init`,
    /// `query`), in milliseconds. Default 5000.
    ///
    /// `call_timeout_ms = 5000`
    pub call_timeout_ms: Option<u64>,
    /// Fuel (roughly, wasm instructions) per guest call. Absent: unmetered.
    /// Metering costs ~10-17% speed.
    ///
    /// `fuel = 1_000_000_000`
    pub fuel: Option<u64>,
    /// Cap on table elements (function references) per table. Default 20000.
    ///
    /// `table_elements = 20000`
    pub table_elements: Option<u64>,
    /// Cap on wasm instances, tables and memories per store. Default 16.
    ///
    /// `instances = 16`
    pub instances: Option<u64>,
    /// Largest key + value a guest may store, and largest SQL text or blob
    /// parameter, in KiB. Default 1024.
    ///
    /// `value_kib = 1024`
    pub value_kib: Option<u64>,
    /// Guest log lines per second (bursts up to one second's worth); lines
    /// over it are dropped and counted. Default 100.
    ///
    /// `log_lines_per_second = 100`
    pub log_lines_per_second: Option<u64>,
    /// Longest guest log line in bytes; longer ones are cut. Default 4096.
    ///
    /// `log_line_bytes = 4096`
    pub log_line_bytes: Option<u64>,
}

/// What happens to an event the module rejects or traps on.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Park it in the dead letters (in the transaction that moves the
    /// checkpoint past it) and go on.
    #[default]
    DeadLetter,
    /// Stop the projection as faulted, checkpoint just before the event.
    Halt,
}

/// One `[[projection]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProjectionConfig {
    /// A unique name: lowercase letters, digits, `-` and `_`. It names the
    /// database file and appears in status, logs and URLs.
    ///
    /// `name = "wallet-allowlist"`
    pub name: String,
    /// The module file: a core wasm module built with projector-sdk, or a
    /// component implementing the `projection` world.
    ///
    /// `module = "target/projections/wallet_allowlist.wasm"`
    pub module: PathBuf,
    /// The source it reads: a name from `[sources]`, or `log` for the
    /// embedded log; or a list of them, for a read model joined from
    /// several (each keeps its own position in the checkpoint; see the
    /// README for the order events arrive in). Absent: the embedded log.
    ///
    /// `source = "bus"` or `source = ["log", "bus"]`
    #[serde(default)]
    pub source: Option<SourceNames>,
    /// What the source calls streams (at least one): stream names of the
    /// embedded log; for NATS, subject filters within the JetStream stream
    /// (wildcards `*` and `>` allowed); Kafka topics; Redis stream keys.
    /// With several sources, a table giving each source its own.
    ///
    /// `streams = ["wallets"]` or `streams = { log = ["orders"], bus = ["users.>"] }`
    pub streams: Streams,
    /// Only these event types are delivered; others are skipped without
    /// calling the module. Absent: every type.
    ///
    /// `types = ["wallet_updated", "kyc_verified"]`
    #[serde(default)]
    pub types: Option<Vec<String>>,
    /// At most this many events per `handle` call and transaction. Absent:
    /// adaptive — batches start at 1000 events and grow (up to 10000) while
    /// the projection is behind and each batch commits quickly, and shrink
    /// when one takes long; a projection that keeps up sees small batches.
    ///
    /// `batch_size = 1000`
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// What to do with an event the module rejects or traps on:
    /// `"dead-letter"` (default) or `"halt"`.
    ///
    /// `on_failure = "dead-letter"`
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// This projection's sandbox limits, overriding the config's `[limits]`.
    ///
    /// `[projection.limits]` / `call_timeout_ms = 1000`
    #[serde(default)]
    pub limits: LimitsConfig,
    /// For a projection reading a broker: where the events it emits go on
    /// that broker, emitted stream → a NATS subject (which a JetStream
    /// stream must capture), a Kafka topic (which must exist) or a Redis
    /// stream key. A stream not named here goes to the subject, topic or
    /// key of its own name. Not for the embedded log, whose projections
    /// emit to the log's stream of the same name.
    ///
    /// `emit = { charges = "billing.charges" }`
    #[serde(default)]
    pub emit: BTreeMap<String, String>,
}

/// The name the embedded log goes by in `source`; no `[sources]` table
/// may take it.
pub const EMBEDDED_LOG: &str = "log";

/// `source`: one source's name, or a list of several.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum SourceNames {
    /// `source = "bus"`
    One(String),
    /// `source = ["log", "bus"]`
    Many(Vec<String>),
}

impl SourceNames {
    /// Every name, in the order given.
    pub fn names(&self) -> Vec<&str> {
        match self {
            SourceNames::One(name) => vec![name.as_str()],
            SourceNames::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

impl<'de> Deserialize<'de> for SourceNames {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SourceNames;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a source name, or a list of source names, e.g. source = [\"log\", \"bus\"]")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<SourceNames, E> {
                Ok(SourceNames::One(name.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<SourceNames, A::Error> {
                Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(SourceNames::Many)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `streams`: a list (for a projection reading one source), or a table of
/// lists by source name (required when it reads several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Streams {
    /// `streams = ["wallets"]`
    List(Vec<String>),
    /// `streams = { log = ["orders"], bus = ["users.>"] }`
    BySource(BTreeMap<String, Vec<String>>),
}

impl<'de> Deserialize<'de> for Streams {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Streams;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a sequence of streams, or a table of them by source, e.g. streams = { log = \
                     [\"orders\"], bus = [\"users.>\"] }",
                )
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Streams, A::Error> {
                Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(Streams::List)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Streams, A::Error> {
                Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Streams::BySource)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl ProjectionConfig {
    /// The names of the sources it reads, in the order given: `log` for
    /// the embedded log.
    pub fn source_names(&self) -> Vec<&str> {
        self.source.as_ref().map_or_else(|| vec![EMBEDDED_LOG], SourceNames::names)
    }

    /// Whether it reads the embedded log alone.
    pub fn reads_log_only(&self) -> bool {
        self.source_names() == [EMBEDDED_LOG]
    }

    /// The streams it reads from source `source` (checked at load: every
    /// source it names has some).
    pub fn streams_of(&self, source: &str) -> &[String] {
        match &self.streams {
            Streams::List(streams) => streams,
            Streams::BySource(by_source) => by_source.get(source).map_or(&[], Vec::as_slice),
        }
    }

    /// The first stream of its first source (where `projector dev` appends
    /// a fixture).
    pub fn first_stream(&self) -> Option<&str> {
        self.streams_of(self.source_names()[0]).first().map(String::as_str)
    }
}

fn default_data() -> PathBuf {
    PathBuf::from("data")
}

/// Why a config file was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this format (unknown fields, wrong
    /// types, missing fields); the message has the line and column.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with the line, column and offending text.
        message: String,
    },
    /// The file parses but a value is not allowed.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl Config {
    /// Read, parse and check `path`, resolving relative paths against its
    /// folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        // Resolved against the folder's absolute path once, here: a reload
        // (which the watcher reports with absolute paths) then resolves
        // every path the same way as the start did.
        let folder = match path.parent() {
            Some(folder) if !folder.as_os_str().is_empty() => folder,
            _ => Path::new("."),
        };
        let base = std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
        Config::parse(&text, path, &base)
    }

    /// Parse and check config `text` (read from `path`), resolving relative
    /// paths against `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            message: err.to_string().trim_end().to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
        if config.version != VERSION {
            return Err(invalid(format!(
                "version = {} is not supported; this projector reads version = {VERSION}",
                config.version
            )));
        }
        // The sources first: a projection's streams are checked by its
        // sources' kinds.
        for (name, source) in &config.sources {
            source.check(name).map_err(|err| invalid(format!("[sources.{name}]: {err}")))?;
        }
        // Where each projection is in the file, for the messages below.
        let at = |i: usize| projection_line(text, i).map(|l| format!(" (line {l})")).unwrap_or_default();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, p) in config.projections.iter().enumerate() {
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 64
                && p.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !name_ok {
                return Err(invalid(format!(
                    "projection name {:?}{} is not allowed: use 1 to 64 lowercase letters, digits, \
                     '-' or '_'",
                    p.name,
                    at(i)
                )));
            }
            if let Some(first) = names.insert(p.name.as_str(), i) {
                let lines = match (projection_line(text, first), projection_line(text, i)) {
                    (Some(a), Some(b)) => format!(" (lines {a} and {b})"),
                    _ => String::new(),
                };
                return Err(invalid(format!(
                    "projection {:?} is listed twice{lines}; names must be unique: rename or remove \
                     one",
                    p.name
                )));
            }
            let sources = p.source_names();
            if sources.is_empty() {
                return Err(invalid(format!(
                    "projection {:?}{}: source = [] names no source; name one or more, e.g. \
                     source = [\"log\", \"bus\"], or remove `source` to read the embedded log",
                    p.name,
                    at(i)
                )));
            }
            for (j, source) in sources.iter().enumerate() {
                if sources[..j].contains(source) {
                    return Err(invalid(format!(
                        "projection {:?}{}: source lists {source:?} twice; list each source once",
                        p.name,
                        at(i)
                    )));
                }
                if *source != EMBEDDED_LOG && !config.sources.contains_key(*source) {
                    let known: Vec<&str> = config.sources.keys().map(String::as_str).collect();
                    return Err(invalid(format!(
                        "projection {:?}{}: source = {source:?} is not defined; define it as \
                         [sources.{source}], or use one of: {}",
                        p.name,
                        at(i),
                        std::iter::once(EMBEDDED_LOG).chain(known).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            match &p.streams {
                Streams::List(_) if sources.len() > 1 => {
                    return Err(invalid(format!(
                        "projection {:?}{}: it reads several sources, so `streams` must say which \
                         source each stream is read from: streams = {{ {} }}",
                        p.name,
                        at(i),
                        sources.iter().map(|s| format!("{s} = [\"…\"]")).collect::<Vec<_>>().join(", ")
                    )));
                }
                Streams::List(_) => {}
                Streams::BySource(by_source) => {
                    if let Some(other) = by_source.keys().find(|name| !sources.contains(&name.as_str())) {
                        return Err(invalid(format!(
                            "projection {:?}{}: streams.{other} names a source the projection does \
                             not read; add {other:?} to `source` ({}), or remove streams.{other}",
                            p.name,
                            at(i),
                            sources.join(", ")
                        )));
                    }
                    if let Some(missing) = sources.iter().find(|name| !by_source.contains_key(**name)) {
                        return Err(invalid(format!(
                            "projection {:?}{}: `streams` gives source {missing:?} no streams; list \
                             what it reads from it, e.g. streams.{missing} = [\"wallets\"]",
                            p.name,
                            at(i)
                        )));
                    }
                }
            }
            for source in &sources {
                let streams = p.streams_of(source);
                let here = match &p.streams {
                    Streams::List(_) => String::new(),
                    Streams::BySource(_) => format!("streams.{source}: "),
                };
                if streams.is_empty() {
                    return Err(invalid(format!(
                        "projection {:?}{}: {here}`streams` is empty; list the streams it consumes, e.g. \
                         streams = [\"wallets\"]",
                        p.name,
                        at(i)
                    )));
                }
                config
                    .check_streams(source, streams)
                    .map_err(|err| invalid(format!("projection {:?}{}: {here}{err}", p.name, at(i))))?;
            }
            if sources[0] == EMBEDDED_LOG && !p.emit.is_empty() {
                return Err(invalid(format!(
                    "projection {:?}{}: `emit` routes emitted streams to a broker, but the projection \
                     publishes to the embedded log (its first source), where each emitted stream is the \
                     log's stream of the same name; remove `emit`, or name a broker first in `source`",
                    p.name,
                    at(i)
                )));
            }
            // Emitted events go to the first source's broker.
            let source = config.sources.get(sources[0]);
            for (stream, route) in &p.emit {
                validate_stream_name(stream)
                    .map_err(|err| invalid(format!("projection {:?}{}: emit: {err:#}", p.name, at(i))))?;
                let checked = match source {
                    Some(source) if source.kafka.is_some() => validate_topic(route),
                    Some(source) if source.redis.is_some() => {
                        crate::sources::redis::validate_key(route).map_err(|err| format!("{err:#}"))
                    }
                    _ => validate_subject_filter(route).and_then(|()| {
                        match route.split('.').any(|t| t == "*" || t == ">") {
                            true => Err(format!(
                                "{route:?} has a wildcard; an emitted event goes to one subject, e.g. \
                                 \"billing.charges\""
                            )),
                            false => Ok(()),
                        }
                    }),
                };
                checked.map_err(|err| {
                    invalid(format!("projection {:?}{}: emit.{stream}: {err}", p.name, at(i)))
                })?;
            }
            if p.types.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(format!(
                    "projection {:?}{}: types = [] would skip every event; remove `types` to \
                     receive every type",
                    p.name,
                    at(i)
                )));
            }
            if let Some(batch_size) = p.batch_size
                && !(1..=100_000).contains(&batch_size)
            {
                return Err(invalid(format!(
                    "projection {:?}{}: batch_size = {} is out of range; use 1 to 100000",
                    p.name,
                    at(i),
                    batch_size
                )));
            }
        }
        Limits::resolve(&config.limits, &LimitsConfig::default())
            .map_err(|err| invalid(format!("[limits]: {err}")))?;
        config.http.check().map_err(|err| invalid(format!("[http]: {err}")))?;
        for p in &config.projections {
            Limits::resolve(&config.limits, &p.limits)
                .map_err(|err| invalid(format!("projection {:?}: limits: {err}", p.name)))?;
        }
        config.data = base.join(&config.data);
        for p in &mut config.projections {
            p.module = base.join(&p.module);
        }
        if let Some(token_file) = &mut config.http.token_file {
            *token_file = base.join(&*token_file);
        }
        Ok(config)
    }

    /// The projection called `name`, or an error listing the ones there are.
    pub fn projection(&self, name: &str) -> anyhow::Result<&ProjectionConfig> {
        self.projections.iter().find(|p| p.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.projections.iter().map(|p| p.name.as_str()).collect();
            anyhow::anyhow!("no projection named {name:?} in the config; it has: {}", known.join(", "))
        })
    }

    /// The first source projection `p` reads (the one it publishes what it
    /// emits to), checked at load.
    pub fn source_of<'a>(&'a self, p: &'a ProjectionConfig) -> SourceKind<'a> {
        self.source_kind(p.source_names()[0])
    }

    /// Every source projection `p` reads, with its name, in the order
    /// given.
    pub fn sources_of<'a>(&'a self, p: &'a ProjectionConfig) -> Vec<(&'a str, SourceKind<'a>)> {
        p.source_names().into_iter().map(|name| (name, self.source_kind(name))).collect()
    }

    /// Check `streams`, what a projection reads from source `source`, for
    /// that source's kind.
    fn check_streams(&self, source: &str, streams: &[String]) -> Result<(), String> {
        match self.source_kind(source) {
            SourceKind::Embedded => streams
                .iter()
                .try_for_each(|stream| validate_stream_name(stream).map_err(|err| format!("{err:#}"))),
            SourceKind::Redis { .. } => {
                for (j, key) in streams.iter().enumerate() {
                    crate::sources::redis::validate_key(key).map_err(|err| format!("{err:#}"))?;
                    if streams[..j].contains(key) {
                        return Err(format!("streams lists {key:?} twice; list each stream key once"));
                    }
                }
                Ok(())
            }
            SourceKind::Kafka { .. } => streams.iter().try_for_each(|topic| validate_topic(topic)),
            SourceKind::Nats { .. } => {
                streams.iter().try_for_each(|subject| validate_subject_filter(subject))
            }
        }
    }

    /// What source `name` is: `log`, or a `[sources]` table checked at
    /// load.
    fn source_kind<'a>(&'a self, name: &'a str) -> SourceKind<'a> {
        if name == EMBEDDED_LOG {
            return SourceKind::Embedded;
        }
        let source = &self.sources[name];
        if let Some(servers) = &source.kafka {
            return SourceKind::Kafka { name, servers: servers.urls() };
        }
        match (&source.nats, &source.stream, &source.redis) {
            (Some(servers), Some(stream), None) => SourceKind::Nats { name, urls: servers.urls(), stream },
            (None, None, Some(url)) => SourceKind::Redis { name, url },
            _ => unreachable!("checked at load"),
        }
    }

    /// The limits projection `p` runs under.
    pub fn limits(&self, p: &ProjectionConfig) -> Limits {
        Limits::resolve(&self.limits, &p.limits).expect("limits checked at load")
    }

    /// Where projection `name` keeps its database.
    ///
    /// A rebuild makes a new generation of the database and then points
    /// `projections/<name>.current` at it in one rename, so this is the
    /// file that pointer names, or `projections/<name>.db` before the first
    /// rebuild.
    pub fn database_path(&self, name: &str) -> PathBuf {
        paths::current_database(&self.data.join("projections"), name)
    }
}

/// Stream names go into URLs and file listings: keep them plain.
pub fn validate_stream_name(stream: &str) -> anyhow::Result<()> {
    let ok = !stream.is_empty()
        && stream.len() <= 128
        && stream.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        anyhow::bail!("invalid stream name {stream:?}: use 1 to 128 ASCII letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl SourceConfig {
    fn check(&self, name: &str) -> Result<(), String> {
        if name == EMBEDDED_LOG {
            return Err(format!(
                "the name {EMBEDDED_LOG:?} is the embedded log's (a projection reads it with source = \
                 \"{EMBEDDED_LOG}\"); give this source another name, e.g. [sources.{EMBEDDED_LOG}-bus]"
            ));
        }
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !name_ok {
            return Err(format!(
                "the name {name:?} is not allowed: use 1 to 64 lowercase letters, digits, '-' or '_'"
            ));
        }
        if let Some(url) = &self.redis {
            return self.check_redis(url);
        }
        if let Some(servers) = &self.kafka {
            return self.check_kafka(servers);
        }
        let Some(servers) = &self.nats else {
            return Err(
                "say which broker: nats = \"nats://host:4222\" (NATS JetStream, with stream = \"NAME\"), \
                 kafka = [\"host:9092\"] (Kafka) or redis = \"redis://host:6379\" (Redis Streams)"
                    .into(),
            );
        };
        let urls = servers.urls();
        if urls.is_empty() {
            return Err(
                "nats = [] lists no server; give at least one URL, e.g. \"nats://127.0.0.1:4222\"".into()
            );
        }
        for url in &urls {
            let rest = url.strip_prefix("nats://").or_else(|| url.strip_prefix("tls://")).unwrap_or(url);
            if rest.is_empty() || rest.contains(char::is_whitespace) || rest.contains('/') {
                return Err(format!("nats = {url:?} is not a server URL; write nats://host:port"));
            }
        }
        let Some(stream) = &self.stream else {
            return Err("name the JetStream stream to read: stream = \"WALLETS\"".into());
        };
        let stream_ok = !stream.is_empty()
            && stream.len() <= 255
            && stream.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>' | '/' | '\\'));
        if !stream_ok {
            return Err(format!(
                "stream = {stream:?} is not a JetStream stream name: use printable characters \
                 without '.', '*', '>', '/' or '\\'"
            ));
        }
        Ok(())
    }
}

/// What a source naming two brokers is told.
const ONE_BROKER: &str =
    "a source is one broker: give one of `nats`, `kafka` or `redis`; define a source per broker";

impl SourceConfig {
    /// A Redis source: a URL, and nothing of NATS.
    fn check_redis(&self, url: &str) -> Result<(), String> {
        if self.nats.is_some() || self.kafka.is_some() {
            return Err(ONE_BROKER.into());
        }
        if self.stream.is_some() {
            return Err("`stream` names a JetStream stream and has no use with `redis`: list the stream \
                        keys in each projection's `streams` instead"
                .into());
        }
        let rest = url.strip_prefix("redis://").unwrap_or_default();
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let (address, db) = host.split_once('/').unwrap_or((host, ""));
        let ok = url.starts_with("redis://")
            && !address.is_empty()
            && !url.contains(char::is_whitespace)
            && (db.is_empty() || db.parse::<u16>().is_ok())
            && ::redis::parse_redis_url(url).is_some();
        if !ok {
            return Err(format!(
                "redis = {url:?} is not a Redis server URL; write redis://host:port, or \
                 redis://host:port/db for a database other than 0"
            ));
        }
        Ok(())
    }

    fn check_kafka(&self, servers: &Servers) -> Result<(), String> {
        if self.nats.is_some() {
            return Err(ONE_BROKER.into());
        }
        if let Some(stream) = &self.stream {
            return Err(format!(
                "stream = {stream:?} is for NATS; a Kafka source reads the topics a projection lists in its \
                 streams, e.g. streams = [\"orders\"]"
            ));
        }
        let servers = servers.urls();
        if servers.is_empty() {
            return Err("kafka = [] lists no server; give at least one bootstrap server, e.g. \
                        kafka = [\"127.0.0.1:9092\"]"
                .into());
        }
        servers.iter().try_for_each(|server| validate_kafka_server(server))
    }
}

/// A topic name Kafka accepts: 1 to 249 ASCII letters, digits, `.`, `_`
/// or `-`, and not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{topic:?} is not a Kafka topic name: use 1 to 249 ASCII letters, digits, '.', '_' or '-', e.g. \
             \"orders\""
        ))
    }
}

/// A bootstrap server as `host:port`.
pub fn validate_kafka_server(server: &str) -> Result<(), String> {
    let ok = server.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.contains(char::is_whitespace)
            && !host.contains('/')
            && port.parse::<u16>().is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(format!("kafka = {server:?} is not a bootstrap server; write host:port, e.g. \"127.0.0.1:9092\""))
    }
}

/// A NATS subject filter: dot-separated tokens, `*` for one token, `>` for
/// the rest (last only).
pub fn validate_subject_filter(subject: &str) -> Result<(), String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let ok = !subject.is_empty()
        && subject.len() <= 256
        && tokens.iter().enumerate().all(|(i, token)| {
            !token.is_empty()
                && token.chars().all(|c| c.is_ascii_graphic())
                && (*token == "*" || *token == ">" || !token.contains(['*', '>']))
                && (*token != ">" || i + 1 == tokens.len())
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{subject:?} is not a NATS subject filter: use dot-separated tokens, `*` for one token \
             and `>` (last) for the rest, e.g. \"wallets.>\""
        ))
    }
}

/// The line (from 1) of the `name` of the `index`th `[[projection]]` in
/// the config `text`, found by parsing it again with spans.
fn projection_line(text: &str, index: usize) -> Option<usize> {
    #[derive(Deserialize)]
    struct Names {
        #[serde(default, rename = "projection")]
        projections: Vec<Name>,
    }
    #[derive(Deserialize)]
    struct Name {
        name: toml::Spanned<String>,
    }
    let names: Names = toml::from_str(text).ok()?;
    let start = names.projections.get(index)?.name.span().start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("projector.toml"), Path::new("/srv"))
    }

    const GOOD: &str = r#"
version = 1
data = "state"
[[projection]]
name = "wallet-allowlist"
module = "wallet_allowlist.wasm"
streams = ["wallets"]
types = ["wallet_updated", "kyc_verified"]
"#;

    #[test]
    fn a_good_config_resolves_paths_against_its_folder() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.data, Path::new("/srv/state"));
        let p = &config.projections[0];
        assert_eq!(p.module, Path::new("/srv/wallet_allowlist.wasm"));
        assert_eq!(p.batch_size, None);
        assert_eq!(p.types.as_deref().unwrap().len(), 2);
        assert_eq!(
            config.database_path("wallet-allowlist"),
            Path::new("/srv/state/projections/wallet-allowlist.db")
        );
    }

    #[test]
    fn bad_configs_say_exactly_what_is_wrong() {
        let cases = [
            (
                GOOD.replace("version = 1", "version = 2"),
                "version = 2 is not supported; this projector reads version = 1",
            ),
            (GOOD.replace("version = 1\n", ""), "missing field `version`"),
            (
                GOOD.replace("streams = [\"wallets\"]", "streams = [\"wallets\"]\nstreems = []"),
                "unknown field `streems`",
            ),
            (GOOD.replace("streams = [\"wallets\"]", "streams = []"), "`streams` is empty"),
            (
                GOOD.replace("streams = [\"wallets\"]", "streams = \"wallets\""),
                "invalid type: string \"wallets\", expected a sequence",
            ),
            (
                GOOD.replace("name = \"wallet-allowlist\"", "name = \"Wallet Allowlist\""),
                "projection name \"Wallet Allowlist\" (line 5) is not allowed",
            ),
            (
                format!(
                    "{GOOD}{}",
                    GOOD.split("[[projection]]").nth(1).map(|p| format!("[[projection]]{p}")).unwrap()
                ),
                "projection \"wallet-allowlist\" is listed twice (lines 5 and 10); names must be \
                 unique",
            ),
            (
                GOOD.replace("types = [\"wallet_updated\", \"kyc_verified\"]", "types = []"),
                "projection \"wallet-allowlist\" (line 5): types = [] would skip every event; remove \
                 `types` to receive every type",
            ),
            (format!("{GOOD}\n[http]\nsql_max_rows = 0\n"), "[http]: sql_max_rows = 0 is out of range"),
            (
                format!("{GOOD}\n[http]\nhosts = [\"http://x:80\"]\n"),
                "[http]: hosts: \"http://x:80\" is not a host name",
            ),
            (format!("{GOOD}\n[http]\ntoken = \"x\"\n"), "unknown field `token`"),
            (GOOD.replace("[\"wallets\"]", "[\"wal lets\"]"), "invalid stream name \"wal lets\""),
            (format!("{GOOD}batch_size = 0\n"), "batch_size = 0 is out of range"),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
            assert!(err.starts_with("invalid config projector.toml"), "{err}");
        }
    }

    #[test]
    fn redis_sources_are_checked_with_what_to_do() {
        let redis = |source: &str, streams: &str| {
            format!(
                "version = 1\n[sources.cache]\n{source}\n[[projection]]\nname = \"p\"\nmodule = \"m.wasm\"\n\
                 source = \"cache\"\nstreams = {streams}\n"
            )
        };
        let good =
            parse(&redis("redis = \"redis://127.0.0.1:6379/2\"", "[\"wallets\", \"app:{eu}:orders\"]"))
                .unwrap();
        assert_eq!(
            good.source_of(&good.projections[0]),
            SourceKind::Redis { name: "cache", url: "redis://127.0.0.1:6379/2" }
        );
        // A key is routed as it is, wildcard characters and all (no NATS
        // subject rules).
        let routed = parse(&redis(
            "redis = \"redis://h:6379\"",
            "[\"w\"]\nemit = { charges = \"billing:*:charges\" }",
        ))
        .unwrap();
        assert_eq!(routed.projections[0].emit["charges"], "billing:*:charges");
        let cases = [
            (
                redis("redis = \"http://127.0.0.1:6379\"", "[\"w\"]"),
                "[sources.cache]: redis = \"http://127.0.0.1:6379\" is not a Redis server URL; write \
                 redis://host:port, or redis://host:port/db for a database other than 0",
            ),
            (redis("redis = \"redis://\"", "[\"w\"]"), "is not a Redis server URL"),
            (redis("redis = \"redis://h:6379/x\"", "[\"w\"]"), "is not a Redis server URL"),
            (
                redis("redis = \"redis://h:6379\"\nstream = \"W\"", "[\"w\"]"),
                "`stream` names a JetStream stream and has no use with `redis`",
            ),
            (
                redis("redis = \"redis://h:6379\"\nnats = \"nats://h:4222\"", "[\"w\"]"),
                "a source is one broker: give one of `nats`, `kafka` or `redis`",
            ),
            (redis("", "[\"w\"]"), "say which broker: nats = "),
            (redis("redis = \"redis://h:6379\"", "[]"), "`streams` is empty"),
            (redis("redis = \"redis://h:6379\"", "[\"a b\"]"), "\"a b\" is not a stream key"),
            (redis("redis = \"redis://h:6379\"", "[\"w\", \"w\"]"), "streams lists \"w\" twice"),
            (redis("redis = \"redis://h:6379\"\nkeys = []", "[\"w\"]"), "unknown field `keys`"),
            (
                redis("redis = \"redis://h:6379\"", "[\"w\"]\nemit = { charges = \"billing charges\" }"),
                "projection \"p\" (line 5): emit.charges: \"billing charges\" is not a stream key: use 1 to 512 \
                 bytes without whitespace",
            ),
            (
                redis("redis = \"redis://h:6379\"", "[\"w\"]\nemit = { \"bad name\" = \"charges\" }"),
                "projection \"p\" (line 5): emit: invalid stream name \"bad name\"",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn kafka_sources_are_checked() {
        let kafka = "version = 1\n[sources.orders]\nkafka = [\"127.0.0.1:9092\"]\n[[projection]]\nname = \"fees\"\n\
                     module = \"m.wasm\"\nsource = \"orders\"\nstreams = [\"orders\", \"settings\"]\n";
        let config = parse(kafka).unwrap();
        assert_eq!(
            config.source_of(&config.projections[0]),
            SourceKind::Kafka { name: "orders", servers: vec!["127.0.0.1:9092".into()] }
        );
        let routed = parse(&format!("{kafka}emit = {{ charges = \"billing-charges.v1\" }}\n")).unwrap();
        assert_eq!(routed.projections[0].emit["charges"], "billing-charges.v1");
        let cases = [
            (kafka.replace("[\"127.0.0.1:9092\"]", "[]"), "[sources.orders]: kafka = [] lists no server"),
            (
                kafka.replace("127.0.0.1:9092", "kafka://a:9092"),
                "[sources.orders]: kafka = \"kafka://a:9092\" is not a bootstrap server; write host:port",
            ),
            (
                kafka.replace("kafka = [", "stream = \"X\"\nkafka = ["),
                "[sources.orders]: stream = \"X\" is for NATS; a Kafka source reads the topics",
            ),
            (
                kafka.replace("kafka = [", "nats = \"nats://a:4222\"\nkafka = ["),
                "[sources.orders]: a source is one broker: give one of `nats`, `kafka` or `redis`",
            ),
            (
                kafka.replace("\"settings\"", "\"set tings\""),
                "projection \"fees\" (line 5): \"set tings\" is not a Kafka topic name",
            ),
            (kafka.replace("kafka = [\"127.0.0.1:9092\"]", "kafak = []"), "unknown field `kafak`"),
            (
                format!("{kafka}emit = {{ charges = \"billing:charges\" }}\n"),
                "projection \"fees\" (line 5): emit.charges: \"billing:charges\" is not a Kafka topic name: use 1 \
                 to 249 ASCII letters, digits, '.', '_' or '-'",
            ),
            (
                format!("{kafka}emit = {{ charges = \"..\" }}\n"),
                "projection \"fees\" (line 5): emit.charges: \"..\" is not a Kafka topic name",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn several_sources_are_checked_with_what_to_do() {
        let multi = |source: &str, streams: &str| {
            format!(
                "version = 1\n[sources.bus]\nnats = \"nats://127.0.0.1:4222\"\nstream = \"USERS\"\n\
                 [sources.cache]\nredis = \"redis://127.0.0.1:6379\"\n[[projection]]\nname = \"joined\"\n\
                 module = \"m.wasm\"\nsource = {source}\nstreams = {streams}\n"
            )
        };
        let good = parse(&multi(
            "[\"log\", \"bus\", \"cache\"]",
            "{ log = [\"orders\"], bus = [\"users.>\"], cache = [\"carts\"] }",
        ))
        .unwrap();
        let p = &good.projections[0];
        assert_eq!(p.source_names(), ["log", "bus", "cache"]);
        assert_eq!(p.streams_of("bus"), ["users.>"]);
        assert_eq!(p.first_stream(), Some("orders"));
        let kinds: Vec<SourceKind> = good.sources_of(p).into_iter().map(|(_, kind)| kind).collect();
        assert_eq!(kinds[0], SourceKind::Embedded);
        assert!(matches!(kinds[1], SourceKind::Nats { name: "bus", .. }), "{kinds:?}");
        // One source given as a list, or as a table, or `log` by name.
        for (source, streams) in [("[\"bus\"]", "[\"users.>\"]"), ("\"bus\"", "{ bus = [\"users.>\"] }")] {
            let one = parse(&multi(source, streams)).unwrap();
            assert_eq!(one.projections[0].source_names(), ["bus"]);
            assert_eq!(one.projections[0].streams_of("bus"), ["users.>"]);
        }
        assert!(parse(&multi("\"log\"", "[\"orders\"]")).unwrap().projections[0].reads_log_only());
        let cases = [
            (
                multi("[\"log\", \"bus\"]", "[\"orders\"]"),
                "projection \"joined\" (line 8): it reads several sources, so `streams` must say which \
                 source each stream is read from: streams = { log = [\"…\"], bus = [\"…\"] }",
            ),
            (
                multi("[\"log\", \"log\"]", "{ log = [\"orders\"] }"),
                "projection \"joined\" (line 8): source lists \"log\" twice; list each source once",
            ),
            (
                multi("[\"log\", \"bsu\"]", "{ log = [\"orders\"] }"),
                "source = \"bsu\" is not defined; define it as [sources.bsu], or use one of: log, bus, cache",
            ),
            (multi("[]", "[\"orders\"]"), "source = [] names no source"),
            (
                multi("[\"log\", \"bus\"]", "{ log = [\"orders\"], bus = [\"u.>\"], cache = [\"c\"] }"),
                "streams.cache names a source the projection does not read; add \"cache\" to `source` \
                 (log, bus), or remove streams.cache",
            ),
            (
                multi("[\"log\", \"bus\"]", "{ log = [\"orders\"] }"),
                "`streams` gives source \"bus\" no streams; list what it reads from it, e.g. \
                 streams.bus = [\"wallets\"]",
            ),
            (
                multi("[\"log\", \"bus\"]", "{ log = [\"orders\"], bus = [] }"),
                "streams.bus: `streams` is empty",
            ),
            (
                multi("[\"log\", \"bus\"]", "{ log = [\"orders\"], bus = [\"users.>.x\"] }"),
                "projection \"joined\" (line 8): streams.bus: \"users.>.x\" is not a NATS subject filter",
            ),
            (
                multi("[\"bus\", \"cache\"]", "{ bus = [\"u\"], cache = [\"a b\"] }"),
                "streams.cache: \"a b\" is not a stream key",
            ),
            (
                multi("[\"log\", \"bus\"]", "{ log = [\"wal lets\"], bus = [\"u\"] }"),
                "streams.log: invalid stream name \"wal lets\"",
            ),
            (
                multi(
                    "[\"log\", \"bus\"]",
                    "{ log = [\"orders\"], bus = [\"u\"] }\nemit = { fees = \"billing.fees\" }",
                ),
                "publishes to the embedded log (its first source)",
            ),
            (multi("{ a = 1 }", "[\"orders\"]"), "expected a source name, or a list of source names"),
            (
                multi("\"log\"", "\"orders\""),
                "invalid type: string \"orders\", expected a sequence of streams, or a table",
            ),
            (
                multi("\"log\"", "[\"orders\"]").replace("[sources.cache]", "[sources.log]"),
                "[sources.log]: the name \"log\" is the embedded log's (a projection reads it with source = \
                 \"log\"); give this source another name, e.g. [sources.log-bus]",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
        }
        // Emitting works with a broker first.
        let emits = multi(
            "[\"bus\", \"log\"]",
            "{ log = [\"orders\"], bus = [\"u\"] }\nemit = { fees = \"billing.fees\" }",
        );
        assert_eq!(
            parse(&emits).unwrap().source_of(&parse(&emits).unwrap().projections[0]),
            SourceKind::Nats { name: "bus", urls: vec!["nats://127.0.0.1:4222".into()], stream: "USERS" }
        );
    }

    #[test]
    fn limits_fall_back_from_projection_to_config_to_defaults() {
        let text = GOOD.replace(
            "data = \"state\"",
            "data = \"state\"\n[limits]\nmemory_mib = 32\ncall_timeout_ms = 100",
        ) + "on_failure = \"halt\"\n[projection.limits]\ncall_timeout_ms = 50\nfuel = 1000\n";
        let config = parse(&text).unwrap();
        let p = &config.projections[0];
        assert_eq!(p.on_failure, FailurePolicy::Halt);
        let limits = config.limits(p);
        assert_eq!(limits.memory_bytes, 32 << 20);
        assert_eq!(limits.call_timeout, std::time::Duration::from_millis(50));
        assert_eq!(limits.fuel, Some(1000));
        assert_eq!(limits.value_bytes, 1024 << 10);
    }

    #[test]
    fn a_parse_error_gives_the_line() {
        let err = parse(&GOOD.replace("streams = [\"wallets\"]", "streams = [\"wallets\"")).unwrap_err();
        assert!(err.to_string().contains("line 8"), "{err}");
    }
}

/// The limits one projection's instances run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory cap per instance, bytes.
    pub memory_bytes: usize,
    /// Wall-clock deadline per guest call.
    pub call_timeout: Duration,
    /// Fuel per guest call; `None`: unmetered.
    pub fuel: Option<u64>,
    /// Table elements cap per table.
    pub table_elements: usize,
    /// Instances, tables and memories cap per store.
    pub instances: usize,
    /// Largest key + value, SQL text or blob parameter, bytes.
    pub value_bytes: usize,
    /// Guest log lines per second.
    pub log_lines_per_second: u64,
    /// Longest guest log line, bytes.
    pub log_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::resolve(&LimitsConfig::default(), &LimitsConfig::default()).expect("defaults are valid")
    }
}

impl Limits {
    /// `overrides`, falling back to `defaults`, then to the built-in values.
    pub fn resolve(defaults: &LimitsConfig, overrides: &LimitsConfig) -> Result<Limits, String> {
        fn pick(name: &str, a: Option<u64>, b: Option<u64>, builtin: u64, max: u64) -> Result<u64, String> {
            let value = a.or(b).unwrap_or(builtin);
            if value == 0 || value > max {
                return Err(format!("{name} = {value} is out of range; use 1 to {max}"));
            }
            Ok(value)
        }
        let (o, d) = (overrides, defaults);
        Ok(Limits {
            memory_bytes: (pick("memory_mib", o.memory_mib, d.memory_mib, 64, 4096)? << 20) as usize,
            call_timeout: Duration::from_millis(pick(
                "call_timeout_ms",
                o.call_timeout_ms,
                d.call_timeout_ms,
                5000,
                3_600_000,
            )?),
            fuel: match o.fuel.or(d.fuel) {
                Some(0) => return Err("fuel = 0 is out of range; use at least 1".into()),
                fuel => fuel,
            },
            table_elements: pick("table_elements", o.table_elements, d.table_elements, 20_000, 10_000_000)?
                as usize,
            instances: pick("instances", o.instances, d.instances, 16, 10_000)? as usize,
            value_bytes: (pick("value_kib", o.value_kib, d.value_kib, 1024, 1 << 20)? << 10) as usize,
            log_lines_per_second: pick(
                "log_lines_per_second",
                o.log_lines_per_second,
                d.log_lines_per_second,
                100,
                1_000_000,
            )?,
            log_line_bytes: pick("log_line_bytes", o.log_line_bytes, d.log_line_bytes, 4096, 1 << 20)?
                as usize,
        })
    }
}
