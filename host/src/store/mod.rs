//! Persistent state behind traits, so a shared database can replace the
//! embedded one: tenants, API-key hashes, functions and their versions,
//! invocation records ([`MetaStore`]), and component blobs ([`BlobStore`]).
//!
//! [`sled::SledStore`] is the single-node implementation of `MetaStore`;
//! [`FsBlobStore`] keeps blobs as content-addressed files.
//! [`postgres::PgStore`] and [`postgres::PgBlobStore`] keep both in one
//! PostgreSQL database that several hosts share.

mod blobs;
pub mod kv;
pub mod migrate;
pub mod postgres;
pub mod sled;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use self::blobs::{BlobStore, FsBlobStore};
pub use self::kv::{KvBucket, KvLimits, KvRefused, KvStore, KvWrite};

/// Milliseconds since the Unix epoch.
pub type UnixMillis = u64;

/// The current time as [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Errors of the stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The item already exists (e.g. a tenant name).
    #[error("{0} already exists")]
    Conflict(String),
    /// The item a write depends on does not exist (e.g. the tenant of a key).
    #[error("{0} does not exist")]
    Missing(String),
    /// The database failed.
    #[error("store backend: {0}")]
    Backend(#[from] BackendError),
    /// A stored record could not be decoded (corruption or a format change).
    #[error("corrupt record {key}: {message}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What was wrong.
        message: String,
        /// The decoding error, when one said so.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// Bytes given to [`BlobStore::put`] do not hash to the digest they
    /// were given under.
    #[error("blob digest mismatch: expected {expected}, the bytes hash to {actual}")]
    DigestMismatch {
        /// The digest the caller named (`sha256:<hex>`).
        expected: String,
        /// The digest of the bytes (`sha256:<hex>`).
        actual: String,
    },
    /// A blob file could not be read or written.
    #[error("blob store at {path}: {source}")]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the disk is full (or the quota of the data directory's
    /// filesystem used up): the caller is told so (507) rather than given a
    /// generic host error, and what was acknowledged before stays.
    pub fn is_out_of_space(&self) -> bool {
        if let Self::Backend(BackendError::Postgres(error)) = self {
            return error.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL);
        }
        let io = match self {
            Self::Io { source, .. } => Some(source),
            Self::Backend(BackendError::Sled(::sled::Error::Io(source))) => Some(source),
            _ => None,
        };
        io.is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        })
    }

    /// Whether the store could not be reached at all (the database is down
    /// or cut off, its connections are used up, it is shutting down), as
    /// opposed to refusing or failing this one operation: worth trying again
    /// later (503), and what the host has cached still serves meanwhile.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Backend(BackendError::Postgres(error)) => postgres_unreachable(error),
            Self::Backend(BackendError::Pool(_) | BackendError::Task(_) | BackendError::Closed) => {
                true
            }
            Self::Backend(BackendError::Batch { unavailable, .. }) => *unavailable,
            _ => false,
        }
    }
}

/// Whether a PostgreSQL error is about reaching the server rather than a
/// statement: a lost or refused connection, or SQLSTATE class 08
/// (connection exception), 57P01–57P03 (shutting down, cannot connect
/// now), 53300 (too many connections).
pub(crate) fn postgres_unreachable(error: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    if error.is_closed() {
        return true;
    }
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    // No answer from the server: an I/O error (refused, reset, timed out).
    error
        .source()
        .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some())
}

