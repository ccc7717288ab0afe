//! The sandbox: the wasm engine and its limits ([`engine`]), the host
//! functions a module may call ([`host`]), and one module's instance over
//! one projection database ([`instance`]).

mod deferred;
pub mod engine;
pub mod host;
pub mod instance;
