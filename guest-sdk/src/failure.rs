//! [`Failure`]: why a projection could not apply an event.

use std::fmt;

/// Why a projection could not apply an event. The host rolls back every
/// write of the batch in either case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A transient failure: the host backs off and hands the same events
    /// again.
    Retry(String),
    /// This event can never be applied: the host parks it as a dead letter
    /// (or halts the projection, by its policy) and goes on.
    Reject(String),
}

impl Failure {
    /// A transient failure with a reason.
    pub fn retry(reason: impl Into<String>) -> Self {
        Failure::Retry(reason.into())
    }
    /// A permanent failure with a reason.
    pub fn reject(reason: impl Into<String>) -> Self {
        Failure::Reject(reason.into())
    }
    /// The reason given.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Retry(reason) | Failure::Reject(reason) => reason,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Retry(reason) => write!(f, "retry: {reason}"),
            Failure::Reject(reason) => write!(f, "reject: {reason}"),
        }
    }
}

impl std::error::Error for Failure {}
