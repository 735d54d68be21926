//! yrs calls on untrusted updates, with yrs panics confined to the call.
//!
//! yrs mostly returns errors for bad input, but some updates that decode make
//! it panic while integrating, or leave a state that panics later, whenever
//! the document is encoded (every client's sync). A transaction commits when
//! dropped, and committing one that a panic left half-done can panic again;
//! a second panic while the first unwinds would abort the process, so the
//! drop is guarded too.

use std::panic::{catch_unwind, AssertUnwindSafe};

use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// yrs refused the update; the document is unchanged.
    #[error("{0}")]
    Invalid(String),
    /// yrs panicked on the update or on what it left: the document in memory
    /// can no longer be trusted and must be rebuilt from the store (which
    /// never saw the update).
    #[error("{0}")]
    Poisoned(&'static str),
}

/// Applies stored updates in one transaction, as a load does.
pub fn apply_all(doc: &Doc, updates: Vec<Update>) -> Result<(), ApplyError> {
    let mut txn = doc.transact_mut();
    let applied = catch_unwind(AssertUnwindSafe(|| {
        updates
            .into_iter()
            .try_for_each(|update| txn.apply_update(update))
    }));
    let committed = catch_unwind(AssertUnwindSafe(move || drop(txn)));
    match (applied, committed) {
        (Ok(Ok(())), Ok(())) => Ok(()),
        (Ok(Err(error)), Ok(())) => Err(ApplyError::Invalid(error.to_string())),
        _ => Err(ApplyError::Poisoned("update integration panicked")),
    }
}

/// The document's state since `since`, or `Poisoned` when yrs cannot encode it.
pub fn encode_diff(doc: &Doc, since: &StateVector) -> Result<Vec<u8>, ApplyError> {
    catch_unwind(AssertUnwindSafe(|| doc.transact().encode_diff_v1(since)))
        .map_err(|_| ApplyError::Poisoned("document state cannot be encoded"))
}

/// The document's whole state, or `Poisoned` when yrs cannot encode it.
pub fn encode_state(doc: &Doc) -> Result<Vec<u8>, ApplyError> {
    catch_unwind(AssertUnwindSafe(|| {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }))
    .map_err(|_| ApplyError::Poisoned("document state cannot be encoded"))
}

/// Drops a document that may be inconsistent: freeing one can panic too.
pub fn discard(doc: Doc) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(doc)));
}

/// Applies `update` to `doc`, then encodes the blocks it added, so that a
/// state yrs cannot encode is found now rather than at the next client's
/// sync. The check costs one encoding of the update, whatever the size of
/// the document: it leaves out the document's delete set (a pass over every
/// block), and yrs is patched to slice a long text from its nearer end.
pub fn apply(doc: &Doc, update: Update) -> Result<(), ApplyError> {
    let before = doc.transact().state_vector();
    apply_all(doc, vec![update])?;
    catch_unwind(AssertUnwindSafe(|| {
        doc.transact().encode_blocks_since_v1(&before)
    }))
    .map(drop)
    .map_err(|_| ApplyError::Poisoned("document state cannot be encoded"))
}

/// Whether `update` applies to an empty document whose whole state then
/// encodes. On an empty document everything an update depends on is missing,
/// so the path that keeps and re-reads such parts is exercised in full.
/// Not [`apply`]: its check would encode the same blocks once more, on every
/// update a client sends, and the whole-state encoding covers them.
pub fn trial(update: Update) -> Result<(), ApplyError> {
    let scratch = Doc::new();
    let encoded = apply_all(&scratch, vec![update]).and_then(|()| encode_state(&scratch).map(drop));
    discard(scratch);
    encoded
}

#[cfg(test)]
mod tests {
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, OffsetKind, Options, Text};

    use super::*;

    /// The patched slicing (vendor/yrs/PATCHED.md) against a model: inserts
    /// at every UTF-16 offset of a squashed text mixing ASCII, two- and
    /// three-byte chars and surrogate pairs, each encoded and applied to a
    /// second document, as a room's check and a client's sync do.
    #[test]
    fn splitting_long_texts_at_utf16_offsets_matches_a_model() {
        let utf16 = || {
            Doc::with_options(Options {
                offset_kind: OffsetKind::Utf16,
                ..Options::default()
            })
        };
        for base in ["plain ascii text", "é€ mixed 😀 text ✓", "😀😀😀"] {
            let len16 = base.encode_utf16().count() as u32;
            for at in 0..=len16 {
                let (doc, mirror) = (utf16(), utf16());
                let text = doc.get_or_insert_text("t");
                for chunk in base.split_inclusive(' ') {
                    let mut txn = doc.transact_mut();
                    let end = text.len(&txn);
                    text.insert(&mut txn, end, chunk);
                }
                let before = doc.transact().state_vector();
                text.insert(&mut doc.transact_mut(), at, "|");
                let added = doc.transact().encode_blocks_since_v1(&before);
                let update = Update::decode_v1(&encode_state(&doc).unwrap()).unwrap();
                apply_all(&mirror, vec![update]).unwrap();

                let mut units: Vec<u16> = base.encode_utf16().collect();
                units.insert(at as usize, '|' as u16);
                let want = String::from_utf16_lossy(&units);
                let got = text.get_string(&doc.transact());
                assert_eq!(got, want, "insert at {at} of {base:?}");
                let mirrored = mirror.get_or_insert_text("t");
                assert_eq!(mirrored.get_string(&mirror.transact()), want);
                assert!(Update::decode_v1(&added).is_ok());
            }
        }
    }
}
