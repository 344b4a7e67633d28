//! Instance reuse: an opt-in (per tenant policy) way to skip instantiation.
//!
//! A fresh instance per call is Gust's isolation guarantee, and for most
//! components it costs microseconds. An interpreter bundled with its
//! libraries is different: a componentize-py component re-fills a table of
//! thousands of function references every time it is instantiated. A tenant
//! may therefore let one instance serve up to `max_uses` calls of the *same*
//! function (same tenant, same name, same version), the way Fastly's
//! reusable sandboxes and `wasmtime serve`'s instance reuse work. State a
//! call leaves behind (Python globals, caches, open files) is then seen by
//! the next call of that function, and only of that function.
//!
//! An instance is only kept after a call that returned (a response or the
//! guest's own error): a trap, timeout or cancellation drops it. Idle
//! instances are bounded in number and expire when unused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::Store;

use super::bindings::Guest;
use super::capture::BoundedCapture;
use super::config::{CallLimits, Preopen};
use super::state::CallState;
use crate::digest::Digest;

/// A call's permission to run in (and leave behind) a reused instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reuse {
    /// Who may share instances: calls with the same scope (and the same
    /// component) do. The API uses `tenant/function`.
    pub scope: Arc<str>,
    /// Calls one instance serves at most, the first included; below 2
    /// nothing is reused.
    pub max_uses: u32,
}

impl Reuse {
    /// The scope of one function of one tenant: instances are shared by
    /// its calls and nobody else's (tenant and function names cannot
    /// contain `/`).
    pub fn scope_of(tenant: &str, function: &str) -> Arc<str> {
        format!("{tenant}/{function}").into()
    }
}

/// What a WASI context was built with: an instance is only reused by a call
/// whose limits would build the same one. (Everything else, the memory
/// limit, outbound rules, GPU grant and deadline, is set anew per call.)
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sandbox {
    env: Arc<[(String, String)]>,
    preopens: Arc<[Preopen]>,
    stdout_limit: usize,
    stderr_limit: usize,
}

impl Sandbox {
    fn of(limits: &CallLimits) -> Self {
        Self {
            env: Arc::clone(&limits.env),
            preopens: Arc::clone(&limits.preopens),
            stdout_limit: limits.stdout_limit,
            stderr_limit: limits.stderr_limit,
        }
    }
}

/// An instance between calls, with the store that owns it.
pub(crate) struct IdleInstance {
    pub(crate) store: Store<CallState>,
    pub(crate) guest: Guest,
    pub(crate) stdout: BoundedCapture,
    pub(crate) stderr: BoundedCapture,
    /// Calls it has served.
    pub(crate) uses: u32,
    sandbox: Sandbox,
    idle_since: Instant,
}

impl IdleInstance {
    pub(crate) fn new(
        store: Store<CallState>,
        guest: Guest,
        stdout: BoundedCapture,
        stderr: BoundedCapture,
        uses: u32,
        limits: &CallLimits,
    ) -> Self {
        Self {
            store,
            guest,
            stdout,
            stderr,
            uses,
            sandbox: Sandbox::of(limits),
            idle_since: Instant::now(),
        }
    }
}

type Key = (Arc<str>, Digest);

/// The idle instances of every scope and component.
pub(crate) struct InstancePool {
    idle: Mutex<HashMap<Key, Vec<IdleInstance>>>,
    max_idle: usize,
    max_idle_per_key: usize,
    idle_timeout: Duration,
}

impl InstancePool {
    pub(crate) fn new(max_idle: usize, max_idle_per_key: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            max_idle_per_key,
            idle_timeout,
        }
    }

    /// An idle instance for this call, if one fits its limits. The most
    /// recently used comes first: its pages are the likeliest to be warm.
    pub(crate) fn take(
        &self,
        reuse: &Reuse,
        digest: Digest,
        limits: &CallLimits,
    ) -> Option<IdleInstance> {
        let sandbox = Sandbox::of(limits);
        let mut expired = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            self.expire(&mut idle, &mut expired);
            let key = (Arc::clone(&reuse.scope), digest);
            let found = idle.get_mut(&key).and_then(|list| {
                let at = list.iter().rposition(|i| i.sandbox == sandbox)?;
                Some(list.swap_remove(at))
            });
            if idle.get(&key).is_some_and(Vec::is_empty) {
                idle.remove(&key);
            }
            found
        };
        // Dropping a store frees its instance: not under the lock.
        drop(expired);
        found
    }

    /// Keeps `instance` for the next call, unless the pool is full (then it
    /// is dropped here).
    pub(crate) fn put(&self, reuse: &Reuse, digest: Digest, mut instance: IdleInstance) {
        instance.idle_since = Instant::now();
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            self.expire(&mut idle, &mut expired);
            let total: usize = idle.values().map(Vec::len).sum();
            let list = idle.entry((Arc::clone(&reuse.scope), digest)).or_default();
            if total < self.max_idle && list.len() < self.max_idle_per_key {
                list.push(instance);
            } else {
                expired.push(instance);
            }
        }
        drop(expired);
    }

    /// Drops every idle instance of `scope`.
    pub(crate) fn forget(&self, scope: &str) {
        let mut dropped = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|(key_scope, _), list| {
                if &**key_scope == scope {
                    dropped.append(list);
                    false
                } else {
                    true
                }
            });
        }
        drop(dropped);
    }

    /// Drops every instance idle for longer than the timeout.
    pub(crate) fn sweep(&self) {
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            self.expire(&mut idle, &mut expired);
        }
        drop(expired);
    }

    /// Instances idle right now.
    pub(crate) fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.values().map(Vec::len).sum()
    }

    fn expire(&self, idle: &mut HashMap<Key, Vec<IdleInstance>>, out: &mut Vec<IdleInstance>) {
        let now = Instant::now();
        idle.retain(|_, list| {
            let mut i = 0;
            while i < list.len() {
                if now.duration_since(list[i].idle_since) >= self.idle_timeout {
                    out.push(list.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            !list.is_empty()
        });
    }
}

impl super::Runtime {
    /// Instances kept for reuse right now.
    pub fn idle_instances(&self) -> usize {
        self.idle.idle_count()
    }

    /// Drops the reusable instances of `scope` (see [`Reuse::scope_of`]):
    /// its function was deleted or replaced.
    pub fn drop_idle_instances(&self, scope: &str) {
        self.idle.forget(scope);
    }

    /// Drops the reusable instances that have been idle too long. Taking
    /// and returning instances does this too; call it now and then so that
    /// a function nobody calls any more does not keep its instances.
    pub fn sweep_idle_instances(&self) {
        self.idle.sweep();
    }
}
