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
//! ```

use crate::event_log::validate_stream_name;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use thiserror::Error;

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
    /// The streams of the event log the projection consumes (at least one).
    ///
    /// `streams = ["wallets"]`
    pub streams: Vec<String>,
    /// Only these event types are delivered; others are skipped without
    /// calling the module. Absent: every type.
    ///
    /// `types = ["wallet_updated", "kyc_verified"]`
    #[serde(default)]
    pub types: Option<Vec<String>>,
    /// At most this many events per `handle` call and transaction. Default
    /// 1000.
    ///
    /// `batch_size = 1000`
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
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
}

fn default_data() -> PathBuf {
    PathBuf::from("data")
}

fn default_batch_size() -> usize {
    1000
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
        let mut names = HashSet::new();
        for p in &config.projections {
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 64
                && p.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !name_ok {
                return Err(invalid(format!(
                    "projection name {:?} is not allowed: use 1 to 64 lowercase letters, digits, \
                     '-' or '_'",
                    p.name
                )));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(format!(
                    "projection {:?} is listed twice; names must be unique",
                    p.name
                )));
            }
            if p.streams.is_empty() {
                return Err(invalid(format!(
                    "projection {:?}: `streams` is empty; list the streams it consumes, e.g. \
                     streams = [\"wallets\"]",
                    p.name
                )));
            }
            for stream in &p.streams {
                validate_stream_name(stream)
                    .map_err(|err| invalid(format!("projection {:?}: {err:#}", p.name)))?;
            }
            if !(1..=100_000).contains(&p.batch_size) {
                return Err(invalid(format!(
                    "projection {:?}: batch_size = {} is out of range; use 1 to 100000",
                    p.name, p.batch_size
                )));
            }
        }
        crate::engine::Limits::resolve(&config.limits, &LimitsConfig::default())
            .map_err(|err| invalid(format!("[limits]: {err}")))?;
        for p in &config.projections {
            crate::engine::Limits::resolve(&config.limits, &p.limits)
                .map_err(|err| invalid(format!("projection {:?}: limits: {err}", p.name)))?;
        }
        config.data = base.join(&config.data);
        for p in &mut config.projections {
            p.module = base.join(&p.module);
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

    /// The limits projection `p` runs under.
    pub fn limits(&self, p: &ProjectionConfig) -> crate::engine::Limits {
        crate::engine::Limits::resolve(&self.limits, &p.limits).expect("limits checked at load")
    }

    /// Where projection `name` keeps its database.
    ///
    /// A rebuild makes a new generation of the database and then points
    /// `projections/<name>.current` at it in one rename, so this is the
    /// file that pointer names, or `projections/<name>.db` before the first
    /// rebuild.
    pub fn database_path(&self, name: &str) -> PathBuf {
        let dir = self.data.join("projections");
        match std::fs::read_to_string(crate::rebuild::pointer_path(&dir, name)) {
            Ok(file) if !file.trim().is_empty() => dir.join(file.trim()),
            _ => dir.join(format!("{name}.db")),
        }
    }
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
        assert_eq!(p.batch_size, 1000);
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
                "projection name \"Wallet Allowlist\" is not allowed",
            ),
            (
                format!(
                    "{GOOD}{}",
                    GOOD.split("[[projection]]").nth(1).map(|p| format!("[[projection]]{p}")).unwrap()
                ),
                "listed twice",
            ),
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
