//! `GET /metrics`: Prometheus text format.

use actix_web::{HttpResponse, get, web};

use crate::state::AppState;

#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
