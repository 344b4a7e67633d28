//! Tenant policies: what a tenant's functions may use.
//!
//! Policies come from a directory (`gust serve --policies DIR`):
//!
//! - `default.toml` applies to every tenant;
//! - `<tenant>.toml` (optional) overrides keys of the default for one tenant.
//!
//! Both are *partial*: a key a file leaves out keeps the value from the layer
//! below, so the effective policy of a tenant is
//! built-in defaults ← `default.toml` ← `<tenant>.toml`. A key a file sets
//! replaces the lower value entirely (lists and the `env` table are not
//! concatenated); the `[gpu]` table is a group of keys, each overridden
//! individually. If the directory or `default.toml` is missing the built-in
//! defaults are used and a message is logged. `policies/README.md` documents
//! every key.
//!
//! Every file is checked completely when the host starts; a mistake stops the
//! host with an error naming the file, line, column and key
//! ([`InvalidPolicy`]), rather than surfacing on some later request.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::ops::{Range, RangeInclusive};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::valid_name;
use crate::runtime::{CallLimits, OutboundPolicy, OutboundRule};

#[cfg(test)]
mod tests;

/// The policy file that applies to every tenant.
pub const DEFAULT_FILE: &str = "default.toml";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Allowed `timeout_ms`: up to an hour.
pub const TIMEOUT_MS_RANGE: RangeInclusive<u64> = 1..=3_600_000;
/// Allowed `memory_mb`: the pooling allocator reserves at most 4 GiB per
/// linear memory (`PoolingConfig::max_memory_bytes`).
pub const MEMORY_MB_RANGE: RangeInclusive<u64> = 1..=4096;
/// Allowed `max_concurrency` and `max_anonymous_concurrency`.
pub const MAX_CONCURRENCY_RANGE: RangeInclusive<u64> = 1..=u32::MAX as u64;
/// Allowed `max_stored_jobs`.
pub const MAX_STORED_JOBS_RANGE: RangeInclusive<u64> = 1..=1_000_000;
/// Allowed `max_stored_job_bytes`.
pub const MAX_STORED_JOB_BYTES_RANGE: RangeInclusive<u64> = 1..=1024 * GIB;
/// Allowed `max_queued_jobs` (0: the tenant may not spawn jobs).
pub const MAX_QUEUED_JOBS_RANGE: RangeInclusive<u64> = 0..=1_000_000;
/// Allowed `reuse_instances` (0 and 1: every call gets a fresh instance).
pub const REUSE_INSTANCES_RANGE: RangeInclusive<u64> = 0..=1_000_000;
/// Allowed `ready_instances` (0: every call instantiates its own). The
/// host keeps at most `max_idle_per_function` of them per function anyway.
pub const READY_INSTANCES_RANGE: RangeInclusive<u64> = 0..=16;
/// Allowed `max_body_bytes`: bodies are buffered, so keep them bounded.
pub const MAX_BODY_BYTES_RANGE: RangeInclusive<u64> = 1..=GIB;
/// Allowed `max_component_bytes`.
pub const MAX_COMPONENT_BYTES_RANGE: RangeInclusive<u64> = 1..=GIB;
/// Allowed `max_functions`.
pub const MAX_FUNCTIONS_RANGE: RangeInclusive<u64> = 1..=100_000;
/// Allowed `max_secrets`.
pub const MAX_SECRETS_RANGE: RangeInclusive<u64> = 0..=10_000;
/// Allowed `kv_max_buckets` (0: no key-value store).
pub const KV_MAX_BUCKETS_RANGE: RangeInclusive<u64> = 0..=10_000;
/// Allowed `kv_max_keys`.
pub const KV_MAX_KEYS_RANGE: RangeInclusive<u64> = 0..=100_000_000;
/// Allowed `kv_max_bytes`.
pub const KV_MAX_BYTES_RANGE: RangeInclusive<u64> = 0..=1024 * GIB;
/// The longest configuration key (`[config]`, `deploy --config`).
pub const MAX_CONFIG_KEY_LEN: usize = 128;
/// The longest configuration value.
pub const MAX_CONFIG_VALUE_BYTES: usize = 16 * 1024;

/// Whether `key` may name a configuration value (`wasi:config`): 1 to
/// [`MAX_CONFIG_KEY_LEN`] ASCII letters, digits, `_`, `.` and `-`.
pub fn valid_config_key(key: &str) -> bool {
    (1..=MAX_CONFIG_KEY_LEN).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
/// Allowed `max_storage_bytes`: up to a TiB of components per tenant.
pub const MAX_STORAGE_BYTES_RANGE: RangeInclusive<u64> = 1..=1024 * GIB;
/// Allowed `log_bytes` (0 keeps no output); every invocation record stores
/// up to twice this much.
pub const LOG_BYTES_RANGE: RangeInclusive<u64> = 0..=16 * MIB;
/// Allowed `gpu.memory_mb` (0: no device memory): up to 1 TiB.
pub const GPU_MEMORY_MB_RANGE: RangeInclusive<u64> = 0..=1 << 20;
/// Allowed `gpu.time_ms_per_minute` (0: no device time). More than 60000
/// only makes sense with several devices or overlapping work.
pub const GPU_TIME_MS_PER_MINUTE_RANGE: RangeInclusive<u64> = 0..=600_000;
/// The longest model name in `gpu.models`.
pub const MAX_MODEL_NAME_LEN: usize = 128;

/// Errors loading a policy directory.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or the directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A `.toml` file in the directory is not named after a valid tenant.
    #[error(
        "{}: policy files are named `<tenant>.toml` (or `default.toml`), and tenant names match ^[a-z0-9][a-z0-9-]{{0,62}}$",
        path.display()
    )]
    BadFileName {
        /// The offending file.
        path: PathBuf,
    },
    /// A file is not valid TOML, has an unknown key or a wrong type, or a
    /// value is out of range or otherwise invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidPolicy),
}

