// Shared by hostile and hostile-v2, which set `STATE` (the state version
// they build).

use projector_sdk::{Context, Event, Failure, Projection};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

/// The projection.
pub struct Hostile;

/// Calls of `h-retry` so far; linear memory survives between calls of one
/// instance (it is only ever a cache).
static RETRY_CALLS: AtomicU64 = AtomicU64::new(0);

// Recursing forever is this guest's whole point.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    black_box(recurse(black_box(depth + 1))) + 1
}

impl Projection for Hostile {
    const STATE_VERSION: u32 = STATE;

    fn init(ctx: &Context, _found: Option<u32>) -> Result<(), String> {
        ctx.sql().execute(
            "CREATE TABLE IF NOT EXISTS handled (position INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL)",
            &[],
        )?;
        Ok(())
    }

    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
        let text = || String::from_utf8_lossy(event.data()).trim_matches('"').to_string();
        match event.event_type() {
            "h-loop" => loop {
                black_box(0u64);
            },
            "h-memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "h-recurse" => {
                black_box(recurse(0));
            }
            "h-panic" => panic!("event {} asked for a panic", event.id()),
            "h-sql" => {
                ctx.sql().execute(&text(), &[]).map_err(|err| Failure::reject(err.to_string()))?;
            }
            "h-defer" => {
                ctx.sql().defer(&text(), ()).map_err(|err| Failure::reject(err.to_string()))?;
            }
            "h-defer-each" => {
                let statements: Vec<String> = event.data_json()?;
                for statement in &statements {
                    ctx.sql().defer(statement, ()).map_err(|err| Failure::reject(err.to_string()))?;
                }
            }
            "h-defer-then-panic" => {
                ctx.sql().defer(&text(), ()).map_err(|err| Failure::reject(err.to_string()))?;
                panic!("event {} deferred a write and panicked", event.id());
            }
            "h-query" => {
                ctx.sql().query(&text(), &[]).map_err(|err| Failure::reject(err.to_string()))?;
            }
            "h-log" => ctx.log().info(&text()),
            "h-log-flood" => {
                let line = "flood ".repeat(2000);
                for _ in 0..100_000 {
                    ctx.log().info(&line);
                }
            }
            "h-retry" => {
                let wanted: u64 = text().parse().unwrap_or(3);
                let calls = RETRY_CALLS.fetch_add(1, Ordering::Relaxed) + 1;
                if calls < wanted {
                    return Err(Failure::retry(format!("not yet: call {calls} of {wanted}")));
                }
            }
            "h-huge" => {
                let mib: usize = text().parse().unwrap_or(8);
                ctx.state().set_bytes("huge", &vec![7u8; mib << 20]);
            }
            "h-huge-key" => {
                let mib: usize = text().parse().unwrap_or(8);
                ctx.state().set_bytes(&"k".repeat(mib << 20), b"v");
            }
            "h-thirds" if event.position().is_multiple_of(3) => {
                return Err(Failure::reject(format!("position {} is a multiple of 3", event.position())));
            }
            "h-needs-unlock" if ctx.state().get_bytes("unlocked").is_none() => {
                return Err(Failure::reject("locked: no h-unlock event yet"));
            }
            "h-unlock" => ctx.state().set_bytes("unlocked", b"true"),
            _ => {}
        }
        ctx.sql().execute(
            "INSERT INTO handled (position, id, type) VALUES (?1, ?2, ?3)",
            &[(event.position() as i64).into(), event.id().into(), event.event_type().into()],
        )?;
        Ok(())
    }

    /// `{"execute": sql}` or `{"defer": sql}`: runs a statement from a
    /// read, as a module must not; anything else answers `{"handled": n}`.
    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        let request: serde_json::Value = serde_json::from_slice(request).map_err(|err| err.to_string())?;
        if let Some(sql) = request["execute"].as_str() {
            ctx.sql().execute(sql, &[])?;
        } else if let Some(sql) = request["defer"].as_str() {
            ctx.sql().defer(sql, ())?;
        }
        let handled: Option<i64> = ctx.sql().query_first("SELECT count(*) FROM handled", ())?;
        Ok(serde_json::json!({ "handled": handled }).to_string().into_bytes())
    }
}

projector_sdk::export!(Hostile);
