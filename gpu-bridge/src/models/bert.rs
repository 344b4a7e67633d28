//! The BERT encoder family, written once over the bridge's ops so it runs on
//! every backend: sentence embeddings by mean pooling over the last hidden
//! state and L2 normalisation (what sentence-transformers does for
//! all-MiniLM-L6-v2 and its relatives).
//!
//! Weights are rearranged on the host while loading, never per call, with
//! the attention scale folded into the query projection. On a device that
//! multiplies 16-bit weights into f32 (`linear` on the cpu backend) the
//! linear layers stay `[out, in]` and are rounded once to the manifest's
//! `linear_weights` (bf16 unless it says otherwise), and a layer's query,
//! key and value projections are one `linear` op over the three matrices.
//! Elsewhere each `[out, in]` matrix is transposed to the `[in, out]` the
//! matmul wants and the three projections are fused into one `[in, 3·out]`
//! matrix, so a layer's attention starts with a single matmul.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::account::Account;
use crate::device::{Device, Tensor};
use crate::dtype::{self, DType};
use crate::error::{BridgeError, Result};
use crate::kernel::UnaryOp;
use crate::models::graph::Graph;
use crate::models::manifest::{FileRole, ModelManifest};
use crate::models::safetensors::HostTensor;
use crate::op::Op;

/// The most texts one `embed` call may carry: the attention scores of a
/// batch grow with it, and a caller wanting more can split.
pub(crate) const MAX_TEXTS: usize = 1024;

/// The fields of a Hugging Face `config.json` the encoder needs; the rest of
/// the file is training metadata and is ignored on purpose.
#[derive(Debug, Clone, Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    max_position_embeddings: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_position_type")]
    position_embedding_type: String,
}

fn default_eps() -> f64 {
    1e-12
}

fn default_act() -> String {
    "gelu".into()
}

fn default_position_type() -> String {
    "absolute".into()
}

/// Names of the weights as laid out after [`prepare`].
struct Names;

impl Names {
    fn layer(i: usize, rest: &str) -> String {
        format!("encoder.layer.{i}.{rest}")
    }
}

/// What [`prepare`] learnt on the reader thread, finished into a [`Bert`]
/// once the weights are on the device.
pub(crate) struct Prepared {
    config: BertConfig,
    tokenizer: Tokenizer,
    activation: UnaryOp,
    /// Linear layers are `[out, in]` 16-bit matrices for `linear`, not
    /// `[in, out]` f32 ones for `matmul`.
    stored_linear: bool,
}

struct Layer {
    /// `[query, key, value]` for `linear`, or the one fused `[in, 3·out]`
    /// matrix for `matmul`.
    qkv_weights: Vec<Tensor>,
    qkv_bias: Tensor,
    attention_out_weight: Tensor,
    attention_out_bias: Tensor,
    attention_norm_weight: Tensor,
    attention_norm_bias: Tensor,
    intermediate_weight: Tensor,
    intermediate_bias: Tensor,
    output_weight: Tensor,
    output_bias: Tensor,
    output_norm_weight: Tensor,
    output_norm_bias: Tensor,
}

/// A resident BERT encoder: its tokenizer and its weights on one device.
pub(crate) struct Bert {
    config: BertConfig,
    /// Shared with the blocking-pool tasks that tokenise texts.
    tokenizer: Arc<Tokenizer>,
    activation: UnaryOp,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    /// Only row 0 is used: every text is a single segment.
    token_type_embeddings: Tensor,
    embedding_norm_weight: Tensor,
    embedding_norm_bias: Tensor,
    layers: Vec<Layer>,
    /// See [`Prepared::stored_linear`].
    stored_linear: bool,
}

fn invalid(manifest: &ModelManifest, why: impl std::fmt::Display) -> BridgeError {
    BridgeError::invalid(format!("model `{}` (bert): {why}", manifest.name))
}

