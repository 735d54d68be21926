//! `GET /ws/{doc}`: the checks made before a socket exists (name, origin,
//! per-address cap, draining), then the upgrade. Auth failures are reported
//! after the upgrade as close codes 4401/4403, which `WebsocketProvider`
//! treats as final; an HTTP status would make it retry forever.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use futures::future::Either;
use futures::FutureExt;

use super::error::ApiError;
use super::AppState;
use crate::auth::{Access, AuthError};
use crate::connection::{self, Session};
use crate::metrics as m;

pub async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    match admit(&state, peer, &uri, &query, &headers) {
        Ok((doc, slot, auth)) => {
            let limit = state.limits.max_message_bytes;
            // The read buffer is allocated per socket for its whole life, so it
            // dominated an idle connection's memory (128 KiB by default, 4 KiB
            // was still 40 % of it). tungstenite reserves a frame's whole length
            // once its header is in, so a large frame is still read in big
            // chunks; this only caps how many small frames one read takes in
            // (a typical update or awareness frame fits).
            ws.read_buffer_size(128)
                .write_buffer_size(0)
                .max_message_size(limit)
                .max_frame_size(limit)
                .on_upgrade(move |socket| {
                    // The connection's future is built here rather than inside
                    // an async block, so the socket and session live in it
                    // once: this task lasts as long as the socket.
                    let served = match auth {
                        Ok(session) => Either::Left(connection::run(
                            socket,
                            state.rooms.clone(),
                            state.limits.clone(),
                            state.shutdown.clone(),
                            session,
                        )),
                        Err(error) => Either::Right(refuse(socket, doc, error)),
                    };
                    // A task of its own rather than awaited in axum's: that
                    // task keeps everything it and this closure captured for
                    // as long as the socket lives. A combinator, not an async
                    // block, which would keep a second slot for the future.
                    state.connections.spawn(served.map(move |()| drop(slot)));
                    std::future::ready(())
                })
        }
        Err((reason, error)) => {
            metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason).increment(1);
            tracing::info!(path = %uri.path(), %error, "websocket refused before upgrade");
            error.into_response()
        }
    }
}

type Admitted = (String, super::ConnectionSlot, Result<Session, AuthError>);

fn admit(
    state: &AppState,
    peer: SocketAddr,
    uri: &Uri,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Admitted, (&'static str, ApiError)> {
    if state.health.is_draining() {
        return Err(("draining", ApiError::Draining));
    }
    let raw = uri.path().strip_prefix("/ws/").unwrap_or_default();
    let doc = super::docs::decode_name(raw).map_err(|e| ("bad_name", e))?;
    if let (Some(allowed), Some(origin)) = (&state.allowed_origins, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or_default();
        if !allowed.iter().any(|a| a == origin) {
            return Err(("origin", ApiError::OriginNotAllowed));
        }
    }
    let addr = state.client_addrs.resolve(peer, headers);
    let slot = state.client_addrs.acquire(addr).ok_or_else(|| {
        (
            "per_ip_limit",
            ApiError::TooManyConnections(format!("too many connections from {addr}")),
        )
    })?;
    let token = query
        .get("token")
        .map(String::as_str)
        .or_else(|| super::docs::bearer(headers));
    let auth = match &state.verifier {
        None => Ok(Session {
            doc: doc.clone(),
            can_write: true,
            user: None,
            expires_at: None,
        }),
        Some(verifier) => verifier
            .authorize(token, &doc)
            .map(|(claims, access)| Session {
                doc: doc.clone(),
                can_write: access == Access::Write,
                expires_at: Some(claims.expires_at()),
                user: claims.sub,
            }),
    };
    Ok((doc, slot, auth))
}

async fn refuse(mut socket: WebSocket, doc: String, error: AuthError) {
    let (code, reason) = match error {
        AuthError::Forbidden => (4403, "forbidden"),
        AuthError::Missing | AuthError::Invalid(_) => (4401, "unauthorized"),
    };
    metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason).increment(1);
    tracing::info!(%doc, code, %error, "websocket refused");
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}
