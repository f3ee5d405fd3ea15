//! Prometheus metrics of the api-server, on one explicit [`prometheus::Registry`] (no global
//! state, so tests can build several servers in one process).
//!
//! The rest of the server reports what happened as an [`Event`] (the router: heartbeats,
//! workers leaving, the live counts; the dispatch: tokens, fallbacks, pulls, the end of each
//! request) and [`Metrics::record`] is the one place that derives series from events. The
//! metric names, labels and their fixed label sets are all defined here.
//!
//! The `prometheus` crate (TiKV's) was picked over `metrics` + `metrics-exporter-prometheus`
//! because it keeps metrics as plain values on a registry we own and renders the text format
//! itself, with no global recorder to install and no exporter thread or listener of its own;
//! with default features off it has no protobuf dependency.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tandem_protocol::messages::{Heartbeat, Usage, WorkerRole};

use crate::outcomes::{FallbackReason, LiveCounts, MigrationReason};

/// The HTTP endpoint a request came in on (the `endpoint` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/embeddings` (no tokens: its requests, outcomes and prompt tokens only).
    Embeddings,
}

impl Endpoint {
    /// The endpoints that generate tokens (the token-timing families' label sets).
    pub const ALL: [Endpoint; 3] = [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses];

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// The kind of job a worker refused (the `pool` label of `tandem_jobs_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPool {
    /// A prefill job, refused by a context worker.
    Context,
    /// A generation job, refused by a `decode` or `both` worker.
    Generation,
}

impl JobPool {
    pub const ALL: [JobPool; 2] = [JobPool::Context, JobPool::Generation];

    pub fn label(self) -> &'static str {
        match self {
            JobPool::Context => "context",
            JobPool::Generation => "generation",
        }
    }
}

/// The `transport` labels of `tandem_kv_transfers_total`, created at start.
const TRANSPORTS: [&str; 2] = ["ucx", "cuda-ipc"];

/// A disaggregated request's time to first token, split into its parts
/// (`tandem_ttft_part_seconds{part}`): what the workers measured of it, and the rest. The
/// parts are disjoint stretches of the request's life, so they add up to its time to first
/// token (save `other`'s clamp at 0: [`crate::dispatch::record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtftParts {
    /// From the context worker taking the prefill job to its first forward pass: its export
    /// budget and its engine's queue (`kv_ready.prefill_timing.queued_us`).
    pub context_queue: Duration,
    /// From that first forward pass to the first token (`kv_ready.prefill_timing.prefill_us`).
    pub prefill: Duration,
    /// The decode job's wait for room in the decode worker's KV cache before its pull
    /// (`kv_pulled.room_wait_us`).
    pub decode_room_wait: Duration,
    /// The pull (`kv_pulled.micros`).
    pub kv_transfer: Duration,
    /// The rest: bus hops, the export, the decode worker's handle checks and first step, and
    /// the api-server itself.
    pub other: Duration,
}

impl TtftParts {
    /// The `part` labels, in the order of [`Self::labeled`].
    pub const LABELS: [&'static str; 5] = [
        "context_queue",
        "prefill",
        "decode_room_wait",
        "kv_transfer",
        "other",
    ];

    /// Each part with its `part` label.
    pub fn labeled(&self) -> [(&'static str, Duration); 5] {
        let [queue, prefill, room, transfer, other] = Self::LABELS;
        [
            (queue, self.context_queue),
            (prefill, self.prefill),
            (room, self.decode_room_wait),
            (transfer, self.kv_transfer),
            (other, self.other),
        ]
    }
}

/// When a batch of a request's tokens arrived, relative to what came before it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenTiming {
    /// The request's first tokens, this long after the request arrived.
    First { since_arrival: Duration },
    /// Later tokens, this long after the previous batch.
    Next { since_previous: Duration },
}

