//! Device discovery and setup: the CUDA libraries, the context, its stream
//! and cuBLAS handle, loading the compiled kernels, and buffers.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError,
};
use cudarc::nvrtc;

use super::compile::{
    PROGRAMS, Target, choose_target, compile_all, nvrtc_supported_archs, nvrtc_version,
    panic_message,
};
use crate::backend::{BackendKind, DeviceDescription};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};

/// A device allocation of the CUDA backend (at least the bytes asked for,
/// rounded up to whole 4-byte words).
pub struct CudaBuffer {
    pub(super) slice: CudaSlice<u8>,
}

impl CudaBuffer {
    /// Usable bytes.
    pub(super) fn len(&self) -> usize {
        self.slice.len()
    }
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("bytes", &self.len())
            .finish()
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        // Tensors are dropped on whatever thread lets go last, and cudarc's
        // CudaSlice frees (cuMemFreeAsync / cuMemFree) without making its
        // context current, so do that here first; the slice field is freed
        // right after this body. Raw cuCtxSetCurrent rather than
        // `bind_to_thread`, which would consume a recorded error and skip
        // the binding.
        let ctx = self.slice.context();
        // SAFETY: the context outlives the slice (the slice holds an Arc to
        // its stream, which holds one to the context).
        let bound = unsafe { driver::result::ctx::set_current(ctx.cu_ctx()) };
        if let Err(err) = bound {
            tracing::warn!(error = %err, "cuda: cannot bind the context to free a buffer");
        }
    }
}

/// One CUDA device: a context, one stream, a cuBLAS handle and the compiled
/// kernels.
pub struct CudaBackend {
    // Field order is drop order: kernels and cuBLAS before the stream and
    // the context they live in.
    functions: HashMap<&'static str, CudaFunction>,
    pub(super) blas: CudaBlas,
    pub(super) stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    pub(super) description: DeviceDescription,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.description)
            .finish_non_exhaustive()
    }
}

/// The shared library cudarc cannot find, if any, with the names it tried.
fn missing_library() -> Option<String> {
    // SAFETY: these only try to dlopen the libraries.
    let present = [
        ("libcuda (the NVIDIA driver)", "cuda", unsafe {
            driver::sys::is_culib_present()
        }),
        ("libnvrtc (the CUDA runtime compiler)", "nvrtc", unsafe {
            nvrtc::sys::is_culib_present()
        }),
        ("libcublas", "cublas", unsafe {
            cublas::sys::is_culib_present()
        }),
    ];
    present.into_iter().find(|p| !p.2).map(|(what, lib, _)| {
        let tried = cudarc::get_lib_name_candidates(lib);
        format!(
            "the CUDA backend needs {what}, which was not found (tried {}); install it and put its directory on LD_LIBRARY_PATH",
            tried.join(", ")
        )
    })
}

/// A driver failure as a bridge error (`out-of-memory` when it is one),
/// keeping the driver's error as the source.
pub(super) fn driver_error(what: &str, err: DriverError) -> BridgeError {
    let code = if err.0 == driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        ErrorCode::OutOfMemory
    } else {
        ErrorCode::Backend
    };
    BridgeError::new(code, format!("cuda: {what}: {err}")).with_source(err)
}

/// A cuBLAS failure as a `backend` error, keeping cuBLAS's error as the
/// source.
pub(super) fn blas_error(what: &str, err: cublas::result::CublasError) -> BridgeError {
    BridgeError::backend(format!("cuda: {what}: cuBLAS {err}")).with_source(err)
}

impl CudaBackend {
    /// Open device `ordinal`: create its context, one stream and a cuBLAS
    /// handle, and compile every kernel with NVRTC. `unsupported` when the
    /// CUDA libraries are missing, `not-found` when there is no such device.
    pub fn open(ordinal: usize) -> Result<Self> {
        if let Some(missing) = missing_library() {
            return Err(BridgeError::unsupported(missing));
        }
        // cudarc panics rather than failing in a few places (a symbol
        // missing from an old driver, a library vanishing); a backend that
        // cannot open must not take the host down with it.
        catch_unwind(AssertUnwindSafe(|| Self::open_checked(ordinal))).unwrap_or_else(|panic| {
            Err(BridgeError::backend(format!(
                "cuda: opening device {ordinal} panicked: {}",
                panic_message(panic.as_ref())
            )))
        })
    }

