//! The wasmtime engine wrapper: one [`Engine`] and [`Linker`] per host, and
//! loading a module file into a ready-to-instantiate [`LoadedModule`].
//!
//! A module is either a component, or a core module built with wit-bindgen
//! for `wasm32-unknown-unknown` that carries its component type; the latter
//! is turned into a component here (wit-component), so a plain `cargo build`
//! output deploys as is. Either way it must implement the `projection` world.
//!
//! A module file is untrusted input, and may be half written when it is
//! read (a hot swap by plain copy): it is validated before the encoder sees
//! it, and any panic left in the wasm libraries is caught, so a bad file is
//! an error naming it, never a dead thread. Compiles are kept on disk
//! (`<data>/cache/<sha256>.cwasm`, written whole then renamed) and in
//! memory, and one compile per module and engine runs at a time: a hundred
//! projections of one module compile it once.
//!
//! The sandbox's limits live here too: [`Limits`] (memory, a wall-clock
//! deadline per call through epoch interruption, optional fuel, tables,
//! instances, value sizes, guest log rate) and how a broken limit reads.
//! Epoch interruption only fires in wasm code, so arming a call also hands
//! its deadline to the [`GuestHost`], whose SQLite progress handler stops
//! guest SQL that outlives it.

use crate::bindings::{Projection, ProjectionPre};
use crate::sandbox::host::GuestHost;
use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use wasmtime::component::types::{ComponentItem, Type};
use wasmtime::component::{Component, ComponentExportIndex, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap};

/// The interface a module exports its packed `handle` in.
const PACKED_INTERFACE: &str = "projector:projection/packed@0.1.0";

/// How often the engine's epoch advances: the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

pub use crate::config::Limits;

/// Enforcing the limits, in the engine: arming a call and reading a trap.
impl Limits {
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
    /// The loads under way or still held, by the module's sha256.
    loads: Mutex<HashMap<String, Weak<Flight>>>,
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
    metered: Arc<Mutex<Option<Arc<ProjectorEngine>>>>,
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
        // Held while it is made: projections starting together share one.
        let mut metered = self.metered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(metered) = &*metered {
            return Ok(metered.clone());
        }
        let engine = ProjectorEngine::new(true).context("cannot make the fuel-metering engine")?;
        let engine = Arc::new(match &self.cache {
            Some(dir) => engine.with_cache(dir.clone()),
            None => engine,
        });
        *metered = Some(engine.clone());
        Ok(engine)
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
    /// Its packed `handle`, when it exports one (the SDK's modules do):
    /// what a batch is handed to instead of the world's `handle`.
    pub packed: Option<ComponentExportIndex>,
    /// Whether it came from the compiled-module cache (not compiled now).
    pub from_cache: bool,
    /// Keeps the engine's in-memory copy alive: while any projection runs
    /// these bytes, loading them again costs a hash and nothing more.
    _shared: Arc<Flight>,
}

/// One load of one module's bytes, shared by everyone who asks for the
/// same bytes meanwhile (single flight): the first caller does the work,
/// the others wait for it and take its result. The error is kept as text
/// without the file's name: each caller names its own path.
type Flight = OnceLock<std::result::Result<Prepared, String>>;

/// What a successful load holds, before it is given a path.
#[derive(Clone)]
struct Prepared {
    pre: ProjectionPre<GuestHost>,
    packed: Option<ComponentExportIndex>,
    from_cache: bool,
}

