//! The step loop: owns the model and its KV cache, the scheduler (and through it the block
//! pool) and every request's state, and turns scheduler decisions into forward passes and
//! forward passes into tokens and events.
//!
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

pub mod handle;
mod masks;
pub mod overlap;
pub mod profile;
pub mod request;
pub mod runner;
pub mod tensor_parallel;
pub mod text;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use thiserror::Error;

pub use handle::{EngineHandle, EventSink, RequestStream};
pub use request::{
    EngineEvent, EventKind, FinishReason, GenerationRequest, RequestId, RetainedKv, Usage,
};
pub use runner::{DeviceSampling, ModelRunner, StepModel};
pub use tensor_parallel::TensorParallelRunner;
pub use text::{TextDecoder, TextStep, TextStream, TokenizerText};

use crate::backend::{HostRange, KvBuffer, KvBytesMut};
use crate::model::{ForwardBatch, RowLogprobs};
use crate::sampler::device::RowRequest;
use crate::sampler::{SampledToken, Sampler, SamplingError};
pub use crate::scheduler::DEFAULT_GROWTH_RESERVE_TOKENS;
use crate::scheduler::{GroupId, Scheduler, SchedulerConfig, SchedulerError, SeqStatus};
use tandem_text::grammar::{Constraint, TokenMask};

/// Sizes of the engine's batches and cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache (the runner must have been built with as many).
    pub num_blocks: usize,
    /// Tokens in one forward: decode tokens plus prefill chunks.
    pub max_num_batched_tokens: usize,
    /// Requests scheduled at once.
    pub max_num_seqs: usize,
    /// Context limit; `None` is the model's `max_position_embeddings`. Also capped by the
    /// cache size.
    pub max_model_len: Option<usize>,
    /// Tokens of growth the scheduler keeps free for every admitted request, so that it is
    /// not preempted before it gets there (`SchedulerConfig::growth_reserve_tokens`); `None`
    /// admits on the first prompt chunk alone.
    pub growth_reserve_tokens: Option<usize>,
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
    #[error("max_tokens must be at least 1 (0 only with prompt logprobs)")]
    ZeroMaxTokens,
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

/// A prompt prefilled elsewhere (a context worker): its K/V and the token sampled after it.
#[derive(Debug)]
pub struct ImportedPrefill {
    pub kv: ImportedKv,
    pub num_tokens: usize,
    pub first_token: SampledToken,
}

/// Where an imported prefill's K/V is.
#[derive(Debug)]
pub enum ImportedKv {
    /// `blocks_for(num_tokens)` blocks of the layout's block bytes, back to back, for the
    /// engine to write into the cache: a `Vec`, or memory a transport lent (a slice of its
    /// pool: host memory, pinned on a GPU worker, or device memory), given back when the
    /// engine drops it after writing it.
    Bytes(Box<dyn KvBuffer>),
    /// Already in the blocks reserved for the request ([`Engine::reserve_import`]): the
    /// transfer wrote them there itself (a CUDA IPC pull), so the request joins the next step
    /// with no copy on the engine's side.
    InReservedBlocks,
}

impl ImportedKv {
    /// Bytes to write into the cache: `Some` for [`Self::Bytes`].
    fn bytes(&self) -> Option<crate::backend::KvBytes<'_>> {
        match self {
            ImportedKv::Bytes(kv) => Some(kv.bytes()),
            ImportedKv::InReservedBlocks => None,
        }
    }
}

/// A prompt prefilled elsewhere waiting for room (a free sequence slot and its blocks): with
/// its K/V ([`Engine::import_request`]), or before it is pulled ([`Engine::reserve_import`]).
struct PendingImport {
    id: RequestId,
    seq: Sequence,
    /// The K/V and the first token; `None` for a reservation (its caller pulls them once the
    /// room is reserved).
    arrived: Option<ArrivedKv>,
    /// Found no room when it was first considered.
    waited: bool,
}

/// Whether a lent reservation's request has ended while its blocks were lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LentReservation {
    Live,
    /// Ended: its blocks are pinned until it is handed back, then freed.
    Ended,
}

/// An imported prefill's K/V and the token sampled after it.
struct ArrivedKv {
    kv: ImportedKv,
    first_token: SampledToken,
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
}

/// The prompt positions a sequence reports in a step: `count` positions from `start`.
struct AskedLogprobs {
    id: RequestId,
    start: usize,
    count: usize,
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

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.tokens.len() - self.prompt_len,
        }
    }
}

/// Brings a resumed request's text state to where the worker that generated `resumed`
/// ([`GenerationRequest::resume_ids`]) left it: each resumed token goes through the detokenizer and stop
/// matcher as if sampled here, its text discarded (the client has it), so text held back
/// there (an incomplete character, a possible stop string) is held back here too. Refuses
/// resumed tokens that would have ended the request (a stop token or string, `max_tokens`).
fn replay_resumed(
    resumed: &[u32],
    max_tokens: usize,
    stop_token_ids: &[u32],
    mut text: Option<&mut (dyn TextStream + 'static)>,
) -> Result<(), EngineError> {
    if resumed.is_empty() {
        return Ok(());
    }
    if resumed.len() >= max_tokens {
        return Err(EngineError::Resume(format!(
            "{} tokens generated already, max_tokens is {max_tokens}",
            resumed.len()
        )));
    }
    for (position, &token) in resumed.iter().enumerate() {
        if stop_token_ids.contains(&token) {
            return Err(EngineError::Resume(format!(
                "resumed token {position} ({token}) is a stop token"
            )));
        }
        if let Some(text) = text.as_deref_mut() {
            let step = text.push(token).map_err(EngineError::Text)?;
            if step.stopped {
                return Err(EngineError::Resume(format!(
                    "resumed token {position} completes a stop string"
                )));
            }
        }
    }
    Ok(())
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
    /// samples there); `TANDEM_DEVICE_MASKS=0` sends them to the host sampler instead.
    device_masks: bool,
    /// Steps queued before the previous one is collected ([`overlap`]).
    overlap: overlap::Overlap,
}

/// Forward passes that ran and that failed, and sequences preempted, since the engine
/// started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineProgress {
    pub steps: u64,
    pub failed_steps: u64,
    pub preemptions: u64,
}

