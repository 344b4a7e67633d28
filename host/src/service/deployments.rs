//! Functions: deploy (validate, compile, store, cache), list, delete, and
//! the in-memory map of loaded deployments every call starts from.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use super::{ServeError, Service, ServiceError};
use crate::digest::Digest;
use crate::runtime::{LoadedComponent, Reuse, World};
use crate::store::{DeployRequest, FunctionRecord, FunctionWorld, InvocationRecord};
use crate::tenancy::valid_name;

/// A deployed function ready to run, or why it is not.
#[derive(Clone)]
pub struct Deployment {
    /// The stored function.
    pub record: FunctionRecord,
    /// Its compiled component, or why it could not be loaded.
    pub component: Result<LoadedComponent, String>,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("record", &self.record)
            .field("loaded", &self.component.is_ok())
            .finish()
    }
}

/// The result of a deploy.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The function as stored now.
    pub function: FunctionRecord,
    /// Its schedule's cron expression, if it has one.
    pub schedule: Option<String>,
    /// False when the bytes and flags were those deployed already.
    pub changed: bool,
}

/// Loaded deployments by (tenant, name).
#[derive(Default)]
pub(super) struct Deployments {
    map: RwLock<HashMap<(String, String), Deployment>>,
}

impl Deployments {
    fn get(&self, tenant: &str, name: &str) -> Option<Deployment> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(tenant.to_owned(), name.to_owned()))
            .cloned()
    }

    fn put(&self, deployment: Deployment) {
        let key = (
            deployment.record.tenant.clone(),
            deployment.record.name.clone(),
        );
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, deployment);
    }

    fn all(&self) -> Vec<Deployment> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn remove(&self, tenant: &str, name: &str) {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(tenant.to_owned(), name.to_owned()));
    }

    /// Functions whose component is loaded.
    pub(super) fn loaded(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|d| d.component.is_ok())
            .count()
    }
}

/// `name` if it is a valid name of a `what`.
///
/// # Errors
/// [`ServiceError::InvalidName`] otherwise.
pub fn checked_name<'a>(name: &'a str, what: &'static str) -> Result<&'a str, ServiceError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(ServiceError::InvalidName {
            name: name.to_owned(),
            what,
        })
    }
}

/// Captured output one page of logs may carry: a thousand records of 64 KiB
/// stdout and stderr each would otherwise be built in memory at once.
const LOG_PAGE_BYTES: usize = 4 << 20;

/// Loads the component `digest`: from its compiled artifact alone when the
/// cache has a valid one (a restart then reads no blob), otherwise from its
/// blob, which must still hash to `digest`.
fn load_blob(
    blobs: &dyn crate::store::BlobStore,
    runtime: &crate::runtime::Runtime,
    digest: &Digest,
) -> Result<LoadedComponent, String> {
    if let Some(loaded) = runtime.load_compiled(digest) {
        return loaded.map_err(|e| e.to_string());
    }
    let bytes = blobs
        .get(digest)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("component blob {digest} is missing"))?;
    if Digest::of(&bytes) != *digest {
        return Err(format!(
            "component blob {digest} is corrupt (its bytes hash to something else)"
        ));
    }
    runtime.load(&bytes).map_err(|e| e.to_string())
}

fn no_function(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("no function `{name}`"))
}

/// How a deploy stores its function, besides its component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeployOptions {
    /// Serve `/http/{tenant}/{name}/…` to callers without a key.
    pub public: bool,
    /// Run an interrupted job of it once more.
    pub retryable: bool,
    /// The tenant's secrets its calls get as environment variables.
    pub secrets: Vec<String>,
    /// Configuration values its calls read through `wasi:config/store`,
    /// over the tenant policy's `[config]`.
    pub config: BTreeMap<String, String>,
}

/// Configuration values one function may be deployed with, at most.
pub const MAX_FUNCTION_CONFIG: usize = 256;

