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
    assert_eq!((device.used_bytes(), acct.used_bytes()), (0, 0));
}

#[test]
fn device_time_is_metered_and_limited() {
    let device = &devices()[0];
    let tenant = Account::new("tenant", None, Some(Duration::from_millis(1)));
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
    let err = refused.expect("a 1 ms/minute budget runs out");
    assert_eq!(err.code, ErrorCode::QuotaExceeded);
    assert!(err.message.contains("device time quota"), "{err}");
    assert!(tenant.device_time() >= Duration::from_millis(1));
}

#[test]
fn a_full_queue_refuses_instead_of_blocking() {
    let device = Device::start(
        CpuBackend::new(1 << 30),
        DeviceOptions {
            queue_depth: 1,
            ..DeviceOptions::default()
        },
    )
    .unwrap();
    let acct = Account::new("t", None, None);
    let x = upload_f32(&device, &[512, 512], &vec![0.5; 512 * 512], &acct);
    // Futures are lazy: poll each once so all are submitted before the
    // worker can drain the queue.
    let op = Op::Matmul;
    let operands = [&x, &x];
    let mut pending: Vec<_> = (0..64)
        .map(|_| Box::pin(device.run(&op, &operands, &acct)))
        .collect();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut refused = 0;
    for f in &mut pending {
        if let std::task::Poll::Ready(Err(e)) = f.as_mut().poll(&mut cx) {
            assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e}");
            assert!(e.message.contains("queue is full"), "{e}");
            refused += 1;
        }
    }
    assert!(refused > 0, "a queue of one cannot take 64 jobs at once");
}
