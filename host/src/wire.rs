//! The API's objects on the wire, shared by the server (which writes them)
//! and the `gust` CLI (which reads them); the OpenAPI document's schemas
//! are derived from these types (see `docs/api.md`, "Objects").
//!
//! They mirror the wire format, not the store's records: times are RFC 3339
//! strings. Optional and newer fields default when absent, so that a newer
//! host still works with an older client and the other way round.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::store::{
    ApiKeyRecord, FunctionRecord, InvocationRecord, JobRecord, ScheduleRecord, TenantRecord,
    TimingsRecord, UnixMillis,
};

/// A time as the API shows it: RFC 3339 with milliseconds, UTC.
pub fn rfc3339(millis: UnixMillis) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis);
    humantime::format_rfc3339_millis(time).to_string()
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` from `/healthz` while the host answers; `ready` from `/readyz`.
    pub status: String,
}

/// A deployed function (its current version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Function {
    /// The function's name, unique within its tenant.
    pub name: String,
    /// Counts up with every deploy that changed the bytes or flags.
    pub version: u64,
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    /// Size of the component in bytes.
    #[serde(default)]
    pub size: u64,
    /// `handler`, `http` (WASI 0.2 `wasi:http/proxy`) or `http-p3` (WASI
    /// 0.3 `wasi:http/service`).
    pub world: String,
    /// Whether `/http/{tenant}/{name}/…` answers callers without a key.
    #[serde(default)]
    pub public: bool,
    /// Whether a job interrupted by a host stop runs once more.
    #[serde(default)]
    pub retryable: bool,
    /// The cron expression of its schedule, if it has one.
    #[serde(default)]
    pub schedule: Option<String>,
    /// The tenant's secrets its calls get as environment variables (names
    /// only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Its own configuration values (`wasi:config/store`), over the tenant
    /// policy's `[config]`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub config: std::collections::BTreeMap<String, String>,
    /// When the function was first deployed.
    #[serde(default)]
    pub created_at: String,
    /// When its current version was deployed.
    #[serde(default)]
    pub updated_at: String,
}

impl Function {
    /// The API's view of `record`, with its schedule's cron expression.
    pub fn from_record(record: &FunctionRecord, schedule: Option<&str>) -> Self {
        Self {
            name: record.name.clone(),
            version: record.version,
            digest: record.digest.clone(),
            size: record.size,
            world: record.world.as_str().to_owned(),
            public: record.public,
            retryable: record.retryable,
            schedule: schedule.map(str::to_owned),
            secrets: record.secrets.clone(),
            config: record.config.clone(),
            created_at: rfc3339(record.created_at),
            updated_at: rfc3339(record.updated_at),
        }
    }
}

/// A tenant secret, as `GET /v1/secrets` shows it: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Secret {
    /// Its name: the environment variable a function deployed with it sees.
    pub name: String,
    /// When it was first set.
    pub created_at: String,
    /// When it was last set.
    pub updated_at: String,
}

impl From<&crate::service::SecretInfo> for Secret {
    fn from(info: &crate::service::SecretInfo) -> Self {
        Self {
            name: info.name.clone(),
            created_at: rfc3339(info.created_at),
            updated_at: rfc3339(info.updated_at),
        }
    }
}

/// `GET /v1/secrets`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretList {
    /// The tenant's secrets, by name.
    pub secrets: Vec<Secret>,
}

/// A key-value bucket, as `GET /v1/kv` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KvBucket {
    /// Its name, as functions open it.
    pub name: String,
    /// Keys it holds.
    pub keys: u64,
    /// Bytes of its keys and values (what `kv_max_bytes` counts).
    pub bytes: u64,
}

impl From<&crate::store::KvBucket> for KvBucket {
    fn from(bucket: &crate::store::KvBucket) -> Self {
        Self {
            name: bucket.name.clone(),
            keys: bucket.keys,
            bytes: bucket.bytes,
        }
    }
}

/// `GET /v1/kv`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KvBucketList {
    /// The tenant's buckets that hold keys, by name.
    pub buckets: Vec<KvBucket>,
}

/// `GET /v1/kv/{bucket}`: a page of keys.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KvKeyList {
    /// Keys, in byte order.
    pub keys: Vec<String>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u64>,
}

/// `GET /v1/functions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionList {
    /// The tenant's functions, by name.
    pub functions: Vec<Function>,
}

