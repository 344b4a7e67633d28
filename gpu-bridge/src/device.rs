//! One worker thread per device, and the tensors that live on it.
//!
//! A [`Device`] owns its backend on a dedicated thread fed by a bounded
//! queue, so no executor thread ever blocks on a kernel, a copy or a driver
//! call. Ops are *pipelined*: `run` validates, reserves the output's memory
//! and an estimate of its device time, queues the kernel and returns the
//! new tensor at once, without waiting for the device, as CUDA streams and
//! PyTorch do. Only `read` (and `synchronize`) wait, and a failure on the
//! device (a driver error, an allocation the backend refused, a panic)
//! surfaces there, or in any op that uses the failed tensor.
//!
//! The queue is shared fairly: each tenant (top-level [`Account`]) has its
//! own lane and the worker serves lanes in turn by estimated device time
//! (see `device/queue.rs`), so one tenant's backlog does not delay
//! another's ops. A tenant's jobs run in the order it queued them, and a
//! job that reads a tensor another tenant's job computes waits for that
//! job, so a kernel always finds its inputs computed. A tenant whose lane
//! is full waits for room (backpressure) without holding up the others.
//!
//! An op is refused with `quota-exceeded` before it is queued when its
//! estimated device time (its multiply-adds or elements, at the rate this
//! device has been measured to run them) does not fit its account's time
//! budget. A panic in a kernel fails that op with `internal` and the worker
//! goes on serving.
//!
//! Tensor data is shared immutably (`Arc`): views such as `reshape` reuse the
//! buffer, and the buffer — with its device bytes and its owner's quota — is
//! freed when the last tensor that uses it is dropped, on whatever thread
//! that happens. A queued kernel whose result nobody holds any more (its
//! invocation trapped or timed out) is skipped.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::account::{Account, TimeReservation};
use crate::backend::{Backend, BackendKind, DeviceDescription};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, KernelPanicked, Result, contain};
use crate::kernel::Kernel;
use crate::op::{Op, Operand, Work, element_count};

mod queue;

use queue::Lanes;

/// How long an idle worker keeps polling its queue before it sleeps. A
/// guest chaining small ops submits the next one within microseconds; a
/// sleeping worker would add a futex wake-up to every op.
const WORKER_SPIN: Duration = Duration::from_micros(50);

/// How long a caller polls for its answer before it yields to its executor.
/// A tiny op on a spinning worker answers in well under a microsecond, and
/// parking then waking the caller's thread costs several; anything slower
/// than this is awaited normally, so the executor is never held longer.
const CALLER_SPIN: Duration = Duration::from_micros(5);

type AnyBuffer = Box<dyn Any + Send + Sync>;

/// [`Backend`] with its buffer type erased, so one worker and one tensor type
/// serve every backend.
trait ErasedBackend {
    fn alloc(&mut self, bytes: usize) -> Result<AnyBuffer>;
    fn upload(&mut self, data: &[u8]) -> Result<AnyBuffer>;
    fn download(&mut self, buffer: &(dyn Any + Send + Sync), bytes: usize) -> Result<Vec<u8>>;
    fn run(
        &mut self,
        kernel: &Kernel,
        inputs: &[&(dyn Any + Send + Sync)],
        output: &mut (dyn Any + Send + Sync),
    ) -> Result<()>;
    fn synchronize(&mut self) -> Result<()>;
}

fn foreign() -> BridgeError {
    BridgeError::invalid("tensor belongs to another device")
}

impl<B: Backend> ErasedBackend for B {
    fn alloc(&mut self, bytes: usize) -> Result<AnyBuffer> {
        Ok(Box::new(Backend::alloc(self, bytes)?))
    }

    fn upload(&mut self, data: &[u8]) -> Result<AnyBuffer> {
        Ok(Box::new(Backend::upload(self, data)?))
    }

    fn download(&mut self, buffer: &(dyn Any + Send + Sync), bytes: usize) -> Result<Vec<u8>> {
        let buffer = buffer.downcast_ref::<B::Buffer>().ok_or_else(foreign)?;
        Backend::download(self, buffer, bytes)
    }

    fn run(
        &mut self,
        kernel: &Kernel,
        inputs: &[&(dyn Any + Send + Sync)],
        output: &mut (dyn Any + Send + Sync),
    ) -> Result<()> {
        let inputs = inputs
            .iter()
            .map(|b| b.downcast_ref::<B::Buffer>().ok_or_else(foreign))
            .collect::<Result<Vec<_>>>()?;
        let output = output.downcast_mut::<B::Buffer>().ok_or_else(foreign)?;
        Backend::run(self, kernel, &inputs, output)
    }

    fn synchronize(&mut self) -> Result<()> {
        Backend::synchronize(self)
    }
}

/// What a queued job does with the backend.
type JobFn = Box<dyn FnOnce(&mut dyn ErasedBackend) + Send>;

/// Work for the device's worker.
struct Job {
    run: JobFn,
    /// What the job reads: it waits until their producers have run (they
    /// may be queued in another tenant's lane).
    inputs: Vec<Arc<Storage>>,
    /// The job's place in its tenant's lane, given back once it has run.
    place: OwnedSemaphorePermit,
}

impl Job {
    fn is_ready(&self) -> bool {
        self.inputs.iter().all(|s| s.is_ready())
    }
}

