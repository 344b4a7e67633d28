//! The invocation-record writer: one thread of its own writes every record,
//! in the order calls finished.
//!
//! A record is written after each call, so the writes come at the rate
//! calls finish. On the async threads they would stall every request those
//! threads poll whenever sled waits for log space; on the blocking pool
//! each would take a thread and contend for the store's write lock. One
//! writer thread takes the lock uncontended, and a full queue makes the
//! finishing calls wait (a task waiting, not a thread) instead of growing.
//!
//! What queues up while a write is under way is written next as one batch
//! ([`MetaStore::record_invocations`]): on PostgreSQL one transaction for
//! many records.
//!
//! A call only waits for room in the queue ([`Recorder::queue`]), never for
//! the write: the record is written off the request path, in batches as
//! large as the load makes them, and the writer counts (and logs) what the
//! store said. Waiting for the write cost the embedded store's calls two
//! thread wake-ups each (the writer's, then the call's), more than the
//! write itself under load. A read that must see every record of the calls
//! answered before it waits instead ([`Recorder::settle`]): reads are rare,
//! calls are not.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;
use crate::store::{InvocationRecord, MetaStore, StoreError};

/// Records waiting to be written, at most: beyond it, calls wait to queue.
const QUEUE: usize = 1024;

/// Records written in one batch at most.
const BATCH: usize = 256;

/// How long the writer lets records gather after a batch that was not
/// full: under load, a wake-up of the writer every 2 ms at most instead of
/// one per call, while a read waits ([`Recorder::settle`]) at most this
/// much longer.
const GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// How often a batch is tried again when the store is out of reach, and
/// how long after each failure.
const RETRIES: usize = 10;
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// What the writer thread is sent.
enum Queued {
    /// Write this record (the writer counts it in the metrics).
    Record(Box<InvocationRecord>),
    /// Answer once everything queued before is written.
    Drain(oneshot::Sender<()>),
}

/// The handle to the writer thread; dropping it lets the thread finish the
/// queue and waits for it.
pub(super) struct Recorder {
    /// `None` only while dropping.
    queue: Option<mpsc::Sender<Queued>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Records dropped since the last warning, and when that was.
    dropped: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
    /// Records waiting for room in the queue ([`Recorder::queue`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// How far the writer has come: what [`Recorder::settle`] waits on.
    progress: Arc<Progress>,
}

/// Records queued and records written (or failed) so far. A record is
/// counted as it goes into the queue, under the same lock, so the count
/// order is the queue's order; the queue is first in, first out. Once
/// `written` reaches what `queued` was, every record queued before is
/// therefore in the store.
#[derive(Default)]
struct Progress {
    /// Records put in the queue; held while one is put in.
    queued: std::sync::Mutex<u64>,
    /// Records the writer is done with, and its signal when that grows.
    written: std::sync::Mutex<u64>,
    advanced: std::sync::Condvar,
}

impl Progress {
    /// Puts `record` in the queue through `permit`, counted.
    fn put(&self, permit: mpsc::Permit<'_, Queued>, record: InvocationRecord) {
        let mut queued = self
            .queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        permit.send(Queued::Record(Box::new(record)));
        *queued += 1;
    }

    fn wrote(&self, count: usize) {
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *written = written.saturating_add(count as u64);
        self.advanced.notify_all();
    }
}

/// Records that may wait for room in the queue at most (a few MiB): calls
/// whose answers do not wait for their records (a wasi:http call answers
/// before its guest is done) could otherwise pile them up without bound
/// when the store is slower than the calls for long.
const MAX_WAITING: usize = 16_384;

