//! The CUDA backend: NVRTC-compiled kernels and cuBLAS, through cudarc.
//!
//! - Libraries: cudarc loads libcuda, libnvrtc and libcublas at run time
//!   (`dynamic-loading`), so a binary built with the `cuda` feature starts
//!   everywhere; [`CudaBackend::open`] checks that all three can be found
//!   before touching them and answers `unsupported` otherwise.
//! - Kernels: the `.cu` files next to this module (listed by
//!   [`kernel_sources`]) are compiled once per [`CudaBackend::open`] with
//!   NVRTC, for the device's exact architecture (a CUBIN, so the driver never
//!   has to JIT PTX from a newer toolkit than itself), or as PTX for the
//!   newest architecture NVRTC knows when the device is newer than NVRTC.
//!   Fast math stays off: accuracy is the contract (relative error 1e-5
//!   against f64 for F32).
//! - Matmul runs on cuBLAS (sgemm for F32; GemmEx with F32 accumulation for
//!   F16/BF16), strided-batched when the batch offsets are evenly spaced.
//! - Everything runs in order on one non-blocking stream, so cudarc's
//!   cross-stream event tracking is switched off; `download` and
//!   `synchronize` wait for that stream.
//! - F16 and BF16 compute kernels load half-precision values, compute in f32
//!   (f64 for accumulators) and round once on store, as the CPU backend does.
//! - The CUDA API version cudarc binds is picked at build time (feature
//!   `cuda` = CUDA 13.x, `cuda-12` = 12.8, or `CUDARC_CUDA_VERSION`; see
//!   gpu-bridge/Cargo.toml). `scripts/gpu-check.sh` builds and runs these
//!   tests for a GPU machine.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    self, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    LaunchArgs, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc;

use crate::backend::{Backend, BackendKind, DeviceDescription};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::kernel::{BinaryOp, Kernel, MAX_RANK, ReduceOp, UnaryOp};

/// One NVRTC program: the shared prelude plus one `.cu` file, and the
/// `extern "C"` kernels it defines (the `ptx_compiles` test checks this
/// list against the compiled code).
struct Program {
    name: &'static str,
    source: &'static str,
    functions: &'static [&'static str],
}

/// Every program the backend compiles at open.
const PROGRAMS: &[Program] = &[
    Program {
        name: "elementwise.cu",
        source: concat!(
            include_str!("cuda/common.cuh"),
            include_str!("cuda/elementwise.cu")
        ),
        functions: &[
            "unary_f32",
            "unary_f16",
            "unary_bf16",
            "affine_f32",
            "affine_f16",
            "affine_bf16",
            "binary_f32",
            "binary_f16",
            "binary_bf16",
        ],
    },
    Program {
        name: "reduce.cu",
        source: concat!(
            include_str!("cuda/common.cuh"),
            include_str!("cuda/reduce.cu")
        ),
        functions: &[
            "reduce_rows_f32",
            "reduce_rows_f16",
            "reduce_rows_bf16",
            "reduce_cols_f32",
            "reduce_cols_f16",
            "reduce_cols_bf16",
            "argmax_rows_f32",
            "argmax_rows_f16",
            "argmax_rows_bf16",
            "argmax_cols_f32",
            "argmax_cols_f16",
            "argmax_cols_bf16",
            "softmax_rows_f32",
            "softmax_rows_f16",
            "softmax_rows_bf16",
            "softmax_cols_f32",
            "softmax_cols_f16",
            "softmax_cols_bf16",
        ],
    },
    Program {
        name: "norm.cu",
        source: concat!(
            include_str!("cuda/common.cuh"),
            include_str!("cuda/norm.cu")
        ),
        functions: &[
            "layer_norm_f32",
            "layer_norm_f16",
            "layer_norm_bf16",
            "rms_norm_f32",
            "rms_norm_f16",
            "rms_norm_bf16",
        ],
    },
    Program {
        name: "movement.cu",
        source: concat!(
            include_str!("cuda/common.cuh"),
            include_str!("cuda/movement.cu")
        ),
        functions: &[
            "permute_u16",
            "permute_u32",
            "copy_rows_u16",
            "copy_rows_u32",
            "gather_u16",
            "gather_u32",
        ],
    },
    Program {
        name: "cast.cu",
        source: concat!(
            include_str!("cuda/common.cuh"),
            include_str!("cuda/cast.cu")
        ),
        functions: &[
            "cast_f32_f16",
            "cast_f32_bf16",
            "cast_f32_i32",
            "cast_f32_u32",
            "cast_f16_f32",
            "cast_f16_bf16",
            "cast_f16_i32",
            "cast_f16_u32",
            "cast_bf16_f32",
            "cast_bf16_f16",
            "cast_bf16_i32",
            "cast_bf16_u32",
            "cast_i32_f32",
            "cast_i32_f16",
            "cast_i32_bf16",
            "cast_i32_u32",
            "cast_u32_f32",
            "cast_u32_f16",
            "cast_u32_bf16",
            "cast_u32_i32",
        ],
    },
];

/// Every CUDA kernel source, by name: each is one complete NVRTC program
/// (the shared prelude followed by one `.cu` file).
pub fn kernel_sources() -> Vec<(&'static str, &'static str)> {
    PROGRAMS.iter().map(|p| (p.name, p.source)).collect()
}

/// Threads per block of elementwise and per-output kernels.
const BLOCK: u32 = 256;
/// Grid cap: with at most 1024 threads per block a 32-bit grid-stride index
/// stays below 2^31 + 2^26, so kernels can index with `u32` (see
/// common.cuh); larger work loops.
const MAX_BLOCKS: u32 = 65_536;
/// Below this many outputs a reduction gives each output a whole block.
const ROWS_LAYOUT_BELOW: usize = 8192;

/// A device allocation of the CUDA backend (at least the bytes asked for,
/// rounded up to whole 4-byte words).
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
}

impl CudaBuffer {
    /// Usable bytes.
    fn len(&self) -> usize {
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
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    description: DeviceDescription,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.description)
            .finish_non_exhaustive()
    }
}

/// What NVRTC should produce for a device with compute capability `X.Y`
/// (written `XY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Machine code for exactly this architecture (`sm_XY`).
    Cubin(u32),
    /// PTX for this architecture (`compute_XY`), JIT-compiled by the driver.
    Ptx(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cubin(arch) => write!(f, "sm_{arch}"),
            Self::Ptx(arch) => write!(f, "compute_{arch}"),
        }
    }
}

/// The NVRTC options every program is compiled with. No fast math: IEEE
/// division and square root, denormals kept.
fn compile_options(target: Target) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}

/// A device of compute capability `device` (as `XY`) gets a CUBIN when NVRTC
/// supports it; otherwise PTX for the newest older architecture NVRTC
/// knows, which the driver can JIT for the device.
fn choose_target(device: u32, supported: &[u32]) -> Option<Target> {
    if supported.contains(&device) {
        return Some(Target::Cubin(device));
    }
    supported
        .iter()
        .copied()
        .filter(|&arch| arch <= device)
        .max()
        .map(Target::Ptx)
}

/// NVRTC's version, e.g. `(12, 9)`.
fn nvrtc_version() -> std::result::Result<(i32, i32), String> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: both pointers are valid for writes.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion: {e}"))?;
    Ok((major, minor))
}

/// The architectures (as `XY`) this NVRTC can compile for.
fn nvrtc_supported_archs() -> std::result::Result<Vec<u32>, String> {
    let mut count: c_int = 0;
    // SAFETY: the pointer is valid for writes.
    unsafe { nvrtc::sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(|e| format!("nvrtcGetNumSupportedArchs: {e}"))?;
    let mut archs: Vec<c_int> = vec![0; usize::try_from(count).unwrap_or(0)];
    if !archs.is_empty() {
        // SAFETY: `archs` has room for the `count` entries NVRTC writes.
        unsafe { nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| format!("nvrtcGetSupportedArchs: {e}"))?;
    }
    Ok(archs
        .into_iter()
        .filter_map(|a| u32::try_from(a).ok())
        .collect())
}

/// Destroys an NVRTC program however compilation ends.
struct NvrtcProgram(nvrtc::sys::nvrtcProgram);

impl Drop for NvrtcProgram {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        if let Err(err) = unsafe { nvrtc::result::destroy_program(self.0) } {
            tracing::warn!(error = %err, "nvrtcDestroyProgram failed");
        }
    }
}

fn c_chars_to_bytes(chars: &[c_char]) -> Vec<u8> {
    chars.iter().map(|&c| c as u8).collect()
}

/// Compile one program for `target`: a CUBIN, or NUL-terminated PTX text
/// (both are what cuModuleLoadData takes). The error carries NVRTC's log.
fn nvrtc_compile(name: &str, source: &str, target: Target) -> std::result::Result<Vec<u8>, String> {
    let c_source =
        CString::new(source).map_err(|_| format!("{name}: source contains a NUL byte"))?;
    let c_name = CString::new(name).map_err(|_| format!("{name}: name contains a NUL byte"))?;
    let program = NvrtcProgram(
        nvrtc::result::create_program(&c_source, Some(&c_name))
            .map_err(|e| format!("{name}: nvrtcCreateProgram: {e}"))?,
    );
    let options = compile_options(target);
    // SAFETY: `program` is a live program; the options are plain strings.
    let compiled = unsafe { nvrtc::result::compile_program(program.0, &options) };
    if let Err(err) = compiled {
        // SAFETY: as above.
        let log = unsafe { nvrtc::result::get_program_log(program.0) }
            .map(|raw| {
                String::from_utf8_lossy(&c_chars_to_bytes(&raw))
                    .trim_end_matches('\0')
                    .to_owned()
            })
            .unwrap_or_else(|e| format!("(no log: {e})"));
        return Err(format!("{name}: {err} with options {options:?}:\n{log}"));
    }
    match target {
        Target::Ptx(_) => {
            // SAFETY: compiled successfully above.
            let ptx = unsafe { nvrtc::result::get_ptx(program.0) }
                .map_err(|e| format!("{name}: nvrtcGetPTX: {e}"))?;
            let mut bytes = c_chars_to_bytes(&ptx);
            if bytes.last() != Some(&0) {
                bytes.push(0);
            }
            Ok(bytes)
        }
        Target::Cubin(_) => {
            let mut size = 0usize;
            // SAFETY: compiled successfully; the pointer is valid for writes.
            unsafe { nvrtc::sys::nvrtcGetCUBINSize(program.0, &mut size) }
                .result()
                .map_err(|e| format!("{name}: nvrtcGetCUBINSize: {e}"))?;
            let mut cubin: Vec<c_char> = vec![0; size];
            // SAFETY: `cubin` has the `size` bytes NVRTC writes.
            unsafe { nvrtc::sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr()) }
                .result()
                .map_err(|e| format!("{name}: nvrtcGetCUBIN: {e}"))?;
            Ok(c_chars_to_bytes(&cubin))
        }
    }
}

/// Compile every program in parallel (NVRTC programs are independent and
/// NVRTC is thread-safe), in `PROGRAMS` order.
fn compile_all(target: Target) -> std::result::Result<Vec<Vec<u8>>, String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = PROGRAMS
            .iter()
            .map(|p| scope.spawn(move || nvrtc_compile(p.name, p.source, target)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|panic| {
                    Err(format!("NVRTC panicked: {}", panic_message(panic.as_ref())))
                })
            })
            .collect()
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
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

fn driver_error(what: &str, err: DriverError) -> BridgeError {
    if err.0 == driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        BridgeError::new(ErrorCode::OutOfMemory, format!("cuda: {what}: {err}"))
    } else {
        BridgeError::backend(format!("cuda: {what}: {err}"))
    }
}