/// Why the database failed (see [`StoreError::Backend`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// sled itself failed (I/O, corruption of its files).
    #[error(transparent)]
    Sled(#[from] ::sled::Error),
    /// The database was written by a build with another record format.
    #[error("{}: metadata format {found:?}, this build reads {expected:?}", path.display())]
    Format {
        /// The database's directory.
        path: std::path::PathBuf,
        /// The format it records.
        found: String,
        /// The format this build reads and writes.
        expected: String,
    },
    /// A function's version counter is exhausted.
    #[error("function {tenant}/{name}: version overflow")]
    VersionOverflow {
        /// The function's tenant.
        tenant: String,
        /// The function's name.
        name: String,
    },
    /// A record could not be encoded.
    #[error("encoding a record: {0}")]
    Encode(#[source] serde_json::Error),
    /// PostgreSQL answered with an error, or the connection failed.
    #[error("postgres: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("postgres connection pool: {0}")]
    Pool(String),
    /// The TLS settings of the database URL are wrong (a bad `sslmode`,
    /// an unreadable `sslrootcert`, no trusted roots).
    #[error("postgres TLS: {0}")]
    Tls(String),
    /// A schema migration failed at connect.
    #[error("postgres schema migration: {0}")]
    Migration(#[source] Box<refinery::Error>),
    /// The store's own runtime could not be started.
    #[error("starting the postgres client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A query's task ended without an answer (the store is shutting down).
    #[error("a postgres query did not finish: {0}")]
    Task(String),
    /// A batch of writes failed as a whole (the database's error for
    /// the first of them is given).
    #[error("a batch of {size} writes failed: {message}")]
    Batch {
        /// Writes in the batch.
        size: usize,
        /// What the database said.
        message: String,
        /// Whether it failed for want of the database (see
        /// [`StoreError::is_unavailable`]).
        unavailable: bool,
    },
    /// The database's schema is older than this build's (its migrations
    /// were not applied).
    #[error("the database's schema is at version {applied}; this build needs {needed}")]
    Schema {
        /// The newest migration the database records.
        applied: i64,
        /// The newest migration this build has.
        needed: i64,
    },
    /// The store is closed.
    #[error("the store is closed")]
    Closed,
}

impl From<::sled::Error> for StoreError {
    fn from(error: ::sled::Error) -> Self {
        Self::Backend(BackendError::Sled(error))
    }
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Unique name.
    pub name: String,
    /// When it was created.
    pub created_at: UnixMillis,
}

/// An API key, as stored: never the key itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public identifier, `key_<hex>`, safe to show and log.
    pub id: String,
    /// The tenant the key acts for.
    pub tenant: String,
    /// SHA-256 of the full key string.
    #[serde(with = "hex::serde")]
    pub hash: [u8; 32],
    /// When it was created.
    pub created_at: UnixMillis,
}

/// The world a function's component targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FunctionWorld {
    /// Exports `gust:function/handler`.
    Handler,
    /// Exports `wasi:http/incoming-handler` (WASI 0.2).
    Http,
    /// Exports `wasi:http/handler` (WASI 0.3).
    HttpP3,
}

impl FunctionWorld {
    /// Whether `/http/{tenant}/{name}/…` serves it.
    pub fn serves_http(self) -> bool {
        matches!(self, Self::Http | Self::HttpP3)
    }

    /// The name the API and the stores use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handler => "handler",
            Self::Http => "http",
            Self::HttpP3 => "http-p3",
        }
    }
}

/// A deployed function: its current version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// Owning tenant.
    pub tenant: String,
    /// Name, unique per tenant.
    pub name: String,
    /// Version number, 1 for the first deploy, +1 for each changed deploy.
    pub version: u64,
    /// `sha256:<hex>` of the component bytes; the blob's key.
    pub digest: String,
    /// Component size in bytes.
    pub size: u64,
    /// The component's world.
    pub world: FunctionWorld,
    /// Whether `/http/...` serves it without a key.
    pub public: bool,
    /// Whether a job of it that was running when the host stopped is run
    /// once more at the next start (instead of failing).
    #[serde(default)]
    pub retryable: bool,
    /// The tenant's secrets its calls get as environment variables, by
    /// name, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Configuration values its calls read through `wasi:config/store`
    /// (over the tenant policy's `[config]`), by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// First deploy.
    pub created_at: UnixMillis,
    /// Latest changed deploy.
    pub updated_at: UnixMillis,
}

