//! Quantized weights: ggml's block formats, kept as they are in a GGUF
//! file, and the products of f32 activations with them.
//!
//! A linear layer's weights `W[n, k]` in Q4_0, Q4_1, Q8_0, Q4_K or Q6_K take
//! 1/8 to 1/4 of their f32 size, and generation reads every weight once per
//! token, so keeping them quantized is most of the speed of a CPU decoder.
//! `x · Wᵀ` is computed the way llama.cpp does: each row of `x` is quantized
//! on the fly to 8-bit blocks of 32 (one f32 scale each, like ggml's Q8_0 /
//! Q8_1), and each block product is an integer dot product of 4-bit or
//! 8-bit weights with 8-bit activations, scaled once per block. For Q4_1 and
//! Q8_0 weights this is exactly llama.cpp's arithmetic; for the K-quants the
//! activation blocks are smaller than ggml's Q8_K (32 instead of 256
//! values per scale), so slightly more precise.
//!
//! Kernels: AVX-512 VNNI (`vpdpbusd` on 256-bit vectors), AVX2
//! (`vpmaddubsw`), chosen at run time, and a portable one that computes the
//! same integer sums. Rows of `W` are split over the calling rayon pool.

use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{BridgeError, Result};

/// Activation values per quantized block (and per integer dot product).
pub(crate) const ACT_BLOCK: usize = 32;

/// The ggml tensor types the GGUF reader knows, with their block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl GgmlType {
    /// The type of a ggml type id, if this reader knows it.
    pub(crate) fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Elements per block and bytes per block.
    pub(crate) fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
        }
    }

    /// The bridge dtype that keeps this type's blocks as they are, if the
    /// bridge has kernels for it.
    pub(crate) fn quantized_dtype(self) -> Option<DType> {
        Some(match self {
            Self::Q4_0 => DType::Q4_0,
            Self::Q4_1 => DType::Q4_1,
            Self::Q8_0 => DType::Q8_0,
            Self::Q4K => DType::Q4K,
            Self::Q6K => DType::Q6K,
            _ => return None,
        })
    }

    /// The ggml type of a quantized bridge dtype.
    pub(crate) fn of(dtype: DType) -> Option<Self> {
        Some(match dtype {
            DType::Q4_0 => Self::Q4_0,
            DType::Q4_1 => Self::Q4_1,
            DType::Q8_0 => Self::Q8_0,
            DType::Q4K => Self::Q4K,
            DType::Q6K => Self::Q6K,
            _ => return None,
        })
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Expand one block of `kind` (`b` holds exactly its bytes) into `out`
/// (exactly its elements).
pub(crate) fn dequantize_block(kind: GgmlType, b: &[u8], out: &mut [f32]) {
    match kind {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = f16_at(b, 0),
        GgmlType::BF16 => out[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = (f32::from(q & 0x0F) - 8.0) * d;
                out[j + 16] = (f32::from(q >> 4) - 8.0) * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                out[j] = f32::from(q & 0x0F) * d + m;
                out[j + 16] = f32::from(q >> 4) * d + m;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let d = f16_at(b, 0);
            let (m, rest) = if kind == GgmlType::Q5_1 {
                (f16_at(b, 2), &b[4..])
            } else {
                (-16.0 * d, &b[2..])
            };
            let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            for (j, &q) in rest[4..20].iter().enumerate() {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                out[j] = (u32::from(q & 0x0F) | h0) as f32 * d + m;
                out[j + 16] = (u32::from(q >> 4) | h1) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = f32::from(q as i8) * d;
            }
        }
        GgmlType::Q4K => dequantize_q4k(b, out),
        GgmlType::Q6K => dequantize_q6k(b, out),
    }
}

/// Expand whole blocks of `kind` into `out` (as many elements as `raw`
/// holds).
pub(crate) fn dequantize_into(kind: GgmlType, raw: &[u8], out: &mut [f32]) {
    let (elems, bytes) = kind.block();
    for (block, values) in raw.chunks_exact(bytes).zip(out.chunks_exact_mut(elems)) {
        dequantize_block(kind, block, values);
    }
}

/// The 6-bit scale and min of sub-block `j` of a K-quant block (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: d, dmin (f16), 12 bytes of packed 6-bit scales and mins, then 128
/// bytes of 4-bit values for 8 sub-blocks of 32.
fn dequantize_q4k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (s0, m0) = scale_min_k4(2 * chunk, scales);
        let (s1, m1) = scale_min_k4(2 * chunk + 1, scales);
        let (d0, min0) = (d * f32::from(s0), dmin * f32::from(m0));
        let (d1, min1) = (d * f32::from(s1), dmin * f32::from(m1));
        for l in 0..32 {
            out[chunk * 64 + l] = d0 * f32::from(q[l] & 0x0F) - min0;
            out[chunk * 64 + 32 + l] = d1 * f32::from(q[l] >> 4) - min1;
        }
    }
}

