//! `projector new`: scaffold a projection crate that builds, tests and runs
//! as it is — one example event type and a typed query, native tests, a
//! fixture of CloudEvents and a development config — so a guest author
//! starts by changing working code. The files are templates in `new/`.

use crate::cli::build::{Workspace, output_dir};
use anyhow::{Context as _, Result, bail};
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

/// `projector new`'s arguments.
#[derive(clap::Args)]
pub struct NewArgs {
    /// The projection's name, also its crate's: 1 to 64 lowercase letters,
    /// digits, '-' and '_', starting with a letter.
    name: String,
    /// The crate's folder, which must not exist (default:
    /// projections/<name>).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The folder of the projector-sdk crate to depend on (default: the
    /// workspace's `projector-sdk` dependency, else the SDK this projector
    /// was built from).
    #[arg(long)]
    sdk: Option<PathBuf>,
}

/// Files and what they say, for the listing `new` prints.
const LISTING: [(&str, &str); 6] = [
    ("Cargo.toml", "the crate: projector-sdk, serde, serde_json"),
    ("src/lib.rs", "the projection: `item_added` events into a `stock` table, a typed query"),
    ("tests/{crate}.rs", "native tests on the SDK's harness (no wasm)"),
    ("fixtures/events.jsonl", "events `projector dev` appends (CloudEvents, one a line)"),
    ("fixtures/query.json", "the request `projector dev` sends once they are in"),
    ("projector.toml", "the config `projector dev` runs the module with"),
];

/// Run `projector new`.
pub fn run(args: NewArgs) -> Result<()> {
    let name = args.name.as_str();
    check_name(name)?;
    let dir = args.dir.unwrap_or_else(|| Path::new("projections").join(name));
    if dir.exists() {
        bail!("{} already exists; choose another name, or another folder with --dir", dir.display());
    }
    let crate_dir = resolved(&dir)?;
    let workspace = Workspace::enclosing(&crate_dir)?;
    let member = workspace.as_ref().filter(|w| w.covers(&crate_dir));
    let sdk = match args.sdk {
        Some(sdk) => Some(sdk_folder(&sdk)?),
        None if member.is_some_and(|w| w.declares_dependency("projector-sdk")) => None,
        None => Some(built_from_sdk()?),
    };
    let ident = name.replace('-', "_");
    let type_name = type_name(name);
    let module = output_dir(member.map_or(&crate_dir, |w| &w.root)).join(format!("{ident}.wasm"));
    // In the order rustfmt keeps them.
    let mut imports = [type_name.as_str(), "StockAnswer"];
    imports.sort();
    let imports = imports.join(", ");
    let fill = |template: &str| {
        template
            .replace("{{imports}}", &imports)
            .replace("{{name}}", name)
            .replace("{{crate}}", &ident)
            .replace("{{Type}}", &type_name)
            .replace("{{module}}", &relative(&crate_dir, &module).to_string_lossy())
    };
    let files = [
        ("Cargo.toml".to_string(), manifest(name, member, sdk.as_deref(), &crate_dir)),
        ("src/lib.rs".to_string(), fill(include_str!("new/lib.rs.tmpl"))),
        (format!("tests/{ident}.rs"), fill(include_str!("new/test.rs.tmpl"))),
        ("fixtures/events.jsonl".to_string(), fill(include_str!("new/events.jsonl.tmpl"))),
        ("fixtures/query.json".to_string(), fill(include_str!("new/query.json.tmpl"))),
        ("projector.toml".to_string(), fill(include_str!("new/projector.toml.tmpl"))),
    ];
    let written = files.iter().try_for_each(|(file, text)| {
        let path = crate_dir.join(file);
        std::fs::create_dir_all(path.parent().expect("a file in the crate"))
            .and_then(|()| std::fs::write(&path, text))
            .with_context(|| format!("cannot write {}", path.display()))
    });
    if let Err(err) = written {
        // Nothing half made is left behind: the folder did not exist.
        let _ = std::fs::remove_dir_all(&crate_dir);
        return Err(err);
    }

    let shown = dir.display();
    println!("created {shown}, the projection crate `{name}`:");
    for (file, what) in LISTING {
        println!("  {:<24} {what}", file.replace("{crate}", &ident));
    }
    match (&workspace, member) {
        (Some(_), Some(_)) | (None, _) => {}
        (Some(workspace), None) => {
            let path = relative(&workspace.root, &crate_dir);
            println!(
                "\nnote: {} is a workspace whose members do not include {shown}; add \"{}\" to \
                 `members` in its [workspace] (or to `exclude`, to build the crate on its own)",
                workspace.root.join("Cargo.toml").display(),
                path.display()
            );
        }
    }
    let test = match member {
        Some(_) => format!("cargo test -p {name}"),
        None => format!("cargo test --manifest-path {}", dir.join("Cargo.toml").display()),
    };
    println!("\nnext:\n  {test}\n  projector dev {shown}");
    Ok(())
}

