//! A streaming safetensors writer.
//!
//! The `safetensors` crate serializes from in-memory views of every tensor at once; an 8B
//! model in bf16 is 16 GB, so model-prep declares all tensors up front (which fixes the
//! header) and then streams each tensor's bytes in order, holding one tensor at a time.
//! Files it writes are read back with the `safetensors` crate in tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The element type of [`TensorSpec::dtype`], re-exported for the writer's callers.
pub use tandem_model::WeightDType;

/// What a tensor's bytes are: elements of a weight type, or raw bytes (`U8`: GGUF blocks,
/// [`tandem_model::gguf_quant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    Elem(WeightDType),
    U8,
}

impl From<WeightDType> for StoredDType {
    fn from(dtype: WeightDType) -> Self {
        StoredDType::Elem(dtype)
    }
}

impl StoredDType {
    pub fn size_bytes(self) -> usize {
        match self {
            StoredDType::Elem(d) => d.size_bytes(),
            StoredDType::U8 => 1,
        }
    }

    pub fn safetensors_name(self) -> &'static str {
        match self {
            StoredDType::Elem(d) => d.safetensors_name(),
            StoredDType::U8 => "U8",
        }
    }
}

/// One tensor to be written: its name, dtype and shape.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: StoredDType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor {name}: expected to write {expected}, got {got}")]
    OutOfOrder {
        name: String,
        expected: String,
        got: String,
    },
    #[error("tensor {name}: expected {expected} bytes, got {got}")]
    WrongLength {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("duplicate tensor name {0}")]
    Duplicate(String),
    #[error("{path}: {missing} declared tensors were never written")]
    Incomplete { path: PathBuf, missing: usize },
}

/// Writes the tensors declared at creation, in declaration order.
pub struct SafetensorsWriter {
    path: PathBuf,
    file: BufWriter<File>,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header; `metadata` goes into `__metadata__`.
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, WriteError> {
        let io = |source| WriteError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("string map serializes"),
            );
        }
        let mut offset = 0usize;
        for spec in &specs {
            let end = offset + spec.byte_len();
            let entry = serde_json::json!({
                "dtype": spec.dtype.safetensors_name(),
                "shape": spec.shape,
                "data_offsets": [offset, end],
            });
            if header.insert(spec.name.clone(), entry).is_some() {
                return Err(WriteError::Duplicate(spec.name.clone()));
            }
            offset = end;
        }
        let mut header_bytes = serde_json::to_vec(&header).expect("JSON map serializes");
        // The data section starts 8-byte aligned, padded with spaces as the format allows.
        while !header_bytes.len().is_multiple_of(8) {
            header_bytes.push(b' ');
        }
        let mut file = BufWriter::with_capacity(8 << 20, File::create(path).map_err(io)?);
        file.write_all(&(header_bytes.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.write_all(&header_bytes).map_err(io)?;
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            file,
            specs,
            next: 0,
        })
    }

    /// The tensors still to be written, in order.
    pub fn pending(&self) -> &[TensorSpec] {
        &self.specs[self.next..]
    }

    /// Writes the next tensor's little-endian bytes; `name` must be the next declared one.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        let spec = self
            .specs
            .get(self.next)
            .ok_or_else(|| WriteError::OutOfOrder {
                name: name.to_string(),
                expected: "nothing (all declared tensors written)".into(),
                got: name.to_string(),
            })?;
        if spec.name != name {
            return Err(WriteError::OutOfOrder {
                name: name.to_string(),
                expected: spec.name.clone(),
                got: name.to_string(),
            });
        }
        if spec.byte_len() != bytes.len() {
            return Err(WriteError::WrongLength {
                name: name.to_string(),
                expected: spec.byte_len(),
                got: bytes.len(),
            });
        }
        self.file
            .write_all(bytes)
            .map_err(|source| WriteError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and closes; fails if a declared tensor was not written.
    pub fn finish(mut self) -> Result<(), WriteError> {
        if self.next != self.specs.len() {
            return Err(WriteError::Incomplete {
                path: self.path.clone(),
                missing: self.specs.len() - self.next,
            });
        }
        let io = |source| WriteError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.flush().map_err(io)?;
        self.file.get_ref().sync_all().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let specs = vec![
            TensorSpec {
                name: "b".into(),
                dtype: WeightDType::F32.into(),
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "a".into(),
                dtype: WeightDType::Bf16.into(),
                shape: vec![3],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut writer = SafetensorsWriter::create(&path, specs, &meta).unwrap();
        let b: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        writer
            .write_tensor("b", &WeightDType::F32.encode(&b))
            .unwrap();
        let err = writer.write_tensor("b", &[0; 6]).unwrap_err();
        assert!(err.to_string().contains("expected to write a"), "{err}");
        writer
            .write_tensor("a", &WeightDType::Bf16.encode(&[1.0, -2.0, 3.5]))
            .unwrap();
        writer.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tb = st.tensor("b").unwrap();
        assert_eq!(tb.shape(), &[2, 3]);
        assert_eq!(tb.data(), WeightDType::F32.encode(&b).as_slice());
        let ta = st.tensor("a").unwrap();
        assert_eq!(ta.dtype(), safetensors::Dtype::BF16);
        assert_eq!(
            ta.data(),
            WeightDType::Bf16.encode(&[1.0, -2.0, 3.5]).as_slice()
        );
    }

    #[test]
    fn incomplete_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let specs = vec![TensorSpec {
            name: "x".into(),
            dtype: WeightDType::F16.into(),
            shape: vec![4],
        }];
        let writer = SafetensorsWriter::create(&path, specs, &BTreeMap::new()).unwrap();
        assert!(matches!(
            writer.finish(),
            Err(WriteError::Incomplete { missing: 1, .. })
        ));
    }
}
