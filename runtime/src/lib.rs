//! projector: a host that feeds event streams to sandboxed WebAssembly
//! projection modules, each building its own SQLite state, with exactly-once
//! effect on that state.
//!
//! The pieces, in the order an event meets them: [`cloudevents`] parses what
//! publishers send; [`event_log`] stores it; [`projection`] runs a module
//! over it (through [`engine`] and [`guest_host`]) into its
//! [`projection_db`]; [`supervisor`] runs every projection of a
//! [`config`]; [`inspect`] reads status and state from the files.

pub mod bindings;
pub mod cloudevents;
pub mod config;
pub mod dead_letters;
pub mod engine;
pub mod event_log;
pub mod guest_host;
pub mod http;
pub mod inspect;
pub mod instance;
pub mod live;
pub mod metrics;
pub mod priority;
pub mod projection;
pub mod projection_db;
pub mod rebuild;
pub mod remote;
pub mod replay;
pub mod supervisor;
