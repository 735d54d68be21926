//! The y-websocket protocol (y-protocols), `GET /ws/{doc}`: one document per
//! socket, named by the path. One message per binary frame: a varint type
//! (0 sync, 1 awareness, 2 auth, 3 query-awareness) and a payload.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::time::Instant;
use yrs::encoding::read::{Cursor, Read};

use super::{decode_awareness, decode_sync, kind_of, payload_len, write_shared, DecodeError};
use crate::auth::{AuthError, Grant};
use crate::metrics::{self as m, MessageKind};
use crate::room::{ConnId, Framer, Inbound, Leave, Member, Outbound, Peer, RoomError, Rooms};
use crate::transport::{Close, Outbox, Session};

/// Decodes one client frame; `None` for messages accepted and dropped (the
/// auth sub-protocol, which clients never send to servers).
pub fn decode(frame: &[u8]) -> Result<Option<Inbound>, DecodeError> {
    let mut cursor = Cursor::new(frame);
    let kind: u64 = cursor.read_var()?;
    match kind {
        0 => decode_sync(&mut cursor).map(Some),
        1 => decode_awareness(&mut cursor).map(Some),
        2 => Ok(None),
        3 => Ok(Some(Inbound::QueryAwareness)),
        other => Err(DecodeError::UnknownType(other)),
    }
}

/// Frames room messages bare: every y-websocket peer gets the same bytes.
struct YFramer;

impl Framer for YFramer {
    fn frame(&self, msg: Outbound<'_>) -> Option<Bytes> {
        // Asked for on every update a writer sends; nothing to allocate.
        if matches!(msg, Outbound::Stateless(_) | Outbound::SyncStatus(_)) {
            return None;
        }
        let mut out = Vec::with_capacity(payload_len(msg) + 8);
        write_shared(&mut out, msg).then(|| out.into())
    }

    /// Empty: a Hocuspocus framer's never is.
    fn key(&self) -> &[u8] {
        b""
    }
}

fn framer() -> Arc<dyn Framer> {
    static FRAMER: OnceLock<Arc<dyn Framer>> = OnceLock::new();
    FRAMER.get_or_init(|| Arc::new(YFramer)).clone()
}

/// One socket on one document.
pub struct YSession {
    member: Member,
    doc: Arc<str>,
    /// The token's `sub`, for the log.
    user: Option<Arc<str>>,
    can_write: bool,
    /// When the token expires: the socket is closed then.
    expires: Option<Instant>,
}

/// Admits the peer (`grant` is what its token gives, or why it gives
/// nothing) and joins the document's room.
pub async fn open(
    rooms: Rooms,
    doc: String,
    grant: Result<Grant, AuthError>,
    outbox: Outbox,
) -> Result<YSession, Close> {
    let grant = grant.map_err(|error| {
        let (close, reason) = match error {
            AuthError::Forbidden => (Close::Forbidden, "forbidden"),
            AuthError::Missing | AuthError::Invalid(_) => {
                (Close::Unauthorized("unauthorized"), "unauthorized")
            }
        };
        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason).increment(1);
        tracing::info!(%doc, %error, "websocket refused");
        close
    })?;
    let peer = Peer {
        outbox,
        framer: framer(),
        can_write: grant.can_write(),
        user: grant.user.clone(),
    };
    let member = rooms.join(&doc, peer).await.map_err(|error| match error {
        RoomError::Unavailable(why) => Close::TryAgain(why),
        RoomError::BadUpdate(why) => Close::Internal(why),
    })?;
    tracing::info!(
        doc = %doc,
        user = grant.user.as_deref().unwrap_or("-"),
        write = grant.can_write(),
        "connection opened"
    );
    Ok(YSession {
        member,
        doc: doc.into(),
        can_write: grant.can_write(),
        expires: grant.expires_at.map(deadline),
        user: grant.user,
    })
}

/// A wall-clock time as a timer deadline.
pub(super) fn deadline(at: SystemTime) -> Instant {
    Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

impl Session for YSession {
    async fn frame(&mut self, data: Bytes) -> Result<(), Close> {
        let msg = match decode(&data) {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(()),
            Err(error) => {
                tracing::info!(doc = %self.doc, %error, "refused undecodable message");
                return Err(Close::Protocol(error.to_string()));
            }
        };
        if matches!(msg, Inbound::Update { .. }) && !self.can_write {
            // Read access: the update is dropped, the connection stays.
            return Ok(());
        }
        if !self.member.send(msg).await {
            return Err(Close::Reloading("document unloaded"));
        }
        Ok(())
    }

    async fn left(&mut self, _conn: ConnId, why: Leave) -> Result<(), Close> {
        Err(why.into())
    }

    fn deadline(&self) -> Option<Instant> {
        self.expires
    }

    async fn expire(&mut self) -> Result<(), Close> {
        Err(Close::Unauthorized("token expired"))
    }

    fn kind(frame: &[u8]) -> MessageKind {
        kind_of(frame)
    }

    fn describe(&self) -> (String, String) {
        (
            self.doc.to_string(),
            self.user.as_deref().unwrap_or("-").to_string(),
        )
    }

    async fn finish(self) {
        self.member.leave().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact};

    #[test]
    fn update_round_trips() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "hello");
        let raw = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let frame = YFramer.frame(Outbound::Update(&raw)).unwrap();
        match decode(&frame).unwrap() {
            Some(Inbound::Update { raw: got, update }) => {
                assert_eq!(&got[..], &raw[..]);
                let other = Doc::new();
                let t = other.get_or_insert_text("t");
                other.transact_mut().apply_update(update).unwrap();
                assert_eq!(t.get_string(&other.transact()), "hello");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(kind_of(&frame), MessageKind::Update);
        assert!(YFramer.frame(Outbound::SyncStatus(true)).is_none());
    }

    #[test]
    fn refuses_garbage() {
        assert!(decode(&[]).is_err());
        assert!(matches!(decode(&[9, 0]), Err(DecodeError::UnknownType(9))));
        // Truncated varint.
        assert!(decode(&[0x80]).is_err());
        // Huge declared length that is never sent.
        assert!(decode(&[0, 2, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        // An awareness client id a JavaScript client could not hold.
        let mut over = vec![1, 11, 1];
        over.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        over.extend([1, 0]);
        assert!(matches!(decode(&over), Err(DecodeError::BadAwareness(_))));
        // Found by the fuzzer: updates that decode but do not round-trip.
        for frame in [
            &b"\x00\x02\x0f\x01\x01\x01\x00\x02\x0f\x00\x00\x00\x00\x00\x00\x00\x12\x6c"[..],
            &b"\x00\x02\x0f\x01\x01\x71\x00\x12\x00\x80\x01\x00\x00\x00\x00\x00\x00\x05"[..],
        ] {
            assert!(matches!(decode(frame), Err(DecodeError::BadUpdate(_))));
        }
        // A well-framed update whose payload is not a Yjs update.
        assert!(matches!(
            decode(&[0, 2, 3, 0xff, 0xff, 0xff]),
            Err(DecodeError::BadUpdate(_))
        ));
    }
}
