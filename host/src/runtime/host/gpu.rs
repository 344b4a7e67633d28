//! Host side of `gust:gpu`: the one module that links the WIT imports to
//! `gust-gpu-bridge`.
//!
//! A guest's tensors are entries in its Store's resource table, each holding
//! a bridge [`Tensor`]. The table is dropped with the Store, whichever way
//! the call ends (a return, a trap, a timeout), and dropping a tensor frees
//! its device memory and returns the bytes to the invocation's and the
//! tenant's quotas: a guest cannot leak device memory past its call.
//!
//! Every call charges an [`Account`] that is a child of the tenant's, so the
//! tenant's `[gpu]` quotas (device memory, device time per minute) hold
//! across all of its concurrent invocations.
//!
//! The generated traits are implemented on [`GpuCtxView`], the part of a
//! call's state the bridge needs (its [`GpuSession`], resource table and
//! output sink), not on the whole state: the glue knows nothing else of the
//! runtime, and any store data that implements [`GpuView`] can link it.

use std::sync::Arc;
use std::time::Instant;

use gust_gpu_bridge::models::{ModelRegistry, ResidentModel};
use gust_gpu_bridge::{
    Account, BinaryOp, BridgeError, DType, Device, ErrorCode as BridgeCode, Op, ReduceOp, Tensor,
    UnaryOp,
};
use tracing::Instrument as _;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::runtime::bindings::gust::gpu::layers::{self, BlockFormat};
use crate::runtime::bindings::gust::gpu::models::{self, GenerateParams};
use crate::runtime::bindings::gust::gpu::tensors::{self, DeviceInfo};
use crate::runtime::bindings::gust::gpu::types::{self, Dtype, Error, ErrorCode};
use crate::runtime::control::OutputSink;

/// What one invocation may use of the bridge: the devices its tenant's
/// policy allows (the default first) and the tenant's account.
#[derive(Clone)]
pub struct GpuGrant {
    /// Devices the guest may use, in order of preference; never empty.
    pub devices: Arc<[Device]>,
    /// The tenant's account, parent of each invocation's.
    pub account: Arc<Account>,
    /// The host's resident models and which of them the tenant may load;
    /// `None` when the host has no models.
    pub models: Option<ModelGrant>,
}

/// The models an invocation may load.
#[derive(Clone)]
pub struct ModelGrant {
    /// The host's registry (shared by every tenant: weights are loaded once).
    pub registry: Arc<ModelRegistry>,
    /// Names the tenant's policy lists under `[gpu] models`.
    pub allowed: Arc<[String]>,
    /// The tenant's own counters of model loads, which `GET /v1/models`
    /// shows it (the registry's counters are every tenant's together).
    pub usage: Arc<ModelUsage>,
}

/// One tenant's model loads: the part of the registry's activity that is
/// its business.
#[derive(Debug, Default)]
pub struct ModelUsage {
    /// Loads that put weights on a device.
    pub loads: std::sync::atomic::AtomicU64,
    /// Loads that found the model already resident.
    pub hits: std::sync::atomic::AtomicU64,
    /// Loads that failed.
    pub failures: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for GpuGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuGrant")
            .field(
                "devices",
                &self.devices.iter().map(|d| d.kind()).collect::<Vec<_>>(),
            )
            .field("account", &self.account.label())
            .field(
                "models",
                &self.models.as_ref().map(|m| m.allowed.len()).unwrap_or(0),
            )
            .finish()
    }
}

/// The bridge state of one invocation. The child account is made on the
/// first bridge call, so calls that never touch the bridge pay nothing.
#[derive(Default)]
pub(crate) struct GpuSession {
    grant: Option<GpuGrant>,
    account: Option<Arc<Account>>,
    /// When the invocation's time is up: a call waiting for a model batch
    /// gives up then rather than holding a slot of the batch queue.
    pub(crate) deadline: Option<Instant>,
}

impl GpuSession {
    pub(crate) fn new(grant: Option<GpuGrant>, deadline: Option<Instant>) -> Self {
        Self {
            grant,
            account: None,
            deadline,
        }
    }

