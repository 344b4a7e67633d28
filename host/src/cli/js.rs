//! Building a JavaScript or TypeScript function (`gust build app.js|app.ts`,
//! `gust deploy app.js`): esbuild bundles the app, its own imports, its
//! pure-JS npm dependencies and the `gust` SDK into one ES module, and
//! ComponentizeJS (SpiderMonkey, pre-initialised with Wizer) turns that into
//! a `gust:function/guest` component.
//!
//! The SDK and the WIT are compiled into this binary and written to a
//! scratch directory per build, as for Python. Whatever cannot run inside a
//! component is refused at build time, by esbuild, with file and line: a
//! syntax error, an app without a default export, and any import of a Node
//! built-in (`fs`, `node:net`, …) or of a package that needs one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::client::ClientError;
use super::python::{WIT_FILES, run_quietly, spinner, tool_output, write_tree};

/// The ComponentizeJS release line the SDK is built and tested with.
const COMPONENTIZE_JS_LINE: &str = "0.23.";

/// Where `scripts/setup-js.sh` installs the tools unless told otherwise.
const DEFAULT_TOOLS: &str = "/var/tmp/gust-js-tools";

/// The SDK package, as (path under the scratch `node_modules`, contents).
const SDK_FILES: &[(&str, &str)] = &[
    (
        "gust/package.json",
        include_str!("../../../guest-sdk/js/package.json"),
    ),
    (
        "gust/index.js",
        include_str!("../../../guest-sdk/js/index.js"),
    ),
    (
        "gust/tensor.js",
        include_str!("../../../guest-sdk/js/tensor.js"),
    ),
    ("gust/web.js", include_str!("../../../guest-sdk/js/web.js")),
    (
        "gust/output.js",
        include_str!("../../../guest-sdk/js/output.js"),
    ),
    (
        "gust/output-web.js",
        include_str!("../../../guest-sdk/js/output-web.js"),
    ),
    (
        "gust/index.d.ts",
        include_str!("../../../guest-sdk/js/index.d.ts"),
    ),
];

/// The file extensions `gust build` treats as a JavaScript or TypeScript
/// app.
const EXTENSIONS: &[&str] = &["js", "mjs", "ts", "mts"];

/// Whether `source` names a JavaScript or TypeScript app.
pub(crate) fn is_js(source: &Path) -> bool {
    source
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e))
}

/// Exactly what to run to get the tools, for every "not found".
fn install_hint() -> String {
    format!(
        "install them with `scripts/setup-js.sh` (npm, into {DEFAULT_TOOLS}), or \
         `npm install --prefix {DEFAULT_TOOLS} @bytecodealliance/componentize-js@0.23.0 esbuild`; \
         set GUST_JS_TOOLS to use another prefix, or GUST_COMPONENTIZE_JS and GUST_ESBUILD to \
         name the programs"
    )
}

/// ComponentizeJS and esbuild, found on this machine.
#[derive(Debug)]
struct Tools {
    componentize_js: PathBuf,
    esbuild: PathBuf,
}

