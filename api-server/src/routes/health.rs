//! `GET /health`: ready (200) only while at least one live worker takes generation jobs, so a
//! load balancer or the launcher never sends traffic that could only fail with 503. Context
//! workers are counted (`context`, `accepting_prefill`) but never make it ready on their own:
//! a disaggregated request needs a generation worker, while a generation worker alone can
//! serve every request (local prefill). Beside the counts, `engines` lists each live worker's
//! load and engine progress (steps run and failed, and whether it is stuck).

use actix_web::{HttpResponse, get, web};
use serde_json::json;

use crate::state::AppState;

#[get("/health")]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let counts = state.registry.live_counts();
    // Each worker's load and engine progress (a stuck engine takes nothing new).
    let engines = state.registry.statuses();
    if counts.accepting_generate > 0 {
        HttpResponse::Ok().json(json!({"status": "ok", "workers": counts, "engines": engines}))
    } else {
        let reason = if counts.context + counts.decode + counts.both == 0 {
            "no live worker: no heartbeat received within the worker timeout"
        } else {
            "no live worker takes generation jobs (only context or draining workers are known)"
        };
        HttpResponse::ServiceUnavailable().json(
            json!({"status": "unavailable", "reason": reason, "workers": counts,
                         "engines": engines}),
        )
    }
}
