//! Bad input on `/hocuspocus`: each case gets its close code, and the
//! document, its other clients and what is stored stay intact. The real
//! provider's behaviour is in `tests/interop/hocuspocus.test.mjs`.

mod common;

use std::time::Duration;

use common::hocuspocus::*;
use common::*;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::encoding::write::Write;

/// Sets up a document with content and a y-websocket bystander, sends
/// `attack(doc)` on a Hocuspocus socket, and checks what must survive.
async fn survives(server: &Server, attack: impl FnOnce(&str) -> Vec<Vec<u8>>, want: u16) {
    let witness = Witness::new(server).await;

    // Send and read at once, as a browser does: the server may close while
    // the attack is still being sent.
    let (mut sink, mut stream) = open(server).await.split();
    let frames = attack(&witness.doc);
    let sender = tokio::spawn(async move {
        for f in frames {
            if sink.send(WsMessage::Binary(f.into())).await.is_err() {
                break;
            }
        }
        sink
    });
    let (code, reason) = closed_with(&mut stream).await;
    sender.abort();
    assert_eq!(code, want, "close reason: {reason}");

    witness.check_intact(server).await;
}

#[tokio::test]
async fn undecodable_frames_close_with_1002() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    // An address whose declared length runs past the frame.
    survives(&server, |_| vec![vec![0x20, b'a']], 1002).await;
    // A truncated varint where the type should be.
    let truncated = |doc: &str| {
        let mut f = Vec::new();
        f.write_string(doc);
        f.push(0x80);
        vec![f]
    };
    survives(&server, truncated, 1002).await;
    // An empty frame.
    survives(&server, |_| vec![vec![]], 1002).await;
    // An unknown message type on an open document.
    survives(
        &server,
        |doc| vec![auth(doc, ""), step1(doc), frame(doc, 42, &[1, 2])],
        1002,
    )
    .await;
    // A sync message that is not one, and an update that is not a Yjs update.
    survives(
        &server,
        |doc| vec![auth(doc, ""), frame(doc, SYNC, &[7, 0])],
        1002,
    )
    .await;
    survives(
        &server,
        |doc| {
            vec![
                auth(doc, ""),
                frame(doc, SYNC, &[2, 4, 0xff, 0xff, 0xff, 0x7f]),
            ]
        },
        1002,
    )
    .await;
    // Queued before the auth and undecodable: refused once the auth admits it.
    survives(
        &server,
        |doc| {
            vec![
                frame(doc, SYNC, &[2, 4, 0xff, 0xff, 0xff, 0x7f]),
                auth(doc, ""),
            ]
        },
        1002,
    )
    .await;
}

#[tokio::test]
async fn frames_waiting_for_auth_past_their_bounds_close_with_4205() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    // Too many documents waiting for their auth.
    survives(
        &server,
        |doc| (0..101).map(|i| step1(&format!("{doc}-{i}"))).collect(),
        4205,
    )
    .await;
    // Too many messages for one document.
    survives(&server, |doc| vec![step1(doc); 1001], 4205).await;
    // Too many bytes: six frames of a MiB.
    survives(
        &server,
        |doc| vec![frame(doc, 5, &vec![b'x'; 1 << 20]); 6],
        4205,
    )
    .await;
}

#[tokio::test]
async fn a_socket_that_authenticates_nothing_is_closed_with_4408() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).arg("--auth-timeout=1s").start();
    // Silent, and talking without ever authenticating.
    survives(&server, |_| vec![], 4408).await;
    survives(&server, |doc| vec![step1(doc)], 4408).await;
    // A socket that authenticated a document is past the deadline for good.
    let doc = unique("hp-deadline");
    let mut ok = open(&server).await;
    ok.send(WsMessage::Binary(auth(&doc, "").into()))
        .await
        .unwrap();
    // Past twice the deadline, nothing it received was a close.
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(msg) = tokio::time::timeout_at(until, ok.next()).await {
        assert!(
            matches!(msg, Some(Ok(WsMessage::Binary(_) | WsMessage::Ping(_)))),
            "an authenticated socket was closed: {msg:?}"
        );
    }
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    survives(
        &server,
        |doc| vec![auth(doc, ""), frame(doc, SYNC, &vec![0u8; 17 << 20])],
        1009,
    )
    .await;
}

#[tokio::test]
async fn a_flood_closes_with_1008() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    survives(
        &server,
        |doc| {
            let mut frames = vec![auth(doc, "")];
            frames.extend(std::iter::repeat_n(frame(doc, 3, &[]), 1500));
            frames
        },
        1008,
    )
    .await;
}

#[tokio::test]
async fn a_v4_provider_hears_a_keepalive_on_every_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).arg("--ping-interval=200ms").start();
    let doc = unique("hp-keepalive");
    let mut ws = open(&server).await;
    // `auth` announces a v4 provider, which answers pings.
    ws.send(WsMessage::Binary(auth(&doc, "").into()))
        .await
        .unwrap();
    // A beat every 100 ms: three keepalives well within the wait.
    let mut keepalives = 0;
    tokio::time::timeout(WAIT, async {
        while keepalives < 3 {
            match ws.next().await {
                Some(Ok(WsMessage::Binary(data))) if data[..] == [9] => keepalives += 1,
                Some(Ok(WsMessage::Close(f))) => panic!("closed: {f:?}"),
                None | Some(Err(_)) => panic!("socket ended"),
                _ => {}
            }
        }
    })
    .await
    .expect("three keepalives within the wait");
}
