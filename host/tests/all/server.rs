//! The HTTP server end to end: a real server on a loopback port, real
//! components, the real sled store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use gust_host::api::{ServeConfig, Server};
use gust_host::runtime::{AllocationConfig, PoolingConfig};
use gust_test_artifacts as artifacts;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;

pub(crate) const ADMIN_KEY: &str = "gust_test-admin-key-0123456789abcdefghijklmnopqrstu";

/// A policy directory for tests: short timeouts, small limits, and a tenant
/// `tight` allowed one call at a time.
pub(crate) fn policies(dir: &Path) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("default.toml"),
        "timeout_ms = 1500\nmemory_mb = 64\nmax_concurrency = 8\nmax_body_bytes = 65536\nmax_component_bytes = 4194304\n",
    )
    .unwrap();
    // Long timeouts: these tenants' runaway calls must outlast the checks
    // made while they run, even on a loaded machine.
    std::fs::write(
        policies.join("tight.toml"),
        "max_concurrency = 1\ntimeout_ms = 5000\n",
    )
    .unwrap();
    std::fs::write(policies.join("other.toml"), "timeout_ms = 5000\n").unwrap();
    // No instances made ahead: every call instantiates its own.
    std::fs::write(policies.join("fresh.toml"), "ready_instances = 0\n").unwrap();
    // One call at a time and a job queue of two.
    std::fs::write(
        policies.join("queue.toml"),
        "max_concurrency = 1\nmax_queued_jobs = 2\ntimeout_ms = 5000\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("egress.toml"),
        "outbound_http = [\"127.0.0.1\"]\n",
    )
    .unwrap();
    // Python components carry CPython (~20 MB) and a bigger heap.
    std::fs::write(
        policies.join("python.toml"),
        "timeout_ms = 3000\nmemory_mb = 256\nmax_component_bytes = 67108864\n",
    )
    .unwrap();
    // JavaScript components carry SpiderMonkey (~14 MB).
    std::fs::write(
        policies.join("js.toml"),
        "timeout_ms = 3000\nmemory_mb = 256\nmax_component_bytes = 67108864\n",
    )
    .unwrap();
    // One instance serves up to three calls of a function.
    std::fs::write(
        policies.join("reuse.toml"),
        "reuse_instances = 3\ntimeout_ms = 3000\nmemory_mb = 256\nmax_component_bytes = 67108864\n",
    )
    .unwrap();
    // Python and a resident model.
    std::fs::write(
        policies.join("pymodels.toml"),
        "timeout_ms = 10000\nmemory_mb = 256\nmax_component_bytes = 67108864\n[gpu]\nmodels = [\"all-minilm-l6-v2\"]\ntime_ms_per_minute = 600000\n",
    )
    .unwrap();
    // JavaScript and the same resident model.
    std::fs::write(
        policies.join("jsmodels.toml"),
        "timeout_ms = 10000\nmemory_mb = 256\nmax_component_bytes = 67108864\n[gpu]\nmodels = [\"all-minilm-l6-v2\"]\ntime_ms_per_minute = 600000\n",
    )
    .unwrap();
    std::fs::write(policies.join("nogpu.toml"), "[gpu]\nbackends = []\n").unwrap();
    // One anonymous call at a time, beside two of the tenant's own.
    std::fs::write(
        policies.join("anon.toml"),
        "max_concurrency = 2\nmax_anonymous_concurrency = 1\ntimeout_ms = 4000\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("smallgpu.toml"),
        "[gpu]\nbackends = [\"wgpu\", \"cpu\"]\nmemory_mb = 2\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("models.toml"),
        "timeout_ms = 5000\n[gpu]\nmodels = [\"tiny-bert\", \"queue-bert\", \"missing-bert\", \"all-minilm-l6-v2\", \"smollm2-135m-instruct\"]\ntime_ms_per_minute = 600000\n",
    )
    .unwrap();
    // Generation in a debug build loads and runs a 135M model slowly.
    std::fs::write(
        policies.join("llm.toml"),
        "timeout_ms = 300000\n[gpu]\nmodels = [\"smollm2-135m-instruct\"]\ntime_ms_per_minute = 600000\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("files.toml"),
        "[env]\nGREETING = \"from the policy\"\n\n[[volumes]]\nname = \"data\"\npath = \"data\"\nmount = \"/data\"\nread_only = false\n",
    )
    .unwrap();
    policies
}

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) demo_key: Option<String>,
    pub(crate) data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), gust_host::api::ServeError>>>,
}

