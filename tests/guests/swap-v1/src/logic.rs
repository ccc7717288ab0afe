// Shared by swap-v1, swap-v2 and swap-v3, which set `LOGIC` (the version
// recorded with each event) and `STATE` (the state version they build).

use projector_sdk::{Context, Event, Failure, Projection};

/// The projection.
pub struct Swap;

impl Projection for Swap {
    const STATE_VERSION: u32 = STATE;

    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        ctx.sql().execute(
            "CREATE TABLE IF NOT EXISTS handled (position INTEGER NOT NULL, version INTEGER NOT NULL)",
            &[],
        )?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        ctx.sql().execute(
            "INSERT INTO handled (position, version) VALUES (?1, ?2)",
            &[(event.position() as i64).into(), LOGIC.into()],
        )?;
        Ok(())
    }
}

projector_sdk::export!(Swap);
