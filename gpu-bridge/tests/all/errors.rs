//! Every shape and dtype error is reported before anything runs, with the
//! right code, on every device.

use gust_gpu_bridge::{BinaryOp, DType, ErrorCode, Op, ReduceOp, UnaryOp};

use crate::harness::{account, block_on, devices, upload_f32};

#[test]
fn shape_and_dtype_errors_have_their_codes() {
    for device in devices() {
        let acct = account();
        let a = upload_f32(device, &[2, 3], &[0.0; 6], &acct);
        let b = upload_f32(device, &[4, 5], &[0.0; 20], &acct);
        let v = upload_f32(device, &[3], &[0.0; 3], &acct);
        let i = block_on(device.upload(DType::I32, &[2], vec![0; 8], &acct)).unwrap();
        let h = block_on(device.upload(DType::F16, &[2, 3], vec![0; 12], &acct)).unwrap();
        let cases: Vec<(Op, Vec<&gust_gpu_bridge::Tensor>, ErrorCode, &str)> = vec![
            (
                Op::Matmul,
                vec![&a, &b],
                ErrorCode::ShapeMismatch,
                "inner dimensions differ",
            ),
            (
                Op::Matmul,
                vec![&v, &v],
                ErrorCode::ShapeMismatch,
                "rank 2 or more",
            ),
            (
                Op::Matmul,
                vec![&a, &h],
                ErrorCode::ShapeMismatch,
                "dtypes differ",
            ),
            (
                Op::Binary(BinaryOp::Add),
                vec![&a, &b],
                ErrorCode::ShapeMismatch,
                "do not broadcast",
            ),
            (
                Op::Binary(BinaryOp::Mul),
                vec![&i, &i],
                ErrorCode::ShapeMismatch,
                "float",
            ),
            (
                Op::Unary(UnaryOp::Exp),
                vec![&i],
                ErrorCode::ShapeMismatch,
                "float",
            ),
            (
                Op::Binary(BinaryOp::Add),
                vec![&a],
                ErrorCode::InvalidArgument,
                "2 operand",
            ),
            (
                Op::Softmax { dim: 2 },
                vec![&a],
                ErrorCode::InvalidArgument,
                "out of range",
            ),
            (
                Op::Reduce {
                    op: ReduceOp::Sum,
                    dim: -3,
                    keep_dim: false,
                },
                vec![&a],
                ErrorCode::InvalidArgument,
                "out of range",
            ),
            (
                Op::LayerNorm {
                    eps: 1e-5,
                    weight: true,
                    bias: false,
                },
                vec![&a, &b],
                ErrorCode::ShapeMismatch,
                "must have shape [3]",
            ),
            (
                Op::RmsNorm {
                    eps: 1e-5,
                    weight: true,
                },
                vec![&a],
                ErrorCode::InvalidArgument,
                "2 operand",
            ),
            (
                Op::Attention {
                    heads: 1,
                    lengths: vec![1, 2],
                },
                vec![&a],
                ErrorCode::ShapeMismatch,
                "add up to 3",
            ),
            (
                Op::Attention {
                    heads: 2,
                    lengths: vec![2],
                },
                vec![&a],
                ErrorCode::ShapeMismatch,
                "do not split",
            ),
            (
                Op::Permute { dims: vec![0, 0] },
                vec![&a],
                ErrorCode::InvalidArgument,
                "not a permutation",
            ),
            (
                Op::Permute { dims: vec![1] },
                vec![&a],
                ErrorCode::InvalidArgument,
                "not a permutation",
            ),
            (
                Op::Reshape { shape: vec![4, 2] },
                vec![&a],
                ErrorCode::ShapeMismatch,
                "holds 8 elements",
            ),
            (
                Op::Reshape {
                    shape: vec![-1, -1],
                },
                vec![&a],
                ErrorCode::InvalidArgument,
                "at most one",
            ),
            (
                Op::Reshape { shape: vec![-1, 4] },
                vec![&a],
                ErrorCode::ShapeMismatch,
                "cannot infer",
            ),
            (
                Op::Reshape { shape: vec![-2, 3] },
                vec![&a],
                ErrorCode::InvalidArgument,
                "negative",
            ),
            (
                Op::Slice {
                    dim: 1,
                    start: 2,
                    len: 2,
                },
                vec![&a],
                ErrorCode::InvalidArgument,
                "outside dimension",
            ),
            (
                Op::Slice {
                    dim: 0,
                    start: u32::MAX,
                    len: u32::MAX,
                },
                vec![&a],
                ErrorCode::InvalidArgument,
                "outside dimension",
            ),
            (
                Op::Concat { dim: 0 },
                vec![],
                ErrorCode::InvalidArgument,
                "at least one",
            ),
            (
                Op::Concat { dim: 0 },
                vec![&a, &b],
                ErrorCode::ShapeMismatch,
                "differs",
            ),
            (
                Op::Concat { dim: 0 },
                vec![&a, &h],
                ErrorCode::ShapeMismatch,
                "dtypes differ",
            ),
            (
                Op::Gather,
                vec![&a, &v],
                ErrorCode::ShapeMismatch,
                "i32 or u32",
            ),
            (
                Op::Transpose { dim0: 0, dim1: 5 },
                vec![&a],
                ErrorCode::InvalidArgument,
                "out of range",
            ),
        ];
        for (op, operands, code, needle) in cases {
            let err = block_on(device.run(&op, &operands, &acct)).expect_err(op.name());
            assert_eq!(
                err.code,
                code,
                "{} on {}: {err}",
                op.name(),
                device.description().name
            );
            assert!(
                err.message.contains(needle),
                "{}: {err:?} lacks {needle:?}",
                op.name()
            );
        }
        let err = block_on(device.upload(DType::F32, &[2, 2], vec![0; 15], &acct)).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(err.message.contains("needs 16 bytes, got 15"), "{err}");
        let err = block_on(device.upload(DType::F32, &[1 << 20, 1 << 20], Vec::new(), &acct))
            .unwrap_err();
        assert!(err.message.contains("more than"), "{err}");
        let err = block_on(device.upload(DType::F32, &[1; 9], vec![0; 4], &acct)).unwrap_err();
        assert!(err.message.contains("rank 9"), "{err}");
    }
}

