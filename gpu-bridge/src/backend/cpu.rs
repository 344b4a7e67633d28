//! The CPU backend: always compiled, multi-threaded, and the semantic
//! reference the other backends are tested against.
//!
//! Matrix products go through the `gemm` crate (the kernels candle uses),
//! except those of a few rows, which have their own kernel (`skinny`), and
//! linear layers over quantized (`quant`) or 16-bit weights with f32 inputs
//! (`half_linear`), which read the weights as they are stored;
//! elementwise work and row-wise reductions fan out over rayon once they are
//! big enough to pay for it. `f16`/`bf16` arithmetic widens to `f32`, computes,
//! and rounds back, which is how mixed-precision CPU kernels usually do it.

use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::backend::{Backend, BackendKind, DeviceDescription};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::kernel::{BinaryOp, Kernel, ReduceOp, UnaryOp};
use crate::quant;

mod attention;
mod half_linear;
mod recycler;
#[cfg(target_arch = "x86_64")]
mod skinny;

use recycler::Recycler;

/// Below this many elements a kernel runs on the worker thread alone: the
/// cost of waking rayon's pool is larger than the work.
const PARALLEL_THRESHOLD: usize = 1 << 15;

/// Below this many multiply-adds a matrix product runs single-threaded.
const GEMM_PARALLEL_THRESHOLD: usize = 1 << 18;

/// Below this many rows a parallel matrix product gives each rayon thread a
/// block of columns rather than leaving the split to gemm. A few rows times
/// a weight matrix (one sentence through a layer) was a quarter to a third
/// slower with gemm's own threading (8 rows: 5.7 vs 4.1 ms for MiniLM's 24
/// products on two threads; 64 rows: 16 vs 12 ms); from about 128 rows the
/// two are even.
const SPLIT_COLUMNS_BELOW_ROWS: usize = 128;

/// Up to this many rows a matrix product goes through `skinny` where the
/// CPU has AVX-512. Against `gemm`'s AVX-512 kernels on 384×1536 weights,
/// cycling through a model's worth of them: 2.6× faster at 1 row, even at 8
/// and 32, slower from 64 (450 vs 345 µs); one sentence through MiniLM (8
/// rows, 42 MB of weights) takes 3.65 instead of 4.7 ms.
#[cfg(target_arch = "x86_64")]
const SKINNY_MAX_ROWS: usize = 32;

/// A CPU "device buffer": 32-bit words so that `f32`/`i32`/`u32` views are
/// always aligned.
#[derive(Debug)]
pub struct CpuBuffer {
    words: Vec<u32>,
    /// Where the words go back when the buffer is dropped; `None` for
    /// scratch buffers that never came from one.
    recycler: Option<Arc<Recycler>>,
}

impl Drop for CpuBuffer {
    fn drop(&mut self) {
        if let Some(recycler) = &self.recycler {
            recycler.give(std::mem::take(&mut self.words));
        }
    }
}

impl CpuBuffer {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.words)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.words)
    }

    fn f32s(&self) -> &[f32] {
        bytemuck::cast_slice(&self.words)
    }

    fn f32s_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.words)
    }
}

/// The CPU backend. `memory_bytes` is a budget the host sets, not a
/// hardware figure: the bridge refuses allocations past it.
///
/// Each backend has its own rayon pool, of [`default_threads`] threads
/// unless built with [`CpuBackend::with_threads`]; a device started on it
/// runs its worker loop on one of them (see [`Backend::worker_pool`]).
/// Kernels run directly through [`Backend::run`] fan out over whatever pool
/// the calling thread is in, rayon's global one outside any.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    memory_bytes: u64,
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    recycler: Arc<Recycler>,
}

/// The most freed buffer memory a backend keeps for reuse: a quarter of its
/// budget, and never more than this.
const MAX_RECYCLED_BYTES: u64 = 256 << 20;

/// The threads a CPU backend's pool gets by default: `RAYON_NUM_THREADS`
/// when the operator set it, else one fewer than the logical CPUs (at least
/// one). A pool of every core left the host's own threads (the HTTP
/// executor, Wasmtime's epoch ticker, guests computing on the CPU) to
/// compete with a busy device for every core; a core kept back answers
/// requests while a tenant's kernels run.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    threads_for(std::env::var("RAYON_NUM_THREADS").ok().as_deref(), cores)
}

/// [`default_threads`] given the environment variable and the core count.
fn threads_for(rayon_num_threads: Option<&str>, cores: usize) -> usize {
    match rayon_num_threads.and_then(|v| v.trim().parse::<usize>().ok()) {
        // Zero is rayon's "choose for me": do as without it.
        Some(threads) if threads > 0 => threads,
        _ => cores.saturating_sub(1).max(1),
    }
}

impl CpuBackend {
    /// A CPU device that may hold up to `memory_bytes` of tensors, on a pool
    /// of [`default_threads`] threads.
    pub fn new(memory_bytes: u64) -> Self {
        Self::with_threads(memory_bytes, default_threads())
    }

    /// A CPU device that may hold up to `memory_bytes` of tensors, on a pool
    /// of `threads` threads (at least one; the device's worker loop is one
    /// of them).
    pub fn with_threads(memory_bytes: u64, threads: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|index| format!("gust-cpu-{index}"))
            // A job that panics must not abort the host (rayon's default);
            // the device's callers see their jobs' senders dropped instead.
            .panic_handler(|_| tracing::error!("a cpu device thread panicked"))
            .build()
            .map_err(|e| tracing::warn!("no cpu thread pool, using rayon's global one: {e}"))
            .ok()
            .map(Arc::new);
        let threads = pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |pool| {
                pool.current_num_threads()
            });
        let recycled = (memory_bytes / 4).min(MAX_RECYCLED_BYTES);
        Self {
            memory_bytes,
            threads,
            pool,
            recycler: Arc::new(Recycler::new(usize::try_from(recycled).unwrap_or(0))),
        }
    }
}

