//! Operations as callers ask for them, and their validation: every shape and
//! dtype question is answered here, before anything runs, and the op is
//! lowered to one [`Kernel`] (or to no work at all, for views).

use crate::dtype::DType;
use crate::error::{BridgeError, Result};
use crate::kernel::{BinaryOp, Kernel, MAX_ELEMENTS, MAX_RANK, ReduceOp, UnaryOp};

/// An operation on tensors. Operands are passed separately, in the order
/// each variant names.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Op {
    /// Matrix product of the last two dimensions; leading dimensions are
    /// batch dimensions and broadcast. Operands: `[a, b]`.
    Matmul,
    /// Elementwise arithmetic with broadcasting. Operands: `[a, b]`.
    Binary(BinaryOp),
    /// `x * scale + offset`. Operands: `[x]`.
    Affine {
        /// Multiplier.
        scale: f32,
        /// Addend.
        offset: f32,
    },
    /// An elementwise function. Operands: `[x]`.
    Unary(UnaryOp),
    /// Softmax over `dim` (negative counts from the end). Operands: `[x]`.
    Softmax {
        /// The dimension.
        dim: i32,
    },
    /// Layer normalisation over the last dimension. Operands: `[x]`, then
    /// the weight if `weight`, then the bias if `bias`.
    LayerNorm {
        /// Added to the variance.
        eps: f32,
        /// Whether a weight operand is given.
        weight: bool,
        /// Whether a bias operand is given.
        bias: bool,
    },
    /// RMS normalisation over the last dimension. Operands: `[x]`, then the
    /// weight if `weight`.
    RmsNorm {
        /// Added to the mean square.
        eps: f32,
        /// Whether a weight operand is given.
        weight: bool,
    },
    /// A reduction over `dim`. Operands: `[x]`.
    Reduce {
        /// Which reduction.
        op: ReduceOp,
        /// The dimension (negative counts from the end).
        dim: i32,
        /// Keep the reduced dimension with size 1.
        keep_dim: bool,
    },
    /// Swap two dimensions. Operands: `[x]`.
    Transpose {
        /// One dimension.
        dim0: i32,
        /// The other.
        dim1: i32,
    },
    /// Reorder all dimensions. Operands: `[x]`.
    Permute {
        /// A permutation of `0..rank`.
        dims: Vec<u32>,
    },
    /// Same data, new shape; one entry may be `-1`. Operands: `[x]`.
    Reshape {
        /// The new shape.
        shape: Vec<i64>,
    },
    /// `len` entries of `dim` from `start`. Operands: `[x]`.
    Slice {
        /// The dimension (negative counts from the end).
        dim: i32,
        /// First index.
        start: u32,
        /// Count.
        len: u32,
    },
    /// Join along `dim`. Operands: one or more tensors.
    Concat {
        /// The dimension (negative counts from the end).
        dim: i32,
    },
    /// Rows of a table picked by integer indices. Operands: `[table, indices]`.
    Gather,
    /// Convert the element type. Operands: `[x]`.
    Cast {
        /// The new element type.
        to: DType,
    },
    /// Softmax attention within each of several sequences packed one after
    /// another, without padding. Operands: `[qkv]`, `[tokens, 3 × hidden]`:
    /// each token's queries, keys and values, each `heads` runs of
    /// `hidden / heads`, queries already scaled. The output is
    /// `[tokens, hidden]`, each token's heads side by side. Only backends
    /// whose [`DeviceDescription::fused_attention`] is set run it.
    ///
    /// [`DeviceDescription::fused_attention`]: crate::backend::DeviceDescription::fused_attention
    Attention {
        /// Attention heads.
        heads: u32,
        /// Tokens in each sequence, in order; they sum to `tokens`.
        lengths: Vec<u32>,
    },
    /// Causal grouped-query attention over a cache of keys and values kept
    /// in pages: a decoder's attention for `t` new positions. Operands:
    /// `[q, k₁, …, kₚ, v₁, …, vₚ]`: `q` is `[heads, t, head_dim]`, queries
    /// already scaled; pages `kᵢ` and `vᵢ` are `[kv_heads, lenᵢ,
    /// head_dim]`, in position order, with `Σ lenᵢ = total ≥ t`. Query `i`
    /// sits at position `total − t + i` and attends keys `0..=total − t +
    /// i`; query head `h` reads kv head `h / (heads / kv_heads)`. The output
    /// is `[t, heads × head_dim]`. Pages let a cache grow by copying only
    /// its last page. Only backends whose
    /// [`DeviceDescription::fused_attention`] is set run it.
    ///
    /// [`DeviceDescription::fused_attention`]: crate::backend::DeviceDescription::fused_attention
    CausalAttention,
    /// A linear layer, `x · wᵀ`, with the weights as models store them:
    /// `w` is `[out, in]`, `x` is `[..., in]`, the result `[..., out]`.
    /// Operands: `[x, w]`, or `[x, w₁, w₂, …]` for several layers of the
    /// same input at once (a transformer's query, key and value): the
    /// results side by side, `[..., out₁ + out₂ + …]`, for one pass over
    /// `x`. The weights share a dtype, which may be quantized (then `x` is
    /// f32 and is quantized to 8 bits per value on the fly) or f16/bf16
    /// with an f32 `x` (weights kept in 16 bits, arithmetic and result in
    /// f32); otherwise `x` has the weights' float dtype. Only backends whose
    /// [`DeviceDescription::linear`] is set run it.
    ///
    /// [`DeviceDescription::linear`]: crate::backend::DeviceDescription::linear
    Linear,
    /// SwiGLU: `x` is `[..., 2n]`, the result `[..., n]` is
    /// `silu(x[..., :n]) · x[..., n:]` (a gated MLP's gate and up
    /// projections, side by side as one `linear` gives them). Operands:
    /// `[x]`. Only backends whose [`DeviceDescription::linear`] is set run
    /// it.
    ///
    /// [`DeviceDescription::linear`]: crate::backend::DeviceDescription::linear
    SwiGlu,
}

