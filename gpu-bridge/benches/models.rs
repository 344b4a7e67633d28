//! Resident models: what keeping a model loaded and batching calls buy,
//! and the bert family against candle-transformers' BERT on the same CPU.
//!
//! `cargo bench -p gust-gpu-bridge --bench models`, with all-MiniLM-L6-v2
//! installed by `scripts/fetch-models.sh` (or `GUST_MODELS_DIR`); without it
//! the benches print why and do nothing.
//!
//! - `embed/cold`: open the registry, load the model (sha256, read, upload)
//!   and embed one sentence: a first call. `embed/warm`: the same call on
//!   the resident model. Target: warm ≥ 50× faster.
//! - `embed/warm5` and `embed/warm5_candle`: 5 sentences through the bridge,
//!   and through candle's `BertModel` on the CPU with the same weights,
//!   tokenizer, padding and pooling. Target: bridge ≤ 1.1× candle.
//! - `embed/concurrent32/{batched,unbatched}`: 32 concurrent one-sentence
//!   calls on a tokio runtime, with the manifest's `[batching]` (32 texts,
//!   2 ms) and with batching off. Target: batched ≥ 3× the throughput.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::models::{ModelRegistry, RegistryConfig, ResidentModel};
use gust_gpu_bridge::{Account, Device, DeviceOptions};

// The reference candle BERT, shared with the tests.
#[path = "../tests/shared/candle_bert.rs"]
mod candle_bert;

use candle_bert::CandleBert;

const MODEL: &str = "all-minilm-l6-v2";

const SENTENCES: [&str; 5] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
    "Gust hosts WebAssembly functions with a GPU bridge.",
];

fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("GUST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../gust-data/models"));
    if dir.join(MODEL).join("gust-model.toml").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipping the model benches: no {MODEL} in {} (run scripts/fetch-models.sh)",
            dir.display()
        );
        None
    }
}

fn device() -> Device {
    Device::start_inline(
        CpuBackend::with_threads(4 << 30, all_cores()),
        DeviceOptions::default(),
    )
    .unwrap()
}

fn one() -> Vec<String> {
    vec![SENTENCES[0].to_owned()]
}

fn texts() -> Vec<String> {
    SENTENCES.iter().map(|s| s.to_string()).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn load(dir: &PathBuf, batching: bool, device: &Device) -> Arc<ResidentModel> {
    let registry = ModelRegistry::open_with(
        dir,
        RegistryConfig {
            batching,
            ..RegistryConfig::default()
        },
    )
    .unwrap();
    runtime().block_on(registry.load(MODEL, device)).unwrap()
}

fn bench_cold_warm(c: &mut Criterion, dir: &PathBuf) {
    let rt = runtime();
    let account = Account::new("bench", None, None);
    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("cold", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let device = device();
                let started = Instant::now();
                let registry = ModelRegistry::open(dir).unwrap();
                let model = rt.block_on(registry.load(MODEL, &device)).unwrap();
                let rows = rt.block_on(model.embed(one(), &account, None)).unwrap();
                total += started.elapsed();
                assert_eq!(rows.len(), 1);
            }
            total
        });
    });

    let device = device();
    let model = load(dir, false, &device);
    group.sample_size(50);
    group.bench_function("warm", |b| {
        b.iter(|| rt.block_on(model.embed(one(), &account, None)).unwrap());
    });
    group.bench_function("warm5", |b| {
        b.iter(|| rt.block_on(model.embed(texts(), &account, None)).unwrap());
    });

    let candle = CandleBert::open(&dir.join(MODEL));
    group.bench_function("warm5_candle", |b| b.iter(|| candle.embed(&SENTENCES)));
    group.finish();
}

fn bench_concurrent(c: &mut Criterion, dir: &PathBuf) {
    let rt = runtime();
    let mut group = c.benchmark_group("embed/concurrent32");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(32));
    for (name, batching) in [("batched", true), ("unbatched", false)] {
        let device = device();
        let model = load(dir, batching, &device);
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let calls: Vec<_> = (0..32)
                        .map(|i| {
                            let model = Arc::clone(&model);
                            let text = SENTENCES[i % SENTENCES.len()].to_owned();
                            tokio::spawn(async move {
                                let account = Account::new("caller", None, None);
                                model.embed(vec![text], &account, None).await.unwrap()
                            })
                        })
                        .collect();
                    for call in calls {
                        call.await.unwrap();
                    }
                });
            });
        });
    }
    group.finish();
}

fn bench_models(c: &mut Criterion) {
    let Some(dir) = models_dir() else {
        return;
    };
    bench_cold_warm(c, &dir);
    bench_concurrent(c, &dir);
}

criterion_group!(benches, bench_models);
criterion_main!(benches);

/// Every core: the numbers these benches track (and the peers they are
/// compared with) were taken with the device's pool on all of them, while
/// a host's default pool leaves one to the rest of the host.
fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
