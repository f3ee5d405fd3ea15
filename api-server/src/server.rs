//! Start-up: read the model's limits, connect to NATS, follow heartbeats, serve HTTP.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{App, HttpServer, web};
use futures::StreamExt;
use tandem_model::ModelConfig;
use tandem_protocol::config::GenerationConfigSource;
use tandem_protocol::messages::{Heartbeat, decode};
use tandem_protocol::messages::{KvEvents, KvSnapshot, KvSnapshotRequest};
use tandem_protocol::subjects::Subjects;

use crate::auth::ApiKeys;
use crate::config::ServerConfig;
use crate::dispatch::{Bus, Timeouts};
use crate::metrics::Metrics;
use crate::prompt::PromptCodec;
use crate::response_store::{ResponseStore, StoredResponses};
use crate::router::{RouterSettings, WorkerRegistry};
use crate::state::{AppState, unix_now_s};
use crate::validation::{ModelLimits, SamplingDefaults};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the model's config.json in {dir}: {detail}")]
    Model { dir: String, detail: String },
    #[error("the model's sampling defaults in {path}: {detail}")]
    GenerationConfig { path: String, detail: String },
    #[error("cannot connect to NATS at {url}: {detail}")]
    Nats { url: String, detail: String },
    #[error("cannot subscribe to the bus (heartbeats, KV events, stored responses): {0}")]
    Subscribe(String),
    #[error("cannot serve HTTP on {address}: {source}")]
    Bind { address: String, source: io::Error },
    #[error("HTTP server failed: {0}")]
    Http(io::Error),
    #[error(transparent)]
    ApiKeys(#[from] crate::auth::KeyFileError),
}

/// The model's limits from its config.json, and its sampling defaults from the
/// generation_config.json `--generation-config` names (none where it says `none`, or where the
/// model directory has no such file).
pub fn model_limits(config: &ServerConfig) -> Result<ModelLimits, StartError> {
    let model = ModelConfig::load(&config.model).map_err(|err| StartError::Model {
        dir: config.model.display().to_string(),
        detail: err.to_string(),
    })?;
    let generation_path = match &config.generation_config {
        GenerationConfigSource::Auto => {
            Some(config.model.join(tandem_model::GENERATION_CONFIG_FILE))
                .filter(|path| path.exists())
        }
        GenerationConfigSource::None => None,
        // Named on purpose: a missing file is an error, not OpenAI's defaults.
        GenerationConfigSource::Dir(dir) => Some(dir.join(tandem_model::GENERATION_CONFIG_FILE)),
    };
    let sampling_defaults = match generation_path {
        Some(generation_path) => {
            let generation: tandem_model::GenerationConfig =
                tandem_model::read_json(&generation_path).map_err(|err| {
                    StartError::GenerationConfig {
                        path: generation_path.display().to_string(),
                        detail: err.to_string(),
                    }
                })?;
            SamplingDefaults::from_generation_config(&generation).map_err(|detail| {
                StartError::GenerationConfig {
                    path: generation_path.display().to_string(),
                    detail,
                }
            })?
        }
        None => SamplingDefaults::default(),
    };
    Ok(ModelLimits {
        served_model_name: config.served_name(),
        max_model_len: u32::try_from(model.max_context()).unwrap_or(u32::MAX),
        vocab_size: u32::try_from(model.vocab_size).unwrap_or(u32::MAX),
        // Filled from the prompt codec in `serve`.
        tool_support: None,
        sampling_defaults,
        reasoning_parser: config.reasoning_parser,
        adapters: Default::default(),
    })
}

/// Follows every worker's KV events into `registry`'s view of their prefix caches, fetching a
/// worker's snapshot when its events show a gap.
async fn follow_kv_events(
    mut subscriber: async_nats::Subscriber,
    client: async_nats::Client,
    subjects: Subjects,
    registry: Arc<WorkerRegistry>,
) {
    while let Some(message) = subscriber.next().await {
        match decode::<KvEvents>("KV events", &message.payload) {
            Ok(batch) => {
                let worker_id = batch.worker_id.clone();
                if registry.kv_events(batch) {
                    tokio::spawn(fetch_kv_snapshot(
                        client.clone(),
                        subjects.clone(),
                        Arc::clone(&registry),
                        worker_id,
                    ));
                }
            }
            Err(err) => tracing::warn!(subject = %message.subject, %err, "ignoring bad KV events"),
        }
    }
    tracing::error!("KV event subscription closed: KV-aware routing sees no new blocks");
}

