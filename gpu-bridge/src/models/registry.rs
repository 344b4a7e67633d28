//! The model registry: which models exist, which are resident on which
//! device, and which to evict when a device's budget runs out.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OnceCell, oneshot};
use tracing::Instrument;

use crate::account::Account;
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::models::batch::Batcher;
use crate::models::gguf::GgufMetadata;
use crate::models::llama::Llama;
use crate::models::manifest::{MANIFEST_FILE, ModelManifest};
use crate::models::runner::{self, Runner};
use crate::models::safetensors::{HostTensor, ModelData, check_formats, read_model};
use crate::models::sampling::{GenerateParams, Generation};

/// How a registry spends device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// The most bytes of resident models the registry keeps on one device.
    /// A load that needs more evicts unused models, least recently used
    /// first; `u64::MAX` (the default) never evicts (the device's own
    /// memory still limits it).
    pub memory_budget_bytes: u64,
    /// Batch concurrent calls of models whose manifest has `[batching]`;
    /// off, every call runs alone (for comparison, or to trade throughput
    /// for latency host-wide).
    pub batching: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            memory_budget_bytes: u64::MAX,
            batching: true,
        }
    }
}

/// A model the registry found: its folder and validated manifest.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// The model's folder; manifest paths are relative to it.
    pub folder: PathBuf,
    /// The parsed manifest.
    pub manifest: Arc<ModelManifest>,
}

/// Counters for tests, metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Models verified, read and uploaded (one per model and device, plus
    /// one per reload after an eviction).
    pub loads: u64,
    /// `load` calls answered with a model already resident (or loaded by a
    /// concurrent caller).
    pub hits: u64,
    /// `load` calls that failed.
    pub failures: u64,
    /// Models evicted to make room.
    pub evictions: u64,
}

/// A model whose tensors live on one device, shared read-only by every
/// user: hold the `Arc` while using it, and the registry will not evict it.
pub struct ResidentModel {
    manifest: Arc<ModelManifest>,
    folder: PathBuf,
    device: Device,
    tensors: BTreeMap<String, Tensor>,
    bytes: u64,
    pub(super) runner: Runner,
    pub(super) batcher: Option<Arc<Batcher>>,
    /// The metadata of the model's GGUF weights file, if it has one.
    gguf: Option<Arc<GgufMetadata>>,
}

impl std::fmt::Debug for ResidentModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentModel")
            .field("name", &self.manifest.name)
            .field("device", &self.device.description().name)
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl ResidentModel {
    /// The model's name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// The architecture family (`bert`, `llama`, ...).
    pub fn family(&self) -> &str {
        &self.manifest.family
    }

    /// The manifest it was loaded from.
    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// The model's folder (for its config and tokenizer files).
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// The device its tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights tensor called `name`, if there is one.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Device bytes its tensors hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The metadata of the model's GGUF weights file, if it has one.
    pub fn gguf_metadata(&self) -> Option<&GgufMetadata> {
        self.gguf.as_deref()
    }

    /// Generate text from `prompt` (llama family), charging the per-call
    /// state (KV cache, activations) and device time to `account`. Each
    /// settled piece of text is passed to `on_token` as soon as it cannot
    /// be part of a stop sequence; `Break` ends generation
    /// ([`FinishReason::Cancelled`](crate::FinishReason::Cancelled)).
    /// Concurrent calls on one model are independent.
    ///
    /// Errors: `unsupported` for other families; `invalid-argument` for bad
    /// params or a prompt longer than the context.
    pub async fn generate(
        &self,
        prompt: &str,
        params: &GenerateParams,
        account: &Arc<Account>,
        on_token: &mut (dyn FnMut(&str) -> std::ops::ControlFlow<()> + Send),
    ) -> Result<Generation> {
        let llama = self.llama()?;
        llama.generate(prompt, params, account, on_token).await
    }

    /// As [`generate`](Self::generate), from token ids instead of text (for
    /// tests and benchmarks against other implementations).
    pub async fn generate_tokens(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        account: &Arc<Account>,
        on_token: &mut (dyn FnMut(&str) -> std::ops::ControlFlow<()> + Send),
    ) -> Result<Generation> {
        let llama = self.llama()?;
        llama.generate_ids(prompt, params, account, on_token).await
    }

    /// The next-token logits after the token ids `prompt` (llama family):
    /// one forward pass, no sampling, for scoring and for comparing with
    /// other implementations.
    pub async fn next_token_logits(
        &self,
        prompt: &[u32],
        account: &Arc<Account>,
    ) -> Result<Vec<f32>> {
        let llama = self.llama()?;
        llama.next_token_logits(prompt, account).await
    }

    /// The token ids `prompt` becomes for this model (llama family).
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        self.llama()?.encode(prompt)
    }

    fn llama(&self) -> Result<&Llama> {
        match &self.runner {
            Runner::Llama(llama) => Ok(llama),
            Runner::Bert(_) | Runner::Graph(_) | Runner::Weights => {
                Err(BridgeError::unsupported(format!(
                    "model `{}` is of family `{}`, which does not generate text",
                    self.manifest.name, self.manifest.family
                )))
            }
        }
    }
}

