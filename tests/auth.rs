//! Access control over WebSocket and HTTP: every token outcome, read-only
//! access, expiry while connected, and the `concord token` command.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-that-is-long-enough";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn grant(docs: Value) -> Value {
    json!({ "sub": "user-42", "exp": now() + 3600, "docs": docs })
}

fn secured(dir: &tempfile::TempDir) -> Server {
    Server::sqlite(dir)
        .env("CONCORD_JWT_SECRET", SECRET)
        .start()
}

fn with_token(url: &str, token: &str) -> String {
    format!("{url}?token={token}")
}

/// Connects and returns the close code the server sends straight away, or
/// `None` when the connection is accepted (the sync handshake completes).
async fn outcome(url: &str) -> Option<u16> {
    let mut c = Client::open(url, yrs::Doc::new()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let sv = state_vector(&c.doc);
    // The server may already have closed; a failed send shows up as the close below.
    use futures::SinkExt;
    let step1 = yrs::updates::encoder::Encode::encode_v1(&yrs::sync::Message::Sync(
        yrs::sync::SyncMessage::SyncStep1(sv),
    ));
    let _ =
        c.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
            step1.into(),
        ))
        .await;
    while c.step2s.is_empty() && c.closed.is_none() {
        tokio::time::timeout_at(deadline, c.pump_one())
            .await
            .expect("answer");
    }
    c.closed.map(|(code, _)| code)
}

#[tokio::test]
async fn websocket_token_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(&dir);
    let doc = unique("team-a/notes");
    let url = server.ws_url(&doc);
    let good = hs256(grant(json!({ "team-a/*": "write" })));

    assert_eq!(outcome(&url).await, Some(4401), "missing");
    assert_eq!(
        outcome(&with_token(&url, "not-a-jwt")).await,
        Some(4401),
        "malformed"
    );
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &grant(json!({ "*": "write" })),
        &EncodingKey::from_secret(b"some other secret"),
    )
    .unwrap();
    assert_eq!(
        outcome(&with_token(&url, &forged)).await,
        Some(4401),
        "badly signed"
    );
    assert_eq!(
        outcome(&with_token(&url, &alg_none(grant(json!({ "*": "write" }))))).await,
        Some(4401),
        "alg none"
    );
    let expired = hs256(json!({ "exp": now() - 120, "docs": { "*": "write" } }));
    assert_eq!(
        outcome(&with_token(&url, &expired)).await,
        Some(4401),
        "expired"
    );
    let early = hs256(json!({ "exp": now() + 3600, "nbf": now() + 600, "docs": { "*": "write" } }));
    assert_eq!(
        outcome(&with_token(&url, &early)).await,
        Some(4401),
        "not yet valid"
    );
    let no_exp = hs256(json!({ "docs": { "*": "write" } }));
    assert_eq!(
        outcome(&with_token(&url, &no_exp)).await,
        Some(4401),
        "exp is required"
    );
    let other = hs256(grant(json!({ "team-b/*": "write", "handbook": "read" })));
    assert_eq!(
        outcome(&with_token(&url, &other)).await,
        Some(4403),
        "other document"
    );

    assert_eq!(
        outcome(&with_token(&url, &good)).await,
        None,
        "prefix match"
    );
    let exact = hs256(grant(json!({ doc.clone(): "read" })));
    assert_eq!(
        outcome(&with_token(&url, &exact)).await,
        None,
        "exact match"
    );
    let star = hs256(grant(json!({ "*": "read" })));
    assert_eq!(outcome(&with_token(&url, &star)).await, None, "star");

    // Authorization: Bearer works too.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            url.as_str(),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {good}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    use futures::StreamExt;
    match ws.next().await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(_))) => {}
        other => panic!("bearer token refused: {other:?}"),
    }
}

fn alg_none(claims: Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .env("CONCORD_JWT_SECRET", SECRET)
        .env("CONCORD_JWT_AUDIENCE", "concord")
        .env("CONCORD_JWT_ISSUER", "https://id.example")
        .start();
    let url = server.ws_url(&unique("aud"));
    let mut claims = grant(json!({ "*": "write" }));
    assert_eq!(
        outcome(&with_token(&url, &hs256(claims.clone()))).await,
        Some(4401),
        "no aud/iss"
    );
    claims["aud"] = json!("concord");
    claims["iss"] = json!("https://elsewhere.example");
    assert_eq!(
        outcome(&with_token(&url, &hs256(claims.clone()))).await,
        Some(4401),
        "wrong iss"
    );
    claims["iss"] = json!("https://id.example");
    claims["aud"] = json!("other");
    assert_eq!(
        outcome(&with_token(&url, &hs256(claims.clone()))).await,
        Some(4401),
        "wrong aud"
    );
    claims["aud"] = json!("concord");
    assert_eq!(outcome(&with_token(&url, &hs256(claims))).await, None);
}

