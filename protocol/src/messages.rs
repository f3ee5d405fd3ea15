//! Versioned JSON messages on the bus.
//!
//! Every message is wrapped in an [`Envelope`] carrying `v`, the protocol version. A receiver
//! refuses a version it does not speak with [`DecodeError::Version`] instead of guessing, so a
//! mixed deployment fails loudly. Field additions that old readers can ignore keep the version;
//! anything else bumps it.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is not valid JSON for {kind}: {source}")]
    Json {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("{kind} has protocol version {found}, this build speaks {PROTOCOL_VERSION}")]
    Version { kind: &'static str, found: u32 },
}

/// `{"v": 1, ...message fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    #[serde(flatten)]
    pub body: T,
}

/// Serializes `message` in the current protocol version.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        v: PROTOCOL_VERSION,
        body: message,
    })
    .expect("protocol messages contain only JSON-representable values")
}

/// Parses a message, checking its version first so a newer peer's message is reported as a
/// version mismatch rather than as a missing field.
pub fn decode<T: DeserializeOwned>(kind: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    let version: VersionOnly =
        serde_json::from_slice(bytes).map_err(|source| DecodeError::Json { kind, source })?;
    if version.v != PROTOCOL_VERSION {
        return Err(DecodeError::Version {
            kind,
            found: version.v,
        });
    }
    let envelope: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|source| DecodeError::Json { kind, source })?;
    Ok(envelope.body)
}

/// What a worker process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerRole {
    /// Prefill only: answers with a KV handle.
    Context,
    /// Generation from a pulled KV cache (or a local prefill of short prompts).
    Decode,
    /// Prefill and decode in one process (aggregated serving).
    Both,
}

impl WorkerRole {
    /// Every role, in declaration order.
    pub const ALL: [WorkerRole; 3] = [WorkerRole::Context, WorkerRole::Decode, WorkerRole::Both];

    /// The role's name on the wire, in subjects and as `worker --role`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerRole::Context => "context",
            WorkerRole::Decode => "decode",
            WorkerRole::Both => "both",
        }
    }

    /// Whether workers of this role take generation jobs (`decode` and `both`; `context`
    /// workers only prefill).
    pub fn generates(self) -> bool {
        self != WorkerRole::Context
    }
}

impl std::fmt::Display for WorkerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`WorkerRole`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown worker role `{0}`: expected context, decode or both")]
pub struct UnknownWorkerRole(pub String);

impl std::str::FromStr for WorkerRole {
    type Err = UnknownWorkerRole;

    /// The names [`WorkerRole::as_str`] gives (those of the wire format).
    fn from_str(s: &str) -> Result<Self, UnknownWorkerRole> {
        WorkerRole::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| UnknownWorkerRole(s.to_owned()))
    }
}

/// Sampling settings of one request, already validated by the api-server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingSpec {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k limit.
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` times the most likely one (vLLM's `min_p`, in
    /// `[0, 1]`); 0 keeps them all.
    #[serde(default, skip_serializing_if = "is_zero_f32")]
    pub min_p: f32,
    /// Same seed + same prompt => same tokens, on any worker, in any batch.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    /// Number of alternatives to report per token, when logprobs are asked for.
    pub logprobs: Option<u32>,
    /// OpenAI's `logit_bias`: `(token id, bias)` added to the token's logit before sampling
    /// (-100 bans a token, 100 forces it). Ids checked against the vocabulary at the edge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `allowed_token_ids`: only these tokens may be drawn (their logits kept, every
    /// other one `-inf`, after `logit_bias`). Empty: any token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_token_ids: Vec<u32>,
    /// vLLM's `bad_words`, tokenized by the api-server: each a token sequence whose last
    /// token is not drawn where the generated tokens end with the ones before it (a
    /// one-token word is never drawn). Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad_words: Vec<Vec<u32>>,
    /// What the output must match (structured outputs, forced tool calls): the worker
    /// compiles it with llguidance and masks every token that would leave it. Absent: free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<GrammarSpec>,
    /// The log-probabilities of the prompt's own tokens, with this many alternatives each
    /// (`/v1/completions` with `echo` and `logprobs`): the worker sends them in
    /// `prompt_logprobs` messages before the first token. Absent: none. Computed where the
    /// prompt is prefilled, so the api-server sends such a job to a generation worker with a
    /// local prefill (docs/protocol.md, "Prompt logprobs").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<u32>,
}

/// A constraint on a request's output, enforced token by token on the sampler. The api-server
/// builds it from `response_format` and `tool_choice`; the worker (context and decode alike)
/// compiles it with llguidance against its tokenizer, so a decode worker resumes it by feeding
/// the tokens generated before it took over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GrammarSpec {
    /// The output is one JSON value valid against `schema` (a JSON Schema; `{"type":
    /// "object"}` for `response_format: json_object`).
    JsonSchema { schema: serde_json::Value },
    /// A grammar in llguidance's Lark dialect (which may embed `%json { schema }`), e.g. a
    /// tool call in the model family's markup.
    Lark { grammar: String },
    /// `then` after a reasoning model's thinking (the api-server's `--reasoning-parser`):
    /// the output may open with a `<think>...</think>` block of free text (`opened`: the
    /// prompt opened it, so the output starts inside it and must close it), and only what
    /// follows is held to `then` (a schema or a Lark grammar).
    AfterThinking {
        opened: bool,
        then: Box<GrammarSpec>,
    },
}

impl GrammarSpec {
    /// `self` after a reasoning model's thinking ([`GrammarSpec::AfterThinking`]); a grammar
    /// that already allows the thinking is kept.
    pub fn after_thinking(self, opened: bool) -> GrammarSpec {
        match self {
            GrammarSpec::AfterThinking { .. } => self,
            then => GrammarSpec::AfterThinking {
                opened,
                then: Box::new(then),
            },
        }
    }
}

impl Default for SamplingSpec {
    fn default() -> Self {
        SamplingSpec {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
            grammar: None,
            prompt_logprobs: None,
        }
    }
}

/// When to stop, and what the text keeps of stop strings and special tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopSpec {
    /// New tokens at most.
    pub max_tokens: u32,
    /// Extra stop token ids, on top of the model's end-of-sequence ids.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// Stop strings (OpenAI semantics: the text ends before the match).
    #[serde(default)]
    pub strings: Vec<String>,
    /// Keep generating past the model's end-of-sequence ids (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM's `min_tokens`: the first this many tokens can be neither a stop token (the
    /// model's end-of-sequence ids and `token_ids`) nor the end of a stop string; the
    /// completion then ends as usual. At most `max_tokens`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_tokens: u32,
    /// vLLM's `include_stop_str_in_output`: the text ends with the stop string that ended it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub include_stop_str_in_output: bool,
    /// vLLM's `skip_special_tokens` (default true): the text leaves out special tokens (the
    /// chat template's markers); false writes them. The stop token's own text is never
    /// written.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub skip_special_tokens: bool,
}

