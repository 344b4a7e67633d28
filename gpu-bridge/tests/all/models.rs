//! The model registry: manifests, checksums, resident sharing, eviction.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::models::{FileRole, ModelRegistry, RegistryConfig, RegistryStats};
use gust_gpu_bridge::{DType, Device, DeviceOptions, ErrorCode, dtype};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

use crate::harness::{Rng, batching_runtime, block_on, load_tiny_bert, load_unbatched};

/// A cpu device of its own per test, so budgets and byte counts are not
/// shared with tests running beside it.
fn cpu() -> Device {
    Device::start_inline(CpuBackend::new(1 << 30), DeviceOptions::default()).unwrap()
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One tensor to write: name, safetensors dtype, shape, little-endian bytes.
struct Spec {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn f32_spec(name: &'static str, shape: &[usize], values: &[f32]) -> Spec {
    Spec {
        name,
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: dtype::f32_to_bytes(values),
    }
}

fn safetensors_bytes(specs: &[Spec]) -> Vec<u8> {
    let views: Vec<(&str, TensorView<'_>)> = specs
        .iter()
        .map(|s| {
            (
                s.name,
                TensorView::new(s.dtype, s.shape.clone(), &s.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Write `<root>/<name>/` with `model.safetensors`, a `config.json` and a
/// manifest with the right checksums; returns the model folder.
fn write_model(root: &Path, name: &str, specs: &[Spec]) -> PathBuf {
    let folder = root.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let weights = safetensors_bytes(specs);
    std::fs::write(folder.join("model.safetensors"), &weights).unwrap();
    let config = br#"{"hidden_size": 4}"#;
    std::fs::write(folder.join("config.json"), config).unwrap();
    let manifest = format!(
        r#"name = "{name}"
family = "generic"
dtype = "f32"

[[files]]
path = "model.safetensors"
sha256 = "{}"
role = "weights"
format = "safetensors"

[[files]]
path = "config.json"
sha256 = "{}"
role = "config"
"#,
        sha256(&weights),
        sha256(config)
    );
    std::fs::write(folder.join("gust-model.toml"), manifest).unwrap();
    folder
}

/// A model of `n` random f32 values in one tensor (`4n` bytes).
fn write_sized(root: &Path, name: &str, n: usize, rng: &mut Rng) -> Vec<f32> {
    let values = rng.f32s(n);
    write_model(root, name, &[f32_spec("w", &[n], &values)]);
    values
}

fn read_f32(device: &Device, tensor: &gust_gpu_bridge::Tensor) -> Vec<f32> {
    let account = gust_gpu_bridge::Account::new("reader", None, None);
    let bytes = block_on(device.read(tensor, &account)).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn a_model_loads_once_and_its_weights_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    let w = rng.f32s(12);
    let b = rng.f32s(3);
    write_model(
        dir.path(),
        "tiny",
        &[
            f32_spec("layer.weight", &[4, 3], &w),
            f32_spec("layer.bias", &[3], &b),
        ],
    );
    let registry = ModelRegistry::open(dir.path()).unwrap();
    assert!(registry.problems().is_empty(), "{:?}", registry.problems());
    assert_eq!(
        registry
            .list()
            .map(|e| e.manifest.name.as_str())
            .collect::<Vec<_>>(),
        ["tiny"]
    );
    let device = cpu();

    let model = block_on(registry.load("tiny", &device)).unwrap();
    assert_eq!(model.name(), "tiny");
    assert_eq!(model.family(), "generic");
    assert_eq!(
        model.tensor_names().collect::<Vec<_>>(),
        ["layer.bias", "layer.weight"]
    );
    assert_eq!(model.bytes(), 15 * 4);
    assert_eq!(
        model.manifest().file(FileRole::Config).unwrap().path,
        Path::new("config.json")
    );
    let weight = model.tensor("layer.weight").unwrap();
    assert_eq!(weight.shape(), [4, 3]);
    assert_eq!(weight.dtype(), DType::F32);
    assert_eq!(read_f32(&device, weight), w, "seed {}", rng.seed);
    assert_eq!(read_f32(&device, model.tensor("layer.bias").unwrap()), b);
    assert!(model.tensor("nope").is_none());
    assert_eq!(registry.account().used_bytes(), 60);
    assert_eq!(registry.resident_bytes(&device), 60);

    let again = block_on(registry.load("tiny", &device)).unwrap();
    assert!(
        Arc::ptr_eq(&model, &again),
        "a second load shares the model"
    );
    assert_eq!(
        registry.stats(),
        RegistryStats {
            loads: 1,
            hits: 1,
            failures: 0,
            evictions: 0
        }
    );

    // Another device gets its own copy.
    let other = cpu();
    let there = block_on(registry.load("tiny", &other)).unwrap();
    assert!(!Arc::ptr_eq(&model, &there));
    assert_eq!(registry.account().used_bytes(), 120);
}

#[test]
fn half_and_integer_tensors_keep_their_dtype_and_i64_narrows() {
    let dir = tempfile::tempdir().unwrap();
    let halves: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let ints: Vec<u8> = [7i32, -3, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_model(
        dir.path(),
        "mixed",
        &[
            Spec {
                name: "h",
                dtype: Dtype::F16,
                shape: vec![2],
                data: halves.clone(),
            },
            Spec {
                name: "i",
                dtype: Dtype::I32,
                shape: vec![3],
                data: ints.clone(),
            },
            Spec {
                name: "position_ids",
                dtype: Dtype::I64,
                shape: vec![1, 3],
                data: [7i64, -3, 0].iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ],
    );
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let device = cpu();
    let model = block_on(registry.load("mixed", &device)).unwrap();
    let account = registry.account();
    let h = model.tensor("h").unwrap();
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(block_on(device.read(h, account)).unwrap(), halves);
    let i = model.tensor("i").unwrap();
    assert_eq!(i.dtype(), DType::I32);
    assert_eq!(block_on(device.read(i, account)).unwrap(), ints);
    // int64 index tensors load narrowed to i32.
    let p = model.tensor("position_ids").unwrap();
    assert_eq!((p.dtype(), p.shape()), (DType::I32, &[1, 3][..]));
    assert_eq!(block_on(device.read(p, account)).unwrap(), ints);
}

#[test]
fn concurrent_first_loads_load_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    write_sized(dir.path(), "shared", 4096, &mut rng);
    let registry = Arc::new(ModelRegistry::open(dir.path()).unwrap());
    let device = cpu();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let models = runtime.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let registry = Arc::clone(&registry);
                let device = device.clone();
                tokio::spawn(async move { registry.load("shared", &device).await })
            })
            .collect();
        let mut models = Vec::new();
        for task in tasks {
            models.push(task.await.unwrap().unwrap());
        }
        models
    });
    assert!(models.iter().all(|m| Arc::ptr_eq(m, &models[0])));
    let stats = registry.stats();
    assert_eq!(stats.loads, 1, "{stats:?}");
    assert_eq!(stats.hits, 7, "{stats:?}");
    assert_eq!(registry.account().used_bytes(), 4096 * 4);
}

#[test]
fn a_checksum_mismatch_names_the_file_and_both_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    let folder = write_model(dir.path(), "bad-sum", &[f32_spec("w", &[4], &rng.f32s(4))]);
    let expected = sha256(&std::fs::read(folder.join("model.safetensors")).unwrap());
    // Same length, one value changed: still valid safetensors.
    let tampered = safetensors_bytes(&[f32_spec("w", &[4], &[9.0; 4])]);
    std::fs::write(folder.join("model.safetensors"), &tampered).unwrap();

    let registry = ModelRegistry::open(dir.path()).unwrap();
    let err = block_on(registry.load("bad-sum", &cpu())).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    assert!(err.message.contains("model.safetensors"), "{err}");
    assert!(err.message.contains(&expected), "{err}");
    assert!(err.message.contains(&sha256(&tampered)), "{err}");
    assert_eq!(registry.account().used_bytes(), 0);
    assert_eq!(registry.stats().failures, 1);

    // Garbage is reported as a mismatch too, not as a parse error.
    std::fs::write(folder.join("model.safetensors"), b"not safetensors").unwrap();
    let err = block_on(registry.load("bad-sum", &cpu())).unwrap_err();
    assert!(err.message.contains("has sha256"), "{err}");
}

#[test]
fn a_missing_file_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let folder = write_model(dir.path(), "gone", &[f32_spec("w", &[1], &[1.0])]);
    std::fs::remove_file(folder.join("config.json")).unwrap();
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let err = block_on(registry.load("gone", &cpu())).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err}");
    assert!(err.message.contains("config.json"), "{err}");
}

#[test]
fn a_bad_manifest_is_reported_and_the_others_still_load() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), "good", &[f32_spec("w", &[1], &[1.0])]);
    let bad = write_model(dir.path(), "bad", &[f32_spec("w", &[1], &[1.0])]);
    let manifest = bad.join("gust-model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("role = \"config\"", "role = \"config\"\ncolour = \"red\""),
    )
    .unwrap();
    // Not a model folder: ignored, not reported.
    std::fs::create_dir(dir.path().join("notes")).unwrap();

    let registry = ModelRegistry::open(dir.path()).unwrap();
    assert_eq!(registry.list().len(), 1);
    let problems = registry.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, bad);
    let message = &problems[0].1.message;
    assert!(
        message.contains(&format!("{}:15:1", manifest.display())),
        "{message}"
    );
    assert!(message.contains("colour"), "{message}");

    block_on(registry.load("good", &cpu())).unwrap();
    let err = block_on(registry.load("bad", &cpu())).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("available: good"), "{err}");
}

