//! Elementwise kernel families: unary functions, affine, and broadcasting
//! binary ops (elementwise.cu).

use cudarc::driver::PushKernelArg;

use super::device::{CudaBackend, CudaBuffer};
use super::launch::{
    BinaryLayout, check_output, extent_of, flat_config, float_suffix, input, merge_dims,
    to_u32_array, u32_arg,
};
use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::{BinaryOp, Kernel, UnaryOp};

/// An op code as the kernels take it (`int op`); codes are small, so the
/// conversion never wraps.
fn op_arg(code: u32) -> i32 {
    i32::try_from(code).unwrap_or(i32::MAX)
}

impl CudaBackend {
    /// `Kernel::Unary`.
    pub(super) fn unary(
        &self,
        kernel: &Kernel,
        (op, dtype, len): (UnaryOp, DType, usize),
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = float_suffix(dtype, kernel)?;
        let bytes = len * dtype.size();
        let x = self.ptr(input(inputs, 0, bytes, kernel)?);
        check_output(output, bytes, kernel)?;
        let out = self.ptr(output);
        let (n, op) = (u32_arg(len, "length", kernel)?, op_arg(op.code()));
        self.launch(kernel, &format!("unary_{suffix}"), flat_config(len), |b| {
            b.arg(&x).arg(&out).arg(&n).arg(&op);
        })
    }

    /// `Kernel::Affine`: `x * scale + offset` as one fused multiply-add.
    pub(super) fn affine(
        &self,
        kernel: &Kernel,
        (dtype, len): (DType, usize),
        (scale, offset): (f32, f32),
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = float_suffix(dtype, kernel)?;
        let bytes = len * dtype.size();
        let x = self.ptr(input(inputs, 0, bytes, kernel)?);
        check_output(output, bytes, kernel)?;
        let out = self.ptr(output);
        let n = u32_arg(len, "length", kernel)?;
        self.launch(kernel, &format!("affine_{suffix}"), flat_config(len), |b| {
            b.arg(&x).arg(&out).arg(&n).arg(&scale).arg(&offset);
        })
    }

    /// `Kernel::Binary`, with contiguous dimensions merged first.
    pub(super) fn binary(
        &self,
        kernel: &Kernel,
        (op, dtype): (BinaryOp, DType),
        (out_shape, lhs_strides, rhs_strides): (&[usize], &[usize], &[usize]),
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
        let lhs_bytes = extent_of(out_shape, lhs_strides) * size;
        let rhs_bytes = extent_of(out_shape, rhs_strides) * size;
        let lhs = self.ptr(input(inputs, 0, lhs_bytes, kernel)?);
        let rhs = self.ptr(input(inputs, 1, rhs_bytes, kernel)?);
        check_output(output, n * size, kernel)?;
        let out = self.ptr(output);
        let (shape, [ls, rs]) = merge_dims(out_shape, [lhs_strides, rhs_strides]);
        let layout = BinaryLayout {
            rank: u32_arg(shape.len(), "rank", kernel)?,
            shape: to_u32_array(&shape, "extent", kernel)?,
            lhs_stride: to_u32_array(&ls, "stride", kernel)?,
            rhs_stride: to_u32_array(&rs, "stride", kernel)?,
        };
        let (count, code) = (u32_arg(n, "element count", kernel)?, op_arg(op.code()));
        self.launch(kernel, &format!("binary_{suffix}"), flat_config(n), |b| {
            b.arg(&lhs)
                .arg(&rhs)
                .arg(&out)
                .arg(&count)
                .arg(&layout)
                .arg(&code);
        })
    }
}