/// The six-bit value of element `32·sub + l` of half `half` of a Q6_K block,
/// before the `- 32`.
fn q6k_value(b: &[u8], half: usize, sub: usize, l: usize) -> u8 {
    let ql = &b[half * 64..half * 64 + 64];
    let qh = b[128 + half * 32 + l];
    let low = match sub {
        0 => ql[l] & 0x0F,
        1 => ql[l + 32] & 0x0F,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    low | (((qh >> (2 * sub)) & 3) << 4)
}

/// Q6_K: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 i8 scales,
/// then d (f16), for 16 sub-blocks of 16.
fn dequantize_q6k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let sc = &b[192 + half * 8..192 + half * 8 + 8];
        for sub in 0..4 {
            for l in 0..32 {
                let scale = d * f32::from(sc[2 * sub + l / 16] as i8);
                let q = i32::from(q6k_value(b, half, sub, l)) - 32;
                out[half * 128 + sub * 32 + l] = scale * q as f32;
            }
        }
    }
}

/// One quantized activation block's scale and integer sums.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ActScale {
    /// The block's values are `q · d`.
    d: f32,
    /// Σ q over the first 16 values.
    lo: i32,
    /// Σ q over the last 16 values.
    hi: i32,
    /// `d · Σ q` over the block (ggml's Q8_1 `s`): the block's sum.
    sum: f32,
}

/// One block of 32 values to 8 bits (the reference the vector version
/// matches).
fn quantize_block(values: &[f32], q: &mut [i8]) -> ActScale {
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (mut lo, mut hi) = (0i32, 0i32);
    for (i, (v, q)) in values.iter().zip(q.iter_mut()).enumerate() {
        // |v · inverse| ≤ 127 (up to rounding): the cast cannot wrap; a NaN
        // becomes 0.
        let r = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
        *q = r;
        if i < 16 {
            lo += i32::from(r);
        } else {
            hi += i32::from(r);
        }
    }
    ActScale::new(d, lo, hi)
}

impl ActScale {
    fn new(d: f32, lo: i32, hi: i32) -> Self {
        Self {
            d,
            lo,
            hi,
            sum: d * (lo + hi) as f32,
        }
    }
}

/// [`quantize_block`] with AVX2: the same values (the rounding mode is the
/// default, to nearest even).
///
/// # Safety
/// The CPU has AVX2; `values` and `q` hold one block each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(values: &[f32], q: &mut [i8]) -> ActScale {
    use std::arch::x86_64::*;
    debug_assert!(values.len() == ACT_BLOCK && q.len() == ACT_BLOCK);
    // SAFETY: 32 floats in, 32 bytes out.
    let v: [__m256; 4] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(values.as_ptr().add(8 * i)) });
    let sign = _mm256_set1_ps(-0.0);
    let abs = v.map(|v| _mm256_andnot_ps(sign, v));
    let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let d = amax / 127.0;
    let inverse = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let limit = _mm256_set1_ps(127.0);
    // `cvtps` rounds to nearest even; a NaN becomes 0 through max/min
    // (which return their second operand for NaN).
    let ints = v.map(|v| {
        let scaled = _mm256_mul_ps(v, inverse);
        let clamped = _mm256_min_ps(
            _mm256_max_ps(scaled, _mm256_sub_ps(_mm256_setzero_ps(), limit)),
            limit,
        );
        _mm256_cvtps_epi32(clamped)
    });
    let hsum = |a: __m256i, b: __m256i| {
        let s = _mm256_add_epi32(a, b);
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)))
    };
    let (lo, hi) = (hsum(ints[0], ints[1]), hsum(ints[2], ints[3]));
    // i32 → i16 → i8 packs work per 128-bit lane: put the lanes back in
    // order afterwards.
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(ints[0], ints[1]),
        _mm256_packs_epi32(ints[2], ints[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: 32 bytes out.
    unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), ordered) };
    ActScale::new(d, lo, hi)
}

/// Rows of f32 activations quantized to 8-bit blocks of [`ACT_BLOCK`].
#[derive(Debug)]
pub(crate) struct Acts {
    rows: usize,
    k: usize,
    qs: Vec<i8>,
    scales: Vec<ActScale>,
}

