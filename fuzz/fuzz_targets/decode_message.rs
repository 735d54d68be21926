//! A client frame through the server's own path: decode it as the connection
//! does, then apply what decodes to a document as the room does. The server
//! catches panics per connection, so what this looks for is what would still
//! hurt it: aborts, runaway allocation (-rss_limit_mb) and loops (-timeout).
#![no_main]

use concord::protocol::{ywebsocket, Inbound};
use libfuzzer_sys::fuzz_target;
use yrs::sync::Awareness;
use yrs::{Doc, ReadTxn, Transact};

fuzz_target!(|frame: &[u8]| {
    let Ok(msg) = ywebsocket::decode(frame) else {
        return;
    };
    let mut awareness = Awareness::new(Doc::new());
    match msg {
        Inbound::Update { update, .. } => {
            let doc = awareness.doc();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = doc.transact_mut().apply_update(update);
            }));
            if result.is_ok() {
                let _ = doc.transact().encode_state_as_update_v1(&Default::default());
            }
        }
        Inbound::SyncStep1(sv) => {
            let _ = awareness.doc().transact().encode_diff_v1(&sv);
        }
        Inbound::Awareness { update, .. } => {
            let _ = awareness.apply_update(update);
            let _ = awareness.update();
        }
        Inbound::QueryAwareness | Inbound::Ignored => {}
    }
});
