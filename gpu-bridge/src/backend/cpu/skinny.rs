//! Matrix products with few rows: a sentence or a decoded token through a
//! linear layer, `[rows, k] · [k, n]` with rows in the single digits and the
//! weights in the megabytes.
//!
//! `gemm` lays its register tile along the long side and walks the weights
//! a narrow column strip at a time, a row of the matrix (often more than a
//! page) apart, so a handful of rows spends its time waiting for memory.
//! One sentence through MiniLM (8 rows; 42 MB of weights, which two cores
//! stream in under 1 ms) took 9.1 ms end to end with gemm's AVX2 kernels,
//! 6.5 ms of it in the products, and 4.7 ms with its AVX-512 ones. This
//! kernel keeps up to eight rows of the output, 32 columns wide, in AVX-512
//! registers, sweeps a block of weight rows left to right with prefetching,
//! and so loads every weight once per eight rows (the next group of eight
//! finds it in L2): the sentence takes 3.3–3.7 ms. CPUs without AVX-512,
//! and other architectures, keep using `gemm`.

use std::arch::x86_64::*;

/// Rows kept in registers at once: 8 rows × 2 registers leaves half of the
/// 32 vector registers for the weights and the broadcast inputs.
const TILE_ROWS: usize = 8;

/// Weight rows per sweep across the columns: enough that the output tile's
/// reload per block costs little, few enough that the block (32 rows of a
/// thread's columns) stays in L2 for every group of 8 rows. On MiniLM (one
/// sentence) 16, 24, 32 and 48 took 3.8, 3.3, 3.3 and 3.6 ms; no blocking
/// 4.8 ms.
const DEPTH_BLOCK: usize = 32;

/// How many weight rows ahead the tile prefetches its columns. Within a
/// block each row is a separate stream the hardware does not predict well;
/// without the prefetch MiniLM took 4.5 instead of 3.3 ms.
const PREFETCH_ROWS: usize = 16;

/// Columns per register tile: two 16-lane registers.
pub(super) const TILE_COLUMNS: usize = 32;

/// Whether this CPU runs the kernel; callers use `gemm` otherwise.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// A row-major product `c = a · b`: `a` is `m × k`, `b` is `k × n`, `c` is
/// `m × n`, each contiguous.
#[derive(Clone, Copy)]
pub(super) struct Product {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) a: *const f32,
    pub(super) b: *const f32,
    pub(super) c: *mut f32,
}

/// Writes columns `first..first + width` of `product.c`.
///
/// # Safety
/// [`available`] returned true; `a`, `b` and `c` point to at least `m × k`,
/// `k × n` and `m × n` floats; `first + width <= n`; no other thread reads
/// or writes those columns of `c` meanwhile, and `c` aliases neither input.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn columns(product: Product, first: usize, width: usize) {
    let Product { m, k, n, a, b, c } = product;
    let end = first + width;
    // A few weight rows at a time, swept left to right: the tiles then read
    // each row sequentially, which the hardware prefetchers follow, instead
    // of walking down a column a row (often more than a page) at a time.
    // The output tile is reloaded per block; it stays in L1/L2.
    for depth_start in (0..k).step_by(DEPTH_BLOCK) {
        let depth = (k - depth_start).min(DEPTH_BLOCK);
        let accumulate = depth_start > 0;
        let mut row = 0;
        while row < m {
            let rows = (m - row).min(TILE_ROWS);
            let mut column = first;
            while column < end {
                let tile_width = (end - column).min(TILE_COLUMNS);
                // A narrow last tile loads and stores through masks;
                // masked-off lanes are never touched, so nothing past the
                // row end is read.
                let low = lanes(tile_width.min(16));
                let high = lanes(tile_width.saturating_sub(16));
                let shape = Tile {
                    depth,
                    lhs_stride: k,
                    rhs_stride: n,
                    low,
                    high,
                    accumulate,
                };
                // SAFETY: rows row..row + rows, depths depth_start..
                // depth_start + depth and columns column..column +
                // tile_width lie inside the caller's matrices.
                unsafe {
                    let a = a.add(row * k + depth_start);
                    let b = b.add(depth_start * n + column);
                    let c = c.add(row * n + column);
                    match rows {
                        8 => tile::<8>(&shape, a, b, c),
                        7 => tile::<7>(&shape, a, b, c),
                        6 => tile::<6>(&shape, a, b, c),
                        5 => tile::<5>(&shape, a, b, c),
                        4 => tile::<4>(&shape, a, b, c),
                        3 => tile::<3>(&shape, a, b, c),
                        2 => tile::<2>(&shape, a, b, c),
                        _ => tile::<1>(&shape, a, b, c),
                    }
                }
                column += tile_width;
            }
            row += rows;
        }
    }
}

/// A mask of the lowest `count` (at most 16) lanes.
fn lanes(count: usize) -> __mmask16 {
    ((1u32 << count) - 1) as __mmask16
}

