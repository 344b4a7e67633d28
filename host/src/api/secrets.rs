//! Tenant secrets: `PUT`, `GET` and `DELETE /v1/secrets…` (see
//! `docs/api.md`, "Secrets"). Values go in, never out.

use std::sync::Arc;

use axum::extract::{Request, State};
use http::StatusCode;

use super::extract::{Params, TenantKey, read_capped};
use super::problem::Problem;
use super::{Handled, empty, json_response};
use crate::service::{MAX_SECRET_BYTES, Service};
use crate::wire;

/// Set a secret: the body is its value (UTF-8, 1 byte to 64 KiB).
#[utoipa::path(
    put, path = "/v1/secrets/{name}", tag = "secrets", operation_id = "putSecret",
    params(("name" = String, Path, pattern = "^[A-Z_][A-Z0-9_]{0,127}$", description = "Secret name: the environment variable functions see")),
    request_body(description = "The value (UTF-8 text)", content((String = "text/plain"), (Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 201, description = "A new secret", body = wire::Secret),
        (status = 200, description = "The secret, replaced (calls from now on see the new value)", body = wire::Secret),
        (status = 400, description = "A bad name (invalid-secret-name), an empty, non-UTF-8 or over-64-KiB value (invalid-secret), or the policy's max_secrets reached (too-many-secrets)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "A body far beyond a secret's size", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn put(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    request: Request,
) -> Handled {
    // Read a little past the limit, so that a value just over it is
    // refused with its own code rather than as an oversized body.
    let (_, value) = read_capped(request, 2 * MAX_SECRET_BYTES as u64, "the secret").await?;
    let (secret, created) =
        super::blocking(&service, move |s| s.put_secret(&tenant, &name, &value)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, &wire::Secret::from(&secret)))
}

/// The caller's secrets: names and times, never values.
#[utoipa::path(
    get, path = "/v1/secrets", tag = "secrets", operation_id = "listSecrets",
    responses(
        (status = 200, description = "The tenant's secrets, by name", body = wire::SecretList),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
) -> Handled {
    let secrets = super::blocking(&service, move |s| s.secrets(&tenant))
        .await?
        .iter()
        .map(wire::Secret::from)
        .collect();
    Ok(json_response(StatusCode::OK, &wire::SecretList { secrets }))
}

/// Delete a secret. Functions deployed with it fail their calls with
/// `409 secret-missing` until it is set again or they are redeployed
/// without it.
#[utoipa::path(
    delete, path = "/v1/secrets/{name}", tag = "secrets", operation_id = "deleteSecret",
    params(("name" = String, Path, pattern = "^[A-Z_][A-Z0-9_]{0,127}$", description = "Secret name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A bad name (invalid-secret-name)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such secret", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn delete(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
) -> Handled {
    super::blocking(&service, move |s| s.delete_secret(&tenant, &name)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
