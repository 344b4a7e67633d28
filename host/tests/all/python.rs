//! Python functions end to end: `gust build` drives componentize-py on the
//! fixtures in `tests/python`, the component is deployed to a real server
//! and invoked. Built components are cached under the target directory,
//! keyed by a hash of the fixture, the SDK and the WIT, so an unchanged
//! fixture costs nothing on the next run.
//!
//! Without componentize-py (see `scripts/setup-python.sh`) these tests skip
//! with a message; `.ci/run` installs it, so CI always runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::python_build::{BUILD, componentize_py, gust_build, python_component, root};
use super::server::{TestServer, deploy, invocation_record, request, request_with, tenant};

/// The component of `tests/python/<name>/app.py`, from the cache or built
/// now with `gust build`; `None` (after saying why) when componentize-py
/// is not installed.
fn python_fixture(name: &str) -> Option<PathBuf> {
    python_component(&root().join("tests/python").join(name), name)
}

/// A server and a tenant whose policy takes a Python component's size
/// (CPython is in every one, ~20 MB).
async fn python_server(dir: &TempDir) -> (TestServer, String) {
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "python").await;
    (server, key)
}

/// Deploys the component at `path` as `name`; it must be accepted.
async fn deploy_python(
    server: &TestServer,
    key: &str,
    name: &str,
    path: &Path,
) -> super::server::Reply {
    let deployed = deploy(server, key, name, path.to_str().unwrap()).await;
    assert_eq!(deployed.status, 201, "{}", deployed.text());
    deployed
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
async fn a_python_function_answers_json_errors_tensors_and_timeouts() {
    let Some(component) = python_fixture("fixture") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let (server, key) = python_server(&dir).await;
    deploy_python(&server, &key, "fixture", &component).await;

    let hello = invoke_op(&server, &key, "hello", "Ada").await;
    assert_eq!((hello.status, hello.text().as_str()), (200, "Hello, Ada!"));
    assert!(
        hello.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );

    // What a Python cold start costs here, for the record (not asserted:
    // a debug build on a shared machine says little about the target).
    let id = hello.headers["gust-invocation-id"].to_str().unwrap();
    let record = invocation_record(&server, &key, id).await;
    eprintln!("python hello timings: {}", record["timings"]);

    let json = invoke_op(&server, &key, "json", r#"{"a": [1, 2.5, "x"], "b": null}"#).await;
    assert_eq!(json.status, 200, "{}", json.text());
    assert_eq!(json.headers["content-type"], "application/json");
    assert_eq!(
        json.json(),
        serde_json::json!({"got": {"a": [1, 2.5, "x"], "b": null}, "invocation": true})
    );
    let bad_json = invoke_op(&server, &key, "json", "{not json").await;
    bad_json.problem(400, "invalid-input");

    let refused = invoke_op(&server, &key, "error", "").await;
    let problem = refused.problem(422, "invalid-input");
    assert_eq!(problem["detail"], "the fixture refuses this");

    // An uncaught exception: a recorded 500 whose message has the type, the
    // message and the traceback down to the raising frame.
    let raised = invoke_op(&server, &key, "raise", "").await;
    let problem = raised.problem(500, "unhandled-exception");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("ValueError: the fixture failed on purpose"),
        "{detail}"
    );
    assert!(
        detail.contains("Traceback (most recent call last)"),
        "{detail}"
    );
    assert!(detail.contains("in _boom"), "{detail}");
    let id = raised.headers["gust-invocation-id"].to_str().unwrap();
    let record = invocation_record(&server, &key, id).await;
    assert_eq!(record["status"], 500, "{record}");
    assert!(record.to_string().contains("in _boom"), "{record}");

    let tensor = invoke_op(&server, &key, "tensor", "").await;
    assert_eq!(tensor.status, 200, "{}", tensor.text());
    // [[1,2],[3,4]] @ [[1],[-1]] = [[-1],[-1]]; * 2 + 1 = [[-1],[-1]].
    assert_eq!(
        tensor.json(),
        serde_json::json!({"shape": [2, 1], "values": [[-1.0], [-1.0]], "sum": [3.0, 7.0]})
    );
    // Quantized blocks and whole layers (`gust:gpu/layers`) from Python.
    let layers = invoke_op(&server, &key, "layers", "").await;
    assert_eq!(layers.status, 200, "{}", layers.text());
    let layers = layers.json();
    assert_eq!(layers["format"], "Q8_0", "{layers}");
    assert_eq!(layers["plain"], serde_json::Value::Null, "{layers}");
    assert_eq!(
        layers["weights"],
        serde_json::json!([-1.0, -0.9375, -0.875])
    );
    let y: f64 = -127.0 / 128.0;
    assert_eq!(layers["linear"], serde_json::json!([[y, y]]), "{layers}");
    let gated = layers["swiglu"][0][0].as_f64().unwrap();
    let want = y / (1.0 + (-y).exp()) * y;
    assert!((gated - want).abs() < 1e-6, "{layers}: {want}");
    let mismatch = invoke_op(&server, &key, "shape-error", "").await;
    let problem = mismatch.problem(500, "gpu-shape-mismatch");
    assert!(
        problem["detail"].as_str().unwrap().contains("matmul"),
        "{problem}"
    );

    let emitted = invoke_op(&server, &key, "emit", "").await;
    assert_eq!(
        (emitted.status, emitted.text().as_str()),
        (200, "one,two,three")
    );

    // A runaway loop is stopped at the policy's deadline; the host and the
    // function go on answering.
    let spin = invoke_op(&server, &key, "spin", "").await;
    spin.problem(504, "timeout");
    let after = invoke_op(&server, &key, "hello", "again").await;
    assert_eq!(
        (after.status, after.text().as_str()),
        (200, "Hello, again!")
    );

    server.stop().await;
}

/// With `reuse_instances = 3` a Python function's instance, interpreter
/// state included, serves three calls; an exception (a normal, recorded
/// outcome in the SDK) does not end it, a timeout does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_function_calls_an_https_api_with_its_secret() {
    use super::egress::HttpsHost;

    let Some(component) = python_fixture("fixture") else {
        return;
    };
    let https = HttpsHost::start(|_| {
        vec![(
            "pyegress",
            "timeout_ms = 5000\nmemory_mb = 256\nmax_component_bytes = 67108864\n\
             outbound_http = [\"https://localhost\"]\noutbound_private = true\n"
                .to_owned(),
        )]
    })
    .await;
    let (server, upstream) = (&https.server, https.upstream);
    let key = tenant(server, "pyegress").await;
    https
        .deploy_with_token(&key, "fixture", &component, "py-tok-123")
        .await;
    let url = format!("https://localhost:{}/v1/echo", upstream.port());
    let reply = invoke_op(server, &key, "fetch", &url).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (
            200,
            "200 secure /v1/echo\nauth=Bearer py-tok-123\nbody=from python"
        )
    );
    // A host the policy does not list: the SDK's FetchError, uncaught,
    // is the function's 502.
    let denied = invoke_op(server, &key, "fetch", "https://example.invalid/").await;
    let problem = denied.problem(502, "fetch-failed");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("HttpRequestDenied"),
        "{problem}"
    );
    https.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_python_instance_keeps_its_state() {
    let Some(component) = python_fixture("fixture") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = tenant(&server, "reuse").await;
    deploy_python(&server, &key, "fixture", &component).await;
    let mut counts = Vec::new();
    for _ in 0..4 {
        counts.push(invoke_op(&server, &key, "count", "").await.text());
    }
    assert_eq!(counts, ["1", "2", "3", "1"]);
    invoke_op(&server, &key, "raise", "")
        .await
        .problem(500, "unhandled-exception");
    let after_exception = invoke_op(&server, &key, "count", "").await;
    assert_eq!(after_exception.text(), "3");
    let id = after_exception.headers["gust-invocation-id"]
        .to_str()
        .unwrap();
    let record = invocation_record(&server, &key, id).await;
    assert_eq!(record["timings"]["reused_instance"], true, "{record}");
    eprintln!("reused python timings: {}", record["timings"]);
    // The third use ended that instance; a timeout ends this one early.
    assert_eq!(invoke_op(&server, &key, "count", "").await.text(), "1");
    invoke_op(&server, &key, "spin", "")
        .await
        .problem(504, "timeout");
    assert_eq!(invoke_op(&server, &key, "count", "").await.text(), "1");
    server.stop().await;
}

