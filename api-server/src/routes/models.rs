//! `GET /v1/models`: the one served model; `GET /v1/models/{model}`: it by its id.

use actix_web::{HttpResponse, get, web};

use crate::error::ApiError;
use crate::openai::ModelList;
use crate::state::AppState;

fn served(state: &AppState) -> ModelList {
    ModelList::single(
        state.limits.served_model_name.clone(),
        state.started_unix_s,
        state.limits.max_model_len,
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
    let mut list = served(&state);
    let card = list.data.remove(0);
    if *model != card.id {
        return Err(ApiError::ModelNotFound {
            model: model.into_inner(),
        });
    }
    Ok(HttpResponse::Ok().json(card))
}
