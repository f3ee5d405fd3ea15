//! FP8 checkpoints: what `config.json`'s `quantization_config` says about a checkpoint's FP8
//! weights, in the formats peers publish, read into one [`Fp8Scheme`].
//!
//! A quantized projection is stored as `<module>.weight` in FP8 e4m3 with `<module>.weight_scale`
//! beside it (one f32 for the tensor, or one per output row), and, where activations have a
//! static scale, `<module>.input_scale` (one f32). A weight's value is its stored value times
//! its scale. The formats differ only in how the config describes this:
//! - ModelOpt (`"quant_method": "modelopt"`, NVIDIA's `nvidia/*-FP8` checkpoints): per-tensor
//!   weight scales and static per-tensor activation scales; `exclude_modules` stay 16-bit.
//! - compressed-tensors (`"quant_method": "compressed-tensors"`, llm-compressor's
//!   `RedHatAI/*-FP8*` checkpoints, and what `model-prep quantize` writes): a config group of
//!   8-bit float weights (`strategy` `tensor` or `channel`) and input activations (`tensor`
//!   static or `token` dynamic, or none: weight-only); `ignore` stays 16-bit.
//! - `"quant_method": "fp8"` (vLLM's and transformers' own): per-tensor weight scales,
//!   `activation_scheme` `static` or `dynamic`.
//! - `"quant_method": "fbgemm_fp8"` (Meta's Llama 3.1 405B FP8): per-channel weight scales,
//!   dynamic per-token activations.
//!
//! Block-wise scales (`weight_block_size`, DeepSeek-style) and other bit widths are refused
//! by name. What is actually quantized is read from the tensors themselves (an FP8 weight has
//! its scale beside it); the scheme decides how activations are quantized before an FP8
//! product.

use serde_json::{Value, json};

/// How a checkpoint's FP8 projections quantize their input activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationScheme {
    /// Each token's row is scaled by its own largest magnitude when it is quantized.
    DynamicPerToken,
    /// One scale per projection, stored as `<module>.input_scale`.
    StaticPerTensor,
    /// Activations are not quantized: the weights are dequantized into a 16-bit product.
    None,
}

/// Scale granularity of FP8 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightScales {
    /// One `weight_scale` for the tensor.
    PerTensor,
    /// One `weight_scale` per output row (`[out]` or `[out, 1]`).
    PerChannel,
}

/// The FP8 quantization a checkpoint declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8Scheme {
    /// The `quant_method` as written.
    pub method: String,
    pub weights: WeightScales,
    pub activations: ActivationScheme,
    /// Modules kept in 16 bits (`lm_head` in most checkpoints).
    pub ignored: Vec<String>,
    /// Whether the checkpoint carries scales for an FP8 KV cache (`k_scale`/`v_scale`).
    pub kv_cache_scales: bool,
}

