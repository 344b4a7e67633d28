//! One worker thread per device, and the tensors that live on it.
//!
//! A [`Device`] owns its backend on a dedicated thread fed by a bounded
//! queue, so no executor thread ever blocks on a kernel, a copy or a driver
//! call. Ops are *pipelined*: `run` validates, reserves the output's memory,
//! queues the kernel and returns the new tensor at once, without waiting for
//! the device, as CUDA streams and PyTorch do. The worker runs jobs in queue
//! order, so a kernel always finds its inputs computed; only `read` (and
//! `synchronize`) wait, and a failure on the device (a driver error, an
//! allocation the backend refused) surfaces there, or in any op that uses
//! the failed tensor. A full queue makes submitters wait (backpressure).
//!
//! Tensor data is shared immutably (`Arc`): views such as `reshape` reuse the
//! buffer, and the buffer — with its device bytes and its owner's quota — is
//! freed when the last tensor that uses it is dropped, on whatever thread
//! that happens. A queued kernel whose result nobody holds any more (its
//! invocation trapped or timed out) is skipped.

use std::any::Any;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::account::Account;
use crate::backend::{Backend, BackendKind, DeviceDescription};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::kernel::Kernel;
use crate::op::{Op, Operand, Work, element_count};

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

type Job = Box<dyn FnOnce(&mut dyn ErasedBackend) + Send>;

/// How a device worker is set up.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Jobs the worker queues before submitters wait for room.
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
    queue: mpsc::Sender<Job>,
    used: AtomicU64,
    busy_nanos: AtomicU64,
    /// Jobs queued and not yet finished.
    pending: AtomicU64,
}