#[test]
fn malformed_gguf_and_unsupported_dtypes_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("llama-ish");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("m.gguf"), b"GGUF").unwrap();
    std::fs::write(
        folder.join("gust-model.toml"),
        format!(
            "name = \"llama-ish\"\nfamily = \"llama\"\ndtype = \"f16\"\n\n[[files]]\n\
             path = \"m.gguf\"\nsha256 = \"{}\"\nrole = \"weights\"\nformat = \"gguf\"\n",
            sha256(b"GGUF")
        ),
    )
    .unwrap();
    write_model(
        dir.path(),
        "wide",
        &[Spec {
            name: "ids",
            dtype: Dtype::F64,
            shape: vec![2],
            data: vec![0; 16],
        }],
    );
    write_model(
        dir.path(),
        "too-long",
        &[Spec {
            name: "big",
            dtype: Dtype::I64,
            shape: vec![2],
            data: [1i64, 1 << 40]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        }],
    );
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let err = block_on(registry.load("llama-ish", &cpu())).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    assert!(err.message.contains("not a valid GGUF file"), "{err}");
    let err = block_on(registry.load("wide", &cpu())).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unsupported, "{err}");
    assert!(err.message.contains("`ids`"), "{err}");
    assert!(err.message.contains("F64"), "{err}");
    let err = block_on(registry.load("too-long", &cpu())).unwrap_err();
    assert_eq!(err.code, ErrorCode::Unsupported, "{err}");
    assert!(err.message.contains("`big`"), "{err}");
    assert!(err.message.contains(&(1i64 << 40).to_string()), "{err}");
}

