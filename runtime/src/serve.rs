//! Reads for people and programs: the HTTP API and status page ([`http`]),
//! and status, state and queries read from the files ([`inspect`]).

pub mod http;
pub mod inspect;
