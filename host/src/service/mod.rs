//! The invocation service: the one place that admits, runs and records an
//! invocation, whatever triggered it (invoke, map, SSE, WebSocket, jobs,
//! schedules, `/http` routes), and that deploys, lists and deletes
//! functions, keys and tenants.
//!
//! It knows nothing of HTTP: the API layer authenticates and parses, calls
//! one operation here and turns the result (or a [`ServiceError`]) into an
//! answer. The background work of a host (the job dispatcher and sweeper,
//! the cron loop, the idle-instance sweeper) lives here too, so that it
//! runs the same path as a request.

// Not boxed: a `ServiceError` is made once per failed operation and turned
// into an answer at once.
#![allow(clippy::result_large_err)]

mod admission;
mod config;
mod console;
mod deployments;
mod error;
mod health;
mod invoke;
pub mod jobs;
mod kv;
mod metrics;
mod records;
mod schedules;
mod secrets;
mod stream;
mod tenants;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use self::admission::Admission;
pub use self::admission::{Admit, Permit};
pub use self::config::{ConnectionLimits, FirstStart, ServeConfig, ServeError, StoreLocation};
pub use self::console::{ADMIN_KEY_ID, CallStats, Minute, Resident, SignedIn, call_stats};
use self::deployments::Deployments;
pub use self::deployments::{
    DeployOptions, Deployed, Deployment, MAX_FUNCTION_CONFIG, check_config, checked_name,
};
pub use self::error::ServiceError;
pub use self::invoke::{Access, Failure, Started, Target, json_input};
pub use self::jobs::CANCELLED_STATUS;
use self::jobs::Jobs;
pub use self::kv::{
    KvKeys, MAX_BUCKET_NAME_LEN, MAX_KEYS_PAGE, MAX_KV_KEY_BYTES, valid_bucket_name,
};
use self::metrics::Metrics;
use self::schedules::Schedules;
pub use self::secrets::{
    MAX_SECRET_BYTES, SecretInfo, SecretsKeyError, SecretsKeyText, valid_secret_name,
};
pub(crate) use self::stream::Forward;
pub use self::tenants::Caller;
use crate::runtime::{AllocationConfig, Runtime};
use crate::store::postgres::{PgBlobStore, PgStore};
use crate::store::sled::SledStore;
use crate::store::{BlobStore, FsBlobStore, MetaStore};
use crate::tenancy::{Policy, PolicySet, keys};

/// Everything a host shares between requests and background work: the
/// runtime, the stores, the policies, the loaded deployments, admission,
/// jobs and schedules.
pub struct Service {
    config: ServeConfig,
    runtime: Arc<Runtime>,
    store: Arc<dyn MetaStore>,
    blobs: Arc<dyn BlobStore>,
    policies: PolicySet,
    admin_key_hash: [u8; 32],
    /// Tenant keys recently found valid.
    keys: tenants::KeyCache,
    metrics: Arc<Metrics>,
    /// Writes invocation records on a thread of its own.
    records: records::Recorder,
    deployments: Deployments,
    admission: Admission,
    gpu: Arc<crate::tenancy::GpuHost>,
    jobs: Jobs,
    schedules: Schedules,
    /// Compiles running at once, host-wide (one per core): more deploys
    /// wait their turn instead of each taking memory and a blocking thread.
    compiles: Arc<tokio::sync::Semaphore>,
    /// Deploys waiting for a compile slot; beyond [`MAX_QUEUED_COMPILES`]
    /// more are answered 503.
    queued_compiles: std::sync::atomic::AtomicUsize,
    /// Held from a deploy's quota check to its store write, and by deletes,
    /// so that two deploys cannot both take a tenant's last place.
    deploying: std::sync::Mutex<()>,
    /// This process among the hosts sharing a store: what its job claims
    /// name. New at every start, so a restarted host never takes for its
    /// own the claims of its previous life.
    host_id: String,
    /// Whether the store answers.
    readiness: health::Readiness,
    /// Every tenant's sealed secrets and the key that opens them.
    secrets: secrets::Secrets,
}

/// Deploys that may wait for a compile slot, per core.
const MAX_QUEUED_COMPILES: usize = 8;

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("data_dir", &self.config.data_dir)
            .finish_non_exhaustive()
    }
}

/// How often a host on a shared store reads the functions again even
/// without a notification (one may be lost while the listening connection
/// reconnects).
const FUNCTIONS_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps this host's deployments in step with what other hosts sharing the
/// store deploy and delete: on every change notification, and every
/// [`FUNCTIONS_RECHECK`].
async fn follow_functions(service: Arc<Service>, mut changes: tokio::sync::watch::Receiver<u64>) {
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(FUNCTIONS_RECHECK) => {}
        }
        changes.mark_unchanged();
        match service.blocking(|s| s.sync_functions()).await {
            Ok(0) => {}
            Ok(changed) => tracing::debug!(changed, "deployments brought in step with the store"),
            Err(error) => tracing::warn!(%error, "could not follow other hosts' deploys"),
        }
    }
}

