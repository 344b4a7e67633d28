//! Linear layers over 16-bit weights: `out = x · wᵀ` with `x` in f32 and
//! `w` (`[n, k]`, the way models store a linear layer) in f16 or bf16.
//!
//! Half-precision weights are half the bytes to keep resident and to stream
//! per call: MiniLM's linear layers are 42 MB in f32 and 21 MB in 16 bits,
//! and one sentence through them is bound by reading the weights. Sums
//! are f32 throughout:
//! - f16 weights (and bf16 ones on CPUs without AVX-512 BF16) are widened
//!   in registers (F16C's `vcvtph2ps`, a shift for bf16) and multiplied
//!   into f32 accumulators: the only error against f32 weights is the
//!   weights' own rounding (relative 2⁻¹¹ for f16, 2⁻⁸ for bf16).
//! - bf16 weights on CPUs with AVX-512 BF16 meet inputs rounded to bf16
//!   once per call, and `vdpbf16ps` multiplies 32 pairs into 16 f32 sums
//!   per instruction: twice the work of a fused multiply-add, and no
//!   widening. Both sides' rounding then counts (relative 2⁻⁸ each).
//!
//! With AVX-512 a register tile holds 8 rows of `x` times 2 weight rows as
//! 16 vectors of partial dot products along `k`, summed across lanes four
//! at a time at the end. The weight rows stream left to right, prefetched
//! into L2 a few tiles ahead, and each weight is loaded once per 8 rows of
//! `x`; a block of weight rows is swept for every group of rows while it
//! sits in L2. Elsewhere a block of weight rows is widened into a scratch
//! buffer and dotted with each row.
//!
//! One sentence of MiniLM (8 rows, the 24 products of its 6 layers, one
//! thread, weights streamed from memory): 2.5 ms with f16 weights, 1.6 ms
//! with bf16 and `vdpbf16ps`; with the prefetches into L1 instead of L2,
//! 2.3 ms for bf16, and 3.5 ms without prefetching (a 4 × 4 tile, which
//! widened every weight twice for 8 rows, was slower still).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Which 16-bit float the weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Half {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

/// Weight rows swept for every group of `x` rows while they stay in L2:
/// 64 rows of MiniLM's widest `k` (1536) are 192 KB.
const WEIGHT_BLOCK: usize = 64;

/// Rows of `x` per register tile: 8 rows × 2 weight rows is 16 sums, and
/// each weight is loaded (and widened) once per 8 rows.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 8;

/// How many tiles ahead a tile prefetches its lanes of the next weight
/// rows (into L2: 6 to 24 tiles ran within 3% of each other).
#[cfg(target_arch = "x86_64")]
const PREFETCH_TILES: usize = 8;

/// Weight rows (output columns) per register tile.
pub(super) const TILE_COLUMNS: usize = 2;

/// One product: `x` is `[m, k]`; the weight matrices, each `[n, k]`, write
/// their outputs side by side into `out`, `[m, stride]` with `stride` the
/// sum of their `n`.
pub(super) struct Product<'a> {
    pub(super) half: Half,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) x: &'a [f32],
    /// `x` rounded to bf16 ([`bf16_inputs`]) when the weights are bf16 and
    /// the CPU multiplies bf16 pairs.
    pub(super) x_bf16: Option<&'a [u16]>,
    pub(super) matrices: &'a [&'a [u16]],
    pub(super) out: *mut f32,
    pub(super) stride: usize,
}

// SAFETY: `out` is written only through `columns`, whose callers give each
// thread its own columns (see its contract); everything else is shared
// read-only.
unsafe impl Sync for Product<'_> {}

/// Writes output columns `first..first + width` (counted across the
/// matrices side by side).
///
/// # Safety
/// Every matrix holds `n × k` values with `n` summing to `stride`; `x` holds
/// `m × k`; `out` points to `m × stride` floats that alias neither; `first +
/// width <= stride`; no other thread reads or writes those columns of `out`
/// meanwhile.
pub(super) unsafe fn columns(product: &Product<'_>, first: usize, width: usize) {
    let k = product.k;
    let end = first + width;
    let mut start = 0;
    for &matrix in product.matrices {
        let n = matrix.len().checked_div(k).unwrap_or(0);
        let (lo, hi) = (first.max(start), end.min(start + n));
        if lo < hi {
            let rows = &matrix[(lo - start) * k..(hi - start) * k];
            // SAFETY: columns lo..hi of `out` are this call's (caller).
            unsafe { block(product, rows, hi - lo, product.out.add(lo)) };
        }
        start += n;
    }
}