/// The dtype and shape of one operand.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar).
    pub shape: &'a [usize],
}

/// What running an op takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Run this kernel into a new buffer.
    Kernel(Kernel),
    /// The result is operand 0's data under a new shape or dtype name: no
    /// device work, no new memory.
    Alias,
    /// The result has no elements: no device work.
    Empty,
    /// The result is all zeros (a sum over an empty dimension).
    Zeros,
}

/// A validated op: the result's dtype and shape, and the work to get it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Element type of the result.
    pub dtype: DType,
    /// Shape of the result.
    pub shape: Vec<usize>,
    /// How to compute it.
    pub work: Work,
}

/// Check a shape against the bridge's limits and return its element count.
pub fn element_count(shape: &[usize]) -> Result<usize> {
    if shape.len() > MAX_RANK {
        return Err(BridgeError::invalid(format!(
            "rank {} is above the limit of {MAX_RANK}",
            shape.len()
        )));
    }
    // The non-zero dimensions must fit too, even when a zero makes the
    // tensor empty: every stride and every product of some of the
    // dimensions is then bounded, and no later arithmetic on the shape can
    // overflow (the `op_plan` fuzz target found `[0, huge, huge]`).
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            BridgeError::invalid(format!(
                "shape {shape:?} has more than {MAX_ELEMENTS} elements (or would, without its zero dimension)"
            ))
        })?;
    Ok(if shape.contains(&0) { 0 } else { nonzero })
}

/// Resolve a possibly negative dimension index against `rank`.
pub(crate) fn resolve_dim(dim: i32, rank: usize, what: &str) -> Result<usize> {
    let rank_i = i64::try_from(rank).unwrap_or(i64::MAX);
    let d = i64::from(dim);
    let resolved = if d < 0 { d + rank_i } else { d };
    if (0..rank_i).contains(&resolved) {
        Ok(resolved as usize)
    } else {
        Err(BridgeError::invalid(format!(
            "{what}: dim {dim} is out of range for a rank-{rank} tensor"
        )))
    }
}

fn arity(op_name: &str, operands: &[Operand<'_>], expected: usize) -> Result<()> {
    if operands.len() == expected {
        Ok(())
    } else {
        Err(BridgeError::invalid(format!(
            "{op_name} takes {expected} operand(s), got {}",
            operands.len()
        )))
    }
}

fn float(op_name: &str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(BridgeError::shape(format!(
            "{op_name} needs a float tensor (f32, f16 or bf16), got {dtype}"
        )))
    }
}

fn same_dtype(op_name: &str, a: DType, b: DType) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(BridgeError::shape(format!(
            "{op_name}: operand dtypes differ ({a} and {b}); cast one first"
        )))
    }
}

/// Row-major element strides of `shape`. Saturating: a shape with a zero
/// dimension has no elements whatever its other dimensions are (so
/// `element_count` accepts `[0, huge, huge]`), and its strides, never
/// used to address anything, must not overflow (found by the `op_plan`
/// fuzz target).
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(shape[d + 1]);
    }
    strides
}

/// Numpy broadcasting of two shapes: the result shape and, per result
/// dimension, each operand's element stride (0 where it broadcasts).
pub fn broadcast(
    op_name: &str,
    a: &[usize],
    b: &[usize],
) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    let rank = a.len().max(b.len());
    let (a_strides, b_strides) = (contiguous_strides(a), contiguous_strides(b));
    let mut shape = vec![0; rank];
    let mut sa = vec![0; rank];
    let mut sb = vec![0; rank];
    for d in 0..rank {
        let da = (d + a.len()).checked_sub(rank);
        let db = (d + b.len()).checked_sub(rank);
        let size_a = da.map_or(1, |i| a[i]);
        let size_b = db.map_or(1, |i| b[i]);
        let size = if size_a == size_b || size_b == 1 {
            size_a
        } else if size_a == 1 {
            size_b
        } else {
            return Err(BridgeError::shape(format!(
                "{op_name}: shapes {a:?} and {b:?} do not broadcast (dimension {d}: {size_a} vs {size_b})"
            )));
        };
        shape[d] = size;
        sa[d] = match da {
            Some(i) if a[i] != 1 => a_strides[i],
            _ => 0,
        };
        sb[d] = match db {
            Some(i) if b[i] != 1 => b_strides[i],
            _ => 0,
        };
    }
    Ok((shape, sa, sb))
}

