//! Streaming: Server-Sent Events on invoke and WebSocket sessions.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use gust_test_artifacts as artifacts;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::server::{TestServer, deploy, invocation_status, request, tenant};

/// One parsed event: its name (if any) and its data lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    name: Option<String>,
    data: String,
}

/// Takes the complete events out of `buffer`; comments are skipped.
fn parse_events(buffer: &mut String) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(end) = buffer.find("\n\n") {
        let block: String = buffer.drain(..end + 2).collect();
        let mut name = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(value) = line.strip_prefix("event: ") {
                name = Some(value.to_owned());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data.push(value);
            }
        }
        if name.is_some() || !data.is_empty() {
            events.push(Event {
                name,
                data: data.join("\n"),
            });
        }
    }
    events
}

async fn sse(
    server: &TestServer,
    key: &str,
    function: &str,
    input: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = hyper::Request::post(server.url(&format!("/v1/functions/{function}/invoke")))
        .header("authorization", format!("Bearer {key}"))
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::from(input.to_owned())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_deliver_chunks_before_the_function_finishes() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "other").await;
    deploy(&server, &key, "stream", artifacts::STREAMER_COMPONENT).await;

    // A whole stream: each chunk an event, the body one more, then `done`.
    let response = sse(&server, &key, "stream", "x y").await;
    let id = response.headers()["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let mut text = String::from_utf8(body.to_vec()).unwrap();
    let events = parse_events(&mut text);
    let data: Vec<&str> = events
        .iter()
        .filter(|e| e.name.is_none())
        .map(|e| e.data.as_str())
        .collect();
    assert_eq!(data, ["x\n", "y\n", "done\n"], "{events:?}");
    let done = events.last().unwrap();
    assert_eq!(done.name.as_deref(), Some("done"));
    let done: Value = serde_json::from_str(&done.data).unwrap();
    assert_eq!(done["invocation_id"], id.as_str());
    assert_eq!(done["outcome"], "ok");
    assert_eq!(done["status"], 200);

    // Without `Accept: text/event-stream` the chunks lead the body.
    let plain = request(
        "POST",
        &server.url("/v1/functions/stream/invoke"),
        Some(&key),
        "x y",
    )
    .await;
    assert_eq!(plain.text(), "x\ny\ndone\n");

    // The guest emits two chunks and then spins: both arrive while it is
    // still running (its invocation is not recorded yet).
    let response = sse(&server, &key, "stream", "a b spin").await;
    let id = response.headers()["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.into_body();
    let mut buffer = String::new();
    let mut received = Vec::new();
    while received.len() < 2 {
        let frame = body.frame().await.expect("stream ended early").unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.push_str(std::str::from_utf8(&data).unwrap());
            received.extend(parse_events(&mut buffer));
        }
    }
    assert_eq!(received[0].data, "a\n");
    assert_eq!(received[1].data, "b\n");
    let (status, _) = invocation_status(&server, &key, &id).await;
    assert_eq!(status, 404, "the function must still be running");

    // Going away cancels it: it is recorded as cancelled, not as a timeout.
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        let (status, record) = invocation_status(&server, &key, &id).await;
        if status == 200 {
            break record;
        }
        assert!(Instant::now() < deadline, "never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(record["outcome"], "cancelled", "{record}");
    server.stop().await;
}

/// Opens a WebSocket session on `function`, with `key` as the bearer key.
async fn ws_connect(
    server: &TestServer,
    function: &str,
    key: Option<&str>,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let url = format!("ws://{}/v1/functions/{function}/ws", server.addr);
    let mut request = url.into_client_request().unwrap();
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio_tungstenite::client_async(request, tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_runs_one_invocation_per_message() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT).await;
    deploy(&server, &key, "stream", artifacts::STREAMER_COMPONENT).await;
    deploy(&server, &key, "errors", artifacts::RETURNS_ERROR_COMPONENT).await;

    let (mut echo, _) = ws_connect(&server, "echo", Some(&key)).await.unwrap();
    echo.send(Message::text("hello")).await.unwrap();
    assert_eq!(echo.next().await.unwrap().unwrap(), Message::text("hello"));
    let bytes = vec![0u8, 1, 255];
    echo.send(Message::binary(bytes.clone())).await.unwrap();
    assert_eq!(echo.next().await.unwrap().unwrap(), Message::binary(bytes));
    echo.close(None).await.unwrap();

    // Emitted chunks come back as messages as they are emitted.
    let (mut stream, _) = ws_connect(&server, "stream", Some(&key)).await.unwrap();
    stream.send(Message::text("p q")).await.unwrap();
    for expected in ["p\n", "q\n", "done\n"] {
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Message::text(expected)
        );
    }
    stream.close(None).await.unwrap();

    // A failure is a JSON message naming the invocation.
    let (mut errors, _) = ws_connect(&server, "errors", Some(&key)).await.unwrap();
    errors.send(Message::text("x")).await.unwrap();
    let Message::Text(text) = errors.next().await.unwrap().unwrap() else {
        panic!("expected a text message");
    };
    let failure: Value = serde_json::from_str(text.as_str()).unwrap();
    assert!(failure["error"]["code"].is_string(), "{failure}");
    assert!(
        failure["invocation_id"]
            .as_str()
            .unwrap()
            .starts_with("inv_")
    );
    errors.close(None).await.unwrap();

    // The handshake is authenticated like every endpoint.
    let refused = ws_connect(&server, "echo", None).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    server.stop().await;
}

