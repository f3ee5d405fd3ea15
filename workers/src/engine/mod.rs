//! The step loop: owns the model and its KV cache, the scheduler (and through it the block
//! pool) and every request's state, and turns scheduler decisions into forward passes and
//! forward passes into tokens and events.
//!
//! This file holds the engine's state ([`Engine`], each request's `Sequence`), its
//! configuration and errors; its work is spread over one file per concern:
//!
//! - `admission`: requests in: validation, a request's state, samples groups.
//! - `imports`: prompts prefilled elsewhere: imports, reservations, writing their K/V.
//! - `step`: one step: cancellations and deadlines, the batch, the forward pass's path.
//! - `sampling`: tokens from a forward pass: on the host, from the device's summaries,
//!   constrained rows and their grammar masks.
//! - `accept`: a token's stop conditions, and `Engine::end`, the one way out of a request.
//! - `logprobs`: prompt logprobs: the rows a chunk asks for, and their report.
//! - `failures`: failed forward passes and the lost device.
//! - `kv_access`: K/V handed out: retained prefills read and released, the cache's memory.
//! - [`overlap`]: steps queued before the previous one is collected.
//! - `speculation`: drafts proposed by [`drafter`], verified by a decode's extra rows.
//! - [`profile`]: where the steps' time goes.
//! - [`settings`]: the engine's switches (overlap, device masks, the profile's interval),
//!   read from the environment only where a binary builds its config.
//! - [`request`]: requests in, events out.
//! - [`runner`]: the model and its KV cache behind [`StepModel`].
//! - [`text`]: incremental text and stop strings, behind [`TextDecoder`].
//! - [`handle`]: the engine on its own thread, reached through a channel.
//!
//! One [`Engine::step`]: apply pending cancellations, ask the scheduler for a step, build the
//! [`ForwardBatch`] (decodes and prefill chunks together), run it, sample one token for every
//! sequence whose chunk reached its last known token, check stop conditions, emit events, and
//! free the blocks of every request that ended. Every way out of a request (finished, stopped,
//! cancelled, failed) goes through `Engine::end`, which frees its blocks; so once all
//! requests have ended, [`Engine::free_blocks`] is back at its starting value.
//!
//! A prompt prefilled elsewhere enters through [`Engine::import_request`] (its K/V at hand) or,
//! on a decode worker that has not pulled it yet, through [`Engine::reserve_import`]: the
//! request waits in arrival order until a sequence slot and the prompt's blocks are free, has
//! them reserved, and tells its caller with [`EventKind::RoomReserved`]; only then does the
//! caller pull the K/V ([`Engine::import_reserved`]), so pulled K/V never waits in memory for
//! room in the cache. A pull that fails becomes a local prefill in the reserved blocks
//! ([`Engine::prefill_reserved`]).
//!
//! A request with a grammar (structured outputs) holds its llguidance state
//! ([`tandem_text::grammar::Constraint`]): its mask for the next token is computed on the
//! mask thread (`engine/masks.rs`) while the forward pass runs, applied to its logits row (`-inf` for every
//! token the grammar forbids) before sampling, and every token it gets (sampled, imported
//! with a prefill, or resumed) advances it; at the grammar's end it stops.
//!
//! Sampling is per request and reproducible: a token depends on the request's seed, its
//! position and its logits, and the model computes a sequence's logits bitwise the same
//! whatever else is in the batch; so a request gives the same tokens alone or batched, and
//! after a preemption (its prompt and generated tokens are recomputed, not resampled).

mod accept;
mod admission;
pub mod drafter;
mod failures;
pub mod handle;
mod imports;
mod kv_access;
mod logprobs;
mod masks;
pub mod overlap;
pub mod profile;
pub mod request;
pub mod runner;
mod sampling;
pub mod settings;
mod speculation;
mod step;
pub mod tensor_parallel;
pub mod text;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use thiserror::Error;

