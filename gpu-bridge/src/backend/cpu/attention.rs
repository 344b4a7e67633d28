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

/// The shape of a [`causal`] attention.
#[derive(Clone, Copy)]
pub(super) struct Causal {
    /// Query heads.
    pub(super) heads: usize,
    /// Key/value heads; `heads` is a multiple of it.
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// New positions (query rows).
    pub(super) t: usize,
}

/// Below this many multiply-adds a causal attention runs on one thread:
/// one decoded token of a small model (9 heads over 100 positions) is a
/// few microseconds, less than waking the pool.
const CAUSAL_PARALLEL_THRESHOLD: usize = 1 << 17;

/// Causal grouped-query attention for [`crate::Op::CausalAttention`]:
/// `q` is `[heads, t, head_dim]` (scaled), `pages` the keys and values of
/// every position so far, each `[kv_heads, len, head_dim]`, in order. Query
/// `i` is at position `total − t + i` and sees keys up to it. Writes
/// `[t, heads × head_dim]`.
pub(super) fn causal(
    shape: Causal,
    q: &[f32],
    pages: &[(&[f32], &[f32])],
    lengths: &[usize],
    out: &mut [f32],
) -> Result<()> {
    let Causal {
        heads,
        kv_heads,
        head_dim,
        t,
    } = shape;
    let total: usize = lengths.iter().sum();
    let hidden = heads * head_dim;
    let short = pages.iter().zip(lengths).any(|((k, v), &len)| {
        let size = kv_heads * len * head_dim;
        k.len() < size || v.len() < size
    });
    if kv_heads == 0
        || head_dim == 0
        || pages.len() != lengths.len()
        || !heads.is_multiple_of(kv_heads)
        || total < t
        || q.len() < heads * t * head_dim
        || out.len() < t * hidden
        || short
    {
        return Err(BridgeError::backend(
            "causal attention: buffers smaller than the shapes",
        ));
    }
    let work = (heads * t * head_dim).saturating_mul(total);
    // One task per (query row, head): its output slice is its own.
    let run = |(index, output): (usize, &mut [f32])| {
        let (row, head) = (index / heads, index % heads);
        let query = Query {
            head_dim,
            q: &q[(head * t + row) * head_dim..][..head_dim],
            kv: head / (heads / kv_heads),
            pages,
            lengths,
            seen: total - t + row + 1,
        };
        query.attend(output);
    };
    let out = &mut out[..t * hidden];
    if work >= CAUSAL_PARALLEL_THRESHOLD {
        out.par_chunks_mut(head_dim).enumerate().for_each(run);
    } else {
        out.chunks_mut(head_dim).enumerate().for_each(run);
    }
    Ok(())
}

/// One query head of a [`causal`] attention.
struct Query<'a> {
    head_dim: usize,
    /// The query, `head_dim` values.
    q: &'a [f32],
    /// The kv head it reads.
    kv: usize,
    pages: &'a [(&'a [f32], &'a [f32])],
    lengths: &'a [usize],
    /// Positions it sees: the first `seen` of all pages.
    seen: usize,
}

impl Query<'_> {
    /// Writes the attention output, `head_dim` values.
    fn attend(&self, output: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature the function
            // enables.
            unsafe { self.attend_avx512(output) };
            return;
        }
        self.attend_portable(output);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn attend_avx512(&self, output: &mut [f32]) {
        self.attend_portable(output);
    }

    /// The key and value rows of its kv head, position by position.
    fn rows(&self) -> impl Iterator<Item = (&[f32], &[f32])> {
        let (head_dim, kv) = (self.head_dim, self.kv);
        self.pages
            .iter()
            .zip(self.lengths)
            .flat_map(move |(&(keys, values), &len)| {
                let at = kv * len * head_dim;
                keys[at..at + len * head_dim]
                    .chunks_exact(head_dim)
                    .zip(values[at..at + len * head_dim].chunks_exact(head_dim))
            })
            .take(self.seen)
    }

    #[inline(always)]
    fn attend_portable(&self, output: &mut [f32]) {
        let mut scores = Vec::with_capacity(self.seen);
        let mut max = f32::NEG_INFINITY;
        for (key, _) in self.rows() {
            let score = dot(self.q, key);
            max = max.max(score);
            scores.push(score);
        }
        for score in scores.iter_mut() {
            *score = exp_vectorisable(*score - max);
        }
        // In f64, as the softmax kernel sums.
        let sum: f64 = scores.iter().map(|&e| f64::from(e)).sum();
        let inv = (1.0 / sum) as f32;
        output.fill(0.0);
        for ((_, value), &score) in self.rows().zip(&scores) {
            let weight = score * inv;
            for (o, &v) in output.iter_mut().zip(value) {
                *o += weight * v;
            }
        }
    }
}
