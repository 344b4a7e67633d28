//! What the host says about itself: health, metrics, this API's document,
//! and a tenant's view of the GPU bridge (usage, models).

use std::sync::Arc;

use axum::extract::State;
use http::{HeaderValue, StatusCode, header};

use super::extract::{AdminKey, TenantKey};
use super::problem::Problem;
use super::{Handled, full, json_response, respond};
use crate::service::Service;
use crate::wire;

fn text(body: impl Into<bytes::Bytes>, content_type: &'static str) -> axum::response::Response {
    let mut response = respond(StatusCode::OK, full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Whether the host answers.
#[utoipa::path(
    get, path = "/healthz", tag = "host", operation_id = "health",
    responses((status = 200, description = "The host answers", body = wire::Health))
)]
pub(super) async fn healthz() -> Handled {
    Ok(json_response(
        StatusCode::OK,
        &wire::Health {
            status: "ok".into(),
        },
    ))
}

/// Whether the host is ready for all traffic: its store answers, with the
/// schema this build needs. A host that is not keeps serving the functions
/// it has loaded (so a liveness probe should ask `/healthz`), but refuses
/// deploys; a load balancer should send its traffic elsewhere.
#[utoipa::path(
    get, path = "/readyz", tag = "host", operation_id = "ready",
    responses(
        (status = 200, description = "Ready", body = wire::Health),
        (status = 503, description = "Not ready: the store is out of reach or its schema is older than this build", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn readyz(State(service): State<Arc<Service>>) -> Handled {
    match service.ready() {
        Ok(()) => Ok(json_response(
            StatusCode::OK,
            &wire::Health {
                status: "ready".into(),
            },
        )),
        Err(why) => {
            Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", why).retry_after(1))
        }
    }
}

/// Prometheus metrics (`gust_` prefix), for the operator: they show every
/// tenant's activity, so the admin key is required.
#[utoipa::path(
    get, path = "/metrics", tag = "host", operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text", body = String, content_type = "text/plain"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn metrics(State(service): State<Arc<Service>>, _admin: AdminKey) -> Handled {
    Ok(text(
        service.metrics_text(),
        "text/plain; version=0.0.4; charset=utf-8",
    ))
}

/// This document.
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "host", operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
pub(super) async fn openapi() -> Handled {
    Ok(text(super::openapi::document(), "application/json"))
}

/// The caller's GPU-bridge device time and memory, against its policy.
#[utoipa::path(
    get, path = "/v1/usage", tag = "gpu", operation_id = "usage",
    responses(
        (status = 200, description = "The tenant's usage", body = wire::Usage),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn usage(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
) -> Handled {
    Ok(json_response(StatusCode::OK, &service.usage(&tenant)))
}

/// The host's models: which the caller may load, where they are resident,
/// and the registry's host-wide counters.
#[utoipa::path(
    get, path = "/v1/models", tag = "gpu", operation_id = "models",
    responses(
        (status = 200, description = "The models", body = wire::Models),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn models(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
) -> Handled {
    Ok(json_response(StatusCode::OK, &service.models(&tenant)))
}
