//! Command-line parsing and the subcommands.

use std::io::{stderr, stdout};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod build;
mod client;
mod deploy;
mod functions;
mod invoke;
mod jobs;
mod js;
mod kv;
mod map;
mod objects;
mod output;
mod python;
mod run;
mod secrets;
mod serve;
mod store;
mod ws;

/// Exit status when the function ran and failed (error, trap, timeout, ...);
/// for the client subcommands, when the host answered with an error.
pub(crate) const EXIT_FUNCTION_FAILED: u8 = 1;
/// Exit status when the component could not be loaded or the input read; for
/// the client subcommands, any bad local input (file, flag, missing key).
pub(crate) const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when the host itself failed, or could not be reached.
pub(crate) const EXIT_HOST: u8 = 3;

const CLIENT_EXIT_STATUS: &str = "The client subcommands (deploy, invoke, map, spawn, job, \
schedule, unschedule, ws, ls, rm, logs, tenants, keys) talk plain HTTP to a Gust host; there is no TLS.

Exit status: 0 on success; 1 when the host answered with an error, printed as \
`error: DETAIL (CODE, HTTP STATUS)`; 2 for bad local input (unreadable file, bad flag, no key); \
3 when the host cannot be reached or its answer makes no sense.";

/// Gust: a sandboxed function host. User functions are WebAssembly
/// components run in Wasmtime, each call in a fresh, limited instance.
#[derive(Debug, Parser)]
#[command(name = "gust", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace). `RUST_LOG`
    /// overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one invocation of a component locally and print the response body.
    ///
    /// The response body goes to stdout; what the function wrote to its own
    /// stdout and stderr goes to stderr. Exit status: 0 when the function
    /// returned a response, 1 when it failed (returned an error, trapped,
    /// timed out, ran out of memory), 2 when the component or input could not
    /// be read or loaded, 3 when the host failed.
    Run(run::RunArgs),

    /// Run the host: the HTTP API for deploying and invoking functions.
    ///
    /// On first start with an empty data directory it creates the tenant
    /// `demo`, writes its key to `<data-dir>/demo.key` (mode 0600) and prints
    /// it. Stops gracefully on SIGINT/SIGTERM: no new connections, in-flight
    /// requests finish within `--grace`, the store is flushed.
    Serve(serve::ServeArgs),

    /// Move a host's state between stores: `gust store migrate --from
    /// <data-dir> --to postgres://…` copies a single host's embedded store
    /// to a database that several hosts share.
    Store(store::StoreArgs),

    /// Build a function from source into a component without deploying it.
    ///
    /// A Python app (`app.py`) is built with componentize-py 0.25 (about
    /// 45 s; `scripts/setup-python.sh` installs it), a Rust crate directory
    /// with cargo. Prints the component's path and size.
    Build(build::BuildArgs),

    /// Upload a component as a new version of a function.
    ///
    /// Sends `PUT /v1/functions/{name}` and prints `deployed NAME version V
    /// (sha256:…, world handler|http)`, or `NAME is unchanged (version V)`
    /// when the bytes and flags match the current version. A slow upload or
    /// compile shows a progress bar on a terminal. A Python app or a crate
    /// directory is built first.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Deploy(deploy::DeployArgs),

    /// Call a deployed function once and print the response body.
    ///
    /// Sends `POST /v1/functions/{name}/invoke`; the response body goes to
    /// stdout. Exit status: 0 for a 2xx response; 1 when the function failed
    /// or answered with a non-2xx status (its body still goes to stdout, and
    /// the error, with the invocation id, to stderr); 2 for bad local input;
    /// 3 when the host cannot be reached.
    Invoke(invoke::InvokeArgs),

    /// Run a function once per input, with the tenant's fan-out.
    ///
    /// Streams `--input` (NDJSON: one JSON value per line) to `POST
    /// /v1/functions/{name}/map` and writes the results to stdout as they
    /// arrive, in input order, one JSON line each (`{"index", "ok" |
    /// "error", "invocation_id"}`), with a progress bar and a summary on
    /// stderr. Exit status 1 if any input failed.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Map(map::MapArgs),

    /// Run a function later, as a job, and print the job's id.
    ///
    /// Sends `POST /v1/functions/{name}/spawn`; the job waits in the
    /// tenant's queue and runs with its concurrency. With `--wait`, polls
    /// until it has finished and prints its output as `gust job` does.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Spawn(jobs::SpawnArgs),

    /// Show a job: its output once it has succeeded (exit 1 when it failed
    /// or was cancelled), else its state; or cancel it.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Job(jobs::JobArgs),

    /// Run a function on a cron schedule (UTC), or show its schedule.
    ///
    /// Sends `PUT /v1/functions/{name}/schedule`; each run is an invocation
    /// with its record (`gust logs`). `gust ls` shows schedules.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Schedule(jobs::ScheduleArgs),

    /// Remove a function's schedule.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Unschedule(jobs::UnscheduleArgs),

    /// Talk to a function over a WebSocket: each line of stdin is one
    /// invocation, and every message that comes back (emitted chunks, the
    /// response) is printed on its own line.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Ws(ws::WsArgs),

    /// List the caller's functions.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Ls(functions::LsArgs),

    /// Delete a function and all its versions.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Rm(functions::RmArgs),

    /// Show a function's recent invocations, oldest first: time, id,
    /// version, status, outcome, total duration and error message.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Logs(functions::LogsArgs),

    /// Manage tenants (admin key).
    ///
    /// The admin key is `--key`, else `GUST_ADMIN_KEY`, else `GUST_KEY`. A
    /// host that was not given one generates it into `<data-dir>/admin.key`.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Tenants(admin::TenantsArgs),

    /// Manage API keys: the caller's tenant's, or any tenant's with
    /// `--tenant` and the admin key.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Keys(admin::KeysArgs),

    /// Manage the tenant's secrets: values (API tokens, passwords) that
    /// functions deployed with `--secret NAME` get as environment
    /// variables. Values are sealed at rest and never shown again.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Secrets(secrets::SecretsArgs),

    /// Inspect and seed the tenant's key-value buckets: what its functions
    /// keep through `wasi:keyvalue`.
    #[command(after_long_help = CLIENT_EXIT_STATUS)]
    Kv(kv::KvArgs),
}

