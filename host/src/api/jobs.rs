//! Jobs: `POST /v1/functions/{name}/spawn`, `GET` and `DELETE
//! /v1/jobs/{id}` (see `docs/api.md`, "Jobs").

use std::sync::Arc;

use axum::extract::{Request, State};
use http::{HeaderValue, StatusCode, header};

use super::extract::{Params, TenantKey, content_type, read_capped};
use super::problem::Problem;
use super::{Handled, empty, json_response};
use crate::service::Service;
use crate::service::jobs::Cancelled;
use crate::wire;

/// Queue an invocation of a handler function with the request body.
///
/// The job is stored before the answer, so an accepted job survives a
/// crash.
#[utoipa::path(
    post, path = "/v1/functions/{name}/spawn", tag = "jobs", operation_id = "spawnJob",
    params(("name" = String, Path, description = "Function name")),
    request_body(content = Vec<u8>, content_type = "*/*", description = "The input, as for invoke"),
    responses(
        (status = 202, description = "Queued; `Location` is the job's URL", body = wire::Spawned),
        (status = 400, description = "A wasi:http function (wrong-world)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within the host's body timeout", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than the policy allows", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The tenant's job queue is full (queue-full)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn spawn(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    request: Request,
) -> Handled {
    service.handler_function(&tenant, &name, "only handler functions run as jobs")?;
    let limit = service.policy(&tenant).max_body_bytes;
    let (parts, body) = read_capped(request, limit, "the request body").await?;
    let content_type = content_type(&parts.headers);
    // Read here: the request's trace does not cross to the blocking thread.
    let trace = crate::trace::TraceContext::current();
    let job = super::blocking(&service, move |s| {
        s.spawn_job(&tenant, &name, content_type, body.to_vec(), trace)
    })
    .await?;
    let url = format!("/v1/jobs/{}", job.id);
    let mut response = json_response(
        StatusCode::ACCEPTED,
        &wire::Spawned {
            job_id: job.id,
            url: url.clone(),
            status: "pending".into(),
        },
    );
    if let Ok(location) = HeaderValue::from_str(&url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A job: its status, and its result or error once finished.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs", operation_id = "getJob",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = wire::Job),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(id): Params<String>,
) -> Handled {
    let job = super::blocking(&service, move |s| s.job(&tenant, &id)).await?;
    Ok(json_response(StatusCode::OK, &wire::Job::from(&job)))
}

/// Cancel a pending or running job (`202`), or delete a finished one (`204`).
#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs", operation_id = "deleteJob",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancelled (a running job at its next epoch tick)", body = wire::Job),
        (status = 204, description = "A finished job, deleted"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn delete(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(id): Params<String>,
) -> Handled {
    Ok(
        match super::blocking(&service, move |s| s.cancel_job(&tenant, &id)).await? {
            Cancelled::Cancelled(job) => {
                json_response(StatusCode::ACCEPTED, &wire::Job::from(&*job))
            }
            Cancelled::Deleted => empty(StatusCode::NO_CONTENT),
        },
    )
}
