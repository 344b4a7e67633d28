//! `gust serve`: the HTTP host.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use gust_host::api::{ServeConfig, Server};
use gust_host::runtime::{AllocationConfig, PoolingConfig};

use super::{EXIT_BAD_INPUT, EXIT_HOST};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address actually
    /// bound is printed).
    #[arg(long, default_value = "127.0.0.1:8080", env = "GUST_LISTEN")]
    listen: SocketAddr,

    /// Data directory: store, component blobs, compiled cache, key files.
    #[arg(long, default_value = "./gust-data", env = "GUST_DATA_DIR")]
    data_dir: PathBuf,

    /// Where state lives: `sled` (the embedded store in `--data-dir`, one
    /// host) or a `postgres://` URL of a database several hosts share
    /// (component blobs are then cached in `--data-dir`).
    #[arg(
        long,
        default_value = "sled",
        env = "GUST_STORE",
        hide_env_values = true
    )]
    store: gust_host::service::StoreLocation,

    /// Policy directory: `default.toml` and `<tenant>.toml` overrides. A
    /// missing directory means the built-in defaults.
    #[arg(long, default_value = "./policies", env = "GUST_POLICIES")]
    policies: PathBuf,

    /// The admin key. Without it, `<data-dir>/admin.key` is used (generated
    /// with mode 0600 on first start).
    #[arg(long, env = "GUST_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,

    /// How long in-flight requests may finish after SIGINT/SIGTERM.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,

    /// Instances that may run at once host-wide (the pooling allocator's
    /// size); beyond it requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_instances: u32,

    /// Connections open at once; beyond it new clients wait in the
    /// kernel's backlog until one closes.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,

    /// How long a request's headers may take to arrive; also how long a
    /// keep-alive connection may stay idle between requests.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,

    /// How long a request body may take to arrive once its headers are in
    /// (408 `body-timeout` after it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,

    /// How long a WebSocket session may go without a message from its
    /// client before the host closes it.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    websocket_idle_timeout: Duration,

    /// Invocation records kept per function.
    #[arg(long, default_value_t = 1000)]
    retention: usize,

    /// How long a finished job's result (`GET /v1/jobs/{id}`) stays readable
    /// before it is swept away.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, env = "GUST_JOB_RETENTION")]
    job_retention: Duration,

    /// With a shared store: how long a claim on a running job holds
    /// without renewal (renewed every third of it), so how soon other hosts
    /// take over the jobs of a host that died.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "GUST_JOB_LEASE")]
    job_lease: Duration,

    /// GPU-bridge backends to open (comma-separated); each tenant's policy
    /// then picks among them. A backend that is not compiled in or finds no
    /// device is logged and skipped; cpu is always open.
    #[arg(long, value_delimiter = ',', default_values = ["cuda", "wgpu", "cpu"], env = "GUST_GPU")]
    gpu: Vec<super::GpuBackendArg>,

    /// Models directory: one folder per model with a `gust-model.toml`
    /// (scripts/fetch-models.sh fills it). Default: `<data-dir>/models`.
    #[arg(long, env = "GUST_MODELS_DIR")]
    models_dir: Option<PathBuf>,

    /// Device memory resident models may hold per device, in MiB; least
    /// recently used models nobody is using are evicted to stay within it.
    /// Default: no budget beyond the device's own memory.
    #[arg(long)]
    models_memory_mb: Option<u64>,

    /// Run every model call alone instead of batching concurrent calls of
    /// models whose manifest has `[batching]`.
    #[arg(long)]
    no_batching: bool,

    /// Do not serve the web console at `/console/`.
    #[arg(long)]
    no_console: bool,

    /// A PEM file of CA certificates that functions' HTTPS requests trust
    /// besides the system's roots (which `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR` can point elsewhere): for APIs behind a private CA.
    #[arg(long, env = "GUST_CA_FILE")]
    pub(crate) ca_file: Option<PathBuf>,

    /// Export the host's spans (requests, admission, instantiation, calls,
    /// model work, functions' outgoing requests) over OTLP/HTTP to the
    /// collector at this base URL (traces go to `<URL>/v1/traces`;
    /// `OTEL_EXPORTER_OTLP_HEADERS` and the `OTEL_BSP_*` batching variables
    /// apply). Without it nothing is exported; trace ids are still recorded
    /// and passed on.
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: the host calls it before it
/// says it is listening, so a SIGTERM sent right after that line stops it
/// gracefully instead of killing it.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}");
                None
            }
        };
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(interrupt) => {}
                () = wait(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub(crate) async fn serve(args: ServeArgs) -> ExitCode {
    let mut config = ServeConfig::new(args.listen, args.data_dir, args.policies);
    config.admin_key = args.admin_key;
    config.store = args.store;
    config.grace = args.grace;
    config.retention_per_function = args.retention.max(1);
    config.job_retention = args.job_retention;
    config.job_lease = args.job_lease.max(Duration::from_millis(300));
    config.connections = gust_host::api::ConnectionLimits {
        max_connections: args.max_connections.max(1),
        header_timeout: args.header_timeout,
        body_timeout: args.body_timeout,
        websocket_idle_timeout: args.websocket_idle_timeout,
    };
    config.gpu = super::bridge_config(&args.gpu);
    config.models_dir = args.models_dir;
    config.models = gust_gpu_bridge::models::RegistryConfig {
        memory_budget_bytes: args
            .models_memory_mb
            .map_or(u64::MAX, |mb| mb.saturating_mul(1 << 20)),
        batching: !args.no_batching,
    };
    config.console = !args.no_console;
    let pool = PoolingConfig {
        max_instances: args.max_instances.max(1),
        total_memories: args.max_instances.max(1).saturating_mul(2),
        total_tables: args.max_instances.max(1).saturating_mul(2),
        total_core_instances: args.max_instances.max(1).saturating_mul(8),
        ..PoolingConfig::default()
    };
    config.runtime.allocation = AllocationConfig::Pooling(pool);
    config.runtime.ca_file = args.ca_file;
    // From the environment only: a key on the command line would show in
    // `ps` and shell histories.
    config.secrets_key = std::env::var("GUST_SECRETS_KEY")
        .ok()
        .filter(|key| !key.trim().is_empty())
        .map(gust_host::service::SecretsKeyText);
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(
            e @ (gust_host::api::ServeError::Policy(_)
            | gust_host::api::ServeError::SecretsKey(_)
            | gust_host::api::ServeError::Runtime(gust_host::runtime::RuntimeError::Egress(_))),
        ) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_HOST);
        }
    };
    // Before the ready line below: see `shutdown_signal`.
    let shutdown = shutdown_signal();
    let address = match server.local_addr() {
        Ok(address) => address,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_HOST);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        if let Some(first) = server.first_start() {
            let _ = writeln!(
                out,
                "gust: first start: created tenant `demo`; its key (also in {}):\n{}",
                first.demo_key_path.display(),
                first.demo_key
            );
        }
        // Last, so a supervisor can wait for this line: the host is ready.
        let _ = writeln!(out, "gust: listening on http://{address}");
        let _ = out.flush();
    }
    match server.run(shutdown).await {
        Ok(()) => {
            eprintln!("gust: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_HOST)
        }
    }
}
