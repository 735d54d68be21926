//! The document API, metrics, origin checks and the per-address cap over real HTTP.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, Text, Transact, Update};

fn text_update(doc: &Doc, index: u32, chunk: &str) -> Vec<u8> {
    let before = doc.transact().state_vector();
    let text = doc.get_or_insert_text("t");
    text.insert(&mut doc.transact_mut(), index, chunk);
    doc.transact().encode_diff_v1(&before)
}

#[tokio::test]
async fn whole_state_and_diff_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("api/notes");
    let path = format!("/api/docs/{}", percent_encode(&doc));
    let http = reqwest::Client::new();

    let resp = http.get(server.http(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 404, "nothing stored yet");

    let source = Doc::new();
    let first = text_update(&source, 0, "hello");
    let resp = http
        .post(server.http(&format!("{path}/updates")))
        .body(first)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let sv = source.transact().state_vector();
    let second = text_update(&source, 5, " world");
    http.post(server.http(&format!("{path}/updates")))
        .body(second.clone())
        .send()
        .await
        .unwrap();

    let whole = http.get(server.http(&path)).send().await.unwrap();
    assert_eq!(whole.headers()["content-type"], "application/octet-stream");
    let fresh = Doc::new();
    fresh
        .transact_mut()
        .apply_update(Update::decode_v1(&whole.bytes().await.unwrap()).unwrap())
        .unwrap();
    assert_eq!(text_of(&fresh, "t"), "hello world");

    // The diff against the state after "hello" holds only " world".
    let since = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sv.encode_v1());
    let diff = http
        .get(server.http(&format!("{path}?since={since}")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let partial = Doc::new();
    partial
        .transact_mut()
        .apply_update(Update::decode_v1(&diff).unwrap())
        .unwrap();
    assert!(diff.len() < 40, "diff of {} bytes", diff.len());
    // Padding is accepted too.
    let padded = base64::engine::general_purpose::URL_SAFE.encode(sv.encode_v1());
    let resp = http
        .get(server.http(&format!("{path}?since={padded}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), diff);
}

#[tokio::test]
async fn bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .arg("--max-http-body-bytes")
        .arg("1024")
        .start();
    let http = reqwest::Client::new();
    let doc = unique("api-bad");
    let url = server.http(&format!("/api/docs/{doc}/updates"));
    let resp = http
        .post(&url)
        .body(vec![0xff, 0xff, 0xff])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("undecodable update"));
    let resp = http.post(&url).body(vec![0u8; 4096]).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let resp = http
        .get(server.http(&format!("/api/docs/{doc}?since=!!")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Nothing was stored by any of it.
    let resp = http
        .get(server.http(&format!("/api/docs/{doc}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn a_posted_update_reaches_clients_on_both_replicas_and_survives_restart() {
    let db = fresh_postgres().await;
    let start = |id: &str| Server::replica(&db, &shared_redis_url(), id).start();
    let (r1, r2) = (start("api1"), start("api2"));
    let doc = unique("api/replicated");
    let mut a = Client::connect(&r1.ws_url(&doc)).await;
    let mut b = Client::connect(&r2.ws_url(&doc)).await;
    let update = text_update(&Doc::new(), 0, "from the API");
    let resp = reqwest::Client::new()
        .post(r1.http(&format!("/api/docs/{}/updates", percent_encode(&doc))))
        .body(update)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    a.wait_text("t", "from the API").await;
    b.wait_text("t", "from the API").await;
    drop(r1);
    let r2 = r2.restart();
    let stored = fetch_doc(&r2, &doc).await.unwrap();
    assert_eq!(text_of(&stored, "t"), "from the API");
}

/// The series the SPEC names, each present on a server that has done nothing.
#[tokio::test]
async fn a_fresh_server_exposes_every_named_series_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let body = server.metrics_text().await;
    for series in [
        "concord_connections{",
        "concord_documents_loaded{",
        "concord_messages_received_total{",
        "concord_messages_sent_total{",
        "concord_connections_rejected_total{",
        "concord_persist_seconds_bucket{",
        "concord_persist_seconds_count{",
        "concord_fanout_errors_total{",
        "concord_persist_errors_total{",
        "concord_webhook_deliveries_total{",
        "concord_webhook_events_pending{",
        "concord_webhook_oldest_pending_seconds{",
    ] {
        let line = body
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("{series} missing from a fresh server's metrics:\n{body}"));
        assert!(line.ends_with(" 0"), "{series} is not zero: {line}");
    }
}

#[tokio::test]
async fn metrics_move_with_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("metrics");
    assert_eq!(server.metric("concord_connections").await, 0.0);
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;
    server
        .wait_metric("concord_connections", |v| v == 2.0)
        .await;
    a.insert("t", 0, "m").await;
    b.wait_text("t", "m").await;
    a.set_awareness(1, "{}").await;
    b.pump_until(|c| c.awareness_frames > 0).await;
    // b saw the update at its local broadcast, which precedes the group commit.
    server
        .wait_metric("concord_updates_persisted_total", |v| v >= 1.0)
        .await;
    let body = reqwest::get(server.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, min) in [
        ("concord_messages_received_total{replica", 0.0),
        ("concord_documents_loaded", 1.0),
        ("concord_updates_persisted_total", 1.0),
    ] {
        assert!(metric_value(&body, name) >= min, "{name}");
    }
    assert!(
        body.contains(r#"concord_messages_received_total{replica="#),
        "{body}"
    );
    assert!(body.contains(r#"type="update""#));
    assert!(body.contains(r#"type="awareness""#));
    assert!(body.contains("concord_messages_sent_total"));
    assert!(body.contains("concord_persist_seconds_bucket"));
    assert!(!body.contains(&doc), "document names must not be labels");
    a.close().await;
    b.close().await;
    server
        .wait_metric("concord_connections", |v| v == 0.0)
        .await;
    server
        .wait_metric("concord_connections_closed_total", |v| v >= 2.0)
        .await;
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .arg("--allowed-origins")
        .arg("https://app.example,https://admin.example")
        .start();
    let url = server.ws_url(&unique("origin"));
    let request = |origin: &str| {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req
    };
    match tokio_tungstenite::connect_async(request("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    tokio_tungstenite::connect_async(request("https://admin.example"))
        .await
        .unwrap();
    let rejected = server.metric("concord_connections_rejected_total").await;
    assert!(rejected >= 1.0);
}

#[tokio::test]
async fn per_address_cap_answers_429_and_cannot_be_dodged() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .arg("--max-connections-per-ip")
        .arg("3")
        .arg("--trusted-proxies")
        .arg("10.0.0.0/8")
        .start();
    let url = server.ws_url(&unique("cap"));
    let connect = |xff: Option<&str>| {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .unwrap();
        if let Some(xff) = xff {
            req.headers_mut()
                .insert("x-forwarded-for", xff.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect(None).await.unwrap());
    }
    // Forging X-Forwarded-For from an untrusted peer changes nothing.
    match connect(Some("1.2.3.4")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // Closing one frees a slot.
    drop(open.pop());
    let deadline = std::time::Instant::now() + WAIT;
    while connect(None).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
