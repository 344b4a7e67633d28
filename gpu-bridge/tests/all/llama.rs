//! The llama family: GGUF reading, the decoder against candle-transformers'
//! `quantized_llama` over the same file, sampling, stop sequences,
//! streaming, and errors. A tiny model the test writes itself runs on every
//! device; the fetched SmolLM2 runs on the cpu when present.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::models::{GgufValue, ModelRegistry, ResidentModel};
use gust_gpu_bridge::{
    DType, Device, DeviceOptions, ErrorCode, FinishReason, GenerateParams, Generation, Op, dtype,
};
use sha2::{Digest, Sha256};

#[path = "../shared/candle_llama.rs"]
mod candle_llama;

use self::candle_llama::{candle_model, dequantized};
use crate::harness::{Rng, account, block_on, devices};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 128;
const LAYERS: usize = 2;
const EOS: u32 = 2;

/// The tiny vocabulary: three control tokens, the byte-level characters of
/// printable ASCII and newline, and a few merges.
fn vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3, 3, 3];
    // GPT-2's byte-to-unicode map sends space and newline to Ġ and Ċ and
    // keeps the other printable characters.
    tokens.push("Ġ".into());
    tokens.push("Ċ".into());
    for b in b'!'..=b'~' {
        tokens.push((b as char).to_string());
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a t"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    types.resize(tokens.len(), 1);
    (tokens, merges.map(String::from).to_vec(), types)
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn manifest(name: &str, family: &str, file: &str, bytes: &[u8]) -> String {
    format!(
        r#"name = "{name}"
family = "{family}"
dtype = "f32"

[[files]]
path = "{file}"
sha256 = "{}"
role = "weights"
format = "gguf"
"#,
        sha256(bytes)
    )
}

/// Write `<root>/<name>/model.gguf` and its manifest; returns the gguf path.
fn write_folder(root: &Path, name: &str, family: &str, bytes: &[u8]) -> PathBuf {
    let folder = root.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(
        folder.join("gust-model.toml"),
        manifest(name, family, "model.gguf", bytes),
    )
    .unwrap();
    path
}

fn qtensor(rng: &mut Rng, shape: &[usize], scale: f32, kind: GgmlDType) -> QTensor {
    let n = shape.iter().product();
    let values: Vec<f32> = rng.f32s(n).iter().map(|v| v * scale).collect();
    let t = candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap();
    QTensor::quantize(&t, kind).unwrap()
}

/// Extra tensors of every block type the reader knows, beside the model's.
const EXTRA: [(&str, GgmlDType); 7] = [
    ("extra.q4_0", GgmlDType::Q4_0),
    ("extra.q5_0", GgmlDType::Q5_0),
    ("extra.q5_1", GgmlDType::Q5_1),
    ("extra.q4k", GgmlDType::Q4K),
    ("extra.q6k", GgmlDType::Q6K),
    ("extra.bf16", GgmlDType::BF16),
    ("extra.f16", GgmlDType::F16),
];

/// The bytes of a tiny llama GGUF: random weights in F32, F16, Q8_0 and
/// Q4_1, tokenizer metadata, and the extra tensors.
fn tiny_gguf(seed: u64) -> Vec<u8> {
    tiny_gguf_with(seed, 1.0)
}

/// [`tiny_gguf`] with the final norm's weights scaled by `norm_scale` (NaN
/// makes every logit NaN).
fn tiny_gguf_with(seed: u64, norm_scale: f32) -> Vec<u8> {
    let mut rng = Rng::seeded(seed);
    let (tokens, merges, types) = vocab();
    let vocab = tokens.len();
    let kv = KV_HEADS * HIDDEN / HEADS;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            qtensor(&mut rng, &[vocab, HIDDEN], 1.0, GgmlDType::Q8_0),
        ),
        (
            "output.weight".into(),
            qtensor(&mut rng, &[vocab, HIDDEN], 0.5, GgmlDType::F16),
        ),
        (
            "output_norm.weight".into(),
            qtensor(&mut rng, &[HIDDEN], norm_scale, GgmlDType::F32),
        ),
    ];
    for i in 0..LAYERS {
        let mut add = |name: &str, shape: &[usize], scale: f32, kind: GgmlDType| {
            tensors.push((
                format!("blk.{i}.{name}.weight"),
                qtensor(&mut rng, shape, scale, kind),
            ));
        };
        add("attn_norm", &[HIDDEN], 1.0, GgmlDType::F32);
        add("attn_q", &[HIDDEN, HIDDEN], 0.3, GgmlDType::Q4_1);
        add("attn_k", &[kv, HIDDEN], 0.3, GgmlDType::Q4_1);
        add("attn_v", &[kv, HIDDEN], 0.3, GgmlDType::Q8_0);
        add("attn_output", &[HIDDEN, HIDDEN], 0.2, GgmlDType::F32);
        add("ffn_norm", &[HIDDEN], 1.0, GgmlDType::F32);
        add("ffn_gate", &[FFN, HIDDEN], 0.3, GgmlDType::Q4_1);
        add("ffn_up", &[FFN, HIDDEN], 0.3, GgmlDType::Q8_0);
        add("ffn_down", &[HIDDEN, FFN], 0.2, GgmlDType::Q4_1);
    }
    for (name, kind) in EXTRA {
        tensors.push((name.into(), qtensor(&mut rng, &[2, 256], 1.0, kind)));
    }
    use gguf_file::Value as V;
    let strings = |v: &[String]| V::Array(v.iter().map(|s| V::String(s.clone())).collect());
    let metadata: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.context_length", V::U32(96)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FFN as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10_000.0)),
        (
            "llama.rope.dimension_count",
            V::U32((HIDDEN / HEADS) as u32),
        ),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&merges)),
        (
            "tokenizer.ggml.token_type",
            V::Array(types.iter().map(|&t| V::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(EOS)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
    ];
    let metadata: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}

/// The tiny model in a fresh models directory, and its gguf path.
struct Tiny {
    dir: tempfile::TempDir,
    gguf: PathBuf,
}

/// A fixed seed: the weights are random but the same every run, so the
/// comparison with candle is reproducible.
const TINY_SEED: u64 = 0x5eed_1a3a;

fn tiny() -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_folder(dir.path(), "tiny-llama", "llama", &tiny_gguf(TINY_SEED));
    Tiny { dir, gguf }
}

