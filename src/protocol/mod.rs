//! Wire codecs. Each transport dialect gets a module that turns frames into
//! [`Inbound`] messages for the room and builds outgoing frames; only
//! y-websocket exists today.

pub mod ywebsocket;

use yrs::sync::awareness::AwarenessUpdate;
use yrs::{StateVector, Update};

/// A client message, decoded and validated, ready for the room.
#[derive(Debug)]
pub enum Inbound {
    /// The client's state vector: answer with the diff.
    SyncStep1(StateVector),
    /// Document changes (sync step 2 or update): the raw bytes for broadcast and storage,
    /// and the decoded update so the room does not parse them twice.
    Update {
        raw: bytes::Bytes,
        update: Update,
    },
    Awareness {
        raw: bytes::Bytes,
        update: AwarenessUpdate,
    },
    QueryAwareness,
    /// Messages we accept and drop (the auth sub-protocol clients never send to servers).
    Ignored,
}

/// Why a frame was refused. Every variant closes the socket with 1002 and a reason.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("undecodable update: {0}")]
    BadUpdate(String),
    #[error("undecodable awareness update: {0}")]
    BadAwareness(String),
}
