//! Softmax attention within packed sequences ([`crate::Op::Attention`]) in
//! one pass over the fused query/key/value rows.
//!
//! Composed from plain ops, a BERT layer's attention over a batch pads the
//! packed tokens, permutes the heads apart, slices out queries, keys and
//! values, transposes the keys, multiplies, masks, takes the softmax,
//! multiplies again, permutes back and unpads: a dozen passes over memory,
//! together as long as the layer's four weight products for a batch of 32
//! sentences. Here each sequence reads its own rows once and writes its
//! output rows once, with no padding at all.

use rayon::prelude::*;

use super::exp_vectorisable;
use crate::error::{BridgeError, Result};

/// Lanes of the vectorised loops: one AVX-512 register of f32.
const LANES: usize = 16;

/// Writes `[tokens, heads × head_dim]` attention outputs for the packed
/// `[tokens, 3 × heads × head_dim]` queries, keys and values in `qkv`.
pub(super) fn attention(
    heads: usize,
    head_dim: usize,
    lengths: &[usize],
    qkv: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let hidden = heads * head_dim;
    let tokens: usize = lengths.iter().sum();
    if qkv.len() < tokens * 3 * hidden || out.len() < tokens * hidden {
        return Err(BridgeError::backend(
            "attention: buffers smaller than the sequences",
        ));
    }
    // Each sequence owns a run of output rows.
    let mut sequences = Vec::with_capacity(lengths.len());
    let (mut rest, mut start) = (&mut out[..tokens * hidden], 0);
    for &len in lengths {
        let (rows, tail) = rest.split_at_mut(len * hidden);
        sequences.push((start, len, rows));
        rest = tail;
        start += len;
    }
    let shape = Shape { heads, head_dim };
    sequences
        .into_par_iter()
        .for_each(|(start, len, rows)| sequence(shape, &qkv[start * 3 * hidden..], len, rows));
    Ok(())
}

#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    head_dim: usize,
}

/// One sequence, compiled for AVX-512 where the CPU has it.
fn sequence(shape: Shape, qkv: &[f32], len: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, the only feature the function
        // enables.
        unsafe { sequence_avx512(shape, qkv, len, out) };
        return;
    }
    sequence_portable(shape, qkv, len, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sequence_avx512(shape: Shape, qkv: &[f32], len: usize, out: &mut [f32]) {
    sequence_portable(shape, qkv, len, out);
}

#[inline(always)]
fn sequence_portable(shape: Shape, qkv: &[f32], len: usize, out: &mut [f32]) {
    let Shape { heads, head_dim } = shape;
    let hidden = heads * head_dim;
    let stride = 3 * hidden;
    // Whole registers of scores: the padding lanes hold -inf, whose
    // exponential (clamped to about 1e-38) stays out of the sum.
    let mut scores = vec![f32::NEG_INFINITY; len.next_multiple_of(LANES)];
    for head in 0..heads {
        let (queries, keys, values) = (
            head * head_dim,
            hidden + head * head_dim,
            2 * hidden + head * head_dim,
        );
        for query_row in 0..len {
            let query = &qkv[query_row * stride + queries..][..head_dim];
            let mut max = f32::NEG_INFINITY;
            for (key_row, score) in scores[..len].iter_mut().enumerate() {
                *score = dot(query, &qkv[key_row * stride + keys..][..head_dim]);
                max = max.max(*score);
            }
            for score in scores.iter_mut() {
                *score = exp_vectorisable(*score - max);
            }
            // In f64, as the softmax kernel sums.
            let sum: f64 = scores[..len].iter().map(|&e| f64::from(e)).sum();
            let inv = (1.0 / sum) as f32;
            let output = &mut out[query_row * hidden + head * head_dim..][..head_dim];
            output.fill(0.0);
            for (value_row, &score) in scores[..len].iter().enumerate() {
                let weight = score * inv;
                let value = &qkv[value_row * stride + values..][..head_dim];
                for (o, &v) in output.iter_mut().zip(value) {
                    *o += weight * v;
                }
            }
        }
    }
}

/// A dot product in `LANES` partial sums added pairwise, so it vectorises
/// (a single running sum is a chain of dependent adds).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for lane in 0..width {
            lanes[lane] += lanes[lane + width];
        }
    }
    lanes[0] + tail
}
