//! Arithmetic kernels (unary, affine, binary, matmul, reductions, softmax,
//! norms) in every float dtype each backend computes in, against the f64
//! references on the values the device really got.

use gust_gpu_bridge::{BackendKind, BinaryOp, DType, Kernel, ReduceOp, UnaryOp};

use super::{Runner, assert_close, cuda, decode, encode, float_dtypes, on_every_backend};
use crate::reference::{self as r, Nd};

fn unary_ref(op: UnaryOp) -> fn(f64) -> f64 {
    match op {
        UnaryOp::Relu => |x| x.max(0.0),
        UnaryOp::Gelu => r::gelu,
        UnaryOp::Silu => |x| x / (1.0 + (-x).exp()),
        UnaryOp::Tanh => f64::tanh,
        UnaryOp::Exp => f64::exp,
    }
}

fn binary_ref(op: BinaryOp) -> fn(f64, f64) -> f64 {
    match op {
        BinaryOp::Add => |a, b| a + b,
        BinaryOp::Sub => |a, b| a - b,
        BinaryOp::Mul => |a, b| a * b,
        BinaryOp::Div => |a, b| a / b,
    }
}

/// `Kernel::Unary` of `op` on `values` stored as `dtype`, and the values
/// the device got.
fn unary(dev: &mut dyn Runner, op: UnaryOp, dtype: DType, values: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (bytes, x) = encode(dtype, values);
    let len = x.len();
    let kernel = Kernel::Unary { op, dtype, len };
    let out = decode(dtype, &dev.run(&kernel, &[&bytes], len * dtype.size()));
    (out, x)
}

#[test]
fn unary_and_affine_match_reference() {
    on_every_backend("unary_and_affine_match_reference", |dev, rng| {
        let name = dev.description().name;
        for dtype in float_dtypes(dev) {
            for len in [1usize, 7, 1000, 1031, 70_001] {
                let values = rng.values(len, -6.0, 6.0);
                for op in UnaryOp::ALL {
                    let (out, x) = unary(dev, op, dtype, &values);
                    let reference: Vec<f64> = x.iter().map(|&v| unary_ref(op)(v)).collect();
                    let what = format!("{op:?} {dtype} x{len} on {name} (seed {})", rng.seed);
                    assert_close(&what, dtype, &out, &reference);
                }
                let (bytes, x) = encode(dtype, &values);
                for (scale, offset) in [(-1.75f32, 0.3f32), (-1.5, 0.25)] {
                    let kernel = Kernel::Affine {
                        dtype,
                        len,
                        scale,
                        offset,
                    };
                    let out = decode(dtype, &dev.run(&kernel, &[&bytes], len * dtype.size()));
                    let reference: Vec<f64> = x
                        .iter()
                        .map(|&v| v * f64::from(scale) + f64::from(offset))
                        .collect();
                    let what = format!("affine {dtype} x{len} on {name} (seed {})", rng.seed);
                    assert_close(&what, dtype, &out, &reference);
                    // WGSL leaves contracting `x * scale + offset` into an
                    // FMA to the implementation; the others promise one.
                    if dtype == DType::F32 && dev.description().kind != BackendKind::Wgpu {
                        // Bit for bit what the CPU backend computes (one FMA).
                        let expected: Vec<f64> = x
                            .iter()
                            .map(|&v| f64::from((v as f32).mul_add(scale, offset)))
                            .collect();
                        assert_eq!(out, expected, "affine f32 is one fused multiply-add");
                    }
                }
            }
            // Values near zero, where relative accuracy is hardest.
            let narrow = rng.values(257, -0.01, 0.01);
            for op in UnaryOp::ALL {
                let (out, x) = unary(dev, op, dtype, &narrow);
                let reference: Vec<f64> = x.iter().map(|&v| unary_ref(op)(v)).collect();
                let what = format!("{op:?} {dtype} near zero on {name} (seed {})", rng.seed);
                assert_close(&what, dtype, &out, &reference);
            }
        }
        // Large arguments must saturate, not turn into NaN.
        let big = [-100.0, -30.0, 30.0, 100.0];
        let (out, _) = unary(dev, UnaryOp::Tanh, DType::F32, &big);
        assert_eq!(out, [-1.0, -1.0, 1.0, 1.0], "tanh saturates on {name}");
        let (out, _) = unary(dev, UnaryOp::Gelu, DType::F32, &big);
        if dev.description().kind == BackendKind::Wgpu {
            assert_eq!(out, [-0.0, -0.0, 30.0, 100.0], "gelu saturates on {name}");
        } else {
            // The cpu backend's erfc leaves a value far below f32's normal
            // range in the left tail: what `ops.rs` allows there.
            for (&v, &g) in big.iter().zip(&out) {
                let expected = r::gelu(v);
                let error = (g - expected).abs();
                assert!(
                    error <= 5e-5 * expected.abs() || error <= 1e-30,
                    "gelu({v}) = {g} on {name}, expected {expected}"
                );
            }
        }
    });
}