/// The worker's queue: per-tenant lanes behind a lock, and how submitters
/// wait for room and the worker for work.
struct RunQueue {
    state: Mutex<QueueState>,
    /// Signalled when a job arrives for a sleeping worker, or the device
    /// closes.
    wake: Condvar,
    /// Jobs queued, readable without the lock, for the worker's spin.
    queued: AtomicUsize,
    /// Jobs each tenant may have queued at once.
    depth: usize,
}

struct QueueState {
    lanes: Lanes<Job>,
    /// Each tenant's places in the queue, while it has any taken or
    /// awaited (idle tenants are forgotten when the queue empties).
    places: HashMap<u64, Arc<Semaphore>>,
    /// The worker waits on `wake`: a submitter must signal it.
    sleeping: bool,
    /// The device is gone: no job will come, the worker stops once the
    /// lanes are empty.
    closed: bool,
}

impl RunQueue {
    fn new(depth: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                lanes: Lanes::default(),
                places: HashMap::new(),
                sleeping: false,
                closed: false,
            }),
            wake: Condvar::new(),
            queued: AtomicUsize::new(0),
            depth: depth.clamp(1, Semaphore::MAX_PERMITS),
        }
    }

    // Nothing panics while holding the lock (the lanes are plain data and
    // jobs run outside it), so a poisoned lock's state is whole.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The places of `tenant`'s lane.
    fn places(&self, tenant: u64) -> Arc<Semaphore> {
        let mut state = self.lock();
        Arc::clone(
            state
                .places
                .entry(tenant)
                .or_insert_with(|| Arc::new(Semaphore::new(self.depth))),
        )
    }

    fn push(&self, tenant: u64, job: Job, cost: Duration) {
        let mut state = self.lock();
        let nanos = u64::try_from(cost.as_nanos()).unwrap_or(u64::MAX);
        state.lanes.push(tenant, job, nanos);
        self.queued.fetch_add(1, Ordering::AcqRel);
        if state.sleeping {
            self.wake.notify_one();
        }
    }

    fn pop(&self, state: &mut QueueState) -> Option<Job> {
        let (_, job) = state.lanes.pop(Job::is_ready)?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(job)
    }

    /// The next job, sleeping until one comes; `None` once the device is
    /// gone and its queue empty.
    fn wait_next(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = self.pop(&mut state) {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state.sleeping = true;
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.sleeping = false;
        }
    }

    /// The next job if one comes within [`WORKER_SPIN`]; `None` when none
    /// does (the worker then sleeps in [`RunQueue::wait_next`]).
    fn poll_next(&self) -> Option<Job> {
        let until = Instant::now() + WORKER_SPIN;
        loop {
            if self.queued.load(Ordering::Acquire) > 0 {
                return self.pop(&mut self.lock());
            }
            if Instant::now() >= until {
                return None;
            }
            std::hint::spin_loop();
        }
    }

    /// Forget the places of tenants with nothing queued, taken or awaited
    /// (only the map holds their semaphore), so the map holds the tenants
    /// that are busy rather than every tenant ever seen.
    fn forget_idle(&self) {
        let mut state = self.lock();
        state
            .places
            .retain(|_, places| Arc::strong_count(places) > 1);
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.wake.notify_one();
    }
}

/// How much work an op is, for estimating its device time.
#[derive(Debug, Clone, Copy)]
enum CostClass {
    /// Multiply-adds of a matrix product.
    MultiplyAdds = 0,
    /// Elements read and written by anything else (elementwise ops,
    /// reductions, copies, uploads and reads).
    Elements = 1,
}

/// Work below this many units is not measured: fixed costs (allocation,
/// dispatch) would dominate the rate. About 50-100 µs at the priors' rates
/// on a small CPU.
const LEARN_MIN_UNITS: [u64; 2] = [1 << 22, 1 << 16];

/// What ops cost on one device, in nanoseconds per unit of each
/// [`CostClass`], learned from the ops it runs: a moving average of
/// measured rates, starting from a prior.
///
/// The priors are deliberately fast, so an estimate made before the device
/// has measured anything is low: a low estimate only lets an op overrun its
/// budget (which the time it really took is then charged for), while a
/// high one would refuse work that fits. Unknown (GPU) devices start at
/// zero, which refuses nothing until measured.
#[derive(Debug)]
struct CostModel {
    /// `f64` bits, indexed by [`CostClass`].
    nanos_per_unit: [AtomicU64; 2],
}

impl CostModel {
    fn new(kind: BackendKind) -> Self {
        let (per_multiply_add, per_element) = match kind {
            // 500 G multiply-adds and 20 G elements a second: beyond any
            // CPU's gemm and memory bandwidth this bridge runs on.
            BackendKind::Cpu => (0.002, 0.05),
            BackendKind::Wgpu | BackendKind::Cuda => (0.0, 0.0),
        };
        Self {
            nanos_per_unit: [
                AtomicU64::new(f64::to_bits(per_multiply_add)),
                AtomicU64::new(f64::to_bits(per_element)),
            ],
        }
    }

    fn rate(&self, class: CostClass) -> f64 {
        f64::from_bits(self.nanos_per_unit[class as usize].load(Ordering::Relaxed))
    }

    /// The device time `units` of `class` are expected to take.
    fn estimate(&self, class: CostClass, units: u64) -> Duration {
        // A float-to-int `as` saturates, so a huge estimate stays huge.
        Duration::from_nanos((units as f64 * self.rate(class)) as u64)
    }

