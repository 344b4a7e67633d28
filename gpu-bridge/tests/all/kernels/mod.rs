//! Kernels run directly through `Backend::run` on every backend this build
//! and machine offer (cpu always, wgpu and cuda when they open), below the
//! op layer, against float64 references: the cases `ops.rs` cannot reach
//! through an `Op` (arbitrary strides, uneven batch offsets, both launch
//! layouts of the row kernels, grid limits, every cast bit pattern), and
//! each GPU backend's own buffers and errors. Outputs start poisoned (every
//! bit set: NaN in every float type) so an element a kernel forgets fails.
//!
//! These were the inline tests of the cuda and wgpu backends; the backends
//! keep only host-side tests. Without a CUDA device the cuda tests skip,
//! unless `GUST_REQUIRE_CUDA=1` (set by scripts/gpu-check.sh) makes that a
//! failure, so a GPU run cannot pass by skipping.

mod buffers;
mod casts;
mod compute;
// Buffers of real types exist only in builds with the backend (the
// stand-ins' are `()`).
#[cfg(feature = "cuda")]
mod cuda_only;
mod movement;
#[cfg(feature = "wgpu")]
mod wgpu_only;

use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::backend::cuda::CudaBackend;
use gust_gpu_bridge::backend::wgpu::{WgpuBackend, WgpuOptions};
use gust_gpu_bridge::{Backend, DType, DeviceDescription, ErrorCode, Kernel, Result};

use crate::harness::Rng;

/// A backend seen through bytes: what every kernel test needs, object safe
/// so one test body serves every backend.
pub(crate) trait Runner {
    /// The backend's description.
    fn description(&self) -> DeviceDescription;

    /// Upload `inputs`, run `kernel` into a poisoned output of `out_bytes`,
    /// download the result.
    fn try_run(&mut self, kernel: &Kernel, inputs: &[&[u8]], out_bytes: usize) -> Result<Vec<u8>>;

    /// Upload `pattern`, free that buffer, allocate one of the same size
    /// and download it without writing it: what a recycled allocation
    /// shows its next owner.
    fn reallocated(&mut self, pattern: &[u8]) -> Result<Vec<u8>>;

    /// As `try_run`, failing the test on an error.
    fn run(&mut self, kernel: &Kernel, inputs: &[&[u8]], out_bytes: usize) -> Vec<u8> {
        let name = self.description().name;
        self.try_run(kernel, inputs, out_bytes)
            .unwrap_or_else(|e| panic!("{kernel:?} on {name} failed: {e}"))
    }
}

impl<B: Backend> Runner for B {
    fn description(&self) -> DeviceDescription {
        self.describe()
    }

    fn try_run(&mut self, kernel: &Kernel, inputs: &[&[u8]], out_bytes: usize) -> Result<Vec<u8>> {
        let buffers = inputs
            .iter()
            .map(|b| self.upload(b))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&B::Buffer> = buffers.iter().collect();
        let mut out = self.upload(&vec![0xFF; out_bytes])?;
        Backend::run(self, kernel, &refs, &mut out)?;
        self.download(&out, out_bytes)
    }

    fn reallocated(&mut self, pattern: &[u8]) -> Result<Vec<u8>> {
        let written = self.upload(pattern)?;
        // Make sure the pattern really landed before the buffer goes.
        assert_eq!(self.download(&written, pattern.len())?, pattern);
        drop(written);
        self.synchronize()?;
        let fresh = self.alloc(pattern.len())?;
        self.download(&fresh, pattern.len())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The cpu backend, shared by every test.
fn cpu() -> MutexGuard<'static, CpuBackend> {
    static CPU: OnceLock<Mutex<CpuBackend>> = OnceLock::new();
    lock(CPU.get_or_init(|| Mutex::new(CpuBackend::new(1 << 30))))
}

/// The wgpu backend (a software adapter allowed), opened once: opening
/// lavapipe and compiling its pipelines dominates the test time otherwise.
/// `None`, after saying why, without one.
pub(crate) fn wgpu(test: &str) -> Option<MutexGuard<'static, WgpuBackend>> {
    static WGPU: OnceLock<std::result::Result<Mutex<WgpuBackend>, String>> = OnceLock::new();
    let opened = WGPU.get_or_init(|| {
        WgpuBackend::open(&WgpuOptions {
            allow_software: true,
        })
        .map(|backend| {
            eprintln!("wgpu kernel tests run on: {:?}", backend.describe());
            Mutex::new(backend)
        })
        .map_err(|e| e.to_string())
    });
    match opened {
        Ok(backend) => Some(lock(backend)),
        Err(why) => {
            eprintln!("{test}: wgpu SKIPPED: no adapter: {why}");
            None
        }
    }
}

