//! The element type of a model's weights ([`WeightDType`]): what a weight file stores, what the
//! loader hands a backend, what model-prep and the random-weight generator write. One enum for
//! all of them, so that a new storage type (FP8 e4m3 with its scales is the next) is added in
//! one place and every `match` over it shows where it must be handled.
//!
//! The KV cache's element type is another thing (`KvDType` in the workers: what the cache
//! stores, part of the KV transfer contract) and is not this enum.

use std::fmt;

/// Element type of a weight tensor. Serialized as its lowercase name (`"bf16"`), as
/// `random_weights.json` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    F16,
    Bf16,
}

impl WeightDType {
    /// Bytes of one element.
    pub fn size_bytes(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            WeightDType::F16 | WeightDType::Bf16 => 2,
        }
    }

    /// The name safetensors headers use.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            WeightDType::F32 => "F32",
            WeightDType::F16 => "F16",
            WeightDType::Bf16 => "BF16",
        }
    }

    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDType::F32 => "float32",
            WeightDType::F16 => "float16",
            WeightDType::Bf16 => "bfloat16",
        }
    }

    /// Parses `bf16|f16|f32` or the torch names (model-prep's `--dtype` values).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" | "float32" => Some(WeightDType::F32),
            "f16" | "float16" => Some(WeightDType::F16),
            "bf16" | "bfloat16" => Some(WeightDType::Bf16),
            _ => None,
        }
    }

    /// The little-endian bytes of `values` in this type (rounded to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * self.size_bytes()];
        self.encode_into(values, &mut out);
        out
    }

    /// [`Self::encode`] into `out`, which holds `values.len() * self.size_bytes()` bytes.
    pub fn encode_into(self, values: &[f32], out: &mut [u8]) {
        match self {
            WeightDType::F32 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            WeightDType::F16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
            WeightDType::Bf16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
        }
    }
}

/// The lowercase name: `f32`, `f16`, `bf16`.
impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [WeightDType; 3] = [WeightDType::F32, WeightDType::F16, WeightDType::Bf16];

    #[test]
    fn names_round_trip() {
        for dtype in ALL {
            assert_eq!(WeightDType::parse(&dtype.to_string()), Some(dtype));
            assert_eq!(WeightDType::parse(dtype.torch_name()), Some(dtype));
            let json = serde_json::to_string(&dtype).unwrap();
            assert_eq!(json, format!("\"{dtype}\""));
            assert_eq!(serde_json::from_str::<WeightDType>(&json).unwrap(), dtype);
        }
        assert_eq!(WeightDType::parse("fp8"), None);
    }

    #[test]
    fn encoding_rounds_to_the_type() {
        let values = [1.0f32, -0.5, 1.0 + f32::EPSILON];
        for dtype in ALL {
            assert_eq!(dtype.encode(&values).len(), 3 * dtype.size_bytes());
        }
        assert_eq!(WeightDType::Bf16.encode(&[1.0]), 0x3f80u16.to_le_bytes());
        assert_eq!(WeightDType::F16.encode(&[1.0]), 0x3c00u16.to_le_bytes());
    }
}
