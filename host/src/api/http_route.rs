//! `ANY /http/{tenant}/{name}/{path…}`: a `wasi:http` component serves the
//! request. The request body streams into the guest and the response body
//! out of it; the component sees the path after `/http/{tenant}/{name}`.

use std::sync::Arc;

use axum::extract::{Request, State};
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt as _;

use super::extract::{Params, caller, declared_length};
use super::problem::Problem;
use super::{Handled, with_invocation_id};
use crate::runtime::{CappedBody, Invocation};
use crate::service::{Access, Admit, Failure, Service};

type HttpError = wasmtime_wasi_http::Error;

#[derive(Debug, serde::Deserialize)]
pub(super) struct Route {
    tenant: String,
    name: String,
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct RestRoute {
    tenant: String,
    name: String,
    #[allow(
        dead_code,
        reason = "matched for the route; the guest reads the path from the URI"
    )]
    path: String,
}

/// Serve a request with a wasi:http function (at its root).
#[utoipa::path(
    method(get, post, put, delete, patch, head, options, trace),
    path = "/http/{tenant}/{name}", tag = "invoke", operation_id = "httpRoot",
    params(("tenant" = String, Path, description = "The function's tenant"), ("name" = String, Path, description = "Function name")),
    request_body(content = Vec<u8>, content_type = "*/*"),
    responses(
        (status = 200, description = "The component's response (any status)", content_type = "*/*"),
        (status = 401, description = "A malformed Authorization header, or a key of no one, for a private function", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such HTTP function, or a private one and no key of its tenant (the same answer, so its existence is not revealed)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The component answered with an error", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn root(
    State(service): State<Arc<Service>>,
    Params(route): Params<Route>,
    request: Request,
) -> Handled {
    serve(service, route, request).await
}

/// Serve a request with a wasi:http function (at its root, with a slash).
#[utoipa::path(
    method(get, post, put, delete, patch, head, options, trace),
    path = "/http/{tenant}/{name}/", tag = "invoke", operation_id = "httpRootSlash",
    params(("tenant" = String, Path, description = "The function's tenant"), ("name" = String, Path, description = "Function name")),
    request_body(content = Vec<u8>, content_type = "*/*"),
    responses(
        (status = 200, description = "The component's response (any status)", content_type = "*/*"),
        (status = 401, description = "A malformed Authorization header, or a key of no one, for a private function", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such HTTP function, or a private one and no key of its tenant (the same answer, so its existence is not revealed)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The component answered with an error", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn root_slash(
    State(service): State<Arc<Service>>,
    Params(route): Params<Route>,
    request: Request,
) -> Handled {
    serve(service, route, request).await
}

/// Serve a request with a wasi:http function; it sees `/{path…}` and the
/// query.
#[utoipa::path(
    method(get, post, put, delete, patch, head, options, trace),
    path = "/http/{tenant}/{name}/{*path}", tag = "invoke", operation_id = "httpPath",
    params(
        ("tenant" = String, Path, description = "The function's tenant"),
        ("name" = String, Path, description = "Function name"),
        ("path" = String, Path, description = "The rest of the path, as the component sees it"),
    ),
    request_body(content = Vec<u8>, content_type = "*/*"),
    responses(
        (status = 200, description = "The component's response (any status)", content_type = "*/*"),
        (status = 401, description = "A malformed Authorization header, or a key of no one, for a private function", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such HTTP function, or a private one and no key of its tenant (the same answer, so its existence is not revealed)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than the policy allows", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The tenant is at its concurrency limit", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The component answered with an error", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The host is saturated", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn path(
    State(service): State<Arc<Service>>,
    Params(route): Params<RestRoute>,
    request: Request,
) -> Handled {
    let RestRoute { tenant, name, .. } = route;
    serve(service, Route { tenant, name }, request).await
}

/// The wasi:http error of a failed request body: what hyper said, as
/// `wasmtime serve` reports it.
fn body_error(error: axum::Error) -> HttpError {
    match error.into_inner().downcast::<hyper::Error>() {
        Ok(hyper) => HttpError::Hyper(*hyper),
        Err(other) => HttpError::InternalError(Some(other.to_string())),
    }
}

async fn serve(service: Arc<Service>, Route { tenant, name }: Route, request: Request) -> Handled {
    let headers = request.headers();
    // Asked before the target is known (a cached key costs nothing, and no
    // key nothing at all): the store, if it must be read, is read here on
    // a blocking thread rather than inside `http_target`.
    let who = caller(&service, headers).await;
    let (target, access) = service.http_target(&tenant, &name, || who)?;
    let max_body = service.policy(&tenant).max_body_bytes;
    if declared_length(request.headers()).is_some_and(|length| length > max_body) {
        return Err(Problem::too_large(max_body, "the request body"));
    }
    let permit = match access {
        Access::Owner => service.admit(&tenant, Admit::Fail).await?,
        Access::Anonymous => service.admit_anonymous(&tenant)?,
    };
    let started = service.started(&target.function);
    // What an anonymous caller learns of a failure: its code and the
    // invocation id, not the function's internals (a trap's backtrace, a
    // host error's chain); the record keeps everything for the owner.
    let answer = |problem: Problem| match access {
        Access::Owner => problem,
        Access::Anonymous => problem.for_anonymous(),
    };

    // The component sees the path after /http/{tenant}/{name}.
    let (mut parts, body) = request.into_parts();
    // Cut from the raw path: the tenant and name segments may be
    // percent-encoded there.
    let rest = parts.uri.path().splitn(5, '/').nth(4).unwrap_or("");
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("/{rest}?{query}"),
        None => format!("/{rest}"),
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
    if let Ok(value) = HeaderValue::from_str(&started.id) {
        parts.headers.insert("gust-invocation-id", value);
    }
    let body = body.map_err(body_error as fn(axum::Error) -> HttpError);
    let request = hyper::Request::from_parts(parts, CappedBody::new(body, max_body));

    let call = service
        .serve_http(&target, request, &started)
        .map_err(|invocation| {
            answer(Problem::from(Failure::of(&invocation.outcome)).with_invocation(&started.id))
        })?;
    match call.response.await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let (mut parts, body) = response.into_parts();
            with_invocation_id(&mut parts.headers, &started.id);
            // Boxed once, by axum.
            let response = http::Response::from_parts(parts, axum::body::Body::new(body));
            // The body may still be streaming: recorded when the guest is done.
            service.record_when_done(target.function, started, status, permit, call.completion);
            Ok(response)
        }
        Ok(Err(code)) => {
            let problem = answer(
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "function-http-error",
                    format!("the function answered with an error: {code}"),
                )
                .with_invocation(&started.id),
            );
            service.record_when_done(target.function, started, 502, permit, call.completion);
            Err(problem)
        }
        Err(_) => {
            let invocation = call
                .completion
                .await
                .unwrap_or_else(|e| Invocation::host_error(&format!("the call panicked: {e}")));
            drop(permit);
            let invocation = if invocation.outcome.is_ok() {
                Invocation::host_error("the function returned without setting a response")
            } else {
                invocation
            };
            let problem = answer(
                Problem::from(Failure::of(&invocation.outcome)).with_invocation(&started.id),
            );
            service
                .record(
                    &target.function,
                    &started,
                    problem.status().as_u16(),
                    &invocation,
                )
                .await;
            Err(problem)
        }
    }
}
