//! Prometheus metrics of the api-server, on one explicit [`prometheus::Registry`] (no global
//! state, so tests can build several servers in one process).
//!
//! The `prometheus` crate (TiKV's) was picked over `metrics` + `metrics-exporter-prometheus`
//! because it keeps metrics as plain values on a registry we own and renders the text format
//! itself, with no global recorder to install and no exporter thread or listener of its own;
//! with default features off it has no protobuf dependency.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::router::FallbackReason;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `endpoint` (chat, completions) × `outcome` (success, invalid_request, unavailable, ...).
    pub requests: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub worker_queue_depth: IntGaugeVec,
    pub worker_running: IntGaugeVec,
    pub worker_free_kv_blocks: IntGaugeVec,
    pub worker_total_kv_blocks: IntGaugeVec,
    pub live_workers: IntGaugeVec,
    /// KV cache bytes decode workers pulled from context workers (`kv_pulled.bytes`).
    pub kv_transfer_bytes: IntCounter,
    /// Duration of each successful pull (`kv_pulled.micros`).
    pub kv_transfer_seconds: Histogram,
    /// Successful pulls by `transport` (`ucx`: through host memory; `cuda-ipc`: device to
    /// device between GPUs of one host).
    pub kv_transfers: IntCounterVec,
    /// `reason`: [`FallbackReason::label`].
    pub kv_transfer_fallbacks: IntCounterVec,
    /// Requests whose prefill ran on a context worker.
    pub requests_disaggregated: IntCounter,
    /// Per context worker (`worker_id`), from heartbeats' `kv_transfer`.
    pub kv_pinned_blocks: IntGaugeVec,
    pub kv_pinned_tokens: IntGaugeVec,
    /// Cumulative counts mirrored from heartbeats (see `router::mirror_counter`).
    pub kv_expirations: IntCounterVec,
    pub kv_releases: IntCounterVec,
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
        let live_workers = IntGaugeVec::new(
            Opts::new(
                "tandem_live_workers",
                "Workers with a recent heartbeat, by role",
            ),
            &["role"],
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
        let requests_disaggregated = IntCounter::new(
            "tandem_requests_disaggregated_total",
            "Requests whose prompt a context worker prefilled",
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
        let metrics = Metrics {
            registry,
            requests,
            time_to_first_token,
            inter_token_latency,
            prompt_tokens,
            completion_tokens,
            worker_queue_depth,
            worker_running,
            worker_free_kv_blocks,
            worker_total_kv_blocks,
            live_workers,
            kv_transfer_bytes,
            kv_transfer_seconds,
            kv_transfers,
            kv_transfer_fallbacks,
            requests_disaggregated,
            kv_pinned_blocks,
            kv_pinned_tokens,
            kv_expirations,
            kv_releases,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.time_to_first_token.clone()),
            Box::new(metrics.inter_token_latency.clone()),
            Box::new(metrics.prompt_tokens.clone()),
            Box::new(metrics.completion_tokens.clone()),
            Box::new(metrics.worker_queue_depth.clone()),
            Box::new(metrics.worker_running.clone()),
            Box::new(metrics.worker_free_kv_blocks.clone()),
            Box::new(metrics.worker_total_kv_blocks.clone()),
            Box::new(metrics.live_workers.clone()),
            Box::new(metrics.kv_transfer_bytes.clone()),
            Box::new(metrics.kv_transfer_seconds.clone()),
            Box::new(metrics.kv_transfers.clone()),
            Box::new(metrics.kv_transfer_fallbacks.clone()),
            Box::new(metrics.requests_disaggregated.clone()),
            Box::new(metrics.kv_pinned_blocks.clone()),
            Box::new(metrics.kv_pinned_tokens.clone()),
            Box::new(metrics.kv_expirations.clone()),
            Box::new(metrics.kv_releases.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("each metric is registered once, under a distinct name");
        }
        // Families without a sample are left out of the exposition; create the known label
        // sets so dashboards see every family from the start.
        for endpoint in ["chat", "completions"] {
            metrics.time_to_first_token.with_label_values(&[endpoint]);
            metrics.inter_token_latency.with_label_values(&[endpoint]);
        }
        for role in ["context", "decode", "both"] {
            metrics.live_workers.with_label_values(&[role]).set(0);
        }
        for transport in ["ucx", "cuda-ipc"] {
            metrics.kv_transfers.with_label_values(&[transport]);
        }
        for reason in FallbackReason::ALL {
            metrics
                .kv_transfer_fallbacks
                .with_label_values(&[reason.label()]);
        }
        metrics
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
            "tandem_kv_transfers_total{transport=\"cuda-ipc\"} 0",
            "tandem_kv_transfer_fallbacks_total{reason=\"context_timeout\"} 0",
            "tandem_requests_disaggregated_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
