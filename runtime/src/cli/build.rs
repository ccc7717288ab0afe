//! `projector build`: guest crates to `.wasm` modules. This is the one
//! definition of how a guest is built on a given machine; `scripts/build-guests`
//! and `projector dev` call it.
//!
//! The toolchain, in order: rustup's `wasm32-unknown-unknown` target when
//! it is installed; Debian's `rustc-web`, `cargo-web`, `rust-web-src` and
//! `lld-19` with `-Zbuild-std` when those are installed (machines where
//! rustup cannot download the target); `rustup target add`; and, when asked
//! to (`--install-toolchain`) and running as root, Debian's packages
//! installed with apt-get. Guests get a target dir of their own
//! (`<workspace>/target/guests`) so the host's and the guests' toolchains
//! never share one, and every module lands at
//! `<workspace>/target/projections/<lib_name>.wasm`, put in place by a
//! rename so a host watching the file never reads half of it.

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The wasm target guests are built for: no WASI, nothing imported but the
/// world's own interfaces.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// Debian's fallback for machines where rustup cannot add [`TARGET`].
const DEBIAN_PACKAGES: [&str; 4] = ["rustc-web", "cargo-web", "rust-web-src", "lld-19"];

/// Variables an outer cargo (or the host's own build) may have set: they
/// would point the guest build at the host's toolchain or target dir.
const HOST_BUILD_VARIABLES: [&str; 12] = [
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_MAKEFLAGS",
    "CARGO_PRIMARY_PACKAGE",
];

/// A guest is small and called in a hot loop: optimise it fully.
const GUEST_PROFILE: [(&str, &str); 4] = [
    ("CARGO_PROFILE_RELEASE_DEBUG", "false"),
    ("CARGO_PROFILE_RELEASE_LTO", "true"),
    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1"),
    ("CARGO_PROFILE_RELEASE_PANIC", "abort"),
];

/// `projector build`'s arguments.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// The guest crates' folders (default: the current folder).
    crates: Vec<PathBuf>,
    /// Cargo's target dir for the guest build (default:
    /// <workspace>/target/guests).
    #[arg(long)]
    target_dir: Option<PathBuf>,
    /// When no wasm toolchain is found, install Debian's (apt-get, as root).
    #[arg(long)]
    install_toolchain: bool,
}

/// Run `projector build`: each module's path on stdout, one a line.
pub fn run(args: BuildArgs) -> Result<()> {
    let dirs = if args.crates.is_empty() { vec![PathBuf::from(".")] } else { args.crates };
    let crates = dirs.iter().map(|dir| GuestCrate::locate(dir)).collect::<Result<Vec<_>>>()?;
    let workspace = &crates[0].workspace;
    let toolchain = Toolchain::detect(workspace, args.install_toolchain)?;
    let builder = Builder { toolchain, target_dir: args.target_dir };
    for built in builder.build(&crates)? {
        println!("{}", shown(&built.wasm).display());
    }
    Ok(())
}

/// How this machine builds for [`TARGET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// rustup's toolchain with the target installed.
    Rustup,
    /// Debian's `rustc-web` and `cargo-web`, building std with
    /// `-Zbuild-std`, linking with `wasm-ld-19`.
    Debian,
}

impl Toolchain {
    /// Find the toolchain that builds for [`TARGET`] here (rustup's as
    /// `dir` selects it, honouring a `rust-toolchain.toml`), adding or
    /// installing one as the module documentation says.
    pub fn detect(dir: &Path, install: bool) -> Result<Toolchain> {
        if rustup_has_target(dir) {
            return Ok(Toolchain::Rustup);
        }
        if debian_ready() {
            return Ok(Toolchain::Debian);
        }
        let mut add = Command::new("rustup");
        add.args(["target", "add", TARGET]).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::null());
        if finishes_ok(add, Duration::from_secs(60)) {
            return Ok(Toolchain::Rustup);
        }
        let missing = || {
            format!(
                "no way to build for {TARGET} here. Either `rustup target add {TARGET}`, or on Debian \
                 12 as root `apt-get install -y {}` (`projector build --install-toolchain` does that)",
                DEBIAN_PACKAGES.join(" ")
            )
        };
        if !install {
            bail!("{}", missing());
        }
        if !running_as_root() || !on_path("apt-get") {
            bail!("{} (installing needs root and apt-get)", missing());
        }
        eprintln!(
            "build: rustup cannot add {TARGET} here; installing {} from Debian",
            DEBIAN_PACKAGES.join(" ")
        );
        for args in [vec!["update", "-qq"], [&["install", "-y", "-qq"][..], &DEBIAN_PACKAGES].concat()] {
            let status = Command::new("apt-get")
                .args(&args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(std::io::stderr())
                .status()
                .context("cannot run apt-get")?;
            if !status.success() {
                bail!("`apt-get {}` failed ({status}); {}", args.join(" "), missing());
            }
        }
        Ok(Toolchain::Debian)
    }

