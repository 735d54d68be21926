//! Fan-out between replicas that hold the same document.
//!
//! A room subscribes before it loads from the store, so nothing published
//! after the load began is missed. Updates are published only once they are
//! durable (the committer's durable hook publishes each group commit), so
//! whatever a replica receives from another one is already stored.

pub mod local;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

/// What a replica sends the others for a document.
#[derive(Debug, Clone)]
pub enum Published {
    /// A stored Yjs v1 update.
    Update(Bytes),
    /// An encoded awareness update.
    Awareness(Bytes),
    /// An application message; never stored.
    Stateless(Arc<str>),
}

/// What another replica sent for a document.
#[derive(Debug, Clone)]
pub enum Remote {
    Update(Bytes),
    Awareness(Bytes),
    Stateless(Arc<str>),
    /// The channel lost messages (a broker outage, a trimmed stream): the room
    /// catches up from the store, which holds every published update.
    Resync,
}

impl From<Published> for Remote {
    fn from(published: Published) -> Self {
        match published {
            Published::Update(update) => Remote::Update(update),
            Published::Awareness(update) => Remote::Awareness(update),
            Published::Stateless(payload) => Remote::Stateless(payload),
        }
    }
}

/// Receives a document's messages from other replicas until dropped.
pub struct Subscription {
    /// `None` when nothing can ever arrive (a single node).
    rx: Option<mpsc::Receiver<Remote>>,
    /// Unsubscribes on drop.
    _guard: Box<dyn Send + Sync>,
}

impl Subscription {
    pub fn new(rx: mpsc::Receiver<Remote>, guard: Box<dyn Send + Sync>) -> Self {
        Self {
            rx: Some(rx),
            _guard: guard,
        }
    }

    /// A subscription on which nothing ever arrives.
    pub fn none() -> Self {
        Self {
            rx: None,
            _guard: Box::new(()),
        }
    }

    /// The next message; pending for ever when nothing can arrive.
    pub async fn recv(&mut self) -> Option<Remote> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("fan-out unavailable: {0}")]
pub struct FanoutError(pub String);

#[async_trait]
pub trait Fanout: Send + Sync + 'static {
    /// Starts delivering messages published for `doc` from now on.
    async fn subscribe(&self, doc: &Arc<str>) -> Result<Subscription, FanoutError>;

    /// Sends a message to the other replicas. Never blocks the caller.
    fn publish(&self, doc: &Arc<str>, message: Published);

    /// `Some(reason)` while the fan-out is degraded (for `/readyz`).
    fn degraded(&self) -> Option<String>;
}