/// Read the config and tokenizer and rearrange the weights in `tensors`
/// (host memory, before upload), the linear layers for `linear` in
/// `linear_weights` unless that is f32. Blocks on disk; run on the reader
/// thread.
pub(crate) fn prepare(
    folder: &Path,
    manifest: &ModelManifest,
    tensors: &mut BTreeMap<String, HostTensor>,
    linear_weights: DType,
) -> Result<Prepared> {
    let config_file = manifest.file(FileRole::Config).ok_or_else(|| {
        invalid(
            manifest,
            "the manifest lists no file with role = \"config\"",
        )
    })?;
    let text = std::fs::read_to_string(folder.join(&config_file.path)).map_err(|e| {
        invalid(manifest, format!("{}: {e}", config_file.path.display())).with_source(e)
    })?;
    let config: BertConfig = serde_json::from_str(&text).map_err(|e| {
        invalid(manifest, format!("{}: {e}", config_file.path.display())).with_source(e)
    })?;
    let heads = config.num_attention_heads;
    if config.hidden_size == 0 || heads == 0 || !config.hidden_size.is_multiple_of(heads) {
        return Err(invalid(
            manifest,
            format!(
                "hidden_size {} is not a positive multiple of num_attention_heads {heads}",
                config.hidden_size
            ),
        ));
    }
    if config.position_embedding_type != "absolute" {
        return Err(BridgeError::unsupported(format!(
            "model `{}` (bert): position_embedding_type {:?} (only \"absolute\")",
            manifest.name, config.position_embedding_type
        )));
    }
    let activation = match config.hidden_act.as_str() {
        "gelu" => UnaryOp::Gelu,
        "relu" => UnaryOp::Relu,
        "silu" | "swish" => UnaryOp::Silu,
        other => {
            return Err(BridgeError::unsupported(format!(
                "model `{}` (bert): hidden_act {other:?} (gelu, relu or silu)",
                manifest.name
            )));
        }
    };

    let tokenizer_file = manifest.file(FileRole::Tokenizer).ok_or_else(|| {
        invalid(
            manifest,
            "the manifest lists no file with role = \"tokenizer\"",
        )
    })?;
    let mut tokenizer = Tokenizer::from_file(folder.join(&tokenizer_file.path))
        .map_err(|e| invalid(manifest, format!("{}: {e}", tokenizer_file.path.display())))?;
    // Shipped tokenizers often pad every text to a fixed length (128 for
    // MiniLM): padding to the longest text of the batch does the same math
    // on far fewer positions.
    let padding = tokenizer.get_padding().cloned().unwrap_or_default();
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..padding
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: config.max_position_embeddings,
            ..TruncationParams::default()
        }))
        .map_err(|e| invalid(manifest, format!("truncation: {e}")))?;

    strip_prefix(tensors);
    tensors.remove("embeddings.position_ids");
    tensors.retain(|name, _| !name.starts_with("pooler."));
    for tensor in tensors.values_mut() {
        widen_to_f32(tensor);
    }
    let scale = 1.0 / ((config.hidden_size / heads) as f32).sqrt();
    let stored_linear = linear_weights != DType::F32;
    for i in 0..config.num_hidden_layers {
        let mut parts = Vec::with_capacity(3);
        let mut biases = Vec::with_capacity(3);
        for (part, factor) in [("query", scale), ("key", 1.0), ("value", 1.0)] {
            let name = Names::layer(i, &format!("attention.self.{part}.weight"));
            let weight = take(manifest, tensors, &name)?;
            let bias = take(
                manifest,
                tensors,
                &Names::layer(i, &format!("attention.self.{part}.bias")),
            )?;
            if stored_linear {
                let weight = rounded(manifest, scaled(weight, factor), linear_weights)?;
                tensors.insert(name, weight);
            } else {
                parts.push(scaled(transposed(manifest, weight)?, factor));
            }
            biases.push(scaled(bias, factor));
        }
        if !stored_linear {
            tensors.insert(
                Names::layer(i, "attention.qkv.weight"),
                concat_columns(manifest, &parts)?,
            );
        }
        tensors.insert(
            Names::layer(i, "attention.qkv.bias"),
            concat_columns(manifest, &biases)?,
        );
        for linear in [
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ] {
            let name = Names::layer(i, &format!("{linear}.weight"));
            let weight = take(manifest, tensors, &name)?;
            let weight = if stored_linear {
                rounded(manifest, weight, linear_weights)?
            } else {
                transposed(manifest, weight)?
            };
            tensors.insert(name, weight);
        }
    }
    Ok(Prepared {
        config,
        tokenizer,
        activation,
        stored_linear,
    })
}

