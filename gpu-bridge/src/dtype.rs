//! Element types and the conversions between their byte forms.

use std::fmt;

use crate::error::{BridgeError, Result};

/// A tensor's element type; mirrors the WIT `dtype` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float: every op on every backend.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer (indices).
    I32,
    /// Unsigned 32-bit integer (indices, `argmax` results).
    U32,
    /// ggml's Q4_0: blocks of 32 four-bit values `(q − 8) · d` with an f16
    /// scale `d` (18 bytes). Quantized dtypes hold a weight matrix's rows
    /// (the last dimension is whole blocks) and take only `linear`,
    /// `gather` and a `cast` to f32 (the bridge's `quant` module).
    Q4_0,
    /// ggml's Q4_1: blocks of 32 four-bit values `q · d + m` (20 bytes).
    Q4_1,
    /// ggml's Q8_0: blocks of 32 signed bytes times an f16 scale (34 bytes).
    Q8_0,
    /// ggml's Q4_K: super-blocks of 256 four-bit values in 8 sub-blocks
    /// with 6-bit scales and mins (144 bytes).
    Q4K,
    /// ggml's Q6_K: super-blocks of 256 six-bit values in 16 sub-blocks
    /// with 8-bit scales (210 bytes).
    Q6K,
}

impl DType {
    /// Every dtype of single elements, for tests and error messages.
    pub const ALL: [DType; 5] = [Self::F32, Self::F16, Self::BF16, Self::I32, Self::U32];

    /// Every quantized (block) dtype.
    pub const QUANTIZED: [DType; 5] = [Self::Q4_0, Self::Q4_1, Self::Q8_0, Self::Q4K, Self::Q6K];

    /// Bytes per element; for a quantized dtype, bytes per block (see
    /// [`block`](Self::block)).
    pub fn size(self) -> usize {
        self.block().1
    }

    /// Elements per block and bytes per block: `(1, size)` for the plain
    /// dtypes.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 | Self::I32 | Self::U32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
        }
    }

    /// True for ggml's block formats.
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Bytes of a tensor of this dtype and `shape`: a quantized tensor's
    /// last dimension must be whole blocks.
    pub fn bytes_for(self, shape: &[usize]) -> Result<usize> {
        let elements = crate::op::element_count(shape)?;
        let (per_block, block_bytes) = self.block();
        if per_block > 1 && !shape.last().is_some_and(|d| d.is_multiple_of(per_block)) {
            return Err(BridgeError::shape(format!(
                "a {self} tensor's last dimension is whole blocks of {per_block} values; \
                 {shape:?} is not"
            )));
        }
        Ok(elements / per_block * block_bytes)
    }

    /// True for the float types, which arithmetic ops accept.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// True for the integer types, which `gather` accepts as indices.
    pub fn is_int(self) -> bool {
        matches!(self, Self::I32 | Self::U32)
    }

    /// The WIT spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::I32 => "i32",
            Self::U32 => "u32",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decode little-endian bytes of `dtype` into `f64` values (integers exactly,
/// floats widened), for reading results back as numbers.
pub fn bytes_to_f64(dtype: DType, bytes: &[u8]) -> Result<Vec<f64>> {
    if let Some(kind) = crate::quant::GgmlType::of(dtype) {
        let (per_block, block_bytes) = dtype.block();
        if !bytes.len().is_multiple_of(block_bytes) {
            return Err(BridgeError::invalid(format!(
                "{} bytes is not a whole number of {dtype} blocks",
                bytes.len()
            )));
        }
        let mut values = vec![0f32; bytes.len() / block_bytes * per_block];
        crate::quant::dequantize_into(kind, bytes, &mut values);
        return Ok(values.into_iter().map(f64::from).collect());
    }
    if !bytes.len().is_multiple_of(dtype.size()) {
        return Err(BridgeError::invalid(format!(
            "{} bytes is not a whole number of {dtype} elements",
            bytes.len()
        )));
    }
    let values = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::I32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::U32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K => Vec::new(),
    };
    Ok(values)
}

/// Encode `f32` values as little-endian bytes.
pub fn f32_to_bytes(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// Encode `i32` values as little-endian bytes.
pub fn i32_to_bytes(values: &[i32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}
