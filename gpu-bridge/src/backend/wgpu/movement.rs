//! Data-movement kernel families on raw 2- or 4-byte elements
//! (movement.wgsl) and casts (cast.wgsl).

use super::device::WgpuBackend;
use super::params::{
    Call, checked_product, contiguous_strides, dtype_arg, elem_size_error, element_groups,
    padded_dims, to_u32, too_large,
};
use super::pipelines::{Shader, Step};
use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::MAX_RANK;

/// `Kernel::Permute`.
pub(super) fn permute<'a>(
    call: &Call<'a>,
    elem_size: usize,
    in_shape: &[usize],
    perm: &[usize],
) -> Result<Vec<Step<'a>>> {
    let name = call.name;
    let rank = in_shape.len();
    if rank == 0 || rank > MAX_RANK || perm.len() != rank {
        return Err(BridgeError::invalid(format!(
            "{name}: shape and permutation must have one rank from 1 to {MAX_RANK}"
        )));
    }
    let in_strides = contiguous_strides(in_shape);
    let mut out_shape = Vec::with_capacity(rank);
    let mut src_strides = Vec::with_capacity(rank);
    for &axis in perm {
        match (in_shape.get(axis), in_strides.get(axis)) {
            (Some(&dim), Some(&stride)) => {
                out_shape.push(dim);
                src_strides.push(stride);
            }
            _ => {
                return Err(BridgeError::invalid(format!(
                    "{name}: axis {axis} out of range"
                )));
            }
        }
    }
    let len = checked_product(&out_shape)?;
    call.need_output(checked_product(&[len, elem_size])?)?;
    let mut params = vec![to_u32(len, "length")?, rank as u32, 0, 0, 0, 0, 0, 0];
    params.extend(padded_dims(&out_shape, 1)?);
    params.extend(padded_dims(&src_strides, 0)?);
    let inputs = vec![Some(call.input(0)?)];
    Ok(vec![movement_step(
        "permute", elem_size, len, params, inputs,
    )?])
}

/// `Kernel::Slice`.
pub(super) fn slice<'a>(
    call: &Call<'a>,
    elem_size: usize,
    (outer, in_len, start, len, inner): (usize, usize, usize, usize, usize),
) -> Result<Vec<Step<'a>>> {
    let total = checked_product(&[outer, len, inner])?;
    call.need_output(checked_product(&[total, elem_size])?)?;
    let params = vec![
        to_u32(total, "length")?,
        0,
        to_u32(checked_product(&[len, inner])?, "row")?,
        to_u32(checked_product(&[in_len, inner])?, "row")?,
        to_u32(checked_product(&[start, inner])?, "start")?,
    ];
    let inputs = vec![Some(call.input(0)?)];
    Ok(vec![movement_step(
        "slice", elem_size, total, params, inputs,
    )?])
}

/// `Kernel::Gather`.
pub(super) fn gather<'a>(
    call: &Call<'a>,
    (elem_size, index_dtype): (usize, DType),
    (indices, rows, row_len): (usize, usize, usize),
) -> Result<Vec<Step<'a>>> {
    let signed = match index_dtype {
        DType::I32 => 1,
        DType::U32 => 0,
        other => {
            return Err(BridgeError::invalid(format!(
                "{}: indices must be i32 or u32, not {other}",
                call.name
            )));
        }
    };
    let total = checked_product(&[indices, row_len])?;
    call.need_output(checked_product(&[total, elem_size])?)?;
    let params = vec![
        to_u32(total, "length")?,
        0,
        to_u32(row_len, "row length")?,
        to_u32(rows, "rows")?,
        signed,
    ];
    let inputs = vec![Some(call.input(0)?), Some(call.input(1)?)];
    Ok(vec![movement_step(
        "gather", elem_size, total, params, inputs,
    )?])
}

/// `Kernel::Concat`: one dispatch per non-empty input, each writing its
/// segment of every output row.
pub(super) fn concat<'a>(
    call: &Call<'a>,
    elem_size: usize,
    (outer, lens, inner): (usize, &[usize], usize),
) -> Result<Vec<Step<'a>>> {
    let name = call.name;
    if lens.len() != call.inputs.len() {
        return Err(BridgeError::invalid(format!(
            "{name}: {} lengths for {} inputs",
            lens.len(),
            call.inputs.len()
        )));
    }
    let joined = lens
        .iter()
        .try_fold(0usize, |acc, &l| acc.checked_add(l))
        .ok_or_else(too_large)?;
    let row = checked_product(&[joined, inner])?;
    call.need_output(checked_product(&[outer, row, elem_size])?)?;
    let mut steps = Vec::new();
    let mut before = 0usize;
    for (i, &part) in lens.iter().enumerate() {
        let segment_start = before * inner;
        before += part;
        if part == 0 {
            continue;
        }
        let segment = checked_product(&[part, inner])?;
        let (entry, threads, per_row) = match elem_size {
            4 => ("concat4", checked_product(&[outer, segment])?, 0),
            2 => {
                // Words a row's segment touches: at most half its
                // elements plus one at each unaligned end.
                let per_row = segment / 2 + 2;
                ("concat2", checked_product(&[outer, per_row])?, per_row)
            }
            other => return Err(elem_size_error(name, other)),
        };
        let mut params = vec![
            to_u32(threads, "length")?,
            0,
            to_u32(row, "row")?,
            to_u32(segment_start, "offset")?,
            to_u32(segment, "segment")?,
            to_u32(outer, "outer")?,
            to_u32(per_row, "segment")?,
        ];
        params.resize(24, 0);
        steps.push(Step {
            shader: Shader::Movement,
            entry,
            params,
            inputs: vec![Some(call.input(i)?)],
            workgroups: element_groups(threads),
        });
    }
    Ok(steps)
}

impl WgpuBackend {
    /// `Kernel::Cast`; the same dtype is a plain copy.
    pub(super) fn cast(
        &mut self,
        call: &Call<'_>,
        from: DType,
        to: DType,
        len: usize,
    ) -> Result<()> {
        call.need_output(checked_product(&[len, to.size()])?)?;
        if from == to {
            return self.copy(call.input(0)?, call.out, len * to.size());
        }
        let (entry, threads) = match to.size() {
            2 => ("cast2", len.div_ceil(2)),
            _ => ("cast4", len),
        };
        let params = vec![to_u32(len, "length")?, dtype_arg(from), dtype_arg(to), 0];
        let step = Step {
            shader: Shader::Cast,
            entry,
            params,
            inputs: vec![Some(call.input(0)?)],
            workgroups: element_groups(threads),
        };
        self.submit(call.name, call.out, &[step])
    }
}

/// A permute / slice / gather dispatch for `len` output elements of
/// `elem_size` bytes, with the movement module's 24-word parameter block.
fn movement_step<'a>(
    kernel: &'static str,
    elem_size: usize,
    len: usize,
    mut params: Vec<u32>,
    inputs: Vec<Option<&'a wgpu::Buffer>>,
) -> Result<Step<'a>> {
    params.resize(24, 0);
    let (entry, threads) = match (kernel, elem_size) {
        ("permute", 4) => ("permute4", len),
        ("permute", 2) => ("permute2", len.div_ceil(2)),
        ("slice", 4) => ("slice4", len),
        ("slice", 2) => ("slice2", len.div_ceil(2)),
        ("gather", 4) => ("gather4", len),
        ("gather", 2) => ("gather2", len.div_ceil(2)),
        (_, other) => return Err(elem_size_error(kernel, other)),
    };
    Ok(Step {
        shader: Shader::Movement,
        entry,
        params,
        inputs,
        workgroups: element_groups(threads),
    })
}