fn blas_error(what: &str, err: cublas::result::CublasError) -> BridgeError {
    BridgeError::backend(format!("cuda: {what}: cuBLAS {err}"))
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
        let ctx =
            CudaContext::new(ordinal).map_err(|e| driver_error("cannot create a context", e))?;
        // SAFETY: every buffer and kernel of this backend uses the one stream
        // below, so the per-buffer events cudarc would record to order work
        // across streams are never needed (and cost an event pair per
        // allocation). Set before anything is allocated, as required.
        unsafe { ctx.disable_event_tracking() };
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
        let images = compile_all(target)
            .map_err(|log| BridgeError::backend(format!("cuda: NVRTC failed: {log}")))?;
        let mut functions = HashMap::new();
        for (program, image) in PROGRAMS.iter().zip(images) {
            let module = ctx
                .load_module(nvrtc::Ptx::from_binary(image))
                .map_err(|e| {
                    driver_error(&format!("cannot load {} ({target})", program.name), e)
                })?;
            for &function in program.functions {
                let loaded = module.load_function(function).map_err(|e| {
                    driver_error(&format!("{} has no kernel {function}", program.name), e)
                })?;
                functions.insert(function, loaded);
            }
        }
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
            },
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cannot bind the context", e))
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| BridgeError::backend(format!("cuda: kernel {name} was not loaded")))
    }

    fn ptr(&self, buffer: &CudaBuffer) -> u64 {
        // Event tracking is off, so the guard cudarc returns records nothing.
        let (ptr, _guard) = buffer.slice.device_ptr(&self.stream);
        ptr
    }
}

/// Elementwise launch shape for `n` items, grid-stride beyond the cap.
fn flat_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS as usize);
    LaunchConfig {
        grid_dim: (u32::try_from(blocks).unwrap_or(MAX_BLOCKS), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of `len` items, as many threads as help (a power of
/// two from 32 to `max_threads`).
fn rows_config(rows: usize, len: usize, max_threads: u32) -> LaunchConfig {
    let threads = len.next_power_of_two().clamp(32, max_threads as usize);
    LaunchConfig {
        grid_dim: (
            u32::try_from(rows.clamp(1, MAX_BLOCKS as usize)).unwrap_or(MAX_BLOCKS),
            1,
            1,
        ),
        block_dim: (u32::try_from(threads).unwrap_or(BLOCK), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether a reduction over `[outer, len, inner]` gives each output a block
/// (`_rows` kernels) rather than a thread (`_cols` kernels): blocks when
/// the rows are contiguous and long enough to share, or when there are too
/// few outputs to fill the device one thread each.
fn reduce_by_rows(outputs: usize, len: usize, inner: usize) -> bool {
    outputs < ROWS_LAYOUT_BELOW || (inner == 1 && len >= 64)
}

fn u32_arg(value: usize, what: &str, kernel: &Kernel) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        BridgeError::invalid(format!(
            "cuda {}: {what} {value} does not fit in 32 bits",
            kernel.name()
        ))
    })
}

fn input<'a>(
    inputs: &[&'a CudaBuffer],
    index: usize,
    bytes: usize,
    kernel: &Kernel,
) -> Result<&'a CudaBuffer> {
    let buffer = inputs.get(index).copied().ok_or_else(|| {
        BridgeError::backend(format!("cuda {}: input {index} is missing", kernel.name()))
    })?;
    if buffer.len() < bytes {
        return Err(BridgeError::backend(format!(
            "cuda {}: input {index} holds {} bytes, the kernel reads {bytes}",
            kernel.name(),
            buffer.len()
        )));
    }
    Ok(buffer)
}

fn check_output(output: &CudaBuffer, bytes: usize, kernel: &Kernel) -> Result<()> {
    if output.len() < bytes {
        return Err(BridgeError::backend(format!(
            "cuda {}: the output holds {} bytes, the kernel writes {bytes}",
            kernel.name(),
            output.len()
        )));
    }
    Ok(())
}

/// Kernel-name suffix of a compute dtype.
fn float_suffix(dtype: DType, kernel: &Kernel) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        DType::I32 | DType::U32 => Err(BridgeError::shape(format!(
            "{} needs a float dtype, not {dtype}",
            kernel.name()
        ))),
    }
}

/// Kernel-name suffix of a raw element size.
fn elem_suffix(elem_size: usize, kernel: &Kernel) -> Result<&'static str> {
    match elem_size {
        2 => Ok("u16"),
        4 => Ok("u32"),
        _ => Err(BridgeError::invalid(format!(
            "cuda {}: elements of {elem_size} bytes (only 2 and 4)",
            kernel.name()
        ))),
    }
}

// Operation codes: the GUST_* constants of common.cuh.
fn unary_code(op: UnaryOp) -> i32 {
    match op {
        UnaryOp::Relu => 0,
        UnaryOp::Gelu => 1,
        UnaryOp::Silu => 2,
        UnaryOp::Tanh => 3,
        UnaryOp::Exp => 4,
    }
}

fn binary_code(op: BinaryOp) -> i32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
    }
}

fn reduce_code(op: ReduceOp) -> i32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        // ArgMax has kernels of its own.
        ReduceOp::Max | ReduceOp::ArgMax => 2,
    }
}

/// Drop size-1 dimensions and merge neighbours that every operand walks
/// contiguously (outer stride = inner stride × inner extent), so kernels do
/// fewer divisions per element; a fully merged shape is `[n]`. The result
/// addresses exactly the same elements in the same order.
fn merge_dims<const N: usize>(
    shape: &[usize],
    strides: [&[usize]; N],
) -> (Vec<usize>, [Vec<usize>; N]) {
    let mut merged_shape: Vec<usize> = Vec::with_capacity(shape.len());
    let mut merged: [Vec<usize>; N] = std::array::from_fn(|_| Vec::with_capacity(shape.len()));
    for (d, &extent) in shape.iter().enumerate() {
        if extent == 1 {
            continue;
        }
        let stride = |k: usize| strides[k].get(d).copied().unwrap_or(0);
        let joins = merged_shape.last().is_some_and(|_| {
            (0..N).all(|k| merged[k].last().copied() == stride(k).checked_mul(extent))
        });
        if let (true, Some(last)) = (joins, merged_shape.last_mut()) {
            *last *= extent;
            for (k, m) in merged.iter_mut().enumerate() {
                if let Some(s) = m.last_mut() {
                    *s = stride(k);
                }
            }
        } else {
            merged_shape.push(extent);
            for (k, m) in merged.iter_mut().enumerate() {
                m.push(stride(k));
            }
        }
    }
    if merged_shape.is_empty() {
        merged_shape.push(1);
        for m in &mut merged {
            m.push(0);
        }
    }
    (merged_shape, merged)
}

/// Largest element index `shape`/`strides` reach, plus one (0 if empty).
fn extent_of(shape: &[usize], strides: &[usize]) -> usize {
    if shape.contains(&0) {
        return 0;
    }
    shape
        .iter()
        .zip(strides)
        .map(|(&n, &s)| (n - 1).saturating_mul(s))
        .fold(1usize, usize::saturating_add)
}

/// `GustBinaryLayout` of elementwise.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct BinaryLayout {
    rank: u32,
    shape: [u32; MAX_RANK],
    lhs_stride: [u32; MAX_RANK],
    rhs_stride: [u32; MAX_RANK],
}

// SAFETY: plain `repr(C)` data laid out exactly like the CUDA struct.
unsafe impl DeviceRepr for BinaryLayout {}

/// `GustPermuteLayout` of movement.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PermuteLayout {
    rank: u32,
    shape: [u32; MAX_RANK],
    in_stride: [u32; MAX_RANK],
}

// SAFETY: plain `repr(C)` data laid out exactly like the CUDA struct.
unsafe impl DeviceRepr for PermuteLayout {}

/// Copy `values` into a fixed array of `u32`, failing if any does not fit.
fn to_u32_array(values: &[usize], what: &str, kernel: &Kernel) -> Result<[u32; MAX_RANK]> {
    let mut out = [0u32; MAX_RANK];
    if values.len() > MAX_RANK {
        return Err(BridgeError::invalid(format!(
            "cuda {}: rank {} is above {MAX_RANK}",
            kernel.name(),
            values.len()
        )));
    }
    for (slot, &v) in out.iter_mut().zip(values) {
        *slot = u32_arg(v, what, kernel)?;
    }
    Ok(out)
}