/// Where a policy file is wrong, and why. Displayed as
/// `<file>:<line>:<column>: key `<key>`: <message>`, for example
/// ``policies/acme.toml:3:13: key `memory_mb`: must be between 1 and 4096, got 0``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidPolicy {
    /// The file.
    pub file: PathBuf,
    /// Where in the file (1-based), if the parser could tell.
    pub location: Option<Location>,
    /// The dotted key (`gpu.memory_mb`, `volumes[0].path`, `env.HOME`), if
    /// the error is about one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// A position in a file; both numbers start at 1, the column counts
/// characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line number.
    pub line: usize,
    /// Column number.
    pub column: usize,
}

impl fmt::Display for InvalidPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(Location { line, column }) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Errors resolving a policy's volumes against a tenant's volume root.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The tenant's volume root does not exist or cannot be read.
    #[error("volume root {}: {source}", root.display())]
    Root {
        /// The volume root.
        root: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A volume's directory does not exist or cannot be read.
    #[error("volume `{volume}`: {}: {source}", path.display())]
    Unavailable {
        /// The volume's name.
        volume: String,
        /// The directory it names.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A volume's directory resolves (through a symlink) outside the
    /// tenant's volume root.
    #[error("volume `{volume}`: {} resolves to {}, outside the tenant's volume root", path.display(), target.display())]
    Escapes {
        /// The volume's name.
        volume: String,
        /// The directory it names.
        path: PathBuf,
        /// Where that really is.
        target: PathBuf,
    },
    /// A volume names a file, not a directory.
    #[error("volume `{volume}`: {} is not a directory", path.display())]
    NotADirectory {
        /// The volume's name.
        volume: String,
        /// What it names.
        path: PathBuf,
    },
}

/// A backend of the GPU bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuBackend {
    /// The bridge's CPU implementation.
    Cpu,
    /// Vulkan, Metal or DX12 through wgpu.
    Wgpu,
    /// NVIDIA CUDA.
    Cuda,
}

impl GpuBackend {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }
}

impl fmt::Display for GpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a tenant may do through the `gust:gpu` bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPolicy {
    /// Backends the tenant's tensors and models may run on; empty means no
    /// GPU-bridge access at all.
    pub backends: Vec<GpuBackend>,
    /// Device memory the tenant may hold at once, in MiB.
    pub memory_mb: u64,
    /// Device time the tenant may use per minute of wall-clock time, in ms.
    pub time_ms_per_minute: u64,
    /// Models the tenant may load, by name; empty means none.
    pub models: Vec<String>,
}

impl Default for GpuPolicy {
    fn default() -> Self {
        Self {
            backends: vec![GpuBackend::Cpu],
            memory_mb: 1024,
            // A quarter of a device: one tenant's sustained load leaves the rest
            // to others (see `gust_gpu_bridge::DEFAULT_TIME_PER_MINUTE`).
            time_ms_per_minute: 15_000,
            models: Vec::new(),
        }
    }
}

impl GpuPolicy {
    /// Whether the tenant may use `backend`.
    pub fn allows_backend(&self, backend: GpuBackend) -> bool {
        self.backends.contains(&backend)
    }

    /// Whether the tenant may load the model called `name`.
    pub fn allows_model(&self, name: &str) -> bool {
        self.models.iter().any(|m| m == name)
    }
}

/// A directory of the tenant's volume root made visible to its functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The volume's name (unique within a policy).
    pub name: String,
    /// The directory, relative to the tenant's volume root and normalised
    /// (no `.` or `..` components; empty for the root itself).
    pub path: PathBuf,
    /// Where the guest sees it: an absolute, normalised guest path (unique
    /// within a policy).
    pub mount: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