/// One model on one device: loaded once by whoever comes first, while
/// concurrent callers wait on the same cell.
type Cell = Arc<OnceCell<Arc<ResidentModel>>>;

struct Slot {
    cell: Cell,
    /// The registry clock at the last `load`: a counter, not a time, so
    /// two loads in the same instant still have an order.
    last_used: u64,
}

impl Slot {
    /// The resident model, if loaded and if nobody outside the registry
    /// holds it or is fetching it (an `Arc` held by a caller, or the cell
    /// held by a `load` in progress).
    fn evictable(&self) -> Option<&Arc<ResidentModel>> {
        let model = self.cell.get()?;
        (Arc::strong_count(&self.cell) == 1 && Arc::strong_count(model) == 1).then_some(model)
    }
}

#[derive(Default)]
struct State {
    /// Keyed by device ordinal and model name.
    slots: HashMap<(u64, String), Slot>,
    /// Bytes per device ordinal of resident models plus loads in progress.
    committed: HashMap<u64, u64>,
    clock: u64,
    stats: RegistryStats,
}

/// The models of one directory, and those of them resident on devices.
pub struct ModelRegistry {
    dir: PathBuf,
    config: RegistryConfig,
    models: BTreeMap<String, ModelEntry>,
    problems: Vec<(PathBuf, BridgeError)>,
    account: Arc<Account>,
    state: Mutex<State>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .field("problems", &self.problems.len())
            .finish_non_exhaustive()
    }
}

