//! Group commit: the single writer between rooms and the [`Store`].
//!
//! Rooms hand over accepted updates without waiting. One task appends
//! everything queued in one transaction, and starts the next commit as soon as
//! the previous one ends, so an update waits at most one commit for its turn
//! (cross-replica latency includes it: only stored updates are published).
//!
//! If the database fails, the batch is retried with backoff and readiness
//! reports the error; accepted updates stay queued in memory up to a byte
//! budget, past which [`Committer::submit`] refuses new ones.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{NewUpdate, Store};
use crate::fanout::Fanout;
use crate::health::Health;
use crate::metrics as m;

const MAX_BATCH_ROWS: usize = 8192;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// When a document's log has grown enough to fold into its snapshot.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    pub max_entries: u64,
    pub max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("too many updates are waiting for the database; try again later")]
pub struct Overloaded;

enum Item {
    Update {
        update: NewUpdate,
        ack: Option<oneshot::Sender<()>>,
    },
    /// Answered once everything queued before it is durable.
    Flush(oneshot::Sender<()>),
    /// A room loaded a document whose log holds this much.
    Loaded {
        doc: Arc<str>,
        entries: u64,
        bytes: u64,
    },
    /// A room unloaded its document: stop tracking it.
    Forget(Arc<str>),
    /// A compaction finished, folding this many rows.
    Compacted { doc: Arc<str>, entries: u64 },
}

#[derive(Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<Item>,
    pending_bytes: Arc<AtomicUsize>,
    budget: usize,
}

#[derive(Default, Clone, Copy)]
struct LogSize {
    entries: u64,
    bytes: u64,
}

impl Committer {
    /// Starts the commit task. It ends once every `Committer` clone is dropped
    /// and the queue is drained.
    pub fn spawn(
        store: Arc<dyn Store>,
        fanout: Arc<dyn Fanout>,
        health: Arc<Health>,
        policy: CompactionPolicy,
        budget: usize,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending_bytes = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            store,
            fanout,
            health,
            policy,
            pending_bytes: pending_bytes.clone(),
            tx: tx.downgrade(),
            logs: HashMap::new(),
            compacting: HashSet::new(),
        };
        let handle = tokio::spawn(worker.run(rx));
        (
            Self {
                tx,
                pending_bytes,
                budget,
            },
            handle,
        )
    }

    /// Reserves room in the memory budget for an update of `len` bytes, before
    /// the update is applied anywhere, so an applied update can always be queued.
    pub fn reserve(&self, len: usize) -> Result<Reservation, Overloaded> {
        let before = self.pending_bytes.fetch_add(len, Ordering::SeqCst);
        if before + len > self.budget {
            self.pending_bytes.fetch_sub(len, Ordering::SeqCst);
            return Err(Overloaded);
        }
        metrics::gauge!(m::PERSIST_PENDING_BYTES).set((before + len) as f64);
        Ok(Reservation {
            committer: self.clone(),
            len,
        })
    }

    /// Waits until everything submitted before this call is durable.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Item::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub fn loaded(&self, doc: Arc<str>, entries: u64, bytes: u64) {
        let _ = self.tx.send(Item::Loaded {
            doc,
            entries,
            bytes,
        });
    }

    pub fn forget(&self, doc: Arc<str>) {
        let _ = self.tx.send(Item::Forget(doc));
    }
}

/// Budget held for one update; released unless the update is submitted.
pub struct Reservation {
    committer: Committer,
    len: usize,
}

