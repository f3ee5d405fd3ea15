//! Named model shapes for random-weight models (`model-prep random --preset NAME`).
//!
//! Real shapes matter for benchmarks (bytes moved, FLOPs) and `tiny` keeps tests fast while
//! still exercising GQA (heads > kv heads) and several layers.

use crate::{Architecture, ModelConfig, RopeScaling, TokenIds};

/// Preset names, in the order `--help` lists them.
pub const PRESET_NAMES: &[&str] = &[
    "tiny",
    "smollm2-135m",
    "tinyllama-1.1b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-d128-2l",
    "qwen3-0.6b",
    "qwen3-8b",
    "qwen3-d128-2l",
];

/// The config of a preset, or `None` for an unknown name.
pub fn preset(name: &str) -> Option<ModelConfig> {
    let config = match name {
        "tiny" => {
            // vocab_size is filled in by the caller from the tokenizer it ships with.
            let mut c = ModelConfig::llama(64, 192, 2, 4, 2, 0);
            c.rms_norm_eps = 1e-5;
            c.rope_theta = 10_000.0;
            c.max_position_embeddings = 1024;
            c.tie_word_embeddings = false;
            c
        }
        "smollm2-135m" => {
            let mut c = ModelConfig::llama(576, 1536, 30, 9, 3, 49152);
            c.rms_norm_eps = 1e-5;
            c.rope_theta = 100_000.0;
            c.max_position_embeddings = 8192;
            c.tie_word_embeddings = true;
            c.bos_token_id = Some(TokenIds::One(1));
            c.eos_token_id = Some(TokenIds::One(2));
            c
        }
        "tinyllama-1.1b" => {
            let mut c = ModelConfig::llama(2048, 5632, 22, 32, 4, 32000);
            c.rms_norm_eps = 1e-5;
            c.rope_theta = 10_000.0;
            c.max_position_embeddings = 2048;
            c.bos_token_id = Some(TokenIds::One(1));
            c.eos_token_id = Some(TokenIds::One(2));
            c
        }
        "llama-3.1-8b" | "llama-3.1-70b" => {
            let mut c = if name == "llama-3.1-8b" {
                ModelConfig::llama(4096, 14336, 32, 32, 8, 128256)
            } else {
                // 141 GB in bf16: make it with `--generate-at-load`.
                ModelConfig::llama(8192, 28672, 80, 64, 8, 128256)
            };
            c.rms_norm_eps = 1e-5;
            c.rope_theta = 500_000.0;
            c.max_position_embeddings = 131072;
            c.rope_scaling = Some(RopeScaling {
                rope_type: "llama3".into(),
                factor: Some(8.0),
                low_freq_factor: Some(1.0),
                high_freq_factor: Some(4.0),
                original_max_position_embeddings: Some(8192),
            });
            c.bos_token_id = Some(TokenIds::One(128000));
            c.eos_token_id = Some(TokenIds::Many(vec![128001, 128008, 128009]));
            c
        }
        "llama-d128-2l" => {
            // Two layers of Llama-3.1-8B (head dim 128, four query heads per KV head) with a
            // 32k vocabulary: small enough for the CPU reference of `gpu_bench check`, so the
            // head-dim-128 kernels are checked against it.
            let mut c = ModelConfig::llama(4096, 14336, 2, 32, 8, 32000);
            c.rms_norm_eps = 1e-5;
            c.rope_theta = 500_000.0;
            c.max_position_embeddings = 8192;
            c.bos_token_id = Some(TokenIds::One(1));
            c.eos_token_id = Some(TokenIds::One(2));
            c
        }
        "qwen3-0.6b" | "qwen3-8b" | "qwen3-d128-2l" => {
            // Qwen3's dense models: q/k head norms, head_dim 128 whatever hidden/heads is
            // (1024/16 = 64 for 0.6B). `qwen3-d128-2l`: two layers of 8B's with a 32k
            // vocabulary, small enough for `gpu_bench check`'s CPU reference.
            let (hidden, ffn, layers, heads, vocab) = match name {
                "qwen3-0.6b" => (1024, 3072, 28, 16, 151936),
                "qwen3-8b" => (4096, 12288, 36, 32, 151936),
                _ => (4096, 12288, 2, 32, 32000),
            };
            let mut c = ModelConfig::llama(hidden, ffn, layers, heads, 8, vocab);
            c.architectures = vec![Architecture::Qwen3.hf_class().into()];
            c.model_type = Architecture::Qwen3.model_type().into();
            c.head_dim = Some(128);
            c.rms_norm_eps = 1e-6;
            c.rope_theta = 1_000_000.0;
            c.max_position_embeddings = 40960;
            c.tie_word_embeddings = name == "qwen3-0.6b";
            if vocab == 151936 {
                c.bos_token_id = Some(TokenIds::One(151643));
                c.eos_token_id = Some(TokenIds::One(151645));
            } else {
                c.bos_token_id = Some(TokenIds::One(1));
                c.eos_token_id = Some(TokenIds::One(2));
            }
            c
        }
        _ => return None,
    };
    Some(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_preset_exists_and_validates() {
        for name in PRESET_NAMES {
            let mut config = preset(name).unwrap();
            if config.vocab_size == 0 {
                config.vocab_size = 256;
            }
            config.validate(std::path::Path::new(name)).unwrap();
        }
        assert!(preset("gpt-5").is_none());
    }

    #[test]
    fn qwen3_presets_have_the_published_parameter_counts() {
        // Qwen3-0.6B's card: 0.6B (0.44B without embeddings); Qwen3-8B's: 8.2B (6.95B).
        let small = preset("qwen3-0.6b").unwrap();
        assert!(small.qk_norm());
        assert_eq!(small.parameter_count(), 596_049_920);
        assert_eq!(preset("qwen3-8b").unwrap().parameter_count(), 8_190_735_360);
    }

    #[test]
    fn llama_8b_has_eight_billion_parameters() {
        let params = preset("llama-3.1-8b").unwrap().parameter_count();
        assert_eq!(params, 8_030_261_248);
    }
}
