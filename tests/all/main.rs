//! The end-to-end tests, one binary (it links once): each module drives the
//! real `projector` binary over real wasm guests built by
//! `scripts/build-guests`, real SQLite files and, where a source is named,
//! the real broker, which the tests start themselves.
//!
//! `cargo test --release -p projector --test all <module>::` runs one module.

mod append;
mod cloudevents_sdk;
mod crash;
mod deferred;
mod events;
mod hostile;
mod hostile_http;
mod hot_swap;
mod http;
mod kafka;
mod loader_fuzz;
mod multi;
mod nats;
mod outbox;
mod progress;
mod projections;
mod redis_streams;
mod replay;
mod run;
mod sandbox;
mod status_page;
mod util;
mod walkthrough;