/// Checks a deploy's configuration values (see [`DeployOptions::config`]).
///
/// # Errors
/// [`ServiceError::InvalidConfig`] naming what is wrong.
pub fn check_config(config: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    use crate::tenancy::policy::{MAX_CONFIG_KEY_LEN, MAX_CONFIG_VALUE_BYTES, valid_config_key};
    if config.len() > MAX_FUNCTION_CONFIG {
        return Err(ServiceError::InvalidConfig(format!(
            "{} configuration values given; a function has at most {MAX_FUNCTION_CONFIG}",
            config.len()
        )));
    }
    for (key, value) in config {
        if !valid_config_key(key) {
            return Err(ServiceError::InvalidConfig(format!(
                "{key:?} is not a valid configuration key: use 1-{MAX_CONFIG_KEY_LEN} of A-Z, a-z, 0-9, `_`, `.` and `-`"
            )));
        }
        if value.len() > MAX_CONFIG_VALUE_BYTES {
            return Err(ServiceError::InvalidConfig(format!(
                "the value of {key:?} is {} bytes; at most {MAX_CONFIG_VALUE_BYTES}",
                value.len()
            )));
        }
    }
    Ok(())
}

impl Service {
    /// Loads every stored function; with a warm compiled cache this
    /// deserializes and compiles nothing.
    pub(super) async fn load_all(&self) -> Result<(), ServeError> {
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
        let digest = Digest::parse(&record.digest)
            .ok_or_else(|| format!("stored digest {} is malformed", record.digest))?;
        let blobs = Arc::clone(&self.blobs);
        let runtime = Arc::clone(&self.runtime);
        tokio::task::spawn_blocking(move || load_blob(blobs.as_ref(), &runtime, &digest))
            .await
            .map_err(|e| format!("loading panicked: {e}"))?
    }

    /// Makes the loaded deployments what the store holds now: loads the
    /// functions other hosts sharing the store deployed or redeployed,
    /// drops those they deleted (with what only they used). Runs on a
    /// blocking thread, under the deploy lock, so that a deploy or delete
    /// of this host cannot interleave. Returns how many functions changed.
    ///
    /// # Errors
    /// When the store cannot list the functions.
    pub(super) fn sync_functions(&self) -> Result<usize, ServiceError> {
        let deploying = self.deploy_lock();
        let stored = self.store.all_functions()?;
        let mut changed = 0;
        let mut present = std::collections::HashSet::new();
        for record in stored {
            present.insert((record.tenant.clone(), record.name.clone()));
            let replaced = self.deployments.get(&record.tenant, &record.name);
            if replaced.as_ref().is_some_and(|d| d.record == record) {
                continue;
            }
            let component = Digest::parse(&record.digest)
                .ok_or_else(|| format!("stored digest {} is malformed", record.digest))
                .and_then(|digest| load_blob(self.blobs.as_ref(), &self.runtime, &digest));
            if let Err(reason) = &component {
                tracing::error!(tenant = %record.tenant, function = %record.name, %reason, "a function deployed by another host could not be loaded here");
            }
            tracing::debug!(tenant = %record.tenant, function = %record.name, version = record.version, "following another host's deploy");
            let digest = record.digest.clone();
            self.put_deployment(Deployment { record, component });
            if let Some(old) = replaced.and_then(|d| Digest::parse(&d.record.digest))
                && old.to_string() != digest
            {
                self.forget_if_unused(&deploying, &old);
            }
            changed += 1;
        }
        for gone in self
            .deployments
            .all()
            .into_iter()
            .filter(|d| !present.contains(&(d.record.tenant.clone(), d.record.name.clone())))
        {
            let (tenant, name) = (&gone.record.tenant, &gone.record.name);
            tracing::debug!(%tenant, function = %name, "following another host's delete");
            self.deployments.remove(tenant, name);
            self.runtime
                .drop_idle_instances(&Reuse::scope_of(tenant, name));
            if let Some(digest) = Digest::parse(&gone.record.digest) {
                self.forget_if_unused(&deploying, &digest);
            }
            changed += 1;
        }
        Ok(changed)
    }

    /// The deployment of `tenant`'s function `name`, if there is one.
    pub fn deployment(&self, tenant: &str, name: &str) -> Option<Deployment> {
        self.deployments.get(tenant, name)
    }

    fn put_deployment(&self, deployment: Deployment) {
        // Instances of the version this one replaces are never used again.
        self.runtime.drop_idle_instances(&Reuse::scope_of(
            &deployment.record.tenant,
            &deployment.record.name,
        ));
        self.deployments.put(deployment);
    }

