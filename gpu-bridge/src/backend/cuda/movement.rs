//! Data-movement kernel families on raw 2- or 4-byte elements (permute,
//! slice, concat, gather; movement.cu) and casts (cast.cu).

use cudarc::driver::PushKernelArg;

use super::device::{CudaBackend, CudaBuffer, driver_error};
use super::launch::{
    PermuteLayout, check_output, elem_suffix, flat_config, input, merge_dims, to_u32_array, u32_arg,
};
use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::{Kernel, MAX_RANK};

impl CudaBackend {
    /// `Kernel::Permute`, with dimensions the output walks contiguously
    /// merged first.
    pub(super) fn permute(
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

    /// `Kernel::Slice`: one strided row copy.
    pub(super) fn slice(
        &self,
        kernel: &Kernel,
        elem_size: usize,
        (outer, in_len, start, len, inner): (usize, usize, usize, usize, usize),
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = elem_suffix(elem_size, kernel)?;
        if start + len > in_len {
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
            outer,
            len * inner,
            (in_len * inner, start * inner),
            (len * inner, 0),
        )
    }

    /// `Kernel::Concat`: one strided row copy per non-empty input.
    pub(super) fn concat(
        &self,
        kernel: &Kernel,
        elem_size: usize,
        (outer, lens, inner): (usize, &[usize], usize),
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = elem_suffix(elem_size, kernel)?;
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
                    outer,
                    len * inner,
                    (len * inner, 0),
                    (total * inner, offset * inner),
                )?;
            }
            offset += len;
        }
        Ok(())
    }

    /// `Kernel::Gather`: rows of a table by index, zeros out of range.
    pub(super) fn gather(
        &self,
        kernel: &Kernel,
        (elem_size, index_dtype): (usize, DType),
        (indices, rows, row_len): (usize, usize, usize),
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let suffix = elem_suffix(elem_size, kernel)?;
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
            u32_arg(indices, "index count", kernel)?,
            u32_arg(rows, "rows", kernel)?,
            u32_arg(row_len, "row length", kernel)?,
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

    /// `Kernel::Cast`; the same dtype is a plain copy.
    pub(super) fn cast(
        &self,
        kernel: &Kernel,
        (from, to, len): (DType, DType, usize),
        inputs: &[&CudaBuffer],
        output: &mut CudaBuffer,
    ) -> Result<()> {
        let x = input(inputs, 0, len * from.size(), kernel)?;
        check_output(output, len * to.size(), kernel)?;
        if from == to {
            return self.copy_bytes(kernel, x, output, len * to.size());
        }
        let (x, out) = (self.ptr(x), self.ptr(output));
        let n = u32_arg(len, "length", kernel)?;
        self.launch(
            kernel,
            &format!("cast_{from}_{to}"),
            flat_config(len),
            |b| {
                b.arg(&x).arg(&out).arg(&n);
            },
        )
    }
}