#[test]
fn eviction_takes_the_least_recently_used_model_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    // 400 bytes each; a 1000-byte budget holds two.
    for name in ["a", "b", "c"] {
        write_sized(dir.path(), name, 100, &mut rng);
    }
    let registry = ModelRegistry::open_with(
        dir.path(),
        RegistryConfig {
            memory_budget_bytes: 1000,
            ..RegistryConfig::default()
        },
    )
    .unwrap();
    let device = cpu();
    drop(block_on(registry.load("a", &device)).unwrap());
    drop(block_on(registry.load("b", &device)).unwrap());
    // Using `a` again makes `b` the least recently used.
    drop(block_on(registry.load("a", &device)).unwrap());
    assert_eq!(registry.resident_models(&device), ["b", "a"]);

    drop(block_on(registry.load("c", &device)).unwrap());
    assert_eq!(registry.resident_models(&device), ["a", "c"]);
    assert_eq!(registry.stats().evictions, 1);
    assert_eq!(registry.resident_bytes(&device), 800);
    assert_eq!(
        registry.account().used_bytes(),
        800,
        "the evicted tensors are freed"
    );
    assert_eq!(device.used_bytes(), 800);
    // `b` comes back on demand (evicting `a`, now the oldest).
    drop(block_on(registry.load("b", &device)).unwrap());
    assert_eq!(registry.resident_models(&device), ["c", "b"]);
    assert_eq!(registry.stats().loads, 4);
}

