//! The Llama-family model (Llama 2/3 with llama3 rope scaling, Mistral, Qwen2 with q/k/v bias,
//! Qwen3 with per-head q/k norms, tied embeddings), written once against
//! [`crate::backend::Backend`].
//!
//! - [`batch`]: the input of one forward (flattened tokens of several sequences).
//! - [`weights`]: the memory-mapped safetensors and their checks.
//! - [`rope`]: rotary frequencies as Hugging Face computes them.
//!
//! The forward pass serves prefill chunks and decode steps together: K/V of the new tokens are
//! written into the paged cache before attention reads it, and only the rows that want logits
//! go through the final norm and the (large) lm_head.
//!
//! Weights are fused at load where one matrix product can replace several: q/k/v into one
//! `[q + 2 kv, hidden]` matrix, gate/up into one `[2 ffn, hidden]`; for a single decode token
//! that halves the number of passes (and of thread hand-offs) per layer.

pub mod batch;
pub mod lora;
pub mod rope;
pub mod shard;
pub mod weights;

use std::path::Path;

use tandem_model::{ConfigError, ModelConfig, tensor_names};

pub use batch::{ChainedToken, ForwardBatch, RowLogprobs, RowOutputs, SequenceSlice, TokenLogprob};
use lora::Projection;
use weights::Piece;
pub use weights::WeightsError;

use crate::backend::{AttentionShape, Backend, BackendError, BatchPlan, WeightDType};
use crate::kv_cache::{KvDType, KvLayout};
pub use shard::TensorParallel;

/// Rows of row log-probabilities ([`RowLogprobs`]) that go through the lm_head at once.
pub const ROW_LOGPROBS_GROUP: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("loading weights: {0}")]
    Weights(#[from] WeightsError),
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("KV cache layout {found:?} does not match the model's {expected:?}")]
    KvLayout { expected: KvLayout, found: KvLayout },
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
}

impl ModelError {
    /// Whether the backend lost its device ([`BackendError::is_device_lost`]).
    pub fn is_device_lost(&self) -> bool {
        matches!(self, ModelError::Backend(e) if e.is_device_lost())
    }
}

/// Load-time choices.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// KV cache element type; `None` follows the weights: f32 for f32 models (parity with a
    /// float32 reference), bf16 for bf16 models, f16 for f16 models.
    pub kv_dtype: Option<KvDType>,
    /// The part of the model this rank holds ([`shard`]); whole by default.
    pub tensor_parallel: TensorParallel,
    /// For the ranks of a group loading at once from a generated model: where they take the
    /// whole tensors one of them generated ([`weights::SharedGeneration`]).
    pub shared_generation: Option<std::sync::Arc<weights::SharedGeneration>>,
}

struct Layer<B: Backend> {
    input_norm: B::Weight,
    qkv: B::Weight,
    qkv_bias: Option<B::Weight>,
    /// Qwen3's norms of each q and of each k head, `[head_dim]` each (whole on every rank).
    qk_norm: Option<(B::Weight, B::Weight)>,
    o_proj: B::Weight,
    o_bias: Option<B::Weight>,
    post_attention_norm: B::Weight,
    gate_up: B::Weight,
    down: B::Weight,
}

/// A loaded model on backend `B`.
pub struct Model<B: Backend> {
    config: ModelConfig,
    backend: B,
    embed: B::Weight,
    /// `None` when embeddings are tied: the lm_head is `embed`.
    lm_head: Option<B::Weight>,
    final_norm: B::Weight,
    layers: Vec<Layer<B>>,
    inv_freq: Vec<f32>,
    shape: AttentionShape,
    eps: f32,
    weight_dtype: WeightDType,
    /// The GGUF block type most matrices keep, for a GGUF-quantized model.
    gguf_quant: Option<crate::backend::GgufQuant>,
    kv_dtype: KvDType,
    /// The part of the model this one holds; with more than one rank, the outputs of
    /// `o_proj` and `down` are summed over the group ([`shard`]).
    tensor_parallel: TensorParallel,
    /// LoRA adapters a sequence may compute with ([`SequenceSlice::adapter`] indexes them).
    adapters: Vec<lora::Adapter<B>>,
    /// Per layer, every adapter's pairs stacked, where the backend adds a batch's products in
    /// one pass ([`Backend::add_lora_stacked`]); empty otherwise.
    lora_stacks: Vec<lora::LayerLora<crate::backend::LoraStack<B::Weight>>>,
}

