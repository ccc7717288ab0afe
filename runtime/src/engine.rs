//! The wasmtime engine wrapper: one [`Engine`] and [`Linker`] per host, and
//! loading a module file into a ready-to-instantiate [`LoadedModule`].
//!
//! A module is either a component, or a core module built with wit-bindgen
//! for `wasm32-unknown-unknown` that carries its component type; the latter
//! is turned into a component here (wit-component), so a plain `cargo build`
//! output deploys as is. Either way it must implement the `projection` world.
//!
//! The sandbox's limits live here too: [`Limits`] (memory, a wall-clock
//! deadline per call through epoch interruption, optional fuel, tables,
//! instances, value sizes, guest log rate) and how a broken limit reads.
//! Epoch interruption only fires in wasm code, so arming a call also hands
//! its deadline to the [`GuestHost`], whose SQLite progress handler stops
//! guest SQL that outlives it.

use crate::bindings::{Projection, ProjectionPre};
use crate::config::LimitsConfig;
use crate::guest_host::GuestHost;
use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap};

/// How often the engine's epoch advances: the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The limits one projection's instances run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory cap per instance, bytes.
    pub memory_bytes: usize,
    /// Wall-clock deadline per guest call.
    pub call_timeout: Duration,
    /// Fuel per guest call; `None`: unmetered.
    pub fuel: Option<u64>,
    /// Table elements cap per table.
    pub table_elements: usize,
    /// Instances, tables and memories cap per store.
    pub instances: usize,
    /// Largest key + value, SQL text or blob parameter, bytes.
    pub value_bytes: usize,
    /// Guest log lines per second.
    pub log_lines_per_second: u64,
    /// Longest guest log line, bytes.
    pub log_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::resolve(&LimitsConfig::default(), &LimitsConfig::default()).expect("defaults are valid")
    }
}

impl Limits {
    /// `overrides`, falling back to `defaults`, then to the built-in values.
    pub fn resolve(defaults: &LimitsConfig, overrides: &LimitsConfig) -> Result<Limits, String> {
        fn pick(name: &str, a: Option<u64>, b: Option<u64>, builtin: u64, max: u64) -> Result<u64, String> {
            let value = a.or(b).unwrap_or(builtin);
            if value == 0 || value > max {
                return Err(format!("{name} = {value} is out of range; use 1 to {max}"));
            }
            Ok(value)
        }
        let (o, d) = (overrides, defaults);
        Ok(Limits {
            memory_bytes: (pick("memory_mib", o.memory_mib, d.memory_mib, 64, 4096)? << 20) as usize,
            call_timeout: Duration::from_millis(pick(
                "call_timeout_ms",
                o.call_timeout_ms,
                d.call_timeout_ms,
                5000,
                3_600_000,
            )?),
            fuel: match o.fuel.or(d.fuel) {
                Some(0) => return Err("fuel = 0 is out of range; use at least 1".into()),
                fuel => fuel,
            },
            table_elements: pick("table_elements", o.table_elements, d.table_elements, 20_000, 10_000_000)?
                as usize,
            instances: pick("instances", o.instances, d.instances, 16, 10_000)? as usize,
            value_bytes: (pick("value_kib", o.value_kib, d.value_kib, 1024, 1 << 20)? << 10) as usize,
            log_lines_per_second: pick(
                "log_lines_per_second",
                o.log_lines_per_second,
                d.log_lines_per_second,
                100,
                1_000_000,
            )?,
            log_line_bytes: pick("log_line_bytes", o.log_line_bytes, d.log_line_bytes, 4096, 1 << 20)?
                as usize,
        })
    }

    /// Arm `store` for one guest call: a fresh deadline, for its wasm code
    /// (the epoch) and its SQL (the host's progress handler), and fuel.
    pub fn arm(&self, store: &mut Store<GuestHost>, fuel_enabled: bool) -> Result<()> {
        let ticks = self.call_timeout.as_millis().div_ceil(EPOCH_TICK.as_millis()).max(1);
        store.set_epoch_deadline(ticks as u64);
        store.data().set_call_deadline(Instant::now() + self.call_timeout);
        if fuel_enabled {
            store.set_fuel(self.fuel.unwrap_or(u64::MAX)).map_err(anyhow::Error::from)?;
        }
        Ok(())
    }