/// Checkpoints saved from a task model (`BertForMaskedLM`, ...) prefix every
/// name with `bert.`; the encoder's names are the same under it.
fn strip_prefix(tensors: &mut BTreeMap<String, HostTensor>) {
    if tensors.contains_key("embeddings.word_embeddings.weight")
        || !tensors.contains_key("bert.embeddings.word_embeddings.weight")
    {
        return;
    }
    let prefixed = std::mem::take(tensors);
    for (name, tensor) in prefixed {
        if let Some(rest) = name.strip_prefix("bert.") {
            tensors.insert(rest.to_owned(), tensor);
        }
    }
}

fn take(
    manifest: &ModelManifest,
    tensors: &mut BTreeMap<String, HostTensor>,
    name: &str,
) -> Result<HostTensor> {
    tensors
        .remove(name)
        .ok_or_else(|| invalid(manifest, format!("the weights have no tensor `{name}`")))
}

/// f16 and bf16 weights computed in f32: widened once, here.
fn widen_to_f32(tensor: &mut HostTensor) {
    let values: Vec<f32> = match tensor.dtype {
        DType::F16 => tensor
            .data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => tensor
            .data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return,
    };
    tensor.dtype = DType::F32;
    tensor.data = dtype::f32_to_bytes(&values);
}

fn f32_values(tensor: &HostTensor) -> Vec<f32> {
    tensor
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn scaled(mut tensor: HostTensor, factor: f32) -> HostTensor {
    if factor != 1.0 && tensor.dtype == DType::F32 {
        let values: Vec<f32> = f32_values(&tensor).iter().map(|v| v * factor).collect();
        tensor.data = dtype::f32_to_bytes(&values);
    }
    tensor
}

/// A 2-D f32 linear weight rounded (to nearest even) to the 16-bit `to`,
/// still `[out, in]`.
fn rounded(manifest: &ModelManifest, tensor: HostTensor, to: DType) -> Result<HostTensor> {
    if tensor.shape.len() != 2 || tensor.dtype != DType::F32 {
        return Err(invalid(
            manifest,
            format!(
                "a linear weight is {} {:?}, not a 2-D float matrix",
                tensor.dtype, tensor.shape
            ),
        ));
    }
    let values = f32_values(&tensor);
    let data: Vec<u8> = match to {
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => {
            return Err(BridgeError::unsupported(format!(
                "model `{}` (bert): linear_weights = {other} (f32, f16 or bf16)",
                manifest.name
            )));
        }
    };
    Ok(HostTensor {
        dtype: to,
        shape: tensor.shape,
        data,
    })
}

/// `[out, in]` to `[in, out]`.
fn transposed(manifest: &ModelManifest, tensor: HostTensor) -> Result<HostTensor> {
    let [rows, cols] = tensor.shape[..] else {
        return Err(invalid(
            manifest,
            format!("a linear weight has shape {:?}, not 2-D", tensor.shape),
        ));
    };
    if tensor.dtype != DType::F32 {
        return Err(invalid(
            manifest,
            format!("a linear weight is {}, not a float type", tensor.dtype),
        ));
    }
    let values = f32_values(&tensor);
    let mut out = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            out[c * rows + r] = *v;
        }
    }
    Ok(HostTensor {
        dtype: DType::F32,
        shape: vec![cols, rows],
        data: dtype::f32_to_bytes(&out),
    })
}

/// Join `[in, a]`, `[in, b]`, ... into `[in, a + b + ...]` (or 1-D biases
/// end to end).
fn concat_columns(manifest: &ModelManifest, parts: &[HostTensor]) -> Result<HostTensor> {
    let rows = match parts.first().map(|p| p.shape.len()) {
        Some(1) => 1,
        Some(2) => parts[0].shape[0],
        _ => {
            return Err(invalid(
                manifest,
                "attention projections of unexpected rank",
            ));
        }
    };
    if parts.iter().any(|p| {
        p.dtype != DType::F32
            || p.shape.len() != parts[0].shape.len()
            || (p.shape.len() == 2 && p.shape[0] != rows)
    }) {
        return Err(invalid(
            manifest,
            "query, key and value projections differ in shape or type",
        ));
    }
    let widths: Vec<usize> = parts
        .iter()
        .map(|p| *p.shape.last().unwrap_or(&0))
        .collect();
    let total: usize = widths.iter().sum();
    let columns: Vec<Vec<f32>> = parts.iter().map(f32_values).collect();
    let mut out = Vec::with_capacity(rows * total);
    for r in 0..rows {
        for (values, width) in columns.iter().zip(&widths) {
            out.extend_from_slice(&values[r * width..(r + 1) * width]);
        }
    }
    let shape = if parts[0].shape.len() == 1 {
        vec![total]
    } else {
        vec![rows, total]
    };
    Ok(HostTensor {
        dtype: DType::F32,
        shape,
        data: dtype::f32_to_bytes(&out),
    })
}

