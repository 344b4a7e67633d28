//! What a backend runs: ops with every shape question already answered.
//!
//! The bridge validates an [`Op`](crate::Op) against its operands' shapes and
//! dtypes and lowers it to one `Kernel` over flat, contiguous, row-major
//! buffers. Backends never see a shape they have to check: every count and
//! stride here is consistent with the buffers they are given, every count
//! fits in `u32` (the bridge caps tensors at [`MAX_ELEMENTS`]), and an empty
//! output never reaches a backend.
//!
//! `inputs` in [`Backend::run`](crate::Backend::run) are in the order each
//! variant lists; the output buffer is freshly allocated, holds garbage, and
//! must be written in full.

use crate::dtype::DType;

/// The largest element count of one tensor, so that GPU kernels can index
/// with 32-bit integers.
pub const MAX_ELEMENTS: usize = (1 << 31) - 1;

/// The highest tensor rank the bridge accepts.
pub const MAX_RANK: usize = 8;

// Op numbers. Every GPU kernel takes its op as a number; these enums are the
// one place those numbers are written. The backends pass `op.code()` and the
// shaders see the same numbers as `GUST_<NAME>` constants that
// [`cuda_prelude`] and [`wgsl_prelude`] generate from these enums and the
// backends prepend to every program at build time, so the `.cu` and `.wgsl`
// files never spell a number of their own.

/// Elementwise functions of one operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum UnaryOp {
    /// `max(x, 0)`.
    Relu = 0,
    /// `0.5 x (1 + erf(x / sqrt 2))` (the exact form, not the tanh
    /// approximation).
    Gelu = 1,
    /// `x / (1 + e^-x)`.
    Silu = 2,
    /// `tanh x`.
    Tanh = 3,
    /// `e^x`.
    Exp = 4,
}

impl UnaryOp {
    /// Every unary op, in code order.
    pub const ALL: [Self; 5] = [Self::Relu, Self::Gelu, Self::Silu, Self::Tanh, Self::Exp];

    /// The number GPU kernels know this op by.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The shader constant naming [`Self::code`] (`GUST_RELU`, ...).
    pub const fn shader_name(self) -> &'static str {
        match self {
            Self::Relu => "GUST_RELU",
            Self::Gelu => "GUST_GELU",
            Self::Silu => "GUST_SILU",
            Self::Tanh => "GUST_TANH",
            Self::Exp => "GUST_EXP",
        }
    }
}

/// Elementwise functions of two operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum BinaryOp {
    /// `a + b`.
    Add = 0,
    /// `a - b`.
    Sub = 1,
    /// `a * b`.
    Mul = 2,
    /// `a / b` (IEEE: division by zero gives ±inf or NaN).
    Div = 3,
}

impl BinaryOp {
    /// Every binary op, in code order.
    pub const ALL: [Self; 4] = [Self::Add, Self::Sub, Self::Mul, Self::Div];

    /// The number GPU kernels know this op by.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The shader constant naming [`Self::code`] (`GUST_ADD`, ...).
    pub const fn shader_name(self) -> &'static str {
        match self {
            Self::Add => "GUST_ADD",
            Self::Sub => "GUST_SUB",
            Self::Mul => "GUST_MUL",
            Self::Div => "GUST_DIV",
        }
    }
}

/// Reductions over one dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ReduceOp {
    /// Sum.
    Sum = 0,
    /// Arithmetic mean.
    Mean = 1,
    /// Maximum (NaN if any element is NaN).
    Max = 2,
    /// Index of the first maximum, written as `u32`.
    ArgMax = 3,
}

impl ReduceOp {
    /// Every reduction, in code order.
    pub const ALL: [Self; 4] = [Self::Sum, Self::Mean, Self::Max, Self::ArgMax];

    /// The number GPU kernels know this op by.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The shader constant naming [`Self::code`] (`GUST_SUM`, ...).
    pub const fn shader_name(self) -> &'static str {
        match self {
            Self::Sum => "GUST_SUM",
            Self::Mean => "GUST_MEAN",
            Self::Max => "GUST_MAX",
            Self::ArgMax => "GUST_ARGMAX",
        }
    }
}