impl Fp8Scheme {
    /// Reads a `quantization_config` object; `Err` names the field that is not supported.
    pub fn from_config(config: &Value) -> Result<Self, String> {
        let method = config
            .get("quant_method")
            .and_then(Value::as_str)
            .ok_or("`quant_method` is missing")?;
        let strings = |key: &str| -> Vec<String> {
            config
                .get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        if config
            .get("weight_block_size")
            .is_some_and(|v| !v.is_null())
        {
            return Err(
                "`weight_block_size`: block-wise FP8 scales are not supported \
                        (per-tensor and per-channel are)"
                    .into(),
            );
        }
        let scheme = match method {
            "modelopt" => {
                // transformers keeps ModelOpt's own `quantization` object in some versions.
                let inner = config.get("quantization").unwrap_or(config);
                let algo = inner.get("quant_algo").and_then(Value::as_str);
                if algo != Some("FP8") {
                    return Err(format!(
                        "`quant_algo` {algo:?}: only ModelOpt's \"FP8\" is supported"
                    ));
                }
                let kv = inner.get("kv_cache_quant_algo").and_then(Value::as_str);
                Fp8Scheme {
                    method: method.into(),
                    weights: WeightScales::PerTensor,
                    activations: ActivationScheme::StaticPerTensor,
                    ignored: inner
                        .get("exclude_modules")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default(),
                    kv_cache_scales: kv == Some("FP8"),
                }
            }
            "fp8" => {
                let activations = match config.get("activation_scheme").and_then(Value::as_str) {
                    Some("static") => ActivationScheme::StaticPerTensor,
                    Some("dynamic") | None => ActivationScheme::DynamicPerToken,
                    Some(other) => {
                        return Err(format!("`activation_scheme` {other:?} is not supported"));
                    }
                };
                Fp8Scheme {
                    method: method.into(),
                    weights: WeightScales::PerTensor,
                    activations,
                    ignored: strings("ignored_layers"),
                    kv_cache_scales: false,
                }
            }
            "fbgemm_fp8" => Fp8Scheme {
                method: method.into(),
                weights: WeightScales::PerChannel,
                activations: ActivationScheme::DynamicPerToken,
                ignored: strings("modules_to_not_convert"),
                kv_cache_scales: false,
            },
            "compressed-tensors" => Self::compressed_tensors(config)?,
            other => {
                return Err(format!(
                    "`quant_method` {other:?} is not supported (FP8 checkpoints of modelopt, \
                     compressed-tensors, fp8 and fbgemm_fp8 are)"
                ));
            }
        };
        Ok(scheme)
    }

    fn compressed_tensors(config: &Value) -> Result<Self, String> {
        let format = config.get("format").and_then(Value::as_str);
        if !matches!(format, Some("float-quantized" | "naive-quantized") | None) {
            return Err(format!(
                "`format` {format:?}: only float-quantized (or naive-quantized) FP8 is supported"
            ));
        }
        let groups = config
            .get("config_groups")
            .and_then(Value::as_object)
            .ok_or("`config_groups` is missing")?;
        let [(name, group)] = groups.iter().collect::<Vec<_>>()[..] else {
            return Err(format!(
                "`config_groups`: {} groups; one group of FP8 linear layers is supported",
                groups.len()
            ));
        };
        let float8 = |args: &Value, what: &str| -> Result<(), String> {
            let bits = args.get("num_bits").and_then(Value::as_u64);
            let kind = args.get("type").and_then(Value::as_str);
            if bits != Some(8) || kind != Some("float") {
                return Err(format!(
                    "`config_groups.{name}.{what}`: {bits:?}-bit {kind:?}; only 8-bit float is \
                     supported"
                ));
            }
            if args.get("symmetric").and_then(Value::as_bool) == Some(false) {
                return Err(format!(
                    "`config_groups.{name}.{what}.symmetric`: asymmetric FP8 is not supported"
                ));
            }
            Ok(())
        };
        let weights = group
            .get("weights")
            .ok_or_else(|| format!("`config_groups.{name}.weights` is missing"))?;
        float8(weights, "weights")?;
        let weights = match weights.get("strategy").and_then(Value::as_str) {
            Some("tensor") => WeightScales::PerTensor,
            Some("channel") => WeightScales::PerChannel,
            other => {
                return Err(format!(
                    "`config_groups.{name}.weights.strategy` {other:?}: tensor or channel \
                     scales are supported"
                ));
            }
        };
        let activations = match group.get("input_activations") {
            None | Some(Value::Null) => ActivationScheme::None,
            Some(args) => {
                float8(args, "input_activations")?;
                let dynamic = args
                    .get("dynamic")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                match (args.get("strategy").and_then(Value::as_str), dynamic) {
                    (Some("token"), true) => ActivationScheme::DynamicPerToken,
                    (Some("tensor"), false) => ActivationScheme::StaticPerTensor,
                    // A dynamic per-tensor scale is at most as fine as a per-token one.
                    (Some("tensor"), true) => ActivationScheme::DynamicPerToken,
                    (strategy, dynamic) => {
                        return Err(format!(
                            "`config_groups.{name}.input_activations`: strategy {strategy:?} \
                             with dynamic {dynamic} is not supported"
                        ));
                    }
                }
            }
        };
        let kv_cache_scales = config.get("kv_cache_scheme").is_some_and(|v| !v.is_null());
        let ignored = config
            .get("ignore")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Fp8Scheme {
            method: "compressed-tensors".into(),
            weights,
            activations,
            ignored,
            kv_cache_scales,
        })
    }

