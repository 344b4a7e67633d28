//! Every op on every device against the float64 reference, on fresh random
//! inputs, with poisoned outputs (see `harness::devices`).

use gust_gpu_bridge::{BinaryOp, DType, Device, Op, ReduceOp, UnaryOp, dtype};

use crate::harness::{Rng, account, assert_close, block_on, devices, read_f64, run, upload_f32};
use crate::reference::{self as r, Nd};

fn on_every_device(test: impl Fn(&Device, &mut Rng)) {
    for device in devices() {
        let mut rng = Rng::fresh();
        test(device, &mut rng);
    }
}

fn check_f32_op(
    device: &Device,
    rng: &mut Rng,
    op: Op,
    shapes: &[&[usize]],
    reference: impl Fn(&[Nd]) -> Nd,
) {
    check_f32_op_with(device, rng, op, shapes, |_, v| v, reference);
}

/// As `check_f32_op`, with `prepare(operand index, value)` shaping the
/// random inputs (to keep divisors away from zero, say).
fn check_f32_op_with(
    device: &Device,
    rng: &mut Rng,
    op: Op,
    shapes: &[&[usize]],
    prepare: impl Fn(usize, f32) -> f32,
    reference: impl Fn(&[Nd]) -> Nd,
) {
    let acct = account();
    let inputs: Vec<(Vec<usize>, Vec<f32>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.to_vec(),
                rng.f32s(s.iter().product())
                    .into_iter()
                    .map(|v| prepare(i, v))
                    .collect(),
            )
        })
        .collect();
    let tensors: Vec<_> = inputs
        .iter()
        .map(|(s, v)| upload_f32(device, s, v, &acct))
        .collect();
    let refs: Vec<_> = tensors.iter().collect();
    let out = run(device, op.clone(), &refs, &acct);
    let expected = reference(
        &inputs
            .iter()
            .map(|(s, v)| Nd::from_f32(s, v))
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        out.shape(),
        expected.shape.as_slice(),
        "{} shape",
        op.name()
    );
    let got = read_f64(device, &out, &acct);
    assert_close(
        &format!("{} {shapes:?}", op.name()),
        device,
        &got,
        &expected.data,
        rng.seed,
    );
}

#[test]
fn matmul_matches_reference() {
    on_every_device(|device, rng| {
        let cases: &[(&[usize], &[usize])] = &[
            (&[1, 1], &[1, 1]),
            (&[33, 17], &[17, 65]),
            (&[64, 64], &[64, 64]),
            (&[3, 5, 7], &[3, 7, 4]),
            (&[2, 3, 5, 7], &[7, 4]),
            (&[4, 1, 6, 8], &[3, 8, 5]),
            (&[128, 96], &[96, 80]),
            // Few rows and enough work to run in parallel: the cpu backend
            // splits the columns across threads (blocks of 112 and 88
            // here), per batch entry in the second.
            (&[7, 300], &[300, 200]),
            (&[2, 9, 256], &[2, 256, 130]),
        ];
        for (a, b) in cases {
            check_f32_op(device, rng, Op::Matmul, &[a, b], |x| {
                r::matmul(&x[0], &x[1])
            });
        }
    });
}

#[test]
fn binary_ops_broadcast_like_numpy() {
    let ops: [(BinaryOp, fn(f64, f64) -> f64); 4] = [
        (BinaryOp::Add, |a, b| a + b),
        (BinaryOp::Sub, |a, b| a - b),
        (BinaryOp::Mul, |a, b| a * b),
        (BinaryOp::Div, |a, b| a / b),
    ];
    on_every_device(|device, rng| {
        let cases: &[(&[usize], &[usize])] = &[
            (&[37], &[37]),
            (&[4, 5], &[5]),
            (&[4, 1], &[1, 6]),
            (&[2, 3, 4], &[3, 1]),
            (&[], &[3, 2]),
            (&[2, 1, 3, 1, 2], &[4, 1, 5, 1]),
        ];
        for (op, f) in ops {
            for (a, b) in cases {
                // Keep divisors away from zero so the quotient is tame.
                let away_from_zero = |i: usize, v: f32| {
                    if i == 1 && op == BinaryOp::Div {
                        v.signum() * (v.abs() + 0.5)
                    } else {
                        v
                    }
                };
                check_f32_op_with(device, rng, Op::Binary(op), &[a, b], away_from_zero, |x| {
                    r::binary(&x[0], &x[1], f)
                });
            }
        }
    });
}

