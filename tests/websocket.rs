//! The y-websocket protocol against a real server process on SQLite.

mod common;

use std::time::Duration;

use common::*;
use yrs::{Doc, ReadTxn, Text, Transact};

#[tokio::test]
async fn two_clients_converge_and_a_late_joiner_gets_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("team-a/notes");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;

    a.insert("t", 0, "hello").await;
    b.wait_text("t", "hello").await;
    b.insert("t", 5, " world").await;
    a.wait_text("t", "hello world").await;

    let late = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(late.text("t"), "hello world");
    // Names with a slash reach the same document through the API.
    let stored = fetch_doc(&server, &doc).await.expect("stored");
    assert_eq!(text_of(&stored, "t"), "hello world");
}

#[tokio::test]
async fn reconnect_step2_holds_exactly_the_missing_diff() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("diff");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    a.insert("t", 0, &"x".repeat(10_000)).await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;
    b.wait_text("t", &"x".repeat(10_000)).await;

    // B goes away; A writes a little more.
    let b_doc = std::mem::replace(&mut b.doc, Doc::new());
    b.close().await;
    let sv_b = b_doc.transact().state_vector();
    a.insert("t", 0, "abc").await;
    // A third client shows what the server holds now.
    let mut server_state = Client::connect(&server.ws_url(&doc)).await;
    server_state
        .wait_text("t", &format!("abc{}", "x".repeat(10_000)))
        .await;
    let expected = server_state.doc.transact().encode_diff_v1(&sv_b);

    let b = Client::connect_with(&server.ws_url(&doc), b_doc).await;
    let step2 = b.step2s.last().unwrap();
    assert_eq!(
        step2, &expected,
        "step 2 is the diff against the client's state vector"
    );
    assert!(
        step2.len() < 100,
        "resync sent {} bytes for a 3-char edit",
        step2.len()
    );
    assert_eq!(b.text("t"), format!("abc{}", "x".repeat(10_000)));
}

#[tokio::test]
async fn offline_edits_merge_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("offline");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    a.insert("t", 0, "base").await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;
    b.wait_text("t", "base").await;

    let offline = std::mem::replace(&mut a.doc, Doc::new());
    a.close().await;
    // Edit while offline: nothing is sent.
    {
        let text = offline.get_or_insert_text("t");
        text.insert(&mut offline.transact_mut(), 4, " offline");
    }
    b.insert("t", 0, "online ").await;
    // Reconnecting answers the server's step 1 with the offline edit.
    let mut a = Client::connect_with(&server.ws_url(&doc), offline).await;
    b.wait_text("t", "online base offline").await;
    a.wait_text("t", "online base offline").await;
}

#[tokio::test]
async fn awareness_appears_for_everyone_and_disappears_on_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("presence");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;
    let a_id = a.client_id();

    a.set_awareness(1, r#"{"user":"ada"}"#).await;
    b.pump_until(|c| c.awareness.get(&a_id).is_some_and(Option::is_some))
        .await;
    // The sender gets its own state back: an idle client alone still hears from the server.
    a.pump_until(|c| c.awareness.get(&a_id).is_some_and(Option::is_some))
        .await;

    // A late joiner receives current states on connect.
    let mut c = Client::connect(&server.ws_url(&doc)).await;
    c.pump_until(|c| c.awareness.get(&a_id).is_some_and(Option::is_some))
        .await;

    a.close().await;
    b.pump_until(|c| c.awareness.get(&a_id) == Some(&None))
        .await;
    c.pump_until(|c| c.awareness.get(&a_id) == Some(&None))
        .await;
}

#[tokio::test]
async fn idle_client_alone_keeps_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let mut a = Client::connect(&server.ws_url(&unique("alone"))).await;
    for clock in 1..=3 {
        let before = a.awareness_frames;
        a.set_awareness(clock, r#"{"user":"solo"}"#).await;
        a.pump_until(|c| c.awareness_frames > before).await;
    }
}

#[tokio::test]
async fn query_awareness_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("query");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    a.set_awareness(1, r#"{"n":1}"#).await;
    let a_id = a.client_id();
    a.pump_until(|c| c.awareness.contains_key(&a_id)).await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;
    b.pump_until(|c| c.awareness.contains_key(&a_id)).await;
    let before = b.awareness_frames;
    b.send(yrs::sync::Message::AwarenessQuery).await;
    b.pump_until(|c| c.awareness_frames > before).await;
}