/// Strides of an operand of `shape` broadcast to `out` (same rank).
fn broadcast_strides(out: &[usize], shape: &[usize]) -> Vec<usize> {
    let strides = contiguous_strides(shape);
    out.iter()
        .zip(shape)
        .zip(strides)
        .map(|((&o, &s), st)| if s == 1 && o != 1 { 0 } else { st })
        .collect()
}

pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Element offsets of every multi-index of `shape`, in row-major order.
pub(crate) fn offsets(shape: &[usize], strides: &[usize]) -> Vec<usize> {
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

/// Elements an operand with these strides must hold (0 if empty).
fn extent(shape: &[usize], strides: &[usize]) -> usize {
    offsets(shape, strides)
        .into_iter()
        .max()
        .map_or(0, |m| m + 1)
}

/// Output shape, lhs strides and rhs strides of every binary case:
/// broadcasting, transposed (raw-stride) operands, rank 8, and a large one.
fn binary_cases() -> Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    let shaped: Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> = vec![
        (vec![5], vec![5], vec![5]),
        (vec![7, 13], vec![7, 13], vec![7, 13]),
        (vec![3, 4, 5], vec![3, 4, 5], vec![3, 4, 5]),
        (vec![3, 4, 5], vec![3, 4, 5], vec![1, 4, 1]),
        (vec![3, 4, 5], vec![3, 1, 5], vec![1, 1, 1]),
        (vec![1], vec![1], vec![1]),
        (
            vec![2, 1, 3, 2, 1, 2, 3, 2],
            vec![2, 1, 3, 2, 1, 2, 3, 2],
            vec![1, 1, 3, 1, 1, 2, 1, 2],
        ),
        (
            vec![2, 2, 3, 2, 2, 2, 3, 2],
            vec![1, 2, 1, 2, 1, 2, 1, 2],
            vec![2, 1, 3, 1, 2, 1, 3, 1],
        ),
        (vec![300, 1000], vec![300, 1000], vec![1, 1000]),
    ];
    let mut cases: Vec<_> = shaped
        .into_iter()
        .map(|(out, l, r)| {
            (
                broadcast_strides(&out, &l),
                broadcast_strides(&out, &r),
                out,
            )
        })
        .map(|(ls, rs, out)| (out, ls, rs))
        .collect();
    cases.extend([
        (vec![4, 6], vec![1, 4], vec![6, 1]),
        (vec![7, 5, 3], vec![1, 21, 7], vec![0, 3, 1]),
        (vec![3, 4, 5], contiguous_strides(&[3, 4, 5]), vec![0, 1, 0]),
        (vec![2, 3], vec![0, 0], contiguous_strides(&[2, 3])),
        // lhs is a transposed [3, 2] view.
        (vec![2, 3], vec![1, 2], vec![3, 1]),
        (vec![1], vec![0], vec![0]),
        (
            vec![2, 1, 3, 1, 2, 2, 1, 3],
            contiguous_strides(&[2, 1, 3, 1, 2, 2, 1, 3]),
            vec![0, 0, 2, 0, 1, 0, 0, 0],
        ),
    ]);
    cases
}

