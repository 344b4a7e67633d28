//! One invocation: what it runs against ([`Target`]), its limits, the run
//! itself, and its record. Every trigger goes through these.

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tracing::Instrument as _;

use super::{Admit, Permit, Service, ServiceError};
use crate::runtime::{
    CallControl, CallLimits, HttpCall, Invocation, LoadedComponent, Outcome, Preopen,
    Request as CallRequest, new_invocation_id,
};
use crate::store::{
    FunctionRecord, FunctionWorld, InvocationRecord, TimingsRecord, UnixMillis, now_millis,
};
use crate::trace::TraceContext;

/// A function resolved for calls: its record, its compiled component and
/// the limits of a call.
#[derive(Clone)]
pub struct Target {
    /// The function as deployed.
    pub function: FunctionRecord,
    /// Its compiled component.
    pub component: LoadedComponent,
    /// The policy's limits for a call of it, volumes resolved.
    pub limits: CallLimits,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("tenant", &self.function.tenant)
            .field("function", &self.function.name)
            .finish_non_exhaustive()
    }
}

/// When and as what an invocation started.
#[derive(Debug, Clone)]
pub struct Started {
    /// The invocation id.
    pub id: String,
    /// Wall-clock start.
    pub at: UnixMillis,
    /// Monotonic start, for the total duration.
    pub instant: Instant,
    /// The trace it is part of: the request's, or a new one.
    pub trace: TraceContext,
}

impl Started {
    /// An invocation starting now, with a new id, in the current request's
    /// trace (see [`TraceContext::current`]).
    pub fn now() -> Self {
        let at = now_millis();
        Self::new(new_invocation_id(at), at)
    }

    /// An invocation starting now, at `at`, as `id`.
    fn new(id: String, at: UnixMillis) -> Self {
        Self {
            id,
            at,
            instant: Instant::now(),
            trace: TraceContext::current(),
        }
    }

    /// The controls of a call of this invocation that are not the
    /// caller's to choose: its trace.
    pub fn control(&self, control: CallControl) -> CallControl {
        CallControl {
            trace: Some(self.trace),
            ..control
        }
    }
}

/// How a failed outcome is reported, whichever trigger ran it: the status
/// and code an invoke answers with, and the detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: String,
    /// What went wrong, for people.
    pub detail: String,
    /// Whether a client should come back (`Retry-After`).
    pub retry: bool,
}

impl Failure {
    fn new(status: StatusCode, code: &str, detail: String) -> Self {
        Self {
            status,
            code: code.to_owned(),
            detail,
            retry: false,
        }
    }

    /// The report of a failed `outcome` (an `Ok` outcome reports as a host
    /// error: it is never asked for).
    pub fn of(outcome: &Outcome) -> Self {
        let detail = outcome.to_string();
        match outcome {
            Outcome::GuestError(error) => {
                let status = StatusCode::from_u16(error.http_status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                // A function answering "busy" (a full model queue, a used-up
                // quota) tells well-behaved clients when to come back.
                let mut failure = Self::new(status, &error.code, error.message.clone());
                failure.retry = matches!(
                    status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                );
                failure
            }
            Outcome::Timeout { .. } => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", detail),
            Outcome::Overloaded { .. } => {
                let mut failure = Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", detail);
                failure.retry = true;
                failure
            }
            Outcome::OutOfMemory { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "out-of-memory", detail)
            }
            Outcome::StackOverflow { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "stack-overflow", detail)
            }
            Outcome::Trap { .. } => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "trap", detail),
            Outcome::LimitExceeded { .. } => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "limit-exceeded", detail)
            }
            Outcome::Cancelled => Self::new(
                StatusCode::from_u16(super::CANCELLED_STATUS)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "cancelled",
                detail,
            ),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "host-error", detail),
        }
    }
}

/// Who calls a wasi:http function: its own tenant, or anyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A key of the function's tenant: the tenant's own slots, full
    /// problem details.
    Owner,
    /// No key, or another tenant's, calling a public function: the
    /// tenant's `max_anonymous_concurrency` slots, and failures answered
    /// with their code and invocation id only.
    Anonymous,
}