    pub(crate) fn grant(&self) -> Result<&GpuGrant, Error> {
        self.grant.as_ref().ok_or_else(|| Error {
            code: ErrorCode::Forbidden,
            message: "this function's tenant may not use the GPU bridge (policy `[gpu] backends` is empty)".into(),
        })
    }

    pub(crate) fn account(&mut self) -> Result<Arc<Account>, Error> {
        if let Some(account) = &self.account {
            return Ok(Arc::clone(account));
        }
        let grant = self.grant()?;
        let account = grant.account.child("invocation", None);
        self.account = Some(Arc::clone(&account));
        Ok(account)
    }

    pub(crate) fn default_device(&self) -> Result<Device, Error> {
        let grant = self.grant()?;
        grant.devices.first().cloned().ok_or_else(|| Error {
            code: ErrorCode::Forbidden,
            message: "no device of the backends this tenant may use is available on this host"
                .into(),
        })
    }

    /// The model called `name` on the invocation's default device, if the
    /// tenant's policy lists it: loaded on first use anywhere on the host,
    /// resident afterwards. Shared by `gust:gpu/models` and `wasi:nn`.
    #[tracing::instrument(level = "debug", skip_all, fields(model = name))]
    pub(crate) async fn load_resident(&self, name: &str) -> Result<Arc<ResidentModel>, Error> {
        let grant = self.grant()?;
        let device = self.default_device()?;
        let Some(models) = &grant.models else {
            return Err(Error {
                code: ErrorCode::NotFound,
                message: format!("no model `{name}`: this host serves no models"),
            });
        };
        if !models.allowed.iter().any(|m| m == name) {
            return Err(Error {
                code: ErrorCode::Forbidden,
                message: format!(
                    "this function's tenant may not load model `{name}` (policy `[gpu] models` \
                     does not list it)"
                ),
            });
        }
        use std::sync::atomic::Ordering::Relaxed;
        // Resident when asked: a hit (another call may load it meanwhile,
        // which then counts as this tenant's load; close enough for a
        // counter).
        let resident = models
            .registry
            .resident_models(&device)
            .iter()
            .any(|m| m == name);
        let loaded = models.registry.load(name, &device).await;
        let counter = match (&loaded, resident) {
            (Err(_), _) => &models.usage.failures,
            (Ok(_), true) => &models.usage.hits,
            (Ok(_), false) => &models.usage.loads,
        };
        counter.fetch_add(1, Relaxed);
        loaded.map_err(to_wit)
    }
}

/// A guest's tensor: bridge data plus the device that holds it.
// `pub` because `bindgen!` re-exports the types given in `with` as `pub use`.
#[allow(unreachable_pub)]
pub struct GpuTensor {
    tensor: Tensor,
    device: Device,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.tensor.fmt(f)
    }
}

/// A handle to a resident model, owned by one invocation. Holding it keeps
/// the model from being evicted; dropping it (or the Store) lets go.
#[derive(Debug)]
#[allow(unreachable_pub)] // re-exported by `bindgen!`, as `GpuTensor`
pub struct GpuModel {
    model: Arc<ResidentModel>,
}

/// What of a call's state `gust:gpu` works on: the invocation's bridge
/// session, the resource table its tensors and models live in, and where
/// streamed generation goes. The generated host traits are implemented on
/// this view, so the glue depends on these three parts and nothing else.
pub(crate) struct GpuCtxView<'a> {
    /// The invocation's grant, account and deadline.
    pub(crate) session: &'a mut GpuSession,
    /// The Store's resource table.
    pub(crate) table: &'a mut ResourceTable,
    /// Where `generate-stream` sends each piece of text.
    pub(crate) output: &'a mut OutputSink,
}

/// Store data that can lend a [`GpuCtxView`] (as `WasiHttpView` lends a
/// `WasiHttpCtxView`).
pub(crate) trait GpuView: Send {
    /// The parts of the state `gust:gpu` uses.
    fn gpu(&mut self) -> GpuCtxView<'_>;
}

/// The [`HasData`] of `gust:gpu`: its host functions get a [`GpuCtxView`].
struct HasGpu;

impl HasData for HasGpu {
    type Data<'a> = GpuCtxView<'a>;
}

