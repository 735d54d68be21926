//! The webhook outbox as the database holds it: documents whose stored
//! changes have not become an event yet, and deliveries waiting, one per event
//! and URL. A change is recorded in the transaction that stores the updates,
//! so no crash falls between "stored" and "will be announced". The SQL is
//! each store's (`store/sqlite.rs`, `store/postgres.rs`); what both share is
//! here.

use async_trait::async_trait;

use crate::store::{NewUpdate, StoreError};

/// One attempt's worth of a delivery, leased to this replica.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The row, for the outcome.
    pub seq: i64,
    /// `X-Concord-Delivery`: the event's id, the same on every retry.
    pub id: String,
    pub url: String,
    pub body: String,
    /// Failed attempts so far.
    pub attempts: i32,
    /// When the event was made, ms since the epoch.
    pub created_at: i64,
}

/// A delivery row as both stores select it.
pub(crate) type DeliveryRow = (i64, String, String, String, i32, i64);

impl From<DeliveryRow> for Delivery {
    fn from((seq, id, url, body, attempts, created_at): DeliveryRow) -> Self {
        Delivery {
            seq,
            id,
            url,
            body,
            attempts,
            created_at,
        }
    }
}

/// Builds an event for a document and its authors: its id and its JSON body.
pub type MakeEvent<'a> = &'a (dyn Fn(&str, Vec<String>) -> (String, String) + Sync);

/// Times are milliseconds since the Unix epoch.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// From now on, every append also records which documents it changed
    /// and who changed them, in the same transaction.
    fn track_changes(&self);

    /// Turns the changes quiet since `quiet_since`, or first made before
    /// `first_before`, into one event per document with a delivery per URL,
    /// in one transaction; each change is taken by one replica only.
    async fn promote(
        &self,
        now: i64,
        quiet_since: i64,
        first_before: i64,
        urls: &[String],
        make: MakeEvent<'_>,
    ) -> Result<usize, StoreError>;

    /// Queues an event made now, one delivery per URL.
    async fn enqueue(
        &self,
        id: &str,
        body: &str,
        urls: &[String],
        now: i64,
    ) -> Result<(), StoreError>;

    /// Leases up to `limit` due deliveries to `replica` until `lease_until`.
    async fn claim(
        &self,
        now: i64,
        lease_until: i64,
        replica: &str,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Removes a delivery: answered, or given up.
    async fn finish(&self, seq: i64) -> Result<(), StoreError>;

    /// Counts a failed attempt and schedules the next one.
    async fn retry(&self, seq: i64, due_at: i64) -> Result<(), StoreError>;

    /// Gives back what `replica` holds, so another replica need not wait
    /// out the lease (a graceful shutdown).
    async fn release(&self, replica: &str) -> Result<(), StoreError>;

    /// Deliveries waiting, and when the oldest of their events was made.
    async fn backlog(&self) -> Result<(i64, Option<i64>), StoreError>;
}

/// One change to record: the document, and its author's part of the
/// `authors` column (newline-separated JSON strings, so a `sub` may hold
/// any character).
pub(crate) struct ChangeRow<'a> {
    pub doc: &'a str,
    /// The column of a first change: `\n`, then the author and `\n`.
    pub initial: String,
    /// What marks the author as present (`\n"sub"\n`), empty without one.
    pub marker: String,
    /// What to append when absent (`"sub"\n`), empty without one.
    pub addition: String,
}

/// The distinct (document, author) pairs of a batch, by document: appends
/// running at once (Postgres) lock the rows in one order, so they cannot
/// deadlock.
pub(crate) fn change_rows(batch: &[NewUpdate]) -> Vec<ChangeRow<'_>> {
    let mut seen = std::collections::HashSet::new();
    let mut rows: Vec<ChangeRow<'_>> = batch
        .iter()
        .filter(|u| seen.insert((&*u.doc, u.user.as_deref())))
        .map(|u| {
            let author = u
                .user
                .as_deref()
                .map(|sub| serde_json::to_string(sub).expect("a string serialises"));
            match author {
                Some(a) => ChangeRow {
                    doc: &u.doc,
                    initial: format!("\n{a}\n"),
                    marker: format!("\n{a}\n"),
                    addition: format!("{a}\n"),
                },
                None => ChangeRow {
                    doc: &u.doc,
                    initial: "\n".into(),
                    marker: String::new(),
                    addition: String::new(),
                },
            }
        })
        .collect();
    rows.sort_by_key(|r| r.doc);
    rows
}

/// The `authors` column back to the subs it lists.
pub(crate) fn parse_authors(column: &str) -> Vec<String> {
    column
        .split('\n')
        .filter(|s| !s.is_empty())
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn authors_round_trip_through_the_column() {
        let update = |doc: &str, user: Option<&str>| NewUpdate {
            doc: doc.into(),
            data: bytes::Bytes::new(),
            user: user.map(Arc::from),
        };
        let batch = [
            update("d", Some("ada")),
            update("d", Some("ada")),
            update("d", Some("line\nbreak \"quoted\"")),
            update("d", None),
            update("e", Some("ada")),
        ];
        let rows = change_rows(&batch);
        assert_eq!(rows.len(), 4, "one row per distinct document and author");
        // As the stores' upsert builds the column.
        let mut column = rows[0].initial.clone();
        for row in &rows[1..3] {
            if !row.marker.is_empty() && !column.contains(&row.marker) {
                column.push_str(&row.addition);
            }
        }
        assert_eq!(parse_authors(&column), ["ada", "line\nbreak \"quoted\""]);
        assert!(column.contains(&rows[0].marker));
        // A change without auth lists no author.
        assert!(rows[2].marker.is_empty() && parse_authors(&rows[2].initial).is_empty());
    }
}