/// The rows of one forward's sequences that compute with adapters, and how their products are
/// added ([`Model::add_lora`]).
struct LoraRows {
    /// Rows of each adapter whose products its own pairs add ([`Backend::add_lora`],
    /// [`ForwardBatch::adapter_rows`]): every adapter row, or with the stacked pass those of
    /// prompt chunks only.
    groups: Vec<(u32, Vec<u32>)>,
    /// The rows of sequences that compute one token, every adapter's in one pass over the
    /// stacked pairs ([`Backend::add_lora_stacked`], [`BatchPlan::row_adapters`]).
    stacked: StackedPass,
}

/// Whether and over which rows a forward runs the stacked LoRA pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StackedPass {
    Off,
    /// Every row: a decode step, whose graph replays the pass for any mix of adapters.
    AllRows,
    /// The first rows, past which no row is one the pass adds for (a step with prompts,
    /// never a graph).
    FirstRows(usize),
}

impl LoraRows {
    /// How a forward over `batch` (planned as `plan`) adds adapters' products: the stacked pass
    /// for the rows of sequences that compute one token where the model has stacks and the
    /// backend takes that many rows; each adapter's GEMMs for the others (prompts' rows,
    /// whose inputs the GEMMs read once where the stacked pass reads them once per rank index:
    /// at a 512-token prompt on an H200 the stacked pass took twice their time).
    ///
    /// A step with prompts is never a graph, so its launches are queued one by one: there the
    /// stacked pass (two a projection) runs only where it saves some, that is where some
    /// adapter has decode rows and no prompt rows (each adapter's GEMMs are four launches).
    fn new(batch: &ForwardBatch, plan: &BatchPlan, stacks: bool, stacked_rows: usize) -> Self {
        let end = plan
            .row_adapters
            .iter()
            .rposition(|&a| a != 0)
            .map_or(0, |last| last + 1);
        let all = batch.adapter_rows(|_| true);
        if !stacks || end == 0 || end > stacked_rows {
            return LoraRows {
                groups: all,
                stacked: StackedPass::Off,
            };
        }
        if plan.sequences.iter().all(|s| s.token_count == 1) {
            return LoraRows {
                groups: Vec::new(),
                stacked: StackedPass::AllRows,
            };
        }
        let prompts = batch.adapter_rows(|seq| seq.token_count != 1);
        if prompts.len() < all.len() {
            LoraRows {
                groups: prompts,
                stacked: StackedPass::FirstRows(end),
            }
        } else {
            LoraRows {
                groups: all,
                stacked: StackedPass::Off,
            }
        }
    }

    /// Whether any row computes with an adapter.
    fn any(&self) -> bool {
        self.stacked != StackedPass::Off || !self.groups.is_empty()
    }
}

/// How a tensor is split over tensor-parallel ranks ([`shard`]).
enum Split {
    Rows(std::ops::Range<usize>),
    Cols(std::ops::Range<usize>),
}

impl<B: Backend> std::fmt::Debug for Model<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.config.architecture())
            .field("layers", &self.layers.len())
            .field("weight_dtype", &self.weight_dtype)
            .field("kv_dtype", &self.kv_dtype)
            .field("backend", &self.backend.describe())
            .finish()
    }
}

