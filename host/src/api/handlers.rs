//! Routing and the endpoint handlers.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;

use super::auth::{self, Caller};
use super::problem::Problem;
use super::state::{AppState, Deployment, IssueKeyError, Permit, issue_key};
use super::{ResponseBody, full};
use crate::runtime::{
    CappedBody, Invocation, LoadError, Outcome, Request as CallRequest, World, new_invocation_id,
};
use crate::store::{
    ApiKeyRecord, DeployRequest, FunctionRecord, FunctionWorld, InvocationRecord, TimingsRecord,
    UnixMillis, now_millis,
};
use crate::tenancy::{Policy, valid_name};

type Response = http::Response<ResponseBody>;
pub(super) type Handled = Result<Response, Problem>;

const OPENAPI: &str = include_str!("openapi.json");

/// Dispatches one request; every failure becomes a problem document.
pub(crate) async fn route(state: Arc<AppState>, request: hyper::Request<Incoming>) -> Response {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    let result = match (segments.as_slice(), &method) {
        (["healthz"], &Method::GET) => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (["metrics"], &Method::GET) => Ok(metrics(&state)),
        (["v1", "openapi.json"], &Method::GET) => Ok(with_type(
            http::Response::new(full(OPENAPI)),
            "application/json",
        )),
        (["v1", "functions"], &Method::GET) => list_functions(&state, request.headers()),
        (["v1", "functions", name], &Method::PUT) => deploy(&state, name, request).await,
        (["v1", "functions", name], &Method::GET) => get_function(&state, request.headers(), name),
        (["v1", "functions", name], &Method::DELETE) => {
            delete_function(&state, request.headers(), name)
        }
        (["v1", "functions", name, "invoke"], &Method::POST) => {
            let name = (*name).to_owned();
            invoke(&state, &name, request).await
        }
        (["v1", "functions", name, "map"], &Method::POST) => {
            let name = (*name).to_owned();
            super::map::map(&state, &name, request).await
        }
        (["v1", "functions", name, "spawn"], &Method::POST) => {
            let name = (*name).to_owned();
            super::jobs::spawn(&state, &name, request).await
        }
        (["v1", "functions", name, "schedule"], &Method::PUT) => {
            let name = (*name).to_owned();
            super::schedules::put(&state, &name, request).await
        }
        (["v1", "functions", name, "schedule"], &Method::GET) => {
            super::schedules::get(&state, request.headers(), name)
        }
        (["v1", "functions", name, "schedule"], &Method::DELETE) => {
            super::schedules::delete(&state, request.headers(), name)
        }
        (["v1", "jobs", id], &Method::GET) => super::jobs::get(&state, request.headers(), id),
        (["v1", "jobs", id], &Method::DELETE) => super::jobs::delete(&state, request.headers(), id),
        (["v1", "functions", name, "ws"], &Method::GET) => {
            let name = (*name).to_owned();
            super::stream::websocket(&state, &name, request).await
        }
        (["v1", "functions", name, "logs"], &Method::GET) => logs(&state, &request, name),
        (["v1", "invocations", id], &Method::GET) => get_invocation(&state, request.headers(), id),
        (["v1", "usage"], &Method::GET) => usage(&state, request.headers()),
        (["v1", "models"], &Method::GET) => list_models(&state, request.headers()),
        (["v1", "keys"], &Method::POST) => create_own_key(&state, request.headers()),
        (["v1", "keys"], &Method::GET) => list_own_keys(&state, request.headers()),
        (["v1", "keys", id], &Method::DELETE) => revoke_own_key(&state, request.headers(), id),
        (["v1", "tenants"], &Method::POST) => create_tenant(&state, request).await,
        (["v1", "tenants"], &Method::GET) => list_tenants(&state, request.headers()),
        (["v1", "tenants", tenant, "keys"], &Method::POST) => {
            admin_create_key(&state, request.headers(), tenant)
        }
        (["v1", "tenants", tenant, "keys", id], &Method::DELETE) => {
            admin_revoke_key(&state, request.headers(), tenant, id)
        }
        (["http", tenant, name, ..], _) => {
            let (tenant, name) = ((*tenant).to_owned(), (*name).to_owned());
            serve_http(&state, &tenant, &name, request).await
        }
        _ if known_path(&segments) => Err(Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!("{method} is not supported on {path}"),
        )),
        _ => Err(Problem::not_found(format!("no endpoint {path}"))),
    };
    result.unwrap_or_else(Problem::into_response)
}

