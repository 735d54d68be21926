//! Versions as the database holds them, and the record of who changed a
//! document since its last version. A change is recorded in the transaction
//! that stores the updates (as webhook changes are), and taken by exactly one
//! replica when it records the next version: that is what makes a version
//! recorded once when several replicas write one document. The SQL is
//! `store/history_sql.rs`, shared by both stores.

use async_trait::async_trait;

use crate::store::StoreError;

/// A version without its content, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub id: String,
    /// Milliseconds since the epoch.
    pub at: i64,
    pub name: Option<String>,
    /// A JSON array of subs.
    pub authors: String,
}

/// A version's content as stored: the changes since `parent`, or the whole
/// state without one (see the migration `0004_history.sql`).
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: i64,
    pub parent: Option<i64>,
    /// Packed (lz4) as snapshots are, named by `compression`.
    pub data: Vec<u8>,
    pub compression: Option<String>,
    /// The version's state vector, encoded.
    pub sv: Vec<u8>,
    /// Packed bytes of the changes since the nearest whole state.
    pub chain_bytes: i64,
}

/// Times are milliseconds since the Unix epoch.
#[async_trait]
pub trait Versions: Send + Sync {
    /// From now on, every append also records which documents it changed
    /// and who changed them, in the same transaction.
    fn track_changes(&self);

    /// Documents changed since their last version and quiet since `quiet_since`.
    async fn quiet(&self, quiet_since: i64, limit: i64) -> Result<Vec<String>, StoreError>;

    /// Takes the document's record of changes (only when quiet since
    /// `quiet_since`, if given): the authors it lists, or `None` when there
    /// is none (or another replica took it first).
    async fn take_changes(
        &self,
        doc: &str,
        quiet_since: Option<i64>,
    ) -> Result<Option<Vec<String>>, StoreError>;

    /// Stores a version (`content.seq` is ignored).
    async fn insert(&self, doc: &str, row: &VersionRow, content: &Stored)
        -> Result<(), StoreError>;

    /// The document's versions, newest first.
    async fn list(&self, doc: &str) -> Result<Vec<VersionRow>, StoreError>;

    /// The document's version `id` (its newest without one) and its content.
    async fn find(
        &self,
        doc: &str,
        id: Option<&str>,
    ) -> Result<Option<(VersionRow, Stored)>, StoreError>;

    /// What reading version `seq` takes: its content and its parents',
    /// the whole state first.
    async fn chain(&self, seq: i64) -> Result<Vec<Stored>, StoreError>;

    /// Versions whose parent is `seq`.
    async fn children(&self, seq: i64) -> Result<Vec<Stored>, StoreError>;

    /// Replaces a version's content (when its parent goes away).
    async fn rewrite(&self, content: &Stored) -> Result<(), StoreError>;

    /// Unnamed versions recorded before `before`, oldest first, leaving out
    /// each document's newest (the base its next version is taken against).
    async fn expired(&self, before: i64, limit: i64) -> Result<Vec<i64>, StoreError>;

    /// Removes a version.
    async fn delete(&self, seq: i64) -> Result<(), StoreError>;
}
