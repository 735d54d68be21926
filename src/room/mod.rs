//! Document sessions. [`Rooms`] is the registry of loaded documents; each
//! [`actor`] task owns one document's `yrs` Doc and Awareness and is the only
//! place they change.
//!
//! Everything reaches a room as a [`Command`] sent while holding the registry
//! lock, and a room leaves the registry under that same lock only when its
//! queue is empty, so a command can never land in a room that is going away.
//! A new room loads before it reads its queue: clients joining a cold document
//! at once wait for that one load (single flight).

mod actor;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use yrs::{StateVector, Update};

use crate::connection::Outbox;
use crate::fanout::Fanout;
use crate::protocol::Inbound;
use crate::store::committer::Committer;
use crate::store::Store;

/// A command queue this deep means the room cannot keep up; joins are refused.
const COMMAND_QUEUE: usize = 4096;

pub type ConnId = u64;

/// What a room needs from one client connection.
pub struct Peer {
    /// Frames for the client; full means a slow consumer (closed with 1013).
    pub outbox: Outbox,
    /// Readers' document updates are dropped; their awareness is not.
    pub can_write: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RoomError {
    #[error("document storage is unavailable: {0}")]
    Unavailable(String),
    #[error("document is overloaded; try again later")]
    Busy,
    #[error("update could not be applied: {0}")]
    BadUpdate(String),
}

/// The document as a Yjs update, for the HTTP API.
pub struct Snapshot {
    pub update: Vec<u8>,
    /// False when the document holds nothing at all (never written).
    pub exists: bool,
}

/// What a room's queue carries. Large payloads are boxed: the queue allocates
/// its slots in blocks of 32 up front, so a command's size is paid 32 times
/// per loaded room.
pub(crate) enum Command {
    Join {
        conn: ConnId,
        peer: Box<Peer>,
        reply: oneshot::Sender<Result<(), RoomError>>,
    },
    Leave {
        conn: ConnId,
    },
    Inbound {
        conn: ConnId,
        msg: Box<Inbound>,
    },
    Read {
        since: Box<StateVector>,
        reply: oneshot::Sender<Result<Snapshot, RoomError>>,
    },
    Write(Box<Write>),
}

/// An update posted over HTTP.
pub(crate) struct Write {
    raw: Bytes,
    update: Update,
    /// Answered with a receiver that fires once the update is durable.
    reply: oneshot::Sender<Result<oneshot::Receiver<()>, RoomError>>,
}

/// What every room shares.
pub struct RoomContext {
    pub store: Arc<dyn Store>,
    pub committer: Committer,
    pub fanout: Arc<dyn Fanout>,
    pub unload_after: Duration,
    /// States of clients on other replicas that are not renewed for this long are dropped.
    pub awareness_timeout: Duration,
}

#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Inner>,
}

struct Inner {
    rooms: Mutex<HashMap<Arc<str>, Entry>>,
    ctx: RoomContext,
    next_id: AtomicU64,
    /// Documents whose state failed to encode: their next load checks it.
    suspect: Mutex<HashSet<Arc<str>>>,
}

struct Entry {
    tx: mpsc::Sender<Command>,
    generation: u64,
}

/// A connection's membership of a room.
pub struct Member {
    tx: mpsc::Sender<Command>,
    pub conn: ConnId,
}

impl Member {
    /// Hands a decoded message to the room, waiting when its queue is full.
    pub async fn send(&self, msg: Inbound) -> bool {
        self.tx
            .send(Command::Inbound {
                conn: self.conn,
                msg: Box::new(msg),
            })
            .await
            .is_ok()
    }

    pub async fn leave(self) {
        let _ = self.tx.send(Command::Leave { conn: self.conn }).await;
    }
}

impl Rooms {
    pub fn new(ctx: RoomContext) -> Self {
        Self {
            inner: Arc::new(Inner {
                rooms: Mutex::new(HashMap::new()),
                ctx,
                next_id: AtomicU64::new(1),
                suspect: Mutex::default(),
            }),
        }
    }

    pub fn context(&self) -> &RoomContext {
        &self.inner.ctx
    }

