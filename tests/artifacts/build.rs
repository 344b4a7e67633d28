//! Builds the guest programs (`tests/programs`) and examples (`examples`) for
//! `wasm32-wasip2` with a nested cargo, then writes `artifacts.rs` into
//! `OUT_DIR` with a path constant per component.
//!
//! Modelled on Wasmtime's `test-programs-artifacts`.

// Build scripts talk to cargo through stdout.
#![allow(clippy::print_stdout)]

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

const WASM_TARGET: &str = "wasm32-wasip2";

/// The first 8 bytes of a component: magic, then version 0x0d and layer 1.
const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

/// One guest crate the build produces.
struct Guest {
    /// The directory it lives in, relative to the repository root.
    dir: String,
    /// Its package name, e.g. `returns-error`.
    package: String,
    /// The stem of the generated constant, e.g. `RETURNS_ERROR`.
    const_stem: String,
    /// Where cargo puts the component.
    wasm: PathBuf,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // Cargo prints a failed build script's stderr, so this is what the
            // user sees under "failed to run custom build command".
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let repo = manifest_dir
        .join("../..")
        .canonicalize()
        .map_err(|e| format!("cannot resolve the repository root: {e}"))?;
    let programs = repo.join("tests/programs");
    let examples = repo.join("examples");

    // Whole directories: a program added under tests/programs is picked up
    // without editing any manifest (its workspace uses `members = ["*"]`).
    for watched in [
        programs.clone(),
        examples.join("Cargo.toml"),
        examples.join("Cargo.lock"),
        repo.join("guest-sdk/rust"),
        repo.join("wit"),
        // gust-sdk inherits its dependencies from here.
        repo.join("Cargo.toml"),
    ] {
        println!("cargo::rerun-if-changed={}", watched.display());
    }

    let target_dir = guest_target_dir(&out_dir);
    let release_dir = target_dir.join(WASM_TARGET).join("release");

    let fixtures = discover(&repo, "tests/programs", &release_dir, "")?;
    let example_list = discover(&repo, "examples", &release_dir, "EXAMPLE_")?;
    // Examples are named by member directory in examples/Cargo.toml; watch
    // only those rather than all of examples/, whose `target/` a reader may
    // fill by following the examples' README.
    for example in &example_list {
        println!(
            "cargo::rerun-if-changed={}",
            repo.join(&example.dir).display()
        );
    }

    check_wasm_target()?;
    cargo_build(&programs.join("Cargo.toml"), &target_dir)?;
    cargo_build(&examples.join("Cargo.toml"), &target_dir)?;

    for guest in fixtures.iter().chain(&example_list) {
        check_component(guest)?;
    }

    let code = generate(&fixtures, &example_list);
    let dest = out_dir.join("artifacts.rs");
    fs::write(&dest, code).map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name}"))
}

/// A stable directory for the nested build, so repeated builds (and CI caches
/// of `target/`) reuse it: `<target dir>/gust-guests`. The target directory is
/// the ancestor of `OUT_DIR` holding cargo's `CACHEDIR.TAG`; if the layout is
/// unexpected, fall back to `OUT_DIR`, which is always correct, just colder.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .unwrap_or(out_dir)
        .join("gust-guests")
}

/// Every subdirectory of `rel_dir` with a `Cargo.toml`, sorted by name.
fn discover(
    repo: &Path,
    rel_dir: &str,
    release_dir: &Path,
    const_prefix: &str,
) -> Result<Vec<Guest>, String> {
    let dir = repo.join(rel_dir);
    let entries = fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut guests = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let manifest = entry.path().join("Cargo.toml");
        if entry.file_name() == "target" || !manifest.is_file() {
            continue;
        }
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        let package = package_name(&manifest)?;
        // Fixtures are named after their crate; examples after their
        // directory, since their crate names need not be unique.
        let base = if const_prefix.is_empty() {
            &package
        } else {
            &dir_name
        };
        guests.push(Guest {
            dir: format!("{rel_dir}/{dir_name}"),
            const_stem: format!("{const_prefix}{}", base.replace('-', "_").to_uppercase()),
            wasm: release_dir.join(format!("{}.wasm", package.replace('-', "_"))),
            package,
        });
    }
    guests.sort_by(|a, b| a.dir.cmp(&b.dir));
    if guests.is_empty() {
        return Err(format!("found no crates under {}", dir.display()));
    }
    Ok(guests)
}