    /// `cargo build` for [`TARGET`] with this toolchain, the guest profile
    /// and none of the host build's variables.
    fn cargo_build(self) -> Command {
        let mut cargo = match self {
            Toolchain::Rustup => Command::new("cargo"),
            Toolchain::Debian => Command::new("/usr/bin/cargo"),
        };
        for variable in HOST_BUILD_VARIABLES {
            cargo.env_remove(variable);
        }
        cargo.envs(GUEST_PROFILE);
        cargo.args(["build", "--release", "--target", TARGET]);
        if self == Toolchain::Debian {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let path = std::env::join_paths(
                std::iter::once(PathBuf::from("/usr/bin")).chain(std::env::split_paths(&path)),
            )
            .expect("PATH entries joined back");
            cargo
                .env("PATH", path)
                .env_remove("RUSTUP_TOOLCHAIN")
                .env("RUSTC_BOOTSTRAP", "1")
                .env("RUSTFLAGS", "-C linker=wasm-ld-19")
                .arg("-Zbuild-std=std,panic_abort");
        }
        cargo
    }

    fn describe(self) -> String {
        match self {
            Toolchain::Rustup => format!("rustup's {TARGET} target"),
            Toolchain::Debian => "Debian's rustc-web and -Zbuild-std".to_string(),
        }
    }
}

fn rustup_has_target(dir: &Path) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(dir)
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).lines().any(|l| l == TARGET)
        })
}

fn debian_ready() -> bool {
    Path::new("/usr/bin/cargo").exists()
        && Path::new("/usr/bin/rustc").exists()
        && on_path("wasm-ld-19")
        && Command::new("dpkg")
            .arg("-s")
            .args(DEBIAN_PACKAGES)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

#[cfg(target_os = "linux")]
fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(not(target_os = "linux"))]
fn running_as_root() -> bool {
    false
}

/// Run `command`; whether it succeeded within `timeout` (it is killed
/// after).
fn finishes_ok(mut command: Command, timeout: Duration) -> bool {
    let Ok(mut child) = command.spawn() else { return false };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// A guest crate: a package whose library builds a `cdylib`.
#[derive(Debug, Clone)]
pub struct GuestCrate {
    /// Its folder.
    pub dir: PathBuf,
    /// Its package name.
    pub package: String,
    /// Its library's name (underscores): the module is `<lib>.wasm`.
    pub lib: String,
    /// The root of the workspace it builds in (its own folder when it is
    /// alone).
    pub workspace: PathBuf,
}

impl GuestCrate {
    /// The guest crate in `dir`, read from its `Cargo.toml`.
    pub fn locate(dir: &Path) -> Result<GuestCrate> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("{} is not a folder holding a guest crate", dir.display()))?;
        let manifest_path = dir.join("Cargo.toml");
        let manifest = read_manifest(&manifest_path)?;
        let Some(package) = manifest.get("package").and_then(|p| p.get("name")).and_then(|n| n.as_str())
        else {
            bail!(
                "{} has no [package]: name the guest crates to build, e.g. `projector build projections/*`",
                manifest_path.display()
            );
        };
        let lib = manifest.get("lib");
        let crate_types: Vec<&str> = lib
            .and_then(|l| l.get("crate-type"))
            .and_then(|t| t.as_array())
            .map(|types| types.iter().filter_map(|t| t.as_str()).collect())
            .unwrap_or_default();
        if !crate_types.contains(&"cdylib") {
            bail!(
                "{} builds no cdylib, so no .wasm module: add `crate-type = [\"cdylib\", \"rlib\"]` \
                 under [lib] (cdylib for the module, rlib for native tests)",
                manifest_path.display()
            );
        }
        let lib = lib.and_then(|l| l.get("name")).and_then(|n| n.as_str()).unwrap_or(package);
        let workspace = match Workspace::enclosing(&dir)? {
            Some(workspace) if workspace.covers(&dir) => workspace.root,
            _ => dir.clone(),
        };
        Ok(GuestCrate { package: package.to_string(), lib: lib.replace('-', "_"), workspace, dir })
    }

    /// Where `projector build` writes its module.
    pub fn wasm(&self) -> PathBuf {
        output_dir(&self.workspace).join(format!("{}.wasm", self.lib))
    }
}

