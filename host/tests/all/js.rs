//! JavaScript functions (`guest-sdk/js`, built by `gust build` with esbuild
//! and ComponentizeJS) through a real server: skipped with a message where
//! the toolchain is missing, required in CI (`scripts/setup-js.sh`).

use std::path::PathBuf;

use tempfile::TempDir;

use super::python_build::{gust_build, js_component, root};
use super::server::{TestServer, deploy, invocation_record, request_with, tenant};

fn fixture() -> Option<PathBuf> {
    js_component(&root().join("tests/js/fixture"), "js-fixture")
}

async fn invoke_op(server: &TestServer, key: &str, op: &str, body: &str) -> super::server::Reply {
    request_with(
        "POST",
        &server.url("/v1/functions/fixture/invoke"),
        Some(key),
        body.to_owned(),
        &[("x-op", op), ("content-type", "application/json")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_function_answers_json_errors_exceptions_streams_and_timeouts() {
    let Some(component) = fixture() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "js").await;
    let deployed = deploy(&server, &key, "fixture", component.to_str().unwrap()).await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    assert_eq!(deployed.json()["world"], "handler");

    let hello = invoke_op(&server, &key, "hello", "Ada").await;
    assert_eq!((hello.status, hello.text().as_str()), (200, "Hello, Ada!"));
    assert_eq!(hello.headers["content-type"], "text/plain; charset=utf-8");
    // What a JavaScript cold start costs here, for the record (not
    // asserted: a debug build on a shared machine says little).
    let id = hello.headers["gust-invocation-id"].to_str().unwrap();
    let record = invocation_record(&server, &key, id).await;
    eprintln!("js hello timings: {}", record["timings"]);

    // Every call starts from the build's snapshot: the warm-up `gust build`
    // runs there never calls the app's handler, and no call sees another's
    // module state.
    for _ in 0..2 {
        let calls = invoke_op(&server, &key, "calls", "").await;
        assert_eq!(calls.json(), serde_json::json!({"calls": 1}));
    }

    // JSON both ways, and the invocation id the host gave the call.
    let json = invoke_op(&server, &key, "json", r#"{"a": [1, 2.5, "x"], "b": null}"#).await;
    assert_eq!(json.status, 200, "{}", json.text());
    assert_eq!(json.headers["content-type"], "application/json");
    assert_eq!(
        json.json(),
        serde_json::json!({"got": {"a": [1, 2.5, "x"], "b": null}, "invocation": true})
    );
    invoke_op(&server, &key, "json", "{not json")
        .await
        .problem(400, "invalid-input");

    // gust.Error: its code, message and status.
    let refused = invoke_op(&server, &key, "error", "").await;
    let problem = refused.problem(422, "invalid-input");
    assert_eq!(problem["detail"], "the fixture refuses this");

    // An uncaught exception: a recorded 500 with the name, the message
    // and the stack down to the throwing function.
    let raised = invoke_op(&server, &key, "raise", "").await;
    let problem = raised.problem(500, "unhandled-exception");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("TypeError: the fixture failed on purpose"),
        "{detail}"
    );
    assert!(detail.contains("boom@"), "{detail}");
    let id = raised.headers["gust-invocation-id"].to_str().unwrap();
    let record = invocation_record(&server, &key, id).await;
    assert_eq!(record["status"], 500, "{record}");
    assert!(record.to_string().contains("boom@"), "{record}");

    // Other things a handler returns.
    let bytes = invoke_op(&server, &key, "bytes", "").await;
    assert_eq!(bytes.headers["content-type"], "application/octet-stream");
    assert_eq!(&bytes.body[..], [0, 1, 2, 255]);
    assert_eq!(invoke_op(&server, &key, "nothing", "").await.status, 204);
    let custom = invoke_op(&server, &key, "custom", "").await;
    assert_eq!((custom.status, custom.text().as_str()), (201, "created"));
    assert_eq!(custom.headers["content-type"], "text/x-fixture");
    assert_eq!(custom.headers["x-fixture"], "js");

    // Tensors on the host's device, and an uncaught bridge error.
    let tensor = invoke_op(&server, &key, "tensor", "").await;
    assert_eq!(tensor.status, 200, "{}", tensor.text());
    assert_eq!(
        tensor.json(),
        // (JavaScript writes whole floats without a fraction.)
        serde_json::json!({
            "shape": [2, 1],
            "values": [[-1], [-1]],
            "sum": [3, 7],
            "gathered": [[3, 4], [1, 2]],
            "argmax": [1, 1],
            "device": "cpu",
        })
    );
    let mismatch = invoke_op(&server, &key, "tensor-error", "").await;
    let problem = mismatch.problem(500, "gpu-shape-mismatch");
    assert!(
        problem["detail"].as_str().unwrap().contains("matmul"),
        "{problem}"
    );

    // Emitted chunks lead the body for a caller that does not stream; an
    // event stream gets each as an event. The app's own module
    // (`helper.js`) was bundled with it.
    let emitted = invoke_op(&server, &key, "emit", "").await;
    assert_eq!(emitted.text(), "chunk 0\nchunk 1\nchunk 2\nDONE!");
    let streamed = request_with(
        "POST",
        &server.url("/v1/functions/fixture/invoke"),
        Some(&key),
        String::new(),
        &[("x-op", "emit"), ("accept", "text/event-stream")],
    )
    .await;
    assert_eq!(streamed.headers["content-type"], "text/event-stream");
    let events = streamed.text();
    for chunk in ["chunk 0", "chunk 1", "chunk 2", "DONE!"] {
        assert!(events.contains(&format!("data: {chunk}")), "{events}");
    }

    // An infinite loop: stopped at the deadline, and the host goes on.
    invoke_op(&server, &key, "spin", "")
        .await
        .problem(504, "timeout");
    let again = invoke_op(&server, &key, "hello", "again").await;
    assert_eq!(again.text(), "Hello, again!");
    server.stop().await;
}

#[test]
fn a_broken_app_fails_its_build_with_the_file_and_line() {
    let dir = TempDir::new().unwrap();
    let cases = [
        (
            "syntax.js",
            "import gust from \"gust\";\nexport default gust.fn((req) => {\n  return 1 +;\n});\n",
            "syntax.js:3:",
        ),
        (
            "noexport.js",
            "import gust from \"gust\";\nexport const handler = gust.fn(() => 1);\n",
            "No matching export",
        ),
        (
            // A package that needs a Node built-in: refused by the
            // built-in's name, at the package's line that asks for it.
            "needsfs.js",
            "import gust from \"gust\";\nimport read from \"needsfs\";\n\
             export default gust.fn(() => read());\n",
            "needsfs/index.js:1:",
        ),
        (
            "nodefs.js",
            "import { readFileSync } from \"node:fs\";\nimport gust from \"gust\";\n\
             export default gust.fn(() => readFileSync(\"/etc/passwd\", \"utf8\"));\n",
            "node:fs",
        ),
    ];
    npm_package(
        dir.path(),
        "needsfs",
        "const fs = require(\"fs\");\nmodule.exports = () => fs.readFileSync(\"/etc/hostname\", \"utf8\");\n",
    );
    let _one_at_a_time = super::python_build::BUILD
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for (file, source, expected) in cases {
        let app = dir.path().join(file);
        std::fs::write(&app, source).unwrap();
        let Some(output) = gust_build(&app, &dir.path().join("out.wasm")) else {
            return;
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{file} built");
        assert!(stderr.contains(expected), "{file}: {stderr}");
        assert!(stderr.contains(file), "{file}: {stderr}");
    }

    // TypeScript is compiled on the way (its types only checked by the
    // user's editor or `tsc`: esbuild strips them), and a pure-JS npm
    // package (CommonJS, found in `node_modules` beside the app) bundled.
    npm_package(
        dir.path(),
        "shout",
        "module.exports = (text) => text.toUpperCase();\n",
    );
    let app = dir.path().join("typed.ts");
    std::fs::write(
        &app,
        r#"import gust, { type Request } from "gust";
import shout from "shout";
interface Greeting { greeting: string }
export default gust.fn((req: Request): Greeting => ({ greeting: shout(`Hello, ${req.text()}!`) }));
"#,
    )
    .unwrap();
    let out = dir.path().join("typed.wasm");
    let Some(output) = gust_build(&app, &out) else {
        return;
    };
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let component = std::fs::read(&out).unwrap();
    assert!(wasmparser_is_component(&component));
}

/// A CommonJS npm package `name` in `dir/node_modules`, its `index.js`
/// holding `source`.
fn npm_package(dir: &std::path::Path, name: &str, source: &str) {
    let package = dir.join("node_modules").join(name);
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(
        package.join("package.json"),
        format!(r#"{{"name": "{name}", "version": "1.0.0", "main": "index.js"}}"#),
    )
    .unwrap();
    std::fs::write(package.join("index.js"), source).unwrap();
}

fn wasmparser_is_component(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\0asm") && bytes.get(4..8) == Some(&[0x0d, 0x00, 0x01, 0x00])
}

/// `examples/js/hello` and `examples/js/embed` (MiniLM, when
/// `scripts/fetch-models.sh` has fetched it) deployed and called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_hello_and_embed_examples_answer() {
    let Some(hello) = js_component(&root().join("examples/js/hello"), "js-hello") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let models = super::models::fetched_models_with("all-minilm-l6-v2");
    let server = TestServer::start_configured(dir.path(), |config| {
        config.models_dir = models.clone();
    })
    .await;
    let key = tenant(&server, "jsmodels").await;
    let deployed = deploy(&server, &key, "hello", hello.to_str().unwrap()).await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    let invoke = |name: &'static str, body: &'static str| {
        let url = server.url(&format!("/v1/functions/{name}/invoke"));
        let key = key.clone();
        async move {
            request_with(
                "POST",
                &url,
                Some(&key),
                body.to_owned(),
                &[("content-type", "application/json")],
            )
            .await
        }
    };
    assert_eq!(invoke("hello", "Ada").await.text(), "Hello, Ada!");
    assert_eq!(invoke("hello", "").await.text(), "Hello, world!");

    if models.is_some() {
        let Some(embed) = js_component(&root().join("examples/js/embed"), "js-embed") else {
            return;
        };
        let deployed = deploy(&server, &key, "embed", embed.to_str().unwrap()).await;
        assert_eq!(deployed.status, 201, "{}", deployed.text());
        let ranked = invoke(
            "embed",
            r#"{"sentences": ["The new movie is awesome.", "A man is eating food."],
                "query": "someone having a meal"}"#,
        )
        .await;
        super::python::assert_meal_ranked_first(&ranked);
        invoke("embed", "{}").await.problem(400, "invalid-input");
    }
    server.stop().await;
}

/// `examples/js/webapp` (`gust.http`): a `wasi:http/proxy` component whose
/// handler takes a web `Request` and returns a `Response`, served at
/// `/http/{tenant}/{name}/…`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_web_app_is_served_over_http() {
    let Some(webapp) = js_component(&root().join("examples/js/webapp"), "js-webapp") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "js").await;
    let bytes = std::fs::read(&webapp).unwrap();
    let deployed = super::server::request(
        "PUT",
        &server.url("/v1/functions/webapp?public=true"),
        Some(&key),
        bytes,
    )
    .await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    assert_eq!(deployed.json()["world"], "http");
    let get = |path: &'static str| {
        let url = server.url(&format!("/http/js/webapp/{path}"));
        async move { super::server::request("GET", &url, None, "").await }
    };
    let hello = get("hello?name=Ada").await;
    assert_eq!((hello.status, hello.text().as_str()), (200, "Hello, Ada!"));
    assert_eq!(
        get("json?a=1").await.json(),
        serde_json::json!({"method": "GET", "path": "/json", "query": {"a": "1"}})
    );
    let echoed = request_with(
        "POST",
        &server.url("/http/js/webapp/echo"),
        None,
        "posted body".to_owned(),
        &[("content-type", "text/x-test")],
    )
    .await;
    assert_eq!(echoed.text(), "posted body");
    assert_eq!(echoed.headers["content-type"], "text/x-test");
    assert_eq!(echoed.headers["x-method"], "POST");
    let refused = get("refuse").await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.json()["code"], "invalid-input");
    let raised = get("raise").await;
    assert_eq!(raised.status, 500);
    let detail = raised.json()["detail"].as_str().unwrap().to_owned();
    assert!(
        detail.starts_with("RangeError: the app failed on purpose"),
        "{detail}"
    );
    assert_eq!(get("elsewhere").await.status, 404);
    server.stop().await;
}
