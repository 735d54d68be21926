//! History against real servers on SQLite and PostgreSQL: who wrote each
//! update, versions kept as chains of changes and folded away past the
//! retention (named ones kept), restores racing compactions, and the
//! migration of a database written by the previous schema. The JavaScript
//! clients' side (authors, restores seen by editors, JSON) is
//! `tests/interop/history.test.mjs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::Connection;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, Text, Transact, Update};

const SECRET: &str = "history-test-secret";

fn token(sub: &str) -> String {
    let (code, out, err) = concord(
        &["token", "--doc", "*", "--sub", sub],
        &[("CONCORD_JWT_SECRET", SECRET)],
    );
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

/// An HTTP client for one document, as a backend would use the API.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(server: &Server, doc: &str) -> Self {
        Api {
            http: reqwest::Client::new(),
            base: server.http(&format!("/api/docs/{}", percent_encode(doc))),
        }
    }

    async fn write(&self, who: &str, update: Vec<u8>) {
        let resp = self
            .http
            .post(format!("{}/updates", self.base))
            .bearer_auth(who)
            .body(update)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
    }

    async fn version(&self, who: &str, name: Option<&str>) -> serde_json::Value {
        let resp = self
            .http
            .post(format!("{}/versions", self.base))
            .bearer_auth(who)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        resp.json().await.unwrap()
    }

    async fn versions(&self, who: &str) -> Vec<serde_json::Value> {
        let resp = self
            .http
            .get(format!("{}/versions", self.base))
            .bearer_auth(who)
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = resp.json().await.unwrap();
        body["versions"].as_array().cloned().unwrap_or_default()
    }

    async fn restore(&self, who: &str, id: &str) -> reqwest::StatusCode {
        self.http
            .post(format!("{}/restore", self.base))
            .bearer_auth(who)
            .json(&serde_json::json!({ "version": id }))
            .send()
            .await
            .unwrap()
            .status()
    }

    /// The text `t` of the document, now or at a version.
    async fn text(&self, who: &str, version: Option<&str>) -> String {
        self.try_text(who, version)
            .await
            .expect("the document is stored")
    }

    /// As [`Api::text`]; `None` while nothing is stored.
    async fn try_text(&self, who: &str, version: Option<&str>) -> Option<String> {
        let url = match version {
            Some(id) => format!("{}?version={id}", self.base),
            None => self.base.clone(),
        };
        let resp = self.http.get(url).bearer_auth(who).send().await.unwrap();
        if resp.status() == 404 {
            return None;
        }
        assert_eq!(resp.status(), 200);
        let doc = Doc::new();
        doc.transact_mut()
            .apply_update(Update::decode_v1(&resp.bytes().await.unwrap()).unwrap())
            .unwrap();
        Some(text_of(&doc, "t"))
    }
}

/// The update that inserts `chunk` at `index` of text `t` in `doc`.
fn edit(doc: &Doc, index: u32, chunk: &str) -> Vec<u8> {
    let before = doc.transact().state_vector();
    let text = doc.get_or_insert_text("t");
    text.insert(&mut doc.transact_mut(), index, chunk);
    doc.transact().encode_diff_v1(&before)
}

/// Text that lz4 cannot shrink much, so versions are worth chaining.
fn noise(len: usize) -> String {
    (0..len)
        .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
        .collect()
}

async fn server_with(db: String, args: &[&str]) -> Server {
    Server::builder(db)
        .args(["--auto-migrate", "true"])
        .args(args.iter().copied())
        .env("CONCORD_JWT_SECRET", SECRET)
        .start()
}

/// Rows of `sql` (one text column) in the server's database.
async fn column(db: &str, sql: &str) -> Vec<Option<String>> {
    if db.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(db).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap()
    } else {
        let mut conn = sqlx::SqliteConnection::connect(db).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap()
    }
}

