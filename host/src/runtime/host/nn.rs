//! Host side of `wasi:nn` (0.2.0-rc-2024-10-28), over the same resident
//! models as `gust:gpu/models`: a guest written against the standard
//! interface loads a model with `load-by-name` (the tenant's policy must
//! list it) and runs it with `compute` on named tensors.
//!
//! wasi-nn tensors are plain bytes in host memory; `compute` uploads them to
//! the model's device, runs the model, and reads the outputs back. Besides
//! the family's own tensor inputs (bert: `input_ids`, `attention_mask`), a
//! text model takes UTF-8 text as a `u8` tensor, which spares a wasi-nn
//! guest a tokenizer:
//!
//! - bert: input `text` (one text per line) gives `embedding`, `f32`
//!   `[texts, dimensions]`, mean-pooled and L2-normalised.
//! - llama: input `prompt` (and optionally `max_tokens`, one `i32`) gives
//!   `text`, the greedy continuation, `u8`.
//!
//! As with `gust:gpu`, the generated traits are implemented on a narrow
//! view, [`NnCtxView`]: the invocation's bridge session and the resource
//! table, nothing else of the call's state.

use std::sync::Arc;

use gust_gpu_bridge::DType;
use gust_gpu_bridge::models::ResidentModel;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use super::gpu::{GpuSession, to_wit};
use crate::runtime::bindings::gust::gpu::types::{Error as GpuError, ErrorCode as GpuCode};
use crate::runtime::bindings::wasi::nn::errors::{self, ErrorCode};
use crate::runtime::bindings::wasi::nn::graph::{self, ExecutionTarget, GraphEncoding};
use crate::runtime::bindings::wasi::nn::inference;
use crate::runtime::bindings::wasi::nn::tensor::{self, TensorType};
use crate::runtime::state::MemoryLimiter;

/// What of a call's state `wasi:nn` works on: the invocation's bridge
/// session (the same grant, account and deadline as `gust:gpu`), the
/// resource table its tensors, graphs and errors live in, and the memory
/// limiter its tensors' bytes are charged to.
pub(crate) struct NnCtxView<'a> {
    /// The invocation's grant, account and deadline.
    pub(crate) session: &'a mut GpuSession,
    /// The Store's resource table.
    pub(crate) table: &'a mut ResourceTable,
    /// The call's memory limit, shared with its linear memory.
    pub(crate) limiter: &'a mut MemoryLimiter,
}

/// Store data that can lend an [`NnCtxView`].
pub(crate) trait NnView: Send {
    /// The parts of the state `wasi:nn` uses.
    fn nn(&mut self) -> NnCtxView<'_>;
}

/// The [`HasData`] of `wasi:nn`: its host functions get an [`NnCtxView`].
struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnCtxView<'a>;
}

/// Adds `wasi:nn` (`errors`, `tensor`, `inference`, `graph`) to `linker`,
/// each call working on the [`NnCtxView`] its store's data lends.
pub(crate) fn add_to_linker<T: NnView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    errors::add_to_linker::<T, HasNn>(linker, T::nn)?;
    tensor::add_to_linker::<T, HasNn>(linker, T::nn)?;
    inference::add_to_linker::<T, HasNn>(linker, T::nn)?;
    graph::add_to_linker::<T, HasNn>(linker, T::nn)?;
    Ok(())
}

/// A wasi-nn tensor: dimensions, element type and bytes, in host memory.
#[derive(Debug, Clone)]
#[allow(unreachable_pub)] // re-exported by `bindgen!` (`with`)
pub struct NnTensor {
    dimensions: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

impl NnTensor {
    /// The host memory it holds, as charged to the call's memory limit:
    /// its bytes, its dimensions and its own bookkeeping, so that even
    /// empty tensors cannot be held for free.
    fn held_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            .saturating_add(self.data.len())
            .saturating_add(self.dimensions.len().saturating_mul(4))
    }
}

/// A graph: a resident model this invocation loaded by name.
#[derive(Debug)]
#[allow(unreachable_pub)] // re-exported by `bindgen!` (`with`)
pub struct NnGraph {
    model: Arc<ResidentModel>,
}