pub use failures::MAX_FAILED_FORWARDS_IN_A_ROW;
pub use handle::{EngineHandle, EventSink, KvEventReceiver, RequestStream};
pub use imports::{ImportedKv, ImportedPrefill};
pub use request::{
    AdapterRef, EngineEvent, EventKind, FinishReason, GenerationRequest, RequestId, RetainedKv,
    Usage,
};
pub use runner::{DeviceSampling, ForwardFaults, ModelRunner, StepModel};
pub use settings::EngineSettings;
pub use speculation::DraftCounts;
pub use tensor_parallel::TensorParallelRunner;
pub use text::{TextDecoder, TextOptions, TextStep, TextStream, TokenizerText};

use crate::model::ForwardBatch;
use crate::sampler::{Sampler, SamplingError};
pub use crate::scheduler::DEFAULT_GROWTH_RESERVE_TOKENS;
use crate::scheduler::{GroupId, Scheduler, SchedulerConfig, SchedulerError};
use imports::{LentReservation, PendingImport};
use tandem_protocol::block_hash::BlockHash;
use tandem_text::grammar::{Constraint, TokenMask};

/// Sizes of the engine's batches and cache, and its switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache (the runner must have been built with as many).
    pub num_blocks: usize,
    /// Tokens in one forward: decode tokens plus prefill chunks.
    pub max_num_batched_tokens: usize,
    /// Requests scheduled at once.
    pub max_num_seqs: usize,
    /// Context limit; `None` is the model's [`tandem_model::ModelConfig::max_context`]. Also capped by the
    /// cache size.
    pub max_model_len: Option<usize>,
    /// Tokens of growth the scheduler keeps free for every admitted request, so that it is
    /// not preempted before it gets there (`SchedulerConfig::growth_reserve_tokens`); `None`
    /// admits on the first prompt chunk alone.
    pub growth_reserve_tokens: Option<usize>,
    /// Keep computed prompt blocks for later requests with the same prefix (the scheduler's
    /// "Cached prefixes"): on by default.
    pub prefix_caching: bool,
    /// What the K/V depend on besides their tokens (the model directory's fingerprint): the
    /// root of every cached block's name, so that names, which leave the worker in KV
    /// events, never match another model's. Routers compute prompts' names from it.
    pub cache_namespace: String,
    /// Switches of the step loop, set by the binary's flags and environment.
    pub settings: EngineSettings,
    /// Speculative decoding from every sequence's own tokens (n-gram lookup, [`drafter`]);
    /// `None`: only requests with a prediction draft.
    pub speculation: Option<drafter::DraftConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 1024,
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            max_model_len: None,
            growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
            prefix_caching: true,
            cache_namespace: String::new(),
            settings: EngineSettings::default(),
            speculation: None,
        }
    }
}

/// Why a request was refused, or the engine could not be built.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("invalid engine configuration: {0}")]
    Config(#[from] SchedulerError),
    #[error("prompt token {token} is outside the model's vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("max_tokens must be at least 1 (0 only with prompt logprobs or an embedding)")]
    ZeroMaxTokens,
    /// An embedding request that would also generate, or that is not computed here whole.
    #[error(
        "an embedding request generates nothing (max_tokens 0) and prefills its prompt here: not prefill-only, an import or a resumed request"
    )]
    EmbeddingGenerates,
    #[error(
        "prompt logprobs are computed where the prompt is prefilled in full: not by a prefill-only request or an import"
    )]
    PromptLogprobsNeedLocalPrefill,
    /// A resumed request ([`GenerationRequest::resume_ids`]) that has nothing left to do, or
    /// whose resumed tokens would have ended it already.
    #[error("cannot resume the request: {0}")]
    Resume(String),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("stop strings need an engine with a tokenizer")]
    StopStringsNeedTokenizer,
    #[error("text decoding: {0}")]
    Text(String),
    #[error("request {0} is not known to the engine")]
    UnknownRequest(RequestId),
    #[error("the engine has stopped")]
    Stopped,
    #[error("imported KV cache does not fit the request: {0}")]
    ImportMismatch(String),
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
    /// The engine's device failed for good ([`Engine::device_lost`]); it takes nothing more.
    #[error("this worker's device failed and it is restarting: {0}")]
    DeviceLost(String),
}

