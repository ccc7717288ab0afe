//! Write projector projection modules in Rust.
//!
//! A projection is a type that implements [`Projection`] plus one
//! [`export!`] line. The host feeds it batches of [`Event`]s; the projection
//! writes its state through the [`Context`] (key/value [`State`] and [`Sql`]
//! on its own database), and every write commits together with the host's
//! checkpoint, so each event takes effect exactly once.
//!
//! ```
//! use projector_sdk::{Context, Event, Failure, Projection};
//!
//! struct Counter;
//!
//! impl Projection for Counter {
//!     fn handle(ctx: &Context, event: &Event) -> Result<(), Failure> {
//!         let key = format!("count/{}", event.event_type());
//!         let n: u64 = ctx.state().get(&key)?.unwrap_or(0);
//!         ctx.state().set(&key, &(n + 1))?;
//!         Ok(())
//!     }
//! }
//!
//! projector_sdk::export!(Counter);
//! ```
//!
//! Build it with `cargo build --target wasm32-unknown-unknown --release`
//! (in this workspace, `scripts/build-guests` builds every guest crate into
//! `target/projections/<crate_name>.wasm`), and test its logic natively with
//! [`testing::Harness`], with no wasm involved: it keeps the host's
//! transactions, SQL rules and value limit.
#![deny(missing_docs)]

// Lets the generated bindings name this crate the same way from inside it
// and from a guest crate expanding `export!`.
extern crate self as projector_sdk;

mod context;
mod event;
mod failure;
#[cfg(not(target_arch = "wasm32"))]
mod sql_rules;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use context::{Context, Level, Log, Rows, Sql, SqlError, State, StateError, Value};
pub use event::Event;
pub use failure::Failure;

/// A projection: builds its state from events and serves reads from it.
///
/// Every method runs inside a transaction the host owns: if it returns an
/// error (or panics), none of its writes are kept.
pub trait Projection {
    /// The version of the state this projection builds. Change it when the
    /// tables or their meaning change: the host then rebuilds the state from
    /// the log with the new module.
    const STATE_VERSION: u32 = 1;

    /// Create (or migrate) tables. `found` is the state version the database
    /// holds, or `None` for a new database.
    fn init(ctx: &Context, found: Option<u32>) -> Result<(), String> {
        let _ = (ctx, found);
        Ok(())
    }

    /// Apply one event.
    fn handle(ctx: &Context, event: &Event) -> Result<(), Failure>;

    /// Apply a batch of events in order; by default one [`Projection::handle`]
    /// call each. Override it to amortise work across a batch.
    fn handle_batch(ctx: &Context, events: &[Event]) -> Result<(), Failure> {
        events.iter().try_for_each(|event| Self::handle(&ctx.for_event(event), event))
    }

    /// Serve a read. The request and response are opaque bytes (JSON by
    /// convention); the context is read-only here.
    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        let _ = (ctx, request);
        Err("this projection serves no queries".to_string())
    }
}

/// Export a [`Projection`] as the module's implementation of the
/// `projection` world. Use it once per guest crate:
///
/// ```
/// # use projector_sdk::{Context, Event, Failure, Projection};
/// struct MyProjection;
/// impl Projection for MyProjection {
///     fn handle(_ctx: &Context, _event: &Event) -> Result<(), Failure> {
///         Ok(())
///     }
/// }
/// projector_sdk::export!(MyProjection);
/// ```
///
/// On native targets (where `cargo test` runs) it expands to nothing, so the
/// same crate builds a module for the host and a library for tests.
#[macro_export]
macro_rules! export {
    ($projection:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct Export;

            impl $crate::__private::Guest for Export {
                fn state_version() -> u32 {
                    <$projection as $crate::Projection>::STATE_VERSION
                }
                fn init(found: Option<u32>) -> Result<(), String> {
                    $crate::__private::init::<$projection>(found)
                }
                fn handle(
                    events: $crate::__private::Vec<$crate::__private::WitEvent>,
                ) -> Result<(), $crate::__private::WitFailure> {
                    $crate::__private::handle::<$projection>(events)
                }
                fn query(
                    request: $crate::__private::Vec<u8>,
                ) -> Result<$crate::__private::Vec<u8>, String> {
                    $crate::__private::query::<$projection>(request)
                }
            }

            $crate::__private::bindings::__export_projection!(Export with_types_in $crate::__private::bindings);
        };
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __private;
