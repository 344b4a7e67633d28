//! The Wasmtime runtime core: one engine, compiled-component cache, a
//! pre-instantiated component per loaded version, and one fresh, limited
//! `Store` per call.
//!
//! Every call gets a new instance (fresh state is the isolation guarantee),
//! instantiated from an [`InstancePre`] on the pooling allocator with
//! copy-on-write memory images, a memory limit, an epoch deadline and a WASI
//! context that grants nothing unless the caller's limits say so.

pub(crate) mod bindings;
mod cache;
mod capture;
mod config;
mod control;
mod epoch;
mod http;
mod imports;
mod outcome;
mod reuse;
pub(crate) mod state;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sha2::{Digest as _, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolConcurrencyLimitError,
    PoolingAllocationConfig, Store, Trap, UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

pub use self::cache::CacheError;
pub use self::capture::{BoundedCapture, CapturedOutput};
pub use self::config::{AllocationConfig, CallLimits, PoolingConfig, Preopen, RuntimeConfig};
pub use self::control::{CallControl, Cancel};
pub use self::http::{BodyTooLarge, CappedBody, CappedBodyError, OutboundPolicy};
pub use self::outcome::{
    GuestError, Invocation, Outcome, Request, Response, Timings, new_invocation_id,
};
pub use self::reuse::Reuse;

use self::bindings::exports::gust::function::handler as wit_handler;
use self::bindings::{Guest, GuestPre};
use self::cache::{CompileCache, Lookup};
use self::epoch::EpochTicker;
use self::reuse::{IdleInstance, InstancePool};
use self::state::{CallState, WasiGrants};

/// Interface a component must export to be invoked as a handler.
pub const HANDLER_EXPORT: &str = "gust:function/handler@0.1.0";
/// Interface a component exports to serve HTTP (`wasi:http/proxy`).
pub const HTTP_EXPORT_PREFIX: &str = "wasi:http/incoming-handler@";

/// The sha256 of a component's bytes: its identity everywhere in Gust.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses `sha256:<64 hex digits>` (the `Display` form).
    pub fn parse(text: &str) -> Option<Self> {
        let hex_digits = text.strip_prefix("sha256:")?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Zero bytes.
    #[error("the file is empty; expected a WebAssembly component")]
    Empty,
    /// Not WebAssembly at all.
    #[error("not a WebAssembly binary (no `\\0asm` header); expected a WebAssembly component")]
    NotWasm,
    /// A core module, not a component.
    #[error(
        "this is a core WebAssembly module, not a component; build for `wasm32-wasip2` or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    /// The binary failed validation or compilation.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports interfaces the host does not provide.
    #[error("the component imports what this host does not provide: {}", .imports.join(", "))]
    UnsatisfiedImports {
        /// The unsatisfied import names.
        imports: Vec<String>,
        /// Wasmtime's own explanation (the first failure it found).
        detail: String,
    },
    /// The component does not export a world the host can run.
    #[error(
        "the component exports neither `{HANDLER_EXPORT}` nor `wasi:http/incoming-handler`; it exports: {}",
        if .exports.is_empty() { "nothing".to_owned() } else { .exports.join(", ") }
    )]
    MissingExport {
        /// What it does export.
        exports: Vec<String>,
    },
    /// It exports the handler interface, but with the wrong types.
    #[error("the component's `{HANDLER_EXPORT}` export does not match the contract: {0}")]
    ExportMismatch(String),
}

/// Errors creating a [`Runtime`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The engine configuration was rejected.
    #[error("invalid engine configuration: {0}")]
    Engine(String),
    /// The compiled-component cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Setting up the host's imports failed.
    #[error("could not set up host imports: {0}")]
    Linker(String),
}

/// The world a loaded component targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum World {
    /// Exports `gust:function/handler`.
    Handler,
    /// Exports `wasi:http/incoming-handler`.
    Http,
}

impl World {
    /// The world's name as the API reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handler => "handler",
            Self::Http => "http",
        }
    }
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
    compiles: AtomicU64,
    cache_hits: AtomicU64,
    cache_rejections: AtomicU64,
    instantiations: AtomicU64,
    reuses: AtomicU64,
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
        }
    }
}

