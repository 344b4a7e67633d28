//! GGUF (versions 2 and 3): metadata, tensor infos, and the weights.
//!
//! Weights in a format the bridge has kernels for (Q4_0, Q4_1, Q8_0, Q4_K,
//! Q6_K: see the `quant` module) stay in their blocks, as the bridge's
//! quantized dtypes; the others (F16, BF16, Q5_0, Q5_1) are expanded to f32
//! once, when the model is read, rather than per call. A device without
//! quantized kernels gets f32 instead (`HostTensor::dequantized`). Every length and count read
//! from the file is checked against the bytes that remain before anything
//! is allocated for it: a malformed file gives an `invalid-argument` error,
//! never a panic or a huge allocation.

use std::collections::BTreeMap;

use crate::dtype::DType;
use crate::kernel::{MAX_ELEMENTS, MAX_RANK};
use crate::quant::{self, GgmlType};

/// "GGUF" read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;

/// The alignment of tensor data when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

/// The most metadata values (array elements included) one file may hold.
/// A value takes 32 bytes in memory and as little as one in the file, so
/// without a cap a hostile file could ask for 32 times its size; real
/// files hold well under a million (a 256k-token vocabulary and its
/// merges).
const MAX_VALUES: usize = 1 << 24;

/// Arrays nest in GGUF; nobody nests deeper than this, and a bound keeps a
/// hostile file from recursing the reader's stack away.
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string` (UTF-8).
    String(String),
    /// `array` of values of one type.
    Array(Vec<GgufValue>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of
    /// any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(u64::from(v)),
            Self::U16(v) => Some(u64::from(v)),
            Self::U32(v) => Some(u64::from(v)),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(f64::from(v)),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The metadata key/values of a GGUF file, kept with a resident model for
/// its family (hyperparameters, tokenizer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufMetadata {
    /// The file's GGUF version (2 or 3).
    pub version: u32,
    /// Every key/value, by key.
    pub values: BTreeMap<String, GgufValue>,
}

impl GgufMetadata {
    /// The value at `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.values.get(key)
    }
}

/// A ggml type id's name, for errors about types this reader lacks.
fn type_name(id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        13 => "Q5_K",
        15 => "Q8_K",
        16..=23 => "an IQ type",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        _ => return format!("type {id}"),
    };
    format!("{name} (type {id})")
}

/// One tensor as the file describes it.
#[derive(Debug, Clone)]
struct TensorInfo {
    name: String,
    /// Row-major shape (GGUF lists dimensions fastest-first; reversed here).
    shape: Vec<usize>,
    kind: GgmlType,
    /// From the start of the data section.
    offset: u64,
    bytes: u64,
}

/// A tensor ready to upload: f32, or a quantized dtype's blocks.
#[derive(Debug)]
pub(crate) struct GgufTensor {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<u8>,
}

/// A GGUF file read whole: its metadata and every tensor.
#[derive(Debug)]
pub(crate) struct GgufContent {
    pub(crate) metadata: GgufMetadata,
    pub(crate) tensors: Vec<GgufTensor>,
}

/// Bounds-checked little-endian reads over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Metadata values read so far, against [`MAX_VALUES`].
    values: usize,
}

type Parse<T> = std::result::Result<T, String>;

/// Why a GGUF file could not be read.
#[derive(Debug)]
pub(crate) enum GgufError {
    /// The file is malformed.
    Format(String),
    /// The file is well formed but holds a tensor type this reader lacks.
    Unsupported(String),
}

impl From<String> for GgufError {
    fn from(why: String) -> Self {
        Self::Format(why)
    }
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Parse<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "{what} needs {n} bytes at offset {}, but the file ends {} bytes later",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must leave at least `min_each` bytes per item in the
    /// rest of the file: checked before anything is allocated for it.
    fn count(&mut self, min_each: usize, what: &str) -> Parse<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.saturating_mul(min_each.max(1)) <= self.remaining());
        fits.ok_or_else(|| {
            format!(
                "{what} is {n}, more than the {} bytes left in the file can hold",
                self.remaining()
            )
        })
    }

    fn string(&mut self, what: &str) -> Parse<String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: usize, key: &str) -> Parse<GgufValue> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(format!(
                "metadata `{key}`: more than {MAX_VALUES} metadata values in the file"
            ));
        }
        Ok(match kind {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                other => return Err(format!("metadata `{key}`: bool byte {other}")),
            },
            8 => GgufValue::String(self.string(&format!("metadata `{key}`"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("metadata `{key}`: arrays nested too deeply"));
                }
                let elem = self.u32(key)?;
                let min_each = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    // Strings and arrays carry at least an 8-byte length.
                    8..=12 => 8,
                    other => {
                        return Err(format!("metadata `{key}`: unknown value type {other}"));
                    }
                };
                let n = self.count(min_each, &format!("metadata `{key}`: array length"))?;
                if n > MAX_VALUES - self.values {
                    return Err(format!(
                        "metadata `{key}`: an array of {n} values is more than the \
                         {MAX_VALUES} metadata values a file may hold"
                    ));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("metadata `{key}`: unknown value type {other}")),
        })
    }
}

