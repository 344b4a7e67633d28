//! How a host runs, and why it could not start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::runtime::{RuntimeConfig, RuntimeError};
use crate::store::StoreError;
use crate::tenancy::{KeyError, PolicyError};

/// How to run a host.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where the store, blobs, compiled cache and key files live.
    pub data_dir: PathBuf,
    /// Directory of policy files (`default.toml`, `<tenant>.toml`).
    pub policies_dir: PathBuf,
    /// The admin key; when `None`, `<data-dir>/admin.key` is used (and
    /// generated on first start).
    pub admin_key: Option<String>,
    /// How long in-flight requests may finish after shutdown begins.
    pub grace: Duration,
    /// Invocation records kept per function.
    pub retention_per_function: usize,
    /// How long a finished job's result stays readable.
    pub job_retention: Duration,
    /// On a shared store, how long a host's claim on a running job holds
    /// without renewal: how soon other hosts take over the jobs of a host
    /// that died. Renewed every third of it.
    pub job_lease: Duration,
    /// Runtime configuration; `cache_dir` is replaced by `<data-dir>/compiled`.
    pub runtime: RuntimeConfig,
    /// Which GPU-bridge devices to open.
    pub gpu: gust_gpu_bridge::BridgeConfig,
    /// The models directory; `None` means `<data-dir>/models`.
    pub models_dir: Option<PathBuf>,
    /// Resident-model memory budget per device, and batching on or off.
    pub models: gust_gpu_bridge::models::RegistryConfig,
    /// Connection budgets: how many, and how long each may dawdle.
    pub connections: ConnectionLimits,
    /// Where tenants, keys, functions, blobs, records, jobs and schedules
    /// live.
    pub store: StoreLocation,
    /// The key tenant secrets are sealed with (`GUST_SECRETS_KEY`); `None`
    /// uses `<data-dir>/secrets.key`, generated at the first start.
    pub secrets_key: Option<super::secrets::SecretsKeyText>,
    /// Serve the web console at `/console/` (`--no-console` turns it off).
    pub console: bool,
}

/// Where a host keeps its state.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded sled store and blob files in the data directory: one
    /// host, nothing else to run.
    #[default]
    Embedded,
    /// A PostgreSQL database (`postgres://…`) that several hosts share;
    /// each keeps a cache of component blobs and its compiled code in its
    /// data directory.
    Postgres(String),
}

impl std::fmt::Debug for StoreLocation {
    // The URL may carry a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("Embedded"),
            Self::Postgres(_) => f.write_str("Postgres(…)"),
        }
    }
}

impl std::str::FromStr for StoreLocation {
    type Err = String;

    /// `sled` (the default), or a `postgres://` / `postgresql://` URL.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value == "sled" {
            Ok(Self::Embedded)
        } else if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            Ok(Self::Postgres(value.to_owned()))
        } else {
            Err("expected `sled` or a `postgres://` URL".to_owned())
        }
    }
}

/// What one client's connections may hold of the host: a slow or idle
/// client (slowloris) is cut off instead of holding a file descriptor and a
/// task for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; beyond it the host stops accepting (the
    /// kernel's backlog holds new ones) until one closes.
    pub max_connections: usize,
    /// How long a request's head (request line and headers) may take to
    /// arrive, counted from the first byte; it also closes a keep-alive
    /// connection that stays idle this long between requests.
    pub header_timeout: Duration,
    /// How long a request body may take to arrive once the head is in.
    pub body_timeout: Duration,
    /// How long a WebSocket session may pass without a message from the
    /// client before the host closes it.
    pub websocket_idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            websocket_idle_timeout: Duration::from_secs(300),
        }
    }
}

impl ServeConfig {
    /// Defaults for `data_dir` and `policies_dir` on `listen`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, policies_dir: PathBuf) -> Self {
        let runtime = RuntimeConfig::new(data_dir.join("compiled"));
        Self {
            listen,
            data_dir,
            policies_dir,
            admin_key: None,
            grace: Duration::from_secs(10),
            retention_per_function: 1000,
            job_retention: Duration::from_secs(24 * 3600),
            job_lease: Duration::from_secs(30),
            runtime,
            gpu: gust_gpu_bridge::BridgeConfig::default(),
            models_dir: None,
            models: gust_gpu_bridge::models::RegistryConfig::default(),
            connections: ConnectionLimits::default(),
            store: StoreLocation::Embedded,
            secrets_key: None,
            console: true,
        }
    }
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A policy file is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The GPU bridge could not start (its cpu device is always required).
    #[error("starting the GPU bridge: {0}")]
    Gpu(#[from] gust_gpu_bridge::BridgeError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime could not be created.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Files in the data directory, or the listening socket.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key file is malformed, or a key could not be made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The secrets key is malformed or its file unusable.
    #[error("the secrets key: {0}")]
    SecretsKey(#[from] super::secrets::SecretsKeyError),
}

/// What a first start created, for the operator to see once.
#[derive(Debug, Clone)]
pub struct FirstStart {
    /// The demo tenant's key (also written to `<data-dir>/demo.key`).
    pub demo_key: String,
    /// Where it was written.
    pub demo_key_path: PathBuf,
}
