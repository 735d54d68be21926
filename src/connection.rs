//! One client socket, after the upgrade: reads frames, enforces the
//! per-connection limits, hands decoded messages to its room, and writes what
//! the room queues for it. Every way a connection ends is a close code.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use governor::{Quota, RateLimiter};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::metrics as m;
use crate::protocol::{ywebsocket, Inbound};
use crate::room::{Peer, RoomError, Rooms};

pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTARTING: u16 = 1012;
    pub const TRY_AGAIN: u16 = 1013;
    pub const UNAUTHORIZED: u16 = 4401;
}

/// The frames queued for one socket, bounded in count and in bytes, and the
/// request to close it (the room closes slow consumers and clients that break
/// its rules through it; the first request wins). Frames are shared between
/// recipients, but a slow reader sitting on many large ones would keep them
/// alive without bound.
///
/// A plain queue rather than a channel: a tokio channel allocates a block of
/// slots up front, about 1 KiB per socket even while it is idle, and idle
/// sockets are most of a server's sockets. This one holds no memory when empty.
pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    ready: Notify,
    max_frames: usize,
    max_bytes: usize,
}

struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    close: Option<(u16, String)>,
    /// Live [`Outbox`] handles; at zero the room has dropped the socket.
    senders: usize,
    /// Whether the connection still reads the queue.
    receiving: bool,
}

/// Why a frame could not be queued.
pub enum Overflow {
    /// A slow consumer: it is to be closed with 1013.
    Full,
    /// The connection has already ended.
    Gone,
}

impl Outbox {
    fn new(max_frames: usize, max_bytes: usize) -> (Outbox, Queued) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                close: None,
                senders: 1,
                receiving: true,
            }),
            ready: Notify::new(),
            max_frames: max_frames.max(1),
            max_bytes,
        });
        let queued = Queued {
            shared: shared.clone(),
        };
        (Outbox { shared }, queued)
    }

    pub fn push(&self, frame: Bytes) -> Result<(), Overflow> {
        let mut state = self.shared.state.lock().expect("outbox lock");
        if !state.receiving {
            return Err(Overflow::Gone);
        }
        // One frame always fits an empty queue: a large document's first
        // step 2 can exceed the budget on its own.
        let over_bytes = state.bytes > 0 && state.bytes + frame.len() > self.shared.max_bytes;
        if over_bytes || state.frames.len() >= self.shared.max_frames {
            return Err(Overflow::Full);
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Asks the connection to close with `code`, ahead of anything queued.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let mut state = self.shared.state.lock().expect("outbox lock");
        if state.close.is_none() {
            state.close = Some((code, reason.into()));
            drop(state);
            self.shared.ready.notify_one();
        }
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.state.lock().expect("outbox lock").senders += 1;
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().expect("outbox lock");
        state.senders -= 1;
        if state.senders == 0 {
            drop(state);
            self.shared.ready.notify_one();
        }
    }
}

/// The connection's end of its [`Outbox`].
struct Queued {
    shared: Arc<Shared>,
}

/// What the room has for the connection next.
enum Next {
    Close(u16, String),
    Frame(Bytes),
    /// The room dropped every handle to the queue without asking to close.
    Gone,
}