/// How a component was obtained by [`Runtime::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// Compiled now (and written to the cache).
    Compiled,
    /// Deserialized from the cache.
    Cache,
}

enum Prepared {
    Handler(GuestPre<CallState>),
    // Served by the HTTP front end, which arrives with the server.
    Http(ProxyPre<CallState>),
}

/// A validated, compiled, pre-instantiated component, ready to invoke.
/// Cheap to clone; share it across calls.
#[derive(Clone)]
pub struct LoadedComponent {
    inner: Arc<LoadedInner>,
}

struct LoadedInner {
    digest: Digest,
    prepared: Prepared,
    source: LoadSource,
    imports: Vec<String>,
}

impl LoadedComponent {
    /// The sha256 of the component's bytes.
    pub fn digest(&self) -> Digest {
        self.inner.digest
    }

    /// The world it targets.
    pub fn world(&self) -> World {
        match self.inner.prepared {
            Prepared::Handler(_) => World::Handler,
            Prepared::Http(_) => World::Http,
        }
    }

    /// Whether it was compiled or came from the cache.
    pub fn source(&self) -> LoadSource {
        self.inner.source
    }

    /// The interfaces it imports.
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }
}

impl fmt::Debug for LoadedComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedComponent")
            .field("digest", &self.inner.digest)
            .field("world", &self.world())
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

/// The engine, its linker, cache and epoch ticker. One per host.
pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    cache: CompileCache,
    stats: RuntimeStats,
    allocator: AllocatorInUse,
    config: RuntimeConfig,
    idle: InstancePool,
    _ticker: EpochTicker,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("allocator", &self.allocator)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn engine_config(config: &RuntimeConfig, pooling: Option<&PoolingConfig>) -> wasmtime::Config {
    let mut wasm = wasmtime::Config::new();
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
        let scan = pool.pagemap_scan && PoolingAllocationConfig::is_pagemap_scan_available();
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

fn build_engine(config: &RuntimeConfig) -> Result<(Engine, AllocatorInUse), RuntimeError> {
    match &config.allocation {
        AllocationConfig::OnDemand => Engine::new(&engine_config(config, None))
            .map(|engine| (engine, AllocatorInUse::OnDemand))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}"))),
        AllocationConfig::Pooling(pool) => {
            match Engine::new(&engine_config(config, Some(pool))) {
                Ok(engine) => Ok((engine, AllocatorInUse::Pooling)),
                Err(pool_error) => {
                    // Typically the virtual address space reservation failed
                    // (a ulimit -v, or a small address space). On-demand
                    // allocation is slower but works.
                    let reason = format!("{pool_error:#}");
                    tracing::warn!(%reason, "pooling allocator unavailable; falling back to on-demand allocation");
                    let engine = Engine::new(&engine_config(config, None))
                        .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
                    Ok((engine, AllocatorInUse::OnDemandFallback { reason }))
                }
            }
        }
    }
}