/// GELU element by element over both tails, where `1 + erf` cancels (large
/// negative inputs) and where it saturates. Relative error within 1e-5 for
/// |x| <= 4; further out the tail is `exp(-x²/2)`, and f32 rounding of the
/// exponent alone (about x²/2 · 2^-24) allows a few 1e-5, so 5e-5 there;
/// where the exact value is below f32's normal range, an absolute error
/// far below anything a model could notice.
#[test]
fn gelu_is_accurate_element_by_element_in_both_tails() {
    let values: Vec<f32> = (-3000..=3000).map(|i| i as f32 / 100.0).collect();
    on_every_device(|device, _| {
        let acct = account();
        let x = upload_f32(device, &[values.len()], &values, &acct);
        let out = run(device, Op::Unary(UnaryOp::Gelu), &[&x], &acct);
        let got = read_f64(device, &out, &acct);
        for (&v, g) in values.iter().zip(got) {
            let expected = r::gelu(f64::from(v));
            let error = (g - expected).abs();
            let tolerance = if v.abs() <= 4.0 { 1e-5 } else { 5e-5 };
            assert!(
                error <= tolerance * expected.abs() || error <= 1e-30,
                "{}: gelu({v}) = {g}, expected {expected}",
                device.description().name
            );
        }
    });
}

#[test]
fn unary_ops_and_affine_match_reference() {
    let ops: [(UnaryOp, fn(f64) -> f64); 5] = [
        (UnaryOp::Relu, |v| v.max(0.0)),
        (UnaryOp::Gelu, r::gelu),
        (UnaryOp::Silu, |v| v / (1.0 + (-v).exp())),
        (UnaryOp::Tanh, f64::tanh),
        (UnaryOp::Exp, f64::exp),
    ];
    on_every_device(|device, rng| {
        for (op, f) in ops {
            for shape in [&[1][..], &[1000], &[7, 9, 3]] {
                check_f32_op(device, rng, Op::Unary(op), &[shape], |x| r::map(&x[0], f));
            }
        }
        check_f32_op(
            device,
            rng,
            Op::Affine {
                scale: -1.5,
                offset: 0.25,
            },
            &[&[5, 11]],
            |x| r::map(&x[0], |v| v * -1.5 + 0.25),
        );
    });
}

#[test]
fn softmax_over_any_dim() {
    on_every_device(|device, rng| {
        for (shape, dim) in [
            (&[10][..], 0),
            (&[4, 33], -1),
            (&[3, 5, 6], 1),
            (&[3, 5, 6], 0),
        ] {
            check_f32_op(device, rng, Op::Softmax { dim }, &[shape], |x| {
                r::softmax(&x[0], dim.rem_euclid(shape.len() as i32) as usize)
            });
        }
    });
}

#[test]
fn fused_attention_within_packed_sequences() {
    on_every_device(|device, rng| {
        // Ragged sequences (one empty, one of a single token), head sizes
        // with and without a tail past whole vector registers.
        for (heads, head_dim, lengths) in [
            (2usize, 16usize, vec![5u32, 1, 0, 17, 3]),
            (3, 20, vec![9]),
            (1, 7, vec![2, 40]),
        ] {
            let tokens: u32 = lengths.iter().sum();
            let shape = [tokens as usize, 3 * heads * head_dim];
            let op = Op::Attention {
                heads: heads as u32,
                lengths: lengths.clone(),
            };
            if !device.description().fused_attention {
                let acct = account();
                let values = rng.f32s(shape.iter().product());
                let qkv = upload_f32(device, &shape, &values, &acct);
                let err = block_on(async {
                    let out = device.run(&op, &[&qkv], &acct).await?;
                    device.read(&out, &acct).await
                })
                .expect_err("a backend without fused attention refuses it");
                assert_eq!(err.code, gust_gpu_bridge::ErrorCode::Unsupported, "{err}");
                continue;
            }
            let lengths: Vec<usize> = lengths.iter().map(|&l| l as usize).collect();
            check_f32_op(device, rng, op, &[&shape], |x| {
                r::attention(&x[0], heads, &lengths)
            });
        }
    });
}