impl Default for StopSpec {
    fn default() -> Self {
        StopSpec {
            max_tokens: 0,
            token_ids: Vec::new(),
            strings: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            include_stop_str_in_output: false,
            skip_special_tokens: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A generation job: prompt in, tokens out on `stream_subject`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateJob {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingSpec,
    pub stop: StopSpec,
    /// Where the worker publishes [`StreamMessage`]s; the api-server subscribes before
    /// publishing the job.
    pub stream_subject: String,
    /// The worker drops the job if it has not started by then (unix ms), because the client
    /// has been answered with an error already.
    #[serde(default)]
    pub deadline_unix_ms: Option<u64>,
    /// Set on a decode job of a disaggregated request: the prompt's KV cache is on a context
    /// worker (pull it, then continue after `kv.first_token`). Absent: prefill locally. On a
    /// prefill job (`tandem.{model}.prefill…`) it is always absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<KvHandle>,
    /// Set on a prefill job by the api-server: how the generation worker chosen for the
    /// request can read K/V (its heartbeat's `kv_peer`), so the context worker exports where
    /// that reader reads fastest (CUDA IPC for a GPU of the same host, else host memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_reader: Option<KvPeer>,
    /// Set when the api-server migrates the request off a worker that failed mid-stream: the
    /// tokens that worker generated and the client already has, in order. The new worker
    /// prefills `prompt_ids` followed by these, replays them through its detokenizer, stop
    /// matcher and penalties without emitting them, and continues after them (the seeded
    /// stream at the draw for token `resume_ids.len()`, `max_tokens` counting them, usage
    /// counting them once as completion tokens). Never set with `kv`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume_ids: Vec<u32>,
    /// Set on each of the `n` jobs of one request with `n` > 1 (one job per choice, so
    /// migration, cancel, stream numbering and admission stay per choice): the worker lets
    /// the jobs of one group with the same prompt share the prompt's KV blocks (prefilled
    /// once). Absent: a request of one choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<SampleGroup>,
    /// Isolates the job's prompt in the workers' prefix caches: cached blocks are found only
    /// by jobs with the same salt (the request's `cache_salt`, combined with its tenant's when
    /// the api-server salts by API key). Absent: the unsalted cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<String>,
    /// The request's scheduling priority (vLLM's `priority`): lower is served first, and a
    /// job that waits for room preempts running jobs of a strictly lower priority. Absent: 0.
    #[serde(default, skip_serializing_if = "is_zero_priority")]
    pub priority: i32,
    /// The client's predicted output, tokenized by the api-server (OpenAI's `prediction`):
    /// the worker that decodes verifies drafts read from it (speculative decoding), which
    /// changes how fast tokens come, never which. Absent: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prediction_ids: Vec<u32>,
    /// An embedding job (`/v1/embeddings`): the worker prefills the prompt and answers with
    /// the final-normed hidden state of its last token ([`StreamMessage::Embedding`]), then
    /// `finished` with `length` and no token; `stop.max_tokens` is 0. Routed as any prompt:
    /// a context worker answers it whole, as a request that ends at its first token. Absent:
    /// false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub embedding: bool,
    /// The LoRA adapter the job computes with, by the name the workers load it under
    /// (`--lora-modules NAME=PATH`; their heartbeats' `lora_adapters`): every worker the
    /// job reaches (the context and the decode worker of a disaggregated request) must have
    /// it, and answers an error naming it otherwise. Absent: the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
}

fn is_zero_priority(priority: &i32) -> bool {
    *priority == 0
}

/// Which choice of a request with `n` > 1 a job is ([`GenerateJob::samples`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleGroup {
    /// The same for every choice of the request (the client's request id).
    pub group_id: String,
    /// This choice's `index` in the response.
    pub index: u32,
    /// The request's `n`.
    pub n: u32,
}

/// How a worker can move K/V besides UCX through host memory, advertised in its heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPeer {
    /// The machine the worker runs on (Linux's boot id): CUDA IPC works between processes of
    /// one host only.
    pub host_id: String,
    /// The worker reads CUDA IPC exports straight into its GPU (a GPU worker with a CUDA IPC
    /// pool whose reads have not failed).
    pub cuda_ipc: bool,
    /// The worker reads handles whose regions span several blocks (one region per contiguous
    /// run of blocks, in order), so a context worker exporting for it sends a handle of one
    /// region (an export is one buffer) instead of one per block: a few hundred bytes for any
    /// prompt, where one region per block takes about 40 bytes per block of the bus's
    /// `max_payload`. Absent (false) from workers that read only one region per block, which
    /// keep getting those.
    #[serde(default)]
    pub coalesced_regions: bool,
    /// The worker reads CUDA IPC exports of tensor-parallel context workers
    /// ([`KvHandle::cuda_ipc_ranks`]: one allocation per rank, each holding its rank's KV
    /// heads), whatever its own tensor-parallel size: the heads are laid out anew as they are
    /// copied. Absent (false) from workers that read one allocation only: a tensor-parallel
    /// context worker exports for them through host memory (UCX).
    #[serde(default)]
    pub cuda_ipc_ranks: bool,
    /// A context worker that shares its KV cache over CUDA IPC: the cache's allocations (one
    /// per rank, in rank order), so that GPU readers of its host map them as soon as they
    /// hear of it, not at its first hand-over (mapping a whole cache takes most of a second).
    /// Empty for other workers, and from older ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cuda_ipc_cache: Vec<CudaIpcSource>,
    /// A decode worker that reads CUDA IPC: the context workers (ids) whose shared caches, as
    /// their latest heartbeats describe them, it has mapped, so that their hand-overs to it
    /// pay no mapping. The api-server counts the pairs of one host still missing
    /// (`/health`'s `workers.cuda_ipc_unmapped`), and the launcher reports a deployment ready
    /// once none is. Empty for other workers, and from older ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cuda_ipc_mapped: Vec<String>,
}

/// Where a prefilled prompt's KV cache lies and how to read it: the context worker's answer to
/// a prefill job, carried by the decode job to the decode worker, which pulls the blocks over
/// UCX and then publishes a [`KvRelease`] to `tandem.{model}.kv.release.{worker_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvHandle {
    /// The context worker holding the blocks (release subject, logs).
    pub worker_id: String,
    /// The fingerprint of the context worker's model directory (config, weight headers and
    /// samples of the weights, 32 hex digits): a decode worker serving another model refuses
    /// the handle, since the layouts of two models of the same shapes agree. Empty from a
    /// context worker or api-server that predates it (a rolling upgrade): such a handle is
    /// checked by its layout only, with a warning.
    #[serde(default)]
    pub model_fingerprint: String,
    /// The transport that exported the blocks (`ucx`, `cuda-ipc`; tests use `in-process`).
    pub backend: KvTransportKind,
    /// The context worker's packed UCP worker address, hex.
    pub address: String,
    /// Packed remote key of the registered KV cache memory, hex.
    pub rkey: String,
    /// Where the prompt's blocks lie, in sequence order: one region per block (block `i`
    /// holds tokens `i*block_size ..`), or, for a reader whose [`KvPeer::coalesced_regions`]
    /// says it reads them, regions of several whole blocks each (an export is one region).
    pub blocks: Vec<KvRegion>,
    pub layout: KvLayoutSpec,
    /// Prompt tokens whose K/V the blocks hold.
    pub num_tokens: u32,
    /// The token the context worker sampled after the prompt.
    pub first_token: TokenEvent,
    /// The sampling seed the context worker used (so the decode worker's draws continue the
    /// same stream: same seed, same output, aggregated or not).
    pub seed: u64,
    /// The context worker frees the blocks at this time (unix ms) if no release came.
    pub expires_unix_ms: u64,
    /// Set when `backend` is `cuda-ipc`: the device memory the blocks lie in. `address` and
    /// `rkey` are then empty and each block's `addr` is an offset into that allocation.
    /// (Boxed: absent on most handles, and a handle travels inside `StreamMessage`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_ipc: Option<Box<CudaIpcSource>>,
    /// Set instead of `cuda_ipc` when the exporter is a tensor-parallel group of N ranks
    /// whose caches are shared over CUDA IPC: N allocations in rank order, rank `r`'s blocks
    /// holding KV heads `r*H/N .. (r+1)*H/N` of the layout's `H` (each block laid out as the
    /// layout says, with `H/N` heads). Each region's `addr` is an offset that holds in every
    /// allocation and its `len` counts one rank's bytes (`block_bytes / N` a block); the
    /// seal's `addr` is an offset into the first allocation. Only sent to a reader whose
    /// [`KvPeer::cuda_ipc_ranks`] says it reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cuda_ipc_ranks: Vec<CudaIpcSource>,
    /// The export's seal: random bytes the context worker wrote next to the K/V once the copy
    /// was complete, and overwrites before the memory goes back to its pool. The decode worker
    /// reads it after the K/V and uses what it read only if the seal still holds `nonce`:
    /// otherwise the export was freed (and its memory possibly reused by another request)
    /// before or during the read. Absent from a context worker older than the field: a
    /// decode worker that holds the KV secret refuses such a handle (docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<KvSeal>,
    /// HMAC-SHA256 (64 hex digits) under the deployment's KV secret, over every field above
    /// and the request the handle was exported for (its request id, stream subject and prompt;
    /// docs/protocol.md, "KV handles are signed"). A decode worker that holds the secret
    /// reads a handle only if its MAC verifies for the decode job that carries it, so a
    /// handle altered on the bus, forged, or moved to another request reads nothing. Empty
    /// (and absent on the wire) from a context worker without a secret, or older than the
    /// field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
}

/// Where an export's seal lies and what it holds while the export is live ([`KvHandle::seal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSeal {
    /// Where the seal's bytes start, addressed as the handle's regions are (an address in the
    /// context worker's registered memory, or an offset into its CUDA IPC allocation).
    pub addr: u64,
    /// The bytes the seal holds while the export is live: 16 random bytes, hex (32 digits),
    /// never all zeros (what a freed export's seal reads).
    pub nonce: String,
}

/// A context worker's GPU memory that other processes of its host can map (CUDA IPC): the
/// decode worker opens `mem_handle` and copies the blocks device to device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaIpcSource {
    /// The exporter's [`KvPeer::host_id`]; a reader on another host must not open the handle.
    pub host_id: String,
    /// The exporter's GPU (its UUID, `GPU-…`), for logs.
    pub device: String,
    /// `cuIpcGetMemHandle` of the allocation, hex (64 bytes).
    pub mem_handle: String,
    /// Bytes of that allocation (regions are checked against it).
    pub alloc_bytes: u64,
    /// Where in the allocation the exporter keeps a liveness word (16 bytes it rewrites with
    /// a new count every second while it runs): a reader keeps its mapping of the allocation
    /// open while the word moves and closes it soon after the word stops (the exporter is
    /// gone, and the mapping would keep its memory allocated). Absent from older exporters:
    /// their mappings close after a minute without a pull. Not covered by the handle's MAC
    /// (a hint about a mapping's lifetime, bounded by the mapping; an older api-server drops
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_offset: Option<u64>,
}

