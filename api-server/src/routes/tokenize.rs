//! `POST /tokenize` and `POST /detokenize` (vLLM's): the tokens a request's prompt becomes, as
//! the server counts them, and the text of token ids.

use actix_web::{HttpResponse, post, web};

use crate::error::ApiError;
use crate::fields::{DETOKENIZE, TOKENIZE};
use crate::openai::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use crate::prompt::tokenize;
use crate::state::AppState;
use crate::validation::PromptInput;
use crate::validation::tokenize::{validate_detokenize, validate_tokenize};

/// On a blocking thread, as generation requests tokenize.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ApiError::Internal(format!("tokenizer task failed: {err}")))?
}

#[post("/tokenize")]
pub async fn tokenize_prompt(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let valid = TOKENIZE
        .parse::<TokenizeRequest>(body.into_inner())
        .and_then(|request| validate_tokenize(&request, &state.limits))?;
    let codec = state.codec.clone();
    let tokens = match (valid.prompt, valid.add_special_tokens) {
        (PromptInput::Text(text), false) => {
            blocking(move || codec.encode_plain(&text).map_err(ApiError::from)).await?
        }
        (prompt, _) => tokenize(codec, prompt, valid.tools, valid.rendering).await?,
    };
    let token_strs = valid.return_token_strs.then(|| {
        tokens
            .iter()
            .map(|&id| state.codec.token_text(id))
            .collect()
    });
    Ok(HttpResponse::Ok().json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.limits.max_model_len,
        tokens,
        token_strs,
    }))
}

#[post("/detokenize")]
pub async fn detokenize_tokens(
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let ids = DETOKENIZE
        .parse::<DetokenizeRequest>(body.into_inner())
        .and_then(|request| validate_detokenize(&request, &state.limits))?;
    let codec = state.codec.clone();
    let prompt = blocking(move || codec.decode_text(&ids).map_err(ApiError::from)).await?;
    Ok(HttpResponse::Ok().json(DetokenizeResponse { prompt }))
}
