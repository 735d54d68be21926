//! An append's statements, written once for both databases: the update
//! rows, then what webhooks and history track of them. The statements are
//! the same; how they are sent differs. SQLite takes them as one query, so
//! an append is one hand-off to its connection's thread instead of one per
//! statement (on a small machine the hand-offs cost more than the writes);
//! PostgreSQL takes one statement per query.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{history_sql, outbox_sql, NewUpdate, Track};
use crate::webhooks::outbox::ChangeRow;

/// How an insert of update rows starts, outside a transaction.
pub(super) const INSERT_UPDATES: &str = "INSERT INTO document_updates (doc, data, author) ";

/// The statements of one transaction.
pub(super) enum Script<'a, DB: Database> {
    /// One query holding every statement, separated by `;`.
    One(QueryBuilder<'a, DB>),
    /// One query per statement.
    Many(Vec<QueryBuilder<'a, DB>>),
}

impl<'a, DB: Database> Script<'a, DB> {
    /// Starts the next statement with `sql`.
    pub(super) fn statement(&mut self, sql: &str) -> &mut QueryBuilder<'a, DB> {
        match self {
            Script::One(query) => query.push("; ").push(sql),
            Script::Many(list) => {
                list.push(QueryBuilder::new(sql));
                list.last_mut().expect("a statement")
            }
        }
    }
}

/// The values of one multi-row `INSERT` into the update log; `query` holds
/// the statement's start (`INSERT … INTO document_updates (doc, data, author) `).
fn insert_rows<'a, DB>(query: &mut QueryBuilder<'a, DB>, rows: &'a [NewUpdate])
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
{
    query.push_values(rows, |mut row, u| {
        row.push_bind(&*u.doc)
            .push_bind(&u.data[..])
            .push_bind(u.user.as_deref());
    });
}

/// What the statements of one append differ in between the databases.
pub(super) struct Dialect {
    /// How an insert of update rows starts inside the transaction.
    pub insert: &'static str,
    /// Rows per insert (3 bound parameters each), inside the database's limit
    /// on bound parameters.
    pub rows_per_insert: usize,
    /// The `(haystack, needle)` substring position function.
    pub contains: &'static str,
}

/// The one statement an append needs when its rows fit one insert and
/// nothing tracks them: it commits on its own, atomically.
pub(super) fn lone_insert<'a, DB>(
    dialect: &Dialect,
    batch: &'a [NewUpdate],
    track: Track,
) -> Option<QueryBuilder<'a, DB>>
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
{
    if batch.len() > dialect.rows_per_insert || track.any() {
        return None;
    }
    let mut query = QueryBuilder::new(INSERT_UPDATES);
    insert_rows(&mut query, batch);
    Some(query)
}

/// Adds an append's statements to `script`: its rows, in inserts of at most
/// `dialect.rows_per_insert`, then the changes webhooks (`changes`, from
/// `change_rows`) and history track.
pub(super) fn append<'a, DB>(
    script: &mut Script<'a, DB>,
    dialect: &Dialect,
    batch: &'a [NewUpdate],
    changes: &'a [ChangeRow<'a>],
    track: Track,
    now: i64,
) where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
{
    for chunk in batch.chunks(dialect.rows_per_insert) {
        insert_rows(script.statement(dialect.insert), chunk);
    }
    if track.webhooks {
        for row in changes {
            outbox_sql::record_change(script, row, now, dialect.contains);
        }
    }
    if track.history {
        history_sql::record(script, batch, now);
    }
}
