//! Test-only guest: misbehaves on demand, one way per event type, and
//! records every other event (like `event-recorder`) so a test can see it
//! kept processing.
//!
//! | type | does |
//! | --- | --- |
//! | `h-loop` | loops forever (the call deadline or fuel stops it) |
//! | `h-memory` | allocates until the memory cap traps it |
//! | `h-recurse` | recurses without end (stack overflow) |
//! | `h-panic` | panics |
//! | `h-sql` | runs its data (a string) as SQL; an error is a reject |
//! | `h-query` | runs its data (a string) as an SQL query; an error is a reject |
//! | `h-defer` | defers its data (a string) as SQL (`Sql::defer`); a statement that does not prepare is a reject |
//! | `h-defer-each` | defers each statement of its data (a list of strings) in turn, with nothing between them |
//! | `h-defer-then-panic` | defers its data (a string) as SQL, then panics |
//! | `h-log` | writes its data (a string) as one log line, then succeeds |
//! | `h-log-flood` | writes 100,000 log lines, then succeeds |
//! | `h-retry` | asks to retry until it has been called `data` times, then succeeds |
//! | `h-huge` | stores a value of `data` MiB |
//! | `h-huge-key` | stores a small value under a key of `data` MiB |
//! | `h-thirds` | rejects itself when its position is a multiple of 3 |
//! | `h-needs-unlock` | rejects unless an `h-unlock` event came before it |
//! | `h-unlock` | records that later `h-needs-unlock` events may pass |

const STATE: u32 = 1;

include!("logic.rs");
