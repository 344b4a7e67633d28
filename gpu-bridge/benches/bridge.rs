//! The bridge against its backends called natively, and the cpu backend
//! against the `gemm` crate called directly.
//!
//! `cargo bench -p gust-gpu-bridge --bench bridge [--features wgpu,cuda]`.
//!
//! - `tiny/<backend>/{native,bridge}`: relu of 16 floats, output allocated
//!   (target: bridge − native ≤ 2 µs).
//! - `matmul512/<backend>/{native,bridge}`: 512×512 f32 (target: bridge ≥
//!   0.9× native throughput); GPU backends chain 8 products per iteration
//!   and also run `matmul4096` for TFLOP/s (native cuda is cuBLAS sgemm).
//! - `gemm/{256,512,1024}/{gemm,cpu}`: GFLOP/s of the cpu backend next to
//!   `gemm::gemm` with the same threads.
//!
//! "Native" runs the backend on the bench thread with no queue, no account
//! and no validation; "bridge" is `Device::run` awaited, as the host calls
//! it. Both sides wait for the device at the end of every iteration.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::backend::cuda::CudaBackend;
use gust_gpu_bridge::backend::wgpu::{WgpuBackend, WgpuOptions};
use gust_gpu_bridge::{
    Account, Backend, DType, Device, DeviceOptions, Kernel, Op, Operand, UnaryOp, Work, dtype,
};

fn kernel_for(op: &Op, shapes: &[&[usize]]) -> Kernel {
    let operands: Vec<Operand<'_>> = shapes
        .iter()
        .map(|s| Operand {
            dtype: DType::F32,
            shape: s,
        })
        .collect();
    match op.plan(&operands).unwrap().work {
        Work::Kernel(kernel) => kernel,
        other => panic!("expected a kernel, got {other:?}"),
    }
}

fn values(n: usize) -> Vec<u8> {
    dtype::f32_to_bytes(
        &(0..n)
            .map(|i| ((i % 13) as f32 - 6.0) / 7.0)
            .collect::<Vec<_>>(),
    )
}

/// One backend's side of the comparison: the same work natively and
/// through a `Device` running a second instance of the backend.
///
/// Each iteration runs the op `chain` times, then waits for the device, on
/// both sides: a guest chains ops without reading back, so on a GPU the
/// bridge's per-op cost overlaps the kernels, as a backend's own queue does.
fn compare<B: Backend>(
    c: &mut Criterion,
    name: &str,
    mut native: B,
    device: Device,
    sizes: &[usize],
    chain: usize,
) {
    let account = Account::new("bench", None, None);
    let tokio = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    let mut cases: Vec<(String, Op, Vec<usize>, usize, usize)> =
        vec![("tiny".into(), Op::Unary(UnaryOp::Relu), vec![16], 16, 1)];
    for &n in sizes {
        cases.push((format!("matmul{n}"), Op::Matmul, vec![n, n], n * n, chain));
    }
    for (group_name, op, shape, len, repeat) in cases {
        let mut group = c.benchmark_group(format!("{group_name}/{name}"));
        if op == Op::Matmul {
            let n = shape[0] as u64;
            group.throughput(Throughput::Elements(2 * n * n * n * repeat as u64));
        }
        let shapes: Vec<&[usize]> = match op {
            Op::Matmul => vec![&shape, &shape],
            _ => vec![&shape],
        };
        let kernel = kernel_for(&op, &shapes);
        let input = native.upload(&values(len)).unwrap();
        let inputs: Vec<&B::Buffer> = shapes.iter().map(|_| &input).collect();
        group.bench_function("native", |b| {
            b.iter(|| {
                let outs: Vec<B::Buffer> = (0..repeat)
                    .map(|_| {
                        let mut out = native.alloc(len * 4).unwrap();
                        native.run(&kernel, &inputs, &mut out).unwrap();
                        out
                    })
                    .collect();
                native.synchronize().unwrap();
                outs
            });
        });
        let tensor = tokio
            .block_on(device.upload(DType::F32, &shape, values(len), &account))
            .unwrap();
        let operands: Vec<&gust_gpu_bridge::Tensor> = shapes.iter().map(|_| &tensor).collect();
        group.bench_function("bridge", |b| {
            b.iter(|| {
                tokio.block_on(async {
                    let mut outs = Vec::with_capacity(repeat);
                    for _ in 0..repeat {
                        outs.push(device.run(&op, &operands, &account).await.unwrap());
                    }
                    device.synchronize(&account).await.unwrap();
                    outs
                })
            });
        });
        group.finish();
    }
}

