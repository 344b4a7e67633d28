//! The Wasmtime runtime core: one engine, compiled-component cache, a
//! pre-instantiated component per loaded version, and one fresh, limited
//! `Store` per call.
//!
//! Every call gets a new instance (fresh state is the isolation guarantee),
//! instantiated from an [`InstancePre`](wasmtime::component::InstancePre) on
//! the pooling allocator with copy-on-write memory images, a memory limit, an
//! epoch deadline and a WASI context that grants nothing unless the caller's
//! limits say so.
//!
//! The work is split by phase: `engine` builds the engine and the linker,
//! `load` validates, compiles and pre-instantiates components, and `call`
//! runs them. The host side of the `gust:gpu` and `wasi:nn` imports is in
//! `host`, behind narrow views of the call's state.

mod bindings;
mod cache;
mod call;
mod capture;
mod config;
mod control;
mod egress;
mod engine;
mod epoch;
mod host;
mod http;
mod imports;
mod load;
mod outcome;
mod ready;
mod reuse;
mod state;

use std::fmt;
use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::component::Linker;

pub use self::cache::CacheError;
pub use self::call::{HttpAnswer, HttpCall};
pub use self::capture::{BoundedCapture, CapturedOutput};
pub use self::config::{AllocationConfig, CallLimits, PoolingConfig, Preopen, RuntimeConfig};
pub use self::control::{CallControl, Cancel};
pub use self::egress::{
    Destination, EgressError, InvalidOutboundRule, OutboundPolicy, OutboundRule, restricted_kind,
};
pub use self::engine::{AllocatorInUse, RuntimeError, RuntimeStats, StatsSnapshot};
pub use self::host::{GpuGrant, KeyValue, KvFailure, ModelGrant, ModelUsage};
pub use self::http::{BodyTooLarge, CappedBody, CappedBodyError};
pub use self::imports::is_provided;
pub use self::load::{
    HANDLER_EXPORT, HTTP_EXPORT_PREFIX, HTTP_P3_EXPORT_PREFIX, LoadError, LoadSource,
    LoadedComponent, World,
};
pub use self::outcome::{
    GuestError, Invocation, Outcome, Request, Response, Timings, new_invocation_id,
};
pub use self::reuse::{Ready, Reuse};
/// Kept at this path for the API layer; the type lives in [`crate::digest`].
pub use crate::digest::Digest;

use self::cache::CompileCache;
use self::epoch::EpochTicker;
use self::reuse::InstancePool;
use self::state::CallState;

/// The engine, its linker, cache and epoch ticker. One per host.
///
/// Built by [`Runtime::new`] (see `engine.rs`); [`Runtime::load`] turns
/// bytes into a [`LoadedComponent`] (`load.rs`), and [`Runtime::invoke`],
/// [`Runtime::invoke_with`] and [`Runtime::serve_http`] run one
/// (`call.rs`). Share it behind an `Arc`: every method takes `&self`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    cache: CompileCache,
    wasi3: engine::Wasi3Engine,
    stats: Arc<RuntimeStats>,
    allocator: AllocatorInUse,
    config: RuntimeConfig,
    idle: Arc<InstancePool>,
    egress: egress::EgressClient,
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