/// The status an invocation's record carries: what an invoke would have
/// answered.
pub(super) fn invocation_status(invocation: &Invocation) -> u16 {
    match &invocation.outcome {
        Outcome::Ok(reply) => reply.status,
        other => Failure::of(other).status.as_u16(),
    }
}

/// The request body of a JSON input (map lines, schedule inputs): a JSON
/// string is passed as its text, any other JSON value as JSON.
///
/// # Errors
/// The input is not valid JSON.
pub fn json_input(json_text: &[u8]) -> Result<(Vec<u8>, &'static str), String> {
    match serde_json::from_slice::<serde_json::Value>(json_text) {
        Ok(serde_json::Value::String(text)) => Ok((text.into_bytes(), "text/plain; charset=utf-8")),
        Ok(_) => Ok((json_text.to_vec(), "application/json")),
        Err(e) => Err(format!("input is not valid JSON: {e}")),
    }
}

/// How long a read of records waits for the record writer at most
/// ([`Service::settle_records`]): a full queue takes well under a second.
const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

impl Service {
    /// An invocation of `function` starting now, in the current request's
    /// trace, with an id the store drew where it draws them (its record
    /// then costs the store less to keep: see
    /// [`MetaStore::invocation_id`](crate::store::MetaStore::invocation_id)),
    /// else a random one.
    pub fn started(&self, function: &FunctionRecord) -> Started {
        let at = now_millis();
        let id = self
            .store
            .invocation_id(&function.tenant, &function.name, at)
            .unwrap_or_else(|| new_invocation_id(at));
        Started::new(id, at)
    }

    /// The tenant's deployed function `name`, whichever its world.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`].
    fn found(&self, tenant: &str, name: &str) -> Result<super::Deployment, ServiceError> {
        self.deployment(tenant, name)
            .ok_or_else(|| ServiceError::NotFound(format!("no function `{name}`")))
    }

    /// The tenant's function `name`, which must be a handler (a wasi:http
    /// function cannot be invoked, mapped, spawned or scheduled); `instead`
    /// ends the error, telling the caller what to do.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] or [`ServiceError::WrongWorld`].
    pub fn handler_function(
        &self,
        tenant: &str,
        name: &str,
        instead: &str,
    ) -> Result<super::Deployment, ServiceError> {
        let deployment = self.found(tenant, name)?;
        if deployment.record.world != FunctionWorld::Handler {
            return Err(ServiceError::WrongWorld {
                name: name.to_owned(),
                instead: instead.to_owned(),
            });
        }
        Ok(deployment)
    }

    /// A handler function ready to call: found, loaded, limits resolved.
    ///
    /// # Errors
    /// As [`Service::handler_function`], [`ServiceError::Unloadable`], or
    /// [`ServiceError::Volume`].
    pub fn handler_target(
        &self,
        tenant: &str,
        name: &str,
        instead: &str,
    ) -> Result<Target, ServiceError> {
        let deployment = self.handler_function(tenant, name, instead)?;
        self.target(deployment)
    }

    /// `deployment` ready to call: loaded, limits resolved, its secrets
    /// opened into its environment and configuration, its configuration
    /// laid over the policy's, its key-value grant made.
    ///
    /// # Errors
    /// [`ServiceError::Unloadable`], [`ServiceError::Volume`],
    /// [`ServiceError::SecretMissing`] or [`ServiceError::SecretUnreadable`].
    pub fn target(&self, deployment: super::Deployment) -> Result<Target, ServiceError> {
        let super::Deployment { record, component } = deployment;
        let component = component.map_err(|reason| ServiceError::Unloadable {
            name: record.name.clone(),
            reason,
        })?;
        let mut limits = self.limits(&record.tenant, &record.name)?;
        limits.kv = self.kv_grant(&record.tenant);
        if !record.secrets.is_empty() || !record.config.is_empty() {
            (limits.env, limits.config) =
                self.function_grants(&record, &limits.env, &limits.config)?;
        }
        Ok(Target {
            function: record,
            component,
            limits,
        })
    }