impl Runtime {
    /// Creates the engine (falling back to on-demand allocation if the pool
    /// cannot be reserved), the linker, the cache and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let (engine, allocator) = build_engine(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Linker(format!("{e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Linker(format!("{e:#}")))?;
        Guest::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |state| state)
            .map_err(|e| RuntimeError::Linker(format!("{e:#}")))?;
        let cache = CompileCache::open(&config.cache_dir, &engine)?;
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick);
        let idle = InstancePool::new(
            config.max_idle_instances,
            config.max_idle_per_function,
            config.idle_instance_timeout,
        );
        Ok(Self {
            engine,
            linker,
            cache,
            stats: RuntimeStats::default(),
            allocator,
            config,
            idle,
            _ticker: ticker,
        })
    }

    /// The Wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
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

    /// Validates `bytes` as a component this host can run, compiles it (or
    /// loads the verified compiled artifact from the cache) and
    /// pre-instantiates it. CPU-heavy on a cache miss: call it from a
    /// blocking thread in async code.
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedComponent, LoadError> {
        check_header(bytes)?;
        let digest = Digest::of(bytes);
        let (component, source) = match self.cache.load(&self.engine, &digest) {
            Lookup::Hit(component) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                (component, LoadSource::Cache)
            }
            lookup => {
                if let Lookup::Rejected(reason) = lookup {
                    self.stats.cache_rejections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%digest, %reason, path = %self.cache.path_for(&digest).display(), "ignoring compiled-cache entry; recompiling");
                }
                (self.compile(&digest, bytes)?, LoadSource::Compiled)
            }
        };
        self.prepare(digest, component, source)
    }

    fn compile(&self, digest: &Digest, bytes: &[u8]) -> Result<Component, LoadError> {
        self.stats.compiles.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        tracing::info!(%digest, elapsed = ?started.elapsed(), "compiled component");
        // A failure to cache costs a recompile later, not this load.
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) = self.cache.store(digest, &artifact) {
                    tracing::warn!(%digest, error = %e, "could not write the compiled cache");
                }
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "could not serialize the compiled component")
            }
        }
        Ok(component)
    }

    fn prepare(
        &self,
        digest: Digest,
        component: Component,
        source: LoadSource,
    ) -> Result<LoadedComponent, LoadError> {
        let component_type = component.component_type();
        let imports: Vec<String> = component_type
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let exports: Vec<String> = component_type
            .exports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            let mut unsatisfied: Vec<String> = imports
                .iter()
                .filter(|name| !imports::is_provided(name))
                .cloned()
                .collect();
            let detail = format!("{e:#}");
            if unsatisfied.is_empty() {
                // Provided by name but with other types (e.g. an
                // incompatible prerelease of an interface).
                unsatisfied.push(detail.clone());
            }
            LoadError::UnsatisfiedImports {
                imports: unsatisfied,
                detail,
            }
        })?;
        let prepared = if exports
            .iter()
            .any(|e| imports::same_interface(e, HANDLER_EXPORT))
        {
            Prepared::Handler(
                GuestPre::new(pre).map_err(|e| LoadError::ExportMismatch(format!("{e:#}")))?,
            )
        } else if exports.iter().any(|e| e.starts_with(HTTP_EXPORT_PREFIX)) {
            Prepared::Http(
                ProxyPre::new(pre).map_err(|e| LoadError::ExportMismatch(format!("{e:#}")))?,
            )
        } else {
            return Err(LoadError::MissingExport { exports });
        };
        Ok(LoadedComponent {
            inner: Arc::new(LoadedInner {
                digest,
                prepared,
                source,
                imports,
            }),
        })
    }

    /// A fresh store for one call: memory limit, deadline, captured stdio,
    /// and the caller's controls.
    fn new_call(&self, limits: &CallLimits, control: CallControl) -> Call {
        let started = Instant::now();
        let stdout = BoundedCapture::new(limits.stdout_limit);
        let stderr = BoundedCapture::new(limits.stderr_limit);
        let memory_limit = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        let grants = WasiGrants {
            env: Arc::clone(&limits.env),
            preopens: Arc::clone(&limits.preopens),
            stdout: stdout.clone(),
            stderr: stderr.clone(),
        };
        let state = CallState::new(grants, limits.outbound.clone(), memory_limit);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        self.stats.instantiations.fetch_add(1, Ordering::Relaxed);
        let fresh = Resumable {
            store,
            guest: None,
            stdout,
            stderr,
            uses: 0,
        };
        self.arm(fresh, started, limits, control)
    }

    /// A call in an instance an earlier call left behind.
    fn resumed_call(&self, idle: IdleInstance, limits: &CallLimits, control: CallControl) -> Call {
        let started = Instant::now();
        self.stats.reuses.fetch_add(1, Ordering::Relaxed);
        let resumed = Resumable {
            store: idle.store,
            guest: Some(idle.guest),
            stdout: idle.stdout,
            stderr: idle.stderr,
            uses: idle.uses,
        };
        self.arm(resumed, started, limits, control)
    }

    /// Sets a store up for one call: the call's limits and grants, its
    /// deadline and cancel token, and where its emitted output goes.
    fn arm(
        &self,
        resumable: Resumable,
        started: Instant,
        limits: &CallLimits,
        control: CallControl,
    ) -> Call {
        let Resumable {
            mut store,
            guest,
            stdout,
            stderr,
            uses,
        } = resumable;
        let deadline = started + limits.timeout;
        let memory_limit = usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX);
        let cancel = control.cancel.unwrap_or_default();
        let state = store.data_mut();
        state.renew(
            limits.outbound.clone(),
            memory_limit,
            limits.gpu.clone(),
            deadline,
        );
        state.output = match control.stream {
            Some(sender) => control::OutputSink::Stream {
                sender,
                cancel: cancel.clone(),
            },
            None => control::OutputSink::Buffer {
                data: Vec::new(),
                limit: control.output_limit,
            },
        };
        store.set_epoch_deadline(1);
        let interrupt = cancel.clone();
        store.epoch_deadline_callback(move |_| {
            // Yielding on every tick keeps a busy guest from monopolising an
            // executor thread; past the deadline, or once cancelled,
            // interrupt it.
            if interrupt.is_cancelled() || Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        Call {
            store,
            guest,
            stdout,
            stderr,
            started,
            uses,
            limits: limits.clone(),
            cancel,
            // Host imports may await (the GPU bridge, outgoing HTTP); the
            // epoch only interrupts wasm, so the whole call is bounded too,
            // one tick past the deadline.
            hard_limit: limits.timeout + self.config.epoch_tick,
        }
    }

    /// Runs one invocation of a handler component in a fresh instance (or,
    /// when `limits.reuse` allows, one an earlier call left behind).
    /// Never fails: every way a call can end is an [`Outcome`].
    pub async fn invoke(
        &self,
        component: &LoadedComponent,
        request: Request,
        limits: &CallLimits,
    ) -> Invocation {
        // Emitted output is kept on the host: bound it like the guest's own
        // memory.
        let control = CallControl {
            output_limit: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
            ..CallControl::default()
        };
        self.invoke_with(component, request, limits, control).await
    }

    /// [`Runtime::invoke`] with controls: a cancel token, and where the
    /// function's emitted output goes. Without a stream, emitted chunks are
    /// put in front of the response body (plain `invoke` keeps at most
    /// `limits.memory_bytes` of them).
    pub async fn invoke_with(
        &self,
        component: &LoadedComponent,
        request: Request,
        limits: &CallLimits,
        control: CallControl,
    ) -> Invocation {
        let Prepared::Handler(pre) = &component.inner.prepared else {
            return Invocation::host_error("this component serves wasi:http; call it over HTTP");
        };
        let reuse = limits.reuse.as_ref().filter(|reuse| reuse.max_uses > 1);
        let idle = reuse.and_then(|reuse| self.idle.take(reuse, component.digest(), limits));
        let mut call = match idle {
            Some(idle) => self.resumed_call(idle, limits, control),
            None => self.new_call(limits, control),
        };
        let cancel = call.cancel.clone();
        let mut timings = Timings {
            reused: call.guest.is_some(),
            ..Timings::default()
        };
        let request = wit_handler::Request {
            body: request.body,
            content_type: request.content_type,
            headers: request.headers,
            invocation_id: request.invocation_id,
        };
        let started = call.started;
        let reused_guest = call.guest.take();
        let store = &mut call.store;
        let run = async {
            let guest = match reused_guest {
                Some(guest) => guest,
                None => pre.instantiate_async(&mut *store).await?,
            };
            timings.instantiate = started.elapsed();
            let result = guest
                .gust_function_handler()
                .call_handle(&mut *store, &request)
                .await;
            timings.call = started.elapsed() - timings.instantiate;
            result.map(|returned| (returned, guest))
        };
        // Host imports may await; a cancel must not wait for them.
        let result = tokio::select! {
            result = tokio::time::timeout(call.hard_limit, run) => result,
            () = cancel.cancelled() => Ok(Err(wasmtime::Error::from(Trap::Interrupt))),
        };
        let emitted = call.store.data_mut().output.take_buffer();
        let result = match result {
            Err(_elapsed) => Err(None),
            Ok(Ok((returned, guest))) => {
                // The guest returned: its instance is sound and may serve
                // the next call of the same scope.
                call.guest = reuse.map(|_| guest);
                Ok(returned)
            }
            Ok(Err(error)) => Err(Some(error)),
        };
        let result = match result {
            Err(failure) => Err(failure),
            Ok(Ok(response)) => Ok(Outcome::Ok(Response {
                status: response.status,
                content_type: response.content_type,
                headers: response.headers,
                body: if emitted.is_empty() {
                    response.body
                } else {
                    let mut body = emitted;
                    body.extend_from_slice(&response.body);
                    body
                },
            })),
            Ok(Err(error)) => Ok(Outcome::GuestError(GuestError {
                code: error.code,
                message: error.message,
                status: error.status,
            })),
        };
        let (invocation, idle) = call.finish(result, timings);
        if let (Some(reuse), Some(idle)) = (reuse, idle) {
            self.idle.put(reuse, component.digest(), idle);
        }
        invocation
    }

    /// Serves one HTTP request with a `wasi:http/proxy` component in a fresh
    /// instance. Returns once the guest has set its response (or failed
    /// before doing so); the body then streams while the guest keeps running
    /// in a task of its own, and `completion` resolves when it is done.
    pub fn serve_http<B>(
        self: &Arc<Self>,
        component: &LoadedComponent,
        request: hyper::Request<B>,
        limits: &CallLimits,
    ) -> Result<HttpCall, Box<Invocation>>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        use wasmtime_wasi_http::WasiHttpView as _;

        let Prepared::Http(pre) = &component.inner.prepared else {
            return Err(Box::new(Invocation::host_error(
                "this component exports gust:function/handler; invoke it instead",
            )));
        };
        let pre = pre.clone();
        let mut call = self.new_call(limits, CallControl::default());
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let store = call.store.data_mut();
        let prepared = store
            .http()
            .new_incoming_request(Scheme::Http, request)
            .and_then(|req| Ok((req, store.http().new_response_outparam(sender)?)));
        let (req, out) = match prepared {
            Ok(resources) => resources,
            Err(e) => return Err(Box::new(Invocation::host_error(&format!("{e:#}")))),
        };
        let completion = tokio::spawn(async move {
            let mut timings = Timings::default();
            let started = call.started;
            let store = &mut call.store;
            let run = async {
                let proxy = pre.instantiate_async(&mut *store).await?;
                timings.instantiate = started.elapsed();
                let result = proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut *store, req, out)
                    .await;
                timings.call = started.elapsed() - timings.instantiate;
                result
            };
            let result = match tokio::time::timeout(call.hard_limit, run).await {
                Err(_elapsed) => Err(None),
                // The response (status, headers, body) went to the caller
                // through the outparam; here only success is recorded.
                Ok(Ok(())) => Ok(Outcome::Ok(Response::default())),
                Ok(Err(error)) => Err(Some(error)),
            };
            call.finish(result, timings).0
        });
        Ok(HttpCall {
            response: receiver,
            completion,
        })
    }
}

