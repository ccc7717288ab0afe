//! Test-only guest: counts events per subject, one `INSERT … ON CONFLICT
//! DO UPDATE` per event, deferred — the single-upsert projection the peers
//! benchmark holds against its native twin. An event of type `bad` defers
//! a write that fails when it runs (a NULL count), for the tests of what a
//! failed deferred write does.

use projector_sdk::{Context, Event, Failure, Projection};

/// The projection.
pub struct Counter;

impl Projection for Counter {
    const STATE_VERSION: u32 = 1;

    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        ctx.sql().execute(
            "CREATE TABLE IF NOT EXISTS counts (key TEXT PRIMARY KEY NOT NULL, n INTEGER NOT NULL) WITHOUT ROWID",
            (),
        )?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let key = event.subject().unwrap_or("");
        if event.event_type() == "bad" {
            ctx.sql().defer("INSERT INTO counts (key, n) VALUES (?1, NULL)", (key,))?;
            return Ok(());
        }
        ctx.sql().defer(
            "INSERT INTO counts (key, n) VALUES (?1, 1) ON CONFLICT (key) DO UPDATE SET n = n + 1",
            (key,),
        )?;
        Ok(())
    }
}

projector_sdk::export!(Counter);