/// `examples/python/webapp` (`@gust.http`) becomes a wasi:http component
/// served under `/http/{tenant}/{name}/`: routes by method and path, reads
/// query, headers and JSON, uses the GPU bridge, and answers errors as
/// problem documents; an exception is a 500 with its traceback, kept in the
/// invocation record, and the app goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_web_app_serves_http() {
    let Some(component) = python_component(&root().join("examples/python/webapp"), "webapp") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let (server, key) = python_server(&dir).await;
    let deployed = deploy_python(&server, &key, "webapp", &component).await;
    assert_eq!(deployed.json()["world"], "http", "{}", deployed.text());
    let url = |path: &str| server.url(&format!("/http/python/webapp{path}"));

    let page = request("GET", &url("/"), Some(&key), "").await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert!(page.text().contains("Hello from Python"), "{}", page.text());

    let hello = request("GET", &url("/hello?name=Ada%20L"), Some(&key), "").await;
    assert_eq!(
        (hello.status, hello.text().as_str()),
        (200, "Hello, Ada L!")
    );
    assert_eq!(hello.headers["x-greeted"], "Ada L");
    assert!(hello.headers.contains_key("gust-invocation-id"));

    let sums = request_with(
        "POST",
        &url("/sums"),
        Some(&key),
        r#"{"rows": [[1, 2], [3, 4.5]]}"#.to_owned(),
        &[("content-type", "application/json")],
    )
    .await;
    assert_eq!(sums.status, 200, "{}", sums.text());
    assert_eq!(
        sums.json(),
        serde_json::json!({"sums": [3.0, 7.5], "device": "cpu"})
    );
    let bad = request("POST", &url("/sums"), Some(&key), "{nope").await;
    let problem = bad.problem(400, "invalid-input");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{problem}"
    );
    request("DELETE", &url("/hello"), Some(&key), "")
        .await
        .problem(405, "method-not-allowed");
    request("GET", &url("/missing"), Some(&key), "")
        .await
        .problem(404, "not-found");

    let failed = request("GET", &url("/ratio?a=1&b=0"), Some(&key), "").await;
    let problem = failed.problem(500, "unhandled-exception");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.starts_with("ZeroDivisionError"), "{detail}");
    assert!(detail.contains("in app"), "{detail}");
    let id = failed.headers["gust-invocation-id"].to_str().unwrap();
    // The record is written once the guest has finished.
    let mut record = serde_json::Value::Null;
    for _ in 0..50 {
        let reply = request(
            "GET",
            &server.url(&format!("/v1/invocations/{id}")),
            Some(&key),
            "",
        )
        .await;
        if reply.status == 200 {
            record = reply.json();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        record["stderr"]
            .as_str()
            .is_some_and(|e| e.contains("ZeroDivisionError")),
        "{record}"
    );
    let again = request("GET", &url("/hello"), Some(&key), "").await;
    assert_eq!(again.text(), "Hello, world!");
    server.stop().await;
}