/// A store, new or left behind by an earlier call, before it is armed for
/// a call.
struct Resumable {
    store: Store<CallState>,
    guest: Option<Guest>,
    stdout: BoundedCapture,
    stderr: BoundedCapture,
    uses: u32,
}

/// One call's store and what it captures.
struct Call {
    store: Store<CallState>,
    /// Before the call: the instance to reuse, if any. After it: the
    /// instance to keep, if the call may leave it behind.
    guest: Option<Guest>,
    stdout: BoundedCapture,
    stderr: BoundedCapture,
    started: Instant,
    /// Calls the instance served before this one.
    uses: u32,
    limits: CallLimits,
    cancel: Cancel,
    hard_limit: std::time::Duration,
}

impl Call {
    /// Classifies the result and collects captures. `Err(None)` means the
    /// hard time limit fired; `Err(Some(e))` is a trap or host failure.
    /// Returns the instance for reuse when the call left one to keep (see
    /// [`Call::guest`]), it returned normally and it has uses left.
    fn finish(
        self,
        result: Result<Outcome, Option<wasmtime::Error>>,
        timings: Timings,
    ) -> (Invocation, Option<IdleInstance>) {
        let limiter = &self.store.data().limiter;
        let peak_memory_bytes = limiter.peak_bytes as u64;
        let denied = limiter.denied_request;
        let uses = self.uses.saturating_add(1);
        let keep = match (&self.guest, &result, &self.limits.reuse) {
            (Some(_), Ok(Outcome::Ok(_) | Outcome::GuestError(_)), Some(reuse)) => {
                !self.cancel.is_cancelled() && uses < reuse.max_uses
            }
            _ => false,
        };
        let idle = match (keep, self.guest) {
            (true, Some(guest)) => Some(IdleInstance::new(
                {
                    let mut store = self.store;
                    // Nothing of this call's caller stays with the idle
                    // instance (a streaming caller's channel, say).
                    store.data_mut().output = control::OutputSink::default();
                    store
                },
                guest,
                self.stdout.clone(),
                self.stderr.clone(),
                uses,
                &self.limits,
            )),
            _ => {
                drop(self.store);
                None
            }
        };
        let stderr = self.stderr.take();
        let outcome = match result {
            Ok(outcome) => outcome,
            // However the interrupted guest ended (a trap, or the caller's
            // side of a stream closing), it was stopped on purpose.
            Err(_) if self.cancel.is_cancelled() => Outcome::Cancelled,
            Err(None) => Outcome::Timeout {
                limit: self.limits.timeout,
            },
            Err(Some(error)) => classify_failure(&error, denied, &self.limits, &stderr.text()),
        };
        let invocation = Invocation {
            outcome,
            stdout: self.stdout.take(),
            stderr,
            timings,
            peak_memory_bytes,
        };
        (invocation, idle)
    }
}

