//! GGUF block quantizations kept in a model directory: which ggml block types a directory may
//! hold ([`GgufQuant`]) and how `config.json` says which tensor has which
//! ([`GgufQuantConfig`]).
//!
//! A block-quantized weight `[rows, cols]` is stored in `model.safetensors` as a `U8` tensor
//! `[rows, cols / block_elems * block_bytes]`: each row is that row's ggml blocks, byte for
//! byte as llama.cpp writes them (rows in Hugging Face order, so q_proj and k_proj rows are
//! un-permuted like the dequantized import's). `config.json`'s `quantization_config` is
//! `{"quant_method": "gguf", "tensor_types": {"<tensor name>": "Q4_1", ...}}` and lists every
//! such tensor; every other tensor is an ordinary 16/32-bit one. This is not an element type
//! ([`crate::WeightDType`] is per element), so it is its own enum: a backend either runs a
//! type's blocks as they are or refuses it by name.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Value, json};

/// The `quant_method` of a GGUF-quantized directory.
pub const GGUF_QUANT_METHOD: &str = "gguf";

/// A ggml block quantization a model directory may keep as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)] // ggml's own names (`Q4_K`), as GGUF files and llama.cpp spell them
pub enum GgufQuant {
    /// 32 values: `d: f16`, `qs: [i8; 32]`; `y = d * q`.
    Q8_0,
    /// 32 values: `d: f16`, `qs: [u8; 16]` (nibbles); `y = d * (q - 8)`.
    Q4_0,
    /// 32 values: `d: f16`, `m: f16`, `qs: [u8; 16]`; `y = d * q + m`.
    Q4_1,
    /// 32 values: `d: f16`, `qh: u32` (fifth bits), `qs: [u8; 16]`; `y = d * (q - 16)`.
    Q5_0,
    /// 32 values: `d: f16`, `m: f16`, `qh: u32` (fifth bits), `qs: [u8; 16]`; `y = d * q + m`.
    Q5_1,
    /// 256 values of 3 bits (2 low, 1 in a high-bit mask) in 16 groups of 16 with 6-bit
    /// scales; `y = d * (scale - 32) * (q - 4)`.
    Q3_K,
    /// 256 values in 8 sub-blocks of 32 with 6-bit scales and mins.
    Q4_K,
    /// Q4_K's sub-blocks, scales and mins, with a fifth bit a code.
    Q5_K,
    /// 256 values of 6 bits in 16 groups of 16 with 8-bit scales.
    Q6_K,
    /// 32 values: `d: f16`, `qs: [u8; 16]` (nibbles), each an index into a table of 16 i8
    /// values; `y = d * table[q]`.
    IQ4_NL,
    /// 256 values in 8 sub-blocks of 32 with 6-bit scales, IQ4_NL's table.
    IQ4_XS,
}

impl GgufQuant {
    pub const ALL: [GgufQuant; 11] = [
        GgufQuant::Q8_0,
        GgufQuant::Q4_0,
        GgufQuant::Q4_1,
        GgufQuant::Q5_0,
        GgufQuant::Q5_1,
        GgufQuant::Q4_K,
        GgufQuant::Q5_K,
        GgufQuant::Q6_K,
        GgufQuant::IQ4_NL,
        GgufQuant::IQ4_XS,
        GgufQuant::Q3_K,
    ];

    /// ggml's name (`Q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::Q8_0 => "Q8_0",
            GgufQuant::Q4_0 => "Q4_0",
            GgufQuant::Q4_1 => "Q4_1",
            GgufQuant::Q5_0 => "Q5_0",
            GgufQuant::Q5_1 => "Q5_1",
            GgufQuant::Q4_K => "Q4_K",
            GgufQuant::Q5_K => "Q5_K",
            GgufQuant::Q6_K => "Q6_K",
            GgufQuant::IQ4_NL => "IQ4_NL",
            GgufQuant::IQ4_XS => "IQ4_XS",
            GgufQuant::Q3_K => "Q3_K",
        }
    }

    /// The type named `name` (ggml's spelling, case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The type's id in GGUF files (ggml's `ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q4_1 => 3,
            GgufQuant::Q5_0 => 6,
            GgufQuant::Q5_1 => 7,
            GgufQuant::Q8_0 => 8,
            GgufQuant::Q4_K => 12,
            GgufQuant::Q5_K => 13,
            GgufQuant::Q6_K => 14,
            GgufQuant::IQ4_NL => 20,
            GgufQuant::IQ4_XS => 23,
            GgufQuant::Q3_K => 11,
        }
    }

    /// Values per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgufQuant::Q8_0
            | GgufQuant::Q4_0
            | GgufQuant::Q4_1
            | GgufQuant::Q5_0
            | GgufQuant::Q5_1
            | GgufQuant::IQ4_NL => 32,
            GgufQuant::Q3_K
            | GgufQuant::Q4_K
            | GgufQuant::Q5_K
            | GgufQuant::Q6_K
            | GgufQuant::IQ4_XS => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgufQuant::Q8_0 => 34,
            GgufQuant::Q4_0 => 18,
            GgufQuant::Q4_1 => 20,
            GgufQuant::Q5_0 => 22,
            GgufQuant::Q5_1 => 24,
            GgufQuant::Q4_K => 144,
            GgufQuant::Q5_K => 176,
            GgufQuant::Q6_K => 210,
            GgufQuant::IQ4_NL => 18,
            GgufQuant::IQ4_XS => 136,
            GgufQuant::Q3_K => 110,
        }
    }

    /// Bytes of one row of `cols` values; `None` unless `cols` is a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_elems())
            .then(|| cols / self.block_elems() * self.block_bytes())
    }

    /// Values in a row of `bytes` bytes; `None` unless `bytes` is a whole number of blocks.
    pub fn row_elems(self, bytes: usize) -> Option<usize> {
        bytes
            .is_multiple_of(self.block_bytes())
            .then(|| bytes / self.block_bytes() * self.block_elems())
    }
}

