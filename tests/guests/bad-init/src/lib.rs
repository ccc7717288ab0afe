//! Test-only guest: implements the world but refuses to `init`, so a swap
//! to it must be refused and the running module kept.

use projector_sdk::{Context, Event, Failure, Projection};

/// The projection.
pub struct BadInit;

impl Projection for BadInit {
    fn init(_ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        Err("this module refuses to init".to_string())
    }

    fn handle(_ctx: &Context, _event: &Event) -> Result<(), Failure> {
        Ok(())
    }
}

projector_sdk::export!(BadInit);
