//! The engine: its configuration (pooling or on-demand allocation), the
//! linker with the host's imports, and the counters of the runtime's work.
//! The epoch ticker that drives deadlines is in [`super::epoch`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::component::Linker;
use wasmtime::{Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use super::Runtime;
use super::cache::{CacheError, CompileCache};
use super::config::{AllocationConfig, PoolingConfig, RuntimeConfig};
use super::epoch::EpochTicker;
use super::host;
use super::reuse::InstancePool;
use super::state::CallState;

/// Errors creating a [`Runtime`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The engine configuration was rejected.
    #[error("invalid engine configuration: {0:#}")]
    Engine(#[source] wasmtime::Error),
    /// The compiled-component cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Setting up the host's imports failed.
    #[error("could not set up host imports: {0:#}")]
    Linker(#[source] wasmtime::Error),
    /// The HTTPS client for guests' outgoing requests could not be set up.
    #[error(transparent)]
    Egress(#[from] super::egress::EgressError),
}

/// Which allocator the engine actually runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocatorInUse {
    /// The pooling allocator, as configured.
    Pooling,
    /// On-demand allocation, as configured.
    OnDemand,
    /// On-demand allocation because the pool could not be reserved.
    OnDemandFallback {
        /// Why pooling failed.
        reason: String,
    },
}

/// Counters of the runtime's work, for tests and metrics.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    pub(super) compiles: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    pub(super) cache_rejections: AtomicU64,
    pub(super) instantiations: AtomicU64,
    pub(super) reuses: AtomicU64,
    pub(super) ready_hits: AtomicU64,
    /// Calls running now: instances are made ahead only while it is 0.
    pub(super) running: std::sync::atomic::AtomicUsize,
}

/// One running call, counted in [`RuntimeStats::running`] while it lives.
pub(super) struct Running(Arc<RuntimeStats>);

impl Running {
    pub(super) fn start(stats: &Arc<RuntimeStats>) -> Self {
        stats.running.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(stats))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A point-in-time copy of [`RuntimeStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Components compiled with Cranelift.
    pub compiles: u64,
    /// Components loaded from the compiled cache.
    pub cache_hits: u64,
    /// Cache entries that failed verification and were recompiled.
    pub cache_rejections: u64,
    /// Instances created.
    pub instantiations: u64,
    /// Calls served by an instance an earlier call left behind.
    pub reuses: u64,
    /// Calls served by a fresh instance made ready before they came.
    pub ready_hits: u64,
}

impl RuntimeStats {
    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            compiles: self.compiles.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_rejections: self.cache_rejections.load(Ordering::Relaxed),
            instantiations: self.instantiations.load(Ordering::Relaxed),
            reuses: self.reuses.load(Ordering::Relaxed),
            ready_hits: self.ready_hits.load(Ordering::Relaxed),
        }
    }
}

/// The engine that runs WASI 0.3 components (those exporting
/// `wasi:http/handler@0.3`), beside the one that runs all the others.
///
/// Two engines, because Wasmtime's concurrency support (the component
/// model's async, which WASI 0.3 is built on) belongs to an engine, and an
/// engine with it makes every call dearer, WASI 0.2 ones included: each
/// store sets up the async task state and each call goes through the
/// concurrent path (a Rust hello 9.8 → 19–22 µs; `benches/README.md`). So
/// WASI 0.2 components keep an engine without it, and WASI 0.3 ones, told
/// apart at load by that export, get this one. It allocates on demand: a
/// second pool would reserve a second slab of address space for a minority
/// of functions, whose calls cost far more than an mmap anyway.
pub(super) struct Wasi3Engine {
    pub(super) engine: Engine,
    pub(super) linker: Linker<CallState>,
    /// In a directory of its own under the runtime's cache directory, so
    /// that neither cache's clean-up takes the other's entries.
    pub(super) cache: CompileCache,
}

/// Which of the runtime's two engines (see [`Wasi3Engine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Concurrency {
    /// No component-model async: WASI 0.2 and the gust worlds.
    Off,
    /// Component-model async: WASI 0.3.
    On,
}

fn engine_config(
    config: &RuntimeConfig,
    pooling: Option<&PoolingConfig>,
    concurrency: Concurrency,
) -> wasmtime::Config {
    let mut wasm = wasmtime::Config::new();
    wasm.concurrency_support(concurrency == Concurrency::On);
    if concurrency == Concurrency::On {
        // WASI 0.3's streams, futures and async exports.
        wasm.wasm_component_model_async(true);
    }
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .parallel_compilation(true)
        .memory_init_cow(true)
        .max_wasm_stack(config.max_wasm_stack_bytes)
        // Host functions called from wasm run on the same fiber stack, so it
        // needs room beyond what wasm itself may use.
        .async_stack_size(config.max_wasm_stack_bytes + (1 << 20));
    if let Some(pool) = pooling {
        // With PAGEMAP_SCAN (Linux 6.7+) only the pages a call dirtied are
        // reset, in place: no madvise, no TLB shootdown and no page faults on
        // the next call (hello: 38 µs -> 7 µs per call). Without it, keeping
        // memory resident means memsetting the whole kept region, which costs
        // more than the madvise it saves, so memories are then decommitted.
        let scan = pool.pagemap_scan
            && PoolingAllocationConfig::is_pagemap_scan_available()
            && !swap_may_hold_guest_pages();
        let memory_keep_resident = if scan {
            pool.memory_keep_resident_bytes
        } else {
            0
        };
        let mut alloc = PoolingAllocationConfig::new();
        alloc
            .total_component_instances(pool.max_instances)
            .total_stacks(pool.max_instances)
            .total_core_instances(pool.total_core_instances)
            .total_memories(pool.total_memories)
            .total_tables(pool.total_tables)
            .max_core_instances_per_component(pool.max_core_instances_per_component)
            .max_memories_per_component(pool.max_memories_per_component)
            .max_tables_per_component(pool.max_tables_per_component)
            .max_memory_size(usize::try_from(pool.max_memory_bytes).unwrap_or(usize::MAX))
            .table_elements(pool.table_elements)
            .linear_memory_keep_resident(memory_keep_resident)
            .table_keep_resident(pool.table_keep_resident_bytes)
            .async_stack_keep_resident(pool.stack_keep_resident_bytes)
            .pagemap_scan(if scan { Enabled::Yes } else { Enabled::No });
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(alloc));
    } else {
        wasm.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    }
    wasm
}

/// Whether the kernel may swap guest memory out, which makes resetting
/// memories and tables by `PAGEMAP_SCAN` unsafe in Wasmtime 48: its scan
/// looks for written pages that are *present*, so a page the previous call
/// dirtied and the kernel then swapped out is neither reset nor decommitted,
/// and the next instance in that slot would read the previous call's data
/// (for a table: its function references). Without the scan, kept-resident
/// bytes are rewritten whole and the rest is decommitted, which also drops
/// swapped pages. Checked when the engine is made: `docs/deploy.md` says to
/// restart the host after turning swap on.
fn swap_may_hold_guest_pages() -> bool {
    match std::fs::read_to_string("/proc/swaps") {
        Ok(swaps) => {
            let devices = swap_devices(&swaps);
            if devices > 0 {
                tracing::warn!(
                    devices,
                    "swap is on: linear memories and tables are reset without PAGEMAP_SCAN (slower, but a swapped-out page cannot outlive its call)"
                );
            }
            devices > 0
        }
        // Not Linux's procfs: nothing says swap is off, so assume it may be
        // on (PAGEMAP_SCAN is Linux-only anyway).
        Err(_) => true,
    }
}

/// The swap areas `/proc/swaps` lists (a header line, then one per area).
fn swap_devices(swaps: &str) -> usize {
    swaps
        .lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .count()
}

fn build_engine(config: &RuntimeConfig) -> Result<(Engine, AllocatorInUse), RuntimeError> {
    match &config.allocation {
        AllocationConfig::OnDemand => Engine::new(&engine_config(config, None, Concurrency::Off))
            .map(|engine| (engine, AllocatorInUse::OnDemand))
            .map_err(RuntimeError::Engine),
        AllocationConfig::Pooling(pool) => {
            match Engine::new(&engine_config(config, Some(pool), Concurrency::Off)) {
                Ok(engine) => Ok((engine, AllocatorInUse::Pooling)),
                Err(pool_error) => {
                    // Typically the virtual address space reservation failed
                    // (a ulimit -v, or a small address space). On-demand
                    // allocation is slower but works.
                    let reason = format!("{pool_error:#}");
                    tracing::warn!(%reason, "pooling allocator unavailable; falling back to on-demand allocation");
                    let engine = Engine::new(&engine_config(config, None, Concurrency::Off))
                        .map_err(RuntimeError::Engine)?;
                    Ok((engine, AllocatorInUse::OnDemandFallback { reason }))
                }
            }
        }
    }
}

/// One of the runtime's engines with its linker and cache.
#[derive(Clone, Copy)]
pub(super) struct Side<'a> {
    pub(super) engine: &'a Engine,
    pub(super) linker: &'a Linker<CallState>,
    pub(super) cache: &'a CompileCache,
    /// Whether it is the WASI 0.3 engine.
    pub(super) wasi3: bool,
}

/// The WASI 0.3 engine's cache directory, under the runtime's.
const WASI3_CACHE: &str = "wasi3";

/// A linker with every import the host provides: WASI 0.2 (and, with
/// `concurrency` on, WASI 0.3 beside it) and the `gust:function/platform`
/// interfaces.
fn new_linker(
    engine: &Engine,
    concurrency: Concurrency,
) -> Result<Linker<CallState>, RuntimeError> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError::Linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(RuntimeError::Linker)?;
    if concurrency == Concurrency::On {
        wasmtime_wasi::p3::add_to_linker(&mut linker).map_err(RuntimeError::Linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker).map_err(RuntimeError::Linker)?;
    }
    host::add_function_to_linker(&mut linker, CallState::output).map_err(RuntimeError::Linker)?;
    host::gpu::add_to_linker(&mut linker).map_err(RuntimeError::Linker)?;
    host::nn::add_to_linker(&mut linker).map_err(RuntimeError::Linker)?;
    host::kv::add_to_linker(&mut linker).map_err(RuntimeError::Linker)?;
    host::config::add_to_linker(&mut linker).map_err(RuntimeError::Linker)?;
    Ok(linker)
}

