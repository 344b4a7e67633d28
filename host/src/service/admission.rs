//! Admission: how many calls may run at once, per tenant (its policy's
//! `max_concurrency`) and for the whole host (the instance pool's size).
//!
//! Both bounds are `tokio::sync::Semaphore`s. A caller that must not wait
//! (invoke, `/http`) takes permits with `try_acquire_owned` and is refused
//! with 429 or 503; one that may wait (map, WebSocket messages, schedules)
//! queues on `acquire_owned`, in FIFO order, without polling. Every
//! released permit also signals [`Admission::released`], which is what the
//! job dispatcher waits on when its queues are blocked on concurrency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::ServiceError;

/// Whether a caller waits for a slot or is refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Queue until both the tenant and the host have room.
    Wait,
    /// Refuse with [`ServiceError::TenantBusy`] or [`ServiceError::HostBusy`].
    Fail,
}

/// The right to run one call; the slots return when it is dropped.
#[derive(Debug)]
pub struct Permit {
    slots: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    released: Arc<Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Give the slots back before signalling, so that whoever wakes finds
        // them free.
        drop(self.slots.take());
        self.released.notify_one();
    }
}

/// The host's and every tenant's concurrency bounds.
#[derive(Debug)]
pub(crate) struct Admission {
    host: Arc<Semaphore>,
    host_capacity: usize,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per tenant, the slots of anonymous callers of its public functions.
    anonymous: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per tenant, its open long-lived requests (maps, WebSocket sessions).
    streams: Mutex<HashMap<String, Arc<Semaphore>>>,
    released: Arc<Notify>,
}

impl Admission {
    /// Bounds for a host that runs at most `host_capacity` calls at once.
    pub(crate) fn new(host_capacity: usize) -> Self {
        Self {
            host: Arc::new(Semaphore::new(host_capacity)),
            host_capacity,
            tenants: Mutex::new(HashMap::new()),
            anonymous: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            released: Arc::new(Notify::new()),
        }
    }

    /// Calls the host can run at once.
    pub(crate) fn host_capacity(&self) -> usize {
        self.host_capacity
    }

    /// Calls running host-wide.
    pub(crate) fn in_flight(&self) -> usize {
        self.host_capacity
            .saturating_sub(self.host.available_permits())
    }

    /// Signalled whenever a permit is released.
    pub(crate) fn released(&self) -> &Notify {
        &self.released
    }

    /// The tenant's semaphore, made with `limit` slots on first use (a
    /// tenant's policy is fixed for the life of the host).
    fn tenant(&self, tenant: &str, limit: usize) -> Arc<Semaphore> {
        Self::slots_of(&self.tenants, tenant, limit)
    }

    /// The semaphore of `tenant` in `map`, made with `limit` slots on first use.
    fn slots_of(
        map: &Mutex<HashMap<String, Arc<Semaphore>>>,
        tenant: &str,
        limit: usize,
    ) -> Arc<Semaphore> {
        let mut tenants = map.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked up first: the hot path then allocates no key.
        if let Some(slots) = tenants.get(tenant) {
            return Arc::clone(slots);
        }
        let slots = Arc::new(Semaphore::new(limit));
        tenants.insert(tenant.to_owned(), Arc::clone(&slots));
        slots
    }

