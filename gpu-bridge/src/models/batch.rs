//! Dynamic batching: concurrent `embed` and `run` calls to one resident
//! model, from any invocations and tenants, coalesced into one forward pass.
//!
//! The first request into an empty queue starts a worker task. The worker
//! waits until the queue holds `max_batch` rows (texts, or entries of an
//! input's first dimension) or the first request has waited `max_delay`,
//! runs a batch, hands each caller its rows, and goes on while requests
//! remain. A batch is the oldest live request and the later ones that can
//! share its forward pass (same [`Key`]); the others wait for a later batch.
//! The queue is bounded: a request that finds it full is refused at once
//! with `quota-exceeded` rather than waiting without bound. A caller whose
//! deadline passes stops waiting, and a batch skips requests nobody waits
//! for any more.
//!
//! The batch's activations are charged to the batcher's own account (the
//! batch size bounds them); its device time is split across the callers'
//! accounts in proportion to their rows, so time quotas still hold. The
//! tensors a caller gets back from `run` are cut out of the batch's outputs
//! on the caller's own account. A batch of one request runs on the caller's
//! account, exactly as an unbatched call would.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use crate::account::Account;
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::models::bert::Tokens;
use crate::models::manifest::Batching;
use crate::models::registry::ResidentModel;
use crate::models::runner::{self, Runner};

type Embeddings = Vec<Vec<f32>>;
type Outputs = Vec<(String, Tensor)>;

/// What one caller asks of the model.
pub(crate) enum Work {
    /// Texts to embed.
    Embed(Vec<String>),
    /// A bert `run`: token ids and masks, already read and checked on the
    /// caller's side so a bad input fails its own call only.
    Encode(Tokens),
    /// A generic graph's inputs, in the order its manifest names them, all
    /// with the same first dimension (see [`runner::graph_batch_key`]).
    Graph(Vec<Tensor>),
}

/// Which requests can share a forward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key {
    Embed,
    /// Bert runs always can: shorter inputs are padded with masked
    /// positions, which no real token attends to.
    Encode,
    /// Graph runs whose inputs agree in dtype and in every dimension but
    /// the first, in graph input order.
    Graph(Vec<(DType, Vec<usize>)>),
}

impl Work {
    fn key(&self) -> Key {
        match self {
            Work::Embed(_) => Key::Embed,
            Work::Encode(_) => Key::Encode,
            Work::Graph(inputs) => Key::Graph(
                inputs
                    .iter()
                    .map(|t| (t.dtype(), t.shape().get(1..).unwrap_or_default().to_vec()))
                    .collect(),
            ),
        }
    }

    /// Rows the request adds to a batch: what `max_batch` counts.
    fn rows(&self) -> usize {
        match self {
            Work::Embed(texts) => texts.len(),
            Work::Encode(tokens) => tokens.texts,
            Work::Graph(inputs) => inputs
                .first()
                .and_then(|t| t.shape().first().copied())
                .unwrap_or(0),
        }
    }
}

/// The answer to one request.
enum Answer {
    Embeddings(Embeddings),
    Outputs(Outputs),
}

