//! One test per guest fixture: each fixture's outcome is classified right.
//! `foreach_fixture!` fails to compile if a fixture has no test here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gust_host::runtime::{CallControl, CallLimits, Outcome};
use gust_test_artifacts as artifacts;

use super::{invoke, limits, load, request, runtime};

macro_rules! assert_test_exists {
    ($name:ident) => {
        #[allow(unused_imports)]
        use self::$name as _;
    };
}
artifacts::foreach_fixture!(assert_test_exists);

fn ok_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(response) => String::from_utf8(response.body.clone()).expect("utf-8 body"),
        other => panic!("expected ok, got {other:?}"),
    }
}

#[tokio::test]
async fn hello() {
    let (rt, _dir) = runtime();
    let hello = load(&rt, artifacts::HELLO_COMPONENT);
    let empty = invoke(&rt, &hello, "").await;
    assert_eq!(ok_text(&empty.outcome), "Hello, world!");
    let named = invoke(&rt, &hello, "Gust").await;
    assert_eq!(ok_text(&named.outcome), "Hello, Gust!");
    let Outcome::Ok(response) = named.outcome else {
        unreachable!()
    };
    assert_eq!(response.status, 200);
    assert!(
        response.content_type.starts_with("text/plain"),
        "{}",
        response.content_type
    );
}

#[tokio::test]
async fn echo() {
    let (rt, _dir) = runtime();
    let echo = load(&rt, artifacts::ECHO_COMPONENT);
    let mut req = request("");
    req.body = vec![0, 159, 146, 150, 255];
    req.content_type = "application/x-test".into();
    req.headers = vec![("x-one".into(), "1".into()), ("x-two".into(), "2".into())];
    req.invocation_id = "inv_echo".into();
    let invocation = rt.invoke(&echo, req, &limits()).await;
    let Outcome::Ok(response) = invocation.outcome else {
        panic!("echo failed: {:?}", invocation.outcome)
    };
    assert_eq!(response.body, vec![0, 159, 146, 150, 255]);
    assert_eq!(response.content_type, "application/x-test");
    assert!(response.headers.contains(&("x-one".into(), "1".into())));
    assert!(response.headers.contains(&("x-two".into(), "2".into())));
    assert!(
        response
            .headers
            .contains(&("x-invocation-id".into(), "inv_echo".into()))
    );
}

#[tokio::test]
async fn returns_error() {
    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::RETURNS_ERROR_COMPONENT);
    let invocation = invoke(&rt, &component, "").await;
    let Outcome::GuestError(error) = invocation.outcome else {
        panic!("expected a guest error, got {:?}", invocation.outcome)
    };
    assert_eq!(error.code, "invalid-input");
    assert_eq!(error.status, Some(422));
    assert_eq!(error.http_status(), 422);
    assert!(error.message.contains("always fails"), "{}", error.message);
}