fn cpu() -> Device {
    Device::start_inline(CpuBackend::new(1 << 31), DeviceOptions::default()).unwrap()
}

/// Greedy tokens from candle's quantized llama over the GGUF `bytes`.
fn candle_greedy(gguf: &[u8], prompt: &[u32], n: usize) -> Vec<u32> {
    candle_greedy_logits(gguf, prompt, n).0
}

/// Greedy tokens from candle's quantized llama over the GGUF `bytes`, and
/// the logits each was picked from.
fn candle_greedy_logits(gguf: &[u8], prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let device = candle_core::Device::Cpu;
    let mut model = candle_model(gguf);
    let mut out = Vec::new();
    let mut rows = Vec::new();
    let input = candle_core::Tensor::new(prompt, &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits = model.forward(&input, 0).unwrap();
    for i in 0..n {
        rows.push(logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        let next = logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        out.push(next);
        let input = candle_core::Tensor::new(&[next], &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = model.forward(&input, prompt.len() + i).unwrap();
    }
    (out, rows)
}

/// Teacher-forced on candle's tokens, our logits stay within `tolerance`
/// (max |difference| over max |logit|) of candle's at every step, and
/// candle's pick is ours or within `margin` of our best.
fn assert_logits_close(
    model: &ResidentModel,
    prompt: &[u32],
    reference: &[u32],
    rows: &[Vec<f32>],
    tolerance: f32,
    margin: f32,
) {
    let mut context = prompt.to_vec();
    for (i, (&token, row)) in reference.iter().zip(rows).enumerate() {
        let ours = block_on(model.next_token_logits(&context, &account())).unwrap();
        assert_eq!(ours.len(), row.len());
        let scale = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .iter()
            .zip(row)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let best = ours.iter().fold(f32::MIN, |m, &v| m.max(v));
        eprintln!(
            "step {i}: max |ours - candle| = {diff:.4} (of {scale:.2}); candle's token {token} is {:.4} below our best",
            best - ours[token as usize]
        );
        assert!(
            diff <= tolerance * scale,
            "step {i}: logits differ by {diff} (max logit {scale})"
        );
        assert!(
            ours[token as usize] >= best - margin,
            "step {i}: candle picked {token}, {} below our best",
            best - ours[token as usize]
        );
        context.push(token);
    }
}

fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    }
}

fn generate(model: &ResidentModel, prompt: &str, params: &GenerateParams) -> Generation {
    block_on(model.generate(prompt, params, &account(), &mut |_| {
        ControlFlow::Continue(())
    }))
    .unwrap()
}

/// Our first `n` tokens must be candle's (up to where we stopped at EOS).
/// On the cpu backend quantized weights multiply 8-bit activations as
/// candle's quantized matmul does (Q8_1 blocks for Q4_1, Q8_0 for Q8_0);
/// against f32 arithmetic, once two logits are nearly tied the two may part
/// ways, so only a prefix is compared there.
fn assert_matches_candle(what: &str, ours: &Generation, reference: &[u32], n: usize) {
    let m = ours.tokens.len().min(n);
    assert_eq!(
        ours.tokens[..m],
        reference[..m],
        "{what}: tokens differ from candle"
    );
    if ours.finish_reason == FinishReason::Eos && m < n {
        assert_eq!(
            reference[m], EOS,
            "{what}: stopped at EOS where candle did not"
        );
    }
}

#[test]
fn the_tiny_llama_matches_candle_greedy_on_every_device() {
    let tiny = tiny();
    let registry = ModelRegistry::open(tiny.dir.path()).unwrap();
    let prompt = "the cat in the hat sat at 42";
    let bytes = std::fs::read(&tiny.gguf).unwrap();
    let f32_bytes = dequantized(&bytes);
    for device in devices() {
        let model = block_on(registry.load("tiny-llama", device)).unwrap();
        let ids = model.tokenize(prompt).unwrap();
        // The merges apply ("Ġthe" is one token) and digits split apart.
        assert!(ids.len() < prompt.len(), "{ids:?}");
        assert!(ids.contains(&101), "{ids:?}");
        assert!(ids.ends_with(&[3, 24, 22]), "{ids:?}");
        assert_eq!(model.tokenize("<|im_start|>the").unwrap(), [1, 88, 100]);
        let reference = candle_greedy(&bytes, &ids, 20);
        let exact = candle_greedy(&f32_bytes, &ids, 20);
        let ours = generate(&model, prompt, &greedy(20));
        eprintln!(
            "{}: {:?} -> {:?} ({:?}); candle {:?}, on f32 weights {:?}",
            device.description().name,
            ids,
            ours.tokens,
            ours.finish_reason,
            reference,
            exact
        );
        assert!(!ours.tokens.is_empty());
        let name = &device.description().name;
        if device.description().linear {
            // Quantized weights, 8-bit activations: candle's arithmetic.
            assert_matches_candle(name, &ours, &reference, 20);
            assert_matches_candle(&format!("{name} (f32)"), &ours, &exact, 12);
        } else {
            // Weights expanded to f32 at load: f32 arithmetic.
            assert_matches_candle(name, &ours, &reference, 12);
            assert_matches_candle(&format!("{name} (f32)"), &ours, &exact, 20);
        }
    }
}

/// NaN logits fail the call rather than name a token, whether greedy
/// (the argmax runs on the device and only its logit comes back) or
/// sampled (the logits come back), on every device.
#[test]
fn nan_logits_fail_greedy_and_sampled_calls() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf_with(TINY_SEED, f32::NAN);
    write_folder(dir.path(), "nan-llama", "llama", &bytes);
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let sampled = GenerateParams {
        temperature: 0.8,
        seed: Some(7),
        ..greedy(4)
    };
    for device in devices() {
        let model = block_on(registry.load("nan-llama", device)).unwrap();
        for params in [greedy(4), sampled.clone()] {
            let err = block_on(model.generate("the cat", &params, &account(), &mut |_| {
                ControlFlow::Continue(())
            }))
            .expect_err("NaN logits");
            assert!(
                err.message.contains("NaN logits"),
                "{}: {err}",
                device.description().name
            );
        }
    }
}