impl ModelRegistry {
    /// Scan `dir` with the default config (no budget).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(dir, RegistryConfig::default())
    }

    /// Scan `dir`: every subfolder holding a `gust-model.toml` is a model.
    /// A bad manifest (or a name used twice) is kept in
    /// [`problems`](Self::problems) rather than failing the scan, so one
    /// broken folder does not take every model down. Folders without a
    /// manifest, and hidden ones (download caches), are skipped. Reads only
    /// the manifests, synchronously: call it at start-up.
    pub fn open_with(dir: impl Into<PathBuf>, config: RegistryConfig) -> Result<Self> {
        let dir = dir.into();
        let read = std::fs::read_dir(&dir).map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorCode::NotFound
            } else {
                ErrorCode::InvalidArgument
            };
            BridgeError::new(
                code,
                format!("models directory {}: cannot read: {e}", dir.display()),
            )
            .with_source(e)
        })?;
        let mut folders: Vec<PathBuf> = read
            .filter_map(|entry| entry.ok())
            .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
            .map(|entry| entry.path())
            // `is_dir` follows symlinks: a model folder may be a link.
            .filter(|path| path.is_dir())
            .collect();
        folders.sort();

        let mut models = BTreeMap::new();
        let mut problems = Vec::new();
        for folder in folders {
            let manifest_path = folder.join(MANIFEST_FILE);
            if !manifest_path.is_file() {
                continue;
            }
            match ModelManifest::load(&manifest_path) {
                Ok(manifest) => {
                    if let Some(first) = models.get(&manifest.name) {
                        let first: &ModelEntry = first;
                        let error = BridgeError::invalid(format!(
                            "{}: model name `{}` is already used by {}",
                            manifest_path.display(),
                            manifest.name,
                            first.folder.display()
                        ));
                        tracing::warn!(%error, "model skipped");
                        problems.push((folder, error));
                        continue;
                    }
                    models.insert(
                        manifest.name.clone(),
                        ModelEntry {
                            folder,
                            manifest: Arc::new(manifest),
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "model skipped");
                    problems.push((folder, error));
                }
            }
        }
        tracing::info!(
            dir = %dir.display(),
            models = models.len(),
            problems = problems.len(),
            "model registry opened"
        );
        Ok(Self {
            dir,
            config,
            models,
            problems,
            account: Account::new("models", None, None),
            state: Mutex::new(State::default()),
        })
    }

    /// The directory scanned.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The config it was opened with.
    pub fn config(&self) -> RegistryConfig {
        self.config
    }

    /// Every valid model, sorted by name.
    pub fn list(&self) -> impl ExactSizeIterator<Item = &ModelEntry> {
        self.models.values()
    }

    /// The model called `name`, if the scan found it.
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.get(name)
    }

    /// Folders whose manifest was rejected, with why.
    pub fn problems(&self) -> &[(PathBuf, BridgeError)] {
        &self.problems
    }

    /// The account every resident tensor is charged to (label `models`, no
    /// quota): its bytes are what the registry holds on all devices.
    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }

    /// Counters so far.
    pub fn stats(&self) -> RegistryStats {
        self.lock().stats
    }

    /// Bytes of models resident on `device`, and of loads in progress there.
    pub fn resident_bytes(&self, device: &Device) -> u64 {
        self.lock()
            .committed
            .get(&device.ordinal())
            .copied()
            .unwrap_or(0)
    }

    /// Names of the models resident on `device`, least recently used first
    /// (the order they would be evicted in).
    pub fn resident_models(&self, device: &Device) -> Vec<String> {
        let state = self.lock();
        let mut resident: Vec<(u64, &str)> = state
            .slots
            .iter()
            .filter(|((ordinal, _), slot)| {
                *ordinal == device.ordinal() && slot.cell.get().is_some()
            })
            .map(|((_, name), slot)| (slot.last_used, name.as_str()))
            .collect();
        resident.sort_unstable();
        resident.into_iter().map(|(_, n)| n.to_owned()).collect()
    }

    /// Every resident model, on every device, by device and then name.
    pub fn residents(&self) -> Vec<Arc<ResidentModel>> {
        let state = self.lock();
        let mut resident: Vec<(&(u64, String), Arc<ResidentModel>)> = state
            .slots
            .iter()
            .filter_map(|(key, slot)| Some((key, Arc::clone(slot.cell.get()?))))
            .collect();
        resident.sort_by(|a, b| a.0.cmp(b.0));
        resident.into_iter().map(|(_, model)| model).collect()
    }

    /// Evict every model on `device` that nobody holds; returns the bytes
    /// freed.
    pub fn evict_unused(&self, device: &Device) -> u64 {
        let evicted = {
            let mut state = self.lock();
            let ordinal = device.ordinal();
            let keys: Vec<(u64, String)> = state
                .slots
                .iter()
                .filter(|((o, _), slot)| *o == ordinal && slot.evictable().is_some())
                .map(|(key, _)| key.clone())
                .collect();
            keys.into_iter()
                .filter_map(|key| state.evict(&key))
                .collect::<Vec<_>>()
        };
        // Freed here, outside the lock.
        evicted.iter().map(|m| m.bytes).sum()
    }

    /// The model called `name`, resident on `device`: loaded on first use
    /// (files verified against their sha256, weights uploaded), shared
    /// afterwards. Concurrent first loads of one model load it once.
    ///
    /// Errors: `not-found` for an unknown model (listing those there are) or
    /// a missing file; `invalid-argument` for a checksum mismatch or a
    /// malformed weights file; `unsupported` for a weights format or tensor
    /// type the bridge lacks; `out-of-memory` when the model does not fit
    /// the budget even after evicting every unused model.
    pub async fn load(&self, name: &str, device: &Device) -> Result<Arc<ResidentModel>> {
        let entry = self.models.get(name).ok_or_else(|| self.unknown(name))?;
        let key = (device.ordinal(), name.to_owned());
        let cell = {
            let mut state = self.lock();
            state.clock += 1;
            let now = state.clock;
            let slot = state.slots.entry(key.clone()).or_insert_with(|| Slot {
                cell: Arc::default(),
                last_used: now,
            });
            slot.last_used = now;
            // Cloned under the lock, so eviction (also under it) sees the
            // new user.
            if let Some(model) = slot.cell.get() {
                let model = Arc::clone(model);
                state.stats.hits += 1;
                return Ok(model);
            }
            Arc::clone(&slot.cell)
        };

        let mut loaded_here = false;
        let result = cell
            .get_or_try_init(|| {
                loaded_here = true;
                // Only the first caller loads; the span (and the device
                // name it formats, only when debug is on) is theirs.
                self.load_fresh(entry, device)
                    .instrument(tracing::debug_span!(
                        "model_load",
                        model = name,
                        device = %device.description().name,
                        backend = device.kind().as_str()
                    ))
            })
            .await
            .map(Arc::clone);

        let mut state = self.lock();
        match &result {
            Ok(model) => {
                if loaded_here {
                    state.stats.loads += 1;
                    tracing::info!(
                        model = name,
                        device = %device.description().name,
                        bytes = model.bytes,
                        tensors = model.tensors.len(),
                        "model loaded"
                    );
                } else {
                    state.stats.hits += 1;
                }
            }
            Err(error) => {
                state.stats.failures += 1;
                // Leave no empty slot behind unless another caller is
                // still trying.
                if let Some(slot) = state.slots.get(&key)
                    && slot.cell.get().is_none()
                    && Arc::ptr_eq(&slot.cell, &cell)
                    && Arc::strong_count(&cell) == 2
                {
                    state.slots.remove(&key);
                }
                tracing::warn!(model = name, %error, "model load failed");
            }
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unknown(&self, name: &str) -> BridgeError {
        let available: Vec<&str> = self.models.keys().map(String::as_str).collect();
        let available = if available.is_empty() {
            "none".to_owned()
        } else {
            available.join(", ")
        };
        BridgeError::new(
            ErrorCode::NotFound,
            format!(
                "no model `{name}` in {} (available: {available})",
                self.dir.display()
            ),
        )
    }

    /// Verify, read and upload one model; run by the first caller only.
    async fn load_fresh(&self, entry: &ModelEntry, device: &Device) -> Result<Arc<ResidentModel>> {
        let manifest = &entry.manifest;
        check_formats(manifest)?;

        // Hashing and reading block on disk for a while (seconds for a
        // large model): a thread of its own keeps the executor free.
        let (reply, answer) = oneshot::channel();
        let folder = entry.folder.clone();
        let read_manifest = Arc::clone(manifest);
        // Quantized weights stay quantized for the llama family on a device
        // that multiplies them as they are; other families' graphs compute
        // in f32.
        let kernels = if manifest.family == "llama" {
            device.description().arithmetic_dtypes.clone()
        } else {
            Vec::new()
        };
        let linear_weights = runner::linear_weights(manifest, device.description());
        std::thread::Builder::new()
            .name(format!("gust-model-{}", manifest.name))
            .spawn(move || {
                let read = read_model(&folder, &read_manifest).and_then(|mut data| {
                    for tensor in data.tensors.values_mut() {
                        if tensor.dtype.is_quantized() && !kernels.contains(&tensor.dtype) {
                            let host = std::mem::replace(
                                tensor,
                                HostTensor {
                                    dtype: DType::F32,
                                    shape: Vec::new(),
                                    data: Vec::new(),
                                },
                            );
                            *tensor = host.dequantized();
                        }
                    }
                    let prepared = runner::prepare(
                        &folder,
                        &read_manifest,
                        &mut data.tensors,
                        linear_weights,
                    )?;
                    Ok((data, prepared))
                });
                let _ = reply.send(read);
            })
            .map_err(|e| {
                BridgeError::backend(format!("cannot start a model reader thread: {e}"))
            })?;
        let (
            ModelData {
                tensors: host_tensors,
                gguf,
            },
            prepared,
        ) = answer.await.map_err(|_| {
            BridgeError::backend(format!(
                "model `{}`: the reader thread stopped without an answer",
                manifest.name
            ))
        })??;

        let bytes: u64 = host_tensors.values().map(|t| t.data.len() as u64).sum();
        let reservation = self.reserve(manifest, device, bytes)?;
        let mut tensors = BTreeMap::new();
        for (name, HostTensor { dtype, shape, data }) in host_tensors {
            let tensor = device
                .upload(dtype, &shape, data, &self.account)
                .await
                .map_err(|e| {
                    BridgeError::new(
                        e.code,
                        format!(
                            "model `{}`: uploading tensor `{name}` to {}: {}",
                            manifest.name,
                            device.description().name,
                            e.message
                        ),
                    )
                })?;
            tensors.insert(name, tensor);
        }
        // Uploads are queued; wait for them so the model is on the device
        // (and the host copies are freed) when `load` returns.
        device.synchronize(&self.account).await.map_err(|e| {
            BridgeError::new(
                e.code,
                format!("model `{}`: uploading: {}", manifest.name, e.message),
            )
        })?;
        let runner = prepared
            .finish(manifest, &tensors, gguf.as_ref(), device, &self.account)
            .await?;
        let batcher = manifest
            .batching
            .filter(|_| self.config.batching)
            .map(|config| Arc::new(Batcher::new(config, &manifest.name)));
        // No await from here on: the caller's cell is set in the same poll,
        // so the bytes are never counted without a model to evict.
        reservation.keep();
        Ok(Arc::new(ResidentModel {
            manifest: Arc::clone(manifest),
            folder: entry.folder.clone(),
            device: device.clone(),
            tensors,
            bytes,
            runner,
            batcher,
            gguf: gguf.map(Arc::new),
        }))
    }

    /// Count `bytes` against `device`'s budget, evicting unused models
    /// (least recently used first) if they must make room; evicts nothing
    /// when even that would not be enough.
    fn reserve(
        &self,
        manifest: &ModelManifest,
        device: &Device,
        bytes: u64,
    ) -> Result<Reservation<'_>> {
        let budget = self.config.memory_budget_bytes;
        let ordinal = device.ordinal();
        if bytes > budget {
            return Err(self.out_of_memory(
                manifest,
                device,
                bytes,
                "the model is larger than the whole budget",
            ));
        }
        let evicted = {
            let mut state = self.lock();
            let committed = state.committed.get(&ordinal).copied().unwrap_or(0);
            let mut evicted = Vec::new();
            if committed.saturating_add(bytes) > budget {
                let mut candidates: Vec<(u64, (u64, String), u64)> = state
                    .slots
                    .iter()
                    .filter(|((o, _), _)| *o == ordinal)
                    .filter_map(|(key, slot)| {
                        let model = slot.evictable()?;
                        Some((slot.last_used, key.clone(), model.bytes))
                    })
                    .collect();
                let freeable: u64 = candidates.iter().map(|c| c.2).sum();
                if (committed - freeable).saturating_add(bytes) > budget {
                    let mut held: Vec<&str> = state
                        .slots
                        .iter()
                        .filter(|((o, name), slot)| {
                            *o == ordinal && *name != manifest.name && slot.evictable().is_none()
                        })
                        .map(|((_, name), _)| name.as_str())
                        .collect();
                    held.sort_unstable();
                    let why = format!(
                        "{} bytes are held by models in use or loading ({})",
                        committed - freeable,
                        if held.is_empty() {
                            "none".to_owned()
                        } else {
                            held.join(", ")
                        }
                    );
                    drop(state);
                    return Err(self.out_of_memory(manifest, device, bytes, &why));
                }
                candidates.sort_unstable();
                for (_, key, _) in candidates {
                    let now = state.committed.get(&ordinal).copied().unwrap_or(0);
                    if now.saturating_add(bytes) <= budget {
                        break;
                    }
                    if let Some(model) = state.evict(&key) {
                        tracing::info!(
                            model = %model.manifest.name,
                            bytes = model.bytes,
                            for_model = %manifest.name,
                            "model evicted"
                        );
                        evicted.push(model);
                    }
                }
            }
            *state.committed.entry(ordinal).or_insert(0) += bytes;
            evicted
        };
        // The evicted models' tensors are freed here, outside the lock.
        drop(evicted);
        Ok(Reservation {
            registry: self,
            ordinal,
            bytes,
            kept: false,
        })
    }

    fn out_of_memory(
        &self,
        manifest: &ModelManifest,
        device: &Device,
        bytes: u64,
        why: &str,
    ) -> BridgeError {
        BridgeError::new(
            ErrorCode::OutOfMemory,
            format!(
                "model `{}` needs {bytes} bytes on {}, which the registry's budget of {} bytes \
                 cannot hold: {why}",
                manifest.name,
                device.description().name,
                self.config.memory_budget_bytes
            ),
        )
    }
}

impl State {
    /// Remove the model at `key` if it is evictable, returning it so the
    /// caller can drop it after releasing the lock.
    fn evict(&mut self, key: &(u64, String)) -> Option<Arc<ResidentModel>> {
        let model = Arc::clone(self.slots.get(key)?.evictable()?);
        self.slots.remove(key);
        if let Some(committed) = self.committed.get_mut(&key.0) {
            *committed = committed.saturating_sub(model.bytes);
        }
        self.stats.evictions += 1;
        Some(model)
    }
}

/// Budget bytes counted for a load in progress: returned if the load fails
/// or is cancelled, kept by the resident model once it succeeds.
struct Reservation<'a> {
    registry: &'a ModelRegistry,
    ordinal: u64,
    bytes: u64,
    kept: bool,
}

impl Reservation<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            let mut state = self.registry.lock();
            if let Some(committed) = state.committed.get_mut(&self.ordinal) {
                *committed = committed.saturating_sub(self.bytes);
            }
        }
    }
}