    /// Say what a trap means, naming the limit it broke, if it broke one.
    ///
    /// Guest SQL stopped at the deadline traps with [`Trap::Interrupt`] too
    /// (see `GuestHost`), so both read the same.
    pub fn describe_trap(&self, err: wasmtime::Error) -> String {
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => format!(
                "the call ran past its deadline of {} ms (limits.call_timeout_ms)",
                self.call_timeout.as_millis()
            ),
            Some(Trap::OutOfFuel) => {
                format!("the call ran out of fuel ({} units, limits.fuel)", self.fuel.unwrap_or(0))
            }
            Some(Trap::StackOverflow) => "wasm stack overflow (unbounded recursion?)".to_string(),
            Some(Trap::UnreachableCodeReached) => {
                "module trapped: wasm `unreachable` executed (a panic or abort in the module)".into()
            }
            Some(trap) => format!("module trapped: {trap}"),
            // Not a wasm trap: an import refused (a broken limit) — its
            // message says which. Keep the chain, without the backtrace.
            None => {
                let err = anyhow::Error::from(err);
                let chain: Vec<String> = err
                    .chain()
                    .map(|cause| cause.to_string())
                    .filter(|line| !line.starts_with("error while executing at wasm backtrace"))
                    .collect();
                format!("module trapped: {}", chain.join(": "))
            }
        }
    }
}

/// The engine, with the world's imports linked to [`GuestHost`], and the
/// thread that advances its epoch so call deadlines fire.
pub struct ProjectorEngine {
    engine: Engine,
    linker: Linker<GuestHost>,
    fuel: bool,
    ticker_stop: Arc<AtomicBool>,
    cache: Option<PathBuf>,
}

impl Drop for ProjectorEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// The host's engines: a plain one, and one metering fuel for the
/// projections that set `limits.fuel`. Fuel metering slows every instance of
/// its engine by 10–17%, so it is made only when a projection asks for it,
/// and a projection without a fuel limit never pays for its neighbour's.
#[derive(Clone)]
pub struct Engines {
    plain: Arc<ProjectorEngine>,
    metered: Arc<std::sync::OnceLock<Arc<ProjectorEngine>>>,
    cache: Option<PathBuf>,
}

impl Engines {
    /// The plain engine now, the metered one when first asked for; both
    /// keep compiled modules in `cache`, if given.
    pub fn new(cache: Option<PathBuf>) -> Result<Self> {
        let plain = ProjectorEngine::new(false)?;
        let plain = match &cache {
            Some(dir) => plain.with_cache(dir.clone()),
            None => plain,
        };
        Ok(Engines { plain: Arc::new(plain), metered: Arc::default(), cache })
    }

    /// The engine without fuel metering.
    pub fn plain(&self) -> &Arc<ProjectorEngine> {
        &self.plain
    }

    /// The engine a projection with `limits` runs on.
    pub fn for_limits(&self, limits: &Limits) -> Result<Arc<ProjectorEngine>> {
        if limits.fuel.is_none() {
            return Ok(self.plain.clone());
        }
        if let Some(metered) = self.metered.get() {
            return Ok(metered.clone());
        }
        let metered = ProjectorEngine::new(true).context("cannot make the fuel-metering engine")?;
        let metered = match &self.cache {
            Some(dir) => metered.with_cache(dir.clone()),
            None => metered,
        };
        Ok(self.metered.get_or_init(|| Arc::new(metered)).clone())
    }
}

/// A module compiled, linked and checked against the world.
#[derive(Clone)]
pub struct LoadedModule {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// The sha256 of the file's bytes, hex.
    pub sha256: String,
    /// Ready to instantiate; cheap to do again after a trap.
    pub pre: ProjectionPre<GuestHost>,
    /// Whether it came from the compiled-module cache (not compiled now).
    pub from_cache: bool,
}

impl ProjectorEngine {
    /// An engine with the host's settings; `fuel` turns on fuel metering
    /// (needed when any projection sets `limits.fuel`).
    pub fn new(fuel: bool) -> Result<Self> {
        let mut config = Config::new();
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        config.epoch_interruption(true);
        config.consume_fuel(fuel);
        let engine =
            Engine::new(&config).map_err(anyhow::Error::from).context("creating the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        Projection::add_to_linker::<GuestHost, HasSelf<GuestHost>>(&mut linker, |host| host)
            .map_err(anyhow::Error::from)
            .context("linking the projection world's imports")?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticking, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .context("cannot start the epoch ticker")?;
        Ok(ProjectorEngine { engine, linker, fuel, ticker_stop, cache: None })
    }

    /// Keep compiled modules in `dir`, keyed by the module's sha256, so a
    /// module already seen is deserialized instead of compiled again.
    pub fn with_cache(mut self, dir: PathBuf) -> Self {
        self.cache = Some(dir);
        self
    }

    /// Whether fuel is metered.
    pub fn fuel_enabled(&self) -> bool {
        self.fuel
    }

    /// The underlying engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Read, compile, link and check the module at `path`.
    pub fn load_file(&self, path: &Path) -> Result<LoadedModule> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read module {}", path.display()))?;
        self.load_bytes(&bytes, path)
    }

