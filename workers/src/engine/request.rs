//! What goes into the engine (a validated generation request) and what comes out of it
//! (per-request token and completion events).

use std::time::Duration;

use crate::kv_cache::block_pool::BlockId;
use crate::sampler::SamplingParams;
use tandem_text::grammar::Constraint;

/// Identifies a request inside one engine (and its stream of events).
pub type RequestId = u64;

/// A generation request in the engine's own terms: token ids and concrete limits. The edge
/// (api-server, `worker generate`) tokenizes, applies chat templates and fills defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate (the stop token, when one ends the request, counts).
    pub max_tokens: usize,
    /// Tokens that end generation. The model's EOS ids are added unless `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Strings that end generation; the text stops before the match (after it with
    /// `include_stop_str_in_output`). Needs an engine built with a tokenizer.
    pub stop_strings: Vec<String>,
    /// The text ends with the stop string that ended it (vLLM's `include_stop_str_in_output`).
    pub include_stop_str_in_output: bool,
    /// The text leaves out special tokens (vLLM's `skip_special_tokens`, true by default).
    pub skip_special_tokens: bool,
    /// Stop after the first generated token and keep the prompt's KV blocks allocated (see
    /// [`EventKind::Finished::retained_kv`]) until [`super::Engine::release_kv`]: the context
    /// worker's half of a disaggregated request.
    pub prefill_only: bool,
    /// Dropped, with an error, if the engine has not started it by then: a job that waited in
    /// the engine's queue past its deadline has had its client answered (by the api-server's
    /// timeout), so computing it would only take the place of requests that still wait.
    pub deadline: Option<std::time::Instant>,
    /// Tokens this request already generated elsewhere (a worker that failed mid-stream; the
    /// client has them): they are prefilled after the prompt and replayed through the
    /// request's text and stop handling without being emitted, then generation continues as
    /// if this engine had produced them (the seeded draw, penalties, `max_tokens` and usage
    /// all count them).
    pub resume_ids: Vec<u32>,
    /// The samples group of one of the `n` choices of a request (`n` > 1): requests of one
    /// group with the same prompt share the prompt's full KV blocks, so the prompt is
    /// prefilled once ([`crate::scheduler`], "Samples of one request share their prompt's
    /// blocks"). Ignored for a resumed request (its sequence is not the prompt alone).
    pub sample_group: Option<String>,
    /// What the output must match (structured outputs): compiled by the caller (off the
    /// engine thread), in its start state. Each sampled token is drawn under its mask and
    /// advances it; imported and resumed tokens advance it too; at the grammar's end the
    /// request stops (`FinishReason::Stop`).
    pub grammar: Option<Constraint>,
    /// Report the log-probability of every prompt token after the first (and this many best
    /// alternatives) as [`EventKind::PromptLogprobs`] events while the prompt is prefilled,
    /// each position exactly once however the prefill is chunked or recomputed. Such a request
    /// computes its prompt itself (it joins no samples group, and cannot be an import or
    /// prefill-only), and may have `max_tokens` 0: it ends after its prompt, with
    /// `FinishReason::Length` and no token (OpenAI's `echo` with `max_tokens: 0`).
    pub prompt_logprobs: Option<u32>,
    /// An embedding request: its prompt's last token's hidden state after the final norm is
    /// reported ([`EventKind::Hidden`]) by the step that completes the prompt, and it ends
    /// there (`max_tokens` 0, `FinishReason::Length`, no token). The last token is computed
    /// whatever the prefix cache holds, so such a request uses the cache as any other.
    pub embedding: bool,
    /// Isolates this request's cached prefixes (vLLM's `cache_salt`): its blocks are found
    /// only by requests with the same salt, and it finds only theirs. `None` shares with every
    /// other unsalted request.
    pub cache_salt: Option<String>,
    /// Its scheduling priority: lower is served first, and it preempts running requests of
    /// a strictly lower priority when it waits for room (the scheduler's module doc,
    /// "Priorities"). 0 by default.
    pub priority: i32,
    /// The client's predicted output, tokenized (OpenAI's `prediction`): decodes verify
    /// drafts read from it ([`super::drafter`]), which changes how fast tokens come, never
    /// which. Empty: none (the engine's own speculation, if configured, applies).
    pub prediction: Vec<u32>,
    /// The LoRA adapter the request computes with; `None`: the base model.
    pub adapter: Option<AdapterRef>,
}

