//! The CUDA backend's own behaviour: its description, buffers freed from
//! any thread, and its errors.

use gust_gpu_bridge::backend::cuda::CudaBackend;
use gust_gpu_bridge::{Backend, BackendKind, DType, ErrorCode, Kernel, UnaryOp};

use super::cuda;
use crate::harness::Rng;

#[test]
fn cuda_describes_the_device() {
    let Some(dev) = cuda("cuda_describes_the_device") else {
        return;
    };
    let d = dev.describe();
    assert_eq!(d.kind, BackendKind::Cuda);
    assert!(d.is_gpu);
    assert!(d.memory_bytes > 0);
    assert!(d.name.contains("(sm_"), "{}", d.name);
}

#[test]
fn cuda_open_rejects_a_missing_device() {
    let Some(_dev) = cuda("cuda_open_rejects_a_missing_device") else {
        return;
    };
    let err = CudaBackend::open(10_000).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err}");
}

#[test]
fn cuda_buffers_round_trip_and_free_on_any_thread() {
    let Some(mut dev) = cuda("cuda_buffers_round_trip_and_free_on_any_thread") else {
        return;
    };
    let mut rng = Rng::fresh();
    for len in [0usize, 1, 3, 4, 5, (1 << 20) + 3] {
        let data: Vec<u8> = (0..len).map(|_| rng.next_u32() as u8).collect();
        let buffer = dev.upload(&data).unwrap();
        assert_eq!(dev.download(&buffer, len).unwrap(), data, "{len} bytes");
        assert_eq!(dev.download(&buffer, len / 2).unwrap(), data[..len / 2]);
        // Buffers hold whole words, and at least one.
        let allocated = len.max(1).next_multiple_of(4);
        let err = dev.download(&buffer, allocated + 1).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }
    let buffers: Vec<_> = (0..8).map(|i| dev.alloc(1000 * (i + 1)).unwrap()).collect();
    std::thread::spawn(move || drop(buffers)).join().unwrap();
    dev.synchronize().unwrap();
    let again = dev.upload(&[1, 2, 3]).unwrap();
    assert_eq!(dev.download(&again, 3).unwrap(), [1, 2, 3]);

    let too_big = usize::try_from(dev.describe().memory_bytes).unwrap() + (1 << 30);
    let err = dev.alloc(too_big).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutOfMemory, "{err}");
    // The device is still usable after a failed allocation.
    let after = dev.upload(&[9; 16]).unwrap();
    assert_eq!(dev.download(&after, 16).unwrap(), [9; 16]);
}

#[test]
fn cuda_int_dtypes_are_refused_by_compute_kernels() {
    let Some(mut dev) = cuda("cuda_int_dtypes_are_refused_by_compute_kernels") else {
        return;
    };
    let x = dev.upload(&[0; 16]).unwrap();
    let mut out = dev.alloc(16).unwrap();
    let kernel = Kernel::Unary {
        op: UnaryOp::Relu,
        dtype: DType::I32,
        len: 4,
    };
    let err = dev.run(&kernel, &[&x], &mut out).unwrap_err();
    assert_eq!(err.code, ErrorCode::ShapeMismatch, "{err}");
}
