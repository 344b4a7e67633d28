//! `GET /v1/functions/{name}/ws`: a WebSocket session in which every text
//! or binary message is one invocation; what it emits and its response body
//! come back as messages, a failure as a text message
//! `{"error": {code, status, message}, "invocation_id"}`.
//!
//! A session is only as good as the key and the function it was opened
//! with: before every message, and every [`RECHECK`] while idle, it checks
//! both again (through the store, so a revocation or a delete on another
//! host counts too) and closes with 1008 (policy violation) when either is
//! gone. A redeployed function's next message runs the new version.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::extract::{Params, TenantKey};
use super::problem::Problem;
use super::{Handled, empty};
use crate::runtime::{Outcome, Request as CallRequest};
use crate::service::{Admit, Caller, Failure, Forward, Service, ServiceError, Started, Target};
use crate::tenancy::keys;
use crate::wire::{ErrorInfo, SessionError};

/// How often an idle session checks that its key and function still
/// exist: the longest a revoked key keeps an idle session open.
const RECHECK: Duration = Duration::from_secs(10);

type WsSink =
    futures::stream::SplitSink<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, Message>;

struct WsForward<'a>(&'a mut WsSink);

impl Forward for WsForward<'_> {
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

/// Open a WebSocket session: one invocation per message.
#[utoipa::path(
    get, path = "/v1/functions/{name}/ws", tag = "invoke", operation_id = "functionWebSocket",
    params(("name" = String, Path, description = "Function name")),
    responses(
        (status = 101, description = "A WebSocket session; failures come as SessionError text messages"),
        (status = 400, description = "Not a WebSocket handshake, or a wasi:http function", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The tenant has max_streams maps and WebSocket sessions open (too-many-streams)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn websocket(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    request: Request,
) -> Handled {
    // Checked now so that a wrong function fails the handshake, and again
    // before every message.
    service.handler_target(&tenant, &name, &instead(&tenant, &name))?;
    let headers = request.headers();
    // TenantKey has accepted this header, so it parses.
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(keys::parse_bearer)
        .map(str::to_owned)
        .ok_or_else(|| Problem::unauthorized("the Authorization header must be `Bearer <key>`"))?;
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
    let max_message = usize::try_from(service.policy(&tenant).max_body_bytes).unwrap_or(usize::MAX);
    let idle = service.config().connections.websocket_idle_timeout;
    let stream_slot = service.open_stream(&tenant)?;
    let on_upgrade = hyper::upgrade::on(request);
    let session_service = Arc::clone(&service);
    let session = tokio::spawn(async move {
        // Held for the session's life.
        let _stream_slot = stream_slot;
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
            service: &session_service,
            tenant: &tenant,
            name: &name,
            token: &token,
        };
        let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK, RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle_until = tokio::time::Instant::now() + idle;
        let ended = loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = recheck.tick() => match session.target().await {
                    Err(Ended::Closed(frame)) => break Some(frame),
                    _ => continue,
                },
                // A client that sends nothing for this long is gone or
                // idling on a connection slot: close the session.
                () = tokio::time::sleep_until(idle_until) => break None,
            };
            idle_until = tokio::time::Instant::now() + idle;
            let Some(message) = message else { break None };
            let (body, content_type) = match message {
                Ok(Message::Text(text)) => (
                    text.as_str().as_bytes().to_vec(),
                    "text/plain; charset=utf-8",
                ),
                Ok(Message::Binary(bytes)) => (bytes.to_vec(), "application/octet-stream"),
                Ok(Message::Close(_)) | Err(_) => break None,
                // Pings are answered by the protocol layer.
                Ok(_) => continue,
            };
            match session.run(&mut sink, body, content_type).await {
                Ok(true) => {}
                Ok(false) => break None,
                Err(frame) => break Some(frame),
            }
        };
        if let Some(frame) = ended {
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        let _ = sink.close().await;
    });
    service.track(session);

    let mut response = empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    Ok(response)
}

