//! Test-only guest: records `(position, id, stream, type, partition)`, and
//! the subject, time, correlation and causation ids and data as it saw them, of every event it handles
//! in a table with no uniqueness, and counts them in its key/value state, so
//! a test can prove each event took effect exactly once.
//!
//! Control types drive the failure paths: `poison` is rejected, `panic`
//! traps, `retry` is always asked to be retried (a dependency that never
//! comes back), `log` writes its data as a log line, and `echo` emits an
//! `echoed` event `{of: <its id>}` on stream `echoes`.

use projector_sdk::{Context, Event, Failure, Projection};

/// The projection.
pub struct EventRecorder;

impl Projection for EventRecorder {
    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        ctx.sql().execute(
            "CREATE TABLE IF NOT EXISTS handled (
                position INTEGER NOT NULL,
                id TEXT NOT NULL,
                stream TEXT NOT NULL,
                type TEXT NOT NULL,
                partition INTEGER,
                subject TEXT,
                correlation_id TEXT,
                data TEXT,
                time TEXT,
                causation_id TEXT
            )",
            &[],
        )?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        match event.event_type() {
            "poison" => return Err(Failure::reject(format!("poison event {}", event.id()))),
            "retry" => return Err(Failure::retry(format!("event {} waits for a dependency", event.id()))),
            "panic" => panic!("event {} asked for a panic", event.id()),
            "log" => ctx.log().info(&String::from_utf8_lossy(event.data())),
            "echo" => ctx.emit("echoes", "echoed", &serde_json::json!({ "of": event.id() }))?,
            _ => {}
        }
        ctx.sql().execute(
            "INSERT INTO handled (position, id, stream, type, partition, subject, correlation_id, data, time,
                                  causation_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            &[
                (event.position() as i64).into(),
                event.id().into(),
                event.stream().into(),
                event.event_type().into(),
                event.partition().map(i64::from).into(),
                event.subject().into(),
                event.correlation_id().into(),
                String::from_utf8_lossy(event.data()).into_owned().into(),
                event.time().into(),
                event.causation_id().into(),
            ],
        )?;
        let count: u64 = ctx.state().get("count")?.unwrap_or(0);
        ctx.state().set("count", &(count + 1))?;
        Ok(())
    }

    fn query(ctx: &Context, _request: &[u8]) -> Result<Vec<u8>, String> {
        let count: u64 = ctx.state().get("count")?.unwrap_or(0);
        Ok(serde_json::json!({ "count": count }).to_string().into_bytes())
    }
}

projector_sdk::export!(EventRecorder);
