//! Building a Python function (`gust build app.py`, `gust deploy app.py`):
//! componentize-py 0.25 turns the app module, the `gust` SDK and any
//! pure-Python requirements into a `gust:function/guest` component.
//!
//! The SDK and the WIT it is generated against are compiled into this
//! binary and written to a scratch directory per build, so `gust` works
//! from anywhere and always pairs an app with the SDK it was built with.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::client::ClientError;

/// The componentize-py release line the SDK is written against: the
/// generated bindings' layout (`wit_world.imports…`, `componentize_py_types`)
/// changes between minor releases.
const COMPONENTIZE_PY_LINE: &str = "0.25.";

/// Where `scripts/setup-python.sh` puts its venv unless told otherwise.
const DEFAULT_VENV: &str = "/var/tmp/gust-py-venv";

/// The module componentize-py loads: it imports the user's app (which
/// registers its function) and re-exports the SDK's `Handler` class, the
/// export the bindings look for in the app module.
const ENTRY_MODULE: &str = "gust_entry";

/// The SDK files, as (path under the SDK root, contents).
const SDK_FILES: &[(&str, &str)] = &[
    (
        "gust/__init__.py",
        include_str!("../../../guest-sdk/python/gust/__init__.py"),
    ),
    (
        "gust/tensor.py",
        include_str!("../../../guest-sdk/python/gust/tensor.py"),
    ),
    (
        "gust/model.py",
        include_str!("../../../guest-sdk/python/gust/model.py"),
    ),
];

/// The WIT of the `gust:function/guest` world: the world and the two
/// packages it imports (the WASI ones componentize-py brings itself).
const WIT_FILES: &[(&str, &str)] = &[
    ("function.wit", include_str!("../../../wit/function.wit")),
    (
        "deps/gust-gpu/gpu.wit",
        include_str!("../../../wit/deps/gust-gpu/gpu.wit"),
    ),
    (
        "deps/wasi-nn/wasi-nn.wit",
        include_str!("../../../wit/deps/wasi-nn/wasi-nn.wit"),
    ),
];

/// Exactly what to run to get componentize-py, for every "not found".
fn install_hint() -> String {
    format!(
        "install it with `scripts/setup-python.sh` (a venv in {DEFAULT_VENV}), or \
         `python3 -m venv {DEFAULT_VENV} && {DEFAULT_VENV}/bin/pip install componentize-py==0.25.1`; \
         set GUST_PYTHON_VENV to use a venv elsewhere, or GUST_COMPONENTIZE_PY to name the program"
    )
}

/// A componentize-py found on this machine, with the Python beside it
/// (used for `pip install` of requirements).
#[derive(Debug)]
pub(crate) struct Toolchain {
    componentize_py: PathBuf,
    python: PathBuf,
}

/// Finds componentize-py: `$GUST_COMPONENTIZE_PY`, then the venv in
/// `$GUST_PYTHON_VENV`, then `PATH`, then the default venv. Checks that it
/// runs and is a 0.25 release.
pub(crate) fn find_toolchain() -> Result<Toolchain, ClientError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("GUST_COMPONENTIZE_PY").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    if let Some(venv) = std::env::var_os("GUST_PYTHON_VENV").filter(|p| !p.is_empty()) {
        candidates.push(Path::new(&venv).join("bin").join("componentize-py"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("componentize-py")));
    }
    candidates.push(Path::new(DEFAULT_VENV).join("bin").join("componentize-py"));

    let found = candidates
        .into_iter()
        .find(|c| c.is_file())
        .ok_or_else(|| {
            ClientError::Input(format!("componentize-py not found; {}", install_hint()))
        })?;
    let version = Command::new(&found)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            ClientError::Input(format!(
                "cannot run {}: {e}; {}",
                found.display(),
                install_hint()
            ))
        })?;
    let text = String::from_utf8_lossy(&version.stdout);
    let number = text.split_whitespace().nth(1).unwrap_or_default();
    if !version.status.success() || !number.starts_with(COMPONENTIZE_PY_LINE) {
        return Err(ClientError::Input(format!(
            "{} is componentize-py {}, but Gust's Python SDK needs {COMPONENTIZE_PY_LINE}x; {}",
            found.display(),
            if number.is_empty() {
                "of an unknown version"
            } else {
                number
            },
            install_hint()
        )));
    }
    // A venv's script sits beside its python; anywhere else, the system one.
    let python = found
        .parent()
        .map(|bin| bin.join("python"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"));
    Ok(Toolchain {
        componentize_py: found,
        python,
    })
}

/// The module name of `app` (`app.py` → `app`), which Python must be able
/// to import.
fn module_name(app: &Path) -> Result<String, ClientError> {
    let stem = app
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|_| app.extension().is_some_and(|e| e == "py"))
        .ok_or_else(|| ClientError::Input(format!("{} is not a .py file", app.display())))?;
    let valid = stem
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid || stem == ENTRY_MODULE || stem == "gust" {
        return Err(ClientError::Input(format!(
            "{}: `{stem}` is not a usable Python module name (letters, digits and `_`, \
             not `gust` or `{ENTRY_MODULE}`); rename the file",
            app.display()
        )));
    }
    Ok(stem.to_owned())
}