/// What a deploy asks to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployRequest {
    /// Owning tenant.
    pub tenant: String,
    /// Function name.
    pub name: String,
    /// `sha256:<hex>` of the (already stored) blob.
    pub digest: String,
    /// Component size in bytes.
    pub size: u64,
    /// The component's world.
    pub world: FunctionWorld,
    /// Public flag.
    pub public: bool,
    /// Retryable flag (see [`FunctionRecord::retryable`]).
    pub retryable: bool,
    /// Secrets by name, sorted (see [`FunctionRecord::secrets`]).
    pub secrets: Vec<String>,
    /// Configuration values (see [`FunctionRecord::config`]).
    pub config: BTreeMap<String, String>,
}

impl DeployRequest {
    /// The function this request stores as `version`.
    pub(crate) fn function(
        &self,
        version: u64,
        created_at: UnixMillis,
        updated_at: UnixMillis,
    ) -> FunctionRecord {
        FunctionRecord {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            version,
            digest: self.digest.clone(),
            size: self.size,
            world: self.world,
            public: self.public,
            retryable: self.retryable,
            secrets: self.secrets.clone(),
            config: self.config.clone(),
            created_at,
            updated_at,
        }
    }

    /// Whether storing this request over `current` changes nothing.
    pub(crate) fn unchanged(&self, current: &FunctionRecord) -> bool {
        current.digest == self.digest
            && current.public == self.public
            && current.retryable == self.retryable
            && current.secrets == self.secrets
            && current.config == self.config
    }
}

/// A tenant's secret, sealed: the host stores and copies it, only the
/// service opens it (see `service::secrets`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Owning tenant.
    pub tenant: String,
    /// Name, unique per tenant (`^[A-Z_][A-Z0-9_]{0,127}$`).
    pub name: String,
    /// Which host key sealed it (a short digest of the key, not the key).
    pub key_id: String,
    /// Nonce and ciphertext.
    #[serde(with = "base64_bytes")]
    pub sealed: Vec<u8>,
    /// First set.
    pub created_at: UnixMillis,
    /// Last set.
    pub updated_at: UnixMillis,
}

// By hand, so that a logged record shows no ciphertext either.
impl fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretRecord")
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

/// What [`MetaStore::put_secret`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretPut {
    /// A new secret (its `created_at` is the one given).
    Created,
    /// An existing secret, replaced (its `created_at` kept).
    Replaced,
    /// Not stored: the tenant has `max` secrets already.
    AtLimit,
}