impl Queued {
    /// A close request first, then frames in order. Cancel-safe: a frame is
    /// taken only in the poll that returns it.
    async fn next(&mut self) -> Next {
        loop {
            {
                let mut state = self.shared.state.lock().expect("outbox lock");
                if let Some((code, reason)) = state.close.clone() {
                    return Next::Close(code, reason);
                }
                if let Some(frame) = state.frames.pop_front() {
                    state.bytes -= frame.len();
                    // An idle socket keeps no slots: most sockets are idle,
                    // and a burst reallocates them cheaply.
                    if state.frames.is_empty() {
                        state.frames = VecDeque::new();
                    }
                    return Next::Frame(frame);
                }
                if state.senders == 0 {
                    return Next::Gone;
                }
            }
            // A push between the check and this wait leaves a permit behind.
            self.shared.ready.notified().await;
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().expect("outbox lock");
        state.receiving = false;
        state.frames = VecDeque::new();
        state.bytes = 0;
    }
}

/// Who is on the other end, as established before the upgrade.
pub struct Session {
    pub doc: String,
    pub can_write: bool,
    pub user: Option<String>,
    /// When the token expires; the connection is closed with 4401 then.
    pub expires_at: Option<SystemTime>,
}

/// How the loop ended: a code to send, or the peer already gone.
enum End {
    Close(u16, String),
    PeerGone(&'static str),
}

/// Serves one socket until it ends. Not an `async fn`: an async fn moves its
/// arguments into locals and keeps their slots too, which made every idle
/// connection's task carry the socket twice; an `async move` block uses what
/// it captured in place.
#[allow(clippy::manual_async_fn)]
pub fn run(
    mut socket: WebSocket,
    rooms: Rooms,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    session: Session,
) -> impl std::future::Future<Output = ()> {
    async move {
        let started = Instant::now();
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        let (outbox, mut queued) = Outbox::new(limits.outbox_capacity, limits.outbox_bytes);
        let peer = Peer {
            outbox,
            can_write: session.can_write,
        };
        let end = match rooms.join(&session.doc, peer).await {
            Ok(member) => {
                tracing::info!(
                    doc = %session.doc,
                    user = session.user.as_deref().unwrap_or("-"),
                    write = session.can_write,
                    "connection opened"
                );
                let end = serve(
                    &mut socket,
                    &member,
                    &mut queued,
                    &limits,
                    &shutdown,
                    &session,
                )
                .await;
                if let End::Close(code, reason) = &end {
                    // On a graceful shutdown, what the client sent before it saw our
                    // close is still accepted, so an orderly restart loses nothing.
                    let accept = (*code == close::RESTARTING).then_some((&member, &session));
                    // Boxed, as below: these run once, at the end, and would
                    // otherwise size every idle socket's task.
                    Box::pin(close_socket(&mut socket, *code, reason, accept)).await;
                }
                Box::pin(member.leave()).await;
                end
            }
            Err(error @ (RoomError::Unavailable(_) | RoomError::Busy)) => {
                let end = End::Close(close::TRY_AGAIN, error.to_string());
                Box::pin(close_socket(
                    &mut socket,
                    close::TRY_AGAIN,
                    &error.to_string(),
                    None,
                ))
                .await;
                end
            }
            Err(error) => {
                Box::pin(close_socket(
                    &mut socket,
                    close::INTERNAL,
                    &error.to_string(),
                    None,
                ))
                .await;
                End::Close(close::INTERNAL, error.to_string())
            }
        };
        let (code, reason) = match &end {
            End::Close(code, reason) => (Some(*code), reason.as_str()),
            End::PeerGone(why) => (None, *why),
        };
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
        let code_label = code.map_or_else(|| "none".to_string(), |c| c.to_string());
        metrics::counter!(m::CONNECTIONS_CLOSED, "code" => code_label).increment(1);
        let duration = started.elapsed();
        metrics::histogram!(m::CONNECTION_SECONDS).record(duration.as_secs_f64());
        tracing::info!(
            doc = %session.doc,
            user = session.user.as_deref().unwrap_or("-"),
            duration_ms = duration.as_millis() as u64,
            code = code.unwrap_or(0),
            reason,
            "connection closed"
        );
    }
}

async fn serve(
    socket: &mut WebSocket,
    member: &crate::room::Member,
    queued: &mut Queued,
    limits: &Limits,
    shutdown: &CancellationToken,
    session: &Session,
) -> End {
    let quota =
        Quota::per_second(NonZeroU32::new(limits.rate_limit_per_second.max(1)).expect("nonzero"))
            .allow_burst(NonZeroU32::new(limits.rate_limit_burst.max(1)).expect("nonzero"));
    let limiter = RateLimiter::direct(quota);
    let mut ping =
        tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    let mut last_heard = Instant::now();
    // Boxed, and only when there is a token: an idle task would otherwise
    // carry a timer it never uses.
    let mut expiry = session.expires_at.map(|at| {
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(left))
    });

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                return End::Close(close::RESTARTING, "server shutting down".into());
            }
            _ = expired(&mut expiry) => {
                return End::Close(close::UNAUTHORIZED, "token expired".into());
            }
            next = queued.next() => {
                let frame = match next {
                    Next::Close(code, reason) => return End::Close(code, reason),
                    Next::Frame(frame) => frame,
                    // Gone without a close request: the room is gone (a reload
                    // after a broken document, or a bug), so reconnect.
                    Next::Gone => {
                        return End::Close(close::RESTARTING, "document unloaded".into());
                    }
                };
                let kind = ywebsocket::message_type(&frame);
                if let Err(end) = write(socket, Message::Binary(frame), limits).await {
                    return end;
                }
                metrics::counter!(m::MESSAGES_SENT, "type" => kind).increment(1);
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= limits.pong_timeout {
                    return End::Close(close::GOING_AWAY, "no pong".into());
                }
                if let Err(end) = write(socket, Message::Ping(Bytes::new()), limits).await {
                    return end;
                }
            }
            frame = socket.recv() => {
                let frame = match frame {
                    None => return End::PeerGone("peer closed"),
                    Some(Err(error)) => return read_error(error),
                    Some(Ok(frame)) => frame,
                };
                last_heard = Instant::now();
                if limiter.check().is_err() {
                    return End::Close(close::POLICY, "rate limit".into());
                }
                match frame {
                    Message::Binary(data) => {
                        // Boxed: its future is large and only alive while a frame is
                        // handed over, so it should not sit in every idle task.
                        if let Some(end) = Box::pin(handle_frame(&data, member, session)).await {
                            return end;
                        }
                    }
                    Message::Text(_) => {
                        return End::Close(close::PROTOCOL_ERROR, "text frames are not part of the protocol".into());
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => return End::PeerGone("peer closed"),
                }
            }
        }
    }
}