/// Consecutive failed forward passes after which the engine stops as on a lost device (every
/// request ends, new ones are refused, the worker leaves and restarts): a failure that
/// repeats whatever the batch is the engine's, not the requests', and each further step would
/// only fail more requests.
pub const MAX_FAILED_FORWARDS_IN_A_ROW: u32 = 3;

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
            prefix_caching: false,
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
            profile: profile::StepProfile::from_env(),
            progress: EngineProgress::default(),
            failed_in_a_row: 0,
            sample_groups: HashMap::new(),
            next_group: 0,
            masks: masks::MaskWorker::default(),
            device_masks: std::env::var("TANDEM_DEVICE_MASKS").map_or(true, |v| v != "0"),
            overlap: overlap::Overlap::from_env(),
        })
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    /// Steps whose successor was queued before they were collected ([`overlap`]), since start.
    pub fn steps_overlapped(&self) -> u64 {
        self.overlap.steps_in_flight
    }

    /// Whether a step may be queued before the previous one is collected ([`overlap`]; on
    /// unless `TANDEM_OVERLAP=0`). Takes effect from the next step.
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

    /// Validates and queues a request.
    pub fn add_request(&mut self, request: GenerationRequest) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.add_request_with_id(id, request, Instant::now())?;
        Ok(id)
    }

    /// The id counter, for handles that name requests before sending them here.
    pub(crate) fn id_source(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.next_id)
    }

    /// Queues a request that arrived at `arrived` (its submission to the engine thread).
    pub(crate) fn add_request_with_id(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
        arrived: Instant,
    ) -> Result<(), EngineError> {
        self.check_device()?;
        // A request reporting prompt logprobs computes its whole prompt: a share of a
        // sibling's blocks would skip the rows of the shared positions.
        let group = request.sample_group.clone().filter(|_| {
            request.resume_ids.is_empty()
                && !request.prefill_only
                && request.prompt_logprobs.is_none()
        });
        let prompt = group.as_ref().map(|_| request.prompt_ids.clone());
        let mut seq = self.new_sequence(request)?;
        seq.arrived = arrived;
        match group.zip(prompt) {
            Some((name, prompt)) => {
                let group = self.sample_group(name, prompt);
                self.scheduler.add_to_group(id, seq.tokens.len(), group)?;
            }
            // A resumed request's K/V are computed for its resumed tokens too.
            None => self.scheduler.add(id, seq.tokens.len())?,
        }
        self.scheduler.set_max_len(id, seq.max_len())?;
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// The scheduler's group for samples group `name` with `prompt`: the live one of that
    /// name when its prompt is the same (the api-server sends one prompt to all choices; a
    /// different one is a new group, never a share of the wrong K/V), else a new one.
    fn sample_group(&mut self, name: String, prompt: Vec<u32>) -> GroupId {
        let scheduler = &self.scheduler;
        self.sample_groups
            .retain(|_, (group, _)| scheduler.has_group(*group));
        if let Some((group, shared)) = self.sample_groups.get(&name)
            && *shared == prompt
        {
            return *group;
        }
        let group = self.next_group;
        self.next_group += 1;
        self.sample_groups.insert(name, (group, prompt));
        group
    }

    /// Queues a request whose prompt was prefilled elsewhere: once a sequence slot and the
    /// prompt's blocks are free, its K/V are written into the cache and it continues from
    /// `prefill.first_token` (which is emitted as its first token, through the same stop and
    /// text handling as a sampled one). `request.sampling.seed` must be the seed the prefill
    /// sampled with, so later draws continue the same stream.
    pub fn import_request(
        &mut self,
        request: GenerationRequest,
        prefill: ImportedPrefill,
    ) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.import_with_id(id, request, prefill)?;
        Ok(id)
    }

    pub(crate) fn import_with_id(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
        prefill: ImportedPrefill,
    ) -> Result<(), EngineError> {
        self.check_device()?;
        self.check_imported(request.prompt_ids.len(), &prefill)?;
        if matches!(prefill.kv, ImportedKv::InReservedBlocks) {
            return Err(EngineError::ImportMismatch(
                "K/V in reserved blocks for a request that reserved none".into(),
            ));
        }
        let seq = self.import_sequence(request)?;
        self.pending_imports.push_back(PendingImport {
            id,
            seq,
            arrived: Some(ArrivedKv {
                kv: prefill.kv,
                first_token: prefill.first_token,
            }),
            waited: false,
        });
        Ok(())
    }

    /// Queues a request whose prompt is prefilled elsewhere and whose K/V the caller pulls
    /// once there is room for it: in arrival order with other imports, when a sequence slot
    /// and the prompt's blocks are free, they are reserved for it and it gets an
    /// [`EventKind::RoomReserved`] event. The caller then hands over the K/V
    /// ([`Self::import_reserved`]), or has the prompt prefilled here
    /// ([`Self::prefill_reserved`], e.g. when the pull fails), or cancels it. A request waiting
    /// for room counts as waiting ([`Self::num_waiting`]).
    pub fn reserve_import(&mut self, request: GenerationRequest) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.reserve_import_with_id(id, request)?;
        Ok(id)
    }

    pub(crate) fn reserve_import_with_id(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
    ) -> Result<(), EngineError> {
        self.check_device()?;
        let seq = self.import_sequence(request)?;
        self.pending_imports.push_back(PendingImport {
            id,
            seq,
            arrived: None,
            waited: false,
        });
        Ok(())
    }

    /// Hands over the K/V of a request whose room was reserved ([`Self::reserve_import`]):
    /// written into its reserved blocks at the start of the next step (or already there,
    /// [`ImportedKv::InReservedBlocks`]), where it continues from `prefill.first_token`. A
    /// request that has ended meanwhile (cancelled) drops the K/V; one whose K/V does not fit
    /// its prompt ends with an error.
    pub fn import_reserved(&mut self, id: RequestId, prefill: ImportedPrefill) {
        if self.reservation_back(id) {
            self.arrived_imports.push_back((id, prefill));
        }
    }

    /// The caller is done with a reservation's blocks without handing over K/V (it was
    /// cancelled before its pull): a request that ended meanwhile frees them now.
    pub fn return_reservation(&mut self, id: RequestId) {
        self.reservation_back(id);
    }

    /// A lent reservation is handed back: false when its request ended while it was lent
    /// (its blocks, pinned since, are freed now).
    fn reservation_back(&mut self, id: RequestId) -> bool {
        match self.lent_reservations.remove(&id) {
            Some(LentReservation::Ended) => {
                if let Err(e) = self.scheduler.release_pinned(id) {
                    tracing::error!("freeing the reserved blocks of request {id}: {e}");
                }
                false
            }
            Some(LentReservation::Live) | None => true,
        }
    }

    /// Has the prompt of a request reserved for an import ([`Self::reserve_import`]) prefilled
    /// here instead (its pull failed, or took too long): in its reserved blocks if it has
    /// them, else it joins the queue of requests to prefill, holding no memory until admitted.
    pub fn prefill_reserved(&mut self, id: RequestId) -> Result<(), EngineError> {
        if !self.reservation_back(id) {
            return Err(EngineError::UnknownRequest(id));
        }
        if let Some(at) = self
            .pending_imports
            .iter()
            .position(|p| p.id == id && p.arrived.is_none())
        {
            let import = self
                .pending_imports
                .remove(at)
                .expect("position is in range");
            let prompt_len = import.seq.prompt_len;
            let added = self.scheduler.add(id, prompt_len);
            match added.and_then(|()| self.scheduler.set_max_len(id, import.seq.max_len())) {
                Ok(()) => {
                    self.seqs.insert(id, import.seq);
                }
                Err(e) => self.deferred_events.push(finished_without_tokens(
                    id,
                    prompt_len,
                    FinishReason::Error(e.to_string()),
                )),
            }
            return Ok(());
        }
        if self.scheduler.status(id) == Some(SeqStatus::Reserved) {
            self.arrived_imports.retain(|(arrived, _)| *arrived != id);
            self.scheduler.start_reserved(id, false)?;
            return Ok(());
        }
        Err(EngineError::UnknownRequest(id))
    }

    /// Checks an imported prefill against its prompt and this engine: its token count, the
    /// bytes of its blocks, its first token.
    fn check_imported(
        &self,
        prompt_tokens: usize,
        prefill: &ImportedPrefill,
    ) -> Result<(), EngineError> {
        let layout = self.model.kv_layout();
        if prefill.num_tokens != prompt_tokens {
            return Err(EngineError::ImportMismatch(format!(
                "K/V of {} tokens for a prompt of {prompt_tokens}",
                prefill.num_tokens,
            )));
        }
        let expected = layout.blocks_for(prefill.num_tokens) * layout.block_bytes();
        if let Some(bytes) = prefill.kv.bytes().filter(|b| b.len() != expected) {
            return Err(EngineError::ImportMismatch(format!(
                "{} bytes of K/V for {} tokens, expected {expected}",
                bytes.len(),
                prefill.num_tokens
            )));
        }
        if prefill.first_token.id as usize >= self.vocab_size {
            return Err(EngineError::TokenOutOfRange {
                token: prefill.first_token.id,
                vocab_size: self.vocab_size,
            });
        }
        Ok(())
    }

    /// The state of a request whose prompt was prefilled elsewhere.
    fn import_sequence(&self, request: GenerationRequest) -> Result<Sequence, EngineError> {
        if request.prompt_logprobs.is_some() {
            return Err(EngineError::PromptLogprobsNeedLocalPrefill);
        }
        if !request.resume_ids.is_empty() {
            return Err(EngineError::ImportMismatch(
                "a prefill imported from a context worker cannot resume generated tokens".into(),
            ));
        }
        let seq = self.new_sequence(request)?;
        self.scheduler.check_prompt(seq.prompt_len)?;
        Ok(seq)
    }

    /// Refuses work once the device is lost.
    fn check_device(&self) -> Result<(), EngineError> {
        match &self.device_lost {
            Some(reason) => Err(EngineError::DeviceLost(reason.clone())),
            None => Ok(()),
        }
    }

    /// Validates a request and builds its state.
    fn new_sequence(&self, request: GenerationRequest) -> Result<Sequence, EngineError> {
        if let Some(&token) = request
            .prompt_ids
            .iter()
            .chain(&request.resume_ids)
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(EngineError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            });
        }
        if request.max_tokens == 0 && request.prompt_logprobs.is_none() {
            return Err(EngineError::ZeroMaxTokens);
        }
        if request.prefill_only && request.prompt_logprobs.is_some() {
            return Err(EngineError::PromptLogprobsNeedLocalPrefill);
        }
        let sampler = Sampler::new(request.sampling)?;
        let mut text = match &self.text {
            Some(decoder) => Some(
                decoder
                    .start(&request.prompt_ids, &request.stop_strings)
                    .map_err(EngineError::Text)?,
            ),
            None if !request.stop_strings.is_empty() => {
                return Err(EngineError::StopStringsNeedTokenizer);
            }
            None => None,
        };
        let mut stop_token_ids = request.stop_token_ids;
        if !request.ignore_eos {
            stop_token_ids.extend(&self.eos_token_ids);
        }
        replay_resumed(
            &request.resume_ids,
            request.max_tokens,
            &stop_token_ids,
            text.as_deref_mut(),
        )?;
        let mut grammar = request.grammar;
        if let Some(grammar) = &mut grammar {
            // The resumed tokens were generated under the same grammar elsewhere.
            grammar.advance_all(&request.resume_ids).map_err(|e| {
                EngineError::Resume(format!("the resumed tokens do not fit the grammar: {e}"))
            })?;
            if !request.resume_ids.is_empty() && grammar.is_finished() {
                return Err(EngineError::Resume(
                    "the resumed tokens complete the grammar already".into(),
                ));
            }
        }
        let prompt_len = request.prompt_ids.len();
        let mut tokens = request.prompt_ids;
        tokens.extend(&request.resume_ids);
        Ok(Sequence {
            prompt_len,
            tokens,
            sampler,
            max_tokens: request.max_tokens,
            stop_token_ids,
            text,
            prefill_only: request.prefill_only,
            deadline: request.deadline,
            constrained: grammar.is_some(),
            grammar,
            mask: None,
            prompt_logprobs: request.prompt_logprobs.map(|k| k as usize),
            prompt_logprobs_next: 1,
            pending_row: None,
            arrived: Instant::now(),
            first_forward: None,
        })
    }

    /// Admits queued imports while there is room, in arrival order: allocates their blocks,
    /// and writes their K/V and takes their first token, or (a reservation) tells the caller
    /// to pull.
    fn admit_imports(&mut self, events: &mut Vec<EngineEvent>) {
        while let Some(front) = self.pending_imports.front_mut() {
            if !self
                .scheduler
                .can_add_computed(front.seq.prompt_len, front.seq.max_len())
            {
                front.waited = true;
                break;
            }
            let Some(import) = self.pending_imports.pop_front() else {
                break;
            };
            if import.waited {
                self.imports_waited += 1;
            }
            let id = import.id;
            let Some(arrived) = import.arrived else {
                self.reserve(id, import.seq, events);
                continue;
            };
            let max_len = import.seq.max_len();
            let blocks = match self
                .scheduler
                .add_computed(id, import.seq.prompt_len, max_len)
            {
                Ok(blocks) => blocks,
                Err(e) => {
                    events.push(finished_without_tokens(
                        id,
                        import.seq.prompt_len,
                        FinishReason::Error(format!("importing the KV cache: {e}")),
                    ));
                    continue;
                }
            };
            self.seqs.insert(id, import.seq);
            let Some(bytes) = arrived.kv.bytes() else {
                unreachable!("an import with its K/V at hand reserved no blocks to hold it")
            };
            if let Err(e) = self.model.write_kv_blocks(&blocks, bytes) {
                self.end(
                    id,
                    FinishReason::Error(format!("writing the imported KV cache: {e}")),
                    events,
                );
                continue;
            }
            self.accept_token(id, arrived.first_token, events);
        }
    }

    /// Reserves the blocks and slot of a request whose K/V is to be pulled (there is room).
    fn reserve(&mut self, id: RequestId, mut seq: Sequence, events: &mut Vec<EngineEvent>) {
        if let Err(e) = self.scheduler.reserve(id, seq.prompt_len, seq.max_len()) {
            events.push(finished_without_tokens(
                id,
                seq.prompt_len,
                FinishReason::Error(format!("reserving room for the KV cache: {e}")),
            ));
            return;
        }
        // It has started: what it waits for now is its own pull, not the engine.
        seq.deadline = None;
        self.seqs.insert(id, seq);
        self.lent_reservations.insert(id, LentReservation::Live);
        let blocks = self.scheduler.blocks(id).unwrap_or_default();
        events.push(EngineEvent {
            request_id: id,
            kind: EventKind::RoomReserved { blocks },
        });
    }

    /// Writes the K/V that arrived for reserved requests into their blocks; each continues
    /// from its first token.
    fn write_arrived_imports(&mut self, events: &mut Vec<EngineEvent>) {
        while let Some((id, prefill)) = self.arrived_imports.pop_front() {
            if self.scheduler.status(id) != Some(SeqStatus::Reserved) {
                // Ended meanwhile (cancelled): the K/V goes back to its owner.
                continue;
            }
            let Some(prompt_len) = self.seqs.get(&id).map(|seq| seq.prompt_len) else {
                continue;
            };
            if let Err(e) = self.check_imported(prompt_len, &prefill) {
                self.end(id, FinishReason::Error(e.to_string()), events);
                continue;
            }
            let blocks = match self.scheduler.start_reserved(id, true) {
                Ok(blocks) => blocks,
                Err(e) => {
                    self.end(id, FinishReason::Error(e.to_string()), events);
                    continue;
                }
            };
            let written = match prefill.kv.bytes() {
                Some(bytes) => self.model.write_kv_blocks(&blocks, bytes),
                None => Ok(()),
            };
            if let Err(e) = written {
                self.end(
                    id,
                    FinishReason::Error(format!("writing the imported KV cache: {e}")),
                    events,
                );
                continue;
            }
            self.accept_token(id, prefill.first_token, events);
        }
    }

    /// Copies the K/V of a request retained after a prefill-only run (block after block) into
    /// a new `Vec` and frees its blocks (the tests' form of [`Self::take_retained_kv_into`]).
    #[cfg(test)]
    pub(crate) fn take_retained_kv(&mut self, id: RequestId) -> Result<Vec<u8>, EngineError> {
        let blocks = self.scheduler.blocks(id).map_or(0, |b| b.len());
        let mut kv = vec![0u8; blocks * self.model.kv_layout().block_bytes()];
        self.take_retained_kv_into(id, KvBytesMut::Host(&mut kv))?;
        Ok(kv)
    }

    /// Copies the K/V of a request retained after a prefill-only run (block after block) into
    /// `dst` (the transfer's own memory, host or device, so the K/V is copied once), which
    /// must hold exactly the request's blocks, and frees its blocks, either way: the context
    /// worker's hand-over to a transfer.
    pub fn take_retained_kv_into(
        &mut self,
        id: RequestId,
        dst: KvBytesMut<'_>,
    ) -> Result<(), EngineError> {
        if self.scheduler.status(id) != Some(SeqStatus::Pinned) {
            return Err(EngineError::UnknownRequest(id));
        }
        let blocks = self.scheduler.blocks(id).unwrap_or_default();
        let read = self.model.read_kv_blocks(&blocks, dst);
        self.scheduler.release_pinned(id)?;
        Ok(read?)
    }

    /// Where the KV cache lies ([`StepModel::kv_cache_parts`]): a context worker hands a
    /// prompt's blocks to decode workers straight out of it, pinned until released
    /// ([`Self::release_kv`]); a decode worker's CUDA IPC pulls write into blocks reserved for
    /// them ([`Self::reserve_import`]).
    pub fn kv_cache_parts(&self) -> Vec<crate::backend::KvCacheMemory> {
        self.model.kv_cache_parts()
    }

    /// Pins `range` for the device ([`StepModel::pin_host_memory`]): K/V copied into or out
    /// of it then skips the backend's staging buffer. False where there is nothing to pin.
    ///
    /// # Safety
    /// `range` must stay mapped for as long as the engine lives.
    pub unsafe fn pin_host_memory(&mut self, range: HostRange) -> Result<bool, EngineError> {
        // SAFETY: the caller's promise, passed on.
        Ok(unsafe { self.model.pin_host_memory(range) }?)
    }

    /// Ends a request at the start of the next step (its blocks are freed there). False when
    /// the request is not active (already ended, or retained after a prefill).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let active = (self.seqs.contains_key(&id)
            || self.pending_imports.iter().any(|p| p.id == id))
            && self.scheduler.status(id) != Some(SeqStatus::Pinned)
            && !self.pending_cancel.contains(&id);
        if active {
            self.pending_cancel.push(id);
        }
        active
    }

    /// Frees the blocks a prefill-only request retained.
    pub fn release_kv(&mut self, id: RequestId) -> Result<(), EngineError> {
        if self.scheduler.status(id) != Some(SeqStatus::Pinned) {
            return Err(EngineError::UnknownRequest(id));
        }
        self.scheduler.release_pinned(id)?;
        Ok(())
    }

    /// Runs one step; returns the events of every request it touched.
    pub fn step(&mut self) -> Vec<EngineEvent> {
        let start = Instant::now();
        // What earlier calls left (a collect without a step of its own) is not this step's.
        let _ = self.model.take_forward_timing();
        let mut events = std::mem::take(&mut self.deferred_events);
        for id in std::mem::take(&mut self.pending_cancel) {
            if let Some(at) = self.pending_imports.iter().position(|p| p.id == id) {
                let import = self
                    .pending_imports
                    .remove(at)
                    .expect("position is in range");
                events.push(finished_without_tokens(
                    id,
                    import.seq.prompt_len,
                    FinishReason::Cancelled,
                ));
            } else {
                self.end(id, FinishReason::Cancelled, &mut events);
            }
        }
        self.write_arrived_imports(&mut events);
        self.admit_imports(&mut events);
        self.drop_expired(&mut events);
        let mut decision = self.scheduler.schedule();
        self.progress.preemptions += decision.preempted.len() as u64;
        if !decision.preempted.is_empty() {
            tracing::debug!(preempted = ?decision.preempted, "KV cache full: preempted for recompute");
        }
        if decision.is_empty() {
            self.collect_in_flight(&mut events);
            return events;
        }
        let mut batch = ForwardBatch::default();
        let (mut decode_tokens, mut prompt_tokens) = (0, 0);
        let mut asked = Vec::new();
        // Requests with `max_tokens` 0 whose prompt this step completes: they end after it,
        // sampling nothing.
        let mut prompt_done = Vec::new();
        for item in &mut decision.scheduled {
            let seq = self
                .seqs
                .get_mut(&item.id)
                .expect("the scheduler schedules only sequences the engine holds");
            // Started: a preemption later does not make it droppable.
            seq.deadline = None;
            seq.first_forward.get_or_insert(start);
            if item.cached_len >= seq.prompt_len {
                decode_tokens += item.token_count;
            } else {
                prompt_tokens += item.token_count;
            }
            if item.wants_logits && seq.max_tokens == 0 {
                item.wants_logits = false;
                prompt_done.push(item.id);
            }
            let new_tokens = &seq.tokens[item.cached_len..item.cached_len + item.token_count];
            match seq.pending_row {
                // The decode of the token the in-flight step picks: the device fills it in.
                Some(row) if item.token_count == 1 && item.cached_len + 1 == seq.tokens.len() => {
                    batch.push_chained(
                        item.cached_len,
                        item.block_table.clone(),
                        item.wants_logits,
                        row,
                    )
                }
                _ => batch.push(
                    new_tokens,
                    item.cached_len,
                    item.block_table.clone(),
                    item.wants_logits,
                ),
            }
            if let Some(request) = prompt_rows(seq, item.cached_len, item.token_count) {
                asked.push(AskedLogprobs {
                    id: item.id,
                    start: item.cached_len + request.first + 1,
                    count: request.targets.len(),
                });
                batch.want_row_logprobs(request);
            }
        }
        self.start_masks(&decision.scheduled);
        let scheduled_at = Instant::now();
        let mut record = profile::StepRecord {
            decode_tokens,
            prompt_tokens,
            preempted: decision.preempted.len(),
            sequences: decision.scheduled.len(),
            schedule: scheduled_at - start,
            ..Default::default()
        };
        if self.model.device_sampling().is_some() {
            let overlap = self.overlap.enabled && prompt_done.is_empty();
            self.forward_and_sample_on_device(
                &batch,
                decision.scheduled,
                asked,
                overlap,
                &mut events,
            );
        } else {
            self.forward_and_sample_on_host(&batch, &decision.scheduled, &asked, &mut events);
        }
        for id in prompt_done {
            // Still running unless the forward failed (then it has ended already).
            self.end(id, FinishReason::Length, &mut events);
        }
        record.overlapped = self.overlap.in_flight.is_some();
        if let Some(profile) = &mut self.profile {
            let took = scheduled_at.elapsed();
            record.forward = self
                .model
                .take_forward_timing()
                .unwrap_or(profile::ForwardTiming {
                    enqueue: took,
                    device: std::time::Duration::ZERO,
                });
            record.sample = took.saturating_sub(record.forward.enqueue + record.forward.device);
            profile.record_step(&record);
        }
        events
    }

    /// Ends the requests whose deadline passed before their first forward pass.
    fn drop_expired(&mut self, events: &mut Vec<EngineEvent>) {
        let now = Instant::now();
        let expired: Vec<RequestId> = self
            .seqs
            .iter()
            .filter(|(_, seq)| seq.deadline.is_some_and(|deadline| deadline <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            tracing::debug!(
                request_id = id,
                "deadline passed before the engine started it"
            );
            self.end(
                id,
                FinishReason::Error(
                    "the request's deadline passed before the engine started it".into(),
                ),
                events,
            );
        }
    }

    /// The forward pass whose logits rows come to the host, where every token is sampled.
    fn forward_and_sample_on_host(
        &mut self,
        batch: &ForwardBatch,
        scheduled: &[crate::scheduler::ScheduledSeq],
        asked: &[AskedLogprobs],
        events: &mut Vec<EngineEvent>,
    ) {
        let forward = self.model.forward(batch);
        self.finish_masks(events);
        let rows = match forward {
            Ok(rows) if rows.len() == batch.logits_rows() => {
                self.forward_ran();
                rows
            }
            Ok(rows) => {
                let message = format!(
                    "the model returned {} logits rows for {} sequences",
                    rows.len(),
                    batch.logits_rows()
                );
                self.fail_all(scheduled, &message, events);
                return;
            }
            Err(e) => {
                self.forward_failed(scheduled, &e, events);
                return;
            }
        };
        self.report_prompt_logprobs(asked, events);
        let wanting = scheduled.iter().filter(|s| s.wants_logits);
        for (item, mut logits) in wanting.zip(rows) {
            self.on_logits(item.id, &mut logits, events);
        }
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

    /// The forward pass with sampling on the device: each request whose token the device's
    /// summary decides skips the copy of its logits row; the others (penalties, `logit_bias`,
    /// invalid logits) get their row and the host sampler, with the same random draw.
    ///
    /// The pass is submitted before the in-flight step (if any) is collected; with `overlap`,
    /// a pass whose every token the device decides stays in flight itself ([`overlap`]).
    fn forward_and_sample_on_device(
        &mut self,
        batch: &ForwardBatch,
        scheduled: Vec<crate::scheduler::ScheduledSeq>,
        asked: Vec<AskedLogprobs>,
        overlap: bool,
        events: &mut Vec<EngineEvent>,
    ) {
        let wanting: Vec<RequestId> = scheduled
            .iter()
            .filter(|s| s.wants_logits)
            .map(|s| s.id)
            .collect();
        // Requests that need their full row still get a summary row (the cheapest kind).
        let placeholder = RowRequest {
            temperature: 0.0,
            uniform: 0.0,
            candidates: false,
            truncation: None,
        };
        let requests: Vec<Option<RowRequest>> = wanting
            .iter()
            .map(|id| {
                let seq = self.seqs.get_mut(id)?;
                if seq.constrained {
                    // Its row comes to the host for the grammar's mask.
                    return None;
                }
                let step = seq.generated().len() as u64;
                seq.sampler.device_request(step, self.vocab_size)
            })
            .collect();
        let summary_requests: Vec<RowRequest> =
            requests.iter().map(|r| r.unwrap_or(placeholder)).collect();
        let submitted = self
            .model
            .device_sampling()
            .expect("step() samples on the device only for a model that can")
            .submit_summarized(batch, &summary_requests);
        let mut step = overlap::DeviceStep {
            serial: 0,
            scheduled,
            wanting,
            requests,
            asked,
        };
        if submitted.is_ok() {
            step.serial = self.overlap.submitted(&step.scheduled);
        }
        // The in-flight step next: its tokens were this pass's chained inputs, and its events
        // come before this one's.
        self.collect_in_flight(events);
        if self.device_lost.is_some() {
            // Collecting it found the device lost: every request has ended, nothing to read.
            return;
        }
        if let Err(e) = submitted {
            self.finish_masks(events);
            self.forward_failed(&step.scheduled, &e, events);
            return;
        }
        // In flight only when some sequence continues: a step whose tokens all end their
        // sequences (a context worker's prefills) is collected at once, for its first tokens.
        if overlap && step.device_decides_all() && self.speculate(&step) > 0 {
            self.overlap.steps_in_flight += 1;
            self.overlap.in_flight = Some(step);
        } else {
            self.collect_device_step(step, events);
        }
    }

    /// Waits for a submitted step's summaries and takes its tokens: sampled from the
    /// summaries where they decide, from the logits rows on the host where not.
    fn collect_device_step(&mut self, step: overlap::DeviceStep, events: &mut Vec<EngineEvent>) {
        let overlap::DeviceStep {
            serial,
            scheduled,
            wanting,
            requests,
            asked,
        } = step;
        let forward = self
            .model
            .device_sampling()
            .expect("step() samples on the device only for a model that can")
            .collect_summarized();
        // Done on the device (or failed): what it may have written is free to reuse.
        self.step_completed(serial);
        self.finish_masks(events);
        let summaries = match forward {
            Ok(summaries) if summaries.len() == wanting.len() => {
                self.forward_ran();
                summaries
            }
            Ok(summaries) => {
                let message = format!(
                    "the model returned {} sampling summaries for {} sequences",
                    summaries.len(),
                    wanting.len()
                );
                self.fail_all(&scheduled, &message, events);
                return;
            }
            Err(e) => {
                self.forward_failed(&scheduled, &e, events);
                return;
            }
        };
        self.report_prompt_logprobs(&asked, events);
        let mut sampled: Vec<Option<SampledToken>> = wanting
            .iter()
            .zip(&requests)
            .zip(&summaries)
            .map(|((id, request), summary)| {
                // Constrained requests take the host path (their row gets the grammar's
                // mask), and so do requests ended since the forward (their row is dropped)
                // and those the device was asked nothing for (penalties, bias).
                let seq = self.seqs.get(id).filter(|seq| !seq.constrained)?;
                request.and_then(|_| seq.sampler.sample_from_summary(summary, self.vocab_size))
            })
            .collect();
        // A sequence whose next decode is queued already ran it on the device's pick: the
        // summary must decide the same token, or that decode computed the wrong one.
        for ((id, token), summary) in wanting.iter().zip(&sampled).zip(&summaries) {
            let Some(seq) = self.seqs.get(id) else {
                continue;
            };
            if seq.pending_row.is_some() && token.as_ref().map(|t| t.id) != Some(summary.drawn) {
                let message = if summary.non_finite > 0 {
                    format!(
                        "sampling: logits contain {} NaN or +inf values: the forward pass produced invalid values",
                        summary.non_finite
                    )
                } else {
                    format!(
                        "sampling: the host read token {:?} where the device picked {} for the queued step",
                        token.as_ref().map(|t| t.id),
                        summary.drawn
                    )
                };
                self.end(*id, FinishReason::Error(message), events);
            }
        }
        if self.device_masks && !self.sample_constrained_on_device(&wanting, &mut sampled, events) {
            return;
        }
        let on_host: Vec<usize> = (0..wanting.len())
            .filter(|&i| sampled[i].is_none() && self.seqs.contains_key(&wanting[i]))
            .collect();
        let host_rows = if on_host.is_empty() {
            Vec::new()
        } else {
            let rows = self
                .model
                .device_sampling()
                .expect("step() samples on the device only for a model that can")
                .last_logits_rows(&on_host);
            let message = match rows {
                Ok(rows) if rows.len() == on_host.len() => Ok(rows),
                Ok(rows) => Err(format!(
                    "the model returned {} logits rows for {} sequences",
                    rows.len(),
                    on_host.len()
                )),
                Err(e) if e.is_device_lost() => {
                    let message = format!("copying logits rows for host sampling failed: {e}");
                    self.lose_device(message, events);
                    return;
                }
                Err(e) => Err(format!("copying logits rows for host sampling failed: {e}")),
            };
            match message {
                Ok(rows) => rows,
                Err(message) => {
                    tracing::error!("{message}");
                    self.fail_all(&scheduled, &message, events);
                    return;
                }
            }
        };
        let mut host_rows = on_host.iter().zip(host_rows).peekable();
        for (i, (id, token)) in wanting.into_iter().zip(sampled).enumerate() {
            match token {
                Some(token) => self.accept_token(id, token, events),
                None => {
                    if let Some((_, mut row)) = host_rows.next_if(|(row, _)| **row == i) {
                        self.on_logits(id, &mut row, events);
                    }
                }
            }
        }
    }

    /// Constrained requests whose sampler can use a device summary (no penalties or bias) get
    /// their grammar's mask applied to their logits row on the device and sample from the
    /// masked row's summary, so their rows never come to the host; the rest (and any row whose
    /// summary does not decide) stay on the host path, where `on_logits` masks the row. Returns false when the device was lost (every request ended).
    fn sample_constrained_on_device(
        &mut self,
        wanting: &[RequestId],
        sampled: &mut [Option<SampledToken>],
        events: &mut Vec<EngineEvent>,
    ) -> bool {
        let mut rows = Vec::new();
        let mut requests = Vec::new();
        for (i, id) in wanting.iter().enumerate() {
            let Some(seq) = self.seqs.get_mut(id) else {
                continue;
            };
            if !seq.constrained || !matches!(seq.mask, Some(Ok(_))) {
                continue;
            }
            let step = seq.generated().len() as u64;
            if let Some(request) = seq.sampler.device_request(step, self.vocab_size) {
                rows.push(i);
                requests.push(request);
            }
        }
        if rows.is_empty() {
            return true;
        }
        let masks: Vec<&[u32]> = rows
            .iter()
            .map(|&i| match &self.seqs[&wanting[i]].mask {
                Some(Ok(mask)) => mask.words(),
                _ => unreachable!("rows holds constrained requests with a mask"),
            })
            .collect();
        let summaries = self
            .model
            .device_sampling()
            .expect("step() samples on the device only for a model that can")
            .summarize_last_masked(&rows, &masks, &requests);
        let summaries = match summaries {
            Ok(summaries) if summaries.len() == rows.len() => summaries,
            Ok(summaries) => {
                tracing::warn!(
                    summaries = summaries.len(),
                    rows = rows.len(),
                    "masked summaries do not match their rows; constrained rows sampled on the host"
                );
                return true;
            }
            Err(e) if e.is_device_lost() => {
                self.lose_device(format!("masking constrained rows failed: {e}"), events);
                return false;
            }
            Err(e) => {
                tracing::warn!(
                    "masking constrained rows on the device failed, sampling them on the host: {e}"
                );
                return true;
            }
        };
        for (&i, summary) in rows.iter().zip(&summaries) {
            let Some(seq) = self.seqs.get_mut(&wanting[i]) else {
                continue;
            };
            if let Some(token) = seq.sampler.sample_from_summary(summary, self.vocab_size) {
                // The mask is spent; the token advances the grammar in `accept_token`.
                seq.mask = None;
                sampled[i] = Some(token);
            }
        }
        true
    }

    /// Emits the prompt logprobs the forward computed for the sequences that asked (before
    /// any token of theirs), and moves each one's next position past them. A sequence whose
    /// rows did not come back, or came back not finite, ends with an error: never a response
    /// with positions missing.
    fn report_prompt_logprobs(&mut self, asked: &[AskedLogprobs], events: &mut Vec<EngineEvent>) {
        if asked.is_empty() {
            return;
        }
        let mut lists = self.model.take_row_logprobs().into_iter();
        for ask in asked {
            let list = lists.next().unwrap_or_default();
            let failure = if list.len() != ask.count {
                Some(format!(
                    "the model computed {} prompt logprobs of {}",
                    list.len(),
                    ask.count
                ))
            } else if list.iter().any(|l| l.logprob.is_nan()) {
                Some("the forward pass produced invalid logits for the prompt".to_string())
            } else {
                None
            };
            if let Some(message) = failure {
                tracing::error!(request_id = ask.id, "prompt logprobs: {message}");
                self.end(ask.id, FinishReason::Error(message), events);
                continue;
            }
            let Some(seq) = self.seqs.get_mut(&ask.id) else {
                continue;
            };
            seq.prompt_logprobs_next = ask.start + ask.count;
            events.push(EngineEvent {
                request_id: ask.id,
                kind: EventKind::PromptLogprobs {
                    start: ask.start,
                    logprobs: list,
                },
            });
        }
    }

    /// A failed forward pass ends the requests of its step; one that lost the device ends
    /// every request ([`Self::lose_device`]).
    fn forward_failed(
        &mut self,
        scheduled: &[crate::scheduler::ScheduledSeq],
        error: &crate::model::ModelError,
        events: &mut Vec<EngineEvent>,
    ) {
        let message = format!("forward pass failed: {error}");
        self.progress.failed_steps += 1;
        self.failed_in_a_row += 1;
        if error.is_device_lost() {
            self.lose_device(message, events);
        } else if self.failed_in_a_row >= MAX_FAILED_FORWARDS_IN_A_ROW {
            let message = format!(
                "{} forward passes in a row failed, the last: {error}",
                self.failed_in_a_row
            );
            self.lose_device(message, events);
        } else {
            tracing::error!("{message}");
            self.fail_all(scheduled, &message, events);
        }
    }

    /// Counts a forward pass that ran.
    fn forward_ran(&mut self) {
        self.progress.steps += 1;
        self.failed_in_a_row = 0;
    }

    /// Forward passes that ran and that failed since start.
    pub fn progress(&self) -> EngineProgress {
        self.progress
    }

    /// The device is unusable: every request, running or queued, ends with `message` (their
    /// clients hear it now rather than when their turn comes to fail), and the engine takes
    /// nothing more.
    fn lose_device(&mut self, message: String, events: &mut Vec<EngineEvent>) {
        let mut ids: Vec<RequestId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        tracing::error!(
            requests = ids.len() + self.pending_imports.len(),
            "{message}; ending every request, taking no more"
        );
        for id in ids {
            self.end(id, FinishReason::Error(message.clone()), events);
        }
        for import in std::mem::take(&mut self.pending_imports) {
            events.push(finished_without_tokens(
                import.id,
                import.seq.prompt_len,
                FinishReason::Error(message.clone()),
            ));
        }
        self.arrived_imports.clear();
        self.pending_cancel.clear();
        for id in self.overlap.abandon() {
            if let Err(e) = self.scheduler.finish(id) {
                tracing::error!("freeing blocks of request {id}: {e}");
            }
        }
        self.device_lost = Some(message);
    }

    fn fail_all(
        &mut self,
        scheduled: &[crate::scheduler::ScheduledSeq],
        message: &str,
        events: &mut Vec<EngineEvent>,
    ) {
        for item in scheduled {
            self.end(item.id, FinishReason::Error(message.to_owned()), events);
        }
    }

    /// Hands the grammar states of the step's constrained sequences that will sample to the
    /// mask thread, which computes their masks while the forward pass runs.
    fn start_masks(&mut self, scheduled: &[crate::scheduler::ScheduledSeq]) {
        let jobs: Vec<masks::MaskJob> = scheduled
            .iter()
            .filter(|item| item.wants_logits)
            .filter_map(|item| {
                let seq = self.seqs.get_mut(&item.id)?;
                seq.mask = None;
                Some(masks::MaskJob {
                    id: item.id,
                    constraint: seq.grammar.take()?,
                    mask: None,
                })
            })
            .collect();
        self.masks.submit(jobs);
    }

    /// Takes the grammar states back from the mask thread with their masks (waiting for it if
    /// it is not done); a request whose state was lost ends with an error.
    fn finish_masks(&mut self, events: &mut Vec<EngineEvent>) {
        match self.masks.collect() {
            Ok(jobs) => {
                for job in jobs {
                    if let Some(seq) = self.seqs.get_mut(&job.id) {
                        seq.grammar = Some(job.constraint);
                        seq.mask = job.mask;
                    }
                }
            }
            Err(lost) => {
                tracing::error!(
                    requests = lost.len(),
                    "the grammar mask thread stopped; ending its requests"
                );
                for id in lost {
                    self.end(
                        id,
                        FinishReason::Error("grammar: the mask thread stopped".into()),
                        events,
                    );
                }
            }
        }
    }

    /// Samples the next token of `id` and applies the stop conditions.
    fn on_logits(&mut self, id: RequestId, logits: &mut [f32], events: &mut Vec<EngineEvent>) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        if seq.constrained {
            let mask = match (seq.mask.take(), seq.grammar.as_mut()) {
                (Some(mask), _) => mask,
                // Not computed during the forward (no mask thread): now.
                (None, Some(grammar)) => grammar.compute_mask().map_err(|e| e.to_string()),
                (None, None) => Err("the grammar's state was lost".to_string()),
            };
            match mask {
                Ok(mask) => mask.apply(logits),
                Err(e) => {
                    self.end(id, FinishReason::Error(format!("grammar: {e}")), events);
                    return;
                }
            }
        }
        let sampled = match seq
            .sampler
            .sample(logits, &seq.tokens, &seq.tokens[seq.prompt_len..])
        {
            Ok(sampled) => sampled,
            Err(e) => {
                self.end(id, FinishReason::Error(format!("sampling: {e}")), events);
                return;
            }
        };
        self.accept_token(id, sampled, events);
    }

    /// Appends a token (sampled here, or imported with a prefill) to `id` and applies the stop
    /// conditions: the token's event, and the request's end when it is the last.
    fn accept_token(
        &mut self,
        id: RequestId,
        sampled: SampledToken,
        events: &mut Vec<EngineEvent>,
    ) {
        let max_context_len = self.scheduler.max_context_len();
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        // A token the next step already decodes replaces its placeholder; the scheduler
        // counted it when the placeholder was set.
        let counted = seq.pending_row.take().is_some();
        if counted {
            *seq.tokens.last_mut().expect("a placeholder is a token") = sampled.id;
        } else {
            seq.tokens.push(sampled.id);
        }
        let mut reason = None;
        let mut text_delta = String::new();
        let stop_token = seq.stop_token_ids.contains(&sampled.id);
        // The grammar is complete: nothing may follow (EOS forced, without a step for it).
        let mut grammar_end = false;
        if !stop_token && let Some(grammar) = seq.grammar.as_mut() {
            match grammar.advance(sampled.id) {
                Ok(()) => grammar_end = grammar.is_finished(),
                Err(e) => reason = Some(FinishReason::Error(e.to_string())),
            }
        }
        if stop_token {
            // The stop token's own text (an EOS marker) is not part of the output.
            reason = Some(FinishReason::Stop);
        } else if let Some(text) = seq.text.as_mut() {
            match text.push(sampled.id) {
                Ok(step) => {
                    text_delta = step.delta;
                    if step.stopped {
                        reason = Some(FinishReason::Stop);
                    }
                }
                Err(e) => reason = Some(FinishReason::Error(format!("detokenizing: {e}"))),
            }
        }
        if reason.is_none() && grammar_end {
            reason = Some(FinishReason::Stop);
        }
        if reason.is_none()
            && (seq.generated().len() >= seq.max_tokens
                || seq.prefill_only
                || seq.tokens.len() >= max_context_len)
        {
            reason = Some(FinishReason::Length);
        }
        // Text held back for a possible stop string is final once nothing else can follow
        // (unless a stop string matched: then it is the stop string, never emitted).
        if (stop_token || grammar_end || reason == Some(FinishReason::Length))
            && let Some(text) = seq.text.as_mut()
        {
            text_delta.push_str(&text.flush());
        }
        events.push(EngineEvent {
            request_id: id,
            kind: EventKind::Token {
                id: sampled.id,
                text_delta,
                logprob: sampled.logprob,
                top_logprobs: sampled.top_logprobs,
            },
        });
        match reason {
            Some(reason) => self.end(id, reason, events),
            None if counted => {}
            None => {
                if let Err(e) = self.scheduler.append_token(id) {
                    self.end(id, FinishReason::Error(e.to_string()), events);
                }
            }
        }
    }

    /// The one way out of a request: frees (or, for a finished prefill-only request, retains)
    /// its blocks and emits its `Finished` event.
    fn end(&mut self, id: RequestId, reason: FinishReason, events: &mut Vec<EngineEvent>) {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return;
        };
        if seq.pending_row.take().is_some() {
            // Ended before its in-flight token was read: that token is not the request's.
            seq.tokens.pop();
        }
        let retain = seq.prefill_only && reason == FinishReason::Length;
        let retained_kv = if retain {
            match self.scheduler.pin(id) {
                Ok(block_table) => {
                    // Its first token is out now, so it has had a forward pass.
                    let first_forward = seq.first_forward.unwrap_or(seq.arrived);
                    Some(RetainedKv {
                        block_table,
                        num_tokens: seq.prompt_len,
                        queued: first_forward.saturating_duration_since(seq.arrived),
                        prefill: first_forward.elapsed(),
                    })
                }
                Err(e) => {
                    tracing::error!("retaining KV of request {id}: {e}");
                    None
                }
            }
        } else if let Some(lent) = self.lent_reservations.get_mut(&id) {
            // A transfer may still be writing its reserved blocks: they stay allocated until
            // the caller hands the request back.
            match self.scheduler.pin(id) {
                Ok(_) => *lent = LentReservation::Ended,
                Err(e) => tracing::error!("holding the reserved blocks of request {id}: {e}"),
            }
            None
        } else if let Some(serial) = self.overlap.writer_of(id) {
            // A queued step may still write its blocks: they stay allocated until it is done.
            match self.scheduler.pin(id) {
                Ok(_) => self.overlap.defer_release(serial, id),
                Err(e) => tracing::error!("holding the blocks of request {id}: {e}"),
            }
            None
        } else {
            if let Err(e) = self.scheduler.finish(id) {
                tracing::error!("freeing blocks of request {id}: {e}");
            }
            None
        };
        events.push(EngineEvent {
            request_id: id,
            kind: EventKind::Finished {
                reason,
                usage: seq.usage(),
                retained_kv,
            },
        });
    }
}