#[test]
fn models_in_use_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    for name in ["a", "b", "c"] {
        write_sized(dir.path(), name, 100, &mut rng);
    }
    write_sized(dir.path(), "huge", 1000, &mut rng);
    let registry = ModelRegistry::open_with(
        dir.path(),
        RegistryConfig {
            memory_budget_bytes: 1000,
            ..RegistryConfig::default()
        },
    )
    .unwrap();
    let device = cpu();
    let a = block_on(registry.load("a", &device)).unwrap();
    let b = block_on(registry.load("b", &device)).unwrap();

    let err = block_on(registry.load("c", &device)).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutOfMemory, "{err}");
    assert!(err.message.contains("model `c` needs 400 bytes"), "{err}");
    assert!(err.message.contains("(a, b)"), "{err}");
    assert_eq!(
        registry.resident_models(&device),
        ["a", "b"],
        "nothing evicted"
    );
    assert_eq!(registry.account().used_bytes(), 800);

    // Once `b` is let go, it makes room; `a` is still held and stays.
    drop(b);
    let c = block_on(registry.load("c", &device)).unwrap();
    assert_eq!(registry.resident_models(&device), ["a", "c"]);
    assert_eq!(read_f32(&device, a.tensor("w").unwrap()).len(), 100);

    // Bigger than the whole budget: refused whatever is free.
    drop((a, c));
    let err = block_on(registry.load("huge", &device)).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutOfMemory, "{err}");
    assert!(
        err.message.contains("larger than the whole budget"),
        "{err}"
    );
    assert_eq!(registry.resident_models(&device), ["a", "c"]);
    assert_eq!(registry.evict_unused(&device), 800);
    assert_eq!(registry.account().used_bytes(), 0);
}

/// The models directory `scripts/fetch-models.sh` fills, if it holds
/// `model`; otherwise prints why the calling test is skipped.
pub(crate) fn fetched_models_with(model: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("GUST_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../gust-data/models"));
    if dir.join(model).join("gust-model.toml").is_file() {
        return Some(dir);
    }
    eprintln!(
        "skipping: no {model} in {} (run scripts/fetch-models.sh or set GUST_MODELS_DIR)",
        dir.display()
    );
    None
}

/// The real MiniLM from `scripts/fetch-models.sh`, when it has been fetched.
#[test]
fn the_fetched_minilm_loads_when_present() {
    let Some(dir) = fetched_models_with("all-minilm-l6-v2") else {
        return;
    };
    let registry = ModelRegistry::open(&dir).unwrap();
    let device = cpu();
    let model = block_on(registry.load("all-minilm-l6-v2", &device)).unwrap();
    assert_eq!(model.family(), "bert");
    let embeddings = model.tensor("embeddings.word_embeddings.weight").unwrap();
    assert_eq!(embeddings.shape(), [30522, 384]);
    assert_eq!(embeddings.dtype(), DType::F32);
    // The linear layers stay resident in bf16, as the file has them
    // (`[out, in]`): the embedding tables (47 MB in f32) plus 21 MB.
    let inner = model
        .tensor("encoder.layer.0.intermediate.dense.weight")
        .unwrap();
    assert_eq!(
        (inner.shape(), inner.dtype()),
        (&[1536, 384][..], DType::BF16)
    );
    assert!(
        (60_000_000..75_000_000).contains(&model.bytes()),
        "{}",
        model.bytes()
    );
    // The bert family drops what its forward pass does not use.
    assert!(model.tensor("embeddings.position_ids").is_none());
    assert!(model.tensor("pooler.dense.weight").is_none());
    if registry.get("smollm2-135m-instruct").is_some() {
        // GGUF weights load too (the llama tests check what they compute).
        let smollm = block_on(registry.load("smollm2-135m-instruct", &device)).unwrap();
        assert_eq!(smollm.family(), "llama");
        assert_eq!(
            smollm
                .tensor("token_embd.weight")
                .map(|t| t.shape().to_vec()),
            Some(vec![49152, 576])
        );
    }
}

