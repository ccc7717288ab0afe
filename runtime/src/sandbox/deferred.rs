//! [`Db`]: the projection's database as a [`GuestHost`](super::host::GuestHost)
//! holds it, with the statements the guest deferred (`deferred.execute`)
//! run in order on a thread of their own while the guest goes on: a
//! module's decoding and SQLite's work on its writes overlap on two cores.
//!
//! The database is shared with that thread by one rule: the thread touches
//! it only while deferred statements are queued or running, and the
//! instance's thread only once they are all done ([`Db::settle`], which
//! every access waits for). Queuing takes `&mut`, so no reference into the
//! database is alive while the thread may use it.

use super::host::{Broke, Database, GUEST_SQL_PREFIX, GuestRules, conclude, execute_kept, truncated};
use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// Deferred statements queued before the thread is woken for them: one
/// wake a chunk, not one a statement.
const CHUNK: usize = 128;

/// Deferred statements queued at most, and their parameters' bytes: past
/// either the guest waits for the thread, so a module that defers in a
/// loop, or defers big values, holds the host's memory to a bound (twice
/// this at most: what is queued, and what the thread runs).
const MOST_QUEUED: usize = 4096;
const MOST_QUEUED_BYTES: usize = 8 << 20;

/// Statements deferred, their parameters end to end and the parameters'
/// text and blobs in one buffer: the writer reads what the guest's thread
/// wrote in a few sequential runs, not a string of its own per parameter,
/// and nothing is freed from one batch of statements to the next.
#[derive(Default)]
struct Statements {
    ops: Vec<Op>,
    params: Vec<Param>,
    bytes: Vec<u8>,
}

/// The bytes of statements a writer with nothing queued keeps allocated,
/// in the queue and in the spare it runs from each.
const KEPT_IDLE: usize = 64 << 10;

/// A statement deferred: its handle and its parameters in
/// [`Statements::params`].
struct Op {
    handle: u32,
    params: Range<usize>,
}

/// A parameter of a deferred statement; text and blobs are ranges of
/// [`Statements::bytes`].
enum Param {
    Null,
    Integer(i64),
    Real(f64),
    Text(Range<usize>),
    Blob(Range<usize>),
}

/// A parameter bound from the buffer it is in.
struct Bound<'a>(&'a Param, &'a [u8]);

impl ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        let Bound(param, bytes) = self;
        Ok(ToSqlOutput::Borrowed(match param {
            Param::Null => ValueRef::Null,
            Param::Integer(n) => ValueRef::Integer(*n),
            Param::Real(x) => ValueRef::Real(*x),
            Param::Text(range) => ValueRef::Text(&bytes[range.clone()]),
            Param::Blob(range) => ValueRef::Blob(&bytes[range.clone()]),
        }))
    }
}

impl Statements {
    fn len(&self) -> usize {
        self.ops.len()
    }

    fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn push<'a>(&mut self, handle: u32, params: impl Iterator<Item = ValueRef<'a>>) {
        let start = self.params.len();
        for value in params {
            let mut append = |data: &[u8]| {
                let at = self.bytes.len();
                self.bytes.extend_from_slice(data);
                at..self.bytes.len()
            };
            self.params.push(match value {
                ValueRef::Null => Param::Null,
                ValueRef::Integer(n) => Param::Integer(n),
                ValueRef::Real(x) => Param::Real(x),
                ValueRef::Text(text) => Param::Text(append(text)),
                ValueRef::Blob(blob) => Param::Blob(append(blob)),
            });
        }
        self.ops.push(Op { handle, params: start..self.params.len() });
    }

    /// Op `op`'s parameters, ready to bind.
    fn bound<'a>(&'a self, op: &'a Op) -> impl Iterator<Item = Bound<'a>> {
        self.params[op.params.clone()].iter().map(|param| Bound(param, &self.bytes))
    }

    /// Empty, and let go of what was allocated past [`KEPT_IDLE`].
    fn trim(&mut self) {
        if self.held() > KEPT_IDLE {
            *self = Statements::default();
        }
    }

    /// The bytes allocated for statements.
    fn held(&self) -> usize {
        self.ops.capacity() * size_of::<Op>()
            + self.params.capacity() * size_of::<Param>()
            + self.bytes.capacity()
    }

    /// Empty, keeping what was allocated.
    fn clear(&mut self) {
        self.ops.clear();
        self.params.clear();
        self.bytes.clear();
    }
}

