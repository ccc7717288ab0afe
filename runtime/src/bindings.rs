//! The host side of the `projection` world, generated from
//! `guest-sdk/wit/` — the one definition of the boundary. The generated
//! code stays private; the rest of the runtime uses the names re-exported
//! here.

mod generated {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "projection",
        // A host import fails only when the host itself cannot go on (its
        // database broke): that is a trap, not a guest-visible error.
        imports: { default: trappable },
        anyhow: true,
    });
}

pub use generated::projector::projection::batch::Host as BatchHost;
pub use generated::projector::projection::deferred::Host as DeferredHost;
pub use generated::projector::projection::deferred_packed::Host as DeferredPackedHost;
pub use generated::projector::projection::emit::Host as EmitHost;
pub use generated::projector::projection::log::{Host as LogHost, Level};
pub use generated::projector::projection::prepared::{Host as PreparedHost, Statement};
pub use generated::projector::projection::sql::{Host as SqlHost, Rows, Value};
pub use generated::projector::projection::state::Host as StateHost;
pub use generated::projector::projection::types::{Event, Failure, Host as TypesHost};
pub use generated::{Projection, ProjectionPre};
