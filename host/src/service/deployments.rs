//! Functions: deploy (validate, compile, store, cache), list, delete, and
//! the in-memory map of loaded deployments every call starts from.

use std::collections::HashMap;
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

fn no_function(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("no function `{name}`"))
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

    /// Validates and compiles `bytes`, stores them and the function, and
    /// makes the new version the one calls run.
    ///
    /// # Errors
    /// [`ServiceError::InvalidName`], [`ServiceError::InvalidComponent`]
    /// (nothing is stored then), or a store failure.
    #[tracing::instrument(level = "debug", name = "deploy", skip_all, fields(%tenant, function = %name, size = bytes.len()))]
    pub async fn deploy(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        bytes: bytes::Bytes,
        public: bool,
        retryable: bool,
    ) -> Result<Deployed, ServiceError> {
        let name = checked_name(name, "function")?.to_owned();
        let digest = Digest::of(&bytes);
        let size = bytes.len() as u64;
        let service = Arc::clone(self);
        let loaded = tokio::task::spawn_blocking(move || {
            // Validate and compile before storing anything: a bad upload
            // leaves no trace. The blob is written before the metadata that
            // points to it, so a crash in between leaves an orphan blob,
            // never a function without its component.
            let component = service.runtime.load(&bytes)?;
            Ok::<_, crate::runtime::LoadError>((component, service.blobs.put(&digest, &bytes)))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("compiling panicked: {e}")))?;
        let (component, stored) = loaded.inspect_err(|_| self.metrics.deploy("invalid"))?;
        stored?;
        let world = match component.world() {
            World::Http => FunctionWorld::Http,
            _ => FunctionWorld::Handler,
        };
        let deployed = self.store.deploy(&DeployRequest {
            tenant: tenant.to_owned(),
            name,
            digest: digest.to_string(),
            size,
            world,
            public,
            retryable,
        })?;
        self.put_deployment(Deployment {
            record: deployed.function.clone(),
            component: Ok(component),
        });
        self.metrics.deploy(if deployed.changed {
            "created"
        } else {
            "unchanged"
        });
        let schedule = self
            .store
            .schedule(&deployed.function.tenant, &deployed.function.name)?;
        tracing::debug!(
            version = deployed.function.version,
            changed = deployed.changed,
            "deployed"
        );
        Ok(Deployed {
            function: deployed.function,
            schedule: schedule.map(|s| s.cron),
            changed: deployed.changed,
        })
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
        // The blob goes when nothing else uses it (another tenant may have
        // deployed the same bytes).
        if let Some(digest) = Digest::parse(&deleted.digest)
            && !self.store.digest_in_use(&deleted.digest)?
            && let Err(e) = self.blobs.remove(&digest)
        {
            tracing::warn!(%digest, error = %e, "could not remove an unused blob");
        }
        Ok(())
    }

    /// The newest `limit` invocation records of a function.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for an unknown function, or a store failure.
    pub fn invocations(
        &self,
        tenant: &str,
        name: &str,
        limit: usize,
    ) -> Result<Vec<InvocationRecord>, ServiceError> {
        if self.store.function(tenant, name)?.is_none() {
            return Err(no_function(name));
        }
        Ok(self.store.invocations(tenant, name, limit)?)
    }

    /// One invocation record of the tenant.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn invocation(&self, tenant: &str, id: &str) -> Result<InvocationRecord, ServiceError> {
        self.store
            .invocation(tenant, id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no invocation `{id}`")))
    }
}