#[test]
fn norms_with_and_without_parameters() {
    on_every_device(|device, rng| {
        let eps = 1e-5;
        for (weight, bias) in [(false, false), (true, false), (true, true), (false, true)] {
            let mut shapes: Vec<&[usize]> = vec![&[6, 48]];
            shapes.extend(std::iter::repeat_n(
                &[48usize][..],
                usize::from(weight) + usize::from(bias),
            ));
            check_f32_op(
                device,
                rng,
                Op::LayerNorm { eps, weight, bias },
                &shapes,
                |x| {
                    let w = weight.then(|| x[1].data.as_slice());
                    let b = bias.then(|| x[if weight { 2 } else { 1 }].data.as_slice());
                    r::layer_norm(&x[0], w, b, f64::from(eps))
                },
            );
        }
        for weight in [false, true] {
            let shapes: Vec<&[usize]> = if weight {
                vec![&[2, 3, 40], &[40]]
            } else {
                vec![&[2, 3, 40]]
            };
            check_f32_op(device, rng, Op::RmsNorm { eps, weight }, &shapes, |x| {
                r::rms_norm(&x[0], weight.then(|| x[1].data.as_slice()), f64::from(eps))
            });
        }
    });
}

#[test]
fn reductions_over_any_dim() {
    on_every_device(|device, rng| {
        for (shape, dim, keep) in [
            (&[50][..], 0i32, false),
            (&[4, 7, 3], 1, true),
            (&[4, 7, 3], -1, false),
            (&[4, 7, 3], 0, false),
        ] {
            let d = dim.rem_euclid(shape.len() as i32) as usize;
            check_f32_op(
                device,
                rng,
                Op::Reduce {
                    op: ReduceOp::Sum,
                    dim,
                    keep_dim: keep,
                },
                &[shape],
                |x| r::reduce(&x[0], d, keep, |l| l.iter().sum()),
            );
            check_f32_op(
                device,
                rng,
                Op::Reduce {
                    op: ReduceOp::Mean,
                    dim,
                    keep_dim: keep,
                },
                &[shape],
                |x| r::reduce(&x[0], d, keep, |l| l.iter().sum::<f64>() / l.len() as f64),
            );
            check_f32_op(
                device,
                rng,
                Op::Reduce {
                    op: ReduceOp::Max,
                    dim,
                    keep_dim: keep,
                },
                &[shape],
                |x| {
                    r::reduce(&x[0], d, keep, |l| {
                        l.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                    })
                },
            );
            // argmax answers u32 indices: compare exactly.
            let acct = account();
            let values = rng.f32s(shape.iter().product());
            let t = upload_f32(device, shape, &values, &acct);
            let out = run(
                device,
                Op::Reduce {
                    op: ReduceOp::ArgMax,
                    dim,
                    keep_dim: keep,
                },
                &[&t],
                &acct,
            );
            assert_eq!(out.dtype(), DType::U32);
            let expected = r::reduce(&Nd::from_f32(shape, &values), d, keep, r::argmax);
            assert_eq!(out.shape(), expected.shape.as_slice());
            assert_eq!(
                read_f64(device, &out, &acct),
                expected.data,
                "argmax on {} (seed {})",
                device.description().name,
                rng.seed
            );
        }
    });
}

