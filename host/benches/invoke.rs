//! Store + instantiate from the `InstancePre` + `handle` + drop, for the
//! hello fixture, with the pooling and the on-demand allocator.
//!
//! `cargo bench -p gust-host --bench invoke`. Target: median ≤ 10 µs pooled.
//!
//! `gpu/*`: a guest's tiny bridge op (relu of 16 floats) against the cpu
//! backend called natively. `guest_relu_x0` and `guest_relu_x100` are whole
//! invocations doing 0 and 100 ops, so the per-op round trip is their
//! difference / 100; `native_relu` is the same kernel run directly (target:
//! round trip − native ≤ 2 µs).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use gust_host::runtime::{AllocationConfig, CallLimits, Request, Runtime, RuntimeConfig};

fn bench_invoke(c: &mut Criterion) {
    let bytes = std::fs::read(gust_test_artifacts::HELLO_COMPONENT).unwrap();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limits = CallLimits::default();
    let mut group = c.benchmark_group("invoke");
    for (id, allocation) in [
        ("hello_pooling", AllocationConfig::default()),
        ("hello_ondemand", AllocationConfig::OnDemand),
    ] {
        let cache = tempfile::TempDir::new().unwrap();
        let mut config = RuntimeConfig::new(cache.path());
        config.allocation = allocation;
        let runtime = Runtime::new(config).unwrap();
        let hello = runtime.load(&bytes).unwrap();
        // Every call must really succeed, or the figure means nothing.
        let check = tokio.block_on(runtime.invoke(&hello, Request::default(), &limits));
        assert!(check.outcome.is_ok(), "{:?}", check.outcome);
        group.bench_function(id, |b| {
            b.to_async(&tokio).iter(|| async {
                let invocation = runtime.invoke(&hello, Request::default(), &limits).await;
                debug_assert!(invocation.outcome.is_ok());
                invocation
            });
        });
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
        gpu: Some(gust_host::gpu::GpuGrant {
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

criterion_group!(benches, bench_invoke, bench_gpu);
criterion_main!(benches);
