//! Engine-wide configuration of the runtime.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::egress::OutboundPolicy;

/// How instances get their memories, tables and stacks.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "strategy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AllocationConfig {
    /// Pre-reserved slots reused across calls: the fast path. Each memory slot
    /// reserves `max_memory_bytes` plus guard pages of *virtual* address
    /// space, so the totals below should match real concurrency needs.
    Pooling(PoolingConfig),
    /// Allocate with `mmap` on every instantiation. Slower, but reserves
    /// nothing up front.
    OnDemand,
}

impl Default for AllocationConfig {
    fn default() -> Self {
        Self::Pooling(PoolingConfig::default())
    }
}

/// Sizes of the pooling allocator.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolingConfig {
    /// Component instances that may be live at once (one per running call).
    pub max_instances: u32,
    /// Linear memories live at once, across all instances.
    pub total_memories: u32,
    /// Tables live at once, across all instances.
    pub total_tables: u32,
    /// Core instances live at once, across all instances.
    pub total_core_instances: u32,
    /// Core instances one component may create (Rust components need a few,
    /// interpreters bundled with their libraries need dozens).
    pub max_core_instances_per_component: u32,
    /// Memories one component may create.
    pub max_memories_per_component: u32,
    /// Tables one component may create.
    pub max_tables_per_component: u32,
    /// The largest any single linear memory may grow, in bytes. No tenant's
    /// memory limit can exceed this.
    pub max_memory_bytes: u64,
    /// Elements per table slot.
    pub table_elements: usize,
    /// Bytes of each memory slot kept resident (reset in place, not returned
    /// to the kernel) between uses. Used only where `PAGEMAP_SCAN` is
    /// available (see `pagemap_scan`); otherwise memories are decommitted.
    pub memory_keep_resident_bytes: usize,
    /// Bytes of each table slot kept resident between uses.
    pub table_keep_resident_bytes: usize,
    /// Bytes of each call's native stack (where compiled wasm runs) kept
    /// resident between uses; the rest is decommitted. 0 by default: for
    /// the Python hello, keeping 256 KiB made no measurable difference.
    pub stack_keep_resident_bytes: usize,
    /// Use Linux's `PAGEMAP_SCAN` (6.7+), where available, to reset only the
    /// pages a call dirtied.
    pub pagemap_scan: bool,
}

impl Default for PoolingConfig {
    fn default() -> Self {
        Self {
            max_instances: 256,
            total_memories: 512,
            total_tables: 512,
            total_core_instances: 2048,
            max_core_instances_per_component: 64,
            max_memories_per_component: 8,
            max_tables_per_component: 16,
            max_memory_bytes: 4 << 30,
            table_elements: 20_000,
            memory_keep_resident_bytes: 2 << 20,
            table_keep_resident_bytes: 64 << 10,
            stack_keep_resident_bytes: 0,
            pagemap_scan: true,
        }
    }
}

/// Configuration of a [`Runtime`](super::Runtime).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached (created if missing).
    pub cache_dir: PathBuf,
    /// The instance allocation strategy.
    pub allocation: AllocationConfig,
    /// How often the epoch ticker advances; deadlines are checked at this
    /// granularity, so a timeout fires at most one tick late.
    pub epoch_tick: Duration,
    /// The most native stack WebAssembly may use before a stack-overflow trap.
    pub max_wasm_stack_bytes: usize,
    /// Instances kept between calls for reuse (see [`Reuse`]), across all
    /// functions. Each holds an instance slot, its memory and a stack.
    pub max_idle_instances: usize,
    /// Idle instances kept per function (scope and component).
    pub max_idle_per_function: usize,
    /// An idle instance unused this long is dropped.
    pub idle_instance_timeout: Duration,
    /// Ready instances (see [`Ready`](super::Ready)) being made at once,
    /// all functions together: each takes a core while it instantiates.
    pub max_preparing_instances: usize,
    /// Instances are made ahead only for components whose quickest
    /// instantiation on a call's path took at least this long. Below it, handing the work
    /// to another task costs the call more than it saves: a Rust hello
    /// instantiates in ~4 µs, and waking a worker thread for the task took
    /// longer (benches/README.md, "ready instances").
    pub ready_min_instantiate: Duration,
    /// A PEM file of CA certificates that guests' HTTPS requests trust
    /// besides the system's roots (`gust serve --ca-file`), for private CAs.
    pub ca_file: Option<PathBuf>,
}

