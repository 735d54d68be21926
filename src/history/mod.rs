//! Document history: versions recorded after a quiet spell, on request and
//! before a restore; reading a version; restoring one; dropping unnamed
//! versions past the retention.
//!
//! A version keeps the changes since the version before it (its parent), and
//! every so often the whole state, once the chain of changes since the last
//! whole state outweighs it: storage grows with what was typed, not with the
//! size of the document at each version, and a read applies a bounded chain.
//! Versions never depend on the update log, so compaction folds it as before.
//! Who changed a document since its last version is recorded with every
//! append (`versions.rs`); recording a version takes that record, once,
//! whichever replica gets there first.

pub mod versions;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, StateVector, Update};

use crate::config::HistoryArgs;
use crate::doc::guard;
use crate::room::{RoomError, Rooms};
use crate::store::{pack_snapshot, unpack_snapshot, Store, StoreError, SNAPSHOT_COMPRESSION};
use crate::webhooks::outbox::now_ms;
use crate::webhooks::Webhooks;
use versions::{Stored, VersionRow, Versions};

/// Documents turned into versions (or versions dropped) per round at most;
/// the rest wait a round.
const BATCH: i64 = 64;

/// What each link of a chain counts for, beyond its bytes, when deciding to
/// store a whole state again: a read fetches and applies every link, so many
/// tiny ones cost too.
const LINK_COST: usize = 256;

/// A version as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Version {
    pub id: String,
    /// RFC 3339, to the second.
    pub at: String,
    pub name: Option<String>,
    /// Who changed the document since the previous version.
    pub authors: Vec<String>,
}

