//! PEFT's LoRA adapter format, as tandem reads and writes it: `adapter_config.json` (the fields
//! that change the arithmetic) and the tensor names of `adapter_model.safetensors`.
//!
//! An adapter adds `scale * B (A x)` to the output of each projection it targets: `A` is
//! `[r, in]`, `B` is `[out, r]`, and `scale` is `lora_alpha / r` (`lora_alpha / sqrt(r)` with
//! rsLoRA). The workers serve adapters beside the model (`worker --lora-modules`); `model-prep
//! lora merge` folds one into a copy of the model.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ModelConfig;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of `adapter_config.json` that change the arithmetic; the others
/// (`base_model_name_or_path`, `task_type`, `lora_dropout`, `init_lora_weights`, ...) do not.
/// (`rank_pattern` needs nothing: a module's rank is its tensors', and scales it.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
}

impl AdapterConfig {
    /// Refuses what tandem does not compute (each a PEFT option that changes the output),
    /// naming the field.
    pub fn check(&self) -> Result<(), String> {
        if let Some(kind) = self.peft_type.as_deref().filter(|k| *k != "LORA") {
            return Err(format!("peft_type {kind}: only LORA adapters are served"));
        }
        if self.r == 0 {
            return Err("r is 0".into());
        }
        if !self.lora_alpha.is_finite() {
            return Err(format!("lora_alpha {} is not a number", self.lora_alpha));
        }
        if self.use_dora {
            return Err("use_dora: DoRA adapters are not served".into());
        }
        if self.fan_in_fan_out {
            return Err("fan_in_fan_out: transposed (Conv1D) adapters are not served".into());
        }
        if let Some(bias) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(format!(
                "bias `{bias}`: adapters that train biases are not served"
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(
                "modules_to_save: adapters that replace whole modules are not served".into(),
            );
        }
        if !self.alpha_pattern.is_empty() {
            return Err("alpha_pattern: per-module alphas are not served".into());
        }
        Ok(())
    }

    /// The factor of `B A` for a module of rank `r` (PEFT's `scaling`).
    pub fn scale(&self, r: usize) -> f32 {
        let r = r as f64;
        (if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }) as f32
    }
}

/// The projections of a decoder layer an adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module's name inside a layer (`self_attn.q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// The short name PEFT's `target_modules` lists (`q_proj`).
    pub fn short_name(self) -> &'static str {
        self.module()
            .rsplit_once('.')
            .map_or(self.module(), |(_, m)| m)
    }

    fn parse(module: &str) -> Option<Self> {
        Target::ALL.into_iter().find(|t| t.module() == module)
    }

    /// `[out, in]` of the base projection.
    pub fn shape(self, config: &ModelConfig) -> (usize, usize) {
        let d = config.head_dim();
        let (hidden, ffn) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (config.num_attention_heads * d, config.num_kv_heads() * d);
        match self {
            Target::Q => (q, hidden),
            Target::K | Target::V => (kv, hidden),
            Target::O => (hidden, q),
            Target::Gate | Target::Up => (ffn, hidden),
            Target::Down => (hidden, ffn),
        }
    }
}

/// Which factor of a module a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Factor {
    A,
    B,
}

/// The PEFT name of layer `layer`'s `factor` of `target`, as PEFT saves a causal LM's
/// adapter.
pub fn tensor_name(layer: usize, target: Target, factor: Factor) -> String {
    let f = match factor {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    };
    format!(
        "base_model.model.model.layers.{layer}.{}.{f}.weight",
        target.module()
    )
}