/// [`StoreError::DigestMismatch`] unless `bytes` hash to `digest`.
pub(crate) fn check_digest(digest: &crate::digest::Digest, bytes: &[u8]) -> Result<(), StoreError> {
    let actual = crate::digest::Digest::of(bytes);
    if actual == *digest {
        Ok(())
    } else {
        Err(StoreError::DigestMismatch {
            expected: digest.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// The result of [`MetaStore::deploy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// The function as now stored.
    pub function: FunctionRecord,
    /// False when digest and flags equal the current version (idempotent
    /// re-deploy: nothing changed, the version is the same).
    pub changed: bool,
}

/// Phase timings of an invocation, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimingsRecord {
    /// Store creation and instantiation.
    pub instantiate_us: u64,
    /// The call itself.
    pub call_us: u64,
    /// Everything, including the host's own work.
    pub total_us: u64,
    /// The call ran in an instance an earlier call left behind (policy
    /// `reuse_instances`); absent in records from before reuse existed.
    #[serde(default)]
    pub reused_instance: bool,
    /// The call ran in a fresh instance made ready before it came (policy
    /// `ready_instances`); absent in records from before that existed.
    #[serde(default)]
    pub ready_instance: bool,
}

/// A finished invocation, as kept (with bounded retention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationRecord {
    /// Unique, time-ordered id (`inv_<hex>`).
    pub id: String,
    /// Tenant that invoked.
    pub tenant: String,
    /// Function name.
    pub function: String,
    /// Function version that ran.
    pub version: u64,
    /// Start time.
    pub started_at: UnixMillis,
    /// HTTP status the caller got.
    pub status: u16,
    /// Outcome code (see `runtime::Outcome::code`).
    pub outcome: String,
    /// One-line explanation for failures.
    pub message: Option<String>,
    /// Phase timings.
    pub timings: TimingsRecord,
    /// Peak linear memory.
    pub peak_memory_bytes: u64,
    /// Captured stdout (bounded, lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (bounded, lossy UTF-8).
    pub stderr: String,
    /// Stdout bytes dropped beyond the bound.
    pub stdout_dropped_bytes: u64,
    /// Stderr bytes dropped beyond the bound.
    pub stderr_dropped_bytes: u64,
    /// Why the function's outgoing requests were refused (bounded); absent
    /// in records from before egress was checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_denied: Vec<String>,
    /// The W3C trace id of the trace the invocation was part of (the
    /// caller's `traceparent`, or one the host started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    /// Waiting in its tenant's queue.
    Pending,
    /// Its invocation is running.
    Running,
    /// The function returned a response.
    Succeeded,
    /// The function failed, or could not run.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl JobStatus {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job is over (its result or error is final).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// What a succeeded job's function answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// The function's status.
    pub status: u16,
    /// Media type of `body`.
    pub content_type: String,
    /// The body (everything emitted, then the response body).
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// Stable code, as in a problem document.
    pub code: String,
    /// The HTTP status an invoke would have answered.
    pub status: u16,
    /// For people.
    pub message: String,
}

/// An asynchronous invocation (`POST /v1/functions/{name}/spawn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Unique, time-ordered id (`job_<hex>`).
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// The function to run.
    pub function: String,
    /// Where it is.
    pub status: JobStatus,
    /// When it was spawned.
    pub created_at: UnixMillis,
    /// When its (latest) run started.
    pub started_at: Option<UnixMillis>,
    /// When it finished.
    pub finished_at: Option<UnixMillis>,
    /// Runs started (a retried job has 2).
    pub attempts: u32,
    /// The invocation of its (latest) run.
    pub invocation_id: Option<String>,
    /// The input's media type.
    pub content_type: String,
    /// The input; dropped once the job is finished.
    #[serde(with = "base64_bytes")]
    pub input: Vec<u8>,
    /// Set when it succeeded.
    pub result: Option<JobResult>,
    /// Set when it failed or was cancelled.
    pub error: Option<JobError>,
    /// The W3C `traceparent` of the request that spawned it: its runs are
    /// part of that trace. Absent in jobs from before traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl JobRecord {
    /// Ends the job as `status` (failed or cancelled) with `error`: its
    /// input is dropped, it has no result.
    pub fn settle(&mut self, status: JobStatus, error: JobError, now: UnixMillis) {
        self.status = status;
        self.finished_at = Some(now);
        self.input = Vec::new();
        self.result = None;
        self.error = Some(error);
    }

    /// What it keeps in the store beyond its fixed fields (input, result
    /// body, error message): what `max_stored_job_bytes` counts.
    pub fn stored_bytes(&self) -> u64 {
        let bytes = self.input.len()
            + self.result.as_ref().map_or(0, |r| r.body.len())
            + self.error.as_ref().map_or(0, |e| e.message.len());
        bytes as u64
    }
}

/// A function's cron schedule (`PUT /v1/functions/{name}/schedule`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// Owning tenant.
    pub tenant: String,
    /// The function it runs.
    pub function: String,
    /// The cron expression (5 fields, or 6 with seconds first), in UTC.
    pub cron: String,
    /// The input of every run, as JSON (a string reaches the function as
    /// text, any other value as JSON).
    pub input: serde_json::Value,
    /// When it was set.
    pub created_at: UnixMillis,
    /// When it last fired.
    pub last_run_at: Option<UnixMillis>,
    /// The invocation of the last run.
    pub last_invocation_id: Option<String>,
    /// The outcome of the last run.
    pub last_outcome: Option<String>,
}

