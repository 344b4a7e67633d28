//! `POST /v1/functions/{name}/map`: fan-out with results in input order.

use std::io::{Read, Write};
use std::time::Duration;

use gust_test_artifacts as artifacts;
use serde_json::Value;
use tempfile::TempDir;

use super::server::{TestServer, deploy, request, request_with};

fn lines(body: &[u8]) -> Vec<Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_inputs_come_back_in_order_with_per_item_errors() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    // Every 7th input is not JSON.
    let n = 10_000;
    let mut body = String::from("[");
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        if i % 7 == 3 {
            body.push_str("{oops");
            body.push('}');
        } else {
            body.push_str(&format!("\"n{i}\""));
        }
    }
    body.push(']');
    let reply = request(
        "POST",
        &server.url("/v1/functions/hello/map"),
        Some(&key),
        body,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "application/x-ndjson");
    let results = lines(&reply.body);
    assert_eq!(results.len(), n);
    let mut failed = 0;
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["index"], i as u64, "{result}");
        if i % 7 == 3 {
            assert_eq!(result["error"]["code"], "invalid-input", "{result}");
            failed += 1;
        } else {
            assert_eq!(result["ok"], format!("Hello, n{i}!"), "{result}");
            assert!(
                result["invocation_id"]
                    .as_str()
                    .unwrap()
                    .starts_with("inv_"),
                "{result}"
            );
        }
    }
    assert_eq!(failed, (0..n).filter(|i| i % 7 == 3).count());
    // Each input was a recorded invocation (the newest are retained).
    let id = results[n - 2]["invocation_id"].as_str().unwrap();
    let record = request(
        "GET",
        &server.url(&format!("/v1/invocations/{id}")),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(record.json()["outcome"], "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_inputs_failures_and_malformed_bodies() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "errors", artifacts::RETURNS_ERROR_COMPONENT).await;
    deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT).await;
    let url = server.url("/v1/functions/echo/map");
    let ndjson = [("content-type", "application/x-ndjson")];
    let reply = request_with(
        "POST",
        &url,
        Some(&key),
        "{\"a\": 1}\n\n[1, 2]\n\"text\"\n",
        &ndjson,
    )
    .await;
    assert_eq!(reply.status, 200);
    let results = lines(&reply.body);
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0]["ok"],
        serde_json::json!({"a": 1}),
        "JSON inputs arrive as JSON"
    );
    assert_eq!(results[1]["ok"], serde_json::json!([1, 2]));
    assert_eq!(
        results[2]["ok"], "text",
        "a string input arrives as its text"
    );

    let failing = request(
        "POST",
        &server.url("/v1/functions/errors/map"),
        Some(&key),
        "[1, 2]",
    )
    .await;
    let results = lines(&failing.body);
    assert_eq!(results.len(), 2);
    for result in &results {
        assert!(result["error"]["code"].is_string(), "{result}");
        assert!(result["invocation_id"].is_string(), "{result}");
    }

    let unclosed = request("POST", &url, Some(&key), "[1, 2").await;
    let results = lines(&unclosed.body);
    // The unterminated last value may be cut short, so it does not run.
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0]["ok"], 1);
    assert_eq!(results[1]["index"], 1);
    assert!(
        results[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not closed")
    );
    let object = request("POST", &url, Some(&key), "{\"a\": 1}").await;
    assert!(
        lines(&object.body)[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected a JSON array")
    );
    request(
        "POST",
        &server.url("/v1/functions/nope/map"),
        Some(&key),
        "[]",
    )
    .await
    .problem(404, "not-found");
    request("POST", &url, None, "[]")
        .await
        .problem(401, "unauthorized");
    let empty = request("POST", &url, Some(&key), "[]").await;
    assert_eq!((empty.status, empty.body.len()), (200, 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_stops_the_fan_out() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    // Each input loops until the 1.5 s deadline of the default test policy.
    deploy(&server, &key, "spin", artifacts::INFINITE_LOOP_COMPONENT).await;
    let body = format!("[{}]", vec!["1"; 1000].join(","));
    let addr = server.addr;
    let request_text = format!(
        "POST /v1/functions/spin/map HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(request_text.as_bytes()).unwrap();
        // Wait for the headers (sent at once), then hang up.
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).unwrap();
        assert!(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );
    })
    .await
    .unwrap();
    // The first wave of 8 ends at its deadline; with the client gone,
    // nothing more starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let logs = request(
        "GET",
        &server.url("/v1/functions/spin/logs?limit=1000"),
        Some(&key),
        "",
    )
    .await;
    let ran = logs.json()["invocations"].as_array().unwrap().len();
    assert!(
        ran <= 16,
        "{ran} invocations ran after the client left (fan-out is 8)"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gust_map_streams_a_file_and_summarises() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    let inputs = dir.path().join("inputs.ndjson");
    std::fs::write(&inputs, "\"Ada\"\n\"Grace\"\n{broken\n\n\"Linus\"\n").unwrap();
    let url = server.url("");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gust"))
            .args(["map", "hello", "--input", inputs.to_str().unwrap()])
            .env("GUST_URL", url)
            .env("GUST_KEY", key)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = lines(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "one input failed: {stderr}");
    assert_eq!(stdout.len(), 4);
    assert_eq!(stdout[0]["ok"], "Hello, Ada!");
    assert_eq!(stdout[2]["error"]["code"], "invalid-input");
    assert_eq!(stdout[3]["ok"], "Hello, Linus!");
    assert!(
        stderr.contains("map hello: 4 inputs, 3 ok, 1 failed"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 4 inputs failed"), "{stderr}");
    server.stop().await;
}
