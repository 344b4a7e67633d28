//! Launch shapes, argument checks and packing shared by every kernel
//! family, and the one launch call they all go through.

use cudarc::driver::{DeviceRepr, LaunchArgs, LaunchConfig};

use super::device::{CudaBackend, CudaBuffer, driver_error};
use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::{Kernel, MAX_RANK};

/// Threads per block of elementwise and per-output kernels.
pub(super) const BLOCK: u32 = 256;
/// Grid cap: with at most 1024 threads per block a 32-bit grid-stride index
/// stays below 2^31 + 2^26, so kernels can index with `u32` (see
/// common.cuh); larger work loops.
pub(super) const MAX_BLOCKS: u32 = 65_536;
/// Below this many outputs a reduction gives each output a whole block.
pub(super) const ROWS_LAYOUT_BELOW: usize = 8192;

/// Elementwise launch shape for `n` items, grid-stride beyond the cap.
pub(super) fn flat_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS as usize);
    LaunchConfig {
        grid_dim: (u32::try_from(blocks).unwrap_or(MAX_BLOCKS), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of `len` items, as many threads as help (a power of
/// two from 32 to `max_threads`).
pub(super) fn rows_config(rows: usize, len: usize, max_threads: u32) -> LaunchConfig {
    let threads = len.next_power_of_two().clamp(32, max_threads as usize);
    LaunchConfig {
        grid_dim: (
            u32::try_from(rows.clamp(1, MAX_BLOCKS as usize)).unwrap_or(MAX_BLOCKS),
            1,
            1,
        ),
        block_dim: (u32::try_from(threads).unwrap_or(BLOCK), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether a reduction over `[outer, len, inner]` gives each output a block
/// (`_rows` kernels) rather than a thread (`_cols` kernels): blocks when
/// the rows are contiguous and long enough to share, or when there are too
/// few outputs to fill the device one thread each.
pub(super) fn reduce_by_rows(outputs: usize, len: usize, inner: usize) -> bool {
    outputs < ROWS_LAYOUT_BELOW || (inner == 1 && len >= 64)
}

pub(super) fn u32_arg(value: usize, what: &str, kernel: &Kernel) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        BridgeError::invalid(format!(
            "cuda {}: {what} {value} does not fit in 32 bits",
            kernel.name()
        ))
    })
}

pub(super) fn input<'a>(
    inputs: &[&'a CudaBuffer],
    index: usize,
    bytes: usize,
    kernel: &Kernel,
) -> Result<&'a CudaBuffer> {
    let buffer = inputs.get(index).copied().ok_or_else(|| {
        BridgeError::backend(format!("cuda {}: input {index} is missing", kernel.name()))
    })?;
    if buffer.len() < bytes {
        return Err(BridgeError::backend(format!(
            "cuda {}: input {index} holds {} bytes, the kernel reads {bytes}",
            kernel.name(),
            buffer.len()
        )));
    }
    Ok(buffer)
}

pub(super) fn check_output(output: &CudaBuffer, bytes: usize, kernel: &Kernel) -> Result<()> {
    if output.len() < bytes {
        return Err(BridgeError::backend(format!(
            "cuda {}: the output holds {} bytes, the kernel writes {bytes}",
            kernel.name(),
            output.len()
        )));
    }
    Ok(())
}

/// Kernel-name suffix of a compute dtype.
pub(super) fn float_suffix(dtype: DType, kernel: &Kernel) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        DType::I32
        | DType::U32
        | DType::Q4_0
        | DType::Q4_1
        | DType::Q8_0
        | DType::Q4K
        | DType::Q6K => Err(BridgeError::shape(format!(
            "{} needs a float dtype, not {dtype}",
            kernel.name()
        ))),
    }
}

/// Kernel-name suffix of a raw element size.
pub(super) fn elem_suffix(elem_size: usize, kernel: &Kernel) -> Result<&'static str> {
    match elem_size {
        2 => Ok("u16"),
        4 => Ok("u32"),
        _ => Err(BridgeError::invalid(format!(
            "cuda {}: elements of {elem_size} bytes (only 2 and 4)",
            kernel.name()
        ))),
    }
}

