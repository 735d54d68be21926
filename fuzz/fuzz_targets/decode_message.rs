//! A client frame through the server's own path: decode it as the connection
//! does, then apply what decodes to a document as the room does. The server
//! catches panics per connection, so what this looks for is what would still
//! hurt it: panics outside those guards, aborts, runaway allocation
//! (-rss_limit_mb) and loops (-timeout).
#![no_main]

use concord::doc::guard;
use concord::protocol::ywebsocket;
use concord::room::Inbound;
use concord::store::StoredDoc;
use libfuzzer_sys::fuzz_target;
use yrs::sync::Awareness;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact, Update};

// The server's allocator: a single allocation over 1 GiB fails instead of
// being granted by overcommit, as in production.
#[global_allocator]
static ALLOCATOR: concord::alloc::CappedAllocator = concord::alloc::CappedAllocator;

// libfuzzer-sys aborts on every panic, even one the server catches on purpose
// (it confines a yrs panic to one frame or connection). Panics that escape
// the target still abort: libfuzzer-sys wraps each run in `catch_unwind`.
static QUIET_CAUGHT_PANICS: std::sync::Once = std::sync::Once::new();

fuzz_target!(|frame: &[u8]| {
    QUIET_CAUGHT_PANICS.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Ok(Some(msg)) = ywebsocket::decode(frame) else {
        return;
    };
    let mut awareness = Awareness::new(document());
    match msg {
        Inbound::Update { raw, update } => {
            // As the room: a guarded apply, then the next client's sync. A
            // document that cannot be encoded is reloaded from the store,
            // checked, and must then encode.
            let doc = awareness.doc();
            let synced = guard::apply(doc, update)
                .and_then(|()| guard::encode_diff(doc, &StateVector::default()));
            if synced.is_err() {
                let stored = StoredDoc {
                    snapshot: Some(base().to_vec()),
                    updates: vec![raw.to_vec()],
                };
                let healed = concord::doc::build(&stored, true).expect("stored rows decode");
                let _ = healed.transact().encode_diff_v1(&StateVector::default());
            }
        }
        Inbound::SyncStep1(sv) => {
            let _ = awareness.doc().transact().encode_diff_v1(&sv);
        }
        Inbound::Awareness { update, .. } => {
            let _ = awareness.apply_update(update);
            let _ = awareness.update();
        }
        Inbound::QueryAwareness | Inbound::Stateless(_) => {}
    }
});

/// A room's document is rarely empty: text, deletions and a map from clients
/// 0, 1 and 2 (the ids fuzzed updates name most), so an update meets items to
/// attach to, and what it leaves pending differs from the decoder's own trial
/// on an empty document.
fn document() -> Doc {
    let doc = Doc::new();
    doc.transact_mut()
        .apply_update(Update::decode_v1(base()).unwrap())
        .unwrap();
    doc
}

/// The stored state of [`document`].
fn base() -> &'static [u8] {
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let merged = Doc::with_client_id(0);
        for client in 0..3u64 {
            let doc = Doc::with_client_id(client);
            let text = doc.get_or_insert_text("t");
            let map = doc.get_or_insert_map("m");
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 0, "hello world");
            text.remove_range(&mut txn, 2, 3);
            yrs::Map::insert(&map, &mut txn, "k", client as i64);
            let update = txn.encode_state_as_update_v1(&StateVector::default());
            drop(txn);
            let mut into = merged.transact_mut();
            into.apply_update(Update::decode_v1(&update).unwrap()).unwrap();
        }
        let txn = merged.transact();
        txn.encode_state_as_update_v1(&StateVector::default())
    })
}