/// `[outer, len, inner]` around dimension `dim` of `shape`.
fn split_at_dim(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner)
}

impl Op {
    /// The op's name in errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Matmul => "matmul",
            Self::Binary(BinaryOp::Add) => "add",
            Self::Binary(BinaryOp::Sub) => "sub",
            Self::Binary(BinaryOp::Mul) => "mul",
            Self::Binary(BinaryOp::Div) => "div",
            Self::Affine { .. } => "affine",
            Self::Unary(UnaryOp::Relu) => "relu",
            Self::Unary(UnaryOp::Gelu) => "gelu",
            Self::Unary(UnaryOp::Silu) => "silu",
            Self::Unary(UnaryOp::Tanh) => "tanh",
            Self::Unary(UnaryOp::Exp) => "exp",
            Self::Softmax { .. } => "softmax",
            Self::LayerNorm { .. } => "layer-norm",
            Self::RmsNorm { .. } => "rms-norm",
            Self::Reduce { op, .. } => match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Mean => "mean",
                ReduceOp::Max => "max",
                ReduceOp::ArgMax => "argmax",
            },
            Self::Transpose { .. } => "transpose",
            Self::Permute { .. } => "permute",
            Self::Reshape { .. } => "reshape",
            Self::Slice { .. } => "slice",
            Self::Concat { .. } => "concat",
            Self::Gather => "gather",
            Self::Cast { .. } => "cast",
            Self::Attention { .. } => "attention",
            Self::Linear => "linear",
            Self::CausalAttention => "causal-attention",
            Self::SwiGlu => "swiglu",
        }
    }

    /// Validate the op against its operands and lower it.
    pub fn plan(&self, operands: &[Operand<'_>]) -> Result<Plan> {
        let name = self.name();
        for operand in operands {
            element_count(operand.shape)?;
        }
        // Quantized blocks are weights: a linear layer's (operands 1..), a
        // gathered table's (operand 0), or dequantized by a cast.
        let weights = |i: usize| match self {
            Self::Linear => i >= 1,
            Self::Gather | Self::Cast { .. } => i == 0,
            _ => false,
        };
        for (i, operand) in operands.iter().enumerate() {
            if operand.dtype.is_quantized() && !weights(i) {
                return Err(BridgeError::shape(format!(
                    "{name}: a {} tensor takes only linear (as the weights), gather (as the \
                     table) and a cast to f32",
                    operand.dtype
                )));
            }
        }
        let plan = match self {
            Self::Linear => match operands {
                [x, weights @ ..] if !weights.is_empty() => plan_linear(*x, weights)?,
                _ => {
                    return Err(BridgeError::invalid(
                        "linear takes an input and at least one weight matrix",
                    ));
                }
            },
            Self::CausalAttention => plan_causal_attention(operands)?,
            Self::SwiGlu => {
                let x = unary_operand(name, operands)?;
                let Some((&width, leading)) = x.shape.split_last() else {
                    return Err(BridgeError::shape("swiglu: the input needs a dimension"));
                };
                if !width.is_multiple_of(2) {
                    return Err(BridgeError::shape(format!(
                        "swiglu: the last dimension ({width}) is not a gate and an up half"
                    )));
                }
                let mut shape = leading.to_vec();
                shape.push(width / 2);
                Plan {
                    dtype: x.dtype,
                    shape,
                    work: Work::Kernel(Kernel::SwiGlu {
                        dtype: x.dtype,
                        rows: leading.iter().product(),
                        n: width / 2,
                    }),
                }
            }
            Self::Matmul => {
                arity(name, operands, 2)?;
                plan_matmul(operands[0], operands[1])?
            }
            Self::Binary(op) => {
                arity(name, operands, 2)?;
                let (a, b) = (operands[0], operands[1]);
                float(name, a.dtype)?;
                same_dtype(name, a.dtype, b.dtype)?;
                let (shape, lhs_strides, rhs_strides) = broadcast(name, a.shape, b.shape)?;
                let mut out_shape = shape.clone();
                let (mut lhs_strides, mut rhs_strides) = (lhs_strides, rhs_strides);
                if out_shape.is_empty() {
                    out_shape = vec![1];
                    lhs_strides = vec![0];
                    rhs_strides = vec![0];
                }
                Plan {
                    dtype: a.dtype,
                    shape,
                    work: Work::Kernel(Kernel::Binary {
                        op: *op,
                        dtype: a.dtype,
                        out_shape,
                        lhs_strides,
                        rhs_strides,
                    }),
                }
            }
            Self::Affine { scale, offset } => {
                let x = unary_operand(name, operands)?;
                Plan {
                    dtype: x.dtype,
                    shape: x.shape.to_vec(),
                    work: Work::Kernel(Kernel::Affine {
                        dtype: x.dtype,
                        len: element_count(x.shape)?,
                        scale: *scale,
                        offset: *offset,
                    }),
                }
            }
            Self::Unary(op) => {
                let x = unary_operand(name, operands)?;
                Plan {
                    dtype: x.dtype,
                    shape: x.shape.to_vec(),
                    work: Work::Kernel(Kernel::Unary {
                        op: *op,
                        dtype: x.dtype,
                        len: element_count(x.shape)?,
                    }),
                }
            }
            Self::Softmax { dim } => {
                let x = unary_operand(name, operands)?;
                let d = resolve_dim(*dim, x.shape.len(), name)?;
                let (outer, len, inner) = split_at_dim(x.shape, d);
                Plan {
                    dtype: x.dtype,
                    shape: x.shape.to_vec(),
                    work: Work::Kernel(Kernel::Softmax {
                        dtype: x.dtype,
                        outer,
                        len,
                        inner,
                    }),
                }
            }
            Self::LayerNorm { eps, weight, bias } => {
                let (rows, cols) =
                    plan_norm(name, operands, usize::from(*weight) + usize::from(*bias))?;
                let x = operands[0];
                Plan {
                    dtype: x.dtype,
                    shape: x.shape.to_vec(),
                    work: Work::Kernel(Kernel::LayerNorm {
                        dtype: x.dtype,
                        rows,
                        cols,
                        eps: *eps,
                        weight: *weight,
                        bias: *bias,
                    }),
                }
            }
            Self::RmsNorm { eps, weight } => {
                let (rows, cols) = plan_norm(name, operands, usize::from(*weight))?;
                let x = operands[0];
                Plan {
                    dtype: x.dtype,
                    shape: x.shape.to_vec(),
                    work: Work::Kernel(Kernel::RmsNorm {
                        dtype: x.dtype,
                        rows,
                        cols,
                        eps: *eps,
                        weight: *weight,
                    }),
                }
            }
            Self::Reduce { op, dim, keep_dim } => {
                let x = unary_operand(name, operands)?;
                let d = resolve_dim(*dim, x.shape.len(), name)?;
                let (outer, len, inner) = split_at_dim(x.shape, d);
                if len == 0 && matches!(op, ReduceOp::Max | ReduceOp::ArgMax | ReduceOp::Mean) {
                    return Err(BridgeError::invalid(format!(
                        "{name} over an empty dimension {dim} has no value"
                    )));
                }
                let mut shape = x.shape.to_vec();
                if *keep_dim {
                    shape[d] = 1;
                } else {
                    shape.remove(d);
                }
                let dtype = if *op == ReduceOp::ArgMax {
                    DType::U32
                } else {
                    x.dtype
                };
                let work = if len == 0 {
                    // A sum over nothing is zero everywhere.
                    Work::Zeros
                } else {
                    Work::Kernel(Kernel::Reduce {
                        op: *op,
                        dtype: x.dtype,
                        outer,
                        len,
                        inner,
                    })
                };
                Plan { dtype, shape, work }
            }
            Self::Transpose { dim0, dim1 } => {
                arity(name, operands, 1)?;
                let x = operands[0];
                let rank = x.shape.len();
                let (a, b) = (
                    resolve_dim(*dim0, rank, name)?,
                    resolve_dim(*dim1, rank, name)?,
                );
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(a, b);
                plan_permute(x, perm)
            }
            Self::Permute { dims } => {
                arity(name, operands, 1)?;
                let x = operands[0];
                let rank = x.shape.len();
                let perm: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
                let mut seen = vec![false; rank];
                let valid = perm.len() == rank
                    && perm
                        .iter()
                        .all(|&d| d < rank && !std::mem::replace(&mut seen[d], true));
                if !valid {
                    return Err(BridgeError::invalid(format!(
                        "permute: {dims:?} is not a permutation of 0..{rank}"
                    )));
                }
                plan_permute(x, perm)
            }
            Self::Reshape { shape } => {
                arity(name, operands, 1)?;
                let x = operands[0];
                let shape = plan_reshape(x.shape, shape)?;
                Plan {
                    dtype: x.dtype,
                    shape,
                    work: Work::Alias,
                }
            }
            Self::Slice { dim, start, len } => {
                arity(name, operands, 1)?;
                let x = operands[0];
                let d = resolve_dim(*dim, x.shape.len(), name)?;
                let (start, len) = (*start as usize, *len as usize);
                let (outer, in_len, inner) = split_at_dim(x.shape, d);
                if start.checked_add(len).is_none_or(|end| end > in_len) {
                    return Err(BridgeError::invalid(format!(
                        "slice: {start}..{} is outside dimension {dim} of size {in_len}",
                        start.saturating_add(len)
                    )));
                }
                let mut shape = x.shape.to_vec();
                shape[d] = len;
                let work = if len == in_len {
                    Work::Alias
                } else {
                    Work::Kernel(Kernel::Slice {
                        elem_size: x.dtype.size(),
                        outer,
                        in_len,
                        start,
                        len,
                        inner,
                    })
                };
                Plan {
                    dtype: x.dtype,
                    shape,
                    work,
                }
            }
            Self::Concat { dim } => plan_concat(*dim, operands)?,
            Self::Gather => {
                arity(name, operands, 2)?;
                let (table, indices) = (operands[0], operands[1]);
                if !indices.dtype.is_int() {
                    return Err(BridgeError::shape(format!(
                        "gather: indices must be i32 or u32, got {}",
                        indices.dtype
                    )));
                }
                let Some((&rows, row_shape)) = table.shape.split_first() else {
                    return Err(BridgeError::shape(
                        "gather: the table must have at least one dimension",
                    ));
                };
                let mut shape = indices.shape.to_vec();
                shape.extend_from_slice(row_shape);
                element_count(&shape)?;
                if table.dtype.is_quantized() {
                    table.dtype.bytes_for(table.shape)?;
                    return Ok(Plan {
                        dtype: DType::F32,
                        shape,
                        work: Work::Kernel(Kernel::GatherQuantized {
                            dtype: table.dtype,
                            index_dtype: indices.dtype,
                            indices: element_count(indices.shape)?,
                            rows,
                            row_len: row_shape.iter().product(),
                        }),
                    });
                }
                Plan {
                    dtype: table.dtype,
                    shape,
                    work: Work::Kernel(Kernel::Gather {
                        elem_size: table.dtype.size(),
                        index_dtype: indices.dtype,
                        indices: element_count(indices.shape)?,
                        rows,
                        row_len: row_shape.iter().product(),
                    }),
                }
            }
            Self::Attention { heads, lengths } => {
                arity(name, operands, 1)?;
                plan_attention(operands[0], *heads, lengths)?
            }
            Self::Cast { to } => {
                arity(name, operands, 1)?;
                let x = operands[0];
                if to.is_quantized() && x.dtype != *to {
                    return Err(BridgeError::unsupported(format!(
                        "cast: the bridge does not quantize; upload {to} blocks as they are"
                    )));
                }
                let work = if x.dtype == *to {
                    Work::Alias
                } else if x.dtype.is_quantized() {
                    if *to != DType::F32 {
                        return Err(BridgeError::unsupported(format!(
                            "cast: {} dequantizes to f32 only",
                            x.dtype
                        )));
                    }
                    x.dtype.bytes_for(x.shape)?;
                    Work::Kernel(Kernel::Dequantize {
                        dtype: x.dtype,
                        len: element_count(x.shape)?,
                    })
                } else {
                    Work::Kernel(Kernel::Cast {
                        from: x.dtype,
                        to: *to,
                        len: element_count(x.shape)?,
                    })
                };
                Plan {
                    dtype: *to,
                    shape: x.shape.to_vec(),
                    work,
                }
            }
        };
        let elements = element_count(&plan.shape)?;
        let plan = if elements == 0 && plan.work != Work::Alias {
            Plan {
                work: Work::Empty,
                ..plan
            }
        } else {
            plan
        };
        Ok(plan)
    }
}

