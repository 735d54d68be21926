//! Embedded SQLite store: the zero-setup default for a single node.
//!
//! WAL with `synchronous=FULL`, so a commit survives the process being killed
//! (and power loss). SQLite has one writer at a time; appends and compactions
//! take the write lock up front (`BEGIN IMMEDIATE`) and wait on `busy_timeout`.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

use super::append_sql::{self, Dialect, Script};
use super::{
    history_sql, outbox_sql, pack_snapshot, pending_versions, unpack_snapshot, Folded, NewUpdate,
    Store, StoreError, StoredDoc, Track, Tracking,
};
use crate::history::versions::Versions;
use crate::webhooks::outbox::{
    change_rows, now_ms, parse_authors, Delivery, DeliveryRow, MakeEvent, Outbox,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteStore {
    /// Loads, compactions, migrations.
    pool: SqlitePool,
    options: SqliteConnectOptions,
    /// The group commit's own connection, outside the pool: every statement
    /// is a round trip to the connection's worker thread, and a pooled one
    /// also costs a task to give it back. Nothing else writes as often.
    appender: tokio::sync::Mutex<Option<SqliteConnection>>,
    /// What appends record besides the updates.
    tracking: Tracking,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            // Rows come back from the connection's worker thread through a
            // bounded channel; at the default 50, a compaction reading a
            // thousand rows switched threads forty times.
            .row_buffer_size(4096);
        // A connection to a local file cannot go away: pinging it each time
        // it is taken is only a round trip to its worker thread.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        Ok(Self {
            pool,
            options,
            appender: tokio::sync::Mutex::new(None),
            tracking: Tracking::default(),
        })
    }

    async fn applied(&self) -> Result<Vec<i64>, StoreError> {
        let exists: Option<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&self.pool)
        .await?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64,)> =
            sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success = 1")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(v,)| v).collect())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self, doc: &str) -> Result<StoredDoc, StoreError> {
        // One read transaction, so the snapshot and the log are from one instant.
        let mut txn = self.pool.begin().await?;
        let snapshot: Option<(Vec<u8>, Option<String>)> =
            sqlx::query_as("SELECT data, compression FROM document_snapshots WHERE doc = ?")
                .bind(doc)
                .fetch_optional(&mut *txn)
                .await?;
        let updates: Vec<(Vec<u8>,)> =
            sqlx::query_as("SELECT data FROM document_updates WHERE doc = ? ORDER BY id")
                .bind(doc)
                .fetch_all(&mut *txn)
                .await?;
        txn.commit().await?;
        Ok(StoredDoc {
            snapshot: snapshot.map(|(d, c)| unpack_snapshot(d, c)).transpose()?,
            updates: updates.into_iter().map(|(d,)| d).collect(),
        })
    }

    async fn append(&self, batch: &[NewUpdate]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut appender = self.appender.lock().await;
        let conn = match &mut *appender {
            Some(conn) => conn,
            None => appender.insert(SqliteConnection::connect_with(&self.options).await?),
        };
        let track = self.tracking.now();
        let appended = append_on(conn, batch, track).await;
        if appended.is_err() {
            // The next commit opens another.
            *appender = None;
        }
        appended
    }

    async fn compact(&self, doc: &str) -> Result<Folded, StoreError> {
        let mut txn = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let snapshot: Option<(Vec<u8>, Option<String>)> =
            sqlx::query_as("SELECT data, compression FROM document_snapshots WHERE doc = ?")
                .bind(doc)
                .fetch_optional(&mut *txn)
                .await?;
        let rows = sqlx::query("SELECT id, data FROM document_updates WHERE doc = ? ORDER BY id")
            .bind(doc)
            .fetch_all(&mut *txn)
            .await?;
        if rows.is_empty() {
            return Ok(Folded::default());
        }
        let max_id: i64 = rows.last().map(|r| r.get(0)).unwrap_or_default();
        let updates: Vec<Vec<u8>> = rows.iter().map(|r| r.get(1)).collect();
        let snapshot = snapshot.map(|(d, c)| unpack_snapshot(d, c)).transpose()?;
        let state = crate::doc::fold(snapshot.as_deref(), &updates)?;
        let snapshot_bytes = state.len() as u64;
        let (folded, compression) = pack_snapshot(&state);
        sqlx::query(
            "INSERT INTO document_snapshots (doc, data, compression) VALUES (?, ?, ?)
             ON CONFLICT (doc) DO UPDATE
             SET data = excluded.data, compression = excluded.compression, updated_at = unixepoch()",
        )
        .bind(doc)
        .bind(folded)
        .bind(compression)
        .execute(&mut *txn)
        .await?;
        // The write lock is held since BEGIN IMMEDIATE, so the rows up to max_id
        // are exactly the ones read above.
        sqlx::query("DELETE FROM document_updates WHERE doc = ? AND id <= ?")
            .bind(doc)
            .bind(max_id)
            .execute(&mut *txn)
            .await?;
        txn.commit().await?;
        Ok(Folded {
            rows: rows.len() as u64,
            snapshot_bytes,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let applied = self.applied().await?;
        Ok(pending_versions(&MIGRATOR, &applied)
            .into_iter()
            .map(|(v, _)| v)
            .collect())
    }

    async fn migrate(&self) -> Result<Vec<(i64, String)>, StoreError> {
        let pending = pending_versions(&MIGRATOR, &self.applied().await?);
        MIGRATOR.run(&self.pool).await?;
        Ok(pending)
    }

    async fn close(&self) {
        if let Some(conn) = self.appender.lock().await.take() {
            let _ = conn.close().await;
        }
        self.pool.close().await;
    }

    fn outbox(&self) -> Option<&dyn Outbox> {
        Some(self)
    }

    fn versions(&self) -> Option<&dyn Versions> {
        Some(self)
    }
}

history_sql::impl_versions!(SqliteStore, Sqlite);

/// How an append reads on SQLite: inside the transaction a failed statement
/// ends the transaction itself (see `Dialect::or_rollback`).
const DIALECT: Dialect = Dialect {
    or_rollback: Some(" OR ROLLBACK"),
    // The limit is 32766 bound parameters.
    created_at: true,
    rows_per_insert: 4096,
    contains: "instr",
};

/// An append is one query, so one hand-off to the connection's thread: a
/// batch that fits one statement commits on its own, atomically; otherwise
/// the statements run between `BEGIN IMMEDIATE` and `COMMIT` in the same
/// query (a larger batch, or changes webhooks and history must hear of).
async fn append_on(
    conn: &mut SqliteConnection,
    batch: &[NewUpdate],
    track: Track,
) -> Result<(), StoreError> {
    let now = now_ms();
    if let Some(mut query) = append_sql::lone_insert(&DIALECT, batch, track, now) {
        query.build().execute(&mut *conn).await?;
        return Ok(());
    }
    let changes = match track.webhooks {
        true => change_rows(batch),
        false => Vec::new(),
    };
    let mut script = Script::One(QueryBuilder::new("BEGIN IMMEDIATE"));
    append_sql::append(&mut script, &DIALECT, batch, &changes, track, now);
    let Script::One(mut query) = script else {
        unreachable!("built as one query")
    };
    query.push("; COMMIT");
    // A statement that fails can leave the transaction open: `append` drops
    // the connection on any error, which rolls it back.
    query.build().execute(&mut *conn).await?;
    Ok(())
}

#[async_trait]
impl Outbox for SqliteStore {
    fn track_changes(&self) {
        self.tracking.webhooks.store(true, Ordering::Relaxed);
    }

    async fn promote(
        &self,
        now: i64,
        quiet_since: i64,
        first_before: i64,
        urls: &[String],
        make: MakeEvent<'_>,
    ) -> Result<usize, StoreError> {
        const DUE: &str =
            "SELECT doc, authors FROM webhook_changes WHERE last_at <= ? OR first_at <= ?";
        // Looking is a read; the write lock is taken only when something is due.
        let any: Option<(String, String)> = sqlx::query_as(DUE)
            .bind(quiet_since)
            .bind(first_before)
            .fetch_optional(&self.pool)
            .await?;
        if any.is_none() {
            return Ok(0);
        }
        let mut txn = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let due: Vec<(String, String)> = sqlx::query_as(DUE)
            .bind(quiet_since)
            .bind(first_before)
            .fetch_all(&mut *txn)
            .await?;
        for (doc, authors) in &due {
            let (id, body) = make(doc, parse_authors(authors));
            if !urls.is_empty() {
                outbox_sql::insert_deliveries::<Sqlite>(&id, &body, urls, now)
                    .build()
                    .execute(&mut *txn)
                    .await?;
            }
            outbox_sql::forget_change::<Sqlite>(doc)
                .build()
                .execute(&mut *txn)
                .await?;
        }
        txn.commit().await?;
        Ok(due.len())
    }

    async fn claim(
        &self,
        now: i64,
        lease_until: i64,
        replica: &str,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "UPDATE webhook_deliveries SET lease_until = ?1, leased_by = ?2
             WHERE seq IN (SELECT seq FROM webhook_deliveries
                           WHERE due_at <= ?3 AND lease_until <= ?3 ORDER BY due_at LIMIT ?4)
             RETURNING seq, id, url, body, attempts, created_at",
        )
        .bind(lease_until)
        .bind(replica)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Delivery::from).collect())
    }

    async fn enqueue(
        &self,
        id: &str,
        body: &str,
        urls: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        outbox_sql::insert_deliveries::<Sqlite>(id, body, urls, now)
            .build()
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn finish(&self, seq: i64) -> Result<(), StoreError> {
        outbox_sql::finish::<Sqlite>(seq)
            .build()
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn retry(&self, seq: i64, due_at: i64) -> Result<(), StoreError> {
        outbox_sql::retry::<Sqlite>(seq, due_at)
            .build()
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release(&self, replica: &str) -> Result<(), StoreError> {
        outbox_sql::release::<Sqlite>(replica)
            .build()
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn backlog(&self) -> Result<(i64, Option<i64>), StoreError> {
        Ok(sqlx::query_as(outbox_sql::BACKLOG)
            .fetch_one(&self.pool)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::versions::Versions;

    fn update(doc: &str, user: &str) -> NewUpdate {
        NewUpdate {
            doc: doc.into(),
            data: bytes::Bytes::from_static(b"\x00\x00"),
            user: Some(user.into()),
        }
    }

    /// An append and what it tracks are one query: when a statement in it
    /// fails, none of it is kept, and the next append starts clean.
    #[tokio::test]
    async fn a_tracked_append_that_fails_half_way_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        Versions::track_changes(&store);
        sqlx::query("ALTER TABLE history_authors RENAME TO away")
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(store.append(&[update("d", "u")]).await.is_err());
        let count = |table: &'static str| {
            let pool = store.pool.clone();
            async move {
                let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                n
            }
        };
        assert_eq!(count("document_updates").await, 0);
        assert_eq!(count("history_changes").await, 0);
        sqlx::query("ALTER TABLE away RENAME TO history_authors")
            .execute(&store.pool)
            .await
            .unwrap();
        store.append(&[update("d", "u")]).await.unwrap();
        assert_eq!(count("document_updates").await, 1);
        assert_eq!(count("history_changes").await, 1);
        assert_eq!(count("history_authors").await, 1);
    }
}
