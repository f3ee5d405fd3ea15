//! Prometheus metrics of the api-server, on one explicit [`prometheus::Registry`] (no global
//! state, so tests can build several servers in one process).
//!
//! The `prometheus` crate (TiKV's) was picked over `metrics` + `metrics-exporter-prometheus`
//! because it keeps metrics as plain values on a registry we own and renders the text format
//! itself, with no global recorder to install and no exporter thread or listener of its own;
//! with default features off it has no protobuf dependency.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