/// A [`Volume`] resolved to a real directory, ready to be preopened.
#[derive(Debug, Clone)]
pub struct ResolvedVolume {
    /// The volume's name.
    pub name: String,
    /// The canonical host directory (symlinks resolved), inside the
    /// tenant's volume root: for messages. What the guest gets is `dir`.
    pub host_path: PathBuf,
    /// The directory itself, opened beneath the tenant's volume root
    /// (no `..` or symlink could lead it outside) when the volume was
    /// resolved. Handing the guest this handle rather than `host_path`
    /// closes the window in which the path could be swapped for a symlink.
    pub dir: Arc<cap_std::fs::Dir>,
    /// The guest path.
    pub mount: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

/// The volume root of `tenant`: `<data-dir>/volumes/<tenant>/`, or `None`
/// if `tenant` is not a valid name (which could otherwise name `..`).
pub fn volume_root(data_dir: &Path, tenant: &str) -> Option<PathBuf> {
    valid_name(tenant).then(|| data_dir.join("volumes").join(tenant))
}

/// The effective policy of one tenant.
#[derive(Clone, PartialEq, Eq)]
pub struct Policy {
    /// Wall-clock budget of one invocation, in milliseconds.
    pub timeout_ms: u64,
    /// Linear memory one invocation may hold, in MiB.
    pub memory_mb: u64,
    /// Invocations of the tenant's functions that may run at once; more are
    /// answered `429`.
    pub max_concurrency: u32,
    /// Invocations of the tenant's public functions by anonymous callers
    /// (no key, or another tenant's) that may run at once: a budget of
    /// their own, so strangers cannot take the tenant's `max_concurrency`.
    pub max_anonymous_concurrency: u32,
    /// Long-lived requests (maps, WebSocket sessions) the tenant may have
    /// open at once; each holds buffers and a connection for as long as
    /// its caller keeps it.
    pub max_streams: u32,
    /// Jobs (`spawn`) that may wait in the tenant's queue; more are
    /// answered `429`.
    pub max_queued_jobs: u64,
    /// Finished jobs (their results) kept for the tenant; beyond it the
    /// oldest are removed before their retention ends.
    pub max_stored_jobs: u64,
    /// Bytes the tenant's finished jobs may keep together (inputs, results,
    /// errors); beyond it the oldest are removed.
    pub max_stored_job_bytes: u64,
    /// Calls of one function that one instance may serve, one after the
    /// other (instance reuse); 0 or 1: a fresh instance for every call.
    pub reuse_instances: u32,
    /// Fresh instances of each function kept ready, made off the request
    /// path before the calls that take them come; 0: none.
    pub ready_instances: u32,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Largest component upload, in bytes.
    pub max_component_bytes: u64,
    /// Functions the tenant may have deployed at once.
    pub max_functions: u64,
    /// Bytes the tenant's deployed components may take together (each
    /// function's current version counts its size).
    pub max_storage_bytes: u64,
    /// Captured stdout, and separately stderr, kept per invocation, in bytes.
    pub log_bytes: u64,
    /// Environment variables granted to the tenant's functions, sorted by
    /// name.
    pub env: Arc<[(String, String)]>,
    /// Directories of the tenant's volume root visible to its functions.
    pub volumes: Vec<Volume>,
    /// Where the tenant's functions may send HTTP requests; empty: nowhere.
    /// Shared so every call's [`OutboundPolicy`] can hold it without copying.
    pub outbound_http: Arc<[OutboundRule]>,
    /// Secrets the tenant may keep (`PUT /v1/secrets/{name}`).
    pub max_secrets: u64,
    /// Whether names in `outbound_http` may lead to private addresses
    /// (loopback, private, link-local, unique-local…); without it only
    /// address rules open those. Never the clouds' metadata services.
    pub outbound_private: bool,
    /// GPU-bridge quotas.
    pub gpu: GpuPolicy,
    /// Configuration values every function of the tenant reads through
    /// `wasi:config/store`, sorted by key (a function's own values win).
    pub config: Arc<[(String, String)]>,
    /// Key-value buckets (`wasi:keyvalue`, `/v1/kv`) holding keys, at most;
    /// 0: the tenant has no key-value store.
    pub kv_max_buckets: u64,
    /// Keys in one bucket, at most.
    pub kv_max_keys: u64,
    /// Bytes of all keys and values of all buckets together, at most.
    pub kv_max_bytes: u64,
}

impl Default for Policy {
    /// The built-in defaults: what applies when there is no policy file.
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            memory_mb: 128,
            max_concurrency: 16,
            max_anonymous_concurrency: 8,
            max_streams: 16,
            max_queued_jobs: 100,
            max_stored_jobs: 1000,
            max_stored_job_bytes: 256 * MIB,
            reuse_instances: 0,
            ready_instances: 1,
            max_body_bytes: 10 * MIB,
            max_component_bytes: 64 * MIB,
            max_functions: 100,
            max_storage_bytes: GIB,
            log_bytes: 64 * KIB,
            env: Arc::new([]),
            volumes: Vec::new(),
            outbound_http: Arc::new([]),
            outbound_private: false,
            max_secrets: 100,
            gpu: GpuPolicy::default(),
            config: Arc::new([]),
            kv_max_buckets: 16,
            kv_max_keys: 100_000,
            kv_max_bytes: 64 * MIB,
        }
    }
}

// Hand-written so that logging a policy never prints env values, which often
// carry credentials.
impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct EnvNames<'a>(&'a [(String, String)]);
        impl fmt::Debug for EnvNames<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, _)| (k, "<redacted>")))
                    .finish()
            }
        }
        f.debug_struct("Policy")
            .field("timeout_ms", &self.timeout_ms)
            .field("memory_mb", &self.memory_mb)
            .field("max_concurrency", &self.max_concurrency)
            .field("max_anonymous_concurrency", &self.max_anonymous_concurrency)
            .field("max_streams", &self.max_streams)
            .field("max_queued_jobs", &self.max_queued_jobs)
            .field("max_stored_jobs", &self.max_stored_jobs)
            .field("max_stored_job_bytes", &self.max_stored_job_bytes)
            .field("reuse_instances", &self.reuse_instances)
            .field("ready_instances", &self.ready_instances)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_component_bytes", &self.max_component_bytes)
            .field("max_functions", &self.max_functions)
            .field("max_storage_bytes", &self.max_storage_bytes)
            .field("log_bytes", &self.log_bytes)
            .field("env", &EnvNames(&self.env))
            .field("volumes", &self.volumes)
            .field("outbound_http", &self.outbound_http)
            .field("outbound_private", &self.outbound_private)
            .field("max_secrets", &self.max_secrets)
            .field("gpu", &self.gpu)
            .field("config", &EnvNames(&self.config))
            .field("kv_max_buckets", &self.kv_max_buckets)
            .field("kv_max_keys", &self.kv_max_keys)
            .field("kv_max_bytes", &self.kv_max_bytes)
            .finish()
    }
}