    /// Fold in that `units` of `class` took `spent`.
    fn learn(&self, class: CostClass, units: u64, spent: Duration) {
        if units < LEARN_MIN_UNITS[class as usize] {
            return;
        }
        let observed = spent.as_nanos() as f64 / units as f64;
        let old = self.rate(class);
        let new = if old == 0.0 {
            observed
        } else {
            old + (observed - old) / 4.0
        };
        // Racing learners (inline ops on callers' threads) may lose an
        // update; the average does not need every sample.
        self.nanos_per_unit[class as usize].store(new.to_bits(), Ordering::Relaxed);
    }
}

/// How a device worker is set up.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Jobs each tenant (top-level account) may have queued before its
    /// submitters wait for room; other tenants' lanes are separate.
    pub queue_depth: usize,
    /// Fill every op's output with NaN bytes before the kernel runs, so a
    /// kernel that leaves elements unwritten fails its tests instead of
    /// passing on zeroed memory. For testing backends; costs one fill per op.
    pub poison_outputs: bool,
    /// For devices started with [`Device::start_inline`]: work touching at
    /// most this many elements runs on the caller's thread instead of the
    /// worker's. Such a kernel takes about as long as the hand-off to the
    /// worker would (a microsecond or two), so the caller is held no longer
    /// than it would be waiting, and tiny ops skip two thread hops.
    pub inline_max_elements: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            queue_depth: 4096,
            poison_outputs: false,
            inline_max_elements: 4096,
        }
    }
}

/// A backend whose kernels are plain functions over host memory, so a
/// clone can run small jobs on any thread.
trait InlineRunner: Send + Sync {
    fn with_backend(&self, f: &mut dyn FnMut(&mut dyn ErasedBackend));
}

struct Inline<B>(B);

impl<B: Backend + Clone + Sync> InlineRunner for Inline<B> {
    fn with_backend(&self, f: &mut dyn FnMut(&mut dyn ErasedBackend)) {
        let mut backend = self.0.clone();
        f(&mut backend);
    }
}

struct DeviceInner {
    description: DeviceDescription,
    poison_outputs: bool,
    inline: Option<(Box<dyn InlineRunner>, usize)>,
    ordinal: u64,
    queue: Arc<RunQueue>,
    costs: Arc<CostModel>,
    used: AtomicU64,
    busy_nanos: AtomicU64,
    /// Jobs queued and not yet finished.
    pending: AtomicU64,
    /// The worker's end: it says so once it has dropped the backend.
    worker: WorkerEnd,
}

/// How a device's owner waits for its worker to finish: the backend (a
/// Vulkan or CUDA device, a thread pool) must be torn down while the
/// process is whole, not race `exit`'s teardown of the libraries it uses
/// (a host stopped with the wgpu device still closing on lavapipe crashed).
struct WorkerEnd {
    /// Set by the worker when it starts.
    thread: Arc<std::sync::OnceLock<std::thread::ThreadId>>,
    /// Receives once the backend is dropped.
    done: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long dropping the last handle of a device waits for its worker to
/// finish the job in hand and drop the backend.
const WORKER_STOP_WAIT: Duration = Duration::from_secs(10);

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // Every clone, tensor and queued job is gone: let the worker stop.
        self.queue.close();
        // Wait for it, unless this is the worker itself dropping the last
        // handle (from a job): it finishes on its own once it returns.
        if self.worker.thread.get() == Some(&std::thread::current().id()) {
            return;
        }
        let done = self
            .worker
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(WORKER_STOP_WAIT)
        {
            tracing::warn!(device = %self.description.name, "the device's worker did not stop in time");
        }
    }
}

impl DeviceInner {
    /// Charge `spent` device time for the work `time` was reserved for, and
    /// add it to this device's total.
    fn settle(&self, time: TimeReservation, spent: Duration) {
        time.settle(spent);
        self.busy_nanos.fetch_add(
            u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX),
            Ordering::AcqRel,
        );
    }

    fn reserve(&self, bytes: u64) -> Result<()> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|&n| n <= self.description.memory_bytes)
            })
            .map(|_| ())
            .map_err(|used| {
                BridgeError::new(
                    ErrorCode::OutOfMemory,
                    format!(
                        "{}: {bytes} bytes requested, {} of {} bytes free",
                        self.description.name,
                        self.description.memory_bytes.saturating_sub(used),
                        self.description.memory_bytes
                    ),
                )
            })
    }
}

/// A reservation of device bytes for one buffer: both the device's count
/// and the owner's quota, returned when dropped.
struct Charge {
    device: Arc<DeviceInner>,
    account: Arc<Account>,
    bytes: u64,
}

