//! Row kernel families: reductions and softmax over the middle axis of
//! `[outer, len, inner]` (reduce.cu), and the norms (norm.cu).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{CudaBackend, CudaBuffer};
use super::launch::{
    BLOCK, check_output, flat_config, float_suffix, input, reduce_by_rows, rows_config, u32_arg,
};
use crate::dtype::DType;
use crate::error::Result;
use crate::kernel::{Kernel, ReduceOp};

/// `[outer, len, inner]` of a reduce or softmax kernel.
pub(super) type Rows = (usize, usize, usize);

/// The layout name (`rows`: a block per output, `cols`: a thread per
/// output) and launch shape of a reduce or softmax over `shape`, after
/// checking that its counts fit the kernels' 32-bit arguments.
fn row_layout(
    kernel: &Kernel,
    (outer, len, inner): Rows,
    count: &str,
) -> Result<(&'static str, LaunchConfig, [u32; 3])> {
    let outputs = outer * inner;
    let args = [
        u32_arg(outer, "outer", kernel)?,
        u32_arg(len, "length", kernel)?,
        u32_arg(inner, "inner", kernel)?,
    ];
    u32_arg(outputs, count, kernel)?;
    Ok(if reduce_by_rows(outputs, len, inner) {
        ("rows", rows_config(outputs, len, BLOCK), args)
    } else {
        ("cols", flat_config(outputs), args)
    })
}

impl CudaBackend {
    /// `Kernel::Reduce`; argmax has kernels of its own, which write `u32`.
    pub(super) fn reduce(
        &self,
        kernel: &Kernel,
        (op, dtype): (ReduceOp, DType),
        shape @ (outer, len, inner): Rows,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = float_suffix(dtype, kernel)?;
        let outputs = outer * inner;
        let x = self.ptr(input(inputs, 0, outputs * len * dtype.size(), kernel)?);
        let out_size = if op == ReduceOp::ArgMax {
            4
        } else {
            dtype.size()
        };
        check_output(output, outputs * out_size, kernel)?;
        let out = self.ptr(output);
        let (layout, cfg, [o, l, i]) = row_layout(kernel, shape, "output count")?;
        if op == ReduceOp::ArgMax {
            self.launch(kernel, &format!("argmax_{layout}_{suffix}"), cfg, |b| {
                b.arg(&x).arg(&out).arg(&o).arg(&l).arg(&i);
            })
        } else {
            // The kernels take `int op`; codes are small.
            let code = i32::try_from(op.code()).unwrap_or(i32::MAX);
            self.launch(kernel, &format!("reduce_{layout}_{suffix}"), cfg, |b| {
                b.arg(&x).arg(&out).arg(&o).arg(&l).arg(&i).arg(&code);
            })
        }
    }

    /// `Kernel::Softmax`.
    pub(super) fn softmax(
        &self,
        kernel: &Kernel,
        dtype: DType,
        shape @ (outer, len, inner): Rows,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = float_suffix(dtype, kernel)?;
        let bytes = outer * inner * len * dtype.size();
        let x = self.ptr(input(inputs, 0, bytes, kernel)?);
        check_output(output, bytes, kernel)?;
        let out = self.ptr(output);
        let (layout, cfg, [o, l, i]) = row_layout(kernel, shape, "row count")?;
        self.launch(kernel, &format!("softmax_{layout}_{suffix}"), cfg, |b| {
            b.arg(&x).arg(&out).arg(&o).arg(&l).arg(&i);
        })
    }

    /// `Kernel::LayerNorm`; an absent weight or bias is a null pointer.
    pub(super) fn layer_norm(
        &self,
        kernel: &Kernel,
        (dtype, rows, cols, eps): (DType, usize, usize, f32),
        (weight, bias): (bool, bool),
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = float_suffix(dtype, kernel)?;
        let bytes = rows * cols * dtype.size();
        let row_bytes = cols * dtype.size();
        let x = self.ptr(input(inputs, 0, bytes, kernel)?);
        let w = if weight {
            self.ptr(input(inputs, 1, row_bytes, kernel)?)
        } else {
            0
        };
        let bias_ptr = if bias {
            let index = 1 + usize::from(weight);
            self.ptr(input(inputs, index, row_bytes, kernel)?)
        } else {
            0
        };
        check_output(output, bytes, kernel)?;
        let out = self.ptr(output);
        let (r, c) = (
            u32_arg(rows, "rows", kernel)?,
            u32_arg(cols, "columns", kernel)?,
        );
        let cfg = rows_config(rows, cols, 512);
        self.launch(kernel, &format!("layer_norm_{suffix}"), cfg, |b| {
            b.arg(&x)
                .arg(&w)
                .arg(&bias_ptr)
                .arg(&out)
                .arg(&r)
                .arg(&c)
                .arg(&eps);
        })
    }

    /// `Kernel::RmsNorm`; an absent weight is a null pointer.
    pub(super) fn rms_norm(
        &self,
        kernel: &Kernel,
        (dtype, rows, cols, eps): (DType, usize, usize, f32),
        weight: bool,
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = float_suffix(dtype, kernel)?;
        let bytes = rows * cols * dtype.size();
        let x = self.ptr(input(inputs, 0, bytes, kernel)?);
        let w = if weight {
            self.ptr(input(inputs, 1, cols * dtype.size(), kernel)?)
        } else {
            0
        };
        check_output(output, bytes, kernel)?;
        let out = self.ptr(output);
        let (r, c) = (
            u32_arg(rows, "rows", kernel)?,
            u32_arg(cols, "columns", kernel)?,
        );
        let cfg = rows_config(rows, cols, 512);
        self.launch(kernel, &format!("rms_norm_{suffix}"), cfg, |b| {
            b.arg(&x).arg(&w).arg(&out).arg(&r).arg(&c).arg(&eps);
        })
    }
}
