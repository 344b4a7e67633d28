//! What the embedded store (sled) spends writing invocation records.
//!
//! `cargo bench -p gust-host --bench records`. Opens a `SledStore` in a
//! temporary directory with the host's default retention (1,000 records per
//! function), deploys one function, fills its retention window so that
//! every further record also prunes one, and measures
//! `MetaStore::record_invocations` per record in batches of 1 (a lone call)
//! and 32 (the record writer under load), with records shaped like the
//! hello fixture's: with ids the store drew (`MetaStore::invocation_id`,
//! what calls get) and with random ids (what jobs get, and every record
//! before drawn ids), which the store also indexes by id.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gust_host::runtime::new_invocation_id;
use gust_host::store::sled::SledStore;
use gust_host::store::{
    DeployRequest, FunctionWorld, InvocationRecord, MetaStore, TimingsRecord, now_millis,
};

const RETENTION: usize = 1000;

fn record(store: &SledStore, drawn: bool) -> InvocationRecord {
    let started_at = now_millis();
    let id = if drawn {
        store.invocation_id("demo", "hello", started_at).unwrap()
    } else {
        new_invocation_id(started_at)
    };
    InvocationRecord {
        id,
        tenant: "demo".into(),
        function: "hello".into(),
        version: 1,
        started_at,
        status: 200,
        outcome: "ok".into(),
        message: None,
        timings: TimingsRecord {
            instantiate_us: 9,
            call_us: 4,
            total_us: 41,
            reused_instance: false,
            ready_instance: false,
        },
        peak_memory_bytes: 1_179_648,
        stdout: String::new(),
        stderr: String::new(),
        stdout_dropped_bytes: 0,
        stderr_dropped_bytes: 0,
        egress_denied: Vec::new(),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
    }
}

fn records(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db"), RETENTION).unwrap();
    store
        .deploy(&DeployRequest {
            tenant: "demo".into(),
            name: "hello".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1234,
            world: FunctionWorld::Handler,
            public: false,
            retryable: false,
            secrets: Vec::new(),
            config: BTreeMap::new(),
        })
        .unwrap();
    let fill: Vec<InvocationRecord> = (0..RETENTION).map(|_| record(&store, true)).collect();
    for answer in store.record_invocations(&fill) {
        answer.unwrap();
    }

    let mut group = c.benchmark_group("record_invocations");
    for (batch, drawn) in [(1_usize, true), (32, true), (1, false), (32, false)] {
        let ids = if drawn { "drawn ids" } else { "random ids" };
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("{ids}, batch {batch}"), |b| {
            b.iter_batched(
                || {
                    (0..batch)
                        .map(|_| record(&store, drawn))
                        .collect::<Vec<_>>()
                },
                |records| {
                    for answer in store.record_invocations(&records) {
                        answer.unwrap();
                    }
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