impl Charge {
    fn new(device: &Arc<DeviceInner>, account: &Arc<Account>, bytes: u64) -> Result<Self> {
        account.reserve(bytes)?;
        if let Err(e) = device.reserve(bytes) {
            account.release(bytes);
            return Err(e);
        }
        Ok(Self {
            device: Arc::clone(device),
            account: Arc::clone(account),
            bytes,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.device.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.account.release(self.bytes);
    }
}

/// A device buffer and the charge that pays for it. The buffer is set by
/// the job that computes it (at most once); field order matters: the buffer
/// is freed before the bytes are returned to the quotas.
struct Storage {
    buffer: OnceLock<Result<AnyBuffer>>,
    _charge: Charge,
}

impl Storage {
    fn pending(charge: Charge) -> Arc<Self> {
        Arc::new(Self {
            buffer: OnceLock::new(),
            _charge: charge,
        })
    }

    /// True once the producing job has run (successfully or not).
    fn is_ready(&self) -> bool {
        self.buffer.get().is_some()
    }

    /// The computed buffer, or why there is none.
    fn buffer(&self) -> Result<&(dyn Any + Send + Sync)> {
        match self.buffer.get() {
            Some(Ok(buffer)) => Ok(buffer.as_ref()),
            Some(Err(e)) => Err(BridgeError::new(
                e.code,
                format!(
                    "an earlier op on this tensor's inputs failed: {}",
                    e.message
                ),
            )),
            // Jobs run in queue order, so this means a job ran out of order.
            None => Err(BridgeError::backend(
                "tensor data used before it was computed",
            )),
        }
    }
}

/// A tensor on a device: an immutable, shareable handle.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    dtype: DType,
    shape: Arc<[usize]>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("device", &self.storage._charge.device.description.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl Tensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape (empty for a scalar).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of data (`len × dtype size`, or whole blocks of a quantized
    /// dtype).
    pub fn byte_len(&self) -> usize {
        let (per_block, block_bytes) = self.dtype.block();
        self.len() / per_block * block_bytes
    }

    fn operand(&self) -> Operand<'_> {
        Operand {
            dtype: self.dtype,
            shape: &self.shape,
        }
    }
}

/// A device with its worker thread. Cheap to clone; the worker stops when
/// the last clone and the last tensor on it are gone.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("description", &self.inner.description)
            .finish_non_exhaustive()
    }
}

static NEXT_ORDINAL: AtomicU64 = AtomicU64::new(0);

impl Device {
    /// Start a worker thread for `backend`.
    pub fn start<B: Backend>(backend: B, options: DeviceOptions) -> Result<Self> {
        Self::start_with(backend, options, None)
    }

    /// As [`Device::start`], for a backend whose kernels may also run on the
    /// caller's thread (the cpu backend): work up to
    /// `options.inline_max_elements` elements does.
    pub fn start_inline<B: Backend + Clone + Sync>(
        backend: B,
        options: DeviceOptions,
    ) -> Result<Self> {
        let inline: Box<dyn InlineRunner> = Box::new(Inline(backend.clone()));
        Self::start_with(
            backend,
            options,
            Some((inline, options.inline_max_elements)),
        )
    }

    fn start_with<B: Backend>(
        backend: B,
        options: DeviceOptions,
        inline: Option<(Box<dyn InlineRunner>, usize)>,
    ) -> Result<Self> {
        let queue_depth = options.queue_depth;
        let description = backend.describe();
        let ordinal = NEXT_ORDINAL.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(RunQueue::new(queue_depth));
        let jobs = Arc::clone(&queue);
        let backend_pool = backend.worker_pool();
        let thread = Arc::new(std::sync::OnceLock::new());
        let (done_tx, done) = std::sync::mpsc::channel();
        let worker_thread = Arc::clone(&thread);
        let run = move || {
            let _ = worker_thread.set(std::thread::current().id());
            // Drops the backend before saying it is done.
            worker(backend, &jobs);
            let _ = done_tx.send(());
        };
        match backend_pool {
            // The loop holds one of the pool's threads for the device's
            // lifetime; the pool is the backend's own, so no other device
            // competes for it.
            Some(pool) => pool.spawn(run),
            None => {
                std::thread::Builder::new()
                    .name(format!("gust-gpu-{}-{ordinal}", description.kind))
                    .spawn(run)
                    .map_err(|e| {
                        BridgeError::backend(format!("cannot start the device worker thread: {e}"))
                            .with_source(e)
                    })?;
            }
        }
        let costs = Arc::new(CostModel::new(description.kind));
        Ok(Self {
            inner: Arc::new(DeviceInner {
                costs,
                description,
                poison_outputs: options.poison_outputs,
                inline,
                ordinal,
                queue,
                used: AtomicU64::new(0),
                busy_nanos: AtomicU64::new(0),
                pending: AtomicU64::new(0),
                worker: WorkerEnd {
                    thread,
                    done: std::sync::Mutex::new(done),
                },
            }),
        })
    }

    /// What this device is.
    pub fn description(&self) -> &DeviceDescription {
        &self.inner.description
    }

    /// Which backend runs it.
    pub fn kind(&self) -> BackendKind {
        self.inner.description.kind
    }

    /// Device bytes held by live tensors.
    pub fn used_bytes(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }

    /// Total time the worker has spent running jobs.
    pub fn busy_time(&self) -> Duration {
        Duration::from_nanos(self.inner.busy_nanos.load(Ordering::Acquire))
    }

    /// The inline runner, if work of `elements` elements may run on the
    /// caller's thread and everything it reads is already computed.
    fn inline_for(&self, elements: usize, inputs: &[&Arc<Storage>]) -> Option<&dyn InlineRunner> {
        match &self.inner.inline {
            Some((inline, max)) if elements <= *max && inputs.iter().all(|s| s.is_ready()) => {
                Some(inline.as_ref())
            }
            _ => None,
        }
    }