/// Asks until `ready` holds; history's rounds are timers with no event to await.
async fn eventually<T>(
    what: &str,
    mut ask: impl AsyncFnMut() -> T,
    ready: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ask().await;
        if ready(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn authors_and_tracking(db: String) {
    let server = server_with(db.clone(), &["--version-idle", "1h"]).await;
    let doc = unique("history/authors");
    let api = Api::new(&server, &doc);
    let client = Doc::new();
    api.write(&token("ada"), edit(&client, 0, "a")).await;
    api.write(&token("bob"), edit(&client, 1, "b")).await;
    let sql = format!("SELECT author FROM document_updates WHERE doc = '{doc}' ORDER BY id");
    assert_eq!(
        column(&db, &sql).await,
        [Some("ada".to_string()), Some("bob".to_string())]
    );
    // The changes wait for the next version, which lists both authors once.
    let version = api.version(&token("carol"), None).await;
    assert_eq!(version["authors"], serde_json::json!(["ada", "bob"]));
    for table in ["history_changes", "history_authors"] {
        let pending = format!("SELECT doc FROM {table} WHERE doc = '{doc}'");
        assert!(
            column(&db, &pending).await.is_empty(),
            "{table} taken by the version"
        );
    }
}

#[tokio::test]
async fn each_update_keeps_its_author_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    authors_and_tracking(sqlite_url(&dir)).await;
}

#[tokio::test]
async fn each_update_keeps_its_author_on_postgres() {
    authors_and_tracking(fresh_postgres().await).await;
}

#[tokio::test]
async fn history_off_records_nothing_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_url(&dir);
    let server = server_with(db.clone(), &["--history-retention", "0"]).await;
    let doc = unique("history/off");
    let api = Api::new(&server, &doc);
    api.write(&token("ada"), edit(&Doc::new(), 0, "x")).await;
    // The append that answered wrote no record of changes, so no version
    // can ever be recorded for it automatically.
    let pending = format!("SELECT doc FROM history_changes WHERE doc = '{doc}'");
    assert!(column(&db, &pending).await.is_empty());
    // Asked for, a version is still recorded.
    let version = api.version(&token("ada"), Some("by hand")).await;
    assert_eq!(version["name"], "by hand");
}

async fn retention_keeps_named_and_every_version_reads(db: String) {
    let server = server_with(
        db.clone(),
        &["--history-retention", "3s", "--version-idle", "1h"],
    )
    .await;
    let doc = unique("history/retention");
    let api = Api::new(&server, &doc);
    let who = token("ada");
    let client = Doc::new();
    let mut expected = Vec::new();
    api.write(&who, edit(&client, 0, &noise(8_000))).await;
    let named = api.version(&who, Some("keep")).await;
    expected.push((
        named["id"].as_str().unwrap().to_string(),
        text_of(&client, "t"),
    ));
    for i in 0..3 {
        let len = client.get_or_insert_text("t").len(&client.transact());
        api.write(
            &who,
            edit(&client, len / 2, &format!("[{i}{}]", noise(200))),
        )
        .await;
        let version = api.version(&who, None).await;
        expected.push((
            version["id"].as_str().unwrap().to_string(),
            text_of(&client, "t"),
        ));
    }
    for (id, text) in &expected {
        assert_eq!(&api.text(&who, Some(id)).await, text);
    }
    // Versions after the first keep only their changes.
    let sql = format!(
        "SELECT CAST(parent AS TEXT) FROM document_versions WHERE doc = '{doc}' ORDER BY seq"
    );
    let parents = column(&db, &sql).await;
    assert!(
        parents[0].is_none() && parents[1..].iter().all(Option::is_some),
        "{parents:?}"
    );

    // Past the retention the unnamed ones go, except the newest (the base
    // of the next version); the named one stays, and both still read.
    let newest = expected.last().unwrap().0.clone();
    let left = eventually(
        "versions past the retention to go",
        async || api.versions(&who).await,
        |v| v.len() == 2,
    )
    .await;
    let ids: Vec<&str> = left.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [newest.as_str(), expected[0].0.as_str()]);
    assert_eq!(api.text(&who, Some(&newest)).await, expected[3].1);
    assert_eq!(api.text(&who, Some(&expected[0].0)).await, expected[0].1);
    assert_eq!(api.text(&who, None).await, expected[3].1);
}

#[tokio::test]
async fn retention_folds_old_versions_and_keeps_named_ones_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    retention_keeps_named_and_every_version_reads(sqlite_url(&dir)).await;
}

#[tokio::test]
async fn retention_folds_old_versions_and_keeps_named_ones_on_postgres() {
    retention_keeps_named_and_every_version_reads(fresh_postgres().await).await;
}