/// Warnings of dropped records come at most this often.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Recorder {
    /// Starts the writer thread on `store`; records nobody waits for are
    /// counted in `metrics`.
    pub(super) fn start(store: Arc<dyn MetaStore>, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (queue, mut queued) = mpsc::channel(QUEUE);
        let progress = Arc::new(Progress::default());
        let written = Arc::clone(&progress);
        let writer = std::thread::Builder::new()
            .name("gust-records".into())
            .spawn(move || {
                let mut batch = Batch {
                    store,
                    metrics,
                    records: Vec::with_capacity(BATCH),
                    progress: written,
                };
                while let Some(first) = queued.blocking_recv() {
                    let mut next = Some(first);
                    while let Some(item) = next {
                        match item {
                            Queued::Record(record) => batch.records.push(*record),
                            Queued::Drain(done) => {
                                // Everything queued before it is written
                                // before it is answered.
                                batch.write();
                                let _ = done.send(());
                            }
                        }
                        next = if batch.records.len() < BATCH {
                            queued.try_recv().ok()
                        } else {
                            None
                        };
                    }
                    let taken = batch.records.len();
                    batch.write();
                    // Calls do not wait for their records, so the writer
                    // need not start on each as it comes: it lets the next
                    // batch gather. Under load that is one wake-up of this
                    // thread per pause instead of one per call; a lone
                    // call's record still goes at once. Not after a full
                    // batch: more is waiting.
                    if taken > 0 && taken < BATCH {
                        std::thread::sleep(GATHER);
                    }
                }
            })?;
        Ok(Self {
            queue: Some(queue),
            writer: Some(writer),
            dropped: std::sync::Mutex::new((0, None)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            progress,
        })
    }

    /// Counts a dropped record; every [`WARN_EVERY`], how many were dropped
    /// since the last time it said (so that a flood of them logs a line a
    /// second, not a line a record).
    pub(super) fn dropped(&self) -> Option<u64> {
        let mut dropped = self
            .dropped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        dropped.0 += 1;
        if dropped.1.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return None;
        }
        let count = std::mem::take(&mut dropped.0);
        dropped.1 = Some(std::time::Instant::now());
        Some(count)
    }

    /// Queues `record`, waiting for room but not for the write (counted by
    /// the writer); false if the writer has stopped, or if [`MAX_WAITING`]
    /// records already wait for room (the store is far behind the calls:
    /// records are dropped, and counted, rather than piling up in memory).
    pub(super) async fn queue(&self, record: InvocationRecord) -> bool {
        let Some(queue) = &self.queue else {
            return false;
        };
        if let Ok(permit) = queue.try_reserve() {
            self.progress.put(permit, record);
            return true;
        }
        let waiting = self
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let permit = if waiting < MAX_WAITING {
            queue.reserve().await.ok()
        } else {
            None
        };
        self.waiting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        match permit {
            Some(permit) => {
                self.progress.put(permit, record);
                true
            }
            None => false,
        }
    }

    /// Queues `record` without waiting even for room; false if the queue
    /// is full or the writer has stopped.
    pub(super) fn queue_now(&self, record: InvocationRecord) -> bool {
        match self.queue.as_ref().map(mpsc::Sender::try_reserve) {
            Some(Ok(permit)) => {
                self.progress.put(permit, record);
                true
            }
            _ => false,
        }
    }

    /// Waits (blocking the thread, at most `within`) until every record
    /// queued before this call is written or has failed; false if it gave
    /// up. Cheap when the writer has caught up: two locks.
    pub(super) fn settle(&self, within: std::time::Duration) -> bool {
        let target = *self
            .progress
            .queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let written = self
            .progress
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (_written, waited) = self
            .progress
            .advanced
            .wait_timeout_while(written, within, |written| *written < target)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !waited.timed_out()
    }

    /// Waits until every record queued so far is written.
    pub(super) async fn drain(&self) {
        let (done, drained) = oneshot::channel();
        if let Some(queue) = &self.queue
            && queue.send(Queued::Drain(done)).await.is_ok()
        {
            let _ = drained.await;
        }
    }
}

/// What the writer has taken from the queue and not written yet.
struct Batch {
    store: Arc<dyn MetaStore>,
    metrics: Arc<Metrics>,
    records: Vec<InvocationRecord>,
    progress: Arc<Progress>,
}

impl Batch {
    /// Writes the records as one batch and counts each; leaves the batch
    /// empty.
    fn write(&mut self) {
        if self.records.is_empty() {
            return;
        }
        let mut answers = self.store.record_invocations(&self.records);
        // A store out of reach may be back soon: the same batch again, a
        // few times, while the queue fills behind it (then calls wait, or,
        // with the store known out of reach, their records are dropped).
        for _ in 0..RETRIES {
            let unreachable = answers
                .iter()
                .all(|answer| answer.as_ref().is_err_and(StoreError::is_unavailable));
            if !unreachable {
                break;
            }
            std::thread::sleep(RETRY_AFTER);
            answers = self.store.record_invocations(&self.records);
        }
        let mut failed: Option<(usize, StoreError)> = None;
        for (answer, record) in answers.into_iter().zip(&self.records) {
            match answer {
                Ok(pruned) => self.metrics.record_written(pruned),
                Err(error) => {
                    self.metrics.record_failed();
                    match &mut failed {
                        Some((count, _)) => *count += 1,
                        None => {
                            tracing::error!(invocation = %record.id, %error, "could not record the invocation");
                            failed = Some((1, error));
                        }
                    }
                }
            }
        }
        if let Some((count, error)) = failed.filter(|(count, _)| *count > 1) {
            tracing::error!(count, %error, "could not record these invocations either");
        }
        self.progress.wrote(self.records.len());
        self.records.clear();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written the rest;
        // joined so that the store is closed when the service is gone.
        self.queue = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}
