//! What a resident model can do, by family: the code that wires its weights
//! into a forward pass, built once at load and shared by every caller.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::account::Account;
use crate::backend::DeviceDescription;
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::kernel::{BinaryOp, UnaryOp};
use crate::models::batch::{BatchStats, Work};
use crate::models::bert::{self, Bert};
use crate::models::gguf::GgufMetadata;
use crate::models::graph::Graph;
use crate::models::llama::Llama;
use crate::models::manifest::{GraphSpec, ModelManifest};
use crate::models::registry::ResidentModel;
use crate::models::safetensors::HostTensor;
use crate::op::Op;

/// A family's forward pass over one resident model's weights.
pub(crate) enum Runner {
    Bert(Box<Bert>),
    /// The llama family's decoder: tokenizer, rotary tables, checked
    /// weights.
    Llama(Box<Llama>),
    /// A `generic` model's forward pass, from its manifest's `[graph]`.
    Graph(GraphSpec),
    /// Weights without a forward pass of ours: usable through `tensor`
    /// lookups only.
    Weights,
}

/// Family state learnt while reading the files (config, tokenizer), before
/// the weights are on the device.
pub(crate) enum Prepared {
    Bert(Box<bert::Prepared>),
    /// Everything llama needs is in its GGUF metadata, read with the
    /// weights: nothing to prepare before the upload.
    Llama,
    Graph(GraphSpec),
    Weights,
}

/// Parse the family's config and tokenizer and rearrange its weights in host
/// memory. Runs on the reader thread (it blocks on disk). A `[graph]` in the
/// manifest is the forward pass of families without one of their own; bert
/// and llama models use theirs.
pub(crate) fn prepare(
    folder: &Path,
    manifest: &ModelManifest,
    tensors: &mut BTreeMap<String, HostTensor>,
    linear_weights: DType,
) -> Result<Prepared> {
    match manifest.family.as_str() {
        "bert" => bert::prepare(folder, manifest, tensors, linear_weights)
            .map(|p| Prepared::Bert(Box::new(p))),
        "llama" => Ok(Prepared::Llama),
        _ => Ok(match &manifest.graph {
            Some(graph) => Prepared::Graph(graph.clone()),
            None => Prepared::Weights,
        }),
    }
}

/// The dtype a family's linear-layer weights stay in on `device`: the
/// manifest's `linear_weights` (bf16 for the bert family when it says
/// nothing) where the device multiplies such weights into f32 with
/// `linear`, else f32.
pub(crate) fn linear_weights(manifest: &ModelManifest, device: &DeviceDescription) -> DType {
    let wanted = match (manifest.linear_weights, manifest.family.as_str()) {
        (Some(dtype), _) => dtype.to_dtype(),
        (None, "bert") => DType::BF16,
        (None, _) => DType::F32,
    };
    let runs = device.linear && device.arithmetic_dtypes.contains(&wanted);
    if wanted != DType::F32 && runs {
        wanted
    } else {
        DType::F32
    }
}

impl Prepared {
    /// Bind the family to its uploaded weights (and `gguf`, the metadata of
    /// the model's GGUF file if it has one). Tables a family computes once
    /// (llama's rotary tables) are uploaded on `account`.
    pub(crate) async fn finish(
        self,
        manifest: &ModelManifest,
        tensors: &BTreeMap<String, Tensor>,
        gguf: Option<&GgufMetadata>,
        device: &Device,
        account: &Arc<Account>,
    ) -> Result<Runner> {
        match self {
            Prepared::Bert(prepared) => prepared
                .finish(manifest, tensors)
                .map(|b| Runner::Bert(Box::new(b))),
            Prepared::Llama => Llama::new(&manifest.name, tensors, gguf, device, account)
                .await
                .map(|l| Runner::Llama(Box::new(l))),
            Prepared::Graph(graph) => {
                // Every operand must name a graph input, a weight or an
                // earlier step's output: checked once, here.
                let mut known: Vec<&str> = graph.inputs.iter().map(String::as_str).collect();
                for (i, step) in graph.steps.iter().enumerate() {
                    if let Some(missing) = step
                        .inputs
                        .iter()
                        .find(|n| !known.contains(&n.as_str()) && !tensors.contains_key(*n))
                    {
                        return Err(BridgeError::invalid(format!(
                            "model `{}`: graph steps[{i}] ({}) uses `{missing}`, which is no \
                             graph input, weight or earlier output",
                            manifest.name, step.op
                        )));
                    }
                    known.push(&step.output);
                }
                Ok(Runner::Graph(graph))
            }
            Prepared::Weights => Ok(Runner::Weights),
        }
    }
}

