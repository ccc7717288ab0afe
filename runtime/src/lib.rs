//! projector: a host that feeds event streams to sandboxed WebAssembly
//! projection modules, each building its own SQLite state, with exactly-once
//! effect on that state.
//!
//! One folder per concern, each depending only on the ones listed before
//! it:
//!
//! - [`bindings`]: the WIT contract's types, shared by every layer;
//! - [`config`]: the configuration file and the data folder's layout — data,
//!   it calls nothing;
//! - [`store`]: a projection's SQLite database — its checkpoint, status,
//!   dead letters and outbox;
//! - [`sources`]: where events come from — the embedded log, NATS
//!   JetStream — behind one [`sources::Source`] trait, with the CloudEvents
//!   bindings;
//! - [`sandbox`]: the wasm engine, its limits, and the host functions a
//!   module may call;
//! - [`projection`]: a projection's loop (a runner: source → sandbox →
//!   store), its rebuilds and dead letters, and the supervisor that runs
//!   every projection of a config;
//! - [`serve`]: reads for people and programs — the HTTP API, metrics, the
//!   status page, inspection from the files;
//! - [`cli`]: the `projector` command line.

pub mod bindings;
pub mod cli;
pub mod config;
pub mod priority;
pub mod projection;
pub mod sandbox;
pub mod serve;
pub mod sources;
pub mod store;
