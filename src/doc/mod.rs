//! Documents: yrs on untrusted input (the [`guard`] around every call that a
//! hostile update could make panic), documents built from what the store
//! holds, what a document may be called ([`name`]), its content as JSON
//! ([`json`]) and the changes that restore an earlier version ([`restore`]).

pub mod guard;
pub mod json;
pub mod name;
pub mod restore;
mod roots;

use yrs::updates::decoder::Decode;
use yrs::{Doc, StateVector, Update};

use crate::store::{StoreError, StoredDoc};

/// Applies a stored document on top of `doc` (a resync). Updates are
/// idempotent, so a row that is both in the snapshot and the log (a
/// compaction racing a load) is harmless.
pub fn apply_stored(doc: &Doc, stored: &StoredDoc) -> Result<(), StoreError> {
    let rows = stored.snapshot.iter().chain(stored.updates.iter());
    let updates = decode_all(rows.map(Vec::as_slice))?;
    guard::apply_all(doc, updates).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Builds a stored document: snapshot and log in one transaction.
///
/// With `check`, the result must also encode. Should an update yrs accepted
/// but cannot encode have been stored anyway, the document is rebuilt without
/// it (found by bisection over the log), so one such update cannot make a
/// document unloadable; it is logged, and the next compaction drops it for
/// good. The check costs one encoding of the whole document, so rooms skip it
/// unless the document already failed to encode once.
pub fn build(stored: &StoredDoc, check: bool) -> Result<Doc, StoreError> {
    let rows: Vec<&Vec<u8>> = stored
        .snapshot
        .iter()
        .chain(stored.updates.iter())
        .collect();
    if !check {
        return from_updates(rows.into_iter().map(Vec::as_slice));
    }
    let mut kept = rows.clone();
    loop {
        if let Some(doc) = healthy(&kept)? {
            if kept.len() < rows.len() {
                tracing::error!(
                    dropped = rows.len() - kept.len(),
                    "left out stored updates that break the document"
                );
            }
            return Ok(doc);
        }
        // The shortest broken prefix ends with a culprit.
        let (mut good, mut bad) = (0, kept.len());
        while bad - good > 1 {
            let mid = (good + bad) / 2;
            match healthy(&kept[..mid])? {
                Some(_) => good = mid,
                None => bad = mid,
            }
        }
        kept.remove(bad - 1);
    }
}

/// A document built from whole states or updates, applied in order in one
/// transaction.
pub fn from_updates<'a>(rows: impl Iterator<Item = &'a [u8]>) -> Result<Doc, StoreError> {
    let doc = Doc::new();
    match guard::apply_all(&doc, decode_all(rows)?) {
        Ok(()) => Ok(doc),
        Err(error) => {
            guard::discard(doc);
            Err(StoreError::Corrupt(error.to_string()))
        }
    }
}

/// The document built from `rows`, if it applies and then encodes.
fn healthy(rows: &[&Vec<u8>]) -> Result<Option<Doc>, StoreError> {
    let doc = Doc::new();
    let applied = guard::apply_all(&doc, decode_all(rows.iter().map(|r| r.as_slice()))?);
    if applied.is_ok() && guard::encode_diff(&doc, &StateVector::default()).is_ok() {
        return Ok(Some(doc));
    }
    guard::discard(doc);
    Ok(None)
}

fn decode_all<'a>(rows: impl Iterator<Item = &'a [u8]>) -> Result<Vec<Update>, StoreError> {
    rows.map(|raw| Update::decode_v1(raw).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect()
}

/// Folds a snapshot and log rows into one update (what compaction stores).
pub fn fold(snapshot: Option<&[u8]>, updates: &[Vec<u8>]) -> Result<Vec<u8>, StoreError> {
    let stored = StoredDoc {
        snapshot: snapshot.map(<[u8]>::to_vec),
        updates: updates.to_vec(),
    };
    let doc = build(&stored, true)?;
    guard::encode_state(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))
}
