//! One worker thread per device, and the tensors that live on it.
//!
//! A [`Device`] owns its backend on a dedicated thread fed by a bounded
//! queue. Async callers submit a job and await a oneshot reply, so no
//! executor thread ever blocks on a kernel, a copy or a driver call. Tensor
//! data is shared immutably (`Arc`): views such as `reshape` reuse the
//! buffer, and the buffer — with its device bytes and its owner's quota —
//! is freed when the last tensor that uses it is dropped, on whatever
//! thread that happens.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

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
    /// Jobs the worker queues before submissions fail with `quota-exceeded`.
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
    queue: SyncSender<Job>,
    used: AtomicU64,
    busy_nanos: AtomicU64,
}

impl DeviceInner {
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

/// A device buffer and the charge that pays for it. Field order matters:
/// the buffer is freed before the bytes are returned to the quotas.
struct Storage {
    buffer: AnyBuffer,
    _charge: Charge,
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
        let (queue, jobs) = mpsc::sync_channel::<Job>(queue_depth.max(1));
        std::thread::Builder::new()
            .name(format!("gust-gpu-{}-{ordinal}", description.kind))
            .spawn(move || worker(backend, jobs))
            .map_err(|e| {
                BridgeError::backend(format!("cannot start the device worker thread: {e}"))
            })?;
        Ok(Self {
            inner: Arc::new(DeviceInner {
                description,
                poison_outputs: options.poison_outputs,
                inline,
                ordinal,
                queue,
                used: AtomicU64::new(0),
                busy_nanos: AtomicU64::new(0),
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

    /// Run `job`, which touches `elements` elements, and await its answer:
    /// on the caller's thread if the device allows it for that size, else on
    /// the worker. The job's wall time is charged to `account` as device
    /// time.
    async fn submit<T: Send + 'static>(
        &self,
        account: &Arc<Account>,
        elements: usize,
        job: impl FnOnce(&mut dyn ErasedBackend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        account.check_time()?;
        if let Some((inline, max)) = &self.inner.inline
            && elements <= *max
        {
            let started = Instant::now();
            let mut job = Some(job);
            let mut result = None;
            inline.with_backend(&mut |backend| {
                if let Some(job) = job.take() {
                    result = Some(job(backend));
                }
            });
            let spent = started.elapsed();
            account.charge_time(spent);
            self.inner.busy_nanos.fetch_add(
                u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX),
                Ordering::AcqRel,
            );
            return result
                .unwrap_or_else(|| Err(BridgeError::backend("the inline job did not run")));
        }
        let (reply, answer) = oneshot::channel();
        let charged = Arc::clone(account);
        let device = Arc::clone(&self.inner);
        let boxed: Job = Box::new(move |backend| {
            // A caller that gave up (deadline, trap) no longer wants this.
            if reply.is_closed() {
                return;
            }
            let started = Instant::now();
            let result = job(backend);
            let spent = started.elapsed();
            charged.charge_time(spent);
            device.busy_nanos.fetch_add(
                u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX),
                Ordering::AcqRel,
            );
            let _ = reply.send(result);
        });
        self.inner.queue.try_send(boxed).map_err(|e| match e {
            TrySendError::Full(_) => BridgeError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "{}: the device queue is full; retry later",
                    self.inner.description.name
                ),
            ),
            TrySendError::Disconnected(_) => BridgeError::backend(format!(
                "{}: the device worker has stopped",
                self.inner.description.name
            )),
        })?;
        let mut answer = answer;
        let until = Instant::now() + CALLER_SPIN;
        loop {
            match answer.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => break,
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() < until => {
                    std::hint::spin_loop()
                }
                Err(oneshot::error::TryRecvError::Empty) => break,
            }
        }
        answer.await.map_err(|_| {
            BridgeError::backend(format!(
                "{}: the device worker stopped during the call",
                self.inner.description.name
            ))
        })?
    }

    fn check_owner(&self, tensor: &Tensor) -> Result<()> {
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
        let charge = Charge::new(&self.inner, account, expected as u64)?;
        let elements = expected / dtype.size();
        let buffer = self
            .submit(account, elements, move |backend| backend.upload(&data))
            .await?;
        Ok(self.tensor(buffer, charge, dtype, shape))
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
        let storage = Arc::clone(&tensor.storage);
        self.submit(account, tensor.len(), move |backend| {
            backend.download(storage.buffer.as_ref(), bytes)
        })
        .await
    }

    /// Wait until every job submitted so far has finished on the device.
    pub async fn synchronize(&self, account: &Arc<Account>) -> Result<()> {
        // Nothing to wait for on an inline device; a worker may be busy.
        self.submit(account, usize::MAX, |backend| backend.synchronize())
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
                let charge = Charge::new(&self.inner, account, out_bytes as u64)?;
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
                let buffer = self
                    .submit(account, work, move |backend| {
                        let mut output = if poison {
                            backend.upload(&vec![0xFF; out_bytes])?
                        } else {
                            backend.alloc(out_bytes)?
                        };
                        let refs: Vec<&(dyn Any + Send + Sync)> =
                            inputs.iter().map(|s| s.buffer.as_ref()).collect();
                        backend.run(&kernel, &refs, output.as_mut())?;
                        Ok(output)
                    })
                    .await?;
                Ok(self.tensor(buffer, charge, plan.dtype, &plan.shape))
            }
        }
    }

    fn tensor(&self, buffer: AnyBuffer, charge: Charge, dtype: DType, shape: &[usize]) -> Tensor {
        Tensor {
            storage: Arc::new(Storage {
                buffer,
                _charge: charge,
            }),
            dtype,
            shape: shape.into(),
        }
    }

    /// A stable number identifying this device within the process.
    pub fn ordinal(&self) -> u64 {
        self.inner.ordinal
    }
}

fn worker<B: Backend>(mut backend: B, jobs: Receiver<Job>) {
    loop {
        let job = match jobs.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => match spin_then_wait(&jobs) {
                Some(job) => job,
                None => return,
            },
        };
        job(&mut backend);
    }
}

fn spin_then_wait(jobs: &Receiver<Job>) -> Option<Job> {
    let until = Instant::now() + WORKER_SPIN;
    while Instant::now() < until {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    loop {
        match jobs.recv_timeout(Duration::from_secs(3600)) {
            Ok(job) => return Some(job),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}
