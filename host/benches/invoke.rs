//! Store + instantiate from the `InstancePre` + `handle` + drop, for the
//! hello fixture, with the pooling and the on-demand allocator.
//!
//! `cargo bench -p gust-host --bench invoke`. Target: median ≤ 10 µs pooled.
//!
//! `invoke/python_hello*`: the same for `examples/python/hello` built with
//! componentize-py (skipped, with a message, when it is not installed).
//! Target: median ≤ 0.5 ms pooled.
//!
//! `invoke/js_hello*`: the same for `examples/js/hello` built with esbuild
//! and ComponentizeJS (skipped, with a message, when they are not
//! installed). Target: median ≤ 0.5 ms pooled.
//!
//! `*_reused`: the same calls with instance reuse (policy
//! `reuse_instances`, here 1000 calls per instance): call + return of the
//! instance to the idle pool, one instantiation per 1000 calls.
//!
//! `ready/{python,js}_hello*`: a call that finds a fresh instance made ready for
//! it (policy `ready_instances`, the default): take it, call, drop. Before each timed
//! call the bench waits, untimed, until the next instance is ready, so the
//! figure is the latency of a call when the host keeps up; `*_back_to_back`
//! calls without waiting (a call that finds none instantiates its own, while
//! the next is made on the other core). The instantiation itself still
//! costs what `invoke/hello_pooling` and `invoke/python_hello` say.
//!
//! `restart/*`: a restarted host making a function ready from its compiled
//! artifact (`load_compiled`: check the artifact's MAC, deserialize,
//! pre-instantiate; the component's own bytes are not read), and the same
//! followed by its first call in a fresh instance. Target: ≤ 20 ms for the
//! Python hello.
//!
//! `http/p2_hello` and `http/p3_hello`: one `GET /` to the `http-hello`
//! (WASI 0.2, `wasi:http/proxy`) and `http-p3` (WASI 0.3,
//! `wasi:http/service`) fixtures through `Runtime::serve_http`, fresh
//! instance, response body read to its end and the call's completion
//! awaited. The 0.3 one runs on the runtime's second engine (component-model
//! async, on-demand allocation).
//!
//! `gpu/*`: a guest's tiny bridge op (relu of 16 floats) against the cpu
//! backend called natively. `guest_relu_x0` and `guest_relu_x100` are whole
//! invocations doing 0 and 100 ops, so the per-op round trip is their
//! difference / 100; `native_relu` is the same kernel run directly (target:
//! round trip − native ≤ 2 µs).

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code
)]

#[path = "../tests/all/python_build.rs"]
mod python_build;

use criterion::{Criterion, criterion_group, criterion_main};

/// The allocator the `gust` binary runs with (see `host/src/main.rs`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use gust_host::runtime::{
    AllocationConfig, CallLimits, Ready, Request, Reuse, Runtime, RuntimeConfig,
};