impl Acts {
    /// Quantize `x`, `rows × k` (`k` a multiple of [`ACT_BLOCK`]): per block
    /// `d = max|x| / 127`, `q = round(x / d)` (ties to even, as ggml's x86
    /// code rounds), with `kernels`' instructions.
    pub(crate) fn quantize(kernels: Kernels, x: &[f32], rows: usize, k: usize) -> Self {
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(k % ACT_BLOCK, 0);
        let mut qs = vec![0i8; x.len()];
        let mut scales = vec![ActScale::default(); x.len() / ACT_BLOCK];
        let blocks = x
            .chunks_exact(ACT_BLOCK)
            .zip(qs.chunks_exact_mut(ACT_BLOCK))
            .zip(scales.iter_mut());
        match kernels {
            Kernels::Portable => {
                for ((values, q), scale) in blocks {
                    *scale = quantize_block(values, q);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 | Kernels::Vnni => {
                for ((values, q), scale) in blocks {
                    // SAFETY: `Kernels::best` saw AVX2 on this CPU; the
                    // chunks are whole blocks.
                    *scale = unsafe { quantize_block_avx2(values, q) };
                }
            }
        }
        Self {
            rows,
            k,
            qs,
            scales,
        }
    }

    fn row(&self, r: usize) -> (&[i8], &[ActScale]) {
        let blocks = self.k / ACT_BLOCK;
        (
            &self.qs[r * self.k..(r + 1) * self.k],
            &self.scales[r * blocks..(r + 1) * blocks],
        )
    }

    fn group<const R: usize>(&self, first: usize) -> ([&[i8]; R], [&[ActScale]; R]) {
        let rows: [(&[i8], &[ActScale]); R] = std::array::from_fn(|i| self.row(first + i));
        (rows.map(|r| r.0), rows.map(|r| r.1))
    }
}

/// Which kernels run the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernels {
    /// Integer sums in plain Rust: any CPU.
    Portable,
    /// `vpmaddubsw` + `vpmaddwd` on 256-bit vectors.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// `vpdpbusd` (AVX-512 VNNI) on 256-bit vectors.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernels {
    /// The fastest this CPU runs.
    pub(crate) fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            if avx2
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Self::Vnni;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Every set this CPU runs, for tests.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut all = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            match Self::best() {
                Self::Vnni => all.extend([Self::Avx2, Self::Vnni]),
                Self::Avx2 => all.push(Self::Avx2),
                Self::Portable => {}
            }
        }
        all
    }
}

/// Bytes of one row of `k` values in `dtype`, or why `k` does not fit its
/// blocks.
pub(crate) fn row_bytes(dtype: DType, k: usize) -> Result<usize> {
    let kind = GgmlType::of(dtype)
        .ok_or_else(|| BridgeError::shape(format!("{dtype} is not a quantized dtype")))?;
    let (elems, bytes) = kind.block();
    if !k.is_multiple_of(elems) {
        return Err(BridgeError::shape(format!(
            "a {dtype} row holds whole blocks of {elems} values; {k} is not a multiple"
        )));
    }
    Ok(k / elems * bytes)
}

/// A quantized weight matrix `[n, k]` as its blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Weights<'a> {
    /// The quantized dtype.
    pub(crate) dtype: DType,
    /// Its blocks, row after row.
    pub(crate) blocks: &'a [u8],
    /// Rows (outputs).
    pub(crate) n: usize,
    /// Columns (inputs), whole blocks.
    pub(crate) k: usize,
}

