//! Restoring a document to an earlier version without rewriting history.
//!
//! The restore is new changes on top of the current state: every root type
//! whose content differs from the version's is emptied and filled with the
//! version's content again (text with its formatting, map entries, array
//! items, XML nodes with their attributes). Because they are ordinary
//! changes, they reach connected clients like any edit, and edits made
//! concurrently (typed after the restore, or offline and synced later)
//! merge with them: an insert next to content the restore removed is still
//! shown. A root whose content already equals the version's is not touched,
//! so a restore to the current state changes nothing.

use std::sync::Arc;

use yrs::types::text::YChange;
use yrs::types::Attrs;
use yrs::types::{AsPrelim, ToJson};
use yrs::{
    Any, Array, Doc, GetString, Map, Out, ReadTxn, Text, Transact, TransactionMut, WriteTxn, Xml,
    XmlElementPrelim, XmlFragment, XmlOut, XmlTextPrelim, XmlTextRef,
};

use super::json::any_to_json;
use super::roots::{roots, Root};

/// The changes that make every root of `current` equal to `target`'s, as a
/// Yjs v1 update; `None` when they are equal already.
pub fn restore(current: &Doc, target: &Doc) -> Option<Vec<u8>> {
    let source = target.transact();
    let wanted: Vec<(Arc<str>, Root)> = roots(&source);
    let mut txn = current.transact_mut();
    let held: Vec<(Arc<str>, Root)> = roots(&txn);
    let mut changed = false;
    for (name, have) in &held {
        let want = wanted
            .iter()
            .find(|(n, _)| n == name)
            .map_or(Root::Empty, |(_, r)| r.clone());
        changed |= replace(&mut txn, name, have, &source, &want);
    }
    for (name, want) in &wanted {
        if !held.iter().any(|(n, _)| n == name) {
            changed |= replace(&mut txn, name, &Root::Empty, &source, want);
        }
    }
    changed.then(|| txn.encode_update_v1())
}

/// Makes the root `name` (now `have`) hold what `want` holds in `source`.
fn replace<S: ReadTxn>(
    txn: &mut TransactionMut,
    name: &str,
    have: &Root,
    source: &S,
    want: &Root,
) -> bool {
    if fingerprint(&*txn, have) == fingerprint(source, want) {
        return false;
    }
    let same_kind = std::mem::discriminant(have) == std::mem::discriminant(want);
    if !same_kind {
        clear(txn, have);
    }
    match want {
        Root::Empty => {}
        Root::Text(text) => {
            let dst = txn.get_or_insert_text(name);
            sync_text(txn, &dst, source, text);
        }
        Root::Map(map) => {
            let dst = txn.get_or_insert_map(name);
            let stale: Vec<String> = dst
                .keys(&*txn)
                .filter(|k| map.get(source, k).is_none())
                .map(str::to_owned)
                .collect();
            for key in stale {
                dst.remove(txn, &key);
            }
            for (key, value) in map.iter(source) {
                let held = dst.get(&*txn, key).map(|v| any_to_json(&v.to_json(&*txn)));
                if held != Some(any_to_json(&value.to_json(source))) {
                    dst.insert(txn, key, value.as_prelim(source));
                }
            }
        }
        Root::Array(array) => {
            let dst = txn.get_or_insert_array(name);
            let held: Vec<_> = dst
                .iter(&*txn)
                .map(|v| any_to_json(&v.to_json(&*txn)))
                .collect();
            let wanted: Vec<Out> = array.iter(source).collect();
            let wanted_json: Vec<_> = wanted
                .iter()
                .map(|v| any_to_json(&v.to_json(source)))
                .collect();
            let (prefix, suffix) = common_ends(&held, &wanted_json);
            dst.remove_range(txn, prefix as u32, (held.len() - prefix - suffix) as u32);
            for (i, value) in wanted[prefix..wanted.len() - suffix].iter().enumerate() {
                dst.insert(txn, (prefix + i) as u32, value.as_prelim(source));
            }
        }
        Root::Xml(xml) => {
            let dst = txn.get_or_insert_xml_fragment(name);
            sync_children(txn, &dst, source, xml);
        }
    }
    true
}