    /// Validates and compiles `bytes`, stores them and the function (with
    /// `options`), and makes the new version the one calls run.
    ///
    /// Compiles run one per core; a deploy waits for a slot, or is refused
    /// with [`ServiceError::HostBusy`] when many already wait. A version
    /// replaced takes its blob and compiled artifact with it unless another
    /// function uses them.
    ///
    /// # Errors
    /// [`ServiceError::InvalidName`], [`ServiceError::InvalidSecret`] or
    /// [`ServiceError::InvalidSecretName`], [`ServiceError::InvalidComponent`]
    /// (nothing is stored then), [`ServiceError::FunctionQuota`],
    /// [`ServiceError::StorageQuota`], [`ServiceError::HostBusy`], or a
    /// store failure.
    #[tracing::instrument(level = "debug", name = "deploy", skip_all, fields(%tenant, function = %name, size = bytes.len()))]
    pub async fn deploy(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        bytes: bytes::Bytes,
        options: DeployOptions,
    ) -> Result<Deployed, ServiceError> {
        let name = checked_name(name, "function")?.to_owned();
        check_config(&options.config)?;
        // Refused before compiling: it could not be stored.
        self.ready().map_err(ServiceError::StoreUnavailable)?;
        // Refused before compiling too: a secret the tenant does not have.
        let options = DeployOptions {
            secrets: self.deploy_secrets(tenant, &options.secrets)?,
            ..options
        };
        let digest = Digest::of(&bytes);
        let size = bytes.len() as u64;
        // Refused before compiling: a tenant at its quota costs no CPU.
        let (quota_tenant, quota_name) = (tenant.to_owned(), name.clone());
        self.blocking(move |s| s.check_quota(&quota_tenant, &quota_name, size))
            .await?;
        let _compiling = self.compile_slot().await?;
        let service = Arc::clone(self);
        let loaded = tokio::task::spawn_blocking(move || {
            // Validate and compile before storing anything: a bad upload
            // leaves no trace. The blob is written before the metadata that
            // points to it, so a crash in between leaves an orphan blob,
            // never a function without its component.
            let component = service.runtime.load(&bytes)?;
            if let Err(e) = service.blobs.put(&digest, &bytes) {
                service.forget_if_unused(&service.deploy_lock(), &digest);
                return Ok(Err(e));
            }
            Ok::<_, crate::runtime::LoadError>(Ok((component, bytes)))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("compiling panicked: {e}")))?;
        let (component, bytes) = loaded.inspect_err(|_| self.metrics.deploy("invalid"))??;
        // Store writes and fsyncs, blob checks and file removals: off the
        // async threads.
        let tenant = tenant.to_owned();
        let (deployed, schedule) = self
            .blocking(move |s| s.commit_deploy(&tenant, name, digest, &bytes, component, options))
            .await?;
        tracing::debug!(
            version = deployed.function.version,
            changed = deployed.changed,
            "deployed"
        );
        Ok(Deployed {
            function: deployed.function,
            schedule,
            changed: deployed.changed,
        })
    }

    /// The part of [`deploy`](Self::deploy) after compiling, on a blocking
    /// thread: under the deploy lock, checks the quota again, stores the
    /// function, makes the new version the one calls run and forgets what
    /// the replaced version leaves unused. Returns the stored function and
    /// its schedule's cron expression.
    fn commit_deploy(
        &self,
        tenant: &str,
        name: String,
        digest: Digest,
        bytes: &[u8],
        component: LoadedComponent,
        options: DeployOptions,
    ) -> Result<(crate::store::Deployed, Option<String>), ServiceError> {
        let size = bytes.len() as u64;
        let world = match component.world() {
            World::Http => FunctionWorld::Http,
            World::HttpP3 => FunctionWorld::HttpP3,
            _ => FunctionWorld::Handler,
        };
        let deployed = {
            let deploying = self.deploy_lock();
            // Again, now that no other deploy of the tenant can come in
            // between the check and the write.
            let replaced = self.store.function(tenant, &name)?;
            // A failed deploy of the same bytes may have removed the blob
            // since it was written above (it was unused then).
            if !self.blobs.contains(&digest)? {
                self.blobs.put(&digest, bytes)?;
            }
            let written = self.check_quota(tenant, &name, size).and_then(|()| {
                Ok(self.store.deploy(&DeployRequest {
                    tenant: tenant.to_owned(),
                    name,
                    digest: digest.to_string(),
                    size,
                    world,
                    public: options.public,
                    retryable: options.retryable,
                    secrets: options.secrets,
                    config: options.config,
                })?)
            });
            let deployed = match written {
                Ok(deployed) => deployed,
                Err(e) => {
                    // Nothing points at what was stored for this deploy.
                    self.forget_if_unused(&deploying, &digest);
                    return Err(e);
                }
            };
            self.put_deployment(Deployment {
                record: deployed.function.clone(),
                component: Ok(component),
            });
            // The version replaced leaves its bytes and compiled code
            // behind unless another function uses them.
            if let Some(old) = replaced.and_then(|r| Digest::parse(&r.digest))
                && old != digest
            {
                self.forget_if_unused(&deploying, &old);
            }
            deployed
        };
        self.metrics.deploy(if deployed.changed {
            "created"
        } else {
            "unchanged"
        });
        let schedule = self
            .store
            .schedule(&deployed.function.tenant, &deployed.function.name)?;
        Ok((deployed, schedule.map(|s| s.cron)))
    }