impl Policy {
    /// The per-invocation timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The per-invocation memory limit in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb.saturating_mul(MIB)
    }

    /// The runtime limits of one invocation of `function` of `tenant`
    /// under this policy: timeout, memory, env, `log_bytes` for stdout and
    /// stderr each, `outbound_http` as the outbound policy, and instance
    /// reuse scoped to the function. Volumes are not part of
    /// [`CallLimits`] yet: see [`Policy::resolve_volumes`].
    pub fn call_limits(&self, tenant: &str, function: &str) -> CallLimits {
        let log_bytes = usize::try_from(self.log_bytes).unwrap_or(usize::MAX);
        CallLimits {
            timeout: self.timeout(),
            memory_bytes: self.memory_bytes(),
            env: Arc::clone(&self.env),
            config: Arc::clone(&self.config),
            stdout_limit: log_bytes,
            stderr_limit: log_bytes,
            outbound: self.outbound_policy(),
            reuse: (self.reuse_instances > 1).then(|| crate::runtime::Reuse {
                scope: crate::runtime::Reuse::scope_of(tenant, function),
                max_uses: self.reuse_instances,
            }),
            ready: (self.ready_instances > 0).then(|| crate::runtime::Ready {
                scope: crate::runtime::Reuse::scope_of(tenant, function),
                count: self.ready_instances,
            }),
            ..CallLimits::default()
        }
    }

    /// `outbound_http` and `outbound_private` in the form the runtime
    /// checks; denies everything when the list is empty.
    pub fn outbound_policy(&self) -> OutboundPolicy {
        OutboundPolicy::new(Arc::clone(&self.outbound_http), self.outbound_private)
    }

    /// Whether the tenant's functions may send a request by name to `host`
    /// on `port`, over HTTPS or plain HTTP (see [`OutboundRule`]); the
    /// addresses the name resolves to are checked when the request is sent.
    pub fn allows_outbound(&self, https: bool, host: &str, port: u16) -> bool {
        self.outbound_http
            .iter()
            .any(|r| r.matches(https, host, port))
    }

    /// Resolves the policy's volumes against the tenant's volume root
    /// (see [`volume_root`]) to canonical host directories, refusing any
    /// that does not exist, is not a directory, or leads (through a symlink)
    /// outside the root. Directories are not created: that would follow
    /// symlinks too.
    ///
    /// Each directory is opened here, with cap-std from a handle on the
    /// root (resolution cannot leave it, whatever symlinks say), and the
    /// guest is given that open directory: a path checked now and opened
    /// later could be swapped for a symlink in between.
    pub fn resolve_volumes(&self, root: &Path) -> Result<Vec<ResolvedVolume>, VolumeError> {
        let root = fs::canonicalize(root).map_err(|source| VolumeError::Root {
            root: root.to_path_buf(),
            source,
        })?;
        if self.volumes.is_empty() {
            return Ok(Vec::new());
        }
        let root_dir = cap_std::fs::Dir::open_ambient_dir(&root, cap_std::ambient_authority())
            .map_err(|source| VolumeError::Root {
                root: root.clone(),
                source,
            })?;
        self.volumes
            .iter()
            .map(|volume| {
                let path = root.join(&volume.path);
                let beneath = if volume.path.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    volume.path.as_path()
                };
                let opened = root_dir.open_dir(beneath);
                let target = match fs::canonicalize(&path) {
                    Ok(target) => target,
                    Err(source) => {
                        return Err(VolumeError::Unavailable {
                            volume: volume.name.clone(),
                            path,
                            source,
                        });
                    }
                };
                // Component-wise, so `/v/acme-evil` is not inside `/v/acme`.
                if !target.starts_with(&root) {
                    return Err(VolumeError::Escapes {
                        volume: volume.name.clone(),
                        path,
                        target,
                    });
                }
                if !target.is_dir() {
                    return Err(VolumeError::NotADirectory {
                        volume: volume.name.clone(),
                        path,
                    });
                }
                // The checks above explain the usual failures; the open is
                // what counts (the tree may have changed in between).
                let dir = opened.map_err(|source| VolumeError::Unavailable {
                    volume: volume.name.clone(),
                    path: path.clone(),
                    source,
                })?;
                Ok(ResolvedVolume {
                    name: volume.name.clone(),
                    host_path: target,
                    dir: Arc::new(dir),
                    mount: volume.mount.clone(),
                    read_only: volume.read_only,
                })
            })
            .collect()
    }

    /// This policy with the keys set in the TOML document `text` replaced:
    /// how `default.toml` applies to the built-in defaults and
    /// `<tenant>.toml` to the default. `file` names the document in errors.
    pub fn with_overrides(&self, file: &Path, text: &str) -> Result<Policy, InvalidPolicy> {
        let doc = Doc { file, text };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| doc.toml_error(&e))?;
        let mut policy = self.clone();
        if let Some(v) = raw.timeout_ms {
            policy.timeout_ms = doc.in_range("timeout_ms", v, TIMEOUT_MS_RANGE)?;
        }
        if let Some(v) = raw.memory_mb {
            policy.memory_mb = doc.in_range("memory_mb", v, MEMORY_MB_RANGE)?;
        }
        if let Some(v) = raw.max_concurrency {
            let span = v.span();
            let n = doc.in_range("max_concurrency", v, MAX_CONCURRENCY_RANGE)?;
            policy.max_concurrency = u32::try_from(n)
                .map_err(|_| doc.error(span, "max_concurrency", "does not fit in 32 bits"))?;
        }
        if let Some(v) = raw.max_anonymous_concurrency {
            let span = v.span();
            let n = doc.in_range("max_anonymous_concurrency", v, MAX_CONCURRENCY_RANGE)?;
            policy.max_anonymous_concurrency = u32::try_from(n).map_err(|_| {
                doc.error(span, "max_anonymous_concurrency", "does not fit in 32 bits")
            })?;
        }
        if let Some(v) = raw.max_streams {
            let span = v.span();
            let n = doc.in_range("max_streams", v, MAX_CONCURRENCY_RANGE)?;
            policy.max_streams = u32::try_from(n)
                .map_err(|_| doc.error(span, "max_streams", "does not fit in 32 bits"))?;
        }
        if let Some(v) = raw.max_queued_jobs {
            policy.max_queued_jobs = doc.in_range("max_queued_jobs", v, MAX_QUEUED_JOBS_RANGE)?;
        }
        if let Some(v) = raw.max_stored_jobs {
            policy.max_stored_jobs = doc.in_range("max_stored_jobs", v, MAX_STORED_JOBS_RANGE)?;
        }
        if let Some(v) = raw.max_stored_job_bytes {
            policy.max_stored_job_bytes =
                doc.bytes_in_range("max_stored_job_bytes", v, MAX_STORED_JOB_BYTES_RANGE)?;
        }
        if let Some(v) = raw.reuse_instances {
            let n = doc.in_range("reuse_instances", v, REUSE_INSTANCES_RANGE)?;
            // The range keeps it within 32 bits.
            policy.reuse_instances = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(v) = raw.ready_instances {
            let n = doc.in_range("ready_instances", v, READY_INSTANCES_RANGE)?;
            policy.ready_instances = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(v) = raw.max_body_bytes {
            policy.max_body_bytes =
                doc.bytes_in_range("max_body_bytes", v, MAX_BODY_BYTES_RANGE)?;
        }
        if let Some(v) = raw.max_component_bytes {
            policy.max_component_bytes =
                doc.bytes_in_range("max_component_bytes", v, MAX_COMPONENT_BYTES_RANGE)?;
        }
        if let Some(v) = raw.max_functions {
            policy.max_functions = doc.in_range("max_functions", v, MAX_FUNCTIONS_RANGE)?;
        }
        if let Some(v) = raw.max_storage_bytes {
            policy.max_storage_bytes =
                doc.bytes_in_range("max_storage_bytes", v, MAX_STORAGE_BYTES_RANGE)?;
        }
        if let Some(v) = raw.log_bytes {
            policy.log_bytes = doc.bytes_in_range("log_bytes", v, LOG_BYTES_RANGE)?;
        }
        if let Some(env) = raw.env {
            policy.env = doc.env(env)?;
        }
        if let Some(volumes) = raw.volumes {
            policy.volumes = doc.volumes(volumes)?;
        }
        if let Some(rules) = raw.outbound_http {
            policy.outbound_http = rules
                .into_iter()
                .enumerate()
                .map(|(i, rule)| {
                    rule.get_ref()
                        .parse::<OutboundRule>()
                        .map_err(|e| doc.error(rule.span(), format!("outbound_http[{i}]"), e))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = raw.max_secrets {
            policy.max_secrets = doc.in_range("max_secrets", v, MAX_SECRETS_RANGE)?;
        }
        if let Some(private) = raw.outbound_private {
            policy.outbound_private = private;
        }
        if let Some(gpu) = raw.gpu {
            doc.gpu(gpu, &mut policy.gpu)?;
        }
        if let Some(config) = raw.config {
            policy.config = doc.config(config)?;
        }
        if let Some(v) = raw.kv_max_buckets {
            policy.kv_max_buckets = doc.in_range("kv_max_buckets", v, KV_MAX_BUCKETS_RANGE)?;
        }
        if let Some(v) = raw.kv_max_keys {
            policy.kv_max_keys = doc.in_range("kv_max_keys", v, KV_MAX_KEYS_RANGE)?;
        }
        if let Some(v) = raw.kv_max_bytes {
            policy.kv_max_bytes = doc.bytes_in_range("kv_max_bytes", v, KV_MAX_BYTES_RANGE)?;
        }
        Ok(policy)
    }
}

/// The policies of all tenants: a default plus per-tenant overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    default: Policy,
    tenants: BTreeMap<String, Policy>,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::builtin()
    }
}

impl PolicySet {
    /// The built-in defaults for every tenant, no overrides.
    pub fn builtin() -> Self {
        Self {
            default: Policy::default(),
            tenants: BTreeMap::new(),
        }
    }

    /// Loads `dir/default.toml` and every `dir/<tenant>.toml`. Other files
    /// (`README.md`, subdirectories, dotfiles such as editor swap files) are
    /// ignored. A missing directory or `default.toml` means built-in
    /// defaults, logged as a warning; any invalid file is an error.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PolicyError::Read { path, source }
        };
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(
                    dir = %dir.display(),
                    "policy directory does not exist; every tenant gets the built-in defaults"
                );
                return Ok(Self::builtin());
            }
            Err(e) => return Err(read_err(dir)(e)),
        };

        let mut tenant_files = Vec::new();
        for entry in entries {
            let path = entry.map_err(read_err(dir))?.path();
            let Some(file_name) = path.file_name() else {
                continue;
            };
            if path.extension() != Some(OsStr::new("toml"))
                || file_name.as_encoded_bytes().starts_with(b".")
                || file_name == DEFAULT_FILE
                || path.is_dir()
            {
                continue;
            }
            match path.file_stem().and_then(OsStr::to_str) {
                Some(tenant) if valid_name(tenant) => {
                    tenant_files.push((tenant.to_owned(), path.clone()));
                }
                // A typo such as `Acme.toml` would otherwise silently give
                // the tenant the default policy.
                _ => return Err(PolicyError::BadFileName { path }),
            }
        }
        tenant_files.sort();

        let default_path = dir.join(DEFAULT_FILE);
        let default = match fs::read_to_string(&default_path) {
            Ok(text) => Policy::default().with_overrides(&default_path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(
                    path = %default_path.display(),
                    "no default policy file; using the built-in defaults as the default policy"
                );
                Policy::default()
            }
            Err(e) => return Err(read_err(&default_path)(e)),
        };

        let mut tenants = BTreeMap::new();
        for (tenant, path) in tenant_files {
            let text = fs::read_to_string(&path).map_err(read_err(&path))?;
            let policy = default.with_overrides(&path, &text)?;
            tenants.insert(tenant, policy);
        }
        tracing::info!(
            dir = %dir.display(),
            overrides = tenants.len(),
            "loaded tenant policies"
        );
        Ok(Self { default, tenants })
    }

    /// The policy of `tenant`: its override if it has one, else the default.
    pub fn for_tenant(&self, tenant: &str) -> &Policy {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// The policy of tenants without an override file.
    pub fn default_policy(&self) -> &Policy {
        &self.default
    }

    /// Tenants with an override file, in name order (they need not exist).
    pub fn overridden_tenants(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }
}

