//! Hostile guests against a real server: each one's own call fails with a
//! clear problem while a well-behaved tenant's calls keep succeeding, and
//! the host's memory stays bounded.

use std::time::Duration;

use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use super::server::{TestServer, deploy, request, tenant};

/// The resident set of this process (the server runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

pub(crate) async fn a_wasi_http_function_cannot_pile_up_emitted_output() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    let deployed = deploy(&server, &key, "emits", artifacts::HOSTILE_HTTP_COMPONENT).await;
    assert_eq!(deployed.json()["world"], "http", "{}", deployed.text());
    let reply = request("GET", &server.url("/http/demo/emits/"), Some(&key), "").await;
    let problem = reply.problem(500, "limit-exceeded");
    assert!(
        problem["detail"].as_str().unwrap().contains("wasi:http"),
        "{problem}"
    );
    server.stop().await;
}

/// Several hostile calls at once (host memory through wasi-nn, emitted
/// output, handles, stdout, a spin) by tenant `other` (64 MiB, 5 s: long
/// enough for each to reach its limit on a loaded machine): each fails
/// with its own code, another tenant's calls all succeed, and the process
/// grows by far less than the hostile guests asked for.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_fail_alone_and_the_host_stays_bounded() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let polite = server.demo_key.clone().unwrap();
    let hostile = tenant(&server, "other").await;
    assert_eq!(
        deploy(&server, &hostile, "hostile", artifacts::HOSTILE_COMPONENT)
            .await
            .status,
        201
    );
    assert_eq!(
        deploy(
            &server,
            &hostile,
            "spin",
            artifacts::INFINITE_LOOP_COMPONENT
        )
        .await
        .status,
        201
    );
    assert_eq!(
        deploy(&server, &polite, "hello", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    let hello_url = server.url("/v1/functions/hello/invoke");
    // Warm: the first calls compile and size pools.
    assert_eq!(
        request("POST", &hello_url, Some(&polite), "").await.status,
        200
    );
    let before = rss_bytes();

    let hostile_url = server.url("/v1/functions/hostile/invoke");
    let spin_url = server.url("/v1/functions/spin/invoke");
    let attacks = [
        ("nn-tensors 1048576", "out-of-memory"),
        ("nn-tensors 65536", "out-of-memory"),
        ("handles", "limit-exceeded"),
        ("emit 1048576", "limit-exceeded"),
        ("stdout 65536", "timeout"),
    ];
    // Six at once: within the tenant's eight concurrent calls.
    let mut tasks = Vec::new();
    for (body, code) in attacks {
        let (url, hostile) = (hostile_url.clone(), hostile.clone());
        tasks.push(tokio::spawn(async move {
            let reply = request("POST", &url, Some(&hostile), body).await;
            (body, code, reply)
        }));
    }
    tasks.push(tokio::spawn(async move {
        let reply = request("POST", &spin_url, Some(&hostile), "").await;
        ("spin", "timeout", reply)
    }));
    // Meanwhile the polite tenant is served, call after call.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut served = 0;
    while tokio::time::Instant::now() < deadline {
        let reply = request("POST", &hello_url, Some(&polite), "").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        served += 1;
    }
    assert!(served > 0);
    for task in tasks {
        let (what, code, reply) = task.await.unwrap();
        let status = match code {
            "timeout" => 504,
            _ => 500,
        };
        assert_eq!(
            (reply.status, reply.json()["code"].as_str().unwrap_or("")),
            (status, code),
            "{what}: {}",
            reply.text()
        );
    }
    // Six hostile calls, each stopped at the 64 MiB of memory it may have
    // (unbounded, the nn ones alone would hold gigabytes by their
    // deadline); some of the memory stays in allocator caches.
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 768 << 20, "the host grew by {} MiB", grown >> 20);
    server.stop().await;
}

/// Slowloris: a thousand connections that never finish their headers do
/// not keep a normal request waiting, and are closed after the header
/// timeout; a body that trickles is answered 408 after the body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = TempDir::new().unwrap();
    let server = TestServer::start_configured(dir.path(), |config| {
        config.connections.header_timeout = Duration::from_secs(2);
        config.connections.body_timeout = Duration::from_secs(1);
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gust\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    let asked = std::time::Instant::now();
    let health = request("GET", &server.url("/healthz"), None, "").await;
    let took = asked.elapsed();
    assert_eq!(health.status, 200);
    assert!(
        took < Duration::from_secs(1),
        "a normal request took {took:?}"
    );

    // Past the header timeout every slow connection has been closed: a
    // read sees the end of the stream (or a reset), not a response.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for stream in &mut slow {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) => assert!(
                n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Ok(Err(_)) => {}
            Err(_) => panic!("a slow connection is still open after the header timeout"),
        }
    }
    drop(slow);

    // A body that never finishes: 408 once the body timeout passes.
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/functions/echo/invoke HTTP/1.1\r\nHost: gust\r\nAuthorization: Bearer {key}\r\nContent-Length: 100\r\n\r\nonly part"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(12).any(|w| w == b"body-timeout") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a trickled body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body-timeout"), "{answer}");
    server.stop().await;
}

