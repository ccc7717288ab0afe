//! Test-only guest: `hostile` (see its crate for what each event type
//! does) building state version 2, so a projection that starts with it over
//! a database `hostile` built rebuilds the state first.

const STATE: u32 = 2;

include!("../../hostile/src/logic.rs");