/// One contiguous remote region: one KV block, or a run of whole blocks
/// ([`KvPeer::coalesced_regions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRegion {
    pub addr: u64,
    pub len: u64,
}

/// The KV cache layout both sides must share for a transfer to be meaningful; a decode worker
/// refuses a handle whose layout differs from its own (never reads garbage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayoutSpec {
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub dtype: KvDTypeSpec,
    /// Bytes of one block (all layers, K and V).
    pub block_bytes: u64,
}

/// A string enum of the wire: serialized as its name, and an unknown name (from a newer peer)
/// read as `Other` rather than refused, so the reader decides what it cannot handle (a decode
/// worker answers a handle of an unknown transport by prefilling locally). `Debug` prints the
/// name as a string, as error messages showed it when the field was a `String`.
macro_rules! wire_names {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
            /// A name this build does not know.
            Other(String),
        }

        impl $name {
            /// The name on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(name) => name,
                }
            }
        }

        impl From<&str> for $name {
            fn from(name: &str) -> Self {
                match name {
                    $($text => $name::$variant,)*
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl From<String> for $name {
            fn from(name: String) -> Self {
                match $name::from(name.as_str()) {
                    $name::Other(_) => $name::Other(name),
                    known => known,
                }
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                match value {
                    $name::Other(name) => name,
                    known => known.as_str().to_owned(),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self.as_str(), f)
            }
        }
    };
}

wire_names! {
    /// The transport that moves a prompt's K/V (`KvHandle::backend`, `kv_pulled.transport`).
    KvTransportKind {
        /// Host memory, over UCX (between processes and hosts).
        Ucx = "ucx",
        /// GPU memory of one host, device to device ([`KvHandle::cuda_ipc`]).
        CudaIpc = "cuda-ipc",
        /// A registry inside one process (tests).
        InProcess = "in-process",
    }
}

wire_names! {
    /// Why a worker refused a job (`rejected.reason`).
    RejectReason {
        /// Its queue (jobs accepted and not started: waiting in the engine, pulls waiting for
        /// room in the KV cache, prefills waiting for export room) is at its bound
        /// (`worker --max-queued-requests`, the heartbeat's `max_queued`).
        QueueFull = "queue_full",
    }
}

wire_names! {
    /// The element type of a KV cache ([`KvLayoutSpec::dtype`]).
    KvDTypeSpec {
        F32 = "f32",
        Bf16 = "bf16",
        F16 = "f16",
        /// FP8 e4m3 codes with a scale of 1 (`kv_cache_config.dtype: fp8`).
        Fp8 = "fp8",
    }
}

/// The decode worker has the blocks (or gave up on them): the context worker may free them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRelease {
    pub request_id: String,
}

/// Ask every worker to stop a request (client gone, or timed out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub request_id: String,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    pub id: u32,
    /// Text this token completes, after stop-string handling (may be empty while a multi-byte
    /// character or a possible stop string is pending).
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f32>,
    /// `(token id, logprob)` alternatives, best first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The log-probability of one prompt token given the tokens before it
/// ([`StreamMessage::PromptLogprobs`]): the model's own distribution (no temperature,
/// penalties or `logit_bias`: those apply to sampling, and nothing was sampled here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLogprob {
    pub logprob: f32,
    /// The token's rank in the model's distribution at its position: 1 + the tokens more
    /// likely (vLLM's `rank`). Absent (0) from workers that predate it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rank: u32,
    /// `(token id, logprob)` alternatives, best first (ties to the lower id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Why a generation ended (OpenAI's `finish_reason`, plus the ways a request can fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    Cancelled,
    Error,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens the worker took from its prefix cache instead of computing them
    /// (OpenAI's `prompt_tokens_details.cached_tokens`). Absent when 0, and from older workers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u32,
    /// Draft tokens read from the job's prediction that the worker kept and threw away
    /// (OpenAI's `completion_tokens_details.accepted_prediction_tokens` and
    /// `rejected_prediction_tokens`). Absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub accepted_prediction_tokens: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rejected_prediction_tokens: u32,
}

fn is_zero_f32(x: &f32) -> bool {
    *x == 0.0
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a worker publishes on a request's stream subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamMessage {
    /// The job was taken (the api-server's no-worker timeout stops here).
    Accepted { worker_id: String },
    /// The job was *not* taken, instead of `accepted`: the worker holds nothing of it and
    /// sends nothing more for it. The api-server sends the same job to another worker, or
    /// answers the client 429 when none can take it.
    Rejected {
        worker_id: String,
        reason: RejectReason,
    },
    /// One or more new tokens, in order. `index` is the position of the first of them among
    /// the request's generated tokens (0 for the first token; a migrated job continues at its
    /// `resume_ids.len()`), so the api-server can tell a gap or a duplicate from a complete
    /// stream. Absent from a worker that predates it (then nothing is checked).
    Tokens {
        tokens: Vec<TokenEvent>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
    },
    /// Log-probabilities of prompt tokens (a job with `sampling.prompt_logprobs`): those of
    /// prompt positions `start ..`, in order (position 0, the first prompt token, has none:
    /// nothing precedes it). Sent as the prefill computes them, chunk by chunk, all before
    /// the first `tokens` message (or `finished`, for a job with `max_tokens` 0); a prefill
    /// computed again (a migrated job) sends them again from 1, and the api-server keeps the
    /// first copy of each position.
    PromptLogprobs {
        start: u32,
        logprobs: Vec<PromptLogprob>,
    },
    /// The answer of an embedding job ([`GenerateJob::embedding`]): the final-normed hidden
    /// state of the prompt's last token, `hidden_size` floats, not normalized (the
    /// api-server pools and normalizes as the model directory says). Just before `finished`.
    Embedding { vector: Vec<f32> },
    /// The last message of a successful or cancelled request.
    Finished { reason: FinishReason, usage: Usage },
    /// The request failed on the worker; `message` is safe to show to the client.
    Error {
        message: String,
        /// Set when the request itself is at fault (its constraints leave no token to draw):
        /// the request field to name. The api-server answers it as a bad request and moves
        /// nothing to another worker, which would fail it the same way. Absent: the worker's
        /// failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        param: Option<String>,
    },
    /// From a context worker: the prompt is prefilled and its KV cache is held for a decode
    /// worker (the last message of a prefill job that continues).
    KvReady {
        handle: Box<KvHandle>,
        /// Where the context worker's share of the time to first token went (the api-server
        /// splits a request's TTFT with it). Absent from older workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefill_timing: Option<PrefillTiming>,
        /// Prompt tokens the context worker took from its prefix cache instead of computing
        /// them (the request's `cached_tokens` when the hand-over succeeds). Absent when 0.
        #[serde(default, skip_serializing_if = "is_zero")]
        cached_tokens: u32,
    },
    /// From a decode worker: how the prompt's KV cache arrived, before the first token.
    /// `bytes`/`micros` are 0 when the pull failed, the handle was refused or the export was
    /// gone, and the decode worker prefilled the prompt itself ([`PullOutcome::Fallback`],
    /// [`PullOutcome::Refused`], [`PullOutcome::ExportGone`]).
    KvPulled {
        worker_id: String,
        bytes: u64,
        micros: u64,
        /// After a pull: how long the decode job waited for room in the decode worker's KV
        /// cache (a sequence slot and the prompt's blocks) before the pull began, in
        /// microseconds. Absent after a fallback, and from older workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room_wait_us: Option<u64>,
        /// On the wire: `transport` after a pull, `fallback` after a failed one (with
        /// `handle_refused` after a refused handle, `export_gone` after a changed seal).
        #[serde(flatten)]
        outcome: PullOutcome,
    },
}

/// The context worker's share of a disaggregated request's time to first token (`kv_ready`'s
/// `prefill_timing`), in microseconds of the context worker's clock: two intervals of its own,
/// so no clock is compared across hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillTiming {
    /// From the context worker taking the job to the prompt's first forward pass: the wait for
    /// room in its export budget and in its engine's queue.
    pub queued_us: u64,
    /// From the first forward pass to the first token: the prefill (all its chunks, and the
    /// steps of other requests batched between them).
    pub prefill_us: u64,
}

