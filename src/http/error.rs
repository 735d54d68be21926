//! The one error type of the HTTP API, mapped to a status and a JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::AuthError;
use crate::doc::name::NameError;
use crate::history::HistoryError;
use crate::room::RoomError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no such document")]
    NotFound,
    #[error("{0}")]
    TooManyConnections(String),
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("server is shutting down")]
    Draining,
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error("{0}")]
    Unavailable(String),
    #[error("no such version")]
    NoVersion,
}

impl From<HistoryError> for ApiError {
    fn from(error: HistoryError) -> Self {
        match error {
            HistoryError::NoDocument => ApiError::NotFound,
            HistoryError::NoVersion => ApiError::NoVersion,
            HistoryError::Room(e) => ApiError::Room(e),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl From<NameError> for ApiError {
    fn from(error: NameError) -> Self {
        ApiError::BadRequest(error.to_string())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Auth(AuthError::Forbidden) | ApiError::OriginNotAllowed => {
                StatusCode::FORBIDDEN
            }
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound | ApiError::NoVersion => StatusCode::NOT_FOUND,
            ApiError::TooManyConnections(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Room(RoomError::BadUpdate(_)) => StatusCode::BAD_REQUEST,
            ApiError::Room(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        (self.status(), body).into_response()
    }
}