/// A `wasi:http` request in flight; see [`Runtime::serve_http`].
pub struct HttpCall {
    /// Resolves to the guest's response once it calls
    /// `response-outparam.set`; an error (the sender dropped) means the guest
    /// finished or failed without responding: see `completion`.
    pub response: tokio::sync::oneshot::Receiver<
        Result<
            hyper::Response<HyperOutgoingBody>,
            wasmtime_wasi_http::p2::bindings::http::types::ErrorCode,
        >,
    >,
    /// Resolves when the guest has finished (its body fully written) with
    /// the invocation's outcome; for success the outcome's response is empty
    /// (the real one went out through `response`).
    pub completion: tokio::task::JoinHandle<Invocation>,
}

fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::Empty);
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm);
    }
    if wasmtime::wasmparser::Parser::is_core_wasm(bytes) {
        return Err(LoadError::CoreModule);
    }
    if !wasmtime::wasmparser::Parser::is_component(bytes) {
        return Err(LoadError::Invalid(
            "unsupported WebAssembly binary version or layer".into(),
        ));
    }
    Ok(())
}

fn classify_failure(
    error: &wasmtime::Error,
    denied_memory: Option<usize>,
    limits: &CallLimits,
    stderr: &str,
) -> Outcome {
    let backtrace = error
        .downcast_ref::<WasmBacktrace>()
        .map(|bt| bt.to_string())
        .unwrap_or_default();
    if let Some(requested) = denied_memory {
        // Rust (and most guest languages) abort when an allocation fails, so
        // the trap that follows a refused growth is the out-of-memory itself.
        return Outcome::OutOfMemory {
            limit_bytes: limits.memory_bytes,
            requested_bytes: requested as u64,
        };
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return match trap {
            Trap::Interrupt => Outcome::Timeout {
                limit: limits.timeout,
            },
            Trap::StackOverflow => Outcome::StackOverflow { backtrace },
            other => Outcome::Trap {
                message: other.to_string(),
                panic_message: outcome::panic_message(stderr),
                backtrace,
            },
        };
    }
    if let Some(limit) = error.downcast_ref::<PoolConcurrencyLimitError>() {
        return Outcome::Overloaded {
            reason: limit.to_string(),
        };
    }
    Outcome::HostError {
        message: format!("{error:#}"),
    }
}