/// A LoRA adapter of the engine's model ([`crate::model::lora`]), as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRef {
    /// Its index among the model's adapters ([`crate::model::Model::adapters`]).
    pub index: u32,
    /// The adapter's fingerprint: the root of its requests' cached block names in place of
    /// the base model's ([`super::EngineConfig::cache_namespace`]), so that no request of
    /// another adapter or of the base model finds their K/V.
    pub fingerprint: String,
}

impl GenerationRequest {
    /// A greedy request for `max_tokens` tokens with no stop strings.
    pub fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt_ids,
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            stop_strings: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            prefill_only: false,
            deadline: None,
            resume_ids: Vec::new(),
            sample_group: None,
            grammar: None,
            prompt_logprobs: None,
            embedding: false,
            cache_salt: None,
            priority: 0,
            prediction: Vec::new(),
            adapter: None,
        }
    }
}

/// Why a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the context limit.
    Length,
    /// Cancelled by the caller (or its event receiver went away).
    Cancelled,
    /// The request could not continue; the message is fit for the client.
    Error(String),
    /// The request's own settings left it nothing to do (every token ruled out): the
    /// client's error, naming the request field `param`, which another worker would meet too.
    Refused {
        message: String,
        param: &'static str,
    },
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens found computed (prefix cache, or a sibling sample's blocks) rather than
    /// prefilled here; OpenAI's `prompt_tokens_details.cached_tokens`.
    pub cached_tokens: usize,
    /// The draft tokens read from the request's prediction, kept and thrown away; `None`
    /// without a prediction.
    pub prediction: Option<super::DraftCounts>,
}

/// KV blocks a prefill-only request left allocated for a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedKv {
    pub block_table: Vec<BlockId>,
    /// Tokens whose K/V the blocks hold (the prompt).
    pub num_tokens: usize,
    /// From the request's arrival (its submission, when it came through an
    /// [`super::EngineHandle`]: time on the way to the engine thread counts) to its first
    /// forward pass: its wait in the engine's queue. The context worker reports it as part of
    /// the request's time to first token.
    pub queued: Duration,
    /// From its first forward pass to its first token: the prefill, every chunk of it and the
    /// steps between them.
    pub prefill: Duration,
}

/// One thing that happened to a request in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineEvent {
    pub request_id: RequestId,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// A generated token. `text_delta` is the text that became final with it: possibly empty
    /// (an incomplete UTF-8 sequence, or text held back while it may start a stop string),
    /// possibly text of earlier tokens.
    Token {
        id: u32,
        text_delta: String,
        logprob: f32,
        top_logprobs: Vec<(u32, f32)>,
    },
    /// Log-probabilities of prompt positions `start ..` (each given the tokens before it),
    /// computed by a prefill chunk; before the request's first token. Position 0 has none.
    PromptLogprobs {
        start: usize,
        logprobs: Vec<crate::model::TokenLogprob>,
    },
    /// The final-normed hidden state (`hidden_size` floats) of an embedding request's last
    /// prompt token ([`GenerationRequest::embedding`]), just before its `Finished`.
    Hidden { vector: Vec<f32> },
    /// A request queued with [`super::Engine::reserve_import`] has its prompt's blocks and a
    /// sequence slot reserved: its K/V may be pulled now ([`super::Engine::import_reserved`]).
    /// No text and no token: what the client sees starts with the imported first token.
    RoomReserved {
        /// The blocks reserved for the prompt, in its order: where a transfer that writes the
        /// cache itself puts the K/V ([`super::ImportedKv::InReservedBlocks`]).
        blocks: Vec<u32>,
        /// How many of `blocks`, from the first, the prefix cache gave with their K/V: the
        /// transfer reads and writes only the ones after them (and an import's bytes are
        /// theirs alone).
        cached_blocks: usize,
    },
    /// The last event of a request.
    Finished {
        reason: FinishReason,
        usage: Usage,
        /// Set for a `prefill_only` request that produced its first token: its blocks stay
        /// allocated until released.
        retained_kv: Option<RetainedKv>,
    },
}

impl EngineEvent {
    pub fn is_finished(&self) -> bool {
        matches!(self.kind, EventKind::Finished { .. })
    }
}