#[test]
fn every_block_type_dequantizes_as_candle_does() {
    let tiny = tiny();
    let registry = ModelRegistry::open(tiny.dir.path()).unwrap();
    let device = cpu();
    let model = block_on(registry.load("tiny-llama", &device)).unwrap();
    let mut file = std::fs::File::open(&tiny.gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let names = EXTRA.map(|(n, _)| n.to_owned());
    let names = names.iter().map(String::as_str).chain([
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "output.weight",
    ]);
    for name in names {
        let q = content
            .tensor(&mut file, name, &candle_core::Device::Cpu)
            .unwrap();
        let expected: Vec<f32> = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let tensor = model.tensor(name).unwrap();
        assert_eq!(tensor.shape(), q.shape().dims(), "{name}");
        // Blocks the cpu backend multiplies stay quantized; read back, they
        // expand (and on the device, `cast` to f32 expands them) to
        // candle's values.
        let bytes = block_on(device.read(tensor, &account())).unwrap();
        let ours: Vec<f32> = dtype::bytes_to_f64(tensor.dtype(), &bytes)
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect();
        assert_eq!(ours, expected, "{name}");
        let cast =
            block_on(device.run(&Op::Cast { to: DType::F32 }, &[tensor], &account())).unwrap();
        let bytes = block_on(device.read(&cast, &account())).unwrap();
        let cast: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(cast, expected, "{name} cast to f32");
    }
    let meta = model.gguf_metadata().unwrap();
    assert_eq!(meta.version, 2);
    assert_eq!(
        meta.get("llama.block_count").and_then(GgufValue::as_u64),
        Some(LAYERS as u64)
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_top_k_1_is_greedy() {
    let tiny = tiny();
    let registry = ModelRegistry::open(tiny.dir.path()).unwrap();
    let model = block_on(registry.load("tiny-llama", &cpu())).unwrap();
    let prompt = "in the hat";
    let sampled = |seed: u64| {
        generate(
            &model,
            prompt,
            &GenerateParams {
                max_tokens: 16,
                temperature: 1.5,
                seed: Some(seed),
                ..GenerateParams::default()
            },
        )
    };
    let a = sampled(1);
    assert_eq!(a, sampled(1), "same seed, same tokens");
    let others: Vec<Vec<u32>> = (2..6).map(|s| sampled(s).tokens).collect();
    assert!(
        others.iter().any(|t| *t != a.tokens),
        "five seeds gave identical samples: {others:?}"
    );
    let top1 = generate(
        &model,
        prompt,
        &GenerateParams {
            max_tokens: 10,
            temperature: 0.8,
            top_k: Some(1),
            seed: Some(3),
            ..GenerateParams::default()
        },
    );
    assert_eq!(top1, generate(&model, prompt, &greedy(10)));
    let nucleus = GenerateParams {
        max_tokens: 10,
        temperature: 0.7,
        top_p: Some(0.9),
        seed: Some(11),
        ..GenerateParams::default()
    };
    assert_eq!(
        generate(&model, prompt, &nucleus),
        generate(&model, prompt, &nucleus)
    );
}

#[test]
fn stop_sequences_max_tokens_and_streaming() {
    let tiny = tiny();
    let registry = ModelRegistry::open(tiny.dir.path()).unwrap();
    let model = block_on(registry.load("tiny-llama", &cpu())).unwrap();
    let prompt = "the cat";

    let short = generate(&model, prompt, &greedy(3));
    assert!(short.tokens.len() <= 3);
    if short.finish_reason != FinishReason::Eos {
        assert_eq!(short.tokens.len(), 3);
        assert_eq!(short.finish_reason, FinishReason::Length);
    }

    let mut pieces = Vec::new();
    let full = block_on(model.generate(prompt, &greedy(24), &account(), &mut |p| {
        pieces.push(p.to_owned());
        ControlFlow::Continue(())
    }))
    .unwrap();
    assert_eq!(pieces.concat(), full.text, "streamed pieces make the text");
    assert!(
        pieces.len() > 1,
        "text is streamed as it comes, not at the end: {pieces:?}"
    );
    assert!(
        full.text.len() >= 6,
        "too little text to test stops: {full:?}"
    );

    // A stop string from the middle of the text: the output ends before it,
    // and nothing of it is streamed.
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let (from, to) = (chars[2].0, chars.get(5).map_or(full.text.len(), |c| c.0));
    let stop = full.text[from..to].to_owned();
    let cut = full.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let stopped = block_on(model.generate(
        prompt,
        &GenerateParams {
            stop: vec!["never appears \u{1F600}".into(), stop.clone()],
            ..greedy(24)
        },
        &account(),
        &mut |p| {
            streamed.push_str(p);
            ControlFlow::Continue(())
        },
    ))
    .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::Stop, "{stop:?}");
    assert_eq!(stopped.text, full.text[..cut], "{stop:?}");
    assert_eq!(streamed, stopped.text);

    // Break after the first piece.
    let mut calls = 0;
    let cancelled = block_on(model.generate(prompt, &greedy(24), &account(), &mut |_| {
        calls += 1;
        ControlFlow::Break(())
    }))
    .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(cancelled.finish_reason, FinishReason::Cancelled);
    assert!(full.text.starts_with(&cancelled.text));
    assert!(!cancelled.text.is_empty());
}

#[test]
fn concurrent_generations_are_independent() {
    let tiny = tiny();
    let registry = ModelRegistry::open(tiny.dir.path()).unwrap();
    let model = block_on(registry.load("tiny-llama", &cpu())).unwrap();
    let prompts = ["the cat", "in a hat", "at the"];
    let alone: Vec<Generation> = prompts
        .iter()
        .map(|p| generate(&model, p, &greedy(12)))
        .collect();
    let together: Vec<Generation> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let model = Arc::clone(&model);
                s.spawn(move || generate(&model, p, &greedy(12)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
}

#[test]
fn bad_params_are_invalid_arguments() {
    let tiny = tiny();
    let registry = ModelRegistry::open(tiny.dir.path()).unwrap();
    let model = block_on(registry.load("tiny-llama", &cpu())).unwrap();
    let cases = [
        (
            GenerateParams {
                max_tokens: 0,
                ..greedy(1)
            },
            "max-tokens",
        ),
        (
            greedy(gust_gpu_bridge::models::MAX_GENERATE_TOKENS + 1),
            "max-tokens",
        ),
        (
            GenerateParams {
                temperature: f32::NAN,
                ..greedy(4)
            },
            "temperature",
        ),
        (
            GenerateParams {
                temperature: -1.0,
                ..greedy(4)
            },
            "temperature",
        ),
        (
            GenerateParams {
                top_p: Some(0.0),
                ..greedy(4)
            },
            "top-p",
        ),
        (
            GenerateParams {
                top_p: Some(1.5),
                ..greedy(4)
            },
            "top-p",
        ),
        (
            GenerateParams {
                top_k: Some(0),
                ..greedy(4)
            },
            "top-k",
        ),
        (
            GenerateParams {
                stop: vec![String::new()],
                ..greedy(4)
            },
            "stop",
        ),
    ];
    for (params, field) in cases {
        let err = block_on(model.generate("the", &params, &account(), &mut |_| {
            ControlFlow::Continue(())
        }))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{params:?}: {err}");
        assert!(err.message.contains(field), "{params:?}: {err}");
    }
    // A prompt longer than the 96-position context.
    let err = block_on(
        model.generate(&"the ".repeat(100), &greedy(4), &account(), &mut |_| {
            ControlFlow::Continue(())
        }),
    )
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    assert!(err.message.contains("context"), "{err}");

    // A prompt of 93 tokens leaves room for 3 of the 50 asked for.
    let long = format!("the{}", " the".repeat(91));
    assert_eq!(model.tokenize(&long).unwrap().len(), 93);
    let near_full = generate(&model, &long, &greedy(50));
    assert!(near_full.tokens.len() <= 3, "{near_full:?}");
    if near_full.finish_reason != FinishReason::Eos {
        assert_eq!(near_full.finish_reason, FinishReason::Length);
        assert_eq!(near_full.tokens.len(), 3);
    }
}

#[test]
fn malformed_gguf_files_are_clear_errors() {
    let good = tiny_gguf(TINY_SEED);
    let mut huge_count = good.clone();
    huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    // The first key's length, made enormous.
    let mut huge_string = good.clone();
    huge_string[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("truncated", good[..good.len() / 2].to_vec(), "tensor"),
        ("header-only", good[..40].to_vec(), "left in the file"),
        ("huge-count", huge_count, "tensor count"),
        ("bad-magic", bad_magic, "magic"),
        ("huge-string", huge_string, "metadata key"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, _) in &cases {
        write_folder(dir.path(), name, "llama", bytes);
    }
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let device = cpu();
    for (name, _, why) in cases {
        let err = block_on(registry.load(name, &device)).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{name}: {err}");
        assert!(
            err.message.contains("not a valid GGUF file"),
            "{name}: {err}"
        );
        assert!(err.message.contains(why), "{name}: {err}");
    }
    assert_eq!(device.used_bytes(), 0);
}

#[test]
fn other_families_do_not_generate() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), "plain", "generic", &tiny_gguf(1));
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let model = block_on(registry.load("plain", &cpu())).unwrap();
    assert!(model.tensor("token_embd.weight").is_some());
    let err = block_on(model.generate("hi", &greedy(2), &account(), &mut |_| {
        ControlFlow::Continue(())
    }))
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::Unsupported, "{err}");
}

/// The models directory: `GUST_MODELS_DIR`, else the workspace's
/// `gust-data/models`.
pub(crate) fn models_dir() -> PathBuf {
    std::env::var_os("GUST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../gust-data/models"))
}