impl TestServer {
    pub(crate) async fn start(dir: &Path) -> Self {
        Self::start_with(dir, 64).await
    }

    pub(crate) async fn start_with(dir: &Path, max_instances: u32) -> Self {
        Self::start_configured(dir, |config| {
            config.runtime.allocation = AllocationConfig::Pooling(PoolingConfig {
                max_instances,
                ..PoolingConfig::default()
            });
        })
        .await
    }

    /// A server with the test settings, then whatever `configure` changes.
    pub(crate) async fn start_configured(
        dir: &Path,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> Self {
        let data_dir = dir.join("data");
        let mut config = ServeConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            data_dir.clone(),
            policies(dir),
        );
        config.admin_key = Some(ADMIN_KEY.into());
        config.grace = Duration::from_secs(2);
        config.runtime.allocation = AllocationConfig::Pooling(PoolingConfig {
            max_instances: 64,
            ..PoolingConfig::default()
        });
        // The cpu device only, unless a test asks for more: opening a
        // software Vulkan adapter per server would slow every test.
        config.gpu.wgpu = std::env::var_os("GUST_TEST_WGPU").is_some();
        config.gpu.cuda = false;
        configure(&mut config);
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let demo_key = server.first_start().map(|f| f.demo_key.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            addr,
            demo_key,
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) async fn stop(self) {
        self.stop_result().await.unwrap();
    }

    /// Stops the server and returns how its run ended (the final flush of
    /// the store may fail, on a full disk say).
    pub(crate) async fn stop_result(mut self) -> Result<(), gust_host::api::ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a problem document with `status` and `code`.
    pub(crate) fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.headers["content-type"], "application/problem+json");
        let json = self.json();
        assert_eq!(json["code"], code, "{json}");
        assert_eq!(json["status"], status);
        assert!(
            json["title"].is_string() && json["detail"].is_string() && json["type"].is_string()
        );
        json
    }
}

pub(crate) async fn request(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
) -> Reply {
    request_with(method, url, key, body, &[]).await
}