fn write_tree(root: &Path, files: &[(&str, &str)]) -> Result<(), ClientError> {
    for (relative, contents) in files {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| scratch_error(parent, &e))?;
        }
        std::fs::write(&path, contents).map_err(|e| scratch_error(&path, &e))?;
    }
    Ok(())
}

fn scratch_error(path: &Path, e: &std::io::Error) -> ClientError {
    ClientError::Input(format!(
        "cannot write the build's scratch file {}: {e}",
        path.display()
    ))
}

/// A spinner on stderr (only on a terminal) for the ~45 s steps.
fn spinner(message: String) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn run_quietly(command: &mut Command, what: &str) -> Result<Output, ClientError> {
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClientError::Input(format!("cannot run {what}: {e}")))
}

/// Both streams of a failed tool run, trimmed, for the error message.
fn tool_output(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    text
}

/// Builds the Python app `app` into the component `output`; returns how
/// long componentize-py took.
pub(crate) fn build_app(app: &Path, output: &Path) -> Result<Duration, ClientError> {
    let module = module_name(app)?;
    let app = app
        .canonicalize()
        .map_err(|e| ClientError::Input(format!("{}: {e}", app.display())))?;
    let app_dir = app
        .parent()
        .ok_or_else(|| ClientError::Input(format!("{} has no directory", app.display())))?
        .to_path_buf();
    let tools = find_toolchain()?;

    let scratch = tempfile::Builder::new()
        .prefix("gust-python-build-")
        .tempdir()
        .map_err(|e| ClientError::Input(format!("cannot create a scratch directory: {e}")))?;
    let root = scratch.path();
    let (wit, sdk, entry, deps) = (
        root.join("wit"),
        root.join("sdk"),
        root.join("entry"),
        root.join("deps"),
    );
    write_tree(&wit, WIT_FILES)?;
    write_tree(&sdk, SDK_FILES)?;
    let entry_source = format!(
        "# Generated by `gust build`: loads the app, then exports the SDK's handler.\n\
         import gust\nimport {module}  # noqa: F401 (registers the @gust.function)\n\
         gust._require_handler()\nHandler = gust.Handler\n"
    );
    write_tree(&entry, &[("gust_entry.py", entry_source.as_str())])?;

    let requirements = app_dir.join("requirements.txt");
    let mut search_path = vec![entry, app_dir, sdk];
    if requirements.is_file() {
        install_requirements(&tools, &requirements, &deps)?;
        search_path.push(deps);
    }

    let output = if output.is_absolute() {
        output.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| ClientError::Input(format!("no current directory: {e}")))?
            .join(output)
    };
    let bar = spinner(format!(
        "building {} with componentize-py (usually 40–50 s)",
        app.display()
    ));
    let started = Instant::now();
    let mut command = Command::new(&tools.componentize_py);
    command
        .arg("-d")
        .arg(&wit)
        .args(["-w", "gust:function/guest", "componentize"]);
    for dir in &search_path {
        command.arg("-p").arg(dir);
    }
    command.arg(ENTRY_MODULE).arg("-o").arg(&output);
    // Byte-code caches would land in the user's source tree; the component
    // carries its own.
    command
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(root);
    let result = run_quietly(&mut command, "componentize-py");
    bar.finish_and_clear();
    let result = result?;
    if !result.status.success() {
        return Err(ClientError::Input(format!(
            "building {} failed:\n{}",
            app.display(),
            tool_output(&result)
        )));
    }
    Ok(started.elapsed())
}