const MLP_GRAPH: &str = r#"
[graph]
inputs = ["x"]
outputs = ["probabilities", "hidden"]

[[graph.steps]]
op = "linear"
inputs = ["x", "layer.weight", "layer.bias"]
output = "hidden"

[[graph.steps]]
op = "relu"
inputs = ["hidden"]
output = "activated"

[[graph.steps]]
op = "softmax"
inputs = ["activated"]
output = "probabilities"
dim = -1
"#;

/// A generic model's forward pass comes from its manifest's `[graph]`.
#[test]
fn a_generic_model_runs_the_graph_in_its_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    let w: Vec<f32> = rng.f32s(12).iter().map(|v| v - 0.5).collect();
    let b: Vec<f32> = rng.f32s(3).iter().map(|v| v - 0.5).collect();
    let folder = write_model(
        dir.path(),
        "mlp",
        &[
            f32_spec("layer.weight", &[4, 3], &w),
            f32_spec("layer.bias", &[3], &b),
        ],
    );
    let manifest = folder.join("gust-model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, format!("{text}{MLP_GRAPH}")).unwrap();
    let registry = ModelRegistry::open(dir.path()).unwrap();
    assert!(registry.problems().is_empty(), "{:?}", registry.problems());
    let device = cpu();
    let model = block_on(registry.load("mlp", &device)).unwrap();
    let account = gust_gpu_bridge::Account::new("t", None, None);
    let x: Vec<f32> = rng.f32s(8);
    let input =
        block_on(device.upload(DType::F32, &[2, 4], dtype::f32_to_bytes(&x), &account)).unwrap();
    let outputs = block_on(model.run(&[("x".to_owned(), input.clone())], &account)).unwrap();
    assert_eq!(outputs[0].0, "probabilities");
    assert_eq!(outputs[1].0, "hidden");
    let probabilities = read_f32(&device, &outputs[0].1);
    for row in 0..2 {
        let hidden: Vec<f32> = (0..3)
            .map(|j| (0..4).map(|i| x[row * 4 + i] * w[i * 3 + j]).sum::<f32>() + b[j])
            .collect();
        let relu: Vec<f32> = hidden.iter().map(|v| v.max(0.0)).collect();
        let max = relu.iter().cloned().fold(f32::MIN, f32::max);
        let sum: f32 = relu.iter().map(|v| (v - max).exp()).sum();
        for j in 0..3 {
            let expected = (relu[j] - max).exp() / sum;
            let got = probabilities[row * 3 + j];
            assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        }
    }

    let err = block_on(model.run(&[("y".to_owned(), input)], &account)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    assert!(err.message.contains("\"x\""), "{err}");

    // An unknown op is a manifest error with its line; a name that is no
    // input, weight or earlier output fails the load.
    std::fs::write(
        &manifest,
        format!("{text}{}", MLP_GRAPH.replace("\"relu\"", "\"relux\"")),
    )
    .unwrap();
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let (_, problem) = &registry.problems()[0];
    assert!(
        problem.message.contains("unknown op \"relux\""),
        "{problem}"
    );
    std::fs::write(
        &manifest,
        format!(
            "{text}{}",
            MLP_GRAPH.replace("\"layer.bias\"", "\"layer.b\"")
        ),
    )
    .unwrap();
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let err = block_on(registry.load("mlp", &device)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    assert!(err.message.contains("`layer.b`"), "{err}");
}

fn upload_u32(device: &Device, shape: &[usize], values: &[u32]) -> gust_gpu_bridge::Tensor {
    let account = gust_gpu_bridge::Account::new("uploader", None, None);
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    block_on(device.upload(DType::U32, shape, bytes, &account)).unwrap()
}

fn assert_same_outputs(
    device: &Device,
    what: &str,
    got: &[(String, gust_gpu_bridge::Tensor)],
    expected: &[(String, gust_gpu_bridge::Tensor)],
) {
    assert_eq!(got.len(), expected.len(), "{what}");
    for ((name, g), (expected_name, e)) in got.iter().zip(expected) {
        assert_eq!(name, expected_name, "{what}");
        assert_eq!(g.shape(), e.shape(), "{what}: `{name}`");
        let (g, e) = (read_f32(device, g), read_f32(device, e));
        for (i, (a, b)) in g.iter().zip(&e).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}: `{name}`[{i}]: {a} batched vs {b} alone"
            );
        }
    }
}

