//! What recording invocations costs in memory, and that every record is
//! accounted for as written, pruned or failed (`benches/soak.sh` relies on
//! both).
//!
//! The test binary's global allocator counts, per thread, the bytes each
//! thread allocated that are still held, by whichever thread: a record is
//! built on the calling thread and freed on the record writer's, and must
//! still count as the caller's until it is freed. The bytes one test's
//! thread holds are measured across many recorded invocations, which no
//! other test's allocations can disturb.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use gust_host::runtime::Invocation;
use gust_host::service::{ServeConfig, Service, Started};
use gust_host::store::FunctionRecord;
use tempfile::TempDir;

/// Per-thread counts of live bytes, by slot; threads past the last slot
/// share slot 0, which no test reads. Slots are never reused, so a block
/// freed after its thread ended still finds its count.
const SLOTS: usize = 4096;
static LIVE: [AtomicIsize; SLOTS] = [const { AtomicIsize::new(0) }; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's slot, drawn at its first allocation.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

fn my_slot() -> usize {
    // `try_with`: allocations during thread teardown count in slot 0.
    SLOT.try_with(|slot| {
        if slot.get() == 0 {
            let drawn = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
            slot.set(if drawn < SLOTS { drawn } else { usize::MAX });
        }
        slot.get()
    })
    .ok()
    .filter(|&slot| slot < SLOTS)
    .unwrap_or(0)
}

/// The system allocator, with each block prefixed by a header naming the
/// slot of the thread that allocated it.
struct Counting;

/// The header's size for `layout`: a word for the slot, padded to keep the
/// block's alignment.
fn header(layout: Layout) -> usize {
    layout.align().max(std::mem::size_of::<usize>())
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

// SAFETY: every block is a `System` block of the caller's layout grown by
// `header(layout)` bytes (a multiple of its alignment) at the front, so the
// pointer handed out keeps the alignment asked for; the word just before it
// holds the slot, written at allocation and read back at free.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let extra = header(layout);
        let Ok(full) = Layout::from_size_align(layout.size() + extra, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `full` has a non-zero size.
        let base = unsafe { System.alloc(full) };
        if base.is_null() {
            return base;
        }
        let slot = my_slot();
        LIVE[slot].fetch_add(signed(layout.size()), Ordering::Relaxed);
        // SAFETY: `extra` is within the block and at least a word; the word
        // before the user pointer is aligned for `usize` (extra is a
        // multiple of the word size).
        unsafe {
            let user = base.add(extra);
            user.cast::<usize>().sub(1).write(slot);
            user
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let extra = header(layout);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe {
            let slot = ptr.cast::<usize>().sub(1).read();
            LIVE[slot].fetch_sub(signed(layout.size()), Ordering::Relaxed);
            let full = Layout::from_size_align_unchecked(layout.size() + extra, layout.align());
            System.dealloc(ptr.sub(extra), full);
        }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes this thread allocated that are still held.
fn held() -> isize {
    LIVE[my_slot()].load(Ordering::Relaxed)
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
        .deploy("demo", "hello", wasm.into(), Default::default())
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
        service
            .record(&function, &Started::now(), 500, &invocation)
            .await;
    }
    let ghost = FunctionRecord {
        name: "ghost".into(),
        ..function.clone()
    };
    service
        .record(&ghost, &Started::now(), 500, &invocation)
        .await;
    // Recording queues; the writer counts as it writes.
    service.settle_records();

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

/// A call does not wait for its record to be written, but a read after
/// the call's answer still finds it: reads wait for the writer to catch up.
#[tokio::test]
async fn a_read_after_recording_finds_every_record_though_calls_do_not_wait_for_the_write() {
    let (service, function, _dir) = service(1000).await;
    let invocation = Invocation::host_error("not run");
    let mut last = String::new();
    // A burst: the writer takes them in several batches, with a pause
    // after each, so most are still queued when the burst ends.
    for _ in 0..300 {
        let started = Started::now();
        service.record(&function, &started, 500, &invocation).await;
        last = started.id;
    }
    let newest = service.invocation("demo", &last).unwrap();
    assert_eq!(newest.id, last);
    assert_eq!(newest.status, 500);
    let (kept, _) = service.invocations("demo", "hello", 1000, None).unwrap();
    assert_eq!(kept.len(), 300);
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
        service
            .record(&ghost, &Started::now(), 500, &invocation)
            .await;
    }
    service.settle_records();
    let before = held();
    let calls = 100_000;
    for _ in 0..calls {
        service
            .record(&ghost, &Started::now(), 500, &invocation)
            .await;
    }
    // What is still queued is the writer's to free, not held for good.
    service.settle_records();
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