// ---------------------------------------------------------------------------
// The file format. Every key is optional (files are partial) and spanned, so
// that semantic errors can point at the exact line.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    timeout_ms: Option<Spanned<u64>>,
    memory_mb: Option<Spanned<u64>>,
    max_concurrency: Option<Spanned<u64>>,
    max_anonymous_concurrency: Option<Spanned<u64>>,
    max_streams: Option<Spanned<u64>>,
    max_queued_jobs: Option<Spanned<u64>>,
    max_stored_jobs: Option<Spanned<u64>>,
    max_stored_job_bytes: Option<Spanned<ByteCount>>,
    reuse_instances: Option<Spanned<u64>>,
    ready_instances: Option<Spanned<u64>>,
    max_body_bytes: Option<Spanned<ByteCount>>,
    max_component_bytes: Option<Spanned<ByteCount>>,
    max_functions: Option<Spanned<u64>>,
    max_storage_bytes: Option<Spanned<ByteCount>>,
    log_bytes: Option<Spanned<ByteCount>>,
    env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    volumes: Option<Vec<RawVolume>>,
    outbound_http: Option<Vec<Spanned<String>>>,
    outbound_private: Option<bool>,
    max_secrets: Option<Spanned<u64>>,
    gpu: Option<RawGpu>,
    config: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    kv_max_buckets: Option<Spanned<u64>>,
    kv_max_keys: Option<Spanned<u64>>,
    kv_max_bytes: Option<Spanned<ByteCount>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    path: Spanned<String>,
    mount: Spanned<String>,
    read_only: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    backends: Option<Vec<Spanned<GpuBackend>>>,
    memory_mb: Option<Spanned<u64>>,
    time_ms_per_minute: Option<Spanned<u64>>,
    models: Option<Vec<Spanned<String>>>,
}