#[tokio::test]
async fn panics() {
    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::PANICS_COMPONENT);
    let invocation = invoke(&rt, &component, "").await;
    assert!(
        invocation.stderr.text().contains("panicked on purpose"),
        "{:?}",
        invocation.stderr
    );
    let Outcome::Trap {
        message,
        panic_message,
        backtrace,
    } = &invocation.outcome
    else {
        panic!("expected a trap, got {:?}", invocation.outcome)
    };
    assert!(message.contains("unreachable"), "{message}");
    let panic_message = panic_message
        .as_deref()
        .expect("panic message found in stderr");
    assert!(
        panic_message.contains("the panics fixture panicked on purpose"),
        "{panic_message}"
    );
    assert!(!backtrace.is_empty(), "a guest backtrace is recorded");
    assert!(invocation.outcome.to_string().starts_with("panicked: "));
    // The instance is gone; the component still serves.
    assert!(
        invoke(&rt, &component, "")
            .await
            .stderr
            .text()
            .contains("panicked")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop() {
    let (rt, _dir) = runtime();
    let tick = rt.config().epoch_tick;
    let component = load(&rt, artifacts::INFINITE_LOOP_COMPONENT);
    let hello = load(&rt, artifacts::HELLO_COMPONENT);
    let timeout = Duration::from_millis(300);
    let limits = CallLimits {
        timeout,
        ..limits()
    };
    let started = Instant::now();
    let invocation = rt.invoke(&component, request(""), &limits).await;
    let elapsed = started.elapsed();
    assert_eq!(invocation.outcome, Outcome::Timeout { limit: timeout });
    assert!(elapsed >= timeout, "fired early: {elapsed:?}");
    // Deadline plus one epoch tick, plus scheduling slack for a loaded CI machine.
    let latest = timeout + tick + Duration::from_millis(150);
    assert!(elapsed <= latest, "fired late: {elapsed:?} > {latest:?}");

    // While a runaway guest burns its budget, other calls are served.
    let rt = Arc::new(rt);
    let runaway = {
        let rt = Arc::clone(&rt);
        let limits = CallLimits {
            timeout: Duration::from_secs(2),
            ..limits.clone()
        };
        tokio::spawn(async move { rt.invoke(&component, request(""), &limits).await })
    };
    for _ in 0..20 {
        assert_eq!(
            ok_text(&invoke(&rt, &hello, "").await.outcome),
            "Hello, world!"
        );
    }
    assert_eq!(runaway.await.expect("join").outcome.code(), "timeout");
}

#[tokio::test]
async fn memory_bomb() {
    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::MEMORY_BOMB_COMPONENT);
    let limit = 64 << 20;
    let limits = CallLimits {
        memory_bytes: limit,
        ..limits()
    };
    let invocation = rt.invoke(&component, request(""), &limits).await;
    let Outcome::OutOfMemory {
        limit_bytes,
        requested_bytes,
    } = invocation.outcome
    else {
        panic!("expected out-of-memory, got {:?}", invocation.outcome)
    };
    assert_eq!(limit_bytes, limit);
    assert!(requested_bytes > limit);
    assert!(invocation.peak_memory_bytes <= limit);
    assert!(
        invocation.peak_memory_bytes > limit / 2,
        "it really grew: {}",
        invocation.peak_memory_bytes
    );
    // The engine keeps serving.
    let hello = load(&rt, artifacts::HELLO_COMPONENT);
    assert_eq!(
        ok_text(&invoke(&rt, &hello, "").await.outcome),
        "Hello, world!"
    );
}

#[tokio::test]
async fn deep_recursion() {
    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::DEEP_RECURSION_COMPONENT);
    let invocation = invoke(&rt, &component, "").await;
    assert!(
        matches!(invocation.outcome, Outcome::StackOverflow { .. }),
        "expected a stack overflow, got {:?}",
        invocation.outcome
    );
}

#[tokio::test]
async fn stdio() {
    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::STDIO_COMPONENT);
    let invocation = invoke(&rt, &component, "").await;
    assert_eq!(ok_text(&invocation.outcome), "ok");
    assert_eq!(invocation.stdout.text(), "hello stdout\n");
    assert_eq!(invocation.stderr.text(), "hello stderr\n");
    assert!(!invocation.stdout.truncated());

    // Output beyond the bound is dropped and counted; the call still succeeds.
    let limits = CallLimits {
        stdout_limit: 1000,
        ..limits()
    };
    let flood = rt.invoke(&component, request("100000"), &limits).await;
    assert_eq!(ok_text(&flood.outcome), "ok");
    assert_eq!(flood.stdout.bytes.len(), 1000);
    let written = "hello stdout\n".len() as u64 + 100_000 + 1;
    assert_eq!(
        flood.stdout.bytes.len() as u64 + flood.stdout.dropped_bytes,
        written
    );
}

