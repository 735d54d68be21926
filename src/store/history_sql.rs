//! The history's statements (`history/versions.rs` says what they keep),
//! written once for both databases: they read the same on each, and
//! `QueryBuilder` writes each one's placeholders. `DELETE … RETURNING` takes
//! a change atomically on both, so one replica alone records its version;
//! its authors go in the same transaction (an append that changes the
//! document meanwhile waits on the change row, so its author is not taken).

/// Rows per statement when recording changes, well inside either
/// database's limit on bound parameters.
const ROWS_PER_STATEMENT: usize = 1000;

/// What an append records for history, in its transaction: which documents
/// changed and who changed them (an insert that skips pairs already there).
/// Documents in sorted order, so appends running at once (Postgres) lock
/// their rows in one order and cannot deadlock. With `or_rollback` (SQLite,
/// see `append_sql::Dialect`) the changes are an insert that skips documents
/// already there and an update of their last time, as a multi-row upsert
/// that updates cannot take that clause; otherwise one upsert.
pub(super) fn record<'a, DB>(
    script: &mut super::append_sql::Script<'a, DB>,
    batch: &'a [crate::store::NewUpdate],
    now: i64,
    or_rollback: Option<&str>,
) where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let docs: std::collections::BTreeSet<&str> = batch.iter().map(|u| &*u.doc).collect();
    let authors: std::collections::BTreeSet<(&str, &str)> = batch
        .iter()
        .filter_map(|u| Some((&*u.doc, u.user.as_deref()?)))
        .collect();
    let docs: Vec<&str> = docs.into_iter().collect();
    let authors: Vec<(&str, &str)> = authors.into_iter().collect();
    let clause = or_rollback.unwrap_or_default();
    for chunk in docs.chunks(ROWS_PER_STATEMENT) {
        script
            .statement("INSERT")
            .push(clause)
            .push(" INTO history_changes (doc, first_at, last_at) ")
            .push_values(chunk.iter().copied(), |mut row, doc| {
                row.push_bind(doc).push_bind(now).push_bind(now);
            })
            .push(match or_rollback {
                Some(_) => " ON CONFLICT (doc) DO NOTHING",
                None => " ON CONFLICT (doc) DO UPDATE SET last_at = excluded.last_at",
            });
        if or_rollback.is_some() {
            let update = script
                .statement("UPDATE")
                .push(clause)
                .push(" history_changes SET last_at = ");
            update.push_bind(now).push(" WHERE doc IN (");
            let mut list = update.separated(", ");
            for doc in chunk {
                list.push_bind(*doc);
            }
            update.push(")");
        }
    }
    for chunk in authors.chunks(ROWS_PER_STATEMENT) {
        script
            .statement("INSERT")
            .push(clause)
            .push(" INTO history_authors (doc, author) ")
            .push_values(chunk.iter().copied(), |mut row, (doc, author)| {
                row.push_bind(doc).push_bind(author);
            })
            .push(" ON CONFLICT DO NOTHING");
    }
}

/// The columns of `Stored`, in its order.
pub(super) const STORED: &str = "seq, parent, data, compression, sv, chain_bytes";
/// The columns of `VersionRow`, in its order.
pub(super) const ROW: &str = "id, at, name, authors";

pub(super) type StoredRow = (i64, Option<i64>, Vec<u8>, Option<String>, Vec<u8>, i64);
pub(super) type RowAndStored = (
    String,
    i64,
    Option<String>,
    String,
    i64,
    Option<i64>,
    Vec<u8>,
    Option<String>,
    Vec<u8>,
    i64,
);

pub(super) fn stored(r: StoredRow) -> crate::history::versions::Stored {
    crate::history::versions::Stored {
        seq: r.0,
        parent: r.1,
        data: r.2,
        compression: r.3,
        sv: r.4,
        chain_bytes: r.5,
    }
}

pub(super) fn row_and_stored(
    r: RowAndStored,
) -> (
    crate::history::versions::VersionRow,
    crate::history::versions::Stored,
) {
    (
        crate::history::versions::VersionRow {
            id: r.0,
            at: r.1,
            name: r.2,
            authors: r.3,
        },
        stored((r.4, r.5, r.6, r.7, r.8, r.9)),
    )
}