impl RuntimeConfig {
    /// Defaults with the compiled-component cache in `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            allocation: AllocationConfig::default(),
            epoch_tick: Duration::from_millis(10),
            max_wasm_stack_bytes: 1 << 20,
            max_idle_instances: 32,
            max_idle_per_function: 4,
            idle_instance_timeout: Duration::from_secs(60),
            max_preparing_instances: std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get),
            ready_min_instantiate: Duration::from_micros(100),
            ca_file: None,
        }
    }
}

/// Per-call limits and grants. Nothing is granted by default.
#[derive(Debug, Clone)]
pub struct CallLimits {
    /// Wall-clock budget for instantiation plus the call.
    pub timeout: Duration,
    /// Total linear-memory bytes the instance may hold.
    pub memory_bytes: u64,
    /// Environment variables visible to the guest (shared, not copied, per call).
    pub env: Arc<[(String, String)]>,
    /// Captured stdout beyond this many bytes is dropped (and counted).
    pub stdout_limit: usize,
    /// Captured stderr beyond this many bytes is dropped (and counted).
    pub stderr_limit: usize,
    /// Which outgoing HTTP requests the guest may make (none by default).
    pub outbound: OutboundPolicy,
    /// Host directories visible to the guest (none by default).
    pub preopens: Arc<[Preopen]>,
    /// GPU-bridge devices and the tenant's account; `None` makes every
    /// bridge call answer `forbidden`.
    pub gpu: Option<super::host::GpuGrant>,
    /// What `wasi:config/store` answers, sorted by key (shared, not
    /// copied, per call).
    pub config: Arc<[(String, String)]>,
    /// The tenant's key-value buckets; `None`: `wasi:keyvalue` answers
    /// `access-denied`.
    pub kv: Option<Arc<dyn super::host::KeyValue>>,
    /// Whether the call may run in an instance an earlier call of the same
    /// scope left behind (and leave its own for the next); `None`: a fresh
    /// instance, always.
    pub reuse: Option<super::reuse::Reuse>,
    /// Whether the call may take a fresh instance made ready before it
    /// came, and have the next one made; ignored when `reuse` applies.
    /// `None`: the call instantiates its own.
    pub ready: Option<super::reuse::Ready>,
}

/// A host directory the guest sees at `guest_path`; inside it, nothing
/// outside it is reachable (no `..`, no symlinks out).
#[derive(Debug, Clone)]
pub struct Preopen {
    /// The directory on the host.
    pub host_path: PathBuf,
    /// The directory, already open: when set, the guest gets exactly this
    /// directory, whatever `host_path` names by the time the guest first
    /// touches the filesystem (a function that can write a parent could
    /// have swapped it for a symlink). The host's volumes always set it;
    /// `None` opens `host_path` then.
    pub opened: Option<Arc<cap_std::fs::Dir>>,
    /// Where the guest sees it, e.g. `/data`.
    pub guest_path: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

impl PartialEq for Preopen {
    /// The same grant: an instance whose WASI context was built for one may
    /// serve a call that asks for the other. Opened directories are the
    /// same when they are the same directory on disk (device and inode),
    /// so a path swapped since then is a different grant.
    fn eq(&self, other: &Self) -> bool {
        self.host_path == other.host_path
            && self.guest_path == other.guest_path
            && self.read_only == other.read_only
            && match (&self.opened, &other.opened) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || same_directory(a, b),
                _ => false,
            }
    }
}

impl Eq for Preopen {}

/// Whether two open directories are one on disk; unknown counts as not.
fn same_directory(a: &cap_std::fs::Dir, b: &cap_std::fs::Dir) -> bool {
    use cap_std::fs::MetadataExt;
    match (a.dir_metadata(), b.dir_metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            memory_bytes: 128 << 20,
            env: Arc::new([]),
            stdout_limit: 64 << 10,
            stderr_limit: 64 << 10,
            outbound: OutboundPolicy::default(),
            preopens: Arc::new([]),
            gpu: None,
            config: Arc::new([]),
            kv: None,
            reuse: None,
            ready: None,
        }
    }
}
