//! LoRA adapters served beside the base model: PEFT's format (`adapter_config.json` and
//! `adapter_model.safetensors`), each adapter a name a request asks for as its `model`.
//!
//! An adapter adds `scale * B (A x)` to the output of the projections it targets (`A` is
//! `[r, in]`, `B` is `[out, r]`, `scale` is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
//! rsLoRA). The base model fuses q/k/v and gate/up into one matrix each, so an adapter's parts
//! of one fused projection are fused the same way at load: their `A`s stacked into one
//! `[r_q + r_k + r_v, in]`, their `B`s (scaled) placed block-diagonally into one
//! `[out_q + out_k + out_v, r_q + r_k + r_v]`, so one pair of small products per fused
//! projection covers them all. Modules the adapter does not target contribute nothing.
//!
//! In a forward, the rows of the sequences that ask for one adapter are gathered, pass through
//! its two products, and are added to the projection's output rows before anything reads
//! them ([`crate::backend::Backend::add_rows`]); other rows are computed exactly as without
//! adapters. The base weights are never changed, so one worker serves the base model and
//! every adapter in the same batch.
//!
//! What differs from a merged model (`W + scale * B A` in one matrix) is the summation order
//! only; the K/V an adapter's request computes differ from the base model's, so each adapter
//! has a fingerprint of its own ([`Adapter::fingerprint`]): the prefix cache's namespace and
//! the KV handle's model for its requests.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tandem_model::ModelConfig;

use crate::backend::{Backend, HostTensor, WeightDType};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

pub use tandem_protocol::config::LoraModule;

/// Why an adapter was not loaded.
#[derive(Debug, thiserror::Error)]
#[error("LoRA adapter `{adapter}` ({path}): {reason}")]
pub struct LoraError {
    pub adapter: String,
    pub path: PathBuf,
    pub reason: String,
}

/// The fields of PEFT's `adapter_config.json` that change the arithmetic; the others
/// (`base_model_name_or_path`, `task_type`, `lora_dropout`, `init_lora_weights`, ...) do not.
#[derive(Debug, Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    /// (`rank_pattern` needs nothing: each module's rank is its tensors' and scales it.)
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
}

impl AdapterConfig {
    /// Refuses what this module does not compute (each a PEFT option that changes the
    /// output), naming the field.
    fn check(&self) -> Result<(), String> {
        if let Some(kind) = self.peft_type.as_deref().filter(|k| *k != "LORA") {
            return Err(format!("peft_type {kind}: only LORA adapters are served"));
        }
        if self.r == 0 {
            return Err("r is 0".into());
        }
        if !(self.lora_alpha.is_finite()) {
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
    fn scale(&self, r: usize) -> f32 {
        let r = r as f64;
        (if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }) as f32
    }
}

/// The projections an adapter may target, in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    fn parse(module: &str) -> Option<Self> {
        Some(match module {
            "self_attn.q_proj" => Target::Q,
            "self_attn.k_proj" => Target::K,
            "self_attn.v_proj" => Target::V,
            "self_attn.o_proj" => Target::O,
            "mlp.gate_proj" => Target::Gate,
            "mlp.up_proj" => Target::Up,
            "mlp.down_proj" => Target::Down,
            _ => return None,
        })
    }

    /// `[out, in]` of the base projection.
    fn shape(self, config: &ModelConfig) -> (usize, usize) {
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

/// One module's factors as f32: `a` is `[r, in]`, `b` is `[out, r]` times the scale.
struct HostFactors {
    r: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

/// The two products of one (fused) projection: `a` `[r, in]`, `b` `[out, r]` (scaled).
pub struct LoraPair<W> {
    pub a: W,
    pub b: W,
}

/// An adapter's pairs in one layer, by the base model's fused projections.
pub struct LayerLora<W> {
    pub qkv: Option<LoraPair<W>>,
    pub o_proj: Option<LoraPair<W>>,
    pub gate_up: Option<LoraPair<W>>,
    pub down: Option<LoraPair<W>>,
}

/// A loaded adapter.
pub struct Adapter<B: Backend> {
    pub name: String,
    /// The model a request for this adapter computes with: the base model's fingerprint and
    /// the adapter's bytes hashed together (32 hex digits, as a model fingerprint). It names
    /// the prefix cache's blocks of such requests and the KV handles they are exported under.
    pub fingerprint: String,
    /// The adapter's rank (the largest of its modules').
    pub rank: usize,
    /// Projections it changes, of the layers' seven.
    pub modules: usize,
    pub layers: Vec<LayerLora<B::Weight>>,
}

impl<B: Backend> std::fmt::Debug for Adapter<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .field("rank", &self.rank)
            .field("modules", &self.modules)
            .finish()
    }
}

