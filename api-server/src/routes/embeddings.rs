//! `POST /v1/embeddings`: each input prefilled where any prompt is (a context worker of a
//! disaggregated deployment, which answers it whole), and answered with the final-normed
//! hidden state of its last token (last-token pooling, [`crate::pooling`]); the
//! vector cut to `dimensions`, normalized where the model normalizes, and written as floats or
//! base64.
//!
//! Each input is a job of its own (routed, migrated and counted as the choices of one request
//! are), [`INPUTS_IN_FLIGHT`] at a time; the request takes one place under
//! `--max-pending-requests`. A client that leaves cancels the inputs not done.

use actix_web::{HttpMessage, HttpRequest, HttpResponse, post, web};
use base64::Engine as _;
use futures::StreamExt;
use tandem_protocol::messages::{SamplingSpec, StopSpec};

use super::{client_left, unless_client_leaves};
use crate::auth::TenantSalt;
use crate::disconnect::ClientSocket;
use crate::dispatch::{Generation, JobSpec, RequestRecord};
use crate::error::ApiError;
use crate::metrics::Endpoint;
use crate::openai::{Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, EmbeddingVector};
use crate::prompt::tokenize;
use crate::state::AppState;
use crate::validation::embeddings::{EncodingFormat, ValidEmbeddings, validate_embeddings};

/// Inputs of one request on the workers at once: enough for the workers to batch their
/// prefills, few enough that a request of thousands leaves room in their queues for others.
pub const INPUTS_IN_FLIGHT: usize = 32;

#[post("/v1/embeddings")]
pub async fn embeddings(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let socket = ClientSocket::of(&request);
    let mut record = RequestRecord::new(state.metrics.clone(), Endpoint::Embeddings);
    let valid = crate::fields::EMBEDDINGS
        .parse::<EmbeddingRequest>(body.into_inner())
        .and_then(|body| validate_embeddings(&body, &state.limits, &state.embeddings))
        .inspect_err(|err| record.fail(err))?;
    record.set_adapter(valid.lora.as_deref());
    let ids =
        crate::reply_id::ReplyId::of(&request, "embd", None).inspect_err(|err| record.fail(err))?;
    let admitted = state
        .admission
        .try_admit()
        .inspect_err(|err| record.fail(err))?;
    let tenant = request.extensions().get::<TenantSalt>().cloned();
    let records: Vec<RequestRecord> = (1..valid.inputs.len())
        .map(|_| record.extra_choice())
        .collect();
    let jobs = std::iter::once(record)
        .chain(records)
        .enumerate()
        .map(|(index, record)| {
            let request_id = match valid.inputs.len() {
                1 => ids.internal.clone(),
                _ => format!("{}-i{index}", ids.internal),
            };
            embed_input(&state, &valid, index, record, request_id, tenant.clone())
        });
    let all = futures::stream::iter(jobs)
        .buffered(INPUTS_IN_FLIGHT)
        .collect::<Vec<_>>();
    let Some(results) = unless_client_leaves(socket, all).await else {
        return Ok(client_left());
    };
    drop(admitted);
    let mut data = Vec::with_capacity(results.len());
    let mut prompt_tokens = 0u32;
    for (index, result) in results.into_iter().enumerate() {
        let (vector, tokens) = result?;
        prompt_tokens = prompt_tokens.saturating_add(tokens);
        data.push(Embedding {
            object: "embedding",
            embedding: encode(vector, valid.encoding),
            index: index as u32,
        });
    }
    Ok(HttpResponse::Ok().json(EmbeddingList {
        object: "list",
        data,
        model: valid
            .lora
            .clone()
            .unwrap_or_else(|| state.limits.served_model_name.clone()),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}

/// Input `index`: tokenized, fitted to the context, embedded by a worker; its vector as the
/// client gets it and its prompt tokens.
async fn embed_input(
    state: &AppState,
    valid: &ValidEmbeddings,
    index: usize,
    mut record: RequestRecord,
    request_id: String,
    tenant: Option<TenantSalt>,
) -> Result<(Vec<f32>, u32), ApiError> {
    let prepared = async {
        let mut prompt_ids = tokenize(
            state.codec.clone(),
            valid.inputs[index].clone(),
            None,
            Default::default(),
        )
        .await
        .map_err(|err| crate::prompt::naming_prompt_param(err, &valid.input_param(index)))?;
        valid.fit_input(index, &mut prompt_ids, &state.limits)?;
        Ok::<_, ApiError>(JobSpec {
            prompt_ids,
            sampling: SamplingSpec::default(),
            stop: StopSpec {
                max_tokens: 0,
                ..StopSpec::default()
            },
            prompt_param: "input",
            samples: None,
            // Unsalted inputs share the prefix cache; a tenant's stay its own.
            cache_salt: tenant.map(|tenant| tenant.with_request_salt(None)),
            priority: valid.priority,
            prediction_ids: Vec::new(),
            embedding: true,
            lora: valid.lora.clone(),
        })
    }
    .await;
    let job = prepared.inspect_err(|err| record.fail(err))?;
    let completed = Generation::start(state.dispatch(), request_id, job, record)
        .await?
        .collect()
        .await?;
    let hidden = completed.embedding.ok_or_else(|| {
        ApiError::Internal("the embedding job finished without its embedding".into())
    })?;
    if hidden.len() != state.embeddings.hidden_size as usize {
        return Err(ApiError::Worker {
            message: format!(
                "the worker's embedding has {} components, the model {}",
                hidden.len(),
                state.embeddings.hidden_size
            ),
        });
    }
    Ok((valid.finish(hidden), completed.usage.prompt_tokens))
}

/// A vector as `encoding_format` asks: its numbers, or its little-endian f32 bytes in base64.
fn encode(vector: Vec<f32>, encoding: EncodingFormat) -> EmbeddingVector {
    match encoding {
        EncodingFormat::Float => EmbeddingVector::Float(vector),
        EncodingFormat::Base64 => {
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_holds_the_little_endian_floats() {
        let EmbeddingVector::Base64(text) = encode(vec![1.0, -0.5], EncodingFormat::Base64) else {
            panic!("base64 asked");
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat()
        );
        assert_eq!(
            serde_json::to_value(encode(vec![0.25], EncodingFormat::Float)).unwrap(),
            serde_json::json!([0.25])
        );
    }
}
