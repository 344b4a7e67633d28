//! Everything the handlers share: runtime, stores, policies, the loaded
//! deployments and the concurrency gates.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::metrics::Metrics;
use super::{FirstStart, ServeConfig, ServeError};
use crate::runtime::{AllocationConfig, LoadedComponent, Reuse, Runtime};
use crate::store::sled::SledStore;
use crate::store::{
    ApiKeyRecord, BlobStore, FsBlobStore, FunctionRecord, MetaStore, StoreError, now_millis,
};
use crate::tenancy::{PolicySet, keys};

/// A deployed function ready to run, or why it is not.
#[derive(Clone)]
pub(crate) struct Deployment {
    pub(crate) record: FunctionRecord,
    pub(crate) component: Result<LoadedComponent, String>,
}

/// Counts in-flight calls against a bound; the permit releases on drop.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    in_flight: AtomicUsize,
}

/// One admitted call of a [`Gate`].
pub(crate) struct Permit {
    gate: Arc<Gate>,
}

impl Gate {
    pub(crate) fn try_acquire(self: &Arc<Self>, limit: usize) -> Option<Permit> {
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| Permit {
            gate: Arc::clone(self),
        })
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) struct AppState {
    pub(crate) config: ServeConfig,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) store: Arc<dyn MetaStore>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) policies: PolicySet,
    pub(crate) admin_key_hash: [u8; 32],
    pub(crate) metrics: Metrics,
    deployments: RwLock<HashMap<(String, String), Deployment>>,
    tenant_gates: Mutex<HashMap<String, Arc<Gate>>>,
    /// Calls running host-wide; bounded by the instance pool.
    pub(crate) host_gate: Arc<Gate>,
    pub(crate) host_capacity: usize,
    pub(crate) gpu: Arc<crate::tenancy::GpuHost>,
    pub(crate) jobs: super::jobs::Jobs,
    pub(crate) schedules: super::schedules::Schedules,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

impl AppState {
    pub(crate) async fn open(
        mut config: ServeConfig,
    ) -> Result<(Self, Option<FirstStart>), ServeError> {
        let data = config.data_dir.clone();
        std::fs::create_dir_all(&data).map_err(io(format!("creating {}", data.display())))?;
        let policies = PolicySet::load(&config.policies_dir)?;
        let store: Arc<dyn MetaStore> = Arc::new(SledStore::open(
            &data.join("meta"),
            config.retention_per_function,
        )?);
        let blobs: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(&data.join("blobs"))?);
        config.runtime.cache_dir = data.join("compiled");
        let host_capacity = match &config.runtime.allocation {
            AllocationConfig::Pooling(pool) => pool.max_instances as usize,
            AllocationConfig::OnDemand => 1024,
        };
        let runtime = Arc::new(Runtime::new(config.runtime.clone())?);
        // Opening a wgpu adapter or a CUDA context blocks for a while.
        let gpu_config = config.gpu.clone();
        let bridge =
            tokio::task::spawn_blocking(move || gust_gpu_bridge::Bridge::open(&gpu_config))
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
        let registry =
            gust_gpu_bridge::models::ModelRegistry::open_with(&models_dir, config.models)?;
        for (folder, problem) in registry.problems() {
            tracing::warn!(folder = %folder.display(), %problem, "model not served");
        }
        let gpu = Arc::new(crate::tenancy::GpuHost::new(bridge, Arc::new(registry)));