/// Adds `gust:gpu` (`types`, `tensors`, `layers`, `models`) to `linker`, each call
/// working on the [`GpuCtxView`] its store's data lends.
pub(crate) fn add_to_linker<T: GpuView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    types::add_to_linker::<T, HasGpu>(linker, T::gpu)?;
    tensors::add_to_linker::<T, HasGpu>(linker, T::gpu)?;
    layers::add_to_linker::<T, HasGpu>(linker, T::gpu)?;
    models::add_to_linker::<T, HasGpu>(linker, T::gpu)?;
    Ok(())
}

type Outcome<T> = wasmtime::Result<Result<T, Error>>;

pub(super) fn to_wit(e: BridgeError) -> Error {
    let code = match e.code {
        BridgeCode::InvalidArgument => ErrorCode::InvalidArgument,
        BridgeCode::ShapeMismatch => ErrorCode::ShapeMismatch,
        BridgeCode::NotFound => ErrorCode::NotFound,
        BridgeCode::Forbidden => ErrorCode::Forbidden,
        BridgeCode::OutOfMemory => ErrorCode::OutOfMemory,
        BridgeCode::QuotaExceeded => ErrorCode::QuotaExceeded,
        BridgeCode::Timeout => ErrorCode::Timeout,
        // A panic the bridge contained: the WIT has no `internal`, and to
        // the guest it is the backend failing its op.
        BridgeCode::Backend | BridgeCode::Internal => ErrorCode::Backend,
        _ => ErrorCode::Unsupported,
    };
    Error {
        code,
        message: e.message,
    }
}

fn to_bridge_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
        Dtype::I32 => DType::I32,
        Dtype::U32 => DType::U32,
    }
}

fn to_wit_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::Bf16,
        DType::I32 => Dtype::I32,
        DType::U32 => Dtype::U32,
        // Blocks from `layers.from-blocks` stand for f32 values (`format`
        // tells their storage), as `read-f32`, `cast` and `gather` give.
        DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K => Dtype::F32,
    }
}

fn to_bridge_format(format: BlockFormat) -> DType {
    match format {
        BlockFormat::Q40 => DType::Q4_0,
        BlockFormat::Q41 => DType::Q4_1,
        BlockFormat::Q80 => DType::Q8_0,
        BlockFormat::Q4K => DType::Q4K,
        BlockFormat::Q6K => DType::Q6K,
    }
}

fn to_wit_format(dtype: DType) -> Option<BlockFormat> {
    Some(match dtype {
        DType::Q4_0 => BlockFormat::Q40,
        DType::Q4_1 => BlockFormat::Q41,
        DType::Q8_0 => BlockFormat::Q80,
        DType::Q4K => BlockFormat::Q4K,
        DType::Q6K => BlockFormat::Q6K,
        _ => return None,
    })
}

fn shape_of(shape: &[u32]) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

/// Turn a bridge-level result into the WIT's nested result: bridge errors
/// reach the guest as values; only host faults trap.
macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

impl GpuCtxView<'_> {
    fn tensor(&self, handle: &Resource<GpuTensor>) -> wasmtime::Result<(Tensor, Device)> {
        let entry = self.table.get(handle)?;
        Ok((entry.tensor.clone(), entry.device.clone()))
    }

    fn new_tensor(
        &mut self,
        tensor: Tensor,
        device: Device,
    ) -> wasmtime::Result<Resource<GpuTensor>> {
        Ok(self.table.push(GpuTensor { tensor, device })?)
    }

    async fn upload(
        &mut self,
        dtype: DType,
        shape: &[u32],
        data: Vec<u8>,
    ) -> Outcome<Resource<GpuTensor>> {
        let device = attempt!(self.session.default_device());
        let account = attempt!(self.session.account());
        let tensor = attempt!(
            device
                .upload(dtype, &shape_of(shape), data, &account)
                .await
                .map_err(to_wit)
        );
        Ok(Ok(self.new_tensor(tensor, device)?))
    }

    /// Run `op` on the operands' device; the result lands in the table.
    async fn op(
        &mut self,
        op: Op,
        operands: &[&Resource<GpuTensor>],
    ) -> Outcome<Resource<GpuTensor>> {
        let account = attempt!(self.session.account());
        let mut tensors = Vec::with_capacity(operands.len());
        let mut device = None;
        for handle in operands {
            let (tensor, on) = self.tensor(handle)?;
            device.get_or_insert(on);
            tensors.push(tensor);
        }
        let device = match device {
            Some(device) => device,
            None => attempt!(self.session.default_device()),
        };
        let refs: Vec<&Tensor> = tensors.iter().collect();
        // Debug: a guest may run thousands of ops per call.
        let span = tracing::debug_span!("bridge.op", op = op.name());
        let result = attempt!(
            device
                .run(&op, &refs, &account)
                .instrument(span)
                .await
                .map_err(to_wit)
        );
        Ok(Ok(self.new_tensor(result, device)?))
    }

    async fn read_back(
        &mut self,
        handle: &Resource<GpuTensor>,
        as_f32: bool,
    ) -> Outcome<(DType, Vec<u8>)> {
        let account = attempt!(self.session.account());
        let (mut tensor, device) = self.tensor(handle)?;
        if as_f32 && tensor.dtype() != DType::F32 {
            tensor = attempt!(
                device
                    .run(&Op::Cast { to: DType::F32 }, &[&tensor], &account)
                    .await
                    .map_err(to_wit)
            );
        }
        let bytes = attempt!(device.read(&tensor, &account).await.map_err(to_wit));
        Ok(Ok((tensor.dtype(), bytes)))
    }
}

