//! What a resident model can do, by family: the code that wires its weights
//! into a forward pass, built once at load and shared by every caller.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::account::Account;
use crate::device::Tensor;
use crate::error::{BridgeError, Result};
use crate::models::batch::BatchStats;
use crate::models::bert::{self, Bert};
use crate::models::manifest::ModelManifest;
use crate::models::registry::ResidentModel;
use crate::models::safetensors::HostTensor;

/// A family's forward pass over one resident model's weights.
pub(crate) enum Runner {
    Bert(Box<Bert>),
    /// Weights without a forward pass of ours: usable through `tensor`
    /// lookups only.
    Weights,
}

/// Family state learnt while reading the files (config, tokenizer), before
/// the weights are on the device.
pub(crate) enum Prepared {
    Bert(Box<bert::Prepared>),
    Weights,
}

/// Parse the family's config and tokenizer and rearrange its weights in host
/// memory. Runs on the reader thread (it blocks on disk).
pub(crate) fn prepare(
    folder: &Path,
    manifest: &ModelManifest,
    tensors: &mut BTreeMap<String, HostTensor>,
) -> Result<Prepared> {
    match manifest.family.as_str() {
        "bert" => bert::prepare(folder, manifest, tensors).map(|p| Prepared::Bert(Box::new(p))),
        _ => Ok(Prepared::Weights),
    }
}

impl Prepared {
    /// Bind the family to its uploaded weights.
    pub(crate) fn finish(
        self,
        manifest: &ModelManifest,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Runner> {
        match self {
            Prepared::Bert(prepared) => prepared
                .finish(manifest, tensors)
                .map(|b| Runner::Bert(Box::new(b))),
            Prepared::Weights => Ok(Runner::Weights),
        }
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
            _ => self.embed_now(texts, account).await,
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
            Runner::Weights => Err(not_for(self, "embed", "bert")),
        }
    }

    /// The width of the model's embeddings, for families that embed.
    pub fn embedding_dimensions(&self) -> Option<usize> {
        match &self.runner {
            Runner::Bert(bert) => Some(bert.dimensions()),
            Runner::Weights => None,
        }
    }

    /// Run the model on named input tensors (on this model's device);
    /// returns named outputs. What names a family takes is in its docs:
    /// bert takes `input_ids` and `attention_mask`.
    pub async fn run(
        &self,
        inputs: &[(String, Tensor)],
        account: &Arc<Account>,
    ) -> Result<Vec<(String, Tensor)>> {
        match &self.runner {
            Runner::Bert(bert) => bert.run(self.device(), inputs, account).await,
            Runner::Weights => Err(BridgeError::unsupported(format!(
                "model `{}` of family `{}` has no forward pass here (families with one: bert, llama)",
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
