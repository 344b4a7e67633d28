//! The llama family: a decoder-only transformer (RMSNorm, rotary position
//! embeddings, grouped-query attention, SwiGLU MLP) over the bridge's own
//! ops, so it runs on every backend, with its tokenizer built from the GGUF
//! metadata.
//!
//! Layout choices, made so that no weight needs a copy at load:
//! - GGUF stores a linear layer as `W[out, in]`. Where the device runs
//!   `Op::Linear` (the cpu backend) that is `x @ Wᵀ` straight from the
//!   file's quantized blocks, query/key/value and gate/up each in one op;
//!   elsewhere the weights are f32 and `x @ Wᵀ` is `(W @ xᵀ)ᵀ` (for one
//!   token `xᵀ` is `x` under another shape: a matrix-vector product).
//! - llama.cpp's converter permutes the q/k rows so that RoPE rotates
//!   adjacent pairs `(2i, 2i+1)` (candle's `rope_i`). Rotating pairs is
//!   linear, so `rope(x) = x·cos + (x @ R)·sin` with `R` a fixed ±1 matrix
//!   that maps `(a, b)` to `(-b, a)`: four ops and no strided gathers.
//! - The KV cache is per call, on the device. Where the device fuses
//!   attention (the cpu backend) it is pages of up to [`CACHE_PAGE`]
//!   positions, keys and values both `[kv_heads, positions, head_dim]`: a
//!   token joins the last page (copying at most a page) and one
//!   `causal-attention` op reads every page, with the causal mask and the
//!   grouping of query heads inside it. Elsewhere it is grown by `concat`
//!   (keys as `[kv_heads, head_dim, positions]`, values as `[kv_heads,
//!   positions, head_dim]`) and attention is composed of matmuls and a
//!   softmax. Only the last row of logits is read back.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::account::Account;
use crate::device::{Device, Tensor};
use crate::dtype::{self, DType};
use crate::error::{BridgeError, Result};
use crate::kernel::{BinaryOp, ReduceOp, UnaryOp};
use crate::models::gguf::{GgufMetadata, GgufValue};
use crate::models::graph::Graph;
use crate::models::sampling::{
    FinishReason, GenerateParams, Generation, Sampler, Scan, StopScanner,
};
use crate::op::Op;

/// Positions the rotary tables cover at most: the model's context length
/// when smaller. Longer contexts would cost table memory nobody uses here.
const MAX_POSITIONS: usize = 8192;

/// The largest head dimension accepted (llama models use 64 to 256): the
/// rotary tables and pair-swap matrix grow with it, the last quadratically.
const MAX_HEAD_DIM: usize = 1024;

/// Added to masked attention scores. Finite, so no backend has to get
/// `-inf - -inf` right; `exp` of it underflows to exactly 0.
const MASKED: f32 = -1e30;

/// llama.cpp's token type for control tokens (`<|im_start|>` and such).
const TOKEN_TYPE_CONTROL: u64 = 3;
/// ... and for user-defined tokens, also matched whole in text.
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Hyperparameters from the GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Config {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    eps: f32,
    rope_base: f32,
    rope_dim: usize,
    positions: usize,
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A llama model resident on a device, with its tokenizer. Immutable and
/// shared: each `generate` call keeps its own KV cache.
pub(crate) struct Llama {
    config: Config,
    device: Device,
    embed: Tensor,
    output: Tensor,
    output_norm: Tensor,
    layers: Vec<Layer>,
    /// `[positions, head_dim]` rotary cosines and sines, each pair's value
    /// repeated for both of its elements.
    cos: Tensor,
    sin: Tensor,
    /// The same times `1/sqrt(head_dim)`, for the queries: the attention
    /// scale rides on RoPE instead of costing an op per layer.
    cos_q: Tensor,
    sin_q: Tensor,
    /// `[head_dim, head_dim]`: `(x @ rot)` maps each pair `(a, b)` to `(-b, a)`.
    rot: Tensor,
    /// Shared with the blocking-pool tasks that tokenise prompts.
    tokenizer: Arc<Tokenizer>,
    bos: Option<u32>,
    add_bos: bool,
    eos: Option<u32>,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Positions per page of the key/value cache where attention is fused: a
/// decoded token copies at most this many positions per layer (the page
/// it joins) instead of the whole cache, and attention reads one page more
/// per this many positions.
const CACHE_PAGE: usize = 64;

fn invalid(model: &str, why: impl std::fmt::Display) -> BridgeError {
    BridgeError::invalid(format!("model `{model}`: {why}"))
}

fn meta_u64(meta: &GgufMetadata, key: &str, model: &str) -> Result<Option<u64>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(model, format!("GGUF metadata `{key}` is not an integer"))),
    }
}

