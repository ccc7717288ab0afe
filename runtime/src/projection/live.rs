//! [`LiveProjection`]: what a running projection shares with the HTTP API —
//! its rate, last error, pause switch and current module — and the host's
//! [`Metrics`].

use crate::projection::metrics::Metrics;
use crate::sandbox::engine::LoadedModule;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One running projection, as the rest of the host sees it.
pub struct LiveProjection {
    /// The projection's name.
    pub name: String,
    /// The host's metrics.
    pub metrics: Arc<Metrics>,
    paused: AtomicBool,
    module: Mutex<Option<LoadedModule>>,
    last_error: Mutex<Option<String>>,
    rate: Mutex<Rate>,
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
            paused: AtomicBool::new(false),
            module: Mutex::new(None),
            last_error: Mutex::new(None),
            rate: Mutex::new(Rate { window_start: Instant::now(), in_window: 0, per_second: 0.0 }),
        }
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

    /// Pause or resume processing (between batches).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Whether processing is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
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
