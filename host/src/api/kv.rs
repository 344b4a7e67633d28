//! Tenants' key-value buckets: `GET /v1/kv`, `GET /v1/kv/{bucket}` and
//! `GET`, `PUT`, `DELETE /v1/kv/{bucket}/{key}` (see `docs/api.md`,
//! "Key-value buckets"): what the tenant's functions keep through
//! `wasi:keyvalue`, to inspect and to seed.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::IntoResponse;
use http::{StatusCode, header};
use serde::Deserialize;

use super::extract::{Params, QueryParams, TenantKey, read_capped};
use super::problem::Problem;
use super::{Handled, empty, json_response};
use crate::service::{MAX_KEYS_PAGE, Service};
use crate::wire;

/// `?cursor=N&limit=N` of a key listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct KeysQuery {
    /// Where to go on from: the `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Keys to return, 1..=1000 (default 1000).
    limit: Option<String>,
}

fn number(value: Option<&str>, name: &str, default: u64) -> Result<u64, Problem> {
    value.map_or(Ok(default), |text| {
        text.parse().map_err(|_| {
            Problem::bad_request(
                "invalid-request",
                format!("`{name}` must be a non-negative integer, not `{text}`"),
            )
        })
    })
}

/// The caller's buckets that hold keys.
#[utoipa::path(
    get, path = "/v1/kv", tag = "kv", operation_id = "listKvBuckets",
    responses(
        (status = 200, description = "The tenant's buckets, by name", body = wire::KvBucketList),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn buckets(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
) -> Handled {
    let buckets = super::blocking(&service, move |s| s.kv_buckets(&tenant))
        .await?
        .iter()
        .map(wire::KvBucket::from)
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &wire::KvBucketList { buckets },
    ))
}

/// A page of a bucket's keys, in byte order (an empty or unknown bucket
/// has none).
#[utoipa::path(
    get, path = "/v1/kv/{bucket}", tag = "kv", operation_id = "listKvKeys",
    params(("bucket" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$", description = "Bucket name"), KeysQuery),
    responses(
        (status = 200, description = "Keys", body = wire::KvKeyList),
        (status = 400, description = "A bad bucket name, cursor or limit (invalid-kv, invalid-request)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn keys(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(bucket): Params<String>,
    QueryParams(query): QueryParams<KeysQuery>,
) -> Handled {
    let cursor = number(query.cursor.as_deref(), "cursor", 0)?;
    let limit = number(query.limit.as_deref(), "limit", MAX_KEYS_PAGE as u64)?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let page = super::blocking(&service, move |s| {
        s.kv_keys(&tenant, &bucket, cursor, limit)
    })
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &wire::KvKeyList {
            keys: page.keys,
            next_cursor: page.next_cursor,
        },
    ))
}

/// A key's value, as stored (counters are decimal text).
#[utoipa::path(
    get, path = "/v1/kv/{bucket}/{*key}", tag = "kv", operation_id = "getKvKey",
    params(
        ("bucket" = String, Path, description = "Bucket name"),
        ("key" = String, Path, description = "The key (percent-encoded; it may contain `/`)"),
    ),
    responses(
        (status = 200, description = "The value", content_type = "application/octet-stream"),
        (status = 400, description = "A bad bucket name or key (invalid-kv)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params((bucket, key)): Params<(String, String)>,
) -> Handled {
    let value = super::blocking(&service, move |s| s.kv_get(&tenant, &bucket, &key)).await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        value,
    )
        .into_response())
}

/// Set a key: the body is its value (any bytes, up to the policy's
/// `max_body_bytes`).
#[utoipa::path(
    put, path = "/v1/kv/{bucket}/{*key}", tag = "kv", operation_id = "putKvKey",
    params(
        ("bucket" = String, Path, description = "Bucket name"),
        ("key" = String, Path, description = "The key (percent-encoded; it may contain `/`)"),
    ),
    request_body(description = "The value", content((Vec<u8> = "application/octet-stream"))),
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "A bad bucket name or key (invalid-kv)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than the policy allows", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "Beyond the policy's kv_max_buckets, kv_max_keys or kv_max_bytes (quota-exceeded)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn put(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params((bucket, key)): Params<(String, String)>,
    request: Request,
) -> Handled {
    let limit = service.policy(&tenant).max_body_bytes;
    let (_, value) = read_capped(request, limit, "the value").await?;
    super::blocking(&service, move |s| {
        s.kv_put(&tenant, &bucket, &key, value.to_vec())
    })
    .await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// Remove a key (no error if it is absent).
#[utoipa::path(
    delete, path = "/v1/kv/{bucket}/{*key}", tag = "kv", operation_id = "deleteKvKey",
    params(
        ("bucket" = String, Path, description = "Bucket name"),
        ("key" = String, Path, description = "The key (percent-encoded; it may contain `/`)"),
    ),
    responses(
        (status = 204, description = "Gone"),
        (status = 400, description = "A bad bucket name or key (invalid-kv)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn delete(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params((bucket, key)): Params<(String, String)>,
) -> Handled {
    super::blocking(&service, move |s| s.kv_delete(&tenant, &bucket, &key)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