fn known_path(segments: &[&str]) -> bool {
    matches!(
        segments,
        ["healthz"]
            | ["metrics"]
            | ["v1", "openapi.json"]
            | ["v1", "functions"]
            | ["v1", "functions", _]
            | [
                "v1",
                "functions",
                _,
                "invoke" | "logs" | "map" | "spawn" | "schedule" | "ws"
            ]
            | ["v1", "jobs", _]
            | ["v1", "invocations", _]
            | ["v1", "keys"]
            | ["v1", "keys", _]
            | ["v1", "usage"]
            | ["v1", "models"]
            | ["v1", "tenants"]
            | ["v1", "tenants", _, "keys"]
            | ["v1", "tenants", _, "keys", _]
    )
}

fn with_type(mut response: Response, content_type: &'static str) -> Response {
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(super) fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut response = with_type(http::Response::new(full(body)), "application/json");
    *response.status_mut() = status;
    response
}

pub(super) fn empty(status: StatusCode) -> Response {
    let mut response = http::Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}

pub(super) fn rfc3339(millis: UnixMillis) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis);
    humantime::format_rfc3339_millis(time).to_string()
}

fn function_json(record: &FunctionRecord, schedule: Option<&str>) -> serde_json::Value {
    json!({
        "name": record.name,
        "version": record.version,
        "digest": record.digest,
        "size": record.size,
        "world": match record.world { FunctionWorld::Handler => "handler", FunctionWorld::Http => "http" },
        "public": record.public,
        "retryable": record.retryable,
        "schedule": schedule,
        "created_at": rfc3339(record.created_at),
        "updated_at": rfc3339(record.updated_at),
    })
}

fn invocation_json(record: &InvocationRecord) -> serde_json::Value {
    json!({
        "id": record.id,
        "function": record.function,
        "version": record.version,
        "started_at": rfc3339(record.started_at),
        "status": record.status,
        "outcome": record.outcome,
        "message": record.message,
        "timings": record.timings,
        "peak_memory_bytes": record.peak_memory_bytes,
        "stdout": record.stdout,
        "stderr": record.stderr,
        "stdout_dropped_bytes": record.stdout_dropped_bytes,
        "stderr_dropped_bytes": record.stderr_dropped_bytes,
    })
}

fn key_json(record: &ApiKeyRecord) -> serde_json::Value {
    json!({"id": record.id, "tenant": record.tenant, "created_at": rfc3339(record.created_at)})
}

fn metrics(state: &AppState) -> Response {
    let loaded = state.functions_loaded();
    let (queued, running) = state.jobs.counts();
    state.metrics.jobs(queued, running);
    let text = state.metrics.render(
        state.runtime.stats(),
        state.host_gate.in_flight(),
        loaded,
        state.gpu.bridge().devices(),
    );
    with_type(
        http::Response::new(full(text)),
        "text/plain; version=0.0.4; charset=utf-8",
    )
}

fn checked_name<'a>(name: &'a str, what: &str) -> Result<&'a str, Problem> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(Problem::bad_request(
            "invalid-name",
            format!(
                "`{name}` is not a valid {what} name: use 1-63 of a-z, 0-9 and `-`, starting with a letter or digit"
            ),
        ))
    }
}

/// The body length the client declared, if it sent a valid `Content-Length`.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Bytes of an oversized body the server still reads (and discards) before
/// answering 413, so that a client that does not wait for `100 Continue`
/// gets the answer instead of a broken pipe. Beyond it the connection closes.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads a body, refusing it with 413 as soon as it passes `limit` (and
/// before reading anything when `Content-Length` already says so).
pub(super) async fn read_capped(
    request: hyper::Request<Incoming>,
    limit: u64,
    what: &str,
) -> Result<(http::request::Parts, Bytes), Problem> {
    let declared = declared_length(request.headers());
    let (parts, mut body) = request.into_parts();
    if declared.is_some_and(|length| length > limit) {
        if declared.is_some_and(|length| length <= DRAIN_LIMIT) {
            drain(&mut body).await;
        }
        return Err(Problem::too_large(limit, what));
    }
    let mut collected = bytes::BytesMut::new();
    let mut over = false;
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Problem::bad_request(
                "invalid-request",
                format!("reading the request body failed: {e}"),
            )
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > limit {
            // Stop keeping it; keep reading (to a bound) so the client can
            // finish sending and read our answer.
            over = true;
            collected.clear();
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        collected.extend_from_slice(data);
    }
    if over {
        return Err(Problem::too_large(limit, what));
    }
    Ok((parts, collected.freeze()))
}

