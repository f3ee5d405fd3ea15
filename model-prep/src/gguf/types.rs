//! ggml tensor types: their ids in GGUF files, names, and block layouts.
//!
//! Every type ggml defines is listed so an unsupported one is reported by name (and its data
//! size is still known, which the reader needs to bounds-check the file); [`GgmlType::is_supported`]
//! says which ones [`crate::gguf::dequant`] converts.

use std::fmt;

/// A ggml tensor type, by its GGUF id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block); from ggml.h / gguf-py's GGML_QUANT_SIZES.
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const IQ2_XXS: GgmlType = GgmlType(16);
    pub const IQ2_XS: GgmlType = GgmlType(17);
    pub const IQ3_XXS: GgmlType = GgmlType(18);
    pub const IQ1_S: GgmlType = GgmlType(19);
    pub const IQ4_NL: GgmlType = GgmlType(20);
    pub const IQ3_S: GgmlType = GgmlType(21);
    pub const IQ2_S: GgmlType = GgmlType(22);
    pub const IQ4_XS: GgmlType = GgmlType(23);
    pub const IQ1_M: GgmlType = GgmlType(29);
    pub const BF16: GgmlType = GgmlType(30);

    /// The types [`crate::gguf::dequant::dequantize`] converts.
    pub const SUPPORTED: [GgmlType; 22] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::IQ4_NL,
        Self::IQ4_XS,
        Self::Q3_K,
        Self::Q2_K,
        Self::IQ2_XXS,
        Self::IQ2_XS,
        Self::IQ2_S,
        Self::IQ3_XXS,
        Self::IQ3_S,
        Self::IQ1_S,
        Self::IQ1_M,
    ];

    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        TYPES.iter().find(|(id, ..)| *id == self.0)
    }

    /// Whether the type is one ggml defines (so its block layout is known).
    pub fn is_known(self) -> bool {
        self.entry().is_some()
    }

    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }

    /// ggml's name (`Q4_K`), or `type N` for an id ggml does not define.
    pub fn name(self) -> String {
        self.entry()
            .map(|(_, name, ..)| (*name).to_string())
            .unwrap_or_else(|| format!("type {}", self.0))
    }

    /// (elements per block, bytes per block), for known types.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        self.entry().map(|&(_, _, elems, bytes)| (elems, bytes))
    }

    /// Names of the supported types, for error messages.
    pub fn supported_names() -> String {
        Self::SUPPORTED
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_layouts() {
        assert_eq!(GgmlType::Q6_K.name(), "Q6_K");
        assert_eq!(GgmlType::Q4_K.block_layout(), Some((256, 144)));
        assert_eq!(GgmlType(6).name(), "Q5_0");
        assert!(GgmlType(6).is_supported());
        assert!(GgmlType(7).is_supported() && GgmlType(13).is_supported());
        assert!(GgmlType(10).is_supported() && GgmlType(16).is_supported());
        assert!(!GgmlType(34).is_supported() && !GgmlType(39).is_supported());
        assert_eq!(GgmlType(4).name(), "type 4");
        assert!(!GgmlType(4).is_known());
        assert!(GgmlType::SUPPORTED.iter().all(|t| t.is_known()));
    }
}
