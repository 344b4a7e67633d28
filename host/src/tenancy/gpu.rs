//! The host's side of tenants' GPU use: the bridge, and one [`Account`] per
//! tenant carrying its policy's `[gpu]` quotas. Each invocation receives a
//! [`GpuGrant`] made from these; what it does with it is the runtime's
//! business (`crate::runtime`'s `gust:gpu` glue).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gust_gpu_bridge::models::ModelRegistry;
use gust_gpu_bridge::{Account, Bridge, Device};

use super::policy::GpuPolicy;
use crate::runtime::{GpuGrant, ModelGrant, ModelUsage};

/// The host's bridge: its devices and one account per tenant, made on the
/// tenant's first bridge call from its policy's `[gpu]` quotas.
pub struct GpuHost {
    bridge: Bridge,
    models: Arc<ModelRegistry>,
    accounts: Mutex<HashMap<String, Arc<Account>>>,
    /// Each tenant's model loads, made on first use.
    model_usage: Mutex<HashMap<String, Arc<ModelUsage>>>,
}

impl std::fmt::Debug for GpuHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuHost")
            .field("bridge", &self.bridge)
            .finish_non_exhaustive()
    }
}

impl GpuHost {
    /// Wrap an opened bridge and the host's model registry.
    pub fn new(bridge: Bridge, models: Arc<ModelRegistry>) -> Self {
        Self {
            bridge,
            models,
            accounts: Mutex::new(HashMap::new()),
            model_usage: Mutex::new(HashMap::new()),
        }
    }

    /// The bridge's devices.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The host's model registry.
    pub fn models(&self) -> &Arc<ModelRegistry> {
        &self.models
    }

    /// The account of `tenant`, with the quotas of its policy.
    pub fn account(&self, tenant: &str, policy: &GpuPolicy) -> Arc<Account> {
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(accounts.entry(tenant.to_owned()).or_insert_with(|| {
            Account::new(
                tenant,
                Some(policy.memory_mb.saturating_mul(1 << 20)),
                Some(Duration::from_millis(policy.time_ms_per_minute)),
            )
        }))
    }

    /// The model loads of `tenant`'s calls.
    pub fn model_usage(&self, tenant: &str) -> Arc<ModelUsage> {
        let mut usage = self
            .model_usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(usage) = usage.get(tenant) {
            return Arc::clone(usage);
        }
        let fresh = Arc::new(ModelUsage::default());
        usage.insert(tenant.to_owned(), Arc::clone(&fresh));
        fresh
    }

    /// The account of `tenant` if it has used the bridge.
    pub fn existing_account(&self, tenant: &str) -> Option<Arc<Account>> {
        let accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        accounts.get(tenant).cloned()
    }

    /// What an invocation of `tenant` may use: the bridge's devices of the
    /// backends its policy lists, in the bridge's order of preference; `None`
    /// when that leaves nothing.
    pub fn grant(&self, tenant: &str, policy: &GpuPolicy) -> Option<GpuGrant> {
        let devices: Arc<[Device]> = self
            .bridge
            .devices()
            .iter()
            .filter(|d| {
                policy
                    .backends
                    .iter()
                    .any(|b| b.as_str() == d.kind().as_str())
            })
            .cloned()
            .collect();
        if devices.is_empty() {
            return None;
        }
        Some(GpuGrant {
            devices,
            account: self.account(tenant, policy),
            models: Some(ModelGrant {
                registry: Arc::clone(&self.models),
                allowed: policy.models.iter().cloned().collect(),
                usage: self.model_usage(tenant),
            }),
        })
    }
}