async fn drain(body: &mut Incoming) {
    let mut seen: u64 = 0;
    let discard = async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), discard).await;
}

fn query_param<'a>(uri: &'a http::Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

pub(super) fn found(state: &AppState, tenant: &str, name: &str) -> Result<Deployment, Problem> {
    state
        .deployment(tenant, name)
        .ok_or_else(|| Problem::not_found(format!("no function `{name}`")))
}

/// The tenant's function `name`, which must be a handler (a wasi:http
/// function cannot be invoked, mapped, spawned or scheduled); `instead`
/// ends the error, telling the caller what to do.
pub(super) fn found_handler(
    state: &AppState,
    tenant: &str,
    name: &str,
    instead: &str,
) -> Result<Deployment, Problem> {
    let deployment = found(state, tenant, name)?;
    if deployment.record.world != crate::store::FunctionWorld::Handler {
        return Err(Problem::bad_request(
            "wrong-world",
            format!("`{name}` serves wasi:http; {instead}"),
        ));
    }
    Ok(deployment)
}

/// A handler function found by [`found_handler`], with its compiled
/// component.
pub(super) fn handler_component(
    state: &AppState,
    tenant: &str,
    name: &str,
    instead: &str,
) -> Result<(Deployment, crate::runtime::LoadedComponent), Problem> {
    let deployment = found_handler(state, tenant, name, instead)?;
    let component = deployment
        .component
        .clone()
        .map_err(|reason| Problem::internal(format!("`{name}` could not be loaded: {reason}")))?;
    Ok((deployment, component))
}

// ---- functions ------------------------------------------------------------

async fn deploy(state: &Arc<AppState>, name: &str, request: hyper::Request<Incoming>) -> Handled {
    let tenant = auth::tenant(state, request.headers())?;
    let name = checked_name(name, "function")?.to_owned();
    let flag = |name: &str| match query_param(request.uri(), name) {
        None | Some("false") => Ok(false),
        Some("true" | "") => Ok(true),
        Some(other) => Err(Problem::bad_request(
            "invalid-request",
            format!("`{name}` must be true or false, not `{other}`"),
        )),
    };
    let public = flag("public")?;
    let retryable = flag("retryable")?;
    let policy = state.policies.for_tenant(&tenant);
    let (_, bytes) = read_capped(request, policy.max_component_bytes, "the component").await?;
    let digest = crate::runtime::Digest::of(&bytes);
    let size = bytes.len() as u64;
    let loader_state = Arc::clone(state);
    let loaded = tokio::task::spawn_blocking(move || {
        // Validate and compile before storing anything: a bad upload leaves
        // no trace. The blob is written before the metadata that points to
        // it, so a crash in between leaves an orphan blob, never a function
        // without its component.
        let component = loader_state.runtime.load(&bytes)?;
        Ok::<_, LoadError>((component, loader_state.blobs.put(&digest, &bytes)))
    })
    .await
    .map_err(|e| Problem::internal(format!("compiling panicked: {e}")))?;
    let (component, stored) = match loaded {
        Ok(result) => result,
        Err(error) => {
            state.metrics.deploy("invalid");
            return Err(load_problem(error));
        }
    };
    stored?;
    let world = match component.world() {
        World::Http => FunctionWorld::Http,
        _ => FunctionWorld::Handler,
    };
    let deployed = state.store.deploy(&DeployRequest {
        tenant,
        name,
        digest: digest.to_string(),
        size,
        world,
        public,
        retryable,
    })?;
    state.put_deployment(Deployment {
        record: deployed.function.clone(),
        component: Ok(component),
    });
    state.metrics.deploy(if deployed.changed {
        "created"
    } else {
        "unchanged"
    });
    let status = if deployed.changed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let schedule = state
        .store
        .schedule(&deployed.function.tenant, &deployed.function.name)?;
    Ok(json_response(
        status,
        &function_json(
            &deployed.function,
            schedule.as_ref().map(|s| s.cron.as_str()),
        ),
    ))
}

