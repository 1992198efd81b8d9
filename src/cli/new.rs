//! `edgefn new`: a new function's skeleton, with its build command and a
//! README saying how to build, invoke and deploy it — Lambda's "author from
//! scratch" with a runtime picked.
//!
//! The skeleton is self-contained: a Python or JavaScript one carries the
//! WIT world and edgefn's small guest package, a Rust one the SDK, so it
//! builds outside this repository.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

/// The languages a skeleton can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A component built with componentize-py.
    Python,
    /// A component built with componentize-js.
    #[value(alias = "javascript")]
    Js,
    /// A core module built with cargo and the edgefn SDK.
    Rust,
    /// A core module built with clang and wasi-libc.
    C,
}

/// `edgefn new`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The function's name: letters, digits, '-' or '_' (its directory,
    /// module file and `name` in the configuration).
    name: String,
    /// Its language.
    #[arg(long, value_enum)]
    lang: Lang,
    /// The directory to create [default: ./NAME]; it must not exist.
    #[arg(long)]
    dir: Option<PathBuf>,
}

const WIT: &str = include_str!("../../wit/edgefn.wit");
const WIT_ENVIRONMENT: &str = include_str!("../../wit/deps/cli/environment.wit");
const README: &str = include_str!("new/README.md");

/// The files of a skeleton: path and contents (with `{{name}}` and
/// `{{lib}}` to fill in), and whether it is executable.
fn files(lang: Lang) -> Vec<(&'static str, &'static str, bool)> {
    let wit = [
        ("wit/edgefn.wit", WIT, false),
        ("wit/deps/cli/environment.wit", WIT_ENVIRONMENT, false),
    ];
    match lang {
        Lang::Python => [
            ("app.py", include_str!("new/python_app.py"), false),
            (
                "edgefn/__init__.py",
                include_str!("../../functions/python/sdk/edgefn/__init__.py"),
                false,
            ),
            ("build.sh", include_str!("new/python_build.sh"), true),
        ]
        .into_iter()
        .chain(wit)
        .collect(),
        Lang::Js => [
            ("index.js", include_str!("new/js_index.js"), false),
            (
                "edgefn.js",
                include_str!("../../functions/js/sdk/edgefn.js"),
                false,
            ),
            (
                "build.mjs",
                include_str!("../../functions/js/build.mjs"),
                false,
            ),
            ("package.json", include_str!("new/js_package.json"), false),
            ("build.sh", JS_BUILD, true),
        ]
        .into_iter()
        .chain(wit)
        .collect(),
        Lang::Rust => vec![
            ("Cargo.toml", include_str!("new/rust_Cargo.toml"), false),
            ("src/lib.rs", include_str!("new/rust_lib.rs"), false),
            (
                "sdk/Cargo.toml",
                include_str!("../../functions/sdk/Cargo.toml"),
                false,
            ),
            (
                "sdk/src/lib.rs",
                include_str!("../../functions/sdk/src/lib.rs"),
                false,
            ),
            (
                "sdk/src/json.rs",
                include_str!("../../functions/sdk/src/json.rs"),
                false,
            ),
            (
                "sdk/src/state.rs",
                include_str!("../../functions/sdk/src/state.rs"),
                false,
            ),
            (
                "sdk/src/sys.rs",
                include_str!("../../functions/sdk/src/sys.rs"),
                false,
            ),
            (
                "sdk/src/testing.rs",
                include_str!("../../functions/sdk/src/testing.rs"),
                false,
            ),
            ("build.sh", include_str!("new/rust_build.sh"), true),
        ],
        Lang::C => vec![
            ("{{name}}.c", include_str!("new/c_function.c"), false),
            ("build.sh", include_str!("new/c_build.sh"), true),
        ],
    }
}

/// `build.sh` of a JavaScript skeleton.
const JS_BUILD: &str = r#"#!/usr/bin/env bash
# Builds {{name}}.wasm (a WebAssembly component) with componentize-js,
# installed into node_modules on first use (needs node and npm).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [[ ! -d node_modules/@bytecodealliance/componentize-js ]]; then
    npm install --no-audit --no-fund --loglevel=error
fi
node build.mjs index.js {{name}}.wasm
"#;

/// What the Python, JavaScript and Rust skeletons do.
const JSON_SKELETON: &str = "It parses each message's payload as a JSON object, adds `device` (the topic's second level) and emits it to `processed/<topic>`; with `VERBOSE=1` in its env it logs each one.";