fn unary_operand<'a>(name: &str, operands: &[Operand<'a>]) -> Result<Operand<'a>> {
    arity(name, operands, 1)?;
    float(name, operands[0].dtype)?;
    Ok(operands[0])
}

fn plan_linear(x: Operand<'_>, weights: &[Operand<'_>]) -> Result<Plan> {
    let Some((&k, leading)) = x.shape.split_last() else {
        return Err(BridgeError::shape(
            "linear: the input needs at least one dimension",
        ));
    };
    let dtype = weights[0].dtype;
    let mut ns = Vec::with_capacity(weights.len());
    for w in weights {
        let &[n, inner] = w.shape else {
            return Err(BridgeError::shape(format!(
                "linear: the weights are [out, in], got {:?}",
                w.shape
            )));
        };
        if inner != k {
            return Err(BridgeError::shape(format!(
                "linear: input {:?} does not end in the weights' {inner} inputs ({:?})",
                x.shape, w.shape
            )));
        }
        if w.dtype != dtype {
            return Err(BridgeError::shape(format!(
                "linear: the weights of one call share a dtype, not {dtype} and {}",
                w.dtype
            )));
        }
        if w.dtype.is_quantized() {
            w.dtype.bytes_for(w.shape)?;
        }
        ns.push(n);
    }
    if dtype.is_quantized() {
        if x.dtype != DType::F32 {
            return Err(BridgeError::shape(format!(
                "linear: {dtype} weights take f32 inputs, got {}",
                x.dtype
            )));
        }
    } else {
        float("linear", dtype)?;
        // Half-precision weights also take f32 inputs: weights stored in
        // 16 bits, arithmetic and result in f32.
        let half_weights = matches!(dtype, DType::F16 | DType::BF16) && x.dtype == DType::F32;
        if !half_weights {
            same_dtype("linear", x.dtype, dtype)?;
        }
    }
    let mut shape = leading.to_vec();
    shape.push(ns.iter().sum());
    element_count(&shape)?;
    Ok(Plan {
        dtype: x.dtype,
        shape,
        work: Work::Kernel(Kernel::Linear {
            dtype,
            input: x.dtype,
            m: leading.iter().product(),
            k,
            ns,
        }),
    })
}

