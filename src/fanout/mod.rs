//! Fan-out between replicas that hold the same document.
//!
//! A room subscribes before it loads from the store, so nothing published
//! after the load began is missed, and publishes updates only once they are
//! durable (the committer calls [`Fanout::publish_update`] after each group
//! commit), so whatever a replica receives from another one is already stored.

pub mod local;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

/// What another replica sent for a document.
#[derive(Debug, Clone)]
pub enum Remote {
    /// A stored Yjs update.
    Update(Bytes),
    /// A whole y-protocols awareness message (type 1), ready to forward.
    Awareness(Bytes),
    /// The channel lost messages (a broker outage, a trimmed stream): the room
    /// catches up from the store, which holds every published update.
    Resync,
}

/// Receives a document's messages from other replicas until dropped.
pub struct Subscription {
    /// `None` when nothing can ever arrive (a single node).
    pub rx: Option<mpsc::Receiver<Remote>>,
    /// Unsubscribes on drop.
    pub _guard: Box<dyn Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
#[error("fan-out unavailable: {0}")]
pub struct FanoutError(pub String);

#[async_trait]
pub trait Fanout: Send + Sync + 'static {
    /// Starts delivering messages published for `doc` from now on.
    async fn subscribe(&self, doc: &Arc<str>) -> Result<Subscription, FanoutError>;

    /// Sends a stored update to the other replicas. Never blocks the caller.
    fn publish_update(&self, doc: &Arc<str>, update: Bytes);

    /// Sends an awareness message to the other replicas. Never blocks the caller.
    fn publish_awareness(&self, doc: &Arc<str>, message: Bytes);

    /// `Some(reason)` while the fan-out is degraded (for `/readyz`).
    fn degraded(&self) -> Option<String>;
}