    pub fn loaded(&self) -> usize {
        self.inner.rooms.lock().expect("rooms lock").len()
    }

    /// Joins the document's room (loading it if needed); the room sends the
    /// initial sync to `peer.outbox` before answering.
    pub async fn join(&self, doc: &str, peer: Peer) -> Result<Member, RoomError> {
        let conn = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let tx = self
            .dispatch(
                doc,
                true,
                Command::Join {
                    conn,
                    peer: Box::new(peer),
                    reply,
                },
            )?
            .expect("spawned");
        answer
            .await
            .map_err(|_| RoomError::Unavailable("room stopped".into()))??;
        Ok(Member { tx, conn })
    }

    /// The document's current state (or the diff against `since`). Served from
    /// memory when loaded here, else straight from the store.
    pub async fn read(&self, doc: &str, since: StateVector) -> Result<Snapshot, RoomError> {
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Read {
            since: Box::new(since.clone()),
            reply,
        };
        match self.dispatch(doc, false, cmd)? {
            Some(_) => answer
                .await
                .map_err(|_| RoomError::Unavailable("room stopped".into()))?,
            None => actor::read_stored(&*self.inner.ctx.store, doc, &since).await,
        }
    }

    /// Merges an update as if a client had sent it; resolves once it is durable.
    pub async fn write(&self, doc: &str, raw: Bytes, update: Update) -> Result<(), RoomError> {
        let (reply, answer) = oneshot::channel();
        let write = Box::new(Write { raw, update, reply });
        self.dispatch(doc, true, Command::Write(write))?;
        let durable = answer
            .await
            .map_err(|_| RoomError::Unavailable("room stopped".into()))??;
        durable
            .await
            .map_err(|_| RoomError::Unavailable("stopped before the update was stored".into()))
    }

    /// Sends a command to the document's room under the registry lock,
    /// spawning the room when `spawn` is set; `None` when it is not loaded
    /// and not spawned (the command is dropped).
    fn dispatch(
        &self,
        doc: &str,
        spawn: bool,
        cmd: Command,
    ) -> Result<Option<mpsc::Sender<Command>>, RoomError> {
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        let tx = match rooms.get(doc) {
            Some(entry) => entry.tx.clone(),
            None if spawn => {
                let doc: Arc<str> = doc.into();
                let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
                let generation = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                rooms.insert(
                    doc.clone(),
                    Entry {
                        tx: tx.clone(),
                        generation,
                    },
                );
                let check = self
                    .inner
                    .suspect
                    .lock()
                    .expect("suspect lock")
                    .remove(&doc);
                actor::spawn(self.clone(), doc, generation, rx, check);
                tx
            }
            None => return Ok(None),
        };
        tx.try_send(cmd).map_err(|_| RoomError::Busy)?;
        Ok(Some(tx))
    }

    /// Marks a document whose state failed to encode, so that its next load
    /// checks it and leaves out what breaks it.
    fn suspect(&self, doc: &Arc<str>) {
        self.inner
            .suspect
            .lock()
            .expect("suspect lock")
            .insert(doc.clone());
    }

    /// Removes a room that ended abnormally from the registry.
    fn forget(&self, doc: &str, generation: u64) {
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        remove_generation(&mut rooms, doc, generation);
    }

    /// Removes a room from the registry if it is still the one registered and
    /// nothing is queued for it. Called by the room itself.
    fn retire(&self, doc: &str, generation: u64, rx: &mut mpsc::Receiver<Command>) -> bool {
        let mut rooms = self.inner.rooms.lock().expect("rooms lock");
        if !rx.is_empty() {
            return false;
        }
        // Under the same lock as the emptiness check: `dispatch` queues under
        // it, so nothing can slip in between.
        remove_generation(&mut rooms, doc, generation);
        rx.close();
        true
    }
}

/// Removes `doc` if it is still the room of that generation (a newer room may
/// have taken its place).
fn remove_generation(rooms: &mut HashMap<Arc<str>, Entry>, doc: &str, generation: u64) {
    if rooms.get(doc).is_some_and(|e| e.generation == generation) {
        rooms.remove(doc);
    }
}
