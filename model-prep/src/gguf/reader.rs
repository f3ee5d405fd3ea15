//! The GGUF container (versions 2 and 3), read over a memory map.
//!
//! Layout (little-endian): magic `GGUF`, version u32, tensor count u64, metadata count u64,
//! the metadata key/values, the tensor table (name, dims with `ne[0]` first, type, offset
//! relative to the data section), padding to `general.alignment` (default 32), the data.
//!
//! Guarantees: every count, length and offset is checked against the file before it is used,
//! so a truncated or corrupt file yields a [`GgufError`] naming the problem and where it is,
//! never a panic, and never an allocation larger than the file justifies (an element count
//! is capped by the bytes left to hold the elements). Tensor data is borrowed from the map,
//! not copied.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; real files nest at most once. Deeper nesting is corruption.
const MAX_ARRAY_DEPTH: u32 = 8;

/// A failure to read a GGUF file; `Display` names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct GgufError {
    pub path: PathBuf,
    pub problem: GgufProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum GgufProblem {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (bad magic: expected \"GGUF\", found {found:?})")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {version} (versions 2 and 3 are supported){hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error(
        "truncated file: {what} at byte {offset} needs {needed} bytes, but the file ends at byte {file_len}"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("corrupt file: {what} is {count}, more than the {max} the rest of the file could hold")]
    AbsurdCount { what: String, count: u64, max: u64 },
    #[error("corrupt metadata: key {key:?} has unknown value type {type_id}")]
    BadValueType { key: String, type_id: u32 },
    #[error("corrupt metadata: key {key:?} nests arrays more than {MAX_ARRAY_DEPTH} deep")]
    TooDeep { key: String },
    #[error("corrupt file: {what} is not valid UTF-8")]
    InvalidUtf8 { what: String },
    #[error("corrupt file: metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("corrupt file: tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("general.alignment must be a non-zero power of two, found {0}")]
    BadAlignment(u64),
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error(
        "tensor {name:?}: data (bytes {start}..{end}) runs past the end of the file ({file_len} bytes); the file is truncated or corrupt"
    )]
    TensorDataPastEnd {
        name: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, for any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, for any integer type whose value fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, for float types and integers.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
            MetaValue::Array(_) => "array",
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's `ne`: the fastest-varying dimension first (the reverse of PyTorch's shape).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    /// Length of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        // Checked at parse time not to overflow.
        self.dims.iter().product()
    }

    /// The shape in PyTorch order (slowest dimension first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file; tensor data stays in the memory map.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

