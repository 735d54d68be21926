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
use crate::auth::Access;
use crate::protocol::ywebsocket;

const MAX_NAME_BYTES: usize = 512;

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
    validate_name(&doc)?;
    authorize(&state, &headers, &doc, Access::Read)?;
    let since = match query.since {
        Some(encoded) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .map_err(|e| ApiError::BadRequest(format!("since is not base64url: {e}")))?;
            ywebsocket::decode_state_vector(&raw)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?
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
    validate_name(&doc)?;
    authorize(&state, &headers, &doc, Access::Write)?;
    if state.health.is_draining() {
        return Err(ApiError::Draining);
    }
    let update =
        ywebsocket::decode_update(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    state.rooms.write(&doc, body, update).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    doc: &str,
    need: Access,
) -> Result<(), ApiError> {
    let Some(verifier) = &state.verifier else {
        return Ok(());
    };
    let (_, access) = verifier.authorize(bearer(headers), doc)?;
    if access < need {
        return Err(crate::auth::AuthError::Forbidden.into());
    }
    Ok(())
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

/// Percent-decodes and validates a document name taken from a raw path.
pub fn decode_name(raw: &str) -> Result<String, ApiError> {
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::BadRequest("document name is not UTF-8".into()))?
        .into_owned();
    validate_name(&name)?;
    Ok(name)
}

/// 1–512 bytes of UTF-8 without control characters.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ApiError::BadRequest(format!(
            "document name must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "document name must not contain control characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(decode_name("team-a/notes").unwrap(), "team-a/notes");
        assert_eq!(decode_name("team-a%2Fnotes").unwrap(), "team-a/notes");
        assert_eq!(decode_name("caf%C3%A9").unwrap(), "café");
        assert!(decode_name("").is_err());
        assert!(decode_name("a%00b").is_err());
        assert!(decode_name("%FF").is_err());
        assert!(decode_name(&"x".repeat(513)).is_err());
        assert!(decode_name(&"x".repeat(512)).is_ok());
    }
}
