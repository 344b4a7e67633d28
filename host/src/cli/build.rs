//! Building a function from source, for `gust build` and for
//! `gust deploy <dir|app.py>`: a Rust crate (a folder with `Cargo.toml`) is
//! built with cargo for wasm32-wasip2 and its cdylib is the component; a
//! Python app (`app.py`) is built with componentize-py (see
//! [`super::python`]). Either way a function deploys with one command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Args;

use super::client::ClientError;

#[derive(Debug, Args)]
pub(crate) struct BuildArgs {
    /// What to build: a Python app (`app.py`; a `requirements.txt` beside
    /// it is bundled, pure-Python packages only), a JavaScript or
    /// TypeScript app (`app.js`, `app.ts`; its imports and pure-JS npm
    /// packages are bundled) or a Rust crate's directory.
    pub(crate) source: PathBuf,

    /// Where to write the component [default: the app's path with `.wasm`
    /// for Python; cargo's target directory for a crate].
    #[arg(short, long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
}

/// Whether `source` names a Python app rather than a crate or component.
pub(crate) fn is_python(source: &Path) -> bool {
    source.extension().is_some_and(|e| e == "py")
}

/// Whether `source` names an app in a language `gust build` builds from a
/// single source file (Python, JavaScript, TypeScript).
pub(crate) fn is_script(source: &Path) -> bool {
    is_python(source) || super::js::is_js(source)
}

/// Builds the app `source` (see [`is_script`]) into the component `output`.
pub(crate) fn build_script(source: &Path, output: &Path) -> Result<(), ClientError> {
    if is_python(source) {
        super::python::build_app(source, output)?;
    } else {
        super::js::build_app(source, output)?;
    }
    Ok(())
}

/// `gust build`: builds and prints where the component is.
pub(crate) async fn build(
    args: &BuildArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let source = args.source.clone();
    let output = args.output.clone();
    let component = tokio::task::spawn_blocking(move || build_any(&source, output))
        .await
        .map_err(|e| ClientError::Input(format!("the build panicked: {e}")))??;
    let size = std::fs::metadata(&component)
        .map(|m| bytesize::ByteSize::b(m.len()).to_string())
        .unwrap_or_else(|_| "unknown size".to_owned());
    writeln!(out, "{} ({size})", component.display()).map_err(ClientError::Output)
}

fn build_any(source: &Path, output: Option<PathBuf>) -> Result<PathBuf, ClientError> {
    if is_script(source) {
        let output = output.unwrap_or_else(|| source.with_extension("wasm"));
        build_script(source, &output)?;
        return Ok(output);
    }
    if !source.is_dir() {
        return Err(ClientError::Input(format!(
            "{} is neither a Python app (`.py`), a JavaScript or TypeScript app (`.js`, `.ts`) nor a Rust crate directory",
            source.display()
        )));
    }
    let built = build_crate(source)?;
    match output {
        Some(output) => {
            std::fs::copy(&built.component, &output).map_err(|e| {
                ClientError::Input(format!(
                    "cannot copy {} to {}: {e}",
                    built.component.display(),
                    output.display()
                ))
            })?;
            Ok(output)
        }
        None => Ok(built.component),
    }
}

/// A component built from source: where it is and the package's name.
#[derive(Debug)]
pub(crate) struct Built {
    pub(crate) component: PathBuf,
    pub(crate) package: String,
}

/// Build the crate in `dir` (release, wasm32-wasip2) and return its
/// component. Cargo's own progress and diagnostics go to stderr.
pub(crate) fn build_crate(dir: &Path) -> Result<Built, ClientError> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(ClientError::Input(format!(
            "{} is a directory without a Cargo.toml; pass a .wasm component or a Rust crate",
            dir.display()
        )));
    }
    let manifest = manifest
        .canonicalize()
        .map_err(|e| ClientError::Input(format!("{}: {e}", manifest.display())))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| {
            ClientError::Input(format!(
                "cannot run cargo to build {}: {e} (install Rust from https://rustup.rs, then \
                 `rustup target add wasm32-wasip2`)",
                dir.display()
            ))
        })?;
    if !output.status.success() {
        return Err(ClientError::Input(format!(
            "building {} failed (cargo's errors are above; is the wasm32-wasip2 target \
             installed? `rustup target add wasm32-wasip2`)",
            dir.display()
        )));
    }
    find_component(&String::from_utf8_lossy(&output.stdout), &manifest).ok_or_else(|| {
        ClientError::Input(format!(
            "building {} produced no component: the crate needs `crate-type = [\"cdylib\"]` \
             under [lib]",
            dir.display()
        ))
    })
}

/// The `.wasm` of the cdylib built from `manifest`, among cargo's JSON
/// messages (one per line; dependencies' artifacts come first).
fn find_component(messages: &str, manifest: &Path) -> Option<Built> {
    messages.lines().rev().find_map(|line| {
        let message: serde_json::Value = serde_json::from_str(line).ok()?;
        if message["reason"] != "compiler-artifact"
            || Path::new(message["manifest_path"].as_str()?) != manifest
        {
            return None;
        }
        let is_cdylib = message["target"]["kind"]
            .as_array()?
            .iter()
            .any(|k| k == "cdylib");
        if !is_cdylib {
            return None;
        }
        let component = message["filenames"]
            .as_array()?
            .iter()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"))?;
        Some(Built {
            component: PathBuf::from(component),
            package: message["package_id"]
                .as_str()
                .and_then(package_name)
                .unwrap_or_else(|| message["target"]["name"].as_str().unwrap_or("function"))
                .to_owned(),
        })
    })
}

/// The name in a cargo package id: `path+file:///x/embed#0.1.0` (path
/// packages) or `registry+…#name@1.0`.
fn package_name(id: &str) -> Option<&str> {
    let fragment = id.rsplit_once('#')?.1;
    match fragment.split_once('@') {
        Some((name, _)) => Some(name),
        None => {
            let path = id.rsplit_once('#')?.0;
            path.rsplit('/').next()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crates_own_cdylib_is_found_among_cargo_messages() {
        let manifest = Path::new("/src/examples/embed/Cargo.toml");
        let messages = [
            r#"{"reason":"compiler-artifact","package_id":"registry+https://github.com/rust-lang/crates.io-index#serde@1.0.0","manifest_path":"/r/serde/Cargo.toml","target":{"kind":["lib"],"name":"serde"},"filenames":["/t/libserde.rlib"]}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///src/examples/embed#0.0.0","manifest_path":"/src/examples/embed/Cargo.toml","target":{"kind":["cdylib"],"name":"embed"},"filenames":["/t/wasm32-wasip2/release/embed.wasm"]}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        let built = find_component(&messages, manifest).unwrap();
        assert_eq!(
            built.component,
            Path::new("/t/wasm32-wasip2/release/embed.wasm")
        );
        assert_eq!(built.package, "embed");
        assert!(find_component(&messages, Path::new("/other/Cargo.toml")).is_none());
        assert_eq!(
            package_name("path+file:///src/x/tensor-math#tensor-math@0.1.0"),
            Some("tensor-math")
        );
    }
}