impl types::Host for GpuCtxView<'_> {}

impl tensors::HostTensor for GpuCtxView<'_> {
    async fn from_bytes(
        &mut self,
        dtype: Dtype,
        shape: Vec<u32>,
        data: Vec<u8>,
    ) -> Outcome<Resource<GpuTensor>> {
        self.upload(to_bridge_dtype(dtype), &shape, data).await
    }

    async fn from_f32(
        &mut self,
        shape: Vec<u32>,
        values: Vec<f32>,
    ) -> Outcome<Resource<GpuTensor>> {
        self.upload(
            DType::F32,
            &shape,
            gust_gpu_bridge::dtype::f32_to_bytes(&values),
        )
        .await
    }

    async fn from_i32(
        &mut self,
        shape: Vec<u32>,
        values: Vec<i32>,
    ) -> Outcome<Resource<GpuTensor>> {
        self.upload(
            DType::I32,
            &shape,
            gust_gpu_bridge::dtype::i32_to_bytes(&values),
        )
        .await
    }

    async fn zeros(&mut self, dtype: Dtype, shape: Vec<u32>) -> Outcome<Resource<GpuTensor>> {
        let device = attempt!(self.session.default_device());
        let account = attempt!(self.session.account());
        let tensor = attempt!(
            device
                .zeros(to_bridge_dtype(dtype), &shape_of(&shape), &account)
                .await
                .map_err(to_wit)
        );
        Ok(Ok(self.new_tensor(tensor, device)?))
    }

    async fn shape(&mut self, tensor: Resource<GpuTensor>) -> wasmtime::Result<Vec<u32>> {
        let entry = self.table.get(&tensor)?;
        // Every dimension fits: the bridge caps tensors below 2^31 elements.
        Ok(entry
            .tensor
            .shape()
            .iter()
            .map(|&d| u32::try_from(d).unwrap_or(u32::MAX))
            .collect())
    }

    async fn dtype(&mut self, tensor: Resource<GpuTensor>) -> wasmtime::Result<Dtype> {
        Ok(to_wit_dtype(self.table.get(&tensor)?.tensor.dtype()))
    }

    async fn read(&mut self, tensor: Resource<GpuTensor>) -> Outcome<Vec<u8>> {
        Ok(self
            .read_back(&tensor, false)
            .await?
            .map(|(_, bytes)| bytes))
    }

    async fn read_f32(&mut self, tensor: Resource<GpuTensor>) -> Outcome<Vec<f32>> {
        Ok(self.read_back(&tensor, true).await?.map(|(_, bytes)| {
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }))
    }

    async fn drop(&mut self, tensor: Resource<GpuTensor>) -> wasmtime::Result<()> {
        self.table.delete(tensor)?;
        Ok(())
    }
}

type T = Resource<GpuTensor>;

