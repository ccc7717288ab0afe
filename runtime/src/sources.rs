//! Where events come from: the embedded log ([`embedded`]), and the
//! CloudEvents parsing every source shares ([`cloudevents`]).

pub mod cloudevents;
pub mod embedded;
