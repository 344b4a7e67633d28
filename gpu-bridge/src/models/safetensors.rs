//! Checking a model's files and reading safetensors (and GGUF) weights, in
//! one pass.
//!
//! Each file is read once, front to back: its bytes feed the sha256 and, for
//! weights, land directly in one buffer per tensor. Nothing is read twice
//! (no window for the file to change between the check and the read), and
//! memory peaks at the model's size, not twice it. These functions block on
//! disk I/O: the registry runs them on a thread of their own.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::dtype::DType;
use crate::error::{BridgeError, ErrorCode, Result};
use crate::models::gguf::{self, GgufError, GgufMetadata};
use crate::models::manifest::{FileFormat, FileRole, ModelFile, ModelManifest};

/// safetensors refuses headers larger than this (the crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor read from disk, ready to upload.
#[derive(Debug)]
pub(crate) struct HostTensor {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<u8>,
}

impl HostTensor {
    /// The same values in f32 if the tensor is quantized, for a device
    /// without quantized kernels (8 times the bytes of Q4_0).
    pub(crate) fn dequantized(self) -> Self {
        match crate::quant::GgmlType::of(self.dtype) {
            None => self,
            Some(kind) => Self {
                data: gguf::dequantize(kind, &self.data),
                dtype: DType::F32,
                ..self
            },
        }
    }
}

/// A reader that hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or(&[]));
        Ok(n)
    }
}