fn clear(txn: &mut TransactionMut, root: &Root) {
    match root {
        Root::Empty => {}
        Root::Text(text) => {
            let len = text.len(&*txn);
            text.remove_range(txn, 0, len);
        }
        Root::Map(map) => {
            let keys: Vec<String> = map.keys(&*txn).map(str::to_owned).collect();
            for key in keys {
                map.remove(txn, &key);
            }
        }
        Root::Array(array) => {
            let len = array.len(&*txn);
            array.remove_range(txn, 0, len);
        }
        Root::Xml(xml) => {
            let len = xml.len(&*txn);
            xml.remove_range(txn, 0, len);
        }
    }
}

/// Content and formatting of a root, to tell whether a restore must touch it.
fn fingerprint<T: ReadTxn>(txn: &T, root: &Root) -> serde_json::Value {
    match root {
        Root::Empty => serde_json::Value::Null,
        Root::Text(text) => serde_json::to_value(
            units(txn, text)
                .iter()
                .map(|u| format!("{u:?}"))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default(),
        Root::Map(map) => any_to_json(&map.to_json(txn)),
        Root::Array(array) => any_to_json(&array.to_json(txn)),
        Root::Xml(xml) => serde_json::Value::String(xml.get_string(txn)),
    }
}

/// How many leading and trailing items `a` and `b` share (not overlapping).
fn common_ends<T: PartialEq>(a: &[T], b: &[T]) -> (usize, usize) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let room = a.len().min(b.len()) - prefix;
    let suffix = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take(room)
        .take_while(|(x, y)| x == y)
        .count();
    (prefix, suffix)
}

/// One position of a text: a character or an embed, with its formatting.
#[derive(Debug, PartialEq)]
struct Unit {
    piece: Piece,
    attrs: Option<Box<Attrs>>,
}

#[derive(Debug, PartialEq)]
enum Piece {
    Char(char),
    Embed(Any),
}

impl Unit {
    /// Its length as yrs counts text positions in documents made by
    /// `Doc::new()` (UTF-8 bytes; an embed is one).
    fn width(&self) -> u32 {
        match self.piece {
            Piece::Char(c) => c.len_utf8() as u32,
            Piece::Embed(_) => 1,
        }
    }
}

fn units<T: ReadTxn>(txn: &T, text: &impl Text) -> Vec<Unit> {
    let mut units = Vec::new();
    for chunk in text.diff(txn, YChange::identity) {
        match chunk.insert {
            Out::Any(Any::String(s)) => units.extend(s.chars().map(|c| Unit {
                piece: Piece::Char(c),
                attrs: chunk.attributes.clone(),
            })),
            // An embedded shared type, which no editor binding in use
            // writes into a text, is kept as its JSON value.
            other => units.push(Unit {
                piece: Piece::Embed(other.to_json(txn)),
                attrs: chunk.attributes,
            }),
        }
    }
    units
}

/// Replaces only what differs between the ends the two texts share, so
/// that an edit made concurrently next to unchanged text keeps its place.
fn sync_text<S: ReadTxn>(txn: &mut TransactionMut, dst: &impl Text, source: &S, src: &impl Text) {
    let held = units(&*txn, dst);
    let wanted = units(source, src);
    let (prefix, suffix) = common_ends(&held, &wanted);
    let start: u32 = held[..prefix].iter().map(Unit::width).sum();
    let stale: u32 = held[prefix..held.len() - suffix]
        .iter()
        .map(Unit::width)
        .sum();
    if stale > 0 {
        dst.remove_range(txn, start, stale);
    }
    let mut index = start;
    let mut run = String::new();
    let mut run_attrs: Option<Box<Attrs>> = None;
    let flush = |txn: &mut TransactionMut,
                 index: &mut u32,
                 run: &mut String,
                 attrs: &Option<Box<Attrs>>| {
        if !run.is_empty() {
            let attrs = attrs.as_deref().cloned().unwrap_or_default();
            dst.insert_with_attributes(txn, *index, run, attrs);
            *index += run.len() as u32;
            run.clear();
        }
    };
    for unit in &wanted[prefix..wanted.len() - suffix] {
        match &unit.piece {
            Piece::Char(c) => {
                if unit.attrs != run_attrs {
                    flush(txn, &mut index, &mut run, &run_attrs);
                    run_attrs = unit.attrs.clone();
                }
                run.push(*c);
            }
            Piece::Embed(any) => {
                flush(txn, &mut index, &mut run, &run_attrs);
                let attrs = unit.attrs.as_deref().cloned().unwrap_or_default();
                dst.insert_embed_with_attributes(txn, index, any.clone(), attrs);
                index += 1;
            }
        }
    }
    flush(txn, &mut index, &mut run, &run_attrs);
}

