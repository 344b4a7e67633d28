//! `POST /v1/functions/{name}/map`: one invocation per input, fanned out
//! with the tenant's concurrency, results streamed back in input order.
//!
//! Everything streams: inputs are split out of the request body as it
//! arrives (a JSON array or NDJSON), and at most a window of inputs is
//! between "read" and "written back" at any time, so memory stays bounded
//! for any number of inputs. A failing input is reported on its own line and
//! the map goes on. If the client goes away, reading, dispatching and the
//! running invocations stop.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{Mutex, Semaphore, mpsc};

use super::extract::{Params, TenantKey};
use super::problem::Problem;
use super::{BoxError, Handled, respond};
use crate::runtime::{CallControl, Outcome, Request as CallRequest};
use crate::service::{Admit, Failure, Service, Target, json_input};
use crate::wire::{ErrorInfo, MapLine, output_value};

/// Inputs that may be read ahead of the first one not yet written back, per
/// unit of fan-out.
const WINDOW_PER_WORKER: usize = 4;

/// How the request body lists the inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// One JSON value per line.
    Ndjson,
    /// One JSON array.
    Array,
}

/// Why an input could not be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ItemError {
    /// The input is longer than the tenant's `max_body_bytes`.
    TooLarge(u64),
    /// The input is not valid JSON.
    Invalid(String),
}

/// A body-level fault after which no more inputs can be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) String);

