//! Host-side tensors and ops behind `gust:gpu`.
//!
//! This crate knows nothing about WebAssembly. The host links it through one
//! thin module that turns WIT calls into calls on a [`Device`]; a guest's
//! tensors are [`Tensor`] handles whose data stays on the device between ops.
//!
//! - [`backend`]: the [`Backend`] trait and one module per backend (cpu
//!   always; wgpu and cuda behind cargo features, with stand-ins that answer
//!   "not compiled with X" otherwise).
//! - [`kernel`]: fully shape-checked work items a backend runs.
//! - [`Op`]: what callers ask for; validated and lowered to kernels.
//! - [`device`]: one worker thread per device with a bounded queue; async
//!   callers submit and await, never blocking their executor.
//! - [`Account`]: per-owner accounting of device bytes and device time, with
//!   quotas.

#[cfg(target_endian = "big")]
compile_error!("gust-gpu-bridge assumes a little-endian host (tensor bytes are little-endian)");

mod account;
pub mod backend;
mod bridge;
pub mod device;
pub mod dtype;
pub mod error;
pub mod kernel;
pub mod models;
mod op;
pub(crate) mod quant;

pub use account::{Account, DEFAULT_TIME_PER_MINUTE};
pub use backend::{Backend, BackendKind, DeviceDescription};
pub use bridge::{Bridge, BridgeConfig};
pub use device::{Device, DeviceOptions, Tensor};
pub use dtype::DType;
pub use error::{BridgeError, ErrorCode, Result};
pub use kernel::{BinaryOp, Kernel, ReduceOp, UnaryOp};
pub use models::{FinishReason, GenerateParams, Generation};
pub use op::{MAX_MATMUL_BATCH, Op, Operand, Plan, Work, broadcast, element_count};
