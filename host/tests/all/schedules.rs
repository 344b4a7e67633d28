//! Cron schedules: runs are recorded invocations, schedules show in the
//! function list and survive a restart.

use std::time::{Duration, Instant};

use gust_test_artifacts as artifacts;
use serde_json::Value;
use tempfile::TempDir;

use super::server::{TestServer, deploy, request, tenant};

async fn scheduled_runs(server: &TestServer, key: &str) -> Vec<Value> {
    let logs = request(
        "GET",
        &server.url("/v1/functions/hello/logs?limit=1000"),
        Some(key),
        "",
    )
    .await
    .json();
    logs["invocations"].as_array().unwrap().clone()
}

/// Waits until the function has more than `count` invocation records. The
/// bound only keeps a broken host from hanging the test.
async fn wait_for_runs(server: &TestServer, key: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = scheduled_runs(server, key).await;
        if runs.len() > count {
            return runs;
        }
        assert!(Instant::now() < deadline, "the schedule never fired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_and_survives_a_restart() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    let url = server.url("/v1/functions/hello/schedule");

    // Bad expressions and bodies are refused.
    request("PUT", &url, Some(&key), r#"{"cron": "61 * * * *"}"#)
        .await
        .problem(400, "invalid-cron");
    request("PUT", &url, Some(&key), r#"{"cron": "* * *"}"#)
        .await
        .problem(400, "invalid-cron");
    request("PUT", &url, Some(&key), r#"{"cron": "* * * * *", "x": 1}"#)
        .await
        .problem(400, "invalid-request");
    request(
        "PUT",
        &server.url("/v1/functions/nope/schedule"),
        Some(&key),
        r#"{"cron": "* * * * *"}"#,
    )
    .await
    .problem(404, "not-found");
    request("GET", &url, Some(&key), "")
        .await
        .problem(404, "not-found");

    // Every second (six fields: seconds first).
    let created = request(
        "PUT",
        &url,
        Some(&key),
        r#"{"cron": "* * * * * *", "input": "cron"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let schedule = created.json();
    assert_eq!(schedule["cron"], "* * * * * *");
    assert_eq!(schedule["input"], "cron");
    assert!(schedule["next_run_at"].is_string(), "{schedule}");
    let list = request("GET", &server.url("/v1/functions"), Some(&key), "")
        .await
        .json();
    assert_eq!(list["functions"][0]["schedule"], "* * * * * *");

    let runs = wait_for_runs(&server, &key, 0).await;
    assert_eq!(runs[0]["outcome"], "ok", "{}", runs[0]);
    let schedule = request("GET", &url, Some(&key), "").await.json();
    assert_eq!(schedule["last_outcome"], "ok", "{schedule}");
    assert!(schedule["last_invocation_id"].is_string());
    // Another tenant sees no schedule.
    let other = tenant(&server, "other").await;
    request("GET", &url, Some(&other), "")
        .await
        .problem(404, "not-found");
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let before = scheduled_runs(&server, &key).await.len();
    let after = wait_for_runs(&server, &key, before).await;
    assert!(after.len() > before);
    let url = server.url("/v1/functions/hello/schedule");
    let deleted = request("DELETE", &url, Some(&key), "").await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    request("GET", &url, Some(&key), "")
        .await
        .problem(404, "not-found");
    let list = request("GET", &server.url("/v1/functions"), Some(&key), "")
        .await
        .json();
    assert!(list["functions"][0]["schedule"].is_null());
    server.stop().await;
}
