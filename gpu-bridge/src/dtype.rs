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
}

impl DType {
    /// Every dtype, for tests and error messages.
    pub const ALL: [DType; 5] = [Self::F32, Self::F16, Self::BF16, Self::I32, Self::U32];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
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
