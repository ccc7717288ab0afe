//! A projection's life: its processing loop ([`runner`]), blue/green
//! rebuilds ([`rebuild`]), dead letters ([`dead_letters`]), publishing what
//! it emitted ([`outbox`]), what it shares with the API while it runs
//! ([`live`], [`metrics`]), why it cannot run ([`fault`]), and the
//! [`supervisor`] that runs every projection of a config and swaps modules
//! as their files change.

pub mod dead_letters;
pub mod fault;
pub mod live;
pub mod metrics;
pub mod offline;
pub mod outbox;
pub mod rebuild;
pub mod runner;
pub mod supervisor;
