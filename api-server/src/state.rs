//! What every route shares.

use std::sync::Arc;

use crate::dispatch::{Bus, Dispatch, Timeouts};
use crate::metrics::Metrics;
use crate::prompt::PromptCodec;
use crate::router::WorkerRegistry;
use crate::validation::ModelLimits;

pub struct AppState {
    pub limits: ModelLimits,
    /// How `/v1/embeddings` pools the model's hidden states (its model directory's modules).
    pub embeddings: crate::pooling::EmbeddingConfig,
    pub codec: Arc<dyn PromptCodec>,
    pub bus: Bus,
    pub registry: Arc<WorkerRegistry>,
    pub metrics: Metrics,
    pub timeouts: Timeouts,
    /// Unix seconds of the server's start, shown as the model's `created`.
    pub started_unix_s: u64,
    /// How often a request may move to another worker (`--migration-limit`).
    pub migration_limit: u32,
    /// The bound on generation requests in flight.
    pub admission: crate::admission::Admission,
    /// Compiles `response_format` grammars at the edge.
    pub grammars: Arc<crate::grammar::GrammarCheck>,
    /// The Responses API's stored responses: this api-server's (`--response-store-mib`),
    /// and the other api-servers' through the bus.
    pub responses: Arc<crate::response_store::StoredResponses>,
}

impl AppState {
    pub fn dispatch(&self) -> Dispatch<'_> {
        Dispatch {
            bus: &self.bus,
            registry: &self.registry,
            metrics: &self.metrics,
            timeouts: self.timeouts,
            migration_limit: self.migration_limit,
        }
    }
}

pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