fn load_problem(error: LoadError) -> Problem {
    let detail = error.to_string();
    match error {
        LoadError::CoreModule => Problem::bad_request("core-module", detail),
        LoadError::UnsatisfiedImports { imports, .. } => {
            Problem::bad_request("unsatisfied-imports", detail).with_imports(imports)
        }
        LoadError::MissingExport { .. } | LoadError::ExportMismatch(_) => {
            Problem::bad_request("missing-export", detail)
        }
        _ => Problem::bad_request("invalid-component", detail),
    }
}

fn list_functions(state: &AppState, headers: &HeaderMap) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    let functions = state
        .store
        .functions(&tenant)?
        .iter()
        .map(|f| {
            let schedule = state.store.schedule(&tenant, &f.name)?;
            Ok(function_json(f, schedule.as_ref().map(|s| s.cron.as_str())))
        })
        .collect::<Result<Vec<_>, crate::store::StoreError>>()?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "functions": functions }),
    ))
}

fn get_function(state: &AppState, headers: &HeaderMap, name: &str) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    let record = state
        .store
        .function(&tenant, name)?
        .ok_or_else(|| Problem::not_found(format!("no function `{name}`")))?;
    let schedule = state.store.schedule(&tenant, name)?;
    Ok(json_response(
        StatusCode::OK,
        &function_json(&record, schedule.as_ref().map(|s| s.cron.as_str())),
    ))
}

fn delete_function(state: &AppState, headers: &HeaderMap, name: &str) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    let deleted = state
        .store
        .delete_function(&tenant, name)?
        .ok_or_else(|| Problem::not_found(format!("no function `{name}`")))?;
    state.remove_deployment(&tenant, name);
    // A schedule runs its function: it goes with it.
    if state.store.delete_schedule(&tenant, name)? {
        state.schedules.remove(&tenant, name);
    }
    // The blob goes when nothing else uses it (another tenant may have
    // deployed the same bytes).
    if let Some(digest) = crate::runtime::Digest::parse(&deleted.digest)
        && !state.store.digest_in_use(&deleted.digest)?
        && let Err(e) = state.blobs.remove(&digest)
    {
        tracing::warn!(%digest, error = %e, "could not remove an unused blob");
    }
    Ok(empty(StatusCode::NO_CONTENT))
}

fn logs(state: &AppState, request: &hyper::Request<Incoming>, name: &str) -> Handled {
    let tenant = auth::tenant(state, request.headers())?;
    let limit = match query_param(request.uri(), "limit") {
        None => 50,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| Problem::bad_request("invalid-request", "`limit` must be 1..=1000"))?,
    };
    if state.store.function(&tenant, name)?.is_none() {
        return Err(Problem::not_found(format!("no function `{name}`")));
    }
    let records = state.store.invocations(&tenant, name, limit)?;
    let invocations: Vec<_> = records.iter().map(invocation_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "invocations": invocations }),
    ))
}

fn get_invocation(state: &AppState, headers: &HeaderMap, id: &str) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    let record = state
        .store
        .invocation(&tenant, id)?
        .ok_or_else(|| Problem::not_found(format!("no invocation `{id}`")))?;
    Ok(json_response(StatusCode::OK, &invocation_json(&record)))
}

// ---- invocation -----------------------------------------------------------

/// Both gates of a call: the tenant's `max_concurrency` and the host's
/// instance capacity.
fn admit(state: &AppState, tenant: &str, policy: &Policy) -> Result<(Permit, Permit), Problem> {
    let tenant_permit = state
        .tenant_gate(tenant)
        .try_acquire(policy.max_concurrency as usize)
        .ok_or_else(|| {
            state.metrics.rejected("tenant-concurrency");
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                format!(
                    "the tenant is at its limit of {} concurrent calls",
                    policy.max_concurrency
                ),
            )
            .retry_after(1)
        })?;
    let host_permit = state
        .host_gate
        .try_acquire(state.host_capacity)
        .ok_or_else(|| {
            state.metrics.rejected("host-saturated");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the host is at capacity; retry shortly",
            )
            .retry_after(1)
        })?;
    Ok((tenant_permit, host_permit))
}

