//! `gust run`: one local invocation.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use clap::Args;
use gust_host::runtime::{CallLimits, Outcome, Request, Runtime, RuntimeConfig};

use super::{EXIT_BAD_INPUT, EXIT_FUNCTION_FAILED, EXIT_HOST, default_cache_dir};

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The component to run (a `.wasm` built for wasm32-wasip2 exporting
    /// `gust:function/handler`).
    component: PathBuf,

    /// Request body: a file, or `-` for stdin. Empty when omitted.
    #[arg(short, long, value_name = "FILE|-")]
    input: Option<String>,

    /// Media type of the request body.
    #[arg(long, default_value = "application/octet-stream")]
    content_type: String,

    /// A request header, `NAME:VALUE` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,

    /// Deadline for instantiation plus the call, e.g. `500ms`, `5s`, `1m`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// Linear-memory limit, e.g. `64MiB`, `1GiB`.
    #[arg(long, default_value = "128MiB")]
    memory: ByteSize,

    /// An environment variable for the function, `KEY=VALUE`, or `KEY` to
    /// pass this process's value through (repeatable). Nothing else is visible.
    #[arg(short, long = "env", value_name = "KEY[=VALUE]", value_parser = parse_env)]
    env: Vec<(String, String)>,

    /// Bytes of the function's stdout and stderr kept (each); the rest is dropped.
    #[arg(long, default_value = "1MiB")]
    output_limit: ByteSize,

    /// GPU-bridge backends the function may use (comma-separated), the
    /// first available one being its default device.
    #[arg(long, value_delimiter = ',', default_values = ["cpu"])]
    gpu: Vec<super::GpuBackendArg>,

    /// Models directory; the function may load any model in it.
    #[arg(long, default_value = "./gust-data/models", env = "GUST_MODELS_DIR")]
    models_dir: PathBuf,

    /// Directory of the compiled-component cache [default: $XDG_CACHE_HOME/gust/compiled].
    #[arg(long, env = "GUST_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

/// `NAME:VALUE`, validated as `gust invoke -H` does, as the strings the
/// runtime passes to the function.
fn parse_header(raw: &str) -> Result<(String, String), String> {
    let (name, value) = super::client::parse_header(raw)?;
    let value = value.to_str().map_err(|e| e.to_string())?.to_owned();
    Ok((name.as_str().to_owned(), value))
}

fn parse_env(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some(("", _)) => Err(format!("`{raw}` has an empty variable name")),
        Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
        None => std::env::var(raw)
            .map(|value| (raw.to_owned(), value))
            .map_err(|_| format!("`{raw}` is not set in this environment (use KEY=VALUE)")),
    }
}

fn read_input(input: Option<&str>) -> std::io::Result<Vec<u8>> {
    match input {
        None => Ok(Vec::new()),
        Some("-") => {
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body)?;
            Ok(body)
        }
        Some(path) => std::fs::read(path),
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

pub(crate) async fn run(args: RunArgs) -> ExitCode {
    let bytes = match std::fs::read(&args.component) {
        Ok(bytes) => bytes,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{}: {e}", args.component.display())),
    };
    let body = match read_input(args.input.as_deref()) {
        Ok(body) => body,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("reading input: {e}")),
    };
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let runtime = match Runtime::new(RuntimeConfig::new(cache_dir)) {
        Ok(runtime) => Arc::new(runtime),
        Err(e) => return fail(EXIT_HOST, e),
    };
    let loader = Arc::clone(&runtime);
    let loaded = match tokio::task::spawn_blocking(move || loader.load(&bytes)).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => return fail(EXIT_BAD_INPUT, format!("{}: {e}", args.component.display())),
        Err(e) => return fail(EXIT_HOST, format!("loading panicked: {e}")),
    };
    let output_limit = usize::try_from(args.output_limit.as_u64()).unwrap_or(usize::MAX);
    let bridge_config = super::bridge_config(&args.gpu);
    let bridge =
        match tokio::task::spawn_blocking(move || gust_gpu_bridge::Bridge::open(&bridge_config))
            .await
        {
            Ok(Ok(bridge)) => bridge,
            Ok(Err(e)) => return fail(EXIT_HOST, format!("starting the GPU bridge: {e}")),
            Err(e) => return fail(EXIT_HOST, format!("starting the GPU bridge panicked: {e}")),
        };
    let devices: Arc<[gust_gpu_bridge::Device]> = bridge
        .devices()
        .iter()
        .filter(|d| args.gpu.iter().any(|b| b.kind() == d.kind()))
        .cloned()
        .collect();
    // A local run owns the machine: every model found may be loaded, and a
    // missing models directory just means there are none.
    let models = gust_gpu_bridge::models::ModelRegistry::open(&args.models_dir)
        .ok()
        .map(|registry| {
            let allowed = registry.list().map(|m| m.manifest.name.clone()).collect();
            gust_host::runtime::ModelGrant {
                registry: Arc::new(registry),
                allowed,
                usage: Default::default(),
            }
        });
    let gpu = (!devices.is_empty()).then(|| gust_host::runtime::GpuGrant {
        devices,
        account: gust_gpu_bridge::Account::new("local", None, None),
        models,
    });
    let limits = CallLimits {
        gpu,
        timeout: args.timeout,
        memory_bytes: args.memory.as_u64(),
        env: args.env.into(),
        stdout_limit: output_limit,
        stderr_limit: output_limit,
        ..CallLimits::default()
    };
    let request = Request {
        body,
        content_type: args.content_type,
        headers: args.headers,
        invocation_id: gust_host::runtime::new_invocation_id(gust_host::store::now_millis()),
    };
    let invocation = runtime.invoke(&loaded, request, &limits).await;

    let mut stderr = std::io::stderr().lock();
    for (stream, captured) in [
        ("stdout", &invocation.stdout),
        ("stderr", &invocation.stderr),
    ] {
        let _ = stderr.write_all(&captured.bytes);
        if captured.truncated() {
            let _ = writeln!(
                stderr,
                "[gust: {} more bytes of the function's {stream} dropped]",
                captured.dropped_bytes
            );
        }
    }
    drop(stderr);
    match invocation.outcome {
        Outcome::Ok(response) => {
            if !(200..300).contains(&response.status) {
                eprintln!(
                    "[gust: the function answered with status {}]",
                    response.status
                );
            }
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout
                .write_all(&response.body)
                .and_then(|()| stdout.flush())
            {
                return fail(EXIT_HOST, format!("writing the response: {e}"));
            }
            ExitCode::SUCCESS
        }
        other => {
            if let Outcome::Trap { backtrace, .. } | Outcome::StackOverflow { backtrace } = &other
                && !backtrace.is_empty()
                && tracing::enabled!(tracing::Level::INFO)
            {
                eprintln!("{backtrace}");
            }
            fail(EXIT_FUNCTION_FAILED, other)
        }
    }
}