    /// Run `job` now on the caller's thread, charging its time to `time`'s
    /// account; a panic in it is `step`'s `internal` error.
    fn run_inline<T>(
        &self,
        inline: &dyn InlineRunner,
        time: TimeReservation,
        step: &str,
        job: impl FnOnce(&mut dyn ErasedBackend) -> Result<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut job = Some(job);
        let mut result = None;
        // Contained inside the closure, so a panicking kernel neither
        // unwinds into the caller (an executor thread) nor skips the
        // charge below.
        inline.with_backend(&mut |backend| {
            if let Some(job) = job.take() {
                result = Some(contain(step, || job(backend)));
            }
        });
        self.inner.settle(time, started.elapsed());
        result.unwrap_or_else(|| Err(BridgeError::backend("the inline job did not run")))
    }

    fn stopped(&self) -> BridgeError {
        BridgeError::backend(format!(
            "{}: the device worker has stopped",
            self.inner.description.name
        ))
    }

    /// Queue `job` at the back of its tenant's lane, waiting for room if
    /// the lane is full. It runs once `inputs` are computed, charging the
    /// time it takes to `time`'s account; `cost` is its estimated time, its
    /// weight in taking turns with other tenants.
    async fn enqueue(
        &self,
        time: TimeReservation,
        inputs: Vec<Arc<Storage>>,
        cost: Duration,
        job: impl FnOnce(&mut dyn ErasedBackend) + Send + 'static,
    ) -> Result<()> {
        let tenant = time.account().tenant_key();
        // A caller that gives up while waiting for room drops `time`, which
        // gives the reserved time back.
        let place = self
            .inner
            .queue
            .places(tenant)
            .acquire_owned()
            .await
            .map_err(|_| self.stopped())?;
        let device = Arc::clone(&self.inner);
        let run: JobFn = Box::new(move |backend: &mut dyn ErasedBackend| {
            let started = Instant::now();
            job(backend);
            device.settle(time, started.elapsed());
            device.pending.fetch_sub(1, Ordering::AcqRel);
        });
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        self.inner
            .queue
            .push(tenant, Job { run, inputs, place }, cost);
        Ok(())
    }

    /// Queue a job that computes `output`'s buffer.
    async fn produce(
        &self,
        time: TimeReservation,
        output: &Arc<Storage>,
        inputs: Vec<Arc<Storage>>,
        cost: Duration,
        step: &'static str,
        compute: impl FnOnce(&mut dyn ErasedBackend) -> Result<AnyBuffer> + Send + 'static,
    ) -> Result<()> {
        let target = Arc::clone(output);
        self.enqueue(time, inputs, cost, move |backend| {
            // Only this job holds the result: its tensor is gone (the guest
            // dropped it, trapped or timed out), so skip the work.
            if Arc::strong_count(&target) == 1 {
                return;
            }
            let _ = target.buffer.set(contain(step, || compute(backend)));
        })
        .await
    }