/// How a decode worker got a prompt's K/V (the `transport` / `fallback` fields of `kv_pulled`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PullOutcomeFields", into = "PullOutcomeFields")]
pub enum PullOutcome {
    /// Pulled over `transport`. A build that did not name the transport (the field is absent)
    /// could only pull over UCX.
    Pulled { transport: KvTransportKind },
    /// The pull failed (`reason`, for logs) and the decode worker prefilled the prompt itself.
    Fallback { reason: String },
    /// The decode worker refused the handle before reading or allocating anything (`reason`,
    /// for logs: its MAC did not verify for this request, it was used already, or it was
    /// malformed) and prefilled the prompt itself. On the wire a fallback with
    /// `"handle_refused": true`, which readers older than the field take for a failed pull.
    Refused { reason: String },
    /// The pull read the regions, but the export's seal ([`KvHandle::seal`]) no longer held
    /// its nonce afterwards: the context worker had freed the export (a release or cancel that
    /// came before the pull, its expiry, or a replay of a handle already pulled), and its
    /// memory may hold another request's K/V. What was read is dropped and the decode worker
    /// prefilled the prompt itself. On the wire a fallback with `"export_gone": true`, which
    /// readers older than the field take for a failed pull.
    ExportGone { reason: String },
}

/// [`PullOutcome`] as the wire spells it: optional fields, `fallback` winning when a
/// message carries both it and `transport`; `handle_refused` or `export_gone` qualifies a
/// fallback.
#[derive(Serialize, Deserialize)]
struct PullOutcomeFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fallback: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    handle_refused: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    export_gone: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transport: Option<KvTransportKind>,
}

impl From<PullOutcomeFields> for PullOutcome {
    fn from(fields: PullOutcomeFields) -> Self {
        match fields.fallback {
            Some(reason) if fields.handle_refused => PullOutcome::Refused { reason },
            Some(reason) if fields.export_gone => PullOutcome::ExportGone { reason },
            Some(reason) => PullOutcome::Fallback { reason },
            None => PullOutcome::Pulled {
                transport: fields.transport.unwrap_or(KvTransportKind::Ucx),
            },
        }
    }
}

impl From<PullOutcome> for PullOutcomeFields {
    fn from(outcome: PullOutcome) -> Self {
        match outcome {
            PullOutcome::Pulled { transport } => PullOutcomeFields {
                fallback: None,
                handle_refused: false,
                export_gone: false,
                transport: Some(transport),
            },
            PullOutcome::Fallback { reason } => PullOutcomeFields {
                fallback: Some(reason),
                handle_refused: false,
                export_gone: false,
                transport: None,
            },
            PullOutcome::Refused { reason } => PullOutcomeFields {
                fallback: Some(reason),
                handle_refused: true,
                export_gone: false,
                transport: None,
            },
            PullOutcome::ExportGone { reason } => PullOutcomeFields {
                fallback: Some(reason),
                handle_refused: false,
                export_gone: true,
                transport: None,
            },
        }
    }
}

/// Liveness and load of one worker, published every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: String,
    pub role: WorkerRole,
    /// Served model name.
    pub model: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Sequences being generated or prefilled.
    pub running: u32,
    /// Jobs accepted but not yet running.
    pub queued: u32,
    pub free_kv_blocks: u32,
    pub total_kv_blocks: u32,
    /// The worker finishes what it has and takes nothing new.
    pub draining: bool,
    /// How long receivers should wait for the next heartbeat before dropping the worker.
    pub interval_ms: u64,
    /// Context workers: KV transfer state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer: Option<KvTransferStats>,
    /// Context and decode workers: where and how the worker moves K/V (absent: UCX only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_peer: Option<KvPeer>,
    /// The engine's progress: forward passes run and failed since the worker started. A
    /// worker with work whose `engine_steps` stop moving has a stuck engine, even though its
    /// bus task still heartbeats. Absent from older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineProgress>,
    /// The most jobs the worker holds in its queue (`queued`) before it answers `rejected`
    /// (`worker --max-queued-requests`). Absent: no bound (or an older worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
    /// The most sequences the worker runs at once (`--max-num-seqs`): with `max_queued`, how
    /// many more jobs the api-server may send before the next heartbeat. Absent from older
    /// workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    /// Generation workers: their pulls of prompts' K/V from context workers. Absent from
    /// context workers and older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_pull: Option<KvPullStats>,
    /// Workers that cache prompts' blocks: how routers name them and follow the worker's KV
    /// events. Absent: no prefix cache (or an older worker), so nothing of a prompt is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<PrefixCacheInfo>,
    /// What the worker computes with: its weights' and its KV cache's types (the api-server's
    /// `tandem_worker_info`, which `tandem bench` reports). Absent from older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<WorkerNumerics>,
    /// The LoRA adapters the worker serves beside its model: jobs may name them
    /// ([`GenerateJob::lora`]). Empty: none (or an older worker).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_adapters: Vec<LoraAdapterInfo>,
}

/// One LoRA adapter a worker serves ([`Heartbeat::lora_adapters`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraAdapterInfo {
    /// The name jobs and requests use for it.
    pub name: String,
    /// The model its requests compute with (the base model's fingerprint and the adapter's
    /// bytes, 32 hex digits): their KV handles carry it as their `model_fingerprint`, and their
    /// cached blocks are named under it (a router names a prompt's blocks for this adapter
    /// with it as [`PrefixCacheInfo::namespace`]).
    pub fingerprint: String,
}

/// The number formats a worker serves in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerNumerics {
    /// The projections' weights as the worker computes with them: `fp8` (an FP8 checkpoint),
    /// `bf16` (any 16/32-bit checkpoint on a GPU), or the checkpoint's type on the CPU (`bf16`,
    /// `f16`, `f32`, or `gguf-q4_1` and the like for GGUF blocks kept quantized).
    pub weights: String,
    /// The KV cache's element type.
    pub kv_cache: KvDTypeSpec,
}

/// A worker's prefix cache as routers see it, in its heartbeats: enough to name a prompt's
/// blocks as the worker does ([`crate::block_hash`]) and to tell whether its KV events
/// ([`KvEvents`]) reached this router whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixCacheInfo {
    /// Tokens per block: a prompt's names are those of its full blocks of this size.
    pub block_size: u32,
    /// The root of the worker's block names besides the salt (its model fingerprint).
    pub namespace: String,
    /// The worker's KV event stream: `epoch` is fresh at each start (what a router knew of an
    /// earlier run is void), `seq` the number of the last batch published (0: none yet).
    pub events_epoch: String,
    pub events_seq: u64,
    /// Prompt tokens looked up in the cache since start, and those found there.
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room, since start.
    pub evicted_blocks: u64,
}

/// A batch of changes to the blocks a worker holds cached, on `tandem.{model}.kv_events.{id}`.
/// Batches are numbered 1, 2, ... within an epoch; a router that sees a gap, or another epoch,
/// asks for a [`KvSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvents {
    pub worker_id: String,
    pub epoch: String,
    pub seq: u64,
    pub events: Vec<KvEvent>,
}

/// One change: block names as their first 8 bytes ([`crate::block_hash::BlockHash::short`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEvent {
    /// Blocks computed and cached, in chain order.
    Stored { blocks: Vec<u64> },
    /// Blocks evicted: their memory holds other K/V from now on.
    Removed { blocks: Vec<u64> },
    /// Everything the worker held is gone (it starts a new epoch with this).
    Cleared,
}

/// A router's request for the blocks a worker holds, from `offset` in the worker's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSnapshotRequest {
    pub offset: u64,
}

/// A page of the blocks a worker holds, as of batch `seq` of `epoch`: `next_offset` is where
/// the next page starts (absent: the last page). The pages of one listing share `seq`; a
/// page of another `seq` means the cache changed meanwhile, and the router starts over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSnapshot {
    pub worker_id: String,
    pub epoch: String,
    pub seq: u64,
    pub blocks: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<u64>,
}

/// One api-server's question to the api-server that stored a Responses API response or a
/// conversation (the store is in each api-server's memory; their ids name the api-server that
/// made them), on `tandem.{model}.responses.{instance}`, answered with a
/// [`StoredResponseReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponseRequest {
    /// The response's id (`resp_...`).
    pub id: String,
    /// The digest of the API key the client asking holds (`None` where the api-servers take
    /// no keys): a response is found only with the key that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub op: StoredResponseOp,
    /// `op: item` and `delete_item`: the conversation item's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// `op: update_conversation`: the new metadata (a JSON object, as text); `add_items`: the
    /// items (a JSON array, each with its `id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// `op: events`: the sequence number of the last event the asker has (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
}

/// What is asked of a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredResponseOp {
    /// The `response` object as it was returned.
    Response,
    /// The input items of its own request.
    InputItems,
    /// Forget it.
    Delete,
    /// The items a follow-up continuing it starts from, as far back along its chain of
    /// `previous_response_id`s as the api-server asked stored them.
    Context,
    /// Cancel it, if it is a background response still running.
    Cancel,
    /// The events of a streamed background response after `after`, waiting a moment for
    /// more while it runs.
    Events,
    /// A conversation's `conversation` object.
    Conversation,
    /// Replace a conversation's metadata (`body`).
    UpdateConversation,
    /// Forget a conversation and its items.
    DeleteConversation,
    /// Every item of a conversation, oldest first.
    ConversationItems,
    /// Add items (`body`) after a conversation's last.
    AddItems,
    /// One item (`item`) of a conversation.
    Item,
    /// Delete one item (`item`) of a conversation.
    DeleteItem,
}

