//! Why the service could not do what it was asked.

use crate::runtime::LoadError;
use crate::store::StoreError;
use crate::tenancy::keys::KeyError;

/// A refusal or failure of a service operation. Each variant has exactly
/// one HTTP answer (see the API's conversion into a problem document); the
/// background runners (jobs, schedules) record the same code and status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The thing named does not exist for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// The function serves the other world; `instead` says what to do.
    #[error("`{name}` serves wasi:http; {instead}")]
    WrongWorld {
        /// The function.
        name: String,
        /// What the caller should do instead.
        instead: String,
    },
    /// The tenant runs as many calls as its policy allows.
    #[error("the tenant is at its limit of {limit} concurrent calls")]
    TenantBusy {
        /// The policy's `max_concurrency`.
        limit: usize,
    },
    /// The tenant has as many maps and WebSocket sessions open as its
    /// policy allows.
    #[error(
        "the tenant has {limit} long-lived requests (maps, WebSocket sessions) open, its policy's max_streams"
    )]
    TooManyStreams {
        /// The policy's `max_streams`.
        limit: usize,
    },
    /// The host runs as many calls as it can.
    #[error("the host is at capacity; retry shortly")]
    HostBusy,
    /// The tenant's job queue is full.
    #[error("the tenant's job queue is full ({limit} jobs waiting)")]
    QueueFull {
        /// The policy's `max_queued_jobs`.
        limit: u64,
    },
    /// The function is deployed but its component could not be loaded.
    #[error("`{name}` could not be loaded: {reason}")]
    Unloadable {
        /// The function.
        name: String,
        /// Why.
        reason: String,
    },
    /// A volume of the tenant's policy cannot be used.
    #[error("a volume of this tenant is unavailable: {0}")]
    Volume(#[source] crate::tenancy::VolumeError),
    /// A deploy would give the tenant more functions than its policy's
    /// `max_functions`.
    #[error("the tenant has {limit} functions, its policy's max_functions; delete one first")]
    FunctionQuota {
        /// The policy's `max_functions`.
        limit: u64,
    },
    /// A deploy would make the tenant's components take more than its
    /// policy's `max_storage_bytes`.
    #[error(
        "the tenant's components would take {needed} bytes, beyond its policy's max_storage_bytes of {limit}"
    )]
    StorageQuota {
        /// The policy's `max_storage_bytes`.
        limit: u64,
        /// What the tenant's components would take with this deploy.
        needed: u64,
    },
    /// The uploaded component is not one the host can run.
    #[error(transparent)]
    InvalidComponent(#[from] LoadError),
    /// A name that is not `^[a-z0-9][a-z0-9-]{0,62}$`.
    #[error(
        "`{name}` is not a valid {what} name: use 1-63 of a-z, 0-9 and `-`, starting with a letter or digit"
    )]
    InvalidName {
        /// The name given.
        name: String,
        /// `function` or `tenant`.
        what: &'static str,
    },
    /// A cron expression that does not parse.
    #[error("{0}")]
    InvalidCron(String),
    /// A secret name that is not `^[A-Z_][A-Z0-9_]{0,127}$`.
    #[error(
        "`{0}` is not a valid secret name: use 1-128 of A-Z, 0-9 and `_`, not starting with a digit (it becomes an environment variable)"
    )]
    InvalidSecretName(String),
    /// A secret value that cannot be one, or a deploy naming a secret the
    /// tenant does not have.
    #[error("{0}")]
    InvalidSecret(String),
    /// The tenant has as many secrets as its policy allows.
    #[error("the tenant has {limit} secrets, its policy's max_secrets; delete one first")]
    SecretQuota {
        /// The policy's `max_secrets`.
        limit: u64,
    },
    /// A function was deployed with a secret that has since been deleted.
    #[error(
        "`{function}` is deployed with secret {name}, which no longer exists: set it again, or deploy the function without it"
    )]
    SecretMissing {
        /// The function.
        function: String,
        /// The secret.
        name: String,
    },
    /// A secret this host cannot open.
    #[error("secret {name} cannot be opened: {reason}")]
    SecretUnreadable {
        /// The secret.
        name: String,
        /// Why.
        reason: String,
    },
    /// A configuration key or value that cannot be one (deploy `config`).
    #[error("{0}")]
    InvalidConfig(String),
    /// A bucket name or key that cannot be one, or a value that cannot be
    /// stored as asked (a counter that is not a number).
    #[error("{0}")]
    InvalidKv(String),
    /// A key-value write beyond the tenant's `kv_*` quotas.
    #[error("{0}")]
    KvQuota(#[source] crate::store::KvRefused),
    /// The thing to create exists already.
    #[error("{0}")]
    Conflict(String),
    /// The store failed.
    #[error("the host's store failed: {0}")]
    Store(#[from] StoreError),
    /// The store is out of reach (see [`Service::ready`](super::Service::ready)).
    #[error("the host's store is out of reach, so this cannot be done now: {0}")]
    StoreUnavailable(String),
    /// A key could not be made.
    #[error("issuing a key: {0}")]
    Key(#[from] KeyError),
    /// The host failed in a way the caller cannot fix.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// How the error is reported, to an HTTP caller and in a job's record:
    /// the status, the stable code, the detail and whether to retry. This
    /// is the one mapping from service errors to answers.
    pub fn failure(&self) -> super::Failure {
        use http::StatusCode;
        let (status, code, retry) = match self {
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", false),
            Self::WrongWorld { .. } => (StatusCode::BAD_REQUEST, "wrong-world", false),
            Self::TenantBusy { .. } => (StatusCode::TOO_MANY_REQUESTS, "too-many-requests", true),
            Self::HostBusy => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", true),
            Self::TooManyStreams { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too-many-streams", true)
            }
            Self::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue-full", true),
            Self::FunctionQuota { .. } => {
                (StatusCode::INSUFFICIENT_STORAGE, "function-quota", false)
            }
            Self::StorageQuota { .. } => (StatusCode::INSUFFICIENT_STORAGE, "storage-quota", false),
            // The disk, not the caller: nothing was acknowledged, and the
            // host keeps serving what it has.
            Self::Store(error) if error.is_out_of_space() => {
                (StatusCode::INSUFFICIENT_STORAGE, "disk-full", true)
            }
            // The database, not the caller: what the host has loaded still
            // serves; this needs the database.
            Self::Store(error) if error.is_unavailable() => {
                (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", true)
            }
            Self::StoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", true)
            }
            Self::InvalidComponent(error) => (
                StatusCode::BAD_REQUEST,
                match error {
                    LoadError::CoreModule => "core-module",
                    LoadError::UnsatisfiedImports { .. } => "unsatisfied-imports",
                    LoadError::MissingExport { .. } | LoadError::ExportMismatch(_) => {
                        "missing-export"
                    }
                    _ => "invalid-component",
                },
                false,
            ),
            Self::InvalidName { .. } => (StatusCode::BAD_REQUEST, "invalid-name", false),
            Self::InvalidCron(_) => (StatusCode::BAD_REQUEST, "invalid-cron", false),
            Self::InvalidSecretName(_) => (StatusCode::BAD_REQUEST, "invalid-secret-name", false),
            Self::InvalidSecret(_) => (StatusCode::BAD_REQUEST, "invalid-secret", false),
            Self::SecretQuota { .. } => (StatusCode::BAD_REQUEST, "too-many-secrets", false),
            Self::SecretMissing { .. } => (StatusCode::CONFLICT, "secret-missing", false),
            Self::SecretUnreadable { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "secret-unreadable",
                false,
            ),
            Self::InvalidConfig(_) => (StatusCode::BAD_REQUEST, "invalid-config", false),
            Self::InvalidKv(_) => (StatusCode::BAD_REQUEST, "invalid-kv", false),
            Self::KvQuota(_) => (StatusCode::INSUFFICIENT_STORAGE, "quota-exceeded", false),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict", false),
            Self::Unloadable { .. }
            | Self::Volume(_)
            | Self::Store(_)
            | Self::Key(_)
            | Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "host-error", false),
        };
        if let Self::Store(error) = self {
            tracing::error!(%error, "store failure");
        }
        super::Failure {
            status,
            code: code.to_owned(),
            detail: self.to_string(),
            retry,
        }
    }

    /// The imports a component needs that the host does not provide, for a
    /// deploy refused with `unsatisfied-imports`.
    pub fn unsatisfied_imports(&self) -> Option<&[String]> {
        match self {
            Self::InvalidComponent(LoadError::UnsatisfiedImports { imports, .. }) => Some(imports),
            _ => None,
        }
    }
}
