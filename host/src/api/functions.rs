//! Functions and their records: deploy, list, get, delete, logs and
//! invocations.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use http::StatusCode;
use serde::Deserialize;

use super::extract::{Params, QueryParams, TenantKey, flag, read_capped};
use super::problem::Problem;
use super::{Handled, empty, json_response};
use crate::service::Service;
use crate::wire;

/// `?public=…&retryable=…&secrets=…` of a deploy; `config=KEY=VALUE`
/// (repeatable) is read from the raw query by [`deploy_config`].
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeployFlags {
    /// Serve `/http/{tenant}/{name}/…` to callers without a key.
    public: Option<String>,
    /// Run an interrupted job of this function once more.
    retryable: Option<String>,
    /// The tenant's secrets (comma-separated names) its calls get as
    /// environment variables; each must exist.
    secrets: Option<String>,
}

/// `?limit=N&cursor=C` of the logs.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct LogsQuery {
    /// Records to return, 1..=1000 (default 50); a page also stops at 4 MiB
    /// of captured output.
    limit: Option<String>,
    /// Where to go on from: the `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Deploy a component as the function `name`.
///
/// Validates and compiles the component before anything is stored; answers
/// `201` for a new version, `200` when bytes and flags are unchanged.
#[utoipa::path(
    put, path = "/v1/functions/{name}", tag = "functions", operation_id = "deployFunction",
    params(
        ("name" = String, Path, description = "Function name"),
        DeployFlags,
        ("config" = Option<Vec<String>>, Query, description = "A configuration value the function reads through wasi:config/store, as `KEY=VALUE` (repeat for more; over the tenant policy's `[config]`)"),
    ),
    request_body(description = "The component's bytes (any content type)", content((Vec<u8> = "application/wasm"), (Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 201, description = "A new version", body = wire::Function),
        (status = 200, description = "Unchanged", body = wire::Function),
        (status = 400, description = "Invalid name, flags or component (invalid-name, invalid-component, …), a bad configuration value (invalid-config), or a secret the tenant does not have (invalid-secret, invalid-secret-name)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within the host's body timeout", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Larger than the policy allows", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many deploys are waiting to compile", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "Beyond the policy's max_functions or max_storage_bytes, or the host's disk is full", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn deploy(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    QueryParams(flags): QueryParams<DeployFlags>,
    request: Request,
) -> Handled {
    crate::service::checked_name(&name, "function")?;
    let public = flag(flags.public.as_deref(), "public")?;
    let retryable = flag(flags.retryable.as_deref(), "retryable")?;
    let secrets = flags
        .secrets
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    let config = deploy_config(request.uri().query())?;
    let limit = service.policy(&tenant).max_component_bytes;
    let (_, bytes) = read_capped(request, limit, "the component").await?;
    let options = crate::service::DeployOptions {
        public,
        retryable,
        secrets,
        config,
    };
    let deployed = service.deploy(&tenant, &name, bytes, options).await?;
    let status = if deployed.changed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(
        status,
        &wire::Function::from_record(&deployed.function, deployed.schedule.as_deref()),
    ))
}

/// The `config=KEY=VALUE` pairs of a deploy's query (a key given twice:
/// the last wins), checked.
fn deploy_config(query: Option<&str>) -> Result<BTreeMap<String, String>, Problem> {
    let mut config = BTreeMap::new();
    for (name, pair) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if name != "config" {
            continue;
        }
        let Some((key, value)) = pair.split_once('=') else {
            return Err(Problem::bad_request(
                "invalid-config",
                format!("`config={pair}` must be `config=KEY=VALUE`"),
            ));
        };
        config.insert(key.to_owned(), value.to_owned());
    }
    crate::service::check_config(&config)?;
    Ok(config)
}

/// List the caller's functions.
#[utoipa::path(
    get, path = "/v1/functions", tag = "functions", operation_id = "listFunctions",
    responses(
        (status = 200, description = "The tenant's functions", body = wire::FunctionList),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
) -> Handled {
    let functions = super::blocking(&service, move |s| s.functions(&tenant))
        .await?
        .iter()
        .map(|(f, schedule)| wire::Function::from_record(f, schedule.as_deref()))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &wire::FunctionList { functions },
    ))
}

/// One function.
#[utoipa::path(
    get, path = "/v1/functions/{name}", tag = "functions", operation_id = "getFunction",
    params(("name" = String, Path, description = "Function name")),
    responses(
        (status = 200, description = "The function", body = wire::Function),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
) -> Handled {
    let (record, schedule) = super::blocking(&service, move |s| s.function(&tenant, &name)).await?;
    Ok(json_response(
        StatusCode::OK,
        &wire::Function::from_record(&record, schedule.as_deref()),
    ))
}

/// Delete a function (with its schedule).
#[utoipa::path(
    delete, path = "/v1/functions/{name}", tag = "functions", operation_id = "deleteFunction",
    params(("name" = String, Path, description = "Function name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn delete(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
) -> Handled {
    super::blocking(&service, move |s| s.delete_function(&tenant, &name)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// Recent invocations of a function, newest first.
#[utoipa::path(
    get, path = "/v1/functions/{name}/logs", tag = "functions", operation_id = "functionLogs",
    params(("name" = String, Path, description = "Function name"), LogsQuery),
    responses(
        (status = 200, description = "Its invocation records", body = wire::InvocationList),
        (status = 400, description = "`limit` out of range or a malformed `cursor`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn logs(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    QueryParams(query): QueryParams<LogsQuery>,
) -> Handled {
    let limit = match query.limit {
        None => 50,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| Problem::bad_request("invalid-request", "`limit` must be 1..=1000"))?,
    };
    let cursor = query
        .cursor
        .map(|raw| {
            raw.parse::<u64>().map_err(|_| {
                Problem::bad_request(
                    "invalid-request",
                    "`cursor` must be the `next_cursor` of an earlier page",
                )
            })
        })
        .transpose()?;
    // Up to a page of records (4 MiB) read from the store.
    let (records, next) = super::blocking(&service, move |s| {
        s.invocations(&tenant, &name, limit, cursor)
    })
    .await?;
    let invocations = records.iter().map(wire::Invocation::from).collect();
    Ok(json_response(
        StatusCode::OK,
        &wire::InvocationList {
            invocations,
            next_cursor: next.map(|seq| seq.to_string()),
        },
    ))
}

/// One invocation's record: outcome, timings and captured output.
#[utoipa::path(
    get, path = "/v1/invocations/{id}", tag = "functions", operation_id = "getInvocation",
    params(("id" = String, Path, description = "Invocation id")),
    responses(
        (status = 200, description = "The record", body = wire::Invocation),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such invocation", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn invocation(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(id): Params<String>,
) -> Handled {
    let record = super::blocking(&service, move |s| s.invocation(&tenant, &id)).await?;
    Ok(json_response(
        StatusCode::OK,
        &wire::Invocation::from(&record),
    ))
}