/// How long the phases of an invocation took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Store creation and instantiation, in microseconds.
    #[serde(default)]
    pub instantiate_us: u64,
    /// The call itself.
    #[serde(default)]
    pub call_us: u64,
    /// Everything, including the host's own work.
    #[serde(default)]
    pub total_us: u64,
    /// The call ran in an instance an earlier call left behind.
    #[serde(default)]
    pub reused_instance: bool,
    /// The call ran in a fresh instance made ready before it came (policy
    /// `ready_instances`): `instantiate_us` is then only the store's
    /// preparation.
    #[serde(default)]
    pub ready_instance: bool,
}

impl From<&TimingsRecord> for Timings {
    fn from(record: &TimingsRecord) -> Self {
        Self {
            instantiate_us: record.instantiate_us,
            call_us: record.call_us,
            total_us: record.total_us,
            reused_instance: record.reused_instance,
            ready_instance: record.ready_instance,
        }
    }
}

/// One invocation's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Invocation {
    /// `inv_<12 hex: ms><16 hex: random>`; sorts by start.
    pub id: String,
    /// The function called.
    #[serde(default)]
    pub function: String,
    /// Its version at the time.
    #[serde(default)]
    pub version: u64,
    /// When the call started.
    #[serde(default)]
    pub started_at: String,
    /// The HTTP status the caller got.
    pub status: u16,
    /// `ok`, or the stable code of what went wrong (`timeout`, `trap`…).
    pub outcome: String,
    /// What went wrong, for people; absent on success.
    #[serde(default)]
    pub message: Option<String>,
    /// Where the time went.
    #[serde(default)]
    pub timings: Timings,
    /// The most linear memory the instance held.
    #[serde(default)]
    pub peak_memory_bytes: u64,
    /// Captured standard output (bounded).
    #[serde(default)]
    pub stdout: String,
    /// Captured standard error (bounded).
    #[serde(default)]
    pub stderr: String,
    /// Output beyond the capture bound, dropped.
    #[serde(default)]
    pub stdout_dropped_bytes: u64,
    /// Error output beyond the capture bound, dropped.
    #[serde(default)]
    pub stderr_dropped_bytes: u64,
    /// Why the function's outgoing requests were refused by the tenant's
    /// egress policy (`outbound_http`, private addresses); absent when
    /// none were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_denied: Vec<String>,
    /// The W3C trace id of the trace the invocation was part of: the
    /// caller's `traceparent`'s, or one the host started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl From<&InvocationRecord> for Invocation {
    fn from(record: &InvocationRecord) -> Self {
        Self {
            id: record.id.clone(),
            function: record.function.clone(),
            version: record.version,
            started_at: rfc3339(record.started_at),
            status: record.status,
            outcome: record.outcome.clone(),
            message: record.message.clone(),
            timings: Timings::from(&record.timings),
            peak_memory_bytes: record.peak_memory_bytes,
            stdout: record.stdout.clone(),
            stderr: record.stderr.clone(),
            stdout_dropped_bytes: record.stdout_dropped_bytes,
            stderr_dropped_bytes: record.stderr_dropped_bytes,
            egress_denied: record.egress_denied.clone(),
            trace_id: record.trace_id.clone(),
        }
    }
}

/// `GET /v1/functions/{name}/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InvocationList {
    /// Newest first.
    pub invocations: Vec<Invocation>,
    /// Pass as `cursor` for the next (older) page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// The tenant's name.
    pub name: String,
    /// When it was created.
    #[serde(default)]
    pub created_at: String,
}

impl From<&TenantRecord> for Tenant {
    fn from(record: &TenantRecord) -> Self {
        Self {
            name: record.name.clone(),
            created_at: rfc3339(record.created_at),
        }
    }
}

/// `GET /v1/tenants`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    /// Every tenant of the host.
    pub tenants: Vec<Tenant>,
}

/// `POST /v1/tenants`: the tenant to create.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// `^[a-z0-9][a-z0-9-]{0,62}$`.
    pub name: String,
}

/// An API key's public description (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Key {
    /// The key's id (part of the key, safe to show).
    pub id: String,
    /// The tenant it acts as.
    pub tenant: String,
    /// When it was created.
    #[serde(default)]
    pub created_at: String,
}

impl From<&ApiKeyRecord> for Key {
    fn from(record: &ApiKeyRecord) -> Self {
        Self {
            id: record.id.clone(),
            tenant: record.tenant.clone(),
            created_at: rfc3339(record.created_at),
        }
    }
}