#[test]
fn binary_broadcasting_matches_reference() {
    on_every_backend("binary_broadcasting_matches_reference", |dev, rng| {
        let name = dev.description().name;
        for dtype in float_dtypes(dev) {
            for (out_shape, lhs_strides, rhs_strides) in binary_cases() {
                let (ln, rn) = (
                    extent(&out_shape, &lhs_strides),
                    extent(&out_shape, &rhs_strides),
                );
                let (lb, lhs) = encode(dtype, &rng.values(ln, -3.0, 3.0));
                // Away from zero so that division stays well conditioned.
                let rv: Vec<f64> = (0..rn)
                    .map(|_| rng.uniform(0.5, 2.0) * if rng.below(2) == 0 { -1.0 } else { 1.0 })
                    .collect();
                let (rb, rhs) = encode(dtype, &rv);
                let n: usize = out_shape.iter().product();
                let lo = offsets(&out_shape, &lhs_strides);
                let ro = offsets(&out_shape, &rhs_strides);
                for op in BinaryOp::ALL {
                    let kernel = Kernel::Binary {
                        op,
                        dtype,
                        out_shape: out_shape.clone(),
                        lhs_strides: lhs_strides.clone(),
                        rhs_strides: rhs_strides.clone(),
                    };
                    let out = decode(dtype, &dev.run(&kernel, &[&lb, &rb], n * dtype.size()));
                    let reference: Vec<f64> = (0..n)
                        .map(|i| binary_ref(op)(lhs[lo[i]], rhs[ro[i]]))
                        .collect();
                    let what = format!(
                        "{op:?} {dtype} {out_shape:?} {lhs_strides:?} {rhs_strides:?} on {name} (seed {})",
                        rng.seed
                    );
                    assert_close(&what, dtype, &out, &reference);
                }
            }
        }
        // IEEE division by zero.
        let kernel = Kernel::Binary {
            op: BinaryOp::Div,
            dtype: DType::F32,
            out_shape: vec![3],
            lhs_strides: vec![1],
            rhs_strides: vec![0],
        };
        let lhs = gust_gpu_bridge::dtype::f32_to_bytes(&[1.0, -1.0, 0.0]);
        let rhs = gust_gpu_bridge::dtype::f32_to_bytes(&[0.0]);
        let out = decode(DType::F32, &dev.run(&kernel, &[&lhs, &rhs], 12));
        assert_eq!(out[..2], [f64::INFINITY, f64::NEG_INFINITY], "on {name}");
        assert!(out[2].is_nan(), "0/0 on {name}");
    });
}

/// `out[b] = lhs[lhs_offsets[b]..][m×k] × rhs[rhs_offsets[b]..][k×n]`.
fn matmul_ref(
    lhs: &[f64],
    rhs: &[f64],
    (m, k, n): (usize, usize, usize),
    lhs_offsets: &[usize],
    rhs_offsets: &[usize],
) -> Vec<f64> {
    let mut out = vec![0.0; lhs_offsets.len() * m * n];
    for (b, (&lo, &ro)) in lhs_offsets.iter().zip(rhs_offsets).enumerate() {
        let a = Nd::new(&[m, k], lhs[lo..lo + m * k].to_vec());
        let c = Nd::new(&[k, n], rhs[ro..ro + k * n].to_vec());
        out[b * m * n..(b + 1) * m * n].copy_from_slice(&r::matmul(&a, &c).data);
    }
    out
}

