//! Tensors on the host's device, through the GPU bridge.
//!
//! A [`Tensor`] is a handle: its data lives on the host (a CUDA GPU, a wgpu
//! adapter or the host CPU, as the tenant's policy allows) and stays there
//! between operations, so a chain such as
//! `x.matmul(&w)?.add(&b)?.relu()?.softmax(-1)?` never copies through the
//! function's memory. Only [`Tensor::to_vec_f32`] and [`Tensor::read`] copy
//! data back. Tensors are freed when dropped, and in any case when the
//! invocation ends.
//!
//! ```no_run
//! use gust_sdk::tensor::{Tensor, TensorError};
//!
//! fn scores() -> Result<Vec<f32>, TensorError> {
//!     let x = Tensor::from_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//!     let w = Tensor::from_f32(&[3, 2], &[0.5, -1.0, 0.25, 0.0, 1.0, 2.0])?;
//!     x.matmul(&w)?.relu()?.softmax(-1)?.to_vec_f32()
//! }
//! ```
//!
//! Every operation checks shapes and dtypes on the host before anything
//! runs and returns a [`TensorError`] naming the problem; `?` turns it into
//! the function's [`Error`](crate::Error) (see the `From` impl for the HTTP
//! status each code maps to).

use std::fmt;

use crate::bindings::gust::gpu::layers;
pub use crate::bindings::gust::gpu::layers::BlockFormat;
use crate::bindings::gust::gpu::tensors as raw;
pub use crate::bindings::gust::gpu::types::{DeviceInfo, Dtype, ErrorCode};

/// Why a bridge call failed: a code to branch on and a message to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, naming the operand or limit involved.
    pub message: String,
}

impl TensorError {
    /// The WIT spelling of the code, e.g. `shape-mismatch`.
    pub fn code_name(&self) -> &'static str {
        match self.code {
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::ShapeMismatch => "shape-mismatch",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::OutOfMemory => "out-of-memory",
            ErrorCode::QuotaExceeded => "quota-exceeded",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Backend => "backend",
            ErrorCode::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code_name(), self.message)
    }
}

impl std::error::Error for TensorError {}

impl From<crate::bindings::gust::gpu::types::Error> for TensorError {
    fn from(e: crate::bindings::gust::gpu::types::Error) -> Self {
        Self {
            code: e.code,
            message: e.message,
        }
    }
}

/// A bridge failure as the function's error: code `gpu-<code>`, and the
/// status a caller can act on: 429 for a used-up quota (retry later), 403
/// when the policy forbids it, 503 when the device is out of memory, 504
/// on a deadline, 500 otherwise (a shape error is the function's bug).
impl From<TensorError> for crate::Error {
    fn from(e: TensorError) -> Self {
        let status = match e.code {
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::Forbidden => 403,
            ErrorCode::OutOfMemory => 503,
            ErrorCode::Timeout => 504,
            _ => 500,
        };
        crate::Error::new(format!("gpu-{}", e.code_name()), e.message).with_status(status)
    }
}

type Result<T> = std::result::Result<T, TensorError>;

/// A tensor on the host's device.
#[derive(Debug)]
pub struct Tensor(raw::Tensor);

fn wrap(
    result: std::result::Result<raw::Tensor, crate::bindings::gust::gpu::types::Error>,
) -> Result<Tensor> {
    result.map(Tensor).map_err(TensorError::from)
}

/// The devices this function may use, its default device first.
pub fn devices() -> Vec<DeviceInfo> {
    raw::devices()
}

impl Tensor {
    /// Upload `f32` values with `shape` (row-major).
    pub fn from_f32(shape: &[u32], values: &[f32]) -> Result<Self> {
        wrap(raw::Tensor::from_f32(shape, values))
    }

    /// Upload `i32` values with `shape` (indices for [`Tensor::gather`]).
    pub fn from_i32(shape: &[u32], values: &[i32]) -> Result<Self> {
        wrap(raw::Tensor::from_i32(shape, values))
    }

    /// Upload raw little-endian bytes as `dtype` with `shape`.
    pub fn from_bytes(dtype: Dtype, shape: &[u32], data: &[u8]) -> Result<Self> {
        wrap(raw::Tensor::from_bytes(dtype, shape, data))
    }

    /// Upload a weight matrix as ggml blocks of `format`, exactly the bytes
    /// a GGUF file holds for it; the last dimension of `shape` is whole
    /// blocks (32 values, 256 for the K formats). It stays in its blocks on
    /// the host (a quarter to an eighth of f32) and goes to
    /// [`Tensor::linear`] as weights, to [`Tensor::gather`] as a table and
    /// to [`Tensor::cast`] to f32; other ops refuse it. The cpu backend
    /// runs these.
    pub fn from_blocks(format: BlockFormat, shape: &[u32], data: &[u8]) -> Result<Self> {
        wrap(layers::from_blocks(format, shape, data))
    }

    /// The block format of a tensor from [`Tensor::from_blocks`]; `None`
    /// for others (whose [`Tensor::dtype`] tells their type).
    pub fn block_format(&self) -> Option<BlockFormat> {
        layers::format(&self.0)
    }

    /// Linear layers over `self` (`[..., in]`): `self · wᵀ` for each weight
    /// matrix `w` (`[out, in]`, as models store them; f32 or blocks), the
    /// results side by side in the last dimension. Several matrices of one
    /// input (a transformer's query, key and value) cost one pass over it.
    pub fn linear(&self, weights: &[&Tensor]) -> Result<Tensor> {
        let handles: Vec<&raw::Tensor> = weights.iter().map(|t| &t.0).collect();
        wrap(layers::linear(&self.0, &handles))
    }

