//! `POST /v1/functions/{name}/invoke`: one call, answered with the
//! function's response, or streamed as Server-Sent Events when the caller
//! asks for `text/event-stream`.

use std::sync::Arc;

use axum::extract::{Request, State};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use super::extract::{Params, TenantKey, content_type, read_capped};
use super::problem::Problem;
use super::{BoxError, Handled, full, respond, with_invocation_id};
use crate::runtime::{Invocation, Outcome, Request as CallRequest};
use crate::service::{Admit, Failure, Forward, Permit, Service, Started, Target};
use crate::wire;

/// Chunks in flight between the guest and the connection.
const BACKLOG: usize = 8;

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

/// Whether the caller asked for Server-Sent Events.
fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| media.trim().starts_with("text/event-stream"))
}

/// Invoke a handler function with the request body.
///
/// Answers with the function's own status, headers and body plus
/// `gust-invocation-id`; with `Accept: text/event-stream`, Server-Sent
/// Events: each emitted chunk a `data:` event, the body one more, then
/// `done` ([`wire::StreamDone`]) or `error` (the problem document).
#[utoipa::path(
    post, path = "/v1/functions/{name}/invoke", tag = "invoke", operation_id = "invokeFunction",
    params(("name" = String, Path, description = "Function name")),
    request_body(content = Vec<u8>, content_type = "*/*", description = "Passed to the function with its content type"),
    responses(
        (status = 200, description = "The function's response (any status it sets)", content_type = "*/*"),
        (status = 400, description = "A wasi:http function (wrong-world)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The body did not arrive within the host's body timeout", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than the policy allows", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The tenant is at its concurrency limit", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "The function trapped, ran out of memory, or failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The host is saturated", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The function ran past its deadline", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn invoke(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    request: Request,
) -> Handled {
    let target = service.handler_target(
        &tenant,
        &name,
        &format!("call it at /http/{tenant}/{name}/"),
    )?;
    // The body first: a slow client then holds a connection, not one of
    // the tenant's concurrency slots.
    let limit = service.policy(&tenant).max_body_bytes;
    let (parts, body) = read_capped(request, limit, "the request body").await?;
    let permit = service.admit(&tenant, Admit::Fail).await?;
    let started = service.started(&target.function);
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
        content_type: content_type(&parts.headers),
        headers,
        invocation_id: started.id.clone(),
    };
    if wants_events(&parts.headers) {
        return Ok(events(service, target, call, started, permit));
    }
    let control = started.control(service.buffered(&tenant));
    let invocation = service.run(&target, call, control).await;
    drop(permit);
    let response = outcome_response(&invocation, &started.id);
    service
        .record(
            &target.function,
            &started,
            response.status().as_u16(),
            &invocation,
        )
        .await;
    Ok(response)
}

fn outcome_response(invocation: &Invocation, id: &str) -> axum::response::Response {
    match &invocation.outcome {
        Outcome::Ok(reply) => {
            let status =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = respond(status, full(reply.body.clone()));
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
            with_invocation_id(headers, id);
            response
        }
        other => axum::response::IntoResponse::into_response(
            Problem::from(Failure::of(other)).with_invocation(id),
        ),
    }
}

/// One SSE event: `data` split into `data:` lines (so a chunk's own
/// newlines survive), optionally named.
fn event(name: Option<&str>, data: &[u8]) -> Bytes {
    let mut text = String::new();
    if let Some(name) = name {
        text.push_str("event: ");
        text.push_str(name);
        text.push('\n');
    }
    for line in String::from_utf8_lossy(data).split('\n') {
        text.push_str("data: ");
        text.push_str(line.strip_suffix('\r').unwrap_or(line));
        text.push('\n');
    }
    text.push('\n');
    Bytes::from(text)
}

type Frames = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

struct SseForward(Frames);

impl Forward for SseForward {
    async fn send(&mut self, chunk: Bytes) -> bool {
        let held = HeldEvent {
            event: event(None, &chunk),
            _chunk: chunk,
        };
        self.0
            .send(Ok(Frame::data(Bytes::from_owner(held))))
            .await
            .is_ok()
    }
}

/// An event kept with the chunk it was made from until the connection has
/// sent it. An emitted chunk holds its share of the call's stream buffer
/// (bounded in bytes, see `OutputSink::Stream`) for as long as it lives, so
/// events queued for a slow reader count against that bound; copies that
/// let their chunk go would add up beside it, up to `BACKLOG` times the
/// largest chunk.
struct HeldEvent {
    event: Bytes,
    _chunk: Bytes,
}

impl AsRef<[u8]> for HeldEvent {
    fn as_ref(&self) -> &[u8] {
        &self.event
    }
}

/// The SSE answer of an admitted call: `200 text/event-stream` at once,
/// the events as the call runs.
fn events(
    service: Arc<Service>,
    target: Target,
    call: CallRequest,
    started: Started,
    permit: Permit,
) -> axum::response::Response {
    let (frames, frame_stream) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(BACKLOG);
    let id = started.id.clone();
    let tracker = Arc::clone(&service);
    let task = tokio::spawn(async move {
        let heartbeat_frames = frames.clone();
        let invocation = service
            .run_streaming(&target, &started, call, SseForward(frames.clone()), || {
                let frames = heartbeat_frames.clone();
                Some(async move {
                    frames
                        .send(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))))
                        .await
                        .is_ok()
                })
            })
            .await;
        drop(permit);
        service
            .record_outcome(&target.function, &started, &invocation)
            .await;
        let last = match &invocation.outcome {
            Outcome::Ok(reply) => {
                if !reply.body.is_empty() {
                    let _ = frames.send(Ok(Frame::data(event(None, &reply.body)))).await;
                }
                let done = wire::StreamDone {
                    invocation_id: started.id.clone(),
                    status: reply.status,
                    outcome: "ok".into(),
                    content_type: reply.content_type.clone(),
                };
                event(Some("done"), &serde_json::to_vec(&done).unwrap_or_default())
            }
            other => {
                let problem = Problem::from(Failure::of(other)).with_invocation(&started.id);
                event(
                    Some("error"),
                    &serde_json::to_vec(&problem).unwrap_or_default(),
                )
            }
        };
        let _ = frames.send(Ok(Frame::data(last))).await;
    });
    // Stopped with the host, like the jobs.
    tracker.track(task);
    let stream = futures::stream::unfold(frame_stream, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    let mut response = respond(StatusCode::OK, StreamBody::new(stream).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-like proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_invocation_id(headers, &id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_newlines_and_names() {
        assert_eq!(event(None, b"a\n"), "data: a\ndata: \n\n");
        assert_eq!(event(None, b"one\r\ntwo"), "data: one\ndata: two\n\n");
        assert_eq!(event(Some("done"), b"{}"), "event: done\ndata: {}\n\n");
    }

    /// An event waiting to be sent keeps its chunk (and so the chunk's
    /// share of the stream buffer) until it is gone.
    #[tokio::test]
    async fn an_event_holds_its_chunk_until_it_is_sent() {
        struct Tracked(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl AsRef<[u8]> for Tracked {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Tracked {
            fn drop(&mut self) {
                self.1.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let chunk = Bytes::from_owner(Tracked(b"hello".to_vec(), dropped.clone()));
        let (frames, mut queued) = mpsc::channel(BACKLOG);
        assert!(SseForward(frames).send(chunk).await);
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
        let frame = queued.recv().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap(), "data: hello\n\n");
        drop(frame);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn accept_headers_select_events() {
        let mut headers = HeaderMap::new();
        assert!(!wants_events(&headers));
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream;q=0.9"),
        );
        assert!(wants_events(&headers));
    }
}
