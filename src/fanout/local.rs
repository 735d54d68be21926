//! In-process fan-out: replicas in one process share a [`LocalHub`].
//!
//! A single node has one replica, so nothing is ever delivered; the hub
//! exists so the room's contract with [`Fanout`] is the same with or without
//! Redis, and so several replicas can be wired together in one process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Fanout, FanoutError, Remote, Subscription};

/// Messages a slow room may have queued before it is told to resync instead.
const QUEUE: usize = 4096;

/// Per document: (subscription id, replica, sender).
type Subscribers = HashMap<Arc<str>, Vec<(u64, Arc<str>, mpsc::Sender<Remote>)>>;

#[derive(Default, Clone)]
pub struct LocalHub {
    subscribers: Arc<Mutex<Subscribers>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

pub struct LocalFanout {
    hub: LocalHub,
    replica: Arc<str>,
}

impl LocalFanout {
    pub fn new(hub: LocalHub, replica: Arc<str>) -> Self {
        Self { hub, replica }
    }

    fn deliver(&self, doc: &Arc<str>, msg: Remote) {
        let subscribers = self.hub.subscribers.lock().expect("hub lock");
        for (_, replica, tx) in subscribers.get(doc).into_iter().flatten() {
            if *replica == self.replica {
                continue;
            }
            if tx.try_send(msg.clone()).is_err() {
                // The room is behind: it reloads from the store, which has it all.
                let _ = tx.try_send(Remote::Resync);
            }
        }
    }
}

struct Unsubscribe {
    hub: LocalHub,
    doc: Arc<str>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut subscribers = self.hub.subscribers.lock().expect("hub lock");
        if let Some(list) = subscribers.get_mut(&self.doc) {
            list.retain(|(id, _, _)| *id != self.id);
            if list.is_empty() {
                subscribers.remove(&self.doc);
            }
        }
    }
}

#[async_trait]
impl Fanout for LocalFanout {
    async fn subscribe(&self, doc: &Arc<str>) -> Result<Subscription, FanoutError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self
            .hub
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hub
            .subscribers
            .lock()
            .expect("hub lock")
            .entry(doc.clone())
            .or_default()
            .push((id, self.replica.clone(), tx));
        Ok(Subscription {
            rx,
            _guard: Box::new(Unsubscribe {
                hub: self.hub.clone(),
                doc: doc.clone(),
                id,
            }),
        })
    }

    fn publish_update(&self, doc: &Arc<str>, update: Bytes) {
        self.deliver(doc, Remote::Update(update));
    }

    fn publish_awareness(&self, doc: &Arc<str>, message: Bytes) {
        self.deliver(doc, Remote::Awareness(message));
    }

    fn degraded(&self) -> Option<String> {
        None
    }
}
