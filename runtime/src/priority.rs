//! Reads before bulk work: the threads that process batches and that parse
//! and append ingested events run at a lower scheduling priority (nice 10)
//! than the threads serving reads.
//!
//! On a small machine, processing and ingest would otherwise hold both
//! cores while a query waits for one. The scheduler still gives bulk work
//! every cycle the reads leave idle, so nothing is slower when nobody reads.

/// The niceness of bulk work: when both want a core, a read thread weighs
/// about ten times as much as a bulk thread.
const BULK_NICENESS: i32 = 10;

/// Lower the calling thread to bulk priority (Linux; elsewhere nothing).
/// Threads it starts afterwards inherit it. Only for threads of their own:
/// without privileges a thread cannot be raised back.
pub fn lower_current_thread() {
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BULK_NICENESS) {
        tracing::debug!("cannot lower this thread's priority: {err}");
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn a_lowered_thread_runs_at_bulk_niceness_and_its_children_inherit_it() {
        let niceness = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let before = niceness();
        let (lowered, child) = std::thread::spawn(move || {
            super::lower_current_thread();
            (niceness(), std::thread::spawn(niceness).join().unwrap())
        })
        .join()
        .unwrap();
        let bulk = super::BULK_NICENESS.max(before);
        assert_eq!((lowered, child), (bulk, bulk), "the thread and the threads it starts");
        assert_eq!(niceness(), before, "only the thread that asked is lowered");
    }
}
