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
//! every adapter in the same batch. A backend with a pass over every adapter at once
//! ([`crate::backend::Backend::add_lora_stacked`], the CUDA backend's for up to 512 rows of
//! sequences that compute one token) gets each projection's pairs of all adapters stacked
//! ([`stack`]) and reads each row's adapter from the step's data, so decode steps with adapter
//! rows are CUDA graphs too; prompts' rows still go through each adapter's pair.
//!
//! What differs from a merged model (`W + scale * B A` in one matrix) is the summation order
//! only; the K/V an adapter's request computes differ from the base model's, so each adapter
//! has a fingerprint of its own ([`Adapter::fingerprint`]): the prefix cache's namespace and
//! the KV handle's model for its requests.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use tandem_model::ModelConfig;
use tandem_model::lora::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, AdapterConfig, Factor, Target, parse_tensor_name,
};

use crate::backend::{Backend, HostTensor, LoraHostPair, LoraStack, WeightDType, stack_lora_host};

pub use tandem_protocol::config::LoraModule;

/// Why an adapter was not loaded.
#[derive(Debug, thiserror::Error)]
#[error("LoRA adapter `{adapter}` ({path}): {reason}")]
pub struct LoraError {
    pub adapter: String,
    pub path: PathBuf,
    pub reason: String,
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

/// The base model's fused projections of one layer, as adapters change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 4] = [
        Projection::Qkv,
        Projection::O,
        Projection::GateUp,
        Projection::Down,
    ];

    /// The modules fused into it, in the order of its output rows.
    pub fn targets(self) -> &'static [Target] {
        match self {
            Projection::Qkv => &[Target::Q, Target::K, Target::V],
            Projection::O => &[Target::O],
            Projection::GateUp => &[Target::Gate, Target::Up],
            Projection::Down => &[Target::Down],
        }
    }

    /// `(outputs, inputs)` of the fused projection in a model of `config`.
    pub fn shape(self, config: &ModelConfig) -> (usize, usize) {
        let targets = self.targets();
        let outputs = targets.iter().map(|t| t.shape(config).0).sum();
        (outputs, targets[0].shape(config).1)
    }
}

/// Something per fused projection of one layer (an adapter's pairs, or every adapter's stacked):
/// `None` where no adapter changes it.
pub struct LayerLora<P> {
    pub qkv: Option<P>,
    pub o_proj: Option<P>,
    pub gate_up: Option<P>,
    pub down: Option<P>,
}

impl<P> LayerLora<P> {
    pub fn get(&self, projection: Projection) -> Option<&P> {
        match projection {
            Projection::Qkv => self.qkv.as_ref(),
            Projection::O => self.o_proj.as_ref(),
            Projection::GateUp => self.gate_up.as_ref(),
            Projection::Down => self.down.as_ref(),
        }
    }

    fn from_fn<E>(mut f: impl FnMut(Projection) -> Result<Option<P>, E>) -> Result<Self, E> {
        Ok(LayerLora {
            qkv: f(Projection::Qkv)?,
            o_proj: f(Projection::O)?,
            gate_up: f(Projection::GateUp)?,
            down: f(Projection::Down)?,
        })
    }
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
    pub layers: Vec<LayerLora<LoraPair<B::Weight>>>,
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

/// An adapter's fused factors on the host, per layer: what [`stack`] stacks.
pub struct HostAdapter {
    layers: Vec<LayerLora<Fused>>,
}

/// Loads `module`'s adapter for a model of `config` whose fingerprint is `base_fingerprint`,
/// and uploads its fused factors to `backend`; with `keep_host`, also returns them as they
/// are on the host (for [`stack`]).
pub fn load<B: Backend>(
    module: &LoraModule,
    config: &ModelConfig,
    base_fingerprint: &str,
    backend: &B,
    keep_host: bool,
) -> Result<(Adapter<B>, Option<HostAdapter>), LoraError> {
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
    let mut host = Vec::new();
    for layer in 0..config.num_hidden_layers {
        let fused = LayerLora::from_fn(|projection| {
            let parts: Vec<(usize, usize, Option<&HostFactors>)> = projection
                .targets()
                .iter()
                .map(|&t| {
                    let (out, inp) = t.shape(config);
                    (out, inp, modules.get(&(layer, t)))
                })
                .collect();
            Ok::<_, LoraError>(fuse_parts(&parts))
        })?;
        layers.push(LayerLora::from_fn(|projection| {
            let Some(fused) = fused.get(projection) else {
                return Ok(None);
            };
            Ok(Some(LoraPair {
                a: upload(fused.r, fused.cols, &fused.a)?,
                b: upload(fused.out, fused.r, &fused.b)?,
            }))
        })?);
        if keep_host {
            host.push(fused);
        }
    }
    let adapter = Adapter {
        name: module.name.clone(),
        fingerprint,
        rank,
        modules: count,
        layers,
    };
    Ok((adapter, keep_host.then_some(HostAdapter { layers: host })))
}

/// Every adapter's pairs stacked per layer and projection ([`LoraStack`]), in the order of
/// `adapters` (adapter `k` of a batch's rows is `adapters[k]`), uploaded to `backend`.
pub fn stack<B: Backend>(
    adapters: &[HostAdapter],
    config: &ModelConfig,
    backend: &B,
) -> Result<Vec<LayerLora<LoraStack<B::Weight>>>, crate::backend::BackendError> {
    let upload = |rows: usize, cols: usize, data: &[f32]| {
        let shape = [rows, cols];
        backend.upload_weight(&[HostTensor::new(
            WeightDType::F32,
            &shape,
            bytemuck_f32(data),
        )])
    };
    (0..config.num_hidden_layers)
        .map(|layer| {
            LayerLora::from_fn(|projection| {
                let (outputs, inputs) = projection.shape(config);
                let parts: Vec<_> = adapters
                    .iter()
                    .map(|h| {
                        h.layers[layer].get(projection).map(|f| LoraHostPair {
                            rank: f.r,
                            a: &f.a,
                            b: &f.b,
                        })
                    })
                    .collect();
                let Some((rank, a, b)) = stack_lora_host(&parts, inputs, outputs) else {
                    return Ok(None);
                };
                Ok(Some(LoraStack {
                    a: upload(adapters.len() * rank, inputs, &a)?,
                    b: upload(adapters.len() * outputs, rank, &b)?,
                    adapters: adapters.len(),
                    rank,
                    inputs,
                    outputs,
                }))
            })
        })
        .collect()
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
    // Each factor's name and shape, by (layer, projection, factor).
    let mut found: HashMap<(usize, Target, Factor), (String, Vec<usize>)> = HashMap::new();
    for (name, view) in tensors.iter() {
        let (layer, target, factor) = parse_tensor_name(name, config.num_hidden_layers)?;
        found.insert(
            (layer, target, factor),
            (name.to_string(), view.shape().to_vec()),
        );
    }
    let modules: std::collections::BTreeSet<(usize, Target)> = found
        .keys()
        .map(|&(layer, target, _)| (layer, target))
        .collect();
    let mut out = HashMap::new();
    for (layer, target) in modules {
        let (Some((a_name, a_shape)), Some((b_name, b_shape))) = (
            found.get(&(layer, target, Factor::A)),
            found.get(&(layer, target, Factor::B)),
        ) else {
            return Err(format!(
                "layer {layer}'s {} has only one of lora_A and lora_B",
                target.short_name()
            ));
        };
        let (out_rows, in_cols) = target.shape(config);
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
