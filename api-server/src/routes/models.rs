//! `GET /v1/models`: the served model and the LoRA adapters its live workers serve;
//! `GET /v1/models/{model}`: one of them by its id.

use actix_web::{HttpResponse, get, web};

use crate::error::ApiError;
use crate::openai::ModelList;
use crate::state::AppState;

fn served(state: &AppState) -> ModelList {
    ModelList::with_adapters(
        state.limits.served_model_name.clone(),
        state.started_unix_s,
        state.limits.max_model_len,
        state.limits.adapters.names(),
    )
}

#[get("/v1/models")]
pub async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(served(&state))
}

/// OpenAI's "retrieve model": the model object, or 404 `model_not_found` for another id (an
/// id may hold slashes: `meta-llama/Llama-3.1-8B-Instruct`).
#[get("/v1/models/{model:.+}")]
pub async fn retrieve_model(
    state: web::Data<AppState>,
    model: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let list = served(&state);
    match list.data.into_iter().find(|card| card.id == *model) {
        Some(card) => Ok(HttpResponse::Ok().json(card)),
        None => Err(ApiError::ModelNotFound {
            model: model.into_inner(),
        }),
    }
}
