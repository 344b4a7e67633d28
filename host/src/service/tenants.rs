//! Callers, tenants and their keys, and what a tenant may see of the host
//! (GPU usage, models).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{FirstStart, ServeError, Service, ServiceError};
use crate::store::{ApiKeyRecord, MetaStore, StoreError, TenantRecord, now_millis};
use crate::tenancy::keys;
use crate::wire;

/// Who is calling, as a valid key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The host's admin key.
    Admin,
    /// A key of this tenant.
    Tenant(String),
}

/// How long a key found valid is trusted without asking the store again.
/// A key revoked on this host is forgotten at once; one revoked on another
/// host sharing the store stops working here within this time.
const KEY_CACHE_TTL: Duration = Duration::from_millis(500);

/// Keys remembered at most; past it the cache starts over (a flood of
/// distinct valid keys costs store reads, never memory).
const KEY_CACHE_MAX: usize = 65_536;

/// Valid keys recently seen, by hash, with their tenant: a request
/// authenticates from memory, with no store read, however slow the store.
#[derive(Debug, Default)]
pub(super) struct KeyCache {
    entries: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl KeyCache {
    /// The tenant of a key known valid within the last [`KEY_CACHE_TTL`],
    /// or at any time when `stale` (the store is out of reach: a key seen
    /// valid before keeps working, a revocation meanwhile waits for the
    /// store).
    fn get(&self, hash: &[u8; 32], stale: bool) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(hash)
            .filter(|(_, at)| stale || at.elapsed() < KEY_CACHE_TTL)
            .map(|(tenant, _)| tenant.clone())
    }

    fn put(&self, hash: [u8; 32], tenant: String) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= KEY_CACHE_MAX {
            entries.clear();
        }
        entries.insert(hash, (tenant, Instant::now()));
    }

    fn forget(&self, hash: &[u8; 32]) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(hash);
    }
}

/// Generates and stores a new key of `tenant`; returns its record and the
/// secret, which is shown once and never stored.
fn issue_key(store: &dyn MetaStore, tenant: &str) -> Result<(ApiKeyRecord, String), ServiceError> {
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
    Err(ServiceError::Internal(
        "could not draw an unused key id".into(),
    ))
}