/// The answer to a [`StoredResponseRequest`]. JSON documents travel as their text, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StoredResponseReply {
    /// `op: response`: the `response` object (JSON text); `op: cancel`: the object after the
    /// cancellation (or as it finished, when it had).
    Response { response: String },
    /// `op: input_items`: a JSON array of items, each with its `id`.
    InputItems { items: String },
    /// `op: delete` or `delete_conversation`: it is forgotten.
    Deleted,
    /// `op: conversation`, `update_conversation` or `delete_item`: the `conversation` object
    /// (JSON text) after it.
    Conversation { conversation: String },
    /// `op: conversation_items`: a JSON array of the items, oldest first.
    ConversationItems { items: String },
    /// `op: item`: the item (JSON text).
    Item { item: String },
    /// `op: add_items`: they are added.
    Added,
    /// `op: events`: the events after the one asked for (their SSE text, in order; empty
    /// when none came), and whether the response has ended (then they are the last).
    Events { events: String, done: bool },
    /// `op: events`: the response was not streamed in the background, so it has no events
    /// to resume.
    NotStreamed,
    /// `op: add_items` or `update_conversation`: the conversation would hold `bytes` of JSON,
    /// over the `limit` of that api-server's store; nothing changed.
    ConversationTooLarge { bytes: usize, limit: usize },
    /// `op: context`: it is a background response still running, which nothing can continue
    /// yet.
    InProgress,
    /// `op: context`: the input and output items (a JSON array, oldest first) of the
    /// responses on the chain that this api-server stored, from the one asked for back to
    /// the first whose previous response another api-server made; `continues` names that
    /// one (absent: the chain starts here).
    Context {
        items: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        continues: Option<String>,
    },
    /// No response or conversation of that id and key is stored there (never, deleted or
    /// evicted); for `context`, `missing` names the response of the chain that is not, when it
    /// is not the one asked for, and for `item` and `delete_item` the item the conversation
    /// does not have.
    NotFound {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        missing: Option<String>,
    },
    /// The answer would not fit in one message of the NATS server (`max_payload`).
    TooLarge { bytes: usize, max_payload: usize },
}

/// A generation worker's pulls of prompts' K/V (a decode job starts its pull only once its
/// engine has reserved the prompt's blocks and a sequence slot), for /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPullStats {
    /// Decode jobs waiting for room in the KV cache before their pull starts (part of
    /// `queued`).
    pub waiting: u32,
    /// Pulls with their room reserved whose K/V is not in the cache yet (transferring, or
    /// about to be written).
    pub in_flight: u32,
    /// Decode jobs that had to wait for room, since the worker started.
    pub waited: u64,
    /// The most KV blocks held at once in pulled memory not yet written into the cache, since
    /// the worker started (each such block has a cache block reserved for it).
    pub peak_held_blocks: u32,
    /// Decode jobs whose KV handle the worker refused before reading or allocating anything
    /// (its MAC did not verify for the job, it was used already, or it was malformed), since
    /// the worker started: forged or replayed handles, or workers of one deployment with
    /// different KV secrets. Absent from older workers (0).
    #[serde(default)]
    pub refused_handles: u64,
    /// Pulls whose export's seal had changed by the end of the read
    /// ([`PullOutcome::ExportGone`]): the context worker had freed the export before or
    /// during the pull (a release or cancel that came early, forged or not, or a replayed
    /// handle), so what was read was dropped and the prompt prefilled here, since the worker
    /// started. Absent from older workers (0).
    #[serde(default)]
    pub exports_gone: u64,
}