/// `count` weight rows (`w`, `count × k`) into the output columns starting
/// at `out` (row stride `product.stride`).
///
/// # Safety
/// As [`columns`], for the `count` columns from `out`.
unsafe fn block(product: &Product<'_>, w: &[u16], count: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        let x = product.x.as_ptr();
        // SAFETY: the CPU has the features (checked here, and for bf16
        // inputs by `bf16_inputs`); the caller's bounds.
        unsafe {
            match (product.half, product.x_bf16) {
                (Half::Bf16, Some(x)) => {
                    block_avx512::<Bf16Dot>(product, x.as_ptr(), w, count, out);
                }
                (Half::F16, _) => {
                    block_avx512::<Widening<F16Bits>>(product, x, w, count, out);
                }
                (Half::Bf16, None) => {
                    block_avx512::<Widening<Bf16Bits>>(product, x, w, count, out);
                }
            }
        }
        return;
    }
    // SAFETY: the caller's bounds.
    unsafe { block_portable(product, w, count, out) }
}

/// `x` rounded to bf16 (to nearest even) for bf16 weights, where this
/// CPU multiplies bf16 pairs (AVX-512 BF16); `None` elsewhere, and then
/// bf16 weights are widened and multiplied by the f32 `x`.
pub(super) fn bf16_inputs(half: Half, x: &[f32]) -> Option<Vec<u16>> {
    #[cfg(target_arch = "x86_64")]
    if half == Half::Bf16 && avx512() && std::arch::is_x86_feature_detected!("avx512bf16") {
        let mut rounded = vec![0u16; x.len()];
        // SAFETY: the CPU has AVX-512 F and BF16 (checked just above).
        unsafe { round_to_bf16(x, &mut rounded) };
        return Some(rounded);
    }
    let _ = (half, x);
    None
}

/// `out[i] = bf16(x[i])`, rounded to nearest even 16 at a time
/// (`vcvtneps2bf16`, which also flushes subnormals to zero: inputs that
/// small add nothing a sum of products would keep). A scalar loop over a
/// batch's activations was 2% of a batched MiniLM call.
///
/// # Safety
/// The CPU has AVX-512 F and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_to_bf16(x: &[f32], out: &mut [u16]) {
    let mut chunks = x.chunks_exact(16);
    let mut outs = out.chunks_exact_mut(16);
    for (x, out) in (&mut chunks).zip(&mut outs) {
        // SAFETY: 16 floats in, 16 halves out.
        unsafe {
            let rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr()));
            _mm256_storeu_si256(
                out.as_mut_ptr().cast(),
                std::mem::transmute::<__m256bh, __m256i>(rounded),
            );
        }
    }
    for (x, out) in chunks.remainder().iter().zip(outs.into_remainder()) {
        *out = bf16::from_f32(*x).to_bits();
    }
}

/// Whether the AVX-512 kernels run on this CPU.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Widens a block of weight rows into f32 once, then dots every row of `x`
/// with them.
///
/// # Safety
/// As [`block`].
unsafe fn block_portable(product: &Product<'_>, w: &[u16], count: usize, out: *mut f32) {
    let (m, k, x) = (product.m, product.k, product.x);
    let mut wide = vec![0f32; WEIGHT_BLOCK * k];
    for (index, rows) in w.chunks(WEIGHT_BLOCK * k.max(1)).enumerate() {
        let wide = &mut wide[..rows.len()];
        match product.half {
            Half::F16 => bytemuck::cast_slice::<u16, f16>(rows).convert_to_f32_slice(wide),
            Half::Bf16 => bytemuck::cast_slice::<u16, bf16>(rows).convert_to_f32_slice(wide),
        }
        let first = index * WEIGHT_BLOCK;
        let block_rows = (count - first).min(WEIGHT_BLOCK);
        for row in 0..m {
            let x_row = &x[row * k..(row + 1) * k];
            for column in 0..block_rows {
                let w_row = &wide[column * k..(column + 1) * k];
                let dot = x_row.iter().zip(w_row).map(|(a, b)| a * b).sum::<f32>();
                // SAFETY: row < m and first + column < count (caller).
                unsafe { *out.add(row * product.stride + first + column) = dot };
            }
        }
    }
}