/// `examples/python/tensor` (a perceptron on the bridge) and
/// `examples/python/embed` (MiniLM, when `scripts/fetch-models.sh` has
/// fetched it) deployed and called, as their docstrings say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_tensor_and_embed_examples_answer() {
    let Some(tensor) = python_component(&root().join("examples/python/tensor"), "tensor") else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let models = super::models::fetched_models_with("all-minilm-l6-v2");
    let server = TestServer::start_configured(dir.path(), |config| {
        config.models_dir = models.clone();
    })
    .await;
    let key = tenant(&server, "pymodels").await;
    deploy_python(&server, &key, "mlp", &tensor).await;
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
    let mlp = invoke("mlp", r#"{"inputs": [[1, 2, 3, 4], [-1, 0, 0.5, 2]]}"#).await;
    assert_eq!(mlp.status, 200, "{}", mlp.text());
    let answer = mlp.json();
    assert_eq!(answer["device"], "cpu", "{answer}");
    let rows = answer["probabilities"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{answer}");
    for (row, class) in rows.iter().zip(answer["classes"].as_array().unwrap()) {
        let p: Vec<f64> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(p.len(), 2);
        assert!((p[0] + p[1] - 1.0).abs() < 1e-5, "{answer}");
        let argmax = usize::from(p[1] > p[0]);
        assert_eq!(class.as_u64(), Some(argmax as u64), "{answer}");
    }
    invoke("mlp", r#"{"inputs": []}"#)
        .await
        .problem(400, "invalid-input");

    if models.is_some() {
        let Some(embed) = python_component(&root().join("examples/python/embed"), "embed") else {
            return;
        };
        deploy_python(&server, &key, "embed", &embed).await;
        let ranked = invoke(
            "embed",
            r#"{"sentences": ["The new movie is awesome.", "A man is eating food."],
                "query": "someone having a meal"}"#,
        )
        .await;
        assert_meal_ranked_first(&ranked);
    }
    server.stop().await;
}

/// What the embed examples (Python's and JavaScript's) answer for two
/// sentences and the query "someone having a meal": MiniLM ranks the meal
/// first, with a cosine in (0.4, 1] above the other's.
pub(crate) fn assert_meal_ranked_first(ranked: &super::server::Reply) {
    assert_eq!(ranked.status, 200, "{}", ranked.text());
    let answer = ranked.json();
    assert_eq!(answer["model"], "all-minilm-l6-v2", "{answer}");
    let ranking = answer["ranked"].as_array().unwrap();
    assert_eq!(ranking[0]["sentence"], "A man is eating food.", "{answer}");
    let (first, second) = (
        ranking[0]["score"].as_f64().unwrap(),
        ranking[1]["score"].as_f64().unwrap(),
    );
    assert!(first > 0.4 && first <= 1.0 && second < first, "{answer}");
}

/// The SDK's own unit tests (`guest-sdk/python/tests`), run by the Python
/// beside componentize-py against the real bindings of each world.
#[test]
fn the_python_sdk_unit_tests_pass() {
    let Some((componentize_py, python)) = componentize_py() else {
        return;
    };
    let scratch = TempDir::new().unwrap();
    for world in ["guest", "http-guest"] {
        let bindings = scratch.path().join(world);
        let generated = Command::new(&componentize_py)
            .arg("-d")
            .arg(root().join("wit"))
            .args(["-w", &format!("gust:function/{world}"), "bindings"])
            .arg(&bindings)
            .output()
            .unwrap();
        assert!(
            generated.status.success(),
            "bindings for {world}: {}",
            String::from_utf8_lossy(&generated.stderr)
        );
        let search_path =
            std::env::join_paths([bindings, root().join("guest-sdk/python")]).unwrap();
        let ran = Command::new(&python)
            .args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(root().join("guest-sdk/python/tests"))
            .env("PYTHONPATH", search_path)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("GUST_WORLD", world)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&ran.stderr);
        assert!(ran.status.success(), "SDK unit tests in {world}:\n{report}");
        assert!(report.contains("\nOK"), "{report}");
    }
}

