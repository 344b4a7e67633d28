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

/// Runs `f` (CPU work whose size a guest chooses, such as tokenising its
/// text) on tokio's blocking pool when called inside a runtime, so that it
/// never holds an async worker thread; inline otherwise. A panic in `f`
/// fails this call only, as on the device ([`crate::error`]).
pub(crate) async fn off_async<T: Send + 'static>(
    step: &'static str,
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> crate::Result<T> {
    let contained = move || crate::error::contain(step, f);
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime.spawn_blocking(contained).await.unwrap_or_else(|e| {
            Err(crate::BridgeError::backend(format!(
                "{step} did not finish: {e}"
            )))
        }),
        Err(_) => contained(),
    }
}

pub use gguf::{GgufMetadata, GgufValue};
pub use manifest::{
    Batching, FileFormat, FileRole, GraphSpec, GraphStep, MANIFEST_FILE, ModelDType, ModelFile,
    ModelManifest,
};
pub use registry::{ModelEntry, ModelRegistry, RegistryConfig, RegistryStats, ResidentModel};
pub use sampling::{FinishReason, GenerateParams, Generation, MAX_GENERATE_TOKENS};

#[cfg(test)]
mod tests {
    use super::off_async;
    use crate::ErrorCode;

    /// Inside a runtime the work runs on another thread (the blocking
    /// pool), even on a current-thread runtime, whose one thread would
    /// otherwise stall every other task for as long as it takes.
    #[test]
    fn off_async_work_leaves_the_runtime_thread_free() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let caller = std::thread::current().id();
        let ran_on = runtime
            .block_on(off_async("tokenize", || Ok(std::thread::current().id())))
            .unwrap();
        assert_ne!(ran_on, caller);
        // Outside a runtime there is nothing to keep free.
        let inline = pollster::block_on(off_async("tokenize", || Ok(std::thread::current().id())));
        assert_eq!(inline.unwrap(), caller);
    }

    #[test]
    fn a_panic_in_off_async_work_fails_that_call() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = runtime
            .block_on(off_async::<()>("tokenize", || panic!("bad text")))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(err.message.contains("bad text"), "{err}");
    }
}