#[tokio::test]
async fn cold_load_is_single_flight() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .arg("--unload-after")
        .arg("200ms")
        .start();
    let doc = unique("cold");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    a.insert("t", 0, "stored").await;
    a.close().await;
    // Wait for the room to flush and unload.
    server
        .wait_metric("concord_documents_loaded", |v| v == 0.0)
        .await;
    let loads_before = server.metric("concord_store_loads_total").await;

    let url = server.ws_url(&doc);
    let clients = futures::future::join_all((0..20).map(|_| {
        let url = url.clone();
        async move { Client::connect(&url).await }
    }))
    .await;
    for c in &clients {
        assert_eq!(c.text("t"), "stored");
    }
    let loads = server.metric("concord_store_loads_total").await - loads_before;
    assert_eq!(
        loads, 1.0,
        "20 concurrent joins of a cold document caused {loads} loads"
    );
}

#[tokio::test]
async fn idle_document_is_flushed_and_unloaded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .arg("--unload-after")
        .arg("300ms")
        .start();
    let doc = unique("unload");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    a.insert("t", 0, "kept").await;
    server
        .wait_metric("concord_documents_loaded", |v| v == 1.0)
        .await;
    a.close().await;
    server
        .wait_metric("concord_documents_loaded", |v| v == 0.0)
        .await;
    let b = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(b.text("t"), "kept");
}

#[tokio::test]
async fn slow_consumer_is_closed_with_1013_and_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .arg("--outbox-capacity")
        .arg("4")
        .start();
    let doc = unique("slow");
    let mut slow = Client::connect(&server.ws_url(&doc)).await;
    let mut writer = Client::connect(&server.ws_url(&doc)).await;
    // The slow client reads nothing while large updates pile up in the
    // kernel buffers and then in its outbox.
    let chunk = "y".repeat(256 * 1024);
    for i in 0..60 {
        writer.insert("t", i * chunk.len() as u32, &chunk).await;
    }
    let expected = writer.text("t");
    let (code, reason) = slow.wait_close().await;
    assert_eq!(code, 1013, "reason: {reason}");
    // The close can come before the room has taken in the writer's last
    // updates: a round trip of the writer's makes sure it has.
    writer.sync().await;
    // Reconnecting resyncs everything; nothing was lost for anyone.
    let slow_doc = std::mem::replace(&mut slow.doc, Doc::new());
    let again = Client::connect_with(&server.ws_url(&doc), slow_doc).await;
    assert_eq!(again.text("t"), expected);
    assert!(writer.stays_open(Duration::from_millis(200)).await);
}

/// Large first syncs take turns (two at a time), but a peer that stops
/// reading while it holds a turn delays the next joiner by about a second,
/// not until its write times out.
#[tokio::test]
async fn joiners_of_a_large_document_are_not_held_up_by_peers_that_stop_reading() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("bulk-turns");
    // Larger than what loopback buffers hold for a peer that never reads.
    let source = Doc::new();
    let text = source.get_or_insert_text("t");
    text.insert(&mut source.transact_mut(), 0, &"x".repeat(12 << 20));
    let update = source
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    let resp = reqwest::Client::new()
        .post(server.http(&format!("/api/docs/{}/updates", percent_encode(&doc))))
        .body(update)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);

    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut peer = Client::open(&server.ws_url(&doc), Doc::new())
            .await
            .unwrap();
        let sv = peer.doc.transact().state_vector();
        peer.send(yrs::sync::Message::Sync(yrs::sync::SyncMessage::SyncStep1(
            sv,
        )))
        .await;
        stalled.push(peer);
    }
    // Synced within the harness's bounded wait (15 s): waiting for the
    // stalled writes to time out (60 s) would fail it.
    let joiner = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(joiner.text("t").len(), 12 << 20);
    drop(stalled);
}

