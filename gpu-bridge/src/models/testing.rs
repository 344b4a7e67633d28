//! Tiny models with random weights, written as real model folders (files,
//! config, tokenizer, manifest with checksums), for tests of this crate and
//! of hosts built on it. Not for production use; hidden from the docs.

use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

use crate::dtype;

/// A small xorshift generator: tests need varied weights, not good ones.
struct Rng(u64);

impl Rng {
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The tiny bert's vocabulary.
pub const TINY_BERT_VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat",
    "ran", "in", "park", "##s", "sun", "is", "hot", "cold", "tea", "quantum", "physics", ".",
];

/// The tiny bert's embedding width.
pub const TINY_BERT_HIDDEN: usize = 16;
const HEADS: usize = 4;
const LAYERS: usize = 2;
const INTERMEDIATE: usize = 32;
const MAX_POSITIONS: usize = 24;

fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = TINY_BERT_VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), serde_json::Value::from(i)))
        .collect();
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "special": true, "content": content, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false})
    };
    serde_json::json!({
        "version": "1.0",
        // Shipped like MiniLM's: fixed padding the family must override.
        "truncation": {"max_length": 8, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 20}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"),
            special(3, "[SEP]"), special(4, "[MASK]")],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

fn config_json() -> String {
    serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert",
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": TINY_BERT_HIDDEN, "initializer_range": 0.02, "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-12, "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0,
        "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": TINY_BERT_VOCAB.len()
    })
    .to_string()
}

/// Random weights with the names and shapes of a Hugging Face BertModel.
fn weights(rng: &mut Rng) -> std::io::Result<Vec<u8>> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let values: Vec<f32> = rng
            .f32s(n)
            .iter()
            .map(|v| (v - 0.5) * 2.0 * scale + offset)
            .collect();
        tensors.push((name, shape, dtype::f32_to_bytes(&values)));
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![TINY_BERT_VOCAB.len(), TINY_BERT_HIDDEN],
        1.0,
        0.0,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![MAX_POSITIONS, TINY_BERT_HIDDEN],
        0.5,
        0.0,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, TINY_BERT_HIDDEN],
        0.5,
        0.0,
    );
    add(
        "embeddings.LayerNorm.weight".into(),
        vec![TINY_BERT_HIDDEN],
        0.2,
        1.0,
    );
    add(
        "embeddings.LayerNorm.bias".into(),
        vec![TINY_BERT_HIDDEN],
        0.1,
        0.0,
    );
    let linear = 1.0 / (TINY_BERT_HIDDEN as f32).sqrt();
    for i in 0..LAYERS {
        let p = |rest: &str| format!("encoder.layer.{i}.{rest}");
        for part in ["query", "key", "value"] {
            add(
                p(&format!("attention.self.{part}.weight")),
                vec![TINY_BERT_HIDDEN, TINY_BERT_HIDDEN],
                linear,
                0.0,
            );
            add(
                p(&format!("attention.self.{part}.bias")),
                vec![TINY_BERT_HIDDEN],
                0.1,
                0.0,
            );
        }
        add(
            p("attention.output.dense.weight"),
            vec![TINY_BERT_HIDDEN, TINY_BERT_HIDDEN],
            linear,
            0.0,
        );
        add(
            p("attention.output.dense.bias"),
            vec![TINY_BERT_HIDDEN],
            0.1,
            0.0,
        );
        add(
            p("attention.output.LayerNorm.weight"),
            vec![TINY_BERT_HIDDEN],
            0.2,
            1.0,
        );
        add(
            p("attention.output.LayerNorm.bias"),
            vec![TINY_BERT_HIDDEN],
            0.1,
            0.0,
        );
        add(
            p("intermediate.dense.weight"),
            vec![INTERMEDIATE, TINY_BERT_HIDDEN],
            linear,
            0.0,
        );
        add(p("intermediate.dense.bias"), vec![INTERMEDIATE], 0.1, 0.0);
        add(
            p("output.dense.weight"),
            vec![TINY_BERT_HIDDEN, INTERMEDIATE],
            linear,
            0.0,
        );
        add(p("output.dense.bias"), vec![TINY_BERT_HIDDEN], 0.1, 0.0);
        add(
            p("output.LayerNorm.weight"),
            vec![TINY_BERT_HIDDEN],
            0.2,
            1.0,
        );
        add(p("output.LayerNorm.bias"), vec![TINY_BERT_HIDDEN], 0.1, 0.0);
    }
    add(
        "pooler.dense.weight".into(),
        vec![TINY_BERT_HIDDEN, TINY_BERT_HIDDEN],
        linear,
        0.0,
    );
    add("pooler.dense.bias".into(), vec![TINY_BERT_HIDDEN], 0.1, 0.0);
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(std::io::Error::other)?;
    safetensors::serialize(views, None).map_err(std::io::Error::other)
}

/// Write a tiny bert model `name` under `root`, with `extra` manifest text
/// (e.g. a `[batching]` table) and weights drawn from `seed`; returns its
/// folder.
pub fn write_tiny_bert(
    root: &Path,
    name: &str,
    extra: &str,
    seed: u64,
) -> std::io::Result<PathBuf> {
    let folder = root.join(name);
    std::fs::create_dir_all(&folder)?;
    let weights = weights(&mut Rng(seed | 1))?;
    let config = config_json();
    let tokenizer = tokenizer_json();
    std::fs::write(folder.join("model.safetensors"), &weights)?;
    std::fs::write(folder.join("config.json"), &config)?;
    std::fs::write(folder.join("tokenizer.json"), &tokenizer)?;
    let manifest = format!(
        r#"name = "{name}"
family = "bert"
dtype = "f32"
{extra}

[[files]]
path = "model.safetensors"
sha256 = "{}"
role = "weights"

[[files]]
path = "config.json"
sha256 = "{}"
role = "config"

[[files]]
path = "tokenizer.json"
sha256 = "{}"
role = "tokenizer"
"#,
        sha256(&weights),
        sha256(config.as_bytes()),
        sha256(tokenizer.as_bytes())
    );
    std::fs::write(folder.join("gust-model.toml"), manifest)?;
    Ok(folder)
}
