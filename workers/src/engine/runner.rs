//! What the engine needs from a model: one forward over a batch, writing its own KV cache.
//!
//! [`ModelRunner`] pairs a [`Model`] with the KV cache it writes; the [`StepModel`] trait lets
//! the scheduling logic of the engine be tested against a small deterministic fake.

use std::time::Instant;

use crate::backend::{
    Backend, DeviceSampler, HostRange, KvBlockIo, KvBytes, KvBytesMut, KvCacheMemory,
};
use crate::kv_cache::KvLayout;
use crate::kv_cache::block_pool::BlockId;
use crate::model::{ForwardBatch, Model, ModelError, RowOutputs};
use crate::sampler::device::{RowRequest, RowSummary};

use super::profile::ForwardTiming;

/// A model with its KV cache, as the engine drives it.
pub trait StepModel: Send {
    /// Logits per row.
    fn vocab_size(&self) -> usize;
    /// The model's context length.
    fn max_model_len(&self) -> usize;
    /// Tokens that end generation unless a request ignores EOS.
    fn eos_token_ids(&self) -> Vec<u32>;
    /// Runs `batch`, writing the new tokens' K/V into the cache; one logits row per sequence
    /// with `wants_logits`, in batch order.
    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError>;
    /// What the last forward computed besides its logits for the sequences that asked
    /// ([`crate::model::SequenceSlice::row_logprobs`], [`crate::model::SequenceSlice::wants_hidden`]):
    /// each list in batch order. Taken once; empty for a model that computes none.
    fn take_row_outputs(&mut self) -> RowOutputs {
        RowOutputs::default()
    }
    /// Sampling on the device, where the model's backend can ([`DeviceSampling`]); `None`:
    /// the engine samples from the rows [`Self::forward`] returns.
    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        None
    }
    /// The cache's block layout (the contract of a KV transfer).
    fn kv_layout(&self) -> KvLayout;
    /// [`KvBlockIo::pin_host_memory`]: false where nothing is pinned.
    ///
    /// # Safety
    /// `range` must stay mapped for as long as the model lives.
    unsafe fn pin_host_memory(&mut self, range: HostRange) -> Result<bool, ModelError> {
        let _ = range;
        Ok(false)
    }
    /// [`KvBlockIo::kv_cache_memory`]: where the cache lies, for transfers that read blocks
    /// straight out of it or write them straight into it: one part, or one per rank of a
    /// tensor-parallel group (in rank order, each holding its rank's KV heads, blocks at the
    /// same offsets); empty where it cannot be handed out.
    fn kv_cache_parts(&self) -> Vec<KvCacheMemory> {
        Vec::new()
    }
    /// Copies `blocks` out of the cache, back to back, into `dst` (`blocks.len()` times the
    /// layout's block bytes, host or device memory).
    fn read_kv_blocks(&self, blocks: &[BlockId], dst: KvBytesMut<'_>) -> Result<(), ModelError>;
    /// Overwrites `blocks` with `src`, laid out as [`Self::read_kv_blocks`] produces it.
    fn write_kv_blocks(&mut self, blocks: &[BlockId], src: KvBytes<'_>) -> Result<(), ModelError>;
    /// How the forward passes since the last call split between queueing their work and
    /// waiting for the device (for the engine's [`super::profile`]); `None` where the model
    /// cannot tell or ran none. With overlapped steps one engine step queues the next pass and
    /// waits for the one before: both are its own time, whichever pass they belong to.
    fn take_forward_timing(&mut self) -> Option<ForwardTiming> {
        None
    }
}

/// A forward pass whose tokens are sampled on the device: a sampling summary per logits row
/// ([`crate::sampler::device`]) instead of the row.
///
/// A pass is submitted, then collected: between the two the host may submit the next pass,
/// whose [`ForwardBatch::chained`] tokens are the tokens this one's summaries pick, so the
/// device never waits for the host to read them ([`super`]'s overlapped steps). Passes are
/// collected in the order they were submitted.
pub trait DeviceSampling {
    /// Queues `batch` like [`StepModel::forward`] and the summaries of its logits rows as
    /// `requests` (one per row) ask, without waiting for them.
    fn submit_summarized(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<(), ModelError>;
    /// The summaries of the oldest submitted pass not collected yet, once on the host. Its
    /// rows become those [`Self::last_logits_rows`] and [`Self::summarize_last_masked`] read,
    /// and its row outputs those [`StepModel::take_row_outputs`] returns.
    fn collect_summarized(&mut self) -> Result<Vec<RowSummary>, ModelError>;
    /// [`Self::submit_summarized`] and [`Self::collect_summarized`] of one pass.
    fn forward_summarized(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, ModelError> {
        self.submit_summarized(batch, requests)?;
        self.collect_summarized()
    }
    /// Rows `rows` (ascending indices among the logits rows) of the last collected pass, for
    /// requests its summaries do not decide.
    fn last_logits_rows(&mut self, rows: &[usize]) -> Result<Vec<Vec<f32>>, ModelError>;
    /// Summaries of rows `rows` of the last collected pass, each first masked by a grammar's
    /// token mask (`masks[i]`, 32 tokens a word), as `requests` ask: constrained requests
    /// sample from a summary too instead of having their rows copied to the host.
    fn summarize_last_masked(
        &mut self,
        rows: &[usize],
        masks: &[&[u32]],
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, ModelError>;
}

/// A pass submitted through [`DeviceSampling::submit_summarized`], not collected yet.
struct SubmittedForward<T> {
    /// `None` when no row wanted logits (nothing was summarized).
    logits: Option<T>,
    row_outputs: RowOutputs,
}

/// A loaded model and a KV cache of `num_blocks` blocks of `block_size` tokens.
pub struct ModelRunner<B: Backend> {
    model: Model<B>,
    kv: B::KvCache,
    /// The logits of the last collected summarized forward, for rows sampled on the host
    /// after all.
    last_logits: Option<B::Tensor>,
    /// Summarized forwards submitted and not collected yet, oldest first.
    submitted: std::collections::VecDeque<SubmittedForward<B::Tensor>>,
    /// The row log-probabilities of the last forward, until taken.
    last_row_outputs: RowOutputs,
    /// A fault test's failures ([`ForwardFaults`]); none unless injected.
    injected_loss: InjectedDeviceLoss,
    /// The summarized forward passes' time queueing their work and waiting for their results,
    /// summed since [`StepModel::take_forward_timing`] last took it.
    timing: Option<ForwardTiming>,
}

/// Fault tests set this to N: the N+1th forward pass and every later one fail as a lost device
/// would (`BackendError::DeviceLost`), on any backend. What a sticky CUDA error does to a
/// worker (it leaves the deployment and exits; the launcher restarts it) is tested with real
/// processes on machines without a GPU this way. Unset in production; the serving worker reads
/// it once at start (`serve::test_hooks`) into [`ForwardFaults::lose_device_after`].
pub const LOSE_DEVICE_VAR: &str = "TANDEM_TEST_LOSE_DEVICE_AFTER";

/// Fault tests set this to N: the N+1th forward pass and every later one fail with an error
/// that is not a lost device (an engine whose every step fails for another reason). Unset in
/// production; read as [`LOSE_DEVICE_VAR`] is, into [`ForwardFaults::fail_forward_after`].
pub const FAIL_FORWARD_VAR: &str = "TANDEM_TEST_FAIL_FORWARD_AFTER";

/// Failures a fault test injects into a runner's forward passes ([`ModelRunner::inject_faults`]);
/// [`Default`] injects none, as in production.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardFaults {
    /// Forward passes after the first N fail as on a lost device ([`LOSE_DEVICE_VAR`]).
    pub lose_device_after: Option<u64>,
    /// Forward passes after the first N fail, not as a lost device ([`FAIL_FORWARD_VAR`]).
    pub fail_forward_after: Option<u64>,
}

/// Counts forward passes against [`ForwardFaults`].
#[derive(Debug, Default)]
struct InjectedDeviceLoss {
    faults: ForwardFaults,
    forwards: u64,
}

impl InjectedDeviceLoss {
    /// Counts a forward pass; the injected failure once past a limit.
    fn check(&mut self) -> Result<(), ModelError> {
        let ForwardFaults {
            lose_device_after,
            fail_forward_after,
        } = self.faults;
        if lose_device_after.is_none() && fail_forward_after.is_none() {
            return Ok(());
        }
        self.forwards += 1;
        if let Some(after) = lose_device_after.filter(|&after| self.forwards > after) {
            return Err(ModelError::Backend(
                crate::backend::BackendError::DeviceLost {
                    op: "forward",
                    detail: format!("injected by {LOSE_DEVICE_VAR}={after}"),
                },
            ));
        }
        if let Some(after) = fail_forward_after.filter(|&after| self.forwards > after) {
            return Err(ModelError::InvalidBatch(format!(
                "injected by {FAIL_FORWARD_VAR}={after}"
            )));
        }
        Ok(())
    }
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(model: Model<B>, block_size: usize, num_blocks: usize) -> Result<Self, ModelError> {
        let kv = model.alloc_kv_cache(block_size, num_blocks)?;
        Ok(Self {
            model,
            kv,
            last_logits: None,
            submitted: std::collections::VecDeque::new(),
            last_row_outputs: RowOutputs::default(),
            injected_loss: InjectedDeviceLoss::default(),
            timing: None,
        })
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    /// Makes later forward passes fail as `faults` says: a fault test's, counted from the
    /// next forward pass.
    pub fn inject_faults(&mut self, faults: ForwardFaults) {
        self.injected_loss = InjectedDeviceLoss {
            faults,
            forwards: 0,
        };
    }

    /// Refuses a transfer whose bytes are not exactly `blocks` whole blocks.
    fn check_len(&self, blocks: &[BlockId], len: usize) -> Result<(), ModelError> {
        let block_bytes = self.model.backend().kv_cache_layout(&self.kv).block_bytes();
        if blocks.len() * block_bytes != len {
            return Err(ModelError::InvalidBatch(format!(
                "{len} bytes for {} KV blocks of {block_bytes} bytes",
                blocks.len()
            )));
        }
        Ok(())
    }
}

impl<B: KvBlockIo> StepModel for ModelRunner<B> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_model_len(&self) -> usize {
        self.model.config().max_context()
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.model.config().eos_token_ids()
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        self.timing = None;
        self.last_row_outputs.clear();
        self.injected_loss.check()?;
        self.model
            .forward_with_row_outputs(batch, &mut self.kv, &mut self.last_row_outputs)
    }

    fn take_row_outputs(&mut self) -> RowOutputs {
        std::mem::take(&mut self.last_row_outputs)
    }

    fn take_forward_timing(&mut self) -> Option<ForwardTiming> {
        self.timing.take()
    }

    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        if self.model.backend().device_sampler().is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn kv_layout(&self) -> KvLayout {
        self.model.backend().kv_cache_layout(&self.kv)
    }

    unsafe fn pin_host_memory(&mut self, range: HostRange) -> Result<bool, ModelError> {
        // SAFETY: the caller's promise, passed on.
        Ok(unsafe { self.model.backend().pin_host_memory(range) }?)
    }

    fn kv_cache_parts(&self) -> Vec<KvCacheMemory> {
        self.model
            .backend()
            .kv_cache_memory(&self.kv)
            .into_iter()
            .collect()
    }

    fn read_kv_blocks(&self, blocks: &[BlockId], dst: KvBytesMut<'_>) -> Result<(), ModelError> {
        self.check_len(blocks, dst.len())?;
        Ok(self.model.backend().read_kv_blocks(&self.kv, blocks, dst)?)
    }

    fn write_kv_blocks(&mut self, blocks: &[BlockId], src: KvBytes<'_>) -> Result<(), ModelError> {
        self.check_len(blocks, src.len())?;
        Ok(self
            .model
            .backend()
            .write_kv_blocks(&mut self.kv, blocks, src)?)
    }
}

/// The backend's device sampler, or why a host-sampling backend was asked for summaries.
fn device_sampler<B: Backend>(backend: &B) -> Result<&dyn DeviceSampler<B::Tensor>, ModelError> {
    backend.device_sampler().ok_or_else(|| {
        ModelError::InvalidBatch(format!(
            "the {} backend samples from host rows",
            backend.describe()
        ))
    })
}

impl<B: Backend> ModelRunner<B> {
    /// The logits of the last summarized forward.
    fn kept_logits(&self) -> Result<&B::Tensor, ModelError> {
        self.last_logits.as_ref().ok_or_else(|| {
            ModelError::InvalidBatch("no logits kept from a summarized forward".into())
        })
    }
}

impl<B: Backend> DeviceSampling for ModelRunner<B> {
    fn submit_summarized(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<(), ModelError> {
        self.injected_loss.check()?;
        let start = Instant::now();
        let backend = self.model.backend();
        let sampler = device_sampler(backend)?;
        let mut row_outputs = RowOutputs::default();
        let logits =
            self.model
                .forward_logits_with_row_outputs(batch, &mut self.kv, &mut row_outputs)?;
        // The backend queues the whole pass and the sampling kernel without waiting; the
        // summaries' copy to the host is what `collect_summarized` waits for.
        let forward_queued = start.elapsed();
        if let Some(logits) = &logits {
            backend.run(|| sampler.queue_summaries(logits, requests))?;
        }
        tracing::debug!(
            tokens = batch.tokens.len(),
            rows = requests.len(),
            forward_ms = forward_queued.as_secs_f64() * 1e3,
            summaries_ms = (start.elapsed() - forward_queued).as_secs_f64() * 1e3,
            "submitted a summarized forward"
        );
        self.timing.get_or_insert_default().enqueue += start.elapsed();
        self.submitted.push_back(SubmittedForward {
            logits,
            row_outputs,
        });
        Ok(())
    }

    fn collect_summarized(&mut self) -> Result<Vec<RowSummary>, ModelError> {
        self.last_logits = None;
        self.last_row_outputs.clear();
        let submitted = self.submitted.pop_front().ok_or_else(|| {
            ModelError::InvalidBatch("no summarized forward was submitted".into())
        })?;
        let start = Instant::now();
        let summaries = match &submitted.logits {
            Some(_) => {
                let backend = self.model.backend();
                let sampler = device_sampler(backend)?;
                backend.run(|| sampler.take_summaries())?
            }
            None => Vec::new(),
        };
        self.timing.get_or_insert_default().device += start.elapsed();
        self.last_logits = submitted.logits;
        self.last_row_outputs = submitted.row_outputs;
        Ok(summaries)
    }

    fn last_logits_rows(&mut self, rows: &[usize]) -> Result<Vec<Vec<f32>>, ModelError> {
        let logits = self.kept_logits()?;
        let backend = self.model.backend();
        Ok(backend.run(|| backend.rows_to_host(logits, rows))?)
    }

    fn summarize_last_masked(
        &mut self,
        rows: &[usize],
        masks: &[&[u32]],
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, ModelError> {
        let logits = self.kept_logits()?;
        let backend = self.model.backend();
        let sampler = device_sampler(backend)?;
        Ok(backend.run(|| sampler.summarize_masked_rows(logits, rows, masks, requests))?)
    }
}