    /// The policy's limits for a call of `function`, with its GPU grant and
    /// its volumes, resolved (and checked to stay inside the tenant's
    /// volume root).
    ///
    /// # Errors
    /// [`ServiceError::Volume`] when a volume is unusable.
    pub fn limits(&self, tenant: &str, function: &str) -> Result<CallLimits, ServiceError> {
        let policy = self.policy(tenant);
        let mut limits = policy.call_limits(tenant, function);
        limits.gpu = self.gpu.grant(tenant, &policy.gpu);
        if !policy.volumes.is_empty() {
            let root = crate::tenancy::volume_root(&self.config.data_dir, tenant)
                .ok_or_else(|| ServiceError::Internal("invalid tenant name".into()))?;
            let volumes = policy.resolve_volumes(&root).map_err(|e| {
                tracing::error!(%tenant, error = %e, "a volume of the tenant's policy is unusable");
                ServiceError::Volume(e)
            })?;
            limits.preopens = volumes
                .into_iter()
                .map(|v| Preopen {
                    host_path: v.host_path,
                    opened: Some(v.dir),
                    guest_path: v.mount,
                    read_only: v.read_only,
                })
                .collect();
        }
        Ok(limits)
    }

    /// A slot of the tenant's concurrency and of the host's.
    ///
    /// # Errors
    /// With [`Admit::Fail`]: [`ServiceError::TenantBusy`] or
    /// [`ServiceError::HostBusy`] (each counted as a rejection).
    #[tracing::instrument(level = "info", name = "admission", skip(self, mode), fields(%tenant))]
    pub async fn admit(&self, tenant: &str, mode: Admit) -> Result<Permit, ServiceError> {
        let limit = self.policy(tenant).max_concurrency as usize;
        self.admission
            .admit(tenant, limit, mode)
            .await
            .inspect_err(|e| match e {
                ServiceError::TenantBusy { .. } => self.metrics.rejected("tenant-concurrency"),
                ServiceError::HostBusy => self.metrics.rejected("host-saturated"),
                _ => {}
            })
    }

    /// A slot for a call of a public function by an anonymous caller: from
    /// the tenant's `max_anonymous_concurrency`, not its own slots.
    ///
    /// # Errors
    /// [`ServiceError::TenantBusy`] or [`ServiceError::HostBusy`].
    pub fn admit_anonymous(&self, tenant: &str) -> Result<Permit, ServiceError> {
        let _span = tracing::info_span!("admission", %tenant, anonymous = true).entered();
        let limit = self.policy(tenant).max_anonymous_concurrency as usize;
        self.admission
            .admit_anonymous(tenant, limit)
            .inspect_err(|e| match e {
                ServiceError::TenantBusy { .. } => self.metrics.rejected("anonymous-concurrency"),
                ServiceError::HostBusy => self.metrics.rejected("host-saturated"),
                _ => {}
            })
    }

    /// A place for one of the tenant's long-lived requests (a map, a
    /// WebSocket session), to hold for the request's life.
    ///
    /// # Errors
    /// [`ServiceError::TooManyStreams`].
    pub fn open_stream(
        &self,
        tenant: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        let limit = self.policy(tenant).max_streams as usize;
        self.admission
            .open_stream(tenant, limit)
            .inspect_err(|_| self.metrics.rejected("tenant-streams"))
    }

    /// Calls the host can run at once (the instance pool's size).
    pub fn host_capacity(&self) -> usize {
        self.admission.host_capacity()
    }

    /// Controls of a call whose caller does not stream: emitted output is
    /// kept, up to the policy's body size.
    pub fn buffered(&self, tenant: &str) -> CallControl {
        CallControl {
            output_limit: usize::try_from(self.policy(tenant).max_body_bytes).unwrap_or(usize::MAX),
            ..CallControl::default()
        }
    }