/// `inputs` in the order the graph names them, each named exactly once.
fn graph_inputs(
    model: &ResidentModel,
    graph: &GraphSpec,
    inputs: &[(String, Tensor)],
) -> Result<Vec<Tensor>> {
    let mut ordered: Vec<Option<Tensor>> = vec![None; graph.inputs.len()];
    for (name, tensor) in inputs {
        let Some(i) = graph.inputs.iter().position(|n| n == name) else {
            return Err(BridgeError::invalid(format!(
                "model `{}` takes inputs {:?}, not `{name}`",
                model.name(),
                graph.inputs
            )));
        };
        ordered[i] = Some(tensor.clone());
    }
    ordered
        .into_iter()
        .zip(&graph.inputs)
        .map(|(tensor, name)| {
            tensor.ok_or_else(|| {
                BridgeError::invalid(format!("model `{}` needs input `{name}`", model.name()))
            })
        })
        .collect()
}

/// Whether a graph call on `inputs` (in graph input order) may share a
/// batch with others along dimension 0, decided from ranks alone so that
/// it holds for any batch size: every input has rank 2 or more and the same
/// first dimension, and every step keeps the rows apart. A step keeps rows
/// apart when
/// - it is elementwise (`relu`, ...), or a broadcasting `add`/`sub`/`mul`/
///   `div` whose batched operands have the result's rank and whose others
///   (weights, or values computed from weights alone) have a lower one, so
///   they broadcast over the rows;
/// - it is `matmul`/`linear` with a batched left operand of the result's
///   rank and an unbatched right operand that is a plain matrix or of lower
///   rank (the bias as for `add`);
/// - it is `softmax` over a dimension other than 0, or `layer_norm`/
///   `rms_norm` (which normalise the last dimension) with unbatched weights;
///
/// and every output is batched. Anything else (a softmax over the rows, a
/// product with a batched right operand, ...) would mix the callers' rows,
/// so such a call runs alone, as does a graph run whose inputs are 1-D.
pub(crate) fn graph_batchable(model: &ResidentModel, graph: &GraphSpec, inputs: &[Tensor]) -> bool {
    #[derive(Clone, Copy)]
    struct Value {
        rank: usize,
        batched: bool,
    }
    let rows = inputs.first().and_then(|t| t.shape().first().copied());
    if rows.is_none_or(|r| r == 0)
        || inputs
            .iter()
            .any(|t| t.shape().len() < 2 || t.shape().first().copied() != rows)
    {
        return false;
    }
    let mut values: BTreeMap<&str, Value> = graph
        .inputs
        .iter()
        .zip(inputs)
        .map(|(name, t)| {
            (
                name.as_str(),
                Value {
                    rank: t.shape().len(),
                    batched: true,
                },
            )
        })
        .collect();
    // Batched operands must have the result's rank (their dim 0 is the
    // result's), unbatched ones a lower rank (they broadcast over dim 0).
    let aligned = |operands: &[Value], rank: usize| {
        operands.iter().all(|v| {
            if v.batched {
                v.rank == rank
            } else {
                v.rank < rank
            }
        })
    };
    for step in &graph.steps {
        let Some(o) = step
            .inputs
            .iter()
            .map(|n| {
                values.get(n.as_str()).copied().or_else(|| {
                    model.tensor(n).map(|t| Value {
                        rank: t.shape().len(),
                        batched: false,
                    })
                })
            })
            .collect::<Option<Vec<Value>>>()
        else {
            return false;
        };
        let rank = o.iter().map(|v| v.rank).max().unwrap_or(0);
        let batched = o.iter().any(|v| v.batched);
        let keeps_rows = !batched
            || match step.op.as_str() {
                "relu" | "gelu" | "silu" | "tanh" | "exp" => true,
                "add" | "sub" | "mul" | "div" => aligned(&o, rank),
                "matmul" | "linear" => match o[..] {
                    [a, b, ..] => {
                        let product = a.batched
                            && !b.batched
                            && a.rank == rank
                            && (b.rank == 2 || b.rank < a.rank);
                        product && o.get(2).is_none_or(|bias| aligned(&[*bias], rank))
                    }
                    _ => false,
                },
                "softmax" => {
                    let dim = i64::from(step.dim.unwrap_or(-1));
                    let dim = if dim < 0 { dim + rank as i64 } else { dim };
                    dim > 0
                }
                "layer_norm" | "rms_norm" => match &o[..] {
                    [x, weights @ ..] => x.batched && weights.iter().all(|w| !w.batched),
                    [] => false,
                },
                _ => false,
            };
        if !keeps_rows {
            return false;
        }
        values.insert(step.output.as_str(), Value { rank, batched });
    }
    graph
        .outputs
        .iter()
        .all(|n| values.get(n.as_str()).is_some_and(|v| v.batched))
}

