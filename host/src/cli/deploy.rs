//! `gust deploy`: upload a component as a new version of a function.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use clap::Args;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::AsyncReadExt;

use super::client::{Body, Client, ClientError, ConnectArgs, KeyKind, decode, segment};
use super::objects::Function;

/// A quick deploy shows no progress at all; only a slow one earns a bar.
const REVEAL_AFTER: Duration = Duration::from_millis(300);
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Args)]
pub(crate) struct DeployArgs {
    /// What to deploy: a `.wasm` component built for wasm32-wasip2 that
    /// exports `gust:function/handler` or `wasi:http/incoming-handler`; a
    /// Rust crate's directory, which is built first (cargo, release,
    /// wasm32-wasip2) and its cdylib deployed; a Python app (`app.py`),
    /// built first with componentize-py; or a JavaScript or TypeScript app
    /// (`app.js`, `app.ts`), built first with ComponentizeJS (see `gust
    /// build`).
    pub(crate) component: PathBuf,

    /// Function name, `^[a-z0-9][a-z0-9-]{0,62}$` [default: the crate's
    /// package name, or the file's stem, lowercased, `_` and `.` turned
    /// into `-`].
    #[arg(short, long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// Serve the function's HTTP routes (`/http/{tenant}/{name}/…`, for
    /// wasi:http components) to callers without a key. Redeploying without
    /// the flag makes the function private again.
    #[arg(long)]
    pub(crate) public: bool,

    /// Run a job of this function once more when the host stopped while
    /// it was running (instead of failing it). Only for functions that are
    /// safe to run twice.
    #[arg(long)]
    pub(crate) retryable: bool,

    /// Give the function this secret of the tenant as an environment
    /// variable of the same name (`gust secrets set` first); repeat for
    /// more. Redeploying without it takes it away.
    #[arg(long = "secret", value_name = "NAME")]
    pub(crate) secrets: Vec<String>,

    /// A configuration value the function reads through
    /// `wasi:config/store`, over the tenant policy's `[config]`; repeat
    /// for more. Redeploying without it takes it away.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = config_pair)]
    pub(crate) config: Vec<String>,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// The name a file deploys as when `--name` is not given.
pub(crate) fn default_name(component: &Path) -> Result<String, ClientError> {
    let stem = component
        .file_stem()
        .and_then(|s| s.to_str())
        .map(|s| s.to_lowercase().replace(['_', '.'], "-"))
        .filter(|s| !s.is_empty());
    stem.ok_or_else(|| {
        ClientError::Input(format!(
            "cannot derive a function name from {}; pass --name",
            component.display()
        ))
    })
}

/// The name a Python or JavaScript app deploys as: its file's stem, except
/// that the conventional `app.py`/`main.py` (`app.js`, `main.ts`, …) take
/// their directory's name (`examples/python/hello/app.py` deploys as
/// `hello`).
fn script_default_name(app: &Path) -> Result<String, ClientError> {
    let stem = app.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if stem == "app" || stem == "main" {
        let dir = app
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        if let Some(dir) = dir.filter(|d| d.file_name().is_some()) {
            return default_name(&dir);
        }
    }
    default_name(app)
}

pub(crate) async fn deploy(
    args: &DeployArgs,
    out: &mut dyn Write,
    _err: &mut dyn Write,
) -> Result<(), ClientError> {
    let client = Client::from_args(&args.connect, KeyKind::Tenant)?;
    // Holds a Python or JavaScript build's component until the upload is
    // done.
    let mut _scratch = None;
    let (component, default) = if super::build::is_script(&args.component) {
        let app = args.component.clone();
        let (scratch, component) = tokio::task::spawn_blocking(move || {
            let scratch = tempfile::Builder::new()
                .prefix("gust-deploy-")
                .tempdir()
                .map_err(|e| {
                    ClientError::Input(format!("cannot create a scratch directory: {e}"))
                })?;
            let component = scratch.path().join("app.wasm");
            super::build::build_script(&app, &component)?;
            Ok::<_, ClientError>((scratch, component))
        })
        .await
        .map_err(|e| ClientError::Input(format!("the build panicked: {e}")))??;
        _scratch = Some(scratch);
        let name = match &args.name {
            Some(_) => String::new(),
            None => script_default_name(&args.component)?,
        };
        (component, name)
    } else if args.component.is_dir() {
        let dir = args.component.clone();
        let built = tokio::task::spawn_blocking(move || super::build::build_crate(&dir))
            .await
            .map_err(|e| ClientError::Input(format!("the build panicked: {e}")))??;
        let name = built.package.to_lowercase().replace(['_', '.'], "-");
        (built.component, name)
    } else {
        let name = match &args.name {
            Some(_) => String::new(),
            None => default_name(&args.component)?,
        };
        (args.component.clone(), name)
    };
    let name = args.name.clone().unwrap_or(default);
    let unreadable =
        |e: std::io::Error| ClientError::Input(format!("{}: {e}", component.display()));
    let file = tokio::fs::File::open(&component)
        .await
        .map_err(unreadable)?;
    let metadata = file.metadata().await.map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(ClientError::Input(format!(
            "{}: not a regular file",
            component.display()
        )));
    }
    let len = metadata.len();