impl tensors::Host for GpuCtxView<'_> {
    async fn devices(&mut self) -> wasmtime::Result<Vec<DeviceInfo>> {
        let Some(grant) = self.session.grant.clone() else {
            return Ok(Vec::new());
        };
        let available = grant.account.available_bytes();
        Ok(grant
            .devices
            .iter()
            .map(|device| {
                let d = device.description();
                let free = d.memory_bytes.saturating_sub(device.used_bytes());
                DeviceInfo {
                    backend: d.kind.as_str().to_owned(),
                    name: d.name.clone(),
                    is_gpu: d.is_gpu,
                    memory_available: available.map_or(free, |a| a.min(free)),
                }
            })
            .collect())
    }
    async fn matmul(&mut self, a: T, b: T) -> Outcome<T> {
        self.op(Op::Matmul, &[&a, &b]).await
    }
    async fn add(&mut self, a: T, b: T) -> Outcome<T> {
        self.op(Op::Binary(BinaryOp::Add), &[&a, &b]).await
    }
    async fn sub(&mut self, a: T, b: T) -> Outcome<T> {
        self.op(Op::Binary(BinaryOp::Sub), &[&a, &b]).await
    }
    async fn mul(&mut self, a: T, b: T) -> Outcome<T> {
        self.op(Op::Binary(BinaryOp::Mul), &[&a, &b]).await
    }
    async fn div(&mut self, a: T, b: T) -> Outcome<T> {
        self.op(Op::Binary(BinaryOp::Div), &[&a, &b]).await
    }
    async fn affine(&mut self, x: T, scale: f32, offset: f32) -> Outcome<T> {
        self.op(Op::Affine { scale, offset }, &[&x]).await
    }
    async fn relu(&mut self, x: T) -> Outcome<T> {
        self.op(Op::Unary(UnaryOp::Relu), &[&x]).await
    }
    async fn gelu(&mut self, x: T) -> Outcome<T> {
        self.op(Op::Unary(UnaryOp::Gelu), &[&x]).await
    }
    async fn silu(&mut self, x: T) -> Outcome<T> {
        self.op(Op::Unary(UnaryOp::Silu), &[&x]).await
    }
    async fn tanh(&mut self, x: T) -> Outcome<T> {
        self.op(Op::Unary(UnaryOp::Tanh), &[&x]).await
    }
    async fn exp(&mut self, x: T) -> Outcome<T> {
        self.op(Op::Unary(UnaryOp::Exp), &[&x]).await
    }
    async fn softmax(&mut self, x: T, dim: i32) -> Outcome<T> {
        self.op(Op::Softmax { dim }, &[&x]).await
    }
    async fn layer_norm(&mut self, x: T, w: Option<T>, b: Option<T>, eps: f32) -> Outcome<T> {
        let op = Op::LayerNorm {
            eps,
            weight: w.is_some(),
            bias: b.is_some(),
        };
        let operands: Vec<&T> = std::iter::once(&x)
            .chain(w.as_ref())
            .chain(b.as_ref())
            .collect();
        self.op(op, &operands).await
    }
    async fn rms_norm(&mut self, x: T, w: Option<T>, eps: f32) -> Outcome<T> {
        let op = Op::RmsNorm {
            eps,
            weight: w.is_some(),
        };
        let operands: Vec<&T> = std::iter::once(&x).chain(w.as_ref()).collect();
        self.op(op, &operands).await
    }
    async fn sum(&mut self, x: T, dim: i32, keep_dim: bool) -> Outcome<T> {
        self.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                dim,
                keep_dim,
            },
            &[&x],
        )
        .await
    }
    async fn mean(&mut self, x: T, dim: i32, keep_dim: bool) -> Outcome<T> {
        self.op(
            Op::Reduce {
                op: ReduceOp::Mean,
                dim,
                keep_dim,
            },
            &[&x],
        )
        .await
    }
    async fn max(&mut self, x: T, dim: i32, keep_dim: bool) -> Outcome<T> {
        self.op(
            Op::Reduce {
                op: ReduceOp::Max,
                dim,
                keep_dim,
            },
            &[&x],
        )
        .await
    }
    async fn argmax(&mut self, x: T, dim: i32, keep_dim: bool) -> Outcome<T> {
        self.op(
            Op::Reduce {
                op: ReduceOp::ArgMax,
                dim,
                keep_dim,
            },
            &[&x],
        )
        .await
    }
    async fn transpose(&mut self, x: T, dim0: i32, dim1: i32) -> Outcome<T> {
        self.op(Op::Transpose { dim0, dim1 }, &[&x]).await
    }
    async fn permute(&mut self, x: T, dims: Vec<u32>) -> Outcome<T> {
        self.op(Op::Permute { dims }, &[&x]).await
    }
    async fn reshape(&mut self, x: T, shape: Vec<i64>) -> Outcome<T> {
        self.op(Op::Reshape { shape }, &[&x]).await
    }
    async fn slice(&mut self, x: T, dim: i32, start: u32, len: u32) -> Outcome<T> {
        self.op(Op::Slice { dim, start, len }, &[&x]).await
    }
    async fn concat(&mut self, xs: Vec<T>, dim: i32) -> Outcome<T> {
        let operands: Vec<&T> = xs.iter().collect();
        self.op(Op::Concat { dim }, &operands).await
    }
    async fn gather(&mut self, table: T, indices: T) -> Outcome<T> {
        self.op(Op::Gather, &[&table, &indices]).await
    }
    async fn cast(&mut self, x: T, to: Dtype) -> Outcome<T> {
        self.op(
            Op::Cast {
                to: to_bridge_dtype(to),
            },
            &[&x],
        )
        .await
    }
}

