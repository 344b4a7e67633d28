//! Streaming invocations: Server-Sent Events on invoke
//! (`Accept: text/event-stream`) and WebSocket sessions
//! (`GET /v1/functions/{name}/ws`).
//!
//! Both carry what a function emits through `gust:function/output` to the
//! caller as it is emitted, with nothing buffered in between beyond a few
//! chunks of backpressure. A caller that goes away cancels the invocation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::handlers::{Handled, call_limits, handler_component, outcome_problem, record};
use super::jobs::invocation_status;
use super::problem::Problem;
use super::state::{AppState, Permit};
use super::{BoxError, ResponseBody};
use crate::runtime::{
    CallControl, CallLimits, Cancel, Invocation, LoadedComponent, Outcome, Request as CallRequest,
    new_invocation_id,
};
use crate::store::{FunctionRecord, now_millis};

/// How often an idle event stream gets a comment line: keeps proxies from
/// closing it and notices a caller that went away while the function
/// computes without emitting.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Chunks in flight between the guest and the connection.
const BACKLOG: usize = 8;

/// Whether the caller asked for Server-Sent Events.
pub(crate) fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| media.trim().starts_with("text/event-stream"))
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

/// A call admitted and ready to run.
pub(crate) struct Admitted {
    pub(crate) state: Arc<AppState>,
    pub(crate) function: FunctionRecord,
    pub(crate) component: LoadedComponent,
    pub(crate) limits: CallLimits,
    pub(crate) call: CallRequest,
    pub(crate) started_at: u64,
    pub(crate) started: Instant,
    pub(crate) permits: (Permit, Permit),
}

/// Runs `call`, handing each emitted chunk to `forward` as it comes; stops
/// the guest when `forward` says the caller is gone (returns false).
async fn run_streaming<F, Fut>(
    state: &AppState,
    component: &LoadedComponent,
    call: CallRequest,
    limits: &CallLimits,
    mut forward: F,
    mut idle: impl FnMut() -> Option<Fut>,
) -> Invocation
where
    F: AsyncChunk,
    Fut: Future<Output = bool>,
{
    let (chunks_tx, mut chunks) = mpsc::channel::<Bytes>(BACKLOG);
    let cancel = Cancel::new();
    let control = CallControl {
        cancel: Some(cancel.clone()),
        stream: Some(chunks_tx),
        output_limit: 0,
    };
    let invoke = state.runtime.invoke_with(component, call, limits, control);
    tokio::pin!(invoke);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut open = true;
    let invocation = loop {
        tokio::select! {
            invocation = &mut invoke => break invocation,
            Some(chunk) = chunks.recv() => {
                if open && !forward.send(chunk).await {
                    open = false;
                    cancel.cancel();
                }
            }
            _ = heartbeat.tick(), if open => {
                if let Some(check) = idle()
                    && !check.await
                {
                    open = false;
                    cancel.cancel();
                }
            }
        }
    };
    // Emitted just before the guest returned.
    while let Ok(chunk) = chunks.try_recv() {
        if open && !forward.send(chunk).await {
            open = false;
        }
    }
    invocation
}

/// Where emitted chunks go.
trait AsyncChunk {
    /// Sends one chunk; false when the caller is gone.
    async fn send(&mut self, chunk: Bytes) -> bool;
}

type Frames = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

struct SseForward(Frames);

impl AsyncChunk for SseForward {
    async fn send(&mut self, chunk: Bytes) -> bool {
        self.0
            .send(Ok(Frame::data(event(None, &chunk))))
            .await
            .is_ok()
    }
}

/// `POST /v1/functions/{name}/invoke` with `Accept: text/event-stream`:
/// `200 text/event-stream`; each emitted chunk is a `data:` event as soon as
/// it is emitted, the response body (if any) one more, then a final `done`
/// event (`{"invocation_id", "status", "outcome", "content_type"}`) or an
/// `error` event (the problem document).
pub(crate) fn events(admitted: Admitted) -> http::Response<ResponseBody> {
    let id = admitted.call.invocation_id.clone();
    let (frames, frame_stream) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(BACKLOG);
    let tracker = Arc::clone(&admitted.state);
    let task = tokio::spawn(async move {
        let Admitted {
            state,
            function,
            component,
            limits,
            call,
            started_at,
            started,
            permits,
        } = admitted;
        let id = call.invocation_id.clone();
        let heartbeat_frames = frames.clone();
        let invocation = run_streaming(
            &state,
            &component,
            call,
            &limits,
            SseForward(frames.clone()),
            || {
                let frames = heartbeat_frames.clone();
                Some(async move {
                    frames
                        .send(Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))))
                        .await
                        .is_ok()
                })
            },
        )
        .await;
        drop(permits);
        let status = invocation_status(&invocation);
        record(
            &state,
            &function,
            &id,
            started_at,
            started,
            status,
            &invocation,
        );
        match &invocation.outcome {
            Outcome::Ok(reply) => {
                if !reply.body.is_empty() {
                    let _ = frames.send(Ok(Frame::data(event(None, &reply.body)))).await;
                }
                let done = json!({
                    "invocation_id": id,
                    "status": reply.status,
                    "outcome": "ok",
                    "content_type": reply.content_type,
                });
                let _ = frames
                    .send(Ok(Frame::data(event(
                        Some("done"),
                        done.to_string().as_bytes(),
                    ))))
                    .await;
            }
            other => {
                let problem = outcome_problem(other).with_invocation(&id);
                let text = serde_json::to_string(&problem).unwrap_or_default();
                let _ = frames
                    .send(Ok(Frame::data(event(Some("error"), text.as_bytes()))))
                    .await;
            }
        }
    });
    // Stopped with the host, like the jobs.
    tracker.jobs.track(task);
    let stream = futures::stream::unfold(frame_stream, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    let mut response = http::Response::new(StreamBody::new(stream).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-like proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert("gust-invocation-id", value);
    }
    response
}

