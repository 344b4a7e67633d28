//! Row kernel families (reduce.wgsl): reductions and softmax over the
//! middle axis of `[outer, len, inner]`, layer norm and RMS norm.

use super::params::{
    Call, WORKGROUP_ROW_MIN, checked_product, element_groups, require_f32, to_u32,
};
use super::pipelines::{Shader, Step};
use crate::dtype::DType;
use crate::error::Result;
use crate::kernel::ReduceOp;

/// `Kernel::Reduce`.
pub(super) fn reduce<'a>(
    call: &Call<'a>,
    (op, dtype): (ReduceOp, DType),
    (outer, len, inner): (usize, usize, usize),
) -> Result<Vec<Step<'a>>> {
    require_f32(call.name, dtype)?;
    let rows = checked_product(&[outer, inner])?;
    call.need_output(checked_product(&[rows, 4])?)?;
    let params = vec![
        to_u32(rows, "rows")?,
        to_u32(len, "length")?,
        to_u32(inner, "inner")?,
        op.code(),
    ];
    let inputs = vec![Some(call.input(0)?)];
    Ok(vec![row_step("reduce", rows, len, params, inputs)])
}

/// `Kernel::Softmax`.
pub(super) fn softmax<'a>(
    call: &Call<'a>,
    dtype: DType,
    (outer, len, inner): (usize, usize, usize),
) -> Result<Vec<Step<'a>>> {
    require_f32(call.name, dtype)?;
    let rows = checked_product(&[outer, inner])?;
    call.need_output(checked_product(&[rows, len, 4])?)?;
    let params = vec![
        to_u32(rows, "rows")?,
        to_u32(len, "length")?,
        to_u32(inner, "inner")?,
        0,
    ];
    let inputs = vec![Some(call.input(0)?)];
    Ok(vec![row_step("softmax", rows, len, params, inputs)])
}

/// `Kernel::LayerNorm`: flags bit 0 = weight, bit 1 = bias; absent
/// operands bind the dummy buffer.
pub(super) fn layer_norm<'a>(
    call: &Call<'a>,
    (dtype, rows, cols, eps): (DType, usize, usize, f32),
    (weight, bias): (bool, bool),
) -> Result<Vec<Step<'a>>> {
    require_f32(call.name, dtype)?;
    call.need_output(checked_product(&[rows, cols, 4])?)?;
    let mut inputs = vec![Some(call.input(0)?), None, None];
    let mut next = 1;
    let mut flags = 0;
    if weight {
        inputs[1] = Some(call.input(next)?);
        next += 1;
        flags |= 1;
    }
    if bias {
        inputs[2] = Some(call.input(next)?);
        flags |= 2;
    }
    let params = norm_params(rows, cols, flags, eps)?;
    Ok(vec![row_step("layer_norm", rows, cols, params, inputs)])
}

/// `Kernel::RmsNorm`: flags bit 0 = weight.
pub(super) fn rms_norm<'a>(
    call: &Call<'a>,
    (dtype, rows, cols, eps): (DType, usize, usize, f32),
    weight: bool,
) -> Result<Vec<Step<'a>>> {
    require_f32(call.name, dtype)?;
    call.need_output(checked_product(&[rows, cols, 4])?)?;
    let mut inputs = vec![Some(call.input(0)?)];
    let mut flags = 0;
    if weight {
        inputs.push(Some(call.input(1)?));
        flags |= 1;
    }
    let params = norm_params(rows, cols, flags, eps)?;
    Ok(vec![row_step("rms_norm", rows, cols, params, inputs)])
}

/// The norms' parameters: contiguous rows (inner = 1).
fn norm_params(rows: usize, cols: usize, flags: u32, eps: f32) -> Result<Vec<u32>> {
    Ok(vec![
        to_u32(rows, "rows")?,
        to_u32(cols, "cols")?,
        1,
        0,
        flags,
        eps.to_bits(),
    ])
}

/// A row kernel in its per-invocation or per-workgroup form (see
/// `reduce.wgsl`), with the reduce module's 8-word parameter block.
fn row_step<'a>(
    kernel: &'static str,
    rows: usize,
    len: usize,
    mut params: Vec<u32>,
    inputs: Vec<Option<&'a wgpu::Buffer>>,
) -> Step<'a> {
    params.resize(8, 0);
    let wide = len >= WORKGROUP_ROW_MIN;
    let entry = match (kernel, wide) {
        ("reduce", false) => "reduce_rows",
        ("reduce", true) => "reduce_wg",
        ("softmax", false) => "softmax_rows",
        ("softmax", true) => "softmax_wg",
        ("layer_norm", false) => "layer_norm_rows",
        ("layer_norm", true) => "layer_norm_wg",
        (_, false) => "rms_norm_rows",
        (_, true) => "rms_norm_wg",
    };
    Step {
        shader: Shader::Reduce,
        entry,
        params,
        inputs,
        workgroups: if wide {
            rows as u64
        } else {
            element_groups(rows)
        },
    }
}
