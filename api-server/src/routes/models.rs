//! `GET /v1/models`: the one served model.

use actix_web::{HttpResponse, get, web};

use crate::openai::ModelList;
use crate::state::AppState;

#[get("/v1/models")]
pub async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ModelList::single(
        state.limits.served_model_name.clone(),
        state.started_unix_s,
        state.limits.max_model_len,
    ))
}