/// Something that happened that the metrics count.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A worker's heartbeat: its load and, from a context worker, its KV exports.
    Heartbeat(&'a Heartbeat),
    /// A worker's heartbeats stopped and the registry dropped it: its series go with it.
    WorkerLeft {
        worker_id: &'a str,
        role: WorkerRole,
    },
    /// The live workers per role, after a heartbeat or a worker leaving.
    LiveWorkers(LiveCounts),
    /// What the Responses API's response store holds, after a change.
    ResponseStore(crate::response_store::StoreStats),
    /// This api-server asked another about a response that one stored: `outcome` is
    /// `found`, `not_found`, `gone` (no api-server of that name answers), `timeout`,
    /// `too_large` or `error`.
    ResponsePeer { outcome: &'static str },
    /// A finished response's items could not be added to the conversation it named (deleted
    /// meanwhile, grown past the store, or its api-server gone).
    ConversationTurnLost,
    /// `count` tokens (at least one) of one request arrived at once (a worker publishes what
    /// it produced since its last publish).
    Tokens {
        endpoint: Endpoint,
        count: usize,
        timing: TokenTiming,
    },
    /// A request finished; `usage` as its worker counted it. `adapter`: the LoRA adapter the
    /// request named (`None`: the served model).
    Finished {
        usage: Usage,
        adapter: Option<&'a str>,
    },
    /// A request ended, once per request: `outcome` is `success`, `client_disconnected` or an
    /// [`ApiError::outcome`](crate::error::ApiError::outcome). `adapter` as in
    /// [`Self::Finished`].
    RequestEnded {
        endpoint: Endpoint,
        outcome: &'static str,
        adapter: Option<&'a str>,
    },
    /// A context worker prefilled a request's prompt.
    Disaggregated,
    /// The first token of a request whose K/V a decode worker pulled arrived: its time to
    /// first token, split.
    TtftParts(TtftParts),
    /// A decode worker pulled a request's KV cache.
    KvPulled {
        bytes: u64,
        micros: u64,
        transport: &'a str,
    },
    /// A request meant for a context worker was prefilled by its generation worker.
    Fallback(FallbackReason),
    /// A request moved to another generation worker mid-stream.
    Migrated(MigrationReason),
    /// A request was refused for want of a valid API key.
    Unauthorized,
    /// A worker refused a job: its queue is full.
    Rejected(JobPool),
    /// A chat reply with tools was parsed: `parsed` calls, and `malformed` pieces of call
    /// markup that did not parse (returned as content).
    ToolCalls { parsed: u32, malformed: u32 },
    /// A reply split by the reasoning parser thought for `tokens` output tokens.
    Reasoning { tokens: u32 },
    /// A worker of `pool` was chosen for a prompt of `prompt_blocks` KV blocks, of which it
    /// holds the first `cached_blocks` in its prefix cache as this api-server knows.
    Routed {
        pool: JobPool,
        cached_blocks: u64,
        prompt_blocks: u64,
    },
    /// Where this api-server's view of a worker's prefix cache stands after its heartbeat:
    /// followed through its events (`synced`) or guessed from what was sent there, and how
    /// many of its event batches the view has not applied yet.
    PrefixView {
        worker_id: &'a str,
        synced: bool,
        lag_batches: u64,
    },
    /// The view of a worker's prefix cache lost track (a gap in its events, a new epoch, a
    /// lost last batch) and a snapshot is asked for.
    PrefixResync { worker_id: &'a str },
}

/// [`Event::ResponsePeer`]'s outcomes.
const RESPONSE_PEER_OUTCOMES: [&str; 6] = [
    "found",
    "not_found",
    "gone",
    "timeout",
    "too_large",
    "error",
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `endpoint` × `outcome` (success, invalid_request, unavailable, ...).
    requests: IntCounterVec,
    time_to_first_token: HistogramVec,
    /// `part`: [`TtftParts::LABELS`].
    ttft_parts: HistogramVec,
    inter_token_latency: HistogramVec,
    prompt_tokens: IntCounter,
    completion_tokens: IntCounter,
    worker_queue_depth: IntGaugeVec,
    worker_running: IntGaugeVec,
    worker_free_kv_blocks: IntGaugeVec,
    worker_total_kv_blocks: IntGaugeVec,
    /// A worker's queue bound (absent: none).
    worker_max_queued: IntGaugeVec,
    /// Requests that named a LoRA adapter, by `adapter` and `outcome`, and their tokens.
    lora_requests: IntCounterVec,
    lora_prompt_tokens: IntCounterVec,
    lora_completion_tokens: IntCounterVec,
    /// 1 for each (`worker_id`, `adapter`) a worker's last heartbeat listed.
    worker_lora_adapters: IntGaugeVec,
    /// The adapters each worker was last seen with, to remove the series of those it drops.
    worker_lora_labels:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>>,
    /// 1 for each worker, labelled with its number formats (`weights`, `kv_cache`).
    worker_info: IntGaugeVec,
    /// The `worker_info` labels each worker was last seen with, to remove its series when it
    /// changes them (a restart with another model) or leaves.
    worker_info_labels:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, [String; 4]>>>,
    live_workers: IntGaugeVec,
    /// [`LiveCounts::cuda_ipc_unmapped`].
    cuda_ipc_unmapped: IntGauge,
    /// The response store's responses and bytes, and its evictions.
    response_store_responses: IntGauge,
    response_store_conversations: IntGauge,
    response_store_bytes: IntGauge,
    response_store_evictions: IntCounter,
    conversation_turns_lost: IntCounter,
    /// Background responses running on this api-server.
    responses_background: IntGauge,
    /// `outcome`: [`Event::ResponsePeer`]'s.
    response_store_peer_requests: IntCounterVec,
    /// KV cache bytes decode workers pulled from context workers (`kv_pulled.bytes`).
    kv_transfer_bytes: IntCounter,
    /// Duration of each successful pull (`kv_pulled.micros`).
    kv_transfer_seconds: Histogram,
    /// Successful pulls by `transport` (`ucx`: through host memory; `cuda-ipc`: device to
    /// device between GPUs of one host).
    kv_transfers: IntCounterVec,
    /// `reason`: [`FallbackReason::label`].
    kv_transfer_fallbacks: IntCounterVec,
    /// `reason`: [`MigrationReason::label`].
    request_migrations: IntCounterVec,
    /// `pool`: [`JobPool::label`].
    jobs_rejected: IntCounterVec,
    /// `outcome`: `parsed` (calls returned as `tool_calls`) or `malformed` (call markup that
    /// did not parse, returned as content).
    tool_calls: IntCounterVec,
    /// Output tokens replies spent thinking (with a reasoning parser), and the replies that
    /// thought.
    reasoning_tokens: IntCounter,
    reasoning_replies: IntCounter,
    /// Requests whose prefill ran on a context worker.
    requests_disaggregated: IntCounter,
    /// Requests refused without a valid API key.
    unauthorized: IntCounter,
    /// Per context worker (`worker_id`), from heartbeats' `kv_transfer`.
    kv_pinned_blocks: IntGaugeVec,
    kv_pinned_tokens: IntGaugeVec,
    /// Cumulative counts a worker reports in its heartbeats (see [`mirror_counter`]).
    kv_expirations: IntCounterVec,
    kv_releases: IntCounterVec,
    kv_unmatched_releases: IntCounterVec,
    /// Per generation worker (`worker_id`), from heartbeats' `kv_pull`.
    kv_pulls_waiting: IntGaugeVec,
    kv_pulls_in_flight: IntGaugeVec,
    kv_pull_peak_held_blocks: IntGaugeVec,
    kv_pulls_waited: IntCounterVec,
    worker_preemptions: IntCounterVec,
    /// Per worker (`worker_id`), from heartbeats' `engine`: speculative decoding's drafts.
    worker_draft_tokens: IntCounterVec,
    worker_accepted_draft_tokens: IntCounterVec,
    kv_handles_refused: IntCounterVec,
    kv_exports_gone: IntCounterVec,
    /// Per worker with a prefix cache (`worker_id`), from heartbeats' `prefix_cache`.
    prefix_queried_tokens: IntCounterVec,
    prefix_hit_tokens: IntCounterVec,
    prefix_evicted_blocks: IntCounterVec,
    prefix_events_published: IntGaugeVec,
    /// Per routing decision (`pool`): the share of the prompt the chosen worker holds cached.
    routed_cached_ratio: HistogramVec,
    /// Per worker: this api-server's view of its prefix cache.
    prefix_view_synced: IntGaugeVec,
    prefix_view_lag: IntGaugeVec,
    prefix_view_resyncs: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0, 10.0, 20.0,
    40.0, 80.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tandem_requests_total",
                "HTTP generation requests by endpoint and outcome",
            ),
            &["endpoint", "outcome"],
        )
        .expect("metric options are static and valid");
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "tandem_time_to_first_token_seconds",
                "Time from request arrival to the first generated token",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("metric options are static and valid");
        let ttft_parts = HistogramVec::new(
            HistogramOpts::new(
                "tandem_ttft_part_seconds",
                "The time to first token of requests whose KV cache a decode worker pulled, by \
                 part: context_queue (the context worker's export budget and engine queue), \
                 prefill, decode_room_wait (the decode job waiting for room in its worker's KV \
                 cache), kv_transfer (the pull), other (the rest: bus hops, the export, the \
                 decode worker's first step)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["part"],
        )
        .expect("metric options are static and valid");
        let inter_token_latency = HistogramVec::new(
            HistogramOpts::new(
                "tandem_inter_token_latency_seconds",
                "Time between consecutive generated tokens of one request",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("metric options are static and valid");
        let prompt_tokens = IntCounter::new(
            "tandem_prompt_tokens_total",
            "Prompt tokens of finished requests",
        )
        .expect("metric options are static and valid");
        let completion_tokens = IntCounter::new(
            "tandem_completion_tokens_total",
            "Generated tokens sent to clients",
        )
        .expect("metric options are static and valid");
        let worker_gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["worker_id", "role"])
                .expect("metric options are static and valid")
        };
        let worker_queue_depth = worker_gauge(
            "tandem_worker_queue_depth",
            "Jobs queued on a worker (last heartbeat)",
        );
        let worker_running = worker_gauge(
            "tandem_worker_running",
            "Sequences running on a worker (last heartbeat)",
        );
        let worker_free_kv_blocks = worker_gauge(
            "tandem_worker_free_kv_blocks",
            "Free KV blocks of a worker (last heartbeat)",
        );
        let worker_total_kv_blocks = worker_gauge(
            "tandem_worker_total_kv_blocks",
            "KV blocks of a worker (last heartbeat)",
        );
        let worker_max_queued = worker_gauge(
            "tandem_worker_max_queued",
            "Jobs a worker queues at most before refusing more (last heartbeat; absent: no bound)",
        );
        let worker_info = IntGaugeVec::new(
            Opts::new(
                "tandem_worker_info",
                "1 for each worker with a recent heartbeat, labelled with the number formats it \
                 serves in: weights (fp8, bf16, f16, f32) and kv_cache (fp8, bf16, f16, f32)",
            ),
            &["worker_id", "role", "weights", "kv_cache"],
        )
        .expect("metric options are static and valid");
        let lora_requests = IntCounterVec::new(
            Opts::new(
                "tandem_lora_requests_total",
                "HTTP requests whose `model` named a LoRA adapter, by adapter and outcome (also \
                 counted in tandem_requests_total)",
            ),
            &["adapter", "outcome"],
        )
        .expect("metric options are static and valid");
        let lora_prompt_tokens = IntCounterVec::new(
            Opts::new(
                "tandem_lora_prompt_tokens_total",
                "Prompt tokens of finished requests that named a LoRA adapter, by adapter",
            ),
            &["adapter"],
        )
        .expect("metric options are static and valid");
        let lora_completion_tokens = IntCounterVec::new(
            Opts::new(
                "tandem_lora_completion_tokens_total",
                "Generated tokens of finished requests that named a LoRA adapter, by adapter",
            ),
            &["adapter"],
        )
        .expect("metric options are static and valid");
        let worker_lora_adapters = IntGaugeVec::new(
            Opts::new(
                "tandem_worker_lora_adapter",
                "1 for each LoRA adapter a worker serves (its last heartbeat), by worker and \
                 adapter",
            ),
            &["worker_id", "adapter"],
        )
        .expect("metric options are static and valid");
        let live_workers = IntGaugeVec::new(
            Opts::new(
                "tandem_live_workers",
                "Workers with a recent heartbeat, by role",
            ),
            &["role"],
        )
        .expect("metric options are static and valid");
        let cuda_ipc_unmapped = IntGauge::new(
            "tandem_cuda_ipc_unmapped_pairs",
            "Pairs of one host, a decode worker reading CUDA IPC and a context worker sharing its \
             KV cache, where the decode worker has not mapped that cache yet (their first \
             hand-over would wait for the mapping)",
        )
        .expect("metric options are static and valid");
        let response_store_responses = IntGauge::new(
            "tandem_response_store_responses",
            "Responses API responses this api-server keeps (store: true)",
        )
        .expect("metric options are static and valid");
        let response_store_conversations = IntGauge::new(
            "tandem_response_store_conversations",
            "Conversations (the Conversations API) this api-server keeps",
        )
        .expect("metric options are static and valid");
        let response_store_bytes = IntGauge::new(
            "tandem_response_store_bytes",
            "Bytes of JSON the response store holds, responses and conversations (bounded by \
             --response-store-mib)",
        )
        .expect("metric options are static and valid");
        let conversation_turns_lost = IntCounter::new(
            "tandem_conversation_turns_lost_total",
            "Finished responses whose items could not be added to the conversation they named",
        )
        .expect("metric options are static and valid");
        let response_store_evictions = IntCounter::new(
            "tandem_response_store_evictions_total",
            "Stored responses dropped, least recently used first, to make room for new ones",
        )
        .expect("metric options are static and valid");
        let responses_background = IntGauge::new(
            "tandem_responses_background_running",
            "Background Responses API responses (background: true) this api-server is running",
        )
        .expect("metric options are static and valid");
        let response_store_peer_requests = IntCounterVec::new(
            Opts::new(
                "tandem_response_store_peer_requests_total",
                "Questions this api-server asked another about a response that one stored \
                 (a follow-up, retrieval or deletion of it), by outcome",
            ),
            &["outcome"],
        )
        .expect("metric options are static and valid");
        let kv_transfer_bytes = IntCounter::new(
            "tandem_kv_transfer_bytes_total",
            "KV cache bytes decode workers pulled from context workers",
        )
        .expect("metric options are static and valid");
        let kv_transfer_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tandem_kv_transfer_seconds",
                "Time a decode worker took to pull one request's KV cache",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("metric options are static and valid");
        let kv_transfers = IntCounterVec::new(
            Opts::new(
                "tandem_kv_transfers_total",
                "KV caches decode workers pulled from context workers, by transport (ucx, cuda-ipc)",
            ),
            &["transport"],
        )
        .expect("metric options are static and valid");
        let kv_transfer_fallbacks = IntCounterVec::new(
            Opts::new(
                "tandem_kv_transfer_fallbacks_total",
                "Requests meant for disaggregation that a generation worker prefilled itself, by reason",
            ),
            &["reason"],
        )
        .expect("metric options are static and valid");
        let request_migrations = IntCounterVec::new(
            Opts::new(
                "tandem_request_migrations_total",
                "Requests moved to another worker mid-stream (prompt plus the tokens so far), by \
                 why the worker they left failed them",
            ),
            &["reason"],
        )
        .expect("metric options are static and valid");
        let jobs_rejected = IntCounterVec::new(
            Opts::new(
                "tandem_jobs_rejected_total",
                "Jobs a worker refused because its queue was full (each sent to another worker, or \
                 answered 429), by pool (context, generation)",
            ),
            &["pool"],
        )
        .expect("metric options are static and valid");
        let tool_calls = IntCounterVec::new(
            Opts::new(
                "tandem_tool_calls_total",
                "Tool calls in chat replies, by outcome: parsed (returned as tool_calls) or \
                 malformed (call markup that did not parse, returned as content)",
            ),
            &["outcome"],
        )
        .expect("metric options are static and valid");
        let reasoning_tokens = IntCounter::new(
            "tandem_reasoning_tokens_total",
            "Output tokens chat and Responses replies spent thinking, up to the end of their \
             think block (--reasoning-parser); the rest of tandem_completion_tokens_total is answer",
        )
        .expect("metric options are static and valid");
        let reasoning_replies = IntCounter::new(
            "tandem_reasoning_replies_total",
            "Replies that thought (opened a think block, or began in one the prompt opened)",
        )
        .expect("metric options are static and valid");
        let requests_disaggregated = IntCounter::new(
            "tandem_requests_disaggregated_total",
            "Requests whose prompt a context worker prefilled",
        )
        .expect("metric options are static and valid");
        let unauthorized = IntCounter::new(
            "tandem_unauthorized_requests_total",
            "Requests refused with 401 for want of a valid API key",
        )
        .expect("metric options are static and valid");
        let context_gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["worker_id"])
                .expect("metric options are static and valid")
        };
        let kv_pinned_blocks = context_gauge(
            "tandem_kv_pinned_blocks",
            "KV blocks a context worker holds for decode workers (last heartbeat)",
        );
        let kv_pinned_tokens = context_gauge(
            "tandem_kv_pinned_tokens",
            "Prompt tokens whose KV cache a context worker holds for decode workers (last heartbeat)",
        );
        let context_counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["worker_id"])
                .expect("metric options are static and valid")
        };
        let kv_expirations = context_counter(
            "tandem_kv_expirations_total",
            "KV exports a context worker freed because no release came in time (since its start)",
        );
        let kv_releases = context_counter(
            "tandem_kv_releases_total",
            "KV exports decode workers released on a context worker (since its start)",
        );
        let kv_unmatched_releases = context_counter(
            "tandem_kv_unmatched_releases_total",
            "KV releases a context worker got for no export it held: late (after expiry), \
             repeated, or foreign (since its start)",
        );
        let kv_pulls_waiting = context_gauge(
            "tandem_kv_pulls_waiting",
            "Decode jobs of a generation worker waiting for room in its KV cache before their \
             pull (last heartbeat)",
        );
        let kv_pulls_in_flight = context_gauge(
            "tandem_kv_pulls_in_flight",
            "Pulls of a generation worker with room reserved, K/V not yet in its cache (last \
             heartbeat)",
        );
        let kv_pull_peak_held_blocks = context_gauge(
            "tandem_kv_pull_peak_held_blocks",
            "The most KV blocks a generation worker held at once in pulled memory not yet in its \
             cache, since its start (last heartbeat)",
        );
        let worker_preemptions = context_counter(
            "tandem_worker_preemptions_total",
            "Sequences a worker preempted (their K/V freed, prompt and generated tokens to be \
             recomputed) because its KV cache ran out of blocks or a request of a higher \
             priority needed the room (since its start)",
        );
        let worker_draft_tokens = context_counter(
            "tandem_worker_spec_decode_draft_tokens_total",
            "Draft tokens a worker's decodes verified (speculative decoding from requests' \
             predictions or the worker's n-gram lookup), since its start",
        );
        let worker_accepted_draft_tokens = context_counter(
            "tandem_worker_spec_decode_accepted_tokens_total",
            "Draft tokens a worker's decodes verified and kept (each a forward pass's row that \
             saved a step), since its start",
        );
        let kv_pulls_waited = context_counter(
            "tandem_kv_pulls_waited_total",
            "Decode jobs that waited for room in a generation worker's KV cache before their \
             pull (since its start)",
        );
        let kv_handles_refused = context_counter(
            "tandem_kv_handles_refused_total",
            "Decode jobs whose KV handle a generation worker refused before reading anything: \
             its MAC did not verify for the job (forged, altered, moved to another request, or \
             another KV secret), it was taken before (a replay), or it was malformed (since its \
             start)",
        );
        let kv_exports_gone = context_counter(
            "tandem_kv_exports_gone_total",
            "Pulls of a generation worker that found the export's seal changed after the read: \
             the context worker had freed the export first (a release or cancel that came \
             early or was forged, or a replayed handle), so what was read was dropped and the \
             prompt prefilled locally (since its start)",
        );
        let prefix_queried_tokens = context_counter(
            "tandem_prefix_cache_queried_tokens_total",
            "Prompt tokens a worker looked up in its prefix cache (since its start); the hit \
             rate is tandem_prefix_cache_hit_tokens_total over this",
        );
        let prefix_hit_tokens = context_counter(
            "tandem_prefix_cache_hit_tokens_total",
            "Prompt tokens a worker found in its prefix cache instead of computing them (since \
             its start)",
        );
        let prefix_evicted_blocks = context_counter(
            "tandem_prefix_cache_evicted_blocks_total",
            "Cached KV blocks a worker evicted to make room (since its start)",
        );
        let routed_cached_ratio = HistogramVec::new(
            HistogramOpts::new(
                "tandem_router_cached_prompt_ratio",
                "Per routing decision with a known prefix cache: the share of the prompt's KV \
                 blocks the chosen worker holds cached, as this api-server knows from its KV \
                 events (pool: generation or context)",
            )
            .buckets(vec![0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]),
            &["pool"],
        )
        .expect("metric options are static and valid");
        let prefix_view_synced = context_gauge(
            "tandem_prefix_view_synced",
            "1 while this api-server's view of a worker's prefix cache is built from its KV \
             events (after a gap, until the snapshot comes, it is the view before the gap: see \
             tandem_prefix_view_lag_batches), 0 while it is guessed from the prompts sent \
             there (no events followed yet, or no snapshot could be had)",
        );
        let prefix_view_lag = context_gauge(
            "tandem_prefix_view_lag_batches",
            "KV event batches a worker published (its last heartbeat) that this api-server's view \
             has not applied yet",
        );
        let prefix_view_resyncs = context_counter(
            "tandem_prefix_view_resyncs_total",
            "Snapshots of a worker's prefix cache this api-server asked for because its view \
             lost track (a gap in the events, a restart, a lost last batch)",
        );
        let prefix_events_published = context_gauge(
            "tandem_prefix_cache_event_batches",
            "KV event batches a worker with a prefix cache published in its current epoch \
             (last heartbeat): one that stays at 0 while its hit tokens grow publishes no \
             events, and KV-aware routing weighs it by what this api-server sent it",
        );
        let metrics = Metrics {
            registry,
            requests,
            time_to_first_token,
            ttft_parts,
            inter_token_latency,
            prompt_tokens,
            completion_tokens,
            worker_queue_depth,
            worker_running,
            worker_free_kv_blocks,
            worker_total_kv_blocks,
            worker_max_queued,
            lora_requests,
            lora_prompt_tokens,
            lora_completion_tokens,
            worker_lora_adapters,
            worker_lora_labels: Default::default(),
            worker_info,
            worker_info_labels: Default::default(),
            live_workers,
            cuda_ipc_unmapped,
            response_store_responses,
            response_store_conversations,
            response_store_bytes,
            response_store_evictions,
            conversation_turns_lost,
            responses_background,
            response_store_peer_requests,
            kv_transfer_bytes,
            kv_transfer_seconds,
            kv_transfers,
            kv_transfer_fallbacks,
            request_migrations,
            jobs_rejected,
            tool_calls,
            reasoning_tokens,
            reasoning_replies,
            requests_disaggregated,
            unauthorized,
            kv_pinned_blocks,
            kv_pinned_tokens,
            kv_expirations,
            kv_releases,
            kv_unmatched_releases,
            kv_pulls_waiting,
            kv_pulls_in_flight,
            kv_pull_peak_held_blocks,
            kv_pulls_waited,
            worker_preemptions,
            worker_draft_tokens,
            worker_accepted_draft_tokens,
            kv_handles_refused,
            kv_exports_gone,
            prefix_queried_tokens,
            prefix_hit_tokens,
            prefix_evicted_blocks,
            prefix_events_published,
            routed_cached_ratio,
            prefix_view_synced,
            prefix_view_lag,
            prefix_view_resyncs,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.time_to_first_token.clone()),
            Box::new(metrics.ttft_parts.clone()),
            Box::new(metrics.inter_token_latency.clone()),
            Box::new(metrics.prompt_tokens.clone()),
            Box::new(metrics.completion_tokens.clone()),
            Box::new(metrics.worker_queue_depth.clone()),
            Box::new(metrics.worker_running.clone()),
            Box::new(metrics.worker_free_kv_blocks.clone()),
            Box::new(metrics.worker_total_kv_blocks.clone()),
            Box::new(metrics.worker_max_queued.clone()),
            Box::new(metrics.worker_info.clone()),
            Box::new(metrics.lora_requests.clone()),
            Box::new(metrics.lora_prompt_tokens.clone()),
            Box::new(metrics.lora_completion_tokens.clone()),
            Box::new(metrics.worker_lora_adapters.clone()),
            Box::new(metrics.live_workers.clone()),
            Box::new(metrics.cuda_ipc_unmapped.clone()),
            Box::new(metrics.response_store_responses.clone()),
            Box::new(metrics.response_store_conversations.clone()),
            Box::new(metrics.response_store_bytes.clone()),
            Box::new(metrics.response_store_evictions.clone()),
            Box::new(metrics.conversation_turns_lost.clone()),
            Box::new(metrics.response_store_peer_requests.clone()),
            Box::new(metrics.responses_background.clone()),
            Box::new(metrics.kv_transfer_bytes.clone()),
            Box::new(metrics.kv_transfer_seconds.clone()),
            Box::new(metrics.kv_transfers.clone()),
            Box::new(metrics.kv_transfer_fallbacks.clone()),
            Box::new(metrics.request_migrations.clone()),
            Box::new(metrics.jobs_rejected.clone()),
            Box::new(metrics.tool_calls.clone()),
            Box::new(metrics.reasoning_tokens.clone()),
            Box::new(metrics.reasoning_replies.clone()),
            Box::new(metrics.requests_disaggregated.clone()),
            Box::new(metrics.unauthorized.clone()),
            Box::new(metrics.kv_pinned_blocks.clone()),
            Box::new(metrics.kv_pinned_tokens.clone()),
            Box::new(metrics.kv_expirations.clone()),
            Box::new(metrics.kv_releases.clone()),
            Box::new(metrics.kv_unmatched_releases.clone()),
            Box::new(metrics.kv_pulls_waiting.clone()),
            Box::new(metrics.kv_pulls_in_flight.clone()),
            Box::new(metrics.kv_pull_peak_held_blocks.clone()),
            Box::new(metrics.kv_pulls_waited.clone()),
            Box::new(metrics.worker_preemptions.clone()),
            Box::new(metrics.worker_draft_tokens.clone()),
            Box::new(metrics.worker_accepted_draft_tokens.clone()),
            Box::new(metrics.kv_handles_refused.clone()),
            Box::new(metrics.kv_exports_gone.clone()),
            Box::new(metrics.prefix_queried_tokens.clone()),
            Box::new(metrics.prefix_hit_tokens.clone()),
            Box::new(metrics.prefix_evicted_blocks.clone()),
            Box::new(metrics.prefix_events_published.clone()),
            Box::new(metrics.routed_cached_ratio.clone()),
            Box::new(metrics.prefix_view_synced.clone()),
            Box::new(metrics.prefix_view_lag.clone()),
            Box::new(metrics.prefix_view_resyncs.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("each metric is registered once, under a distinct name");
        }
        // Families without a sample are left out of the exposition; create the known label
        // sets so dashboards see every family from the start.
        for endpoint in Endpoint::ALL {
            metrics
                .time_to_first_token
                .with_label_values(&[endpoint.label()]);
            metrics
                .inter_token_latency
                .with_label_values(&[endpoint.label()]);
        }
        for part in TtftParts::LABELS {
            metrics.ttft_parts.with_label_values(&[part]);
        }
        for role in ["context", "decode", "both"] {
            metrics.live_workers.with_label_values(&[role]).set(0);
        }
        for transport in TRANSPORTS {
            metrics.kv_transfers.with_label_values(&[transport]);
        }
        for reason in FallbackReason::ALL {
            metrics
                .kv_transfer_fallbacks
                .with_label_values(&[reason.label()]);
        }
        for reason in MigrationReason::ALL {
            metrics
                .request_migrations
                .with_label_values(&[reason.label()]);
        }
        for pool in JobPool::ALL {
            metrics.jobs_rejected.with_label_values(&[pool.label()]);
            metrics
                .routed_cached_ratio
                .with_label_values(&[pool.label()]);
        }
        for outcome in ["parsed", "malformed"] {
            metrics.tool_calls.with_label_values(&[outcome]);
        }
        for outcome in RESPONSE_PEER_OUTCOMES {
            metrics
                .response_store_peer_requests
                .with_label_values(&[outcome]);
        }
        metrics
    }

    /// Derives the series `event` changes.
    pub fn record(&self, event: Event<'_>) {
        match event {
            Event::Heartbeat(heartbeat) => self.heartbeat(heartbeat),
            Event::WorkerLeft { worker_id, role } => self.worker_left(worker_id, role),
            Event::LiveWorkers(counts) => {
                for (role, count) in [
                    ("context", counts.context),
                    ("decode", counts.decode),
                    ("both", counts.both),
                ] {
                    self.live_workers
                        .with_label_values(&[role])
                        .set(count as i64);
                }
                self.cuda_ipc_unmapped.set(counts.cuda_ipc_unmapped as i64);
            }
            Event::ResponseStore(stats) => {
                self.response_store_responses.set(stats.responses as i64);
                self.response_store_conversations
                    .set(stats.conversations as i64);
                self.response_store_bytes.set(stats.bytes as i64);
                self.responses_background.set(stats.background as i64);
                let counted = self.response_store_evictions.get();
                self.response_store_evictions
                    .inc_by(stats.evicted.saturating_sub(counted));
            }
            Event::ConversationTurnLost => self.conversation_turns_lost.inc(),
            Event::ResponsePeer { outcome } => self
                .response_store_peer_requests
                .with_label_values(&[outcome])
                .inc(),
            Event::Tokens {
                endpoint,
                count,
                timing,
            } => self.tokens(endpoint, count, timing),
            Event::Finished { usage, adapter } => {
                self.prompt_tokens.inc_by(usage.prompt_tokens as u64);
                self.completion_tokens
                    .inc_by(usage.completion_tokens as u64);
                if let Some(adapter) = adapter {
                    self.lora_prompt_tokens
                        .with_label_values(&[adapter])
                        .inc_by(usage.prompt_tokens as u64);
                    self.lora_completion_tokens
                        .with_label_values(&[adapter])
                        .inc_by(usage.completion_tokens as u64);
                }
            }
            Event::RequestEnded {
                endpoint,
                outcome,
                adapter,
            } => {
                self.requests
                    .with_label_values(&[endpoint.label(), outcome])
                    .inc();
                if let Some(adapter) = adapter {
                    self.lora_requests
                        .with_label_values(&[adapter, outcome])
                        .inc();
                }
            }
            Event::Disaggregated => self.requests_disaggregated.inc(),
            Event::TtftParts(parts) => {
                for (part, took) in parts.labeled() {
                    self.ttft_parts
                        .with_label_values(&[part])
                        .observe(took.as_secs_f64());
                }
            }
            Event::Unauthorized => self.unauthorized.inc(),
            Event::KvPulled {
                bytes,
                micros,
                transport,
            } => {
                self.kv_transfer_bytes.inc_by(bytes);
                self.kv_transfer_seconds.observe(micros as f64 / 1e6);
                self.kv_transfers.with_label_values(&[transport]).inc();
            }
            Event::Fallback(reason) => self
                .kv_transfer_fallbacks
                .with_label_values(&[reason.label()])
                .inc(),
            Event::Migrated(reason) => self
                .request_migrations
                .with_label_values(&[reason.label()])
                .inc(),
            Event::Rejected(pool) => self.jobs_rejected.with_label_values(&[pool.label()]).inc(),
            Event::ToolCalls { parsed, malformed } => {
                self.tool_calls
                    .with_label_values(&["parsed"])
                    .inc_by(u64::from(parsed));
                self.tool_calls
                    .with_label_values(&["malformed"])
                    .inc_by(u64::from(malformed));
            }
            Event::Reasoning { tokens } => {
                self.reasoning_tokens.inc_by(u64::from(tokens));
                self.reasoning_replies.inc();
            }
            Event::Routed {
                pool,
                cached_blocks,
                prompt_blocks,
            } => {
                if prompt_blocks > 0 {
                    self.routed_cached_ratio
                        .with_label_values(&[pool.label()])
                        .observe(cached_blocks.min(prompt_blocks) as f64 / prompt_blocks as f64);
                }
            }
            Event::PrefixView {
                worker_id,
                synced,
                lag_batches,
            } => {
                self.prefix_view_synced
                    .with_label_values(&[worker_id])
                    .set(i64::from(synced));
                self.prefix_view_lag
                    .with_label_values(&[worker_id])
                    .set(lag_batches as i64);
            }
            Event::PrefixResync { worker_id } => {
                self.prefix_view_resyncs
                    .with_label_values(&[worker_id])
                    .inc();
            }
        }
    }

    fn heartbeat(&self, heartbeat: &Heartbeat) {
        let labels = [heartbeat.worker_id.as_str(), heartbeat.role.as_str()];
        self.worker_queue_depth
            .with_label_values(&labels)
            .set(heartbeat.queued as i64);
        self.worker_running
            .with_label_values(&labels)
            .set(heartbeat.running as i64);
        self.worker_free_kv_blocks
            .with_label_values(&labels)
            .set(heartbeat.free_kv_blocks as i64);
        self.worker_total_kv_blocks
            .with_label_values(&labels)
            .set(heartbeat.total_kv_blocks as i64);
        match heartbeat.max_queued {
            Some(max) => self
                .worker_max_queued
                .with_label_values(&labels)
                .set(max as i64),
            None => {
                let _ = self.worker_max_queued.remove_label_values(&labels);
            }
        }
        if let Some(numerics) = &heartbeat.numerics {
            let info = [
                heartbeat.worker_id.clone(),
                heartbeat.role.as_str().to_owned(),
                numerics.weights.clone(),
                numerics.kv_cache.as_str().to_owned(),
            ];
            let mut seen = self
                .worker_info_labels
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(old) = seen.insert(heartbeat.worker_id.clone(), info.clone())
                && old != info
            {
                let _ = self
                    .worker_info
                    .remove_label_values(&old.each_ref().map(String::as_str));
            }
            self.worker_info
                .with_label_values(&info.each_ref().map(String::as_str))
                .set(1);
        }
        self.worker_adapters(&heartbeat.worker_id, &heartbeat.lora_adapters);
        if let Some(engine) = heartbeat.engine {
            let worker = [heartbeat.worker_id.as_str()];
            mirror_counter(&self.worker_preemptions, &worker, engine.preemptions);
            mirror_counter(&self.worker_draft_tokens, &worker, engine.draft_tokens);
            mirror_counter(
                &self.worker_accepted_draft_tokens,
                &worker,
                engine.accepted_draft_tokens,
            );
        }
        if let Some(pulls) = heartbeat.kv_pull {
            let worker = [heartbeat.worker_id.as_str()];
            self.kv_pulls_waiting
                .with_label_values(&worker)
                .set(pulls.waiting as i64);
            self.kv_pulls_in_flight
                .with_label_values(&worker)
                .set(pulls.in_flight as i64);
            self.kv_pull_peak_held_blocks
                .with_label_values(&worker)
                .set(pulls.peak_held_blocks as i64);
            mirror_counter(&self.kv_pulls_waited, &worker, pulls.waited);
            mirror_counter(&self.kv_handles_refused, &worker, pulls.refused_handles);
            mirror_counter(&self.kv_exports_gone, &worker, pulls.exports_gone);
        }
        if let Some(cache) = &heartbeat.prefix_cache {
            let worker = [heartbeat.worker_id.as_str()];
            mirror_counter(&self.prefix_queried_tokens, &worker, cache.queried_tokens);
            mirror_counter(&self.prefix_hit_tokens, &worker, cache.hit_tokens);
            mirror_counter(&self.prefix_evicted_blocks, &worker, cache.evicted_blocks);
            self.prefix_events_published
                .with_label_values(&worker)
                .set(cache.events_seq as i64);
        }
        if let Some(stats) = heartbeat.kv_transfer {
            let worker = [heartbeat.worker_id.as_str()];
            self.kv_pinned_blocks
                .with_label_values(&worker)
                .set(stats.pinned_blocks as i64);
            self.kv_pinned_tokens
                .with_label_values(&worker)
                .set(stats.pinned_tokens as i64);
            mirror_counter(&self.kv_expirations, &worker, stats.expirations);
            mirror_counter(&self.kv_releases, &worker, stats.releases);
            mirror_counter(
                &self.kv_unmatched_releases,
                &worker,
                stats.unmatched_releases,
            );
        }
    }

    /// `tandem_worker_lora_adapter` for `worker_id`: a series for each adapter it lists now,
    /// none for those it listed before and no longer does.
    fn worker_adapters(
        &self,
        worker_id: &str,
        adapters: &[tandem_protocol::messages::LoraAdapterInfo],
    ) {
        let names: Vec<String> = adapters.iter().map(|a| a.name.clone()).collect();
        let mut seen = self
            .worker_lora_labels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = if names.is_empty() {
            seen.remove(worker_id)
        } else {
            seen.insert(worker_id.to_owned(), names.clone())
        };
        for gone in before.iter().flatten().filter(|n| !names.contains(n)) {
            let _ = self
                .worker_lora_adapters
                .remove_label_values(&[worker_id, gone.as_str()]);
        }
        for name in &names {
            self.worker_lora_adapters
                .with_label_values(&[worker_id, name.as_str()])
                .set(1);
        }
    }

    fn worker_left(&self, worker_id: &str, role: WorkerRole) {
        self.worker_adapters(worker_id, &[]);
        let info = self
            .worker_info_labels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(worker_id);
        if let Some(info) = info {
            let _ = self
                .worker_info
                .remove_label_values(&info.each_ref().map(String::as_str));
        }
        // Absent label sets are fine: the worker may never have reported them.
        let labels = [worker_id, role.as_str()];
        for gauge in [
            &self.worker_queue_depth,
            &self.worker_running,
            &self.worker_free_kv_blocks,
            &self.worker_total_kv_blocks,
            &self.worker_max_queued,
        ] {
            let _ = gauge.remove_label_values(&labels);
        }
        let worker = [worker_id];
        for gauge in [
            &self.kv_pinned_blocks,
            &self.kv_pinned_tokens,
            &self.kv_pulls_waiting,
            &self.kv_pulls_in_flight,
            &self.kv_pull_peak_held_blocks,
            &self.prefix_events_published,
            &self.prefix_view_synced,
            &self.prefix_view_lag,
        ] {
            let _ = gauge.remove_label_values(&worker);
        }
        for counter in [
            &self.kv_expirations,
            &self.kv_releases,
            &self.kv_unmatched_releases,
            &self.kv_pulls_waited,
            &self.worker_preemptions,
            &self.worker_draft_tokens,
            &self.worker_accepted_draft_tokens,
            &self.kv_handles_refused,
            &self.kv_exports_gone,
            &self.prefix_queried_tokens,
            &self.prefix_hit_tokens,
            &self.prefix_evicted_blocks,
            &self.prefix_view_resyncs,
        ] {
            let _ = counter.remove_label_values(&worker);
        }
    }

    /// The inter-token histogram gets one sample per token: a batch's tokens are spread evenly
    /// over the time since the previous batch, and the first batch's tokens after the first
    /// count as arriving with it.
    fn tokens(&self, endpoint: Endpoint, count: usize, timing: TokenTiming) {
        let labels = [endpoint.label()];
        let inter_token = self.inter_token_latency.with_label_values(&labels);
        match timing {
            TokenTiming::First { since_arrival } => {
                self.time_to_first_token
                    .with_label_values(&labels)
                    .observe(since_arrival.as_secs_f64());
                for _ in 1..count {
                    inter_token.observe(0.0);
                }
            }
            TokenTiming::Next { since_previous } => {
                let gap = since_previous.as_secs_f64() / count as f64;
                for _ in 0..count {
                    inter_token.observe(gap);
                }
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding metrics into memory cannot fail");
        String::from_utf8(buffer).expect("the text encoder writes UTF-8")
    }
}

/// Makes the counter at `labels` equal to `value`, a cumulative count a worker reports; a
/// smaller value means the worker restarted under the same id, so the series starts over
/// (which Prometheus' `rate` reads as a counter reset).
fn mirror_counter(counter: &IntCounterVec, labels: &[&str], value: u64) {
    let current = counter.with_label_values(labels).get();
    if value >= current {
        counter.with_label_values(labels).inc_by(value - current);
    } else {
        let _ = counter.remove_label_values(labels);
        counter.with_label_values(labels).inc_by(value);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let metrics = Metrics::new();
        metrics
            .requests
            .with_label_values(&["chat", "success"])
            .inc();
        metrics
            .time_to_first_token
            .with_label_values(&["chat"])
            .observe(0.05);
        let text = metrics.render();
        for name in [
            "tandem_requests_total{endpoint=\"chat\",outcome=\"success\"} 1",
            "tandem_time_to_first_token_seconds_bucket",
            "tandem_prompt_tokens_total 0",
            "tandem_live_workers{role=\"both\"} 0",
            "tandem_kv_transfer_bytes_total 0",
            "tandem_kv_transfer_seconds_count 0",
            "tandem_ttft_part_seconds_count{part=\"decode_room_wait\"} 0",
            "tandem_ttft_part_seconds_count{part=\"other\"} 0",
            "tandem_kv_transfers_total{transport=\"cuda-ipc\"} 0",
            "tandem_kv_transfer_fallbacks_total{reason=\"context_timeout\"} 0",
            "tandem_requests_disaggregated_total 0",
            "tandem_jobs_rejected_total{pool=\"generation\"} 0",
            "tandem_tool_calls_total{outcome=\"malformed\"} 0",
            "tandem_reasoning_tokens_total 0",
            "tandem_reasoning_replies_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn request_events_derive_their_series() {
        let metrics = Metrics::new();
        metrics.record(Event::Tokens {
            endpoint: Endpoint::Completions,
            count: 3,
            timing: TokenTiming::First {
                since_arrival: Duration::from_millis(250),
            },
        });
        metrics.record(Event::Tokens {
            endpoint: Endpoint::Completions,
            count: 2,
            timing: TokenTiming::Next {
                since_previous: Duration::from_millis(100),
            },
        });
        metrics.record(Event::Finished {
            usage: Usage {
                prompt_tokens: 7,
                completion_tokens: 5,
                cached_tokens: 0,
                ..Default::default()
            },
            adapter: None,
        });
        metrics.record(Event::RequestEnded {
            endpoint: Endpoint::Completions,
            outcome: "success",
            adapter: None,
        });
        metrics.record(Event::Disaggregated);
        metrics.record(Event::KvPulled {
            bytes: 4096,
            micros: 1500,
            transport: "cuda-ipc",
        });
        metrics.record(Event::Fallback(FallbackReason::PullFailed));
        metrics.record(Event::TtftParts(TtftParts {
            context_queue: Duration::from_millis(5),
            prefill: Duration::from_millis(120),
            decode_room_wait: Duration::from_millis(30),
            kv_transfer: Duration::from_micros(1500),
            other: Duration::from_millis(10),
        }));
        let text = metrics.render();
        for line in [
            "tandem_time_to_first_token_seconds_sum{endpoint=\"completions\"} 0.25",
            "tandem_time_to_first_token_seconds_count{endpoint=\"completions\"} 1",
            // Two zeros for the first batch's later tokens, then 0.05 s for each of the next two.
            "tandem_inter_token_latency_seconds_sum{endpoint=\"completions\"} 0.1",
            "tandem_inter_token_latency_seconds_count{endpoint=\"completions\"} 4",
            "tandem_prompt_tokens_total 7",
            "tandem_completion_tokens_total 5",
            "tandem_requests_total{endpoint=\"completions\",outcome=\"success\"} 1",
            "tandem_requests_disaggregated_total 1",
            "tandem_kv_transfer_bytes_total 4096",
            "tandem_kv_transfer_seconds_sum 0.0015",
            "tandem_kv_transfers_total{transport=\"cuda-ipc\"} 1",
            "tandem_kv_transfers_total{transport=\"ucx\"} 0",
            "tandem_kv_transfer_fallbacks_total{reason=\"pull_failed\"} 1",
            "tandem_kv_transfer_fallbacks_total{reason=\"context_error\"} 0",
            "tandem_ttft_part_seconds_sum{part=\"context_queue\"} 0.005",
            "tandem_ttft_part_seconds_sum{part=\"prefill\"} 0.12",
            "tandem_ttft_part_seconds_sum{part=\"decode_room_wait\"} 0.03",
            "tandem_ttft_part_seconds_sum{part=\"kv_transfer\"} 0.0015",
            "tandem_ttft_part_seconds_sum{part=\"other\"} 0.01",
            "tandem_ttft_part_seconds_count{part=\"prefill\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("tandem_lora_"),
            "no adapter was named:\n{text}"
        );
    }

    #[test]
    fn requests_that_name_an_adapter_are_counted_by_adapter_too() {
        let metrics = Metrics::new();
        for (adapter, prompt, outcome) in [
            (Some("sql"), 7, "success"),
            (Some("sql"), 5, "success"),
            (Some("chat"), 3, "invalid_request"),
            (None, 11, "success"),
        ] {
            if outcome == "success" {
                metrics.record(Event::Finished {
                    usage: Usage {
                        prompt_tokens: prompt,
                        completion_tokens: 2,
                        ..Default::default()
                    },
                    adapter,
                });
            }
            metrics.record(Event::RequestEnded {
                endpoint: Endpoint::Chat,
                outcome,
                adapter,
            });
        }
        let text = metrics.render();
        for line in [
            "tandem_requests_total{endpoint=\"chat\",outcome=\"success\"} 3",
            "tandem_lora_requests_total{adapter=\"sql\",outcome=\"success\"} 2",
            "tandem_lora_requests_total{adapter=\"chat\",outcome=\"invalid_request\"} 1",
            "tandem_lora_prompt_tokens_total{adapter=\"sql\"} 12",
            "tandem_lora_completion_tokens_total{adapter=\"sql\"} 4",
            "tandem_prompt_tokens_total 23",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("tandem_lora_prompt_tokens_total{adapter=\"chat\"}"));
    }

    #[test]
    fn a_worker_leaving_takes_its_series_along() {
        let metrics = Metrics::new();
        let heartbeat = Heartbeat {
            numerics: Some(tandem_protocol::messages::WorkerNumerics {
                weights: "fp8".into(),
                kv_cache: tandem_protocol::messages::KvDTypeSpec::Fp8,
            }),
            worker_id: "w".into(),
            role: WorkerRole::Decode,
            model: "m".into(),
            device: "cpu".into(),
            running: 2,
            queued: 1,
            free_kv_blocks: 10,
            total_kv_blocks: 20,
            draining: false,
            interval_ms: 500,
            kv_transfer: None,
            kv_peer: None,
            lora_adapters: ["sql", "chat"]
                .map(|name| tandem_protocol::messages::LoraAdapterInfo {
                    name: name.into(),
                    fingerprint: format!("{name}-fp"),
                })
                .to_vec(),
            engine: Some(tandem_protocol::messages::EngineProgress {
                steps: 40,
                failed_steps: 0,
                preemptions: 5,
                draft_tokens: 30,
                accepted_draft_tokens: 21,
            }),
            max_queued: Some(8),
            max_running: Some(4),
            kv_pull: Some(tandem_protocol::messages::KvPullStats {
                waiting: 3,
                in_flight: 1,
                waited: 6,
                peak_held_blocks: 12,
                refused_handles: 2,
                exports_gone: 1,
            }),
            prefix_cache: None,
        };
        metrics.record(Event::Heartbeat(&heartbeat));
        metrics.record(Event::LiveWorkers(LiveCounts {
            decode: 1,
            accepting_generate: 1,
            cuda_ipc_unmapped: 2,
            ..LiveCounts::default()
        }));
        let text = metrics.render();
        for line in [
            "tandem_worker_running{role=\"decode\",worker_id=\"w\"} 2",
            "tandem_worker_queue_depth{role=\"decode\",worker_id=\"w\"} 1",
            "tandem_worker_total_kv_blocks{role=\"decode\",worker_id=\"w\"} 20",
            "tandem_worker_max_queued{role=\"decode\",worker_id=\"w\"} 8",
            "tandem_kv_pulls_waiting{worker_id=\"w\"} 3",
            "tandem_kv_pulls_in_flight{worker_id=\"w\"} 1",
            "tandem_kv_pulls_waited_total{worker_id=\"w\"} 6",
            "tandem_kv_pull_peak_held_blocks{worker_id=\"w\"} 12",
            "tandem_kv_handles_refused_total{worker_id=\"w\"} 2",
            "tandem_worker_spec_decode_draft_tokens_total{worker_id=\"w\"} 30",
            "tandem_worker_spec_decode_accepted_tokens_total{worker_id=\"w\"} 21",
            "tandem_kv_exports_gone_total{worker_id=\"w\"} 1",
            "tandem_worker_preemptions_total{worker_id=\"w\"} 5",
            "tandem_worker_info{kv_cache=\"fp8\",role=\"decode\",weights=\"fp8\",worker_id=\"w\"} 1",
            "tandem_live_workers{role=\"decode\"} 1",
            "tandem_cuda_ipc_unmapped_pairs 2",
            "tandem_live_workers{role=\"context\"} 0",
            "tandem_worker_lora_adapter{adapter=\"sql\",worker_id=\"w\"} 1",
            "tandem_worker_lora_adapter{adapter=\"chat\",worker_id=\"w\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A restart without one of its adapters: that series goes.
        let mut fewer = heartbeat.clone();
        fewer.lora_adapters.truncate(1);
        metrics.record(Event::Heartbeat(&fewer));
        let text = metrics.render();
        assert!(text.contains("tandem_worker_lora_adapter{adapter=\"sql\",worker_id=\"w\"} 1"));
        assert!(!text.contains("adapter=\"chat\""), "{text}");
        metrics.record(Event::WorkerLeft {
            worker_id: "w",
            role: WorkerRole::Decode,
        });
        metrics.record(Event::LiveWorkers(LiveCounts::default()));
        let text = metrics.render();
        assert!(!text.contains("worker_id=\"w\""), "{text}");
        assert!(
            text.contains("tandem_live_workers{role=\"decode\"} 0"),
            "{text}"
        );
    }
}