impl Prepared {
    /// Pick the uploaded tensors the encoder uses.
    pub(crate) fn finish(
        self,
        manifest: &ModelManifest,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Bert> {
        let get = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| invalid(manifest, format!("the weights have no tensor `{name}`")))
        };
        let hidden = self.config.hidden_size;
        let word_embeddings = get("embeddings.word_embeddings.weight")?;
        let position_embeddings = get("embeddings.position_embeddings.weight")?;
        let token_types = get("embeddings.token_type_embeddings.weight")?;
        for (name, table) in [
            ("word", &word_embeddings),
            ("position", &position_embeddings),
            ("token type", &token_types),
        ] {
            if table.shape().len() != 2 || table.shape()[1] != hidden || table.shape()[0] == 0 {
                return Err(invalid(
                    manifest,
                    format!(
                        "the {name} embeddings have shape {:?}, not [n, {hidden}]",
                        table.shape()
                    ),
                ));
            }
        }
        if position_embeddings.shape()[0] < self.config.max_position_embeddings {
            return Err(invalid(
                manifest,
                format!(
                    "max_position_embeddings is {} but the table has {} rows",
                    self.config.max_position_embeddings,
                    position_embeddings.shape()[0]
                ),
            ));
        }
        let mut layers = Vec::with_capacity(self.config.num_hidden_layers);
        for i in 0..self.config.num_hidden_layers {
            let l = |rest: &str| get(&Names::layer(i, rest));
            let qkv_weights = if self.stored_linear {
                ["query", "key", "value"]
                    .iter()
                    .map(|part| l(&format!("attention.self.{part}.weight")))
                    .collect::<Result<Vec<_>>>()?
            } else {
                vec![l("attention.qkv.weight")?]
            };
            layers.push(Layer {
                qkv_weights,
                qkv_bias: l("attention.qkv.bias")?,
                attention_out_weight: l("attention.output.dense.weight")?,
                attention_out_bias: l("attention.output.dense.bias")?,
                attention_norm_weight: l("attention.output.LayerNorm.weight")?,
                attention_norm_bias: l("attention.output.LayerNorm.bias")?,
                intermediate_weight: l("intermediate.dense.weight")?,
                intermediate_bias: l("intermediate.dense.bias")?,
                output_weight: l("output.dense.weight")?,
                output_bias: l("output.dense.bias")?,
                output_norm_weight: l("output.LayerNorm.weight")?,
                output_norm_bias: l("output.LayerNorm.bias")?,
            });
        }
        Ok(Bert {
            token_type_embeddings: token_types,
            word_embeddings,
            position_embeddings,
            embedding_norm_weight: get("embeddings.LayerNorm.weight")?,
            embedding_norm_bias: get("embeddings.LayerNorm.bias")?,
            layers,
            config: self.config,
            tokenizer: Arc::new(self.tokenizer),
            activation: self.activation,
            stored_linear: self.stored_linear,
        })
    }
}

/// How the packed rows of a batch with padding map to its padded layout,
/// and the additive attention mask that hides the padding.
struct Padding {
    /// Padded slot -> packed row (past the end for padding).
    pad: Tensor,
    /// Packed row -> padded slot.
    unpad: Tensor,
    /// `[texts, 1, 1, positions]`: 0 for real tokens, -1e9 for padding.
    mask: Tensor,
}

/// Token ids and masks of one batch, padded to its longest text.
pub(crate) struct Tokens {
    /// Texts (rows).
    pub(crate) texts: usize,
    /// Positions per text, padding included.
    pub(crate) positions: usize,
    ids: Vec<u32>,
    /// 1 for a real token, 0 for padding, per text and position.
    mask: Vec<f32>,
}

