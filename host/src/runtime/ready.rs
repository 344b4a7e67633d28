//! Ready instances: a fresh instance made in idle time, on a thread of its
//! own, before the call that takes it comes (see [`Ready`] and the `reuse`
//! module, which keeps them).
//!
//! An instance made ahead is handed to a call only if it is exactly what a
//! fresh instantiation for that call would have given. Instantiation runs
//! guest code (start functions), so that holds when the code ran no host
//! import: every import reaches the store's state through one of
//! [`CallState`]'s views, which mark it (`host_touched`). Then nothing of the
//! call it was made for (environment, clocks, randomness, grants, output)
//! can have reached the instance; and its memory limit is checked against
//! the taking call's when it is taken.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::Instrument as _;
use wasmtime::{Engine, PoolConcurrencyLimitError, Store, UpdateDeadline};

use super::Runtime;
use super::config::CallLimits;
use super::engine::RuntimeStats;
use super::load::{LoadedComponent, Prepared};
use super::reuse::{IdleInstance, Ready};
use super::state::{CallState, WasiGrants};

impl Runtime {
    /// Has another fresh instance of `component` made for the calls of
    /// `ready`'s scope, if the pool wants one (see [`Ready`]): on a
    /// blocking-pool thread, shortly after this call, and only if no call
    /// is running then. Outside a Tokio runtime nothing is made.
    ///
    /// `spent`, the store of the call just over, has its host-side state
    /// released at once and is torn down on that thread first, before the
    /// instance is made (see [`Preparation::defer_teardown`]); with nothing
    /// to make, it is dropped here.
    ///
    /// [`Preparation::defer_teardown`]: super::reuse::Preparation::defer_teardown
    pub(super) fn prepare_next(
        &self,
        component: &LoadedComponent,
        ready: &Ready,
        limits: &CallLimits,
        spent: Option<Store<CallState>>,
    ) {
        let digest = component.digest();
        let Ok(tokio) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(mut preparation) = self.idle.start_preparing(&ready.scope, digest, ready.count)
        else {
            return;
        };
        if let Some(mut store) = spent {
            // What the store holds for the call goes now; only Wasmtime's
            // teardown waits.
            store.data_mut().release();
            preparation.defer_teardown(store);
        }
        let engine = self.engine_of(component).clone();
        let pre = component.inner.prepared.clone();
        let stats = Arc::clone(&self.stats);
        let memory_limit = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        let timeout = limits.timeout;
        let span = tracing::debug_span!("prepare", scope = %ready.scope);
        // On a blocking-pool thread, not as a task of the runtime: a task
        // spawned from the call's worker runs on that worker next, ahead of
        // whatever the call's own task awaits before its response is
        // written (the invocation record, say), and the response waited for
        // the whole instantiation.
        let runtime = tokio.clone();
        drop(tokio.spawn_blocking(move || {
            // Made in idle time only. After a moment for the call's response
            // to go out, and only if no call is running: instantiating
            // beside a call slows that call's page faults (4× for Python),
            // and on a busy host the work would only move, not shrink.
            std::thread::sleep(SETTLE);
            preparation.tear_down();
            if stats.running.load(Ordering::Relaxed) == 0 {
                let made = make_ahead(&engine, &pre, memory_limit, timeout, &stats);
                preparation.finish(runtime.block_on(made.instrument(span)));
            } else {
                preparation.host_busy();
            }
        }));
    }
}

/// How long after a call its next instance is made: the call's response
/// goes out first.
const SETTLE: Duration = Duration::from_micros(200);

/// Makes one instance of `pre` ahead of its call (see [`instantiate_ahead`]).
async fn make_ahead(
    engine: &Engine,
    pre: &Prepared,
    memory_limit: usize,
    timeout: Duration,
    stats: &RuntimeStats,
) -> Result<Option<IdleInstance>, ()> {
    stats.instantiations.fetch_add(1, Ordering::Relaxed);
    let made = instantiate_ahead(engine, memory_limit, timeout, async |store| {
        pre.instantiate(store).await
    })
    .await;
    match made {
        Ok(made) => Ok(made.map(|(store, guest)| IdleInstance::ready(store, guest))),
        Err(_) => Err(()),
    }
}

