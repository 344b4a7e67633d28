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
//! ([`MetaStore::record_invocations`]): on PostgreSQL one round trip for
//! many records, so the writer keeps up with the calls however far away
//! the database is.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{InvocationRecord, MetaStore, StoreError};

/// Records waiting to be written, at most: beyond it, calls wait to queue.
const QUEUE: usize = 1024;

/// Records written in one batch at most.
const BATCH: usize = 256;

/// How often a batch is tried again when the store is out of reach, and
/// how long after each failure.
const RETRIES: usize = 10;
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// What the writer thread is sent.
enum Queued {
    /// Write this record and answer with what the store said.
    Record(
        Box<InvocationRecord>,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    /// Answer once everything queued before is written.
    Drain(oneshot::Sender<()>),
}

/// The handle to the writer thread; dropping it lets the thread finish the
/// queue and waits for it.
pub(super) struct Recorder {
    /// `None` only while dropping.
    queue: Option<mpsc::Sender<Queued>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    /// Starts the writer thread on `store`.
    pub(super) fn start(store: Arc<dyn MetaStore>) -> std::io::Result<Self> {
        let (queue, mut queued) = mpsc::channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("gust-records".into())
            .spawn(move || {
                let mut records = Vec::with_capacity(BATCH);
                let mut acks = Vec::with_capacity(BATCH);
                while let Some(first) = queued.blocking_recv() {
                    let mut next = Some(first);
                    while let Some(item) = next {
                        match item {
                            Queued::Record(record, done) => {
                                records.push(*record);
                                acks.push(done);
                            }
                            Queued::Drain(done) => {
                                // Everything queued before it is written
                                // before it is answered.
                                write(store.as_ref(), &mut records, &mut acks);
                                let _ = done.send(());
                            }
                        }
                        next = if records.len() < BATCH {
                            queued.try_recv().ok()
                        } else {
                            None
                        };
                    }
                    write(store.as_ref(), &mut records, &mut acks);
                }
            })?;
        Ok(Self {
            queue: Some(queue),
            writer: Some(writer),
        })
    }

    /// Writes `record` and returns how many older records retention pruned
    /// for it, once it is in the store (so that a read after the call's
    /// answer finds it); `None` if the writer has stopped.
    pub(super) async fn write(&self, record: InvocationRecord) -> Option<Result<u64, StoreError>> {
        let (done, written) = oneshot::channel();
        self.queue
            .as_ref()?
            .send(Queued::Record(Box::new(record), done))
            .await
            .ok()?;
        written.await.ok()
    }

    /// Queues `record` without waiting for it to be written (nor for room
    /// in the queue); false if the queue is full or the writer has stopped.
    pub(super) fn write_detached(&self, record: InvocationRecord) -> bool {
        let (done, _) = oneshot::channel();
        self.queue.as_ref().is_some_and(|queue| {
            queue
                .try_send(Queued::Record(Box::new(record), done))
                .is_ok()
        })
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

/// Writes `records` as one batch and answers each one's `acks`; leaves
/// both empty.
fn write(
    store: &dyn MetaStore,
    records: &mut Vec<InvocationRecord>,
    acks: &mut Vec<oneshot::Sender<Result<u64, StoreError>>>,
) {
    if records.is_empty() {
        return;
    }
    let mut answers = store.record_invocations(records);
    // A store out of reach may be back soon: the same batch again, a few
    // times, while the queue fills behind it (then calls wait, or, with
    // the store known out of reach, their records are dropped).
    for _ in 0..RETRIES {
        let unreachable = answers
            .iter()
            .all(|answer| answer.as_ref().is_err_and(StoreError::is_unavailable));
        if !unreachable {
            break;
        }
        std::thread::sleep(RETRY_AFTER);
        answers = store.record_invocations(records);
    }
    records.clear();
    for (done, answer) in acks.drain(..).zip(answers) {
        let _ = done.send(answer);
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