fn meta_usize(meta: &GgufMetadata, key: &str, model: &str) -> Result<usize> {
    meta_u64(meta, key, model)?
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0 && v <= 1 << 20)
        .ok_or_else(|| {
            invalid(
                model,
                format!("GGUF metadata `{key}` is missing or not in 1..=1048576"),
            )
        })
}

fn meta_f32(meta: &GgufMetadata, key: &str, default: f32, model: &str) -> Result<f32> {
    match meta.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|v| v as f32)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| {
                invalid(
                    model,
                    format!("GGUF metadata `{key}` is not a positive number"),
                )
            }),
    }
}

impl Config {
    fn from_metadata(meta: &GgufMetadata, vocab: usize, model: &str) -> Result<Self> {
        let arch = meta
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .unwrap_or("");
        if arch != "llama" {
            return Err(BridgeError::unsupported(format!(
                "model `{model}`: GGUF architecture `{arch}` is not llama"
            )));
        }
        let hidden = meta_usize(meta, "llama.embedding_length", model)?;
        let heads = meta_usize(meta, "llama.attention.head_count", model)?;
        let kv_heads = match meta_u64(meta, "llama.attention.head_count_kv", model)? {
            None => heads,
            Some(_) => meta_usize(meta, "llama.attention.head_count_kv", model)?,
        };
        if !hidden.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
            return Err(invalid(
                model,
                format!("{hidden} dimensions, {heads} heads and {kv_heads} kv heads do not divide"),
            ));
        }
        let head_dim = hidden / heads;
        if head_dim > MAX_HEAD_DIM {
            return Err(BridgeError::unsupported(format!(
                "model `{model}`: head dimension {head_dim} is above {MAX_HEAD_DIM}"
            )));
        }
        let rope_dim = match meta_u64(meta, "llama.rope.dimension_count", model)? {
            None => head_dim,
            Some(_) => meta_usize(meta, "llama.rope.dimension_count", model)?,
        };
        if rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(invalid(
                model,
                format!("rope dimension {rope_dim} does not fit head dimension {head_dim}"),
            ));
        }
        let context = match meta_u64(meta, "llama.context_length", model)? {
            None => 2048,
            Some(_) => meta_usize(meta, "llama.context_length", model)?,
        };
        Ok(Self {
            layers: meta_usize(meta, "llama.block_count", model)?,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn: meta_usize(meta, "llama.feed_forward_length", model)?,
            vocab,
            eps: meta_f32(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5, model)?,
            rope_base: meta_f32(meta, "llama.rope.freq_base", 10_000.0, model)?,
            rope_dim,
            positions: context.min(MAX_POSITIONS),
        })
    }
}