impl Tokens {
    /// The texts of `parts`, one after another, padded on the right to the
    /// longest with masked positions (which change nothing for the real
    /// tokens: they get no attention and are left out of the mean).
    pub(crate) fn join(parts: &[&Tokens]) -> Tokens {
        let positions = parts.iter().map(|p| p.positions).max().unwrap_or(0);
        let texts = parts.iter().map(|p| p.texts).sum();
        let mut ids = Vec::with_capacity(texts * positions);
        let mut mask = Vec::with_capacity(texts * positions);
        for part in parts {
            let pad = positions - part.positions;
            let rows = part
                .ids
                .chunks_exact(part.positions.max(1))
                .zip(part.mask.chunks_exact(part.positions.max(1)));
            for (row_ids, row_mask) in rows {
                ids.extend_from_slice(row_ids);
                ids.extend(std::iter::repeat_n(0, pad));
                mask.extend_from_slice(row_mask);
                mask.extend(std::iter::repeat_n(0.0, pad));
            }
        }
        Tokens {
            texts,
            positions,
            ids,
            mask,
        }
    }
}

impl Bert {
    /// The width of an embedding.
    pub(crate) fn dimensions(&self) -> usize {
        self.config.hidden_size
    }

    /// Tokenises `texts` on tokio's blocking pool: they are the guest's (up
    /// to the host's input cap) and tokenising them must not hold an async
    /// worker thread.
    async fn tokenize(&self, texts: &[String]) -> Result<Tokens> {
        let tokenizer = Arc::clone(&self.tokenizer);
        let texts = texts.to_vec();
        super::off_async("tokenize", move || tokenize(&tokenizer, texts)).await
    }

