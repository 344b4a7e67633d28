//! Instances kept between calls: reused ones, an opt-in (per tenant
//! policy) way to skip instantiation, and ready ones, fresh instances made
//! off the request path before the call that will use them arrives.
//!
//! A fresh instance per call is Gust's isolation guarantee, and for most
//! components it costs microseconds. An interpreter bundled with its
//! libraries is different: a componentize-py component re-fills a table of
//! thousands of function references every time it is instantiated.
//!
//! **Ready instances** (the default, policy `ready_instances`) keep that
//! guarantee and take the instantiation off the call's path: once a call of
//! a function is done, another is instantiated in idle time (see the
//! `ready` module), never called, and handed to the next call of the same
//! function as if it had been instantiated for it. That holds only for an
//! instantiation that ran no host import (nothing of the call it was made
//! for — environment, clocks, randomness, grants — can have reached it) and
//! stayed within the memory limit of the call that takes it; a component
//! whose instantiation touches the host is not prepared again. It saves the
//! caller the wait, not the host the work.
//!
//! **Reused instances** (policy `reuse_instances`): a tenant may let one
//! instance serve up to `max_uses` calls of the *same* function (same
//! tenant, same name, same version), the way Fastly's reusable sandboxes and
//! `wasmtime serve`'s instance reuse work. State a call leaves behind
//! (Python globals, caches, open files) is then seen by the next call of
//! that function, and only of that function.
//!
//! An instance is only kept after a call that returned (a response or the
//! guest's own error): a trap, timeout or cancellation drops it. Kept
//! instances are bounded in number and expire when unused.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p3::bindings::Service;

use super::bindings::Platform;
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

/// A call's permission to take a fresh instance made ready before it came,
/// and to have the next one made (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Whose calls take the instances made for this one: the same scope
    /// and the same component. The API uses `tenant/function`
    /// ([`Reuse::scope_of`]).
    pub scope: Arc<str>,
    /// Instances kept ready at most (capped by the runtime's
    /// `max_idle_per_function`); 0 makes none.
    pub count: u32,
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

/// Why an instance is kept.
enum Kept {
    /// An earlier call ran in it; only a call whose WASI context would be
    /// the same may run in it next.
    Reused(Sandbox),
    /// Instantiated and never called; its store has seen no host import,
    /// so any call of its scope may take it (within its memory limit).
    Ready,
}

/// A kept instance's exports, by world.
pub(crate) enum Instance {
    /// A `gust:function/handler` component.
    Handler(Platform),
    /// A `wasi:http/proxy` component.
    Http(Proxy),
    /// A `wasi:http/service` (WASI 0.3) component.
    HttpP3(Service),
}

impl Instance {
    /// The handler's exports, if it is one.
    pub(crate) fn into_handler(self) -> Option<Platform> {
        match self {
            Self::Handler(guest) => Some(guest),
            Self::Http(_) | Self::HttpP3(_) => None,
        }
    }

    /// The proxy's exports, if it is one.
    pub(crate) fn into_http(self) -> Option<Proxy> {
        match self {
            Self::Http(proxy) => Some(proxy),
            Self::Handler(_) | Self::HttpP3(_) => None,
        }
    }

    /// The WASI 0.3 service's exports, if it is one.
    pub(crate) fn into_http_p3(self) -> Option<Service> {
        match self {
            Self::HttpP3(service) => Some(service),
            Self::Handler(_) | Self::Http(_) => None,
        }
    }
}

/// An instance between calls, with the store that owns it.
pub(crate) struct IdleInstance {
    pub(crate) store: Store<CallState>,
    pub(crate) guest: Instance,
    pub(crate) stdout: BoundedCapture,
    pub(crate) stderr: BoundedCapture,
    /// Calls it has served.
    pub(crate) uses: u32,
    kept: Kept,
    idle_since: Instant,
}

impl IdleInstance {
    /// An instance an earlier call, made with `limits`, left behind.
    pub(crate) fn reused(
        store: Store<CallState>,
        guest: Platform,
        stdout: BoundedCapture,
        stderr: BoundedCapture,
        uses: u32,
        limits: &CallLimits,
    ) -> Self {
        Self {
            store,
            guest: Instance::Handler(guest),
            stdout,
            stderr,
            uses,
            kept: Kept::Reused(Sandbox::of(limits)),
            idle_since: Instant::now(),
        }
    }

    /// A fresh instance whose instantiation ran no host import; the call
    /// that takes it gives it its own WASI grants and captures.
    pub(crate) fn ready(store: Store<CallState>, guest: Instance) -> Self {
        Self {
            store,
            guest,
            stdout: BoundedCapture::new(0),
            stderr: BoundedCapture::new(0),
            uses: 0,
            kept: Kept::Ready,
            idle_since: Instant::now(),
        }
    }