/// Drop size-1 dimensions and merge neighbours that every operand walks
/// contiguously (outer stride = inner stride × inner extent), so kernels do
/// fewer divisions per element; a fully merged shape is `[n]`. The result
/// addresses exactly the same elements in the same order.
pub(super) fn merge_dims<const N: usize>(
    shape: &[usize],
    strides: [&[usize]; N],
) -> (Vec<usize>, [Vec<usize>; N]) {
    let mut merged_shape: Vec<usize> = Vec::with_capacity(shape.len());
    let mut merged: [Vec<usize>; N] = std::array::from_fn(|_| Vec::with_capacity(shape.len()));
    for (d, &extent) in shape.iter().enumerate() {
        if extent == 1 {
            continue;
        }
        let stride = |k: usize| strides[k].get(d).copied().unwrap_or(0);
        let joins = merged_shape.last().is_some_and(|_| {
            (0..N).all(|k| merged[k].last().copied() == stride(k).checked_mul(extent))
        });
        if let (true, Some(last)) = (joins, merged_shape.last_mut()) {
            *last *= extent;
            for (k, m) in merged.iter_mut().enumerate() {
                if let Some(s) = m.last_mut() {
                    *s = stride(k);
                }
            }
        } else {
            merged_shape.push(extent);
            for (k, m) in merged.iter_mut().enumerate() {
                m.push(stride(k));
            }
        }
    }
    if merged_shape.is_empty() {
        merged_shape.push(1);
        for m in &mut merged {
            m.push(0);
        }
    }
    (merged_shape, merged)
}

/// Largest element index `shape`/`strides` reach, plus one (0 if empty).
pub(super) fn extent_of(shape: &[usize], strides: &[usize]) -> usize {
    if shape.contains(&0) {
        return 0;
    }
    shape
        .iter()
        .zip(strides)
        .map(|(&n, &s)| (n - 1).saturating_mul(s))
        .fold(1usize, usize::saturating_add)
}

/// `GustBinaryLayout` of elementwise.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BinaryLayout {
    pub(super) rank: u32,
    pub(super) shape: [u32; MAX_RANK],
    pub(super) lhs_stride: [u32; MAX_RANK],
    pub(super) rhs_stride: [u32; MAX_RANK],
}

// SAFETY: plain `repr(C)` data laid out exactly like the CUDA struct.
unsafe impl DeviceRepr for BinaryLayout {}

/// `GustPermuteLayout` of movement.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PermuteLayout {
    pub(super) rank: u32,
    pub(super) shape: [u32; MAX_RANK],
    pub(super) in_stride: [u32; MAX_RANK],
}

// SAFETY: plain `repr(C)` data laid out exactly like the CUDA struct.
unsafe impl DeviceRepr for PermuteLayout {}

/// Copy `values` into a fixed array of `u32`, failing if any does not fit.
pub(super) fn to_u32_array(
    values: &[usize],
    what: &str,
    kernel: &Kernel,
) -> Result<[u32; MAX_RANK]> {
    let mut out = [0u32; MAX_RANK];
    if values.len() > MAX_RANK {
        return Err(BridgeError::invalid(format!(
            "cuda {}: rank {} is above {MAX_RANK}",
            kernel.name(),
            values.len()
        )));
    }
    for (slot, &v) in out.iter_mut().zip(values) {
        *slot = u32_arg(v, what, kernel)?;
    }
    Ok(out)
}

impl CudaBackend {
    /// Launch `name` with `args` (each pushed by reference), naming the
    /// kernel in any error.
    pub(super) fn launch<'a>(
        &'a self,
        kernel: &Kernel,
        name: &str,
        cfg: LaunchConfig,
        push: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<()> {
        let function = self.function(name)?;
        let mut builder = self.stream.launch_builder(function);
        push(&mut builder);
        // SAFETY: every kernel's argument list is built to match its CUDA
        // signature right where it is launched, every buffer was checked to
        // hold what the kernel touches, and the kernels bound their loops by
        // the counts they are given.
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|e| driver_error(&format!("{} ({name}) launch failed", kernel.name()), e))
    }
}

