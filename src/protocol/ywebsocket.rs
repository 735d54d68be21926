//! The y-websocket dialect (y-protocols): one message per binary frame, a varint
//! type tag (0 sync, 1 awareness, 2 auth, 3 query-awareness) and a payload.
//! Parsing and encoding are `yrs::sync`'s; this file only decides what is
//! acceptable from a client and builds the frames the server sends.

use std::panic::catch_unwind;

use bytes::Bytes;
use yrs::encoding::read::{Cursor, Error as ReadError, Read};
use yrs::sync::awareness::AwarenessUpdate;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{StateVector, Update};

use super::{DecodeError, Inbound};
use crate::guard;

/// Decodes one client frame. Nothing is applied here; an error means the
/// frame must be refused whole.
pub fn decode(frame: &[u8]) -> Result<Inbound, DecodeError> {
    if frame.first() == Some(&1) {
        check_awareness_client_ids(&frame[1..])?;
    }
    // yrs hardens its decoders against hostile lengths, but a panic on some
    // input we have not seen must cost one connection, never the process.
    let message = catch_unwind(|| Message::decode_v1(frame))
        .map_err(|_| DecodeError::Malformed("decoder panicked".into()))?
        .map_err(|e: ReadError| DecodeError::Malformed(e.to_string()))?;
    match message {
        Message::Sync(SyncMessage::SyncStep1(sv)) => Ok(Inbound::SyncStep1(sv)),
        Message::Sync(SyncMessage::SyncStep2(raw)) | Message::Sync(SyncMessage::Update(raw)) => {
            let update = decode_update(&raw)?;
            Ok(Inbound::Update {
                raw: Bytes::from(raw),
                update,
            })
        }
        Message::Awareness(update) => Ok(Inbound::Awareness {
            raw: Bytes::copy_from_slice(frame),
            update,
        }),
        Message::AwarenessQuery => Ok(Inbound::QueryAwareness),
        Message::Auth(_) => Ok(Inbound::Ignored),
        Message::Custom(tag, _) => Err(DecodeError::UnknownType(tag)),
    }
}

/// Yjs client ids are 53-bit (a JavaScript number). yrs asserts that in
/// debug builds and silently drops the high bits in release ones, so a larger
/// id would either panic or alias another client: refuse it before yrs sees it.
fn check_awareness_client_ids(payload: &[u8]) -> Result<(), DecodeError> {
    const MAX_CLIENT_ID: u64 = (1 << 53) - 1;
    let bad = |e: ReadError| DecodeError::BadAwareness(e.to_string());
    let mut outer = Cursor::new(payload);
    let mut entries = Cursor::new(outer.read_buf().map_err(bad)?);
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

/// Decodes a Yjs v1 update, for the socket and the HTTP API alike, and tries
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

pub fn sync_step1(sv: &StateVector) -> Bytes {
    Message::Sync(SyncMessage::SyncStep1(sv.clone()))
        .encode_v1()
        .into()
}

pub fn sync_step2(update: Vec<u8>) -> Bytes {
    Message::Sync(SyncMessage::SyncStep2(update))
        .encode_v1()
        .into()
}

pub fn update(update: &[u8]) -> Bytes {
    Message::Sync(SyncMessage::Update(update.to_vec()))
        .encode_v1()
        .into()
}

pub fn awareness(update: AwarenessUpdate) -> Bytes {
    Message::Awareness(update).encode_v1().into()
}

/// Label of a frame's message type for metrics, read from its first bytes
/// without decoding the rest.
pub fn message_type(frame: &[u8]) -> &'static str {
    match frame {
        [0, 0, ..] => "sync_step1",
        [0, 1, ..] => "sync_step2",
        [0, 2, ..] => "update",
        [1, ..] => "awareness",
        [2, ..] => "auth",
        [3, ..] => "query_awareness",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Doc, GetString, ReadTxn, Text, Transact};

    #[test]
    fn update_round_trips() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "hello");
        let raw = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let frame = update(&raw);
        match decode(&frame).unwrap() {
            Inbound::Update { raw: got, update } => {
                assert_eq!(&got[..], &raw[..]);
                let other = Doc::new();
                let t = other.get_or_insert_text("t");
                other.transact_mut().apply_update(update).unwrap();
                assert_eq!(t.get_string(&other.transact()), "hello");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(message_type(&frame), "update");
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