/// Where compiled components are cached when `--cache-dir` is not given.
pub(crate) fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("gust").join("compiled");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home)
            .join(".cache")
            .join("gust")
            .join("compiled");
    }
    PathBuf::from(".gust-cache")
}

/// Logs to stderr (`-v`, `RUST_LOG`) and, for `gust serve` with an OTLP
/// endpoint, spans to the collector; the returned pipeline is to be shut
/// down (its last batch sent) before `runtime` stops.
///
/// # Errors
/// A malformed endpoint or CA file, as a message.
pub(crate) fn init_tracing(
    cli: &Cli,
    runtime: tokio::runtime::Handle,
) -> Result<Option<gust_host::trace::Telemetry>, String> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let telemetry = match &cli.command {
        Command::Serve(args) => match &args.otlp_endpoint {
            Some(endpoint) if !endpoint.trim().is_empty() => {
                let instance = format!(
                    "{}-{}",
                    hostname().unwrap_or_else(|| "gust".to_owned()),
                    std::process::id()
                );
                Some(
                    gust_host::trace::Telemetry::otlp(
                        endpoint,
                        args.ca_file.as_deref(),
                        &instance,
                        runtime,
                    )
                    .map_err(|e| e.to_string())?,
                )
            }
            _ => None,
        },
        _ => None,
    };
    // The host's own spans at info (the `model.*`, `request`, `call`…
    // spans), whatever the log level; dependencies' only from warnings.
    let spans = telemetry.as_ref().map(|telemetry| {
        tracing_opentelemetry::layer()
            .with_tracer(telemetry.tracer())
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("gust_host", tracing::Level::INFO)
                    .with_target("gust_gpu_bridge", tracing::Level::INFO)
                    .with_default(tracing::Level::WARN),
            )
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(telemetry)
}

/// This machine's name, for telling hosts apart in traces.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

pub(crate) async fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Serve(args) => serve::serve(args).await,
        Command::Store(args) => store::store(args).await,
        Command::Build(args) => {
            client_command(build::build(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Deploy(args) => {
            client_command(deploy::deploy(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Invoke(args) => {
            client_command(invoke::invoke(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Map(args) => client_command(map::map(&args, &mut stdout(), &mut stderr())).await,
        Command::Spawn(args) => {
            client_command(jobs::spawn(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Job(args) => client_command(jobs::job(&args, &mut stdout(), &mut stderr())).await,
        Command::Schedule(args) => {
            client_command(jobs::schedule(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Ws(args) => client_command(ws::ws(&args, &mut stdout(), &mut stderr())).await,
        Command::Unschedule(args) => {
            client_command(jobs::unschedule(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Ls(args) => {
            client_command(functions::ls(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Rm(args) => {
            client_command(functions::rm(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Logs(args) => {
            client_command(functions::logs(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Tenants(args) => {
            client_command(admin::tenants(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Keys(args) => {
            client_command(admin::keys(&args, &mut stdout(), &mut stderr())).await
        }
        Command::Secrets(args) => {
            let mut stdin = std::io::stdin();
            client_command(secrets::secrets(
                &args,
                &mut stdin,
                &mut stdout(),
                &mut stderr(),
            ))
            .await
        }
        Command::Kv(args) => {
            let mut stdin = std::io::stdin();
            client_command(kv::kv(&args, &mut stdin, &mut stdout(), &mut stderr())).await
        }
    }
}

/// Runs a client subcommand and maps its failure to a message and exit status.
async fn client_command(
    command: impl std::future::Future<Output = Result<(), client::ClientError>>,
) -> ExitCode {
    client::exit(command.await, &mut stderr())
}

/// A GPU-bridge backend named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum GpuBackendArg {
    /// The bridge's CPU backend (always available).
    Cpu,
    /// wgpu: Vulkan/Metal/DX12, or lavapipe on a machine without a GPU.
    Wgpu,
    /// NVIDIA CUDA (a build with the `cuda` feature, and a driver).
    Cuda,
}

impl GpuBackendArg {
    /// The bridge's name for this backend.
    pub(crate) fn kind(self) -> gust_gpu_bridge::BackendKind {
        match self {
            Self::Cpu => gust_gpu_bridge::BackendKind::Cpu,
            Self::Wgpu => gust_gpu_bridge::BackendKind::Wgpu,
            Self::Cuda => gust_gpu_bridge::BackendKind::Cuda,
        }
    }
}

/// Bridge settings that open the devices of `backends` (cpu always).
pub(crate) fn bridge_config(backends: &[GpuBackendArg]) -> gust_gpu_bridge::BridgeConfig {
    gust_gpu_bridge::BridgeConfig {
        wgpu: backends.contains(&GpuBackendArg::Wgpu),
        cuda: backends.contains(&GpuBackendArg::Cuda),
        ..gust_gpu_bridge::BridgeConfig::default()
    }
}