/// The policy's limits for a call of `function`, plus its volumes,
/// resolved (and checked to stay inside the tenant's volume root).
pub(super) fn call_limits(
    state: &AppState,
    tenant: &str,
    function: &str,
    policy: &Policy,
) -> Result<crate::runtime::CallLimits, Problem> {
    let mut limits = policy.call_limits(tenant, function);
    limits.gpu = state.gpu.grant(tenant, &policy.gpu);
    if !policy.volumes.is_empty() {
        let root = crate::tenancy::volume_root(&state.config.data_dir, tenant)
            .ok_or_else(|| Problem::internal("invalid tenant name"))?;
        let volumes = policy.resolve_volumes(&root).map_err(|e| {
            tracing::error!(%tenant, error = %e, "a volume of the tenant's policy is unusable");
            Problem::internal(format!("a volume of this tenant is unavailable: {e}"))
        })?;
        limits.preopens = volumes
            .into_iter()
            .map(|v| crate::runtime::Preopen {
                host_path: v.host_path,
                guest_path: v.mount,
                read_only: v.read_only,
            })
            .collect();
    }
    Ok(limits)
}

/// Controls of a call whose caller does not stream: emitted output is kept,
/// up to the policy's body size.
pub(super) fn buffered(policy: &Policy) -> crate::runtime::CallControl {
    crate::runtime::CallControl {
        output_limit: usize::try_from(policy.max_body_bytes).unwrap_or(usize::MAX),
        ..crate::runtime::CallControl::default()
    }
}

/// Headers a function never sees: credentials and hop-by-hop headers.
fn passed_through(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "authorization"
            | "cookie"
            | "proxy-authorization"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Headers a function may not set on its response.
fn settable(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    !name.starts_with("gust-")
        && !matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
                | "content-length"
                | "content-type"
        )
}

async fn invoke(state: &Arc<AppState>, name: &str, request: hyper::Request<Incoming>) -> Handled {
    let tenant = auth::tenant(state, request.headers())?;
    let (deployment, component) = handler_component(
        state,
        &tenant,
        name,
        &format!("call it at /http/{tenant}/{name}/"),
    )?;
    let policy = state.policies.for_tenant(&tenant);
    let permits = admit(state, &tenant, policy)?;
    let (parts, body) = read_capped(request, policy.max_body_bytes, "the request body").await?;
    let started_at = now_millis();
    let started = Instant::now();
    let id = new_invocation_id(started_at);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| passed_through(name) && *name != header::CONTENT_TYPE)
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let call = CallRequest {
        body: body.to_vec(),
        content_type,
        headers,
        invocation_id: id.clone(),
    };
    let limits = call_limits(state, &tenant, name, policy)?;
    if super::stream::wants_events(&parts.headers) {
        return Ok(super::stream::events(super::stream::Admitted {
            state: Arc::clone(state),
            function: deployment.record.clone(),
            component,
            limits,
            call,
            started_at,
            started,
            permits,
        }));
    }
    let invocation = state
        .runtime
        .invoke_with(&component, call, &limits, buffered(policy))
        .await;
    drop(permits);
    let response = outcome_response(&invocation, &id);
    record(
        state,
        &deployment.record,
        &id,
        started_at,
        started,
        response.status().as_u16(),
        &invocation,
    );
    Ok(response)
}

fn outcome_response(invocation: &Invocation, id: &str) -> Response {
    match &invocation.outcome {
        Outcome::Ok(reply) => {
            let status =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = http::Response::new(full(reply.body.clone()));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            for (name, value) in &reply.headers {
                if !settable(name) {
                    continue;
                }
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    headers.append(name, value);
                }
            }
            if let Ok(value) = HeaderValue::from_str(&reply.content_type) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            if let Ok(value) = HeaderValue::from_str(id) {
                headers.insert("gust-invocation-id", value);
            }
            response
        }
        other => outcome_problem(other).with_invocation(id).into_response(),
    }
}