const SMOLLM: &str = "smollm2-135m-instruct";

/// The fetched SmolLM2-135M-Instruct (Q4_1 GGUF), when present: greedy
/// tokens match candle's quantized llama, and it knows its capitals.
#[test]
fn the_fetched_smollm2_matches_candle_when_present() {
    let dir = models_dir();
    if !dir.join(SMOLLM).join("gust-model.toml").is_file() {
        eprintln!(
            "skipping the SmolLM2 test: no {SMOLLM} in {} \
             (run scripts/fetch-models.sh or set GUST_MODELS_DIR)",
            dir.display()
        );
        return;
    }
    let registry = ModelRegistry::open(&dir).unwrap();
    let device = cpu();
    let model = block_on(registry.load(SMOLLM, &device)).unwrap();
    assert_eq!(model.family(), "llama");
    assert_eq!(model.gguf_metadata().unwrap().version, 3);
    // Resident as the file's own blocks: the weights, the norms and the
    // rotary tables come to at most 1.3 times the file (f32 weights were
    // 5.5 times).
    let gguf = dir.join(SMOLLM).join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let file = std::fs::metadata(&gguf).unwrap().len();
    let resident = registry.account().used_bytes();
    eprintln!("SmolLM2: {resident} bytes resident for a {file}-byte file");
    assert!(
        resident as f64 <= 1.3 * file as f64,
        "{resident} bytes resident for a {file}-byte file"
    );
    let prompt = "The capital of France is";
    let ids = model.tokenize(prompt).unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
    let bytes = std::fs::read(&gguf).unwrap();
    let ours = generate(&model, prompt, &greedy(16));
    eprintln!("SmolLM2: {:?} -> {:?}", ours.text, ours.tokens);
    assert!(ours.text.contains("Paris"), "{:?}", ours.text);

    // llama.cpp (llama-cpp-python 0.3.36, 2 threads, greedy; what
    // `benches/llama_cpp.sh` runs) on this same file, whose sha256 the
    // manifest pins, picks these 16 tokens. Ours multiply the same 8-bit
    // activation blocks with the same Q4_1/Q8_0 blocks; attention sums in
    // another order (llama.cpp keeps its cache in f16). The 15th token
    // ("…approximately 32" or "31") is a near tie: with the fused cpu
    // attention our top two logits there are 0.003 apart (29.672 against
    // 29.669), with attention composed of matmuls 0.05. So the first 14
    // must be llama.cpp's, and where ours part from llama.cpp's its token
    // must be within a near tie of our choice.
    const LLAMA_CPP: [u32; 16] = [
        7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33, 33,
    ];
    let agree = ours
        .tokens
        .iter()
        .zip(&LLAMA_CPP)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        agree >= 14,
        "SmolLM2: tokens differ from llama.cpp's at {agree}: {:?} vs {LLAMA_CPP:?}",
        ours.tokens
    );
    if agree < LLAMA_CPP.len() {
        let mut context = ids.clone();
        context.extend(&ours.tokens[..agree]);
        let logits = block_on(model.next_token_logits(&context, &account())).unwrap();
        let ours_logit = logits[ours.tokens[agree] as usize];
        let theirs = logits[LLAMA_CPP[agree] as usize];
        assert!(
            ours_logit - theirs < 0.1,
            "SmolLM2: token {agree}: llama.cpp's {} has logit {theirs}, ours {} {ours_logit}",
            LLAMA_CPP[agree],
            ours.tokens[agree]
        );
    }

    // Candle (its quantized matmul, and the same weights multiplied in
    // f32) rounds differently, and a near tie at step 5 goes the other
    // way. Its first 5 tokens are ours, and teacher-forced on its 16, its
    // logits stay within 10% of ours and its pick within 0.5 of our best.
    for (what, weights) in [
        ("SmolLM2", bytes.clone()),
        ("SmolLM2 (f32)", dequantized(&bytes)),
    ] {
        let (reference, rows) = candle_greedy_logits(&weights, &ids, 16);
        assert_matches_candle(what, &ours, &reference, 5);
        assert_logits_close(&model, &ids, &reference, &rows, 0.10, 0.5);
    }

    // The chat template's control tokens are single tokens, and the
    // instruct model ends its answer with <|im_end|> (its EOS).
    let chat =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let chat_ids = model.tokenize(chat).unwrap();
    assert_eq!(chat_ids[0], 1, "{chat_ids:?}");
    assert!(chat_ids.contains(&2), "{chat_ids:?}");
    let answer = generate(&model, chat, &greedy(32));
    eprintln!("SmolLM2 chat: {answer:?}");
    assert_eq!(answer.finish_reason, FinishReason::Eos, "{answer:?}");
    assert!(answer.text.contains("Paris"), "{answer:?}");
}