/// Instantiates a component (`instantiate` does, in the store given) for a
/// call that has not come yet, within the limits (memory, time) of the call
/// that asked for it. `Ok(None)`: nothing made this time (the allocator's
/// slots are all taken); an error: this component is not to be prepared
/// ahead.
async fn instantiate_ahead<G>(
    engine: &Engine,
    memory_limit: usize,
    timeout: Duration,
    instantiate: impl AsyncFnOnce(&mut Store<CallState>) -> wasmtime::Result<G>,
) -> Result<Option<(Store<CallState>, G)>, Unready> {
    // No grants and empty captures: the call that takes the instance gives
    // it its own, which is only sound because none were used here.
    let mut store = Store::new(engine, CallState::new(WasiGrants::none(), memory_limit));
    store.limiter(|state| &mut state.limiter);
    let deadline = Instant::now() + timeout;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    match tokio::time::timeout(timeout, instantiate(&mut store)).await {
        Ok(Ok(guest)) => {
            let state = store.data();
            if state.host_touched || state.limiter.denied_request.is_some() {
                tracing::debug!("instantiation ran a host import; not prepared ahead again");
                Err(Unready::RanHostImport)
            } else {
                Ok(Some((store, guest)))
            }
        }
        Ok(Err(error)) if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() => Ok(None),
        Ok(Err(error)) => {
            tracing::debug!(error = %format!("{error:#}"), "instantiation ahead of a call failed; not prepared ahead again");
            Err(Unready::Failed)
        }
        Err(_elapsed) => Err(Unready::Failed),
    }
}

/// Why an instance made ahead of its call is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unready {
    /// Its instantiation ran a host import (or grew memory past the limit
    /// and was refused): it could have seen something of the call it was
    /// made for.
    RanHostImport,
    /// Its instantiation failed or ran out of time; a call's own would too.
    Failed,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wasmtime::component::Component;

    use super::{Runtime, Unready, instantiate_ahead};
    use crate::runtime::RuntimeConfig;

    /// Instantiates `wat` ahead of a call in `runtime`'s engine and linker,
    /// with a 64 KiB memory limit; `Ok(true)`: an instance was made.
    async fn ahead(runtime: &Runtime, wat: &str) -> Result<bool, Unready> {
        let component = Component::new(runtime.engine(), wat).unwrap();
        let pre = runtime.linker.instantiate_pre(&component).unwrap();
        let made = instantiate_ahead(
            runtime.engine(),
            64 << 10,
            Duration::from_secs(5),
            async |store| pre.instantiate_async(store).await,
        )
        .await;
        made.map(|made| made.is_some())
    }

    fn runtime() -> (Runtime, tempfile::TempDir) {
        let dir = tempfile::TempDir::new().unwrap();
        let runtime = Runtime::new(RuntimeConfig::new(dir.path().join("cache"))).unwrap();
        (runtime, dir)
    }

    #[tokio::test]
    async fn an_instantiation_that_runs_no_host_import_is_kept() {
        let (runtime, _dir) = runtime();
        let pure = r#"(component
            (core module $m
                (memory 1)
                (global $g (mut i32) (i32.const 0))
                (func $start (global.set $g (i32.const 7)))
                (start $start))
            (core instance (instantiate $m)))"#;
        assert_eq!(ahead(&runtime, pure).await, Ok(true));
    }

    #[tokio::test]
    async fn an_instantiation_that_reads_the_clock_is_refused() {
        let (runtime, _dir) = runtime();
        // A start function that asks the host for the time: an instance
        // made now would carry a time from before its call.
        let clock = r#"(component
            (import "wasi:clocks/monotonic-clock@0.2.0" (instance $clock
                (export "now" (func (result u64)))))
            (core func $now (canon lower (func $clock "now")))
            (core instance $host (export "now" (func $now)))
            (core module $m
                (import "host" "now" (func $now (result i64)))
                (global $t (mut i64) (i64.const 0))
                (func $start (global.set $t (call $now)))
                (start $start))
            (core instance (instantiate $m (with "host" (instance $host)))))"#;
        assert_eq!(ahead(&runtime, clock).await, Err(Unready::RanHostImport));
    }

    #[tokio::test]
    async fn an_instantiation_that_fails_or_outgrows_its_limit_is_refused() {
        let (runtime, _dir) = runtime();
        let traps = r#"(component
            (core module $m (func $start unreachable) (start $start))
            (core instance (instantiate $m)))"#;
        assert_eq!(ahead(&runtime, traps).await, Err(Unready::Failed));
        // Two pages, against a limit of one.
        let too_big = r#"(component
            (core module $m (memory 2))
            (core instance (instantiate $m)))"#;
        assert_eq!(ahead(&runtime, too_big).await, Err(Unready::Failed));
    }
}
