//! Traces end to end: a `gust serve` process exporting its spans over
//! OTLP/HTTP to a collector stand-in written here (it decodes the protobuf
//! it receives), a caller's `traceparent`, and the upstream API a function
//! calls, which must see the same trace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gust_test_artifacts as artifacts;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use tempfile::TempDir;
use tokio::net::TcpListener;

use crate::crash::Host;
use crate::server::{request_with, tenant_on};

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// Serves `handle` on a loopback port: each request, answered 200 with
/// `handle`'s text.
async fn serve(
    handle: impl Fn(http::HeaderMap, Bytes) -> String + Send + Sync + 'static,
) -> SocketAddr {
    let handle = Arc::new(handle);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handle = Arc::clone(&handle);
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let handle = Arc::clone(&handle);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let text = handle(parts.headers, body);
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A collector stand-in: every span of every export it receives.
async fn collector() -> (SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::clone(&spans);
    let addr = serve(move |_, body| {
        let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
        let mut spans = received.lock().unwrap();
        for resource in export.resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        name: span.name,
                        trace_id: hex::encode(span.trace_id),
                        span_id: hex::encode(span.span_id),
                        parent_span_id: hex::encode(span.parent_span_id),
                    });
                }
            }
        }
        String::new()
    })
    .await;
    (addr, spans)
}

