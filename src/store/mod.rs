//! Persistence: a document is a snapshot plus a log of updates appended after it.
//!
//! [`Store`] is the database boundary (SQLite or Postgres); [`committer`] sits
//! in front of it and turns single accepted updates into group commits.
//!
//! Compaction folds exactly the log rows it read into the snapshot and deletes
//! exactly those rows, in one transaction holding the document's snapshot row
//! lock, so rows appended meanwhile (by this or another replica) survive and a
//! load — snapshot plus every remaining row — never misses an update.

mod append_sql;
pub mod committer;
mod history_sql;
mod outbox_sql;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

/// What the database holds for one document.
#[derive(Debug, Default)]
pub struct StoredDoc {
    pub snapshot: Option<Vec<u8>>,
    pub updates: Vec<Vec<u8>>,
}

impl StoredDoc {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.updates.is_empty()
    }

    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.len() as u64)
    }

    pub fn log_bytes(&self) -> u64 {
        self.updates.iter().map(|u| u.len() as u64).sum()
    }
}

/// What a compaction did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Folded {
    /// Log rows folded into the snapshot.
    pub rows: u64,
    /// The snapshot's size now, as a Yjs update (before compression).
    pub snapshot_bytes: u64,
}

/// One update to append to a document's log.
#[derive(Debug, Clone)]
pub struct NewUpdate {
    pub doc: Arc<str>,
    pub data: bytes::Bytes,
    /// Who sent it (the token's `sub`).
    pub user: Option<Arc<str>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "the database has pending migrations ({0}); run `concord migrate` (or start with --auto-migrate)"
    )]
    PendingMigrations(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Snapshot and the log rows not folded into it, in append order.
    async fn load(&self, doc: &str) -> Result<StoredDoc, StoreError>;

    /// Appends every update in one transaction: all are durable when this returns Ok.
    async fn append(&self, batch: &[NewUpdate]) -> Result<(), StoreError>;

    /// How many `append` transactions are worth running at once. A single
    /// writer (SQLite) gains nothing from more than one.
    fn concurrent_appends(&self) -> usize {
        1
    }

    /// Folds the log rows present now into the snapshot.
    async fn compact(&self, doc: &str) -> Result<Folded, StoreError>;

    /// Cheap liveness probe for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Versions of migrations not yet applied.
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError>;

    /// Applies pending migrations; returns the versions applied, with descriptions.
    async fn migrate(&self) -> Result<Vec<(i64, String)>, StoreError>;

    /// Flushes and closes connections (graceful shutdown).
    async fn close(&self);

    /// The webhook outbox this database keeps, if any.
    fn outbox(&self) -> Option<&dyn crate::webhooks::outbox::Outbox> {
        None
    }

    /// The document versions this database keeps, if any.
    fn versions(&self) -> Option<&dyn crate::history::versions::Versions> {
        None
    }
}

/// What an append records besides the updates, in the same transaction:
/// which documents changed and who changed them, for webhooks and history.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    webhooks: std::sync::atomic::AtomicBool,
    history: std::sync::atomic::AtomicBool,
}

/// What one append records: for webhooks, for history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Track {
    webhooks: bool,
    history: bool,
}

impl Track {
    fn any(self) -> bool {
        self.webhooks || self.history
    }
}

impl Tracking {
    fn now(&self) -> Track {
        use std::sync::atomic::Ordering::Relaxed;
        Track {
            webhooks: self.webhooks.load(Relaxed),
            history: self.history.load(Relaxed),
        }
    }
}

/// Opens the store named by a `sqlite://` or `postgres://` URL.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PostgresStore::connect(url).await?))
    } else {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    }
}

/// Snapshots are stored lz4-compressed: a 10 MB text document shrinks to
/// tens of kilobytes, and moving the plain bytes out of PostgreSQL took most
/// of its cold load (37 ms of 47). Decompressing costs a few milliseconds.
pub(crate) const SNAPSHOT_COMPRESSION: &str = "lz4";

/// A folded document state as stored: the bytes and their `compression`.
pub(crate) fn pack_snapshot(state: &[u8]) -> (Vec<u8>, &'static str) {
    (lz4_flex::compress_prepend_size(state), SNAPSHOT_COMPRESSION)
}

/// A stored snapshot back to a Yjs v1 update.
pub(crate) fn unpack_snapshot(
    data: Vec<u8>,
    compression: Option<String>,
) -> Result<Vec<u8>, StoreError> {
    match compression.as_deref() {
        None => Ok(data),
        Some(SNAPSHOT_COMPRESSION) => lz4_flex::decompress_size_prepended(&data)
            .map_err(|e| StoreError::Corrupt(format!("snapshot: {e}"))),
        Some(other) => Err(StoreError::Corrupt(format!(
            "snapshot compressed with unknown {other:?}"
        ))),
    }
}

/// Migrations that `migrator` knows and the database has not applied.
fn pending_versions(migrator: &sqlx::migrate::Migrator, applied: &[i64]) -> Vec<(i64, String)> {
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| (m.version, m.description.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_plain_ones_still_load() {
        let state = b"\x01\x01\x01\x00\x04\x01\x01t\x05hello\x00".repeat(1000);
        let (packed, compression) = pack_snapshot(&state);
        assert!(packed.len() < state.len() / 10);
        let unpacked = unpack_snapshot(packed, Some(compression.to_string())).unwrap();
        assert_eq!(unpacked, state);
        // Written before compression existed: NULL.
        assert_eq!(unpack_snapshot(state.clone(), None).unwrap(), state);
        assert!(unpack_snapshot(state, Some("zstd".into())).is_err());
    }
}