#[test]
fn tensors_from_another_device_are_refused() {
    let all = devices();
    let first = &all[0];
    let acct = account();
    let t = upload_f32(first, &[2], &[1.0, 2.0], &acct);
    // A second cpu device stands in for "another device" on every machine.
    let other = gust_gpu_bridge::Device::start(
        gust_gpu_bridge::backend::cpu::CpuBackend::new(1 << 20),
        gust_gpu_bridge::DeviceOptions::default(),
    )
    .unwrap();
    let err = block_on(other.run(&Op::Unary(UnaryOp::Relu), &[&t], &acct)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(err.message.contains("was passed to"), "{err}");
    assert!(block_on(other.read(&t, &acct)).is_err());
}

#[test]
fn empty_tensors_and_views_need_no_kernel() {
    for device in devices() {
        let acct = account();
        let empty = block_on(device.upload(DType::F32, &[0, 4], Vec::new(), &acct)).unwrap();
        let out = block_on(device.run(&Op::Unary(UnaryOp::Exp), &[&empty], &acct)).unwrap();
        assert_eq!(out.shape(), &[0, 4]);
        assert!(block_on(device.read(&out, &acct)).unwrap().is_empty());
        let summed = block_on(device.run(
            &Op::Reduce {
                op: ReduceOp::Sum,
                dim: 0,
                keep_dim: false,
            },
            &[&empty],
            &acct,
        ))
        .unwrap();
        assert_eq!(
            crate::harness::read_f64(device, &summed, &acct),
            vec![0.0; 4]
        );
        let err = block_on(device.run(
            &Op::Reduce {
                op: ReduceOp::Max,
                dim: 0,
                keep_dim: false,
            },
            &[&empty],
            &acct,
        ))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        let before = acct.used_bytes();
        let x = upload_f32(device, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &acct);
        let used = acct.used_bytes();
        let view = block_on(device.run(&Op::Reshape { shape: vec![3, 2] }, &[&x], &acct)).unwrap();
        assert_eq!(acct.used_bytes(), used, "a reshape shares the buffer");
        drop(x);
        assert_eq!(
            crate::harness::read_f64(device, &view, &acct),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        drop(view);
        block_on(device.synchronize(&acct)).unwrap();
        assert_eq!(acct.used_bytes(), before);
    }
}
