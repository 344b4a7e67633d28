//! Cron schedules: `PUT`, `GET` and `DELETE /v1/functions/{name}/schedule`
//! (see `docs/api.md`, "Schedules").

use std::sync::Arc;

use axum::extract::{Request, State};
use http::StatusCode;

use super::extract::{Params, TenantKey, read_capped};
use super::problem::Problem;
use super::{Handled, empty, json_response};
use crate::service::Service;
use crate::store::ScheduleRecord;
use crate::wire;

fn schedule(service: &Service, record: &ScheduleRecord) -> wire::Schedule {
    wire::Schedule::from_record(record, service.next_run(&record.tenant, &record.function))
}

/// Run a handler function on a cron schedule (UTC), with a fixed input.
#[utoipa::path(
    put, path = "/v1/functions/{name}/schedule", tag = "schedules", operation_id = "putSchedule",
    params(("name" = String, Path, description = "Function name")),
    request_body(content = wire::NewSchedule, content_type = "application/json"),
    responses(
        (status = 201, description = "A new schedule", body = wire::Schedule),
        (status = 200, description = "The schedule, replaced", body = wire::Schedule),
        (status = 400, description = "A malformed body (invalid-request), a bad cron expression (invalid-cron), a wasi:http function (wrong-world)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn put(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    request: Request,
) -> Handled {
    service.handler_function(&tenant, &name, "only handler functions can be scheduled")?;
    let limit = service.policy(&tenant).max_body_bytes;
    let (_, body) = read_capped(request, limit, "the request body").await?;
    let new: wire::NewSchedule = serde_json::from_slice(&body).map_err(|e| {
        Problem::bad_request(
            "invalid-request",
            format!("expected {{\"cron\": \"*/5 * * * *\", \"input\": …}}: {e}"),
        )
    })?;
    let (record, existed) = super::blocking(&service, move |s| {
        s.put_schedule(&tenant, &name, &new.cron, new.input)
    })
    .await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_response(status, &schedule(&service, &record)))
}

/// A function's schedule.
#[utoipa::path(
    get, path = "/v1/functions/{name}/schedule", tag = "schedules", operation_id = "getSchedule",
    params(("name" = String, Path, description = "Function name")),
    responses(
        (status = 200, description = "The schedule", body = wire::Schedule),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No schedule", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
) -> Handled {
    let record = super::blocking(&service, move |s| s.schedule(&tenant, &name)).await?;
    Ok(json_response(StatusCode::OK, &schedule(&service, &record)))
}

/// Remove a function's schedule.
#[utoipa::path(
    delete, path = "/v1/functions/{name}/schedule", tag = "schedules", operation_id = "deleteSchedule",
    params(("name" = String, Path, description = "Function name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No schedule", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn delete(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
) -> Handled {
    super::blocking(&service, move |s| s.delete_schedule(&tenant, &name)).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