/// The rows of a chunk of `seq` (positions `cached .. cached + count`) whose logits score
/// prompt positions not reported yet: row `p` scores position `p + 1`, for `p + 1` from the
/// sequence's next unreported position to the prompt's last. `None` for a sequence that asks
/// for no prompt logprobs, or a chunk with none left to report (a decode step, a recompute of
/// positions reported before its preemption).
fn prompt_rows(seq: &Sequence, cached: usize, count: usize) -> Option<RowLogprobs> {
    let top_k = seq.prompt_logprobs?;
    let first_row = seq.prompt_logprobs_next - 1;
    if first_row < cached {
        // Rows before the chunk were never reported: no path computes a prompt without its
        // rows (shares and imports are refused), so this would be a bug; the api-server sees
        // the missing positions and fails the request.
        tracing::error!(
            first_row,
            cached,
            "prompt logprobs: positions before this chunk were not reported"
        );
    }
    let start = first_row.max(cached);
    let end = (cached + count).min(seq.prompt_len.saturating_sub(1));
    (start < end).then(|| RowLogprobs {
        first: start - cached,
        targets: seq.tokens[start + 1..end + 1].to_vec(),
        top_k,
    })
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
            },
            retained_kv: None,
        },
    }
}

#[cfg(test)]
mod tests;