/// The `node_modules/.bin` directories to look in, best first:
/// `$GUST_JS_TOOLS`, the app's directory and its ancestors, the current
/// directory, `PATH`, then the default prefix.
fn bin_dirs(app_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(prefix) = std::env::var_os("GUST_JS_TOOLS").filter(|p| !p.is_empty()) {
        dirs.push(Path::new(&prefix).join("node_modules/.bin"));
    }
    dirs.extend(app_dir.ancestors().map(|d| d.join("node_modules/.bin")));
    if let Ok(cwd) = std::env::current_dir() {
        dirs.push(cwd.join("node_modules/.bin"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.push(Path::new(DEFAULT_TOOLS).join("node_modules/.bin"));
    dirs
}

fn find_tools(app_dir: &Path) -> Result<Tools, ClientError> {
    let dirs = bin_dirs(app_dir);
    let find = |variable: &str, program: &str| -> Result<PathBuf, ClientError> {
        std::env::var_os(variable)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .into_iter()
            .chain(dirs.iter().map(|d| d.join(program)))
            .find(|c| c.is_file())
            .ok_or_else(|| ClientError::Input(format!("{program} not found; {}", install_hint())))
    };
    let componentize_js = find("GUST_COMPONENTIZE_JS", "componentize-js")?;
    let esbuild = find("GUST_ESBUILD", "esbuild")?;
    let version = run_quietly(
        Command::new(&componentize_js).arg("--version"),
        "componentize-js",
    )?;
    let number = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    if !version.status.success() || !number.starts_with(COMPONENTIZE_JS_LINE) {
        return Err(ClientError::Input(format!(
            "{} is componentize-js {}, but Gust's JavaScript SDK is built with {COMPONENTIZE_JS_LINE}x; {}",
            componentize_js.display(),
            if number.is_empty() {
                "of an unknown version"
            } else {
                &number
            },
            install_hint()
        )));
    }
    Ok(Tools {
        componentize_js,
        esbuild,
    })
}

/// What kind of component an app becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppKind {
    /// `gust.fn`: exports `gust:function/handler`.
    Function,
    /// `gust.http`: a `wasi:http/proxy` component.
    Web,
}

impl AppKind {
    /// Which one `source` is. The world is chosen before the app runs (at
    /// build time nothing of it runs), so this reads the source, as for
    /// Python: a call of `gust.http(` makes a web app.
    fn of(source: &str) -> Self {
        if source.contains("gust.http(") {
            Self::Web
        } else {
            Self::Function
        }
    }

    fn world(self) -> &'static str {
        match self {
            Self::Function => "gust:function/guest",
            Self::Web => "gust:function/http-guest",
        }
    }

    /// The SDK's `gust.emit`: the output stream, or (a web app's world has
    /// none) a refusal.
    fn output_module(self) -> &'static str {
        match self {
            Self::Function => "./node_modules/gust/output.js",
            Self::Web => "./node_modules/gust/output-web.js",
        }
    }
}

/// The module ComponentizeJS builds from: the app's default export made
/// into the world's export.
fn entry_source(app: &Path, kind: AppKind) -> Result<String, ClientError> {
    let path = app
        .to_str()
        .ok_or_else(|| ClientError::Input(format!("{} is not a UTF-8 path", app.display())))?;
    // A JSON string is a valid JavaScript string literal.
    let literal = serde_json::to_string(path)
        .map_err(|e| ClientError::Input(format!("{}: {e}", app.display())))?;
    // The module also runs the SDK's warm-up while ComponentizeJS snapshots
    // it, so a fresh instance's first call finds what it needs made:
    // `warmUp` calls a function's export once with the SDK's own handler;
    // `warmUpWeb` runs what a web app's call does around the app (its
    // export takes host resources, which do not exist at build time).
    let (export, wrap, warm_up) = match kind {
        AppKind::Function => ("handler", "exportHandler", "warmUp"),
        AppKind::Web => ("incomingHandler", "exportIncomingHandler", "warmUpWeb"),
    };
    Ok(format!(
        "// Generated by `gust build`: the app's default export as the world's export.\n\
         import app from {literal};\n\
         import {{ {wrap}, {warm_up} }} from \"gust\";\n\
         export const {export} = {wrap}(app);\n\
         await {warm_up}();\n"
    ))
}