#[test]
fn data_movement_is_exact_for_every_dtype() {
    on_every_device(|device, rng| {
        let acct = account();
        for dtype in DType::ALL {
            // Random values representable exactly in every dtype: small integers.
            let shape = [3usize, 5, 7];
            let n: usize = shape.iter().product();
            let values: Vec<f64> = (0..n).map(|_| rng.below(64) as f64).collect();
            let bytes = encode(dtype, &values);
            let x = block_on(device.upload(dtype, &shape, bytes, &acct)).unwrap();
            let nd = Nd::new(&shape, values.clone());
            let cases: Vec<(Op, Nd)> = vec![
                (
                    Op::Permute {
                        dims: vec![2, 0, 1],
                    },
                    r::permute(&nd, &[2, 0, 1]),
                ),
                (
                    Op::Transpose { dim0: 0, dim1: -1 },
                    r::permute(&nd, &[2, 1, 0]),
                ),
                (
                    Op::Slice {
                        dim: 1,
                        start: 1,
                        len: 3,
                    },
                    r::slice(&nd, 1, 1, 3),
                ),
                (
                    Op::Slice {
                        dim: -1,
                        start: 6,
                        len: 1,
                    },
                    r::slice(&nd, 2, 6, 1),
                ),
                (
                    Op::Reshape { shape: vec![5, -1] },
                    Nd::new(&[5, 21], values.clone()),
                ),
            ];
            for (op, expected) in cases {
                let out = run(device, op.clone(), &[&x], &acct);
                assert_eq!(
                    out.shape(),
                    expected.shape.as_slice(),
                    "{} {dtype}",
                    op.name()
                );
                assert_eq!(
                    read_f64(device, &out, &acct),
                    expected.data,
                    "{} {dtype} on {}",
                    op.name(),
                    device.description().name
                );
            }
            let y_values: Vec<f64> = (0..3 * 2 * 7).map(|_| rng.below(64) as f64).collect();
            let y = block_on(device.upload(dtype, &[3, 2, 7], encode(dtype, &y_values), &acct))
                .unwrap();
            let out = run(device, Op::Concat { dim: 1 }, &[&x, &y, &x], &acct);
            let expected = r::concat(&[nd.clone(), Nd::new(&[3, 2, 7], y_values), nd.clone()], 1);
            assert_eq!(out.shape(), expected.shape.as_slice());
            assert_eq!(
                read_f64(device, &out, &acct),
                expected.data,
                "concat {dtype} on {}",
                device.description().name
            );
        }
    });
}

#[test]
fn gather_picks_rows_and_zeroes_out_of_range() {
    on_every_device(|device, rng| {
        let acct = account();
        for (dtype, index_dtype) in [
            (DType::F32, DType::I32),
            (DType::F32, DType::U32),
            (DType::F16, DType::I32),
            (DType::I32, DType::U32),
        ] {
            let table_values: Vec<f64> = (0..10 * 3).map(|_| rng.below(100) as f64).collect();
            let table =
                block_on(device.upload(dtype, &[10, 3], encode(dtype, &table_values), &acct))
                    .unwrap();
            let mut indices: Vec<i64> = (0..7).map(|_| rng.below(10) as i64).collect();
            indices.push(12);
            if index_dtype == DType::I32 {
                indices.push(-1);
            }
            let index_bytes = encode(
                index_dtype,
                &indices.iter().map(|&i| i as f64).collect::<Vec<_>>(),
            );
            let index_shape = [1, indices.len()];
            let idx =
                block_on(device.upload(index_dtype, &index_shape, index_bytes, &acct)).unwrap();
            let out = run(device, Op::Gather, &[&table, &idx], &acct);
            let expected = r::gather(&Nd::new(&[10, 3], table_values), &indices, &index_shape);
            assert_eq!(out.shape(), expected.shape.as_slice());
            assert_eq!(
                read_f64(device, &out, &acct),
                expected.data,
                "gather {dtype}/{index_dtype} on {}",
                device.description().name
            );
        }
    });
}

#[test]
fn cast_between_every_pair_of_dtypes() {
    on_every_device(|device, rng| {
        let acct = account();
        for from in DType::ALL {
            for to in DType::ALL {
                let values: Vec<f64> = (0..33)
                    .map(|_| match from {
                        DType::U32 => rng.below(100_000) as f64,
                        DType::I32 => rng.below(100_000) as f64 - 50_000.0,
                        _ => f64::from(rng.unit() * 300.0),
                    })
                    .collect();
                let bytes = encode(from, &values);
                let stored = dtype::bytes_to_f64(from, &bytes).unwrap();
                let x = block_on(device.upload(from, &[values.len()], bytes, &acct)).unwrap();
                let out = run(device, Op::Cast { to }, &[&x], &acct);
                assert_eq!(out.dtype(), to);
                let expected = dtype::bytes_to_f64(to, &encode(to, &stored)).unwrap();
                assert_eq!(
                    read_f64(device, &out, &acct),
                    expected,
                    "cast {from}→{to} on {}",
                    device.description().name
                );
            }
        }
    });
}