/// The number GPU kernels know an element type by (casts), and the shader
/// constant naming it.
pub const fn dtype_code(dtype: DType) -> (u32, &'static str) {
    match dtype {
        DType::F32 => (0, "GUST_F32"),
        DType::F16 => (1, "GUST_F16"),
        DType::BF16 => (2, "GUST_BF16"),
        DType::I32 => (3, "GUST_I32"),
        DType::U32 => (4, "GUST_U32"),
        DType::Q4_0 => (5, "GUST_Q4_0"),
        DType::Q4_1 => (6, "GUST_Q4_1"),
        DType::Q8_0 => (7, "GUST_Q8_0"),
        DType::Q4K => (8, "GUST_Q4_K"),
        DType::Q6K => (9, "GUST_Q6_K"),
    }
}

/// Every shader constant: name and value (op codes, dtype codes and
/// [`MAX_RANK`]).
fn shader_constants() -> impl Iterator<Item = (&'static str, u32)> {
    let unary = UnaryOp::ALL.map(|op| (op.shader_name(), op.code()));
    let binary = BinaryOp::ALL.map(|op| (op.shader_name(), op.code()));
    let reduce = ReduceOp::ALL.map(|op| (op.shader_name(), op.code()));
    let dtypes = DType::ALL.map(|d| {
        let (code, name) = dtype_code(d);
        (name, code)
    });
    // MAX_RANK is 8: the cast cannot truncate.
    let rank = [("GUST_MAX_RANK", MAX_RANK as u32)];
    unary
        .into_iter()
        .chain(binary)
        .chain(reduce)
        .chain(dtypes)
        .chain(rank)
}

/// The constants every CUDA program starts with, as `#define`s (plain
/// integers: the kernels take their op as `int`).
pub fn cuda_prelude() -> String {
    let mut out = String::from("// Generated from gpu-bridge/src/kernel.rs.\n");
    for (name, value) in shader_constants() {
        out.push_str(&format!("#define {name} {value}\n"));
    }
    out
}

/// The constants every WGSL module starts with, as module-scope `u32`
/// constants.
pub fn wgsl_prelude() -> String {
    let mut out = String::from("// Generated from gpu-bridge/src/kernel.rs.\n");
    for (name, value) in shader_constants() {
        out.push_str(&format!("const {name}: u32 = {value}u;\n"));
    }
    out
}

