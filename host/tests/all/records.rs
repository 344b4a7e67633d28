//! What recording invocations costs in memory, and that every record is
//! accounted for as written, pruned or failed (`benches/soak.sh` relies on
//! both).
//!
//! The test binary's global allocator counts, per thread, the bytes each
//! thread holds: the bytes one test's thread holds are measured across many
//! recorded invocations, which no other test's allocations can disturb.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use gust_host::runtime::Invocation;
use gust_host::service::{ServeConfig, Service, Started};
use gust_host::store::FunctionRecord;
use tempfile::TempDir;

/// The system allocator, keeping a per-thread count of bytes held.
struct Counting;

thread_local! {
    /// Bytes allocated minus bytes freed by this thread.
    static HELD: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: allocations during thread teardown must not panic.
    let _ = HELD.try_with(|held| held.set(held.get() + delta));
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

// SAFETY: every method forwards to `System` with the caller's arguments and
// only adds bookkeeping in a const-initialised thread local (which never
// allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(signed(layout.size()));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(signed(layout.size()));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from `System` via us.
        unsafe { System.dealloc(ptr, layout) };
        count(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; `ptr` came from `System` via us.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(signed(new_size) - signed(layout.size()));
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.with(Cell::get)
}

/// A service (no GPU) keeping `retention` records per function, with the
/// hello fixture deployed for the first-start tenant `demo`.
async fn service(retention: usize) -> (Arc<Service>, FunctionRecord, TempDir) {
    let dir = TempDir::new().unwrap();
    let mut config = ServeConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("data"),
        dir.path().join("no-policies"),
    );
    config.gpu.wgpu = false;
    config.gpu.cuda = false;
    config.retention_per_function = retention;
    let (service, _first) = Service::open(config).await.unwrap();
    let service = Arc::new(service);
    let wasm = std::fs::read(gust_test_artifacts::HELLO_COMPONENT).unwrap();
    service
        .deploy("demo", "hello", wasm.into(), false, false)
        .await
        .unwrap();
    let function = service.deployment("demo", "hello").unwrap().record;
    (service, function, dir)
}

/// The value of the sample line `series` (name and labels) in Prometheus
/// text, 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn records_are_counted_as_written_pruned_or_failed() {
    let (service, function, _dir) = service(3).await;
    let invocation = Invocation::host_error("not run");
    for _ in 0..5 {
        service.record(&function, &Started::now(), 500, &invocation);
    }
    let ghost = FunctionRecord {
        name: "ghost".into(),
        ..function.clone()
    };
    service.record(&ghost, &Started::now(), 500, &invocation);

    let text = service.metrics_text();
    let written = r#"gust_invocation_records_total{result="written"}"#;
    let failed = r#"gust_invocation_records_total{result="failed"}"#;
    assert_eq!(sample(&text, written), 5.0, "{text}");
    // Retention 3: the 4th and 5th record each pushed one out.
    assert_eq!(sample(&text, "gust_invocation_records_pruned_total"), 2.0);
    assert_eq!(sample(&text, failed), 1.0);
    assert_eq!(
        service
            .invocations("demo", "hello", 100, None)
            .unwrap()
            .0
            .len(),
        3
    );
}

#[tokio::test]
async fn recording_without_scrapes_holds_bounded_memory() {
    // A function that does not exist: the store refuses the record after a
    // read, so what this thread holds is the metrics' alone (a written
    // record would also grow sled's cache, which is bounded elsewhere).
    let (service, function, _dir) = service(1).await;
    let ghost = FunctionRecord {
        name: "ghost".into(),
        ..function
    };
    let invocation = Invocation::host_error("not run");
    // Warm up: metric handles, sled's cache for the lookup.
    for _ in 0..10_000 {
        service.record(&ghost, &Started::now(), 500, &invocation);
    }
    let before = held();
    let calls = 100_000;
    for _ in 0..calls {
        service.record(&ghost, &Started::now(), 500, &invocation);
    }
    let grown = held() - before;
    // Each duration sample takes 8 bytes until it is folded into the
    // histogram's buckets; unfolded, 100,000 calls held 1.1 MB.
    assert!(
        grown < 64 * 1024,
        "{calls} recorded invocations left {grown} more bytes held with no scrape"
    );
    // And the samples were counted, not dropped.
    let text = service.metrics_text();
    assert_eq!(
        sample(&text, "gust_invocation_duration_seconds_count"),
        110_000.0
    );
}
