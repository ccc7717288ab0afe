//! The wasmtime engine wrapper: one [`Engine`] and [`Linker`] per host, and
//! loading a module file into a ready-to-instantiate [`LoadedModule`].
//!
//! A module is either a component, or a core module built with wit-bindgen
//! for `wasm32-unknown-unknown` that carries its component type; the latter
//! is turned into a component here (wit-component), so a plain `cargo build`
//! output deploys as is. Either way it must implement the `projection` world.

use crate::bindings::{Projection, ProjectionPre};
use crate::guest_host::GuestHost;
use anyhow::{Context as _, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

/// The engine, with the world's imports linked to [`GuestHost`].
pub struct ProjectorEngine {
    engine: Engine,
    linker: Linker<GuestHost>,
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
}

impl ProjectorEngine {
    /// An engine with the host's settings.
    pub fn new() -> Result<Self> {
        let mut config = Config::new();
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        Projection::add_to_linker::<GuestHost, HasSelf<GuestHost>>(&mut linker, |host| host)
            .map_err(anyhow::Error::from)
            .context("linking the projection world's imports")?;
        Ok(ProjectorEngine { engine, linker })
    }

    /// The underlying engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Read, compile, link and check the module at `path`.
    pub fn load_file(&self, path: &Path) -> Result<LoadedModule> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read module {}", path.display()))?;
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
        let component = Component::from_binary(&self.engine, &component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("module {shown} does not compile"))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!("module {shown} imports something the projection world does not provide")
            })?;
        let pre = ProjectionPre::new(pre).map_err(anyhow::Error::from).with_context(|| {
            format!(
                "module {shown} does not implement the projection world (exports state-version, \
                 init, handle, query); build it with projector-sdk"
            )
        })?;
        Ok(LoadedModule {
            path: path.to_path_buf(),
            sha256,
            pre,
        })
    }
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