impl fmt::Display for GgufQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `quantization_config` of a GGUF-quantized directory: the block type of each quantized
/// tensor, by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GgufQuantConfig {
    pub tensor_types: BTreeMap<String, GgufQuant>,
}

impl GgufQuantConfig {
    /// Whether `config` is a GGUF `quantization_config` (its `quant_method` is `gguf`).
    pub fn is_gguf(config: &Value) -> bool {
        config.get("quant_method").and_then(Value::as_str) == Some(GGUF_QUANT_METHOD)
    }

    /// Reads a `quantization_config` whose `quant_method` is `gguf`; `Err` names what is wrong.
    pub fn from_config(config: &Value) -> Result<Self, String> {
        if !Self::is_gguf(config) {
            return Err(format!("`quant_method` is not {GGUF_QUANT_METHOD:?}"));
        }
        let types = config
            .get("tensor_types")
            .and_then(Value::as_object)
            .ok_or("`tensor_types` (an object of tensor name -> GGUF type) is missing")?;
        let mut tensor_types = BTreeMap::new();
        for (name, t) in types {
            let t = t
                .as_str()
                .ok_or_else(|| format!("`tensor_types.{name}` is not a string"))?;
            let quant = GgufQuant::parse(t).ok_or_else(|| {
                format!(
                    "`tensor_types.{name}`: {t:?} is not a supported GGUF type ({})",
                    GgufQuant::ALL.map(GgufQuant::name).join(", ")
                )
            })?;
            tensor_types.insert(name.clone(), quant);
        }
        Ok(GgufQuantConfig { tensor_types })
    }

    /// The `quantization_config` value of this config.
    pub fn to_config(&self) -> Value {
        let types: serde_json::Map<String, Value> = self
            .tensor_types
            .iter()
            .map(|(n, t)| (n.clone(), Value::String(t.name().into())))
            .collect();
        json!({"quant_method": GGUF_QUANT_METHOD, "tensor_types": types})
    }

    /// The type the most tensors have (what names the model: `Q4_1` for a Q4_1 GGUF whose
    /// embedding is Q8_0).
    pub fn main_type(&self) -> Option<GgufQuant> {
        let mut counts: BTreeMap<GgufQuant, usize> = BTreeMap::new();
        for t in self.tensor_types.values() {
            *counts.entry(*t).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_names() {
        assert_eq!(GgufQuant::Q4_1.row_bytes(576), Some(18 * 20));
        assert_eq!(GgufQuant::Q4_K.row_bytes(576), None);
        assert_eq!(GgufQuant::Q6_K.row_elems(210 * 3), Some(768));
        assert_eq!(GgufQuant::Q8_0.row_elems(35), None);
        for t in GgufQuant::ALL {
            assert_eq!(GgufQuant::parse(&t.to_string().to_lowercase()), Some(t));
        }
        assert_eq!(GgufQuant::parse("Q2_K"), None);
    }

    #[test]
    fn config_round_trips_and_names_bad_types() {
        let mut config = GgufQuantConfig::default();
        config
            .tensor_types
            .insert("a.weight".into(), GgufQuant::Q4_1);
        config
            .tensor_types
            .insert("b.weight".into(), GgufQuant::Q4_1);
        config
            .tensor_types
            .insert("c.weight".into(), GgufQuant::Q8_0);
        let value = config.to_config();
        assert!(GgufQuantConfig::is_gguf(&value));
        assert_eq!(GgufQuantConfig::from_config(&value).unwrap(), config);
        assert_eq!(config.main_type(), Some(GgufQuant::Q4_1));
        let bad = json!({"quant_method": "gguf", "tensor_types": {"x.weight": "Q2_K"}});
        let err = GgufQuantConfig::from_config(&bad).unwrap_err();
        assert!(err.contains("x.weight") && err.contains("Q2_K"), "{err}");
        assert!(GgufQuantConfig::from_config(&json!({"quant_method": "gguf"})).is_err());
    }
}
