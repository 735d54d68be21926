//! The Hocuspocus protocol, `GET /hocuspocus`, as `@hocuspocus/provider` (v3
//! and v4) speaks it: many documents over one socket, every frame addressed
//! to one. A frame is `varString address | varUint type | payload`; the
//! address is the document's name, or `name\0session` for v4 providers that
//! share one document name on a socket. Types: 0 sync, 1 awareness, 2 auth
//! (0 token, 1 permission-denied, 2 authenticated), 3 query-awareness, 4 sync
//! reply, 5 stateless, 7 close (one document), 8 sync status; and the bare
//! one-byte ping (9) and pong (10), which only v4 providers understand.
//!
//! Each document is admitted on its own auth message, with its own token: a
//! refused document gets permission-denied and the socket's other documents
//! go on. Frames that come before a document's auth wait, within bounds;
//! past them, or past the deadline with no document admitted, the socket is
//! closed (4205, 4408), as Hocuspocus does.
//!
//! Sync status 1 is sent once the update is durably stored (the room's ack),
//! not when it is applied: a provider that reports no unsynced changes has
//! nothing to lose if the server dies right then.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;

use super::addresses::ByAddress;
use super::ywebsocket::deadline;
use super::{decode_awareness, decode_sync, kind_of, payload_len, write_shared, DecodeError};
use crate::auth::{self, Verifier};
use crate::doc::name;
use crate::metrics::{self as m, MessageKind};
use crate::room::{ConnId, Framer, Inbound, Leave, Member, Outbound, Peer, RoomError, Rooms};
use crate::transport::{Close, Outbox, Session};

const SYNC: u64 = 0;
const AWARENESS: u64 = 1;
const AUTH: u64 = 2;
const QUERY_AWARENESS: u64 = 3;
const SYNC_REPLY: u64 = 4;
const STATELESS: u64 = 5;
const CLOSE: u64 = 7;
const SYNC_STATUS: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

const AUTH_TOKEN: u64 = 0;
const AUTH_PERMISSION_DENIED: u8 = 1;
const AUTH_AUTHENTICATED: u8 = 2;

/// Bounds on what waits for authentication on one socket (Hocuspocus's own).
const MAX_PENDING_BYTES: usize = 5 * 1024 * 1024;
const MAX_PENDING_MESSAGES: usize = 1000;
const MAX_PENDING_DOCUMENTS: usize = 100;
/// Documents one socket may name at all (open, waiting, refused).
const MAX_DOCUMENTS: usize = 1000;

/// Frames for one address, which every frame of it starts with. The address
/// is the one the socket's document list holds, not a copy.
struct HFramer {
    address: Arc<str>,
}

impl HFramer {
    /// An auth answer for this address: authenticated with a scope, or denied
    /// with a reason.
    fn auth(&self, kind: u8, text: &str) -> Bytes {
        let mut out = Vec::new();
        out.write_string(&self.address);
        out.extend_from_slice(&[AUTH as u8, kind]);
        out.write_string(text);
        out.into()
    }
}

impl Framer for HFramer {
    fn frame(&self, msg: Outbound<'_>) -> Option<Bytes> {
        let mut out = Vec::with_capacity(self.address.len() + payload_len(msg) + 12);
        out.write_string(&self.address);
        if !write_shared(&mut out, msg) {
            match msg {
                Outbound::Stateless(payload) => {
                    out.push(STATELESS as u8);
                    out.write_string(payload);
                }
                Outbound::SyncStatus(stored) => out.extend_from_slice(&[SYNC_STATUS, stored as u8]),
                _ => return None,
            }
        }
        Some(out.into())
    }

    /// Never empty, as y-websocket's is: a document name is never empty.
    fn key(&self) -> &[u8] {
        self.address.as_bytes()
    }
}

enum DocState {
    /// Frames that came before the auth message.
    Pending(Vec<Bytes>),
    Open(OpenDoc),
    /// Refused: frames are dropped until another auth message.
    Denied,
}

