//! API keys (a tenant's own, and the admin's for any tenant) and tenants.

use std::sync::Arc;

use axum::extract::{Request, State};
use http::StatusCode;

use super::extract::{AdminKey, Params, TenantKey, read_capped};
use super::problem::Problem;
use super::{Handled, empty, json_response};
use crate::service::Service;
use crate::wire;

/// Create a key for the caller's tenant; the secret is shown only here.
#[utoipa::path(
    post, path = "/v1/keys", tag = "keys", operation_id = "createKey",
    responses(
        (status = 201, description = "The new key, with its secret", body = wire::NewKey),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn create_own_key(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
) -> Handled {
    let (record, secret) = super::blocking(&service, move |s| s.create_key(&tenant)).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &wire::NewKey::new(&record, secret),
    ))
}

/// The caller's tenant's keys (never their secrets).
#[utoipa::path(
    get, path = "/v1/keys", tag = "keys", operation_id = "listKeys",
    responses(
        (status = 200, description = "The keys", body = wire::KeyList),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_own_keys(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
) -> Handled {
    let keys = super::blocking(&service, move |s| s.keys(&tenant))
        .await?
        .iter()
        .map(wire::Key::from)
        .collect();
    Ok(json_response(StatusCode::OK, &wire::KeyList { keys }))
}

/// Revoke one of the caller's tenant's keys.
#[utoipa::path(
    delete, path = "/v1/keys/{id}", tag = "keys", operation_id = "revokeKey",
    params(("id" = String, Path, description = "Key id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn revoke_own_key(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(id): Params<String>,
) -> Handled {
    super::blocking(&service, move |s| s.revoke_key(&tenant, &id)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// Create a tenant with its first key (admin).
#[utoipa::path(
    post, path = "/v1/tenants", tag = "keys", operation_id = "createTenant",
    request_body(content = wire::NewTenant, content_type = "application/json"),
    responses(
        (status = 201, description = "The tenant and its first key", body = wire::CreatedTenant),
        (status = 400, description = "A malformed body or an invalid name", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not the admin key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The tenant exists", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn create_tenant(
    State(service): State<Arc<Service>>,
    _admin: AdminKey,
    request: Request,
) -> Handled {
    let (_, body) = read_capped(request, 64 << 10, "the request body").await?;
    let new: wire::NewTenant = serde_json::from_slice(&body).map_err(|e| {
        Problem::bad_request(
            "invalid-request",
            format!("expected {{\"name\": \"…\"}}: {e}"),
        )
    })?;
    let (tenant, key, secret) =
        super::blocking(&service, move |s| s.create_tenant(&new.name)).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &wire::CreatedTenant {
            tenant: wire::Tenant::from(&tenant),
            key: wire::NewKey::new(&key, secret),
        },
    ))
}

/// Every tenant (admin).
#[utoipa::path(
    get, path = "/v1/tenants", tag = "keys", operation_id = "listTenants",
    responses(
        (status = 200, description = "The tenants", body = wire::TenantList),
        (status = 401, description = "Not the admin key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_tenants(State(service): State<Arc<Service>>, _admin: AdminKey) -> Handled {
    let tenants = super::blocking(&service, Service::tenants)
        .await?
        .iter()
        .map(wire::Tenant::from)
        .collect();
    Ok(json_response(StatusCode::OK, &wire::TenantList { tenants }))
}

/// Create a key for a tenant (admin).
#[utoipa::path(
    post, path = "/v1/tenants/{tenant}/keys", tag = "keys", operation_id = "adminCreateKey",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 201, description = "The new key, with its secret", body = wire::NewKey),
        (status = 401, description = "Not the admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such tenant", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_create_key(
    State(service): State<Arc<Service>>,
    _admin: AdminKey,
    Params(tenant): Params<String>,
) -> Handled {
    let (record, secret) = super::blocking(&service, move |s| s.create_key(&tenant)).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &wire::NewKey::new(&record, secret),
    ))
}

/// Revoke a tenant's key (admin).
#[utoipa::path(
    delete, path = "/v1/tenants/{tenant}/keys/{id}", tag = "keys", operation_id = "adminRevokeKey",
    params(("tenant" = String, Path, description = "Tenant name"), ("id" = String, Path, description = "Key id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "Not the admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn admin_revoke_key(
    State(service): State<Arc<Service>>,
    _admin: AdminKey,
    Params(key): Params<(String, String)>,
) -> Handled {
    let (tenant, id) = key;
    super::blocking(&service, move |s| s.revoke_key(&tenant, &id)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
