//! Python and JavaScript components for the tests and the benches, built
//! with `gust build` (componentize-py; esbuild and ComponentizeJS) and
//! cached under the target directory, keyed by a hash
//! of the app's directory, the SDK and the WIT, so an unchanged app costs
//! nothing on the next run. Shared by `tests/all` and `benches/invoke.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Builds run one at a time: two tests wanting the same component must not
/// both spend 45 s on it, and two builds at once would starve the machine.
pub(crate) static BUILD: Mutex<()> = Mutex::new(());

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Every file under `dir` (sorted), for the cache key.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.file_name().is_some_and(|n| n == "__pycache__") {
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// `gust build <app> -o <out>`, or `None` (after saying why) when its
/// toolchain (componentize-py; ComponentizeJS and esbuild) is not
/// installed. The caller holds [`BUILD`].
pub(crate) fn gust_build(app: &Path, out: &Path) -> Option<std::process::Output> {
    let output = Command::new(env!("CARGO_BIN_EXE_gust"))
        .arg("build")
        .arg(app)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    for tool in ["componentize-py", "componentize-js", "esbuild"] {
        if stderr.contains(&format!("{tool} not found")) {
            // CI installs every toolchain: there a missing one is a failure.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{tool} is not installed in CI: {}",
                stderr.trim()
            );
            eprintln!("skipping: {tool} is not installed ({})", stderr.trim());
            return None;
        }
    }
    Some(output)
}

/// The cache key of an app directory: its files, the SDK package's (`sdk`,
/// under the root) and the WIT's, names and contents.
fn cache_key(app_dir: &Path, sdk: &str) -> String {
    let mut files = Vec::new();
    files_under(app_dir, &mut files);
    files_under(&root().join(sdk), &mut files);
    files_under(&root().join("wit"), &mut files);
    let mut hash = Sha256::new();
    for file in files {
        hash.update(
            file.strip_prefix(root())
                .unwrap_or(&file)
                .to_string_lossy()
                .as_bytes(),
        );
        hash.update([0]);
        hash.update(std::fs::read(&file).unwrap());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// The component of `<app_dir>/app.py`, from the cache or built now with
/// `gust build`; `None` (after saying why) when componentize-py is not
/// installed. `name` prefixes the cached file.
pub(crate) fn python_component(app_dir: &Path, name: &str) -> Option<PathBuf> {
    cached_build(app_dir, "app.py", "guest-sdk/python/gust", name)
}

/// The component of `<app_dir>/app.js`, as [`python_component`] (but with
/// ComponentizeJS and esbuild).
pub(crate) fn js_component(app_dir: &Path, name: &str) -> Option<PathBuf> {
    cached_build(app_dir, "app.js", "guest-sdk/js", name)
}

fn cached_build(app_dir: &Path, app: &str, sdk: &str, name: &str) -> Option<PathBuf> {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gust-python-cache");
    let cached = cache.join(format!("{name}-{}.wasm", cache_key(app_dir, sdk)));
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if cached.is_file() {
        return Some(cached);
    }
    std::fs::create_dir_all(&cache).unwrap();
    let partial = cached.with_extension("partial");
    let out = gust_build(&app_dir.join(app), &partial)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gust build {name} failed: {stderr}");
    std::fs::rename(&partial, &cached).unwrap();
    Some(cached)
}

/// componentize-py and the Python beside it, found where `gust build` looks
/// (`$GUST_COMPONENTIZE_PY`, `$GUST_PYTHON_VENV`, `PATH`, the default venv);
/// `None` (after saying why) when it is not installed.
pub(crate) fn componentize_py() -> Option<(PathBuf, PathBuf)> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(program) = std::env::var_os("GUST_COMPONENTIZE_PY").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(program));
    }
    if let Some(venv) = std::env::var_os("GUST_PYTHON_VENV").filter(|p| !p.is_empty()) {
        candidates.push(Path::new(&venv).join("bin/componentize-py"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("componentize-py")));
    }
    candidates.push(PathBuf::from("/var/tmp/gust-py-venv/bin/componentize-py"));
    let Some(found) = candidates.into_iter().find(|c| c.is_file()) else {
        eprintln!("skipping: componentize-py is not installed (scripts/setup-python.sh)");
        return None;
    };
    let python = found
        .parent()
        .map(|bin| bin.join("python"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"));
    Some((found, python))
}
