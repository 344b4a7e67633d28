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
//!   gpu-bridge/Cargo.toml). `scripts/gpu-check.sh` builds and runs the
//!   tests for a GPU machine.
//!
//! Layout: `compile` (the programs and NVRTC), `device` (libraries,
//! context, stream, cuBLAS, buffers), `launch` (launch shapes and argument
//! checks), then one module per kernel family (`elementwise`, `reduce`,
//! `movement`, `matmul`); this module dispatches a [`Kernel`] to its
//! family. Device tests are in `gpu-bridge/tests/all/kernels`.

mod compile;
mod device;
mod elementwise;
mod launch;
mod matmul;
mod movement;
mod reduce;

pub use compile::kernel_sources;
pub use device::{CudaBackend, CudaBuffer};

use device::driver_error;

use crate::backend::{Backend, DeviceDescription};
use crate::error::{BridgeError, ErrorCode, Result};
use crate::kernel::Kernel;

impl CudaBackend {
    /// Run `kernel` through its family's launcher: arithmetic kernels
    /// (those with a compute dtype) or data movement and casts.
    fn run_kernel(
        &self,
        kernel: &Kernel,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        if kernel.compute_dtype().is_some() {
            self.run_arithmetic(kernel, inputs, output)
        } else {
            self.run_movement(kernel, inputs, output)
        }
    }

    /// Unary, affine, binary, matmul, the row kernels (and attention,
    /// which this backend refuses).
    fn run_arithmetic(
        &self,
        kernel: &Kernel,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        match kernel {
            Kernel::Attention { .. } | Kernel::CausalAttention { .. } => {
                Err(BridgeError::unsupported(format!(
                    "{} runs on the cpu backend only; compose it from matmul and softmax",
                    kernel.name()
                )))
            }
            Kernel::Linear { .. }
            | Kernel::SwiGlu { .. }
            | Kernel::Dequantize { .. }
            | Kernel::GatherQuantized { .. } => Err(BridgeError::unsupported(format!(
                "{} with quantized or [out, in] weights runs on the cpu backend only",
                kernel.name()
            ))),
            &Kernel::Unary { op, dtype, len } => {
                self.unary(kernel, (op, dtype, len), inputs, output)
            }
            &Kernel::Affine {
                dtype,
                len,
                scale,
                offset,
            } => self.affine(kernel, (dtype, len), (scale, offset), inputs, output),
            Kernel::Binary {
                op,
                dtype,
                out_shape,
                lhs_strides,
                rhs_strides,
            } => self.binary(
                kernel,
                (*op, *dtype),
                (out_shape, lhs_strides, rhs_strides),
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
                (lhs_offsets, rhs_offsets),
                inputs,
                output,
            ),
            &Kernel::Reduce {
                op,
                dtype,
                outer,
                len,
                inner,
            } => self.reduce(kernel, (op, dtype), (outer, len, inner), inputs, output),
            &Kernel::Softmax {
                dtype,
                outer,
                len,
                inner,
            } => self.softmax(kernel, dtype, (outer, len, inner), inputs, output),
            &Kernel::LayerNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
                bias,
            } => self.layer_norm(
                kernel,
                (dtype, rows, cols, eps),
                (weight, bias),
                inputs,
                output,
            ),
            &Kernel::RmsNorm {
                dtype,
                rows,
                cols,
                eps,
                weight,
            } => self.rms_norm(kernel, (dtype, rows, cols, eps), weight, inputs, output),
            #[allow(unreachable_patterns)]
            other => Err(BridgeError::unsupported(format!(
                "the cuda backend has no {} kernel",
                other.name()
            ))),
        }
    }

    /// Permute, slice, concat, gather and cast: raw elements, any dtype.
    fn run_movement(
        &self,
        kernel: &Kernel,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        match kernel {
            Kernel::Permute {
                elem_size,
                in_shape,
                perm,
            } => self.permute(kernel, *elem_size, in_shape, perm, inputs, output),
            &Kernel::Slice {
                elem_size,
                outer,
                in_len,
                start,
                len,
                inner,
            } => self.slice(
                kernel,
                elem_size,
                (outer, in_len, start, len, inner),
                inputs,
                output,
            ),
            Kernel::Concat {
                elem_size,
                outer,
                lens,
                inner,
            } => self.concat(kernel, *elem_size, (*outer, lens, *inner), inputs, output),
            &Kernel::Gather {
                elem_size,
                index_dtype,
                indices,
                rows,
                row_len,
            } => self.gather(
                kernel,
                (elem_size, index_dtype),
                (indices, rows, row_len),
                inputs,
                output,
            ),
            &Kernel::Cast { from, to, len } => self.cast(kernel, (from, to, len), inputs, output),
            #[allow(unreachable_patterns)]
            other => Err(BridgeError::unsupported(format!(
                "the cuda backend has no {} kernel",
                other.name()
            ))),
        }
    }
}

impl CudaBackend {
    /// A buffer of at least `bytes` bytes holding anything, an earlier
    /// allocation's bytes included: for callers that overwrite it.
    fn alloc_for_overwrite(&mut self, bytes: usize) -> Result<CudaBuffer> {
        // Whole words, and never zero: cuMemAlloc rejects empty requests,
        // and an empty tensor still needs a buffer to stand for it.
        let rounded = bytes.max(1).checked_next_multiple_of(4).ok_or_else(|| {
            BridgeError::new(
                ErrorCode::OutOfMemory,
                format!("cuda: cannot allocate {bytes} bytes"),
            )
        })?;
        // SAFETY: the contents are unspecified; callers overwrite them
        // (`alloc` zeroes them, `upload` copies over them) before any
        // kernel or download reads them.
        let slice = unsafe { self.stream.alloc::<u8>(rounded) }
            .map_err(|e| driver_error(&format!("cannot allocate {bytes} bytes"), e))?;
        Ok(CudaBuffer { slice })
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn describe(&self) -> DeviceDescription {
        self.description.clone()
    }

    fn alloc(&mut self, bytes: usize) -> Result<CudaBuffer> {
        let mut buffer = self.alloc_for_overwrite(bytes)?;
        // The stream-ordered pool (cuMemAllocAsync) hands a freed block
        // straight back, holding an earlier tensor, possibly another
        // tenant's. A memset on the stream runs at device bandwidth, ahead
        // of whatever kernel writes the buffer next.
        self.stream
            .memset_zeros(&mut buffer.slice)
            .map_err(|e| driver_error(&format!("cannot zero {bytes} bytes"), e))?;
        Ok(buffer)
    }

    fn upload(&mut self, data: &[u8]) -> Result<CudaBuffer> {
        // Every byte but the padding to a whole word is copied over, so
        // only the padding needs zeroing.
        let mut buffer = self.alloc_for_overwrite(data.len())?;
        if !data.is_empty() {
            // From pageable memory the driver stages the bytes before it
            // returns, so `data` may go as soon as this does.
            self.stream
                .memcpy_htod(data, &mut buffer.slice)
                .map_err(|e| driver_error(&format!("cannot upload {} bytes", data.len()), e))?;
        }
        if let Some(mut padding) = buffer.slice.try_slice_mut(data.len()..)
            && !padding.is_empty()
        {
            self.stream
                .memset_zeros(&mut padding)
                .map_err(|e| driver_error("cannot zero a buffer's padding", e))?;
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
