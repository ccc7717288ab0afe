//! The loader fuzz: every kind of hostile module file — truncated, corrupt,
//! random, foreign, empty, a directory — loaded through the real engine.
//! Shared by `tests/all/hostile.rs`, which asserts no input panics and every
//! refusal names its file, and `benches/hostile.rs`, which prints the count.

use projector::sandbox::engine::ProjectorEngine;
use std::path::Path;

/// How many inputs [`hostile_inputs`] makes.
pub const INPUTS: usize = 773;

/// A deterministic xorshift generator: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Every input the loader is fuzzed with: (name, bytes); `None` bytes: a
/// directory. Names say what each is, so a failure is easy to reproduce.
pub fn hostile_inputs() -> Vec<(String, Option<Vec<u8>>)> {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut inputs = Vec::new();
    let real = std::fs::read(crate::util::guest("wallet_allowlist")).unwrap();
    // Truncations at every 1%, and at a few hundred random offsets.
    for percent in 0..100 {
        let cut = real.len() * percent / 100;
        inputs
            .push((format!("wallet_allowlist cut at {percent}% ({cut} bytes)"), Some(real[..cut].to_vec())));
    }
    for _ in 0..300 {
        let cut = rng.below(real.len());
        inputs.push((format!("wallet_allowlist cut at {cut} bytes"), Some(real[..cut].to_vec())));
    }
    // The last few bytes, one by one: the component-type section's end.
    for missing in 1..=16 {
        let cut = real.len() - missing;
        inputs.push((format!("wallet_allowlist cut at {cut} bytes"), Some(real[..cut].to_vec())));
    }
    // Corrupt: bytes overwritten at random places (some may still load).
    for _ in 0..100 {
        let mut bytes = real.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            bytes[at] = rng.next() as u8;
        }
        inputs.push(("wallet_allowlist with random bytes overwritten".into(), Some(bytes)));
    }
    // Random bytes: bare, behind a core module's header, behind a component's.
    for header in [&b""[..], b"\0asm\x01\0\0\0", b"\0asm\x0d\0\x01\0"] {
        for _ in 0..50 {
            let mut bytes = header.to_vec();
            let n = rng.below(4096);
            bytes.extend(rng.bytes(n));
            inputs.push((format!("{n} random bytes after {header:?}"), Some(bytes)));
        }
    }
    // A valid core module that knows nothing of the contract.
    let plain = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "handle")))"#).unwrap();
    inputs.push(("a core module without the contract".into(), Some(plain)));
    // A component of another world, whole and cut short.
    let other = std::fs::read(crate::util::guest("other_world")).unwrap();
    for percent in (0..100).step_by(5) {
        let cut = other.len() * percent / 100;
        inputs.push((format!("other_world cut at {percent}%"), Some(other[..cut].to_vec())));
    }
    inputs.push(("a module of another world".into(), Some(other)));
    // Components (not core modules) cut short.
    let component = wat::parse_str(
        r#"(component (core module $m (func (export "f"))) (core instance (instantiate $m)))"#,
    )
    .unwrap();
    for cut in 0..component.len() {
        inputs.push((format!("a component cut at {cut} bytes"), Some(component[..cut].to_vec())));
    }
    inputs.push(("a zero-byte file".into(), Some(Vec::new())));
    inputs.push(("a directory".into(), None));
    inputs
}

/// What loading every input did.
pub struct Fuzzed {
    /// Inputs tried.
    pub tried: usize,
    /// Refused with an error.
    pub refused: usize,
    /// Loaded (an overwritten byte the module never reads).
    pub loaded: usize,
    /// Inputs the loader panicked on.
    pub panics: Vec<String>,
    /// Refusals whose error does not name the file.
    pub unnamed: Vec<String>,
    /// Inputs that loaded but should not have.
    pub loaded_unexpectedly: Vec<String>,
}

impl std::fmt::Display for Fuzzed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hostile inputs tried: {}; refused: {}; loaded (harmless corruption): {}; panics: {}",
            self.tried,
            self.refused,
            self.loaded,
            self.panics.len()
        )
    }
}

/// Write every input into `dir` and load it with `engine`, catching panics.
pub fn run(engine: &ProjectorEngine, dir: &Path) -> Fuzzed {
    let inputs = hostile_inputs();
    let mut fuzzed = Fuzzed {
        tried: inputs.len(),
        refused: 0,
        loaded: 0,
        panics: Vec::new(),
        unnamed: Vec::new(),
        loaded_unexpectedly: Vec::new(),
    };
    for (i, (what, bytes)) in inputs.iter().enumerate() {
        let path = dir.join(format!("input-{i}.wasm"));
        match bytes {
            Some(bytes) => std::fs::write(&path, bytes).unwrap(),
            None => std::fs::create_dir(&path).unwrap(),
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.load_file(&path))) {
            Err(_) => fuzzed.panics.push(what.clone()),
            Ok(Ok(_)) => {
                fuzzed.loaded += 1;
                // Only an overwritten byte that the module never reads may
                // still load.
                if !what.contains("overwritten") {
                    fuzzed.loaded_unexpectedly.push(what.clone());
                }
            }
            Ok(Err(err)) => {
                fuzzed.refused += 1;
                let err = format!("{err:#}");
                if !err.contains(&path.display().to_string()) {
                    fuzzed.unnamed.push(format!("{what}: {err}"));
                }
            }
        }
    }
    fuzzed
}