impl Runtime {
    /// Creates the engines (the pooled one falling back to on-demand
    /// allocation if the pool cannot be reserved), their linkers and
    /// caches, and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let egress = super::egress::EgressClient::new(config.ca_file.as_deref())?;
        let (engine, allocator) = build_engine(&config)?;
        let linker = new_linker(&engine, Concurrency::Off)?;
        let cache = CompileCache::open(&config.cache_dir, &engine)?;
        let wasi3 = {
            let engine = Engine::new(&engine_config(&config, None, Concurrency::On))
                .map_err(RuntimeError::Engine)?;
            Wasi3Engine {
                linker: new_linker(&engine, Concurrency::On)?,
                cache: CompileCache::open(&config.cache_dir.join(WASI3_CACHE), &engine)?,
                engine,
            }
        };
        let ticker = EpochTicker::start(
            vec![engine.clone(), wasi3.engine.clone()],
            config.epoch_tick,
        );
        let idle = Arc::new(InstancePool::new(
            config.max_idle_instances,
            config.max_idle_per_function,
            config.max_preparing_instances,
            config.idle_instance_timeout,
        ));
        Ok(Self {
            engine,
            linker,
            cache,
            wasi3,
            stats: Arc::default(),
            allocator,
            config,
            idle,
            egress,
            _ticker: ticker,
        })
    }

    /// The Wasmtime engine of every component but WASI 0.3 ones.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine (WASI 0.3's when `wasi3`), with its linker and cache.
    pub(super) fn side(&self, wasi3: bool) -> Side<'_> {
        if wasi3 {
            Side {
                engine: &self.wasi3.engine,
                linker: &self.wasi3.linker,
                cache: &self.wasi3.cache,
                wasi3,
            }
        } else {
            Side {
                engine: &self.engine,
                linker: &self.linker,
                cache: &self.cache,
                wasi3,
            }
        }
    }

    /// The engine `component` was compiled for.
    pub(super) fn engine_of(&self, component: &super::LoadedComponent) -> &Engine {
        self.side(component.world() == super::World::HttpP3).engine
    }

    /// The allocator actually in use.
    pub fn allocator(&self) -> &AllocatorInUse {
        &self.allocator
    }

    /// The configuration the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Work counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::{Runtime, RuntimeConfig, swap_devices};

    #[test]
    fn swap_areas_are_counted_from_proc_swaps() {
        let header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
        assert_eq!(swap_devices(header), 0);
        assert_eq!(swap_devices(""), 0);
        let two = format!(
            "{header}/swapfile                               file\t\t2097148\t\t0\t\t-2\n\
             /dev/zram0                              partition\t4194300\t\t1024\t\t100\n"
        );
        assert_eq!(swap_devices(&two), 2);
    }

    #[test]
    fn only_the_wasi3_engine_pays_for_concurrency() {
        let dir = tempfile::TempDir::new().unwrap();
        let runtime = Runtime::new(RuntimeConfig::new(dir.path().join("cache"))).unwrap();
        assert!(!runtime.engine().get_concurrency_support());
        assert!(runtime.wasi3.engine.get_concurrency_support());
        assert!(runtime.side(true).wasi3 && !runtime.side(false).wasi3);
    }
}
