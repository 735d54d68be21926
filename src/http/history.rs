//! The history API: list and record versions, restore one. Reading a
//! version is the document read with `?version=` (`docs.rs`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::docs::authorize;
use super::error::ApiError;
use super::AppState;
use crate::auth::Access;
use crate::doc::name;
use crate::history::Version;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewVersion {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Restore {
    version: String,
}

pub async fn list(
    State(state): State<AppState>,
    Path(doc): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    name::validate(&doc)?;
    authorize(&state, &headers, &doc, Access::Read)?;
    let versions = state.history.list(&doc).await?;
    Ok(Json(serde_json::json!({ "versions": versions })))
}

pub async fn create(
    State(state): State<AppState>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Version>), ApiError> {
    name::validate(&doc)?;
    authorize(&state, &headers, &doc, Access::Write)?;
    // An empty body is a version without a name.
    let request: NewVersion = if body.iter().all(u8::is_ascii_whitespace) {
        NewVersion::default()
    } else {
        parse(&body)?
    };
    if state.health.is_draining() {
        return Err(ApiError::Draining);
    }
    let version = state.history.create(&doc, request.name).await?;
    Ok((StatusCode::CREATED, Json(version)))
}

pub async fn restore(
    State(state): State<AppState>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Version>, ApiError> {
    name::validate(&doc)?;
    let grant = authorize(&state, &headers, &doc, Access::Write)?;
    let request: Restore = parse(&body)?;
    if state.health.is_draining() {
        return Err(ApiError::Draining);
    }
    let user: Option<Arc<str>> = grant.user;
    let version = state.history.restore(&doc, &request.version, user).await?;
    Ok(Json(version))
}

/// A JSON body, or 400 saying what is wrong with it.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not the JSON expected: {e}")))
}