fn plan_causal_attention(operands: &[Operand<'_>]) -> Result<Plan> {
    let name = "causal-attention";
    let [q, pages @ ..] = operands else {
        return Err(BridgeError::invalid(format!("{name} needs operands")));
    };
    if pages.is_empty() || !pages.len().is_multiple_of(2) {
        return Err(BridgeError::invalid(format!(
            "{name} takes queries and as many key pages as value pages, got {} operands",
            operands.len()
        )));
    }
    float(name, q.dtype)?;
    let &[heads, t, head_dim] = q.shape else {
        return Err(BridgeError::shape(format!(
            "{name}: queries are [heads, t, head_dim], got {:?}",
            q.shape
        )));
    };
    let (keys, values) = pages.split_at(pages.len() / 2);
    let mut kv_heads = None;
    let mut lengths = Vec::with_capacity(keys.len());
    for (k, v) in keys.iter().zip(values) {
        same_dtype(name, q.dtype, k.dtype)?;
        same_dtype(name, q.dtype, v.dtype)?;
        let &[kv, len, width] = k.shape else {
            return Err(BridgeError::shape(format!(
                "{name}: a key page is [kv_heads, positions, head_dim], got {:?}",
                k.shape
            )));
        };
        if v.shape != k.shape || width != head_dim || *kv_heads.get_or_insert(kv) != kv {
            return Err(BridgeError::shape(format!(
                "{name}: pages {:?} and {:?} do not match each other, the other pages or                  queries {:?}",
                k.shape, v.shape, q.shape
            )));
        }
        lengths.push(len);
    }
    let kv_heads = kv_heads.unwrap_or(0);
    if kv_heads == 0 || heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(BridgeError::shape(format!(
            "{name}: {heads} query heads do not share {kv_heads} key/value heads evenly"
        )));
    }
    let total = lengths
        .iter()
        .try_fold(0usize, |sum, &l| sum.checked_add(l))
        .unwrap_or(usize::MAX);
    if t == 0 || head_dim == 0 || total < t {
        return Err(BridgeError::shape(format!(
            "{name}: {t} new positions of width {head_dim} need at least as many cached,              the pages hold {total}"
        )));
    }
    let shape = vec![t, heads * head_dim];
    element_count(&shape)?;
    Ok(Plan {
        dtype: q.dtype,
        shape,
        work: Work::Kernel(Kernel::CausalAttention {
            dtype: q.dtype,
            heads,
            kv_heads,
            head_dim,
            t,
            lengths,
        }),
    })
}

