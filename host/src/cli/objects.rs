//! The API's objects as the client reads them (docs/api.md, "Objects").
//!
//! These mirror the wire format, not the store's records: times are RFC 3339
//! strings. Unknown fields are ignored so that a newer host still works with
//! an older client.

use serde::Deserialize;

/// A deployed function (its current version).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Function {
    pub(crate) name: String,
    pub(crate) version: u64,
    /// `sha256:<hex>` of the component bytes.
    pub(crate) digest: String,
    #[serde(default)]
    pub(crate) size: u64,
    /// `handler` or `http`.
    pub(crate) world: String,
    #[serde(default)]
    pub(crate) public: bool,
    #[serde(default)]
    pub(crate) retryable: bool,
    /// The cron expression of its schedule, if it has one.
    #[serde(default)]
    pub(crate) schedule: Option<String>,
    #[serde(default)]
    pub(crate) created_at: String,
    #[serde(default)]
    pub(crate) updated_at: String,
}

/// `GET /v1/functions`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct FunctionList {
    pub(crate) functions: Vec<Function>,
}

/// How long the phases of an invocation took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct Timings {
    #[serde(default)]
    pub(crate) instantiate_us: u64,
    #[serde(default)]
    pub(crate) call_us: u64,
    #[serde(default)]
    pub(crate) total_us: u64,
}

/// One invocation's record.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Invocation {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) function: String,
    #[serde(default)]
    pub(crate) version: u64,
    #[serde(default)]
    pub(crate) started_at: String,
    /// The HTTP status the caller got.
    pub(crate) status: u16,
    pub(crate) outcome: String,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) timings: Timings,
    #[serde(default)]
    pub(crate) peak_memory_bytes: u64,
    #[serde(default)]
    pub(crate) stdout: String,
    #[serde(default)]
    pub(crate) stderr: String,
    #[serde(default)]
    pub(crate) stdout_dropped_bytes: u64,
    #[serde(default)]
    pub(crate) stderr_dropped_bytes: u64,
}

/// `GET /v1/functions/{name}/logs`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct InvocationList {
    pub(crate) invocations: Vec<Invocation>,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Tenant {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) created_at: String,
}

/// `GET /v1/tenants`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TenantList {
    pub(crate) tenants: Vec<Tenant>,
}

/// An API key's public description (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Key {
    pub(crate) id: String,
    pub(crate) tenant: String,
    #[serde(default)]
    pub(crate) created_at: String,
}

/// `GET /v1/keys`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct KeyList {
    pub(crate) keys: Vec<Key>,
}

/// A freshly created key: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct NewKey {
    pub(crate) id: String,
    pub(crate) tenant: String,
    #[serde(default)]
    pub(crate) created_at: String,
    /// The secret, `gust_…`.
    pub(crate) key: String,
}

/// `POST /v1/tenants`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CreatedTenant {
    pub(crate) tenant: Tenant,
    pub(crate) key: NewKey,
}