/// Where a wasi:http function's callers are sent instead.
fn instead(tenant: &str, name: &str) -> String {
    format!("call it at /http/{tenant}/{name}/")
}

/// Why a session cannot run its next message.
enum Ended {
    /// The key or the function is gone: the session closes with this.
    Closed(CloseFrame),
    /// The function cannot run now (a store failure, an unloadable
    /// component): that message fails, the session goes on.
    Failed(Failure),
}

/// What every message of one WebSocket session runs against.
struct Session<'a> {
    service: &'a Arc<Service>,
    tenant: &'a str,
    name: &'a str,
    token: &'a str,
}

impl Session<'_> {
    /// The function as it is now, if the session's key is still the
    /// tenant's and the function still exists.
    async fn target(&self) -> Result<Target, Ended> {
        let service = Arc::clone(self.service);
        let (tenant, name, token) = (
            self.tenant.to_owned(),
            self.name.to_owned(),
            self.token.to_owned(),
        );
        // Store reads: off the async threads.
        let checked = tokio::task::spawn_blocking(move || {
            match service.authenticate(&token) {
                Ok(Some(Caller::Tenant(owner))) if owner == tenant => {}
                Ok(_) => return Err(closed("the API key was revoked")),
                Err(e) => return Err(Ended::Failed(e.failure())),
            }
            service
                .handler_target(&tenant, &name, &instead(&tenant, &name))
                .map_err(|e| match e {
                    ServiceError::NotFound(_) | ServiceError::WrongWorld { .. } => closed(
                        &format!("function `{name}` is no longer deployed as a handler"),
                    ),
                    other => Ended::Failed(other.failure()),
                })
        })
        .await;
        checked.unwrap_or_else(|e| {
            Err(Ended::Failed(
                ServiceError::Internal(format!("session check failed: {e}")).failure(),
            ))
        })
    }

    /// One message, one invocation: `Ok(false)` when the peer is gone,
    /// `Err` with the close frame when the session must end.
    async fn run(
        &self,
        sink: &mut WsSink,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<bool, CloseFrame> {
        let started = Started::now();
        let target = match self.target().await {
            Ok(target) => target,
            Err(Ended::Closed(frame)) => return Err(frame),
            Err(Ended::Failed(failure)) => {
                return Ok(sink.send(error_message(failure, started.id)).await.is_ok());
            }
        };
        // A session shares the tenant's concurrency with its other calls,
        // waiting for a slot rather than failing.
        let Ok(permit) = self.service.admit(self.tenant, Admit::Wait).await else {
            return Ok(false);
        };
        let started = self.service.started(&target.function);
        let call = CallRequest {
            body,
            content_type: content_type.to_owned(),
            headers: Vec::new(),
            invocation_id: started.id.clone(),
        };
        let invocation = self
            .service
            .run_streaming(&target, &started, call, WsForward(sink), || {
                None::<std::future::Ready<bool>>
            })
            .await;
        drop(permit);
        self.service
            .record_outcome(&target.function, &started, &invocation)
            .await;
        let reply = match &invocation.outcome {
            Outcome::Ok(reply) if reply.body.is_empty() => return Ok(true),
            Outcome::Ok(reply) => message(&reply.body, Some(&reply.content_type)),
            Outcome::Cancelled => return Ok(false),
            other => error_message(Failure::of(other), started.id),
        };
        Ok(sink.send(reply).await.is_ok())
    }
}

/// A close frame with 1008 (policy violation) and `reason`.
fn closed(reason: &str) -> Ended {
    Ended::Closed(CloseFrame {
        code: CloseCode::Policy,
        reason: reason.into(),
    })
}

/// The text message a failed message is answered with.
fn error_message(failure: Failure, invocation_id: String) -> Message {
    let error = SessionError {
        error: ErrorInfo {
            code: failure.code,
            status: failure.status.as_u16(),
            message: failure.detail,
        },
        invocation_id,
    };
    Message::text(serde_json::to_string(&error).unwrap_or_default())
}
