//! Durability on the embedded SQLite store: restarts, SIGKILL, shutdown.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn restart_on_the_same_file_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir).start();
    let doc = unique("restart");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    for i in 0..50 {
        a.insert("t", i, "x").await;
    }
    let expected = a.text("t");
    let server = server.restart();
    let b = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(b.text("t"), expected);
}

#[tokio::test]
async fn sigkill_keeps_edits_older_than_100ms() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::sqlite(&dir).start();
    let doc = unique("sigkill");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    for i in 0..200 {
        a.insert("t", i, "k").await;
    }
    let expected = a.text("t");
    // The contract: accepted updates are durable within 100 ms.
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.kill();
    let server = server.start_again();
    let b = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(b.text("t"), expected);
}

/// Writes through `server`, sends SIGTERM, and checks the contract: the
/// socket gets 1012, the process exits 0 within 10 s, and the write survives.
async fn sigterm_drains(mut server: Server, doc: &str) {
    let mut a = Client::connect(&server.ws_url(doc)).await;
    a.insert("t", 0, "last words").await;
    let mut b = Client::connect(&server.ws_url(doc)).await;
    b.wait_text("t", "last words").await;

    signal(&server.child, "TERM");
    let (code, _) = a.wait_close().await;
    assert_eq!(code, 1012);
    let status = wait_exit(&mut server.child, Duration::from_secs(10)).expect("exit within 10 s");
    assert!(status.success(), "exit status {status}");

    let server = server.start_again();
    let c = Client::connect(&server.ws_url(doc)).await;
    assert_eq!(c.text("t"), "last words");
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1012_flushes_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    sigterm_drains(Server::sqlite(&dir).start(), &unique("shutdown")).await;
}

#[tokio::test]
async fn sigterm_works_with_stderr_closed() {
    let dir = tempfile::tempdir().unwrap();
    // Every log line then fails to write; none of them may stop the drain.
    let server = Server::sqlite(&dir)
        .env("RUST_LOG", "debug")
        .closed_stderr()
        .start();
    sigterm_drains(server, &unique("no-stderr")).await;
}

#[tokio::test]
async fn compaction_folds_the_log_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::sqlite(&dir)
        .arg("--compact-after-updates")
        .arg("50")
        .start();
    let doc = unique("compact");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    for i in 0..400 {
        a.insert("t", i, "c").await;
    }
    let expected = a.text("t");
    server
        .wait_metric("concord_compactions_total", |v| v >= 1.0)
        .await;
    let server = server.restart();
    let b = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(b.text("t"), expected);
    // The log really was folded: fewer rows than updates remain.
    let pool = sqlx::SqlitePool::connect(&sqlite_url(&dir)).await.unwrap();
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM document_updates WHERE doc = ?")
        .bind(&doc)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(rows < 400, "{rows} log rows left");
}

#[tokio::test]
async fn health_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::sqlite(&dir).start();
    let ok = reqwest::get(server.http("/healthz")).await.unwrap();
    assert_eq!(ok.status(), 200);
    let ready = reqwest::get(server.http("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    // While draining, readiness is 503. A client that never reads holds the
    // drain open for up to a second (the server waits that long for its close reply).
    let doc = unique("drain");
    let _silent = Client::open(&server.ws_url(&doc), yrs::Doc::new())
        .await
        .unwrap();
    signal(&server.child, "TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match reqwest::get(server.http("/readyz")).await {
            Ok(resp) if resp.status() == 503 => {
                let body = resp.text().await.unwrap();
                assert!(body.contains("draining"), "{body}");
                break;
            }
            Ok(resp) => assert_eq!(resp.status(), 200),
            Err(e) => panic!("listener closed before readiness turned 503: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = wait_exit(&mut server.child, Duration::from_secs(10)).expect("exit within 10 s");
    assert!(status.success());
}

/// Updates past one group commit's byte limit go into the next commit; none is dropped.
#[tokio::test]
async fn group_commit_splits_large_batches_without_dropping_any() {
    use concord::store::committer::{Committer, CompactionPolicy, Hooks, Settings};
    use concord::store::{self, NewUpdate};
    use std::sync::Arc;
    use yrs::{Doc, ReadTxn, Text, Transact};

    let dir = tempfile::tempdir().unwrap();
    let store = store::open(&sqlite_url(&dir)).await.unwrap();
    store.migrate().await.unwrap();
    let (committer, _task) = Committer::spawn(
        store.clone(),
        Hooks::none(),
        Settings {
            compaction: CompactionPolicy {
                max_entries: u64::MAX,
                max_bytes: u64::MAX,
            },
            budget: usize::MAX / 2,
            interval: std::time::Duration::ZERO,
        },
    );
    let doc: Arc<str> = unique("big-batches").into();
    let ydoc = Doc::new();
    let text = ydoc.get_or_insert_text("t");
    // Five 7 MiB updates queued at once exceed the 16 MiB per-commit limit twice.
    for i in 0..5u32 {
        let before = ydoc.transact().state_vector();
        text.insert(&mut ydoc.transact_mut(), 0, &i.to_string().repeat(7 << 20));
        let data = bytes::Bytes::from(ydoc.transact().encode_diff_v1(&before));
        committer.reserve(data.len()).unwrap().submit(
            NewUpdate {
                doc: doc.clone(),
                data,
                user: None,
            },
            None,
        );
    }
    committer.flush().await;
    let stored = store.load(&doc).await.unwrap();
    assert_eq!(stored.updates.len(), 5);
}

/// With `--log-format json` a log shipper parses every line of both streams:
/// start, a connection opened and closed, a shutdown.
#[tokio::test]
async fn json_logs_are_json_on_stdout_and_stderr() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["serve", "--bind", "127.0.0.1:0", "--log-format", "json"])
        .arg("--database-url")
        .arg(sqlite_url(&dir))
        .env_remove("CONCORD_JWT_SECRET")
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(&str, String)>();
    for (name, stream) in [
        (
            "stdout",
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        ("stderr", Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send((name, line));
            }
        });
    }
    drop(tx);
    let mut lines = Vec::new();
    let addr = loop {
        let (stream, line) = rx.recv_timeout(WAIT).expect("a listening event");
        let event: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{stream} line is not JSON ({e}): {line}"));
        lines.push((stream, line));
        if event["message"] == "concord listening" {
            break event["addr"].as_str().expect("addr field").to_string();
        }
    };
    let url = format!("ws://{addr}/ws/{}", unique("json-logs"));
    let mut client = Client::connect(&url).await;
    client.insert("t", 0, "x").await;
    client.close().await;
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exit within 10 s");
    assert!(status.success());
    lines.extend(rx.iter());
    for (stream, line) in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "{stream} line is not JSON: {line}"
        );
    }
    let all = lines
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for event in ["connection opened", "connection closed", "shut down"] {
        assert!(all.contains(event), "no {event:?} event in:\n{all}");
    }
}