    let progress = Progress::new(len, &name);
    let mut path = format!("/v1/functions/{}", segment(&name));
    let mut flags: Vec<String> = [
        (args.public, "public=true"),
        (args.retryable, "retryable=true"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, flag)| flag.to_owned())
    .collect();
    if !args.secrets.is_empty() {
        let names: Vec<String> = args.secrets.iter().map(|s| segment(s)).collect();
        flags.push(format!("secrets={}", names.join(",")));
    }
    for pair in &args.config {
        flags.push(format!(
            "config={}",
            form_urlencoded::byte_serialize(pair.as_bytes()).collect::<String>()
        ));
    }
    if !flags.is_empty() {
        path.push('?');
        path.push_str(&flags.join("&"));
    }
    let mut request = client.request(
        Method::PUT,
        &path,
        file_body(file, len, progress.bar.clone()),
    )?;
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/wasm"));
    // A declared length lets the host refuse an oversized component before
    // the upload ends.
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));

    let (status, bytes) = progress
        .around(async {
            let response = client.send(request).await?;
            client.read(response).await
        })
        .await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Host(format!("unexpected answer from the Gust host: {e}")))?;
    let function: Function = decode(value, "function")?;
    writeln!(out, "{}", summary(status, &function))?;
    Ok(())
}

/// A `--config` argument: `KEY=VALUE`.
fn config_pair(text: &str) -> Result<String, String> {
    match text.split_once('=') {
        Some((key, _)) if !key.is_empty() => Ok(text.to_owned()),
        _ => Err(format!("`{text}` must be KEY=VALUE")),
    }
}

/// The one line a deploy prints.
pub(crate) fn summary(status: StatusCode, function: &Function) -> String {
    if status == StatusCode::CREATED {
        let public = if function.public { ", public" } else { "" };
        let retryable = if function.retryable {
            ", retryable"
        } else {
            ""
        };
        format!(
            "deployed {} version {} ({}, world {}{public}{retryable})",
            function.name, function.version, function.digest, function.world
        )
    } else {
        format!(
            "{} is unchanged (version {})",
            function.name, function.version
        )
    }
}

/// Streams the file in chunks, advancing `bar`; once the last byte is handed
/// to the connection the bar turns into a spinner for the host-side compile.
fn file_body(file: tokio::fs::File, len: u64, bar: ProgressBar) -> Body {
    let stream =
        futures::stream::try_unfold((file, bar, 0u64), move |(mut file, bar, sent)| async move {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let n = file.read_buf(&mut buf).await?;
            if n == 0 {
                // Unless the last chunk already switched it (an empty file, or
                // one shorter than its metadata said, whose mismatch hyper
                // reports).
                if len == 0 || sent < len {
                    Progress::compiling(&bar);
                }
                return Ok::<_, std::io::Error>(None);
            }
            let before = sent;
            let sent = sent + n as u64;
            bar.inc(n as u64);
            if before < len && sent >= len {
                Progress::compiling(&bar);
            }
            Ok(Some((Frame::data(buf.freeze()), (file, bar, sent))))
        });
    StreamBody::new(stream).boxed_unsync()
}