/// Forward passes a worker's engine ran and failed since the worker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineProgress {
    pub steps: u64,
    pub failed_steps: u64,
    /// Sequences preempted (their K/V freed, to be recomputed) since the worker started: a
    /// cache too small for the load it admits. Absent from older workers (0).
    #[serde(default)]
    pub preemptions: u64,
    /// Draft tokens decodes verified (speculative decoding: clients' predictions and the
    /// worker's own n-gram drafts) since the worker started, and those of them kept. Absent
    /// from older workers (0).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub draft_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub accepted_draft_tokens: u64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// A context worker's transfer bookkeeping, for /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTransferStats {
    /// Blocks held for decode workers (pinned, not yet released; expired exports in their
    /// grace period included). Exports read in place pin them in the KV cache itself.
    pub pinned_blocks: u32,
    /// Prompt tokens those blocks hold (capped by `max_tokens_in_buffer`).
    pub pinned_tokens: u32,
    /// Handles whose blocks were freed because no release came in time, since start.
    pub expirations: u64,
    /// Handles released by decode workers, since start.
    pub releases: u64,
    /// Releases that matched no held export, since start: late (after the export expired),
    /// repeated, or sent by something other than the decode worker that pulled it. Absent
    /// from older workers (0).
    #[serde(default)]
    pub unmatched_releases: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_roles_are_named_as_on_the_wire() {
        for role in WorkerRole::ALL {
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{role}\""));
            assert_eq!(role.as_str().parse::<WorkerRole>(), Ok(role));
        }
        assert_eq!(
            serde_json::to_string(&WorkerRole::ALL).unwrap(),
            r#"["context","decode","both"]"#
        );
        let err = "prefill".parse::<WorkerRole>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown worker role `prefill`: expected context, decode or both"
        );
        assert!(!WorkerRole::Context.generates());
        assert!(WorkerRole::Decode.generates() && WorkerRole::Both.generates());
    }

    #[test]
    fn messages_round_trip_with_their_version() {
        let job = GenerateJob {
            lora: Some("sql".into()),
            request_id: "r1".into(),
            prompt_ids: vec![1, 2, 3],
            sampling: SamplingSpec {
                temperature: 0.0,
                seed: Some(7),
                min_p: 0.05,
                bad_words: vec![vec![5], vec![6, 7]],
                ..SamplingSpec::default()
            },
            stop: StopSpec {
                max_tokens: 16,
                strings: vec!["\n\n".into()],
                min_tokens: 3,
                include_stop_str_in_output: true,
                skip_special_tokens: false,
                ..StopSpec::default()
            },
            stream_subject: "tandem.m.stream.r1".into(),
            deadline_unix_ms: None,
            kv: None,
            kv_reader: Some(KvPeer {
                host_id: "b7e3".into(),
                cuda_ipc: true,
                coalesced_regions: true,
                cuda_ipc_ranks: true,
                cuda_ipc_cache: Vec::new(),
                cuda_ipc_mapped: Vec::new(),
            }),
            resume_ids: vec![9, 8],
            samples: Some(SampleGroup {
                group_id: "r1".into(),
                index: 2,
                n: 3,
            }),
            cache_salt: Some("key:ab12/conversation-1".into()),
            priority: 0,
            prediction_ids: Vec::new(),
            embedding: true,
        };
        let bytes = encode(&job);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("{\"v\":1,"), "{text}");
        assert_eq!(decode::<GenerateJob>("generate job", &bytes).unwrap(), job);
        assert!(
            text.contains(r#""samples":{"group_id":"r1","index":2,"n":3}"#),
            "{text}"
        );
        assert!(text.contains(r#""bad_words":[[5],[6,7]]"#), "{text}");
        assert!(text.contains(r#""embedding":true"#), "{text}");
        let plain = encode(&GenerateJob {
            embedding: false,
            ..job.clone()
        });
        assert!(!std::str::from_utf8(&plain).unwrap().contains("embedding"));
        let answer = StreamMessage::Embedding {
            vector: vec![0.5, -1.25],
        };
        let bytes = encode(&answer);
        assert!(
            std::str::from_utf8(&bytes)
                .unwrap()
                .contains(r#""type":"embedding","vector":[0.5,-1.25]"#)
        );
        assert_eq!(
            decode::<StreamMessage>("stream message", &bytes).unwrap(),
            answer
        );

        // An error names the request's field only when the request is at fault; one from an
        // older worker reads as the worker's failure.
        let refused = StreamMessage::Error {
            message: "no token".into(),
            param: Some("bad_words".into()),
        };
        let json = String::from_utf8(encode(&refused)).unwrap();
        assert!(json.contains(r#""param":"bad_words""#), "{json}");
        assert_eq!(
            decode::<StreamMessage>("stream", json.as_bytes()).unwrap(),
            refused
        );
        let old: StreamMessage = decode(
            "stream",
            br#"{"v":1,"type":"error","message":"engine stopped"}"#,
        )
        .unwrap();
        assert_eq!(
            old,
            StreamMessage::Error {
                message: "engine stopped".into(),
                param: None
            }
        );
        assert!(!String::from_utf8(encode(&old)).unwrap().contains("param"));

        let msg = StreamMessage::Finished {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 16,
                cached_tokens: 0,
                ..Default::default()
            },
        };
        let json = String::from_utf8(encode(&msg)).unwrap();
        assert!(json.contains("\"type\":\"finished\"") && json.contains("\"reason\":\"length\""));
        assert!(!json.contains("cached_tokens"), "absent when 0: {json}");
        let cached: StreamMessage = decode(
            "stream",
            br#"{"v":1,"type":"finished","reason":"stop","usage":{"prompt_tokens":40,"completion_tokens":2,"cached_tokens":32}}"#,
        )
        .unwrap();
        assert!(matches!(
            cached,
            StreamMessage::Finished {
                usage: Usage {
                    cached_tokens: 32,
                    ..
                },
                ..
            }
        ));
        // Token messages carry their position; one without it (an older worker) still reads.
        let tokens: StreamMessage = decode(
            "stream",
            br#"{"v":1,"type":"tokens","tokens":[{"id":5,"text":"a"}]}"#,
        )
        .unwrap();
        assert!(matches!(tokens, StreamMessage::Tokens { index: None, .. }));
        let numbered = StreamMessage::Tokens {
            tokens: vec![],
            index: Some(4),
        };
        assert!(
            String::from_utf8(encode(&numbered))
                .unwrap()
                .contains("\"index\":4")
        );
        assert_eq!(
            decode::<StreamMessage>("stream", json.as_bytes()).unwrap(),
            msg
        );
    }

    #[test]
    fn prompt_logprobs_round_trip_and_are_on_the_wire_only_when_asked() {
        let free = SamplingSpec::default();
        assert!(
            !serde_json::to_string(&free)
                .unwrap()
                .contains("prompt_logprobs")
        );
        let asking = SamplingSpec {
            prompt_logprobs: Some(2),
            ..SamplingSpec::default()
        };
        let json = serde_json::to_string(&asking).unwrap();
        assert!(json.contains(r#""prompt_logprobs":2"#), "{json}");
        assert_eq!(serde_json::from_str::<SamplingSpec>(&json).unwrap(), asking);
        // A job from an api-server that predates the field asks for none.
        let old: SamplingSpec = serde_json::from_str(
            r#"{"temperature":1.0,"top_p":1.0,"top_k":0,"seed":null,"presence_penalty":0.0,
                "frequency_penalty":0.0,"repetition_penalty":1.0,"logprobs":null}"#,
        )
        .unwrap();
        assert_eq!(old.prompt_logprobs, None);
        assert_eq!(
            old.min_p, 0.0,
            "no min-p from an api-server that predates it"
        );
        assert!(
            !serde_json::to_string(&old).unwrap().contains("min_p"),
            "left out when off"
        );
        assert!(old.bad_words.is_empty());
        assert!(!serde_json::to_string(&old).unwrap().contains("bad_words"));

        let message = StreamMessage::PromptLogprobs {
            start: 1,
            logprobs: vec![
                PromptLogprob {
                    logprob: -1.5,
                    rank: 2,
                    top_logprobs: vec![(7, -0.25), (3, -1.5)],
                },
                // A worker that predates the rank sends none.
                PromptLogprob {
                    logprob: -0.125,
                    rank: 0,
                    top_logprobs: Vec::new(),
                },
            ],
        };
        let bytes = encode(&message);
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"v":1,"type":"prompt_logprobs","start":1,"logprobs":[{"logprob":-1.5,"rank":2,"top_logprobs":[[7,-0.25],[3,-1.5]]},{"logprob":-0.125}]}"#
        );
        assert_eq!(decode::<StreamMessage>("stream", &bytes).unwrap(), message);
    }

    #[test]
    fn logit_bias_and_grammar_are_on_the_wire_only_when_set() {
        let free = SamplingSpec::default();
        let json = serde_json::to_string(&free).unwrap();
        assert!(
            !json.contains("logit_bias") && !json.contains("grammar"),
            "{json}"
        );
        let constrained = SamplingSpec {
            logit_bias: vec![(17, -100.0)],
            grammar: Some(GrammarSpec::JsonSchema {
                schema: serde_json::json!({"type": "object"}),
            }),
            ..SamplingSpec::default()
        };
        let json = serde_json::to_string(&constrained).unwrap();
        assert!(
            json.contains(r#""logit_bias":[[17,-100.0]]"#)
                && json.contains(r#""grammar":{"kind":"json_schema","schema":{"type":"object"}}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<SamplingSpec>(&json).unwrap(),
            constrained
        );
        let lark: GrammarSpec =
            serde_json::from_str(r#"{"kind":"lark","grammar":"start: \"yes\" | \"no\""}"#).unwrap();
        assert_eq!(
            lark,
            GrammarSpec::Lark {
                grammar: r#"start: "yes" | "no""#.into()
            }
        );
    }

    #[test]
    fn messages_of_builds_without_the_cuda_ipc_fields_still_decode() {
        // A job, heartbeat and handle as a build before CUDA IPC wrote them.
        let job = br#"{"v":1,"request_id":"r","prompt_ids":[1],"sampling":{"temperature":0.0,
            "top_p":1.0,"top_k":0,"seed":null,"presence_penalty":0.0,"frequency_penalty":0.0,
            "repetition_penalty":1.0,"logprobs":null},"stop":{"max_tokens":4},
            "stream_subject":"s"}"#;
        let job: GenerateJob = decode("generate job", job).unwrap();
        assert_eq!(job.kv_reader, None);
        let heartbeat = br#"{"v":1,"worker_id":"w","role":"decode","model":"m","device":"cpu",
            "running":0,"queued":0,"free_kv_blocks":1,"total_kv_blocks":1,"draining":false,
            "interval_ms":1000}"#;
        let heartbeat: Heartbeat = decode("heartbeat", heartbeat).unwrap();
        assert_eq!(heartbeat.kv_peer, None);
        // Nor a queue bound: an older worker takes every job.
        assert_eq!(
            (
                heartbeat.max_queued,
                heartbeat.max_running,
                heartbeat.kv_pull
            ),
            (None, None, None)
        );
        // A reader that predates coalesced regions reads one region per block.
        let peer: KvPeer = serde_json::from_str(r#"{"host_id":"h","cuda_ipc":false}"#).unwrap();
        assert!(!peer.coalesced_regions);
        // Nor one that predates tensor-parallel exports: a group exports for it through host
        // memory.
        assert!(!peer.cuda_ipc_ranks);
        // Nor one that predates shared caches in heartbeats: nothing to map ahead; and a
        // worker sharing none leaves the key out.
        assert!(peer.cuda_ipc_cache.is_empty());
        assert!(
            !serde_json::to_string(&peer)
                .unwrap()
                .contains("cuda_ipc_cache")
        );
        let sharing = KvPeer {
            cuda_ipc_cache: vec![CudaIpcSource {
                host_id: "h".into(),
                device: "GPU-0".into(),
                mem_handle: "00".repeat(64),
                alloc_bytes: 1 << 30,
                liveness_offset: Some(4096),
            }],
            ..peer.clone()
        };
        let text = serde_json::to_string(&sharing).unwrap();
        assert_eq!(serde_json::from_str::<KvPeer>(&text).unwrap(), sharing);
        // Nor one that predates saying which caches it mapped: it lists none, and a reader
        // that mapped none leaves the key out.
        assert!(peer.cuda_ipc_mapped.is_empty());
        assert!(!text.contains("cuda_ipc_mapped"));
        let mapped = KvPeer {
            cuda_ipc_mapped: vec!["ctx-1".into()],
            ..peer.clone()
        };
        let text = serde_json::to_string(&mapped).unwrap();
        assert!(text.contains(r#""cuda_ipc_mapped":["ctx-1"]"#), "{text}");
        assert_eq!(serde_json::from_str::<KvPeer>(&text).unwrap(), mapped);
        // A pull report without `transport`: such a build could only pull over UCX.
        let pulled = br#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":8,"micros":3}"#;
        assert!(matches!(
            decode::<StreamMessage>("stream", pulled).unwrap(),
            StreamMessage::KvPulled {
                outcome: PullOutcome::Pulled {
                    transport: KvTransportKind::Ucx
                },
                ..
            }
        ));
        // And a handle with the new field reads back whole.
        let handle = KvHandle {
            worker_id: "ctx".into(),
            model_fingerprint: "0f".repeat(16),
            backend: "cuda-ipc".into(),
            address: String::new(),
            rkey: String::new(),
            blocks: vec![KvRegion { addr: 0, len: 64 }],
            layout: KvLayoutSpec {
                num_layers: 1,
                num_kv_heads: 1,
                head_dim: 8,
                block_size: 2,
                dtype: "bf16".into(),
                block_bytes: 64,
            },
            num_tokens: 2,
            first_token: TokenEvent {
                id: 1,
                text: String::new(),
                logprob: None,
                top_logprobs: vec![],
            },
            seed: 3,
            expires_unix_ms: 4,
            cuda_ipc: Some(Box::new(CudaIpcSource {
                host_id: "b7e3".into(),
                device: "GPU-0".into(),
                mem_handle: "00".repeat(64),
                alloc_bytes: 1 << 20,
                liveness_offset: None,
            })),
            cuda_ipc_ranks: Vec::new(),
            seal: Some(KvSeal {
                addr: 64,
                nonce: "5a".repeat(16),
            }),
            mac: String::new(),
        };
        let bytes = encode(&handle);
        assert!(
            !String::from_utf8_lossy(&bytes).contains("cuda_ipc_ranks"),
            "one allocation: the handle reads as it did"
        );
        assert_eq!(decode::<KvHandle>("handle", &bytes).unwrap(), handle);
        // A tensor-parallel exporter's: its ranks' allocations, in order.
        let source = |device: &str| CudaIpcSource {
            host_id: "b7e3".into(),
            device: device.into(),
            mem_handle: "00".repeat(64),
            alloc_bytes: 1 << 20,
            liveness_offset: None,
        };
        let ranked = KvHandle {
            cuda_ipc: None,
            cuda_ipc_ranks: vec![source("GPU-0"), source("GPU-1")],
            ..handle
        };
        let bytes = encode(&ranked);
        assert!(String::from_utf8_lossy(&bytes).contains(r#""cuda_ipc_ranks":[{"host_id""#));
        assert_eq!(decode::<KvHandle>("handle", &bytes).unwrap(), ranked);
    }

    #[test]
    fn transports_are_their_wire_names() {
        for (kind, name) in [
            (KvTransportKind::Ucx, "ucx"),
            (KvTransportKind::CudaIpc, "cuda-ipc"),
            (KvTransportKind::InProcess, "in-process"),
            (KvTransportKind::Other("rdma".into()), "rdma"),
        ] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<KvTransportKind>(&json).unwrap(),
                kind
            );
            assert_eq!(kind.to_string(), name);
            assert_eq!(KvTransportKind::from(name), kind);
        }
    }

    #[test]
    fn kv_dtypes_are_their_wire_names() {
        for (dtype, name) in [
            (KvDTypeSpec::F32, "f32"),
            (KvDTypeSpec::Bf16, "bf16"),
            (KvDTypeSpec::F16, "f16"),
            (KvDTypeSpec::Fp8, "fp8"),
            (KvDTypeSpec::Other("nvfp4".into()), "nvfp4"),
        ] {
            let json = serde_json::to_string(&dtype).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<KvDTypeSpec>(&json).unwrap(), dtype);
            // Error messages print a layout with `{:?}`: the dtype reads as the string it is.
            assert_eq!(format!("{dtype:?}"), format!("\"{name}\""));
        }
    }

    fn handle_json(backend: &str, dtype: &str) -> serde_json::Value {
        serde_json::json!({
            "worker_id": "ctx", "model_fingerprint": "0f".repeat(16), "backend": backend,
            "address": "00ff", "rkey": "10", "blocks": [{"addr": 4096, "len": 128}],
            "layout": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "block_size": 16,
                       "dtype": dtype, "block_bytes": 368640},
            "num_tokens": 5, "first_token": {"id": 7, "text": "a"}, "seed": 1,
            "expires_unix_ms": 10
        })
    }

    #[test]
    fn handles_keep_their_backend_and_dtype_on_the_wire() {
        let json = handle_json("cuda-ipc", "bf16");
        let handle: KvHandle = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(handle.backend, KvTransportKind::CudaIpc);
        assert_eq!(handle.layout.dtype, KvDTypeSpec::Bf16);
        assert_eq!(serde_json::to_value(&handle).unwrap(), json);
        // An older peer's handle has no fingerprint: it reads as empty (checked by its layout
        // only).
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("model_fingerprint");
        let handle: KvHandle = serde_json::from_value(old).unwrap();
        assert_eq!(handle.model_fingerprint, "");
        // A newer peer's transport or dtype still reads, for the decode worker to refuse
        // (a local prefill, or a layout mismatch), and goes out again unchanged.
        let json = handle_json("rdma", "nvfp4");
        let handle: KvHandle = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(handle.backend, KvTransportKind::Other("rdma".into()));
        assert_eq!(handle.layout.dtype, KvDTypeSpec::Other("nvfp4".into()));
        assert_eq!(serde_json::to_value(&handle).unwrap(), json);
    }

    #[test]
    fn a_signed_handle_carries_its_mac_and_an_unsigned_one_no_field() {
        let unsigned = handle_json("ucx", "bf16");
        let handle: KvHandle = serde_json::from_value(unsigned.clone()).unwrap();
        assert_eq!(handle.mac, "", "a handle without the field is unsigned");
        assert_eq!(serde_json::to_value(&handle).unwrap(), unsigned);
        let signed = KvHandle {
            mac: "ab".repeat(32),
            ..handle
        };
        let json = serde_json::to_value(&signed).unwrap();
        let mut expected = unsigned;
        expected["mac"] = serde_json::json!("ab".repeat(32));
        assert_eq!(json, expected);
        assert_eq!(serde_json::from_value::<KvHandle>(json).unwrap(), signed);
    }

    #[test]
    fn a_sealed_handle_names_its_seal_and_an_older_one_no_field() {
        let unsealed = handle_json("ucx", "bf16");
        let handle: KvHandle = serde_json::from_value(unsealed.clone()).unwrap();
        assert_eq!(handle.seal, None, "a handle without the field has no seal");
        assert_eq!(serde_json::to_value(&handle).unwrap(), unsealed);
        let sealed = KvHandle {
            seal: Some(KvSeal {
                addr: 4224,
                nonce: "0f".repeat(16),
            }),
            ..handle
        };
        let json = serde_json::to_value(&sealed).unwrap();
        let mut expected = unsealed;
        expected["seal"] = serde_json::json!({"addr": 4224, "nonce": "0f".repeat(16)});
        assert_eq!(json, expected);
        assert_eq!(serde_json::from_value::<KvHandle>(json).unwrap(), sealed);
    }

    #[test]
    fn pull_reports_name_the_transport_or_the_fallback() {
        let pulled = |outcome| StreamMessage::KvPulled {
            worker_id: "w".into(),
            bytes: 8,
            micros: 3,
            room_wait_us: None,
            outcome,
        };
        let cases = [
            (
                pulled(PullOutcome::Pulled {
                    transport: KvTransportKind::CudaIpc,
                }),
                r#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":8,"micros":3,"transport":"cuda-ipc"}"#,
            ),
            (
                pulled(PullOutcome::Fallback {
                    reason: "KV source unavailable: gone".into(),
                }),
                r#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":8,"micros":3,"fallback":"KV source unavailable: gone"}"#,
            ),
            (
                pulled(PullOutcome::Refused {
                    reason: "its MAC does not verify".into(),
                }),
                r#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":8,"micros":3,"fallback":"its MAC does not verify","handle_refused":true}"#,
            ),
            (
                pulled(PullOutcome::ExportGone {
                    reason: "the seal changed".into(),
                }),
                r#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":8,"micros":3,"fallback":"the seal changed","export_gone":true}"#,
            ),
        ];
        for (message, json) in cases {
            assert_eq!(String::from_utf8(encode(&message)).unwrap(), json);
            assert_eq!(
                decode::<StreamMessage>("stream", json.as_bytes()).unwrap(),
                message
            );
        }
        // A report naming both is a fallback, as readers have always taken it.
        let both = br#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":0,"micros":0,
            "fallback":"why","transport":"ucx"}"#;
        assert_eq!(
            decode::<StreamMessage>("stream", both).unwrap(),
            StreamMessage::KvPulled {
                worker_id: "w".into(),
                bytes: 0,
                micros: 0,
                room_wait_us: None,
                outcome: PullOutcome::Fallback {
                    reason: "why".into()
                },
            }
        );
    }

    #[test]
    fn hand_over_messages_carry_their_parts_of_the_time_to_first_token() {
        let handle: KvHandle = serde_json::from_value(handle_json("ucx", "bf16")).unwrap();
        let ready = StreamMessage::KvReady {
            handle: Box::new(handle.clone()),
            prefill_timing: Some(PrefillTiming {
                queued_us: 1200,
                prefill_us: 45000,
            }),
            cached_tokens: 32,
        };
        let json = serde_json::to_value(&ready).unwrap();
        assert_eq!(json["cached_tokens"], 32);
        assert_eq!(
            json["prefill_timing"],
            serde_json::json!({"queued_us": 1200, "prefill_us": 45000})
        );
        assert_eq!(
            serde_json::from_value::<StreamMessage>(json).unwrap(),
            ready
        );
        let pulled = StreamMessage::KvPulled {
            worker_id: "w".into(),
            bytes: 8,
            micros: 3,
            room_wait_us: Some(40),
            outcome: PullOutcome::Pulled {
                transport: KvTransportKind::Ucx,
            },
        };
        let json = r#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":8,"micros":3,"room_wait_us":40,"transport":"ucx"}"#;
        assert_eq!(String::from_utf8(encode(&pulled)).unwrap(), json);
        assert_eq!(
            decode::<StreamMessage>("stream", json.as_bytes()).unwrap(),
            pulled
        );
        // From workers older than the fields: absent, and they go out absent again.
        let mut old = serde_json::json!({"type": "kv_ready", "handle": handle_json("ucx", "bf16")});
        let message: StreamMessage = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(
            message,
            StreamMessage::KvReady {
                handle: Box::new(handle),
                prefill_timing: None,
                cached_tokens: 0,
            }
        );
        assert_eq!(serde_json::to_value(&message).unwrap(), old.take());
        let old =
            br#"{"v":1,"type":"kv_pulled","worker_id":"w","bytes":8,"micros":3,"transport":"ucx"}"#;
        let StreamMessage::KvPulled { room_wait_us, .. } =
            decode::<StreamMessage>("stream", old).unwrap()
        else {
            panic!("a kv_pulled message");
        };
        assert_eq!(room_wait_us, None);
    }

    #[test]
    fn a_refused_job_names_its_worker_and_why() {
        let rejected = StreamMessage::Rejected {
            worker_id: "dec-1".into(),
            reason: RejectReason::QueueFull,
        };
        let json = r#"{"v":1,"type":"rejected","worker_id":"dec-1","reason":"queue_full"}"#;
        assert_eq!(String::from_utf8(encode(&rejected)).unwrap(), json);
        assert_eq!(
            decode::<StreamMessage>("stream", json.as_bytes()).unwrap(),
            rejected
        );
        // A reason from a newer worker still reads (the job was refused all the same).
        let newer = br#"{"v":1,"type":"rejected","worker_id":"w","reason":"warming_up"}"#;
        assert_eq!(
            decode::<StreamMessage>("stream", newer).unwrap(),
            StreamMessage::Rejected {
                worker_id: "w".into(),
                reason: RejectReason::Other("warming_up".into()),
            }
        );
    }

    #[test]
    fn heartbeats_carry_the_queue_bound_and_the_pulls() {
        let heartbeat = Heartbeat {
            lora_adapters: vec![LoraAdapterInfo {
                name: "sql".into(),
                fingerprint: "ab".repeat(16),
            }],
            numerics: None,
            worker_id: "dec".into(),
            role: WorkerRole::Decode,
            model: "m".into(),
            device: "cpu".into(),
            running: 2,
            queued: 3,
            free_kv_blocks: 1,
            total_kv_blocks: 16,
            draining: false,
            interval_ms: 250,
            kv_transfer: None,
            kv_peer: None,
            engine: None,
            max_queued: Some(8),
            max_running: Some(4),
            kv_pull: Some(KvPullStats {
                waiting: 3,
                in_flight: 1,
                waited: 5,
                peak_held_blocks: 7,
                refused_handles: 2,
                exports_gone: 1,
            }),
            prefix_cache: None,
        };
        let json = String::from_utf8(encode(&heartbeat)).unwrap();
        assert!(
            json.ends_with(
                r#""max_queued":8,"max_running":4,"kv_pull":{"waiting":3,"in_flight":1,"waited":5,"peak_held_blocks":7,"refused_handles":2,"exports_gone":1},"lora_adapters":[{"name":"sql","fingerprint":"abababababababababababababababab"}]}"#
            ),
            "{json}"
        );
        assert_eq!(
            decode::<Heartbeat>("heartbeat", json.as_bytes()).unwrap(),
            heartbeat
        );
        // A worker older than refused handles counts none.
        let older: KvPullStats =
            serde_json::from_str(r#"{"waiting":0,"in_flight":0,"waited":0,"peak_held_blocks":0}"#)
                .unwrap();
        assert_eq!((older.refused_handles, older.exports_gone), (0, 0));
        // With a prefix cache, the heartbeat says how to name its blocks and follow its events.
        let cached = Heartbeat {
            numerics: None,
            prefix_cache: Some(PrefixCacheInfo {
                block_size: 16,
                namespace: "fp".into(),
                events_epoch: "e1".into(),
                events_seq: 9,
                queried_tokens: 100,
                hit_tokens: 64,
                evicted_blocks: 2,
            }),
            ..heartbeat
        };
        let json = String::from_utf8(encode(&cached)).unwrap();
        assert_eq!(
            decode::<Heartbeat>("heartbeat", json.as_bytes()).unwrap(),
            cached
        );
    }

    #[test]
    fn kv_events_and_snapshots_round_trip() {
        let events = KvEvents {
            worker_id: "w".into(),
            epoch: "e".into(),
            seq: 3,
            events: vec![
                KvEvent::Cleared,
                KvEvent::Stored {
                    blocks: vec![u64::MAX, 1],
                },
                KvEvent::Removed { blocks: vec![1] },
            ],
        };
        let json = String::from_utf8(encode(&events)).unwrap();
        assert!(
            json.contains(r#"{"type":"stored","blocks":[18446744073709551615,1]}"#),
            "{json}"
        );
        assert_eq!(
            decode::<KvEvents>("kv events", json.as_bytes()).unwrap(),
            events
        );
        let page = KvSnapshot {
            worker_id: "w".into(),
            epoch: "e".into(),
            seq: 3,
            blocks: vec![7],
            next_offset: None,
        };
        let json = String::from_utf8(encode(&page)).unwrap();
        assert!(!json.contains("next_offset"), "{json}");
        assert_eq!(
            decode::<KvSnapshot>("kv snapshot", json.as_bytes()).unwrap(),
            page
        );
    }

    #[test]
    fn stored_response_questions_and_answers_round_trip() {
        let request = StoredResponseRequest {
            id: "resp_1".into(),
            owner: None,
            op: StoredResponseOp::InputItems,
            item: None,
            body: None,
            after: None,
        };
        let json = String::from_utf8(encode(&request)).unwrap();
        assert_eq!(json, r#"{"v":1,"id":"resp_1","op":"input_items"}"#);
        assert_eq!(
            decode::<StoredResponseRequest>("stored response request", json.as_bytes()).unwrap(),
            request
        );
        for reply in [
            StoredResponseReply::Response {
                response: r#"{"id":"resp_1"}"#.into(),
            },
            StoredResponseReply::Context {
                items: "[]".into(),
                continues: Some("resp_0".into()),
            },
            StoredResponseReply::NotFound { missing: None },
            StoredResponseReply::TooLarge {
                bytes: 2,
                max_payload: 1,
            },
            StoredResponseReply::Deleted,
            StoredResponseReply::Conversation {
                conversation: r#"{"id":"conv_1"}"#.into(),
            },
            StoredResponseReply::ConversationItems { items: "[]".into() },
            StoredResponseReply::Item { item: "{}".into() },
            StoredResponseReply::Added,
            StoredResponseReply::Events {
                events: "event: a\ndata: {}\n\n".into(),
                done: false,
            },
            StoredResponseReply::NotStreamed,
            StoredResponseReply::ConversationTooLarge { bytes: 2, limit: 1 },
        ] {
            let json = encode(&reply);
            assert_eq!(
                decode::<StoredResponseReply>("stored response reply", &json).unwrap(),
                reply
            );
        }
        let question = StoredResponseRequest {
            id: "conv_1".into(),
            owner: Some("key".into()),
            op: StoredResponseOp::DeleteItem,
            item: Some("msg_1".into()),
            body: None,
            after: None,
        };
        let json = String::from_utf8(encode(&question)).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"id":"conv_1","owner":"key","op":"delete_item","item":"msg_1"}"#
        );
        assert_eq!(
            decode::<StoredResponseRequest>("stored response request", json.as_bytes()).unwrap(),
            question
        );
        let json =
            String::from_utf8(encode(&StoredResponseReply::NotFound { missing: None })).unwrap();
        assert_eq!(json, r#"{"v":1,"status":"not_found"}"#);
    }

    #[test]
    fn other_versions_and_garbage_are_refused_clearly() {
        let err = decode::<CancelRequest>("cancel", br#"{"v":2,"request_id":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("protocol version 2"), "{err}");
        let err = decode::<CancelRequest>("cancel", b"not json").unwrap_err();
        assert!(
            err.to_string().contains("not valid JSON for cancel"),
            "{err}"
        );
        let err = decode::<CancelRequest>("cancel", br#"{"v":1}"#).unwrap_err();
        assert!(err.to_string().contains("request_id"), "{err}");
    }
}