/// Parse a whole GGUF file: quantized tensors the bridge has kernels for
/// stay quantized, the rest become f32. The error is
/// a sentence about what is wrong with the file.
pub(crate) fn parse(bytes: &[u8]) -> std::result::Result<GgufContent, GgufError> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        values: 0,
    };
    let magic = c.u32("the magic number")?;
    if magic != MAGIC {
        return Err(format!(
            "it starts with {:02x?}, not the GGUF magic",
            magic.to_le_bytes()
        )
        .into());
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Unsupported(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        )));
    }
    // A tensor info is at least a name length, a rank, a type and an offset.
    let tensor_count = c.count(8 + 4 + 4 + 8, "the tensor count")?;
    let kv_count = c.count(8 + 4 + 1, "the metadata count")?;
    let mut values = BTreeMap::new();
    for _ in 0..kv_count {
        let key = c.string("a metadata key")?;
        let kind = c.u32(&key)?;
        let value = c.value(kind, 0, &key)?;
        if values.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice").into());
        }
    }
    let alignment = match values.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| format!("general.alignment {v:?} is not a power of two"))?,
    };

    let mut infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        infos.push(tensor_info(&mut c)?);
    }
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    let data_len = (bytes.len() as u64)
        .checked_sub(data_start)
        .ok_or_else(|| {
            format!(
                "the tensor data should start at offset {data_start}, past the end of the \
             {}-byte file",
                bytes.len()
            )
        })?;
    let mut names = std::collections::BTreeSet::new();
    let mut tensors = Vec::with_capacity(infos.len());
    for info in infos {
        if !names.insert(info.name.clone()) {
            return Err(format!("tensor `{}` appears twice", info.name).into());
        }
        if !info.offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor `{}`: offset {} is not a multiple of the alignment {alignment}",
                info.name, info.offset
            )
            .into());
        }
        let end = info.offset.checked_add(info.bytes);
        if end.is_none_or(|end| end > data_len) {
            return Err(format!(
                "tensor `{}`: {} bytes at offset {} run past the {data_len} bytes of tensor data",
                info.name, info.bytes, info.offset
            )
            .into());
        }
        // Both fit in the file, hence in usize.
        let start = (data_start + info.offset) as usize;
        let raw = &bytes[start..start + info.bytes as usize];
        let (dtype, data) = match info.kind.quantized_dtype() {
            Some(dtype) => (dtype, raw.to_vec()),
            None => (DType::F32, dequantize(info.kind, raw)),
        };
        tensors.push(GgufTensor {
            name: info.name,
            dtype,
            shape: info.shape,
            data,
        });
    }
    Ok(GgufContent {
        metadata: GgufMetadata { version, values },
        tensors,
    })
}

fn tensor_info(c: &mut Cursor<'_>) -> std::result::Result<TensorInfo, GgufError> {
    let name = c.string("a tensor name")?;
    let rank = c.u32(&name)? as usize;
    if rank == 0 || rank > MAX_RANK {
        return Err(
            format!("tensor `{name}`: rank {rank} (the bridge takes 1 to {MAX_RANK})").into(),
        );
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        dims.push(c.u64(&name)?);
    }
    let kind_id = c.u32(&name)?;
    let offset = c.u64(&name)?;
    let kind = GgmlType::from_id(kind_id).ok_or_else(|| {
        GgufError::Unsupported(format!(
            "tensor `{name}`: ggml {} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, \
             Q5_1, Q8_0, Q4_K and Q6_K are)",
            type_name(kind_id)
        ))
    })?;
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS as u64)
        .ok_or_else(|| format!("tensor `{name}`: dimensions {dims:?} are too large"))?;
    let (block_elems, block_bytes) = kind.block();
    if !dims[0].is_multiple_of(block_elems as u64) {
        return Err(format!(
            "tensor `{name}`: the first dimension {} is not a multiple of the {block_elems}-element \
             blocks of {kind:?}",
            dims[0]
        )
        .into());
    }
    let bytes = elements / block_elems as u64 * block_bytes as u64;
    // Every dimension is at most MAX_ELEMENTS, so fits usize.
    let shape = dims.iter().rev().map(|&d| d as usize).collect();
    Ok(TensorInfo {
        name,
        shape,
        kind,
        offset,
        bytes,
    })
}

/// Expand `raw` (whole blocks of `kind`, as `tensor_info` checked) into
/// little-endian f32 bytes.
pub(crate) fn dequantize(kind: GgmlType, raw: &[u8]) -> Vec<u8> {
    let (block_elems, block_bytes) = kind.block();
    let mut values = vec![0f32; raw.len() / block_bytes * block_elems];
    quant::dequantize_into(kind, raw, &mut values);
    crate::dtype::f32_to_bytes(&values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn header(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
        let mut b = MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&tensors.to_le_bytes());
        b.extend_from_slice(&kvs.to_le_bytes());
        b
    }

    fn why(bytes: &[u8]) -> String {
        match parse(bytes) {
            Err(GgufError::Format(why) | GgufError::Unsupported(why)) => why,
            Ok(_) => panic!("parsed"),
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let err = why(&header(3, u64::MAX, 0));
        assert!(err.contains("tensor count"), "{err}");
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(b"key");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = why(&b);
        assert!(err.contains("array length"), "{err}");
        // Fits the file (one byte each) but not the value cap.
        let n = MAX_VALUES + 1;
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(b"key");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(n as u64).to_le_bytes());
        b.resize(b.len() + n, 0);
        let err = why(&b);
        assert!(err.contains("metadata values a file may hold"), "{err}");
    }

    #[test]
    fn bad_magic_and_version_are_named() {
        assert!(why(b"GGML\0\0\0\0").contains("magic"));
        assert!(why(&header(1, 0, 0)).contains("version 1"));
        assert!(why(&header(3, 0, 0)[..10]).contains("ends"));
    }

    #[test]
    fn q4_0_and_q8_0_blocks_expand() {
        let mut q4 = f16::from_f32(0.5).to_le_bytes().to_vec();
        q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        quant::dequantize_block(GgmlType::Q4_0, &q4, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[15], 3.5);
        assert_eq!(out[16], 3.5);
        let mut q8 = f16::from_f32(0.25).to_le_bytes().to_vec();
        q8.extend((0..32i8).map(|j| (j - 16) as u8));
        quant::dequantize_block(GgmlType::Q8_0, &q8, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 3.75);
    }
}
