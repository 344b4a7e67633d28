//! The per-call data a `Store` carries.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::capture::BoundedCapture;
use super::egress::Egress;
use super::host::GpuGrant;
use super::host::config::{ConfigCtxView, ConfigView};
use super::host::gpu::{GpuCtxView, GpuSession, GpuView};
use super::host::kv::{KeyValue, KvCtxView, KvView};
use super::host::nn::{NnCtxView, NnView};
use super::http::GustHttpHooks;

/// Grants for the guest's WASI context; turned into a `WasiCtx` only when
/// the guest first makes a WASI call. Most handlers make none, and building a
/// context (two RNGs seeded from the OS, clocks, stdio) is the most expensive
/// part of a short call.
pub(crate) struct WasiGrants {
    pub(crate) env: Arc<[(String, String)]>,
    pub(crate) preopens: Arc<[super::config::Preopen]>,
    pub(crate) stdout: BoundedCapture,
    pub(crate) stderr: BoundedCapture,
}

impl WasiGrants {
    /// No environment, no directories, and captures that keep nothing: the
    /// grants of a store no call owns (one made ahead of its call, or one
    /// whose call is over).
    pub(crate) fn none() -> Self {
        Self {
            env: Arc::new([]),
            preopens: Arc::new([]),
            stdout: BoundedCapture::new(0),
            stderr: BoundedCapture::new(0),
        }
    }

    fn build(&self) -> WasiCtx {
        // Nothing is inherited: no host stdio, env, args, preopens or network
        // (sockets stay linked but every address is denied by default).
        let mut builder = WasiCtxBuilder::new();
        builder
            .envs(&self.env)
            .stdout(self.stdout.clone())
            .stderr(self.stderr.clone())
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false);
        for preopen in self.preopens.iter() {
            let perms = if preopen.read_only {
                wasmtime_wasi::FsPerms::ReadOnly
            } else {
                wasmtime_wasi::FsPerms::ReadWrite
            };
            // The directory was checked when the call was admitted; if it
            // vanished since, the guest simply does not see it.
            if let Err(e) = builder.preopened_dir(preopen_path(preopen), &preopen.guest_path, perms)
            {
                tracing::warn!(path = %preopen.host_path.display(), error = %e, "could not preopen a volume");
            }
        }
        builder.build()
    }
}

/// The path to preopen for `preopen`. Wasmtime-wasi opens preopens by path
/// only; for a directory the host already holds open, `/proc/self/fd/N`
/// names that very directory (the kernel resolves it to the open file, not
/// to a path that could have changed since).
fn preopen_path(preopen: &super::config::Preopen) -> std::path::PathBuf {
    #[cfg(target_os = "linux")]
    if let Some(dir) = &preopen.opened {
        use std::os::fd::AsRawFd;
        return std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    }
    preopen.host_path.clone()
}

/// Linear-memory limiter that remembers a denied growth, so that the trap
/// that follows (Rust aborts on allocation failure) is reported as
/// out-of-memory rather than a generic crash.
pub(crate) struct MemoryLimiter {
    pub(crate) limit_bytes: usize,
    pub(crate) denied_request: Option<usize>,
    /// Bytes of all memories together right now.
    pub(crate) committed_bytes: usize,
    /// The most `committed_bytes` ever was.
    pub(crate) peak_bytes: usize,
}

/// Tables beyond this many elements are refused (each is a pointer of host memory).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The most host resources (wasi-nn tensors, streams, fields, bridge
/// handles…) one store may hold at once. Each is host memory the linear
/// memory limit does not see; Wasmtime's default of a million lets a guest
/// hold hundreds of MB per instance. A well-behaved function holds tens.
pub(crate) const MAX_RESOURCES: usize = 16_384;

impl MemoryLimiter {
    /// Charges `bytes` of host memory held for the guest (a wasi-nn tensor)
    /// to the same limit as its linear memory: the guest cannot hold more
    /// through host imports than it could in its own memory. A refusal is
    /// remembered like a refused growth, so the call ends as out-of-memory.
    pub(crate) fn charge_host(&mut self, bytes: usize) -> wasmtime::Result<()> {
        let total = self.committed_bytes.saturating_add(bytes);
        if total > self.limit_bytes {
            self.denied_request = Some(total);
            return Err(wasmtime::format_err!(
                "host memory for the guest ({total} bytes with its linear memory) exceeds its limit of {} bytes",
                self.limit_bytes
            ));
        }
        self.committed_bytes = total;
        self.peak_bytes = self.peak_bytes.max(total);
        Ok(())
    }

    /// Gives back what [`MemoryLimiter::charge_host`] charged.
    pub(crate) fn release_host(&mut self, bytes: usize) {
        self.committed_bytes = self.committed_bytes.saturating_sub(bytes);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The limit applies to all memories of the instance together.
        let total = self
            .committed_bytes
            .saturating_sub(current)
            .saturating_add(desired);
        let allowed = total <= self.limit_bytes && maximum.is_none_or(|max| desired <= max);
        if allowed {
            self.committed_bytes = total;
            self.peak_bytes = self.peak_bytes.max(total);
        } else {
            self.denied_request = Some(desired);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|max| desired <= max))
    }
}

