//! How the cost of an update grows with the document: server CPU per
//! one-character append to a text of 0 to 1,000,000 characters, written as
//! typing (one run, one block) and as the worst case (every character its own
//! block), on a document built over the socket path and again after a cold
//! load from the store.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact};

use crate::client;
use crate::targets::{self, Protocol, Running};

#[derive(Clone, Copy)]
pub enum Shape {
    /// One run of appends: yrs holds it as one block.
    Typed,
    /// Every character prepended on its own: one block per character.
    Blocks,
}

impl Shape {
    pub fn label(self) -> &'static str {
        match self {
            Shape::Typed => "typed (one run)",
            Shape::Blocks => "a block per character",
        }
    }
}

pub struct Row {
    pub shape: Shape,
    pub size: usize,
    /// Server CPU per append, µs: on the document as posted, and after a cold load.
    pub warm_us: f64,
    pub cold_us: f64,
    /// From connecting to synced, on the cold server (the store load included).
    pub cold_sync_ms: f64,
}

/// The document as one update.
fn document(shape: Shape, size: usize) -> Vec<u8> {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    {
        let mut txn = doc.transact_mut();
        match shape {
            Shape::Typed => text.insert(&mut txn, 0, &"a".repeat(size)),
            Shape::Blocks => {
                for _ in 0..size {
                    text.insert(&mut txn, 0, "b");
                }
            }
        }
    }
    let update = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    update
}

pub async fn run(shape: Shape, size: usize, appends: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("growth.db").display());
    let name = format!("growth-{}-{size}", std::process::id());
    let server = targets::start_concord(&db, &[]);
    if size > 0 {
        targets::post_update(&server.http, &name, document(shape, size)).await;
    }
    let warm_us = appends_cost(&server, &name, appends).await.1;
    server.stop();
    let server = targets::start_concord(&db, &[]);
    let (cold_sync_ms, cold_us) = appends_cost(&server, &name, appends).await;
    server.stop();
    Row {
        shape,
        size,
        warm_us,
        cold_us,
        cold_sync_ms,
    }
}

/// Connects a writer (timed, to synced) and a reader, then sends `n`
/// one-character appends at the end of the text, 1,000 a second, and
/// measures the server's CPU until the reader has them all: (ms to synced,
/// µs per append).
async fn appends_cost(server: &Running, name: &str, n: usize) -> (f64, f64) {
    let url = server.socket_url(name);
    let started = Instant::now();
    let writer = client::connect(&url, name, Protocol::YWebsocket).await;
    let synced_ms = started.elapsed().as_secs_f64() * 1000.0;
    let reader = client::connect(&url, name, Protocol::YWebsocket).await;
    let (mut reader_ws, framing) = (reader.ws, reader.framing);
    let (mut ws, doc, framing_w) = (writer.ws, writer.doc, writer.framing);
    let text = doc.get_or_insert_text("t");
    let mut updates = Vec::with_capacity(n);
    {
        // Prepared before measuring: finding the end of a text of a million
        // blocks is the client's cost, not the server's.
        let len = text.len(&doc.transact());
        for end in len..len + n as u32 {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, end, "x");
            updates.push(txn.encode_update_v1());
        }
    }
    let cpu0 = targets::cpu_nanos(server.pid);
    let receive = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            match reader_ws.next().await {
                Some(Ok(Ws::Binary(data))) => {
                    if framing.body(&data).is_some_and(|b| b.starts_with(&[0, 2])) {
                        got += 1;
                    }
                }
                Some(Ok(_)) => {}
                _ => panic!("reader closed"),
            }
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for update in updates {
        tick.tick().await;
        ws.send(framing_w.update(&update)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), receive)
        .await
        .expect("every append delivered")
        .unwrap();
    let cpu = targets::cpu_nanos(server.pid) - cpu0;
    (synced_ms, cpu as f64 / 1000.0 / n as f64)
}