/// Where the modules of a workspace's guests are written.
pub fn output_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("projections")
}

fn read_manifest(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))
}

/// A Cargo workspace: its root folder and its `[workspace]` table.
pub struct Workspace {
    /// The folder of the `Cargo.toml` holding `[workspace]`.
    pub root: PathBuf,
    /// That `[workspace]` table.
    pub table: toml::Table,
}

impl Workspace {
    /// The nearest workspace at or above `dir` (an absolute path), as
    /// cargo looks for it.
    pub fn enclosing(dir: &Path) -> Result<Option<Workspace>> {
        for root in dir.ancestors() {
            let manifest = root.join("Cargo.toml");
            if !manifest.is_file() {
                continue;
            }
            if let Some(toml::Value::Table(table)) = read_manifest(&manifest)?.remove("workspace") {
                return Ok(Some(Workspace { root: root.to_path_buf(), table }));
            }
        }
        Ok(None)
    }

    /// Whether `dir` is the root or matches a `members` entry (globs of
    /// `*` within a path segment) and no `exclude` entry.
    pub fn covers(&self, dir: &Path) -> bool {
        let Ok(relative) = dir.strip_prefix(&self.root) else { return false };
        if relative.as_os_str().is_empty() {
            return true;
        }
        let relative = relative.to_string_lossy().replace('\\', "/");
        let list = |key: &str| -> Vec<String> {
            self.table
                .get(key)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter().filter_map(|v| v.as_str()).map(|s| s.trim_end_matches('/').to_string()).collect()
                })
                .unwrap_or_default()
        };
        let excluded =
            list("exclude").iter().any(|e| relative == *e || relative.starts_with(&format!("{e}/")));
        !excluded && list("members").iter().any(|m| glob_matches(m, &relative))
    }

    /// The entry `name` of `[workspace.dependencies]`, if declared.
    pub fn declares_dependency(&self, name: &str) -> bool {
        self.table.get("dependencies").and_then(|d| d.get(name)).is_some()
    }

    /// Whether `[workspace.lints]` is there for members to inherit.
    pub fn has_lints(&self) -> bool {
        self.table.contains_key("lints")
    }
}

/// `pattern` (path segments, `*` matching any run of characters within
/// one) against `path`, segment by segment.
fn glob_matches(pattern: &str, path: &str) -> bool {
    let (pattern, path): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    pattern.len() == path.len() && pattern.iter().zip(&path).all(|(p, s)| segment_matches(p, s))
}

fn segment_matches(pattern: &str, segment: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == segment,
        Some((prefix, rest)) => {
            let Some(tail) = segment.strip_prefix(prefix) else { return false };
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| segment_matches(rest, &tail[i..]))
        }
    }
}

/// Builds guest crates with one toolchain.
pub struct Builder {
    /// The toolchain to build with.
    pub toolchain: Toolchain,
    /// Cargo's target dir, instead of `<workspace>/target/guests`.
    pub target_dir: Option<PathBuf>,
}

/// One module `projector build` wrote (or found unchanged).
#[derive(Debug, Clone)]
pub struct Built {
    /// The module file.
    pub wasm: PathBuf,
    /// Its size in bytes.
    pub bytes: usize,
    /// Its sha256, hex: what `status` shows as `module` once it runs.
    pub sha256: String,
    /// Whether its bytes differ from the file that was there before.
    pub changed: bool,
}