#[test]
fn a_pure_python_requirement_is_bundled() {
    let Some(component) = python_fixture("pure") else {
        return;
    };
    let cache = TempDir::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gust"))
        .arg("run")
        .arg(&component)
        .args(["--input", "-", "--timeout", "10s", "--memory", "256MiB"])
        .env("GUST_CACHE_DIR", cache.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"bundled").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"six": "1.17.0", "text": "bundled"})
    );
}

#[test]
fn a_requirement_with_native_extensions_is_refused_by_name() {
    let fixture = root().join("tests/python/native/app.py");
    let out_dir = TempDir::new().unwrap();
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(out) = gust_build(&fixture, &out_dir.path().join("native.wasm")) else {
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("MarkupSafe") && stderr.contains("native extensions"),
        "{stderr}"
    );
    assert!(!out_dir.path().join("native.wasm").exists());
}

#[test]
fn building_something_that_is_not_python_or_a_crate_is_refused() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "hi").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gust"))
        .arg("build")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("neither a Python app"), "{stderr}");
}

/// `gust` with the server's URL, `key` and a cache of its own.
fn gust_cli(server: &TestServer, key: &str, cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gust"))
        .args(args)
        .env("GUST_URL", server.url(""))
        .env("GUST_KEY", key)
        .env("GUST_CACHE_DIR", cache)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// `gust deploy app.py` builds the example and deploys it under its
/// directory's name; `gust invoke` then gets the greeting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gust_deploy_builds_and_uploads_a_python_app() {
    let dir = TempDir::new().unwrap();
    let (server, key) = python_server(&dir).await;
    let cache = dir.path().join("cli-cache");
    let app = root().join("examples/python/hello/app.py");
    let app = app.to_str().unwrap();
    // The server answers on this runtime's workers while the CLI blocks
    // this one.
    let deployed = tokio::task::block_in_place(|| {
        let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        gust_cli(&server, &key, &cache, &["deploy", app])
    });
    let stderr = String::from_utf8_lossy(&deployed.stderr);
    if stderr.contains("componentize-py not found") {
        eprintln!(
            "skipping: componentize-py is not installed ({})",
            stderr.trim()
        );
        server.stop().await;
        return;
    }
    assert!(deployed.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&deployed.stdout);
    assert!(stdout.contains("deployed hello version 1"), "{stdout}");

    let invoked = tokio::task::block_in_place(|| {
        gust_cli(&server, &key, &cache, &["invoke", "hello", "--data", "Ada"])
    });
    assert!(
        invoked.status.success(),
        "{}",
        String::from_utf8_lossy(&invoked.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&invoked.stdout), "Hello, Ada!");
    server.stop().await;
}