/// An admitted document; its name is in its address.
struct OpenDoc {
    member: Member,
    /// The token's `sub`, for the log.
    user: Option<Arc<str>>,
    expires: Option<Instant>,
}

/// One socket, many documents.
pub struct HSession {
    rooms: Rooms,
    verifier: Option<Arc<Verifier>>,
    outbox: Outbox,
    docs: ByAddress<DocState>,
    pending_bytes: usize,
    pending_messages: usize,
    /// Until a first document is admitted.
    auth_deadline: Option<Instant>,
    /// A provider announced version 4 or later: it answers pings.
    pings: bool,
}

pub fn open(
    rooms: Rooms,
    verifier: Option<Arc<Verifier>>,
    auth_timeout: Duration,
    outbox: Outbox,
) -> HSession {
    HSession {
        rooms,
        verifier,
        outbox,
        docs: ByAddress::new(),
        pending_bytes: 0,
        pending_messages: 0,
        auth_deadline: Some(Instant::now() + auth_timeout),
        pings: false,
    }
}

/// The address and type of a frame, and the cursor at its payload.
fn header(frame: &[u8]) -> Result<(String, u64, Cursor<'_>), DecodeError> {
    let mut cursor = Cursor::new(frame);
    let address = cursor.read_string()?.to_string();
    let kind: u64 = cursor.read_var()?;
    Ok((address, kind, cursor))
}

/// The document an address names: what comes before a v4 session suffix.
fn document_of(address: &str) -> &str {
    address.split_once('\0').map_or(address, |(doc, _)| doc)
}

impl HSession {
    fn push(&self, frame: Bytes) -> Result<(), Close> {
        self.outbox.push(frame).map_err(|_| Close::SlowConsumer)
    }

    /// A frame for a document that is not open: an auth message opens it,
    /// anything else waits for one, within bounds.
    async fn not_open(
        &mut self,
        address: &str,
        kind: u64,
        mut cursor: Cursor<'_>,
        frame: Bytes,
    ) -> Result<(), Close> {
        if kind == AUTH {
            let sub: u64 = cursor.read_var().map_err(protocol)?;
            if sub != AUTH_TOKEN {
                return Ok(());
            }
            let token = cursor.read_string().map_err(protocol)?.to_string();
            // v4 providers add their version; v3 ones send nothing more.
            let version = cursor.read_string().ok().map(str::to_string);
            return self.authenticate(address, &token, version.as_deref()).await;
        }
        match self.docs.get_mut(address) {
            Some(DocState::Denied) => return Ok(()),
            Some(DocState::Open(_)) => unreachable!("open documents are handled first"),
            Some(DocState::Pending(_)) => {}
            None => {
                let pending = self
                    .docs
                    .values()
                    .filter(|d| matches!(d, DocState::Pending(_)))
                    .count();
                if pending >= MAX_PENDING_DOCUMENTS || self.docs.len() >= MAX_DOCUMENTS {
                    tracing::info!(
                        "hocuspocus socket named too many documents before authenticating them"
                    );
                    return Err(Close::PendingBounds);
                }
                self.docs
                    .insert(address.into(), DocState::Pending(Vec::new()));
            }
        }
        if self.pending_bytes + frame.len() > MAX_PENDING_BYTES
            || self.pending_messages + 1 > MAX_PENDING_MESSAGES
        {
            tracing::info!("hocuspocus frames waiting for authentication went past their bounds");
            return Err(Close::PendingBounds);
        }
        self.pending_bytes += frame.len();
        self.pending_messages += 1;
        if let Some(DocState::Pending(queue)) = self.docs.get_mut(address) {
            queue.push(frame);
        }
        Ok(())
    }

