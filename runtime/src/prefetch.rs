//! [`Prefetcher`]: reads a projection's next batch from the event log on a
//! thread of its own while the projection's thread applies the current one.
//!
//! Reading a batch (an SQLite range scan, then copying every event out) is
//! a good share of what handling it costs; on a machine with a second core
//! the two overlap instead of taking turns. The log is append-only, so a
//! batch read early is the same batch read late: the only thing to check
//! is that it starts where the checkpoint now is (a split, a park, a stop
//! or a rebuild's take-over may have left it elsewhere). A prefetched batch
//! that does not fit is dropped and the projection reads for itself.

use crate::event_log::{Batch, EventLog, Filter};
use anyhow::Result;
use std::sync::mpsc;

/// The read-ahead of one projection.
pub struct Prefetcher {
    requests: mpsc::Sender<u64>,
    batches: mpsc::Receiver<(u64, Result<Batch>)>,
    /// The position after which the batch in flight was asked for.
    pending: Option<u64>,
}

impl Prefetcher {
    /// A reader thread over `log` reading up to `limit` events of `filter`
    /// at a time. It ends when the prefetcher is dropped.
    pub fn start(log: &EventLog, filter: Filter, limit: usize, projection: &str) -> Result<Self> {
        let mut reader = log.reader()?;
        let (requests, asked) = mpsc::channel::<u64>();
        let (answer, batches) = mpsc::channel();
        std::thread::Builder::new().name(format!("prefetch {projection}")).spawn(move || {
            for after in asked {
                if answer.send((after, reader.read_after(after, &filter, limit))).is_err() {
                    break;
                }
            }
        })?;
        Ok(Prefetcher { requests, batches, pending: None })
    }

    /// Start reading the batch after `after`, unless a read is in flight.
    pub fn request(&mut self, after: u64) {
        if self.pending.is_none() && self.requests.send(after).is_ok() {
            self.pending = Some(after);
        }
    }

    /// The batch after `after`, if that is the one in flight (waiting for
    /// it to be read); `None` when nothing, or another batch, was asked for.
    pub fn take(&mut self, after: u64) -> Option<Result<Batch>> {
        self.pending.take()?;
        let (asked, batch) = self.batches.recv().ok()?;
        (asked == after).then_some(batch)
    }
}