fn bench_backends(c: &mut Criterion) {
    // The cpu device as the host opens it: tiny ops inline, the rest on
    // its worker.
    let cpu = Device::start_inline(
        CpuBackend::with_threads(1 << 30, all_cores()),
        DeviceOptions::default(),
    )
    .unwrap();
    compare(
        c,
        "cpu",
        CpuBackend::with_threads(1 << 30, all_cores()),
        cpu,
        &[512],
        1,
    );
    let options = WgpuOptions {
        allow_software: true,
    };
    match (WgpuBackend::open(&options), WgpuBackend::open(&options)) {
        (Ok(a), Ok(b)) => {
            // lavapipe is ~100x slower than the cpu backend: only the tiny op.
            let sizes: &[usize] = if a.describe().is_gpu {
                &[512, 4096]
            } else {
                &[]
            };
            let device = Device::start(b, DeviceOptions::default()).unwrap();
            compare(c, "wgpu", a, device, sizes, 8);
        }
        (Err(e), _) | (_, Err(e)) => eprintln!("skipping wgpu: {e}"),
    }
    match (CudaBackend::open(0), CudaBackend::open(0)) {
        (Ok(a), Ok(b)) => {
            let device = Device::start(b, DeviceOptions::default()).unwrap();
            compare(c, "cuda", a, device, &[512, 4096], 8);
        }
        (Err(e), _) | (_, Err(e)) => eprintln!("skipping cuda: {e}"),
    }
}

/// The cpu backend's matmul next to `gemm::gemm` called directly.
fn bench_gemm(c: &mut Criterion) {
    let threads = rayon::current_num_threads();
    let mut backend = CpuBackend::new(1 << 32);
    for n in [256usize, 512, 1024] {
        let mut group = c.benchmark_group(format!("gemm/{n}"));
        group.throughput(Throughput::Elements((2 * n * n * n) as u64));
        if n == 1024 {
            group
                .sample_size(20)
                .measurement_time(Duration::from_secs(8));
        }
        let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32).collect();
        let mut out = vec![0f32; n * n];
        group.bench_function(BenchmarkId::new("gemm", threads), |b| {
            b.iter(|| unsafe {
                gemm::gemm(
                    n,
                    n,
                    n,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    n as isize,
                    a.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            });
        });
        let kernel = kernel_for(&Op::Matmul, &[&[n, n], &[n, n]]);
        let input = backend.upload(&dtype::f32_to_bytes(&a)).unwrap();
        let mut output = backend.alloc(n * n * 4).unwrap();
        group.bench_function(BenchmarkId::new("cpu", threads), |b| {
            b.iter(|| {
                backend
                    .run(&kernel, &[&input, &input], &mut output)
                    .unwrap()
            });
        });
        group.finish();
    }
}

/// Few rows times a weight matrix (MiniLM's feed-forward shape): tokens of
/// one or a few sentences through a linear layer, where the cpu backend
/// switches from its own kernel to gemm's. The product cycles through 16
/// weight matrices (38 MB, a model's worth), so the weights stream from
/// memory as they do in a model rather than sitting in L2.
fn bench_skinny(c: &mut Criterion) {
    let threads = rayon::current_num_threads();
    let mut backend = CpuBackend::new(1 << 32);
    let (k, n) = (384usize, 1536usize);
    let weights: Vec<_> = (0..16)
        .map(|seed| {
            let values: Vec<f32> = (0..k * n)
                .map(|i| ((i + seed) % 13) as f32 * 0.01)
                .collect();
            backend.upload(&dtype::f32_to_bytes(&values)).unwrap()
        })
        .collect();
    // From inside a pool, as a device's worker runs it.
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    for m in [1usize, 8, 32, 64, 128, 256, 512] {
        let mut group = c.benchmark_group(format!("skinny/{m}x{k}x{n}"));
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let x: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let lhs = backend.upload(&dtype::f32_to_bytes(&x)).unwrap();
        let mut output = backend.alloc(m * n * 4).unwrap();
        let kernel = kernel_for(&Op::Matmul, &[&[m, k], &[k, n]]);
        let mut next = 0;
        group.bench_function(BenchmarkId::new("cpu", threads), |b| {
            b.iter_custom(|iters| {
                pool.install(|| {
                    let started = std::time::Instant::now();
                    for _ in 0..iters {
                        next = (next + 1) % weights.len();
                        backend
                            .run(&kernel, &[&lhs, &weights[next]], &mut output)
                            .unwrap();
                    }
                    started.elapsed()
                })
            });
        });
        group.finish();
    }
}

criterion_group!(benches, bench_backends, bench_gemm, bench_skinny);
criterion_main!(benches);

/// Every core: the numbers these benches track (and the peers they are
/// compared with) were taken with the device's pool on all of them, while
/// a host's default pool leaves one to the rest of the host.
fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
