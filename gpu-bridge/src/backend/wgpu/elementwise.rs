//! Elementwise and matmul kernel families (elementwise.wgsl, matmul.wgsl):
//! each builds its dispatch steps; matmul submits itself because its
//! offsets table must live until then.

use super::device::WgpuBackend;
use super::params::{
    Call, MATMUL_TILE, checked_product, contiguous_strides, element_groups, padded_dims,
    require_f32, to_u32,
};
use super::pipelines::{Shader, Step};
use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::{BinaryOp, Kernel, MAX_RANK, UnaryOp};

/// One dispatch of elementwise.wgsl, with its 32-word parameter block.
fn elementwise_step<'a>(
    entry: &'static str,
    mut params: Vec<u32>,
    inputs: Vec<Option<&'a wgpu::Buffer>>,
    len: usize,
) -> Step<'a> {
    params.resize(32, 0);
    Step {
        shader: Shader::Elementwise,
        entry,
        params,
        inputs,
        workgroups: element_groups(len),
    }
}

/// `Kernel::Unary`.
pub(super) fn unary<'a>(
    call: &Call<'a>,
    op: UnaryOp,
    dtype: DType,
    len: usize,
) -> Result<Vec<Step<'a>>> {
    require_f32(call.name, dtype)?;
    call.need_output(checked_product(&[len, 4])?)?;
    let params = vec![to_u32(len, "length")?, op.code()];
    let inputs = vec![Some(call.input(0)?)];
    Ok(vec![elementwise_step("unary", params, inputs, len)])
}

/// `Kernel::Affine`.
pub(super) fn affine<'a>(
    call: &Call<'a>,
    (dtype, len): (DType, usize),
    (scale, offset): (f32, f32),
) -> Result<Vec<Step<'a>>> {
    require_f32(call.name, dtype)?;
    call.need_output(checked_product(&[len, 4])?)?;
    let params = vec![to_u32(len, "length")?, 0, scale.to_bits(), offset.to_bits()];
    let inputs = vec![Some(call.input(0)?)];
    Ok(vec![elementwise_step("affine", params, inputs, len)])
}

/// `Kernel::Binary`; operands contiguous with the output skip the index
/// arithmetic.
pub(super) fn binary<'a>(
    call: &Call<'a>,
    (op, dtype): (BinaryOp, DType),
    (out_shape, lhs_strides, rhs_strides): (&[usize], &[usize], &[usize]),
) -> Result<Vec<Step<'a>>> {
    require_f32(call.name, dtype)?;
    let rank = out_shape.len();
    if rank == 0 || rank > MAX_RANK || lhs_strides.len() != rank || rhs_strides.len() != rank {
        return Err(BridgeError::invalid(format!(
            "{}: shape and strides must have one rank from 1 to {MAX_RANK}",
            call.name
        )));
    }
    let len = checked_product(out_shape)?;
    call.need_output(checked_product(&[len, 4])?)?;
    let contiguous = contiguous_strides(out_shape);
    let flat = *lhs_strides == contiguous && *rhs_strides == contiguous;
    let mut params = vec![
        to_u32(len, "length")?,
        op.code(),
        0,
        0,
        rank as u32,
        u32::from(flat),
        0,
        0,
    ];
    params.extend(padded_dims(out_shape, 1)?);
    params.extend(padded_dims(lhs_strides, 0)?);
    params.extend(padded_dims(rhs_strides, 0)?);
    let inputs = vec![Some(call.input(0)?), Some(call.input(1)?)];
    Ok(vec![elementwise_step("binary", params, inputs, len)])
}

impl WgpuBackend {
    /// `Kernel::Matmul`: evenly spaced batch offsets go in the parameters,
    /// others in a table bound as a third input.
    pub(super) fn matmul(
        &mut self,
        call: &Call<'_>,
        (dtype, m, k, n): (DType, usize, usize, usize),
        lhs_offsets: &[usize],
        rhs_offsets: &[usize],
    ) -> Result<()> {
        require_f32(call.name, dtype)?;
        let batch = lhs_offsets.len();
        if batch == 0 || rhs_offsets.len() != batch {
            return Err(BridgeError::invalid(format!(
                "{}: need one lhs and one rhs offset per batch entry",
                call.name
            )));
        }
        call.need_output(checked_product(&[batch, m, n, 4])?)?;
        let tiles_m = m.div_ceil(MATMUL_TILE);
        let tiles_n = n.div_ceil(MATMUL_TILE);
        let mut params = vec![
            to_u32(m, "m")?,
            to_u32(k, "k")?,
            to_u32(n, "n")?,
            to_u32(batch, "batch")?,
            to_u32(tiles_m, "m")?,
            to_u32(tiles_n, "n")?,
        ];
        let mut inputs = vec![Some(call.input(0)?), Some(call.input(1)?)];
        // Must outlive the submission.
        let offsets_table: wgpu::Buffer;
        match Kernel::uniform_batch_strides(lhs_offsets, rhs_offsets) {
            Some((lhs_stride, rhs_stride)) => {
                params.extend([
                    1,
                    0,
                    to_u32(lhs_stride, "batch stride")?,
                    to_u32(rhs_stride, "batch stride")?,
                    to_u32(lhs_offsets.first().copied().unwrap_or(0), "offset")?,
                    to_u32(rhs_offsets.first().copied().unwrap_or(0), "offset")?,
                ]);
            }
            None => {
                params.extend([0; 6]);
                let mut words = Vec::with_capacity(batch * 2);
                for (l, r) in lhs_offsets.iter().zip(rhs_offsets) {
                    words.push(to_u32(*l, "offset")?);
                    words.push(to_u32(*r, "offset")?);
                }
                offsets_table = self.table(&words)?;
                inputs.push(Some(&offsets_table));
            }
        }
        let step = Step {
            shader: Shader::Matmul,
            entry: "matmul",
            params,
            inputs,
            workgroups: checked_product(&[tiles_m, tiles_n, batch])? as u64,
        };
        self.submit(call.name, call.out, &[step])
    }
}