/// Implements `Versions` for a store with a `pool` and `tracking`.
macro_rules! impl_versions {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl crate::history::versions::Versions for $store {
            fn track_changes(&self) {
                self.tracking
                    .history
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }

            async fn quiet(
                &self,
                quiet_since: i64,
                limit: i64,
            ) -> Result<Vec<String>, crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT doc FROM history_changes WHERE last_at <= ",
                );
                q.push_bind(quiet_since)
                    .push(" ORDER BY last_at LIMIT ")
                    .push_bind(limit);
                let rows: Vec<(String,)> = q.build_query_as().fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(|(d,)| d).collect())
            }

            async fn take_changes(
                &self,
                doc: &str,
                quiet_since: Option<i64>,
            ) -> Result<Option<Vec<String>>, crate::store::StoreError> {
                let mut txn = self.pool.begin().await?;
                let mut q =
                    sqlx::QueryBuilder::<$db>::new("DELETE FROM history_changes WHERE doc = ");
                q.push_bind(doc);
                if let Some(since) = quiet_since {
                    q.push(" AND last_at <= ").push_bind(since);
                }
                q.push(" RETURNING doc");
                let taken: Option<(String,)> = q.build_query_as().fetch_optional(&mut *txn).await?;
                if taken.is_none() {
                    return Ok(None);
                }
                let mut q =
                    sqlx::QueryBuilder::<$db>::new("DELETE FROM history_authors WHERE doc = ");
                q.push_bind(doc).push(" RETURNING author");
                let mut authors: Vec<(String,)> = q.build_query_as().fetch_all(&mut *txn).await?;
                txn.commit().await?;
                authors.sort();
                Ok(Some(authors.into_iter().map(|(a,)| a).collect()))
            }

            async fn insert(
                &self,
                doc: &str,
                row: &crate::history::versions::VersionRow,
                content: &crate::history::versions::Stored,
            ) -> Result<(), crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO document_versions \
                     (id, doc, at, name, authors, parent, data, compression, sv, chain_bytes) ",
                );
                q.push_values([()], |mut b, ()| {
                    b.push_bind(row.id.as_str())
                        .push_bind(doc)
                        .push_bind(row.at)
                        .push_bind(row.name.as_deref())
                        .push_bind(row.authors.as_str())
                        .push_bind(content.parent)
                        .push_bind(&content.data[..])
                        .push_bind(content.compression.as_deref())
                        .push_bind(&content.sv[..])
                        .push_bind(content.chain_bytes);
                });
                q.build().execute(&self.pool).await?;
                Ok(())
            }

            async fn list(
                &self,
                doc: &str,
            ) -> Result<Vec<crate::history::versions::VersionRow>, crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM document_versions WHERE doc = ",
                    history_sql::ROW
                ));
                q.push_bind(doc).push(" ORDER BY seq DESC");
                let rows: Vec<(String, i64, Option<String>, String)> =
                    q.build_query_as().fetch_all(&self.pool).await?;
                Ok(rows
                    .into_iter()
                    .map(|(id, at, name, authors)| crate::history::versions::VersionRow {
                        id,
                        at,
                        name,
                        authors,
                    })
                    .collect())
            }

            async fn find(
                &self,
                doc: &str,
                id: Option<&str>,
            ) -> Result<
                Option<(
                    crate::history::versions::VersionRow,
                    crate::history::versions::Stored,
                )>,
                crate::store::StoreError,
            > {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {}, {} FROM document_versions WHERE doc = ",
                    history_sql::ROW,
                    history_sql::STORED
                ));
                q.push_bind(doc);
                if let Some(id) = id {
                    q.push(" AND id = ").push_bind(id);
                }
                q.push(" ORDER BY seq DESC LIMIT 1");
                let row: Option<history_sql::RowAndStored> =
                    q.build_query_as().fetch_optional(&self.pool).await?;
                Ok(row.map(history_sql::row_and_stored))
            }

            async fn chain(
                &self,
                seq: i64,
            ) -> Result<Vec<crate::history::versions::Stored>, crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "WITH RECURSIVE chain (seq, parent, data, compression, sv, chain_bytes, depth) AS (
                       SELECT seq, parent, data, compression, sv, chain_bytes, 0
                       FROM document_versions WHERE seq = ",
                );
                q.push_bind(seq).push(
                    " UNION ALL
                       SELECT v.seq, v.parent, v.data, v.compression, v.sv, v.chain_bytes, c.depth + 1
                       FROM document_versions v JOIN chain c ON v.seq = c.parent)
                     SELECT seq, parent, data, compression, sv, chain_bytes FROM chain ORDER BY depth DESC",
                );
                let rows: Vec<history_sql::StoredRow> =
                    q.build_query_as().fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(history_sql::stored).collect())
            }

            async fn children(
                &self,
                seq: i64,
            ) -> Result<Vec<crate::history::versions::Stored>, crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM document_versions WHERE parent = ",
                    history_sql::STORED
                ));
                q.push_bind(seq);
                let rows: Vec<history_sql::StoredRow> =
                    q.build_query_as().fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(history_sql::stored).collect())
            }

            async fn rewrite(
                &self,
                content: &crate::history::versions::Stored,
            ) -> Result<(), crate::store::StoreError> {
                let mut q =
                    sqlx::QueryBuilder::<$db>::new("UPDATE document_versions SET parent = ");
                q.push_bind(content.parent)
                    .push(", data = ")
                    .push_bind(&content.data[..])
                    .push(", compression = ")
                    .push_bind(content.compression.as_deref())
                    .push(", chain_bytes = ")
                    .push_bind(content.chain_bytes)
                    .push(" WHERE seq = ")
                    .push_bind(content.seq);
                q.build().execute(&self.pool).await?;
                Ok(())
            }

            async fn expired(
                &self,
                before: i64,
                limit: i64,
            ) -> Result<Vec<i64>, crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT v.seq FROM document_versions v WHERE v.name IS NULL AND v.at < ",
                );
                q.push_bind(before)
                    .push(
                        " AND v.seq < (SELECT MAX(n.seq) FROM document_versions n WHERE n.doc = v.doc)
                         ORDER BY v.seq LIMIT ",
                    )
                    .push_bind(limit);
                let rows: Vec<(i64,)> = q.build_query_as().fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(|(s,)| s).collect())
            }

            async fn delete(&self, seq: i64) -> Result<(), crate::store::StoreError> {
                let mut q =
                    sqlx::QueryBuilder::<$db>::new("DELETE FROM document_versions WHERE seq = ");
                q.push_bind(seq);
                q.build().execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

pub(super) use impl_versions;
