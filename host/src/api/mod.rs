//! The HTTP server: authenticate, parse, call the [`Service`], answer.
//!
//! Control plane (deploy, list, delete, keys, tenants), invoke plane
//! (handler calls, map, jobs, schedules, SSE and WebSocket streams,
//! `wasi:http` routes), `/metrics`, `/healthz`, `/readyz` and the OpenAPI document.
//! Routes are declared once, in [`router`], each with its `utoipa` path
//! attribute; the OpenAPI document served at `/v1/openapi.json` is generated
//! from them. See `docs/api.md`.

// A `Problem` is built once per failed request and turned into a response
// right away; boxing it would buy nothing measurable.
#![allow(clippy::result_large_err)]

mod console;
mod extract;
mod functions;
mod host;
mod http_route;
mod invoke;
mod jobs;
mod kv;
mod map;
mod openapi;
mod problem;
mod schedules;
mod secrets;
mod tenants;
mod ws;

/// Runs a service operation that reads or writes the store on a blocking
/// thread: an fsync, a page read from disk or sled waiting for log space
/// must not stall an async worker and every other request it polls.
/// (Authentication answers a key seen valid moments ago from memory, and
/// comes here for the others.)
pub(super) async fn blocking<T: Send + 'static>(
    service: &Arc<Service>,
    work: impl FnOnce(&Service) -> Result<T, crate::service::ServiceError> + Send + 'static,
) -> Result<T, problem::Problem> {
    Ok(service.blocking(work).await?)
}

/// Entry points for the fuzz targets in `fuzz/`: the parsers of untrusted
/// request bodies that are not reached through a public API. Not a stable
/// API.
#[doc(hidden)]
pub mod fuzzing {
    /// Splits `body` into map inputs (NDJSON when `ndjson`, otherwise one
    /// JSON array), fed in chunks of `chunk` bytes, each input capped at
    /// `limit` bytes; returns the inputs found (and errors per input).
    pub fn split_map_inputs(body: &[u8], ndjson: bool, chunk: usize, limit: usize) -> usize {
        let format = if ndjson {
            super::map::Format::Ndjson
        } else {
            super::map::Format::Array
        };
        let mut splitter = super::map::Splitter::new(format, limit);
        let mut out = Vec::new();
        for piece in body.chunks(chunk.max(1)) {
            if splitter.push(piece, &mut out).is_err() {
                return out.len();
            }
        }
        let _ = splitter.finish(&mut out);
        out.len()
    }
}

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::TcpListener;

pub use self::openapi::document as openapi_document;
pub use self::problem::Problem;
use crate::service::Service;
pub use crate::service::{ConnectionLimits, FirstStart, ServeConfig, ServeError};

/// Boxed error of streamed response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response the server sends.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
/// What a handler answers.
pub(crate) type Handled = Result<axum::response::Response, Problem>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A response with `body`, of `status`.
pub(crate) fn respond(status: StatusCode, body: ResponseBody) -> axum::response::Response {
    let mut response = http::Response::new(axum::body::Body::new(body));
    *response.status_mut() = status;
    response
}

/// A JSON response.
pub(crate) fn json_response(
    status: StatusCode,
    value: &impl Serialize,
) -> axum::response::Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut response = respond(status, full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An empty response.
pub(crate) fn empty(status: StatusCode) -> axum::response::Response {
    respond(status, full(Bytes::new()))
}

/// Sets `gust-invocation-id` on a response.
pub(crate) fn with_invocation_id(headers: &mut http::HeaderMap, id: &str) {
    if let Ok(value) = HeaderValue::from_str(id) {
        headers.insert("gust-invocation-id", value);
    }
}

/// The router: every route of the API, once, and the OpenAPI document
/// generated from them.
pub fn router(service: Arc<Service>) -> axum::Router {
    let body_timeout = service.config().connections.body_timeout;
    let mut routes = openapi::router();
    if service.config().console {
        routes = routes.merge(console::router());
    }
    routes
        .with_state(service)
        .layer(axum::middleware::map_request_with_state(
            body_timeout,
            extract::stamp_body_deadline,
        ))
        .layer(axum::middleware::from_fn(trace_request))
}

/// Each request's span (`request`), in the trace its `traceparent` names
/// or a new one, and that trace as the context of everything the request
/// starts (see [`crate::trace`]).
async fn trace_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;

    let incoming = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(crate::trace::TraceContext::parse);
    // Borrowed: the span's fields are only formatted when it is recorded.
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or(request.uri().path(), axum::extract::MatchedPath::as_str);
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{} {route}", request.method()),
        http.request.method = %request.method(),
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    let context = crate::trace::TraceContext::adopt(&span, incoming);
    let response = context
        .scope(next.run(request))
        .instrument(span.clone())
        .await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// A bound, ready server.
pub struct Server {
    service: Arc<Service>,
    listener: TcpListener,
    first_start: Option<FirstStart>,
}

impl Server {
    /// Opens the service (see [`Service::open`]) and binds the listening
    /// socket.
    ///
    /// # Errors
    /// When the service cannot be opened or the socket cannot be bound.
    pub async fn bind(config: ServeConfig) -> Result<Self, ServeError> {
        let (service, first_start) = Service::open(config.clone()).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Io {
                context: format!("listening on {}", config.listen),
                source,
            })?;
        Ok(Self {
            service: Arc::new(service),
            listener,
            first_start,
        })
    }

    /// The address actually bound.
    ///
    /// # Errors
    /// When the socket cannot say.
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(|source| ServeError::Io {
            context: "reading the bound address".into(),
            source,
        })
    }

    /// Set when this start created the demo tenant.
    pub fn first_start(&self) -> Option<&FirstStart> {
        self.first_start.as_ref()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets
    /// in-flight requests finish within the grace period and flushes the
    /// store.
    ///
    /// # Errors
    /// When the store cannot be flushed at the end.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let Self {
            service, listener, ..
        } = self;
        service.start();
        let app = TowerToHyperService::new(router(Arc::clone(&service)));
        // hyper-util's GracefulShutdown cannot watch connections with
        // upgrades (WebSocket), so connections watch this flag themselves.
        let (stopping, stop_watch) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        let limits = service.config().connections;
        // One permit per open connection: at the cap the loop stops
        // accepting, and new clients wait in the kernel's backlog.
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        tokio::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => slot,
                () = &mut shutdown => break,
            };
            // The semaphore is never closed.
            let Ok(slot) = slot else { break };
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Without it small responses wait ~40 ms for delayed ACKs.
                    let _ = stream.set_nodelay(true);
                    // The header timeout runs from when hyper starts waiting
                    // for a request head, so it also ends idle keep-alive
                    // connections and ones that never finish their headers.
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), app.clone())
                        .with_upgrades();
                    let mut stop_watch = stop_watch.clone();
                    while connections.try_join_next().is_some() {}
                    connections.spawn(async move {
                        tokio::pin!(connection);
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            // A dropped sender also means stop. The guard
                            // `wait_for` returns is not `Send`: not kept.
                            () = async { let _ = stop_watch.wait_for(|stop| *stop).await; } => {
                                connection.as_mut().graceful_shutdown();
                                connection.await
                            }
                        };
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        drop(slot);
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        tracing::info!("shutting down: finishing in-flight requests");
        let grace = service.config().grace;
        let _ = stopping.send(true);
        let finished = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, finished).await.is_err() {
            tracing::warn!(
                ?grace,
                "grace period over; dropping the remaining connections"
            );
            connections.shutdown().await;
        }
        service.shutdown().await?;
        Ok(())
    }
}
