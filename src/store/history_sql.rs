//! The history's statements (`history/versions.rs` says what they keep),
//! written once for both databases: they read the same on each, and
//! `QueryBuilder` writes each one's placeholders. `DELETE … RETURNING` takes
//! a change atomically on both, so one replica alone records its version.

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
                let mut q =
                    sqlx::QueryBuilder::<$db>::new("DELETE FROM history_changes WHERE doc = ");
                q.push_bind(doc);
                if let Some(since) = quiet_since {
                    q.push(" AND last_at <= ").push_bind(since);
                }
                q.push(" RETURNING authors");
                let row: Option<(String,)> =
                    q.build_query_as().fetch_optional(&self.pool).await?;
                Ok(row.map(|(a,)| crate::webhooks::outbox::parse_authors(&a)))
            }

            async fn insert(
                &self,
                doc: &str,
                row: &crate::history::versions::VersionRow,
                state: &[u8],
                compression: &str,
            ) -> Result<(), crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO document_versions (id, doc, at, name, authors, data, compression) ",
                );
                q.push_values([()], |mut b, ()| {
                    b.push_bind(row.id.as_str())
                        .push_bind(doc)
                        .push_bind(row.at)
                        .push_bind(row.name.as_deref())
                        .push_bind(row.authors.as_str())
                        .push_bind(state)
                        .push_bind(compression);
                });
                q.build().execute(&self.pool).await?;
                Ok(())
            }

            async fn list(
                &self,
                doc: &str,
            ) -> Result<Vec<crate::history::versions::VersionRow>, crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT id, at, name, authors FROM document_versions WHERE doc = ",
                );
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

            async fn get(
                &self,
                doc: &str,
                id: &str,
            ) -> Result<
                Option<(crate::history::versions::VersionRow, Vec<u8>, Option<String>)>,
                crate::store::StoreError,
            > {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT id, at, name, authors, data, compression FROM document_versions WHERE doc = ",
                );
                q.push_bind(doc).push(" AND id = ").push_bind(id);
                let row: Option<(String, i64, Option<String>, String, Vec<u8>, Option<String>)> =
                    q.build_query_as().fetch_optional(&self.pool).await?;
                Ok(row.map(|(id, at, name, authors, data, compression)| {
                    (
                        crate::history::versions::VersionRow {
                            id,
                            at,
                            name,
                            authors,
                        },
                        data,
                        compression,
                    )
                }))
            }

            async fn expire(&self, before: i64) -> Result<u64, crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "DELETE FROM document_versions WHERE name IS NULL AND at < ",
                );
                q.push_bind(before);
                Ok(q.build().execute(&self.pool).await?.rows_affected())
            }
        }
    };
}

pub(super) use impl_versions;