impl ProjectorEngine {
    /// An engine with the host's settings; `fuel` turns on fuel metering
    /// (needed when any projection sets `limits.fuel`).
    pub fn new(fuel: bool) -> Result<Self> {
        let mut config = Config::new();
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        config.epoch_interruption(true);
        config.consume_fuel(fuel);
        // Names the guests' compiled functions for `perf` (in
        // /tmp/perf-<pid>.map), so a profile shows guest code by function.
        if std::env::var_os("PROJECTOR_PERF_MAP").is_some_and(|v| !v.is_empty()) {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
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
        Ok(ProjectorEngine { engine, linker, fuel, ticker_stop, cache: None, loads: Mutex::default() })
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
        if path.is_dir() {
            bail!(
                "cannot read module {}: it is a directory; point `module` at the .wasm file",
                path.display()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("cannot read module {}", path.display()))?;
        self.load_bytes(&bytes, path)
    }

    /// Compile, link and check `bytes`, read from `path`.
    ///
    /// Never panics, whatever the bytes: they are validated before the
    /// component encoder sees them, and a panic inside the wasm libraries
    /// is caught and returned as the error. Loads of the same bytes at the
    /// same time share one compile; while a module of these bytes is
    /// loaded, loading them again reuses it.
    pub fn load_bytes(&self, bytes: &[u8], path: &Path) -> Result<LoadedModule> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let flight = self.flight(&sha256);
        // Validation comes first so that the libraries see only input they
        // can parse; the guard is for whatever they still fail on.
        let prepared = flight.get_or_init(|| {
            guarded("loading it", || self.prepare(bytes, &sha256, path))
                .map_err(|panic| format!("cannot be loaded: {panic}"))
                .and_then(|prepared| prepared)
        });
        match prepared {
            Ok(Prepared { pre, packed, from_cache }) => Ok(LoadedModule {
                path: path.to_path_buf(),
                sha256,
                pre: pre.clone(),
                packed: *packed,
                from_cache: *from_cache,
                _shared: flight.clone(),
            }),
            Err(reason) => bail!("module {} {reason}", path.display()),
        }
    }

    /// The load of `sha256` under way or still held, or a new one.
    fn flight(&self, sha256: &str) -> Arc<Flight> {
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = loads.get(sha256).and_then(Weak::upgrade) {
            return flight;
        }
        // Modules no longer loaded anywhere are forgotten (the compiled
        // cache on disk still has them).
        loads.retain(|_, flight| flight.strong_count() > 0);
        let flight = Arc::new(Flight::new());
        loads.insert(sha256.to_string(), Arc::downgrade(&flight));
        flight
    }

    /// Validate, encode as a component, compile (or take from the cache),
    /// link and check against the world. The error says what is wrong with
    /// the bytes, to follow "module <path> ".
    fn prepare(&self, bytes: &[u8], sha256: &str, path: &Path) -> std::result::Result<Prepared, String> {
        let component = match wasm_kind(bytes) {
            WasmKind::Component => {
                validate(bytes).map_err(|err| invalid("component", &err))?;
                std::borrow::Cow::Borrowed(bytes)
            }
            WasmKind::Core => {
                validate(bytes).map_err(|err| invalid("module", &err))?;
                let encoded = guarded("encoding it as a component", || {
                    wit_component::ComponentEncoder::default()
                        .module(bytes)
                        .and_then(|encoder| encoder.validate(true).encode())
                        .map_err(|err| format!("{err:#}"))
                })
                .and_then(|encoded| encoded);
                std::borrow::Cow::Owned(encoded.map_err(|err| {
                    format!(
                        "does not implement the projection world: it is a core wasm module \
                         without a usable `projection` component type ({err}). Build it with \
                         projector-sdk (`projector_sdk::export!`) for wasm32-unknown-unknown"
                    )
                })?)
            }
            WasmKind::NotWasm if bytes.is_empty() => {
                return Err("is empty (0 bytes): is it still being written? Point `module` at the \
                            .wasm that `scripts/build-guests` or `cargo build --target \
                            wasm32-unknown-unknown` wrote"
                    .into());
            }
            WasmKind::NotWasm => {
                return Err("is not a WebAssembly file (it does not start with `\\0asm`); point \
                            `module` at the .wasm that `scripts/build-guests` or `cargo build \
                            --target wasm32-unknown-unknown` wrote"
                    .into());
            }
        };
        let (component, from_cache) = guarded("compiling it", || self.compile(&component, sha256, path))
            .and_then(|compiled| compiled)
            .map_err(|err| format!("does not compile: {err}"))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|err| {
            format!("imports something the projection world does not provide: {:#}", anyhow::Error::from(err))
        })?;
        let pre = ProjectionPre::new(pre).map_err(|err| {
            format!(
                "does not implement the projection world (exports state-version, init, handle, \
                 query); build it with projector-sdk: {:#}",
                anyhow::Error::from(err)
            )
        })?;
        let packed = packed_export(&component)?;
        Ok(Prepared { pre, packed, from_cache })
    }

