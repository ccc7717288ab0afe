//! [`LiveProjection`]: what a running projection shares with the rest of
//! the host — its state, rate, last error, fault and current module, the
//! host's [`Metrics`] — and the one way to steer it: a [`Command`] on its
//! channel.

use crate::projection::fault::{Fault, FaultFile};
use crate::projection::metrics::Metrics;
use crate::projection::runner::ModuleUpdate;
use crate::sandbox::engine::LoadedModule;
use crate::sources::Wake;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a projection is told to do; it acts between two batches.
pub enum Command {
    /// Stop taking batches (reads still served) until [`Command::Resume`].
    Pause,
    /// Take batches again.
    Resume,
    /// Build the state again from the source into a new generation of the
    /// database, with the running module, while it keeps serving.
    Rebuild,
    /// A module file changed: swap it in (or record why it was refused).
    Swap(ModuleUpdate),
    /// Finish the batch in flight and return.
    Stop,
}

/// What a projection is doing, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Starting (loading its module, or rebuilding before it can run).
    Starting,
    /// Taking batches.
    Running,
    /// Paused by an operator.
    Paused,
    /// Its source cannot be reached: trying again.
    Connecting,
    /// Stopped.
    Stopped,
    /// Halted by an error it cannot get past.
    Faulted,
}

impl RunState {
    /// As status and the database's `state` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Connecting => "connecting",
            RunState::Stopped => "stopped",
            RunState::Faulted => "faulted",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One running projection, as the rest of the host sees it.
pub struct LiveProjection {
    /// The projection's name.
    pub name: String,
    /// The host's metrics.
    pub metrics: Arc<Metrics>,
    commands: Mutex<Option<Sender<Command>>>,
    /// Set with [`Command::Stop`], for the long loops that take no commands
    /// (a rebuild before the projection starts).
    stopping: Arc<AtomicBool>,
    waker: Mutex<Option<Arc<dyn Wake>>>,
    state: Mutex<RunState>,
    module: Mutex<Option<LoadedModule>>,
    last_error: Mutex<Option<String>>,
    rate: Mutex<Rate>,
    fault_file: Mutex<Option<FaultFile>>,
    /// Whether a fault is on record (so the loop's check is one load).
    faulted: AtomicBool,
}

/// Events per second over the last full second.
struct Rate {
    window_start: Instant,
    in_window: u64,
    per_second: f64,
}

const RATE_WINDOW: Duration = Duration::from_secs(1);

impl LiveProjection {
    /// A projection not yet started.
    pub fn new(name: &str, metrics: Arc<Metrics>) -> Self {
        LiveProjection {
            name: name.to_string(),
            metrics,
            commands: Mutex::new(None),
            stopping: Arc::new(AtomicBool::new(false)),
            waker: Mutex::new(None),
            state: Mutex::new(RunState::Starting),
            module: Mutex::new(None),
            last_error: Mutex::new(None),
            rate: Mutex::new(Rate { window_start: Instant::now(), in_window: 0, per_second: 0.0 }),
            fault_file: Mutex::new(None),
            faulted: AtomicBool::new(false),
        }
    }

    /// Where this projection's faults are recorded; one from the last run
    /// stays on record until it makes progress again.
    pub fn set_fault_file(&self, file: FaultFile) {
        self.faulted.store(file.read().is_some(), Ordering::Relaxed);
        *self.fault_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    }

    /// Record `fault`: the state is `faulted` with its error, here and in
    /// the fault file, for `status` to read from another process.
    pub fn record_fault(&self, fault: &Fault) {
        self.set_state(RunState::Faulted);
        self.set_last_error(Some(fault.error.clone()));
        self.faulted.store(true, Ordering::Relaxed);
        if let Some(file) = &*self.fault_file.lock().unwrap_or_else(|e| e.into_inner())
            && let Err(err) = file.record(fault)
        {
            tracing::error!(projection = %self.name, file = %file.path().display(), "cannot record the fault: {err}");
        }
    }

    /// The projection made progress: a fault on record is over. True if
    /// there was one.
    pub fn clear_fault(&self) -> bool {
        if !self.faulted.swap(false, Ordering::Relaxed) {
            return false;
        }
        if let Some(file) = &*self.fault_file.lock().unwrap_or_else(|e| e.into_inner())
            && let Err(err) = file.clear()
        {
            tracing::warn!(projection = %self.name, file = %file.path().display(), "cannot clear the fault: {err}");
        }
        self.set_last_error(None);
        true
    }

    /// Count `events` committed in one batch that took `elapsed`.
    pub fn record_batch(&self, events: usize, elapsed: Duration) {
        self.metrics.events_processed.get_or_create(&Metrics::label(&self.name)).inc_by(events as u64);
        self.metrics.batch_seconds.observe(elapsed.as_secs_f64());
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        rate.in_window += events as u64;
        rate.roll();
    }

    /// Events per second over the last second (0 when idle).
    pub fn events_per_second(&self) -> f64 {
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        rate.roll();
        if rate.window_start.elapsed() > 2 * RATE_WINDOW { 0.0 } else { rate.per_second }
    }

    /// Remember the last failure the module or the host reported.
    pub fn set_last_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// The last failure, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The projection's command channel: the receiving end, for its
    /// runner; commands sent before stay queued.
    pub fn open_commands(&self) -> Receiver<Command> {
        let (sender, receiver) = channel();
        *self.commands.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        receiver
    }

    /// Tell the projection to do something, between two batches; wakes it
    /// if it waits for events. False if it no longer runs.
    pub fn send(&self, command: Command) -> bool {
        if matches!(command, Command::Stop) {
            self.stopping.store(true, Ordering::Relaxed);
        }
        let sent = match &*self.commands.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(sender) => sender.send(command).is_ok(),
            None => false,
        };
        if let Some(waker) = &*self.waker.lock().unwrap_or_else(|e| e.into_inner()) {
            waker.wake();
        }
        sent
    }

    /// The flag [`Command::Stop`] sets.
    pub fn stopping(&self) -> Arc<AtomicBool> {
        self.stopping.clone()
    }

    /// What wakes the projection's source read (set by its runner).
    pub fn set_waker(&self, waker: Arc<dyn Wake>) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
    }

    /// What it is doing.
    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record what it is doing.
    pub fn set_state(&self, state: RunState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// Publish the module now running.
    pub fn set_module(&self, module: LoadedModule) {
        *self.module.lock().unwrap_or_else(|e| e.into_inner()) = Some(module);
    }

    /// The module now running, once started.
    pub fn module(&self) -> Option<LoadedModule> {
        self.module.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Rate {
    fn roll(&mut self) {
        let elapsed = self.window_start.elapsed();
        if elapsed >= RATE_WINDOW {
            self.per_second = self.in_window as f64 / elapsed.as_secs_f64();
            self.in_window = 0;
            self.window_start = Instant::now();
        }
    }
}