impl GgufFile {
    /// Maps and parses `path`, checking the whole tensor table against the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let error = |problem| GgufError {
            path: path.to_path_buf(),
            problem,
        };
        let file = File::open(path).map_err(|e| error(GgufProblem::Io(e)))?;
        // SAFETY: the map is read-only and lives as long as `GgufFile`. Another process
        // truncating the file while we read it would fault; that is the accepted cost of
        // mapping model files, and every reader of GGUFs (llama.cpp included) takes it.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| error(GgufProblem::Io(e)))?;
        let parsed = parse(&map).map_err(error)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Offset of the data section in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Tensors in the order of the file's table.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor of this file (bounds were checked when it was opened).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.offset as usize..(info.offset + info.n_bytes) as usize]
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// Parses a whole GGUF image (exposed to the crate for tests over in-memory bytes).
fn parse(bytes: &[u8]) -> Result<Parsed, GgufProblem> {
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = cur.take(4, "the magic number").map_err(|e| match e {
        GgufProblem::Truncated { .. } => GgufProblem::BadMagic {
            found: bytes.to_vec(),
        },
        other => other,
    })?;
    if magic != MAGIC {
        return Err(GgufProblem::BadMagic {
            found: magic.to_vec(),
        });
    }
    let version = cur.u32("the version")?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            " (this looks like a big-endian GGUF; only little-endian files are supported)"
        } else if version == 1 {
            " (version 1 is obsolete: re-convert the model with a current llama.cpp)"
        } else {
            ""
        };
        return Err(GgufProblem::UnsupportedVersion { version, hint });
    }
    let tensor_count = cur.u64("the tensor count")?;
    let kv_count = cur.u64("the metadata count")?;
    // A key/value takes at least 8 (key length) + 4 (type) + 1 (smallest value) bytes.
    cur.check_count(kv_count, 13, "the metadata count")?;

    let mut metadata = BTreeMap::new();
    for index in 0..kv_count {
        let key = cur.string(&format!("metadata key #{index}"))?;
        let type_id = cur.u32(&format!("the type of metadata key {key:?}"))?;
        let value = cur.value(&key, type_id, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufProblem::DuplicateKey(key));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(value) => {
            let a = value.as_u64().unwrap_or(0);
            if a == 0 || !a.is_power_of_two() {
                return Err(GgufProblem::BadAlignment(a));
            }
            a
        }
    };

    // A tensor entry takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
    cur.check_count(tensor_count, 24, "the tensor count")?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut names = std::collections::HashSet::new();
    for index in 0..tensor_count {
        let name = cur.string(&format!("the name of tensor #{index}"))?;
        let bad = |reason: String| GgufProblem::BadTensor {
            name: name.clone(),
            reason,
        };
        let n_dims = cur.u32(&format!("the dimension count of tensor {name:?}"))?;
        if n_dims > MAX_DIMS {
            return Err(bad(format!(
                "{n_dims} dimensions (ggml tensors have at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(cur.u64(&format!("the dimensions of tensor {name:?}"))?);
        }
        let ggml_type = GgmlType(cur.u32(&format!("the type of tensor {name:?}"))?);
        let relative_offset = cur.u64(&format!("the data offset of tensor {name:?}"))?;
        let (block_elems, block_bytes) = ggml_type
            .block_layout()
            .ok_or_else(|| bad(format!("unknown ggml type id {}", ggml_type.0)))?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block_elems) {
            return Err(bad(format!(
                "its rows have {row} elements, not a multiple of the {ggml_type} block size {block_elems}"
            )));
        }
        let n_bytes = (n_elements / block_elems)
            .checked_mul(block_bytes)
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        if !relative_offset.is_multiple_of(alignment) {
            return Err(bad(format!(
                "data offset {relative_offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(GgufProblem::DuplicateTensor(name));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset: relative_offset,
            n_bytes,
        });
    }

    let file_len = bytes.len() as u64;
    let data_offset = (cur.pos as u64).div_ceil(alignment) * alignment;
    for tensor in &mut tensors {
        let start = data_offset.checked_add(tensor.offset);
        let end = start.and_then(|s| s.checked_add(tensor.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => tensor.offset = start,
            _ => {
                return Err(GgufProblem::TensorDataPastEnd {
                    name: tensor.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                });
            }
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// A bounds-checked little-endian reader over the file image.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufProblem> {
        if n > self.remaining() {
            return Err(GgufProblem::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.bytes.len() as u64,
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufProblem> {
        let bytes = self.take(N as u64, what)?;
        Ok(bytes.try_into().expect("take returned exactly N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufProblem> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufProblem> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects `count` items of at least `min_size` bytes each when the file cannot hold them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), GgufProblem> {
        let max = self.remaining() / min_size;
        if count > max {
            return Err(GgufProblem::AbsurdCount {
                what: what.to_string(),
                count,
                max,
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufProblem> {
        let len = self.u64(&format!("the length of {what}"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufProblem::InvalidUtf8 {
            what: what.to_string(),
        })
    }

    fn value(&mut self, key: &str, type_id: u32, depth: u32) -> Result<MetaValue, GgufProblem> {
        let what = || format!("the value of metadata key {key:?}");
        Ok(match type_id {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(&what())?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(&what())?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => {
                let [b] = self.array::<1>(&what())?;
                MetaValue::Bool(b != 0)
            }
            8 => MetaValue::String(self.string(&what())?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufProblem::TooDeep {
                        key: key.to_string(),
                    });
                }
                let item_type = self.u32(&format!("the item type of metadata array {key:?}"))?;
                let len = self.u64(&format!("the length of metadata array {key:?}"))?;
                let min_size = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(GgufProblem::BadValueType {
                            key: key.to_string(),
                            type_id: other,
                        });
                    }
                };
                self.check_count(
                    len,
                    min_size,
                    &format!("the length of metadata array {key:?}"),
                )?;
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(key, item_type, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what())?)),
            other => {
                return Err(GgufProblem::BadValueType {
                    key: key.to_string(),
                    type_id: other,
                });
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds small GGUF images by hand, for tests of the reader and of what uses it.
    #[derive(Default)]
    pub(crate) struct GgufBuilder {
        pub version: u32,
        kvs: Vec<u8>,
        kv_count: u64,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl GgufBuilder {
        pub fn new() -> Self {
            GgufBuilder {
                version: 3,
                ..Default::default()
            }
        }

        fn key(&mut self, key: &str, type_id: u32) {
            self.kvs.extend((key.len() as u64).to_le_bytes());
            self.kvs.extend(key.as_bytes());
            self.kvs.extend(type_id.to_le_bytes());
            self.kv_count += 1;
        }

        pub fn u32(mut self, key: &str, v: u32) -> Self {
            self.key(key, 4);
            self.kvs.extend(v.to_le_bytes());
            self
        }

        pub fn f32(mut self, key: &str, v: f32) -> Self {
            self.key(key, 6);
            self.kvs.extend(v.to_le_bytes());
            self
        }

        pub fn bool(mut self, key: &str, v: bool) -> Self {
            self.key(key, 7);
            self.kvs.push(v as u8);
            self
        }

        pub fn str(mut self, key: &str, v: &str) -> Self {
            self.key(key, 8);
            self.kvs.extend((v.len() as u64).to_le_bytes());
            self.kvs.extend(v.as_bytes());
            self
        }

        pub fn strings(mut self, key: &str, items: &[&str]) -> Self {
            self.key(key, 9);
            self.kvs.extend(8u32.to_le_bytes());
            self.kvs.extend((items.len() as u64).to_le_bytes());
            for s in items {
                self.kvs.extend((s.len() as u64).to_le_bytes());
                self.kvs.extend(s.as_bytes());
            }
            self
        }

        /// Appends raw bytes after a key of the given type (for malformed values).
        pub fn raw(mut self, key: &str, type_id: u32, bytes: &[u8]) -> Self {
            self.key(key, type_id);
            self.kvs.extend(bytes);
            self
        }

        pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
            self.tensors
                .push((name.to_string(), dims.to_vec(), type_id, data));
            self
        }

        pub fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend(MAGIC);
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend(self.kv_count.to_le_bytes());
            out.extend(&self.kvs);
            let mut data = Vec::new();
            for (name, dims, type_id, bytes) in &self.tensors {
                out.extend((name.len() as u64).to_le_bytes());
                out.extend(name.as_bytes());
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                // No padding after the last tensor, so every shorter prefix is truncated.
                while !data.len().is_multiple_of(32) {
                    data.push(0);
                }
                let offset = data.len() as u64;
                out.extend(type_id.to_le_bytes());
                out.extend(offset.to_le_bytes());
                data.extend(bytes);
            }
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            out.extend(data);
            out
        }
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn sample() -> GgufBuilder {
        GgufBuilder::new()
            .str("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .f32("llama.rope.freq_base", 10000.0)
            .bool("tokenizer.ggml.add_bos_token", true)
            .strings("tokenizer.ggml.tokens", &["<s>", "a", "é"])
            .tensor("a", &[3, 2], 0, f32_bytes(&[1., 2., 3., 4., 5., 6.]))
            .tensor("b", &[4], 1, vec![0; 8])
    }

    #[test]
    fn parses_metadata_and_tensor_table() {
        let parsed = parse(&sample().build()).unwrap();
        assert_eq!(parsed.version, 3);
        assert_eq!(
            parsed.metadata["general.architecture"].as_str(),
            Some("llama")
        );
        assert_eq!(parsed.metadata["llama.block_count"].as_u64(), Some(2));
        assert_eq!(
            parsed.metadata["llama.rope.freq_base"].as_f64(),
            Some(10000.0)
        );
        assert_eq!(
            parsed.metadata["tokenizer.ggml.add_bos_token"].as_bool(),
            Some(true)
        );
        let tokens = parsed.metadata["tokenizer.ggml.tokens"].as_array().unwrap();
        assert_eq!(tokens[2].as_str(), Some("é"));
        assert_eq!(parsed.tensors.len(), 2);
        let a = &parsed.tensors[0];
        assert_eq!(a.shape(), vec![2, 3]);
        assert_eq!(a.n_bytes, 24);
        assert_eq!(a.offset, parsed.data_offset);
        assert_eq!(parsed.tensors[1].offset, parsed.data_offset + 32);
    }

    #[test]
    fn nested_arrays_and_all_scalar_types() {
        // An array of two arrays of i16, then one value of every scalar type.
        let mut nested = Vec::new();
        nested.extend(9u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        for row in [[1i16, -2], [3, 4]] {
            nested.extend(3u32.to_le_bytes());
            nested.extend(2u64.to_le_bytes());
            for v in row {
                nested.extend(v.to_le_bytes());
            }
        }
        let bytes = GgufBuilder::new()
            .raw("nested", 9, &nested)
            .raw("u8", 0, &[200])
            .raw("i8", 1, &[0xff])
            .raw("u16", 2, &500u16.to_le_bytes())
            .raw("i64", 11, &(-7i64).to_le_bytes())
            .raw("u64", 10, &(1u64 << 40).to_le_bytes())
            .raw("f64", 12, &0.25f64.to_le_bytes())
            .build();
        let parsed = parse(&bytes).unwrap();
        let nested = parsed.metadata["nested"].as_array().unwrap();
        assert_eq!(
            nested[0],
            MetaValue::Array(vec![MetaValue::I16(1), MetaValue::I16(-2)])
        );
        assert_eq!(parsed.metadata["u8"].as_u64(), Some(200));
        assert_eq!(parsed.metadata["i8"].as_i64(), Some(-1));
        assert_eq!(parsed.metadata["i8"].as_u64(), None);
        assert_eq!(parsed.metadata["u16"].as_u64(), Some(500));
        assert_eq!(parsed.metadata["i64"].as_i64(), Some(-7));
        assert_eq!(parsed.metadata["u64"].as_u64(), Some(1 << 40));
        assert_eq!(parsed.metadata["f64"].as_f64(), Some(0.25));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().build();
        for len in 0..bytes.len() {
            let err = parse(&bytes[..len]).err();
            assert!(err.is_some(), "prefix of {len} bytes parsed");
        }
    }

    #[test]
    fn corrupt_headers_are_named() {
        let mut bytes = sample().build();
        bytes[0] = b'X';
        let err = parse(&bytes).err().unwrap().to_string();
        assert!(err.contains("bad magic"), "{err}");

        let mut builder = sample();
        builder.version = 1;
        let err = parse(&builder.build()).err().unwrap().to_string();
        assert!(err.contains("unsupported GGUF version 1"), "{err}");

        builder.version = 3u32.swap_bytes();
        let err = parse(&builder.build()).err().unwrap().to_string();
        assert!(err.contains("big-endian"), "{err}");
    }

    #[test]
    fn absurd_counts_are_rejected_before_allocating() {
        let mut bytes = sample().build();
        // Tensor count (bytes 8..16) of 2^60.
        bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let err = parse(&bytes).err().unwrap().to_string();
        assert!(
            err.contains("the tensor count is 1152921504606846976"),
            "{err}"
        );

        let mut huge_array = Vec::new();
        huge_array.extend(4u32.to_le_bytes());
        huge_array.extend(u64::MAX.to_le_bytes());
        let err = parse(&GgufBuilder::new().raw("x", 9, &huge_array).build())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("metadata array \"x\""), "{err}");

        let mut huge_string = Vec::new();
        huge_string.extend(u64::MAX.to_le_bytes());
        let err = parse(&GgufBuilder::new().raw("s", 8, &huge_string).build())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn bad_tensor_entries_are_named() {
        let err = parse(&GgufBuilder::new().tensor("t", &[3], 2, vec![0; 18]).build())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("\"t\"") && err.contains("block size 32"),
            "{err}"
        );

        let err = parse(&GgufBuilder::new().tensor("t", &[4], 4, vec![0; 18]).build())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown ggml type id 4"), "{err}");

        // Data cut off: the table says "b" holds 8 bytes, the file holds 4 of them.
        let mut bytes = sample().build();
        bytes.truncate(bytes.len() - 4);
        let err = parse(&bytes).err().unwrap().to_string();
        assert!(
            err.contains("tensor \"b\"") && err.contains("past the end"),
            "{err}"
        );

        let err = parse(
            &GgufBuilder::new()
                .u32("general.alignment", 3)
                .tensor("t", &[1], 0, vec![0; 4])
                .build(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("general.alignment"), "{err}");
    }

    #[test]
    fn unknown_value_type_is_named() {
        let err = parse(&GgufBuilder::new().raw("k", 42, &[0; 8]).build())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("\"k\"") && err.contains("unknown value type 42"),
            "{err}"
        );
    }
}