type WsSink =
    futures::stream::SplitSink<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, Message>;

struct WsForward<'a>(&'a mut WsSink);

impl AsyncChunk for WsForward<'_> {
    async fn send(&mut self, chunk: Bytes) -> bool {
        self.0.send(message(&chunk, None)).await.is_ok()
    }
}

/// A text message for UTF-8 output (or output the function labels as
/// text), else a binary one.
fn message(body: &[u8], content_type: Option<&str>) -> Message {
    let binary = content_type
        .is_some_and(|t| !(t.starts_with("text/") || t.starts_with("application/json")));
    match std::str::from_utf8(body) {
        Ok(text) if !binary => Message::text(text),
        _ => Message::binary(Bytes::copy_from_slice(body)),
    }
}

/// `GET /v1/functions/{name}/ws`: a WebSocket session in which every text
/// or binary message is one invocation; what it emits and its response body
/// come back as messages, a failure as a text message
/// `{"error": {code, status, message}, "invocation_id"}`.
pub(crate) async fn websocket(
    state: &Arc<AppState>,
    name: &str,
    request: hyper::Request<Incoming>,
) -> Handled {
    let tenant = super::auth::tenant(state, request.headers())?;
    let (deployment, component) = handler_component(
        state,
        &tenant,
        name,
        &format!("call it at /http/{tenant}/{name}/"),
    )?;
    let headers = request.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_upgrade && version_ok)
    else {
        return Err(Problem::bad_request(
            "invalid-request",
            "expected a WebSocket handshake (Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)",
        ));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let policy = state.policies.for_tenant(&tenant);
    let limits = call_limits(state, &tenant, name, policy)?;
    let max_message = usize::try_from(policy.max_body_bytes).unwrap_or(usize::MAX);
    let max_concurrency = policy.max_concurrency as usize;
    let on_upgrade = hyper::upgrade::on(request);
    let session_state = Arc::clone(state);
    let function = deployment.record.clone();
    let session = tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let (mut sink, mut messages) = socket.split();
        let session = Session {
            state: &session_state,
            tenant: &tenant,
            function: &function,
            component: &component,
            limits: &limits,
            max_concurrency,
        };
        while let Some(message) = messages.next().await {
            let (body, content_type) = match message {
                Ok(Message::Text(text)) => (
                    text.as_str().as_bytes().to_vec(),
                    "text/plain; charset=utf-8",
                ),
                Ok(Message::Binary(bytes)) => (bytes.to_vec(), "application/octet-stream"),
                Ok(Message::Close(_)) | Err(_) => break,
                // Pings are answered by the protocol layer.
                Ok(_) => continue,
            };
            if !session.run(&mut sink, body, content_type).await {
                break;
            }
        }
        let _ = sink.close().await;
    });
    state.jobs.track(session);

    let mut response = http::Response::new(super::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    Ok(response)
}

/// What every message of one WebSocket session runs against.
struct Session<'a> {
    state: &'a Arc<AppState>,
    tenant: &'a str,
    function: &'a FunctionRecord,
    component: &'a LoadedComponent,
    limits: &'a CallLimits,
    max_concurrency: usize,
}

impl Session<'_> {
    /// One message, one invocation; false when the peer is gone.
    async fn run(&self, sink: &mut WsSink, body: Vec<u8>, content_type: &str) -> bool {
        // A session shares the tenant's concurrency with its other calls,
        // waiting for a slot rather than failing.
        let permits =
            super::map::admit_waiting(self.state, self.tenant, self.max_concurrency).await;
        let started_at = now_millis();
        let started = Instant::now();
        let id = new_invocation_id(started_at);
        let call = CallRequest {
            body,
            content_type: content_type.to_owned(),
            headers: Vec::new(),
            invocation_id: id.clone(),
        };
        let invocation = run_streaming(
            self.state,
            self.component,
            call,
            self.limits,
            WsForward(sink),
            || None::<std::future::Ready<bool>>,
        )
        .await;
        drop(permits);
        let status = invocation_status(&invocation);
        record(
            self.state,
            self.function,
            &id,
            started_at,
            started,
            status,
            &invocation,
        );
        let reply = match &invocation.outcome {
            Outcome::Ok(reply) if reply.body.is_empty() => return true,
            Outcome::Ok(reply) => message(&reply.body, Some(&reply.content_type)),
            Outcome::Cancelled => return false,
            other => {
                let problem = outcome_problem(other);
                Message::text(
                    json!({
                        "error": {"code": problem.code(), "status": problem.status().as_u16(), "message": problem.detail()},
                        "invocation_id": id,
                    })
                    .to_string(),
                )
            }
        };
        sink.send(reply).await.is_ok()
    }
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