#[test]
fn half_precision_arithmetic_on_backends_that_offer_it() {
    on_every_device(|device, rng| {
        let acct = account();
        let values = rng.f32s(64);
        let x = upload_f32(device, &[8, 8], &values, &acct);
        for half in [DType::F16, DType::BF16] {
            let h = run(device, Op::Cast { to: half }, &[&x], &acct);
            match block_on(device.run(&Op::Matmul, &[&h, &h], &acct)) {
                Ok(product) => {
                    let stored = read_f64(device, &h, &acct);
                    let expected =
                        r::matmul(&Nd::new(&[8, 8], stored.clone()), &Nd::new(&[8, 8], stored));
                    let got = read_f64(device, &product, &acct);
                    // One rounding to half precision per output element.
                    let tolerance = if half == DType::F16 { 1e-3 } else { 8e-3 };
                    let err = crate::harness::relative_error(&got, &expected.data);
                    assert!(
                        err <= tolerance,
                        "{half} matmul on {}: {err:e}",
                        device.description().name
                    );
                }
                Err(e) => {
                    assert_eq!(e.code, gust_gpu_bridge::ErrorCode::Unsupported, "{e}");
                    eprintln!("{} has no {half} matmul: {e}", device.description().name);
                }
            }
        }
    });
}

#[test]
fn a_chain_of_ops_never_reads_back_in_between() {
    // y = softmax(relu(x W + b)) summed over rows, computed in one chain.
    on_every_device(|device, rng| {
        let acct = account();
        let (x, w, b) = (rng.f32s(4 * 16), rng.f32s(16 * 8), rng.f32s(8));
        let tx = upload_f32(device, &[4, 16], &x, &acct);
        let tw = upload_f32(device, &[16, 8], &w, &acct);
        let tb = upload_f32(device, &[8], &b, &acct);
        let h = run(device, Op::Matmul, &[&tx, &tw], &acct);
        let h = run(device, Op::Binary(BinaryOp::Add), &[&h, &tb], &acct);
        let h = run(device, Op::Unary(UnaryOp::Relu), &[&h], &acct);
        let h = run(device, Op::Softmax { dim: -1 }, &[&h], &acct);
        let out = run(
            device,
            Op::Reduce {
                op: ReduceOp::Sum,
                dim: 0,
                keep_dim: false,
            },
            &[&h],
            &acct,
        );
        let xr = Nd::from_f32(&[4, 16], &x);
        let hr = r::matmul(&xr, &Nd::from_f32(&[16, 8], &w));
        let hr = r::binary(&hr, &Nd::from_f32(&[8], &b), |a, b| a + b);
        let hr = r::softmax(&r::map(&hr, |v| v.max(0.0)), 1);
        let expected = r::reduce(&hr, 0, false, |l| l.iter().sum());
        assert_close(
            "chain",
            device,
            &read_f64(device, &out, &acct),
            &expected.data,
            rng.seed,
        );
    });
}

/// Encode `values` (exactly representable, or to be rounded) as `dtype`.
pub(crate) fn encode(dtype: DType, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        match dtype {
            DType::F32 => out.extend((v as f32).to_le_bytes()),
            DType::I32 => out.extend((v as i32).to_le_bytes()),
            DType::U32 => out.extend((v as u32).to_le_bytes()),
            // Test values are exact f32s, and `half` rounds f32 once (its
            // `from_f64` does not).
            DType::F16 => out.extend(half::f16::from_f32(v as f32).to_le_bytes()),
            DType::BF16 => out.extend(half::bf16::from_f32(v as f32).to_le_bytes()),
            quantized => unreachable!("ops tests do not encode {quantized}"),
        }
    }
    out
}