    /// SwiGLU over the last dimension (`[..., 2n]` → `[..., n]`):
    /// `silu(gate) · up` of its two halves.
    pub fn swiglu(&self) -> Result<Tensor> {
        wrap(layers::swiglu(&self.0))
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: Dtype, shape: &[u32]) -> Result<Self> {
        wrap(raw::Tensor::zeros(dtype, shape))
    }

    /// The shape.
    pub fn shape(&self) -> Vec<u32> {
        self.0.shape()
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.0.dtype()
    }

    /// Copy the data back as raw little-endian bytes.
    pub fn read(&self) -> Result<Vec<u8>> {
        self.0.read().map_err(TensorError::from)
    }

    /// Copy the data back as `f32` values (cast on the host if needed).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.0.read_f32().map_err(TensorError::from)
    }

    /// The generated handle, for calls this wrapper does not cover.
    pub fn raw(&self) -> &raw::Tensor {
        &self.0
    }

    /// Wrap a handle the generated bindings returned.
    pub fn from_raw(tensor: raw::Tensor) -> Self {
        Self(tensor)
    }

    /// Matrix product of the last two dimensions; leading (batch)
    /// dimensions broadcast.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        wrap(raw::matmul(&self.0, &other.0))
    }

    /// `self + other`, broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        wrap(raw::add(&self.0, &other.0))
    }

    /// `self - other`, broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        wrap(raw::sub(&self.0, &other.0))
    }

    /// `self * other` elementwise, broadcasting.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        wrap(raw::mul(&self.0, &other.0))
    }

    /// `self / other` elementwise, broadcasting.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        wrap(raw::div(&self.0, &other.0))
    }

    /// `self * scale + offset`.
    pub fn affine(&self, scale: f32, offset: f32) -> Result<Tensor> {
        wrap(raw::affine(&self.0, scale, offset))
    }

    /// `max(x, 0)`.
    pub fn relu(&self) -> Result<Tensor> {
        wrap(raw::relu(&self.0))
    }

    /// GELU (erf form).
    pub fn gelu(&self) -> Result<Tensor> {
        wrap(raw::gelu(&self.0))
    }

    /// SiLU, `x * sigmoid(x)`.
    pub fn silu(&self) -> Result<Tensor> {
        wrap(raw::silu(&self.0))
    }

    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        wrap(raw::tanh(&self.0))
    }

    /// `e^x`.
    pub fn exp(&self) -> Result<Tensor> {
        wrap(raw::exp(&self.0))
    }

    /// Softmax over `dim` (negative counts from the end).
    pub fn softmax(&self, dim: i32) -> Result<Tensor> {
        wrap(raw::softmax(&self.0, dim))
    }

    /// Layer normalisation over the last dimension, with optional weight
    /// and bias of that dimension's size.
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        wrap(raw::layer_norm(
            &self.0,
            weight.map(|w| &w.0),
            bias.map(|b| &b.0),
            eps,
        ))
    }

    /// RMS normalisation over the last dimension with an optional weight.
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        wrap(raw::rms_norm(&self.0, weight.map(|w| &w.0), eps))
    }

    /// Sum over `dim`.
    pub fn sum(&self, dim: i32, keep_dim: bool) -> Result<Tensor> {
        wrap(raw::sum(&self.0, dim, keep_dim))
    }

    /// Mean over `dim`.
    pub fn mean(&self, dim: i32, keep_dim: bool) -> Result<Tensor> {
        wrap(raw::mean(&self.0, dim, keep_dim))
    }

    /// Maximum over `dim`.
    pub fn max(&self, dim: i32, keep_dim: bool) -> Result<Tensor> {
        wrap(raw::max(&self.0, dim, keep_dim))
    }

    /// Index of the maximum over `dim`, as `u32`.
    pub fn argmax(&self, dim: i32, keep_dim: bool) -> Result<Tensor> {
        wrap(raw::argmax(&self.0, dim, keep_dim))
    }

    /// Swap two dimensions.
    pub fn transpose(&self, dim0: i32, dim1: i32) -> Result<Tensor> {
        wrap(raw::transpose(&self.0, dim0, dim1))
    }

    /// Reorder all dimensions.
    pub fn permute(&self, dims: &[u32]) -> Result<Tensor> {
        wrap(raw::permute(&self.0, dims))
    }

    /// Same data, new shape; one entry may be `-1`.
    pub fn reshape(&self, shape: &[i64]) -> Result<Tensor> {
        wrap(raw::reshape(&self.0, shape))
    }

    /// `len` entries of `dim` from `start`.
    pub fn slice(&self, dim: i32, start: u32, len: u32) -> Result<Tensor> {
        wrap(raw::slice(&self.0, dim, start, len))
    }

    /// Join `tensors` along `dim`.
    pub fn concat(tensors: &[&Tensor], dim: i32) -> Result<Tensor> {
        let handles: Vec<&raw::Tensor> = tensors.iter().map(|t| &t.0).collect();
        wrap(raw::concat(&handles, dim))
    }

    /// Rows of `self` (a table) picked by integer `indices`: the result has
    /// shape `indices.shape ++ self.shape[1..]`. Out-of-range indices give
    /// rows of zeros.
    pub fn gather(&self, indices: &Tensor) -> Result<Tensor> {
        wrap(raw::gather(&self.0, &indices.0))
    }

    /// Convert to another element type.
    pub fn cast(&self, to: Dtype) -> Result<Tensor> {
        wrap(raw::cast(&self.0, to))
    }
}