/// One request's state beside its scheduler entry.
struct Sequence {
    prompt_len: usize,
    /// Prompt then generated tokens; the scheduler computes K/V from this list, so a
    /// preempted sequence recomputes exactly what it had.
    tokens: Vec<u32>,
    sampler: Sampler,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    text: Option<Box<dyn TextStream>>,
    prefill_only: bool,
    /// [`GenerationRequest::deadline`], until the sequence's first forward pass.
    deadline: Option<Instant>,
    /// The grammar's state ([`GenerationRequest::grammar`]); `None` while it is on the mask
    /// thread, or for a request without one (see `constrained`).
    grammar: Option<Constraint>,
    /// Whether the request has a grammar (its state may be away on the mask thread).
    constrained: bool,
    /// The mask for the next sampled token, computed during the step's forward pass.
    mask: Option<Result<TokenMask, String>>,
    /// [`GenerationRequest::prompt_logprobs`]: alternatives per prompt position.
    prompt_logprobs: Option<usize>,
    /// [`GenerationRequest::embedding`]: the prompt's last hidden state is reported when the
    /// step that completes the prompt runs.
    embedding: bool,
    /// The next prompt position whose logprob is to be reported (1 at the start: position 0
    /// has none); a recompute after a preemption skips the rows of positions before it.
    prompt_logprobs_next: usize,
    /// While the in-flight step's token for this sequence is on the device: its row there.
    /// The last of `tokens` is then [`overlap::PENDING_TOKEN`] ([`overlap`]).
    pending_row: Option<usize>,
    /// When the request arrived ([`RetainedKv::queued`] counts from it).
    arrived: Instant,
    /// When its first forward pass ran (kept through preemptions: the wait before it is the
    /// queue's, the time after it the prefill's).
    first_forward: Option<Instant>,
    /// The root its blocks' names chain from (model and salt), when it takes part in prefix
    /// caching: not with prompt logprobs (every prompt row must be computed here).
    cache_root: Option<BlockHash>,
    /// [`GenerationRequest::priority`].
    priority: i32,
    /// [`GenerationRequest::adapter`]'s index: every forward of the sequence computes with it.
    adapter: Option<u32>,
    /// Proposes its drafts ([`GenerationRequest::prediction`], or the engine's
    /// [`EngineConfig::speculation`]); `None`: plain decodes.
    drafter: Option<drafter::Drafter>,
    /// The draft proposed for the next step, until its rows are sampled.
    draft: Vec<u32>,
    drafts: DraftCounts,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The most tokens it can reach: its prompt and `max_tokens` (the scheduler keeps room
    /// for it to grow up to there); a prefill-only request (a context worker's) does not grow.
    fn max_len(&self) -> usize {
        if self.prefill_only {
            self.tokens.len()
        } else {
            self.prompt_len.saturating_add(self.max_tokens)
        }
    }

    fn usage(&self, cached_tokens: usize) -> Usage {
        let prediction = self
            .drafter
            .as_ref()
            .is_some_and(|d| matches!(d.source(), drafter::DraftSource::Prediction(_)));
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.tokens.len() - self.prompt_len,
            cached_tokens: cached_tokens.min(self.prompt_len),
            prediction: prediction.then_some(self.drafts),
        }
    }
}

