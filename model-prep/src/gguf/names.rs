//! GGUF tensor names and layouts -> Hugging Face names and layouts.
//!
//! llama.cpp's `convert_hf_to_gguf.py` renames tensors (`model.layers.N.self_attn.q_proj` ->
//! `blk.N.attn_q`), stores shapes fastest dimension first, and for the `llama` architecture
//! permutes the rows of q_proj and k_proj (and their biases) so each head's rotary pairs are
//! adjacent (`x0 x1 x2 x3 ...` interleaved instead of the HF halves `x0 .. x_{d/2}`). This
//! module inverts all three, and checks the result is exactly the tensor set the config
//! implies (`tandem_model::tensor_names::expected_tensors`), so a model directory never holds
//! a missing, extra or misshapen tensor. Qwen2 GGUFs are not permuted.

use std::collections::{BTreeSet, HashMap};

use tandem_model::{Architecture, ModelConfig, tensor_names};

use super::reader::TensorInfo;

/// GGUF tensors that are not model weights of their own: llama.cpp stores Llama 3's rope
/// scaling as `rope_freqs.weight`; [`crate::gguf::config`] turns it back into `rope_scaling`.
pub const NON_WEIGHT_TENSORS: &[&str] = &["rope_freqs.weight"];

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("tensor {0:?} is not part of a Llama-family model (unknown GGUF tensor name)")]
    Unknown(String),
    #[error(
        "tensor {gguf_name:?} ({hf_name}) has shape {found:?}, but the metadata implies {expected:?}"
    )]
    Shape {
        gguf_name: String,
        hf_name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("the GGUF lacks tensors the metadata implies: {0}")]
    Missing(String),
    #[error("the GGUF has tensors the metadata does not account for: {0}")]
    Extra(String),
    #[error(
        "tensor {name:?}: cannot undo the rotary row permutation of {rows} rows over {heads} heads"
    )]
    Permutation {
        name: String,
        rows: usize,
        heads: usize,
    },
}

/// How one GGUF tensor becomes one Hugging Face tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// Index into the GGUF file's tensor table.
    pub gguf_index: usize,
    pub gguf_name: String,
    pub hf_name: String,
    /// PyTorch-order shape.
    pub shape: Vec<usize>,
    /// `Some(heads)` when rows must be un-permuted over that many heads.
    pub unpermute_heads: Option<usize>,
}

/// The Hugging Face name of a GGUF tensor, or `None` for names outside the Llama family.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some(tensor_names::EMBED_TOKENS.into()),
        "output_norm.weight" => return Some(tensor_names::FINAL_NORM.into()),
        "output.weight" => return Some(tensor_names::LM_HEAD.into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (index, part) = rest.split_once('.')?;
    let layer: usize = index.parse().ok()?;
    let n = tensor_names::layer(layer);
    Some(match part {
        "attn_norm.weight" => n.input_norm,
        "attn_q.weight" => n.q_proj,
        "attn_k.weight" => n.k_proj,
        "attn_v.weight" => n.v_proj,
        "attn_output.weight" => n.o_proj,
        "attn_q.bias" => n.q_bias,
        "attn_k.bias" => n.k_bias,
        "attn_v.bias" => n.v_bias,
        "attn_output.bias" => n.o_bias,
        "attn_q_norm.weight" => n.q_norm,
        "attn_k_norm.weight" => n.k_norm,
        "ffn_norm.weight" => n.post_attention_norm,
        "ffn_gate.weight" => n.gate_proj,
        "ffn_up.weight" => n.up_proj,
        "ffn_down.weight" => n.down_proj,
        _ => return None,
    })
}