/// Loads `module`'s adapter for a model of `config` whose fingerprint is `base_fingerprint`,
/// and uploads its fused factors to `backend`.
pub fn load<B: Backend>(
    module: &LoraModule,
    config: &ModelConfig,
    base_fingerprint: &str,
    backend: &B,
) -> Result<Adapter<B>, LoraError> {
    let fail = |reason: String| LoraError {
        adapter: module.name.clone(),
        path: module.path.clone(),
        reason,
    };
    let config_path = module.path.join(ADAPTER_CONFIG_FILE);
    let config_bytes = std::fs::read(&config_path)
        .map_err(|e| fail(format!("reading {ADAPTER_CONFIG_FILE}: {e}")))?;
    let adapter_config: AdapterConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| fail(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;
    adapter_config
        .check()
        .map_err(|e| fail(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;
    let weights_path = module.path.join(ADAPTER_WEIGHTS_FILE);
    let weights = std::fs::read(&weights_path)
        .map_err(|e| fail(format!("reading {ADAPTER_WEIGHTS_FILE}: {e}")))?;
    let tensors = SafeTensors::deserialize(&weights)
        .map_err(|e| fail(format!("{ADAPTER_WEIGHTS_FILE}: {e}")))?;
    let modules = read_modules(&tensors, config, &adapter_config).map_err(fail)?;
    if modules.is_empty() {
        return Err(fail(format!(
            "{ADAPTER_WEIGHTS_FILE} holds no lora_A/lora_B pair"
        )));
    }
    let mut hash = Sha256::new();
    hash.update(b"tandem-lora\0");
    hash.update(base_fingerprint.as_bytes());
    hash.update(b"\0");
    hash.update((config_bytes.len() as u64).to_le_bytes());
    hash.update(&config_bytes);
    hash.update(&weights);
    let digest = hash.finalize();
    let fingerprint: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();

    let rank = modules.values().map(|f| f.r).max().unwrap_or(0);
    let count = modules.len();
    let upload = |r: usize, cols: usize, data: &[f32]| {
        let shape = [r, cols];
        let bytes: &[u8] = bytemuck_f32(data);
        backend
            .upload_weight(&[HostTensor::new(WeightDType::F32, &shape, bytes)])
            .map_err(|e| fail(format!("uploading: {e}")))
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        let fuse = |targets: &[Target]| -> Result<Option<LoraPair<B::Weight>>, LoraError> {
            let parts: Vec<(usize, usize, Option<&HostFactors>)> = targets
                .iter()
                .map(|&t| {
                    let (out, inp) = t.shape(config);
                    (out, inp, modules.get(&(layer, t)))
                })
                .collect();
            let Some(fused) = fuse_parts(&parts) else {
                return Ok(None);
            };
            Ok(Some(LoraPair {
                a: upload(fused.r, fused.cols, &fused.a)?,
                b: upload(fused.out, fused.r, &fused.b)?,
            }))
        };
        layers.push(LayerLora {
            qkv: fuse(&[Target::Q, Target::K, Target::V])?,
            o_proj: fuse(&[Target::O])?,
            gate_up: fuse(&[Target::Gate, Target::Up])?,
            down: fuse(&[Target::Down])?,
        });
    }
    Ok(Adapter {
        name: module.name.clone(),
        fingerprint,
        rank,
        modules: count,
        layers,
    })
}

/// The f32 values' bytes (little-endian, as the backends read host tensors).
fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the slice covers exactly
    // the vector's bytes.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// Every `lora_A`/`lora_B` pair of the file, by (layer, projection), checked against the base
/// model's shapes, as f32 with `B` scaled.
fn read_modules(
    tensors: &SafeTensors<'_>,
    config: &ModelConfig,
    adapter: &AdapterConfig,
) -> Result<HashMap<(usize, Target), HostFactors>, String> {
    let mut halves: HashMap<(usize, Target), (Option<Vec<usize>>, Option<Vec<usize>>)> =
        HashMap::new();
    let mut names: HashMap<(usize, Target, bool), String> = HashMap::new();
    for (name, view) in tensors.iter() {
        let (layer, target, is_a) = parse_name(&name, config.num_hidden_layers)?;
        let entry = halves.entry((layer, target)).or_default();
        let shape = view.shape().to_vec();
        if is_a {
            entry.0 = Some(shape);
        } else {
            entry.1 = Some(shape);
        }
        names.insert((layer, target, is_a), name.to_string());
    }
    let mut out = HashMap::new();
    for ((layer, target), (a_shape, b_shape)) in halves {
        let (Some(a_shape), Some(b_shape)) = (a_shape, b_shape) else {
            return Err(format!(
                "layer {layer}'s {target:?} projection has only one of lora_A and lora_B"
            ));
        };
        let (out_rows, in_cols) = target.shape(config);
        let a_name = &names[&(layer, target, true)];
        let b_name = &names[&(layer, target, false)];
        let r = match a_shape[..] {
            [r, cols] if cols == in_cols && r > 0 => r,
            _ => {
                return Err(format!(
                    "{a_name} has shape {a_shape:?}, the model's projection takes {in_cols} \
                     inputs ([r, {in_cols}] expected)"
                ));
            }
        };
        if b_shape[..] != [out_rows, r] {
            return Err(format!(
                "{b_name} has shape {b_shape:?}, [{out_rows}, {r}] expected (the projection's \
                 outputs by the rank of {a_name})"
            ));
        }
        let a = values(tensors, a_name)?;
        let mut b = values(tensors, b_name)?;
        let scale = adapter.scale(r);
        for v in &mut b {
            *v *= scale;
        }
        out.insert((layer, target), HostFactors { r, a, b });
    }
    Ok(out)
}

/// `(layer, projection, is lora_A)` of a PEFT tensor name:
/// `base_model.model.[model.]layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.default].weight`.
fn parse_name(name: &str, num_layers: usize) -> Result<(usize, Target, bool), String> {
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
    let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A") {
        (m, true)
    } else if let Some(m) = rest.strip_suffix(".lora_B") {
        (m, false)
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
    Ok((layer, target, is_a))
}

/// A tensor's values as f32 (from F32, BF16 or F16).
fn values(tensors: &SafeTensors<'_>, name: &str) -> Result<Vec<f32>, String> {
    let view = tensors
        .tensor(name)
        .map_err(|e| format!("tensor {name}: {e}"))?;
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "tensor {name} has dtype {other:?}; F32, BF16 or F16 expected"
            ));
        }
    })
}