fn openssl(args: &[&str], dir: &Path) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test]
async fn rs256_and_es256_public_keys() {
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
        k,
    );
    openssl(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"], k);
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ],
        k,
    );
    openssl(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"], k);
    let claims = grant(json!({ "*": "write" }));

    let dir = tempfile::tempdir().unwrap();
    let rsa = Server::sqlite(&dir)
        .arg("--jwt-public-key")
        .arg(k.join("rsa.pub").display().to_string())
        .start();
    let url = rsa.ws_url(&unique("rsa"));
    let private = std::fs::read(k.join("rsa.pem")).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    assert_eq!(outcome(&with_token(&url, &token)).await, None, "RS256");
    // The classic confusion: HS256 "signed" with the public key as the secret.
    let public = std::fs::read(k.join("rsa.pub")).unwrap();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    assert_eq!(
        outcome(&with_token(&url, &confused)).await,
        Some(4401),
        "HS256 with the public key"
    );
    assert_eq!(
        outcome(&with_token(&url, &alg_none(claims.clone()))).await,
        Some(4401),
        "none"
    );

    let dir2 = tempfile::tempdir().unwrap();
    let ec = Server::sqlite(&dir2)
        .arg("--jwt-public-key")
        .arg(k.join("ec.pub").display().to_string())
        .start();
    let url = ec.ws_url(&unique("ec"));
    let private = std::fs::read(k.join("ec.pem")).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&private).unwrap(),
    )
    .unwrap();
    assert_eq!(outcome(&with_token(&url, &token)).await, None, "ES256");
}

#[tokio::test]
async fn read_only_edits_reach_no_one_but_presence_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(&dir);
    let doc = unique("handbook");
    let writer_token = hs256(grant(json!({ doc.clone(): "write" })));
    let reader_token = hs256(grant(json!({ "*": "read" })));
    let mut writer = Client::connect(&with_token(&server.ws_url(&doc), &writer_token)).await;
    let mut reader = Client::connect(&with_token(&server.ws_url(&doc), &reader_token)).await;
    writer.insert("t", 0, "official").await;
    reader.wait_text("t", "official").await;

    reader.insert("t", 0, "vandal ").await;
    reader.set_awareness(1, r#"{"user":"viewer"}"#).await;
    let reader_id = reader.client_id();
    // Presence crosses; the edit does not, and the reader stays connected.
    writer
        .pump_until(|c| c.awareness.get(&reader_id).is_some_and(Option::is_some))
        .await;
    assert_eq!(writer.text("t"), "official");
    assert!(reader.stays_open(Duration::from_millis(200)).await);

    let server = server.restart();
    let fresh = Client::connect(&with_token(&server.ws_url(&doc), &writer_token)).await;
    assert_eq!(fresh.text("t"), "official");
}

#[tokio::test]
async fn a_token_that_expires_while_connected_closes_with_4401() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(&dir);
    let doc = unique("expiring");
    let token = hs256(json!({ "exp": now() + 2, "docs": { "*": "write" } }));
    let mut c = Client::connect(&with_token(&server.ws_url(&doc), &token)).await;
    let (code, reason) = c.wait_close().await;
    assert_eq!((code, reason.as_str()), (4401, "token expired"));
}

