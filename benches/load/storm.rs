//! The join storm: a 4 MB document, cold (the server just started), opened by
//! 150 clients at once. Time from the common start to each client's step 2,
//! how many store loads the server made, and its CPU and peak memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact, Update};

use crate::client::Framing;
use crate::targets::{self, Target};

pub struct Outcome {
    pub doc_bytes: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub loads: f64,
    pub server_cpu_ms: f64,
    pub server_rss_peak_mib: f64,
}

/// About `bytes` of text typed by ten writers taking turns, runs of ten
/// 400-character chunks each: what a long document written by a team leaves.
fn document(bytes: usize) -> Vec<u8> {
    let writers: Vec<Doc> = (0..10).map(|i| Doc::with_client_id(i + 1)).collect();
    let texts: Vec<_> = writers.iter().map(|w| w.get_or_insert_text("t")).collect();
    let chunk = "lorem ipsum dolor sit amet ".repeat(15);
    let chunk = &chunk[..400];
    for i in 0..bytes / 400 {
        let w = (i / 10) % writers.len();
        let update = {
            let mut txn = writers[w].transact_mut();
            let end = texts[w].len(&txn);
            texts[w].insert(&mut txn, end, chunk);
            txn.encode_update_v1()
        };
        if (i + 1) % 10 == 0 || i + 1 == bytes / 400 {
            // A run ends: the others catch up with this writer's state.
            let state = writers[w]
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            for (j, other) in writers.iter().enumerate() {
                if j != w {
                    let update = Update::decode_v1(&state).unwrap();
                    other.transact_mut().apply_update(update).unwrap();
                }
            }
        }
        drop(update);
    }
    let state = writers[0]
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    state
}

pub async fn run(target: Target, clients: usize, bytes: usize) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("storm.db").display());
    let name = format!("storm-{}", std::process::id());
    let update = document(bytes);
    let doc_bytes = update.len();
    let server = targets::start_concord(&db, &[]);
    targets::post_update(&server.http, &name, update).await;
    server.stop();

    let mut server = targets::start_concord(&db, &[]);
    if target == Target::ConcordHocuspocus {
        server = server.through_hocuspocus();
    }
    let loads0 = targets::metric(&server.http, "concord_store_loads_total").await;
    let url = Arc::new(server.socket_url(&name));
    let cpu0 = targets::cpu_seconds(server.pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, name, protocol) = (url.clone(), name.clone(), target.protocol());
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .unwrap();
            let framing = Framing::new(protocol, &name);
            if protocol == targets::Protocol::Hocuspocus {
                use yrs::encoding::write::Write;
                let mut auth = Vec::new();
                auth.write_string(&name);
                auth.extend([2, 0, 0]);
                ws.send(Ws::Binary(auth.into())).await.unwrap();
            }
            let sv = StateVector::default();
            ws.send(framing.encode(Message::Sync(SyncMessage::SyncStep1(sv))))
                .await
                .unwrap();
            // The step 2 is recognised, not applied: applying 150 copies of a
            // 4 MB document would measure the generator, not the server.
            loop {
                match ws.next().await {
                    Some(Ok(Ws::Binary(data))) => {
                        let body = framing.body(&data).unwrap_or_default();
                        if body.starts_with(&[0, 1]) || body.starts_with(&[4, 1]) {
                            return (start.elapsed(), ws);
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => panic!("closed before its step 2"),
                }
            }
        }));
    }
    let mut times = Vec::new();
    let mut sockets = Vec::new();
    for t in tasks {
        let (elapsed, ws) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("every joiner synced within a minute")
            .unwrap();
        times.push(elapsed.as_secs_f64() * 1000.0);
        sockets.push(ws);
    }
    let server_cpu_ms = (targets::cpu_seconds(server.pid) - cpu0) * 1000.0;
    let loads = targets::metric(&server.http, "concord_store_loads_total").await - loads0;
    let server_rss_peak_mib = targets::rss_kib(server.pid).1 / 1024.0;
    drop(sockets);
    server.stop();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    Outcome {
        doc_bytes,
        p50: pct(0.5),
        p99: pct(0.99),
        max: *times.last().unwrap(),
        loads,
        server_cpu_ms,
        server_rss_peak_mib,
    }
}
