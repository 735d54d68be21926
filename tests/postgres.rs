//! The Postgres store against the machine's PostgreSQL: each test gets a
//! fresh database. Fails, never skips, when PostgreSQL is not there.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use concord::store::{self, NewUpdate, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use yrs::{Doc, GetString, ReadTxn, Text, Transact};

async fn migrated_postgres() -> String {
    let url = fresh_postgres().await;
    let (code, out, err) = concord(&["migrate", "--database-url", &url], &[]);
    assert_eq!(code, 0, "{out}{err}");
    url
}

#[tokio::test]
async fn migrate_applies_reports_and_checks() {
    let url = fresh_postgres().await;
    let (code, out, _) = concord(&["migrate", "--check", "--database-url", &url], &[]);
    assert_eq!(code, 1, "pending migrations make --check exit 1: {out}");
    assert!(out.contains("pending 1"), "{out}");

    let (code, out, err) = concord(&["migrate"], &[("DATABASE_URL", url.as_str())]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied 1 documents"), "{out}");

    let (code, out, _) = concord(&["migrate", "--database-url", &url], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("no pending migrations"), "{out}");

    let (code, _, _) = concord(&["migrate", "--check", "--database-url", &url], &[]);
    assert_eq!(code, 0);
}

#[tokio::test]
async fn migrate_fails_clearly_when_the_database_is_unreachable() {
    let port = free_port();
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/nowhere");
    let (code, out, err) = concord(&["migrate", "--database-url", &url], &[]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("cannot reach the database"), "{err}");
    assert!(!err.contains("hunter2"), "password leaked: {err}");
}

#[tokio::test]
async fn serve_refuses_pending_migrations_and_names_the_command() {
    let url = fresh_postgres().await;
    let (code, _, err) = concord(
        &["serve", "--bind", "127.0.0.1:0", "--database-url", &url],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("concord migrate"), "{err}");
    // With auto-migrate on, the same database serves.
    let server = Server::builder(url)
        .arg("--auto-migrate")
        .arg("true")
        .start();
    Client::connect(&server.ws_url(&unique("auto"))).await;
}

#[tokio::test]
async fn round_trip_restart_and_sigkill_keep_everything() {
    let url = migrated_postgres().await;
    let mut server = Server::builder(url).start();
    let doc = unique("pg/notes");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;
    a.insert("t", 0, "hello").await;
    b.wait_text("t", "hello").await;

    let server2 = server.restart();
    let mut a = Client::connect(&server2.ws_url(&doc)).await;
    assert_eq!(a.text("t"), "hello");
    for i in 0..100 {
        a.insert("t", 5 + i, "!").await;
    }
    let expected = a.text("t");
    tokio::time::sleep(Duration::from_millis(150)).await;
    server = server2;
    server.kill();
    let server = server.start_again();
    let c = Client::connect(&server.ws_url(&doc)).await;
    assert_eq!(c.text("t"), expected);
}

/// Two writers append while two compactors fold, in random interleavings;
/// every update must survive in the loaded document.
#[test]
fn compaction_under_concurrent_appends_loses_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(migrated_postgres());
    let stores: Vec<Arc<dyn Store>> = rt.block_on(async {
        vec![
            store::open(&url).await.unwrap(),
            store::open(&url).await.unwrap(),
        ]
    });
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 24,
        ..Default::default()
    });
    let strategy = (
        proptest::collection::vec(0u64..3, 20..60),
        proptest::collection::vec(0u64..3, 20..60),
        proptest::collection::vec(0u64..4, 4..12),
    );
    runner
        .run(&strategy, |(pauses_a, pauses_b, compactions)| {
            rt.block_on(interleave(&stores, pauses_a, pauses_b, compactions));
            Ok(())
        })
        .unwrap();
}