/// A WebSocket session ends (close 1008) once its key is revoked or its
/// function deleted: on the next message, and within the recheck interval
/// for an idle session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_ends_with_its_key_or_its_function() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let owner = server.demo_key.clone().unwrap();
    deploy(&server, &owner, "echo", artifacts::ECHO_COMPONENT).await;
    deploy(&server, &owner, "doomed", artifacts::ECHO_COMPONENT).await;
    let made = request("POST", &server.url("/v1/keys"), Some(&owner), "").await;
    assert_eq!(made.status, 201);
    let (id, key) = (
        made.json()["id"].as_str().unwrap().to_owned(),
        made.json()["key"].as_str().unwrap().to_owned(),
    );
    /// The next message must be the close frame (its code and reason): an
    /// echo first would mean a message ran after the key or function went.
    async fn closed_with<S>(socket: &mut S) -> (u16, String)
    where
        S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        match tokio::time::timeout(Duration::from_secs(20), socket.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                (u16::from(frame.code), frame.reason.to_string())
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    let mut busy = ws_connect(&server, "echo", Some(&key)).await.unwrap().0;
    let mut idle = ws_connect(&server, "echo", Some(&key)).await.unwrap().0;
    let mut on_doomed = ws_connect(&server, "doomed", Some(&owner)).await.unwrap().0;
    for socket in [&mut busy, &mut idle, &mut on_doomed] {
        socket.send(Message::text("hi")).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("hi"));
    }

    let revoked = request(
        "DELETE",
        &server.url(&format!("/v1/keys/{id}")),
        Some(&owner),
        "",
    )
    .await;
    assert_eq!(revoked.status, 204);
    let deleted = request(
        "DELETE",
        &server.url("/v1/functions/doomed"),
        Some(&owner),
        "",
    )
    .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());

    // The next message is not run: the session closes instead.
    busy.send(Message::text("after")).await.unwrap();
    let (code, reason) = closed_with(&mut busy).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("revoked"), "{reason}");
    on_doomed.send(Message::text("after")).await.unwrap();
    let (code, reason) = closed_with(&mut on_doomed).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("doomed"), "{reason}");
    // An idle session is closed without waiting for a message.
    let (code, _) = closed_with(&mut idle).await;
    assert_eq!(code, 1008);

    // The tenant's other sessions go on.
    let mut still = ws_connect(&server, "echo", Some(&owner)).await.unwrap().0;
    still.send(Message::text("ok")).await.unwrap();
    assert_eq!(still.next().await.unwrap().unwrap(), Message::text("ok"));
    server.stop().await;
}

/// A tenant's open WebSocket sessions and maps are capped by `max_streams`
/// (429 `too-many-streams` beyond it); a closed one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_capped_per_tenant() {
    let dir = TempDir::new().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("onestream.toml"), "max_streams = 1\n").unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "onestream").await;
    deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT).await;
    let (mut first, _) = ws_connect(&server, "echo", Some(&key)).await.unwrap();
    first.send(Message::text("one")).await.unwrap();
    assert_eq!(first.next().await.unwrap().unwrap(), Message::text("one"));
    let refused = ws_connect(&server, "echo", Some(&key)).await.unwrap_err();
    assert!(refused.to_string().contains("429"), "{refused}");
    let map = request(
        "POST",
        &server.url("/v1/functions/echo/map"),
        Some(&key),
        "[1, 2]",
    )
    .await;
    map.problem(429, "too-many-streams");
    first.close(None).await.unwrap();
    drop(first);
    // The session ends on the server's side shortly after the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let map = request(
            "POST",
            &server.url("/v1/functions/echo/map"),
            Some(&key),
            "[1, 2]",
        )
        .await;
        if map.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", map.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