/// One fused projection's factors: `a` `[r, cols]`, `b` `[out, r]`.
struct Fused {
    r: usize,
    cols: usize,
    out: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

/// The parts `(out, in, factors)` of a fused projection as one pair: the `A`s stacked, the
/// `B`s block-diagonal (a part without factors has zero rows of `B`). `None` when no part has
/// factors.
fn fuse_parts(parts: &[(usize, usize, Option<&HostFactors>)]) -> Option<Fused> {
    let r: usize = parts.iter().filter_map(|p| p.2).map(|f| f.r).sum();
    if r == 0 {
        return None;
    }
    let cols = parts[0].1;
    let out: usize = parts.iter().map(|p| p.0).sum();
    let mut a = Vec::with_capacity(r * cols);
    let mut b = vec![0f32; out * r];
    let (mut row0, mut col0) = (0, 0);
    for &(rows, _, factors) in parts {
        if let Some(f) = factors {
            a.extend_from_slice(&f.a);
            for i in 0..rows {
                let dst = (row0 + i) * r + col0;
                b[dst..dst + f.r].copy_from_slice(&f.b[i * f.r..(i + 1) * f.r]);
            }
            col0 += f.r;
        }
        row0 += rows;
    }
    Some(Fused { r, cols, out, a, b })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_map_to_layers_and_projections() {
        assert_eq!(
            parse_name(
                "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
                4
            ),
            Ok((3, Target::Q, true))
        );
        assert_eq!(
            parse_name("base_model.model.layers.0.mlp.down_proj.lora_B.weight", 4),
            Ok((0, Target::Down, false))
        );
        assert_eq!(
            parse_name(
                "base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight",
                4
            ),
            Ok((1, Target::Up, true))
        );
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
            let err = parse_name(bad, 4).unwrap_err();
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
    }

    #[test]
    fn fused_parts_stack_a_and_place_b_on_the_diagonal() {
        // q: out 2, r 1; k: untargeted, out 1; v: out 1, r 2. in = 2.
        let q = HostFactors {
            r: 1,
            a: vec![1., 2.],
            b: vec![3., 4.],
        };
        let v = HostFactors {
            r: 2,
            a: vec![5., 6., 7., 8.],
            b: vec![9., 10.],
        };
        let fused = fuse_parts(&[(2, 2, Some(&q)), (1, 2, None), (1, 2, Some(&v))]).unwrap();
        assert_eq!((fused.r, fused.cols, fused.out), (3, 2, 4));
        assert_eq!(fused.a, vec![1., 2., 5., 6., 7., 8.]);
        #[rustfmt::skip]
        assert_eq!(fused.b, vec![
            3., 0., 0.,
            4., 0., 0.,
            0., 0., 0.,
            0., 9., 10.,
        ]);
        assert!(fuse_parts(&[(2, 2, None), (1, 2, None)]).is_none());
    }
}
