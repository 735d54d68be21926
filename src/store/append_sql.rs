//! An append's statements, written once for both databases: the update
//! rows, then what webhooks and history track of them. The statements are
//! the same; how they are sent differs. SQLite takes them as one query, so
//! an append is one hand-off to its connection's thread instead of one per
//! statement (on a small machine the hand-offs cost more than the writes).
//! PostgreSQL takes them as one statement of chained parts where it can, so
//! an append is one round trip, and one statement per query otherwise.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{history_sql, outbox_sql, NewUpdate, Track};
use crate::webhooks::outbox::ChangeRow;

/// The statements of one transaction.
pub(super) enum Script<'a, DB: Database> {
    /// One query holding every statement, separated by `;`.
    One(QueryBuilder<'a, DB>),
    /// One query per statement.
    Many(Vec<QueryBuilder<'a, DB>>),
    /// One statement whose parts are data-modifying `WITH` queries
    /// (PostgreSQL): atomic on its own, without a transaction's round trips.
    /// No two parts may change the same row: one statement cannot.
    Chained {
        query: QueryBuilder<'a, DB>,
        parts: usize,
    },
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
            Script::Chained { query, parts } => {
                match *parts {
                    0 => query.push("WITH p0 AS ("),
                    n => query.push(format_args!("), p{n} AS (")),
                };
                *parts += 1;
                query.push(sql)
            }
        }
    }

    /// A chain of parts, to be ended by [`Script::end_chain`].
    pub(super) fn chain() -> Self {
        Script::Chained {
            query: QueryBuilder::new(""),
            parts: 0,
        }
    }

    /// The statement of a [`Script::chain`].
    pub(super) fn end_chain(self) -> QueryBuilder<'a, DB> {
        let Script::Chained { mut query, .. } = self else {
            unreachable!("only a chain is ended")
        };
        query.push(") SELECT 1");
        query
    }
}

/// The rest of one multi-row insert into the update log, after `INSERT` and
/// its conflict clause: the columns and the rows' values, with the time
/// accepted (seconds) when `created_at` is given.
fn insert_rows<'a, DB>(
    query: &mut QueryBuilder<'a, DB>,
    rows: &'a [NewUpdate],
    created_at: Option<i64>,
) where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
{
    query.push(match created_at {
        Some(_) => " INTO document_updates (doc, data, author, created_at) ",
        None => " INTO document_updates (doc, data, author) ",
    });
    query.push_values(rows, |mut row, u| {
        row.push_bind(&*u.doc)
            .push_bind(&u.data[..])
            .push_bind(u.user.as_deref());
        if let Some(at) = created_at {
            row.push_bind(at);
        }
    });
}

/// What the statements of one append differ in between the databases.
pub(super) struct Dialect {
    /// The conflict clause of the multi-row statements inside the
    /// transaction, where the database has one (` OR ROLLBACK` on SQLite).
    /// With it, a failing statement ends the transaction: SQLite otherwise
    /// keeps a statement journal for any statement that may stop half-way,
    /// a copy of every page it touches, only to undo that statement alone.
    /// A database without one takes upserts that update on conflict.
    pub or_rollback: Option<&'static str>,
    /// Whether inserts give `created_at` rather than leave it to the column's
    /// default: SQLite's default calls `unixepoch()`, and a statement that
    /// calls a function may fail half-way, so it would keep a statement
    /// journal whatever its conflict clause.
    pub created_at: bool,
    /// Rows per insert (at most 4 bound parameters each), inside the
    /// database's limit on bound parameters.
    pub rows_per_insert: usize,
    /// The `(haystack, needle)` substring position function.
    pub contains: &'static str,
}

impl Dialect {
    /// `created_at` for rows accepted at `now` (milliseconds), if given.
    fn created_at(&self, now: i64) -> Option<i64> {
        self.created_at.then_some(now / 1000)
    }
}

/// The one statement an append needs when its rows fit one insert and
/// nothing tracks them: it commits on its own, atomically.
pub(super) fn lone_insert<'a, DB>(
    dialect: &Dialect,
    batch: &'a [NewUpdate],
    track: Track,
    now: i64,
) -> Option<QueryBuilder<'a, DB>>
where
    DB: Database,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
{
    if batch.len() > dialect.rows_per_insert || track.any() {
        return None;
    }
    let mut query = QueryBuilder::new("INSERT");
    insert_rows(&mut query, batch, dialect.created_at(now));
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
    let or_rollback = dialect.or_rollback.unwrap_or_default();
    for chunk in batch.chunks(dialect.rows_per_insert) {
        let insert = script.statement("INSERT").push(or_rollback);
        insert_rows(insert, chunk, dialect.created_at(now));
    }
    if track.webhooks {
        for row in changes {
            outbox_sql::record_change(script, row, now, dialect.contains);
        }
    }
    if track.history {
        history_sql::record(script, batch, now, dialect.or_rollback);
    }
}