/// Creates the `demo` tenant and writes its key next to the data.
pub(super) fn create_demo_tenant(
    store: &dyn MetaStore,
    data: &Path,
) -> Result<FirstStart, ServeError> {
    store.create_tenant("demo")?;
    let (_, secret) = issue_key(store, "demo").map_err(|e| match e {
        ServiceError::Store(e) => ServeError::Store(e),
        ServiceError::Key(e) => ServeError::Key(e),
        other => ServeError::Io {
            context: "creating the demo tenant's key".into(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    let path = data.join("demo.key");
    keys::write_secret_file(&path, &secret)?;
    Ok(FirstStart {
        demo_key: secret,
        demo_key_path: path,
    })
}

impl Service {
    /// The caller a bearer token names; `None` when it is no key of this
    /// host.
    ///
    /// # Errors
    /// A store failure.
    pub fn authenticate(&self, token: &str) -> Result<Option<Caller>, ServiceError> {
        let hash = keys::hash(token);
        if let Some(known) = self.known_caller(&hash) {
            return Ok(Some(known));
        }
        let found = match self.store.key_by_hash(&hash) {
            Ok(found) => found,
            Err(error) if error.is_unavailable() => {
                // Checked moments ago the store was fine; now it is not.
                return match self.keys.get(&hash, true) {
                    Some(tenant) => Ok(Some(Caller::Tenant(tenant))),
                    None => Err(error.into()),
                };
            }
            Err(error) => return Err(error.into()),
        };
        Ok(match found {
            Some(record) if keys::constant_time_eq(&record.hash, &hash) => {
                self.keys.put(hash, record.tenant.clone());
                Some(Caller::Tenant(record.tenant))
            }
            _ => None,
        })
    }

    /// The caller a bearer token names, when that is known without the
    /// store: the admin key, or a tenant key found valid moments ago.
    /// `None` means the store must be asked ([`Service::authenticate`]).
    pub fn authenticate_cached(&self, token: &str) -> Option<Caller> {
        self.known_caller(&keys::hash(token))
    }

    /// [`Service::authenticate_cached`], from the key's hash.
    fn known_caller(&self, hash: &[u8; 32]) -> Option<Caller> {
        if keys::constant_time_eq(hash, &self.admin_key_hash) {
            return Some(Caller::Admin);
        }
        self.keys
            .get(hash, !self.store_reachable())
            .map(Caller::Tenant)
    }

    /// A new key of `tenant`, with its secret (shown once).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for an unknown tenant; a store or key
    /// failure.
    pub fn create_key(&self, tenant: &str) -> Result<(ApiKeyRecord, String), ServiceError> {
        if self.store.tenant(tenant)?.is_none() {
            return Err(ServiceError::NotFound(format!("no tenant `{tenant}`")));
        }
        issue_key(self.store.as_ref(), tenant)
    }

    /// The keys of `tenant` (never their secrets).
    ///
    /// # Errors
    /// A store failure.
    pub fn keys(&self, tenant: &str) -> Result<Vec<ApiKeyRecord>, ServiceError> {
        Ok(self.store.keys(tenant)?)
    }

    /// Revokes a key of `tenant`.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn revoke_key(&self, tenant: &str, id: &str) -> Result<(), ServiceError> {
        let hash = self
            .store
            .keys(tenant)?
            .into_iter()
            .find(|key| key.id == id)
            .map(|key| key.hash);
        if self.store.revoke_key(tenant, id)? {
            if let Some(hash) = hash {
                self.keys.forget(&hash);
            }
            Ok(())
        } else {
            Err(ServiceError::NotFound(format!("no key `{id}`")))
        }
    }

    /// Creates a tenant with its first key.
    ///
    /// # Errors
    /// [`ServiceError::InvalidName`], [`ServiceError::Conflict`], or a
    /// store or key failure.
    pub fn create_tenant(
        &self,
        name: &str,
    ) -> Result<(TenantRecord, ApiKeyRecord, String), ServiceError> {
        let name = super::deployments::checked_name(name, "tenant")?;
        let tenant = self.store.create_tenant(name).map_err(|e| match e {
            StoreError::Conflict(_) => {
                ServiceError::Conflict(format!("tenant `{name}` already exists"))
            }
            other => ServiceError::Store(other),
        })?;
        let (key, secret) = issue_key(self.store.as_ref(), name)?;
        Ok((tenant, key, secret))
    }

    /// Every tenant.
    ///
    /// # Errors
    /// A store failure.
    pub fn tenants(&self) -> Result<Vec<TenantRecord>, ServiceError> {
        Ok(self.store.tenants()?)
    }

    /// The tenant's use of the GPU bridge: device time and device memory,
    /// against its policy's quotas. Kept per tenant in the API rather than
    /// as a metric label, since the number of tenants is not bounded.
    pub fn usage(&self, tenant: &str) -> wire::Usage {
        let policy = self.policy(tenant);
        let account = self.gpu.existing_account(tenant);
        let devices = self
            .gpu
            .grant(tenant, &policy.gpu)
            .map(|grant| {
                grant
                    .devices
                    .iter()
                    .map(|d| {
                        let info = d.description();
                        wire::DeviceInfo {
                            backend: info.kind.as_str().to_owned(),
                            name: info.name.clone(),
                            is_gpu: info.is_gpu,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        wire::Usage {
            tenant: tenant.to_owned(),
            gpu: wire::GpuUsage {
                devices,
                device_seconds: account
                    .as_ref()
                    .map_or(0.0, |a| a.device_time().as_secs_f64()),
                memory_bytes: account.as_ref().map_or(0, |a| a.used_bytes()),
                peak_memory_bytes: account.as_ref().map_or(0, |a| a.peak_bytes()),
                memory_limit_bytes: policy.gpu.memory_mb.saturating_mul(1 << 20),
                time_ms_per_minute: policy.gpu.time_ms_per_minute,
            },
        }
    }

    /// The host's models: which the tenant may load, and which are resident
    /// on which device. The registry's counters are host-wide (a load
    /// serves every tenant allowed the model), so they show whether calls
    /// find models warm.
    pub fn models(&self, tenant: &str) -> wire::Models {
        let policy = self.policy(tenant);
        let registry = self.gpu.models();
        let devices = self.gpu.bridge().devices();
        // Only what the tenant may load: the rest, and where it is
        // resident, is other tenants' business.
        let models = registry
            .list()
            .filter(|entry| policy.gpu.allows_model(&entry.manifest.name))
            .map(|entry| {
                let name = &entry.manifest.name;
                let resident_on = devices
                    .iter()
                    .filter(|d| registry.resident_models(d).iter().any(|m| m == name))
                    .map(|d| d.kind().as_str().to_owned())
                    .collect();
                wire::Model {
                    name: name.clone(),
                    family: entry.manifest.family.clone(),
                    dtype: entry.manifest.dtype.as_str().to_owned(),
                    allowed: policy.gpu.allows_model(name),
                    batching: entry.manifest.batching.map(|b| wire::Batching {
                        max_batch: b.max_batch,
                        max_delay_ms: b.max_delay_ms,
                        max_queue: b.queue_limit() as u64,
                    }),
                    resident_on,
                }
            })
            .collect();
        use std::sync::atomic::Ordering::Relaxed;
        let usage = self.gpu.model_usage(tenant);
        wire::Models {
            models,
            stats: wire::ModelStats {
                loads: usage.loads.load(Relaxed),
                hits: usage.hits.load(Relaxed),
                failures: usage.failures.load(Relaxed),
            },
        }
    }
}
