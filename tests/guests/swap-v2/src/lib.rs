//! Test-only guest: the hot-swap recorder, logic version 2, state version 1.

const LOGIC: i64 = 2;
const STATE: u32 = 1;

include!("../../swap-v1/src/logic.rs");