/// Where one register tile reads and writes.
struct Tile {
    /// Weight rows to multiply in.
    depth: usize,
    /// Distance between rows of the input.
    lhs_stride: usize,
    /// Distance between rows of the weights and of the output.
    rhs_stride: usize,
    /// Lanes of the tile's first 16 columns that exist.
    low: __mmask16,
    /// Lanes of its second 16 columns that exist.
    high: __mmask16,
    /// Add to the output instead of overwriting it.
    accumulate: bool,
}

/// `ROWS` rows by up to 32 columns of the output, over `depth` weight rows.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const ROWS: usize>(shape: &Tile, a: *const f32, b: *const f32, c: *mut f32) {
    let &Tile {
        depth,
        lhs_stride,
        rhs_stride,
        low,
        high,
        accumulate,
    } = shape;
    let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
    if accumulate {
        for (row, sum) in sums.iter_mut().enumerate() {
            // SAFETY: the masked lanes of row `row` of the tile lie inside c.
            unsafe {
                let out = c.add(row * rhs_stride);
                sum[0] = _mm512_maskz_loadu_ps(low, out);
                sum[1] = _mm512_maskz_loadu_ps(high, out.add(16));
            }
        }
    }
    for step in 0..depth {
        // SAFETY: weight row `step` and column `step` of the ROWS input
        // rows lie inside the caller's matrices; the masks keep the loads
        // inside the tile's columns.
        unsafe {
            let weights = b.add(step * rhs_stride);
            // `wrapping_add`: near the end this points past the matrix,
            // which a prefetch may (it never faults) but `add` may not.
            let ahead = weights.wrapping_add(PREFETCH_ROWS * rhs_stride);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
            let left = _mm512_maskz_loadu_ps(low, weights);
            let right = _mm512_maskz_loadu_ps(high, weights.add(16));
            for (row, sum) in sums.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(row * lhs_stride + step));
                sum[0] = _mm512_fmadd_ps(x, left, sum[0]);
                sum[1] = _mm512_fmadd_ps(x, right, sum[1]);
            }
        }
    }
    for (row, sum) in sums.iter().enumerate() {
        // SAFETY: the masked lanes of row `row` of the tile lie inside c.
        unsafe {
            let out = c.add(row * rhs_stride);
            _mm512_mask_storeu_ps(out, low, sum[0]);
            _mm512_mask_storeu_ps(out.add(16), high, sum[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a · b` in f64, the order-independent reference.
    fn reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for row in 0..m {
            for depth in 0..k {
                let x = f64::from(a[row * k + depth]);
                for column in 0..n {
                    c[row * n + column] += x * f64::from(b[depth * n + column]);
                }
            }
        }
        c
    }

    /// [`columns`] over vectors, with the bounds it relies on checked.
    fn write_columns(
        (m, k, n): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        first: usize,
        width: usize,
    ) {
        assert!(available() && a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
        assert!(first + width <= n);
        let product = Product {
            m,
            k,
            n,
            a: a.as_ptr(),
            b: b.as_ptr(),
            c: c.as_mut_ptr(),
        };
        // SAFETY: checked just above.
        unsafe { columns(product, first, width) }
    }

    /// Deterministic values in [-1, 1) that do not repeat along a row.
    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    #[test]
    fn matches_the_reference_on_ragged_shapes() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX-512, the kernel never runs here");
            return;
        }
        // Rows below, at and past a register tile; columns inside one tile,
        // at a mask edge (16), ragged past whole tiles; depths inside, at
        // and past a block.
        for m in [1, 3, 8, 9, 17, 64] {
            for n in [1, 5, 16, 31, 33, 70] {
                for k in [1, 7, 32, 33, 100] {
                    let a = values(m * k, m + k);
                    let b = values(k * n, n);
                    // NaN marks an element no block wrote.
                    let mut c = vec![f32::NAN; m * n];
                    // Two column blocks, as two threads would get them.
                    let split = n / 2;
                    for (first, width) in [(0, split), (split, n - split)] {
                        write_columns((m, k, n), &a, &b, &mut c, first, width);
                    }
                    let want = reference(m, k, n, &a, &b);
                    for (index, (&got, &want)) in c.iter().zip(&want).enumerate() {
                        let bound = 1e-5 * (k as f64).sqrt() * want.abs().max(1.0);
                        assert!(
                            (f64::from(got) - want).abs() <= bound,
                            "{m}×{k}×{n}, element {index}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn leaves_other_columns_alone() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX-512, the kernel never runs here");
            return;
        }
        let (m, k, n) = (9, 40, 50);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let mut c = vec![f32::NAN; m * n];
        let (first, width) = (7, 20);
        write_columns((m, k, n), &a, &b, &mut c, first, width);
        let want = reference(m, k, n, &a, &b);
        for row in 0..m {
            for column in 0..n {
                let got = c[row * n + column];
                if (first..first + width).contains(&column) {
                    assert!((f64::from(got) - want[row * n + column]).abs() < 1e-4);
                } else {
                    assert!(got.is_nan(), "row {row} column {column} was written");
                }
            }
        }
    }
}