    /// Run `job` after everything this tenant submitted so far (and after
    /// the producers of `inputs`) and await its answer.
    async fn call<T: Send + 'static>(
        &self,
        time: TimeReservation,
        inputs: Vec<Arc<Storage>>,
        cost: Duration,
        step: &'static str,
        job: impl FnOnce(&mut dyn ErasedBackend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(time, inputs, cost, move |backend| {
            // A caller that gave up (deadline, trap) no longer wants this.
            if !reply.is_closed() {
                let _ = reply.send(contain(step, || job(backend)));
            }
        })
        .await?;
        let mut answer = answer;
        let until = Instant::now() + CALLER_SPIN;
        loop {
            match answer.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() < until => {
                    std::hint::spin_loop()
                }
                Err(_) => break,
            }
        }
        answer.await.map_err(|_| {
            BridgeError::backend(format!(
                "{}: the device worker stopped during the call",
                self.inner.description.name
            ))
        })?
    }

    /// The estimated device time of touching `elements` elements.
    fn element_cost(&self, elements: usize) -> Duration {
        self.inner
            .costs
            .estimate(CostClass::Elements, elements as u64)
    }

    /// `invalid-argument` unless `tensor` lives on this device.
    pub(crate) fn check_owner(&self, tensor: &Tensor) -> Result<()> {
        if Arc::ptr_eq(&tensor.storage._charge.device, &self.inner) {
            Ok(())
        } else {
            Err(BridgeError::invalid(format!(
                "a tensor on {} was passed to {}",
                tensor.storage._charge.device.description.name, self.inner.description.name
            )))
        }
    }

    /// Upload `data` (little-endian, row-major) as a tensor charged to
    /// `account`.
    pub async fn upload(
        &self,
        dtype: DType,
        shape: &[usize],
        data: Vec<u8>,
        account: &Arc<Account>,
    ) -> Result<Tensor> {
        let expected = dtype.bytes_for(shape)?;
        if data.len() != expected {
            return Err(BridgeError::invalid(format!(
                "a {dtype} tensor of shape {shape:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        if dtype.is_quantized() && !self.inner.description.arithmetic_dtypes.contains(&dtype) {
            return Err(BridgeError::unsupported(format!(
                "{} has no {dtype} kernels; dequantize on the host and upload f32",
                self.inner.description.name
            )));
        }
        let elements = element_count(shape)?;
        let cost = self.element_cost(elements);
        let time = account.reserve_time(cost)?;
        let storage = Storage::pending(Charge::new(&self.inner, account, expected as u64)?);
        if let Some(inline) = self.inline_for(elements, &[]) {
            let buffer =
                self.run_inline(inline, time, "upload", |backend| backend.upload(&data))?;
            let _ = storage.buffer.set(Ok(buffer));
        } else {
            self.produce(time, &storage, Vec::new(), cost, "upload", move |backend| {
                backend.upload(&data)
            })
            .await?;
        }
        Ok(Tensor {
            storage,
            dtype,
            shape: shape.into(),
        })
    }

    /// A tensor of zeros.
    pub async fn zeros(
        &self,
        dtype: DType,
        shape: &[usize],
        account: &Arc<Account>,
    ) -> Result<Tensor> {
        let bytes = dtype.bytes_for(shape)?;
        self.upload(dtype, shape, vec![0; bytes], account).await
    }

    /// Copy a tensor's data back (little-endian, row-major).
    pub async fn read(&self, tensor: &Tensor, account: &Arc<Account>) -> Result<Vec<u8>> {
        self.check_owner(tensor)?;
        let bytes = tensor.byte_len();
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let cost = self.element_cost(tensor.len());
        let time = account.reserve_time(cost)?;
        let storage = Arc::clone(&tensor.storage);
        if let Some(inline) = self.inline_for(tensor.len(), &[&storage]) {
            return self.run_inline(inline, time, "read", |backend| {
                backend.download(storage.buffer()?, bytes)
            });
        }
        let inputs = vec![Arc::clone(&storage)];
        self.call(time, inputs, cost, "read", move |backend| {
            backend.download(storage.buffer()?, bytes)
        })
        .await
    }

    /// Wait until every job `account`'s tenant submitted so far has
    /// finished on the device (and the jobs of other tenants that they
    /// read). Other tenants' queued work is not waited for: lanes are
    /// served in turn, not in submission order.
    pub async fn synchronize(&self, account: &Arc<Account>) -> Result<()> {
        let time = account.reserve_time(Duration::ZERO)?;
        // A device whose kernels run synchronously on the host (the cpu
        // backend) is idle once its queue is: nothing to wait for.
        if self.inner.inline.is_some() && self.inner.pending.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        self.call(time, Vec::new(), Duration::ZERO, "synchronize", |backend| {
            backend.synchronize()
        })
        .await
    }

    /// Validate `op` against `operands` and run it, charging the result's
    /// memory and the device time to `account`.
    pub async fn run(
        &self,
        op: &Op,
        operands: &[&Tensor],
        account: &Arc<Account>,
    ) -> Result<Tensor> {
        for operand in operands {
            self.check_owner(operand)?;
        }
        let shapes: Vec<Operand<'_>> = operands.iter().map(|t| t.operand()).collect();
        let plan = op.plan(&shapes)?;
        let out_bytes = plan.dtype.bytes_for(&plan.shape)?;
        match plan.work {
            Work::Alias => {
                let source = operands.first().ok_or_else(|| {
                    BridgeError::invalid(format!("{} needs an operand", op.name()))
                })?;
                Ok(Tensor {
                    storage: Arc::clone(&source.storage),
                    dtype: plan.dtype,
                    shape: plan.shape.into(),
                })
            }
            Work::Empty | Work::Zeros => self.zeros(plan.dtype, &plan.shape, account).await,
            Work::Kernel(kernel) => {
                if matches!(kernel, Kernel::Linear { .. } | Kernel::SwiGlu { .. })
                    && !self.inner.description.linear
                {
                    return Err(BridgeError::unsupported(format!(
                        "{} runs on the cpu backend only, not on {}; compose it from matmul \
                         and elementwise ops",
                        op.name(),
                        self.inner.description.name
                    )));
                }
                if matches!(
                    kernel,
                    Kernel::Attention { .. } | Kernel::CausalAttention { .. }
                ) && !self.inner.description.fused_attention
                {
                    return Err(BridgeError::unsupported(format!(
                        "{} runs on the cpu backend only, not on {}; compose it from matmul \
                         and softmax",
                        op.name(),
                        self.inner.description.name
                    )));
                }
                if let Some(dtype) = kernel.compute_dtype()
                    && !self.inner.description.arithmetic_dtypes.contains(&dtype)
                {
                    return Err(BridgeError::unsupported(format!(
                        "{} in {dtype} on {}: this backend computes in {:?} only; cast first",
                        op.name(),
                        self.inner.description.name,
                        self.inner.description.arithmetic_dtypes
                    )));
                }
                let (class, work) = match &kernel {
                    Kernel::Matmul {
                        m,
                        k,
                        n,
                        lhs_offsets,
                        ..
                    } => (
                        CostClass::MultiplyAdds,
                        m.saturating_mul(*k)
                            .saturating_mul(*n)
                            .saturating_mul(lhs_offsets.len()),
                    ),
                    Kernel::Linear { m, k, ns, .. } => (
                        CostClass::MultiplyAdds,
                        m.saturating_mul(*k)
                            .saturating_mul(ns.iter().sum::<usize>()),
                    ),
                    _ => (
                        CostClass::Elements,
                        operands.iter().map(|t| t.len()).sum::<usize>()
                            + element_count(&plan.shape)?,
                    ),
                };
                let units = work as u64;
                let cost = self.inner.costs.estimate(class, units);
                // Before anything is queued or allocated: an op that cannot
                // fit the budget left is refused, not run into overdraft.
                let time = account.reserve_time(cost)?;
                let output = Storage::pending(Charge::new(&self.inner, account, out_bytes as u64)?);
                let inputs: Vec<Arc<Storage>> =
                    operands.iter().map(|t| Arc::clone(&t.storage)).collect();
                let waits_for = inputs.clone();
                let poison = self.inner.poison_outputs;
                let costs = Arc::clone(&self.inner.costs);
                let step = kernel.name();
                let compute = move |backend: &mut dyn ErasedBackend| -> Result<AnyBuffer> {
                    let started = Instant::now();
                    let refs = inputs
                        .iter()
                        .map(|s| s.buffer())
                        .collect::<Result<Vec<_>>>()?;
                    let mut buffer = if poison {
                        backend.upload(&vec![0xFF; out_bytes])?
                    } else {
                        backend.alloc(out_bytes)?
                    };
                    backend.run(&kernel, &refs, buffer.as_mut())?;
                    costs.learn(class, units, started.elapsed());
                    Ok(buffer)
                };
                let input_refs: Vec<&Arc<Storage>> = operands.iter().map(|t| &t.storage).collect();
                if let Some(inline) = self.inline_for(work, &input_refs) {
                    // Small work on ready inputs: computed now, so an error
                    // is the caller's at once.
                    let buffer = self.run_inline(inline, time, step, compute)?;
                    let _ = output.buffer.set(Ok(buffer));
                } else {
                    self.produce(time, &output, waits_for, cost, step, compute)
                        .await?;
                }
                Ok(Tensor {
                    storage: output,
                    dtype: plan.dtype,
                    shape: plan.shape.into(),
                })
            }
        }
    }

    /// A stable number identifying this device within the process.
    pub fn ordinal(&self) -> u64 {
        self.inner.ordinal
    }
}

/// Runs jobs until the device is gone. Jobs come in batches: a guest
/// chaining small ops submits the next within microseconds, so after each
/// job the worker polls for the next a short while
/// ([`RunQueue::poll_next`]) before it sleeps. Each batch, from waking to
/// sleeping again, is one debug-level `bridge_batch` span with its op
/// count: free when tracing is off at debug (the macros check a cached
/// interest, and the backend's kind is a `&'static str`), and it shows how
/// well ops chain when on.
fn worker<B: Backend>(mut backend: B, queue: &RunQueue) {
    let backend_kind = backend.describe().kind.as_str();
    while let Some(first) = queue.wait_next() {
        let span = tracing::debug_span!(
            "bridge_batch",
            backend = backend_kind,
            ops = tracing::field::Empty
        );
        let _entered = span.enter();
        let mut ops = 0u64;
        let mut next = Some(first);
        while let Some(job) = next {
            run_job(&mut backend, queue, job);
            ops += 1;
            next = queue.poll_next();
        }
        span.record("ops", ops);
        tracing::debug!(ops, "bridge batch done");
    }
}

/// Run one job. Each job already turns a panic in its op into that op's
/// error (see [`contain`]); this catches whatever is left (a panic in the
/// bookkeeping around it), so that no panic ends the worker, which would
/// stop the device for every tenant.
fn run_job(backend: &mut dyn ErasedBackend, queue: &RunQueue, job: Job) {
    let Job { run, inputs, place } = job;
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| run(backend))) {
        let panic = KernelPanicked::new("a device job", payload.as_ref());
        tracing::error!(error = %panic, "the device worker caught a panic outside an op");
    }
    drop((inputs, place));
    if queue.queued.load(Ordering::Acquire) == 0 {
        queue.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// The cpu backend, except that kernels fail as a driver error would.
    #[derive(Debug)]
    struct FailingKernels(CpuBackend);

    impl Backend for FailingKernels {
        type Buffer = <CpuBackend as Backend>::Buffer;

        fn describe(&self) -> DeviceDescription {
            self.0.describe()
        }

        fn alloc(&mut self, bytes: usize) -> Result<Self::Buffer> {
            Backend::alloc(&mut self.0, bytes)
        }

        fn upload(&mut self, data: &[u8]) -> Result<Self::Buffer> {
            Backend::upload(&mut self.0, data)
        }

        fn download(&mut self, buffer: &Self::Buffer, bytes: usize) -> Result<Vec<u8>> {
            Backend::download(&mut self.0, buffer, bytes)
        }

        fn run(
            &mut self,
            kernel: &Kernel,
            _: &[&Self::Buffer],
            _: &mut Self::Buffer,
        ) -> Result<()> {
            Err(BridgeError::backend(format!(
                "{}: launch failed",
                kernel.name()
            )))
        }

        fn synchronize(&mut self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_device_failure_surfaces_on_read_and_in_dependent_ops() {
        let device = Device::start(
            FailingKernels(CpuBackend::new(1 << 20)),
            DeviceOptions::default(),
        )
        .unwrap();
        let account = Account::new("t", None, None);
        let x = pollster::block_on(device.upload(DType::F32, &[4], vec![0; 16], &account)).unwrap();
        // Queued, so the failure is not known yet.
        let y = pollster::block_on(device.run(&Op::Unary(crate::UnaryOp::Relu), &[&x], &account))
            .unwrap();
        let z = pollster::block_on(device.run(&Op::Unary(crate::UnaryOp::Exp), &[&y], &account))
            .unwrap();
        let err = pollster::block_on(device.read(&y, &account)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Backend);
        assert!(err.message.contains("relu: launch failed"), "{err}");
        let err = pollster::block_on(device.read(&z, &account)).unwrap_err();
        assert!(err.message.contains("relu: launch failed"), "{err}");
        assert_eq!(
            pollster::block_on(device.read(&x, &account)).unwrap(),
            vec![0; 16]
        );
        drop((x, y, z));
        // The worker drops a finished job's inputs just after the job has
        // answered: their bytes come back a moment later.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while account.used_bytes() != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(account.used_bytes(), 0);
    }

    /// The cpu backend, except that `exp` panics, as a kernel with a bug
    /// some input reaches would.
    #[derive(Debug, Clone)]
    struct PanickingExp(CpuBackend);

    impl Backend for PanickingExp {
        type Buffer = <CpuBackend as Backend>::Buffer;

        fn describe(&self) -> DeviceDescription {
            self.0.describe()
        }

        fn alloc(&mut self, bytes: usize) -> Result<Self::Buffer> {
            Backend::alloc(&mut self.0, bytes)
        }

        fn upload(&mut self, data: &[u8]) -> Result<Self::Buffer> {
            Backend::upload(&mut self.0, data)
        }

        fn download(&mut self, buffer: &Self::Buffer, bytes: usize) -> Result<Vec<u8>> {
            Backend::download(&mut self.0, buffer, bytes)
        }

        fn run(
            &mut self,
            kernel: &Kernel,
            inputs: &[&Self::Buffer],
            output: &mut Self::Buffer,
        ) -> Result<()> {
            if let Kernel::Unary {
                op: crate::UnaryOp::Exp,
                ..
            } = kernel
            {
                let empty: &[f32] = &[];
                // A real out-of-bounds panic, not a `panic!` stand-in.
                let _ = empty[inputs.len()];
            }
            Backend::run(&mut self.0, kernel, inputs, output)
        }

        fn synchronize(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn a_kernel_panic_fails_its_op_and_the_worker_keeps_serving() {
        let device = Device::start(
            PanickingExp(CpuBackend::new(1 << 20)),
            DeviceOptions::default(),
        )
        .unwrap();
        let account = Account::new("t", None, None);
        let other = Account::new("other", None, None);
        let data: Vec<u8> = bytemuck::cast_slice(&[-1.0f32, 2.0]).to_vec();
        let x = pollster::block_on(device.upload(DType::F32, &[2], data, &account)).unwrap();
        let exp = pollster::block_on(device.run(&Op::Unary(crate::UnaryOp::Exp), &[&x], &account))
            .unwrap();
        let err = pollster::block_on(device.read(&exp, &account)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal, "{err}");
        assert!(err.message.contains("exp panicked"), "{err}");
        assert!(err.message.contains("index out of bounds"), "{err}");
        // The same device still serves this tenant and the next.
        let relu =
            pollster::block_on(device.run(&Op::Unary(crate::UnaryOp::Relu), &[&x], &account))
                .unwrap();
        let bytes = pollster::block_on(device.read(&relu, &account)).unwrap();
        assert_eq!(f32s(&bytes), vec![0.0, 2.0]);
        let y = pollster::block_on(device.upload(DType::F32, &[1], vec![0; 4], &other)).unwrap();
        assert_eq!(
            pollster::block_on(device.read(&y, &other)).unwrap(),
            vec![0; 4]
        );
        drop((x, exp, relu));
        pollster::block_on(device.synchronize(&account)).unwrap();
        assert_eq!(account.used_bytes(), 0, "the failed op's output was freed");
    }

    #[test]
    fn a_kernel_panic_on_the_callers_thread_is_an_error_not_an_unwind() {
        let device = Device::start_inline(
            PanickingExp(CpuBackend::new(1 << 20)),
            DeviceOptions::default(),
        )
        .unwrap();
        let account = Account::new("t", None, None);
        let data: Vec<u8> = bytemuck::cast_slice(&[-1.0f32, 2.0]).to_vec();
        let x = pollster::block_on(device.upload(DType::F32, &[2], data, &account)).unwrap();
        // Two elements: computed inline, so the error is the caller's now.
        let err = pollster::block_on(device.run(&Op::Unary(crate::UnaryOp::Exp), &[&x], &account))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal, "{err}");
        let relu =
            pollster::block_on(device.run(&Op::Unary(crate::UnaryOp::Relu), &[&x], &account))
                .unwrap();
        let bytes = pollster::block_on(device.read(&relu, &account)).unwrap();
        assert_eq!(f32s(&bytes), vec![0.0, 2.0]);
    }

    #[test]
    fn another_tenant_never_sees_a_freed_tensors_bytes() {
        let device = Device::start(CpuBackend::new(1 << 30), DeviceOptions::default()).unwrap();
        let first = Account::new("first", None, None);
        let second = Account::new("second", None, None);
        // Large enough for the cpu backend to keep the buffer for reuse.
        let bytes = 1 << 20;
        let pattern: Vec<u8> = (0..bytes).map(|i| (i % 253) as u8 | 0x80).collect();
        let secret =
            pollster::block_on(device.upload(DType::U32, &[bytes / 4], pattern, &first)).unwrap();
        pollster::block_on(device.synchronize(&first)).unwrap();
        drop(secret);
        // A buffer allocated for the second tenant and read before anything
        // writes it: what a kernel that leaves part of its output alone
        // would hand back.
        let time = second.reserve_time(Duration::ZERO).unwrap();
        let seen = pollster::block_on(device.call(
            time,
            Vec::new(),
            Duration::ZERO,
            "alloc",
            move |backend| {
                let buffer = backend.alloc(bytes)?;
                backend.download(buffer.as_ref(), bytes)
            },
        ))
        .unwrap();
        let stale = seen.iter().filter(|&&b| b != 0).count();
        assert_eq!(
            stale, 0,
            "{stale} of {bytes} bytes left by the first tenant"
        );
    }
}