pub(super) fn outcome_problem(outcome: &Outcome) -> Problem {
    let detail = outcome.to_string();
    match outcome {
        Outcome::GuestError(error) => {
            let status = StatusCode::from_u16(error.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let problem = Problem::new(status, &error.code, error.message.clone());
            // A function answering "busy" (a full model queue, a used-up
            // quota) tells well-behaved clients when to come back.
            if matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ) {
                problem.retry_after(1)
            } else {
                problem
            }
        }
        Outcome::Timeout { .. } => Problem::new(StatusCode::GATEWAY_TIMEOUT, "timeout", detail),
        Outcome::Overloaded { .. } => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", detail).retry_after(1)
        }
        Outcome::OutOfMemory { .. } => {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "out-of-memory", detail)
        }
        Outcome::StackOverflow { .. } => {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "stack-overflow", detail)
        }
        Outcome::Trap { .. } => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "trap", detail),
        Outcome::Cancelled => Problem::new(
            StatusCode::from_u16(super::jobs::CANCELLED_STATUS)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "cancelled",
            detail,
        ),
        _ => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "host-error", detail),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn record(
    state: &AppState,
    function: &FunctionRecord,
    id: &str,
    started_at: UnixMillis,
    started: Instant,
    status: u16,
    invocation: &Invocation,
) {
    let total = started.elapsed();
    state
        .metrics
        .invocation(invocation.outcome.code(), total.as_secs_f64());
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let record = InvocationRecord {
        id: id.to_owned(),
        tenant: function.tenant.clone(),
        function: function.name.clone(),
        version: function.version,
        started_at,
        status,
        outcome: invocation.outcome.code().to_owned(),
        message: (!invocation.outcome.is_ok()).then(|| invocation.outcome.to_string()),
        timings: TimingsRecord {
            instantiate_us: micros(invocation.timings.instantiate),
            call_us: micros(invocation.timings.call),
            total_us: micros(total),
            reused_instance: invocation.timings.reused,
        },
        peak_memory_bytes: invocation.peak_memory_bytes,
        stdout: invocation.stdout.text(),
        stderr: invocation.stderr.text(),
        stdout_dropped_bytes: invocation.stdout.dropped_bytes,
        stderr_dropped_bytes: invocation.stderr.dropped_bytes,
    };
    // A lost record must not fail the call it describes.
    if let Err(e) = state.store.record_invocation(&record) {
        tracing::error!(invocation = %id, error = %e, "could not record the invocation");
    }
}

