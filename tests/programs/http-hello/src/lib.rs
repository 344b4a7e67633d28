//! A `wasi:http/proxy` component (the world `wasmtime serve` runs), for the
//! host's HTTP-route tests.
//!
//! * `/` → 200 `text/plain` `hello from wasi:http`, header `x-fixture: http-hello`
//! * `/status/{code}` → that status, empty body
//! * `/echo` → 200, the request body back, headers `x-method` and `x-path`
//!   (path and query as the component saw them)
//! * `/stream/{n}` → 200, `n` chunks `chunk {i}\n`, 100 ms apart, each flushed
//! * `/fetch/{authority}/{path…}` → makes an outgoing `GET http://{authority}/{path…}`
//!   and answers 200 `{status} {body}`, or 502 with the error code;
//!   `/fetchs/…` does the same over HTTPS. The query may set the request's
//!   timeouts: `connect-ms`, `first-byte-ms`, `between-bytes-ms`
//! * `/panic` → panics before responding
//! * `/loop` → spins forever before responding

use std::hint::black_box;

use wasip2::clocks::monotonic_clock;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    RequestOptions, ResponseOutparam, Scheme,
};

wasip2::http::proxy::export!(HttpHello);

struct HttpHello;

fn respond(
    out: ResponseOutparam,
    status: u16,
    headers: &[(&str, &[u8])],
    chunks: &[Vec<u8>],
    pause_ns: u64,
) {
    let fields = Fields::new();
    for (name, value) in headers {
        let _ = fields.append(name, value);
    }
    let response = OutgoingResponse::new(fields);
    let _ = response.set_status_code(status);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(stream) = body.write() {
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 && pause_ns > 0 {
                monotonic_clock::subscribe_duration(pause_ns).block();
            }
            // Writes go out in pieces of at most 4096 bytes per the stream contract.
            for piece in chunk.chunks(4096) {
                if stream.blocking_write_and_flush(piece).is_err() {
                    return;
                }
            }
        }
    }
    let _ = OutgoingBody::finish(body, None);
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut data = Vec::new();
    let Ok(body) = request.consume() else {
        return data;
    };
    if let Ok(stream) = body.stream() {
        while let Ok(chunk) = stream.blocking_read(64 * 1024) {
            data.extend_from_slice(&chunk);
        }
    }
    data
}

/// The request options the query asks for (`connect-ms`, `first-byte-ms`,
/// `between-bytes-ms`), if any.
fn options(query: &str) -> Option<RequestOptions> {
    let mut options = None;
    for pair in query.split('&') {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        let Ok(ms) = value.parse::<u64>() else {
            continue;
        };
        let options = options.get_or_insert_with(RequestOptions::new);
        let ns = Some(ms * 1_000_000);
        let _ = match name {
            "connect-ms" => options.set_connect_timeout(ns),
            "first-byte-ms" => options.set_first_byte_timeout(ns),
            "between-bytes-ms" => options.set_between_bytes_timeout(ns),
            _ => Ok(()),
        };
    }
    options
}

/// `GET {scheme}://{authority}{path}`: the status and body, or the error.
fn fetch(https: bool, authority: &str, path: &str, query: &str) -> Result<String, String> {
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_scheme(Some(if https { &Scheme::Https } else { &Scheme::Http }));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let pending =
        outgoing_handler::handle(request, options(query)).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(format!("{code:?}")),
        _ => return Err("no response".to_owned()),
    };
    let status = response.status();
    let body = response.consume().map_err(|()| "no body".to_owned())?;
    let mut data = Vec::new();
    if let Ok(stream) = body.stream() {
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(wasip2::io::streams::StreamError::Closed) => break,
                // A failed body (a timeout between bytes, say) says why.
                Err(wasip2::io::streams::StreamError::LastOperationFailed(error)) => {
                    let code = wasip2::http::types::http_error_code(&error);
                    return Err(format!("body: {code:?}"));
                }
            }
        }
    }
    Ok(format!("{status} {}", String::from_utf8_lossy(&data)))
}

impl wasip2::exports::http::incoming_handler::Guest for HttpHello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let route = path.split('?').next().unwrap_or_default().to_owned();
        let segments: Vec<&str> = route.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            [""] => respond(
                out,
                200,
                &[
                    ("content-type", b"text/plain"),
                    ("x-fixture", b"http-hello"),
                ],
                &[b"hello from wasi:http".to_vec()],
                0,
            ),
            ["status", code] => respond(out, code.parse().unwrap_or(500), &[], &[], 0),
            ["echo"] => {
                let method = match request.method() {
                    Method::Get => "GET".to_owned(),
                    Method::Post => "POST".to_owned(),
                    Method::Put => "PUT".to_owned(),
                    Method::Delete => "DELETE".to_owned(),
                    other => format!("{other:?}"),
                };
                let body = read_body(&request);
                respond(
                    out,
                    200,
                    &[("x-method", method.as_bytes()), ("x-path", path.as_bytes())],
                    &[body],
                    0,
                );
            }
            ["stream", n] => {
                let chunks: Vec<Vec<u8>> = (0..n.parse::<u32>().unwrap_or(3))
                    .map(|i| format!("chunk {i}\n").into_bytes())
                    .collect();
                respond(
                    out,
                    200,
                    &[("content-type", b"text/plain")],
                    &chunks,
                    100_000_000,
                );
            }
            [verb @ ("fetch" | "fetchs"), authority, rest @ ..] => {
                let upstream = format!("/{}", rest.join("/"));
                let query = path.split_once('?').map_or("", |(_, q)| q);
                match fetch(*verb == "fetchs", authority, &upstream, query) {
                    Ok(text) => respond(out, 200, &[], &[text.into_bytes()], 0),
                    Err(error) => respond(out, 502, &[], &[error.into_bytes()], 0),
                }
            }
            ["panic"] => panic!("the http-hello fixture panicked on purpose"),
            ["loop"] => {
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            _ => respond(out, 404, &[], &[b"no such route".to_vec()], 0),
        }
    }
}