/// The `name` in a manifest's `[package]` table. A line-based read is enough
/// for the simple manifests here and keeps the build script dependency-free.
fn package_name(manifest: &Path) -> Result<String, String> {
    let text = fs::read_to_string(manifest)
        .map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    let mut in_package = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package
            && let Some(value) = line
                .strip_prefix("name")
                .and_then(|rest| rest.trim_start().strip_prefix('='))
        {
            let name = value.trim().trim_matches('"');
            if !name.is_empty() {
                return Ok(name.to_owned());
            }
        }
    }
    Err(format!(
        "{} has no `name = \"…\"` in its [package] table",
        manifest.display()
    ))
}

/// Fails early with the fix when the standard library for the wasm target is
/// missing, instead of a wall of "can't find crate for `core`" errors.
fn check_wasm_target() -> Result<(), String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", rustc.to_string_lossy()))?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let has_std = fs::read_dir(&libdir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
    });
    if output.status.success() && has_std {
        Ok(())
    } else {
        Err(format!(
            "the {WASM_TARGET} target is not installed for this toolchain; the guest \
             test programs need it.\n  fix: rustup target add {WASM_TARGET}"
        ))
    }
}

/// `cargo build --release --target wasm32-wasip2` for one guest workspace.
fn cargo_build(manifest: &Path, target_dir: &Path) -> Result<(), String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(WASM_TARGET)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(target_dir)
        // Cargo talks on stderr; our stdout is reserved for `cargo::` lines.
        .stdout(Stdio::from(std::io::stderr()));
    // The outer build's settings are for host code and must not leak into
    // the guests: flags meant for x86 (or coverage/sanitizers), clippy as a
    // workspace wrapper, or a target dir/target override. The jobserver
    // (CARGO_MAKEFLAGS) is deliberately kept so the nested build shares the
    // outer build's job slots instead of oversubscribing the machine.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cargo.to_string_lossy()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the guest workspace {} for {WASM_TARGET} failed ({status}); \
             its compiler output is above. Reproduce with:\n  \
             cargo build --release --target {WASM_TARGET} --manifest-path {}",
            manifest.display(),
            manifest.display()
        ))
    }
}

/// Confirms cargo produced a component (not a core module) for `guest`.
fn check_component(guest: &Guest) -> Result<(), String> {
    let mut header = [0u8; 8];
    fs::File::open(&guest.wasm)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| {
            format!(
                "{} (package `{}` in {}) was not produced: {e}. Guest crates must be \
                 `crate-type = [\"cdylib\"]` and keep the default lib name.",
                guest.wasm.display(),
                guest.package,
                guest.dir
            )
        })?;
    if header == COMPONENT_HEADER {
        Ok(())
    } else {
        Err(format!(
            "{} is not a WebAssembly component (header {header:02x?})",
            guest.wasm.display()
        ))
    }
}

fn generate(fixtures: &[Guest], examples: &[Guest]) -> String {
    let mut code = String::from("// @generated by tests/artifacts/build.rs\n\n");
    for guest in fixtures.iter().chain(examples) {
        let path = guest.wasm.to_string_lossy();
        // `{:?}` of a str is a valid Rust string literal, escapes included.
        let _ = writeln!(
            code,
            "/// Absolute path of the component built from `{dir}` (package \
             `{package}`).\npub const {stem}_COMPONENT: &str = {path:?};\n",
            dir = guest.dir,
            package = guest.package,
            stem = guest.const_stem,
        );
    }
    for (name, guests, what) in [
        ("FIXTURES", fixtures, "test program under `tests/programs`"),
        ("EXAMPLES", examples, "example under `examples`"),
    ] {
        let _ = writeln!(
            code,
            "/// Every {what}, as `(name, component path)`; names use \
             underscores.\npub const {name}: &[(&str, &str)] = &["
        );
        for guest in guests {
            let short = guest.const_stem.trim_start_matches("EXAMPLE_");
            let _ = writeln!(
                code,
                "    ({:?}, {}_COMPONENT),",
                short.to_lowercase(),
                guest.const_stem
            );
        }
        code.push_str("];\n\n");
    }
    code.push_str(
        "/// Invokes `$mac!(name)` once for each test program under `tests/programs`,\n\
         /// `name` being the snake_case crate name (e.g. `returns_error`).\n\
         ///\n\
         /// Use it to make a missing test a compile error; see the crate docs.\n\
         #[macro_export]\n\
         macro_rules! foreach_fixture {\n    ($mac:ident) => {\n",
    );
    for guest in fixtures {
        let _ = writeln!(code, "        $mac!({});", guest.const_stem.to_lowercase());
    }
    code.push_str("    };\n}\n");
    code
}