/// Run a manifest graph on `inputs` (in the order the graph names them):
/// each step one op over named values.
pub(crate) async fn run_graph(
    model: &ResidentModel,
    graph: &GraphSpec,
    inputs: &[Tensor],
    account: &Arc<Account>,
) -> Result<Vec<(String, Tensor)>> {
    let mut values: BTreeMap<&str, Tensor> = graph
        .inputs
        .iter()
        .map(String::as_str)
        .zip(inputs.iter().cloned())
        .collect();
    let g = Graph::new(model.device(), account);
    for step in &graph.steps {
        let operands = step
            .inputs
            .iter()
            .map(|n| {
                values
                    .get(n.as_str())
                    .or_else(|| model.tensor(n))
                    .cloned()
                    .ok_or_else(|| BridgeError::invalid(format!("graph value `{n}` is missing")))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let o: Vec<&Tensor> = operands.iter().collect();
        let eps = step.eps.unwrap_or(1e-5);
        let out = match step.op.as_str() {
            "matmul" => g.matmul(o[0], o[1]).await,
            "linear" => g.linear(o[0], o[1], o[2]).await,
            "add" => g.binary(BinaryOp::Add, o[0], o[1]).await,
            "sub" => g.binary(BinaryOp::Sub, o[0], o[1]).await,
            "mul" => g.binary(BinaryOp::Mul, o[0], o[1]).await,
            "div" => g.binary(BinaryOp::Div, o[0], o[1]).await,
            "relu" => g.unary(UnaryOp::Relu, o[0]).await,
            "gelu" => g.unary(UnaryOp::Gelu, o[0]).await,
            "silu" => g.unary(UnaryOp::Silu, o[0]).await,
            "tanh" => g.unary(UnaryOp::Tanh, o[0]).await,
            "exp" => g.unary(UnaryOp::Exp, o[0]).await,
            "softmax" => g.softmax(o[0], step.dim.unwrap_or(-1)).await,
            "layer_norm" => g.layer_norm(o[0], o[1], o[2], eps).await,
            "rms_norm" => g.op(Op::RmsNorm { eps, weight: true }, &[o[0], o[1]]).await,
            other => Err(BridgeError::unsupported(format!("graph op `{other}`"))),
        }
        .map_err(|e| {
            BridgeError::new(
                e.code,
                format!(
                    "model `{}`: step `{}` ({}): {}",
                    model.name(),
                    step.output,
                    step.op,
                    e.message
                ),
            )
        })?;
        values.insert(step.output.as_str(), out);
    }
    graph
        .outputs
        .iter()
        .map(|name| {
            values
                .get(name.as_str())
                .cloned()
                .map(|t| (name.clone(), t))
                .ok_or_else(|| BridgeError::invalid(format!("graph output `{name}` is missing")))
        })
        .collect()
}

/// `work` (a call that does not go through the batcher), given up with
/// `timeout` once `deadline` has passed, as a batched call would be. The
/// caller stops waiting and submits nothing more; ops already queued finish
/// on the device and their results are dropped. Without a tokio runtime to
/// time it, only a deadline that has already passed is caught.
async fn until<T>(
    model: &str,
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let timeout = || {
        BridgeError::new(
            ErrorCode::Timeout,
            format!("model `{model}`: the call's deadline passed"),
        )
    };
    match deadline {
        None => work.await,
        Some(deadline) if deadline <= Instant::now() => Err(timeout()),
        Some(deadline) if tokio::runtime::Handle::try_current().is_ok() => {
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), work)
                .await
                .unwrap_or_else(|_| Err(timeout()))
        }
        Some(_) => work.await,
    }
}

fn not_for(model: &ResidentModel, what: &str, families: &str) -> BridgeError {
    BridgeError::unsupported(format!(
        "model `{}` is of family `{}`; {what} is for {families} models",
        model.name(),
        model.family()
    ))
}