    /// One L2-normalised embedding per text, computed on `device` (where the
    /// weights live) and charged to `account`.
    pub(crate) async fn embed(
        &self,
        device: &Device,
        texts: &[String],
        account: &Arc<Account>,
    ) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        check_count(texts.len())?;
        let tokens = self.tokenize(texts).await?;
        let (_, pooled) = self.encode(device, &tokens, account, false).await?;
        let bytes = device.read(&pooled, account).await?;
        Ok(normalised_rows(&bytes, self.config.hidden_size))
    }

    /// The generic entry point's inputs, read back and checked: `input_ids`
    /// (`[texts, positions]`, u32 or i32) and an optional `attention_mask`
    /// of the same shape (non-zero for real tokens; all ones if absent).
    /// [`run_tokens`](Self::run_tokens) turns them into the outputs; a
    /// batch of runs is made of them.
    pub(crate) async fn read_inputs(
        &self,
        device: &Device,
        inputs: &[(String, Tensor)],
        account: &Arc<Account>,
    ) -> Result<Tokens> {
        let mut ids = None;
        let mut mask = None;
        for (name, tensor) in inputs {
            match name.as_str() {
                "input_ids" => ids = Some(tensor),
                "attention_mask" => mask = Some(tensor),
                other => {
                    return Err(BridgeError::invalid(format!(
                        "bert models take `input_ids` and `attention_mask`, not `{other}`"
                    )));
                }
            }
        }
        let ids =
            ids.ok_or_else(|| BridgeError::invalid("bert models need an `input_ids` input"))?;
        let [texts, positions] = ids.shape()[..] else {
            return Err(BridgeError::shape(format!(
                "`input_ids` must be [texts, positions], not {:?}",
                ids.shape()
            )));
        };
        check_count(texts)?;
        if positions == 0 || positions > self.config.max_position_embeddings {
            return Err(BridgeError::shape(format!(
                "{positions} positions; this model takes 1 to {}",
                self.config.max_position_embeddings
            )));
        }
        let id_values = read_indices(device, ids, "input_ids", account).await?;
        let vocabulary = self.word_embeddings.shape()[0] as u64;
        if let Some(bad) = id_values.iter().find(|&&id| u64::from(id) >= vocabulary) {
            return Err(BridgeError::invalid(format!(
                "`input_ids` holds {bad}, outside the vocabulary of {vocabulary}"
            )));
        }
        let mask_values: Vec<f32> = match mask {
            Some(mask) => {
                if mask.shape() != ids.shape() {
                    return Err(BridgeError::shape(format!(
                        "`attention_mask` is {:?} but `input_ids` is {:?}",
                        mask.shape(),
                        ids.shape()
                    )));
                }
                read_indices(device, mask, "attention_mask", account)
                    .await?
                    .iter()
                    .map(|&m| if m != 0 { 1.0 } else { 0.0 })
                    .collect()
            }
            None => vec![1.0; id_values.len()],
        };
        // Checked here rather than left to the encoder, so that in a batch
        // the call fails alone instead of passing as zero embeddings.
        if texts > 0 && !mask_values.iter().any(|&m| m > 0.0) {
            return Err(no_tokens());
        }
        Ok(Tokens {
            texts,
            positions,
            ids: id_values,
            mask: mask_values,
        })
    }

    /// `run`'s outputs: `last_hidden_state` (`[texts, positions, hidden]`)
    /// and `sentence_embedding` (`[texts, hidden]`, mean-pooled and
    /// L2-normalised).
    pub(crate) async fn run_tokens(
        &self,
        device: &Device,
        tokens: &Tokens,
        account: &Arc<Account>,
    ) -> Result<Vec<(String, Tensor)>> {
        let (hidden, rows) = self.encode_tokens(device, tokens, account).await?;
        self.outputs(device, hidden, &rows, account).await
    }

    /// The last hidden state (`[texts, positions, hidden]`) and one
    /// L2-normalised embedding per text.
    pub(crate) async fn encode_tokens(
        &self,
        device: &Device,
        tokens: &Tokens,
        account: &Arc<Account>,
    ) -> Result<(Tensor, Vec<Vec<f32>>)> {
        let (hidden, pooled) = self.encode(device, tokens, account, true).await?;
        let hidden =
            hidden.ok_or_else(|| BridgeError::backend("the encoder kept no hidden state"))?;
        let bytes = device.read(&pooled, account).await?;
        Ok((hidden, normalised_rows(&bytes, self.config.hidden_size)))
    }

    /// `run`'s named outputs from the hidden state and embeddings of its
    /// texts; the embeddings are uploaded on `account`.
    pub(crate) async fn outputs(
        &self,
        device: &Device,
        hidden: Tensor,
        rows: &[Vec<f32>],
        account: &Arc<Account>,
    ) -> Result<Vec<(String, Tensor)>> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let embedding = device
            .upload(
                DType::F32,
                &[rows.len(), self.config.hidden_size],
                dtype::f32_to_bytes(&flat),
                account,
            )
            .await?;
        Ok(vec![
            ("last_hidden_state".to_owned(), hidden),
            ("sentence_embedding".to_owned(), embedding),
        ])
    }

    /// The encoder: the last hidden state (`[texts, positions, hidden]`,
    /// padding rows zero) when `want_hidden`, and the mean of each text's
    /// real tokens (`[texts, hidden]`).
    ///
    /// The real tokens of all texts are packed into one `[tokens, hidden]`
    /// matrix for everything but attention: the linear layers, norms and
    /// activations (nearly all the work) never see padding, however
    /// unequal the texts of a batch are. Attention gathers the packed rows
    /// into the padded `[texts, positions]` layout and back.
    async fn encode(
        &self,
        device: &Device,
        batch: &Tokens,
        account: &Arc<Account>,
        want_hidden: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let g = Graph::new(device, account);
        let (b, s) = (batch.texts, batch.positions);
        let hidden = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let head_dim = hidden / heads;
        let eps = self.config.layer_norm_eps as f32;

        // Which padded slot each real token fills, and back. Real tokens
        // are wherever the mask is set (the tokenizer pads on the right,
        // but nothing here depends on it).
        let mut packed_ids = Vec::new();
        let mut packed_positions = Vec::new();
        let mut to_packed = Vec::new();
        let mut lengths = vec![0usize; b];
        for (text, length) in lengths.iter_mut().enumerate() {
            for position in 0..s {
                let slot = text * s + position;
                if batch.mask.get(slot).is_some_and(|&m| m > 0.0) {
                    packed_ids.push(batch.ids.get(slot).copied().unwrap_or(0));
                    packed_positions.push(position as u32);
                    to_packed.push(slot as u32);
                    *length += 1;
                }
            }
        }
        let tokens = packed_ids.len();
        if tokens == 0 {
            return Err(no_tokens());
        }
        // Padded slot -> packed row; an index past the end gathers a row of
        // zeros, which is what padding should hold.
        let mut to_padded = vec![tokens as u32; b * s];
        for (row, &slot) in to_packed.iter().enumerate() {
            to_padded[slot as usize] = row as u32;
        }
        let indices = |values: &[u32]| {
            let bytes = u32_bytes(values);
            let shape = [values.len()];
            async move { device.upload(DType::U32, &shape, bytes, account).await }
        };
        let ids = indices(&packed_ids).await?;
        let positions = indices(&packed_positions).await?;

        let words = g.gather(&self.word_embeddings, &ids).await?;
        let placed = g.gather(&self.position_embeddings, &positions).await?;
        let token_type = g.slice(&self.token_type_embeddings, 0, 0, 1).await?;
        let embedded = g.add(&words, &placed).await?;
        let embedded = g.add(&embedded, &token_type).await?;
        let mut x = g
            .layer_norm(
                &embedded,
                &self.embedding_norm_weight,
                &self.embedding_norm_bias,
                eps,
            )
            .await?;

        // A backend with fused attention works on the packed rows
        // throughout; the padded layout is then only for `last_hidden`.
        let fused = device.description().fused_attention;
        let sequence_lengths = lengths
            .iter()
            .map(|&len| u32::try_from(len).map_err(|_| BridgeError::invalid("a text is too long")))
            .collect::<Result<Vec<u32>>>()?;
        // Without padding (one text, or texts of one length) the packed
        // and padded layouts are the same and nothing needs masking: three
        // ops a layer fewer.
        let padding = if tokens < b * s && (!fused || want_hidden) {
            // Padding gets a large negative score before the softmax, so no
            // real token attends to it.
            let additive: Vec<f32> = batch
                .mask
                .iter()
                .map(|&m| if m > 0.0 { 0.0 } else { -1e9 })
                .collect();
            Some(Padding {
                pad: indices(&to_padded).await?,
                unpad: indices(&to_packed).await?,
                mask: device
                    .upload(
                        DType::F32,
                        &[b, 1, 1, s],
                        dtype::f32_to_bytes(&additive),
                        account,
                    )
                    .await?,
            })
        } else {
            None
        };

        for layer in &self.layers {
            let qkv = self
                .project(g, &x, &layer.qkv_weights, &layer.qkv_bias)
                .await?;
            let context = if fused {
                let attention = Op::Attention {
                    heads: heads as u32,
                    lengths: sequence_lengths.clone(),
                };
                g.op(attention, &[&qkv]).await?
            } else {
                let qkv = match &padding {
                    Some(p) => g.gather(&qkv, &p.pad).await?,
                    None => qkv,
                };
                let qkv = g.reshape(&qkv, &[b, s, 3, heads, head_dim]).await?;
                // [3, b, heads, s, head_dim]: q, k and v each one slice of it.
                let qkv = g.permute(&qkv, &[2, 0, 3, 1, 4]).await?;
                let part = |i: u32| {
                    let qkv = &qkv;
                    async move {
                        let t = g.slice(qkv, 0, i, 1).await?;
                        g.reshape(&t, &[b, heads, s, head_dim]).await
                    }
                };
                let q = part(0).await?;
                let k = part(1).await?;
                let v = part(2).await?;
                let k_t = g.permute(&k, &[0, 1, 3, 2]).await?;
                let scores = g.matmul(&q, &k_t).await?;
                let scores = match &padding {
                    Some(p) => g.add(&scores, &p.mask).await?,
                    None => scores,
                };
                let probs = g.softmax(&scores, -1).await?;
                let context = g.matmul(&probs, &v).await?;
                let context = g.permute(&context, &[0, 2, 1, 3]).await?;
                let context = g.reshape(&context, &[b * s, hidden]).await?;
                match &padding {
                    Some(p) => g.gather(&context, &p.unpad).await?,
                    None => context,
                }
            };
            let attended = self
                .project(
                    g,
                    &context,
                    std::slice::from_ref(&layer.attention_out_weight),
                    &layer.attention_out_bias,
                )
                .await?;
            let attended = g.add(&attended, &x).await?;
            x = g
                .layer_norm(
                    &attended,
                    &layer.attention_norm_weight,
                    &layer.attention_norm_bias,
                    eps,
                )
                .await?;
            let inner = self
                .project(
                    g,
                    &x,
                    std::slice::from_ref(&layer.intermediate_weight),
                    &layer.intermediate_bias,
                )
                .await?;
            let inner = g.unary(self.activation, &inner).await?;
            let out = self
                .project(
                    g,
                    &inner,
                    std::slice::from_ref(&layer.output_weight),
                    &layer.output_bias,
                )
                .await?;
            let out = g.add(&out, &x).await?;
            x = g
                .layer_norm(
                    &out,
                    &layer.output_norm_weight,
                    &layer.output_norm_bias,
                    eps,
                )
                .await?;
        }

        // The mean of each text's tokens as one product: `[texts, tokens]`
        // of 1/len (0 elsewhere) times `[tokens, hidden]`.
        let mut averaging = vec![0f32; b * tokens];
        let mut row_start = 0;
        for (text, &len) in lengths.iter().enumerate() {
            for token in row_start..row_start + len {
                averaging[text * tokens + token] = 1.0 / len.max(1) as f32;
            }
            row_start += len;
        }
        let averaging = device
            .upload(
                DType::F32,
                &[b, tokens],
                dtype::f32_to_bytes(&averaging),
                account,
            )
            .await?;
        let pooled = g.matmul(&averaging, &x).await?;
        let last_hidden = if want_hidden {
            let padded = match &padding {
                Some(p) => g.gather(&x, &p.pad).await?,
                None => x,
            };
            Some(g.reshape(&padded, &[b, s, hidden]).await?)
        } else {
            None
        };
        Ok((last_hidden, pooled))
    }

    /// A linear layer (or several side by side) plus its bias, in the
    /// layout `prepare` chose.
    async fn project(
        &self,
        g: Graph<'_>,
        x: &Tensor,
        weights: &[Tensor],
        bias: &Tensor,
    ) -> Result<Tensor> {
        let product = if self.stored_linear {
            let mut operands = Vec::with_capacity(weights.len() + 1);
            operands.push(x);
            operands.extend(weights);
            g.op(Op::Linear, &operands).await?
        } else {
            let [weight] = weights else {
                return Err(BridgeError::backend(
                    "bert: a matmul layer has one fused weight matrix",
                ));
            };
            g.matmul(x, weight).await?
        };
        g.add(&product, bias).await
    }
}

