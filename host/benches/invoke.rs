//! Store + instantiate from the `InstancePre` + `handle` + drop, for the
//! hello fixture, with the pooling and the on-demand allocator.
//!
//! `cargo bench -p gust-host --bench invoke`. Target: median ≤ 10 µs pooled.

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

criterion_group!(benches, bench_invoke);
criterion_main!(benches);
