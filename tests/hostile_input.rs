//! Bad input: each case gets its close code, and the room, the other clients
//! and the stored document stay intact.

mod common;

use std::time::Duration;

use common::*;

/// Sets up a document with content and a bystander, runs `attack` on a third
/// connection, and checks what must survive.
async fn survives(server: &Server, attack: Vec<Vec<u8>>, want: u16) {
    let doc = unique("hostile");
    let mut writer = Client::connect(&server.ws_url(&doc)).await;
    writer.insert("t", 0, "intact").await;
    let mut bystander = Client::connect(&server.ws_url(&doc)).await;
    bystander.wait_text("t", "intact").await;

    let mut attacker = Client::connect(&server.ws_url(&doc)).await;
    for frame in attack {
        attacker.send_raw(frame).await;
    }
    let (code, reason) = attacker.wait_close().await;
    assert_eq!(code, want, "close reason: {reason}");

    // The room goes on: the bystander still gets edits, and nothing of the
    // bad message was applied or stored.
    writer.insert("t", 6, "!").await;
    bystander.wait_text("t", "intact!").await;
    let fresh = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(fresh.text("t"), "intact!");
    let stored = fetch_doc(server, &doc).await.unwrap();
    assert_eq!(text_of(&stored, "t"), "intact!");
}

#[tokio::test]
async fn garbage_frames_close_with_1002() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    // Unknown message type.
    survives(&server, vec![vec![9, 1, 2, 3]], 1002).await;
    // Truncated varint.
    survives(&server, vec![vec![0x80]], 1002).await;
    // Empty frame.
    survives(&server, vec![vec![]], 1002).await;
    // Unknown sync step.
    survives(&server, vec![vec![0, 7, 0]], 1002).await;
    // A huge declared length that is never sent.
    survives(
        &server,
        vec![vec![0, 2, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2]],
        1002,
    )
    .await;
    // An update that is not a Yjs update.
    survives(&server, vec![vec![0, 2, 4, 0xff, 0xff, 0xff, 0x7f]], 1002).await;
    // A struct count far beyond the bytes present.
    survives(
        &server,
        vec![vec![0, 2, 6, 0xff, 0xff, 0xff, 0xff, 0x0f, 1]],
        1002,
    )
    .await;
    // Found by the fuzzer: 18 bytes whose client count asks for 88 GB.
    survives(
        &server,
        vec![b"\x00\x02\x0f\xb5\xb5\xb5\xb5\xb5\xb5\x74\x05hell\x00\x04".to_vec()],
        1002,
    )
    .await;
    // A client count that is large but possible to reserve (2^28), which
    // overcommit would grant: refused without touching the memory.
    survives(
        &server,
        vec![vec![0, 2, 6, 0x80, 0x80, 0x80, 0x80, 0x01, 0]],
        1002,
    )
    .await;
    // Found by the fuzzer: an awareness client id over 53 bits makes yrs panic
    // while decoding; the panic costs this connection only.
    survives(
        &server,
        vec![b"\x01\x0f\x08\xb9\xff\xff\xff\xff\xff\x60\x01\x84\x7b\x3a\x32\x7d\x20".to_vec()],
        1002,
    )
    .await;
    // Awareness that does not decode.
    survives(&server, vec![vec![1, 3, 1, 0xff]], 1002).await;

    // None of it cost real memory: the server's peak RSS stays small (the
    // 2^28 count alone would have touched 512 MB of hash table control bytes).
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 256 * 1024, "peak RSS {peak_kib} KiB");
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("oversized");
    let mut writer = Client::connect(&server.ws_url(&doc)).await;
    writer.insert("t", 0, "intact").await;
    let mut bystander = Client::connect(&server.ws_url(&doc)).await;
    bystander.wait_text("t", "intact").await;

    // Send and read at once, as a browser does: the server refuses the frame
    // from its header and closes while the payload is still arriving.
    let attacker = Client::connect(&server.ws_url(&doc)).await;
    let (mut sink, mut stream) = futures::StreamExt::split(attacker.ws);
    let mut frame = vec![0, 2];
    frame.extend(std::iter::repeat_n(0u8, 17 * 1024 * 1024));
    let sender = tokio::spawn(async move {
        use futures::SinkExt;
        let _ = sink
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                frame.into(),
            ))
            .await;
    });
    let code = tokio::time::timeout(WAIT, async {
        use futures::StreamExt;
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_tungstenite::tungstenite::Message::Close(Some(f)) = msg {
                return Some(u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("close within the wait");
    sender.abort();
    assert_eq!(code, Some(1009));

    writer.insert("t", 6, "!").await;
    bystander.wait_text("t", "intact!").await;
    let stored = fetch_doc(&server, &doc).await.unwrap();
    assert_eq!(text_of(&stored, "t"), "intact!");
}

#[tokio::test]
async fn flood_closes_with_1008_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    // 1,000 burst + 200/s: 1,500 query-awareness messages sent at once exceed it.
    let flood = vec![vec![3u8]; 1500];
    let doc = unique("flood");
    let mut bystander = Client::connect(&server.ws_url(&doc)).await;
    let mut attacker = Client::connect(&server.ws_url(&doc)).await;
    for frame in flood {
        attacker.send_raw(frame).await;
    }
    let (code, reason) = attacker.wait_close().await;
    assert_eq!((code, reason.as_str()), (1008, "rate limit"));
    assert!(bystander.stays_open(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn text_frames_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("text");
    let mut c = Client::connect(&server.ws_url(&doc)).await;
    use futures::SinkExt;
    c.ws.send(tokio_tungstenite::tungstenite::Message::Text("hi".into()))
        .await
        .unwrap();
    assert_eq!(c.wait_close().await.0, 1002);
}

#[tokio::test]
async fn invalid_document_names_get_400_before_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    for bad in ["", "a%00b", "%FF%FE", &"x".repeat(513)] {
        let err = Client::open(&server.ws_url(bad), yrs::Doc::new())
            .await
            .err();
        match err {
            Some(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400, "name {bad:?}")
            }
            other => panic!("name {bad:?}: expected HTTP 400, got {other:?}"),
        }
    }
    // 512 bytes is fine.
    Client::connect(&server.ws_url(&"x".repeat(512))).await;
}