/// How a register tile turns a weight type and the rows of `x` into sums.
#[cfg(target_arch = "x86_64")]
trait TileKernel {
    /// What `x` is read as.
    type Input;

    /// Computes and stores one tile of `ROWS` rows.
    ///
    /// # Safety
    /// The tile's rows, weight rows and outputs are in bounds; the CPU has
    /// the features [`block`] checked for this kernel.
    unsafe fn tile<const ROWS: usize>(tile: &Tile<Self::Input>);
}

/// f32 inputs times weights widened to f32 in registers, fused
/// multiply-adds.
#[cfg(target_arch = "x86_64")]
struct Widening<W>(std::marker::PhantomData<W>);

/// Loads 16 weights (fewer under `mask`, the rest zero) as f32.
#[cfg(target_arch = "x86_64")]
trait Widen {
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and F16C; the masked lanes from `at` are
    /// readable.
    unsafe fn load(at: *const u16, mask: __mmask16) -> __m512;
}

#[cfg(target_arch = "x86_64")]
struct F16Bits;

#[cfg(target_arch = "x86_64")]
impl Widen for F16Bits {
    #[inline(always)]
    unsafe fn load(at: *const u16, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, at.cast())) }
    }
}

#[cfg(target_arch = "x86_64")]
struct Bf16Bits;

#[cfg(target_arch = "x86_64")]
impl Widen for Bf16Bits {
    #[inline(always)]
    unsafe fn load(at: *const u16, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's. A bfloat16 is the top half of an f32.
        unsafe {
            let bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, at.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<W: Widen> TileKernel for Widening<W> {
    type Input = f32;

    #[inline]
    unsafe fn tile<const ROWS: usize>(tile: &Tile<f32>) {
        // SAFETY: the caller's.
        unsafe { widening_tile::<W, ROWS>(tile) }
    }
}

/// # Safety
/// As [`TileKernel::tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
#[inline]
unsafe fn widening_tile<W: Widen, const ROWS: usize>(tile: &Tile<f32>) {
    let k = tile.k;
    let mut sums = [[_mm512_setzero_ps(); TILE_COLUMNS]; ROWS];
    let mut step = 0;
    let mut mask: __mmask16 = 0xFFFF;
    while step < k {
        if k - step < 16 {
            mask = ((1u32 << (k - step)) - 1) as __mmask16;
        }
        // SAFETY: lanes step..step + 16 (under the mask) of every weight row
        // and x row lie inside the tile's rows.
        unsafe {
            let weights: [__m512; TILE_COLUMNS] =
                std::array::from_fn(|c| W::load(tile.weights[c].add(step), mask));
            prefetch_ahead(tile, step);
            for (row, sums) in sums.iter_mut().enumerate() {
                let x = _mm512_maskz_loadu_ps(mask, tile.x.add(row * k + step));
                for (sum, &weight) in sums.iter_mut().zip(&weights) {
                    *sum = _mm512_fmadd_ps(x, weight, *sum);
                }
            }
        }
        step += 16;
    }
    // SAFETY: the caller's bounds.
    unsafe { store(tile, &sums) }
}

/// bf16 inputs (rounded once per call) times bf16 weights with AVX-512
/// BF16's `vdpbf16ps`: 32 products per instruction into 16 f32 sums, twice
/// the work of a fused multiply-add and no widening.
#[cfg(target_arch = "x86_64")]
struct Bf16Dot;

#[cfg(target_arch = "x86_64")]
impl TileKernel for Bf16Dot {
    type Input = u16;

    #[inline]
    unsafe fn tile<const ROWS: usize>(tile: &Tile<u16>) {
        // SAFETY: the caller's.
        unsafe { dot_tile::<ROWS>(tile) }
    }
}

/// # Safety
/// As [`TileKernel::tile`]; the CPU also has AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dot_tile<const ROWS: usize>(tile: &Tile<u16>) {
    let k = tile.k;
    let mut sums = [[_mm512_setzero_ps(); TILE_COLUMNS]; ROWS];
    let mut step = 0;
    let mut mask: __mmask32 = u32::MAX;
    while step < k {
        if k - step < 32 {
            mask = (1u32 << (k - step)) - 1;
        }
        // SAFETY: lanes step..step + 32 (under the mask) of every weight row
        // and x row lie inside the tile's rows. Masked-off lanes are zero
        // on both sides, so they add nothing.
        unsafe {
            let weights: [__m512bh; TILE_COLUMNS] = std::array::from_fn(|c| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                    mask,
                    tile.weights[c].add(step).cast(),
                ))
            });
            prefetch_ahead(tile, step);
            for (row, sums) in sums.iter_mut().enumerate() {
                let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                    mask,
                    tile.x.add(row * k + step).cast(),
                ));
                for (sum, &weight) in sums.iter_mut().zip(&weights) {
                    *sum = _mm512_dpbf16_ps(*sum, x, weight);
                }
            }
        }
        step += 32;
    }
    // SAFETY: the caller's bounds.
    unsafe { store(tile, &sums) }
}