    /// The `quantization_config` `model-prep quantize` writes: compressed-tensors, FP8 weights
    /// with per-channel scales and dynamic per-token activations, `lm_head` kept in 16 bits,
    /// the form vLLM and SGLang load as well.
    pub fn compressed_tensors_config(weights: WeightScales, ignored: &[String]) -> Value {
        let strategy = match weights {
            WeightScales::PerTensor => "tensor",
            WeightScales::PerChannel => "channel",
        };
        json!({
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8, "type": "float", "strategy": strategy,
                        "symmetric": true, "dynamic": false
                    },
                    "input_activations": {
                        "num_bits": 8, "type": "float", "strategy": "token",
                        "symmetric": true, "dynamic": true
                    }
                }
            },
            "ignore": ignored,
            "kv_cache_scheme": null
        })
    }
}

/// `<module>.weight_scale`: the scale of `<module>.weight`.
pub const WEIGHT_SCALE_SUFFIX: &str = ".weight_scale";
/// `<module>.input_scale`: the static activation scale of `<module>`.
pub const INPUT_SCALE_SUFFIX: &str = ".input_scale";

/// The KV cache scales a checkpoint may carry (`self_attn.k_scale`, ModelOpt's
/// `self_attn.k_proj.k_scale`, and the `v` ones): read by an FP8 KV cache, not by the weights.
pub fn is_kv_cache_scale(name: &str) -> bool {
    name.ends_with(".k_scale") || name.ends_with(".v_scale")
}

/// The weight a scale tensor belongs to (`x.weight_scale` and `x.input_scale` -> `x.weight`).
pub fn scaled_weight(scale_name: &str) -> Option<String> {
    [WEIGHT_SCALE_SUFFIX, INPUT_SCALE_SUFFIX]
        .iter()
        .find_map(|suffix| scale_name.strip_suffix(suffix))
        .map(|module| format!("{module}.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_formats_peers_publish() {
        let modelopt = json!({"quant_method": "modelopt", "quant_algo": "FP8",
                              "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]});
        let s = Fp8Scheme::from_config(&modelopt).unwrap();
        assert_eq!(s.weights, WeightScales::PerTensor);
        assert_eq!(s.activations, ActivationScheme::StaticPerTensor);
        assert_eq!(s.ignored, vec!["lm_head".to_string()]);
        assert!(s.kv_cache_scales);

        let ours = Fp8Scheme::compressed_tensors_config(
            WeightScales::PerChannel,
            &["lm_head".to_string()],
        );
        let s = Fp8Scheme::from_config(&ours).unwrap();
        assert_eq!(s.weights, WeightScales::PerChannel);
        assert_eq!(s.activations, ActivationScheme::DynamicPerToken);
        assert!(!s.kv_cache_scales);

        let mut static_tensor = ours.clone();
        static_tensor["config_groups"]["group_0"]["input_activations"] =
            json!({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": false});
        static_tensor["config_groups"]["group_0"]["weights"]["strategy"] = json!("tensor");
        let s = Fp8Scheme::from_config(&static_tensor).unwrap();
        assert_eq!(
            (s.weights, s.activations),
            (WeightScales::PerTensor, ActivationScheme::StaticPerTensor)
        );

        let fbgemm = json!({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"]});
        let s = Fp8Scheme::from_config(&fbgemm).unwrap();
        assert_eq!(
            (s.weights, s.activations),
            (WeightScales::PerChannel, ActivationScheme::DynamicPerToken)
        );
    }

    #[test]
    fn refuses_what_it_cannot_run_by_name() {
        let err = |v: Value| Fp8Scheme::from_config(&v).unwrap_err();
        assert!(err(json!({"quant_method": "awq"})).contains("awq"));
        assert!(
            err(json!({"quant_method": "fp8", "weight_block_size": [128, 128]}))
                .contains("weight_block_size")
        );
        assert!(err(json!({"quant_method": "modelopt", "quant_algo": "NVFP4"})).contains("NVFP4"));
        let mut int8 = Fp8Scheme::compressed_tensors_config(WeightScales::PerChannel, &[]);
        int8["config_groups"]["group_0"]["weights"]["type"] = json!("int");
        assert!(err(int8).contains("weights"));
    }

    #[test]
    fn scales_name_their_weight() {
        assert_eq!(
            scaled_weight("model.layers.0.mlp.down_proj.weight_scale").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            scaled_weight("model.layers.0.mlp.down_proj.input_scale").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(scaled_weight("model.norm.weight"), None);
        assert!(is_kv_cache_scale("model.layers.3.self_attn.k_proj.k_scale"));
        assert!(is_kv_cache_scale("model.layers.3.self_attn.v_scale"));
    }
}