/// A byte count written as an integer (`10485760`) or a string with a unit
/// (`"10 MiB"`, `"64KiB"`; `KB`/`MB` are powers of 1000).
struct ByteCount(u64);

impl<'de> Deserialize<'de> for ByteCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ByteCountVisitor;
        impl Visitor<'_> for ByteCountVisitor {
            type Value = ByteCount;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte count: an integer or a string such as \"10 MiB\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteCount, E> {
                Ok(ByteCount(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteCount, E> {
                u64::try_from(v)
                    .map(ByteCount)
                    .map_err(|_| E::custom("a byte count cannot be negative"))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteCount, E> {
                v.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|b| ByteCount(b.as_u64()))
                    .map_err(|_| {
                        E::custom(format!(
                            "{v:?} is not a byte count (write an integer, or a number and a unit such as \"10 MiB\")"
                        ))
                    })
            }
        }
        deserializer.deserialize_any(ByteCountVisitor)
    }
}

/// One policy file being checked: turns spans into [`InvalidPolicy`]s.
struct Doc<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Doc<'_> {
    fn error(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl fmt::Display,
    ) -> InvalidPolicy {
        InvalidPolicy {
            file: self.file.to_path_buf(),
            location: Some(location(self.text, span.start)),
            key: Some(key.into()),
            message: message.to_string(),
        }
    }

    /// Turns a parse or deserialisation error into one naming the key: toml
    /// reports only a span, so find which key's name or value it falls in.
    fn toml_error(&self, error: &toml::de::Error) -> InvalidPolicy {
        let offset = error.span().map(|span| span.start);
        InvalidPolicy {
            file: self.file.to_path_buf(),
            location: offset.map(|o| location(self.text, o)),
            key: offset.and_then(|o| locate_key(self.text, o)),
            message: error.message().trim().replace('\n', "; "),
        }
    }

    fn in_range(
        &self,
        key: &str,
        value: Spanned<u64>,
        range: RangeInclusive<u64>,
    ) -> Result<u64, InvalidPolicy> {
        let (span, v) = (value.span(), value.into_inner());
        if range.contains(&v) {
            return Ok(v);
        }
        let (lo, hi) = range.into_inner();
        let message = if hi >= u64::from(u32::MAX) {
            format!("must be at least {lo}, got {v}")
        } else {
            format!("must be between {lo} and {hi}, got {v}")
        };
        Err(self.error(span, key, message))
    }

    fn bytes_in_range(
        &self,
        key: &str,
        value: Spanned<ByteCount>,
        range: RangeInclusive<u64>,
    ) -> Result<u64, InvalidPolicy> {
        let (span, ByteCount(v)) = (value.span(), value.into_inner());
        if range.contains(&v) {
            return Ok(v);
        }
        let (lo, hi) = range.into_inner();
        Err(self.error(
            span,
            key,
            format!(
                "must be between {} and {}, got {}",
                human_bytes(lo),
                human_bytes(hi),
                human_bytes(v)
            ),
        ))
    }

    fn env(
        &self,
        env: BTreeMap<Spanned<String>, Spanned<String>>,
    ) -> Result<Arc<[(String, String)]>, InvalidPolicy> {
        env.into_iter()
            .map(|(name, value)| {
                let key = format!("env.{}", toml_key(name.get_ref()));
                if name.get_ref().is_empty() {
                    return Err(self.error(name.span(), key, "a variable name cannot be empty"));
                }
                if name.get_ref().contains(['=', '\0']) {
                    return Err(self.error(
                        name.span(),
                        key,
                        "a variable name cannot contain `=` or NUL",
                    ));
                }
                if value.get_ref().contains('\0') {
                    return Err(self.error(value.span(), key, "a value cannot contain NUL"));
                }
                Ok((name.into_inner(), value.into_inner()))
            })
            .collect()
    }

    fn config(
        &self,
        config: BTreeMap<Spanned<String>, Spanned<String>>,
    ) -> Result<Arc<[(String, String)]>, InvalidPolicy> {
        config
            .into_iter()
            .map(|(name, value)| {
                let key = format!("config.{}", toml_key(name.get_ref()));
                if !valid_config_key(name.get_ref()) {
                    return Err(self.error(
                        name.span(),
                        key,
                        format!(
                            "a configuration key is 1 to {MAX_CONFIG_KEY_LEN} ASCII letters, digits, `_`, `.` or `-`"
                        ),
                    ));
                }
                if value.get_ref().len() > MAX_CONFIG_VALUE_BYTES {
                    return Err(self.error(
                        value.span(),
                        key,
                        format!("a configuration value is at most {MAX_CONFIG_VALUE_BYTES} bytes"),
                    ));
                }
                Ok((name.into_inner(), value.into_inner()))
            })
            .collect()
    }

    fn volumes(&self, raw: Vec<RawVolume>) -> Result<Vec<Volume>, InvalidPolicy> {
        let mut names = BTreeSet::new();
        let mut mounts = BTreeSet::new();
        let mut volumes = Vec::with_capacity(raw.len());
        for (i, v) in raw.into_iter().enumerate() {
            let key = |field: &str| format!("volumes[{i}].{field}");
            let name = v.name.get_ref();
            if !valid_name(name) {
                return Err(self.error(
                    v.name.span(),
                    key("name"),
                    format!("{name:?} is not a valid name (^[a-z0-9][a-z0-9-]{{0,62}}$)"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(self.error(
                    v.name.span(),
                    key("name"),
                    format!("a volume named {name:?} is already defined"),
                ));
            }
            let path = volume_path(v.path.get_ref())
                .map_err(|msg| self.error(v.path.span(), key("path"), msg))?;
            let mount = guest_mount(v.mount.get_ref())
                .map_err(|msg| self.error(v.mount.span(), key("mount"), msg))?;
            if !mounts.insert(mount.clone()) {
                return Err(self.error(
                    v.mount.span(),
                    key("mount"),
                    format!("another volume is already mounted at {mount:?}"),
                ));
            }
            // A volume inside another would let a function that can write
            // the outer one replace the inner one's directory (with a
            // symlink, say) under the host's feet.
            if let Some(outer) = volumes
                .iter()
                .find(|o: &&Volume| path.starts_with(&o.path) || o.path.starts_with(&path))
            {
                return Err(self.error(
                    v.path.span(),
                    key("path"),
                    format!(
                        "{:?} and volume {:?} ({:?}) are nested: volumes must not contain one another",
                        display_volume_path(&path),
                        outer.name,
                        display_volume_path(&outer.path)
                    ),
                ));
            }
            volumes.push(Volume {
                name: v.name.into_inner(),
                path,
                mount,
                read_only: v.read_only.unwrap_or(true),
            });
        }
        Ok(volumes)
    }

    fn gpu(&self, raw: RawGpu, gpu: &mut GpuPolicy) -> Result<(), InvalidPolicy> {
        if let Some(backends) = raw.backends {
            let mut seen = Vec::with_capacity(backends.len());
            for (i, backend) in backends.into_iter().enumerate() {
                let b = *backend.get_ref();
                if seen.contains(&b) {
                    return Err(self.error(
                        backend.span(),
                        format!("gpu.backends[{i}]"),
                        format!("\"{b}\" is listed twice"),
                    ));
                }
                seen.push(b);
            }
            gpu.backends = seen;
        }
        if let Some(v) = raw.memory_mb {
            gpu.memory_mb = self.in_range("gpu.memory_mb", v, GPU_MEMORY_MB_RANGE)?;
        }
        if let Some(v) = raw.time_ms_per_minute {
            gpu.time_ms_per_minute =
                self.in_range("gpu.time_ms_per_minute", v, GPU_TIME_MS_PER_MINUTE_RANGE)?;
        }
        if let Some(models) = raw.models {
            let mut names: Vec<String> = Vec::with_capacity(models.len());
            for (i, model) in models.into_iter().enumerate() {
                let key = format!("gpu.models[{i}]");
                let name = model.get_ref();
                if name.is_empty()
                    || name.len() > MAX_MODEL_NAME_LEN
                    || name.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(self.error(
                        model.span(),
                        key,
                        format!(
                            "a model name is 1 to {MAX_MODEL_NAME_LEN} characters without whitespace"
                        ),
                    ));
                }
                if names.contains(name) {
                    return Err(self.error(model.span(), key, format!("{name:?} is listed twice")));
                }
                names.push(model.into_inner());
            }
            gpu.models = names;
        }
        Ok(())
    }
}

/// Checks a volume's `path` and normalises it: relative, with no `..`, so it
/// cannot name anything outside the tenant's volume root (symlinks are
/// checked when it is resolved).
/// A normalised volume path as a policy writes it (`.` for the root).
fn display_volume_path(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        path.display().to_string()
    }
}