/// A name that is a valid projection name, package name and Rust crate
/// name, and not one of the crates it depends on.
fn check_name(name: &str) -> Result<()> {
    let well_formed = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !well_formed {
        bail!(
            "{name:?} is not a projection name: use 1 to 64 lowercase letters, digits, '-' and '_', \
             starting with a letter (e.g. login-counter)"
        );
    }
    const KEYWORDS: &[&str] = &[
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate", "do",
        "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl", "in", "let",
        "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref", "return", "self",
        "static", "struct", "super", "trait", "true", "try", "type", "typeof", "unsafe", "unsized", "use",
        "virtual", "where", "while", "yield",
    ];
    const TAKEN: &[&str] =
        &["core", "std", "alloc", "proc_macro", "test", "projector", "projector_sdk", "serde", "serde_json"];
    let ident = name.replace('-', "_");
    if KEYWORDS.contains(&ident.as_str()) {
        bail!("{name:?} is a Rust keyword, which cannot name a crate; choose another name");
    }
    if TAKEN.contains(&ident.as_str()) {
        bail!("{name:?} is the name of a crate a projection builds with; choose another name");
    }
    Ok(())
}

/// `login-counter` → `LoginCounter`, renamed when it would clash with a
/// name the template uses.
fn type_name(name: &str) -> String {
    let camel: String = name
        .split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| part[..1].to_ascii_uppercase() + &part[1..])
        .collect();
    const USED: &[&str] = &[
        "ItemAdded",
        "StockRequest",
        "StockAnswer",
        "Context",
        "Event",
        "Failure",
        "Projection",
        "Deserialize",
        "Serialize",
        "Harness",
    ];
    if USED.contains(&camel.as_str()) { format!("{camel}Projection") } else { camel }
}

/// The `Cargo.toml`: the SDK from the workspace, from `sdk`, and serde as
/// the workspace pins it, or plainly outside one.
fn manifest(name: &str, member: Option<&Workspace>, sdk: Option<&Path>, crate_dir: &Path) -> String {
    let inherits = |dependency: &str| member.is_some_and(|w| w.declares_dependency(dependency));
    let mut text = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [lib]\n# cdylib: the .wasm module `projector build` makes; rlib: the native tests.\n\
         crate-type = [\"cdylib\", \"rlib\"]\n\n[dependencies]\n"
    );
    match sdk {
        Some(sdk) => {
            let path = relative(crate_dir, sdk).to_string_lossy().replace('\\', "/");
            writeln!(text, "projector-sdk = {{ path = \"{path}\" }}")
        }
        None => writeln!(text, "projector-sdk.workspace = true"),
    }
    .expect("writing to a String");
    text.push_str(match inherits("serde") {
        true => "serde = { workspace = true, features = [\"derive\"] }\n",
        false => "serde = { version = \"1\", features = [\"derive\"] }\n",
    });
    text.push_str(match inherits("serde_json") {
        true => "serde_json.workspace = true\n",
        false => "serde_json = \"1\"\n",
    });
    if member.is_some_and(Workspace::has_lints) {
        text.push_str("\n[lints]\nworkspace = true\n");
    }
    text
}

/// The projector-sdk crate in `dir`, or an error saying what is there.
fn sdk_folder(dir: &Path) -> Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("--sdk {}: no Cargo.toml there", dir.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", manifest.display()))?;
    let package = table.get("package").and_then(|p| p.get("name")).and_then(|n| n.as_str());
    if package != Some("projector-sdk") {
        bail!("--sdk {}: the crate there is {package:?}, not projector-sdk", dir.display());
    }
    dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))
}

/// The SDK in the source tree this projector was built from, if it is
/// still there.
fn built_from_sdk() -> Result<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("guest-sdk");
    sdk_folder(&sdk).map_err(|_| {
        anyhow::anyhow!(
            "cannot find the projector-sdk crate (it was at {} when projector was built): pass \
             --sdk <its folder>, or run `projector new` inside a workspace that declares \
             projector-sdk in [workspace.dependencies]",
            sdk.display()
        )
    })
}

/// `path` made absolute with its existing part resolved (symlinks and
/// all), so it compares with the workspace's folders.
fn resolved(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let existing = absolute.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    let rest = absolute.strip_prefix(existing).expect("an ancestor");
    Ok(existing.canonicalize()?.join(rest))
}

/// `to` relative to the folder `from` (both absolute); `to` itself when
/// they share nothing but the root.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to): (Vec<Component>, Vec<Component>) =
        (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    if common <= 1 {
        return to.iter().collect();
    }
    let mut path: PathBuf = from[common..].iter().map(|_| Component::ParentDir).collect();
    path.extend(&to[common..]);
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_name_a_crate_and_a_projection_are_refused() {
        for ok in ["login-counter", "a", "orders_v2", "x1-y2"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "Login", "2fast", "-a", "a b", "a.b", "é", &"a".repeat(65)] {
            let err = check_name(bad).unwrap_err().to_string();
            assert!(err.contains("lowercase letters"), "{bad:?}: {err}");
        }
        assert!(check_name("fn").unwrap_err().to_string().contains("keyword"));
        assert!(check_name("projector-sdk").unwrap_err().to_string().contains("builds with"));
    }

    #[test]
    fn type_names_are_camel_case_and_never_clash_with_the_template() {
        assert_eq!(type_name("login-counter"), "LoginCounter");
        assert_eq!(type_name("orders_v2"), "OrdersV2");
        assert_eq!(type_name("stock-answer"), "StockAnswerProjection");
    }

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        let crate_dir = Path::new("/w/projections/a");
        assert_eq!(
            relative(crate_dir, Path::new("/w/target/projections/a.wasm")),
            Path::new("../../target/projections/a.wasm")
        );
        assert_eq!(
            relative(crate_dir, Path::new("/w/projections/a/target/x.wasm")),
            Path::new("target/x.wasm")
        );
        assert_eq!(relative(Path::new("/tmp/a"), Path::new("/work/sdk")), Path::new("/work/sdk"));
    }
}