/// The engine of one worker. Single-threaded by design: [`handle::EngineHandle`] runs it on a
/// dedicated thread and feeds it commands.
pub struct Engine<M: StepModel> {
    model: M,
    scheduler: Scheduler,
    text: Option<Arc<dyn TextDecoder>>,
    seqs: HashMap<RequestId, Sequence>,
    /// Imported prefills and reservations for them, admitted in arrival order at the start of
    /// a step.
    pending_imports: VecDeque<PendingImport>,
    /// K/V pulled for reservations ([`Self::import_reserved`]), written at the start of the
    /// next step.
    arrived_imports: VecDeque<(RequestId, ImportedPrefill)>,
    /// Events of requests that ended between steps, delivered with the next step's.
    deferred_events: Vec<EngineEvent>,
    /// Imports and reservations that found no room at once, since start.
    imports_waited: u64,
    /// Reservations whose blocks are the caller's to fill ([`EventKind::RoomReserved`] sent):
    /// a transfer may be writing them ([`ImportedKv::InReservedBlocks`]) until the caller
    /// hands the request back ([`Self::import_reserved`], [`Self::prefill_reserved`],
    /// [`Self::return_reservation`]). One that ends before that (a cancel) is pinned: its
    /// blocks go to nobody else until it is handed back.
    lent_reservations: HashMap<RequestId, LentReservation>,
    pending_cancel: Vec<RequestId>,
    /// Shared with handles so they can name a request before the engine sees it.
    next_id: Arc<AtomicU64>,
    eos_token_ids: Vec<u32>,
    vocab_size: usize,
    /// Why the device is unusable, once a step found it so: every request has been ended and
    /// new ones are refused (the worker leaves the deployment and restarts).
    device_lost: Option<String>,
    /// Where the steps' time goes ([`profile`]); `None` when its log lines are off.
    profile: Option<profile::StepProfile>,
    /// Forward passes that ran and that failed, and sequences preempted (a high rate: the
    /// cache is too small), since start: heartbeats carry them, so an api-server sees an engine
    /// that makes no progress.
    progress: EngineProgress,
    /// Forward passes failed since the last that ran: past [`MAX_FAILED_FORWARDS_IN_A_ROW`]
    /// the engine gives up as on a lost device.
    failed_in_a_row: u32,
    /// Samples groups by the name requests give ([`GenerationRequest::sample_group`]): the
    /// scheduler's group and the prompt its members share. Entries whose group the scheduler
    /// no longer has are dropped at the next grouped request.
    sample_groups: HashMap<String, (GroupId, Vec<u32>)>,
    next_group: GroupId,
    /// Computes constrained sequences' masks while the forward pass runs.
    masks: masks::MaskWorker,
    /// Whether constrained rows are masked and summarized on the device (a backend that
    /// samples there); off sends them to the host sampler ([`EngineSettings::device_masks`]).
    device_masks: bool,
    /// Steps queued before the previous one is collected ([`overlap`]).
    overlap: overlap::Overlap,
    /// What the K/V depend on besides tokens (a model fingerprint): part of every cached
    /// block's name ([`EngineConfig::cache_namespace`]).
    cache_namespace: String,
    /// [`EngineConfig::speculation`].
    speculation: Option<drafter::DraftConfig>,
}

/// Forward passes that ran and that failed, and sequences preempted, since the engine
/// started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineProgress {
    pub steps: u64,
    pub failed_steps: u64,
    pub preemptions: u64,
    /// Draft tokens verified (speculative decoding), and those of them kept.
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
}