/// A tile [`PREFETCH_TILES`] ahead reads the same lanes of later weight
/// rows: fetch them into L2 now, so that the weights, streamed from
/// memory a couple of rows at a time, arrive before they are needed (see
/// the module docs for what it saves).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead<X>(tile: &Tile<X>, step: usize) {
    for &row in &tile.weights {
        // `wrapping_add`: past the last rows this points outside the
        // matrix, which a prefetch may (it never faults) but `add` may not.
        let ahead = row.wrapping_add(step + PREFETCH_TILES * TILE_COLUMNS * tile.k);
        // SAFETY: a prefetch reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.cast()) };
    }
}

/// Stores a tile's sums, two rows at a time: [row r: column 0, 1; row
/// r + 1: column 0, 1].
///
/// # Safety
/// The tile's `columns` outputs of its `ROWS` rows are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
#[inline]
unsafe fn store<X, const ROWS: usize>(tile: &Tile<X>, sums: &[[__m512; TILE_COLUMNS]; ROWS]) {
    let keep = ((1u32 << tile.columns) - 1) as __mmask8;
    let zero = _mm512_setzero_ps();
    for row in (0..ROWS).step_by(2) {
        let next = sums.get(row + 1).copied().unwrap_or([zero; TILE_COLUMNS]);
        let both = sum_lanes(sums[row][0], sums[row][1], next[0], next[1]);
        // SAFETY: the caller's.
        unsafe {
            _mm_mask_storeu_ps(tile.out.add(row * tile.stride), keep, both);
            if row + 1 < ROWS {
                let second = _mm_movehl_ps(both, both);
                _mm_mask_storeu_ps(tile.out.add((row + 1) * tile.stride), keep, second);
            }
        }
    }
}

/// # Safety
/// As [`block`]; the CPU has the features [`block`] checked for `K`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn block_avx512<K: TileKernel>(
    product: &Product<'_>,
    x: *const K::Input,
    w: &[u16],
    count: usize,
    out: *mut f32,
) {
    let (m, k) = (product.m, product.k);
    let w = w.as_ptr();
    for block_start in (0..count).step_by(WEIGHT_BLOCK) {
        let block_end = (block_start + WEIGHT_BLOCK).min(count);
        for row in (0..m).step_by(TILE_ROWS) {
            let rows = (m - row).min(TILE_ROWS);
            let mut column = block_start;
            while column < block_end {
                let columns = (block_end - column).min(TILE_COLUMNS);
                // A narrow last tile repeats its last weight row and stores
                // only the real columns.
                let weights: [*const u16; TILE_COLUMNS] =
                    std::array::from_fn(|c| w.wrapping_add((column + c.min(columns - 1)) * k));
                let tile = Tile {
                    k,
                    x: x.wrapping_add(row * k),
                    weights,
                    out: out.wrapping_add(row * product.stride + column),
                    stride: product.stride,
                    columns,
                };
                // SAFETY: rows row..row + rows of x and out, weight rows
                // column..column + columns and their outputs lie inside the
                // caller's bounds.
                unsafe {
                    match rows {
                        8 => K::tile::<8>(&tile),
                        7 => K::tile::<7>(&tile),
                        6 => K::tile::<6>(&tile),
                        5 => K::tile::<5>(&tile),
                        4 => K::tile::<4>(&tile),
                        3 => K::tile::<3>(&tile),
                        2 => K::tile::<2>(&tile),
                        _ => K::tile::<1>(&tile),
                    }
                }
                column += columns;
            }
        }
    }
}

