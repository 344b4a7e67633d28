//! WASI 0.3 `wasi:http/service` components through `gust serve`: the same
//! `/http/{tenant}/{name}/…` route, limits, records, streaming and deadlines
//! as WASI 0.2 ones (the behaviours of Wasmtime's p3 proxy and `cli_serve`
//! test programs: hello, many at once, echo, streaming, a sleep past the
//! deadline).

use std::time::{Duration, Instant};

use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use crate::server::{TestServer, request, tenant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_0_3_service_is_served_recorded_and_stopped_like_a_0_2_one() {
    let dir = TempDir::new().unwrap();
    let policies = crate::server::policies(dir.path());
    std::fs::write(
        policies.join("pthree.toml"),
        "max_concurrency = 32\nmax_anonymous_concurrency = 24\n",
    )
    .unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "pthree").await;
    let bytes = std::fs::read(artifacts::HTTP_P3_COMPONENT).unwrap();
    let deployed = request(
        "PUT",
        &server.url("/v1/functions/svc?public=true"),
        Some(&key),
        bytes,
    )
    .await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    assert_eq!(deployed.json()["world"], "http-p3");
    let listed = request("GET", &server.url("/v1/functions"), Some(&key), "").await;
    assert_eq!(listed.json()["functions"][0]["world"], "http-p3");

    // Hello, with the invocation id the host gives every call.
    let hello = request("GET", &server.url("/http/pthree/svc/"), None, "").await;
    assert_eq!(hello.status, 200, "{}", hello.text());
    assert_eq!(hello.text(), "Hello from WASI 0.3\n");
    let id = hello.headers["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    // The record is written once the guest is done.
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let (status, record) = crate::server::invocation_status(&server, &key, &id).await;
        if status == 200 {
            break record;
        }
        assert!(Instant::now() < deadline, "no record of {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(record["outcome"], "ok", "{record}");
    assert_eq!(record["status"], 200, "{record}");

    // Echo, a body bigger than one read.
    let big: String = (0..10_000).map(|i| format!("{i:05}")).collect();
    let echoed = request(
        "POST",
        &server.url("/http/pthree/svc/echo"),
        None,
        big.clone(),
    )
    .await;
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.text(), big);
    // Over the policy's max_body_bytes (64 KiB in the tests): refused, the
    // host goes on.
    let huge = vec![b'x'; 200 * 1024];
    let refused = request("POST", &server.url("/http/pthree/svc/echo"), None, huge).await;
    assert_ne!(refused.status, 200);

    // Streaming: written after `handle` returned.
    let streamed = request("GET", &server.url("/http/pthree/svc/stream/5"), None, "").await;
    assert_eq!(
        streamed.text(),
        "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n"
    );

    // Many at once, each answered.
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let url = server.url(&format!("/http/pthree/svc/sleep/{}", 10 + i % 5));
            tokio::spawn(async move { request("GET", &url, None, "").await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("slept {} ms\n", 10 + i % 5));
    }

    // Past the deadline (1.5 s in the tests): 504, sleeping or spinning.
    for path in ["/http/pthree/svc/sleep/5000", "/http/pthree/svc/spin"] {
        let started = Instant::now();
        let late = request("GET", &server.url(path), None, "").await;
        late.problem(504, "timeout");
        assert!(started.elapsed() < Duration::from_secs(5), "{path}");
    }
    let hello = request("GET", &server.url("/http/pthree/svc/"), None, "").await;
    assert_eq!(hello.status, 200);

    // Not a handler: invoking it says where it is served.
    request(
        "POST",
        &server.url("/v1/functions/svc/invoke"),
        Some(&key),
        "",
    )
    .await
    .problem(400, "wrong-world");
    server.stop().await;
}