/// The CUDA device, opened once (NVRTC compiles once). `None`, after
/// saying why, when there is no CUDA device; a failure then when
/// `GUST_REQUIRE_CUDA=1`.
pub(crate) fn cuda(test: &str) -> Option<MutexGuard<'static, CudaBackend>> {
    static CUDA: OnceLock<std::result::Result<Mutex<CudaBackend>, String>> = OnceLock::new();
    let opened = CUDA.get_or_init(|| match CudaBackend::open(0) {
        Ok(backend) => {
            eprintln!("cuda kernel tests run on {:?}", backend.describe());
            Ok(Mutex::new(backend))
        }
        Err(e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::Unsupported) => {
            Err(format!("no CUDA device: {e}"))
        }
        Err(e) => panic!("the CUDA device is there but cannot be opened: {e}"),
    });
    match opened {
        Ok(backend) => Some(lock(backend)),
        Err(why) => {
            assert!(
                std::env::var("GUST_REQUIRE_CUDA").as_deref() != Ok("1"),
                "{test}: GUST_REQUIRE_CUDA=1 but {why}"
            );
            eprintln!("{test}: cuda SKIPPED: {why}");
            None
        }
    }
}

/// Run `test` on every backend: cpu, then wgpu and cuda where they open,
/// each with fresh random inputs (the seed is in every failure message).
pub(crate) fn on_every_backend(name: &str, test: impl Fn(&mut dyn Runner, &mut Rng)) {
    test(&mut *cpu(), &mut Rng::fresh());
    if let Some(mut backend) = wgpu(name) {
        test(&mut *backend, &mut Rng::fresh());
    }
    if let Some(mut backend) = cuda(name) {
        test(&mut *backend, &mut Rng::fresh());
    }
}

/// The float dtypes `backend` computes in (not the quantized weight
/// dtypes its `linear` also takes).
pub(crate) fn float_dtypes(backend: &dyn Runner) -> Vec<DType> {
    let mut dtypes = backend.description().arithmetic_dtypes;
    dtypes.retain(|d| d.is_float());
    dtypes
}

/// `values` stored as the float `dtype`, and the values the device really
/// gets (rounded once, to nearest even).
pub(crate) fn encode(dtype: DType, values: &[f64]) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::with_capacity(values.len() * dtype.size());
    let mut exact = Vec::with_capacity(values.len());
    for &v in values {
        match dtype {
            DType::F32 => {
                bytes.extend_from_slice(&(v as f32).to_le_bytes());
                exact.push(f64::from(v as f32));
            }
            DType::F16 => {
                let h = half::f16::from_f64(v);
                bytes.extend_from_slice(&h.to_le_bytes());
                exact.push(h.to_f64());
            }
            DType::BF16 => {
                let h = half::bf16::from_f64(v);
                bytes.extend_from_slice(&h.to_le_bytes());
                exact.push(h.to_f64());
            }
            DType::I32 | DType::U32 => unreachable!("compute tests use float dtypes"),
            quantized => unreachable!("compute tests do not encode {quantized}"),
        }
    }
    (bytes, exact)
}

/// `bytes` of `dtype` as f64, exactly.
pub(crate) fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    gust_gpu_bridge::dtype::bytes_to_f64(dtype, bytes).unwrap()
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

/// ‖out − reference‖ / ‖reference‖ within the dtype's tolerance (see
/// `harness::relative_error`: a NaN anywhere in `out` fails). F16 stores
/// results below 2^-14 as subnormals, whose spacing (2^-24) no relative
/// bound can judge (GELU far in its left tail, say): half that spacing per
/// element is allowed on top, as the absolute slack `harness::assert_close`
/// allows f32 rounding.
#[track_caller]
pub(crate) fn assert_close(what: &str, dtype: DType, out: &[f64], reference: &[f64]) {
    let err = crate::harness::relative_error(out, reference);
    let norm = reference.iter().map(|v| v * v).sum::<f64>().sqrt();
    let slack = if dtype == DType::F16 && norm > 0.0 {
        2f64.powi(-25) * (reference.len() as f64).sqrt() / norm
    } else {
        0.0
    };
    let tol = tolerance(dtype) + slack;
    let worst = out
        .iter()
        .zip(reference)
        .enumerate()
        .max_by(|a, b| {
            let d = |(_, (o, r)): &(usize, (&f64, &f64))| (*o - *r).abs();
            d(a).total_cmp(&d(b))
        })
        .map(|(i, (o, r))| format!("worst element {i} is {o} vs {r}"))
        .unwrap_or_default();
    assert!(
        err <= tol,
        "{what}: relative error {err:e} > {tol:e}; {worst}"
    );
}