#[test]
fn matmul_batched_at_any_offsets_matches_reference() {
    let (m, k, n) = (33, 17, 65);
    let (mk, kn) = (m * k, k * n);
    type Case = (usize, usize, usize, Vec<usize>, Vec<usize>);
    let cases: Vec<Case> = vec![
        (1, 1, 1, vec![0], vec![0]),
        (3, 5, 7, vec![0], vec![0]),
        (64, 33, 17, vec![5], vec![3]),
        (64, 64, 64, vec![0], vec![0]),
        (130, 3, 1, vec![0], vec![0]),
        (4, 6, 5, vec![0, 24, 48], vec![0, 30, 60]),
        (4, 6, 5, vec![0, 24, 48, 72], vec![7, 7, 7, 7]),
        (4, 6, 5, vec![48, 0, 24], vec![30, 60, 0]),
        (m, k, n, vec![0, mk, 2 * mk], vec![0, 0, 0]),
        (m, k, n, vec![2 * mk, 0, mk], vec![kn, 0, kn]),
        (m, k, n, vec![mk, 2 * mk], vec![0, kn]),
        (128, 256, 96, vec![0, 128 * 256], vec![0, 256 * 96]),
        (3, 0, 4, vec![0, 0], vec![0, 0]),
        (2, 0, 3, vec![0], vec![0]),
    ];
    on_every_backend(
        "matmul_batched_at_any_offsets_matches_reference",
        |dev, rng| {
            let name = dev.description().name;
            for dtype in float_dtypes(dev) {
                for (m, k, n, lhs_offsets, rhs_offsets) in &cases {
                    let (m, k, n) = (*m, *k, *n);
                    let ln = lhs_offsets.iter().max().unwrap() + m * k;
                    let rn = rhs_offsets.iter().max().unwrap() + k * n;
                    let (lb, lhs) =
                        encode(dtype, &rng.values(if k == 0 { 0 } else { ln }, -1.0, 1.0));
                    let (rb, rhs) =
                        encode(dtype, &rng.values(if k == 0 { 0 } else { rn }, -1.0, 1.0));
                    let batch = lhs_offsets.len();
                    let kernel = Kernel::Matmul {
                        dtype,
                        m,
                        k,
                        n,
                        lhs_offsets: lhs_offsets.clone(),
                        rhs_offsets: rhs_offsets.clone(),
                    };
                    let out_bytes = batch * m * n * dtype.size();
                    let out = decode(dtype, &dev.run(&kernel, &[&lb, &rb], out_bytes));
                    if k == 0 {
                        assert!(out.iter().all(|&v| v == 0.0), "k = 0 gives zeros on {name}");
                    } else {
                        let reference = matmul_ref(&lhs, &rhs, (m, k, n), lhs_offsets, rhs_offsets);
                        let what = format!(
                            "matmul {dtype} {m}x{k}x{n} {lhs_offsets:?} {rhs_offsets:?} on {name} (seed {})",
                            rng.seed
                        );
                        assert_close(&what, dtype, &out, &reference);
                    }
                }
            }
        },
    );
}

/// Shapes `[outer, len, inner]` that hit both layouts of every row kernel
/// (a block or workgroup per row, a thread per row), rows on both sides of
/// the workgroup threshold, and both sides of the grid caps.
const ROW_SHAPES: [(usize, usize, usize); 12] = [
    (1, 1, 1),
    (3, 100, 1),
    (2, 5, 7),
    (3, 5, 7),
    (4, 3, 4096),
    (1, 5000, 1),
    (20_000, 3, 1),
    (2, 700, 33),
    (3, 40, 3000),
    (70_000, 64, 1),
    (2, 300, 3),
    (1, 63, 2),
];

/// `f` over the middle axis of `x` viewed as `[outer, len, inner]`.
fn over_rows(x: &[f64], shape: (usize, usize, usize), f: fn(&[f64]) -> f64) -> Vec<f64> {
    let (outer, len, inner) = shape;
    r::reduce(&Nd::new(&[outer, len, inner], x.to_vec()), 1, false, f).data
}