/// How the deferred statements failed: the first failure; those queued
/// after it are dropped unrun, as the batch rolls back.
pub enum Failed {
    /// The statement failed or was refused: the guest's failure.
    Guest(String),
    /// It stopped the call (a deadline, a rolled-back transaction).
    Broke(Broke),
}

/// The database, reachable from the instance's thread and the writer's.
struct Shared(UnsafeCell<Database>);

// SAFETY: the two threads never reach the database at once — the writer
// only while `Queue` holds statements or `running` is set, the instance's
// thread only after `Db::settle` saw neither — and the queue's mutex
// orders each hand-over. `Database` is `Send` (see its own note).
#[allow(unsafe_code)]
unsafe impl Sync for Shared {}

/// What the two threads share under one mutex.
#[derive(Default)]
struct Queue {
    ops: Statements,
    /// What the writer ran last, emptied, for the next swap.
    spare: Statements,
    /// The bytes of `ops`' parameters, as [`size`] counts them.
    bytes: usize,
    /// The most `bytes` has been.
    #[cfg(test)]
    peak_bytes: usize,
    /// The writer took statements off the queue and runs them.
    running: bool,
    /// The writer waits for work.
    sleeping: bool,
    failure: Option<Failed>,
    stop: bool,
}

struct Writer {
    queue: Arc<(Mutex<Queue>, Condvar, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// The projection's database and the guest's deferred statements.
pub struct Db {
    shared: Arc<Shared>,
    rules: GuestRules,
    /// Started on the first deferred statement.
    writer: Option<Writer>,
    /// Statements were deferred since the last settle.
    outstanding: Cell<bool>,
    /// A failure found when a statement was deferred (a bad handle).
    failure: Option<Failed>,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Db {
    pub fn new(database: Database, rules: GuestRules) -> Self {
        Db {
            shared: Arc::new(Shared(UnsafeCell::new(database))),
            rules,
            writer: None,
            outstanding: Cell::new(false),
            failure: None,
        }
    }

    /// The database, once every deferred statement has run.
    pub fn get(&self) -> &Database {
        self.settle();
        // SAFETY: settled, the writer does not touch the database until
        // `defer`, which takes `&mut self` and so outlives no `&` from here.
        #[allow(unsafe_code)]
        unsafe {
            &*self.shared.0.get()
        }
    }

    /// The database, once every deferred statement has run.
    pub fn get_mut(&mut self) -> &mut Database {
        self.settle();
        // SAFETY: as in `get`; `&mut self` makes this the only reference.
        #[allow(unsafe_code)]
        unsafe {
            &mut *self.shared.0.get()
        }
    }

    /// Queue prepared statement `handle` with `params` (text as UTF-8) for
    /// the writer.
    pub fn defer<'a>(
        &mut self,
        handle: u32,
        params: impl Iterator<Item = ValueRef<'a>> + Clone,
    ) -> std::io::Result<()> {
        if self.writer.is_none() {
            let queue = Arc::new((Mutex::new(Queue::default()), Condvar::new(), Condvar::new()));
            let (shared, rules, ours) = (self.shared.clone(), self.rules.clone(), queue.clone());
            let thread = std::thread::Builder::new()
                .name("deferred-sql".into())
                .spawn(move || write(&shared, &rules, &ours))?;
            self.writer = Some(Writer { queue, thread: Some(thread) });
        }
        let Some(writer) = &self.writer else { unreachable!("started above") };
        let (queue, work, idle) = &*writer.queue;
        let size = size(params.clone());
        let mut state = lock(queue);
        while !state.ops.is_empty()
            && (state.ops.len() >= MOST_QUEUED || state.bytes + size > MOST_QUEUED_BYTES)
        {
            work.notify_one();
            state = idle.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.ops.push(handle, params);
        state.bytes += size;
        #[cfg(test)]
        {
            state.peak_bytes = state.peak_bytes.max(state.bytes);
        }
        if state.sleeping && state.ops.len() >= CHUNK {
            work.notify_one();
        }
        self.outstanding.set(true);
        Ok(())
    }

    /// Wait until every deferred statement has run.
    pub fn settle(&self) {
        if !self.outstanding.get() {
            return;
        }
        let Some(writer) = &self.writer else { return };
        let (queue, work, idle) = &*writer.queue;
        let mut state = lock(queue);
        if !state.ops.is_empty() {
            work.notify_one();
        }
        while !state.ops.is_empty() || state.running {
            state = idle.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        self.outstanding.set(false);
    }

    /// Settle, and take how the deferred statements failed, if one did.
    pub fn take_failure(&mut self) -> Option<Failed> {
        self.settle();
        let ran = self.writer.as_ref().and_then(|writer| lock(&writer.queue.0).failure.take());
        self.failure.take().or(ran)
    }

    /// Record a failure as the writer would: a bad handle, found when
    /// deferred.
    pub fn fail(&mut self, failed: Failed) {
        self.failure.get_or_insert(failed);
    }

    /// The bytes held for statements once the writer waits for work.
    #[cfg(test)]
    pub fn held_when_idle(&self) -> usize {
        let Some(writer) = &self.writer else { return 0 };
        let waited = std::time::Instant::now();
        loop {
            let state = lock(&writer.queue.0);
            if state.sleeping {
                return state.ops.held() + state.spare.held();
            }
            drop(state);
            assert!(waited.elapsed() < std::time::Duration::from_secs(10), "the writer never went idle");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The most bytes of parameters the queue has held.
    #[cfg(test)]
    pub fn peak_queued_bytes(&self) -> usize {
        self.writer.as_ref().map_or(0, |writer| lock(&writer.queue.0).peak_bytes)
    }
}

/// What a statement's parameters weigh in the queue.
fn size<'a>(params: impl Iterator<Item = ValueRef<'a>>) -> usize {
    let heap = |value: ValueRef<'_>| match value {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => bytes.len(),
        _ => 0,
    };
    params.map(|value| size_of::<Param>() + heap(value)).sum()
}

impl Drop for Db {
    fn drop(&mut self) {
        let Some(writer) = &mut self.writer else { return };
        {
            let (queue, work, _) = &*writer.queue;
            lock(queue).stop = true;
            work.notify_one();
        }
        if let Some(thread) = writer.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer: run what is queued, in order, until told to stop.
fn write(shared: &Shared, rules: &GuestRules, queue: &(Mutex<Queue>, Condvar, Condvar)) {
    let (queue, work, idle) = queue;
    let mut state = lock(queue);
    loop {
        if state.ops.is_empty() {
            if state.stop {
                return;
            }
            // Idle, nothing big is kept: a hundred projections that caught
            // up must not each hold their last big batch's statements.
            state.ops.trim();
            state.spare.trim();
            state.sleeping = true;
            state = work.wait(state).unwrap_or_else(PoisonError::into_inner);
            state.sleeping = false;
            continue;
        }
        let spare = std::mem::take(&mut state.spare);
        let mut ops = std::mem::replace(&mut state.ops, spare);
        state.bytes = 0;
        state.running = true;
        let failed_before = state.failure.is_some();
        drop(state);
        idle.notify_all();
        // SAFETY: `running` is set: the instance's thread waits.
        #[allow(unsafe_code)]
        let ran = (!failed_before).then(|| {
            std::panic::catch_unwind(AssertUnwindSafe(|| run(unsafe { &mut *shared.0.get() }, rules, &ops)))
        });
        let failed = match ran {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(failed))) => Some(failed),
            // Never left waiting: the call traps, and the instance is made anew.
            Some(Err(_)) => Some(Failed::Broke(Broke::Trap(anyhow::anyhow!(
                "the host's thread of deferred statements failed running one"
            )))),
        };
        ops.clear();
        state = lock(queue);
        state.spare = ops;
        state.running = false;
        if let Some(failed) = failed {
            state.failure.get_or_insert(failed);
        }
        if state.ops.is_empty() {
            idle.notify_all();
        }
    }
}

/// Run `ops` on `database` as the guest's; the first failure ends them.
fn run(database: &mut Database, rules: &GuestRules, statements: &Statements) -> Option<Failed> {
    for op in &statements.ops {
        let in_transaction = !database.borrow_owner().is_autocommit();
        rules.begin();
        let result = database.with_dependent_mut(|db, kept| {
            execute_kept(db, kept, op.handle, rusqlite::params_from_iter(statements.bound(op)))
        });
        rules.end();
        // The text only for an error: it names the statement.
        let text = match &result {
            Ok(_) => None,
            Err(_) => Some(database.borrow_dependent()[op.handle as usize].text.clone()),
        };
        let statement = text.as_deref().map_or("", |text| &text[GUEST_SQL_PREFIX.len()..]);
        match conclude(database.borrow_owner(), rules, statement, in_transaction, result) {
            Ok(Ok(_)) => {}
            Ok(Err(message)) => {
                return Some(Failed::Guest(format!(
                    "deferred statement {:?} failed: {message}",
                    truncated(statement, 200)
                )));
            }
            Err(broke) => return Some(Failed::Broke(broke)),
        }
    }
    None
}
