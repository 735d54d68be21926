//! A document as JSON, for backends that want its content rather than CRDT
//! bytes (`GET /api/docs/{doc}?format=json`).
//!
//! One member per root type: text as a string (formatting dropped), a map as
//! an object, an array as an array, and an XML fragment as ProseMirror JSON,
//! in exactly the shape y-prosemirror's `yXmlFragmentToProsemirrorJSON`
//! gives, so a backend sees what the editor sees.

use base64::Engine;
use serde_json::{Map as JsonMap, Value};
use yrs::types::text::YChange;
use yrs::types::ToJson;
use yrs::{
    Any, GetString, Out, ReadTxn, Text, Xml, XmlFragment, XmlFragmentRef, XmlOut, XmlTextRef,
};

use super::roots::{is_prosemirror, roots, Root};

/// The document's content, one member per root type.
pub fn to_json<T: ReadTxn>(txn: &T) -> Value {
    let mut members = JsonMap::new();
    for (name, root) in roots(txn) {
        let value = match root {
            Root::Text(text) => Value::String(text.get_string(txn)),
            Root::Map(map) => any_to_json(&map.to_json(txn)),
            Root::Array(array) => any_to_json(&array.to_json(txn)),
            Root::Xml(xml) => prosemirror(txn, &xml),
            Root::Empty if is_prosemirror(&name) => {
                serde_json::json!({"type": "doc", "content": []})
            }
            Root::Empty => continue,
        };
        members.insert(name.to_string(), value);
    }
    Value::Object(members)
}

/// A Yjs value as JSON; binary as standard base64, as the SPEC says.
pub fn any_to_json(any: &Any) -> Value {
    match any {
        Any::Null | Any::Undefined => Value::Null,
        Any::Bool(b) => Value::Bool(*b),
        Any::Number(n) => match n {
            yrs::any::Number::Int(i) => Value::from(*i),
            yrs::any::Number::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
            }
        },
        Any::String(s) => Value::String(s.to_string()),
        Any::Buffer(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Any::Array(items) => Value::Array(items.iter().map(any_to_json).collect()),
        Any::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), any_to_json(v)))
                .collect(),
        ),
    }
}

/// A value as JSON: shared types as their content.
fn out_to_json<T: ReadTxn>(txn: &T, out: &Out) -> Value {
    any_to_json(&out.to_json(txn))
}

/// `{"type":"doc","content":[…]}`, as `yXmlFragmentToProsemirrorJSON`
/// builds it: top-level text nodes stay arrays there (it does not flatten
/// them), nested ones are flattened into their parent's content.
fn prosemirror<T: ReadTxn>(txn: &T, fragment: &XmlFragmentRef) -> Value {
    let content: Vec<Value> = fragment
        .children(txn)
        .map(|node| match node {
            XmlOut::Text(text) => Value::Array(text_nodes(txn, &text)),
            other => node_json(txn, &other),
        })
        .collect();
    serde_json::json!({"type": "doc", "content": content})
}

fn node_json<T: ReadTxn>(txn: &T, node: &XmlOut) -> Value {
    let XmlOut::Element(element) = node else {
        // A fragment nested in an element: y-prosemirror never writes one.
        return Value::Null;
    };
    let mut json = JsonMap::new();
    json.insert("type".into(), Value::String(element.tag().to_string()));
    let attrs: JsonMap<String, Value> = element
        .attributes(txn)
        .map(|(k, v)| (k.to_string(), out_to_json(txn, &v)))
        .collect();
    if !attrs.is_empty() {
        json.insert("attrs".into(), Value::Object(attrs));
    }
    let mut content = Vec::new();
    for child in element.children(txn) {
        match child {
            XmlOut::Text(text) => content.extend(text_nodes(txn, &text)),
            other => content.push(node_json(txn, &other)),
        }
    }
    if !content.is_empty() {
        json.insert("content".into(), Value::Array(content));
    }
    Value::Object(json)
}

/// A text node per run of equal formatting; each format attribute is a mark
/// whose `attrs` is the attribute's value (y-prosemirror sets it always).
fn text_nodes<T: ReadTxn>(txn: &T, text: &XmlTextRef) -> Vec<Value> {
    text.diff(txn, YChange::identity)
        .into_iter()
        .map(|chunk| {
            let mut node = JsonMap::new();
            node.insert("type".into(), Value::String("text".into()));
            node.insert("text".into(), out_to_json(txn, &chunk.insert));
            if let Some(attributes) = chunk.attributes {
                let marks = attributes
                    .iter()
                    .map(|(name, value)| {
                        serde_json::json!({"type": mark_name(name), "attrs": any_to_json(value)})
                    })
                    .collect();
                node.insert("marks".into(), Value::Array(marks));
            }
            Value::Object(node)
        })
        .collect()
}

/// y-prosemirror keeps overlapping marks of one type apart by suffixing
/// `--` and an 8-character hash to the attribute's name.
fn mark_name(attribute: &str) -> &str {
    let bytes = attribute.as_bytes();
    if bytes.len() > 10 {
        let (head, hash) = attribute.split_at(attribute.len() - 8);
        let hashed = hash
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
        if hashed && head.ends_with("--") {
            return &head[..head.len() - 2];
        }
    }
    attribute
}

#[cfg(test)]
mod tests {
    use yrs::{Array, Doc, Map, Transact, WriteTxn, XmlElementPrelim, XmlTextPrelim};

    use super::*;

    #[test]
    fn hashed_mark_names_lose_their_hash() {
        assert_eq!(mark_name("bold"), "bold");
        assert_eq!(mark_name("comment--a1B2c3D4"), "comment");
        assert_eq!(mark_name("x--a1B2c3D"), "x--a1B2c3D");
        assert_eq!(mark_name("--a1B2c3D4"), "--a1B2c3D4");
    }

    #[test]
    fn each_root_reads_as_its_kind() {
        let doc = Doc::new();
        {
            let mut txn = doc.transact_mut();
            txn.get_or_insert_text("title").insert(&mut txn, 0, "Notes");
            txn.get_or_insert_map("meta")
                .insert(&mut txn, "pages", Any::from(vec![1u8, 2, 3]));
            txn.get_or_insert_array("tags")
                .insert(&mut txn, 0, Any::from("a"));
            let xml = txn.get_or_insert_xml_fragment("default");
            let p = xml.insert(&mut txn, 0, XmlElementPrelim::empty("paragraph"));
            p.insert_attribute(&mut txn, "level", Any::from(2));
            let t = p.insert(&mut txn, 0, XmlTextPrelim::new("Hi"));
            let bold = std::collections::HashMap::from([(
                std::sync::Arc::from("bold"),
                Any::Map(Default::default()),
            )]);
            t.format(&mut txn, 0, 2, bold);
        }
        // Built from bytes, as the server holds it: no root has a kind.
        let bytes = doc
            .transact()
            .encode_state_as_update_v1(&Default::default());
        let copy = Doc::new();
        crate::doc::guard::apply_all(
            &copy,
            vec![yrs::updates::decoder::Decode::decode_v1(&bytes).unwrap()],
        )
        .unwrap();
        let json = to_json(&copy.transact());
        assert_eq!(
            json,
            serde_json::json!({
                "title": "Notes",
                "meta": {"pages": "AQID"},
                "tags": ["a"],
                "default": {"type": "doc", "content": [{
                    "type": "paragraph",
                    "attrs": {"level": 2},
                    "content": [{"type": "text", "text": "Hi", "marks": [{"type": "bold", "attrs": {}}]}]
                }]}
            })
        );
    }
}
