//! A WASI 0.3 `wasi:http/service` component (what `wasmtime serve -Sp3
//! -Wcomponent-model-async` runs), covering the behaviours of Wasmtime's own
//! p3 test programs:
//!
//! - `/`: `Hello from WASI 0.3` (text/plain).
//! - `/echo`: the request body streamed back as it arrives, with its
//!   trailers.
//! - `/sleep/{ms}`: waits (`wasi:clocks` 0.3, an async call), then answers.
//! - `/stream/{n}`: answers at once, then writes `chunk {i}` lines one by
//!   one, 20 ms apart, after `handle` has returned.
//! - `/spin`: loops forever (the host's deadline must stop it).

use wasip3::clocks::monotonic_clock;
use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::wit_bindgen::{self, StreamResult};
use wasip3::{wit_future, wit_stream};

wasip3::http::service::export!(Service);

struct Service;

/// A response whose body is what `fill` writes to it, after `handle`
/// returns.
fn response<F>(
    status: u16,
    content_type: &str,
    fill: impl FnOnce(wit_bindgen::StreamWriter<u8>) -> F,
) -> Result<Response, ErrorCode>
where
    F: Future<Output = ()> + 'static,
{
    let headers = Fields::new();
    headers
        .set("content-type", &[content_type.as_bytes().to_vec()])
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
    let (body, contents) = wit_stream::new();
    let (trailers, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers);
    let (response, _sent) = Response::new(headers, Some(contents), trailers_rx);
    response
        .set_status_code(status)
        .map_err(|()| ErrorCode::InternalError(Some("bad status".into())))?;
    wit_bindgen::spawn_local(fill(body));
    Ok(response)
}

fn text(status: u16, text: String) -> Result<Response, ErrorCode> {
    response(status, "text/plain", move |mut body| async move {
        body.write_all(text.into_bytes()).await;
    })
}

fn echo(request: Request) -> Result<Response, ErrorCode> {
    let (handled, handled_rx) = wit_future::new(|| Ok(()));
    drop(handled);
    let (mut incoming, trailers) = Request::consume_body(request, handled_rx);
    let (mut body, contents) = wit_stream::new();
    let (response, _sent) = Response::new(Fields::new(), Some(contents), trailers);
    wit_bindgen::spawn_local(async move {
        loop {
            let (result, chunk) = incoming.read(Vec::with_capacity(64 * 1024)).await;
            if !chunk.is_empty() && !body.write_all(chunk).await.is_empty() {
                return;
            }
            if !matches!(result, StreamResult::Complete(_)) {
                return;
            }
        }
    });
    Ok(response)
}

impl wasip3::exports::http::handler::Guest for Service {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default().to_owned();
        let number = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|n| n.parse::<u64>().ok())
        };
        if path == "/echo" {
            echo(request)
        } else if let Some(ms) = number("/sleep/") {
            monotonic_clock::wait_for(ms * 1_000_000).await;
            text(200, format!("slept {ms} ms\n"))
        } else if let Some(n) = number("/stream/") {
            response(200, "text/plain", move |mut body| async move {
                for i in 0..n {
                    if !body
                        .write_all(format!("chunk {i}\n").into_bytes())
                        .await
                        .is_empty()
                    {
                        return;
                    }
                    monotonic_clock::wait_for(20_000_000).await;
                }
            })
        } else if path == "/spin" {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        } else {
            text(200, "Hello from WASI 0.3\n".to_owned())
        }
    }
}
