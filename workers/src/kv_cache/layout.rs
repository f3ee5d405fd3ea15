//! Block-major KV layout.
//!
//! One block holds `block_size` tokens of ALL layers, K and V, as one contiguous region, so a
//! sequence's KV cache is a short list of large regions and moving it between workers is a few
//! large reads. Inside a block, elements are ordered
//! `[layer][k=0 | v=1][token_in_block][kv_head][head_dim]`: a token's K (or V) for one layer
//! is one contiguous vector of `num_kv_heads * head_dim` elements, which is what the
//! rotary-embedding/cache-write step produces per token.
//!
//! The layout is part of the wire contract: a KV handle carries it, and a receiver whose own
//! layout differs refuses the transfer instead of reading garbage.

use serde::{Deserialize, Serialize};

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDType {
    F32,
    F16,
    Bf16,
    /// FP8 e4m3 codes of the values themselves (a scale of 1, vLLM's default where a
    /// checkpoint has no KV scales): half the bytes of bf16 per token, so twice the tokens in
    /// the same memory and half the bytes a hand-over moves. Writes saturate at +-448. Keys
    /// are stored under a Walsh-Hadamard rotation of each head, which queries take too
    /// ([`super::key_rotation`]): the codes of an unrotated key read as garbage.
    Fp8,
}

impl KvDType {
    pub fn size_bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 | KvDType::Bf16 => 2,
            KvDType::Fp8 => 1,
        }
    }

    /// The name configurations and the wire use (`kv_cache_config.dtype`, `--kv-cache-dtype`).
    pub fn name(self) -> &'static str {
        match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::Bf16 => "bf16",
            KvDType::Fp8 => "fp8",
        }
    }
}

/// The shape of one KV block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: KvDType,
}

impl KvLayout {
    /// Elements of one token's K (or V) in one layer.
    pub fn token_stride(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Elements of one layer's K (or V) for all tokens of a block.
    pub fn kv_stride(&self) -> usize {
        self.block_size * self.token_stride()
    }

    /// Elements of one layer (K and V) in a block.
    pub fn layer_stride(&self) -> usize {
        2 * self.kv_stride()
    }

    /// Elements in one block.
    pub fn block_elems(&self) -> usize {
        self.num_layers * self.layer_stride()
    }

    pub fn block_bytes(&self) -> usize {
        self.block_elems() * self.dtype.size_bytes()
    }

    /// Element offset, inside a block, of the first element of `(layer, kv, token)`;
    /// `kv` is 0 for K and 1 for V.
    pub fn offset(&self, layer: usize, kv: usize, token_in_block: usize) -> usize {
        debug_assert!(layer < self.num_layers && kv < 2 && token_in_block < self.block_size);
        layer * self.layer_stride() + kv * self.kv_stride() + token_in_block * self.token_stride()
    }

    /// Number of blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_tile_the_block_without_gaps_or_overlap() {
        let layout = KvLayout {
            num_layers: 3,
            num_kv_heads: 2,
            head_dim: 4,
            block_size: 5,
            dtype: KvDType::Bf16,
        };
        let mut seen = vec![false; layout.block_elems()];
        for layer in 0..3 {
            for kv in 0..2 {
                for t in 0..5 {
                    let start = layout.offset(layer, kv, t);
                    for e in 0..layout.token_stride() {
                        assert!(!seen[start + e], "overlap at {layer}/{kv}/{t}");
                        seen[start + e] = true;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(layout.block_bytes(), 3 * 2 * 5 * 2 * 4 * 2);
        assert_eq!(layout.blocks_for(11), 3);
    }
}
