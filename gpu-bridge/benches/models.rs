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
    Device::start_inline(CpuBackend::new(4 << 30), DeviceOptions::default()).unwrap()
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

/// The reference: candle-transformers' BERT, tokenized and pooled as the
/// bridge does (longest-in-batch padding, masked mean, L2).
struct CandleBert {
    model: candle_transformers::models::bert::BertModel,
    tokenizer: tokenizers::Tokenizer,
}

impl CandleBert {
    fn open(folder: &std::path::Path) -> Self {
        use candle_transformers::models::bert::{BertModel, Config};
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
                .unwrap();
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(folder.join("tokenizer.json")).unwrap();
        let padding = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::BatchLongest,
            ..padding
        }));
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: config.max_position_embeddings,
                ..Default::default()
            }))
            .unwrap();
        let weights = std::fs::read(folder.join("model.safetensors")).unwrap();
        let vb = candle_nn::VarBuilder::from_buffered_safetensors(
            weights,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        Self {
            model: BertModel::load(vb, &config).unwrap(),
            tokenizer,
        }
    }

    fn embed(&self, texts: &[&str]) -> Vec<Vec<f32>> {
        use candle_core::{DType, Device, Tensor};
        let encodings = self
            .tokenizer
            .encode_batch(
                texts.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                true,
            )
            .unwrap();
        let s = encodings[0].len();
        let ids: Vec<u32> = encodings
            .iter()
            .flat_map(|e| e.get_ids().to_vec())
            .collect();
        let mask: Vec<u32> = encodings
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let ids = Tensor::from_vec(ids, (texts.len(), s), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(mask, (texts.len(), s), &Device::Cpu).unwrap();
        let hidden = self
            .model
            .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
            .unwrap();
        let mask = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
        let pooled = hidden
            .broadcast_mul(&mask)
            .unwrap()
            .sum(1)
            .unwrap()
            .broadcast_div(&mask.sum(1).unwrap())
            .unwrap();
        let norm = pooled
            .sqr()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .sqrt()
            .unwrap();
        pooled.broadcast_div(&norm).unwrap().to_vec2().unwrap()
    }
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
