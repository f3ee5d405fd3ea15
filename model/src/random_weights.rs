//! Deterministic random tensor data, generated in parallel: the weights of a random-weight
//! model directory, which `model-prep random` writes to safetensors and which a worker
//! generates itself for a directory made with `--generate-at-load`
//! ([`crate::RANDOM_WEIGHTS_FILE`]); the same seed gives the same bytes either way.
//!
//! Every tensor is cut into fixed chunks of [`CHUNK_ELEMENTS`]; each chunk gets its own ChaCha8
//! generator seeded from (seed, tensor name, chunk index). Rayon may run the chunks on any
//! thread in any order and the bytes come out the same, so a seed names one model whatever
//! the machine's core count. (Box-Muller calls the platform's `ln`/`sin`/`cos`; bit-identical
//! output is guaranteed for the same binary and platform.)

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::WeightDType;

/// What `random_weights.json` ([`crate::RANDOM_WEIGHTS_FILE`]) holds: the directory's weights
/// are [`tensor_bytes`] of every tensor the config implies, with this seed and encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RandomWeights {
    pub seed: u64,
    pub dtype: WeightDType,
    /// [`GENERATOR_VERSION`] of the generator that defines them.
    pub generator: u32,
}

/// Changes whenever [`tensor_bytes`] would give other bytes for the same arguments: a worker
/// refuses a directory written for another generator rather than computing with other weights.
pub const GENERATOR_VERSION: u32 = 1;

/// Elements per independently seeded chunk. Part of the output's definition: changing it
/// changes every model a seed produces.
pub const CHUNK_ELEMENTS: usize = 1 << 16;

/// Hugging Face's `initializer_range` for Llama models.
pub const INIT_STD: f32 = 0.02;

/// The per-tensor scale of FP8 random weights: `N(0, INIT_STD)` values quantized with six
/// standard deviations at the largest FP8 value (beyond it they saturate: about two values
/// in a billion). Fixed, so that any rows of a tensor are generated without a pass over all
/// of them.
pub const FP8_SCALE: f32 = 6.0 * INIT_STD / crate::F8E4M3_MAX;

/// The storage type of tensor `name` in a random-weight model of `dtype`: an FP8 model stores
/// its projections in FP8 (scale [`FP8_SCALE`]) and the rest in bf16, as FP8 checkpoints do.
pub fn tensor_dtype(name: &str, dtype: WeightDType) -> WeightDType {
    match dtype {
        WeightDType::F8E4M3 if !crate::tensor_names::is_projection(name) => WeightDType::Bf16,
        other => other,
    }
}

/// How a tensor is initialised, following `LlamaPreTrainedModel._init_weights`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Linear and embedding weights: normal(0, std).
    Normal { std: f32 },
    /// RMSNorm weights.
    Ones,
    /// Biases.
    Zeros,
}

impl Init {
    /// The initialisation Hugging Face gives the tensor of this name.
    pub fn for_tensor(name: &str) -> Init {
        if name.ends_with("norm.weight") {
            Init::Ones
        } else if name.ends_with(".bias") {
            Init::Zeros
        } else {
            Init::Normal { std: INIT_STD }
        }
    }
}

/// The little-endian bytes of a tensor of `elements` values in `dtype`.
pub fn tensor_bytes(
    seed: u64,
    name: &str,
    init: Init,
    dtype: WeightDType,
    elements: usize,
) -> Vec<u8> {
    tensor_bytes_range(seed, name, init, dtype, elements, 0..elements)
}

/// Elements `range` of [`tensor_bytes`] of the same arguments, generating only the chunks they
/// lie in: a tensor-parallel rank's rows of a generated matrix cost it its share of the work.
pub fn tensor_bytes_range(
    seed: u64,
    name: &str,
    init: Init,
    dtype: WeightDType,
    elements: usize,
    range: std::ops::Range<usize>,
) -> Vec<u8> {
    assert!(
        range.start <= range.end && range.end <= elements,
        "elements {range:?} of a tensor of {elements}"
    );
    let element_bytes = dtype.size_bytes();
    let mut bytes = vec![0u8; range.len() * element_bytes];
    let name_hash = fnv1a(name.as_bytes());
    // The output cut where chunks begin: (chunk index, first element of the chunk wanted, out).
    let mut pieces = Vec::new();
    let mut rest = bytes.as_mut_slice();
    let mut at = range.start;
    while at < range.end {
        let chunk = at / CHUNK_ELEMENTS;
        let end = ((chunk + 1) * CHUNK_ELEMENTS).min(range.end);
        let (out, tail) = rest.split_at_mut((end - at) * element_bytes);
        pieces.push((chunk, at - chunk * CHUNK_ELEMENTS, out));
        rest = tail;
        at = end;
    }
    pieces.into_par_iter().for_each(|(chunk, skip, out)| {
        // The whole chunk as the full tensor has it (its last may be short), then the part
        // wanted: a chunk's values depend on its index and length alone.
        let chunk_len = CHUNK_ELEMENTS.min(elements - chunk * CHUNK_ELEMENTS);
        let mut values = vec![0f32; chunk_len];
        match init {
            Init::Ones => values.fill(1.0),
            Init::Zeros => {}
            Init::Normal { std } => {
                let mut rng = chunk_rng(seed, name_hash, chunk as u64);
                fill_normal(&mut rng, std, &mut values);
            }
        }
        let values = &mut values[skip..skip + out.len() / element_bytes];
        if dtype == WeightDType::F8E4M3 {
            values.iter_mut().for_each(|v| *v /= FP8_SCALE);
        }
        dtype.encode_into(values, out);
    });
    bytes
}