/// The stores `config` names: sled and blob files in `data`, or a
/// PostgreSQL database with a blob cache in `data`.
async fn open_store(
    config: &ServeConfig,
    data: &std::path::Path,
) -> Result<(Arc<dyn MetaStore>, Arc<dyn BlobStore>), ServeError> {
    match &config.store {
        StoreLocation::Embedded => Ok((
            Arc::new(SledStore::open(
                &data.join("meta"),
                config.retention_per_function,
            )?),
            Arc::new(FsBlobStore::open(&data.join("blobs"))?),
        )),
        StoreLocation::Postgres(url) => {
            let (url, retention) = (url.clone(), config.retention_per_function);
            let cache = data.join("blob-cache");
            // Connecting and migrating block: off the async threads.
            let (store, blobs) = tokio::task::spawn_blocking(move || {
                let store = PgStore::connect(&url, retention)?;
                let blobs = PgBlobStore::new(store.clone(), &cache)?;
                Ok::<_, crate::store::StoreError>((store, blobs))
            })
            .await
            .map_err(|e| ServeError::Io {
                context: "connecting to PostgreSQL".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
            Ok((Arc::new(store), Arc::new(blobs)))
        }
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

impl Service {
    /// Runs `work` (store reads and writes, fsyncs, file removals) on a
    /// blocking thread: sled waiting for log space or an fsync must not
    /// stall an async worker and every other request it polls.
    ///
    /// # Errors
    /// What `work` fails with; [`ServiceError::Internal`] if it panicked.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let service = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&service))
            .await
            .map_err(|e| ServiceError::Internal(format!("a store operation panicked: {e}")))?
    }

    /// [`Service::blocking`] on the shared store: `work` gets it, and its
    /// store errors become service errors. Only background work of a shared
    /// store calls this; without one, the answer is `T::default()`.
    ///
    /// # Errors
    /// What `work` fails with; [`ServiceError::Internal`] if it panicked.
    pub(crate) async fn on_shared<T: Default + Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self, &dyn crate::store::SharedStore) -> Result<T, crate::store::StoreError>
        + Send
        + 'static,
    ) -> Result<T, ServiceError> {
        self.blocking(move |s| match s.store.shared() {
            Some(shared) => Ok(work(s, shared)?),
            None => Ok(T::default()),
        })
        .await
    }

    /// Opens the data directory, the stores, the bridge and the policies,
    /// loads every deployed function (from the compiled cache: a restart
    /// compiles nothing), and rebuilds the job queues and schedules from
    /// the store. Nothing runs until [`Service::start`].
    ///
    /// # Errors
    /// When a policy is invalid, the store, the bridge or the runtime
    /// cannot be opened, or a key file is malformed.
    pub async fn open(mut config: ServeConfig) -> Result<(Self, Option<FirstStart>), ServeError> {
        let data = config.data_dir.clone();
        std::fs::create_dir_all(&data).map_err(io(format!("creating {}", data.display())))?;
        let policies = PolicySet::load(&config.policies_dir)?;
        let (store, blobs) = open_store(&config, &data).await?;
        config.runtime.cache_dir = data.join("compiled");
        let host_capacity = match &config.runtime.allocation {
            AllocationConfig::Pooling(pool) => pool.max_instances as usize,
            AllocationConfig::OnDemand => 1024,
        };
        let runtime = Arc::new(Runtime::new(config.runtime.clone())?);
        let gpu = Arc::new(open_gpu(&config, &data).await?);
        let admin_key = match config.admin_key.clone() {
            Some(key) => key,
            None => load_or_create_key(&data.join("admin.key"))?,
        };
        let first_start = if store.tenants()?.is_empty() {
            match tenants::create_demo_tenant(store.as_ref(), &data) {
                Ok(first) => Some(first),
                // Another host sharing the store made it first.
                Err(ServeError::Store(crate::store::StoreError::Conflict(_))) => None,
                Err(other) => return Err(other),
            }
        } else {
            None
        };
        let secrets_key = secrets::SecretsKey::load(
            &data,
            config.secrets_key.as_ref().map(|key| key.0.as_str()),
        )?;
        if store.shared().is_some() && config.secrets_key.is_none() {
            tracing::warn!(
                key_id = secrets_key.id(),
                "no GUST_SECRETS_KEY: secrets this host sets open only on hosts with the same <data-dir>/secrets.key; give every host sharing the store the same GUST_SECRETS_KEY"
            );
        }
        let secrets = secrets::Secrets::load(secrets_key, store.as_ref())?;
        let metrics = Arc::new(Metrics::new());
        let service = Self {
            admin_key_hash: keys::hash(&admin_key),
            keys: tenants::KeyCache::default(),
            metrics: Arc::clone(&metrics),
            records: records::Recorder::start(Arc::clone(&store), metrics)
                .map_err(io("starting the invocation-record writer"))?,
            deployments: Deployments::default(),
            admission: Admission::new(host_capacity),
            gpu,
            jobs: Jobs::default(),
            schedules: Schedules::default(),
            compiles: Arc::new(tokio::sync::Semaphore::new(cores())),
            queued_compiles: std::sync::atomic::AtomicUsize::new(0),
            deploying: std::sync::Mutex::new(()),
            host_id: new_host_id(),
            readiness: health::Readiness::default(),
            secrets,
            config,
            runtime,
            store,
            blobs,
            policies,
        };
        service.load_all().await?;
        service.collect_garbage();
        // Before serving: a GET of a job must already see its recovered state.
        service.recover_jobs()?;
        service.load_schedules()?;
        Ok((service, first_start))
    }

    /// Starts the background work: the job dispatcher and sweeper, the cron
    /// loop and the idle-instance sweeper. They stop at [`Service::shutdown`].
    pub fn start(self: &Arc<Self>) {
        self.start_health();
        self.start_jobs();
        self.start_schedules();
        if let Some(shared) = self.store.shared() {
            let changes = shared.functions_changed();
            self.track(tokio::spawn(follow_functions(Arc::clone(self), changes)));
            // Without a shared store, only this host changes secrets, and
            // it reloads them as it does.
            self.track(self.follow_secrets());
        }
        self.track(tokio::spawn(sweep_idle_instances(Arc::clone(self))));
    }

    /// Keeps a background task to stop at shutdown.
    pub fn track(&self, task: tokio::task::JoinHandle<()>) {
        self.jobs.track(task);
    }

    /// Stops every background task and running job, then flushes the store.
    ///
    /// # Errors
    /// When the store cannot be flushed.
    pub async fn shutdown(&self) -> Result<(), crate::store::StoreError> {
        self.jobs.shutdown().await;
        // Stopped here: other hosts may take them over now.
        self.abandon_jobs();
        // Calls that finished before the stop have their records stored.
        self.records.drain().await;
        self.store.flush()?;
        Ok(())
    }

    /// The configuration the host runs with.
    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// The policy of `tenant` (the default policy when it has none).
    pub fn policy(&self, tenant: &str) -> &Policy {
        self.policies.for_tenant(tenant)
    }

    /// The host's metrics as Prometheus text, brought up to date.
    pub fn metrics_text(&self) -> String {
        let (queued, running) = self.jobs.counts();
        self.metrics.jobs(queued, running);
        self.metrics.render(
            self.runtime.stats(),
            self.admission.in_flight(),
            self.deployments.loaded(),
            self.gpu.bridge().devices(),
            self.gpu.models().stats(),
        )
    }

    /// Counts a request refused before it ran (`reason`: a fixed set).
    pub fn rejected(&self, reason: &'static str) {
        self.metrics.rejected(reason);
    }
}

/// A new host id: `<hostname>-<pid>-<random>`, readable in the store and
/// unique across restarts.
fn new_host_id() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let mut random = [0u8; 4];
    // Without randomness, the pid and the start time still tell restarts
    // apart.
    if getrandom::fill(&mut random).is_err() {
        random = (crate::store::now_millis() as u32).to_le_bytes();
    }
    format!(
        "{name}-{}-{:08x}",
        std::process::id(),
        u32::from_le_bytes(random)
    )
}

