//! Test-only guest: a projection built against the first release of the
//! contract, `projector:projection@0.1.0` as it was before the `emit`
//! interface was added — `wit/projection.wit` is a frozen copy of it, and
//! the bindings are wit-bindgen's own, not the SDK's. It imports `state`,
//! `sql` and `log` only, and the host must keep loading and running it: a
//! module built once must not break when the contract grows.
//!
//! It records `(position, id, type)` of every event in a table and counts
//! them in its key/value state; `query` answers `{"count": n}`.

// The generated export glue is the only unsafe code, as in the SDK's export!.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod v0_1 {
    wit_bindgen::generate!({ path: "wit", world: "projection" });

    use projector::projection::sql::{self, Value};
    use projector::projection::state;

    struct ContractV0_1;

    fn count() -> u64 {
        state::get("count")
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse().ok())
            .unwrap_or(0)
    }

    impl Guest for ContractV0_1 {
        fn state_version() -> u32 {
            1
        }

        fn init(_found: Option<u32>) -> Result<(), String> {
            sql::execute(
                "CREATE TABLE IF NOT EXISTS handled (position INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL)",
                &[],
            )?;
            Ok(())
        }

        fn handle(events: Vec<Event>) -> Result<(), Failure> {
            for event in events {
                sql::execute(
                    "INSERT INTO handled (position, id, type) VALUES (?1, ?2, ?3)",
                    &[Value::Integer(event.position as i64), Value::Text(event.id), Value::Text(event.type_)],
                )
                .map_err(Failure::Reject)?;
                state::set("count", (count() + 1).to_string().as_bytes());
            }
            Ok(())
        }

        fn query(_request: Vec<u8>) -> Result<Vec<u8>, String> {
            Ok(format!("{{\"count\": {}}}", count()).into_bytes())
        }
    }

    export!(ContractV0_1);
}
