//! Operator endpoints: liveness, readiness and Prometheus metrics. No token needed.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::AppState;
use crate::metrics as m;

pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 when the database (and the fan-out) answer and we are not draining.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let reason = if state.health.is_draining() {
        Some("draining".to_string())
    } else if let Some(error) = state.health.store_error() {
        Some(error)
    } else if let Err(error) = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        state.rooms.context().store.ping(),
    )
    .await
    .map_err(|_| "database ping timed out".to_string())
    .and_then(|r| r.map_err(|e| format!("database unreachable: {e}")))
    {
        Some(error)
    } else {
        state.rooms.context().fanout.degraded()
    };
    match reason {
        None => (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "reason": reason })),
        ),
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    metrics::gauge!(m::DOCUMENTS_LOADED).set(state.rooms.loaded() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