/// An execution context of a graph.
#[derive(Debug)]
#[allow(unreachable_pub)] // re-exported by `bindgen!` (`with`)
pub struct NnContext {
    model: Arc<ResidentModel>,
}

/// A wasi-nn error: a code and the host's explanation.
#[derive(Debug)]
#[allow(unreachable_pub)] // re-exported by `bindgen!` (`with`)
pub struct NnError {
    code: ErrorCode,
    data: String,
}

type NnResult<T> = wasmtime::Result<Result<T, Resource<NnError>>>;

fn element_size(ty: TensorType) -> usize {
    match ty {
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
        TensorType::U8 => 1,
    }
}

fn from_gpu(e: GpuError) -> (ErrorCode, String) {
    let code = match e.code {
        GpuCode::InvalidArgument | GpuCode::ShapeMismatch => ErrorCode::InvalidArgument,
        GpuCode::NotFound => ErrorCode::NotFound,
        GpuCode::Forbidden => ErrorCode::Security,
        GpuCode::OutOfMemory => ErrorCode::TooLarge,
        GpuCode::QuotaExceeded | GpuCode::Backend => ErrorCode::RuntimeError,
        GpuCode::Timeout => ErrorCode::Timeout,
        GpuCode::Unsupported => ErrorCode::UnsupportedOperation,
    };
    (code, e.message)
}

