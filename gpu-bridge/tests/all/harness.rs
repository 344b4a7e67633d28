//! Devices under test, random inputs, and comparison helpers.

use std::sync::{Arc, OnceLock};

use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::backend::cuda::CudaBackend;
use gust_gpu_bridge::backend::wgpu::{WgpuBackend, WgpuOptions};
use gust_gpu_bridge::{Account, DType, Device, DeviceOptions, Op, Tensor, dtype};

// A low inline threshold sends the small cases to the cpu device's
// caller-thread path and the larger ones to its worker: both get tested.
const TEST_OPTIONS: DeviceOptions = DeviceOptions {
    queue_depth: 64,
    poison_outputs: true,
    inline_max_elements: 256,
};

/// Every device this build and machine offer, opened once per test binary.
/// The cpu device is always there; the others print why they are skipped.
pub(crate) fn devices() -> &'static [Device] {
    static DEVICES: OnceLock<Vec<Device>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let mut devices =
            vec![Device::start_inline(CpuBackend::new(1 << 30), TEST_OPTIONS).unwrap()];
        match WgpuBackend::open(&WgpuOptions {
            allow_software: true,
        }) {
            Ok(b) => devices.push(Device::start(b, TEST_OPTIONS).unwrap()),
            Err(e) => eprintln!("skipping wgpu tests: {e}"),
        }
        match CudaBackend::open(0) {
            Ok(b) => devices.push(Device::start(b, TEST_OPTIONS).unwrap()),
            Err(e) => eprintln!("skipping cuda tests: {e}"),
        }
        for d in &devices {
            eprintln!(
                "testing on {} ({}, is_gpu={})",
                d.description().name,
                d.kind(),
                d.description().is_gpu
            );
        }
        devices
    })
}

/// A fresh, unlimited account.
pub(crate) fn account() -> Arc<Account> {
    Account::new("test", None, None)
}

pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

/// A small xorshift generator, seeded from the clock so every run draws
/// fresh inputs; the seed is printed in failure messages, and
/// `GUST_TEST_SEED=<seed>` replays it.
pub(crate) struct Rng {
    state: u64,
    pub(crate) seed: u64,
}

impl Rng {
    pub(crate) fn fresh() -> Self {
        if let Some(seed) = std::env::var("GUST_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return Self::seeded(seed);
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Self::seeded(seed)
    }

    pub(crate) fn seeded(seed: u64) -> Self {
        Self {
            state: seed | 1,
            seed,
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub(crate) fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit() * 2.0).collect()
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub(crate) fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in [lo, hi), with f64 resolution.
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }

    pub(crate) fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

pub(crate) fn upload_f32(
    device: &Device,
    shape: &[usize],
    values: &[f32],
    account: &Arc<Account>,
) -> Tensor {
    block_on(device.upload(DType::F32, shape, dtype::f32_to_bytes(values), account)).unwrap()
}

pub(crate) fn run(device: &Device, op: Op, operands: &[&Tensor], account: &Arc<Account>) -> Tensor {
    block_on(device.run(&op, operands, account))
        .unwrap_or_else(|e| panic!("{} on {}: {e}", op.name(), device.description().name))
}

pub(crate) fn read_f64(device: &Device, tensor: &Tensor, account: &Arc<Account>) -> Vec<f64> {
    let bytes = block_on(device.read(tensor, account)).unwrap();
    dtype::bytes_to_f64(tensor.dtype(), &bytes).unwrap()
}

/// ‖out − ref‖ / ‖ref‖ (or ‖out‖ when the reference is all zeros); NaN
/// anywhere in the output fails.
pub(crate) fn relative_error(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "element count");
    if out.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let diff: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = reference.iter().map(|v| v * v).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}

/// Absolute error allowed per element on top of the relative bound: a
/// result that cancels to near zero (a sum of random ±1 values, say) carries
/// the rounding of its O(1) operands, which no relative bound on the result
/// can judge. f32 rounds those at ~1e-7 each.
const ABSOLUTE_SLACK: f64 = 1e-6;

pub(crate) fn assert_close(what: &str, device: &Device, out: &[f64], reference: &[f64], seed: u64) {
    let err = relative_error(out, reference);
    let norm: f64 = reference.iter().map(|v| v * v).sum::<f64>().sqrt();
    // The absolute slack, as a share of the reference's norm.
    let slack = if norm == 0.0 {
        0.0
    } else {
        ABSOLUTE_SLACK * (reference.len() as f64).sqrt() / norm
    };
    assert!(
        err <= 1e-5 + slack,
        "{what} on {}: relative error {err:e} > 1e-5 (+{slack:e} absolute slack) (seed {seed})\n out[..8]={:?}\n ref[..8]={:?}",
        device.description().name,
        &out[..out.len().min(8)],
        &reference[..reference.len().min(8)]
    );
}

/// A multi-threaded tokio runtime, for tests whose calls batch concurrently.
pub(crate) fn batching_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// A tiny random BERT named `tiny-bert`, written to a fresh directory with
/// `manifest_extra` appended to its manifest (a `[batching]` table, say),
/// and loaded on `device`. The directory lives as long as the guard.
pub(crate) fn load_tiny_bert(
    rt: &tokio::runtime::Runtime,
    device: &Device,
    manifest_extra: &str,
    seed: u64,
) -> (
    tempfile::TempDir,
    Arc<gust_gpu_bridge::models::ResidentModel>,
) {
    let dir = tempfile::tempdir().unwrap();
    gust_gpu_bridge::models::testing::write_tiny_bert(
        dir.path(),
        "tiny-bert",
        manifest_extra,
        seed,
    )
    .unwrap();
    let registry = gust_gpu_bridge::models::ModelRegistry::open(dir.path()).unwrap();
    let model = rt.block_on(registry.load("tiny-bert", device)).unwrap();
    (dir, model)
}

/// The same `tiny-bert` files loaded again by a registry with batching off:
/// what each call would give alone.
pub(crate) fn load_unbatched(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    device: &Device,
) -> Arc<gust_gpu_bridge::models::ResidentModel> {
    let registry = gust_gpu_bridge::models::ModelRegistry::open_with(
        dir,
        gust_gpu_bridge::models::RegistryConfig {
            batching: false,
            ..gust_gpu_bridge::models::RegistryConfig::default()
        },
    )
    .unwrap();
    rt.block_on(registry.load("tiny-bert", device)).unwrap()
}
