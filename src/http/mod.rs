//! The HTTP surface: one module per resource, one error type, one router.

mod client_addr;
mod docs;
mod error;
mod health;
mod history;
mod ws;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::Verifier;
use crate::config::Limits;
use crate::health::Health;
use crate::history::History;
use crate::room::Rooms;
use crate::transport;

pub use client_addr::{ClientAddrs, ConnectionSlot};

/// Everything a request handler may need.
#[derive(Clone)]
pub struct AppState {
    pub rooms: Rooms,
    pub history: Arc<History>,
    pub health: Arc<Health>,
    pub limits: Arc<Limits>,
    pub verifier: Option<Arc<Verifier>>,
    pub allowed_origins: Option<Arc<Vec<String>>>,
    pub client_addrs: ClientAddrs,
    pub metrics: PrometheusHandle,
    /// What every socket shares (limits, the heartbeat that also carries shutdown).
    pub transport: Arc<transport::Context>,
    /// Open sockets, so shutdown can wait for them to close.
    pub connections: tokio_util::task::TaskTracker,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_http_body_bytes;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/ws/{*doc}", get(ws::ywebsocket))
        .route("/ws/", get(ws::ywebsocket))
        .route("/hocuspocus", get(ws::hocuspocus))
        .route("/hocuspocus/", get(ws::hocuspocus))
        .route("/api/docs/{doc}", get(docs::read))
        .route(
            "/api/docs/{doc}/versions",
            get(history::list).post(history::create),
        )
        .route("/api/docs/{doc}/restore", post(history::restore))
        .route(
            "/api/docs/{doc}/updates",
            post(docs::write).layer(axum::extract::DefaultBodyLimit::max(body_limit)),
        )
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(
                    // The path only: query strings carry tokens.
                    |req: &axum::http::Request<_>| {
                        tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
                    },
                )
                // A 503 from /readyz is an answer, not a server failure.
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        )
        .with_state(state)
}