    /// Compile `component`, or deserialize it from the cache when a module
    /// with this sha256 was compiled before with these engine settings.
    /// The cache is an optimisation: a cache that cannot be read or written
    /// costs a compile and a warning, never the load.
    fn compile(
        &self,
        component: &[u8],
        sha256: &str,
        path: &Path,
    ) -> std::result::Result<(Component, bool), String> {
        let shown = path.display();
        let started = std::time::Instant::now();
        let compile_error = |err: wasmtime::Error| format!("{:#}", anyhow::Error::from(err));
        let Some(dir) = &self.cache else {
            let compiled = Component::from_binary(&self.engine, component).map_err(compile_error)?;
            tracing::info!(
                module = %shown,
                sha256,
                millis = started.elapsed().as_millis() as u64,
                "module compiled"
            );
            return Ok((compiled, false));
        };
        let cached = dir.join(format!("{sha256}{}.cwasm", if self.fuel { "-fuel" } else { "" }));
        match std::fs::read(&cached) {
            Ok(bytes) => match deserialize(&self.engine, &bytes) {
                Ok(component) => {
                    tracing::info!(module = %shown, sha256, "module loaded from the compiled-module cache");
                    return Ok((component, true));
                }
                // Another wasmtime or other settings wrote it: compile anew.
                Err(err) => {
                    tracing::info!(module = %shown, "cached compilation unusable ({err:#}); compiling")
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(
                module = %shown,
                "cannot read the compiled-module cache {} ({err}); compiling",
                cached.display()
            ),
        }
        let compiled = self.engine.precompile_component(component).map_err(compile_error)?;
        let component = deserialize(&self.engine, &compiled).map_err(|err| format!("{err:#}"))?;
        let millis = started.elapsed().as_millis() as u64;
        match write_atomically(dir, &cached, &compiled) {
            Ok(()) => tracing::info!(module = %shown, sha256, millis, "module compiled and cached"),
            Err(err) => {
                tracing::info!(module = %shown, sha256, millis, "module compiled (not cached)");
                tracing::warn!(
                    module = %shown,
                    "cannot write the compiled-module cache ({err:#}); the module runs from this \
                     compile, and the next start compiles it again"
                );
            }
        }
        Ok((component, false))
    }
}

/// Write `bytes` to `target` in `dir` through a temporary file of a unique
/// name in the same folder, renamed into place: a reader never sees half a
/// file, and two writers (threads or processes) never share a partial one.
fn write_atomically(dir: &Path, target: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut partial = tempfile::Builder::new()
        .prefix(".compiling-")
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    partial.write_all(bytes).with_context(|| format!("cannot write {}", partial.path().display()))?;
    partial
        .persist(target)
        .map_err(|err| err.error)
        .with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}

/// Check `bytes` as WebAssembly (a core module or a component) before any
/// library that assumes well-formed input sees them. Features as broad as
/// the parser knows: what the engine does not support, it refuses itself.
fn validate(bytes: &[u8]) -> std::result::Result<(), wasmparser::BinaryReaderError> {
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all()).validate_all(bytes).map(drop)
}

/// Why validation refused a `kind` ("module" or "component").
fn invalid(kind: &str, err: &wasmparser::BinaryReaderError) -> String {
    format!(
        "is not a valid WebAssembly {kind}: {err}. The file is cut short or corrupt (still being \
         copied?); write it whole, then rename it into place"
    )
}

thread_local! {
    /// Set while [`guarded`] runs on this thread: the panic hook records
    /// the panic here instead of printing it.
    static CAUGHT: std::cell::RefCell<Option<Option<String>>> = const { std::cell::RefCell::new(None) };
}

/// Run `work`, turning a panic inside it into an error that says what was
/// being done. The wasm libraries assume input they can parse; a panic on
/// input they cannot is an answer about the file, not a bug of the host's,
/// so it is not printed as one.
fn guarded<T>(doing: &str, work: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let quiet = CAUGHT.with_borrow_mut(|caught| match caught {
                Some(slot) => {
                    let message = info
                        .payload()
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| info.payload().downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".into());
                    let at =
                        info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                    *slot = Some(format!("{message}{at}"));
                    true
                }
                None => false,
            });
            if !quiet {
                previous(info);
            }
        }));
    });
    let outer = CAUGHT.replace(Some(None));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    let caught = CAUGHT.replace(outer).flatten();
    result.map_err(|_| {
        format!(
            "the wasm libraries panicked {doing} ({}): the file is corrupt or of a kind the host \
             cannot load",
            caught.unwrap_or_else(|| "no message".into())
        )
    })
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

