//! Webhooks against a real HTTP receiver on loopback: signed, debounced,
//! retried with one delivery id, durable across a SIGKILL, sent once with two
//! replicas, taken over when the replica holding the lease dies, and sent
//! for a restore.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::watch;

const SECRET: &str = "webhook-test-secret";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    delivery: String,
    signature: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("the body is JSON")
    }
}

/// What the receiver answers, in order; 200 once the script runs out.
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    /// Never answers.
    Hang,
}

#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    count: watch::Sender<usize>,
}

impl Receiver {
    /// Listens on `addr` (port 0 for any).
    async fn start(addr: SocketAddr, script: Vec<Answer>) -> (Receiver, SocketAddr) {
        let receiver = Receiver {
            got: Default::default(),
            script: Arc::new(Mutex::new(script.into())),
            count: watch::channel(0).0,
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, addr)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` requests have arrived.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} webhook requests within 30 s; got {:?}", self.got()))
            .unwrap();
        self.got()
    }

    /// Nothing more arrives for `period`: the debounce and the single sender hold.
    async fn quiet_for(&self, period: Duration) -> Vec<Received> {
        let before = *self.count.borrow();
        let mut rx = self.count.subscribe();
        let more = tokio::time::timeout(period, rx.wait_for(|c| *c > before)).await;
        assert!(more.is_err(), "unexpected requests: {:?}", self.got());
        self.got()
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    r.got.lock().unwrap().push(Received {
        delivery: header("x-concord-delivery"),
        signature: header("x-concord-signature"),
        body,
    });
    r.count.send_modify(|c| *c += 1);
    let answer = r.script.lock().unwrap().pop_front();
    match answer {
        Some(Answer::Hang) => std::future::pending().await,
        Some(Answer::Status(code)) => StatusCode::from_u16(code).unwrap(),
        None => StatusCode::OK,
    }
}

fn expected_signature(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// Waits until the server counts at least `n` deliveries with `outcome`.
async fn wait_deliveries(server: &Server, outcome: &str, n: f64) {
    let label = format!("outcome=\"{outcome}\"");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count: f64 = server
            .metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with("concord_webhook_deliveries_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if count >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{outcome} deliveries stuck at {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hooked(builder: ServerBuilder, receiver: SocketAddr) -> ServerBuilder {
    builder
        .env("CONCORD_WEBHOOK_URL", format!("http://{receiver}/hook"))
        .env("CONCORD_WEBHOOK_SECRET", SECRET)
}

/// An update stored before the answer, as `sub` when given a token.
async fn write(server: &Server, doc: &str, text: &str, token: Option<&str>) {
    let d = yrs::Doc::new();
    {
        use yrs::{Text, Transact};
        let t = d.get_or_insert_text("t");
        t.insert(&mut d.transact_mut(), 0, text);
    }
    let update = {
        use yrs::{ReadTxn, Transact};
        d.transact()
            .encode_state_as_update_v1(&yrs::StateVector::default())
    };
    let mut req = reqwest::Client::new()
        .post(server.http(&format!("/api/docs/{doc}/updates")))
        .body(update);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 204, "{}", resp.text().await.unwrap());
}

fn token(sub: &str) -> String {
    let claims =
        serde_json::json!({ "sub": sub, "exp": 4_000_000_000u64, "docs": { "*": "write" } });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"jwt-secret-for-webhooks"),
    )
    .unwrap()
}

#[tokio::test]
async fn a_signed_event_per_burst_of_changes_with_its_authors() {
    let (receiver, addr) = Receiver::start("127.0.0.1:0".parse().unwrap(), vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = hooked(Server::sqlite(&dir), addr)
        .env("CONCORD_JWT_SECRET", "jwt-secret-for-webhooks")
        .start();
    let doc = unique("hooked");
    // Twenty changes by two users, well inside the debounce.
    for i in 0..20 {
        let sub = if i % 2 == 0 { "ada" } else { "grace" };
        write(&server, &doc, "x", Some(&token(sub))).await;
    }
    receiver.wait_for(1).await;
    let got = receiver.quiet_for(Duration::from_secs(4)).await;
    assert_eq!(got.len(), 1, "one event for the burst: {got:?}");
    let event = got[0].json();
    assert_eq!(event["event"], "document.changed");
    assert_eq!(event["doc"], doc.as_str());
    assert_eq!(event["version"], Value::Null);
    let mut authors: Vec<String> = serde_json::from_value(event["authors"].clone()).unwrap();
    authors.sort();
    assert_eq!(authors, ["ada", "grace"]);
    assert!(event["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(got[0].signature, expected_signature(&got[0].body));
    assert_eq!(got[0].delivery.len(), 32);
    wait_deliveries(&server, "delivered", 1.0).await;
}

#[tokio::test]
async fn failed_attempts_are_retried_with_the_same_delivery_id() {
    let script = vec![Answer::Status(500), Answer::Status(500)];
    let (receiver, addr) = Receiver::start("127.0.0.1:0".parse().unwrap(), script).await;
    let dir = tempfile::tempdir().unwrap();
    let server = hooked(Server::sqlite(&dir), addr).start();
    write(&server, &unique("retried"), "x", None).await;
    receiver.wait_for(3).await;
    let got = receiver.quiet_for(Duration::from_secs(3)).await;
    assert_eq!(got.len(), 3, "two failures, then one success: {got:?}");
    assert!(got.iter().all(|r| r.delivery == got[0].delivery));
    assert!(got.iter().all(|r| r.body == got[0].body));
    wait_deliveries(&server, "failed", 2.0).await;
}

#[tokio::test]
async fn an_event_survives_a_sigkill_while_the_receiver_is_down() {
    // The receiver's port, not listening yet: every attempt is refused.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = hooked(Server::sqlite(&dir), addr).start();
    let doc = unique("survives");
    write(&server, &doc, "stored before the kill", None).await;
    // Killed at once: the change is in the database, not yet an event.
    server.kill();
    let server = server.start_again();
    let (receiver, _) = Receiver::start(addr, vec![]).await;
    let got = receiver.wait_for(1).await;
    assert_eq!(got[0].json()["doc"], doc.as_str());
    drop(server);
}

#[tokio::test]
async fn two_replicas_send_one_event_per_change() {
    let (receiver, addr) = Receiver::start("127.0.0.1:0".parse().unwrap(), vec![]).await;
    let db = fresh_postgres().await;
    let redis = shared_redis_url();
    let r1 = hooked(Server::replica(&db, &redis, "w1"), addr).start();
    let r2 = hooked(Server::replica(&db, &redis, "w2"), addr).start();
    let doc = unique("replicated");
    // Both replicas hold the document; the change is made on one.
    let mut on_r2 = Client::connect(&r2.ws_url(&doc)).await;
    let mut on_r1 = Client::connect(&r1.ws_url(&doc)).await;
    on_r1.insert("t", 0, "once").await;
    on_r2.wait_text("t", "once").await;
    receiver.wait_for(1).await;
    let got = receiver.quiet_for(Duration::from_secs(4)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].json()["doc"], doc.as_str());
}

#[tokio::test]
async fn a_replica_killed_holding_the_lease_is_taken_over() {
    let (receiver, addr) =
        Receiver::start("127.0.0.1:0".parse().unwrap(), vec![Answer::Hang]).await;
    let db = fresh_postgres().await;
    let redis = shared_redis_url();
    // Long enough that r1 is killed while its attempt is still open.
    let timeout = ["--webhook-timeout", "4s"];
    let mut r1 = hooked(Server::replica(&db, &redis, "l1"), addr)
        .args(timeout)
        .start();
    let doc = unique("leased");
    write(&r1, &doc, "x", None).await;
    // r1 holds the lease while the receiver sits on its request.
    let first = receiver.wait_for(1).await;
    r1.kill();
    let r2 = hooked(Server::replica(&db, &redis, "l2"), addr)
        .args(timeout)
        .start();
    // The lease (three timeouts) runs out and r2 sends it.
    let got = receiver.wait_for(2).await;
    assert_eq!(got[1].delivery, first[0].delivery);
    wait_deliveries(&r2, "delivered", 1.0).await;
}

#[test]
fn bad_webhook_configuration_stops_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_url(&dir);
    let (code, _, stderr) = concord(
        &["serve", "--bind", "127.0.0.1:0", "--database-url", &db],
        &[("CONCORD_WEBHOOK_URL", "http://127.0.0.1:9/hook")],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("--webhook-secret"), "{stderr}");
    let (code, _, stderr) = concord(
        &["serve", "--bind", "127.0.0.1:0", "--database-url", &db],
        &[
            ("CONCORD_WEBHOOK_URL", "not a url"),
            ("CONCORD_WEBHOOK_SECRET", SECRET),
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid --webhook-url"), "{stderr}");
    assert!(!stderr.contains(SECRET), "the secret reached the output");
}

#[tokio::test]
async fn a_restore_is_announced_with_the_version_it_recorded() {
    let (receiver, addr) = Receiver::start("127.0.0.1:0".parse().unwrap(), vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = hooked(Server::sqlite(&dir), addr)
        .env("CONCORD_JWT_SECRET", "jwt-secret-for-webhooks")
        .start();
    let doc = unique("hooked-restore");
    let http = reqwest::Client::new();
    let api = server.http(&format!("/api/docs/{doc}"));
    write(&server, &doc, "first", Some(&token("ada"))).await;
    let version: Value = http
        .post(format!("{api}/versions"))
        .bearer_auth(token("ada"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    write(&server, &doc, "second", Some(&token("ada"))).await;
    let restored = http
        .post(format!("{api}/restore"))
        .bearer_auth(token("grace"))
        .body(serde_json::json!({ "version": version["id"] }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(restored.status(), 200);
    let after: Value = restored.json().await.unwrap();
    // The restore's own change is announced too, as document.changed.
    let got = receiver.wait_for(2).await;
    let events: Vec<Value> = got.iter().map(Received::json).collect();
    let announced = events
        .iter()
        .find(|e| e["event"] == "document.restored")
        .unwrap_or_else(|| panic!("no document.restored in {events:?}"));
    assert_eq!(announced["doc"], doc.as_str());
    assert_eq!(announced["version"], after["id"]);
    assert!(announced["authors"]
        .as_array()
        .unwrap()
        .contains(&Value::from("grace")));
    for r in &got {
        assert_eq!(r.signature, expected_signature(&r.body));
    }
}