/// The upload bar and compile spinner, hidden until [`REVEAL_AFTER`] and
/// never drawn unless stderr is a terminal.
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(len: u64, name: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template(
            "{spinner} uploading {msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(name.to_owned());
        Progress { bar }
    }

    fn compiling(bar: &ProgressBar) {
        let style =
            ProgressStyle::with_template("{spinner} the host is compiling {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.reset_elapsed();
    }

    /// Runs `work`, revealing the bar if it takes longer than a moment.
    async fn around<T>(&self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        let output = tokio::select! {
            output = &mut work => output,
            () = tokio::time::sleep(REVEAL_AFTER) => {
                if std::io::stderr().is_terminal() {
                    self.bar.set_draw_target(ProgressDrawTarget::stderr());
                    self.bar.enable_steady_tick(Duration::from_millis(100));
                }
                work.await
            }
        };
        self.bar.finish_and_clear();
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::tests::{json_response, mock, problem_response};

    fn function(public: bool) -> serde_json::Value {
        serde_json::json!({
            "name": "hello", "version": 3, "digest": "sha256:abc", "size": 5,
            "world": "handler", "public": public,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-02T00:00:00Z",
        })
    }

    #[test]
    fn names_default_to_the_file_stem() {
        assert_eq!(
            default_name(Path::new("target/hello_example.wasm")).unwrap(),
            "hello-example"
        );
        assert_eq!(default_name(Path::new("Echo.v2.wasm")).unwrap(), "echo-v2");
        assert!(default_name(Path::new("/")).is_err());
    }

    #[test]
    fn summaries() {
        let f: Function = serde_json::from_value(function(false)).unwrap();
        assert_eq!(
            summary(StatusCode::CREATED, &f),
            "deployed hello version 3 (sha256:abc, world handler)"
        );
        assert_eq!(
            summary(StatusCode::OK, &f),
            "hello is unchanged (version 3)"
        );
        let f: Function = serde_json::from_value(function(true)).unwrap();
        assert_eq!(
            summary(StatusCode::CREATED, &f),
            "deployed hello version 3 (sha256:abc, world handler, public)"
        );
    }

    #[tokio::test]
    async fn uploads_the_file_and_reports_the_version() {
        let host = mock(|req| {
            if req.path_and_query == "/v1/functions/hello?public=true" {
                json_response(201, function(true))
            } else {
                problem_response(400, "invalid-name", "bad name")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let component = dir.path().join("hello.wasm");
        // Bigger than one chunk, to exercise the streaming.
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&component, &bytes).unwrap();
        let args = DeployArgs {
            component,
            name: None,
            public: true,
            retryable: false,
            secrets: Vec::new(),
            config: Vec::new(),
            connect: host.connect(),
        };
        let mut out = Vec::new();
        deploy(&args, &mut out, &mut Vec::new()).await.unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "deployed hello version 3 (sha256:abc, world handler, public)\n"
        );
        let seen = host.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, Method::PUT);
        assert_eq!(seen[0].headers[CONTENT_LENGTH], "200000");
        assert_eq!(seen[0].headers[CONTENT_TYPE], "application/wasm");
        assert_eq!(seen[0].body.as_ref(), bytes.as_slice());

        let args = DeployArgs {
            name: Some("Bad Name".to_owned()),
            public: false,
            retryable: false,
            ..args
        };
        let e = deploy(&args, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "bad name (invalid-name, HTTP 400)");
        assert_eq!(
            host.requests()[1].path_and_query,
            "/v1/functions/Bad%20Name"
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_a_local_error() {
        let args = DeployArgs {
            component: PathBuf::from("/nonexistent/x.wasm"),
            name: None,
            public: false,
            retryable: false,
            secrets: Vec::new(),
            config: Vec::new(),
            connect: ConnectArgs {
                url: "http://127.0.0.1:1".to_owned(),
                key: Some("gust_x".to_owned()),
            },
        };
        let e = deploy(&args, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.exit_code(), crate::cli::EXIT_BAD_INPUT);
        assert!(e.to_string().starts_with("/nonexistent/x.wasm: "), "{e}");
    }
}
