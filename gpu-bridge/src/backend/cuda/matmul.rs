//! Matmul on cuBLAS: sgemm for F32, GemmEx with F32 accumulation for
//! F16/BF16, strided-batched when the batch offsets are evenly spaced.

use std::ffi::c_int;

use cudarc::cublas;

use super::device::{CudaBackend, CudaBuffer, blas_error, driver_error};
use super::launch::{check_output, float_suffix, input};
use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::Kernel;

impl CudaBackend {
    /// `Kernel::Matmul`. Row-major on cuBLAS, which is column-major: a
    /// row-major `[m, n]` C is the column-major `[n, m]` Cᵀ = Bᵀ·Aᵀ, and
    /// row-major B and A read column-major are exactly Bᵀ and Aᵀ, so pass
    /// the operands swapped with `m` and `n` exchanged and nothing is
    /// transposed.
    pub(super) fn matmul(
        &self,
        kernel: &Kernel,
        dtype: DType,
        (m, k, n): (usize, usize, usize),
        (lhs_offsets, rhs_offsets): (&[usize], &[usize]),
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