/// `pip install --target deps -r requirements.txt`, then refuses any
/// distribution that is not pure Python: native code cannot run inside
/// the component, and would fail only at the first call otherwise.
fn install_requirements(
    tools: &Toolchain,
    requirements: &Path,
    deps: &Path,
) -> Result<(), ClientError> {
    let bar = spinner(format!("installing {}", requirements.display()));
    let mut command = Command::new(&tools.python);
    command
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-compile", "--target"])
        .arg(deps)
        .arg("-r")
        .arg(requirements);
    let result = run_quietly(&mut command, "pip");
    bar.finish_and_clear();
    let result = result?;
    if !result.status.success() {
        return Err(ClientError::Input(format!(
            "installing {} failed:\n{}",
            requirements.display(),
            tool_output(&result)
        )));
    }
    let native = native_distributions(deps)?;
    if !native.is_empty() {
        return Err(ClientError::Input(format!(
            "{} needs {}, which {} native extensions; a Python function can only bundle \
             pure-Python packages (componentize-py cannot load native code built for this \
             machine). Remove {} from the requirements or find a pure-Python alternative",
            requirements.display(),
            native.join(", "),
            if native.len() == 1 { "has" } else { "have" },
            if native.len() == 1 { "it" } else { "them" },
        )));
    }
    Ok(())
}

/// The distributions installed under `deps` that carry native code: a
/// wheel marked `Root-Is-Purelib: false`, or any shared library in its
/// RECORD. Sorted, by the name in the dist-info directory.
fn native_distributions(deps: &Path) -> Result<Vec<String>, ClientError> {
    let unreadable = |p: &Path, e: std::io::Error| {
        ClientError::Input(format!(
            "cannot inspect the installed requirements {}: {e}",
            p.display()
        ))
    };
    let mut native = Vec::new();
    let entries = std::fs::read_dir(deps).map_err(|e| unreadable(deps, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| unreadable(deps, e))?;
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        let Some(dist) = dir_name.strip_suffix(".dist-info") else {
            continue;
        };
        let name = dist.split('-').next().unwrap_or(dist).to_owned();
        let wheel = std::fs::read_to_string(entry.path().join("WHEEL")).unwrap_or_default();
        let record = std::fs::read_to_string(entry.path().join("RECORD")).unwrap_or_default();
        if is_native(&wheel, &record) {
            native.push(name);
        }
    }
    native.sort();
    native.dedup();
    Ok(native)
}

/// Whether a wheel's `WHEEL` and `RECORD` files show native code.
fn is_native(wheel: &str, record: &str) -> bool {
    let platlib = wheel.lines().any(|l| {
        l.replace(' ', "")
            .eq_ignore_ascii_case("Root-Is-Purelib:false")
    });
    let shared_library = record.lines().any(|line| {
        let path = line.split(',').next().unwrap_or_default();
        let file = path.rsplit('/').next().unwrap_or_default();
        file.ends_with(".so")
            || file.contains(".so.")
            || file.ends_with(".pyd")
            || file.ends_with(".dylib")
    });
    platlib || shared_library
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_must_import() {
        assert_eq!(
            module_name(Path::new("x/app.py")).ok().as_deref(),
            Some("app")
        );
        assert_eq!(
            module_name(Path::new("my_app2.py")).ok().as_deref(),
            Some("my_app2")
        );
        assert!(module_name(Path::new("my-app.py")).is_err());
        assert!(module_name(Path::new("2app.py")).is_err());
        assert!(module_name(Path::new("gust.py")).is_err());
        assert!(module_name(Path::new("app.txt")).is_err());
    }

    #[test]
    fn native_wheels_are_told_from_pure_ones() {
        let pure_wheel = "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
        let pure_record = "six.py,sha256=x,100\nsix-1.16.0.dist-info/RECORD,,\n";
        assert!(!is_native(pure_wheel, pure_record));
        let native_wheel =
            "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp312-cp312-manylinux\n";
        assert!(is_native(native_wheel, pure_record));
        let hidden = "pkg/__init__.py,sha256=x,1\npkg/_speedups.cpython-312-x86_64-linux-gnu.so,sha256=y,2\n";
        assert!(is_native(pure_wheel, hidden));
        assert!(is_native(
            pure_wheel,
            "numpy.libs/libopenblas.so.0,sha256=z,3\n"
        ));
    }

    #[test]
    fn the_embedded_sdk_names_every_module_it_imports() {
        // `from .model import …` in __init__ must find a file in SDK_FILES.
        let init = SDK_FILES[0].1;
        for line in init.lines().filter(|l| l.starts_with("from .")) {
            let module = line["from .".len()..]
                .split_whitespace()
                .next()
                .unwrap_or_default();
            let path = format!("gust/{module}.py");
            assert!(
                SDK_FILES.iter().any(|(p, _)| *p == path),
                "{path} is not embedded"
            );
        }
    }
}