/// Serde for bytes as a base64 string: records stay compact JSON.
mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// Metadata store: tenants, keys, functions, invocation records.
///
/// Implementations must make each method atomic: a crash leaves either the
/// state before or the state after a call, never a mix. Writes to tenants,
/// keys and functions are durable when the method returns; invocation
/// records may become durable later (or at [`MetaStore::flush`]).
pub trait MetaStore: Send + Sync + 'static {
    /// Creates a tenant; `Conflict` if the name is taken.
    fn create_tenant(&self, name: &str) -> Result<TenantRecord, StoreError>;
    /// A tenant by name.
    fn tenant(&self, name: &str) -> Result<Option<TenantRecord>, StoreError>;
    /// All tenants, by name.
    fn tenants(&self) -> Result<Vec<TenantRecord>, StoreError>;

    /// Adds a key; `Missing` if its tenant does not exist, `Conflict` if the
    /// id or hash is already present.
    fn add_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    /// The key with this SHA-256, if any (the auth lookup).
    fn key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// A tenant's keys, by id.
    fn keys(&self, tenant: &str) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Removes a tenant's key; false if it has no such key.
    fn revoke_key(&self, tenant: &str, id: &str) -> Result<bool, StoreError>;

    /// Creates or updates a function (see [`Deployed::changed`]).
    fn deploy(&self, request: &DeployRequest) -> Result<Deployed, StoreError>;
    /// A tenant's function.
    fn function(&self, tenant: &str, name: &str) -> Result<Option<FunctionRecord>, StoreError>;
    /// A tenant's functions, by name.
    fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>, StoreError>;
    /// Every function of every tenant (to warm the host at start).
    fn all_functions(&self) -> Result<Vec<FunctionRecord>, StoreError>;
    /// Deletes a function and its invocation records; returns what was deleted.
    fn delete_function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError>;
    /// Whether any function (of any tenant) uses this digest.
    fn digest_in_use(&self, digest: &str) -> Result<bool, StoreError>;

    /// An id for an invocation of `tenant`'s `function` starting at `at`,
    /// drawn by the store because it can then find the record by that id
    /// without an index entry of its own (`inv_`, then 12 hex digits of
    /// `at`, so that ids still sort by start time); `None` where the store
    /// has no such ids, and the caller draws a random one. Records with
    /// either kind of id are kept and found alike.
    fn invocation_id(&self, tenant: &str, function: &str, at: UnixMillis) -> Option<String> {
        let _ = (tenant, function, at);
        None
    }

    /// Records an invocation, then drops the oldest records of that
    /// function beyond the retention bound, and returns how many it dropped
    /// (with a retention of 0, the record itself: 1; for a repeat of a record
    /// already stored, a retried write, 0), so that every record is
    /// accounted for as kept or pruned. `Missing` if the function does not
    /// exist (any more): a deleted function's records are not kept.
    fn record_invocation(&self, record: &InvocationRecord) -> Result<u64, StoreError>;
    /// [`record_invocation`](Self::record_invocation) of several records,
    /// in order, with one answer each; a store that can, writes them in one
    /// round (the record writer hands it what queued up meanwhile).
    fn record_invocations(&self, records: &[InvocationRecord]) -> Vec<Result<u64, StoreError>> {
        records.iter().map(|r| self.record_invocation(r)).collect()
    }
    /// One of a tenant's invocation records.
    fn invocation(&self, tenant: &str, id: &str) -> Result<Option<InvocationRecord>, StoreError>;
    /// A function's most recent invocation records, newest first.
    fn invocations(
        &self,
        tenant: &str,
        function: &str,
        limit: usize,
    ) -> Result<Vec<InvocationRecord>, StoreError> {
        Ok(self
            .invocations_before(tenant, function, limit, None)?
            .into_iter()
            .map(|(_, record)| record)
            .collect())
    }
    /// A page of a function's invocation records, newest first: at most
    /// `limit`, all older than the record at position `before` (from an
    /// earlier page) when given. Each comes with its position.
    fn invocations_before(
        &self,
        tenant: &str,
        function: &str,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<(u64, InvocationRecord)>, StoreError>;

    /// Creates or replaces a job.
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// One of a tenant's jobs.
    fn job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// Removes a tenant's job; false if it has no such job.
    fn delete_job(&self, tenant: &str, id: &str) -> Result<bool, StoreError>;
    /// Every job of every tenant, oldest first (recovery and retention).
    fn all_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// The jobs of `tenant` still kept, oldest first (ids are time-ordered).
    fn jobs(&self, tenant: &str) -> Result<Vec<JobRecord>, StoreError>;

    /// Creates or replaces a function's schedule.
    fn put_schedule(&self, schedule: &ScheduleRecord) -> Result<(), StoreError>;
    /// A function's schedule.
    fn schedule(&self, tenant: &str, function: &str) -> Result<Option<ScheduleRecord>, StoreError>;
    /// Removes a function's schedule; false if it has none.
    fn delete_schedule(&self, tenant: &str, function: &str) -> Result<bool, StoreError>;
    /// Every schedule of every tenant.
    fn all_schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError>;
    /// The schedules of `tenant`, by function name.
    fn schedules(&self, tenant: &str) -> Result<Vec<ScheduleRecord>, StoreError>;

    /// Stores a secret, replacing the tenant's secret of that name (whose
    /// `created_at` is kept); a new one only while the tenant has fewer
    /// than `max`. `Missing` without its tenant.
    fn put_secret(&self, secret: &SecretRecord, max: u64) -> Result<SecretPut, StoreError>;
    /// A tenant's secrets, by name.
    fn secrets(&self, tenant: &str) -> Result<Vec<SecretRecord>, StoreError>;
    /// Every tenant's secrets (what a host loads at start and after a
    /// change).
    fn all_secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;
    /// Removes a tenant's secret; false if it has no such secret.
    fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool, StoreError>;
    /// Bumped whenever any tenant's secrets may have changed, by this host
    /// or (on a shared store) another: what a host's cache of opened
    /// secrets follows.
    fn secrets_changed(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Whether the store answers and holds the schema this build needs
    /// (checked every second by a host on a shared store, for `/readyz`).
    fn check_ready(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The tenants' key-value buckets.
    fn kv(&self) -> &dyn KvStore;

    /// What a store that several hosts share offers beyond this trait;
    /// `None` for a store only this process writes (which then keeps its
    /// job queues in memory).
    fn shared(&self) -> Option<&dyn SharedStore> {
        None
    }
}

/// A host's claim on a pending job: what its run is recorded as.
#[derive(Debug, Clone)]
pub struct JobClaim {
    /// The claiming host (see [`SharedStore::renew_jobs`]).
    pub host: String,
    /// How long the claim holds without a renewal.
    pub lease: std::time::Duration,
    /// When the run starts.
    pub started_at: UnixMillis,
    /// The run's invocation id.
    pub invocation_id: String,
}

/// The caps on a tenant's finished jobs (its policy's `max_stored_jobs`
/// and `max_stored_job_bytes`): beyond them the oldest go.
#[derive(Debug, Clone, Copy)]
pub struct JobCaps {
    /// Finished jobs kept at most.
    pub jobs: u64,
    /// Bytes ([`JobRecord::stored_bytes`]) of finished jobs kept at most.
    pub bytes: u64,
}

/// What [`SharedStore::cancel_job`] did.
#[derive(Debug, Clone)]
pub enum JobCancel {
    /// The job was pending: it is now cancelled, as returned.
    Settled(JobRecord),
    /// The job is running on the host named in the store; that host is
    /// asked to stop it (and stores it cancelled when it has).
    Requested(JobRecord),
    /// The job had finished: it is deleted.
    Deleted,
    /// No such job.
    Missing,
}

/// Jobs whose host stopped renewing its lease.
#[derive(Debug, Clone, Default)]
pub struct ExpiredJobs {
    /// Queued once more (their function is `retryable`, first retry).
    pub requeued: u64,
    /// Failed.
    pub failed: u64,
}

/// Coordination between hosts that share one store: change notifications,
/// a job queue that any host may take from, and schedule fires that only
/// one host runs.
///
/// A job's life here: [`enqueue_job`](Self::enqueue_job) stores it
/// `pending`; a host with room [`claim_job`](Self::claim_job)s it
/// (`running`, with a lease); that host renews the lease while it runs and
/// [`finish_job`](Self::finish_job)es it. When a host dies, its leases
/// lapse and [`expire_jobs`](Self::expire_jobs) (run by every host) queues
/// the job again or fails it.
pub trait SharedStore: Send + Sync {
    /// Changes soon after any host deploys, redeploys or deletes a function.
    fn functions_changed(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Changes soon after any host sets or removes a schedule.
    fn schedules_changed(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Changes soon after any host queues a job (or one is queued again).
    fn jobs_queued(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Changes soon after any host asks for a running job to be cancelled.
    fn cancels_requested(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Stores a new pending job unless its tenant already has `limit`
    /// pending ones (counted in the store, across hosts): false then.
    fn enqueue_job(&self, job: &JobRecord, limit: u64) -> Result<bool, StoreError>;
    /// Tenants with pending jobs.
    fn pending_job_tenants(&self) -> Result<Vec<String>, StoreError>;
    /// Takes the tenant's oldest pending job that no other host is taking,
    /// marks it running under `claim` and returns it as now stored.
    fn claim_job(&self, tenant: &str, claim: &JobClaim) -> Result<Option<JobRecord>, StoreError>;
    /// Extends the lease of every job `host` holds; returns each job it
    /// still holds, with whether its cancellation was asked for.
    fn renew_jobs(
        &self,
        host: &str,
        lease: std::time::Duration,
    ) -> Result<Vec<(String, bool)>, StoreError>;
    /// Stores a finished job if `host` still holds it (false if its lease
    /// lapsed and the job was taken from it), then removes the tenant's
    /// oldest finished jobs beyond `caps`.
    fn finish_job(&self, job: &JobRecord, host: &str, caps: JobCaps) -> Result<bool, StoreError>;
    /// Cancels a pending job (settled with `error` at `now`, then `caps`
    /// applied), asks the host of a running one to stop it, deletes a
    /// finished one.
    fn cancel_job(
        &self,
        tenant: &str,
        id: &str,
        error: &JobError,
        now: UnixMillis,
        caps: JobCaps,
    ) -> Result<JobCancel, StoreError>;
    /// Running jobs whose lease has lapsed: a `retryable` function's job
    /// that ran once is queued again, any other is failed with
    /// `lost(retryable)`.
    fn expire_jobs(&self, lost: fn(bool) -> JobError) -> Result<ExpiredJobs, StoreError>;
    /// Lets the jobs `host` holds lapse now (it stopped them, shutting
    /// down), for [`expire_jobs`](Self::expire_jobs) to hand over; how many.
    fn abandon_jobs(&self, host: &str) -> Result<u64, StoreError>;
    /// Deletes jobs that finished at or before `cutoff`; how many.
    fn prune_jobs(&self, cutoff: UnixMillis) -> Result<u64, StoreError>;

    /// Claims the fire of the schedule set at `created_at` for the cron
    /// time `tick`: true for exactly one caller per tick, whatever the
    /// number of hosts; false when another host has it, or the schedule
    /// was replaced or removed.
    fn claim_fire(
        &self,
        tenant: &str,
        function: &str,
        created_at: UnixMillis,
        tick: UnixMillis,
    ) -> Result<bool, StoreError>;
}