    /// Whether it was made ready, never called.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.kept, Kept::Ready)
    }

    /// Whether a call with `limits` may run in it.
    fn fits(&self, limits: &CallLimits) -> bool {
        match &self.kept {
            Kept::Reused(sandbox) => *sandbox == Sandbox::of(limits),
            // Everything that grew during instantiation must have been
            // allowed under the call's own limit, or the instance is not
            // the one a fresh instantiation for that call would give.
            Kept::Ready => u64::try_from(self.store.data().limiter.peak_bytes)
                .is_ok_and(|peak| peak <= limits.memory_bytes),
        }
    }
}

type Key = (Arc<str>, Digest);

/// The kept instances of one scope and component.
#[derive(Default)]
struct Slot {
    instances: Vec<IdleInstance>,
    /// Ready instances being made for it.
    preparing: u32,
    /// Tells a preparation that finishes after the slot was forgotten (and
    /// perhaps made again for a redeployed function) from a wanted one.
    generation: u64,
}

impl Slot {
    fn ready(&self) -> usize {
        self.instances.iter().filter(|i| i.is_ready()).count()
    }
}

/// Digests whose instantiation is not prepared ahead (it ran a host import,
/// or failed); beyond this many the set starts again, so it stays small.
const MAX_UNPREPARABLE: usize = 4096;

struct Inner {
    slots: HashMap<Key, Slot>,
    /// Preparations in flight, all slots together.
    preparing: usize,
    next_generation: u64,
    unpreparable: HashSet<Digest>,
    /// Stores whose calls are over, each left to the preparation whose
    /// ticket it has to tear down (see [`Preparation::defer_teardown`]).
    teardowns: Vec<(u64, Store<CallState>)>,
}

/// A ready instance being made. [`Preparation::finish`] hands the result
/// to the pool; dropped unfinished (its task was cancelled), it counts as
/// having made nothing.
pub(crate) struct Preparation {
    pool: Arc<InstancePool>,
    key: Key,
    generation: u64,
    /// This preparation's own number, unlike `generation` (its slot's).
    ticket: u64,
    finished: bool,
}

impl Preparation {
    /// Leaves `store`, whose call is over, to be dropped by this
    /// preparation ([`Preparation::tear_down`]) before it makes its
    /// instance, and not by the call. Dropping a store is Wasmtime resetting
    /// its memory slot for the next instance (a few hundred µs for Python);
    /// this way the call's answer does not wait for it, and the instance
    /// made next gets that slot back, already holding the component's
    /// memory image. The store's host-side state must already be released
    /// ([`CallState::release`]). Until it is torn down, a call that finds
    /// the allocator full drops it ([`InstancePool::evict_oldest`]), so it
    /// never costs a call its slot.
    pub(crate) fn defer_teardown(&mut self, store: Store<CallState>) {
        let mut inner = self.pool.lock();
        inner.teardowns.push((self.ticket, store));
    }

    /// Drops the store left to this preparation, unless a call needing its
    /// slot already did.
    pub(crate) fn tear_down(&mut self) {
        let store = {
            let mut inner = self.pool.lock();
            let at = inner
                .teardowns
                .iter()
                .position(|(ticket, _)| *ticket == self.ticket);
            at.map(|at| inner.teardowns.swap_remove(at))
        };
        // Outside the lock: the reset takes a while.
        drop(store);
    }

    /// Gives up: the host was busy. No instance is made ahead, for any
    /// function, until it has been quiet a while ([`BUSY_BACKOFF`]).
    pub(crate) fn host_busy(self) {
        let until = Instant::now() + BUSY_BACKOFF;
        *self
            .pool
            .quiet_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(until);
    }

    /// Keeps the instance (`Ok(Some)`) if its slot still wants it;
    /// `Err(())` means the component's instantiation is not to be prepared
    /// again (it ran a host import, or failed).
    pub(crate) fn finish(mut self, made: Result<Option<IdleInstance>, ()>) {
        self.finished = true;
        self.pool.end_preparing(&self.key, self.generation, made);
    }
}

impl Drop for Preparation {
    fn drop(&mut self) {
        self.tear_down();
        if !self.finished {
            self.pool
                .end_preparing(&self.key, self.generation, Ok(None));
        }
    }
}

/// How long instances are not made ahead after a host was found busy: a
/// busy host has no idle time to make them in, and asking after every call
/// costs a thread wake-up each (10% of a saturated host's throughput).
const BUSY_BACKOFF: Duration = Duration::from_millis(20);