pub(crate) async fn request_with(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut builder = hyper::Request::builder().method(method).uri(url);
    if let Some(key) = key {
        builder = builder.header("authorization", format!("Bearer {key}"));
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client
        .request(builder.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub(crate) async fn deploy(server: &TestServer, key: &str, name: &str, path: &str) -> Reply {
    let bytes = std::fs::read(path).unwrap();
    request(
        "PUT",
        &server.url(&format!("/v1/functions/{name}")),
        Some(key),
        bytes,
    )
    .await
}

/// The invocation record `id`, as the tenant with `key` reads it.
pub(crate) async fn invocation_record(server: &TestServer, key: &str, id: &str) -> Value {
    let (status, record) = invocation_status(server, key, id).await;
    assert_eq!(status, 200, "{record}");
    record
}

/// The status of `GET /v1/invocations/{id}` for the tenant with `key`, and
/// the record when there is one (`Null` otherwise).
pub(crate) async fn invocation_status(server: &TestServer, key: &str, id: &str) -> (u16, Value) {
    let reply = request(
        "GET",
        &server.url(&format!("/v1/invocations/{id}")),
        Some(key),
        "",
    )
    .await;
    let json = if reply.status == 200 {
        reply.json()
    } else {
        Value::Null
    };
    (reply.status, json)
}

/// Creates tenant `name` with the admin key and returns its key.
pub(crate) async fn tenant(server: &TestServer, name: &str) -> String {
    tenant_on(&server.url(""), name).await
}

/// Creates tenant `name` with the admin key on the host at `url`.
pub(crate) async fn tenant_on(url: &str, name: &str) -> String {
    let reply = request(
        "POST",
        &format!("{url}/v1/tenants"),
        Some(ADMIN_KEY),
        format!(r#"{{"name":"{name}"}}"#),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    reply.json()["key"]["key"].as_str().unwrap().to_owned()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_the_demo_tenant_and_serves_health() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let demo = server.demo_key.clone().expect("first start creates demo");
    let on_disk = std::fs::read_to_string(server.data_dir.join("demo.key")).unwrap();
    assert_eq!(on_disk.trim(), demo);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(server.data_dir.join("demo.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let health = request("GET", &server.url("/healthz"), None, "").await;
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (200, "ok".into())
    );
    let openapi = request("GET", &server.url("/v1/openapi.json"), None, "").await;
    assert_eq!(openapi.status, 200);
    assert!(openapi.json()["paths"]["/v1/functions/{name}/invoke"].is_object());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_invoke_redeploy_and_delete() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();

    let created = deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let function = created.json();
    assert_eq!(
        (function["name"].as_str(), function["version"].as_u64()),
        (Some("hello"), Some(1))
    );
    assert_eq!(function["world"], "handler");
    assert!(function["digest"].as_str().unwrap().starts_with("sha256:"));

    let again = deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    assert_eq!(again.status, 200, "identical bytes are idempotent");
    assert_eq!(again.json()["version"], 1);
    let changed = deploy(&server, &key, "hello", artifacts::ECHO_COMPONENT).await;
    assert_eq!(
        (changed.status, changed.json()["version"].as_u64()),
        (201, Some(2))
    );
    let back = deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    assert_eq!(back.json()["version"], 3);

    let reply = request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(&key),
        "HTTP",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "Hello, HTTP!");
    let id = reply.headers["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(id.starts_with("inv_"));

    let record = request(
        "GET",
        &server.url(&format!("/v1/invocations/{id}")),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(record.status, 200);
    let record = record.json();
    assert_eq!(
        (record["outcome"].as_str(), record["status"].as_u64()),
        (Some("ok"), Some(200))
    );
    assert_eq!(record["version"], 3);

    let list = request("GET", &server.url("/v1/functions"), Some(&key), "")
        .await
        .json();
    assert_eq!(list["functions"].as_array().unwrap().len(), 1);
    let one = request("GET", &server.url("/v1/functions/hello"), Some(&key), "").await;
    assert_eq!(one.json()["version"], 3);

    let deleted = request("DELETE", &server.url("/v1/functions/hello"), Some(&key), "").await;
    assert_eq!(deleted.status, 204);
    request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(&key),
        "",
    )
    .await
    .problem(404, "not-found");
    request("DELETE", &server.url("/v1/functions/hello"), Some(&key), "")
        .await
        .problem(404, "not-found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_outcomes_map_to_status_codes() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    for (name, path) in [
        ("err", artifacts::RETURNS_ERROR_COMPONENT),
        ("panics", artifacts::PANICS_COMPONENT),
        ("loop", artifacts::INFINITE_LOOP_COMPONENT),
        ("bomb", artifacts::MEMORY_BOMB_COMPONENT),
        ("stdio", artifacts::STDIO_COMPONENT),
        ("hello", artifacts::HELLO_COMPONENT),
    ] {
        assert_eq!(deploy(&server, &key, name, path).await.status, 201);
    }
    let invoke = |name: &'static str| {
        let url = server.url(&format!("/v1/functions/{name}/invoke"));
        let key = key.clone();
        async move { request("POST", &url, Some(&key), "").await }
    };
    let guest = invoke("err").await.problem(422, "invalid-input");
    assert!(guest["invocation_id"].as_str().unwrap().starts_with("inv_"));
    let trap = invoke("panics").await.problem(500, "trap");
    assert!(
        trap["detail"]
            .as_str()
            .unwrap()
            .contains("panicked on purpose")
    );
    let oom = invoke("bomb").await.problem(500, "out-of-memory");
    let oom_record = request(
        "GET",
        &server.url(&format!(
            "/v1/invocations/{}",
            oom["invocation_id"].as_str().unwrap()
        )),
        Some(&key),
        "",
    )
    .await;
    assert_eq!(oom_record.json()["outcome"], "out-of-memory");

    // A runaway guest gets 504 while other calls keep succeeding.
    let runaway = tokio::spawn(invoke("loop"));
    for _ in 0..10 {
        assert_eq!(invoke("hello").await.status, 200);
    }
    runaway.await.unwrap().problem(504, "timeout");

    // Captured output is kept with the record and in the logs.
    let stdio = invoke("stdio").await;
    assert_eq!(stdio.status, 200);
    let logs = request(
        "GET",
        &server.url("/v1/functions/stdio/logs?limit=5"),
        Some(&key),
        "",
    )
    .await
    .json();
    let entry = &logs["invocations"][0];
    assert_eq!(entry["stdout"], "hello stdout\n");
    assert_eq!(entry["stderr"], "hello stderr\n");
    request(
        "GET",
        &server.url("/v1/functions/stdio/logs?limit=0"),
        Some(&key),
        "",
    )
    .await
    .problem(400, "invalid-request");

    let metrics = request("GET", &server.url("/metrics"), Some(ADMIN_KEY), "")
        .await
        .text();
    assert!(
        metrics.contains("gust_invocations_total{outcome=\"timeout\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gust_invocations_total{outcome=\"out-of-memory\"} 1"));
    assert!(metrics.contains("gust_invocation_duration_seconds_bucket"));
    assert_eq!(metric(&metrics, "gust_compile_total"), Some(6.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_problems() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    let put = |name: &str, body: Vec<u8>| {
        let url = server.url(&format!("/v1/functions/{name}"));
        let key = key.clone();
        async move { request("PUT", &url, Some(&key), body).await }
    };
    put("x", Vec::new()).await.problem(400, "invalid-component");
    put("x", b"definitely not wasm".to_vec())
        .await
        .problem(400, "invalid-component");
    put("x", wat::parse_str("(module)").unwrap())
        .await
        .problem(400, "core-module");
    let imports = put(
        "x",
        wat::parse_str(
            r#"(component (import "acme:kv/store@1.0.0" (instance (export "get" (func)))))"#,
        )
        .unwrap(),
    )
    .await
    .problem(400, "unsatisfied-imports");
    assert_eq!(imports["imports"][0], "acme:kv/store@1.0.0");
    put(
        "Bad_Name",
        std::fs::read(artifacts::HELLO_COMPONENT).unwrap(),
    )
    .await
    .problem(400, "invalid-name");
    // Over max_component_bytes (4 MiB): refused while streaming.
    put("big", vec![0u8; 5 << 20])
        .await
        .problem(413, "payload-too-large");
    assert_eq!(
        request("GET", &server.url("/v1/functions"), Some(&key), "")
            .await
            .json()["functions"],
        serde_json::json!([])
    );

    // Over max_body_bytes (64 KiB) on invoke.
    deploy(&server, &key, "echo", artifacts::ECHO_COMPONENT).await;
    request(
        "POST",
        &server.url("/v1/functions/echo/invoke"),
        Some(&key),
        vec![b'x'; 70_000],
    )
    .await
    .problem(413, "payload-too-large");
    let ok = request(
        "POST",
        &server.url("/v1/functions/echo/invoke"),
        Some(&key),
        vec![b'x'; 60_000],
    )
    .await;
    assert_eq!((ok.status, ok.body.len()), (200, 60_000));

    // Auth.
    let missing = request("GET", &server.url("/v1/functions"), None, "").await;
    missing.problem(401, "unauthorized");
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    request("GET", &server.url("/v1/functions"), Some("gust_nope"), "")
        .await
        .problem(401, "unauthorized");
    request("GET", &server.url("/v1/tenants"), Some(&key), "")
        .await
        .problem(401, "unauthorized");
    request("PATCH", &server.url("/v1/functions"), Some(&key), "")
        .await
        .problem(405, "method-not-allowed");
    request("GET", &server.url("/nowhere"), None, "")
        .await
        .problem(404, "not-found");
    tenant(&server, "acme").await;
    request(
        "POST",
        &server.url("/v1/tenants"),
        Some(ADMIN_KEY),
        r#"{"name":"acme"}"#,
    )
    .await
    .problem(409, "conflict");
    request(
        "POST",
        &server.url("/v1/tenants"),
        Some(ADMIN_KEY),
        r#"{"nom":"x"}"#,
    )
    .await
    .problem(400, "invalid-request");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let a = tenant(&server, "alpha").await;
    let b = tenant(&server, "beta").await;
    assert_eq!(
        deploy(&server, &a, "secret", artifacts::HELLO_COMPONENT)
            .await
            .status,
        201
    );
    let call = request(
        "POST",
        &server.url("/v1/functions/secret/invoke"),
        Some(&a),
        "",
    )
    .await;
    let id = call.headers["gust-invocation-id"]
        .to_str()
        .unwrap()
        .to_owned();

    assert_eq!(
        request("GET", &server.url("/v1/functions"), Some(&b), "")
            .await
            .json()["functions"],
        serde_json::json!([])
    );
    for (method, path) in [
        ("GET", "/v1/functions/secret".to_owned()),
        ("POST", "/v1/functions/secret/invoke".to_owned()),
        ("GET", "/v1/functions/secret/logs".to_owned()),
        ("DELETE", "/v1/functions/secret".to_owned()),
        ("GET", format!("/v1/invocations/{id}")),
    ] {
        request(method, &server.url(&path), Some(&b), "")
            .await
            .problem(404, "not-found");
    }
    // Beta may use the same name without touching alpha's function.
    assert_eq!(
        deploy(&server, &b, "secret", artifacts::ECHO_COMPONENT)
            .await
            .json()["version"],
        1
    );
    assert_eq!(
        request(
            "POST",
            &server.url("/v1/functions/secret/invoke"),
            Some(&a),
            "A"
        )
        .await
        .text(),
        "Hello, A!"
    );

    // Keys: a tenant makes and revokes its own; a revoked key stops working.
    let made = request("POST", &server.url("/v1/keys"), Some(&a), "").await;
    assert_eq!(made.status, 201);
    let (new_id, new_key) = (
        made.json()["id"].as_str().unwrap().to_owned(),
        made.json()["key"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        request("GET", &server.url("/v1/functions"), Some(&new_key), "")
            .await
            .status,
        200
    );
    request(
        "DELETE",
        &server.url(&format!("/v1/keys/{new_id}")),
        Some(&b),
        "",
    )
    .await
    .problem(404, "not-found");
    assert_eq!(
        request(
            "DELETE",
            &server.url(&format!("/v1/keys/{new_id}")),
            Some(&a),
            ""
        )
        .await
        .status,
        204
    );
    request("GET", &server.url("/v1/functions"), Some(&new_key), "")
        .await
        .problem(401, "unauthorized");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_answer_429_and_503() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start_with(dir.path(), 2).await;
    let tight = tenant(&server, "tight").await;
    let other = tenant(&server, "other").await;
    for key in [&tight, &other] {
        assert_eq!(
            deploy(&server, key, "loop", artifacts::INFINITE_LOOP_COMPONENT)
                .await
                .status,
            201
        );
        assert_eq!(
            deploy(&server, key, "hello", artifacts::HELLO_COMPONENT)
                .await
                .status,
            201
        );
    }
    let loop_url = server.url("/v1/functions/loop/invoke");
    let hello_url = server.url("/v1/functions/hello/invoke");
    let metrics_url = server.url("/metrics");
    let in_flight = || async {
        let text = request("GET", &metrics_url, Some(ADMIN_KEY), "")
            .await
            .text();
        metric(&text, "gust_invocations_in_flight").unwrap_or(0.0)
    };

    // `tight` may run one call at a time: a second one gets 429.
    let first = tokio::spawn({
        let (url, key) = (loop_url.clone(), tight.clone());
        async move { request("POST", &url, Some(&key), "").await }
    });
    while in_flight().await < 1.0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let limited = request("POST", &hello_url, Some(&tight), "").await;
    limited.problem(429, "too-many-requests");
    assert_eq!(limited.headers["retry-after"], "1");

    // The host has 2 instance slots: with both taken, anyone gets 503.
    let second = tokio::spawn({
        let (url, key) = (loop_url.clone(), other.clone());
        async move { request("POST", &url, Some(&key), "").await }
    });
    while in_flight().await < 2.0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let saturated = request("POST", &hello_url, Some(&other), "").await;
    saturated.problem(503, "overloaded");
    assert!(saturated.headers.contains_key("retry-after"));

    first.await.unwrap().problem(504, "timeout");
    second.await.unwrap().problem(504, "timeout");
    assert_eq!(
        request("POST", &hello_url, Some(&tight), "").await.status,
        200
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_http_components_are_served() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    let private = deploy(&server, &key, "web", artifacts::HTTP_HELLO_COMPONENT).await;
    assert_eq!(private.json()["world"], "http");
    let public_url = server.url("/v1/functions/open?public=true");
    let bytes = std::fs::read(artifacts::HTTP_HELLO_COMPONENT).unwrap();
    let public = request("PUT", &public_url, Some(&key), bytes).await;
    assert_eq!(
        (public.status, public.json()["public"].as_bool()),
        (201, Some(true))
    );

    // Private: the tenant's key is needed; without it, or with another
    // tenant's, the function does not exist.
    request("GET", &server.url("/http/demo/web/"), None, "")
        .await
        .problem(404, "not-found");
    let stranger = tenant(&server, "stranger").await;
    request("GET", &server.url("/http/demo/web/"), Some(&stranger), "")
        .await
        .problem(404, "not-found");
    let reply = request("GET", &server.url("/http/demo/web/"), Some(&key), "").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-fixture"], "http-hello");
    assert_eq!(reply.text(), "hello from wasi:http");
    assert!(
        reply.headers["gust-invocation-id"]
            .to_str()
            .unwrap()
            .starts_with("inv_")
    );

    // Public: no key; the component sees the path after /http/{tenant}/{name}.
    let echo = request(
        "POST",
        &server.url("/http/demo/open/echo?q=1"),
        None,
        "payload",
    )
    .await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.headers["x-path"], "/echo?q=1");
    assert_eq!(echo.headers["x-method"], "POST");
    assert_eq!(echo.text(), "payload");
    assert_eq!(
        request("GET", &server.url("/http/demo/open/status/418"), None, "")
            .await
            .status,
        418
    );

    // The body streams: the first chunk arrives before the guest is done.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let started = std::time::Instant::now();
    let response = client
        .request(
            hyper::Request::get(server.url("/http/demo/open/stream/5"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = started.elapsed();
    assert_eq!(&first[..], b"chunk 0\n");
    let rest = body.collect().await.unwrap().to_bytes();
    let done_at = started.elapsed();
    assert_eq!(&rest[..], b"chunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    assert!(
        done_at >= first_at + Duration::from_millis(300),
        "chunks were spread out: {first_at:?} then {done_at:?}"
    );

    // Failures before a response are problems with the invocation id.
    request("GET", &server.url("/http/demo/open/panic"), None, "")
        .await
        .problem(500, "trap");
    request("GET", &server.url("/http/demo/open/loop"), None, "")
        .await
        .problem(504, "timeout");
    request(
        "POST",
        &server.url("/http/demo/open/echo"),
        None,
        vec![b'x'; 70_000],
    )
    .await
    .problem(413, "payload-too-large");
    // The handler endpoint refuses an HTTP component, and vice versa.
    request(
        "POST",
        &server.url("/v1/functions/web/invoke"),
        Some(&key),
        "",
    )
    .await
    .problem(400, "wrong-world");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_everything_with_zero_recompiles() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let key = server.demo_key.clone().unwrap();
    deploy(&server, &key, "hello", artifacts::HELLO_COMPONENT).await;
    deploy(&server, &key, "web", artifacts::HTTP_HELLO_COMPONENT).await;
    request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(&key),
        "before",
    )
    .await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    assert!(server.demo_key.is_none(), "the demo tenant is created once");
    let reply = request(
        "POST",
        &server.url("/v1/functions/hello/invoke"),
        Some(&key),
        "after",
    )
    .await;
    assert_eq!(reply.text(), "Hello, after!");
    assert_eq!(
        request("GET", &server.url("/http/demo/web/"), Some(&key), "")
            .await
            .status,
        200
    );
    let logs = request(
        "GET",
        &server.url("/v1/functions/hello/logs"),
        Some(&key),
        "",
    )
    .await
    .json();
    assert_eq!(
        logs["invocations"].as_array().unwrap().len(),
        2,
        "records survive the restart"
    );
    let metrics = request("GET", &server.url("/metrics"), Some(ADMIN_KEY), "")
        .await
        .text();
    assert_eq!(
        metric(&metrics, "gust_compile_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "gust_cache_hits_total"), Some(2.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_grant_env_and_volumes_per_tenant() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let files = tenant(&server, "files").await;
    let demo = server.demo_key.clone().unwrap();
    for key in [&files, &demo] {
        deploy(&server, key, "fs", artifacts::FS_ACCESS_COMPONENT).await;
        deploy(&server, key, "env", artifacts::ENV_VAR_COMPONENT).await;
    }
    let call = |key: &str, name: &str, body: &'static str| {
        let url = server.url(&format!("/v1/functions/{name}/invoke"));
        let key = key.to_owned();
        async move { request("POST", &url, Some(&key), body).await }
    };
    // The volume directory must exist: until then calls fail clearly.
    let unavailable = call(&files, "fs", "list /data")
        .await
        .problem(500, "host-error");
    assert!(
        unavailable["detail"].as_str().unwrap().contains("volume"),
        "{unavailable}"
    );
    let volume = server.data_dir.join("volumes/files/data");
    std::fs::create_dir_all(&volume).unwrap();

    assert_eq!(
        call(&files, "env", "GREETING").await.text(),
        "from the policy"
    );
    call(&demo, "env", "GREETING").await.problem(404, "not-set");
    assert_eq!(
        call(&files, "fs", "write /data/note.txt kept").await.text(),
        "written"
    );
    assert_eq!(
        std::fs::read_to_string(volume.join("note.txt")).unwrap(),
        "kept"
    );
    assert_eq!(
        call(&files, "fs", "read /data/note.txt").await.text(),
        "kept"
    );
    call(&files, "fs", "read /data/../../demo.key")
        .await
        .problem(403, "io");
    // Another tenant's functions see no volume.
    call(&demo, "fs", "read /data/note.txt")
        .await
        .problem(403, "io");
    server.stop().await;
}

/// A one-route upstream server on loopback for outbound-HTTP tests.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("upstream saw {}", request.uri().path());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_follows_the_tenant_policy() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let upstream = upstream().await;
    let egress = tenant(&server, "egress").await;
    let demo = server.demo_key.clone().unwrap();
    let bytes = std::fs::read(artifacts::HTTP_HELLO_COMPONENT).unwrap();
    for key in [&egress, &demo] {
        let reply = request(
            "PUT",
            &server.url("/v1/functions/web?public=true"),
            Some(key),
            bytes.clone(),
        )
        .await;
        assert_eq!(reply.status, 201);
    }
    // Allowed by `outbound_http = ["127.0.0.1"]`.
    let allowed = request(
        "GET",
        &server.url(&format!("/http/egress/web/fetch/{upstream}/hello")),
        None,
        "",
    )
    .await;
    assert_eq!(
        (allowed.status, allowed.text()),
        (200, "200 upstream saw /hello".to_owned())
    );
    // Denied by default.
    let denied = request(
        "GET",
        &server.url(&format!("/http/demo/web/fetch/{upstream}/hello")),
        None,
        "",
    )
    .await;
    assert_eq!(denied.status, 502);
    assert!(
        denied.text().contains("HttpRequestDenied"),
        "{}",
        denied.text()
    );
    // Allowed hosts only: a name that is not listed is denied too.
    let other = request(
        "GET",
        &server.url(&format!(
            "/http/egress/web/fetch/localhost:{}/x",
            upstream.port()
        )),
        None,
        "",
    )
    .await;
    assert!(
        other.text().contains("HttpRequestDenied"),
        "{}",
        other.text()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_over_http_with_per_tenant_gpu_policies() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path()).await;
    let demo = server.demo_key.clone().unwrap();
    let nogpu = tenant(&server, "nogpu").await;
    let small = tenant(&server, "smallgpu").await;
    for key in [&demo, &nogpu, &small] {
        deploy(&server, key, "tensors", artifacts::TENSORS_COMPONENT).await;
    }
    let invoke = |key: &str, body: &'static str| {
        let url = server.url("/v1/functions/tensors/invoke");
        let key = key.to_owned();
        async move { request("POST", &url, Some(&key), body).await }
    };

    let chain = invoke(&demo, "chain").await;
    assert_eq!(chain.status, 200, "{}", chain.text());
    super::gpu::assert_chain(&chain.text());
    assert!(invoke(&demo, "devices").await.text().starts_with("cpu "));

    let forbidden = invoke(&nogpu, "chain").await.problem(403, "gpu-forbidden");
    assert!(
        forbidden["detail"]
            .as_str()
            .unwrap()
            .contains("may not use the GPU bridge"),
        "{forbidden}"
    );

    let held = invoke(&small, "hold 4").await;
    assert!(
        held.text()
            .starts_with("2 quota-exceeded: smallgpu: device memory quota of 2097152 bytes"),
        "{}",
        held.text()
    );

    let usage = request("GET", &server.url("/v1/usage"), Some(&demo), "").await;
    assert_eq!(usage.status, 200, "{}", usage.text());
    let gpu = &usage.json()["gpu"];
    assert!(gpu["device_seconds"].as_f64().unwrap() > 0.0, "{gpu}");
    assert_eq!(gpu["memory_bytes"], 0, "tensors are freed with their call");
    assert!(gpu["peak_memory_bytes"].as_u64().unwrap() > 0, "{gpu}");
    assert_eq!(gpu["devices"][0]["backend"], "cpu");
    let small_usage = request("GET", &server.url("/v1/usage"), Some(&small), "")
        .await
        .json();
    assert_eq!(small_usage["gpu"]["peak_memory_bytes"], 2 << 20);
    assert_eq!(small_usage["gpu"]["memory_limit_bytes"], 2 << 20);
    request("GET", &server.url("/v1/usage"), None, "")
        .await
        .problem(401, "unauthorized");

    let metrics = request("GET", &server.url("/metrics"), Some(ADMIN_KEY), "")
        .await
        .text();
    assert!(
        metric(&metrics, "gust_gpu_busy_seconds{backend=\"cpu\"}").unwrap() > 0.0,
        "{metrics}"
    );
    // Ops are pipelined: a call's tensors are freed once the device's
    // queue has run the jobs that still hold them, shortly after the call.
    let mut held = metric(&metrics, "gust_gpu_memory_bytes{backend=\"cpu\"}");
    for _ in 0..100 {
        if held == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let text = request("GET", &server.url("/metrics"), Some(ADMIN_KEY), "")
            .await
            .text();
        held = metric(&text, "gust_gpu_memory_bytes{backend=\"cpu\"}");
    }
    assert_eq!(held, Some(0.0));
    server.stop().await;
}