async fn serve_http(
    state: &Arc<AppState>,
    tenant: &str,
    name: &str,
    request: hyper::Request<Incoming>,
) -> Handled {
    let deployment = state
        .deployment(tenant, name)
        .filter(|d| d.record.world == FunctionWorld::Http)
        .ok_or_else(|| {
            Problem::not_found(format!("no HTTP function `{name}` for tenant `{tenant}`"))
        })?;
    if !deployment.record.public {
        // A key of another tenant learns nothing: same 404 as a missing function.
        match auth::caller(state, request.headers())? {
            Some(Caller::Tenant(caller)) if caller == tenant => {}
            Some(_) => {
                return Err(Problem::not_found(format!(
                    "no HTTP function `{name}` for tenant `{tenant}`"
                )));
            }
            None => {
                return Err(Problem::unauthorized(
                    "this function is private: an API key is required",
                ));
            }
        }
    }
    let component = deployment
        .component
        .clone()
        .map_err(|reason| Problem::internal(format!("`{name}` could not be loaded: {reason}")))?;
    let policy = state.policies.for_tenant(tenant);
    if declared_length(request.headers()).is_some_and(|length| length > policy.max_body_bytes) {
        return Err(Problem::too_large(
            policy.max_body_bytes,
            "the request body",
        ));
    }
    let permits = admit(state, tenant, policy)?;
    let started_at = now_millis();
    let started = Instant::now();
    let id = new_invocation_id(started_at);

    // The component sees the path after /http/{tenant}/{name}.
    let (mut parts, body) = request.into_parts();
    let prefix_len = format!("/http/{tenant}/{name}").len();
    let rest = parts.uri.path().get(prefix_len..).unwrap_or("");
    let rest = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_owned(),
    };
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    parts.uri = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| Problem::bad_request("invalid-request", format!("bad request target: {e}")))?;
    parts.headers.remove(header::AUTHORIZATION);
    // What the caller sent under this name is not to be trusted: the host's
    // own id replaces it, so the function can tie its logs to the record.
    parts.headers.remove("gust-invocation-id");
    if let Ok(value) = HeaderValue::from_str(&id) {
        parts.headers.insert("gust-invocation-id", value);
    }
    let request = hyper::Request::from_parts(parts, CappedBody::new(body, policy.max_body_bytes));

    let call = state
        .runtime
        .serve_http(
            &component,
            request,
            &call_limits(state, tenant, name, policy)?,
        )
        .map_err(|invocation| outcome_problem(&invocation.outcome).with_invocation(&id))?;
    let response = call.response.await;
    let (response, status) = match response {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let (mut parts, body) = response.into_parts();
            if let Ok(value) = HeaderValue::from_str(&id) {
                parts.headers.insert("gust-invocation-id", value);
            }
            let body = body
                .map_err(|e| -> super::BoxError { Box::new(e) })
                .boxed_unsync();
            (Some(http::Response::from_parts(parts, body)), status)
        }
        Ok(Err(code)) => (
            Some(
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "function-http-error",
                    format!("the function answered with an error: {code:?}"),
                )
                .with_invocation(&id)
                .into_response(),
            ),
            502,
        ),
        Err(_) => (None, 0),
    };
    let background = Arc::clone(state);
    let record_id = id.clone();
    let function = deployment.record.clone();
    let completion = call.completion;
    match response {
        Some(response) => {
            // The body may still be streaming: record when the guest is done.
            tokio::spawn(async move {
                let _permits = permits;
                if let Ok(invocation) = completion.await {
                    record(
                        &background,
                        &function,
                        &record_id,
                        started_at,
                        started,
                        status,
                        &invocation,
                    );
                }
            });
            Ok(response)
        }
        None => {
            let invocation = completion
                .await
                .unwrap_or_else(|e| Invocation::host_error(&format!("the call panicked: {e}")));
            drop(permits);
            let invocation = if invocation.outcome.is_ok() {
                Invocation::host_error("the function returned without setting a response")
            } else {
                invocation
            };
            let problem = outcome_problem(&invocation.outcome).with_invocation(&id);
            record(
                state,
                &function,
                &id,
                started_at,
                started,
                problem.status().as_u16(),
                &invocation,
            );
            Ok(problem.into_response())
        }
    }
}

// ---- keys and tenants -----------------------------------------------------

/// A new key of `tenant`, as the API shows it: with the secret, once.
fn new_key_json(state: &AppState, tenant: &str) -> Result<serde_json::Value, Problem> {
    let (record, secret) = issue_key(state.store.as_ref(), tenant).map_err(|e| match e {
        IssueKeyError::Store(store) => Problem::from(store),
        other => Problem::internal(other.to_string()),
    })?;
    let mut body = key_json(&record);
    body["key"] = json!(secret);
    Ok(body)
}

fn new_key(state: &AppState, tenant: &str) -> Handled {
    Ok(json_response(
        StatusCode::CREATED,
        &new_key_json(state, tenant)?,
    ))
}

fn create_own_key(state: &AppState, headers: &HeaderMap) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    new_key(state, &tenant)
}

fn list_own_keys(state: &AppState, headers: &HeaderMap) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    let keys: Vec<_> = state.store.keys(&tenant)?.iter().map(key_json).collect();
    Ok(json_response(StatusCode::OK, &json!({ "keys": keys })))
}