impl NnCtxView<'_> {
    fn nn_error<T>(&mut self, code: ErrorCode, data: impl Into<String>) -> NnResult<T> {
        let error = self.table.push(NnError {
            code,
            data: data.into(),
        })?;
        Ok(Err(error))
    }

    /// Run `model` on the wasi-nn inputs; errors as (code, explanation).
    #[tracing::instrument(level = "debug", skip_all, fields(model = model.name(), inputs = inputs.len()))]
    async fn nn_compute(
        &mut self,
        model: &Arc<ResidentModel>,
        inputs: Vec<(String, NnTensor)>,
    ) -> Result<Vec<(String, NnTensor)>, (ErrorCode, String)> {
        for (name, t) in &inputs {
            let count = t
                .dimensions
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d as usize));
            let expected = count.and_then(|n| n.checked_mul(element_size(t.ty)));
            if expected != Some(t.data.len()) {
                return Err((
                    ErrorCode::InvalidArgument,
                    format!(
                        "tensor `{name}`: dimensions {:?} of {:?} need {} bytes, got {}",
                        t.dimensions,
                        t.ty,
                        expected.map_or("more than usize".into(), |n| n.to_string()),
                        t.data.len()
                    ),
                ));
            }
        }
        // Text inputs are tokenised before anything else looks at them.
        for (name, t) in &inputs {
            if t.ty == TensorType::U8 && (name == "prompt" || name == "text") {
                super::gpu::check_model_input(&format!("tensor `{name}`"), t.data.len())
                    .map_err(from_gpu)?;
            }
        }
        let account = self.session.account().map_err(from_gpu)?;
        if let Some((_, prompt)) = inputs
            .iter()
            .find(|(n, t)| n == "prompt" && t.ty == TensorType::U8)
        {
            let prompt = std::str::from_utf8(&prompt.data).map_err(|e| {
                (
                    ErrorCode::InvalidArgument,
                    format!("tensor `prompt` is not UTF-8: {e}"),
                )
            })?;
            let max_tokens = match inputs.iter().find(|(n, _)| n == "max_tokens") {
                Some((_, t)) if t.ty == TensorType::I32 && t.data.len() == 4 => {
                    let v = i32::from_le_bytes([t.data[0], t.data[1], t.data[2], t.data[3]]);
                    u32::try_from(v).map_err(|_| {
                        (
                            ErrorCode::InvalidArgument,
                            format!("max_tokens {v} is below zero"),
                        )
                    })?
                }
                Some(_) => {
                    return Err((
                        ErrorCode::InvalidArgument,
                        "`max_tokens` must be one i32".into(),
                    ));
                }
                None => 64,
            };
            let params = gust_gpu_bridge::GenerateParams {
                max_tokens,
                ..gust_gpu_bridge::GenerateParams::default()
            };
            let generated = model
                .generate(prompt, &params, &account, &mut |_| {
                    std::ops::ControlFlow::Continue(())
                })
                .await
                .map_err(|e| from_gpu(to_wit(e)))?;
            let data = generated.text.into_bytes();
            return Ok(vec![(
                "text".to_owned(),
                NnTensor {
                    dimensions: vec![u32::try_from(data.len()).unwrap_or(u32::MAX)],
                    ty: TensorType::U8,
                    data,
                },
            )]);
        }
        if let [(name, text)] = inputs.as_slice()
            && name == "text"
            && text.ty == TensorType::U8
        {
            let text = std::str::from_utf8(&text.data).map_err(|e| {
                (
                    ErrorCode::InvalidArgument,
                    format!("tensor `text` is not UTF-8: {e}"),
                )
            })?;
            let texts: Vec<String> = text.lines().map(str::to_owned).collect();
            let rows = model
                .embed(texts, &account, self.session.deadline)
                .await
                .map_err(|e| from_gpu(to_wit(e)))?;
            let width = rows
                .first()
                .map_or(model.embedding_dimensions().unwrap_or(0), Vec::len);
            let data: Vec<u8> = rows
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            return Ok(vec![(
                "embedding".to_owned(),
                NnTensor {
                    dimensions: vec![
                        u32::try_from(rows.len()).unwrap_or(u32::MAX),
                        u32::try_from(width).unwrap_or(u32::MAX),
                    ],
                    ty: TensorType::Fp32,
                    data,
                },
            )]);
        }

        let device = model.device();
        let mut uploaded = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let (dtype, data) = match t.ty {
                TensorType::Fp32 => (DType::F32, t.data),
                TensorType::Fp16 => (DType::F16, t.data),
                TensorType::Bf16 => (DType::BF16, t.data),
                TensorType::I32 => (DType::I32, t.data),
                // Token ids arrive as i64 from most frameworks; the bridge
                // indexes with 32 bits.
                TensorType::I64 => (DType::I32, narrow_i64(&name, &t.data)?),
                other => {
                    return Err((
                        ErrorCode::InvalidArgument,
                        format!("tensor `{name}`: {other:?} inputs are not supported here"),
                    ));
                }
            };
            let shape: Vec<usize> = t.dimensions.iter().map(|&d| d as usize).collect();
            let tensor = device
                .upload(dtype, &shape, data, &account)
                .await
                .map_err(|e| from_gpu(to_wit(e)))?;
            uploaded.push((name, tensor));
        }
        let outputs = model
            .run_until(&uploaded, &account, self.session.deadline)
            .await
            .map_err(|e| from_gpu(to_wit(e)))?;
        let mut answers = Vec::with_capacity(outputs.len());
        for (name, tensor) in outputs {
            let data = device
                .read(&tensor, &account)
                .await
                .map_err(|e| from_gpu(to_wit(e)))?;
            let ty = match tensor.dtype() {
                DType::F32 => TensorType::Fp32,
                DType::F16 => TensorType::Fp16,
                DType::BF16 => TensorType::Bf16,
                DType::I32 | DType::U32 => TensorType::I32,
                // Graph outputs are computed, never a model's quantized
                // weights (graph families' weights are f32).
                DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K => {
                    TensorType::Fp32
                }
            };
            answers.push((
                name,
                NnTensor {
                    dimensions: tensor
                        .shape()
                        .iter()
                        .map(|&d| u32::try_from(d).unwrap_or(u32::MAX))
                        .collect(),
                    ty,
                    data,
                },
            ));
        }
        Ok(answers)
    }
}

fn narrow_i64(name: &str, data: &[u8]) -> Result<Vec<u8>, (ErrorCode, String)> {
    data.chunks_exact(8)
        .map(|c| {
            let v = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            i32::try_from(v).map(i32::to_le_bytes).map_err(|_| {
                (
                    ErrorCode::InvalidArgument,
                    format!("tensor `{name}`: {v} does not fit 32 bits"),
                )
            })
        })
        .collect::<Result<Vec<[u8; 4]>, _>>()
        .map(|v| v.concat())
}