/// The weights tensor `name` with `shape`, or a clear error: f32, or (a
/// matrix, where `quantized`) any quantized dtype.
fn weight(
    tensors: &BTreeMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    quantized: bool,
    model: &str,
) -> Result<Tensor> {
    let t = tensors
        .get(name)
        .ok_or_else(|| invalid(model, format!("tensor `{name}` is missing")))?;
    let dtype_ok = t.dtype() == DType::F32 || (quantized && t.dtype().is_quantized());
    if t.shape() != shape || !dtype_ok {
        let expected = if quantized { "f32 or quantized" } else { "f32" };
        return Err(invalid(
            model,
            format!(
                "tensor `{name}` is {} {:?}, expected {expected} {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.clone())
}

impl Llama {
    /// Build the runner from a loaded model's tensors and GGUF metadata:
    /// checks every shape, uploads the rotary tables, builds the tokenizer.
    pub(crate) async fn new(
        model: &str,
        tensors: &BTreeMap<String, Tensor>,
        meta: Option<&GgufMetadata>,
        device: &Device,
        account: &Arc<Account>,
    ) -> Result<Self> {
        let meta = meta.ok_or_else(|| {
            BridgeError::unsupported(format!(
                "model `{model}`: the llama family reads its configuration and tokenizer \
                 from GGUF metadata; this model has no GGUF weights"
            ))
        })?;
        let vocab = tensors
            .get("token_embd.weight")
            .and_then(|t| t.shape().first().copied())
            .ok_or_else(|| invalid(model, "tensor `token_embd.weight` is missing"))?;
        let c = Config::from_metadata(meta, vocab, model)?;
        let (d, kv) = (c.hidden, c.kv_heads * c.head_dim);
        // Quantized matrices come only where the device runs `linear` on
        // them (the registry expands them to f32 elsewhere).
        let linear = device.description().linear;
        let embed = weight(tensors, "token_embd.weight", &[c.vocab, d], linear, model)?;
        let output = match tensors.get("output.weight") {
            Some(_) => weight(tensors, "output.weight", &[c.vocab, d], linear, model)?,
            // Tied embeddings: the output projection is the embedding table.
            None => embed.clone(),
        };
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let w = |name: &str, shape: &[usize]| {
                let quantized = linear && shape.len() == 2;
                weight(
                    tensors,
                    &format!("blk.{i}.{name}.weight"),
                    shape,
                    quantized,
                    model,
                )
            };
            layers.push(Layer {
                attn_norm: w("attn_norm", &[d])?,
                wq: w("attn_q", &[d, d])?,
                wk: w("attn_k", &[kv, d])?,
                wv: w("attn_v", &[kv, d])?,
                wo: w("attn_output", &[d, d])?,
                ffn_norm: w("ffn_norm", &[d])?,
                gate: w("ffn_gate", &[c.ffn, d])?,
                up: w("ffn_up", &[c.ffn, d])?,
                down: w("ffn_down", &[d, c.ffn])?,
            });
        }
        let output_norm = weight(tensors, "output_norm.weight", &[d], false, model)?;

        let (cos, sin, rot) = rope_tables(&c);
        let hd = c.head_dim;
        let upload = |shape: Vec<usize>, values: Vec<f32>| async move {
            device
                .upload(DType::F32, &shape, dtype::f32_to_bytes(&values), account)
                .await
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let scaled = |t: &[f32]| t.iter().map(|v| v * scale).collect::<Vec<_>>();
        let cos_q = upload(vec![c.positions, hd], scaled(&cos)).await?;
        let sin_q = upload(vec![c.positions, hd], scaled(&sin)).await?;
        let cos = upload(vec![c.positions, hd], cos).await?;
        let sin = upload(vec![c.positions, hd], sin).await?;
        let rot = upload(vec![hd, hd], rot).await?;

        let (tokenizer, special) = build_tokenizer(meta, model)?;
        let token_id = |key: &str| -> Result<Option<u32>> {
            Ok(meta_u64(meta, key, model)?
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < special.len()))
        };
        let bos = token_id("tokenizer.ggml.bos_token_id")?;
        let eos = token_id("tokenizer.ggml.eos_token_id")?;
        let add_bos = meta
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(false);
        Ok(Self {
            config: c,
            device: device.clone(),
            embed,
            output,
            output_norm,
            layers,
            cos,
            sin,
            cos_q,
            sin_q,
            rot,
            tokenizer: Arc::new(tokenizer),
            bos,
            add_bos,
            eos,
        })
    }

    /// Token ids of `prompt` as the model sees it (with BOS if the model
    /// wants one).
    pub(crate) fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        encode(&self.tokenizer, self.add_bos, self.bos, prompt)
    }

    /// [`encode`](Self::encode) on tokio's blocking pool: a prompt is the
    /// guest's (up to the host's input cap) and tokenising it must not hold
    /// an async worker thread.
    async fn encode_off_async(&self, prompt: &str) -> Result<Vec<u32>> {
        let (tokenizer, add_bos, bos) = (Arc::clone(&self.tokenizer), self.add_bos, self.bos);
        let prompt = prompt.to_owned();
        super::off_async("tokenize", move || {
            encode(&tokenizer, add_bos, bos, &prompt)
        })
        .await
    }

    /// Generate from `prompt`: see [`ResidentModel::generate`](crate::models::ResidentModel::generate).
    pub(crate) async fn generate(
        &self,
        prompt: &str,
        params: &GenerateParams,
        account: &Arc<Account>,
        on_token: &mut (dyn FnMut(&str) -> ControlFlow<()> + Send),
    ) -> Result<Generation> {
        params.validate()?;
        let prompt_ids = self.encode_off_async(prompt).await?;
        self.generate_ids(&prompt_ids, params, account, on_token)
            .await
    }

    /// Generate from prompt token ids.
    pub(crate) async fn generate_ids(
        &self,
        prompt_ids: &[u32],
        params: &GenerateParams,
        account: &Arc<Account>,
        on_token: &mut (dyn FnMut(&str) -> ControlFlow<()> + Send),
    ) -> Result<Generation> {
        params.validate()?;
        self.check_prompt(prompt_ids)?;
        let positions = self.config.positions;
        let mut sampler = Sampler::new(params);
        let mut scanner = StopScanner::new(&params.stop);
        let mut cache: Vec<Vec<(Tensor, Tensor)>> = vec![Vec::new(); self.config.layers];
        let mut tokens: Vec<u32> = Vec::new();
        let mut logits = self.forward(prompt_ids, 0, &mut cache, account).await?;
        let mut position = prompt_ids.len();
        let mut stop_at = None;
        let finish = loop {
            let next = if sampler.greedy() {
                self.largest(&logits, account).await?
            } else {
                let row = self.read_f32(&logits, account).await?;
                sampler.sample(&row)?
            };
            if Some(next) == self.eos {
                break FinishReason::Eos;
            }
            tokens.push(next);
            let text = self.decode(&tokens)?;
            let full = tokens.len() >= params.max_tokens as usize || position + 1 >= positions;
            match scanner.scan(&text, false, on_token) {
                Scan::Stopped(at) => {
                    stop_at = Some(at);
                    break FinishReason::Stop;
                }
                Scan::Cancelled => break FinishReason::Cancelled,
                Scan::Continue if full => break FinishReason::Length,
                Scan::Continue => {}
            }
            logits = self.forward(&[next], position, &mut cache, account).await?;
            position += 1;
        };
        let mut text = self.decode(&tokens)?;
        match finish {
            FinishReason::Stop => text.truncate(stop_at.unwrap_or(text.len())),
            FinishReason::Cancelled => text.truncate(scanner.emitted()),
            _ => {
                // Nothing more follows: stream what was held back.
                if let Scan::Cancelled = scanner.scan(&text, true, on_token) {
                    return Ok(Generation {
                        text,
                        tokens,
                        finish_reason: FinishReason::Cancelled,
                    });
                }
            }
        }
        Ok(Generation {
            text,
            tokens,
            finish_reason: finish,
        })
    }

    /// The logits after `prompt`, read back.
    pub(crate) async fn next_token_logits(
        &self,
        prompt: &[u32],
        account: &Arc<Account>,
    ) -> Result<Vec<f32>> {
        self.check_prompt(prompt)?;
        let mut cache = vec![Vec::new(); self.config.layers];
        let logits = self.forward(prompt, 0, &mut cache, account).await?;
        self.read_f32(&logits, account).await
    }

    /// The greedy token: the index of the largest logit (the first of
    /// equals, as [`Sampler::sample`] picks), found on the device, so that
    /// 4 bytes come back per token instead of the vocabulary's logits
    /// (192 KB for SmolLM2) and the host does not scan them. The logit
    /// itself comes back too: the device's argmax counts a NaN as the
    /// largest, so a NaN anywhere is caught here as the host would catch it.
    async fn largest(&self, logits: &Tensor, account: &Arc<Account>) -> Result<u32> {
        let g = Graph::new(&self.device, account);
        let argmax = Op::Reduce {
            op: ReduceOp::ArgMax,
            dim: 0,
            keep_dim: true,
        };
        let index = g.op(argmax, &[logits]).await?;
        let column = g.reshape(logits, &[self.config.vocab, 1]).await?;
        let value = g.gather(&column, &index).await?;
        let index = self.device.read(&index, account).await?;
        let value = self.read_f32(&value, account).await?;
        match (index.get(..4), value.first()) {
            (Some(&[a, b, c, d]), Some(v)) if !v.is_nan() => Ok(u32::from_le_bytes([a, b, c, d])),
            _ => Err(Sampler::bad_logits()),
        }
    }

    /// An f32 tensor's values (the bytes of a `Vec<u8>` need not be aligned
    /// for a cast).
    async fn read_f32(&self, tensor: &Tensor, account: &Arc<Account>) -> Result<Vec<f32>> {
        let bytes = self.device.read(tensor, account).await?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// A prompt must fit the context, hold a token, and name real tokens.
    fn check_prompt(&self, prompt_ids: &[u32]) -> Result<()> {
        let positions = self.config.positions;
        if prompt_ids.is_empty() {
            return Err(BridgeError::invalid("generate: the prompt has no tokens"));
        }
        if prompt_ids.len() >= positions {
            return Err(BridgeError::invalid(format!(
                "generate: the prompt is {} tokens; the model's context holds {positions}",
                prompt_ids.len()
            )));
        }
        if let Some(&bad) = prompt_ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab)
        {
            return Err(BridgeError::invalid(format!(
                "generate: token id {bad} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        Ok(())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| BridgeError::backend(format!("generate: cannot decode tokens: {e}")))
    }

    /// Whether `weights` go through one `linear` op together (and the gated
    /// MLP through `swiglu`): where the device has them and the weights
    /// share a dtype.
    fn fused(&self, weights: &[&Tensor]) -> bool {
        self.device.description().linear && weights.iter().all(|w| w.dtype() == weights[0].dtype())
    }

    /// `x @ Wᵀ` for `x: [t, in]` and `w: [out, in]`: one `linear` op where
    /// the device has it (quantized weights included), else `(W @ xᵀ)ᵀ`.
    async fn linear(g: Graph<'_>, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if g.device.description().linear {
            return g.op(Op::Linear, &[x, w]).await;
        }
        let (t, inner) = (x.shape()[0], x.shape()[1]);
        let out = w.shape()[0];
        if t == 1 {
            let column = g.reshape(x, &[inner, 1]).await?;
            let y = g.matmul(w, &column).await?;
            g.reshape(&y, &[1, out]).await
        } else {
            let transpose = Op::Transpose { dim0: 0, dim1: 1 };
            let xt = g.op(transpose.clone(), &[x]).await?;
            let y = g.matmul(w, &xt).await?;
            g.op(transpose, &[&y]).await
        }
    }

    /// RoPE on `x: [heads, t, head_dim]` with `cos`/`sin: [1, t, head_dim]`.
    async fn rope(&self, g: Graph<'_>, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let swapped = g.matmul(x, &self.rot).await?;
        let a = g.binary(BinaryOp::Mul, x, cos).await?;
        let b = g.binary(BinaryOp::Mul, &swapped, sin).await?;
        g.add(&a, &b).await
    }

    /// `[t, n·hd]` → `[n, t, hd]`.
    async fn heads(&self, g: Graph<'_>, x: &Tensor, n: usize) -> Result<Tensor> {
        let t = x.shape()[0];
        let x = g.reshape(x, &[t, n, self.config.head_dim]).await?;
        g.permute(&x, &[1, 0, 2]).await
    }

    /// Run `ids` at positions `start..`, extending `cache`; the logits of
    /// the last position, `[vocab]`.
    pub(crate) async fn forward(
        &self,
        ids: &[u32],
        start: usize,
        cache: &mut [Vec<(Tensor, Tensor)>],
        account: &Arc<Account>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let g = Graph::new(&self.device, account);
        let t = ids.len();
        let total = start + t;
        let (hd, groups) = (c.head_dim, c.heads / c.kv_heads);
        let index_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let index = self
            .device
            .upload(DType::U32, &[t], index_bytes, account)
            .await?;
        let mut x = g.gather(&self.embed, &index).await?;

        let slice = |table: &Tensor| {
            let table = table.clone();
            async move {
                let rows = g.slice(&table, 0, start as u32, t as u32).await?;
                g.reshape(&rows, &[1, t, hd]).await
            }
        };
        let cos = slice(&self.cos).await?;
        let sin = slice(&self.sin).await?;
        let cos_q = slice(&self.cos_q).await?;
        let sin_q = slice(&self.sin_q).await?;
        let fused = self.device.description().fused_attention;
        let mask = if t > 1 && !fused {
            let mut values = vec![0f32; t * total];
            for (i, row) in values.chunks_exact_mut(total).enumerate() {
                row[start + i + 1..].fill(MASKED);
            }
            Some(
                self.device
                    .upload(
                        DType::F32,
                        &[t, total],
                        dtype::f32_to_bytes(&values),
                        account,
                    )
                    .await?,
            )
        } else {
            None
        };
        let rms_norm = Op::RmsNorm {
            eps: c.eps,
            weight: true,
        };

        for (layer, cached) in self.layers.iter().zip(cache.iter_mut()) {
            let h = g.op(rms_norm.clone(), &[&x, &layer.attn_norm]).await?;
            let (q, k, v) = if self.fused(&[&layer.wq, &layer.wk, &layer.wv]) {
                // One pass over the normalised input for all three; heads
                // are then whole rows of `[heads + 2·kv, t, hd]`.
                let qkv = g
                    .op(Op::Linear, &[&h, &layer.wq, &layer.wk, &layer.wv])
                    .await?;
                let all = c.heads + 2 * c.kv_heads;
                let qkv = self.heads(g, &qkv, all).await?;
                let (heads, kv) = (c.heads as u32, c.kv_heads as u32);
                (
                    g.slice(&qkv, 0, 0, heads).await?,
                    g.slice(&qkv, 0, heads, kv).await?,
                    g.slice(&qkv, 0, heads + kv, kv).await?,
                )
            } else {
                let q = Self::linear(g, &h, &layer.wq).await?;
                let k = Self::linear(g, &h, &layer.wk).await?;
                let v = Self::linear(g, &h, &layer.wv).await?;
                (
                    self.heads(g, &q, c.heads).await?,
                    self.heads(g, &k, c.kv_heads).await?,
                    self.heads(g, &v, c.kv_heads).await?,
                )
            };
            let q = self.rope(g, &q, &cos_q, &sin_q).await?;
            let k = self.rope(g, &k, &cos, &sin).await?;
            let o = if fused {
                // Pages of keys and values, `[kv, positions, hd]`: new
                // positions join the last page while it is short, so a
                // token copies at most a page, not the whole cache.
                match cached.pop() {
                    Some((k_old, v_old)) if k_old.shape()[1] < CACHE_PAGE => {
                        let k = g.op(Op::Concat { dim: 1 }, &[&k_old, &k]).await?;
                        let v = g.op(Op::Concat { dim: 1 }, &[&v_old, &v]).await?;
                        cached.push((k, v));
                    }
                    full => {
                        cached.extend(full);
                        cached.push((k, v));
                    }
                }
                let mut operands = vec![&q];
                operands.extend(cached.iter().map(|(k, _)| k));
                operands.extend(cached.iter().map(|(_, v)| v));
                g.op(Op::CausalAttention, &operands).await?
            } else {
                // Keys are cached transposed, `[kv, hd, positions]`: a new
                // key `[kv, 1, hd]` is that shape for free, and the scores
                // need no transpose of the whole cache per token.
                let kt = g.op(Op::Transpose { dim0: 1, dim1: 2 }, &[&k]).await?;
                let (kt, v) = match cached.pop() {
                    Some((kt_old, v_old)) => {
                        let kt = g.op(Op::Concat { dim: 2 }, &[&kt_old, &kt]).await?;
                        let v = g.op(Op::Concat { dim: 1 }, &[&v_old, &v]).await?;
                        (kt, v)
                    }
                    None => (kt, v),
                };
                cached.push((kt.clone(), v.clone()));

                // Heads sharing a kv head are stacked as rows: [kv, groups·t, hd].
                let q = g.reshape(&q, &[c.kv_heads, groups * t, hd]).await?;
                let mut scores = g.matmul(&q, &kt).await?;
                if let Some(mask) = &mask {
                    let s4 = g.reshape(&scores, &[c.kv_heads, groups, t, total]).await?;
                    let masked = g.add(&s4, mask).await?;
                    scores = g.reshape(&masked, &[c.kv_heads, groups * t, total]).await?;
                }
                let probs = g.softmax(&scores, -1).await?;
                let o = g.matmul(&probs, &v).await?;
                let o = g.reshape(&o, &[c.heads, t, hd]).await?;
                let o = g.permute(&o, &[1, 0, 2]).await?;
                g.reshape(&o, &[t, c.hidden]).await?
            };
            let attn = Self::linear(g, &o, &layer.wo).await?;
            x = g.add(&x, &attn).await?;

            let h = g.op(rms_norm.clone(), &[&x, &layer.ffn_norm]).await?;
            let act = if self.fused(&[&layer.gate, &layer.up]) {
                let both = g.op(Op::Linear, &[&h, &layer.gate, &layer.up]).await?;
                g.op(Op::SwiGlu, &[&both]).await?
            } else {
                let gate = Self::linear(g, &h, &layer.gate).await?;
                let up = Self::linear(g, &h, &layer.up).await?;
                let gate = g.unary(UnaryOp::Silu, &gate).await?;
                g.binary(BinaryOp::Mul, &gate, &up).await?
            };
            let down = Self::linear(g, &act, &layer.down).await?;
            x = g.add(&x, &down).await?;
        }
        let last = g.slice(&x, 0, (t - 1) as u32, 1).await?;
        let last = g.op(rms_norm, &[&last, &self.output_norm]).await?;
        let logits = Self::linear(g, &last, &self.output).await?;
        g.reshape(&logits, &[c.vocab]).await
    }
}

/// Cosine and sine tables `[positions, head_dim]` and the pair-swap matrix
/// `[head_dim, head_dim]`. Angles are computed in f32 as llama.cpp and
/// candle do, so positions far into the context agree with them.
fn rope_tables(c: &Config) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = c.head_dim;
    let mut cos = vec![1f32; c.positions * hd];
    let mut sin = vec![0f32; c.positions * hd];
    for p in 0..c.positions {
        for i in 0..c.rope_dim / 2 {
            let theta = 1f32 / c.rope_base.powf((2 * i) as f32 / c.rope_dim as f32);
            let angle = p as f32 * theta;
            let (s, co) = angle.sin_cos();
            for j in [2 * i, 2 * i + 1] {
                cos[p * hd + j] = co;
                sin[p * hd + j] = s;
            }
        }
    }
    let mut rot = vec![0f32; hd * hd];
    for i in 0..c.rope_dim / 2 {
        // (x @ rot)[2i] = -x[2i+1], (x @ rot)[2i+1] = x[2i].
        rot[(2 * i + 1) * hd + 2 * i] = -1.0;
        rot[(2 * i) * hd + 2 * i + 1] = 1.0;
    }
    (cos, sin, rot)
}

fn strings(meta: &GgufMetadata, key: &str, model: &str) -> Result<Vec<String>> {
    meta.get(key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| invalid(model, format!("GGUF metadata `{key}` is missing")))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(model, format!("GGUF metadata `{key}` holds a non-string")))
        })
        .collect()
}

/// Token ids of `prompt` (with `bos` first if `add_bos`); an empty prompt
/// becomes `[bos]`.
fn encode(
    tokenizer: &Tokenizer,
    add_bos: bool,
    bos: Option<u32>,
    prompt: &str,
) -> Result<Vec<u32>> {
    let encoding = tokenizer
        .encode_fast(prompt, false)
        .map_err(|e| BridgeError::invalid(format!("generate: cannot tokenize: {e}")))?;
    let mut ids = Vec::with_capacity(encoding.len() + 1);
    if add_bos && let Some(bos) = bos {
        ids.push(bos);
    }
    ids.extend_from_slice(encoding.get_ids());
    if ids.is_empty() {
        // An empty prompt still needs one position to predict from.
        match bos {
            Some(bos) => ids.push(bos),
            None => {
                return Err(BridgeError::invalid(
                    "generate: the prompt is empty and the model has no BOS token",
                ));
            }
        }
    }
    Ok(ids)
}

/// A gpt2-style byte-level BPE tokenizer from `tokenizer.ggml.*`, and the
/// vocabulary's token strings.
fn build_tokenizer(meta: &GgufMetadata, model: &str) -> Result<(Tokenizer, Vec<String>)> {
    let kind = meta
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    if kind != "gpt2" {
        return Err(BridgeError::unsupported(format!(
            "model `{model}`: tokenizer model `{kind}` is not supported (gpt2-style BPE is)"
        )));
    }
    let tokens = strings(meta, "tokenizer.ggml.tokens", model)?;
    let merges = strings(meta, "tokenizer.ggml.merges", model)?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| invalid(model, format!("tokenizer merge `{m}` has no space")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| invalid(model, format!("tokenizer: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let add_prefix_space = meta
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(GgufValue::as_bool)
        .unwrap_or(false);
    let byte_level = ByteLevel::new(add_prefix_space, false, true);
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("gpt2");
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // StarCoder and SmolLM split every digit apart before the byte-level
        // regex, as their tokenizer.json does.
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "llama3" | "llama-bpe" | "smaug-bpe" => {
            const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
            let split = Split::new(
                SplitPattern::Regex(LLAMA3.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| invalid(model, format!("tokenizer: {e}")))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(add_prefix_space, false, false).into(),
            ])
            .into()
        }
        _ => byte_level.into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    if let Some(types) = meta
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(ty, _)| {
                matches!(
                    ty.as_u64(),
                    Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
                )
            })
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| invalid(model, format!("tokenizer: {e}")))?;
    }
    Ok((tokenizer, tokens))
}