#[test]
fn reductions_match_reference() {
    on_every_backend("reductions_match_reference", |dev, rng| {
        let name = dev.description().name;
        // wgpu sums rows in f32 (the others in f64).
        let f32_sums = dev.description().kind == BackendKind::Wgpu;
        for dtype in float_dtypes(dev) {
            for shape @ (outer, len, inner) in ROW_SHAPES.into_iter().chain([(4, 64, 1)]) {
                let total = outer * len * inner;
                let random = encode(dtype, &rng.values(total, -2.0, 2.0));
                // Few distinct values: many ties, so "first maximum"
                // matters; small integers, and quarter steps.
                let ties = encode(
                    dtype,
                    &(0..total).map(|_| rng.below(4) as f64).collect::<Vec<_>>(),
                );
                let quarters = encode(
                    dtype,
                    &(0..total)
                        .map(|_| (rng.uniform(-2.0, 2.0) * 4.0).round() / 4.0)
                        .collect::<Vec<_>>(),
                );
                for op in ReduceOp::ALL {
                    let kernel = Kernel::Reduce {
                        op,
                        dtype,
                        outer,
                        len,
                        inner,
                    };
                    let what = format!("{op:?} {dtype} {shape:?} on {name} (seed {})", rng.seed);
                    for (bytes, x) in [&random, &ties, &quarters] {
                        match op {
                            ReduceOp::ArgMax => {
                                let out = dev.run(&kernel, &[bytes], outer * inner * 4);
                                let out = decode(DType::U32, &out);
                                assert_eq!(out, over_rows(x, shape, r::argmax_nan), "{what}");
                            }
                            // A maximum rounds nothing: exact.
                            ReduceOp::Max => {
                                let out_bytes = outer * inner * dtype.size();
                                let out = decode(dtype, &dev.run(&kernel, &[bytes], out_bytes));
                                assert_eq!(out, over_rows(x, shape, r::max_nan), "{what}");
                            }
                            ReduceOp::Sum | ReduceOp::Mean => {
                                let out_bytes = outer * inner * dtype.size();
                                let out = decode(dtype, &dev.run(&kernel, &[bytes], out_bytes));
                                let f: fn(&[f64]) -> f64 = if op == ReduceOp::Sum {
                                    |l| l.iter().sum()
                                } else {
                                    |l| l.iter().sum::<f64>() / l.len() as f64
                                };
                                let reference = over_rows(x, shape, f);
                                if f32_sums && sums_cancel(&out, &reference, x, shape, f) {
                                    continue;
                                }
                                assert_close(&what, dtype, &out, &reference);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// For a backend that sums in f32: whether `out` is within 1e-5 of the
/// reference relative to the sums of magnitudes, the bound f32 summation
/// can promise when random signs cancel (a few outputs near zero make the
/// plain relative error meaningless). The plain bound is still checked
/// when this fails.
fn sums_cancel(
    out: &[f64],
    reference: &[f64],
    x: &[f64],
    shape: (usize, usize, usize),
    f: fn(&[f64]) -> f64,
) -> bool {
    let magnitudes: Vec<f64> = x.iter().map(|v| v.abs()).collect();
    let scale = over_rows(&magnitudes, shape, f);
    let norm = |v: &[f64]| v.iter().map(|e| e * e).sum::<f64>().sqrt();
    let diff: Vec<f64> = out.iter().zip(reference).map(|(o, r)| o - r).collect();
    !out.iter().any(|v| v.is_nan()) && norm(&diff) <= 1e-5 * norm(&scale)
}

#[test]
fn max_and_argmax_see_nan() {
    on_every_backend("max_and_argmax_see_nan", |dev, rng| {
        let name = dev.description().name;
        let run = |dev: &mut dyn Runner, op, x: &[f64], shape: (usize, usize, usize)| {
            let (outer, len, inner) = shape;
            let kernel = Kernel::Reduce {
                op,
                dtype: DType::F32,
                outer,
                len,
                inner,
            };
            let out_dtype = if op == ReduceOp::ArgMax {
                DType::U32
            } else {
                DType::F32
            };
            let bytes = encode(DType::F32, x).0;
            decode(out_dtype, &dev.run(&kernel, &[&bytes], outer * inner * 4))
        };
        for len in [5usize, 100] {
            let mut x = vec![1.0; len];
            x[len / 2] = 7.0;
            x[3] = f64::NAN;
            assert!(
                run(&mut *dev, ReduceOp::Max, &x, (1, len, 1))[0].is_nan(),
                "on {name}"
            );
            assert_eq!(
                run(&mut *dev, ReduceOp::ArgMax, &x, (1, len, 1)),
                [3.0],
                "on {name}"
            );
        }
        // NaN: max is NaN, argmax points at the first NaN.
        for shape @ (outer, len, inner) in [(1, 300, 1), (2, 3, 9000)] {
            let mut x = rng.values(outer * len * inner, -1.0, 1.0);
            let total = x.len();
            x[inner * 7 % total] = f64::NAN;
            x[(inner * (len - 1) + 5) % total] = f64::NAN;
            let x = encode(DType::F32, &x).1;
            for (op, f) in [
                (ReduceOp::Max, r::max_nan as fn(&[f64]) -> f64),
                (ReduceOp::ArgMax, r::argmax_nan),
            ] {
                let out = run(&mut *dev, op, &x, shape);
                let reference = over_rows(&x, shape, f);
                for (i, (o, r)) in out.iter().zip(&reference).enumerate() {
                    assert!(
                        o == r || (o.is_nan() && r.is_nan()),
                        "{op:?} NaN {shape:?} [{i}] on {name}: {o} vs {r}"
                    );
                }
            }
        }
    });
}

#[test]
fn softmax_matches_reference() {
    on_every_backend("softmax_matches_reference", |dev, rng| {
        let name = dev.description().name;
        for dtype in float_dtypes(dev) {
            for shape @ (outer, len, inner) in ROW_SHAPES.into_iter().chain([(5, 1, 1), (1, 64, 1)])
            {
                let total = outer * len * inner;
                // Large values: exp would overflow without subtracting the max.
                let shift = if outer % 2 == 0 { 90.0 } else { 0.0 };
                let (bytes, x) = encode(dtype, &rng.values(total, shift - 8.0, shift + 8.0));
                let kernel = Kernel::Softmax {
                    dtype,
                    outer,
                    len,
                    inner,
                };
                let out = decode(dtype, &dev.run(&kernel, &[&bytes], total * dtype.size()));
                let reference = r::softmax(&Nd::new(&[outer, len, inner], x), 1).data;
                let what = format!("softmax {dtype} {shape:?} on {name} (seed {})", rng.seed);
                assert_close(&what, dtype, &out, &reference);
            }
        }
    });
}

#[test]
fn norms_match_reference() {
    on_every_backend("norms_match_reference", |dev, rng| {
        let name = dev.description().name;
        let eps = 1e-5f32;
        for dtype in float_dtypes(dev) {
            for (rows, cols) in [
                (1, 1),
                (2, 1),
                (3, 10),
                (5, 7),
                (4, 64),
                (3, 500),
                (5, 1000),
                (2, 5000),
                (300, 64),
                (70_000, 16),
            ] {
                // Odd rows sit away from zero: the variance must not
                // cancel. Far away (100) where the backend accumulates in
                // f64 (cuda); the cpu and wgpu backends sum rows in f32,
                // whose rounding of a mean near 100 alone costs ~1e-5.
                let far = if dev.description().kind == BackendKind::Cuda {
                    100.0
                } else {
                    3.0
                };
                let values: Vec<f64> = (0..rows * cols)
                    .map(|i| rng.uniform(-1.0, 1.0) + if (i / cols) % 2 == 1 { far } else { 0.0 })
                    .collect();
                let (xb, x) = encode(dtype, &values);
                let x = Nd::new(&[rows, cols], x);
                let (wb, w) = encode(dtype, &rng.values(cols, 0.5, 1.5));
                let (bb, b) = encode(dtype, &rng.values(cols, -1.0, 1.0));
                let what = |kind: &str| {
                    format!("{kind} {dtype} {rows}x{cols} on {name} (seed {})", rng.seed)
                };
                for (weight, bias) in [(false, false), (true, false), (false, true), (true, true)] {
                    let kernel = Kernel::LayerNorm {
                        dtype,
                        rows,
                        cols,
                        eps,
                        weight,
                        bias,
                    };
                    let mut inputs: Vec<&[u8]> = vec![&xb];
                    if weight {
                        inputs.push(&wb);
                    }
                    if bias {
                        inputs.push(&bb);
                    }
                    let out = decode(
                        dtype,
                        &dev.run(&kernel, &inputs, rows * cols * dtype.size()),
                    );
                    let (w, b) = (weight.then_some(w.as_slice()), bias.then_some(b.as_slice()));
                    let reference = r::layer_norm(&x, w, b, f64::from(eps)).data;
                    let kind = format!("layer-norm w={weight} b={bias}");
                    assert_close(&what(&kind), dtype, &out, &reference);
                }
                for weight in [false, true] {
                    let kernel = Kernel::RmsNorm {
                        dtype,
                        rows,
                        cols,
                        eps,
                        weight,
                    };
                    let mut inputs: Vec<&[u8]> = vec![&xb];
                    if weight {
                        inputs.push(&wb);
                    }
                    let out = decode(
                        dtype,
                        &dev.run(&kernel, &inputs, rows * cols * dtype.size()),
                    );
                    let w = weight.then_some(w.as_slice());
                    let reference = r::rms_norm(&x, w, f64::from(eps)).data;
                    let kind = format!("rms-norm w={weight}");
                    assert_close(&what(&kind), dtype, &out, &reference);
                }
            }
        }
    });
}

#[test]
fn more_than_65535_workgroups() {
    on_every_backend("more_than_65535_workgroups", |dev, _| {
        let name = dev.description().name;
        // 65537 workgroups of 256: needs the second grid dimension.
        let len = 256 * 65536 + 5;
        let x: Vec<f32> = (0..len).map(|i| (i % 1000) as f32).collect();
        let kernel = Kernel::Affine {
            dtype: DType::F32,
            len,
            scale: 2.0,
            offset: 1.0,
        };
        let bytes = gust_gpu_bridge::dtype::f32_to_bytes(&x);
        let got = decode(DType::F32, &dev.run(&kernel, &[&bytes], len * 4));
        let bad = got
            .iter()
            .enumerate()
            .find(|&(i, &v)| v != f64::from((i % 1000) as f32 * 2.0 + 1.0));
        assert_eq!(bad, None, "affine on {name}");

        // 70000 rows of one workgroup each.
        let (rows, len) = (70_000, 64);
        let x: Vec<f32> = (0..rows * len).map(|i| (i % 7) as f32).collect();
        let kernel = Kernel::Reduce {
            op: ReduceOp::Sum,
            dtype: DType::F32,
            outer: rows,
            len,
            inner: 1,
        };
        let bytes = gust_gpu_bridge::dtype::f32_to_bytes(&x);
        let got = decode(DType::F32, &dev.run(&kernel, &[&bytes], rows * 4));
        let bad = got.iter().enumerate().find(|&(r, &v)| {
            let want: usize = (r * len..(r + 1) * len).map(|i| i % 7).sum();
            v != want as f64
        });
        assert_eq!(bad, None, "sum on {name}");
    });
}

#[test]
fn large_launches_cover_every_element() {
    // More elements than one CUDA launch has threads (65536 x 256): the
    // grid-stride loops must reach the tail.
    let Some(mut dev) = cuda("large_launches_cover_every_element") else {
        return;
    };
    let dev: &mut dyn Runner = &mut *dev;
    let mut rng = crate::harness::Rng::fresh();
    let seed = rng.seed;
    let len = 20_000_003;
    let (bytes, x) = encode(DType::F32, &rng.values(len, -3.0, 3.0));
    let (out, _) = unary(dev, UnaryOp::Exp, DType::F32, &x);
    let reference: Vec<f64> = x.iter().map(|v| v.exp()).collect();
    assert_close(
        &format!("exp x20M (seed {seed})"),
        DType::F32,
        &out,
        &reference,
    );

    let (outer, rlen, inner) = (1, 2, 10_000_001);
    let kernel = Kernel::Reduce {
        op: ReduceOp::Sum,
        dtype: DType::F32,
        outer,
        len: rlen,
        inner,
    };
    let n = outer * rlen * inner;
    let out = decode(DType::F32, &dev.run(&kernel, &[&bytes[..n * 4]], inner * 4));
    let reference = over_rows(&x[..n], (outer, rlen, inner), |l| l.iter().sum());
    let what = format!("sum over 2 of 10M columns (seed {seed})");
    assert_close(&what, DType::F32, &out, &reference);

    let (n, total) = (4_500, 4_500 * 4_000);
    let kernel = Kernel::Permute {
        elem_size: 4,
        in_shape: vec![n, total / n],
        perm: vec![1, 0],
    };
    let out = dev.run(&kernel, &[&bytes[..total * 4]], total * 4);
    let expected: Vec<u8> = offsets(&[total / n, n], &[1, total / n])
        .iter()
        .flat_map(|&i| bytes[i * 4..i * 4 + 4].iter().copied())
        .collect();
    assert!(out == expected, "transpose of 4500x4000 (seed {seed})");
}