#[tokio::test]
async fn env_var() {
    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::ENV_VAR_COMPONENT);
    let granted = CallLimits {
        env: vec![("GUST_TEST_VAR".to_owned(), "granted value".to_owned())].into(),
        ..limits()
    };
    let invocation = rt.invoke(&component, request(""), &granted).await;
    assert_eq!(ok_text(&invocation.outcome), "granted value");

    // Nothing is inherited from the host: not even PATH.
    for name in ["", "PATH", "HOME"] {
        let invocation = invoke(&rt, &component, name).await;
        let Outcome::GuestError(error) = invocation.outcome else {
            panic!("{name}: expected not-set, got {:?}", invocation.outcome)
        };
        assert_eq!(error.code, "not-set");
        assert_eq!(error.http_status(), 404);
    }
}

async fn serve(
    rt: &Arc<gust_host::runtime::Runtime>,
    component: &gust_host::runtime::LoadedComponent,
    method: &str,
    path: &str,
    body: &'static str,
) -> gust_host::runtime::HttpCall {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap();
    match rt.serve_http(component, request, &limits(), CallControl::default()) {
        Ok(call) => call,
        Err(invocation) => panic!("not served: {:?}", invocation.outcome),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_hello() {
    use http_body_util::BodyExt;

    let (rt, _dir) = runtime();
    let rt = Arc::new(rt);
    let component = load(&rt, artifacts::HTTP_HELLO_COMPONENT);
    assert_eq!(component.world().as_str(), "http");

    let call = serve(&rt, &component, "GET", "/", "").await;
    let response = call.response.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-fixture"], "http-hello");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello from wasi:http");
    assert!(call.completion.await.unwrap().outcome.is_ok());

    let call = serve(&rt, &component, "POST", "/echo?x=1", "posted body").await;
    let response = call.response.await.unwrap().unwrap();
    assert_eq!(response.headers()["x-method"], "POST");
    assert_eq!(response.headers()["x-path"], "/echo?x=1");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"posted body");

    let call = serve(&rt, &component, "GET", "/status/418", "").await;
    assert_eq!(call.response.await.unwrap().unwrap().status(), 418);

    // The body streams: the first chunk arrives while the guest still runs.
    let call = serve(&rt, &component, "GET", "/stream/4", "").await;
    let mut body = call.response.await.unwrap().unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"chunk 0\n");
    assert!(!call.completion.is_finished(), "the guest is still writing");
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"chunk 1\nchunk 2\nchunk 3\n");
    assert!(call.completion.await.unwrap().outcome.is_ok());

    // Failing before responding: no response, and a classified outcome.
    let call = serve(&rt, &component, "GET", "/panic", "").await;
    assert!(call.response.await.is_err());
    assert_eq!(call.completion.await.unwrap().outcome.code(), "trap");
    let request = hyper::Request::builder()
        .uri("http://localhost/loop")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let short = CallLimits {
        timeout: Duration::from_millis(200),
        ..limits()
    };
    let call = rt
        .serve_http(&component, request, &short, CallControl::default())
        .ok()
        .unwrap();
    assert!(call.response.await.is_err());
    assert_eq!(call.completion.await.unwrap().outcome.code(), "timeout");
}

