//! Device memory is accounted per owner, limited by quotas and by the
//! device, and returned when the last tensor goes.

use std::time::Duration;

use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::{Account, BinaryOp, Device, DeviceOptions, ErrorCode, Op};

use crate::harness::{block_on, devices, upload_f32};

#[test]
fn quota_refuses_past_the_limit_and_frees_on_drop() {
    for device in devices() {
        let tenant = Account::new("tenant", Some(1000), None);
        let call = tenant.child("call", None);
        let a = upload_f32(device, &[100], &[1.0; 100], &call);
        assert_eq!((call.used_bytes(), tenant.used_bytes()), (400, 400));
        let b = block_on(device.run(&Op::Binary(BinaryOp::Add), &[&a, &a], &call)).unwrap();
        let err = block_on(device.run(&Op::Binary(BinaryOp::Mul), &[&a, &b], &call)).unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded, "{err}");
        assert!(err.message.contains("quota of 1000 bytes"), "{err}");
        let err = block_on(device.upload(gust_gpu_bridge::DType::F32, &[100], vec![0; 400], &call))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
        drop((a, b));
        // Queued jobs hold their tensors until they have run.
        block_on(device.synchronize(&tenant)).unwrap();
        assert_eq!(tenant.used_bytes(), 0);
        assert_eq!(tenant.peak_bytes(), 800);
    }
}

#[test]
fn device_capacity_gives_out_of_memory() {
    let device = Device::start(CpuBackend::new(1024), DeviceOptions::default()).unwrap();
    let acct = Account::new("t", None, None);
    let a = upload_f32(&device, &[200], &[0.0; 200], &acct);
    let err = block_on(device.upload(gust_gpu_bridge::DType::F32, &[100], vec![0; 400], &acct))
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::OutOfMemory, "{err}");
    assert_eq!(acct.used_bytes(), 800, "the refused upload is not charged");
    assert_eq!(device.used_bytes(), 800);
    drop(a);
    block_on(device.synchronize(&acct)).unwrap();
    assert_eq!((device.used_bytes(), acct.used_bytes()), (0, 0));
}

#[test]
fn device_time_is_metered_and_limited() {
    let device = &devices()[0];
    // Enough for the upload whatever rate the device has learned from
    // other tests (its cost is estimated and reserved too), not for
    // thousands of products.
    let tenant = Account::new("tenant", None, Some(Duration::from_millis(50)));
    let x = upload_f32(device, &[256, 256], &vec![0.5; 256 * 256], &tenant);
    let mut refused = None;
    for _ in 0..10_000 {
        match block_on(device.run(&Op::Matmul, &[&x, &x], &tenant)) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("a 50 ms/minute budget runs out");
    assert_eq!(err.code, ErrorCode::QuotaExceeded);
    assert!(err.message.contains("device time quota"), "{err}");
    // Queued ops reserve their estimated time, so the refusal can come
    // before they have run; once they have, their time is charged. (No
    // `synchronize` to wait: with the budget spent it is refused too.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tenant.device_time() == Duration::ZERO && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(tenant.device_time() > Duration::ZERO);
}

#[test]
fn a_full_queue_makes_submitters_wait_and_loses_nothing() {
    let device = Device::start(
        CpuBackend::new(1 << 30),
        DeviceOptions {
            queue_depth: 1,
            ..DeviceOptions::default()
        },
    )
    .unwrap();
    let acct = Account::new("t", None, None);
    let x = upload_f32(&device, &[64, 64], &vec![0.5; 64 * 64], &acct);
    // Pipelined ops return before they run; 64 of them through a queue of
    // one wait for room instead of failing.
    let op = Op::Matmul;
    let products: Vec<_> = (0..64)
        .map(|_| block_on(device.run(&op, &[&x, &x], &acct)).unwrap())
        .collect();
    let last = block_on(device.read(&products[63], &acct)).unwrap();
    let values = gust_gpu_bridge::dtype::bytes_to_f64(gust_gpu_bridge::DType::F32, &last).unwrap();
    assert!(values.iter().all(|&v| v == 16.0), "64 × 0.25 = 16");
    drop(products);
    drop(x);
    block_on(device.synchronize(&acct)).unwrap();
    assert_eq!(acct.used_bytes(), 0);
}

#[test]
fn ops_return_before_the_device_finishes() {
    // A big product queued on the worker: `run` answers with the tensor at
    // once, `read` waits for it.
    let device = Device::start(CpuBackend::new(1 << 30), DeviceOptions::default()).unwrap();
    let acct = Account::new("t", None, None);
    let n = 512;
    let x = upload_f32(&device, &[n, n], &vec![1.0; n * n], &acct);
    let started = std::time::Instant::now();
    let chained: Vec<_> = (0..8)
        .map(|_| block_on(device.run(&Op::Matmul, &[&x, &x], &acct)).unwrap())
        .collect();
    let submitted = started.elapsed();
    let first = block_on(device.read(&chained[7], &acct)).unwrap();
    let finished = started.elapsed();
    assert_eq!(first.len(), n * n * 4);
    assert!(
        submitted < finished,
        "submission ({submitted:?}) does not wait for the products ({finished:?})"
    );
}
