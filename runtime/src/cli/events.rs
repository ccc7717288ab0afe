//! `projector events`: print a stream of the embedded log as CloudEvents
//! JSON, one event per line — what was appended, and what projections
//! published from their outboxes — and, with `--follow`, keep printing what
//! is appended until interrupted. It reads the log read-only, so it works
//! while `run` runs.

use crate::sources::cloudevents;
use crate::sources::embedded::{POLL_INTERVAL, StreamReader};
use anyhow::{Context as _, Result};
use std::io::Write as _;
use std::path::Path;

/// Events read and printed at once.
const READ_AT_ONCE: usize = 1000;

/// Print stream `stream` of the log in `data` from its position `from` on
/// (the first event is 1), and with `follow` wait for more.
pub fn print_stream(data: &Path, stream: &str, from: u64, follow: bool) -> Result<()> {
    let mut reader = StreamReader::open(data, stream)?;
    let mut next = from.max(1);
    let stdout = std::io::stdout();
    loop {
        let events = reader.read_from(next, READ_AT_ONCE)?;
        let mut out = stdout.lock();
        for (position, event) in &events {
            let written = serde_json::to_writer(&mut out, &cloudevents::to_json(event))
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            if let Err(err) = written {
                return closed_or(err);
            }
            next = position + 1;
        }
        if let Err(err) = out.flush() {
            return closed_or(err);
        }
        drop(out);
        if events.len() < READ_AT_ONCE {
            if !follow {
                return Ok(());
            }
            // Appends come from other processes: nothing wakes this one.
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// A reader that went away (`| head`) ends the listing; any other write
/// error is one.
fn closed_or(err: std::io::Error) -> Result<()> {
    match err.kind() {
        std::io::ErrorKind::BrokenPipe => Ok(()),
        _ => Err(err).context("cannot write to standard output"),
    }
}
