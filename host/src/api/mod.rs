//! The HTTP server: control plane (deploy, list, delete, keys, tenants) and
//! invoke plane (handler calls and `wasi:http` routes), `/metrics`,
//! `/healthz` and the OpenAPI document. See `docs/api.md`.

// A `Problem` is built once per failed request and turned into a response
// right away; boxing it would buy nothing measurable.
#![allow(clippy::result_large_err)]

mod auth;
mod handlers;
mod jobs;
mod map;
mod metrics;
mod problem;
mod schedules;
mod state;
mod stream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub use self::problem::Problem;
use self::state::AppState;
use crate::runtime::{RuntimeConfig, RuntimeError};
use crate::store::StoreError;
use crate::tenancy::PolicyError;

/// Boxed error of streamed response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the server sends.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// How to run the server.
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
    /// Runtime configuration; `cache_dir` is replaced by `<data-dir>/compiled`.
    pub runtime: RuntimeConfig,
    /// Which GPU-bridge devices to open.
    pub gpu: gust_gpu_bridge::BridgeConfig,
    /// The models directory; `None` means `<data-dir>/models`.
    pub models_dir: Option<PathBuf>,
    /// Resident-model memory budget per device, and batching on or off.
    pub models: gust_gpu_bridge::models::RegistryConfig,
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
            runtime,
            gpu: gust_gpu_bridge::BridgeConfig::default(),
            models_dir: None,
            models: gust_gpu_bridge::models::RegistryConfig::default(),
        }
    }
}

/// Why the server could not start.
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
    /// A key file is malformed.
    #[error("{0}")]
    Key(String),
}

/// What a first start created, for the operator to see once.
#[derive(Debug, Clone)]
pub struct FirstStart {
    /// The demo tenant's key (also written to `<data-dir>/demo.key`).
    pub demo_key: String,
    /// Where it was written.
    pub demo_key_path: PathBuf,
}

/// A bound, ready server.
pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    first_start: Option<FirstStart>,
}

impl Server {
    /// Opens the data directory, loads policies, keys and every deployed
    /// function (from the compiled cache: a restart compiles nothing) and
    /// binds the listening socket.
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        let (state, first_start) = AppState::open(config.clone()).await?;
        // Before serving: a GET of a job must already see its recovered state.
        state.jobs.recover(&state)?;
        state.schedules.load(&state)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Io {
                context: format!("listening on {}", config.listen),
                source,
            })?;
        Ok(Self {
            state: Arc::new(state),
            listener,
            first_start,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(|source| ServeError::Io {
            context: "reading the bound address".into(),
            source,
        })
    }

    /// Set when this start created the demo tenant.
    pub fn first_start(&self) -> Option<&FirstStart> {
        self.first_start.as_ref()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets
    /// in-flight requests finish within the grace period and flushes the
    /// store.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let Self {
            state, listener, ..
        } = self;
        jobs::Jobs::start(&state);
        schedules::Schedules::start(&state);
        state
            .jobs
            .track(tokio::spawn(sweep_idle_instances(Arc::clone(&state))));
        // hyper-util's GracefulShutdown cannot watch connections with
        // upgrades (WebSocket), so connections watch this flag themselves.
        let (stopping, stop_watch) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Without it small responses wait ~40 ms for delayed ACKs.
                    let _ = stream.set_nodelay(true);
                    let state = Arc::clone(&state);
                    let service = service_fn(move |request: hyper::Request<Incoming>| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handlers::route(state, request).await) }
                    });
                    let connection = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    let mut stop_watch = stop_watch.clone();
                    while connections.try_join_next().is_some() {}
                    connections.spawn(async move {
                        tokio::pin!(connection);
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            // A dropped sender also means stop. The guard
                            // `wait_for` returns is not `Send`: not kept.
                            () = async { let _ = stop_watch.wait_for(|stop| *stop).await; } => {
                                connection.as_mut().graceful_shutdown();
                                connection.await
                            }
                        };
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        tracing::info!("shutting down: finishing in-flight requests");
        let grace = state.config.grace;
        let _ = stopping.send(true);
        let finished = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, finished).await.is_err() {
            tracing::warn!(
                ?grace,
                "grace period over; dropping the remaining connections"
            );
            connections.shutdown().await;
        }
        state.jobs.shutdown().await;
        state.store.flush()?;
        Ok(())
    }
}

/// Drops reusable instances nobody called for a while (taking and returning
/// instances does this too, but a function nobody calls any more would
/// otherwise keep its instances, and their memory, forever).
async fn sweep_idle_instances(state: Arc<AppState>) {
    let every = (state.runtime.config().idle_instance_timeout / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        state.runtime.sweep_idle_instances();
    }
}