fn plan_attention(qkv: Operand<'_>, heads: u32, lengths: &[u32]) -> Result<Plan> {
    if !qkv.dtype.is_float() {
        return Err(BridgeError::shape(format!(
            "attention needs a float tensor, got {}",
            qkv.dtype
        )));
    }
    let &[tokens, width] = qkv.shape else {
        return Err(BridgeError::shape(format!(
            "attention takes [tokens, 3 × hidden], got {:?}",
            qkv.shape
        )));
    };
    let heads = heads as usize;
    if heads == 0 || width % (3 * heads) != 0 {
        return Err(BridgeError::shape(format!(
            "attention: {width} columns do not split into queries, keys and values of {heads} heads"
        )));
    }
    let lengths: Vec<usize> = lengths.iter().map(|&l| l as usize).collect();
    let total = lengths
        .iter()
        .try_fold(0usize, |sum, &l| sum.checked_add(l))
        .unwrap_or(usize::MAX);
    if total != tokens {
        return Err(BridgeError::shape(format!(
            "attention: the sequence lengths add up to {total}, the tensor has {tokens} tokens"
        )));
    }
    let hidden = width / 3;
    Ok(Plan {
        dtype: qkv.dtype,
        shape: vec![tokens, hidden],
        work: Work::Kernel(Kernel::Attention {
            dtype: qkv.dtype,
            heads,
            head_dim: hidden / heads,
            lengths,
        }),
    })
}

/// The most matrices one batched matmul may multiply pairwise (when its
/// right side is not one matrix shared by the whole batch, which plans as a
/// single product whatever the batch).
pub const MAX_MATMUL_BATCH: usize = 1 << 16;