fn bench_invoke(c: &mut Criterion) {
    let rust_hello = std::fs::read(gust_test_artifacts::HELLO_COMPONENT).unwrap();
    let python_hello = python_build::python_component(
        &python_build::root().join("examples/python/hello"),
        "hello",
    )
    .map(|path| std::fs::read(path).unwrap());
    let js_hello =
        python_build::js_component(&python_build::root().join("examples/js/hello"), "js-hello")
            .map(|path| std::fs::read(path).unwrap());
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("invoke");
    // (name, component, allocator, calls one instance may serve)
    let mut cases = vec![
        ("hello_pooling", &rust_hello, AllocationConfig::default(), 1),
        ("hello_ondemand", &rust_hello, AllocationConfig::OnDemand, 1),
        (
            "hello_reused",
            &rust_hello,
            AllocationConfig::default(),
            1000,
        ),
    ];
    if let Some(python_hello) = &python_hello {
        cases.push(("python_hello", python_hello, AllocationConfig::default(), 1));
        cases.push((
            "python_hello_ondemand",
            python_hello,
            AllocationConfig::OnDemand,
            1,
        ));
        cases.push((
            "python_hello_reused",
            python_hello,
            AllocationConfig::default(),
            1000,
        ));
    }
    if let Some(js_hello) = &js_hello {
        cases.push(("js_hello", js_hello, AllocationConfig::default(), 1));
        cases.push((
            "js_hello_reused",
            js_hello,
            AllocationConfig::default(),
            1000,
        ));
    }
    // One compiled cache for every runtime, so Python compiles once.
    let cache = tempfile::TempDir::new().unwrap();
    for (id, bytes, allocation, max_uses) in cases {
        let mut config = RuntimeConfig::new(cache.path());
        config.allocation = allocation;
        let runtime = Runtime::new(config).unwrap();
        let loading = std::time::Instant::now();
        let hello = runtime.load(bytes).unwrap();
        // For the record: compiling (first case of a component) vs loading
        // the compiled artifact from the cache (the rest), as at a restart.
        eprintln!("{id}: {:?} from {:?}", loading.elapsed(), hello.source());
        let limits = CallLimits {
            reuse: Some(Reuse {
                scope: "bench/hello".into(),
                max_uses,
            }),
            ..CallLimits::default()
        };
        // Every call must really succeed (and reuse must really happen), or
        // the figure means nothing.
        for expect_reused in [false, max_uses > 1] {
            let check = tokio.block_on(runtime.invoke(&hello, Request::default(), &limits));
            assert!(check.outcome.is_ok(), "{:?}", check.outcome);
            assert_eq!(check.timings.reused, expect_reused, "{id}");
        }
        group.bench_function(id, |b| {
            b.to_async(&tokio).iter(|| async {
                let invocation = runtime.invoke(&hello, Request::default(), &limits).await;
                debug_assert!(invocation.outcome.is_ok());
                invocation
            });
        });
    }
    group.finish();

    let mut ready = c.benchmark_group("ready");
    // The timed part is short and the waits between are not counted:
    // criterion's defaults would make this group run for minutes.
    ready.warm_up_time(std::time::Duration::from_millis(200));
    ready.measurement_time(std::time::Duration::from_millis(500));
    ready.sample_size(30);
    // Two workers: the instance is made in a task of its own, as in `gust
    // serve`, while the bench's thread runs the call.
    let workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Only Python and JavaScript: the Rust hello instantiates in less time than handing
    // the work to another thread takes, so none is made ahead for it
    // (`RuntimeConfig::ready_min_instantiate`).
    let slow_starters = [("python_hello", &python_hello), ("js_hello", &js_hello)];
    for (id, bytes) in slow_starters {
        let Some(bytes) = bytes else { continue };
        let runtime = Runtime::new(RuntimeConfig::new(cache.path())).unwrap();
        let loaded = runtime.load(bytes).unwrap();
        let limits = CallLimits {
            ready: Some(Ready {
                scope: "bench/hello".into(),
                count: 1,
            }),
            ..CallLimits::default()
        };
        let until_ready = || {
            while runtime.ready_instances("bench/hello") == 0 {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        };
        // The first call makes the first ready instance; the second must
        // take it, or the figure means nothing.
        for expect_ready in [false, true] {
            let check = workers.block_on(runtime.invoke(&loaded, Request::default(), &limits));
            assert!(check.outcome.is_ok(), "{:?}", check.outcome);
            assert_eq!(check.timings.ready, expect_ready, "{id}");
            until_ready();
        }
        ready.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut timed = std::time::Duration::ZERO;
                for _ in 0..iters {
                    until_ready();
                    let started = std::time::Instant::now();
                    let invocation =
                        workers.block_on(runtime.invoke(&loaded, Request::default(), &limits));
                    timed += started.elapsed();
                    debug_assert!(invocation.timings.ready);
                }
                timed
            });
        });
        ready.bench_function(format!("{id}_back_to_back"), |b| {
            b.iter(|| workers.block_on(runtime.invoke(&loaded, Request::default(), &limits)));
        });
        let stats = runtime.stats();
        eprintln!(
            "{id}: {} of {} instances made were taken ready",
            stats.ready_hits, stats.instantiations
        );
    }
    ready.finish();

    let mut restart = c.benchmark_group("restart");
    restart.sample_size(20);
    let components = std::iter::once(("hello", &rust_hello))
        .chain(python_hello.as_ref().map(|bytes| ("python_hello", bytes)));
    for (id, bytes) in components {
        // A new engine over the cache the cases above filled, as after a
        // restart (the artifact is in the page cache, as on a host that
        // just wrote or read it).
        let runtime = Runtime::new(RuntimeConfig::new(cache.path())).unwrap();
        let digest = gust_host::digest::Digest::of(bytes);
        let ready = || runtime.load_compiled(&digest).unwrap().unwrap();
        assert_eq!(ready().source(), gust_host::runtime::LoadSource::Cache);
        restart.bench_function(format!("{id}_load"), |b| b.iter(ready));
        restart.bench_function(format!("{id}_first_call"), |b| {
            b.to_async(&tokio).iter(|| async {
                let loaded = ready();
                let invocation = runtime
                    .invoke(&loaded, Request::default(), &CallLimits::default())
                    .await;
                assert!(invocation.outcome.is_ok());
            });
        });
    }
    restart.finish();
}

