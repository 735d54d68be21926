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
    /// `json` for the content as JSON; otherwise a Yjs update.
    format: Option<String>,
    /// A version id: the document as it was then.
    version: Option<String>,
}

pub async fn read(
    State(state): State<AppState>,
    Path(doc): Path<String>,
    Query(query): Query<ReadQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    name::validate(&doc)?;
    authorize(&state, &headers, &doc, Access::Read)?;
    let json = match query.format.as_deref() {
        None | Some("binary") => false,
        Some("json") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "format must be json or binary, not {other:?}"
            )))
        }
    };
    if json || query.version.is_some() {
        if query.since.is_some() {
            return Err(ApiError::BadRequest(
                "since combines with neither format=json nor version".into(),
            ));
        }
        let update = match &query.version {
            Some(id) => state.history.state(&doc, id).await?,
            None => whole(&state, &doc).await?,
        };
        return Ok(if json {
            axum::Json(to_json(&update)?).into_response()
        } else {
            ([(header::CONTENT_TYPE, "application/octet-stream")], update).into_response()
        });
    }
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

/// The document's whole state; 404 when nothing was ever stored.
async fn whole(state: &AppState, doc: &str) -> Result<Vec<u8>, ApiError> {
    let snapshot = state.rooms.read(doc, StateVector::default()).await?;
    if !snapshot.exists {
        return Err(ApiError::NotFound);
    }
    Ok(snapshot.update.to_vec())
}

/// A whole state read as JSON (`doc/json.rs`).
fn to_json(update: &[u8]) -> Result<serde_json::Value, ApiError> {
    let unreadable = || ApiError::Unavailable("the stored document cannot be read".into());
    let doc = crate::doc::from_updates(std::iter::once(update)).map_err(|_| unreadable())?;
    let json = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::doc::json::to_json(&yrs::Transact::transact(&doc))
    }));
    crate::doc::guard::discard(doc);
    json.map_err(|_| unreadable())
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
pub(super) fn authorize(
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
