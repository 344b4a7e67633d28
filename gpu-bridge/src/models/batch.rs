//! Dynamic batching: concurrent `embed` calls to one resident model, from
//! any invocations and tenants, coalesced into one forward pass.
//!
//! The first request into an empty queue starts a worker task. The worker
//! waits until the queue holds `max_batch` texts or the first request has
//! waited `max_delay`, runs the batch, hands each caller its rows, and goes
//! on while requests remain. The queue is bounded: a request that finds it
//! full is refused at once with `quota-exceeded` rather than waiting
//! without bound. A caller whose deadline passes stops waiting, and a batch
//! skips requests nobody waits for any more.
//!
//! The batch's activations are charged to the batcher's own account (the
//! batch size bounds them); its device time is split across the callers'
//! accounts in proportion to their texts, so time quotas still hold.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use crate::account::Account;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::models::manifest::Batching;
use crate::models::registry::ResidentModel;

type Embeddings = Vec<Vec<f32>>;

struct Request {
    texts: Vec<String>,
    account: Arc<Account>,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Embeddings>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Request>,
    waiting_texts: usize,
    worker_running: bool,
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forward passes run.
    pub batches: u64,
    /// Requests answered by them.
    pub requests: u64,
    /// Requests refused because the queue was full.
    pub refused: u64,
}

/// The batching queue of one resident model.
pub(crate) struct Batcher {
    config: Batching,
    queue: Mutex<Queue>,
    filled: Notify,
    stats: Mutex<BatchStats>,
    account: Arc<Account>,
}

impl Batcher {
    pub(crate) fn new(config: Batching, model_name: &str) -> Self {
        Self {
            config,
            queue: Mutex::new(Queue::default()),
            filled: Notify::new(),
            stats: Mutex::new(BatchStats::default()),
            account: Account::new(format!("batch {model_name}"), None, None),
        }
    }

    pub(crate) fn stats(&self) -> BatchStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn max_batch(&self) -> usize {
        (self.config.max_batch as usize).max(1)
    }

    /// Queue `texts` for `model` and wait for their embeddings. Needs a
    /// tokio runtime (the worker is a task of it).
    pub(crate) async fn embed(
        self: &Arc<Self>,
        model: &Arc<ResidentModel>,
        texts: Vec<String>,
        account: &Arc<Account>,
        deadline: Option<Instant>,
    ) -> Result<Embeddings> {
        account.check_time()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BridgeError::backend("batched embedding needs a tokio runtime to run its worker")
        })?;
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = self.queue();
            if queue.waiting.len() >= self.config.queue_limit() {
                drop(queue);
                self.stats
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .refused += 1;
                return Err(BridgeError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "model `{}`: the batch queue is full ({} requests waiting); retry later",
                        model.name(),
                        self.config.queue_limit()
                    ),
                ));
            }
            queue.waiting_texts += texts.len();
            queue.waiting.push_back(Request {
                texts,
                account: Arc::clone(account),
                deadline,
                enqueued: Instant::now(),
                reply,
            });
            if queue.waiting_texts >= self.max_batch() {
                self.filled.notify_one();
            }
            if !queue.worker_running {
                queue.worker_running = true;
                runtime.spawn(Arc::clone(self).work(Arc::clone(model)));
            }
        }
        let answer = async {
            answer.await.map_err(|_| {
                BridgeError::backend(format!(
                    "model `{}`: the batch worker stopped without an answer",
                    model.name()
                ))
            })?
        };
        match deadline {
            None => answer.await,
            Some(deadline) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), answer)
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(BridgeError::new(
                        ErrorCode::Timeout,
                        format!(
                            "model `{}`: the call's deadline passed while waiting for a batch",
                            model.name()
                        ),
                    )),
                }
            }
        }
    }

    /// Run batches until the queue is empty.
    async fn work(self: Arc<Self>, model: Arc<ResidentModel>) {
        let delay = Duration::from_millis(self.config.max_delay_ms);
        loop {
            let first_arrival = {
                let mut queue = self.queue();
                match queue.waiting.front() {
                    Some(first) => first.enqueued,
                    None => {
                        queue.worker_running = false;
                        return;
                    }
                }
            };
            let fill_by = tokio::time::Instant::from_std(first_arrival + delay);
            let full = { self.queue().waiting_texts >= self.max_batch() };
            if !full {
                // Woken early when enough texts arrive; a stale wake-up only
                // means the batch is taken a little early.
                let _ = tokio::time::timeout_at(fill_by, self.filled.notified()).await;
            }
            let batch = self.take_batch();
            if batch.is_empty() {
                continue;
            }
            self.run(&model, batch).await;
        }
    }

    /// Up to `max_batch` texts of live requests, oldest first (always at
    /// least one request); requests past their deadline are answered here.
    fn take_batch(&self) -> Vec<Request> {
        let now = Instant::now();
        let mut queue = self.queue();
        let mut batch: Vec<Request> = Vec::new();
        let mut texts = 0;
        while let Some(next) = queue.waiting.front() {
            if !batch.is_empty() && texts + next.texts.len() > self.max_batch() {
                break;
            }
            let Some(request) = queue.waiting.pop_front() else {
                break;
            };
            queue.waiting_texts -= request.texts.len();
            if request.reply.is_closed() {
                continue;
            }
            if request.deadline.is_some_and(|d| d <= now) {
                let _ = request.reply.send(Err(BridgeError::new(
                    ErrorCode::Timeout,
                    "the call's deadline passed while waiting for a batch",
                )));
                continue;
            }
            texts += request.texts.len();
            batch.push(request);
        }
        batch
    }

    async fn run(&self, model: &ResidentModel, batch: Vec<Request>) {
        let texts: Vec<String> = batch.iter().flat_map(|r| r.texts.iter().cloned()).collect();
        let before = self.account.device_time();
        let result = model.embed_now(texts.clone(), &self.account).await;
        let spent = self.account.device_time().saturating_sub(before);
        {
            let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            stats.batches += 1;
            stats.requests += batch.len() as u64;
        }
        let total = texts.len().max(1) as u32;
        match result {
            Ok(mut rows) => {
                // Answered back to front so each caller's rows split off the
                // end without copying the others.
                for request in batch.into_iter().rev() {
                    let share = spent * request.texts.len() as u32 / total;
                    request.account.charge_time(share);
                    let mine = rows.split_off(rows.len().saturating_sub(request.texts.len()));
                    let _ = request.reply.send(Ok(mine));
                }
            }
            Err(error) => {
                for request in batch {
                    let _ = request.reply.send(Err(error.clone()));
                }
            }
        }
    }
}