fn bench_http(c: &mut Criterion) {
    use http_body_util::BodyExt as _;

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = tempfile::TempDir::new().unwrap();
    let runtime = std::sync::Arc::new(Runtime::new(RuntimeConfig::new(cache.path())).unwrap());
    let mut group = c.benchmark_group("http");
    for (id, path, world) in [
        (
            "p2_hello",
            gust_test_artifacts::HTTP_HELLO_COMPONENT,
            "http",
        ),
        (
            "p3_hello",
            gust_test_artifacts::HTTP_P3_COMPONENT,
            "http-p3",
        ),
    ] {
        let loaded = runtime.load(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(loaded.world().as_str(), world);
        let serve = || async {
            let request = hyper::Request::builder()
                .uri("http://localhost/")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let call = runtime
                .serve_http(
                    &loaded,
                    request,
                    &CallLimits::default(),
                    gust_host::runtime::CallControl::default(),
                )
                .ok()
                .unwrap();
            let response = call.response.await.unwrap().unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let invocation = call.completion.await.unwrap();
            (body, invocation)
        };
        // Every call must really answer, or the figure means nothing.
        let (body, invocation) = tokio.block_on(serve());
        assert!(body.to_ascii_lowercase().starts_with(b"hello"), "{body:?}");
        assert!(invocation.outcome.is_ok(), "{:?}", invocation.outcome);
        group.bench_function(id, |b| b.to_async(&tokio).iter(serve));
    }
    group.finish();
}

fn bench_gpu(c: &mut Criterion) {
    use gust_gpu_bridge::{Account, Backend, Device, DeviceOptions, Kernel, UnaryOp};
    let bytes = std::fs::read(gust_test_artifacts::TENSORS_COMPONENT).unwrap();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = tempfile::TempDir::new().unwrap();
    let runtime = Runtime::new(RuntimeConfig::new(cache.path())).unwrap();
    let tensors = runtime.load(&bytes).unwrap();
    // The cpu device as `gust serve` opens it.
    let device = Device::start_inline(
        gust_gpu_bridge::backend::cpu::CpuBackend::new(1 << 30),
        DeviceOptions::default(),
    )
    .unwrap();
    let limits = CallLimits {
        gpu: Some(gust_host::runtime::GpuGrant {
            devices: std::sync::Arc::from(vec![device]),
            account: Account::new("bench", None, None),
            models: None,
        }),
        ..CallLimits::default()
    };
    let mut group = c.benchmark_group("gpu");
    for n in [0, 100] {
        let request = || Request {
            body: format!("relu {n}").into_bytes(),
            ..Request::default()
        };
        let check = tokio.block_on(runtime.invoke(&tensors, request(), &limits));
        assert!(check.outcome.is_ok(), "{:?}", check.outcome);
        group.bench_function(format!("guest_relu_x{n}"), |b| {
            b.to_async(&tokio)
                .iter(|| async { runtime.invoke(&tensors, request(), &limits).await });
        });
    }
    let mut native = gust_gpu_bridge::backend::cpu::CpuBackend::new(1 << 30);
    let input = native.upload(&[0u8; 64]).unwrap();
    let kernel = Kernel::Unary {
        op: UnaryOp::Relu,
        dtype: gust_gpu_bridge::DType::F32,
        len: 16,
    };
    group.bench_function("native_relu", |b| {
        b.iter(|| {
            let mut out = native.alloc(64).unwrap();
            native.run(&kernel, &[&input], &mut out).unwrap();
            out
        });
    });
    group.finish();
}

criterion_group!(benches, bench_invoke, bench_http, bench_gpu);
criterion_main!(benches);