/// Makes `dst`'s XML children equal to `src`'s. Children at the same place
/// with the same tag are updated where they are rather than replaced, so an
/// edit made concurrently inside an unchanged paragraph keeps its place.
fn sync_children<S: ReadTxn>(
    txn: &mut TransactionMut,
    dst: &impl XmlFragment,
    source: &S,
    src: &impl XmlFragment,
) {
    let held: Vec<XmlOut> = dst.children(&*txn).collect();
    let wanted: Vec<XmlOut> = src.children(source).collect();
    let held_keys: Vec<String> = held.iter().map(|n| node_string(&*txn, n)).collect();
    let wanted_keys: Vec<String> = wanted.iter().map(|n| node_string(source, n)).collect();
    let (prefix, suffix) = common_ends(&held_keys, &wanted_keys);
    let held_mid = &held[prefix..held.len() - suffix];
    let wanted_mid = &wanted[prefix..wanted.len() - suffix];
    let paired = held_mid.len().min(wanted_mid.len());
    for (k, (have, want)) in held_mid.iter().zip(wanted_mid).enumerate() {
        match (have, want) {
            (XmlOut::Element(a), XmlOut::Element(b)) if a.tag() == b.tag() => {
                sync_attributes(txn, a, source, b);
                sync_children(txn, a, source, b);
            }
            (XmlOut::Text(a), XmlOut::Text(b)) => {
                sync_attributes(txn, a, source, b);
                sync_text(txn, a, source, b);
            }
            _ => {
                let index = (prefix + k) as u32;
                dst.remove_range(txn, index, 1);
                insert_copy(txn, dst, index, source, want);
            }
        }
    }
    let extra = held_mid.len() - paired;
    if extra > 0 {
        dst.remove_range(txn, (prefix + paired) as u32, extra as u32);
    }
    for (k, want) in wanted_mid[paired..].iter().enumerate() {
        insert_copy(txn, dst, (prefix + paired + k) as u32, source, want);
    }
}

fn node_string<T: ReadTxn>(txn: &T, node: &XmlOut) -> String {
    match node {
        XmlOut::Element(e) => e.get_string(txn),
        XmlOut::Text(t) => format!("{:?}|{}", units(txn, t), t.get_string(txn)),
        XmlOut::Fragment(f) => f.get_string(txn),
    }
}

/// Inserts a copy of `node` at `index`. Attributes keep their values as
/// they are (y-prosemirror writes numbers and objects, not only strings),
/// so they are set one by one rather than through a prelim.
fn insert_copy<S: ReadTxn>(
    txn: &mut TransactionMut,
    dst: &impl XmlFragment,
    index: u32,
    source: &S,
    node: &XmlOut,
) {
    match node {
        XmlOut::Element(element) => {
            let copy = dst.insert(txn, index, XmlElementPrelim::empty(element.tag().clone()));
            sync_attributes(txn, &copy, source, element);
            sync_children(txn, &copy, source, element);
        }
        XmlOut::Text(text) => {
            let copy: XmlTextRef = dst.insert(txn, index, XmlTextPrelim::new(""));
            sync_attributes(txn, &copy, source, text);
            sync_text(txn, &copy, source, text);
        }
        XmlOut::Fragment(fragment) => {
            // No binding writes one; its children take its place.
            for (k, child) in fragment.children(source).enumerate() {
                insert_copy(txn, dst, index + k as u32, source, &child);
            }
        }
    }
}

fn sync_attributes<S: ReadTxn>(
    txn: &mut TransactionMut,
    dst: &impl Xml,
    source: &S,
    src: &impl Xml,
) {
    let wanted: Vec<(String, Any)> = src
        .attributes(source)
        .map(|(k, v)| (k.to_owned(), v.to_json(source)))
        .collect();
    let stale: Vec<String> = dst
        .attributes(&*txn)
        .filter(|(k, _)| !wanted.iter().any(|(w, _)| w == k))
        .map(|(k, _)| k.to_owned())
        .collect();
    for key in stale {
        dst.remove_attribute(txn, &key);
    }
    for (key, want) in wanted {
        let held = dst.get_attribute(&*txn, &key).map(|o| o.to_json(&*txn));
        if held.as_ref() != Some(&want) {
            dst.insert_attribute(txn, key, want);
        }
    }
}

