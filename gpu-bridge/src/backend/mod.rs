//! The device abstraction: one trait, one module per backend.
//!
//! A backend owns one device and is driven by exactly one worker thread (see
//! [`crate::device`]), so its methods take `&mut self` and need no locking.
//! Buffers are the exception: they are dropped wherever the last tensor that
//! shares them is dropped, so `Buffer` must free itself correctly from any
//! thread.

use crate::error::Result;
use crate::kernel::Kernel;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;
#[cfg(not(feature = "wgpu"))]
#[path = "wgpu_stub.rs"]
pub mod wgpu;

/// Which implementation runs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Multi-threaded CPU kernels (always compiled).
    Cpu,
    /// WGSL compute shaders through wgpu (feature `wgpu`).
    Wgpu,
    /// NVRTC kernels and cuBLAS through cudarc (feature `cuda`).
    Cuda,
}

impl BackendKind {
    /// The name used in policies, WIT `device-info` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a backend says about its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescription {
    /// Which backend this is.
    pub kind: BackendKind,
    /// The adapter or device name as the driver reports it.
    pub name: String,
    /// True only for real GPU hardware: a software rasteriser such as
    /// lavapipe, or the CPU backend, is not a GPU.
    pub is_gpu: bool,
    /// Device memory the bridge may fill, in bytes.
    pub memory_bytes: u64,
    /// Float dtypes the arithmetic kernels accept (always `F32`; `F16` and
    /// `BF16` where the backend has them). The bridge refuses others with
    /// `unsupported` before queuing anything.
    pub arithmetic_dtypes: Vec<crate::DType>,
    /// Whether the backend runs [`crate::Op::Attention`] (the cpu backend,
    /// where it replaces a dozen memory-bound ops a layer). Model code
    /// composes attention from plain ops where it does not.
    pub fused_attention: bool,
    /// Whether the backend runs [`crate::Op::Linear`] and
    /// [`crate::Op::SwiGlu`] (the cpu backend, with quantized weights, whose
    /// dtypes its `arithmetic_dtypes` list, and with f16/bf16 weights times
    /// f32 inputs). Model code uses `matmul` and elementwise ops where it
    /// does not.
    pub linear: bool,
}

/// One device's kernels and memory. See the module docs for threading.
pub trait Backend: Send + 'static {
    /// A device allocation holding a tensor's data.
    type Buffer: Send + Sync + 'static;

    /// What this device is.
    fn describe(&self) -> DeviceDescription;

    /// A buffer of at least `bytes` bytes with unspecified contents.
    fn alloc(&mut self, bytes: usize) -> Result<Self::Buffer>;

    /// A buffer holding a copy of `data`.
    fn upload(&mut self, data: &[u8]) -> Result<Self::Buffer>;

    /// The first `bytes` bytes of `buffer`, after all work already submitted
    /// that writes it has finished.
    fn download(&mut self, buffer: &Self::Buffer, bytes: usize) -> Result<Vec<u8>>;

    /// Run `kernel`, reading `inputs` and writing all of `output`. May
    /// return before the device finishes; later calls see the result.
    fn run(
        &mut self,
        kernel: &Kernel,
        inputs: &[&Self::Buffer],
        output: &mut Self::Buffer,
    ) -> Result<()>;

    /// Wait until all submitted work has finished.
    fn synchronize(&mut self) -> Result<()>;

    /// A thread pool the device's worker loop should run on instead of a
    /// thread of its own. The cpu backend's kernels fan out over rayon;
    /// from a thread outside the pool every parallel kernel would hand its
    /// work in and park until it is done, which cost 25–55 µs per kernel
    /// here (MiniLM's 24 matrix products for one sentence, half of them).
    /// From one of the pool's threads the worker takes a share of the work
    /// itself and wakes only the others.
    fn worker_pool(&self) -> Option<std::sync::Arc<rayon::ThreadPool>> {
        None
    }
}