/// A WASI 0.3 `wasi:http/service` component: served like a 0.2 one,
/// its body written through the store's event loop after `handle` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_p3() {
    use http_body_util::BodyExt;

    let (rt, _dir) = runtime();
    let rt = Arc::new(rt);
    let component = load(&rt, artifacts::HTTP_P3_COMPONENT);
    assert_eq!(component.world().as_str(), "http-p3");

    let call = serve(&rt, &component, "GET", "/", "").await;
    let response = call.response.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/plain");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Hello from WASI 0.3\n");
    assert!(call.completion.await.unwrap().outcome.is_ok());

    let call = serve(&rt, &component, "POST", "/echo", "posted body").await;
    let response = call.response.await.unwrap().unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"posted body");
    assert!(call.completion.await.unwrap().outcome.is_ok());

    let call = serve(&rt, &component, "GET", "/sleep/30", "").await;
    let body = call.response.await.unwrap().unwrap().into_body();
    assert_eq!(
        &body.collect().await.unwrap().to_bytes()[..],
        b"slept 30 ms\n"
    );

    // The body streams: the first chunk arrives while the guest still runs.
    let call = serve(&rt, &component, "GET", "/stream/4", "").await;
    let mut body = call.response.await.unwrap().unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"chunk 0\n");
    assert!(!call.completion.is_finished(), "the guest is still writing");
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"chunk 1\nchunk 2\nchunk 3\n");
    assert!(call.completion.await.unwrap().outcome.is_ok());

    // A caller that goes away mid-body ends the call.
    let call = serve(&rt, &component, "GET", "/stream/1000", "").await;
    let mut body = call.response.await.unwrap().unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let ended = tokio::time::timeout(Duration::from_secs(5), call.completion).await;
    assert!(ended.is_ok(), "the call went on without a reader");

    // A guest that never answers is stopped at the deadline.
    let request = hyper::Request::builder()
        .uri("http://localhost/spin")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let short = CallLimits {
        timeout: Duration::from_millis(200),
        ..limits()
    };
    let call = rt
        .serve_http(&component, request, &short, CallControl::default())
        .ok()
        .unwrap();
    assert!(call.response.await.is_err());
    assert_eq!(call.completion.await.unwrap().outcome.code(), "timeout");
}

#[tokio::test]
async fn fs_access() {
    let (rt, dir) = runtime();
    let component = load(&rt, artifacts::FS_ACCESS_COMPONENT);
    let data = dir.path().join("data");
    let shelf = dir.path().join("shelf");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&shelf).unwrap();
    std::fs::write(shelf.join("book.txt"), "read me").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "outside").unwrap();
    let limits = CallLimits {
        preopens: vec![
            gust_host::runtime::Preopen {
                host_path: data.clone(),
                opened: None,
                guest_path: "/data".into(),
                read_only: false,
            },
            gust_host::runtime::Preopen {
                host_path: shelf.clone(),
                opened: None,
                guest_path: "/shelf".into(),
                read_only: true,
            },
        ]
        .into(),
        ..limits()
    };
    let run = |body: &'static str| rt.invoke(&component, request(body), &limits);
    assert_eq!(
        ok_text(&run("read /shelf/book.txt").await.outcome),
        "read me"
    );
    assert_eq!(
        ok_text(&run("write /data/out.txt hello volume").await.outcome),
        "written"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("out.txt")).unwrap(),
        "hello volume"
    );
    assert_eq!(ok_text(&run("list /data").await.outcome), "out.txt");
    for denied in [
        "write /shelf/new.txt nope", // read-only volume
        "read /data/../secret.txt",  // no escaping a preopen
        "read /data/../../secret.txt",
        "read /etc/passwd", // nothing else is visible
    ] {
        let outcome = run(denied).await.outcome;
        assert!(
            matches!(&outcome, Outcome::GuestError(e) if e.code == "io"),
            "{denied}: {outcome:?}"
        );
    }
    assert!(!shelf.join("new.txt").exists());
    // Without grants the function sees no filesystem at all.
    let bare = rt
        .invoke(
            &component,
            request("read /shelf/book.txt"),
            &super::limits(),
        )
        .await;
    assert!(
        matches!(bare.outcome, Outcome::GuestError(_)),
        "{:?}",
        bare.outcome
    );
}

