//! The reference the llama family is tested and benchmarked against:
//! candle-transformers' quantized llama over the same GGUF file, either as
//! shipped or with every tensor dequantized to f32.
//!
//! Shared by `tests/all/llama.rs` and `benches/llama.rs` through `#[path]`.

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_transformers::models::quantized_llama::ModelWeights;

/// candle's quantized llama over the GGUF `bytes`, on the CPU.
pub(crate) fn candle_model(gguf: &[u8]) -> ModelWeights {
    let mut reader = std::io::Cursor::new(gguf);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    ModelWeights::from_gguf(content, &mut reader, &candle_core::Device::Cpu).unwrap()
}

/// The GGUF `bytes` with every tensor dequantized to F32: candle's
/// quantized llama then multiplies in f32 as the bridge does (its quantized
/// matmul rounds the activations to 8 bits), so the two must agree to
/// rounding.
pub(crate) fn dequantized(gguf: &[u8]) -> Vec<u8> {
    let cpu = candle_core::Device::Cpu;
    let mut reader = std::io::Cursor::new(gguf);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(&str, QTensor)> = names
        .iter()
        .map(|name| {
            let q = content.tensor(&mut reader, name, &cpu).unwrap();
            let f = QTensor::quantize(&q.dequantize(&cpu).unwrap(), GgmlDType::F32).unwrap();
            (name.as_str(), f)
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}