/// Everything one invocation's `Store` owns.
pub(crate) struct CallState {
    pub(crate) grants: WasiGrants,
    wasi: Option<WasiCtx>,
    http: WasiHttpCtx,
    http_hooks: GustHttpHooks,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) gpu: GpuSession,
    /// Where `gust:function/output.emit` sends chunks.
    pub(crate) output: super::control::OutputSink,
    /// What `wasi:config/store` answers, sorted by key.
    config: Arc<[(String, String)]>,
    /// The tenant's buckets (`wasi:keyvalue`); `None`: no access.
    kv: Option<Arc<dyn KeyValue>>,
    /// Whether any host import reached this state: every import goes
    /// through one of the views below (WASI, `wasi:http`, the bridge,
    /// `wasi:nn`) or [`CallState::output`]. An instance whose instantiation
    /// left this unset saw nothing of the call it was made for.
    pub(crate) host_touched: bool,
}

impl CallState {
    /// The state of a new store; the per-call parts (GPU session, output
    /// sink) are set by [`CallState::renew`] before each call.
    pub(crate) fn new(grants: WasiGrants, memory_limit_bytes: usize) -> Self {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        Self {
            grants,
            wasi: None,
            http: WasiHttpCtx::new(),
            http_hooks: GustHttpHooks { egress: None },
            table,
            limiter: MemoryLimiter {
                limit_bytes: memory_limit_bytes,
                denied_request: None,
                committed_bytes: 0,
                peak_bytes: 0,
            },
            gpu: GpuSession::new(None, None),
            output: super::control::OutputSink::default(),
            config: Arc::new([]),
            kv: None,
            host_touched: false,
        }
    }

    /// The output sink, for `gust:function/output`.
    pub(crate) fn output(&mut self) -> &mut super::control::OutputSink {
        self.host_touched = true;
        &mut self.output
    }

    /// Sets what belongs to one call: its memory limit (the memory already
    /// held counts against it), egress (rules, deadline, trace), GPU grant
    /// and deadline, configuration and key-value access.
    /// Tensors and other resources an earlier call of a reused instance
    /// left behind stay, charged as before.
    pub(crate) fn renew(
        &mut self,
        egress: Egress,
        memory_limit_bytes: usize,
        gpu: Option<GpuGrant>,
        deadline: std::time::Instant,
        config: Arc<[(String, String)]>,
        kv: Option<Arc<dyn KeyValue>>,
    ) {
        self.config = config;
        self.kv = kv;
        self.http_hooks = GustHttpHooks {
            egress: Some(egress),
        };
        self.limiter.limit_bytes = memory_limit_bytes;
        self.limiter.denied_request = None;
        self.limiter.peak_bytes = self.limiter.committed_bytes;
        self.gpu = GpuSession::new(gpu, Some(deadline));
    }
}

impl CallState {
    /// Drops everything this state holds for its call, leaving the state
    /// of a store no call owns: the guest's resources (tensors with their
    /// device-memory charges, streams, key-value handles), the output sink
    /// (a streaming caller's end of the stream closes), the WASI context
    /// with its open directories, egress, configuration and GPU session.
    /// For a store whose call is over but whose instance is torn down later
    /// (see `Preparation::defer_teardown`): what the caller can observe is
    /// released exactly when dropping the whole store would have released
    /// it; only Wasmtime's reset of the instance's memory waits.
    pub(crate) fn release(&mut self) {
        drop(std::mem::replace(self, Self::new(WasiGrants::none(), 0)));
    }

    /// Why the call's outgoing requests were refused, emptied.
    pub(crate) fn egress_denials(&self) -> Vec<String> {
        self.http_hooks
            .egress
            .as_ref()
            .map(|egress| egress.log.take())
            .unwrap_or_default()
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.host_touched = true;
        let Self {
            grants,
            wasi,
            table,
            ..
        } = self;
        let ctx = wasi.get_or_insert_with(|| grants.build());
        WasiCtxView { ctx, table }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        self.host_touched = true;
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

impl GpuView for CallState {
    fn gpu(&mut self) -> GpuCtxView<'_> {
        self.host_touched = true;
        GpuCtxView {
            session: &mut self.gpu,
            table: &mut self.table,
            output: &mut self.output,
        }
    }
}

impl NnView for CallState {
    fn nn(&mut self) -> NnCtxView<'_> {
        self.host_touched = true;
        NnCtxView {
            session: &mut self.gpu,
            table: &mut self.table,
            limiter: &mut self.limiter,
        }
    }
}

impl ConfigView for CallState {
    fn config(&mut self) -> ConfigCtxView<'_> {
        self.host_touched = true;
        ConfigCtxView {
            values: &self.config,
        }
    }
}

impl KvView for CallState {
    fn kv(&mut self) -> KvCtxView<'_> {
        self.host_touched = true;
        KvCtxView {
            kv: self.kv.as_ref(),
            table: &mut self.table,
        }
    }
}