/// How long one page of a worker's KV snapshot may take.
const KV_SNAPSHOT_PAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Fetches `worker_id`'s KV snapshot, page by page, into `registry` (starting over, a few
/// times, when the cache changed between pages).
async fn fetch_kv_snapshot(
    client: async_nats::Client,
    subjects: Subjects,
    registry: Arc<WorkerRegistry>,
    worker_id: String,
) {
    let subject = subjects.kv_snapshot(&worker_id);
    for _attempt in 0..3 {
        let mut listing: Option<KvSnapshot> = None;
        let mut offset = 0;
        let complete = loop {
            let request = tandem_protocol::messages::encode(&KvSnapshotRequest { offset });
            let reply = tokio::time::timeout(
                KV_SNAPSHOT_PAGE_TIMEOUT,
                client.request(subject.clone(), request.into()),
            )
            .await;
            let page = match reply {
                Ok(Ok(reply)) => match decode::<KvSnapshot>("KV snapshot", &reply.payload) {
                    Ok(page) => page,
                    Err(err) => {
                        tracing::warn!(%worker_id, %err, "a bad KV snapshot page");
                        break false;
                    }
                },
                Ok(Err(err)) => {
                    tracing::warn!(%worker_id, %err, "no KV snapshot from the worker");
                    break false;
                }
                Err(_) => {
                    tracing::warn!(%worker_id, "no KV snapshot page within {KV_SNAPSHOT_PAGE_TIMEOUT:?}");
                    break false;
                }
            };
            let next = page.next_offset;
            match &mut listing {
                None => listing = Some(page),
                Some(listing) if listing.epoch == page.epoch && listing.seq == page.seq => {
                    listing.blocks.extend(page.blocks);
                }
                // The cache changed between pages: start over.
                Some(_) => break false,
            }
            match next {
                Some(next) => offset = next,
                None => break true,
            }
        };
        if complete {
            let listing = listing.expect("a complete listing has pages");
            tracing::info!(%worker_id, blocks = listing.blocks.len(), seq = listing.seq,
                "KV view rebuilt from the worker's snapshot");
            registry.kv_snapshot(&worker_id, Some(listing));
            return;
        }
    }
    registry.kv_snapshot(&worker_id, None);
}

/// Follows every worker's heartbeats into `registry`, and expires silent workers on a timer
/// (a quarter of the timeout, so a dead worker is dropped at most 1.25 timeouts after its
/// last heartbeat).
async fn follow_heartbeats(
    mut subscriber: async_nats::Subscriber,
    client: async_nats::Client,
    subjects: Subjects,
    registry: Arc<WorkerRegistry>,
    worker_timeout: Duration,
    served_model_name: String,
) {
    let mut expiry = tokio::time::interval((worker_timeout / 4).max(Duration::from_millis(50)));
    loop {
        tokio::select! {
            message = subscriber.next() => {
                let Some(message) = message else {
                    tracing::error!("heartbeat subscription closed; no worker can be discovered");
                    return;
                };
                match decode::<Heartbeat>("heartbeat", &message.payload) {
                    Ok(heartbeat) if heartbeat.model != served_model_name => {
                        tracing::warn!(worker_id = %heartbeat.worker_id, model = %heartbeat.model,
                            "ignoring heartbeat for another model name on this model's subject");
                    }
                    Ok(heartbeat) => {
                        let worker_id = heartbeat.worker_id.clone();
                        if registry.observe(heartbeat, Instant::now()) {
                            tokio::spawn(fetch_kv_snapshot(
                                client.clone(),
                                subjects.clone(),
                                Arc::clone(&registry),
                                worker_id,
                            ));
                        }
                    }
                    Err(err) => tracing::warn!(subject = %message.subject, %err, "ignoring bad heartbeat"),
                }
            }
            _ = expiry.tick() => {
                registry.expire(Instant::now());
            }
        }
    }
}