    /// Admits a document on its token, or refuses it; either way the socket goes on.
    async fn authenticate(
        &mut self,
        address: &str,
        token: &str,
        version: Option<&str>,
    ) -> Result<(), Close> {
        let name = document_of(address);
        let grant = name::validate(name)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let token = (!token.is_empty()).then_some(token);
                auth::admit(self.verifier.as_deref(), token, name).map_err(|error| {
                    let reason = match error {
                        auth::AuthError::Forbidden => "forbidden",
                        _ => "unauthorized",
                    };
                    metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason).increment(1);
                    error.to_string()
                })
            });
        if self.docs.len() >= MAX_DOCUMENTS && !self.docs.contains_key(address) {
            return Err(Close::PendingBounds);
        }
        let previous = self.docs.insert(address.into(), DocState::Denied);
        let framer = Arc::new(HFramer {
            address: self.docs.key(address).expect("just inserted").clone(),
        });
        let queued = match previous {
            Some(DocState::Pending(queue)) => {
                self.pending_messages -= queue.len();
                self.pending_bytes -= queue.iter().map(Bytes::len).sum::<usize>();
                queue
            }
            Some(DocState::Open(open)) => {
                // A new token for an open document: admit it again.
                open.member.leave().await;
                Vec::new()
            }
            _ => Vec::new(),
        };
        let grant = match grant {
            Ok(grant) => grant,
            Err(reason) => {
                tracing::info!(doc = name, reason, "hocuspocus document refused");
                return self.push(framer.auth(AUTH_PERMISSION_DENIED, &reason));
            }
        };
        if version
            .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
            .is_some_and(|major| major >= 4)
        {
            self.pings = true;
        }
        let scope = if grant.can_write() {
            "read-write"
        } else {
            "readonly"
        };
        self.push(framer.auth(AUTH_AUTHENTICATED, scope))?;
        let peer = Peer {
            outbox: self.outbox.clone(),
            framer,
            can_write: grant.can_write(),
            user: grant.user.clone(),
        };
        let member = self
            .rooms
            .join(name, peer)
            .await
            .map_err(|error| match error {
                RoomError::Unavailable(why) => Close::TryAgain(why),
                RoomError::BadUpdate(why) => Close::Internal(why),
            })?;
        tracing::info!(
            doc = name,
            user = grant.user.as_deref().unwrap_or("-"),
            write = grant.can_write(),
            "hocuspocus document opened"
        );
        self.auth_deadline = None;
        let open = OpenDoc {
            member,
            expires: grant.expires_at.map(deadline),
            user: grant.user,
        };
        // In place: `insert` would copy the address only to find it there.
        *self.docs.get_mut(address).expect("inserted above") = DocState::Open(open);
        for frame in queued {
            let (_, kind, cursor) = header(&frame).map_err(protocol)?;
            self.open_frame(address, kind, cursor).await?;
        }
        Ok(())
    }

    /// A frame for an open document.
    async fn open_frame(
        &mut self,
        address: &str,
        kind: u64,
        mut cursor: Cursor<'_>,
    ) -> Result<(), Close> {
        let msg = match kind {
            SYNC | SYNC_REPLY => decode_sync(&mut cursor),
            AWARENESS => decode_awareness(&mut cursor),
            QUERY_AWARENESS => Ok(Inbound::QueryAwareness),
            STATELESS => cursor
                .read_string()
                .map(|s| Inbound::Stateless(s.to_string()))
                .map_err(DecodeError::from),
            CLOSE => {
                // The provider detached from this document.
                if let Some(DocState::Open(open)) = self.docs.remove(address) {
                    tracing::info!(doc = document_of(address), "hocuspocus document closed");
                    open.member.leave().await;
                }
                return Ok(());
            }
            other => Err(DecodeError::UnknownType(other)),
        };
        let msg = msg.map_err(|error| {
            tracing::info!(%error, "refused undecodable hocuspocus message");
            Close::Protocol(error.to_string())
        })?;
        let Some(DocState::Open(open)) = self.docs.get(address) else {
            return Ok(());
        };
        if !open.member.send(msg).await {
            return Err(Close::Reloading("document unloaded"));
        }
        Ok(())
    }
}

fn protocol(error: impl std::fmt::Display) -> Close {
    Close::Protocol(format!("malformed message: {error}"))
}