    /// The tenant's functions, each with its schedule's cron expression.
    ///
    /// # Errors
    /// A store failure.
    pub fn functions(
        &self,
        tenant: &str,
    ) -> Result<Vec<(FunctionRecord, Option<String>)>, ServiceError> {
        self.store
            .functions(tenant)?
            .into_iter()
            .map(|f| {
                let schedule = self.store.schedule(tenant, &f.name)?;
                Ok((f, schedule.map(|s| s.cron)))
            })
            .collect()
    }

    /// One function of the tenant, with its schedule's cron expression.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<(FunctionRecord, Option<String>), ServiceError> {
        let record = self
            .store
            .function(tenant, name)?
            .ok_or_else(|| no_function(name))?;
        let schedule = self.store.schedule(tenant, name)?;
        Ok((record, schedule.map(|s| s.cron)))
    }

    /// Deletes a function, its schedule, its idle instances and (when no
    /// other function uses the same bytes) its component blob.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn delete_function(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        let deploying = self.deploy_lock();
        let deleted = self
            .store
            .delete_function(tenant, name)?
            .ok_or_else(|| no_function(name))?;
        self.deployments.remove(tenant, name);
        // A function deployed later under this name starts from scratch.
        self.runtime
            .drop_idle_instances(&Reuse::scope_of(tenant, name));
        // A schedule runs its function: it goes with it.
        if self.store.delete_schedule(tenant, name)? {
            self.schedules.remove(tenant, name);
        }
        // The blob and compiled code go when nothing else uses them
        // (another tenant may have deployed the same bytes).
        if let Some(digest) = Digest::parse(&deleted.digest) {
            self.forget_if_unused(&deploying, &digest);
        }
        Ok(())
    }

    /// Whether `tenant` may deploy `size` bytes as `name`: within its
    /// policy's `max_functions` and `max_storage_bytes`, counting what is
    /// deployed now except the version `name` would replace.
    ///
    /// # Errors
    /// [`ServiceError::FunctionQuota`], [`ServiceError::StorageQuota`], or
    /// a store failure.
    fn check_quota(&self, tenant: &str, name: &str, size: u64) -> Result<(), ServiceError> {
        let policy = self.policy(tenant);
        let others: Vec<FunctionRecord> = self
            .store
            .functions(tenant)?
            .into_iter()
            .filter(|f| f.name != name)
            .collect();
        if others.len() as u64 >= policy.max_functions {
            return Err(ServiceError::FunctionQuota {
                limit: policy.max_functions,
            });
        }
        let needed = others
            .iter()
            .fold(size, |total, f| total.saturating_add(f.size));
        if needed > policy.max_storage_bytes {
            return Err(ServiceError::StorageQuota {
                limit: policy.max_storage_bytes,
                needed,
            });
        }
        Ok(())
    }

    /// The lock deploys and deletes hold around their checks and writes.
    fn deploy_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.deploying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A compile slot (one per core), waiting in line for one; refused with
    /// [`ServiceError::HostBusy`] when the line is already long.
    async fn compile_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        use std::sync::atomic::Ordering;
        if let Ok(slot) = Arc::clone(&self.compiles).try_acquire_owned() {
            return Ok(slot);
        }
        let line = super::MAX_QUEUED_COMPILES.saturating_mul(super::cores());
        if self.queued_compiles.fetch_add(1, Ordering::AcqRel) >= line {
            self.queued_compiles.fetch_sub(1, Ordering::AcqRel);
            self.metrics.rejected("compile-queue");
            return Err(ServiceError::HostBusy);
        }
        let slot = Arc::clone(&self.compiles).acquire_owned().await;
        self.queued_compiles.fetch_sub(1, Ordering::AcqRel);
        // The semaphore is never closed.
        slot.map_err(|_| ServiceError::HostBusy)
    }

    /// Removes the blob and the compiled artifact of `digest` when no
    /// function uses it. Failures are logged: the next start's garbage
    /// collection tries again.
    ///
    /// `_deploying` is the deploy lock, held: the removal cannot then fall
    /// between another deploy's check of its blob and its function's write.
    fn forget_if_unused(&self, _deploying: &std::sync::MutexGuard<'_, ()>, digest: &Digest) {
        match self.store.digest_in_use(&digest.to_string()) {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "could not tell whether a blob is in use");
                return;
            }
        }
        if let Err(e) = self.blobs.remove(digest) {
            tracing::warn!(%digest, error = %e, "could not remove an unused blob");
        }
        if let Err(e) = self.runtime.forget_compiled(digest) {
            tracing::warn!(%digest, error = %e, "could not remove an unused compiled artifact");
        }
    }

    /// Removes blobs and compiled artifacts no function uses: left by a
    /// crash between a blob's write and its function's, by a removal that
    /// failed, or by an engine this host no longer runs.
    pub(super) fn collect_garbage(&self) {
        let used: Vec<Digest> = match self.store.all_functions() {
            Ok(functions) => functions
                .iter()
                .filter_map(|f| Digest::parse(&f.digest))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection skipped: functions unreadable");
                return;
            }
        };
        let mut removed = 0usize;
        // On a store other hosts share, a blob that no function uses yet
        // may be another host's deploy in flight: only this host's own
        // files (compiled code) are collected then.
        let shared = self.store.shared().is_some();
        match self.blobs.list() {
            Ok(_) if shared => {}
            Ok(stored) => {
                for digest in stored.iter().filter(|d| !used.contains(d)) {
                    match self.blobs.remove(digest) {
                        Ok(_) => removed += 1,
                        Err(e) => {
                            tracing::warn!(%digest, error = %e, "could not remove an unused blob")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list blobs"),
        }
        match self.runtime.retain_compiled(&used) {
            Ok(files) => removed += files,
            Err(e) => tracing::warn!(error = %e, "could not clean the compiled cache"),
        }
        if removed > 0 {
            tracing::info!(removed, "removed files no function uses");
        }
    }

    /// A page of a function's invocation records, newest first: at most
    /// `limit`, older than `cursor` (from an earlier page) when given, and
    /// at most [`LOG_PAGE_BYTES`] of captured output (at least one record).
    /// Also returns the cursor of the next page, if there is one. Includes
    /// the records of every call answered before it ([`Service::settle_records`]:
    /// it may block the thread a moment).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for an unknown function, or a store failure.
    pub fn invocations(
        &self,
        tenant: &str,
        name: &str,
        limit: usize,
        cursor: Option<u64>,
    ) -> Result<(Vec<InvocationRecord>, Option<u64>), ServiceError> {
        if self.store.function(tenant, name)?.is_none() {
            return Err(no_function(name));
        }
        self.settle_records();
        // One more than asked for tells whether another page follows.
        let mut records =
            self.store
                .invocations_before(tenant, name, limit.saturating_add(1), cursor)?;
        let mut bytes = 0usize;
        let mut kept = 0usize;
        for (_, record) in &records {
            bytes = bytes.saturating_add(
                record.stdout.len()
                    + record.stderr.len()
                    + record.message.as_ref().map_or(0, String::len),
            );
            // The first record always goes out, whatever its size.
            if kept == limit || (kept > 0 && bytes > LOG_PAGE_BYTES) {
                break;
            }
            kept += 1;
        }
        let more = records.len() > kept;
        records.truncate(kept);
        let next = more.then(|| records.last().map(|(seq, _)| *seq)).flatten();
        Ok((records.into_iter().map(|(_, r)| r).collect(), next))
    }

    /// One invocation record of the tenant; the record of any call
    /// answered before it is found ([`Service::settle_records`]: it may
    /// block the thread a moment).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn invocation(&self, tenant: &str, id: &str) -> Result<InvocationRecord, ServiceError> {
        self.settle_records();
        self.store
            .invocation(tenant, id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no invocation `{id}`")))
    }
}
