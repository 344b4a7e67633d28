//! The wgpu backend's own behaviour: buffers of whole words, and its
//! errors.

use gust_gpu_bridge::{Backend, BinaryOp, DType, ErrorCode, Kernel, UnaryOp};

use super::wgpu;
use crate::harness::Rng;

#[test]
fn wgpu_upload_download_round_trip() {
    let Some(mut backend) = wgpu("wgpu_upload_download_round_trip") else {
        return;
    };
    let mut rng = Rng::fresh();
    for n in [0usize, 1, 3, 4, 7, 1027] {
        let data: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        let buffer = backend.upload(&data).unwrap();
        assert!(buffer.size() >= 4 && buffer.size() % 4 == 0);
        assert_eq!(backend.download(&buffer, n).unwrap(), data);
    }
    let buffer = backend.alloc(10).unwrap();
    assert_eq!(buffer.size(), 12);
    assert_eq!(backend.download(&buffer, 10).unwrap().len(), 10);
    let err = backend.download(&buffer, 13).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    // Buffers may be dropped on any thread.
    std::thread::spawn(move || drop(buffer)).join().unwrap();
    backend.synchronize().unwrap();
}

#[test]
fn wgpu_half_precision_arithmetic_is_unsupported() {
    let Some(mut backend) = wgpu("wgpu_half_precision_arithmetic_is_unsupported") else {
        return;
    };
    let x = backend.upload(&[0; 8]).unwrap();
    let mut out = backend.alloc(8).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let kernel = Kernel::Unary {
            op: UnaryOp::Exp,
            dtype,
            len: 4,
        };
        let err = backend.run(&kernel, &[&x], &mut out).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unsupported);
        assert!(err.message.contains("on wgpu"), "{err}");
    }
}

#[test]
fn wgpu_bad_calls_are_errors_not_panics() {
    let Some(mut backend) = wgpu("wgpu_bad_calls_are_errors_not_panics") else {
        return;
    };
    let x = backend.upload(&[0; 16]).unwrap();
    let mut out = backend.alloc(16).unwrap();
    let kernel = Kernel::Binary {
        op: BinaryOp::Add,
        dtype: DType::F32,
        out_shape: vec![4],
        lhs_strides: vec![1],
        rhs_strides: vec![1],
    };
    assert_eq!(
        backend.run(&kernel, &[&x], &mut out).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let kernel = Kernel::Affine {
        dtype: DType::F32,
        len: 100,
        scale: 1.0,
        offset: 0.0,
    };
    assert_eq!(
        backend.run(&kernel, &[&x], &mut out).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let err = backend.alloc(usize::MAX / 2).unwrap_err();
    assert!(
        matches!(
            err.code,
            ErrorCode::OutOfMemory | ErrorCode::InvalidArgument
        ),
        "{err}"
    );
    backend.synchronize().unwrap();
}