/// `GET /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    /// The tenant's keys.
    pub keys: Vec<Key>,
}

/// A freshly created key: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NewKey {
    /// The key's id.
    pub id: String,
    /// The tenant it acts as.
    pub tenant: String,
    /// When it was created.
    #[serde(default)]
    pub created_at: String,
    /// The secret, `gust_…`.
    pub key: String,
}

impl NewKey {
    /// The key of `record`, shown with its `secret`.
    pub fn new(record: &ApiKeyRecord, secret: String) -> Self {
        let Key {
            id,
            tenant,
            created_at,
        } = Key::from(record);
        Self {
            id,
            tenant,
            created_at,
            key: secret,
        }
    }
}

/// `POST /v1/tenants`: the new tenant and its first key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedTenant {
    /// The tenant.
    pub tenant: Tenant,
    /// Its first key.
    pub key: NewKey,
}

/// A failure as one line of a map, a job or a WebSocket session reports
/// it: the problem document's code and status, and its detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorInfo {
    /// The stable code.
    pub code: String,
    /// The HTTP status an invoke would have answered.
    pub status: u16,
    /// What went wrong, for people.
    pub message: String,
}

/// A job's result: the function's response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobOutput {
    /// The function's status.
    pub status: u16,
    /// Its content type.
    pub content_type: String,
    /// JSON for a JSON response, text for UTF-8, else `{"base64": …}`.
    pub output: Value,
}

/// A job: an invocation that runs later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// `job_<12 hex: ms><16 hex: random>`.
    pub id: String,
    /// The function it runs.
    pub function: String,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// When it was spawned.
    pub created_at: String,
    /// When its (last) run started.
    #[serde(default)]
    pub started_at: Option<String>,
    /// When it finished.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Runs started (2 after a retry).
    #[serde(default)]
    pub attempts: u32,
    /// The invocation of its (last) run.
    #[serde(default)]
    pub invocation_id: Option<String>,
    /// The function's response, once it succeeded.
    #[serde(default)]
    pub result: Option<JobOutput>,
    /// Why it failed or was cancelled.
    #[serde(default)]
    pub error: Option<ErrorInfo>,
}

impl From<&JobRecord> for Job {
    fn from(job: &JobRecord) -> Self {
        Self {
            id: job.id.clone(),
            function: job.function.clone(),
            status: job.status.as_str().to_owned(),
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
            attempts: job.attempts,
            invocation_id: job.invocation_id.clone(),
            result: job.result.as_ref().map(|r| JobOutput {
                status: r.status,
                content_type: r.content_type.clone(),
                output: output_value(&r.content_type, &r.body),
            }),
            error: job.error.as_ref().map(|e| ErrorInfo {
                code: e.code.clone(),
                status: e.status,
                message: e.message.clone(),
            }),
        }
    }
}

/// `POST /v1/functions/{name}/spawn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Spawned {
    /// The job's id.
    pub job_id: String,
    /// Where to read it: `/v1/jobs/{id}`.
    pub url: String,
    /// `pending`.
    pub status: String,
}

/// A function's cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Schedule {
    /// The function it runs.
    pub function: String,
    /// 5 or 6 fields (seconds first), evaluated in UTC.
    pub cron: String,
    /// The input of every run (a string arrives as text, else as JSON).
    #[serde(default)]
    pub input: Value,
    /// When the schedule was set.
    pub created_at: String,
    /// When it fires next.
    #[serde(default)]
    pub next_run_at: Option<String>,
    /// When it last fired.
    #[serde(default)]
    pub last_run_at: Option<String>,
    /// The invocation of its last run.
    #[serde(default)]
    pub last_invocation_id: Option<String>,
    /// The outcome code of its last run.
    #[serde(default)]
    pub last_outcome: Option<String>,
}

impl Schedule {
    /// The API's view of `record`, firing next at `next_run`.
    pub fn from_record(record: &ScheduleRecord, next_run: Option<UnixMillis>) -> Self {
        Self {
            function: record.function.clone(),
            cron: record.cron.clone(),
            input: record.input.clone(),
            created_at: rfc3339(record.created_at),
            next_run_at: next_run.map(rfc3339),
            last_run_at: record.last_run_at.map(rfc3339),
            last_invocation_id: record.last_invocation_id.clone(),
            last_outcome: record.last_outcome.clone(),
        }
    }
}