/// `out[t, Σn] = x[t, k] · [w₁ w₂ …]ᵀ`: each weight matrix's products side
/// by side, `x` quantized once, and the rows of every matrix split over the
/// current rayon pool in one parallel pass.
pub(crate) fn linear(
    kernels: Kernels,
    weights: &[Weights<'_>],
    x: &[f32],
    t: usize,
    out: &mut [f32],
) -> Result<()> {
    let k = weights.first().map_or(0, |w| w.k);
    let total: usize = weights.iter().map(|w| w.n).sum();
    if x.len() < t * k || out.len() < t * total {
        return Err(BridgeError::backend(format!(
            "quantized linear: buffers of {} and {} bytes are short for {t}×{k} · ({total}×{k})ᵀ",
            x.len() * 4,
            out.len() * 4
        )));
    }
    // Work items: (first output column, row bytes, dtype, rows of blocks).
    let threads = rayon::current_num_threads().max(1);
    let mut items: Vec<(usize, usize, DType, &[u8])> = Vec::new();
    let mut column = 0;
    for w in weights {
        let row = row_bytes(w.dtype, w.k)?;
        if w.k != k || w.blocks.len() < w.n * row {
            return Err(BridgeError::backend(format!(
                "quantized linear: {} bytes of {} weights are short for {}×{}, or {} ≠ {k}",
                w.blocks.len(),
                w.dtype,
                w.n,
                w.k,
                w.k
            )));
        }
        // Enough chunks to balance the threads, few enough that each is
        // worth handing out.
        let chunk = w.n.div_ceil(threads * 4).max(16);
        for (c, rows) in w.blocks[..w.n * row].chunks(chunk * row).enumerate() {
            items.push((column + c * chunk, row, w.dtype, rows));
        }
        column += w.n;
    }
    let acts = Acts::quantize(kernels, &x[..t * k], t, k);
    let out = &mut out[..t * total];
    if t == 1 {
        // The output is one row: each item writes its own stretch of it.
        let mut rest = &mut *out;
        let mut pieces = Vec::with_capacity(items.len());
        for &(_, row, dtype, w) in &items {
            let (piece, tail) = rest.split_at_mut(w.len() / row);
            pieces.push((row, dtype, w, piece));
            rest = tail;
        }
        pieces
            .into_par_iter()
            .for_each(|(row, dtype, w, out)| rows(kernels, dtype, w, row, &acts, out));
    } else {
        // Each item gives a `[rows, t]` block of the output's columns,
        // placed afterwards: the scatter costs `t · Σn` stores.
        let blocks: Vec<Vec<f32>> = items
            .par_iter()
            .map(|&(_, row, dtype, w)| {
                let mut local = vec![0f32; w.len() / row * t];
                rows(kernels, dtype, w, row, &acts, &mut local);
                local
            })
            .collect();
        // Row by row of the output, so the stores are contiguous (the
        // blocks are small and stay in cache).
        for (&(first, ..), local) in items.iter().zip(&blocks) {
            let rows = local.len() / t;
            for (r, out_row) in out.chunks_exact_mut(total).enumerate() {
                for (j, o) in out_row[first..first + rows].iter_mut().enumerate() {
                    *o = local[j * t + r];
                }
            }
        }
    }
    Ok(())
}

/// `out[j·t + r] = w_j · act_r` for every row `w_j` of `w` and every row of
/// `acts`.
fn rows(kernels: Kernels, dtype: DType, w: &[u8], row: usize, acts: &Acts, out: &mut [f32]) {
    match kernels {
        Kernels::Portable => portable::rows(dtype, w, row, acts, out),
        // SAFETY (both): `Kernels::best` saw these features on this CPU, and
        // `available` offers no others.
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => unsafe { avx2::rows(dtype, w, row, acts, out) },
        #[cfg(target_arch = "x86_64")]
        Kernels::Vnni => unsafe { vnni::rows(dtype, w, row, acts, out) },
    }
}

/// Visits each weight row with groups of up to four activation rows: a
/// weight block is decoded once for all of them.
macro_rules! rows_driver {
    ($dot:ident) => {
        #[allow(clippy::needless_range_loop)]
        fn rows_impl(dtype: DType, w: &[u8], row: usize, acts: &Acts, out: &mut [f32]) {
            let t = acts.rows;
            // The activation rows, grouped once for every weight row.
            let fours: Vec<_> = (0..t / 4).map(|g| acts.group::<4>(4 * g)).collect();
            let ones: Vec<_> = (t / 4 * 4..t).map(|r| acts.group::<1>(r)).collect();
            for (wrow, o) in w.chunks_exact(row).zip(out.chunks_exact_mut(t)) {
                let (grouped, rest) = o.split_at_mut(t / 4 * 4);
                for (o, &(a, s)) in grouped.chunks_exact_mut(4).zip(&fours) {
                    o.copy_from_slice(&$dot::<4>(dtype, wrow, a, s));
                }
                for (o, &(a, s)) in rest.iter_mut().zip(&ones) {
                    *o = $dot::<1>(dtype, wrow, a, s)[0];
                }
            }
        }
    };
}

mod portable {
    //! The integer sums of the vector kernels, element by element.

    use super::{ACT_BLOCK, ActScale, Acts, f16_at, q6k_value, scale_min_k4};
    use crate::dtype::DType;

    rows_driver!(dot);

    pub(super) fn rows(dtype: DType, w: &[u8], row: usize, acts: &Acts, out: &mut [f32]) {
        rows_impl(dtype, w, row, acts, out);
    }

    fn isum(w: impl Iterator<Item = i32>, a: &[i8]) -> i32 {
        w.zip(a).map(|(w, &a)| w * i32::from(a)).sum()
    }

    fn dot<const R: usize>(dtype: DType, w: &[u8], a: [&[i8]; R], s: [&[ActScale]; R]) -> [f32; R] {
        let mut out = [0f32; R];
        for r in 0..R {
            let (a, s) = (a[r], s[r]);
            let mut sum = 0f32;
            match dtype {
                DType::Q4_0 | DType::Q4_1 => {
                    let size = if dtype == DType::Q4_0 { 18 } else { 20 };
                    for (b, blk) in w.chunks_exact(size).enumerate() {
                        let qs = &blk[size - 16..];
                        let nibbles = qs
                            .iter()
                            .map(|q| i32::from(q & 0x0F))
                            .chain(qs.iter().map(|q| i32::from(q >> 4)));
                        let x = &a[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
                        let sc = s[b];
                        let total = (sc.lo + sc.hi) as f32;
                        let i = isum(nibbles, x) as f32;
                        sum += if dtype == DType::Q4_0 {
                            f16_at(blk, 0) * sc.d * (i - 8.0 * total)
                        } else {
                            f16_at(blk, 0) * sc.d * i + f16_at(blk, 2) * sc.d * total
                        };
                    }
                }
                DType::Q8_0 => {
                    for (b, blk) in w.chunks_exact(34).enumerate() {
                        let q = blk[2..34].iter().map(|&q| i32::from(q as i8));
                        let x = &a[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
                        sum += f16_at(blk, 0) * s[b].d * isum(q, x) as f32;
                    }
                }
                DType::Q4K => {
                    for (sb, blk) in w.chunks_exact(144).enumerate() {
                        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                        for j in 0..8 {
                            let (scale, min) = scale_min_k4(j, &blk[4..16]);
                            let chunk = &blk[16 + (j / 2) * 32..16 + (j / 2) * 32 + 32];
                            let q = chunk
                                .iter()
                                .map(|&q| i32::from(if j % 2 == 0 { q & 0x0F } else { q >> 4 }));
                            let b = sb * 8 + j;
                            let x = &a[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
                            let sc = s[b];
                            sum += d * f32::from(scale) * sc.d * isum(q, x) as f32
                                - dmin * f32::from(min) * sc.d * (sc.lo + sc.hi) as f32;
                        }
                    }
                }
                DType::Q6K => {
                    for (sb, blk) in w.chunks_exact(210).enumerate() {
                        let d = f16_at(blk, 208);
                        for j in 0..8 {
                            let (half, sub) = (j / 4, j % 4);
                            let sc = &blk[192 + half * 8 + 2 * sub..];
                            let b = sb * 8 + j;
                            let x = &a[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
                            let act = s[b];
                            let q = |range: std::ops::Range<usize>| {
                                range.map(move |l| i32::from(q6k_value(blk, half, sub, l)))
                            };
                            let lo = isum(q(0..16), &x[..16]) - 32 * act.lo;
                            let hi = isum(q(16..32), &x[16..]) - 32 * act.hi;
                            let scaled = i32::from(sc[0] as i8) * lo + i32::from(sc[1] as i8) * hi;
                            sum += d * act.d * scaled as f32;
                        }
                    }
                }
                _ => {}
            }
            out[r] = sum;
        }
        out
    }
}

/// The vector kernels for one x86 feature set: `$features` enabled on
/// every function, `$mul_sum` the u8 × i8 → i32×8 block product.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($name:ident, $features:literal, $mul_sum:path) => {
        mod $name {
            use std::arch::x86_64::*;

            use super::{ACT_BLOCK, ActScale, Acts, scale_min_k4};
            use crate::dtype::DType;

            rows_driver!(dot);

            /// # Safety
            /// The CPU has `$features`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows(
                dtype: DType,
                w: &[u8],
                row: usize,
                acts: &Acts,
                out: &mut [f32],
            ) {
                rows_impl(dtype, w, row, acts, out);
            }

            #[inline(always)]
            fn dot<const R: usize>(
                dtype: DType,
                w: &[u8],
                a: [&[i8]; R],
                s: [&[ActScale]; R],
            ) -> [f32; R] {
                // SAFETY: only reached through `rows`, whose caller
                // promised the features.
                unsafe {
                    match dtype {
                        DType::Q4_0 => dot_q4::<R, true>(w, a, s),
                        DType::Q4_1 => dot_q4::<R, false>(w, a, s),
                        DType::Q8_0 => dot_q8_0(w, a, s),
                        DType::Q4K => dot_q4k(w, a, s),
                        DType::Q6K => dot_q6k(w, a, s),
                        _ => [0.0; R],
                    }
                }
            }

            #[target_feature(enable = $features)]
            fn f16(bits: [u8; 2]) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                    u16::from_le_bytes(bits),
                ))))
            }

            #[target_feature(enable = $features)]
            fn hsum(v: __m256) -> f32 {
                let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                let one = _mm_add_ss(pair, _mm_movehdup_ps(pair));
                _mm_cvtss_f32(one)
            }

            /// The activations of block `b` of `a`.
            ///
            /// # Safety
            /// `a` holds block `b`.
            #[target_feature(enable = $features)]
            unsafe fn act(a: &[i8], b: usize) -> __m256i {
                debug_assert!(a.len() >= (b + 1) * ACT_BLOCK);
                unsafe { _mm256_loadu_si256(a.as_ptr().add(b * ACT_BLOCK).cast()) }
            }

            /// Q4_0 (`SIGNED`: values `q − 8`) or Q4_1 (`q · d + m`).
            ///
            /// # Safety
            /// `w` is whole blocks and each `a`/`s` row has as many.
            #[target_feature(enable = $features)]
            unsafe fn dot_q4<const R: usize, const SIGNED: bool>(
                w: &[u8],
                a: [&[i8]; R],
                s: [&[ActScale]; R],
            ) -> [f32; R] {
                let size = if SIGNED { 18 } else { 20 };
                let mask = _mm_set1_epi8(0x0F);
                let step = |b: usize, blk: &[u8], acc: &mut [__m256; R], extra: &mut [f32; R]| {
                    // d and m in one conversion.
                    // SAFETY: a block starts with its two f16 values.
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
                        blk.as_ptr().cast::<i32>().read_unaligned()
                    }));
                    let d = _mm_cvtss_f32(dm);
                    let m = if SIGNED {
                        -8.0 * d
                    } else {
                        _mm_cvtss_f32(_mm_movehdup_ps(dm))
                    };
                    // SAFETY: 16 bytes of nibbles end the block.
                    let q = unsafe { _mm_loadu_si128(blk.as_ptr().add(size - 16).cast()) };
                    let u = _mm256_set_m128i(
                        _mm_and_si128(_mm_srli_epi16(q, 4), mask),
                        _mm_and_si128(q, mask),
                    );
                    for r in 0..R {
                        // SAFETY: as many activation blocks as weight blocks
                        // (the caller's promise).
                        let (sc, x) = unsafe { (*s[r].get_unchecked(b), act(a[r], b)) };
                        let p = $mul_sum(u, x);
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(d * sc.d),
                            acc[r],
                        );
                        extra[r] += m * sc.sum;
                    }
                };
                // Even and odd blocks accumulate apart, in registers: one
                // chain of dependent FMAs would wait out their latency per
                // block.
                let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                let (mut even_extra, mut odd_extra) = ([0f32; R], [0f32; R]);
                let mut pairs = w.chunks_exact(2 * size);
                let mut b = 0;
                for pair in &mut pairs {
                    let (first, second) = pair.split_at(size);
                    step(b, first, &mut even, &mut even_extra);
                    step(b + 1, second, &mut odd, &mut odd_extra);
                    b += 2;
                }
                if let Some(last) = pairs.remainder().get(..size) {
                    step(b, last, &mut even, &mut even_extra);
                }
                std::array::from_fn(|r| {
                    hsum(_mm256_add_ps(even[r], odd[r])) + even_extra[r] + odd_extra[r]
                })
            }

            /// # Safety
            /// As [`dot_q4`].
            #[target_feature(enable = $features)]
            unsafe fn dot_q8_0<const R: usize>(
                w: &[u8],
                a: [&[i8]; R],
                s: [&[ActScale]; R],
            ) -> [f32; R] {
                let step = |b: usize, blk: &[u8], acc: &mut [__m256; R]| {
                    let d = f16([blk[0], blk[1]]);
                    // SAFETY: 32 values follow the scale.
                    let q = unsafe { _mm256_loadu_si256(blk.as_ptr().add(2).cast()) };
                    // |q| as unsigned, and the sign moved onto the activations.
                    let u = _mm256_sign_epi8(q, q);
                    for r in 0..R {
                        // SAFETY: as many activation blocks as weight blocks.
                        let (sc, x) = unsafe { (*s[r].get_unchecked(b), act(a[r], b)) };
                        let p = $mul_sum(u, _mm256_sign_epi8(x, q));
                        let scale = _mm256_set1_ps(d * sc.d);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
                    }
                };
                // Even and odd blocks accumulate apart (see `dot_q4`).
                let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                let mut pairs = w.chunks_exact(68);
                let mut b = 0;
                for pair in &mut pairs {
                    let (first, second) = pair.split_at(34);
                    step(b, first, &mut even);
                    step(b + 1, second, &mut odd);
                    b += 2;
                }
                if let Some(last) = pairs.remainder().get(..34) {
                    step(b, last, &mut even);
                }
                std::array::from_fn(|r| hsum(_mm256_add_ps(even[r], odd[r])))
            }

            /// # Safety
            /// As [`dot_q4`].
            #[target_feature(enable = $features)]
            unsafe fn dot_q4k<const R: usize>(
                w: &[u8],
                a: [&[i8]; R],
                s: [&[ActScale]; R],
            ) -> [f32; R] {
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut extra = [0f32; R];
                for (sb, blk) in w.chunks_exact(144).enumerate() {
                    let (d, dmin) = (f16([blk[0], blk[1]]), f16([blk[2], blk[3]]));
                    for chunk in 0..4 {
                        // SAFETY: 128 bytes of nibbles follow the 16-byte head.
                        let q =
                            unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + chunk * 32).cast()) };
                        let halves = [
                            _mm256_and_si256(q, mask),
                            _mm256_and_si256(_mm256_srli_epi16(q, 4), mask),
                        ];
                        for (i, u) in halves.into_iter().enumerate() {
                            let j = 2 * chunk + i;
                            let (scale, min) = scale_min_k4(j, &blk[4..16]);
                            let (ds, dm) = (d * f32::from(scale), dmin * f32::from(min));
                            let b = sb * 8 + j;
                            for r in 0..R {
                                let sc = s[r][b];
                                // SAFETY: as above.
                                let x = unsafe { act(a[r], b) };
                                let p = $mul_sum(u, x);
                                acc[r] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(p),
                                    _mm256_set1_ps(ds * sc.d),
                                    acc[r],
                                );
                                extra[r] -= dm * sc.sum;
                            }
                        }
                    }
                }
                std::array::from_fn(|r| hsum(acc[r]) + extra[r])
            }

            /// # Safety
            /// As [`dot_q4`].
            #[target_feature(enable = $features)]
            unsafe fn dot_q6k<const R: usize>(
                w: &[u8],
                a: [&[i8]; R],
                s: [&[ActScale]; R],
            ) -> [f32; R] {
                let low4 = _mm256_set1_epi8(0x0F);
                let low2 = _mm256_set1_epi8(0x03);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut extra = [0f32; R];
                for (sb, blk) in w.chunks_exact(210).enumerate() {
                    let d = f16([blk[208], blk[209]]);
                    for half in 0..2 {
                        let p = blk.as_ptr();
                        // SAFETY: ql is bytes 0..128 and qh 128..192.
                        let (ql0, ql1, qh) = unsafe {
                            (
                                _mm256_loadu_si256(p.add(half * 64).cast()),
                                _mm256_loadu_si256(p.add(half * 64 + 32).cast()),
                                _mm256_loadu_si256(p.add(128 + half * 32).cast()),
                            )
                        };
                        let high = |shift: __m128i| {
                            _mm256_slli_epi16(
                                _mm256_and_si256(_mm256_srl_epi16(qh, shift), low2),
                                4,
                            )
                        };
                        let values = [
                            _mm256_or_si256(
                                _mm256_and_si256(ql0, low4),
                                high(_mm_cvtsi32_si128(0)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(ql1, low4),
                                high(_mm_cvtsi32_si128(2)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                high(_mm_cvtsi32_si128(4)),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                                high(_mm_cvtsi32_si128(6)),
                            ),
                        ];
                        let sc = &blk[192 + half * 8..200 + half * 8];
                        for (sub, u) in values.into_iter().enumerate() {
                            let (s0, s1) = (
                                f32::from(sc[2 * sub] as i8),
                                f32::from(sc[2 * sub + 1] as i8),
                            );
                            let scales = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1);
                            let b = sb * 8 + half * 4 + sub;
                            for r in 0..R {
                                let sa = s[r][b];
                                // SAFETY: as above.
                                let x = unsafe { act(a[r], b) };
                                let p = _mm256_cvtepi32_ps($mul_sum(u, x));
                                let dd = d * sa.d;
                                acc[r] = _mm256_fmadd_ps(
                                    _mm256_mul_ps(p, scales),
                                    _mm256_set1_ps(dd),
                                    acc[r],
                                );
                                extra[r] -= 32.0 * dd * (s0 * sa.lo as f32 + s1 * sa.hi as f32);
                            }
                        }
                    }
                }
                std::array::from_fn(|r| hsum(acc[r]) + extra[r])
            }
        }
    };
}