#[tokio::test]
async fn http_api_auth() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured(&dir);
    let doc = unique("api");
    let path = format!("/api/docs/{}", percent_encode(&doc));
    let http = reqwest::Client::new();
    let update = {
        let d = yrs::Doc::new();
        let t = yrs::Doc::get_or_insert_text(&d, "t");
        yrs::Text::insert(&t, &mut yrs::Transact::transact_mut(&d), 0, "hi");
        let update = yrs::ReadTxn::encode_state_as_update_v1(
            &yrs::Transact::transact(&d),
            &yrs::StateVector::default(),
        );
        update
    };
    let post = |token: Option<String>| {
        let mut req = http
            .post(server.http(&format!("{path}/updates")))
            .body(update.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let resp = post(None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert!(body["error"].is_string());
    assert_eq!(post(Some("garbage".into())).await.unwrap().status(), 401);
    assert_eq!(
        post(Some(hs256(grant(json!({ "other": "write" })))))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        post(Some(hs256(grant(json!({ "*": "read" })))))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        post(Some(hs256(grant(json!({ "*": "write" })))))
            .await
            .unwrap()
            .status(),
        204
    );

    let get = |token: Option<String>| {
        let mut req = http.get(server.http(&path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(
        get(Some(hs256(grant(json!({ "x": "read" })))))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        get(Some(hs256(grant(json!({ "*": "read" })))))
            .await
            .unwrap()
            .status(),
        200
    );
    // Operator endpoints need no token.
    assert_eq!(
        reqwest::get(server.http("/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(server.http("/metrics"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn token_command_mints_tokens_the_server_accepts() {
    let (code, out, err) = concord(
        &[
            "token",
            "--doc",
            "team-a/*",
            "--doc",
            "handbook=read",
            "--sub",
            "ci",
            "--ttl",
            "15m",
        ],
        &[("CONCORD_JWT_SECRET", SECRET)],
    );
    assert_eq!(code, 0, "{err}");
    let token = out.trim().to_string();
    let dir = tempfile::tempdir().unwrap();
    let server = secured(&dir);
    let url = server.ws_url(&unique("team-a/doc"));
    assert_eq!(outcome(&with_token(&url, &token)).await, None);
    let hb = server.ws_url("handbook");
    assert_eq!(outcome(&with_token(&hb, &token)).await, None);
    let elsewhere = server.ws_url(&unique("team-b/doc"));
    assert_eq!(outcome(&with_token(&elsewhere, &token)).await, Some(4403));
    // A bad mode is a clear error.
    let (code, _, err) = concord(
        &["token", "--doc", "x=admin"],
        &[("CONCORD_JWT_SECRET", SECRET)],
    );
    assert_ne!(code, 0);
    assert!(err.contains("unknown mode"), "{err}");
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["serve", "--bind", "127.0.0.1:0", "--database-url"])
        .arg(sqlite_url(&dir))
        .env("CONCORD_JWT_SECRET", SECRET)
        .env("RUST_LOG", "trace,sqlx=warn,hyper=warn,h2=warn")
        .stdout(std::process::Stdio::piped())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("concord listening on ")
        .unwrap()
        .to_string();
    let token = hs256(grant(json!({ "*": "write" })));
    let url = format!("ws://{addr}/ws/{}?token={token}", unique("logs"));
    let c = Client::connect(&url).await;
    c.close().await;
    let bad = format!(
        "ws://{addr}/ws/x?token={}",
        hs256(grant(json!({ "y": "write" })))
    );
    let _ = outcome(&bad).await;
    let _ = reqwest::Client::new()
        .get(format!("http://{addr}/api/docs/x"))
        .bearer_auth(&token)
        .send()
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("connection closed"), "logs were written");
    let signature = token.rsplit('.').next().unwrap();
    assert!(!logs.contains(signature), "a token reached the logs");
    assert!(!logs.contains(SECRET), "the secret reached the logs");
}

#[tokio::test]
async fn hocuspocus_expiry_denies_that_document_and_the_socket_goes_on() {
    use common::hocuspocus::*;
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let dir = tempfile::tempdir().unwrap();
    let server = secured(&dir);
    let (short, long) = (unique("hp-expiring"), unique("hp-lasting"));
    let mut ws = open(&server).await;
    let expiring = hs256(json!({ "exp": now() + 2, "docs": { "*": "write" } }));
    let lasting = hs256(grant(json!({ "*": "write" })));
    for f in [auth(&short, &expiring), auth(&long, &lasting)] {
        ws.send(WsMessage::Binary(f.into())).await.unwrap();
    }
    // 2 = auth; 2 = authenticated, 1 = permission-denied, then the reason.
    assert_eq!(next_of(&mut ws, &short, AUTH).await[0], 2);
    assert_eq!(next_of(&mut ws, &long, AUTH).await[0], 2);
    let denied = next_of(&mut ws, &short, AUTH).await;
    assert_eq!(denied[0], 1, "permission-denied once the token expires");

    // The other document is still served on the same socket.
    ws.send(WsMessage::Binary(frame(&long, STATELESS, b"\x02hi").into()))
        .await
        .unwrap();
    ws.send(WsMessage::Binary(step1(&long).into()))
        .await
        .unwrap();
    let reply = next_of(&mut ws, &long, SYNC).await;
    assert_eq!(reply[0], 1, "a step 2 answers the step 1");
}