fn words_for(bytes: usize) -> usize {
    bytes.div_ceil(4).max(1)
}

fn try_zeroed_words(count: usize) -> Result<Vec<u32>> {
    let mut words = Vec::new();
    words
        .try_reserve_exact(count)
        .map_err(|_| out_of_host_memory(count))?;
    words.resize(count, 0);
    Ok(words)
}

fn out_of_host_memory(words: usize) -> BridgeError {
    BridgeError::new(
        ErrorCode::OutOfMemory,
        format!("cannot allocate {} bytes of host memory", words * 4),
    )
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

    fn describe(&self) -> DeviceDescription {
        DeviceDescription {
            kind: BackendKind::Cpu,
            name: format!("cpu ({} threads)", self.threads),
            is_gpu: false,
            memory_bytes: self.memory_bytes,
            arithmetic_dtypes: vec![
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::Q4_0,
                DType::Q4_1,
                DType::Q8_0,
                DType::Q4K,
                DType::Q6K,
            ],
            fused_attention: true,
            linear: true,
        }
    }

    fn alloc(&mut self, bytes: usize) -> Result<CpuBuffer> {
        let words = words_for(bytes);
        Ok(CpuBuffer {
            words: self
                .recycler
                .take(words)
                .ok_or_else(|| out_of_host_memory(words))?,
            recycler: Some(Arc::clone(&self.recycler)),
        })
    }

    fn upload(&mut self, data: &[u8]) -> Result<CpuBuffer> {
        let words = words_for(data.len());
        // Every byte is written below, so a recycled buffer need not be
        // zeroed first: uploads cost what they did.
        let mut buffer = CpuBuffer {
            words: self
                .recycler
                .take_for_overwrite(words)
                .ok_or_else(|| out_of_host_memory(words))?,
            recycler: Some(Arc::clone(&self.recycler)),
        };
        let (head, tail) = buffer.bytes_mut().split_at_mut(data.len());
        head.copy_from_slice(data);
        // The padding to a whole word: an earlier owner's bytes otherwise.
        tail.fill(0);
        Ok(buffer)
    }

    fn download(&mut self, buffer: &CpuBuffer, bytes: usize) -> Result<Vec<u8>> {
        buffer
            .bytes()
            .get(..bytes)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| BridgeError::invalid(format!("buffer holds fewer than {bytes} bytes")))
    }

    fn run(
        &mut self,
        kernel: &Kernel,
        inputs: &[&CpuBuffer],
        output: &mut CpuBuffer,
    ) -> Result<()> {
        run_kernel(kernel, inputs, output)
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    fn worker_pool(&self) -> Option<Arc<rayon::ThreadPool>> {
        self.pool.clone()
    }
}

fn run_kernel(kernel: &Kernel, inputs: &[&CpuBuffer], output: &mut CpuBuffer) -> Result<()> {
    if let Kernel::Linear {
        input: DType::F32, ..
    } = kernel
    {
        // f32 inputs: quantized or half-precision weights are read as they
        // are, never widened as a whole.
        return run_native(kernel, inputs, output);
    }
    match kernel.compute_dtype() {
        Some(DType::F32) | None => run_native(kernel, inputs, output),
        // Quantized weights: the kernels read their blocks as they are.
        Some(quantized) if quantized.is_quantized() => run_native(kernel, inputs, output),
        Some(half @ (DType::F16 | DType::BF16)) => run_widened(kernel, half, inputs, output),
        Some(other) => Err(BridgeError::shape(format!(
            "{} needs a float dtype, not {other}",
            kernel.name()
        ))),
    }
}

/// Run a half-precision kernel by widening every operand to `f32`.
fn run_widened(
    kernel: &Kernel,
    half: DType,
    inputs: &[&CpuBuffer],
    output: &mut CpuBuffer,
) -> Result<()> {
    let widened: Vec<CpuBuffer> = inputs
        .iter()
        .map(|input| {
            let halves: &[u16] = bytemuck::cast_slice(&input.words);
            let words = halves
                .iter()
                .map(|&bits| half_to_f32(half, bits).to_bits())
                .collect();
            CpuBuffer {
                words,
                recycler: None,
            }
        })
        .collect();
    let widened_refs: Vec<&CpuBuffer> = widened.iter().collect();
    let f32_kernel = with_dtype(kernel, DType::F32);
    let out_elems = output.words.len() * 2;
    let mut wide_out = CpuBuffer {
        words: try_zeroed_words(out_elems)?,
        recycler: None,
    };
    run_native(&f32_kernel, &widened_refs, &mut wide_out)?;
    if matches!(
        kernel,
        Kernel::Reduce {
            op: ReduceOp::ArgMax,
            ..
        }
    ) {
        // Indices stay u32: copy the words that fit.
        let n = output.words.len().min(wide_out.words.len());
        output.words[..n].copy_from_slice(&wide_out.words[..n]);
        return Ok(());
    }
    let out: &mut [u16] = bytemuck::cast_slice_mut(&mut output.words);
    for (dst, &src) in out.iter_mut().zip(wide_out.f32s()) {
        *dst = f32_to_half(half, src);
    }
    Ok(())
}

fn with_dtype(kernel: &Kernel, to: DType) -> Kernel {
    let mut kernel = kernel.clone();
    match &mut kernel {
        Kernel::Unary { dtype, .. }
        | Kernel::Affine { dtype, .. }
        | Kernel::Binary { dtype, .. }
        | Kernel::Matmul { dtype, .. }
        | Kernel::Reduce { dtype, .. }
        | Kernel::Softmax { dtype, .. }
        | Kernel::LayerNorm { dtype, .. }
        | Kernel::RmsNorm { dtype, .. }
        | Kernel::Attention { dtype, .. }
        | Kernel::CausalAttention { dtype, .. }
        | Kernel::Linear { dtype, .. }
        | Kernel::SwiGlu { dtype, .. } => *dtype = to,
        _ => {}
    }
    kernel
}

