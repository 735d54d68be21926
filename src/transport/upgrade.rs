//! The HTTP/1.1 upgrade to a WebSocket, done here rather than by axum's
//! extractor so that the socket owns the raw connection: rooms write frames
//! to it directly (see `outbox`), and after refusing an oversized message the
//! server must read and discard the rest of it, or the kernel answers the
//! unread bytes with a reset that destroys the close frame on its way.

use std::future::Future;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::future::OptionFuture;
use futures::FutureExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::outbox::Io;

/// A request that asks for a WebSocket.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request that should have asked for a WebSocket did not.
pub struct NotAnUpgrade(&'static str);

impl IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, self.0).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(NotAnUpgrade("a WebSocket upgrade is a GET"));
        }
        let headers = &parts.headers;
        if !token_in(headers, header::CONNECTION, "upgrade")
            || !token_in(headers, header::UPGRADE, "websocket")
        {
            return Err(NotAnUpgrade("this path upgrades to a WebSocket"));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(NotAnUpgrade("Sec-WebSocket-Version must be 13"));
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(NotAnUpgrade("Sec-WebSocket-Key is missing"))?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(NotAnUpgrade("this connection cannot be upgraded"))?;
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 and hands the socket, once upgraded, to `serve`. The
    /// returned future is the socket's whole life: the caller spawns it.
    pub fn accept<F, Fut>(self, serve: F) -> (Response, impl Future<Output = ()> + Send)
    where
        F: FnOnce(Io) -> Fut + Send,
        Fut: Future<Output = ()> + Send,
    {
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(Body::empty())
            .expect("a valid response");
        // Chained rather than one async block, which would keep `serve`'s
        // captures in the task for the socket's whole life.
        let socket = self
            .on_upgrade
            .map(Result::ok)
            .then(|upgraded| OptionFuture::from(upgraded.map(|io| serve(TokioIo::new(io)))))
            .map(drop);
        (response, socket)
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn token_in(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .unwrap_or_default()
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}