async fn interleave(stores: &[Arc<dyn Store>], a: Vec<u64>, b: Vec<u64>, compactions: Vec<u64>) {
    let doc: Arc<str> = unique("prop").into();
    let writer = |store: Arc<dyn Store>, pauses: Vec<u64>, name: &'static str| {
        let doc = doc.clone();
        tokio::spawn(async move {
            let ydoc = Doc::new();
            let text = ydoc.get_or_insert_text(name);
            for (i, pause) in pauses.iter().enumerate() {
                let before = ydoc.transact().state_vector();
                text.insert(&mut ydoc.transact_mut(), i as u32, "x");
                let update = ydoc.transact().encode_diff_v1(&before);
                store
                    .append(&[NewUpdate {
                        doc: doc.clone(),
                        data: Bytes::from(update),
                        user: None,
                    }])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(*pause)).await;
            }
            pauses.len()
        })
    };
    let wa = writer(stores[0].clone(), a, "a");
    let wb = writer(stores[1].clone(), b, "b");
    let compactors: Vec<_> = stores
        .iter()
        .map(|store| {
            let store = store.clone();
            let doc = doc.clone();
            let pauses = compactions.clone();
            tokio::spawn(async move {
                for pause in pauses {
                    tokio::time::sleep(Duration::from_millis(pause * 3)).await;
                    store.compact(&doc).await.unwrap();
                }
            })
        })
        .collect();
    let (na, nb) = (wa.await.unwrap(), wb.await.unwrap());
    for c in compactors {
        c.await.unwrap();
    }
    let stored = stores[0].load(&doc).await.unwrap();
    let ydoc = Doc::new();
    concord::doc::apply_stored(&ydoc, &stored).unwrap();
    // Root types first: get_or_insert_* takes a write transaction.
    let (ta, tb) = (ydoc.get_or_insert_text("a"), ydoc.get_or_insert_text("b"));
    let txn = ydoc.transact();
    assert_eq!(ta.get_string(&txn).len(), na);
    assert_eq!(tb.get_string(&txn).len(), nb);
}

/// A TCP proxy in front of PostgreSQL that the test can cut and restore.
struct Proxy {
    port: u16,
    cut: std::sync::Mutex<CancellationToken>,
    /// The accept loop; it owns the listener.
    accepting: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    async fn start() -> Arc<Proxy> {
        let proxy = Arc::new(Proxy {
            port: free_port(),
            cut: std::sync::Mutex::new(CancellationToken::new()),
            accepting: std::sync::Mutex::new(None),
        });
        proxy.clone().listen().await;
        proxy
    }