impl layers::Host for GpuCtxView<'_> {
    async fn from_blocks(
        &mut self,
        format: BlockFormat,
        shape: Vec<u32>,
        data: Vec<u8>,
    ) -> Outcome<T> {
        self.upload(to_bridge_format(format), &shape, data).await
    }

    async fn format(&mut self, x: T) -> wasmtime::Result<Option<BlockFormat>> {
        Ok(to_wit_format(self.table.get(&x)?.tensor.dtype()))
    }

    async fn linear(&mut self, x: T, weights: Vec<T>) -> Outcome<T> {
        let operands: Vec<&T> = std::iter::once(&x).chain(&weights).collect();
        self.op(Op::Linear, &operands).await
    }

    async fn swiglu(&mut self, x: T) -> Outcome<T> {
        self.op(Op::SwiGlu, &[&x]).await
    }
}

/// The most text one model call takes (a prompt, or all of an embed's
/// texts together). Tokenising runs before any other check of the input,
/// on the thread that serves the call: a guest's megabytes of prompt would
/// otherwise hold that thread for as long as the tokenizer takes.
pub(super) const MAX_MODEL_INPUT_BYTES: usize = 1 << 20;

/// Refuses text of `bytes` beyond [`MAX_MODEL_INPUT_BYTES`].
pub(super) fn check_model_input(what: &str, bytes: usize) -> Result<(), Error> {
    if bytes > MAX_MODEL_INPUT_BYTES {
        return Err(Error {
            code: ErrorCode::InvalidArgument,
            message: format!(
                "{what} is {bytes} bytes; a model call takes at most {MAX_MODEL_INPUT_BYTES} bytes of text"
            ),
        });
    }
    Ok(())
}

impl GpuCtxView<'_> {
    /// Generate with `model`; with `stream`, every piece of text goes to the
    /// invocation's output as soon as the model produces it (an SSE or
    /// WebSocket caller sees tokens as they come), the output's backpressure
    /// pacing the generation.
    #[tracing::instrument(level = "info", name = "model.generate", skip_all, fields(model = model.name(), stream = stream))]
    async fn generate_with(
        &mut self,
        model: Arc<ResidentModel>,
        prompt: String,
        params: GenerateParams,
        stream: bool,
    ) -> Outcome<String> {
        attempt!(check_model_input("the prompt", prompt.len()));
        let account = attempt!(self.session.account());
        let params = gust_gpu_bridge::GenerateParams {
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            seed: params.seed,
            stop: params.stop,
        };
        if !stream {
            let generated = model
                .generate(&prompt, &params, &account, &mut |_| {
                    std::ops::ControlFlow::Continue(())
                })
                .await;
            return Ok(generated.map(|g| g.text).map_err(to_wit));
        }
        // The model calls back synchronously; the pieces cross to this task
        // through a channel so they can be awaited into the output stream
        // while the generation goes on.
        let (pieces, mut arrived) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut on_piece = move |piece: &str| {
            if pieces.send(piece.to_owned()).is_ok() {
                std::ops::ControlFlow::Continue(())
            } else {
                std::ops::ControlFlow::Break(())
            }
        };
        let generation = model.generate(&prompt, &params, &account, &mut on_piece);
        tokio::pin!(generation);
        let result = loop {
            tokio::select! {
                result = &mut generation => break result,
                Some(piece) = arrived.recv() => self.output.emit(piece.into_bytes()).await?,
            }
        };
        while let Ok(piece) = arrived.try_recv() {
            self.output.emit(piece.into_bytes()).await?;
        }
        Ok(result.map(|g| g.text).map_err(to_wit))
    }

    fn model(&self, handle: &Resource<GpuModel>) -> wasmtime::Result<Arc<ResidentModel>> {
        Ok(Arc::clone(&self.table.get(handle)?.model))
    }
}