/// Builds the JavaScript or TypeScript app `app` into the component
/// `output`; returns how long it took.
pub(crate) fn build_app(app: &Path, output: &Path) -> Result<Duration, ClientError> {
    let app = app
        .canonicalize()
        .map_err(|e| ClientError::Input(format!("{}: {e}", app.display())))?;
    let app_dir = app
        .parent()
        .ok_or_else(|| ClientError::Input(format!("{} has no directory", app.display())))?
        .to_path_buf();
    let source = std::fs::read_to_string(&app)
        .map_err(|e| ClientError::Input(format!("{}: {e}", app.display())))?;
    let kind = AppKind::of(&source);
    let tools = find_tools(&app_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix("gust-js-build-")
        .tempdir()
        .map_err(|e| ClientError::Input(format!("cannot create a scratch directory: {e}")))?;
    let root = scratch.path();
    let (wit, modules, bundle) = (
        root.join("wit"),
        root.join("node_modules"),
        root.join("app.bundle.js"),
    );
    write_tree(&wit, WIT_FILES)?;
    write_tree(&modules, SDK_FILES)?;
    let entry = entry_source(&app, kind)?;
    write_tree(root, &[("gust-entry.js", entry.as_str())])?;
    let output = if output.is_absolute() {
        output.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| ClientError::Input(format!("no current directory: {e}")))?
            .join(output)
    };

    let started = Instant::now();
    let mut command = Command::new(&tools.esbuild);
    command
        .args([
            "gust-entry.js",
            "--bundle",
            "--format=esm",
            // Neither Node nor a browser: a Node built-in does not resolve,
            // and esbuild says which import wanted it.
            "--platform=neutral",
            "--main-fields=module,main",
            "--target=es2022",
            "--keep-names",
            "--log-level=error",
            // The component's own imports, bound by ComponentizeJS.
            "--external:gust:*",
            "--external:wasi:*",
            // The app's `import gust from "gust"` is the SDK written here.
            "--alias:gust=./node_modules/gust/index.js",
        ])
        .arg(format!("--alias:gust-output={}", kind.output_module()))
        .arg(format!("--outfile={}", bundle.display()))
        .current_dir(root);
    let bundled = run_quietly(&mut command, "esbuild")?;
    if !bundled.status.success() {
        return Err(ClientError::Input(format!(
            "building {} failed:\n{}",
            app.display(),
            tool_output(&bundled)
        )));
    }

    let bar = spinner(format!(
        "building {} with ComponentizeJS (usually 10–20 s)",
        app.display()
    ));
    let mut command = Command::new(&tools.componentize_js);
    command
        .arg(&bundle)
        .arg("--wit")
        .arg(&wit)
        .args(["--world-name", kind.world(), "-o"])
        .arg(&output)
        .current_dir(root);
    let result = run_quietly(&mut command, "componentize-js");
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{AppKind, entry_source, is_js};

    #[test]
    fn apps_are_told_by_their_extension() {
        for app in ["app.js", "app.mjs", "app.ts", "dir/app.mts"] {
            assert!(is_js(Path::new(app)), "{app}");
        }
        for other in ["app.py", "app.wasm", "app", "app.json"] {
            assert!(!is_js(Path::new(other)), "{other}");
        }
    }

    #[test]
    fn the_entry_imports_the_app_by_a_quoted_path() {
        let entry = entry_source(Path::new("/srv/it's \"odd\"/app.js"), AppKind::Function).unwrap();
        assert!(
            entry.contains(r#"import app from "/srv/it's \"odd\"/app.js";"#),
            "{entry}"
        );
        assert!(entry.contains("export const handler = exportHandler(app);"));
        // The snapshot a function's instances start from is warmed up.
        assert!(entry.contains("import { exportHandler, warmUp } from \"gust\";"));
        assert!(entry.ends_with("await warmUp();\n"), "{entry}");
        let web = entry_source(Path::new("/srv/app.js"), AppKind::Web).unwrap();
        assert!(web.contains("export const incomingHandler = exportIncomingHandler(app);"));
        assert!(web.ends_with("await warmUpWeb();\n"), "{web}");
    }

    #[test]
    fn a_call_of_gust_http_makes_a_web_app() {
        assert_eq!(
            AppKind::of("export default gust.http(async (r) => new Response(\"hi\"));"),
            AppKind::Web
        );
        assert_eq!(
            AppKind::of("export default gust.fn((req) => req.text());"),
            AppKind::Function
        );
    }
}