/// Splits a byte stream into the JSON texts of its inputs without holding
/// more than one input (capped at `limit` bytes) at a time.
#[derive(Debug)]
pub(crate) struct Splitter {
    format: Format,
    limit: usize,
    current: Vec<u8>,
    overflow: bool,
    // Array state.
    opened: bool,
    closed: bool,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Splitter {
    pub(crate) fn new(format: Format, limit: usize) -> Self {
        Self {
            format,
            limit,
            current: Vec::new(),
            overflow: false,
            opened: false,
            closed: false,
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    fn keep(&mut self, byte: u8) {
        if self.current.len() < self.limit {
            self.current.push(byte);
        } else {
            self.overflow = true;
        }
    }

    fn take(&mut self, out: &mut Vec<Result<Vec<u8>, ItemError>>) {
        let text = std::mem::take(&mut self.current);
        let overflow = std::mem::replace(&mut self.overflow, false);
        let trimmed = text.trim_ascii();
        if overflow {
            out.push(Err(ItemError::TooLarge(self.limit as u64)));
        } else if trimmed.is_empty() {
            if self.format == Format::Array {
                out.push(Err(ItemError::Invalid("empty array element".into())));
            }
        } else {
            out.push(Ok(trimmed.to_vec()));
        }
    }

    /// Feed the next chunk; complete inputs are appended to `out`.
    pub(crate) fn push(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<Result<Vec<u8>, ItemError>>,
    ) -> Result<(), Malformed> {
        for &byte in chunk {
            match self.format {
                Format::Ndjson => {
                    if byte == b'\n' {
                        self.take(out);
                    } else {
                        self.keep(byte);
                    }
                }
                Format::Array => self.push_array_byte(byte, out)?,
            }
        }
        Ok(())
    }

    fn push_array_byte(
        &mut self,
        byte: u8,
        out: &mut Vec<Result<Vec<u8>, ItemError>>,
    ) -> Result<(), Malformed> {
        if self.closed {
            return if byte.is_ascii_whitespace() {
                Ok(())
            } else {
                Err(Malformed(
                    "text after the closing `]` of the input array".into(),
                ))
            };
        }
        if !self.opened {
            return match byte {
                b'[' => {
                    self.opened = true;
                    Ok(())
                }
                b if b.is_ascii_whitespace() => Ok(()),
                _ => Err(Malformed("expected a JSON array of inputs (or NDJSON with Content-Type application/x-ndjson)".into())),
            };
        }
        if self.in_string {
            self.keep(byte);
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
            }
            return Ok(());
        }
        match byte {
            b'"' => {
                self.in_string = true;
                self.keep(byte);
            }
            b'[' | b'{' => {
                self.depth += 1;
                self.keep(byte);
            }
            b']' | b'}' if self.depth > 0 => {
                self.depth -= 1;
                self.keep(byte);
            }
            b',' if self.depth == 0 => self.take(out),
            b']' if self.depth == 0 => {
                self.closed = true;
                // `[]` and a trailing element: only a non-empty tail is an input.
                if !self.current.trim_ascii().is_empty() || self.overflow {
                    self.take(out);
                }
            }
            _ => self.keep(byte),
        }
        Ok(())
    }

    /// The end of the body: the last input, or what is missing.
    pub(crate) fn finish(
        &mut self,
        out: &mut Vec<Result<Vec<u8>, ItemError>>,
    ) -> Result<(), Malformed> {
        match self.format {
            Format::Ndjson => {
                self.take(out);
                Ok(())
            }
            Format::Array if self.closed => Ok(()),
            Format::Array if !self.opened => Err(Malformed(
                "the body is empty: expected a JSON array of inputs".into(),
            )),
            Format::Array => Err(Malformed("the input array is not closed with `]`".into())),
        }
    }
}

fn line(value: &MapLine) -> Bytes {
    let mut text = serde_json::to_vec(value).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

fn error_line(index: u64, code: &str, status: u16, message: String) -> Bytes {
    line(&MapLine {
        index,
        ok: None,
        error: Some(ErrorInfo {
            code: code.to_owned(),
            status,
            message,
        }),
        invocation_id: None,
    })
}

fn item_error_line(index: u64, error: &ItemError) -> Bytes {
    match error {
        ItemError::TooLarge(limit) => error_line(
            index,
            "payload-too-large",
            413,
            format!("the input exceeds the limit of {limit} bytes"),
        ),
        ItemError::Invalid(message) => error_line(index, "invalid-input", 400, message.clone()),
    }
}

/// What every input of one map runs against, resolved once per request.
struct MapTarget {
    service: Arc<Service>,
    tenant: String,
    target: Target,
    control: CallControl,
    /// The largest result kept (the policy's `max_body_bytes`).
    result_limit: u64,
}

/// Run one input and describe the result as its output line.
async fn run_one(map: &MapTarget, index: u64, input: Result<Vec<u8>, ItemError>) -> Bytes {
    let parsed = input.and_then(|text| json_input(&text).map_err(ItemError::Invalid));
    let (body, content_type) = match parsed {
        Ok(parts) => parts,
        Err(e) => return item_error_line(index, &e),
    };
    let MapTarget {
        service,
        tenant,
        target,
        control,
        result_limit,
    } = map;
    // A map shares the tenant's concurrency with its other calls, waiting
    // for a slot rather than failing with 429.
    let Ok(permit) = service.admit(tenant, Admit::Wait).await else {
        return error_line(index, "overloaded", 503, "the host is shutting down".into());
    };
    let started = service.started(&target.function);
    let call = CallRequest {
        body,
        content_type: content_type.to_owned(),
        headers: Vec::new(),
        invocation_id: started.id.clone(),
    };
    let invocation = service
        .run(target, call, started.control(control.clone()))
        .await;
    drop(permit);
    // Results wait in the window for those before them: each is bounded
    // like a request body, so a window holds a bounded number of bytes.
    let (status, value) = match &invocation.outcome {
        Outcome::Ok(reply) if reply.body.len() as u64 > *result_limit => (
            500,
            MapLine {
                index,
                ok: None,
                error: Some(ErrorInfo {
                    code: "result-too-large".into(),
                    status: 500,
                    message: format!(
                        "the function answered {} bytes; a map result is at most max_body_bytes ({result_limit})",
                        reply.body.len()
                    ),
                }),
                invocation_id: Some(started.id.clone()),
            },
        ),
        Outcome::Ok(reply) if reply.status < 400 => (
            reply.status,
            MapLine {
                index,
                ok: Some(output_value(&reply.content_type, &reply.body)),
                error: None,
                invocation_id: Some(started.id.clone()),
            },
        ),
        Outcome::Ok(reply) => (
            reply.status,
            MapLine {
                index,
                ok: None,
                error: Some(ErrorInfo {
                    code: format!("status-{}", reply.status),
                    status: reply.status,
                    message: String::from_utf8_lossy(&reply.body).into_owned(),
                }),
                invocation_id: Some(started.id.clone()),
            },
        ),
        other => {
            let failure = Failure::of(other);
            let status = failure.status.as_u16();
            (
                status,
                MapLine {
                    index,
                    ok: None,
                    error: Some(ErrorInfo {
                        code: failure.code,
                        status,
                        message: failure.detail,
                    }),
                    invocation_id: Some(started.id.clone()),
                },
            )
        }
    };
    service
        .record(&target.function, &started, status, &invocation)
        .await;
    line(&value)
}

/// Reads inputs from `body` and hands them out in order, never more than
/// the window ahead of what has been written back.
async fn read_inputs(
    mut body: axum::body::Body,
    mut splitter: Splitter,
    window: Arc<Semaphore>,
    inputs: mpsc::Sender<(u64, Result<Vec<u8>, ItemError>)>,
    results: mpsc::Sender<(u64, Bytes)>,
) {
    let mut index = 0u64;
    let mut ready = Vec::new();
    let mut fault = None;
    let mut ended = false;
    while !ended {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && let Err(e) = splitter.push(&data, &mut ready)
                {
                    fault = Some(e);
                    ended = true;
                }
            }
            Some(Err(e)) => {
                fault = Some(Malformed(format!("reading the request body failed: {e}")));
                ended = true;
            }
            None => {
                fault = splitter.finish(&mut ready).err();
                ended = true;
            }
        }
        // Inputs found before a fault still run.
        for item in ready.drain(..) {
            let Ok(permit) = window.acquire().await else {
                return;
            };
            permit.forget();
            if inputs.send((index, item)).await.is_err() {
                return;
            }
            index += 1;
        }
    }
    if let Some(Malformed(message)) = fault {
        // Reported in order, as the line after the last input found.
        if let Ok(permit) = window.acquire().await {
            permit.forget();
            let text = error_line(index, "invalid-input", 400, message);
            let _ = results.send((index, text)).await;
        }
    }
}

type Chunk = Result<Frame<Bytes>, BoxError>;

/// Run a handler function once per input, results streamed back in
/// input order.
///
/// The body is a JSON array of inputs, or NDJSON with
/// `Content-Type: application/x-ndjson`. Errors found before any input runs
/// (auth, unknown function, wrong world) are problems; from then on the
/// answer is `200` NDJSON, one [`MapLine`] per input.
#[utoipa::path(
    post, path = "/v1/functions/{name}/map", tag = "invoke", operation_id = "mapFunction",
    params(("name" = String, Path, description = "Function name")),
    request_body(content = Vec<serde_json::Value>, description = "A JSON array of inputs, or NDJSON (application/x-ndjson)"),
    responses(
        (status = 200, description = "One NDJSON line per input, in input order", body = MapLine, content_type = "application/x-ndjson"),
        (status = 400, description = "A wasi:http function (wrong-world)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid tenant key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such function", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The tenant has max_streams maps and WebSocket sessions open (too-many-streams)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn map(
    State(service): State<Arc<Service>>,
    TenantKey(tenant): TenantKey,
    Params(name): Params<String>,
    request: Request,
) -> Handled {
    // Resolved once (volumes are checked on disk), not per input.
    let target = service.handler_target(&tenant, &name, "map needs a handler function")?;
    let stream_slot = service.open_stream(&tenant)?;
    let policy = service.policy(&tenant);
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = if content_type.starts_with("application/x-ndjson")
        || content_type.starts_with("application/jsonl")
        || content_type.starts_with("application/ndjson")
    {
        Format::Ndjson
    } else {
        Format::Array
    };
    // The tenant's concurrency, but never more workers than the host can
    // run at once: a policy may allow far more than the instance pool.
    let fan_out = (policy.max_concurrency as usize).clamp(1, service.host_capacity().max(1));
    let limit = usize::try_from(policy.max_body_bytes).unwrap_or(usize::MAX);
    let splitter = Splitter::new(format, limit);
    let target = Arc::new(MapTarget {
        control: service.buffered(&tenant),
        service: Arc::clone(&service),
        tenant,
        target,
        result_limit: policy.max_body_bytes,
    });
    let body = request.into_body();

    let (chunks, chunk_stream) = mpsc::channel::<Chunk>(16);
    // Every input's invocation is part of the request's trace; the workers
    // are tasks of their own, so they are given it.
    let trace = crate::trace::TraceContext::current();
    tokio::spawn(async move {
        // Held until the map is done (or its caller gone).
        let _stream_slot = stream_slot;
        let window = Arc::new(Semaphore::new(fan_out * WINDOW_PER_WORKER));
        let (input_tx, input_rx) = mpsc::channel(fan_out);
        let (result_tx, mut result_rx) = mpsc::channel::<(u64, Bytes)>(fan_out * WINDOW_PER_WORKER);
        let reader = tokio::spawn(read_inputs(
            body,
            splitter,
            Arc::clone(&window),
            input_tx,
            result_tx.clone(),
        ));
        let input_rx = Arc::new(Mutex::new(input_rx));
        let workers: Vec<_> = (0..fan_out)
            .map(|_| {
                let target = Arc::clone(&target);
                let (input_rx, result_tx) = (Arc::clone(&input_rx), result_tx.clone());
                tokio::spawn(trace.scope(async move {
                    loop {
                        let next = input_rx.lock().await.recv().await;
                        let Some((index, input)) = next else { return };
                        let text = run_one(&target, index, input).await;
                        if result_tx.send((index, text)).await.is_err() {
                            return;
                        }
                    }
                }))
            })
            .collect();
        drop(result_tx);

        let mut waiting = BTreeMap::new();
        let mut next = 0u64;
        let mut disconnected = false;
        'emit: loop {
            let result = tokio::select! {
                () = chunks.closed() => { disconnected = true; break 'emit; }
                result = result_rx.recv() => result,
            };
            let Some((index, text)) = result else { break };
            waiting.insert(index, text);
            while let Some(text) = waiting.remove(&next) {
                if chunks.send(Ok(Frame::data(text))).await.is_err() {
                    disconnected = true;
                    break 'emit;
                }
                next += 1;
                window.add_permits(1);
            }
        }
        if disconnected {
            tracing::info!(function = %target.target.function.name, written = next, "map stopped: the client went away");
            reader.abort();
            for worker in &workers {
                worker.abort();
            }
        }
    });

    let stream = futures::stream::unfold(chunk_stream, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let mut response = respond(
        StatusCode::OK,
        BodyExt::boxed_unsync(StreamBody::new(stream)),
    );
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(
        format: Format,
        limit: usize,
        chunks: &[&str],
    ) -> (Vec<Result<String, ItemError>>, Result<(), Malformed>) {
        let mut splitter = Splitter::new(format, limit);
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(e) = splitter.push(chunk.as_bytes(), &mut out) {
                return (convert(out), Err(e));
            }
        }
        let end = splitter.finish(&mut out);
        (convert(out), end)
    }

    fn convert(items: Vec<Result<Vec<u8>, ItemError>>) -> Vec<Result<String, ItemError>> {
        items
            .into_iter()
            .map(|i| i.map(|b| String::from_utf8(b).unwrap()))
            .collect()
    }

    #[test]
    fn arrays_split_at_top_level_commas_across_chunks() {
        let (items, end) = split(
            Format::Array,
            100,
            &[" [1, \"a,]\\\"", "b\", {\"x\": [1,2]}, [3", ",4] ,null]  "],
        );
        assert_eq!(end, Ok(()));
        let items: Vec<_> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            items,
            ["1", "\"a,]\\\"b\"", "{\"x\": [1,2]}", "[3,4]", "null"]
        );
        assert_eq!(split(Format::Array, 100, &["[]"]).0, vec![]);
        assert_eq!(
            split(Format::Array, 100, &["[1,,2]"]).0[1],
            Err(ItemError::Invalid("empty array element".into()))
        );
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(
            split(Format::Array, 100, &["{\"a\": 1}"])
                .1
                .unwrap_err()
                .0
                .contains("expected a JSON array")
        );
        assert!(
            split(Format::Array, 100, &["[1, 2"])
                .1
                .unwrap_err()
                .0
                .contains("not closed")
        );
        assert!(
            split(Format::Array, 100, &["[1] x"])
                .1
                .unwrap_err()
                .0
                .contains("after the closing")
        );
        assert!(
            split(Format::Array, 100, &[""])
                .1
                .unwrap_err()
                .0
                .contains("empty")
        );
    }

    #[test]
    fn ndjson_skips_blank_lines_and_caps_each_input() {
        let (items, end) = split(Format::Ndjson, 5, &["1\n\n\"ab", "c\"\n123456789\n{}"]);
        assert_eq!(end, Ok(()));
        assert_eq!(
            items,
            vec![
                Ok("1".into()),
                Ok("\"abc\"".into()),
                Err(ItemError::TooLarge(5)),
                Ok("{}".into())
            ]
        );
    }

    #[test]
    fn strings_pass_as_text_and_other_values_as_json() {
        assert_eq!(
            json_input(b"\"Ada\"").unwrap(),
            (b"Ada".to_vec(), "text/plain; charset=utf-8")
        );
        assert_eq!(
            json_input(b"{\"a\":1}").unwrap(),
            (b"{\"a\":1}".to_vec(), "application/json")
        );
        assert!(json_input(b"{oops").is_err());
        assert_eq!(
            output_value("application/json", b"[1]"),
            serde_json::json!([1])
        );
        assert_eq!(output_value("text/plain", b"hi"), serde_json::json!("hi"));
        assert_eq!(
            output_value("application/octet-stream", &[0xff]),
            serde_json::json!({"base64": "/w=="})
        );
    }
}