impl From<VersionRow> for Version {
    fn from(row: VersionRow) -> Self {
        let at = UNIX_EPOCH + Duration::from_millis(row.at.max(0) as u64);
        Version {
            id: row.id,
            at: humantime::format_rfc3339_seconds(at).to_string(),
            name: row.name,
            authors: serde_json::from_str(&row.authors).unwrap_or_default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no such document")]
    NoDocument,
    #[error("no such version")]
    NoVersion,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error("the version cannot be restored: {0}")]
    Restore(&'static str),
}

/// Why a version is recorded.
enum Trigger {
    /// The document has been quiet since this time after changes.
    Quiet(i64),
    /// Asked for (`POST …/versions`), named or not.
    Request(Option<String>),
    /// Just before a restore: unless the document is unchanged since its
    /// last version (then that one is the state before).
    BeforeRestore,
}

pub struct History {
    rooms: Rooms,
    store: Arc<dyn Store>,
    /// Zero: no automatic versions, none dropped.
    retention: Duration,
    idle: Duration,
    webhooks: Option<Webhooks>,
}

impl History {
    pub fn new(
        rooms: Rooms,
        store: Arc<dyn Store>,
        args: &HistoryArgs,
        webhooks: Option<Webhooks>,
    ) -> Self {
        History {
            rooms,
            store,
            retention: args.history_retention,
            idle: args.version_idle,
            webhooks,
        }
    }

    fn versions(&self) -> &dyn Versions {
        self.store.versions().expect("every store keeps versions")
    }

    /// `POST /api/docs/{doc}/versions`.
    pub async fn create(&self, doc: &str, name: Option<String>) -> Result<Version, HistoryError> {
        self.record(doc, Trigger::Request(name), None)
            .await?
            .ok_or(HistoryError::NoDocument)
    }

    /// The document's versions, newest first.
    pub async fn list(&self, doc: &str) -> Result<Vec<Version>, HistoryError> {
        let rows = self.versions().list(doc).await?;
        if rows.is_empty() && !self.exists(doc).await? {
            return Err(HistoryError::NoDocument);
        }
        Ok(rows.into_iter().map(Version::from).collect())
    }

    /// The document's whole state at version `id`, as a Yjs v1 update.
    pub async fn state(&self, doc: &str, id: &str) -> Result<Vec<u8>, HistoryError> {
        let (_, stored) = self
            .versions()
            .find(doc, Some(id))
            .await?
            .ok_or(HistoryError::NoVersion)?;
        let chain = self.versions().chain(stored.seq).await?;
        let built = materialize(&chain)?;
        let state = guard::encode_state(&built)
            .map_err(|_| HistoryError::Restore("a version does not encode"));
        guard::discard(built);
        state
    }

    /// Makes the document's content equal to version `id`'s with new
    /// changes, applied like any write (stored, then sent to every client);
    /// answers the version recorded after it.
    pub async fn restore(
        &self,
        doc: &str,
        id: &str,
        user: Option<Arc<str>>,
    ) -> Result<Version, HistoryError> {
        let target = self.state(doc, id).await?;
        self.record(doc, Trigger::BeforeRestore, None).await?;
        let current = self.rooms.read(doc, StateVector::default()).await?;
        let changes = restore_changes(&current.update, &target)?;
        if let Some(changes) = changes {
            let update = Update::decode_v1(&changes)
                .map_err(|_| HistoryError::Restore("its changes do not decode"))?;
            self.rooms
                .write(doc, Bytes::from(changes), update, user.clone())
                .await?;
        }
        let after = self
            .record(doc, Trigger::Request(None), user.as_deref())
            .await?
            .ok_or(HistoryError::NoDocument)?;
        if let Some(webhooks) = &self.webhooks {
            if let Err(error) = webhooks
                .announce_restore(&*self.store, doc, after.authors.clone(), &after.id)
                .await
            {
                tracing::warn!(%error, doc, "cannot queue the document.restored webhook");
            }
        }
        Ok(after)
    }

    /// Records a version of the document as the server holds it now; `None`
    /// when there is nothing to record (see [`Trigger`]). `also` is an
    /// author to list whether or not the record of changes has them.
    async fn record(
        &self,
        doc: &str,
        trigger: Trigger,
        also: Option<&str>,
    ) -> Result<Option<Version>, HistoryError> {
        let versions = self.versions();
        let (name, taken) = match trigger {
            Trigger::Quiet(since) => match versions.take_changes(doc, Some(since)).await? {
                Some(authors) => (None, authors),
                None => return Ok(None),
            },
            // A document never stored has no record of changes to take.
            Trigger::Request(name) => (
                name,
                versions.take_changes(doc, None).await?.unwrap_or_default(),
            ),
            Trigger::BeforeRestore => match versions.take_changes(doc, None).await? {
                Some(authors) => (None, authors),
                None => match versions.find(doc, None).await? {
                    Some((latest, _)) => return Ok(Some(latest.into())),
                    None => (None, Vec::new()),
                },
            },
        };
        let mut authors = taken;
        if let Some(user) = also {
            if !authors.iter().any(|a| a == user) {
                authors.push(user.to_owned());
            }
        }
        let now = self.rooms.read(doc, StateVector::default()).await?;
        if !now.exists {
            return Ok(None);
        }
        let content = content(&now.update, versions.find(doc, None).await?)?;
        let at = now_ms();
        let row = VersionRow {
            id: format!("{at:x}{:08x}", rand::random::<u32>()),
            at,
            name,
            authors: serde_json::to_string(&authors).expect("strings serialise"),
        };
        versions.insert(doc, &row, &content).await?;
        Ok(Some(row.into()))
    }

    async fn exists(&self, doc: &str) -> Result<bool, HistoryError> {
        Ok(self.rooms.read(doc, StateVector::default()).await?.exists)
    }

    /// Records versions of documents gone quiet and drops unnamed versions
    /// past the retention, until `shutdown`. Does nothing while history is
    /// off (a retention of zero).
    pub fn spawn(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.retention.is_zero() {
            return None;
        }
        self.versions().track_changes();
        Some(tokio::spawn(async move {
            let mut quiet = tokio::time::interval(
                (self.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
            );
            let mut expire = tokio::time::interval(
                (self.retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)),
            );
            for tick in [&mut quiet, &mut expire] {
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            loop {
                let round = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = quiet.tick() => self.record_quiet().await,
                    _ = expire.tick() => self.expire().await,
                };
                if let Err(error) = round {
                    tracing::warn!(%error, "history round failed; retrying");
                }
            }
        }))
    }

    async fn record_quiet(&self) -> Result<(), HistoryError> {
        let since = now_ms() - self.idle.as_millis() as i64;
        for doc in self.versions().quiet(since, BATCH).await? {
            self.record(&doc, Trigger::Quiet(since), None).await?;
        }
        Ok(())
    }

    /// Drops unnamed versions past the retention. A version whose parent
    /// goes is rewritten first against its grandparent (or as a whole
    /// state), so a crash in between leaves every version readable.
    async fn expire(&self) -> Result<(), HistoryError> {
        let before = SystemTime::now()
            .checked_sub(self.retention)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        let versions = self.versions();
        let expired = versions.expired(before, BATCH).await?;
        for &seq in &expired {
            let chain = versions.chain(seq).await?;
            if chain.is_empty() {
                // Another replica dropped it meanwhile, children first.
                continue;
            }
            for child in versions.children(seq).await? {
                let mut links = chain.clone();
                links.push(child.clone());
                let built = materialize(&links)?;
                let grandparent = chain.len().checked_sub(2).map(|i| &chain[i]);
                let rewritten = link(&built, child.seq, grandparent);
                guard::discard(built);
                versions.rewrite(&rewritten?).await?;
            }
            versions.delete(seq).await?;
        }
        if !expired.is_empty() {
            tracing::debug!(
                dropped = expired.len(),
                "dropped versions past the retention"
            );
        }
        Ok(())
    }
}

/// What to store for a version whose whole state is `state`: the changes
/// since `latest`, or the whole state when there is no latest or when the
/// chain since the last whole state would outweigh it.
fn content(state: &[u8], latest: Option<(VersionRow, Stored)>) -> Result<Stored, HistoryError> {
    let built = crate::doc::from_updates(std::iter::once(state))?;
    let whole = link(&built, 0, None);
    let changes = latest.map(|(_, parent)| link(&built, 0, Some(&parent)));
    guard::discard(built);
    let whole = whole?;
    match changes.transpose()? {
        Some(changes) if changes.chain_bytes <= whole.data.len() as i64 => Ok(changes),
        _ => Ok(whole),
    }
}

/// Version `seq`, whose state is `built`, as stored: its changes since
/// `parent`, or its whole state without one.
fn link(built: &Doc, seq: i64, parent: Option<&Stored>) -> Result<Stored, HistoryError> {
    let unencodable = |_| HistoryError::Restore("a version does not encode");
    let (data, chain_bytes) = match parent {
        Some(parent) => {
            let since = StateVector::decode_v1(&parent.sv)
                .map_err(|_| HistoryError::Restore("a version's state vector does not decode"))?;
            let (packed, _) =
                pack_snapshot(&guard::encode_diff(built, &since).map_err(unencodable)?);
            let chain = parent.chain_bytes + (packed.len() + LINK_COST) as i64;
            (packed, chain)
        }
        None => (
            pack_snapshot(&guard::encode_state(built).map_err(unencodable)?).0,
            0,
        ),
    };
    Ok(Stored {
        seq,
        parent: parent.map(|p| p.seq),
        data,
        compression: Some(SNAPSHOT_COMPRESSION.to_owned()),
        sv: yrs::ReadTxn::state_vector(&yrs::Transact::transact(built)).encode_v1(),
        chain_bytes,
    })
}

/// A document built from a version's chain (whole state first).
fn materialize(chain: &[Stored]) -> Result<Doc, HistoryError> {
    if chain.first().is_none_or(|base| base.parent.is_some()) {
        return Err(HistoryError::Restore(
            "a version's chain does not start at a whole state",
        ));
    }
    let raw = chain
        .iter()
        .map(|link| unpack_snapshot(link.data.clone(), link.compression.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::doc::from_updates(raw.iter().map(Vec::as_slice))?)
}

/// The changes that take `current` to `target`'s content, both whole
/// states; yrs panics stay inside.
fn restore_changes(current: &[u8], target: &[u8]) -> Result<Option<Vec<u8>>, HistoryError> {
    let build = |state: &[u8]| crate::doc::from_updates(std::iter::once(state));
    let (current, target) = (build(current)?, build(target)?);
    let changes = catch_unwind(AssertUnwindSafe(|| {
        crate::doc::restore::restore(&current, &target)
    }));
    guard::discard(current);
    guard::discard(target);
    changes.map_err(|_| HistoryError::Restore("yrs failed computing it"))
}

#[cfg(test)]
mod tests {
    use yrs::{GetString, ReadTxn, Text, Transact};

    use super::*;

    fn link(seq: i64, parent: Option<i64>, update: &[u8]) -> Stored {
        let (data, compression) = pack_snapshot(update);
        Stored {
            seq,
            parent,
            data,
            compression: Some(compression.to_owned()),
            sv: Vec::new(),
            chain_bytes: 0,
        }
    }

    #[test]
    fn a_chain_reads_only_from_a_whole_state() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "base");
        let base = guard::encode_state(&doc).unwrap();
        let sv = doc.transact().state_vector();
        text.insert(&mut doc.transact_mut(), 4, "+more");
        let delta = guard::encode_diff(&doc, &sv).unwrap();

        let built = materialize(&[link(1, None, &base), link(2, Some(1), &delta)]).unwrap();
        let read = built.get_or_insert_text("t").get_string(&built.transact());
        assert_eq!(read, "base+more");
        // A parent dropped from under it (another replica expiring it) is
        // an error, never a version built from the changes alone.
        assert!(materialize(&[link(2, Some(1), &delta)]).is_err());
        assert!(materialize(&[]).is_err());
    }
}
