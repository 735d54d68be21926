//! The floor: a relay that accepts sockets, answers a client's sync step 1
//! with an empty step 2, and forwards every other frame to the other sockets
//! of the same path. No document, no store: what is left of a fan-out
//! latency or CPU figure is the sockets, the scheduler and the generator.
//! Run as this binary with `--relay PORT`.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::Update;

type Peers = Arc<std::sync::Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<Ws>)>>>>;

// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
pub async fn relay(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let peers: Peers = Default::default();
    for id in 0u64.. {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tcp.set_nodelay(true);
        let peers = peers.clone();
        tokio::spawn(async move {
            let mut path = String::new();
            let callback = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                            resp| {
                path = req.uri().path().to_string();
                Ok(resp)
            };
            let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Ws>();
            peers
                .lock()
                .unwrap()
                .entry(path.clone())
                .or_default()
                .push((id, tx.clone()));
            tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(msg)) = stream.next().await {
                let Ws::Binary(data) = msg else { continue };
                if data.starts_with(&[0, 0]) {
                    let reply = Message::Sync(SyncMessage::SyncStep2(Update::EMPTY_V1.to_vec()));
                    let _ = tx.send(Ws::Binary(reply.encode_v1().into()));
                    continue;
                }
                for (other, peer) in peers.lock().unwrap().get(&path).into_iter().flatten() {
                    if *other != id {
                        let _ = peer.send(Ws::Binary(data.clone()));
                    }
                }
            }
            if let Some(list) = peers.lock().unwrap().get_mut(&path) {
                list.retain(|(other, _)| *other != id);
            }
        });
    }
}