/// `Σ u·s` over each group of four bytes, with AVX2: pairs summed to i16
/// (no saturation: `u ≤ 128` and `|s| ≤ 127`), then to i32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn mul_sum_avx2(
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// The same in one instruction (AVX-512 VNNI on 256-bit vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
#[inline]
fn mul_sum_vnni(
    u: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

#[cfg(target_arch = "x86_64")]
x86_kernels!(avx2, "avx2,fma,f16c", super::mul_sum_avx2);
#[cfg(target_arch = "x86_64")]
x86_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512vnni,avx512vl",
    super::mul_sum_vnni
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random blocks of `kind`, with finite f16 scales of a sane size.
    fn blocks(kind: GgmlType, count: usize, seed: u64) -> Vec<u8> {
        let (_, size) = kind.block();
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let mut out = vec![0u8; count * size];
        for block in out.chunks_exact_mut(size) {
            for byte in block.iter_mut() {
                *byte = next();
            }
            let scale = |v: f32| half::f16::from_f32(v).to_le_bytes();
            let small = |n: u8| f32::from(n) / 2550.0 + 0.001;
            match kind {
                GgmlType::Q4_0 | GgmlType::Q8_0 => {
                    block[..2].copy_from_slice(&scale(small(next())));
                }
                GgmlType::Q4_1 => {
                    block[..2].copy_from_slice(&scale(small(next())));
                    block[2..4].copy_from_slice(&scale(-small(next()) * 4.0));
                }
                GgmlType::Q4K => {
                    block[..2].copy_from_slice(&scale(small(next()) / 10.0));
                    block[2..4].copy_from_slice(&scale(small(next()) / 10.0));
                }
                GgmlType::Q6K => {
                    block[208..210].copy_from_slice(&scale(small(next()) / 10.0));
                }
                _ => unreachable!(),
            }
        }
        out
    }

    const KINDS: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    /// f32 reference: dequantized weights times unquantized activations,
    /// and for each output the most that 8-bit activations can move it: each
    /// activation is off by at most half its block's step (`max|x| / 254`),
    /// times the weight it meets, plus f32 rounding.
    fn reference(
        kind: GgmlType,
        w: &[u8],
        n: usize,
        k: usize,
        x: &[f32],
        t: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut wf = vec![0f32; n * k];
        dequantize_into(kind, w, &mut wf);
        let steps: Vec<f32> = x
            .chunks_exact(ACT_BLOCK)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) / 254.0)
            .collect();
        let mut out = vec![0f32; t * n];
        let mut bound = vec![0f32; t * n];
        for r in 0..t {
            for j in 0..n {
                let (mut sum, mut err, mut size) = (0f64, 0f64, 0f64);
                for i in 0..k {
                    let (a, b) = (f64::from(x[r * k + i]), f64::from(wf[j * k + i]));
                    sum += a * b;
                    size += (a * b).abs();
                    err += b.abs() * f64::from(steps[(r * k + i) / ACT_BLOCK]);
                }
                out[r * n + j] = sum as f32;
                bound[r * n + j] = (err * 1.001 + size * 1e-5 + 1e-6) as f32;
            }
        }
        (out, bound)
    }

    fn check(kind: GgmlType, n: usize, k: usize, t: usize, seed: u64) {
        let dtype = kind.quantized_dtype().unwrap();
        let (elems, _) = kind.block();
        let w = blocks(kind, n * k / elems, seed);
        let x: Vec<f32> = (0..t * k)
            .map(|i| ((i as f32 * 0.37 + seed as f32).sin()) * 2.0)
            .collect();
        let (expected, bound) = reference(kind, &w, n, k, &x, t);
        let mut portable: Option<Vec<f32>> = None;
        for kernels in Kernels::available() {
            let mut out = vec![f32::NAN; t * n];
            let weights = Weights {
                dtype,
                blocks: &w,
                n,
                k,
            };
            linear(kernels, &[weights], &x, t, &mut out).unwrap();
            for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    (got - want).abs() <= bound[i],
                    "{kind:?} {kernels:?} n={n} k={k} t={t} [{i}]: {got} vs {want} (bound {})",
                    bound[i]
                );
            }
            // Every kernel computes the same integer sums: they agree with
            // each other far more closely than with the f32 reference.
            match &portable {
                None => portable = Some(out),
                Some(p) => {
                    for (i, (got, want)) in out.iter().zip(p).enumerate() {
                        assert!(
                            (got - want).abs() <= bound[i] * 0.01,
                            "{kind:?} {kernels:?} vs portable [{i}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_format_and_kernel_matches_the_f32_reference() {
        for kind in KINDS {
            let (elems, _) = kind.block();
            let k = elems.max(64) * 2;
            // 1 row (decoding), 4+3 rows (the grouped and the rest), and
            // more weight rows than one chunk.
            for (n, t) in [(1, 1), (37, 1), (70, 7), (300, 2)] {
                check(kind, n, k, t, n as u64 * 31 + t as u64);
            }
        }
    }

    #[test]
    fn several_matrices_side_by_side_equal_each_alone() {
        for kind in KINDS {
            let dtype = kind.quantized_dtype().unwrap();
            let (elems, _) = kind.block();
            let k = elems.max(64);
            let shapes = [37, 5, 300];
            let blocks: Vec<Vec<u8>> = shapes
                .iter()
                .map(|&n| blocks(kind, n * k / elems, n as u64))
                .collect();
            let weights: Vec<Weights<'_>> = shapes
                .iter()
                .zip(&blocks)
                .map(|(&n, b)| Weights {
                    dtype,
                    blocks: b,
                    n,
                    k,
                })
                .collect();
            let total: usize = shapes.iter().sum();
            for t in [1, 6] {
                let x: Vec<f32> = (0..t * k).map(|i| (i as f32 * 0.21).cos()).collect();
                let kernels = Kernels::best();
                let mut together = vec![f32::NAN; t * total];
                linear(kernels, &weights, &x, t, &mut together).unwrap();
                let mut column = 0;
                for w in &weights {
                    let mut alone = vec![f32::NAN; t * w.n];
                    linear(kernels, &[*w], &x, t, &mut alone).unwrap();
                    for r in 0..t {
                        assert_eq!(
                            together[r * total + column..r * total + column + w.n],
                            alone[r * w.n..(r + 1) * w.n],
                            "{kind:?} t={t} matrix of {} rows",
                            w.n
                        );
                    }
                    column += w.n;
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_shape_matches(kind in 0usize..5, n in 1usize..40, blocks in 1usize..4, t in 1usize..9, seed in 0u64..1000) {
            let kind = KINDS[kind];
            let (elems, _) = kind.block();
            check(kind, n, elems.max(ACT_BLOCK) * blocks, t, seed);
        }
    }

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.25).collect();
        let acts = Acts::quantize(Kernels::Portable, &x, 1, 64);
        for kernels in Kernels::available() {
            let other = Acts::quantize(kernels, &x, 1, 64);
            assert_eq!(other.qs, acts.qs, "{kernels:?}");
        }
        for (b, values) in x.chunks_exact(32).enumerate() {
            let sc = acts.scales[b];
            let mut lo = 0;
            for (i, v) in values.iter().enumerate() {
                let q = acts.qs[b * 32 + i];
                assert!((f32::from(q) * sc.d - v).abs() <= sc.d / 2.0 + 1e-6);
                if i < 16 {
                    lo += i32::from(q);
                }
            }
            assert_eq!(sc.lo, lo);
        }
    }

    #[test]
    fn short_buffers_and_partial_blocks_are_refused() {
        let mut out = [0f32; 2];
        let weights = Weights {
            dtype: DType::Q4_0,
            blocks: &[0; 17],
            n: 1,
            k: 32,
        };
        let err = linear(Kernels::Portable, &[weights], &[0.0; 32], 1, &mut out).unwrap_err();
        assert!(err.to_string().contains("short"), "{err}");
        let err = row_bytes(DType::Q4K, 300).unwrap_err();
        assert!(err.to_string().contains("multiple"), "{err}");
        assert!(row_bytes(DType::F32, 32).is_err());
    }
}