fn volume_path(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("must not be empty (use \".\" for the whole volume root)".to_owned());
    }
    if path.contains('\0') {
        return Err("must not contain NUL".to_owned());
    }
    let mut normal = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "{path:?} contains `..`: a volume must stay inside the tenant's volume root"
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "{path:?} is absolute: a volume path is relative to the tenant's volume root (<data-dir>/volumes/<tenant>/)"
                ));
            }
        }
    }
    Ok(normal)
}

/// Checks a volume's guest `mount`: an absolute path with no empty, `.` or
/// `..` segments (and no trailing slash), so two spellings of one directory
/// cannot both pass the uniqueness check.
fn guest_mount(mount: &str) -> Result<String, String> {
    let Some(rest) = mount.strip_prefix('/') else {
        return Err(format!(
            "{mount:?} must be an absolute guest path such as \"/data\""
        ));
    };
    if mount.contains('\0') {
        return Err("must not contain NUL".to_owned());
    }
    if !rest.is_empty()
        && rest
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!(
            "{mount:?} must be a normalised path (no `//`, `.`, `..` or trailing `/`)"
        ));
    }
    Ok(mount.to_owned())
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn location(text: &str, offset: usize) -> Location {
    let offset = floor_char_boundary(text, offset);
    let before = text.get(..offset).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before.get(line_start..).unwrap_or_default().chars().count() + 1,
    }
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The dotted path of the key whose name or value contains byte `offset`,
/// the most specific one if several do.
fn locate_key(text: &str, offset: usize) -> Option<String> {
    let (tree, _errors) = DeTable::parse_recoverable(text);
    let mut best = None;
    walk_table(tree.get_ref(), None, offset, &mut best);
    best.map(|(_, key)| key)
        .or_else(|| key_on_line(text, offset))
}

