//! The reference the bert family is tested and benchmarked against:
//! candle-transformers' BERT on the CPU over the same files, tokenized and
//! pooled as the bridge does (longest-in-batch padding, truncation at the
//! model's length, mean over the real tokens, L2 normalisation).
//!
//! Shared by `tests/all/bert.rs` and `benches/models.rs` through `#[path]`,
//! so the yardstick for accuracy and for speed is one piece of code.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};

/// candle's `BertModel` with the model's tokenizer.
pub(crate) struct CandleBert {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
}

impl CandleBert {
    /// Load `config.json`, `tokenizer.json` and `model.safetensors` from
    /// `folder`, with the shipped fixed padding replaced by longest-in-batch
    /// padding as the bridge does.
    pub(crate) fn open(folder: &Path) -> Self {
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
        let vb =
            candle_nn::VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
                .unwrap();
        Self {
            model: BertModel::load(vb, &config).unwrap(),
            tokenizer,
        }
    }

    /// One L2-normalised sentence embedding per text: tokenize, run the
    /// encoder, mean-pool over the real tokens, normalise.
    pub(crate) fn embed(&self, texts: &[&str]) -> Vec<Vec<f32>> {
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