impl ResidentModel {
    /// Sentence embeddings, one L2-normalised vector per text. Concurrent
    /// calls are batched when the model's manifest asks for it and a tokio
    /// runtime is running; a call then waits at most until `deadline`.
    pub async fn embed(
        self: &Arc<Self>,
        texts: Vec<String>,
        account: &Arc<Account>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>> {
        if !matches!(self.runner, Runner::Bert(_)) {
            return Err(not_for(self, "embed", "bert"));
        }
        if texts.len() > bert::MAX_TEXTS {
            return Err(BridgeError::invalid(format!(
                "{} texts in one call; at most {}",
                texts.len(),
                bert::MAX_TEXTS
            )));
        }
        match &self.batcher {
            Some(batcher) if !texts.is_empty() && tokio::runtime::Handle::try_current().is_ok() => {
                batcher.embed(self, texts, account, deadline).await
            }
            _ => until(self.name(), deadline, self.embed_now(texts, account)).await,
        }
    }

    /// Embed without batching, charging `account`.
    pub(crate) async fn embed_now(
        &self,
        texts: Vec<String>,
        account: &Arc<Account>,
    ) -> Result<Vec<Vec<f32>>> {
        match &self.runner {
            Runner::Bert(bert) => bert.embed(self.device(), &texts, account).await,
            Runner::Llama(_) | Runner::Graph(_) | Runner::Weights => {
                Err(not_for(self, "embed", "bert"))
            }
        }
    }

    /// The width of the model's embeddings, for families that embed.
    pub fn embedding_dimensions(&self) -> Option<usize> {
        match &self.runner {
            Runner::Bert(bert) => Some(bert.dimensions()),
            Runner::Llama(_) | Runner::Graph(_) | Runner::Weights => None,
        }
    }

    /// Run the model on named input tensors (on this model's device);
    /// returns named outputs. What names a family takes is in its docs:
    /// bert takes `input_ids` and `attention_mask`; a `generic` model takes
    /// the inputs its manifest's `[graph]` names. As
    /// [`run_until`](Self::run_until) without a deadline.
    pub async fn run(
        self: &Arc<Self>,
        inputs: &[(String, Tensor)],
        account: &Arc<Account>,
    ) -> Result<Vec<(String, Tensor)>> {
        self.run_until(inputs, account, None).await
    }

    /// [`run`](Self::run), batched with concurrent runs of the same model
    /// when its manifest asks for it and a tokio runtime is running; a call
    /// then waits at most until `deadline`. Bert runs are batched along the
    /// texts, shorter ones padded with masked positions; a `generic` model's
    /// runs along dimension 0 of their inputs when the graph keeps rows
    /// apart and the inputs agree in every other dimension (see
    /// `graph_batchable` in the source for the exact rule); anything else
    /// runs alone. Each caller gets exactly the shapes it would get alone.
    pub async fn run_until(
        self: &Arc<Self>,
        inputs: &[(String, Tensor)],
        account: &Arc<Account>,
        deadline: Option<Instant>,
    ) -> Result<Vec<(String, Tensor)>> {
        let batcher = self
            .batcher
            .as_ref()
            .filter(|_| tokio::runtime::Handle::try_current().is_ok());
        match &self.runner {
            Runner::Bert(bert) => {
                let tokens = bert.read_inputs(self.device(), inputs, account).await?;
                match batcher {
                    Some(batcher) if tokens.texts > 0 => {
                        batcher
                            .run(self, Work::Encode(tokens), account, deadline)
                            .await
                    }
                    _ => {
                        let work = bert.run_tokens(self.device(), &tokens, account);
                        until(self.name(), deadline, work).await
                    }
                }
            }
            Runner::Graph(graph) => {
                let inputs = graph_inputs(self, graph, inputs)?;
                // Checked here, so that in a batch a tensor from another
                // device fails its own call rather than the batch's concat.
                for input in &inputs {
                    self.device().check_owner(input)?;
                }
                match batcher {
                    Some(batcher) if graph_batchable(self, graph, &inputs) => {
                        batcher
                            .run(self, Work::Graph(inputs), account, deadline)
                            .await
                    }
                    _ => {
                        let work = run_graph(self, graph, &inputs, account);
                        until(self.name(), deadline, work).await
                    }
                }
            }
            Runner::Llama(_) => Err(BridgeError::unsupported(format!(
                "model `{}` of family `{}` has no `run`: it generates text with `generate`",
                self.name(),
                self.family()
            ))),
            Runner::Weights => Err(BridgeError::unsupported(format!(
                "model `{}` of family `{}` has no forward pass here (bert has one; a generic \
                 model needs a [graph] in its manifest)",
                self.name(),
                self.family()
            ))),
        }
    }

    /// The batcher's counters, if the model batches.
    pub fn batch_stats(&self) -> Option<BatchStats> {
        self.batcher.as_ref().map(|b| b.stats())
    }
}