impl tensor::HostTensor for NnCtxView<'_> {
    async fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<NnTensor>> {
        // Checked against the dimensions in `compute`, where a mismatch can
        // be reported as an error value rather than a trap.
        let tensor = NnTensor {
            dimensions,
            ty,
            data,
        };
        self.push_tensor(tensor)
    }

    async fn dimensions(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dimensions.clone())
    }

    async fn ty(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&tensor)?.ty)
    }

    async fn data(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    async fn drop(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<()> {
        self.take_tensor(tensor)?;
        Ok(())
    }
}

impl tensor::Host for NnCtxView<'_> {}

impl NnCtxView<'_> {
    /// Puts `tensor` in the table, charging its bytes to the call's memory
    /// limit (a trap, reported as out-of-memory, when they do not fit).
    fn push_tensor(&mut self, tensor: NnTensor) -> wasmtime::Result<Resource<NnTensor>> {
        let held = tensor.held_bytes();
        self.limiter.charge_host(held)?;
        match self.table.push(tensor) {
            Ok(handle) => Ok(handle),
            Err(e) => {
                self.limiter.release_host(held);
                Err(e.into())
            }
        }
    }

    /// Takes `tensor` out of the table, giving its charge back.
    fn take_tensor(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<NnTensor> {
        let tensor = self.table.delete(tensor)?;
        self.limiter.release_host(tensor.held_bytes());
        Ok(tensor)
    }
}

impl graph::HostGraph for NnCtxView<'_> {
    async fn init_execution_context(
        &mut self,
        graph: Resource<NnGraph>,
    ) -> NnResult<Resource<NnContext>> {
        let model = Arc::clone(&self.table.get(&graph)?.model);
        Ok(Ok(self.table.push(NnContext { model })?))
    }

    async fn drop(&mut self, graph: Resource<NnGraph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl graph::Host for NnCtxView<'_> {
    async fn load(
        &mut self,
        _builder: Vec<Vec<u8>>,
        encoding: GraphEncoding,
        _target: ExecutionTarget,
    ) -> NnResult<Resource<NnGraph>> {
        self.nn_error(
            ErrorCode::UnsupportedOperation,
            format!(
                "graphs from bytes ({encoding:?}) are not loaded on this host; its models are \
                 resident: use `load-by-name` with a model the tenant's policy lists"
            ),
        )
    }

    async fn load_by_name(&mut self, name: String) -> NnResult<Resource<NnGraph>> {
        match self.session.load_resident(&name).await {
            Ok(model) => Ok(Ok(self.table.push(NnGraph { model })?)),
            Err(e) => {
                let (code, data) = from_gpu(e);
                self.nn_error(code, data)
            }
        }
    }
}

impl inference::HostGraphExecutionContext for NnCtxView<'_> {
    async fn compute(
        &mut self,
        context: Resource<NnContext>,
        inputs: Vec<(String, Resource<NnTensor>)>,
    ) -> NnResult<Vec<(String, Resource<NnTensor>)>> {
        let model = Arc::clone(&self.table.get(&context)?.model);
        let mut owned = Vec::with_capacity(inputs.len());
        for (name, handle) in inputs {
            // The guest gives the tensors up to the call (they are owned
            // handles in this version of the interface).
            let tensor = self.take_tensor(handle)?;
            owned.push((name, tensor));
        }
        match self.nn_compute(&model, owned).await {
            Ok(outputs) => {
                let mut handles = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    handles.push((name, self.push_tensor(tensor)?));
                }
                Ok(Ok(handles))
            }
            Err((code, data)) => self.nn_error(code, data),
        }
    }

    async fn drop(&mut self, context: Resource<NnContext>) -> wasmtime::Result<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl inference::Host for NnCtxView<'_> {}

impl errors::HostError for NnCtxView<'_> {
    async fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    async fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.data.clone())
    }

    async fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}

impl errors::Host for NnCtxView<'_> {}