/// Anonymous callers of a public function run in a budget of their own
/// (the tenant's own calls still get through when it is full), and a
/// failure tells them its code and invocation id, not the guest's panic or
/// backtrace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_callers_have_their_own_budget_and_see_no_internals() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "anon").await;
    let bytes = std::fs::read(artifacts::HTTP_HELLO_COMPONENT).unwrap();
    let public = request(
        "PUT",
        &server.url("/v1/functions/open?public=true"),
        Some(&key),
        bytes,
    )
    .await;
    assert_eq!(public.status, 201, "{}", public.text());
    let url = |path: &str| server.url(&format!("/http/anon/open{path}"));

    // One anonymous call spins; the next anonymous one is refused.
    let started = std::time::Instant::now();
    let (refused, spinning) = loop {
        let loop_url = url("/loop");
        let spinning = tokio::spawn(async move { request("GET", &loop_url, None, "").await });
        // Until the spinning call ends (4 s after it is admitted, which
        // under a loaded machine can itself take seconds), every other
        // anonymous call must be refused; it may not have been admitted yet
        // at first.
        let probe = loop {
            let reply = request("GET", &url("/"), None, "").await;
            if reply.status == 429 || spinning.is_finished() {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if probe.status == 429 {
            break (probe, spinning);
        }
        // The spinning call ended first: it was refused itself when it
        // arrived while a probe held the one anonymous slot. Start again.
        spinning.await.unwrap().problem(429, "too-many-requests");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the spinning call never got the anonymous slot"
        );
    };
    refused.problem(429, "too-many-requests");
    // The tenant's own key still has its own slots.
    let own = request("GET", &url("/"), Some(&key), "").await;
    assert_eq!(own.status, 200, "{}", own.text());
    spinning.await.unwrap().problem(504, "timeout");

    // A panic: the owner reads what happened, a stranger only the code.
    let anonymous = request("GET", &url("/panic"), None, "")
        .await
        .problem(500, "trap");
    let detail = anonymous["detail"].as_str().unwrap();
    let id = anonymous["invocation_id"].as_str().unwrap();
    assert!(detail.contains(id) && !detail.contains("panic"), "{detail}");
    let owner = request("GET", &url("/panic"), Some(&key), "")
        .await
        .problem(500, "trap");
    assert!(
        owner["detail"].as_str().unwrap().contains("panic"),
        "{owner}"
    );
    // The record keeps the whole story for the owner.
    let record = super::server::invocation_record(&server, &key, id).await;
    assert!(
        record["message"].as_str().unwrap().contains("panic"),
        "{record}"
    );
    server.stop().await;
}

/// Logs come in pages: `limit` records at most, then a cursor to the next
/// (older) page; a malformed cursor is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_paginated_with_a_cursor() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    assert_eq!(
        deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    let mut invoked = Vec::new();
    for i in 0..5 {
        let reply = request(
            "POST",
            &server.url("/v1/functions/hello/invoke"),
            Some(&key),
            format!("n{i}"),
        )
        .await;
        invoked.push(
            reply.headers["gust-invocation-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    invoked.reverse();
    let mut seen = Vec::new();
    let mut url = server.url("/v1/functions/hello/logs?limit=2");
    let mut pages = 0;
    loop {
        let page = request("GET", &url, Some(&key), "").await;
        assert_eq!(page.status, 200, "{}", page.text());
        let page = page.json();
        pages += 1;
        let ids: Vec<String> = page["invocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(ids.len() <= 2);
        seen.extend(ids);
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                url = server.url(&format!("/v1/functions/hello/logs?limit=2&cursor={cursor}"));
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, invoked);
    request(
        "GET",
        &server.url("/v1/functions/hello/logs?cursor=soon"),
        Some(&key),
        "",
    )
    .await
    .problem(400, "invalid-request");
    server.stop().await;
}
