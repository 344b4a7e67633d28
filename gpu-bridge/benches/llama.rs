//! Text generation with the llama family on the cpu backend, next to
//! candle-transformers' `quantized_llama` over the same GGUF file.
//!
//! `cargo bench -p gust-gpu-bridge --bench llama` (set `GUST_MODELS_DIR`, or
//! fetch the models into `gust-data/models`; skipped when SmolLM2 is absent).
//!
//! - `generate32/bridge`: `ResidentModel::generate_tokens`, greedy, 32 new
//!   tokens after a 6-token prompt (prefill included), as the host calls it.
//! - `generate32/candle`: the same prompt and 32 greedy steps with candle's
//!   quantized matmul (Q4_1 weights, 8-bit activations), KV cache cleared
//!   per iteration.
//! - `generate32/candle-f32`: candle with the weights dequantized to f32,
//!   the same arithmetic as the bridge (`CANDLE_DEQUANTIZE_ALL`-style).
//!
//! Throughput is reported in elements/s = tokens/s.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_transformers::models::quantized_llama::ModelWeights;

#[path = "../tests/shared/candle_llama.rs"]
mod candle_llama;
use candle_llama::{candle_model, dequantized};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::models::ModelRegistry;
use gust_gpu_bridge::{Account, Device, DeviceOptions, GenerateParams};

const MODEL: &str = "smollm2-135m-instruct";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT: &str = "Once upon a time, there was";
const TOKENS: u32 = 32;

fn models_dir() -> PathBuf {
    std::env::var_os("GUST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../gust-data/models"))
}

/// Greedy generation of `TOKENS` tokens with candle; returns them.
fn candle_generate(model: &mut ModelWeights, prompt: &[u32]) -> Vec<u32> {
    let device = candle_core::Device::Cpu;
    model.clear_kv_cache();
    let input = candle_core::Tensor::new(prompt, &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits = model.forward(&input, 0).unwrap();
    let mut out = Vec::with_capacity(TOKENS as usize);
    for i in 0..TOKENS as usize {
        let next = logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        out.push(next);
        if i + 1 == TOKENS as usize {
            break;
        }
        let input = candle_core::Tensor::new(&[next], &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = model.forward(&input, prompt.len() + i).unwrap();
    }
    out
}

fn bench_generate(c: &mut Criterion) {
    let dir = models_dir();
    let gguf = dir.join(MODEL).join(FILE);
    if !gguf.is_file() {
        eprintln!(
            "skipping the llama bench: no {} (run scripts/fetch-models.sh or set GUST_MODELS_DIR)",
            gguf.display()
        );
        return;
    }
    let registry = ModelRegistry::open(&dir).unwrap();
    let device = Device::start_inline(
        CpuBackend::with_threads(4 << 30, all_cores()),
        DeviceOptions::default(),
    )
    .unwrap();
    let model = pollster::block_on(registry.load(MODEL, &device)).unwrap();
    let account = Account::new("bench", None, None);
    let prompt = model.tokenize(PROMPT).unwrap();
    let params = GenerateParams {
        max_tokens: TOKENS,
        ..GenerateParams::default()
    };
    let ours = || {
        pollster::block_on(model.generate_tokens(&prompt, &params, &account, &mut |_| {
            ControlFlow::Continue(())
        }))
        .unwrap()
    };
    let generation = ours();
    assert_eq!(
        generation.tokens.len(),
        TOKENS as usize,
        "the bench prompt must not reach EOS: {generation:?}"
    );
    eprintln!("bridge: {:?}", generation.text);

    let bytes = std::fs::read(&gguf).unwrap();
    let mut candle = candle_model(&bytes);
    let mut candle_f32 = candle_model(&dequantized(&bytes));
    // Our arithmetic is llama.cpp's (8-bit activation blocks against the
    // quantized weights), not candle's: its tokens are for the record.
    eprintln!(
        "candle: {:?}; on f32 weights: {:?}",
        candle_generate(&mut candle, &prompt),
        candle_generate(&mut candle_f32, &prompt)
    );

    let mut group = c.benchmark_group("generate32");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(u64::from(TOKENS)));
    group.bench_function("bridge", |b| b.iter(ours));
    group.bench_function("candle", |b| {
        b.iter(|| candle_generate(&mut candle, &prompt))
    });
    group.bench_function("candle-f32", |b| {
        b.iter(|| candle_generate(&mut candle_f32, &prompt))
    });
    group.finish();
}

criterion_group!(benches, bench_generate);
criterion_main!(benches);

/// Every core: the numbers these benches track (and the peers they are
/// compared with) were taken with the device's pool on all of them, while
/// a host's default pool leaves one to the rest of the host.
fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