fn plan_matmul(a: Operand<'_>, b: Operand<'_>) -> Result<Plan> {
    float("matmul", a.dtype)?;
    same_dtype("matmul", a.dtype, b.dtype)?;
    if a.shape.len() < 2 || b.shape.len() < 2 {
        return Err(BridgeError::shape(format!(
            "matmul needs operands of rank 2 or more (got {:?} and {:?}); reshape a vector to [1, n] or [n, 1]",
            a.shape, b.shape
        )));
    }
    let (a_batch, a_mat) = a.shape.split_at(a.shape.len() - 2);
    let (b_batch, b_mat) = b.shape.split_at(b.shape.len() - 2);
    let (m, k) = (a_mat[0], a_mat[1]);
    let (k2, n) = (b_mat[0], b_mat[1]);
    if k != k2 {
        return Err(BridgeError::shape(format!(
            "matmul: inner dimensions differ: {:?} × {:?} ({k} vs {k2})",
            a.shape, b.shape
        )));
    }
    let (batch_shape, a_strides, b_strides) = broadcast("matmul", a_batch, b_batch)?;
    let batch: usize = batch_shape.iter().product();
    let mut shape = batch_shape.clone();
    shape.extend_from_slice(&[m, n]);
    if element_count(&shape)? == 0 {
        // Nothing to compute, and the per-matrix offsets below would cost
        // time and memory in the batch size, which an empty `m` or `n`
        // leaves unbounded by the output (`[1, 0, k] × [2³⁰, k, n]`, found
        // by the `op_plan` fuzz target as a timeout).
        return Ok(Plan {
            dtype: a.dtype,
            shape,
            work: Work::Empty,
        });
    }
    // `[batch…, m, k] × [k, n]` (the right side shared by every batch, as
    // for a linear layer's weight) is one `[batch·m, k] × [k, n]` product
    // over the same bytes: one large matmul instead of many thin ones,
    // which is what makes a batch of short sequences fast.
    if batch > 1 && b_strides.iter().all(|&s| s == 0) && a_batch == batch_shape.as_slice() {
        return Ok(Plan {
            dtype: a.dtype,
            shape,
            work: Work::Kernel(Kernel::Matmul {
                dtype: a.dtype,
                m: batch * m,
                k,
                n,
                lhs_offsets: vec![0],
                rhs_offsets: vec![0],
            }),
        });
    }
    // Each matrix of the batch gets its own pair of offsets, computed here:
    // bounded, so that a plan never costs more than its operands' shapes
    // justify (`[3, 1, 1, 1] × [1, 1, 1, 10⁸, 1, 1]` would have asked for
    // 600 million offsets; found by the `op_plan` fuzz target).
    if batch > MAX_MATMUL_BATCH {
        return Err(BridgeError::invalid(format!(
            "matmul: a batch of {batch} matrices is above the limit of {MAX_MATMUL_BATCH}; reshape into fewer, larger matrices"
        )));
    }
    let (mut lhs_offsets, mut rhs_offsets) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
    for index in 0..batch {
        let (mut lo, mut ro, mut rem) = (0, 0, index);
        for d in (0..batch_shape.len()).rev() {
            let i = rem % batch_shape[d];
            rem /= batch_shape[d];
            lo += i * a_strides[d];
            ro += i * b_strides[d];
        }
        // Batch strides count matrices; offsets count elements.
        lhs_offsets.push(lo * m * k);
        rhs_offsets.push(ro * k * n);
    }
    Ok(Plan {
        dtype: a.dtype,
        shape,
        work: Work::Kernel(Kernel::Matmul {
            dtype: a.dtype,
            m,
            k,
            n,
            lhs_offsets,
            rhs_offsets,
        }),
    })
}

fn plan_norm(name: &str, operands: &[Operand<'_>], extra: usize) -> Result<(usize, usize)> {
    arity(name, operands, 1 + extra)?;
    let x = operands[0];
    float(name, x.dtype)?;
    let Some(&cols) = x.shape.last() else {
        return Err(BridgeError::shape(format!(
            "{name} needs a tensor of rank 1 or more"
        )));
    };
    if cols == 0 {
        return Err(BridgeError::invalid(format!(
            "{name} over an empty last dimension"
        )));
    }
    for param in &operands[1..] {
        same_dtype(name, x.dtype, param.dtype)?;
        if param.shape != [cols] {
            return Err(BridgeError::shape(format!(
                "{name}: weight and bias must have shape [{cols}], got {:?}",
                param.shape
            )));
        }
    }
    let rows = element_count(x.shape)? / cols;
    Ok((rows, cols))
}

fn plan_permute(x: Operand<'_>, perm: Vec<usize>) -> Plan {
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    // Moving only size-1 dimensions leaves the element order unchanged.
    let moved: Vec<usize> = perm.iter().copied().filter(|&p| x.shape[p] != 1).collect();
    let work = if moved.windows(2).all(|w| w[0] < w[1]) {
        Work::Alias
    } else {
        Work::Kernel(Kernel::Permute {
            elem_size: x.dtype.size(),
            in_shape: x.shape.to_vec(),
            perm,
        })
    };
    Plan {
        dtype: x.dtype,
        shape,
        work,
    }
}

fn plan_reshape(from: &[usize], to: &[i64]) -> Result<Vec<usize>> {
    let total = element_count(from)?;
    let mut inferred = None;
    let mut known = 1usize;
    let mut shape = Vec::with_capacity(to.len());
    for (i, &d) in to.iter().enumerate() {
        match d {
            -1 if inferred.is_none() => {
                inferred = Some(i);
                shape.push(0);
            }
            -1 => {
                return Err(BridgeError::invalid(
                    "reshape: at most one dimension may be -1",
                ));
            }
            d if d < 0 => {
                return Err(BridgeError::invalid(format!(
                    "reshape: dimension {d} is negative"
                )));
            }
            d => {
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d <= MAX_ELEMENTS)
                    .ok_or_else(|| {
                        BridgeError::invalid(format!("reshape: dimension {d} is too large"))
                    })?;
                known = known
                    .checked_mul(d)
                    .filter(|&n| n <= MAX_ELEMENTS)
                    .ok_or_else(|| BridgeError::invalid(format!("reshape: {to:?} is too large")))?;
                shape.push(d);
            }
        }
    }
    if let Some(i) = inferred {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(BridgeError::shape(format!(
                "reshape: cannot infer -1 in {to:?} for {total} elements"
            )));
        }
        shape[i] = total / known;
    } else if known != total {
        return Err(BridgeError::shape(format!(
            "reshape: {to:?} holds {known} elements, the tensor {from:?} has {total}"
        )));
    }
    element_count(&shape)?;
    Ok(shape)
}

