//! Checked parameter packing shared by every kernel family: 32-bit counts,
//! padded sizes, workgroup counts, and the inputs and output of one call.

use super::device::WgpuBuffer;
use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::MAX_RANK;

/// Invocations per workgroup of the one-invocation-per-element kernels; the
/// shaders hard-code the same value.
pub(super) const ELEMENT_WORKGROUP: u64 = 256;

/// Rows at least this long get a whole workgroup (a tree reduction) instead
/// of one invocation each.
pub(super) const WORKGROUP_ROW_MIN: usize = 64;

/// Output tile edge of the matmul shader.
pub(super) const MATMUL_TILE: usize = 64;

/// One `Backend::run` call: the kernel's name (for errors), its inputs and
/// its output buffer.
pub(super) struct Call<'a> {
    pub(super) name: &'static str,
    pub(super) inputs: &'a [&'a WgpuBuffer],
    pub(super) out: &'a wgpu::Buffer,
}

impl<'a> Call<'a> {
    /// Input `i`, or `invalid-argument` when the caller passed fewer.
    pub(super) fn input(&self, i: usize) -> Result<&'a wgpu::Buffer> {
        self.inputs
            .get(i)
            .map(|b| &b.buffer)
            .ok_or_else(|| BridgeError::invalid(format!("{}: missing input {i}", self.name)))
    }

    /// Checks that the output holds `bytes` (rounded up to whole words).
    pub(super) fn need_output(&self, bytes: usize) -> Result<()> {
        if padded_size(bytes)? > self.out.size() {
            return Err(BridgeError::invalid(format!(
                "{}: output buffer of {} bytes is too small for {bytes} bytes",
                self.name,
                self.out.size()
            )));
        }
        Ok(())
    }
}

pub(super) fn require_f32(name: &str, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        Ok(())
    } else {
        Err(BridgeError::unsupported(format!(
            "{name} in {dtype} on wgpu: arithmetic kernels run in f32 only on this backend (cast first)"
        )))
    }
}

pub(super) fn elem_size_error(name: &str, elem_size: usize) -> BridgeError {
    BridgeError::invalid(format!(
        "{name}: element size must be 2 or 4 bytes, not {elem_size}"
    ))
}

pub(super) fn too_large() -> BridgeError {
    BridgeError::invalid("tensor too large for the wgpu backend's 32-bit indexing")
}

pub(super) fn too_large_for(what: &str) -> BridgeError {
    BridgeError::invalid(format!(
        "{what} too large for the wgpu backend's 32-bit indexing"
    ))
}

/// Bytes rounded up to a whole number of 4-byte words, and at least one.
pub(super) fn padded_size(bytes: usize) -> Result<u64> {
    let size = bytes
        .checked_next_multiple_of(4)
        .ok_or_else(too_large)?
        .max(4);
    u64::try_from(size).map_err(|_| too_large())
}

pub(super) fn to_u32(value: impl TryInto<u32>, what: &str) -> Result<u32> {
    value.try_into().map_err(|_| too_large_for(what))
}

pub(super) fn checked_product(values: &[usize]) -> Result<usize> {
    values
        .iter()
        .try_fold(1usize, |acc, &v| acc.checked_mul(v))
        .ok_or_else(too_large)
}

pub(super) fn element_groups(threads: usize) -> u64 {
    (threads as u64).div_ceil(ELEMENT_WORKGROUP)
}

pub(super) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// `values` as eight u32s (two uniform vec4s), padded with `fill`.
pub(super) fn padded_dims(values: &[usize], fill: u32) -> Result<[u32; MAX_RANK]> {
    let mut out = [fill; MAX_RANK];
    for (slot, &v) in out.iter_mut().zip(values) {
        *slot = to_u32(v, "dimension")?;
    }
    Ok(out)
}

/// The cast shader's code for `dtype` (generated into the shader as
/// `GUST_<DTYPE>` from the same function).
pub(super) fn dtype_arg(dtype: DType) -> u32 {
    crate::kernel::dtype_code(dtype).0
}
