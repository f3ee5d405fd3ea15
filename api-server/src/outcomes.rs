//! What the api-server counts about its requests and workers, named once for the parts that
//! produce the counts (dispatch, router) and the one that exports them (metrics): why a
//! request was prefilled by its generation worker after all, why it left its worker, and how
//! many workers of each role are live. A vocabulary with no dependencies, so that metrics
//! never has to import the code whose outcomes it counts.

/// Why a request meant for a context worker was prefilled by a generation worker after all
/// (the `reason` label of `tandem_kv_transfer_fallbacks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// A decode worker but no live context worker (only counted where prefills are expected
    /// elsewhere, see [`FallbackReason::of_route`]).
    NoContextWorker,
    /// The context worker did not accept the prefill job within the accept timeout.
    ContextTimeout,
    /// The context worker's heartbeats stopped before it handed the KV cache over.
    ContextGone,
    /// The context worker answered with an error (or a failed end) before any token.
    ContextError,
    /// Every live context worker's queue was full (their heartbeats said so, or each refused
    /// the prefill job).
    ContextFull,
    /// The decode worker could not pull the KV cache and prefilled itself (its `kv_pulled`
    /// carried a fallback).
    PullFailed,
    /// The decode worker refused the KV handle before reading anything and prefilled itself
    /// (its `kv_pulled` carried `handle_refused`): for an honest request, context and decode
    /// workers with different KV secrets, or a context worker without one.
    HandleRefused,
    /// The decode worker read the KV cache but found the export's seal changed after the read
    /// (its `kv_pulled` carried `export_gone`): the context worker had freed the export first
    /// (a release or cancel that came early or was forged, or its expiry), so the decode
    /// worker dropped what it read and prefilled itself.
    ExportGone,
    /// The decode job with the context worker's KV handle does not fit in the NATS server's
    /// `max_payload` (the prefill job, without the handle, did).
    DecodeJobTooLarge,
}

impl FallbackReason {
    pub fn label(self) -> &'static str {
        match self {
            FallbackReason::NoContextWorker => "no_context_worker",
            FallbackReason::ContextTimeout => "context_timeout",
            FallbackReason::ContextGone => "context_gone",
            FallbackReason::ContextError => "context_error",
            FallbackReason::ContextFull => "context_full",
            FallbackReason::PullFailed => "pull_failed",
            FallbackReason::HandleRefused => "handle_refused",
            FallbackReason::ExportGone => "export_gone",
            FallbackReason::DecodeJobTooLarge => "decode_job_too_large",
        }
    }

    pub const ALL: [FallbackReason; 9] = [
        FallbackReason::NoContextWorker,
        FallbackReason::ContextTimeout,
        FallbackReason::ContextGone,
        FallbackReason::ContextError,
        FallbackReason::ContextFull,
        FallbackReason::PullFailed,
        FallbackReason::HandleRefused,
        FallbackReason::ExportGone,
        FallbackReason::DecodeJobTooLarge,
    ];
}

/// Why a request left its worker (the `reason` label of `tandem_request_migrations_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationReason {
    /// The worker's heartbeats stopped (it died, hung or lost the bus).
    WorkerGone,
    /// The worker ended the request with an error (e.g. its device failed).
    WorkerError,
    /// The worker cancelled the request itself (a drain past its grace time).
    WorkerCancelled,
    /// The worker did not accept the job (of a migration, or of a hand-over) in time.
    NotAccepted,
    /// No message within the stall timeout although the worker heartbeats.
    Stalled,
    /// A `tokens` message skipped positions: tokens were lost on the bus.
    StreamGap,
}

impl MigrationReason {
    pub fn label(self) -> &'static str {
        match self {
            MigrationReason::WorkerGone => "worker_gone",
            MigrationReason::WorkerError => "worker_error",
            MigrationReason::WorkerCancelled => "worker_cancelled",
            MigrationReason::NotAccepted => "not_accepted",
            MigrationReason::Stalled => "stalled",
            MigrationReason::StreamGap => "stream_gap",
        }
    }

    pub const ALL: [MigrationReason; 6] = [
        MigrationReason::WorkerGone,
        MigrationReason::WorkerError,
        MigrationReason::WorkerCancelled,
        MigrationReason::NotAccepted,
        MigrationReason::Stalled,
        MigrationReason::StreamGap,
    ];
}

/// Live workers per role, for /health and the `tandem_live_workers` gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LiveCounts {
    pub context: u32,
    pub decode: u32,
    pub both: u32,
    /// Live, not draining, and taking generation jobs.
    pub accepting_generate: u32,
    /// Live, not draining context workers: requests are disaggregated while this is above 0.
    pub accepting_prefill: u32,
    /// Pairs of one host, a decode worker that reads CUDA IPC and a context worker that
    /// shares its cache over it, where the decode worker has not yet said it mapped that cache
    /// (`kv_peer.cuda_ipc_mapped`): the pair's first hand-over would wait for the mapping
    /// (most of a second for a whole GPU's cache). The launcher reports ready at 0.
    pub cuda_ipc_unmapped: u32,
}