/// One unit of work for a backend. See the module docs for the contract.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Kernel {
    /// `out[i] = op(x[i])` for `i < len`. Inputs: `[x]`; `x` and `out` are
    /// `dtype` (a float type).
    Unary {
        /// The function.
        op: UnaryOp,
        /// Element type of input and output (float).
        dtype: DType,
        /// Element count.
        len: usize,
    },
    /// `out[i] = x[i] * scale + offset`. Inputs: `[x]`.
    Affine {
        /// Element type of input and output (float).
        dtype: DType,
        /// Element count.
        len: usize,
        /// Multiplier.
        scale: f32,
        /// Addend.
        offset: f32,
    },
    /// `out[idx] = lhs[idx · lhs_strides] op rhs[idx · rhs_strides]` for every
    /// multi-index `idx` of `out_shape`. A stride of 0 broadcasts that
    /// dimension. Inputs: `[lhs, rhs]`, both `dtype` (float), as is `out`.
    Binary {
        /// The function.
        op: BinaryOp,
        /// Element type of operands and output (float).
        dtype: DType,
        /// Shape of the output (rank 1..=8; a scalar is `[1]`).
        out_shape: Vec<usize>,
        /// Element strides of `lhs` per output dimension (0 = broadcast).
        lhs_strides: Vec<usize>,
        /// Element strides of `rhs` per output dimension (0 = broadcast).
        rhs_strides: Vec<usize>,
    },
    /// For each batch entry `b < lhs_offsets.len()`:
    /// `out[b·m·n ..][m×n] = lhs[lhs_offsets[b] ..][m×k] × rhs[rhs_offsets[b] ..][k×n]`,
    /// all row-major. Inputs: `[lhs, rhs]`, `dtype` (float).
    Matmul {
        /// Element type of operands and output (float).
        dtype: DType,
        /// Rows of each left matrix and of each output.
        m: usize,
        /// Columns of each left matrix, rows of each right matrix.
        k: usize,
        /// Columns of each right matrix and of each output.
        n: usize,
        /// Element offset of each batch entry's left matrix (length =
        /// batch count, at least 1).
        lhs_offsets: Vec<usize>,
        /// Element offset of each batch entry's right matrix (same length).
        rhs_offsets: Vec<usize>,
    },
    /// Input viewed as `[outer, len, inner]`, output `[outer, inner]`:
    /// `out[o, i] = op(x[o, 0..len, i])`. Inputs: `[x]` of `dtype` (float);
    /// `out` is `dtype` too except for `ArgMax`, whose `out` is `u32`.
    /// `len` is at least 1.
    Reduce {
        /// The reduction.
        op: ReduceOp,
        /// Element type of the input (float).
        dtype: DType,
        /// Product of the dimensions before the reduced one.
        outer: usize,
        /// Size of the reduced dimension.
        len: usize,
        /// Product of the dimensions after the reduced one.
        inner: usize,
    },
    /// Input and output viewed as `[outer, len, inner]`: softmax along the
    /// middle axis, computed stably (subtract the max first). Inputs: `[x]`.
    Softmax {
        /// Element type of input and output (float).
        dtype: DType,
        /// Product of the dimensions before the softmax one.
        outer: usize,
        /// Size of the softmax dimension.
        len: usize,
        /// Product of the dimensions after it.
        inner: usize,
    },
    /// Per row of `cols`: `out = (x - mean) / sqrt(var + eps) * w + b` with
    /// the biased variance. Inputs: `[x]`, then `weight` (`[cols]`) if
    /// `weight`, then `bias` (`[cols]`) if `bias`.
    LayerNorm {
        /// Element type of every operand and the output (float).
        dtype: DType,
        /// Row count.
        rows: usize,
        /// Row length (at least 1).
        cols: usize,
        /// Added to the variance.
        eps: f32,
        /// Whether a weight operand follows `x`.
        weight: bool,
        /// Whether a bias operand follows (after the weight, if any).
        bias: bool,
    },
    /// Per row of `cols`: `out = x / sqrt(mean(x²) + eps) * w`. Inputs:
    /// `[x]`, then `weight` (`[cols]`) if `weight`.
    RmsNorm {
        /// Element type of every operand and the output (float).
        dtype: DType,
        /// Row count.
        rows: usize,
        /// Row length (at least 1).
        cols: usize,
        /// Added to the mean square.
        eps: f32,
        /// Whether a weight operand follows `x`.
        weight: bool,
    },
    /// `out` has shape `in_shape[perm[0]], in_shape[perm[1]], …` and
    /// `out[j_0, j_1, …] = x[i]` where `i[perm[d]] = j_d`. Moves raw
    /// elements of `elem_size` bytes (2 or 4), whatever their dtype.
    /// Inputs: `[x]`.
    Permute {
        /// Bytes per element: 2 or 4.
        elem_size: usize,
        /// Shape of the input (rank 2..=8).
        in_shape: Vec<usize>,
        /// A permutation of `0..rank`.
        perm: Vec<usize>,
    },
    /// Input viewed as `[outer, in_len, inner]`, output `[outer, len, inner]`:
    /// `out[o, j, i] = x[o, start + j, i]`. Raw elements. Inputs: `[x]`.
    Slice {
        /// Bytes per element: 2 or 4.
        elem_size: usize,
        /// Product of the dimensions before the sliced one.
        outer: usize,
        /// Size of the sliced dimension in the input.
        in_len: usize,
        /// First index taken (`start + len <= in_len`).
        start: usize,
        /// How many indices are taken (at least 1).
        len: usize,
        /// Product of the dimensions after the sliced one.
        inner: usize,
    },
    /// Input `p` viewed as `[outer, lens[p], inner]`; output
    /// `[outer, sum(lens), inner]` with the inputs placed one after another
    /// along the middle axis. Raw elements. Inputs: one per entry of `lens`
    /// (an entry may be 0: that input is empty and has no data to read).
    Concat {
        /// Bytes per element: 2 or 4.
        elem_size: usize,
        /// Product of the dimensions before the joined one.
        outer: usize,
        /// Size of the joined dimension in each input.
        lens: Vec<usize>,
        /// Product of the dimensions after the joined one.
        inner: usize,
    },
    /// `out[r, 0..row_len] = table[indices[r], 0..row_len]` for
    /// `r < indices`; an index outside `0..rows` (negative, for `i32`)
    /// writes a row of zeros. Raw elements. Inputs: `[table, indices]`.
    Gather {
        /// Bytes per element of the table and the output: 2 or 4.
        elem_size: usize,
        /// `I32` or `U32`.
        index_dtype: DType,
        /// Number of indices (= output rows).
        indices: usize,
        /// Rows in the table.
        rows: usize,
        /// Elements per row.
        row_len: usize,
    },
    /// Softmax attention within packed sequences; see
    /// [`crate::Op::Attention`]. Inputs: `[qkv]`.
    Attention {
        /// Element type of input and output (float).
        dtype: DType,
        /// Attention heads.
        heads: usize,
        /// Elements per head.
        head_dim: usize,
        /// Tokens in each sequence, in order.
        lengths: Vec<usize>,
    },
    /// `out[i] = x[i]` converted to `to`, value-preserving where it can be:
    /// float → int truncates toward zero and saturates (NaN → 0), as Rust's
    /// `as` does; int → int (i32 ↔ u32) clamps to the target's range rather
    /// than reinterpreting bits; int → float and float → narrower float
    /// round once, to nearest even. Inputs: `[x]`.
    Cast {
        /// Input element type.
        from: DType,
        /// Output element type (different from `from`).
        to: DType,
        /// Element count.
        len: usize,
    },
    /// `out[m, Σn] = x[m, k] · [w₁ w₂ …]ᵀ`: linear layers with their
    /// weights as they are stored (`wᵢ` is `[nᵢ, k]`), their outputs side by
    /// side. Inputs: `[x, w₁, w₂, …]`; `x` and `out` have dtype `input`.
    Linear {
        /// The weights' element type.
        dtype: DType,
        /// The element type of `x` and of the output: f32 for quantized
        /// weights (activations are quantized to 8 bits on the fly) and for
        /// f16/bf16 weights with f32 inputs, else `dtype`.
        input: DType,
        /// Rows of `x` and of the output.
        m: usize,
        /// Columns of `x` and of every weight matrix.
        k: usize,
        /// Rows of each weight matrix, in order.
        ns: Vec<usize>,
    },
    /// Causal grouped-query attention over pages of cached keys and
    /// values ([`crate::Op::CausalAttention`]). Inputs: `[q, k₁, …, kₚ,
    /// v₁, …, vₚ]`; `q` is `[heads, t, head_dim]`, page `i` of keys and of
    /// values `[kv_heads, lengths[i], head_dim]`; `out` is `[t, heads ×
    /// head_dim]`.
    CausalAttention {
        /// Element type of every input and the output (float).
        dtype: DType,
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Width of a head.
        head_dim: usize,
        /// New positions.
        t: usize,
        /// Positions in each page, in order.
        lengths: Vec<usize>,
    },
    /// `out[r, i] = silu(x[r, i]) · x[r, n + i]` for `x: [rows, 2n]`.
    /// Inputs: `[x]`.
    SwiGlu {
        /// Element type of input and output (float).
        dtype: DType,
        /// Rows.
        rows: usize,
        /// Columns of the output, half of the input's.
        n: usize,
    },
    /// `out[i] = x[i]` for the `len` values of quantized `dtype`'s blocks,
    /// as f32. Inputs: `[x]`.
    Dequantize {
        /// The quantized element type.
        dtype: DType,
        /// Element count (whole blocks).
        len: usize,
    },
    /// `out[r, 0..row_len] = table[indices[r], 0..row_len]` as f32, for a
    /// table of quantized `dtype`; an index outside `0..rows` gives zeros.
    /// Inputs: `[table, indices]`.
    GatherQuantized {
        /// The table's quantized element type.
        dtype: DType,
        /// `I32` or `U32`.
        index_dtype: DType,
        /// Number of indices (= output rows).
        indices: usize,
        /// Rows in the table.
        rows: usize,
        /// Elements per row (whole blocks).
        row_len: usize,
    },
}