/// `(layer, projection, factor)` of a PEFT tensor name:
/// `base_model.model.[model.]layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.default].weight`
/// (a base model's adapter, such as an embedding model's, has no `model.`). Anything else
/// (embeddings, lm_head, DoRA magnitudes, other modules) is an error naming the tensor.
pub fn parse_tensor_name(name: &str, num_layers: usize) -> Result<(usize, Target, Factor), String> {
    let unserved = |why: &str| Err(format!("tensor {name}: {why}"));
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    let Some(rest) = rest.strip_prefix("layers.") else {
        return unserved(
            "only the decoder layers' projections take adapters here (not the embeddings or \
             lm_head)",
        );
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return unserved("no layer index");
    };
    let layer: usize = layer
        .parse()
        .map_err(|_| format!("tensor {name}: `{layer}` is no layer index"))?;
    if layer >= num_layers {
        return unserved(&format!("layer {layer} of a model of {num_layers}"));
    }
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module, factor) = if let Some(m) = rest.strip_suffix(".lora_A") {
        (m, Factor::A)
    } else if let Some(m) = rest.strip_suffix(".lora_B") {
        (m, Factor::B)
    } else if rest.ends_with("lora_magnitude_vector") {
        return unserved("a DoRA magnitude: DoRA adapters are not served");
    } else {
        return unserved("neither a lora_A nor a lora_B weight");
    };
    let target = Target::parse(module).ok_or_else(|| {
        format!(
            "tensor {name}: module `{module}` is none of the projections q/k/v/o_proj, \
             gate/up/down_proj"
        )
    })?;
    Ok((layer, target, factor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_map_to_layers_and_projections() {
        assert_eq!(
            parse_tensor_name(
                "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
                4
            ),
            Ok((3, Target::Q, Factor::A))
        );
        assert_eq!(
            parse_tensor_name("base_model.model.layers.0.mlp.down_proj.lora_B.weight", 4),
            Ok((0, Target::Down, Factor::B))
        );
        assert_eq!(
            parse_tensor_name(
                "base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight",
                4
            ),
            Ok((1, Target::Up, Factor::A))
        );
        for t in Target::ALL {
            for f in [Factor::A, Factor::B] {
                assert_eq!(parse_tensor_name(&tensor_name(2, t, f), 4), Ok((2, t, f)));
            }
        }
        for (bad, says) in [
            (
                "base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight",
                "layer 4",
            ),
            (
                "base_model.model.model.embed_tokens.lora_embedding_A",
                "embeddings",
            ),
            ("base_model.model.lm_head.lora_A.weight", "lm_head"),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                "DoRA",
            ),
            (
                "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight",
                "qkv_proj",
            ),
        ] {
            let err = parse_tensor_name(bad, 4).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn options_that_change_the_output_are_refused_by_name() {
        let parse = |json: &str| serde_json::from_str::<AdapterConfig>(json).unwrap();
        assert!(parse(r#"{"r": 8, "lora_alpha": 16}"#).check().is_ok());
        for (json, says) in [
            (
                r#"{"r": 8, "lora_alpha": 16, "use_dora": true}"#,
                "use_dora",
            ),
            (r#"{"r": 8, "lora_alpha": 16, "bias": "all"}"#, "bias"),
            (
                r#"{"r": 8, "lora_alpha": 16, "fan_in_fan_out": true}"#,
                "fan_in_fan_out",
            ),
            (
                r#"{"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head"]}"#,
                "modules_to_save",
            ),
            (
                r#"{"r": 8, "lora_alpha": 16, "alpha_pattern": {"q_proj": 4}}"#,
                "alpha_pattern",
            ),
            (r#"{"r": 8, "lora_alpha": 16, "peft_type": "IA3"}"#, "IA3"),
            (r#"{"r": 0, "lora_alpha": 16}"#, "r is 0"),
        ] {
            let err = parse(json).check().unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
        let plain = parse(r#"{"r": 16, "lora_alpha": 32}"#);
        assert_eq!(plain.scale(16), 2.0);
        let rs = parse(r#"{"r": 16, "lora_alpha": 32, "use_rslora": true}"#);
        assert_eq!(rs.scale(16), 8.0);
        assert_eq!(Target::Gate.short_name(), "gate_proj");
    }
}