/// A volume is preopened as the directory the host opened at admission: a
/// path swapped for a symlink in between (by a function that could write
/// its parent) leads nowhere else.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn fs_access_sees_the_directory_opened_at_admission() {
    let (rt, dir) = runtime();
    let component = load(&rt, artifacts::FS_ACCESS_COMPONENT);
    let root = dir.path().join("volumes/acme");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("note.txt"), "the tenant's").unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("note.txt"), "admin.key").unwrap();
    let policy = gust_host::tenancy::Policy::default()
        .with_overrides(
            std::path::Path::new("acme.toml"),
            "[[volumes]]\nname = \"data\"\npath = \"data\"\nmount = \"/data\"\nread_only = false\n",
        )
        .unwrap();
    let resolved = policy.resolve_volumes(&root).unwrap();
    let limits = CallLimits {
        preopens: resolved
            .into_iter()
            .map(|v| gust_host::runtime::Preopen {
                host_path: v.host_path,
                opened: Some(v.dir),
                guest_path: v.mount,
                read_only: v.read_only,
            })
            .collect::<Vec<_>>()
            .into(),
        ..limits()
    };
    // Admitted; now the directory is swapped for a symlink out of the root.
    std::fs::rename(&data, root.join("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &data).unwrap();
    let read = rt
        .invoke(&component, request("read /data/note.txt"), &limits)
        .await;
    assert_eq!(ok_text(&read.outcome), "the tenant's");
}

/// Every host API that holds memory for a guest stops a guest that keeps
/// taking: its own call fails with a clear outcome, the host's memory held
/// for it stays within the call's limits.
#[tokio::test]
async fn hostile() {
    let (rt, _dir) = runtime();
    let hostile = load(&rt, artifacts::HOSTILE_COMPONENT);
    let limits = CallLimits {
        memory_bytes: 32 << 20,
        timeout: Duration::from_secs(20),
        ..limits()
    };
    let run = |body: &'static str, limits: CallLimits| {
        let (rt, hostile) = (&rt, &hostile);
        async move { rt.invoke(hostile, request(body), &limits).await }
    };
    // wasi-nn tensors are host memory, charged with the guest's own.
    let nn = run("nn-tensors 1048576", limits.clone()).await;
    assert!(
        matches!(nn.outcome, Outcome::OutOfMemory { limit_bytes, .. } if limit_bytes == 32 << 20),
        "{:?}",
        nn.outcome
    );
    assert!(nn.peak_memory_bytes <= 32 << 20, "{}", nn.peak_memory_bytes);
    // Empty tensors cost little memory but a handle each.
    let handles = run("handles", limits.clone()).await;
    assert!(
        matches!(&handles.outcome, Outcome::LimitExceeded { message } if message.contains("host resources")),
        "{:?}",
        handles.outcome
    );
    // Emitted output a caller has not yet read is held on the host.
    let emit = run("emit 1048576", limits.clone()).await;
    assert!(
        matches!(&emit.outcome, Outcome::LimitExceeded { message } if message.contains("emitted output")),
        "{:?}",
        emit.outcome
    );
    // Stdout is captured up to its limit and the rest dropped; the guest
    // runs into its deadline.
    let short = CallLimits {
        timeout: Duration::from_millis(300),
        ..limits.clone()
    };
    let stdout = run("stdout 65536", short).await;
    assert!(
        matches!(stdout.outcome, Outcome::Timeout { .. }),
        "{:?}",
        stdout.outcome
    );
    assert!(stdout.stdout.text().len() <= limits.stdout_limit);
    // Bridge tensors count against the tenant's account.
    let device = super::gpu::cpu_device();
    let account = gust_gpu_bridge::Account::new("t", Some(8 << 20), None);
    let gpu = super::gpu::grant(&device, &account);
    let tensors = run(
        "gpu-tensors 1048576",
        CallLimits {
            memory_bytes: 32 << 20,
            ..gpu
        },
    )
    .await;
    assert!(
        matches!(&tensors.outcome, Outcome::GuestError(e) if e.code == "refused" && e.message.contains("memory")),
        "{:?}",
        tensors.outcome
    );
    device.synchronize(&account).await.unwrap();
    assert_eq!(device.used_bytes(), 0, "the call's tensors are freed");
}

#[tokio::test]
async fn hostile_http() {
    super::hostile::a_wasi_http_function_cannot_pile_up_emitted_output().await;
}