impl Kernel {
    /// A short name for metrics, logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unary { op, .. } => match op {
                UnaryOp::Relu => "relu",
                UnaryOp::Gelu => "gelu",
                UnaryOp::Silu => "silu",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Exp => "exp",
            },
            Self::Affine { .. } => "affine",
            Self::Binary { op, .. } => match op {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
            },
            Self::Matmul { .. } => "matmul",
            Self::Reduce { op, .. } => match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Mean => "mean",
                ReduceOp::Max => "max",
                ReduceOp::ArgMax => "argmax",
            },
            Self::Softmax { .. } => "softmax",
            Self::LayerNorm { .. } => "layer-norm",
            Self::RmsNorm { .. } => "rms-norm",
            Self::Permute { .. } => "permute",
            Self::Slice { .. } => "slice",
            Self::Concat { .. } => "concat",
            Self::Gather { .. } => "gather",
            Self::Cast { .. } => "cast",
            Self::Attention { .. } => "attention",
            Self::CausalAttention { .. } => "causal-attention",
            Self::Linear { .. } => "linear",
            Self::SwiGlu { .. } => "swiglu",
            Self::Dequantize { .. } => "cast",
            Self::GatherQuantized { .. } => "gather",
        }
    }
}

impl Kernel {
    /// The float dtype an arithmetic kernel computes in; `None` for kernels
    /// that move raw elements or convert (`Permute`, `Slice`, `Concat`,
    /// `Gather`, `Cast`), which every backend runs for every dtype.
    pub fn compute_dtype(&self) -> Option<DType> {
        match self {
            Self::Unary { dtype, .. }
            | Self::Affine { dtype, .. }
            | Self::Binary { dtype, .. }
            | Self::Matmul { dtype, .. }
            | Self::Reduce { dtype, .. }
            | Self::Softmax { dtype, .. }
            | Self::LayerNorm { dtype, .. }
            | Self::RmsNorm { dtype, .. }
            | Self::Attention { dtype, .. }
            | Self::CausalAttention { dtype, .. }
            // Quantized dtypes: only backends that list them run these.
            | Self::Linear { dtype, .. }
            | Self::SwiGlu { dtype, .. }
            | Self::Dequantize { dtype, .. }
            | Self::GatherQuantized { dtype, .. } => Some(*dtype),
            Self::Permute { .. }
            | Self::Slice { .. }
            | Self::Concat { .. }
            | Self::Gather { .. }
            | Self::Cast { .. } => None,
        }
    }