fn no_tokens() -> BridgeError {
    BridgeError::invalid("no tokens to encode (an all-zero attention mask)")
}

fn check_count(texts: usize) -> Result<()> {
    if texts > MAX_TEXTS {
        return Err(BridgeError::invalid(format!(
            "{texts} texts in one call; at most {MAX_TEXTS}"
        )));
    }
    Ok(())
}

/// Rows of `width` f32s, each scaled to unit length.
fn normalised_rows(bytes: &[u8], width: usize) -> Vec<Vec<f32>> {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    values
        .chunks_exact(width.max(1))
        .map(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter().map(|v| v / norm).collect()
        })
        .collect()
}

/// An integer tensor's values, for checks the host must make before running.
async fn read_indices(
    device: &Device,
    tensor: &Tensor,
    name: &str,
    account: &Arc<Account>,
) -> Result<Vec<u32>> {
    let bytes = device.read(tensor, account).await?;
    match tensor.dtype() {
        DType::U32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        DType::I32 => bytes
            .chunks_exact(4)
            .map(|c| {
                let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                u32::try_from(v)
                    .map_err(|_| BridgeError::invalid(format!("`{name}` holds {v}, below zero")))
            })
            .collect(),
        other => Err(BridgeError::invalid(format!(
            "`{name}` must be u32 or i32, not {other}"
        ))),
    }
}

fn u32_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Token ids and attention mask of `texts`, padded to the longest.
fn tokenize(tokenizer: &Tokenizer, texts: Vec<String>) -> Result<Tokens> {
    let count = texts.len();
    let encodings = tokenizer
        .encode_batch(texts, true)
        .map_err(|e| BridgeError::invalid(format!("tokenizing: {e}")))?;
    let positions = encodings.first().map_or(0, |e| e.len());
    let mut ids = Vec::with_capacity(count * positions);
    let mut mask = Vec::with_capacity(count * positions);
    for encoding in &encodings {
        if encoding.len() != positions {
            return Err(BridgeError::backend(
                "the tokenizer padded a batch to different lengths",
            ));
        }
        ids.extend_from_slice(encoding.get_ids());
        mask.extend(encoding.get_attention_mask().iter().map(|&m| m as f32));
    }
    Ok(Tokens {
        texts: count,
        positions,
        ids,
        mask,
    })
}