/// `PUT /v1/functions/{name}/schedule`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSchedule {
    /// `*/5 * * * *`, or 6 fields with seconds first.
    pub cron: String,
    /// The input of every run.
    #[serde(default)]
    pub input: Value,
}

/// A bridge device a tenant may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// `cpu`, `wgpu` or `cuda`.
    pub backend: String,
    /// The adapter's name.
    pub name: String,
    /// Whether it is a real GPU.
    pub is_gpu: bool,
}

/// A tenant's use of the GPU bridge against its policy's quotas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GpuUsage {
    /// The devices its policy allows, the default first.
    pub devices: Vec<DeviceInfo>,
    /// Device time used since the host started.
    pub device_seconds: f64,
    /// Device memory held now.
    pub memory_bytes: u64,
    /// The most device memory held at once.
    pub peak_memory_bytes: u64,
    /// The policy's device-memory quota.
    pub memory_limit_bytes: u64,
    /// The policy's device-time quota per minute.
    pub time_ms_per_minute: u64,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// The calling tenant.
    pub tenant: String,
    /// Its GPU-bridge use.
    pub gpu: GpuUsage,
}

/// How a model batches concurrent calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Batching {
    /// Most calls in one batch.
    pub max_batch: u32,
    /// How long a call may wait for others.
    pub max_delay_ms: u64,
    /// Calls waiting beyond which new ones are refused.
    pub max_queue: u64,
}

/// A model the host serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Model {
    /// The name guests load it by.
    pub name: String,
    /// Its family (`bert`, `llama`, `graph`…).
    pub family: String,
    /// Its weights' element type.
    pub dtype: String,
    /// Whether the caller's policy lets it load the model.
    pub allowed: bool,
    /// Its batching, if it batches.
    #[serde(default)]
    pub batching: Option<Batching>,
    /// The backends it is resident on now.
    #[serde(default)]
    pub resident_on: Vec<String>,
}

/// The caller's own model loads (other tenants' are not its business; the
/// host-wide counters are on `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelStats {
    /// Loads of weights onto a device.
    pub loads: u64,
    /// Loads that found the model resident.
    pub hits: u64,
    /// Loads that failed.
    pub failures: u64,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Models {
    /// The models the caller's policy lets it load.
    pub models: Vec<Model>,
    /// Whether the caller's calls find models warm.
    pub stats: ModelStats,
}

/// One line of a map's NDJSON answer: an input's output or its error, in
/// input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MapLine {
    /// The input's position, from 0.
    pub index: u64,
    /// The function's output, when it answered below 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Value>,
    /// What went wrong with this input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The input's invocation, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
}

/// The `done` event of a streamed invoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamDone {
    /// The invocation.
    pub invocation_id: String,
    /// The function's status.
    pub status: u16,
    /// `ok`.
    pub outcome: String,
    /// The content type of the response body (sent as the last data event).
    pub content_type: String,
}

/// A failed message of a WebSocket session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionError {
    /// What went wrong.
    pub error: ErrorInfo,
    /// The message's invocation.
    pub invocation_id: String,
}

/// A response body as a JSON value: parsed JSON for a JSON response, text
/// for UTF-8, else `{"base64": …}`.
pub fn output_value(content_type: &str, body: &[u8]) -> Value {
    use base64::Engine as _;
    if content_type.starts_with("application/json")
        && let Ok(value) = serde_json::from_slice::<Value>(body)
    {
        return value;
    }
    match std::str::from_utf8(body) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(body)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_json_text_or_base64() {
        assert_eq!(
            output_value("application/json", b"[1]"),
            serde_json::json!([1])
        );
        assert_eq!(output_value("text/plain", b"hi"), serde_json::json!("hi"));
        assert_eq!(
            output_value("application/octet-stream", &[0xff]),
            serde_json::json!({"base64": "/w=="})
        );
    }

    #[test]
    fn map_lines_leave_out_what_they_do_not_have() {
        let line = MapLine {
            index: 3,
            ok: None,
            error: Some(ErrorInfo {
                code: "invalid-input".into(),
                status: 400,
                message: "x".into(),
            }),
            invocation_id: None,
        };
        let value = serde_json::to_value(&line).unwrap_or_default();
        assert_eq!(
            value,
            serde_json::json!({"index": 3, "error": {"code": "invalid-input", "status": 400, "message": "x"}})
        );
    }
}