/// The machine's cores (1 if it cannot say).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

async fn open_gpu(
    config: &ServeConfig,
    data: &Path,
) -> Result<crate::tenancy::GpuHost, ServeError> {
    // Opening a wgpu adapter or a CUDA context blocks for a while.
    let gpu_config = config.gpu.clone();
    let bridge = tokio::task::spawn_blocking(move || gust_gpu_bridge::Bridge::open(&gpu_config))
        .await
        .map_err(|e| {
            ServeError::Gpu(gust_gpu_bridge::BridgeError::backend(format!(
                "opening devices panicked: {e}"
            )))
        })??;
    let models_dir = config
        .models_dir
        .clone()
        .unwrap_or_else(|| data.join("models"));
    std::fs::create_dir_all(&models_dir)
        .map_err(io(format!("creating {}", models_dir.display())))?;
    let registry = gust_gpu_bridge::models::ModelRegistry::open_with(&models_dir, config.models)?;
    for (folder, problem) in registry.problems() {
        tracing::warn!(folder = %folder.display(), %problem, "model not served");
    }
    Ok(crate::tenancy::GpuHost::new(bridge, Arc::new(registry)))
}

fn load_or_create_key(path: &Path) -> Result<String, ServeError> {
    if path.exists() {
        return Ok(keys::read_secret_file(path)?);
    }
    let key = keys::generate()?;
    keys::write_secret_file(path, &key.secret)?;
    tracing::info!(path = %path.display(), "generated the admin key");
    Ok(key.secret)
}

/// Drops reusable instances nobody called for a while (taking and returning
/// instances does this too, but a function nobody calls any more would
/// otherwise keep its instances, and their memory, forever).
async fn sweep_idle_instances(service: Arc<Service>) {
    let every = (service.runtime.config().idle_instance_timeout / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        service.runtime.sweep_idle_instances();
    }
}