    /// For a `Matmul`, the common element strides between consecutive batch
    /// entries when the offsets are evenly spaced (as strided-batched GEMM
    /// APIs want; a stride of 0 reuses one matrix), else `None`.
    pub fn uniform_batch_strides(
        lhs_offsets: &[usize],
        rhs_offsets: &[usize],
    ) -> Option<(usize, usize)> {
        fn stride(offsets: &[usize]) -> Option<usize> {
            match offsets {
                [] => None,
                [_] => Some(0),
                [first, second, ..] => {
                    let step = second.checked_sub(*first)?;
                    offsets
                        .windows(2)
                        .all(|w| w[1].checked_sub(w[0]) == Some(step))
                        .then_some(step)
                }
            }
        }
        Some((stride(lhs_offsets)?, stride(rhs_offsets)?))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every shader file, by name (host-side: this only reads text).
    const SHADERS: [(&str, &str); 11] = [
        ("common.cuh", include_str!("backend/cuda/common.cuh")),
        (
            "elementwise.cu",
            include_str!("backend/cuda/elementwise.cu"),
        ),
        ("reduce.cu", include_str!("backend/cuda/reduce.cu")),
        ("norm.cu", include_str!("backend/cuda/norm.cu")),
        ("movement.cu", include_str!("backend/cuda/movement.cu")),
        ("cast.cu", include_str!("backend/cuda/cast.cu")),
        (
            "elementwise.wgsl",
            include_str!("backend/wgpu/elementwise.wgsl"),
        ),
        ("matmul.wgsl", include_str!("backend/wgpu/matmul.wgsl")),
        ("reduce.wgsl", include_str!("backend/wgpu/reduce.wgsl")),
        ("movement.wgsl", include_str!("backend/wgpu/movement.wgsl")),
        ("cast.wgsl", include_str!("backend/wgpu/cast.wgsl")),
    ];

    /// The `GUST_*` identifiers in `text`.
    fn gust_names(text: &str) -> BTreeSet<&str> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("GUST_"))
            .collect()
    }

    #[test]
    fn op_codes_are_distinct_within_each_family() {
        let distinct = |codes: Vec<u32>| codes.iter().collect::<BTreeSet<_>>().len() == codes.len();
        assert!(distinct(UnaryOp::ALL.map(UnaryOp::code).to_vec()));
        assert!(distinct(BinaryOp::ALL.map(BinaryOp::code).to_vec()));
        assert!(distinct(ReduceOp::ALL.map(ReduceOp::code).to_vec()));
        assert!(distinct(DType::ALL.map(|d| dtype_code(d).0).to_vec()));
        let names: Vec<&str> = shader_constants().map(|(name, _)| name).collect();
        assert_eq!(
            names.iter().collect::<BTreeSet<_>>().len(),
            names.len(),
            "{names:?}"
        );
    }

    /// The shaders name every op and dtype number through the generated
    /// constants: each `GUST_*` constant a shader uses is one the prelude
    /// defines or a macro of the CUDA files, and none of them defines a
    /// generated name again (which would let a second number creep in).
    #[test]
    fn shaders_use_only_the_generated_numbers() {
        let generated: BTreeSet<&str> = shader_constants().map(|(name, _)| name).collect();
        let macros: BTreeSet<&str> = SHADERS
            .iter()
            .flat_map(|(_, text)| text.lines())
            .filter_map(|line| line.trim().strip_prefix("#define "))
            .filter_map(|rest| rest.split(|c: char| c == '(' || c.is_whitespace()).next())
            .collect();
        for name in &macros {
            assert!(!generated.contains(name), "{name} is #defined by hand");
        }
        for (file, text) in SHADERS {
            for name in gust_names(text) {
                assert!(
                    generated.contains(name) || macros.contains(name),
                    "{file} uses {name}, which nothing defines"
                );
            }
            assert!(
                !text.contains("const GUST_"),
                "{file} defines a GUST_ constant by hand"
            );
            // The op switches name their cases; a bare number would be a
            // second spelling of an op code.
            for line in text.lines() {
                let case = line.trim().strip_prefix("case ");
                assert!(
                    !case.is_some_and(|c| c.starts_with(|d: char| d.is_ascii_digit())),
                    "{file}: `{}` names an op by number",
                    line.trim()
                );
            }
        }
        let cuda = cuda_prelude();
        let wgsl = wgsl_prelude();
        for (name, value) in shader_constants() {
            assert!(
                cuda.contains(&format!("#define {name} {value}\n")),
                "{name}"
            );
            assert!(
                wgsl.contains(&format!("const {name}: u32 = {value}u;\n")),
                "{name}"
            );
        }
    }
}
