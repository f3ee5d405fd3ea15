//! Hugging Face tensor names of the Llama family, and the shapes each must have.
//!
//! Shapes follow PyTorch's `nn.Linear` convention: `[out_features, in_features]`.

use crate::ModelConfig;

/// The causal LM's prefix of the base model's tensors (a base model's own checkpoint has none).
pub const MODEL_PREFIX: &str = "model.";
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// Names of the tensors of decoder layer `layer`.
#[derive(Debug, Clone)]
pub struct LayerTensorNames {
    pub input_norm: String,
    pub q_proj: String,
    pub k_proj: String,
    pub v_proj: String,
    pub o_proj: String,
    pub q_bias: String,
    pub k_bias: String,
    pub v_bias: String,
    pub o_bias: String,
    /// Qwen3's per-head norms of q and k ([`ModelConfig::qk_norm`]), `[head_dim]` each.
    pub q_norm: String,
    pub k_norm: String,
    pub post_attention_norm: String,
    pub gate_proj: String,
    pub up_proj: String,
    pub down_proj: String,
}

pub fn layer(layer: usize) -> LayerTensorNames {
    let p = format!("model.layers.{layer}");
    LayerTensorNames {
        input_norm: format!("{p}.input_layernorm.weight"),
        q_proj: format!("{p}.self_attn.q_proj.weight"),
        k_proj: format!("{p}.self_attn.k_proj.weight"),
        v_proj: format!("{p}.self_attn.v_proj.weight"),
        o_proj: format!("{p}.self_attn.o_proj.weight"),
        q_bias: format!("{p}.self_attn.q_proj.bias"),
        k_bias: format!("{p}.self_attn.k_proj.bias"),
        v_bias: format!("{p}.self_attn.v_proj.bias"),
        o_bias: format!("{p}.self_attn.o_proj.bias"),
        q_norm: format!("{p}.self_attn.q_norm.weight"),
        k_norm: format!("{p}.self_attn.k_norm.weight"),
        post_attention_norm: format!("{p}.post_attention_layernorm.weight"),
        gate_proj: format!("{p}.mlp.gate_proj.weight"),
        up_proj: format!("{p}.mlp.up_proj.weight"),
        down_proj: format!("{p}.mlp.down_proj.weight"),
    }
}

/// Whether `name` is the weight of a decoder layer's projection (q/k/v/o, gate/up/down): the
/// tensors an FP8 checkpoint stores in FP8 (embeddings, norms, biases and lm_head stay 16-bit).
pub fn is_projection(name: &str) -> bool {
    name.starts_with("model.layers.")
        && name.ends_with("_proj.weight")
        && (name.contains(".self_attn.") || name.contains(".mlp."))
}

/// Every tensor a model of this config has, with its shape, in a stable order.
/// `lm_head.weight` is absent when embeddings are tied.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let hidden = config.hidden_size;
    let q_out = config.num_attention_heads * config.head_dim();
    let kv_out = config.num_kv_heads() * config.head_dim();
    let ffn = config.intermediate_size;
    let mut tensors = vec![(EMBED_TOKENS.to_string(), vec![config.vocab_size, hidden])];
    for i in 0..config.num_hidden_layers {
        let n = layer(i);
        tensors.push((n.input_norm, vec![hidden]));
        tensors.push((n.q_proj, vec![q_out, hidden]));
        tensors.push((n.k_proj, vec![kv_out, hidden]));
        tensors.push((n.v_proj, vec![kv_out, hidden]));
        tensors.push((n.o_proj, vec![hidden, q_out]));
        if config.qkv_bias() {
            tensors.push((n.q_bias, vec![q_out]));
            tensors.push((n.k_bias, vec![kv_out]));
            tensors.push((n.v_bias, vec![kv_out]));
        }
        if config.o_bias() {
            tensors.push((n.o_bias, vec![hidden]));
        }
        if config.qk_norm() {
            tensors.push((n.q_norm, vec![config.head_dim()]));
            tensors.push((n.k_norm, vec![config.head_dim()]));
        }
        tensors.push((n.post_attention_norm, vec![hidden]));
        tensors.push((n.gate_proj, vec![ffn, hidden]));
        tensors.push((n.up_proj, vec![ffn, hidden]));
        tensors.push((n.down_proj, vec![hidden, ffn]));
    }
    tensors.push((FINAL_NORM.to_string(), vec![hidden]));
    if !config.tie_word_embeddings {
        tensors.push((LM_HEAD.to_string(), vec![config.vocab_size, hidden]));
    }
    tensors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_are_the_layers_linear_weights() {
        let n = layer(3);
        for name in [
            &n.q_proj,
            &n.k_proj,
            &n.v_proj,
            &n.o_proj,
            &n.gate_proj,
            &n.up_proj,
            &n.down_proj,
        ] {
            assert!(is_projection(name), "{name}");
        }
        for name in [&n.q_bias, &n.input_norm, &n.post_attention_norm, &n.q_norm] {
            assert!(!is_projection(name), "{name}");
        }
        assert!(
            !is_projection(EMBED_TOKENS) && !is_projection(LM_HEAD) && !is_projection(FINAL_NORM)
        );
    }
}
