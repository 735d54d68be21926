//! The wire protocols, each a codec and a [`crate::transport::Session`]:
//! [`ywebsocket`] serves one document per socket (`/ws/{doc}`), and
//! [`hocuspocus`] many, each frame addressed to its document (`/hocuspocus`).
//! Both decode what a peer sends into [`crate::room::Inbound`] messages and
//! frame what the rooms send with their [`crate::room::Framer`]; parsing and
//! encoding of the y-protocols payloads are `yrs::sync`'s.

mod addresses;
pub mod hocuspocus;
pub mod ywebsocket;

use std::panic::catch_unwind;

use bytes::Bytes;
use yrs::encoding::read::{Cursor, Error as ReadError, Read};
use yrs::encoding::write::Write;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::{StateVector, Update};

use crate::doc::guard;
use crate::metrics::MessageKind;
use crate::room::{Inbound, Outbound};

/// Why a frame was refused. Every variant closes the socket (1002) with a reason.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unknown message type {0}")]
    UnknownType(u64),
    #[error("undecodable update: {0}")]
    BadUpdate(String),
    #[error("undecodable awareness update: {0}")]
    BadAwareness(String),
}

impl From<ReadError> for DecodeError {
    fn from(error: ReadError) -> Self {
        DecodeError::Malformed(error.to_string())
    }
}

/// Decodes a y-protocols sync or awareness message body (what follows the
/// message type): the parts both protocols share. Nothing is applied here;
/// an error means the frame must be refused whole.
fn decode_sync(cursor: &mut Cursor<'_>) -> Result<Inbound, DecodeError> {
    let step: u64 = cursor.read_var()?;
    let payload = cursor.read_buf()?;
    match step {
        0 => {
            let sv = catch_unwind(|| StateVector::decode_v1(payload))
                .map_err(|_| DecodeError::Malformed("decoder panicked".into()))?
                .map_err(|e| DecodeError::Malformed(format!("bad state vector: {e}")))?;
            Ok(Inbound::SyncStep1(sv))
        }
        1 | 2 => {
            let update = decode_update(payload)?;
            Ok(Inbound::Update {
                raw: Bytes::copy_from_slice(payload),
                update,
            })
        }
        other => Err(DecodeError::UnknownType(other)),
    }
}

fn decode_awareness(cursor: &mut Cursor<'_>) -> Result<Inbound, DecodeError> {
    let payload = cursor.read_buf()?;
    check_awareness_client_ids(payload)?;
    let update = catch_unwind(|| AwarenessUpdate::decode_v1(payload))
        .map_err(|_| DecodeError::BadAwareness("decoder panicked".into()))?
        .map_err(|e| DecodeError::BadAwareness(e.to_string()))?;
    Ok(Inbound::Awareness { update })
}

/// Yjs client ids are 53-bit (a JavaScript number). yrs asserts that in
/// debug builds and silently drops the high bits in release ones, so a larger
/// id would either panic or alias another client: refuse it before yrs sees it.
fn check_awareness_client_ids(update: &[u8]) -> Result<(), DecodeError> {
    const MAX_CLIENT_ID: u64 = (1 << 53) - 1;
    let bad = |e: ReadError| DecodeError::BadAwareness(e.to_string());
    let mut entries = Cursor::new(update);
    let count: u32 = entries.read_var().map_err(bad)?;
    // Each entry takes at least three bytes, so a lying count ends at the
    // first read past the end.
    for _ in 0..count {
        let client: u64 = entries.read_var().map_err(bad)?;
        if client > MAX_CLIENT_ID {
            return Err(DecodeError::BadAwareness(format!(
                "client id {client} is over 53 bits"
            )));
        }
        let _clock: u32 = entries.read_var().map_err(bad)?;
        entries.read_string().map_err(bad)?;
    }
    Ok(())
}

/// Decodes a Yjs v1 update, for the sockets and the HTTP API alike, and tries
/// it on an empty document first ([`guard::trial`]): an update that applies
/// but leaves a state yrs cannot encode would make every later sync of its
/// document panic, from memory and again after each reload, since the raw
/// update is stored. The trial costs a second decode and integration.
pub fn decode_update(raw: &[u8]) -> Result<Update, DecodeError> {
    let decode = || {
        catch_unwind(|| Update::decode_v1(raw))
            .map_err(|_| DecodeError::BadUpdate("decoder panicked".into()))?
            .map_err(|e| DecodeError::BadUpdate(e.to_string()))
    };
    guard::trial(decode()?).map_err(|e| DecodeError::BadUpdate(e.to_string()))?;
    decode()
}

/// Decodes a state vector sent by an HTTP client.
pub fn decode_state_vector(raw: &[u8]) -> Result<StateVector, DecodeError> {
    catch_unwind(|| StateVector::decode_v1(raw))
        .map_err(|_| DecodeError::Malformed("decoder panicked".into()))?
        .map_err(|e| DecodeError::Malformed(format!("bad state vector: {e}")))
}

/// Writes the y-protocols body of a room message both protocols share (sync
/// and awareness); false for the messages only Hocuspocus has.
fn write_shared(out: &mut Vec<u8>, msg: Outbound<'_>) -> bool {
    match msg {
        Outbound::SyncStep1(sv) => {
            out.extend_from_slice(&[0, 0]);
            out.write_buf(sv);
        }
        Outbound::SyncStep2(update) => {
            out.extend_from_slice(&[0, 1]);
            out.write_buf(update);
        }
        Outbound::Update(update) => {
            out.extend_from_slice(&[0, 2]);
            out.write_buf(update);
        }
        Outbound::Awareness(update) => {
            out.push(1);
            out.write_buf(update);
        }
        Outbound::Stateless(_) | Outbound::SyncStatus(_) => return false,
    }
    true
}

/// The room message's payload length, to size a frame's buffer once.
fn payload_len(msg: Outbound<'_>) -> usize {
    match msg {
        Outbound::SyncStep1(b)
        | Outbound::SyncStep2(b)
        | Outbound::Update(b)
        | Outbound::Awareness(b) => b.len(),
        Outbound::Stateless(s) => s.len(),
        Outbound::SyncStatus(_) => 1,
    }
}

/// The kind of a y-protocols message body, read from its first bytes.
fn kind_of(body: &[u8]) -> MessageKind {
    match body {
        [0, 0, ..] => MessageKind::SyncStep1,
        [0, 1, ..] | [4, 1, ..] => MessageKind::SyncStep2,
        [0, 2, ..] | [4, 2, ..] => MessageKind::Update,
        [1, ..] => MessageKind::Awareness,
        [2, ..] => MessageKind::Auth,
        [3, ..] => MessageKind::QueryAwareness,
        [5, ..] => MessageKind::Stateless,
        [7, ..] => MessageKind::Close,
        [8, ..] => MessageKind::SyncStatus,
        _ => MessageKind::Other,
    }
}