#[test]
fn quantized_weights_stay_quantized_on_the_cpu() {
    let tiny = tiny();
    let registry = ModelRegistry::open(tiny.dir.path()).unwrap();
    let device = cpu();
    let model = block_on(registry.load("tiny-llama", &device)).unwrap();
    let embd = model.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.shape(), [vocab().0.len(), HIDDEN]);
    // Resident as the file's own blocks: 34 bytes per 32 values.
    assert_eq!(embd.dtype(), DType::Q8_0);
    assert_eq!(embd.byte_len(), vocab().0.len() * HIDDEN / 32 * 34);
    assert_eq!(
        model.tensor("blk.0.ffn_gate.weight").unwrap().dtype(),
        DType::Q4_1
    );
    // F16 has no kernels of its own here: expanded to f32 at load.
    assert_eq!(model.tensor("output.weight").unwrap().dtype(), DType::F32);
    let norm =
        block_on(device.read(model.tensor("output_norm.weight").unwrap(), &account())).unwrap();
    assert!(
        dtype::bytes_to_f64(gust_gpu_bridge::DType::F32, &norm)
            .unwrap()
            .iter()
            .all(|v| v.is_finite() && v.abs() <= 2.0)
    );
}

#[test]
fn block_types_the_reader_lacks_are_unsupported_by_name() {
    let mut rng = Rng::seeded(5);
    let q2k = qtensor(&mut rng, &[1, 256], 1.0, GgmlDType::Q2K);
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &[], &[("w", &q2k)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), "q2k", "generic", &out.into_inner());
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let err = block_on(registry.load("q2k", &cpu())).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unsupported, "{err}");
    assert!(err.message.contains("Q2_K"), "{err}");
}