impl Session for HSession {
    async fn frame(&mut self, data: Bytes) -> Result<(), Close> {
        if data[..] == [PONG] || data[..] == [PING] {
            return Ok(());
        }
        let (address, kind, cursor) = header(&data).map_err(protocol)?;
        if kind == AUTH || !matches!(self.docs.get(address.as_str()), Some(DocState::Open(_))) {
            return self.not_open(&address, kind, cursor, data.clone()).await;
        }
        self.open_frame(&address, kind, cursor).await
    }

    async fn left(&mut self, _conn: ConnId, why: Leave) -> Result<(), Close> {
        // Every reason a room lets a peer go concerns the whole socket: its
        // queue is shared, and a bad update or a reload is the socket's to
        // resync from scratch.
        Err(why.into())
    }

    fn deadline(&self) -> Option<Instant> {
        let expiries = self.docs.values().filter_map(|d| match d {
            DocState::Open(open) => open.expires,
            _ => None,
        });
        self.auth_deadline.into_iter().chain(expiries).min()
    }

    async fn expire(&mut self) -> Result<(), Close> {
        let now = Instant::now();
        if self.auth_deadline.is_some_and(|at| at <= now) {
            tracing::info!("no hocuspocus document authenticated before the deadline");
            return Err(Close::AuthTimeout);
        }
        let expired: Vec<Arc<str>> = self
            .docs
            .iter()
            .filter(|(_, d)| matches!(d, DocState::Open(open) if open.expires.is_some_and(|at| at <= now)))
            .map(|(address, _)| address.clone())
            .collect();
        for address in expired {
            if let Some(DocState::Open(open)) = self.docs.insert(address.clone(), DocState::Denied)
            {
                tracing::info!(doc = document_of(&address), "hocuspocus token expired");
                let framer = HFramer { address };
                self.push(framer.auth(AUTH_PERMISSION_DENIED, "token expired"))?;
                open.member.leave().await;
            }
        }
        Ok(())
    }

    fn keepalive(&self) -> Option<Bytes> {
        self.pings.then(|| Bytes::from_static(&[PING]))
    }

    fn kind(frame: &[u8]) -> MessageKind {
        if frame.len() == 1 {
            return MessageKind::Ping;
        }
        let mut cursor = Cursor::new(frame);
        match cursor.read_string() {
            Ok(_) => kind_of(&frame[cursor.next..]),
            Err(_) => MessageKind::Other,
        }
    }

    fn describe(&self) -> (String, String) {
        let mut names = Vec::new();
        let mut users = Vec::new();
        for (address, state) in self.docs.iter() {
            if let DocState::Open(open) = state {
                names.push(document_of(address).to_string());
                if let Some(user) = &open.user {
                    users.push(user.to_string());
                }
            }
        }
        users.dedup();
        let many = |list: Vec<String>| match list.len() {
            0 => "-".to_string(),
            n if n > 5 => format!("{} and {} more", list[..5].join(","), n - 5),
            _ => list.join(","),
        };
        (many(names), many(users))
    }

    async fn finish(self) {
        for state in self.docs.into_values() {
            if let DocState::Open(open) = state {
                open.member.leave().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_address() {
        let framer = HFramer {
            address: "team/notes".into(),
        };
        let frame = framer.frame(Outbound::SyncStatus(true)).unwrap();
        let (address, kind, mut cursor) = header(&frame).unwrap();
        assert_eq!((address.as_str(), kind), ("team/notes", SYNC_STATUS as u64));
        assert_eq!(cursor.read_var::<u32>().unwrap(), 1);
        let stateless = framer.frame(Outbound::Stateless("hi")).unwrap();
        let (_, kind, mut cursor) = header(&stateless).unwrap();
        assert_eq!(kind, STATELESS);
        assert_eq!(cursor.read_string().unwrap(), "hi");
        assert_eq!(HSession::kind(&frame), MessageKind::SyncStatus);
        assert_eq!(HSession::kind(&[PING]), MessageKind::Ping);
        assert!(!framer.key().is_empty(), "a key y-websocket's framer has");
        assert_eq!(document_of("doc\0session"), "doc");
    }
}