impl models::HostModel for GpuCtxView<'_> {
    async fn load(&mut self, name: String) -> Outcome<Resource<GpuModel>> {
        let span = tracing::info_span!("model.load", model = %name);
        let model = attempt!(self.session.load_resident(&name).instrument(span).await);
        Ok(Ok(self.table.push(GpuModel { model })?))
    }

    async fn name(&mut self, model: Resource<GpuModel>) -> wasmtime::Result<String> {
        Ok(self.model(&model)?.name().to_owned())
    }

    async fn family(&mut self, model: Resource<GpuModel>) -> wasmtime::Result<String> {
        Ok(self.model(&model)?.family().to_owned())
    }

    async fn embed(
        &mut self,
        model: Resource<GpuModel>,
        texts: Vec<String>,
    ) -> Outcome<Vec<Vec<f32>>> {
        let model = self.model(&model)?;
        let total = texts
            .iter()
            .map(String::len)
            .fold(0usize, usize::saturating_add);
        attempt!(check_model_input("the texts", total));
        let account = attempt!(self.session.account());
        let span = tracing::info_span!("model.embed", model = model.name(), texts = texts.len());
        Ok(model
            .embed(texts, &account, self.session.deadline)
            .instrument(span)
            .await
            .map_err(to_wit))
    }

    async fn generate(
        &mut self,
        model: Resource<GpuModel>,
        prompt: String,
        params: GenerateParams,
    ) -> Outcome<String> {
        let model = self.model(&model)?;
        self.generate_with(model, prompt, params, false).await
    }

    async fn generate_stream(
        &mut self,
        model: Resource<GpuModel>,
        prompt: String,
        params: GenerateParams,
    ) -> Outcome<String> {
        let model = self.model(&model)?;
        self.generate_with(model, prompt, params, true).await
    }

    async fn run(
        &mut self,
        model: Resource<GpuModel>,
        inputs: Vec<(String, T)>,
    ) -> Outcome<Vec<(String, T)>> {
        let model = self.model(&model)?;
        let account = attempt!(self.session.account());
        let mut tensors = Vec::with_capacity(inputs.len());
        for (name, handle) in &inputs {
            let (tensor, device) = self.tensor(handle)?;
            if device.ordinal() != model.device().ordinal() {
                return Ok(Err(Error {
                    code: ErrorCode::InvalidArgument,
                    message: format!(
                        "input `{name}` is on {} but model `{}` is resident on {}",
                        device.description().name,
                        model.name(),
                        model.device().description().name
                    ),
                }));
            }
            tensors.push((name.clone(), tensor));
        }
        // Batched with concurrent runs of the model; waiting for the batch
        // ends at this invocation's deadline.
        let span = tracing::debug_span!("run", model = model.name(), inputs = tensors.len());
        let outputs = attempt!(
            model
                .run_until(&tensors, &account, self.session.deadline)
                .instrument(span)
                .await
                .map_err(to_wit)
        );
        let mut handles = Vec::with_capacity(outputs.len());
        for (name, tensor) in outputs {
            handles.push((name, self.new_tensor(tensor, model.device().clone())?));
        }
        Ok(Ok(handles))
    }

    async fn drop(&mut self, model: Resource<GpuModel>) -> wasmtime::Result<()> {
        self.table.delete(model)?;
        Ok(())
    }
}

impl models::Host for GpuCtxView<'_> {}