fn walk_table(
    table: &DeTable<'_>,
    prefix: Option<&str>,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    for (key, value) in table.iter() {
        let segment = toml_key(key.get_ref());
        let path = match prefix {
            Some(prefix) => format!("{prefix}.{segment}"),
            None => segment,
        };
        consider(key.span(), &path, offset, best);
        consider(value.span(), &path, offset, best);
        walk_value(value.get_ref(), &path, offset, best);
    }
}

fn walk_value(value: &DeValue<'_>, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
    match value {
        DeValue::Table(table) => walk_table(table, Some(path), offset, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                consider(item.span(), &path, offset, best);
                walk_value(item.get_ref(), &path, offset, best);
            }
        }
        _ => {}
    }
}

/// Keeps `path` if `span` holds `offset` and is no wider than the best so
/// far; ties go to the later (deeper) key, since parents are visited first.
fn consider(span: Range<usize>, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
    let hit = span.contains(&offset) || (span.is_empty() && span.start == offset);
    let width = span.len();
    if hit && best.as_ref().is_none_or(|(w, _)| width <= *w) {
        *best = Some((width, path.to_owned()));
    }
}

/// Fallback for syntax errors the parser could not attach to a key (a
/// duplicate key, say): the bare key written at the start of the error's
/// line, prefixed with the nearest table header above it.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(text, offset);
    let line_start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (lhs, _) = line.split_once('=')?;
    let bare = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let key = lhs.trim();
    if !bare(key) {
        return None;
    }
    let header = text
        .get(..line_start)?
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|l| l.trim_start_matches('[').split(']').next())
        .map(str::trim)
        .filter(|h| bare(h));
    Some(match header {
        Some(header) => format!("{header}.{key}"),
        None => key.to_owned(),
    })
}

/// A key as written in TOML: bare if it can be, else quoted.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// Exact human form of a byte count: `10 MiB` where that is exact, else
/// bytes.
fn human_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    match n {
        1 => "1 byte".to_owned(),
        n => format!("{n} bytes"),
    }
}
