//! Test-only guest: the hot-swap recorder, logic version 1, state version 1.

const LOGIC: i64 = 1;
const STATE: u32 = 1;

include!("logic.rs");
