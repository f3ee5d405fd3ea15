//! HTTP routes, one file per endpoint, and the JSON body configuration that turns malformed
//! bodies into OpenAI error responses.

pub mod chat;
pub mod completions;
pub mod health;
pub mod metrics;
pub mod models;

mod logprobs;

use actix_web::web;

use crate::error::ApiError;
use crate::state::AppState;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Registers every route and the JSON error handler.
pub fn configure(config: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default()
        .limit(MAX_BODY_BYTES)
        .error_handler(|err, req| {
            let endpoint = if req.path().ends_with("/chat/completions") {
                "chat"
            } else {
                "completions"
            };
            if let Some(state) = req.app_data::<web::Data<AppState>>() {
                state
                    .metrics
                    .requests
                    .with_label_values(&[endpoint, "invalid_request"])
                    .inc();
            }
            ApiError::InvalidJson(err.to_string()).into()
        });
    config
        .app_data(json)
        .service(chat::chat_completions)
        .service(completions::completions)
        .service(models::list_models)
        .service(health::health)
        .service(metrics::metrics);
}

use actix_web::HttpResponse;
use tandem_protocol::messages::FinishReason as WireFinish;

use crate::openai::FinishReason;
use crate::prompt::tokenize;
use crate::streaming::{ChunkFormat, Generation, JobSpec, RequestRecord, sse_body};
use crate::validation::ValidRequest;

/// Tokenizes a validated request, checks it against the context and dispatches it.
pub(crate) async fn start_generation(
    state: &AppState,
    valid: &ValidRequest,
    mut record: RequestRecord,
    request_id: String,
) -> Result<Generation, ApiError> {
    let prepared = async {
        let prompt_ids = tokenize(state.codec.clone(), valid.prompt.clone()).await?;
        let stop = valid.stop_spec(prompt_ids.len(), &state.limits)?;
        Ok::<_, ApiError>(JobSpec {
            prompt_ids,
            sampling: valid.sampling.clone(),
            stop,
        })
    }
    .await;
    let job = prepared.inspect_err(|err| record.fail(err))?;
    Generation::start(state.dispatch(), request_id, job, record).await
}

/// A `text/event-stream` response.
pub(crate) fn sse_response<F: ChunkFormat>(generation: Generation, format: F) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(sse_body(generation, format))
}

/// Only `Stop` and `Length` reach a response; the others end a generation with an error.
pub(crate) fn finish_reason(reason: WireFinish) -> FinishReason {
    match reason {
        WireFinish::Length => FinishReason::Length,
        WireFinish::Stop | WireFinish::Cancelled | WireFinish::Error => FinishReason::Stop,
    }
}