/// Writes one message. A peer that stops reading blocks the write once the
/// socket's buffers are full, and the loop with it (a close the room asks for
/// meanwhile is sent after the write); after `pong_timeout` without progress
/// the peer is dropped. The future is boxed: with its timer it was the largest
/// thing in the connection's task, which every idle socket carries.
async fn write(socket: &mut WebSocket, msg: Message, limits: &Limits) -> Result<(), End> {
    match Box::pin(tokio::time::timeout(limits.pong_timeout, socket.send(msg))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::PeerGone("write failed")),
        Err(_) => Err(End::PeerGone("write timed out")),
    }
}

async fn expired(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(timer) => timer.await,
        None => std::future::pending().await,
    }
}

async fn handle_frame(data: &[u8], member: &crate::room::Member, session: &Session) -> Option<End> {
    let kind = ywebsocket::message_type(data);
    metrics::counter!(m::MESSAGES_RECEIVED, "type" => kind).increment(1);
    metrics::histogram!(m::MESSAGE_BYTES, "direction" => "in").record(data.len() as f64);
    let msg = match ywebsocket::decode(data) {
        Ok(msg) => msg,
        Err(error) => {
            tracing::info!(doc = %session.doc, %error, "refused undecodable message");
            return Some(End::Close(close::PROTOCOL_ERROR, error.to_string()));
        }
    };
    if matches!(msg, Inbound::Update { .. }) && !session.can_write {
        // Read access: the update is dropped, the connection stays.
        return None;
    }
    if !member.send(msg).await {
        return Some(End::Close(close::RESTARTING, "document unloaded".into()));
    }
    None
}

fn read_error(error: axum::Error) -> End {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) if matches!(*e, tungstenite::Error::Capacity(_)) => {
            End::Close(close::TOO_BIG, "message too big".into())
        }
        Ok(e) if matches!(*e, tungstenite::Error::Protocol(_)) => End::Close(
            close::PROTOCOL_ERROR,
            format!("websocket protocol error: {e}"),
        ),
        _ => End::PeerGone("read failed"),
    }
}

/// Sends the close frame and waits (at most a second) for the peer's reply,
/// so the code arrives even while the peer is still sending. Frames read
/// meanwhile are dropped, unless `accept` names the room to hand them to.
async fn close_socket(
    socket: &mut WebSocket,
    code: u16,
    reason: &str,
    accept: Option<(&crate::room::Member, &Session)>,
) {
    // Close reasons are limited to 123 bytes by RFC 6455.
    let mut reason = reason.to_string();
    while reason.len() > 123 {
        reason.pop();
    }
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    // A peer that is not reading would block this send for ever.
    if !matches!(
        tokio::time::timeout_at(deadline, socket.send(Message::Close(Some(frame)))).await,
        Ok(Ok(()))
    ) {
        return;
    }
    loop {
        match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(Message::Binary(data)))) => {
                if let Some((member, session)) = accept {
                    let _ = handle_frame(&data, member, session).await;
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Err(_) => return,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) => {
                // The stream is unreadable (an oversized frame still arriving):
                // hold the socket open until the deadline so the peer can read
                // our close frame before the connection is reset.
                tokio::time::sleep_until(deadline).await;
                return;
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one (a disabled `select!` timer).
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