/// Where one register tile reads and writes.
#[cfg(target_arch = "x86_64")]
struct Tile<X> {
    k: usize,
    /// The tile's first row of `x` (row stride `k`).
    x: *const X,
    /// Its weight rows.
    weights: [*const u16; TILE_COLUMNS],
    /// Its first output (row stride `stride`).
    out: *mut f32,
    stride: usize,
    /// Output columns to store (the rest repeat the last).
    columns: usize,
}

/// The lane sums of four vectors, `[Σa, Σb, Σc, Σd]`: 13 instructions where
/// four separate reductions take about 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn sum_lanes(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // Per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Per 128-bit lane: [a, b, c, d] partial sums.
    let lanes = _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(ab, cd),
        _mm512_shuffle_ps::<0xEE>(ab, cd),
    );
    let high = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes));
    let half = _mm256_add_ps(_mm512_castps512_ps256(lanes), _mm256_castpd_ps(high));
    _mm_add_ps(
        _mm256_castps256_ps128(half),
        _mm256_extractf128_ps::<1>(half),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x · wᵀ` in f64 over the widened weights.
    fn reference(m: usize, k: usize, x: &[f32], wide: &[f32]) -> Vec<f64> {
        let n = wide.len() / k;
        let mut out = vec![0f64; m * n];
        for row in 0..m {
            for column in 0..n {
                out[row * n + column] = (0..k)
                    .map(|i| f64::from(x[row * k + i]) * f64::from(wide[column * k + i]))
                    .sum();
            }
        }
        out
    }

    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    fn encode(half: Half, values: &[f32]) -> Vec<u16> {
        values
            .iter()
            .map(|&v| match half {
                Half::F16 => f16::from_f32(v).to_bits(),
                Half::Bf16 => bf16::from_f32(v).to_bits(),
            })
            .collect()
    }

    fn widen(half: Half, bits: &[u16]) -> Vec<f32> {
        bits.iter()
            .map(|&b| match half {
                Half::F16 => f16::from_bits(b).to_f32(),
                Half::Bf16 => bf16::from_bits(b).to_f32(),
            })
            .collect()
    }

    /// Which kernel a check runs.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Path {
        /// The one this CPU picks for f32 inputs.
        Best,
        /// bf16 weights times bf16-rounded inputs, where the CPU has them.
        Bf16Inputs,
        /// The fallback for CPUs without AVX-512.
        Portable,
    }

    /// Runs the product in two column blocks (as two threads would) and
    /// checks every output against the f64 reference on the same rounded
    /// weights (and, for bf16 inputs, the same rounded inputs), so the only
    /// difference is f32 summation. False when the CPU lacks the path.
    fn check(half: Half, m: usize, k: usize, ns: &[usize], path: Path) -> bool {
        let x = values(m * k, m + k);
        let x_bf16 = match path {
            Path::Bf16Inputs => match bf16_inputs(half, &x) {
                Some(rounded) => Some(rounded),
                None => return false,
            },
            _ => None,
        };
        let matrices: Vec<Vec<u16>> = ns
            .iter()
            .enumerate()
            .map(|(i, &n)| encode(half, &values(n * k, n + i)))
            .collect();
        let stride: usize = ns.iter().sum();
        let mut out = vec![f32::NAN; m * stride];
        let views: Vec<&[u16]> = matrices.iter().map(Vec::as_slice).collect();
        let product = Product {
            half,
            m,
            k,
            x: &x,
            x_bf16: x_bf16.as_deref(),
            matrices: &views,
            out: out.as_mut_ptr(),
            stride,
        };
        let split = (stride / 2).next_multiple_of(TILE_COLUMNS).min(stride);
        for (first, width) in [(0, split), (split, stride - split)] {
            if path == Path::Portable {
                let mut start = 0;
                for (matrix, &n) in views.iter().zip(ns) {
                    let (lo, hi) = (first.max(start), (first + width).min(start + n));
                    if lo < hi {
                        let rows = &matrix[(lo - start) * k..(hi - start) * k];
                        let at = out.as_mut_ptr().wrapping_add(lo);
                        // SAFETY: as `columns`, for columns lo..hi.
                        unsafe { block_portable(&product, rows, hi - lo, at) };
                    }
                    start += n;
                }
            } else {
                // SAFETY: the matrices, x and out have the sizes `columns`
                // needs and the two blocks are disjoint.
                unsafe { columns(&product, first, width) };
            }
        }
        let x_used = match &x_bf16 {
            Some(rounded) => widen(Half::Bf16, rounded),
            None => x.clone(),
        };
        let mut column = 0;
        for (matrix, &n) in matrices.iter().zip(ns) {
            let want = reference(m, k, &x_used, &widen(half, matrix));
            for row in 0..m {
                for c in 0..n {
                    let got = f64::from(out[row * stride + column + c]);
                    let want = want[row * n + c];
                    let bound = 1e-5 * (k as f64).sqrt() * want.abs().max(1.0);
                    assert!(
                        (got - want).abs() <= bound,
                        "{half:?} {path:?} {m}×{k}×{ns:?} row {row} column {}: {got} vs {want}",
                        column + c
                    );
                }
            }
            column += n;
        }
        true
    }

    #[test]
    fn matches_the_reference_on_ragged_shapes() {
        let mut skipped = false;
        for half in [Half::F16, Half::Bf16] {
            for path in [Path::Best, Path::Bf16Inputs, Path::Portable] {
                if path == Path::Bf16Inputs && half == Half::F16 {
                    continue;
                }
                // Rows below, at and past a register tile; depths inside,
                // at and past a vector (16 or 32 lanes); matrices narrower
                // than a tile, ragged, side by side, and past a block.
                for m in [1, 3, 8, 9, 13, 17] {
                    for k in [1, 15, 16, 17, 33, 40, 384] {
                        for ns in [&[1][..], &[5], &[4, 4, 4], &[3, 70], &[130]] {
                            skipped |= !check(half, m, k, ns, path);
                        }
                    }
                }
            }
        }
        if skipped {
            eprintln!("this CPU has no AVX-512 BF16: the bf16-input path was not run");
        }
    }

    #[test]
    fn half_weights_stay_within_their_rounding_of_f32_weights() {
        // The bound the module states: f32 arithmetic on weights rounded
        // once, so each product moves by at most the weight's relative
        // rounding error times |x·w| summed; with bf16 inputs, the inputs'
        // rounding too.
        let (m, k, n) = (8, 384, 64);
        let x = values(m * k, 3);
        let w = values(n * k, 4);
        let exact = reference(m, k, &x, &w);
        let magnitude: Vec<f64> = (0..m * n)
            .map(|i| {
                let (row, column) = (i / n, i % n);
                (0..k)
                    .map(|j| f64::from(x[row * k + j] * w[column * k + j]).abs())
                    .sum()
            })
            .collect();
        let bf16_x = bf16_inputs(Half::Bf16, &x);
        let cases = [
            (Half::F16, None, 2f64.powi(-11)),
            (Half::Bf16, None, 2f64.powi(-8)),
            (
                Half::Bf16,
                bf16_x.as_deref(),
                2.0 * 2f64.powi(-8) + 2f64.powi(-16),
            ),
        ];
        for (half, x_bf16, epsilon) in cases {
            let bits = encode(half, &w);
            let views = [bits.as_slice()];
            let mut out = vec![0f32; m * n];
            let product = Product {
                half,
                m,
                k,
                x: &x,
                x_bf16,
                matrices: &views,
                out: out.as_mut_ptr(),
                stride: n,
            };
            // SAFETY: sizes as `columns` needs; one block.
            unsafe { columns(&product, 0, n) };
            for i in 0..m * n {
                let error = (f64::from(out[i]) - exact[i]).abs();
                assert!(
                    error <= epsilon * magnitude[i] + 1e-5,
                    "{half:?} (bf16 inputs: {}) element {i}: {} vs {} (bound {})",
                    x_bf16.is_some(),
                    out[i],
                    exact[i],
                    epsilon * magnitude[i]
                );
            }
        }
    }
}
