//! Versions as the database holds them, and the record of who changed a
//! document since its last version. A change is recorded in the transaction
//! that stores the updates (as webhook changes are), and taken by exactly one
//! replica when it records the next version: that is what makes a version
//! recorded once when several replicas write one document. The SQL is
//! `store/history_sql.rs`, shared by both stores.

use async_trait::async_trait;

use crate::store::StoreError;

/// A version without its state, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub id: String,
    /// Milliseconds since the epoch.
    pub at: i64,
    pub name: Option<String>,
    /// A JSON array of subs.
    pub authors: String,
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

    /// Stores a version: `state` is the document's whole state, packed.
    async fn insert(
        &self,
        doc: &str,
        row: &VersionRow,
        state: &[u8],
        compression: &str,
    ) -> Result<(), StoreError>;

    /// The document's versions, newest first.
    async fn list(&self, doc: &str) -> Result<Vec<VersionRow>, StoreError>;

    /// One of the document's versions and its packed state and compression.
    async fn get(
        &self,
        doc: &str,
        id: &str,
    ) -> Result<Option<(VersionRow, Vec<u8>, Option<String>)>, StoreError>;

    /// Drops unnamed versions recorded before `before`; how many.
    async fn expire(&self, before: i64) -> Result<u64, StoreError>;
}
