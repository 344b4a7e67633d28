//! Jobs: spawn, poll, cancel, the bounded queue, retention, and what a
//! restart does to queued, running and finished jobs.

use std::time::{Duration, Instant};

use gust_test_artifacts as artifacts;
use serde_json::Value;
use tempfile::TempDir;

use super::server::{ADMIN_KEY, TestServer, deploy, invocation_record, request, tenant};

/// Polls `GET url` until `done` holds for the JSON answer. The bound only
/// keeps a broken host from hanging the test; nothing is timed.
pub(crate) async fn poll_json(url: &str, key: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = request("GET", url, Some(key), "").await;
        if reply.status == 200 {
            let value = reply.json();
            if done(&value) {
                return value;
            }
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting on {url}: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn spawn(server: &TestServer, key: &str, function: &str, input: &str) -> String {
    let reply = request(
        "POST",
        &server.url(&format!("/v1/functions/{function}/spawn")),
        Some(key),
        input.to_owned(),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let body = reply.json();
    let id = body["job_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("job_"), "{body}");
    assert_eq!(body["url"], format!("/v1/jobs/{id}"));
    assert_eq!(body["status"], "pending");
    assert_eq!(reply.headers["location"], format!("/v1/jobs/{id}"));
    id
}

async fn wait_status(server: &TestServer, key: &str, id: &str, status: &str) -> Value {
    poll_json(&server.url(&format!("/v1/jobs/{id}")), key, |job| {
        job["status"] == status
    })
    .await
}

async fn wait_finished(server: &TestServer, key: &str, id: &str) -> Value {
    poll_json(&server.url(&format!("/v1/jobs/{id}")), key, |job| {
        matches!(
            job["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_poll_result_then_delete() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    deploy(&server, &key, "errors", artifacts::RETURNS_ERROR_COMPONENT).await;

    let id = spawn(&server, &key, "hello", "Ada").await;
    let job = wait_status(&server, &key, &id, "succeeded").await;
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["function"], "hello");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["result"]["status"], 200);
    assert_eq!(job["result"]["output"], "Hello, Ada!");
    assert!(job["error"].is_null());
    assert!(job["finished_at"].is_string() && job["started_at"].is_string());
    // The run was an invocation with its record.
    let invocation = job["invocation_id"].as_str().unwrap();
    let record = request(
        "GET",
        &server.url(&format!("/v1/invocations/{invocation}")),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(record.json()["outcome"], "ok");

    // A failing function: the job fails with the function's own error.
    let failing = spawn(&server, &key, "errors", "").await;
    let job = wait_status(&server, &key, &failing, "failed").await;
    assert!(job["result"].is_null());
    assert!(job["error"]["code"].is_string(), "{job}");

    // Another tenant sees nothing.
    let other = tenant(&server, "other").await;
    request(
        "GET",
        &server.url(&format!("/v1/jobs/{id}")),
        Some(&other),
        "",
    )
    .await
    .problem(404, "not-found");
    request(
        "DELETE",
        &server.url(&format!("/v1/jobs/{id}")),
        Some(&other),
        "",
    )
    .await
    .problem(404, "not-found");
    request(
        "POST",
        &server.url("/v1/functions/nope/spawn"),
        Some(&key),
        "",
    )
    .await
    .problem(404, "not-found");
    request("GET", &server.url("/v1/jobs/job_nope"), None, "")
        .await
        .problem(401, "unauthorized");

    // Deleting a finished job removes it.
    let deleted = request(
        "DELETE",
        &server.url(&format!("/v1/jobs/{id}")),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    request(
        "GET",
        &server.url(&format!("/v1/jobs/{id}")),
        Some(&key),
        "",
    )
    .await
    .problem(404, "not-found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_interrupts_a_running_loop_and_the_queue_is_bounded() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    // One call at a time, two jobs may wait.
    let key = tenant(&server, "queue").await;
    deploy(&server, &key, "loop", artifacts::INFINITE_LOOP_COMPONENT).await;
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;

    let looping = spawn(&server, &key, "loop", "").await;
    let running = wait_status(&server, &key, &looping, "running").await;
    assert_eq!(running["attempts"], 1);
    let waiting = spawn(&server, &key, "hello", "a").await;
    let second = spawn(&server, &key, "hello", "b").await;
    let full = request(
        "POST",
        &server.url("/v1/functions/hello/spawn"),
        Some(&key),
        "c",
    )
    .await;
    full.problem(429, "queue-full");
    assert!(full.headers.contains_key("retry-after"));
    let metrics = request("GET", &server.url("/metrics"), Some(ADMIN_KEY), "")
        .await
        .text();
    assert!(metrics.contains("gust_jobs_queued 2"), "{metrics}");
    assert!(metrics.contains("gust_jobs_running 1"), "{metrics}");

    // A pending job is cancelled at once.
    let cancelled = request(
        "DELETE",
        &server.url(&format!("/v1/jobs/{waiting}")),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(cancelled.status, 202, "{}", cancelled.text());
    assert_eq!(cancelled.json()["status"], "cancelled");

    // The running loop is interrupted, well before its 5 s deadline would
    // have ended it as a timeout.
    let cancel = request(
        "DELETE",
        &server.url(&format!("/v1/jobs/{looping}")),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(cancel.status, 202, "{}", cancel.text());
    let job = wait_finished(&server, &key, &looping).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["error"]["code"], "cancelled");
    let invocation = job["invocation_id"].as_str().unwrap();
    let record = invocation_record(&server, &key, invocation).await;
    assert_eq!(record["outcome"], "cancelled", "{record}");

    // The queue moves on: the remaining job runs; the cancelled one never did.
    let job = wait_status(&server, &key, &second, "succeeded").await;
    assert_eq!(job["result"]["output"], "Hello, b!");
    let never = request(
        "GET",
        &server.url(&format!("/v1/jobs/{waiting}")),
        Some(&key),
        "",
    )
    .await
    .json();
    assert_eq!(never["status"], "cancelled");
    assert!(never["invocation_id"].is_null(), "{never}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_queued_and_finished_jobs_and_fails_or_retries_running_ones() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let queue = tenant(&server, "queue").await;
    let other = tenant(&server, "other").await;
    deploy(&server, &queue, "hello", artifacts::HELLO_COMPONENT).await;
    deploy(&server, &queue, "loop", artifacts::INFINITE_LOOP_COMPONENT).await;
    let retryable = request(
        "PUT",
        &server.url("/v1/functions/again?retryable=true"),
        Some(&other),
        std::fs::read(artifacts::INFINITE_LOOP_COMPONENT).unwrap(),
    )
    .await;
    assert_eq!(retryable.status, 201, "{}", retryable.text());
    assert_eq!(retryable.json()["retryable"], true);

    let finished = spawn(&server, &queue, "hello", "before").await;
    wait_status(&server, &queue, &finished, "succeeded").await;
    let looping = spawn(&server, &queue, "loop", "").await;
    wait_status(&server, &queue, &looping, "running").await;
    let queued = spawn(&server, &queue, "hello", "queued").await;
    let again = spawn(&server, &other, "again", "").await;
    wait_status(&server, &other, &again, "running").await;
    let job = request(
        "GET",
        &server.url(&format!("/v1/jobs/{queued}")),
        Some(&queue),
        "",
    )
    .await
    .json();
    assert_eq!(job["status"], "pending", "{job}");
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    // Finished results are still readable.
    let job = request(
        "GET",
        &server.url(&format!("/v1/jobs/{finished}")),
        Some(&queue),
        "",
    )
    .await
    .json();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["result"]["output"], "Hello, before!");
    // A job that was running fails with the reason.
    let job = wait_finished(&server, &queue, &looping).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "host-restarted");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retryable"),
        "{job}"
    );
    // The queued job was kept and now runs.
    let job = wait_status(&server, &queue, &queued, "succeeded").await;
    assert_eq!(job["result"]["output"], "Hello, queued!");
    // The retryable function's job ran once more.
    let job = poll_json(&server.url(&format!("/v1/jobs/{again}")), &other, |job| {
        job["attempts"] == 2
    })
    .await;
    assert_ne!(job["status"], "pending", "{job}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_expire_after_the_retention() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start_configured(dir.path(), |config| {
        config.job_retention = Duration::from_millis(200);
    })
    .await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    let id = spawn(&server, &key, "hello", "").await;
    let url = server.url(&format!("/v1/jobs/{id}"));
    // Succeeded, then swept: the poll sees 404 in the end.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = request("GET", &url, Some(&key), "").await;
        if reply.status == 404 {
            break;
        }
        assert_ne!(reply.json()["status"], "failed", "{}", reply.text());
        assert!(Instant::now() < deadline, "never swept: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

/// A tenant keeps at most `max_stored_jobs` finished jobs (the oldest go
/// first), and a result larger than `max_body_bytes` fails its job instead
/// of being kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_capped_per_tenant() {
    let dir = TempDir::new().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("capped.toml"),
        "max_stored_jobs = 2\nmax_body_bytes = 64\n",
    )
    .unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "capped").await;
    assert_eq!(
        deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        let id = spawn(&server, &key, "hello", name).await;
        let job = wait_finished(&server, &key, &id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        ids.push(id);
    }
    let status = |id: String| {
        let url = server.url(&format!("/v1/jobs/{id}"));
        let key = key.clone();
        async move { request("GET", &url, Some(&key), "").await.status }
    };
    assert_eq!(status(ids[0].clone()).await, 404, "the oldest went");
    assert_eq!(status(ids[1].clone()).await, 200);
    assert_eq!(status(ids[2].clone()).await, 200);

    // "Hello, <60 bytes>!" is 68 bytes: more than a request may carry.
    let long = "x".repeat(60);
    let id = spawn(&server, &key, "hello", &long).await;
    let job = wait_finished(&server, &key, &id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "result-too-large", "{job}");
    assert!(job["result"].is_null(), "{job}");
    server.stop().await;
}
