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
//! What a projection writes with:
//!
//! - [`Sql`]: parameters as a tuple of plain values or [`params!`]
//!   ([`Params`]), rows read by column name into `serde` types
//!   ([`Sql::query_as`], [`Sql::query_first`], [`Row::get`]), and writes
//!   the host runs on a thread of its own while the module goes on
//!   ([`Sql::defer`]);
//! - [`Projection::MIGRATIONS`]: the schema as ordered statements, each
//!   applied once, before every `init`;
//! - [`query_json`]: a typed `query`, the JSON done here;
//! - [`Context::emit`]: events published in turn, with the batch;
//! - [`testing::Harness`]: the host's semantics natively, parking rejected
//!   events and recording emitted ones.
//!
//! `projector new <name>` scaffolds a crate that uses all of this. Build it
//! with `projector build` (into `target/projections/<crate_name>.wasm`; it is
//! `cargo build --target wasm32-unknown-unknown --release` with the guest
//! profile), run it with `projector dev`, which swaps every saved edit into
//! a running host, and test its logic natively with [`testing::Harness`],
//! with no wasm involved: it keeps the host's transactions, SQL rules and
//! value limit.
#![deny(missing_docs)]

// Lets the generated bindings name this crate the same way from inside it
// and from a guest crate expanding `export!`.
extern crate self as projector_sdk;

mod context;
mod event;
mod failure;
mod migrations;
mod params;
mod row;
#[cfg(not(target_arch = "wasm32"))]
mod runtime_tables;
#[cfg(not(target_arch = "wasm32"))]
mod sql_rules;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use context::{Context, EmitError, Level, Log, Rows, Sql, SqlError, State, StateError, Value};
pub use event::Event;
pub use failure::Failure;
pub use params::{Param, Params, ToParam};
pub use row::{Row, RowError};

/// A projection: builds its state from events and serves reads from it.
///
/// Every method runs inside a transaction the host owns: if it returns an
/// error (or panics), none of its writes are kept.
pub trait Projection {
    /// The version of the state this projection builds. Change it when the
    /// tables or their meaning change: the host then rebuilds the state from
    /// the log with the new module.
    const STATE_VERSION: u32 = 1;

    /// The schema's migrations, one SQL statement each, in order. Every
    /// `init` applies those the database has not had yet, before
    /// [`Projection::init`] runs, whether the state version changed or not:
    /// adding a column to a running projection is one more line here, and
    /// the module that carries it is swapped in without a rebuild.
    ///
    /// ```
    /// # use projector_sdk::{Context, Event, Failure, Projection};
    /// # struct Users;
    /// impl Projection for Users {
    ///     const MIGRATIONS: &'static [&'static str] = &[
    ///         "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT NOT NULL)",
    ///         "ALTER TABLE users ADD COLUMN name TEXT",
    ///     ];
    /// #   fn handle(_: &Context, _: &Event) -> Result<(), Failure> { Ok(()) }
    /// }
    /// ```
    ///
    /// The SDK records what it applied in its own table,
    /// `projector_sdk_migrations`, in `init`'s transaction. Migrations are
    /// append-only: one that was changed after it was applied, or a database
    /// that had more migrations than the module lists (an older module),
    /// fails `init` and the host keeps the module it runs. To start over,
    /// raise [`Projection::STATE_VERSION`]: the state is rebuilt from the log
    /// into a fresh database, where every migration runs.
    const MIGRATIONS: &'static [&'static str] = &[];

    /// Create (or migrate) tables, after [`Projection::MIGRATIONS`] are
    /// applied. `found` is the state version the database holds, or `None`
    /// for a new database.
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
    /// convention; [`query_json`] does the JSON for typed requests and
    /// answers); the context is read-only here.
    fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
        let _ = (ctx, request);
        Err("this projection serves no queries".to_string())
    }
}

/// Serve a [`Projection::query`] with typed JSON: `request` is parsed into
/// a `Q`, `answer` turns it into an `A`, and that is serialized back. A
/// request that does not parse is refused with what was wrong.
///
/// ```
/// # use projector_sdk::{Context, Event, Failure, Projection, query_json};
/// # use serde::{Deserialize, Serialize};
/// #[derive(Deserialize)]
/// struct Balance {
///     wallet_id: String,
/// }
///
/// #[derive(Serialize)]
/// struct BalanceAnswer {
///     balance: i64,
/// }
///
/// # struct Wallets;
/// impl Projection for Wallets {
/// #   fn handle(_: &Context, _: &Event) -> Result<(), Failure> { Ok(()) }
///     fn query(ctx: &Context, request: &[u8]) -> Result<Vec<u8>, String> {
///         query_json(request, |q: Balance| {
///             let balance = ctx
///                 .sql()
///                 .query_first("SELECT balance FROM wallets WHERE id = ?1", (&q.wallet_id,))?
///                 .unwrap_or(0);
///             Ok(BalanceAnswer { balance })
///         })
///     }
/// }
/// ```
pub fn query_json<Q, A>(
    request: &[u8],
    answer: impl FnOnce(Q) -> Result<A, String>,
) -> Result<Vec<u8>, String>
where
    Q: serde::de::DeserializeOwned,
    A: serde::Serialize,
{
    let request: Q = serde_json::from_slice(request)
        .map_err(|err| format!("the request is not a valid {}: {err}", event::short_type_name::<Q>()))?;
    let answer = answer(request)?;
    serde_json::to_vec(&answer).map_err(|err| format!("the answer does not serialize to JSON: {err}"))
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

            impl $crate::__private::PackedGuest for Export {
                fn handle(batch: $crate::__private::Vec<u8>) -> Result<(), $crate::__private::WitFailure> {
                    $crate::__private::handle_packed::<$projection>(batch)
                }
            }

            $crate::__private::bindings::__export_projection!(Export with_types_in $crate::__private::bindings);
        };
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __private;
// Used by `__private` only; a module of its own on every target so its
// tests run natively.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod text;
// As `text`: used by `__private` only, tested natively.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod packed;