/// Token ids for the tiny bert (`[CLS] ... [SEP]`, then `pad` padding
/// positions) and their mask, `texts` rows of them.
fn tiny_bert_input(rng: &mut Rng, texts: usize, words: usize, pad: usize) -> (Vec<u32>, Vec<u32>) {
    let vocabulary = gust_gpu_bridge::models::testing::TINY_BERT_VOCAB.len() as u64;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for _ in 0..texts {
        ids.push(2);
        ids.extend((0..words).map(|_| 4 + rng.below(vocabulary - 4) as u32));
        ids.push(3);
        ids.extend(std::iter::repeat_n(0, pad));
        mask.extend(std::iter::repeat_n(1, words + 2));
        mask.extend(std::iter::repeat_n(0, pad));
    }
    (ids, mask)
}

/// Concurrent bert `run`s of different lengths share forward passes, and
/// each caller gets what it would have got alone, in its own shapes.
#[test]
fn concurrent_bert_runs_are_batched_and_match_runs_alone() {
    let mut rng = Rng::fresh();
    let device = cpu();
    let rt = batching_runtime();
    let (dir, model) = load_tiny_bert(
        &rt,
        &device,
        "\n[batching]\nmax_batch = 8\nmax_delay_ms = 100\n",
        rng.next_u64(),
    );
    let alone_model = load_unbatched(&rt, dir.path(), &device);

    // (texts, words, padding): lengths 3 to 12, some with padding of their
    // own, one without a mask at all.
    let shapes = [
        (1, 1, 0),
        (2, 6, 2),
        (1, 10, 0),
        (3, 3, 1),
        (1, 4, 0),
        (2, 2, 5),
    ];
    let requests: Vec<Vec<(String, gust_gpu_bridge::Tensor)>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(texts, words, pad))| {
            let (ids, mask) = tiny_bert_input(&mut rng, texts, words, pad);
            let shape = [texts, words + 2 + pad];
            let mut inputs = vec![("input_ids".to_owned(), upload_u32(&device, &shape, &ids))];
            if i != 4 {
                inputs.push((
                    "attention_mask".to_owned(),
                    upload_u32(&device, &shape, &mask),
                ));
            }
            inputs
        })
        .collect();
    let alone: Vec<_> = requests
        .iter()
        .map(|inputs| {
            rt.block_on(alone_model.run(inputs, &gust_gpu_bridge::Account::new("a", None, None)))
                .unwrap()
        })
        .collect();

    let accounts: Vec<_> = (0..requests.len())
        .map(|i| gust_gpu_bridge::Account::new(format!("caller {i}"), None, None))
        .collect();
    let tasks: Vec<_> = requests
        .iter()
        .zip(&accounts)
        .map(|(inputs, account)| {
            let (model, inputs, account) =
                (Arc::clone(&model), inputs.clone(), Arc::clone(account));
            rt.spawn(async move { model.run(&inputs, &account).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let got = rt.block_on(task).unwrap().unwrap();
        assert_same_outputs(&device, &format!("request {i}"), &got, &alone[i]);
        assert!(
            accounts[i].device_time() > std::time::Duration::ZERO,
            "request {i} was charged no device time"
        );
    }
    let stats = model.batch_stats().unwrap();
    assert_eq!(stats.requests, requests.len() as u64, "{stats:?}");
    assert!(
        stats.batches < requests.len() as u64,
        "{stats:?}: concurrent runs should share batches"
    );
    // 12 texts at most 8 a batch: at least two batches.
    assert!(stats.batches >= 2, "{stats:?}");
}

/// A generic graph that keeps rows apart batches along dimension 0; one
/// whose softmax runs over the rows runs every call alone.
#[test]
fn generic_runs_batch_along_rows_only_when_the_graph_keeps_rows_apart() {
    let mut rng = Rng::fresh();
    let w: Vec<f32> = rng.f32s(12).iter().map(|v| v - 0.5).collect();
    let b: Vec<f32> = rng.f32s(3).iter().map(|v| v - 0.5).collect();
    let batching = "\n[batching]\nmax_batch = 16\nmax_delay_ms = 100\n";
    for (graph, batches) in [
        (MLP_GRAPH.to_owned(), true),
        (MLP_GRAPH.replace("dim = -1", "dim = 0"), false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let folder = write_model(
            dir.path(),
            "mlp",
            &[
                f32_spec("layer.weight", &[4, 3], &w),
                f32_spec("layer.bias", &[3], &b),
            ],
        );
        let manifest = folder.join("gust-model.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, format!("{text}{batching}{graph}")).unwrap();
        let device = cpu();
        let rt = batching_runtime();
        let registry = ModelRegistry::open(dir.path()).unwrap();
        assert!(registry.problems().is_empty(), "{:?}", registry.problems());
        let model = rt.block_on(registry.load("mlp", &device)).unwrap();
        let account = gust_gpu_bridge::Account::new("t", None, None);
        let inputs: Vec<gust_gpu_bridge::Tensor> = [1usize, 3, 2, 1, 4]
            .iter()
            .map(|&rows| {
                let x = rng.f32s(rows * 4);
                block_on(device.upload(DType::F32, &[rows, 4], dtype::f32_to_bytes(&x), &account))
                    .unwrap()
            })
            .collect();
        // Alone: one call at a time, outside any runtime.
        let alone: Vec<_> = inputs
            .iter()
            .map(|x| block_on(model.run(&[("x".to_owned(), x.clone())], &account)).unwrap())
            .collect();
        let tasks: Vec<_> = inputs
            .iter()
            .map(|x| {
                let (model, x, account) = (Arc::clone(&model), x.clone(), Arc::clone(&account));
                rt.spawn(async move { model.run(&[("x".to_owned(), x)], &account).await })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let got = rt.block_on(task).unwrap().unwrap();
            assert_same_outputs(&device, &format!("{graph}: call {i}"), &got, &alone[i]);
        }
        let stats = model.batch_stats().unwrap();
        if batches {
            assert_eq!(stats.requests, inputs.len() as u64, "{stats:?}");
            assert!(stats.batches < stats.requests, "{stats:?}");
        } else {
            assert_eq!(
                stats.requests, 0,
                "{stats:?}: a softmax over rows must not batch"
            );
        }
    }
}

/// In a batch, a call with a tensor from another device fails alone: the
/// calls beside it still get their rows.
#[test]
fn a_tensor_from_another_device_fails_only_its_own_batched_call() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    let w: Vec<f32> = rng.f32s(12);
    let folder = write_model(
        dir.path(),
        "mlp",
        &[
            f32_spec("layer.weight", &[4, 3], &w),
            f32_spec("layer.bias", &[3], &[0.0; 3]),
        ],
    );
    let manifest = folder.join("gust-model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let batching = "\n[batching]\nmax_batch = 16\nmax_delay_ms = 100\n";
    std::fs::write(&manifest, format!("{text}{batching}{MLP_GRAPH}")).unwrap();
    let (device, elsewhere) = (cpu(), cpu());
    let rt = batching_runtime();
    let registry = ModelRegistry::open(dir.path()).unwrap();
    let model = rt.block_on(registry.load("mlp", &device)).unwrap();
    let account = gust_gpu_bridge::Account::new("t", None, None);
    let x = rng.f32s(8);
    let tasks: Vec<_> = [&device, &elsewhere, &device]
        .into_iter()
        .map(|on| {
            let input = block_on(on.upload(DType::F32, &[2, 4], dtype::f32_to_bytes(&x), &account))
                .unwrap();
            let (model, account) = (Arc::clone(&model), Arc::clone(&account));
            rt.spawn(async move { model.run(&[("x".to_owned(), input)], &account).await })
        })
        .collect();
    let results: Vec<_> = tasks.into_iter().map(|t| rt.block_on(t).unwrap()).collect();
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    for ok in [&results[0], &results[2]] {
        let outputs = ok.as_ref().unwrap();
        assert_eq!(outputs[0].1.shape(), [2, 3]);
    }
    let stats = model.batch_stats().unwrap();
    assert_eq!((stats.requests, stats.batches), (2, 1), "{stats:?}");
}

/// A product of two inputs contracts over the second one's rows: such a
/// graph never batches (stacking callers' rows would mix them), even when
/// both inputs have the same first dimension.
#[test]
fn a_graph_that_mixes_rows_runs_every_call_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::fresh();
    let folder = write_model(dir.path(), "product", &[f32_spec("unused", &[1], &[0.0])]);
    let manifest = folder.join("gust-model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let graph = r#"
[batching]
max_batch = 16
max_delay_ms = 100

[graph]
inputs = ["x", "y"]
outputs = ["product"]

[[graph.steps]]
op = "matmul"
inputs = ["x", "y"]
output = "product"
"#;
    std::fs::write(&manifest, format!("{text}{graph}")).unwrap();
    let device = cpu();
    let rt = batching_runtime();
    let registry = ModelRegistry::open(dir.path()).unwrap();
    assert!(registry.problems().is_empty(), "{:?}", registry.problems());
    let model = rt.block_on(registry.load("product", &device)).unwrap();
    let account = gust_gpu_bridge::Account::new("t", None, None);
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = (0..4).map(|_| (rng.f32s(16), rng.f32s(16))).collect();
    let tasks: Vec<_> = pairs
        .iter()
        .map(|(x, y)| {
            let upload = |v: &[f32]| {
                block_on(device.upload(DType::F32, &[4, 4], dtype::f32_to_bytes(v), &account))
                    .unwrap()
            };
            let inputs = vec![("x".to_owned(), upload(x)), ("y".to_owned(), upload(y))];
            let (model, account) = (Arc::clone(&model), Arc::clone(&account));
            rt.spawn(async move { model.run(&inputs, &account).await })
        })
        .collect();
    for ((x, y), task) in pairs.iter().zip(tasks) {
        let got = read_f32(&device, &rt.block_on(task).unwrap().unwrap()[0].1);
        for i in 0..4 {
            for j in 0..4 {
                let expected: f32 = (0..4).map(|l| x[i * 4 + l] * y[l * 4 + j]).sum();
                let g = got[i * 4 + j];
                assert!((g - expected).abs() < 1e-5, "[{i}, {j}]: {g} vs {expected}");
            }
        }
    }
    let stats = model.batch_stats().unwrap();
    assert_eq!(stats.requests, 0, "{stats:?}: x @ y must not batch");
}

/// `run` shares `embed`'s bounded queue: a full queue refuses at once with
/// quota-exceeded, and a call whose deadline passes gives up with timeout.
#[test]
fn a_full_run_queue_refuses_and_a_run_deadline_is_honoured() {
    let mut rng = Rng::fresh();
    let device = cpu();
    let rt = batching_runtime();
    let (_dir, model) = load_tiny_bert(
        &rt,
        &device,
        "\n[batching]\nmax_batch = 64\nmax_delay_ms = 400\nmax_queue = 2\n",
        rng.next_u64(),
    );
    let (ids, _) = tiny_bert_input(&mut rng, 1, 3, 0);
    let inputs = vec![("input_ids".to_owned(), upload_u32(&device, &[1, 5], &ids))];
    let account = || gust_gpu_bridge::Account::new("caller", None, None);
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let (model, inputs) = (Arc::clone(&model), inputs.clone());
            rt.spawn(async move { model.run(&inputs, &account()).await })
        })
        .collect();
    // Both are queued well inside the 400 ms delay.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let err = rt.block_on(model.run(&inputs, &account())).unwrap_err();
    assert_eq!(err.code, ErrorCode::QuotaExceeded, "{err}");
    assert!(err.message.contains("queue is full"), "{err}");
    for task in waiting {
        let outputs = rt.block_on(task).unwrap().unwrap();
        assert_eq!(outputs[0].1.shape(), [1, 5, 16]);
    }
    let stats = model.batch_stats().unwrap();
    assert_eq!((stats.refused, stats.requests, stats.batches), (1, 2, 1));

    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(30);
    let err = rt
        .block_on(model.run_until(&inputs, &account(), Some(deadline)))
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Timeout, "{err}");
}
