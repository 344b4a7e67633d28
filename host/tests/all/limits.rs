//! Engine-wide limits: pool capacity, fallback allocation, concurrency.

use std::sync::Arc;
use std::time::Duration;

use gust_host::runtime::{
    AllocationConfig, AllocatorInUse, CallLimits, Outcome, PoolingConfig, Runtime, RuntimeConfig,
};
use gust_test_artifacts as artifacts;
use tempfile::TempDir;

use super::{invoke, limits, load, request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_overloaded_and_recovers() {
    let dir = TempDir::new().unwrap();
    let mut config = RuntimeConfig::new(dir.path());
    config.allocation = AllocationConfig::Pooling(PoolingConfig {
        max_instances: 2,
        ..PoolingConfig::default()
    });
    let rt = Arc::new(Runtime::new(config).unwrap());
    assert_eq!(rt.allocator(), &AllocatorInUse::Pooling);
    let looping = load(&rt, artifacts::INFINITE_LOOP_COMPONENT);
    let hello = load(&rt, artifacts::HELLO_COMPONENT);
    let busy = CallLimits {
        timeout: Duration::from_millis(800),
        ..limits()
    };
    let mut runaways = Vec::new();
    for _ in 0..2 {
        let (rt, looping, busy) = (Arc::clone(&rt), looping.clone(), busy.clone());
        runaways.push(tokio::spawn(async move {
            rt.invoke(&looping, request(""), &busy).await
        }));
    }
    // Wait until both slots are taken. A blocking sleep: both runtime workers
    // are busy running the guests, so tokio's timers would be late.
    while rt.stats().instantiations < 2 {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let refused = invoke(&rt, &hello, "").await;
    assert!(
        matches!(refused.outcome, Outcome::Overloaded { .. }),
        "expected overloaded, got {:?}",
        refused.outcome
    );
    for runaway in runaways {
        assert_eq!(runaway.await.unwrap().outcome.code(), "timeout");
    }
    assert!(invoke(&rt, &hello, "").await.outcome.is_ok());
}

#[tokio::test]
async fn an_unreservable_pool_falls_back_to_on_demand() {
    let dir = TempDir::new().unwrap();
    let mut config = RuntimeConfig::new(dir.path());
    // Millions of 4 GiB slots cannot be reserved in a 47-bit address space.
    config.allocation = AllocationConfig::Pooling(PoolingConfig {
        max_instances: 4_000_000,
        total_memories: 4_000_000,
        ..PoolingConfig::default()
    });
    let rt = Runtime::new(config).unwrap();
    assert!(
        matches!(rt.allocator(), AllocatorInUse::OnDemandFallback { .. }),
        "{:?}",
        rt.allocator()
    );
    let hello = load(&rt, artifacts::HELLO_COMPONENT);
    assert!(invoke(&rt, &hello, "").await.outcome.is_ok());
}

#[tokio::test]
async fn on_demand_allocation_runs_and_limits_memory() {
    let dir = TempDir::new().unwrap();
    let mut config = RuntimeConfig::new(dir.path());
    config.allocation = AllocationConfig::OnDemand;
    let rt = Runtime::new(config).unwrap();
    assert_eq!(rt.allocator(), &AllocatorInUse::OnDemand);
    let hello = load(&rt, artifacts::HELLO_COMPONENT);
    assert!(invoke(&rt, &hello, "x").await.outcome.is_ok());
    let bomb = load(&rt, artifacts::MEMORY_BOMB_COMPONENT);
    let small = CallLimits {
        memory_bytes: 32 << 20,
        ..limits()
    };
    let invocation = rt.invoke(&bomb, request(""), &small).await;
    assert_eq!(invocation.outcome.code(), "out-of-memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_are_isolated() {
    let (rt, _dir) = super::runtime();
    let rt = Arc::new(rt);
    let hello = load(&rt, artifacts::HELLO_COMPONENT);
    let mut calls = Vec::new();
    for i in 0..64 {
        let (rt, hello) = (Arc::clone(&rt), hello.clone());
        calls.push(tokio::spawn(async move {
            let name = format!("caller {i}");
            let invocation = invoke(&rt, &hello, &name).await;
            (name, invocation)
        }));
    }
    for call in calls {
        let (name, invocation) = call.await.unwrap();
        let Outcome::Ok(response) = invocation.outcome else {
            panic!("{name}: {:?}", invocation.outcome)
        };
        assert_eq!(response.body, format!("Hello, {name}!").into_bytes());
    }
}