/// The kept instances of every scope and component.
pub(crate) struct InstancePool {
    inner: Mutex<Inner>,
    /// No instance is made ahead before this (see [`Preparation::host_busy`]).
    quiet_after: Mutex<Option<Instant>>,
    max_idle: usize,
    max_idle_per_key: usize,
    max_preparing: usize,
    idle_timeout: Duration,
}

impl InstancePool {
    pub(crate) fn new(
        max_idle: usize,
        max_idle_per_key: usize,
        max_preparing: usize,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                preparing: 0,
                next_generation: 0,
                unpreparable: HashSet::new(),
                teardowns: Vec::new(),
            }),
            quiet_after: Mutex::new(None),
            max_idle,
            max_idle_per_key,
            max_preparing,
            idle_timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A kept instance of `scope` and `digest` for a call with `limits`,
    /// reused or ready as `ready` says. The most recently kept comes first:
    /// its pages are the likeliest to be warm.
    pub(crate) fn take(
        &self,
        scope: &Arc<str>,
        digest: Digest,
        limits: &CallLimits,
        ready: bool,
    ) -> Option<IdleInstance> {
        let mut expired = Vec::new();
        let found = {
            let mut inner = self.lock();
            self.expire(&mut inner, &mut expired);
            let key = (Arc::clone(scope), digest);
            let found = inner.slots.get_mut(&key).and_then(|slot| {
                let at = slot
                    .instances
                    .iter()
                    .rposition(|i| i.is_ready() == ready && i.fits(limits))?;
                Some(slot.instances.swap_remove(at))
            });
            if inner
                .slots
                .get(&key)
                .is_some_and(|slot| slot.instances.is_empty() && slot.preparing == 0)
            {
                inner.slots.remove(&key);
            }
            found
        };
        // Dropping a store frees its instance: not under the lock.
        drop(expired);
        found
    }

    /// Keeps `instance` for the next call, unless the pool is full (then it
    /// is dropped here).
    pub(crate) fn put(&self, scope: &Arc<str>, digest: Digest, mut instance: IdleInstance) {
        instance.idle_since = Instant::now();
        let mut expired = Vec::new();
        {
            let mut inner = self.lock();
            self.expire(&mut inner, &mut expired);
            let total = total(&inner);
            let generation = inner.next_generation;
            let slot = inner
                .slots
                .entry((Arc::clone(scope), digest))
                .or_insert_with(|| Slot {
                    generation,
                    ..Slot::default()
                });
            if total < self.max_idle && slot.instances.len() < self.max_idle_per_key {
                slot.instances.push(instance);
            } else {
                expired.push(instance);
            }
            inner.next_generation += 1;
        }
        drop(expired);
    }

    /// Whether another ready instance of `scope` and `digest` should be
    /// made now, and if so the ticket for it: fewer than `wanted` are ready
    /// or being made, the pool has room, not too many are being made
    /// already, and the component's instantiation is known to be pure.
    pub(crate) fn start_preparing(
        self: &Arc<Self>,
        scope: &Arc<str>,
        digest: Digest,
        wanted: u32,
    ) -> Option<Preparation> {
        let wanted = usize::try_from(wanted)
            .unwrap_or(usize::MAX)
            .min(self.max_idle_per_key);
        let quiet_after = *self
            .quiet_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if quiet_after.is_some_and(|after| Instant::now() < after) {
            return None;
        }
        let mut inner = self.lock();
        if wanted == 0
            || inner.preparing >= self.max_preparing
            || total(&inner) + inner.preparing >= self.max_idle
            || inner.unpreparable.contains(&digest)
        {
            return None;
        }
        let ticket = inner.next_generation;
        let generation = ticket;
        let key = (Arc::clone(scope), digest);
        let slot = inner.slots.entry(key.clone()).or_insert_with(|| Slot {
            generation,
            ..Slot::default()
        });
        let in_slot = slot.instances.len() + slot.preparing as usize;
        if slot.ready() + slot.preparing as usize >= wanted || in_slot >= self.max_idle_per_key {
            return None;
        }
        slot.preparing += 1;
        let generation = slot.generation;
        inner.preparing += 1;
        inner.next_generation += 1;
        Some(Preparation {
            pool: Arc::clone(self),
            key,
            generation,
            ticket,
            finished: false,
        })
    }

    fn end_preparing(&self, key: &Key, generation: u64, made: Result<Option<IdleInstance>, ()>) {
        let mut dropped = Vec::new();
        {
            let mut inner = self.lock();
            inner.preparing = inner.preparing.saturating_sub(1);
            let mut instance = match made {
                Ok(instance) => instance,
                Err(()) => {
                    if inner.unpreparable.len() >= MAX_UNPREPARABLE {
                        inner.unpreparable.clear();
                    }
                    inner.unpreparable.insert(key.1);
                    None
                }
            };
            let total = total(&inner);
            match inner.slots.get_mut(key) {
                Some(slot) if slot.generation == generation => {
                    slot.preparing = slot.preparing.saturating_sub(1);
                    if let Some(mut ready) = instance.take() {
                        if total < self.max_idle && slot.instances.len() < self.max_idle_per_key {
                            ready.idle_since = Instant::now();
                            slot.instances.push(ready);
                        } else {
                            dropped.push(ready);
                        }
                    }
                    if slot.instances.is_empty() && slot.preparing == 0 {
                        inner.slots.remove(key);
                    }
                }
                // Forgotten meanwhile: the function was deleted or replaced.
                _ => dropped.extend(instance),
            }
        }
        drop(dropped);
    }

    /// Drops every kept instance of `scope`; preparations under way for it
    /// are dropped when they finish.
    pub(crate) fn forget(&self, scope: &str) {
        let mut dropped = Vec::new();
        {
            let mut inner = self.lock();
            inner.slots.retain(|(key_scope, _), slot| {
                if &**key_scope == scope {
                    dropped.append(&mut slot.instances);
                    false
                } else {
                    true
                }
            });
        }
        drop(dropped);
    }

    /// Drops every instance kept for longer than the timeout.
    pub(crate) fn sweep(&self) {
        let mut expired = Vec::new();
        {
            let mut inner = self.lock();
            self.expire(&mut inner, &mut expired);
        }
        drop(expired);
    }

    /// Drops a store left for teardown, or else the instance kept longest,
    /// if any: a call needs its slot in the allocator more than a later
    /// call needs it kept.
    pub(crate) fn evict_oldest(&self) -> bool {
        let oldest = {
            let mut inner = self.lock();
            // A store left for teardown first: nobody wants it any more.
            if let Some((_, store)) = inner.teardowns.pop() {
                drop(inner);
                drop(store);
                return true;
            }
            let oldest = inner
                .slots
                .iter()
                .flat_map(|(key, slot)| {
                    slot.instances
                        .iter()
                        .enumerate()
                        .map(move |(at, instance)| (instance.idle_since, key, at))
                })
                .min_by_key(|(since, _, _)| *since)
                .map(|(_, key, at)| (key.clone(), at));
            oldest.and_then(|(key, at)| {
                let slot = inner.slots.get_mut(&key)?;
                let instance = slot.instances.swap_remove(at);
                if slot.instances.is_empty() && slot.preparing == 0 {
                    inner.slots.remove(&key);
                }
                Some(instance)
            })
        };
        oldest.is_some()
    }

    /// Instances kept right now, reused and ready.
    pub(crate) fn idle_count(&self) -> usize {
        total(&self.lock())
    }

    /// Ready instances of `scope` right now.
    pub(crate) fn ready_count(&self, scope: &str) -> usize {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .filter(|((key_scope, _), _)| &**key_scope == scope)
            .map(|(_, slot)| slot.ready())
            .sum()
    }

    fn expire(&self, inner: &mut Inner, out: &mut Vec<IdleInstance>) {
        let now = Instant::now();
        inner.slots.retain(|_, slot| {
            let mut i = 0;
            while i < slot.instances.len() {
                if now.duration_since(slot.instances[i].idle_since) >= self.idle_timeout {
                    out.push(slot.instances.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            !slot.instances.is_empty() || slot.preparing > 0
        });
    }
}

fn total(inner: &Inner) -> usize {
    inner.slots.values().map(|slot| slot.instances.len()).sum()
}

impl super::Runtime {
    /// Instances kept right now: reused ones and ready ones.
    pub fn idle_instances(&self) -> usize {
        self.idle.idle_count()
    }

    /// Fresh instances ready for the calls of `scope` (see [`Ready`]).
    pub fn ready_instances(&self, scope: &str) -> usize {
        self.idle.ready_count(scope)
    }

    /// Drops the kept instances of `scope` (see [`Reuse::scope_of`]): its
    /// function was deleted or replaced.
    pub fn drop_idle_instances(&self, scope: &str) {
        self.idle.forget(scope);
    }

    /// Drops the kept instances that have been idle too long. Taking and
    /// returning instances does this too; call it now and then so that a
    /// function nobody calls any more does not keep its instances.
    pub fn sweep_idle_instances(&self) {
        self.idle.sweep();
    }
}