impl<B: Backend> Model<B> {
    /// Reads `config.json` and the safetensors of `model_dir`, checks them, and uploads the
    /// weights to `backend`.
    pub fn load(model_dir: &Path, backend: B, options: &ModelOptions) -> Result<Self, ModelError> {
        let config = ModelConfig::load(model_dir)?;
        let source = weights::WeightSource::open(model_dir)?;
        let tensors = source.tensors(&config)?;
        let entry = |name: &str| {
            tensors
                .get(name)
                .expect("WeightSource::tensors checked every expected tensor is present")
        };
        let get = |name: &str| {
            let e = entry(name);
            match &options.shared_generation {
                Some(share) if e.is_generated() => {
                    Piece::Shared(share.take(name, || e.load_rows(e.all_rows())))
                }
                _ => e.load(),
            }
        };
        let tp = options.tensor_parallel;
        let d = config.head_dim();
        let heads = tp
            .share(config.num_attention_heads, "attention heads")
            .map_err(ModelError::TensorParallel)?;
        let kv_heads = tp
            .share(config.num_kv_heads(), "KV heads")
            .map_err(ModelError::TensorParallel)?;
        let channels = tp
            .share(config.intermediate_size, "MLP channels")
            .map_err(ModelError::TensorParallel)?;
        let (q_rows, kv_rows) = (
            heads.start * d..heads.end * d,
            kv_heads.start * d..kv_heads.end * d,
        );
        // This rank's rows or columns of a tensor; the tensor itself without a split.
        let part = |name: &str, split: Split| -> Piece<'_> {
            match split {
                _ if tp.size == 1 => get(name),
                Split::Rows(range) => Piece::Owned(entry(name).load_rows(range)),
                Split::Cols(range) => Piece::Owned(shard::cols(&get(name).view(), range)),
            }
        };
        // GGUF block-quantized tensors go to the backend as blocks (one type per matrix).
        let gguf = config.gguf_quant();
        if gguf.is_some() && tp.size > 1 {
            return Err(ModelError::TensorParallel(
                "a GGUF-quantized model is not split over ranks; import it in bf16 for \
                 tensor parallelism"
                    .into(),
            ));
        }
        let gguf_parts = |names: &[&str]| -> Option<Vec<crate::backend::GgufTensor<'_>>> {
            names.iter().map(|n| entry(n).gguf_view()).collect()
        };
        let matrix = |names: &[&str], pieces: &[Piece<'_>]| -> Result<B::Weight, ModelError> {
            if let Some(parts) = gguf_parts(names) {
                return Ok(backend.upload_gguf_weight(&parts)?);
            }
            if let Some(name) = names.iter().find(|n| entry(n).gguf.is_some()) {
                return Err(ModelError::Weights(WeightsError::Gguf {
                    name: name.to_string(),
                    reason: "fused with tensors of another type".into(),
                }));
            }
            let views: Vec<_> = pieces.iter().map(Piece::view).collect();
            Ok(backend.upload_weight(&views)?)
        };
        let embed_entry = get(tensor_names::EMBED_TOKENS);
        // The projections' type names the model (`fp8` for an FP8 checkpoint, also where it
        // keeps some layers in 16 bits); the embedding's is what its 16-bit parts are in (the
        // final norm's where the embedding is GGUF blocks).
        let unquantized_dtype = match entry(tensor_names::EMBED_TOKENS).gguf {
            Some(_) => entry(tensor_names::FINAL_NORM).dtype,
            None => embed_entry.view().dtype,
        };
        let weight_dtype = (0..config.num_hidden_layers)
            .flat_map(|i| {
                let n = tensor_names::layer(i);
                [n.q_proj, n.o_proj, n.gate_proj, n.down_proj]
            })
            .map(|name| entry(&name).dtype)
            .find(|&dtype| dtype == WeightDType::F8E4M3)
            .unwrap_or(match config.num_hidden_layers {
                0 => unquantized_dtype,
                _ if gguf.is_some() => unquantized_dtype,
                _ => entry(&tensor_names::layer(0).q_proj).dtype,
            });
        let embed = matrix(&[tensor_names::EMBED_TOKENS], &[embed_entry])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(matrix(
                &[tensor_names::LM_HEAD],
                &[get(tensor_names::LM_HEAD)],
            )?)
        };
        let final_norm = backend.upload_weight(&[get(tensor_names::FINAL_NORM).view()])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let n = tensor_names::layer(i);
            let q = part(&n.q_proj, Split::Rows(q_rows.clone()));
            let k = part(&n.k_proj, Split::Rows(kv_rows.clone()));
            let v = part(&n.v_proj, Split::Rows(kv_rows.clone()));
            let gate = part(&n.gate_proj, Split::Rows(channels.clone()));
            let up = part(&n.up_proj, Split::Rows(channels.clone()));
            layers.push(Layer {
                input_norm: backend.upload_weight(&[get(&n.input_norm).view()])?,
                qkv: matrix(
                    &[n.q_proj.as_str(), n.k_proj.as_str(), n.v_proj.as_str()],
                    &[q, k, v],
                )?,
                qkv_bias: if config.qkv_bias() {
                    let q = part(&n.q_bias, Split::Rows(q_rows.clone()));
                    let k = part(&n.k_bias, Split::Rows(kv_rows.clone()));
                    let v = part(&n.v_bias, Split::Rows(kv_rows.clone()));
                    Some(backend.upload_weight(&[q.view(), k.view(), v.view()])?)
                } else {
                    None
                },
                qk_norm: if config.qk_norm() {
                    Some((
                        backend.upload_weight(&[get(&n.q_norm).view()])?,
                        backend.upload_weight(&[get(&n.k_norm).view()])?,
                    ))
                } else {
                    None
                },
                o_proj: matrix(
                    &[n.o_proj.as_str()],
                    &[part(&n.o_proj, Split::Cols(q_rows.clone()))],
                )?,
                // Added once to the ranks' sum: rank 0 holds it.
                o_bias: if config.o_bias() && tp.rank == 0 {
                    Some(backend.upload_weight(&[get(&n.o_bias).view()])?)
                } else {
                    None
                },
                post_attention_norm: backend
                    .upload_weight(&[get(&n.post_attention_norm).view()])?,
                gate_up: matrix(&[n.gate_proj.as_str(), n.up_proj.as_str()], &[gate, up])?,
                down: matrix(
                    &[n.down_proj.as_str()],
                    &[part(&n.down_proj, Split::Cols(channels.clone()))],
                )?,
            });
        }
        let kv_dtype = options.kv_dtype.unwrap_or(match unquantized_dtype {
            WeightDType::F32 => KvDType::F32,
            WeightDType::Bf16 | WeightDType::F8E4M3 => KvDType::Bf16,
            WeightDType::F16 => KvDType::F16,
        });
        let shape = AttentionShape {
            num_heads: heads.len(),
            num_kv_heads: kv_heads.len(),
            head_dim: d,
            scale: (config.head_dim() as f32).powf(-0.5),
        };
        Ok(Model {
            inv_freq: rope::inv_freq(&config),
            eps: config.rms_norm_eps as f32,
            config,
            backend,
            embed,
            lm_head,
            final_norm,
            layers,
            shape,
            weight_dtype,
            gguf_quant: gguf.and_then(|g| g.main_type()),
            kv_dtype,
            tensor_parallel: tp,
            adapters: Vec::new(),
            lora_stacks: Vec::new(),
        })
    }

    /// Loads the LoRA adapters of `modules` (PEFT directories) for this model, whose
    /// fingerprint is `base_fingerprint`: sequences then name them by their index in
    /// [`Self::adapters`]. Refused for a tensor-parallel rank or a backend without
    /// [`Backend::add_rows`], and for adapters whose shapes or options this model does not
    /// compute, each by name.
    pub fn load_adapters(
        &mut self,
        modules: &[lora::LoraModule],
        base_fingerprint: &str,
    ) -> Result<(), ModelError> {
        if modules.is_empty() {
            return Ok(());
        }
        let refuse = |module: &lora::LoraModule, reason: String| lora::LoraError {
            adapter: module.name.clone(),
            path: module.path.clone(),
            reason,
        };
        if self.tensor_parallel.size > 1 {
            return Err(refuse(
                &modules[0],
                "LoRA adapters are not served with tensor parallelism".into(),
            )
            .into());
        }
        if let Err(why) = self.backend.enable_lora(self.weight_dtype) {
            return Err(refuse(&modules[0], why).into());
        }
        let stacked = self.backend.lora_stacked_rows() > 0;
        let mut hosts = Vec::new();
        for (i, module) in modules.iter().enumerate() {
            if modules[..i].iter().any(|m| m.name == module.name) {
                return Err(refuse(module, "the name is given twice".into()).into());
            }
            let (adapter, host) = lora::load(
                module,
                &self.config,
                base_fingerprint,
                &self.backend,
                stacked,
            )?;
            hosts.extend(host);
            tracing::info!(
                adapter = adapter.name,
                path = %module.path.display(),
                rank = adapter.rank,
                modules = adapter.modules,
                fingerprint = adapter.fingerprint,
                "LoRA adapter loaded"
            );
            self.adapters.push(adapter);
        }
        if stacked {
            // Every adapter of this model at once: a later call would restack them all.
            self.lora_stacks = lora::stack(&hosts, &self.config, &self.backend)?;
        }
        Ok(())
    }

    /// The loaded LoRA adapters, in the order of [`Self::load_adapters`]'s modules.
    pub fn adapters(&self) -> &[lora::Adapter<B>] {
        &self.adapters
    }

    /// The head geometry the attention ops run with.
    pub fn attention_shape(&self) -> AttentionShape {
        self.shape
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The dtype of the projections (`fp8` for an FP8 checkpoint; else that of all weights).
    pub fn weight_dtype(&self) -> WeightDType {
        self.weight_dtype
    }

    /// The GGUF block type most matrices are kept in (`Q4_1` for the default model imported
    /// with `--keep-quant`); `None` for a model that is not GGUF-quantized.
    pub fn gguf_quant(&self) -> Option<crate::backend::GgufQuant> {
        self.gguf_quant
    }

    /// The layout of this model's KV blocks of `block_size` tokens.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            num_layers: self.config.num_hidden_layers,
            num_kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
            block_size,
            dtype: self.kv_dtype,
        }
    }

    /// Allocates a zeroed KV cache of `num_blocks` blocks of `block_size` tokens.
    pub fn alloc_kv_cache(
        &self,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<B::KvCache, ModelError> {
        Ok(self
            .backend
            .alloc_kv_cache(&self.kv_layout(block_size), num_blocks)?)
    }

    /// Runs one forward over `batch`, writing the new tokens' K/V into `kv`, and returns one
    /// logits row (`vocab_size` floats) per sequence with `wants_logits`, in batch order.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_with_row_outputs(batch, kv, &mut RowOutputs::default())
    }

    /// [`Self::forward`] that also fills `outputs` with what the batch's sequences ask
    /// ([`SequenceSlice::row_logprobs`], [`SequenceSlice::wants_hidden`]).
    pub fn forward_with_row_outputs(
        &self,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
        outputs: &mut RowOutputs,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.backend
            .run(|| match self.forward_on_device(batch, kv, outputs)? {
                Some(logits) => Ok(self.backend.to_host(&logits)?),
                None => Ok(Vec::new()),
            })
    }

    /// [`Self::forward`] that leaves the logits (`[sequences wanting logits, vocab]`) in the
    /// backend's memory, for sampling on the device; `None` when no sequence wants logits.
    pub fn forward_logits(
        &self,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
    ) -> Result<Option<B::Tensor>, ModelError> {
        self.forward_logits_with_row_outputs(batch, kv, &mut RowOutputs::default())
    }

    /// [`Self::forward_logits`] with [`Self::forward_with_row_outputs`]'s row outputs.
    pub fn forward_logits_with_row_outputs(
        &self,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
        outputs: &mut RowOutputs,
    ) -> Result<Option<B::Tensor>, ModelError> {
        self.backend
            .run(|| self.forward_on_device(batch, kv, outputs))
    }

    fn forward_on_device(
        &self,
        batch: &ForwardBatch,
        kv: &mut B::KvCache,
        outputs: &mut RowOutputs,
    ) -> Result<Option<B::Tensor>, ModelError> {
        outputs.clear();
        let layout = self.backend.kv_cache_layout(kv);
        let expected = self.kv_layout(layout.block_size);
        if layout != expected {
            return Err(ModelError::KvLayout {
                expected,
                found: layout,
            });
        }
        self.check_batch(batch, layout.block_size, self.backend.kv_cache_blocks(kv))?;
        if batch.tokens.is_empty() {
            return Ok(None);
        }
        let b = &self.backend;
        let started = std::time::Instant::now();
        let plan = BatchPlan::new(batch, layout.block_size, &self.inv_freq);
        tracing::debug!(
            tokens = batch.tokens.len(),
            plan_ms = started.elapsed().as_secs_f64() * 1e3,
            "planned a forward"
        );
        let mut rows = batch.has_row_outputs().then_some((batch, outputs));
        let lora = LoraRows::new(
            batch,
            &plan,
            !self.lora_stacks.is_empty(),
            b.lora_stacked_rows(),
        );
        let logits = b.run_forward(&plan, kv, &mut |meta, kv| {
            self.layers(
                &plan,
                meta,
                kv,
                rows.as_mut().map(|(b, out)| (*b, &mut **out)),
                &lora,
            )
        })?;
        // Without logits rows there is nothing to return, but the K/V were written.
        Ok(logits.filter(|_| !plan.logits_rows.is_empty()))
    }

    /// The ops of one forward over `meta` (the device copy of `plan`): every layer, then the
    /// final norm and lm_head for the rows that want logits.
    ///
    /// With `row_outputs` (a batch whose sequences ask for them), the asked rows' log-probs
    /// and hidden states are computed from the last hidden states too, before the logits.
    ///
    /// `lora` says which rows compute with which adapter and how: their adapter's products are
    /// added to each projection's output.
    fn layers(
        &self,
        plan: &BatchPlan,
        meta: &B::Batch,
        kv: &mut B::KvCache,
        row_outputs: Option<(&ForwardBatch, &mut RowOutputs)>,
        lora: &LoraRows,
    ) -> Result<Option<B::Tensor>, BackendError> {
        let b = &self.backend;
        // o_proj and down, whose outputs only the residual adds read. Each rank's give part of
        // the sum ([`shard`]), kept f32 for the all-reduce; a whole model's may be narrower.
        let sharded = self.tensor_parallel.size > 1;
        let to_residual = |x: &B::Tensor, weight: &B::Weight, bias: Option<&B::Weight>| {
            if sharded {
                let mut y = b.linear(x, weight, bias)?;
                b.all_reduce_sum(&mut y)?;
                Ok(y)
            } else {
                b.linear_to_residual(x, weight, bias)
            }
        };
        let mut residual = b.embedding(&self.embed, meta)?;
        let mut mlp_out: Option<B::Tensor> = None;
        // Each projection's weight is announced before the ops that compute its input
        // (`prefetch_weight`), so a backend can read it while those run.
        for (i, layer) in self.layers.iter().enumerate() {
            b.prefetch_weight(&layer.qkv);
            let h = match &mlp_out {
                None => b.rms_norm(&residual, &layer.input_norm, self.eps)?,
                Some(m) => b.add_rms_norm(&mut residual, m, &layer.input_norm, self.eps)?,
            };
            let mut qkv = b.linear_qkv(&h, &layer.qkv, layer.qkv_bias.as_ref())?;
            self.add_lora(&mut qkv, &h, meta, lora, i, Projection::Qkv)?;
            if let Some((q_norm, k_norm)) = &layer.qk_norm {
                b.head_rms_norm(&mut qkv, q_norm, k_norm, &self.shape, self.eps)?;
            }
            b.rope_and_cache_write(&mut qkv, meta, &self.shape, kv, i)?;
            b.prefetch_weight(&layer.o_proj);
            let attn = b.paged_attention(&qkv, meta, &self.shape, kv, i)?;
            let mut o = to_residual(&attn, &layer.o_proj, layer.o_bias.as_ref())?;
            self.add_lora(&mut o, &attn, meta, lora, i, Projection::O)?;
            b.prefetch_weight(&layer.gate_up);
            let h = b.add_rms_norm(&mut residual, &o, &layer.post_attention_norm, self.eps)?;
            let act = if !lora.any() {
                b.linear_silu_mul(&h, &layer.gate_up, &layer.down)?
            } else {
                let mut gate_up = b.linear(&h, &layer.gate_up, None)?;
                self.add_lora(&mut gate_up, &h, meta, lora, i, Projection::GateUp)?;
                b.silu_mul(&gate_up)?
            };
            let mut down = to_residual(&act, &layer.down, None)?;
            self.add_lora(&mut down, &act, meta, lora, i, Projection::Down)?;
            mlp_out = Some(down);
        }
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        if let Some((batch, out)) = row_outputs {
            out.logprobs = self.row_logprobs(batch, &residual, mlp_out.as_ref())?;
            out.hidden = self.hidden_rows(batch, &residual, mlp_out.as_ref())?;
        }
        if plan.logits_rows.is_empty() {
            return Ok(None);
        }
        // Only the rows that want logits: the last residual add, final norm and lm_head.
        let mut last = b.gather_logits_rows(&residual, meta)?;
        let m = mlp_out
            .as_ref()
            .map(|m| b.gather_logits_rows(m, meta))
            .transpose()?;
        b.prefetch_weight(lm_head);
        let h = match &m {
            Some(m) => b.add_rms_norm(&mut last, m, &self.final_norm, self.eps)?,
            None => b.rms_norm(&last, &self.final_norm, self.eps)?,
        };
        let logits = b.linear(&h, lm_head, None)?;
        Ok(Some(logits))
    }

    /// Adds to `y` (the output of layer `layer`'s `projection` over input `x`) each adapter's
    /// `B (A x)` at the rows of its sequences (none where the adapter leaves that projection
    /// alone): the rows [`LoraRows`] gives the stacked pass in one pass over every adapter's
    /// pairs, the others adapter by adapter.
    fn add_lora(
        &self,
        y: &mut B::Tensor,
        x: &B::Tensor,
        meta: &B::Batch,
        lora: &LoraRows,
        layer: usize,
        projection: Projection,
    ) -> Result<(), BackendError> {
        let b = &self.backend;
        let stack = self.lora_stacks.get(layer).and_then(|l| l.get(projection));
        if let (Some(stack), true) = (stack, lora.stacked != StackedPass::Off) {
            let first_rows = match lora.stacked {
                StackedPass::FirstRows(n) => Some(n),
                _ => None,
            };
            b.add_lora_stacked(y, x, meta, stack, first_rows)?;
        }
        for (adapter, rows) in &lora.groups {
            let Some(pair) = self.adapters[*adapter as usize].layers[layer].get(projection) else {
                continue;
            };
            b.add_lora(y, x, rows, &pair.a, &pair.b)?;
        }
        Ok(())
    }

    /// The log-probabilities the batch's sequences ask for at their rows
    /// ([`SequenceSlice::row_logprobs`]), one list per asking sequence in batch order: the
    /// rows go through the final norm and lm_head [`ROW_LOGPROBS_GROUP`] at a time, and each
    /// group's logits are reduced on the host to the target's logprob and the best
    /// alternatives before the next group is computed, so a long prefill chunk never holds
    /// more than one group's logits (a group of Llama 3's 128k-token vocabulary is 32 MiB).
    fn row_logprobs(
        &self,
        batch: &ForwardBatch,
        residual: &B::Tensor,
        mlp_out: Option<&B::Tensor>,
    ) -> Result<Vec<Vec<TokenLogprob>>, BackendError> {
        let b = &self.backend;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        // (row, target, top_k, which list) of every asked row, in batch order.
        let mut rows = Vec::new();
        let mut out = Vec::new();
        for seq in &batch.sequences {
            let Some(asked) = &seq.row_logprobs else {
                continue;
            };
            for (i, &target) in asked.targets.iter().enumerate() {
                let row = (seq.token_start + asked.first + i) as u32;
                rows.push((row, target, asked.top_k, out.len()));
            }
            out.push(Vec::with_capacity(asked.targets.len()));
        }
        for group in rows.chunks(ROW_LOGPROBS_GROUP) {
            let indices: Vec<u32> = group.iter().map(|r| r.0).collect();
            let mut last = b.gather_rows(residual, &indices)?;
            let m = mlp_out.map(|m| b.gather_rows(m, &indices)).transpose()?;
            let h = match &m {
                Some(m) => b.add_rms_norm(&mut last, m, &self.final_norm, self.eps)?,
                None => b.rms_norm(&last, &self.final_norm, self.eps)?,
            };
            let logits = b.to_host(&b.linear(&h, lm_head, None)?)?;
            // Each row's reduction is a pass or two over the vocabulary: rows in parallel (on
            // the CPU backend, within its own pool, which `run` has installed).
            let reduced: Vec<TokenLogprob> = {
                use rayon::prelude::*;
                logits
                    .par_iter()
                    .zip(group.par_iter())
                    .map(|(row, &(_, target, top_k, _))| {
                        crate::sampler::token_logprob(row, target, top_k)
                    })
                    .collect()
            };
            for (entry, &(_, _, _, list)) in reduced.into_iter().zip(group) {
                out[list].push(entry);
            }
        }
        Ok(out)
    }

    /// The final-normed hidden state of the last new token of each sequence that asks
    /// ([`SequenceSlice::wants_hidden`]), in batch order: the vector the lm_head would read,
    /// which an embedding request pools.
    fn hidden_rows(
        &self,
        batch: &ForwardBatch,
        residual: &B::Tensor,
        mlp_out: Option<&B::Tensor>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let b = &self.backend;
        let rows: Vec<u32> = batch
            .sequences
            .iter()
            .filter(|s| s.wants_hidden)
            .map(|s| (s.token_start + s.token_count - 1) as u32)
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for group in rows.chunks(ROW_LOGPROBS_GROUP) {
            let mut last = b.gather_rows(residual, group)?;
            let m = mlp_out.map(|m| b.gather_rows(m, group)).transpose()?;
            let h = match &m {
                Some(m) => b.add_rms_norm(&mut last, m, &self.final_norm, self.eps)?,
                None => b.rms_norm(&last, &self.final_norm, self.eps)?,
            };
            out.extend(b.to_host(&h)?);
        }
        Ok(out)
    }

    /// Rejects batches the ops would index out of bounds with.
    fn check_batch(
        &self,
        batch: &ForwardBatch,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<(), ModelError> {
        let bad = |s: String| Err(ModelError::InvalidBatch(s));
        if block_size == 0 {
            return bad("block size 0".into());
        }
        let mut next = 0;
        for (s, seq) in batch.sequences.iter().enumerate() {
            if seq.token_start != next || seq.token_count == 0 {
                return bad(format!(
                    "sequence {s}: tokens {}..+{} do not follow the previous sequence (at {next}) or are empty",
                    seq.token_start, seq.token_count
                ));
            }
            next += seq.token_count;
            if let Some(adapter) = seq.adapter.filter(|&a| a as usize >= self.adapters.len()) {
                return bad(format!(
                    "sequence {s}: LoRA adapter {adapter} of the model's {}",
                    self.adapters.len()
                ));
            }
            let context = seq.context_len();
            if context > self.config.max_position_embeddings {
                tracing::debug!(
                    sequence = s,
                    context,
                    "context longer than max_position_embeddings"
                );
            }
            let needed = context.div_ceil(block_size);
            if seq.block_table.len() < needed {
                return bad(format!(
                    "sequence {s}: {} blocks for {context} tokens (needs {needed})",
                    seq.block_table.len()
                ));
            }
            if let Some(&block) = seq.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return bad(format!(
                    "sequence {s}: block {block} outside the cache's {num_blocks}"
                ));
            }
        }
        if next != batch.tokens.len() {
            return bad(format!(
                "sequences cover {next} tokens of {}",
                batch.tokens.len()
            ));
        }
        if let Some(c) = batch.chained.iter().find(|c| c.token >= batch.tokens.len()) {
            return bad(format!(
                "chained token at {} outside the batch's {} tokens",
                c.token,
                batch.tokens.len()
            ));
        }
        if !batch.chained.is_empty() && self.backend.device_sampler().is_none() {
            return bad(format!(
                "chained tokens need a backend that samples on the device, not {}",
                self.backend.describe()
            ));
        }
        if let Some(&t) = batch
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return bad(format!(
                "token {t} outside the vocabulary of {}",
                self.config.vocab_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step of `(tokens, adapter)` sequences, each from position 0 but the one-token ones
    /// (decode rows, at position 4), with its plan.
    fn step(sequences: &[(usize, Option<u32>)]) -> (ForwardBatch, BatchPlan) {
        let mut batch = ForwardBatch::default();
        for (i, &(tokens, adapter)) in sequences.iter().enumerate() {
            let start = if tokens == 1 { 4 } else { 0 };
            batch.push(&vec![1; tokens], start, vec![i as u32, 9], true);
            batch.set_adapter_from(i, adapter);
        }
        let plan = BatchPlan::new(&batch, 8, &[1.0]);
        (batch, plan)
    }

    #[test]
    fn the_stacked_pass_takes_decode_rows_where_it_saves_launches() {
        // A decode step: every row through the stacked pass, which a graph replays.
        let (batch, plan) = step(&[(1, Some(0)), (1, None), (1, Some(1))]);
        let rows = LoraRows::new(&batch, &plan, true, 512);
        assert_eq!(rows.stacked, StackedPass::AllRows);
        assert!(rows.groups.is_empty() && rows.any());
        // Without stacks (the CPU), or past the rows the backend takes: each adapter's GEMMs.
        let rows = LoraRows::new(&batch, &plan, false, 512);
        assert_eq!(rows.stacked, StackedPass::Off);
        assert_eq!(rows.groups, vec![(0, vec![0]), (1, vec![2])]);
        assert_eq!(
            LoraRows::new(&batch, &plan, true, 2).stacked,
            StackedPass::Off
        );
        // Decode rows of adapters 0 and 1 before a prompt of adapter 1: the pass goes through
        // the first two rows, the GEMMs take the prompt's.
        let (batch, plan) = step(&[(1, Some(0)), (1, Some(1)), (3, Some(1)), (1, None)]);
        let rows = LoraRows::new(&batch, &plan, true, 512);
        assert_eq!(rows.stacked, StackedPass::FirstRows(2));
        assert_eq!(rows.groups, vec![(1, vec![2, 3, 4])]);
        // Every decode row's adapter has prompt rows too: its GEMMs take them all, fewer
        // launches than the pass and the GEMMs.
        let (batch, plan) = step(&[(1, Some(1)), (3, Some(1))]);
        let rows = LoraRows::new(&batch, &plan, true, 512);
        assert_eq!(rows.stacked, StackedPass::Off);
        assert_eq!(rows.groups, vec![(1, vec![0, 1, 2, 3])]);
        // The base model only.
        let (batch, plan) = step(&[(1, None), (3, None)]);
        assert!(!LoraRows::new(&batch, &plan, true, 512).any());
    }
}