/// Whether `update` leaves `doc` with the same content as `target` (tests).
#[cfg(test)]
fn same_content(a: &Doc, b: &Doc) -> bool {
    super::json::to_json(&a.transact()) == super::json::to_json(&b.transact())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use yrs::updates::decoder::Decode;
    use yrs::{ArrayPrelim, MapPrelim, StateVector, Update};

    use super::*;

    /// A copy of `doc` as the server holds one: built from bytes, with roots
    /// of no kind.
    fn stored(doc: &Doc) -> Doc {
        let copy = Doc::new();
        let bytes = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        copy.transact_mut()
            .apply_update(Update::decode_v1(&bytes).unwrap())
            .unwrap();
        copy
    }

    fn apply(doc: &Doc, update: &[u8]) {
        doc.transact_mut()
            .apply_update(Update::decode_v1(update).unwrap())
            .unwrap();
    }

    fn bold() -> Attrs {
        HashMap::from([(Arc::from("bold"), Any::Map(Default::default()))])
    }

    #[test]
    fn every_kind_of_root_returns_to_the_version() {
        let client = Doc::with_client_id(1);
        {
            let mut txn = client.transact_mut();
            let text = txn.get_or_insert_text("code");
            text.insert(&mut txn, 0, "fn main() {}");
            text.format(&mut txn, 0, 2, bold());
            let map = txn.get_or_insert_map("meta");
            map.insert(&mut txn, "title", "Draft");
            map.insert(&mut txn, "nested", MapPrelim::from([("n", Any::from(1))]));
            let array = txn.get_or_insert_array("list");
            array.insert(&mut txn, 0, Any::from("a"));
            array.insert(&mut txn, 1, ArrayPrelim::from([Any::from(true)]));
            let xml = txn.get_or_insert_xml_fragment("default");
            let h = xml.insert(&mut txn, 0, XmlElementPrelim::empty("heading"));
            h.insert_attribute(&mut txn, "level", Any::from(1));
            let t = h.insert(&mut txn, 0, XmlTextPrelim::new("Title"));
            t.format(&mut txn, 0, 5, bold());
        }
        let version = stored(&client);
        {
            let mut txn = client.transact_mut();
            let text = txn.get_or_insert_text("code");
            text.insert(&mut txn, 3, "changed ");
            let map = txn.get_or_insert_map("meta");
            map.insert(&mut txn, "title", "Final");
            map.insert(&mut txn, "extra", 3);
            txn.get_or_insert_array("list").remove(&mut txn, 0);
            let xml = txn.get_or_insert_xml_fragment("default");
            xml.insert(&mut txn, 1, XmlElementPrelim::empty("paragraph"));
            txn.get_or_insert_text("later")
                .insert(&mut txn, 0, "new root");
        }
        let server = stored(&client);
        assert!(!same_content(&server, &version));
        let update = restore(&server, &version).expect("something to restore");
        assert!(same_content(&server, &version));
        // Formatting too, on the server and on a client that applies the update.
        apply(&client, &update);
        let txn = client.transact();
        assert_eq!(
            units(&txn, &txn.get_text("code").unwrap()),
            units(
                &version.transact(),
                &version.transact().get_text("code").unwrap()
            )
        );
        drop(txn);
        assert!(same_content(&stored(&client), &version));
        // Nothing left to change.
        assert!(restore(&stored(&client), &version).is_none());
    }

    #[test]
    fn edits_after_a_restore_survive_it() {
        let client = Doc::with_client_id(1);
        let offline = Doc::with_client_id(2);
        {
            let mut txn = client.transact_mut();
            txn.get_or_insert_text("t").insert(&mut txn, 0, "one");
        }
        let version = stored(&client);
        {
            let mut txn = client.transact_mut();
            txn.get_or_insert_text("t").insert(&mut txn, 3, " two");
        }
        // A client that went offline now, and types there.
        apply(
            &offline,
            &client
                .transact()
                .encode_state_as_update_v1(&StateVector::default()),
        );
        let before = offline.transact().state_vector();
        {
            let mut txn = offline.transact_mut();
            txn.get_or_insert_text("t").insert(&mut txn, 7, " three");
        }
        let offline_edit = offline.transact().encode_diff_v1(&before);
        let server = stored(&client);
        let update = restore(&server, &version).unwrap();
        apply(&client, &update);
        assert_eq!(
            client
                .transact()
                .get_text("t")
                .unwrap()
                .get_string(&client.transact()),
            "one"
        );
        apply(&server, &offline_edit);
        let text = server.transact().get_text("t").unwrap();
        assert_eq!(text.get_string(&server.transact()), "one three");
    }
}