impl Reservation {
    /// Queues the update for the next group commit; with `ack`, the caller
    /// hears when it is durable.
    pub fn submit(mut self, update: NewUpdate, ack: Option<oneshot::Sender<()>>) {
        debug_assert_eq!(update.data.len(), self.len);
        let len = std::mem::take(&mut self.len);
        if let Err(mpsc::error::SendError(_)) = self.committer.tx.send(Item::Update { update, ack })
        {
            // Only at process teardown, after the commit task is gone.
            self.committer
                .pending_bytes
                .fetch_sub(len, Ordering::SeqCst);
            tracing::error!("update accepted after the commit task stopped");
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.committer
            .pending_bytes
            .fetch_sub(self.len, Ordering::SeqCst);
    }
}

struct Worker {
    store: Arc<dyn Store>,
    fanout: Arc<dyn Fanout>,
    health: Arc<Health>,
    policy: CompactionPolicy,
    pending_bytes: Arc<AtomicUsize>,
    /// Weak, so the queue closes when the last `Committer` goes away.
    tx: mpsc::WeakUnboundedSender<Item>,
    logs: HashMap<Arc<str>, LogSize>,
    compacting: HashSet<Arc<str>>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Item>) {
        let mut received = Vec::new();
        // What did not fit in the previous batch stays first in line.
        let mut queue = std::collections::VecDeque::new();
        loop {
            if queue.is_empty() {
                if rx.recv_many(&mut received, MAX_BATCH_ROWS).await == 0 {
                    return;
                }
            } else {
                while received.len() < MAX_BATCH_ROWS {
                    match rx.try_recv() {
                        Ok(item) => received.push(item),
                        Err(_) => break,
                    }
                }
            }
            queue.extend(received.drain(..));
            let mut batch = Vec::new();
            let mut acks = Vec::new();
            let mut bytes = 0;
            while let Some(item) = queue.pop_front() {
                match item {
                    Item::Update { update, ack } => {
                        bytes += update.data.len();
                        batch.push(update);
                        acks.extend(ack);
                    }
                    Item::Flush(ack) => acks.push(ack),
                    Item::Loaded {
                        doc,
                        entries,
                        bytes,
                    } => {
                        self.logs.insert(doc.clone(), LogSize { entries, bytes });
                        self.maybe_compact(&doc);
                    }
                    Item::Forget(doc) => {
                        self.logs.remove(&doc);
                    }
                    Item::Compacted { doc, entries } => {
                        self.compacting.remove(&doc);
                        if let Some(log) = self.logs.get_mut(&doc) {
                            let bytes_per_entry = log.bytes / log.entries.max(1);
                            log.entries = log.entries.saturating_sub(entries);
                            log.bytes = log.bytes.saturating_sub(entries * bytes_per_entry);
                        }
                    }
                }
                if bytes >= MAX_BATCH_BYTES || batch.len() >= MAX_BATCH_ROWS {
                    break;
                }
            }
            if !batch.is_empty() {
                self.commit(&batch).await;
                self.pending_bytes.fetch_sub(bytes, Ordering::SeqCst);
                metrics::gauge!(m::PERSIST_PENDING_BYTES)
                    .set(self.pending_bytes.load(Ordering::SeqCst) as f64);
                for update in &batch {
                    self.fanout.publish_update(&update.doc, update.data.clone());
                    let log = self.logs.entry(update.doc.clone()).or_default();
                    log.entries += 1;
                    log.bytes += update.data.len() as u64;
                }
                let docs: HashSet<Arc<str>> = batch.iter().map(|u| u.doc.clone()).collect();
                for doc in docs {
                    self.maybe_compact(&doc);
                }
            }
            for ack in acks {
                let _ = ack.send(());
            }
        }
    }

    /// Appends until it succeeds: an accepted update is never dropped.
    async fn commit(&self, batch: &[NewUpdate]) {
        let mut backoff = BACKOFF_START;
        loop {
            let started = Instant::now();
            match self.store.append(batch).await {
                Ok(()) => {
                    metrics::histogram!(m::PERSIST_SECONDS).record(started.elapsed().as_secs_f64());
                    metrics::counter!(m::UPDATES_PERSISTED).increment(batch.len() as u64);
                    if self.health.store_error().is_some() {
                        tracing::info!("database answers again; queued updates stored");
                        self.health.set_store_error(None);
                    }
                    return;
                }
                Err(error) => {
                    metrics::counter!(m::PERSIST_ERRORS).increment(1);
                    tracing::warn!(%error, rows = batch.len(), retry_in = ?backoff, "group commit failed");
                    self.health
                        .set_store_error(Some(format!("database write failed: {error}")));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn maybe_compact(&mut self, doc: &Arc<str>) {
        let Some(log) = self.logs.get(doc) else {
            return;
        };
        if (log.entries < self.policy.max_entries && log.bytes < self.policy.max_bytes)
            || self.compacting.contains(doc)
        {
            return;
        }
        let Some(tx) = self.tx.upgrade() else {
            return;
        };
        self.compacting.insert(doc.clone());
        let store = self.store.clone();
        let doc = doc.clone();
        tokio::spawn(async move {
            let entries = match store.compact(&doc).await {
                Ok(folded) => {
                    metrics::counter!(m::COMPACTIONS).increment(1);
                    tracing::debug!(doc = %doc, folded, "compacted update log");
                    folded
                }
                Err(error) => {
                    tracing::warn!(doc = %doc, %error, "compaction failed; will retry after more updates");
                    0
                }
            };
            let _ = tx.send(Item::Compacted { doc, entries });
        });
    }
}