/// The decoder's matrix-vector products (`W[out, in] @ x[in, 1]`) take a
/// row-split path on the cpu backend: checked against f64 on every device.
#[test]
fn large_matrix_vector_products_match_the_reference() {
    let mut rng = Rng::fresh();
    let (m, k) = (1000, 600);
    let w = rng.f32s(m * k);
    let x = rng.f32s(k);
    let expected: Vec<f64> = w
        .chunks_exact(k)
        .map(|row| {
            row.iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum()
        })
        .collect();
    let account = account();
    for device in devices() {
        let wt = crate::harness::upload_f32(device, &[m, k], &w, &account);
        let xt = crate::harness::upload_f32(device, &[k, 1], &x, &account);
        let y = crate::harness::run(device, gust_gpu_bridge::Op::Matmul, &[&wt, &xt], &account);
        assert_eq!(y.shape(), [m, 1]);
        let out = crate::harness::read_f64(device, &y, &account);
        crate::harness::assert_close("matrix-vector", device, &out, &expected, rng.seed);
    }
}

/// `gguf` with metadata `key` set to `value` (or removed when `None`).
fn with_metadata(gguf: &[u8], key: &str, value: Option<gguf_file::Value>) -> Vec<u8> {
    let cpu = candle_core::Device::Cpu;
    let mut reader = std::io::Cursor::new(gguf);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            (
                name.clone(),
                content.tensor(&mut reader, name, &cpu).unwrap(),
            )
        })
        .collect();
    let mut metadata = content.metadata.clone();
    match value {
        Some(v) => metadata.insert(key.to_owned(), v),
        None => metadata.remove(key),
    };
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}

