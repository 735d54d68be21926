//! A document's root types, each as the kind its content shows.
//!
//! A Yjs update names its root types but not their kinds (the client that
//! wrote `getText("body")` knows it is text; the bytes do not say), so a
//! document built from stored updates holds roots of no kind. Their content
//! tells: keyed entries make a map, characters a text, XML nodes an XML
//! fragment, anything else in a sequence an array.

use std::sync::Arc;

use yrs::types::text::YChange;
use yrs::{Array, ArrayRef, Map, MapRef, Out, ReadTxn, Text, TextRef, XmlFragmentRef};

/// One root type, read as its kind.
#[derive(Clone)]
pub enum Root {
    Text(TextRef),
    Map(MapRef),
    Array(ArrayRef),
    Xml(XmlFragmentRef),
    /// Nothing visible: every entry deleted, or a root only ever read.
    Empty,
}

/// Roots named like this hold what Tiptap and y-prosemirror write; they are
/// a ProseMirror document even while empty.
pub fn is_prosemirror(name: &str) -> bool {
    matches!(name, "default" | "prosemirror")
}

/// Every root type of the document, by name (sorted, for stable output).
pub fn roots<T: ReadTxn>(txn: &T) -> Vec<(Arc<str>, Root)> {
    let mut roots: Vec<(Arc<str>, Root)> = txn
        .root_refs()
        .map(|(name, out)| (Arc::from(name), classify(txn, out)))
        .collect();
    roots.sort_by(|a, b| a.0.cmp(&b.0));
    roots
}

fn classify<T: ReadTxn>(txn: &T, out: Out) -> Root {
    let branch = match out {
        Out::YText(text) => return Root::Text(text),
        Out::YMap(map) => return Root::Map(map),
        Out::YArray(array) => return Root::Array(array),
        Out::YXmlFragment(xml) => return Root::Xml(xml),
        Out::UndefinedRef(branch) => branch,
        _ => return Root::Empty,
    };
    let map = MapRef::from(branch);
    if map.len(txn) > 0 {
        return Root::Map(map);
    }
    // A text's diff shows its characters and embeds; an array's plain values
    // do not appear in it, and XML nodes appear as shared types.
    let text = TextRef::from(branch);
    let diff = text.diff(txn, YChange::identity);
    if diff.iter().any(|d| matches!(d.insert, Out::Any(_))) {
        return Root::Text(text);
    }
    if diff
        .iter()
        .any(|d| matches!(d.insert, Out::YXmlElement(_) | Out::YXmlText(_)))
    {
        return Root::Xml(XmlFragmentRef::from(branch));
    }
    let array = ArrayRef::from(branch);
    if array.len(txn) > 0 {
        return Root::Array(array);
    }
    Root::Empty
}