/// The spans of `trace` once `names` are all among them.
async fn spans_of(spans: &Mutex<Vec<Span>>, trace: &str, names: &[&str]) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<Span> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect();
        if names
            .iter()
            .all(|name| found.iter().any(|s| s.name == *name))
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "spans of {trace} so far: {found:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The trace id of invocation `id` on the host at `url`, once its record
/// is written.
async fn trace_of(url: &str, key: &str, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = request_with(
            "GET",
            &format!("{url}/v1/invocations/{id}"),
            Some(key),
            "",
            &[],
        )
        .await;
        if reply.status == 200 {
            let record = reply.json();
            return record["trace_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no trace id: {record}"))
                .to_owned();
        }
        assert!(Instant::now() < deadline, "no record {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name} in {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_runs_through_the_function_to_the_api_it_calls() {
    let (collector, spans) = collector().await;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let upstream = {
        let seen = Arc::clone(&seen);
        serve(move |headers, _| {
            let parent = headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            seen.lock().unwrap().push(parent);
            "upstream".to_owned()
        })
        .await
    };
    let dir = TempDir::new().unwrap();
    let endpoint = format!("http://{collector}");
    let host = Host::start_with_env(
        dir.path(),
        &["--otlp-endpoint", &endpoint],
        // Export within moments, not the SDK's default 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    // `egress` may reach 127.0.0.1 (an address rule).
    let key = tenant_on(&host.url, "egress").await;
    let deployed = request_with(
        "PUT",
        &format!("{}/v1/functions/web?public=true", host.url),
        Some(&key),
        std::fs::read(artifacts::HTTP_HELLO_COMPONENT).unwrap(),
        &[],
    )
    .await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());

    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let traceparent = format!("00-{trace}-{caller_span}-01");
    let reply = request_with(
        "GET",
        &format!("{}/http/egress/web/fetch/{upstream}/x", host.url),
        None,
        "",
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "200 upstream"));
    let id = reply.headers["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();

    // The API the function called is in the caller's trace.
    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let hop = sent[0].split('-').collect::<Vec<_>>();
    assert_eq!((hop[0], hop[1], hop[3]), ("00", trace, "01"), "{}", sent[0]);
    assert_ne!(hop[2], caller_span);

    // So is the invocation record.
    assert_eq!(trace_of(&host.url, &key, &id).await, trace);

    // And the host's spans, linked: the request under the caller's span,
    // the outgoing request's span the parent the API saw.
    // The request's span is named for its route.
    let route = "GET /http/{tenant}/{name}/{*path}";
    let names = [
        route,
        "admission",
        "invocation",
        "instantiate",
        "call",
        "http.outbound",
    ];
    let found = spans_of(&spans, trace, &names).await;
    let request = one(&found, route);
    assert_eq!(request.parent_span_id, caller_span);
    let invocation = one(&found, "invocation");
    assert_eq!(invocation.parent_span_id, request.span_id);
    assert_eq!(one(&found, "admission").parent_span_id, request.span_id);
    let call = one(&found, "call");
    assert_eq!(call.parent_span_id, invocation.span_id);
    assert_eq!(
        one(&found, "instantiate").parent_span_id,
        invocation.span_id
    );
    let outbound = one(&found, "http.outbound");
    assert_eq!(outbound.parent_span_id, call.span_id);
    assert_eq!(
        outbound.span_id, hop[2],
        "the API's parent is the outgoing request's span"
    );

    // A handler call without a traceparent starts a trace of its own,
    // recorded and exported the same way.
    let demo = host.demo_key.clone().unwrap();
    let hello = request_with(
        "PUT",
        &format!("{}/v1/functions/hello", host.url),
        Some(&demo),
        std::fs::read(artifacts::HELLO_COMPONENT).unwrap(),
        &[],
    )
    .await;
    assert_eq!(hello.status, 201);
    let invoked = request_with(
        "POST",
        &format!("{}/v1/functions/hello/invoke", host.url),
        Some(&demo),
        "trace",
        &[],
    )
    .await;
    assert_eq!(invoked.text(), "Hello, trace!");
    let id = invoked.headers["gust-invocation-id"].to_str().unwrap();
    let own = trace_of(&host.url, &demo, id).await;
    assert_eq!(own.len(), 32);
    assert_ne!(own, trace);
    let invoke_route = "POST /v1/functions/{name}/invoke";
    let found = spans_of(&spans, &own, &[invoke_route, "invocation", "call"]).await;
    // Its root: no parent.
    let root = one(&found, invoke_route);
    assert!(root.parent_span_id.is_empty(), "{root:?}");

    // A job runs in the trace of the request that spawned it.
    let job_trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let spawned = request_with(
        "POST",
        &format!("{}/v1/functions/hello/spawn", host.url),
        Some(&demo),
        "later",
        &[(
            "traceparent",
            &format!("00-{job_trace}-0102030405060708-01"),
        )],
    )
    .await;
    assert_eq!(spawned.status, 202, "{}", spawned.text());
    let job_id = spawned.json()["job_id"].as_str().unwrap().to_owned();
    let job = crate::jobs::poll_json(&format!("{}/v1/jobs/{job_id}", host.url), &demo, |job| {
        job["status"] == "succeeded"
    })
    .await;
    let run = job["invocation_id"].as_str().unwrap();
    assert_eq!(trace_of(&host.url, &demo, run).await, job_trace);
    let spawn_route = "POST /v1/functions/{name}/spawn";
    let found = spans_of(&spans, job_trace, &[spawn_route, "invocation", "call"]).await;
    let spawn = one(&found, spawn_route);
    assert_eq!(one(&found, "invocation").parent_span_id, spawn.span_id);

    // So does every input of a map, each run by a worker task.
    let map_trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    let mapped = request_with(
        "POST",
        &format!("{}/v1/functions/hello/map", host.url),
        Some(&demo),
        r#"["a", "b"]"#,
        &[
            (
                "traceparent",
                &format!("00-{map_trace}-0102030405060708-01"),
            ),
            ("content-type", "application/json"),
        ],
    )
    .await;
    assert_eq!(mapped.status, 200, "{}", mapped.text());
    for line in mapped.text().lines() {
        let item: serde_json::Value = serde_json::from_str(line).unwrap();
        let run = item["invocation_id"].as_str().unwrap();
        assert_eq!(trace_of(&host.url, &demo, run).await, map_trace);
    }
    host.kill();
}
