//! `GET /health`: ready (200) only while at least one live worker takes generation jobs, so a
//! load balancer or the launcher never sends traffic that could only fail with 503. Context
//! workers are counted (`context`, `accepting_prefill`) but never make it ready on their own:
//! a disaggregated request needs a generation worker, while a generation worker alone can
//! serve every request (local prefill).

use actix_web::{HttpResponse, get, web};
use serde_json::json;

use crate::state::AppState;

#[get("/health")]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let counts = state.registry.live_counts();
    if counts.accepting_generate > 0 {
        HttpResponse::Ok().json(json!({"status": "ok", "workers": counts}))
    } else {
        let reason = if counts.context + counts.decode + counts.both == 0 {
            "no live worker: no heartbeat received within the worker timeout"
        } else {
            "no live worker takes generation jobs (only context or draining workers are known)"
        };
        HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "reason": reason, "workers": counts}))
    }
}