#[tokio::test]
async fn tensors() {
    let (rt, _dir) = runtime();
    let tensors = load(&rt, artifacts::TENSORS_COMPONENT);
    let device = super::gpu::cpu_device();
    let account = gust_gpu_bridge::Account::new("t", None, None);
    let limits = super::gpu::grant(&device, &account);
    let chain = super::gpu::call(&rt, &tensors, "chain", &limits).await;
    super::gpu::assert_chain(&ok_text(&chain.outcome));
    let devices = super::gpu::call(&rt, &tensors, "devices", &limits).await;
    assert!(
        ok_text(&devices.outcome).starts_with("cpu cpu ("),
        "{:?}",
        devices.outcome
    );
    device.synchronize(&account).await.unwrap();
    assert_eq!(device.used_bytes(), 0);
}

#[tokio::test]
async fn models() {
    super::models::fixture_embeds_and_is_refused_models_not_granted().await;
}

#[tokio::test]
async fn counter() {
    super::reuse::an_instance_serves_at_most_max_uses_calls().await;
}

#[tokio::test]
async fn wasi_nn() {
    super::models::wasi_nn_guest_runs_on_resident_models().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamer() {
    use gust_host::runtime::Cancel;

    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::STREAMER_COMPONENT);
    // Not streamed: the emitted chunks come first in the body.
    let buffered = invoke(&rt, &component, "one two").await;
    assert_eq!(ok_text(&buffered.outcome), "one\ntwo\ndone\n");
    // Over the output limit: stopped with a host error naming the limit.
    let control = CallControl {
        output_limit: 5,
        ..CallControl::default()
    };
    let limited = rt
        .invoke_with(&component, request("one two"), &limits(), control)
        .await;
    assert!(
        limited.outcome.to_string().contains("limit of 5 bytes"),
        "{}",
        limited.outcome
    );

    // Streamed: each chunk arrives while the guest still runs (it spins
    // after emitting), then a cancel interrupts it.
    let rt = Arc::new(rt);
    let (sender, mut chunks) = tokio::sync::mpsc::channel(4);
    let cancel = Cancel::new();
    let control = CallControl {
        cancel: Some(cancel.clone()),
        stream: Some(sender),
        output_limit: 0,
        ..CallControl::default()
    };
    let call = {
        let rt = Arc::clone(&rt);
        tokio::spawn(async move {
            rt.invoke_with(&component, request("a b spin"), &limits(), control)
                .await
        })
    };
    assert_eq!(chunks.recv().await.unwrap(), "a\n");
    assert_eq!(chunks.recv().await.unwrap(), "b\n");
    assert!(!call.is_finished());
    cancel.cancel();
    let invocation = call.await.expect("join");
    assert_eq!(invocation.outcome, Outcome::Cancelled);
}

/// `wasi:config` answers from the call's values (a missing key is none);
/// `wasi:keyvalue` without a grant is denied, not a trap. (With a tenant's
/// buckets: `kv.rs`.)
#[tokio::test]
async fn kv_config() {
    let (rt, _dir) = runtime();
    let component = load(&rt, artifacts::KV_CONFIG_COMPONENT);
    let limits = CallLimits {
        config: Arc::new([
            ("a.key".to_owned(), "one".to_owned()),
            ("b".to_owned(), "two".to_owned()),
        ]),
        ..limits()
    };
    let call = |body: &'static str| {
        let (rt, component, limits) = (&rt, &component, &limits);
        async move { rt.invoke(component, request(body), limits).await.outcome }
    };
    assert_eq!(ok_text(&call("config a.key").await), "one");
    assert_eq!(ok_text(&call("config missing").await), "<none>");
    assert_eq!(ok_text(&call("config-all").await), "a.key=one\nb=two\n");
    match call("get bucket key").await {
        Outcome::GuestError(error) => {
            assert_eq!(error.code, "kv");
            assert_eq!(error.message, "access-denied");
        }
        other => panic!("expected the guest's error, got {other:?}"),
    }
}