    /// Runs one handler call of `target`, in the trace `control` names (the
    /// current request's when it names none).
    pub async fn run(
        &self,
        target: &Target,
        call: CallRequest,
        mut control: CallControl,
    ) -> Invocation {
        let trace = *control.trace.get_or_insert_with(TraceContext::current);
        let span = tracing::info_span!(
            "invocation",
            tenant = %target.function.tenant,
            function = %target.function.name,
            id = %call.invocation_id,
        );
        // Work no request started (a job, a schedule) has no span to hang
        // from: its span joins the invocation's trace directly.
        if TraceContext::of_span(&tracing::Span::current()).is_none() {
            TraceContext::adopt(&span, Some(trace));
        }
        let invocation = self
            .runtime
            .invoke_with(&target.component, call, &target.limits, control)
            .instrument(span.clone())
            .await;
        span.in_scope(|| {
            tracing::debug!(outcome = invocation.outcome.code(), "invocation finished")
        });
        invocation
    }

    /// `record` with the values of `function`'s secrets taken out of what
    /// it captured (output, message), in case the function printed them.
    fn redacted(&self, function: &FunctionRecord, record: InvocationRecord) -> InvocationRecord {
        let values = self.secret_values(function);
        if values.is_empty() {
            return record;
        }
        InvocationRecord {
            stdout: super::secrets::redact(&record.stdout, &values),
            stderr: super::secrets::redact(&record.stderr, &values),
            message: record
                .message
                .map(|message| super::secrets::redact(&message, &values)),
            ..record
        }
    }

    /// Records a finished invocation (and counts it); `status` is what the
    /// caller got. Returns once the record is queued for the record
    /// writer's next batch (see `records`), not written: on the embedded
    /// store the service's reads of records wait for what was queued before
    /// them ([`Service::settle_records`]), so a read after the call's answer
    /// finds it. A lost record does not fail the call it describes.
    pub async fn record(
        &self,
        function: &FunctionRecord,
        started: &Started,
        status: u16,
        invocation: &Invocation,
    ) {
        self.record_releasing(function, started, status, invocation, None)
            .await;
    }

    /// [`Service::record`]; `permit` (the call's concurrency slot) is
    /// released before the record is written, or waits for room in the
    /// writer's queue: a record never holds a slot that a call could use.
    async fn record_releasing(
        &self,
        function: &FunctionRecord,
        started: &Started,
        status: u16,
        invocation: &Invocation,
        permit: Option<Permit>,
    ) {
        let total = started.instant.elapsed();
        self.metrics
            .invocation(invocation.outcome.code(), total.as_secs_f64());
        let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let record = InvocationRecord {
            id: started.id.clone(),
            tenant: function.tenant.clone(),
            function: function.name.clone(),
            version: function.version,
            started_at: started.at,
            status,
            outcome: invocation.outcome.code().to_owned(),
            message: (!invocation.outcome.is_ok()).then(|| invocation.outcome.to_string()),
            timings: TimingsRecord {
                instantiate_us: micros(invocation.timings.instantiate),
                call_us: micros(invocation.timings.call),
                total_us: micros(total),
                reused_instance: invocation.timings.reused,
                ready_instance: invocation.timings.ready,
            },
            peak_memory_bytes: invocation.peak_memory_bytes,
            stdout: invocation.stdout.text(),
            stderr: invocation.stderr.text(),
            stdout_dropped_bytes: invocation.stdout.dropped_bytes,
            stderr_dropped_bytes: invocation.stderr.dropped_bytes,
            egress_denied: invocation.egress_denied.clone(),
            trace_id: Some(started.trace.trace_id()),
        };
        let record = self.redacted(function, record);
        // Off the request path: the writer batches it with others and
        // counts it. With a shared store out of reach, not even waiting for
        // room (the writer retries for a while; beyond the queue, the
        // record is dropped and counted).
        drop(permit);
        let queued = if self.store.shared().is_none() || self.store_reachable() {
            self.records.queue(record).await
        } else {
            self.records.queue_now(record)
        };
        if !queued {
            self.metrics.record_failed();
            // Many at once while the store is away: a line a second.
            if let Some(dropped) = self.records.dropped() {
                tracing::warn!(
                    dropped,
                    "invocation records dropped: the store is out of reach, far behind the calls, or the record writer has stopped"
                );
            }
        }
    }