/// Refuse weights the registry cannot read yet, before any file is read.
pub(crate) fn check_formats(manifest: &ModelManifest) -> Result<()> {
    for file in manifest.weights() {
        match file.effective_format() {
            // No format and an unknown extension: safetensors is the
            // default, so try it (its header check fails clearly if it is
            // something else).
            Some(FileFormat::Safetensors | FileFormat::Gguf) | None => {}
            Some(other) => {
                return Err(BridgeError::unsupported(format!(
                    "model `{}`: {}: weights in {other} format are not supported \
                     (use safetensors or gguf)",
                    manifest.name,
                    file.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// What a model's files hold: its weights, and the metadata of its GGUF
/// file if it has one (hyperparameters and tokenizer for its family).
#[derive(Debug)]
pub(crate) struct ModelData {
    pub(crate) tensors: BTreeMap<String, HostTensor>,
    pub(crate) gguf: Option<GgufMetadata>,
}

/// Verify every file of `manifest` in `folder` against its sha256 and read
/// all weights tensors, keyed by name. Blocks on disk I/O.
pub(crate) fn read_model(folder: &Path, manifest: &ModelManifest) -> Result<ModelData> {
    check_formats(manifest)?;
    let mut tensors = BTreeMap::new();
    let mut gguf = None;
    for file in &manifest.files {
        let full = folder.join(&file.path);
        let opened = File::open(&full).map_err(|e| {
            let code = if e.kind() == io::ErrorKind::NotFound {
                ErrorCode::NotFound
            } else {
                ErrorCode::InvalidArgument
            };
            BridgeError::new(
                code,
                format!(
                    "model `{}`: file {} ({}) cannot be opened: {e}",
                    manifest.name,
                    file.path.display(),
                    full.display()
                ),
            )
            .with_source(e)
        })?;
        let io_error = |e: io::Error| {
            BridgeError::invalid(format!(
                "model `{}`: reading {}: {e}",
                manifest.name,
                full.display()
            ))
            .with_source(e)
        };
        let size = opened.metadata().map_err(io_error)?.len();
        let mut reader = Hashing {
            inner: io::BufReader::with_capacity(1 << 20, opened),
            hasher: Sha256::new(),
        };
        // The content's verdict waits for the hash: a corrupt file is
        // reported as a checksum mismatch, not as whatever parse error its
        // corruption happens to cause.
        let is_gguf = file.effective_format() == Some(FileFormat::Gguf);
        let mut gguf_bytes = None;
        let content = if file.role == FileRole::Weights && is_gguf {
            // GGUF puts the tensor infos after arrays of metadata and its
            // blocks are expanded on load, so it is hashed whole and parsed
            // from memory once the hash is known to match.
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            reader.read_to_end(&mut bytes).map_err(io_error)?;
            gguf_bytes = Some(bytes);
            Ok(Vec::new())
        } else if file.role == FileRole::Weights {
            read_safetensors(&mut reader, size).map_err(|e| match e {
                ReadFailure::Io(e) => io_error(e),
                ReadFailure::Format(why) => BridgeError::invalid(format!(
                    "model `{}`: {} is not a valid safetensors file: {why}",
                    manifest.name,
                    file.path.display()
                )),
            })
        } else {
            Ok(Vec::new())
        };
        io::copy(&mut reader, &mut io::sink()).map_err(io_error)?;
        check_sha256(manifest, file, reader.hasher.finalize().as_slice())?;
        let content = match gguf_bytes {
            Some(bytes) => read_gguf(manifest, file, &bytes, &mut gguf)?,
            None => content?,
        };
        for (name, tensor) in content {
            let tensor = tensor.map_err(|why| {
                BridgeError::unsupported(format!(
                    "model `{}`: tensor `{name}` in {}: {why}",
                    manifest.name,
                    file.path.display()
                ))
            })?;
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(BridgeError::invalid(format!(
                    "model `{}`: tensor `{name}` appears in more than one weights file \
                     (again in {})",
                    manifest.name,
                    file.path.display()
                )));
            }
        }
    }
    Ok(ModelData { tensors, gguf })
}

/// Parse a GGUF file's bytes into f32 tensors, keeping its metadata in
/// `metadata` (one GGUF file per model: its metadata describes the model).
fn read_gguf(
    manifest: &ModelManifest,
    file: &ModelFile,
    bytes: &[u8],
    metadata: &mut Option<GgufMetadata>,
) -> Result<Tensors> {
    let content = gguf::parse(bytes).map_err(|e| match e {
        GgufError::Format(why) => BridgeError::invalid(format!(
            "model `{}`: {} is not a valid GGUF file: {why}",
            manifest.name,
            file.path.display()
        )),
        GgufError::Unsupported(why) => BridgeError::unsupported(format!(
            "model `{}`: {}: {why}",
            manifest.name,
            file.path.display()
        )),
    })?;
    if metadata.replace(content.metadata).is_some() {
        return Err(BridgeError::invalid(format!(
            "model `{}`: more than one GGUF weights file (again {})",
            manifest.name,
            file.path.display()
        )));
    }
    Ok(content
        .tensors
        .into_iter()
        .map(|t| {
            let tensor = HostTensor {
                dtype: t.dtype,
                shape: t.shape,
                data: t.data,
            };
            (t.name, Ok(tensor))
        })
        .collect())
}

fn check_sha256(manifest: &ModelManifest, file: &ModelFile, actual: &[u8]) -> Result<()> {
    let actual = hex::encode(actual);
    if actual == file.sha256 {
        Ok(())
    } else {
        Err(BridgeError::invalid(format!(
            "model `{}`: file {} has sha256 {actual}, but the manifest says {}",
            manifest.name,
            file.path.display(),
            file.sha256
        )))
    }
}

/// Why a weights file could not be read: its I/O failed or its content is
/// not valid safetensors.
pub(super) enum ReadFailure {
    Io(io::Error),
    Format(String),
}

impl From<io::Error> for ReadFailure {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Each tensor, or why its dtype cannot be loaded.
pub(super) type Tensors = Vec<(String, std::result::Result<HostTensor, String>)>;

/// Read a safetensors file of `size` bytes: the header, then each tensor in
/// data order, straight into its own buffer.
pub(super) fn read_safetensors(
    reader: &mut impl Read,
    size: u64,
) -> std::result::Result<Tensors, ReadFailure> {
    let mut len = [0u8; 8];
    reader.read_exact(&mut len)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || header_len.saturating_add(8) > size {
        return Err(ReadFailure::Format(format!(
            "header length {header_len} does not fit a {size}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header)?;
    // safetensors' `Metadata` deserializer also validates the layout:
    // tensors contiguous, each exactly as long as its dtype and shape say.
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| ReadFailure::Format(e.to_string()))?;
    let data_len = metadata.data_len() as u64;
    if 8 + header_len + data_len != size {
        return Err(ReadFailure::Format(format!(
            "the header describes {data_len} bytes of data, the file holds {}",
            size - 8 - header_len
        )));
    }
    let mut tensors = Vec::new();
    for name in metadata.offset_keys() {
        let Some(info) = metadata.info(&name) else {
            continue;
        };
        let (start, end) = info.data_offsets;
        let bytes = (end - start) as u64;
        let tensor = match bridge_dtype(info.dtype) {
            Some(dtype) => {
                let mut data = vec![0u8; bytes as usize];
                reader.read_exact(&mut data)?;
                Ok(HostTensor {
                    dtype,
                    shape: info.shape.clone(),
                    data,
                })
            }
            None if info.dtype == safetensors::Dtype::I64 => {
                let mut data = vec![0u8; bytes as usize];
                reader.read_exact(&mut data)?;
                narrow_i64(&data).map(|data| HostTensor {
                    dtype: DType::I32,
                    shape: info.shape.clone(),
                    data,
                })
            }
            None => {
                // Still read through it: the hash needs every byte.
                io::copy(&mut reader.by_ref().take(bytes), &mut io::sink())?;
                Err(format!(
                    "dtype {:?} is not supported (the bridge holds f32, f16, bf16, i32 and u32; \
                     i64 is narrowed to i32 when every value fits)",
                    info.dtype
                ))
            }
        };
        tensors.push((name, tensor));
    }
    Ok(tensors)
}

/// PyTorch saves index tensors (BERT's `position_ids`, `token_type_ids`)
/// as int64, which the bridge lacks; their values are small, so they load
/// as i32, and a value that does not fit refuses the tensor instead of
/// wrapping.
fn narrow_i64(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(data.len() / 2);
    for chunk in data.chunks_exact(8) {
        let mut le = [0u8; 8];
        le.copy_from_slice(chunk);
        let value = i64::from_le_bytes(le);
        let narrow = i32::try_from(value).map_err(|_| {
            format!("dtype I64 holds {value}, which does not fit the i32 it would load as")
        })?;
        out.extend_from_slice(&narrow.to_le_bytes());
    }
    Ok(out)
}

fn bridge_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::I32 => Some(DType::I32),
        safetensors::Dtype::U32 => Some(DType::U32),
        _ => None,
    }
}