#[test]
fn linear_with_f32_weights_is_x_times_w_transposed() {
    on_every_device(|device, rng| {
        // One row (decoding), a few, and enough for gemm's threads.
        for (x, w) in [
            (&[1usize, 64][..], &[48usize, 64][..]),
            (&[2, 3, 40][..], &[17, 40][..]),
            (&[70, 96][..], &[130, 96][..]),
        ] {
            if !device.description().linear {
                let acct = account();
                let xs = upload_f32(device, x, &rng.f32s(x.iter().product()), &acct);
                let ws = upload_f32(device, w, &rng.f32s(w.iter().product()), &acct);
                let err = block_on(device.run(&Op::Linear, &[&xs, &ws], &acct))
                    .expect_err("a backend without linear refuses it");
                assert_eq!(err.code, gust_gpu_bridge::ErrorCode::Unsupported, "{err}");
                continue;
            }
            check_f32_op(device, rng, Op::Linear, &[x, w], |v| {
                r::matmul(&v[0], &r::permute(&v[1], &[1, 0]))
            });
        }
    });
}

/// Causal grouped-query attention over pages of keys and values, against
/// the softmax of scaled dot products computed here in f64: the cache cut
/// into pages at different places gives the same result, query `i` sees
/// only positions up to its own, and query heads share kv heads in order.
#[test]
fn causal_attention_over_pages_matches_the_reference() {
    on_every_device(|device, rng| {
        let acct = account();
        let (heads, kv_heads, hd) = (6, 2, 20);
        for (t, cuts) in [
            (1, &[5, 1][..]),
            (3, &[4, 3][..]),
            (4, &[2, 3, 1][..]),
            (5, &[5][..]),
        ] {
            let total: usize = cuts.iter().sum();
            let qv = rng.f32s(heads * t * hd);
            let kv_all = rng.f32s(kv_heads * total * hd);
            let vv_all = rng.f32s(kv_heads * total * hd);
            let q = upload_f32(device, &[heads, t, hd], &qv, &acct);
            // Page p holds positions start..start + len of every kv head.
            let page = |values: &[f32], start: usize, len: usize| {
                let rows: Vec<f32> = (0..kv_heads)
                    .flat_map(|h| values[(h * total + start) * hd..][..len * hd].to_vec())
                    .collect();
                upload_f32(device, &[kv_heads, len, hd], &rows, &acct)
            };
            let (mut keys, mut values, mut start) = (Vec::new(), Vec::new(), 0);
            for &len in cuts {
                keys.push(page(&kv_all, start, len));
                values.push(page(&vv_all, start, len));
                start += len;
            }
            let mut operands = vec![&q];
            operands.extend(&keys);
            operands.extend(&values);
            let result = block_on(device.run(&Op::CausalAttention, &operands, &acct));
            if !device.description().fused_attention {
                let err = result.expect_err("only backends with fused attention run it");
                assert_eq!(err.code, gust_gpu_bridge::ErrorCode::Unsupported, "{err}");
                continue;
            }
            let out = result.unwrap();
            assert_eq!(out.shape(), [t, heads * hd]);
            let got = read_f64(device, &out, &acct);
            let mut want = vec![0f64; t * heads * hd];
            for i in 0..t {
                for h in 0..heads {
                    let kvh = h / (heads / kv_heads);
                    let seen = total - t + i + 1;
                    let query = &qv[(h * t + i) * hd..][..hd];
                    let scores: Vec<f64> = (0..seen)
                        .map(|j| {
                            let key = &kv_all[(kvh * total + j) * hd..][..hd];
                            query
                                .iter()
                                .zip(key)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    for (j, e) in exps.iter().enumerate() {
                        let value = &vv_all[(kvh * total + j) * hd..][..hd];
                        for d in 0..hd {
                            want[i * heads * hd + h * hd + d] += e / sum * f64::from(value[d]);
                        }
                    }
                }
            }
            assert_close(
                &format!("causal attention, t {t}, pages {cuts:?}"),
                device,
                &got,
                &want,
                rng.seed,
            );
        }
        // Shapes that do not fit are refused before anything runs.
        let q = upload_f32(device, &[6, 3, 20], &rng.f32s(360), &acct);
        let k = upload_f32(device, &[4, 2, 20], &rng.f32s(160), &acct);
        let short = upload_f32(device, &[2, 2, 20], &rng.f32s(80), &acct);
        for (what, operands) in [
            ("heads not a multiple of kv heads", vec![&q, &k, &k]),
            (
                "fewer cached positions than queries",
                vec![&q, &short, &short],
            ),
            ("a key page without its value page", vec![&q, &short]),
        ] {
            let err = block_on(device.run(&Op::CausalAttention, &operands, &acct)).expect_err(what);
            assert!(
                matches!(
                    err.code,
                    gust_gpu_bridge::ErrorCode::ShapeMismatch
                        | gust_gpu_bridge::ErrorCode::InvalidArgument
                ),
                "{what}: {err}"
            );
        }
    });
}

/// f16 and bf16 weights times f32 inputs give f32 (the weights stay in 16
/// bits), several matrices side by side, on the backends that run
/// `linear`. The values are small multiples of 2⁻⁴ and 2⁻³, exact in both
/// formats and in bf16-rounded inputs, so every path is exact up to f32
/// summation.
#[test]
fn linear_with_16_bit_weights_and_f32_inputs() {
    on_every_device(|device, rng| {
        if !device.description().linear {
            return;
        }
        let acct = account();
        for dtype in [DType::F16, DType::BF16] {
            // Rows past a register tile, a depth past 32 lanes, matrices
            // narrower than a tile.
            let (m, k, ns) = (11, 70, [3usize, 5, 66]);
            let xv: Vec<f32> = (0..m * k)
                .map(|_| (rng.below(33) as f32 - 16.0) / 8.0)
                .collect();
            let x = upload_f32(device, &[m, k], &xv, &acct);
            let mut weights = Vec::new();
            let mut wvs = Vec::new();
            for &n in &ns {
                let wv: Vec<f32> = (0..n * k)
                    .map(|_| (rng.below(33) as f32 - 16.0) / 16.0)
                    .collect();
                let bytes: Vec<u8> = wv
                    .iter()
                    .flat_map(|&v| match dtype {
                        DType::F16 => half::f16::from_f32(v).to_le_bytes(),
                        _ => half::bf16::from_f32(v).to_le_bytes(),
                    })
                    .collect();
                let w = block_on(device.upload(dtype, &[n, k], bytes, &acct)).unwrap();
                weights.push(w);
                wvs.push(wv);
            }
            let mut operands = vec![&x];
            operands.extend(&weights);
            let out = run(device, Op::Linear, &operands, &acct);
            let total: usize = ns.iter().sum();
            assert_eq!(out.shape(), [m, total]);
            assert_eq!(out.dtype(), DType::F32);
            let got = read_f64(device, &out, &acct);
            let mut expected = vec![0f64; m * total];
            let mut column = 0;
            for (wv, &n) in wvs.iter().zip(&ns) {
                for r in 0..m {
                    for j in 0..n {
                        expected[r * total + column + j] = (0..k)
                            .map(|c| f64::from(xv[r * k + c]) * f64::from(wv[j * k + c]))
                            .sum();
                    }
                }
                column += n;
            }
            assert_eq!(got, expected, "linear {dtype} weights, f32 inputs");
            // Inputs of a third dtype are refused before anything runs.
            let other = if dtype == DType::F16 {
                DType::BF16
            } else {
                DType::F16
            };
            let halves = run(device, Op::Cast { to: other }, &[&x], &acct);
            let e = block_on(device.run(&Op::Linear, &[&halves, &weights[0]], &acct))
                .expect_err("mixed 16-bit dtypes");
            assert_eq!(e.code, gust_gpu_bridge::ErrorCode::ShapeMismatch, "{e}");
        }
    });
}

/// Blocks of `dtype` (Q8_0 or Q4_0) for `rows × k` small integers times
/// 2⁻⁴, and those values: every value is exact in f16 and f32.
fn exact_blocks(dtype: DType, rows: usize, k: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f64>) {
    let d = half::f16::from_f32(1.0 / 16.0).to_le_bytes();
    let (mut bytes, mut values) = (Vec::new(), Vec::new());
    for _ in 0..rows * k / 32 {
        bytes.extend_from_slice(&d);
        let q: Vec<i32> = (0..32)
            .map(|_| match dtype {
                DType::Q8_0 => rng.below(255) as i32 - 127,
                _ => rng.below(16) as i32,
            })
            .collect();
        match dtype {
            DType::Q8_0 => {
                bytes.extend(q.iter().map(|&v| v as i8 as u8));
                values.extend(q.iter().map(|&v| f64::from(v) / 16.0));
            }
            _ => {
                bytes.extend((0..16).map(|j| (q[j] | (q[j + 16] << 4)) as u8));
                values.extend(q.iter().map(|&v| f64::from(v - 8) / 16.0));
            }
        }
    }
    (bytes, values)
}

#[test]
fn linear_with_quantized_weights_on_the_cpu() {
    on_every_device(|device, rng| {
        let acct = account();
        for dtype in [DType::Q8_0, DType::Q4_0] {
            let (m, k, n) = (5, 96, 70);
            let (bytes, wv) = exact_blocks(dtype, n, k, rng);
            let uploaded = block_on(device.upload(dtype, &[n, k], bytes.clone(), &acct));
            if !device.description().arithmetic_dtypes.contains(&dtype) {
                let err = uploaded.expect_err("no quantized tensors where no kernels take them");
                assert_eq!(err.code, gust_gpu_bridge::ErrorCode::Unsupported, "{err}");
                continue;
            }
            let w = uploaded.unwrap();
            assert_eq!(w.byte_len(), bytes.len());
            // Activations whose 8-bit blocks are exact: multiples of 2⁻⁷
            // with ±127 in every block, so the product is exact too.
            let xv: Vec<f32> = (0..m * k)
                .map(|i| {
                    if i % 32 == 7 {
                        127.0 / 128.0
                    } else {
                        (rng.below(255) as f32 - 127.0) / 128.0
                    }
                })
                .collect();
            let x = upload_f32(device, &[m, k], &xv, &acct);
            let out = run(device, Op::Linear, &[&x, &w], &acct);
            assert_eq!(out.shape(), [m, n]);
            assert_eq!(out.dtype(), DType::F32);
            let got = read_f64(device, &out, &acct);
            let expected: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    (0..k)
                        .map(|c| f64::from(xv[r * k + c]) * wv[j * k + c])
                        .sum()
                })
                .collect();
            assert_close(
                &format!("linear {dtype}"),
                device,
                &got,
                &expected,
                rng.seed,
            );
            // Dequantized by a cast and by gather, the weights are exact.
            let cast = run(device, Op::Cast { to: DType::F32 }, &[&w], &acct);
            assert_eq!(read_f64(device, &cast, &acct), wv);
            let idx =
                block_on(device.upload(DType::I32, &[3], dtype::i32_to_bytes(&[2, -1, 0]), &acct))
                    .unwrap();
            let rows = run(device, Op::Gather, &[&w, &idx], &acct);
            let rows = read_f64(device, &rows, &acct);
            assert_eq!(rows[..k], wv[2 * k..3 * k]);
            assert!(rows[k..2 * k].iter().all(|&v| v == 0.0));
            assert_eq!(rows[2 * k..], wv[..k]);

            // What quantized tensors refuse, before anything runs.
            let shape_err = |op: Op, operands: &[&gust_gpu_bridge::Tensor]| {
                block_on(device.run(&op, operands, &acct)).expect_err(op.name())
            };
            let e = shape_err(Op::Binary(BinaryOp::Add), &[&w, &w]);
            assert_eq!(e.code, gust_gpu_bridge::ErrorCode::ShapeMismatch, "{e}");
            let e = shape_err(Op::Linear, &[&w, &x]);
            assert_eq!(e.code, gust_gpu_bridge::ErrorCode::ShapeMismatch, "{e}");
            let short = upload_f32(device, &[m, 64], &xv[..m * 64], &acct);
            let e = shape_err(Op::Linear, &[&short, &w]);
            assert_eq!(e.code, gust_gpu_bridge::ErrorCode::ShapeMismatch, "{e}");
            let e = shape_err(Op::Cast { to: DType::F16 }, &[&w]);
            assert_eq!(e.code, gust_gpu_bridge::ErrorCode::Unsupported, "{e}");
            let e = shape_err(Op::Cast { to: dtype }, &[&x]);
            assert_eq!(e.code, gust_gpu_bridge::ErrorCode::Unsupported, "{e}");
            let e = block_on(device.upload(dtype, &[2, 30], vec![0; 34], &acct))
                .expect_err("a partial block");
            assert_eq!(e.code, gust_gpu_bridge::ErrorCode::ShapeMismatch, "{e}");
        }
    });
}