struct Request {
    work: Work,
    rows: usize,
    key: Key,
    account: Arc<Account>,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Answer>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Request>,
    /// Rows of every waiting request, whatever its key.
    waiting_rows: usize,
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
        match self
            .submit(model, Work::Embed(texts), account, deadline)
            .await?
        {
            Answer::Embeddings(rows) => Ok(rows),
            Answer::Outputs(_) => Err(mixed_up(model)),
        }
    }

    /// Queue a `run` for `model` and wait for its outputs. Needs a tokio
    /// runtime (the worker is a task of it).
    pub(crate) async fn run(
        self: &Arc<Self>,
        model: &Arc<ResidentModel>,
        work: Work,
        account: &Arc<Account>,
        deadline: Option<Instant>,
    ) -> Result<Outputs> {
        match self.submit(model, work, account, deadline).await? {
            Answer::Outputs(outputs) => Ok(outputs),
            Answer::Embeddings(_) => Err(mixed_up(model)),
        }
    }

    async fn submit(
        self: &Arc<Self>,
        model: &Arc<ResidentModel>,
        work: Work,
        account: &Arc<Account>,
        deadline: Option<Instant>,
    ) -> Result<Answer> {
        account.check_time()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BridgeError::backend("a batched call needs a tokio runtime to run its worker")
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
            let rows = work.rows();
            queue.waiting_rows += rows;
            queue.waiting.push_back(Request {
                key: work.key(),
                rows,
                work,
                account: Arc::clone(account),
                deadline,
                enqueued: Instant::now(),
                reply,
            });
            if queue.waiting_rows >= self.max_batch() {
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
            let full = { self.queue().waiting_rows >= self.max_batch() };
            if !full {
                // Woken early when enough rows arrive; a stale wake-up (or
                // rows of requests that cannot share this batch) only means
                // the batch is taken a little early.
                let _ = tokio::time::timeout_at(fill_by, self.filled.notified()).await;
            }
            let batch = self.take_batch();
            if batch.is_empty() {
                continue;
            }
            self.execute(&model, batch).await;
        }
    }

    /// Up to `max_batch` rows of live requests that share the oldest live
    /// request's key, oldest first (always at least one request); requests
    /// past their deadline are answered here, and requests with another key
    /// keep their place for a later batch.
    fn take_batch(&self) -> Vec<Request> {
        let now = Instant::now();
        let mut queue = self.queue();
        let mut batch: Vec<Request> = Vec::new();
        let mut rows = 0;
        let mut kept = VecDeque::with_capacity(queue.waiting.len());
        while let Some(request) = queue.waiting.pop_front() {
            if request.reply.is_closed() {
                queue.waiting_rows -= request.rows;
                continue;
            }
            if request.deadline.is_some_and(|d| d <= now) {
                queue.waiting_rows -= request.rows;
                let _ = request.reply.send(Err(BridgeError::new(
                    ErrorCode::Timeout,
                    "the call's deadline passed while waiting for a batch",
                )));
                continue;
            }
            if batch.first().is_some_and(|first| first.key != request.key) {
                kept.push_back(request);
                continue;
            }
            if !batch.is_empty() && rows + request.rows > self.max_batch() {
                // Later requests do not jump ahead of one that no longer
                // fits: it leads the next batch.
                kept.push_back(request);
                break;
            }
            queue.waiting_rows -= request.rows;
            rows += request.rows;
            batch.push(request);
        }
        kept.append(&mut queue.waiting);
        queue.waiting = kept;
        batch
    }

    async fn execute(&self, model: &ResidentModel, batch: Vec<Request>) {
        {
            let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            stats.batches += 1;
            stats.requests += batch.len() as u64;
        }
        match batch.first().map(|r| &r.key) {
            Some(Key::Embed) => self.embed_batch(model, batch).await,
            Some(Key::Encode | Key::Graph(_)) => self.run_batch(model, batch).await,
            None => {}
        }
    }

    /// Charge each request its share of the device time `spent` on a batch
    /// of `total` rows.
    fn share(spent: Duration, request: &Request, total: usize) {
        let share = spent * request.rows as u32 / total.max(1) as u32;
        request.account.charge_time(share);
    }

    async fn embed_batch(&self, model: &ResidentModel, batch: Vec<Request>) {
        let texts: Vec<String> = batch
            .iter()
            .flat_map(|r| match &r.work {
                Work::Embed(texts) => texts.clone(),
                Work::Encode(_) | Work::Graph(_) => Vec::new(),
            })
            .collect();
        let before = self.account.device_time();
        let result = model.embed_now(texts.clone(), &self.account).await;
        let spent = self.account.device_time().saturating_sub(before);
        match result {
            Ok(mut rows) => {
                // Answered back to front so each caller's rows split off the
                // end without copying the others.
                for request in batch.into_iter().rev() {
                    Self::share(spent, &request, texts.len());
                    let mine = rows.split_off(rows.len().saturating_sub(request.rows));
                    let _ = request.reply.send(Ok(Answer::Embeddings(mine)));
                }
            }
            Err(error) => {
                for request in batch {
                    let _ = request.reply.send(Err(error.clone()));
                }
            }
        }
    }

    async fn run_batch(&self, model: &ResidentModel, mut batch: Vec<Request>) {
        if batch.len() == 1 {
            // Nothing to share: the call runs as it would unbatched, on its
            // own account, and gets the outputs themselves rather than
            // copies cut out of them.
            if let Some(request) = batch.pop() {
                let result = run_alone(model, request.work, &request.account).await;
                let _ = request.reply.send(result.map(Answer::Outputs));
            }
            return;
        }
        let before = self.account.device_time();
        let result = run_joined(model, &batch, &self.account).await;
        let spent = self.account.device_time().saturating_sub(before);
        let total: usize = batch.iter().map(|r| r.rows).sum();
        match result {
            Ok(joined) => {
                let mut offset = 0;
                for request in batch {
                    Self::share(spent, &request, total);
                    let mine = joined.split(model, &request, offset).await;
                    offset += request.rows;
                    let _ = request.reply.send(mine.map(Answer::Outputs));
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

fn mixed_up(model: &ResidentModel) -> BridgeError {
    BridgeError::backend(format!(
        "model `{}`: the batch worker answered a call with another call's kind of result",
        model.name()
    ))
}

/// One request's `run`, unbatched, on its own account.
async fn run_alone(model: &ResidentModel, work: Work, account: &Arc<Account>) -> Result<Outputs> {
    match (&model.runner, work) {
        (Runner::Bert(bert), Work::Encode(tokens)) => {
            bert.run_tokens(model.device(), &tokens, account).await
        }
        (Runner::Graph(graph), Work::Graph(inputs)) => {
            runner::run_graph(model, graph, &inputs, account).await
        }
        _ => Err(mixed_up(model)),
    }
}

/// The outputs of a batch of `run`s, before they are cut up per caller.
enum Joined {
    /// Bert: the last hidden state `[texts, longest, hidden]` and the
    /// sentence embeddings, one row per text.
    Encode {
        hidden: Tensor,
        embeddings: Embeddings,
    },
    /// A graph's outputs, the callers' rows one after another along dim 0.
    Graph(Outputs),
}

async fn run_joined(
    model: &ResidentModel,
    batch: &[Request],
    account: &Arc<Account>,
) -> Result<Joined> {
    match &model.runner {
        Runner::Bert(bert) => {
            let parts = batch
                .iter()
                .map(|r| match &r.work {
                    Work::Encode(tokens) => Ok(tokens),
                    Work::Embed(_) | Work::Graph(_) => Err(mixed_up(model)),
                })
                .collect::<Result<Vec<&Tokens>>>()?;
            let joined = Tokens::join(&parts);
            let (hidden, embeddings) = bert.encode_tokens(model.device(), &joined, account).await?;
            Ok(Joined::Encode { hidden, embeddings })
        }
        Runner::Graph(graph) => {
            let parts = batch
                .iter()
                .map(|r| match &r.work {
                    Work::Graph(inputs) => Ok(inputs),
                    Work::Embed(_) | Work::Encode(_) => Err(mixed_up(model)),
                })
                .collect::<Result<Vec<&Vec<Tensor>>>>()?;
            let device = model.device();
            let mut inputs = Vec::with_capacity(graph.inputs.len());
            for i in 0..graph.inputs.len() {
                let column = parts
                    .iter()
                    .map(|p| p.get(i).ok_or_else(|| mixed_up(model)))
                    .collect::<Result<Vec<&Tensor>>>()?;
                inputs.push(
                    device
                        .run(&crate::op::Op::Concat { dim: 0 }, &column, account)
                        .await?,
                );
            }
            Ok(Joined::Graph(
                runner::run_graph(model, graph, &inputs, account).await?,
            ))
        }
        _ => Err(mixed_up(model)),
    }
}

impl Joined {
    /// `request`'s rows, which start at row `offset` of the batch, as
    /// tensors of its own (charged to its account).
    async fn split(
        &self,
        model: &ResidentModel,
        request: &Request,
        offset: usize,
    ) -> Result<Outputs> {
        let device = model.device();
        let account = &request.account;
        let slice = |x: &Tensor, dim: i32, start: usize, len: usize| {
            let op = crate::op::Op::Slice {
                dim,
                start: start as u32,
                len: len as u32,
            };
            let x = x.clone();
            async move { device.run(&op, &[&x], account).await }
        };
        match (self, &request.work) {
            (Joined::Encode { hidden, embeddings }, Work::Encode(tokens)) => {
                let Runner::Bert(bert) = &model.runner else {
                    return Err(mixed_up(model));
                };
                let mut mine = slice(hidden, 0, offset, request.rows).await?;
                // Padding added for longer requests is cut off again: the
                // caller gets the shape it would have got alone.
                if hidden.shape().get(1).is_some_and(|&s| s > tokens.positions) {
                    mine = slice(&mine, 1, 0, tokens.positions).await?;
                }
                let rows = embeddings
                    .get(offset..offset + request.rows)
                    .ok_or_else(|| mixed_up(model))?;
                bert.outputs(device, mine, rows, account).await
            }
            (Joined::Graph(outputs), Work::Graph(_)) => {
                let mut mine = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    mine.push((name.clone(), slice(tensor, 0, offset, request.rows).await?));
                }
                Ok(mine)
            }
            _ => Err(mixed_up(model)),
        }
    }
}