#[test]
fn inconsistent_llama_metadata_fails_the_load_clearly() {
    use gguf_file::Value as V;
    let good = tiny_gguf(TINY_SEED);
    let cases: [(&str, &str, Option<V>, ErrorCode, &str); 5] = [
        (
            "heads",
            "llama.attention.head_count",
            Some(V::U32(3)),
            ErrorCode::InvalidArgument,
            "do not divide",
        ),
        (
            "no-layers",
            "llama.block_count",
            None,
            ErrorCode::InvalidArgument,
            "llama.block_count",
        ),
        (
            "more-layers",
            "llama.block_count",
            Some(V::U32(3)),
            ErrorCode::InvalidArgument,
            "blk.2.attn_norm.weight` is missing",
        ),
        (
            "arch",
            "general.architecture",
            Some(V::String("qwen2".into())),
            ErrorCode::Unsupported,
            "qwen2",
        ),
        (
            "spm",
            "tokenizer.ggml.model",
            Some(V::String("llama".into())),
            ErrorCode::Unsupported,
            "tokenizer model `llama`",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, key, value, _, _) in &cases {
        write_folder(
            dir.path(),
            name,
            "llama",
            &with_metadata(&good, key, value.clone()),
        );
    }
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let device = cpu();
    for (name, _, _, code, why) in cases {
        let err = block_on(registry.load(name, &device)).unwrap_err();
        assert_eq!(err.code, code, "{name}: {err}");
        assert!(err.message.contains(why), "{name}: {err}");
    }
    assert_eq!(device.used_bytes(), 0, "a failed load frees its tensors");
}
