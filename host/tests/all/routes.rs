//! The route table and the OpenAPI document agree: every operation the
//! document lists is served, and the router serves nothing it does not
//! list (other methods on a listed path are 405, other paths 404).

use serde_json::Value;
use tempfile::TempDir;

use crate::server::{Reply, TestServer, request};

const METHODS: [&str; 8] = [
    "GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE",
];

/// A concrete URL path for a templated one.
fn concrete(path: &str) -> String {
    path.replace("{name}", "no-such-fn")
        .replace("{tenant}", "demo")
        .replace("{id}", "no-such-id")
        .replace("{path}", "some/rest")
}

/// Whether the router's fallbacks answered (the route is not served).
fn unrouted(reply: &Reply) -> bool {
    if reply.status == 405 {
        return true;
    }
    reply.status == 404
        && serde_json::from_slice::<Value>(&reply.body).is_ok_and(|json| {
            json["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("no endpoint"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served_and_nothing_else() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let doc = request("GET", &server.url("/v1/openapi.json"), None, "")
        .await
        .json();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{} paths", paths.len());
    let mut checked = 0;
    for (path, item) in paths {
        let url = server.url(&concrete(path));
        for method in METHODS {
            // HEAD is served wherever GET is (its answer without the body).
            let documented = item[method.to_ascii_lowercase()].is_object()
                || (method == "HEAD" && item["get"].is_object());
            let reply = request(method, &url, None, "").await;
            if documented {
                assert!(
                    !unrouted(&reply),
                    "{method} {path} is documented but not served: {} {}",
                    reply.status,
                    reply.text()
                );
            } else {
                assert_eq!(
                    reply.status,
                    405,
                    "{method} {path} is served but not documented: {}",
                    reply.text()
                );
                if method != "HEAD" {
                    reply.problem(405, "method-not-allowed");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, paths.len() * METHODS.len());
    // Paths next to documented ones that are not routes.
    for path in [
        "/v1",
        "/v1/jobs",
        "/v1/invocations",
        "/v1/functions/x/unknown",
        "/v1/tenants/demo",
        "/v1/keys/x/y",
        "/http/demo",
        "/healthz/x",
    ] {
        let reply = request("GET", &server.url(path), None, "").await;
        assert!(
            unrouted(&reply),
            "GET {path}: {} {}",
            reply.status,
            reply.text()
        );
        reply.problem(404, "not-found");
    }
    // Path and query parameters are percent-decoded; what does not decode
    // is a bad request, not a crash or a 404.
    let key = server.demo_key.clone().unwrap();
    for path in [
        "/v1/functions/%FF",
        "/v1/functions/%FF/logs",
        "/v1/jobs/%C3%28",
    ] {
        let reply = request("GET", &server.url(path), Some(&key), "").await;
        reply.problem(400, "invalid-request");
    }
    let reply = request(
        "PUT",
        &server.url("/v1/functions/ok?public=maybe"),
        Some(&key),
        "",
    )
    .await;
    assert!(
        reply.problem(400, "invalid-request")["detail"]
            .as_str()
            .unwrap()
            .contains("`public` must be true or false")
    );
    server.stop().await;
}