        let admin_key = match config.admin_key.clone() {
            Some(key) => key,
            None => load_or_create_key(&data.join("admin.key"))?,
        };
        let first_start = if store.tenants()?.is_empty() {
            Some(create_demo_tenant(store.as_ref(), &data)?)
        } else {
            None
        };
        let state = Self {
            admin_key_hash: keys::hash(&admin_key),
            metrics: Metrics::new(),
            deployments: RwLock::new(HashMap::new()),
            tenant_gates: Mutex::new(HashMap::new()),
            host_gate: Arc::new(Gate::default()),
            host_capacity,
            gpu,
            jobs: super::jobs::Jobs::default(),
            schedules: super::schedules::Schedules::default(),
            config,
            runtime,
            store,
            blobs,
            policies,
        };
        state.load_all().await?;
        Ok((state, first_start))
    }

    /// Loads every stored function; with a warm compiled cache this
    /// deserializes and compiles nothing.
    async fn load_all(&self) -> Result<(), ServeError> {
        let records = self.store.all_functions()?;
        let count = records.len();
        for record in records {
            let component = self.load_component(&record).await;
            if let Err(reason) = &component {
                tracing::error!(tenant = %record.tenant, function = %record.name, %reason, "function could not be loaded; its calls will fail until it is redeployed");
            }
            self.put_deployment(Deployment { record, component });
        }
        tracing::info!(functions = count, "deployments loaded");
        Ok(())
    }

    async fn load_component(&self, record: &FunctionRecord) -> Result<LoadedComponent, String> {
        let digest = crate::runtime::Digest::parse(&record.digest)
            .ok_or_else(|| format!("stored digest {} is malformed", record.digest))?;
        let blobs = Arc::clone(&self.blobs);
        let runtime = Arc::clone(&self.runtime);
        tokio::task::spawn_blocking(move || {
            let bytes = blobs
                .get(&digest)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("component blob {digest} is missing"))?;
            runtime.load(&bytes).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("loading panicked: {e}"))?
    }

    pub(crate) fn deployment(&self, tenant: &str, name: &str) -> Option<Deployment> {
        self.deployments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(tenant.to_owned(), name.to_owned()))
            .cloned()
    }

    pub(crate) fn put_deployment(&self, deployment: Deployment) {
        let key = (
            deployment.record.tenant.clone(),
            deployment.record.name.clone(),
        );
        // Instances of the version this one replaces are never used again.
        self.runtime
            .drop_idle_instances(&Reuse::scope_of(&key.0, &key.1));
        self.deployments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, deployment);
    }

    pub(crate) fn remove_deployment(&self, tenant: &str, name: &str) {
        self.deployments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(tenant.to_owned(), name.to_owned()));
        // A function deployed later under this name starts from scratch.
        self.runtime
            .drop_idle_instances(&Reuse::scope_of(tenant, name));
    }

    pub(crate) fn functions_loaded(&self) -> usize {
        self.deployments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|d| d.component.is_ok())
            .count()
    }

    pub(crate) fn tenant_gate(&self, tenant: &str) -> Arc<Gate> {
        let mut gates = self
            .tenant_gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(gates.entry(tenant.to_owned()).or_default())
    }
}

fn load_or_create_key(path: &Path) -> Result<String, ServeError> {
    if path.exists() {
        return keys::read_secret_file(path).map_err(|e| ServeError::Key(e.to_string()));
    }
    let key = keys::generate().map_err(|e| ServeError::Key(e.to_string()))?;
    keys::write_secret_file(path, &key.secret).map_err(|e| ServeError::Key(e.to_string()))?;
    tracing::info!(path = %path.display(), "generated the admin key");
    Ok(key.secret)
}

fn create_demo_tenant(store: &dyn MetaStore, data: &Path) -> Result<FirstStart, ServeError> {
    store.create_tenant("demo")?;
    let (_, secret) = issue_key(store, "demo").map_err(|e| ServeError::Key(e.to_string()))?;
    let path = data.join("demo.key");
    keys::write_secret_file(&path, &secret).map_err(|e| ServeError::Key(e.to_string()))?;
    Ok(FirstStart {
        demo_key: secret,
        demo_key_path: path,
    })
}

/// Why a key could not be issued.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IssueKeyError {
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not draw an unused key id")]
    NoFreeId,
}

/// Generates and stores a new key of `tenant`; returns its record and the
/// secret, which is shown once and never stored.
pub(crate) fn issue_key(
    store: &dyn MetaStore,
    tenant: &str,
) -> Result<(ApiKeyRecord, String), IssueKeyError> {
    // Key ids are short (32 bits) to be readable; on the rare clash with an
    // existing id, draw again rather than fail.
    for _ in 0..4 {
        let key = keys::generate()?;
        let record = ApiKeyRecord {
            id: key.id.clone(),
            tenant: tenant.to_owned(),
            hash: keys::hash(&key.secret),
            created_at: now_millis(),
        };
        match store.add_key(&record) {
            Ok(()) => return Ok((record, key.secret)),
            Err(StoreError::Conflict(_)) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Err(IssueKeyError::NoFreeId)
}