/// Plans the conversion of every weight tensor, in `expected_tensors` order.
pub fn plan_tensors(
    tensors: &[TensorInfo],
    config: &ModelConfig,
) -> Result<Vec<TensorPlan>, NameError> {
    let expected = tensor_names::expected_tensors(config);
    let expected_shapes: HashMap<&str, &Vec<usize>> =
        expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let permuted = config.architecture() == Architecture::Llama
        || config.architecture() == Architecture::Mistral;
    let mut by_hf_name = HashMap::new();
    let mut extra = BTreeSet::new();
    for (gguf_index, info) in tensors.iter().enumerate() {
        if NON_WEIGHT_TENSORS.contains(&info.name.as_str()) {
            continue;
        }
        let hf = hf_name(&info.name).ok_or_else(|| NameError::Unknown(info.name.clone()))?;
        let Some(expected_shape) = expected_shapes.get(hf.as_str()) else {
            extra.insert(format!("{} ({hf})", info.name));
            continue;
        };
        let shape = info.shape();
        if &&shape != expected_shape {
            return Err(NameError::Shape {
                gguf_name: info.name.clone(),
                hf_name: hf,
                found: shape,
                expected: expected_shape.to_vec(),
            });
        }
        let unpermute_heads = if !permuted {
            None
        } else if info.name.contains(".attn_q.") {
            Some(config.num_attention_heads)
        } else if info.name.contains(".attn_k.") {
            Some(config.num_kv_heads())
        } else {
            None
        };
        by_hf_name.insert(
            hf.clone(),
            TensorPlan {
                gguf_index,
                gguf_name: info.name.clone(),
                hf_name: hf,
                shape,
                unpermute_heads,
            },
        );
    }
    if !extra.is_empty() {
        return Err(NameError::Extra(
            extra.into_iter().collect::<Vec<_>>().join(", "),
        ));
    }
    let missing: Vec<&str> = expected
        .iter()
        .filter(|(n, _)| !by_hf_name.contains_key(n))
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(NameError::Missing(summarize(&missing)));
    }
    Ok(expected
        .iter()
        .map(|(n, _)| {
            by_hf_name
                .remove(n)
                .expect("checked above: no expected tensor is missing")
        })
        .collect())
}