    async fn listen(self: Arc<Self>) {
        // The port is free again only once the previous accept loop has
        // dropped its listener.
        let previous = self.accepting.lock().unwrap().take();
        if let Some(previous) = previous {
            previous.await.unwrap();
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let cut = self.cut.lock().unwrap().clone();
        let accepting = tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    // Dropping the listener refuses new connections.
                    _ = cut.cancelled() => return,
                };
                let cut = cut.clone();
                tokio::spawn(async move {
                    let mut upstream = tokio::net::TcpStream::connect("127.0.0.1:5432")
                        .await
                        .unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        *self.accepting.lock().unwrap() = Some(accepting);
    }

    fn cut(&self) {
        self.cut.lock().unwrap().cancel();
    }

    async fn restore(self: &Arc<Self>) {
        *self.cut.lock().unwrap() = CancellationToken::new();
        self.clone().listen().await;
    }

    fn url(&self, database_url: &str) -> String {
        database_url.replace(":5432/", &format!(":{}/", self.port))
    }
}

async fn readyz(server: &Server) -> u16 {
    reqwest::get(server.http("/readyz"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_ready(server: &Server, want: u16) {
    let deadline = std::time::Instant::now() + WAIT;
    while readyz(server).await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// The proxy runs on the test's runtime while the harness blocks on the server's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_queues_updates_and_loses_nothing() {
    let url = migrated_postgres().await;
    let proxy = Proxy::start().await;
    let server = Server::builder(proxy.url(&url)).start();
    let doc = unique("outage");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    let mut b = Client::connect(&server.ws_url(&doc)).await;
    a.insert("t", 0, "before ").await;
    b.wait_text("t", "before ").await;
    assert_eq!(readyz(&server).await, 200);

    proxy.cut();
    // Editing goes on: clients still see each other.
    for i in 0..20 {
        a.insert("t", 7 + i, "o").await;
    }
    b.wait_text("t", &format!("before {}", "o".repeat(20)))
        .await;
    wait_ready(&server, 503).await;
    let body = reqwest::get(server.http("/readyz"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("database"), "{body}");

    proxy.restore().await;
    wait_ready(&server, 200).await;
    // Everything arrives in the database (the queued batch is retried with
    // backoff): read it directly, waiting a bounded time.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let want = format!("before {}", "o".repeat(20));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let rows: Vec<(Vec<u8>,)> =
            sqlx::query_as("SELECT data FROM document_updates WHERE doc = $1")
                .bind(&doc)
                .fetch_all(&pool)
                .await
                .unwrap();
        let stored = Doc::new();
        let log = store::StoredDoc {
            snapshot: None,
            updates: rows.into_iter().map(|(d,)| d).collect(),
        };
        concord::doc::apply_stored(&stored, &log).unwrap();
        if text_of(&stored, "t") == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stored: {:?}",
            text_of(&stored, "t")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_past_the_memory_budget_refuses_writes_with_1013() {
    let url = migrated_postgres().await;
    let proxy = Proxy::start().await;
    let server = Server::builder(proxy.url(&url))
        .arg("--persist-budget-bytes")
        .arg("20000")
        .start();
    let doc = unique("budget");
    let mut a = Client::connect(&server.ws_url(&doc)).await;
    let mut reader = Client::connect(&server.ws_url(&doc)).await;
    a.insert("t", 0, "ok").await;
    reader.wait_text("t", "ok").await;
    proxy.cut();
    let chunk = "z".repeat(4000);
    for i in 0..10 {
        a.insert("t", 2 + i * 4000, &chunk).await;
    }
    let (code, reason) = a.wait_close().await;
    assert_eq!(code, 1013, "{reason}");
    // What was accepted before the budget ran out is stored once the database
    // is back, and is exactly what the other client saw; the refused rest was
    // applied nowhere (the writer still holds it and re-sends it on reconnect).
    proxy.restore().await;
    wait_ready(&server, 200).await;
    let fresh = Client::connect(&server.ws_url(&doc)).await;
    let stored = fresh.text("t");
    assert!(
        stored.starts_with("ok") && stored.len() < a.text("t").len(),
        "{}",
        stored.len()
    );
    reader.wait_text("t", &stored).await;
    assert!(reader.stays_open(Duration::from_millis(100)).await);
}

/// An append whose tracking fits one statement (history alone, or webhooks
/// with one author per document) goes as one chained statement; two authors
/// of one document with webhooks need the transaction of one query per
/// statement. Both must record the same rows.
#[tokio::test]
async fn appends_record_history_and_webhook_changes_in_either_form() {
    let url = migrated_postgres().await;
    let store = store::open(&url).await.unwrap();
    let (a, b): (Arc<str>, Arc<str>) = (unique("track-a").into(), unique("track-b").into());
    let update = |doc: &Arc<str>, user: &str| NewUpdate {
        doc: doc.clone(),
        data: Bytes::from_static(&[0, 0]),
        user: Some(user.into()),
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let rows = |sql: &'static str, doc: Arc<str>| {
        let pool = pool.clone();
        async move {
            let mut got: Vec<String> = sqlx::query_scalar(sql)
                .bind(&*doc)
                .fetch_all(&pool)
                .await
                .unwrap();
            got.sort();
            got
        }
    };
    const AUTHORS: &str = "SELECT author FROM history_authors WHERE doc = $1";
    const CHANGED: &str = "SELECT doc FROM history_changes WHERE doc = $1";
    const LOGGED: &str = "SELECT author FROM document_updates WHERE doc = $1";

    // History alone: chained.
    store.versions().unwrap().track_changes();
    store
        .append(&[update(&a, "ada"), update(&a, "bob"), update(&b, "ada")])
        .await
        .unwrap();
    assert_eq!(rows(AUTHORS, a.clone()).await, ["ada", "bob"]);
    assert_eq!(rows(AUTHORS, b.clone()).await, ["ada"]);
    assert_eq!(rows(CHANGED, b.clone()).await, [&*b]);
    assert_eq!(rows(LOGGED, a.clone()).await, ["ada", "bob"]);

    // Webhooks too, two authors of `a` in one batch: one query per statement.
    store.outbox().unwrap().track_changes();
    store
        .append(&[update(&a, "carol"), update(&a, "dan"), update(&b, "erin")])
        .await
        .unwrap();
    webhooks_track(&pool, &a, &["carol", "dan"]).await;
    assert_eq!(
        rows(AUTHORS, a.clone()).await,
        ["ada", "bob", "carol", "dan"]
    );

    // Webhooks with one author per document: chained again, and the change
    // rows already there are updated, not duplicated.
    store
        .append(&[update(&a, "fay"), update(&b, "erin")])
        .await
        .unwrap();
    webhooks_track(&pool, &a, &["fay", "dan"]).await;
    assert_eq!(rows(AUTHORS, b.clone()).await, ["ada", "erin"]);
    assert_eq!(rows(LOGGED, b.clone()).await, ["ada", "erin", "erin"]);
    assert_eq!(rows(CHANGED, a.clone()).await, [&*a]);
    store.close().await;
}

/// Asserts that webhooks track each of `authors` in `doc`'s pending change.
async fn webhooks_track(pool: &sqlx::PgPool, doc: &str, authors: &[&str]) {
    let tracked: String = sqlx::query_scalar("SELECT authors FROM webhook_changes WHERE doc = $1")
        .bind(doc)
        .fetch_one(pool)
        .await
        .unwrap();
    for author in authors {
        assert!(
            tracked.contains(&format!("\"{author}\"")),
            "{author} in {tracked:?}"
        );
    }
}