impl Builder {
    /// Build `crates` (one cargo run per workspace) and put each module in
    /// place. Cargo's output goes to stderr, as do one line per module.
    pub fn build(&self, crates: &[GuestCrate]) -> Result<Vec<Built>> {
        let mut by_workspace: BTreeMap<&Path, Vec<&GuestCrate>> = BTreeMap::new();
        for krate in crates {
            by_workspace.entry(&krate.workspace).or_default().push(krate);
        }
        let mut built = Vec::new();
        for (workspace, crates) in by_workspace {
            let target_dir = match &self.target_dir {
                Some(dir) => std::path::absolute(dir)?,
                None => workspace.join("target").join("guests"),
            };
            let packages: Vec<&str> = crates.iter().map(|c| c.package.as_str()).collect();
            eprintln!("build: {} with {}", packages.join(" "), self.toolchain.describe());
            let mut cargo = self.toolchain.cargo_build();
            cargo
                .arg("--target-dir")
                .arg(&target_dir)
                .arg("--manifest-path")
                .arg(crates[0].dir.join("Cargo.toml"))
                .current_dir(workspace)
                .stdout(std::io::stderr());
            for package in &packages {
                cargo.args(["-p", package]);
            }
            let status = cargo.status().context("cannot run cargo")?;
            if !status.success() {
                bail!(
                    "building {} for {TARGET} failed ({status}); cargo says why above",
                    packages.join(", ")
                );
            }
            for krate in crates {
                let from = target_dir.join(TARGET).join("release").join(format!("{}.wasm", krate.lib));
                let module = put_in_place(&from, &krate.wasm())?;
                let verb = if module.changed { "wrote" } else { "unchanged:" };
                eprintln!("build: {verb} {} ({} bytes)", shown(&module.wasm).display(), module.bytes);
                built.push(module);
            }
        }
        Ok(built)
    }
}

/// Copy `from` to `to` by a rename from a temporary file beside it, unless
/// `to` holds the same bytes already.
fn put_in_place(from: &Path, to: &Path) -> Result<Built> {
    let bytes = std::fs::read(from).with_context(|| format!("cargo left no module at {}", from.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let unchanged = std::fs::read(to).is_ok_and(|old| old == bytes);
    if !unchanged {
        let dir = to.parent().expect("a module path has a folder");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Named for this process: a second build writing the same module
        // at once renames its own file.
        let name = to.file_name().expect("a module path names a file").to_string_lossy();
        let partial = dir.join(format!(".{name}.{}.partial", std::process::id()));
        std::fs::write(&partial, &bytes).with_context(|| format!("cannot write {}", partial.display()))?;
        std::fs::rename(&partial, to).with_context(|| format!("cannot write {}", to.display()))?;
    }
    Ok(Built { wasm: to.to_path_buf(), bytes: bytes.len(), sha256, changed: !unchanged })
}

/// `path` relative to the current folder when it is inside it: what a
/// person typed, not a long absolute path.
pub fn shown(path: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| cwd.canonicalize().ok())
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_globs_match_within_one_segment() {
        assert!(glob_matches("projections/*", "projections/login-counter"));
        assert!(glob_matches("runtime", "runtime"));
        assert!(glob_matches("crates/proj-*", "crates/proj-a"));
        assert!(!glob_matches("projections/*", "projections/a/b"));
        assert!(!glob_matches("projections/*", "other/a"));
        assert!(!glob_matches("crates/proj-*", "crates/lib-a"));
    }

    #[test]
    fn a_workspace_covers_its_members_but_not_what_it_excludes() {
        let table: toml::Table =
            toml::from_str("members = [\"projections/*\", \"runtime\"]\nexclude = [\"projections/old\"]")
                .unwrap();
        let workspace = Workspace { root: PathBuf::from("/w"), table };
        assert!(workspace.covers(Path::new("/w/projections/new")));
        assert!(workspace.covers(Path::new("/w")));
        assert!(!workspace.covers(Path::new("/w/projections/old")));
        assert!(!workspace.covers(Path::new("/w/elsewhere/x")));
        assert!(!workspace.covers(Path::new("/other/projections/x")));
    }
}
