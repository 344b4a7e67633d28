//! Models the host keeps resident across invocations, through the GPU
//! bridge.
//!
//! [`Model::load`] finds the model already on the device after the first
//! call anywhere on the host (any invocation, any tenant allowed to use it),
//! so a function can load it on every call: only the first one pays for
//! reading the weights. Concurrent calls may be batched by the host.
//!
//! ```no_run
//! use gust_sdk::model::{Model, ModelError};
//!
//! fn similarity(a: &str, b: &str) -> Result<f32, ModelError> {
//!     let model = Model::load("all-minilm-l6-v2")?;
//!     let v = model.embed(&[a, b])?;
//!     // Embeddings are L2-normalised: the dot product is the cosine.
//!     Ok(v[0].iter().zip(&v[1]).map(|(x, y)| x * y).sum())
//! }
//! ```

use std::fmt;

use crate::bindings::gust::gpu::models as raw;
use crate::tensor::{ErrorCode, Tensor, TensorError};

/// Why a model call failed; the same codes as tensor calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError(pub TensorError);

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ModelError {}

impl From<crate::bindings::gust::gpu::types::Error> for ModelError {
    fn from(e: crate::bindings::gust::gpu::types::Error) -> Self {
        Self(TensorError::from(e))
    }
}

impl From<TensorError> for ModelError {
    fn from(e: TensorError) -> Self {
        Self(e)
    }
}

/// A model failure as the function's error, code `gpu-<code>`. Unlike a
/// tensor call, `quota-exceeded` here is 503: the host's shared queue for
/// the model is full (or the tenant's device time is used up), a transient
/// state the host answers with `Retry-After`. Otherwise as for tensors.
impl From<ModelError> for crate::Error {
    fn from(e: ModelError) -> Self {
        let busy = e.0.code == ErrorCode::QuotaExceeded;
        let error = crate::Error::from(e.0);
        if busy { error.with_status(503) } else { error }
    }
}

type Result<T> = std::result::Result<T, ModelError>;

/// Settings for [`Model::generate`]; `GenerateParams::default()` is greedy
/// decoding of up to 128 tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Stop after this many new tokens.
    pub max_tokens: u32,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Sample only among the `k` most likely tokens.
    pub top_k: Option<u32>,
    /// Nucleus sampling: the smallest set of tokens whose probabilities sum
    /// to at least `p`.
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Stop when any of these strings is produced (not included).
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: None,
            stop: Vec::new(),
        }
    }
}

fn raw_params(params: &GenerateParams) -> raw::GenerateParams {
    raw::GenerateParams {
        max_tokens: params.max_tokens,
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        seed: params.seed,
        stop: params.stop.clone(),
    }
}

/// A model resident on the host's device.
#[derive(Debug)]
pub struct Model(raw::Model);

impl Model {
    /// Load the model called `name`, or find it resident. The tenant's
    /// policy must list it (`forbidden` otherwise).
    pub fn load(name: &str) -> Result<Self> {
        raw::Model::load(name).map(Model).map_err(ModelError::from)
    }

    /// The model's name.
    pub fn name(&self) -> String {
        self.0.name()
    }

    /// The model family, e.g. `bert` or `llama`.
    pub fn family(&self) -> String {
        self.0.family()
    }

    /// Sentence embeddings: one L2-normalised vector per text.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        let texts: Vec<String> = texts.iter().map(|t| t.as_ref().to_owned()).collect();
        self.0.embed(&texts).map_err(ModelError::from)
    }

    /// Continue `prompt` with generated text.
    pub fn generate(&self, prompt: &str, params: &GenerateParams) -> Result<String> {
        self.0
            .generate(prompt, &raw_params(params))
            .map_err(ModelError::from)
    }

    /// Like [`generate`](Self::generate), and each piece of text is also
    /// emitted to the caller as it is produced (as [`crate::emit`] does), so
    /// a caller reading the invocation as Server-Sent Events or over a
    /// WebSocket sees tokens as they come. A handler that streams this way
    /// usually returns an empty body: a non-streaming caller gets the
    /// emitted pieces ahead of the body.
    pub fn generate_stream(&self, prompt: &str, params: &GenerateParams) -> Result<String> {
        self.0
            .generate_stream(prompt, &raw_params(params))
            .map_err(ModelError::from)
    }

    /// Run the model on named input tensors; returns named outputs.
    pub fn run(&self, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>> {
        let raw_inputs: Vec<(String, &crate::bindings::gust::gpu::tensors::Tensor)> = inputs
            .iter()
            .map(|(name, tensor)| ((*name).to_owned(), tensor.raw()))
            .collect();
        let outputs = self.0.run(&raw_inputs).map_err(ModelError::from)?;
        Ok(outputs
            .into_iter()
            .map(|(name, tensor)| (name, Tensor::from_raw(tensor)))
            .collect())
    }
}