/// Rooms write to a socket directly while it keeps up; what it cannot take
/// waits, in order, for the socket's task. A reader that pauses while
/// megabytes pile up gets every update intact and in order once it reads
/// again (from the updates themselves: it asks for no resync).
#[tokio::test]
async fn a_reader_that_pauses_gets_every_update_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("pause");
    let mut reader = Client::connect(&server.ws_url(&doc)).await;
    let mut writer = Client::connect(&server.ws_url(&doc)).await;
    // Far more than loopback buffers hold for a reader that is not reading.
    let chunk = "z".repeat(16 * 1024);
    for i in 0..400 {
        writer.insert("t", i * chunk.len() as u32, &chunk).await;
    }
    let expected = writer.text("t");
    tokio::time::timeout(Duration::from_secs(15), async {
        while reader.text("t").len() < expected.len() {
            assert!(reader.pump_one().await, "the socket closed");
        }
    })
    .await
    .expect("every update arrives");
    assert_eq!(reader.text("t"), expected);
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .args(["--ping-interval", "200ms", "--pong-timeout", "1s"])
        .start();
    let doc = unique("pings");
    let mut answering = Client::connect(&server.ws_url(&doc)).await;
    let mut silent = Client::connect(&server.ws_url(&doc)).await;
    // Reading answers the server's pings (tungstenite sends the pongs).
    assert!(
        answering.stays_open(Duration::from_secs(3)).await,
        "a peer answering pings was dropped"
    );
    // The silent peer's bytes are read raw, so nothing answers for it (a
    // late pong would meet a closed socket, and its reset could discard the
    // close frame before it is read).
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = silent.ws.get_mut() else {
        unreachable!("plain TCP")
    };
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(tcp, &mut raw))
        .await
        .expect("the server ends the socket")
        .expect("read");
    // An unmasked close frame: 1001, "no pong".
    let close = [&[0x88, 9, 0x03, 0xe9][..], b"no pong"].concat();
    assert!(
        raw.windows(close.len()).any(|w| w == close),
        "no 1001 close frame in {raw:?}"
    );
}

#[tokio::test]
async fn a_message_in_fragments_with_a_ping_between_arrives_whole_and_the_ping_is_answered() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message as Ws;
    use yrs::sync::{Message, SyncMessage};
    use yrs::updates::encoder::Encode;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("fragments");
    let mut writer = Client::connect(&server.ws_url(&doc)).await;
    let mut reader = Client::connect(&server.ws_url(&doc)).await;
    let update = writer.local_insert("t", 0, "in three pieces");
    let bytes = Message::Sync(SyncMessage::Update(update)).encode_v1();
    let (first, rest) = bytes.split_at(3);
    let (second, third) = rest.split_at(4);
    let fragment =
        |data: &[u8], opcode, last| Ws::Frame(Frame::message(data.to_vec(), opcode, last));
    for ws in [
        fragment(first, OpCode::Data(Data::Binary), false),
        Ws::Ping("are you there".into()),
        fragment(second, OpCode::Data(Data::Continue), false),
        fragment(third, OpCode::Data(Data::Continue), true),
    ] {
        writer.ws.send(ws).await.unwrap();
    }
    tokio::time::timeout(WAIT, async {
        while reader.text("t") != "in three pieces" {
            assert!(reader.pump_one().await, "the reader was closed");
        }
    })
    .await
    .expect("the reader gets the whole update");
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match writer.ws.next().await {
                Some(Ok(Ws::Pong(payload))) => return payload,
                Some(Ok(_)) => {}
                other => panic!("the socket ended first: {other:?}"),
            }
        }
    })
    .await
    .expect("a pong");
    assert_eq!(&pong[..], b"are you there");
}

#[tokio::test]
async fn an_unmasked_frame_closes_with_1002() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("unmasked");
    let mut client = Client::connect(&server.ws_url(&doc)).await;
    let mut other = Client::connect(&server.ws_url(&doc)).await;
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = client.ws.get_mut() else {
        unreachable!("plain TCP")
    };
    // A client's frames must be masked (RFC 6455, 5.1).
    tcp.write_all(&[0x82, 2, 0, 0]).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("the server ends the socket")
        .expect("read");
    let close = raw
        .windows(4)
        .position(|w| w[0] == 0x88 && w[2..] == [0x03, 0xea]);
    assert!(close.is_some(), "no 1002 close frame in {raw:?}");
    // Nobody else is affected.
    other.insert("t", 0, "still here").await;
    let mut late = Client::connect(&server.ws_url(&doc)).await;
    tokio::time::timeout(WAIT, async {
        while late.text("t") != "still here" {
            assert!(late.pump_one().await);
        }
    })
    .await
    .expect("the document goes on");
}
