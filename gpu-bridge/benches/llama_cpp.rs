//! The llama runner called in process, as `benches/llama_cpp.sh` compares it
//! with llama.cpp: prompt processing and generation tokens/s, greedy, on
//! the cpu backend with `THREADS` threads (default 2).
//!
//! Not a criterion bench: the script interleaves rounds of this binary with
//! rounds of llama.cpp and of `gust serve`, so that both engines see the
//! same machine state. Each round prints one line:
//! `runner pp_tokens=P pp_tps=… tg_tokens=N tg_tps=… tokens=[…]`.
//!
//! Environment: `GUST_MODELS_DIR` (default `gust-data/models`), `PROMPT`
//! (the prompt text), `GEN` (tokens to generate, default 64), `ROUNDS`
//! (default 3), `THREADS` (default 2).

#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::models::ModelRegistry;
use gust_gpu_bridge::{Account, Device, DeviceOptions, GenerateParams};

const MODEL: &str = "smollm2-135m-instruct";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command
    // line.
    let dir = std::env::var_os("GUST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../gust-data/models"));
    if !dir.join(MODEL).join("gust-model.toml").is_file() {
        eprintln!(
            "skipping: no {MODEL} in {} (run scripts/fetch-models.sh or set GUST_MODELS_DIR)",
            dir.display()
        );
        return;
    }
    let prompt = std::env::var("PROMPT").unwrap_or_else(|_| "Once upon a time, there was".into());
    let generate: u32 = env_or("GEN", 64);
    let rounds: usize = env_or("ROUNDS", 3);
    let threads: usize = env_or("THREADS", 2);

    let rss_before = rss_bytes();
    let registry = ModelRegistry::open(&dir).unwrap();
    let device = Device::start_inline(
        CpuBackend::with_threads(4 << 30, threads),
        DeviceOptions::default(),
    )
    .unwrap();
    let model = pollster::block_on(registry.load(MODEL, &device)).unwrap();
    let account = Account::new("bench", None, None);
    let ids = model.tokenize(&prompt).unwrap();
    let params = GenerateParams {
        max_tokens: generate,
        ..GenerateParams::default()
    };
    let run = || {
        let started = Instant::now();
        // The first token arrives after the prompt's forward pass and one
        // sample: prompt processing ends there, generation starts.
        let mut first = None;
        let generation =
            pollster::block_on(model.generate_tokens(&ids, &params, &account, &mut |_| {
                first.get_or_insert_with(Instant::now);
                ControlFlow::Continue(())
            }))
            .unwrap();
        let ended = Instant::now();
        let first = first.unwrap_or(ended);
        (generation, started, first, ended)
    };
    // Warm: the first run faults in buffers.
    run();
    let file = std::fs::metadata(dir.join(MODEL).join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .map_or(0, |m| m.len());
    let resident = registry.account().used_bytes();
    let growth = rss_bytes().saturating_sub(rss_before);
    println!(
        "resident file_bytes={file} device_bytes={resident} ({:.2}x) rss_growth={growth} ({:.2}x)",
        resident as f64 / file as f64,
        growth as f64 / file as f64
    );
    for _ in 0..rounds {
        let (generation, started, first, ended) = run();
        let produced = generation.tokens.len();
        assert_eq!(
            produced, generate as usize,
            "the prompt must not reach EOS: {generation:?}"
        );
        let pp = (first - started).as_secs_f64();
        let tg = (ended - first).as_secs_f64();
        println!(
            "runner pp_tokens={} pp_tps={:.1} tg_tokens={} tg_tps={:.1} tokens={:?}",
            ids.len(),
            ids.len() as f64 / pp,
            produced - 1,
            (produced - 1) as f64 / tg,
            generation.tokens
        );
    }
}

/// This process's resident set, from `/proc/self/status` (0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}