    /// Waits (blocking the thread) until the records of every call
    /// answered so far are written, on the embedded store: what its reads
    /// of records do first, so that a read after a call's answer finds the
    /// call's record. On a shared store records are written off the
    /// request path as before, and reads do not wait.
    pub fn settle_records(&self) {
        if self.store.shared().is_some() {
            return;
        }
        if !self.records.settle(SETTLE_WITHIN) {
            tracing::warn!(
                "reading invocation records before the writer caught up: it is far behind the calls"
            );
        }
    }

    /// Records `invocation` with the status an invoke would have answered.
    pub async fn record_outcome(
        &self,
        function: &FunctionRecord,
        started: &Started,
        invocation: &Invocation,
    ) {
        self.record(function, started, invocation_status(invocation), invocation)
            .await;
    }

    /// The tenant's wasi:http function `name`, ready to serve, and who is
    /// calling it. A private one is served only to a caller of the same
    /// tenant; anyone else, with a key or without, is told it does not
    /// exist (so that its existence is not revealed). `caller` is asked for
    /// the key's owner; for a public function a bad key only makes the
    /// caller anonymous.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for a missing function, a handler, or a
    /// private function asked for by anyone but its tenant;
    /// [`ServiceError::Unloadable`]; [`ServiceError::Volume`]; what
    /// `caller` fails with, for a private function.
    pub fn http_target<E: From<ServiceError>>(
        &self,
        tenant: &str,
        name: &str,
        caller: impl FnOnce() -> Result<Option<super::Caller>, E>,
    ) -> Result<(Target, Access), E> {
        let not_found =
            || ServiceError::NotFound(format!("no HTTP function `{name}` for tenant `{tenant}`"));
        let deployment = self
            .deployment(tenant, name)
            .filter(|d| d.record.world.serves_http())
            .ok_or_else(not_found)?;
        let access = if deployment.record.public {
            match caller() {
                Ok(Some(super::Caller::Tenant(caller))) if caller == tenant => Access::Owner,
                _ => Access::Anonymous,
            }
        } else {
            match caller()? {
                Some(super::Caller::Tenant(caller)) if caller == tenant => Access::Owner,
                _ => return Err(not_found().into()),
            }
        };
        Ok((self.target(deployment)?, access))
    }

    /// Starts serving one wasi:http request with `target`: returns once
    /// the guest has set its response head (or failed before doing so).
    ///
    /// # Errors
    /// The call could not start: its invocation.
    pub fn serve_http<B>(
        &self,
        target: &Target,
        request: hyper::Request<B>,
        started: &Started,
    ) -> Result<HttpCall, Box<Invocation>>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let _span = tracing::info_span!(
            "invocation",
            tenant = %target.function.tenant,
            function = %target.function.name,
            id = %started.id,
            world = "http",
        )
        .entered();
        let control = started.control(CallControl::default());
        self.runtime
            .serve_http(&target.component, request, &target.limits, control)
    }

    /// Records a wasi:http call once its guest is done (its body may still
    /// be streaming to the caller when this is called); `permit` is held
    /// until the guest is done and its record queued, not while the record
    /// is written.
    pub fn record_when_done(
        self: &Arc<Self>,
        function: FunctionRecord,
        started: Started,
        status: u16,
        permit: Permit,
        completion: tokio::task::JoinHandle<Invocation>,
    ) {
        let service = Arc::clone(self);
        tokio::spawn(async move {
            if let Ok(invocation) = completion.await {
                service
                    .record_releasing(&function, &started, status, &invocation, Some(permit))
                    .await;
            }
        });
    }
}