impl CudaBackend {
    /// Launch `name` with `args` (each pushed by reference), naming the
    /// kernel in any error.
    fn launch<'a>(
        &'a self,
        kernel: &Kernel,
        name: &str,
        cfg: LaunchConfig,
        push: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<()> {
        let function = self.function(name)?;
        let mut builder = self.stream.launch_builder(function);
        push(&mut builder);
        // SAFETY: every kernel's argument list is built to match its CUDA
        // signature right where it is launched, every buffer was checked to
        // hold what the kernel touches, and the kernels bound their loops by
        // the counts they are given.
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|e| driver_error(&format!("{} ({name}) launch failed", kernel.name()), e))
    }

    fn run_kernel(
        &self,
        kernel: &Kernel,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        match kernel {
            Kernel::Attention { .. } => Err(BridgeError::unsupported(format!(
                "{} runs on the cpu backend only; compose it from matmul and softmax",
                kernel.name()
            ))),
            Kernel::Unary { op, dtype, len } => {
                let suffix = float_suffix(*dtype, kernel)?;
                let bytes = len * dtype.size();
                let x = self.ptr(input(inputs, 0, bytes, kernel)?);
                check_output(output, bytes, kernel)?;
                let out = self.ptr(output);
                let (n, op) = (u32_arg(*len, "length", kernel)?, unary_code(*op));
                self.launch(kernel, &format!("unary_{suffix}"), flat_config(*len), |b| {
                    b.arg(&x).arg(&out).arg(&n).arg(&op);
                })
            }
            Kernel::Affine {
                dtype,
                len,
                scale,
                offset,
            } => {
                let suffix = float_suffix(*dtype, kernel)?;
                let bytes = len * dtype.size();
                let x = self.ptr(input(inputs, 0, bytes, kernel)?);
                check_output(output, bytes, kernel)?;
                let out = self.ptr(output);
                let n = u32_arg(*len, "length", kernel)?;
                self.launch(
                    kernel,
                    &format!("affine_{suffix}"),
                    flat_config(*len),
                    |b| {
                        b.arg(&x).arg(&out).arg(&n).arg(scale).arg(offset);
                    },
                )
            }
            Kernel::Binary {
                op,
                dtype,
                out_shape,
                lhs_strides,
                rhs_strides,
            } => self.binary(
                kernel,
                *op,
                *dtype,
                out_shape,
                lhs_strides,
                rhs_strides,
                inputs,
                output,
            ),
            Kernel::Matmul {
                dtype,
                m,
                k,
                n,
                lhs_offsets,
                rhs_offsets,
            } => self.matmul(
                kernel,
                *dtype,
                (*m, *k, *n),
                lhs_offsets,
                rhs_offsets,
                inputs,
                output,
            ),
            Kernel::Reduce {
                op,
                dtype,
                outer,
                len,
                inner,
            } => {
                let suffix = float_suffix(*dtype, kernel)?;
                let outputs = outer * inner;
                let x = self.ptr(input(inputs, 0, outputs * len * dtype.size(), kernel)?);
                let out_size = if *op == ReduceOp::ArgMax {
                    4
                } else {
                    dtype.size()
                };
                check_output(output, outputs * out_size, kernel)?;
                let out = self.ptr(output);
                let (o, l, i) = (
                    u32_arg(*outer, "outer", kernel)?,
                    u32_arg(*len, "length", kernel)?,
                    u32_arg(*inner, "inner", kernel)?,
                );
                u32_arg(outputs, "output count", kernel)?;
                let by_rows = reduce_by_rows(outputs, *len, *inner);
                let cfg = if by_rows {
                    rows_config(outputs, *len, BLOCK)
                } else {
                    flat_config(outputs)
                };
                let layout = if by_rows { "rows" } else { "cols" };
                if *op == ReduceOp::ArgMax {
                    self.launch(kernel, &format!("argmax_{layout}_{suffix}"), cfg, |b| {
                        b.arg(&x).arg(&out).arg(&o).arg(&l).arg(&i);
                    })
                } else {
                    let code = reduce_code(*op);
                    self.launch(kernel, &format!("reduce_{layout}_{suffix}"), cfg, |b| {
                        b.arg(&x).arg(&out).arg(&o).arg(&l).arg(&i).arg(&code);
                    })
                }
            }
            Kernel::Softmax {
                dtype,
                outer,
                len,
                inner,
            } => {
                let suffix = float_suffix(*dtype, kernel)?;
                let outputs = outer * inner;
                let bytes = outputs * len * dtype.size();
                let x = self.ptr(input(inputs, 0, bytes, kernel)?);
                check_output(output, bytes, kernel)?;
                let out = self.ptr(output);
                let (o, l, i) = (
                    u32_arg(*outer, "outer", kernel)?,
                    u32_arg(*len, "length", kernel)?,
                    u32_arg(*inner, "inner", kernel)?,
                );
                u32_arg(outputs, "row count", kernel)?;
                let by_rows = reduce_by_rows(outputs, *len, *inner);
                let (layout, cfg) = if by_rows {
                    ("rows", rows_config(outputs, *len, BLOCK))
                } else {
                    ("cols", flat_config(outputs))
                };
                self.launch(kernel, &format!("softmax_{layout}_{suffix}"), cfg, |b| {
                    b.arg(&x).arg(&out).arg(&o).arg(&l).arg(&i);
                })
            }
            Kernel::LayerNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
                bias,
            } => {
                let suffix = float_suffix(*dtype, kernel)?;
                let bytes = rows * cols * dtype.size();
                let row_bytes = cols * dtype.size();
                let x = self.ptr(input(inputs, 0, bytes, kernel)?);
                let mut next = 1;
                let w = if *weight {
                    next += 1;
                    self.ptr(input(inputs, next - 1, row_bytes, kernel)?)
                } else {
                    0
                };
                let bias_ptr = if *bias {
                    self.ptr(input(inputs, next, row_bytes, kernel)?)
                } else {
                    0
                };
                check_output(output, bytes, kernel)?;
                let out = self.ptr(output);
                let (r, c) = (
                    u32_arg(*rows, "rows", kernel)?,
                    u32_arg(*cols, "columns", kernel)?,
                );
                self.launch(
                    kernel,
                    &format!("layer_norm_{suffix}"),
                    rows_config(*rows, *cols, 512),
                    |b| {
                        b.arg(&x)
                            .arg(&w)
                            .arg(&bias_ptr)
                            .arg(&out)
                            .arg(&r)
                            .arg(&c)
                            .arg(eps);
                    },
                )
            }
            Kernel::RmsNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
            } => {
                let suffix = float_suffix(*dtype, kernel)?;
                let bytes = rows * cols * dtype.size();
                let x = self.ptr(input(inputs, 0, bytes, kernel)?);
                let w = if *weight {
                    self.ptr(input(inputs, 1, cols * dtype.size(), kernel)?)
                } else {
                    0
                };
                check_output(output, bytes, kernel)?;
                let out = self.ptr(output);
                let (r, c) = (
                    u32_arg(*rows, "rows", kernel)?,
                    u32_arg(*cols, "columns", kernel)?,
                );
                self.launch(
                    kernel,
                    &format!("rms_norm_{suffix}"),
                    rows_config(*rows, *cols, 512),
                    |b| {
                        b.arg(&x).arg(&w).arg(&out).arg(&r).arg(&c).arg(eps);
                    },
                )
            }
            Kernel::Permute {
                elem_size,
                in_shape,
                perm,
            } => self.permute(kernel, *elem_size, in_shape, perm, inputs, output),
            Kernel::Slice {
                elem_size,
                outer,
                in_len,
                start,
                len,
                inner,
            } => {
                let suffix = elem_suffix(*elem_size, kernel)?;
                if start + len > *in_len {
                    return Err(BridgeError::invalid(format!(
                        "cuda slice: {start}+{len} is past the dimension of {in_len}"
                    )));
                }
                let src = input(inputs, 0, outer * in_len * inner * elem_size, kernel)?;
                check_output(output, outer * len * inner * elem_size, kernel)?;
                self.copy_rows(
                    kernel,
                    suffix,
                    src,
                    output,
                    *outer,
                    len * inner,
                    (in_len * inner, start * inner),
                    (len * inner, 0),
                )
            }
            Kernel::Concat {
                elem_size,
                outer,
                lens,
                inner,
            } => {
                let suffix = elem_suffix(*elem_size, kernel)?;
                let total: usize = lens.iter().sum();
                check_output(output, outer * total * inner * elem_size, kernel)?;
                if inputs.len() != lens.len() {
                    return Err(BridgeError::backend(format!(
                        "cuda concat: {} inputs for {} lengths",
                        inputs.len(),
                        lens.len()
                    )));
                }
                let mut offset = 0;
                for (p, &len) in lens.iter().enumerate() {
                    if len > 0 {
                        let src = input(inputs, p, outer * len * inner * elem_size, kernel)?;
                        self.copy_rows(
                            kernel,
                            suffix,
                            src,
                            output,
                            *outer,
                            len * inner,
                            (len * inner, 0),
                            (total * inner, offset * inner),
                        )?;
                    }
                    offset += len;
                }
                Ok(())
            }
            Kernel::Gather {
                elem_size,
                index_dtype,
                indices,
                rows,
                row_len,
            } => {
                let suffix = elem_suffix(*elem_size, kernel)?;
                if !index_dtype.is_int() {
                    return Err(BridgeError::shape(format!(
                        "gather indices must be i32 or u32, not {index_dtype}"
                    )));
                }
                let table = self.ptr(input(inputs, 0, rows * row_len * elem_size, kernel)?);
                let index = self.ptr(input(inputs, 1, indices * 4, kernel)?);
                let total = indices * row_len;
                check_output(output, total * elem_size, kernel)?;
                let out = self.ptr(output);
                let (count, r, l) = (
                    u32_arg(*indices, "index count", kernel)?,
                    u32_arg(*rows, "rows", kernel)?,
                    u32_arg(*row_len, "row length", kernel)?,
                );
                u32_arg(total, "output length", kernel)?;
                self.launch(
                    kernel,
                    &format!("gather_{suffix}"),
                    flat_config(total),
                    |b| {
                        b.arg(&table)
                            .arg(&index)
                            .arg(&out)
                            .arg(&count)
                            .arg(&r)
                            .arg(&l);
                    },
                )
            }
            Kernel::Cast { from, to, len } => {
                let x = input(inputs, 0, len * from.size(), kernel)?;
                check_output(output, len * to.size(), kernel)?;
                if from == to {
                    return self.copy_bytes(kernel, x, output, len * to.size());
                }
                let (x, out) = (self.ptr(x), self.ptr(output));
                let n = u32_arg(*len, "length", kernel)?;
                self.launch(
                    kernel,
                    &format!("cast_{from}_{to}"),
                    flat_config(*len),
                    |b| {
                        b.arg(&x).arg(&out).arg(&n);
                    },
                )
            }
            #[allow(unreachable_patterns)]
            other => Err(BridgeError::unsupported(format!(
                "the cuda backend has no {} kernel",
                other.name()
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn binary(
        &self,
        kernel: &Kernel,
        op: BinaryOp,
        dtype: DType,
        out_shape: &[usize],
        lhs_strides: &[usize],
        rhs_strides: &[usize],
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = float_suffix(dtype, kernel)?;
        if out_shape.len() != lhs_strides.len() || out_shape.len() != rhs_strides.len() {
            return Err(BridgeError::invalid(format!(
                "cuda {}: shape and strides of different ranks",
                kernel.name()
            )));
        }
        let size = dtype.size();
        let n: usize = out_shape.iter().product();
        let lhs = self.ptr(input(
            inputs,
            0,
            extent_of(out_shape, lhs_strides) * size,
            kernel,
        )?);
        let rhs = self.ptr(input(
            inputs,
            1,
            extent_of(out_shape, rhs_strides) * size,
            kernel,
        )?);
        check_output(output, n * size, kernel)?;
        let out = self.ptr(output);
        let (shape, [ls, rs]) = merge_dims(out_shape, [lhs_strides, rhs_strides]);
        let layout = BinaryLayout {
            rank: u32_arg(shape.len(), "rank", kernel)?,
            shape: to_u32_array(&shape, "extent", kernel)?,
            lhs_stride: to_u32_array(&ls, "stride", kernel)?,
            rhs_stride: to_u32_array(&rs, "stride", kernel)?,
        };
        let (count, code) = (u32_arg(n, "element count", kernel)?, binary_code(op));
        self.launch(kernel, &format!("binary_{suffix}"), flat_config(n), |b| {
            b.arg(&lhs)
                .arg(&rhs)
                .arg(&out)
                .arg(&count)
                .arg(&layout)
                .arg(&code);
        })
    }

    fn permute(
        &self,
        kernel: &Kernel,
        elem_size: usize,
        in_shape: &[usize],
        perm: &[usize],
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = elem_suffix(elem_size, kernel)?;
        let rank = in_shape.len();
        let mut seen = [false; MAX_RANK];
        let valid = perm.len() == rank
            && rank <= MAX_RANK
            && perm
                .iter()
                .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(BridgeError::invalid(format!(
                "cuda permute: {perm:?} is not a permutation of rank {rank}"
            )));
        }
        let mut in_strides = vec![1usize; rank];
        for d in (0..rank.saturating_sub(1)).rev() {
            in_strides[d] = in_strides[d + 1] * in_shape[d + 1];
        }
        let out_shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
        let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
        let n: usize = in_shape.iter().product();
        let x = self.ptr(input(inputs, 0, n * elem_size, kernel)?);
        check_output(output, n * elem_size, kernel)?;
        let out = self.ptr(output);
        let (shape, [stride]) = merge_dims(&out_shape, [&strides]);
        let layout = PermuteLayout {
            rank: u32_arg(shape.len(), "rank", kernel)?,
            shape: to_u32_array(&shape, "extent", kernel)?,
            in_stride: to_u32_array(&stride, "stride", kernel)?,
        };
        let count = u32_arg(n, "element count", kernel)?;
        self.launch(kernel, &format!("permute_{suffix}"), flat_config(n), |b| {
            b.arg(&x).arg(&out).arg(&count).arg(&layout);
        })
    }

    /// `dst[o, dst_offset + c] = src[o, src_offset + c]` for `o < rows`,
    /// `c < chunk`, rows being `(stride, offset)` apart (in elements).
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        kernel: &Kernel,
        suffix: &str,
        src: &CudaBuffer,
        dst: &mut CudaBuffer,
        rows: usize,
        chunk: usize,
        (src_stride, src_offset): (usize, usize),
        (dst_stride, dst_offset): (usize, usize),
    ) -> Result<()> {
        let total = rows * chunk;
        if total == 0 {
            return Ok(());
        }
        let (src, dst) = (self.ptr(src), self.ptr(dst));
        let (r, c) = (
            u32_arg(rows, "rows", kernel)?,
            u32_arg(chunk, "row length", kernel)?,
        );
        u32_arg(total, "element count", kernel)?;
        let wide = |v: usize| v as u64;
        let (ss, so, ds, dof) = (
            wide(src_stride),
            wide(src_offset),
            wide(dst_stride),
            wide(dst_offset),
        );
        self.launch(
            kernel,
            &format!("copy_rows_{suffix}"),
            flat_config(total),
            |b| {
                b.arg(&src)
                    .arg(&dst)
                    .arg(&r)
                    .arg(&c)
                    .arg(&ss)
                    .arg(&so)
                    .arg(&ds)
                    .arg(&dof);
            },
        )
    }

    fn copy_bytes(
        &self,
        kernel: &Kernel,
        src: &CudaBuffer,
        dst: &mut CudaBuffer,
        bytes: usize,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let bad = || {
            BridgeError::backend(format!(
                "cuda {}: copy of {bytes} bytes out of range",
                kernel.name()
            ))
        };
        let from = src.slice.try_slice(0..bytes).ok_or_else(bad)?;
        let mut to = dst.slice.try_slice_mut(0..bytes).ok_or_else(bad)?;
        self.stream
            .memcpy_dtod(&from, &mut to)
            .map_err(|e| driver_error(&format!("{} copy failed", kernel.name()), e))
    }

    /// Row-major matmul on cuBLAS, which is column-major: a row-major
    /// `[m, n]` C is the column-major `[n, m]` Cᵀ = Bᵀ·Aᵀ, and row-major B
    /// and A read column-major are exactly Bᵀ and Aᵀ, so pass the operands
    /// swapped with `m` and `n` exchanged and nothing is transposed.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        kernel: &Kernel,
        dtype: DType,
        (m, k, n): (usize, usize, usize),
        lhs_offsets: &[usize],
        rhs_offsets: &[usize],
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        float_suffix(dtype, kernel)?;
        let size = dtype.size();
        let batch = lhs_offsets.len();
        if batch == 0 || rhs_offsets.len() != batch {
            return Err(BridgeError::invalid(format!(
                "cuda matmul: {batch} left and {} right batch offsets",
                rhs_offsets.len()
            )));
        }
        let out_bytes = batch * m * n * size;
        check_output(output, out_bytes, kernel)?;
        if k == 0 {
            // An empty sum: zeros, without asking cuBLAS about k = 0.
            self.bind()?;
            let mut view = output
                .slice
                .try_slice_mut(0..out_bytes)
                .ok_or_else(|| BridgeError::backend("cuda matmul: output out of range"))?;
            return self
                .stream
                .memset_zeros(&mut view)
                .map_err(|e| driver_error("matmul: zero fill failed", e));
        }
        let lhs_end = lhs_offsets.iter().max().map_or(0, |&o| o + m * k);
        let rhs_end = rhs_offsets.iter().max().map_or(0, |&o| o + k * n);
        let lhs = self.ptr(input(inputs, 0, lhs_end * size, kernel)?);
        let rhs = self.ptr(input(inputs, 1, rhs_end * size, kernel)?);
        let out = self.ptr(output);
        let int = |v: usize, what: &str| {
            c_int::try_from(v).map_err(|_| {
                BridgeError::invalid(format!("cuda matmul: {what} {v} is too large for cuBLAS"))
            })
        };
        let (mi, ki, ni) = (int(m, "m")?, int(k, "k")?, int(n, "n")?);
        let gemm = GemmShape {
            dtype,
            m: ni,
            n: mi,
            k: ki,
            lda: ni,
            ldb: ki,
            ldc: ni,
        };
        let byte = |elements: usize| (elements * size) as u64;
        self.bind()?;
        match Kernel::uniform_batch_strides(lhs_offsets, rhs_offsets) {
            Some((lhs_stride, rhs_stride)) => {
                let a = rhs + byte(rhs_offsets[0]);
                let b = lhs + byte(lhs_offsets[0]);
                if batch == 1 {
                    self.gemm(&gemm, a, b, out)
                } else {
                    let long = |v: usize| {
                        i64::try_from(v)
                            .map_err(|_| BridgeError::invalid("cuda matmul: stride too large"))
                    };
                    let strides = (long(rhs_stride)?, long(lhs_stride)?, long(m * n)?);
                    self.gemm_strided_batched(&gemm, a, b, out, strides, int(batch, "batch")?)
                }
            }
            None => {
                for (index, (&lo, &ro)) in lhs_offsets.iter().zip(rhs_offsets).enumerate() {
                    self.gemm(
                        &gemm,
                        rhs + byte(ro),
                        lhs + byte(lo),
                        out + byte(index * m * n),
                    )?;
                }
                Ok(())
            }
        }
    }

    /// One column-major GEMM `C = A·B` on device addresses.
    fn gemm(&self, g: &GemmShape, a: u64, b: u64, c: u64) -> Result<()> {
        use cublas::sys::cublasOperation_t::CUBLAS_OP_N;
        let handle = *self.blas.handle();
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: `matmul` checked that both operands and the output hold
        // every element these shapes and leading dimensions reach; alpha
        // and beta are host values, cuBLAS's default pointer mode.
        let status = unsafe {
            match g.dtype {
                DType::F32 => cublas::result::sgemm(
                    handle,
                    CUBLAS_OP_N,
                    CUBLAS_OP_N,
                    g.m,
                    g.n,
                    g.k,
                    &alpha,
                    a as *const f32,
                    g.lda,
                    b as *const f32,
                    g.ldb,
                    &beta,
                    c as *mut f32,
                    g.ldc,
                ),
                narrow => cublas::result::gemm_ex(
                    handle,
                    CUBLAS_OP_N,
                    CUBLAS_OP_N,
                    g.m,
                    g.n,
                    g.k,
                    (&alpha as *const f32).cast(),
                    a as *const std::ffi::c_void,
                    cuda_data_type(narrow),
                    g.lda,
                    b as *const std::ffi::c_void,
                    cuda_data_type(narrow),
                    g.ldb,
                    (&beta as *const f32).cast(),
                    c as *mut std::ffi::c_void,
                    cuda_data_type(narrow),
                    g.ldc,
                    cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
            }
        };
        status.map_err(|e| blas_error("matmul failed", e))
    }

    /// `batch` GEMMs whose operands are evenly spaced (`strides` in
    /// elements of A, B, C; 0 reuses one matrix).
    fn gemm_strided_batched(
        &self,
        g: &GemmShape,
        a: u64,
        b: u64,
        c: u64,
        strides: (i64, i64, i64),
        batch: c_int,
    ) -> Result<()> {
        use cublas::sys::cublasOperation_t::CUBLAS_OP_N;
        let handle = *self.blas.handle();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (sa, sb, sc) = strides;
        // SAFETY: as in `gemm`, for every batch entry.
        let status = unsafe {
            match g.dtype {
                DType::F32 => cublas::result::sgemm_strided_batched(
                    handle,
                    CUBLAS_OP_N,
                    CUBLAS_OP_N,
                    g.m,
                    g.n,
                    g.k,
                    &alpha,
                    a as *const f32,
                    g.lda,
                    sa,
                    b as *const f32,
                    g.ldb,
                    sb,
                    &beta,
                    c as *mut f32,
                    g.ldc,
                    sc,
                    batch,
                ),
                narrow => cublas::result::gemm_strided_batched_ex(
                    handle,
                    CUBLAS_OP_N,
                    CUBLAS_OP_N,
                    g.m,
                    g.n,
                    g.k,
                    (&alpha as *const f32).cast(),
                    a as *const std::ffi::c_void,
                    cuda_data_type(narrow),
                    g.lda,
                    sa,
                    b as *const std::ffi::c_void,
                    cuda_data_type(narrow),
                    g.ldb,
                    sb,
                    (&beta as *const f32).cast(),
                    c as *mut std::ffi::c_void,
                    cuda_data_type(narrow),
                    g.ldc,
                    sc,
                    batch,
                    cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
            }
        };
        status.map_err(|e| blas_error("batched matmul failed", e))
    }
}

/// A column-major GEMM's sizes and leading dimensions, as cuBLAS takes them.
struct GemmShape {
    dtype: DType,
    m: c_int,
    n: c_int,
    k: c_int,
    lda: c_int,
    ldb: c_int,
    ldc: c_int,
}

fn cuda_data_type(dtype: DType) -> cublas::sys::cudaDataType_t {
    match dtype {
        DType::F16 => cublas::sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => cublas::sys::cudaDataType_t::CUDA_R_16BF,
        _ => cublas::sys::cudaDataType_t::CUDA_R_32F,
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn describe(&self) -> DeviceDescription {
        self.description.clone()
    }

    fn alloc(&mut self, bytes: usize) -> Result<CudaBuffer> {
        // Whole words, and never zero: cuMemAlloc rejects empty requests,
        // and an empty tensor still needs a buffer to stand for it.
        let rounded = bytes.max(1).checked_next_multiple_of(4).ok_or_else(|| {
            BridgeError::new(
                ErrorCode::OutOfMemory,
                format!("cuda: cannot allocate {bytes} bytes"),
            )
        })?;
        // SAFETY: the contents are unspecified, as `alloc` promises; every
        // kernel writes its whole output.
        let slice = unsafe { self.stream.alloc::<u8>(rounded) }
            .map_err(|e| driver_error(&format!("cannot allocate {bytes} bytes"), e))?;
        Ok(CudaBuffer { slice })
    }

    fn upload(&mut self, data: &[u8]) -> Result<CudaBuffer> {
        let mut buffer = self.alloc(data.len())?;
        if !data.is_empty() {
            // From pageable memory the driver stages the bytes before it
            // returns, so `data` may go as soon as this does.
            self.stream
                .memcpy_htod(data, &mut buffer.slice)
                .map_err(|e| driver_error(&format!("cannot upload {} bytes", data.len()), e))?;
        }
        Ok(buffer)
    }

    fn download(&mut self, buffer: &CudaBuffer, bytes: usize) -> Result<Vec<u8>> {
        if bytes > buffer.len() {
            return Err(BridgeError::invalid(format!(
                "cuda: cannot download {bytes} bytes from a buffer of {}",
                buffer.len()
            )));
        }
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let view = buffer
            .slice
            .try_slice(0..bytes)
            .ok_or_else(|| BridgeError::backend("cuda: download out of range"))?;
        let mut host = vec![0u8; bytes];
        // Stream-ordered after every kernel already submitted; the
        // synchronize makes the bytes (and any kernel fault) visible here.
        self.stream
            .memcpy_dtoh(&view, &mut host)
            .map_err(|e| driver_error(&format!("cannot download {bytes} bytes"), e))?;
        self.synchronize()?;
        Ok(host)
    }

    fn run(
        &mut self,
        kernel: &Kernel,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        self.bind()?;
        self.run_kernel(kernel, inputs, output)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("device work failed", e))
    }
}

#[cfg(test)]
mod tests {
    //! Two kinds of tests:
    //! - host-only ones (NVRTC compiles every kernel, layout helpers) that
    //!   run anywhere; `ptx_compiles` skips when libnvrtc is not found;
    //! - device tests that compare every kernel with an f64 reference on
    //!   small random inputs, writing into poisoned (0xFF) outputs so that
    //!   an element a kernel forgets fails. They skip when there is no CUDA
    //!   device, unless `GUST_REQUIRE_CUDA=1` (set by scripts/gpu-check.sh)
    //!   makes that a failure, so a GPU run cannot pass by skipping.

    use super::*;
    use half::{bf16, f16};
    use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

    // ----- host-only tests -------------------------------------------------

    #[test]
    fn ptx_compiles() {
        // SAFETY: only tries to dlopen libnvrtc.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            eprintln!(
                "ptx_compiles: SKIPPED: libnvrtc not found; to check that the CUDA kernels compile, put the \
                 directory holding libnvrtc.so.* on LD_LIBRARY_PATH (e.g. `pip install nvidia-cuda-nvrtc-cu12`, \
                 then its site-packages/nvidia/cuda_nvrtc/lib)"
            );
            return;
        }
        let (major, minor) = nvrtc_version().unwrap();
        let supported = nvrtc_supported_archs().unwrap();
        eprintln!("ptx_compiles: NVRTC {major}.{minor}, architectures {supported:?}");
        // The fixed PTX target stands in for a device; the CUBINs are the
        // form `open` uses on an A100 (sm_80) and an H100/H200 (sm_90).
        let mut targets = vec![Target::Ptx(80)];
        targets.extend(
            [80, 90]
                .into_iter()
                .filter(|a| supported.contains(a))
                .map(Target::Cubin),
        );
        for target in targets {
            for program in PROGRAMS {
                let image =
                    nvrtc_compile(program.name, program.source, target).unwrap_or_else(|log| {
                        panic!("{} does not compile for {target}:\n{log}", program.name)
                    });
                if matches!(target, Target::Ptx(_)) {
                    let ptx = String::from_utf8_lossy(&image);
                    let mut found: Vec<&str> = ptx
                        .lines()
                        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
                        .map(|l| l.split('(').next().unwrap_or_default().trim())
                        .collect();
                    found.sort_unstable();
                    let mut listed = program.functions.to_vec();
                    listed.sort_unstable();
                    assert_eq!(
                        found, listed,
                        "{}: kernels compiled vs PROGRAMS",
                        program.name
                    );
                    // Layout structs must stay in parameter space (see the
                    // unrolled loops); local memory here means a slow path.
                    assert!(
                        !ptx.contains(".local"),
                        "{}: uses local memory",
                        program.name
                    );
                } else {
                    assert!(
                        image.len() > 1000,
                        "{}: CUBIN of {} bytes",
                        program.name,
                        image.len()
                    );
                }
                eprintln!(
                    "ptx_compiles: {} -> {target}: {} bytes",
                    program.name,
                    image.len()
                );
            }
        }
    }

    #[test]
    fn kernel_sources_lists_every_program() {
        let sources = kernel_sources();
        assert_eq!(sources.len(), PROGRAMS.len());
        for (name, source) in sources {
            assert!(name.ends_with(".cu"));
            assert!(
                source.contains("gust_f32_to_f16"),
                "{name} lacks the prelude"
            );
            assert!(
                !source.contains("#include"),
                "{name} must not need CUDA headers"
            );
        }
    }

    #[test]
    fn target_prefers_an_exact_cubin() {
        assert_eq!(
            choose_target(90, &[75, 80, 86, 89, 90, 100]),
            Some(Target::Cubin(90))
        );
        assert_eq!(
            choose_target(121, &[80, 90, 100, 120]),
            Some(Target::Ptx(120))
        );
        assert_eq!(choose_target(86, &[75, 80, 90]), Some(Target::Ptx(80)));
        assert_eq!(choose_target(50, &[75, 80]), None);
        assert_eq!(
            compile_options(Target::Ptx(80))[0],
            "--gpu-architecture=compute_80"
        );
        assert_eq!(
            compile_options(Target::Cubin(90))[0],
            "--gpu-architecture=sm_90"
        );
    }

    #[test]
    fn merge_dims_merges_contiguous_and_drops_unit_dims() {
        let (shape, [a, b]) = merge_dims(&[2, 3, 4], [&[12, 4, 1], &[12, 4, 1]]);
        assert_eq!((shape, a, b), (vec![24], vec![1], vec![1]));
        let (shape, [a, b]) = merge_dims(&[3, 4], [&[4, 1], &[0, 0]]);
        assert_eq!((shape, a, b), (vec![12], vec![1], vec![0]));
        let (shape, [a, b]) = merge_dims(&[2, 3, 4], [&[12, 4, 1], &[0, 1, 0]]);
        assert_eq!(
            (shape, a, b),
            (vec![2, 3, 4], vec![12, 4, 1], vec![0, 1, 0])
        );
        let (shape, [a]) = merge_dims(&[1, 5, 1], [&[5, 1, 1]]);
        assert_eq!((shape, a), (vec![5], vec![1]));
        let (shape, [a]) = merge_dims(&[1, 1], [&[1, 1]]);
        assert_eq!((shape, a), (vec![1], vec![0]));
    }

    #[test]
    fn merge_dims_addresses_the_same_elements() {
        let mut rng = Rng::new(7);
        for _ in 0..500 {
            let rank = 1 + rng.below(MAX_RANK);
            let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(3)).collect();
            // Operands: contiguous, broadcast in random dims, or permuted.
            let strides: Vec<Vec<usize>> = (0..2)
                .map(|_| {
                    let mut s = contiguous_strides(&shape);
                    match rng.below(3) {
                        0 => {}
                        1 => s.iter_mut().for_each(|v| {
                            if rng.below(2) == 0 {
                                *v = 0;
                            }
                        }),
                        _ => {
                            let perm = random_perm(&mut rng, rank);
                            let base = contiguous_strides(
                                &perm.iter().map(|&p| shape[p]).collect::<Vec<_>>(),
                            );
                            for (d, &p) in perm.iter().enumerate() {
                                s[p] = base[d];
                            }
                        }
                    }
                    s
                })
                .collect();
            let (merged, [ma, mb]) = merge_dims(&shape, [&strides[0], &strides[1]]);
            assert_eq!(
                offsets(&shape, &strides[0]),
                offsets(&merged, &ma),
                "{shape:?} {strides:?}"
            );
            assert_eq!(
                offsets(&shape, &strides[1]),
                offsets(&merged, &mb),
                "{shape:?} {strides:?}"
            );
        }
    }

    #[test]
    fn extent_covers_the_largest_index() {
        assert_eq!(extent_of(&[3, 4], &[4, 1]), 12);
        assert_eq!(extent_of(&[3, 4], &[0, 1]), 4);
        assert_eq!(extent_of(&[3, 4], &[1, 3]), 12);
        assert_eq!(extent_of(&[2, 0], &[1, 1]), 0);
    }

    #[test]
    fn launch_shapes_respect_device_limits() {
        let big = flat_config(usize::MAX / 2);
        assert_eq!(big.grid_dim.0, MAX_BLOCKS);
        assert_eq!(flat_config(1).grid_dim.0, 1);
        let rows = rows_config(10, 3, BLOCK);
        assert_eq!((rows.grid_dim.0, rows.block_dim.0), (10, 32));
        let rows = rows_config(1 << 40, 1 << 20, 512);
        assert_eq!((rows.grid_dim.0, rows.block_dim.0), (MAX_BLOCKS, 512));
    }

    // ----- helpers -----------------------------------------------------------

    /// xorshift64*: small, deterministic, good enough for test data.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
        }

        fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
            (0..n).map(|_| self.uniform(lo, hi)).collect()
        }
    }

    fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![1; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        strides
    }

    fn random_perm(rng: &mut Rng, n: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        perm
    }

    /// Element offsets of every multi-index of `shape`, in row-major order.
    fn offsets(shape: &[usize], strides: &[usize]) -> Vec<usize> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut i| {
                let mut at = 0;
                for d in (0..shape.len()).rev() {
                    at += (i % shape[d]) * strides[d];
                    i /= shape[d];
                }
                at
            })
            .collect()
    }

    const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// `values` stored as `dtype`, and the values the device really gets.
    fn encode(dtype: DType, values: &[f64]) -> (Vec<u8>, Vec<f64>) {
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        let mut exact = Vec::with_capacity(values.len());
        for &v in values {
            match dtype {
                DType::F32 => {
                    bytes.extend_from_slice(&(v as f32).to_le_bytes());
                    exact.push(f64::from(v as f32));
                }
                DType::F16 => {
                    let h = f16::from_f64(v);
                    bytes.extend_from_slice(&h.to_le_bytes());
                    exact.push(h.to_f64());
                }
                DType::BF16 => {
                    let h = bf16::from_f64(v);
                    bytes.extend_from_slice(&h.to_le_bytes());
                    exact.push(h.to_f64());
                }
                DType::I32 | DType::U32 => unreachable!("compute tests use float dtypes"),
            }
        }
        (bytes, exact)
    }

    fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
        crate::dtype::bytes_to_f64(dtype, bytes).unwrap()
    }

    /// Relative error bound: 1e-5 for F32 (the contract); for F16/BF16 the
    /// one rounding of each output (2^-11, 2^-8 relative) with room.
    fn tolerance(dtype: DType) -> f64 {
        match dtype {
            DType::F16 => 1e-3,
            DType::BF16 => 8e-3,
            _ => 1e-5,
        }
    }

    /// ||out - reference|| / ||reference|| within the dtype's tolerance;
    /// NaN and infinities must match exactly.
    fn assert_close(what: &str, dtype: DType, out: &[f64], reference: &[f64]) {
        assert_eq!(out.len(), reference.len(), "{what}: length");
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        let mut worst = (0usize, 0.0f64);
        for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
            if r.is_nan() {
                assert!(o.is_nan(), "{what}: element {i} is {o}, expected NaN");
                continue;
            }
            if r.is_infinite() {
                assert_eq!(o, r, "{what}: element {i}");
                continue;
            }
            let d = (o - r).abs();
            if d > worst.1 || d.is_nan() {
                worst = (i, if d.is_nan() { f64::INFINITY } else { d });
            }
            diff += d * d;
            norm += r * r;
        }
        let rel = if norm > 0.0 {
            (diff / norm).sqrt()
        } else {
            diff.sqrt()
        };
        let tol = tolerance(dtype);
        assert!(
            rel <= tol,
            "{what}: relative error {rel:e} > {tol:e}; worst element {} is {} vs {}",
            worst.0,
            out[worst.0],
            reference[worst.0]
        );
    }

    /// Upload `inputs`, run `kernel` into a poisoned output of `out_bytes`,
    /// download the result.
    fn run(dev: &mut CudaBackend, kernel: &Kernel, inputs: &[&[u8]], out_bytes: usize) -> Vec<u8> {
        let buffers: Vec<CudaBuffer> = inputs.iter().map(|b| dev.upload(b).unwrap()).collect();
        let refs: Vec<&CudaBuffer> = buffers.iter().collect();
        let mut out = dev.upload(&vec![0xFF; out_bytes]).unwrap();
        dev.run(kernel, &refs, &mut out)
            .unwrap_or_else(|e| panic!("{kernel:?} failed: {e}"));
        dev.download(&out, out_bytes)
            .unwrap_or_else(|e| panic!("{kernel:?} failed: {e}"))
    }

    static DEVICE: OnceLock<std::result::Result<Mutex<CudaBackend>, String>> = OnceLock::new();

    /// The device shared by all tests (NVRTC compiles once), or `None`
    /// after printing why when there is no CUDA device.
    fn device(test: &str) -> Option<MutexGuard<'static, CudaBackend>> {
        let opened = DEVICE.get_or_init(|| {
            // SAFETY: only tries to dlopen libcuda.
            if !unsafe { driver::sys::is_culib_present() } {
                return Err("no CUDA device: libcuda not found".to_owned());
            }
            match CudaBackend::open(0) {
                Ok(backend) => {
                    eprintln!("cuda tests run on {:?}", backend.describe());
                    Ok(Mutex::new(backend))
                }
                Err(e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::Unsupported) => {
                    Err(format!("no CUDA device: {e}"))
                }
                Err(e) => panic!("the CUDA device is there but cannot be opened: {e}"),
            }
        });
        match opened {
            Ok(backend) => Some(backend.lock().unwrap_or_else(PoisonError::into_inner)),
            Err(why) => {
                assert!(
                    std::env::var("GUST_REQUIRE_CUDA").as_deref() != Ok("1"),
                    "{test}: GUST_REQUIRE_CUDA=1 but {why}"
                );
                eprintln!("{test}: SKIPPED: {why}");
                None
            }
        }
    }

    // ----- f64 references ----------------------------------------------------

    fn unary_ref(op: UnaryOp, x: f64) -> f64 {
        match op {
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Exp => x.exp(),
        }
    }

    fn binary_ref(op: BinaryOp, a: f64, b: f64) -> f64 {
        match op {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }

    // ----- device tests ------------------------------------------------------

    #[test]
    fn describe_reports_the_device() {
        let Some(dev) = device("describe_reports_the_device") else {
            return;
        };
        let d = dev.describe();
        assert_eq!(d.kind, BackendKind::Cuda);
        assert!(d.is_gpu);
        assert!(d.memory_bytes > 0);
        assert!(d.name.contains("(sm_"), "{}", d.name);
    }

    #[test]
    fn open_rejects_a_missing_device() {
        let Some(_dev) = device("open_rejects_a_missing_device") else {
            return;
        };
        let err = CudaBackend::open(10_000).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound, "{err}");
    }

    #[test]
    fn buffers_round_trip_and_free_on_any_thread() {
        let Some(mut dev) = device("buffers_round_trip_and_free_on_any_thread") else {
            return;
        };
        let mut rng = Rng::new(2);
        for len in [0usize, 1, 3, 4, 5, (1 << 20) + 3] {
            let data: Vec<u8> = (0..len).map(|_| rng.next_u32() as u8).collect();
            let buffer = dev.upload(&data).unwrap();
            assert_eq!(dev.download(&buffer, len).unwrap(), data, "{len} bytes");
            assert_eq!(dev.download(&buffer, len / 2).unwrap(), data[..len / 2]);
            let err = dev.download(&buffer, buffer.len() + 1).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument);
        }
        let buffers: Vec<CudaBuffer> = (0..8).map(|i| dev.alloc(1000 * (i + 1)).unwrap()).collect();
        std::thread::spawn(move || drop(buffers)).join().unwrap();
        dev.synchronize().unwrap();
        let again = dev.upload(&[1, 2, 3]).unwrap();
        assert_eq!(dev.download(&again, 3).unwrap(), [1, 2, 3]);

        let too_big = usize::try_from(dev.describe().memory_bytes).unwrap() + (1 << 30);
        let err = dev.alloc(too_big).unwrap_err();
        assert_eq!(err.code, ErrorCode::OutOfMemory, "{err}");
        // The device is still usable after a failed allocation.
        let after = dev.upload(&[9; 16]).unwrap();
        assert_eq!(dev.download(&after, 16).unwrap(), [9; 16]);
    }

    #[test]
    fn int_dtypes_are_refused_by_compute_kernels() {
        let Some(mut dev) = device("int_dtypes_are_refused_by_compute_kernels") else {
            return;
        };
        let x = dev.upload(&[0; 16]).unwrap();
        let mut out = dev.alloc(16).unwrap();
        let kernel = Kernel::Unary {
            op: UnaryOp::Relu,
            dtype: DType::I32,
            len: 4,
        };
        let err = dev.run(&kernel, &[&x], &mut out).unwrap_err();
        assert_eq!(err.code, ErrorCode::ShapeMismatch, "{err}");
    }

    #[test]
    fn unary_and_affine_match_reference() {
        let Some(mut dev) = device("unary_and_affine_match_reference") else {
            return;
        };
        let mut rng = Rng::new(3);
        for dtype in FLOATS {
            for len in [1usize, 7, 1000, 70_001] {
                let (bytes, x) = encode(dtype, &rng.values(len, -6.0, 6.0));
                for op in [
                    UnaryOp::Relu,
                    UnaryOp::Gelu,
                    UnaryOp::Silu,
                    UnaryOp::Tanh,
                    UnaryOp::Exp,
                ] {
                    let kernel = Kernel::Unary { op, dtype, len };
                    let out = decode(
                        dtype,
                        &run(&mut dev, &kernel, &[&bytes], len * dtype.size()),
                    );
                    let reference: Vec<f64> = x.iter().map(|&v| unary_ref(op, v)).collect();
                    assert_close(&format!("{op:?} {dtype} x{len}"), dtype, &out, &reference);
                }
                let (scale, offset) = (-1.75f32, 0.3f32);
                let kernel = Kernel::Affine {
                    dtype,
                    len,
                    scale,
                    offset,
                };
                let out = decode(
                    dtype,
                    &run(&mut dev, &kernel, &[&bytes], len * dtype.size()),
                );
                let reference: Vec<f64> = x
                    .iter()
                    .map(|&v| v * f64::from(scale) + f64::from(offset))
                    .collect();
                assert_close(&format!("affine {dtype} x{len}"), dtype, &out, &reference);
                if dtype == DType::F32 {
                    // Bit for bit what the CPU backend computes (one FMA).
                    let expected: Vec<f64> = x
                        .iter()
                        .map(|&v| f64::from((v as f32).mul_add(scale, offset)))
                        .collect();
                    assert_eq!(out, expected, "affine f32 is one fused multiply-add");
                }
            }
        }
    }

    /// Strides of an operand of `shape` broadcast to `out` (same rank).
    fn broadcast_strides(out: &[usize], shape: &[usize]) -> Vec<usize> {
        let strides = contiguous_strides(shape);
        out.iter()
            .zip(shape)
            .zip(strides)
            .map(|((&o, &s), st)| if s == 1 && o != 1 { 0 } else { st })
            .collect()
    }

    #[test]
    fn binary_broadcasting_matches_reference() {
        let Some(mut dev) = device("binary_broadcasting_matches_reference") else {
            return;
        };
        let mut rng = Rng::new(4);
        // (output shape, lhs shape, rhs shape) with broadcasting, then raw
        // stride cases (a transposed left operand).
        let shaped: Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> = vec![
            (vec![5], vec![5], vec![5]),
            (vec![3, 4, 5], vec![3, 4, 5], vec![3, 4, 5]),
            (vec![3, 4, 5], vec![3, 4, 5], vec![1, 4, 1]),
            (vec![3, 4, 5], vec![3, 1, 5], vec![1, 1, 1]),
            (vec![1], vec![1], vec![1]),
            (
                vec![2, 1, 3, 2, 1, 2, 3, 2],
                vec![2, 1, 3, 2, 1, 2, 3, 2],
                vec![1, 1, 3, 1, 1, 2, 1, 2],
            ),
            (
                vec![2, 2, 3, 2, 2, 2, 3, 2],
                vec![1, 2, 1, 2, 1, 2, 1, 2],
                vec![2, 1, 3, 1, 2, 1, 3, 1],
            ),
            (vec![300, 1000], vec![300, 1000], vec![1, 1000]),
        ];
        /// Output shape, lhs strides, rhs strides, lhs and rhs lengths.
        type Case = (Vec<usize>, Vec<usize>, Vec<usize>, usize, usize);
        let mut cases: Vec<Case> = shaped
            .into_iter()
            .map(|(out, l, r)| {
                let (ln, rn) = (l.iter().product(), r.iter().product());
                (
                    broadcast_strides(&out, &l),
                    broadcast_strides(&out, &r),
                    out,
                    ln,
                    rn,
                )
            })
            .map(|(ls, rs, out, ln, rn)| (out, ls, rs, ln, rn))
            .collect();
        cases.push((vec![4, 6], vec![1, 4], vec![6, 1], 24, 24));
        cases.push((vec![7, 5, 3], vec![1, 21, 7], vec![0, 3, 1], 105, 15));
        for dtype in FLOATS {
            for (out_shape, lhs_strides, rhs_strides, ln, rn) in &cases {
                let (lb, lhs) = encode(dtype, &rng.values(*ln, -3.0, 3.0));
                // Away from zero so that division stays well conditioned.
                let rv: Vec<f64> = (0..*rn)
                    .map(|_| rng.uniform(0.5, 2.0) * if rng.below(2) == 0 { -1.0 } else { 1.0 })
                    .collect();
                let (rb, rhs) = encode(dtype, &rv);
                let n: usize = out_shape.iter().product();
                let lo = offsets(out_shape, lhs_strides);
                let ro = offsets(out_shape, rhs_strides);
                for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
                    let kernel = Kernel::Binary {
                        op,
                        dtype,
                        out_shape: out_shape.clone(),
                        lhs_strides: lhs_strides.clone(),
                        rhs_strides: rhs_strides.clone(),
                    };
                    let out = decode(
                        dtype,
                        &run(&mut dev, &kernel, &[&lb, &rb], n * dtype.size()),
                    );
                    let reference: Vec<f64> = (0..n)
                        .map(|i| binary_ref(op, lhs[lo[i]], rhs[ro[i]]))
                        .collect();
                    assert_close(
                        &format!("{op:?} {dtype} {out_shape:?}"),
                        dtype,
                        &out,
                        &reference,
                    );
                }
            }
        }
        // IEEE division by zero.
        let kernel = Kernel::Binary {
            op: BinaryOp::Div,
            dtype: DType::F32,
            out_shape: vec![3],
            lhs_strides: vec![1],
            rhs_strides: vec![0],
        };
        let lhs = crate::dtype::f32_to_bytes(&[1.0, -1.0, 0.0]);
        let rhs = crate::dtype::f32_to_bytes(&[0.0]);
        let out = decode(DType::F32, &run(&mut dev, &kernel, &[&lhs, &rhs], 12));
        assert_eq!(out[..2], [f64::INFINITY, f64::NEG_INFINITY]);
        assert!(out[2].is_nan());
    }

    #[test]
    fn matmul_matches_reference() {
        let Some(mut dev) = device("matmul_matches_reference") else {
            return;
        };
        let mut rng = Rng::new(5);
        type Case = (usize, usize, usize, Vec<usize>, Vec<usize>);
        let cases: Vec<Case> = vec![
            (1, 1, 1, vec![0], vec![0]),
            (3, 5, 7, vec![0], vec![0]),
            (64, 33, 17, vec![5], vec![3]),
            (4, 6, 5, vec![0, 24, 48], vec![0, 30, 60]),
            (4, 6, 5, vec![0, 24, 48, 72], vec![7, 7, 7, 7]),
            (4, 6, 5, vec![48, 0, 24], vec![30, 60, 0]),
            (128, 256, 96, vec![0, 128 * 256], vec![0, 256 * 96]),
            (3, 0, 4, vec![0, 0], vec![0, 0]),
        ];
        for dtype in FLOATS {
            for (m, k, n, lhs_offsets, rhs_offsets) in &cases {
                let (m, k, n) = (*m, *k, *n);
                let ln = lhs_offsets.iter().max().unwrap() + m * k;
                let rn = rhs_offsets.iter().max().unwrap() + k * n;
                let (lb, lhs) = encode(dtype, &rng.values(if k == 0 { 0 } else { ln }, -1.0, 1.0));
                let (rb, rhs) = encode(dtype, &rng.values(if k == 0 { 0 } else { rn }, -1.0, 1.0));
                let batch = lhs_offsets.len();
                let kernel = Kernel::Matmul {
                    dtype,
                    m,
                    k,
                    n,
                    lhs_offsets: lhs_offsets.clone(),
                    rhs_offsets: rhs_offsets.clone(),
                };
                let out = decode(
                    dtype,
                    &run(&mut dev, &kernel, &[&lb, &rb], batch * m * n * dtype.size()),
                );
                let mut reference = vec![0.0; batch * m * n];
                for (b, (&lo, &ro)) in lhs_offsets.iter().zip(rhs_offsets).enumerate() {
                    for i in 0..m {
                        for j in 0..n {
                            reference[b * m * n + i * n + j] = (0..k)
                                .map(|p| lhs[lo + i * k + p] * rhs[ro + p * n + j])
                                .sum();
                        }
                    }
                }
                if k == 0 {
                    assert!(out.iter().all(|&v| v == 0.0), "k = 0 gives zeros");
                } else {
                    assert_close(
                        &format!("matmul {dtype} {m}x{k}x{n} {lhs_offsets:?}"),
                        dtype,
                        &out,
                        &reference,
                    );
                }
            }
        }
    }

    fn reduce_ref(op: ReduceOp, x: &[f64], (outer, len, inner): (usize, usize, usize)) -> Vec<f64> {
        let mut out = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let column = (0..len).map(|j| x[(o * len + j) * inner + i]);
                out.push(match op {
                    ReduceOp::Sum => column.sum(),
                    ReduceOp::Mean => column.sum::<f64>() / len as f64,
                    ReduceOp::Max => column.fold(f64::NEG_INFINITY, |a, v| {
                        if a.is_nan() || v.is_nan() {
                            f64::NAN
                        } else {
                            a.max(v)
                        }
                    }),
                    ReduceOp::ArgMax => {
                        let mut best = 0;
                        let mut best_value = f64::NEG_INFINITY;
                        for (j, v) in column.enumerate() {
                            if j == 0 || v > best_value || (v.is_nan() && !best_value.is_nan()) {
                                best = j;
                                best_value = v;
                            }
                        }
                        best as f64
                    }
                });
            }
        }
        out
    }

    /// Shapes that hit both layouts (block per output, thread per output)
    /// and both sides of the grid cap.
    const REDUCE_SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (3, 100, 1),
        (2, 5, 7),
        (4, 3, 4096),
        (1, 5000, 1),
        (20_000, 3, 1),
        (2, 700, 33),
        (3, 40, 3000),
        (70_000, 64, 1),
    ];

    #[test]
    fn reductions_match_reference() {
        let Some(mut dev) = device("reductions_match_reference") else {
            return;
        };
        let mut rng = Rng::new(6);
        for dtype in FLOATS {
            for shape @ (outer, len, inner) in REDUCE_SHAPES {
                let total = outer * len * inner;
                let (bytes, x) = encode(dtype, &rng.values(total, -2.0, 2.0));
                // Few distinct values: many ties, so "first maximum" matters.
                let (tie_bytes, ties) = encode(
                    dtype,
                    &(0..total).map(|_| rng.below(4) as f64).collect::<Vec<_>>(),
                );
                for op in [
                    ReduceOp::Sum,
                    ReduceOp::Mean,
                    ReduceOp::Max,
                    ReduceOp::ArgMax,
                ] {
                    let kernel = Kernel::Reduce {
                        op,
                        dtype,
                        outer,
                        len,
                        inner,
                    };
                    if op == ReduceOp::ArgMax {
                        for (b, v) in [(&bytes, &x), (&tie_bytes, &ties)] {
                            let out = decode(
                                DType::U32,
                                &run(&mut dev, &kernel, &[b], outer * inner * 4),
                            );
                            assert_eq!(out, reduce_ref(op, v, shape), "argmax {dtype} {shape:?}");
                        }
                    } else {
                        let out = decode(
                            dtype,
                            &run(&mut dev, &kernel, &[&bytes], outer * inner * dtype.size()),
                        );
                        assert_close(
                            &format!("{op:?} {dtype} {shape:?}"),
                            dtype,
                            &out,
                            &reduce_ref(op, &x, shape),
                        );
                    }
                }
            }
        }
        // NaN: max is NaN, argmax points at the first NaN.
        for shape @ (outer, len, inner) in [(1, 300, 1), (2, 3, 9000)] {
            let mut x = rng.values(outer * len * inner, -1.0, 1.0);
            let total = x.len();
            x[inner * 7 % total] = f64::NAN;
            x[(inner * (len - 1) + 5) % total] = f64::NAN;
            let (bytes, x) = encode(DType::F32, &x);
            for op in [ReduceOp::Max, ReduceOp::ArgMax] {
                let kernel = Kernel::Reduce {
                    op,
                    dtype: DType::F32,
                    outer,
                    len,
                    inner,
                };
                let out = decode(
                    if op == ReduceOp::ArgMax {
                        DType::U32
                    } else {
                        DType::F32
                    },
                    &run(&mut dev, &kernel, &[&bytes], outer * inner * 4),
                );
                let reference = reduce_ref(op, &x, shape);
                for (i, (o, r)) in out.iter().zip(&reference).enumerate() {
                    assert!(
                        o == r || (o.is_nan() && r.is_nan()),
                        "{op:?} NaN {shape:?} [{i}]: {o} vs {r}"
                    );
                }
            }
        }
    }

    fn softmax_ref(x: &[f64], (outer, len, inner): (usize, usize, usize)) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| (o * len + j) * inner + i;
                let max = (0..len).map(|j| x[at(j)]).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = (0..len).map(|j| (x[at(j)] - max).exp()).sum();
                for j in 0..len {
                    out[at(j)] = (x[at(j)] - max).exp() / sum;
                }
            }
        }
        out
    }

    #[test]
    fn softmax_matches_reference() {
        let Some(mut dev) = device("softmax_matches_reference") else {
            return;
        };
        let mut rng = Rng::new(8);
        for dtype in FLOATS {
            for shape @ (outer, len, inner) in REDUCE_SHAPES {
                let total = outer * len * inner;
                // Large values: exp would overflow without subtracting the max.
                let shift = if outer % 2 == 0 { 90.0 } else { 0.0 };
                let (bytes, x) = encode(dtype, &rng.values(total, shift - 8.0, shift + 8.0));
                let kernel = Kernel::Softmax {
                    dtype,
                    outer,
                    len,
                    inner,
                };
                let out = decode(
                    dtype,
                    &run(&mut dev, &kernel, &[&bytes], total * dtype.size()),
                );
                assert_close(
                    &format!("softmax {dtype} {shape:?}"),
                    dtype,
                    &out,
                    &softmax_ref(&x, shape),
                );
            }
        }
    }

    #[test]
    fn norms_match_reference() {
        let Some(mut dev) = device("norms_match_reference") else {
            return;
        };
        let mut rng = Rng::new(9);
        let eps = 1e-5f32;
        for dtype in FLOATS {
            for (rows, cols) in [
                (1, 1),
                (3, 10),
                (5, 1000),
                (2, 5000),
                (300, 64),
                (70_000, 16),
            ] {
                // Odd rows sit far from zero: the variance must not cancel.
                let values: Vec<f64> = (0..rows * cols)
                    .map(|i| rng.uniform(-1.0, 1.0) + if (i / cols) % 2 == 1 { 100.0 } else { 0.0 })
                    .collect();
                let (xb, x) = encode(dtype, &values);
                let (wb, w) = encode(dtype, &rng.values(cols, 0.5, 1.5));
                let (bb, b) = encode(dtype, &rng.values(cols, -0.5, 0.5));
                for (weight, bias) in [(false, false), (true, false), (false, true), (true, true)] {
                    let kernel = Kernel::LayerNorm {
                        dtype,
                        rows,
                        cols,
                        eps,
                        weight,
                        bias,
                    };
                    let mut inputs: Vec<&[u8]> = vec![&xb];
                    if weight {
                        inputs.push(&wb);
                    }
                    if bias {
                        inputs.push(&bb);
                    }
                    let out = decode(
                        dtype,
                        &run(&mut dev, &kernel, &inputs, rows * cols * dtype.size()),
                    );
                    let mut reference = Vec::with_capacity(rows * cols);
                    for row in x.chunks(cols) {
                        let mean = row.iter().sum::<f64>() / cols as f64;
                        let var =
                            row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
                        let inv = 1.0 / (var + f64::from(eps)).sqrt();
                        for (j, v) in row.iter().enumerate() {
                            let y = (v - mean) * inv * if weight { w[j] } else { 1.0 };
                            reference.push(y + if bias { b[j] } else { 0.0 });
                        }
                    }
                    assert_close(
                        &format!("layer-norm {dtype} {rows}x{cols} w={weight} b={bias}"),
                        dtype,
                        &out,
                        &reference,
                    );
                }
                for weight in [false, true] {
                    let kernel = Kernel::RmsNorm {
                        dtype,
                        rows,
                        cols,
                        eps,
                        weight,
                    };
                    let mut inputs: Vec<&[u8]> = vec![&xb];
                    if weight {
                        inputs.push(&wb);
                    }
                    let out = decode(
                        dtype,
                        &run(&mut dev, &kernel, &inputs, rows * cols * dtype.size()),
                    );
                    let mut reference = Vec::with_capacity(rows * cols);
                    for row in x.chunks(cols) {
                        let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
                        let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                        for (j, v) in row.iter().enumerate() {
                            reference.push(v * inv * if weight { w[j] } else { 1.0 });
                        }
                    }
                    assert_close(
                        &format!("rms-norm {dtype} {rows}x{cols} w={weight}"),
                        dtype,
                        &out,
                        &reference,
                    );
                }
            }
        }
    }

    /// Random raw elements of `elem_size` bytes, as bytes and as words.
    fn raw_elements(rng: &mut Rng, n: usize, elem_size: usize) -> (Vec<u8>, Vec<u32>) {
        let words: Vec<u32> = (0..n)
            .map(|_| {
                if elem_size == 2 {
                    rng.next_u32() & 0xFFFF
                } else {
                    rng.next_u32()
                }
            })
            .collect();
        (raw_bytes(&words, elem_size), words)
    }

    fn raw_bytes(words: &[u32], elem_size: usize) -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| w.to_le_bytes().into_iter().take(elem_size))
            .collect()
    }

    #[test]
    fn permute_matches_reference() {
        let Some(mut dev) = device("permute_matches_reference") else {
            return;
        };
        let mut rng = Rng::new(10);
        let mut cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![2, 3], vec![1, 0]),
            (vec![2, 3, 4], vec![2, 0, 1]),
            (vec![3, 4, 5], vec![0, 1, 2]),
            (vec![64, 130], vec![1, 0]),
            (vec![1, 5, 1, 7], vec![3, 2, 1, 0]),
            (vec![6, 1, 4], vec![1, 0, 2]),
        ];
        for _ in 0..6 {
            let shape = vec![2, 1, 3, 2, 2, 1, 2, 3];
            let perm = random_perm(&mut rng, shape.len());
            cases.push((shape, perm));
        }
        for elem_size in [2, 4] {
            for (in_shape, perm) in &cases {
                let n: usize = in_shape.iter().product();
                let (bytes, words) = raw_elements(&mut rng, n, elem_size);
                let kernel = Kernel::Permute {
                    elem_size,
                    in_shape: in_shape.clone(),
                    perm: perm.clone(),
                };
                let out = run(&mut dev, &kernel, &[&bytes], n * elem_size);
                let in_strides = contiguous_strides(in_shape);
                let out_shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
                let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
                let expected: Vec<u32> = offsets(&out_shape, &strides)
                    .iter()
                    .map(|&i| words[i])
                    .collect();
                assert_eq!(
                    out,
                    raw_bytes(&expected, elem_size),
                    "permute {elem_size}B {in_shape:?} {perm:?}"
                );
            }
        }
    }

    #[test]
    fn slice_and_concat_match_reference() {
        let Some(mut dev) = device("slice_and_concat_match_reference") else {
            return;
        };
        let mut rng = Rng::new(11);
        for elem_size in [2, 4] {
            for (outer, in_len, start, len, inner) in [
                (1, 10, 0, 10, 1),
                (3, 10, 2, 5, 4),
                (2, 7, 6, 1, 3),
                (5, 100, 37, 50, 33),
            ] {
                let (bytes, words) = raw_elements(&mut rng, outer * in_len * inner, elem_size);
                let kernel = Kernel::Slice {
                    elem_size,
                    outer,
                    in_len,
                    start,
                    len,
                    inner,
                };
                let out = run(
                    &mut dev,
                    &kernel,
                    &[&bytes],
                    outer * len * inner * elem_size,
                );
                let mut expected = Vec::new();
                for o in 0..outer {
                    for j in 0..len {
                        for i in 0..inner {
                            expected.push(words[(o * in_len + start + j) * inner + i]);
                        }
                    }
                }
                assert_eq!(
                    out,
                    raw_bytes(&expected, elem_size),
                    "slice {elem_size}B {outer}x{in_len}x{inner}"
                );
            }
            for (outer, lens, inner) in [
                (1, vec![3, 4], 1),
                (2, vec![0, 3, 1], 5),
                (3, vec![5, 0], 2),
                (4, vec![1, 1, 1, 1, 1], 7),
            ] {
                let parts: Vec<(Vec<u8>, Vec<u32>)> = lens
                    .iter()
                    .map(|&l| raw_elements(&mut rng, outer * l * inner, elem_size))
                    .collect();
                let total: usize = lens.iter().sum();
                let kernel = Kernel::Concat {
                    elem_size,
                    outer,
                    lens: lens.clone(),
                    inner,
                };
                let inputs: Vec<&[u8]> = parts.iter().map(|p| p.0.as_slice()).collect();
                let out = run(
                    &mut dev,
                    &kernel,
                    &inputs,
                    outer * total * inner * elem_size,
                );
                let mut expected = Vec::new();
                for o in 0..outer {
                    for (part, &l) in parts.iter().zip(&lens) {
                        expected.extend_from_slice(&part.1[o * l * inner..(o + 1) * l * inner]);
                    }
                }
                assert_eq!(
                    out,
                    raw_bytes(&expected, elem_size),
                    "concat {elem_size}B {lens:?}"
                );
            }
        }
    }

    #[test]
    fn gather_matches_reference() {
        let Some(mut dev) = device("gather_matches_reference") else {
            return;
        };
        let mut rng = Rng::new(12);
        let random: Vec<i64> = (0..1000).map(|_| rng.below(320) as i64 - 10).collect();
        let cases: Vec<(DType, Vec<i64>, usize, usize)> = vec![
            (
                DType::I32,
                vec![0, 2, -1, 5, 1, i64::from(i32::MIN), 4, i64::from(i32::MAX)],
                5,
                3,
            ),
            (
                DType::U32,
                vec![4, 0, i64::from(u32::MAX), 5, 3, 1 << 31],
                5,
                3,
            ),
            (DType::I32, random.clone(), 300, 64),
            (
                DType::U32,
                random.iter().map(|&v| v.rem_euclid(1 << 32)).collect(),
                300,
                1,
            ),
        ];
        for elem_size in [2, 4] {
            for (index_dtype, indices, rows, row_len) in &cases {
                let (table_bytes, table) = raw_elements(&mut rng, rows * row_len, elem_size);
                let index_bytes: Vec<u8> = indices
                    .iter()
                    .flat_map(|&i| (i as u32).to_le_bytes())
                    .collect();
                let kernel = Kernel::Gather {
                    elem_size,
                    index_dtype: *index_dtype,
                    indices: indices.len(),
                    rows: *rows,
                    row_len: *row_len,
                };
                let out = run(
                    &mut dev,
                    &kernel,
                    &[&table_bytes, &index_bytes],
                    indices.len() * row_len * elem_size,
                );
                let mut expected = Vec::new();
                for &i in indices {
                    let valid = match index_dtype {
                        DType::I32 => (0..*rows as i64).contains(&i64::from(i as u32 as i32)),
                        _ => (i as u32 as usize) < *rows,
                    };
                    for c in 0..*row_len {
                        expected.push(if valid {
                            table[(i as u32 as usize) * row_len + c]
                        } else {
                            0
                        });
                    }
                }
                assert_eq!(
                    out,
                    raw_bytes(&expected, elem_size),
                    "gather {elem_size}B {index_dtype} rows {rows}"
                );
            }
        }
    }

    /// Round |v| to `bits` significant bits, to nearest even, exactly.
    fn round_to_bits(v: u64, bits: u32) -> u64 {
        let width = 64 - v.leading_zeros();
        if width <= bits {
            return v;
        }
        let shift = width - bits;
        let (q, rem, half) = (v >> shift, v & ((1 << shift) - 1), 1u64 << (shift - 1));
        let q = if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        };
        q << shift
    }

    /// An integer correctly rounded to a float of `bits` significant bits
    /// (exact as f64, so `from_f64` below only repackages it).
    fn round_int(v: i64, bits: u32) -> f64 {
        let magnitude = round_to_bits(v.unsigned_abs(), bits) as f64;
        if v < 0 { -magnitude } else { magnitude }
    }

    /// `Kernel::Cast` on raw element bits (low 16 bits for halves): Rust's
    /// `as` for float → int, clamping for int → int, one rounding to
    /// nearest even into narrower floats.
    fn cast_ref(from: DType, to: DType, raw: u32) -> u32 {
        enum Value {
            Float(f32),
            Int(i64),
        }
        let value = match from {
            DType::F32 => Value::Float(f32::from_bits(raw)),
            DType::F16 => Value::Float(f16::from_bits(raw as u16).to_f32()),
            DType::BF16 => Value::Float(bf16::from_bits(raw as u16).to_f32()),
            DType::I32 => Value::Int(i64::from(raw as i32)),
            DType::U32 => Value::Int(i64::from(raw)),
        };
        match (value, to) {
            (Value::Float(f), DType::F32) => f.to_bits(),
            (Value::Float(f), DType::F16) => u32::from(f16::from_f32(f).to_bits()),
            (Value::Float(f), DType::BF16) => u32::from(bf16::from_f32(f).to_bits()),
            (Value::Float(f), DType::I32) => f as i32 as u32,
            (Value::Float(f), DType::U32) => f as u32,
            (Value::Int(i), DType::F32) => (i as f32).to_bits(),
            (Value::Int(i), DType::F16) => u32::from(f16::from_f64(round_int(i, 11)).to_bits()),
            (Value::Int(i), DType::BF16) => u32::from(bf16::from_f64(round_int(i, 8)).to_bits()),
            // Int to int clamps (Kernel::Cast), it does not wrap.
            (Value::Int(i), DType::I32) => {
                i.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32 as u32
            }
            (Value::Int(i), DType::U32) => i.clamp(0, i64::from(u32::MAX)) as u32,
        }
    }

    fn is_nan_bits(dtype: DType, raw: u32) -> bool {
        match dtype {
            DType::F32 => f32::from_bits(raw).is_nan(),
            DType::F16 => f16::from_bits(raw as u16).is_nan(),
            DType::BF16 => bf16::from_bits(raw as u16).is_nan(),
            DType::I32 | DType::U32 => false,
        }
    }

    /// Values that sit on every edge a cast has: signed zeros, rounding
    /// ties with and without sticky bits, overflow, saturation, NaN.
    fn cast_specials(dtype: DType) -> Vec<u32> {
        match dtype {
            DType::F32 => {
                let mut v: Vec<u32> = [
                    0.0f32,
                    -0.0,
                    1.0,
                    -1.0,
                    0.5,
                    1.5,
                    2.5,
                    -2.5,
                    0.999_999_94,
                    -0.999_999_94,
                    65504.0,
                    65519.996,
                    65520.0,
                    1e-8,
                    5.96e-8,
                    2.98e-8,
                    2.99e-8,
                    3e38,
                    -3e38,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32::NAN,
                    2_147_483_520.0,
                    2_147_483_648.0,
                    -2_147_483_648.0,
                    -2_147_483_904.0,
                    4_294_967_040.0,
                    4_294_967_296.0,
                    1e10,
                    -1e10,
                    f32::MIN_POSITIVE,
                    1e-45,
                ]
                .iter()
                .map(|f| f.to_bits())
                .collect();
                // 1.0 plus f16 / bf16 rounding ties, exact and with sticky bits.
                v.extend([
                    0x3F80_1000,
                    0x3F80_1001,
                    0x3F80_3000,
                    0x3F80_8000,
                    0x3F80_8001,
                    0x3F81_8000,
                    0x7FC0_0001,
                    0xFF80_0001,
                ]);
                v
            }
            DType::F16 => vec![
                0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x7C00,
                0xFC00, 0x7E00, 0x7C01, 0x3555,
            ],
            DType::BF16 => vec![
                0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0,
                0x7F81, 0x4F00, 0xCF00, 0x4F80, 0x4EFF, 0xCF01,
            ],
            DType::I32 => [
                0i32,
                1,
                -1,
                i32::MAX,
                i32::MIN,
                65504,
                65519,
                65520,
                65535,
                16_777_216,
                16_777_217,
                16_777_219,
                -16_777_217,
                (1 << 30) + (1 << 22) + 1,
                (1 << 30) + (1 << 22),
                (1 << 24) + (1 << 16),
                (1 << 24) + (1 << 16) + 1,
                33_554_435,
            ]
            .iter()
            .map(|&i| i as u32)
            .collect(),
            DType::U32 => vec![
                0,
                1,
                u32::MAX,
                1 << 31,
                (1 << 31) + 1,
                65520,
                16_777_217,
                4_294_967_040,
                (1 << 31) + (1 << 23) + 1,
                (1 << 31) + (1 << 23),
            ],
        }
    }

    #[test]
    fn cast_matches_reference() {
        let Some(mut dev) = device("cast_matches_reference") else {
            return;
        };
        let mut rng = Rng::new(13);
        for from in DType::ALL {
            for to in DType::ALL {
                if from == to {
                    continue;
                }
                let mut raw = cast_specials(from);
                let mask = if from.size() == 2 { 0xFFFF } else { u32::MAX };
                raw.extend((0..4000).map(|_| rng.next_u32() & mask));
                let len = raw.len();
                let kernel = Kernel::Cast { from, to, len };
                let out = run(
                    &mut dev,
                    &kernel,
                    &[&raw_bytes(&raw, from.size())],
                    len * to.size(),
                );
                for (i, &x) in raw.iter().enumerate() {
                    let at = i * to.size();
                    let mut word = [0u8; 4];
                    word[..to.size()].copy_from_slice(&out[at..at + to.size()]);
                    let got = u32::from_le_bytes(word);
                    let expected = cast_ref(from, to, x);
                    let both_nan = is_nan_bits(to, expected) && is_nan_bits(to, got);
                    assert!(
                        got == expected || both_nan,
                        "cast {from} -> {to} of {x:#010x}: got {got:#010x}, expected {expected:#010x}"
                    );
                }
            }
        }
        // Same dtype: a plain copy.
        let raw: Vec<u32> = (0..10).map(|_| rng.next_u32()).collect();
        let kernel = Kernel::Cast {
            from: DType::F32,
            to: DType::F32,
            len: 10,
        };
        assert_eq!(
            run(&mut dev, &kernel, &[&raw_bytes(&raw, 4)], 40),
            raw_bytes(&raw, 4)
        );
    }

    #[test]
    fn large_launches_cover_every_element() {
        let Some(mut dev) = device("large_launches_cover_every_element") else {
            return;
        };
        let mut rng = Rng::new(14);
        // More elements than one launch has threads (65536 x 256): the
        // grid-stride loops must reach the tail.
        let len = 20_000_003;
        let (bytes, x) = encode(DType::F32, &rng.values(len, -3.0, 3.0));
        let kernel = Kernel::Unary {
            op: UnaryOp::Exp,
            dtype: DType::F32,
            len,
        };
        let out = decode(DType::F32, &run(&mut dev, &kernel, &[&bytes], len * 4));
        let reference: Vec<f64> = x.iter().map(|v| v.exp()).collect();
        assert_close("exp x20M", DType::F32, &out, &reference);

        let (outer, rlen, inner) = (1, 2, 10_000_001);
        let kernel = Kernel::Reduce {
            op: ReduceOp::Sum,
            dtype: DType::F32,
            outer,
            len: rlen,
            inner,
        };
        let out = decode(
            DType::F32,
            &run(
                &mut dev,
                &kernel,
                &[&bytes[..outer * rlen * inner * 4]],
                inner * 4,
            ),
        );
        assert_close(
            "sum over 2 of 10M columns",
            DType::F32,
            &out,
            &reduce_ref(
                ReduceOp::Sum,
                &x[..outer * rlen * inner],
                (outer, rlen, inner),
            ),
        );

        let (n, total) = (4_500, 4_500 * 4_000);
        let kernel = Kernel::Permute {
            elem_size: 4,
            in_shape: vec![n, total / n],
            perm: vec![1, 0],
        };
        let out = run(&mut dev, &kernel, &[&bytes[..total * 4]], total * 4);
        let words: Vec<u32> = bytes[..total * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let expected: Vec<u32> = offsets(&[total / n, n], &[1, total / n])
            .iter()
            .map(|&i| words[i])
            .collect();
        assert!(out == raw_bytes(&expected, 4), "transpose of 4500x4000");
    }
}