fn plan_concat(dim: i32, operands: &[Operand<'_>]) -> Result<Plan> {
    let Some(first) = operands.first() else {
        return Err(BridgeError::invalid("concat needs at least one tensor"));
    };
    let rank = first.shape.len();
    let d = resolve_dim(dim, rank, "concat")?;
    let mut lens = Vec::with_capacity(operands.len());
    for (i, x) in operands.iter().enumerate() {
        same_dtype("concat", first.dtype, x.dtype)?;
        let matches = x.shape.len() == rank
            && x.shape
                .iter()
                .zip(first.shape)
                .enumerate()
                .all(|(j, (a, b))| j == d || a == b);
        if !matches {
            return Err(BridgeError::shape(format!(
                "concat: tensor {i} has shape {:?}, which differs from {:?} outside dimension {dim}",
                x.shape, first.shape
            )));
        }
        lens.push(x.shape[d]);
    }
    let total = lens
        .iter()
        .try_fold(0usize, |a, &l| a.checked_add(l))
        .ok_or_else(|| BridgeError::invalid("concat: result too large"))?;
    let mut shape = first.shape.to_vec();
    shape[d] = total;
    element_count(&shape)?;
    let (outer, _, inner) = split_at_dim(first.shape, d);
    Ok(Plan {
        dtype: first.dtype,
        shape,
        work: if operands.len() == 1 {
            Work::Alias
        } else {
            Work::Kernel(Kernel::Concat {
                elem_size: first.dtype.size(),
                outer,
                lens,
                inner,
            })
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty operand may have huge other dimensions: planning it must
    /// not overflow (the `op_plan` fuzz target's first find).
    #[test]
    fn empty_operands_with_huge_dimensions_plan_without_overflow() {
        let huge = [0, usize::MAX, usize::MAX];
        let operands = [
            Operand {
                dtype: DType::F32,
                shape: &huge,
            },
            Operand {
                dtype: DType::F32,
                shape: &huge,
            },
        ];
        // Refused, not overflowed.
        for (op, count) in [
            (Op::Binary(BinaryOp::Add), 2),
            (Op::Matmul, 2),
            (Op::Unary(UnaryOp::Relu), 1),
            (Op::Softmax { dim: 1 }, 1),
        ] {
            let err = op.plan(&operands[..count]).unwrap_err();
            assert!(err.message.contains("zero dimension"), "{err}");
        }
        assert_eq!(contiguous_strides(&huge), [usize::MAX, usize::MAX, 1]);
        // Empty tensors of sane shapes are fine.
        assert_eq!(element_count(&[0, 3, 4]).unwrap(), 0);
        assert_eq!(element_count(&[3, 0]).unwrap(), 0);
    }

    /// A batched matmul with an empty output plans in constant time,
    /// however many matrices its batch has (the fuzz target's timeout).
    #[test]
    fn empty_batched_matmul_plans_without_per_matrix_work() {
        let batch = 1 << 30;
        let (lhs, rhs) = ([1, 0, 1], [batch, 1, 1]);
        let plan = Op::Matmul
            .plan(&[
                Operand {
                    dtype: DType::F32,
                    shape: &lhs,
                },
                Operand {
                    dtype: DType::F32,
                    shape: &rhs,
                },
            ])
            .unwrap();
        assert_eq!(plan.shape, [batch, 0, 1]);
        assert_eq!(plan.work, Work::Empty);
    }

    /// Pairwise products of more matrices than the limit are refused, not
    /// planned with an offset per matrix (the fuzz target's second find).
    #[test]
    fn a_broadcast_matmul_batch_is_bounded() {
        let f32_operand = |shape| Operand {
            dtype: DType::F32,
            shape,
        };
        let (lhs, rhs) = ([3, 1, 1, 1], [1, 1, 1, 100_860_671, 1, 1]);
        let error = Op::Matmul
            .plan(&[f32_operand(&lhs), f32_operand(&rhs)])
            .unwrap_err();
        assert!(error.message.contains("batch of 302582013"), "{error}");
        // At the limit it plans; a shared right side plans whatever the
        // batch.
        let (lhs, rhs) = ([MAX_MATMUL_BATCH, 1, 2], [MAX_MATMUL_BATCH, 2, 1]);
        assert!(
            Op::Matmul
                .plan(&[f32_operand(&lhs), f32_operand(&rhs)])
                .is_ok()
        );
        let (lhs, rhs) = ([MAX_MATMUL_BATCH * 4, 1, 2], [2, 1]);
        assert!(
            Op::Matmul
                .plan(&[f32_operand(&lhs), f32_operand(&rhs)])
                .is_ok()
        );
    }
}