impl DeviceInner {
    /// Charge `spent` device time to `account` and to this device's total.
    fn charge_time(&self, account: &Account, spent: Duration) {
        account.charge_time(spent);
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

    /// Bytes of data (`len × dtype size`).
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype.size()
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
        let (queue, jobs) = mpsc::channel::<Job>(queue_depth.max(1));
        match backend.worker_pool() {
            // The loop holds one of the pool's threads for the device's
            // lifetime; the pool is the backend's own, so no other device
            // competes for it.
            Some(pool) => pool.spawn(move || worker(backend, jobs)),
            None => {
                std::thread::Builder::new()
                    .name(format!("gust-gpu-{}-{ordinal}", description.kind))
                    .spawn(move || worker(backend, jobs))
                    .map_err(|e| {
                        BridgeError::backend(format!("cannot start the device worker thread: {e}"))
                            .with_source(e)
                    })?;
            }
        }
        Ok(Self {
            inner: Arc::new(DeviceInner {
                description,
                poison_outputs: options.poison_outputs,
                inline,
                ordinal,
                queue,
                used: AtomicU64::new(0),
                busy_nanos: AtomicU64::new(0),
                pending: AtomicU64::new(0),
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

    fn run_inline<T>(
        &self,
        inline: &dyn InlineRunner,
        account: &Account,
        job: impl FnOnce(&mut dyn ErasedBackend) -> Result<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut job = Some(job);
        let mut result = None;
        inline.with_backend(&mut |backend| {
            if let Some(job) = job.take() {
                result = Some(job(backend));
            }
        });
        self.inner.charge_time(account, started.elapsed());
        result.unwrap_or_else(|| Err(BridgeError::backend("the inline job did not run")))
    }

    /// Queue `job` behind everything submitted so far, waiting for room if
    /// the queue is full.
    async fn enqueue(
        &self,
        account: &Arc<Account>,
        job: impl FnOnce(&mut dyn ErasedBackend) + Send + 'static,
    ) -> Result<()> {
        let charged = Arc::clone(account);
        let device = Arc::clone(&self.inner);
        let timed: Job = Box::new(move |backend| {
            let started = Instant::now();
            job(backend);
            device.charge_time(&charged, started.elapsed());
            device.pending.fetch_sub(1, Ordering::AcqRel);
        });
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        self.inner.queue.send(timed).await.map_err(|_| {
            BridgeError::backend(format!(
                "{}: the device worker has stopped",
                self.inner.description.name
            ))
        })
    }

    /// Queue a job that computes `output`'s buffer.
    async fn produce(
        &self,
        account: &Arc<Account>,
        output: &Arc<Storage>,
        compute: impl FnOnce(&mut dyn ErasedBackend) -> Result<AnyBuffer> + Send + 'static,
    ) -> Result<()> {
        let target = Arc::clone(output);
        self.enqueue(account, move |backend| {
            // Only this job holds the result: its tensor is gone (the guest
            // dropped it, trapped or timed out), so skip the work.
            if Arc::strong_count(&target) == 1 {
                return;
            }
            let _ = target.buffer.set(compute(backend));
        })
        .await
    }

    /// Run `job` after everything submitted so far and await its answer.
    async fn call<T: Send + 'static>(
        &self,
        account: &Arc<Account>,
        job: impl FnOnce(&mut dyn ErasedBackend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(account, move |backend| {
            // A caller that gave up (deadline, trap) no longer wants this.
            if !reply.is_closed() {
                let _ = reply.send(job(backend));
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
        let expected = element_count(shape)? * dtype.size();
        if data.len() != expected {
            return Err(BridgeError::invalid(format!(
                "a {dtype} tensor of shape {shape:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        account.check_time()?;
        let storage = Storage::pending(Charge::new(&self.inner, account, expected as u64)?);
        if let Some(inline) = self.inline_for(expected / dtype.size(), &[]) {
            let buffer = self.run_inline(inline, account, |backend| backend.upload(&data))?;
            let _ = storage.buffer.set(Ok(buffer));
        } else {
            self.produce(account, &storage, move |backend| backend.upload(&data))
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
        let bytes = element_count(shape)? * dtype.size();
        self.upload(dtype, shape, vec![0; bytes], account).await
    }

    /// Copy a tensor's data back (little-endian, row-major).
    pub async fn read(&self, tensor: &Tensor, account: &Arc<Account>) -> Result<Vec<u8>> {
        self.check_owner(tensor)?;
        let bytes = tensor.byte_len();
        if bytes == 0 {
            return Ok(Vec::new());
        }
        account.check_time()?;
        let storage = Arc::clone(&tensor.storage);
        if let Some(inline) = self.inline_for(tensor.len(), &[&storage]) {
            return self.run_inline(inline, account, |backend| {
                backend.download(storage.buffer()?, bytes)
            });
        }
        self.call(account, move |backend| {
            backend.download(storage.buffer()?, bytes)
        })
        .await
    }

    /// Wait until every job submitted so far has finished on the device.
    pub async fn synchronize(&self, account: &Arc<Account>) -> Result<()> {
        account.check_time()?;
        // A device whose kernels run synchronously on the host (the cpu
        // backend) is idle once its queue is: nothing to wait for.
        if self.inner.inline.is_some() && self.inner.pending.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        self.call(account, |backend| backend.synchronize()).await
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
        let out_bytes = element_count(&plan.shape)? * plan.dtype.size();
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
                account.check_time()?;
                let output = Storage::pending(Charge::new(&self.inner, account, out_bytes as u64)?);
                let inputs: Vec<Arc<Storage>> =
                    operands.iter().map(|t| Arc::clone(&t.storage)).collect();
                let poison = self.inner.poison_outputs;
                let work = match &kernel {
                    Kernel::Matmul {
                        m,
                        k,
                        n,
                        lhs_offsets,
                        ..
                    } => m * k * n * lhs_offsets.len(),
                    _ => {
                        operands.iter().map(|t| t.len()).sum::<usize>()
                            + out_bytes / plan.dtype.size()
                    }
                };
                let compute = move |backend: &mut dyn ErasedBackend| -> Result<AnyBuffer> {
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
                    Ok(buffer)
                };
                let input_refs: Vec<&Arc<Storage>> = operands.iter().map(|t| &t.storage).collect();
                if let Some(inline) = self.inline_for(work, &input_refs) {
                    // Small work on ready inputs: computed now, so an error
                    // is the caller's at once.
                    let buffer = self.run_inline(inline, account, compute)?;
                    let _ = output.buffer.set(Ok(buffer));
                } else {
                    self.produce(account, &output, compute).await?;
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

/// Runs jobs until every sender is gone. Jobs come in batches: a guest
/// chaining small ops submits the next within microseconds, so after each
/// job the worker polls for the next a short while (see [`poll_job`])
/// before it sleeps. Each batch, from waking to sleeping again, is one
/// debug-level `bridge_batch` span with its op count: free when tracing is
/// off at debug (the macros check a cached interest, and the backend's
/// kind is a `&'static str`), and it shows how well ops chain when on.
fn worker<B: Backend>(mut backend: B, mut jobs: mpsc::Receiver<Job>) {
    let backend_kind = backend.describe().kind.as_str();
    while let Some(first) = jobs.blocking_recv() {
        let span = tracing::debug_span!(
            "bridge_batch",
            backend = backend_kind,
            ops = tracing::field::Empty
        );
        let _entered = span.enter();
        let mut ops = 0u64;
        let mut next = Some(first);
        while let Some(job) = next {
            job(&mut backend);
            ops += 1;
            next = poll_job(&mut jobs);
        }
        span.record("ops", ops);
        tracing::debug!(ops, "bridge batch done");
    }
}

/// The next job if one arrives within [`WORKER_SPIN`]; `None` when none
/// does (the worker then sleeps in `blocking_recv`) or every sender is
/// gone (`blocking_recv` then says so).
fn poll_job(jobs: &mut mpsc::Receiver<Job>) -> Option<Job> {
    let until = Instant::now() + WORKER_SPIN;
    loop {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if Instant::now() < until => {
                std::hint::spin_loop()
            }
            Err(mpsc::error::TryRecvError::Empty) => return None,
        }
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
        assert_eq!(account.used_bytes(), 0);
    }
}