    fn open_checked(ordinal: usize) -> Result<Self> {
        let ctx = context(ordinal)?;
        let (stream, blas) = stream_and_blas(&ctx)?;
        let name = ctx
            .name()
            .map_err(|e| driver_error("cannot read the device name", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_error("cannot read the compute capability", e))?;
        let memory = ctx
            .total_mem()
            .map_err(|e| driver_error("cannot read the memory size", e))?;
        let arch = u32::try_from(major * 10 + minor).unwrap_or(0);
        let supported = nvrtc_supported_archs().map_err(BridgeError::backend)?;
        let target = choose_target(arch, &supported).ok_or_else(|| {
            BridgeError::unsupported(format!(
                "cuda: NVRTC supports none of the architectures up to sm_{arch} of {name} (it supports {supported:?})"
            ))
        })?;
        let functions = load_kernels(&ctx, target)?;
        let version = nvrtc_version().map_or_else(|_| "?".to_owned(), |(a, b)| format!("{a}.{b}"));
        tracing::info!(device = %name, arch = %target, nvrtc = %version, "cuda: device opened");
        Ok(Self {
            functions,
            blas,
            stream,
            ctx,
            description: DeviceDescription {
                kind: BackendKind::Cuda,
                name: format!("{name} (sm_{arch})"),
                is_gpu: true,
                memory_bytes: u64::try_from(memory).unwrap_or(u64::MAX),
                arithmetic_dtypes: vec![DType::F32, DType::F16, DType::BF16],
                fused_attention: false,
                linear: false,
            },
        })
    }

    pub(super) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cannot bind the context", e))
    }

    pub(super) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| BridgeError::backend(format!("cuda: kernel {name} was not loaded")))
    }

    pub(super) fn ptr(&self, buffer: &CudaBuffer) -> u64 {
        // Event tracking is off, so the guard cudarc returns records nothing.
        let (ptr, _guard) = buffer.slice.device_ptr(&self.stream);
        ptr
    }
}

/// The context of device `ordinal`, or `not-found` when there is none.
fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let count = match CudaContext::device_count() {
        Ok(count) => usize::try_from(count).unwrap_or(0),
        Err(err) if err.0 == driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
        Err(err) => return Err(driver_error("cannot initialise the driver", err)),
    };
    if ordinal >= count {
        return Err(BridgeError::new(
            ErrorCode::NotFound,
            format!("cuda: no device {ordinal} (this machine has {count})"),
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("cannot create a context", e))?;
    // SAFETY: every buffer and kernel of this backend uses the one stream
    // `stream_and_blas` creates, so the per-buffer events cudarc would
    // record to order work across streams are never needed (and cost an
    // event pair per allocation). Set before anything is allocated, as
    // required.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// The backend's one stream and a cuBLAS handle on it, set to full
/// precision.
fn stream_and_blas(ctx: &Arc<CudaContext>) -> Result<(Arc<CudaStream>, CudaBlas)> {
    let stream = ctx
        .new_stream()
        .map_err(|e| driver_error("cannot create a stream", e))?;
    let blas =
        CudaBlas::new(stream.clone()).map_err(|e| blas_error("cannot create a handle", e))?;
    // Full-precision FP32 GEMM (never TF32), and F32 accumulation for
    // F16/BF16 even in split-K reductions.
    // SAFETY: a live handle.
    unsafe {
        cublas::sys::cublasSetMathMode(
            *blas.handle(),
            cublas::sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
        )
    }
    .result()
    .map_err(|e| blas_error("cannot set the math mode", e))?;
    Ok((stream, blas))
}

/// Compile every program for `target` and load its kernels into `ctx`.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    target: Target,
) -> Result<HashMap<&'static str, CudaFunction>> {
    let images = compile_all(target)
        .map_err(|log| BridgeError::backend(format!("cuda: NVRTC failed: {log}")))?;
    let mut functions = HashMap::new();
    for (program, image) in PROGRAMS.iter().zip(images) {
        let module = ctx
            .load_module(nvrtc::Ptx::from_binary(image))
            .map_err(|e| driver_error(&format!("cannot load {} ({target})", program.name), e))?;
        for &function in program.functions {
            let loaded = module.load_function(function).map_err(|e| {
                driver_error(&format!("{} has no kernel {function}", program.name), e)
            })?;
            functions.insert(function, loaded);
        }
    }
    Ok(functions)
}