fn half_to_f32(half: DType, bits: u16) -> f32 {
    if half == DType::F16 {
        f16::from_bits(bits).to_f32()
    } else {
        bf16::from_bits(bits).to_f32()
    }
}

fn f32_to_half(half: DType, value: f32) -> u16 {
    if half == DType::F16 {
        f16::from_f32(value).to_bits()
    } else {
        bf16::from_f32(value).to_bits()
    }
}

fn input<'a>(inputs: &[&'a CpuBuffer], index: usize, kernel: &Kernel) -> Result<&'a CpuBuffer> {
    inputs
        .get(index)
        .copied()
        .ok_or_else(|| BridgeError::backend(format!("{} is missing input {index}", kernel.name())))
}

fn run_native(kernel: &Kernel, inputs: &[&CpuBuffer], output: &mut CpuBuffer) -> Result<()> {
    match kernel {
        Kernel::Unary { op, len, .. } => {
            let x = &input(inputs, 0, kernel)?.f32s()[..*len];
            let out = &mut output.f32s_mut()[..*len];
            // One monomorphised loop per op: through a function pointer the
            // call per element costs more than the arithmetic and nothing
            // vectorises.
            match op {
                UnaryOp::Relu => map_into(out, x, |v| v.max(0.0)),
                UnaryOp::Gelu => map_into(out, x, gelu),
                UnaryOp::Silu => map_into(out, x, |v| v / (1.0 + (-v).exp())),
                UnaryOp::Tanh => map_into(out, x, f32::tanh),
                UnaryOp::Exp => map_into(out, x, f32::exp),
            }
        }
        Kernel::Affine {
            len, scale, offset, ..
        } => {
            let x = &input(inputs, 0, kernel)?.f32s()[..*len];
            let out = &mut output.f32s_mut()[..*len];
            let (scale, offset) = (*scale, *offset);
            map_into(out, x, move |v| v.mul_add(scale, offset));
        }
        Kernel::Binary {
            op,
            out_shape,
            lhs_strides,
            rhs_strides,
            ..
        } => {
            let lhs = input(inputs, 0, kernel)?.f32s();
            let rhs = input(inputs, 1, kernel)?.f32s();
            binary(
                *op,
                out_shape,
                lhs_strides,
                rhs_strides,
                lhs,
                rhs,
                output.f32s_mut(),
            );
        }
        Kernel::Matmul {
            m,
            k,
            n,
            lhs_offsets,
            rhs_offsets,
            ..
        } => {
            let lhs = input(inputs, 0, kernel)?.f32s();
            let rhs = input(inputs, 1, kernel)?.f32s();
            matmul(
                *m,
                *k,
                *n,
                lhs_offsets,
                rhs_offsets,
                lhs,
                rhs,
                output.f32s_mut(),
            )?;
        }
        Kernel::Reduce {
            op,
            outer,
            len,
            inner,
            ..
        } => {
            let x = input(inputs, 0, kernel)?.f32s();
            reduce(*op, *outer, *len, *inner, x, output);
        }
        Kernel::Softmax {
            outer, len, inner, ..
        } => {
            let x = input(inputs, 0, kernel)?.f32s();
            softmax(*outer, *len, *inner, x, output.f32s_mut());
        }
        Kernel::Attention {
            heads,
            head_dim,
            lengths,
            ..
        } => {
            let qkv = input(inputs, 0, kernel)?.f32s();
            attention::attention(*heads, *head_dim, lengths, qkv, output.f32s_mut())?;
        }
        Kernel::CausalAttention {
            heads,
            kv_heads,
            head_dim,
            t,
            lengths,
            ..
        } => {
            let q = input(inputs, 0, kernel)?.f32s();
            let pages = (0..lengths.len())
                .map(|i| {
                    let k = input(inputs, 1 + i, kernel)?.f32s();
                    let v = input(inputs, 1 + lengths.len() + i, kernel)?.f32s();
                    Ok((k, v))
                })
                .collect::<Result<Vec<_>>>()?;
            let shape = attention::Causal {
                heads: *heads,
                kv_heads: *kv_heads,
                head_dim: *head_dim,
                t: *t,
            };
            attention::causal(shape, q, &pages, lengths, output.f32s_mut())?;
        }
        Kernel::LayerNorm {
            rows,
            cols,
            eps,
            weight,
            bias,
            ..
        } => {
            let x = input(inputs, 0, kernel)?.f32s();
            let mut next = 1;
            let weight = if *weight {
                next += 1;
                Some(input(inputs, next - 1, kernel)?.f32s())
            } else {
                None
            };
            let bias = if *bias {
                Some(input(inputs, next, kernel)?.f32s())
            } else {
                None
            };
            let (cols, eps) = (*cols, *eps);
            let (weight, bias) = (
                first_row(weight, cols, "weight")?,
                first_row(bias, cols, "bias")?,
            );
            for_rows(output.f32s_mut(), x, *rows, cols, |row, out| {
                let n = cols as f32;
                let mean = row.iter().sum::<f32>() / n;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let inv = 1.0 / (var + eps).sqrt();
                // One loop per case, so none tests per element.
                let normalised = row.iter().map(|v| (v - mean) * inv);
                match (weight, bias) {
                    (Some(w), Some(b)) => {
                        for (((o, y), w), b) in out.iter_mut().zip(normalised).zip(w).zip(b) {
                            *o = y * w + b;
                        }
                    }
                    (Some(w), None) => {
                        for ((o, y), w) in out.iter_mut().zip(normalised).zip(w) {
                            *o = y * w;
                        }
                    }
                    (None, Some(b)) => {
                        for ((o, y), b) in out.iter_mut().zip(normalised).zip(b) {
                            *o = y + b;
                        }
                    }
                    (None, None) => {
                        for (o, y) in out.iter_mut().zip(normalised) {
                            *o = y;
                        }
                    }
                }
            });
        }
        Kernel::RmsNorm {
            rows,
            cols,
            eps,
            weight,
            ..
        } => {
            let x = input(inputs, 0, kernel)?.f32s();
            let weight = if *weight {
                Some(input(inputs, 1, kernel)?.f32s())
            } else {
                None
            };
            let (cols, eps) = (*cols, *eps);
            for_rows(output.f32s_mut(), x, *rows, cols, |row, out| {
                let mean_square = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
                let inv = 1.0 / (mean_square + eps).sqrt();
                for (j, (o, v)) in out.iter_mut().zip(row).enumerate() {
                    *o = v * inv * weight.map_or(1.0, |w| w[j]);
                }
            });
        }
        Kernel::Permute {
            elem_size,
            in_shape,
            perm,
        } => {
            let x = input(inputs, 0, kernel)?;
            if *elem_size == 4 {
                permute::<u32>(in_shape, perm, &x.words, &mut output.words);
            } else {
                permute::<u16>(
                    in_shape,
                    perm,
                    bytemuck::cast_slice(&x.words),
                    bytemuck::cast_slice_mut(&mut output.words),
                );
            }
        }
        Kernel::Slice {
            elem_size,
            outer,
            in_len,
            start,
            len,
            inner,
        } => {
            let x = input(inputs, 0, kernel)?;
            let (src, dst) = (x.bytes(), output.bytes_mut());
            let row_in = in_len * inner * elem_size;
            let row_out = len * inner * elem_size;
            let skip = start * inner * elem_size;
            for o in 0..*outer {
                dst[o * row_out..(o + 1) * row_out]
                    .copy_from_slice(&src[o * row_in + skip..o * row_in + skip + row_out]);
            }
        }
        Kernel::Concat {
            elem_size,
            outer,
            lens,
            inner,
        } => {
            let total: usize = lens.iter().sum();
            let row_out = total * inner * elem_size;
            let dst = output.bytes_mut();
            let mut at = 0;
            for (p, len) in lens.iter().enumerate() {
                let chunk = len * inner * elem_size;
                if chunk == 0 {
                    continue;
                }
                let src = input(inputs, p, kernel)?.bytes();
                for o in 0..*outer {
                    dst[o * row_out + at..o * row_out + at + chunk]
                        .copy_from_slice(&src[o * chunk..(o + 1) * chunk]);
                }
                at += chunk;
            }
        }
        Kernel::Gather {
            elem_size,
            index_dtype,
            indices,
            rows,
            row_len,
        } => {
            let table = input(inputs, 0, kernel)?.bytes();
            let index_words = &input(inputs, 1, kernel)?.words[..*indices];
            let row_bytes = row_len * elem_size;
            let dst = output.bytes_mut();
            for (r, &word) in index_words.iter().enumerate() {
                let out = &mut dst[r * row_bytes..(r + 1) * row_bytes];
                match table_row(*index_dtype, word, *rows) {
                    Some(i) => out.copy_from_slice(&table[i * row_bytes..(i + 1) * row_bytes]),
                    None => out.fill(0),
                }
            }
        }
        Kernel::Cast { from, to, len } => {
            cast(*from, *to, *len, input(inputs, 0, kernel)?, output);
        }
        Kernel::Linear {
            dtype, m, k, ns, ..
        } => {
            let (dtype, m, k) = (*dtype, *m, *k);
            let total: usize = ns.iter().sum();
            let x = &input(inputs, 0, kernel)?.f32s()[..m * k];
            let out = &mut output.f32s_mut()[..m * total];
            if k == 0 {
                out.fill(0.0);
            } else if let Some(half) = match dtype {
                DType::F16 => Some(half_linear::Half::F16),
                DType::BF16 => Some(half_linear::Half::Bf16),
                _ => None,
            } {
                let halves = |i: usize, n: usize| -> Result<&[u16]> {
                    let words = &input(inputs, i + 1, kernel)?.words;
                    bytemuck::cast_slice::<u32, u16>(words)
                        .get(..n * k)
                        .ok_or_else(|| BridgeError::backend("linear weights out of bounds"))
                };
                let matrices = ns
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| halves(i, n))
                    .collect::<Result<Vec<_>>>()?;
                let x_bf16 = half_linear::bf16_inputs(half, x);
                let product = half_linear::Product {
                    half,
                    m,
                    k,
                    x,
                    x_bf16: x_bf16.as_deref(),
                    matrices: &matrices,
                    out: out.as_mut_ptr(),
                    stride: total,
                };
                let threads = if m * k * total >= GEMM_PARALLEL_THRESHOLD {
                    rayon::current_num_threads()
                } else {
                    1
                };
                for_column_blocks(total, half_linear::TILE_COLUMNS, threads, |first, width| {
                    // SAFETY: each matrix holds n × k halves (sliced
                    // above), x m × k floats and out m × total, which
                    // aliases neither; the blocks' columns are disjoint.
                    unsafe { half_linear::columns(&product, first, width) }
                });
            } else if dtype.is_quantized() {
                let weights = ns
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        Ok(quant::Weights {
                            dtype,
                            blocks: input(inputs, i + 1, kernel)?.bytes(),
                            n,
                            k,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                quant::linear(QUANT_KERNELS.with(|k| *k), &weights, x, m, out)?;
            } else if let [n] = ns[..] {
                linear_f32(m, k, n, x, &input(inputs, 1, kernel)?.f32s()[..n * k], out)?;
            } else {
                // Several f32 matrices: each on its own, placed side by side.
                let mut column = 0;
                for (i, &n) in ns.iter().enumerate() {
                    let w = &input(inputs, i + 1, kernel)?.f32s()[..n * k];
                    let mut part = vec![0f32; m * n];
                    linear_f32(m, k, n, x, w, &mut part)?;
                    for (row, values) in part.chunks_exact(n.max(1)).enumerate() {
                        out[row * total + column..row * total + column + n].copy_from_slice(values);
                    }
                    column += n;
                }
            }
        }
        &Kernel::SwiGlu { rows, n, .. } => {
            let x = &input(inputs, 0, kernel)?.f32s()[..rows * 2 * n];
            let out = &mut output.f32s_mut()[..rows * n];
            for (x, out) in x.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
                let (gate, up) = x.split_at(n);
                // As `silu` then `mul`, to the bit.
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
        }
        &Kernel::Dequantize { dtype, len } => {
            let kind = ggml_kind(dtype)?;
            let raw = &input(inputs, 0, kernel)?.bytes()[..dtype.bytes_for(&[len])?];
            quant::dequantize_into(kind, raw, &mut output.f32s_mut()[..len]);
        }
        &Kernel::GatherQuantized {
            dtype,
            index_dtype,
            indices,
            rows,
            row_len,
        } => {
            let kind = ggml_kind(dtype)?;
            let row_bytes = dtype.bytes_for(&[row_len])?;
            let table = input(inputs, 0, kernel)?.bytes();
            let index_words = &input(inputs, 1, kernel)?.words[..indices];
            let dst = output.f32s_mut();
            for (r, &word) in index_words.iter().enumerate() {
                let out = &mut dst[r * row_len..(r + 1) * row_len];
                match table_row(index_dtype, word, rows) {
                    Some(i) => quant::dequantize_into(
                        kind,
                        &table[i * row_bytes..(i + 1) * row_bytes],
                        out,
                    ),
                    None => out.fill(0.0),
                }
            }
        }
    }
    Ok(())
}

/// The table row a gather index word names: `None` (a row of zeros) when
/// it is negative (for `i32`) or past the table's `rows`.
fn table_row(index_dtype: DType, word: u32, rows: usize) -> Option<usize> {
    let index = match index_dtype {
        DType::I32 => usize::try_from(word.cast_signed()).ok(),
        _ => usize::try_from(word).ok(),
    };
    index.filter(|&i| i < rows)
}

/// The block layout of a quantized dtype.
fn ggml_kind(dtype: DType) -> Result<quant::GgmlType> {
    quant::GgmlType::of(dtype)
        .ok_or_else(|| BridgeError::backend(format!("{dtype} is not quantized")))
}

thread_local! {
    /// The quantized kernels this CPU runs best, looked up once per thread.
    static QUANT_KERNELS: quant::Kernels = quant::Kernels::best();
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` in f32.
fn linear_f32(m: usize, k: usize, n: usize, x: &[f32], w: &[f32], out: &mut [f32]) -> Result<()> {
    if m == 1 {
        // One row: `w · x` is the matrix-vector product `matmul` splits over
        // the threads.
        return matmul(n, k, 1, &[0], &[0], w, x, out);
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let parallelism = if m * n * k >= GEMM_PARALLEL_THRESHOLD {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `x` holds m×k, `w` n×k and `out` m×n floats (sliced by the
    // caller); `w` is read as the k×n matrix wᵀ (row stride 1, column
    // stride k); `out` aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `0.5 x (1 + erf(x / sqrt 2))` in f32, written so the compiler can
/// vectorise it: `erfc` is Numerical Recipes' `erfcc` (a Chebyshev fit with
/// fractional error below 1.2e-7, the same the wgpu backend uses) and its
/// `exp` is [`exp_vectorisable`]. Through `erfc` of `|x|` neither sign
/// loses accuracy to the cancellation in `1 + erf(x)`. The result is within
/// about 2e-6 (relative) of the exact value; libm's f64 `erf`, called per
/// element, made GELU a tenth of a small BERT's forward pass.
#[inline]
fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    let erfc = t * exp_vectorisable(poly);
    let one_plus_erf = if x < 0.0 { erfc } else { 2.0 - erfc };
    0.5 * x * one_plus_erf
}

/// `e^v` for `v` in `-87..=1` to within a few ulp, with no calls and no
/// branches (so a loop of it vectorises): `v = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, `e^r` by its Taylor series to degree 7 (remainder
/// below 1e-8), and `2^n` put into the exponent bits. Inputs outside are
/// clamped (`e^-87` is of the order of the smallest normal f32): GELU's
/// exponent lies in `-inf..=0`, and what it multiplies makes the clamp
/// invisible.
#[inline]
fn exp_vectorisable(v: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let v = v.clamp(-87.0, 1.0);
    let rounded = v * std::f32::consts::LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = (v - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // `rounded`'s low mantissa bits hold n in two's complement (its
    // exponent bits shift out), so `2^n` is integer arithmetic, which
    // vectorises where a float-to-int conversion may not; n is in -126..=1
    // after the clamp, so the biased exponent is 1..=128.
    let scale = f32::from_bits(rounded.to_bits().wrapping_add(127) << 23);
    p * scale
}

fn map_into(out: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) {
    if out.len() >= PARALLEL_THRESHOLD {
        out.par_chunks_mut(MAP_CHUNK)
            .zip(x.par_chunks(MAP_CHUNK))
            .for_each(|(out, x)| map_chunk(out, x, &f));
    } else {
        map_chunk(out, x, &f);
    }
}

/// Elements per parallel task of [`map_into`]: whole vector loops per task.
const MAP_CHUNK: usize = 4096;

/// `f` over a slice, compiled for AVX-512 where the CPU has it. The ops'
/// closures are written to vectorise (see [`exp_vectorisable`]), but the
/// baseline x86-64 target gives them only SSE2's four lanes: GELU over a
/// batch of 32 sentences' feed-forward activations took 1 ms a layer.
fn map_chunk(out: &mut [f32], x: &[f32], f: &impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, the only feature the function
        // enables.
        unsafe { map_chunk_avx512(out, x, f) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn map_chunk_avx512(out: &mut [f32], x: &[f32], f: &impl Fn(f32) -> f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f(v);
    }
}

fn binary(
    op: BinaryOp,
    out_shape: &[usize],
    lhs_strides: &[usize],
    rhs_strides: &[usize],
    lhs: &[f32],
    rhs: &[f32],
    out: &mut [f32],
) {
    // One monomorphised loop per op, as for the unary ops.
    let args = (out_shape, lhs_strides, rhs_strides, lhs, rhs, out);
    match op {
        BinaryOp::Add => binary_with(|a, b| a + b, args),
        BinaryOp::Sub => binary_with(|a, b| a - b, args),
        BinaryOp::Mul => binary_with(|a, b| a * b, args),
        BinaryOp::Div => binary_with(|a, b| a / b, args),
    }
}

type BinaryArgs<'a> = (
    &'a [usize],
    &'a [usize],
    &'a [usize],
    &'a [f32],
    &'a [f32],
    &'a mut [f32],
);

fn binary_with(
    f: impl Fn(f32, f32) -> f32 + Sync + Send + Copy,
    (out_shape, lhs_strides, rhs_strides, lhs, rhs, out): BinaryArgs<'_>,
) {
    let len: usize = out_shape.iter().product();
    let out = &mut out[..len];
    let last = out_shape.len() - 1;
    let row = out_shape[last];
    let (ls, rs) = (lhs_strides[last], rhs_strides[last]);
    // Walk the output one innermost row at a time; the row's start offsets
    // come from the outer indices.
    let row_op = |r: usize, out_row: &mut [f32]| {
        let (mut lo, mut ro, mut rem) = (0, 0, r);
        for d in (0..last).rev() {
            let i = rem % out_shape[d];
            rem /= out_shape[d];
            lo += i * lhs_strides[d];
            ro += i * rhs_strides[d];
        }
        // Contiguous rows (a residual sum, a bias added to every row) as
        // plain slices, which vectorise; anything else strided.
        match (
            (ls == 1).then(|| lhs.get(lo..lo + row)).flatten(),
            (rs == 1).then(|| rhs.get(ro..ro + row)).flatten(),
        ) {
            (Some(l), Some(r)) => {
                for ((o, &a), &b) in out_row.iter_mut().zip(l).zip(r) {
                    *o = f(a, b);
                }
            }
            _ => {
                for (j, o) in out_row.iter_mut().enumerate() {
                    *o = f(lhs[lo + j * ls], rhs[ro + j * rs]);
                }
            }
        }
    };
    if len >= PARALLEL_THRESHOLD {
        out.par_chunks_mut(row)
            .with_min_len((PARALLEL_THRESHOLD / row.max(1)).max(1))
            .enumerate()
            .for_each(|(r, o)| row_op(r, o));
    } else {
        out.chunks_mut(row)
            .enumerate()
            .for_each(|(r, o)| row_op(r, o));
    }
}

#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    k: usize,
    n: usize,
    lhs_offsets: &[usize],
    rhs_offsets: &[usize],
    lhs: &[f32],
    rhs: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let parallelism = if m * n * k >= GEMM_PARALLEL_THRESHOLD {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    for (b, (&lo, &ro)) in lhs_offsets.iter().zip(rhs_offsets).enumerate() {
        let a = lhs
            .get(lo..lo + m * k)
            .ok_or_else(|| BridgeError::backend("matmul lhs out of bounds"))?;
        let bm = rhs
            .get(ro..ro + k * n)
            .ok_or_else(|| BridgeError::backend("matmul rhs out of bounds"))?;
        let c = out
            .get_mut(b * m * n..(b + 1) * m * n)
            .ok_or_else(|| BridgeError::backend("matmul output out of bounds"))?;
        if k == 0 {
            c.fill(0.0);
            continue;
        }
        if n == 1 && m * k >= GEMM_PARALLEL_THRESHOLD {
            // A matrix-vector product (a decoder's weights times one
            // token) takes gemm's gemv path, which runs on one thread
            // whatever the parallelism: split the rows across rayon instead.
            let rows = m.div_ceil(rayon::current_num_threads() * 4).max(16);
            c.par_chunks_mut(rows)
                .zip(a.par_chunks(rows * k))
                .for_each(|(c, a)| {
                    // SAFETY: `a` holds `c.len()` rows of k (chunks of the
                    // bounds-checked m×k slice), `bm` k×1, `c` c.len()×1;
                    // `c` aliases neither input.
                    unsafe {
                        gemm::gemm(
                            c.len(),
                            1,
                            k,
                            c.as_mut_ptr(),
                            1,
                            1,
                            false,
                            a.as_ptr(),
                            1,
                            k as isize,
                            bm.as_ptr(),
                            1,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                });
            continue;
        }
        let threads = match parallelism {
            gemm::Parallelism::Rayon(_) => rayon::current_num_threads().max(1),
            _ => 1,
        };
        // Addresses, so that every thread can write its own columns of `c`
        // (no `&mut` to the shared rows is ever formed).
        let (a_at, b_at, c_at) = (
            a.as_ptr() as usize,
            bm.as_ptr() as usize,
            c.as_mut_ptr() as usize,
        );
        #[cfg(target_arch = "x86_64")]
        if m <= SKINNY_MAX_ROWS && skinny::available() {
            for_column_blocks(n, skinny::TILE_COLUMNS, threads, |first, width| {
                let product = skinny::Product {
                    m,
                    k,
                    n,
                    a: a_at as *const f32,
                    b: b_at as *const f32,
                    c: c_at as *mut f32,
                };
                // SAFETY: the CPU has AVX-512 (checked above); the three
                // slices were bounds-checked to hold m×k, k×n and m×n
                // row-major matrices; first + width <= n, and the blocks'
                // columns are disjoint, so no two threads write the same
                // element of `c`, which aliases neither input.
                unsafe { skinny::columns(product, first, width) }
            });
            continue;
        }
        if m < SPLIT_COLUMNS_BELOW_ROWS && n >= 32 && threads > 1 {
            // Whole 16-column tiles per block (gemm's widest).
            for_column_blocks(n, 16, threads, |first, width| {
                // SAFETY: as below, for columns first..first + width of the
                // k×n rhs and m×n output (row stride n), which lie inside
                // the bounds-checked slices since first + width <= n; the
                // blocks' columns are disjoint, so no two threads write the
                // same element, and nothing else touches `c` meanwhile.
                unsafe {
                    gemm::gemm(
                        m,
                        width,
                        k,
                        (c_at as *mut f32).add(first),
                        1,
                        n as isize,
                        false,
                        a_at as *const f32,
                        1,
                        k as isize,
                        (b_at as *const f32).add(first),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
            continue;
        }
        // SAFETY: the three slices were bounds-checked above to hold m×k,
        // k×n and m×n row-major matrices (row stride = columns, column
        // stride = 1); `c` does not alias `a` or `bm` (distinct buffers).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                bm.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    Ok(())
}

/// `block(first, width)` over `n` columns cut into at most `threads`
/// blocks, each a whole number of `tile` columns (the last may be narrower),
/// in parallel; a single block runs on this thread, since handing it to
/// rayon would only add a wake-up.
fn for_column_blocks(n: usize, tile: usize, threads: usize, block: impl Fn(usize, usize) + Sync) {
    if n == 0 {
        return;
    }
    let cols = n.div_ceil(threads.max(1)).next_multiple_of(tile).min(n);
    match n.div_ceil(cols) {
        1 => block(0, n),
        count => (0..count).into_par_iter().for_each(|index| {
            let first = index * cols;
            block(first, cols.min(n - first));
        }),
    }
}

fn reduce(op: ReduceOp, outer: usize, len: usize, inner: usize, x: &[f32], output: &mut CpuBuffer) {
    let at = |o: usize, j: usize, i: usize| x[(o * len + j) * inner + i];
    if op == ReduceOp::ArgMax {
        let out = &mut output.words[..outer * inner];
        for o in 0..outer {
            for i in 0..inner {
                let mut best = 0;
                let mut best_value = at(o, 0, i);
                for j in 1..len {
                    let v = at(o, j, i);
                    // NaN counts as the maximum, as in PyTorch.
                    if v > best_value || (v.is_nan() && !best_value.is_nan()) {
                        best = j;
                        best_value = v;
                    }
                }
                out[o * inner + i] = best as u32;
            }
        }
        return;
    }
    let out = &mut output.f32s_mut()[..outer * inner];
    out.par_chunks_mut(inner.max(1))
        .with_min_len((PARALLEL_THRESHOLD / (len * inner).max(1)).max(1))
        .enumerate()
        .for_each(|(o, out_row)| {
            for (i, slot) in out_row.iter_mut().enumerate() {
                *slot = match op {
                    ReduceOp::Sum | ReduceOp::Mean => {
                        // Accumulate in f64: a long f32 sum loses digits the
                        // 1e-5 accuracy contract needs.
                        let sum: f64 = (0..len).map(|j| f64::from(at(o, j, i))).sum();
                        if op == ReduceOp::Mean {
                            (sum / len as f64) as f32
                        } else {
                            sum as f32
                        }
                    }
                    _ => (0..len)
                        .map(|j| at(o, j, i))
                        .fold(f32::NEG_INFINITY, |a, v| {
                            if v.is_nan() || a.is_nan() {
                                f32::NAN
                            } else {
                                a.max(v)
                            }
                        }),
                };
            }
        });
}

fn softmax(outer: usize, len: usize, inner: usize, x: &[f32], out: &mut [f32]) {
    let block = len * inner;
    let out = &mut out[..outer * block];
    out.par_chunks_mut(block)
        .with_min_len((PARALLEL_THRESHOLD / block.max(1)).max(1))
        .enumerate()
        .for_each(|(o, out_block)| {
            let x_block = &x[o * block..(o + 1) * block];
            for i in 0..inner {
                let max = (0..len)
                    .map(|j| x_block[j * inner + i])
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f64;
                for j in 0..len {
                    let e = (x_block[j * inner + i] - max).exp();
                    out_block[j * inner + i] = e;
                    sum += f64::from(e);
                }
                let inv = (1.0 / sum) as f32;
                for j in 0..len {
                    out_block[j * inner + i] *= inv;
                }
            }
        });
}

/// The first `cols` values of a layer norm's optional weight or bias.
fn first_row<'a>(values: Option<&'a [f32]>, cols: usize, what: &str) -> Result<Option<&'a [f32]>> {
    values
        .map(|v| {
            v.get(..cols).ok_or_else(|| {
                BridgeError::backend(format!("layer-norm {what} is shorter than a row"))
            })
        })
        .transpose()
}

fn for_rows(
    out: &mut [f32],
    x: &[f32],
    rows: usize,
    cols: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync + Send,
) {
    let out = &mut out[..rows * cols];
    out.par_chunks_mut(cols)
        .with_min_len((PARALLEL_THRESHOLD / cols.max(1)).max(1))
        .zip(x.par_chunks(cols))
        .for_each(|(o, row)| f(row, o));
}

fn permute<T: Copy + Send + Sync>(in_shape: &[usize], perm: &[usize], x: &[T], out: &mut [T]) {
    let rank = in_shape.len();
    let mut in_strides = vec![1usize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        in_strides[d] = in_strides[d + 1] * in_shape[d + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let len: usize = in_shape.iter().product();
    let row = out_shape[rank - 1];
    let last_stride = strides[rank - 1];
    let row_op = |r: usize, out_row: &mut [T]| {
        let (mut src, mut rem) = (0, r);
        for d in (0..rank - 1).rev() {
            src += (rem % out_shape[d]) * strides[d];
            rem /= out_shape[d];
        }
        match (last_stride == 1).then(|| x.get(src..src + row)).flatten() {
            // The innermost axis stays innermost (heads split from or
            // merged into features): whole runs copy.
            Some(run) => out_row.copy_from_slice(run),
            None => {
                for (j, o) in out_row.iter_mut().enumerate() {
                    *o = x[src + j * last_stride];
                }
            }
        }
    };
    let out = &mut out[..len];
    if len >= PARALLEL_THRESHOLD {
        // Rows can be a head's 32 elements: one task per row costs more
        // than the copy.
        out.par_chunks_mut(row)
            .with_min_len((PARALLEL_THRESHOLD / row.max(1)).max(1))
            .enumerate()
            .for_each(|(r, o)| row_op(r, o));
    } else {
        out.chunks_mut(row)
            .enumerate()
            .for_each(|(r, o)| row_op(r, o));
    }
}

/// `f64` → `f16`/`bf16` bits, rounded once, to nearest even. `half`'s own
/// `from_f64` truncates low mantissa bits first, which misrounds values
/// just past a tie (f32 `0x3F801001` → f16 `0x3C00` instead of `0x3C01`;
/// the integer 33685505 → bf16 `0x4c00` instead of `0x4c01`).
fn f64_to_half_bits(value: f64, to: DType) -> u16 {
    let from_f32 = |v: f32| {
        if to == DType::F16 {
            f16::from_f32(v).to_bits()
        } else {
            bf16::from_f32(v).to_bits()
        }
    };
    // Every f32, f16 and bf16 value, and every integer below 2^24, is an
    // exact f32, and `half` converts from f32 with a single rounding.
    let as_f32 = value as f32;
    if !value.is_finite() || f64::from(as_f32) == value {
        return from_f32(as_f32);
    }
    // Larger integers: round the 52-bit mantissa to the target's width
    // (10 or 7 bits) here; the result converts exactly (or overflows to
    // infinity, as it should).
    let dropped = if to == DType::F16 { 42 } else { 45 };
    let bits = value.to_bits();
    let half_ulp = 1u64 << (dropped - 1);
    let remainder = bits & ((1u64 << dropped) - 1);
    let kept = bits >> dropped;
    let round_up = remainder > half_ulp || (remainder == half_ulp && kept & 1 == 1);
    from_f32(f64::from_bits((kept + u64::from(round_up)) << dropped) as f32)
}

fn cast(from: DType, to: DType, len: usize, x: &CpuBuffer, output: &mut CpuBuffer) {
    if from == to {
        // A plain copy of the bits: going through f64 would quiet a
        // signalling NaN, and the other backends copy bytes.
        let bytes = len * to.size();
        let src: &[u8] = bytemuck::cast_slice(&x.words);
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut output.words);
        let n = bytes.min(src.len()).min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        return;
    }
    let halves_in: &[u16] = bytemuck::cast_slice(&x.words);
    let read = |i: usize| -> f64 {
        match from {
            DType::F32 => f64::from(f32::from_bits(x.words[i])),
            DType::I32 => f64::from(x.words[i].cast_signed()),
            DType::U32 => f64::from(x.words[i]),
            DType::F16 => f16::from_bits(halves_in[i]).to_f64(),
            DType::BF16 => bf16::from_bits(halves_in[i]).to_f64(),
            // A quantized cast is planned as `Kernel::Dequantize`.
            DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K => 0.0,
        }
    };
    match to {
        DType::F32 => {
            for i in 0..len {
                // Integers above 2^24 must round to nearest from the exact
                // value, and f64 → f32 does exactly that.
                output.words[i] = (read(i) as f32).to_bits();
            }
        }
        DType::I32 => {
            for i in 0..len {
                output.words[i] = (read(i) as i32).cast_unsigned();
            }
        }
        DType::U32 => {
            for i in 0..len {
                output.words[i] = read(i) as u32;
            }
        }
        DType::F16 | DType::BF16 => {
            let out: &mut [u16] = bytemuck::cast_slice_mut(&mut output.words);
            for (i, o) in out.iter_mut().enumerate().take(len) {
                // Round once, from the exact value: going through f32 first
                // would double-round integers above 2^24.
                *o = f64_to_half_bits(read(i), to);
            }
        }
        // The bridge does not quantize: `Op::Cast` refuses these targets.
        DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversions_round_once() {
        let bf = |v: f64| f64_to_half_bits(v, DType::BF16);
        assert_eq!(bf(33_685_505.0), 0x4c01);
        assert_eq!(bf(1.0), bf16::from_f32(1.0).to_bits());
        // A tie rounds to even: 257 is halfway between 256 and 258.
        assert_eq!(bf16::from_bits(bf(257.0)).to_f32(), 256.0);
        assert_eq!(bf16::from_bits(bf(259.0)).to_f32(), 260.0);
        assert!(bf16::from_bits(bf(f64::NAN)).is_nan());
        let just_past_tie = f64::from(f32::from_bits(0x3F80_1001));
        assert_eq!(f64_to_half_bits(just_past_tie, DType::F16), 0x3C01);
        assert_eq!(
            f64_to_half_bits(100_000.0, DType::F16),
            f16::INFINITY.to_bits()
        );
        assert_eq!(
            f64_to_half_bits(16_777_217.0, DType::F16),
            f16::INFINITY.to_bits()
        );
    }

    #[test]
    fn the_default_pool_leaves_a_core_unless_told_otherwise() {
        assert_eq!(threads_for(None, 16), 15);
        assert_eq!(threads_for(None, 2), 1);
        assert_eq!(threads_for(None, 1), 1, "never no thread at all");
        assert_eq!(threads_for(Some("16"), 16), 16, "the operator's choice");
        assert_eq!(
            threads_for(Some("0"), 8),
            7,
            "zero: rayon's 'choose for me'"
        );
        assert_eq!(threads_for(Some("lots"), 8), 7);
        let backend = CpuBackend::with_threads(1 << 20, 3);
        assert_eq!(backend.describe().name, "cpu (3 threads)");
    }
}
