//! The document API for backend services: read a document (or a diff) and
//! write an update, with the same names and tokens as the WebSocket.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use yrs::StateVector;

use super::error::ApiError;
use super::AppState;
use crate::auth::{self, Access, Grant};
use crate::doc::name;
use crate::protocol;

#[derive(Deserialize)]
pub struct ReadQuery {
    since: Option<String>,
}

pub async fn read(
    State(state): State<AppState>,
    Path(doc): Path<String>,
    Query(query): Query<ReadQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    name::validate(&doc)?;
    authorize(&state, &headers, &doc, Access::Read)?;
    let since = match query.since {
        Some(encoded) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .map_err(|e| ApiError::BadRequest(format!("since is not base64url: {e}")))?;
            protocol::decode_state_vector(&raw).map_err(|e| ApiError::BadRequest(e.to_string()))?
        }
        None => StateVector::default(),
    };
    let snapshot = state.rooms.read(&doc, since).await?;
    if !snapshot.exists {
        return Err(ApiError::NotFound);
    }
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        snapshot.update,
    )
        .into_response())
}

pub async fn write(
    State(state): State<AppState>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    name::validate(&doc)?;
    let grant = authorize(&state, &headers, &doc, Access::Write)?;
    if state.health.is_draining() {
        return Err(ApiError::Draining);
    }
    let update = protocol::decode_update(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    state.rooms.write(&doc, body, update, grant.user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The bearer token's grant on `doc`, when it is at least `need`.
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    doc: &str,
    need: Access,
) -> Result<Grant, ApiError> {
    let grant = auth::admit(state.verifier.as_deref(), bearer(headers), doc)?;
    if grant.access < need {
        return Err(auth::AuthError::Forbidden.into());
    }
    Ok(grant)
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}