/// Runs the server until it is stopped (SIGINT / SIGTERM, handled by actix: in-flight requests
/// get a grace period).
pub async fn serve(config: ServerConfig, codec: Arc<dyn PromptCodec>) -> Result<(), StartError> {
    let mut limits = model_limits(&config)?;
    limits.tool_support = codec.tool_support();
    let hidden_size = ModelConfig::load(&config.model)
        .map_err(|err| StartError::Model {
            dir: config.model.display().to_string(),
            detail: err.to_string(),
        })?
        .hidden_size;
    match limits.sampling_defaults.describe() {
        none if none.is_empty() && config.generation_config == GenerationConfigSource::None => {
            tracing::info!(
                "--generation-config none: requests that omit sampling fields get OpenAI's \
                 defaults (temperature 1, top_p 1), whatever the model's \
                 generation_config.json says"
            )
        }
        none if none.is_empty() => tracing::info!(
            "the model sets no sampling defaults: requests that omit them get OpenAI's \
             (temperature 1, top_p 1)"
        ),
        defaults => tracing::info!(
            "requests that omit them get the model's sampling defaults (its \
             generation_config.json): {defaults}"
        ),
    }
    let api_keys = ApiKeys::from_config(&config)?.map(web::Data::new);
    match &api_keys {
        Some(keys) => tracing::info!(
            keys = keys.len(),
            metrics_require_key = config.metrics_require_key,
            "API keys required on /v1"
        ),
        None => tracing::warn!("no API key configured: anyone who reaches this port is served"),
    }
    let client = config
        .nats_auth
        .connect_options(format!("api-server {}", limits.served_model_name))
        .await
        .map_err(|err| StartError::Nats {
            url: config.nats.clone(),
            detail: err.to_string(),
        })?
        .connection_timeout(Duration::from_secs(5))
        .connect(config.nats.as_str())
        .await
        .map_err(|err| StartError::Nats {
            url: config.nats.clone(),
            detail: err.to_string(),
        })?;
    let subjects = Subjects::new(&limits.served_model_name);
    let metrics = Metrics::new();
    let worker_timeout = Duration::from_millis(config.worker_timeout_ms);
    let registry = Arc::new(
        WorkerRegistry::new(
            RouterSettings {
                policy: config.router_policy,
                worker_timeout,
                max_local_prefill_length: config.max_local_prefill_length,
                kv_overlap_weight: config.router_kv_overlap_weight,
            },
            metrics.clone(),
        )
        .with_adapters(limits.adapters.clone()),
    );
    let heartbeats = client
        .subscribe(subjects.heartbeat_all())
        .await
        .map_err(|err| StartError::Subscribe(err.to_string()))?;
    let kv_events = client
        .subscribe(subjects.kv_events_all())
        .await
        .map_err(|err| StartError::Subscribe(err.to_string()))?;
    tokio::spawn(follow_kv_events(
        kv_events,
        client.clone(),
        subjects.clone(),
        Arc::clone(&registry),
    ));
    tokio::spawn(follow_heartbeats(
        heartbeats,
        client.clone(),
        subjects.clone(),
        Arc::clone(&registry),
        worker_timeout,
        limits.served_model_name.clone(),
    ));
    let responses = Arc::new(StoredResponses::new(
        ResponseStore::new(config.response_store_mib.saturating_mul(1 << 20)),
        client.clone(),
        subjects.clone(),
        metrics.clone(),
    ));
    let questions = client
        .subscribe(subjects.responses(responses.instance().as_str()))
        .await
        .map_err(|err| StartError::Subscribe(err.to_string()))?;
    tokio::spawn(Arc::clone(&responses).answer_peers(questions));
    tracing::info!(instance = %responses.instance(), store_mib = config.response_store_mib,
        "stored responses: this api-server's ids start resp_{}; it answers the other \
         api-servers of the model about them", responses.instance());
    let grammars = Arc::new(crate::grammar::GrammarCheck::new(
        config.model.clone(),
        limits.vocab_size as usize,
    ));
    let embeddings = crate::pooling::EmbeddingConfig::read(&config.model, hidden_size);
    match &embeddings.not_served {
        None => tracing::info!(
            dimensions = embeddings.hidden_size,
            normalize = embeddings.normalize,
            "embeddings: the last token's hidden state"
        ),
        Some(why) => tracing::info!("embeddings not served: {why}"),
    }
    let state = web::Data::new(AppState {
        limits,
        embeddings,
        codec,
        bus: Bus { client, subjects },
        registry,
        metrics,
        timeouts: Timeouts {
            accept: Duration::from_millis(config.accept_timeout_ms),
            first_token: Duration::from_millis(config.first_token_timeout_ms),
            stall: Duration::from_millis(config.stall_timeout_ms),
            request: Duration::from_millis(config.request_timeout_ms),
        },
        started_unix_s: unix_now_s(),
        admission: crate::admission::Admission::new(config.max_pending_requests),
        migration_limit: config.migration_limit,
        grammars,
        responses,
    });
    let address = format!("{}:{}", config.host, config.port);
    let mut server = HttpServer::new(move || {
        let mut app = App::new().app_data(state.clone());
        if let Some(keys) = &api_keys {
            app = app.app_data(keys.clone());
        }
        app.wrap(actix_web::middleware::from_fn(crate::auth::require_key))
            .configure(crate::routes::configure)
    })
    .on_connect(crate::disconnect::remember_socket);
    if config.http_workers > 0 {
        server = server.workers(config.http_workers);
    }
    let server = server.bind(&address).map_err(|source| StartError::Bind {
        address: address.clone(),
        source,
    })?;
    for bound in server.addrs() {
        tracing::info!("api-server listening on http://{bound}");
    }
    server.run().await.map_err(StartError::Http)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model directory of `config.json` only, with `generation` as its
    /// generation_config.json where given.
    fn model_dir(generation: Option<&str>) -> std::path::PathBuf {
        let dir = tandem_test_kit::temp_dir("generation-config");
        std::fs::write(
            dir.join("config.json"),
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                "rms_norm_eps": 0.00001, "max_position_embeddings": 1024}"#,
        )
        .unwrap();
        if let Some(text) = generation {
            std::fs::write(dir.join(tandem_model::GENERATION_CONFIG_FILE), text).unwrap();
        }
        dir
    }

    fn limits(model: &std::path::Path, source: GenerationConfigSource) -> ModelLimits {
        let config = ServerConfig {
            generation_config: source,
            ..ServerConfig::new(model.to_path_buf())
        };
        model_limits(&config).unwrap()
    }

    #[test]
    fn the_generation_config_flag_picks_where_sampling_defaults_come_from() {
        let model = model_dir(Some(r#"{"temperature": 0.2, "top_p": 0.9}"#));
        let auto = limits(&model, GenerationConfigSource::Auto).sampling_defaults;
        assert_eq!(auto.describe(), "temperature=0.2 top_p=0.9");
        let none = limits(&model, GenerationConfigSource::None).sampling_defaults;
        assert_eq!(none, SamplingDefaults::default());
        let other = model_dir(Some(r#"{"temperature": 0.7, "top_k": 20}"#));
        let from_dir = limits(&model, GenerationConfigSource::Dir(other)).sampling_defaults;
        assert_eq!(from_dir.describe(), "temperature=0.7 top_k=20");
        // `auto` over a model without the file: OpenAI's defaults; a named directory without
        // it: an error that names the file.
        let bare = model_dir(None);
        let auto = limits(&bare, GenerationConfigSource::Auto).sampling_defaults;
        assert_eq!(auto, SamplingDefaults::default());
        let config = ServerConfig {
            generation_config: GenerationConfigSource::Dir(bare.clone()),
            ..ServerConfig::new(model.clone())
        };
        let err = model_limits(&config).unwrap_err().to_string();
        assert!(
            err.contains(&bare.join("generation_config.json").display().to_string()),
            "{err}"
        );
    }
}
