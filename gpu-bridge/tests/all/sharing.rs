//! One device, several tenants: no tenant's backlog, budget overrun or
//! leftover bytes reaches another.

use std::time::{Duration, Instant};

use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::{Account, Backend, DType, Device, DeviceOptions, ErrorCode, Op, UnaryOp};

use crate::harness::{block_on, upload_f32};

/// A device whose every op goes through its worker's queue.
fn queued_device() -> Device {
    Device::start(CpuBackend::new(1 << 30), DeviceOptions::default()).unwrap()
}

#[test]
fn one_tenants_backlog_does_not_delay_anothers_op() {
    let device = queued_device();
    let busy = Account::new("busy", None, None);
    let quiet = Account::new("quiet", None, None);
    let n = 128;
    let x = upload_f32(&device, &[n, n], &vec![0.5; n * n], &busy);
    // Hundreds of milliseconds of queued products from one tenant...
    let backlog: Vec<_> = (0..1500)
        .map(|_| block_on(device.run(&Op::Matmul, &[&x, &x], &busy)).unwrap())
        .collect();
    // ...then another tenant's single small op and its read.
    let started = Instant::now();
    let y = upload_f32(&device, &[4], &[-1.0, 2.0, -3.0, 4.0], &quiet);
    let z = block_on(device.run(&Op::Unary(UnaryOp::Relu), &[&y], &quiet)).unwrap();
    let quiet_bytes = block_on(device.read(&z, &quiet)).unwrap();
    let quiet_took = started.elapsed();
    let last = block_on(device.read(&backlog[backlog.len() - 1], &busy)).unwrap();
    let busy_took = started.elapsed();
    assert_eq!(
        gust_gpu_bridge::dtype::bytes_to_f64(DType::F32, &quiet_bytes).unwrap(),
        vec![0.0, 2.0, 0.0, 4.0]
    );
    assert_eq!(last.len(), n * n * 4);
    // Served in turn with the backlog rather than after it: a small share
    // of the time the backlog takes (a FIFO made it wait for all of it).
    assert!(
        quiet_took * 10 < busy_took,
        "the quiet tenant's op took {quiet_took:?}, the busy tenant's backlog {busy_took:?}"
    );
}

#[test]
fn an_op_estimated_past_the_remaining_budget_is_refused_before_it_runs() {
    let device = queued_device();
    let tenant = Account::new("tenant", None, Some(Duration::from_millis(1)));
    // The operand is someone else's, so the tenant's budget is untouched.
    let owner = Account::new("owner", None, None);
    let n = 1024;
    let x = upload_f32(&device, &[n, n], &vec![1.0; n * n], &owner);
    // A billion multiply-adds: far more than 1 ms on any CPU this runs on,
    // with all of the 1 ms budget left: refused up front rather than queued
    // to overrun it.
    let err = block_on(device.run(&Op::Matmul, &[&x, &x], &tenant)).unwrap_err();
    assert_eq!(err.code, ErrorCode::QuotaExceeded, "{err}");
    assert!(err.message.contains("device time quota"), "{err}");
    assert_eq!(tenant.used_bytes(), 0, "the refused op reserved no memory");
    block_on(device.synchronize(&owner)).unwrap();
    assert_eq!(
        tenant.device_time(),
        Duration::ZERO,
        "the refused op was not queued"
    );
    // Work that fits still runs.
    let small = upload_f32(&device, &[4], &[1.0, -1.0, 2.0, -2.0], &tenant);
    let relu = block_on(device.run(&Op::Unary(UnaryOp::Relu), &[&small], &tenant)).unwrap();
    assert_eq!(block_on(device.read(&relu, &tenant)).unwrap().len(), 16);
}

#[test]
fn the_cpu_backend_leaves_a_core_to_the_host() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        eprintln!("the_cpu_backend_leaves_a_core_to_the_host: SKIPPED: RAYON_NUM_THREADS chooses");
        return;
    }
    let expected = cores.saturating_sub(1).max(1);
    let name = CpuBackend::new(1 << 20).describe().name;
    assert_eq!(name, format!("cpu ({expected} threads)"), "{cores} cores");
}