/// What the README says per language: its name, the kind of function, the
/// source to edit, the toolchain, and a memory line for the configuration.
fn readme_fields(lang: Lang) -> [(&'static str, &'static str); 6] {
    match lang {
        Lang::Python => [
            ("{{language}}", "Python"),
            ("{{does}}", JSON_SKELETON),
            (
                "{{kind}}",
                "a WebAssembly component built with componentize-py (docs/PYTHON.md)",
            ),
            (
                "{{source}}",
                "`app.py`; `edgefn/` is edgefn's guest package, `wit/` the function world",
            ),
            (
                "{{toolchain}}",
                "It needs python3 with venv; componentize-py 0.25.1 is installed into `.venv` on first use (from PyPI).",
            ),
            (
                "{{memory}}",
                "memory_limit = \"64MiB\"   # the default for a component; Python has about 14 MiB in use at start\n",
            ),
        ],
        Lang::Js => [
            ("{{language}}", "JavaScript"),
            ("{{does}}", JSON_SKELETON),
            (
                "{{kind}}",
                "a WebAssembly component built with componentize-js (docs/JAVASCRIPT.md)",
            ),
            (
                "{{source}}",
                "`index.js`; `edgefn.js` is edgefn's guest module, `wit/` the function world",
            ),
            (
                "{{toolchain}}",
                "It needs node and npm; componentize-js 0.23.0 is installed into `node_modules` on first use (from npm).",
            ),
            (
                "{{memory}}",
                "memory_limit = \"64MiB\"   # the default for a component; JavaScript has about 9 MiB in use at start\n",
            ),
        ],
        Lang::Rust => [
            ("{{language}}", "Rust"),
            ("{{does}}", JSON_SKELETON),
            (
                "{{kind}}",
                "a core WebAssembly module (ABI v1, docs/ABI.md)",
            ),
            (
                "{{source}}",
                "`src/lib.rs`; `sdk/` is edgefn's SDK (no dependencies, Rust 1.63 and later)",
            ),
            (
                "{{toolchain}}",
                "It needs rustup's `wasm32-wasip1` target (`rustup target add wasm32-wasip1`), or Debian's Rust: `apt-get install rustc cargo libstd-rust-dev-wasm32 lld-14 wasi-libc`. `cargo test` runs the SDK's native stand-in for the gateway.",
            ),
            ("{{memory}}", ""),
        ],
        Lang::C => [
            ("{{language}}", "C"),
            (
                "{{does}}",
                "It emits each message's payload unchanged to `processed/<topic>`.",
            ),
            (
                "{{kind}}",
                "a core WebAssembly module (ABI v1, docs/ABI.md)",
            ),
            ("{{source}}", "`{{name}}.c`"),
            (
                "{{toolchain}}",
                "It needs clang and wasi-libc: `apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32`.",
            ),
            ("{{memory}}", ""),
        ],
    }
}

/// Writes the skeleton; fails if the name is not a function name or the
/// directory exists.
pub fn command(args: Args) -> anyhow::Result<ExitCode> {
    let name = &args.name;
    // A function's name (the configuration's rule), which is also a file
    // name, a cargo package name and a command-line argument here: it
    // starts with a letter.
    if !name.starts_with(|c: char| c.is_ascii_alphabetic())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!(
            "{name:?} is not a function name: start with a letter, then letters, digits, '-' or '_'"
        );
    }
    if name.replace('-', "_") == "edgefn_sdk" || name == edgefn::config::UPSTREAM {
        anyhow::bail!("{name:?} is taken (the SDK's name, or reserved); pick another");
    }
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        anyhow::bail!("{} exists; give a new directory with --dir", dir.display());
    }
    write(&dir, name, args.lang)?;
    println!(
        "wrote {}: {:?} function {name}; next: cd {} && ./build.sh && edgefn invoke {name}.wasm --topic sensors/pi-7/temperature --payload '{{\"temp_c\":21.5}}' (README.md says more)",
        dir.display(),
        args.lang,
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the files of `lang`'s skeleton for `name` into `dir`.
fn write(dir: &Path, name: &str, lang: Lang) -> anyhow::Result<()> {
    let lib = name.replace('-', "_");
    let fill = |text: &str| text.replace("{{name}}", name).replace("{{lib}}", &lib);
    let mut readme = README.to_owned();
    for (key, value) in readme_fields(lang) {
        readme = readme.replace(key, value);
    }
    let mut all = files(lang);
    all.push(("README.md", "", false));
    for (path, text, executable) in all {
        let path = dir.join(fill(path));
        let text = if path.ends_with("README.md") {
            fill(&readme)
        } else {
            fill(text)
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}
