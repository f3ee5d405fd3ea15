//! The element type of a model's weights ([`WeightDType`]): what a weight file stores, what the
//! loader hands a backend, what model-prep and the random-weight generator write. One enum for
//! all of them, so that a storage type is added in one place and every `match` over it shows
//! where it must be handled.
//!
//! FP8 (e4m3, the `float8_e4m3fn` of PyTorch and safetensors' `F8_E4M3`) is a storage type of
//! projection weights only, always with scales beside it (a weight's value is the stored value
//! times its scale: [`crate::quantization`]); embeddings, norms and usually lm_head stay in a
//! 16-bit type.
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
    /// FP8 e4m3 (finite-only: saturates at ±448, one NaN code), with scales.
    #[serde(rename = "fp8")]
    F8E4M3,
}

impl WeightDType {
    /// Bytes of one element.
    pub fn size_bytes(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            WeightDType::F16 | WeightDType::Bf16 => 2,
            WeightDType::F8E4M3 => 1,
        }
    }

    /// The name safetensors headers use.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            WeightDType::F32 => "F32",
            WeightDType::F16 => "F16",
            WeightDType::Bf16 => "BF16",
            WeightDType::F8E4M3 => "F8_E4M3",
        }
    }

    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDType::F32 => "float32",
            WeightDType::F16 => "float16",
            WeightDType::Bf16 => "bfloat16",
            WeightDType::F8E4M3 => "float8_e4m3fn",
        }
    }

    /// Parses `bf16|f16|f32|fp8` or the torch names (model-prep's `--dtype` values).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" | "float32" => Some(WeightDType::F32),
            "f16" | "float16" => Some(WeightDType::F16),
            "bf16" | "bfloat16" => Some(WeightDType::Bf16),
            "fp8" | "f8e4m3" | "float8_e4m3fn" => Some(WeightDType::F8E4M3),
            _ => None,
        }
    }

    /// The little-endian bytes of `values` in this type (rounded to nearest even; FP8
    /// saturates at ±448, so the caller divides by the scale first).
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
            WeightDType::F8E4M3 => {
                for (v, o) in values.iter().zip(out.iter_mut()) {
                    *o = float8::F8E4M3::from_f32(*v).to_bits();
                }
            }
        }
    }

    /// The value of one element's little-endian bytes (`bytes.len() == self.size_bytes()`),
    /// unscaled.
    pub fn decode(self, bytes: &[u8]) -> f32 {
        match self {
            WeightDType::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            WeightDType::F16 => half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            WeightDType::Bf16 => half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            WeightDType::F8E4M3 => float8::F8E4M3::from_bits(bytes[0]).to_f32(),
        }
    }
}

/// The largest finite FP8 e4m3 value: a quantizer maps a row's (or tensor's) largest magnitude
/// to it.
pub const F8E4M3_MAX: f32 = 448.0;

/// The lowercase name: `f32`, `f16`, `bf16`, `fp8`.
impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::Bf16 => "bf16",
            WeightDType::F8E4M3 => "fp8",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [WeightDType; 4] = [
        WeightDType::F32,
        WeightDType::F16,
        WeightDType::Bf16,
        WeightDType::F8E4M3,
    ];

    #[test]
    fn names_round_trip() {
        for dtype in ALL {
            assert_eq!(WeightDType::parse(&dtype.to_string()), Some(dtype));
            assert_eq!(WeightDType::parse(dtype.torch_name()), Some(dtype));
            let json = serde_json::to_string(&dtype).unwrap();
            assert_eq!(json, format!("\"{dtype}\""));
            assert_eq!(serde_json::from_str::<WeightDType>(&json).unwrap(), dtype);
        }
        assert_eq!(WeightDType::parse("fp4"), None);
    }

    #[test]
    fn encoding_rounds_to_the_type() {
        let values = [1.0f32, -0.5, 1.0 + f32::EPSILON];
        for dtype in ALL {
            assert_eq!(dtype.encode(&values).len(), 3 * dtype.size_bytes());
        }
        assert_eq!(WeightDType::Bf16.encode(&[1.0]), 0x3f80u16.to_le_bytes());
        assert_eq!(WeightDType::F16.encode(&[1.0]), 0x3c00u16.to_le_bytes());
        // e4m3: 1.0 is 0x38; ties go to the even code; beyond 448 saturates.
        let fp8 = WeightDType::F8E4M3;
        assert_eq!(
            fp8.encode(&[1.0, 1.0625, 1.1875, 500.0, -1e9]),
            [0x38, 0x38, 0x3a, 0x7e, 0xfe]
        );
        for dtype in ALL {
            let bytes = dtype.encode(&[0.75, -F8E4M3_MAX]);
            let n = dtype.size_bytes();
            assert_eq!(dtype.decode(&bytes[..n]), 0.75);
            assert_eq!(dtype.decode(&bytes[n..]), -F8E4M3_MAX);
        }
    }
}
