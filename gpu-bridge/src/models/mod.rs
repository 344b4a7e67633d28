//! Resident models: weights checked once, uploaded once, shared read-only.
//!
//! A models directory holds one folder per model, each with a
//! [`gust-model.toml`](manifest) listing its files and their sha256. A
//! [`ModelRegistry`] scans the directory, and on a model's first use on a
//! device verifies its files, reads its safetensors or GGUF weights and uploads
//! every tensor, charged to the registry's own [`Account`](crate::Account).
//! Later users of the same model on the same device share that
//! [`ResidentModel`]; models nobody holds are evicted, least recently used
//! first, when a load needs room in the per-device budget.

mod batch;
mod bert;
pub mod gguf;
mod graph;
mod llama;
pub mod manifest;
pub mod registry;
mod runner;
mod safetensors;
#[doc(hidden)]
pub mod testing;

pub use batch::BatchStats;
mod sampling;

/// Entry points for the fuzz targets in `fuzz/`: the readers of untrusted
/// model files, whole. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Parses `bytes` as a GGUF file (header, metadata, tensor infos, and
    /// the dequantisation of every tensor it lists).
    pub fn gguf(bytes: &[u8]) {
        let _ = super::gguf::parse(bytes);
    }

    /// Reads `bytes` as a safetensors file.
    pub fn safetensors(bytes: &[u8]) {
        let _ = super::safetensors::read_safetensors(&mut &bytes[..], bytes.len() as u64);
    }
}

pub use gguf::{GgufMetadata, GgufValue};
pub use manifest::{
    Batching, FileFormat, FileRole, GraphSpec, GraphStep, MANIFEST_FILE, ModelDType, ModelFile,
    ModelManifest,
};
pub use registry::{ModelEntry, ModelRegistry, RegistryConfig, RegistryStats, ResidentModel};
pub use sampling::{FinishReason, GenerateParams, Generation, MAX_GENERATE_TOKENS};
