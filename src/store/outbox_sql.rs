//! The webhook outbox's statements that read the same on both databases
//! (`webhooks/outbox.rs` says what the outbox is). `QueryBuilder` writes each
//! database's placeholders; what differs (a substring function, `SKIP
//! LOCKED`, SQLite's write lock) stays in each store.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::append_sql::Script;
use crate::webhooks::outbox::ChangeRow;

/// Deliveries waiting, and when the oldest of their events was made.
pub(super) const BACKLOG: &str = "SELECT COUNT(*), MIN(created_at) FROM webhook_deliveries";

/// Records one (document, author) change; `contains` is the database's
/// `(haystack, needle)` substring position function.
pub(super) fn record_change<'a, DB>(
    script: &mut Script<'a, DB>,
    row: &'a ChangeRow<'a>,
    now: i64,
    contains: &str,
) where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    let q =
        script.statement("INSERT INTO webhook_changes (doc, first_at, last_at, authors) VALUES (");
    q.push_bind(row.doc)
        .push(", ")
        .push_bind(now)
        .push(", ")
        .push_bind(now)
        .push(", ")
        .push_bind(row.initial.as_str())
        .push(") ON CONFLICT (doc) DO UPDATE SET last_at = excluded.last_at, authors = CASE WHEN ")
        .push_bind(row.marker.as_str())
        .push(format!(" = '' OR {contains}(webhook_changes.authors, "))
        .push_bind(row.marker.as_str())
        .push(") > 0 THEN webhook_changes.authors ELSE webhook_changes.authors || ")
        .push_bind(row.addition.as_str())
        .push(" END");
}

/// One event's deliveries, one row per URL (`urls` is never empty).
pub(super) fn insert_deliveries<'a, DB>(
    id: &'a str,
    body: &'a str,
    urls: &'a [String],
    now: i64,
) -> QueryBuilder<'a, DB>
where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    let mut q =
        QueryBuilder::new("INSERT INTO webhook_deliveries (id, url, body, created_at, due_at) ");
    q.push_values(urls, |mut row, url| {
        row.push_bind(id)
            .push_bind(url.as_str())
            .push_bind(body)
            .push_bind(now)
            .push_bind(now);
    });
    q
}

/// The change a new event took.
pub(super) fn forget_change<'a, DB>(doc: &'a str) -> QueryBuilder<'a, DB>
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new("DELETE FROM webhook_changes WHERE doc = ");
    q.push_bind(doc);
    q
}

/// Removes a delivery: answered, or given up.
pub(super) fn finish<'a, DB>(seq: i64) -> QueryBuilder<'a, DB>
where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new("DELETE FROM webhook_deliveries WHERE seq = ");
    q.push_bind(seq);
    q
}

/// Counts a failed attempt, frees the lease and schedules the next attempt.
pub(super) fn retry<'a, DB>(seq: i64, due_at: i64) -> QueryBuilder<'a, DB>
where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
{
    let mut q =
        QueryBuilder::new("UPDATE webhook_deliveries SET attempts = attempts + 1, due_at = ");
    q.push_bind(due_at)
        .push(", lease_until = 0, leased_by = NULL WHERE seq = ")
        .push_bind(seq);
    q
}

/// Gives back every lease `replica` holds.
pub(super) fn release<'a, DB>(replica: &'a str) -> QueryBuilder<'a, DB>
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new(
        "UPDATE webhook_deliveries SET lease_until = 0, leased_by = NULL WHERE leased_by = ",
    );
    q.push_bind(replica);
    q
}