#[cfg(test)]
mod tests {
    //! Host-only: dimension merging and launch shapes.

    use super::*;

    #[test]
    fn merge_dims_merges_contiguous_and_drops_unit_dims() {
        let (shape, [a, b]) = merge_dims(&[2, 3, 4], [&[12, 4, 1], &[12, 4, 1]]);
        assert_eq!((shape, a, b), (vec![24], vec![1], vec![1]));
        let (shape, [a, b]) = merge_dims(&[3, 4], [&[4, 1], &[0, 0]]);
        assert_eq!((shape, a, b), (vec![12], vec![1], vec![0]));
        let (shape, [a, b]) = merge_dims(&[2, 3, 4], [&[12, 4, 1], &[0, 1, 0]]);
        assert_eq!(
            (shape, a, b),
            (vec![2, 3, 4], vec![12, 4, 1], vec![0, 1, 0])
        );
        let (shape, [a]) = merge_dims(&[1, 5, 1], [&[5, 1, 1]]);
        assert_eq!((shape, a), (vec![5], vec![1]));
        let (shape, [a]) = merge_dims(&[1, 1], [&[1, 1]]);
        assert_eq!((shape, a), (vec![1], vec![0]));
    }

    #[test]
    fn merge_dims_addresses_the_same_elements() {
        let mut rng = Rng::new(7);
        for _ in 0..500 {
            let rank = 1 + rng.below(MAX_RANK);
            let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(3)).collect();
            // Operands: contiguous, broadcast in random dims, or permuted.
            let strides: Vec<Vec<usize>> = (0..2)
                .map(|_| {
                    let mut s = contiguous_strides(&shape);
                    match rng.below(3) {
                        0 => {}
                        1 => s.iter_mut().for_each(|v| {
                            if rng.below(2) == 0 {
                                *v = 0;
                            }
                        }),
                        _ => {
                            let perm = random_perm(&mut rng, rank);
                            let base = contiguous_strides(
                                &perm.iter().map(|&p| shape[p]).collect::<Vec<_>>(),
                            );
                            for (d, &p) in perm.iter().enumerate() {
                                s[p] = base[d];
                            }
                        }
                    }
                    s
                })
                .collect();
            let (merged, [ma, mb]) = merge_dims(&shape, [&strides[0], &strides[1]]);
            assert_eq!(
                offsets(&shape, &strides[0]),
                offsets(&merged, &ma),
                "{shape:?} {strides:?}"
            );
            assert_eq!(
                offsets(&shape, &strides[1]),
                offsets(&merged, &mb),
                "{shape:?} {strides:?}"
            );
        }
    }

    #[test]
    fn extent_covers_the_largest_index() {
        assert_eq!(extent_of(&[3, 4], &[4, 1]), 12);
        assert_eq!(extent_of(&[3, 4], &[0, 1]), 4);
        assert_eq!(extent_of(&[3, 4], &[1, 3]), 12);
        assert_eq!(extent_of(&[2, 0], &[1, 1]), 0);
    }

    #[test]
    fn launch_shapes_respect_device_limits() {
        let big = flat_config(usize::MAX / 2);
        assert_eq!(big.grid_dim.0, MAX_BLOCKS);
        assert_eq!(flat_config(1).grid_dim.0, 1);
        let rows = rows_config(10, 3, BLOCK);
        assert_eq!((rows.grid_dim.0, rows.block_dim.0), (10, 32));
        let rows = rows_config(1 << 40, 1 << 20, 512);
        assert_eq!((rows.grid_dim.0, rows.block_dim.0), (MAX_BLOCKS, 512));
    }

    /// xorshift64*: small, deterministic, good enough for index shapes.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }

    fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![1; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        strides
    }

    fn random_perm(rng: &mut Rng, n: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        perm
    }

    /// Element offsets of every multi-index of `shape`, in row-major order.
    fn offsets(shape: &[usize], strides: &[usize]) -> Vec<usize> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut i| {
                let mut at = 0;
                for d in (0..shape.len()).rev() {
                    at += (i % shape[d]) * strides[d];
                    i /= shape[d];
                }
                at
            })
            .collect()
    }
}