/// The caller's use of the GPU bridge: device time and device memory,
/// against its policy's quotas. Kept per tenant in the API rather than as a
/// metric label, since the number of tenants is not bounded.
fn usage(state: &AppState, headers: &HeaderMap) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    let policy = state.policies.for_tenant(&tenant);
    let account = state.gpu.existing_account(&tenant);
    let devices: Vec<_> = state
        .gpu
        .grant(&tenant, &policy.gpu)
        .map(|grant| {
            grant
                .devices
                .iter()
                .map(|d| {
                    let info = d.description();
                    json!({"backend": info.kind.as_str(), "name": info.name, "is_gpu": info.is_gpu})
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "tenant": tenant,
            "gpu": {
                "devices": devices,
                "device_seconds": account.as_ref().map_or(0.0, |a| a.device_time().as_secs_f64()),
                "memory_bytes": account.as_ref().map_or(0, |a| a.used_bytes()),
                "peak_memory_bytes": account.as_ref().map_or(0, |a| a.peak_bytes()),
                "memory_limit_bytes": policy.gpu.memory_mb.saturating_mul(1 << 20),
                "time_ms_per_minute": policy.gpu.time_ms_per_minute,
            }
        }),
    ))
}

/// The host's models: which the caller may load, and which are resident on
/// which device. The registry's counters are host-wide (a load serves every
/// tenant allowed the model), so they show whether calls find models warm.
fn list_models(state: &AppState, headers: &HeaderMap) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    let policy = state.policies.for_tenant(&tenant);
    let registry = state.gpu.models();
    let devices = state.gpu.bridge().devices();
    let models: Vec<_> = registry
        .list()
        .map(|entry| {
            let name = &entry.manifest.name;
            let resident: Vec<&str> = devices
                .iter()
                .filter(|d| registry.resident_models(d).iter().any(|m| m == name))
                .map(|d| d.kind().as_str())
                .collect();
            json!({
                "name": name,
                "family": entry.manifest.family,
                "dtype": entry.manifest.dtype.as_str(),
                "allowed": policy.gpu.allows_model(name),
                "batching": entry.manifest.batching.map(|b| json!({
                    "max_batch": b.max_batch,
                    "max_delay_ms": b.max_delay_ms,
                    "max_queue": b.queue_limit(),
                })),
                "resident_on": resident,
            })
        })
        .collect();
    let stats = registry.stats();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "models": models,
            "stats": {
                "loads": stats.loads,
                "hits": stats.hits,
                "failures": stats.failures,
                "evictions": stats.evictions,
            },
        }),
    ))
}

fn revoke(state: &AppState, tenant: &str, id: &str) -> Handled {
    if state.store.revoke_key(tenant, id)? {
        Ok(empty(StatusCode::NO_CONTENT))
    } else {
        Err(Problem::not_found(format!("no key `{id}`")))
    }
}

fn revoke_own_key(state: &AppState, headers: &HeaderMap, id: &str) -> Handled {
    let tenant = auth::tenant(state, headers)?;
    revoke(state, &tenant, id)
}

async fn create_tenant(state: &AppState, request: hyper::Request<Incoming>) -> Handled {
    auth::admin(state, request.headers())?;
    let (_, body) = read_capped(request, 64 << 10, "the request body").await?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewTenant {
        name: String,
    }
    let new: NewTenant = serde_json::from_slice(&body).map_err(|e| {
        Problem::bad_request(
            "invalid-request",
            format!("expected {{\"name\": \"…\"}}: {e}"),
        )
    })?;
    let name = checked_name(&new.name, "tenant")?;
    let tenant = state.store.create_tenant(name).map_err(|e| match e {
        crate::store::StoreError::Conflict(_) => Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("tenant `{name}` already exists"),
        ),
        other => Problem::from(other),
    })?;
    let key_json = new_key_json(state, name)?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"tenant": {"name": tenant.name, "created_at": rfc3339(tenant.created_at)}, "key": key_json}),
    ))
}

fn list_tenants(state: &AppState, headers: &HeaderMap) -> Handled {
    auth::admin(state, headers)?;
    let tenants: Vec<_> = state
        .store
        .tenants()?
        .iter()
        .map(|t| json!({"name": t.name, "created_at": rfc3339(t.created_at)}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "tenants": tenants }),
    ))
}

fn admin_create_key(state: &AppState, headers: &HeaderMap, tenant: &str) -> Handled {
    auth::admin(state, headers)?;
    if state.store.tenant(tenant)?.is_none() {
        return Err(Problem::not_found(format!("no tenant `{tenant}`")));
    }
    new_key(state, tenant)
}

fn admin_revoke_key(state: &AppState, headers: &HeaderMap, tenant: &str, id: &str) -> Handled {
    auth::admin(state, headers)?;
    revoke(state, tenant, id)
}