/// Restores while a client writes and every few updates fold the log into
/// the snapshot: whatever the interleaving, a cold load builds the document
/// a live client converges to, and every edit sent after the last restore
/// answered is in it.
#[tokio::test]
async fn a_restore_racing_compactions_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(sqlite_url(&dir), &["--compact-after-updates", "4"]).await;
    let doc = unique("history/race");
    let api = Api::new(&server, &doc);
    let who = token("ada");
    let url = format!("{}?token={who}", server.ws_url(&doc));
    let mut writer = Client::connect(&url).await;
    writer.insert("t", 0, "base").await;
    eventually(
        "the first edit to be stored",
        async || api.try_text(&who, None).await,
        |t| t.as_deref() == Some("base"),
    )
    .await;
    let v1 = api.version(&who, Some("base")).await;
    let v1 = v1["id"].as_str().unwrap().to_string();

    // The writer sends without reading: its edits race the restores.
    let restores = async {
        for _ in 0..5 {
            assert_eq!(api.restore(&who, &v1).await, 200);
        }
    };
    let writes = async {
        for i in 0..60 {
            let end = writer.text("t").len() as u32;
            writer.insert("t", end, &format!(" w{i}")).await;
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(restores, writes);
    let mut tail = String::new();
    for i in 0..20 {
        let end = writer.text("t").len() as u32;
        let chunk = format!(" tail{i}");
        writer.insert("t", end, &chunk).await;
        tail.push_str(&chunk);
    }
    let stored = eventually(
        "the tail to be stored",
        async || api.text(&who, None).await,
        |t| t.contains(&tail),
    )
    .await;
    let reader = Client::connect(&url).await;
    assert_eq!(
        reader.text("t"),
        stored,
        "a client syncing now sees what is stored"
    );
    assert!(
        server.metric("concord_compactions_total").await > 0.0,
        "the log was folded meanwhile"
    );
    drop((writer, reader));
    let server = server.restart();
    let api = Api::new(&server, &doc);
    assert_eq!(
        api.text(&who, None).await,
        stored,
        "a cold load builds the same document"
    );
}

/// A database written by the schema before history (migrations 1–3), then
/// `concord migrate`: every document and pending webhook change is still
/// there, and history works on it.
async fn migrates_from_the_previous_schema(db: String) {
    let old = tempfile::tempdir().unwrap();
    let kind = if db.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(kind);
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.as_str() < "0004" {
            std::fs::copy(&path, old.path().join(name)).unwrap();
        }
    }
    let previous = sqlx::migrate::Migrator::new(old.path()).await.unwrap();
    let client = Doc::new();
    let update = edit(&client, 0, "written before history existed");
    let doc = unique("history/migrated");
    if kind == "postgres" {
        let mut conn = sqlx::PgConnection::connect(&db).await.unwrap();
        previous.run(&mut conn).await.unwrap();
        sqlx::query("INSERT INTO document_updates (doc, data) VALUES ($1, $2)")
            .bind(&doc)
            .bind(&update)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO webhook_changes (doc, first_at, last_at, authors) VALUES ($1, 1, 1, '\n')",
        )
        .bind(&doc)
        .execute(&mut conn)
        .await
        .unwrap();
    } else {
        let options: sqlx::sqlite::SqliteConnectOptions = db
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        previous.run(&mut conn).await.unwrap();
        sqlx::query("INSERT INTO document_updates (doc, data) VALUES (?, ?)")
            .bind(&doc)
            .bind(&update)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO webhook_changes (doc, first_at, last_at, authors) VALUES (?, 1, 1, '\n')",
        )
        .bind(&doc)
        .execute(&mut conn)
        .await
        .unwrap();
    }

    let (code, out, err) = concord(&["migrate", "--database-url", &db], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("applied 4 history"),
        "names the migration applied: {out}"
    );
    let (code, _, _) = concord(&["migrate", "--check", "--database-url", &db], &[]);
    assert_eq!(code, 0, "nothing pending after");

    let sql = format!("SELECT doc FROM webhook_changes WHERE doc = '{doc}'");
    assert_eq!(
        column(&db, &sql).await.len(),
        1,
        "the pending webhook change survived"
    );
    let server = Server::builder(db.clone())
        .env("CONCORD_JWT_SECRET", SECRET)
        .start();
    let api = Api::new(&server, &doc);
    let who = token("ada");
    assert_eq!(api.text(&who, None).await, "written before history existed");
    api.write(&who, edit(&client, 0, "now: ")).await;
    let version = api.version(&who, None).await;
    assert_eq!(version["authors"], serde_json::json!(["ada"]));
    let id = version["id"].as_str().unwrap();
    assert_eq!(
        api.text(&who, Some(id)).await,
        "now: written before history existed"
    );
    let sql = format!("SELECT author FROM document_updates WHERE doc = '{doc}' ORDER BY id");
    assert_eq!(column(&db, &sql).await, [None, Some("ada".to_string())]);
}

#[tokio::test]
async fn migrates_a_sqlite_database_from_the_previous_schema() {
    let dir = tempfile::tempdir().unwrap();
    migrates_from_the_previous_schema(sqlite_url(&dir)).await;
}

#[tokio::test]
async fn migrates_a_postgres_database_from_the_previous_schema() {
    migrates_from_the_previous_schema(fresh_postgres().await).await;
}