fn summarize(names: &[&str]) -> String {
    const SHOWN: usize = 8;
    let mut text = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// Undoes llama.cpp's rotary permutation of the rows of a q/k weight or bias.
///
/// llama.cpp views the rows as `[heads, 2, head_dim / 2]` and swaps the last two axes; within
/// each head GGUF row `2 d + p` is Hugging Face row `p * head_dim / 2 + d`. (transformers'
/// `reverse_permute_weights` when it loads a GGUF does the same.)
pub fn unpermute_rows<T: Copy + Default>(
    name: &str,
    values: &[T],
    rows: usize,
    heads: usize,
) -> Result<Vec<T>, NameError> {
    let error = || NameError::Permutation {
        name: name.to_string(),
        rows,
        heads,
    };
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !values.len().is_multiple_of(rows)
    {
        return Err(error());
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let row_len = values.len() / rows;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for p in 0..2 {
            for d in 0..half {
                let src = (h * head_dim + 2 * d + p) * row_len;
                let dst = (h * head_dim + p * half + d) * row_len;
                out[dst..dst + row_len].copy_from_slice(&values[src..src + row_len]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::types::GgmlType;

    fn info(name: &str, shape: &[u64]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dims: shape.iter().rev().copied().collect(),
            ggml_type: GgmlType::F32,
            offset: 0,
            n_bytes: 0,
        }
    }

    fn tiny_tensors(config: &ModelConfig, with_output: bool) -> Vec<TensorInfo> {
        let (h, f, v) = (
            config.hidden_size as u64,
            config.intermediate_size as u64,
            config.vocab_size as u64,
        );
        let kv = (config.num_kv_heads() * config.head_dim()) as u64;
        let mut t = vec![info("token_embd.weight", &[v, h])];
        for i in 0..config.num_hidden_layers {
            t.push(info(&format!("blk.{i}.attn_norm.weight"), &[h]));
            t.push(info(&format!("blk.{i}.attn_q.weight"), &[h, h]));
            t.push(info(&format!("blk.{i}.attn_k.weight"), &[kv, h]));
            t.push(info(&format!("blk.{i}.attn_v.weight"), &[kv, h]));
            t.push(info(&format!("blk.{i}.attn_output.weight"), &[h, h]));
            t.push(info(&format!("blk.{i}.ffn_norm.weight"), &[h]));
            t.push(info(&format!("blk.{i}.ffn_gate.weight"), &[f, h]));
            t.push(info(&format!("blk.{i}.ffn_up.weight"), &[f, h]));
            t.push(info(&format!("blk.{i}.ffn_down.weight"), &[h, f]));
        }
        t.push(info("output_norm.weight", &[h]));
        if with_output {
            t.push(info("output.weight", &[v, h]));
        }
        t
    }

    #[test]
    fn plans_every_tensor_in_expected_order() {
        let mut config = ModelConfig::llama(8, 16, 2, 2, 1, 10);
        let tensors = tiny_tensors(&config, true);
        let plan = plan_tensors(&tensors, &config).unwrap();
        let names: Vec<_> = plan.iter().map(|p| p.hf_name.clone()).collect();
        let expected: Vec<_> = tensor_names::expected_tensors(&config)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, expected);
        let q = plan
            .iter()
            .find(|p| p.gguf_name == "blk.1.attn_q.weight")
            .unwrap();
        assert_eq!(q.unpermute_heads, Some(2));
        let k = plan
            .iter()
            .find(|p| p.gguf_name == "blk.1.attn_k.weight")
            .unwrap();
        assert_eq!((k.unpermute_heads, k.shape.clone()), (Some(1), vec![4, 8]));

        config.architectures = vec!["Qwen2ForCausalLM".into()];
        config.model_type = "qwen2".into();
        let mut tensors = tiny_tensors(&config, true);
        for i in 0..2 {
            tensors.push(info(&format!("blk.{i}.attn_q.bias"), &[8]));
            tensors.push(info(&format!("blk.{i}.attn_k.bias"), &[4]));
            tensors.push(info(&format!("blk.{i}.attn_v.bias"), &[4]));
        }
        let plan = plan_tensors(&tensors, &config).unwrap();
        assert!(plan.iter().all(|p| p.unpermute_heads.is_none()));
        assert!(plan.iter().any(|p| p.hf_name.ends_with("k_proj.bias")));

        // Qwen3: no biases, each layer's q and k head norms, nothing permuted.
        config.architectures = vec!["Qwen3ForCausalLM".into()];
        config.model_type = "qwen3".into();
        let mut tensors = tiny_tensors(&config, true);
        let head_dim = config.head_dim() as u64;
        for i in 0..2 {
            tensors.push(info(&format!("blk.{i}.attn_q_norm.weight"), &[head_dim]));
            tensors.push(info(&format!("blk.{i}.attn_k_norm.weight"), &[head_dim]));
        }
        let plan = plan_tensors(&tensors, &config).unwrap();
        assert!(plan.iter().all(|p| p.unpermute_heads.is_none()));
        let names: Vec<_> = plan.iter().map(|p| p.hf_name.as_str()).collect();
        assert!(
            names.contains(&"model.layers.1.self_attn.q_norm.weight"),
            "{names:?}"
        );
        assert!(
            names.contains(&"model.layers.0.self_attn.k_norm.weight"),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.ends_with(".bias")), "{names:?}");
        // A Qwen3 GGUF without them is refused, naming what is missing.
        let err = plan_tensors(&tiny_tensors(&config, true), &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("q_norm"), "{err}");
    }

    #[test]
    fn missing_extra_unknown_and_misshapen_tensors_are_named() {
        let config = ModelConfig::llama(8, 16, 2, 2, 1, 10);
        let mut tensors = tiny_tensors(&config, true);
        tensors.retain(|t| t.name != "blk.1.ffn_up.weight");
        let err = plan_tensors(&tensors, &config).unwrap_err().to_string();
        assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

        let mut tensors = tiny_tensors(&config, true);
        tensors.push(info("blk.2.ffn_up.weight", &[16, 8]));
        let err = plan_tensors(&tensors, &config).unwrap_err().to_string();
        assert!(err.contains("blk.2.ffn_up.weight"), "{err}");

        let mut tensors = tiny_tensors(&config, true);
        tensors.push(info("blk.0.ssm_a", &[4]));
        let err = plan_tensors(&tensors, &config).unwrap_err().to_string();
        assert!(err.contains("blk.0.ssm_a"), "{err}");

        let mut tensors = tiny_tensors(&config, true);
        tensors[1] = info("blk.0.attn_norm.weight", &[9]);
        let err = plan_tensors(&tensors, &config).unwrap_err().to_string();
        assert!(err.contains("[9]") && err.contains("[8]"), "{err}");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(heads, 2, half, cols).swapaxes(1, 2): GGUF row h*hd + 2d + p holds
        // HF row h*hd + p*half + d.
        let (heads, head_dim, cols) = (3, 4, 2);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for d in 0..head_dim / 2 {
                for p in 0..2 {
                    let g = h * head_dim + 2 * d + p;
                    let o = h * head_dim + p * head_dim / 2 + d;
                    gguf[g * cols..(g + 1) * cols].copy_from_slice(&hf[o * cols..(o + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows("q", &gguf, rows, heads).unwrap(), hf);
        assert!(unpermute_rows("q", &gguf, rows, 5).is_err());
    }
}
