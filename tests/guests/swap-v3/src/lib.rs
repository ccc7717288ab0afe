//! Test-only guest: the hot-swap recorder, logic version 3, state version 2
//! (swapping it in rebuilds the state).

const LOGIC: i64 = 3;
const STATE: u32 = 2;

include!("../../swap-v1/src/logic.rs");