    /// A slot of `tenant`'s anonymous callers (at most `limit` at once,
    /// apart from the tenant's own slots) and one of the host; refused at
    /// once when either is full.
    ///
    /// # Errors
    /// [`ServiceError::TenantBusy`] or [`ServiceError::HostBusy`].
    pub(crate) fn admit_anonymous(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Permit, ServiceError> {
        self.try_pair(Self::slots_of(&self.anonymous, tenant, limit), limit)
    }

    /// A slot of `group` (a tenant's own or its anonymous callers', of
    /// `limit`) and one of the host, without waiting.
    fn try_pair(&self, group: Arc<Semaphore>, limit: usize) -> Result<Permit, ServiceError> {
        let group_slot = group
            .try_acquire_owned()
            .map_err(|_| ServiceError::TenantBusy { limit })?;
        let host_slot = Arc::clone(&self.host)
            .try_acquire_owned()
            .map_err(|_| ServiceError::HostBusy)?;
        Ok(Permit {
            slots: Some((group_slot, host_slot)),
            released: Arc::clone(&self.released),
        })
    }

    /// A place for one of `tenant`'s long-lived requests (at most `limit`
    /// open at once), held for the request's life.
    ///
    /// # Errors
    /// [`ServiceError::TooManyStreams`] when all are taken.
    pub(crate) fn open_stream(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<OwnedSemaphorePermit, ServiceError> {
        Self::slots_of(&self.streams, tenant, limit)
            .try_acquire_owned()
            .map_err(|_| ServiceError::TooManyStreams { limit })
    }

    /// A slot of `tenant` (at most `limit` at once) and one of the host.
    ///
    /// # Errors
    /// With [`Admit::Fail`]: [`ServiceError::TenantBusy`] when the tenant is
    /// at its limit, [`ServiceError::HostBusy`] when the host is.
    pub(crate) async fn admit(
        &self,
        tenant: &str,
        limit: usize,
        mode: Admit,
    ) -> Result<Permit, ServiceError> {
        let tenant_slots = self.tenant(tenant, limit);
        let slots = match mode {
            Admit::Fail => return self.try_pair(tenant_slots, limit),
            Admit::Wait => {
                // The semaphores are never closed; a closed one would mean
                // the host is going away.
                let tenant_slot = tenant_slots
                    .acquire_owned()
                    .await
                    .map_err(|_| ServiceError::HostBusy)?;
                let host_slot = Arc::clone(&self.host)
                    .acquire_owned()
                    .await
                    .map_err(|_| ServiceError::HostBusy)?;
                (tenant_slot, host_slot)
            }
        };
        Ok(Permit {
            slots: Some(slots),
            released: Arc::clone(&self.released),
        })
    }

    /// [`Admission::admit`] with [`Admit::Fail`], without awaiting (the job
    /// dispatcher decides under its lock).
    pub(crate) fn try_admit(&self, tenant: &str, limit: usize) -> Option<Permit> {
        self.try_pair(self.tenant(tenant, limit), limit).ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn fail_refuses_at_the_tenant_limit_then_the_host_limit() {
        let admission = Admission::new(3);
        let a = admission.admit("a", 2, Admit::Fail).await;
        let b = admission.admit("a", 2, Admit::Fail).await;
        assert!(a.is_ok() && b.is_ok());
        assert!(matches!(
            admission.admit("a", 2, Admit::Fail).await,
            Err(ServiceError::TenantBusy { limit: 2 })
        ));
        let c = admission.admit("b", 5, Admit::Fail).await;
        assert!(c.is_ok());
        assert_eq!(admission.in_flight(), 3);
        assert!(matches!(
            admission.admit("b", 5, Admit::Fail).await,
            Err(ServiceError::HostBusy)
        ));
        drop(a);
        assert_eq!(admission.in_flight(), 2);
        assert!(admission.admit("a", 2, Admit::Fail).await.is_ok());
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_a_release_and_the_release_is_signalled() {
        let admission = Arc::new(Admission::new(1));
        let held = admission.admit("a", 1, Admit::Fail).await;
        assert!(held.is_ok());
        let waiter = {
            let admission = Arc::clone(&admission);
            tokio::spawn(async move { admission.admit("b", 1, Admit::Wait).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "admitted past a full host");
        assert!(admission.try_admit("c", 1).is_none());
        drop(held);
        // The release left a notification for whoever listens next.
        tokio::time::timeout(Duration::from_secs(5), admission.released().notified())
            .await
            .unwrap_or_else(|_| panic!("no release signal"));
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .is_ok_and(|admitted| admitted.is_ok_and(|ok| ok))
        );
    }
}