/// The module's packed `handle` (the `packed` interface of the
/// `packed-projection` world), if it exports one: one of another type is
/// refused, as a `handle` of the wrong type is.
fn packed_export(component: &Component) -> std::result::Result<Option<ComponentExportIndex>, String> {
    let Some(packed) = component.get_export_index(None, PACKED_INTERFACE) else { return Ok(None) };
    let Some((item, index)) = component.get_export(Some(&packed), "handle") else {
        return Err(format!("exports {PACKED_INTERFACE} without its `handle`; build it with projector-sdk"));
    };
    let is_string = |ty: &Option<Type>| *ty == Some(Type::String);
    let fits = match &item {
        ComponentItem::ComponentFunc(func) => {
            let params: Vec<Type> = func.params().map(|(_, ty)| ty).collect();
            let results: Vec<Type> = func.results().collect();
            let takes_bytes = matches!(params.as_slice(), [Type::List(list)] if list.ty() == Type::U8);
            let gives_failure = match results.as_slice() {
                [Type::Result(result)] if result.ok().is_none() => match result.err() {
                    Some(Type::Variant(variant)) => {
                        let cases: Vec<_> = variant.cases().map(|case| (case.name, case.ty)).collect();
                        matches!(cases.as_slice(), [("retry", retry), ("reject", reject)]
                            if is_string(retry) && is_string(reject))
                    }
                    _ => false,
                },
                _ => false,
            };
            takes_bytes && gives_failure
        }
        _ => false,
    };
    if !fits {
        return Err(format!(
            "exports {PACKED_INTERFACE} with a `handle` of another type than the contract's \
             (`func(batch: list<u8>) -> result<_, failure>`); build it with projector-sdk"
        ));
    }
    Ok(Some(index))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn real_module() -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/projections/wallet_allowlist.wasm");
        std::fs::read(&path)
            .unwrap_or_else(|err| panic!("{} ({err}): run scripts/build-guests first", path.display()))
    }

    #[test]
    fn a_panic_in_the_wasm_libraries_becomes_an_error_saying_what_was_done() {
        let err = guarded::<()>("encoding it", || panic!("index out of range")).unwrap_err();
        assert!(err.starts_with("the wasm libraries panicked encoding it"), "{err}");
        assert!(err.contains("index out of range"), "{err}");
        // Outside a guarded call, panics reach the previous hook again.
        assert!(CAUGHT.with_borrow(Option::is_none));
    }

    #[test]
    fn concurrent_loads_of_one_module_compile_once_and_share_the_result() {
        let cache = tempfile::tempdir().unwrap();
        let engine = ProjectorEngine::new(false).unwrap().with_cache(cache.path().to_path_buf());
        let bytes = real_module();
        let start = std::sync::Barrier::new(8);
        let loaded: Vec<LoadedModule> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let (engine, bytes, start) = (&engine, &bytes, &start);
                    scope.spawn(move || {
                        start.wait();
                        engine.load_bytes(bytes, Path::new(&format!("m{i}.wasm"))).unwrap()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(loaded.iter().all(|m| Arc::ptr_eq(&m._shared, &loaded[0]._shared)), "one load, shared");
        assert!(loaded.iter().all(|m| !m.from_cache));
        assert_eq!(loaded[3].path, Path::new("m3.wasm"), "each keeps its own path");
        let files: Vec<String> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, [format!("{}.cwasm", loaded[0].sha256)], "one compile written, no partial left");
        // Held: loading again reuses it. Dropped: the disk cache serves it.
        let again = engine.load_bytes(&bytes, Path::new("again.wasm")).unwrap();
        assert!(Arc::ptr_eq(&again._shared, &loaded[0]._shared));
        drop((loaded, again));
        let after = engine.load_bytes(&bytes, Path::new("after.wasm")).unwrap();
        assert!(after.from_cache);
    }

    #[test]
    fn a_packed_handle_of_another_type_is_refused() {
        let engine = ProjectorEngine::new(false).unwrap();
        let component = |body: &str| {
            let wat = format!(
                r#"(component
                     (core module $m (func (export "h") (param i32) (result i32) i32.const 0))
                     (core instance $i (instantiate $m))
                     {body})"#
            );
            Component::from_binary(&engine.engine, &wat::parse_str(wat).unwrap()).unwrap()
        };
        let wrong = component(
            r#"(func $h (param "batch" u32) (result u32) (canon lift (core func $i "h")))
               (instance $packed (export "handle" (func $h)))
               (export "projector:projection/packed@0.1.0" (instance $packed))"#,
        );
        let err = packed_export(&wrong).unwrap_err();
        assert!(err.contains("with a `handle` of another type"), "{err}");
        let without = component(
            r#"(func $h (param "batch" u32) (result u32) (canon lift (core func $i "h")))
               (instance $packed (export "apply" (func $h)))
               (export "projector:projection/packed@0.1.0" (instance $packed))"#,
        );
        assert!(packed_export(&without).unwrap_err().contains("without its `handle`"));
        let none = component(r#"(func $h (param "batch" u32) (result u32) (canon lift (core func $i "h")))"#);
        assert_eq!(packed_export(&none), Ok(None));
        assert!(
            ProjectorEngine::new(false)
                .unwrap()
                .load_bytes(&real_module(), Path::new("w.wasm"))
                .unwrap()
                .packed
                .is_some()
        );
    }

    #[test]
    fn a_failed_load_is_not_kept() {
        let engine = ProjectorEngine::new(false).unwrap();
        let bytes = real_module();
        let cut = &bytes[..bytes.len() / 2];
        let err = engine.load_bytes(cut, Path::new("a.wasm")).err().unwrap();
        assert!(format!("{err:#}").starts_with("module a.wasm is not a valid WebAssembly module"), "{err:#}");
        let err = engine.load_bytes(cut, Path::new("b.wasm")).err().unwrap();
        assert!(format!("{err:#}").starts_with("module b.wasm "), "names its own file: {err:#}");
        assert!(engine.loads.lock().unwrap().values().all(|f| f.strong_count() == 0));
    }
}
