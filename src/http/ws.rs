//! The WebSocket endpoints: `GET /ws/{doc}` (y-websocket, one document) and
//! `GET /hocuspocus` (Hocuspocus, many). The checks made before a socket
//! exists (name, origin, per-address cap, draining) answer with an HTTP
//! status; auth failures on `/ws/{doc}` are reported after the upgrade, as
//! close codes 4401/4403, which `WebsocketProvider` treats as final (an HTTP
//! status would make it retry for ever). Hocuspocus admits each document on
//! its own auth message, after the upgrade.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use futures::FutureExt;

use super::error::ApiError;
use super::{AppState, ConnectionSlot};
use crate::auth;
use crate::doc::name;
use crate::metrics as m;
use crate::protocol::{hocuspocus, ywebsocket};
use crate::transport::{self, Upgrade};

pub async fn ywebsocket(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let admitted = draining(&state).and_then(|()| {
        let raw = uri.path().strip_prefix("/ws/").unwrap_or_default();
        let doc =
            name::decode(raw).map_err(|e| ("bad_name", ApiError::BadRequest(e.to_string())))?;
        Ok((admit(&state, peer, &headers)?, doc))
    });
    let (slot, doc) = match admitted {
        Ok(admitted) => admitted,
        Err(refused) => return refuse(&uri, refused),
    };
    let token = query
        .get("token")
        .map(String::as_str)
        .or_else(|| super::docs::bearer(&headers));
    let grant = auth::admit(state.verifier.as_deref(), token, &doc);
    let (ctx, rooms) = (state.transport.clone(), state.rooms.clone());
    let (response, socket) = upgrade.accept(move |io| {
        transport::run(io, ctx, move |outbox| {
            ywebsocket::open(rooms, doc, grant, outbox)
        })
    });
    // A task of its own for the socket's whole life, tracked so shutdown can
    // wait for it; the per-address slot is held until it ends.
    state.connections.spawn(socket.map(move |()| drop(slot)));
    response
}

pub async fn hocuspocus(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let slot = match draining(&state).and_then(|()| admit(&state, peer, &headers)) {
        Ok(slot) => slot,
        Err(refused) => return refuse(&uri, refused),
    };
    let (ctx, rooms) = (state.transport.clone(), state.rooms.clone());
    let (verifier, timeout) = (state.verifier.clone(), state.limits.auth_timeout);
    let (response, socket) = upgrade.accept(move |io| {
        transport::run(io, ctx, move |outbox| async move {
            Ok(hocuspocus::open(rooms, verifier, timeout, outbox))
        })
    });
    state.connections.spawn(socket.map(move |()| drop(slot)));
    response
}

type Refused = (&'static str, ApiError);

fn draining(state: &AppState) -> Result<(), Refused> {
    match state.health.is_draining() {
        true => Err(("draining", ApiError::Draining)),
        false => Ok(()),
    }
}

/// The checks every socket passes before its upgrade: its origin, and a slot
/// under its address's cap.
fn admit(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<ConnectionSlot, Refused> {
    if let (Some(allowed), Some(origin)) = (&state.allowed_origins, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or_default();
        if !allowed.iter().any(|a| a == origin) {
            return Err(("origin", ApiError::OriginNotAllowed));
        }
    }
    let addr = state.client_addrs.resolve(peer, headers);
    state.client_addrs.acquire(addr).ok_or_else(|| {
        (
            "per_ip_limit",
            ApiError::TooManyConnections(format!("too many connections from {addr}")),
        )
    })
}

fn refuse(uri: &Uri, (reason, error): Refused) -> Response {
    metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason).increment(1);
    // The path only: query strings carry tokens.
    tracing::info!(path = %uri.path(), %error, "websocket refused before upgrade");
    error.into_response()
}