    /// Compile, link and check `bytes`, read from `path`.
    pub fn load_bytes(&self, bytes: &[u8], path: &Path) -> Result<LoadedModule> {
        let shown = path.display();
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component = match wasm_kind(bytes) {
            WasmKind::Component => bytes.to_vec(),
            WasmKind::Core => wit_component::ComponentEncoder::default()
                .module(bytes)
                .and_then(|encoder| encoder.validate(true).encode())
                .map_err(|err| {
                    anyhow::anyhow!(
                        "module {shown} does not implement the projection world: it is a core \
                         wasm module without a usable `projection` component type ({err:#}). \
                         Build it with projector-sdk (`projector_sdk::export!`) for \
                         wasm32-unknown-unknown"
                    )
                })?,
            WasmKind::NotWasm => bail!(
                "module {shown} is not a WebAssembly file (it does not start with `\\0asm`); \
                 point `module` at the .wasm that `scripts/build-guests` or \
                 `cargo build --target wasm32-unknown-unknown` wrote"
            ),
        };
        let (component, from_cache) = self.compile(&component, &sha256, path)?;
        let pre =
            self.linker.instantiate_pre(&component).map_err(anyhow::Error::from).with_context(|| {
                format!("module {shown} imports something the projection world does not provide")
            })?;
        let pre = ProjectionPre::new(pre).map_err(anyhow::Error::from).with_context(|| {
            format!(
                "module {shown} does not implement the projection world (exports state-version, \
                 init, handle, query); build it with projector-sdk"
            )
        })?;
        Ok(LoadedModule { path: path.to_path_buf(), sha256, pre, from_cache })
    }

    /// Compile `component`, or deserialize it from the cache when a module
    /// with this sha256 was compiled before with these engine settings.
    fn compile(&self, component: &[u8], sha256: &str, path: &Path) -> Result<(Component, bool)> {
        let shown = path.display();
        let started = std::time::Instant::now();
        let Some(dir) = &self.cache else {
            let compiled = Component::from_binary(&self.engine, component)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("module {shown} does not compile"))?;
            return Ok((compiled, false));
        };
        let cached = dir.join(format!("{sha256}{}.cwasm", if self.fuel { "-fuel" } else { "" }));
        if cached.exists() {
            match deserialize(&self.engine, &std::fs::read(&cached)?) {
                Ok(component) => {
                    tracing::info!(module = %shown, sha256, "module loaded from the compiled-module cache");
                    return Ok((component, true));
                }
                // Another wasmtime or other settings wrote it: compile anew.
                Err(err) => {
                    tracing::info!(module = %shown, "cached compilation unusable ({err:#}); compiling")
                }
            }
        }
        let compiled = self
            .engine
            .precompile_component(component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("module {shown} does not compile"))?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let partial = cached.with_extension(format!("partial-{}", std::process::id()));
        std::fs::write(&partial, &compiled)
            .and_then(|()| std::fs::rename(&partial, &cached))
            .with_context(|| format!("cannot write {}", cached.display()))?;
        let component = deserialize(&self.engine, &compiled)?;
        tracing::info!(
            module = %shown,
            sha256,
            millis = started.elapsed().as_millis() as u64,
            "module compiled and cached"
        );
        Ok((component, false))
    }
}

/// Load a compiled component.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, compiled: &[u8]) -> Result<Component> {
    // SAFETY: wasmtime requires the bytes to be its own precompiled output.
    // They are: this host wrote them (precompile_component, then an atomic
    // rename) into the data folder, named by the module's sha256, and
    // wasmtime checks its version and settings before using them. Whoever
    // can write the data folder can replace the modules themselves anyway.
    unsafe { Component::deserialize(engine, compiled) }.map_err(anyhow::Error::from)
}

enum WasmKind {
    Core,
    Component,
    NotWasm,
}

/// Core modules and components share the `\0asm` magic and differ in the
/// version/layer word that follows it.
fn wasm_kind(bytes: &[u8]) -> WasmKind {
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => WasmKind::Core,
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => WasmKind::Component,
        _ => WasmKind::NotWasm,
    }
}
