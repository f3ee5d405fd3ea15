//! What the router's tests share: heartbeats, settings, registries and prompts.

use std::time::Duration;

use tandem_protocol::config::RouterPolicy;
use tandem_protocol::messages::{Heartbeat, WorkerRole};

use super::{Prefill, Route, RouterSettings, WorkerRegistry};
use crate::metrics::Metrics;

/// A heartbeat of `id` with `running` and `queued` sequences, no queue bound.
pub(super) fn heartbeat(id: &str, role: WorkerRole, running: u32, queued: u32) -> Heartbeat {
    Heartbeat {
        lora_adapters: Vec::new(),
        numerics: None,
        worker_id: id.into(),
        role,
        model: "m".into(),
        device: "cpu".into(),
        running,
        queued,
        free_kv_blocks: 10,
        total_kv_blocks: 20,
        draining: false,
        interval_ms: 500,
        kv_transfer: None,
        kv_peer: None,
        engine: Some(tandem_protocol::messages::EngineProgress::default()),
        max_queued: None,
        max_running: None,
        kv_pull: None,
        prefix_cache: None,
    }
}

pub(super) fn settings(policy: RouterPolicy, max_local_prefill_length: usize) -> RouterSettings {
    RouterSettings {
        policy,
        worker_timeout: Duration::from_millis(1000),
        max_local_prefill_length,
        kv_overlap_weight: tandem_protocol::config::DEFAULT_KV_OVERLAP_WEIGHT,
    }
}

/// A registry that disaggregates every prompt a context worker can take.
pub(super) fn registry(policy: RouterPolicy) -> WorkerRegistry {
    WorkerRegistry::new(settings(policy, 0), Metrics::new())
}

/// The context worker that prefills `route`'s prompt, if any.
pub(super) fn context_of(route: &Route) -> Option<&str> {
    match &route.prefill {
        Prefill::Remote { context_id } => Some(context_id),
        Prefill::Local(_) => None,
    }
}

/// A prompt of `tokens` token ids.
pub(super) fn prompt(tokens: usize) -> Vec<u32> {
    (0..tokens as u32).collect()
}