impl<M: StepModel> Engine<M> {
    /// `model` must own a KV cache of `config.num_blocks` blocks of `config.block_size`
    /// tokens. Without `text`, events carry no text and stop strings are refused.
    pub fn new(
        model: M,
        config: EngineConfig,
        text: Option<Arc<dyn TextDecoder>>,
    ) -> Result<Self, EngineError> {
        let max_model_len = config
            .max_model_len
            .unwrap_or(model.max_model_len())
            .min(model.max_model_len());
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_batched_tokens: config.max_num_batched_tokens,
            max_num_seqs: config.max_num_seqs,
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            max_model_len,
            growth_reserve_tokens: config.growth_reserve_tokens,
            prefix_caching: config.prefix_caching,
        })?;
        Ok(Self {
            eos_token_ids: model.eos_token_ids(),
            vocab_size: model.vocab_size(),
            model,
            scheduler,
            text,
            seqs: HashMap::new(),
            pending_imports: VecDeque::new(),
            arrived_imports: VecDeque::new(),
            deferred_events: Vec::new(),
            imports_waited: 0,
            lent_reservations: HashMap::new(),
            pending_cancel: Vec::new(),
            next_id: Arc::new(AtomicU64::new(1)),
            device_lost: None,
            profile: config.settings.log_interval.map(profile::StepProfile::new),
            progress: EngineProgress::default(),
            failed_in_a_row: 0,
            sample_groups: HashMap::new(),
            next_group: 0,
            masks: masks::MaskWorker::default(),
            cache_namespace: config.cache_namespace.clone(),
            device_masks: config.settings.device_masks,
            overlap: overlap::Overlap::new(config.settings.overlap),
            speculation: config.speculation,
        })
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    /// Prompt tokens looked up in the prefix cache and found there, and its evictions.
    pub fn prefix_cache_stats(&self) -> crate::kv_cache::manager::PrefixCacheStats {
        self.scheduler.prefix_cache_stats()
    }

    /// The cached blocks stored and evicted since the last call.
    pub fn take_kv_events(&mut self) -> Vec<crate::kv_cache::manager::KvEvent> {
        self.scheduler.take_kv_events()
    }

    /// Steps whose successor was queued before they were collected ([`overlap`]), since start.
    pub fn steps_overlapped(&self) -> u64 {
        self.overlap.steps_in_flight
    }

    /// Whether a step may be queued before the previous one is collected ([`overlap`]; at
    /// first [`EngineSettings::overlap`]). Takes effect from the next step.
    pub fn set_overlap(&mut self, enabled: bool) {
        self.overlap.enabled = enabled;
    }

    /// Most tokens (prompt plus generated) a request may reach.
    pub fn max_context_len(&self) -> usize {
        self.scheduler.max_context_len()
    }

    /// Free KV blocks (blocks retained for a transfer are not free).
    pub fn free_blocks(&self) -> usize {
        self.scheduler.free_blocks()
    }

    pub fn total_blocks(&self) -> usize {
        self.scheduler.total_blocks()
    }

    /// Requests queued, running or holding a reservation (not counting retained prefill-only
    /// ones).
    pub fn num_active(&self) -> usize {
        self.scheduler.num_waiting()
            + self.scheduler.num_running()
            + self.scheduler.num_reserved()
            + self.pending_imports.len()
    }

    /// Why the device failed for good, if it did: the engine has ended every request and
    /// refuses new ones.
    pub fn device_lost(&self) -> Option<&str> {
        self.device_lost.as_deref()
    }

    /// Preemptions since the engine started.
    pub fn num_preemptions(&self) -> u64 {
        self.progress.preemptions
    }

    /// Requests not started: waiting for admission, or imports and reservations waiting for
    /// room.
    pub fn num_waiting(&self) -> usize {
        self.scheduler.num_waiting() + self.pending_imports.len()
    }

    /// Imports and reservations waiting for room in the cache.
    pub fn imports_waiting(&self) -> usize {
        self.pending_imports.len()
    }

    /// Imports and reservations that found no room at once, since the engine started.
    pub fn imports_waited(&self) -> u64 {
        self.imports_waited
    }

    /// The KV cache's block layout.
    pub fn kv_layout(&self) -> crate::kv_cache::KvLayout {
        self.model.kv_layout()
    }

    /// Whether [`Self::step`] has anything to do. An import that cannot be admitted yet is not
    /// work by itself: room comes only from steps of running sequences (or a release).
    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
            || self.overlap.in_flight.is_some()
            || !self.pending_cancel.is_empty()
            || !self.arrived_imports.is_empty()
            || !self.deferred_events.is_empty()
            || self.pending_imports.front().is_some_and(|p| {
                self.scheduler
                    .can_add_computed(p.seq.prompt_len, p.seq.max_len())
            })
    }

    /// Counts the time the engine thread spent handing a step's events to their sinks.
    pub(crate) fn record_delivery(&mut self, took: std::time::Duration) {
        if let Some(profile) = &mut self.profile {
            profile.record_delivery(took);
        }
    }

    /// The profile's summary line, once per interval while there is work ([`profile`]).
    pub(crate) fn profile_summary(&mut self) -> Option<String> {
        self.profile.as_mut()?.take_summary(Instant::now())
    }

    /// Forward passes that ran and that failed since start.
    pub fn progress(&self) -> EngineProgress {
        self.progress
    }
}

/// The `Finished` event of a request that ended before producing a token (refused, or
/// cancelled before it was admitted).
pub(crate) fn finished_without_tokens(
    id: RequestId,
    prompt_tokens: usize,
    reason: FinishReason,
) -> EngineEvent {
    EngineEvent {
        request_id: id,
        kind: EventKind::Finished {
            reason,
            usage: Usage {
                prompt_tokens,
                completion_tokens: 0,
                cached_tokens: 0,
                prediction: None,
            },
            retained_kv: None,
        },
    }
}

#[cfg(test)]
mod tests;