fn chunk_rng(seed: u64, name_hash: u64, chunk_index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&name_hash.to_le_bytes());
    key[16..24].copy_from_slice(&chunk_index.to_le_bytes());
    key[24..32].copy_from_slice(b"tandem/r");
    ChaCha8Rng::from_seed(key)
}

/// Box-Muller: one 64-bit draw gives two 24-bit uniforms and two normal values.
fn fill_normal(rng: &mut ChaCha8Rng, std: f32, out: &mut [f32]) {
    const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
    for pair in out.chunks_mut(2) {
        let bits = rng.next_u64();
        // u1 in (0, 1] so ln(u1) is finite; u2 in [0, 1).
        let u1 = ((bits >> 40) as f32 + 1.0) * SCALE;
        let u2 = ((bits >> 16) & 0xff_ffff) as f32 * SCALE;
        let radius = std * (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f32::consts::TAU * u2).sin_cos();
        pair[0] = radius * cos;
        if let Some(second) = pair.get_mut(1) {
            *second = radius * sin;
        }
    }
}

/// FNV-1a: a stable hash (unlike `std`'s `DefaultHasher`, which may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| {
        (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn same_seed_same_bytes_regardless_of_thread_count() {
        let elements = 3 * CHUNK_ELEMENTS + 17;
        let init = Init::Normal { std: 0.02 };
        let a = tensor_bytes(7, "w", init, WeightDType::Bf16, elements);
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = one_thread.install(|| tensor_bytes(7, "w", init, WeightDType::Bf16, elements));
        assert_eq!(a, b);
        assert_ne!(a, tensor_bytes(8, "w", init, WeightDType::Bf16, elements));
        assert_ne!(a, tensor_bytes(7, "v", init, WeightDType::Bf16, elements));
    }

    #[test]
    fn a_range_is_those_elements_of_the_whole_tensor() {
        let elements = 3 * CHUNK_ELEMENTS + 17;
        let init = Init::Normal { std: 0.02 };
        let whole = tensor_bytes(5, "w", init, WeightDType::Bf16, elements);
        for range in [
            0..elements,
            0..0,
            10..20,
            CHUNK_ELEMENTS - 3..CHUNK_ELEMENTS + 5,
            CHUNK_ELEMENTS..2 * CHUNK_ELEMENTS,
            2 * CHUNK_ELEMENTS + 1..elements,
            elements - 1..elements,
        ] {
            let part = tensor_bytes_range(5, "w", init, WeightDType::Bf16, elements, range.clone());
            assert_eq!(part, whole[range.start * 2..range.end * 2], "{range:?}");
        }
        let ones = tensor_bytes_range(5, "n", Init::Ones, WeightDType::F32, 9, 2..5);
        assert_eq!(f32s(&ones), [1.0; 3]);
    }

    #[test]
    fn normal_values_have_the_requested_moments() {
        let values = f32s(&tensor_bytes(
            1,
            "model.layers.0.mlp.up_proj.weight",
            Init::Normal { std: 0.02 },
            WeightDType::F32,
            1 << 20,
        ));
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        assert!(values.iter().all(|v| v.is_finite()));
        // About 4.6% of a normal lies beyond 2 sigma.
        let tail = values.iter().filter(|v| v.abs() > 0.04).count() as f64 / n;
        assert!((tail - 0.0455).abs() < 0.003, "tail {tail}");
    }

    #[test]
    fn norms_are_ones_and_biases_zeros() {
        assert_eq!(Init::for_tensor("model.norm.weight"), Init::Ones);
        assert_eq!(
            Init::for_tensor("model.layers.3.post_attention_layernorm.weight"),
            Init::Ones
        );
        assert_eq!(
            Init::for_tensor("model.layers.3.self_attn.q_proj.bias"),
            Init::Zeros
        );
        assert_eq!(
            Init::for_tensor("model.embed_tokens.weight"),
            Init::Normal { std: INIT_STD }
        );
        let ones = tensor_bytes(0, "n", Init::Ones, WeightDType::F16, 5);
        assert_eq!(ones, WeightDType::F16.encode(&[1.0; 5]));
        let zeros = tensor_bytes(0, "b", Init::Zeros, WeightDType::Bf16, 3);
        assert_eq!(zeros, vec![0u8; 6]);
    }

    #[test]
    fn dtypes_encode_the_same_values() {
        let init = Init::Normal { std: 0.02 };
        let f32_values = f32s(&tensor_bytes(3, "w", init, WeightDType::F32, 1000));
        let bf16 = tensor_bytes(3, "w", init, WeightDType::Bf16, 1000);
        assert_eq!(bf16, WeightDType::Bf16.encode(&f32_values));
    }
}
